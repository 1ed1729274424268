"""The broker's on-disk journal: what backs the replay ring, so that a broker killed (``kill -9``) and started again
continues the same epoch and the same sequence numbers, and can still replay what it had.

Layout: ``<dir>/journal.<n>`` segments, append-only.  Each starts with a STATE record (epoch, every group's last
seq, every numbering publisher's last number, the machine's boot id), followed by one EVENT record per sequenced
event.  When a segment holds ``capacity`` events (the ring's size) a new one is started and the one before the
previous is deleted, so two segments always hold at least the ring.  A clean stop appends a CLOSED record.

A record: ``u32 body length, u32 crc32 (seeded with the kind), u8 kind, body``; an EVENT body is ``u16 topic
length, u16 header length, 8-byte publisher id, u64 publisher number, topic, header, payload``.  The compiled
twin of :func:`event_record` is ``_speedups.event_record``.

Durability: every batch is written (``os.write``) before its events are published or acknowledged, so it is in
the page cache: a killed broker loses nothing.  A power cut loses what was not yet flushed to disk: at most
``flush`` seconds of events (``bus.journal_flush``; 0 flushes every batch, slower).  After a power cut (the boot
id changed and no CLOSED record ends the journal) the broker cannot know what subscribers had already seen, so it
starts a new epoch with an empty ring instead of reusing sequence numbers.
"""
from __future__ import annotations

import fcntl
import logging
import os
import struct
import threading
import zlib
from pathlib import Path

import msgpack

from zevents import wire

log = logging.getLogger("zevents.journal")

RECORD = struct.Struct(">IIB")
EVENT = struct.Struct(">HH8sQ")
KIND_EVENT, KIND_STATE, KIND_CLOSED = 0, 1, 2
_SEQ = struct.Struct(">Q")


def boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def record(kind: int, body: bytes) -> bytes:
    return RECORD.pack(len(body), zlib.crc32(body, kind), kind) + body


def event_record(topic: bytes, header: bytes, payload: bytes, publisher: bytes, number: int) -> bytes:
    """One EVENT record, byte for byte what ``_speedups.event_record`` makes."""
    return record(KIND_EVENT, EVENT.pack(len(topic), len(header), publisher, number) + topic + header + payload)


def read_records(data: bytes):
    """(kind, body) of each intact record, then stops at the first torn or corrupt one; yields the end offset of
    the good part last as (None, offset)."""
    at, size = 0, len(data)
    while at + RECORD.size <= size:
        length, crc, kind = RECORD.unpack_from(data, at)
        end = at + RECORD.size + length
        if end > size:
            break
        body = data[at + RECORD.size:end]
        if zlib.crc32(body, kind) != crc:
            break
        yield kind, body
        at = end
    yield None, at


class JournalError(RuntimeError):
    """The journal cannot be used (another broker holds it, or its directory cannot be written)."""


class Recovered:
    """What a journal held: the epoch, every group's last seq, the ring's entries (oldest first), the publishers'
    last numbers, and whether it ended cleanly."""

    def __init__(self):
        self.epoch = None
        self.seqs: dict[str, int] = {}
        self.entries: list = []
        self.publishers: dict[bytes, int] = {}
        self.boot_id = ""
        self.clean = False
        self.events = 0


class Journal:
    def __init__(self, directory, capacity: int, flush: float = 1.0):
        self.directory = Path(directory)
        self.capacity = max(1, capacity)
        self.flush = flush
        self.fd = None
        self.segment = 0
        self.count = 0          # events in the current segment
        self.written = 0        # bytes written since the start
        self._lock_fd = None
        # The flush interval runs on a thread of its own: fdatasync of a second's worth of events can take tens
        # of milliseconds on a busy disk, which the sequencer must not wait for.
        self._fd_lock = threading.Lock()
        self._stop = threading.Event()
        self._flusher = None

    def _path(self, n: int) -> Path:
        return self.directory / f"journal.{n:08d}"

    def _segments(self) -> list[int]:
        found = []
        for path in self.directory.glob("journal.*"):
            suffix = path.name.partition(".")[2]
            if suffix.isdigit():
                found.append(int(suffix))
        return sorted(found)

    def recover(self) -> Recovered:
        """Read every segment; truncate a torn tail of the newest.  Leaves the newest segment open for appending
        (or none when the journal is empty: call :meth:`start`)."""
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            self._lock_fd = os.open(self.directory / "lock", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            raise JournalError(f"cannot use the journal directory {self.directory}: {exc.strerror}") from None
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise JournalError(f"another broker uses the journal in {self.directory}") from None
        found = Recovered()
        segments = self._segments()
        last_kind = None
        for n in segments:
            path = self._path(n)
            data = path.read_bytes()
            good = 0
            for kind, body in read_records(data):
                if kind is None:
                    good = body
                    break
                last_kind = kind
                if kind == KIND_EVENT:
                    self._recover_event(found, body)
                elif kind == KIND_STATE:
                    self._recover_state(found, body)
            if good < len(data):
                log.warning("journal %s: %d bytes after offset %d are torn or corrupt; dropped", path,
                            len(data) - good, good)
                if n == segments[-1]:
                    with open(path, "r+b") as handle:
                        handle.truncate(good)
        found.clean = last_kind == KIND_CLOSED
        if segments and found.epoch is not None:
            self.segment = segments[-1]
            self.count = self._count_events(self._path(self.segment))
            self.fd = os.open(self._path(self.segment), os.O_WRONLY | os.O_APPEND)
        return found

    @staticmethod
    def _count_events(path: Path) -> int:
        return sum(1 for kind, _ in read_records(path.read_bytes()) if kind == KIND_EVENT)

    @staticmethod
    def _recover_state(found: Recovered, body: bytes):
        state = msgpack.unpackb(body, raw=False, strict_map_key=False)
        if found.epoch is None or state["epoch"] != found.epoch:
            found.epoch = state["epoch"]
            found.entries = []
        for group, seq in state["seqs"].items():
            found.seqs[group] = max(seq, found.seqs.get(group, 0))
        for publisher, number in state["publishers"].items():
            found.publishers[publisher] = max(number, found.publishers.get(publisher, 0))
        found.boot_id = state.get("boot_id", "")

    @staticmethod
    def _recover_event(found: Recovered, body: bytes):
        topic_len, header_len, publisher, number = EVENT.unpack_from(body)
        start = EVENT.size
        topic = body[start:start + topic_len]
        header = body[start + topic_len:start + topic_len + header_len]
        payload = body[start + topic_len + header_len:]
        group = topic.partition(b"/")[0].decode()
        seq = _SEQ.unpack_from(header, len(header) - 20)[0]
        found.seqs[group] = max(seq, found.seqs.get(group, 0))
        found.entries.append((group, seq, topic, header, payload))
        found.events += 1
        if publisher != wire.NO_PUBLISHER:
            found.publishers[publisher] = max(number, found.publishers.get(publisher, 0))

    def mark(self, epoch: int, seqs: dict, publishers: dict):
        """A STATE record in the current segment: at every start, so the journal knows this run's boot id."""
        self._write(self._state(epoch, seqs, publishers))

    @staticmethod
    def _state(epoch: int, seqs: dict, publishers: dict) -> bytes:
        state = {"epoch": epoch, "seqs": dict(seqs), "publishers": dict(publishers), "boot_id": boot_id()}
        return record(KIND_STATE, msgpack.packb(state, use_bin_type=True))

    def start(self, epoch: int, seqs: dict, publishers: dict):
        """A new segment, opened by a STATE record: after a rotation, or when the journal was empty."""
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        old = self._segments()
        with self._fd_lock:
            if self.fd is not None:
                os.close(self.fd)
            self.segment = (old[-1] + 1) if old else 1
            self.fd = os.open(self._path(self.segment), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        self.count = 0
        self._write(self._state(epoch, seqs, publishers))
        # Keep this segment and the one before it: together they hold at least the ring.
        for n in old[:-1]:
            try:
                self._path(n).unlink()
            except OSError:
                pass
        self._sync_dir()

    def discard(self):
        """Forget every segment (a new epoch after a power cut)."""
        with self._fd_lock:
            if self.fd is not None:
                os.close(self.fd)
                self.fd = None
        for n in self._segments():
            self._path(n).unlink()

    def _sync_dir(self):
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    def _write(self, data: bytes):
        view = memoryview(data)
        while view:
            done = os.write(self.fd, view)
            view = view[done:]
        self.written += len(data)

    def append(self, records: list, events: int):
        """Write a batch of records (``events`` of them are events) in one system call."""
        self._write(b"".join(records) if len(records) != 1 else records[0])
        self.count += events
        if self.flush <= 0:
            os.fdatasync(self.fd)

    def full(self) -> bool:
        return self.count >= self.capacity

    def start_flushing(self):
        """Flush to disk every ``flush`` seconds (a thread): what bounds the loss of a power cut."""
        if self.flush > 0 and self._flusher is None:
            self._flusher = threading.Thread(target=self._flush_loop, name="zevents-journal-flush", daemon=True)
            self._flusher.start()

    def _flush_loop(self):
        while not self._stop.wait(self.flush):
            with self._fd_lock:
                try:
                    fd = os.dup(self.fd) if self.fd is not None else None
                except OSError:
                    fd = None
            if fd is not None:
                try:
                    os.fdatasync(fd)
                except OSError as exc:
                    log.warning("journal %s: flush failed: %s", self.directory, exc)
                finally:
                    os.close(fd)

    def close(self):
        self._stop.set()
        if self._flusher is not None:
            self._flusher.join(10)
            self._flusher = None
        if self.fd is not None:
            self._write(record(KIND_CLOSED, b""))
            os.fsync(self.fd)
            os.close(self.fd)
            self.fd = None
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None
