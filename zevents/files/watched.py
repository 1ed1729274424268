"""The watched folder: notices files dropped there and hands each over exactly once, when it is complete.

Two ways to notice (``files.poll_watched``): watchdog's inotify Observer (local disks: a file is complete when
its writer closes it, IN_CLOSE_WRITE, or when it is renamed into the folder) or watchdog's PollingObserver
(network shares, where inotify sees nothing: a file is complete once its size and mtime stayed the same for
``stable_time`` seconds, OctoPrint's rule, which uses 5 s).  The stability rule also covers, in either mode, the
files already there at start (the startup scan) and the files whose close inotify could not report (written in a
folder created a moment before, before its watch was in place); a writer that pauses longer than ``stable_time``
without closing is therefore only safe with inotify in a folder that already existed.

What is ignored: hidden names (``.x``: rsync's and our own temp files), ``*.failed`` (files that could not be added
stay there for a human), and download/editor temp suffixes (``.part``, ``.tmp``, ``.crdownload``, ``~``) that are
renamed to their real name when complete.  Everything else is handed over, including unknown types: the service
refuses those with a ``.failed`` rename and an event saying why, rather than ignoring a file the user wanted.

``ready(path)`` is called from the checker or observer thread; the consumer moves the file away (or renames it
``.failed``), which is what makes the hand-over happen once: a path is forgotten when it is handed over.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path

from watchdog.events import FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.polling import PollingObserver

log = logging.getLogger("zevents.files.watched")

TEMP_SUFFIXES = (".part", ".tmp", ".crdownload", "~", ".swp")
FAILED_SUFFIX = ".failed"


def ignored(path: str) -> bool:
    name = os.path.basename(path)
    return name.startswith(".") or name.endswith(FAILED_SUFFIX) or name.endswith(TEMP_SUFFIXES)


class _Candidate:
    __slots__ = ("size", "mtime", "since")

    def __init__(self):
        self.size = self.mtime = None
        self.since = time.monotonic()


class WatchedFolder(FileSystemEventHandler):
    def __init__(self, root, ready, polling: bool = False, poll_interval: float = 1.0, stable_time: float = 5.0):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.ready = ready
        self.polling = polling
        self.poll_interval = float(poll_interval)
        self.stable_time = float(stable_time)
        self._candidates: dict = {}
        self._cond = threading.Condition()
        self._stopped = False
        self.observer = PollingObserver(timeout=self.poll_interval) if polling else Observer()
        self._checker = threading.Thread(target=self._check_loop, name="watched-check", daemon=True)

    def start(self):
        self.observer.schedule(self, str(self.root), recursive=True)
        self.observer.start()
        self._checker.start()
        self._scan()

    def stop(self):
        with self._cond:
            self._stopped = True
            self._cond.notify_all()
        self.observer.stop()
        self.observer.join(10)
        if self._checker.is_alive():
            self._checker.join(10)

    # --- discovery -----------------------------------------------------------------------------------------------

    def _scan(self):
        """Files already in the folder at start: added once their size is stable (one may still be written)."""
        for directory, folders, files in os.walk(self.root):
            folders[:] = [f for f in folders if not f.startswith(".")]
            for name in files:
                self._track(os.path.join(directory, name))

    def _track(self, path: str):
        if ignored(path):
            return
        with self._cond:
            if path not in self._candidates:
                self._candidates[path] = _Candidate()
                self._cond.notify_all()

    def _hand_over(self, path: str):
        with self._cond:
            self._candidates.pop(path, None)
        if not ignored(path) and os.path.isfile(path):
            self.ready(path)

    # watchdog callbacks (observer thread)
    def on_created(self, event):
        if not event.is_directory:
            self._track(event.src_path)

    def on_modified(self, event):
        if not event.is_directory:
            self._track(event.src_path)
            with self._cond:
                candidate = self._candidates.get(event.src_path)
                if candidate is not None:
                    candidate.since = time.monotonic()

    def on_closed(self, event):
        if not event.is_directory:
            self._hand_over(event.src_path)

    def on_moved(self, event):
        with self._cond:
            self._candidates.pop(event.src_path, None)
        if event.is_directory:
            # a folder renamed into place: its files are complete
            for directory, _, files in os.walk(event.dest_path):
                for name in files:
                    self._hand_over(os.path.join(directory, name)) if not self.polling else \
                        self._track(os.path.join(directory, name))
        elif self.polling:
            self._track(event.dest_path)
        else:
            self._hand_over(event.dest_path)

    def on_deleted(self, event):
        with self._cond:
            self._candidates.pop(event.src_path, None)

    # --- stability (checker thread) ------------------------------------------------------------------------------

    def _check_loop(self):
        interval = max(0.05, min(self.poll_interval, self.stable_time / 4))
        while True:
            with self._cond:
                if self._stopped:
                    return
                if not self._candidates:
                    self._cond.wait()
                    continue
                self._cond.wait(interval)
                if self._stopped:
                    return
                checks = list(self._candidates.items())
            now = time.monotonic()
            for path, candidate in checks:
                try:
                    stat = os.stat(path)
                except OSError:
                    with self._cond:
                        self._candidates.pop(path, None)
                    continue
                if (stat.st_size, stat.st_mtime_ns) != (candidate.size, candidate.mtime):
                    candidate.size, candidate.mtime, candidate.since = stat.st_size, stat.st_mtime_ns, now
                elif now - candidate.since >= self.stable_time:
                    self._hand_over(path)
