"""A broker killed with SIGKILL while a publisher streams: the harness shared by tests/test_bus_faults.py and
bench/bench_bus_faults.py.  Everything is real: the broker and the publisher are separate processes (``zevents
broker`` with its journal, a publisher script), the subscriber reads in this process, and the broker is killed with
``kill -9`` and started again on the same endpoints and journal.

``run()`` returns the account of one run: published (accepted by ``publish()``), refused by the publisher
(``dropped`` at publish time), reported undelivered by its ``close()``, delivered to the subscriber, reported lost
by the subscriber, duplicates, out of order, and silently lost (the rest: must be 0).
"""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

from zevents import bus
from zevents.config import BusConfig

PUBLISHER = r"""
import json, sys, time
import zmq
from zevents import bus
from zevents.config import load
config = load(sys.argv[1])
count, rate, linger = int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
publisher = bus.Publisher(config, src="test", linger=linger)
refused = []
start = time.perf_counter()
for i in range(count):
    if not publisher.publish("ZChange", {"i": i}):
        refused.append(i)
    if rate:
        ahead = start + (i + 1) / rate - time.perf_counter()
        if ahead > 0.001:
            time.sleep(ahead)
print("PUBLISHED", flush=True)
undelivered = publisher.close()
print(json.dumps({"refused": refused, "undelivered": undelivered, "dropped": publisher.dropped}), flush=True)
"""


def write_config(directory: Path, heartbeat: float = 0.2) -> tuple[Path, BusConfig]:
    config = BusConfig.for_dir(directory, node="kill", heartbeat=heartbeat, journal=str(directory / "journal"))
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump({"bus": {
        "node": config.node, "publish": config.publish, "ingest": config.ingest, "replay": config.replay,
        "heartbeat": heartbeat, "journal": config.journal, "journal_flush": 1.0}}))
    return path, config


class BrokerProcess:
    """``zevents broker`` in its own process, started again after each kill."""

    def __init__(self, config_path: Path, bus_config: BusConfig):
        self.config_path = config_path
        self.bus_config = bus_config
        self.process = None
        self.starts = 0

    def start(self, timeout: float = 30.0):
        self.process = subprocess.Popen([sys.executable, "-m", "zevents", "broker", "-c", str(self.config_path)],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        self.starts += 1
        control = bus.Control(self.bus_config)
        deadline = time.monotonic() + timeout
        try:
            while True:
                try:
                    return control.ping(timeout=0.5)
                except bus.BusError:
                    if self.process.poll() is not None:
                        raise RuntimeError(f"the broker exited: {self.process.stderr.read().decode()[-2000:]}")
                    if time.monotonic() > deadline:
                        raise
        finally:
            control.close()

    def kill(self):
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)
        self.process.stderr.close()

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(10)
        if self.process is not None and self.process.stderr and not self.process.stderr.closed:
            self.process.stderr.close()


def run(directory: Path, count: int, rate: float, kills: int, linger: float = 60.0,
        timeout: float = 120.0) -> dict:
    """Stream ``count`` events at ``rate`` per second (0: as fast as possible) and kill the broker ``kills`` times,
    evenly through the stream; returns the account."""
    config_path, config = write_config(directory)
    broker = BrokerProcess(config_path, config)
    broker.start()
    subscriber = bus.Subscriber(config, groups=["gcode"], control_timeout=2.0)
    publisher = subprocess.Popen([sys.executable, "-c", PUBLISHER, str(config_path), str(count), str(rate),
                                  str(linger)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    got: list[int] = []
    kill_points = [count * (k + 1) // (kills + 1) for k in range(kills)]
    killed = []
    result_line = {}

    def read_publisher():
        for line in publisher.stdout:
            if line.startswith("{"):
                result_line.update(json.loads(line))

    reader = threading.Thread(target=read_publisher, daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if kill_points and len(got) >= kill_points[0]:
                kill_points.pop(0)
                broker.kill()
                killed.append(len(got))
                broker.start()
            envelope = subscriber.recv(0.5)
            if envelope is not None:
                if envelope.name == "ZChange":
                    got.append(envelope.payload["i"])
                continue
            if result_line and publisher.poll() is not None:
                accepted = count - len(result_line["refused"])
                if len(got) >= accepted - result_line["undelivered"]:
                    break
        publisher.wait(30)
        reader.join(10)
        # Anything still on its way after the publisher said it is done.
        while True:
            envelope = subscriber.recv(1.0)
            if envelope is None:
                break
            if envelope.name == "ZChange":
                got.append(envelope.payload["i"])
    finally:
        if publisher.poll() is None:
            publisher.kill()
            publisher.wait(10)
        stats = subscriber.stats.as_dict()
        subscriber.close()
        broker.stop()
    refused = set(result_line.get("refused", ()))
    accepted = [i for i in range(count) if i not in refused]
    delivered = set(got)
    duplicates = len(got) - len(delivered)
    out_of_order = sum(1 for a, b in zip(got, got[1:]) if b < a)
    missing = len(set(accepted) - delivered)
    reported = stats["lost"] + result_line.get("undelivered", 0)
    return {
        "published": len(accepted), "refused": len(refused), "delivered": len(delivered), "duplicates": duplicates,
        "out_of_order": out_of_order, "reported_lost": reported, "silently_lost": max(0, missing - reported),
        "kills": len(killed), "subscriber": stats, "publisher": result_line,
    }

