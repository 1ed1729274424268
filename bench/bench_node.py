"""Resource figures of a whole node (`zevents run`): idle CPU per minute and total RSS of all its processes,
then events/s and CPU during the demo print.  Read from /proc for the supervisor and every descendant.

Run: pytest bench/bench_node.py --benchmark-only -s   (ZEVENTS_BENCH_IDLE=60 for a full idle minute)
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path


from zevents import bus, config as zconfig

IDLE_SECONDS = float(os.environ.get("ZEVENTS_BENCH_IDLE", "20"))
TICKS = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


def tree(pid: int) -> list[int]:
    pids, frontier = [pid], [pid]
    while frontier:
        out = subprocess.run(["pgrep", "-P", ",".join(map(str, frontier))], capture_output=True, text=True).stdout
        frontier = [int(p) for p in out.split()]
        pids += frontier
    return pids


def cpu_seconds(pids) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])  # utime + stime
        except OSError:
            pass
    return total / TICKS


def rss_mb(pids) -> float:
    total = 0
    for pid in pids:
        try:
            total += int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE
        except OSError:
            pass
    return total / 1e6


class RunningNode:
    def __init__(self, *args):
        self.home = Path(tempfile.mkdtemp(prefix="zevn-"))
        runtime = self.home / "run"
        runtime.mkdir(mode=0o700)
        self.env = dict(os.environ, HOME=str(self.home), XDG_RUNTIME_DIR=str(runtime))
        self.env.pop("ZEVENTS_CONFIG", None)
        self.process = subprocess.Popen([sys.executable, "-m", "zevents", "run", "--quiet", *args], env=self.env,
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.environ.update(HOME=self.env["HOME"], XDG_RUNTIME_DIR=self.env["XDG_RUNTIME_DIR"])
        self.config = zconfig.load(text="")
        resolved = self.config.bus
        self.config.data["bus"].update(node=self.config.node, publish=resolved.publish, ingest=resolved.ingest,
                                       replay=resolved.replay)
        self.control = bus.Control(self.config.bus)
        deadline = time.monotonic() + 60
        while True:
            try:
                if self.control.status(timeout=1)["streams"].get("server"):
                    break  # Startup was published
            except bus.BusError:
                pass
            assert time.monotonic() < deadline and self.process.poll() is None, "the node did not start"
            time.sleep(0.2)

    def pids(self):
        return tree(self.process.pid)

    def stop(self):
        self.control.close()
        self.process.send_signal(signal.SIGTERM)
        self.process.wait(30)
        shutil.rmtree(self.home, ignore_errors=True)


def test_idle_node(benchmark, figures):
    node = RunningNode()
    try:
        time.sleep(3)  # let start-up work (imports, virtual printer boot) finish before measuring idle
        result = {}

        def measure():
            pids = node.pids()
            before = cpu_seconds(pids)
            time.sleep(IDLE_SECONDS)
            pids = node.pids()
            result["cpu"] = (cpu_seconds(pids) - before) / IDLE_SECONDS * 60
            result["rss"] = rss_mb(pids)
            result["processes"] = len(pids)

        benchmark.pedantic(measure, rounds=1, iterations=1)
        benchmark.extra_info.update(result)
        figures.add("node", f"idle CPU ({result['processes']} processes)", result["cpu"], "CPU-s/min")
        figures.add("node", "idle CPU share", result["cpu"] / 60 * 100, "% of one core")
        figures.add("node", "total RSS, all processes", result["rss"], "MB")
    finally:
        node.stop()


def test_demo_print(benchmark, figures):
    node = RunningNode("--demo")
    try:
        result = {}

        def measure():
            pids = node.pids()
            cpu_before = cpu_seconds(pids)
            start = time.monotonic()
            first = sum(node.control.status()["streams"].values())
            while True:
                status = node.control.status()
                if status["streams"].get("print", 0) and _done(node):
                    break
                assert time.monotonic() - start < 300, "the demo print did not finish"
                time.sleep(0.2)
            elapsed = time.monotonic() - start
            result["events"] = sum(status["streams"].values()) - first
            result["events_per_s"] = result["events"] / elapsed
            result["cpu_share"] = (cpu_seconds(node.pids()) - cpu_before) / elapsed * 100
            result["seconds"] = elapsed
            result["rss"] = rss_mb(node.pids())

        benchmark.pedantic(measure, rounds=1, iterations=1)
        benchmark.extra_info.update(result)
        figures.add("node", f"demo print: {result['events']} events in", result["seconds"], "s")
        figures.add("node", "demo print: events/s", result["events_per_s"], "events/s")
        figures.add("node", "demo print: CPU, all processes", result["cpu_share"], "% of one core")
        figures.add("node", "demo print: total RSS", result["rss"], "MB")
    finally:
        node.stop()


def _done(node) -> bool:
    from zevents import wire

    meta, frames = node.control.request(wire.CMD_REPLAY, {"group": "print", "since": 0})
    return any(frames[i] == b"print/PrintDone" for i in range(0, len(frames), 3))
