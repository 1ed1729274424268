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
    "mqtt": "zevents.bridges.service",
}

# The modules that register config sections (zevents.config.register_section) when imported: every service's
# settings.  Kept light: `config check` imports them all.
SECTION_OWNERS = (
    "zevents.printer.settings",
    "zevents.hooks.subscriptions",
    "zevents.bridges.settings",
)


def register_config_sections() -> None:
    for module in SECTION_OWNERS:
        importlib.import_module(module)


def freeze_startup_heap() -> int:
    """Takes what a service allocated while starting (modules, config, sockets) out of the garbage collector's
    reach, just before its loop begins.  A full collection walks every tracked object: in a service that meant
    pauses of several milliseconds, in the middle of the event stream, to re-check objects that live as long
    as the process.  Returns how many objects were frozen (also in the broker's STATUS)."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def main(argv: list) -> int:
    if len(argv) != 3 or argv[0] not in SERVICES or argv[1] not in ("-c", "--config"):
        print(f"usage: python -m zevents.service {{{','.join(SERVICES)}}} -c CONFIG", file=sys.stderr)
        return 2
    from zevents.config import ConfigError, load

    try:
        config = load(argv[2])
    except ConfigError as exc:
        print(f"zevents: config error: {exc}", file=sys.stderr)
        return 2
    return importlib.import_module(SERVICES[argv[0]]).run(config)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
