"""`zevents hooks` as users run it: a real process against a real broker with the seed's example config, reloads on
SIGHUP and on file changes, `zevents hooks test` and `zevents config check`."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import DATA, collect, wait_for
from zevents import bus
from zevents.printer import channel

HOOKS = DATA / "hooks"
RECORD = HOOKS / "record.py"
SEED = HOOKS / "seed-example.yaml"


def bus_yaml(bus_config, short_tmp) -> str:
    return yaml.safe_dump({
        "bus": {"node": bus_config.node, "publish": bus_config.publish, "ingest": bus_config.ingest,
                "replay": bus_config.replay, "heartbeat": bus_config.heartbeat},
        "printer": {"commands": f"ipc://{short_tmp}/printer.sock"},
    })


def records(path: Path) -> list:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]



@pytest.fixture
def hooks_process(zevents_cmd, short_tmp):
    """Start `zevents hooks -c FILE` as a real process; stops it (SIGTERM, then kill) afterwards."""
    started = []

    def start(config_path: Path, env=None):
        log = open(short_tmp / f"hooks-{len(started)}.log", "w+")
        proc = subprocess.Popen([*zevents_cmd, "hooks", "-c", str(config_path)], stdout=log, stderr=log,
                                env={**os.environ, **(env or {})})
        started.append((proc, log))
        wait_for(lambda: "hooks service ready" in Path(log.name).read_text() or proc.poll() is not None, 30,
                 message="the hooks service to subscribe")
        assert proc.poll() is None, Path(log.name).read_text()
        return proc, Path(log.name)

    yield start
    for proc, log in started:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def test_seed_example_loads_unchanged_and_does_what_it_says(bus_config, running_broker, hooks_process, short_tmp):
    """The doc's example verbatim: `python ~/growl.py ...` with HOME pointing at a recording growl.py."""
    home = short_tmp / "home"
    home.mkdir()
    (home / "growl.py").write_text(RECORD.read_text())
    bin_dir = short_tmp / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    record = short_tmp / "growl.jsonl"
    config = short_tmp / "config.yaml"
    config.write_text(bus_yaml(bus_config, short_tmp) + SEED.read_text())
    server = channel.CommandServer(f"ipc://{short_tmp}/printer.sock")
    results = bus.Subscriber(bus_config, groups=["hook"])
    publisher = bus.Publisher(bus_config, src="test")
    try:
        hooks_process(config, env={"HOME": str(home), "PATH": f"{bin_dir}:{os.environ['PATH']}",
                                   "HOOK_RECORD": str(record)})
        job = {"name": "benchy.gcode", "path": "parts/benchy.gcode", "origin": "local"}
        publisher.publish_confirmed("Disconnected", {})
        publisher.publish_confirmed("PrintStarted", job)
        publisher.publish_confirmed("PrintDone", dict(job, time=3.5))
        publisher.publish_confirmed("PrintCancelled", job)
        publisher.publish_confirmed("Connected", {"port": "/dev/ttyACM0", "baudrate": 115200})
        request = wait_for(server.receive, 20, message="the Connected G-code on the command channel")
        reply_to, command, args = request
        assert command == "GCODE" and args["lines"] == ["M115", "M117 printer connected!", "G28"]
        server.reply(reply_to, args, accepted=3, suppressed=0)
        got = collect(results, 6)
        assert all(e.name == "HookFinished" for e in got)
        assert sorted((e.payload["subscription"], e.payload["event"]) for e in got) == [
            ("Connected", "Connected"), ("Multiple Events", "PrintCancelled"), ("Multiple Events", "PrintDone"),
            ("Multiple Events", "PrintStarted"), ("Print Done", "PrintDone"), ("Print Started", "PrintStarted")]
        runs = sorted(r["argv"][3] for r in records(record))
        assert runs == ["Completed parts/benchy.gcode", "Event PrintCancelled (benchy.gcode)",
                        "Event PrintDone (benchy.gcode)", "Event PrintStarted (benchy.gcode)",
                        "Starting parts/benchy.gcode"]
        assert all(r["argv"][:3] == ["-t", "mygrowlserver", "-d"] and r["argv"][4:] == [
            "-a", "OctoPrint", "-i", "http://raspi/Octoprint_logo.png"] for r in records(record))
        assert "Lost connection to printer" not in json.dumps(records(record))  # enabled: false
    finally:
        publisher.close(linger=0)
        results.close()
        server.close()


def test_config_reloads_on_file_change_and_sighup_and_keeps_running_on_a_bad_file(
        bus_config, running_broker, hooks_process, short_tmp):
    record = short_tmp / "record.jsonl"
    config = short_tmp / "config.yaml"

    def write(subscriptions):
        config.write_text(bus_yaml(bus_config, short_tmp) + yaml.safe_dump({"events": {"subscriptions": subscriptions}}))

    def sub(event, tag):
        return {"event": event, "type": "system", "name": tag, "command": f"{sys.executable} {RECORD} {tag}",
                "env": {"HOOK_RECORD": str(record)}}

    write([sub("Home", "first")])
    events = bus.Subscriber(bus_config, groups=["hook", "settings"])
    publisher = bus.Publisher(bus_config, src="test")
    try:
        proc, log = hooks_process(config)
        publisher.publish_confirmed("Home", {})
        collect(events, 1, names={"HookFinished"})
        # A new subscription takes effect at once, announced by SettingsUpdated.
        write([sub("Home", "first"), sub("Alert", "second")])
        updated = collect(events, 1, names={"SettingsUpdated"})[0]
        assert updated.payload["service"] == "hooks" and updated.payload["subscriptions"] == 2
        publisher.publish_confirmed("Alert", {})
        collect(events, 1, names={"HookFinished"})
        # An invalid file: logged, the running config stays.
        config.write_text(config.read_text() + "events: [unclosed\n")
        wait_for(lambda: "previous configuration stays in force" in log.read_text(), 20,
                 message="the refused reload to be logged")
        publisher.publish_confirmed("Alert", {})
        collect(events, 1, names={"HookFinished"})
        assert [r["argv"] for r in records(record)] == [["first"], ["second"], ["second"]]
        # SIGHUP reloads the (fixed) file.
        write([sub("Home", "third")])
        collect(events, 1, names={"SettingsUpdated"})
        proc.send_signal(signal.SIGHUP)
        reloaded = collect(events, 1, names={"SettingsUpdated"})[0]
        assert reloaded.payload["reason"] == "SIGHUP"
        publisher.publish_confirmed("Home", {})
        collect(events, 1, names={"HookFinished"})
        assert records(record)[-1]["argv"] == ["third"]
    finally:
        publisher.close(linger=0)
        events.close()


def test_a_bad_subscription_does_not_stop_the_others(bus_config, running_broker, hooks_process, short_tmp,
                                                     zevents_cmd):
    record = short_tmp / "record.jsonl"
    config = short_tmp / "config.yaml"
    config.write_text(bus_yaml(bus_config, short_tmp) + (HOOKS / "bad-subscriptions.yaml").read_text().replace(
        "echo ok {name}", f"{sys.executable} {RECORD} ok {{name}}").replace(
        "name: good one", f"name: good one\n      env: {{HOOK_RECORD: {record}}}"))
    check = subprocess.run([*zevents_cmd, "config", "check", str(config)], capture_output=True, text=True)
    assert check.returncode == 1
    events = bus.Subscriber(bus_config, groups=["hook"])
    publisher = bus.Publisher(bus_config, src="test")
    try:
        proc, log = hooks_process(config)
        publisher.publish_confirmed("PrintDone", {"name": "fine.gcode"})
        got = collect(events, 1)
        assert got[0].payload["subscription"] == "good one" and got[0].name == "HookFinished"
        assert records(record)[0]["argv"] == ["ok", "fine.gcode"]
        assert "unknown event 'PrintDon'" in log.read_text()
    finally:
        publisher.close(linger=0)
        events.close()


def test_config_check_names_file_line_and_key_of_every_problem(zevents_cmd):
    path = HOOKS / "bad-subscriptions.yaml"
    proc = subprocess.run([*zevents_cmd, "config", "check", str(path)], capture_output=True, text=True)
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    expected = [
        (4, "events.subscriptions.0.event", "did you mean 'PrintDone'?"),
        (8, "events.subscriptions.1", "missing `type`"),
        (12, "events.subscriptions.2.command", "must be a string or a list of strings, not 42"),
        (16, "events.subscriptions.3.command", "bad placeholder syntax"),
        (20, "events.subscriptions.4.command", "did you mean {name}?"),
        (24, "events.subscriptions.5.command", "add `shell: true`"),
        (30, "events.subscriptions.6.timout", "did you mean 'timeout'?"),
    ]
    assert len(lines) == len(expected), proc.stderr
    for line, (number, key, text) in zip(lines, expected):
        assert line.startswith(f"{path}:{number}: {key}: "), line
        assert text in line
    # `Dwelling` (OctoPrint's spelling) and plugin events are accepted names: no line mentions them.
    assert "Dwelling" not in proc.stderr and "plugin_mything_Hom" not in proc.stderr


def test_config_check_accepts_the_seed_example(zevents_cmd):
    proc = subprocess.run([*zevents_cmd, "config", "check", str(SEED)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().endswith("OK")


def test_hooks_test_shows_the_exact_argv_without_running(zevents_cmd, short_tmp):
    marker = short_tmp / "ran"
    config = short_tmp / "config.yaml"
    config.write_text(yaml.safe_dump({"bus": {"replay": f"ipc://{short_tmp}/nobroker.sock"}, "events": {
        "subscriptions": [
            {"event": "PrintDone", "type": "system", "name": "touch", "command": f"touch {marker} {{name}}"},
            {"event": "PrintDone", "type": "system", "name": "off", "command": "true", "enabled": False},
            {"event": "PrintDone", "type": "system", "name": "sd", "command": "true", "filter": {"origin": "sdcard"}},
        ]}}))
    name = "$(reboot) x.gcode"
    proc = subprocess.run([*zevents_cmd, "hooks", "test", "PrintDone", "--payload", json.dumps({"name": name}),
                           "-c", str(config)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert f"argv: {json.dumps(['touch', str(marker), name])}" in proc.stdout
    assert "'off' [system]: disabled" in proc.stdout
    assert "'sd' [system]: filtered out" in proc.stdout
    assert not marker.exists()
    second = short_tmp / "second"
    ran = subprocess.run([*zevents_cmd, "hooks", "test", "PrintDone", "--payload", json.dumps({"name": str(second)}),
                          "--run", "-c", str(config)], capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    assert "-> HookFinished: returncode 0" in ran.stdout
    assert marker.exists() and second.exists()
    none = subprocess.run([*zevents_cmd, "hooks", "test", "Home", "-c", str(config)], capture_output=True,
                          text=True, timeout=60)
    assert none.returncode == 1 and "no subscription runs on Home" in none.stdout
    typo = subprocess.run([*zevents_cmd, "hooks", "test", "PrintDon", "-c", str(config)], capture_output=True,
                          text=True, timeout=60)
    assert typo.returncode == 2 and "did you mean 'PrintDone'?" in typo.stderr
    option = subprocess.run([*zevents_cmd, "hooks", "test", "PrintDone", "--payload", json.dumps({"name": "-rf"}),
                             "-c", str(config)], capture_output=True, text=True, timeout=60)
    assert option.returncode == 1
    assert "'touch' [system]: refused: not run: {name} fills argument 2 of 'touch' with '-rf'" in option.stdout


def gone(pid: int) -> bool:
    """Dead and reaped: a zombie still has its /proc entry."""
    return not os.path.exists(f"/proc/{pid}")


def pids_in(path: Path, count: int = 53) -> list:
    wait_for(lambda: path.exists() and len(path.read_text().split()) >= count, 30, message=f"{count} pids in {path}")
    return [int(pid) for pid in path.read_text().split()]


def test_the_service_kills_and_reaps_what_hooks_leave_behind(bus_config, running_broker, hooks_process, short_tmp):
    """The real service process is the subreaper: a run's leftovers (setsid ones too) are killed and reaped when it
    ends; a detached run's leftovers live on, and are reaped by the service when they end."""
    leave = HOOKS / "leave-behind.sh"
    killed, detached = short_tmp / "killed.pids", short_tmp / "detached.pids"
    config = short_tmp / "config.yaml"
    config.write_text(bus_yaml(bus_config, short_tmp) + yaml.safe_dump({"events": {"subscriptions": [
        {"event": "Home", "type": "system", "name": "leaves", "command": f"sh {leave} {killed}"},
        {"event": "Dwell", "type": "system", "name": "daemon", "detach": True,
         "command": f"sh {leave} {detached}"}]}}))
    results = bus.Subscriber(bus_config, groups=["hook"])
    publisher = bus.Publisher(bus_config, src="test")
    try:
        proc, log = hooks_process(config)
        publisher.publish("Home", {})
        assert collect(results, 1)[0].name == "HookFinished"
        pids = pids_in(killed)
        wait_for(lambda: all(gone(pid) for pid in pids), 30, message="the leftovers killed and reaped")
        publisher.publish("Dwell", {})
        assert collect(results, 1)[0].name == "HookFinished"
        daemons = pids_in(detached)
        assert not any(gone(pid) for pid in daemons)  # they outlive the run; when they end, the service reaps them
        for pid in daemons:
            os.kill(pid, signal.SIGKILL)
        wait_for(lambda: all(gone(pid) for pid in daemons), 30, message="the detached processes reaped")
        children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
        assert children == [], children
    finally:
        results.close()
        publisher.close(linger=0)
