"""The G-code parser's rules, shared by both implementations: tables, limits, event and state types.

Everything both parsers must agree on lives here, so that the pure twin (``_pyparser``) and the compiled parser
(``_cparser``) read the same tables: which command fires which event, the default blocked commands, the line length
limit, the layer tolerance, the suppression messages, the firmware position-report grammar.  The compiled parser
copies the tables into C arrays when a ``Parser`` is built and calls the helpers here only on rare paths (a
suppressed command, an over-long line), never per line.

The grammar itself is documented in ``_pyparser`` (the twin is the specification).
"""
from __future__ import annotations

import logging
import math
import re
from dataclasses import dataclass

from zevents import events as _events

log = logging.getLogger("zevents.parser")

#: Binary G-code (Prusa .bgcode) starts with this magic; it is refused, never parsed as text.
BGCODE_MAGIC = b"GCDE"

#: A line is classified on its first MAX_LINE_BYTES bytes; the rest of an over-long line is counted and dropped,
#: which keeps memory flat on a stream without newlines.  Real G-code lines are far shorter (PrusaSlicer's config
#: comments reach ~2.7 kB).
MAX_LINE_BYTES = 65536

#: Two layer heights closer than this (mm) are the same layer: relative moves accumulate rounding noise.
LAYER_TOLERANCE = 1e-6

MM_PER_INCH = 25.4

#: G/M/T code numbers and tool numbers above this are not commands (and never overflow an int anywhere).
MAX_CODE = 999999
MAX_CODE_DIGITS = 6

GROUP = "gcode"

#: Sent commands that fire an event with an empty payload.  G28 (Home) also changes state, see the twin.
COMMAND_EVENTS = {
    ("M", 80): "PowerOn",
    ("M", 81): "PowerOff",
    ("G", 28): "Home",
    ("G", 4): "Dwell",
    ("M", 0): "Waiting",
    ("M", 1): "Waiting",
    ("M", 226): "Waiting",
    ("M", 245): "Cooling",
    ("M", 300): "Alert",
    ("M", 240): "Conveyor",
    ("M", 40): "Eject",
    ("M", 112): "EStop",
    ("M", 600): "FilamentChange",
    ("M", 701): "FilamentChange",
    ("M", 702): "FilamentChange",
}

EVENT_NAMES = sorted(set(COMMAND_EVENTS.values()) | {
    "ZChange", "LayerChanged", "ToolChange", "PositionUpdate", "CommandSuppressed", "InvalidToolReported"})
for _name in EVENT_NAMES:  # the catalogue is the authority on groups; fail at import if it disagrees
    if _events.group_of(_name) != GROUP:
        raise RuntimeError(f"catalogue puts parser event {_name} outside the {GROUP!r} group")

#: The compiled parser keeps the suppressed commands in a fixed C table.
MAX_SUPPRESSED = 256

DEFAULT_BLOCKED = ("M0", "M1")
DEFAULT_IGNORED = ()

#: Why a command is suppressed, and the CommandSuppressed severity of each reason.
BLOCKED = "blocked"
IGNORED = "ignored"
INVALID_TOOL = "invalid_tool"
SEVERITY = {BLOCKED: "warn", IGNORED: "info", INVALID_TOOL: "warn"}

#: Whitespace inside a line (a NUL is line noise from a reset board, treated as a blank).
LINE_SPACE = b" \t\x0b\x0c\x00"


class NotGcodeError(ValueError):
    """What was given to print or parse is not a text G-code file (binary, a directory, a FIFO, a device)."""


class BinaryGcodeError(NotGcodeError):
    """Binary G-code (.bgcode, magic ``GCDE``) was given where text G-code is expected."""

    def __init__(self, where: str = "stream"):
        super().__init__(f"{where} is binary G-code (.bgcode, starts with {BGCODE_MAGIC!r}); "
                         "only text G-code can be parsed: export plain .gcode from the slicer")


class Event:
    """One parser event: catalogue name, group, payload and where in the fed stream its line started.

    ``offset`` is the byte offset of the line's first byte in the stream given to ``feed_sent``/``feed_received``
    (each stream counts on its own), ``line`` the 1-based line number there.  Events from both implementations
    compare equal.
    """

    __slots__ = ("name", "group", "payload", "offset", "line")

    def __init__(self, name: str, payload: dict, offset: int, line: int, group: str = GROUP):
        self.name = name
        self.group = group
        self.payload = payload
        self.offset = offset
        self.line = line

    def __eq__(self, other):
        if not isinstance(other, Event):
            return NotImplemented
        return (self.name == other.name and self.group == other.group and self.offset == other.offset
                and self.line == other.line and self.payload == other.payload)

    __hash__ = None

    def __repr__(self):
        return f"Event({self.name!r}, {self.payload!r}, offset={self.offset}, line={self.line})"

    @property
    def topic(self) -> str:
        return f"{self.group}/{self.name}"

    def as_dict(self) -> dict:
        return {"name": self.name, "group": self.group, "payload": self.payload, "offset": self.offset,
                "line": self.line}


@dataclass(frozen=True)
class ParserState:
    """A snapshot of the tracked machine state (``parser.state``); positions in mm, feedrate in mm/min.

    None means unknown: axes before the first move that sets them and after a G28 that homes them (where a
    homed axis ends up depends on the printer).  ``filament`` is the net E travel (retracts subtract),
    ``extrusion_bbox`` (min x, min y, min z, max x, max y, max z) spans the extruding moves, ``print_time`` is a
    naive estimate in seconds (distance / feedrate, plus dwells; no acceleration).
    """

    x: float | None = None
    y: float | None = None
    z: float | None = None
    e: float = 0.0
    tool: int = 0
    feedrate: float | None = None
    relative: bool = False
    relative_e: bool = False
    units: str = "mm"
    layer: int = 0
    layer_z: float | None = None
    filament: float = 0.0
    extrusion_bbox: tuple | None = None
    print_time: float = 0.0
    invalid_tools: tuple = ()

    def as_dict(self) -> dict:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


# ---------------------------------------------------------------------------------------------- configuration

_CODE_RE = re.compile(r"\s*([GMTgmt])0*(\d{1,6})(?:\.(\d{1,6}))?\s*\Z")


def command_key(text: str) -> tuple:
    """``"M0"`` → ``("M", 0, -1)``, ``"g29.1"`` → ``("G", 29, 1)``: how the parser names a command."""
    match = _CODE_RE.match(text) if isinstance(text, str) else None
    if match is None:
        raise ValueError(f"not a G-code command name: {text!r} (expected a G, M or T code such as M0 or G29.1)")
    subcode = int(match.group(3)) if match.group(3) is not None else -1
    return (match.group(1).upper(), int(match.group(2)), subcode)


def command_name(key: tuple) -> str:
    letter, number, subcode = key
    return f"{letter}{number}" if subcode < 0 else f"{letter}{number}.{subcode}"


def suppression_table(config) -> dict:
    """{command key: BLOCKED or IGNORED} from a parser config (None, the ``parser`` section, or a whole zevents config)."""
    if config is None:
        config = {}
    if not isinstance(config, dict):
        raise ValueError(f"parser config must be a mapping or None, not {type(config).__name__}")
    if isinstance(config.get("parser"), dict):
        config = config["parser"]
    unknown = set(config) - {"blocked_commands", "ignored_commands"}
    if unknown:
        raise ValueError(f"unknown parser config keys: {', '.join(sorted(map(str, unknown)))} "
                         "(known: blocked_commands, ignored_commands)")
    table = {}
    for key, default, reason in (("ignored_commands", DEFAULT_IGNORED, IGNORED),
                                 ("blocked_commands", DEFAULT_BLOCKED, BLOCKED)):
        names = config.get(key, default)
        if names is None:
            names = ()
        if isinstance(names, str) or not isinstance(names, (list, tuple)):
            raise ValueError(f"parser.{key} must be a list of command names, not {names!r}")
        for name in names:
            try:
                table[command_key(name)] = reason  # blocked wins over ignored: it is applied last
            except ValueError as exc:
                raise ValueError(f"parser.{key}: {exc}") from None
    if len(table) > MAX_SUPPRESSED:
        raise ValueError(f"at most {MAX_SUPPRESSED} commands can be blocked or ignored, not {len(table)}")
    return table


def suppressed_payload(reason: str, key: tuple, text: bytes) -> dict:
    """The CommandSuppressed payload; ``text`` is the command as sent, without line number, checksum, comment."""
    if reason == BLOCKED:
        why = "it is configured as a blocked command"
    elif reason == IGNORED:
        why = "it is configured as an ignored command"
    else:
        why = f"the firmware reported tool {key[1]} as invalid"
    return {"command": text.decode("utf-8", "replace"),
            "message": f"Not sending {command_name(key)} to the printer, {why}", "severity": SEVERITY[reason]}


def small_int(digits: bytes) -> int | None:
    """The value of a run of ASCII digits, or None when it exceeds MAX_CODE (also guards int()'s digit limit)."""
    significant = digits.lstrip(b"0")
    if len(significant) > MAX_CODE_DIGITS:
        return None
    return int(significant) if significant else 0


def report_long_line(stream: str, offset: int, line: int, length: int) -> None:
    log.warning("%s line %d (byte %d) is %d bytes long; only its first %d bytes were parsed",
                stream, line, offset, length, MAX_LINE_BYTES)


def isfinite(value: float) -> bool:
    return math.isfinite(value)


# ------------------------------------------------------------------------------------- firmware position replies
#
# OctoPrint's M114 grammar (its regex_position, searched anywhere in the line) is phase A: every line it accepts
# gives the same numbers here.  Phase B adds what it rejects: a report with no E (a machine without extruder,
# Klipper before one is configured) and Smoothie's "C:" prefix, but only at the head of the line so that a
# probe report ("Bed X: 110.00 Y: 110.00 Z: 0.08") is not mistaken for a position.

# OctoPrint writes the number as [-+]?[0-9]*\.?[0-9]+: the same strings, but the digits before a missing dot can be
# split between its two runs in as many ways as there are digits, and a report without E (phase A fails, after
# trying every split of X, Y and Z) took time growing with the 4th power of their length: 20 s for one 494-byte
# line.  Written without that choice, a failing match costs time linear in the line.
_FLOAT = rb"[-+]?(?:[0-9]+(?:\.[0-9]+)?|\.[0-9]+)"
_POSITION_A = re.compile(
    rb"X:\s*(?P<x>%(f)s)\s*Y:\s*(?P<y>%(f)s)\s*Z:\s*(?P<z>%(f)s)\s*"
    rb"(?:(?:E:\s*(?P<e>%(f)s))|(?P<es>(?:E\d+:%(f)s\s*)+))" % {b"f": _FLOAT})
_E_ITEM = re.compile(rb"E(\d+):(%s)" % _FLOAT)
_E_TAIL = re.compile(rb"\s*E(\d+):(%s)" % _FLOAT)
_POSITION_B = re.compile(
    rb"\s*(?:ok\s+)?(?:(?:C|WCS):\s*)?X:\s*(?P<x>%(f)s)\s*Y:\s*(?P<y>%(f)s)\s*Z:\s*(?P<z>%(f)s)" % {b"f": _FLOAT})


def parse_position(line: bytes) -> dict | None:
    """Coordinates of an M114-style report: {"x", "y", "z", "e", "e0"…} (e None when only E0… are listed)."""
    if b"X:" not in line:
        return None
    match = _POSITION_A.search(line)
    if match is not None:
        result = {"x": float(match.group("x")), "y": float(match.group("y")), "z": float(match.group("z"))}
        if match.group("e") is not None:
            result["e"] = float(match.group("e"))
            pos = match.end()
            while True:  # RRF lists E0… after E: ("E:0.000 E0:0.0"); OctoPrint stops at E:, we keep them
                tail = _E_TAIL.match(line, pos)
                if tail is None:
                    break
                result["e" + tail.group(1).decode()] = float(tail.group(2))
                pos = tail.end()
        else:
            result["e"] = None
            for item in _E_ITEM.finditer(match.group("es")):
                result["e" + item.group(1).decode()] = float(item.group(2))
        return result
    match = _POSITION_B.match(line)
    if match is not None:
        return {"x": float(match.group("x")), "y": float(match.group("y")), "z": float(match.group("z")),
                "e": None}
    return None


_INVALID_TOOL = re.compile(rb"[ \t]*(?:echo:[ \t]*)?(?:[Tt](\d+)[ \t]+)?invalid extruder[ \t]*\Z", re.IGNORECASE)

#: parse_invalid_tool's answer when the firmware did not name the tool (Prusa prints it on the line before).
CURRENT_TOOL = -1


def parse_invalid_tool(line: bytes) -> int | None:
    """The tool of an "echo:T1 Invalid extruder" reply, CURRENT_TOOL for a bare "Invalid extruder", else None."""
    match = _INVALID_TOOL.match(line)
    if match is None:
        return None
    if match.group(1) is None:
        return CURRENT_TOOL
    return small_int(match.group(1))
