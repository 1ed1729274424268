"""Slicing profiles: one file per profile in ``<data_dir>/slicing/<slicer>/<name>.profile``.

Owns adding, listing, reading and removing them, and turning what a user has into what a slicer loads:
- PrusaSlicer and Slic3r: a flat ``.ini`` (``key = value``, as "Export config" writes it) is kept as it is; a
  config bundle or a vendor file (``[print:NAME]``, ``[filament:NAME]``, ``[printer:NAME]`` sections, e.g.
  ``/usr/share/PrusaSlicer/profiles/PrusaResearch.ini``) is resolved into one flat ini for the chosen print,
  filament and printer presets, following their ``inherits`` chains.
- CuraEngine: a JSON file ``{"definition": <machine definition>, "settings": {key: value}}``; the definition is a
  name from Cura's definitions (``creality_ender3``) or a ``.def.json`` file, copied beside the profile.

Names follow OctoPrint's rule (``[-_.() A-Za-z0-9]``, spaces become ``_``); the first profile of a slicer becomes its
default (OctoPrint's rule too).  Files are written atomically.  The events (``SlicingProfileAdded``/``Modified``/
``Deleted{slicer, profile}``) are published by the caller.
"""
from __future__ import annotations

import configparser
import json
import os
import re
from pathlib import Path

from zevents.fileutil import atomic_write, safe_name
from zevents.slicing.slicers import SLICER_IDS

SUFFIX = ".profile"
_INI_LINE = re.compile(r"^\s*([A-Za-z0-9_]+)\s*=(.*)$")


class SlicingProfileError(ValueError):
    """A profile that cannot be added, found or removed; the message says why."""


def sanitize_name(name: str) -> str:
    cleaned = safe_name(name)
    if not cleaned:
        raise SlicingProfileError(f"{name!r} is not a usable profile name (letters, digits, - _ . ( ) and spaces)")
    return cleaned


def read_flat_ini(text: str, source: str) -> dict:
    settings = {}
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped[0] in "#;":
            continue
        match = _INI_LINE.match(line)
        if not match:
            raise SlicingProfileError(f"{source}:{number}: not a 'key = value' line of a slicer config: "
                                      f"{stripped[:80]!r}")
        settings[match[1]] = match[2].strip()
    if not settings:
        raise SlicingProfileError(f"{source}: no settings in it (an ini exported by the slicer has key = value lines)")
    return settings


def _bundle(text: str, source: str) -> configparser.RawConfigParser:
    parser = configparser.RawConfigParser(strict=False, interpolation=None, comment_prefixes=("#", ";"),
                                          inline_comment_prefixes=None)
    parser.optionxform = str
    try:
        parser.read_string(text, source)
    except configparser.Error as exc:
        raise SlicingProfileError(f"{source}: not a config bundle: {exc}") from None
    return parser


def resolve_preset(bundle: configparser.RawConfigParser, kind: str, name: str, source: str,
                   _seen: tuple = ()) -> dict:
    """One preset of a bundle with its ``inherits`` chain applied (parents in order, then its own keys)."""
    section = f"{kind}:{name}"
    if not bundle.has_section(section):
        known = [s.split(":", 1)[1] for s in bundle.sections() if s.startswith(f"{kind}:")
                 and not s.split(":", 1)[1].startswith("*")]
        import difflib

        near = difflib.get_close_matches(name, known, n=3)
        hint = f" (did you mean {', '.join(map(repr, near))}?)" if near else f" ({len(known)} {kind} presets)"
        raise SlicingProfileError(f"{source}: no [{section}] preset{hint}")
    if section in _seen:
        raise SlicingProfileError(f"{source}: [{section}] inherits from itself")
    values: dict = {}
    own = dict(bundle.items(section))
    for parent in filter(None, (p.strip() for p in own.pop("inherits", "").split(";"))):
        values.update(resolve_preset(bundle, kind, parent, source, _seen + (section,)))
    values.update(own)
    return values


class SlicingProfiles:
    """The slicing profiles of one node."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)

    @classmethod
    def for_config(cls, config) -> "SlicingProfiles":
        return cls(config.data_dir / "slicing")

    def _folder(self, slicer: str) -> Path:
        if slicer not in SLICER_IDS:
            raise SlicingProfileError(f"unknown slicer {slicer!r} (zevents knows {', '.join(SLICER_IDS)})")
        return self.directory / slicer

    def path(self, slicer: str, name: str) -> Path:
        return self._folder(slicer) / f"{sanitize_name(name)}{SUFFIX}"

    def names(self, slicer: str) -> list:
        folder = self._folder(slicer)
        if not folder.is_dir():
            return []
        return sorted(p.name[:-len(SUFFIX)] for p in folder.iterdir()
                      if p.name.endswith(SUFFIX) and not p.name.startswith("."))

    def all(self) -> dict:
        return {slicer: {"default": self.default(slicer), "profiles": self.names(slicer)} for slicer in SLICER_IDS}

    def default(self, slicer: str) -> str | None:
        try:
            name = (self._folder(slicer) / ".default").read_text(encoding="utf-8").strip()
        except OSError:
            name = ""
        if name and self.path(slicer, name).is_file():
            return name
        names = self.names(slicer)
        return names[0] if names else None

    def set_default(self, slicer: str, name: str) -> None:
        if not self.path(slicer, name).is_file():
            raise SlicingProfileError(f"no {slicer} profile {name!r}")
        atomic_write(self._folder(slicer) / ".default", sanitize_name(name).encode() + b"\n")

    def resolve(self, slicer: str, name: str | None) -> Path | None:
        """The file of a profile (None: the slicer's default, or no profile at all when it has none)."""
        name = name or self.default(slicer)
        if name is None:
            return None
        path = self.path(slicer, name)
        if not path.is_file():
            have = ", ".join(self.names(slicer)) or "none"
            raise SlicingProfileError(f"no {slicer} profile {name!r} (have: {have}; `zevents slicing profile add`)")
        return path

    def show(self, slicer: str, name: str) -> str:
        path = self.resolve(slicer, name)
        return path.read_text(encoding="utf-8", errors="replace")

    def add(self, slicer: str, name: str, source: str, presets: dict | None = None,
            settings: dict | None = None) -> tuple[str, bool]:
        """Stores a profile from a file; returns (name, replaced).  Nothing is written when the source is bad."""
        name = sanitize_name(name)
        target = self.path(slicer, name)
        source_path = Path(source)
        try:
            text = source_path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise SlicingProfileError(f"{source}: cannot read: {exc}") from None
        if slicer in ("prusaslicer", "slic3r"):
            data = self._ini_profile(text, source, presets or {})
            data.update({key: str(value) for key, value in (settings or {}).items()})
            body = "".join(f"{key} = {value}\n" for key, value in data.items())
            payload = f"# zevents {slicer} profile {name!r} from {source_path.name}\n{body}".encode()
        else:
            payload = self._cura_profile(text, source, target, settings or {})
        replaced = target.is_file()
        first = not self.names(slicer)
        atomic_write(target, payload)
        if first:
            self.set_default(slicer, name)
        return name, replaced

    @staticmethod
    def _ini_profile(text: str, source: str, presets: dict) -> dict:
        if re.search(r"^\s*\[(print|filament|printer):", text, re.M):
            bundle = _bundle(text, source)
            chosen = {kind: presets.get(kind) for kind in ("printer", "print", "filament")}
            missing = [kind for kind, value in chosen.items() if not value]
            if missing:
                raise SlicingProfileError(f"{source} is a config bundle: choose its presets with "
                                          + ", ".join(f"--{kind} NAME" for kind in missing))
            values: dict = {}
            for kind, value in chosen.items():
                values.update(resolve_preset(bundle, kind, value, source))
            for key in ("compatible_printers", "compatible_printers_condition", "compatible_prints",
                        "compatible_prints_condition", "renamed_from"):
                values.pop(key, None)
            return values
        if presets:
            raise SlicingProfileError(f"{source} is a flat config, not a bundle: --print/--filament/--printer apply "
                                      "only to bundles")
        return read_flat_ini(text, source)

    @staticmethod
    def _cura_profile(text: str, source: str, target: Path, settings: dict) -> bytes:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SlicingProfileError(f"{source}: not JSON: {exc}") from None
        if not isinstance(data, dict):
            raise SlicingProfileError(f"{source}: a CuraEngine profile must be a JSON object")
        if "settings" in data or "definition" in data and not source.endswith(".def.json"):
            profile = {"definition": data.get("definition") or "fdmprinter", "settings": dict(data.get("settings")
                                                                                            or {})}
            if not isinstance(profile["definition"], str):
                raise SlicingProfileError(f"{source}: definition must be a definition name or file")
        elif "metadata" in data or "overrides" in data or "inherits" in data:
            copy_path = target.with_name(target.name[:-len(SUFFIX)] + ".def.json")
            atomic_write(copy_path, text.encode())
            profile = {"definition": str(copy_path), "settings": {}}
        else:
            raise SlicingProfileError(f"{source}: neither a Cura machine definition (.def.json with "
                                      "metadata/overrides) nor a zevents CuraEngine profile (definition, settings)")
        profile["settings"].update({key: str(value) for key, value in settings.items()})
        return json.dumps(profile, indent=2, sort_keys=True).encode() + b"\n"

    def remove(self, slicer: str, name: str) -> None:
        path = self.path(slicer, name)
        if not path.is_file():
            raise SlicingProfileError(f"no {slicer} profile {name!r}")
        path.unlink()
        definition = path.with_name(path.name[:-len(SUFFIX)] + ".def.json")
        if definition.is_file():
            definition.unlink()
