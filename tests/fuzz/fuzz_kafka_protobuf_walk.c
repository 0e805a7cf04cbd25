/* libFuzzer target for the Protobuf wire walker (connectors/kafka/kafka_protobuf.cc, WireWalker):
 * the input's first byte picks a message type of tests/unit/pb_walk_schemas.h (and a small JSON
 * limit now and then), the rest is a record of it. Oracle: the decode as esmd does it (the walker
 * first) and libprotobuf's reflection path alone agree: the same JSON byte for byte, or both
 * refuse with the same message; what the walker alone gives is the reflection path's JSON. */
#include "../../connectors/kafka/kafka_protobuf.h"
#include "../unit/pb_walk_schemas.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static struct esmd_pb_schema *schemas[2];

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char e1[512], e2[512], e3[512];
    if (!schemas[0]) {
        static const char *const text[] = {PB_WALK_PROTO3, PB_WALK_PROTO2};
        for (int i = 0; i < 2; i++) {
            struct esmd_pb_file f = {NULL, text[i], strlen(text[i]), false};
            schemas[i] = esmd_pb_schema_new(&f, 1, e1, sizeof(e1));
            if (!schemas[i])
                abort();
        }
    }
    if (size < 1)
        return 0;
    /* proto3: Inner, All, Wkt; proto2: Q, Opt */
    static const struct {
        int schema;
        int64_t idx;
    } types[] = {{0, 1}, {0, 0}, {0, 2}, {1, 0}, {1, 1}, {0, 1}, {1, 0}, {0, 1}};
    int t = data[0] & 7;
    size_t max = (data[0] & 8) ? 64 : (size_t)1 << 20;
    /* a copy of exactly the record's bytes, so reading past the end is caught */
    size_t len = size - 1;
    unsigned char *msg = malloc(len ? len : 1);
    if (len)
        memcpy(msg, data + 1, len);
    const struct esmd_pb_schema *s = schemas[types[t].schema];
    const int64_t *idx = &types[t].idx;
    size_t l1 = 0, l2 = 0, l3 = 0;
    e1[0] = e2[0] = e3[0] = '\0';
    char *a = esmd_pb_decode_via(ESMD_PB_DECODE_REFLECTION, s, idx, 1, msg, len, max, &l1, e1,
                                 sizeof(e1));
    char *b = esmd_pb_decode_via(ESMD_PB_DECODE_ANY, s, idx, 1, msg, len, max, &l2, e2, sizeof(e2));
    char *w =
        esmd_pb_decode_via(ESMD_PB_DECODE_WALK, s, idx, 1, msg, len, max, &l3, e3, sizeof(e3));
    if ((a == NULL) != (b == NULL) || (a && (l1 != l2 || memcmp(a, b, l1) != 0)) ||
        (!a && strcmp(e1, e2) != 0) || (w && (!a || l3 != l1 || memcmp(w, a, l1) != 0))) {
        fprintf(stderr, "paths differ\nreflection: %s\nany:        %s\nwalk:       %s\n",
                a ? a : e1, b ? b : e2, w ? w : e3);
        abort();
    }
    free(a);
    free(b);
    free(w);
    free(msg);
    return 0;
}
