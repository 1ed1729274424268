"""The compiled bus speedups (zevents/_speedups.pyx) against their Python twins in wire.py: same answers."""
from __future__ import annotations

import os
import struct

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from zevents import wire

speedups = wire.speedups
needs_compiled = pytest.mark.skipif(speedups is None, reason="compiled speedups not built or ZEVENTS_PUREPYTHON=1")
FUZZ = settings(max_examples=int(os.environ.get("ZEVENTS_FUZZ_EXAMPLES", "400")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


def test_the_compiled_speedups_loaded_unless_pure_python_is_forced():
    if wire.FORCED_PURE:
        assert speedups is None
    else:
        assert speedups is not None, "zevents._speedups did not load: run `pip install -e .` to build it"
        assert speedups.envelopes_by_slots(), "Envelope changed shape: update _speedups._set_up_envelope"


scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2 ** 63), 2 ** 64 - 1), st.floats(allow_nan=True), st.text(max_size=40),
    st.binary(max_size=300),
    st.builds(msgpack.Timestamp, st.integers(-(2 ** 40), 2 ** 40), st.integers(0, 999_999_999)),
    st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=20)),
)
keys = st.one_of(st.text(max_size=10), st.integers(-5, 5), st.none(), st.binary(max_size=4), st.booleans())
values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=6),
                                                       st.dictionaries(keys, inner, max_size=6)), max_leaves=30)
payloads = st.dictionaries(keys, values, max_size=8).map(lambda v: msgpack.packb(v, use_bin_type=True))
edits = st.lists(st.tuples(st.sampled_from(["set", "cut", "insert"]), st.integers(0, 10_000), st.integers(0, 255)),
                 max_size=3)


def mutate(data: bytes, operations) -> bytes:
    out = bytearray(data)
    for operation, where, byte in operations:
        where = where % (len(out) + 1)
        if operation == "set" and where < len(out):
            out[where] = byte
        elif operation == "cut":
            del out[where:]
        else:
            out.insert(where, byte)
    return bytes(out)


@needs_compiled
@FUZZ
@given(payload=payloads, operations=edits)
def test_payload_ok_agrees_with_unpack_on_valid_and_damaged_maps(payload, operations):
    data = mutate(payload, operations)
    assert speedups.payload_ok(data) is wire.payload_ok(data), data


@needs_compiled
@FUZZ
@given(data=st.binary(max_size=200))
def test_payload_ok_agrees_with_unpack_on_random_bytes(data):
    data = b"\x81" + data  # a map marker, so the walk is reached
    assert speedups.payload_ok(data) is wire.payload_ok(data)


def nested(depth: int, inner: bytes, container: bytes = b"\x91") -> bytes:
    return b"\x81\xa1k" + container * (depth - 1) + inner


CASES = {
    "empty map": b"\x80",
    "not a map": b"\x91\x01",
    "empty": b"",
    "extra data": b"\x80\x00",
    "truncated": b"\x82\xa1k\x01",
    "never-used byte 0xc1": b"\x81\xa1k\xc1",
    "int, nil, float, bin keys": b"\x84\x01\x02\xc0\x01\xca\x00\x00\x00\x00\x01\xc4\x01a\x01",
    "list as key": b"\x81\x91\x01\x01",
    "map as key": b"\x81\x80\x01",
    "empty list as key": b"\x81\x90\x01",
    "ext as key": b"\x81\xd4\x01\x00\x01",
    "timestamp as key": b"\x81\xd6\xff\x00\x00\x00\x01\x01",
    "reserved negative ext code": b"\x81\xa1k\xd4\xf9\x00",
    "timestamp of 5 bytes": b"\x81\xa1k\xc7\x05\xff\x00\x00\x00\x00\x00",
    "timestamp64 nanoseconds too big": b"\x81\xa1k\xd7\xff" + ((0x3FFFFFFF << 34) | 5).to_bytes(8, "big"),
    "timestamp64": b"\x81\xa1k\xd7\xff" + (5).to_bytes(8, "big"),
    "timestamp96 nanoseconds too big": b"\x81\xa1k\xc7\x0c\xff" + (10 ** 9).to_bytes(4, "big") + bytes(8),
    "timestamp96 negative seconds": b"\x81\xa1k\xc7\x0c\xff" + bytes(4) + (-5).to_bytes(8, "big", signed=True),
    "surrogate in str": b"\x81\xa1k\xa3\xed\xa0\x80",
    "overlong utf-8": b"\x81\xa1k\xa2\xc0\x80",
    "U+10FFFF": b"\x81\xa1k\xa4\xf4\x8f\xbf\xbf",
    "above U+10FFFF": b"\x81\xa1k\xa4\xf4\x90\x80\x80",
    "str 32 longer than the data": b"\x81\xa1k\xdb\xff\xff\xff\xff",
    "map 32 claiming 2**32-1 entries": b"\xdf\xff\xff\xff\xff",
    "1024 open containers": nested(1024, b"\xc0"),
    "an empty one inside 1024 open containers": nested(1024, b"\x90"),
    "1025 open containers": nested(1025, b"\xc0"),
    "1024 open maps": nested(1024, b"\xc0", b"\x81\xa1k"),
}


@needs_compiled
@pytest.mark.parametrize("case", CASES)
def test_payload_ok_edge_cases(case):
    data = CASES[case]
    assert speedups.payload_ok(data) is wire.payload_ok(data)


def test_the_edge_cases_cover_both_answers():
    answers = {name: wire.payload_ok(data) for name, data in CASES.items()}
    assert answers["1024 open containers"] and not answers["1025 open containers"]
    assert not answers["an empty one inside 1024 open containers"] and not answers["list as key"]
    assert answers["timestamp as key"] and not answers["reserved negative ext code"]


@needs_compiled
@given(seq=st.integers(0, 2 ** 64 - 1), ts=st.integers(0, 2 ** 64 - 1), prefix=st.binary(max_size=120))
def test_stamp_is_prefix_plus_seq_ts_tail(seq, ts, prefix):
    assert speedups.stamp(prefix, seq, ts) == prefix + wire.seq_ts_tail(seq, ts)


def _decoded(decoder, topic, header, payload):
    try:
        envelope = decoder.decode(topic, header, payload)
    except wire.WireError as exc:
        return ("WireError", str(exc))
    # The payload as bytes again: a NaN in it never equals itself.
    return (envelope.topic, envelope.group, envelope.name, envelope.node, envelope.printer, envelope.epoch,
            envelope.seq, envelope.ts, envelope.src, wire.pack(envelope.payload), envelope.replayed)


names = st.text(max_size=12)
stamped = st.builds(wire.encode_header, names, st.none() | names, st.integers(0, 2 ** 64 - 1), names,
                    st.integers(0, 2 ** 64 - 1), st.integers(0, 2 ** 64 - 1))
foreign = st.dictionaries(st.sampled_from(wire.HEADER_KEYS + ("extra",)), st.integers(0, 9) | names | st.none(),
                          max_size=9).map(wire.pack)


@needs_compiled
@FUZZ
@given(topic=st.sampled_from([b"gcode/ZChange", b"custom/Thing", b"\xff/x", b"sys"]) | st.binary(max_size=20),
       headers=st.lists(stamped | foreign, min_size=1, max_size=4), operations=edits,
       payload=payloads | st.binary(max_size=30))
def test_the_compiled_decoder_gives_the_python_decoders_answers(topic, headers, operations, payload):
    python, compiled = wire.PyDecoder(), speedups.Decoder()
    for header in headers + [mutate(headers[0], operations)] + headers:  # the cached paths too
        assert _decoded(compiled, topic, header, payload) == _decoded(python, topic, header, payload)
    assert compiled._prefixes.keys() == python._prefixes.keys()


def exact(value):
    """A value with its types spelled out (a float by its bits: NaN equals itself, 0.0 differs from -0.0)."""
    if isinstance(value, float):
        return ("float", struct.pack(">d", value))
    if isinstance(value, dict):
        return ("dict", [(exact(k), exact(v)) for k, v in value.items()])
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, [exact(v) for v in value])
    return (type(value).__name__, value)


def _unpacked(payload):
    try:
        return exact(wire.unpack_map(payload, "payload"))
    except wire.WireError as exc:
        return ("WireError", str(exc))


@needs_compiled
@FUZZ
@given(payload=payloads, operations=edits)
def test_the_fast_unpacker_builds_what_msgpack_builds_or_leaves_it_to_msgpack(payload, operations):
    data = mutate(payload, operations)
    handled, value = speedups.unpack_fast(data)
    if handled:
        assert exact(value) == _unpacked(data), data
    decoded = speedups.Decoder().decode(b"gcode/ZChange", wire.encode_header("n", None, 1, "s", 1, 1), data) \
        if wire.payload_ok(data) else None
    if decoded is not None:
        assert exact(decoded.payload) == _unpacked(data)


EVENT_PAYLOADS = {
    "ZChange": {"new": 0.4, "old": None},
    "every scalar the fast path builds": {"nil": None, "t": True, "f": False, "small": 5, "neg": -3,
                                          "u8": 200, "u16": 60000, "u32": 2 ** 31, "u64": 2 ** 64 - 1,
                                          "i8": -100, "i16": -30000, "i32": -2 ** 31, "i64": -2 ** 63,
                                          "f64": 1.5, "text": "résumé ✓", "long": "x" * 70000,
                                          "bin": b"\x00\xff", 7: "int key", "": "empty key"},
    "nested": {"position": {"x": 1.0, "y": [1, 2, {"z": [None]}]}, "list": list(range(20))},
    "a key longer than the cached ones": {"k" * 40: 1},
}


@needs_compiled
@pytest.mark.parametrize("case", EVENT_PAYLOADS)
def test_the_fast_unpacker_decodes_event_payloads_itself(case):
    data = wire.pack(EVENT_PAYLOADS[case])
    handled, value = speedups.unpack_fast(data)
    assert handled, "the fast unpacker left an ordinary event payload to msgpack"
    expected = wire.unpack(data)
    assert exact(value) == exact(expected)
    # msgpack interns str keys; so does the fast path (the same objects, not just equal ones).
    assert all(a is b for a, b in zip(value, expected) if isinstance(a, str))


LEFT_TO_MSGPACK = {
    "float32 NaN": b"\x81\xa1k\xca\x7f\xa0\x00\x01",
    "ext": b"\x81\xa1k\xd4\x01\x00",
    "timestamp": b"\x81\xa1k\xd6\xff\x00\x00\x00\x01",
    "invalid utf-8 key": b"\x81\xa1\xff\x01",
    "invalid utf-8 value": b"\x81\xa1k\xa1\xff",
    "extra data": b"\x80\x00",
    "list as key": b"\x81\x91\x01\x01",
    "33 nested lists": nested(34, b"\xc0"),
    "truncated float": b"\x81\xa1k\xcb\x00",
}


@needs_compiled
@pytest.mark.parametrize("case", LEFT_TO_MSGPACK)
def test_the_fast_unpacker_leaves_the_rare_forms_to_msgpack(case):
    assert speedups.unpack_fast(LEFT_TO_MSGPACK[case]) == (False, None)
