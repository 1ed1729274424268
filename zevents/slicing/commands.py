"""`zevents slicers`, `zevents slice`, `zevents slicing profile ...`: the slicing commands behind the CLI's adapters.

``zevents slice MODEL`` stores a local model through the files service (or takes a model already in storage),
asks the slicing service to slice it and follows its events on the bus to the end: a progress bar on a terminal,
the stored G-code's path on success (exit 0), the slicer's reason on failure (exit 1).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from zevents.announce import announce
from zevents.slicing import models, slicers
from zevents.slicing.profiles import SlicingProfileError, SlicingProfiles

FINAL = ("SlicingDone", "SlicingFailed", "SlicingCancelled")


def _fail(message: str, code: int = 2) -> int:
    print(f"zevents: {message}", file=sys.stderr)
    return code


def run_slicers(config, as_json: bool) -> int:
    found = [slicer.as_dict() for slicer in slicers.find_all(config)]
    if as_json:
        print(json.dumps(found))
        return 0
    for item in found:
        if item["available"]:
            print(f"{item['id']:<12} {item['name']} {item['version'] or '(version unknown)'}  {item['path']}")
        else:
            print(f"{item['id']:<12} not available: {item['hint']}")
    return 0


# --- profiles -----------------------------------------------------------------------------------------------------

def run_profile_add(config, slicer: str, name: str, file: str, presets: dict, settings: list) -> int:
    values = {}
    for item in settings:
        if "=" not in item:
            return _fail(f"--set {item!r}: expected KEY=VALUE")
        key, value = item.split("=", 1)
        values[key.strip()] = value.strip()
    try:
        stored, replaced = SlicingProfiles.for_config(config).add(slicer, name, file, presets, values)
    except SlicingProfileError as exc:
        return _fail(str(exc))
    announce(config, "SlicingProfileModified" if replaced else "SlicingProfileAdded",
             {"slicer": slicer, "profile": stored})
    print(stored)
    return 0


def run_profile_ls(config, slicer: str | None, as_json: bool) -> int:
    store = SlicingProfiles.for_config(config)
    everything = store.all()
    if slicer:
        if slicer not in everything:
            return _fail(f"unknown slicer {slicer!r} (zevents knows {', '.join(everything)})")
        everything = {slicer: everything[slicer]}
    if as_json:
        print(json.dumps(everything))
        return 0
    for slicer_id, item in everything.items():
        for name in item["profiles"]:
            print(f"{slicer_id:<12} {name}{'  (default)' if name == item['default'] else ''}")
    return 0


def run_profile_show(config, slicer: str, name: str | None) -> int:
    try:
        store = SlicingProfiles.for_config(config)
        path = store.resolve(slicer, name)
        if path is None:
            return _fail(f"{slicer} has no profiles yet (`zevents slicing profile add {slicer} NAME FILE`)")
        sys.stdout.write(path.read_text(encoding="utf-8", errors="replace"))
    except SlicingProfileError as exc:
        return _fail(str(exc))
    return 0


def run_profile_rm(config, slicer: str, name: str) -> int:
    try:
        SlicingProfiles.for_config(config).remove(slicer, name)
    except SlicingProfileError as exc:
        return _fail(str(exc))
    announce(config, "SlicingProfileDeleted", {"slicer": slicer, "profile": name})
    return 0


def run_profile_default(config, slicer: str, name: str | None) -> int:
    store = SlicingProfiles.for_config(config)
    try:
        if name is None:
            print(store.default(slicer) or "")
        else:
            store.set_default(slicer, name)
    except SlicingProfileError as exc:
        return _fail(str(exc))
    return 0


# --- slicing ------------------------------------------------------------------------------------------------------

def _store_model(config, model: str) -> str:
    """A local model file is uploaded to storage first (as OctoPrint slices only stored models); a name that is
    not a local file is taken as a storage path."""
    from zevents.files.channel import FilesClient, endpoint as files_endpoint

    local = Path(model)
    if not local.is_file():
        return model
    models.model_type(local)
    client = FilesClient(files_endpoint(config))
    try:
        reply = client.request("UPLOAD", {"source": str(local.resolve()), "path": local.name, "overwrite": True},
                               timeout=120.0)
    finally:
        client.close()
    return reply["path"]


def run_slice(config, model: str, slicer: str | None, profile: str | None, printer_profile: str | None,
              dest: str | None, select: bool, start: bool, timeout: float | None, printer: str | None = None) -> int:
    from zevents import bus
    from zevents.files.channel import ChannelError
    from zevents.slicing.models import ModelError
    from zevents.slicing.service import SlicingClient, endpoint

    try:
        stl = _store_model(config, model)
    except (ModelError, ChannelError, OSError) as exc:
        return _fail(str(exc))
    client = SlicingClient(endpoint(config))
    with bus.Subscriber(config, groups=["slicing"]) as subscriber:
        try:
            reply = client.request("SLICE", {"model": stl, "slicer": slicer, "profile": profile,
                                             "printer_profile": printer_profile, "dest": dest, "select": select,
                                             "print": start, "printer": printer}, timeout=30.0)
        except ChannelError as exc:
            return _fail(str(exc))
        finally:
            client.close()
        gcode = reply["gcode"]
        return _follow(subscriber, gcode, reply["slicer"], timeout)


def _follow(subscriber, gcode: str, slicer: str, timeout: float | None) -> int:
    import time

    bar = None
    if sys.stderr.isatty():
        from rich.progress import Progress

        bar = Progress(transient=True)
        bar.start()
        task = bar.add_task(f"{slicer}: {gcode}", total=100)
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while True:
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return _fail(f"no outcome for {gcode} within {timeout:g} s (the job goes on)", 1)
            envelope = subscriber.recv(min(remaining, 1.0) if remaining is not None else 1.0)
            if envelope is None or envelope.payload.get("gcode") != gcode:
                continue
            if envelope.name == "SlicingProgress" and bar is not None:
                bar.update(task, completed=envelope.payload.get("progress", 0))
            elif envelope.name in FINAL:
                if bar is not None:
                    bar.stop()
                    bar = None
                if envelope.name == "SlicingDone":
                    print(gcode)
                    print(f"sliced in {envelope.payload.get('time', 0):.1f} s", file=sys.stderr)
                    return 0
                if envelope.name == "SlicingFailed":
                    return _fail(f"slicing failed: {envelope.payload.get('reason')}", 1)
                return _fail(f"slicing of {gcode} was cancelled", 1)
    finally:
        if bar is not None:
            bar.stop()


def run_cancel(config, dest: str) -> int:
    from zevents.files.channel import ChannelError
    from zevents.slicing.service import SlicingClient, endpoint

    client = SlicingClient(endpoint(config))
    try:
        reply = client.request("CANCEL", {"dest": dest}, timeout=10.0)
    except ChannelError as exc:
        return _fail(str(exc))
    finally:
        client.close()
    if not reply.get("cancelled"):
        return _fail(f"no slicing job for {dest}", 1)
    return 0

