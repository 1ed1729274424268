"""The wire format: the only module that knows the bytes of an event and of the control protocol (with its compiled
twin ``zevents/_speedups.pyx``, which must give the same answers: tests hold them side by side).

A published event is one ZeroMQ message of three frames (see PROTOCOL.md):

1. topic: UTF-8 ``<group>/<EventName>``
2. header: a msgpack map ``v, node, printer, epoch, src, seq, ts``.  ``epoch``, ``seq`` and ``ts`` are always
   encoded as msgpack uint64 (0xcf) so that the broker stamps a header by concatenating a cached prefix with 18
   bytes instead of re-packing a map for every event; any msgpack decoder reads them as plain integers.
3. payload: a msgpack map.

Publishers send the *ingest* form to the broker's PULL socket: one frame holding the topic, an ingest meta map
``{src, printer}`` and the payload, each of the first two behind a one-byte length.  One frame per event means the
broker never has to ask ZeroMQ where a message ends (that query costs as much as three receives in pyzmq), and a
malformed message can never run into its neighbour.  The broker, the single sequencer, turns the meta into the
full header.
"""
from __future__ import annotations

import os
import struct
import time

import msgpack

from zevents import events as _events

PROTOCOL_VERSION = 1
HEADER_KEYS = ("v", "node", "printer", "epoch", "src", "seq", "ts")
MAX_TOPIC = 256
HEARTBEAT_TOPIC = b"sys/Heartbeat"   # the broker's own event: every stream's last seq, once per interval

# Control protocol (DEALER/REQ → ROUTER): frame 0 is the command, frame 1 a msgpack map of arguments, then frames.
CMD_REPLAY = b"REPLAY"
CMD_SNAPSHOT = b"SNAPSHOT"
CMD_PUBLISH = b"PUBLISH"
CMD_STATUS = b"STATUS"
CMD_PING = b"PING"
CMD_ACK = b"ACK"            # a numbering publisher asks how far the broker has sequenced its events
COMMANDS = (CMD_REPLAY, CMD_SNAPSHOT, CMD_PUBLISH, CMD_STATUS, CMD_PING, CMD_ACK)
REPLY_OK = b"OK"
REPLY_ERR = b"ERR"

_UINT64 = b"\xcf"
# "seq" uint64, "ts" uint64: the tail the broker appends to a cached header prefix.
_SEQ_TS_TAIL = struct.Struct(">5sQ4sQ")
_SEQ_KEY = b"\xa3seq\xcf"
_TS_KEY = b"\xa2ts\xcf"


class WireError(ValueError):
    """Bytes that are not a valid zevents frame; the message says which frame and why."""


def now_us() -> int:
    return time.time_ns() // 1000


def _packer():
    return msgpack.Packer(use_bin_type=True, datetime=False)


_pack = _packer().pack


def pack(obj) -> bytes:
    """msgpack with str as str and bytes as bin, the encoding used for every map on the wire."""
    try:
        return _pack(obj)
    except (TypeError, ValueError, OverflowError):
        # The shared Packer keeps a partial buffer after a failure; a fresh one keeps the next call clean.
        globals()["_pack"] = _packer().pack
        raise


def unpack(data: bytes, _unpackb=msgpack.unpackb):
    return _unpackb(data, raw=False, strict_map_key=False)


def unpack_map(data: bytes, what: str, _unpackb=msgpack.unpackb) -> dict:
    """The msgpack map in a frame, or WireError naming the frame (``what``) and what is wrong with it."""
    try:
        value = _unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated types for bad input
        raise WireError(f"{what} is not msgpack ({exc.__class__.__name__})") from exc
    if not isinstance(value, dict):
        raise WireError(f"{what} is a {type(value).__name__}, not a map")
    return value


def topic_bytes(name: str) -> bytes:
    """The topic of an event name: its catalogue group, or ``custom`` for names outside the catalogue."""
    return _events.topic_of(name).encode()


def split_topic(topic: bytes | str) -> tuple[str, str]:
    if isinstance(topic, bytes):
        try:
            topic = topic.decode()
        except UnicodeDecodeError as exc:
            raise WireError("topic is not UTF-8") from exc
    group, sep, name = topic.partition("/")
    if not sep or not name or group not in _events.GROUPS:
        raise WireError(f"topic {topic[:80]!r} is not <group>/<Event> with a known group")
    return group, name


SYS_GROUP = "sys"
NODE_TOKEN_ENV = "ZEVENTS_NODE_TOKEN"   # the node's secret for its children: only they may publish sys/ events


def ingest_meta(src: str, printer: str | None, token: str | None = None) -> bytes:
    """The meta part of the ingest form: who caused the event and for which printer; ``token`` (the node's, for
    ``sys/`` events only) proves the event comes from the node or one of its services."""
    return pack({"src": src, "printer": printer} if token is None else {"src": src, "printer": printer,
                                                                         "token": token})


def _valid_streams(value) -> bool:
    return isinstance(value, dict) and all(
        isinstance(k, str) and type(v) is int and 0 <= v < 1 << 64 for k, v in value.items())


def _is_int(value) -> bool:
    return type(value) is int


def _is_number(value) -> bool:
    return type(value) in (int, float)


# What a subscriber may rely on in each sys/ event (the broker's and the node's own); anything else in them is
# counted as a bad frame and not acted upon, whoever managed to publish it.
SYS_PAYLOADS = {
    "Heartbeat": {"streams": _valid_streams, "epoch": _is_int, "uptime": _is_number, "interval": _is_number},
    "ServiceStarted": {"service": lambda v: isinstance(v, str), "pid": _is_int},
    "ServiceRestarted": {"service": lambda v: isinstance(v, str), "pid": lambda v: v is None or _is_int(v),
                         "restarts": _is_int, "returncode": lambda v: v is None or _is_int(v),
                         "backoff": _is_number},
    "ServiceFailed": {"service": lambda v: isinstance(v, str), "returncode": lambda v: v is None or _is_int(v),
                      "restarts": _is_int},
}


def sys_problem(name: str, payload: dict) -> str | None:
    """Why a sys/ event's payload cannot be trusted, or None."""
    rules = SYS_PAYLOADS.get(name)
    if rules is None:
        return f"sys/{name[:40]} is not a sys event"
    for key, ok in rules.items():
        if key in payload and not ok(payload[key]):
            return f"sys/{name}: {key} is malformed"
    if name == "Heartbeat" and "streams" not in payload:
        return "sys/Heartbeat without streams"
    return None


def ingest_head(topic: bytes, meta: bytes) -> bytes:
    """Everything of an ingest frame before the payload: len(topic), topic, len(meta), meta."""
    if not 0 < len(topic) <= 255 or len(meta) > 255:
        raise WireError("ingest topic must be 1..255 bytes and meta at most 255 bytes")
    return bytes((len(topic),)) + topic + bytes((len(meta),)) + meta


def ingest_frame(topic: bytes, meta: bytes, payload: bytes) -> bytes:
    return ingest_head(topic, meta) + payload


# A numbered ingest frame: 0x00 (no v1 frame starts with it: a topic is 1..255 bytes), the publisher's random
# 8-byte id, its 8-byte big-endian event number (1, 2, 3, ...), then a v1 ingest frame.  The broker sequences a
# publisher's numbers strictly in order, once each, and says with ACK how far it got: the publisher keeps what is
# not acknowledged and sends it again after a broker restart.
NUMBERED = 0x00
NUMBERED_HEAD = 17
NO_PUBLISHER = bytes(8)


def numbered_frame(publisher: bytes, number: int, frame: bytes) -> bytes:
    return b"\x00" + publisher + number.to_bytes(8, "big") + frame


def split_numbered(frame: bytes) -> tuple[bytes, int, bytes]:
    """(publisher id, number, v1 frame) of a numbered frame; WireError when it is too short."""
    if len(frame) <= NUMBERED_HEAD or frame[0] != NUMBERED:
        raise WireError(f"numbered ingest frame of {len(frame)} bytes is too short")
    return frame[1:9], int.from_bytes(frame[9:17], "big"), frame[17:]


def split_ingest(frame: bytes) -> tuple[bytes, bytes, bytes]:
    """(topic, meta, payload) of an ingest frame; WireError when the lengths don't fit."""
    try:
        topic_len = frame[0]
        meta_len = frame[topic_len + 1]
    except IndexError:
        raise WireError(f"ingest frame of {len(frame)} bytes is too short") from None
    end = topic_len + 2 + meta_len
    if topic_len == 0 or end > len(frame):
        raise WireError("ingest frame lengths do not fit the frame")
    return frame[1:topic_len + 1], frame[topic_len + 2:end], frame[end:]


def payload_ok(payload: bytes) -> bool:
    """Is ``payload`` a msgpack map that :func:`unpack` decodes?  The spec of ``_speedups.payload_ok``, which gives
    the same answer without building the objects."""
    if not payload or not (0x80 <= payload[0] <= 0x8f or payload[0] == 0xde or payload[0] == 0xdf):
        return False
    try:
        unpack(payload)
    except Exception:  # msgpack raises several unrelated types for bad input
        return False
    return True


def check_payload(data: bytes, max_size: int):
    """Validate a payload frame; returns the decoded map.  Raises WireError naming the problem."""
    if len(data) > max_size:
        raise WireError(f"payload of {len(data)} bytes exceeds the limit of {max_size}")
    return unpack_map(data, "payload")


class HeaderStamper:
    """Builds full headers for one broker epoch: a cached prefix per ingest meta, plus seq and ts."""

    def __init__(self, node: str, epoch: int, cache_size: int = 4096):
        self.node = node
        self.epoch = epoch
        self._prefixes: dict[bytes, tuple[bytes, str, str | None]] = {}
        self._cache_size = cache_size

    def prefix(self, meta: bytes) -> bytes:
        entry = self._prefixes.get(meta)
        if entry is None:
            entry = self._build(meta)
        return entry[0]

    def _build(self, meta: bytes):
        value = unpack_map(meta, "ingest meta")
        src = value.get("src", "")
        printer = value.get("printer")
        if not isinstance(src, str) or not (printer is None or isinstance(printer, str)):
            raise WireError("ingest meta: src must be a string and printer a string or nil")
        prefix = (
            b"\x87"
            + pack("v") + pack(PROTOCOL_VERSION)
            + pack("node") + pack(self.node)
            + pack("printer") + pack(printer)
            + pack("epoch") + _UINT64 + self.epoch.to_bytes(8, "big")
            + pack("src") + pack(src)
        )
        if len(self._prefixes) >= self._cache_size:
            self._prefixes.clear()
        entry = (prefix, src, printer)
        self._prefixes[meta] = entry
        return entry



def seq_ts_tail(seq: int, ts: int, _pack=_SEQ_TS_TAIL.pack) -> bytes:
    return _pack(_SEQ_KEY, seq, _TS_KEY, ts)


def encode_header(node: str, printer: str | None, epoch: int, src: str, seq: int, ts: int) -> bytes:
    """A full header, byte for byte what the broker stamps (used by tests, tools and replays)."""
    stamper = HeaderStamper(node, epoch)
    return stamper.prefix(ingest_meta(src, printer)) + seq_ts_tail(seq, ts)


class Envelope:
    """A decoded event as it travelled on the bus."""

    __slots__ = ("topic", "group", "name", "node", "printer", "epoch", "seq", "ts", "src", "payload", "replayed")

    def __init__(self, topic, group, name, node, printer, epoch, seq, ts, src, payload, replayed=False):
        self.topic = topic
        self.group = group
        self.name = name
        self.node = node
        self.printer = printer
        self.epoch = epoch
        self.seq = seq
        self.ts = ts
        self.src = src
        self.payload = payload
        self.replayed = replayed

    def to_dict(self) -> dict:
        """The JSON form used by ``zevents tail --json`` (payload made JSON-safe: see :func:`jsonable`)."""
        return {
            "topic": self.topic, "event": self.name, "group": self.group, "node": self.node,
            "printer": self.printer, "seq": self.seq, "epoch": self.epoch, "ts": self.ts, "src": self.src,
            "payload": jsonable(self.payload),
        }

    def __repr__(self):
        return f"<Envelope {self.topic} seq={self.seq} epoch={self.epoch} {self.payload!r}>"


def jsonable(value, depth: int = 0):
    """A payload as JSON can carry it: map keys as strings, bytes and other msgpack values as their repr.  A
    payload is anyone's, so printing it must never fail."""
    if isinstance(value, dict):
        if depth > 100:
            return "..."
        return {k if isinstance(k, str) else repr(k): jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list):
        if depth > 100:
            return "..."
        return [jsonable(v, depth + 1) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return repr(value)


class PyDecoder:
    """Decodes published events.  Headers stamped by a broker share a prefix per (node, printer, epoch, src), so
    the prefix is decoded once and cached; only the fixed 25-byte seq/ts tail is read per event.  Any other valid
    msgpack header still decodes through the generic path."""

    _TAIL = _SEQ_TS_TAIL.size

    def __init__(self, cache_size: int = 4096):
        self._prefixes: dict[bytes, tuple] = {}
        self._topics: dict[bytes, tuple] = {}
        self._cache_size = cache_size
        self._unpack_tail = _SEQ_TS_TAIL.unpack_from

    def _topic(self, topic: bytes) -> tuple:
        try:
            topic_str = topic.decode()
        except UnicodeDecodeError as exc:
            raise WireError("topic is not UTF-8") from exc
        group, _, name = topic_str.partition("/")
        if len(self._topics) >= self._cache_size:
            self._topics.clear()
        entry = self._topics[topic] = (topic_str, group, name)
        return entry

    def header(self, header: bytes) -> tuple:
        """(node, printer, epoch, src, seq, ts) of a header frame."""
        cut = len(header) - self._TAIL
        if cut > 0:
            fixed = self._prefixes.get(header[:cut])
            if fixed is not None:
                seq_key, seq, ts_key, ts = self._unpack_tail(header, cut)
                if seq_key == _SEQ_KEY and ts_key == _TS_KEY:
                    return fixed + (seq, ts)
        return self._generic_header(header, cut)

    def _generic_header(self, header: bytes, cut: int) -> tuple:
        head = unpack_map(header, "header")
        try:
            values = (head["node"], head["printer"], head["epoch"], head["src"], head["seq"], head["ts"])
        except KeyError as exc:
            raise WireError(f"header lacks {exc.args[0]!r}") from exc
        if cut > 0 and header[cut:cut + 5] == _SEQ_KEY and header[cut + 13:cut + 17] == _TS_KEY:
            if len(self._prefixes) >= self._cache_size:
                self._prefixes.clear()
            self._prefixes[header[:cut]] = values[:4]
        return values

    def decode(self, topic: bytes, header: bytes, payload: bytes, replayed: bool = False) -> Envelope:
        """Decode the three frames of a published event; raises WireError on anything malformed.
        ``_speedups.Decoder.decode`` is its compiled twin: change both together."""
        topic_str, group, name = self._topics.get(topic) or self._topic(topic)
        cut = len(header) - self._TAIL
        fixed = self._prefixes.get(header[:cut]) if cut > 0 else None
        if fixed is not None:
            seq_key, seq, ts_key, ts = self._unpack_tail(header, cut)
            if seq_key != _SEQ_KEY or ts_key != _TS_KEY:
                fixed = None
        if fixed is not None:
            node, printer, epoch, src = fixed
        else:
            node, printer, epoch, src, seq, ts = self._generic_header(header, cut)
        body = unpack_map(payload, "payload")
        return Envelope(topic_str, group, name, node, printer, epoch, seq, ts, src, body, replayed)


FORCED_PURE = os.environ.get("ZEVENTS_PUREPYTHON", "").strip().lower() in ("1", "true", "yes", "on")
try:
    # Compiled twins of this module's and the broker's hot paths; imported here, once Envelope exists.
    from zevents import _speedups as speedups
except ImportError:  # not built (no compiler at install time): the Python code above is complete on its own
    speedups = None
if FORCED_PURE:
    speedups = None


class CompiledUnavailable(RuntimeError):
    """``compiled=True`` was asked for, and the compiled twins are not built (or ZEVENTS_PUREPYTHON=1)."""


def use_compiled(compiled: bool | None, what: str) -> bool:
    """A ``compiled`` option resolved: None means "when built"; True when they are not is an error."""
    if compiled is None:
        return speedups is not None
    if compiled and speedups is None:
        raise CompiledUnavailable(f"the compiled {what} is not available (extension not built, or "
                                  "ZEVENTS_PUREPYTHON=1)")
    return bool(compiled)


# The compiled twin (same answers, same caches, the uncommon paths delegated to PyDecoder) unless pure Python.
Decoder = speedups.Decoder if speedups is not None else PyDecoder
_default_decoder = Decoder()


def decode(topic: bytes, header: bytes, payload: bytes) -> Envelope:
    return _default_decoder.decode(topic, header, payload)


# --- control protocol -------------------------------------------------------------------------------------------

def request(command: bytes, args: dict | None = None, frames: tuple = ()) -> list:
    return [command, pack(args or {}), *frames]


def reply(ok: bool, meta: dict, frames: list | tuple = ()) -> list:
    return [REPLY_OK if ok else REPLY_ERR, pack(meta), *frames]


def parse_reply(frames: list) -> tuple[bool, dict, list]:
    if len(frames) < 2 or frames[0] not in (REPLY_OK, REPLY_ERR):
        raise WireError("malformed control reply")
    meta = unpack(frames[1])
    if not isinstance(meta, dict):
        raise WireError("control reply meta is not a map")
    return frames[0] == REPLY_OK, meta, frames[2:]
