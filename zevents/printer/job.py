"""Print jobs on top of the link: file selection, printing a local file or a file on the printer's SD card,
pause/resume/cancel with the head position, progress, SD listing and upload, and the custom G-code scripts that run
around a job.

It owns the file and printing events: FileSelected/FileDeselected, PrintStarted, PrintProgress (``print/``, at most
once per percent), PrintDone, PrintFailed, PrintCancelling, PrintCancelled, PrintPaused, PrintResumed, ChartMarked,
TransferStarted/TransferDone and ``GcodeScript<Name>Running/Finished``.

Every operation that waits for the printer (pause asks for an M114, finishing waits for the last ``ok``) runs on
one worker thread (``Jobs.submit``), so operations never interleave and the link's threads never block.  Event
order of a local print: PrintStarted, ChartMarked(print), [beforePrintStarted script], the file's gcode events and
PrintProgress, FINISHING, [afterPrintDone script], PrintDone, ChartMarked(done), OPERATIONAL.  A cancel:
PrintCancelling, (in-flight lines acknowledged, M114), [afterPrintCancelled], PrintCancelled, PrintFailed
(reason ``cancelled``), ChartMarked(cancel).  A link lost mid-print: PrintFailed (reason ``error``).
"""
from __future__ import annotations

import concurrent.futures
import logging
import os
import re
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from zevents import events as zevents_events
from zevents.parser import NotGcodeError, check_gcode_file, describe_file_error
from zevents.printer.link import LinkError, LinkListener, PrinterLink, strip_line
from zevents.printer.scan import MarkerLayers, scan_file

log = logging.getLogger("zevents.printer.job")

PRINTING_STATES = ("PRINTING", "PAUSING", "PAUSED", "RESUMING", "CANCELLING", "FINISHING", "STARTING")
_FILE_OPENED = re.compile(r"File opened:\s*(\S+)\s+Size:\s*(\d+)", re.IGNORECASE)
_SD_PROGRESS = re.compile(r"SD printing byte\s+(\d+)\s*/\s*(\d+)", re.IGNORECASE)


#: OctoPrint's default GCODE scripts.  afterPrintCancelled: motors off, every hotend and the bed off, fan off
#: (``{hotends}`` is one ``M104 T<n> S0`` per extruder the firmware reports); the others empty.  Each is replaced
#: by ``printer.scripts.<name>`` (an empty string turns it off).
DEFAULT_SCRIPTS = {
    "beforePrintStarted": "",
    "afterPrintDone": "",
    "afterPrintCancelled": "; disable motors\nM84\n; disable all heaters\n{hotends}\nM140 S0\n; disable fan\nM106 S0",
}


class JobError(RuntimeError):
    """A job request that cannot be honoured now; the message says why."""


@dataclass
class FileRef:
    name: str
    path: str
    origin: str          # "local" or "sdcard"
    size: int | None

    def payload(self, user: str | None = None) -> dict:
        return {"name": self.name, "path": self.path, "origin": self.origin, "size": self.size, "owner": user}


def sd_name(path: str) -> str:
    """An 8.3 name for a local file on the printer's SD card (what Marlin's FAT code can open)."""
    stem = re.sub(r"[^a-z0-9_]", "", Path(path).stem.lower())[:8] or "upload"
    return f"{stem}.gco"


SD_NAME = re.compile(r"[A-Za-z0-9_~-]{1,8}(\.[A-Za-z0-9_~-]{1,3})?")


def sd_name_problem(name: str) -> str | None:
    """Why ``name`` cannot be an SD card file name (None if it can): Marlin's FAT code opens 8.3 names only, and
    a longer one is cut or refused by the firmware after the whole upload."""
    if SD_NAME.fullmatch(name or ""):
        return None
    return (f"{name!r} is not an 8.3 name for the SD card: up to 8 letters, digits, '_', '-' or '~', then "
            "optionally '.' and up to 3 (e.g. cube20.gco)")


class LocalSource:
    """Lines of a local file for the link, with progress (at most one PrintProgress per percent).

    The file must stay what it was when the job started: its size and modification time are checked every
    ``CHECK_EVERY`` bytes and at its end, and a file that changed (truncated, appended to, rewritten in place)
    ends the stream with ``error`` saying so.  A file replaced by a new one (the usual atomic save) is no change:
    the open descriptor keeps reading the file that was started."""

    src = "job"
    parse = True
    reports_progress = True
    CHECK_EVERY = 64 * 1024

    def __init__(self, jobs: "Jobs", ref: FileRef):
        self.jobs = jobs
        self.ref = ref
        self.file = open(ref.path, "rb")
        started = os.fstat(self.file.fileno())
        self.identity = (started.st_size, started.st_mtime_ns)
        self.size = started.st_size
        self.position = 0
        self.percent = -1
        self.checked = 0
        self.error: str | None = None
        self.layers = None   # MarkerLayers when the file has layer markers (set by the job at its start)

    def gcode_events(self, raw: str, found, parser):
        return self.layers.events(raw, found, parser) if self.layers is not None else found

    def _changed(self, at_end: bool) -> str | None:
        try:
            now = os.fstat(self.file.fileno())
        except (OSError, ValueError) as exc:
            return f"{self.ref.name} cannot be read any more: {exc}"
        if (now.st_size, now.st_mtime_ns) != self.identity or (at_end and self.position != self.size):
            return (f"{self.ref.name} changed while it was printing ({self.size} bytes at the start, "
                    f"{now.st_size} now, {self.position} sent): stopping rather than send what is not the file "
                    "that was started")
        return None

    def _stop(self, error: str):
        self.error = error
        self.close()
        return None

    def next_line(self):
        if self.error is not None:
            return None
        raw = self.file.readline()
        after = self.position + len(raw)
        if not raw or after > self.size or after - self.checked >= self.CHECK_EVERY:
            self.checked = self.position
            changed = self._changed(at_end=not raw)
            if changed:
                return self._stop(changed)
        if not raw:
            self.close()
            return None
        self.position += len(raw)
        line = raw.rstrip(b"\r\n").decode("utf-8", "replace")
        link = self.jobs.link
        too_long = link.too_long(strip_line(line)) if len(line) > link.max_line > 0 else None
        if too_long:
            return self._stop(f"{self.ref.name}: {too_long}")
        if self.size and self.reports_progress:
            percent = min(100, self.position * 100 // self.size)
            if percent > self.percent:
                self.percent = percent
                self.jobs.progress(percent, self.position)
        return line

    def close(self):
        try:
            self.file.close()
        except OSError:
            pass


class UploadSource(LocalSource):
    """A local file streamed between M28 and M29: not parsed (the printer stores it, nothing moves) and no print
    progress."""

    parse = False
    reports_progress = False


class Jobs(LinkListener):
    """Selection, the running job and its controls, for one link."""

    def __init__(self, link: PrinterLink, scripts: dict | None = None, sd_poll_interval: float = 1.0,
                 wait_timeout: float | None = None, abort_heatup_on_cancel: bool = True):
        self.link = link
        self.abort_heatup_on_cancel = abort_heatup_on_cancel
        link.listener = self
        self.scripts = dict(DEFAULT_SCRIPTS)
        self.scripts.update({k: v for k, v in (scripts or {}).items() if isinstance(v, str)})
        self.sd_poll_interval = sd_poll_interval
        self.wait_timeout = wait_timeout or max(30.0, link.timeout * (link.retries + 1))
        self.selected: FileRef | None = None
        self.active: FileRef | None = None
        self.source: LocalSource | None = None
        self.user: str | None = None
        self.started: float | None = None
        self.progress_percent: float | None = None
        self.fileposition: int | None = None
        self.transfer: dict | None = None
        self._finish_after_resume = None
        self._lock = threading.RLock()
        self._sd_poller: threading.Thread | None = None
        self._poll_wakeup = threading.Event()  # never set: a stoppable sleep for the M27 poller
        self._executor = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="jobs")
        self.estimate = None  # the metadata analysis of the running local print (zevents.files.analysis)
        link._emit_fn = self._with_layer_total(link._emit_fn)

    # --- plumbing ------------------------------------------------------------------------------------------------

    def _with_layer_total(self, emit_fn):
        """LayerChanged gets its ``total`` from the analysis when the file has no layer markers (the parser counts
        the layers of marked files itself)."""
        def emit(name, payload, src):
            estimate = self.estimate
            if name == "LayerChanged" and estimate is not None and not estimate.layers_from_markers \
                    and payload.get("total") is None:
                payload = dict(payload, total=estimate.layers)
            emit_fn(name, payload, src)
        return emit

    def submit(self, fn, *args, **kwargs) -> concurrent.futures.Future:
        """Run a (blocking) job operation on the jobs worker, after the ones already queued."""
        return self._executor.submit(self._guarded, fn, *args, **kwargs)

    @staticmethod
    def _guarded(fn, *args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except (JobError, LinkError):
            raise
        except Exception:
            log.exception("jobs: %s failed", getattr(fn, "__name__", fn))
            raise

    def close(self):
        self._executor.shutdown(wait=True, cancel_futures=True)

    def emit(self, name: str, payload: dict | None = None, src: str = "job"):
        self.link.emit(name, payload, src)

    def _elapsed(self) -> float | None:
        return round(time.monotonic() - self.started, 3) if self.started is not None else None

    def _job_payload(self, **extra) -> dict:
        ref = self.active or self.selected
        payload = ref.payload(self.user) if ref else {}
        payload.update(extra)
        return payload

    def _state(self, state_id: str):
        self.link.set_state(state_id, src="job")

    def _chart(self, kind: str, label: str):
        self.emit("ChartMarked", {"type": kind, "label": label, "time": time.time()})

    def _require_operational(self, what: str):
        if self.link.state != "OPERATIONAL":
            raise JobError(f"cannot {what}: the printer is {self.link.status()['state_string'].lower()}"
                           if self.link.connected else f"cannot {what}: the printer is not connected")

    def _wait_idle(self) -> bool:
        deadline = time.monotonic() + self.wait_timeout
        while self.link.connected:
            if self.link.wait_idle(0.5):
                return True
            if time.monotonic() > deadline:
                log.warning("jobs: lines still unacknowledged after %g s", self.wait_timeout)
                return False
        return False

    # --- scripts -------------------------------------------------------------------------------------------------

    def run_script(self, name: str, wait: bool = True) -> bool:
        """Send the configured script ``name`` (``printer.scripts``) with GcodeScript<Name>Running/Finished; the
        Finished event comes once its last line is acknowledged.  False when no such script is configured."""
        text = self.scripts.get(name)
        if text and text is DEFAULT_SCRIPTS.get(name) and "{hotends}" in text:
            text = text.replace("{hotends}", "\n".join(f"M104 T{tool} S0" for tool in range(self._extruders())))
        lines = [line for line in (text or "").splitlines() if strip_line(line)]
        if not lines:
            return False
        payload = self._job_payload(time=self._elapsed())
        self.emit(zevents_events.script_event(name, "Running"), payload)
        done = threading.Event()

        def finished(ok: bool):
            if ok:
                self.emit(zevents_events.script_event(name, "Finished"), payload)
            done.set()

        self.link.send(lines, src="job", on_done=finished)
        if wait and not done.wait(self.wait_timeout):
            log.warning("jobs: script %s not acknowledged within %g s", name, self.wait_timeout)
        return True

    def _extruders(self) -> int:
        try:
            return max(1, min(16, int(self.link.firmware.get("EXTRUDER_COUNT", 1))))
        except (TypeError, ValueError):
            return 1

    # --- selection -----------------------------------------------------------------------------------------------

    def select(self, path: str) -> dict:
        with self._lock:
            if self.active is not None:
                raise JobError("cannot select a file while a job is running")
            target = Path(os.path.expanduser(str(path)))
            try:
                # The check `zevents parse` makes: nothing that is not text G-code reaches the printer.
                check_gcode_file(str(target))
            except (OSError, NotGcodeError) as exc:
                raise JobError(describe_file_error(str(path), exc)) from None
            target = target.resolve()
            self.selected = FileRef(target.name, str(target), "local", target.stat().st_size)
            self.emit("FileSelected", {"name": target.name, "path": str(target), "origin": "local"})
            return {"name": target.name, "path": str(target), "origin": "local", "size": self.selected.size}

    def deselect(self) -> dict:
        with self._lock:
            if self.active is not None:
                raise JobError("cannot deselect the file of a running job")
            if self.selected is not None:
                self.selected = None
                self.emit("FileDeselected", {})
            return {}

    # --- printing ------------------------------------------------------------------------------------------------

    def start(self, path: str | None = None, user: str | None = None) -> dict:
        with self._lock:
            self._require_operational("start a print")
            if path:
                self.select(path)
            ref = self.selected
            if ref is None:
                raise JobError("no file selected (give a file to print)")
            if ref.origin == "sdcard":
                return self._start_sd(ref, user)
            try:
                source = LocalSource(self, ref)
                scan = scan_file(ref.path, self.link.max_line)
            except OSError as exc:
                raise self._start_failed(f"cannot open the selected file {ref.path}: {exc.strerror or exc}")
            if scan.marker_form is not None:
                # The slicer's own layers, not the parser's guess from heights (see MarkerLayers).
                source.layers = MarkerLayers(scan.marker_form, scan.layers)
            if scan.too_long is not None:
                source.close()
                number, length, start = scan.too_long
                raise self._start_failed(
                    f"{ref.name}: line {number} ({start}...) is {length} characters long, the printer takes at "
                    f"most {self.link.max_line} (printer.max_line); the print was not started")
            ref.size = source.size  # the file's size now: what the progress and the job's payloads are about
            self.active, self.user = ref, user
            self.started = time.monotonic()
            self.progress_percent, self.fileposition = 0.0, 0
            self.source = source
            from zevents.files.analysis import estimate_for

            self.estimate = estimate_for(ref.path)
            self._state("PRINTING")
            self.emit("PrintStarted", ref.payload(user) | {"user": user, "estimatedPrintTime": (
                self.estimate.total if self.estimate is not None else None)})
            self._chart("print", "Start")
        self.run_script("beforePrintStarted", wait=False)
        try:
            self.link.set_source(source)
        except LinkError as exc:
            # The link went down between the check and now: the job that just started has failed.
            self._fail(str(exc))
            raise JobError(str(exc)) from None
        return ref.payload(user)

    def _start_failed(self, message: str) -> JobError:
        """Error (reason start_print, OctoPrint's) for a print that could not start; the JobError to raise."""
        self.emit("Error", {"error": message, "reason": "start_print", "consequence": None,
                            "logs": list(self.link.comm_log)})
        return JobError(message)

    def progress(self, percent: int, fileposition: int):
        """Called by the source on the link's writer thread when a new percent is reached."""
        self.progress_percent, self.fileposition = float(percent), fileposition
        ref = self.active
        if ref is not None:
            estimate = self.estimate if ref.origin == "local" else None
            self.emit("PrintProgress", {"name": ref.name, "path": ref.path, "origin": ref.origin,
                                        "progress": percent, "fileposition": fileposition,
                                        "time": self._elapsed(), "printTimeLeft": (
                                            estimate.time_left(fileposition) if estimate is not None else None)})

    def on_source_exhausted(self, source):
        if isinstance(source, UploadSource):
            self.submit(self._finish_upload, source)
        elif source is self.source and source.error is not None:
            self._stop_for(source.error)
        elif source is self.source:
            self.submit(self._finish, source)

    def _stop_for(self, error: str, reason: str | None = None):
        """The job cannot go on (its file changed, a firmware error): Error, then a cancel that says why."""
        self.emit("Error", {"error": error, "reason": reason, "consequence": "cancel",
                            "logs": list(self.link.comm_log)}, src="firmware")
        self.submit(self._cancel_quietly, None, error)

    def _finish(self, source):
        """The file is all sent: FINISHING until its last line is acknowledged, then done.  The wait happens on
        the link (``when_idle``), not here, so the worker stays free for a pause or cancel meanwhile."""
        with self._lock:
            if source is not self.source or self.active is None:
                return
            if self.link.state == "PRINTING":
                self._state("FINISHING")
        self.link.when_idle(lambda: self.submit(self._finish_done, source))

    def _finish_done(self, source):
        with self._lock:
            if source is not self.source or self.active is None:
                return
            if self.link.state in ("PAUSING", "PAUSED", "RESUMING"):
                self._finish_after_resume = source   # a firmware pause (M600) among the last lines
                return
            self._state("FINISHING")
        self.run_script("afterPrintDone")
        with self._lock:
            if source is not self.source or self.active is None:
                return
            self.fileposition = source.position
            self.emit("PrintDone", self._job_payload(time=self._elapsed()))
            self._chart("done", "Done")
            self._end_job()
            if self.link.connected:
                self._state("OPERATIONAL")

    def _end_job(self):
        if self.source is not None:
            self.link.clear_source(self.source)
            self.source.close()
        self.source = None
        self.active = None
        self.estimate = None
        self.started = None
        self._finish_after_resume = None

    def _position(self) -> dict | None:
        """The head position now: M114 once the moves in flight are acknowledged, plus tracked tool/feedrate."""
        if not self._wait_idle():
            return None
        self.link.position = None
        if self.link.send_and_wait("M114", src="job", timeout=self.wait_timeout) is None:
            return None
        position = dict(self.link.position or {})
        if not position:
            return None
        state = getattr(self.link.parser, "state", None)
        position = {k: position.get(k) for k in ("x", "y", "z", "e")} | {
            k: v for k, v in position.items() if k not in ("x", "y", "z", "e")}
        position["t"] = getattr(state, "tool", None)
        position["f"] = getattr(state, "feedrate", None)
        return position

    def pause(self, user: str | None = None, firmware: bool = False) -> dict:
        with self._lock:
            # The firmware may pause (M600) while the last lines of a file are still executing.
            allowed = ("PRINTING", "FINISHING") if firmware else ("PRINTING",)
            if self.link.state not in allowed or self.active is None:
                raise JobError(f"cannot pause: not printing (state: {self.link.status()['state_string']})")
            self._state("PAUSING")
            self.link.pause_source(True)
            sd = self.active.origin == "sdcard"
        if sd and not firmware:
            self.link.send_and_wait("M25", src="job", timeout=self.wait_timeout)
        # A pause the firmware handles itself (M600 and its "//action:paused") holds its queue until the user
        # acts: an M114 would only be answered after the resume, so there is no position (as in OctoPrint).
        position = None if firmware else self._position()
        with self._lock:
            if self.active is None:
                raise JobError("the job ended while pausing")
            progress = self._progress()
            self.emit("PrintPaused", self._job_payload(user=user, position=position, fileposition=self.fileposition,
                                                       progress=progress))
            self._chart("pause", "Pause")
        self.run_script("afterPrintPaused")
        with self._lock:
            if self.active is not None:
                self._state("PAUSED")
        return {"position": position, "fileposition": self.fileposition, "progress": progress}

    def resume(self, user: str | None = None, firmware: bool = False) -> dict:
        with self._lock:
            if self.link.state != "PAUSED" or self.active is None:
                raise JobError(f"cannot resume: not paused (state: {self.link.status()['state_string']})")
            self._state("RESUMING")
            sd = self.active.origin == "sdcard"
        self.run_script("beforePrintResumed")
        with self._lock:
            if self.active is None:
                raise JobError("the job ended while resuming")
            self.emit("PrintResumed", self._job_payload(user=user))
            self._chart("resume", "Resume")
            self._state("PRINTING")
            self.link.pause_source(False)
            finish, self._finish_after_resume = self._finish_after_resume, None
        if sd and not firmware:
            self.link.send(["M24"], src="job")
        if finish is not None:
            self._finish(finish)
        return {}

    def cancel(self, user: str | None = None, firmware_error: str | None = None) -> dict:
        with self._lock:
            if self.active is None or self.link.state not in PRINTING_STATES:
                raise JobError(f"cannot cancel: no job is running (state: {self.link.status()['state_string']})")
            self._state("CANCELLING")
            self.emit("PrintCancelling", self._job_payload(user=user, firmwareError=firmware_error))
            source = self.source
            if source is not None:
                self.link.clear_source(source)
            sd = self.active.origin == "sdcard"
        if self.abort_heatup_on_cancel:
            # OctoPrint's abortHeatupOnCancel: a print cancelled while heating is not held up by the wait (the
            # position, the cancel script and the user would wait for it otherwise)
            self.link.abort_heatups()
        if sd:
            self.link.send(["M25", "M26 S0"], src="job")
        position = self._position()
        self.run_script("afterPrintCancelled")
        with self._lock:
            if self.active is None:
                raise JobError("the job ended while cancelling")
            elapsed = self._elapsed()
            progress = self._progress()
            self.emit("PrintCancelled", self._job_payload(time=elapsed, user=user, position=position,
                                                          fileposition=self.fileposition, progress=progress))
            self.emit("PrintFailed", self._job_payload(time=elapsed, reason="cancelled"))
            self._chart("cancel", "Cancel")
            self._end_job()
            if self.link.connected:
                self._state("OPERATIONAL")
        return {"position": position, "progress": progress}

    def _progress(self) -> float | None:
        """Where the job stands, by the last line the printer acknowledged (not the last one read or sent); sets
        ``fileposition`` to it."""
        if self.source is not None and self.active is not None and self.active.origin == "local":
            size = self.source.size
            self.fileposition = min(self.link.acknowledged_offset, size)
            return round(self.fileposition * 100.0 / size, 2) if size else 0.0
        return self.progress_percent

    # --- link callbacks ------------------------------------------------------------------------------------------

    def on_link_failed(self, error: str, reason: str):
        self._fail(error)

    def on_closed(self):
        self._fail("the printer disconnected")
        transfer, self.transfer = self.transfer, None
        if transfer is not None:
            log.error("jobs: SD upload of %s interrupted", transfer["local"])
            transfer["done"].set()

    def _fail(self, error: str):
        with self._lock:
            if self.active is None:
                return
            log.error("jobs: print of %s failed: %s", self.active.name, error)
            self.emit("PrintFailed", self._job_payload(time=self._elapsed(), reason="error"))
            self._end_job()

    def on_firmware_error(self, message: str):
        with self._lock:
            if self.active is None or self.link.state not in PRINTING_STATES or self.link.state == "CANCELLING":
                return None
        self._stop_for(message, "firmware")
        return "cancel"

    def _cancel_quietly(self, user, firmware_error=None):
        try:
            self.cancel(user, firmware_error)
        except JobError as exc:
            log.info("jobs: %s", exc)

    def on_action(self, action: str, line: str):
        handlers = {"pause": (self.pause, False), "paused": (self.pause, True),
                    "resume": (self.resume, False), "resumed": (self.resume, True)}
        if action in handlers:
            fn, firmware = handlers[action]
            self.submit(self._quietly, fn, None, firmware)
        elif action == "cancel":
            self.submit(self._cancel_quietly, None)
        elif action == "disconnect":
            self.submit(self.link.disconnect)
        else:
            log.info("jobs: ignoring firmware action %r", action)

    @staticmethod
    def _quietly(fn, *args):
        try:
            fn(*args)
        except JobError as exc:
            log.info("jobs: %s", exc)

    def on_tool_change(self, old, new):
        if self.scripts.get("afterToolChange"):
            self.run_script("afterToolChange", wait=False)

    def on_sd(self, sd: dict, line: str):
        ref = self.active
        if ref is None or ref.origin != "sdcard":
            return
        if sd.get("done") or "Done printing file" in line:
            self.submit(self._finish_sd, ref)
            return
        printed, total = sd.get("printed"), sd.get("total")
        if printed is None:
            match = _SD_PROGRESS.search(line)
            if match:
                printed, total = int(match.group(1)), int(match.group(2))
        if printed is not None and total:
            self.fileposition = printed
            percent = printed * 100 // total
            if self.progress_percent is None or percent > self.progress_percent:
                self.progress(percent, printed)

    # --- SD card -------------------------------------------------------------------------------------------------

    def sd_list(self) -> list:
        self._require_connected("list the SD card")
        self.link.sd_files = None
        if self.link.send_and_wait("M20", src="user", timeout=self.wait_timeout) is None:
            raise JobError("the printer did not answer M20")
        return list(self.link.sd_files or [])

    def _require_connected(self, what: str):
        if not self.link.connected:
            raise JobError(f"cannot {what}: the printer is not connected")

    def sd_upload(self, path: str, remote: str | None = None, wait: bool = False) -> dict:
        """Start streaming a local file to the SD card (M28 … M29); with ``wait``, return once TransferDone is
        published (never wait on the jobs worker itself: finishing the transfer runs there)."""
        with self._lock:
            self._require_operational("upload to SD")
            target = Path(os.path.expanduser(str(path)))
            if not target.is_file():
                raise JobError(f"no such file: {path}")
            if remote and (problem := sd_name_problem(remote)):
                raise JobError(problem)
            remote = remote or sd_name(target.name)
            ref = FileRef(target.name, str(target.resolve()), "local", target.stat().st_size)
            self.transfer = {"local": target.name, "remote": remote, "started": time.monotonic(),
                             "done": threading.Event()}
            self._state("TRANSFERING_FILE")
            self.emit("TransferStarted", {"local": target.name, "remote": remote})
        done = self.transfer["done"]
        self.link.send([f"M28 {remote}"], src="job")
        source = UploadSource(self, ref)
        self.link.set_source(source)
        result = {"local": target.name, "remote": remote, "size": ref.size}
        if wait:
            done.wait()
        else:
            result["done"] = done
        return result

    def _finish_upload(self, source):
        transfer = self.transfer
        if transfer is None:
            return
        self._wait_idle()
        self.link.send_and_wait("M29", src="job", timeout=self.wait_timeout)
        with self._lock:
            if self.transfer is not transfer:
                return
            self.transfer = None
            transfer["done"].set()
            self.emit("TransferDone", {"time": round(time.monotonic() - transfer["started"], 3),
                                       "local": transfer["local"], "remote": transfer["remote"]})
            if self.link.connected:
                self._state("OPERATIONAL")

    def sd_select(self, remote: str) -> dict:
        with self._lock:
            self._require_operational("select an SD file")
            self.link.capture_start()
            result = self.link.send_and_wait(f"M23 {remote}", src="user", timeout=self.wait_timeout)
            lines = self.link.capture_stop()
            if result is None:
                raise JobError("the printer did not answer M23")
            size = None
            for line in lines:
                match = _FILE_OPENED.search(line)
                if match:
                    size = int(match.group(2))
                    break
                if "open failed" in line.lower():
                    raise self._start_failed(f"the printer cannot open {remote} on its SD card: {line.strip()}")
            self.selected = FileRef(remote, remote, "sdcard", size)
            self.emit("FileSelected", {"name": remote, "path": remote, "origin": "sdcard"})
            return self.selected.payload()

    def sd_print(self, remote: str, user: str | None = None) -> dict:
        self.sd_select(remote)
        return self.start(user=user)

    def _start_sd(self, ref: FileRef, user: str | None) -> dict:
        self.active, self.user = ref, user
        self.estimate = None  # the file is on the printer: nothing to analyse here
        self.started = time.monotonic()
        self.progress_percent, self.fileposition = None, 0
        self.source = None
        self._state("PRINTING")
        self.emit("PrintStarted", ref.payload(user) | {"user": user})
        self._chart("print", "Start")
        self.run_script("beforePrintStarted", wait=False)
        self.link.send(["M24"], src="job")
        poller = threading.Thread(target=self._poll_sd, args=(ref,), name="sd-poll", daemon=True)
        self._sd_poller = poller
        poller.start()
        return ref.payload(user)

    def _poll_sd(self, ref: FileRef):
        """M27 every ``sd_poll_interval`` seconds while the SD print runs (the firmware prints, we watch)."""
        while self.active is ref and self.link.connected:
            if self.link.state == "PRINTING":
                try:
                    self.link.send(["M27"], src="job")
                except LinkError:
                    return
            self._poll_wakeup.wait(self.sd_poll_interval)

    def _finish_sd(self, ref: FileRef):
        with self._lock:
            if self.active is not ref:
                return
            self._state("FINISHING")
        self.run_script("afterPrintDone")
        with self._lock:
            if self.active is not ref:
                return
            self.emit("PrintDone", self._job_payload(time=self._elapsed()))
            self._chart("done", "Done")
            self._end_job()
            if self.link.connected:
                self._state("OPERATIONAL")

    # --- status --------------------------------------------------------------------------------------------------

    def status(self) -> dict:
        status = self.link.status()
        ref = self.active or self.selected
        status["job"] = ref.payload(self.user) if ref else None
        status["printing"] = self.active is not None
        status["progress"] = self._progress() if self.active else None
        status["fileposition"] = self.fileposition if self.active else None
        status["time"] = self._elapsed()
        return status
