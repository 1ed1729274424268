"""`zevents run --demo`: print a bundled sample on the (virtual) printer as soon as the node is up, so a newcomer
sees the whole event flow within seconds: PrintStarted, Home, ZChange, LayerChanged, PrintProgress, PrintDone and
the results of a demo hook.

The sample is a real slicer output: a 20 mm cube sliced by PrusaSlicer 2.5.0 for an MK3S (gzipped in the package).
"""
from __future__ import annotations

import gzip
import logging
import shutil
import threading
import time
from importlib import resources
from pathlib import Path

log = logging.getLogger("zevents.demo")

SAMPLE = "demo_cube20_prusaslicer250_mk3s.gcode.gz"

DEMO_HOOKS = [
    {"name": "demo: announce the print", "event": ["PrintStarted", "PrintDone"], "type": "system",
     "command": "echo {__eventname}: {name} at {__progress} percent"},
]


class DemoError(ValueError):
    """The demo cannot run with these settings (the message says why)."""


def prepare(config):
    """Demo settings on top of the user's: an instant virtual printer and one visible hook.  DemoError when the
    printer is not the built-in virtual one: the demo would print a Prusa MK3S cube on whatever is attached."""
    printer = config.data.setdefault("printer", {})
    port = str(printer.get("port") or "VIRTUAL")
    if port.upper() != "VIRTUAL":
        raise DemoError(f"--demo prints a sample cube and only ever on the built-in virtual printer, but the printer "
                        f"port is {port} (from --port or printer.port); drop --demo to run with that printer, or "
                        "drop --port / set printer.port: VIRTUAL for the demo")
    printer.setdefault("virtual", {})["speed"] = 0
    events = config.data.setdefault("events", {})
    events["enabled"] = True
    events["subscriptions"] = list(events.get("subscriptions") or []) + DEMO_HOOKS


def sample_file(data_dir: Path) -> Path:
    target = Path(data_dir) / "demo" / SAMPLE[:-3]
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with resources.files("zevents").joinpath("data", SAMPLE).open("rb") as packed, \
                gzip.open(packed) as source, open(target, "wb") as out:
            shutil.copyfileobj(source, out)
    return target


RESULT: dict = {}


def _wants_movie(config) -> bool:
    from zevents.timelapse import settings as tl_settings

    return bool(config.get("timelapse", "enabled")) and tl_settings.resolve(config).enabled


def _await_movie(config, supervisor, subscriber, timeout: float):
    """The demo ends with its timelapse: once MovieDone (or MovieFailed) is out, the node stops and `finish()`
    prints the movie's path as the last line."""
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            envelope = subscriber.recv(timeout=1.0)
            if envelope is not None and envelope.name in ("MovieDone", "MovieFailed"):
                RESULT.update(event=envelope.name, payload=envelope.payload)
                break
        else:
            RESULT.update(event="timeout")
    finally:
        subscriber.close()
    if supervisor is not None:
        supervisor.stop()


def finish():
    """After the node stopped: the demo's last words."""
    if RESULT.get("event") == "MovieDone":
        print(f"zevents demo: timelapse of the demo print: {RESULT['payload'].get('movie')}", flush=True)
    elif RESULT.get("event") == "MovieFailed":
        print(f"zevents demo: the timelapse failed: {RESULT['payload'].get('reason')} "
              f"({RESULT['payload'].get('error') or ''})", flush=True)
    elif RESULT.get("event") == "timeout":
        print("zevents demo: no timelapse movie came in time", flush=True)


def _print_when_ready(config, timeout: float, supervisor=None):
    from zevents.printer.channel import ChannelError, CommandClient
    from zevents.printer.settings import printer_sections

    movie_watch = None
    if _wants_movie(config):
        from zevents import bus

        movie_watch = bus.Subscriber(config.bus, groups=["timelapse"], events=["MovieDone", "MovieFailed"])
    path = sample_file(config.data_dir)
    client = CommandClient(printer_sections(config)[0]["commands"])  # several printers: the first prints it
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            try:
                state = client.request("STATUS", timeout=2.0).get("state_id")
            except ChannelError:
                state = None
            if state == "OPERATIONAL":
                client.request("PRINT", {"path": str(path), "user": "demo"}, timeout=10.0)
                log.info("demo: printing %s", path.name)
                if movie_watch is not None:
                    watch, movie_watch = movie_watch, None
                    _await_movie(config, supervisor, watch, timeout=900.0)
                return
            time.sleep(0.2)
        log.error("demo: the printer was not operational within %.0f s; nothing printed", timeout)
    except ChannelError as exc:
        log.error("demo: the printer refused the demo print: %s", exc)
    finally:
        client.close()
        if movie_watch is not None:
            movie_watch.close()


def start(config, supervisor=None, timeout: float = 60.0) -> threading.Thread:
    thread = threading.Thread(target=_print_when_ready, args=(config, timeout, supervisor), name="zevents-demo",
                              daemon=True)
    thread.start()
    return thread
