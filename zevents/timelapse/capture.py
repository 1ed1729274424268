"""Capture: the timelapse's child process that turns print events into frames.

It subscribes to ``print/`` and ``gcode/`` and, per printer (the event header's ``printer``):

* ``PrintStarted`` opens a job (:func:`zevents.timelapse.store.new_job`); a job left open by a print that never
  ended is closed as failed first;
* captures on ``LayerChanged`` (mode ``layer``: one frame per layer, a z-hop never is one), ``ZChange`` (``zchange``:
  OctoPrint's, with ``retractionZHop`` and ``minDelay``) and every ``interval`` seconds (``timed``, first frame at
  once), any of them at once;
* captures one at a time per job, in order, each publishing ``CaptureStart{file}`` then ``CaptureDone{file}`` or
  ``CaptureFailed{file, error}`` (the frame number is reused, frames stay contiguous) — and capture goes on;
* on ``PrintDone``/``PrintFailed``, behind the pending captures: the post-roll (one more frame repeated
  ``postRoll × fps`` times), then the job is ``captured`` with OctoPrint's render decision, and the parent (the
  service, which renders) is told.  No frame at all after failed attempts: ``MovieFailed{reason: no_frames}``.

Its own process: a slow or hung camera, Pillow or the HTTP client never take CPU time or the GIL from the printer
link or the renderer.  The bus is read on the main thread; everything else runs on one asyncio loop.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import os
import signal
import threading
import time

from zevents import bus, events as _events
from zevents.timelapse import settings as tl_settings, store
from zevents.timelapse.sources import FrameError, Source

log = logging.getLogger("zevents.timelapse.capture")

MAX_PENDING = 64          # captures waiting per job; beyond that a trigger is dropped (its frame would be late)
DEFAULT_PRINTER = "printer"
END_EVENTS = ("PrintDone", "PrintFailed")
# The capture process runs at the lowest priority: on a busy board a frame may come a few ms late, a line must not.
# (At 5, a print streamed as fast as the link goes lost 10% of its line rate to 45 frames/s on 2 cores.)
CAPTURE_NICENESS = 19


class ActiveJob:
    def __init__(self, job: store.Job, printer: str, gcode: str, path: str | None):
        self.job = job
        self.printer = printer
        self.gcode = gcode
        self.path = path
        self.frames = job.frame_count()
        self.errors = 0
        self.attempts = 0
        self.queue: asyncio.Queue = asyncio.Queue()
        self.last_capture = None
        self.timer: asyncio.Task | None = None
        self.worker: asyncio.Task | None = None
        self.ended = False
        self.dropped = 0
        self.started_by = None        # (epoch, seq) of its PrintStarted


class Capturer:
    """The capture loop's state; every method runs on the asyncio loop."""

    def __init__(self, config, settings: tl_settings.Settings, notify=None):
        from zevents import config as zconfig

        self.config = config
        self.settings = settings
        self.notify = notify or (lambda message: None)
        self.runtime = zconfig.runtime_dir() / config.node
        self.active: dict[str, ActiveJob] = {}
        self.sources: dict[str, Source] = {}
        self.publishers: dict[str, bus.Publisher] = {}
        self.stats = collections.Counter()

    # --- publishing -------------------------------------------------------------------------------------------

    def publish(self, printer: str, name: str, payload: dict):
        publisher = self.publishers.get(printer)
        if publisher is None:
            publisher = self.publishers[printer] = bus.Publisher(
                self.config.bus, src="timelapse", printer=None if printer == DEFAULT_PRINTER else printer)
        publisher.publish(name, _events.complete_payload(name, payload))

    # --- events -----------------------------------------------------------------------------------------------

    def on_event(self, envelope):
        printer = envelope.printer or DEFAULT_PRINTER
        name, payload = envelope.name, envelope.payload or {}
        active = self.active.get(printer)
        if name == "PrintStarted":
            if active is not None and active.started_by == (envelope.epoch, envelope.seq):
                return  # published while we started: seen in the broker's snapshot already
            if active is not None:
                self._end(active, success=False)
            self._open(printer, payload).started_by = (envelope.epoch, envelope.seq)
        elif active is None or active.ended:
            return
        elif name == "LayerChanged" and "layer" in self.settings.modes:
            self.trigger(active, "layer")
        elif name == "ZChange" and "zchange" in self.settings.modes:
            self._on_z_change(active, payload)
        elif name in END_EVENTS:
            self._end(active, success=name == "PrintDone")

    def _open(self, printer: str, payload: dict, job: store.Job | None = None):
        gcode = os.path.basename(str(payload.get("name") or payload.get("path") or "unknown"))
        if job is None:
            job = store.new_job(self.config, printer, gcode)
            job.update(job=job.id, printer=printer, gcode=gcode, path=payload.get("path"), state="capturing",
                       created=time.time(), fps=self.settings.fps, render=False, success=None, attempts=0)
        active = ActiveJob(job, printer, gcode, payload.get("path"))
        self.active[printer] = active
        active.worker = asyncio.ensure_future(self._work(active))
        if "timed" in self.settings.modes:
            active.timer = asyncio.ensure_future(self._timed(active))
        log.info("timelapse: capturing %s of printer %s into %s", gcode, printer, job.path)
        return active

    def _on_z_change(self, active: ActiveJob, payload: dict):
        new, old = payload.get("new"), payload.get("old")
        zhop = self.settings.zhop
        if zhop and isinstance(new, (int, float)) and isinstance(old, (int, float)) and \
                round(abs(new - old), 3) == round(zhop, 3):
            return
        delay = self.settings.min_delay
        if delay and active.last_capture is not None and time.monotonic() - active.last_capture < delay:
            return  # OctoPrint's "rate limited z-change" (vase mode)
        self.trigger(active, "zchange")

    def trigger(self, active: ActiveJob, why: str):
        if active.queue.qsize() >= MAX_PENDING:
            active.dropped += 1
            if active.dropped == 1 or active.dropped % 100 == 0:
                log.warning("timelapse: the camera cannot keep up; %d %s frames skipped", active.dropped, why)
            return
        active.last_capture = time.monotonic()
        active.queue.put_nowait(("capture", None))

    async def _timed(self, active: ActiveJob):
        while not active.ended:
            self.trigger(active, "timed")
            await asyncio.sleep(self.settings.interval)

    def _end(self, active: ActiveJob, success: bool):
        active.ended = True
        if active.timer is not None:
            active.timer.cancel()
        active.queue.put_nowait(("end", success))
        if self.active.get(active.printer) is active:
            del self.active[active.printer]

    # --- the work of one job, in order ------------------------------------------------------------------------

    async def _work(self, active: ActiveJob):
        while True:
            kind, arg = await active.queue.get()
            try:
                if kind == "capture":
                    await self.capture(active)
                else:
                    await self._finish(active, arg)
                    return
            except Exception:
                log.exception("timelapse: capture of %s failed unexpectedly", active.job.id)

    def source_for(self, printer: str) -> Source | None:
        camera = self.settings.camera_for(None if printer == DEFAULT_PRINTER else printer)
        if camera is None:
            return None
        source = self.sources.get(camera.name)
        if source is None:
            source = self.sources[camera.name] = Source(camera, self.settings.min_frame_bytes,
                                                        self.settings.max_frame_bytes, self.runtime)
        return source

    async def capture(self, active: ActiveJob) -> bool:
        number = active.frames + 1
        path = active.job.frame(number)
        active.attempts += 1
        self.publish(active.printer, "CaptureStart", {"file": str(path)})
        source = self.source_for(active.printer)
        try:
            if source is None:
                raise FrameError(f"no camera configured for printer {active.printer!r}")
            data = await source.grab()
            temporary = path.with_name(f".{path.name}.tmp")
            temporary.write_bytes(data)
            os.replace(temporary, path)
        except (FrameError, OSError) as exc:
            active.errors += 1
            self.stats["failed"] += 1
            self.publish(active.printer, "CaptureFailed", {"file": str(path), "error": str(exc)})
            log.warning("timelapse: frame %d of %s failed: %s", number, active.job.id, exc)
            return False
        active.frames = number
        self.stats["done"] += 1
        self.publish(active.printer, "CaptureDone", {"file": str(path)})
        return True

    async def _finish(self, active: ActiveJob, success: bool):
        settings = self.settings
        job = active.job
        if active.frames == 0:
            job.remove()
            if active.errors:
                self.publish(active.printer, "MovieFailed", {
                    "gcode": active.gcode, "movie": "n/a", "movie_basename": "n/a", "movie_prefix": job.id,
                    "returncode": 0, "out": "", "error": "", "reason": "no_frames"})
            log.info("timelapse: %s ended with no frame (%d failed)", job.id, active.errors)
            return
        if settings.post_roll > 0:
            if not await self.capture(active):
                pass  # the post-roll repeats the last good frame instead
            last = job.frame(active.frames)
            for _ in range(settings.post_roll * settings.fps):
                active.frames += 1
                _link_or_copy(last, job.frame(active.frames))
        render = settings.should_render(success)
        job.update(state="captured", success=success, render=render, frames=active.frames,
                   postfix="" if success else "-fail", ended=time.time(), failed_frames=active.errors)
        log.info("timelapse: %s captured: %d frames, %d failed%s", job.id, active.frames, active.errors,
                 "" if render else " (not rendered: renderAfterPrint)")
        self.notify(("captured", str(job.path)))

    # --- start-up and shutdown --------------------------------------------------------------------------------

    def recover(self, snapshot: list):
        """Jobs left ``capturing`` by a capture process that died: resumed when their print still runs (the
        broker's snapshot says its PrintStarted is the latest print event), else closed as failed prints.  A print
        that runs with no job (the service started mid-print) gets one from now on."""
        latest: dict = {}
        for envelope in snapshot:
            if envelope.name in ("PrintStarted",) + END_EVENTS:
                printer = envelope.printer or DEFAULT_PRINTER
                if printer not in latest or (envelope.ts, envelope.seq) > (latest[printer].ts, latest[printer].seq):
                    latest[printer] = envelope
        for job in store.jobs(self.config):
            data = job.read()
            if data.get("state") != "capturing":
                continue
            started = latest.get(job.printer)
            if started is not None and started.name == "PrintStarted" and \
                    started.payload.get("path") == data.get("path") and job.printer not in self.active:
                log.info("timelapse: resuming capture of %s", job.id)
                job.update(resumed=time.time())
                self._open(job.printer, started.payload, job).started_by = (started.epoch, started.seq)
            else:
                active = ActiveJob(job, job.printer, data.get("gcode") or "unknown", data.get("path"))
                active.worker = asyncio.ensure_future(self._work(active))
                self._end(active, success=False)
        for printer, envelope in latest.items():
            if envelope.name == "PrintStarted" and printer not in self.active:
                log.info("timelapse: a print of %s runs already; capturing from now", printer)
                self._open(printer, envelope.payload).started_by = (envelope.epoch, envelope.seq)

    async def close(self):
        for active in list(self.active.values()):
            if active.timer is not None:
                active.timer.cancel()
        for source in self.sources.values():
            await source.close()
        for publisher in self.publishers.values():
            publisher.close(linger=2)


def _link_or_copy(source, target):
    try:
        os.link(source, target)
    except OSError:
        import shutil

        shutil.copyfile(source, target)


def _die_with_parent():
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)
    except OSError:
        pass


def run(config, conn=None, stop: threading.Event | None = None, ready: threading.Event | None = None) -> int:
    """The capture process: ``conn`` (a multiprocessing Connection) gets ("ready", pid) once it listens, then
    ("captured", job path) messages.  Tests run it on a thread: no conn, ``stop`` and ``ready`` events."""
    if conn is not None:
        _die_with_parent()
        if os.getppid() == 1:
            return 0
        # On a small board the printer link comes first: capture takes the CPU it leaves (frames wait, lines don't).
        os.nice(CAPTURE_NICENESS)
    settings = tl_settings.resolve(config)
    stop = stop or threading.Event()
    if conn is not None:
        signal.signal(signal.SIGTERM, lambda *_: stop.set())
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    loop = asyncio.new_event_loop()

    def notify(message):
        if conn is not None:
            try:
                conn.send(message)
            except (OSError, EOFError):
                log.warning("timelapse: the service is gone; %s is left captured", message[1])

    capturer = None

    async def setup():
        nonlocal capturer
        capturer = Capturer(config, settings, notify)

    loop.run_until_complete(setup())
    thread = threading.Thread(target=loop.run_forever, name="timelapse-capture", daemon=True)
    thread.start()
    subscriber = bus.Subscriber(config.bus, groups=["print", "gcode"])
    try:
        try:
            snapshot = subscriber.snapshot(["print"])
        except bus.BusError:
            snapshot = []
        asyncio.run_coroutine_threadsafe(_call(capturer.recover, snapshot), loop).result(30)
        if conn is not None:
            conn.send(("ready", os.getpid()))
        if ready is not None:
            ready.set()
        from zevents.service import freeze_startup_heap

        freeze_startup_heap()
        while not stop.is_set():
            envelope = subscriber.recv(timeout=0.2)
            if envelope is not None:
                loop.call_soon_threadsafe(capturer.on_event, envelope)
    finally:
        subscriber.close()
        asyncio.run_coroutine_threadsafe(capturer.close(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
    return 0


async def _call(function, *args):
    return function(*args)
