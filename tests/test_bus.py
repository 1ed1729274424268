"""The bus, end to end on real sockets: delivery of every event, ordering, loss repair, restarts, garbage."""
from __future__ import annotations

import collections
import json
import logging
import signal
import subprocess
import threading

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
import zmq

from conftest import wait_for
from zevents import broker as broker_mod
from zevents import bus, events, wire
from zevents.config import BusConfig


def sample_payload(spec) -> dict:
    values = ["Bénchy 🐰.gcode", 42, 0.2, True, None, [1, "two", 3.0], {"x": 1.5, "nested": {"t": 0}}, b"\x00\xff"]
    return {key: values[i % len(values)] for i, key in enumerate(spec.payload)}


def concrete(name: str) -> str:
    return name.replace("${ScriptName}", "AfterPrintDone")


@pytest.fixture(params=["compiled", "python"])
def running_broker(request, bus_config):
    """Here the broker runs with each ingest loop: the compiled one and its Python twin must behave alike."""
    compiled = request.param == "compiled"
    if compiled and wire.speedups is None:
        pytest.skip("the compiled bus speedups are not built (or ZEVENTS_PUREPYTHON=1)")
    brk, thread = broker_mod.serve_in_thread(bus_config, compiled=compiled)
    assert brk.compiled is compiled
    yield brk
    brk.stop()
    thread.join(5)
    brk.close()


@pytest.fixture(params=["compiled", "python"])
def subscribe(request):
    """Subscribers built each way: the compiled decode-and-track path and its Python twin must behave alike."""
    compiled = request.param == "compiled"
    if compiled and wire.speedups is None:
        pytest.skip("the compiled bus speedups are not built (or ZEVENTS_PUREPYTHON=1)")

    def make(*args, **kwargs):
        subscriber = bus.Subscriber(*args, compiled=compiled, **kwargs)
        assert subscriber.compiled is compiled
        return subscriber

    return make


def test_every_catalogue_event_round_trips_with_its_payload(running_broker, bus_config, subscribe):
    sub = subscribe(bus_config)
    pub = bus.Publisher(bus_config, src="test", printer="mk3")
    try:
        sent = {}
        for spec in events.EVENTS.values():
            name = concrete(spec.name)
            if spec.group == "sys":
                continue
            sent[name] = events.complete_payload(name, sample_payload(spec))
            pub.publish(name, sent[name])
        got = {}
        while len(got) < len(sent):
            envelope = sub.recv(timeout=5)
            assert envelope is not None, f"missing: {sorted(set(sent) - set(got))}"
            if envelope.group != "sys":
                got[envelope.name] = envelope
        for name, payload in sent.items():
            envelope = got[name]
            assert envelope.payload == payload
            assert envelope.topic == events.topic_of(name)
            assert (envelope.node, envelope.printer, envelope.src, envelope.epoch) == (
                "testnode", "mk3", "test", running_broker.epoch)
        assert sub.stats.lost == 0 and sub.stats.bad_frames == 0
    finally:
        sub.close()
        pub.close()


def test_seq_counts_per_group_from_one(running_broker, bus_config, subscribe):
    with subscribe(bus_config, groups=["gcode", "print"]) as sub, bus.Publisher(bus_config) as pub:
        for name in ["Home", "PrintStarted", "ZChange", "Home", "PrintDone", "Home"]:
            pub.publish(name)
        seqs = [(e.group, e.seq) for e in (sub.recv(5) for _ in range(6))]
    assert seqs == [("gcode", 1), ("print", 1), ("gcode", 2), ("gcode", 3), ("print", 2), ("gcode", 4)]


def test_group_subscription_and_local_event_filter(running_broker, bus_config, subscribe):
    with subscribe(bus_config, groups=["gcode"], events=["Dwelling"]) as sub, bus.Publisher(bus_config) as pub:
        pub.publish("Home")
        pub.publish("PrintStarted")
        pub.publish("Dwell")
        envelope = sub.recv(5)
        assert envelope.name == "Dwell" and envelope.seq == 2
        assert sub.recv(0.3) is None
    with pytest.raises(ValueError, match="unknown group"):
        bus.Subscriber(bus_config, groups=["gcodes"])


def test_a_stalled_subscriber_gets_all_events_in_order(short_tmp, subscribe):
    """The subscriber stalls while 20 000 events flow past tiny queues: gaps are found and repaired."""
    config = BusConfig.for_dir(short_tmp, node="n", heartbeat=0.2, hwm=500)
    brk, thread = broker_mod.serve_in_thread(config)
    sub = subscribe(config, groups=["gcode"], rcvhwm=100)
    pub = bus.Publisher(config, src="gcode")
    control = bus.Control(config)
    try:
        for i in range(20000):
            pub.publish("ZChange", {"new": i, "old": i - 1})
        # The stall: the subscriber does not read until the broker has published all of them.
        wait_for(lambda: control.status()["streams"].get("gcode") == 20000, 30, message="20 000 events published")
        received = [sub.recv(10) for _ in range(20000)]
        assert [e.payload["new"] for e in received] == list(range(20000))
        assert [e.seq for e in received] == list(range(1, 20001))
        assert sub.stats.gaps >= 1 and sub.stats.repaired > 0, "the test must actually lose and repair events"
        assert sub.stats.lost == 0 and sub.stats.unrepaired == 0
        assert sub.recv(0.5) is None  # nothing delivered twice
    finally:
        for closeable in (sub, pub, control):
            closeable.close()
        brk.stop()
        thread.join(5)
        brk.close()


def test_tail_loss_is_repaired_from_the_heartbeat(short_tmp, subscribe):
    """The last events are dropped and nothing follows them: only the heartbeat can tell."""
    config = BusConfig.for_dir(short_tmp, node="n", heartbeat=0.1, hwm=50)
    brk, thread = broker_mod.serve_in_thread(config)
    sub = subscribe(config, groups=["print"], rcvhwm=10)
    control = bus.Control(config)
    try:
        with bus.Publisher(config) as pub:
            # Heard from the broker once, a publisher sends a whole burst at once (before that, only `hwm`
            # events): the burst is what overflows the tiny queues.
            pub.publish("Home")
            assert pub.flush(10) == 0
            for i in range(500):
                pub.publish("PrintProgress", {"progress": i})
        wait_for(lambda: control.status()["streams"].get("print") == 500, 10,
                 message=f"events published ({pub.dropped} dropped)")
        print(control.status())
        got = [sub.recv(5) for _ in range(500)]
        assert [e.payload["progress"] for e in got] == list(range(500))
        assert sub.stats.repaired > 0
    finally:
        sub.close()
        control.close()
        brk.stop()
        thread.join(5)
        brk.close()


def tail_process(zevents_cmd, config_path, *args):
    return subprocess.Popen(zevents_cmd + ["tail", "gcode", "--json", "-c", str(config_path), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def write_config(path, bus_config: BusConfig):
    path.write_text(json.dumps({"bus": {"node": bus_config.node, "publish": bus_config.publish,
                                        "ingest": bus_config.ingest, "replay": bus_config.replay,
                                        "heartbeat": bus_config.heartbeat}}))
    return path


def test_a_killed_subscriber_resumes_from_its_last_seq(running_broker, bus_config, short_tmp, zevents_cmd):
    config_path = write_config(short_tmp / "c.yaml", bus_config)
    first = tail_process(zevents_cmd, config_path)
    pub = bus.Publisher(bus_config)
    try:
        # Probe until the tail shows it is live (events before its start are, rightly, not its business), then
        # publish a known batch, read part of it, and kill -9.
        live = threading.Event()
        probes = []

        def probe():
            probe_publisher = bus.Publisher(bus_config)
            while not live.is_set() and len(probes) < 500:
                probes.append(1)
                probe_publisher.publish("Home", {"probe": len(probes)})
                live.wait(0.05)
            probe_publisher.close()

        prober = threading.Thread(target=probe)
        prober.start()
        seen = [json.loads(first.stdout.readline())]
        live.set()
        prober.join()
        probe = len(probes)
        for i in range(100):
            pub.publish("ZChange", {"new": i})
        while len(seen) < 30:
            seen.append(json.loads(first.stdout.readline()))
        first.send_signal(signal.SIGKILL)
        first.wait(5)
        last = seen[-1]["seq"]
        for i in range(100, 150):
            pub.publish("ZChange", {"new": i})  # published while nobody listens
        total = probe + 150
        # --since is inclusive: resume at the first seq not seen.
        second = tail_process(zevents_cmd, config_path, "--since", str(last + 1), "--count", str(total - last),
                              "--timeout", "20")
        out, err = second.communicate(timeout=30)
        assert second.returncode == 0, err
        resumed = [json.loads(line) for line in out.splitlines()]
        assert [e["seq"] for e in resumed] == list(range(last + 1, total + 1))
        assert [e["payload"]["new"] for e in resumed if e["event"] == "ZChange"][-1] == 149
    finally:
        pub.close()
        first.kill()


def test_a_broker_restart_is_noticed_and_the_subscriber_resyncs(bus_config, subscribe):
    brk, thread = broker_mod.serve_in_thread(bus_config)
    sub = subscribe(bus_config, groups=["gcode"])
    pub = bus.Publisher(bus_config)
    try:
        pub.publish("Home", {"n": 1})
        first = sub.recv(5)
        assert first.seq == 1
        old_epoch = brk.epoch
        brk.stop()
        thread.join(5)
        brk.close()
        wait_for(lambda: sub.recv(0.05) is None and not sub.broker_alive(), 5,
                 message="the subscriber to notice the dead broker")

        brk, thread = broker_mod.serve_in_thread(bus_config)
        assert brk.epoch != old_epoch
        # Published at once, possibly before the subscriber reconnected: replay must recover them.
        for n in range(2, 12):
            pub.publish("Home", {"n": n})
        got = [sub.recv(10) for _ in range(10)]
        assert [e.payload["n"] for e in got] == list(range(2, 12))
        assert {e.epoch for e in got} == {brk.epoch}
        assert [e.seq for e in got] == list(range(1, 11))
        assert sub.stats.epoch_changes == 1
        wait_for(lambda: sub.recv(0.05) is None and sub.broker_alive(), 5, message="heartbeats from the new broker")
    finally:
        sub.close()
        pub.close()
        brk.stop()
        thread.join(5)
        brk.close()


def test_garbage_on_the_ingest_is_counted_logged_and_harmless(running_broker, bus_config, caplog):
    caplog.set_level(logging.WARNING, logger="zevents.broker")
    context = zmq.Context.instance()
    raw = context.socket(zmq.PUSH)
    raw.connect(bus_config.ingest)
    meta = wire.ingest_meta("evil", None)

    def good(n):
        return wire.ingest_frame(b"gcode/Home", meta, wire.pack({"n": n}))

    garbage = {  # message → the counter it must land in
        (b"",): "bad_frame",                                                           # empty
        (b"\x0agcode/Home",): "bad_frame",                                             # lengths beyond the frame
        (b"gcode/Home", meta, wire.pack({})): "bad_frame",                             # the published 3-frame form
        (wire.ingest_frame(b"gcode/Home", meta, b"\xc1\xc1 not msgpack"),): "bad_payload",
        (wire.ingest_frame(b"gcode/Home", meta, msgpack.packb([1, 2, 3])),): "bad_payload",
        (wire.ingest_frame(b"gcode/Home", meta, b"\x82\xa1a"),): "bad_payload",       # truncated map
        (wire.ingest_frame(b"gcode/Home", meta, wire.pack({"blob": b"x" * (10 << 20)})),): "bad_payload",  # 10 MB
        (wire.ingest_frame(b"nogroup/Home", meta, wire.pack({})),): "bad_topic",
        (wire.ingest_frame(b"\xff\xfe/x", meta, wire.pack({})),): "bad_topic",
        (wire.ingest_frame(b"gcode/Home", b"\x93\x01\x02\x03", wire.pack({})),): "bad_meta",
    }
    sub = bus.Subscriber(bus_config, groups=["gcode"])
    control = bus.Control(bus_config)
    try:
        n = 0
        expected = collections.Counter()
        for message, counter in garbage.items():
            n += 1
            raw.send(good(n))                    # a good event before each bad one
            raw.send_multipart(list(message))
            expected[counter] += len(message) if message[0] == b"gcode/Home" else 1
        raw.send(good(n + 1))
        got = [sub.recv(5) for _ in range(n + 1)]
        assert [e.payload.get("n") for e in got] == list(range(1, n + 2)), "a good neighbour was lost"
        total = sum(expected.values())
        counters = wait_for(lambda: (c := control.status()["counters"]) and c.get("bad") == total and c,
                            5, message="all garbage counted")
        for counter, count in expected.items():
            assert counters[counter] == count, counter
        assert control.ping()["epoch"] == running_broker.epoch
        assert any("dropped a bad message" in r.getMessage() for r in caplog.records)
        assert sub.recv(0.2) is None
    finally:
        raw.close(linger=0)
        sub.close()
        control.close()


def test_replay_reports_events_that_left_the_ring(short_tmp):
    config = BusConfig.for_dir(short_tmp, node="n", heartbeat=5, replay_ring=100)
    brk, thread = broker_mod.serve_in_thread(config)
    control = bus.Control(config)
    try:
        with bus.Publisher(config) as pub:
            for i in range(250):
                pub.publish("Home", {"i": i})
        wait_for(lambda: control.status()["streams"].get("gcode") == 250, 5, message="published")
        meta, frames = control.request(wire.CMD_REPLAY, {"group": "gcode", "since": 10, "epoch": brk.epoch})
        assert meta["lost"] == 140 and meta["count"] == 100 and len(frames) == 300
        first = wire.decode(*frames[:3])
        assert first.seq == 151 and first.payload == {"i": 150}
        meta, frames = control.request(wire.CMD_REPLAY, {"group": "gcode", "since": 240, "limit": 5})
        assert (meta["count"], meta["more"], meta["lost"]) == (5, True, 0)
        assert [wire.decode(*frames[i:i + 3]).seq for i in range(0, 15, 3)] == [241, 242, 243, 244, 245]
    finally:
        control.close()
        brk.stop()
        thread.join(5)
        brk.close()


def test_snapshot_has_the_last_event_per_topic(running_broker, bus_config):
    with bus.Publisher(bus_config) as pub, bus.Subscriber(bus_config, groups=["file"]) as sub:
        pub.publish("FileSelected", {"name": "a.gcode"})
        pub.publish("FileSelected", {"name": "b.gcode"})
        pub.publish("Home")
        wait_for(lambda: sub.recv(0.1) is None and running_broker.seqs.get("gcode") == 1, 5, message="published")
        snap = {e.topic: e.payload for e in sub.snapshot()}
    assert snap == {"file/FileSelected": {"name": "b.gcode"}}


def test_control_survives_malformed_requests(running_broker, bus_config):
    dealer = zmq.Context.instance().socket(zmq.DEALER)
    dealer.connect(bus_config.replay)
    try:
        for request in ([b"NOPE", wire.pack({})], [b"PING"], [b"PING", b"\xc1"], [b"PUBLISH", wire.pack({})]):
            dealer.send_multipart(request)
            assert dealer.poll(5000)
            ok, meta, _ = wire.parse_reply(dealer.recv_multipart())
            assert not ok and meta["error"]
        assert bus.Control(bus_config).ping()["node"] == "testnode"
    finally:
        dealer.close(linger=0)


def test_a_second_broker_on_the_same_endpoints_is_refused(running_broker, bus_config):
    with pytest.raises(broker_mod.BrokerError, match="already"):
        broker_mod.Broker(bus_config).bind()
    assert bus.Control(bus_config).ping()["epoch"] == running_broker.epoch


def test_publisher_drops_visibly_when_no_broker_is_there(short_tmp, caplog):
    config = BusConfig.for_dir(short_tmp, node="n", hwm=5)
    pub = bus.Publisher(config, send_timeout=0.05)
    try:
        for i in range(20):
            pub.publish("Home")
        assert pub.dropped > 0
        assert any("dropped" in r.getMessage() for r in caplog.records)
    finally:
        pub.close(linger=0)


frame_steps = st.lists(st.one_of(
    st.tuples(st.just("event"), st.sampled_from(["gcode/Home", "gcode/ZChange", "print/PrintDone", "comm/Connected"]),
              st.sampled_from([1, 1, 1, 0, 2, -1])),       # next in order (mostly), duplicate, gap, old
    st.tuples(st.just("heartbeat"), st.just(""), st.integers(0, 3)),
    st.tuples(st.just("epoch"), st.just(""), st.integers(-1, 1)),
    st.tuples(st.just("garbage"), st.just(""), st.just(0))), max_size=25)


def _run_steps(subscriber, steps):
    """Feeds scripted frames to a subscriber's accept path; returns what it delivered and the state it kept."""
    epoch, seqs, out = 100, collections.Counter(), []
    subscriber.epoch, subscriber.last_seq = epoch, {}
    for kind, topic, value in steps:
        if kind == "event":
            group = topic.split("/")[0]
            seqs[group] = max(0, seqs[group] + value)
            frames = (topic.encode(), wire.encode_header("n", None, epoch, "test", seqs[group], 7),
                      wire.pack({"i": len(out)}))
        elif kind == "heartbeat":
            streams = {group: seq + value for group, seq in seqs.items()}
            frames = (b"sys/Heartbeat", wire.encode_header("n", None, epoch, "broker", len(out) + 1, 7),
                      wire.pack({"streams": streams}))
        elif kind == "epoch":
            epoch += value
            continue
        else:
            frames = (b"gcode/Home", b"\x81\xa1v", b"\x80")
        got = subscriber._accept(*frames)
        out.append(None if got is None else (got.topic, got.epoch, got.seq, got.payload))
        while subscriber.pending:
            envelope = subscriber.pending.popleft()
            out.append(("pending", envelope.topic, envelope.seq, envelope.replayed))
    return out, subscriber.stats.as_dict(), subscriber.last_seq, subscriber.epoch


@pytest.mark.skipif(wire.speedups is None, reason="compiled bus speedups not built or ZEVENTS_PUREPYTHON=1")
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=frame_steps, names=st.sampled_from([None, ["Home", "PrintDone"]]))
def test_the_compiled_accept_tracks_events_as_the_python_one_does(short_tmp, steps, names):
    """No broker answers here, so every gap ends as an unrepaired one: both paths must count it the same."""
    config = BusConfig.for_dir(short_tmp, node="n", heartbeat=1.0)
    results = []
    for compiled in (True, False):
        with bus.Subscriber(config, groups=["gcode", "print"], events=names, control_timeout=0.01,
                            compiled=compiled) as subscriber:
            results.append(_run_steps(subscriber, steps))
    assert results[0] == results[1]


def test_the_compiled_accept_really_takes_the_in_order_events(short_tmp):
    """The compiled path must not hand every event to the Python one (which would make it pointless, and the
    differential test above vacuous): in-order events never reach Subscriber._track."""
    if wire.speedups is None:
        pytest.skip("compiled bus speedups not built or ZEVENTS_PUREPYTHON=1")
    config = BusConfig.for_dir(short_tmp, node="n", heartbeat=1.0)
    with bus.Subscriber(config, groups=["gcode"], control_timeout=0.01, compiled=True) as subscriber:
        tracked = []
        subscriber._track = lambda topic, envelope: tracked.append(envelope)
        out, stats, last_seq, _ = _run_steps(subscriber, [("event", "gcode/Home", 1)] * 5)
    assert [item[2] for item in out] == [1, 2, 3, 4, 5] and tracked == []
    assert stats["received"] == stats["delivered"] == 5 and last_seq == {"gcode": 5}
