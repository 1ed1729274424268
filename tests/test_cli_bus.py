"""`zevents fire`, `tail`, `broker` as a user runs them: real processes, exit codes, one clear line on errors."""
from __future__ import annotations

import json
import subprocess
import threading

import pytest

from conftest import wait_for
from zevents import bus


@pytest.fixture
def config_file(short_tmp, bus_config):
    path = short_tmp / "zevents.yaml"
    path.write_text(json.dumps({"bus": {"node": bus_config.node, "publish": bus_config.publish,
                                        "ingest": bus_config.ingest, "replay": bus_config.replay,
                                        "heartbeat": bus_config.heartbeat}}))
    return path


def zevents(zevents_cmd, *args, timeout=60):
    return subprocess.run(zevents_cmd + list(args), capture_output=True, text=True, timeout=timeout)


def test_fire_returns_once_the_broker_has_the_event(running_broker, bus_config, config_file, zevents_cmd):
    with bus.Subscriber(bus_config, groups=["print"]) as sub:
        result = zevents(zevents_cmd, "fire", "PrintDone", "--payload", '{"name": "a.gcode", "time": 12.5}',
                         "-c", str(config_file))
        assert result.returncode == 0, result.stderr
        assert "print/PrintDone seq 1" in result.stderr
        envelope = sub.recv(5)
    assert envelope.payload == {"name": "a.gcode", "path": None, "origin": None, "size": None, "owner": None,
                                "time": 12.5}
    assert envelope.src == "user"


def test_fire_a_custom_event_and_an_alias(running_broker, bus_config, config_file, zevents_cmd):
    assert zevents(zevents_cmd, "fire", "MyPlugin_Thing", "-c", str(config_file)).returncode == 0
    assert zevents(zevents_cmd, "fire", "Dwelling", "-c", str(config_file)).returncode == 0
    assert running_broker.seqs["custom"] == 1 and running_broker.seqs["gcode"] == 1
    assert {b"custom/MyPlugin_Thing", b"gcode/Dwell"} <= set(running_broker.last_values)


@pytest.mark.parametrize("args,message", [
    (["PrintDone", "--payload", "{not json"], "--payload is not valid JSON"),
    (["PrintDone", "--payload", "[1, 2]"], "--payload must be a JSON object"),
    (["print/PrintDone"], "is not an event name"),
])
def test_fire_refuses_bad_input_with_one_line(config_file, zevents_cmd, args, message):
    result = zevents(zevents_cmd, "fire", *args, "-c", str(config_file))
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and message in result.stderr


def test_fire_without_a_broker_says_so(config_file, zevents_cmd):
    result = zevents(zevents_cmd, "fire", "Home", "--timeout", "1", "-c", str(config_file))
    assert result.returncode == 1
    assert result.stderr.strip().startswith("zevents: no answer from the broker at ipc://")
    assert "is it running?" in result.stderr and result.stderr.strip().count("\n") == 0


def test_unknown_config_key_is_one_clear_line(short_tmp, zevents_cmd):
    bad = short_tmp / "bad.yaml"
    bad.write_text("bus:\n  node: x\n  publsh: ipc:///tmp/x\n")
    for command in (["fire", "Home"], ["tail"], ["broker"]):
        result = zevents(zevents_cmd, *command, "-c", str(bad))
        assert result.returncode == 2, command
        assert result.stderr.strip() == f"zevents: config error: {bad}:3: bus.publsh: unknown key (did you mean " \
                                        "'publish'?)"


def test_tail_json_count_and_prefix_filter(running_broker, bus_config, config_file, zevents_cmd):
    tail = subprocess.Popen(zevents_cmd + ["tail", "gcode/ZChange", "print", "--json", "--count", "3",
                                           "--timeout", "30", "-c", str(config_file)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stop = threading.Event()

    def publish():
        # The tail only sees what is published after it started: keep publishing until it has what it needs.
        with bus.Publisher(bus_config, src="test") as pub:
            n = 0
            while not stop.is_set() and n < 2000:
                n += 1
                pub.publish("Home", {"n": n})          # same group, other event: filtered out
                pub.publish("ZChange", {"new": n})
                pub.publish("PrintProgress", {"progress": n})
                stop.wait(0.05)

    publisher = threading.Thread(target=publish)
    publisher.start()
    try:
        out, err = tail.communicate(timeout=60)
    finally:
        stop.set()
        publisher.join()
    assert tail.returncode == 0, err
    rows = [json.loads(line) for line in out.splitlines()]
    assert len(rows) == 3
    assert {row["event"] for row in rows} <= {"ZChange", "PrintProgress"}
    for row in rows:
        assert set(row) == {"topic", "event", "group", "node", "printer", "seq", "epoch", "ts", "src", "payload"}
        assert row["node"] == "testnode" and row["src"] == "test"


def test_tail_times_out_non_zero(running_broker, config_file, zevents_cmd):
    result = zevents(zevents_cmd, "tail", "slicing", "--count", "1", "--timeout", "1", "-c", str(config_file))
    assert result.returncode == 1
    assert "timed out after 1 s with 0 of 1 events" in result.stderr


def test_tail_without_a_broker_and_with_a_bad_group(config_file, zevents_cmd):
    result = zevents(zevents_cmd, "tail", "--timeout", "1", "-c", str(config_file))
    assert result.returncode == 1 and "no answer from the broker" in result.stderr
    result = zevents(zevents_cmd, "tail", "gcodes", "-c", str(config_file))
    assert result.returncode == 2 and "unknown group or event 'gcodes' (did you mean 'gcode'?)" in result.stderr


def test_broker_process_serves_and_stops_on_sigterm(config_file, bus_config, zevents_cmd):
    broker = subprocess.Popen(zevents_cmd + ["broker", "-c", str(config_file)], stderr=subprocess.PIPE, text=True)
    control = bus.Control(bus_config)
    try:
        def answers():
            try:
                return control.ping(timeout=0.5)
            except bus.BusError:
                assert broker.poll() is None, broker.stderr.read()
                return None

        assert wait_for(answers, 20, 0, message="the broker")["node"] == "testnode"
        # Its startup heap is out of the collector's reach: full collections walk only what it allocates later.
        assert control.status()["gc"]["frozen"] > 10_000
        second = zevents(zevents_cmd, "broker", "-c", str(config_file))
        assert second.returncode == 1 and "already" in second.stderr
    finally:
        control.close()
        broker.terminate()
        assert broker.wait(10) == 0


def _tail_rows(zevents_cmd, config_file, *args):
    result = zevents(zevents_cmd, "tail", "--json", "--timeout", "30", "-c", str(config_file), *args)
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_tail_since_is_inclusive_per_group_and_hides_heartbeats(running_broker, bus_config, config_file,
                                                                 zevents_cmd):
    with bus.Publisher(bus_config, src="test") as pub:
        for n in range(1, 6):
            pub.publish_confirmed("PrintProgress", {"progress": n})     # print 1..5
        for n in range(1, 4):
            pub.publish_confirmed("ZChange", {"new": n})               # gcode 1..3
    wait_for(lambda: running_broker.seqs.get("sys", 0) >= 2, 30, message="two heartbeats in the ring")
    rows = _tail_rows(zevents_cmd, config_file, "--since", "print:4", "--since", "gcode:2", "--count", "4")
    assert [(r["group"], r["seq"]) for r in rows] == [("print", 4), ("print", 5), ("gcode", 2), ("gcode", 3)]
    # One number for every group, from that seq on; the heartbeats in the sys replay stay hidden.
    rows = _tail_rows(zevents_cmd, config_file, "--since", "3", "--count", "4")
    assert sorted((r["group"], r["seq"]) for r in rows) == [("gcode", 3), ("print", 3), ("print", 4), ("print", 5)]
    assert not any(r["topic"] == "sys/Heartbeat" for r in rows)
    rows = _tail_rows(zevents_cmd, config_file, "sys", "--heartbeats", "--count", "1")
    assert rows[0]["topic"] == "sys/Heartbeat"
    # Event names as well as groups and topics.
    rows = _tail_rows(zevents_cmd, config_file, "ZChange", "--since", "gcode:1", "--count", "3")
    assert [r["payload"]["new"] for r in rows] == [1, 2, 3]


@pytest.mark.parametrize("args,message", [
    (["printdone"], "unknown group or event 'printdone' (did you mean 'PrintDone'?)"),
    (["--since", "print:x"], "--since 'print:x': give SEQ or GROUP:SEQ"),
    (["gcode", "--since", "print:3"], "'print' is not among the tailed groups"),
])
def test_tail_refuses_bad_selections(config_file, zevents_cmd, args, message):
    result = zevents(zevents_cmd, "tail", *args, "-c", str(config_file))
    assert result.returncode == 2 and message in result.stderr, result.stderr


@pytest.mark.parametrize("name,near", [("printdone", "PrintDone"), ("PrintDon", "PrintDone"),
                                       ("PirntDone", "PrintDone"), ("ZChanges", "ZChange")])
def test_fire_refuses_a_slip_of_a_catalogue_name(config_file, zevents_cmd, name, near):
    result = zevents(zevents_cmd, "fire", name, "-c", str(config_file))
    assert result.returncode == 2
    assert f"unknown event {name!r} (did you mean {near!r}?)" in result.stderr


def test_fire_custom_forces_a_custom_name(running_broker, config_file, zevents_cmd):
    result = zevents(zevents_cmd, "fire", "printdone", "--custom", "-c", str(config_file))
    assert result.returncode == 0, result.stderr
    assert "custom/printdone seq 1" in result.stderr
    result = zevents(zevents_cmd, "fire", "PrintDone", "--custom", "-c", str(config_file))
    assert result.returncode == 2 and "is a catalogue event" in result.stderr
