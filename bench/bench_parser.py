"""G-code parser speed on the 26 MB bunny (PrusaSlicer 2.5, 961 k lines), each figure beside a baseline measured in
the same run: ``bytes.count(b"\\n")`` (the floor: touching every byte once) and the pure-Python twin.

Targets (issue 3): feed_sent on the whole buffer >= 30 M lines/s and >= 15x the twin; one sent() call per line
>= 4 M lines/s; memory flat however large the stream (1 GB through it in 1 MiB chunks).  Two files from other
slicers (CuraEngine: F on every move; CrealityPrint: absolute E, CRLF) show that the speed is not the bunny's
alone; they have no target.

Run: pytest bench/bench_parser.py --benchmark-only
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from zevents.parser import C_LOAD_ERROR, CParser, PyParser

SHARED = Path(os.environ.get("ZEVENTS_SHARED", Path(__file__).resolve().parents[2] / "shared"))
BUNNY = SHARED / "corpus" / "sliced_bunny_prusaslicer250_mk3s.gcode"
STREAM_BYTES = int(os.environ.get("ZEVENTS_BENCH_STREAM_BYTES", str(1 << 30)))


@pytest.fixture(scope="module")
def bunny() -> bytes:
    if not BUNNY.exists():
        pytest.skip(f"{BUNNY} is not here (../shared is only beside the developers' clone)")
    if CParser is None:
        pytest.fail(f"the compiled parser did not load: {C_LOAD_ERROR}")
    return BUNNY.read_bytes()


@pytest.fixture(scope="module")
def lines(bunny) -> int:
    return bunny.count(b"\n")


@pytest.fixture(scope="module")
def count_rate(bunny, lines) -> float:
    """The baseline: lines/s of bytes.count over the same buffer, best of 20."""
    best = min(_timed(lambda: bunny.count(b"\n")) for _ in range(20))
    return lines / best


def _timed(function) -> float:
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def _feed_whole(parser_class, data: bytes) -> list:
    parser = parser_class()
    return parser.feed_sent(data) + parser.flush()


def test_line_count_baseline(benchmark, bunny, lines, figures):
    benchmark(bunny.count, b"\n")
    figures.add("parser", "bytes.count(b'\\n') (baseline)", lines / benchmark.stats.stats.min / 1e6, "M lines/s")


def test_feed_sent_compiled(benchmark, bunny, lines, count_rate, figures):
    events = benchmark.pedantic(_feed_whole, args=(CParser, bunny), rounds=10, iterations=1, warmup_rounds=1)
    assert len(events) > 10_000
    rate = lines / benchmark.stats.stats.min
    benchmark.extra_info["M lines/s"] = rate / 1e6
    figures.add("parser", "feed_sent whole buffer, compiled", rate / 1e6, "M lines/s", count_rate / 1e6,
                "bytes.count")


@pytest.mark.parametrize("name,label", [("sliced_bunny_curaengine413_ender3.gcode", "CuraEngine bunny"),
                                        ("creality_k1max_scraper_crealityprint4376_crlf.gcode", "CrealityPrint")])
def test_feed_sent_compiled_other_slicers(benchmark, name, label, figures):
    path = SHARED / "corpus" / name
    if not path.exists():
        pytest.skip(f"{path} is not here (../shared is only beside the developers' clone)")
    if CParser is None:
        pytest.fail(f"the compiled parser did not load: {C_LOAD_ERROR}")
    data = path.read_bytes()
    count = data.count(b"\n")
    count_rate = count / min(_timed(lambda: data.count(b"\n")) for _ in range(20))
    events = benchmark.pedantic(_feed_whole, args=(CParser, data), rounds=10, iterations=1, warmup_rounds=1)
    assert len(events) > 100
    figures.add("parser", f"feed_sent whole buffer, compiled, {label}",
                count / benchmark.stats.stats.min / 1e6, "M lines/s", count_rate / 1e6, "bytes.count")


def test_feed_sent_twin_and_ratio(benchmark, bunny, lines, figures):
    events = benchmark.pedantic(_feed_whole, args=(PyParser, bunny), rounds=1, iterations=1)
    twin_rate = lines / benchmark.stats.stats.min
    compiled_rate = lines / min(_timed(lambda: _feed_whole(CParser, bunny)) for _ in range(5))
    assert events == _feed_whole(CParser, bunny)
    figures.add("parser", "feed_sent whole buffer, pure twin", twin_rate / 1e6, "M lines/s")
    figures.add("parser", "compiled / twin (target >= 15)", compiled_rate / twin_rate, "x")


def test_sent_one_call_per_line_compiled(benchmark, bunny, lines, count_rate, figures):
    commands = bunny.split(b"\n")

    def one_call_each():
        parser = CParser()
        sent = parser.sent
        for command in commands:
            sent(command)
        return parser

    parser = benchmark.pedantic(one_call_each, rounds=5, iterations=1, warmup_rounds=1)
    assert parser.state.layer > 500
    rate = len(commands) / benchmark.stats.stats.min
    figures.add("parser", "sent() one call per line, compiled (>= 4)", rate / 1e6, "M lines/s", count_rate / 1e6,
                "bytes.count")


def test_stream_a_gigabyte_with_flat_memory(benchmark, bunny, figures):
    if not os.path.exists("/proc/self/statm"):
        pytest.skip("needs /proc to read the resident set size")
    chunk_size = 1 << 20
    chunks = [bunny[start:start + chunk_size] for start in range(0, len(bunny), chunk_size)]

    def rss() -> int:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def stream():
        parser = CParser()
        fed = 0
        peak = before = rss()
        while fed < STREAM_BYTES:
            for chunk in chunks:
                parser.feed_sent(chunk)  # events are dropped as a consumer would
                fed += len(chunk)
            peak = max(peak, rss())
        parser.flush()
        return fed, peak - before, parser.sent_lines

    fed, growth, streamed_lines = benchmark.pedantic(stream, rounds=1, iterations=1)
    assert growth < 32 << 20, f"RSS grew by {growth / 1e6:.1f} MB while streaming"
    figures.add("parser", f"stream {fed / 1e9:.2f} GB in 1 MiB chunks, compiled",
                streamed_lines / benchmark.stats.stats.min / 1e6, "M lines/s")
    figures.add("parser", "  RSS growth while streaming it", growth / 1e6, "MB")
