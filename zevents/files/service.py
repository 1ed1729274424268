"""The files service process: local storage, the watched folder, the analysis queue, print history, and the
command channel (see ``zevents.files.channel`` for its API).

One thread (the service loop) owns every ZeroMQ socket and the storage: it serves the command channel, reads the
print and printer-state events from the bus (print history, "is printing" for refusals and for pausing the
analysis), takes in what the watched folder and the analysis queue report through a queue, writes metadata and
publishes events.  Work that waits for the printer (select/print after an upload, SD card operations) runs on a
one-thread executor that talks to the printer link's channel; its reply is sent by the loop when it is done, so
the channel stays responsive.  Events are published only after the metadata they describe is written.
"""
from __future__ import annotations

import concurrent.futures
import fcntl
import logging
import os
import queue
import threading
import time
from pathlib import Path

import zmq

from zevents import bus as zbus
from zevents.files import storage as st
from zevents.files.analysis_queue import AnalysisQueue, engine
from zevents.files.channel import STORAGES, endpoint as files_endpoint
from zevents.printer import channel as printer_channel

log = logging.getLogger("zevents.files")

LOOP_INTERVAL = 1.0
AWAIT_PRINTER_EVENT = 10.0   # seconds Upload waits for the printer's FileSelected / PrintStarted on the bus
PRINTING_STATES = ("PRINTING", "PAUSING", "PAUSED", "RESUMING", "CANCELLING", "FINISHING", "STARTING")
UPDATED = ("UpdatedFiles", {"type": "printables"})
LOCK_FILE = ".zevents-files.lock"
SD = "sdcard"


class ServiceError(RuntimeError):
    """The service cannot start (endpoint in use, bad folders)."""


def _required(args: dict, key: str) -> str:
    value = args.get(key)
    if not isinstance(value, str) or not value:
        raise st.StorageError(f"missing {key!r}")
    return value


class FilesService:
    """Everything the files process runs, startable in-process (tests run it on a thread)."""

    def __init__(self, config, context: zmq.Context | None = None):
        self.config = config
        section = config.get("files") or {}
        self.section = section
        data = Path(config.data_dir)
        self.uploads = Path(os.path.expanduser(section.get("uploads") or data / "uploads"))
        watched = section.get("watched")
        self.watched_dir = Path(os.path.expanduser(watched or data / "watched")) if section.get("watch", True) \
            else None
        self.cache_dir = data / "analysis-cache"
        self.context = context or zmq.Context.instance()
        self.storage: st.LocalStorage | None = None
        self.server = None
        self.publisher = None
        self.subscriber = None
        self.analysis: AnalysisQueue | None = None
        self.watcher = None
        self.printing: str | None = None          # storage path of the local file being printed
        self.selected: str | None = None          # storage path of the local file selected on the printer
        self.printer_busy = False
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._pending: list = []
        self._awaiting: list = []                 # (event name, path, deadline, action): Upload after the printer's
        self._seen: dict = {}                     # (event name, path) -> when the bus carried it
        self._printer_work = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="files-printer")
        self._stop = threading.Event()
        self._lock_fd = None
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)

    # --- life cycle ----------------------------------------------------------------------------------------------

    def start(self):
        try:
            self.storage = st.LocalStorage(self.uploads)
        except OSError as exc:
            raise ServiceError(f"cannot use the uploads folder {self.uploads}: {exc}") from None
        # One service per uploads folder (two would race on the metadata and both drain the watched folder); a
        # second one binding the same ipc path would silently take the channel over, so the lock is the check.
        self._lock_fd = os.open(self.uploads / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ServiceError(f"another files service is using {self.uploads}") from None
        backlog = self.storage.reconcile(engine())
        endpoint = files_endpoint(self.config)
        self.server = printer_channel.bind(endpoint, self.context, "the files service", ServiceError)
        self.publisher = zbus.Publisher(self.config, src="files", printer=self.config.get("printer", "name"),
                                        context=self.context)
        self.subscriber = zbus.Subscriber(self.config, groups=["print", "comm", "file"], context=self.context)
        settings = self.section.get("analysis") or {}
        self.analysis = AnalysisQueue(self._analysis_report, self.cache_dir,
                                      timeout=float(settings.get("timeout", 600.0)),
                                      run_at=settings.get("run_at", "idle"))
        # A restart during a print must still protect the printed file and not analyse while printing: the queue
        # waits for the link's answer (or its absence) before the first analysis.
        self.analysis.pause()
        for path in backlog:
            self._enqueue_analysis(path, high=False)
        future = self._printer_work.submit(self._printer_job)
        future.add_done_callback(self._wake)
        self._pending.append((future, None, {}, self._apply_printer_job))
        if self.watched_dir is not None:
            from zevents.files.watched import WatchedFolder

            self.watcher = WatchedFolder(self.watched_dir, self._watched_ready,
                                         polling=bool(self.section.get("poll_watched")),
                                         poll_interval=float(self.section.get("poll_interval", 1.0)),
                                         stable_time=float(self.section.get("stable_time", 5.0)))
            self.watcher.start()

    def serve(self):
        poller = zmq.Poller()
        poller.register(self.server.sock, zmq.POLLIN)
        poller.register(self.subscriber.sock, zmq.POLLIN)
        poller.register(self._wake_r, zmq.POLLIN)
        while not self._stop.is_set():
            poller.poll(LOOP_INTERVAL * 1000)
            try:
                os.read(self._wake_r, 4096)
            except BlockingIOError:
                pass
            self._bus_events()
            while True:
                request = self.server.receive()
                if request is None:
                    break
                self._handle(*request)
            self._inbox()
            self._reply_finished()
            if self._awaiting:   # a printer event that never came: Upload goes out anyway
                now = time.monotonic()
                self._run_awaiting(lambda waiting: waiting[2] <= now)

    def _wake(self, *_):
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass

    def stop(self):
        self._stop.set()
        self._wake()

    def close(self):
        if self.watcher is not None:
            self.watcher.stop()
        if self.analysis is not None:
            self.analysis.close()
        self._printer_work.shutdown(wait=True, cancel_futures=True)
        if self.storage is not None:
            self.storage.flush()
        for closeable in (self.server, self.subscriber):
            if closeable is not None:
                closeable.close()
        if self.publisher is not None:
            self.publisher.close(linger=2.0)
        for fd in (self._wake_r, self._wake_w, self._lock_fd):
            try:
                if fd is not None:
                    os.close(fd)
            except OSError:
                pass

    # --- publishing ----------------------------------------------------------------------------------------------

    def _publish(self, events: list):
        """Write the metadata first, then tell the world."""
        self.storage.flush()
        for name, payload in events:
            self.publisher.publish(name, payload)

    # --- bus events: print history and printer state -------------------------------------------------------------

    def _bus_events(self):
        while True:
            envelope = self.subscriber.recv(0)
            if envelope is None:
                return
            name, payload = envelope.name, envelope.payload or {}
            if name in ("PrintStarted", "FileSelected", "FileDeselected", "TransferDone"):
                self._note_printer_event(name, payload)
            if name == "FileSelected":
                self.selected = self._local_path(payload)
            elif name == "FileDeselected":
                self.selected = None
            if name == "PrintStarted":
                self.printer_busy = True
                self.printing = self._local_path(payload)
                self.analysis.pause()
            elif name in ("PrintDone", "PrintFailed"):
                self._record_print(payload, name == "PrintDone")
                self.printing = None
            elif name == "PrinterStateChanged":
                busy = payload.get("state_id") in PRINTING_STATES
                self.printer_busy = busy
                if busy:
                    self.analysis.pause()
                else:
                    self.printing = None
                    self.analysis.resume()

    def _local_path(self, payload: dict) -> str | None:
        if payload.get("origin") != "local" or not isinstance(payload.get("path"), str):
            return None
        path = payload["path"]
        return self.storage.storage_path_of(path) if os.path.isabs(path) else path

    def _record_print(self, payload: dict, success: bool):
        path = self._local_path(payload)
        if path is None or not self.storage.is_file(path):
            return
        elapsed = payload.get("time")
        self.storage.add_history(path, success, elapsed if isinstance(elapsed, (int, float)) else None)
        # OctoPrint's log_print fires MetadataStatisticsUpdated (not in the documented catalogue: a custom event)
        self._publish([("MetadataStatisticsUpdated", {"storage": st.STORAGE, "path": path})])

    # --- inbox: watched folder and analysis reports (other threads) ----------------------------------------------

    def _watched_ready(self, disk_path: str):
        self.inbox.put(("watched", disk_path))
        self._wake()

    def _analysis_report(self, kind: str, job, result):
        self.inbox.put(("analysis", kind, job, result))
        self._wake()

    def _inbox(self):
        events = []
        while True:
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                break
            if item[0] == "watched":
                events.extend(self._add_watched(item[1]))
            else:
                events.extend(self._analysis_event(*item[1:]))
        if events:
            self._publish(events)

    def _add_watched(self, disk_path: str) -> list:
        """OctoPrint's watched-folder upload: the relative path is kept, the source goes away; no Upload event."""
        relative = os.path.relpath(disk_path, self.watched_dir)
        if relative.startswith("..") or not os.path.isfile(disk_path):
            return []
        try:
            path, events, changed = self.storage.add_file(disk_path, relative.replace(os.sep, "/"),
                                                          overwrite=True, move_source=True, printing=self.printing)
        except (st.StorageError, OSError) as exc:
            failed = disk_path + ".failed"
            reason = str(exc)
            try:
                os.replace(disk_path, failed)
            except OSError as rename_error:
                reason += f" (and it could not be renamed .failed: {rename_error})"
            log.warning("watched folder: %s not added: %s; renamed %s", relative, reason,
                        os.path.basename(failed))
            return [("WatchedFileFailed", {"storage": st.STORAGE, "path": relative,
                                           "name": os.path.basename(disk_path), "failed": failed,
                                           "reason": reason})]
        self._enqueue_analysis(path, high=True)
        if path == self.selected:
            # OctoPrint re-selects a selected file that the watched folder replaced: the printer gets the new bytes.
            # FileAdded goes out first: the link's FileSelected must not overtake it on the bus.
            self._publish(events + [UPDATED])
            disk = str(self.storage.disk(path))
            self._submit_printer(None, {}, self._select_and_print, disk, True, False, None, None)
            return []
        return events + [UPDATED]

    def _enqueue_analysis(self, path: str, high: bool) -> bool:
        if not st.is_gcode(path):
            return False
        entry = self.storage.entry(path) or {}
        digest = entry.get("hash")
        if not digest:
            return False
        return self.analysis.enqueue(path, str(self.storage.disk(path)), digest, high=high)

    def _analysis_event(self, kind: str, job, result) -> list:
        entry = self.storage.entry(job.path)
        if entry is None or entry.get("hash") != job.hash:
            return []   # removed or changed since: its new analysis is queued
        name = job.path.rpartition("/")[2]
        if kind == "started":
            return [("MetadataAnalysisStarted", {"name": name, "path": job.path, "origin": st.STORAGE,
                                                 "type": "gcode"})]
        if kind == "failed":
            entry = self.storage.update_entry(job.path, analysisError=str(result))
            return []   # OctoPrint fires no Finished event for a failed analysis
        entry = dict(entry, analysis=result, analysisBy=self.analysis.engine)
        entry.pop("analysisError", None)
        self.storage.set_entry(job.path, entry)
        shown = dict(result)
        shown.update(self._volume_check(result))
        shown["history"] = entry.get("history") or []
        shown["statistics"] = entry.get("statistics") or st.statistics_of([])
        return [("MetadataAnalysisFinished", {"name": name, "path": job.path, "origin": st.STORAGE,
                                              "result": shown})]

    def _volume_check(self, result: dict) -> dict:
        """Whether the file's extrusions fit the printer profile the node prints with (``printer.profile``)."""
        from zevents.printer.profiles import ProfileError, ProfileStore, outside_volume

        try:
            profile = ProfileStore.for_config(self.config).get(self.config.get("printer", "profile") or None)
        except ProfileError as exc:
            log.warning("files: no printer profile to check the analysis against: %s", exc)
            return {}
        crossed = outside_volume(profile, result.get("printingArea") or {})
        return {"printerProfile": profile["id"], "outsideVolume": bool(crossed), "outsideVolumeSides": crossed}

    # --- requests ------------------------------------------------------------------------------------------------

    def _handle(self, reply_to, command: str, args: dict):
        server = self.server
        try:
            storage = args.get("storage") or st.STORAGE
            if storage not in STORAGES:
                raise st.StorageError(f"unknown storage {storage!r} (local or sdcard)")
            if storage == SD:
                self._submit_printer(reply_to, args, self._sd_request, command, args)
                return
            handler = self._COMMANDS.get(command)
            if handler is None:
                raise st.StorageError(f"unknown command {command!r}")
            reply = handler(self, reply_to, args)
            if reply is not None:
                server.reply(reply_to, args, True, **reply)
        except st.StorageError as exc:
            self.storage.flush()
            server.reply(reply_to, args, False, error=str(exc), code=exc.code)
        except OSError as exc:
            self.storage.flush()
            log.exception("files: %s failed", command)
            server.reply(reply_to, args, False, error=f"{command.lower()} failed: {exc}")

    def _cmd_list(self, reply_to, args):
        return {"files": self.storage.list(args.get("path") or "", bool(args.get("recursive")))}

    def _cmd_info(self, reply_to, args):
        path = self.storage.path(_required(args, "path"))
        if not self.storage.exists(path) or (self.storage.is_file(path) and not st.file_type(path)):
            raise st.NotFound(f"no such file or folder: {path}")
        info = self.storage.describe(path)
        if self.storage.is_file(path):
            entry = self.storage.entry(path) or {}
            info.setdefault("history", entry.get("history") or [])
            info.setdefault("statistics", entry.get("statistics") or st.statistics_of([]))
            info["printing"] = path == self.printing
        return {"file": info}

    def _cmd_upload(self, reply_to, args):
        source = _required(args, "source")
        if not os.path.isabs(source):
            raise st.StorageError(f"source must be an absolute path, not {source!r}")
        path = args.get("path") or os.path.basename(source)
        userdata = args.get("userdata")
        path, events, _ = self.storage.add_file(
            source, path, overwrite=args.get("overwrite", True) is not False,
            move_source=bool(args.get("remove_source")), printing=self.printing,
            user=args.get("user"), userdata=userdata, display=args.get("display"))
        self.analysis.dequeue(path)
        self._enqueue_analysis(path, high=True)
        self._publish(events + [UPDATED])
        select, start = bool(args.get("select")), bool(args.get("print"))
        name = path.rpartition("/")[2]
        result = {"storage": st.STORAGE, "path": path, "name": name, "select": select, "print": start}
        upload = {"name": name, "path": path, "target": st.STORAGE, "select": select, "print": start}
        if userdata is not None:
            upload["userdata"] = userdata
        if not (select or start) or not st.is_gcode(path):
            return self._uploaded(result, upload, args, False, False)
        disk = str(self.storage.disk(path))
        asked = time.monotonic()

        def after_printer(outcome):
            selected, printing = outcome
            if not selected:
                return self._uploaded(result, upload, args, False, False)
            # The printer's FileSelected / PrintStarted come from another process: Upload waits until the bus
            # has carried them, so subscribers see OctoPrint's order (FileSelected, PrintStarted, then Upload).
            self._await_event("PrintStarted" if printing else "FileSelected", disk, asked,
                              lambda: self.server.reply(reply_to, args, True,
                                                        **self._uploaded(result, upload, args, selected, printing)))
            return None

        self._submit_printer(reply_to, args, self._select_and_print, disk, select, start, args.get("user"),
                             args.get("printer"), then=after_printer)
        return None

    def _await_event(self, name: str, disk: str, since: float, action):
        seen = self._seen.get((name, disk))
        if not name or (seen is not None and seen >= since):
            action()
        else:
            self._awaiting.append((name, disk, time.monotonic() + AWAIT_PRINTER_EVENT, action))

    def _note_printer_event(self, name: str, payload: dict):
        disk = payload.get("remote") if name == "TransferDone" else payload.get("path")
        self._seen[(name, disk)] = time.monotonic()
        if len(self._seen) > 100:
            self._seen.pop(next(iter(self._seen)))
        self._run_awaiting(lambda waiting: waiting[0] == name and waiting[1] == disk)

    def _run_awaiting(self, matches):
        due = [waiting for waiting in self._awaiting if matches(waiting)]
        if due:
            self._awaiting = [waiting for waiting in self._awaiting if not matches(waiting)]
            for waiting in due:
                waiting[3]()

    def _uploaded(self, result: dict, upload: dict, args: dict, selected: bool, printing: bool) -> dict:
        upload.update(effective_select=selected, effective_print=printing)
        if args.get("fire_upload", True):
            self._publish([("Upload", upload)])
        return dict(result, effective_select=selected, effective_print=printing, done=True)

    def _cmd_remove(self, reply_to, args):
        path = self.storage.path(_required(args, "path"))
        if path == self.selected and path != self.printing and self.storage.is_file(path):
            # OctoPrint unselects a selected file before removing it: FileDeselected comes before FileRemoved
            asked = time.monotonic()

            def after_deselect(deselected):
                if deselected:
                    self._await_event("FileDeselected", None, asked, lambda: self.server.reply(
                        reply_to, args, True, **self._remove(path)))
                    return None
                return self._remove(path)

            self._submit_printer(reply_to, args, self._deselect, then=after_deselect)
            return None
        return self._remove(path)

    def _remove(self, path: str) -> dict:
        events = self.storage.remove_file(path, printing=self.printing)
        self.analysis.dequeue(path)
        self._publish(events + [UPDATED])
        return {}

    def _copy_or_move(self, args, move: bool):
        source = self.storage.path(_required(args, "source"))
        destination = _required(args, "destination")
        folder = self.storage.is_folder(source)
        if folder:
            operation = self.storage.move_folder if move else self.storage.copy_folder
        else:
            operation = self.storage.move_file if move else self.storage.copy_file
        kwargs = {"printing": self.printing} if move else {}
        path, events = operation(source, destination, **kwargs)
        if move:
            self.analysis.dequeue(source, folder=folder)
        targets = self.storage.files_under(path) if folder else [path]
        self.storage.flush()
        for target in targets:
            if "analysis" not in (self.storage.entry(target) or {}):
                self._enqueue_analysis(target, high=False)
        self._publish(events + [UPDATED])
        return {"path": path}

    def _cmd_mkdir(self, reply_to, args):
        self._publish(self.storage.add_folder(_required(args, "path")) + [UPDATED])
        return {}

    def _cmd_rmdir(self, reply_to, args):
        path = self.storage.path(_required(args, "path"))
        events = self.storage.remove_folder(path, bool(args.get("recursive")), printing=self.printing)
        self.analysis.dequeue(path, folder=True)
        self._publish(events + [UPDATED])
        return {}

    def _cmd_analyse(self, reply_to, args):
        path = self.storage.path(_required(args, "path"))
        if not self.storage.is_file(path) or not st.is_gcode(path):
            raise st.NotFound(f"no such G-code file: {path}")
        return {"queued": self._enqueue_analysis(path, high=True)}

    def _cmd_status(self, reply_to, args):
        return {"printing": self.printing, "printer_busy": self.printer_busy,
                "analysis": {"paused": self.analysis.paused, "pending": self.analysis.pending(),
                             "run_at": self.analysis.run_at},
                "uploads": str(self.uploads), "watched": str(self.watched_dir) if self.watched_dir else None}

    _COMMANDS = {
        "LIST": _cmd_list, "INFO": _cmd_info, "UPLOAD": _cmd_upload, "REMOVE": _cmd_remove,
        "COPY": lambda self, reply_to, args: self._copy_or_move(args, move=False),
        "MOVE": lambda self, reply_to, args: self._copy_or_move(args, move=True),
        "MKDIR": _cmd_mkdir, "RMDIR": _cmd_rmdir, "ANALYSE": _cmd_analyse, "STATUS": _cmd_status,
    }

    # --- work that waits for the printer link (executor thread; replies from the loop) ---------------------------

    def _submit_printer(self, reply_to, args, fn, *fn_args, then=None):
        future = self._printer_work.submit(fn, *fn_args)
        future.add_done_callback(self._wake)
        self._pending.append((future, reply_to, args, then))

    def _reply_finished(self):
        still = []
        for future, reply_to, args, then in self._pending:
            if not future.done():
                still.append((future, reply_to, args, then))
                continue
            try:
                outcome = future.result()
                if isinstance(outcome, tuple) and outcome and outcome[0] == "events":
                    _, events, reply, (after, key, since) = outcome
                    # after the printer's own event (e.g. TransferDone) has been on the bus: OctoPrint's order
                    self._await_event(after, key, since, lambda events=events, reply=reply, reply_to=reply_to,
                                      args=args: (self._publish(events),
                                                  self.server.reply(reply_to, args, True, **reply)))
                    continue
                reply = then(outcome) if then is not None else outcome
                if reply_to is not None and reply is not None:
                    self.server.reply(reply_to, args, True, **reply)
            except (st.StorageError, printer_channel.ChannelError) as exc:
                if reply_to is not None:
                    self.server.reply(reply_to, args, False, error=str(exc),
                                      code=getattr(exc, "code", None) or "printer")
            except Exception as exc:
                log.exception("files: printer request failed")
                if reply_to is not None:
                    self.server.reply(reply_to, args, False, error=f"internal error: {exc}")
        self._pending = still

    def _printer_client(self, printer: str | None = None):
        """A client of the channel of the node's printer called ``printer`` (None: the only one); its first request
        raises ChannelError at once when no link is running (no socket)."""
        from zevents.printer.settings import PrinterChoiceError, printer_section

        try:
            endpoint = printer_section(self.config, printer)["commands"]
        except PrinterChoiceError as exc:
            raise printer_channel.ChannelError(str(exc)) from None
        return printer_channel.CommandClient(endpoint, self.context)

    def _printer_job(self) -> dict:
        """The link's STATUS (state and job), or {} when no link answers (no printer in this node)."""
        try:
            client = self._printer_client()
        except printer_channel.ChannelError:
            return {}
        try:
            return client.request("STATUS", {}, timeout=5.0)
        except printer_channel.ChannelError:
            return {}
        finally:
            client.close()

    def _apply_printer_job(self, status: dict):
        if status.get("job"):
            self.selected = self._local_path(status["job"])
        if status.get("printing") or status.get("state_id") in PRINTING_STATES:
            self.printer_busy = True
            self.printing = self._local_path(status.get("job") or {}) or self.printing
        elif not self.printer_busy:
            self.analysis.resume()
        return None

    def _deselect(self) -> bool:
        try:
            client = self._printer_client()
        except printer_channel.ChannelError:
            return False
        try:
            client.request("DESELECT", {}, timeout=30.0)
            return True
        except printer_channel.ChannelError as exc:
            log.warning("files: the printer did not deselect the file being removed: %s", exc)
            return False
        finally:
            client.close()

    def _select_and_print(self, disk: str, select: bool, start: bool, user, printer: str | None) -> tuple:
        """(effective_select, effective_print): a refusal of the printer is logged, the upload stays done."""
        selected = printing = False
        client = None
        try:
            client = self._printer_client(printer)
            if start:
                client.request("PRINT", {"path": disk, "user": user}, timeout=30.0)
                selected = printing = True
            else:
                client.request("SELECT", {"path": disk}, timeout=30.0)
                selected = True
        except printer_channel.ChannelError as exc:
            log.warning("files: upload %s: the printer did not %s it: %s", os.path.basename(disk),
                        "print" if start else "select", exc)
        finally:
            if client is not None:
                client.close()
        return selected, printing

    def _sd_request(self, command: str, args: dict):
        """SD card storage through the printer link: list, upload (M28/M29), remove (M30)."""
        client = self._printer_client(args.get("printer"))
        asked = time.monotonic()
        try:
            if command == "LIST":
                files = client.request("SD_LIST", {}, timeout=60.0).get("files") or []
                return {"files": [{"name": f.get("name"), "path": f.get("name"), "type": "machinecode",
                                   "typePath": ["machinecode", "gcode"], "origin": SD, "size": f.get("size")}
                                  for f in files]}
            if command == "UPLOAD":
                source = _required(args, "source")
                if not os.path.isfile(source):
                    raise st.NotFound(f"no such file to upload: {source}")
                if not st.is_gcode(source):
                    raise st.UnsupportedType("only G-code can go to the SD card")
                remote = args.get("path") or None
                reply = client.request("SD_UPLOAD", {"path": source, "remote": remote, "wait": True},
                                       timeout=24 * 3600.0)
                name = reply.get("remote")
                kind = ["machinecode", "gcode"]
                upload = {"name": name, "path": name, "target": SD, "select": False, "print": False,
                          "effective_select": False, "effective_print": False}
                events = [("FileAdded", {"storage": SD, "path": name, "name": name, "type": kind,
                                         "operation": "add"}), UPDATED, ("Upload", upload)]
                return ("events", events, {"storage": SD, "path": name, "name": name, "done": True},
                        ("TransferDone", name, asked))
            if command == "REMOVE":
                name = _required(args, "path")
                if any(c in name for c in "\0\n\r") or "/" in name.strip("/"):
                    raise st.StorageError(f"not an SD card file name: {name!r}")
                client.request("GCODE", {"lines": [f"M30 {name}"], "src": "user"}, timeout=30.0)
                events = [("FileRemoved", {"storage": SD, "path": name, "name": name,
                                           "type": ["machinecode", "gcode"], "operation": "remove"}), UPDATED]
                return ("events", events, {}, ("", None, asked))   # M30: the printer fires nothing
            raise st.StorageError(f"{command} is not available on the SD card (ls, upload, rm)")
        finally:
            client.close()


def run(config) -> int:
    """The files service process: until SIGINT/SIGTERM; 1 if it cannot start."""
    from zevents.service import run_until_signalled

    return run_until_signalled("files", config, FilesService(config), (ServiceError, OSError, ValueError), log)
