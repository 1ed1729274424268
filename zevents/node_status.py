"""`zevents status`: the node's services (from the supervisor), the printer (from the link) and the bus (from the
broker), as tables or JSON.  Each part that does not answer is reported as such, never guessed."""
from __future__ import annotations

import json
import os
import time

from zevents import bus, config as zconfig


def _supervisor_view(config) -> dict | None:
    """node.json with live figures: uptimes counted to now (the file is only rewritten every few seconds)."""
    status_file = zconfig.runtime_dir() / config.node / "node.json"
    try:
        view = json.loads(status_file.read_text())
    except (OSError, ValueError):
        return None
    try:
        os.kill(view["pid"], 0)
    except ProcessLookupError:
        return None  # a supervisor killed outright leaves its last node.json behind
    except PermissionError:
        pass
    now = time.time()
    for service in view["services"]:
        if service.get("alive") and service.get("started_at"):
            service["uptime"] = round(now - service["started_at"], 1)
    return view


def collect(config) -> dict:
    result = {"node": config.node, "services": _supervisor_view(config), "bus": None, "printer": None}
    control = bus.Control(config.bus)
    try:
        status = control.status(timeout=2.0)
        status["drops"] = {k: v for k, v in status["counters"].items() if k.startswith("bad")}
        rate = (result["services"] or {}).get("rate")
        if rate is None:
            # No supervisor sampling the bus (a broker of its own, or a node just started): the mean since the
            # broker started, which says so.
            published = sum(seq for group, seq in status["streams"].items() if group != "sys")
            rate = {"events_per_s": round(published / max(status["uptime"], 1e-3), 2), "window": None}
        status.update(rate)
        result["bus"] = status
    except bus.BusError as exc:
        result["bus"] = {"error": str(exc)}
    finally:
        control.close()
    try:
        from zevents.printer.channel import ChannelError, CommandClient
        from zevents.printer.settings import printer_sections
    except ImportError:
        return result
    # Every printer of the node, each asked on its own channel; `printer` stays the only one's (as before).
    result["printers"] = []
    for section in printer_sections(config):
        client = CommandClient(section["commands"])
        try:
            printer = client.request("STATUS", timeout=1.0)
        except ChannelError as exc:
            printer = {"error": str(exc)}
        finally:
            client.close()
        result["printers"].append(dict(printer, name=section["name"]))
    if len(result["printers"]) == 1:
        result["printer"] = printer
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
        window = bus_status["window"]
        rate_label = f"events/s (last {window:.0f} s)" if window else "events/s (mean since the broker started)"
        for name, value in ((rate_label + ", sys/ not counted", bus_status["events_per_s"]),
                            ("subscriptions", bus_status["subscriptions"]),
                            ("drops (bad ingest)", sum(bus_status["drops"].values())),
                            ("replay ring", f"{ring['size']} / {ring['capacity']} ({100 * ring['size'] // max(1, ring['capacity'])} %)"),
                            ("streams", ", ".join(f"{g}:{s}" for g, s in sorted(bus_status["streams"].items()))),
                            ("uptime", f"{bus_status['uptime']:.0f} s")):
            table.add_row(name, str(value))
        console.print(table)
    printers = status.get("printers") or []
    for printer in printers:
        label = "printer" if status["printer"] is not None else f"printer {printer['name']}"
        if printer.get("error"):  # a reply carries "error": null when all is well
            console.print(f"{label}: {printer['error']}")
        else:
            console.print(f"{label}: " + ", ".join(f"{k}={v}" for k, v in printer.items()
                                                   if k not in ("id", "error", "name") and v is not None))
    return 0 if "error" not in bus_status else 1
