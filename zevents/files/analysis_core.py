"""The pure-Python G-code analyser core: the specification that the compiled core (``analysis_ccore``) must match.

``Core(limits, on_comment, sample_every)`` takes a file's bytes in any chunking (``feed``), then ``finish()``
returns the raw figures (see ``finish``).  Lines end at LF (a CR before it is ignored); the byte offset of a
line is counted from the start of the stream; only the first ``LONG_LINE`` bytes of a longer line are read.

Motion is planned the way firmware plans it (Marlin's planner, as PrusaSlicer's GCodeProcessor also simulates it):
    * each G0/G1 (and each segment of a G2/G3 arc) is a block with a distance (XYZ length, or |E| for an E-only
      move), a nominal speed (F, times the M220 factor, at least the minimum feedrate, scaled down so that no axis
      exceeds its maximum feedrate) and an acceleration (retract for E-only moves, print when extruding, travel
      otherwise; scaled down so that no axis exceeds its maximum acceleration);
    * a junction speed per block: classic jerk (per-axis speed change allowed without slowing, PrusaSlicer's
      variant of Marlin's), or junction deviation (Marlin 2 ``M205 J``, Klipper's square corner velocity);
    * look-ahead over a bounded window: once ``WINDOW`` blocks are queued, a reverse then a forward pass limit each
      entry speed to what deceleration and acceleration allow, and all but the newest ``KEEP`` blocks are timed as
      trapezoids (accelerate, cruise, decelerate) and leave the window;
    * G4 dwell and (optionally) heater waits drain the queue (the firmware stops) and add their time.

The time table: every time the committed time passes a byte offset at least ``sample_every`` bytes beyond the last
sample, a pair (offset just after the block's line, seconds elapsed until the end of that block) is recorded.

Lines that begin with ``;`` (after blanks) are passed to ``on_comment(offset, text_bytes)`` (text after the
``;``) unless it is None, except for the layer markers ``;LAYER_CHANGE`` and ``;LAYER:`` that the core counts.
"""
from __future__ import annotations

import math
import re

from zevents._parser import _rules

WINDOW = 256
KEEP = 64
ARC_SEGMENT_MM = 1.0
MAX_ARC_SEGMENTS = 100000.0
MAX_LAYER_ENTRIES = 100000  # layers listed with offset and Z (all are counted)
LONG_LINE = 1 << 20  # bytes of a line that are read; the rest of a longer line is skipped
#: a previous block slower than this (mm/s) starts the next one from its safe speed (no junction)
PREVIOUS_FEEDRATE_THRESHOLD = 0.0001
MM_PER_INCH = 25.4
LAYER_TOLERANCE = _rules.LAYER_TOLERANCE

#: limits keys; speeds in mm/s, accelerations in mm/s², per-axis lists in X Y Z E order
DEFAULT_LIMITS = {
    "max_feedrate": [500.0, 500.0, 12.0, 120.0],
    "max_acceleration": [1500.0, 1500.0, 200.0, 5000.0],
    "print_acceleration": 1250.0,
    "retract_acceleration": 1250.0,
    "travel_acceleration": 1250.0,
    "max_jerk": [8.0, 8.0, 0.4, 4.5],
    "junction_deviation": 0.0,  # > 0: junction deviation instead of classic jerk
    "minimum_feedrate": 0.0,
    "minimum_travel_feedrate": 0.0,
    "feedrate": 25.0,  # the feedrate until the file sets one (mm/s)
    "firmware_retract_length": 0.8,
    "firmware_retract_speed": 35.0,
    "heater_wait": 0.0,  # seconds added for each M109/M190 (0: not estimated, as slicers do)
    "tool_change_time": 0.0,  # seconds added for each T<n> that changes the tool
    "feedrate_mm_per_min_m203": False,  # RepRapFirmware: M203 in mm/min
}


_NUMBER = re.compile(rb"[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")
MAX_NUMBER_CHARS = 48  # a longer "number" is no number (the compiled core parses it from a fixed buffer)


def _number(text: bytes):
    """A decimal number (sign, digits, point, exponent; nothing else), or None; never inf or nan."""
    if len(text) > MAX_NUMBER_CHARS or _NUMBER.fullmatch(text) is None:
        return None
    value = float(text)
    return value if math.isfinite(value) else None


def _code_number(word: bytes):
    """The number of a command word (``G1`` -> 1, ``T12`` -> 12): 1 to 6 ASCII digits, else None."""
    digits = word[1:]
    if 0 < len(digits) <= 6 and digits.isdigit():
        return int(digits)
    return None


def parse_words(code: bytes) -> dict:
    """The parameters of a command line (comment removed): {letter upper-case: float or None}."""
    params = {}
    for word in code.split()[1:]:
        letter = chr(word[0]).upper()
        params[letter] = _number(word[1:]) if len(word) > 1 else None
    return params


def klipper_params(code: bytes) -> dict:
    """``NAME=value`` pairs of an extended command, names upper-case, numbers only."""
    params = {}
    for word in code.split()[1:]:
        name, sep, value = word.partition(b"=")
        if sep:
            number = _number(value)
            if number is not None:
                params[name.upper().decode("ascii", "replace")] = number
    return params


class Core:
    def __init__(self, limits: dict | None = None, on_comment=None, sample_every: int = 65536):
        merged = dict(DEFAULT_LIMITS)
        merged.update(limits or {})
        self.max_feedrate = [float(v) for v in merged["max_feedrate"]]
        self.max_acceleration = [float(v) for v in merged["max_acceleration"]]
        self.print_acceleration = float(merged["print_acceleration"])
        self.retract_acceleration = float(merged["retract_acceleration"])
        self.travel_acceleration = float(merged["travel_acceleration"])
        self.max_jerk = [float(v) for v in merged["max_jerk"]]
        self.junction_deviation = float(merged["junction_deviation"])
        self.square_corner_velocity = 0.0
        self.minimum_feedrate = float(merged["minimum_feedrate"])
        self.minimum_travel_feedrate = float(merged["minimum_travel_feedrate"])
        self.fw_retract_length = float(merged["firmware_retract_length"])
        self.fw_retract_speed = float(merged["firmware_retract_speed"])
        self.heater_wait = float(merged["heater_wait"])
        self.tool_change_time = float(merged["tool_change_time"])
        self.m203_per_minute = bool(merged["feedrate_mm_per_min_m203"])
        self.on_comment = on_comment
        self.sample_every = max(1, int(sample_every))

        self.pos = [0.0, 0.0, 0.0, 0.0]  # X Y Z E in mm (E per current tool, as the firmware counts it)
        self.feedrate = float(merged["feedrate"])
        self.relative_xyz = False
        self.relative_e = False
        self.units = 1.0
        self.speed_factor = 1.0
        self.tool = 0
        self.retracted = False

        # the previous move (for the junction): its nominal speed, per-axis speeds, safe speed, unit vector
        self.prev_feedrate = 0.0
        self.prev_axis_speed = [0.0, 0.0, 0.0, 0.0]
        self.prev_safe = 0.0
        self.prev_unit = None

        # look-ahead window: each block is [distance, acceleration, nominal, entry, max_entry, safe,
        # nominal_length, end_offset]
        self.blocks = []
        self.time = 0.0
        self.table = []
        self.next_sample = 0

        self.filament = [0.0]  # mm of E pushed by extruding moves, per tool
        self.filament_before_layers = [0.0]  # the part of it before the first layer marker (start G-code)
        self.print_min = [math.inf] * 3
        self.print_max = [-math.inf] * 3
        self.travel_min = [math.inf] * 3
        self.travel_max = [-math.inf] * 3
        self.layers = []  # [offset, z] by Z (first extrusion at another height, as the parser's LayerChanged)
        self.layer_z = -math.inf
        self.z_offset = 0  # offset of the line that last changed Z
        self.marker_layers = []  # [offset, z or None] from ;LAYER_CHANGE / ;LAYER:
        self.has_markers = False
        self.markers_seen = 0
        self.marker_open = False  # the last marker has had no extrusion yet
        self.marker_count = 0  # markers followed by an extrusion: the layers by marker
        self.layer_count = 0  # layers by Z
        self.time_before_layers = 0.0  # seconds until the first layer marker
        self.toolchange_phase = 0  # 1: in a wipe tower's unload, 2: after its first retraction
        self.moves = 0
        self.lines = 0
        self.size = 0
        self.carry = b""
        self.skipping = False

    # ------------------------------------------------------------------------------------------------ input
    def feed(self, data: bytes) -> None:
        data = bytes(data)
        if self.skipping:  # the rest of an over-long line
            end = data.find(b"\n")
            if end < 0:
                self.size += len(data)
                return
            self.size += end + 1
            data = data[end + 1:]
            self.skipping = False
        if self.carry:
            data = self.carry + data
            base = self.size - len(self.carry)
        else:
            base = self.size
        self.size = base + len(data)
        start = 0
        find = data.find
        line = self._line
        while True:
            end = find(b"\n", start)
            if end < 0:
                break
            line(data, start, end, base + start, base + end + 1)
            start = end + 1
        if len(data) - start > LONG_LINE:
            # an over-long line (binary data, a file without line ends): its first LONG_LINE bytes are read, the
            # rest is skipped up to its end, so memory stays bounded and nothing is copied over and over
            line(data, start, start + LONG_LINE, base + start, base + start + LONG_LINE)
            self.carry = b""
            self.skipping = True
        else:
            self.carry = data[start:]

    def _line(self, data: bytes, start: int, end: int, offset: int, next_offset: int) -> None:
        self.lines += 1
        text = data[start:end].strip()
        if not text:
            return
        if text[:1] == b";":
            body = text[1:]
            if body.startswith(b"LAYER_CHANGE") or body.startswith(b"LAYER:"):
                if not self.has_markers:
                    # the start G-code ends here: the firmware's queue is drained to know its time
                    self.drain(0.0, offset)
                    self.time_before_layers = self.time
                    self.has_markers = True
                self.markers_seen += 1
                if len(self.marker_layers) < MAX_LAYER_ENTRIES:
                    self.marker_layers.append([offset, None])
                self.marker_open = True
            elif body.startswith(b" CP TOOLCHANGE "):
                # PrusaSlicer's wipe tower: after the unload's first retraction come cooling moves and the load
                # of the next filament, which the slicer does not count as used filament
                if body.startswith(b" CP TOOLCHANGE UNLOAD"):
                    self.toolchange_phase = 1
                elif body.startswith(b" CP TOOLCHANGE WIPE") or body.startswith(b" CP TOOLCHANGE END"):
                    self.toolchange_phase = 0
            elif self.on_comment is not None:
                self.on_comment(offset, body)
            return
        code = text.split(b";", 1)[0]
        head = code[:1]
        if head in (b"G", b"g"):
            self._g(code, offset, next_offset)
        elif head in (b"M", b"m"):
            self._m(code, offset)
        elif head in (b"T", b"t"):
            self._t(code, offset)
        elif code[:18].upper() == b"SET_VELOCITY_LIMIT":
            self._velocity_limit(klipper_params(code))

    def _command_number(self, code: bytes):
        return _code_number(code.split(None, 1)[0])  # None for G29.1, a macro G1_FOO…: not ours

    # ------------------------------------------------------------------------------------------------ G
    def _g(self, code: bytes, offset: int, next_offset: int) -> None:
        number = self._command_number(code)
        if number is None:
            return
        if number in (0, 1):
            self._linear(parse_words(code), offset, next_offset)
        elif number in (2, 3):
            self._arc(parse_words(code), number == 2, offset, next_offset)
        elif number == 4:
            params = parse_words(code)
            seconds = 0.0
            if params.get("P") is not None:
                seconds = params["P"] / 1000.0
            if params.get("S") is not None:
                seconds = params["S"]
            self.drain(max(seconds, 0.0), next_offset)
        elif number == 10:
            # G10 with parameters sets tool offsets or temperatures (RepRapFirmware, CNC): only a bare G10 retracts
            if not self.retracted and not any(len(key) == 1 and "A" <= key <= "Z" for key in parse_words(code)):
                self.retracted = True
                self._firmware_retract(-1.0, offset, next_offset)
        elif number == 11:
            if self.retracted:
                self.retracted = False
                self._firmware_retract(1.0, offset, next_offset)
        elif number == 20:
            self.units = MM_PER_INCH
        elif number == 21:
            self.units = 1.0
        elif number == 28:
            params = parse_words(code)
            axes = [i for i, letter in enumerate("XYZ") if letter in params] or [0, 1, 2]
            for axis in axes:
                self.pos[axis] = 0.0
        elif number == 90:
            self.relative_xyz = False
            self.relative_e = False
        elif number == 91:
            self.relative_xyz = True
            self.relative_e = True
        elif number == 92:
            params = parse_words(code)
            if not any(letter in params for letter in "XYZE"):
                self.pos[:] = [0.0, 0.0, 0.0, 0.0]
            for axis, letter in enumerate("XYZE"):
                value = params.get(letter)
                if value is not None:
                    self.pos[axis] = value * self.units

    def _target(self, params: dict):
        target = list(self.pos)
        for axis, letter in enumerate("XYZE"):
            value = params.get(letter)
            if value is None:
                continue
            value *= self.units
            relative = self.relative_e if axis == 3 else self.relative_xyz
            target[axis] = self.pos[axis] + value if relative else value
        feed = params.get("F")
        if feed is not None and feed > 0:
            self.feedrate = feed * self.units / 60.0
        return target

    def _linear(self, params: dict, offset: int, next_offset: int) -> None:
        target = self._target(params)
        self._move_to(target, offset, next_offset)

    def _arc(self, params: dict, clockwise: bool, offset: int, next_offset: int) -> None:
        start = list(self.pos)
        target = self._target(params)
        x0, y0 = start[0], start[1]
        x1, y1 = target[0], target[1]
        i = params.get("I")
        j = params.get("J")
        r = params.get("R")
        if i is not None or j is not None:
            cx = x0 + (i or 0.0) * self.units
            cy = y0 + (j or 0.0) * self.units
        elif r is not None:
            r *= self.units
            dx, dy = x1 - x0, y1 - y0
            half = math.hypot(dx, dy) / 2.0
            if half == 0.0:
                self._move_to(target, offset, next_offset)
                return
            h = math.sqrt(max(r * r - half * half, 0.0))
            # the centre lies left of the chord for a clockwise arc with R > 0 (and right for counter-clockwise)
            sign = 1.0 if clockwise == (r < 0) else -1.0
            mx, my = (x0 + x1) / 2.0, (y0 + y1) / 2.0
            cx = mx - sign * h * dy / (2.0 * half)
            cy = my + sign * h * dx / (2.0 * half)
        else:
            self._move_to(target, offset, next_offset)
            return
        radius = math.hypot(x0 - cx, y0 - cy)
        a0 = math.atan2(y0 - cy, x0 - cx)
        a1 = math.atan2(y1 - cy, x1 - cx)
        sweep = a1 - a0
        if clockwise:
            if sweep >= -1e-9:
                sweep -= 2.0 * math.pi
        elif sweep <= 1e-9:
            sweep += 2.0 * math.pi
        length = abs(sweep) * radius
        pieces = length / ARC_SEGMENT_MM
        # a hostile arc (an absurd radius) is cut into at most MAX_ARC_SEGMENTS moves
        segments = int(min(pieces, MAX_ARC_SEGMENTS)) if math.isfinite(pieces) else 1
        if segments < 1:
            segments = 1
        dz = target[2] - start[2]
        de = target[3] - start[3]
        for n in range(1, segments):
            fraction = n / segments
            angle = a0 + sweep * fraction
            point = [cx + radius * math.cos(angle), cy + radius * math.sin(angle),
                     start[2] + dz * fraction, start[3] + de * fraction]
            self._move_to(point, offset, next_offset)
        self._move_to(target, offset, next_offset)

    def _firmware_retract(self, direction: float, offset: int, next_offset: int) -> None:
        target = list(self.pos)
        target[3] += direction * self.fw_retract_length
        saved = self.feedrate
        self.feedrate = self.fw_retract_speed
        self._move_to(target, offset, next_offset)
        self.feedrate = saved

    # ------------------------------------------------------------------------------------------------ M, T
    def _m(self, code: bytes, offset: int) -> None:
        number = self._command_number(code)
        if number is None:
            return
        if number == 82:
            self.relative_e = False
        elif number == 83:
            self.relative_e = True
        elif number in (109, 190):
            if self.heater_wait > 0.0:
                self.drain(self.heater_wait, offset)
        elif number == 201:
            params = parse_words(code)
            for axis, letter in enumerate("XYZE"):
                value = params.get(letter)
                if value is not None and value > 0:
                    self.max_acceleration[axis] = value
        elif number == 203:
            params = parse_words(code)
            scale = 1.0 / 60.0 if self.m203_per_minute else 1.0
            for axis, letter in enumerate("XYZE"):
                value = params.get(letter)
                if value is not None and value > 0:
                    self.max_feedrate[axis] = value * scale
        elif number == 204:
            params = parse_words(code)
            value = params.get("S")
            if value is not None and value > 0:
                self.print_acceleration = value
                self.travel_acceleration = value
            value = params.get("P")
            if value is not None and value > 0:
                self.print_acceleration = value
            value = params.get("R")
            if value is not None and value > 0:
                self.retract_acceleration = value
            value = params.get("T")
            if value is not None and value > 0:
                self.travel_acceleration = value
        elif number == 205:
            params = parse_words(code)
            for axis, letter in enumerate("XYZE"):
                value = params.get(letter)
                if value is not None and value >= 0:
                    self.max_jerk[axis] = value
            value = params.get("S")
            if value is not None and value >= 0:
                self.minimum_feedrate = value
            value = params.get("T")
            if value is not None and value >= 0:
                self.minimum_travel_feedrate = value
            value = params.get("J")
            if value is not None and value >= 0:
                self.junction_deviation = value
        elif number == 220:
            value = parse_words(code).get("S")
            if value is not None and value > 0:
                self.speed_factor = value / 100.0
        elif number == 566:  # RepRapFirmware: jerk in mm/min
            params = parse_words(code)
            for axis, letter in enumerate("XYZE"):
                value = params.get(letter)
                if value is not None and value >= 0:
                    self.max_jerk[axis] = value / 60.0

    def _t(self, code: bytes, offset: int) -> None:
        tool = _code_number(code.split(None, 1)[0])
        if tool is None or tool > 255 or tool == self.tool:
            return
        self.tool = tool
        while len(self.filament) <= tool:
            self.filament.append(0.0)
            self.filament_before_layers.append(0.0)
        if self.tool_change_time > 0.0:
            self.drain(self.tool_change_time, offset)

    def _velocity_limit(self, params: dict) -> None:
        # Klipper has no per-axis acceleration limit for X and Y: M204 and ACCEL set the acceleration itself
        self.max_acceleration[0] = self.max_acceleration[1] = 0.0
        value = params.get("ACCEL")
        if value is not None and value > 0:
            self.print_acceleration = self.travel_acceleration = self.retract_acceleration = value
        value = params.get("VELOCITY")
        if value is not None and value > 0:
            self.max_feedrate[0] = self.max_feedrate[1] = value
        value = params.get("SQUARE_CORNER_VELOCITY")
        if value is not None and value >= 0:
            self.square_corner_velocity = value
            self.junction_deviation = -1.0  # from the square corner velocity and each block's acceleration

    # ------------------------------------------------------------------------------------------------ planning
    def _move_to(self, target: list, offset: int, next_offset: int) -> None:
        pos = self.pos
        dx = target[0] - pos[0]
        dy = target[1] - pos[1]
        dz = target[2] - pos[2]
        de = target[3] - pos[3]
        xyz_moved = dx != 0.0 or dy != 0.0 or dz != 0.0
        if xyz_moved:
            if dz != 0.0:
                self.z_offset = offset
            for axis in range(3):
                value = pos[axis]
                if value < self.travel_min[axis]:
                    self.travel_min[axis] = value
                if value > self.travel_max[axis]:
                    self.travel_max[axis] = value
                value = target[axis]
                if value < self.travel_min[axis]:
                    self.travel_min[axis] = value
                if value > self.travel_max[axis]:
                    self.travel_max[axis] = value
        if de < 0.0 and not xyz_moved and self.toolchange_phase == 1:
            self.toolchange_phase = 2
        if de > 0.0 and xyz_moved and self.toolchange_phase != 2:
            # as slicers count it: what extruding moves push (retracts and their recovery cancel out)
            self.filament[self.tool] += de
            if not self.has_markers:
                self.filament_before_layers[self.tool] += de
            if dx != 0.0 or dy != 0.0:
                for axis in range(3):
                    for value in (pos[axis], target[axis]):
                        if value < self.print_min[axis]:
                            self.print_min[axis] = value
                        if value > self.print_max[axis]:
                            self.print_max[axis] = value
                z = target[2]
                if abs(z - self.layer_z) > LAYER_TOLERANCE:  # the parser's LayerChanged rule, so totals agree
                    self.layer_z = z
                    self.layer_count += 1
                    if len(self.layers) < MAX_LAYER_ENTRIES:
                        self.layers.append([self.z_offset, z])
                if self.marker_open:  # the first extrusion after a marker gives that layer its Z
                    self.marker_open = False
                    self.marker_count += 1
                    if self.markers_seen == len(self.marker_layers):
                        self.marker_layers[-1][1] = z
        self.pos = target
        self._plan(dx, dy, dz, de, next_offset)

    def _plan(self, dx: float, dy: float, dz: float, de: float, end_offset: int) -> None:
        xyz = dx * dx + dy * dy + dz * dz
        if xyz > 0.0:
            distance = math.sqrt(xyz)
        else:
            distance = abs(de)
        if distance <= 0.0:
            return
        self.moves += 1
        delta = (dx, dy, dz, de)
        extruding = de != 0.0 and xyz > 0.0
        feedrate = self.feedrate * self.speed_factor
        minimum = self.minimum_feedrate if de != 0.0 else self.minimum_travel_feedrate
        if feedrate < minimum:
            feedrate = minimum
        inverse = 1.0 / distance
        # the nominal speed, slowed so that no axis exceeds its maximum feedrate
        for axis in range(4):
            component = abs(delta[axis]) * inverse * feedrate
            limit = self.max_feedrate[axis]
            if component > limit > 0.0:
                feedrate *= limit / component
        if xyz == 0.0:
            acceleration = self.retract_acceleration
        elif extruding:
            acceleration = self.print_acceleration
        else:
            acceleration = self.travel_acceleration
        for axis in range(4):
            share = abs(delta[axis]) * inverse
            limit = self.max_acceleration[axis]
            if share > 0.0 and limit > 0.0 and acceleration * share > limit:
                acceleration = limit / share
        axis_speed = [delta[axis] * inverse * feedrate for axis in range(4)]

        if self.junction_deviation != 0.0:
            safe, vmax_junction = self._junction_deviation(axis_speed, feedrate, acceleration, inverse, delta)
        else:
            safe, vmax_junction = self._junction_jerk(axis_speed, feedrate)

        allowable = math.sqrt(safe * safe + 2.0 * acceleration * distance)
        entry = min(vmax_junction, allowable)
        self.blocks.append([distance, acceleration, feedrate, entry, vmax_junction, safe,
                            feedrate <= allowable, end_offset])
        self.prev_feedrate = feedrate
        self.prev_axis_speed = axis_speed
        self.prev_safe = safe
        if len(self.blocks) >= WINDOW:
            self._commit(KEEP)

    def _junction_jerk(self, axis_speed: list, feedrate: float):
        safe = feedrate
        for axis in range(4):
            jerk = abs(axis_speed[axis])
            limit = self.max_jerk[axis]
            if jerk > limit and safe > limit:
                safe = limit
        vmax_junction = safe
        previous = self.prev_feedrate
        if self.blocks and previous > PREVIOUS_FEEDRATE_THRESHOLD:
            previous_faster = previous > feedrate
            factor = feedrate / previous if previous_faster else previous / feedrate
            vmax_junction = feedrate if previous_faster else previous
            v_factor = 1.0
            limited = False
            for axis in range(4):
                v_exit = self.prev_axis_speed[axis]
                v_entry = axis_speed[axis]
                if previous_faster:
                    v_exit *= factor
                if limited:
                    v_exit *= v_factor
                    v_entry *= v_factor
                # coasting the same way the jerk is the speed difference; reversing, the larger of the two
                if v_exit > v_entry:
                    jerk = v_exit - v_entry if (v_entry > 0.0 or v_exit < 0.0) else max(v_exit, -v_entry)
                else:
                    jerk = v_entry - v_exit if (v_entry < 0.0 or v_exit > 0.0) else max(-v_exit, v_entry)
                limit = self.max_jerk[axis]
                if jerk > limit:
                    v_factor *= limit / jerk
                    limited = True
            if limited:
                vmax_junction *= v_factor
            threshold = vmax_junction * 0.99
            if self.prev_safe > threshold and safe > threshold:
                vmax_junction = safe
        return safe, vmax_junction

    def _junction_deviation(self, axis_speed: list, feedrate: float, acceleration: float, inverse: float,
                            delta: tuple):
        if self.junction_deviation < 0.0:  # Klipper: from the square corner velocity
            scv = self.square_corner_velocity
            deviation = scv * scv * (math.sqrt(2.0) - 1.0) / acceleration
        else:
            deviation = self.junction_deviation
        # start and end from (nearly) standing still, as Marlin's minimum planner speed
        safe = min(feedrate, 0.05 if deviation > 0.0 else feedrate)
        unit = (delta[0] * inverse, delta[1] * inverse, delta[2] * inverse)
        vmax_junction = safe
        previous_unit = self.prev_unit
        if unit[0] == 0.0 and unit[1] == 0.0 and unit[2] == 0.0:
            unit = None
        if self.blocks and previous_unit is not None and unit is not None and \
                self.prev_feedrate > PREVIOUS_FEEDRATE_THRESHOLD:
            cos_theta = -(previous_unit[0] * unit[0] + previous_unit[1] * unit[1] + previous_unit[2] * unit[2])
            if cos_theta > 0.999999:
                vmax_junction = safe
            else:
                if cos_theta < -0.999999:
                    junction = math.inf
                else:
                    sin_half = math.sqrt(0.5 * (1.0 - cos_theta))
                    junction = math.sqrt(acceleration * deviation * sin_half / (1.0 - sin_half))
                vmax_junction = min(junction, feedrate, self.prev_feedrate)
                if vmax_junction < safe:
                    vmax_junction = safe
        self.prev_unit = unit
        return safe, vmax_junction

    def _commit(self, keep: int) -> None:
        """Look-ahead over the window, then time every block but the newest ``keep``."""
        blocks = self.blocks
        count = len(blocks)
        sqrt = math.sqrt
        # reverse pass: an entry may be as fast as its junction allows and decelerating to the next entry allows
        following = blocks[count - 1]
        for index in range(count - 2, -1, -1):
            block = blocks[index]
            if block[3] != block[4]:
                if not block[6] and block[4] > following[3]:
                    block[3] = min(block[4], sqrt(following[3] * following[3] + 2.0 * block[1] * block[0]))
                else:
                    block[3] = block[4]
            following = block
        # forward pass: no entry faster than accelerating from the previous entry allows
        previous = blocks[0]
        for index in range(1, count):
            block = blocks[index]
            if not previous[6] and previous[3] < block[3]:
                reachable = sqrt(previous[3] * previous[3] + 2.0 * previous[1] * previous[0])
                if reachable < block[3]:
                    block[3] = reachable
            previous = block
        done = count - keep
        elapsed = self.time
        table = self.table
        for index in range(done):
            block = blocks[index]
            exit_speed = blocks[index + 1][3] if index + 1 < count else block[5]
            elapsed += trapezoid_time(block[0], block[1], block[2], block[3], exit_speed)
            if block[7] >= self.next_sample:
                table.append((block[7], elapsed))
                self.next_sample = block[7] + self.sample_every
        self.time = elapsed
        del blocks[:done]

    def drain(self, extra_seconds: float, offset: int) -> None:
        """The firmware empties its queue (a dwell, a wait): time every block, then add ``extra_seconds``."""
        if self.blocks:
            self._commit(0)
        if extra_seconds > 0.0:
            self.time += extra_seconds
            if offset >= self.next_sample:
                self.table.append((offset, self.time))
                self.next_sample = offset + self.sample_every

    # ------------------------------------------------------------------------------------------------ result
    def finish(self) -> dict:
        """The figures: time (s), filament per tool (net mm of E), bounding boxes (None when nothing moved or
        extruded), layers [[offset, z]] by Z and by marker, time table [(offset, seconds)], moves, lines, size."""
        if self.carry:
            rest, self.carry = self.carry, b""
            self._line(rest, 0, len(rest), self.size - len(rest), self.size)
        self.drain(0.0, self.size)
        if not self.table or self.table[-1][0] != self.size:
            self.table.append((self.size, self.time))
        return {
            "time": self.time,
            "time_before_layers": self.time_before_layers,
            "filament": list(self.filament),
            "filament_before_layers": list(self.filament_before_layers),
            "print_box": _box(self.print_min, self.print_max),
            "travel_box": _box(self.travel_min, self.travel_max),
            "layer_count": self.layer_count,
            "marker_count": self.marker_count,
            "layers": [list(layer) for layer in self.layers],
            "marker_layers": [list(layer) for layer in self.marker_layers],
            "table": [list(pair) for pair in self.table],
            "moves": self.moves,
            "lines": self.lines,
            "size": self.size,
        }


def _box(low: list, high: list):
    if low[0] == math.inf:
        return None
    return {"min": list(low), "max": list(high)}


def trapezoid_time(distance: float, acceleration: float, nominal: float, entry: float, exit_speed: float) -> float:
    """Seconds to travel ``distance`` starting at ``entry``, ending at ``exit_speed``, at most ``nominal``."""
    if acceleration <= 0.0:
        return distance / nominal if nominal > 0.0 else 0.0
    if entry > nominal:
        entry = nominal
    if exit_speed > nominal:
        exit_speed = nominal
    twice_a = 2.0 * acceleration
    accelerate = (nominal * nominal - entry * entry) / twice_a
    decelerate = (nominal * nominal - exit_speed * exit_speed) / twice_a
    cruise = distance - accelerate - decelerate
    if cruise < 0.0:
        # no cruise: accelerate until the point where decelerating to the exit speed must begin
        accelerate = (2.0 * acceleration * distance - entry * entry + exit_speed * exit_speed) / (4.0 * acceleration)
        if accelerate < 0.0:
            accelerate = 0.0
        elif accelerate > distance:
            accelerate = distance
        peak = math.sqrt(entry * entry + twice_a * accelerate)
        peak_down = peak * peak - twice_a * (distance - accelerate)
        exit_reached = math.sqrt(peak_down) if peak_down > 0.0 else 0.0
        return (peak - entry) / acceleration + (peak - exit_reached) / acceleration
    return (nominal - entry) / acceleration + cruise / nominal + (nominal - exit_speed) / acceleration
