/* libFuzzer target for JSON Schema records of a schema registry
 * (connectors/kafka/kafka_jsonschema.cc, valijson, through kafka_schema.c): the first byte picks
 * the mode.
 *  - even: the rest is a record validated against a fixed draft-7 schema using most keywords
 *    (nested objects and arrays, $ref to definitions and to the root, allOf / anyOf / oneOf /
 *    not, if / then / else, dependencies, patternProperties, propertyNames, pattern, format,
 *    const, enum, numeric and length bounds, uniqueItems, contains);
 *  - odd: the rest is the registry's schema text, then (after the first NUL byte, if any) a
 *    record; a schema that compiles validates that record and a few fixed ones.
 * Oracle: a record accepted is passed on unchanged, a refusal leaves the output as it was and says
 * why; a schema refused says why. No crash, no exception reaching C, no read past the data. */
#include "../../connectors/kafka/kafka_schema.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const char schema7[] =
    "{\"$schema\":\"http://json-schema.org/draft-07/schema#\",\"type\":\"object\","
    "\"definitions\":{\"line\":{\"type\":\"object\",\"properties\":{\"sku\":{\"type\":\"string\","
    "\"pattern\":\"^[A-Z]{2,4}-[0-9]+$\",\"maxLength\":20},\"qty\":{\"type\":\"integer\","
    "\"exclusiveMinimum\":0,\"multipleOf\":1}},\"required\":[\"sku\"],"
    "\"additionalProperties\":false},"
    "\"money\":{\"type\":\"number\",\"minimum\":0,\"maximum\":1e9,\"multipleOf\":0.01}},"
    "\"properties\":{\"id\":{\"type\":[\"integer\",\"string\"],\"minLength\":1},"
    "\"status\":{\"enum\":[\"NEW\",\"PAID\",null,1.5]},\"kind\":{\"const\":{\"a\":[1,2]}},"
    "\"lines\":{\"type\":\"array\",\"items\":{\"$ref\":\"#/definitions/line\"},\"minItems\":1,"
    "\"maxItems\":50,\"uniqueItems\":true,\"contains\":{\"required\":[\"qty\"]}},"
    "\"pair\":{\"type\":\"array\",\"items\":[{\"type\":\"string\"},{\"type\":\"boolean\"}],"
    "\"additionalItems\":false},"
    "\"total\":{\"$ref\":\"#/definitions/money\"},\"at\":{\"type\":\"string\",\"format\":"
    "\"date-time\"},\"day\":{\"format\":\"date\"},\"child\":{\"$ref\":\"#\"},"
    "\"tags\":{\"type\":\"object\",\"patternProperties\":{\"^x-\":{\"type\":\"string\"}},"
    "\"propertyNames\":{\"maxLength\":8},\"minProperties\":0,\"maxProperties\":4}},"
    "\"required\":[\"id\"],\"dependencies\":{\"total\":[\"lines\"],\"kind\":{\"required\":"
    "[\"status\"]}},\"allOf\":[{\"not\":{\"required\":[\"forbidden\"]}}],"
    "\"anyOf\":[{\"required\":[\"id\"]},{\"required\":[\"status\"]}],"
    "\"oneOf\":[{\"properties\":{\"id\":{\"type\":\"integer\"}}},{\"properties\":{\"id\":"
    "{\"type\":\"string\"}}}],"
    "\"if\":{\"properties\":{\"status\":{\"const\":\"PAID\"}}},\"then\":{\"required\":"
    "[\"total\"]},\"else\":{\"not\":{\"required\":[\"at\"]}}}";

static struct esmd_sr_schema *fixed;

static void check(const struct esmd_sr_schema *s, const unsigned char *body, size_t len)
{
    struct esmd_buf out = ESMD_BUF_INIT;
    const unsigned char *src;
    size_t src_len;
    char err[256];
    err[0] = '\0';
    esmd_buf_puts(&out, "x"); /* what was there before stays */
    if (esmd_sr_decode(s, body, len, &out, &src, &src_len, err, sizeof(err))) {
        if (out.len != len + 1 || (len && memcmp(out.data + 1, body, len) != 0) || src != body ||
            src_len != len)
            abort();
    } else if (out.len != 1 || !err[0]) {
        abort();
    }
    esmd_buf_free(&out);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char err[256];
    if (!fixed) {
        fixed = esmd_sr_schema_new(ESMD_SR_JSON, schema7, strlen(schema7), err, sizeof(err));
        if (!fixed)
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
        check(fixed, rest, len);
    } else {
        const unsigned char *nul = len ? memchr(rest, 0, len) : NULL;
        size_t slen = nul ? (size_t)(nul - rest) : len;
        err[0] = '\0';
        struct esmd_sr_schema *s =
            esmd_sr_schema_new(ESMD_SR_JSON, (const char *)rest, slen, err, sizeof(err));
        if (s) {
            static const char *const recs[] = {"{}", "[1,\"a\",{\"b\":null}]", "\"s\"", "-1.5e3",
                                               "{\"a\":{\"b\":[true,false]}}"};
            for (size_t i = 0; i < sizeof(recs) / sizeof(recs[0]); i++)
                check(s, (const unsigned char *)recs[i], strlen(recs[i]));
            if (nul)
                check(s, nul + 1, len - slen - 1);
            esmd_sr_schema_free(s);
        } else if (!err[0]) {
            abort();
        }
    }
    free(rest);
    return 0;
}
