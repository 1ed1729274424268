"""Differential fuzzing: random, G-code-shaped and mutated input gives the same events, state or error from the
pure twin and the compiled parser, in any chunking; no crash, no hang, no memory growth on arbitrary bytes."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zevents.parser import C_LOAD_ERROR, CParser, FORCED_PURE, BinaryGcodeError, PyParser

pytestmark = pytest.mark.skipif(FORCED_PURE, reason="ZEVENTS_PUREPYTHON=1: no compiled parser to compare with")

DATA = Path(__file__).resolve().parent / "data" / "parser"
FUZZ = settings(max_examples=int(os.environ.get("ZEVENTS_FUZZ_EXAMPLES", "250")), deadline=None,
                derandomize=os.environ.get("CI") == "true",
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
CONFIGS = [None, {"blocked_commands": ["G1", "T2", "g29.1"], "ignored_commands": ["M104", "G28"]},
           {"blocked_commands": []}]


@pytest.fixture(autouse=True)
def compiled_parser_present():
    if CParser is None:
        pytest.fail(f"the compiled parser did not load: {C_LOAD_ERROR}")


def run(parser_class, operations, config=None):
    """Apply (stream, data) operations; the outcome of each, the final state and the stream counters."""
    parser = parser_class(config)
    outcome = []
    for stream, data in operations:
        try:
            if stream == "sent":
                outcome.append(parser.feed_sent(data))
            elif stream == "received":
                outcome.append(parser.feed_received(data))
            elif stream == "line":
                outcome.append(parser.sent(data))
            elif stream == "reply":
                outcome.append(parser.received(data))
            else:
                outcome.append(parser.flush())
        except BinaryGcodeError as exc:
            outcome.append(("refused", str(exc)))
    outcome.append(parser.flush())
    return outcome, parser.state, parser.long_lines, parser.sent_lines, parser.sent_bytes, parser.received_lines


def assert_same(operations, config=None):
    expected = run(PyParser, operations, config)
    assert run(CParser, operations, config) == expected


def chunked(data: bytes, sizes: list) -> list:
    chunks = []
    start = 0
    for size in sizes:
        if start >= len(data):
            break
        chunks.append(data[start:start + size])
        start += size
    if start < len(data):
        chunks.append(data[start:])
    return chunks


# ------------------------------------------------------------------------------------------------ strategies

blank = st.sampled_from([b"", b" ", b"  ", b"\t", b"\x00", b" \x0b", b"\x0c"])
number = st.one_of(
    st.from_regex(rb"\A[+-]?[0-9]{0,6}(\.[0-9]{0,6})?\Z"),
    st.from_regex(rb"\A[+-]?[0-9]{0,30}(\.[0-9]{0,30})?\Z"),
    st.floats(allow_nan=False, allow_infinity=False, width=64).map(lambda value: repr(value).encode()),
    st.sampled_from([b"", b".", b"-", b"+.", b"1.2.3", b"--1", b"9" * 320, b"0.2", b"-.54", b"+0.5", b"1e5",
                     b"00000000000000000000001.5", b"9007199254740993", b"0." + b"0" * 25 + b"1"]),
)
letter = st.sampled_from(list(b"XYZEFPSIJTxyzefpsABN")).map(lambda code: bytes([code]))
parameter = st.tuples(letter, number, blank).map(lambda parts: parts[0] + parts[1] + parts[2])
command = st.one_of(
    st.sampled_from([b"G0", b"G1", b"G2", b"G3", b"G4", b"G20", b"G21", b"G28", b"G90", b"G91", b"G92", b"M82",
                     b"M83", b"M0", b"M1", b"M80", b"M104", b"M109", b"M117", b"M600", b"M702", b"M112", b"T0",
                     b"T1", b"T2", b"t3", b"g1", b"G01", b"G1.5", b"G29.1", b"G28_SAFE", b"SET_VELOCITY_LIMIT",
                     b"T", b"G", b"M999999", b"G1000000", b"T0000001", b";", b"(c)", b"N"]),
    st.tuples(st.sampled_from([b"G", b"M", b"T", b"g", b"m", b"t"]), st.from_regex(rb"\A[0-9]{1,8}\Z"),
              st.sampled_from([b"", b".1", b"._", b"_"])).map(b"".join),
)
suffix = st.sampled_from([b"", b" ; comment", b";", b"*71", b" (note) ", b" (unclosed Z9", b"\xff\xfe", b" \x00"])
line_number = st.one_of(st.just(b""), st.from_regex(rb"\A[Nn][0-9]{1,5} ?\Z"))
gcode_line = st.tuples(blank, line_number, st.sampled_from([b"", b"(c) "]), command, blank,
                       st.lists(parameter, max_size=6).map(b"".join), suffix).map(b"".join)
terminator = st.sampled_from([b"\n", b"\r\n", b"\r", b"\n\n"])
position_line = st.tuples(
    st.sampled_from([b"", b"ok ", b"ok C: ", b"C: ", b"C:", b"Bed ", b"  ", b"ok WCS: ", b"WCS:", b"MCS: ",
                     b"ok MCS: ", b"APOS: ", b"echo:", b"Count ", b"ok", b"okX", b"\tok\t"]),
    st.lists(st.tuples(st.sampled_from([b"X:", b"Y:", b"Z:", b"E:", b"E0:", b"E12:", b"A:", b"Count X:"]),
                       st.sampled_from([b"", b" ", b"  "]), number, st.sampled_from([b" ", b"", b"  "])),
             max_size=7).map(lambda items: b"".join(b"".join(item) for item in items)),
).map(b"".join)
space = st.sampled_from([b"", b" ", b"  ", b"\t"])
m114_line = st.tuples(
    st.sampled_from([b"", b"ok ", b"ok C: ", b"C: ", b"C:", b"Bed ", b" ", b"ok WCS: ", b"WCS:", b"MCS: ",
                     b"ok MCS: ", b"echo:", b"ok", b"\tok\t"]),
    st.tuples(st.just(b"X:"), space, number, space, st.just(b"Y:"), space, number, space, st.just(b"Z:"), space,
              number, space).map(b"".join),
    st.sampled_from([b"", b"E:", b"E: ", b"E0:", b"E:1 E0:", b"E1:2 E2:", b"E12:", b"E:  "]),
    number,
    st.sampled_from([b"", b" ", b" E3:4", b" Count X: 0 Y:10160 Z:116000", b" E0:1.5 Count 800", b" X:1 Y:2 Z:3 E:4"]),
).map(b"".join)
invalid_tool_line = st.tuples(st.sampled_from([b"", b"echo:", b" echo: ", b"ECHO:"]),
                              st.sampled_from([b"", b"T1 ", b"t3  ", b"T9999999 ", b"T2\t", b"T"]),
                              st.sampled_from([b"Invalid extruder", b"invalid EXTRUDER", b"Invalid extruder number !",
                                               b"Invalid extruder "])).map(b"".join)
# Numbers of hundreds of digits, with or without E (OctoPrint's number pattern took time growing with the 4th
# power of the digits when a report had no E: a 494-byte line stalled the link for 20 s).
long_number = st.from_regex(rb"\A[+-]?[0-9]{100,600}(\.[0-9]{0,400})?\Z")
long_position_line = st.tuples(
    st.sampled_from([b"", b"ok ", b"C: ", b"X:1 "]),
    st.tuples(st.just(b"X:"), long_number, space, st.just(b"Y:"), long_number, space, st.just(b"Z:"), long_number)
    .map(b"".join),
    st.sampled_from([b"", b" E:", b" E0:", b" Count X:", b" E"]),
    st.one_of(st.just(b""), long_number),
).map(b"".join)
reply_line = st.one_of(position_line, m114_line, long_position_line, invalid_tool_line, st.binary(max_size=80))


def stream_of(lines: list, terminators: list) -> bytes:
    return b"".join(line + terminators[index % len(terminators)] for index, line in enumerate(lines))


# --------------------------------------------------------------------------------------------------- the tests


@FUZZ
@given(lines=st.lists(gcode_line, max_size=40), terminators=st.lists(terminator, min_size=1, max_size=4),
       sizes=st.lists(st.integers(1, 64), max_size=20), config=st.sampled_from(CONFIGS))
def test_gcode_shaped_lines_in_any_chunking(lines, terminators, sizes, config):
    data = stream_of(lines, terminators)
    assert_same([("sent", chunk) for chunk in chunked(data, sizes)], config)
    assert_same([("sent", data)], config)


@FUZZ
@given(lines=st.lists(gcode_line, max_size=30), config=st.sampled_from(CONFIGS))
def test_gcode_lines_one_call_each(lines, config):
    assert_same([("line", line) for line in lines], config)


@FUZZ
@given(data=st.binary(max_size=600), sizes=st.lists(st.integers(1, 50), max_size=10))
def test_arbitrary_bytes(data, sizes):
    assert_same([("sent", chunk) for chunk in chunked(data, sizes)])
    assert_same([("received", chunk) for chunk in chunked(data, sizes)])


@FUZZ
@given(operations=st.lists(st.one_of(
    st.tuples(st.just("line"), gcode_line),
    st.tuples(st.just("reply"), reply_line),
    st.tuples(st.just("received"), st.lists(reply_line, max_size=4).map(lambda lines: b"\n".join(lines))),
    st.tuples(st.just("sent"), st.binary(max_size=40)),
    st.tuples(st.just("flush"), st.just(b"")),
), max_size=30))
def test_interleaved_commands_and_replies(operations):
    assert_same(operations)


@FUZZ
@given(lines=st.lists(st.one_of(position_line, m114_line), max_size=20))
def test_position_reports(lines):
    assert_same([("reply", line) for line in lines])


def corpus_lines() -> list:
    lines = []
    for path in sorted(DATA.glob("*.gcode")):
        lines += path.read_bytes().splitlines()[:400]
    return lines


CORPUS_LINES = corpus_lines()


@FUZZ
@given(picks=st.lists(st.integers(0, len(CORPUS_LINES) - 1), min_size=1, max_size=60),
       mutations=st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 10_000), st.binary(max_size=3)),
                          max_size=8),
       sizes=st.lists(st.integers(1, 300), max_size=8))
def test_mutated_real_gcode(picks, mutations, sizes):
    data = bytearray(b"\n".join(CORPUS_LINES[index] for index in picks))
    for position, length, replacement in mutations:
        if data:
            start = position % len(data)
            data[start:start + length % 4] = replacement
    data = bytes(data)
    assert_same([("sent", chunk) for chunk in chunked(data, sizes)])


# The compiled parser's fast path for "G1 " lines reads a number of up to 7 characters in one 8-byte word (when 16
# bytes of the buffer lie ahead) and applies the move without NaN and overflow checks while the state allows it:
# these cases aim at the edges of both.

SHORT_NUMBERS = [sign + body for sign in (b"", b"-", b"+") for body in (
    [b"1234567890"[:integer] + b"." + b"9876543210"[:fraction] for integer in range(10) for fraction in range(10)]
    + [b"1234567890"[:integer] for integer in range(10)]
    + [b"0", b"05", b"0.0", b"9999999", b"99999999", b"999999.9", b"0000001", b"00000001.5", b"1.2.3", b"..5"])]
AFTER_NUMBER = [b" ", b"\n", b"\r\n", b"\r", b";c", b"*12", b"(c) ", b"\xff", b"\x8a", b"\x89", b"/", b":", b"E1",
                b"x", b"\t", b"\x00", b"(", b".5"]


@pytest.mark.parametrize("after", AFTER_NUMBER)
def test_short_numbers_of_every_shape_in_the_fast_path(after):
    lines = [b"G1 X1 Y1 Z1 F600", b"G92 E0", b"M83"]
    for number in SHORT_NUMBERS:
        for letter in (b"X", b"y", b"Z", b"E", b"f"):
            lines.append(b"G1 " + letter + number + after + b" E.5")
            lines.append(b"G1 X3 Y4 " + letter + number + after)
        # "G1 X.. Y.. E..", nine lines in ten of sliced G-code, has a path of its own
        lines += [b"G1 X" + number + after + b" Y4 E.5", b"G1 X3 Y" + number + after + b" E.5",
                  b"G1 X3 Y4 E" + number + after]
    data = b"\n".join(lines) + b"\n"
    padded = data + b"; padding: every number of the lines above has 16 bytes of buffer after it\n"
    assert_same([("sent", data)])  # the last numbers lie within 16 bytes of the end: the byte-wise reader
    assert_same([("sent", padded)])
    assert_same([("line", line) for line in lines])


@pytest.mark.parametrize("terminator", [b"\n", b"\r\n", b"\r"])
def test_comment_lines_between_moves(terminator):
    """Comment lines inside a run of moves (the compiled run loop skips them itself): a CR inside one ends it, an
    over-long one is counted and reported by the general path, and a comment may end a buffer."""
    comments = [b";WIPE_START", b";", b"; a\rG1 Z7 ; the CR ended the comment", b";" + b"x" * 70_000,
                b";TYPE:Perimeter ; G1 Z9", b"; \xff\x00 invalid", b";" + b"y" * 200]
    lines = []
    for index, comment in enumerate(comments):
        lines += [b"G1 X%d Y1 E%d" % (index, index + 1), comment, b"G1 Z%d.5" % index]
    data = b"G1 X0 Y0 Z0.2 F600" + terminator + terminator.join(lines) + terminator
    for sizes in ([len(data)], [5, 70_000, 100], [len(data) - 1, 1]):
        operations = [("sent", chunk) for chunk in chunked(data, sizes)]
        assert_same(operations)
    assert run(CParser, [("sent", data)])[2] == 1  # the over-long comment, counted once


MODE_LINES = [b"G90", b"G91", b"M82", b"M83", b"G20", b"G21", b"G92 E0", b"G92 E" + b"9" * 308,
              b"G92 E-" + b"9" * 308, b"G92 X" + b"9" * 308, b"G1 X12345678 Y-1234567.8 E123456789012345",
              b"G92 X0 Y0 Z0", b"G28", b"G28 X", b"G1 F0", b"G1 F-100", b"G1 F1200", b"G4 S1", b"T1", b"M600"]
fast_number = st.one_of(
    st.from_regex(rb"\A-?[0-9]{0,3}\.[0-9]{1,5}\Z"),
    st.from_regex(rb"\A[+-]?[0-9]{1,7}\Z"),
    st.sampled_from([b"0", b"-0", b".5", b"5.", b"9999999", b"1234.5678", b"0.00000001", b"9" * 30]),
)
fast_move = st.tuples(
    st.sampled_from([b"G1 ", b"G0 "]),
    st.lists(st.tuples(st.sampled_from([b"X", b"Y", b"Z", b"E", b"F", b"x", b"e", b"S"]), fast_number),
             min_size=1, max_size=5).map(lambda items: b" ".join(letter + number for letter, number in items)),
    st.sampled_from([b"", b"", b"", b" ; c", b"*12", b" "]),
).map(b"".join)


usually = lambda common, *others: st.sampled_from([common] * 8 + list(others))  # noqa: E731
xye_move = st.tuples(st.just(b"G1 X"), fast_number, usually(b" Y", b" y", b"Y", b"  Y"), fast_number,
                     usually(b" E", b" e", b" F"), fast_number, usually(b"", b" ", b";", b" ; c", b"*12")).map(b"".join)


@FUZZ
@given(lines=st.lists(st.one_of(fast_move, xye_move, xye_move, st.sampled_from(MODE_LINES)), max_size=80),
       terminators=st.lists(terminator, min_size=1, max_size=3), sizes=st.lists(st.integers(1, 400), max_size=6))
def test_sliced_moves_under_changing_modes(lines, terminators, sizes):
    """Moves of sliced shape between mode changes that enter and leave the fast path's simple state (relative,
    inches, unknown axes after G28, feedrate 0 or negative, a huge E) give the same events and the same floats."""
    data = stream_of([b"G1 X10 Y10 Z0.2 F1200", b"G1 X11 Y10 E1"] + lines, terminators)
    data += b"; the fast paths read ahead: they leave the last 64 bytes of a buffer to the byte-wise path\n"
    assert_same([("sent", data)])
    assert_same([("sent", chunk) for chunk in chunked(data, sizes)])


@pytest.mark.parametrize("head", [b"GCDE", b"GCDE\x01\x00\x00\x00", b"GC", b"GCD\n", b"\nGCDE", b"GCDF"])
@pytest.mark.parametrize("sizes", [[1], [2], [3], [100]])
def test_bgcode_magic_in_any_chunking(head, sizes):
    data = head + b"G28\nM80\n"
    assert_same([("sent", chunk) for chunk in chunked(data, sizes * 20)])
    assert_same([("received", chunk) for chunk in chunked(data, sizes * 20)])


# ---------------------------------------------------------------------------------------------------- memory


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.fixture
def rss():
    if not os.path.exists("/proc/self/statm"):
        pytest.skip("needs /proc to read the resident set size")
    return rss_bytes


@pytest.mark.parametrize("implementation", ["c", "py"])
def test_memory_stays_flat_on_arbitrary_bytes(rss, implementation):
    import random

    parser_class = CParser if implementation == "c" else PyParser
    total = 64 << 20 if implementation == "c" else 8 << 20
    generator = random.Random(1234)
    noise = generator.randbytes(1 << 20)
    no_newline = noise.replace(b"\n", b"x").replace(b"\r", b"x")
    parser = parser_class()
    for warmup in range(2):
        parser.feed_sent(noise)
        parser.feed_received(no_newline)
    before = rss()
    fed = 0
    while fed < total:
        parser.feed_sent(noise)
        parser.feed_received(no_newline)  # one endless line: only its first 64 KiB are kept
        fed += 2 * len(noise)
    parser.flush()
    assert rss() - before < 16 << 20
    assert parser.received_lines == 1 and parser.long_lines >= 1


def test_memory_stays_flat_streaming_a_large_file(rss):
    """A few hundred MB of real G-code through the compiled parser in 1 MiB chunks: RSS does not follow."""
    excerpt = (DATA / "sliced_cube20_prusaslicer250_mk3s.lines1-700.gcode").read_bytes()
    chunk = excerpt * (1 + (1 << 20) // len(excerpt))
    parser = CParser()
    parser.feed_sent(chunk)
    before = rss()
    fed = 0
    while fed < 256 << 20:
        parser.feed_sent(chunk)
        fed += len(chunk)
    parser.flush()
    assert rss() - before < 16 << 20
    assert parser.sent_bytes > 256 << 20


@pytest.mark.parametrize("tail", [b"", b" E:" + b"4" * 500, b" E0:1", b" Count X:" + b"5" * 500])
def test_a_500_digit_position_reply_is_classified_at_once_by_both_implementations(tail):
    """Every reply is classified in time linear in its length: many 500-digit reports within a generous deadline
    (the old pattern took hours for one)."""
    import threading

    from zevents.parser import classify_reply

    line = b"X:" + b"1" * 500 + b" Y:" + b"2" * 500 + b".5 Z:" + b"3" * 500 + tail
    results = {}

    def classify():
        results["reply"] = [classify_reply(line) for _ in range(100)][-1]
        for name, parser_class in (("pure", PyParser), ("compiled", CParser)):
            results[name] = [parser_class(None).received(line) for _ in range(100)][-1]

    worker = threading.Thread(target=classify, daemon=True)
    worker.start()
    worker.join(60)
    assert not worker.is_alive(), "classifying 500-digit position replies did not finish within 60 s"
    reply = results["reply"]
    assert reply.kind == "position" and reply.position["x"] == float("1" * 500)
    assert reply.position["y"] == float("2" * 500 + ".5")
    events = [(e.name, e.payload) for e in results["pure"]]
    assert events == [(e.name, e.payload) for e in results["compiled"]]
    assert events[0][0] == "PositionUpdate" and events[0][1]["z"] == float("3" * 500)
