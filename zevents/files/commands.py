"""`zevents files ls|upload|rm|mv|cp|mkdir|rmdir|info|serve`: the CLI's side of the files command channel.

Each function makes one request to the running files service and prints the answer (text, or JSON with
``--json``); a refusal is one line on stderr and exit code 1, a usage mistake exit code 2.
"""
from __future__ import annotations

import json
import os
import sys

from zevents.files import channel
from zevents.printer.channel import request_or_report


def _request(config, command: str, args: dict, timeout: float = 30.0):
    return request_or_report(channel.FilesClient(channel.endpoint(config)), command, args, timeout)


def _size(value) -> str:
    if value is None:
        return ""
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024.0


def _print_tree(entries: list, indent: str = ""):
    for entry in entries:
        if entry.get("type") == "folder":
            print(f"{indent}{entry['name']}/")
            _print_tree(entry.get("children") or [], indent + "  ")
        else:
            analysis = entry.get("analysis") or {}
            estimate = analysis.get("estimatedPrintTime")
            extra = f"\t~{estimate / 60:.0f} min" if isinstance(estimate, (int, float)) else ""
            print(f"{indent}{entry['name']}\t{_size(entry.get('size'))}{extra}")


def run_ls(config, path: str, recursive: bool, as_json: bool, storage: str, printer: str | None = None) -> int:
    reply = _request(config, "LIST", {"path": path or "", "recursive": recursive, "storage": storage,
                                      "printer": printer},
                     timeout=60.0)
    if reply is None:
        return 1
    files = reply.get("files") or []
    if as_json:
        print(json.dumps(files, ensure_ascii=False))
    else:
        _print_tree(files)
    return 0


def run_upload(config, file: str, folder: str | None, select: bool, start: bool, storage: str,
               printer: str | None = None) -> int:
    if not os.path.isfile(file):
        print(f"zevents: no such file: {file}", file=sys.stderr)
        return 2
    name = os.path.basename(file)
    if storage == "sdcard":
        target = folder or None   # the SD card's name (8.3) is the printer link's choice unless given
    else:
        target = f"{folder.strip('/')}/{name}" if folder and folder.strip("/") else name
    reply = _request(config, "UPLOAD", {"source": os.path.abspath(file), "path": target, "select": select,
                                        "print": start, "user": os.environ.get("USER"), "storage": storage,
                                        "printer": printer},
                     timeout=24 * 3600.0 if storage == "sdcard" else 120.0)
    if reply is None:
        return 1
    extra = ", printing" if reply.get("effective_print") else ", selected" if reply.get("effective_select") else ""
    if (select or start) and not (reply.get("effective_print") or reply.get("effective_select")) and \
            storage != "sdcard":
        extra = ", but the printer did not take it (see the files service's log)"
    print(f"uploaded {reply.get('storage')}:{reply.get('path')}{extra}", file=sys.stderr)
    return 0


def run_simple(config, command: str, args: dict, done: str) -> int:
    reply = _request(config, command, args)
    if reply is None:
        return 1
    print(done.format(**args, **reply), file=sys.stderr)
    return 0


def run_info(config, path: str, as_json: bool, storage: str) -> int:
    reply = _request(config, "INFO", {"path": path, "storage": storage})
    if reply is None:
        return 1
    info = reply.get("file") or {}
    if as_json:
        print(json.dumps(info, ensure_ascii=False))
        return 0
    for key in ("name", "path", "origin", "type", "size", "hash", "display", "user"):
        if info.get(key) is not None:
            print(f"{key}: {info[key]}")
    analysis = info.get("analysis")
    if analysis:
        print("analysis:")
        for key, value in analysis.items():
            print(f"  {key}: {json.dumps(value, ensure_ascii=False)}")
    elif info.get("type") == "machinecode":
        print("analysis: not yet")
    if info.get("type") != "folder":
        prints = info.get("prints") or {}
        stats = info.get("statistics") or {}
        print(f"prints: {prints.get('success', 0)} done, {prints.get('failure', 0)} failed")
        for label, key in (("last print time", "lastPrintTime"), ("average print time", "averagePrintTime")):
            for profile, seconds in (stats.get(key) or {}).items():
                print(f"{label} ({profile}): {seconds:.1f} s")
        for entry in info.get("history") or []:
            outcome = "done" if entry.get("success") else "failed"
            seconds = f" in {entry['printTime']:.1f} s" if entry.get("printTime") is not None else ""
            print(f"  {entry.get('timestamp'):.0f}: {outcome}{seconds}")
    return 0
