"""Process locks: one holder of a node's (or a service's) endpoints at a time, and a refusal that says who holds it.

An flock on a small file holding the holder's pid.  The kernel releases it when the holder dies, however it dies
(kill -9 included), so a restart never finds a stale lock; the file descriptor is not inherited by the holder's
children (Python opens it close-on-exec), so a hook process left running does not keep a service locked.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path


class LockHeld(RuntimeError):
    """Someone else holds the lock; the message names them."""


def describe(pid: str) -> str:
    """``pid 123: python -m zevents.service hooks ...`` (the command line when it can be read)."""
    try:
        argv = Path(f"/proc/{int(pid)}/cmdline").read_bytes().rstrip(b"\0").split(b"\0")
        command = " ".join(a.decode(errors="replace") for a in argv)
    except (OSError, ValueError):
        command = ""
    return f"pid {pid or '?'}" + (f": {command[:200]}" if command else "")


class PidLock:
    def __init__(self, path):
        self.path = Path(path)
        self._fd = None

    def acquire(self, what: str) -> "PidLock":
        """Take the lock, or raise LockHeld("<what> is already running (pid N: its command)")."""
        self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip()
            os.close(fd)
            raise LockHeld(f"{what} is already running ({describe(holder)})") from None
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        self._fd = fd
        return self

    @property
    def held(self) -> bool:
        return self._fd is not None

    def release(self):
        """Release the lock (only its holder has anything to release: a refused process touches nothing).  The file
        stays: removing it would let one process lock the removed file while another locks a new one."""
        if self._fd is None:
            return
        os.close(self._fd)
        self._fd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
