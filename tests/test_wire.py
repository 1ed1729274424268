"""The bytes: golden frames pin them, the documented example matches them, malformed frames are refused."""
import json
import re

import pytest

from conftest import DATA, REPO
from zevents import wire

GOLDEN = json.loads((DATA / "golden" / "frames.json").read_text())


def frames(name):
    return [bytes.fromhex(f) for f in GOLDEN[name]["frames"]]


@pytest.mark.parametrize("name", ["event_zchange", "event_printstarted"])
def test_published_event_bytes_are_pinned(name, decoder):
    topic, header, payload = frames(name)
    expected = GOLDEN[name]["decoded"]
    h = expected["header"]
    assert wire.encode_header(h["node"], h["printer"], h["epoch"], h["src"], h["seq"], h["ts"]) == header
    assert wire.pack(expected["payload"]) == payload
    assert wire.topic_bytes(expected["topic"].split("/")[1]) == topic
    envelope = decoder.decode(topic, header, payload)
    assert (envelope.topic, envelope.node, envelope.printer, envelope.epoch, envelope.src, envelope.seq,
            envelope.ts) == (expected["topic"], h["node"], h["printer"], h["epoch"], h["src"], h["seq"], h["ts"])
    assert envelope.payload == expected["payload"]
    assert wire.unpack(header) == h  # any msgpack decoder reads the fixed-width ints as plain integers


def test_ingest_and_control_bytes_are_pinned():
    (frame,) = frames("ingest_home")
    assert wire.ingest_frame(b"gcode/Home", wire.ingest_meta("user", "p1"), wire.pack({"x": 1})) == frame
    assert wire.split_ingest(frame) == (b"gcode/Home", wire.ingest_meta("user", "p1"), wire.pack({"x": 1}))
    d = GOLDEN["request_replay"]["decoded"]
    assert wire.request(wire.CMD_REPLAY, d["args"]) == frames("request_replay")
    d = GOLDEN["reply_ping"]["decoded"]
    assert wire.reply(True, d["meta"]) == frames("reply_ping")
    assert wire.parse_reply(frames("reply_ping")) == (True, d["meta"], [])


def test_protocol_document_example_is_the_golden_frame():
    text = (REPO / "PROTOCOL.md").read_text()
    block = text[text.index("frame 1: 67 63"):text.index("```", text.index("frame 1: 67 63"))]
    hexes = {}
    current = None
    for line in block.splitlines():
        match = re.match(r"frame (\d): (.*)", line)
        if match:
            current = int(match.group(1))
            hexes[current] = ""
            line = match.group(2)
        hexes[current] += "".join(re.findall(r"\b[0-9a-f]{2}\b", line.split('"')[0] if '"' in line else line))
    assert [hexes[1], hexes[2], hexes[3]] == GOLDEN["event_zchange"]["frames"]


DECODERS = [pytest.param(wire.PyDecoder, id="python"),
            pytest.param(getattr(wire.speedups, "Decoder", None), id="compiled",
                         marks=pytest.mark.skipif(wire.speedups is None, reason="compiled speedups not built"))]


@pytest.fixture(params=DECODERS)
def decoder(request):
    """Each decoder: the Python one (the spec) and its compiled twin."""
    return request.param()


def test_the_default_decoder_is_the_compiled_one_unless_pure_python_is_forced():
    assert wire.Decoder is (wire.PyDecoder if wire.speedups is None else wire.speedups.Decoder)


def test_decoder_reads_headers_from_other_encoders(decoder):
    header = wire.pack({"v": 1, "node": "x", "printer": None, "epoch": 9, "src": "c-client", "seq": 3, "ts": 4})
    envelope = decoder.decode(b"custom/Thing", header, wire.pack({"a": [1, 2]}))
    assert (envelope.name, envelope.group, envelope.seq, envelope.payload) == ("Thing", "custom", 3, {"a": [1, 2]})


def test_decoder_cache_does_not_confuse_streams(decoder):
    a = wire.encode_header("n", "p1", 1, "gcode", 1, 10)
    b = wire.encode_header("n", "p2", 1, "gcode", 2, 11)
    for _ in range(2):
        assert decoder.header(a) == ("n", "p1", 1, "gcode", 1, 10)
        assert decoder.header(b) == ("n", "p2", 1, "gcode", 2, 11)
        assert decoder.decode(b"gcode/Home", b, wire.pack({})).printer == "p2"
    # Broker-stamped headers are decoded through the cached prefix: one entry per stream, none per event.
    assert len(decoder._prefixes) == 2
    assert decoder.header(wire.encode_header("n", "p1", 1, "gcode", 99, 12)) == ("n", "p1", 1, "gcode", 99, 12)
    assert len(decoder._prefixes) == 2


@pytest.mark.parametrize("topic,header,payload", [
    (b"\xff\xfe/x", None, b"\x80"),
    (b"gcode/Home", b"\xc1", b"\x80"),
    (b"gcode/Home", None, b"\x93\x01\x02\x03"),
    (b"gcode/Home", None, b"not msgpack at all \xc1"),
    (b"gcode/Home", wire.pack({"v": 1}), b"\x80"),
])
def test_decode_refuses_malformed_frames(decoder, topic, header, payload):
    header = header if header is not None else wire.encode_header("n", None, 1, "x", 1, 1)
    with pytest.raises(wire.WireError):
        decoder.decode(topic, header, payload)


def test_split_topic():
    assert wire.split_topic(b"print/PrintDone") == ("print", "PrintDone")
    for bad in (b"PrintDone", b"nogroup/X", b"print/", b"\xff/x"):
        with pytest.raises(wire.WireError):
            wire.split_topic(bad)


def test_check_payload_limits_and_types():
    assert wire.check_payload(wire.pack({"a": 1}), 100) == {"a": 1}
    with pytest.raises(wire.WireError, match="exceeds"):
        wire.check_payload(wire.pack({"a": "x" * 200}), 100)
    with pytest.raises(wire.WireError, match="not a map"):
        wire.check_payload(wire.pack([1]), 100)
    with pytest.raises(wire.WireError, match="not msgpack"):
        wire.check_payload(b"\xc1", 100)


def test_pack_recovers_after_an_unpackable_value():
    with pytest.raises(TypeError):
        wire.pack({"a": object()})
    assert wire.unpack(wire.pack({"b": 2})) == {"b": 2}


@pytest.mark.parametrize("frame", [b"", b"\x05ab", b"\x02ab\x09x", b"\x00\x00\x80"])
def test_split_ingest_refuses_lengths_that_do_not_fit(frame):
    with pytest.raises(wire.WireError):
        wire.split_ingest(frame)
