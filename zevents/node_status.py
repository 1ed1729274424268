"""`zevents status`: the node's services (from the supervisor), the printer (from the link) and the bus (from the
broker), as tables or JSON.  Each part that does not answer is reported as such, never guessed."""
from __future__ import annotations

import json
import time

from zevents import bus, config as zconfig


def collect(config) -> dict:
    result = {"node": config.node, "services": None, "bus": None, "printer": None}
    status_file = zconfig.runtime_dir() / config.node / "node.json"
    try:
        result["services"] = json.loads(status_file.read_text())
    except (OSError, ValueError):
        result["services"] = None
    control = bus.Control(config.bus)
    try:
        first = control.status(timeout=1.0)
        t0 = time.monotonic()
        # Two readings a moment apart give the event rate.
        time.sleep(0.5)
        second = control.status(timeout=1.0)
        elapsed = time.monotonic() - t0
        published = sum(second["streams"].values()) - sum(first["streams"].values())
        second["events_per_s"] = round(published / elapsed, 1)
        second["drops"] = {k: v for k, v in second["counters"].items() if k.startswith("bad")}
        result["bus"] = second
    except bus.BusError as exc:
        result["bus"] = {"error": str(exc)}
    finally:
        control.close()
    try:
        from zevents.printer.channel import ChannelError, CommandClient, endpoint

        client = CommandClient(endpoint(config))
        try:
            result["printer"] = client.request("STATUS", timeout=1.0)
        except ChannelError as exc:
            result["printer"] = {"error": str(exc)}
        finally:
            client.close()
    except ImportError:
        pass
    return result


def run(config, as_json: bool) -> int:
    status = collect(config)
    if as_json:
        print(json.dumps(status, indent=1, default=str))
        return 0 if "error" not in (status["bus"] or {}) else 1
    from rich.console import Console
    from rich.table import Table

    console = Console()
    services = status["services"]
    if services:
        table = Table(title=f"node {status['node']} (supervisor pid {services['pid']})")
        for column in ("service", "pid", "uptime", "restarts", "ready"):
            table.add_column(column)
        for service in services["services"]:
            table.add_row(service["name"], str(service["pid"] or "-"), f"{service['uptime']:.0f} s",
                          str(service["restarts"]), "yes" if service["ready"] else "no")
        console.print(table)
    else:
        console.print(f"node {status['node']}: no supervisor running (`zevents run` starts one)")
    bus_status = status["bus"]
    if "error" in bus_status:
        console.print(f"bus: {bus_status['error']}")
    else:
        table = Table(title=f"bus (epoch {bus_status['epoch']})")
        table.add_column("figure")
        table.add_column("value")
        ring = bus_status["ring"]
        for name, value in (("events/s", bus_status["events_per_s"]),
                            ("subscriptions", bus_status["subscriptions"]),
                            ("drops (bad ingest)", sum(bus_status["drops"].values())),
                            ("replay ring", f"{ring['size']} / {ring['capacity']} ({100 * ring['size'] // max(1, ring['capacity'])} %)"),
                            ("streams", ", ".join(f"{g}:{s}" for g, s in sorted(bus_status["streams"].items()))),
                            ("uptime", f"{bus_status['uptime']:.0f} s")):
            table.add_row(name, str(value))
        console.print(table)
    printer = status["printer"]
    if printer is not None:
        if "error" in printer:
            console.print(f"printer: {printer['error']}")
        else:
            console.print("printer: " + ", ".join(f"{k}={v}" for k, v in printer.items() if k != "id"))
    return 0 if "error" not in bus_status else 1
