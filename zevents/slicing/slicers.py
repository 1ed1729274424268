"""The command-line slicers zevents drives: PrusaSlicer, Slic3r and CuraEngine, as Debian packages them.

Owns, per slicer: finding its program and version, the argv of one slicing run (profile, printer profile's bed,
nozzle and extruder count, output), and reading its progress and its error from what it prints.  Nothing here runs
a slicer: :mod:`zevents.slicing.jobs` does, without a shell, niced and with a timeout.

Slicer ids are ``prusaslicer``, ``slic3r`` and ``curaengine`` (config ``slicing.<id>.path`` overrides the program;
CuraEngine also needs Cura's machine definitions: ``slicing.curaengine.definitions``, the environment variable
``ZEVENTS_CURA_RESOURCES``, or the folders of Debian's ``cura`` package).
"""
from __future__ import annotations

import math
import os
import re
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

CURA_DEFINITION_DIRS = ("/usr/share/cura/resources",)


@dataclass
class Slicer:
    id: str
    name: str
    programs: tuple
    package: str
    profile_suffix: str
    progress_available: bool
    path: str | None = None
    version: str | None = None
    problem: str | None = None
    extra: dict = field(default_factory=dict)

    @property
    def available(self) -> bool:
        return self.path is not None and self.problem is None

    def install_hint(self) -> str:
        return f"install Debian's {self.package} (apt-get install {self.package}) or set slicing.{self.id}.path"

    def as_dict(self) -> dict:
        return {"id": self.id, "name": self.name, "path": self.path, "version": self.version,
                "available": self.available, "problem": self.problem,
                "progressAvailable": self.progress_available,
                "hint": None if self.available else (self.problem or self.install_hint())}


def _find_program(configured: str | None, names: tuple) -> str | None:
    if configured:
        return configured if os.access(configured, os.X_OK) else shutil.which(configured)
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return None


_VERSION_PATTERNS = {
    "prusaslicer": (["--help"], re.compile(r"PrusaSlicer-([\w.+-]+)")),
    "slic3r": (["--version"], re.compile(r"^(\d+\.\d+[\w.+-]*)", re.M)),
    "curaengine": (["help"], re.compile(r"version\s+([\w.+-]+)")),
}


def _version(slicer_id: str, program: str) -> str | None:
    args, pattern = _VERSION_PATTERNS[slicer_id]
    try:
        done = subprocess.run([program, *args], capture_output=True, text=True, timeout=5,
                              stdin=subprocess.DEVNULL, errors="replace")
    except (OSError, subprocess.TimeoutExpired):
        return None
    match = pattern.search(done.stdout + done.stderr)
    return match[1] if match else None


def cura_definitions(config) -> str | None:
    """The folder holding Cura's ``definitions`` and ``extruders`` (configured, or Debian's cura package)."""
    configured = config.get("slicing", "curaengine", "definitions") if config is not None else None
    from_env = os.environ.get("ZEVENTS_CURA_RESOURCES")
    for candidate in [c for c in (configured, from_env) if c] + list(CURA_DEFINITION_DIRS):
        root = Path(os.path.expanduser(candidate))
        if (root / "definitions" / "fdmprinter.def.json").is_file():
            return str(root)
    return None


def _blank(slicer_id: str) -> Slicer:
    return {
        "prusaslicer": lambda: Slicer("prusaslicer", "PrusaSlicer", ("prusa-slicer", "PrusaSlicer"), "prusa-slicer",
                                      ".ini", True),
        "slic3r": lambda: Slicer("slic3r", "Slic3r", ("slic3r",), "slic3r", ".ini", True),
        "curaengine": lambda: Slicer("curaengine", "CuraEngine", ("CuraEngine",), "cura-engine", ".json", True),
    }[slicer_id]()


SLICER_IDS = ("prusaslicer", "slic3r", "curaengine")


def find(slicer_id: str, config=None, with_version: bool = True) -> Slicer:
    if slicer_id not in SLICER_IDS:
        raise KeyError(f"unknown slicer {slicer_id!r} (zevents knows {', '.join(SLICER_IDS)})")
    slicer = _blank(slicer_id)
    configured = config.get("slicing", slicer_id, "path") if config is not None else None
    slicer.path = _find_program(configured, slicer.programs)
    if slicer.path is None:
        slicer.problem = f"{slicer.name} not found: {slicer.install_hint()}"
        return slicer
    if with_version:
        slicer.version = _version(slicer_id, slicer.path)
    if slicer_id == "curaengine":
        definitions = cura_definitions(config)
        if definitions is None:
            slicer.problem = ("Cura's machine definitions not found: install Debian's cura package, or unpack its "
                              "resources (apt-get download cura; dpkg -x cura_*.deb DIR) and set "
                              "slicing.curaengine.definitions: DIR/usr/share/cura/resources")
        slicer.extra["definitions"] = definitions
    return slicer


def find_all(config=None) -> list:
    return [find(slicer_id, config) for slicer_id in SLICER_IDS]


# --- the argv of one run ------------------------------------------------------------------------------------------

def _bed_polygon(volume: dict) -> str:
    width, depth = volume["width"], volume["depth"]
    x0, y0 = (-width / 2, -depth / 2) if volume["origin"] == "center" else (0.0, 0.0)
    if volume["formFactor"] == "circular":
        points = [(x0 + width / 2 + width / 2 * math.cos(2 * math.pi * i / 64),
                   y0 + depth / 2 + depth / 2 * math.sin(2 * math.pi * i / 64)) for i in range(64)]
    else:
        points = [(x0, y0), (x0 + width, y0), (x0 + width, y0 + depth), (x0, y0 + depth)]
    return ",".join(f"{x:g}x{y:g}" for x, y in points)


def _bed_center(volume: dict) -> str:
    if volume["origin"] == "center":
        return "0,0"
    return f"{volume['width'] / 2:g},{volume['depth'] / 2:g}"


def command(slicer: Slicer, model: str, profile_path: str | None, printer_profile: dict, output: str,
            overrides: dict | None = None, bounds=None) -> tuple[list, dict]:
    """The argv and extra environment that slice ``model`` into ``output``.  The printer profile's bed, nozzle and
    extruder count come after the slicing profile, so they win: the G-code fits the printer it is for."""
    volume = printer_profile["volume"]
    extruder = printer_profile["extruder"]
    nozzles = ",".join(f"{extruder['nozzleDiameter']:g}" for _ in range(extruder["count"]))
    overrides = dict(overrides or {})
    env: dict = {}
    if slicer.id == "prusaslicer":
        argv = [slicer.path, "--loglevel", "1"]
        if profile_path:
            argv += ["--load", profile_path]
        argv += ["--bed-shape", _bed_polygon(volume), "--max-print-height", f"{volume['height']:g}",
                 "--nozzle-diameter", nozzles, "--center", _bed_center(volume)]
        for key, value in overrides.items():
            argv += [f"--{key.replace('_', '-')}", str(value)]
        argv += ["--export-gcode", "--output", output, model]
    elif slicer.id == "slic3r":
        argv = [slicer.path, "--no-gui"]
        if profile_path:
            argv += ["--load", profile_path]
        argv += ["--bed-shape", _bed_polygon(volume), "--nozzle-diameter", nozzles,
                 "--print-center", _bed_center(volume)]
        for key, value in overrides.items():
            argv += [f"--{key.replace('_', '-')}", str(value)]
        argv += ["--output", output, model]
    else:
        definitions = slicer.extra.get("definitions") or ""
        env["CURA_ENGINE_SEARCH_PATH"] = os.pathsep.join(
            str(Path(definitions) / sub) for sub in ("definitions", "extruders"))
        settings, definition = {}, "fdmprinter"
        if profile_path:
            import json

            data = json.loads(Path(profile_path).read_text(encoding="utf-8"))
            definition = data.get("definition") or definition
            settings.update(data.get("settings") or {})
        settings.update({
            "machine_width": f"{volume['width']:g}", "machine_depth": f"{volume['depth']:g}",
            "machine_height": f"{volume['height']:g}", "machine_nozzle_size": f"{extruder['nozzleDiameter']:g}",
            "machine_extruder_count": str(extruder["count"]),
            "machine_center_is_zero": "true" if volume["origin"] == "center" else "false",
            "machine_shape": "elliptic" if volume["formFactor"] == "circular" else "rectangular",
        })
        settings.update({key: str(value) for key, value in overrides.items()})
        definition_path = definition if definition.endswith(".json") else \
            str(Path(definitions) / "definitions" / f"{definition}.def.json")
        argv = [slicer.path, "slice", "-v", "-p", "-j", definition_path]
        for key, value in settings.items():
            argv += ["-s", f"{key}={value}"]
        # CuraEngine places a mesh's own origin at the bed's centre: shift the model so that its bounding box is
        # centred there and stands on the bed, as the other two slicers arrange it
        if bounds is not None:
            argv += ["-s", f"mesh_position_x={-(bounds.min[0] + bounds.max[0]) / 2:g}",
                     "-s", f"mesh_position_y={-(bounds.min[1] + bounds.max[1]) / 2:g}",
                     "-s", f"mesh_position_z={-bounds.min[2]:g}"]
        argv += ["-l", model, "-o", output]
    return argv, env


# --- what a slicer prints -----------------------------------------------------------------------------------------

_PRUSA_PROGRESS = re.compile(r"^(\d{1,3}) => ")
_SLIC3R_STAGES = {"Processing triangulated mesh": 10, "Generating perimeters": 20, "Preparing infill": 30,
                  "Infilling layers": 70, "Generating skirt": 88, "Generating brim": 89, "Exporting G-code": 90}
_CURA_PROGRESS = re.compile(r"^Progress:[\w-]+:\d+:\d+\s+([\d.]+)%")
_CURA_DONE = re.compile(r"^Progress:process:1:1")


def progress(slicer_id: str, line: str) -> float | None:
    """The fraction done (0..1) that a line of the slicer's output reports, or None."""
    line = line.strip()
    if slicer_id == "prusaslicer":
        match = _PRUSA_PROGRESS.match(line)
        return min(int(match[1]), 100) / 100 if match else None
    if slicer_id == "slic3r":
        for stage, percent in _SLIC3R_STAGES.items():
            if line.startswith(f"=> {stage}"):
                return percent / 100
        return None
    match = _CURA_PROGRESS.match(line)
    if match:
        # CuraEngine prints the fraction followed by a '%' sign (0.5% means half)
        return min(max(float(match[1]), 0.0), 1.0)
    return None


_ERROR_LINE = re.compile(r"(\[error\]|error|failed|could not|terminate called|what\(\)|exception|not found)",
                         re.I)
_LOG_PREFIX = re.compile(r"^\[[^\]]*\]\s*\[[^\]]*\]\s*(?:\[\w+\]\s*)?")


def error_message(output: str) -> str:
    """The slicer's own words about why it failed: the last lines that look like an error."""
    raw = [line for line in output.splitlines() if line.strip()]
    errors = [_LOG_PREFIX.sub("", line).strip() for line in raw if _ERROR_LINE.search(line)]
    chosen = errors[-3:] if errors else [_LOG_PREFIX.sub("", line).strip() for line in raw][-3:]
    return " / ".join(dict.fromkeys(chosen))[:1000]
