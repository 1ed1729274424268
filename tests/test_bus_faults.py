"""The bus under faults: the broker killed with SIGKILL mid-stream and mid-burst, a publisher closing while the
broker is down, the journal across restarts (clean, killed, torn, power cut), numbered ingest in both twins."""
from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest
import zmq

from conftest import wait_for
from zevents import broker as broker_mod
from zevents import bus, journal, wire
from zevents.config import BusConfig

sys.path.insert(0, str(Path(__file__).parent))
import kill_harness  # noqa: E402


def _assert_nothing_silently_lost(account):
    assert account["kills"] >= 2
    assert account["silently_lost"] == 0, account
    assert account["duplicates"] == 0 and account["out_of_order"] == 0, account
    assert account["delivered"] + account["reported_lost"] >= account["published"], account


def test_broker_killed_during_a_paced_stream_loses_nothing(short_tmp):
    account = kill_harness.run(short_tmp, count=20000, rate=10000, kills=3)
    _assert_nothing_silently_lost(account)
    assert account["delivered"] == account["published"] == 20000, account


def test_broker_killed_during_a_burst_loses_nothing(short_tmp):
    account = kill_harness.run(short_tmp, count=100000, rate=0, kills=2)
    _assert_nothing_silently_lost(account)
    assert account["delivered"] == account["published"], account


def _replay_all(config, group="gcode"):
    control = bus.Control(config)
    try:
        meta, frames = control.request(wire.CMD_REPLAY, {"group": group, "since": 0})
    finally:
        control.close()
    return meta, [wire.decode(*frames[i:i + 3]) for i in range(0, len(frames), 3)]


def test_a_publisher_closing_while_the_broker_is_down_delivers_when_it_returns(short_tmp):
    config_path, config = kill_harness.write_config(short_tmp)
    broker = kill_harness.BrokerProcess(config_path, config)
    broker.start()
    broker.kill()
    publisher = bus.Publisher(config, src="test")
    try:
        for i in range(1000):
            assert publisher.publish("ZChange", {"i": i})
        restarter = threading.Thread(target=broker.start)
        restarter.start()
        assert publisher.close(linger=60) == 0
        restarter.join()
        assert publisher.dropped == 0
        meta, events = _replay_all(config)
        assert [e.payload["i"] for e in events] == list(range(1000))
    finally:
        broker.stop()


def test_a_quiet_publisher_delivers_when_the_broker_returns(short_tmp):
    """Events published while the broker is down, then nothing more (no publish, flush or close): they arrive
    once it is back."""
    config_path, config = kill_harness.write_config(short_tmp)
    broker = kill_harness.BrokerProcess(config_path, config)
    publisher = bus.Publisher(config, src="test")
    control = bus.Control(config)
    try:
        for i in range(100):
            assert publisher.publish("ZChange", {"i": i})
        broker.start()
        wait_for(lambda: control.status()["streams"].get("gcode") == 100, 60, message="the 100 quiet events")
        assert publisher.acked == 100 or wait_for(lambda: publisher.acked == 100, 10, message="the acks")
        _, events = _replay_all(config)
        assert [e.payload["i"] for e in events] == list(range(100))
    finally:
        control.close()
        publisher.close(linger=0)
        broker.stop()


def test_a_publisher_closing_with_no_broker_says_how_many_it_lost(short_tmp, caplog):
    config = BusConfig.for_dir(short_tmp, node="n")
    publisher = bus.Publisher(config, src="test")
    for i in range(1000):
        publisher.publish("ZChange", {"i": i})
    assert publisher.close(linger=0.3) == 1000
    assert publisher.dropped == 1000
    assert any("never acknowledged" in r.getMessage() for r in caplog.records)


def test_the_journal_survives_a_kill_and_the_restart_continues_the_epoch(short_tmp):
    config_path, config = kill_harness.write_config(short_tmp)
    broker = kill_harness.BrokerProcess(config_path, config)
    first = broker.start()
    try:
        with bus.Publisher(config, src="test") as publisher:
            for i in range(50):
                publisher.publish("ZChange", {"i": i})
            assert publisher.flush(30) == 0
        broker.kill()
        second = broker.start()
        assert second["epoch"] == first["epoch"] and second["run"] != first["run"]
        meta, events = _replay_all(config)
        assert [e.payload["i"] for e in events] == list(range(50))
        assert [e.seq for e in events] == list(range(1, 51)) and meta["lost"] == 0
        with bus.Publisher(config, src="test") as publisher:
            publisher.publish("ZChange", {"i": 50})
            assert publisher.flush(30) == 0
        _, events = _replay_all(config)
        assert events[-1].seq == 51 and events[-1].epoch == first["epoch"]
    finally:
        broker.stop()


def _thread_broker(config):
    return broker_mod.serve_in_thread(config)


def _stop(brk, thread):
    brk.stop()
    thread.join(5)
    brk.close()


def test_a_clean_restart_replays_and_continues(short_tmp):
    config = BusConfig.for_dir(short_tmp, node="n", heartbeat=5.0, journal=str(short_tmp / "j"), replay_ring=30)
    brk, thread = _thread_broker(config)
    epoch = brk.epoch
    with bus.Publisher(config) as publisher:
        for i in range(100):          # more than the ring: the journal rotates and still holds the ring
            publisher.publish("Home", {"i": i})
        assert publisher.flush(30) == 0
    _stop(brk, thread)
    assert len(list((short_tmp / "j").glob("journal.*"))) == 2
    brk, thread = _thread_broker(config)
    try:
        assert brk.epoch == epoch and brk.seqs["gcode"] == 100
        meta, events = _replay_all(config)
        assert [e.payload["i"] for e in events] == list(range(70, 100)) and meta["lost"] == 70
    finally:
        _stop(brk, thread)


def test_a_torn_journal_tail_is_cut_and_the_rest_kept(short_tmp, caplog):
    config = BusConfig.for_dir(short_tmp, node="n", heartbeat=5.0, journal=str(short_tmp / "j"))
    brk, thread = _thread_broker(config)
    with bus.Publisher(config) as publisher:
        for i in range(10):
            publisher.publish("Home", {"i": i})
        assert publisher.flush(30) == 0
    brk.stop()
    thread.join(5)
    brk.journal.fd, fd = None, brk.journal.fd   # as if killed: no CLOSED record
    import os
    os.write(fd, journal.event_record(b"gcode/Home", b"x" * 30, b"\x80", bytes(8), 0)[:-3])  # torn mid-write
    os.close(fd)
    brk.close()
    brk, thread = _thread_broker(config)
    try:
        assert brk.seqs["gcode"] == 10
        assert any("torn or corrupt" in r.getMessage() for r in caplog.records)
        _, events = _replay_all(config)
        assert [e.payload["i"] for e in events] == list(range(10))
    finally:
        _stop(brk, thread)


def test_after_a_power_cut_the_broker_starts_a_new_epoch(short_tmp, monkeypatch):
    config = BusConfig.for_dir(short_tmp, node="n", heartbeat=5.0, journal=str(short_tmp / "j"))
    monkeypatch.setattr(journal, "boot_id", lambda: "boot-before")
    brk, thread = _thread_broker(config)
    old_epoch = brk.epoch
    with bus.Publisher(config) as publisher:
        publisher.publish("Home", {})
        assert publisher.flush(30) == 0
    brk.stop()
    thread.join(5)
    import os
    os.close(brk.journal.fd)
    brk.journal.fd = None            # no CLOSED record: not a clean stop
    brk.close()
    monkeypatch.setattr(journal, "boot_id", lambda: "boot-after")
    brk, thread = _thread_broker(config)
    try:
        assert brk.epoch > old_epoch and brk.seqs == {}
    finally:
        _stop(brk, thread)


def test_a_second_broker_on_the_same_journal_is_refused(short_tmp):
    config = BusConfig.for_dir(short_tmp, node="n", heartbeat=5.0, journal=str(short_tmp / "j"))
    other = BusConfig.for_dir(short_tmp / "o", node="n", heartbeat=5.0, journal=str(short_tmp / "j"))
    (short_tmp / "o").mkdir()
    brk, thread = _thread_broker(config)
    try:
        with pytest.raises(broker_mod.BrokerError, match="another broker uses the journal"):
            broker_mod.Broker(other).bind()
    finally:
        _stop(brk, thread)


@pytest.mark.parametrize("compiled", [False, pytest.param(True, marks=pytest.mark.skipif(
    wire.speedups is None, reason="compiled bus speedups not built or ZEVENTS_PUREPYTHON=1"))])
def test_numbered_frames_are_taken_once_in_order(short_tmp, compiled):
    """Duplicates and frames ahead of a missing one are refused and counted; ACK says how far it got and that a
    gap was seen.  The same in both twins."""
    config = BusConfig.for_dir(short_tmp, node="n", heartbeat=5.0)
    brk = broker_mod.Broker(config, compiled=compiled)
    brk.bind()
    thread = threading.Thread(target=brk.serve, daemon=True)
    thread.start()
    ctx = zmq.Context.instance()
    push = ctx.socket(zmq.PUSH)
    push.connect(config.ingest)
    me = b"abcdefgh"
    frame = wire.ingest_frame(b"gcode/Home", wire.ingest_meta("t", None), wire.pack({}))
    control = bus.Control(config)
    try:
        for number in (5, 6, 6, 8, 7, 3, 8):
            push.send(wire.numbered_frame(me, number, frame))
        push.send(b"\x00short")
        wait_for(lambda: control.status()["counters"].get("bad_frame"), message="the torn frame counted")
        counters = control.status()["counters"]
        assert brk.seqs["gcode"] == 4     # 5, 6, 7, 8
        assert counters["ingest_duplicate"] == 2 and counters["ingest_out_of_order"] == 1
        meta, _ = control.request(wire.CMD_ACK, {"publisher": me})
        assert meta["last"] == 8 and meta["gap"] is True and meta["run"] == brk.run
        assert control.request(wire.CMD_ACK, {"publisher": me})[0]["gap"] is False
    finally:
        control.close()
        push.close(linger=0)
        _stop(brk, thread)


@pytest.mark.skipif(wire.speedups is None, reason="compiled bus speedups not built or ZEVENTS_PUREPYTHON=1")
def test_the_compiled_journal_record_is_the_python_one():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    @settings(max_examples=200, deadline=None)
    @given(st.binary(min_size=1, max_size=300), st.binary(max_size=300), st.binary(max_size=3000),
           st.binary(min_size=8, max_size=8), st.integers(0, 2 ** 64 - 1))
    def check(topic, header, payload, publisher, number):
        assert wire.speedups.event_record(topic, header, payload, publisher, number) == \
            journal.event_record(topic, header, payload, publisher, number)

    check()
