/* The schema registry decoders (connectors/kafka/kafka_schema.c) on hand-made Avro and JSON
 * Schema records, and the schema metadata the Kafka encoder writes (exact sizes). The whole
 * path against a real registry and real serializers: tests/integration/test_schema_registry.py. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "testutil.h"

#include "esmd/http.h"

#include "../../connectors/kafka/kafka_private.h"
#include "../../connectors/kafka/kafka_jsonschema.h"
#include "../../connectors/kafka/kafka_schema.h"

#include <ev.h>
#include <malloc.h>
#include <stdio.h>
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
    assert_string_equal(esmd_sr_format_name(ESMD_SR_AVRO), "AVRO");
    assert_string_equal(esmd_sr_format_name(ESMD_SR_JSON), "JSON");
    assert_string_equal(esmd_sr_format_name(ESMD_SR_PROTOBUF), "PROTOBUF");
}

#define DEEP60_OPEN "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[["
#define DEEP60_CLOSE "]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]"

/* A JSON schema that cannot be used: NULL, err containing want. */
static void json_schema_refused(const char *text, const char *want)
{
    char err[256] = "";
    struct esmd_sr_schema *s =
        esmd_sr_schema_new(ESMD_SR_JSON, text, strlen(text), err, sizeof(err));
    if (s)
        fail_msg("schema accepted: %s", text);
    if (!strstr(err, want))
        fail_msg("schema %s: err \"%s\" lacks \"%s\"", text, err, want);
}

/* A record of schema s refused: err containing want. */
static void json_refused(const struct esmd_sr_schema *s, const char *rec, const char *want)
{
    char err[256] = "";
    char *json = decode(s, rec, strlen(rec), err);
    if (json)
        fail_msg("record accepted: %s", rec);
    if (!strstr(err, want))
        fail_msg("record %s: err \"%s\" lacks \"%s\"", rec, err, want);
}

/* JSON Schema validation (connectors/kafka/kafka_jsonschema.cc, valijson): drafts 4, 6, 7, the
 * failing value's JSON pointer and keyword, and the schemas refused. */
static void test_json_schema_validation(void **state)
{
    (void)state;
    char err[256];
    const char *order =
        "{\"$schema\":\"http://json-schema.org/draft-07/schema#\",\"type\":\"object\","
        "\"properties\":{\"id\":{\"type\":\"integer\",\"minimum\":0},"
        "\"status\":{\"enum\":[\"NEW\",\"PAID\"]},"
        "\"lines\":{\"type\":\"array\",\"items\":{\"$ref\":\"#/definitions/line\"}},"
        "\"sku\":{\"type\":\"string\",\"pattern\":\"^[A-Z]{3}-[0-9]+$\"},"
        "\"a/b\":{\"const\":1}},"
        "\"required\":[\"id\",\"status\"],"
        "\"definitions\":{\"line\":{\"type\":\"object\",\"properties\":{\"qty\":{\"type\":"
        "\"integer\",\"exclusiveMinimum\":0}},\"required\":[\"qty\"]}}}";
    struct esmd_sr_schema *s =
        esmd_sr_schema_new(ESMD_SR_JSON, order, strlen(order), err, sizeof(err));
    if (!s)
        fail_msg("schema: %s", err);
    const char *good =
        "{\"id\": 1, \"status\": \"PAID\", \"lines\": [{\"qty\": 2}], \"sku\": \"ABC-12\"}";
    char *json = decode(s, good, strlen(good), err);
    assert_non_null(json);
    assert_string_equal(json, good); /* passed on as written */
    free(json);
    json_refused(s, "{\"status\":\"NEW\"}", "at (the root)");
    json_refused(s, "{\"status\":\"NEW\"}", "required");
    json_refused(s, "{\"id\":\"1\",\"status\":\"NEW\"}", "at /id: ");
    json_refused(s, "{\"id\":-1,\"status\":\"NEW\"}", "at /id: ");
    json_refused(s, "{\"id\":1,\"status\":\"LOST\"}", "at /status: ");
    json_refused(s, "{\"id\":1,\"status\":\"NEW\",\"lines\":[{\"qty\":1},{\"qty\":0}]}",
                 "at /lines/1/qty: ");
    json_refused(s, "{\"id\":1,\"status\":\"NEW\",\"lines\":[{}]}", "at /lines/0: ");
    json_refused(s, "{\"id\":1,\"status\":\"NEW\",\"sku\":\"abc\"}", "'pattern'");
    json_refused(s, "{\"id\":1,\"status\":\"NEW\",\"a/b\":2}", "at /a~1b: ");
    json_refused(s, "{\"id\":1,", "not one JSON document");
    /* nesting past the bound */
    char deep[200];
    memset(deep, '[', 70);
    memset(deep + 70, ']', 70);
    deep[140] = '\0';
    json_refused(s, deep, "nests deeper than 64");
    /* strings a pattern would match, past the bound */
    size_t n = ESMD_JS_MAX_REGEX_INPUT + 40;
    char *longsku = malloc(n + 1);
    snprintf(longsku, n + 1, "{\"id\":1,\"status\":\"NEW\",\"sku\":\"ABC-%0*d\"}",
             (int)ESMD_JS_MAX_REGEX_INPUT, 1);
    json_refused(s, longsku, "longer than 4096 bytes");
    free(longsku);
    esmd_sr_schema_free(s);

    /* draft 4: a boolean exclusiveMinimum; draft 6 read as 7; no $schema is draft 7 */
    const char *d4 = "{\"$schema\":\"http://json-schema.org/draft-04/schema#\","
                     "\"minimum\":0,\"exclusiveMinimum\":true}";
    s = esmd_sr_schema_new(ESMD_SR_JSON, d4, strlen(d4), err, sizeof(err));
    assert_non_null(s);
    json_refused(s, "0", "at (the root)");
    json = decode(s, "0.5", 3, err);
    assert_non_null(json);
    free(json);
    esmd_sr_schema_free(s);
    const char *d6 = "{\"$schema\":\"https://json-schema.org/draft-06/schema\","
                     "\"propertyNames\":{\"maxLength\":2}}";
    s = esmd_sr_schema_new(ESMD_SR_JSON, d6, strlen(d6), err, sizeof(err));
    assert_non_null(s);
    json_refused(s, "{\"abc\":1}", "does not match its JSON schema");
    esmd_sr_schema_free(s);

    /* schemas refused, each naming why */
    json_schema_refused("{\"$schema\":\"https://json-schema.org/draft/2020-12/schema\"}",
                        "is not a draft esmd validates");
    json_schema_refused("{\"$schema\":\"http://json-schema.org/draft-03/schema#\"}",
                        "is not a draft esmd validates");
    json_schema_refused("{\"$schema\":3}", "$schema is not a string");
    json_schema_refused("{\"properties\":{\"a\":{\"$ref\":\"https://example.com/a.json\"}}}",
                        "cannot be used");
    json_schema_refused("{\"allOf\":[{\"$ref\":\"#\"}]}", "loop");
    json_schema_refused("{\"definitions\":{\"a\":{\"anyOf\":[{\"$ref\":\"#/definitions/b\"}]},"
                        "\"b\":{\"not\":{\"$ref\":\"#/definitions/a\"}}},"
                        "\"$ref\":\"#/definitions/a\"}",
                        "loop");
    json_schema_refused("{\"pattern\":\"([a-z\"}", "cannot be used");
    json_schema_refused("[1]", "not an object");
    json_schema_refused("{\"type\":", "not JSON");
    char nots[600] = "";
    for (int i = 0; i < 66; i++)
        strcat(nots, "{\"not\":");
    strcat(nots, "{}");
    for (int i = 0; i < 66; i++)
        strcat(nots, "}");
    json_schema_refused(nots, "nests deeper than 64");

    /* A chain of 70 subschemas applied to one value (not -> $ref -> not ...), its last 30
     * parsed (and memoized) before its first: refused as a whole. A longer one (50,000, 2.6 MB of
     * schema) overflowed the stack when validating. */
    struct esmd_buf chain = ESMD_BUF_INIT;
    esmd_buf_puts(&chain, "{\"allOf\":[{\"$ref\":\"#/definitions/d40\"},"
                          "{\"$ref\":\"#/definitions/d0\"}],\"definitions\":{");
    for (int i = 0; i < 70; i++)
        esmd_buf_printf(&chain, "%s\"d%d\":{\"not\":{\"$ref\":\"#/definitions/d%d\"}}",
                        i ? "," : "", i, i + 1);
    esmd_buf_puts(&chain, ",\"d70\":{}}}");
    json_schema_refused(esmd_buf_cstr(&chain), "a chain of more than 64");
    esmd_buf_free(&chain);
    /* $refs that, followed, nest 5,000 levels (each definition's items are the next): valijson's
     * parser recursed into each and overflowed the stack (at 4,000, 240 KB of schema). 60 of
     * them are fine. */
    for (int links = 60; links <= 5000; links += 4940) {
        struct esmd_buf refs = ESMD_BUF_INIT;
        esmd_buf_puts(&refs, "{\"$ref\":\"#/definitions/d0\",\"definitions\":{");
        for (int i = 0; i < links; i++)
            esmd_buf_printf(&refs, "\"d%d\":{\"items\":{\"$ref\":\"#/definitions/d%d\"}},", i,
                            i + 1);
        esmd_buf_printf(&refs, "\"d%d\":{\"type\":\"integer\"}}}", links);
        if (links == 60) {
            s = esmd_sr_schema_new(ESMD_SR_JSON, esmd_buf_cstr(&refs), refs.len, err, sizeof(err));
            if (!s)
                fail_msg("schema: %s", err);
            char *nested = decode(s, "[[[[1]]]]", 9, err);
            assert_non_null(nested);
            free(nested);
            char deep60[200];
            snprintf(deep60, sizeof(deep60), "%.60s\"a\"%.60s", DEEP60_OPEN, DEEP60_CLOSE);
            json_refused(s, deep60, "'type'");
            esmd_sr_schema_free(s);
        } else {
            json_schema_refused(esmd_buf_cstr(&refs), "followed through its $refs, it nests deeper "
                                                      "than 256 levels");
        }
        esmd_buf_free(&refs);
    }
    /* A pattern nesting groups 20,000 deep: std::regex's compiler overflowed the stack. */
    struct esmd_buf pat = ESMD_BUF_INIT;
    esmd_buf_puts(&pat, "{\"pattern\":\"");
    for (int i = 0; i < 10000; i++)
        esmd_buf_putc(&pat, '(');
    esmd_buf_putc(&pat, 'a');
    for (int i = 0; i < 10000; i++)
        esmd_buf_putc(&pat, ')');
    esmd_buf_puts(&pat, "\"}");
    json_schema_refused(esmd_buf_cstr(&pat), "nests groups deeper than 64");
    esmd_buf_free(&pat);
    /* groups nesting 64 deep, escaped and bracketed parentheses not counted: fine */
    const char *groups =
        "{\"pattern\":\"^(((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((((("
        "a))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))))\\\\(([(]\\\\))"
        "$\"}";
    s = esmd_sr_schema_new(ESMD_SR_JSON, groups, strlen(groups), err, sizeof(err));
    if (!s)
        fail_msg("schema: %s", err);
    esmd_sr_schema_free(s);

    /* a recursive schema that descends into the data is fine */
    const char *tree = "{\"type\":\"object\",\"properties\":{\"kids\":{\"type\":\"array\","
                       "\"items\":{\"$ref\":\"#\"}}},\"additionalProperties\":false}";
    s = esmd_sr_schema_new(ESMD_SR_JSON, tree, strlen(tree), err, sizeof(err));
    if (!s)
        fail_msg("schema: %s", err);
    const char *kids = "{\"kids\":[{\"kids\":[]},{}]}";
    json = decode(s, kids, strlen(kids), err);
    if (!json)
        fail_msg("%s", err);
    free(json);
    json_refused(s, "{\"kids\":[{\"kids\":[{\"x\":1}]}]}", "at /kids/0/kids/0: ");
    esmd_sr_schema_free(s);
}

/* Bytes malloc has handed out and not taken back (0 where a sanitizer's allocator answers). */
static size_t heap_in_use(void)
{
    return mallinfo2().uordblks;
}

/* Prepare, validate and free, many times, and validate one schema many times with ever new
 * records: the heap comes back to where it was (no leak, no cache growing per schema or per
 * record; the fuzz target's RSS growth is libFuzzer's and ASan's, docs/testing.md). */
static void test_json_schema_memory_returns(void **state)
{
    (void)state;
    const char *schema =
        "{\"type\":\"object\",\"properties\":{\"sku\":{\"type\":\"string\",\"pattern\":"
        "\"^[A-Z]{2,4}-[0-9]+$\"},\"at\":{\"format\":\"date-time\"},\"tags\":{"
        "\"patternProperties\":{\"^x-\":{\"type\":\"string\"}}},\"kids\":{\"type\":\"array\","
        "\"items\":{\"$ref\":\"#\"}}},\"required\":[\"sku\"],\"oneOf\":[{\"required\":[\"at\"]},"
        "{\"not\":{\"required\":[\"at\"]}}]}";
    char err[256], rec[200];
    size_t before = 0;
    for (int round = 0; round < 1000; round++) {
        if (round == 100)
            before = heap_in_use();
        struct esmd_sr_schema *s =
            esmd_sr_schema_new(ESMD_SR_JSON, schema, strlen(schema), err, sizeof(err));
        if (!s)
            fail_msg("schema: %s", err);
        snprintf(rec, sizeof(rec),
                 "{\"sku\":\"AB-%d\",\"at\":\"2026-12-07T10:00:%02dZ\",\"tags\":{\"x-%d\":\"v\"},"
                 "\"kids\":[{\"sku\":\"CD-1\"}]}",
                 round, round % 60, round);
        char *json = decode(s, rec, strlen(rec), err);
        if (!json)
            fail_msg("record %s: %s", rec, err);
        free(json);
        snprintf(rec, sizeof(rec), "{\"sku\":\"ab-%d\",\"kids\":[{\"sku\":%d}]}", round, round);
        assert_null(decode(s, rec, strlen(rec), err));
        esmd_sr_schema_free(s);
        json_schema_refused("{\"pattern\":\"([a-z\"}", "cannot be used");
    }
    size_t after = heap_in_use();
    if (after > before + 64 * 1024)
        fail_msg("prepare/validate/free: heap in use %zu -> %zu bytes", before, after);

    struct esmd_sr_schema *s =
        esmd_sr_schema_new(ESMD_SR_JSON, schema, strlen(schema), err, sizeof(err));
    assert_non_null(s);
    for (int i = 0; i < 10000; i++) {
        if (i == 100)
            before = heap_in_use();
        snprintf(rec, sizeof(rec), "{\"sku\":\"AB-%d\",\"tags\":{\"x-%d\":\"%d\"}}", i, i, i);
        char *json = decode(s, rec, strlen(rec), err);
        if (!json)
            fail_msg("record %s: %s", rec, err);
        free(json);
        snprintf(rec, sizeof(rec), "{\"sku\":\"AB-%d\",\"tags\":{\"x-%d\":%d}}", i, i, i);
        assert_null(decode(s, rec, strlen(rec), err));
    }
    after = heap_in_use();
    esmd_sr_schema_free(s);
    if (after > before + 64 * 1024)
        fail_msg("validating one schema: heap in use %zu -> %zu bytes", before, after);
}

#define PING_PROTO                                                                                 \
    "syntax = \"proto3\";\npackage t;\nimport \"google/protobuf/timestamp.proto\";\n"              \
    "message Ping { int64 id = 1; string text = 2; Kind kind = 3;\n"                               \
    "  google.protobuf.Timestamp at = 4; repeated Ping kids = 5;\n"                                \
    "  message Inner { string a_b = 1; } Inner inner = 6; }\n"                                     \
    "enum Kind { K0 = 0; K1 = 1; }\n"                                                              \
    "message Other { bool ok = 1; }\n"

/* Protobuf (connectors/kafka/kafka_protobuf.cc): .proto text with a well-known import, the
 * message indexes picking a nested type, the JSON mapping, and what is refused. */
static void test_protobuf(void **state)
{
    (void)state;
    char err[256];
    struct esmd_sr_schema *s =
        esmd_sr_schema_new(ESMD_SR_PROTOBUF, PING_PROTO, strlen(PING_PROTO), err, sizeof(err));
    if (!s)
        fail_msg("%s", err);
    /* [0] (one 0 byte): Ping {id 7, text "hé", kind K1, at 1s, kids [{id 1}], inner {a_b "x"}} */
    static const unsigned char ping[] = {0x00, 0x08, 0x07, 0x12, 0x03, 'h',  0xc3, 0xa9,
                                         0x18, 0x01, 0x22, 0x02, 0x08, 0x01, 0x2a, 0x02,
                                         0x08, 0x01, 0x32, 0x03, 0x0a, 0x01, 'x'};
    char *json = decode(s, ping, sizeof(ping), err);
    assert_non_null(json);
    assert_string_equal(json, "{\"id\":\"7\",\"text\":\"h\xc3\xa9\",\"kind\":\"K1\","
                              "\"at\":\"1970-01-01T00:00:01Z\",\"kids\":[{\"id\":\"1\"}],"
                              "\"inner\":{\"aB\":\"x\"}}");
    free(json);
    /* [0, 0]: count 2 (zigzag 4), 0, 0 -> t.Ping.Inner; [1] -> t.Other */
    static const unsigned char inner[] = {0x04, 0x00, 0x00, 0x0a, 0x01, 'y'};
    json = decode(s, inner, sizeof(inner), err);
    assert_string_equal(json, "{\"aB\":\"y\"}");
    free(json);
    static const unsigned char other[] = {0x02, 0x02, 0x08, 0x01};
    json = decode(s, other, sizeof(other), err);
    assert_string_equal(json, "{\"ok\":true}");
    free(json);
    /* an empty message: {} */
    json = decode(s, "\0", 1, err);
    assert_string_equal(json, "{}");
    free(json);
    /* refused: an index past the types, data cut short, a field the type lacks, bad UTF-8, a
     * group end at the top, indexes malformed */
    static const unsigned char bad_index[] = {0x02, 0x06, 0x08, 0x01};
    assert_null(decode(s, bad_index, sizeof(bad_index), err));
    assert_non_null(strstr(err, "message index 3"));
    assert_null(decode(s, ping, sizeof(ping) - 2, err));
    assert_non_null(strstr(err, "not a Protobuf t.Ping"));
    static const unsigned char unknown[] = {0x00, 0x78, 0x01};
    assert_null(decode(s, unknown, sizeof(unknown), err));
    assert_non_null(strstr(err, "field 15 of t.Ping is not in the schema"));
    /* the first field the schema lacks, in field order, wherever it is: in a nested message,
     * in a well-known type (at, field 4, before inner, field 6, though later on the wire) */
    static const unsigned char unknown_inner[] = {0x00, 0x32, 0x02, 0x78, 0x01};
    assert_null(decode(s, unknown_inner, sizeof(unknown_inner), err));
    assert_non_null(strstr(err, "field 15 of t.Ping.Inner is not in the schema"));
    static const unsigned char unknown_two[] = {0x00, 0x32, 0x02, 0x78, 0x01,
                                                0x22, 0x02, 0x78, 0x01};
    assert_null(decode(s, unknown_two, sizeof(unknown_two), err));
    assert_non_null(strstr(err, "field 15 of google.protobuf.Timestamp is not in the schema"));
    /* 64-bit integers at their extremes: id -1, then INT64_MIN */
    static const unsigned char minus_one[] = {0x00, 0x08, 0xff, 0xff, 0xff, 0xff,
                                              0xff, 0xff, 0xff, 0xff, 0xff, 0x01};
    json = decode(s, minus_one, sizeof(minus_one), err);
    assert_string_equal(json, "{\"id\":\"-1\"}");
    free(json);
    static const unsigned char int64_min[] = {0x00, 0x08, 0x80, 0x80, 0x80, 0x80,
                                              0x80, 0x80, 0x80, 0x80, 0x80, 0x01};
    json = decode(s, int64_min, sizeof(int64_min), err);
    assert_string_equal(json, "{\"id\":\"-9223372036854775808\"}");
    free(json);
    static const unsigned char utf8[] = {0x00, 0x12, 0x01, 0xff};
    assert_null(decode(s, utf8, sizeof(utf8), err));
    static const unsigned char group_end[] = {0x00, 0x0c};
    assert_null(decode(s, group_end, sizeof(group_end), err));
    static const unsigned char cut_index[] = {0x04, 0x00};
    assert_null(decode(s, cut_index, sizeof(cut_index), err));
    assert_non_null(strstr(err, "message indexes"));
    /* nesting past the limit: kids within kids, 70 deep */
    unsigned char deep[1 + 2 * 70];
    deep[0] = 0;
    for (int i = 0; i < 70; i++) {
        deep[1 + 2 * i] = 0x2a;
        deep[2 + 2 * i] = (unsigned char)(2 * (69 - i));
    }
    assert_null(decode(s, deep, sizeof(deep), err));
    assert_non_null(strstr(err, "nesting deeper"));
    esmd_sr_schema_free(s);

    /* proto2: a required field two levels down is still checked (r.Outer has none itself) */
    const char *req = "syntax = \"proto2\";\npackage r;\n"
                      "message Outer { optional Req r = 1; }\n"
                      "message Req { required int32 a = 1; optional uint64 u = 2; }\n";
    s = esmd_sr_schema_new(ESMD_SR_PROTOBUF, req, strlen(req), err, sizeof(err));
    if (!s)
        fail_msg("%s", err);
    static const unsigned char missing[] = {0x00, 0x0a, 0x00};
    assert_null(decode(s, missing, sizeof(missing), err));
    assert_non_null(strstr(err, "misses required fields"));
    /* a 5, u UINT64_MAX */
    static const unsigned char full[] = {0x00, 0x0a, 0x0d, 0x08, 0x05, 0x10, 0xff, 0xff,
                                         0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01};
    json = decode(s, full, sizeof(full), err);
    if (!json)
        fail_msg("%s", err);
    assert_string_equal(json, "{\"r\":{\"a\":5,\"u\":\"18446744073709551615\"}}");
    free(json);
    esmd_sr_schema_free(s);

    /* a map, and a field its entry type lacks */
    const char *map =
        "syntax = \"proto3\";\npackage m;\nmessage M { map<string, int32> tags = 1; }\n";
    s = esmd_sr_schema_new(ESMD_SR_PROTOBUF, map, strlen(map), err, sizeof(err));
    if (!s)
        fail_msg("%s", err);
    static const unsigned char tags[] = {0x00, 0x0a, 0x05, 0x0a, 0x01, 'k', 0x10, 0x03};
    json = decode(s, tags, sizeof(tags), err);
    assert_string_equal(json, "{\"tags\":{\"k\":3}}");
    free(json);
    static const unsigned char entry_unknown[] = {0x00, 0x0a, 0x05, 0x0a, 0x01, 'k', 0x78, 0x01};
    assert_null(decode(s, entry_unknown, sizeof(entry_unknown), err));
    assert_non_null(strstr(err, "field 15 of m.M.TagsEntry is not in the schema"));
    esmd_sr_schema_free(s);

    /* the base64 of a serialized FileDescriptorProto: {name: "p.proto", message_type: [{name:
     * "P", field: [{name: "n", number: 1, label: OPTIONAL, type: INT32}]}], syntax: "proto3"} */
    static const unsigned char fdp[] = {0x0a, 0x07, 0x70, 0x2e, 0x70, 0x72, 0x6f, 0x74, 0x6f,
                                        0x22, 0x0e, 0x0a, 0x01, 0x50, 0x12, 0x09, 0x0a, 0x01,
                                        0x6e, 0x18, 0x01, 0x20, 0x01, 0x28, 0x05, 0x62, 0x06,
                                        0x70, 0x72, 0x6f, 0x74, 0x6f, 0x33};
    struct esmd_buf b64 = ESMD_BUF_INIT;
    esmd_buf_put_base64(&b64, fdp, sizeof(fdp));
    s = esmd_sr_schema_new(ESMD_SR_PROTOBUF, b64.data, b64.len, err, sizeof(err));
    esmd_buf_free(&b64);
    if (!s)
        fail_msg("%s", err);
    static const unsigned char p[] = {0x00, 0x08, 0x96, 0x01};
    json = decode(s, p, sizeof(p), err);
    assert_string_equal(json, "{\"n\":150}");
    free(json);
    esmd_sr_schema_free(s);

    /* the JSON mapping's details: bytes as base64, maps with string, int64 and bool keys, NaN,
     * float, escapes, an enum value the enum lacks as its number, sint32, a negative double */
    static const char kinds[] =
        "syntax = \"proto3\"; message M { bytes b = 1; map<string, int64> m = 2; double d = 3;"
        " float f = 4; string s = 5; E e = 6; map<bool, string> mb = 7; sint32 n = 8;"
        " double neg = 9; } enum E { Z = 0; }";
    s = esmd_sr_schema_new(ESMD_SR_PROTOBUF, kinds, strlen(kinds), err, sizeof(err));
    if (!s)
        fail_msg("%s", err);
    static const unsigned char kv[] = {
        0x00, 0x0a, 0x03, 0xff, 0x00, 0x61, 0x12, 0x05, 0x0a, 0x01, 0x6b, 0x10, 0x05,
        0x19, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0xf8, 0x7f, 0x25, 0x00, 0x00, 0xc0,
        0x3f, 0x2a, 0x03, 0x61, 0x22, 0x0a, 0x30, 0x07, 0x3a, 0x05, 0x08, 0x01, 0x12,
        0x01, 0x78, 0x40, 0x05, 0x49, 0x9a, 0x99, 0x99, 0x99, 0x99, 0x99, 0xa9, 0xbf};
    json = decode(s, kv, sizeof(kv), err);
    if (!json)
        fail_msg("%s", err);
    assert_string_equal(json, "{\"b\":\"/wBh\",\"m\":{\"k\":\"5\"},\"d\":\"NaN\",\"f\":1.5,"
                              "\"s\":\"a\\\"\\u000a\",\"e\":7,\"mb\":{\"true\":\"x\"},\"n\":-3,"
                              "\"neg\":-0.05}");
    free(json);
    esmd_sr_schema_free(s);

    /* a proto2 string is not checked on the wire: one that is not UTF-8 cannot be JSON */
    static const char p2[] = "syntax = \"proto2\"; message Q { optional string s = 1; }";
    s = esmd_sr_schema_new(ESMD_SR_PROTOBUF, p2, strlen(p2), err, sizeof(err));
    assert_non_null(s);
    static const unsigned char latin1[] = {0x00, 0x0a, 0x01, 0xe9};
    assert_null(decode(s, latin1, sizeof(latin1), err));
    assert_non_null(strstr(err, "not UTF-8"));
    esmd_sr_schema_free(s);

    /* schemas that cannot be used: syntax errors (with the line), an import not given, no
     * message, an undefined type */
    const char *bad[] = {"syntax = \"proto3\";\nmessage A { int32 x = ; }",
                         "syntax = \"proto3\"; import \"other.proto\"; message A { B b = 1; }",
                         "syntax = \"proto3\";",
                         "syntax = \"proto3\"; message A { Nope n = 1; }",
                         "",
                         "QUJD"};
    const char *want[] = {"line 2:", "other.proto",     "no message type",
                          "Nope",    "no message type", "cannot be used"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        err[0] = '\0';
        assert_null(esmd_sr_schema_new(ESMD_SR_PROTOBUF, bad[i], strlen(bad[i]), err, sizeof(err)));
        if (!strstr(err, want[i]))
            fail_msg("schema %zu: %s", i, err);
    }
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

/* ---- the registry client: ids the registry does not know ---- */

#define REG_IDS (1024 + 64) /* SR_MAX_FAILED and a round more */

struct reg {
    int asked[REG_IDS + 1]; /* GET /schemas/ids/{id} per id */
    int changed;            /* hooks.changed calls */
    int answered;           /* requests answered */
    int down;               /* hooks.down calls with a reason */
};

#define REG_BIG 5000 /* answered with a schema of 9 MB */

static void reg_answer(void *ud, struct esmd_http_req *req)
{
    struct reg *r = ud;
    r->answered++;
    int id = atoi(strrchr(esmd_http_req_path(req), '/') + 1);
    if (id == REG_BIG) {
        size_t n = 9u * 1024 * 1024;
        char *big = malloc(n);
        memset(big, 'x', n);
        memcpy(big, "{\"schema\":\"", 11);
        memcpy(big + n - 2, "\"}", 2);
        esmd_http_respond(req, 200, "application/vnd.schemaregistry.v1+json", big, n);
        free(big);
        return;
    }
    if (id > 0 && id <= REG_IDS)
        r->asked[id]++;
    static const char body[] = "{\"error_code\":40403,\"message\":\"Schema not found\"}";
    esmd_http_respond(req, 404, "application/vnd.schemaregistry.v1+json", body, sizeof(body) - 1);
}

static void reg_changed(void *ud)
{
    ((struct reg *)ud)->changed++;
}

static void reg_down(void *ud, const char *why)
{
    if (why)
        ((struct reg *)ud)->down++;
}

/* esmd's HTTP server as a registry (reg_answer) on a loop of its own, and a client of it, the
 * registry's URL ending in `prefix` ("" or a path such as a proxy's). */
struct reg_env {
    struct ev_loop *loop;
    struct esmd_http *http;
    struct reg r;
};

static struct esmd_sr *reg_env_start_at(struct reg_env *env, const char *prefix)
{
    memset(env, 0, sizeof(*env));
    env->loop = ev_loop_new(EVFLAG_AUTO);
    char err[256] = "";
    env->http = esmd_http_start(env->loop, "127.0.0.1:0", NULL, err, sizeof(err));
    if (!env->http)
        fail_msg("esmd_http_start: %s", err);
    char *route = esmd_xmalloc(strlen(prefix) + 32);
    sprintf(route, "%s/schemas/ids/*", prefix);
    assert_int_equal(esmd_http_route(env->http, "GET", route, reg_answer, &env->r), 0);
    free(route);
    char *url = esmd_xmalloc(strlen(prefix) + 64);
    sprintf(url, "http://127.0.0.1:%d%s", esmd_http_port(env->http), prefix);
    struct esmd_schema_registry_cfg cfg = {.set = true, .url = url};
    struct esmd_sr_hooks hooks = {.changed = reg_changed, .down = reg_down, .ud = &env->r};
    struct esmd_sr *sr = esmd_sr_new(&cfg, env->loop, NULL, &hooks, err, sizeof(err));
    if (!sr)
        fail_msg("esmd_sr_new: %s", err);
    free(url);
    return sr;
}

static struct esmd_sr *reg_env_start(struct reg_env *env)
{
    return reg_env_start_at(env, "");
}

/* After esmd_sr_free. */
static void reg_env_stop(struct reg_env *env)
{
    esmd_http_stop(env->http);
    ev_loop_destroy(env->loop);
}

static enum esmd_sr_state sr_state(struct esmd_sr *sr, int32_t id)
{
    const struct esmd_sr_schema *s;
    const char *why;
    return esmd_sr_get(sr, id, &s, &why);
}

/* Records naming ever new unknown ids (data that starts with a 0 byte but was not written by a
 * registry's serializer) do not grow the cache without bound: past SR_MAX_FAILED ids answered
 * 40403 the oldest is forgotten and asked again when named again; the newest stay known. */
static void test_unknown_ids_are_kept_bounded(void **state)
{
    (void)state;
    struct reg_env env;
    struct esmd_sr *sr = reg_env_start(&env);
    struct ev_loop *loop = env.loop;
    struct reg *r = &env.r;
    for (int first = 1; first <= REG_IDS; first += 64) {
        int n = first + 64 > REG_IDS + 1 ? REG_IDS + 1 - first : 64;
        for (int id = first; id < first + n; id++)
            assert_int_equal(sr_state(sr, id), ESMD_SR_PENDING);
        esmd_test_run_until_count(loop, &r->changed, first - 1 + n, 30);
        for (int id = first; id < first + n; id++)
            assert_int_equal(sr_state(sr, id), ESMD_SR_MISSING);
    }
    for (int id = 1; id <= REG_IDS; id++)
        assert_int_equal(r->asked[id], 1);
    /* the newest are still known; the oldest were forgotten: asked again */
    assert_int_equal(sr_state(sr, REG_IDS), ESMD_SR_MISSING);
    assert_int_equal(sr_state(sr, REG_IDS - 1023), ESMD_SR_MISSING);
    assert_int_equal(sr_state(sr, 1), ESMD_SR_PENDING);
    esmd_test_run_until_count(loop, &r->changed, REG_IDS + 1, 30);
    assert_int_equal(sr_state(sr, 1), ESMD_SR_MISSING);
    assert_int_equal(r->asked[1], 2);
    esmd_sr_free(sr);
    reg_env_stop(&env);
}

/* An answer larger than the client reads (8 MB) makes that id unusable (its records fail as
 * DESERIALIZATION_ERROR) rather than the registry down: it would be the same answer each time,
 * and other ids would wait behind the retries. */
static void test_oversized_answer_is_the_ids_failure(void **state)
{
    (void)state;
    struct reg_env env;
    struct esmd_sr *sr = reg_env_start(&env);
    struct ev_loop *loop = env.loop;
    struct reg *r = &env.r;
    assert_int_equal(sr_state(sr, REG_BIG), ESMD_SR_PENDING);
    esmd_test_run_until_count(loop, &r->changed, 1, 20);
    const struct esmd_sr_schema *s;
    const char *why;
    assert_int_equal(esmd_sr_get(sr, REG_BIG, &s, &why), ESMD_SR_BAD);
    assert_non_null(strstr(why, "larger than 8 MB"));
    assert_int_equal(r->down, 0);
    /* the registry is not down: another id is asked at once */
    assert_int_equal(sr_state(sr, 7), ESMD_SR_PENDING);
    esmd_test_run_until_count(loop, &r->changed, 2, 20);
    assert_int_equal(sr_state(sr, 7), ESMD_SR_MISSING);
    esmd_sr_free(sr);
    reg_env_stop(&env);
}

/* A registry URL with a long path (behind a proxy) is used whole: the request URL was built in a
 * 1,400-byte buffer, and a longer one was cut, asking the wrong path. */
static void test_long_registry_url(void **state)
{
    (void)state;
    char prefix[2001];
    prefix[0] = '/';
    memset(prefix + 1, 'p', sizeof(prefix) - 2);
    prefix[sizeof(prefix) - 1] = '\0';
    struct reg_env env;
    struct esmd_sr *sr = reg_env_start_at(&env, prefix);
    assert_int_equal(sr_state(sr, 9), ESMD_SR_PENDING);
    esmd_test_run_until_count(env.loop, &env.r.changed, 1, 20);
    assert_int_equal(env.r.answered, 1);
    assert_int_equal(env.r.asked[9], 1);
    assert_int_equal(sr_state(sr, 9), ESMD_SR_MISSING);
    esmd_sr_free(sr);
    reg_env_stop(&env);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_frame),
        cmocka_unit_test(test_avro),
        cmocka_unit_test(test_json_and_protobuf),
        cmocka_unit_test(test_json_schema_validation),
        cmocka_unit_test(test_json_schema_memory_returns),
        cmocka_unit_test(test_protobuf),
        cmocka_unit_test(test_encoder_metadata),
        cmocka_unit_test(test_unknown_ids_are_kept_bounded),
        cmocka_unit_test(test_oversized_answer_is_the_ids_failure),
        cmocka_unit_test(test_long_registry_url),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
