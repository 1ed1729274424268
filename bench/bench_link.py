"""Printer link: lines per second streamed to the virtual printer and CPU of the link per 1 000 lines, with the
parser on the path beside the same stream with the parser off, measured in the same run.

    pytest bench/bench_link.py --benchmark-only -s

The virtual printer runs as its own process (`zevents virtual-printer --speed 0`: every move is instant), so this
process's CPU time (``time.process_time``: the link's reader and writer threads; the main thread only waits) is the
link's.  The stream is a real sliced file (tests/data/printer, repeated to STREAM_LINES lines) pulled through a job
source, as a print does: with the parser, every line goes through ``parser.sent`` and every reply through
``parser.received``; without it, only ``classify_reply`` (which flow control needs) remains.  The parser's share
is measured two ways: the CPU difference of the two streams, and the parser alone fed the same sent lines and the
replies the printer gave, as a fraction of the link's CPU.  Issue 5's target: the parser costs < 5 % of the link.

Reading the two: the parser alone is the parser's cost.  The CPU difference of the streams also holds a scheduling
effect (a writer that is a little slower finds fewer lines ready per write, so it makes more system calls and
wake-ups per line) and, on a shared machine, noise of several percent either way; each figure is the least-CPU
stream of ROUNDS, alternating parser off and on.
"""
from __future__ import annotations

import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from zevents.parser import IMPLEMENTATION, Parser
from zevents.printer.link import PrinterLink, strip_line

DATA = Path(__file__).resolve().parent.parent / "tests" / "data" / "printer"
SOURCE_FILE = DATA / "sliced_cube20_prusaslicer250_mk3s_cut.gcode"
STREAM_LINES = 20_000
ROUNDS = 3              # each figure is the best (least CPU) of this many streams


class Source:
    """Lines of the file over and over, as a print job would hand them to the link."""

    src = "job"
    parse = True

    def __init__(self, lines: list, count: int, parse: bool):
        self.lines = lines
        self.count = count
        self.parse = parse
        self.index = 0

    def next_line(self):
        if self.index >= self.count:
            return None
        line = self.lines[self.index % len(self.lines)]
        self.index += 1
        return line


def stream_lines() -> list:
    lines = [raw.rstrip(b"\r\n").decode() for raw in SOURCE_FILE.read_bytes().splitlines()]
    # Heat-up waits and homing would measure the simulator; keep the motion and extrusion.
    return [line for line in lines if not line.startswith(("M190", "M109", "G28", "M104", "M140", "G4"))]


@pytest.fixture(scope="module")
def virtual_printer():
    process = subprocess.Popen([sys.executable, "-m", "zevents", "virtual-printer", "--speed", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    port = process.stdout.readline().strip()
    if not port.startswith("/dev/"):
        process.kill()
        pytest.skip(f"the virtual printer did not start (printed {port!r})")
    yield port
    process.terminate()
    process.wait(10)
    process.stdout.close()


def run_stream(port: str, parse: bool, lines: list) -> dict:
    """Connect, stream STREAM_LINES lines from a job source, return wall time, CPU time and the replies."""
    link = PrinterLink(port, 115200, emit=lambda name, payload, src: None, parser=parse, window=4, timeout=10.0)
    replies = []
    assert link.connect(), link.error
    try:
        link.capture_start()
        source = Source(lines, STREAM_LINES, parse)
        finished = threading.Event()
        link.listener.on_source_exhausted = lambda s: finished.set()
        cpu0, wall0 = time.process_time(), time.perf_counter()
        link.set_source(source)
        assert finished.wait(300), "the stream did not finish"
        assert link.wait_idle(60)
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        replies = link.capture_stop()
        stats = dict(link.stats)
    finally:
        link.disconnect(timeout=2.0)
    return {"wall": wall, "cpu": cpu, "replies": replies, "stats": stats}


def parser_alone(lines: list, replies: list) -> float:
    """CPU seconds the parser needs for the same sent lines and received replies."""
    parser = Parser(None)
    sent = [lines[i % len(lines)] for i in range(STREAM_LINES)]
    start = time.process_time()
    for line in sent:
        parser.sent(line)
    for line in replies:
        parser.received(line)
    return time.process_time() - start


def test_link_stream_parser_on_vs_off(benchmark, virtual_printer, figures):
    lines = stream_lines()
    run_stream(virtual_printer, True, lines)  # warm-up: pty, imports, caches
    results = {"on": [], "off": []}

    def measure():
        # Alternating, so that a busy moment of the machine hits both.
        results["off"].append(run_stream(virtual_printer, False, lines))
        results["on"].append(run_stream(virtual_printer, True, lines))

    benchmark.pedantic(measure, rounds=ROUNDS, iterations=1)
    on, off = (min(results[key], key=lambda r: r["cpu"]) for key in ("on", "off"))
    alone = parser_alone(lines, on["replies"])
    per_k_on = on["cpu"] / STREAM_LINES * 1000 * 1000     # ms of CPU per 1 000 lines
    per_k_off = off["cpu"] / STREAM_LINES * 1000 * 1000
    figures.add("link", "lines/s, parser on", STREAM_LINES / on["wall"], "lines/s",
                STREAM_LINES / off["wall"], "parser off")
    figures.add("link", "CPU ms per 1000 lines, parser on", per_k_on, "ms", per_k_off, "parser off")
    figures.add("link", f"parser alone ({IMPLEMENTATION}) share of link CPU", 100 * alone / on["cpu"], "%")
    figures.add("link", "parser share from the CPU difference", 100 * (on["cpu"] - off["cpu"]) / on["cpu"], "%")
    benchmark.extra_info.update({
        "lines": STREAM_LINES, "lines_per_s_on": STREAM_LINES / on["wall"], "lines_per_s_off": STREAM_LINES / off["wall"],
        "cpu_ms_per_1000_on": per_k_on, "cpu_ms_per_1000_off": per_k_off,
        "parser_alone_share": alone / on["cpu"], "implementation": IMPLEMENTATION,
        "resends": on["stats"].get("resend_requests", 0)})
    commands = sum(1 for i in range(STREAM_LINES) if strip_line(lines[i % len(lines)]))
    assert on["stats"]["lines_sent"] >= commands and off["stats"]["lines_sent"] >= commands
