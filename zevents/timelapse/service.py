"""The timelapse service (`python -m zevents.service timelapse`, supervised by `zevents run`): the process.

It starts the capture process (:mod:`zevents.timelapse.capture`, its own process so that a camera never slows
anything else) and owns the render queue:

* jobs come from the capture process as they are captured, and at start-up from the store: a job found
  ``rendering`` was interrupted (kill -9 of this service or of ffmpeg, a reboot) and is rendered again; one
  ``captured`` with ``render`` set waits for its turn.  Half-written movies of such renders are deleted.
* renders wait while a print runs (OctoPrint's gating: held at ``PrintStarted``, released at the print's end after
  ``renderAfterPrintDelay``), unless ``timelapse.render_while_printing``; one at a time, oldest first, on a thread
  of this process (ffmpeg is the child; it dies with us);
* unrendered jobs older than ``cleanTmpAfterDays`` are deleted at start-up and every hour.
"""
from __future__ import annotations

import collections
import logging
import multiprocessing
import signal
import threading
import time

from zevents import bus, events as _events
from zevents.timelapse import capture as capture_mod, render as render_mod, settings as tl_settings, store

log = logging.getLogger("zevents.timelapse")

LOOP_TICK = 0.2
CLEAN_EVERY = 3600.0
RETRY_BACKOFF = 2.0
CAPTURE_BACKOFF_START, CAPTURE_BACKOFF_MAX = 0.2, 30.0


class TimelapseService:
    def __init__(self, config):
        self.config = config
        self.settings = tl_settings.resolve(config)
        self.stop_event = threading.Event()
        self.queue: collections.OrderedDict = collections.OrderedDict()   # job path → not-before (monotonic)
        self.printing: set = set()
        self.released_at = 0.0
        self.render_thread: threading.Thread | None = None
        self.capture_process = None
        self.conn = None
        self.capture_backoff = CAPTURE_BACKOFF_START
        self.capture_restart_at = None
        self.capture_started = 0.0
        self.publishers: dict = {}
        self._publish_lock = threading.Lock()
        self.next_clean = 0.0
        self.subscriber = None

    # --- capture process --------------------------------------------------------------------------------------

    def start_capture(self):
        context = multiprocessing.get_context("spawn")
        parent, child = context.Pipe()
        self.capture_process = context.Process(target=capture_mod.run, args=(self.config, child),
                                               name="zevents-timelapse-capture", daemon=True)
        self.capture_process.start()
        child.close()
        self.conn = parent

    def _read_capture(self):
        while self.conn is not None and self.conn.poll():
            try:
                kind, value = self.conn.recv()
            except (EOFError, OSError):
                self.conn = None
                return
            if kind == "captured":
                job = store.Job(value)
                if job.read().get("render"):
                    self.queue[str(job.path)] = 0.0

    def wait_capture_ready(self, timeout: float = 60.0) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.conn.poll(0.2):
                kind, value = self.conn.recv()
                if kind == "ready":
                    return True
                if kind == "captured":
                    self.queue[value] = 0.0
            if not self.capture_process.is_alive():
                return False
        return False

    # --- publishing (render thread and main thread) -----------------------------------------------------------

    def publisher_for(self, printer: str):
        def publish(name, payload):
            with self._publish_lock:
                publisher = self.publishers.get(printer)
                if publisher is None:
                    publisher = self.publishers[printer] = bus.Publisher(
                        self.config.bus, src="timelapse",
                        printer=None if printer == capture_mod.DEFAULT_PRINTER else printer)
                publisher.publish(name, _events.complete_payload(name, payload))
        return publish

    # --- the render queue -------------------------------------------------------------------------------------

    def recover(self):
        store.remove_stale_parts(self.config)
        for job in store.jobs(self.config):
            data = job.read()
            if data.get("state") == "rendering" or (data.get("state") == "captured" and data.get("render")):
                log.info("timelapse: %s will be rendered (%s)", job.id,
                         "interrupted render" if data.get("state") == "rendering" else "waiting")
                self.queue[str(job.path)] = 0.0

    def learn_printing(self, snapshot: list):
        latest: dict = {}
        for envelope in snapshot:
            if envelope.name in ("PrintStarted", "PrintDone", "PrintFailed"):
                printer = envelope.printer or capture_mod.DEFAULT_PRINTER
                if printer not in latest or (envelope.ts, envelope.seq) > (latest[printer].ts, latest[printer].seq):
                    latest[printer] = envelope
        self.printing = {printer for printer, e in latest.items() if e.name == "PrintStarted"}

    def on_event(self, envelope):
        printer = envelope.printer or capture_mod.DEFAULT_PRINTER
        if envelope.name == "PrintStarted":
            self.printing.add(printer)
        elif envelope.name in ("PrintDone", "PrintFailed"):
            self.printing.discard(printer)
            self.released_at = time.monotonic() + self.settings.render_delay

    def may_render(self) -> bool:
        if self.settings.render_while_printing:
            return True
        return not self.printing and time.monotonic() >= self.released_at

    def tick(self):
        self._read_capture()
        now = time.monotonic()
        if self.capture_backoff > CAPTURE_BACKOFF_START and now - self.capture_started > 60:
            self.capture_backoff = CAPTURE_BACKOFF_START
        if now >= self.next_clean:
            self.next_clean = now + CLEAN_EVERY
            for removed in store.clean_old(self.config, self.settings.clean_after_days):
                log.info("timelapse: deleted %s, unrendered for more than %d days", removed,
                         self.settings.clean_after_days)
        if self.render_thread is not None and not self.render_thread.is_alive():
            self.render_thread = None
        if self.render_thread is None and self.queue and self.may_render():
            ready = [path for path, not_before in self.queue.items() if not_before <= now]
            if ready:
                path = ready[0]
                del self.queue[path]
                self.render_thread = threading.Thread(target=self._render, args=(store.Job(path),),
                                                      name="timelapse-render", daemon=True)
                self.render_thread.start()

    def _render(self, job: store.Job):
        if not job.path.is_dir():
            return
        try:
            outcome = render_mod.render(self.config, self.settings, job, self.publisher_for(job.printer),
                                        self.stop_event)
        except store.StoreError as exc:
            log.info("timelapse: %s", exc)
            return
        if outcome == render_mod.RETRY and not self.stop_event.is_set():
            self.queue[str(job.path)] = time.monotonic() + RETRY_BACKOFF

    # --- the loop ---------------------------------------------------------------------------------------------

    def serve(self):
        self.subscriber = bus.Subscriber(self.config.bus, groups=["print"],
                                         events=["PrintStarted", "PrintDone", "PrintFailed"])
        try:
            self.learn_printing(self.subscriber.snapshot(["print"]))
        except bus.BusError:
            pass
        while not self.stop_event.is_set():
            envelope = self.subscriber.recv(timeout=LOOP_TICK)
            if envelope is not None:
                self.on_event(envelope)
            self._watch_capture()
            self.tick()

    def _watch_capture(self):
        """A capture process that died is started again, after a backoff that doubles while it keeps dying."""
        process = self.capture_process
        if process is None or process.is_alive():
            return
        now = time.monotonic()
        if self.capture_restart_at is None:
            log.error("timelapse: the capture process exited (code %s); restarting it in %.1f s", process.exitcode,
                      self.capture_backoff)
            self.capture_restart_at = now + self.capture_backoff
            self.capture_backoff = min(self.capture_backoff * 2, CAPTURE_BACKOFF_MAX)
        elif now >= self.capture_restart_at:
            self.capture_restart_at = None
            if self.conn is not None:
                self.conn.close()
            self.start_capture()
            self.capture_started = now

    def stop(self, *_):
        self.stop_event.set()

    def close(self):
        self.stop_event.set()
        if self.render_thread is not None:
            self.render_thread.join(15)
        if self.capture_process is not None:
            self.capture_process.terminate()
            self.capture_process.join(10)
            if self.capture_process.is_alive():
                self.capture_process.kill()
                self.capture_process.join(5)
        if self.subscriber is not None:
            self.subscriber.close()
        for publisher in self.publishers.values():
            publisher.close(linger=2)


def run(config) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    service = TimelapseService(config)
    signal.signal(signal.SIGTERM, service.stop)
    signal.signal(signal.SIGINT, service.stop)
    if not service.settings.enabled:
        log.info("timelapse: capture off (no camera, or timelapse.enabled, webcam.timelapseEnabled, "
                 "timelapse.modes say so); rendering what is waiting")
    service.recover()
    if service.settings.enabled:
        service.start_capture()
        if not service.wait_capture_ready():
            log.error("timelapse: the capture process did not start")
            service.close()
            return 1
    bus.announce_started(config, "timelapse")
    from zevents.service import freeze_startup_heap

    freeze_startup_heap()
    try:
        service.serve()
    finally:
        service.close()
    return 0
