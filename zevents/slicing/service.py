"""The slicing service process: slicing jobs asked for on its command channel, their events, and their G-code
handed to the files service.

Channel (``slicing.commands``, an ipc socket in the node's 0700 runtime directory by default; the printer
channel's framing, see ``zevents.printer.channel``):
  SLICE  {model, slicer?, profile?, printer_profile?, dest?, select?, print?, overrides?}
         ``model`` is a storage path of a model in the files service's local storage (``zevents slice FILE``
         uploads a local file first).  Replies at once with {slicer, stl, gcode, job}; the outcome is on the bus.
  CANCEL {dest}          -> {cancelled: bool}
  STATUS {}              -> {jobs: [{slicer, stl, gcode, progress, running}], slicers: [...]}

Events, in OctoPrint's order (``FileManager.slice``): ``SlicingStarted{slicer, stl, stl_location, gcode,
gcode_location, progressAvailable}``, ``SlicingProgress{..., progress}`` (ours, whole percents, each once), then on
success the files service's ``FileAdded``/``UpdatedFiles`` followed by ``SlicingDone{..., time}``; otherwise
``SlicingFailed{..., reason}`` or ``SlicingCancelled{...}``.  A second job for the destination of a running one
cancels it: the second job's ``SlicingStarted`` comes first, then the first one's ``SlicingCancelled``, and the
second job goes on being tracked (OctoPrint loses track of it at that point: its first job's clean-up removes the
second job's entry; here each job removes only itself).

One thread (the service loop) owns the sockets and publishes every event, in the order things happened; each job
runs its slicer from a worker thread of its own (at most ``slicing.concurrency`` at once, the rest wait) and
reports through a queue.  Output goes to a temporary file in ``<data_dir>/slicing/tmp`` and is moved into storage
by the files service; a failed, cancelled or crashed job leaves nothing in storage.
"""
from __future__ import annotations

import hashlib
import itertools
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import zmq

from zevents import bus as zbus
from zevents.printer import channel as printer_channel
from zevents.printer.profiles import ProfileError, ProfileStore
from zevents.slicing import slicers
from zevents.slicing.jobs import Outcome, SliceRun
from zevents.slicing.profiles import SlicingProfileError, SlicingProfiles
from zevents.wakeup import Wakeup

log = logging.getLogger("zevents.slicing")

COMMANDS = ("SLICE", "CANCEL", "STATUS")
LOCATION = "local"


class ServiceError(RuntimeError):
    """The service cannot start (endpoint in use)."""


def endpoint(config) -> str:
    return config.endpoint("slicing", "commands", "slicing.sock")


class SlicingClient(printer_channel.CommandClient):
    commands = COMMANDS
    service = "the slicing service"
    start_hint = "zevents run` (slicing.enabled: true) or `zevents slicing serve"


@dataclass
class Job:
    number: int
    slicer: slicers.Slicer
    stl: str
    gcode: str
    model_path: str
    run: SliceRun
    select: bool = False
    print: bool = False
    printer: str | None = None      # which of the node's printers selects/prints it (None: the only one)
    progress: int = -1
    cancelled: bool = False
    thread: threading.Thread | None = None
    started: float = field(default_factory=time.monotonic)

    def payload(self, **extra) -> dict:
        return {"slicer": self.slicer.id, "stl": self.stl, "stl_location": LOCATION, "gcode": self.gcode,
                "gcode_location": LOCATION, **extra}


def default_destination(stl: str) -> str:
    """OctoPrint's: the model's path with its extension replaced by ``.gcode``."""
    path = PurePosixPath(stl)
    return str(path.with_suffix(".gcode"))


def _generated_header(model_path: str, name: str) -> bytes:
    digest = hashlib.sha1()
    with open(model_path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return f";Generated from {name} (hash: {digest.hexdigest()})\n".encode()


class SlicingService:
    """Everything the slicing process runs, startable in-process (tests run it on a thread)."""

    def __init__(self, config, context: zmq.Context | None = None):
        self.config = config
        section = config.get("slicing") or {}
        self.timeout = float(section.get("timeout", 600.0))
        self.nice = int(section.get("nice", 10))
        self.concurrency = int(section.get("concurrency", 1))
        self.default_slicer = section.get("default_slicer")
        self.context = context or zmq.Context.instance()
        self.profiles = SlicingProfiles.for_config(config)
        self.printer_profiles = ProfileStore.for_config(config)
        self.tmp = Path(config.data_dir) / "slicing" / "tmp"
        self.server = None
        self.publisher = None
        self.jobs: dict = {}                       # destination -> Job
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._numbers = itertools.count(1)
        self._found: list | None = None
        self._slots = threading.BoundedSemaphore(max(1, self.concurrency))
        self._stop = threading.Event()
        self._wakeup = Wakeup()

    # --- life cycle ----------------------------------------------------------------------------------------------

    def start(self):
        self.tmp.mkdir(parents=True, exist_ok=True)
        for leftover in self.tmp.iterdir():           # a job killed with the service: nothing of it may remain
            try:
                leftover.unlink()
            except OSError:
                pass
        self.server = printer_channel.bind(endpoint(self.config), self.context, "the slicing service", ServiceError)
        self.publisher = zbus.Publisher(self.config, src="slicing", printer=self.config.get("printer", "name"),
                                        context=self.context)
        threading.Thread(target=self._find_slicers, name="slicer-versions", daemon=True).start()

    def serve(self):
        poller = zmq.Poller()
        poller.register(self.server.sock, zmq.POLLIN)
        poller.register(self._wakeup.fileno(), zmq.POLLIN)
        while not self._stop.is_set():
            poller.poll(1000)
            self._wakeup.drain()
            while True:
                request = self.server.receive()
                if request is None:
                    break
                self._handle(*request)
            self._drain_inbox()

    def stop(self):
        self._stop.set()
        self._wakeup.wake()

    def close(self):
        for job in list(self.jobs.values()):
            job.cancelled = True
            job.run.cancel()
        for job in list(self.jobs.values()):
            if job.thread is not None:
                job.thread.join(10)
        self._drain_inbox()
        if self.server is not None:
            self.server.close()
        if self.publisher is not None:
            self.publisher.close(linger=2.0)
        self._wakeup.close()

    # --- requests ------------------------------------------------------------------------------------------------

    def _handle(self, reply_to, command: str, args: dict):
        try:
            if command == "SLICE":
                self.server.reply(reply_to, args, **self._slice(args))
            elif command == "CANCEL":
                self.server.reply(reply_to, args, cancelled=self._cancel(str(args.get("dest") or "")))
            elif command == "STATUS":
                self.server.reply(reply_to, args, jobs=[{**job.payload(), "progress": max(job.progress, 0)}
                                                        for job in self.jobs.values()],
                                  slicers=self._slicers_found())
            else:
                self.server.reply(reply_to, args, ok=False, error=f"unknown command {command!r}")
        except (SlicingProfileError, ProfileError, ValueError, KeyError, OSError) as exc:
            message = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            self.server.reply(reply_to, args, ok=False, error=message)

    def _find_slicers(self):
        self._found = [s.as_dict() for s in slicers.find_all(self.config)]

    def _slicers_found(self) -> list:
        """What STATUS reports.  Asking a slicer its version runs it (a hung one for up to its timeout), so that is
        done once, off the loop; until it is done the versions are left out."""
        if self._found is not None:
            return self._found
        return [slicers.find(slicer_id, self.config, with_version=False).as_dict()
                for slicer_id in slicers.SLICER_IDS]

    def _slicer(self, requested: str | None) -> slicers.Slicer:
        if requested:
            slicer = slicers.find(requested, self.config, with_version=False)
            if not slicer.available:
                raise ValueError(slicer.problem)
            return slicer
        if self.default_slicer:
            return self._slicer(self.default_slicer)
        for slicer_id in slicers.SLICER_IDS:
            slicer = slicers.find(slicer_id, self.config, with_version=False)
            if slicer.available:
                return slicer
        raise ValueError("no slicer is installed: " + "; ".join(s.install_hint() for s in slicers.find_all()))

    def _model_path(self, stl: str) -> str:
        from zevents.files.channel import FilesClient, endpoint as files_endpoint

        client = FilesClient(files_endpoint(self.config), self.context)
        try:
            entry = client.request("INFO", {"path": stl}, timeout=10.0)["file"]
        finally:
            client.close()
        if entry.get("type") != "model":
            raise ValueError(f"{stl} is not a model (its type is {entry.get('typePath') or entry.get('type')})")
        uploads = (self.config.get("files") or {}).get("uploads") or Path(self.config.data_dir) / "uploads"
        return str(Path(os.path.expanduser(str(uploads))) / entry["path"])

    def _printer_profile(self, args: dict) -> str | None:
        """The profile of the printer the G-code is for (``printer``: one of the node's; None: the only one, or
        printer.profile when the node has several)."""
        from zevents.printer.settings import PrinterChoiceError, printer_section

        try:
            return printer_section(self.config, args.get("printer")).get("profile") or None
        except PrinterChoiceError as exc:
            if args.get("printer"):
                raise ValueError(str(exc)) from None
            return self.config.get("printer", "profile") or None

    def _slice(self, args: dict) -> dict:
        stl = args.get("model")
        if not isinstance(stl, str) or not stl:
            raise ValueError("missing 'model' (a model's path in storage)")
        gcode = args.get("dest") or default_destination(stl)
        if not isinstance(gcode, str) or PurePosixPath(gcode).suffix.lower() not in (".gcode", ".gco", ".g"):
            raise ValueError(f"the destination must be a .gcode path, not {gcode!r}")
        try:
            slicer = self._slicer(args.get("slicer"))
            profile_path = self.profiles.resolve(slicer.id, args.get("profile"))
            printer_profile = self.printer_profiles.get(args.get("printer_profile") or self._printer_profile(args))
        except (SlicingProfileError, ProfileError, ValueError, KeyError) as exc:
            # a missing slicer or profile is a failed slicing job, on the bus too (the requester gets the reason)
            reason = exc.args[0] if isinstance(exc, KeyError) and exc.args else str(exc)
            self.publisher.publish("SlicingFailed", {"slicer": args.get("slicer") or self.default_slicer, "stl": stl,
                                                     "stl_location": LOCATION, "gcode": gcode,
                                                     "gcode_location": LOCATION, "reason": reason})
            raise
        model_path = self._model_path(stl)
        number = next(self._numbers)
        output = str(self.tmp / f"job{number}-{os.getpid()}.gcode")
        job = Job(number, slicer, stl, gcode, model_path,
                  SliceRun(slicer, model_path, str(profile_path) if profile_path else None, printer_profile, output,
                           timeout=self.timeout, nice=self.nice, overrides=dict(args.get("overrides") or {})),
                  select=bool(args.get("select")), print=bool(args.get("print")), printer=args.get("printer"))
        job.run.on_progress = lambda fraction, job=job: self._report(("progress", job, fraction))
        self.publisher.publish("SlicingStarted", job.payload(progressAvailable=slicer.progress_available))
        previous = self.jobs.get(gcode)
        if previous is not None:
            previous.cancelled = True
            previous.run.cancel()
        self.jobs[gcode] = job
        job.thread = threading.Thread(target=self._work, args=(job,), name=f"slice-{number}", daemon=True)
        job.thread.start()
        return {"slicer": slicer.id, "stl": stl, "gcode": gcode, "job": number}

    def _cancel(self, dest: str) -> bool:
        job = self.jobs.get(dest)
        if job is None:
            return False
        job.cancelled = True
        job.run.cancel()
        return True

    # --- jobs ----------------------------------------------------------------------------------------------------

    def _report(self, item):
        self.inbox.put(item)
        self._wakeup.wake()

    def _work(self, job: Job):
        with self._slots:
            outcome = Outcome("cancelled") if job.cancelled else job.run.run()
            if outcome.status == "done" and not job.cancelled:
                outcome = self._store(job, outcome)
        self._report(("finished", job, outcome))

    def _store(self, job: Job, outcome: Outcome) -> Outcome:
        """OctoPrint's first line, then the slicer's G-code, handed to the files service (which moves it in)."""
        from zevents.files.channel import ChannelError, FilesClient, endpoint as files_endpoint

        final = outcome.output + ".stored"
        try:
            with open(final, "wb") as out, open(outcome.output, "rb") as sliced:
                out.write(_generated_header(job.model_path, PurePosixPath(job.stl).name))
                for block in iter(lambda: sliced.read(1 << 20), b""):
                    out.write(block)
        except OSError as exc:
            return Outcome("failed", reason=f"cannot prepare the G-code: {exc}", seconds=outcome.seconds)
        finally:
            _unlink(outcome.output)
        if job.cancelled:
            _unlink(final)
            return Outcome("cancelled", seconds=outcome.seconds)
        client = FilesClient(files_endpoint(self.config))
        # SlicingDone must follow the files service's FileAdded and UpdatedFiles on the bus (OctoPrint's order);
        # their publisher is not ours, so the job watches for them before it reports.
        watcher = zbus.Subscriber(self.config, groups=["file"])
        try:
            reply = client.request("UPLOAD", {"source": final, "path": job.gcode, "overwrite": True,
                                              "remove_source": True, "select": job.select, "print": job.print,
                                              "printer": job.printer, "fire_upload": False}, timeout=120.0)
            _wait_for_storage_events(watcher, reply.get("path") or job.gcode)
        except ChannelError as exc:
            return Outcome("failed", reason=f"the files service did not store the G-code: {exc}",
                           seconds=outcome.seconds)
        finally:
            watcher.close()
            client.close()
            _unlink(final)
        return Outcome("done", output=job.gcode, seconds=time.monotonic() - job.started)

    def _drain_inbox(self):
        while True:
            try:
                kind, job, value = self.inbox.get_nowait()
            except queue.Empty:
                return
            if kind == "progress":
                percent = int(value * 100)
                if percent > job.progress and not job.cancelled:
                    job.progress = percent
                    self.publisher.publish("SlicingProgress", job.payload(progress=percent))
                continue
            if self.jobs.get(job.gcode) is job:
                del self.jobs[job.gcode]
            outcome: Outcome = value
            if outcome.status == "done":
                self.publisher.publish("SlicingDone", job.payload(time=round(outcome.seconds, 3)))
            elif outcome.status == "cancelled" or job.cancelled:
                self.publisher.publish("SlicingCancelled", job.payload())
            else:
                log.warning("slicing %s with %s failed: %s", job.stl, job.slicer.id, outcome.reason)
                self.publisher.publish("SlicingFailed", job.payload(reason=outcome.reason))


def _wait_for_storage_events(watcher, path: str, timeout: float = 10.0) -> None:
    """Until the FileAdded of ``path`` and the UpdatedFiles after it were on the bus (or ``timeout``)."""
    deadline = time.monotonic() + timeout
    added = False
    while (remaining := deadline - time.monotonic()) > 0:
        envelope = watcher.recv(remaining)
        if envelope is None:
            continue
        if envelope.name == "FileAdded" and envelope.payload.get("path") == path:
            added = True
        elif added and envelope.name == "UpdatedFiles":
            return
    log.warning("the files service's events for %s were not seen within %g s", path, timeout)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def run(config) -> int:
    """The slicing service process: until SIGINT/SIGTERM; 1 if it cannot start."""
    from zevents.service import run_until_signalled

    return run_until_signalled("slicing", config, SlicingService(config), (ServiceError, OSError), log)
