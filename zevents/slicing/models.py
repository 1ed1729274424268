"""3D models as the slicing service sees them before a slicer does: their type and bounding box.

Owns the check that a file given to ``zevents slice`` is a model at all (binary or ASCII STL, 3MF, OBJ) with at
least one facet, and its size, so that a file that is not a model, an empty or broken mesh and a model larger than
the printer's bed are refused with a clear reason before a slicer runs (PrusaSlicer aborts with SIGABRT on a model
that does not fit; Slic3r slices it anyway).  Reading is streamed (a 500 MB STL costs no memory) and bounded.
"""
from __future__ import annotations

import math
import re
import struct
import zipfile
from dataclasses import dataclass
from pathlib import Path

MODEL_TYPES = {".stl": "stl", ".3mf": "3mf", ".obj": "obj"}
_CHUNK = 1 << 20
_FACET = struct.Struct("<12fH")
_NUMBER = rb"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_ASCII_VERTEX = re.compile(rb"vertex\s+(" + _NUMBER + rb")\s+(" + _NUMBER + rb")\s+(" + _NUMBER + rb")")
_OBJ_VERTEX = re.compile(rb"^v\s+(" + _NUMBER + rb")\s+(" + _NUMBER + rb")\s+(" + _NUMBER + rb")", re.M)
_3MF_VERTEX = re.compile(rb"<(?:\w+:)?vertex\s+([^>]*)/?>")
_3MF_ATTR = re.compile(rb"\b([xyz])\s*=\s*\"(" + _NUMBER + rb")\"")
_3MF_TRIANGLE = re.compile(rb"<(?:\w+:)?triangle\b")


class ModelError(ValueError):
    """The file is not a model a slicer can use; the message says why."""


@dataclass
class Bounds:
    min: list
    max: list
    facets: int

    @property
    def size(self) -> tuple:
        return tuple(round(self.max[i] - self.min[i], 3) for i in range(3))


def model_type(path: str | Path) -> str:
    kind = MODEL_TYPES.get(Path(path).suffix.lower())
    if kind is None:
        raise ModelError(f"{Path(path).name}: not a model file (slicers take {', '.join(MODEL_TYPES)})")
    return kind


class _Box:
    def __init__(self):
        self.low = [math.inf] * 3
        self.high = [-math.inf] * 3

    def add(self, x: float, y: float, z: float):
        for i, value in enumerate((x, y, z)):
            if not math.isfinite(value):
                raise ModelError("the mesh has a vertex that is not a finite number")
            if value < self.low[i]:
                self.low[i] = value
            if value > self.high[i]:
                self.high[i] = value

    def bounds(self, facets: int, name: str) -> Bounds:
        if facets == 0 or self.low[0] == math.inf:
            raise ModelError(f"{name}: the mesh is empty (no facets)")
        return Bounds(self.low, self.high, facets)


def _stl(path: Path) -> Bounds:
    size = path.stat().st_size
    box = _Box()
    with path.open("rb") as handle:
        head = handle.read(84)
        if len(head) < 84 and not head.lstrip().startswith(b"solid"):
            raise ModelError(f"{path.name}: not an STL file ({size} bytes, too short for one)")
        count = struct.unpack_from("<I", head, 80)[0] if len(head) >= 84 else -1
        if count >= 0 and 84 + 50 * count == size:
            facets = 0
            while facets < count:
                block = handle.read(min(count - facets, 20_000) * 50)
                for offset in range(0, len(block), 50):
                    values = _FACET.unpack_from(block, offset)
                    box.add(*values[3:6])
                    box.add(*values[6:9])
                    box.add(*values[9:12])
                facets += len(block) // 50
            return box.bounds(facets, path.name)
        if not head.lstrip().lower().startswith(b"solid"):
            raise ModelError(f"{path.name}: not an STL file (neither binary, whose size would be 84 + 50 × "
                             f"{count} = {84 + 50 * count} bytes, nor ASCII 'solid ...')")
        handle.seek(0)
        facets = 0
        tail = b""
        while True:
            chunk = handle.read(_CHUNK)
            if not chunk:
                break
            data = tail + chunk
            cut = data.rfind(b"\n") + 1 or len(data)
            for match in _ASCII_VERTEX.finditer(data, 0, cut):
                box.add(float(match[1]), float(match[2]), float(match[3]))
            facets += data.count(b"endfacet", 0, cut)
            tail = data[cut:]
            if len(tail) > _CHUNK:
                raise ModelError(f"{path.name}: a line longer than 1 MiB is not ASCII STL")
        for match in _ASCII_VERTEX.finditer(tail):
            box.add(float(match[1]), float(match[2]), float(match[3]))
        facets += tail.count(b"endfacet")
        return box.bounds(facets, path.name)


def _obj(path: Path) -> Bounds:
    box = _Box()
    facets = 0
    tail = b""
    with path.open("rb") as handle:
        while True:
            chunk = handle.read(_CHUNK)
            data = tail + chunk
            cut = (data.rfind(b"\n") + 1 or len(data)) if chunk else len(data)
            for match in _OBJ_VERTEX.finditer(data, 0, cut):
                box.add(float(match[1]), float(match[2]), float(match[3]))
            facets += len(re.findall(rb"^f\s", data[:cut], re.M))
            tail = data[cut:]
            if not chunk:
                break
    return box.bounds(facets, path.name)


def _3mf(path: Path) -> Bounds:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as exc:
        raise ModelError(f"{path.name}: not a 3MF file (not a zip archive: {exc})") from None
    with archive:
        models = [name for name in archive.namelist() if name.lower().endswith(".model")]
        if not models:
            raise ModelError(f"{path.name}: not a 3MF file (no 3D/3dmodel.model inside)")
        box = _Box()
        facets = 0
        for name in models:
            with archive.open(name) as handle:
                tail = b""
                while True:
                    chunk = handle.read(_CHUNK)
                    data = tail + chunk
                    cut = (data.rfind(b">") + 1 or len(data)) if chunk else len(data)
                    for match in _3MF_VERTEX.finditer(data, 0, cut):
                        attrs = {key.decode(): float(value) for key, value in _3MF_ATTR.findall(match[1])}
                        if len(attrs) == 3:
                            box.add(attrs["x"], attrs["y"], attrs["z"])
                    facets += len(_3MF_TRIANGLE.findall(data, 0, cut))
                    tail = data[cut:]
                    if not chunk:
                        break
        return box.bounds(facets, path.name)


def inspect(path: str | Path) -> Bounds:
    """The model's bounding box and facet count; ModelError when it is not a usable model."""
    path = Path(path)
    kind = model_type(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such file" if not path.exists() else f"{path}: not a regular file")
    try:
        return {"stl": _stl, "obj": _obj, "3mf": _3mf}[kind](path)
    except struct.error:
        raise ModelError(f"{path.name}: a truncated STL file") from None


def check_fits(bounds: Bounds, profile: dict) -> None:
    """ModelError when the model cannot fit the printer profile's build volume (any rotation about Z aside)."""
    volume = profile["volume"]
    width, depth, height = bounds.size
    if volume["formFactor"] == "circular":
        fits_xy = math.hypot(width, depth) <= volume["width"]
    else:
        fits_xy = (width <= volume["width"] and depth <= volume["depth"]) or \
                  (depth <= volume["width"] and width <= volume["depth"])
    if not fits_xy or height > volume["height"]:
        raise ModelError(f"the model is {width:g} × {depth:g} × {height:g} mm, larger than the build volume of "
                         f"printer profile {profile['id']!r} ({volume['width']:g} × {volume['depth']:g} × "
                         f"{volume['height']:g} mm, {volume['formFactor']})")
