/* The schema registry decoders (connectors/kafka/kafka_schema.c) on hand-made Avro and JSON
 * Schema records, and the schema metadata the Kafka encoder writes (exact sizes). The whole
 * path against a real registry and real serializers: tests/integration/test_schema_registry.py. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "testutil.h"

#include "../../connectors/kafka/kafka_private.h"
#include "../../connectors/kafka/kafka_schema.h"

#include <stdlib.h>
#include <string.h>

#define ORDER                                                                                      \
    "{\"type\":\"record\",\"name\":\"Order\",\"fields\":["                                         \
    "{\"name\":\"id\",\"type\":\"long\"},{\"name\":\"name\",\"type\":\"string\"},"                 \
    "{\"name\":\"tags\",\"type\":{\"type\":\"array\",\"items\":\"string\"}},"                      \
    "{\"name\":\"opt\",\"type\":[\"null\",\"string\"]},"                                           \
    "{\"name\":\"price\",\"type\":\"double\"},{\"name\":\"raw\",\"type\":\"bytes\"},"              \
    "{\"name\":\"kind\",\"type\":{\"type\":\"enum\",\"name\":\"K\",\"symbols\":[\"A\",\"B\"]}}]}"

/* id 5, name "ab", tags ["x"], opt "hi", price 1.5, raw [0xff, 0x41], kind B */
static const unsigned char order_bin[] = {
    0x0a, 0x04, 'a', 'b', 0x02, 0x02, 'x',  0x00, 0x02, 0x04, 'h',  'i',
    0,    0,    0,   0,   0,    0,    0xf8, 0x3f, 0x04, 0xff, 0x41, 0x02,
};
/* bytes as code points U+0000..U+00FF, in UTF-8: 0xff is "\xc3\xbf" */
#define ORDER_JSON                                                                                 \
    "{\"id\":5,\"name\":\"ab\",\"tags\":[\"x\"],\"opt\":\"hi\",\"price\":1.5,\"raw\":\"\xc3\xbf"   \
    "A\",\"kind\":\"B\"}"

static struct esmd_sr_schema *avro(const char *text)
{
    char err[256];
    struct esmd_sr_schema *s =
        esmd_sr_schema_new(ESMD_SR_AVRO, text, strlen(text), err, sizeof(err));
    if (!s)
        fail_msg("schema: %s", err);
    return s;
}

/* Decodes; returns the JSON (owned) or NULL with err. */
static char *decode(const struct esmd_sr_schema *s, const void *p, size_t n, char *err)
{
    struct esmd_buf out = ESMD_BUF_INIT;
    const unsigned char *src;
    size_t src_len;
    if (!esmd_sr_decode(s, p, n, &out, &src, &src_len, err, 256)) {
        assert_int_equal(out.len, 0);
        esmd_buf_free(&out);
        return NULL;
    }
    assert_ptr_equal(src, p);
    assert_int_equal(src_len, n);
    return esmd_buf_steal(&out, NULL);
}

static void test_frame(void **state)
{
    (void)state;
    const unsigned char rec[] = {0, 0, 0, 1, 2, 0xaa};
    int32_t id;
    const unsigned char *body;
    size_t n;
    assert_true(esmd_sr_frame(rec, sizeof(rec), &id, &body, &n));
    assert_int_equal(id, 258);
    assert_ptr_equal(body, rec + 5);
    assert_int_equal(n, 1);
    assert_false(esmd_sr_frame(rec, 4, &id, &body, &n));         /* too short */
    assert_false(esmd_sr_frame("{\"a\":1}", 7, &id, &body, &n)); /* plain JSON */
    /* Protobuf message indexes: [] as one 0 byte; [1, 2] as count 2 then 1, 2 (zigzag) */
    int64_t count = -1;
    const unsigned char none[] = {0x00, 0x0a};
    assert_int_equal(esmd_sr_protobuf_indexes(none, sizeof(none), &count), 1);
    assert_int_equal(count, 0);
    const unsigned char two[] = {0x04, 0x02, 0x04, 0x0a};
    assert_int_equal(esmd_sr_protobuf_indexes(two, sizeof(two), &count), 3);
    assert_int_equal(count, 2);
    const unsigned char cut[] = {0x04, 0x02};
    assert_int_equal(esmd_sr_protobuf_indexes(cut, sizeof(cut), &count), 0);
}

static void test_avro(void **state)
{
    (void)state;
    struct esmd_sr_schema *s = avro(ORDER);
    assert_int_equal(esmd_sr_schema_format(s), ESMD_SR_AVRO);
    char err[256];
    char *json = decode(s, order_bin, sizeof(order_bin), err);
    assert_non_null(json);
    assert_string_equal(json, ORDER_JSON);
    free(json);
    /* every prefix is cut short: refused, nothing written */
    for (size_t n = 0; n < sizeof(order_bin); n++) {
        assert_null(decode(s, order_bin, n, err));
        assert_true(err[0] != '\0');
    }
    /* a byte more than the schema reads: not written with this schema */
    unsigned char more[sizeof(order_bin) + 1];
    memcpy(more, order_bin, sizeof(order_bin));
    more[sizeof(order_bin)] = 0;
    assert_null(decode(s, more, sizeof(more), err));
    assert_non_null(strstr(err, "1 bytes left"));
    /* a union index out of range, an enum index out of range */
    unsigned char bad[sizeof(order_bin)];
    memcpy(bad, order_bin, sizeof(bad));
    bad[8] = 0x06;
    assert_null(decode(s, bad, sizeof(bad), err));
    assert_non_null(strstr(err, "union"));
    memcpy(bad, order_bin, sizeof(bad));
    bad[sizeof(bad) - 1] = 0x08;
    assert_null(decode(s, bad, sizeof(bad), err));
    assert_non_null(strstr(err, "enum"));
    /* a string claiming 2^62 bytes fails without allocating them */
    const unsigned char huge[] = {0x0a, 0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f};
    assert_null(decode(s, huge, sizeof(huge), err));
    /* a string that is not UTF-8 */
    memcpy(bad, order_bin, sizeof(bad));
    bad[2] = 0xc3;
    assert_null(decode(s, bad, sizeof(bad), err));
    assert_non_null(strstr(err, "UTF-8"));
    esmd_sr_schema_free(s);

    /* an array of a billion nulls in 6 bytes is refused early */
    s = avro("{\"type\":\"array\",\"items\":\"null\"}");
    const unsigned char nulls[] = {0x80, 0xa8, 0xd6, 0xb9, 0x07, 0x00};
    assert_null(decode(s, nulls, sizeof(nulls), err));
    assert_non_null(strstr(err, "no bytes"));
    esmd_sr_schema_free(s);
    /* a map of string keys of a billion "x" values: refused at the output cap */
    s = avro("{\"type\":\"map\",\"values\":{\"type\":\"array\",\"items\":\"double\"}}");
    const int entries = 1200000; /* 7.2 MB of "":[], */
    unsigned char *big = malloc(16 + 2 * (size_t)entries);
    size_t n = 0;
    for (uint64_t z = (uint64_t)entries << 1;; z >>= 7) { /* the count, a zigzag varint */
        big[n++] = (unsigned char)((z & 0x7f) | (z > 0x7f ? 0x80 : 0));
        if (z <= 0x7f)
            break;
    }
    for (int i = 0; i < entries; i++) {
        big[n++] = 0x00; /* key "" */
        big[n++] = 0x00; /* an empty array */
    }
    big[n++] = 0x00;
    assert_null(decode(s, big, n, err));
    assert_non_null(strstr(err, "larger"));
    free(big);
    esmd_sr_schema_free(s);

    /* floats: the shortest text that reads back */
    s = avro("{\"type\":\"record\",\"name\":\"R\",\"fields\":[{\"name\":\"f\",\"type\":\"float\"},"
             "{\"name\":\"d\",\"type\":\"double\"}]}");
    const unsigned char fl[] = {0xcd, 0xcc, 0xcc, 0x3d, 0x9a, 0x99,
                                0x99, 0x99, 0x99, 0x99, 0xb9, 0x3f};
    json = decode(s, fl, sizeof(fl), err);
    assert_non_null(json);
    assert_string_equal(json, "{\"f\":0.1,\"d\":0.1}");
    free(json);
    esmd_sr_schema_free(s);

    /* a schema that is not Avro */
    assert_null(esmd_sr_schema_new(ESMD_SR_AVRO, "{\"type\":\"nope\"}", 15, err, sizeof(err)));
    assert_non_null(strstr(err, "not an Avro schema"));
}

static void test_json_and_protobuf(void **state)
{
    (void)state;
    char err[256];
    const char *schema = "{\"type\":\"object\"}";
    struct esmd_sr_schema *s =
        esmd_sr_schema_new(ESMD_SR_JSON, schema, strlen(schema), err, sizeof(err));
    assert_non_null(s);
    char *json = decode(s, "{\"a\": [1, 2]}", 13, err);
    assert_string_equal(json, "{\"a\": [1, 2]}");
    free(json);
    assert_null(decode(s, "{\"a\":", 5, err));
    assert_null(decode(s, "\"\xff\"", 3, err));
    esmd_sr_schema_free(s);
    assert_null(esmd_sr_schema_new(ESMD_SR_PROTOBUF, "syntax = \"proto3\";", 18, err, sizeof(err)));
    assert_non_null(strstr(err, "Protobuf"));
    assert_string_equal(esmd_sr_format_name(ESMD_SR_AVRO), "AVRO");
    assert_string_equal(esmd_sr_format_name(ESMD_SR_JSON), "JSON");
    assert_string_equal(esmd_sr_format_name(ESMD_SR_PROTOBUF), "PROTOBUF");
}

/* keySchemaMetadata / valueSchemaMetadata: written after the headers, counted exactly. */
static void test_encoder_metadata(void **state)
{
    (void)state;
    struct esmd_kafka_view v = {
        .topic = "t",
        .partition = 0,
        .offset = 7,
        .timestamp = 1,
        .tstype = RD_KAFKA_TIMESTAMP_CREATE_TIME,
        .key = "k",
        .key_len = 1,
        .value = "{}",
        .value_len = 2,
        .key_format = "JSON",
        .key_schema_id = 3,
        .value_format = "AVRO",
        .value_schema_id = 1234,
    };
    struct esmd_buf out = ESMD_BUF_INIT;
    esmd_kafka_record_write(&out, &v);
    assert_int_equal(out.len, esmd_kafka_record_size(&v));
    assert_string_equal(esmd_buf_cstr(&out),
                        "{\"topic\":\"t\",\"partition\":0,\"offset\":7,\"timestamp\":1,"
                        "\"timestampType\":\"CREATE_TIME\",\"key\":\"aw==\",\"value\":\"e30=\","
                        "\"headers\":[],\"keySchemaMetadata\":{\"dataFormat\":\"JSON\","
                        "\"schemaId\":\"3\"},\"valueSchemaMetadata\":{\"dataFormat\":\"AVRO\","
                        "\"schemaId\":\"1234\"}}");
    esmd_buf_reset(&out);
    v.key_format = NULL;
    esmd_kafka_record_write(&out, &v);
    assert_int_equal(out.len, esmd_kafka_record_size(&v));
    assert_null(strstr(esmd_buf_cstr(&out), "keySchemaMetadata"));
    esmd_buf_free(&out);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_frame),
        cmocka_unit_test(test_avro),
        cmocka_unit_test(test_json_and_protobuf),
        cmocka_unit_test(test_encoder_metadata),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
