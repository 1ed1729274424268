# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""Compiled twins of the bus's hot paths.  The Python code they mirror is the spec, and is what runs when this
extension is not built or ``ZEVENTS_PUREPYTHON=1``; tests run both and compare them.

* :func:`payload_ok`: is this payload a msgpack map that ``wire.unpack`` decodes?  Walks the bytes without building
  a single object (the broker validates every event it publishes; decoding it only to throw it away cost a third
  of the broker's per-event time).
* :func:`drain_ingest`: ``Broker._drain_ingest``, the sequencer's loop over its PULL socket.
* :class:`Decoder`: ``wire.PyDecoder``, what every subscriber runs for every event; it builds the payload map
  itself (``unpack_fast``) for the forms events are made of, and leaves the rest to msgpack.
* :func:`accept`: ``Subscriber._accept``, for the in-order event of a known stream.
"""
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE, PyBytes_FromStringAndSize
from cpython.float cimport PyFloat_FromDouble
from cpython.list cimport PyList_New, PyList_SET_ITEM
from cpython.long cimport PyLong_FromLong, PyLong_FromLongLong, PyLong_FromUnsignedLongLong
from cpython.ref cimport Py_INCREF, Py_XDECREF, PyObject
from cpython.unicode cimport PyUnicode_DecodeUTF8
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.string cimport memcmp, memcpy

import sys

import zmq

_intern = sys.intern

cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    struct timespec:
        time_t tv_sec
        long tv_nsec
    int clock_gettime(int clk_id, timespec *tp)
    int CLOCK_REALTIME

cdef enum:
    MAX_DEPTH = 1024        # msgpack-python's unpacker refuses a container (even an empty one) when this many are open
    NS_MAX = 999999999      # a timestamp's nanoseconds


cdef inline uint32_t _be16(const uint8_t *p) noexcept nogil:
    return (<uint32_t>p[0] << 8) | p[1]


cdef inline uint32_t _be32(const uint8_t *p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef inline uint64_t _be64(const uint8_t *p) noexcept nogil:
    return (<uint64_t>_be32(p) << 32) | _be32(p + 4)


cdef bint _utf8_ok(const uint8_t *s, Py_ssize_t n) noexcept nogil:
    """Python's strict UTF-8: no overlong forms, no surrogates, nothing above U+10FFFF."""
    cdef Py_ssize_t i = 0
    cdef uint8_t c, d
    while i < n:
        c = s[i]
        if c < 0x80:
            i += 1
        elif 0xc2 <= c <= 0xdf:
            if i + 1 >= n or (s[i + 1] & 0xc0) != 0x80:
                return False
            i += 2
        elif 0xe0 <= c <= 0xef:
            if i + 2 >= n:
                return False
            d = s[i + 1]
            if (d & 0xc0) != 0x80 or (c == 0xe0 and d < 0xa0) or (c == 0xed and d > 0x9f):
                return False
            if (s[i + 2] & 0xc0) != 0x80:
                return False
            i += 3
        elif 0xf0 <= c <= 0xf4:
            if i + 3 >= n:
                return False
            d = s[i + 1]
            if (d & 0xc0) != 0x80 or (c == 0xf0 and d < 0x90) or (c == 0xf4 and d > 0x8f):
                return False
            if (s[i + 2] & 0xc0) != 0x80 or (s[i + 3] & 0xc0) != 0x80:
                return False
            i += 4
        else:
            return False
    return True


cdef bint _ext_ok(signed char code, const uint8_t *data, Py_ssize_t n) noexcept nogil:
    """Ext type -1 is msgpack's timestamp, which the unpacker converts (and refuses when malformed); the other
    negative codes are reserved, and msgpack-python refuses them."""
    if code >= 0:
        return True
    if code != -1:
        return False
    if n == 4:
        return True
    if n == 8:
        return (_be64(data) >> 34) <= NS_MAX
    if n == 12:
        return _be32(data) <= NS_MAX
    return False


cdef inline Py_ssize_t _sized(const uint8_t *p, Py_ssize_t i, Py_ssize_t n, int width, Py_ssize_t *size) noexcept nogil:
    """Reads the big-endian length of ``width`` bytes after the marker at ``i``: the index after it, or -1."""
    if n - i < 1 + width:
        return -1
    size[0] = p[i + 1] if width == 1 else _be16(p + i + 1) if width == 2 else _be32(p + i + 1)
    return i + 1 + width


cdef bint _msgpack_ok(const uint8_t *p, Py_ssize_t n) noexcept nogil:
    """True when ``p[:n]`` is exactly one msgpack object that ``wire.unpack`` accepts."""
    cdef Py_ssize_t remaining[MAX_DEPTH]   # items still to read in each open container (a map counts 2 per entry)
    cdef bint is_map[MAX_DEPTH]
    cdef int top = 0
    cdef Py_ssize_t i = 0, size = 0, count = 0
    cdef uint8_t b
    cdef bint key, container, as_map
    while True:
        if i >= n:
            return False
        b = p[i]
        key = top > 0 and is_map[top - 1] and remaining[top - 1] % 2 == 0
        container = False
        as_map = False
        count = 0
        if b <= 0x7f or b >= 0xe0:
            i += 1
        elif b <= 0x8f:
            container, as_map, count = True, True, b & 0x0f
            i += 1
        elif b <= 0x9f:
            container, count = True, b & 0x0f
            i += 1
        elif b <= 0xbf:
            size = b & 0x1f
            if size > n - i - 1 or not _utf8_ok(p + i + 1, size):
                return False
            i += 1 + size
        elif b == 0xc0 or b == 0xc2 or b == 0xc3:
            i += 1
        elif b == 0xc1:
            return False
        elif b <= 0xc9:                       # bin 8/16/32, ext 8/16/32: a length, (ext: a type), the data
            i = _sized(p, i, n, 1 << ((b - 0xc4) % 3), &size)
            if i < 0 or size > n - i - (b >= 0xc7):
                return False
            if b >= 0xc7:
                if not _ext_ok(<signed char>p[i], p + i + 1, size):
                    return False
                i += 1
            i += size
        elif b == 0xca or b == 0xce or b == 0xd2:
            if n - i < 5:
                return False
            i += 5
        elif b == 0xcb or b == 0xcf or b == 0xd3:
            if n - i < 9:
                return False
            i += 9
        elif b == 0xcc or b == 0xd0:
            if n - i < 2:
                return False
            i += 2
        elif b == 0xcd or b == 0xd1:
            if n - i < 3:
                return False
            i += 3
        elif b <= 0xd8:                       # fixext 1/2/4/8/16
            size = 1 << (b - 0xd4)
            if size > n - i - 2 or not _ext_ok(<signed char>p[i + 1], p + i + 2, size):
                return False
            i += 2 + size
        elif b <= 0xdb:                       # str 8/16/32
            i = _sized(p, i, n, 1 << (b - 0xd9), &size)
            if i < 0 or size > n - i or not _utf8_ok(p + i, size):
                return False
            i += size
        else:                                 # array 16/32, map 16/32
            container, as_map = True, b >= 0xde
            i = _sized(p, i, n, 2 << (b & 1), &count)
            if i < 0:
                return False
        if container:
            if key or top >= MAX_DEPTH:
                return False                  # a list or dict as a map key (unhashable), or nested too deep
            if count > 0:
                if count > n - i:
                    return False
                remaining[top] = count * 2 if as_map else count
                is_map[top] = as_map
                top += 1
                continue
        # One object is complete: count it in every container it completes.
        while top > 0:
            remaining[top - 1] -= 1
            if remaining[top - 1] > 0:
                break
            top -= 1
        if top == 0:
            return i == n


def payload_ok(bytes payload not None):
    """True when ``payload`` is a msgpack map that ``wire.unpack`` decodes (same answer, no objects built)."""
    cdef const uint8_t *p = <const uint8_t *>PyBytes_AS_STRING(payload)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(payload)
    if n == 0 or not (0x80 <= p[0] <= 0x8f or p[0] == 0xde or p[0] == 0xdf):
        return False
    return _msgpack_ok(p, n)


cdef object _NOT_FAST = object()


cdef enum:
    FAST_DEPTH = 32         # deeper payloads are left to msgpack itself


cdef object _build(const uint8_t *p, Py_ssize_t n, Py_ssize_t *at, int depth):
    """The msgpack object at ``p[at[0]:]``, built exactly as ``wire.unpack`` builds it, for the forms events are
    made of (nil, bool, int, float, str, bin, array, map); ``_NOT_FAST`` for anything else (ext types, a NaN
    float32, invalid UTF-8, truncation, deep nesting), which the caller hands to msgpack, the spec."""
    cdef Py_ssize_t i = at[0], size = 0, count = 0, k
    cdef uint8_t b
    cdef uint64_t bits
    cdef double real
    cdef float single
    cdef uint32_t bits32
    cdef int width, shift
    if i >= n or depth > FAST_DEPTH:
        return _NOT_FAST
    b = p[i]
    if b <= 0x7f:
        at[0] = i + 1
        return PyLong_FromLong(b)
    if b >= 0xe0:
        at[0] = i + 1
        return PyLong_FromLong(<signed char>b)
    if b <= 0x9f:
        count = b & 0x0f
        i += 1
        return _container(p, n, at, i, count, b <= 0x8f, depth)
    if b <= 0xbf:
        return _text(p, n, at, i + 1, b & 0x1f)
    if b == 0xc0:
        at[0] = i + 1
        return None
    if b == 0xc2 or b == 0xc3:
        at[0] = i + 1
        return b == 0xc3
    if 0xc4 <= b <= 0xc6:                     # bin 8/16/32
        i = _sized(p, i, n, 1 << (b - 0xc4), &size)
        if i < 0 or size > n - i:
            return _NOT_FAST
        at[0] = i + size
        return PyBytes_FromStringAndSize(<const char *>p + i, size)
    if 0xd9 <= b <= 0xdb:                     # str 8/16/32
        i = _sized(p, i, n, 1 << (b - 0xd9), &size)
        if i < 0:
            return _NOT_FAST
        return _text(p, n, at, i, size)
    if 0xdc <= b:                             # array 16/32, map 16/32
        i = _sized(p, i, n, 2 << (b & 1), &count)
        if i < 0:
            return _NOT_FAST
        return _container(p, n, at, i, count, b >= 0xde, depth)
    if b == 0xca:
        if n - i < 5:
            return _NOT_FAST
        bits32 = _be32(p + i + 1)
        memcpy(&single, &bits32, 4)
        if single != single:
            return _NOT_FAST                  # a NaN's payload bits: leave them to msgpack's own conversion
        at[0] = i + 5
        return PyFloat_FromDouble(single)
    if b == 0xcb:
        if n - i < 9:
            return _NOT_FAST
        bits = _be64(p + i + 1)
        memcpy(&real, &bits, 8)
        at[0] = i + 9
        return PyFloat_FromDouble(real)
    if 0xcc <= b <= 0xd3:                     # uint 8/16/32/64, int 8/16/32/64
        width = 1 << ((b - 0xcc) & 3)
        if n - i <= width:
            return _NOT_FAST
        at[0] = i + 1 + width
        if width == 1:
            bits = p[i + 1]
        elif width == 2:
            bits = _be16(p + i + 1)
        elif width == 4:
            bits = _be32(p + i + 1)
        else:
            bits = _be64(p + i + 1)
        if b <= 0xcf:
            return PyLong_FromUnsignedLongLong(bits)
        shift = 64 - 8 * width
        return PyLong_FromLongLong((<long long>(bits << shift)) >> shift)   # sign-extended
    return _NOT_FAST                          # 0xc1, ext and fixext


cdef object _text(const uint8_t *p, Py_ssize_t n, Py_ssize_t *at, Py_ssize_t i, Py_ssize_t size):
    if size > n - i or not _utf8_ok(p + i, size):
        return _NOT_FAST
    at[0] = i + size
    return PyUnicode_DecodeUTF8(<const char *>p + i, size, NULL)


cdef object _container(const uint8_t *p, Py_ssize_t n, Py_ssize_t *at, Py_ssize_t i, Py_ssize_t count,
                       bint as_map, int depth):
    cdef Py_ssize_t k
    cdef object key, value
    if count > n - i:
        return _NOT_FAST
    at[0] = i
    if not as_map:
        items = PyList_New(count)
        for k in range(count):
            value = _build(p, n, at, depth + 1)
            if value is _NOT_FAST:
                return _NOT_FAST
            Py_INCREF(value)
            PyList_SET_ITEM(items, k, value)
        return items
    mapping = {}
    for k in range(count):
        i = at[0]
        if i < n and 0xa0 <= p[i] <= 0xa0 + KEY_MAX:
            key = _key(p, n, at, i + 1, p[i] & 0x1f)
        else:
            key = _build(p, n, at, depth + 1)
            if type(key) is list or type(key) is dict:
                return _NOT_FAST              # msgpack refuses unhashable keys: its own error says so
            if type(key) is str:
                key = _intern(key)            # as msgpack does for str keys
        if key is _NOT_FAST:
            return _NOT_FAST
        value = _build(p, n, at, depth + 1)
        if value is _NOT_FAST:
            return _NOT_FAST
        mapping[key] = value
    return mapping


cdef enum:
    KEY_SLOTS = 1024        # a power of two
    KEY_MAX = 24            # longer keys are decoded (and interned) each time


cdef struct KeySlot:
    Py_ssize_t size
    uint8_t text[KEY_MAX]
    PyObject *key           # an interned str, owned by the slot


cdef KeySlot _key_slots[KEY_SLOTS]


cdef object _key(const uint8_t *p, Py_ssize_t n, Py_ssize_t *at, Py_ssize_t i, Py_ssize_t size):
    """A short str map key: the same keys come in every event, so the interned str msgpack would produce is
    kept by its bytes and handed out again instead of being decoded and interned each time."""
    cdef uint32_t h = <uint32_t>size
    cdef Py_ssize_t j
    cdef KeySlot *slot
    if size > n - i:
        return _NOT_FAST
    for j in range(size):
        h = h * 31 + p[i + j]
    slot = &_key_slots[h & (KEY_SLOTS - 1)]
    if slot.key != NULL and slot.size == size and memcmp(slot.text, p + i, size) == 0:
        at[0] = i + size
        return <object>slot.key
    key = _text(p, n, at, i, size)
    if key is _NOT_FAST:
        return _NOT_FAST
    key = _intern(key)
    Py_XDECREF(slot.key)
    Py_INCREF(key)
    slot.key = <PyObject *>key
    slot.size = size
    memcpy(slot.text, p + i, size)
    return key


cdef object _unpack_payload(bytes payload):
    """``wire.unpack`` of a payload map through the fast builder, or ``_NOT_FAST``."""
    cdef const uint8_t *p = <const uint8_t *>PyBytes_AS_STRING(payload)
    cdef Py_ssize_t n = PyBytes_GET_SIZE(payload), at = 0
    if n == 0 or not (0x80 <= p[0] <= 0x8f or p[0] == 0xde or p[0] == 0xdf):
        return _NOT_FAST
    body = _build(p, n, &at, 0)
    if at != n:
        return _NOT_FAST                      # trailing bytes: msgpack's ExtraData
    return body


def unpack_fast(bytes payload not None):
    """(True, the map) when the fast builder decoded ``payload``, (False, None) when it leaves it to msgpack."""
    body = _unpack_payload(payload)
    return (False, None) if body is _NOT_FAST else (True, body)


cdef inline void _put64(uint8_t *out, uint64_t value) noexcept nogil:
    cdef int k
    for k in range(8):
        out[k] = <uint8_t>(value >> (56 - 8 * k))


cdef bytes _stamp(bytes prefix, uint64_t seq, uint64_t ts):
    """prefix + wire.seq_ts_tail(seq, ts): ``\\xa3seq\\xcf`` seq ``\\xa2ts\\xcf`` ts."""
    cdef Py_ssize_t size = PyBytes_GET_SIZE(prefix)
    cdef bytes header = PyBytes_FromStringAndSize(NULL, size + 25)
    cdef uint8_t *out = <uint8_t *>PyBytes_AS_STRING(header)
    memcpy(out, PyBytes_AS_STRING(prefix), size)
    out += size
    out[0] = 0xa3
    out[1] = 0x73     # s
    out[2] = 0x65     # e
    out[3] = 0x71     # q
    out[4] = 0xcf
    _put64(out + 5, seq)
    out[13] = 0xa2
    out[14] = 0x74    # t
    out[15] = 0x73    # s
    out[16] = 0xcf
    _put64(out + 17, ts)
    return header


def stamp(bytes prefix not None, uint64_t seq, uint64_t ts):
    """``prefix + wire.seq_ts_tail(seq, ts)``, for the tests that hold the two side by side."""
    return _stamp(prefix, seq, ts)


cdef inline uint64_t _now_us() noexcept nogil:
    cdef timespec now
    clock_gettime(CLOCK_REALTIME, &now)
    return <uint64_t>now.tv_sec * 1000000 + <uint64_t>(now.tv_nsec // 1000)


cdef extern from "zlib.h" nogil:
    unsigned long crc32(unsigned long crc, const unsigned char *buf, unsigned int len)


cdef bytes _event_record(bytes topic, bytes header, bytes payload, bytes publisher, uint64_t number):
    """``journal.event_record``: u32 body length, u32 crc32 seeded with the kind (0), u8 kind, then the body
    u16 topic length, u16 header length, publisher id, u64 number, topic, header, payload."""
    cdef Py_ssize_t nt = PyBytes_GET_SIZE(topic), nh = PyBytes_GET_SIZE(header), np = PyBytes_GET_SIZE(payload)
    cdef Py_ssize_t body = 20 + nt + nh + np
    cdef bytes out = PyBytes_FromStringAndSize(NULL, 9 + body)
    cdef uint8_t *o = <uint8_t *>PyBytes_AS_STRING(out)
    cdef uint8_t *b = o + 9
    cdef uint32_t crc
    b[0] = <uint8_t>(nt >> 8)
    b[1] = <uint8_t>nt
    b[2] = <uint8_t>(nh >> 8)
    b[3] = <uint8_t>nh
    memcpy(b + 4, PyBytes_AS_STRING(publisher), 8)
    _put64(b + 12, number)
    memcpy(b + 20, PyBytes_AS_STRING(topic), nt)
    memcpy(b + 20 + nt, PyBytes_AS_STRING(header), nh)
    memcpy(b + 20 + nt + nh, PyBytes_AS_STRING(payload), np)
    crc = <uint32_t>crc32(0, b, <unsigned int>body)
    o[0] = <uint8_t>(body >> 24)
    o[1] = <uint8_t>(body >> 16)
    o[2] = <uint8_t>(body >> 8)
    o[3] = <uint8_t>body
    o[4] = <uint8_t>(crc >> 24)
    o[5] = <uint8_t>(crc >> 16)
    o[6] = <uint8_t>(crc >> 8)
    o[7] = <uint8_t>crc
    o[8] = 0
    return out


def event_record(bytes topic not None, bytes header not None, bytes payload not None, bytes publisher not None,
                 uint64_t number):
    """``journal.event_record`` compiled, for the tests that hold the two side by side."""
    if PyBytes_GET_SIZE(publisher) != 8:
        raise ValueError("a publisher id is 8 bytes")
    return _event_record(topic, header, payload, publisher, number)


def drain_ingest(broker, int batch, int commit_batch=256):
    """``Broker._drain_ingest`` (with ``Broker._commit``) compiled: up to ``batch`` ingest frames validated,
    stamped, journaled, then published and remembered.  Bad frames and numbered frames that are not next from their
    publisher take the Python path (``_numbered``, ``_learn_head``, ``_payload_ok``, ``_reject``)."""
    recv = broker.pull.recv
    send = broker._xsend
    cdef int nb = zmq.NOBLOCK, more = zmq.SNDMORE
    cdef dict heads = broker._heads
    cdef dict seqs = broker.seqs
    cdef dict last_values = broker.last_values
    cdef dict publishers = broker.publishers
    remember = broker.ring.append
    journal = broker.journal
    cdef Py_ssize_t max_payload = broker.bus.max_payload
    again = zmq.Again
    cdef bytes frame, payload, header, publisher
    cdef const uint8_t *p
    cdef Py_ssize_t n, end, off
    cdef tuple known, entry, numbered
    cdef object group, seq, last
    cdef bytes recent = None
    cdef uint64_t number
    cdef int k
    cdef list entries = [], records = []
    for k in range(batch):
        try:
            frame = recv(nb)
        except again:
            break
        p = <const uint8_t *>PyBytes_AS_STRING(frame)
        n = PyBytes_GET_SIZE(frame)
        publisher = NO_PUBLISHER
        number = 0
        off = 0                                 # where the v1 frame starts: 17 in a numbered one
        if n > 0 and p[0] == 0:
            last = None
            if n > 17:
                # The same publisher sends event after event: its id object is reused, not sliced each time.
                if recent is None or memcmp(PyBytes_AS_STRING(recent), p + 1, 8) != 0:
                    recent = frame[1:9]
                publisher = recent
                number = _be64(p + 9)
                last = publishers.get(publisher)
            if last is not None and number == <uint64_t>last + 1:
                publishers[publisher] = number
                off = 17
            else:
                numbered = broker._numbered(frame)
                if numbered is None:
                    continue
                publisher, number, frame = numbered
                p = <const uint8_t *>PyBytes_AS_STRING(frame)
                n = PyBytes_GET_SIZE(frame)
        if n - off == 0 or off + p[off] + 1 >= n:
            broker._reject("frame", f"ingest frame of {n - off} bytes is too short for its lengths")
            continue
        # past the end: no cached head matches, and _learn_head rejects it
        end = min(off + p[off] + 2 + p[off + p[off] + 1], n)
        known = heads.get(frame[off:end])
        if known is None:
            known = broker._learn_head(frame[off:] if off else frame)
            if known is None:
                continue
        payload = frame[end:]
        n = PyBytes_GET_SIZE(payload)
        p = <const uint8_t *>PyBytes_AS_STRING(payload)
        if n > max_payload or n == 0 or not (0x80 <= p[0] <= 0x8f or p[0] == 0xde or p[0] == 0xdf) \
                or not _msgpack_ok(p, n):
            broker._payload_ok(payload)  # counts and logs the precise reason
            continue
        group = known[0]
        seq = seqs.get(group, 0) + 1
        seqs[group] = seq
        header = _stamp(known[2], seq, _now_us())
        entries.append((group, seq, known[1], header, payload))
        if journal is not None:
            records.append(_event_record(known[1], header, payload, publisher, number))
        if len(entries) >= commit_batch:
            _commit(broker, journal, entries, records, send, remember, last_values)
            entries = []
            records = []
    if entries:
        _commit(broker, journal, entries, records, send, remember, last_values)


cdef _commit(broker, journal, list entries, list records, send, remember, dict last_values):
    """``Broker._commit``: journaled before any of it is published, so what subscribers saw, a restarted broker
    still has."""
    cdef int more = zmq.SNDMORE
    cdef tuple entry
    if journal is not None:
        journal.append(records, len(entries))
    for entry in entries:
        send(entry[2], more)
        send(entry[3], more)
        send(entry[4])
        remember(entry)
        last_values[entry[2]] = entry
    if journal is not None and journal.full():
        journal.start(broker.epoch, broker.seqs, broker.publishers)


cdef extern from "Python.h":
    ctypedef struct PyTypeObject
    object PyType_GenericAlloc(PyTypeObject *type, Py_ssize_t items)
    ctypedef struct PyMemberDef:
        Py_ssize_t offset
    ctypedef struct PyMemberDescrObject:
        PyMemberDef *d_member

cdef Py_ssize_t ENVELOPE_SLOTS[11]   # where an Envelope keeps each field (its __slots__, in order)
cdef bint ENVELOPE_BY_SLOTS = False


cdef object _envelope(tuple fields):
    """Envelope(*fields) without running its Python __init__ (a third of a decode): object.__new__, then each
    slot filled, as __init__ would.  Set up, and checked against a real Envelope, at import."""
    if not ENVELOPE_BY_SLOTS:
        return Envelope(*fields)
    envelope = PyType_GenericAlloc(<PyTypeObject *>Envelope, 0)
    cdef Py_ssize_t k
    cdef object value
    for k in range(11):
        value = fields[k]
        Py_INCREF(value)
        (<PyObject **>(<char *><PyObject *>envelope + ENVELOPE_SLOTS[k]))[0] = <PyObject *>value
    return envelope


def _set_up_envelope():
    """Fill slots by hand only when Envelope is exactly what _envelope expects; otherwise call it."""
    global ENVELOPE_BY_SLOTS
    from types import MemberDescriptorType

    fields = ("topic", "group", "name", "node", "printer", "epoch", "seq", "ts", "src", "payload", "replayed")
    descriptors = [vars(Envelope).get(field) for field in fields]
    plain = Envelope.__new__ is object.__new__ and Envelope.__mro__ == (Envelope, object)
    if tuple(Envelope.__slots__) != fields or not plain or \
            not all(type(d) is MemberDescriptorType for d in descriptors):
        return
    for k in range(11):
        ENVELOPE_SLOTS[k] = (<PyMemberDescrObject *>descriptors[k]).d_member.offset
    ENVELOPE_BY_SLOTS = True
    sample = ("gcode/Home", "gcode", "Home", "n", None, 1, 2, 3, "src", {"x": 1}, True)
    made, expected = _envelope(sample), Envelope(*sample)
    if type(made) is not Envelope or [getattr(made, f) for f in fields] != [getattr(expected, f) for f in fields]:
        ENVELOPE_BY_SLOTS = False


def envelopes_by_slots() -> bool:
    """Whether decode fills Envelope slots directly (False: Envelope changed shape, and it is called instead)."""
    return ENVELOPE_BY_SLOTS


cdef class Decoder:
    """``wire.PyDecoder`` compiled: the broker-stamped header of a known stream is a cached prefix plus a 25-byte
    seq/ts tail read here in C.  The uncommon paths (a new topic, a header from another encoder) are the twin's own
    methods, working on the same caches."""

    cdef readonly dict _prefixes
    cdef readonly dict _topics
    cdef object _twin
    cdef object _unpack_map

    def __init__(self, int cache_size=4096):
        from zevents import wire

        self._twin = wire.PyDecoder(cache_size)
        self._prefixes = self._twin._prefixes
        self._topics = self._twin._topics
        self._unpack_map = wire.unpack_map

    cdef tuple _fixed(self, bytes header, Py_ssize_t cut):
        """(node, printer, epoch, src, seq, ts) through the cached prefix, or None."""
        cdef const uint8_t *tail
        if cut <= 0:
            return None
        fixed = self._prefixes.get(header[:cut])
        if fixed is None:
            return None
        tail = <const uint8_t *>PyBytes_AS_STRING(header) + cut
        if memcmp(tail, b"\xa3seq\xcf", 5) != 0 or memcmp(tail + 13, b"\xa2ts\xcf", 4) != 0:
            return None
        return (<tuple>fixed) + (_be64(tail + 5), _be64(tail + 17))

    def header(self, bytes header not None):
        """(node, printer, epoch, src, seq, ts) of a header frame."""
        cdef Py_ssize_t cut = PyBytes_GET_SIZE(header) - 25
        values = self._fixed(header, cut)
        return values if values is not None else self._twin._generic_header(header, cut)

    def decode(self, bytes topic not None, bytes header not None, bytes payload not None, bint replayed=False):
        """Decode the three frames of a published event; raises WireError on anything malformed."""
        return _envelope(self._fields(topic, header, payload, replayed))

    cdef tuple _fields(self, bytes topic, bytes header, bytes payload, bint replayed):
        """An Envelope's fields, in the order of its slots."""
        names = self._topics.get(topic)
        if names is None:
            names = self._twin._topic(topic)
        cdef Py_ssize_t cut = PyBytes_GET_SIZE(header) - 25
        values = self._fixed(header, cut)
        if values is None:
            values = self._twin._generic_header(header, cut)
        body = _unpack_payload(payload)
        if body is _NOT_FAST:
            body = self._unpack_map(payload, "payload")
        node, printer, epoch, src, seq, ts = values
        return (names[0], names[1], names[2], node, printer, epoch, seq, ts, src, body, replayed)


def accept(subscriber, bytes topic not None, bytes header not None, bytes payload not None):
    """``Subscriber._accept`` compiled: an event of the current epoch that is next in its stream, with nothing
    queued before it, is tracked here; every other case (bad frames, heartbeats, gaps, duplicates, a new epoch)
    goes to the subscriber's own Python methods, which stay the spec."""
    cdef Decoder decoder = subscriber.decoder
    cdef tuple fields
    try:
        fields = decoder._fields(topic, header, payload, False)
    except WireError as exc:
        return subscriber._undecodable(topic, exc)
    if fields[5] != subscriber.epoch or fields[1] == SYS_GROUP or subscriber.pending:
        return subscriber._track(topic, _envelope(fields))
    cdef dict last_seq = subscriber.last_seq
    group, seq = fields[1], fields[6]
    if seq != last_seq.get(group, 0) + 1:
        return subscriber._track(topic, _envelope(fields))
    stats = subscriber.stats
    stats.received += 1
    last_seq[group] = seq
    names = subscriber.names
    if names is not None and fields[2] not in names:
        return None
    stats.delivered += 1
    return _envelope(fields)


# wire imports this module only after defining these.
from zevents.wire import NO_PUBLISHER, SYS_GROUP, Envelope, WireError  # noqa: E402

_set_up_envelope()
