"""The pure-Python G-code parser: the specification that the compiled parser (``_cparser``) must match exactly.

Streams
    ``feed_sent``/``feed_received`` take bytes in any chunking.  Lines end at LF, CR or CRLF (a CR at the end of
    a chunk followed by an LF at the start of the next is one terminator).  A partial last line is kept until its
    terminator arrives or ``flush()``.  Each stream counts its own byte offsets and 1-based line numbers; an
    event carries the offset and number of the line that caused it.  ``sent(line)`` is ``feed_sent`` of the line
    plus an LF when it has no terminator (so replaying a LF file line by line gives the same offsets).  A line is
    classified on its first ``MAX_LINE_BYTES`` bytes.  A stream whose first bytes are the ``.bgcode`` magic
    ``GCDE`` is refused with ``BinaryGcodeError`` (then and on every later call).

Sent lines
    Leading blanks (space, tab, VT, FF, NUL) are skipped, then a line number ``N<digits>`` and blanks, then any
    ``( … )`` comments.  The command word is ``G``, ``M`` or ``T`` (any case) with digits (leading zeros
    ignored, at most 999999) and an optional ``.subcode``; a word followed by ``_`` is a Klipper macro, not a
    command, and so is any other first word (``SET_VELOCITY_LIMIT``, ``;`` comments, text).  Only the first
    word is the command: ``M117 hello G28`` is text, ``M104 T1`` is a parameter.  A command with a subcode
    (``G29.1``) is a different command than the one without, so it fires nothing unless configured.
    Parameters (read for G0-G4, G28 and G92 only) are a letter (any case) directly followed by an optional
    number ``[+-]?(digits[.digits] | .digits)``; the last occurrence of a letter wins; ``;`` or ``*`` (the
    checksum) ends them, ``( … )`` is skipped, an unclosed ``(`` ends them too.

    Suppression first: a command listed in ``ignored_commands`` (severity info) or ``blocked_commands`` (warn,
    default M0 and M1), or a ``T<n>`` of a tool the firmware reported invalid, gives only CommandSuppressed and
    changes nothing: the caller must not send it.

    Machine state (positions in mm; G20 switches the input to inches, converted on the way in):
    G90/G91 absolute/relative X Y Z; M82/M83 absolute/relative E, and E is also relative under G91 (Marlin 1.x,
    Prusa and Klipper semantics).  G0-G3 move to X Y Z E (end point) and set the feedrate F; G92 sets positions
    without moving; G28 makes the homed axes (those named, else X Y Z) unknown, because where they end up
    depends on the printer.  A value that is not finite is ignored.  E starts at 0 (a fresh firmware's), the
    axes unknown, the tool 0.

    Events: the command table in ``_rules.COMMAND_EVENTS`` (payload empty); ToolChange {old, new} for ``T<n>``
    when n differs from the current tool; ZChange {new, old} for a move that sets a Z different from the known
    one (old None when unknown); LayerChanged {layer, z, old_z} for the first *extruding* move (E advances and
    X or Y moves) at a Z more than ``LAYER_TOLERANCE`` from the last layer's: z-hops, lifts and retracts never
    count.  ZChange comes before LayerChanged on the same line.

Received lines
    An M114 report (see ``_rules.parse_position``) gives PositionUpdate {x, y, z, e, t, f, e0…}, with t the
    current tool and f the current feedrate.  ``echo:T1 Invalid extruder`` gives InvalidToolReported {tool,
    fallback}: the tool is marked invalid (later ``T1`` are suppressed) and the current tool falls back to the
    one before the change (else 0).  Everything else is for ``classify_reply``.
"""
from __future__ import annotations

import math
import re

from zevents._parser import _rules
from zevents._parser._rules import BinaryGcodeError, Event, ParserState

IMPLEMENTATION = "py"

_MAX = _rules.MAX_LINE_BYTES
_TERMINATOR = re.compile(rb"\r\n?|\n")
_HEAD = re.compile(rb"[ \t\x0b\x0c\x00]*(?:[Nn][0-9]+[ \t\x0b\x0c\x00]*)?(?:\([^)]*\)[ \t\x0b\x0c\x00]*)*"
                   rb"([GMTgmt])([0-9]+)(?:\.([0-9]+))?")
_PARAM = re.compile(rb"(\([^)]*\))|(\(|[;*])|([A-Za-z])([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))?")
_PARAM_SIMPLE = re.compile(rb"([A-Za-z])([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))?")
_CUT = re.compile(rb"[;*(]")
_TEXT_END = re.compile(rb"[;*]")

_isfinite = math.isfinite
_sqrt = math.sqrt
_small_int = _rules.small_int
_INCH = _rules.MM_PER_INCH
_TOLERANCE = _rules.LAYER_TOLERANCE

_MOVE_CODES = frozenset((0, 1, 2, 3))


def _as_bytes(data) -> bytes:
    if isinstance(data, bytes):
        return data
    if isinstance(data, str):
        return data.encode("utf-8", "surrogateescape")
    if isinstance(data, (bytearray, memoryview)):
        return bytes(data)
    raise TypeError(f"expected bytes or str, not {type(data).__name__}")


def _scan_params(line: bytes, pos: int) -> dict:
    """{LETTER: float, or None for a letter without a number} from pos to the end of the parameters.

    The last occurrence of a letter decides; keys are the letters seen (G28 X homes X).
    """
    values = {}
    cut = _CUT.search(line, pos)
    if cut is None or cut.group() != b"(":
        # the common case, no ( … ) comment: every letter up to the first ; or *
        for letter, number in _PARAM_SIMPLE.findall(line, pos, cut.start() if cut is not None else len(line)):
            values[letter.upper()] = float(number) if number else None
    else:
        for match in _PARAM.finditer(line, pos):
            if match.group(1) is not None:  # a closed ( … ) comment
                continue
            if match.group(2) is not None:  # ; or * or an unclosed (
                break
            number = match.group(4)
            values[match.group(3).upper()] = float(number) if number is not None else None
    return values


class _Stream:
    __slots__ = ("name", "fed", "lines", "carry", "carry_len", "carry_offset", "pending_cr", "head", "refused")

    def __init__(self, name: str):
        self.name = name
        self.fed = 0  # bytes fed so far: the stream offset of the next chunk's first byte
        self.lines = 0  # complete lines so far
        self.carry = None  # the kept bytes of a partial line (None: no partial line)
        self.carry_len = 0  # its true length (bytes past MAX_LINE_BYTES are counted, not kept)
        self.carry_offset = 0
        self.pending_cr = False
        self.head = b""  # the stream's first bytes, until there are enough to rule out the bgcode magic
        self.refused = False


class Parser:
    """G-code sent to the printer and its replies → events, with the machine state tracked (pure Python)."""

    def __init__(self, config=None):
        self._suppressed = _rules.suppression_table(config)
        self._x = self._y = self._z = None
        self._e = 0.0
        self._tool = 0
        self._tool_before = 0
        self._feedrate = None
        self._relative = False
        self._relative_e = False
        self._inches = False
        self._layer = 0
        self._layer_z = None
        self._filament = 0.0
        self._bbox = None
        self._time = 0.0
        self._invalid_tools = set()
        self._sent_stream = _Stream("sent")
        self._received_stream = _Stream("received")
        self._events = []
        self.long_lines = 0

    # ------------------------------------------------------------------------------------------------ public

    def feed_sent(self, data) -> list:
        return self._feed(self._sent_stream, _as_bytes(data), self._sent_line)

    def feed_received(self, data) -> list:
        return self._feed(self._received_stream, _as_bytes(data), self._received_line)

    def sent(self, line) -> list:
        data = _as_bytes(line)
        if not data.endswith((b"\n", b"\r")):
            data += b"\n"
        return self._feed(self._sent_stream, data, self._sent_line)

    def received(self, line) -> list:
        data = _as_bytes(line)
        if not data.endswith((b"\n", b"\r")):
            data += b"\n"
        return self._feed(self._received_stream, data, self._received_line)

    def flush(self) -> list:
        """End both streams' partial last lines (sent first); returns their events."""
        events = self._events = []
        for stream, handler in ((self._sent_stream, self._sent_line),
                                (self._received_stream, self._received_line)):
            if stream.carry is not None:
                self._complete_carry(stream, b"", handler)
        return events

    @property
    def state(self) -> ParserState:
        return ParserState(
            x=self._x, y=self._y, z=self._z, e=self._e, tool=self._tool, feedrate=self._feedrate,
            relative=self._relative, relative_e=self._relative_e, units="in" if self._inches else "mm",
            layer=self._layer, layer_z=self._layer_z, filament=self._filament, extrusion_bbox=self._bbox,
            print_time=self._time, invalid_tools=tuple(sorted(self._invalid_tools)))

    @property
    def sent_lines(self) -> int:
        return self._sent_stream.lines

    @property
    def sent_bytes(self) -> int:
        return self._sent_stream.fed

    @property
    def received_lines(self) -> int:
        return self._received_stream.lines

    @property
    def received_bytes(self) -> int:
        return self._received_stream.fed

    # ---------------------------------------------------------------------------------------------- streams

    def _check_head(self, stream: _Stream, data: bytes) -> None:
        if stream.refused:
            raise BinaryGcodeError(f"the {stream.name} stream")
        if len(stream.head) < 4:
            stream.head += data[:4 - len(stream.head)]
            if stream.head == _rules.BGCODE_MAGIC:
                stream.refused = True
                raise BinaryGcodeError(f"the {stream.name} stream")

    def _complete_carry(self, stream: _Stream, tail: bytes, handler) -> None:
        line = stream.carry
        if len(line) < _MAX:
            line += tail[:_MAX - len(line)]
        length = stream.carry_len + len(tail)
        stream.carry = None
        stream.carry_len = 0
        stream.lines += 1
        if length > _MAX:
            self._long_line(stream, stream.carry_offset, length)
        handler(line, stream.carry_offset, stream.lines)

    def _feed(self, stream: _Stream, data: bytes, handler) -> list:
        events = self._events = []
        self._check_head(stream, data)
        n = len(data)
        base = stream.fed
        pos = 0
        if stream.pending_cr and n:
            stream.pending_cr = False
            if data[0] == 10:
                pos = 1
        if stream.carry is not None:
            match = _TERMINATOR.search(data, pos)
            if match is not None:
                self._complete_carry(stream, data[pos:match.start()], handler)
                pos = match.end()
                if pos == n and data[n - 1] == 13:
                    stream.pending_cr = True
            else:
                pos = self._keep_partial(stream, data, pos, base)
        if data.find(b"\r", pos) < 0:
            # no CR: LF-split, the fast path (same lines, offsets and numbers as the general loop below)
            pieces = data.split(b"\n") if pos == 0 else data[pos:].split(b"\n")
            partial = pieces.pop()
            offset = base + pos
            for piece in pieces:
                length = len(piece)
                stream.lines += 1
                if length > _MAX:
                    self._long_line(stream, offset, length)
                    piece = piece[:_MAX]
                handler(piece, offset, stream.lines)
                offset += length + 1
            pos = n - len(partial)
        else:
            for match in _TERMINATOR.finditer(data, pos):
                end = match.start()
                stream.lines += 1
                if end - pos > _MAX:
                    self._long_line(stream, base + pos, end - pos)
                handler(data[pos:min(end, pos + _MAX)], base + pos, stream.lines)
                pos = match.end()
                if pos == n and data[n - 1] == 13:
                    stream.pending_cr = True
        if pos < n:
            self._keep_partial(stream, data, pos, base)
        stream.fed = base + n
        return events

    @staticmethod
    def _keep_partial(stream: _Stream, data: bytes, pos: int, base: int) -> int:
        """Keep data[pos:] (no terminator in it) as the stream's partial line; returns len(data)."""
        n = len(data)
        if stream.carry is None:
            stream.carry = data[pos:pos + _MAX]
            stream.carry_len = n - pos
            stream.carry_offset = base + pos
        else:
            if len(stream.carry) < _MAX:
                stream.carry += data[pos:pos + _MAX - len(stream.carry)]
            stream.carry_len += n - pos
        return n

    def _long_line(self, stream: _Stream, offset: int, length: int) -> None:
        self.long_lines += 1
        _rules.report_long_line(stream.name, offset, stream.lines, length)

    # ------------------------------------------------------------------------------------------- sent lines

    def _emit(self, name: str, payload: dict, offset: int, line: int) -> None:
        self._events.append(Event(name, payload, offset, line))

    def _sent_line(self, line: bytes, offset: int, lineno: int) -> None:
        if not line or line[0] == 59:  # ";": a comment line, the most common line after moves
            return
        head = _HEAD.match(line)
        if head is None:
            return
        end = head.end()
        if line[end:end + 1] == b"_":
            return
        digits = head.group(2)
        number = int(digits) if len(digits) <= _rules.MAX_CODE_DIGITS else _small_int(digits)
        if number is None:
            return
        subcode = -1
        if head.group(3) is not None:
            subcode = _small_int(head.group(3))
            if subcode is None:
                return
        letter = head.group(1).upper().decode()
        key = (letter, number, subcode)
        reason = self._suppressed.get(key)
        if reason is None and letter == "T" and subcode < 0 and number in self._invalid_tools:
            reason = _rules.INVALID_TOOL
        if reason is not None:
            start = head.start(1)
            cut = _TEXT_END.search(line, start)
            text = line[start:cut.start() if cut else len(line)].rstrip(_rules.LINE_SPACE)
            self._emit("CommandSuppressed", _rules.suppressed_payload(reason, key, text), offset, lineno)
            return
        if subcode >= 0:
            return
        if letter == "G":
            if number in _MOVE_CODES:
                self._move(line, end, offset, lineno)
            elif number == 28:
                values = _scan_params(line, end)
                self._set_feedrate(values)
                homed = values.keys() & {b"X", b"Y", b"Z"} or {b"X", b"Y", b"Z"}
                if b"X" in homed:
                    self._x = None
                if b"Y" in homed:
                    self._y = None
                if b"Z" in homed:
                    self._z = None
                self._emit("Home", {}, offset, lineno)
            elif number == 4:
                values = _scan_params(line, end)
                seconds = values.get(b"S")
                if seconds is not None and _isfinite(seconds):
                    if seconds > 0:
                        self._time += seconds
                else:
                    millis = values.get(b"P")
                    if millis is not None and _isfinite(millis) and millis > 0:
                        self._time += millis / 1000.0
                self._emit("Dwell", {}, offset, lineno)
            elif number == 92:
                values = _scan_params(line, end)
                for letter_b, attr in ((b"X", "_x"), (b"Y", "_y"), (b"Z", "_z"), (b"E", "_e")):
                    value = values.get(letter_b)
                    if value is not None:
                        if self._inches:
                            value = value * _INCH
                        if _isfinite(value):
                            setattr(self, attr, value)
            elif number == 90:
                self._relative = False
            elif number == 91:
                self._relative = True
            elif number == 20:
                self._inches = True
            elif number == 21:
                self._inches = False
        elif letter == "M":
            if number == 82:
                self._relative_e = False
            elif number == 83:
                self._relative_e = True
            else:
                name = _rules.COMMAND_EVENTS.get(("M", number))
                if name is not None:
                    self._emit(name, {}, offset, lineno)
        else:  # T
            if number != self._tool:
                self._emit("ToolChange", {"old": self._tool, "new": number}, offset, lineno)
                self._tool_before = self._tool
                self._tool = number

    def _set_feedrate(self, values: dict) -> None:
        value = values.get(b"F")
        if value is not None:
            if self._inches:
                value = value * _INCH
            if _isfinite(value):
                self._feedrate = value

    def _axis(self, value, old):
        """The new coordinate of an axis given a (converted) parameter value, or old when it cannot apply."""
        if self._relative:
            if old is None:
                return None
            value = old + value
        return value if _isfinite(value) else old

    def _move(self, line: bytes, pos: int, offset: int, lineno: int) -> None:
        values = _scan_params(line, pos)
        inches = self._inches
        ox, oy, oz, oe = self._x, self._y, self._z, self._e
        nx, ny, nz = ox, oy, oz
        value = values.get(b"X")
        if value is not None:
            nx = self._axis(value * _INCH if inches else value, ox)
        value = values.get(b"Y")
        if value is not None:
            ny = self._axis(value * _INCH if inches else value, oy)
        value = values.get(b"Z")
        if value is not None:
            nz = self._axis(value * _INCH if inches else value, oz)
        de = 0.0
        value = values.get(b"E")
        if value is not None:
            if inches:
                value = value * _INCH
            if self._relative or self._relative_e:
                value = oe + value
            if _isfinite(value):
                self._e = value
                de = value - oe
                if not _isfinite(de):
                    de = 0.0
        self._set_feedrate(values)
        self._x, self._y, self._z = nx, ny, nz

        if nz is not None and (oz is None or nz != oz):
            self._emit("ZChange", {"new": nz, "old": oz}, offset, lineno)
        if de > 0.0 and ((nx is not None and (ox is None or nx != ox)) or (ny is not None and (oy is None or ny != oy))):
            if nx is not None and ny is not None and nz is not None:
                self._extend_bbox(nx, ny, nz)
                if ox is not None and oy is not None and oz is not None:
                    self._extend_bbox(ox, oy, oz)
            if nz is not None and (self._layer_z is None or abs(nz - self._layer_z) > _TOLERANCE):
                if self._layer_z is not None and nz < self._layer_z:
                    # Lower than the current layer: where it really is (a purge line at Z 0.4, 0.3, then 0.2
                    # before the first layer) or the next object of a sequential print, not a new layer.
                    self._layer_z = nz
                else:
                    self._layer += 1
                    self._emit("LayerChanged", {"layer": self._layer, "z": nz, "old_z": self._layer_z}, offset,
                               lineno)
                    self._layer_z = nz
        self._filament += de
        feedrate = self._feedrate
        if feedrate is not None and feedrate > 0.0:
            dx = nx - ox if nx is not None and ox is not None else 0.0
            dy = ny - oy if ny is not None and oy is not None else 0.0
            dz = nz - oz if nz is not None and oz is not None else 0.0
            distance = _sqrt(dx * dx + dy * dy + dz * dz)
            if distance == 0.0:
                distance = abs(de)
            self._time += distance * 60.0 / feedrate

    def _extend_bbox(self, x: float, y: float, z: float) -> None:
        box = self._bbox
        if box is None:
            self._bbox = (x, y, z, x, y, z)
            return
        lx, ly, lz, hx, hy, hz = box
        if x < lx:
            lx = x
        if y < ly:
            ly = y
        if z < lz:
            lz = z
        if x > hx:
            hx = x
        if y > hy:
            hy = y
        if z > hz:
            hz = z
        self._bbox = (lx, ly, lz, hx, hy, hz)

    # --------------------------------------------------------------------------------------- received lines

    def _received_line(self, line: bytes, offset: int, lineno: int) -> None:
        position = _rules.parse_position(line)
        if position is not None:
            payload = {"x": position["x"], "y": position["y"], "z": position["z"], "e": position["e"],
                       "t": self._tool, "f": self._feedrate}
            for key, value in position.items():
                if key not in payload:
                    payload[key] = value
            self._emit("PositionUpdate", payload, offset, lineno)
            return
        tool = _rules.parse_invalid_tool(line)
        if tool is None:
            return
        if tool == _rules.CURRENT_TOOL:
            tool = self._tool
        if self._tool != tool:
            fallback = self._tool
        elif self._tool_before != tool:
            fallback = self._tool_before
        else:
            fallback = 0
        self._invalid_tools.add(tool)
        self._tool = fallback
        self._emit("InvalidToolReported", {"tool": tool, "fallback": fallback}, offset, lineno)
