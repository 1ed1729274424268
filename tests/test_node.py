"""`zevents run`, the whole node, as a newcomer starts it: real processes in a temporary HOME."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import wait_for
from zevents import bus, config as zconfig


def node_env(home: Path) -> dict:
    env = dict(os.environ)
    for key in ("ZEVENTS_CONFIG", "XDG_DATA_HOME"):
        env.pop(key, None)
    runtime = home / "run"
    runtime.mkdir(mode=0o700, exist_ok=True)
    env.update(HOME=str(home), XDG_RUNTIME_DIR=str(runtime), PYTHONUNBUFFERED="1")
    return env


class Node:
    """A `zevents run` child process plus a view of its bus."""

    def __init__(self, home: Path, *args: str):
        self.home = home
        self.env = node_env(home)
        self.args = args
        self.process = None
        self.log = home / f"node-{len(list(home.glob('node-*.log')))}.log"

    def config(self):
        """The node's configuration as its children see it (same HOME, same runtime dir)."""
        previous = {k: os.environ.get(k) for k in ("HOME", "XDG_RUNTIME_DIR")}
        os.environ.update(HOME=self.env["HOME"], XDG_RUNTIME_DIR=self.env["XDG_RUNTIME_DIR"])
        try:
            config_arg = [a for i, a in enumerate(self.args) if i and self.args[i - 1] in ("-c", "--config")]
            config = zconfig.load(config_arg[0] if config_arg else None, text=None if config_arg else "")
            # Resolve the endpoints here, where the runtime directory is the node's.
            resolved = config.bus
            config.data["bus"].update(node=config.node, publish=resolved.publish, ingest=resolved.ingest,
                                      replay=resolved.replay)
            config.data["printer"]["commands"] = config.endpoint("printer", "commands", "printer.sock")
            return config
        finally:
            for key, value in previous.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def start(self):
        self.output = open(self.log, "w")
        self.process = subprocess.Popen([sys.executable, "-m", "zevents", "run", *self.args], env=self.env,
                                        stdout=self.output, stderr=subprocess.STDOUT, text=True)
        return self

    def text(self) -> str:
        return self.log.read_text()

    def children(self) -> list[int]:
        out = subprocess.run(["pgrep", "-P", str(self.process.pid)], capture_output=True, text=True).stdout
        return [int(pid) for pid in out.split()]

    def stop(self, sig=signal.SIGTERM, timeout: float = 30):
        if self.process and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.output.close()
        return self.process.returncode


@pytest.fixture
def home(tmp_path_factory):
    import shutil
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="zevh-"))  # short: ipc paths live below it
    yield path
    shutil.rmtree(path, ignore_errors=True)


def status_of(node: Node) -> dict | None:
    path = Path(node.env["XDG_RUNTIME_DIR"]) / "zevents" / node.config().node / "node.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def wait_started(node: Node, timeout: float = 60) -> dict:
    """Wait for Startup; returns the supervisor's status (services with pids)."""
    def ready():
        assert node.process.poll() is None, f"zevents run exited early:\n{node.text()}"
        status = status_of(node)
        return status if status and all(s["ready"] for s in status["services"]) and "Startup" in node.text() \
            else None

    return wait_for(ready, timeout, 0.1, message="Startup")


def test_run_with_no_arguments_starts_a_whole_node_and_stops_cleanly(home):
    node = Node(home).start()
    try:
        status = wait_started(node)
        names = [s["name"] for s in status["services"]]
        assert names[0] == "broker" and "printer" in names and "hooks" in names
        pids = [s["pid"] for s in status["services"]]
        assert sorted(pids) == sorted(node.children())
        config = node.config()
        assert config.bus.publish.startswith(f"ipc://{home}/run/zevents/")
        # The printer link is connected to the built-in virtual printer.
        from zevents.printer.channel import CommandClient, endpoint

        client = CommandClient(endpoint(config))
        state = wait_for(lambda: client.request("STATUS", timeout=5)["state_id"] == "OPERATIONAL", 30,
                         0.2, message="the virtual printer to be operational")
        assert state
        client.close()
        # The data dir follows XDG: $HOME/.local/share/zevents.
        assert (home / ".local" / "share" / "zevents").is_dir()
        sub = bus.Subscriber(config, groups=["server"])
    finally:
        code = node.stop(signal.SIGTERM)
    assert code == 0, node.text()
    shutdown = sub.recv(10) if node else None
    sub.close()
    assert shutdown is not None and shutdown.name == "Shutdown"
    assert all(not Path(f"/proc/{pid}").exists() for pid in pids), "a child outlived the node"
    runtime = home / "run" / "zevents" / config.node
    assert not list(runtime.glob("*.sock")), "stale sockets left behind"

    second = Node(home).start()  # right after: starts cleanly
    try:
        wait_started(second)
    finally:
        assert second.stop() == 0, second.text()


def zevents_beside(node: Node, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "zevents", *args], env=node_env(node.home), capture_output=True,
                          text=True, timeout=60)


def test_a_second_node_or_a_stray_service_is_refused_and_the_first_stays_intact(home):
    node = Node(home).start()
    try:
        status = wait_started(node)
        pids = {s["name"]: s["pid"] for s in status["services"]}
        config = node.config()
        runtime = Path(node.env["XDG_RUNTIME_DIR"]) / "zevents" / config.node
        before = {path.name: path.read_bytes() for path in (runtime / "node.json", runtime / "node.yaml")}

        result = zevents_beside(node, "run")
        assert result.returncode == 1
        assert f"already running (pid {node.process.pid}" in result.stderr
        # A stray link would take over printer.sock (and remove it when it exits); stray hooks run every hook twice.
        for service in ("printer", "hooks"):
            result = zevents_beside(node, service)
            assert result.returncode == 1, (service, result.stderr)
            assert f"the {service} service of node {config.node!r} is already running (pid {pids[service]}" \
                in result.stderr, result.stderr
        assert node.process.poll() is None
        assert (runtime / "node.yaml").read_bytes() == before["node.yaml"]
        assert (runtime / "printer.sock").exists()
        # Its status still answers, from the supervisor's own file.
        shown = json.loads(zevents_beside(node, "status", "--json").stdout)
        assert shown["services"]["pid"] == node.process.pid
        assert shown["printer"]["state_id"] and not shown["printer"].get("error")
        # And a killed child is still restarted (it reads node.yaml again).
        os.kill(pids["printer"], signal.SIGKILL)
        restarted = wait_for(lambda: (s := status_of(node)) and next(
            x for x in s["services"] if x["name"] == "printer")["restarts"] == 1 and s, 60, 0.2,
            message="the printer service to restart")
        printer = next(x for x in restarted["services"] if x["name"] == "printer")
        assert printer["pid"] not in (None, pids["printer"])
        from zevents.printer.channel import CommandClient, endpoint

        client = CommandClient(endpoint(config))
        try:
            wait_for(lambda: client.request("STATUS", timeout=5)["state_id"] == "OPERATIONAL", 60, 0.2,
                     message="the restarted link to be operational")
        finally:
            client.close()
    finally:
        assert node.stop() == 0, node.text()


def test_demo_prints_the_sample_with_every_event_in_order(home):
    node = Node(home, "--demo").start()
    try:
        wait_started(node)
        config = node.config()
        # Read the whole flow from the broker's replay ring: nothing can be missed however fast the demo runs.
        wanted = ["PrintStarted", "Home", "ZChange", "LayerChanged", "PrintProgress", "PrintDone"]
        control = bus.Control(config)

        def done():
            return control.status()["streams"].get("print", 0) and _events(control, "print", "PrintDone")

        wait_for(done, 120, 0.5, message="the demo print to finish")
        seen = {}
        for group in ("print", "gcode", "hook"):
            for envelope in _events(control, group):
                seen.setdefault(envelope.name, envelope)
        for name in wanted:
            assert name in seen, f"{name} missing from the demo flow"
        order = [seen[name].ts for name in ("PrintStarted", "Home", "LayerChanged", "PrintDone")]
        assert order == sorted(order)
        assert seen["PrintDone"].payload["name"].startswith("demo_cube20")
        hook_results = _events(control, "hook")
        assert any(e.name == "HookFinished" for e in hook_results), "the demo hook did not run"
        control.close()
        assert "PrintDone" in node.text()  # shown in the terminal
    finally:
        assert node.stop() == 0


def _events(control, group, name=None):
    from zevents import wire

    meta, frames = control.request(wire.CMD_REPLAY, {"group": group, "since": 0})
    envelopes = [wire.decode(*frames[i:i + 3]) for i in range(0, len(frames), 3)]
    return [e for e in envelopes if name is None or e.name == name]


def test_a_killed_service_is_restarted_and_hooks_still_run(home, tmp_path):
    marker = tmp_path / "hook-ran"
    config_file = home / "zevents.yaml"
    config_file.write_text(json.dumps({
        "events": {"subscriptions": [{"event": "MyTest_Ping", "type": "system", "name": "touch",
                                      "command": f"touch {marker}"}]}}))
    node = Node(home, "-c", str(config_file)).start()
    try:
        status = wait_started(node)
        hooks = next(s for s in status["services"] if s["name"] == "hooks")
        config = node.config()
        sub = bus.Subscriber(config, groups=["sys", "hook"])
        os.kill(hooks["pid"], signal.SIGKILL)
        restarted = wait_for(lambda: (e := sub.recv(0.5)) is not None and e.name == "ServiceRestarted" and e, 60,
                             0, message="ServiceRestarted")
        assert restarted.payload["service"] == "hooks" and restarted.payload["restarts"] == 1
        wait_for(lambda: (e := sub.recv(0.5)) is not None and e.name == "ServiceStarted"
                 and e.payload["service"] == "hooks", 60, 0, message="the new hooks service")
        with bus.Publisher(config) as pub:
            pub.publish_confirmed("MyTest_Ping", {})
        wait_for(marker.exists, 30, message="the hook to run after the restart")
        new_status = status_of(node)
        new_hooks = next(s for s in new_status["services"] if s["name"] == "hooks")
        assert new_hooks["pid"] != hooks["pid"] and new_hooks["restarts"] == 1
        sub.close()
    finally:
        assert node.stop() == 0


def test_a_bad_config_gives_one_clear_line_and_starts_nothing(home):
    bad = home / "bad.yaml"
    bad.write_text("bus:\n  nodee: x\n")
    result = subprocess.run([sys.executable, "-m", "zevents", "run", "-c", str(bad)], env=node_env(home),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"zevents: config error: {bad}:2: bus.nodee: unknown key (did you mean 'node'?)"]
    assert not (home / "run" / "zevents").exists() or not list((home / "run" / "zevents").rglob("*.sock"))


def test_status_json_and_text_with_live_uptimes(home):
    node = Node(home).start()
    try:
        wait_started(node)

        def status():
            result = zevents_beside(node, "status", "--json")
            assert result.returncode == 0, result.stderr
            return json.loads(result.stdout)

        first = status()
        assert {s["name"] for s in first["services"]["services"]} >= {"broker", "printer", "hooks"}
        assert first["bus"]["ring"]["capacity"] == 100000
        assert first["printer"]["state_id"] in ("OPERATIONAL", "CONNECTING", "DETECT_SERIAL", "OPEN_SERIAL")
        assert isinstance(first["bus"]["events_per_s"], (int, float)) and "window" in first["bus"]
        broker = next(s for s in first["services"]["services"] if s["name"] == "broker")
        # Live: counted to the moment of asking, not frozen at the last save of node.json.
        wait_for(lambda: next(s for s in status()["services"]["services"] if s["name"] == "broker")["uptime"]
                 >= broker["uptime"] + 2, 60, 0.3, message="the broker's uptime to grow")
        text = zevents_beside(node, "status")
        assert text.returncode == 0, text.stderr
        assert "printer: None" not in text.stdout and "printer: state" in text.stdout.replace("\n", " ")
        assert "events/s" in text.stdout
    finally:
        node.stop()


def test_run_refuses_a_bad_hook_naming_the_users_file_and_line(home):
    config_file = home / "mine.yaml"
    config_file.write_text("events:\n  subscriptions:\n    - event: PrintDone\n      type: system\n"
                           "      command: 'true'\n    - event: PrintDoen\n      command: 'true'\n")
    result = subprocess.run([sys.executable, "-m", "zevents", "run", "-c", str(config_file)], env=node_env(home),
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert f"zevents: config error: {config_file}:6: " in result.stderr, result.stderr
    assert "node.yaml" not in result.stderr and "Startup" not in result.stdout + result.stderr
    runtime = home / "run" / "zevents"
    assert not runtime.exists() or not list(runtime.rglob("*.sock"))


def test_run_starts_despite_a_warning_which_names_the_users_file(home):
    config_file = home / "mine.yaml"
    config_file.write_text("events:\n  subscriptions:\n    - event: PrintDone\n      type: system\n"
                           "      command: echo {nme}\n")
    node = Node(home, "-c", str(config_file)).start()
    try:
        wait_started(node)
        assert f"zevents: config warning: {config_file}:5: events.subscriptions.0.command" in node.text()
        assert "has no payload key 'nme'" in node.text()
    finally:
        assert node.stop() == 0, node.text()


def test_the_demo_hooks_are_a_valid_events_section(tmp_path):
    from zevents import demo

    path = tmp_path / "demo.yaml"
    path.write_text(json.dumps({"events": {"subscriptions": demo.DEMO_HOOKS}}))
    assert zconfig.check(path) == []


def test_status_ignores_the_node_json_of_a_supervisor_killed_outright(home, monkeypatch):
    from zevents import node_status

    monkeypatch.setenv("XDG_RUNTIME_DIR", str(home))
    config = zconfig.load(text="bus:\n  node: gone\n")
    folder = zconfig.runtime_dir() / "gone"
    folder.mkdir(mode=0o700)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    status = {"node": "gone", "pid": int(dead), "started": 0, "config": "", "rate": None,
              "services": [{"name": "broker", "pid": 1, "alive": True, "started_at": 1.0, "uptime": 5.0,
                            "restarts": 0, "ready": True, "last_returncode": None}]}
    (folder / "node.json").write_text(json.dumps(status))
    assert node_status._supervisor_view(config) is None
    status["pid"] = os.getpid()  # a live supervisor: its services' uptimes are counted to now
    (folder / "node.json").write_text(json.dumps(status))
    assert node_status._supervisor_view(config)["services"][0]["uptime"] > 1_000_000
