# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True, initializedcheck=False
"""The compiled G-code parser: the same events and state as ``_pyparser`` (the specification), fast.

The hot path touches no Python object per line: it walks a ``const unsigned char*`` over the caller's buffer, parses
numbers itself and keeps the machine state in a C struct (NaN = unknown).  Simple G0/G1 lines ("G1 " then
parameters, a comment or checksum after them at most), nine lines in ten, run in one C loop (``zev_run_moves``) that
parses each line in one pass up to its terminator, with no search for the line end first: the last terminator of the
buffer bounds the run; comment lines inside the run are skipped there too.  In that loop, "G1 X.. Y.. E.." lines
(92 % of the lines of a PrusaSlicer file) are read as exactly that shape, three numbers and their separators, and
applied by ``zev_apply_xye``; any other move goes through the loop's general scanner.  Everything else finds its
line end with memchr (a CR is looked for only up to the next LF, so that no pass over the whole buffer looks for the
CRs that LF files do not have) and goes through ``_sent_line``.  Python objects are made only for events
(``new_event`` fills an Event's slots without calling its Python ``__init__``) and on rare paths (a suppressed
command, an over-long line), where it calls the helpers of ``_rules`` so that both implementations share one
wording.

Numbers: a decimal of at most 19 significant digits whose integer fits 2**53, with at most 22 fraction digits, is
m / 10**k, both exact doubles, so the one IEEE division is correctly rounded, exactly what Python's float() returns.
Anything longer goes to PyOS_string_to_double (what float() uses), so the twin's float() and this parser never
differ.  The numbers of sliced G-code (at most 7 characters after the sign, or at most 7 digits each side of the
dot, as absolute E grows to) are read from one or two 8-byte words (``zev_digits_word``, on little-endian GCC/clang
builds; ``-DZEV_NO_SWAR`` builds without it): a mask of a word's non-digit bytes gives where the digit runs end, and
the digits become m by multiplications.  The build must not fuse multiply-adds (setup.py passes -ffp-contract=off):
Python rounds every operation, and the print-time estimate must come out bit-identical.

The simple state (``zev_simple_state``: absolute X Y Z in mm, all known, a positive feedrate, the extrusion box
started) with small values (``ZEV_SMALL``) lets ``zev_apply_simple`` and ``zev_apply_xye`` drop the NaN and infinity
checks of ``zev_apply_move``: none of them can fail there.  They do the same floating-point operations in the same
order; the tests compare both implementations' floats exactly, in and out of that state.

Speed was measured in instructions per line (callgrind on the first 100 000 lines of the bunny, feed_sent of the
whole buffer), wall time being too noisy on a shared machine: 950 for the first version, 627 with the move fast
path, 550 with the run loop, 533 with its digits read two at a time, 424 with numbers read in one word, moves
applied without checks in the simple state and events made without ``__init__``, 322 with the "G1 X.. Y.. E.." path,
296 with signs read out of line and the path's fixed text compared a word at a time, 288 with comment lines skipped
in the run loop.  Files with absolute E (numbers of 8 and more characters) and comments after moves gained with the
two-word numbers and the comment ends found in the loop: CrealityPrint's 567 -> 359 instructions per line,
CuraEngine's bunny 528 -> 386.  No search of the whole buffer for CRs before the first line: 5 % of the bunny's wall
time, few instructions (memchr reads 32 bytes a step) but a second pass over 26 MB.  Wall time has followed less and
less (about 2 % for the last 6 % of instructions): the line's divisions, its square root and the chain of loads from
one number's end to the next count as much now.  Tried and measured without gain: finding the line's end apart from
its numbers (SSE2, so that the next line need not wait for them), -O3, -fno-math-errno; earlier, SWAR conversions of
8 digits after a byte loop had found them (what costs is finding where digit runs of unpredictable length end, which
the word reader does from its mask).
"""
cimport cython
from cpython.buffer cimport PyBUF_SIMPLE, PyBuffer_Release, PyObject_GetBuffer
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_CheckExact, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.mem cimport PyMem_Free, PyMem_Malloc
from cpython.ref cimport Py_INCREF, PyObject
from libc.math cimport fabs, sqrt
from libc.stdint cimport uint64_t
from libc.string cimport memchr, memcmp, memcpy

from types import MemberDescriptorType

from zevents._parser import _rules
from zevents._parser._rules import BinaryGcodeError, Event, ParserState

cdef extern from "math.h":
    bint c_isnan "isnan"(double) nogil
    bint c_isfinite "isfinite"(double) nogil
    const double NAN

cdef extern from "Python.h":
    double PyOS_string_to_double(const char *s, char **endptr, PyObject *overflow_exception) except? -1.0

IMPLEMENTATION = "c"

cdef enum:
    MAX_LINE = 65536  # _rules.MAX_LINE_BYTES, checked at import below
    MAX_SUPPRESSED = 256

if MAX_LINE != _rules.MAX_LINE_BYTES or MAX_SUPPRESSED != _rules.MAX_SUPPRESSED:
    raise ImportError("_cparser was built with other limits than _rules has; rebuild it")

cdef double INCH = _rules.MM_PER_INCH
cdef double TOLERANCE = _rules.LAYER_TOLERANCE
cdef double POW10[23]
POW10[0] = 1.0
for _k in range(1, 23):
    POW10[_k] = POW10[_k - 1] * 10.0

# the event of each M code below 1024, as an index into M_NAMES (0: none); one array read per M line.  The G
# codes of the table (G4, G28) change state too and are handled by name.
cdef int M_EVENT[1024]
cdef list M_NAMES = [None]
for _k in range(1024):
    M_EVENT[_k] = 0
for (_letter, _number), _name in _rules.COMMAND_EVENTS.items():
    if _letter == "M":
        M_NAMES.append(_name)
        M_EVENT[_number] = len(M_NAMES) - 1
    elif (_letter, _number) not in (("G", 4), ("G", 28)):
        raise ImportError(f"_cparser has no handler for {_letter}{_number} ({_name}): add one")

cdef int REASON_NONE = 0
cdef int REASON_BLOCKED = 1
cdef int REASON_IGNORED = 2
cdef int REASON_INVALID_TOOL = 3
cdef tuple REASON_NAMES = (None, _rules.BLOCKED, _rules.IGNORED, _rules.INVALID_TOOL)

cdef unsigned int BIT_E = 1u << 4
cdef unsigned int BIT_F = 1u << 5
cdef unsigned int BIT_P = 1u << 15
cdef unsigned int BIT_S = 1u << 18
cdef unsigned int BIT_X = 1u << 23
cdef unsigned int BIT_Y = 1u << 24
cdef unsigned int BIT_Z = 1u << 25
cdef unsigned int BITS_XYZ = BIT_X | BIT_Y | BIT_Z

cdef object MAGIC = _rules.BGCODE_MAGIC
cdef object CURRENT_TOOL = _rules.CURRENT_TOOL


# ------------------------------------------------------------------------------------------- character classes

cdef inline bint is_digit(unsigned char c) noexcept nogil:
    return <unsigned char>(c - 48) < 10

cdef inline bint is_blank(unsigned char c) noexcept nogil:
    # the line blanks of the G-code grammar: space, tab, VT, FF, NUL
    return c == 32 or c == 9 or c == 11 or c == 12 or c == 0

cdef inline bint is_space(unsigned char c) noexcept nogil:
    # Python's bytes \s: space, \t \n \v \f \r
    return c == 32 or <unsigned char>(c - 9) < 5

cdef inline int letter_index(unsigned char c) noexcept nogil:
    cdef unsigned char k = <unsigned char>((c | 0x20) - 97)
    return k if k < 26 else -1

cdef inline unsigned char lower(unsigned char c) noexcept nogil:
    return c | 0x20 if <unsigned char>(c - 65) < 26 else c


# --------------------------------------------------------------------------------------------------- numbers

cdef double slow_float(const unsigned char* s, Py_ssize_t n) except? -1.0:
    """float() of a valid decimal token, the way Python does it."""
    cdef double value
    zev_slow_float(s, n, &value)
    return value


cdef inline double token_value(const unsigned char* s, Py_ssize_t n) except? -1.0:
    """float() of a token [+-]?(digits[.digits]|.digits), exactly."""
    cdef Py_ssize_t j = 0
    cdef bint negative = False
    cdef uint64_t mantissa = 0
    cdef int significant = 0
    cdef int fraction = 0
    cdef bint in_fraction = False
    cdef unsigned char c
    cdef double value
    if s[0] == 45 or s[0] == 43:
        negative = s[0] == 45
        j = 1
    while j < n:
        c = s[j]
        if c == 46:
            in_fraction = True
        else:
            if in_fraction:
                fraction += 1
            if mantissa != 0 or c != 48:
                significant += 1
                if significant > 19:
                    return slow_float(s, n)
                mantissa = mantissa * 10 + (c - 48)
        j += 1
    if mantissa > 9007199254740992ULL or fraction > 22:
        return slow_float(s, n)
    value = <double>mantissa
    if fraction:
        value = value / POW10[fraction]
    return -value if negative else value


cdef inline Py_ssize_t greedy_float(const unsigned char* s, Py_ssize_t i, Py_ssize_t n, double* out) except -2:
    """What the regex [-+]?[0-9]*\\.?[0-9]+ matches first at i: its end, or -1."""
    cdef Py_ssize_t j = i
    cdef Py_ssize_t digits_start
    if j < n and (s[j] == 43 or s[j] == 45):
        j += 1
    digits_start = j
    while j < n and is_digit(s[j]):
        j += 1
    if j + 1 < n and s[j] == 46 and is_digit(s[j + 1]):
        j += 2
        while j < n and is_digit(s[j]):
            j += 1
    elif j == digits_start:
        return -1
    out[0] = token_value(s + i, j - i)
    return j


cdef inline Py_ssize_t skip_spaces(const unsigned char* s, Py_ssize_t i, Py_ssize_t n) noexcept nogil:
    while i < n and is_space(s[i]):
        i += 1
    return i


cdef inline Py_ssize_t small_int(const unsigned char* s, Py_ssize_t i, Py_ssize_t n, long* out) noexcept nogil:
    """Digits at i (at least one): their end, value in out, or out = -1 when above MAX_CODE."""
    cdef long value = 0
    cdef int significant = 0
    while i < n and is_digit(s[i]):
        if value != 0 or s[i] != 48:
            significant += 1
            if significant <= 6:
                value = value * 10 + (s[i] - 48)
        i += 1
    out[0] = value if significant <= 6 else -1
    return i


# ---------------------------------------------------------------------------------------------- G-code params

cdef inline Py_ssize_t scan_params(const unsigned char* s, Py_ssize_t i, Py_ssize_t n, double* values,
                                   unsigned int* seen, unsigned int* valued) except -2:
    """Letters with their numbers up to ; * or an unclosed (; the last occurrence of a letter decides."""
    cdef unsigned int seen_bits = 0
    cdef unsigned int valued_bits = 0
    cdef unsigned int bit
    cdef int index
    cdef unsigned char c
    cdef int found
    cdef const unsigned char* close
    cdef const unsigned char* number_end
    while i < n:
        c = s[i]
        index = letter_index(c)
        if index >= 0:
            bit = 1u << index
            seen_bits |= bit
            number_end = zev_param_number(s + i + 1, s + n, &values[index], &found)
            if number_end == NULL:
                return -2
            i = number_end - s
            if found:
                valued_bits |= bit
            else:
                valued_bits &= ~bit
            continue
        if c == 59 or c == 42:  # ; *
            break
        if c == 40:  # (
            close = <const unsigned char*>memchr(s + i + 1, 41, n - i - 1)
            if close == NULL:
                break
            i = close - s + 1
            continue
        i += 1
    seen[0] = seen_bits
    valued[0] = valued_bits
    return i


# scan_move in C: the number parser must inline into the scanning loop, which Cython cannot ask of the compiler.
cdef extern from *:
    """
    #if defined(__GNUC__)
    #define ZEV_INLINE static inline __attribute__((always_inline))
    #define ZEV_COLD static __attribute__((noinline, cold))
    #define ZEV_NOINLINE static __attribute__((noinline))
    #define ZEV_LIKELY(condition) __builtin_expect(!!(condition), 1)
    #define ZEV_UNLIKELY(condition) __builtin_expect(!!(condition), 0)
    #else
    #define ZEV_INLINE static inline
    #define ZEV_COLD static
    #define ZEV_NOINLINE static
    #define ZEV_LIKELY(condition) (condition)
    #define ZEV_UNLIKELY(condition) (condition)
    #endif

    /* what zev_scan_move does with each byte: 0 skip, 1-5 the parameter X Y Z E F, 6 end (; *), 7 a ( comment */
    static unsigned char zev_move_action[256];
    /* what zev_run_moves does with each byte: 0 skip, ZEV_X..ZEV_F the parameter (its bit in the valued set and its
       place in the values), ZEV_END at ; and *, ZEV_COMMENT at (, ZEV_EOL at CR and LF */
    static unsigned char zev_run_action[256];
    enum { ZEV_X = 1, ZEV_Y = 2, ZEV_Z = 4, ZEV_E = 8, ZEV_F = 16, ZEV_END = 32, ZEV_COMMENT = 64, ZEV_EOL = 128 };
    static double zev_pow10[23];
    static const uint64_t zev_low_bytes[8] = {  /* the low k bytes of a word */
        0, 0xFF, 0xFFFF, 0xFFFFFF, 0xFFFFFFFFULL, 0xFFFFFFFFFFULL, 0xFFFFFFFFFFFFULL, 0xFFFFFFFFFFFFFFULL};

    static void zev_init_tables(void) {
        int k;
        const char* letters = "XYZEF";
        zev_pow10[0] = 1.0;
        for (k = 1; k < 23; k++) zev_pow10[k] = zev_pow10[k - 1] * 10.0;
        for (k = 0; k < 5; k++) {
            zev_move_action[(unsigned char)letters[k]] = (unsigned char)(k + 1);
            zev_move_action[(unsigned char)letters[k] | 0x20] = (unsigned char)(k + 1);
        }
        zev_move_action[';'] = zev_move_action['*'] = 6;
        zev_move_action['('] = 7;
        for (k = 0; k < 256; k++) {
            zev_run_action[k] = zev_move_action[k] == 0 ? 0 : zev_move_action[k] <= 5 ? 1 << (zev_move_action[k] - 1)
                                : zev_move_action[k] == 6 ? ZEV_END : ZEV_COMMENT;
        }
        zev_run_action[10] = zev_run_action[13] = ZEV_EOL;  /* LF CR */
    }

    /* float() of a valid decimal token, the way Python does it: -1 with an exception set on failure */
    ZEV_COLD int zev_slow_float(const unsigned char* s, Py_ssize_t n, double* out) {
        char small[64];
        char* text = small;
        if (n >= 64) {
            text = (char*)PyMem_Malloc(n + 1);
            if (!text) { PyErr_NoMemory(); return -1; }
        }
        memcpy(text, s, n);
        text[n] = 0;
        *out = PyOS_string_to_double(text, NULL, NULL);
        if (text != small) PyMem_Free(text);
        return (*out == -1.0 && PyErr_Occurred()) ? -1 : 0;
    }

    /* The value of a scanned number [start, p): m / 10**k with m < 2**53 and k <= 22 is one correctly rounded
       division of exact doubles (float()'s value); longer numbers go through float() itself. */
    ZEV_INLINE const unsigned char* zev_number_value(const unsigned char* start, const unsigned char* p,
                                                     uint64_t mantissa, Py_ssize_t integer, Py_ssize_t fraction,
                                                     int negative, double* out) {
        double value;
        if (integer + fraction > 15  /* up to 15 digits always fit 2**53 */
                && (integer + fraction > 19 || mantissa > 9007199254740992ULL || fraction > 22)) {
            return zev_slow_float(start, p - start, out) < 0 ? NULL : p;
        }
        value = (double)mantissa;
        if (fraction) value = value / zev_pow10[fraction];
        *out = negative ? -value : value;
        return p;
    }

    /* [+-]?(digits[.digits*]|.digits) at p: the end; *found whether there is a number; NULL on error.
       The value comes from zev_number_value. */
    ZEV_INLINE const unsigned char* zev_number(const unsigned char* p, const unsigned char* end, double* out,
                                               int* found, const int terminated) {
        const unsigned char* start = p;
        const unsigned char* digits;
        uint64_t mantissa = 0;
        Py_ssize_t integer, fraction = 0;
        unsigned d;
        int negative = 0;
        if (p < end && (*p == '-' || *p == '+')) { negative = *p == '-'; p++; }
        digits = p;
        /* terminated: *end is the line's terminator (CR or LF), which stops a digit run by itself */
        while ((terminated || p < end) && (d = (unsigned)*p - '0') < 10u) { mantissa = mantissa * 10 + d; p++; }
        integer = p - digits;
        if (p < end && *p == '.') {
            digits = ++p;
            while ((terminated || p < end) && (d = (unsigned)*p - '0') < 10u) { mantissa = mantissa * 10 + d; p++; }
            fraction = p - digits;
            if (integer == 0 && fraction == 0) { *found = 0; return p; }
        } else if (integer == 0) {
            *found = 0;
            return p;
        }
        *found = 1;
        return zev_number_value(start, p, mantissa, integer, fraction, negative, out);
    }

    /* the digit run at p, two digits a step: its end, the run's digits appended to *mantissa.  The run ends
       before the line's terminator, so the byte after a digit can always be read. */
    ZEV_INLINE const unsigned char* zev_digit_pairs(const unsigned char* p, uint64_t* mantissa) {
        uint64_t m = *mantissa;
        unsigned d0, d1;
        for (;;) {
            d0 = (unsigned)p[0] - '0';
            if (d0 >= 10u) break;
            d1 = (unsigned)p[1] - '0';
            if (d1 >= 10u) { m = m * 10 + d0; p += 1; break; }
            m = m * 100 + (d0 * 10 + d1);
            p += 2;
        }
        *mantissa = m;
        return p;
    }

    /* zev_number(..., terminated=1) for zev_run_moves, where the line's terminator lies ahead: no bound checks
       (no byte of the number is a terminator), digits two at a time; the same mantissa and scale. */
    ZEV_INLINE const unsigned char* zev_number_run(const unsigned char* p, const unsigned char* end, double* out,
                                                   int* found) {
        const unsigned char* start = p;
        const unsigned char* digits;
        uint64_t mantissa = 0;
        Py_ssize_t integer, fraction = 0;
        int negative = 0;
        if (*p == '-' || *p == '+') { negative = *p == '-'; p++; }
        digits = p;
        p = zev_digit_pairs(p, &mantissa);
        integer = p - digits;
        if (*p == '.') {
            digits = ++p;
            p = zev_digit_pairs(p, &mantissa);
            fraction = p - digits;
            if (integer == 0 && fraction == 0) { *found = 0; return p; }
        } else if (integer == 0) {
            *found = 0;
            return p;
        }
        *found = 1;
        return zev_number_value(start, p, mantissa, integer, fraction, negative, out);
    }

    #if !defined(ZEV_NO_SWAR) && defined(__GNUC__) && defined(__BYTE_ORDER__) \
        && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    #define ZEV_SWAR 1  /* build with -DZEV_NO_SWAR to try the portable path */
    #else
    #define ZEV_SWAR 0  /* zev_number_word needs the first byte in the low bits and __builtin_ctzll */
    #endif
    #define ZEV_BYTES(b) (0x0101010101010101ULL * (b))

    #if ZEV_SWAR
    /* x ^ '0' in each byte: the high bit of each byte that is not an ASCII digit.  x + 0x76 sets it for 10..0x89
       and x has it from 0x80 on.  A carry out of a byte (x >= 0x8a) can only spoil the bytes after it, and that
       byte is flagged itself: the first flagged byte is exact, and so is the second when the first is the dot
       (x = 0x1e, no carry). */
    ZEV_INLINE uint64_t zev_nondigits(uint64_t x) {
        return (x | (x + ZEV_BYTES(0x76))) & ZEV_BYTES(0x80);
    }

    /* the value of the count (1..8) digits in the low bytes of x (each byte ^ '0'): to the top of the word (the
       bytes below become leading zeros), then pairs, quads, all eight by three multiplications */
    ZEV_INLINE uint64_t zev_word_value(uint64_t x, unsigned count) {
        x <<= 8 * (8 - count);
        x = (x * 2561) >> 8;
        x = ((x & 0x00FF00FF00FF00FFULL) * 6553601) >> 16;
        return ((x & 0x0000FFFF0000FFFFULL) * 42949672960001ULL) >> 32;
    }

    /* zev_digits_word for 8 to 15 characters, out of line: at most 7 integer digits (the first of x), the dot,
       then at most 7 fraction digits from a second word (p[first + 1 ..]); absolute E grows to such lengths */
    ZEV_NOINLINE const unsigned char* zev_digits_long(const unsigned char* p, uint64_t x, unsigned first,
                                                      double* out) {
        uint64_t y, nondigit, mantissa;
        unsigned fraction;
        memcpy(&y, p + first + 1, 8);
        y ^= ZEV_BYTES('0');
        nondigit = zev_nondigits(y);
        if (!nondigit) return NULL;
        fraction = (unsigned)__builtin_ctzll(nondigit) >> 3;
        mantissa = first ? zev_word_value(x, first) : 0;  /* at most 14 digits in all: below 2**53, exact */
        if (fraction) mantissa = mantissa * (uint64_t)zev_pow10[fraction] + zev_word_value(y, fraction);
        *out = (double)mantissa / zev_pow10[fraction];
        return p + first + 1 + fraction;
    }
    #endif

    /* The unsigned number at p (p[0..15] must be readable): zev_number_run's end and value for digits[.digits] or
       .digits of at most 7 characters, read from one 8-byte word, or of at most 7 digits each side of the dot,
       from two; NULL for anything else.  Where the digit runs end comes from the words' non-digit bytes at once,
       not from a loop that stops at an unpredictable length; the digits become the mantissa by multiplications. */
    ZEV_INLINE const unsigned char* zev_digits_word(const unsigned char* p, double* out) {
    #if ZEV_SWAR
        uint64_t x, nondigit;
        unsigned first, stop, count, fraction = 0;
        memcpy(&x, p, 8);
        x ^= ZEV_BYTES('0');
        nondigit = zev_nondigits(x);
        if (!nondigit) return NULL;
        first = (unsigned)__builtin_ctzll(nondigit) >> 3;  /* integer digits */
        if (ZEV_LIKELY(p[first] == '.')) {
            nondigit &= nondigit - 1;
            if (!nondigit) return zev_digits_long(p, x, first, out);
            stop = (unsigned)__builtin_ctzll(nondigit) >> 3;  /* the byte after the fraction */
            count = stop - 1;
            if (!count) return NULL;
            fraction = count - first;
            /* the fraction's digits move down over the dot */
            x = ((x ^ (x >> 8)) & zev_low_bytes[first]) ^ (x >> 8);
        } else {
            if (!first) return NULL;  /* a sign, or no number */
            stop = count = first;
        }
        /* at most 7 digits: an exact double, and so is 10**k; dividing by 1.0 when there is no fraction is exact */
        *out = (double)zev_word_value(x, count) / zev_pow10[fraction];
        return p + stop;
    #else
        (void)p; (void)out;
        return NULL;
    #endif
    }

    /* zev_number_word of a signed number (p[0..16] readable), out of line: signs are rare in sliced G-code */
    ZEV_NOINLINE const unsigned char* zev_signed_word(const unsigned char* p, double* out) {
        const unsigned char* end;
        if (*p != '-' && *p != '+') return NULL;
        end = zev_digits_word(p + 1, out);
        if (end && *p == '-') *out = -*out;
        return end;
    }

    /* The number at p, [+-] then what zev_digits_word reads (p[0..16] must be readable): zev_number_run's end and
       value for the numbers of sliced G-code; NULL for any other (longer, or no number), which the caller reads
       with zev_number_run. */
    ZEV_INLINE const unsigned char* zev_number_word(const unsigned char* p, double* out) {
        const unsigned char* end = zev_digits_word(p, out);
        return ZEV_LIKELY(end != NULL) ? end : zev_signed_word(p, out);
    }

    /* zev_number for the general parameter scanner (G4, G28, G92: rare lines) */
    static const unsigned char* zev_param_number(const unsigned char* p, const unsigned char* end, double* out,
                                                 int* found) {
        return zev_number(p, end, out, found, 0);
    }

    /* scan_params for G0-G3, which read only X Y Z E F (values[0..4]): other letters' numbers are skipped as the
       non-letters they are made of, which gives the same result.  The valued bits (1 << slot), or -1 on error. */
    ZEV_INLINE int zev_scan_move(const unsigned char* p, const unsigned char* end, double* values,
                                 const int terminated) {
        int valued = 0, found;
        unsigned action;
        const unsigned char* close;
        while (p < end) {
            action = zev_move_action[*p];
            if (action == 0) { p++; continue; }
            if (action <= 5) {
                p = zev_number(p + 1, end, &values[action - 1], &found, terminated);
                if (!p) return -1;
                if (found) valued |= 1 << (action - 1); else valued &= ~(1 << (action - 1));
                continue;
            }
            if (action == 6) break;
            close = (const unsigned char*)memchr(p + 1, ')', (size_t)(end - p - 1));
            if (!close) break;
            p = close + 1;
        }
        return valued;
    }

    typedef struct {
        double x, y, z, e, feedrate, layer_z, filament, print_time;  /* NaN: unknown */
        double bbox[6];
        long layer;
        int have_bbox;
        int bbox_holds_position;  /* the current position is in the box: the last command was an extruding move */
        int relative, relative_e, inches;
    } zev_machine;

    typedef struct {
        double old_z;        /* ZChange: the new Z is m->z */
        double old_layer_z;  /* LayerChanged: the layer is m->layer, its Z m->layer_z */
    } zev_move_events;

    #define ZEV_ZCHANGE 1
    #define ZEV_LAYER 2

    ZEV_INLINE double zev_axis(const zev_machine* m, double value, double old) {
        if (m->relative) {
            if (isnan(old)) return old;
            value = old + value;
        }
        return isfinite(value) ? value : old;
    }

    ZEV_INLINE void zev_extend_bbox(zev_machine* m, double x, double y, double z) {
        if (!m->have_bbox) {
            m->bbox[0] = m->bbox[3] = x;
            m->bbox[1] = m->bbox[4] = y;
            m->bbox[2] = m->bbox[5] = z;
            m->have_bbox = 1;
            return;
        }
        if (x < m->bbox[0]) m->bbox[0] = x;
        if (y < m->bbox[1]) m->bbox[1] = y;
        if (z < m->bbox[2]) m->bbox[2] = z;
        if (x > m->bbox[3]) m->bbox[3] = x;
        if (y > m->bbox[4]) m->bbox[4] = y;
        if (z > m->bbox[5]) m->bbox[5] = z;
    }

    /* a new layer at z (ZEV_LAYER) unless the current layer is within tolerance; also when there is none (NaN).
       Extruding lower than the current layer is no new layer: it is where the current one really is (a purge
       line at Z 0.4, 0.3, then 0.2 before the first layer), or the next object of a sequential print. */
    ZEV_INLINE int zev_next_layer(zev_machine* m, double z, double tolerance, zev_move_events* events) {
        if (fabs(z - m->layer_z) <= tolerance) return 0;
        if (z < m->layer_z) {
            m->layer_z = z;
            return 0;
        }
        m->layer += 1;
        events->old_layer_z = m->layer_z;
        m->layer_z = z;
        return ZEV_LAYER;
    }

    /* A G0-G3 with its parameters in [p, end): the twin's Parser._move, events as ZEV_* bits, -1 on error. */
    ZEV_INLINE int zev_apply_move(zev_machine* m, int valued, const double* v, double tolerance,
                                  zev_move_events* events) {
        double ox = m->x, oy = m->y, oz = m->z, oe = m->e, nx = ox, ny = oy, nz = oz, de = 0.0, value;
        double dx, dy, dz, distance;
        int inches = m->inches, holds_start, fired = 0;
        if (valued & 1) nx = zev_axis(m, inches ? v[0] * 25.4 : v[0], ox);
        if (valued & 2) ny = zev_axis(m, inches ? v[1] * 25.4 : v[1], oy);
        if (valued & 4) nz = zev_axis(m, inches ? v[2] * 25.4 : v[2], oz);
        if (valued & 8) {
            value = inches ? v[3] * 25.4 : v[3];
            if (m->relative || m->relative_e) value = oe + value;
            if (isfinite(value)) {
                m->e = value;
                de = value - oe;
                if (!isfinite(de)) de = 0.0;
            }
        }
        if (valued & 16) {
            value = inches ? v[4] * 25.4 : v[4];
            if (isfinite(value)) m->feedrate = value;
        }
        m->x = nx;
        m->y = ny;
        m->z = nz;
        if (!isnan(nz) && (isnan(oz) || nz != oz)) {
            events->old_z = oz;
            fired |= ZEV_ZCHANGE;
        }
        holds_start = m->bbox_holds_position;
        m->bbox_holds_position = 0;
        if (de > 0.0 && ((nx != ox && !isnan(nx)) || (ny != oy && !isnan(ny)))) {
            if (!isnan(nx) && !isnan(ny) && !isnan(nz)) {
                zev_extend_bbox(m, nx, ny, nz);
                /* the start point is the last move's end point: already in the box after an extruding move */
                if (!holds_start && !isnan(ox) && !isnan(oy) && !isnan(oz)) zev_extend_bbox(m, ox, oy, oz);
                m->bbox_holds_position = 1;
            }
            if (!isnan(nz) && (isnan(m->layer_z) || fabs(nz - m->layer_z) > tolerance)) {
                fired |= zev_next_layer(m, nz, tolerance, events);
            }
        }
        m->filament += de;
        if (!isnan(m->feedrate) && m->feedrate > 0.0) {
            dx = !isnan(nx) && !isnan(ox) ? nx - ox : 0.0;
            dy = !isnan(ny) && !isnan(oy) ? ny - oy : 0.0;
            dz = !isnan(nz) && !isnan(oz) ? nz - oz : 0.0;
            distance = sqrt(dx * dx + dy * dy + dz * dz);
            if (distance == 0.0) distance = fabs(de);
            m->print_time += distance * 60.0 / m->feedrate;
        }
        return fired;
    }

    /* A small value: adding it to or subtracting it from any finite double (E) stays finite, as it is far below
       half the spacing of doubles near DBL_MAX (1e292).  zev_number_word's values are below 1e7. */
    #define ZEV_SMALL 1e15

    /* The state in which zev_apply_simple may replace zev_apply_move: absolute X Y Z in mm, every axis known
       (finite), a positive feedrate, the extrusion box started. */
    ZEV_INLINE int zev_simple_state(const zev_machine* m) {
        return !m->relative && !m->inches && m->have_bbox && !isnan(m->x) && !isnan(m->y) && !isnan(m->z)
               && m->feedrate > 0.0;
    }

    /* the print time of a move whose squared distance is given, at a known positive feedrate */
    ZEV_INLINE void zev_add_time(zev_machine* m, double squared, double de) {
        double distance = sqrt(squared);
        if (distance == 0.0) distance = fabs(de);
        m->print_time += distance * 60.0 / m->feedrate;
    }

    /* zev_apply_move in a simple state (zev_simple_state) for small values (below ZEV_SMALL), in v[ZEV_X] ..
       v[ZEV_F]: every old and new coordinate is finite and E's sum and difference cannot overflow, so none of the
       NaN and infinity checks can fail; the same operations in the same order give the same doubles. */
    ZEV_INLINE int zev_apply_simple(zev_machine* m, int valued, const double* v, double tolerance,
                                    zev_move_events* events) {
        const double ox = m->x, oy = m->y, oz = m->z, oe = m->e;
        const double nx = valued & ZEV_X ? v[ZEV_X] : ox, ny = valued & ZEV_Y ? v[ZEV_Y] : oy;
        const double nz = valued & ZEV_Z ? v[ZEV_Z] : oz;
        double de = 0.0, value, dx, dy, dz;
        int fired = 0;
        if (valued & ZEV_E) {
            value = m->relative_e ? oe + v[ZEV_E] : v[ZEV_E];
            m->e = value;
            de = value - oe;
        }
        if (valued & ZEV_F) m->feedrate = v[ZEV_F];
        m->x = nx;
        m->y = ny;
        m->z = nz;
        if (nz != oz) {
            events->old_z = oz;
            fired = ZEV_ZCHANGE;
        }
        if (de > 0.0 && (nx != ox || ny != oy)) {
            /* the box's min/max as zev_extend_bbox compares: the new value only when strictly beyond */
            m->bbox[0] = nx < m->bbox[0] ? nx : m->bbox[0];
            m->bbox[1] = ny < m->bbox[1] ? ny : m->bbox[1];
            m->bbox[2] = nz < m->bbox[2] ? nz : m->bbox[2];
            m->bbox[3] = nx > m->bbox[3] ? nx : m->bbox[3];
            m->bbox[4] = ny > m->bbox[4] ? ny : m->bbox[4];
            m->bbox[5] = nz > m->bbox[5] ? nz : m->bbox[5];
            if (!m->bbox_holds_position) {
                zev_extend_bbox(m, ox, oy, oz);
                m->bbox_holds_position = 1;
            }
            fired |= zev_next_layer(m, nz, tolerance, events);
        } else {
            m->bbox_holds_position = 0;
        }
        m->filament += de;
        if (m->feedrate > 0.0) {  /* an F of the line may have made it 0 or negative */
            dx = nx - ox;
            dy = ny - oy;
            dz = nz - oz;
            zev_add_time(m, dx * dx + dy * dy + dz * dz, de);
        }
        return fired;
    }

    /* zev_apply_simple for "G1 X.. Y.. E.." (nine lines in ten of sliced G-code): no Z, no F.  Z stays, so no
       ZChange, and when the last move extruded, Z is already within the box; dz is 0, and adding 0.0 to a sum of
       squares changes nothing. */
    ZEV_INLINE int zev_apply_xye(zev_machine* m, double nx, double ny, double e, double tolerance,
                                 zev_move_events* events) {
        const double ox = m->x, oy = m->y, z = m->z, oe = m->e;
        const double value = m->relative_e ? oe + e : e, de = value - oe;
        double dx, dy;
        int fired = 0;
        m->e = value;
        m->x = nx;
        m->y = ny;
        if (de > 0.0 && (nx != ox || ny != oy)) {
            if (m->bbox_holds_position) {
                m->bbox[0] = nx < m->bbox[0] ? nx : m->bbox[0];
                m->bbox[1] = ny < m->bbox[1] ? ny : m->bbox[1];
                m->bbox[3] = nx > m->bbox[3] ? nx : m->bbox[3];
                m->bbox[4] = ny > m->bbox[4] ? ny : m->bbox[4];
            } else {
                zev_extend_bbox(m, nx, ny, z);
                zev_extend_bbox(m, ox, oy, z);
                m->bbox_holds_position = 1;
            }
            fired = zev_next_layer(m, z, tolerance, events);
        } else {
            m->bbox_holds_position = 0;
        }
        m->filament += de;
        dx = nx - ox;
        dy = ny - oy;
        zev_add_time(m, dx * dx + dy * dy, de);
        return fired;
    }

    ZEV_INLINE int zev_move_impl(zev_machine* m, const unsigned char* p, const unsigned char* end, double tolerance,
                                 zev_move_events* events, const int terminated) {
        double v[5];
        int valued = zev_scan_move(p, end, v, terminated);
        if (valued < 0) return -1;
        return zev_apply_move(m, valued, v, tolerance, events);
    }

    static int zev_move(zev_machine* m, const unsigned char* p, const unsigned char* end, double tolerance,
                        zev_move_events* events) {
        return zev_move_impl(m, p, end, tolerance, events, 0);
    }

    /* the same for a line whose terminator (CR or LF) is at end */
    static int zev_move_terminated(zev_machine* m, const unsigned char* p, const unsigned char* end,
                                   double tolerance, zev_move_events* events) {
        return zev_move_impl(m, p, end, tolerance, events, 1);
    }

    #define ZEV_MAX_LINE 65536
    #define ZEV_LONG 256  /* zev_run_moves: a value of the line is not small (ZEV_SMALL) */

    /* the last CR or LF in [p, end), or NULL */
    static const unsigned char* zev_last_terminator(const unsigned char* p, const unsigned char* end) {
        while (end > p) {
            end--;
            if (*end == 10 || *end == 13) return end;  /* LF CR */
        }
        return NULL;
    }

    /* the first CR or LF in [p, last], where last is one */
    ZEV_INLINE const unsigned char* zev_line_end(const unsigned char* p, const unsigned char* last) {
        const unsigned char* newline = (const unsigned char*)memchr(p, 10, (size_t)(last - p + 1));
        const unsigned char* bound = newline ? newline : last + 1;
        const unsigned char* carriage = (const unsigned char*)memchr(p, 13, (size_t)(bound - p));
        return carriage ? carriage : newline;
    }

    /* the rare paths of zev_run_moves, out of its loop so that the loop keeps its values in registers (without
       zev_digits_word, every number is read by zev_number_long: then inline) */
    #if ZEV_SWAR
    ZEV_NOINLINE
    #else
    ZEV_INLINE
    #endif
    const unsigned char* zev_number_long(const unsigned char* p, const unsigned char* end, double* out, int* found) {
        return zev_number_run(p, end, out, found);
    }

    ZEV_NOINLINE int zev_apply_general(zev_machine* m, int valued, const double* v, double tolerance,
                                       zev_move_events* events) {
        return zev_apply_move(m, valued, v, tolerance, events);
    }

    /* The G0/G1 lines ("G1 " or "G0 " then parameters up to the terminator or a ; or * after them, no ( comment,
       not over-long) and comment lines from *pp on, in one pass each: the scanner stops at the line's terminator,
       so no search for it is made first (a comment's end is searched for).
       last is a terminator (CR or LF), so every line starting before it ends at or before it.  Returns the lines
       done (-1 with an exception set on error).  It stops before the first line it does not take (*pp = its
       start, *term = NULL), or after a line that fired events or ends in a CR at the end of the buffer (*pp = its
       start, *term = its terminator, *fired = the events, the line counted).  Not inlined into the Cython
       caller: in a function of its own the loop keeps its values in registers. */
    ZEV_NOINLINE Py_ssize_t zev_run_moves(zev_machine* m, const unsigned char** pp, const unsigned char* last,
                                    const unsigned char* end, double tolerance, zev_move_events* events,
                                    int* fired, const unsigned char** term) {
        const unsigned char* p = *pp;
        const unsigned char* q;
        const unsigned char* r;
        /* a letter at or before this has 18 bytes after it, as zev_number_word may read of the number after it */
        const uintptr_t wide_end = (uintptr_t)end - 19;
        const uintptr_t fast_end = (uintptr_t)end - 64;  /* a line starting at or before it may take the XYE path */
        zev_machine s = *m;  /* the state in locals (registers) for the loop, written back when it returns */
        Py_ssize_t done = 0;
        double v[ZEV_F + 1], general[5], x, y, e;  /* v[ZEV_X] .. v[ZEV_F] */
        int valued, found, f, simple = zev_simple_state(&s);
        unsigned action;
        *term = NULL;
        *fired = 0;
        v[ZEV_X] = v[ZEV_Y] = v[ZEV_Z] = v[ZEV_E] = v[ZEV_F] = 0.0;  /* copied to general[] whether set or not */
        while (p < last) {
            if (*p == ';') {
                /* a comment line (one in forty of the bunny): nothing to do but find its end, here rather than
                   through the caller's general path; an over-long one goes there, which reports it */
                q = zev_line_end(p + 1, last);
                if (q - p > ZEV_MAX_LINE) break;
                f = 0;
                goto line_done;
            }
            if (ZEV_SWAR && (uintptr_t)p <= fast_end && memcmp(p, "G1 X", 4) == 0 && simple) {
                /* "G1 X.. Y.. E.." and its terminator, each number by zev_number_word (no read goes past p[56]
                   when it gets this far), else the line goes the general way below */
                q = zev_number_word(p + 4, &x);
                if (q && memcmp(q, " Y", 2) == 0 && (q = zev_number_word(q + 2, &y)) != NULL
                        && memcmp(q, " E", 2) == 0 && (q = zev_number_word(q + 2, &e)) != NULL
                        && (*q == 10 || *q == 13)) {
                    f = zev_apply_xye(&s, x, y, e, tolerance, events);
                    goto line_done;
                }
            }
            if (!(p[0] == 'G' && (p[1] == '1' || p[1] == '0') && p[2] == ' ')) break;
            valued = 0;  /* the ZEV_X .. ZEV_F of the values set; ZEV_LONG: one of them is not small */
            q = p + 3;
            for (;;) {
                action = zev_run_action[*q];
                if (action == 0) { q++; continue; }
                if (action > ZEV_F) break;
                r = ZEV_SWAR && (uintptr_t)q <= wide_end ? zev_number_word(q + 1, &v[action]) : NULL;
                if (ZEV_LIKELY(r != NULL)) {
                    valued |= action;
                } else {
                    r = zev_number_long(q + 1, end, &v[action], &found);
                    if (!r) { *m = s; *pp = p; return -1; }
                    if (!found) valued &= ~action;
                    else valued |= fabs(v[action]) < ZEV_SMALL ? action : action | ZEV_LONG;  /* also NaN-safe */
                }
                q = r;
            }
            if (action == ZEV_END) q = zev_line_end(q, last);  /* ; or *: the rest of the line is not read */
            else if (action != ZEV_EOL) break;  /* a ( comment: the general path */
            if (q - p > ZEV_MAX_LINE) break;
            if (simple && !(valued & ZEV_LONG)) {
                f = zev_apply_simple(&s, valued, v, tolerance, events);
                if (valued & ZEV_F) simple = v[ZEV_F] > 0.0;
            } else {
                general[0] = v[ZEV_X];
                general[1] = v[ZEV_Y];
                general[2] = v[ZEV_Z];
                general[3] = v[ZEV_E];
                general[4] = v[ZEV_F];
                *m = s;
                f = zev_apply_general(m, valued, general, tolerance, events);
                s = *m;
                simple = zev_simple_state(&s);
            }
        line_done:
            done++;
            if (f || (*q == 13 && q + 1 == end)) {  /* a CR last: the next buffer may start with its LF */
                *fired = f;
                *term = q;
                break;
            }
            p = q + 1 + (*q == 13 && q[1] == 10);  /* CRLF */
        }
        *m = s;
        *pp = p;
        return done;
    }
    """
    ctypedef struct zev_machine:
        double x, y, z, e, feedrate, layer_z, filament, print_time
        double bbox[6]
        long layer
        bint have_bbox, bbox_holds_position, relative, relative_e, inches
    ctypedef struct zev_move_events:
        double old_z, old_layer_z
    int ZEV_ZCHANGE, ZEV_LAYER
    int zev_move(zev_machine* m, const unsigned char* p, const unsigned char* end, double tolerance,
                 zev_move_events* events) except -1
    int zev_move_terminated(zev_machine* m, const unsigned char* p, const unsigned char* end, double tolerance,
                            zev_move_events* events) except -1
    void zev_init_tables()
    int ZEV_MAX_LINE
    const unsigned char* zev_last_terminator(const unsigned char* p, const unsigned char* end) noexcept
    Py_ssize_t zev_run_moves(zev_machine* m, const unsigned char** pp, const unsigned char* last,
                             const unsigned char* end, double tolerance, zev_move_events* events, int* fired,
                             const unsigned char** term) except -1
    int zev_slow_float(const unsigned char* s, Py_ssize_t n, double* out) except -1
    const unsigned char* zev_param_number(const unsigned char* p, const unsigned char* end, double* out,
                                          int* found)

zev_init_tables()
if ZEV_MAX_LINE != MAX_LINE:
    raise ImportError("_cparser's C code was built with another line limit than _rules has; rebuild it")


# ----------------------------------------------------------------------------------------- firmware replies

cdef inline bint starts_with_ci(const unsigned char* s, Py_ssize_t i, Py_ssize_t n, const char* word,
                                Py_ssize_t length) noexcept nogil:
    cdef Py_ssize_t k
    if n - i < length:
        return False
    for k in range(length):
        if lower(s[i + k]) != <unsigned char>word[k]:
            return False
    return True


cdef inline Py_ssize_t e_item(const unsigned char* s, Py_ssize_t i, Py_ssize_t n, dict result) except -2:
    """E<digits>:<float> at i, stored as result["e<digits>"]: its end, or -1."""
    cdef Py_ssize_t digits_end
    cdef Py_ssize_t end
    cdef double value
    if i >= n or s[i] != 69 or i + 1 >= n or not is_digit(s[i + 1]):
        return -1
    digits_end = i + 1
    while digits_end < n and is_digit(s[digits_end]):
        digits_end += 1
    if digits_end >= n or s[digits_end] != 58:
        return -1
    end = greedy_float(s, digits_end + 1, n, &value)
    if end < 0:
        return -1
    result["e" + (<bytes>s[i + 1:digits_end]).decode("ascii")] = value
    return end


cdef inline Py_ssize_t xyz(const unsigned char* s, Py_ssize_t i, Py_ssize_t n, double* out) except -2:
    """After an "X:" at i-2: X:f Y:f Z:f as the OctoPrint regex reads them; the end of Z's number, or -1."""
    cdef int axis
    for axis in range(3):
        if axis:
            i = skip_spaces(s, i, n)
            if i + 1 >= n or s[i] != 88 + axis or s[i + 1] != 58:  # Y: Z:
                return -1
            i += 2
        i = skip_spaces(s, i, n)
        i = greedy_float(s, i, n, &out[axis])
        if i < 0:
            return -1
    return i


cdef object parse_position(const unsigned char* s, Py_ssize_t n):
    """The twin's _rules.parse_position, phase A (OctoPrint's search) then phase B (head of the line)."""
    cdef Py_ssize_t start = 0
    cdef Py_ssize_t i
    cdef Py_ssize_t j
    cdef const unsigned char* found
    cdef double coords[3]
    cdef double e
    cdef dict result
    while True:
        found = <const unsigned char*>memchr(s + start, 88, n - start) if start < n else NULL
        if found == NULL:
            break
        start = found - s + 1
        if start >= n or s[start] != 58:
            continue
        i = xyz(s, start + 1, n, coords)
        if i < 0:
            continue
        i = skip_spaces(s, i, n)
        if i + 1 < n and s[i] == 69 and s[i + 1] == 58:  # E:
            j = greedy_float(s, skip_spaces(s, i + 2, n), n, &e)
            if j < 0:
                continue
            result = {"x": coords[0], "y": coords[1], "z": coords[2], "e": e}
        else:
            result = {"x": coords[0], "y": coords[1], "z": coords[2], "e": None}
            j = e_item(s, i, n, result)
            if j < 0:
                continue
        while True:
            j = e_item(s, skip_spaces(s, j, n), n, result)
            if j < 0:
                break
        return result
    # phase B: no E, only at the head of the line (after "ok" and Smoothie's "C:" / "WCS:")
    i = skip_spaces(s, 0, n)
    if i + 1 < n and s[i] == 111 and s[i + 1] == 107 and i + 2 < n and is_space(s[i + 2]):  # ok
        i = skip_spaces(s, i + 2, n)
    if i + 1 < n and s[i] == 67 and s[i + 1] == 58:  # C:
        i = skip_spaces(s, i + 2, n)
    elif i + 3 < n and s[i] == 87 and s[i + 1] == 67 and s[i + 2] == 83 and s[i + 3] == 58:  # WCS:
        i = skip_spaces(s, i + 4, n)
    if i + 1 < n and s[i] == 88 and s[i + 1] == 58:
        if xyz(s, i + 2, n, coords) >= 0:
            return {"x": coords[0], "y": coords[1], "z": coords[2], "e": None}
    return None


cdef object parse_invalid_tool(const unsigned char* s, Py_ssize_t n):
    """The twin's _rules.parse_invalid_tool."""
    cdef Py_ssize_t i = 0
    cdef Py_ssize_t j
    cdef long tool = -2
    while i < n and (s[i] == 32 or s[i] == 9):
        i += 1
    if starts_with_ci(s, i, n, b"echo:", 5):
        i += 5
        while i < n and (s[i] == 32 or s[i] == 9):
            i += 1
    if i + 1 < n and lower(s[i]) == 116 and is_digit(s[i + 1]):  # t<digits><blanks>
        j = small_int(s, i + 1, n, &tool)
        if j < n and (s[j] == 32 or s[j] == 9):
            while j < n and (s[j] == 32 or s[j] == 9):
                j += 1
            i = j
        else:
            return None
    if not starts_with_ci(s, i, n, b"invalid extruder", 16):
        return None
    i += 16
    while i < n and (s[i] == 32 or s[i] == 9):
        i += 1
    if i != n:
        return None
    if tool == -2:
        return CURRENT_TOOL
    if tool < 0:
        return None
    return tool


# ----------------------------------------------------------------------------------------------- the parser

cdef struct Stream:
    long long fed
    long long lines
    unsigned char* carry
    Py_ssize_t carry_kept
    long long carry_len  # -1: no partial line
    long long carry_offset
    bint pending_cr
    unsigned char head[4]
    int head_len
    bint refused


cdef inline void init_stream(Stream* stream) noexcept:
    stream.fed = 0
    stream.lines = 0
    stream.carry_kept = 0
    stream.carry_len = -1
    stream.carry_offset = 0
    stream.pending_cr = False
    stream.head_len = 0
    stream.refused = False


cdef extern from "Python.h":
    ctypedef struct PyTypeObject
    object PyType_GenericAlloc(PyTypeObject* type, Py_ssize_t items)
    ctypedef struct PyMemberDef:
        Py_ssize_t offset
    ctypedef struct PyMemberDescrObject:
        PyMemberDef* d_member

cdef str GROUP = _rules.GROUP
cdef Py_ssize_t EVENT_SLOTS[5]  # where an Event keeps name, group, payload, offset, line (its __slots__)
cdef bint EVENT_BY_SLOTS = False


cdef inline void set_slot(object target, Py_ssize_t offset, object value) noexcept:
    Py_INCREF(value)
    (<PyObject**>(<char*><PyObject*>target + offset))[0] = <PyObject*>value


cdef object new_event(str name, dict payload, long long offset, long long lineno):
    """Event(name, payload, offset, lineno) without the call of its Python __init__, which is most of an event's
    cost: what object.__new__ does, then the slots filled here (set up and checked at import below)."""
    if not EVENT_BY_SLOTS:
        return Event(name, payload, offset, lineno)
    event = PyType_GenericAlloc(<PyTypeObject*>Event, 0)
    set_slot(event, EVENT_SLOTS[0], name)
    set_slot(event, EVENT_SLOTS[1], GROUP)
    set_slot(event, EVENT_SLOTS[2], payload)
    set_slot(event, EVENT_SLOTS[3], offset)
    set_slot(event, EVENT_SLOTS[4], lineno)
    return event


def _set_up_new_event():
    """Fill the slots by hand only when Event is what new_event expects: exactly those five slots, object's
    __new__, and an __init__ that stores its arguments there with the group defaulted (checked on an event)."""
    global EVENT_BY_SLOTS
    fields = ("name", "group", "payload", "offset", "line")
    if tuple(Event.__slots__) != fields or Event.__new__ is not object.__new__ or Event.__mro__ != (Event, object):
        return
    for k, field in enumerate(fields):
        descriptor = Event.__dict__.get(field)
        if type(descriptor) is not MemberDescriptorType:
            return
        EVENT_SLOTS[k] = (<PyMemberDescrObject*>descriptor).d_member.offset
    EVENT_BY_SLOTS = True
    made = new_event("ZChange", {"new": 1.0, "old": None}, 7, 2)
    expected = Event("ZChange", {"new": 1.0, "old": None}, 7, 2)
    if not (type(made) is Event and made == expected and made.group == expected.group == GROUP):
        EVENT_BY_SLOTS = False


_set_up_new_event()


cdef inline object maybe(double value):
    return None if c_isnan(value) else value


@cython.final
cdef class Parser:
    """G-code sent to the printer and its replies → events, with the machine state tracked (compiled)."""

    cdef zev_machine m  # the machine state, in C for zev_move
    cdef long tool, tool_before
    cdef set invalid_tools
    cdef int n_suppressed
    cdef char sup_letter[MAX_SUPPRESSED]
    cdef long sup_number[MAX_SUPPRESSED]
    cdef long sup_subcode[MAX_SUPPRESSED]
    cdef int sup_reason[MAX_SUPPRESSED]
    cdef bint suppress_moves  # a G0-G3 is configured: the move fast path must consult the table
    cdef Stream sent_stream, received_stream
    cdef list events
    cdef public long long long_lines

    def __cinit__(self):
        self.sent_stream.carry = NULL
        self.received_stream.carry = NULL

    def __init__(self, config=None):
        cdef int k = 0
        table = _rules.suppression_table(config)
        self.suppress_moves = False
        for (letter, number, subcode), reason in table.items():
            self.sup_letter[k] = ord(letter)
            self.sup_number[k] = number
            self.sup_subcode[k] = subcode
            self.sup_reason[k] = REASON_BLOCKED if reason == _rules.BLOCKED else REASON_IGNORED
            if letter == "G" and number <= 3:
                self.suppress_moves = True
            k += 1
        self.n_suppressed = k
        self.m.x = self.m.y = self.m.z = NAN
        self.m.e = 0.0
        self.m.feedrate = NAN
        self.m.layer_z = NAN
        self.m.filament = 0.0
        self.m.print_time = 0.0
        self.m.have_bbox = False
        self.m.bbox_holds_position = False
        self.tool = self.tool_before = self.m.layer = 0
        self.m.relative = self.m.relative_e = self.m.inches = False
        self.invalid_tools = set()
        init_stream(&self.sent_stream)
        init_stream(&self.received_stream)
        self.events = []
        self.long_lines = 0

    def __dealloc__(self):
        if self.sent_stream.carry != NULL:
            PyMem_Free(self.sent_stream.carry)
        if self.received_stream.carry != NULL:
            PyMem_Free(self.received_stream.carry)

    # ------------------------------------------------------------------------------------------------ public

    def feed_sent(self, data):
        self.events = []
        self._feed_object(&self.sent_stream, data, True, False)
        return self.events

    def feed_received(self, data):
        self.events = []
        self._feed_object(&self.received_stream, data, False, False)
        return self.events

    def sent(self, line):
        self.events = []
        self._feed_object(&self.sent_stream, line, True, True)
        return self.events

    def received(self, line):
        self.events = []
        self._feed_object(&self.received_stream, line, False, True)
        return self.events

    def flush(self):
        """End both streams' partial last lines (sent first); returns their events."""
        self.events = []
        if self.sent_stream.carry_len >= 0:
            self._complete_carry(&self.sent_stream, NULL, 0, True)
        if self.received_stream.carry_len >= 0:
            self._complete_carry(&self.received_stream, NULL, 0, False)
        return self.events

    @property
    def state(self):
        bbox = None
        if self.m.have_bbox:
            bbox = (self.m.bbox[0], self.m.bbox[1], self.m.bbox[2], self.m.bbox[3], self.m.bbox[4], self.m.bbox[5])
        return ParserState(
            x=maybe(self.m.x), y=maybe(self.m.y), z=maybe(self.m.z), e=self.m.e, tool=self.tool,
            feedrate=maybe(self.m.feedrate), relative=self.m.relative, relative_e=self.m.relative_e,
            units="in" if self.m.inches else "mm", layer=self.m.layer, layer_z=maybe(self.m.layer_z),
            filament=self.m.filament, extrusion_bbox=bbox, print_time=self.m.print_time,
            invalid_tools=tuple(sorted(self.invalid_tools)))

    @property
    def sent_lines(self):
        return self.sent_stream.lines

    @property
    def sent_bytes(self):
        return self.sent_stream.fed

    @property
    def received_lines(self):
        return self.received_stream.lines

    @property
    def received_bytes(self):
        return self.received_stream.fed

    # ---------------------------------------------------------------------------------------------- streams

    cdef int _feed_object(self, Stream* stream, object data, bint sent, bint one_line) except -1:
        cdef Py_buffer view
        cdef const unsigned char* buf
        cdef Py_ssize_t n
        if PyBytes_CheckExact(data):
            buf = <const unsigned char*>PyBytes_AS_STRING(data)
            n = PyBytes_GET_SIZE(data)
            if one_line:
                return self._one_line(stream, buf, n, sent)
            return self._feed(stream, buf, n, sent)
        if isinstance(data, str):
            data = (<str>data).encode("utf-8", "surrogateescape")
            return self._feed_object(stream, data, sent, one_line)
        if isinstance(data, (bytes, bytearray, memoryview)):
            PyObject_GetBuffer(data, &view, PyBUF_SIMPLE)
            try:
                if one_line:
                    self._one_line(stream, <const unsigned char*>view.buf, view.len, sent)
                else:
                    self._feed(stream, <const unsigned char*>view.buf, view.len, sent)
            finally:
                PyBuffer_Release(&view)
            return 0
        raise TypeError(f"expected bytes or str, not {type(data).__name__}")

    cdef int _one_line(self, Stream* stream, const unsigned char* buf, Py_ssize_t n, bint sent) except -1:
        """sent()/received(): the line, plus an LF when it has no terminator."""
        if (stream.carry_len < 0 and not stream.pending_cr and stream.head_len == 4 and not stream.refused
                and n <= MAX_LINE and memchr(buf, 10, n) == NULL and memchr(buf, 13, n) == NULL):
            # the per-command path of the printer link: one complete line, nothing pending
            stream.lines += 1
            if sent:
                self._sent_line(buf, n, stream.fed, stream.lines)
            else:
                self._received_line(buf, n, stream.fed, stream.lines)
            stream.fed += n + 1
            return 0
        self._feed(stream, buf, n, sent)
        if n == 0 or (buf[n - 1] != 10 and buf[n - 1] != 13):
            self._feed(stream, <const unsigned char*>b"\n", 1, sent)
        return 0

    cdef int _check_head(self, Stream* stream, const unsigned char* buf, Py_ssize_t n) except -1:
        cdef Py_ssize_t take
        name = "sent" if stream == &self.sent_stream else "received"
        if stream.refused:
            raise BinaryGcodeError(f"the {name} stream")
        if stream.head_len < 4:
            take = min(4 - stream.head_len, n)
            memcpy(stream.head + stream.head_len, buf, take)
            stream.head_len += take
            if stream.head_len == 4 and memcmp(stream.head, <const char*>MAGIC, 4) == 0:
                stream.refused = True
                raise BinaryGcodeError(f"the {name} stream")
        return 0

    cdef int _keep_partial(self, Stream* stream, const unsigned char* buf, Py_ssize_t n, long long offset) except -1:
        cdef Py_ssize_t take
        if stream.carry == NULL:
            stream.carry = <unsigned char*>PyMem_Malloc(MAX_LINE)
            if stream.carry == NULL:
                raise MemoryError()
        if stream.carry_len < 0:
            stream.carry_len = 0
            stream.carry_kept = 0
            stream.carry_offset = offset
        take = min(<Py_ssize_t>n, MAX_LINE - stream.carry_kept)
        if take > 0:
            memcpy(stream.carry + stream.carry_kept, buf, take)
            stream.carry_kept += take
        stream.carry_len += n
        return 0

    cdef int _complete_carry(self, Stream* stream, const unsigned char* tail, Py_ssize_t n, bint sent) except -1:
        self._keep_partial(stream, tail, n, 0)
        cdef long long length = stream.carry_len
        stream.carry_len = -1
        stream.lines += 1
        if length > MAX_LINE:
            self._long_line(stream, stream.carry_offset, length)
        if sent:
            self._sent_line(stream.carry, stream.carry_kept, stream.carry_offset, stream.lines)
        else:
            self._received_line(stream.carry, stream.carry_kept, stream.carry_offset, stream.lines)
        return 0

    cdef int _long_line(self, Stream* stream, long long offset, long long length) except -1:
        self.long_lines += 1
        name = "sent" if stream == &self.sent_stream else "received"
        _rules.report_long_line(name, offset, stream.lines, length)
        return 0

    cdef int _feed(self, Stream* stream, const unsigned char* buf, Py_ssize_t n, bint sent) except -1:
        cdef long long base = stream.fed
        cdef const unsigned char* p = buf
        cdef const unsigned char* end = buf + n
        cdef const unsigned char* newline
        cdef const unsigned char* carriage
        cdef const unsigned char* term
        cdef Py_ssize_t length
        cdef zev_move_events moved
        cdef int fired
        cdef const unsigned char* last = NULL
        cdef const unsigned char* run_term
        cdef Py_ssize_t done
        cdef bint run = sent and not self.suppress_moves
        if stream.refused or stream.head_len < 4:
            self._check_head(stream, buf, n)
        if stream.pending_cr and n > 0:
            stream.pending_cr = False
            if buf[0] == 10:
                p += 1
        if stream.carry_len >= 0:
            term = find_terminator(p, end)
            if term == NULL:
                self._keep_partial(stream, p, end - p, 0)
                stream.fed = base + n
                return 0
            self._complete_carry(stream, p, term - p, sent)
            p = self._after_terminator(stream, term, end)
        newline = <const unsigned char*>memchr(p, 10, end - p) if p < end else NULL
        if run:
            last = zev_last_terminator(p, end)
            run = last != NULL
        while True:
            if run and p < last:
                # simple G0/G1 lines, nine in ten of sliced G-code, in a C loop; it stops at anything else
                done = zev_run_moves(&self.m, &p, last, end, TOLERANCE, &moved, &fired, &run_term)
                stream.lines += done
                if run_term != NULL:
                    if fired:
                        self._move_events(fired, &moved, base + (p - buf), stream.lines)
                    p = self._after_terminator(stream, run_term, end)
                    continue
            # the LF search stays valid until the walk passes it (NULL: none in the rest); a CR is looked for
            # only before it, in this line: a search of the whole buffer for CRs that LF files do not have would
            # read it all once more (5 % of the bunny's time)
            if newline != NULL and newline < p:
                newline = <const unsigned char*>memchr(p, 10, end - p) if p < end else NULL
            term = newline if newline != NULL else end
            carriage = <const unsigned char*>memchr(p, 13, term - p) if p < end else NULL
            term = carriage if carriage != NULL else newline
            if term == NULL:
                break
            length = term - p
            stream.lines += 1
            if length > MAX_LINE:
                self._long_line(stream, base + (p - buf), length)
                length = MAX_LINE
            if not sent:
                self._received_line(p, length, base + (p - buf), stream.lines)
            elif (length >= 3 and p[0] == 71 and p[2] == 32 and (p[1] == 49 or p[1] == 48)
                  and length == term - p and not self.suppress_moves):
                # "G1 " / "G0 ", nine lines in ten of sliced G-code, straight to the move (what _sent_line does
                # with them); the line's terminator at p[length] ends its last number
                fired = zev_move_terminated(&self.m, p + 3, p + length, TOLERANCE, &moved)
                if fired:
                    self._move_events(fired, &moved, base + (p - buf), stream.lines)
            else:
                self._sent_line(p, length, base + (p - buf), stream.lines)
            p = self._after_terminator(stream, term, end)
        if p < end:
            self._keep_partial(stream, p, end - p, base + (p - buf))
        stream.fed = base + n
        return 0

    cdef inline const unsigned char* _after_terminator(self, Stream* stream, const unsigned char* term,
                                                       const unsigned char* end) noexcept:
        if term[0] == 13:
            if term + 1 < end:
                if term[1] == 10:
                    return term + 2
            else:
                stream.pending_cr = True
        return term + 1

    cdef inline void _emit(self, str name, dict payload, long long offset, long long lineno) except *:
        self.events.append(new_event(name, payload, offset, lineno))

    # ------------------------------------------------------------------------------------------- sent lines

    cdef int _sent_line(self, const unsigned char* s, Py_ssize_t n, long long offset, long long lineno) except -1:
        cdef Py_ssize_t i = 0
        cdef Py_ssize_t command_start
        cdef unsigned char c
        cdef const unsigned char* close
        cdef long number
        cdef long subcode = -1
        cdef int reason = REASON_NONE
        cdef int k
        if n >= 3 and s[0] == 71 and s[2] == 32 and (s[1] == 49 or s[1] == 48) and not self.suppress_moves:
            # "G1 " / "G0 ": nine lines in ten of sliced G-code; the general path below reads them the same way
            return self._move(s, 3, n, offset, lineno)
        while i < n and is_blank(s[i]):
            i += 1
        if i >= n or s[i] == 59:
            return 0
        if (s[i] | 0x20) == 110 and i + 1 < n and is_digit(s[i + 1]):  # N<digits>
            i += 2
            while i < n and is_digit(s[i]):
                i += 1
            while i < n and is_blank(s[i]):
                i += 1
        while i < n and s[i] == 40:  # ( … ) before the command
            close = <const unsigned char*>memchr(s + i + 1, 41, n - i - 1)
            if close == NULL:
                return 0
            i = close - s + 1
            while i < n and is_blank(s[i]):
                i += 1
        if i + 1 >= n:
            return 0
        c = s[i] & 0xDF  # upper case
        if (c != 71 and c != 77 and c != 84) or not is_digit(s[i + 1]):  # G M T + digit
            return 0
        command_start = i
        i = small_int(s, i + 1, n, &number)
        if i + 1 < n and s[i] == 46 and is_digit(s[i + 1]):
            i = small_int(s, i + 1, n, &subcode)
            if subcode < 0:
                return 0
        if i < n and s[i] == 95:  # _: a Klipper macro such as G28_SAFE
            return 0
        if number < 0:
            return 0
        if self.n_suppressed and (c != 71 or number > 3 or subcode >= 0 or self.suppress_moves):
            for k in range(self.n_suppressed):
                if self.sup_letter[k] == c and self.sup_number[k] == number and self.sup_subcode[k] == subcode:
                    reason = self.sup_reason[k]
                    break
        if reason == REASON_NONE and c == 84 and subcode < 0 and self.invalid_tools and number in self.invalid_tools:
            reason = REASON_INVALID_TOOL
        if reason != REASON_NONE:
            return self._suppressed(s, n, command_start, c, number, subcode, reason, offset, lineno)
        if subcode >= 0:
            return 0
        if c == 71:  # G
            if number <= 3:
                return self._move(s, i, n, offset, lineno)
            return self._g_other(s, i, n, number, offset, lineno)
        if c == 77:  # M
            if number == 82:
                self.m.relative_e = False
            elif number == 83:
                self.m.relative_e = True
            elif number < 1024 and M_EVENT[number]:
                self._emit(M_NAMES[M_EVENT[number]], {}, offset, lineno)
            return 0
        if number != self.tool:  # T
            self._emit("ToolChange", {"old": self.tool, "new": number}, offset, lineno)
            self.tool_before = self.tool
            self.tool = number
        return 0

    cdef int _suppressed(self, const unsigned char* s, Py_ssize_t n, Py_ssize_t start, unsigned char letter,
                         long number, long subcode, int reason, long long offset, long long lineno) except -1:
        cdef Py_ssize_t cut = start
        while cut < n and s[cut] != 59 and s[cut] != 42:
            cut += 1
        while cut > start and is_blank(s[cut - 1]):
            cut -= 1
        key = (chr(letter), number, subcode)
        payload = _rules.suppressed_payload(REASON_NAMES[reason], key, PyBytes_FromStringAndSize(
            <const char*>(s + start), cut - start))
        self._emit("CommandSuppressed", payload, offset, lineno)
        return 0

    cdef int _g_other(self, const unsigned char* s, Py_ssize_t i, Py_ssize_t n, long number, long long offset,
                      long long lineno) except -1:
        cdef double values[26]
        cdef unsigned int seen = 0
        cdef unsigned int valued = 0
        cdef double value
        if number == 28 or number == 92:
            self.m.bbox_holds_position = False
        if number == 28:
            scan_params(s, i, n, values, &seen, &valued)
            self._set_feedrate(values, valued)
            if not (seen & BITS_XYZ):
                seen |= BITS_XYZ
            if seen & BIT_X:
                self.m.x = NAN
            if seen & BIT_Y:
                self.m.y = NAN
            if seen & BIT_Z:
                self.m.z = NAN
            self._emit("Home", {}, offset, lineno)
        elif number == 4:
            scan_params(s, i, n, values, &seen, &valued)
            if valued & BIT_S and c_isfinite(values[18]):
                if values[18] > 0:
                    self.m.print_time += values[18]
            elif valued & BIT_P and c_isfinite(values[15]) and values[15] > 0:
                self.m.print_time += values[15] / 1000.0
            self._emit("Dwell", {}, offset, lineno)
        elif number == 92:
            scan_params(s, i, n, values, &seen, &valued)
            if valued & BIT_X:
                value = values[23] * INCH if self.m.inches else values[23]
                if c_isfinite(value):
                    self.m.x = value
            if valued & BIT_Y:
                value = values[24] * INCH if self.m.inches else values[24]
                if c_isfinite(value):
                    self.m.y = value
            if valued & BIT_Z:
                value = values[25] * INCH if self.m.inches else values[25]
                if c_isfinite(value):
                    self.m.z = value
            if valued & BIT_E:
                value = values[4] * INCH if self.m.inches else values[4]
                if c_isfinite(value):
                    self.m.e = value
        elif number == 90:
            self.m.relative = False
        elif number == 91:
            self.m.relative = True
        elif number == 20:
            self.m.inches = True
        elif number == 21:
            self.m.inches = False
        return 0

    cdef inline void _set_feedrate(self, double* values, unsigned int valued) noexcept:
        cdef double value
        if valued & BIT_F:
            value = values[5] * INCH if self.m.inches else values[5]
            if c_isfinite(value):
                self.m.feedrate = value

    cdef inline double _axis(self, double value, double old) noexcept:
        if self.m.relative:
            if c_isnan(old):
                return old
            value = old + value
        return value if c_isfinite(value) else old

    cdef int _move(self, const unsigned char* s, Py_ssize_t i, Py_ssize_t n, long long offset,
                   long long lineno) except -1:
        cdef zev_move_events moved
        cdef int fired
        moved.old_z = moved.old_layer_z = 0.0  # set by zev_move with the events that read them
        fired = zev_move(&self.m, s + i, s + n, TOLERANCE, &moved)
        if fired:
            self._move_events(fired, &moved, offset, lineno)
        return 0

    cdef int _move_events(self, int fired, zev_move_events* moved, long long offset, long long lineno) except -1:
        if fired & ZEV_ZCHANGE:
            self._emit("ZChange", {"new": self.m.z, "old": maybe(moved.old_z)}, offset, lineno)
        if fired & ZEV_LAYER:
            self._emit("LayerChanged", {"layer": self.m.layer, "z": self.m.layer_z, "old_z": maybe(moved.old_layer_z)},
                       offset, lineno)
        return 0

    # --------------------------------------------------------------------------------------- received lines

    cdef int _received_line(self, const unsigned char* s, Py_ssize_t n, long long offset,
                            long long lineno) except -1:
        cdef long fallback
        position = parse_position(s, n)
        if position is not None:
            payload = {"x": position["x"], "y": position["y"], "z": position["z"], "e": position["e"],
                       "t": self.tool, "f": maybe(self.m.feedrate)}
            for key, value in (<dict>position).items():
                if key not in payload:
                    payload[key] = value
            self._emit("PositionUpdate", payload, offset, lineno)
            return 0
        tool_object = parse_invalid_tool(s, n)
        if tool_object is None:
            return 0
        cdef long tool = tool_object
        if tool == CURRENT_TOOL:
            tool = self.tool
        if self.tool != tool:
            fallback = self.tool
        elif self.tool_before != tool:
            fallback = self.tool_before
        else:
            fallback = 0
        self.invalid_tools.add(tool)
        self.tool = fallback
        self._emit("InvalidToolReported", {"tool": tool, "fallback": fallback}, offset, lineno)
        return 0


cdef inline const unsigned char* find_terminator(const unsigned char* p, const unsigned char* end) noexcept:
    cdef const unsigned char* newline
    cdef const unsigned char* carriage
    if p >= end:
        return NULL
    newline = <const unsigned char*>memchr(p, 10, end - p)
    carriage = <const unsigned char*>memchr(p, 13, (newline if newline != NULL else end) - p)
    return carriage if carriage != NULL else newline
