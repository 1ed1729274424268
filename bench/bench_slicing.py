"""The slicing service's overhead: `SLICE` → `SlicingDone` (slicer niced, G-code moved into storage through the files
service, events on the bus) against running the same slicer directly with the same argv, model and printer profile.
Target: ratio ≤ 1.05.  The model is PrusaSlicer's bunny (about 2 s of slicing), so the figure is about the work
around a real slice, not about process start-up.

Run: pytest bench/bench_slicing.py --benchmark-only -s
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import broker_process
from zevents import bus
from zevents.config import load
from zevents.printer.profiles import DEFAULT_PROFILE
from zevents.slicing import slicers
from zevents.slicing.service import SlicingClient, endpoint

MODEL = Path("/usr/share/PrusaSlicer/shapes/bunny.stl")
ROUNDS = 5


def _start(argv: list, bus_config, service: str) -> subprocess.Popen:
    from tests.conftest import start_service_process

    return start_service_process(argv, bus_config, service)


@pytest.fixture
def slicing_node():
    if not MODEL.is_file():
        pytest.skip(f"{MODEL} (Debian's prusa-slicer package) is not here")
    if not slicers.find("prusaslicer").available:
        pytest.skip("PrusaSlicer is not installed")
    with broker_process() as (bus_config, directory, _pid):
        config = directory / "node.yaml"
        config.write_text(yaml.safe_dump({
            "bus": {"node": bus_config.node, "publish": bus_config.publish, "ingest": bus_config.ingest,
                    "replay": bus_config.replay},
            "files": {"commands": f"ipc://{directory}/files.sock", "analysis": {"run_at": "never"}, "watch": False},
            "slicing": {"commands": f"ipc://{directory}/slicing.sock"},
            "printer": {"commands": f"ipc://{directory}/printer.sock"},
            "data_dir": str(directory / "data")}))
        processes = [_start([sys.executable, "-m", "zevents", "files", "serve", "-c", str(config)], bus_config,
                            "files"),
                     _start([sys.executable, "-m", "zevents", "slicing", "serve", "-c", str(config)], bus_config,
                            "slicing")]
        try:
            yield load(config), directory
        finally:
            for process in processes:
                process.terminate()
                process.wait(20)


def test_slicing_service_overhead(benchmark, figures, slicing_node):
    config, directory = slicing_node
    subprocess.run([sys.executable, "-m", "zevents", "files", "upload", str(MODEL), "-c",
                    str(directory / "node.yaml")], check=True, capture_output=True)
    slicer = slicers.find("prusaslicer", config)
    direct_argv, _ = slicers.command(slicer, str(MODEL), None, DEFAULT_PROFILE, str(directory / "direct.gcode"))

    def direct() -> float:
        started = time.perf_counter()
        subprocess.run(["nice", "-n", "10"] + direct_argv, check=True, capture_output=True)
        return time.perf_counter() - started

    client = SlicingClient(endpoint(config))
    subscriber = bus.Subscriber(config, groups=["slicing"])

    def through_service() -> float:
        started = time.perf_counter()
        reply = client.request("SLICE", {"model": "bunny.stl", "slicer": "prusaslicer", "dest": "bunny.gcode"},
                               timeout=60)
        while True:
            envelope = subscriber.recv(120)
            assert envelope is not None, "no outcome"
            if envelope.name in ("SlicingDone", "SlicingFailed") and envelope.payload["gcode"] == reply["gcode"]:
                assert envelope.name == "SlicingDone", envelope.payload
                return time.perf_counter() - started

    try:
        direct()                                      # warm the page cache for both
        service_times, direct_times = [], []

        def round_():
            # alternate, so a slower minute of the machine weighs on both alike
            direct_times.append(direct())
            service_times.append(through_service())

        benchmark.pedantic(round_, rounds=ROUNDS, iterations=1)
    finally:
        client.close()
        subscriber.close()
    service_median = statistics.median(service_times)
    direct_median = statistics.median(direct_times)
    benchmark.extra_info.update(service_s=service_median, direct_s=direct_median,
                                ratio=service_median / direct_median)
    figures.add("slicing", "bunny via the service (SLICE→SlicingDone, stored)", service_median, "s",
                direct_median, "prusa-slicer run directly")
