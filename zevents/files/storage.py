"""Local file storage: the uploads folder tree, its per-folder metadata, and every operation on them.

Layout (OctoPrint's): ``<data_dir>/uploads`` holds real folders and files; each folder has a hidden
``.metadata.json`` mapping an entry's name to its metadata (``hash``, ``size``, ``mtime``, ``display``, ``user``,
``userdata``, ``analysis``, ``history``, ``statistics``).  Hidden entries (a leading ``.``) are never listed.

Consistency under ``kill -9``: a file is written to a hidden temp file in its destination folder and renamed into
place; metadata files are written the same way (temp + rename, no fsync: the rename is atomic for a crash of the
process, and the next start repairs the rest).  So at any instant every visible file is complete and every
``.metadata.json`` is a whole JSON document; what a crash can leave is a stale temp file (removed at start) or
a file whose metadata entry was not written yet / an entry whose file is gone: :meth:`LocalStorage.reconcile`
(run at start) drops entries without a file, gives files without an entry a fresh entry (its analysis then
comes from the backlog) and rehashes files whose size or mtime changed behind our back.

Every operation validates all its input before touching anything (:class:`StorageError` with a clear message,
nothing changed) and returns the events it caused, in OctoPrint's order, for the service to publish.

Decisions on OctoPrint's quirks (reference-behaviour.md 2.1/2.2):
- Names are NOT sanitized: OctoPrint silently rewrites names (pathvalidate, ``name_(2).gcode``); we keep every
  name as given (Unicode included) and refuse what is not a portable file name (``..``, absolute paths, NUL and
  control characters, ``/`` in a name, a leading ``.``, a name longer than the file system allows) with an error.
- Parent folders of an added file are created silently (no FolderAdded), as OctoPrint's storage does.
- A copy or move onto an existing *folder* goes into it under the same name; onto an existing file it is
  refused (OctoPrint's 409), for files and folders alike.  ``add`` overwrites unless ``overwrite`` is false.
- Removing a folder fires only FolderRemoved (no FileRemoved per file inside), as OctoPrint does.
- A copy gets the source's metadata (analysis included) but not its print history: the copy was never printed.
- When a file's content hash changes on add, all its old metadata is discarded (``{"hash": new}``) except the
  print history, which OctoPrint drops too: we keep OctoPrint's behaviour (the history belonged to other bytes).
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
import uuid
from pathlib import Path

METADATA = ".metadata.json"
TEMP_PREFIX = ".zevents-tmp-"
STORAGE = "local"

#: extension -> type path (OctoPrint's default tree plus the model types its slicer plugins add)
EXTENSIONS = {
    "gcode": ["machinecode", "gcode"], "gco": ["machinecode", "gcode"], "g": ["machinecode", "gcode"],
    "stl": ["model", "stl"], "3mf": ["model", "3mf"], "obj": ["model", "obj"],
}
READ_CHUNK = 1 << 20


class StorageError(ValueError):
    """An operation refused: bad input, a conflict, or a missing entry.  Nothing was changed.  ``code`` tells a
    gateway which HTTP status OctoPrint answers with (invalid 400, not_found 404, exists/busy 409,
    unsupported_type 415)."""
    code = "invalid"


class NotFound(StorageError):
    code = "not_found"


class Conflict(StorageError):
    code = "exists"


class Busy(StorageError):
    """The file (or a file in the folder) is being printed."""
    code = "busy"


class UnsupportedType(StorageError):
    code = "unsupported_type"


def file_type(name: str) -> list | None:
    """``["machinecode", "gcode"]`` / ``["model", "stl"]`` for a known extension, else None."""
    _, dot, ext = name.rpartition(".")
    return list(EXTENSIONS[ext.lower()]) if dot and ext.lower() in EXTENSIONS else None


def is_gcode(name: str) -> bool:
    return (file_type(name) or [None])[0] == "machinecode"


def name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def check_name(name: str, limit: int = 255) -> str:
    """One path component, refused unless it is a plain, visible, portable name."""
    if not isinstance(name, str) or not name:
        raise StorageError("empty name")
    if name in (".", ".."):
        raise StorageError(f"{name!r} is not allowed in a path")
    bad = [c for c in name if ord(c) < 32 or ord(c) == 127]
    if bad:
        raise StorageError(f"the name {name!r} contains a control character ({ord(bad[0]):#04x})")
    if name.startswith("."):
        raise StorageError(f"hidden names (starting with '.') are not stored: {name!r}")
    if name != name.strip():
        raise StorageError(f"the name {name!r} starts or ends with white space")
    try:
        encoded = name.encode("utf-8")
    except UnicodeEncodeError:
        raise StorageError(f"the name {name!r} is not valid Unicode") from None
    if len(encoded) > limit:
        raise StorageError(f"the name {name[:40]!r}... is {len(encoded)} bytes long; the file system allows {limit}")
    return name


def normalize(path, limit: int = 255, allow_root: bool = False) -> str:
    """A storage path ("a/b/c.gcode") from user input, refused if absolute, escaping, or with a bad name."""
    if not isinstance(path, str):
        raise StorageError("a path must be a string")
    if "\0" in path:
        raise StorageError("the path contains a NUL character")
    if path.startswith("/"):
        raise StorageError(f"absolute paths are not allowed: {path!r} (paths are relative to the storage)")
    parts = [part for part in path.split("/") if part != ""]
    if not parts:
        if allow_root:
            return ""
        raise StorageError("empty path")
    for part in parts:
        check_name(part, limit)
    return "/".join(parts)


def _atomic_write(path: Path, data: bytes):
    temp = path.with_name(f"{TEMP_PREFIX}{uuid.uuid4().hex}")
    with open(temp, "wb") as handle:
        handle.write(data)
    os.replace(temp, path)


def sha1_of(path: Path) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as handle:
        while True:
            chunk = handle.read(READ_CHUNK)
            if not chunk:
                return digest.hexdigest()
            digest.update(chunk)


def statistics_of(history: list) -> dict:
    """OctoPrint's ``_calculate_stats_from_history``: per printer profile, from the successful prints."""
    times: dict = {}
    last: dict = {}
    for entry in history:
        if entry.get("success") and entry.get("printTime") is not None:
            profile = entry.get("printerProfile", "_default")
            times.setdefault(profile, []).append(entry["printTime"])
            last[profile] = entry["printTime"]
    return {"averagePrintTime": {p: sum(t) / len(t) for p, t in times.items()}, "lastPrintTime": last}


class LocalStorage:
    """The uploads tree and its metadata.  Not thread-safe: one thread (the service loop) owns it."""

    def __init__(self, root):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.name_max = name_max(self.root)
        self._metadata: dict = {}     # folder path -> {name: entry}
        self._dirty: set = set()

    # --- paths ---------------------------------------------------------------------------------------------------

    def path(self, path: str, allow_root: bool = False) -> str:
        return normalize(path, self.name_max, allow_root)

    def disk(self, path: str) -> Path:
        return self.root / path if path else self.root

    def storage_path_of(self, disk_path) -> str | None:
        """The storage path of an absolute path inside the uploads tree (a print job's path), else None."""
        try:
            relative = Path(os.path.realpath(disk_path)).relative_to(os.path.realpath(self.root))
        except ValueError:
            return None
        return relative.as_posix() if str(relative) != "." else None

    def is_file(self, path: str) -> bool:
        return self.disk(path).is_file()

    def is_folder(self, path: str) -> bool:
        return self.disk(path).is_dir()

    def exists(self, path: str) -> bool:
        return os.path.lexists(self.disk(path))

    # --- metadata ------------------------------------------------------------------------------------------------

    def _folder_metadata(self, folder: str) -> dict:
        meta = self._metadata.get(folder)
        if meta is None:
            try:
                meta = json.loads((self.disk(folder) / METADATA).read_text(encoding="utf-8"))
                if not isinstance(meta, dict):
                    meta = {}
            except (OSError, ValueError):
                meta = {}
            self._metadata[folder] = meta
        return meta

    def entry(self, path: str) -> dict | None:
        folder, _, name = path.rpartition("/")
        return self._folder_metadata(folder).get(name)

    def set_entry(self, path: str, entry: dict | None):
        folder, _, name = path.rpartition("/")
        meta = self._folder_metadata(folder)
        if entry is None:
            if meta.pop(name, None) is None:
                return
        else:
            meta[name] = entry
        self._dirty.add(folder)

    def update_entry(self, path: str, **values) -> dict:
        entry = dict(self.entry(path) or {})
        entry.update(values)
        self.set_entry(path, entry)
        return entry

    def flush(self):
        """Write every changed ``.metadata.json`` (temp + rename)."""
        for folder in sorted(self._dirty):
            directory = self.disk(folder)
            if not directory.is_dir():
                self._metadata.pop(folder, None)
                continue
            meta = self._metadata.get(folder, {})
            _atomic_write(directory / METADATA, json.dumps(meta, ensure_ascii=False, sort_keys=True).encode())
        self._dirty.clear()

    def _forget_metadata_under(self, folder: str):
        prefix = folder + "/"
        for key in [k for k in self._metadata if k == folder or k.startswith(prefix)]:
            self._metadata.pop(key, None)
            self._dirty.discard(key)

    def reconcile(self, engine: str | None = None) -> list:
        """Repair what a crash can leave (see the module docstring); returns the G-code paths lacking an
        analysis, or whose analysis another engine made (the backlog)."""
        backlog = []
        for directory, folders, files in os.walk(self.root):
            here = Path(directory)
            for name in folders:
                if name.startswith(TEMP_PREFIX):   # a folder copy a crash interrupted
                    shutil.rmtree(here / name, ignore_errors=True)
            folders[:] = sorted(f for f in folders if not f.startswith("."))
            folder = here.relative_to(self.root).as_posix()
            folder = "" if folder == "." else folder
            for name in files:
                if name.startswith(TEMP_PREFIX):
                    (here / name).unlink(missing_ok=True)
            meta = self._folder_metadata(folder)
            present = {name for name in files if not name.startswith(".") and file_type(name)}
            for name in [n for n in meta if n not in present]:
                del meta[name]
                self._dirty.add(folder)
            for name in sorted(present):
                path = f"{folder}/{name}" if folder else name
                stat = (here / name).stat()
                entry = meta.get(name)
                if not isinstance(entry, dict) or entry.get("size") != stat.st_size or \
                        entry.get("mtime") != stat.st_mtime:
                    digest = sha1_of(here / name)
                    old = entry if isinstance(entry, dict) and entry.get("hash") == digest else {}
                    meta[name] = dict(old, hash=digest, size=stat.st_size, mtime=stat.st_mtime)
                    self._dirty.add(folder)
                if is_gcode(name) and ("analysis" not in meta[name] or
                                       (engine and meta[name].get("analysisBy", engine) != engine)):
                    backlog.append(path)
        self.flush()
        return backlog

    # --- listing -------------------------------------------------------------------------------------------------

    def describe(self, path: str, with_metadata: bool = True) -> dict:
        disk = self.disk(path)
        name = path.rpartition("/")[2]
        if disk.is_dir():
            return {"name": name, "path": path, "type": "folder", "typePath": ["folder"], "origin": STORAGE,
                    "date": int(disk.stat().st_mtime)}
        stat = disk.stat()
        info = {"name": name, "path": path, "type": file_type(name)[0], "typePath": file_type(name),
                "origin": STORAGE, "size": stat.st_size, "date": int(stat.st_mtime)}
        if with_metadata:
            entry = self.entry(path) or {}
            for key in ("hash", "display", "user", "userdata", "analysis", "history", "statistics"):
                if key in entry:
                    info[key] = entry[key]
            info["prints"] = prints_summary(entry.get("history") or [])
        return info

    def list(self, path: str = "", recursive: bool = False) -> list:
        path = self.path(path, allow_root=True)
        disk = self.disk(path)
        if not disk.is_dir():
            if disk.is_file() and file_type(disk.name):
                return [self.describe(path)]
            raise NotFound(f"no such folder: {path or '/'}")
        entries = []
        for child in sorted(os.listdir(disk)):
            if child.startswith("."):
                continue
            child_path = f"{path}/{child}" if path else child
            child_disk = disk / child
            if child_disk.is_dir():
                folder = self.describe(child_path)
                if recursive:
                    folder["children"] = self.list(child_path, recursive=True)
                entries.append(folder)
            elif child_disk.is_file() and file_type(child):
                entries.append(self.describe(child_path))
        return entries

    def files_under(self, path: str) -> list:
        """Every stored file path under a folder (for refusing to touch a folder holding the printed file)."""
        out = []
        for directory, folders, files in os.walk(self.disk(path)):
            folders[:] = [f for f in folders if not f.startswith(".")]
            rel = Path(directory).relative_to(self.root).as_posix()
            out.extend(f"{rel}/{name}" if rel != "." else name for name in files
                       if not name.startswith(".") and file_type(name))
        return out

    # --- operations ----------------------------------------------------------------------------------------------

    def _require_file(self, path: str) -> None:
        if not self.is_file(path) or not file_type(path):
            raise NotFound(f"no such file: {path}")

    def _require_folder(self, path: str) -> None:
        if not path or not self.is_folder(path):
            raise NotFound(f"no such folder: {path or '/'}")

    def _require_type(self, path: str) -> list:
        kind = file_type(path)
        if kind is None:
            raise UnsupportedType(f"{path.rpartition('/')[2]!r} is neither G-code (.gcode, .gco, .g) nor a model "
                               f"(.stl, .3mf, .obj)")
        return kind

    def _require_parent_not_file(self, path: str):
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            prefix = "/".join(parts[:i])
            if self.is_file(prefix) or (self.exists(prefix) and not self.is_folder(prefix)):
                raise Conflict(f"{prefix} is a file, not a folder")

    def _ensure_parents(self, path: str):
        folder = path.rpartition("/")[0]
        if folder:
            self.disk(folder).mkdir(parents=True, exist_ok=True)

    def destination(self, source: str, destination: str) -> str:
        """OctoPrint's copy/move destination: an existing folder means "into it under the same name"."""
        destination = self.path(destination, allow_root=True)
        if destination == "" or self.is_folder(destination):
            name = source.rpartition("/")[2]
            return f"{destination}/{name}" if destination else name
        return destination

    def add_file(self, source, path: str, overwrite: bool = True, move_source: bool = False,
                 printing: str | None = None, **metadata) -> tuple:
        """Store a file from a path on disk at ``path``.  Returns (path, events, changed_hash)."""
        path = self.path(path)
        kind = self._require_type(path)
        source = Path(source)
        if not source.is_file():
            raise NotFound(f"no such file to upload: {source}")
        if self.exists(path):
            if self.is_folder(path):
                raise Conflict(f"{path} is a folder")
            if not overwrite:
                raise Conflict(f"{path} already exists")
            if path == printing:
                raise Busy(f"{path} is being printed; it cannot be replaced now")
        self._require_parent_not_file(path)
        self._ensure_parents(path)
        disk = self.disk(path)
        temp = disk.with_name(f"{TEMP_PREFIX}{uuid.uuid4().hex}")
        try:
            # A move is a hard link then an unlink of the source once the file is in place, not a rename: a
            # rename out of the watched folder is an unpaired IN_MOVED_FROM, which watchdog holds for 0.5 s
            # waiting for its pair, delaying every later event of the folder.  A crash before the unlink leaves
            # the source to be added again at start: never a lost file.
            linked = False
            if move_source:
                try:
                    os.link(source, temp)
                    linked = True
                except OSError as exc:
                    if exc.errno not in (errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP):
                        raise
            if not linked:
                shutil.copyfile(source, temp)
            digest = sha1_of(temp)
            os.replace(temp, disk)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        if move_source:
            source.unlink(missing_ok=True)
        stat = disk.stat()
        old = self.entry(path) or {}
        changed = old.get("hash") != digest
        entry = {"hash": digest} if changed else dict(old, hash=digest)
        entry.update(size=stat.st_size, mtime=stat.st_mtime)
        entry.update({k: v for k, v in metadata.items() if v is not None})
        self.set_entry(path, entry)
        return path, [("FileAdded", self._file_payload(path, kind, "add"))], changed

    def _file_payload(self, path: str, kind: list, operation: str) -> dict:
        return {"storage": STORAGE, "path": path, "name": path.rpartition("/")[2], "type": kind,
                "operation": operation}

    def _folder_payload(self, path: str) -> dict:
        return {"storage": STORAGE, "path": path, "name": path.rpartition("/")[2]}

    def remove_file(self, path: str, printing: str | None = None) -> list:
        path = self.path(path)
        self._require_file(path)
        if path == printing:
            raise Busy(f"{path} is being printed; cancel the print first")
        self.disk(path).unlink()
        self.set_entry(path, None)
        return [("FileRemoved", self._file_payload(path, file_type(path), "remove"))]

    def _check_copy(self, source: str, destination: str, folder: bool) -> tuple:
        source = self.path(source)
        (self._require_folder if folder else self._require_file)(source)
        destination = self.destination(source, destination)
        if not folder:
            self._require_type(destination)
            if file_type(destination) != file_type(source):
                raise UnsupportedType(f"{destination} would change the file's type "
                                      f"({'.'.join(file_type(source))})")
        if self.exists(destination):
            raise Conflict(f"{destination} already exists")
        if destination == source or destination.startswith(source + "/"):
            raise StorageError(f"cannot put {source} inside itself")
        self._require_parent_not_file(destination)
        return source, destination

    def copy_file(self, source: str, destination: str) -> tuple:
        source, destination = self._check_copy(source, destination, folder=False)
        self._ensure_parents(destination)
        disk = self.disk(destination)
        temp = disk.with_name(f"{TEMP_PREFIX}{uuid.uuid4().hex}")
        try:
            shutil.copy2(self.disk(source), temp)
            os.replace(temp, disk)
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
        entry = dict(self.entry(source) or {})
        entry.pop("history", None)
        entry.pop("statistics", None)
        stat = disk.stat()
        entry.update(size=stat.st_size, mtime=stat.st_mtime)
        self.set_entry(destination, entry)
        return destination, [("FileAdded", self._file_payload(destination, file_type(destination), "copy"))]

    def move_file(self, source: str, destination: str, printing: str | None = None) -> tuple:
        source, destination = self._check_copy(source, destination, folder=False)
        if source == printing:
            raise Busy(f"{source} is being printed; it cannot be moved now")
        self._ensure_parents(destination)
        entry = self.entry(source)
        os.rename(self.disk(source), self.disk(destination))
        self.set_entry(destination, entry)
        self.set_entry(source, None)
        kind = file_type(source)
        src_name, dst_name = source.rpartition("/")[2], destination.rpartition("/")[2]
        return destination, [
            ("FileRemoved", self._file_payload(source, kind, "move")),
            ("FileAdded", self._file_payload(destination, kind, "move")),
            ("FileMoved", {"storage": STORAGE, "source_path": source, "source_name": src_name, "source_type": kind,
                           "destination_path": destination, "destination_name": dst_name,
                           "destination_type": file_type(destination)}),
        ]

    def add_folder(self, path: str) -> list:
        path = self.path(path)
        if self.exists(path):
            raise Conflict(f"{path} already exists")
        self._require_parent_not_file(path)
        self.disk(path).mkdir(parents=True)
        return [("FolderAdded", self._folder_payload(path))]

    def remove_folder(self, path: str, recursive: bool = False, printing: str | None = None) -> list:
        path = self.path(path)
        self._require_folder(path)
        inside = self.files_under(path)
        if printing and printing in inside:
            raise Busy(f"{path} holds {printing}, which is being printed")
        visible = [n for n in os.listdir(self.disk(path)) if not n.startswith(".")]
        if visible and not recursive:
            raise Conflict(f"{path} is not empty (use --recursive to remove it with everything inside)")
        shutil.rmtree(self.disk(path))
        self._forget_metadata_under(path)
        return [("FolderRemoved", self._folder_payload(path))]

    def copy_folder(self, source: str, destination: str) -> tuple:
        source, destination = self._check_copy(source, destination, folder=True)
        self.flush()
        self._ensure_parents(destination)
        temp = self.disk(destination).with_name(f"{TEMP_PREFIX}{uuid.uuid4().hex}")
        try:
            shutil.copytree(self.disk(source), temp)
            os.rename(temp, self.disk(destination))
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            raise
        return destination, [("FolderAdded", self._folder_payload(destination))]

    def move_folder(self, source: str, destination: str, printing: str | None = None) -> tuple:
        source, destination = self._check_copy(source, destination, folder=True)
        if printing and printing in self.files_under(source):
            raise Busy(f"{source} holds {printing}, which is being printed")
        self.flush()
        self._ensure_parents(destination)
        os.rename(self.disk(source), self.disk(destination))
        self._forget_metadata_under(source)
        src_name, dst_name = source.rpartition("/")[2], destination.rpartition("/")[2]
        return destination, [
            ("FolderRemoved", self._folder_payload(source)),
            ("FolderAdded", self._folder_payload(destination)),
            ("FolderMoved", {"storage": STORAGE, "source_path": source, "source_name": src_name,
                             "destination_path": destination, "destination_name": dst_name}),
        ]

    # --- history -------------------------------------------------------------------------------------------------

    def add_history(self, path: str, success: bool, print_time: float | None, profile: str = "_default") -> dict:
        entry = dict(self.entry(path) or {})
        record = {"timestamp": time.time(), "success": bool(success), "printerProfile": profile}
        if success and print_time is not None:
            record["printTime"] = float(print_time)
        history = list(entry.get("history") or []) + [record]
        entry["history"] = history
        entry["statistics"] = statistics_of(history)
        self.set_entry(path, entry)
        return entry


def prints_summary(history: list) -> dict:
    """OctoPrint's REST ``prints`` view of a history: counts and the last print."""
    summary = {"success": sum(1 for h in history if h.get("success")),
               "failure": sum(1 for h in history if not h.get("success"))}
    if history:
        last = history[-1]
        summary["last"] = {"success": last.get("success"), "date": last.get("timestamp")}
        if "printTime" in last:
            summary["last"]["printTime"] = last["printTime"]
    return summary
