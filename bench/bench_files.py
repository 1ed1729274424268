"""Watched folder: latency from a file's close (its writer done) to the files service's ``FileAdded`` on the bus
(p50, p99), with inotify and with polling, beside raw watchdog observers measured in the same run.

    pytest bench/bench_files.py --benchmark-only -s

The broker and the files service run as their own processes (as in production); this process writes each file
(one at a time, so no queueing is counted), notes the moment of its close, and waits for the FileAdded of that
file.  What the service adds on top of noticing the file: moving it into uploads, hashing it, writing the
metadata, publishing through the broker.  Baselines, in this process: a bare watchdog ``Observer`` (close →
``on_closed`` callback: the floor of any inotify design) and a bare ``PollingObserver`` with the same interval
(close → first ``on_modified``/``on_created``; the service must then also see the size stay the same for
``stable_time``, OctoPrint's rule for complete files, so polling is bounded below by interval + stable_time).
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml
from watchdog.events import FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

from conftest import broker_process
from zevents import bus

BODY = b"G28\n" + b"G1 X10 Y10 E0.5 F1200\n" * 2000     # ~46 KB, a small sliced part
POLL_INTERVAL = 0.5
STABLE_TIME = 1.0
FILES = {"inotify": 200, "polling": 20}


@pytest.fixture(scope="module")
def node():
    with broker_process() as started:
        yield started


def percentile(values: list, q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def files_service(bus_config, directory: Path, polling: bool) -> tuple:
    data = directory / ("poll" if polling else "inotify")
    path = data / "config.yaml"
    data.mkdir()
    path.write_text(yaml.safe_dump({
        "bus": {"node": bus_config.node, "publish": bus_config.publish, "ingest": bus_config.ingest,
                "replay": bus_config.replay},
        "data_dir": str(data), "printer": {"commands": f"ipc://{directory}/p.sock"},
        "files": {"commands": f"ipc://{data}/f.sock", "poll_watched": polling, "poll_interval": POLL_INTERVAL,
                  "stable_time": STABLE_TIME, "analysis": {"run_at": "never"}}}))
    started = bus.Subscriber(bus_config, groups=["sys"])
    process = subprocess.Popen([sys.executable, "-m", "zevents", "files", "serve", "-c", str(path)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        envelope = started.recv(0.5)
        if envelope is not None and envelope.name == "ServiceStarted" and envelope.payload["service"] == "files":
            break
    started.close()
    return process, data / "watched"


def service_latencies(bus_config, watched: Path, count: int) -> list:
    subscriber = bus.Subscriber(bus_config, groups=["file"], events=["FileAdded"])
    latencies = []
    try:
        for i in range(count):
            with open(watched / f"f{i}.gcode", "wb") as handle:
                handle.write(BODY)
            closed = time.perf_counter()
            while True:
                envelope = subscriber.recv(60)
                assert envelope is not None, "no FileAdded within 60 s"
                if envelope.name == "FileAdded" and envelope.payload["path"] == f"f{i}.gcode":
                    latencies.append(time.perf_counter() - closed)
                    break
    finally:
        subscriber.close()
    return latencies


class _Seen(FileSystemEventHandler):
    def __init__(self, polling: bool):
        self.polling = polling
        self.seen = {}
        self.cond = threading.Condition()

    def _note(self, event):
        if not event.is_directory:
            with self.cond:
                self.seen.setdefault(event.src_path, time.perf_counter())
                self.cond.notify_all()

    def on_closed(self, event):
        if not self.polling:
            self._note(event)

    def on_created(self, event):
        if self.polling:
            self._note(event)


def watchdog_latencies(directory: Path, polling: bool, count: int) -> list:
    handler = _Seen(polling)
    observer = PollingObserver(timeout=POLL_INTERVAL) if polling else Observer()
    observer.schedule(handler, str(directory), recursive=True)
    observer.start()
    latencies = []
    try:
        for i in range(count):
            path = str(directory / f"b{i}.gcode")
            with open(path, "wb") as handle:
                handle.write(BODY)
            closed = time.perf_counter()
            with handler.cond:
                assert handler.cond.wait_for(lambda: path in handler.seen, 60)
                latencies.append(handler.seen[path] - closed)
    finally:
        observer.stop()
        observer.join(10)
    return latencies


@pytest.mark.parametrize("mode", ["inotify", "polling"])
def test_watched_folder_latency(benchmark, figures, node, mode):
    bus_config, _, _ = node
    polling = mode == "polling"
    directory = Path(tempfile.mkdtemp(prefix="zevf-"))
    process, watched = files_service(bus_config, directory, polling)
    baseline_dir = directory / "baseline"
    baseline_dir.mkdir()
    results = {}
    try:
        def round_():
            results["service"] = service_latencies(bus_config, watched, FILES[mode])
            results["baseline"] = watchdog_latencies(baseline_dir, polling, FILES[mode])

        benchmark.pedantic(round_, rounds=1, iterations=1)
    finally:
        process.terminate()
        process.wait(20)
    ours, base = results["service"], results["baseline"]
    label = "watchdog Observer close→on_closed" if not polling else \
        f"watchdog PollingObserver({POLL_INTERVAL:g} s) close→seen"
    suffix = "" if not polling else f" (interval {POLL_INTERVAL:g} s, stable {STABLE_TIME:g} s)"
    for name, q in (("p50", 0.5), ("p99", 0.99)):
        figures.add("files", f"close→FileAdded {name}, {mode}{suffix}", percentile(ours, q) * 1000, "ms",
                    percentile(base, q) * 1000, label)
    benchmark.extra_info.update({"p50_ms": statistics.median(ours) * 1000, "baseline_p50_ms":
                                 statistics.median(base) * 1000, "files": len(ours)})
