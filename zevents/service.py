"""Lean entry point for the node's service processes: ``python -m zevents.service NAME -c CONFIG``.

The supervisor starts children through this module instead of the `zevents` CLI: typer pulls in click, rich and
pydantic at import, which a service never needs (≈16 MB of RSS and a quarter of a second per process).  Users keep
using `zevents broker|printer|hooks`, which end in the same ``run`` functions.
"""
from __future__ import annotations

import gc
import importlib
import sys

SERVICES = {
    "broker": "zevents.broker",
    "printer": "zevents.printer.service",
    "hooks": "zevents.hooks.service",
    "timelapse": "zevents.timelapse.service",
    "camera": "zevents.printer.virtual.camera",
    "files": "zevents.files.service",
    "slicing": "zevents.slicing.service",
    "gateway": "zevents.gateway.service",
    "mqtt": "zevents.bridges.service",
}

# The modules that register config sections (zevents.config.register_section) when imported: every service's
# settings.  Kept light: `config check` imports them all.
SECTION_OWNERS = (
    "zevents.printer.settings",
    "zevents.hooks.subscriptions",
    "zevents.timelapse.settings",
    "zevents.files.settings",
    "zevents.slicing.settings",
    "zevents.gateway.settings",
    "zevents.bridges.settings",
)


def register_config_sections() -> None:
    for module in SECTION_OWNERS:
        importlib.import_module(module)


def service_lock(config, name: str):
    """The lock that makes ``name`` the only one of its kind on this node: next to its own ipc endpoint when it has
    one (``printer.sock.lock``, as the broker's is next to its sockets), else in the node's runtime directory.  A
    stray `zevents printer` beside a node would otherwise take over the node's printer.sock, a stray `zevents
    hooks` run every hook a second time.  Raises pidlock.LockHeld naming the holder; release() when done."""
    from zevents import config as zconfig
    from zevents.pidlock import PidLock

    endpoint = config.endpoint("printer", "commands", "printer.sock") if name.startswith("printer") else ""
    if endpoint.startswith("ipc://"):
        path = endpoint[len("ipc://"):] + ".lock"
    else:  # one of several printers on tcp:// gets a lock of its own
        path = zconfig.runtime_dir() / config.node / f"{name.replace(':', '-').replace(' ', '_')}.lock"
    return PidLock(path).acquire(f"the {name} service of node {config.node!r}")


def run_exclusive(config, name: str, run, *args, **kwargs) -> int:
    """``run(config, ...)`` holding the service's lock; 1 with one line naming the holder when it is taken."""
    from zevents.pidlock import LockHeld

    try:
        lock = service_lock(config, name)
    except LockHeld as exc:
        print(f"zevents: {exc}; stop it first (`zevents status` shows a node's services)", file=sys.stderr)
        return 1
    with lock:
        return run(config, *args, **kwargs)


def freeze_startup_heap() -> int:
    """Takes what a service allocated while starting (modules, config, sockets) out of the garbage collector's
    reach, just before its loop begins.  A full collection walks every tracked object: in a service that meant
    pauses of several milliseconds, in the middle of the event stream, to re-check objects that live as long
    as the process.  Returns how many objects were frozen (also in the broker's STATUS)."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def run_until_signalled(name: str, config, service, start_errors: tuple, log) -> int:
    """The life of a service process: start (1 with one log line if it cannot), announce it on the bus, serve
    until SIGINT/SIGTERM, close.  ``service`` has start(), serve(), stop() and close()."""
    import logging
    import signal
    import time

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        service.start()
    except start_errors as exc:
        log.error("%s: %s", name, exc)
        service.close()
        return 1
    signal.signal(signal.SIGTERM, lambda signum, frame: service.stop())
    signal.signal(signal.SIGINT, lambda signum, frame: service.stop())
    started = time.monotonic()
    from zevents.bus import announce_started

    announce_started(config, name)
    freeze_startup_heap()
    try:
        service.serve()
    finally:
        service.close()
    log.info("%s: stopped after %.1f s", name, time.monotonic() - started)
    return 0


def main(argv: list) -> int:
    kind, _, printer = argv[0].partition(":") if argv else ("", "", "")
    if len(argv) != 3 or kind not in SERVICES or printer and kind != "printer" or argv[1] not in ("-c", "--config"):
        print(f"usage: python -m zevents.service {{{','.join(SERVICES)}}} -c CONFIG (printer:NAME: one of the "
              "node's printers)", file=sys.stderr)
        return 2
    from zevents.config import ConfigError, load

    try:
        config = load(argv[2])
    except ConfigError as exc:
        print(f"zevents: config error: {exc}", file=sys.stderr)
        return 2
    module = importlib.import_module(SERVICES[kind])
    if kind == "broker":  # the broker locks its own endpoints
        return module.run(config)
    if kind == "printer" and (printer or config.get("printers")):
        # one of a `printers:` list (printer:NAME among several): its service sees its own section as printer:
        from zevents.printer.settings import PrinterChoiceError, printer_config

        try:
            config = printer_config(config, printer or None)
        except PrinterChoiceError as exc:
            print(f"zevents: {exc}", file=sys.stderr)
            return 2
        return run_exclusive(config, argv[0], module.run, service_name=argv[0])
    return run_exclusive(config, argv[0], module.run)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
