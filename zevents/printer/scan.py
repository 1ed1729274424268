"""What a print job must know about a local file before its first line is sent, from one pass over its bytes:
the first command too long for the printer (``printer.max_line``) and the slicer's layer markers (how many, and
of which form); and ``MarkerLayers``, which turns those markers into the job's LayerChanged events.

The pass runs at C speed (regular expressions over 1 MB chunks; only candidate lines are looked at in Python), so
a job can afford it at start even for a file of hundreds of megabytes.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from zevents.parser import Event
from zevents.printer.link import is_message, strip_line

CHUNK = 1 << 20

#: Layer markers by form, whole comment lines: PrusaSlicer, SuperSlicer, OrcaSlicer, Bambu Studio and CrealityPrint
#: write ";LAYER_CHANGE" (then ";Z:<z>"), Cura and CrealityPrint's Cura engine ";LAYER:<n>" (numbered from 0, or
#: negative under a raft), Simplify3D "; layer <n>, Z = <z>".
MARKERS = {
    "layer_change": rb"^;LAYER_CHANGE[ \t]*\r?$",
    "cura": rb"^;LAYER:-?[0-9]+[ \t]*\r?$",
    "simplify3d": rb"^; layer -?[0-9]+, Z = [-+0-9.]+",
}
_MARKER_SCAN = {form: re.compile(pattern, re.MULTILINE) for form, pattern in MARKERS.items()}
_MARKER_LINE = {form: re.compile(pattern.decode()) for form, pattern in MARKERS.items()}
_MARKER_Z = re.compile(r"^;\s*Z:\s*([-+]?[0-9]*\.?[0-9]+)|, Z = ([-+]?[0-9]*\.?[0-9]+)")


@dataclass
class FileScan:
    size: int = 0
    #: layer markers of each form found (the file's form is the one with most)
    markers: dict | None = None

    @property
    def marker_form(self) -> str | None:
        if not self.markers or not max(self.markers.values()):
            return None
        return max(self.markers, key=lambda form: self.markers[form])

    @property
    def layers(self) -> int | None:
        """The file's layer count by its markers, None without markers."""
        form = self.marker_form
        return self.markers[form] if form else None
    #: (line number from 1, command length, command start) of the first over-long line that is not a message
    too_long: tuple | None = None


def scan_file(path: str, max_line: int) -> FileScan:
    """One pass over ``path`` (see the module docstring)."""
    result = FileScan(markers=dict.fromkeys(MARKERS, 0))
    # A line with more than max_line bytes may be too long (its comment and blanks do not count: look closer).
    candidate = re.compile(rb"[^\n]{%d,}" % (max_line + 1)) if max_line else None
    carry = b""
    line_base = 0  # lines before the chunk being looked at
    with open(path, "rb") as handle:
        while True:
            data = handle.read(CHUNK)
            result.size += len(data)
            chunk = carry + data
            if data:
                cut = chunk.rfind(b"\n") + 1
                if cut == 0 and len(chunk) < (64 << 20):
                    carry = chunk  # one long line so far: read on (up to 64 MB, then look at what is there)
                    continue
                if cut == 0:
                    cut = len(chunk)
                chunk, carry = chunk[:cut], chunk[cut:]
            else:
                carry = b""
            if not chunk:
                break
            if candidate is not None and result.too_long is None:
                for match in candidate.finditer(chunk):
                    line = strip_line(match.group().decode("utf-8", "replace"))
                    if len(line) > max_line and not is_message(line):
                        result.too_long = (line_base + chunk.count(b"\n", 0, match.start()) + 1, len(line),
                                           line[:24])
                        break
            if b";" in chunk:
                for form, pattern in _MARKER_SCAN.items():
                    result.markers[form] += len(pattern.findall(chunk))
            line_base += chunk.count(b"\n")
            if not data:
                break
    return result


class MarkerLayers:
    """LayerChanged by the file's own layer markers, for a job whose file has them: the parser's height-based
    LayerChanged (which counts a purge line at Z 0.4, 0.3, 0.2 as layers) are dropped, and each marker gives one
    event, ``layer`` numbered from 1, ``total`` the file's marker count, ``z`` the marker's height (";Z:" after
    ";LAYER_CHANGE", Simplify3D's "Z = ") or else the height of the layer's first extruding move.  The event is
    published with that first extruding move (after its ZChange), as the parser's own would be."""

    def __init__(self, form: str, total: int | None):
        self.pattern = _MARKER_LINE[form]
        self.total = total
        self.layer = 0
        self.z: float | None = None
        self.pending = False
        self.marker_z: float | None = None
        self.filament_at_marker = 0.0

    def events(self, raw: str, found: list, parser) -> list:
        """The gcode events to publish for the line ``raw`` the parser made ``found`` of."""
        if found:
            found = [event for event in found if event.name != "LayerChanged"]
        head = raw.lstrip()
        if head[:1] == ";":
            if self.pattern.match(head):
                self.pending, self.marker_z = True, self._z(head)
                self.filament_at_marker = parser.state.filament if parser is not None else 0.0
            elif self.pending and self.marker_z is None:
                self.marker_z = self._z(head)
            return found
        if not self.pending or head[:1] not in ("G", "g"):
            return found
        state = parser.state if parser is not None else None
        if state is not None and state.filament <= self.filament_at_marker + 1e-9:
            return found  # not extruding yet (travel, retract, unretract back to where it was)
        z = self.marker_z if self.marker_z is not None else (state.z if state is not None else None)
        self.layer += 1
        found = list(found)
        found.append(Event("LayerChanged", {"layer": self.layer, "z": z, "old_z": self.z, "total": self.total}, 0, 0))
        self.z, self.pending, self.marker_z = z, False, None
        return found

    @staticmethod
    def _z(line: str) -> float | None:
        match = _MARKER_Z.search(line)
        if match is None:
            return None
        try:
            return float(match.group(1) or match.group(2))
        except ValueError:
            return None
