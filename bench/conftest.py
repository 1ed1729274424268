"""Benchmark helpers: a `figures` fixture that collects each benchmark's headline numbers (with the baseline
measured in the same run) and prints them as one table at the end of the session; `broker_process()`, a broker in
its own process (as in production) on ipc endpoints in a short temporary directory."""
from __future__ import annotations

import contextlib
import gc
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from zevents import bus
from zevents.config import BusConfig

_FIGURES: list = []


class Figures:
    def add(self, bench: str, name: str, value: float, unit: str, baseline: float | None = None,
            baseline_name: str = ""):
        ratio = (value / baseline) if baseline else None
        _FIGURES.append((bench, name, value, unit, baseline, baseline_name, ratio))


@pytest.fixture(scope="session", autouse=True)
def frozen_harness_heap():
    """pytest's own heap is not what a subscriber or publisher process carries, yet the measuring process (and
    every publisher forked from it) would walk it in each full garbage collection: a 10-20 ms pause charged to
    whatever path was being timed, ours or the baseline.  Frozen once, as zevents' services freeze their own."""
    gc.collect()
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture(scope="session", autouse=True)
def node_token():
    """The bench session plays the node: the brokers and services it starts share its token (as under `zevents
    run`), so services' sys/ events (ServiceStarted) are served."""
    return bus.make_node_token()


@pytest.fixture
def figures():
    return Figures()


def pytest_terminal_summary(terminalreporter):
    if not _FIGURES:
        return
    write = terminalreporter.write_line
    write("")
    write("zevents figures (each beside its baseline measured in the same run)")
    for bench, name, value, unit, baseline, baseline_name, ratio in _FIGURES:
        line = f"  {bench:<8} {name:<44} {value:>14,.2f} {unit}"
        if baseline is not None:
            line += f"   vs {baseline_name} {baseline:,.2f} {unit}  (ratio {ratio:.3f})"
        write(line)


@contextlib.contextmanager
def broker_process():
    """Yields (bus config, its directory, the broker's pid) once the broker answers a ping; stops it after."""
    directory = Path(tempfile.mkdtemp(prefix="zevb-"))
    config = BusConfig.for_dir(directory, node="bench", heartbeat=1.0)
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump({"bus": {"node": "bench", "publish": config.publish, "ingest": config.ingest,
                                            "replay": config.replay}}))
    broker = subprocess.Popen([sys.executable, "-m", "zevents", "broker", "-c", str(path)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    control = bus.Control(config)
    deadline = time.monotonic() + 20
    try:
        while True:
            try:
                control.ping(timeout=0.5)
                break
            except bus.BusError:
                if time.monotonic() > deadline or broker.poll() is not None:
                    raise
        yield config, directory, broker.pid
    finally:
        control.close()
        broker.terminate()
        broker.wait(10)
