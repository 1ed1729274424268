"""The metadata analysis queue of the files service: which file is analysed when, in a worker process.

The analysis itself runs in a separate process (``python -m zevents.files.analysis_queue``, one long-lived worker
reading one JSON request per line on stdin and answering one JSON line on stdout), never in the service's loop
or threads: a 1 GB file costs the service nothing but a pipe.  The queue's thread owns that worker:

- Priorities are OctoPrint's (reference-behaviour.md 2.4): uploads HIGH (50), backlog/copy/move LOW (100); an
  aborted analysis goes back in at 0 (high) or 75 (low).  A HIGH enqueue aborts a running LOW analysis.
- ``run_at``: ``idle`` (default) pauses the queue while printing (a running analysis is killed and requeued);
  ``always`` never pauses; ``never`` ignores every enqueue.
- A per-file ``timeout``: the worker is killed, the analysis is reported failed (no Finished event, as OctoPrint)
  and not retried until the file changes or the service starts again.
- Results are cached by content hash (``<cache>/<sha1>.json``): a copy, a re-upload or a restart with unchanged
  bytes reuses the result without running the worker again.

The analysis function is ``zevents.files.analysis.analyse_file(path)`` (the metadata analysis engine), imported
lazily; until that module exists, the parser's summary (``zevents.analysis.analyse``) is turned into OctoPrint's
result keys here.  The queue reports through ``notify(kind, job, result)`` from its own thread: kind is
``started``, ``finished`` (result is the analysis) or ``failed`` (result is the error text).
"""
from __future__ import annotations

import heapq
import itertools
import json
import logging
import os
import select
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger("zevents.files.analysis")

HIGH, LOW, ABORTED_HIGH, ABORTED_LOW = 50, 100, 0, 75
RUN_AT = ("idle", "always", "never")


@dataclass(order=True)
class Job:
    priority: int
    order: int
    path: str = field(compare=False)        # storage path (the key)
    disk: str = field(compare=False)        # absolute path to read
    hash: str = field(compare=False)
    high: bool = field(compare=False, default=False)


class AnalysisQueue:
    WORKER = (sys.executable, "-m", "zevents.files.analysis_queue")

    def __init__(self, notify, cache_dir, timeout: float = 600.0, run_at: str = "idle", worker: tuple = WORKER):
        if run_at not in RUN_AT:
            raise ValueError(f"run_at must be one of {', '.join(RUN_AT)}")
        self.notify = notify
        self.cache_dir = Path(cache_dir)
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.timeout = float(timeout)
        self.run_at = run_at
        self.worker_argv = list(worker)     # any program speaking the worker's JSON-lines protocol
        self.engine = engine()
        self._heap: list = []
        self._order = itertools.count()
        self._queued: dict = {}              # path -> Job (the live entry; heap entries not here are stale)
        self._running: Job | None = None
        self._abort_reason: str | None = None
        self._paused = False
        self._closed = False
        self._cond = threading.Condition()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._worker: subprocess.Popen | None = None
        self._thread = threading.Thread(target=self._loop, name="analysis-queue", daemon=True)
        self._thread.start()

    # --- public (any thread) -------------------------------------------------------------------------------------

    def enqueue(self, path: str, disk: str, digest: str, high: bool = False) -> bool:
        if self.run_at == "never":
            return False
        with self._cond:
            self._drop(path)
            job = Job(HIGH if high else LOW, next(self._order), path, str(disk), digest, high)
            self._push(job)
            running = self._running
            if running is not None and running.path == path:
                self._abort("replaced")          # the file changed under the running analysis: start again
            elif high and running is not None and not running.high:
                self._abort("preempted")
            self._cond.notify_all()
        return True

    def dequeue(self, path: str, folder: bool = False):
        """Forget a file (or every file under a folder): removed or moved away."""
        with self._cond:
            matches = (lambda p: p == path or p.startswith(path + "/")) if folder else (lambda p: p == path)
            for queued in [p for p in self._queued if matches(p)]:
                self._drop(queued)
            if self._running is not None and matches(self._running.path):
                self._abort("dequeued")

    def pause(self):
        if self.run_at != "idle":
            return
        with self._cond:
            if not self._paused:
                self._paused = True
                if self._running is not None:
                    self._abort("paused")

    def resume(self):
        with self._cond:
            self._paused = False
            self._cond.notify_all()

    @property
    def paused(self) -> bool:
        return self._paused

    def pending(self) -> list:
        with self._cond:
            return [job.path for job in sorted(self._queued.values())]

    def close(self):
        with self._cond:
            self._closed = True
            self._abort("closing")
            self._cond.notify_all()
        self._thread.join(10)
        self._kill_worker()
        for fd in (self._wake_r, self._wake_w):
            os.close(fd)

    # --- internals (under the lock) ------------------------------------------------------------------------------

    def _push(self, job: Job):
        self._queued[job.path] = job
        heapq.heappush(self._heap, job)

    def _drop(self, path: str):
        self._queued.pop(path, None)        # its heap entry becomes stale and is skipped

    def _abort(self, reason: str):
        if self._running is not None and self._abort_reason is None:
            self._abort_reason = reason
            try:
                os.write(self._wake_w, b"\0")
            except BlockingIOError:
                pass  # a full pipe already wakes the queue's thread

    def _next(self) -> Job | None:
        while self._heap:
            job = heapq.heappop(self._heap)
            if self._queued.get(job.path) is job:
                del self._queued[job.path]
                return job
        return None

    # --- the queue's thread --------------------------------------------------------------------------------------

    def _loop(self):
        while True:
            with self._cond:
                while not self._closed and (self._paused or not self._queued):
                    self._cond.wait()
                if self._closed:
                    return
                job = self._next()
                if job is None:
                    continue
                self._running, self._abort_reason = job, None
            try:
                self._run(job)
            except Exception:
                log.exception("analysis: %s failed", job.path)
            finally:
                with self._cond:
                    self._running = None
                    self._abort_reason = None
                try:
                    while os.read(self._wake_r, 4096):
                        pass
                except BlockingIOError:
                    pass  # drained: a stale abort must not stop the next analysis

    def _run(self, job: Job):
        cached = self._cache_get(job.hash)
        self.notify("started", job, None)
        if cached is not None:
            self.notify("finished", job, cached)
            return
        outcome, value = self._analyse_in_worker(job)
        if outcome == "ok":
            self._cache_put(job.hash, value)
            self.notify("finished", job, value)
        elif outcome == "aborted":
            with self._cond:
                reason = self._abort_reason
                if reason in ("paused", "preempted") and job.path not in self._queued:
                    job.priority = ABORTED_HIGH if job.high else ABORTED_LOW
                    job.order = next(self._order)
                    self._push(job)
            log.info("analysis: %s %s", job.path, reason)
        else:
            log.error("analysis: %s: %s", job.path, value)
            self.notify("failed", job, value)

    def _analyse_in_worker(self, job: Job) -> tuple:
        if self._worker is None or self._worker.poll() is not None:
            self._worker = subprocess.Popen(self.worker_argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                            bufsize=0, start_new_session=True)
        worker = self._worker
        try:
            worker.stdin.write(json.dumps({"path": job.disk}).encode() + b"\n")
        except OSError as exc:
            self._kill_worker()
            return "error", f"the analysis worker died: {exc}"
        deadline = time.monotonic() + self.timeout
        buffer = b""
        while True:
            if self._abort_reason is not None:
                self._kill_worker()
                return "aborted", None
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._kill_worker()
                return "error", f"timed out after {self.timeout:g} s (the worker was killed)"
            ready, _, _ = select.select([worker.stdout, self._wake_r], [], [], remaining)
            if worker.stdout in ready:
                chunk = os.read(worker.stdout.fileno(), 1 << 16)
                if not chunk:
                    self._kill_worker()
                    return "error", "the analysis worker exited"
                buffer += chunk
                if buffer.endswith(b"\n"):
                    try:
                        reply = json.loads(buffer)
                        return ("ok", reply["result"]) if reply.get("ok") else ("error", reply.get("error"))
                    except (ValueError, KeyError, TypeError, AttributeError):
                        self._kill_worker()     # out of step with us: a fresh worker for the next file
                        return "error", f"the analysis worker answered garbage: {buffer[:200]!r}"

    def _kill_worker(self):
        worker, self._worker = self._worker, None
        if worker is None:
            return
        if worker.poll() is None:
            try:
                os.killpg(worker.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                worker.kill()
        worker.wait()
        for stream in (worker.stdin, worker.stdout):
            try:
                stream.close()
            except OSError:
                pass

    def _cache_get(self, digest: str):
        try:
            return json.loads((self.cache_dir / f"{digest}.{self.engine}.json").read_text())
        except (OSError, ValueError):
            return None

    def _cache_put(self, digest: str, result: dict):
        target = self.cache_dir / f"{digest}.{self.engine}.json"
        temp = target.with_name(f".{digest}.{os.getpid()}.tmp")
        temp.write_text(json.dumps(result))
        os.replace(temp, target)


def engine() -> str:
    """Which analysis the worker runs: "analysis" (the metadata analysis engine) or "summary" (the stop-gap).  Part
    of the cache key and stored with each result, so results of the stop-gap are redone once the engine lands."""
    import importlib.util

    try:
        return "analysis" if importlib.util.find_spec("zevents.files.analysis") is not None else "summary"
    except (ImportError, ValueError):
        return "summary"


THUMBNAILS = ".thumbnails"


# --- the worker process ------------------------------------------------------------------------------------------

def analyse(path: str) -> dict:
    """The analysis result of one file: the engine's when it is installed, else the parser summary's."""
    try:
        from zevents.files.analysis import analyse_file
    except ImportError:
        return result_from_summary(path)
    # the embedded thumbnails become sidecar images in a hidden folder beside the file (storage lists no hidden
    # names), as <stem>-<w>x<h>.<ext>
    return analyse_file(path, thumbnail_dir=os.path.join(os.path.dirname(path), THUMBNAILS))


def result_from_summary(path: str) -> dict:
    """OctoPrint's result keys from ``zevents.analysis.analyse`` (a stop-gap until the analysis engine lands)."""
    from zevents.analysis import analyse as summary_of

    summary = summary_of(path)
    bbox = summary.get("extrusion_bbox")
    if not bbox or not summary.get("filament_mm"):
        area = {k: 0.0 for k in ("minX", "maxX", "minY", "maxY", "minZ", "maxZ")}
        dims = {"width": 0.0, "depth": 0.0, "height": 0.0}
        return {"printingArea": area, "dimensions": dims, "travelArea": dict(area), "travelDimensions": dict(dims),
                "filament": {}, "_empty": True}
    (x0, y0, z0), (x1, y1, z1) = bbox["min"], bbox["max"]
    area = {"minX": x0, "maxX": x1, "minY": y0, "maxY": y1, "minZ": z0, "maxZ": z1}
    dims = {"width": x1 - x0, "depth": y1 - y0, "height": z1 - z0}
    length = summary["filament_mm"]
    volume = length * 3.14159265 * (1.75 / 2) ** 2 / 1000.0
    result = {"printingArea": area, "dimensions": dims, "travelArea": dict(area), "travelDimensions": dict(dims),
              "filament": {"tool0": {"length": length, "volume": volume}}, "layers": {"count": summary["layers"]}}
    if summary.get("estimated_time_s"):
        result["estimatedPrintTime"] = summary["estimated_time_s"]
    return result


def _die_with_parent():
    """Linux: SIGKILL when the files service dies (even by kill -9), instead of finishing a long analysis that
    nobody will read.  Elsewhere the worker ends when its stdin closes, after the file at hand."""
    try:
        import ctypes

        # PR_SET_PDEATHSIG; "parent" is the thread that spawned us: the queue's, which lives as long as the service
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass
    if os.getppid() == 1:       # the parent was already gone before prctl took effect
        sys.exit(0)


def worker_main() -> int:
    """One JSON request per line in, one JSON reply per line out, until stdin closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)   # the queue ends us (SIGKILL), not a Ctrl-C of the node
    _die_with_parent()
    # OctoPrint throttles its analysis (sleeps between lines and files) to leave the CPU to printing; a separate
    # process at a lower priority does that without slowing the analysis on an idle machine
    try:
        os.nice(10)
    except OSError:
        pass
    for line in sys.stdin.buffer:
        try:
            request = json.loads(line)
            reply = {"ok": True, "result": analyse(request["path"])}
        except Exception as exc:  # every failure is a reply: the queue decides
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(reply, default=str) + "\n")
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(worker_main())
