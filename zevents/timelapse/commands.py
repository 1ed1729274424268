"""`zevents timelapse ls|render|rm` and `zevents snapshot`: what the CLI adapters call.

``render`` renders in the calling process (niced, the same code and events as the service; the job's lock keeps
the service from rendering it at the same time) and prints the movie's path; like OctoPrint's API it refuses
while that printer prints, unless ``--force``.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from zevents.timelapse import render as render_mod, settings as tl_settings, store


def _stamp(seconds: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))


def listing(config) -> dict:
    """Movies and unrendered jobs (old ones cleaned first, as OctoPrint's listing does)."""
    settings = tl_settings.resolve(config)
    store.clean_old(config, settings.clean_after_days)
    movies = []
    for path in store.movies(config):
        info = path.stat()
        thumb = Path(f"{path}.thumb.jpg")
        movies.append({"name": path.name, "printer": path.parent.name, "path": str(path), "bytes": info.st_size,
                       "date": _stamp(info.st_mtime), "timestamp": info.st_mtime,
                       "thumbnail": str(thumb) if thumb.exists() else None})
    unrendered = []
    for job in store.jobs(config):
        data = job.read()
        unrendered.append({"name": job.id, "printer": job.printer, "path": str(job.path), "count": job.frame_count(),
                           "bytes": job.size(), "date": _stamp(job.modified()), "state": data.get("state"),
                           "gcode": data.get("gcode"), "success": data.get("success"),
                           "render": bool(data.get("render")), "error": data.get("error")})
    return {"movies": movies, "unrendered": unrendered}


def run_ls(config, as_json: bool = False) -> int:
    found = listing(config)
    if as_json:
        print(json.dumps(found, indent=1))
        return 0
    for movie in found["movies"]:
        print(f"movie       {movie['printer']}/{movie['name']}\t{movie['bytes']} bytes\t{movie['date']}")
    for job in found["unrendered"]:
        print(f"unrendered  {job['printer']}/{job['name']}\t{job['count']} frames\t{job['state']}\t{job['date']}"
              + (f"\t{job['error'][:80]}" if job.get("error") else ""))
    if not found["movies"] and not found["unrendered"]:
        print("no timelapse yet", file=sys.stderr)
    return 0


def _printing(config, printer: str) -> bool:
    """Whether the broker's snapshot says this printer is printing (False when no broker answers)."""
    from zevents import bus

    try:
        subscriber = bus.Subscriber(config.bus, groups=["print"], control_timeout=1.0)
    except Exception:
        return False
    try:
        latest = None
        for envelope in subscriber.snapshot(["print"], timeout=1.0):
            if envelope.name in ("PrintStarted", "PrintDone", "PrintFailed") and \
                    (envelope.printer or "printer") == printer:
                if latest is None or (envelope.ts, envelope.seq) > (latest.ts, latest.seq):
                    latest = envelope
        return latest is not None and latest.name == "PrintStarted"
    except bus.BusError:
        return False
    finally:
        subscriber.close()


def run_render(config, name: str, force: bool = False) -> int:
    from zevents import bus, events as _events

    try:
        job = store.find_job(config, name)
    except store.StoreError as exc:
        print(f"zevents: {exc}", file=sys.stderr)
        return 2
    if job.read().get("state") == "capturing":
        print(f"zevents: {job.id} is still capturing (its print runs)", file=sys.stderr)
        return 1
    if not force and _printing(config, job.printer):
        print(f"zevents: printer {job.printer} is printing; the render would slow it (use --force)", file=sys.stderr)
        return 1
    settings = tl_settings.resolve(config)
    publisher = bus.Publisher(config.bus, src="timelapse", printer=None if job.printer == "printer" else job.printer,
                              send_timeout=0.2)
    outcome = {}

    def publish(event, payload):
        outcome[event] = payload
        if event == "MovieRenderProgress":
            print(f"\rrendering {job.id}: {payload['progress']}%", end="", file=sys.stderr, flush=True)
        publisher.publish(event, _events.complete_payload(event, payload))

    try:
        result = render_mod.render(config, settings, job, publish)
    except store.StoreError as exc:
        print(f"zevents: {exc}", file=sys.stderr)
        return 1
    finally:
        publisher.close(linger=1)
        print("", file=sys.stderr)
    if result == render_mod.DONE:
        print(outcome["MovieDone"]["movie"])
        return 0
    failed = outcome.get("MovieFailed") or {}
    print(f"zevents: render failed ({failed.get('reason', result)}, returncode {failed.get('returncode')}): "
          f"{(failed.get('error') or '').strip()[-500:]}", file=sys.stderr)
    return 1


def run_rm(config, name: str) -> int:
    try:
        movie = store.find_movie(config, name)
    except store.StoreError:
        movie = None
    if movie is not None:
        movie.unlink()
        Path(f"{movie}.thumb.jpg").unlink(missing_ok=True)
        print(f"removed {movie}", file=sys.stderr)
        return 0
    try:
        job = store.find_job(config, name)
    except store.StoreError as exc:
        print(f"zevents: no movie or unrendered timelapse named {name!r} (see `zevents timelapse ls`)",
              file=sys.stderr)
        return 2
    if job.read().get("state") == "capturing":
        print(f"zevents: {job.id} is still capturing (its print runs)", file=sys.stderr)
        return 1
    try:
        with job.lock():
            job.remove()
    except store.StoreError as exc:
        print(f"zevents: {exc}", file=sys.stderr)
        return 1
    print(f"removed {job.path}", file=sys.stderr)
    return 0


def run_snapshot(config, out: str | None = None, printer: str | None = None) -> int:
    from zevents import config as zconfig
    from zevents.timelapse import sources

    settings = tl_settings.resolve(config)
    camera = settings.camera_for(printer)
    if camera is None:
        print("zevents: no camera configured (plugins.classicwebcam.snapshot, webcam.snapshot or "
              "timelapse.cameras)", file=sys.stderr)
        return 2
    try:
        data = sources.snapshot_once(camera, settings.min_frame_bytes, settings.max_frame_bytes,
                                     zconfig.runtime_dir() / config.node)
    except sources.FrameError as exc:
        print(f"zevents: camera {camera.name}: {exc}", file=sys.stderr)
        return 1
    target = Path(out or "snapshot.jpg")
    temporary = target.with_name(f".{target.name}.tmp")
    temporary.write_bytes(data)
    os.replace(temporary, target)
    print(f"{target} ({len(data)} bytes from camera {camera.name})", file=sys.stderr)
    return 0
