"""One slicing run: the slicer as a child process, niced, without a shell, killed at its timeout or on cancel.

Owns the run's life: checking the model before anything starts (type, mesh, fits the printer profile's volume),
starting the slicer in its own process group, reading its output for progress as it comes, and ending in exactly
one outcome: ``done`` (the G-code in a temporary file beside the destination, for the caller to store), ``failed``
(with the slicer's own message, and no partial output left) or ``cancelled``.
"""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from zevents.slicing import models, slicers


@dataclass
class Outcome:
    status: str                       # done | failed | cancelled
    output: str | None = None         # the G-code file when done
    reason: str | None = None
    seconds: float = 0.0
    log: str = ""


@dataclass
class SliceRun:
    slicer: slicers.Slicer
    model: str
    profile_path: str | None
    printer_profile: dict
    output: str
    timeout: float = 600.0
    nice: int = 10
    overrides: dict = field(default_factory=dict)
    on_progress: object = None        # fn(fraction 0..1), called from the reading thread
    _process: subprocess.Popen | None = None
    _cancelled: threading.Event = field(default_factory=threading.Event)
    _timed_out: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self._cancelled.set()
        self._kill()

    def _on_timeout(self) -> None:
        self._timed_out.set()
        self._kill()

    def _kill(self) -> None:
        process = self._process
        if process is not None and process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def _discard_output(self) -> None:
        try:
            os.unlink(self.output)
        except FileNotFoundError:
            pass

    def run(self) -> Outcome:
        started = time.monotonic()
        if not self.slicer.available:
            return Outcome("failed", reason=self.slicer.problem or self.slicer.install_hint())
        try:
            bounds = models.inspect(self.model)
            models.check_fits(bounds, self.printer_profile)
        except models.ModelError as exc:
            return Outcome("failed", reason=str(exc))
        except OSError as exc:
            return Outcome("failed", reason=f"cannot read the model: {exc}")
        if self._cancelled.is_set():
            return Outcome("cancelled")
        argv, env = slicers.command(self.slicer, self.model, self.profile_path, self.printer_profile, self.output,
                                    self.overrides, bounds)
        if self.nice:
            argv = ["nice", "-n", str(self.nice)] + argv
        log: list = []
        try:
            self._process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                             stderr=subprocess.STDOUT, env={**os.environ, **env},
                                             process_group=0, text=True, errors="replace", bufsize=1)
        except OSError as exc:
            return Outcome("failed", reason=f"cannot start {self.slicer.name}: {exc}")
        timer = threading.Timer(self.timeout, self._on_timeout)
        timer.daemon = True
        timer.start()
        last = -1.0
        try:
            for line in self._process.stdout:
                if len(log) < 2000:
                    log.append(line.rstrip("\n")[:2000])
                fraction = slicers.progress(self.slicer.id, line)
                if fraction is not None and fraction > last and self.on_progress is not None:
                    last = fraction
                    self.on_progress(fraction)
            returncode = self._process.wait()
        finally:
            timer.cancel()
            self._process.stdout.close()
            self._kill()              # anything the slicer left in its group
        seconds = time.monotonic() - started
        text = "\n".join(log)
        if self._cancelled.is_set():
            self._discard_output()
            return Outcome("cancelled", seconds=seconds, log=text)
        if returncode != 0 or self._timed_out.is_set():
            self._discard_output()
            if self._timed_out.is_set():
                reason = f"{self.slicer.name} did not finish within {self.timeout:g} s and was killed"
            else:
                how = f"signal {-returncode}" if returncode < 0 else f"exit code {returncode}"
                reason = f"{self.slicer.name} failed ({how}): {slicers.error_message(text)}"
            return Outcome("failed", reason=reason, seconds=seconds, log=text)
        output = Path(self.output)
        if not output.is_file() or output.stat().st_size == 0:
            self._discard_output()
            return Outcome("failed", reason=f"{self.slicer.name} wrote no G-code: {slicers.error_message(text)}",
                           seconds=seconds, log=text)
        return Outcome("done", output=str(output), seconds=seconds, log=text)
