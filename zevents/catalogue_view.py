"""`zevents events`: the catalogue as a table or JSON."""
from __future__ import annotations

import json

from zevents import events


def rows():
    for spec in events.EVENTS.values():
        yield {"name": spec.name, "group": spec.group, "topic": spec.topic, "payload": list(spec.payload),
               "extension": spec.extension}


def run(as_json: bool) -> int:
    if as_json:
        print(json.dumps({"groups": list(events.GROUPS), "aliases": events.ALIASES, "events": list(rows())},
                         indent=1))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table(title="zevents catalogue", show_lines=False)
    table.add_column("event")
    table.add_column("group")
    table.add_column("payload keys")
    for row in rows():
        name = row["name"] + (" [dim](zevents)[/dim]" if row["extension"] else "")
        table.add_row(name, row["group"], ", ".join(row["payload"]))
    Console().print(table)
    return 0
