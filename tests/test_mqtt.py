"""The MQTT bridge against a real Mosquitto (started by each test on a free loopback port) and a real bus broker,
with whole virtual prints through the printer service: OctoPrint-MQTT's topics, retained state for late
subscribers, Home Assistant discovery, no loss across a Mosquitto restart and a bridge kill -9, commands, the farm
view."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from zevents import bus, config as zconfig
from zevents.printer import channel

from conftest import wait_for
from mqtt_broker import Mosquitto, Recorder, Relay
from ha_discovery_schema import DiscoveryError, check_discovery

CUBE = Path(__file__).parent / "data" / "printer" / "sliced_cube20_prusaslicer250_mk3s_cut.gcode"
ZEVENTS = [sys.executable, "-m", "zevents"]
NODE = "testnode"
PRINTER = "printer"


@pytest.fixture
def mosquitto(short_tmp):
    broker = Mosquitto(short_tmp / "mq").start()
    yield broker
    broker.stop()


def node_config(directory: Path, bus_config, mqtt_url: str, speed: float = 0, **mqtt) -> zconfig.Config:
    section = {"enabled": True, "url": mqtt_url, **mqtt}
    return zconfig.from_bus(bus_config, mqtt=section, data_dir=str(directory / "data"), printer={
        "commands": f"ipc://{directory}/printer.sock", "timeout": 3.0,
        "virtual": {"firmware": "marlin", "speed": speed, "tools": 1}})


def write_config(config: zconfig.Config, path: Path) -> Path:
    path.write_text(yaml.safe_dump(config.data))
    return path


class Running:
    """A service object (start/serve/stop/close) serving on a thread of this process."""

    def __init__(self, service):
        self.service = service
        service.start()
        self.thread = threading.Thread(target=service.serve, daemon=True)
        self.thread.start()

    def close(self):
        self.service.stop()
        self.thread.join(30)
        self.service.close()


@pytest.fixture
def services():
    started = []

    def start(service):
        running = Running(service)
        started.append(running)
        return running.service

    yield start
    for running in reversed(started):
        running.close()


def start_printer(services, config, subscriber):
    from zevents.printer.service import PrinterService

    service = services(PrinterService(config, virtual=True))
    wait_for_event(subscriber, lambda e: e.name == "Connected")
    return service


def start_bridge(services, config, recorder=None):
    from zevents.bridges.mqtt import MqttBridge

    bridge = services(MqttBridge(config))
    wait_for(lambda: bridge.connected, 30, message="the bridge's MQTT connection")
    return bridge


def wait_for_event(subscriber, predicate, timeout: float = 60.0, seen: list | None = None):
    deadline = time.monotonic() + timeout
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            pytest.fail(f"no matching bus event within {timeout} s")
        envelope = subscriber.recv(remaining)
        if envelope is None:
            continue
        if seen is not None:
            seen.append(envelope)
        if predicate(envelope):
            return envelope


def request(config, command, args=None):
    client = channel.CommandClient(channel.endpoint(config))
    try:
        return client.request(command, args or {}, timeout=30)
    finally:
        client.close()


def decoded(messages, prefix: str) -> list:
    """(topic, JSON body) of the messages under prefix (the node's plain-text status left out)."""
    return [(topic, json.loads(payload)) for topic, payload, _ in messages
            if topic.startswith(prefix) and payload and not topic.endswith("/status")]


def zevents_events(messages) -> list:
    """The zevents-layout event messages as (group, seq, event) in arrival order (telemetry left out)."""
    out = []
    for topic, body in decoded(messages, f"zevents/{NODE}/"):
        if isinstance(body, dict) and "seq" in body and body["event"] != "Temperature":
            out.append((body["group"], body["seq"], body["event"]))
    return out


def bus_events(envelopes) -> list:
    return [(e.group, e.seq, e.name) for e in envelopes if e.name != "Temperature"]


def assert_in_order_by_seq(got: list, groups) -> None:
    """Each group's events in seq order once the repeats a consumer drops by seq (seq <= the last seen) are
    dropped: nothing comes late, after a later event."""
    for group in groups:
        kept = []
        for g, seq, _ in got:
            if g == group and (not kept or seq > kept[-1]):
                kept.append(seq)
        assert kept == sorted({s for g, s, _ in got if g == group}), f"{group} out of order"


def finish_print(subscriber, recorder, seen: list) -> tuple:
    """Wait for PrintDone on the bus, then on MQTT: (the bus's events, the zevents layout's events)."""
    wait_for_event(subscriber, lambda e: e.name == "PrintDone", timeout=120, seen=seen)
    expected = bus_events(seen)
    recorder.wait(lambda m: ("print", expected[-1][1], "PrintDone") in zevents_events(m), timeout=90,
                  message="PrintDone on MQTT")
    return expected, zevents_events(recorder.snapshot())


# --- OctoPrint-MQTT layout ------------------------------------------------------------------------------------

def test_octoprint_topics_and_payloads_for_a_whole_print(short_tmp, bus_config, running_broker, mosquitto,
                                                         services):
    config = node_config(short_tmp, bus_config, mosquitto.url)
    subscriber = bus.Subscriber(bus_config, groups=["comm", "print", "file", "gcode"])
    recorder = Recorder(mosquitto.url, "octoPrint/#")
    try:
        start_printer(services, config, subscriber)
        start_bridge(services, config)
        recorder.wait(lambda m: any(t == "octoPrint/mqtt" and p == b"connected" for t, p, _ in m),
                      message="octoPrint/mqtt connected")
        request(config, "PRINT", {"path": str(CUBE)})
        wait_for_event(subscriber, lambda e: e.name == "PrintDone")
        recorder.wait(lambda m: any(t == "octoPrint/event/PrintDone" for t, _, _ in m), message="PrintDone")
        events = decoded(recorder.snapshot(), "octoPrint/event/")
        names = [body["_event"] for _, body in events]
        for name in ("PrintStarted", "Home", "ZChange", "PrintDone"):
            assert name in names
        assert names.index("PrintStarted") < names.index("ZChange") < names.index("PrintDone")
        assert "Temperature" not in names and "PrintProgress" not in names  # they have topics of their own
        for topic, body in events:
            assert topic == "octoPrint/event/" + body["_event"]
            assert isinstance(body["_timestamp"], int) and abs(body["_timestamp"] - time.time()) < 3600
        started = next(body for _, body in events if body["_event"] == "PrintStarted")
        assert started["name"] == CUBE.name and started["origin"] == "local" and started["path"]
        done = next(body for _, body in events if body["_event"] == "PrintDone")
        assert done["time"] > 0
        recorder.wait(lambda m: any(t == "octoPrint/progress/printing" and json.loads(p)["progress"] == 100
                                    for t, p, _ in m), message="progress 100")
        progress = [body for topic, body in decoded(recorder.snapshot(), "octoPrint/progress/printing")]
        values = [p["progress"] for p in progress]
        assert values == sorted(values), values
        unstamped = [{k: v for k, v in p.items() if k != "_timestamp"} for p in progress]
        assert all(a != b for a, b in zip(unstamped, unstamped[1:])), unstamped  # on change only
        assert all(set(p) == {"location", "path", "progress", "_timestamp"} for p in progress)
        assert progress[-1]["location"] == "local" and progress[-1]["path"] == started["path"]
        temps = decoded(recorder.snapshot(), "octoPrint/temperature/")
        assert {topic for topic, _ in temps} >= {"octoPrint/temperature/tool0", "octoPrint/temperature/bed"}
        assert all(set(body) == {"actual", "target", "_timestamp"} for _, body in temps)
    finally:
        recorder.close()
    # What is retained: what OctoPrint-MQTT retains, and nothing else.
    late = Recorder(mosquitto.url, "octoPrint/#")
    try:
        late.wait(lambda m: {t for t, _, _ in m} >= {"octoPrint/mqtt", "octoPrint/progress/printing",
                                                        "octoPrint/event/ZChange", "octoPrint/temperature/tool0"},
                  message="the retained octoPrint topics")
        retained = {topic: payload for topic, payload, flag in late.snapshot() if flag}
        assert retained["octoPrint/mqtt"] == b"connected"
        assert json.loads(retained["octoPrint/progress/printing"])["progress"] == 100
        assert not [t for t in retained if t.startswith("octoPrint/event/") and t != "octoPrint/event/ZChange"]
    finally:
        late.close()
    subscriber.close()


# --- retained state -----------------------------------------------------------------------------------------------

def test_retained_state_for_a_subscriber_that_connects_mid_print(short_tmp, bus_config, running_broker, mosquitto,
                                                                 services):
    config = node_config(short_tmp, bus_config, mosquitto.url, speed=20)
    subscriber = bus.Subscriber(bus_config, groups=["comm", "print", "file", "gcode"])
    try:
        start_printer(services, config, subscriber)
        start_bridge(services, config)
        watcher = Recorder(mosquitto.url, f"zevents/{NODE}/+/state")
        request(config, "PRINT", {"path": str(CUBE)})
        wait_for_event(subscriber, lambda e: e.name == "LayerChanged" and e.payload["layer"] >= 2)
        watcher.wait(lambda m: any(t == f"zevents/{NODE}/{PRINTER}/state" and (json.loads(p)["layer"] or 0) >= 2
                                   for t, p, _ in m), message="layer 2 in the state")
        watcher.close()
        late = Recorder(mosquitto.url, [f"zevents/{NODE}/+/state", f"zevents/{NODE}/+/state/#",
                                        f"zevents/{NODE}/status"])
        try:
            root = f"zevents/{NODE}/{PRINTER}/"
            wanted = {root + "state", root + "state/state", root + "state/job", root + "state/progress",
                      root + "state/layer", root + "state/time_left", root + "state/temperature/tool0",
                      root + "state/temperature/bed", f"zevents/{NODE}/status"}
            first = late.retained()
            assert set(first) >= wanted
            assert first[f"zevents/{NODE}/status"] == b"online"
            state = json.loads(first[root + "state"])
            assert state["printing"] is True and state["file"] == CUBE.name and state["state"] == "PRINTING"
            assert state["node"] == NODE and state["printer"] == PRINTER
            assert state["layer"] >= 2 and state["last_event"]
            assert json.loads(first[root + "state/job"])["file"] == CUBE.name
            assert json.loads(first[root + "state/state"])["state_id"] == "PRINTING"
            assert json.loads(first[root + "state/temperature/tool0"])["actual"] is not None
        finally:
            late.close()
    finally:
        subscriber.close()


# --- Home Assistant discovery ------------------------------------------------------------------------------------

def _discovery(services, config, bus_config, url) -> dict:
    """Start a printer and a bridge; the retained discovery configs, once the bridge has published those that
    include the tool0 sensors (the cancel button's, allowed or removed, is the last of that burst)."""
    subscriber = bus.Subscriber(bus_config, groups=["comm"])
    try:
        start_printer(services, config, subscriber)
        start_bridge(services, config)
    finally:
        subscriber.close()
    watcher = Recorder(url, "homeassistant/#")
    try:
        def burst_with_tool0(messages):
            topics = [t for t, _, _ in messages]
            tool0 = [i for i, t in enumerate(topics) if "tool0" in t]
            return tool0 and any(t.endswith("/cancel/config") for t in topics[tool0[0]:])

        watcher.wait(burst_with_tool0, message="the discovery with tool0")
    finally:
        watcher.close()
    recorder = Recorder(url, "homeassistant/#")
    try:
        return {topic: json.loads(payload) for topic, payload in recorder.retained().items()}
    finally:
        recorder.close()


def test_home_assistant_discovery_passes_the_schema_check(short_tmp, bus_config, running_broker, mosquitto,
                                                          services):
    config = node_config(short_tmp, bus_config, mosquitto.url, commands={"enabled": True,
                                                                         "allowed": ["pause", "cancel"]})
    configs = _discovery(services, config, bus_config, mosquitto.url)
    for topic, payload in configs.items():
        check_discovery(topic, payload)
    device = f"zevents_{NODE}_{PRINTER}"
    present = {topic.split("/")[1] + ":" + topic.split("/")[3] for topic in configs}
    assert present >= {"sensor:state", "sensor:progress", "sensor:file", "sensor:layer", "sensor:time_left",
                       "binary_sensor:printing", "sensor:tool0_actual", "sensor:tool0_target", "sensor:bed_actual",
                       "button:pause", "button:cancel"}
    assert f"homeassistant/button/{device}/resume/config" not in configs  # not allowed: removed
    pause = configs[f"homeassistant/button/{device}/pause/config"]
    assert pause["cmd_t"] == "~command/pause" and pause["~"] == f"zevents/{NODE}/{PRINTER}/"
    ids = {json.dumps(p["dev"], sort_keys=True) for p in configs.values()}
    assert len(ids) == 1  # one device per printer


def test_home_assistant_discovery_has_no_buttons_without_commands(short_tmp, bus_config, running_broker,
                                                                  mosquitto, services):
    config = node_config(short_tmp, bus_config, mosquitto.url)
    configs = _discovery(services, config, bus_config, mosquitto.url)
    assert "homeassistant/binary_sensor/zevents_testnode_printer/printing/config" in configs
    assert not [t for t in configs if "/button/" in t]


def test_the_schema_check_refuses_bad_configs():
    good = {"~": "z/n/p/", "name": "State", "uniq_id": "u1", "stat_t": "~state", "avty": [{"t": "z/n/status"}],
            "dev": {"ids": ["d"], "name": "p"}, "val_tpl": "{{ value_json.state }}"}
    check_discovery("homeassistant/sensor/d/state/config", good)
    for topic, bad in [
        ("homeassistant/sensor/d/state/config", {k: v for k, v in good.items() if k != "stat_t"}),
        ("homeassistant/button/d/pause/config", dict(good)),                    # a button needs cmd_t
        ("homeassistant/sensor/d/state/config", dict(good, dev={"name": "p"})),  # a device needs ids
        ("homeassistant/sensor/d/state/config", dict(good, dev_cla="temprature")),
        ("homeassistant/sensor/d/state/config", dict(good, dev_cla="temperature", unit_of_meas="%")),
        ("homeassistant/button/d/pause/config", dict(good, cmd_t="~command/+")),
        ("homeassistant/sensor/d/state/config", dict(good, bogus_key=1)),
        ("homeassistant/sensor/d/st ate/config", good),
        ("homeassistant/lamp/d/state/config", good),
        ("homeassistant/binary_sensor/d/x/config", dict(good, dev_cla="temperature")),
    ]:
        with pytest.raises(DiscoveryError):
            check_discovery(topic, bad)


# --- nothing lost ---------------------------------------------------------------------------------------------

def assert_exactly_once_in_order(expected: list, got: list, groups) -> None:
    """Every event of the bus in the MQTT messages, none twice, each group's in seq order."""
    missing = [e for e in expected if e not in set(got)]
    assert not missing, f"{len(missing)} of {len(expected)} events lost, e.g. {missing[:5]}"
    for group in groups:
        seqs = [seq for g, seq, _ in got if g == group]
        repeats = sorted({seq for seq in seqs if seqs.count(seq) > 1})
        assert not repeats, f"{group}: {len(repeats)} events came twice, seq {repeats[:10]}"
        assert seqs == sorted(seqs), f"{group} out of order"


@pytest.mark.parametrize("qos, max_pending", [(2, 100_000), (2, 100), (1, 100_000)])
def test_mosquitto_restarted_mid_print_loses_nothing(short_tmp, bus_config, running_broker, mosquitto, services,
                                                     qos, max_pending, caplog):
    """Mosquitto stopped (SIGTERM) mid-print and restarted.  With the default bound the outbox holds everything;
    with a bound of 100 messages the bridge stops reading the bus at the bound (and says so) and takes the rest
    from it after the restart.  At QoS 2 (the default) every event arrives exactly once, in order: Mosquitto saves
    the bridge's session (its half-done QoS 2 exchanges) and the subscriber's (its queue) on SIGTERM, and the
    bridge resumes its session.  At QoS 1 delivery is at least once: a message Mosquitto took but had not
    acknowledged when it stopped may come again, and seq tells it; nothing is lost or comes out of order."""
    config = node_config(short_tmp, bus_config, mosquitto.url, speed=20, max_pending=max_pending, qos=qos)
    groups = ["comm", "print", "file", "gcode"]
    subscriber = bus.Subscriber(bus_config, groups=groups)
    # A persistent session: Mosquitto keeps the subscription and queues for it across its own restart.
    recorder = Recorder(mosquitto.url, [f"zevents/{NODE}/+/{g}/+" for g in groups], client_id="lossless",
                        clean=False, qos=qos)
    seen = []
    try:
        start_printer(services, config, subscriber)
        bridge = start_bridge(services, config)
        request(config, "PRINT", {"path": str(CUBE)})
        wait_for_event(subscriber, lambda e: e.name == "PrintProgress" and e.payload["progress"] >= 15, seen=seen)
        mosquitto.stop()
        wait_for_event(subscriber, lambda e: e.name == "PrintProgress" and e.payload["progress"] >= 45, seen=seen)
        assert not bridge.connected and len(bridge.outbox) > 0  # held while the broker is away
        if max_pending == 100:
            wait_for(lambda: bridge.holding, 30, message="the bridge at its bound")
            assert len(bridge.outbox) <= 100 + 32  # at most one event's messages over the bound
            assert "reading no more events" in caplog.text
        mosquitto.start()
        expected, got = finish_print(subscriber, recorder, seen)
    finally:
        recorder.close()
        subscriber.close()
    if qos == 2:
        assert bridge.stats["sessions_resumed"] == 1  # Mosquitto kept the bridge's session across its restart
        assert_exactly_once_in_order(expected, got, groups)
    else:
        missing = [e for e in expected if e not in set(got)]
        assert not missing, f"{len(missing)} of {len(expected)} events lost, e.g. {missing[:5]}"
        repeats = len(got) - len(set(got))
        assert repeats <= 100, repeats  # at most what was in flight (mqtt.inflight) when Mosquitto stopped
        assert_in_order_by_seq(got, groups)


class RelayedBurst:
    """A bridge reaching Mosquitto through a :class:`Relay`, a QoS 2 recorder with a persistent session on
    Mosquitto itself, and a burst of custom events on the bus, flowing when this is made."""

    def __init__(self, short_tmp, bus_config, mosquitto, services, **mqtt):
        self.relay = Relay(mosquitto.port)
        self.subscriber = bus.Subscriber(bus_config, groups=["custom"])
        self.recorder = Recorder(mosquitto.url, f"zevents/{NODE}/+/custom/+", client_id="lossless", clean=False,
                                 qos=2)
        self.publisher = bus.Publisher(bus_config, src="user")
        self.published = 0
        self.bridge = start_bridge(services, node_config(short_tmp, bus_config, self.relay.url, **mqtt))
        self.publish(5000)
        self.recorder.wait(lambda m: len(m) >= 500, message="the burst flowing")

    def publish(self, count: int):
        for i in range(self.published, self.published + count):
            self.publisher.publish("Burst", {"i": i})
        self.published += count

    def broker_gone(self):
        """Wait until the bridge has seen the broker go; it must have QoS 2 exchanges left half done."""
        wait_for(lambda: not self.bridge.connected, 30, message="the bridge to see the broker gone")
        assert self.bridge.inflight

    def delivered(self) -> tuple:
        """(the bus's events, the recorder's zevents-layout events) once the last one reached the recorder."""
        seen = []
        while len(seen) < self.published:
            wait_for_event(self.subscriber, lambda e: True, seen=seen)
        expected = [(e.group, e.seq, e.name) for e in seen]
        self.recorder.wait(lambda m: expected[-1] in zevents_events(m), timeout=120, message="the last event")
        return expected, zevents_events(self.recorder.snapshot())

    def close(self):
        self.publisher.close(linger=0)
        self.recorder.close()
        self.subscriber.close()
        self.relay.close()


def test_acks_lost_in_transit_when_mosquitto_restarts_change_nothing(short_tmp, bus_config, running_broker,
                                                                     mosquitto, services):
    """Mosquitto stopped (SIGTERM) in the middle of a burst while its acks to the bridge were on their way (a relay
    holds them back, then the connection breaks and they are lost, as on a real network), and restarted: the bridge
    resumes its session and finishes each QoS 2 exchange where it was, so every event arrives once, in order.  (With
    a clean session, each message Mosquitto had released but whose PUBCOMP was lost came twice.)"""
    burst = RelayedBurst(short_tmp, bus_config, mosquitto, services)
    try:
        burst.relay.hold()
        burst.relay.wait_held(40)  # acks (4 bytes each) Mosquitto sent that the bridge will never see
        mosquitto.stop()
        burst.relay.cut()
        burst.broker_gone()
        burst.publish(1000)
        mosquitto.start()
        expected, got = burst.delivered()
    finally:
        burst.close()
    assert burst.bridge.stats["sessions_resumed"] == 1
    assert_exactly_once_in_order(expected, got, ["custom"])


def end_session(url: str, client_id: str):
    """Connect as ``client_id`` with a clean start and no expiry, then leave: the broker drops that id's session."""
    import paho.mqtt.client as paho
    from paho.mqtt.packettypes import PacketTypes

    from zevents.bridges.mqtt import session_expiry_property
    from zevents.bridges.settings import parse_url

    address = parse_url(url)
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5)
    client.connect(address["host"], address["port"], 30, clean_start=True,
                   properties=session_expiry_property(PacketTypes.CONNECT, 0))
    client.loop_start()
    try:
        wait_for(client.is_connected, 30, message="the session's end")
    finally:
        client.disconnect()
        client.loop_stop()


def test_a_broker_without_our_session_gets_what_was_in_flight_again(short_tmp, bus_config, running_broker,
                                                                    mosquitto, services):
    """Mosquitto restarted mid-burst while the bridge's packets were on their way (lost), and the bridge's session
    gone when it comes back (as after a restart without persistence, or an expired session): finding no session,
    the bridge publishes what was in flight again; paho alone would resend PUBRELs for messages the broker never
    stored, be told they are complete, and lose them.  At least once: nothing lost, in order once seq drops
    repeats."""
    burst = RelayedBurst(short_tmp, bus_config, mosquitto, services)
    bridge = burst.bridge
    try:
        burst.relay.hold(from_broker=False, from_client=True)  # the bridge's PUBLISHes and PUBRELs are lost
        wait_for(lambda: len(bridge.inflight) >= bridge.window, 60, message="the bridge's window full")
        burst.relay.refusing = True
        mosquitto.stop()
        burst.relay.cut()
        burst.broker_gone()
        mosquitto.start()
        end_session(mosquitto.url, f"zevents-{NODE}")
        burst.relay.refusing = False
        expected, got = burst.delivered()
    finally:
        burst.close()
    assert bridge.stats["sessions_resumed"] == 0 and bridge.stats["published_again"] > 0
    missing = [e for e in expected if e not in set(got)]
    assert not missing, f"{len(missing)} of {len(expected)} events lost, e.g. {missing[:5]}"
    assert_in_order_by_seq(got, ["custom"])


def test_bridge_killed_and_restarted_mid_print_loses_nothing(short_tmp, bus_config, running_broker, mosquitto,
                                                             services):
    config = node_config(short_tmp, bus_config, mosquitto.url, speed=20)
    path = write_config(config, short_tmp / "node.yaml")
    groups = ["comm", "print", "file", "gcode"]
    subscriber = bus.Subscriber(bus_config, groups=groups)
    recorder = Recorder(mosquitto.url, [f"zevents/{NODE}/+/{g}/+" for g in groups] + [f"zevents/{NODE}/status"])
    seen = []

    def bridge_process():
        return subprocess.Popen(ZEVENTS + ["mqtt", "-c", str(path)], stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True)

    process = None
    try:
        start_printer(services, config, subscriber)
        process = bridge_process()
        recorder.wait(lambda m: any(t.endswith("/status") and p == b"online" for t, p, _ in m),
                      message="the bridge online")
        request(config, "PRINT", {"path": str(CUBE)})
        wait_for_event(subscriber, lambda e: e.name == "PrintProgress" and e.payload["progress"] >= 15, seen=seen)
        recorder.wait(lambda m: any(e[2] == "PrintProgress" for e in zevents_events(m)), message="progress on MQTT")
        process.send_signal(signal.SIGKILL)
        process.wait(10)
        process.stderr.close()
        recorder.wait(lambda m: any(t.endswith("/status") and p == b"offline" for t, p, _ in m),
                      message="the last will")
        wait_for_event(subscriber, lambda e: e.name == "PrintProgress" and e.payload["progress"] >= 45, seen=seen)
        process = bridge_process()
        expected, got = finish_print(subscriber, recorder, seen)
    finally:
        if process is not None and process.poll() is None:
            process.terminate()
            assert process.wait(30) == 0
            process.stderr.close()
        recorder.close()
        subscriber.close()
    missing = [e for e in expected if e not in set(got)]
    assert not missing, f"{len(missing)} of {len(expected)} events lost, e.g. {missing[:5]}"
    assert_in_order_by_seq(got, groups)  # repeats (what was in flight at the kill) allowed; seq tells them


# --- commands -------------------------------------------------------------------------------------------------

def test_commands_are_refused_when_disabled(short_tmp, bus_config, running_broker, mosquitto, services):
    config = node_config(short_tmp, bus_config, mosquitto.url, speed=20)
    subscriber = bus.Subscriber(bus_config, groups=["comm", "print", "custom"])
    sender = Recorder(mosquitto.url, f"zevents/{NODE}/+/command/#")
    try:
        start_printer(services, config, subscriber)
        start_bridge(services, config)
        request(config, "PRINT", {"path": str(CUBE)})
        wait_for_event(subscriber, lambda e: e.name == "PrintStarted")
        for command in ("pause", "cancel"):
            sender.client.publish(f"zevents/{NODE}/{PRINTER}/command/{command}", b"PRESS", qos=1).wait_for_publish(10)
        seen = []
        wait_for_event(subscriber, lambda e: e.name in ("PrintDone", "PrintFailed"), timeout=120, seen=seen)
        assert seen[-1].name == "PrintDone"
        assert not [e for e in seen if e.name in ("PrintPaused", "MqttCommand", "PrintCancelled")]
        assert not [t for t, _, _ in sender.snapshot() if t.endswith("/result")]
    finally:
        sender.close()
        subscriber.close()


def test_commands_are_limited_when_enabled(short_tmp, bus_config, running_broker, mosquitto, services):
    config = node_config(short_tmp, bus_config, mosquitto.url, speed=20,
                         commands={"enabled": True, "allowed": ["pause", "resume", "gcode"]})
    subscriber = bus.Subscriber(bus_config, groups=["comm", "print", "custom"])
    sender = Recorder(mosquitto.url, f"zevents/{NODE}/+/command/+/result")

    history = []

    def until(name):
        """The first event of that name not looked at yet (already received, or the next one)."""
        for index, envelope in enumerate(history):
            if envelope.name == name:
                del history[:index + 1]
                return envelope
        envelope = wait_for_event(subscriber, lambda e: e.name == name, seen=history)
        history.pop()
        return envelope

    def send(command, payload=b"PRESS", printer=PRINTER):
        sender.client.publish(f"zevents/{NODE}/{printer}/command/{command}", payload, qos=1).wait_for_publish(10)
        return until("MqttCommand")

    try:
        start_printer(services, config, subscriber)
        start_bridge(services, config)
        request(config, "PRINT", {"path": str(CUBE)})
        wait_for_event(subscriber, lambda e: e.name == "PrintStarted")
        refused = send("cancel")
        assert refused.src == "mqtt" and refused.payload["accepted"] is False
        assert "not allowed" in refused.payload["error"]
        motion = send("gcode", b"G28")
        assert motion.payload["accepted"] is False and "move the printer" in motion.payload["error"]
        assert send("gcode", b'{"lines": ["M117 from mqtt"]}').payload["accepted"] is True
        assert "no printer" in send("pause", printer="elsewhere").payload["error"]
        paused = send("pause")
        assert paused.payload["accepted"] is True, paused.payload
        assert until("PrintPaused").payload["user"] == "mqtt"
        assert send("resume").payload["accepted"] is True
        until("PrintResumed")
        results = sender.wait(lambda m: [json.loads(p) for t, p, _ in m if t.endswith("/resume/result")],
                              message="the resume result")
        assert results[0]["accepted"] is True
        seen = []
        wait_for_event(subscriber, lambda e: e.name in ("PrintDone", "PrintFailed"), timeout=120, seen=seen)
        assert seen[-1].name == "PrintDone"  # the refused cancel did nothing
    finally:
        sender.close()
        subscriber.close()


# --- the farm view ------------------------------------------------------------------------------------------------

def test_farm_shows_two_nodes_printers(short_tmp, mosquitto, services):
    from zevents import broker
    from zevents.config import BusConfig

    nodes = {"alpha": "left", "beta": "right"}
    brokers, publishers = [], []
    try:
        for node, printer in nodes.items():
            directory = short_tmp / node
            directory.mkdir()
            bus_config = BusConfig.for_dir(directory, node=node, heartbeat=0.2)
            brk, thread = broker.serve_in_thread(bus_config)
            brokers.append((brk, thread))
            config = zconfig.from_bus(bus_config, data_dir=str(directory / "data"),
                                      mqtt={"enabled": True, "url": mosquitto.url, "layouts": {"octoprint": False}})
            start_bridge(services, config)
            publisher = bus.Publisher(bus_config, src="job", printer=printer)
            publishers.append(publisher)
            publisher.publish_confirmed("PrinterStateChanged", {"state_id": "PRINTING", "state_string": "Printing"})
            publisher.publish_confirmed("PrintStarted", {"name": f"{printer}.gcode", "path": f"{printer}.gcode",
                                                         "origin": "local", "size": 1, "owner": None, "user": None})
            publisher.publish_confirmed("LayerChanged", {"layer": 3, "z": 0.8, "old_z": 0.6, "total": 40})
            publisher.publish_confirmed("PrintProgress", {"name": f"{printer}.gcode", "path": f"{printer}.gcode",
                                                          "origin": "local", "progress": 25, "fileposition": 9,
                                                          "time": 30.0})
        watcher = Recorder(mosquitto.url, "zevents/+/+/state")
        try:
            watcher.wait(lambda m: {t for t, p, _ in m if json.loads(p).get("progress") == 25} >= {
                f"zevents/{n}/{p}/state" for n, p in nodes.items()}, message="both printers' state")
        finally:
            watcher.close()
        result = subprocess.run(ZEVENTS + ["farm", "--mqtt", mosquitto.url, "--json"], capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 0, result.stderr
        farm = json.loads(result.stdout)
        assert farm["nodes"] == {"alpha": "online", "beta": "online"}
        rows = {(row["node"], row["printer"]): row for row in farm["printers"]}
        assert set(rows) == {("alpha", "left"), ("beta", "right")}
        for (node, printer), row in rows.items():
            assert row["file"] == f"{printer}.gcode" and row["progress"] == 25 and row["state"] == "PRINTING"
            assert row["layer_text"] == "3/40" and row["time_left"] == 90 and row["last_event"] == "PrintProgress"
        table = subprocess.run(ZEVENTS + ["farm", "--mqtt", mosquitto.url, "--once"], capture_output=True,
                               text=True, timeout=60, env={"COLUMNS": "200", "PATH": "/usr/bin:/bin"})
        assert table.returncode == 0, table.stderr
        assert "alpha" in table.stdout and "right.gcode" in table.stdout and "3/40" in table.stdout
    finally:
        for publisher in publishers:
            publisher.close(linger=0)
        for brk, thread in brokers:
            brk.stop()
            thread.join(5)
            brk.close()


def test_farm_says_when_the_broker_is_not_there(zevents_cmd):
    from mqtt_broker import free_port

    result = subprocess.run(zevents_cmd + ["farm", "--mqtt", f"mqtt://127.0.0.1:{free_port()}", "--json",
                                           "--timeout", "3"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "cannot reach the MQTT broker" in result.stderr
    result = subprocess.run(zevents_cmd + ["farm", "--mqtt", "http://x", "--json"], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 2 and "scheme" in result.stderr


# --- configuration ----------------------------------------------------------------------------------------------

def test_config_check_names_bad_mqtt_keys(tmp_path):
    path = tmp_path / "z.yaml"
    path.write_text("mqtt:\n  enabled: true\n  url: http://broker\n  qos: 3\n"
                    "  commands:\n    allowed: [pause, home]\n  layouts:\n    zevents: false\n")
    problems = [str(p) for p in zconfig.check(path)]
    text = "\n".join(problems)
    assert "z.yaml:3: mqtt.url: the scheme must be one of" in text
    assert "z.yaml:4: mqtt.qos: must be one of 0, 1, 2, not 3" in text
    assert "z.yaml:6: mqtt.commands.allowed: unknown command(s) 'home'" in text
    path.write_text("mqtt:\n  enabled: true\n  layouts:\n    zevents: false\n")
    assert "mqtt.homeassistant.discovery: Home Assistant discovery reads" in "\n".join(map(str, zconfig.check(path)))
    path.write_text("mqtt:\n  enabled: true\n  session_expiry: -1\n")
    assert "z.yaml:3: mqtt.session_expiry: must be between 0 and 4294967295" in "\n".join(map(str, zconfig.check(path)))
    path.write_text("mqtt:\n  enabled: true\n  url: mqtts://broker.example\n")
    assert zconfig.check(path) == []


def test_the_node_plans_the_bridge_only_when_enabled(short_tmp, bus_config):
    from zevents import node

    assert "mqtt" not in node.plan_services(zconfig.from_bus(bus_config))
    assert "mqtt" in node.plan_services(zconfig.from_bus(bus_config, mqtt={"enabled": True}))


def test_zevents_run_supervises_the_bridge(mosquitto):
    """`zevents run` with mqtt.enabled starts the bridge as one of its services; the node's printer shows up in
    the retained state, and the bridge's offline status is published when the node stops."""
    import shutil
    import tempfile

    from test_node import Node, wait_started

    home = Path(tempfile.mkdtemp(prefix="zevh-"))
    try:
        path = home / "node.yaml"
        path.write_text(yaml.safe_dump({"bus": {"node": "runnode"}, "data_dir": str(home / "data"),
                                        "printer": {"virtual": {"speed": 0}},
                                        # not the gateway: its fixed port may be taken by another node here
                                        "gateway": {"enabled": False},
                                        "mqtt": {"enabled": True, "url": mosquitto.url}}))
        node = Node(home, "-c", str(path)).start()
        recorder = Recorder(mosquitto.url, ["zevents/runnode/status", "zevents/runnode/+/state"])
        try:
            status = wait_started(node)
            assert "mqtt" in [s["name"] for s in status["services"]]
            recorder.wait(lambda m: any(t == "zevents/runnode/printer/state" and
                                        json.loads(p)["state"] == "OPERATIONAL" for t, p, _ in m),
                          message="the printer's state")
            assert node.stop() == 0
            recorder.wait(lambda m: any(t == "zevents/runnode/status" and p == b"offline" for t, p, _ in m),
                          message="offline")
        finally:
            recorder.close()
            node.stop()
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_topics_and_state_are_keyed_by_the_printer_in_each_header(short_tmp, bus_config):
    """Events of two printers of one node (the header's printer): their own zevents topics and state, the default
    printer on OctoPrint-MQTT's plain topics and the other under octoPrint/<printer>/; node-wide events apart."""
    from zevents.bridges.mqtt import MqttBridge
    from zevents.wire import Envelope

    config = zconfig.from_bus(bus_config, data_dir=str(short_tmp / "data"), printer={"name": "left"},
                              mqtt={"enabled": True})
    bridge = MqttBridge(config)
    try:
        def event(group, name, printer, seq, payload):
            bridge.handle(Envelope(f"{group}/{name}", group, name, NODE, printer, 7, seq, 1_700_000_000_000_000,
                                   "job", payload))

        job = {"path": "a.gcode", "origin": "local", "size": 1, "owner": None, "user": None}
        event("print", "PrintStarted", "left", 1, dict(job, name="a.gcode"))
        event("print", "PrintStarted", "right", 2, dict(job, name="b.gcode", path="b.gcode"))
        event("print", "PrintProgress", "right", 3, {"name": "b.gcode", "path": "b.gcode", "origin": "local",
                                                     "progress": 40, "fileposition": 5, "time": 60.0})
        event("server", "Startup", None, 1, {})
        topics = [message.topic for message in bridge.outbox.queue]
        assert f"zevents/{NODE}/left/print/PrintStarted" in topics
        assert f"zevents/{NODE}/right/print/PrintStarted" in topics
        assert f"zevents/{NODE}/_node/server/Startup" in topics
        assert "octoPrint/event/PrintStarted" in topics and "octoPrint/right/event/PrintStarted" in topics
        assert "octoPrint/right/progress/printing" in topics and "octoPrint/event/Startup" in topics
        left, right = bridge.states[(NODE, "left")], bridge.states[(NODE, "right")]
        assert (left.file, left.progress) == ("a.gcode", 0)
        assert (right.file, right.progress, right.time_left, right.time_left_origin) == ("b.gcode", 40, 90, "linear")
        assert (NODE, "_node") not in bridge.states
        message = bridge.outbox.pop()
        while message.topic != f"zevents/{NODE}/right/state":
            message = bridge.outbox.pop()
        assert json.loads(message.payload)["progress"] == 40  # rendered when it leaves the outbox
    finally:
        bridge.close(timeout=0)


def test_the_bridge_over_tls(short_tmp, bus_config, running_broker, services):
    """mqtts:// with the broker's CA from mqtt.tls.ca_certs; a plain listener of the same Mosquitto shows what
    came through."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    mosquitto = Mosquitto(short_tmp / "mq", tls=True).start()
    try:
        recorder = Recorder(mosquitto.url, f"zevents/{NODE}/#")
        try:
            config = zconfig.from_bus(bus_config, data_dir=str(short_tmp / "data"), mqtt={
                "enabled": True, "url": mosquitto.tls_url, "tls": {"ca_certs": str(mosquitto.cafile)}})
            start_bridge(services, config)
            publisher = bus.Publisher(bus_config, src="user")
            try:
                publisher.publish_confirmed("Home", {})
            finally:
                publisher.close(linger=0)
            recorder.wait(lambda m: any(t == f"zevents/{NODE}/{PRINTER}/gcode/Home" for t, _, _ in m),
                          message="an event over TLS")
        finally:
            recorder.close()
    finally:
        mosquitto.stop()


def test_the_bridge_over_websockets(short_tmp, bus_config, running_broker, services):
    """ws:// (MQTT over websockets, path /mqtt) to Mosquitto's websockets listener; its plain listener shows what
    came through, exactly once at QoS 2."""
    mosquitto = Mosquitto(short_tmp / "mq", websockets=True).start()
    try:
        recorder = Recorder(mosquitto.url, f"zevents/{NODE}/#", qos=2)
        publisher = bus.Publisher(bus_config, src="user")
        try:
            config = zconfig.from_bus(bus_config, data_dir=str(short_tmp / "data"),
                                      mqtt={"enabled": True, "url": mosquitto.ws_url})
            bridge = start_bridge(services, config)
            assert bridge.client.transport == "websockets"
            seqs = [publisher.publish_confirmed("ZChange", {"new": 0.2 * i, "old": 0.2 * (i - 1)})["seq"]
                    for i in range(1, 51)]
            topic = f"zevents/{NODE}/{PRINTER}/gcode/ZChange"

            def received(messages):
                return [json.loads(payload)["seq"] for t, payload, _ in messages if t == topic]

            recorder.wait(lambda m: len(received(m)) >= len(seqs), message="the events over ws://")
            assert received(recorder.snapshot()) == seqs
        finally:
            publisher.close(linger=0)
            recorder.close()
    finally:
        mosquitto.stop()
