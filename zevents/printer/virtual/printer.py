"""The virtual printer: a Marlin-like firmware simulator behind a pseudo-terminal that real pyserial talks to.

Owns the pty, the public API (``VirtualPrinter``, ``run`` for ``zevents virtual-printer``) and the two threads that
play the firmware:

* the *serial* thread reads the pty master (packet mode, so it sees when a client opens the port and flushes its
  input), splits lines, runs Marlin's emergency parser (M112, M108, M410, M876 act on arrival), applies injected
  faults, checks line numbers and checksums (resend requests in the firmware's form) and feeds a command buffer of
  ``buffer_size`` entries, like Marlin's ring buffer;
* the *firmware* thread executes buffered commands in order (moves through a planner of ``planner_size`` blocks,
  heaters, SD card, pauses) and acknowledges each one once it has run: ``zevents.printer.virtual.machine``.

Opening the port resets the simulated board (as a DTR reset does) and prints the boot banner; closing it is noticed
too (inotify on the device node, else the master's hang-up). Simulated time runs ``speed`` times faster than the wall
clock (``speed=0``: instant), while report and keep-alive intervals stay in wall-clock seconds, as a host measures
them. Reply layouts come from ``.firmware`` (Marlin, Prusa, Klipper, RepRapFirmware, Smoothieware, Repetier);
the simulated parts (heaters, planner, SD card, fault specs) from ``.parts``.

Usage from tests::

    with VirtualPrinter(speed=0) as vp:
        ser = serial.Serial(vp.port, 115200, timeout=1)
        ...
        vp.inject("corrupt_checksum")          # the next numbered line is answered with a resend request
        vp.inject("silent", seconds=2)         # nothing is read or answered for 2 s
"""
from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import math
import os
import random
import re
import select
import shutil
import signal
import struct
import sys
import tempfile
import termios
import threading
import time
import tty
from collections import deque
from pathlib import Path
from typing import Any, Callable, Deque, Dict, Iterable, List, Optional, Sequence, Union

from zevents.printer.virtual import firmware as fw
from zevents.printer.virtual.machine import FirmwareMachine, Queued
from zevents.printer.virtual.parts import LINE_FAULTS, Fault, SdCard, SimClock, checksum, parse_fault, parse_trigger

log = logging.getLogger(__name__)

__all__ = ["VirtualPrinter", "Fault", "parse_fault", "run", "FIRMWARES"]

FIRMWARES = tuple(fw.PROFILES)

_TIOCPKT_FLUSHREAD = 0x01
#: Input lines longer than this (bytes) are discarded whole, as an overflowing firmware line buffer would lose them.
MAX_INPUT_LINE = 1024
_LINE_END = re.compile(rb"[\r\n]")
_LINE_NUMBER = re.compile(rb"N\s*(-?\d+)\s*")
_M110 = re.compile(rb"\s*M110(?![\d.])")
_M110_ARG = re.compile(rb"N\s*(-?\d+)")
_EMERGENCY = re.compile(rb"^(?:N\s*-?\d+\s*)?(M112|M108|M410|M876)(?![\d.])")

class _OpenWatch:
    """Opens and closes of the pty's device node, from inotify (Linux).  pyserial's close-then-open of a port can be
    too quick for the master's hang-up to be seen; these events are never lost."""

    _IN_OPEN, _IN_CLOSE_WRITE, _IN_CLOSE_NOWRITE = 0x20, 0x08, 0x10

    def __init__(self, path: str):
        self._libc = ctypes.CDLL(None, use_errno=True)
        fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1 failed")
        mask = self._IN_OPEN | self._IN_CLOSE_WRITE | self._IN_CLOSE_NOWRITE
        if self._libc.inotify_add_watch(fd, os.fsencode(path), mask) < 0:
            error = ctypes.get_errno()
            os.close(fd)
            raise OSError(error, f"inotify_add_watch {path} failed")
        self.fd = fd

    def events(self) -> List[str]:
        """"open" / "close" for each event since the last call, in order."""
        found: List[str] = []
        while True:
            try:
                data = os.read(self.fd, 4096)
            except (BlockingIOError, OSError):
                return found
            offset = 0
            while offset + 16 <= len(data):
                _, mask, _, name_length = struct.unpack_from("iIII", data, offset)
                offset += 16 + name_length
                if mask & self._IN_OPEN:
                    found.append("open")
                if mask & (self._IN_CLOSE_WRITE | self._IN_CLOSE_NOWRITE):
                    found.append("close")

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


class VirtualPrinter(FirmwareMachine):
    """A simulated printer on a pseudo-terminal.  ``start()``, then open ``port`` with pyserial; ``stop()`` when done.

    Test hooks: ``inject`` (faults), ``user_continue`` (the LCD button / M108), ``reset`` (reset button),
    ``send_line`` / ``send_action`` (unsolicited firmware output), ``wait_received``; state: ``received``,
    ``position``, ``temperatures``, ``halted``, ``stats``.
    """

    def __init__(self, firmware: str = "marlin", speed: float = 100.0, tools: int = 1,
                 sd_dir: Union[str, os.PathLike, None] = None,
                 faults: Optional[Iterable[Union[str, Fault]]] = None, *,
                 crlf: Optional[bool] = None, link: Union[str, os.PathLike, None] = None,
                 buffer_size: int = 4, planner_size: int = 16, advanced_ok: bool = False,
                 reset_on_connect: bool = True, boot_delay: float = 0.3,
                 temp_report_interval: float = 1.0, busy_interval: float = 2.0,
                 keep_received: int = 100_000, seed: Optional[int] = None,
                 on_port: Optional[Callable[[str], None]] = None, bed: Optional[dict] = None):
        self.profile = fw.profile(firmware)
        self.clock = SimClock(speed)
        if not isinstance(tools, int) or isinstance(tools, bool) or not 1 <= tools <= 8:
            raise ValueError(f"tools must be an integer from 1 to 8, got {tools!r}")
        for name, value, low in (("buffer_size", buffer_size, 1), ("planner_size", planner_size, 1),
                                 ("keep_received", keep_received, 1)):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        for name, value in (("boot_delay", boot_delay), ("temp_report_interval", temp_report_interval),
                            ("busy_interval", busy_interval)):
            if not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
                raise ValueError(f"{name} must be a number of seconds >= 0, got {value!r}")
        if temp_report_interval == 0:
            raise ValueError("temp_report_interval must be > 0")
        self.tools = tools
        # Marlin's software endstops: moves are clamped to the build volume ({x_min, x_max, ...}); None: no limits
        self.bed = dict(bed) if bed else None
        self._planner_size = planner_size
        self.line_ending = (("\r\n" if crlf else "\n") if crlf is not None else self.profile.line_ending).encode()
        self.buffer_size = buffer_size
        self.advanced_ok = advanced_ok
        self.reset_on_connect = reset_on_connect
        self.boot_delay = float(boot_delay)
        self.temp_report_interval = float(temp_report_interval)
        self.default_busy_interval = float(busy_interval)
        self.link = Path(link) if link is not None else None
        if self.link is not None and self.link.exists() and not self.link.is_symlink():
            raise ValueError(f"link {str(link)!r} exists and is not a symlink; not replacing it")
        self._on_port = on_port
        self._rng = random.Random(seed)

        self._own_sd_dir = sd_dir is None
        self._sd_root = Path(sd_dir) if sd_dir is not None else None
        if self._sd_root is not None and self._sd_root.exists() and not self._sd_root.is_dir():
            raise ValueError(f"sd_dir {str(sd_dir)!r} exists and is not a directory")

        initial_faults = [f if isinstance(f, Fault) else parse_fault(f) for f in (faults or ())]

        # Everything below is shared between the serial thread, the firmware thread and callers; guarded by _lock.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._stopping = False
        self._generation = 0
        self._booted = False
        self._halted = False
        self._silent_until: Optional[float] = None
        self._user_continue = False
        self._quickstop = False
        self._waiting_for_user = False
        self._ring: Deque[Queued] = deque()
        self._out = bytearray()
        self._faults: List[Fault] = []
        self._drop_next = 0
        self._corrupt_next = 0
        self._keep_buffer = 0
        self._resend_twice = 0
        self._received: Deque[str] = deque(maxlen=keep_received)
        self._received_total = 0
        self._stats: Dict[str, int] = {k: 0 for k in (
            "boots", "lines_received", "commands_executed", "sd_commands_executed", "resends_requested",
            "lines_dropped", "checksums_corrupted", "bad_checksum_lines_dropped", "garbage_lines", "overlong_lines",
            "lines_discarded_while_booting", "duplicate_lines_skipped", "disconnects")}
        self._requests: List[str] = []           # asks for the serial thread: "disconnect", "reset"
        self._reopen_after: Optional[float] = None
        self._disconnected = threading.Event()

        # Owned by the serial thread.
        self._master: Optional[int] = None
        self.port: Optional[str] = None
        self._watch: Optional[_OpenWatch] = None
        self._open_count = 0
        self._client_present = False
        self._boot_at: Optional[float] = None
        self._reopen_at: Optional[float] = None
        self._rx = bytearray()
        self._discarding_line = False
        self._pending: Deque[bytes] = deque()
        self._last_n = 0
        self._lines_received = 0

        # Owned by the firmware thread (read by the snapshot properties).
        self._exec_generation = -1
        self._sd: Optional[SdCard] = None
        self._reset_machine()

        self._wake_r, self._wake_w = -1, -1
        self._threads: List[threading.Thread] = []
        self._started = False
        for fault in initial_faults:
            self._arm(fault)

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> "VirtualPrinter":
        if self._started or self._stopping:
            raise RuntimeError("a virtual printer starts once; make a new one")
        if self._sd_root is None:
            self._sd_root = Path(tempfile.mkdtemp(prefix="zevents-sd-"))
        else:
            self._sd_root.mkdir(parents=True, exist_ok=True)
        self._sd = SdCard(self._sd_root)
        self._wake_r, self._wake_w = os.pipe()
        for fd in (self._wake_r, self._wake_w):
            os.set_blocking(fd, False)
        try:
            self._open_pty()
        except OSError:
            self._close_master()
            for fd in (self._wake_r, self._wake_w):
                os.close(fd)
            raise
        self._started = True
        self._threads = [threading.Thread(target=self._serial_main, name="virtual-printer-serial", daemon=True),
                         threading.Thread(target=self._firmware_main, name="virtual-printer-firmware", daemon=True)]
        for thread in self._threads:
            thread.start()
        log.info("virtual printer (%s, speed %g, %d tool(s)) on %s", self.profile.name, self.clock.speed,
                 self.tools, self.port)
        return self

    def stop(self) -> None:
        if not self._started:
            return
        with self._lock:
            self._stopping = True
            self._cond.notify_all()
        self._wake()
        for thread in self._threads:
            thread.join(timeout=10)
            if thread.is_alive():
                log.error("virtual printer thread %s did not stop", thread.name)
        self._close_master()
        for fd in (self._wake_r, self._wake_w):
            try:
                os.close(fd)
            except OSError:
                pass
        if self._sd is not None:
            self._sd.close()
        if self._own_sd_dir and self._sd_root is not None:
            shutil.rmtree(self._sd_root, ignore_errors=True)
        self._remove_link()
        self._started = False

    def __enter__(self) -> "VirtualPrinter":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ test hooks

    def inject(self, kind: str, at: Union[int, str, None] = None, **params: Any) -> Fault:
        """Injects a fault; ``at`` = n-th received line (``100``) or line number (``"N100"``), else right now.

        ``drop_line`` / ``corrupt_checksum`` without ``at`` act on the next received (numbered) line.  ``silent``
        (``seconds=None`` = until ``recover()``), ``disconnect`` (``reopen_after`` seconds, else for good),
        ``garbage`` (``kind`` random|utf8|long|mixed) and ``firmware_error`` act immediately.
        """
        at_count, at_number = parse_trigger(at)
        fault = Fault(kind, at_count, at_number, params)
        self._arm(fault)
        return fault

    def recover(self) -> None:
        """Ends a ``silent`` fault now."""
        with self._lock:
            self._silent_until = None
            self._cond.notify_all()
        self._wake()

    def user_continue(self) -> None:
        """Presses the LCD button: ends a wait for the user (M0/M1/M600) or a heating wait, like M108.  Only a wait
        already in progress ends (see ``waiting_for_user``), as in Marlin."""
        with self._lock:
            self._user_continue = True
            self._cond.notify_all()

    def reset(self) -> None:
        """Presses the reset button: the board reboots (the banner follows) and a halt is cleared."""
        self._request("reset")

    def send_line(self, line: str) -> None:
        """Sends one line from the firmware as it is (e.g. ``//action:cancel``), between acknowledgements."""
        self._emit([line])

    def send_action(self, action: str) -> None:
        """Sends a host action command: ``//action:<action>`` (pause, resume, cancel, ...)."""
        self._emit([f"//action:{action}"])

    def wait_received(self, match: Union[str, Callable[[str], bool]], timeout: float = 5.0) -> bool:
        """Waits until a command has been executed that matches (a string matches a command's start,
        case-insensitively); commands executed before the call count.  False after ``timeout`` seconds."""
        if isinstance(match, str):
            prefix = match.upper()
            predicate: Callable[[str], bool] = lambda command: command.upper().startswith(prefix)
        else:
            predicate = match
        deadline = time.monotonic() + timeout
        seen_total = 0
        with self._lock:
            while True:
                new = self._received_total - seen_total
                if new > 0:
                    window = list(self._received)[-min(new, len(self._received)):]
                    if any(predicate(command) for command in window):
                        return True
                    seen_total = self._received_total
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._cond.wait(remaining)

    @property
    def received(self) -> List[str]:
        """Commands accepted from the host, in execution order (line number and checksum removed)."""
        with self._lock:
            return list(self._received)

    @property
    def stats(self) -> Dict[str, int]:
        with self._lock:
            return dict(self._stats)

    @property
    def halted(self) -> bool:
        return self._halted

    @property
    def silent(self) -> bool:
        with self._lock:
            return self._is_silent(time.monotonic())

    @property
    def client_connected(self) -> bool:
        return self._client_present

    @property
    def waiting_for_user(self) -> bool:
        return self._waiting_for_user

    @property
    def sd_dir(self) -> Optional[Path]:
        return self._sd_root

    @property
    def sd_printing(self) -> bool:
        return bool(self._sd and self._sd.printing)

    @property
    def position(self) -> Dict[str, float]:
        x, y, z, e = self._logical
        return {"x": x, "y": y, "z": z, "e": e}

    @property
    def temperatures(self) -> Dict[str, Any]:
        snapshot = self._temperature_snapshot()
        return {"tools": [(h.actual, h.target) for h in snapshot.tools],
                "bed": (snapshot.bed.actual, snapshot.bed.target), "active_tool": snapshot.active_tool}

    # ------------------------------------------------------------------ shared helpers

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except (BlockingIOError, OSError):
            pass  # a full pipe already wakes the serial thread; a closed one means we are stopping

    def _request(self, what: str) -> None:
        with self._lock:
            self._requests.append(what)
        self._wake()

    def _is_silent(self, now: float) -> bool:
        if self._silent_until is None:
            return False
        if now >= self._silent_until:
            self._silent_until = None
            return False
        return True

    def _emit(self, lines: Sequence[str], generation: Optional[int] = None) -> bool:
        """Queues reply lines for the host.  With a generation, lines of a command from before a halt or reboot
        are dropped, so nothing follows a halt message."""
        data = b"".join(line.encode("utf-8", "replace") + self.line_ending for line in lines)
        return self._emit_bytes(data, generation)

    def _emit_bytes(self, data: bytes, generation: Optional[int] = None) -> bool:
        with self._lock:
            if generation is not None and (generation != self._generation or self._halted):
                return False
            if self._master is None or not self._client_present:
                return False  # nobody listening: a real board's output is lost too
            self._out += data
            if self._flush_locked():
                return True
        self._wake()  # the pty is full (or the printer is silent): the serial thread writes the rest later
        return True

    def _flush_locked(self) -> bool:
        """Writes queued output to the master without blocking; True when nothing is left.  Call with the lock
        held: any thread may flush, and output keeps its order."""
        if not self._out or self._master is None:
            return True
        if self._is_silent(time.monotonic()):
            return False
        try:
            written = os.write(self._master, self._out)
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise
            self._out.clear()  # the client has gone; the serial thread notices the hang-up
            return True
        del self._out[:written]
        return not self._out

    def _halt(self, lines: Sequence[str], why: str) -> None:
        """The firmware prints its last words and then ignores everything until a reset or reconnect."""
        with self._lock:
            if self._halted:
                return
            self._halted = True
            self._ring.clear()
            if self._master is not None and self._client_present:
                self._out += b"".join(line.encode() + self.line_ending for line in lines)
                self._flush_locked()
            self._cond.notify_all()
        log.warning("virtual printer halted (%s)", why)
        self._wake()

    def _arm(self, fault: Fault) -> None:
        """Registers a fault; faults without a trigger act now (line faults: on the next line)."""
        log.info("virtual printer: fault %s armed", fault)
        if fault.triggered_by_line:
            with self._lock:
                self._faults.append(fault)
            return
        if fault.kind in LINE_FAULTS:
            with self._lock:
                if fault.kind == "drop_line":
                    self._drop_next += fault.params["count"]
                else:
                    self._corrupt_next += fault.params["count"]
            return
        self._activate(fault, from_serial_thread=False)

    def _activate(self, fault: Fault, from_serial_thread: bool) -> None:
        kind, params = fault.kind, fault.params
        if kind == "drop_line":
            with self._lock:
                self._drop_next += params["count"]
        elif kind == "corrupt_checksum":
            with self._lock:
                self._corrupt_next += params["count"]
        elif kind in ("keep_buffer", "resend_twice"):
            with self._lock:
                setattr(self, "_" + kind, getattr(self, "_" + kind) + params["count"])
        elif kind == "silent":
            seconds = params["seconds"]
            with self._lock:
                self._silent_until = math.inf if seconds is None else time.monotonic() + seconds
                self._cond.notify_all()
            log.info("virtual printer: silent %s", "until recover()" if seconds is None else f"for {seconds} s")
        elif kind == "garbage":
            self._emit_garbage(params["kind"], params["size"])
        elif kind == "firmware_error":
            self._halt(self.profile.fatal_error(params["message"]), f"injected error: {params['message']}")
        elif kind == "disconnect":
            self._disconnected.clear()
            with self._lock:
                self._reopen_after = params["reopen_after"]
            if from_serial_thread:
                self._do_disconnect()
            else:
                self._request("disconnect")
                if self._started and not self._disconnected.wait(5):
                    log.error("virtual printer: disconnect did not happen within 5 s")

    def _emit_garbage(self, kind: str, size: int) -> None:
        kinds = ("random", "utf8", "long") if kind == "mixed" else (kind,)
        chunks = []
        for each in kinds:
            if each == "random":
                # Any byte but a line end, so the garbage is exactly one line.
                chunks.append(bytes(self._rng.choice([b for b in range(256) if b not in (10, 13)])
                                    for _ in range(64)))
            elif each == "utf8":
                chunks.append(b"\xff\xfe ok T:\xc3\x28 \xe2\x82 invalid utf-8 \x80\x81\xc0\xaf")
            else:
                pattern = b"garbage-0123456789-"
                chunks.append((pattern * (size // len(pattern) + 1))[:size])
        with self._lock:
            self._stats["garbage_lines"] += len(chunks)
        self._emit_bytes(b"".join(chunk + self.line_ending for chunk in chunks))

    # ------------------------------------------------------------------ pseudo-terminal

    def _open_pty(self) -> None:
        master, slave = os.openpty()
        try:
            tty.setraw(master)
            tty.setraw(slave)
            attrs = termios.tcgetattr(slave)
            attrs[3] &= ~(termios.ECHO | termios.ECHONL)
            termios.tcsetattr(slave, termios.TCSANOW, attrs)
            port = os.ttyname(slave)
            os.chmod(port, 0o660)
            # Packet mode: the master sees the client's input flushes (pyserial flushes when it opens the port).
            fcntl.ioctl(master, termios.TIOCPKT, struct.pack("i", 1))
            os.set_blocking(master, False)
        except OSError:
            os.close(master)
            os.close(slave)
            raise
        # No slave descriptor is kept open here: the master then sees a hang-up whenever no client has the port open.
        os.close(slave)
        try:
            watch: Optional[_OpenWatch] = _OpenWatch(port)
        except (OSError, AttributeError) as exc:
            log.info("virtual printer: no inotify (%s); noticing reopens by hang-up only", exc)
            watch = None
        with self._lock:
            self._master = master
            self.port = port
            self._client_present = False
        self._watch, self._open_count = watch, 0
        self._make_link()  # an OSError here leaves the master set: start() closes it
        if self._on_port is not None:
            try:
                self._on_port(port)
            except Exception:  # a reporting callback must not take the printer down
                log.exception("virtual printer: on_port callback failed")

    def _close_master(self) -> None:
        with self._lock:
            master, self._master = self._master, None
            self._client_present = False
            self._out.clear()
        if master is not None:
            try:
                os.close(master)
            except OSError:
                pass
        if self._watch is not None:
            self._watch.close()
            self._watch = None

    def _make_link(self) -> None:
        if self.link is None or self.port is None:
            return
        if self.link.exists() and not self.link.is_symlink():
            raise FileExistsError(f"{self.link} exists and is not a symlink; not replacing it")
        temporary = self.link.with_name(f".{self.link.name}.{os.getpid()}.tmp")
        try:
            try:
                temporary.unlink()
            except FileNotFoundError:
                pass
            os.symlink(self.port, temporary)
            os.replace(temporary, self.link)  # atomic: a reconnect re-points the link without a gap
        except OSError as exc:
            raise OSError(exc.errno, f"cannot make the link {self.link}: {exc.strerror}") from None

    def _remove_link(self) -> None:
        if self.link is None:
            return
        try:
            if self.link.is_symlink() and os.readlink(self.link) == self.port:
                self.link.unlink()
        except OSError:
            pass

    # ------------------------------------------------------------------ serial thread

    def _serial_main(self) -> None:
        try:
            self._serial_loop()
        except Exception:
            log.exception("virtual printer: serial thread failed")
            self._close_master()

    def _serial_loop(self) -> None:
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        masks: Dict[int, int] = {}  # what is registered besides the wake pipe

        def watch_fds(wanted: Dict[int, int]) -> None:
            for fd in [fd for fd in masks if fd not in wanted]:
                poller.unregister(fd)
                del masks[fd]
            for fd, mask in wanted.items():
                if fd not in masks:
                    poller.register(fd, mask)
                elif masks[fd] != mask:
                    poller.modify(fd, mask)
                masks[fd] = mask

        while True:
            with self._lock:
                if self._stopping:
                    return
                requests, self._requests = self._requests, []
            for request in requests:
                if request == "disconnect":
                    self._do_disconnect()
                elif request == "reset":
                    self._reboot(immediate_banner=True)
            master = self._master
            if master is None:
                watch_fds({})
                self._wait_for_reopen()
                continue

            now = time.monotonic()
            with self._lock:
                silent = self._is_silent(now)
                want_write = bool(self._out) and not silent
                silent_until = self._silent_until
            timeout = 1.0
            if self._boot_at is not None:
                timeout = min(timeout, max(0.0, self._boot_at - now))
            if silent_until is not None:
                timeout = min(timeout, max(0.0, silent_until - now))
            wanted = {self._watch.fd: select.POLLIN} if self._watch is not None else {}
            # Without a client the master polls hung up at once: with the open watch it is left out until a
            # client opens the port; without the watch it is looked at again after a short nap.
            listen = self._client_present or self._watch is None
            if listen:
                # A hung (silent) firmware reads nothing: input waits in the pty, where the host's writes back up.
                wanted[master] = (0 if silent else select.POLLIN) | (select.POLLOUT if want_write else 0)
            watch_fds(wanted)
            events = dict(poller.poll(timeout * 1000))
            if events.get(self._wake_r):
                self._drain_wake()
            # Opens and closes first: a client's open is always queued before anything it then does.
            if self._watch is not None and events.get(self._watch.fd):
                self._track_opens()

            master_events = events.get(master, 0) if listen else 0
            if master_events & select.POLLHUP and not master_events & select.POLLIN:
                # The hang-up may be stale: the client can have closed and reopened the port since the poll.
                self._track_opens()
                if self._hung_up(master):
                    self._client_gone()
                    self._open_count = 0
                    self._nap(0.02)
                continue
            if listen and not self._client_present and self._watch is None:
                self._client_opened()
            if master_events & select.POLLIN:
                self._read_master(master)
            if self._master != master or not self._client_present:
                continue  # a fault disconnected us, or the client went away while we read
            if self._boot_at is not None and time.monotonic() >= self._boot_at:
                self._boot()
            self._drain_pending()
            with self._lock:
                self._flush_locked()

    @staticmethod
    def _hung_up(master: int) -> bool:
        probe = select.poll()
        probe.register(master, 0)
        return any(revents & select.POLLHUP for _, revents in probe.poll(0))

    def _track_opens(self) -> None:
        """Follows opens and closes of the device node: a reopen resets the board even when it is too quick for
        the hang-up to be seen."""
        if self._watch is None:
            return
        for event in self._watch.events():
            if event == "open":
                self._open_count += 1
                if self._open_count == 1:
                    self._client_opened()
            else:
                self._open_count = max(0, self._open_count - 1)
                if self._open_count == 0:
                    self._client_gone()

    def _drain_wake(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def _nap(self, seconds: float) -> None:
        """Sleeps on the wake pipe and the open watch only."""
        sleeper = select.poll()
        sleeper.register(self._wake_r, select.POLLIN)
        if self._watch is not None:
            sleeper.register(self._watch.fd, select.POLLIN)
        sleeper.poll(seconds * 1000)
        self._drain_wake()

    def _wait_for_reopen(self) -> None:
        if self._reopen_at is None:
            self._nap(1.0)
            return
        remaining = self._reopen_at - time.monotonic()
        if remaining > 0:
            self._nap(min(remaining, 1.0))
            return
        self._reopen_at = None
        try:
            self._open_pty()
            log.info("virtual printer: reconnected on %s", self.port)
        except OSError as exc:
            log.error("virtual printer: cannot open a new pseudo-terminal: %s", exc)

    def _read_master(self, master: int) -> None:
        try:
            packet = os.read(master, 65536)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno == errno.EIO:
                self._client_gone()
                return
            raise
        if not packet:
            return
        control, data = packet[0], packet[1:]
        if control != 0:
            if control & _TIOCPKT_FLUSHREAD and self._boot_at is not None:
                self._boot()  # the client has just opened the port and flushed: the banner will reach it
            return
        with self._lock:
            halted, booted = self._halted, self._booted
        if not booted:
            with self._lock:
                self._stats["lines_discarded_while_booting"] += data.count(b"\n")
            return
        if halted:
            return  # a killed firmware reads nothing
        self._split_lines(data)

    def _client_opened(self) -> None:
        self._client_present = True
        log.info("virtual printer: a client opened %s", self.port)
        with self._lock:
            first = self._stats["boots"] == 0
        if self.reset_on_connect or first:
            self._reboot(immediate_banner=False)

    def _client_gone(self) -> None:
        if not self._client_present:
            return
        log.info("virtual printer: the client closed %s", self.port)
        with self._lock:
            self._client_present = False
            self._out.clear()
        self._pending.clear()
        self._rx.clear()

    def _reboot(self, immediate_banner: bool) -> None:
        """A board reset: the firmware forgets everything and prints its banner once booted."""
        with self._lock:
            self._generation += 1
            self._booted = False
            self._halted = False
            self._silent_until = None
            self._ring.clear()
            self._out.clear()
            self._user_continue = False
            self._cond.notify_all()
        self._pending.clear()
        self._rx.clear()
        self._discarding_line = False
        self._last_n = 0
        self._boot_at = time.monotonic() + (0 if immediate_banner else self.boot_delay)
        if immediate_banner:
            self._boot()

    def _boot(self) -> None:
        self._boot_at = None
        with self._lock:
            self._stats["boots"] += 1
            sd_present = self._sd is not None
        self._emit(self.profile.boot_lines(self.tools, sd_present))
        with self._lock:
            self._booted = True
            self._cond.notify_all()

    def _do_disconnect(self) -> None:
        with self._lock:
            reopen_after = self._reopen_after
            self._stats["disconnects"] += 1
            self._ring.clear()  # the board keeps running (an SD print goes on); what was in flight is lost
        self._close_master()
        self._pending.clear()
        self._rx.clear()
        self._reopen_at = None if reopen_after is None else time.monotonic() + reopen_after
        log.info("virtual printer: disconnected (%s)",
                 "for good" if reopen_after is None else f"new port in {reopen_after} s")
        self._disconnected.set()

    # ---- lines in

    def _split_lines(self, data: bytes) -> None:
        self._rx += data
        start = 0
        rx = self._rx
        while True:
            match = _LINE_END.search(rx, start)
            if match is None:
                break
            end = match.start()
            if self._discarding_line:
                self._discarding_line = False
            elif end - start > MAX_INPUT_LINE:
                self._overlong_line()
            else:
                self._on_line(bytes(rx[start:end]))
                if self._master is None:  # a fault disconnected us mid-chunk
                    return
            start = end + 1
        del rx[:start]
        if len(rx) > MAX_INPUT_LINE:
            rx.clear()
            self._discarding_line = True
            self._overlong_line()

    def _overlong_line(self) -> None:
        log.warning("virtual printer: input line longer than %d bytes discarded", MAX_INPUT_LINE)
        with self._lock:
            self._stats["overlong_lines"] += 1

    def _on_line(self, raw: bytes) -> None:
        line = raw.split(b";", 1)[0].strip()  # Marlin does not store what follows ';'
        if not line:
            return
        self._lines_received += 1
        ordinal = self._lines_received
        numbered = _LINE_NUMBER.match(line)
        line_number = int(numbered.group(1)) if numbered else None
        with self._lock:
            self._stats["lines_received"] += 1
            triggered = [f for f in self._faults if f.matches(ordinal, line_number)]
            for fault in triggered:
                self._faults.remove(fault)
        for fault in triggered:
            log.info("virtual printer: fault %s triggered by line %d %r", fault, ordinal, line[:60])
            self._activate(fault, from_serial_thread=True)
            if self._master is None or self._halted:
                return
        with self._lock:
            if self._drop_next > 0:
                self._drop_next -= 1
                self._stats["lines_dropped"] += 1
                log.info("virtual printer: dropped line %r (fault)", line[:60])
                return
        if self.profile.emergency_parser:
            emergency = _EMERGENCY.match(line)
            if emergency:
                self._emergency(emergency.group(1).decode())
                if self._halted:
                    return
        self._pending.append(line)

    def _emergency(self, word: str) -> None:
        if word == "M112":
            self._halt(self.profile.halted(), "M112")
        elif word in ("M108", "M876"):
            with self._lock:
                self._user_continue = True
                self._cond.notify_all()
        elif word == "M410":
            with self._lock:
                self._quickstop = True
                self._cond.notify_all()

    def _drain_pending(self) -> None:
        """Moves received lines into the command buffer while it has room, checking each line as Marlin does."""
        while self._pending:
            with self._lock:
                if self._halted:
                    self._pending.clear()
                    return
                if self._is_silent(time.monotonic()) or len(self._ring) >= self.buffer_size:
                    return
                generation = self._generation
            accepted = self._check_line(self._pending.popleft())
            if accepted is None:
                continue
            body, line_number = accepted
            text = body.decode("utf-8", "replace").strip()
            if not text:
                continue
            with self._lock:
                if generation != self._generation:
                    return
                self._ring.append(Queued(text, line_number, generation))
                self._cond.notify_all()

    def _check_line(self, line: bytes):
        """Line number and checksum check; returns (body, line number) or None when the line is refused."""
        numbered = _LINE_NUMBER.match(line)
        star = line.rfind(b"*")
        policy = self.profile.checksum_policy
        corrupt = False
        if star >= 0:
            with self._lock:
                if self._corrupt_next > 0:
                    self._corrupt_next -= 1
                    self._stats["checksums_corrupted"] += 1
                    corrupt = True
        if star >= 0:
            given = line[star + 1:].strip()
            checksum_ok = given.isdigit() and int(given) == checksum(line[:star]) and not corrupt
        else:
            checksum_ok = False
        if numbered is None:
            if star < 0:
                if _M110.match(line):
                    argument = _M110_ARG.search(line, 4)
                    if argument:
                        self._last_n = int(argument.group(1))
                return line, None
            body = line[:star]
            if policy == fw.IGNORE:
                return body, None
            if policy == fw.DROP:
                return (body, None) if checksum_ok else self._drop_bad(line)
            return self._refuse(fw.NO_LINE_NUMBER, None)
        number = int(numbered.group(1))
        body = line[numbered.end():star] if star >= 0 else line[numbered.end():]
        if policy == fw.IGNORE:
            return body, number
        is_m110 = _M110.match(body) is not None
        effective = number
        if is_m110:
            argument = _M110_ARG.search(body, body.index(b"M110") + 4)
            if argument:
                effective = int(argument.group(1))
        if policy == fw.DROP:
            if not checksum_ok:
                return self._drop_bad(line)
            self._last_n = effective
            return body, number
        if not is_m110 and number != self._last_n + 1:
            return self._refuse(fw.DUPLICATE if number <= self._last_n else fw.LINE_NUMBER, number)
        if star < 0:
            return self._refuse(fw.NO_CHECKSUM, number)
        if not checksum_ok:
            return self._refuse(fw.CHECKSUM, number)
        self._last_n = effective
        return body, number

    def _drop_bad(self, line: bytes) -> None:
        log.info("virtual printer: line with a bad checksum dropped silently (%s): %r", self.profile.name, line[:60])
        with self._lock:
            self._stats["bad_checksum_lines_dropped"] += 1
        return None

    def _refuse(self, kind: str, got: Optional[int]) -> None:
        if kind == fw.DUPLICATE and isinstance(self.profile, fw.RepetierProfile):
            with self._lock:
                self._stats["duplicate_lines_skipped"] += 1
            self._emit(self.profile.line_error(kind, self._last_n, got))
            return None
        log.info("virtual printer: %s error (last line %d, got %s): resend requested", kind, self._last_n, got)
        with self._lock:
            self._stats["resends_requested"] += 1
            keep = self._keep_buffer > 0
            self._keep_buffer -= keep
            twice = self._resend_twice > 0
            self._resend_twice -= twice
        answer = self.profile.line_error(kind, self._last_n, got)
        if keep:
            # Lines still in the buffer are each refused in turn, naming the line number they carry.
            if got is not None and kind in (fw.LINE_NUMBER, fw.DUPLICATE):
                answer = [f"Error:expected line {self._last_n + 1} got {got}"] + answer[1:]
        else:
            # Marlin empties its receive buffer after a line error: everything already sent must come again.
            self._pending.clear()
        if twice:
            answer = [line for line in answer for _ in range(2 if line.lower().startswith(("resend", "rs ")) else 1)]
        self._emit(answer)
        return None

# ---------------------------------------------------------------------- command line

def run(link: Optional[str] = None, firmware: str = "marlin", speed: float = 100.0, tools: int = 1,
        sd_dir: Optional[str] = None, faults: Sequence[str] = (), crlf: Optional[bool] = None,
        verbose: bool = False, out=None) -> int:
    """``zevents virtual-printer``: prints the device path (again after each reconnect), serves until SIGINT or
    SIGTERM, exits 0; 2 for bad options, 1 when the pseudo-terminal cannot be made."""
    out = out or sys.stdout
    if verbose:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
        logging.getLogger("zevents.printer").addHandler(handler)
        logging.getLogger("zevents.printer").setLevel(logging.INFO)

    def announce(port: str) -> None:
        print(port, file=out, flush=True)

    try:
        printer = VirtualPrinter(firmware=firmware, speed=speed, tools=tools, sd_dir=sd_dir,
                                 faults=[parse_fault(spec) for spec in faults], crlf=crlf, link=link,
                                 on_port=announce)
    except ValueError as exc:
        print(f"zevents: virtual-printer: {exc}", file=sys.stderr)
        return 2

    stop = threading.Event()
    previous = {}
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, signal.SIGTERM):
            previous[signum] = signal.signal(signum, lambda *_: stop.set())
    try:
        try:
            printer.start()
        except (OSError, FileExistsError) as exc:
            print(f"zevents: virtual-printer: {exc}", file=sys.stderr)
            return 1
        if link:
            print(f"zevents: virtual-printer: {link} -> {printer.port}", file=sys.stderr, flush=True)
        while not stop.wait(0.5):
            pass
        return 0
    finally:
        printer.stop()
        for signum, handler in previous.items():
            signal.signal(signum, handler)
