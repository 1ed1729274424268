"""Small file rules every store of zevents follows: atomic replacement, and OctoPrint's rule for stored names."""
from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

_NAME_FORBIDDEN = re.compile(r"[^-_.() A-Za-z0-9]")


def atomic_write(path: str | os.PathLike, data: bytes | str) -> None:
    """Replaces ``path`` with ``data`` all at once: a temporary file in the same folder, flushed to disk, then
    renamed over it, so a ``kill -9`` or a power cut leaves the old content or the new, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data.encode() if isinstance(data, str) else data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        try:
            os.unlink(temp)
        except FileNotFoundError:
            pass
        raise


def safe_name(name: str) -> str | None:
    """OctoPrint's rule for profile names and ids: keep ``[-_.() A-Za-z0-9]``, spaces become ``_``; None when
    nothing usable is left."""
    cleaned = _NAME_FORBIDDEN.sub("", str(name).replace(" ", "_")).strip(".")
    return cleaned or None
