"""Where timelapses live on disk, and their state: the only shared memory of capture, render and the CLI.

Layout under ``<data_dir>/timelapse/``::

    tmp/<printer>/<job>/000001.jpg ...   frames of one print, never shared by two printers or two jobs
    tmp/<printer>/<job>/job.json         the job's state (below), replaced atomically (temp file + rename)
    <printer>/<job>[-fail].mp4           finished movies, each with <movie>.thumb.jpg
    <printer>/.<job>[-fail].mp4.part     a movie being written; renamed when ffmpeg exits 0, deleted otherwise

A job's ``state``: ``capturing`` (its print runs), ``captured`` (frames final; ``render`` says whether it renders
on its own), ``rendering`` (a render began: found so at start-up it was interrupted, by kill -9 or a reboot, and
is retried), ``failed`` (ffmpeg said no: kept, listed as unrendered).  A rendered job's folder is deleted.

Who renders holds an flock on the job's ``.lock``: the kernel drops it when the holder dies, so no crash leaves a
"render already running" behind.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import time
from pathlib import Path

STATE_FILE = "job.json"
FRAME_FORMAT = "{:06d}.jpg"
FRAME_PATTERN = "%06d.jpg"
MOVIE_EXTENSIONS = (".mpg", ".mpeg", ".mp4", ".m4v", ".mkv")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


class StoreError(Exception):
    pass


def safe_name(text: str, fallback: str = "unknown") -> str:
    """A file-name-safe form of a printer or G-code name (no separators, no leading dot)."""
    name = _UNSAFE.sub("_", str(text or "")).strip("._")[:80]
    return name or fallback


def root(config) -> Path:
    return Path(config.data_dir) / "timelapse"


def tmp_root(config) -> Path:
    return root(config) / "tmp"


def write_json_atomic(path: Path, data: dict):
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(temporary, "w", encoding="utf-8") as handle:
        json.dump(data, handle, indent=1, sort_keys=True)
    os.replace(temporary, path)


class Job:
    """One print's frames and state."""

    def __init__(self, path: Path):
        self.path = Path(path)

    @property
    def id(self) -> str:
        return self.path.name

    @property
    def printer(self) -> str:
        return self.path.parent.name

    @property
    def state_file(self) -> Path:
        return self.path / STATE_FILE

    def read(self) -> dict:
        try:
            with open(self.state_file, encoding="utf-8") as handle:
                data = json.load(handle)
            if isinstance(data, dict):
                return data
        except (OSError, ValueError):
            pass
        # No state (or an unreadable one): frames whose print we know nothing of; kept as unrendered.
        return {"job": self.id, "printer": self.printer, "state": "captured", "render": False, "gcode": "unknown",
                "success": None}

    def update(self, **changes) -> dict:
        data = self.read()
        data.update(changes)
        write_json_atomic(self.state_file, data)
        return data

    def frame(self, number: int) -> Path:
        return self.path / FRAME_FORMAT.format(number)

    def frame_count(self) -> int:
        """Frames 1..n that exist in a row (the renderer's input pattern stops at the first gap)."""
        names = {entry.name for entry in os.scandir(self.path)} if self.path.is_dir() else set()
        count = 0
        while FRAME_FORMAT.format(count + 1) in names:
            count += 1
        return count

    def size(self) -> int:
        return sum(entry.stat().st_size for entry in os.scandir(self.path) if entry.is_file())

    def modified(self) -> float:
        return max([self.path.stat().st_mtime] + [e.stat().st_mtime for e in os.scandir(self.path) if e.is_file()])

    @contextlib.contextmanager
    def lock(self):
        """Exclusive while rendering; raises StoreError when someone else renders it now."""
        fd = os.open(self.path / ".lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StoreError(f"{self.id} is being rendered by another process right now") from None
            yield
        finally:
            os.close(fd)

    def remove(self):
        shutil.rmtree(self.path, ignore_errors=True)


def new_job(config, printer: str, gcode_name: str, now: float | None = None) -> Job:
    """A fresh job folder, named like OctoPrint's prefix: ``<gcode stem>_<YYYYmmddHHMMSS>`` (local time)."""
    now = time.time() if now is None else now
    stem = safe_name(Path(gcode_name or "unknown").stem)
    base = f"{stem}_{time.strftime('%Y%m%d%H%M%S', time.localtime(now))}"
    folder = tmp_root(config) / safe_name(printer, "printer")
    folder.mkdir(parents=True, exist_ok=True)
    for attempt in range(1, 1000):
        path = folder / (base if attempt == 1 else f"{base}_{attempt}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return Job(path)
    raise StoreError(f"no free job name for {base} in {folder}")


def jobs(config) -> list:
    """Every job folder of every printer, oldest first."""
    base = tmp_root(config)
    found = []
    if base.is_dir():
        for printer in sorted(base.iterdir()):
            if printer.is_dir():
                found.extend(Job(path) for path in printer.iterdir() if path.is_dir() and not path.name.startswith("."))
    return sorted(found, key=lambda job: (job.read().get("created") or 0, job.id))


def find_job(config, name: str) -> Job:
    """A job by ``<job>`` or ``<printer>/<job>``."""
    return _only([(job.printer, job.id, job) for job in jobs(config)], name, "unrendered timelapse")


def movie_folder(config, printer: str) -> Path:
    return root(config) / safe_name(printer, "printer")


def movies(config) -> list:
    """Finished movies of every printer: Paths, oldest first."""
    base = root(config)
    found = []
    if base.is_dir():
        for printer in base.iterdir():
            if printer.is_dir() and printer.name != "tmp":
                found.extend(path for path in printer.iterdir()
                             if path.suffix in MOVIE_EXTENSIONS and not path.name.startswith("."))
    return sorted(found, key=lambda path: (path.stat().st_mtime, path.name))


def find_movie(config, name: str) -> Path:
    return _only([(path.parent.name, path.name, path) for path in movies(config)], name, "movie")


def _only(candidates: list, name: str, what: str):
    """The one candidate (printer, name, thing) called ``name`` or ``printer/name``."""
    matches = [(printer, own) for printer, own_name, own in candidates if name in (own_name, f"{printer}/{own_name}")]
    if not matches:
        raise StoreError(f"no {what} named {name!r} (see `zevents timelapse ls`)")
    if len(matches) > 1:
        raise StoreError(f"{name!r} names a {what} of several printers; say which: "
                         + ", ".join(f"{printer}/{name}" for printer, _ in matches))
    return matches[0][1]


def clean_old(config, days: int, now: float | None = None) -> list:
    """Deletes unrendered jobs untouched for ``days`` (OctoPrint's cleanTmpAfterDays; 0 keeps everything), never
    one still capturing or rendering.  Returns the ids deleted."""
    if days <= 0:
        return []
    limit = (time.time() if now is None else now) - days * 86400
    removed = []
    for job in jobs(config):
        if job.read().get("state") in ("capturing", "rendering"):
            continue
        try:
            if job.modified() < limit:
                job.remove()
                removed.append(job.id)
        except OSError:
            continue
    return removed


def remove_stale_parts(config) -> list:
    """Half-written movies of renders that were killed: never shown as movies, deleted at start-up — except the
    one a render still running elsewhere (`zevents timelapse render`) is writing: its job is locked."""
    base = root(config)
    removed = []
    if not base.is_dir():
        return removed
    for printer in base.iterdir():
        if printer.is_dir() and printer.name != "tmp":
            for path in printer.glob(".*.part.*"):
                job_id = path.name[1:].split(".part.", 1)[0]
                job = Job(tmp_root(config) / printer.name / job_id.removesuffix("-fail"))
                try:
                    if job.path.is_dir():
                        with job.lock():
                            path.unlink()
                    else:
                        path.unlink()
                    removed.append(path.name)
                except (StoreError, OSError):
                    continue
    return removed
