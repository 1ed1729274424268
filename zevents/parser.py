"""The G-code parser's public API: ``Parser``, ``Event``, ``classify_reply`` / ``Reply``, ``IMPLEMENTATION``.

``Parser`` is the compiled implementation (``zevents._parser._cparser``) unless ``ZEVENTS_PUREPYTHON=1`` or it is
not built; both give equal events and state (see ``zevents._parser._pyparser`` for the full grammar)::

    p = Parser(config={"blocked_commands": ["M0", "M1"], "ignored_commands": []})
    p.feed_sent(chunk)      # any chunking; the partial last line waits for the next chunk or p.flush()
    p.sent("G1 Z0.2")       # one line; a CommandSuppressed event means: do NOT send it to the printer
    p.received("X:10.00 Y:20.00 Z:0.20 E:0.00 Count X:800 Y:1600 Z:80")   # → PositionUpdate
    p.state.z, p.state.layer

Replies
-------
``classify_reply(line)`` is stateless: it tells the printer link what one firmware line means, for every
firmware format in ``shared/spec/firmware-responses.txt`` (Marlin, Prusa, Klipper, RepRapFirmware, Smoothieware,
Repetier, Teacup).  A :class:`Reply` has one ``kind`` and the fields that kind fills (the others are None):

========================  ==========================================================================================
kind                      fields
========================  ==========================================================================================
``ok``                    ``line_number`` (Marlin ``ok N123 P15 B3``, Repetier ``ok 123``), ``advanced`` {"planner",
                          "buffer"} from ADVANCED_OK, ``message`` (Klipper's ``ok <msg>``)
``temperature``           ``temperatures`` {"T0": (actual, target|None), "T1": …, "B": …, "C": …}; a lone ``T:``
                          is T0; with ``ok`` when it acknowledges an M105
``position``              ``position`` {"x", "y", "z", "e", "e0"…} of an M114 report (``ok`` set when prefixed)
``resend``                ``resend_line``: Marlin/Prusa ``Resend: N``, Repetier ``Resend:N``, Smoothie/Teacup ``rs
                          N…``, ``Resend: N:23``, ``rs 23``
``skip``                  ``line_number``: Repetier skipped a line it already had
``error``                 ``error_kind``: ``resend`` (line number/checksum: a Resend follows), ``fatal`` (halted,
                          kill, thermal runaway, MINTEMP/MAXTEMP, Smoothie's bare ``!!`` and Alarm lock, Klipper
                          shutdowns: the printer stopped), ``command`` (unknown command, must home, out of range:
                          the printer goes on), ``other``; ``message`` the text after the prefix
``busy``                  ``message``: the reason (``processing``, ``paused for user``, ``heating``)
``wait``, ``start``       nothing more (``start`` also for Smoothie's greeting: the board was (re)connected)
``firmware``              ``firmware`` {key: value} of M115 (``FIRMWARE_NAME`` …, keys as sent, RRF's ``KEY: value``
                          spacing and Smoothie's commas handled), or {"area": …} for Marlin's area report
``capability``            ``capability`` (name, bool) from ``Cap:NAME:1``
``action``                ``action`` (``pause``, ``resume``, ``cancel``, …) and ``action_params`` from ``//action:``
``sd``                    ``sd``: {"printed", "total"}, {"printing": False}, {"done": True}, {"list": "begin"|"end"},
                          {"file", "size", "long_name"}, {"opened", "size"}, {"selected": True}, {"card": bool},
                          {"writing": name}, {"saved": True}
``invalid_tool``          ``tool`` (None when the firmware did not name it)
``probe``                 ``probe`` {"x", "y", "z"} of a G30/G29 ``Bed X: … Z:`` report (not a position)
``echo``                  ``message``: ``echo:`` text or Klipper's ``// `` info
``unknown``               ``message``: anything else
========================  ==========================================================================================

``ok`` is True whenever the line acknowledges a command, whatever its kind (``ok T:…``, ``ok C: X:…``, ``ok
<msg>``).  ``line`` is the decoded line, ``message`` the meaningful text.
"""
from __future__ import annotations

import errno
import os
import re
import stat
from dataclasses import dataclass, field

from zevents._parser import C_LOAD_ERROR, CParser, FORCED_PURE, IMPLEMENTATION, Parser, PyParser
from zevents._parser import _rules
from zevents._parser._rules import BGCODE_MAGIC, BinaryGcodeError, Event, NotGcodeError, ParserState

__all__ = ["Parser", "Event", "Reply", "classify_reply", "IMPLEMENTATION", "BinaryGcodeError", "ParserState",
           "NotGcodeError", "open_gcode", "check_gcode_file", "describe_file_error",
           "PyParser", "CParser", "FORCED_PURE", "C_LOAD_ERROR", "REPLY_KINDS"]

#: How much of a file's start is looked at for binary content (a text G-code file has no NUL byte there).
SNIFF_BYTES = 64 * 1024
_ELF_MAGIC = b"\x7fELF"
_FILE_KINDS = ((stat.S_ISFIFO, "a named pipe (FIFO)"),
               (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def open_gcode(path: str):
    """``path`` opened for binary reading at offset 0, once it is known to be a text G-code file: the one check
    ``zevents parse`` and ``zevents print`` share.  OSError (FileNotFoundError, IsADirectoryError, PermissionError)
    for a path that cannot be read as a file, NotGcodeError (BinaryGcodeError for .bgcode) saying what the path is instead."""
    kind = os.stat(path).st_mode
    if stat.S_ISDIR(kind):
        raise IsADirectoryError(errno.EISDIR, "is a directory, not a G-code file", str(path))
    for test, what in _FILE_KINDS:
        if test(kind):
            raise NotGcodeError(f"{path}: is {what}, not a G-code file")
    handle = open(path, "rb")
    try:
        head = handle.read(SNIFF_BYTES)
        if head.startswith(BGCODE_MAGIC):
            raise BinaryGcodeError(str(path))
        if head.startswith(_ELF_MAGIC):
            raise NotGcodeError(f"{path}: is an executable (ELF), not a G-code file")
        nul = head.find(b"\0")
        if nul >= 0:
            raise NotGcodeError(f"{path}: is a binary file (a NUL byte at offset {nul}), not a text G-code file")
        handle.seek(0)
    except BaseException:
        handle.close()
        raise
    return handle


def describe_file_error(path: str, exc: Exception) -> str:
    """One line for a file ``open_gcode`` refused (the text ``zevents parse`` and ``zevents print`` print)."""
    if isinstance(exc, OSError):
        return f"{path}: {exc.strerror or exc}"
    return str(exc)


def check_gcode_file(path: str) -> int:
    """The size of ``path`` if it is a text G-code file; else OSError / NotGcodeError as ``open_gcode``."""
    with open_gcode(path) as handle:
        return os.fstat(handle.fileno()).st_size


REPLY_KINDS = ("ok", "temperature", "position", "resend", "skip", "error", "busy", "wait", "start", "firmware",
               "capability", "action", "sd", "echo", "invalid_tool", "probe", "unknown")


@dataclass
class Reply:
    """One firmware reply line, classified (see the module documentation for what each kind fills)."""

    kind: str
    line: str
    ok: bool = False
    message: str = ""
    line_number: int | None = None
    advanced: dict | None = None
    resend_line: int | None = None
    error_kind: str | None = None
    temperatures: dict = field(default_factory=dict)
    position: dict | None = None
    action: str | None = None
    action_params: str | None = None
    firmware: dict | None = None
    capability: tuple | None = None
    sd: dict | None = None
    tool: int | None = None
    probe: dict | None = None


_NUMBER = r"[-+]?\d*\.?\d+"
_OK_NUMBERS = re.compile(r"N(\d+)(?:\s+P(\d+))?(?:\s+B(\d+))?\s*\Z")
_OK_REPETIER = re.compile(r"(\d+)\s*\Z")
_TEMPERATURE = re.compile(r"(?<!\S)(T\d*|B|C):\s*(-?\d+(?:\.\d+)?)(?:\s*/\s*(-?\d+(?:\.\d+)?))?")
_RESEND = re.compile(r"(?:resend|rs)[:\s]+(?:N:?\s*)?(\d+)", re.IGNORECASE)
_SKIP = re.compile(r"skip\s+(\d+)", re.IGNORECASE)
_ERROR = re.compile(r"(?:!!|error:|echo:\s*(?=unknown command)|//\s*(?=unknown command))\s*(.*)", re.IGNORECASE)
_ERROR_RESEND = re.compile(r"line number|checksum|expected line|last line", re.IGNORECASE)
_ERROR_FATAL = re.compile(r"halted|kill|thermal|mintemp|maxtemp|heating failed|stopped|alarm lock|emergency"
                          r"|shutdown|lost communication", re.IGNORECASE)
_ERROR_COMMAND = re.compile(r"unknown command|must home|out of range|not homed|insufficient axes|invalid"
                            r"|\A[GMT]\d+(?:\.\d+)?:", re.IGNORECASE)
_BUSY = re.compile(r"(?:echo:\s*)?busy:\s*(.*)", re.IGNORECASE)
_FIRMWARE_KEY = re.compile(r"(?:\A|(?<=[\s,]))([A-Z][A-Z0-9_-]*):")
_CAPABILITY = re.compile(r"Cap:([A-Za-z0-9_]+):([01])\s*\Z")
_ACTION = re.compile(r"//\s*action:(\S+)\s*(.*)")
_INFO = re.compile(r"(?:echo:|//)\s*(.*)")
_PROBE = re.compile(r"Bed X:\s*(%s)\s+Y:\s*(%s)\s+Z:\s*(%s)" % (_NUMBER, _NUMBER, _NUMBER))
_SD_PATTERNS = (
    (re.compile(r"SD printing byte (\d+)\s*/\s*(\d+)", re.I), lambda m: {"printed": int(m[1]), "total": int(m[2])}),
    (re.compile(r"Not SD printing", re.I), lambda m: {"printing": False}),
    (re.compile(r"Done printing file", re.I), lambda m: {"done": True}),
    (re.compile(r"Begin file list", re.I), lambda m: {"list": "begin"}),
    (re.compile(r"End file list", re.I), lambda m: {"list": "end"}),
    (re.compile(r"File opened:\s*(.*?)\s+Size:\s*(\d+)", re.I), lambda m: {"opened": m[1], "size": int(m[2])}),
    (re.compile(r"File selected", re.I), lambda m: {"selected": True}),
    (re.compile(r"(?:echo:\s*)?SD card ok", re.I), lambda m: {"card": True}),
    (re.compile(r"(?:echo:\s*)?SD init fail", re.I), lambda m: {"card": False}),
    (re.compile(r"Writing to file:\s*(.*)", re.I), lambda m: {"writing": m[1]}),
    (re.compile(r"Done saving file", re.I), lambda m: {"saved": True}),
    (re.compile(r"(\S+\.(?:gco|gcode|g|gc|bgcode|ngc|nc))(?:\s+(\d+))?(?:\s+(.+))?\Z", re.I),
     lambda m: {"file": m[1], "size": int(m[2]) if m[2] else None, "long_name": m[3]}),
)


def _as_bytes(line) -> bytes:
    if isinstance(line, bytes):
        return line
    if isinstance(line, str):
        return line.encode("utf-8", "surrogateescape")
    return bytes(line)


def parse_temperatures(text: str) -> dict:
    """{"T0": (actual, target|None), "B": …, "C": …} from any firmware's temperature report."""
    found = {}
    for match in _TEMPERATURE.finditer(text):
        target = match.group(3)
        found[match.group(1)] = (float(match.group(2)), float(target) if target is not None else None)
    if "T" in found:
        current = found.pop("T")
        if not any(key.startswith("T") for key in found):
            found["T0"] = current  # a single hotend reports only "T:"
    return found


def parse_firmware(text: str) -> dict:
    """M115's KEY:value pairs, keys as sent (values stripped of spaces and Smoothie's trailing commas)."""
    keys = list(_FIRMWARE_KEY.finditer(text))
    result = {}
    for index, match in enumerate(keys):
        end = keys[index + 1].start() if index + 1 < len(keys) else len(text)
        result[match.group(1)] = text[match.end():end].strip().rstrip(",").strip()
    return result


def _error_kind(message: str, raw: str) -> str:
    if raw.strip() == "!!":
        return "fatal"  # Smoothie's halt
    if _ERROR_RESEND.search(message):
        return "resend"
    if _ERROR_FATAL.search(message):
        return "fatal"
    if _ERROR_COMMAND.search(message):
        return "command"
    return "other"


def classify_reply(line) -> Reply:
    """What one firmware reply line means (bytes or str, with or without its terminator)."""
    raw = _as_bytes(line).rstrip(b"\r\n")
    text = raw.decode("utf-8", "replace").strip()
    reply = Reply(kind="unknown", line=raw.decode("utf-8", "replace"), message=text)
    body = text
    if text == "ok" or text.startswith(("ok ", "ok\t")):
        reply.ok = True
        body = text[2:].strip()
        reply.message = body
    position = _rules.parse_position(raw)
    if position is not None:
        reply.kind = "position"
        reply.position = position
        return reply
    if reply.ok:
        if not body:
            reply.kind = "ok"
            return reply
        match = _OK_NUMBERS.match(body)
        if match:
            reply.kind = "ok"
            reply.line_number = int(match.group(1))
            if match.group(2) is not None:
                reply.advanced = {"planner": int(match.group(2)),
                                  "buffer": int(match.group(3)) if match.group(3) is not None else None}
            return reply
        match = _OK_REPETIER.match(body)
        if match:
            reply.kind = "ok"
            reply.line_number = int(match.group(1))
            return reply
        if "FIRMWARE_NAME:" in body:
            reply.kind = "firmware"
            reply.firmware = parse_firmware(body)
            return reply
        temperatures = parse_temperatures(body)
        if temperatures:
            reply.kind = "temperature"
            reply.temperatures = temperatures
            return reply
        reply.kind = "ok"
        return reply
    if not text:
        return reply
    match = _RESEND.match(text)
    if match:
        reply.kind = "resend"
        reply.resend_line = int(match.group(1))
        return reply
    match = _SKIP.match(text)
    if match:
        reply.kind = "skip"
        reply.line_number = int(match.group(1))
        return reply
    match = _ERROR.match(text)
    if match:
        reply.kind = "error"
        reply.message = match.group(1).strip()
        reply.error_kind = _error_kind(reply.message, text)
        return reply
    tool = _rules.parse_invalid_tool(raw)
    if tool is not None:
        reply.kind = "invalid_tool"
        reply.tool = None if tool == _rules.CURRENT_TOOL else tool
        return reply
    match = _BUSY.match(text)
    if match:
        reply.kind = "busy"
        reply.message = match.group(1).strip()
        return reply
    if text == "wait":
        reply.kind = "wait"
        return reply
    if text in ("start", "Smoothie"):
        reply.kind = "start"
        return reply
    if "FIRMWARE_NAME:" in text:
        reply.kind = "firmware"
        reply.firmware = parse_firmware(text)
        return reply
    if text.startswith("area:"):
        reply.kind = "firmware"
        reply.firmware = {"area": text[len("area:"):].strip()}
        return reply
    match = _CAPABILITY.match(text)
    if match:
        reply.kind = "capability"
        reply.capability = (match.group(1), match.group(2) == "1")
        return reply
    match = _ACTION.match(text)
    if match:
        reply.kind = "action"
        reply.action = match.group(1)
        reply.action_params = match.group(2).strip()
        return reply
    for pattern, build in _SD_PATTERNS:
        match = pattern.match(text)
        if match:
            reply.kind = "sd"
            reply.sd = build(match)
            return reply
    temperatures = parse_temperatures(text)
    if temperatures:
        reply.kind = "temperature"
        reply.temperatures = temperatures
        return reply
    match = _PROBE.match(text)
    if match:
        reply.kind = "probe"
        reply.probe = {"x": float(match.group(1)), "y": float(match.group(2)), "z": float(match.group(3))}
        return reply
    match = _INFO.match(text)
    if match:
        reply.kind = "echo"
        reply.message = match.group(1).strip()
        return reply
    return reply
