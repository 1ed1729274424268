"""G-code file analysis: the events of a file as if it were streamed to a printer, and its summary.

``analyse(path)`` is what a files service calls: it streams the file through the parser in chunks (memory stays
flat however large the file) and returns a JSON-ready summary: line count, events per name, layer count, max Z,
print height, net filament, extrusion bounding box, a naive print-time estimate, the tools used.
``iter_events(path)`` yields the events themselves.  ``run_parse`` is the ``zevents parse`` command behind the
CLI adapter: text or JSON Lines output, a rich progress bar on stderr for files that take more than a second, and
one clear error line (non-zero exit) for a missing file, a directory or binary G-code.
"""
from __future__ import annotations

import json
import os
import sys
import time
from collections import Counter
from typing import Callable, Iterator

from zevents.parser import IMPLEMENTATION, Event, NotGcodeError, Parser, open_gcode
from zevents.parser import describe_file_error as describe_error

CHUNK_SIZE = 1 << 20
PROGRESS_AFTER = 1.0  # seconds: quicker files get no progress bar

#: progress(done_bytes, total_bytes) is called after every chunk
ProgressCallback = Callable[[int, int], None]


def _open(path: str):
    """The file, open for reading; OSError (FileNotFoundError…) or NotGcodeError (binary, directory, FIFO…)."""
    return open_gcode(path)


def iter_chunks(path: str, chunk_size: int = CHUNK_SIZE, progress: ProgressCallback | None = None) -> Iterator[bytes]:
    """The file's bytes in chunks; OSError for a missing file or a directory, NotGcodeError for a binary file."""
    with _open(path) as handle:
        total = os.fstat(handle.fileno()).st_size
        done = 0
        while True:
            chunk = handle.read(chunk_size)
            if not chunk:
                break
            done += len(chunk)
            yield chunk
            if progress is not None:
                progress(done, total)


def iter_events(path: str, config=None, chunk_size: int = CHUNK_SIZE,
                progress: ProgressCallback | None = None, parser=None) -> Iterator[Event]:
    """Every event of the file's lines taken as sent lines (``parser``: reuse one, to read its state after)."""
    parser = parser if parser is not None else Parser(config)
    for chunk in iter_chunks(path, chunk_size, progress):
        yield from parser.feed_sent(chunk)
    yield from parser.flush()


def analyse(path: str, config=None, chunk_size: int = CHUNK_SIZE, progress: ProgressCallback | None = None) -> dict:
    """The summary of one G-code file (JSON-ready; see the module documentation)."""
    parser = Parser(config)
    counts: Counter = Counter()
    max_z = None
    print_height = None
    tools = {parser.state.tool}
    for event in iter_events(path, config, chunk_size, progress, parser):
        counts[event.name] += 1
        if event.name == "ZChange":
            if max_z is None or event.payload["new"] > max_z:
                max_z = event.payload["new"]
        elif event.name == "LayerChanged":
            if print_height is None or event.payload["z"] > print_height:
                print_height = event.payload["z"]
        elif event.name == "ToolChange":
            tools.add(event.payload["new"])
    state = parser.state
    bbox = state.extrusion_bbox
    return {
        "path": path,
        "size": parser.sent_bytes,
        "lines": parser.sent_lines,
        "events": dict(sorted(counts.items())),
        "layers": state.layer,
        "max_z": max_z,
        "print_height": print_height,
        "filament_mm": round(state.filament, 5),
        "extrusion_bbox": None if bbox is None else {"min": list(bbox[:3]), "max": list(bbox[3:])},
        "estimated_time_s": round(state.print_time, 3),
        "tools": sorted(tools),
        "long_lines": parser.long_lines,
        "parser": IMPLEMENTATION,
    }


# --------------------------------------------------------------------------------------------- zevents parse


class _DelayedProgress:
    """A rich progress bar on stderr that appears only once a file has taken more than ``after`` seconds."""

    def __init__(self, label: str, after: float = PROGRESS_AFTER, console=None):
        self.label = label
        self.after = after
        self.console = console
        self.started = time.monotonic()
        self.bar = None
        self.task = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            if time.monotonic() - self.started < self.after:
                return
            from rich.console import Console
            from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

            console = self.console or Console(stderr=True)
            if not console.is_terminal:
                return  # a log file gets no redrawn bar
            self.bar = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                TimeRemainingColumn(), console=console, transient=True)
            self.bar.start()
            self.task = self.bar.add_task(self.label, total=total)
        self.bar.update(self.task, completed=done)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def _event_text(path: str, event: Event) -> str:
    return f"{path}:{event.line}: {event.name} {json.dumps(event.payload)}"


def _event_json(path: str, event: Event) -> str:
    return json.dumps({"file": path, "line": event.line, "offset": event.offset, "name": event.name,
                       "group": event.group, "payload": event.payload})


def _summary_text(summary: dict) -> str:
    def mm(value):
        return "-" if value is None else f"{value:g} mm"

    lines = [summary["path"],
             f"  lines           {summary['lines']}",
             f"  layers          {summary['layers']}",
             f"  max Z           {mm(summary['max_z'])}",
             f"  print height    {mm(summary['print_height'])}",
             f"  filament        {summary['filament_mm']:.1f} mm",
             f"  estimated time  {_duration(summary['estimated_time_s'])} (no acceleration)",
             f"  tools           {', '.join(f'T{tool}' for tool in summary['tools'])}"]
    bbox = summary["extrusion_bbox"]
    if bbox is not None:
        low, high = bbox["min"], bbox["max"]
        lines.append("  extrusion box   " + "  ".join(f"{axis} {lo:g}..{hi:g}"
                                                     for axis, lo, hi in zip("XYZ", low, high)))
    lines.append("  events")
    width = max((len(name) for name in summary["events"]), default=0)
    lines += [f"    {name:<{width}}  {count}" for name, count in summary["events"].items()]
    if not summary["events"]:
        lines.append("    (none)")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s"


def run_parse(files: list, as_json: bool, summary: bool, out=None, err=None,
              progress_after: float = PROGRESS_AFTER, progress_console=None) -> int:
    """``zevents parse``: 0 when every file was parsed, 1 when one could not be (one line on stderr each)."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    status = 0
    try:
        for path in files:
            progress = _DelayedProgress(os.path.basename(path), progress_after, progress_console)
            try:
                if summary:
                    result = analyse(path, progress=progress)
                    progress.close()
                    out.write((json.dumps(result) if as_json else _summary_text(result)) + "\n")
                else:
                    render = _event_json if as_json else _event_text
                    for event in iter_events(path, progress=progress):
                        out.write(render(path, event) + "\n")
            except (OSError, NotGcodeError) as exc:
                if isinstance(exc, BrokenPipeError):
                    raise
                err.write(f"zevents parse: {describe_error(path, exc)}\n")
                status = 1
            finally:
                progress.close()
        out.flush()
    except BrokenPipeError:  # `zevents parse big.gcode | head`: the reader has what it wanted
        if out is sys.stdout:
            # the interpreter flushes stdout at exit: point it at /dev/null so that flush cannot fail again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return status
    return status
