"""Printer profiles: OctoPrint's format (``printer/profile.py::PrinterProfileManager``), stored as YAML files.

Owns the profile store in ``<data_dir>/printerProfiles/<id>.profile`` (OctoPrint's layout, so a folder copied from
OctoPrint's ``printerProfiles`` works) and the choice of the default profile (``.default`` beside them, since the
user's config file is theirs and never rewritten).  A profile is OctoPrint's keys (``id``, ``name``, ``model``,
``color``, ``volume``, ``heatedBed``, ``heatedChamber``, ``extruder``, ``axes``) plus ours, ``motion``: the
firmware limits the metadata analysis plans moves with (max feedrate and acceleration per axis in mm/s and mm/s²,
print/travel/retract acceleration, classic jerk or junction deviation).

Saving merges the profile over the built-in default (OctoPrint's ``dict_merge``), validates every key with a
message that names it, and writes atomically (temporary file, then rename): a ``kill -9`` leaves the old or the
new profile, never half of one.  The events (``PrinterProfileAdded``/``Modified``/``Deleted{identifier}``) are
published by the caller that made the change (the CLI, the gateway), as OctoPrint fires them only for API changes.

Decided quirks: OctoPrint refuses to delete the default or the current profile; so do we.  OctoPrint's default
profile's id is ``_default`` and cannot be deleted or overwritten by ``add``; ``edit _default`` saves a real file
that then overrides the built-in one (as OctoPrint does).
"""
from __future__ import annotations

import copy
import math
import os
from pathlib import Path

import yaml

from zevents.fileutil import atomic_write, safe_name

DEFAULT_ID = "_default"
SUFFIX = ".profile"

DEFAULT_PROFILE: dict = {
    "id": DEFAULT_ID,
    "name": "Default",
    "model": "Generic RepRap Printer",
    "color": "default",
    "volume": {"width": 200.0, "depth": 200.0, "height": 200.0, "formFactor": "rectangular", "origin": "lowerleft",
               "custom_box": False},
    "heatedBed": True,
    "heatedChamber": False,
    "extruder": {"count": 1, "offsets": [[0.0, 0.0]], "nozzleDiameter": 0.4, "sharedNozzle": False,
                 "defaultExtrusionLength": 5},
    "axes": {"x": {"speed": 6000, "inverted": False}, "y": {"speed": 6000, "inverted": False},
             "z": {"speed": 200, "inverted": False}, "e": {"speed": 300, "inverted": False}},
    # Ours: Marlin's defaults for a Cartesian printer (Configuration.h), used when a file sets no M201/M203/M204/M205.
    "motion": {
        "max_feedrate": {"x": 500.0, "y": 500.0, "z": 12.0, "e": 120.0},            # mm/s
        "max_acceleration": {"x": 3000.0, "y": 3000.0, "z": 100.0, "e": 10000.0},  # mm/s²
        "acceleration": {"print": 1250.0, "travel": 1250.0, "retract": 1250.0},    # mm/s²
        "jerk": {"x": 8.0, "y": 8.0, "z": 0.4, "e": 5.0},                          # mm/s (classic jerk)
        "junction_deviation": None,                                                # mm; set: used instead of jerk
    },
}



class ProfileError(ValueError):
    """A profile that cannot be stored, found or removed; the message says why."""


def sanitize_id(identifier: str) -> str:
    """OctoPrint's rule: keep ``[-_.() A-Za-z0-9]``, spaces become ``_``."""
    cleaned = safe_name(identifier)
    if not cleaned:
        raise ProfileError(f"{identifier!r} is not a usable profile id (letters, digits, - _ . ( ) and spaces)")
    return cleaned


def merge(base: dict, over: dict) -> dict:
    merged = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _number(value, key: str, minimum: float = 0.0, allow_zero: bool = False) -> list:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return [f"{key}: must be a finite number, not {value!r}"]
    if value < minimum or (value == minimum and not allow_zero):
        return [f"{key}: must be {'at least' if allow_zero else 'more than'} {minimum}, not {value!r}"]
    return []


def validate(profile: dict) -> list:
    """Every problem of a (merged) profile, each naming its key; an empty list when it is valid."""
    problems = []
    for key in ("id", "name", "model", "color"):
        if not isinstance(profile.get(key), str) or not profile.get(key):
            problems.append(f"{key}: must be a non-empty string")
    volume = profile.get("volume")
    if not isinstance(volume, dict):
        return problems + ["volume: must be a mapping"]
    for key in ("width", "depth", "height"):
        problems += _number(volume.get(key), f"volume.{key}")
    if volume.get("formFactor") not in ("rectangular", "circular"):
        problems.append(f"volume.formFactor: must be 'rectangular' or 'circular', not {volume.get('formFactor')!r}")
    if volume.get("origin") not in ("lowerleft", "center"):
        problems.append(f"volume.origin: must be 'lowerleft' or 'center', not {volume.get('origin')!r}")
    box = volume.get("custom_box")
    if box not in (False, None):
        names = ("x_min", "y_min", "z_min", "x_max", "y_max", "z_max")
        if not isinstance(box, dict) or set(box) != set(names):
            problems.append(f"volume.custom_box: must be false or a mapping of {', '.join(names)}")
        else:
            for name in names:
                if isinstance(box[name], bool) or not isinstance(box[name], (int, float)) \
                        or not math.isfinite(box[name]):
                    problems.append(f"volume.custom_box.{name}: must be a finite number")
            if not problems:
                for axis in "xyz":
                    if box[f"{axis}_min"] >= box[f"{axis}_max"]:
                        problems.append(f"volume.custom_box: {axis}_min must be below {axis}_max")
    for key in ("heatedBed", "heatedChamber"):
        if not isinstance(profile.get(key), bool):
            problems.append(f"{key}: must be true or false")
    extruder = profile.get("extruder")
    if not isinstance(extruder, dict):
        return problems + ["extruder: must be a mapping"]
    count = extruder.get("count")
    if isinstance(count, bool) or not isinstance(count, int) or not 1 <= count <= 16:
        problems.append(f"extruder.count: must be an integer from 1 to 16, not {count!r}")
    offsets = extruder.get("offsets")
    if not isinstance(offsets, list) or not all(
            isinstance(o, (list, tuple)) and len(o) == 2 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in o)
            for o in offsets):
        problems.append("extruder.offsets: must be a list of [x, y] pairs")
    elif isinstance(count, int) and len(offsets) != count:
        problems.append(f"extruder.offsets: {len(offsets)} pairs for {count} extruders (one pair per extruder)")
    problems += _number(extruder.get("nozzleDiameter"), "extruder.nozzleDiameter")
    if not isinstance(extruder.get("sharedNozzle"), bool):
        problems.append("extruder.sharedNozzle: must be true or false")
    axes = profile.get("axes")
    if not isinstance(axes, dict):
        return problems + ["axes: must be a mapping"]
    for axis in "xyze":
        item = axes.get(axis)
        if not isinstance(item, dict):
            problems.append(f"axes.{axis}: must be a mapping with speed and inverted")
            continue
        problems += _number(item.get("speed"), f"axes.{axis}.speed")
        if not isinstance(item.get("inverted"), bool):
            problems.append(f"axes.{axis}.inverted: must be true or false")
    motion = profile.get("motion")
    if not isinstance(motion, dict):
        return problems + ["motion: must be a mapping"]
    for group, keys in (("max_feedrate", "xyze"), ("max_acceleration", "xyze"), ("jerk", "xyze"),
                        ("acceleration", ("print", "travel", "retract"))):
        values = motion.get(group)
        if not isinstance(values, dict):
            problems.append(f"motion.{group}: must be a mapping of {', '.join(keys)}")
            continue
        for key in keys:
            problems += _number(values.get(key), f"motion.{group}.{key}", allow_zero=group == "jerk")
    if motion.get("junction_deviation") is not None:
        problems += _number(motion["junction_deviation"], "motion.junction_deviation")
    known = set(DEFAULT_PROFILE)
    problems += [f"{key}: unknown key" for key in profile if key not in known]
    return problems


class ProfileStore:
    """The profiles of one node, in one folder."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)

    @classmethod
    def for_config(cls, config) -> "ProfileStore":
        return cls(config.data_dir / "printerProfiles")

    def _path(self, identifier: str) -> Path:
        return self.directory / f"{sanitize_id(identifier)}{SUFFIX}"

    def _read(self, path: Path) -> dict:
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
            raise ProfileError(f"{path}: cannot read the profile: {exc}") from None
        if not isinstance(data, dict):
            raise ProfileError(f"{path}: a profile must be a mapping")
        return data

    def ids(self) -> list:
        found = {DEFAULT_ID}
        if self.directory.is_dir():
            found.update(p.name[:-len(SUFFIX)] for p in self.directory.iterdir()
                         if p.name.endswith(SUFFIX) and not p.name.startswith("."))
        return sorted(found)

    def exists(self, identifier: str) -> bool:
        return identifier == DEFAULT_ID or self._path(identifier).is_file()

    def get(self, identifier: str | None = None) -> dict:
        """A profile by id (merged over the default, as OctoPrint serves them); None: the default profile."""
        identifier = identifier or self.default_id()
        path = self._path(identifier)
        if path.is_file():
            profile = merge(DEFAULT_PROFILE, self._read(path))
            profile["id"] = identifier
            return profile
        if identifier == DEFAULT_ID:
            return copy.deepcopy(DEFAULT_PROFILE)
        raise ProfileError(f"no printer profile {identifier!r} (have: {', '.join(self.ids())})")

    def all(self) -> dict:
        profiles = {}
        for identifier in self.ids():
            try:
                profiles[identifier] = self.get(identifier)
            except ProfileError:
                continue            # an unreadable file is reported by `profile show`, not hidden behind others
        return profiles

    def default_id(self) -> str:
        marker = self.directory / ".default"
        try:
            identifier = marker.read_text(encoding="utf-8").strip()
        except OSError:
            return DEFAULT_ID
        return identifier if identifier and self._path(identifier).is_file() else DEFAULT_ID

    def set_default(self, identifier: str) -> None:
        if not self.exists(identifier):
            raise ProfileError(f"no printer profile {identifier!r} (have: {', '.join(self.ids())})")
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_write(self.directory / ".default", sanitize_id(identifier) + "\n")

    def save(self, profile: dict, allow_overwrite: bool = False) -> tuple[dict, bool]:
        """Stores a profile (merged over the default); returns it and whether it replaced an existing one.
        Raises ProfileError naming every bad key, having written nothing."""
        if not isinstance(profile, dict):
            raise ProfileError("a profile must be a mapping")
        identifier = sanitize_id(profile.get("id") or profile.get("name") or "")
        path = self._path(identifier)
        existed = path.is_file()
        if existed and not allow_overwrite:
            raise ProfileError(f"printer profile {identifier!r} exists already (edit it, or remove it first)")
        if identifier == DEFAULT_ID and not allow_overwrite:
            raise ProfileError(f"{DEFAULT_ID!r} is the built-in default profile: edit it instead")
        base = self.get(identifier) if existed or identifier == DEFAULT_ID else DEFAULT_PROFILE
        merged = merge(base, profile)
        merged["id"] = identifier
        if merged.get("name") in (None, "", DEFAULT_PROFILE["name"]) and identifier != DEFAULT_ID:
            merged["name"] = profile.get("name") or identifier
        problems = validate(merged)
        if problems:
            raise ProfileError("; ".join(problems))
        self.directory.mkdir(parents=True, exist_ok=True)
        atomic_write(path, yaml.safe_dump(merged, sort_keys=False, allow_unicode=True))
        return merged, existed or identifier == DEFAULT_ID

    def edit(self, identifier: str, changes: dict) -> dict:
        if not self.exists(identifier):
            raise ProfileError(f"no printer profile {identifier!r} (have: {', '.join(self.ids())})")
        return self.save(merge(self.get(identifier), dict(changes, id=identifier)), allow_overwrite=True)[0]

    def delete(self, identifier: str, current: str | None = None) -> None:
        if identifier == DEFAULT_ID or identifier == self.default_id():
            raise ProfileError(f"{identifier!r} is the default profile: choose another default first")
        if current and identifier == current:
            raise ProfileError(f"{identifier!r} is the printer's current profile (printer.profile)")
        path = self._path(identifier)
        if not path.is_file():
            raise ProfileError(f"no printer profile {identifier!r} (have: {', '.join(self.ids())})")
        path.unlink()


def parse_assignment(text: str) -> tuple[list, object]:
    """``volume.width=250`` → (["volume", "width"], 250.0): the value is read as YAML (numbers, true, lists)."""
    if "=" not in text:
        raise ProfileError(f"{text!r}: expected KEY=VALUE, e.g. volume.width=250")
    key, raw = text.split("=", 1)
    path = [part for part in key.strip().split(".") if part]
    if not path:
        raise ProfileError(f"{text!r}: no key before '='")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return path, value


def nested(path: list, value) -> dict:
    result: dict = {}
    cursor = result
    for part in path[:-1]:
        cursor = cursor.setdefault(part, {})
    cursor[path[-1]] = value
    return result


def build_box(profile: dict) -> dict:
    """The printable box of a profile in G-code coordinates: its ``custom_box``, else the volume placed by its
    origin (lower left corner or bed centre)."""
    volume = profile["volume"]
    box = volume.get("custom_box")
    if isinstance(box, dict):
        return dict(box)
    width, depth, height = volume["width"], volume["depth"], volume["height"]
    if volume["origin"] == "center":
        return {"x_min": -width / 2, "x_max": width / 2, "y_min": -depth / 2, "y_max": depth / 2,
                "z_min": 0.0, "z_max": height}
    return {"x_min": 0.0, "x_max": width, "y_min": 0.0, "y_max": depth, "z_min": 0.0, "z_max": height}


def outside_volume(profile: dict, area: dict, tolerance: float = 0.01) -> list:
    """The sides of the build volume that a file's ``printingArea`` (minX..maxZ, as the analysis gives it) crosses:
    [] when every extrusion lies inside.  A circular bed is checked against its circle, not its square."""
    if not area or any(area.get(key) is None for key in ("minX", "maxX", "minY", "maxY", "minZ", "maxZ")):
        return []
    box = build_box(profile)
    crossed = [side for side, over in (
        ("x_min", area["minX"] < box["x_min"] - tolerance), ("x_max", area["maxX"] > box["x_max"] + tolerance),
        ("y_min", area["minY"] < box["y_min"] - tolerance), ("y_max", area["maxY"] > box["y_max"] + tolerance),
        ("z_min", area["minZ"] < box["z_min"] - tolerance), ("z_max", area["maxZ"] > box["z_max"] + tolerance)) if over]
    if profile["volume"]["formFactor"] == "circular" and not crossed:
        cx, cy = (box["x_min"] + box["x_max"]) / 2, (box["y_min"] + box["y_max"]) / 2
        radius = min(box["x_max"] - box["x_min"], box["y_max"] - box["y_min"]) / 2
        corners = [(x, y) for x in (area["minX"], area["maxX"]) for y in (area["minY"], area["maxY"])]
        if any(math.hypot(x - cx, y - cy) > radius + tolerance for x, y in corners):
            crossed.append("radius")
    return crossed


def selected(config) -> dict:
    """The profile this node's printer uses: ``printer.profile`` if set, else the store's default."""
    store = ProfileStore.for_config(config)
    return store.get(config.get("printer", "profile") or None)
