/* A zevents publisher in C, written from PROTOCOL.md section 3 alone: one PUSH frame per event, holding the
 * topic and the meta map behind a one-byte length each, then the payload map.
 *
 *   c_publisher INGEST_ENDPOINT TOPIC SRC PRINTER|- COUNT
 *
 * Publishes COUNT events on TOPIC with payload {"i": k, "name": "Bénchy 🐰", "x": k / 4, "big": 2^64 - 1 - k,
 * "none": nil} for k = 0 .. COUNT-1, then prints "SENT COUNT" once every frame has left (zmq_ctx_term waits for
 * them).  PRINTER "-" sends a nil printer.  Exit status 2 on bad arguments, 1 on a ZeroMQ error.
 */
#include <msgpack.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <zmq.h>

static void pack_str(msgpack_packer *packer, const char *text)
{
    size_t size = strlen(text);
    msgpack_pack_str(packer, size);
    msgpack_pack_str_body(packer, text, size);
}

/* A length byte, then the bytes: how the ingest frame carries its topic and its meta. */
static int put_short(msgpack_sbuffer *frame, const char *data, size_t size)
{
    unsigned char length = (unsigned char)size;
    if (size > 255)
        return -1;
    msgpack_sbuffer_write(frame, (const char *)&length, 1);
    msgpack_sbuffer_write(frame, data, size);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc != 6) {
        fprintf(stderr, "usage: c_publisher INGEST_ENDPOINT TOPIC SRC PRINTER|- COUNT\n");
        return 2;
    }
    const char *endpoint = argv[1], *topic = argv[2], *src = argv[3], *printer = argv[4];
    char *end = NULL;
    long count = strtol(argv[5], &end, 10);
    if (*end != '\0' || count < 0 || strlen(topic) == 0 || strchr(topic, '/') == NULL) {
        fprintf(stderr, "c_publisher: COUNT must be a number >= 0 and TOPIC <group>/<Event>\n");
        return 2;
    }

    msgpack_sbuffer meta;
    msgpack_sbuffer_init(&meta);
    msgpack_packer meta_packer;
    msgpack_packer_init(&meta_packer, &meta, msgpack_sbuffer_write);
    msgpack_pack_map(&meta_packer, 2);
    pack_str(&meta_packer, "src");
    pack_str(&meta_packer, src);
    pack_str(&meta_packer, "printer");
    if (strcmp(printer, "-") == 0)
        msgpack_pack_nil(&meta_packer);
    else
        pack_str(&meta_packer, printer);

    void *context = zmq_ctx_new();
    void *push = zmq_socket(context, ZMQ_PUSH);
    if (push == NULL || zmq_connect(push, endpoint) != 0) {
        fprintf(stderr, "c_publisher: cannot connect to %s: %s\n", endpoint, zmq_strerror(zmq_errno()));
        return 1;
    }

    msgpack_sbuffer frame;
    msgpack_sbuffer_init(&frame);
    msgpack_packer packer;
    msgpack_packer_init(&packer, &frame, msgpack_sbuffer_write);
    int status = 0;
    for (long k = 0; k < count; k++) {
        msgpack_sbuffer_clear(&frame);
        if (put_short(&frame, topic, strlen(topic)) != 0 || put_short(&frame, meta.data, meta.size) != 0) {
            fprintf(stderr, "c_publisher: the topic and the meta must each fit in 255 bytes\n");
            status = 2;
            break;
        }
        msgpack_pack_map(&packer, 5);
        pack_str(&packer, "i");
        msgpack_pack_int64(&packer, k);
        pack_str(&packer, "name");
        pack_str(&packer, "B\xc3\xa9nchy \xf0\x9f\x90\xb0");
        pack_str(&packer, "x");
        msgpack_pack_double(&packer, (double)k / 4);
        pack_str(&packer, "big");
        msgpack_pack_uint64(&packer, UINT64_MAX - (uint64_t)k);
        pack_str(&packer, "none");
        msgpack_pack_nil(&packer);
        if (zmq_send(push, frame.data, frame.size, 0) < 0) {
            fprintf(stderr, "c_publisher: send failed: %s\n", zmq_strerror(zmq_errno()));
            status = 1;
            break;
        }
    }

    zmq_close(push);       /* the default linger keeps every queued frame ... */
    zmq_ctx_term(context); /* ... and this returns once they have all been sent */
    msgpack_sbuffer_destroy(&frame);
    msgpack_sbuffer_destroy(&meta);
    if (status == 0)
        printf("SENT %ld\n", count);
    return status;
}
