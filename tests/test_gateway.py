"""The gateway as OctoPrint's clients meet it: real processes (broker, files, virtual printer, gateway) and requests
byte for byte as PrusaSlicer, Cura, Home Assistant and farm managers send them (``octoprint-api.md``)."""
from __future__ import annotations

import json
import socket
import threading
import time
import uuid
from pathlib import Path

import pytest

from tests.conftest import wait_for
from tests.gateway_helpers import Client, cli, free_port, raw_socket, start, stop, write_config
from zevents import bus

GCODE = b"G28\nG1 Z5 F3000\nG1 X10 Y10 E1 F1500\nM104 S0\n"


@pytest.fixture(scope="module")
def gateway_node():
    """One node for the module (starting four processes per test would dominate the suite): users alice (admin)
    and bob (user), each with an API key.  Tests leave what they stored; those that need an empty store compare
    before and after."""
    import shutil
    import tempfile
    from pathlib import Path

    from zevents import broker
    from zevents.config import BusConfig

    directory = Path(tempfile.mkdtemp(prefix="zevg-"))
    bus_config = BusConfig.for_dir(directory, node="gatewaytest", heartbeat=0.2)
    brk, thread = broker.serve_in_thread(bus_config)
    port = free_port()
    config = write_config(directory, bus_config, port, gateway={"max_upload": 200_000})
    assert cli(config, "user", "add", "alice", "--admin", stdin="alice-secret\n").returncode == 0
    assert cli(config, "user", "add", "bob", stdin="bob-secret\n").returncode == 0
    keys = {name: cli(config, "user", "apikey", name).stdout.strip() for name in ("alice", "bob")}
    processes = []
    try:
        processes.append(start(config, bus_config, "files", ["files", "serve"]))
        with bus.Subscriber(bus_config, groups=["comm"]) as comm:
            processes.append(start(config, bus_config, "printer", ["printer", "--virtual"]))
            wait_for(lambda: any(e.name == "PrinterStateChanged" and e.payload["state_id"] == "OPERATIONAL"
                                 for e in [comm.recv(0.5)] if e), 60, 0, "the virtual printer to be operational")
        processes.append(start(config, bus_config, "gateway", ["gateway", "serve"]))
        node = {"config": config, "port": port, "keys": keys, "uploads": directory / "data" / "uploads",
                "bus": bus_config, "processes": processes}
        admin = Client(port, keys["alice"])
        wait_for(lambda: admin.get("/api/printer").status == 200, 60, 0.1, "the gateway to see the printer")
        yield node
    finally:
        for process in reversed(processes):
            stop(process)
        brk.stop()
        thread.join(5)
        brk.close()
        shutil.rmtree(directory, ignore_errors=True)


@pytest.fixture
def node(gateway_node):
    """The module's node with a subscriber of this test's own (file, server, print and comm events)."""
    subscriber = bus.Subscriber(gateway_node["bus"], groups=["file", "server", "print", "comm"])
    try:
        yield dict(gateway_node, subscriber=subscriber)
    finally:
        subscriber.close()


def stored(uploads) -> set:
    return {str(p.relative_to(uploads)) for p in uploads.rglob("*") if not p.name.startswith(".")}


def events_named(subscriber, names: set, count: int, timeout: float = 30.0) -> list:
    got = []
    deadline = time.monotonic() + timeout
    while len(got) < count:
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"got {[(e.name, e.payload) for e in got]}"
        envelope = subscriber.recv(remaining)
        if envelope is not None and envelope.name in names:
            got.append(envelope)
    return got


# --- access ---------------------------------------------------------------------------------------------------------

ROUTES_GET = ["/api/version", "/api/server", "/api/settings", "/api/files", "/api/files/local", "/api/job",
              "/api/printer", "/api/printer/tool", "/api/printer/bed", "/api/connection", "/api/printerprofiles",
              "/api/timelapse", "/api/slicing", "/api/system/commands", "/api/files/local/x.gcode"]
ROUTES_POST = ["/api/job", "/api/printer/tool", "/api/printer/bed", "/api/printer/command", "/api/connection",
               "/api/files/local", "/api/files/local/x.gcode", "/api/settings", "/api/logout",
               "/api/system/commands/core/restart", "/api/printer/printhead"]


def test_every_route_refuses_unauthenticated_access(node):
    anonymous = Client(node["port"])
    wrong_key = Client(node["port"], "not-a-key")
    for client in (anonymous, wrong_key):
        for path in ROUTES_GET:
            response = client.get(path)
            assert response.status == 403, (path, response.status, response.body)
            assert response.json()["error"].startswith("You don't have the permission")
        for path in ROUTES_POST:
            response = client.post_json(path, {"command": "connect"})
            assert (response.status, response.json()) == (400, {"error": "CSRF validation failed"}), path
        assert client.request("DELETE", "/api/files/local/x.gcode").status == 400
    assert anonymous.get("/api/currentuser").json() == {"name": None, "groups": ["guests"], "permissions": []}
    assert not any("session" in c for c in Client(node["port"], node["keys"]["bob"])
                   .get("/api/version").set_cookies)                   # API-key requests never get a cookie


def test_version_server_and_permissions(node):
    bob = Client(node["port"], node["keys"]["bob"])
    assert bob.get("/api/version").json() == {"api": "0.1", "server": "1.11.8", "text": "OctoPrint 1.11.8"}
    assert bob.get("/api/server").json() == {"version": "1.11.8", "safemode": None}
    me = bob.get("/api/currentuser").json()
    assert me["name"] == "bob" and "STATUS" in me["permissions"] and "ADMIN" not in me["permissions"]
    assert bob.get("/api/system/commands").status == 403              # SYSTEM is the admins'
    assert bob.get("/api/nowhere").json()["error"].startswith("The requested URL was not found")
    assert Client(node["port"], node["keys"]["alice"]).post_json(
        "/api/system/commands/core/restart", {}).status == 404        # not configured, as OctoPrint by default


def test_login_csrf_cookie_session_and_logout(node):
    browser = Client(node["port"], cookies=True)
    assert browser.post_json("/api/login", {"user": "bob", "pass": "bob-secret"}).status == 400   # no CSRF yet
    browser.get("/login")
    token_name = f"csrf_token_P{node['port']}"
    token = browser.jar[token_name]
    headers = {"X-CSRF-Token": token}
    assert browser.post_json("/api/login", {"user": "bob", "pass": "wrong"}, headers).status == 403
    login = browser.post_json("/api/login", {"user": "bob", "pass": "bob-secret"}, headers)
    assert login.status == 200, login.body
    assert login.json()["name"] == "bob" and login.json()["_login_mechanism"] == "password"
    assert len(login.json()["session"]) == 64
    assert browser.get("/api/job").status == 200                          # the cookie session works
    assert browser.post_json("/api/printer/command", {"command": "M105"}).status == 400   # cookie without CSRF
    sent = browser.post_json("/api/printer/command", {"command": "M105"}, headers)
    assert sent.status == 204, sent.body
    logout = browser.post_json("/api/logout", {}, headers)
    assert (logout.status, logout.json()) == (200, {"needs": {"group": ["guests"]}})
    assert browser.get("/api/job").status == 403
    names = [e.name for e in events_named(node["subscriber"], {"UserLoggedIn", "UserLoggedOut"}, 2)]
    assert names == ["UserLoggedIn", "UserLoggedOut"]


def test_failed_logins_are_throttled(node):
    browser = Client(node["port"], cookies=True)
    browser.get("/login")
    headers = {"X-CSRF-Token": browser.jar[f"csrf_token_P{node['port']}"]}
    statuses = [browser.post_json("/api/login", {"user": "bob", "pass": "nope"}, headers).status for _ in range(4)]
    assert statuses[-1] == 429 and statuses.count(403) <= 3
    assert browser.post_json("/api/login", {"user": "bob", "pass": "bob-secret"}, headers).status == 429


# --- the clients' own flows ---------------------------------------------------------------------------------------

def test_prusaslicer_upload_flow(node):
    """PrusaSlicer: GET /api/version, then a multipart upload with print, path and file in that order."""
    client = Client(node["port"], node["keys"]["bob"])
    version = client.get("/api/version").json()
    assert "api" in version and version["text"].startswith("OctoPrint")
    response = client.upload("/api/files/local", [("print", "false"), ("path", "prusa"),
                                                  ("file", "cube.gcode", GCODE)])
    assert response.status == 201, response.body
    port = node["port"]
    assert response.header("Location") == f"http://127.0.0.1:{port}/api/files/local/prusa/cube.gcode"
    body = response.json()
    assert body == {"done": True, "effectiveSelect": False, "effectivePrint": False,
                    "files": {"local": {"name": "cube.gcode", "path": "prusa/cube.gcode", "origin": "local",
                                        "refs": {"resource": f"http://127.0.0.1:{port}/api/files/local/prusa/"
                                                             "cube.gcode",
                                                 "download": f"http://127.0.0.1:{port}/downloads/files/local/"
                                                             "prusa/cube.gcode"}}}}
    assert (node["uploads"] / "prusa" / "cube.gcode").read_bytes() == GCODE
    names = [e.name for e in events_named(node["subscriber"], {"FileAdded", "UpdatedFiles", "Upload"}, 3)]
    assert names == ["FileAdded", "UpdatedFiles", "Upload"]
    listing = client.get("/api/files/local/prusa/cube.gcode").json()
    assert listing["typePath"] == ["machinecode", "gcode"] and listing["size"] == len(GCODE)
    download = client.get("/downloads/files/local/prusa/cube.gcode")
    assert download.status == 200 and download.body == GCODE


def test_cura_flow_appkeys_settings_profiles_upload_select_and_print(node):
    port, config = node["port"], node["config"]
    anonymous = Client(port)
    assert anonymous.get("/plugin/appkeys/probe").status == 204
    request = anonymous.post_json("/plugin/appkeys/request", {"app": "Cura"})
    assert request.status == 201
    location = request.header("Location")
    assert location.startswith(f"http://127.0.0.1:{port}/plugin/appkeys/request/")
    token = location.rsplit("/", 1)[1]
    assert request.json()["app_token"] == token and "auth_dialog" in request.json()
    polls: list = []

    def poll_like_cura():                       # every 0.5 s until a decision, as Cura does
        while True:
            response = anonymous.get(f"/plugin/appkeys/request/{token}")
            polls.append((response.status, response.json()))
            if response.status != 202:
                return
            time.sleep(0.5)
    poller = threading.Thread(target=poll_like_cura)
    poller.start()
    try:
        wait_for(lambda: polls, 10, message="the first poll")
        pending = json.loads(cli(config, "user", "appkey", "ls", "--json").stdout)
        assert [p["app_id"] for p in pending] == ["Cura"]
        approved = cli(config, "user", "appkey", "approve", pending[0]["user_token"], "--user", "bob")
        assert approved.returncode == 0, approved.stderr
    finally:
        poller.join(30)
    assert polls[0] == (202, {"message": "Awaiting decision"})
    assert polls[-1][0] == 200
    key = polls[-1][1]["api_key"]
    assert anonymous.get(f"/plugin/appkeys/request/{token}").status == 404        # exactly once
    cura = Client(port, key)
    settings = cura.get("/api/settings")
    assert settings.status == 200
    tree = settings.json()
    assert isinstance(tree["plugins"]["discovery"]["upnpUuid"], str)
    assert {"webcamEnabled", "streamUrl", "snapshotUrl", "flipH", "flipV", "rotate90"} <= set(tree["webcam"])
    assert tree["feature"]["sdSupport"] is True and tree["gcodeAnalysis"]["runAt"] == "never"
    passive = cura.post_json("/api/login", {"passive": True}).json()
    assert passive["name"] == "bob" and passive["_login_mechanism"] == "apikey"
    profiles = cura.get("/api/printerprofiles").json()["profiles"]
    current = [p for p in profiles.values() if p["current"]]
    assert current and {"x", "y", "z", "e"} <= set(current[0]["axes"])
    upload = cura.upload("/api/files/local", [("path", ""), ("file", "cura.gcode", GCODE), ("select", "true")])
    assert upload.status == 201 and upload.json()["effectiveSelect"] is True, upload.body
    assert upload.header("Location").split("api/", 1)[1] == "files/local/cura.gcode"
    assert cura.post_json("/api/files/local/cura.gcode", {"command": "select", "print": True}).status == 204
    started, done = events_named(node["subscriber"], {"PrintStarted", "PrintDone"}, 2)
    assert started.payload["name"] == "cura.gcode" and done.name == "PrintDone"
    wait_for(lambda: cura.get("/api/job").json()["state"] == "Operational", 30, 0.1)
    job = cura.get("/api/job").json()
    assert job["job"]["file"]["name"] == "cura.gcode" and "progress" in job
    flags = cura.get("/api/printer").json()["state"]["flags"]
    assert {"error", "closedOrError", "paused", "pausing", "printing", "cancelling", "ready", "operational"} \
        <= set(flags)


def test_home_assistant_flow(node):
    client = Client(node["port"], node["keys"]["alice"])
    printer = client.get("/api/printer").json()
    assert "tool0" in printer["temperature"] and "bed" in printer["temperature"]
    assert printer["state"]["flags"]["operational"] is True and len(printer["state"]["flags"]) == 11
    job = client.get("/api/job").json()
    assert set(job) >= {"job", "progress", "state"} and "file" in job["job"]
    assert client.post_json("/api/printer/tool", {"command": "target", "targets": {"tool0": 210}}).status == 204
    assert client.post_json("//api/printer/bed", {"command": "target", "target": 60, "offset": 0}).status == 204
    wait_for(lambda: (client.get("/api/printer").json()["temperature"]["bed"]["target"] or 0) == 60, 30, 0.2,
             "the bed target to reach the printer")
    assert client.post_json("/api/printer/tool", {"command": "target", "targets": {"tool0": "hot"}}).status == 400
    assert client.post_json("/api/job", {"command": "cancel"}).status == 409        # nothing printing
    assert client.post_json("/api/job", {"command": "start"}).status == 204          # nothing selected: no-op
    assert client.post_json("/api/job", {"command": "dance"}).json() == {"error": "command is invalid"}
    assert client.post_json("/api/connection", {"command": "connect", "printerprofile": "x",
                                                "baudrate": 115200}).status == 204


# --- uploads that must be refused ---------------------------------------------------------------------------------

@pytest.mark.parametrize("fields, status, message", [
    ([("path", "../outside"), ("file", "a.gcode", GCODE)], 400, "invalid file name"),
    ([("path", "/etc"), ("file", "a.gcode", GCODE)], 400, "invalid file name"),
    ([("path", "sub\\dir"), ("file", "a.gcode", GCODE)], 400, "invalid file name"),
    ([("file", "notes.txt", b"hello")], 415, "invalid type"),
    ([("print", "true")], 400, "No file to upload"),
    ([("file.name", "x"), ("file", "a.gcode", GCODE)], 400, "reserved"),
    ([("userdata", "{not json"), ("file", "a.gcode", GCODE)], 400, "userdata contains invalid JSON"),
    ([("file", "big.gcode", b"G1 X1\n" * 40_000)], 413, "larger than the limit"),
])
def test_bad_uploads_are_refused_with_nothing_stored(node, fields, status, message):
    client = Client(node["port"], node["keys"]["bob"])
    before = stored(node["uploads"])
    response = client.upload("/api/files/local", fields)
    assert response.status == status, response.body
    assert message in response.json()["error"]
    assert stored(node["uploads"]) == before
    assert list((node["uploads"].parent / "gateway" / "tmp").glob("*")) == []


def test_malformed_multipart_and_a_missing_content_length(node):
    port, key = node["port"], node["keys"]["bob"]
    client = Client(port, key)
    before = stored(node["uploads"])
    broken = client.request("POST", "/api/files/local", b"--xyz\r\nContent-Disposition: form-data; name=\"file\"; "
                                                        b"filename=\"a.gcode\"\r\n\r\nG28", None,
                            "multipart/form-data; boundary=xyz")
    assert broken.status == 400
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(f"POST /api/files/local HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Api-Key: {key}\r\n"
                     "Content-Type: multipart/form-data; boundary=xyz\r\nTransfer-Encoding: chunked\r\n\r\n"
                     "0\r\n\r\n".encode())
        assert sock.recv(4096).split(b"\r\n", 1)[0].endswith(b"411 Length Required")
    assert stored(node["uploads"]) == before


# --- the push socket ---------------------------------------------------------------------------------------------

async def _sockjs_session(port: int, key: str, fire, want: str):
    """octoprint_client's way: passive login with the key, the SockJS websocket, auth on `connected`; returns the
    messages up to the event named ``want`` (which ``fire()`` publishes once auth is through)."""
    import aiohttp

    async with aiohttp.ClientSession() as http:
        login = await (await http.post(f"http://127.0.0.1:{port}/api/login", data={"passive": "True"},
                                       headers={"X-Api-Key": key})).json()
        async with http.ws_connect(f"ws://127.0.0.1:{port}/sockjs/123/{uuid.uuid4()}/websocket") as ws:
            frames = [(await ws.receive(timeout=10)).data]
            assert frames[0] == "o"
            seen, fired = [], False
            while True:
                frame = (await ws.receive(timeout=20)).data
                assert frame.startswith(("a", "h")), frame
                if frame == "h":
                    continue
                for message in json.loads(frame[1:]):
                    assert isinstance(message, dict) and len(message) == 1
                    seen.append(message)
                    kind = next(iter(message))
                    if kind == "connected":
                        await ws.send_str(json.dumps([json.dumps({"auth": f"{login['name']}:{login['session']}"})]))
                    if kind == "history" and not fired:
                        fired = True
                        fire()
                    if kind == "event" and message["event"]["type"] == want:
                        return seen


def test_push_socket_connected_auth_history_and_bus_events(node):
    import asyncio

    def fire():
        with bus.Publisher(node["bus"], src="test") as publisher:
            publisher.publish_confirmed("PrintProgress", {"name": "x.gcode", "path": "x.gcode", "origin": "local",
                                                          "progress": 42, "fileposition": 10, "time": 1.0})
    seen = asyncio.run(_sockjs_session(node["port"], node["keys"]["bob"], fire, "PrintProgress"))
    kinds = [next(iter(m)) for m in seen]
    assert kinds[0] == "connected" and "apikey" not in seen[0]["connected"]
    assert kinds.index("history") < kinds.index("timelapse") if "timelapse" in kinds else True
    assert "current" not in kinds[:kinds.index("history")]
    history = seen[kinds.index("history")]["history"]
    assert history["state"]["flags"]["operational"] is True
    event = seen[-1]["event"]
    assert event["payload"]["progress"] == 42
    client_events = [m["event"]["type"] for m in seen if "event" in m]
    assert "ClientAuthed" in client_events
    authed = next(m["event"] for m in seen if "event" in m and m["event"]["type"] == "ClientAuthed")
    assert authed["payload"] == {}                           # bob is no admin: client payloads are admins'


def test_bad_socket_auth_gets_reauth_required_and_nothing_else(node):
    import asyncio

    import aiohttp

    async def session():
        async with aiohttp.ClientSession() as http:
            async with http.ws_connect(f"ws://127.0.0.1:{node['port']}/sockjs/websocket") as ws:
                connected = json.loads((await ws.receive(timeout=10)).data)
                await ws.send_str(json.dumps({"auth": "bob:not-a-session"}))
                answer = json.loads((await ws.receive(timeout=10)).data)
                with bus.Publisher(node["bus"], src="test") as publisher:
                    publisher.publish_confirmed("PrintProgress", {"progress": 1})
                try:
                    extra = await ws.receive(timeout=2)
                except asyncio.TimeoutError:
                    extra = None
                return connected, answer, extra
    connected, answer, extra = asyncio.run(session())
    assert "connected" in connected
    assert answer == {"reauthRequired": {"reason": "stale"}}
    assert extra is None                                     # anonymous: events are held back, never sent


def test_a_slow_socket_client_does_not_delay_the_others(node):
    """One raw-socket client authenticates and then never reads; another reads everything. The bus pushes far
    more than the slow one's buffers hold: the fast one gets every event, the slow one is dropped."""
    import asyncio

    import aiohttp

    count = 20_000
    port, key = node["port"], node["keys"]["alice"]

    async def scenario():
        async with aiohttp.ClientSession() as slow_http, aiohttp.ClientSession(read_bufsize=1024) as fast_http:
            slow = await raw_socket(slow_http, port, key, {"events": ["PrintProgress"]})
            slow._response.connection.transport.pause_reading()      # it stops reading: its TCP window fills
            fast = await raw_socket(fast_http, port, key, {"events": ["PrintProgress"]})
            await asyncio.sleep(0.5)

            def publish():
                with bus.Publisher(node["bus"], src="test") as publisher:
                    for index in range(count):
                        publisher.publish("PrintProgress", {"progress": index % 100, "fileposition": index,
                                                            "path": "x" * 1000})
                    publisher.publish("PrintProgress", {"fileposition": -1})   # same socket: after the rest
            await asyncio.get_running_loop().run_in_executor(None, publish)
            positions = set()
            while True:
                message = json.loads((await fast.receive(timeout=60)).data)
                if "event" in message:
                    position = message["event"]["payload"].get("fileposition")
                    if position == -1:
                        break
                    if position is not None:
                        positions.add(position)
            await fast.close()
            return positions
    positions = asyncio.run(scenario())
    assert positions == set(range(count))
    # the slow one: its socket stopped taking frames while thousands waited, so the gateway let it go
    closed = events_named(node["subscriber"], {"ClientClosed"}, 1, timeout=30)
    assert closed[0].payload["remoteAddress"] == "127.0.0.1"


def test_connectivity_changed_when_a_local_target_goes_and_comes_back(gateway_node, tmp_path):
    """server.onlineCheck pointed at a port of this machine: closing it is going offline, reopening it online."""
    import subprocess

    from zevents.gateway.service import parse_listen

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    target = listener.getsockname()[1]
    port = free_port()
    directory = tmp_path
    config = write_config(directory, gateway_node["bus"], port,
                          gateway={"commands": f"ipc://{gateway_node['config'].parent}/gw2.sock"},
                          server={"onlineCheck": {"enabled": True, "interval": 3600, "host": "127.0.0.1",
                                                  "port": target, "name": "localhost"}})
    assert parse_listen(f"127.0.0.1:{port}")[1] == port
    subscriber = bus.Subscriber(gateway_node["bus"], groups=["server"])
    gateway = start(config, gateway_node["bus"], "gateway", ["gateway", "serve"])
    try:
        check = cli(config, "gateway", "online-check", "--json")
        assert check.returncode == 0 and json.loads(check.stdout)["online"] is True
        listener.close()
        offline = cli(config, "gateway", "online-check")
        assert offline.returncode == 1 and "connection: False" in offline.stdout
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", target))
        listener.listen(16)
        assert cli(config, "gateway", "online-check").returncode == 0
        changes = [e.payload for e in events_named(subscriber, {"ConnectivityChanged"}, 2)]
    finally:
        stop(gateway)
        subscriber.close()
        listener.close()
    assert changes == [{"old": True, "new": False, "connection": False, "resolution": False},
                       {"old": False, "new": True, "connection": True, "resolution": True}]
    assert subprocess  # the CLI ran as real processes above


def test_a_service_that_is_not_running_is_a_503_at_once(gateway_node, tmp_path):
    """A gateway whose files service and printer link are not running (no socket): 503 with the reason, not a
    request that waits out its timeout nor a 400 that blames the client."""
    port = free_port()
    config = write_config(tmp_path, gateway_node["bus"], port)
    assert cli(config, "user", "add", "carol", "--admin", stdin="carol-secret\n").returncode == 0
    key = cli(config, "user", "apikey", "carol").stdout.strip()
    gateway = start(config, gateway_node["bus"], "gateway", ["gateway", "serve"])
    try:
        client = Client(port, key)
        for response, service in ((client.get("/api/files"), "the files service"),
                                  (client.post_json("/api/printer/command", {"command": "M105"}),
                                   "the printer link")):
            assert response.status == 503 and f"{service} is not running" in response.body.decode(), \
                (service, response.status, response.body)
    finally:
        stop(gateway)


# --- OctoPrint's own client, from the side venv -----------------------------------------------------------------

def octoprint_client(node, *args, timeout: float = 60):
    import os
    import subprocess

    python = os.environ.get("ZEVENTS_OCTOPRINT_PYTHON")
    if not python:
        pytest.skip("set ZEVENTS_OCTOPRINT_PYTHON to an interpreter with OctoPrint installed (.ci/run does)")
    octoprint = str(Path(python).parent / "octoprint")
    return subprocess.run([octoprint, "client", "--apikey", node["keys"]["bob"], "--host", "127.0.0.1",
                           "--port", str(node["port"])] + list(args), capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "HOME": str(node["config"].parent)})


def answered(result) -> tuple:
    """`octoprint client` prints "Status Code: N" and then the body."""
    assert result.returncode == 0, result.stderr
    first, _, body = result.stdout.partition("\n")
    assert first.startswith("Status Code: "), result.stdout
    return int(first.split(": ")[1]), body.strip()


def test_octoprint_client_get_post_command_and_upload(node, tmp_path):
    status, body = answered(octoprint_client(node, "get", "/api/version"))
    assert status == 200 and json.loads(body)["text"] == "OctoPrint 1.11.8"
    assert answered(octoprint_client(node, "command", "/api/printer/bed", "target", "-i", "target", "40"))[0] == 204
    assert answered(octoprint_client(node, "post_json", "/api/printer/command",
                                     '{"commands": ["M105", "M114"]}'))[0] == 204
    gcode = tmp_path / "client.gcode"
    gcode.write_bytes(GCODE)
    status, body = answered(octoprint_client(node, "upload", "/api/files/local", str(gcode), "-P", "path", "octo"))
    assert status == 201, body
    assert (node["uploads"] / "octo" / "client.gcode").read_bytes() == GCODE
    names = [e.name for e in events_named(node["subscriber"], {"FileAdded", "UpdatedFiles", "Upload"}, 3)]
    assert names == ["FileAdded", "UpdatedFiles", "Upload"]


def test_octoprint_client_listen_authenticates_and_receives_bus_events(node):
    import os
    import subprocess

    python = os.environ.get("ZEVENTS_OCTOPRINT_PYTHON")
    if not python:
        pytest.skip("set ZEVENTS_OCTOPRINT_PYTHON to an interpreter with OctoPrint installed (.ci/run does)")
    octoprint = str(Path(python).parent / "octoprint")
    process = subprocess.Popen([octoprint, "client", "--apikey", node["keys"]["bob"], "--host", "127.0.0.1",
                                "--port", str(node["port"]), "listen"], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    lines = []
    try:
        def read_until(marker: str):
            while True:
                line = process.stdout.readline()
                assert line, f"listen ended: {lines[-20:]}"
                lines.append(line)
                if marker in line:
                    return line
        read_until("connected")
        read_until("history")
        with bus.Publisher(node["bus"], src="test") as publisher:
            publisher.publish_confirmed("PrintProgress", {"name": "listen.gcode", "progress": 77})
        line = read_until("listen.gcode")
        assert "PrintProgress" in line and "77" in line
    finally:
        process.terminate()
        process.wait(10)
        process.stdout.close()


def test_timelapse_listing_and_download(node):
    """What the timelapse service rendered is listed and downloadable; names outside its folder are not."""
    movies = node["config"].parent / "data" / "timelapse" / "printer"
    movies.mkdir(parents=True, exist_ok=True)
    (movies / "cube_20261207.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"x" * 100)
    client = Client(node["port"], node["keys"]["bob"])
    listing = client.get("/api/timelapse").json()
    entry = next(f for f in listing["files"] if f["name"] == "cube_20261207.mp4")
    assert entry["url"] == "/downloads/timelapse/printer/cube_20261207.mp4" and entry["bytes"] == 112
    assert listing["config"] == {"type": "off"} and "unrendered" not in listing
    assert "unrendered" in client.get("/api/timelapse?unrendered=true").json()
    download = client.get(entry["url"])
    assert download.status == 200 and download.body.startswith(b"\x00\x00\x00\x18ftyp")
    assert client.get("/downloads/timelapse/printer/..%2F..%2Fusers.yaml").status == 404
    assert Client(node["port"]).get(entry["url"]).status == 403


def test_urls_honour_a_reverse_proxys_headers(node):
    """Behind a proxy OctoPrint builds Location and refs from X-Forwarded-* and X-Script-Name; so do we."""
    client = Client(node["port"], node["keys"]["bob"])
    headers = {"X-Forwarded-Proto": "https", "X-Forwarded-Host": "printers.example", "X-Script-Name": "/octo"}
    response = client.upload("/api/files/local", [("path", "proxied"), ("file", "p.gcode", GCODE)], headers)
    assert response.status == 201, response.body
    assert response.header("Location") == "https://printers.example/octo/api/files/local/proxied/p.gcode"
    refs = response.json()["files"]["local"]["refs"]
    assert refs["download"] == "https://printers.example/octo/downloads/files/local/proxied/p.gcode"
    assert any(cookie.startswith("csrf_token_P") and "_R" in cookie.split("=", 1)[0]
               for cookie in client.get("/login", headers={"X-Script-Name": "/octo"}).set_cookies)
