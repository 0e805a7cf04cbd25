/* libFuzzer target for the schema registry decoders of untrusted record bytes
 * (connectors/kafka/kafka_schema.c): Confluent's framing, the Protobuf message indexes, the Avro
 * walker and the JSON check. The first byte picks one of the schemas below (every Avro type,
 * named types and a recursive one among them); the rest is a record as it comes from Kafka.
 * Oracle: whatever the decoder accepts is one valid JSON document. No crash, no read past the
 * data, no allocation the data's claimed lengths could blow up. */
#include "../../connectors/kafka/kafka_schema.h"

#include "esmd/json.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const char *const schemas[] = {
    "{\"type\":\"record\",\"name\":\"Order\",\"fields\":["
    "{\"name\":\"id\",\"type\":\"long\"},{\"name\":\"n\",\"type\":\"int\"},"
    "{\"name\":\"f\",\"type\":\"float\"},{\"name\":\"d\",\"type\":\"double\"},"
    "{\"name\":\"ok\",\"type\":\"boolean\"},{\"name\":\"s\",\"type\":\"string\"},"
    "{\"name\":\"b\",\"type\":\"bytes\"},"
    "{\"name\":\"fx\",\"type\":{\"type\":\"fixed\",\"name\":\"F4\",\"size\":4}},"
    "{\"name\":\"e\",\"type\":{\"type\":\"enum\",\"name\":\"E\",\"symbols\":[\"A\",\"B\"]}},"
    "{\"name\":\"tags\",\"type\":{\"type\":\"array\",\"items\":\"string\"}},"
    "{\"name\":\"m\",\"type\":{\"type\":\"map\",\"values\":[\"null\",\"long\"]}},"
    "{\"name\":\"o\",\"type\":[\"null\",\"F4\",\"E\"]}]}",
    "{\"type\":\"record\",\"name\":\"Node\",\"fields\":[{\"name\":\"v\",\"type\":\"int\"},"
    "{\"name\":\"next\",\"type\":[\"null\",\"Node\"]}]}",
    "{\"type\":\"array\",\"items\":\"null\"}",
    "{\"type\":\"map\",\"values\":{\"type\":\"array\",\"items\":\"double\"}}",
    "\"string\"",
};

static struct esmd_sr_schema *parsed[sizeof(schemas) / sizeof(schemas[0]) + 1];

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    size_t nschemas = sizeof(schemas) / sizeof(schemas[0]);
    if (!parsed[0]) {
        char err[256];
        for (size_t i = 0; i < nschemas; i++) {
            parsed[i] =
                esmd_sr_schema_new(ESMD_SR_AVRO, schemas[i], strlen(schemas[i]), err, sizeof(err));
            if (!parsed[i])
                abort();
        }
        parsed[nschemas] = esmd_sr_schema_new(ESMD_SR_JSON, "{}", 2, err, sizeof(err));
        if (!parsed[nschemas])
            abort();
    }
    if (size < 1)
        return 0;
    struct esmd_sr_schema *s = parsed[data[0] % (nschemas + 1)];
    /* a copy of exactly the record's bytes, so reading past the end is caught */
    size_t len = size - 1;
    unsigned char *rec = malloc(len ? len : 1);
    if (len)
        memcpy(rec, data + 1, len);
    int32_t id;
    const unsigned char *body;
    size_t body_len;
    if (esmd_sr_frame(rec, len, &id, &body, &body_len)) {
        int64_t count = 0;
        size_t skip = esmd_sr_protobuf_indexes(body, body_len, &count);
        if (skip > body_len || count < 0)
            abort();
        struct esmd_buf out = ESMD_BUF_INIT;
        const unsigned char *src;
        size_t src_len;
        char err[256];
        esmd_buf_puts(&out, "x"); /* what was there before stays */
        if (esmd_sr_decode(s, body, body_len, &out, &src, &src_len, err, sizeof(err))) {
            if (!esmd_json_valid(out.data + 1, out.len - 1) || src != body || src_len != body_len)
                abort();
        } else if (out.len != 1 || !err[0]) {
            abort();
        }
        esmd_buf_free(&out);
    }
    free(rec);
    return 0;
}
