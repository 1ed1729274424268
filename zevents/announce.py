"""One event from a short-lived command (the CLI's profile changes): published and confirmed by the broker, or a
warning that says it was not (the change the command made stands either way)."""
from __future__ import annotations

import sys


def announce(config, event: str, payload: dict, src: str = "cli") -> bool:
    from zevents import bus

    publisher = bus.Publisher(config, src=src, printer=config.get("printer", "name"))
    try:
        publisher.publish_confirmed(event, payload, timeout=2.0)
        return True
    except bus.BusError as exc:
        print(f"zevents: warning: {event} not published ({exc})", file=sys.stderr)
        return False
    finally:
        publisher.close(linger=0)
