"""`zevents profile ls|show|add|edit|rm|default`: the printer-profile commands behind the CLI's adapters.

Each change is made in the store (:mod:`zevents.printer.profiles`) first and then announced on the bus as
OctoPrint's ``PrinterProfileAdded``/``Modified``/``Deleted{identifier}``; without a running broker the change
stands and a warning says that no event went out.
"""
from __future__ import annotations

import json
import sys

import yaml

from zevents.announce import announce
from zevents.printer.profiles import ProfileError, ProfileStore, nested, parse_assignment, merge


def _fail(message: str) -> int:
    print(f"zevents: {message}", file=sys.stderr)
    return 2


def run_ls(config, as_json: bool) -> int:
    store = ProfileStore.for_config(config)
    profiles = store.all()
    default = store.default_id()
    current = config.get("printer", "profile") or default
    if as_json:
        print(json.dumps({"default": default, "current": current, "profiles": profiles}, ensure_ascii=False))
        return 0
    from rich.console import Console
    from rich.table import Table

    table = Table("id", "name", "model", "volume (mm)", "extruders", "nozzle", "", box=None)
    for identifier, profile in profiles.items():
        volume = profile["volume"]
        marks = ", ".join(m for m, on in (("default", identifier == default), ("current", identifier == current))
                          if on)
        table.add_row(identifier, profile["name"], profile["model"],
                      f"{volume['width']:g} × {volume['depth']:g} × {volume['height']:g} {volume['formFactor']}",
                      str(profile["extruder"]["count"]), f"{profile['extruder']['nozzleDiameter']:g}", marks)
    Console().print(table)
    return 0


def run_show(config, identifier: str | None, as_json: bool) -> int:
    try:
        profile = ProfileStore.for_config(config).get(identifier)
    except ProfileError as exc:
        return _fail(str(exc))
    print(json.dumps(profile, ensure_ascii=False, indent=None if as_json else 2) if as_json
          else yaml.safe_dump(profile, sort_keys=False, allow_unicode=True), end="" if not as_json else "\n")
    return 0


def run_add(config, file: str, identifier: str | None, overwrite: bool) -> int:
    try:
        with open(file, encoding="utf-8") as handle:
            data = yaml.safe_load(handle)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        return _fail(f"{file}: cannot read the profile: {exc}")
    if not isinstance(data, dict):
        return _fail(f"{file}: a printer profile must be a mapping (id, name, volume, extruder, ...)")
    if identifier:
        data["id"] = identifier
    try:
        profile, replaced = ProfileStore.for_config(config).save(data, allow_overwrite=overwrite)
    except ProfileError as exc:
        return _fail(f"{file}: {exc}")
    announce(config, "PrinterProfileModified" if replaced else "PrinterProfileAdded", {"identifier": profile["id"]})
    print(profile["id"])
    return 0


def run_edit(config, identifier: str, assignments: list) -> int:
    changes: dict = {}
    try:
        for text in assignments:
            changes = merge(changes, nested(*parse_assignment(text)))
        profile = ProfileStore.for_config(config).edit(identifier, changes)
    except ProfileError as exc:
        return _fail(str(exc))
    announce(config, "PrinterProfileModified", {"identifier": profile["id"]})
    return 0


def run_rm(config, identifier: str) -> int:
    try:
        ProfileStore.for_config(config).delete(identifier, current=config.get("printer", "profile"))
    except ProfileError as exc:
        return _fail(str(exc))
    announce(config, "PrinterProfileDeleted", {"identifier": identifier})
    return 0


def run_default(config, identifier: str | None) -> int:
    store = ProfileStore.for_config(config)
    if identifier is None:
        print(store.default_id())
        return 0
    try:
        store.set_default(identifier)
    except ProfileError as exc:
        return _fail(str(exc))
    return 0
