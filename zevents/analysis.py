"""G-code file analysis: the events of a file as if it were streamed to a printer, and its summary.

``analyse(path)`` streams the file through the parser in chunks (memory stays flat however large the file) and
returns a JSON-ready summary: line count, events per name, layer count, max Z, print height, extrusion bounding
box, the tools used, and the filament and print time of the metadata analysis's planner (``zevents.files.analysis``,
fed the same chunks in the same pass).  ``iter_events(path)`` yields the events themselves.  ``run_parse`` is the
``zevents parse`` command and ``run_analyse`` the ``zevents analyse`` command behind the CLI adapters: text or JSON
Lines output, a rich progress bar on stderr for files that take more than a second, and one clear error line
(non-zero exit) for a missing file, a directory or binary G-code.
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


def _head_and_tail(path: str) -> tuple:
    """The file's head and tail (which slicer, its config block), b"" for a file that cannot be read: the error
    comes from the stream, with the parser's wording."""
    from zevents.files import analysis as metadata

    try:
        return metadata.head_and_tail(path, os.path.getsize(path))
    except OSError:
        return b"", b""


def _iter_events_feeding(path, config, chunk_size, progress, parser, planner) -> Iterator[Event]:
    """``iter_events``, feeding the planner the same chunks."""
    for chunk in iter_chunks(path, chunk_size, progress):
        planner.feed(chunk)
        yield from parser.feed_sent(chunk)
    yield from parser.flush()


def analyse(path: str, config=None, chunk_size: int = CHUNK_SIZE, progress: ProgressCallback | None = None) -> dict:
    """The summary of one G-code file (JSON-ready; see the module documentation)."""
    from zevents.files import analysis as metadata

    parser = Parser(config)
    planner = metadata.Core(metadata.resolve_limits(None, *_head_and_tail(path))[1], None)
    counts: Counter = Counter()
    max_z = None
    print_height = None
    tools = {parser.state.tool}
    for event in _iter_events_feeding(path, config, chunk_size, progress, parser, planner):
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
    planned = planner.finish()
    return {
        "path": path,
        "size": parser.sent_bytes,
        "lines": parser.sent_lines,
        "events": dict(sorted(counts.items())),
        "layers": state.layer,
        "max_z": max_z,
        "print_height": print_height,
        "filament_mm": round(sum(planned["filament"]), 5),
        "extrusion_bbox": None if bbox is None else {"min": list(bbox[:3]), "max": list(bbox[3:])},
        "estimated_time_s": round(planned["time"], 3),
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
             f"  estimated time  {_duration(summary['estimated_time_s'])} (planned with firmware limits)",
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


def _run_files(command: str, files: list, write_one, errors: tuple, out, err, progress_after: float,
               progress_console) -> int:
    """Runs ``write_one(path, progress, out)`` on each file: 0 when all went well, 1 when one could not be read
    (one line on stderr each, ``errors`` being the exceptions that mean so); quiet when the reader goes away."""
    out = out if out is not None else sys.stdout
    err = err if err is not None else sys.stderr
    status = 0
    try:
        for path in files:
            progress = _DelayedProgress(os.path.basename(path), progress_after, progress_console)
            try:
                write_one(path, progress, out)
            except errors as exc:
                if isinstance(exc, BrokenPipeError):
                    raise
                err.write(f"zevents {command}: {describe_error(path, exc)}\n")
                status = 1
            finally:
                progress.close()
        out.flush()
    except BrokenPipeError:  # `zevents parse big.gcode | head`: the reader has what it wanted
        if out is sys.stdout:
            # the interpreter flushes stdout at exit: point it at /dev/null so that flush cannot fail again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return status


def run_parse(files: list, as_json: bool, summary: bool, out=None, err=None,
              progress_after: float = PROGRESS_AFTER, progress_console=None) -> int:
    """``zevents parse``: 0 when every file was parsed, 1 when one could not be (one line on stderr each)."""
    def write_one(path, progress, out):
        if summary:
            result = analyse(path, progress=progress)
            progress.close()
            out.write((json.dumps(result) if as_json else _summary_text(result)) + "\n")
        else:
            render = _event_json if as_json else _event_text
            for event in iter_events(path, progress=progress):
                out.write(render(path, event) + "\n")

    return _run_files("parse", files, write_one, (OSError, NotGcodeError), out, err, progress_after,
                      progress_console)


# --------------------------------------------------------------------------------------------- zevents analyse


def _analysis_text(path: str, result: dict) -> str:
    meta = result["metadata"]
    rows = []
    if meta["slicer"]:
        rows.append(("slicer", f"{meta['slicer']} {meta['slicer_version'] or ''}".rstrip()))
    estimate = _duration(result["estimatedPrintTime"])
    if meta["estimated_time"]:
        error = (result["estimatedPrintTime"] - meta["estimated_time"]) / meta["estimated_time"] * 100
        estimate += f"  (slicer {_duration(meta['estimated_time'])}, {error:+.1f} %)"
    rows.append(("estimated time", estimate))
    for tool, amount in result["filament"].items():
        rows.append((f"filament {tool}", f"{amount['length']:.1f} mm, {amount['volume']:.2f} cm³"))
    layers = result["layers"]
    first = result["firstLayerHeight"]
    rows.append(("layers", f"{layers['count']} (from {layers['source']})"
                           + ("" if first is None else f", first at Z {first:g} mm")))
    if result["dimensions"]:
        d = result["dimensions"]
        rows.append(("dimensions", f"{d['width']:.2f} x {d['depth']:.2f} x {d['height']:.2f} mm"))
    for name in ("nozzle_diameter", "layer_height", "first_layer_extr_temp", "first_layer_bed_temp",
                 "filament_type", "filament_name", "object_height"):
        if meta.get(name) not in (None, ""):
            rows.append((name.replace("_", " "), f"{meta[name]:g}" if isinstance(meta[name], float) else meta[name]))
    for thumb in result["thumbnails"]:
        where = f"  {thumb['relative_path']}" if "relative_path" in thumb else ""
        rows.append(("thumbnail", f"{thumb['width']}x{thumb['height']} {thumb['format']}, {thumb['size']} bytes{where}"))
    rows.append(("profile", f"{result['analyser']['profile']} ({result['analyser']['implementation']} core)"))
    return "\n".join([path] + [f"  {label:<22} {value}" for label, value in rows])


def run_analyse(files: list, as_json: bool, profile=None, thumbnail_dir=None, out=None, err=None,
                progress_after: float = PROGRESS_AFTER, progress_console=None) -> int:
    """``zevents analyse``: 0 when every file was analysed, 1 when one could not be (one line on stderr each)."""
    from zevents.files import analysis as metadata

    def write_one(path, progress, out):
        result = metadata.analyse_file(path, profile=profile, thumbnail_dir=thumbnail_dir, progress=progress)
        progress.close()
        out.write((json.dumps({"file": path, **result}) if as_json else _analysis_text(path, result)) + "\n")

    return _run_files("analyse", files, write_one, (OSError, metadata.AnalysisError), out, err, progress_after,
                      progress_console)
