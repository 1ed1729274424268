"""The gateway as OctoPrint's clients meet it: real processes (broker, files, virtual printer, gateway) and requests
byte for byte as PrusaSlicer, Cura, Home Assistant and farm managers send them (``octoprint-api.md``)."""
from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from tests.conftest import wait_for
from tests.gateway_helpers import Client, cli, free_port, start, stop, write_config
from zevents import bus

GCODE = b"G28\nG1 Z5 F3000\nG1 X10 Y10 E1 F1500\nM104 S0\n"


@pytest.fixture
def gateway_node(short_tmp, bus_config, running_broker):
    """A node with users alice (admin) and bob (user), each with an API key; yields a dict of handles."""
    port = free_port()
    config = write_config(short_tmp, bus_config, port, gateway={"max_upload": 200_000})
    assert cli(config, "user", "add", "alice", "--admin", stdin="alice-secret\n").returncode == 0
    assert cli(config, "user", "add", "bob", stdin="bob-secret\n").returncode == 0
    keys = {name: cli(config, "user", "apikey", name).stdout.strip() for name in ("alice", "bob")}
    subscriber = bus.Subscriber(bus_config, groups=["file", "server", "print", "comm"])
    processes = []
    try:
        processes.append(start(config, bus_config, "files", ["files", "serve"]))
        processes.append(start(config, bus_config, "printer", ["printer", "--virtual"]))
        processes.append(start(config, bus_config, "gateway", ["gateway", "serve"]))
        node = {"config": config, "port": port, "keys": keys, "subscriber": subscriber,
                "uploads": short_tmp / "data" / "uploads", "bus": bus_config}
        admin = Client(port, keys["alice"])
        wait_for(lambda: admin.get("/api/printer").status == 200, 30, 0.1, "the printer to be operational")
        yield node
    finally:
        for process in reversed(processes):
            stop(process)
        subscriber.close()


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


def test_every_route_refuses_unauthenticated_access(gateway_node):
    anonymous = Client(gateway_node["port"])
    wrong_key = Client(gateway_node["port"], "not-a-key")
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
    assert not any("session" in c for c in Client(gateway_node["port"], gateway_node["keys"]["bob"])
                   .get("/api/version").set_cookies)                   # API-key requests never get a cookie


def test_version_server_and_permissions(gateway_node):
    bob = Client(gateway_node["port"], gateway_node["keys"]["bob"])
    assert bob.get("/api/version").json() == {"api": "0.1", "server": "1.11.8", "text": "OctoPrint 1.11.8"}
    assert bob.get("/api/server").json() == {"version": "1.11.8", "safemode": None}
    me = bob.get("/api/currentuser").json()
    assert me["name"] == "bob" and "STATUS" in me["permissions"] and "ADMIN" not in me["permissions"]
    assert bob.get("/api/system/commands").status == 403              # SYSTEM is the admins'
    assert bob.get("/api/nowhere").json()["error"].startswith("The requested URL was not found")
    assert Client(gateway_node["port"], gateway_node["keys"]["alice"]).post_json(
        "/api/system/commands/core/restart", {}).status == 404        # not configured, as OctoPrint by default


def test_login_csrf_cookie_session_and_logout(gateway_node):
    browser = Client(gateway_node["port"], cookies=True)
    assert browser.post_json("/api/login", {"user": "bob", "pass": "bob-secret"}).status == 400   # no CSRF yet
    browser.get("/login")
    token_name = f"csrf_token_P{gateway_node['port']}"
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
    names = [e.name for e in events_named(gateway_node["subscriber"], {"UserLoggedIn", "UserLoggedOut"}, 2)]
    assert names == ["UserLoggedIn", "UserLoggedOut"]


def test_failed_logins_are_throttled(gateway_node):
    browser = Client(gateway_node["port"], cookies=True)
    browser.get("/login")
    headers = {"X-CSRF-Token": browser.jar[f"csrf_token_P{gateway_node['port']}"]}
    statuses = [browser.post_json("/api/login", {"user": "bob", "pass": "nope"}, headers).status for _ in range(4)]
    assert statuses == [403, 403, 403, 429]
    assert browser.post_json("/api/login", {"user": "bob", "pass": "bob-secret"}, headers).status == 429


# --- the clients' own flows ---------------------------------------------------------------------------------------

def test_prusaslicer_upload_flow(gateway_node):
    """PrusaSlicer: GET /api/version, then a multipart upload with print, path and file in that order."""
    client = Client(gateway_node["port"], gateway_node["keys"]["bob"])
    version = client.get("/api/version").json()
    assert "api" in version and version["text"].startswith("OctoPrint")
    response = client.upload("/api/files/local", [("print", "false"), ("path", "prusa"),
                                                  ("file", "cube.gcode", GCODE)])
    assert response.status == 201, response.body
    port = gateway_node["port"]
    assert response.header("Location") == f"http://127.0.0.1:{port}/api/files/local/prusa/cube.gcode"
    body = response.json()
    assert body == {"done": True, "effectiveSelect": False, "effectivePrint": False,
                    "files": {"local": {"name": "cube.gcode", "path": "prusa/cube.gcode", "origin": "local",
                                        "refs": {"resource": f"http://127.0.0.1:{port}/api/files/local/prusa/"
                                                             "cube.gcode",
                                                 "download": f"http://127.0.0.1:{port}/downloads/files/local/"
                                                             "prusa/cube.gcode"}}}}
    assert (gateway_node["uploads"] / "prusa" / "cube.gcode").read_bytes() == GCODE
    names = [e.name for e in events_named(gateway_node["subscriber"], {"FileAdded", "UpdatedFiles", "Upload"}, 3)]
    assert names == ["FileAdded", "UpdatedFiles", "Upload"]
    listing = client.get("/api/files/local/prusa/cube.gcode").json()
    assert listing["typePath"] == ["machinecode", "gcode"] and listing["size"] == len(GCODE)
    download = client.get("/downloads/files/local/prusa/cube.gcode")
    assert download.status == 200 and download.body == GCODE


def test_cura_flow_appkeys_settings_profiles_upload_select_and_print(gateway_node):
    port, config = gateway_node["port"], gateway_node["config"]
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
    started = events_named(gateway_node["subscriber"], {"PrintStarted"}, 1)[0]
    assert started.payload["name"] == "cura.gcode"
    wait_for(lambda: cura.get("/api/job").json()["state"] in ("Printing", "Operational"), 30, 0.1)
    job = cura.get("/api/job").json()
    assert job["job"]["file"]["name"] == "cura.gcode" and "progress" in job
    flags = cura.get("/api/printer").json()["state"]["flags"]
    assert {"error", "closedOrError", "paused", "pausing", "printing", "cancelling", "ready", "operational"} \
        <= set(flags)


def test_home_assistant_flow(gateway_node):
    client = Client(gateway_node["port"], gateway_node["keys"]["alice"])
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
def test_bad_uploads_are_refused_with_nothing_stored(gateway_node, fields, status, message):
    client = Client(gateway_node["port"], gateway_node["keys"]["bob"])
    response = client.upload("/api/files/local", fields)
    assert response.status == status, response.body
    assert message in response.json()["error"]
    stored = [p for p in gateway_node["uploads"].rglob("*") if not p.name.startswith(".")]
    assert stored == []
    assert list((gateway_node["uploads"].parent / "gateway" / "tmp").glob("*")) == []


def test_malformed_multipart_and_a_missing_content_length(gateway_node):
    port, key = gateway_node["port"], gateway_node["keys"]["bob"]
    client = Client(port, key)
    broken = client.request("POST", "/api/files/local", b"--xyz\r\nContent-Disposition: form-data; name=\"file\"; "
                                                        b"filename=\"a.gcode\"\r\n\r\nG28", None,
                            "multipart/form-data; boundary=xyz")
    assert broken.status == 400
    with socket.create_connection(("127.0.0.1", port)) as sock:
        sock.sendall(f"POST /api/files/local HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nX-Api-Key: {key}\r\n"
                     "Content-Type: multipart/form-data; boundary=xyz\r\nTransfer-Encoding: chunked\r\n\r\n"
                     "0\r\n\r\n".encode())
        assert sock.recv(4096).split(b"\r\n", 1)[0].endswith(b"411 Length Required")
    assert [p for p in gateway_node["uploads"].rglob("*") if not p.name.startswith(".")] == []
