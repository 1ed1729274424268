"""MQTT bridge: events per second from the bus into Mosquitto beside a plain paho-mqtt publish loop of the same
payloads, and latency from the bus to an MQTT subscriber (p50, p99) at 1 000 events/s.

    pytest bench/bench_mqtt.py --benchmark-only -s

The broker, Mosquitto and the bridge (`zevents mqtt`) each run as their own process, as in production; this
process publishes on the bus and subscribes on MQTT.  Throughput (last, as its bursts also flow through the bridge process): a burst of ``ZChange`` events (each becomes its
zevents-layout message plus the printer's conflated state), counted until the subscriber has received every event
message, at the bridge's default QoS (2; ``ZEVENTS_BENCH_MQTT_QOS=1`` for QoS 1) throughout, the subscriber's
too; the baseline publishes the very bodies the bridge produced (same topics, same bytes) with
``client.publish(..., qos=QOS)`` in a loop, counted the same way, right before each burst.  Latency: ``custom``
events carrying their publish time, paced at 1 000/s, measured when the subscriber receives each one.

Target (issue 18): throughput ratio ≥ 0.5.
"""
from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from conftest import broker_process  # noqa: E402
from mqtt_broker import Mosquitto  # noqa: E402
from zevents import bus  # noqa: E402

BURST = 20_000
LATENCY_EVENTS = 5_000
RATE = 1000.0
NODE = "bench"
QOS = int(os.environ.get("ZEVENTS_BENCH_MQTT_QOS", "2"))  # the bridge's default mqtt.qos


class Counter:
    """A paho subscriber that counts (and keeps) the messages of its topic filter."""

    def __init__(self, url_port: int, topic: str):
        self.topic = topic
        self.count = 0
        self.bodies: list = []
        self.received_ns: list = []
        self.keep = False
        self.done = threading.Condition()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="bench-counter")
        self.client.on_message = self._on_message
        subscribed = threading.Event()
        self.client.on_subscribe = lambda *a: subscribed.set()
        self.client.connect("127.0.0.1", url_port, 60)
        self.client.subscribe(topic, qos=QOS)
        self.client.loop_start()
        assert subscribed.wait(20)

    def _on_message(self, client, userdata, message):
        if self.keep:
            self.bodies.append((message.topic, message.payload))
            self.received_ns.append(time.time_ns())
        with self.done:
            self.count += 1
            self.done.notify_all()

    def wait(self, count: int, timeout: float = 300.0):
        deadline = time.monotonic() + timeout
        with self.done:
            while self.count < count:
                if not self.done.wait(max(0.0, deadline - time.monotonic())) and time.monotonic() > deadline:
                    raise AssertionError(f"{self.count} of {count} messages within {timeout} s")

    def close(self):
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture(scope="module")
def farm():
    """(bus config, Mosquitto, the bridge's process): all three running."""
    directory = Path(tempfile.mkdtemp(prefix="zevm-"))
    mosquitto = Mosquitto(directory / "mq", persistence=False).start()
    try:
        with broker_process() as (bus_config, bus_dir, _):
            path = directory / "bridge.yaml"
            path.write_text(yaml.safe_dump({
                "bus": {"node": NODE, "publish": bus_config.publish, "ingest": bus_config.ingest,
                        "replay": bus_config.replay},
                "data_dir": str(directory / "data"),
                "mqtt": {"enabled": True, "url": mosquitto.url, "qos": QOS, "layouts": {"octoprint": False},
                         "homeassistant": {"discovery": False}}}))
            bridge = subprocess.Popen([sys.executable, "-m", "zevents", "mqtt", "-c", str(path)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                status = Counter(mosquitto.port, f"zevents/{NODE}/status")
                status.wait(1, timeout=30)
                status.close()
                yield bus_config, mosquitto, bridge
            finally:
                bridge.terminate()
                bridge.wait(30)
    finally:
        mosquitto.stop()
        shutil.rmtree(directory, ignore_errors=True)


def plain_loop(port: int, messages: list, counter: Counter | None = None) -> float:
    """Messages per second of a plain paho publish loop at QOS, until the subscriber has them all (``counter``) or
    until Mosquitto has acked them all."""
    client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="bench-plain")
    client.max_inflight_messages_set(100)  # the bridge's default mqtt.inflight
    acked = threading.Semaphore(0)
    client.on_publish = lambda *a: acked.release()
    client.connect("127.0.0.1", port, 60)
    client.loop_start()
    try:
        target = counter.count + len(messages) if counter else 0
        start = time.perf_counter()
        for topic, body in messages:
            client.publish(topic, body, qos=QOS)
        if counter is not None:
            counter.wait(target)
        else:
            for _ in messages:
                assert acked.acquire(timeout=120)
        return len(messages) / (time.perf_counter() - start)
    finally:
        client.disconnect()
        client.loop_stop()


def test_bridge_throughput_to_a_subscriber_against_a_plain_paho_loop(benchmark, figures, farm):
    """End to end, the bridge as its own process: until an MQTT subscriber (paho, in this process) has them all."""
    bus_config, mosquitto, _ = farm
    counter = Counter(mosquitto.port, f"zevents/{NODE}/+/gcode/ZChange")
    publisher = bus.Publisher(bus_config, src="bench")
    rates, baselines = [], []
    try:
        # The bodies the bridge produces, kept from a first burst: the baseline publishes exactly these.
        counter.keep = True
        for i in range(BURST):
            publisher.publish("ZChange", {"new": 0.2 * (i + 1), "old": 0.2 * i})
        counter.wait(BURST)
        counter.keep = False
        bodies = list(counter.bodies)
        assert len({json.loads(b)["seq"] for _, b in bodies}) == BURST

        def round_():
            baselines.append(plain_loop(mosquitto.port, bodies, counter))
            target = counter.count + BURST
            start = time.perf_counter()
            for i in range(BURST):
                publisher.publish("ZChange", {"new": 0.2 * (i + 1), "old": 0.2 * i})
            counter.wait(target)
            rates.append(BURST / (time.perf_counter() - start))

        benchmark.pedantic(round_, rounds=3, iterations=1)
    finally:
        publisher.close(linger=0)
        counter.close()
    report_throughput(benchmark, figures, rates, baselines, "to a subscriber")


def report_throughput(benchmark, figures, rates: list, baselines: list, where: str):
    """The median of each round's ratio (each round measured the plain loop right before the bridge)."""
    rate, baseline = statistics.median(rates), statistics.median(baselines)
    ratio = statistics.median(r / b for r, b in zip(rates, baselines))
    benchmark.extra_info.update({"bridge_events_per_s": round(rate), "plain_paho_per_s": round(baseline),
                                 "ratio": round(ratio, 2)})
    figures.add("mqtt", f"events/s through the bridge {where} (QoS {QOS})", rate, "ev/s", baseline,
                f"plain paho QoS {QOS} loop")
    print(f"\nmqtt: {rate:,.0f} events/s through the bridge {where} vs {baseline:,.0f} msg/s plain paho loop = "
          f"{ratio:.2f}× (median of rounds' ratios)")
    assert ratio >= 0.5


def paced_latencies(publish, counter: Counter, t0_of) -> list:
    """Latencies (ms) of LATENCY_EVENTS messages published at RATE per second, ``publish(t0_ns)`` each."""
    counter.bodies.clear()
    counter.received_ns.clear()
    counter.keep = True
    target = counter.count + LATENCY_EVENTS
    start = time.perf_counter()
    for i in range(LATENCY_EVENTS):
        ahead = start + i / RATE - time.perf_counter()
        if ahead > 0:
            time.sleep(ahead)  # not a busy wait: the subscriber's thread in this process needs the GIL
        publish(time.time_ns())
    counter.wait(target)
    counter.keep = False
    return sorted((received - t0_of(body)) / 1e6 for (_, body), received in zip(counter.bodies, counter.received_ns))


def test_bus_to_mqtt_latency_at_1000_events_per_second(benchmark, figures, farm):
    """Beside it, a plain paho publisher at QOS → the same subscriber at the same rate: the floor of this machine."""
    bus_config, mosquitto, _ = farm
    counter = Counter(mosquitto.port, f"zevents/{NODE}/+/custom/BenchTick")
    publisher = bus.Publisher(bus_config, src="bench")
    plain = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="bench-plain-latency")
    plain.connect("127.0.0.1", mosquitto.port, 60)
    plain.loop_start()
    results = {}
    try:
        def round_():
            results["plain"] = paced_latencies(
                lambda t0: plain.publish(f"zevents/{NODE}/plain/custom/BenchTick", str(t0), qos=QOS), counter,
                lambda body: int(body))
            results["bridge"] = paced_latencies(lambda t0: publisher.publish("BenchTick", {"t0": t0}), counter,
                                                lambda body: json.loads(body)["payload"]["t0"])

        benchmark.pedantic(round_, rounds=1, iterations=1)
    finally:
        plain.disconnect()
        plain.loop_stop()
        publisher.close(linger=0)
        counter.close()
    figure = {}
    for path, latencies in results.items():
        figure[path] = statistics.median(latencies), latencies[int(len(latencies) * 0.99) - 1]
    (p50, p99), (plain50, plain99) = figure["bridge"], figure["plain"]
    benchmark.extra_info.update({"latency_p50_ms": round(p50, 3), "latency_p99_ms": round(p99, 3),
                                 "plain_p50_ms": round(plain50, 3), "plain_p99_ms": round(plain99, 3)})
    figures.add("mqtt", f"bus → MQTT subscriber p50 at 1 000 ev/s (QoS {QOS})", p50 * 1000, "µs", plain50 * 1000,
                "plain paho → subscriber")
    figures.add("mqtt", f"bus → MQTT subscriber p99 at 1 000 ev/s (QoS {QOS})", p99 * 1000, "µs", plain99 * 1000,
                "plain paho → subscriber")
    print(f"\nmqtt: bus → MQTT subscriber at {RATE:.0f} events/s: p50 {p50:.3f} ms, p99 {p99:.3f} ms "
          f"(plain paho → subscriber: p50 {plain50:.3f} ms, p99 {plain99:.3f} ms)")


def test_bridge_throughput_into_mosquitto_against_a_plain_paho_loop(benchmark, figures, farm):
    """Into Mosquitto: until Mosquitto has acked every event's message (the bridge's cursor passes the last seq),
    the bridge on a thread of this process (as the paho loop is); the bodies are those the bridge produced."""
    from zevents import config as zconfig
    from zevents.bridges.mqtt import MqttBridge

    bus_config, mosquitto, bridge_process = farm
    bridge_process.terminate()  # not two bridges on the two CPUs: this one measures alone
    bridge_process.wait(30)
    directory = Path(tempfile.mkdtemp(prefix="zevt-"))
    config = zconfig.from_bus(bus_config, data_dir=str(directory), mqtt={
        "enabled": True, "url": mosquitto.url, "client_id": "bench-inprocess", "base_topic": "zin", "qos": QOS,
        "layouts": {"octoprint": False}, "homeassistant": {"discovery": False}})
    bridge = MqttBridge(config)
    bridge.start()
    thread = threading.Thread(target=bridge.serve, daemon=True)
    thread.start()
    counter = Counter(mosquitto.port, f"zin/{NODE}/+/gcode/ZChange")
    publisher = bus.Publisher(bus_config, src="bench")
    rates, baselines = [], []

    def burst() -> int:
        for i in range(BURST - 1):
            publisher.publish("ZChange", {"new": 0.2 * (i + 1), "old": 0.2 * i})
        return publisher.publish_confirmed("ZChange", {"new": 0.0, "old": 0.2})["seq"]

    try:
        counter.keep = True
        burst()
        counter.wait(BURST)
        counter.keep = False
        bodies = list(counter.bodies)

        def round_():
            baselines.append(plain_loop(mosquitto.port, bodies))
            start = time.perf_counter()
            last = burst()
            while bridge.cursor.since.get("gcode", 0) < last:
                time.sleep(0.0005)
            rates.append(BURST / (time.perf_counter() - start))

        benchmark.pedantic(round_, rounds=3, iterations=1)
    finally:
        publisher.close(linger=0)
        counter.close()
        bridge.stop()
        thread.join(30)
        bridge.close()
        shutil.rmtree(directory, ignore_errors=True)
    report_throughput(benchmark, figures, rates, baselines, "into Mosquitto (acked)")
