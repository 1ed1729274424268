"""The broker killed with SIGKILL during a paced 10 000 events/s stream and during a full-speed burst: published /
delivered / reported lost / silently lost / duplicates, and how long the run took beside the same run without
kills (the baseline, measured in the same session).  Real processes: ``zevents broker`` with its journal, a
publisher process, the subscriber here (tests/kill_harness.py).

Run: pytest bench/bench_bus_faults.py --benchmark-only -s
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import kill_harness  # noqa: E402

PACED = int(os.environ.get("ZEVENTS_BENCH_PACED_EVENTS", "50000"))     # 5 s at 10 000 events/s
BURST = int(os.environ.get("ZEVENTS_BENCH_BURST_EVENTS", "200000"))
KILLS = int(os.environ.get("ZEVENTS_BENCH_KILLS", "3"))


def _run(count, rate, kills):
    directory = Path(tempfile.mkdtemp(prefix="zevk-"))
    try:
        start = time.perf_counter()
        account = kill_harness.run(directory, count=count, rate=rate, kills=kills, timeout=300)
        account["seconds"] = time.perf_counter() - start
        return account
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _report(figures, benchmark, label, account, baseline):
    for key in ("published", "delivered", "reported_lost", "silently_lost", "duplicates", "out_of_order",
                "kills"):
        benchmark.extra_info[key] = account[key]
    figures.add("faults", f"{label}: published", account["published"], "events")
    figures.add("faults", f"{label}: delivered", account["delivered"], "events")
    figures.add("faults", f"{label}: reported lost", account["reported_lost"], "events")
    figures.add("faults", f"{label}: silently lost", account["silently_lost"], "events")
    figures.add("faults", f"{label}: duplicates", account["duplicates"], "events")
    figures.add("faults", f"{label}: run time with {account['kills']} kills", account["seconds"], "s",
                baseline["seconds"], "no kill")
    assert account["silently_lost"] == 0 and account["duplicates"] == 0, account


def test_kill_9_during_a_paced_10k_stream(benchmark, figures):
    baseline = _run(PACED, 10_000, 0)
    result = {}
    benchmark.pedantic(lambda: result.update(_run(PACED, 10_000, KILLS)), rounds=1, iterations=1)
    _report(figures, benchmark, "10k/s stream", result, baseline)


def test_kill_9_during_a_burst(benchmark, figures):
    baseline = _run(BURST, 0, 0)
    result = {}
    benchmark.pedantic(lambda: result.update(_run(BURST, 0, KILLS)), rounds=1, iterations=1)
    _report(figures, benchmark, "burst", result, baseline)
