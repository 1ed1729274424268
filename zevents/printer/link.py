"""The serial link to one printer: opening the port (or auto-detecting it), the handshake, line numbers and
checksums, ``ok`` flow control with a bounded in-flight window, resend requests, keep-alives and timeouts.

It owns the wire protocol and the printer-communication events (Connecting, Connected, Disconnecting,
Disconnected, PrinterStateChanged, Error, conflated ``comm/Temperature``).  Every line it sends goes through the
parser first (``parser.sent``: gcode events with the line's ``src``; a CommandSuppressed line is not sent) and
every reply goes through ``parser.received`` (PositionUpdate, InvalidToolReported, src ``firmware``) and
``classify_reply`` (flow control, resends, errors, temperatures, SD, actions).  Print jobs live in
``zevents.printer.job``: they register as the link's ``listener`` and feed it lines through a *source*.

Threads: a reader (replies) and a writer (flow control and housekeeping) per open port.  The link never touches
ZeroMQ: events go to the ``emit(name, payload, src)`` callable it is given, which the service turns into bus
messages on one thread.

Flow control: a firmware accepts numbered lines strictly in order and executes them in order, acknowledging each
with one ``ok`` once it has run; a rejected line ("Error:checksum mismatch" / "Resend: N" / "ok") is answered at
once, with an ``ok`` of its own.  So the link counts acknowledgements by line number: at most ``window`` lines are
written and not yet acknowledged, the ``ok`` after a resend request is the rejection's, and a resend request
simply rewinds writing to line N (see ``_on_resend`` for why that is always safe).  A lost ``ok`` (line noise, a
dropped line) is repaired by the timeout: after ``timeout`` seconds without progress while lines are
unacknowledged, one ``ok`` is presumed lost and an ``M105`` is sent as a probe (a firmware that lost a line answers
it with a resend request); after ``retries`` such timeouts in a row the link gives up with an ``Error`` (reason
``timeout``) and closes.
"""
from __future__ import annotations

import collections
import glob
import logging
import os
import re
import select
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Optional

import serial

from zevents import events as zevents_events

log = logging.getLogger("zevents.printer.link")

#: OctoPrint's state ids and strings (``PrinterInterface.get_state_id`` / ``getStateString``).
STATE_STRINGS = {
    "OFFLINE": "Offline",
    "OPEN_SERIAL": "Opening serial connection",
    "DETECT_SERIAL": "Detecting serial connection",
    "CONNECTING": "Connecting",
    "OPERATIONAL": "Operational",
    "STARTING": "Starting",
    "PRINTING": "Printing",
    "PAUSING": "Pausing",
    "PAUSED": "Paused",
    "CANCELLING": "Cancelling",
    "RESUMING": "Resuming",
    "FINISHING": "Finishing",
    "CLOSED": "Offline",
    "ERROR": "Error",
    "CLOSED_WITH_ERROR": "Offline after error",
    "TRANSFERING_FILE": "Transferring file to SD",
}
#: States in which the port is open and the firmware answers (commands are accepted).
CONNECTED_STATES = frozenset({"OPERATIONAL", "STARTING", "PRINTING", "PAUSING", "PAUSED", "CANCELLING", "RESUMING",
                              "FINISHING", "TRANSFERING_FILE"})

AUTO = "AUTO"
#: Baud rates tried by auto-detection, most common first.
AUTO_BAUDRATES = (115200, 250000, 230400, 57600, 38400, 19200, 9600)
AUTO_PORT_PATTERNS = ("/dev/ttyUSB*", "/dev/ttyACM*", "/dev/ttyAMA*", "/dev/serial/by-id/*")

HISTORY = 2000               # sent lines kept for resends
RESEND_LOOP_LIMIT = 10       # the same line requested this many times in a row: the link is stuck
MAX_BATCH = 32               # lines written with one system call at most
MAX_REPLY = 4096             # longer replies are cut (a garbage line must not eat memory)
LOG_LINES = 40               # lines of communication kept for Error {logs}
#: The longest command sent (without line number and checksum) by default: Marlin's and Prusa's input buffer
#: holds 96 bytes (MAX_CMD_SIZE), the rest is room for "N<line> " and "*<checksum>".
MAX_LINE = 80
#: Commands whose text may be shortened to fit (a display message loses its tail; nothing moves differently).
MESSAGE_COMMANDS = ("M117", "M118")
_NUMBER_PREFIX = re.compile(r"^\s*N\d+\s+")
_WAITS = frozenset(("M109", "M190", "M191", "M116", "M303", "G4", "M400"))  # commands that may run for minutes
_HEATUPS = frozenset(("M109", "M190", "M191", "M116"))   # the waits Marlin's M108 ends (wait_for_heatup)
# OctoPrint's serial.emergencyCommands: sent ahead of the queue (and of the ok window) when the firmware reports
# EMERGENCY_PARSER, which acts on them the moment they arrive; M112 always jumps the queue.
_EMERGENCY_COMMANDS = frozenset(("M108", "M410"))
HEATUP_ABORT_INTERVAL = 1.0   # seconds before an M108 that did not end a heat-up wait is sent again
_M110 = re.compile(r"^M110(?:\s+N(-?\d+))?\s*$", re.IGNORECASE)
# "expected line X got Y" (OctoPrint's simulator, Repetier): the error names the line that was rejected.
_EXPECTED_GOT = re.compile(r"expected\s+line\s*:?\s*(\d+)\s*,?\s*got\s*:?\s*(\d+)", re.IGNORECASE)


class LinkError(RuntimeError):
    """The link cannot do what was asked now (not connected, busy, port unusable)."""


def checksum(data: bytes) -> int:
    """The XOR of every byte: RepRap's line checksum."""
    value = 0
    for byte in data:
        value ^= byte
    return value


def numbered(line: str, number: int) -> bytes:
    """``N<number> <line>*<checksum>`` plus newline, as bytes ready for the wire."""
    body = f"N{number} {line}".encode("ascii", "replace")
    return body + b"*%d\n" % checksum(body)


def is_message(line: str) -> bool:
    """An M117/M118 command (display or host message), whose text may be shortened."""
    word = line[:4].upper()
    return word in MESSAGE_COMMANDS and (len(line) == 4 or not line[4].isdigit())


def is_refusal(reply_line: str) -> bool:
    """A firmware answer saying a command was not done: an error (not a line error) or an unknown command."""
    from zevents import parser as zparser

    reply = zparser.classify_reply(reply_line)
    if reply.kind == "error":
        return reply.error_kind != "resend"
    return "unknown command" in reply_line.lower()


def strip_line(raw: str) -> str:
    """The command part of a G-code line: no comment, no line number or checksum, no surrounding blanks."""
    semicolon = raw.find(";")
    if semicolon >= 0:
        raw = raw[:semicolon]
    star = raw.find("*")
    if star >= 0:
        raw = raw[:star]
    raw = raw.strip()
    if raw[:1] in ("N", "n"):
        raw = _NUMBER_PREFIX.sub("", raw, count=1)
    return raw


@dataclass(eq=False)
class Command:
    """One line waiting for the wire.  ``on_done(ok: bool)`` runs (on the reader thread, outside the link's lock)
    when its ``ok`` arrives, or with False when the link closes first."""
    line: str
    src: str = "user"
    on_done: Optional[Callable[[bool], None]] = None
    emergency: bool = False
    offset: Optional[int] = None   # a source's line: where the source stood after it (its file position)
    replies: Optional[list] = None  # a list: collect the firmware's answer to this line (see PrinterLink.request)


@dataclass
class _Waiter:
    event: threading.Event = field(default_factory=threading.Event)
    ok: bool = False

    def __call__(self, ok: bool):
        self.ok = ok
        self.event.set()


class LinkListener:
    """What a print job gets told by the link.  Called on the link's threads, never with its lock held (except
    ``on_tool_change``); must not block (hand long work to another thread)."""

    def on_source_exhausted(self, source):
        pass

    def on_tool_change(self, old, new):
        """A tool-change line was just queued (called with the link's lock held): may only queue lines."""

    def on_action(self, action: str, line: str):
        pass

    def on_sd(self, sd: dict, line: str):
        pass

    def on_firmware_error(self, message: str) -> Optional[str]:
        """A firmware error that is not fatal; returns the consequence taken ("cancel") or None."""
        return None

    def on_link_failed(self, error: str, reason: str | None):
        """The port is about to close, after an error (``reason`` set) or on request: a running job fails."""

    def on_closed(self):
        pass


def auto_candidates(ports=None, baudrate: int = 0) -> list:
    """(port, baudrate) pairs to try: the given ports or the usual device names, times the baud rates."""
    if not ports:
        found = []
        try:
            from serial.tools import list_ports

            found = [p.device for p in list_ports.comports()]
        except Exception:  # pragma: no cover - list_ports needs sysfs
            found = []
        for pattern in AUTO_PORT_PATTERNS:
            found.extend(sorted(glob.glob(pattern)))
        ports = list(dict.fromkeys(found))
    rates = AUTO_BAUDRATES if not baudrate else (baudrate,)
    return [(port, rate) for port in ports for rate in rates]


def _nothing_answered(candidates: list) -> str:
    """What autodetection tried, for the error a user reads: the ports and rates, or where it looked."""
    if not candidates:
        return f"no serial port found (looked for {', '.join(AUTO_PORT_PATTERNS)}); give --port DEVICE"
    ports = list(dict.fromkeys(port for port, _ in candidates))
    rates = list(dict.fromkeys(rate for _, rate in candidates))
    return (f"no printer answered on {', '.join(ports)} (probed at {', '.join(map(str, rates))} baud); "
            "give --port DEVICE and --baud N")


class PrinterLink:
    """One printer over one serial port.  See the module docstring for the protocol; the public methods are
    thread-safe."""

    def __init__(self, port: str, baudrate: int = 115200, *, emit: Callable | None = None, parser=True,
                 parser_config: dict | None = None, window: int = 4, timeout: float = 10.0, retries: int = 3,
                 hello_timeout: float | None = None, temperature_interval: float = 0.5,
                 autoreport_interval: int = 2, poll_interval: float = 2.0, candidates=None, read_timeout=0.05,
                 max_line: int = MAX_LINE):
        from zevents import parser as zparser

        self.port = port
        self.baudrate = baudrate
        self._emit_fn = emit or (lambda name, payload, src: None)
        if parser is True:
            parser = zparser.Parser(parser_config)
        self.parser = parser or None
        self._classify = zparser.classify_reply
        self.window = max(1, int(window))
        self.timeout = float(timeout)
        self.retries = int(retries)
        self.hello_timeout = hello_timeout if hello_timeout is not None else min(self.timeout, 2.0)
        self.temperature_interval = temperature_interval
        self.autoreport_interval = autoreport_interval
        self.poll_interval = poll_interval
        self.candidates = candidates
        self.read_timeout = read_timeout
        self.max_line = int(max_line) if max_line else 0
        self.listener: LinkListener = LinkListener()
        #: The source's position after the last of its lines the printer acknowledged (a job's file position).
        self.acknowledged_offset = 0

        self.state = "OFFLINE"
        self.error: str | None = None
        self.error_consequence: str | None = None   # of the last error ("emergency": the firmware halted)
        self.firmware: dict = {}
        self.capabilities: dict = {}
        self.position: dict | None = None
        self.temperature: dict = {"tools": {}, "bed": None, "chamber": None}
        self.sd_files: list | None = None
        self.stats = collections.Counter()
        self.comm_log: collections.deque = collections.deque(maxlen=LOG_LINES)

        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._serial = None
        self._threads: list = []
        self._running = False
        self._closing = False
        self._queue: collections.deque = collections.deque()
        self._source = None
        self._source_paused = False
        self._history: dict = {}
        self._history_order: collections.deque = collections.deque()
        # Line numbers: the next new line gets _next_line; _write_no is the next to write (below _next_line while
        # resending); _ack_no is the line the next execution ok acknowledges (lines are accepted and executed in
        # number order, so oks can be counted by number).  Unacknowledged lines: _ack_no .. _write_no - 1.
        self._next_line = 1
        self._write_no = 1
        self._ack_no = 1
        self._written_upto = 1     # 1 + the highest line number written at least once
        self._resend_target: int | None = None
        self._recovering = False
        self._resend_repeats = 0
        self._rejection_oks = 0
        # The line error that came before the next resend request: None (no error line yet), or the line number
        # the error says was rejected (0 when it does not say).
        self._line_error: int | None = None
        self._last_rx = time.monotonic()
        self._timeouts = 0
        self._m112_sent = False
        self._abort_heatups = False
        self._heatup_abort_sent: tuple = (None, 0.0)   # (line number of the heat-up wait, when its M108 went)
        self._file_list: list | None = None
        self._temperature_emitted = 0.0
        self._temperature_pending = False
        self._last_poll = 0.0
        self._deferred: list = []
        self._hello_ok = threading.Event()
        self._booted = threading.Event()
        self._firmware_seen = threading.Event()
        self._capture: list | None = None
        self._tool_change: dict | None = None
        self._idle_callbacks: list = []
        self._last_suppressed = False

    # --- events --------------------------------------------------------------------------------------------------

    def emit(self, name: str, payload: dict | None = None, src: str = "firmware"):
        self._emit_fn(name, zevents_events.complete_payload(name, payload), src)

    def set_state(self, state_id: str, detail: str | None = None, src: str = "firmware"):
        """PrinterStateChanged with OctoPrint's id and string; ``src`` says who caused it (the link's own
        transitions are ``firmware``, a job's ``job``)."""
        with self._lock:
            if state_id == self.state and detail is None:
                return
            self.state = state_id
            text = STATE_STRINGS.get(state_id, state_id.title())
            if detail:
                text = f"{text}: {detail}"
            self.emit("PrinterStateChanged", {"state_id": state_id, "state_string": text}, src)

    @property
    def connected(self) -> bool:
        return self.state in CONNECTED_STATES

    # --- connecting ----------------------------------------------------------------------------------------------

    def connect(self) -> bool:
        """Open the port, handshake, query the firmware; True once OPERATIONAL.  Failures publish Error."""
        with self._lock:
            if self._running:
                raise LinkError(f"already connected to {self.port}")
            self.error = self.error_consequence = None
            self._closing = False
        self.emit("Connecting", {})
        auto_port = str(self.port).upper() == AUTO
        if auto_port or not self.baudrate:
            self.set_state("DETECT_SERIAL")
            candidates = auto_candidates(self.candidates if auto_port else [self.port], self.baudrate)
            for port, rate in candidates:
                if self._try_open(port, rate, quiet=True):
                    if self._handshake(tries=1):
                        self.set_state("CONNECTING")
                        break
                    self._shutdown_threads()
            else:
                return self._fail_connect(_nothing_answered(candidates), "autodetect")
        else:
            self.set_state("OPEN_SERIAL")
            if not self._try_open(self.port, self.baudrate):
                return False
            self.set_state("CONNECTING")
            if not self._handshake(tries=max(1, self.retries)):
                self._shutdown_threads()
                return self._fail_connect(f"no answer from the printer on {self.port} at {self.baudrate} baud",
                                          "connection")
        return self._after_handshake()

    def _try_open(self, port: str, baudrate: int, quiet: bool = False) -> bool:
        try:
            # exclusive: a second link on the same port would interleave two protocols.
            ser = serial.serial_for_url(port, baudrate=baudrate, timeout=self.read_timeout,
                                        write_timeout=max(self.timeout, 1.0), exclusive=True)
        except (serial.SerialException, OSError, ValueError) as exc:
            if quiet:
                log.info("link: cannot open %s at %s: %s", port, baudrate, exc)
                return False
            return self._fail_connect(f"cannot open {port}: {exc}", "connection")
        with self._lock:
            self.port, self.baudrate = port, baudrate
            self._serial = ser
            self._running = True
            self._reset_protocol()
            self._last_rx = time.monotonic()
        self._threads = [threading.Thread(target=self._read_loop, args=(ser,), name="link-reader", daemon=True),
                         threading.Thread(target=self._write_loop, args=(ser,), name="link-writer", daemon=True)]
        for thread in self._threads:
            thread.start()
        return True

    def _reset_protocol(self):
        self._queue.clear()
        self._history.clear()
        self._history_order.clear()
        self._next_line = self._write_no = self._ack_no = self._written_upto = 1
        self._resend_target = None
        self._recovering = False
        self._resend_repeats = 0
        self._rejection_oks = 0
        self._line_error = None
        self._timeouts = 0
        self._m112_sent = False
        self._abort_heatups = False
        self._idle_callbacks = []
        self._file_list = None
        self._hello_ok.clear()
        self._booted.clear()
        self._firmware_seen.clear()

    def _handshake(self, tries: int) -> bool:
        """``N0 M110 N0`` until an ``ok`` answers (a firmware still booting ignores the first ones)."""
        attempt, reboots = 0, 0
        while attempt < tries:
            with self._lock:
                self._queue.appendleft(Command("M110 N0", "firmware", self._hello_done))
                self._cond.notify_all()
            deadline = time.monotonic() + self.hello_timeout
            while not self._hello_ok.is_set() and self._running:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._booted.wait(min(remaining, 0.05)):
                    break
            if self._hello_ok.is_set():
                return True
            if not self._running:
                return False
            if self._booted.is_set() and reboots < 5:
                # The firmware (re)booted and dropped what came before its banner: say hello again at once.
                self._booted.clear()
                reboots += 1
                continue
            attempt += 1
            log.info("link: no answer to the hello on %s at %s (try %d of %d)", self.port, self.baudrate,
                     attempt, tries)
        return False

    def _hello_done(self, ok: bool):
        if ok:
            self._hello_ok.set()

    def _after_handshake(self) -> bool:
        if self.send_and_wait("M115", src="firmware", timeout=self.timeout) is None:
            log.warning("link: no answer to M115; carrying on without firmware info")
        elif self._firmware_seen.wait(min(self.timeout, 1.0)):
            # A second ok for a repeated hello may have been taken for M115's: let its report finish.
            self.wait_idle(min(self.timeout, 1.0))
        if not self._running:
            return False
        if self.capabilities.get("AUTOREPORT_TEMP"):
            self.send([f"M155 S{self.autoreport_interval}"], src="firmware")
        else:
            self.send(["M105"], src="firmware")
        with self._lock:
            if not self._running:
                return False
            self.set_state("OPERATIONAL")
            self.emit("Connected", {"port": self.port, "baudrate": self.baudrate})
        return True

    def _fail_connect(self, message: str, reason: str) -> bool:
        self.error = message
        log.error("link: %s", message)
        self.emit("Error", {"error": message, "reason": reason, "consequence": None, "logs": list(self.comm_log)})
        self.set_state("CLOSED_WITH_ERROR", message)
        return False

    # --- disconnecting -------------------------------------------------------------------------------------------

    def disconnect(self, timeout: float = 2.0):
        """Close the port on request: Disconnecting, (lines in flight get ``timeout`` to be acknowledged), Closed,
        Disconnected."""
        with self._lock:
            if not self._running or self._closing:
                return
            self._source = None  # a running job stops here (it fails when the port closes)
        self.emit("Disconnecting", {})
        self.wait_idle(timeout)
        self._close(error=None)

    def _close(self, error: str | None, reason: str | None = None, consequence: str | None = None):
        """Shut the port down once; with an error, publish Error and tell the listener first."""
        with self._lock:
            if self._closing or not self._running:
                return
            self._closing = True
            pending = [self._history[n][1] for n in range(self._ack_no, self._next_line) if n in self._history]
            pending = [command for command in pending if command is not None] + list(self._queue)
        if error is not None:
            self.error, self.error_consequence = error, consequence
            log.error("link: %s", error)
            self.emit("Error", {"error": error, "reason": reason, "consequence": consequence,
                                "logs": list(self.comm_log)})
            self.set_state("ERROR", error)
        # A job running now has failed, before the port is reported closed (also on a requested disconnect).
        self.listener.on_link_failed(error or "disconnected while printing", reason)
        self._shutdown_threads()
        for command in pending:
            if command.on_done is not None:
                command.on_done(False)
        self._hello_ok.set()
        self.set_state("CLOSED_WITH_ERROR" if error is not None else "CLOSED", error)
        self.emit("Disconnected", {})
        self.listener.on_closed()

    def _shutdown_threads(self):
        with self._lock:
            self._running = False
            ser, self._serial = self._serial, None
            self._cond.notify_all()
            self._source = None
        current = threading.current_thread()
        if ser is not None:
            try:
                ser.cancel_read()
            except Exception:
                pass
        for thread in self._threads:
            if thread is not current:
                thread.join(2.0)
        self._threads = []
        if ser is not None:
            try:
                ser.close()
            except Exception:
                pass

    # --- sending -------------------------------------------------------------------------------------------------

    def send(self, lines, src: str = "user", on_done: Callable | None = None, collect: list | None = None) -> tuple:
        """Queue lines (parsed now, sent in order ahead of a job's lines).  Returns (accepted, suppressed commands).
        ``on_done`` runs when the last accepted line is acknowledged (at once with True if none was accepted).
        With a ``collect`` list, each queued Command is appended to it and gathers its answer (``replies``)."""
        if isinstance(lines, str):
            lines = lines.splitlines()
        accepted, suppressed, commands = 0, [], []
        with self._lock:
            if not self._running or self._closing:
                raise LinkError(f"the printer is not connected (state: {STATE_STRINGS.get(self.state, self.state)})")
            lines = list(lines)
            for number, raw in enumerate(lines, 1):
                too_long = self.too_long(strip_line(raw))
                if too_long:
                    raise LinkError(f"line {number} not sent (nothing was): {too_long}")
            for raw in lines:
                command = self._prepare(raw, src)
                if command is None:
                    if self._last_suppressed:
                        suppressed.append(strip_line(raw))
                    continue
                if collect is not None:
                    command.replies = []
                    collect.append(command)
                if command.emergency:
                    self._queue.appendleft(command)
                else:
                    commands.append(command)
                    self._queue.append(command)
                self._after_queued()
            if commands and on_done is not None:
                commands[-1].on_done = on_done
            accepted = len(commands)
            self._cond.notify_all()
        if not commands and on_done is not None:
            on_done(True)
        return accepted, suppressed

    def request(self, lines, src: str = "user", timeout: float = 600.0) -> dict:
        """Send lines and wait for the firmware's answer to each: {"accepted", "suppressed", "answers": [{"line",
        "replies" (the lines it sent back before its ok, the ok's own text included), "refused" (an error or an
        unknown command among them)}], "complete" (False when the answers did not all come within timeout)}."""
        waiter = _Waiter()
        commands: list = []
        accepted, suppressed = self.send(lines, src, on_done=waiter, collect=commands)
        complete = waiter.event.wait(timeout) and waiter.ok
        answers = []
        with self._lock:
            for command in commands:
                replies = list(command.replies or ())
                refused = any(is_refusal(line) for line in replies)
                answers.append({"line": command.line, "replies": replies, "refused": refused})
        return {"accepted": accepted, "suppressed": suppressed, "answers": answers, "complete": bool(complete)}

    def _collect_answer(self, reply, line: str):
        """A reply line that answers the oldest line in flight, kept when that line collects its answer."""
        if self._ack_no >= self._write_no:
            return
        entry = self._history.get(self._ack_no)
        command = entry[1] if entry is not None else None
        if command is None or command.replies is None:
            return
        kind = reply.kind
        if kind in ("resend", "skip", "busy", "wait") or (kind == "error" and reply.error_kind == "resend"):
            return  # the link's own business, not an answer
        if kind == "ok" and not reply.message:
            return
        if kind == "temperature" and not reply.ok and command.line[:4].upper() != "M105":
            return  # an auto-report that happened to arrive meanwhile
        if self._rejection_oks and reply.ok:
            return
        command.replies.append(line)

    def send_and_wait(self, line: str, src: str = "user", timeout: float | None = None):
        """Send one line and wait for its ``ok``; returns the (accepted, suppressed) of send, or None on timeout."""
        waiter = _Waiter()
        result = self.send([line], src, on_done=waiter)
        if not waiter.event.wait(self.timeout * (self.retries + 1) if timeout is None else timeout):
            return None
        return result if waiter.ok else None

    def when_idle(self, callback: Callable[[], None]):
        """Run ``callback`` (on a link thread, outside the lock; it must not block) once nothing is queued or
        unacknowledged: at once if that is so now.  Dropped if the link closes first."""
        with self._lock:
            if not self._is_idle():
                self._idle_callbacks.append(callback)
                return
        callback()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until nothing is queued or in flight (a job's source is not waited for)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._running and not self._is_idle():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(min(remaining, 0.1))
            return True

    def set_source(self, source, paused: bool = False):
        """Stream lines from ``source.next_line()`` (str or None at the end) whenever the window has room.
        ``source.src`` names who sends them, ``source.parse`` (default True) whether they are parsed."""
        with self._lock:
            if not self._running:
                raise LinkError("the printer is not connected")
            self._source = source
            self._source_paused = paused
            self.acknowledged_offset = 0
            self._cond.notify_all()

    def pause_source(self, paused: bool):
        with self._lock:
            self._source_paused = paused
            self._cond.notify_all()

    def clear_source(self, source=None):
        with self._lock:
            if source is None or self._source is source:
                self._source = None

    def too_long(self, line: str) -> str | None:
        """Why the command ``line`` cannot be sent (longer than ``max_line`` and not a message that can be
        shortened), or None."""
        if not self.max_line or len(line) <= self.max_line or is_message(line):
            return None
        return (f"{line[:24]}... is {len(line)} characters long, the printer takes at most {self.max_line} "
                "(printer.max_line)")

    def _fit(self, line: str, src: str) -> str | None:
        """The command as it can be sent: an over-long M117/M118 shortened (CommandSuppressed says so), another
        over-long line suppressed (senders check ``too_long`` first: only a source changing under us gets here)."""
        if not self.max_line or len(line) <= self.max_line:
            return line
        word = line.split(None, 1)[0]
        if is_message(line):
            short = line[:self.max_line].rstrip()
            self.emit("CommandSuppressed", {
                "command": short, "severity": "info",
                "message": f"{word} text shortened from {len(line)} to {len(short)} characters to fit the "
                           f"printer's line length (printer.max_line: {self.max_line})"}, src)
            self.stats["shortened"] += 1
            return short
        self.emit("CommandSuppressed", {"command": line[:self.max_line], "severity": "warn",
                                        "message": f"Not sending a {len(line)}-character line: {self.too_long(line)}"},
                  src)
        self.stats["suppressed"] += 1
        return None

    def _prepare(self, raw: str, src: str, parse: bool = True, source=None) -> Command | None:
        """Parse one line (publishing its gcode events) and turn it into a Command; None if there is nothing to
        send (comment, blank, suppressed).  Called with the lock held, in send order.  A source with a
        ``gcode_events(raw, found, parser)`` method decides which of its lines' events are published."""
        self._last_suppressed = False
        tool_change = None
        if parse and self.parser is not None:
            found = self.parser.sent(raw)
            rewrite = getattr(source, "gcode_events", None)
            if rewrite is not None:
                found = rewrite(raw, found, self.parser)
            if found:
                for event in found:
                    name = event.name
                    self.emit(name, event.payload, src)
                    if name == "CommandSuppressed":
                        self._last_suppressed = True
                    elif name == "ToolChange":
                        tool_change = event.payload
                if self._last_suppressed:
                    self.stats["suppressed"] += 1
                    return None
        line = strip_line(raw)
        if not line:
            return None
        line = self._fit(line, src)
        if line is None:
            self._last_suppressed = True
            return None
        command = Command(line, src)
        # every line of a print passes here: a four-character look, as for M112 alone before
        head = line[:4].upper()
        if (head == "M112" or (head in _EMERGENCY_COMMANDS and self.capabilities.get("EMERGENCY_PARSER"))) and \
                (len(line) == 4 or not line[4].isdigit()):
            command.emergency = True
        self._tool_change = tool_change
        return command

    def _after_queued(self):
        """Right after a tool-change line took its place in the send order: its script goes next."""
        change, self._tool_change = self._tool_change, None
        if change is not None:
            self.listener.on_tool_change(change.get("old"), change.get("new"))

    # --- the writer ----------------------------------------------------------------------------------------------

    def _write_loop(self, ser):
        tick = min(0.1, max(0.01, self.timeout / 10))
        while True:
            with self._cond:
                if not self._running or self._serial is not ser:
                    return
                # Everything the window allows goes out in one write: fewer system calls per line.
                chunks = []
                while len(chunks) < MAX_BATCH:
                    data = self._next_data()
                    if data is None:
                        break
                    chunks.append(data)
                if not chunks:
                    self._cond.wait(tick)
                    if self._running and self._serial is ser:
                        self._housekeeping()
                deferred, self._deferred = self._deferred, []
            for callback in deferred:
                callback()
            if not chunks:
                continue
            for data in chunks:
                self.comm_log.append(">>> " + data.decode("ascii", "replace").rstrip())
            try:
                ser.write(b"".join(chunks) if len(chunks) > 1 else chunks[0])
            except (serial.SerialException, OSError, ValueError, TypeError, AttributeError) as exc:
                if self._running and self._serial is ser:
                    self._close(f"cannot write to {self.port}: {exc}", "connection", "disconnect")
                return
            self.stats["lines_sent"] += len(chunks)

    def _next_data(self) -> bytes | None:
        """The next bytes to write, or None when the window is full or there is nothing to send."""
        queue = self._queue
        # An emergency line jumps the queue and the window; only M112 also jumps lines being resent (the link
        # closes after it), the others wait for the resend so that line numbers stay in order.
        if queue and queue[0].emergency and (self._write_no >= self._next_line or queue[0].line[:4].upper() == "M112"):
            command = queue.popleft()
            if command.line[:4].upper() == "M112":
                self._m112_sent = True
            return self._number(command)
        if self._write_no - self._ack_no >= (1 if self._recovering else self.window):
            return None
        if self._write_no < self._next_line:
            data = self._history[self._write_no][0]
            self._write_no += 1
            self._written_upto = max(self._written_upto, self._write_no)
            self.stats["lines_resent"] += 1
            return data
        if queue:
            return self._number(queue.popleft())
        source = self._source
        if source is not None and not self._source_paused and self.state not in ("PAUSED", "PAUSING"):
            parse = getattr(source, "parse", True)
            src = getattr(source, "src", "job")
            while True:
                raw = source.next_line()
                if raw is None:
                    self._source = None
                    self._deferred.append(lambda: self.listener.on_source_exhausted(source))
                    return None
                command = self._prepare(raw, src, parse, source)
                if command is not None:
                    command.offset = getattr(source, "position", None)
                    data = self._number(command)
                    self._after_queued()
                    return data
        return None

    def _number(self, command: Command) -> bytes:
        match = _M110.match(command.line)
        if match:
            number = int(match.group(1) or 0)
            self._history.clear()
            self._history_order.clear()
            data = numbered(f"M110 N{number}", number)
            self._next_line = number + 1
            self._ack_no = number
            self._written_upto = number
        else:
            number = self._next_line
            self._next_line += 1
            data = numbered(command.line, number)
        self._write_no = self._written_upto = self._next_line
        self._history[number] = (data, command)
        self._history_order.append(number)
        if len(self._history_order) > HISTORY:
            self._history.pop(self._history_order.popleft(), None)
        return data

    def _housekeeping(self):
        now = time.monotonic()
        if self._temperature_pending and now - self._temperature_emitted >= self.temperature_interval:
            self._emit_temperature(now)
        if self.state not in CONNECTED_STATES:
            return
        unacknowledged = self._write_no - self._ack_no
        if unacknowledged > 0 and now - self._last_rx > self.timeout:
            self._timeouts += 1
            self.stats["timeouts"] += 1
            if self._timeouts > self.retries:
                message = (f"no answer from the printer for {self.timeout * self._timeouts:g} s "
                           f"({self.retries} retries)")
                self._deferred.append(lambda: self._close(message, "timeout", "disconnect"))
                return
            log.warning("link: no answer for %g s with %d line(s) unacknowledged; presuming a lost ok and probing "
                        "(retry %d of %d)", self.timeout, unacknowledged, self._timeouts, self.retries)
            self._acknowledge(self._ack_no)
            self._queue.appendleft(Command("M105", "firmware"))
            self._last_rx = now
        elif (not self.capabilities.get("AUTOREPORT_TEMP") and self.poll_interval and not self._queue
              and now - self._last_poll >= self.poll_interval and unacknowledged == 0):
            self._last_poll = now
            self._queue.append(Command("M105", "firmware"))

    # --- the reader ----------------------------------------------------------------------------------------------

    def _read_loop(self, ser):
        buffer = bytearray()
        read = self._reader(ser)
        while True:
            if not self._running or self._serial is not ser:
                return
            try:
                data = read()
            except (serial.SerialException, OSError, ValueError, TypeError, AttributeError) as exc:
                if self._running and self._serial is ser:
                    self._close(f"lost the connection to {self.port}: {exc}", "connection", "disconnect")
                return
            if not data:
                continue
            buffer += data
            start = 0
            while True:
                end = buffer.find(b"\n", start)
                if end < 0:
                    break
                self._on_line(bytes(buffer[start:end]))
                start = end + 1
            if start:
                del buffer[:start]
            if len(buffer) > MAX_REPLY * 16:
                self.stats["garbage"] += 1
                log.warning("link: dropped %d bytes without a line end from the printer", len(buffer))
                buffer.clear()

    def _reader(self, ser):
        """A function returning what has arrived (b"" after read_timeout without data).  On a POSIX port: one
        select and one read per wake-up (pyserial's read(in_waiting) costs an ioctl, a select and a read)."""
        fd = getattr(ser, "fd", None)
        if not isinstance(ser, serial.Serial) or not isinstance(fd, int) or fd < 0:
            return lambda: ser.read(ser.in_waiting or 1)
        timeout = self.read_timeout

        def read() -> bytes:
            if not select.select([fd], [], [], timeout)[0]:
                return b""
            data = os.read(fd, 65536)
            if not data:
                # Readable with nothing to read: the device went away (a pty whose other side closed).
                raise serial.SerialException("the device reports readiness to read but returned no data "
                                             "(device disconnected?)")
            return data

        return read

    def _on_line(self, raw: bytes):
        if len(raw) > MAX_REPLY:
            self.stats["long_lines"] += 1
            raw = raw[:MAX_REPLY]
        line = raw.rstrip(b"\r").decode("utf-8", "replace").replace("\x00", "")
        self.stats["lines_received"] += 1
        self.comm_log.append("<<< " + line)
        with self._cond:
            try:
                self._handle(line)
            except Exception:
                log.exception("link: failed to handle the reply %r", line[:200])
            deferred, self._deferred = self._deferred, []
        for callback in deferred:
            callback()

    def _handle(self, line: str):
        if self._capture is not None:
            self._capture.append(line)
        if self.parser is not None:
            found = self.parser.received(line)
            for event in found:
                self.emit(event.name, event.payload, "firmware")
        reply = self._classify(line)
        kind = reply.kind
        heating = kind == "temperature" and self._heating()
        if kind not in ("temperature", "unknown") or heating:
            # Progress (or a keep-alive); temperature auto-reports and noise are not, except during a heat-up
            # wait of a firmware without the busy protocol.  The timeout count is reset by an acknowledged line or
            # a keep-alive only: a resend request answering every probe must not keep a line that never gets
            # through alive for ever.
            self._last_rx = time.monotonic()
            if kind == "busy" or heating:
                self._timeouts = 0
        if self._file_list is not None:
            if "End file list" in line:
                self.sd_files, self._file_list = self._file_list, None
            elif reply.ok:
                self._on_ok()
            elif line.strip():
                name, _, size = line.strip().rpartition(" ")
                if not name or not size.isdigit():
                    name, size = line.strip(), ""
                self._file_list.append({"name": name, "size": int(size) if size else None})
            return
        self._collect_answer(reply, line)
        if reply.temperatures:
            self._on_temperatures(reply.temperatures)
        if reply.position:
            self.position = dict(reply.position)
        if kind == "resend":
            if reply.resend_line is not None:
                # Marlin, Prusa and Repetier follow "Resend: N" with an ok for the rejected line; the "rs N" of
                # Smoothie and Teacup comes alone.
                self._on_resend(reply.resend_line, line.lstrip()[:1] in ("R", "r") and
                                line.lstrip()[:6].lower() == "resend")
        elif kind == "wait":
            # An idle firmware (Repetier, OctoPrint's simulator) while we wait for an ok: that ok was lost.
            if self._ack_no < self._write_no:
                self.stats["lost_ok_on_wait"] += 1
                self._acknowledge(self._ack_no)
        elif kind == "skip":
            # Repetier already had this line (a resent copy): the ok that follows is the skip's.
            self._rejection_oks += 1
        elif kind == "error":
            self._on_error(reply, line)
        elif kind == "firmware" and reply.firmware:
            self.firmware.update(reply.firmware)
            self._firmware_seen.set()
        elif kind == "capability" and reply.capability:
            name, enabled = reply.capability
            self.capabilities[name] = enabled
        elif kind == "action" and reply.action:
            action = reply.action
            self._deferred.append(lambda: self.listener.on_action(action, line))
        elif kind == "start":
            self._booted.set()
            if self.state in CONNECTED_STATES:
                log.warning("link: the printer sent 'start' while connected (was it reset?)")
        if reply.sd:
            self._on_sd(reply.sd, line)
        if reply.ok:
            self._on_ok()
        if self._abort_heatups:
            self._abort_heatup()

    def abort_heatups(self) -> bool:
        """End the firmware's heat-up waits (M109, M190, M191, M116) with M108 until the link is idle, as
        OctoPrint does on cancel (serial.abortHeatupOnCancel): each wait in flight gets an M108 once it is the line
        executing, again every HEATUP_ABORT_INTERVAL while it still runs (an M108 that arrives just before the wait
        began is ignored by Marlin).  Only with the firmware's EMERGENCY_PARSER: without it the M108 would be read
        after the wait ended, where it does nothing.  False when not possible."""
        with self._lock:
            if not self._running or not self.capabilities.get("EMERGENCY_PARSER"):
                return False
            self._abort_heatups = True
            self._abort_heatup()
            return True

    def _abort_heatup(self):
        if self._ack_no >= self._write_no:
            if self._is_idle():
                self._abort_heatups = False
            return
        entry = self._history.get(self._ack_no)
        command = entry[1] if entry is not None else None
        if command is None or command.line.split(None, 1)[0].upper() not in _HEATUPS:
            return
        now = time.monotonic()
        number, sent = self._heatup_abort_sent
        if number == self._ack_no and now - sent < HEATUP_ABORT_INTERVAL:
            return
        self._heatup_abort_sent = (self._ack_no, now)
        log.info("link: ending the heat-up wait %r with M108", command.line)
        self._queue.appendleft(Command("M108", "job", emergency=True))
        self._cond.notify_all()

    def _heating(self) -> bool:
        for number in range(self._ack_no, min(self._write_no, self._ack_no + self.window)):
            entry = self._history.get(number)
            if entry is not None and entry[1] is not None and entry[1].line.split(None, 1)[0].upper() in _WAITS:
                return True
        return False

    def _on_ok(self):
        if self._rejection_oks:
            # The ok that follows a resend request acknowledges the rejection, not a line.
            self._rejection_oks -= 1
            return
        if self._ack_no >= self._written_upto:
            self.stats["unexpected_ok"] += 1
            return
        # Also when a rewind put writing back before it: some copy of the line got through after all, and
        # writing skips ahead instead of sending a duplicate.
        self._timeouts = 0
        self._acknowledge(self._ack_no)

    def _acknowledge(self, number: int):
        self._ack_no = number + 1
        if self._write_no < self._ack_no:
            self._write_no = self._ack_no
        if self._recovering and number >= self._resend_target:
            # A resent line got through: back to the full window.
            self._recovering = False
            self._resend_repeats = 0
        self._cond.notify_all()
        entry = self._history.get(number)
        command = entry[1] if entry is not None else None
        if command is not None and command.offset is not None:
            self.acknowledged_offset = command.offset
        if command is not None and command.on_done is not None:
            self._deferred.append(lambda: command.on_done(True))
        if self._idle_callbacks and self._is_idle():
            self._deferred.extend(self._idle_callbacks)
            self._idle_callbacks = []

    def _is_idle(self) -> bool:
        return not self._queue and self._ack_no >= self._next_line

    def _on_resend(self, number: int, followed_by_ok: bool):
        """Rewind to line ``number``.

        What a firmware did with the lines in flight after the rejected one is unknowable: Marlin flushes its
        receive buffer on every line error (those lines vanish without an answer), and rejects the ones that
        arrive later with the same request, flushing again, possibly our resent copies too.  So every request is
        taken as it comes: writing starts again at ``number``, one line at a time until a resent line is
        acknowledged (few stale copies, so few flushes), then with the full window.  A request caused by a stale
        copy only makes the firmware see a duplicate, which it answers with a request for the line it really
        wants; so rewinding is always safe."""
        self.stats["resend_requests"] += 1
        rejected, self._line_error = self._line_error, None
        if self._recovering and number == self._resend_target:
            if rejected is None:
                # A second request for one error (some firmwares repeat "Resend:"): it shares the error's ok.
                self.stats["resend_duplicates"] += 1
                return
            if rejected and rejected != number:
                # "expected line N got M" while already resending from N: the echo of a line written before the
                # rewind (or a stale copy), not of the copy of N on its way.  Rewinding again would send N twice
                # and make the firmware reject the second copy in turn: OctoPrint's "ignore resend requests for
                # already-resent lines".  Its ok is the rejection's.
                self.stats["resend_echoes_ignored"] += 1
                if followed_by_ok:
                    self._rejection_oks += 1
                return
        if followed_by_ok:
            self._rejection_oks += 1
        if number == self._resend_target and self._recovering:
            self._resend_repeats += 1
            if self._resend_repeats > RESEND_LOOP_LIMIT + 2 * self.window:
                self._resend_failed(f"the printer keeps requesting line {number} ({self._resend_repeats} times "
                                    "without progress): communication is stuck", "resend_loop")
                return
        else:
            self._resend_repeats = 1
        last = self._next_line - 1
        if number > last:
            if number == last + 1:
                return  # it only asks for the next line: nothing was lost
            self._resend_failed(f"the printer requested line {number}, but the last line sent was {last}",
                                "resend")
            return
        if number not in self._history:
            self._resend_failed(f"the printer requested line {number}, which is no longer in the history",
                                "resend")
            return
        self._resend_target = number
        self._recovering = True
        self._write_no = number
        self._ack_no = min(self._ack_no, number)
        log.info("link: resending from line %d (%d line(s))", number, last - number + 1)
        self._cond.notify_all()

    def _resend_failed(self, message: str, reason: str):
        self._deferred.append(lambda: self._close(message, reason, "disconnect"))

    def _on_error(self, reply, line: str):
        kind = reply.error_kind
        message = (reply.message or line).strip()
        if kind == "resend":
            self.stats["line_errors"] += 1
            got = _EXPECTED_GOT.search(message)
            self._line_error = int(got.group(2)) if got else 0
            return
        if kind == "command":
            log.info("link: the firmware refused a command: %s", message)
            return
        if kind == "fatal":
            if not self._m112_sent:
                # OctoPrint's rule: after a firmware error the printer is stopped for sure before closing.
                self._queue.appendleft(Command("M112", "firmware", emergency=True))
                self._cond.notify_all()
            self._deferred.append(lambda: self._fatal(message))
            return
        self._deferred.append(lambda: self._firmware_error(message))

    def _fatal(self, message: str):
        # Let the writer flush the M112 before the port closes.
        deadline = time.monotonic() + 0.5
        with self._cond:
            while self._running and self._queue and self._queue[0].emergency and time.monotonic() < deadline:
                self._cond.wait(0.02)
        self._close(message, "firmware", "emergency")

    def _firmware_error(self, message: str):
        consequence = self.listener.on_firmware_error(message)
        if consequence is None:
            log.error("link: firmware error: %s", message)
            self.emit("Error", {"error": message, "reason": "firmware", "consequence": None,
                                "logs": list(self.comm_log)})

    def _on_temperatures(self, temperatures: dict):
        current = self.temperature
        tools = dict(current["tools"])
        for key, value in temperatures.items():
            reading = [value[0], value[1]] if isinstance(value, (tuple, list)) else [value, None]
            if key == "B":
                current["bed"] = reading
            elif key == "C":
                current["chamber"] = reading
            elif key.startswith("T"):
                tools[key] = reading
        current["tools"] = tools
        self._temperature_pending = True
        now = time.monotonic()
        if now - self._temperature_emitted >= self.temperature_interval:
            self._emit_temperature(now)

    def _emit_temperature(self, now: float):
        self._temperature_pending = False
        self._temperature_emitted = now
        current = self.temperature
        self.emit("Temperature", {"tools": dict(current["tools"]), "bed": current["bed"],
                                  "chamber": current["chamber"]})

    def _on_sd(self, sd: dict, line: str):
        if "Begin file list" in line:
            self._file_list = []
            return
        self._deferred.append(lambda: self.listener.on_sd(sd, line))

    def capture_start(self):
        """Keep every reply line from now on (for a job operation that reads a command's answer, e.g. M23)."""
        with self._lock:
            self._capture = []

    def capture_stop(self) -> list:
        with self._lock:
            lines, self._capture = self._capture or [], None
            return lines

    # --- status --------------------------------------------------------------------------------------------------

    def status(self) -> dict:
        with self._lock:
            return {"state_id": self.state, "state_string": STATE_STRINGS.get(self.state, self.state),
                    "port": self.port, "baudrate": self.baudrate, "error": self.error,
                    "firmware": dict(self.firmware), "position": self.position,
                    "temperature": {"tools": dict(self.temperature["tools"]), "bed": self.temperature["bed"],
                                    "chamber": self.temperature["chamber"]},
                    "unacknowledged": self._write_no - self._ack_no, "queued": len(self._queue),
                    "stats": dict(self.stats)}
