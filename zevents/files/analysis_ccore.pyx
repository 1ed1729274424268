# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The compiled G-code analyser core: the same figures as ``analysis_core`` (the specification), fast.

Lines are walked with a ``const unsigned char*`` over the caller's bytes, the machine and planner state lives in C
(the look-ahead window is a fixed array of blocks), and no Python object is made for a move line.  Comment lines
go to ``on_comment`` as bytes, as the twin does.  Numbers are checked against the twin's syntax (sign, digits,
point, exponent, at most ``MAX_NUMBER_CHARS``) and converted by ``PyOS_string_to_double`` (what Python's float()
uses), so both read the same values; the planning does the same floating-point operations in the same order (the
build must not fuse multiply-adds: setup.py passes -ffp-contract=off), so the tests compare the twins' floats
exactly.
"""
cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from libc.math cimport atan2, cos, fabs, hypot, isfinite, sin, sqrt, INFINITY, M_PI
from libc.string cimport memchr, memcmp, memcpy

from zevents.files import analysis_core as _spec

from cpython.ref cimport PyObject

cdef extern from "Python.h":
    # with no exception given, an overflow returns an infinity (refused as the twin refuses it) and raises nothing
    double PyOS_string_to_double(const char *s, char **endptr, PyObject* overflow_exception) except? -1.0

DEF WINDOW = 256
DEF KEEP = 64
DEF MAX_NUMBER = 48
DEF LONG_LINE = 1 << 20

cdef double ARC_SEGMENT_MM = _spec.ARC_SEGMENT_MM
cdef double MAX_ARC_SEGMENTS = _spec.MAX_ARC_SEGMENTS
cdef const char* AXES = b"XYZE"
cdef double PREVIOUS_FEEDRATE_THRESHOLD = _spec.PREVIOUS_FEEDRATE_THRESHOLD
cdef double MM_PER_INCH = _spec.MM_PER_INCH
cdef double LAYER_TOLERANCE = _spec.LAYER_TOLERANCE
cdef Py_ssize_t MAX_LAYER_ENTRIES = _spec.MAX_LAYER_ENTRIES
assert _spec.WINDOW == WINDOW and _spec.KEEP == KEEP and _spec.MAX_NUMBER_CHARS == MAX_NUMBER
assert _spec.LONG_LINE == LONG_LINE


cdef struct Block:
    double distance
    double acceleration
    double nominal
    double entry
    double max_entry
    double safe
    bint nominal_length
    long long end_offset


cdef struct Params:
    bint has[26]      # the letter appears
    bint valid[26]    # with a number
    double value[26]
    int letters       # ASCII letters seen


cdef inline bint is_space(unsigned char c) nogil:
    # what bytes.split() and bytes.strip() take for whitespace
    return c == 32 or (9 <= c <= 13)


cdef inline bint is_digit(unsigned char c) nogil:
    return 48 <= c <= 57


cdef double POWERS_OF_TEN[23]
POWERS_OF_TEN[:] = [1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15, 1e16,
                    1e17, 1e18, 1e19, 1e20, 1e21, 1e22]


cdef bint read_number(const unsigned char* p, Py_ssize_t n, double* out):
    """The twin's ``_number``: the whole of p[0:n] is a decimal, finite; False otherwise.

    Without an exponent and with at most 15 significant digits (so the integer m < 2**53) and 22 decimals, the
    value is m / 10**k, both exact doubles: one IEEE division, correctly rounded, exactly what float() returns.
    Anything else goes to PyOS_string_to_double (what float() uses)."""
    cdef Py_ssize_t i = 0
    cdef Py_ssize_t digits = 0
    cdef Py_ssize_t decimals = 0
    cdef unsigned long long mantissa = 0
    cdef bint negative = False
    cdef char buffer[MAX_NUMBER + 1]
    cdef double value
    if n <= 0 or n > MAX_NUMBER:
        return False
    if p[0] == 43 or p[0] == 45:  # + -
        negative = p[0] == 45
        i = 1
    while i < n and is_digit(p[i]):
        mantissa = mantissa * 10 + (p[i] - 48)
        i += 1
        digits += 1
    if i < n and p[i] == 46:  # .
        i += 1
        while i < n and is_digit(p[i]):
            mantissa = mantissa * 10 + (p[i] - 48)
            i += 1
            digits += 1
            decimals += 1
    if digits == 0:
        return False
    if i == n and digits <= 15:
        value = <double>mantissa / POWERS_OF_TEN[decimals]
        out[0] = -value if negative else value
        return True
    if i < n and (p[i] == 101 or p[i] == 69):  # e E
        i += 1
        if i < n and (p[i] == 43 or p[i] == 45):
            i += 1
        if i >= n or not is_digit(p[i]):
            return False
        while i < n and is_digit(p[i]):
            i += 1
    if i != n:
        return False
    memcpy(buffer, p, n)
    buffer[n] = 0
    value = PyOS_string_to_double(buffer, NULL, NULL)
    if not isfinite(value):
        return False
    out[0] = value
    return True


cdef void parse_words(const unsigned char* p, Py_ssize_t n, Params* params):
    """The twin's ``parse_words`` over the code part p[0:n] (the first word, the command, is skipped)."""
    cdef Py_ssize_t i = 0
    cdef Py_ssize_t start
    cdef int index
    cdef unsigned char letter
    cdef double value = 0.0
    for index in range(26):
        params.has[index] = False
        params.valid[index] = False
    params.letters = 0
    while i < n and is_space(p[i]):
        i += 1
    while i < n and not is_space(p[i]):
        i += 1
    while True:
        while i < n and is_space(p[i]):
            i += 1
        if i >= n:
            return
        start = i
        while i < n and not is_space(p[i]):
            i += 1
        letter = p[start]
        if 97 <= letter <= 122:
            letter -= 32
        if not (65 <= letter <= 90):
            continue
        index = letter - 65
        if not params.has[index]:
            params.letters += 1
        params.has[index] = True
        params.valid[index] = read_number(p + start + 1, i - start - 1, &value)
        if params.valid[index]:
            params.value[index] = value


cdef inline bint param(Params* params, char letter, double* out):
    cdef int index = letter - 65
    if params.valid[index]:
        out[0] = params.value[index]
        return True
    return False


cdef int code_number(const unsigned char* p, Py_ssize_t n):
    """The twin's ``_code_number`` of the first word of p[0:n]: 1 to 6 digits after its letter, else -1."""
    cdef Py_ssize_t i = 1
    cdef int number = 0
    while i < n and not is_space(p[i]):
        if not is_digit(p[i]) or i > 6:
            return -1
        number = number * 10 + (p[i] - 48)
        i += 1
    if i == 1:
        return -1
    return number


cdef inline bint starts(const unsigned char* p, Py_ssize_t n, const char* text, Py_ssize_t length):
    return n >= length and memcmp(p, text, length) == 0


cdef double trapezoid_time(double distance, double acceleration, double nominal, double entry, double exit_speed):
    cdef double twice_a, accelerate, decelerate, cruise, peak, peak_down, exit_reached
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
        accelerate = (2.0 * acceleration * distance - entry * entry + exit_speed * exit_speed) / (4.0 * acceleration)
        if accelerate < 0.0:
            accelerate = 0.0
        elif accelerate > distance:
            accelerate = distance
        peak = sqrt(entry * entry + twice_a * accelerate)
        peak_down = peak * peak - twice_a * (distance - accelerate)
        exit_reached = sqrt(peak_down) if peak_down > 0.0 else 0.0
        return (peak - entry) / acceleration + (peak - exit_reached) / acceleration
    return (nominal - entry) / acceleration + cruise / nominal + (nominal - exit_speed) / acceleration


cdef class Core:
    cdef double max_feedrate[4]
    cdef double max_acceleration[4]
    cdef double max_jerk[4]
    cdef double print_acceleration, retract_acceleration, travel_acceleration
    cdef double junction_deviation, square_corner_velocity
    cdef double minimum_feedrate, minimum_travel_feedrate
    cdef double fw_retract_length, fw_retract_speed, heater_wait, tool_change_time
    cdef bint m203_per_minute
    cdef object on_comment
    cdef long long sample_every

    cdef double pos[4]
    cdef double feedrate, units, speed_factor
    cdef bint relative_xyz, relative_e, retracted
    cdef int tool

    cdef double prev_feedrate, prev_safe
    cdef double prev_axis_speed[4]
    cdef double prev_unit[3]
    cdef bint has_prev_unit

    cdef Block blocks[WINDOW]
    cdef int count
    cdef double time
    cdef list table
    cdef long long next_sample

    cdef double filament[256]
    cdef double filament_before_layers[256]
    cdef int tools  # filament entries in use: the highest tool selected, plus one
    cdef bint has_markers
    cdef double print_min[3]
    cdef double print_max[3]
    cdef double travel_min[3]
    cdef double travel_max[3]
    cdef list layers, marker_layers
    cdef double layer_z
    cdef long long z_offset
    cdef bint marker_open  # the last marker layer has no Z yet
    cdef long long markers_seen, marker_count, layer_count
    cdef double time_before_layers
    cdef int toolchange_phase
    cdef long long moves, lines, size
    cdef bytes carry
    cdef bint skipping

    def __init__(self, limits=None, on_comment=None, sample_every=65536):
        cdef int axis
        merged = dict(_spec.DEFAULT_LIMITS)
        merged.update(limits or {})
        for axis in range(4):
            self.max_feedrate[axis] = float(merged["max_feedrate"][axis])
            self.max_acceleration[axis] = float(merged["max_acceleration"][axis])
            self.max_jerk[axis] = float(merged["max_jerk"][axis])
        self.print_acceleration = float(merged["print_acceleration"])
        self.retract_acceleration = float(merged["retract_acceleration"])
        self.travel_acceleration = float(merged["travel_acceleration"])
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
        for axis in range(4):
            self.pos[axis] = 0.0
            self.prev_axis_speed[axis] = 0.0
        self.feedrate = float(merged["feedrate"])
        self.units = 1.0
        self.speed_factor = 1.0
        self.relative_xyz = self.relative_e = self.retracted = False
        self.tool = 0
        self.prev_feedrate = self.prev_safe = 0.0
        self.has_prev_unit = False
        self.count = 0
        self.time = 0.0
        self.table = []
        self.next_sample = 0
        for axis in range(256):
            self.filament[axis] = 0.0
            self.filament_before_layers[axis] = 0.0
        self.tools = 1
        self.has_markers = False
        for axis in range(3):
            self.print_min[axis] = INFINITY
            self.print_max[axis] = -INFINITY
            self.travel_min[axis] = INFINITY
            self.travel_max[axis] = -INFINITY
        self.layers = []
        self.marker_layers = []
        self.marker_open = False
        self.markers_seen = self.marker_count = self.layer_count = 0
        self.layer_z = -INFINITY
        self.z_offset = 0
        self.time_before_layers = 0.0
        self.toolchange_phase = 0
        self.moves = self.lines = self.size = 0
        self.carry = b""
        self.skipping = False

    # ------------------------------------------------------------------------------------------------ input
    def feed(self, data):
        cdef bytes buffer
        cdef long long base
        cdef const unsigned char* p
        cdef const unsigned char* found
        cdef Py_ssize_t length, start, end
        buffer = bytes(data)
        if self.skipping:  # the rest of an over-long line
            p = <const unsigned char*>PyBytes_AS_STRING(buffer)
            found = <const unsigned char*>memchr(p, 10, PyBytes_GET_SIZE(buffer))
            if found == NULL:
                self.size += PyBytes_GET_SIZE(buffer)
                return
            self.size += (found - p) + 1
            buffer = buffer[(found - p) + 1:]
            self.skipping = False
        if self.carry:
            buffer = self.carry + buffer
            base = self.size - len(self.carry)
        else:
            base = self.size
        length = PyBytes_GET_SIZE(buffer)
        self.size = base + length
        p = <const unsigned char*>PyBytes_AS_STRING(buffer)
        start = 0
        while start < length:
            found = <const unsigned char*>memchr(p + start, 10, length - start)
            if found == NULL:
                break
            end = found - p
            self._line(p + start, end - start, base + start, base + end + 1)
            start = end + 1
        if length - start > LONG_LINE:
            self._line(p + start, LONG_LINE, base + start, base + start + LONG_LINE)
            self.carry = b""
            self.skipping = True
        else:
            self.carry = buffer[start:]

    cdef int _line(self, const unsigned char* p, Py_ssize_t n, long long offset, long long next_offset) except -1:
        cdef const unsigned char* body
        cdef Py_ssize_t body_n, code_n
        cdef const unsigned char* semicolon
        cdef unsigned char head
        self.lines += 1
        while n > 0 and is_space(p[0]):
            p += 1
            n -= 1
        while n > 0 and is_space(p[n - 1]):
            n -= 1
        if n == 0:
            return 0
        if p[0] == 59:  # ;
            body = p + 1
            body_n = n - 1
            if starts(body, body_n, b"LAYER_CHANGE", 12) or starts(body, body_n, b"LAYER:", 6):
                if not self.has_markers:
                    self.drain(0.0, offset)
                    self.time_before_layers = self.time
                    self.has_markers = True
                self.markers_seen += 1
                if len(self.marker_layers) < MAX_LAYER_ENTRIES:
                    self.marker_layers.append([offset, None])
                self.marker_open = True
            elif starts(body, body_n, b" CP TOOLCHANGE ", 15):
                if starts(body, body_n, b" CP TOOLCHANGE UNLOAD", 21):
                    self.toolchange_phase = 1
                elif starts(body, body_n, b" CP TOOLCHANGE WIPE", 19) or starts(body, body_n, b" CP TOOLCHANGE END", 18):
                    self.toolchange_phase = 0
            elif self.on_comment is not None:
                self.on_comment(offset, PyBytes_FromStringAndSize(<const char*>body, body_n))
            return 0
        semicolon = <const unsigned char*>memchr(p, 59, n)
        code_n = n if semicolon == NULL else semicolon - p
        head = p[0]
        if head == 71 or head == 103:  # G g
            self._g(p, code_n, offset, next_offset)
        elif head == 77 or head == 109:  # M m
            self._m(p, code_n, offset)
        elif head == 84 or head == 116:  # T t
            self._t(p, code_n, offset)
        elif code_n >= 18 and _upper_equals(p, b"SET_VELOCITY_LIMIT", 18):
            self._velocity_limit(p, code_n)
        return 0

    # ------------------------------------------------------------------------------------------------ G
    cdef int _g(self, const unsigned char* p, Py_ssize_t n, long long offset, long long next_offset) except -1:
        cdef int number = code_number(p, n)
        cdef Params params
        cdef double seconds, value
        cdef int axis
        cdef bint any_axis
        if number < 0:
            return 0
        if number == 0 or number == 1:
            parse_words(p, n, &params)
            self._linear(&params, offset, next_offset)
        elif number == 2 or number == 3:
            parse_words(p, n, &params)
            self._arc(&params, number == 2, offset, next_offset)
        elif number == 4:
            parse_words(p, n, &params)
            seconds = 0.0
            if param(&params, b'P', &value):
                seconds = value / 1000.0
            if param(&params, b'S', &value):
                seconds = value
            self.drain(seconds if seconds > 0.0 else 0.0, next_offset)
        elif number == 10:
            parse_words(p, n, &params)
            if not self.retracted and params.letters == 0:
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
            parse_words(p, n, &params)
            any_axis = params.has[23] or params.has[24] or params.has[25]
            for axis in range(3):
                if not any_axis or params.has[23 + axis]:
                    self.pos[axis] = 0.0
        elif number == 90:
            self.relative_xyz = False
            self.relative_e = False
        elif number == 91:
            self.relative_xyz = True
            self.relative_e = True
        elif number == 92:
            parse_words(p, n, &params)
            if not (params.has[23] or params.has[24] or params.has[25] or params.has[4]):
                for axis in range(4):
                    self.pos[axis] = 0.0
            for axis in range(4):
                if param(&params, AXES[axis], &value):
                    self.pos[axis] = value * self.units
        return 0

    cdef void _target(self, Params* params, double* target):
        cdef int axis
        cdef double value, feed
        cdef bint relative
        for axis in range(4):
            target[axis] = self.pos[axis]
        for axis in range(4):
            if not param(params, AXES[axis], &value):
                continue
            value *= self.units
            relative = self.relative_e if axis == 3 else self.relative_xyz
            target[axis] = self.pos[axis] + value if relative else value
        if param(params, b'F', &feed) and feed > 0:
            self.feedrate = feed * self.units / 60.0

    cdef int _linear(self, Params* params, long long offset, long long next_offset) except -1:
        cdef double target[4]
        self._target(params, target)
        self._move_to(target, offset, next_offset)
        return 0

    cdef int _arc(self, Params* params, bint clockwise, long long offset, long long next_offset) except -1:
        cdef double start[4]
        cdef double target[4]
        cdef double point[4]
        cdef double x0, y0, x1, y1, i, j, r, cx, cy, dx, dy, half, h, sign, mx, my
        cdef double radius, a0, a1, sweep, length, pieces, dz, de, fraction, angle
        cdef bint has_i, has_j
        cdef long segments, index
        cdef int axis
        for axis in range(4):
            start[axis] = self.pos[axis]
        self._target(params, target)
        x0 = start[0]
        y0 = start[1]
        x1 = target[0]
        y1 = target[1]
        has_i = param(params, b'I', &i)
        has_j = param(params, b'J', &j)
        if has_i or has_j:
            cx = x0 + (i if has_i else 0.0) * self.units
            cy = y0 + (j if has_j else 0.0) * self.units
        elif param(params, b'R', &r):
            r *= self.units
            dx = x1 - x0
            dy = y1 - y0
            half = hypot(dx, dy) / 2.0
            if half == 0.0:
                self._move_to(target, offset, next_offset)
                return 0
            h = r * r - half * half
            h = sqrt(h if h > 0.0 else 0.0)
            sign = 1.0 if clockwise == (r < 0) else -1.0
            mx = (x0 + x1) / 2.0
            my = (y0 + y1) / 2.0
            cx = mx - sign * h * dy / (2.0 * half)
            cy = my + sign * h * dx / (2.0 * half)
        else:
            self._move_to(target, offset, next_offset)
            return 0
        radius = hypot(x0 - cx, y0 - cy)
        a0 = atan2(y0 - cy, x0 - cx)
        a1 = atan2(y1 - cy, x1 - cx)
        sweep = a1 - a0
        if clockwise:
            if sweep >= -1e-9:
                sweep -= 2.0 * M_PI
        elif sweep <= 1e-9:
            sweep += 2.0 * M_PI
        length = fabs(sweep) * radius
        pieces = length / ARC_SEGMENT_MM
        if isfinite(pieces):
            segments = <long>(pieces if pieces <= MAX_ARC_SEGMENTS else MAX_ARC_SEGMENTS)
        else:
            segments = 1
        if segments < 1:
            segments = 1
        dz = target[2] - start[2]
        de = target[3] - start[3]
        for index in range(1, segments):
            fraction = <double>index / <double>segments
            angle = a0 + sweep * fraction
            point[0] = cx + radius * cos(angle)
            point[1] = cy + radius * sin(angle)
            point[2] = start[2] + dz * fraction
            point[3] = start[3] + de * fraction
            self._move_to(point, offset, next_offset)
        self._move_to(target, offset, next_offset)
        return 0

    cdef int _firmware_retract(self, double direction, long long offset, long long next_offset) except -1:
        cdef double target[4]
        cdef double saved
        cdef int axis
        for axis in range(4):
            target[axis] = self.pos[axis]
        target[3] += direction * self.fw_retract_length
        saved = self.feedrate
        self.feedrate = self.fw_retract_speed
        self._move_to(target, offset, next_offset)
        self.feedrate = saved
        return 0

    # ------------------------------------------------------------------------------------------------ M, T
    cdef int _m(self, const unsigned char* p, Py_ssize_t n, long long offset) except -1:
        cdef int number = code_number(p, n)
        cdef Params params
        cdef double value, scale
        cdef int axis
        if number < 0:
            return 0
        if number == 82:
            self.relative_e = False
        elif number == 83:
            self.relative_e = True
        elif number == 109 or number == 190:
            if self.heater_wait > 0.0:
                self.drain(self.heater_wait, offset)
        elif number == 201:
            parse_words(p, n, &params)
            for axis in range(4):
                if param(&params, AXES[axis], &value) and value > 0:
                    self.max_acceleration[axis] = value
        elif number == 203:
            parse_words(p, n, &params)
            scale = 1.0 / 60.0 if self.m203_per_minute else 1.0
            for axis in range(4):
                if param(&params, AXES[axis], &value) and value > 0:
                    self.max_feedrate[axis] = value * scale
        elif number == 204:
            parse_words(p, n, &params)
            if param(&params, b'S', &value) and value > 0:
                self.print_acceleration = value
                self.travel_acceleration = value
            if param(&params, b'P', &value) and value > 0:
                self.print_acceleration = value
            if param(&params, b'R', &value) and value > 0:
                self.retract_acceleration = value
            if param(&params, b'T', &value) and value > 0:
                self.travel_acceleration = value
        elif number == 205:
            parse_words(p, n, &params)
            for axis in range(4):
                if param(&params, AXES[axis], &value) and value >= 0:
                    self.max_jerk[axis] = value
            if param(&params, b'S', &value) and value >= 0:
                self.minimum_feedrate = value
            if param(&params, b'T', &value) and value >= 0:
                self.minimum_travel_feedrate = value
            if param(&params, b'J', &value) and value >= 0:
                self.junction_deviation = value
        elif number == 220:
            parse_words(p, n, &params)
            if param(&params, b'S', &value) and value > 0:
                self.speed_factor = value / 100.0
        elif number == 566:
            parse_words(p, n, &params)
            for axis in range(4):
                if param(&params, AXES[axis], &value) and value >= 0:
                    self.max_jerk[axis] = value / 60.0
        return 0

    cdef int _t(self, const unsigned char* p, Py_ssize_t n, long long offset) except -1:
        cdef int tool = code_number(p, n)
        if tool < 0 or tool > 255 or tool == self.tool:
            return 0
        self.tool = tool
        if self.tools <= tool:
            self.tools = tool + 1
        if self.tool_change_time > 0.0:
            self.drain(self.tool_change_time, offset)
        return 0

    cdef int _velocity_limit(self, const unsigned char* p, Py_ssize_t n) except -1:
        params = _spec.klipper_params(PyBytes_FromStringAndSize(<const char*>p, n))
        self.max_acceleration[0] = 0.0
        self.max_acceleration[1] = 0.0
        value = params.get("ACCEL")
        if value is not None and value > 0:
            self.print_acceleration = self.travel_acceleration = self.retract_acceleration = value
        value = params.get("VELOCITY")
        if value is not None and value > 0:
            self.max_feedrate[0] = self.max_feedrate[1] = value
        value = params.get("SQUARE_CORNER_VELOCITY")
        if value is not None and value >= 0:
            self.square_corner_velocity = value
            self.junction_deviation = -1.0
        return 0

    # ------------------------------------------------------------------------------------------------ planning
    cdef int _move_to(self, double* target, long long offset, long long next_offset) except -1:
        cdef double dx = target[0] - self.pos[0]
        cdef double dy = target[1] - self.pos[1]
        cdef double dz = target[2] - self.pos[2]
        cdef double de = target[3] - self.pos[3]
        cdef bint xyz_moved = dx != 0.0 or dy != 0.0 or dz != 0.0
        cdef int axis
        cdef double value, z
        if xyz_moved:
            if dz != 0.0:
                self.z_offset = offset
            for axis in range(3):
                value = self.pos[axis]
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
            self.filament[self.tool] += de
            if not self.has_markers:
                self.filament_before_layers[self.tool] += de
            if dx != 0.0 or dy != 0.0:
                for axis in range(3):
                    value = self.pos[axis]
                    if value < self.print_min[axis]:
                        self.print_min[axis] = value
                    if value > self.print_max[axis]:
                        self.print_max[axis] = value
                    value = target[axis]
                    if value < self.print_min[axis]:
                        self.print_min[axis] = value
                    if value > self.print_max[axis]:
                        self.print_max[axis] = value
                z = target[2]
                if fabs(z - self.layer_z) > LAYER_TOLERANCE:
                    self.layer_z = z
                    self.layer_count += 1
                    if len(self.layers) < MAX_LAYER_ENTRIES:
                        self.layers.append([self.z_offset, z])
                if self.marker_open:
                    self.marker_open = False
                    self.marker_count += 1
                    if self.markers_seen == len(self.marker_layers):
                        self.marker_layers[len(self.marker_layers) - 1][1] = z
        for axis in range(4):
            self.pos[axis] = target[axis]
        self._plan(dx, dy, dz, de, next_offset)
        return 0

    cdef int _plan(self, double dx, double dy, double dz, double de, long long end_offset) except -1:
        cdef double delta[4]
        cdef double axis_speed[4]
        cdef double xyz = dx * dx + dy * dy + dz * dz
        cdef double distance, feedrate, minimum, inverse, component, limit, acceleration, share
        cdef double safe, vmax_junction, allowable, entry
        cdef bint extruding
        cdef int axis
        cdef Block* block
        if xyz > 0.0:
            distance = sqrt(xyz)
        else:
            distance = fabs(de)
        if distance <= 0.0:
            return 0
        self.moves += 1
        delta[0] = dx
        delta[1] = dy
        delta[2] = dz
        delta[3] = de
        extruding = de != 0.0 and xyz > 0.0
        feedrate = self.feedrate * self.speed_factor
        minimum = self.minimum_feedrate if de != 0.0 else self.minimum_travel_feedrate
        if feedrate < minimum:
            feedrate = minimum
        inverse = 1.0 / distance
        for axis in range(4):
            component = fabs(delta[axis]) * inverse * feedrate
            limit = self.max_feedrate[axis]
            if component > limit and limit > 0.0:
                feedrate *= limit / component
        if xyz == 0.0:
            acceleration = self.retract_acceleration
        elif extruding:
            acceleration = self.print_acceleration
        else:
            acceleration = self.travel_acceleration
        for axis in range(4):
            share = fabs(delta[axis]) * inverse
            limit = self.max_acceleration[axis]
            if share > 0.0 and limit > 0.0 and acceleration * share > limit:
                acceleration = limit / share
        for axis in range(4):
            axis_speed[axis] = delta[axis] * inverse * feedrate
        if self.junction_deviation != 0.0:
            self._junction_deviation(axis_speed, feedrate, acceleration, inverse, delta, &safe, &vmax_junction)
        else:
            self._junction_jerk(axis_speed, feedrate, &safe, &vmax_junction)
        allowable = sqrt(safe * safe + 2.0 * acceleration * distance)
        entry = vmax_junction if vmax_junction <= allowable else allowable
        block = &self.blocks[self.count]
        block.distance = distance
        block.acceleration = acceleration
        block.nominal = feedrate
        block.entry = entry
        block.max_entry = vmax_junction
        block.safe = safe
        block.nominal_length = feedrate <= allowable
        block.end_offset = end_offset
        self.count += 1
        self.prev_feedrate = feedrate
        for axis in range(4):
            self.prev_axis_speed[axis] = axis_speed[axis]
        self.prev_safe = safe
        if self.count >= WINDOW:
            self._commit(KEEP)
        return 0

    cdef void _junction_jerk(self, double* axis_speed, double feedrate, double* safe_out, double* vmax_out):
        cdef double safe = feedrate
        cdef double jerk, limit, vmax_junction, previous, factor, v_factor, v_exit, v_entry, threshold
        cdef bint previous_faster, limited
        cdef int axis
        for axis in range(4):
            jerk = fabs(axis_speed[axis])
            limit = self.max_jerk[axis]
            if jerk > limit and safe > limit:
                safe = limit
        vmax_junction = safe
        previous = self.prev_feedrate
        if self.count > 0 and previous > PREVIOUS_FEEDRATE_THRESHOLD:
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
                if v_exit > v_entry:
                    if v_entry > 0.0 or v_exit < 0.0:
                        jerk = v_exit - v_entry
                    else:
                        jerk = v_exit if v_exit >= -v_entry else -v_entry
                else:
                    if v_entry < 0.0 or v_exit > 0.0:
                        jerk = v_entry - v_exit
                    else:
                        jerk = -v_exit if -v_exit >= v_entry else v_entry
                limit = self.max_jerk[axis]
                if jerk > limit:
                    v_factor *= limit / jerk
                    limited = True
            if limited:
                vmax_junction *= v_factor
            threshold = vmax_junction * 0.99
            if self.prev_safe > threshold and safe > threshold:
                vmax_junction = safe
        safe_out[0] = safe
        vmax_out[0] = vmax_junction

    cdef void _junction_deviation(self, double* axis_speed, double feedrate, double acceleration, double inverse,
                                  double* delta, double* safe_out, double* vmax_out):
        cdef double deviation, scv, safe, vmax_junction, cos_theta, sin_half, junction
        cdef double unit[3]
        cdef bint has_unit
        if self.junction_deviation < 0.0:
            scv = self.square_corner_velocity
            deviation = scv * scv * (sqrt(2.0) - 1.0) / acceleration
        else:
            deviation = self.junction_deviation
        safe = feedrate if feedrate <= (0.05 if deviation > 0.0 else feedrate) else (0.05 if deviation > 0.0 else feedrate)
        unit[0] = delta[0] * inverse
        unit[1] = delta[1] * inverse
        unit[2] = delta[2] * inverse
        vmax_junction = safe
        has_unit = not (unit[0] == 0.0 and unit[1] == 0.0 and unit[2] == 0.0)
        if self.count > 0 and self.has_prev_unit and has_unit and self.prev_feedrate > PREVIOUS_FEEDRATE_THRESHOLD:
            cos_theta = -(self.prev_unit[0] * unit[0] + self.prev_unit[1] * unit[1] + self.prev_unit[2] * unit[2])
            if cos_theta > 0.999999:
                vmax_junction = safe
            else:
                if cos_theta < -0.999999:
                    junction = INFINITY
                else:
                    sin_half = sqrt(0.5 * (1.0 - cos_theta))
                    junction = sqrt(acceleration * deviation * sin_half / (1.0 - sin_half))
                vmax_junction = junction
                if feedrate < vmax_junction:
                    vmax_junction = feedrate
                if self.prev_feedrate < vmax_junction:
                    vmax_junction = self.prev_feedrate
                if vmax_junction < safe:
                    vmax_junction = safe
        self.has_prev_unit = has_unit
        if has_unit:
            self.prev_unit[0] = unit[0]
            self.prev_unit[1] = unit[1]
            self.prev_unit[2] = unit[2]
        safe_out[0] = safe
        vmax_out[0] = vmax_junction

    cdef int _commit(self, int keep) except -1:
        cdef int count = self.count
        cdef int index, done
        cdef Block* block
        cdef Block* following
        cdef Block* previous
        cdef double reachable, candidate, exit_speed, elapsed
        following = &self.blocks[count - 1]
        for index in range(count - 2, -1, -1):
            block = &self.blocks[index]
            if block.entry != block.max_entry:
                if not block.nominal_length and block.max_entry > following.entry:
                    candidate = sqrt(following.entry * following.entry + 2.0 * block.acceleration * block.distance)
                    block.entry = block.max_entry if block.max_entry <= candidate else candidate
                else:
                    block.entry = block.max_entry
            following = block
        previous = &self.blocks[0]
        for index in range(1, count):
            block = &self.blocks[index]
            if not previous.nominal_length and previous.entry < block.entry:
                reachable = sqrt(previous.entry * previous.entry + 2.0 * previous.acceleration * previous.distance)
                if reachable < block.entry:
                    block.entry = reachable
            previous = block
        done = count - keep
        elapsed = self.time
        for index in range(done):
            block = &self.blocks[index]
            exit_speed = self.blocks[index + 1].entry if index + 1 < count else block.safe
            elapsed += trapezoid_time(block.distance, block.acceleration, block.nominal, block.entry, exit_speed)
            if block.end_offset >= self.next_sample:
                self.table.append((block.end_offset, elapsed))
                self.next_sample = block.end_offset + self.sample_every
        self.time = elapsed
        if done > 0 and keep > 0:
            memcpy(&self.blocks[0], &self.blocks[done], keep * sizeof(Block))
        self.count = keep
        return 0

    cpdef drain(self, double extra_seconds, long long offset):
        if self.count > 0:
            self._commit(0)
        if extra_seconds > 0.0:
            self.time += extra_seconds
            if offset >= self.next_sample:
                self.table.append((offset, self.time))
                self.next_sample = offset + self.sample_every

    # ------------------------------------------------------------------------------------------------ result
    def finish(self):
        cdef bytes rest
        if self.carry:
            rest = self.carry
            self.carry = b""
            self._line(<const unsigned char*>PyBytes_AS_STRING(rest), len(rest), self.size - len(rest), self.size)
        self.drain(0.0, self.size)
        if not self.table or self.table[len(self.table) - 1][0] != self.size:
            self.table.append((self.size, self.time))
        return {
            "time": self.time,
            "time_before_layers": self.time_before_layers,
            "filament": [self.filament[tool] for tool in range(self.tools)],
            "filament_before_layers": [self.filament_before_layers[tool] for tool in range(self.tools)],
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


cdef object _box(double* low, double* high):
    if low[0] == INFINITY:
        return None
    return {"min": [low[0], low[1], low[2]], "max": [high[0], high[1], high[2]]}


cdef bint _upper_equals(const unsigned char* p, const char* text, Py_ssize_t length):
    cdef Py_ssize_t i
    cdef unsigned char c
    for i in range(length):
        c = p[i]
        if 97 <= c <= 122:
            c -= 32
        if c != <unsigned char>text[i]:
            return False
    return True
