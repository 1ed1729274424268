/*
 * c_subscriber: a zevents subscriber written in C from PROTOCOL.md alone (libzmq + msgpack-c), to prove that the
 * document is enough for another language.  Built and run against a live broker by tests/test_interop.py.
 *
 * Build:  gcc -Wall -Wextra -Werror -O2 c_subscriber.c -o c_subscriber $(pkg-config --cflags --libs libzmq msgpack)
 *         (without pkg-config: -lzmq -lmsgpackc; newer msgpack-c releases call the package msgpack-c)
 * Run:    c_subscriber --publish EP --control EP [--count N] [--timeout S] [--rcvhwm N] [--heartbeat S] PREFIX...
 *
 * Each PREFIX names a group ("print" or "print/") or one topic ("gcode/ZChange"); "" means everything.  The SUB
 * socket subscribes to whole groups (plus sys/Heartbeat) and filters locally, because seq continuity is tracked
 * per group (PROTOCOL.md section 2).  The start point comes from STATUS; gaps, lost tails and epoch changes are
 * repaired with REPLAY as in PROTOCOL.md section 6.
 *
 * stdout: one JSON object per delivered event: {"topic","node","printer","epoch","seq","ts","src","payload"}.
 *   msgpack values map to JSON naturally; the ones JSON has no word for are tagged objects:
 *   bin -> {"$bin": "<base64>"}, ext -> {"$ext": type, "data": "<base64>"}, NaN/inf -> {"$float": "NaN"|...};
 *   floats always carry a '.' or an exponent so that a JSON reader keeps them apart from ints; non-string map keys
 *   are rendered as their JSON text inside a string; invalid UTF-8 bytes become U+FFFD.
 * stderr: "READY epoch=E" once STATUS answered and the subscriptions are set, warnings for odd input, and a final
 *   "STATS ..." line with the counters (delivered, replayed, gaps, lost, ...).
 * Exit: 0 after --count events, 1 on --timeout, 2 on usage errors, 3 when the broker does not answer STATUS.
 */
#define _POSIX_C_SOURCE 200809L

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <msgpack.h>
#include <zmq.h>

#define MAX_GROUPS 64
#define MAX_PREFIXES 64
#define MAX_RETIRED_EPOCHS 16
#define GROUP_NAME_MAX 64
#define REPLAY_LIMIT 20000
/* A REPLAY loop that keeps saying "more" without progress must end: the next heartbeat retries. */
#define MAX_REPLAY_ROUNDS 10000

#define EXIT_TIMEOUT 1
#define EXIT_USAGE 2
#define EXIT_BROKER 3
#define EXIT_NOMEM 4

typedef struct {
    char name[GROUP_NAME_MAX];
    uint64_t last;
    int wanted;
} group_t;

typedef struct {
    const char *publish;
    const char *control;
    long long count;
    double timeout;
    double control_timeout;
    double heartbeat;
    int rcvhwm;
    const char *prefixes[MAX_PREFIXES]; /* normalised: "" or "<group>/..." */
    int nprefixes;
    int want_all;
} options_t;

typedef struct {
    unsigned long long delivered, replayed, replays, gaps, missing, lost, dupes, stale, epochs;
    unsigned long long bad_frames, bad_topic, bad_header, bad_payload, bad_replies, late_replies;
} counters_t;

typedef struct {
    char *p;
    size_t len, cap;
} buf_t;

/* The decoded header (frame 2); strings point into the unpacked object, valid while it lives. */
typedef struct {
    uint64_t v, epoch, seq, ts;
    const char *node, *printer, *src;
    uint32_t node_len, printer_len, src_len;
    int has_printer;
} header_t;

static options_t opt;
static counters_t stats;
static group_t groups[MAX_GROUPS];
static int ngroups;
static uint64_t epoch_now;
static uint64_t retired_epochs[MAX_RETIRED_EPOCHS];
static int nretired;
static void *ctx, *sub, *dealer;
static int64_t next_request_id = 1;
static buf_t out;

static void warn(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("WARN ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

static double now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static void print_stats(void) {
    fprintf(stderr,
            "STATS delivered=%llu replayed=%llu replays=%llu gaps=%llu missing=%llu lost=%llu dupes=%llu "
            "stale=%llu epochs=%llu bad_frames=%llu bad_topic=%llu bad_header=%llu bad_payload=%llu "
            "bad_replies=%llu late_replies=%llu\n",
            stats.delivered, stats.replayed, stats.replays, stats.gaps, stats.missing, stats.lost, stats.dupes,
            stats.stale, stats.epochs, stats.bad_frames, stats.bad_topic, stats.bad_header, stats.bad_payload,
            stats.bad_replies, stats.late_replies);
}

static void finish(int code) {
    fflush(stdout);
    print_stats();
    if (sub) zmq_close(sub);
    if (dealer) zmq_close(dealer);
    if (ctx) zmq_ctx_term(ctx);
    free(out.p);
    exit(code);
}

/* ---------------------------------------------------------------- JSON output */

static void buf_need(buf_t *b, size_t extra) {
    if (b->len + extra <= b->cap) return;
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + extra) cap *= 2;
    char *p = realloc(b->p, cap);
    if (!p) {
        fprintf(stderr, "ERROR out of memory\n");
        finish(EXIT_NOMEM);
    }
    b->p = p;
    b->cap = cap;
}

static void buf_add(buf_t *b, const char *s, size_t n) {
    buf_need(b, n);
    memcpy(b->p + b->len, s, n);
    b->len += n;
}

static void buf_puts(buf_t *b, const char *s) { buf_add(b, s, strlen(s)); }

static void buf_printf(buf_t *b, const char *fmt, ...) {
    char tmp[64];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(tmp, sizeof tmp, fmt, ap);
    va_end(ap);
    if (n > 0) buf_add(b, tmp, (size_t)n < sizeof tmp ? (size_t)n : sizeof tmp - 1);
}

/* Length of the valid UTF-8 sequence at s (1..4), or 0 when the bytes there are not valid UTF-8. */
static size_t utf8_sequence(const unsigned char *s, size_t n) {
    unsigned char c = s[0];
    size_t len;
    uint32_t cp;
    if (c < 0x80) return 1;
    if (c >= 0xc2 && c <= 0xdf) { len = 2; cp = c & 0x1f; }
    else if (c >= 0xe0 && c <= 0xef) { len = 3; cp = c & 0x0f; }
    else if (c >= 0xf0 && c <= 0xf4) { len = 4; cp = c & 0x07; }
    else return 0;
    if (n < len) return 0;
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xc0) != 0x80) return 0;
        cp = (cp << 6) | (s[i] & 0x3f);
    }
    if ((len == 3 && cp < 0x800) || (len == 4 && (cp < 0x10000 || cp > 0x10ffff))) return 0; /* overlong */
    if (cp >= 0xd800 && cp <= 0xdfff) return 0;                                                /* surrogates */
    return len;
}

static void json_string(buf_t *b, const char *s, size_t n) {
    const unsigned char *u = (const unsigned char *)s;
    buf_need(b, n + 2);
    buf_add(b, "\"", 1);
    for (size_t i = 0; i < n;) {
        unsigned char c = u[i];
        if (c == '"' || c == '\\') {
            char esc[2] = {'\\', (char)c};
            buf_add(b, esc, 2);
            i++;
        } else if (c < 0x20) {
            switch (c) {
            case '\n': buf_puts(b, "\\n"); break;
            case '\r': buf_puts(b, "\\r"); break;
            case '\t': buf_puts(b, "\\t"); break;
            default: buf_printf(b, "\\u%04x", c); break;
            }
            i++;
        } else {
            size_t len = utf8_sequence(u + i, n - i);
            if (len == 0) {
                buf_puts(b, "\\ufffd");
                i++;
            } else {
                buf_add(b, s + i, len);
                i += len;
            }
        }
    }
    buf_add(b, "\"", 1);
}

static void json_base64(buf_t *b, const char *data, size_t n) {
    static const char alphabet[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    const unsigned char *u = (const unsigned char *)data;
    buf_need(b, (n + 2) / 3 * 4 + 2);
    buf_add(b, "\"", 1);
    for (size_t i = 0; i < n; i += 3) {
        uint32_t v = (uint32_t)u[i] << 16;
        if (i + 1 < n) v |= (uint32_t)u[i + 1] << 8;
        if (i + 2 < n) v |= u[i + 2];
        char quad[4] = {alphabet[(v >> 18) & 63], alphabet[(v >> 12) & 63],
                        i + 1 < n ? alphabet[(v >> 6) & 63] : '=', i + 2 < n ? alphabet[v & 63] : '='};
        buf_add(b, quad, 4);
    }
    buf_add(b, "\"", 1);
}

static void json_double(buf_t *b, double d) {
    if (isnan(d)) { buf_puts(b, "{\"$float\":\"NaN\"}"); return; }
    if (isinf(d)) { buf_puts(b, d > 0 ? "{\"$float\":\"Infinity\"}" : "{\"$float\":\"-Infinity\"}"); return; }
    char tmp[40];
    int n = 0;
    /* The shortest of %.15g..%.17g that reads back as the same double (%.17g always does), like Python's repr;
     * ".0" is added when it printed like an int so the reader keeps it a float. */
    for (int precision = 15; precision <= 17; precision++) {
        n = snprintf(tmp, sizeof tmp, "%.*g", precision, d);
        if (n <= 0 || (size_t)n >= sizeof tmp) { buf_puts(b, "null"); return; }
        if (strtod(tmp, NULL) == d) break;
    }
    buf_add(b, tmp, (size_t)n);
    if (!strpbrk(tmp, ".eE")) buf_puts(b, ".0");
}

static void json_value(buf_t *b, const msgpack_object *o);

static void json_key(buf_t *b, const msgpack_object *k) {
    if (k->type == MSGPACK_OBJECT_STR) {
        json_string(b, k->via.str.ptr, k->via.str.size);
        return;
    }
    /* JSON keys are strings: render the key as JSON, then quote that text. */
    buf_t tmp = {0};
    json_value(&tmp, k);
    json_string(b, tmp.p ? tmp.p : "", tmp.len);
    free(tmp.p);
}

static void json_value(buf_t *b, const msgpack_object *o) {
    switch (o->type) {
    case MSGPACK_OBJECT_NIL: buf_puts(b, "null"); break;
    case MSGPACK_OBJECT_BOOLEAN: buf_puts(b, o->via.boolean ? "true" : "false"); break;
    case MSGPACK_OBJECT_POSITIVE_INTEGER: buf_printf(b, "%" PRIu64, o->via.u64); break;
    case MSGPACK_OBJECT_NEGATIVE_INTEGER: buf_printf(b, "%" PRId64, o->via.i64); break;
    case MSGPACK_OBJECT_FLOAT32:
    case MSGPACK_OBJECT_FLOAT64: json_double(b, o->via.f64); break;
    case MSGPACK_OBJECT_STR: json_string(b, o->via.str.ptr, o->via.str.size); break;
    case MSGPACK_OBJECT_BIN:
        buf_puts(b, "{\"$bin\":");
        json_base64(b, o->via.bin.ptr, o->via.bin.size);
        buf_puts(b, "}");
        break;
    case MSGPACK_OBJECT_EXT:
        buf_printf(b, "{\"$ext\":%d,\"data\":", (int)o->via.ext.type);
        json_base64(b, o->via.ext.ptr, o->via.ext.size);
        buf_puts(b, "}");
        break;
    case MSGPACK_OBJECT_ARRAY:
        buf_puts(b, "[");
        for (uint32_t i = 0; i < o->via.array.size; i++) {
            if (i) buf_puts(b, ",");
            json_value(b, &o->via.array.ptr[i]);
        }
        buf_puts(b, "]");
        break;
    case MSGPACK_OBJECT_MAP:
        buf_puts(b, "{");
        for (uint32_t i = 0; i < o->via.map.size; i++) {
            if (i) buf_puts(b, ",");
            json_key(b, &o->via.map.ptr[i].key);
            buf_puts(b, ":");
            json_value(b, &o->via.map.ptr[i].val);
        }
        buf_puts(b, "}");
        break;
    default: buf_puts(b, "null"); break;
    }
}

/* ---------------------------------------------------------------- msgpack helpers */

/* Walks one msgpack value without building it.  msgpack-c allocates a container's elements from its declared
 * count before reading them, so a 9-byte frame declaring 2^32 elements would ask for 100 GB: a value is only
 * handed to msgpack-c once every count fits in the bytes that are really there, and the nesting is shallow enough
 * for its parser stack. */
#define MAX_NESTING 32

static uint64_t read_be(const unsigned char *p, int n) {
    uint64_t v = 0;
    for (int i = 0; i < n; i++) v = (v << 8) | p[i];
    return v;
}

static int skim(const unsigned char **pp, const unsigned char *end, int depth) {
    const unsigned char *p = *pp;
    if (p >= end) return 0;
    unsigned char c = *p++;
    uint64_t skip = 0, items = 0;
    int width;
    if (c <= 0x7f || c >= 0xe0 || c == 0xc0 || c == 0xc2 || c == 0xc3) {
        /* fixint, nil, bool: nothing follows */
    } else if (c >= 0x80 && c <= 0x8f) items = 2 * (uint64_t)(c & 0x0f);
    else if (c >= 0x90 && c <= 0x9f) items = c & 0x0f;
    else if (c >= 0xa0 && c <= 0xbf) skip = c & 0x1f;
    else {
        switch (c) {
        case 0xca: case 0xce: case 0xd2: skip = 4; break;
        case 0xcb: case 0xcf: case 0xd3: skip = 8; break;
        case 0xcc: case 0xd0: skip = 1; break;
        case 0xcd: case 0xd1: skip = 2; break;
        case 0xd4: skip = 2; break;  /* fixext: type byte + 1, 2, 4, 8, 16 data bytes */
        case 0xd5: skip = 3; break;
        case 0xd6: skip = 5; break;
        case 0xd7: skip = 9; break;
        case 0xd8: skip = 17; break;
        case 0xc4: case 0xc5: case 0xc6: case 0xd9: case 0xda: case 0xdb: /* bin8/16/32, str8/16/32 */
        case 0xc7: case 0xc8: case 0xc9:                                  /* ext8/16/32 */
            width = (c == 0xc4 || c == 0xc7 || c == 0xd9) ? 1 : (c == 0xc5 || c == 0xc8 || c == 0xda) ? 2 : 4;
            if (end - p < width) return 0;
            skip = read_be(p, width) + (c >= 0xc7 && c <= 0xc9 ? 1 : 0);
            p += width;
            break;
        case 0xdc: case 0xdd: case 0xde: case 0xdf: /* array16/32, map16/32 */
            width = (c == 0xdc || c == 0xde) ? 2 : 4;
            if (end - p < width) return 0;
            items = read_be(p, width) * (c >= 0xde ? 2 : 1);
            p += width;
            break;
        default: return 0; /* 0xc1 is never used */
        }
    }
    if (skip > (uint64_t)(end - p)) return 0;
    p += skip;
    if (items) {
        if (depth >= MAX_NESTING || items > (uint64_t)(end - p)) return 0; /* every element takes >= 1 byte */
        for (uint64_t i = 0; i < items; i++)
            if (!skim(&p, end, depth + 1)) return 0;
    }
    *pp = p;
    return 1;
}

/* Decodes one whole frame as a single msgpack value; trailing bytes make it invalid. */
static int unpack_frame(msgpack_unpacked *u, const void *data, size_t size) {
    size_t off = 0;
    const unsigned char *p = data;
    msgpack_unpacked_init(u);
    if (size == 0 || !skim(&p, p + size, 0) || p != (const unsigned char *)data + size) return 0;
    msgpack_unpack_return r = msgpack_unpack_next(u, (const char *)data, size, &off);
    if (r != MSGPACK_UNPACK_SUCCESS || off != size) {
        msgpack_unpacked_destroy(u);
        msgpack_unpacked_init(u);
        return 0;
    }
    return 1;
}

static const msgpack_object *map_get(const msgpack_object *map, const char *key) {
    if (map->type != MSGPACK_OBJECT_MAP) return NULL;
    size_t n = strlen(key);
    for (uint32_t i = 0; i < map->via.map.size; i++) {
        const msgpack_object *k = &map->via.map.ptr[i].key;
        if (k->type == MSGPACK_OBJECT_STR && k->via.str.size == n && memcmp(k->via.str.ptr, key, n) == 0)
            return &map->via.map.ptr[i].val;
    }
    return NULL;
}

static int get_uint(const msgpack_object *map, const char *key, uint64_t *value) {
    const msgpack_object *o = map_get(map, key);
    if (!o || o->type != MSGPACK_OBJECT_POSITIVE_INTEGER) return 0;
    *value = o->via.u64;
    return 1;
}

static int get_int(const msgpack_object *map, const char *key, int64_t *value) {
    const msgpack_object *o = map_get(map, key);
    if (!o) return 0;
    if (o->type == MSGPACK_OBJECT_POSITIVE_INTEGER && o->via.u64 <= INT64_MAX) *value = (int64_t)o->via.u64;
    else if (o->type == MSGPACK_OBJECT_NEGATIVE_INTEGER) *value = o->via.i64;
    else return 0;
    return 1;
}

static void pack_key(msgpack_packer *pk, const char *key) { msgpack_pack_str_with_body(pk, key, strlen(key)); }

/* ---------------------------------------------------------------- groups and epochs */

static int topic_wanted(const char *topic, size_t n) {
    for (int i = 0; i < opt.nprefixes; i++) {
        size_t plen = strlen(opt.prefixes[i]);
        if (plen <= n && memcmp(topic, opt.prefixes[i], plen) == 0) return 1;
    }
    return 0;
}

static int group_wanted(const char *name, size_t n) {
    if (opt.want_all) return 1;
    for (int i = 0; i < opt.nprefixes; i++) {
        const char *slash = strchr(opt.prefixes[i], '/');
        if (slash && (size_t)(slash - opt.prefixes[i]) == n && memcmp(opt.prefixes[i], name, n) == 0) return 1;
    }
    return 0;
}

static group_t *find_group(const char *name, size_t n, int create) {
    if (n == 0 || n >= GROUP_NAME_MAX) return NULL;
    for (int i = 0; i < ngroups; i++)
        if (strlen(groups[i].name) == n && memcmp(groups[i].name, name, n) == 0) return &groups[i];
    if (!create || ngroups == MAX_GROUPS) return NULL;
    group_t *g = &groups[ngroups++];
    memcpy(g->name, name, n);
    g->name[n] = '\0';
    g->last = 0;
    g->wanted = group_wanted(name, n);
    return g;
}

static int epoch_retired(uint64_t epoch) {
    for (int i = 0; i < nretired; i++)
        if (retired_epochs[i] == epoch) return 1;
    return 0;
}

/* The broker restarted: its counters start again at 1, so every group starts again at 0. */
static void change_epoch(uint64_t epoch) {
    if (epoch == epoch_now) return;
    if (nretired == MAX_RETIRED_EPOCHS) {
        memmove(retired_epochs, retired_epochs + 1, sizeof retired_epochs[0] * (MAX_RETIRED_EPOCHS - 1));
        nretired--;
    }
    retired_epochs[nretired++] = epoch_now;
    warn("epoch changed %" PRIu64 " -> %" PRIu64 ": resynchronising", epoch_now, epoch);
    epoch_now = epoch;
    stats.epochs++;
    for (int i = 0; i < ngroups; i++) groups[i].last = 0;
}

/* ---------------------------------------------------------------- frames */

typedef struct {
    zmq_msg_t *frames;
    size_t n, cap;
} message_t;

static void message_close(message_t *m) {
    for (size_t i = 0; i < m->n; i++) zmq_msg_close(&m->frames[i]);
    free(m->frames);
    m->frames = NULL;
    m->n = m->cap = 0;
}

/* Receives every frame of one message (up to max_frames kept, the rest drained); returns the total frame count,
 * 0 when nothing was waiting (ZMQ_DONTWAIT) or -1 on error. */
static long recv_message(void *sock, message_t *m, size_t max_frames) {
    long total = 0;
    int more = 1;
    m->n = 0;
    while (more) {
        zmq_msg_t frame;
        zmq_msg_init(&frame);
        if (zmq_msg_recv(&frame, sock, total == 0 ? ZMQ_DONTWAIT : 0) < 0) {
            int err = errno;
            zmq_msg_close(&frame);
            if (total == 0 && err == EAGAIN) return 0;
            if (err == EINTR && total > 0) continue;
            return total == 0 && err == EINTR ? 0 : -1;
        }
        more = zmq_msg_more(&frame);
        total++;
        if (m->n < max_frames) {
            if (m->n == m->cap) {
                size_t cap = m->cap ? m->cap * 2 : 8;
                zmq_msg_t *p = realloc(m->frames, cap * sizeof *p);
                if (!p) {
                    zmq_msg_close(&frame);
                    fprintf(stderr, "ERROR out of memory\n");
                    finish(EXIT_NOMEM);
                }
                m->frames = p;
                m->cap = cap;
            }
            m->frames[m->n++] = frame;
        } else {
            zmq_msg_close(&frame);
        }
    }
    return total;
}

/* ---------------------------------------------------------------- events */

static int decode_header(const msgpack_object *h, header_t *out_h) {
    const msgpack_object *o;
    memset(out_h, 0, sizeof *out_h);
    if (h->type != MSGPACK_OBJECT_MAP) return 0;
    if (!get_uint(h, "v", &out_h->v) || !get_uint(h, "epoch", &out_h->epoch) || !get_uint(h, "seq", &out_h->seq) ||
        !get_uint(h, "ts", &out_h->ts))
        return 0;
    if (!(o = map_get(h, "node")) || o->type != MSGPACK_OBJECT_STR) return 0;
    out_h->node = o->via.str.ptr;
    out_h->node_len = o->via.str.size;
    if (!(o = map_get(h, "src")) || o->type != MSGPACK_OBJECT_STR) return 0;
    out_h->src = o->via.str.ptr;
    out_h->src_len = o->via.str.size;
    o = map_get(h, "printer");
    if (o && o->type == MSGPACK_OBJECT_STR) {
        out_h->has_printer = 1;
        out_h->printer = o->via.str.ptr;
        out_h->printer_len = o->via.str.size;
    } else if (o && o->type != MSGPACK_OBJECT_NIL) {
        return 0;
    }
    return 1;
}

static void deliver(const char *topic, size_t topic_len, const header_t *h, const msgpack_object *payload) {
    out.len = 0;
    buf_puts(&out, "{\"topic\":");
    json_string(&out, topic, topic_len);
    buf_puts(&out, ",\"node\":");
    json_string(&out, h->node, h->node_len);
    buf_puts(&out, ",\"printer\":");
    if (h->has_printer) json_string(&out, h->printer, h->printer_len);
    else buf_puts(&out, "null");
    buf_printf(&out, ",\"epoch\":%" PRIu64 ",\"seq\":%" PRIu64 ",\"ts\":%" PRIu64, h->epoch, h->seq, h->ts);
    buf_puts(&out, ",\"src\":");
    json_string(&out, h->src, h->src_len);
    buf_puts(&out, ",\"payload\":");
    json_value(&out, payload);
    buf_puts(&out, "}\n");
    fwrite(out.p, 1, out.len, stdout);
    stats.delivered++;
    if (opt.count > 0 && (long long)stats.delivered >= opt.count) finish(0);
}

static void replay(group_t *g, uint64_t upto);

/* One event (3 frames) from the SUB socket (from_replay = 0) or from a REPLAY reply (from_replay = 1). */
static void handle_event(zmq_msg_t *frames, int from_replay) {
    const char *topic = zmq_msg_data(&frames[0]);
    size_t topic_len = zmq_msg_size(&frames[0]);
    const char *slash = memchr(topic, '/', topic_len);
    if (!slash || slash == topic || slash == topic + topic_len - 1) {
        stats.bad_topic++;
        warn("bad topic (%zu bytes): no <group>/<Name>", topic_len);
        return;
    }
    msgpack_unpacked hu, pu;
    header_t h;
    if (!unpack_frame(&hu, zmq_msg_data(&frames[1]), zmq_msg_size(&frames[1])) || !decode_header(&hu.data, &h)) {
        stats.bad_header++;
        warn("bad header on %.*s: not a msgpack map with v, node, printer, epoch, seq, ts, src", (int)topic_len,
             topic);
        msgpack_unpacked_destroy(&hu);
        return;
    }
    if (h.v != 1) {
        stats.bad_header++;
        warn("unsupported protocol version %" PRIu64 " on %.*s", h.v, (int)topic_len, topic);
        msgpack_unpacked_destroy(&hu);
        return;
    }
    int payload_ok = unpack_frame(&pu, zmq_msg_data(&frames[2]), zmq_msg_size(&frames[2])) &&
                     pu.data.type == MSGPACK_OBJECT_MAP;

    if (h.epoch != epoch_now) {
        if (from_replay || epoch_retired(h.epoch)) {
            stats.stale++; /* sent by a broker run we already left behind */
            goto done;
        }
        change_epoch(h.epoch);
    }
    group_t *g = find_group(topic, (size_t)(slash - topic), 1);
    if (!g) {
        stats.bad_topic++;
        warn("group table full or group name too long: %.*s", (int)topic_len, topic);
        goto done;
    }
    if (g->wanted) {
        if (h.seq <= g->last) {
            stats.dupes++;
        } else {
            if (h.seq > g->last + 1 && !from_replay) {
                stats.gaps++;
                replay(g, h.seq - 1);
                if (h.epoch != epoch_now) {
                    stats.stale++; /* the replay met a newer broker run: this event's seq means nothing now */
                    goto done;
                }
            }
            if (h.seq > g->last) {
                if (h.seq > g->last + 1) stats.missing += h.seq - g->last - 1;
                g->last = h.seq;
                if (!payload_ok) {
                    /* The seq is consumed all the same: the event exists, we just cannot show it. */
                    stats.bad_payload++;
                    warn("bad payload on %.*s seq %" PRIu64 ": not a msgpack map", (int)topic_len, topic, h.seq);
                } else if (topic_wanted(topic, topic_len)) {
                    if (from_replay) stats.replayed++;
                    deliver(topic, topic_len, &h, &pu.data);
                }
            } else {
                stats.dupes++; /* the replay above already delivered it */
            }
        }
    }
    /* A heartbeat's streams reveal a lost tail: groups whose last seq is ahead of ours. */
    if (!from_replay && payload_ok && topic_len == 13 && memcmp(topic, "sys/Heartbeat", 13) == 0 &&
        h.epoch == epoch_now) {
        const msgpack_object *streams = map_get(&pu.data, "streams");
        if (streams && streams->type == MSGPACK_OBJECT_MAP) {
            for (uint32_t i = 0; i < streams->via.map.size && h.epoch == epoch_now; i++) {
                const msgpack_object *k = &streams->via.map.ptr[i].key, *v = &streams->via.map.ptr[i].val;
                if (k->type != MSGPACK_OBJECT_STR || v->type != MSGPACK_OBJECT_POSITIVE_INTEGER) continue;
                group_t *sg = find_group(k->via.str.ptr, k->via.str.size, 1);
                if (sg && sg->wanted && v->via.u64 > sg->last) {
                    stats.gaps++;
                    replay(sg, v->via.u64);
                }
            }
        }
    }
done:
    msgpack_unpacked_destroy(&pu);
    msgpack_unpacked_destroy(&hu);
}

/* ---------------------------------------------------------------- control channel */

/* Sends one request and waits for the reply carrying its id; replies to earlier, abandoned requests are dropped.
 * Returns 1 with the reply in *reply (frame 1 "OK", frame 2 decoded into *map), 0 otherwise. */
static int request(const char *command, int64_t id, msgpack_sbuffer *args, message_t *reply,
                   msgpack_unpacked *map) {
    if (zmq_send(dealer, command, strlen(command), ZMQ_SNDMORE) < 0 ||
        zmq_send(dealer, args->data, args->size, 0) < 0) {
        warn("%s: send failed: %s", command, zmq_strerror(errno));
        return 0;
    }
    double deadline = now_s() + opt.control_timeout;
    for (;;) {
        double left = deadline - now_s();
        if (left <= 0) {
            warn("%s: no reply within %.1f s", command, opt.control_timeout);
            return 0;
        }
        zmq_pollitem_t item = {dealer, 0, ZMQ_POLLIN, 0};
        if (zmq_poll(&item, 1, (long)(left * 1000) + 1) < 0) {
            if (errno == EINTR) continue;
            return 0;
        }
        if (!(item.revents & ZMQ_POLLIN)) continue;
        long n = recv_message(dealer, reply, 3 * REPLAY_LIMIT + 2);
        if (n <= 0) continue;
        msgpack_unpacked_init(map);
        int64_t got = -1;
        if ((size_t)n != reply->n || n < 2 ||
            !unpack_frame(map, zmq_msg_data(&reply->frames[1]), zmq_msg_size(&reply->frames[1])) ||
            map->data.type != MSGPACK_OBJECT_MAP) {
            stats.bad_replies++;
            warn("%s: malformed reply (%ld frames)", command, n);
            msgpack_unpacked_destroy(map);
            message_close(reply);
            continue;
        }
        if (!get_int(&map->data, "id", &got) || got != id) {
            stats.late_replies++;
            msgpack_unpacked_destroy(map);
            message_close(reply);
            continue;
        }
        if (zmq_msg_size(&reply->frames[0]) != 2 || memcmp(zmq_msg_data(&reply->frames[0]), "OK", 2) != 0) {
            const msgpack_object *e = map_get(&map->data, "error");
            warn("%s: broker answered %.*s: %.*s", command, (int)zmq_msg_size(&reply->frames[0]),
                 (const char *)zmq_msg_data(&reply->frames[0]),
                 e && e->type == MSGPACK_OBJECT_STR ? (int)e->via.str.size : 1,
                 e && e->type == MSGPACK_OBJECT_STR ? e->via.str.ptr : "?");
            msgpack_unpacked_destroy(map);
            message_close(reply);
            return 0;
        }
        return 1;
    }
}

/* Starts a request's argument map of nkeys keys besides "id", which it packs; returns that id. */
static int64_t begin_arguments(msgpack_sbuffer *args, msgpack_packer *pk, size_t nkeys) {
    int64_t id = next_request_id++;
    msgpack_sbuffer_init(args);
    msgpack_packer_init(pk, args, msgpack_sbuffer_write);
    msgpack_pack_map(pk, nkeys + 1);
    pack_key(pk, "id");
    msgpack_pack_int64(pk, id);
    return id;
}

static int status(void) {
    msgpack_sbuffer args;
    msgpack_packer pk;
    message_t reply = {0};
    msgpack_unpacked map;
    int64_t id = begin_arguments(&args, &pk, 0);
    int ok = request("STATUS", id, &args, &reply, &map);
    msgpack_sbuffer_destroy(&args);
    if (!ok) return 0;
    uint64_t epoch;
    const msgpack_object *streams = map_get(&map.data, "streams");
    if (!get_uint(&map.data, "epoch", &epoch) || (streams && streams->type != MSGPACK_OBJECT_MAP)) {
        warn("STATUS: reply lacks epoch or streams");
        ok = 0;
    } else {
        epoch_now = epoch;
        for (uint32_t i = 0; streams && i < streams->via.map.size; i++) {
            const msgpack_object *k = &streams->via.map.ptr[i].key, *v = &streams->via.map.ptr[i].val;
            if (k->type != MSGPACK_OBJECT_STR || v->type != MSGPACK_OBJECT_POSITIVE_INTEGER) continue;
            group_t *g = find_group(k->via.str.ptr, k->via.str.size, 1);
            if (g) g->last = v->via.u64;
        }
    }
    msgpack_unpacked_destroy(&map);
    message_close(&reply);
    return ok;
}

/* Fetches the events of g after g->last from the ring and handles them in order, until g->last reaches upto or the
 * broker has nothing more.  Events that already left the ring are counted in stats.lost. */
static void replay(group_t *g, uint64_t upto) {
    for (int round = 0; round < MAX_REPLAY_ROUNDS && g->last < upto; round++) {
        msgpack_sbuffer args;
        msgpack_packer pk;
        message_t reply = {0};
        msgpack_unpacked map;
        int64_t id = begin_arguments(&args, &pk, 4);
        pack_key(&pk, "group");
        msgpack_pack_str_with_body(&pk, g->name, strlen(g->name));
        pack_key(&pk, "since");
        msgpack_pack_uint64(&pk, g->last);
        pack_key(&pk, "limit");
        msgpack_pack_uint64(&pk, REPLAY_LIMIT);
        pack_key(&pk, "epoch");
        msgpack_pack_uint64(&pk, epoch_now);
        int ok = request("REPLAY", id, &args, &reply, &map);
        msgpack_sbuffer_destroy(&args);
        if (!ok) return; /* the next gap or heartbeat retries */
        stats.replays++;
        uint64_t epoch = 0, count = 0, lost = 0;
        const msgpack_object *more = map_get(&map.data, "more");
        int has_more = more && more->type == MSGPACK_OBJECT_BOOLEAN && more->via.boolean;
        if (!get_uint(&map.data, "epoch", &epoch) || !get_uint(&map.data, "count", &count) ||
            reply.n != 2 + 3 * count) {
            stats.bad_replies++;
            warn("REPLAY %s: reply map and frame count disagree (%zu frames)", g->name, reply.n);
            msgpack_unpacked_destroy(&map);
            message_close(&reply);
            return;
        }
        get_uint(&map.data, "lost", &lost);
        if (epoch != epoch_now) {
            /* Our since belonged to a previous run: start again from 0 in the broker's current epoch. */
            change_epoch(epoch);
            msgpack_unpacked_destroy(&map);
            message_close(&reply);
            continue;
        }
        if (lost) {
            stats.lost += lost;
            warn("REPLAY %s since %" PRIu64 ": %" PRIu64 " events already left the ring", g->name, g->last, lost);
        }
        uint64_t before = g->last;
        for (uint64_t i = 0; i < count; i++) handle_event(&reply.frames[2 + 3 * i], 1);
        msgpack_unpacked_destroy(&map);
        message_close(&reply);
        if (!has_more || g->last == before) return;
    }
}

/* ---------------------------------------------------------------- main */

/* Prints "c_subscriber: <what><arg>" (when what is given) and the usage, then exits with EXIT_USAGE. */
static void usage(const char *what, const char *arg) {
    if (what) fprintf(stderr, "c_subscriber: %s%s\n", what, arg ? arg : "");
    fprintf(stderr, "usage: c_subscriber --publish EP --control EP [--count N] [--timeout S] [--rcvhwm N]\n"
                    "                    [--control-timeout S] [--heartbeat S] PREFIX...\n");
    exit(EXIT_USAGE);
}

static double parse_number(const char *name, const char *text, double min, double max) {
    char *end;
    errno = 0;
    double v = strtod(text, &end);
    if (errno || end == text || *end || !(v >= min) || v > max) usage("bad value for ", name);
    return v;
}

static void parse_args(int argc, char **argv) {
    opt.timeout = 30;
    opt.control_timeout = 5;
    opt.heartbeat = 1;
    opt.rcvhwm = -1;
    for (int i = 1; i < argc; i++) {
        const char *a = argv[i];
        if (a[0] == '-' && a[1] == '-') {
            if (i + 1 >= argc) usage("a value must follow ", a);
            const char *v = argv[++i];
            if (!strcmp(a, "--publish")) opt.publish = v;
            else if (!strcmp(a, "--control")) opt.control = v;
            else if (!strcmp(a, "--count")) opt.count = (long long)parse_number(a, v, 0, 1e15);
            else if (!strcmp(a, "--timeout")) opt.timeout = parse_number(a, v, 0.001, 1e9);
            else if (!strcmp(a, "--control-timeout")) opt.control_timeout = parse_number(a, v, 0.001, 1e9);
            else if (!strcmp(a, "--heartbeat")) opt.heartbeat = parse_number(a, v, 0.001, 1e9);
            else if (!strcmp(a, "--rcvhwm")) opt.rcvhwm = (int)parse_number(a, v, 0, INT_MAX);
            else usage("unknown option ", a);
            continue;
        }
        if (opt.nprefixes == MAX_PREFIXES) usage("too many prefixes (at most 64)", NULL);
        /* "print" means the group print/, never a longer group name that starts the same way. */
        size_t n = strlen(a);
        if (n && !strchr(a, '/')) {
            char *p = malloc(n + 2);
            if (!p) exit(EXIT_NOMEM);
            memcpy(p, a, n);
            memcpy(p + n, "/", 2);
            a = p;
        }
        if (n == 0) opt.want_all = 1;
        else if (strchr(a, '/') - a >= GROUP_NAME_MAX || a[0] == '/') usage("bad prefix ", a);
        opt.prefixes[opt.nprefixes++] = a;
    }
    if (!opt.publish || !opt.control) usage("--publish and --control are required", NULL);
    if (opt.nprefixes == 0) usage("give at least one PREFIX (\"\" for everything)", NULL);
}

static void subscribe(const char *prefix, size_t n) {
    if (zmq_setsockopt(sub, ZMQ_SUBSCRIBE, prefix, n) != 0) {
        fprintf(stderr, "ERROR subscribe %.*s: %s\n", (int)n, prefix, zmq_strerror(errno));
        finish(EXIT_BROKER);
    }
}

int main(int argc, char **argv) {
    parse_args(argc, argv);
    setvbuf(stdout, NULL, _IOLBF, 1 << 16);
    ctx = zmq_ctx_new();
    sub = zmq_socket(ctx, ZMQ_SUB);
    dealer = zmq_socket(ctx, ZMQ_DEALER);
    int zero = 0;
    zmq_setsockopt(sub, ZMQ_LINGER, &zero, sizeof zero);
    zmq_setsockopt(dealer, ZMQ_LINGER, &zero, sizeof zero);
    if (opt.rcvhwm >= 0) zmq_setsockopt(sub, ZMQ_RCVHWM, &opt.rcvhwm, sizeof opt.rcvhwm);
    if (zmq_connect(sub, opt.publish) != 0 || zmq_connect(dealer, opt.control) != 0) {
        fprintf(stderr, "ERROR connect: %s\n", zmq_strerror(errno));
        finish(EXIT_BROKER);
    }

    /* Whole groups only (seq is per group), then sys/Heartbeat for tail loss and liveness. */
    if (opt.want_all) {
        subscribe("", 0);
    } else {
        int sys_wanted = 0;
        for (int i = 0; i < opt.nprefixes; i++) {
            size_t glen = (size_t)(strchr(opt.prefixes[i], '/') - opt.prefixes[i]);
            int seen = 0;
            for (int j = 0; j < i; j++)
                if (!strncmp(opt.prefixes[j], opt.prefixes[i], glen + 1)) seen = 1;
            if (!seen) subscribe(opt.prefixes[i], glen + 1);
            if (glen == 3 && !strncmp(opt.prefixes[i], "sys", 3)) sys_wanted = 1;
        }
        if (!sys_wanted) subscribe("sys/Heartbeat", 13);
    }

    if (!status()) {
        fprintf(stderr, "ERROR broker did not answer STATUS on %s\n", opt.control);
        finish(EXIT_BROKER);
    }
    fprintf(stderr, "READY epoch=%" PRIu64 "\n", epoch_now);

    double start = now_s(), last_heartbeat = start, silence_warned = 0;
    message_t m = {0};
    for (;;) {
        double now = now_s();
        if (now - start >= opt.timeout) {
            fprintf(stderr, "TIMEOUT after %.1f s with %llu events\n", opt.timeout, stats.delivered);
            finish(EXIT_TIMEOUT);
        }
        if (now - last_heartbeat > 3 * opt.heartbeat && now - silence_warned > 3 * opt.heartbeat) {
            warn("no heartbeat for %.1f s: broker gone or cut off", now - last_heartbeat);
            silence_warned = now;
        }
        double wait = opt.timeout - (now - start);
        if (wait > opt.heartbeat) wait = opt.heartbeat;
        zmq_pollitem_t item = {sub, 0, ZMQ_POLLIN, 0};
        if (zmq_poll(&item, 1, (long)(wait * 1000) + 1) < 0) {
            if (errno == EINTR) continue;
            fprintf(stderr, "ERROR poll: %s\n", zmq_strerror(errno));
            finish(EXIT_BROKER);
        }
        if (!(item.revents & ZMQ_POLLIN)) continue;
        /* Drain what is queued before polling again. */
        for (int burst = 0; burst < 1000; burst++) {
            long n = recv_message(sub, &m, 3);
            if (n <= 0) break;
            if (n != 3) {
                stats.bad_frames++;
                warn("message of %ld frames (expected 3): dropped", n);
            } else {
                if (zmq_msg_size(&m.frames[0]) == 13 && !memcmp(zmq_msg_data(&m.frames[0]), "sys/Heartbeat", 13))
                    last_heartbeat = now_s();
                handle_event(m.frames, 0);
            }
            for (size_t i = 0; i < m.n; i++) zmq_msg_close(&m.frames[i]);
            m.n = 0;
        }
    }
}
