"""The hooks service against a real broker, with real hook processes: placeholders, state from the bus, ordering and
failure of commands, timeouts that kill process groups, bursts through a bounded pool, G-code to a real command
channel, loop safety, result events."""
from __future__ import annotations

import json
import os
import shutil
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

import pytest
import yaml

from conftest import DATA, collect, wait_for
from zevents import bus, wire
from zevents import config as zconfig
from zevents.printer import channel
from zevents.hooks.service import HooksService

HOOKS = DATA / "hooks"
RECORD = str(HOOKS / "record.py")
PY = sys.executable


def read_records(path: Path) -> list:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def wait_records(path: Path, count: int, timeout: float = 30.0) -> list:
    wait_for(lambda: len(read_records(path)) >= count, timeout, message=f"{count} hook records in {path}")
    return read_records(path)



def record_sub(event, *args, record: Path, **extra) -> dict:
    command = " ".join([PY, RECORD, *args])
    sub = {"event": event, "command": command, "type": "system", "env": {"HOOK_RECORD": str(record)}}
    sub.update(extra)
    return sub


@pytest.fixture
def hooks(bus_config, running_broker, short_tmp):
    """Start HooksService instances in-process (on a thread) against the test broker."""
    started = []

    def start(subscriptions, workers=4, enabled=True, on_started=None, max_queued=10000):
        cfg = zconfig.from_bus(bus_config, events={"enabled": enabled, "subscriptions": subscriptions},
                               hooks={"workers": workers, "max_queued": max_queued},
                               printer={"commands": f"ipc://{short_tmp}/printer.sock"})
        service = HooksService(cfg, on_started=on_started)
        thread = threading.Thread(target=service.serve, daemon=True)
        thread.start()
        started.append((service, thread))
        assert service.ready.wait(10), "hooks service did not start"
        return service

    yield start
    for service, thread in started:
        service.stop()
        thread.join(10)
        service.close()


@pytest.fixture
def publisher(bus_config):
    pub = bus.Publisher(bus_config, src="test", printer="p1")
    yield pub
    pub.close(linger=0)


@pytest.fixture
def results(bus_config, running_broker):
    sub = bus.Subscriber(bus_config, groups=["hook", "settings"])
    yield sub
    sub.close()


def fake_envelope(name, payload, group=None):
    from zevents import events

    group = group or events.group_of(name)
    return wire.Envelope(f"{group}/{name}", group, name, "n", "p", 1, 1, wire.now_us(), "test", payload)


# --- placeholders and state ------------------------------------------------------------------------------------

def test_every_placeholder_is_filled_from_payload_and_bus_state(hooks, publisher, results, short_tmp, caplog):
    record = short_tmp / "record.jsonl"
    args = ["{__currentZ}", "{__eventname}", "{__filename}", "{__filepath}", "{__fileorigin}", "{__progress}",
            "{__data}", "{__now}", "{__json}", "{name}", "{path}", "{position.x}", "{position[y]}", "{{literal}}",
            "{missing}", "{user}", "{progress:.1f}"]
    service = hooks([record_sub("PrintPaused", *args, record=record)])
    # Before any state event: the documented defaults.
    publisher.publish("PrintPaused", {"name": "a.gcode", "path": "dir/a.gcode", "origin": "local"})
    first = wait_records(record, 1)[0]["argv"]
    assert first[:6] == ["-1", "PrintPaused", "NO FILE", "NO FILE", "NO FILE", "0"]
    # State from the bus: file selection, Z, progress.
    publisher.publish("FileSelected", {"name": "b.gcode", "path": "d/b.gcode", "origin": "sdcard"})
    publisher.publish("ZChange", {"new": 0.3, "old": 0.1})
    publisher.publish("PrintProgress", {"progress": 42.5})
    payload = {"name": "b.gcode", "path": "d/b.gcode", "origin": "sdcard", "position": {"x": 1.5, "y": 2},
               "progress": 12.345}
    publisher.publish("PrintPaused", payload)
    argv = wait_records(record, 2)[1]["argv"]
    values = dict(zip(args, argv))
    assert values["{__currentZ}"] == "0.3"
    assert values["{__eventname}"] == "PrintPaused"
    assert (values["{__filename}"], values["{__filepath}"], values["{__fileorigin}"]) == \
        ("b.gcode", "d/b.gcode", "sdcard")
    assert values["{__progress}"] == "12.345"  # PrintPaused carries the progress at pausing: the newest value
    completed = json.loads(values["{__json}"])
    assert completed["position"] == {"x": 1.5, "y": 2} and completed["user"] is None
    assert "'position': {'x': 1.5, 'y': 2}" in values["{__data}"]
    now = datetime.fromisoformat(values["{__now}"])
    assert now.tzinfo is not None and abs(now.timestamp() - time.time()) < 600
    assert (values["{name}"], values["{path}"]) == ("b.gcode", "d/b.gcode")
    assert (values["{position.x}"], values["{position[y]}"]) == ("1.5", "2")
    assert values["{{literal}}"] == "{literal}"
    assert values["{missing}"] == "" and values["{user}"] == ""
    assert values["{progress:.1f}"] == "12.3"
    # One warning per hook and key, not one per run.
    warnings = [r for r in caplog.records if "has no value" in r.getMessage()]
    assert len(warnings) == 1 and "{missing}" in warnings[0].getMessage()
    wait_for(lambda: service.stats["HookFinished"] == 2, 10, message="two HookFinished")


def test_state_comes_from_the_broker_snapshot_at_start_up(bus_config, running_broker, hooks, publisher,
                                                          short_tmp):
    publisher.publish_confirmed("FileSelected", {"name": "s.gcode", "path": "x/s.gcode", "origin": "local"})
    publisher.publish_confirmed("PositionUpdate", {"x": 0, "y": 0, "z": 7.25})
    record = short_tmp / "record.jsonl"
    hooks([record_sub("Home", "{__filename}", "{__filepath}", "{__currentZ}", record=record)])
    publisher.publish("Home", {})
    assert wait_records(record, 1)[0]["argv"] == ["s.gcode", "x/s.gcode", "7.25"]
    publisher.publish("FileDeselected", {})
    publisher.publish("Home", {})
    assert wait_records(record, 2)[1]["argv"][:2] == ["NO FILE", "NO FILE"]


def test_payload_reaches_the_command_as_environment_and_json_on_stdin(hooks, publisher, short_tmp):
    record = short_tmp / "record.jsonl"
    hooks([record_sub("PrintDone", "x", record=record, env={"HOOK_RECORD": str(record), "HOOK_NAME": "n={name}"})])
    publisher.publish("PrintDone", {"name": "e.gcode", "path": "p/e.gcode", "origin": "local", "time": 12.5})
    seen = wait_records(record, 1)[0]
    env = seen["env"]
    assert env["ZEVENTS_EVENT"] == "PrintDone"
    assert env["ZEVENTS_PAYLOAD_NAME"] == "e.gcode" and env["ZEVENTS_PAYLOAD_TIME"] == "12.5"
    assert env["ZEVENTS_FILENAME"] == "NO FILE" and env["ZEVENTS_CURRENTZ"] == "-1"
    assert env["HOOK_NAME"] == "n=e.gcode"
    assert json.loads(env["ZEVENTS_PAYLOAD"])["path"] == "p/e.gcode"
    assert json.loads(seen["stdin"])["time"] == 12.5


# --- lists, ordering, enabled ----------------------------------------------------------------------------------

def test_list_of_events_and_commands_run_in_order_and_stop_at_first_failure(hooks, publisher, results, short_tmp):
    record = short_tmp / "record.jsonl"
    env = {"HOOK_RECORD": str(record)}
    hooks([
        {"event": ["PrintStarted", "PrintResumed"], "type": "system", "name": "ordered", "env": env,
         "command": [f"{PY} {RECORD} first {{__eventname}}", f"{PY} {RECORD} second", f"{PY} {RECORD} third"]},
        {"event": "PrintFailed", "type": "system", "name": "stops", "env": env,
         "command": [f"{PY} {RECORD} before", "false", f"{PY} {RECORD} never"]},
    ], workers=1)
    publisher.publish("PrintStarted", {"name": "a"})
    publisher.publish("PrintFailed", {"name": "a"})
    publisher.publish("PrintResumed", {"name": "a"})
    got = collect(results, 3)
    assert [(e.name, e.payload["subscription"], e.payload["event"]) for e in got] == [
        ("HookFinished", "ordered", "PrintStarted"), ("HookFailed", "stops", "PrintFailed"),
        ("HookFinished", "ordered", "PrintResumed")]
    assert got[1].payload["argv"] == ["false"] and got[1].payload["returncode"] == 1
    assert all(e.src == "hook" for e in got)
    assert [r["argv"] for r in read_records(record)] == [
        ["first", "PrintStarted"], ["second"], ["third"], ["before"], ["first", "PrintResumed"], ["second"],
        ["third"]]


@pytest.fixture
def idle_service(bus_config):
    """A HooksService that is not serving: dispatch() queues jobs that no worker takes, to look at them."""
    made = []

    def make(subscriptions, enabled=True):
        cfg = zconfig.from_bus(bus_config, events={"enabled": enabled, "subscriptions": subscriptions})
        made.append(HooksService(cfg))
        return made[-1]

    yield make
    for service in made:
        service.close()


def queued(service) -> list:
    jobs = list(service.runs.queue)
    service.runs.queue.clear()
    return jobs


def test_enabled_false_at_both_levels_runs_nothing(idle_service, short_tmp):
    record = short_tmp / "record.jsonl"
    service = idle_service([record_sub("Home", record=record, enabled=False, name="off"),
                            record_sub("Home", record=record, name="on")])
    assert service.dispatch(fake_envelope("Home", {})) == 1
    assert [job.subscription.name for job in queued(service)] == ["on"]
    globally_off = idle_service([record_sub("Home", record=record, name="on")], enabled=False)
    assert globally_off.dispatch(fake_envelope("Home", {})) == 0
    assert globally_off.table == {}


def test_events_from_before_the_service_started_run_no_hook(idle_service, short_tmp):
    service = idle_service([record_sub("Home", record=short_tmp / "record.jsonl")])
    replayed = fake_envelope("Home", {})
    replayed.ts = service.started_us - 1
    assert service.dispatch(replayed) == 0
    assert service.dispatch(fake_envelope("Home", {})) == 1


def test_filter_and_min_interval_decide_what_runs(idle_service, short_tmp):
    record = short_tmp / "record.jsonl"
    service = idle_service([record_sub("PrintStarted", record=record, name="local", filter={"origin": "local"}),
                            record_sub("ZChange", record=record, name="rate", min_interval=3600),
                            record_sub("PrintPaused", record=record, name="nested", filter={"position.z": [1, 2]})])
    assert service.dispatch(fake_envelope("PrintStarted", {"origin": "sdcard"})) == 0
    assert service.dispatch(fake_envelope("PrintStarted", {"origin": "local"})) == 1
    assert service.dispatch(fake_envelope("ZChange", {"new": 1})) == 1
    assert service.dispatch(fake_envelope("ZChange", {"new": 2})) == 0
    assert service.stats["rate_limited"] == 1
    assert service.dispatch(fake_envelope("PrintPaused", {"position": {"z": 2}})) == 1
    assert service.dispatch(fake_envelope("PrintPaused", {"position": {"z": 3}})) == 0
    assert [job.subscription.name for job in queued(service)] == ["local", "rate", "nested"]


# --- safety ----------------------------------------------------------------------------------------------------

INJECTIONS = ["x'; touch {tmp}/pwned1; '.gcode", "$(touch {tmp}/pwned2).gcode", "`touch {tmp}/pwned3`.gcode",
              "a\"; touch {tmp}/pwned4; \".gcode", "x'; touch /tmp/pwned; '.gcode", "$(reboot).gcode"]


@pytest.mark.parametrize("mode", ["argv", "shell"])
def test_injection_file_names_are_only_file_names(mode, hooks, publisher, results, short_tmp):
    record = short_tmp / "record.jsonl"
    existed = os.path.exists("/tmp/pwned")
    tmp = short_tmp / "t"
    tmp.mkdir()
    names = [n.replace("{tmp}", str(tmp)) for n in INJECTIONS]
    if mode == "argv":
        sub = record_sub("FileAdded", "{name}", "plain-{name}", "\"quoted {name}\"", record=record)
    else:
        # Every quoting context of a shell script: bare, double quotes, single quotes, inside $( ).
        sub = {"event": "FileAdded", "type": "system", "shell": True, "env": {"HOOK_RECORD": str(record)},
               "command": f"{PY} {RECORD} {{name}} plain-{{name}} \"quoted {{name}}\" 'single {{name}}' "
                          f"\"$(echo {{name}})\" && true"}
    hooks([sub], workers=2)
    for name in names:
        publisher.publish("FileAdded", {"storage": "local", "path": name, "name": name, "type": ["gcode"]})
    got = collect(results, len(names))
    assert {e.name for e in got} == {"HookFinished"}
    recorded = {r["argv"][0]: r["argv"] for r in read_records(record)}
    assert set(recorded) == set(names)
    for name, argv in recorded.items():
        assert argv[1:3] == [f"plain-{name}", f"quoted {name}"]
        if mode == "shell":
            assert argv[3:] == [f"single {name}", name]
    assert list(tmp.iterdir()) == []
    assert os.path.exists("/tmp/pwned") == existed


def test_a_value_that_would_be_read_as_an_option_is_refused(hooks, publisher, results, short_tmp):
    """`sort {path}` with the path `-o<file>` would write <file>: refused with a HookFailed that says why, unless
    `--` ends the options first or the subscription allows it; a placeholder inside an argument is not an option."""
    record = short_tmp / "record.jsonl"
    written = short_tmp / "written"
    sort = shutil.which("sort")
    hooks([{"event": "FileAdded", "type": "system", "name": "sort", "command": f"{sort} {{path}}"},
           record_sub("FileAdded", "--", "{path}", record=record, name="dashdash"),
           record_sub("FileAdded", "{path}", record=record, name="allowed", allow_option_values=True),
           record_sub("FileAdded", "--file={path}", "x{name}", "{size}", record=record, name="inside"),
           {"event": "FileAdded", "type": "system", "name": "sort-shell", "shell": True,
            "command": f"{sort} \"{{path}}\" < /dev/null"},
           {"event": "FileAdded", "type": "system", "name": "sort-shell-ended", "shell": True,
            "command": f"{sort} -- '{{path}}' < /dev/null"}])
    path = f"-o{written}"
    publisher.publish("FileAdded", {"storage": "local", "path": path, "name": "-n", "type": ["gcode"], "size": -12})
    got = {e.payload["subscription"]: e for e in collect(results, 6)}
    refused = got["sort"]
    assert refused.name == "HookFailed"
    assert f"{{path}} fills argument 1 of {sort!r} with {path!r}, which sort would read as an option" \
        in refused.payload["stderr"]
    assert "`--`" in refused.payload["stderr"] and "allow_option_values: true" in refused.payload["stderr"]
    assert refused.payload["argv"] == [sort, path]
    shell = got["sort-shell"]
    assert shell.name == "HookFailed" and shell.payload["returncode"] is None
    assert f"{{path}} fills a whole word of the shell command with {path!r}" in shell.payload["stderr"]
    ended = got["sort-shell-ended"]  # sort ran, and found no file of that name
    assert ended.name == "HookFailed" and ended.payload["returncode"] == 2 and "No such file" in ended.payload["stderr"]
    assert {name: got[name].name for name in ("dashdash", "allowed", "inside")} == dict.fromkeys(
        ("dashdash", "allowed", "inside"), "HookFinished")
    argvs = sorted(r["argv"] for r in read_records(record))
    assert argvs == sorted([["--", path], [path], [f"--file={path}", "x-n", "-12"]])  # a number is a value
    assert not written.exists()


def process_dead(pid: int) -> bool:
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "State:\tZ" in status  # killed, waiting for its (re-)parent to reap it


LEAVE_BEHIND = HOOKS / "leave-behind.sh"


def leaving_script(directory: Path, name: str, then: str = "") -> tuple[str, Path]:
    """(the command of a hook that leaves 53 processes behind, the file their pids go to)."""
    pids = directory / f"{name}.pids"
    return f"sh {LEAVE_BEHIND} {pids} 1000 {then}", pids


def left_behind(pids_file: Path) -> list:
    pids = [int(line) for line in pids_file.read_text().split()]
    assert len(pids) == 53
    return pids


def test_what_a_hook_leaves_behind_dies_when_its_run_ends(hooks, publisher, results, short_tmp):
    command, pids_file = leaving_script(short_tmp, "leaves")
    hooks([{"event": "Home", "type": "system", "name": "leaves", "command": command}])
    publisher.publish("Home", {})
    result = collect(results, 1)[0]
    assert result.name == "HookFinished", result.payload
    pids = left_behind(pids_file)
    wait_for(lambda: all(process_dead(pid) for pid in pids), 10,
             message=f"all of the {len(pids)} processes the run left behind to be killed")


def test_a_detached_run_leaves_its_processes_running_until_its_timeout(hooks, publisher, results, short_tmp):
    command, pids_file = leaving_script(short_tmp, "daemon")
    hanging, hanging_pids = leaving_script(short_tmp, "hangs", then="hang")
    hooks([{"event": "Home", "type": "system", "name": "daemon", "detach": True, "command": command},
           {"event": "Dwell", "type": "system", "name": "hangs", "detach": True, "timeout": 0.5,
            "command": hanging}])
    publisher.publish("Home", {})
    assert collect(results, 1)[0].name == "HookFinished"
    pids = left_behind(pids_file)
    try:
        assert [pid for pid in pids if process_dead(pid)] == []
        publisher.publish("Dwell", {})  # detached too, but a timeout kills everything the run started
        assert collect(results, 1)[0].name == "HookTimedOut"
        timed_out = left_behind(hanging_pids)
        wait_for(lambda: all(process_dead(pid) for pid in timed_out), 10,
                 message="everything the timed-out run started to be killed")
        assert [pid for pid in pids if process_dead(pid)] == []  # another run's leftovers are not its
    finally:
        for pid in pids:
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass


@pytest.mark.parametrize("ignores_sigterm", [False, True])
def test_a_hook_that_hangs_is_killed_at_its_timeout_with_its_children(ignores_sigterm, hooks, publisher, results,
                                                                      short_tmp):
    pid_file = short_tmp / "child.pid"
    trap = "trap \"\" TERM; " if ignores_sigterm else ""  # ignored signals stay ignored in the children too
    hooks([{"event": "Home", "type": "system", "name": "hangs", "timeout": 0.5,
            "command": f"sh -c '{trap}sleep 1000 & echo $! > {pid_file}; wait'"}])
    publisher.publish("Home", {})
    result = collect(results, 1)[0]
    assert result.name == "HookTimedOut"
    assert result.payload["subscription"] == "hangs"
    assert result.payload["returncode"] == (-9 if ignores_sigterm else -15)
    assert 0.5 <= result.payload["duration"] < 30
    child = int(pid_file.read_text())
    wait_for(lambda: process_dead(child), 10, message=f"the hook's child {child} to be killed")


def test_stopping_the_service_kills_running_hooks(bus_config, running_broker, publisher, short_tmp):
    pid_file = short_tmp / "child.pid"
    cfg = zconfig.from_bus(bus_config, events={"subscriptions": [
        {"event": "Home", "type": "system", "name": "long", "timeout": 3600,
         "command": f"sh -c 'sleep 1000 & echo $! > {pid_file}; wait'"}]})
    service = HooksService(cfg)
    thread = threading.Thread(target=service.serve, daemon=True)
    thread.start()
    try:
        assert service.ready.wait(10)
        publisher.publish("Home", {})
        wait_for(lambda: pid_file.exists() and pid_file.read_text().strip(), 10, message="the hook to start")
    finally:
        service.stop()
        thread.join(10)
        service.close(grace=0.2)
    child = int(pid_file.read_text())
    wait_for(lambda: process_dead(child), 10, message=f"the hook's child {child} to be killed at shutdown")


def test_a_crashing_hook_does_not_stop_the_next(hooks, publisher, results, short_tmp):
    record = short_tmp / "record.jsonl"
    hooks([{"event": "Alert", "type": "system", "name": "segv", "command": "sh -c 'echo dying >&2; kill -SEGV $$'"},
           {"event": "Alert", "type": "system", "name": "missing", "command": "/nonexistent/hook --flag"},
           record_sub("Alert", "after", record=record, name="next")], workers=1)
    publisher.publish("Alert", {})
    got = {e.payload["subscription"]: e for e in collect(results, 3)}
    assert got["segv"].name == "HookFailed" and got["segv"].payload["returncode"] == -11
    assert "dying" in got["segv"].payload["stderr"]
    assert got["missing"].name == "HookFailed" and got["missing"].payload["returncode"] == 127
    assert "/nonexistent/hook" in got["missing"].payload["stderr"]
    assert got["next"].name == "HookFinished"
    assert read_records(record)[0]["argv"] == ["after"]


def test_output_is_kept_as_a_bounded_tail(hooks, publisher, results):
    hooks([{"event": "Home", "type": "system", "name": "chatty",
            "command": "sh -c 'head -c 3000000 /dev/zero | tr \"\\\\0\" x; echo; echo END; echo oops >&2'"}])
    publisher.publish("Home", {})
    result = collect(results, 1)[0]
    assert result.name == "HookFinished"
    assert result.payload["stdout"].endswith("END\n") and len(result.payload["stdout"]) <= 2010
    assert result.payload["stderr"] == "oops\n"


def test_burst_of_1000_events_with_a_slow_hook_loses_nothing_and_the_pool_limit_holds(hooks, publisher,
                                                                                      short_tmp):
    if shutil.which("flock") is None:
        pytest.skip("flock(1) is needed to count concurrent hooks")
    state = short_tmp / "conc"
    state.mkdir()
    for name, text in (("now", "0\n"), ("max", "0\n"), ("done", "")):
        (state / name).write_text(text)
    service = hooks([{"event": "ZChange", "type": "system", "name": "slow",
                      "command": f"{HOOKS / 'concurrency.sh'} {state} {{new}}"}], workers=3)
    for i in range(1000):
        publisher.publish("ZChange", {"new": i, "old": i - 1})
    done_file = state / "done"
    wait_for(lambda: len(done_file.read_text().split()) >= 1000, 300, interval=0.2,
             message="1000 slow hook runs")
    done = [int(x) for x in done_file.read_text().split()]
    assert sorted(done) == list(range(1000))
    most = int((state / "max").read_text())
    assert 2 <= most <= 3
    wait_for(lambda: service.stats["HookFinished"] == 1000, 30, message="1000 HookFinished")
    assert service.max_running <= 3


def test_a_full_queue_refuses_runs_with_a_hook_failed_each_and_runs_the_rest(hooks, publisher, results, short_tmp,
                                                                             caplog):
    gate = short_tmp / "gate"
    os.mkfifo(gate)
    record = short_tmp / "record.jsonl"
    # The first run blocks on the fifo, holding the only slot; two more wait in the queue; the rest are refused.
    service = hooks([{"event": "Home", "type": "system", "name": "gate", "command": f"cat {gate}"},
                     record_sub("ZChange", "{new}", record=record, name="queued")], workers=1, max_queued=2)
    publisher.publish("Home", {})
    wait_for(lambda: service.runs.active == 1, 10, message="the gate hook running")
    for i in range(5):
        publisher.publish("ZChange", {"new": i, "old": i - 1})
    refused = collect(results, 3, names={"HookFailed"})
    assert all("hooks.max_queued" in e.payload["stderr"] and e.payload["subscription"] == "queued"
               for e in refused)
    assert service.stats["refused"] == 3
    with open(gate, "w") as opened:  # lets `cat` finish: the queued runs go on
        opened.write("open\n")
    finished = collect(results, 3, names={"HookFinished"})
    assert [e.payload["subscription"] for e in finished] == ["gate", "queued", "queued"]
    assert [r["argv"] for r in read_records(record)] == [["0"], ["1"]]
    assert sum("hooks.max_queued" in r.message for r in caplog.records) == 1  # logged once, counted always


# --- gcode -----------------------------------------------------------------------------------------------------

def test_gcode_hooks_go_to_the_command_channel_in_order(hooks, publisher, results, short_tmp):
    server = channel.CommandServer(f"ipc://{short_tmp}/printer.sock")
    try:
        hooks([{"event": "Connected", "type": "gcode", "name": "greet",
                "command": ["M115", "M117 on {port}\nM117 at {__currentZ}", "G28"]}])
        publisher.publish("Connected", {"port": "/dev/ttyUSB0\nM112", "baudrate": 115200})
        request = wait_for(server.receive, 10, message="a GCODE request on the command channel")
        reply_to, command, args = request
        assert command == "GCODE"
        assert args["lines"] == ["M115", "M117 on /dev/ttyUSB0 M112", "M117 at -1", "G28"]
        assert args["src"] == "hook"
        server.reply(reply_to, args, accepted=4, suppressed=0)
        result = collect(results, 1)[0]
        assert result.name == "HookFinished" and result.payload["argv"] == args["lines"]
    finally:
        server.close()


def test_gcode_hook_fails_clearly_when_the_link_is_not_running(hooks, publisher, results):
    hooks([{"event": "Connected", "type": "gcode", "name": "greet", "command": "M115"}])
    publisher.publish("Connected", {"port": "x", "baudrate": 1})
    result = collect(results, 1)[0]
    assert result.name == "HookFailed"
    assert "printer link is not running" in result.payload["stderr"]


def test_a_reload_that_subscribes_to_hook_results_starts_receiving_them(bus_config, running_broker, publisher,
                                                                        results, short_tmp):
    """Without hooks on hook results the service does not even receive its own results; a reload that adds one
    switches subscribers without losing or repeating an event."""
    record = short_tmp / "record.jsonl"
    path = short_tmp / "config.yaml"

    def write(subscriptions):
        path.write_text(yaml.safe_dump({
            "bus": {"node": bus_config.node, "publish": bus_config.publish, "ingest": bus_config.ingest,
                    "replay": bus_config.replay, "heartbeat": bus_config.heartbeat},
            "events": {"subscriptions": subscriptions}}))

    first = record_sub("Home", "home", record=record, name="first")
    write([first])
    service = HooksService(zconfig.load(path))
    thread = threading.Thread(target=service.serve, daemon=True)
    thread.start()
    try:
        assert service.ready.wait(10)
        assert "hook" not in service.subscriber.groups
        publisher.publish("Home", {})
        collect(results, 1, names={"HookFinished"})
        write([first, record_sub("HookFinished", "{subscription}", record=record, name="second",
                                 filter={"subscription": "first"})])
        service.request_reload("test")
        assert collect(results, 1, names={"SettingsUpdated"})[0].payload["subscriptions"] == 2
        wait_for(lambda: service.subscriber.groups is None, 10, message="the switch to every group")
        publisher.publish("Home", {})
        publisher.publish("Home", {})
        got = collect(results, 4, names={"HookFinished"})
        assert sorted(e.payload["subscription"] for e in got) == ["first", "first", "second", "second"]
        assert sorted(r["argv"][0] for r in read_records(record)) == ["first", "first", "home", "home", "home"]
    finally:
        service.stop()
        thread.join(10)
        service.close()


# --- results and loops -----------------------------------------------------------------------------------------

def test_hooks_on_hook_results_cannot_loop(hooks, publisher, results):
    service = hooks([{"event": "Home", "type": "system", "name": "T", "command": "true"},
                     {"event": "HookFinished", "type": "system", "name": "X", "command": "true"},
                     {"event": "HookFinished", "type": "system", "name": "Y", "command": "true"}])
    publisher.publish("Home", {})
    # T (depth 1) → X, Y (depth 2) → Y on X's, X on Y's (depth 3) → the chain ends there.
    got = collect(results, 5, names={"HookFinished"})
    assert sorted((e.payload["subscription"], e.payload["depth"]) for e in got) == [
        ("T", 1), ("X", 2), ("X", 3), ("Y", 2), ("Y", 3)]
    wait_for(lambda: service.stats["loop_depth"] == 2 and service.stats["loop_self"] == 4, 10,
             message="the loop guards to refuse the remaining runs")
    assert service.stats["HookFinished"] == 5
    assert set(got[0].payload) >= {"subscription", "event", "argv", "returncode", "duration", "stderr"}


def _is_subreaper() -> bool:
    import ctypes

    flag = ctypes.c_int()
    ctypes.CDLL(None).prctl(37, ctypes.byref(flag))  # PR_GET_CHILD_SUBREAPER
    return bool(flag.value)


def test_an_embedding_process_is_a_subreaper_only_while_a_service_lives(bus_config):
    """Embedded (as here, in pytest), the service must not leave its host adopting orphans it never reaps."""
    assert not _is_subreaper()
    first = HooksService(zconfig.from_bus(bus_config))
    second = HooksService(zconfig.from_bus(bus_config))
    assert _is_subreaper()
    first.close()
    assert _is_subreaper()  # the second still runs hooks
    second.close()
    second.close()  # closing twice releases once
    assert not _is_subreaper()
