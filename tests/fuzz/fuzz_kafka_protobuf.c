/* libFuzzer target for Protobuf records of a schema registry (connectors/kafka/kafka_protobuf.cc
 * through kafka_schema.c): the first byte picks the mode.
 *  - even: the rest is a record body (message indexes, then the message) decoded against a fixed
 *    schema using most of Protobuf (nested and recursive types, enums, maps, oneofs, packed and
 *    unpacked repeated fields, bytes, a well-known Timestamp, Any, proto2 groups and required
 *    fields);
 *  - odd: the rest is the registry's schema text (.proto, or base64 of a FileDescriptorProto),
 *    which, when it builds, decodes a few fixed bodies.
 * Oracle: whatever is accepted is one valid JSON document, a refusal leaves the output as it was
 * and says why. No crash, no exception reaching C, no read past the data. */
#include "../../connectors/kafka/kafka_schema.h"

#include "esmd/json.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const char schema3[] =
    "syntax = \"proto3\";\n"
    "package f;\n"
    "import \"google/protobuf/timestamp.proto\";\n"
    "import \"google/protobuf/any.proto\";\n"
    "message R {\n"
    "  int32 i32 = 1; int64 i64 = 2; uint32 u32 = 3; uint64 u64 = 4; sint32 s32 = 5;\n"
    "  sint64 s64 = 6; fixed32 f32 = 7; fixed64 f64 = 8; sfixed32 sf32 = 9; sfixed64 sf64 = 10;\n"
    "  float fl = 11; double db = 12; bool ok = 13; string s = 14; bytes b = 15;\n"
    "  E e = 16; repeated int64 packed = 17; repeated string names = 18;\n"
    "  map<string, R> kids = 19; map<int32, E> codes = 20;\n"
    "  oneof pick { string one = 21; R two = 22; }\n"
    "  google.protobuf.Timestamp at = 23; google.protobuf.Any any = 24;\n"
    "  repeated R list = 25; repeated int32 unpacked = 26 [packed = false];\n"
    "  message N { message M { string deep = 1; } M m = 1; }\n"
    "  N n = 27;\n"
    "}\n"
    "enum E { Z = 0; A = 1; B = 2; }\n"
    "message S { optional string o = 1; }\n";

static const char schema2[] = "syntax = \"proto2\";\n"
                              "package g;\n"
                              "message P {\n"
                              "  required int32 id = 1;\n"
                              "  optional group G = 2 { optional string x = 3; }\n"
                              "  optional E e = 4 [default = B];\n"
                              "  enum E { A = 1; B = 2; }\n"
                              "  repeated P kids = 5;\n"
                              "}\n";

static struct esmd_sr_schema *fixed[2];

static void check(const struct esmd_sr_schema *s, const unsigned char *body, size_t len)
{
    struct esmd_buf out = ESMD_BUF_INIT;
    const unsigned char *src;
    size_t src_len;
    char err[256];
    err[0] = '\0';
    esmd_buf_puts(&out, "x"); /* what was there before stays */
    if (esmd_sr_decode(s, body, len, &out, &src, &src_len, err, sizeof(err))) {
        if (!esmd_json_valid(out.data + 1, out.len - 1) || src != body || src_len != len)
            abort();
    } else if (out.len != 1 || !err[0]) {
        abort();
    }
    esmd_buf_free(&out);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char err[256];
    if (!fixed[0]) {
        fixed[0] = esmd_sr_schema_new(ESMD_SR_PROTOBUF, schema3, strlen(schema3), err, sizeof(err));
        fixed[1] = esmd_sr_schema_new(ESMD_SR_PROTOBUF, schema2, strlen(schema2), err, sizeof(err));
        if (!fixed[0] || !fixed[1])
            abort();
    }
    if (size < 1)
        return 0;
    /* a copy of exactly the input's bytes, so reading past the end is caught */
    size_t len = size - 1;
    unsigned char *rest = malloc(len ? len : 1);
    if (len)
        memcpy(rest, data + 1, len);
    if (!(data[0] & 1)) {
        check(fixed[(data[0] >> 1) & 1], rest, len);
    } else {
        err[0] = '\0';
        struct esmd_sr_schema *s =
            esmd_sr_schema_new(ESMD_SR_PROTOBUF, (const char *)rest, len, err, sizeof(err));
        if (s) {
            static const unsigned char bodies[][6] = {
                {0x00}, {0x02, 0x02, 0x08, 0x01}, {0x04, 0x00, 0x00, 0x0a, 0x01, 'y'}};
            static const size_t lens[] = {1, 4, 6};
            for (size_t i = 0; i < 3; i++)
                check(s, bodies[i], lens[i]);
            esmd_sr_schema_free(s);
        } else if (!err[0]) {
            abort();
        }
    }
    free(rest);
    return 0;
}
