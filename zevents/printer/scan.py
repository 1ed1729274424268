"""What a print job must know about a local file before its first line is sent, from one pass over its bytes:
the first command too long for the printer (``printer.max_line``) and the slicer's layer markers (how many, and
of which form).

The pass runs at C speed (regular expressions over 1 MB chunks; only candidate lines are looked at in Python), so
a job can afford it at start even for a file of hundreds of megabytes.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from zevents.printer.link import is_message, strip_line

CHUNK = 1 << 20


@dataclass
class FileScan:
    size: int = 0
    #: (line number from 1, command length, command start) of the first over-long line that is not a message
    too_long: tuple | None = None


def scan_file(path: str, max_line: int) -> FileScan:
    """One pass over ``path`` (see the module docstring)."""
    result = FileScan()
    # A line with more than max_line bytes may be too long (its comment and blanks do not count: look closer).
    candidate = re.compile(rb"[^\n]{%d,}" % (max_line + 1)) if max_line else None
    carry = b""
    line_base = 0  # lines before the chunk being looked at
    with open(path, "rb") as handle:
        while True:
            data = handle.read(CHUNK)
            result.size += len(data)
            chunk = carry + data
            if data:
                cut = chunk.rfind(b"\n") + 1
                if cut == 0 and len(chunk) < (64 << 20):
                    carry = chunk  # one long line so far: read on (up to 64 MB, then look at what is there)
                    continue
                if cut == 0:
                    cut = len(chunk)
                chunk, carry = chunk[:cut], chunk[cut:]
            else:
                carry = b""
            if not chunk:
                break
            if candidate is not None and result.too_long is None:
                for match in candidate.finditer(chunk):
                    line = strip_line(match.group().decode("utf-8", "replace"))
                    if len(line) > max_line and not is_message(line):
                        result.too_long = (line_base + chunk.count(b"\n", 0, match.start()) + 1, len(line),
                                           line[:24])
                        break
            line_base += chunk.count(b"\n")
            if not data:
                break
    return result
