/* The self-managed Kafka event (docs/lambda.md#kafka-event), written straight into a buffer.
 *
 * Every writer here has a size twin; both are built from the same string literals so the
 * sizes the core batches by are the bytes the encoder writes. */
#include "kafka_private.h"

#include "esmd/json.h"

#include <cJSON.h>

#include <string.h>

#define LIT(s) (sizeof(s) - 1)

#define ENV_HEAD "{\"eventSource\":\"SelfManagedKafka\",\"bootstrapServers\":"
#define ENV_RECORDS ",\"records\":{"
#define ENV_TAIL "}}"

#define REC_TOPIC "{\"topic\":"
#define REC_PARTITION ",\"partition\":"
#define REC_OFFSET ",\"offset\":"
#define REC_TIMESTAMP ",\"timestamp\":"
#define REC_TSTYPE ",\"timestampType\":"
#define REC_KEY ",\"key\":"
#define REC_VALUE ",\"value\":"
#define REC_HEADERS ",\"headers\":["
#define REC_TAIL "]}"
#define REC_KEY_META ",\"keySchemaMetadata\":{\"dataFormat\":\""
#define REC_VALUE_META ",\"valueSchemaMetadata\":{\"dataFormat\":\""
#define REC_META_ID "\",\"schemaId\":\""
#define REC_META_TAIL "\"}"

#define JSON_NULL "null"

static const char *tstype_name(rd_kafka_timestamp_type_t t)
{
    switch (t) {
    case RD_KAFKA_TIMESTAMP_CREATE_TIME:
        return "\"CREATE_TIME\"";
    case RD_KAFKA_TIMESTAMP_LOG_APPEND_TIME:
        return "\"LOG_APPEND_TIME\"";
    default:
        return "\"NO_TIMESTAMP_TYPE\""; /* Java's TimestampType.NO_TIMESTAMP_TYPE */
    }
}

/* Decimal length of the byte read as a Java (signed) byte: "-128".."127". */
static size_t signed_byte_len(unsigned char b)
{
    int v = (int)(signed char)b;
    size_t n = v < 0 ? 1 : 0;
    int a = v < 0 ? -v : v;
    return n + (a >= 100 ? 3 : a >= 10 ? 2 : 1);
}

static void put_signed_byte(struct esmd_buf *out, unsigned char b)
{
    char tmp[4];
    size_t n = 0;
    int v = (int)(signed char)b;
    if (v < 0) {
        tmp[n++] = '-';
        v = -v;
    }
    if (v >= 100)
        tmp[n++] = (char)('0' + v / 100);
    if (v >= 10)
        tmp[n++] = (char)('0' + v / 10 % 10);
    tmp[n++] = (char)('0' + v % 10);
    esmd_buf_append(out, tmp, n);
}

static size_t bytes_b64_len(const void *p, size_t n)
{
    return p ? esmd_base64_len(n) + 2 : LIT(JSON_NULL);
}

static void put_bytes_b64(struct esmd_buf *out, const void *p, size_t n)
{
    if (!p) {
        esmd_buf_append(out, JSON_NULL, LIT(JSON_NULL));
        return;
    }
    esmd_buf_putc(out, '"');
    esmd_buf_put_base64(out, p, n);
    esmd_buf_putc(out, '"');
}

/* One header object: {"name":[1,-2]} or {"name":null}. */
static size_t header_len(const char *name, const void *value, size_t size)
{
    size_t n = 1 + esmd_json_string_len(name, strlen(name)) + 1 + 1; /* { name : } */
    if (!value)
        return n + LIT(JSON_NULL);
    n += 2 + (size > 0 ? size - 1 : 0); /* [ ] and commas */
    const unsigned char *b = value;
    for (size_t i = 0; i < size; i++)
        n += signed_byte_len(b[i]);
    return n;
}

static void put_header(struct esmd_buf *out, const char *name, const void *value, size_t size)
{
    esmd_buf_putc(out, '{');
    esmd_buf_put_json_string(out, name, strlen(name));
    esmd_buf_putc(out, ':');
    if (!value) {
        esmd_buf_append(out, JSON_NULL, LIT(JSON_NULL));
    } else {
        const unsigned char *b = value;
        esmd_buf_putc(out, '[');
        for (size_t i = 0; i < size; i++) {
            if (i)
                esmd_buf_putc(out, ',');
            put_signed_byte(out, b[i]);
        }
        esmd_buf_putc(out, ']');
    }
    esmd_buf_putc(out, '}');
}

size_t esmd_kafka_envelope_size(const char *servers)
{
    return LIT(ENV_HEAD) + esmd_json_string_len(servers, strlen(servers)) + LIT(ENV_RECORDS) +
           LIT(ENV_TAIL);
}

size_t esmd_kafka_group_overhead(const char *key)
{
    return esmd_json_string_len(key, strlen(key)) + LIT(":[]");
}

static size_t meta_len(const char *head, const char *format, int32_t id)
{
    if (!format)
        return 0;
    return strlen(head) + strlen(format) + LIT(REC_META_ID) + esmd_i64_len(id) + LIT(REC_META_TAIL);
}

static void put_meta(struct esmd_buf *out, const char *head, const char *format, int32_t id)
{
    if (!format)
        return;
    esmd_buf_puts(out, head);
    esmd_buf_puts(out, format);
    esmd_buf_append(out, REC_META_ID, LIT(REC_META_ID));
    esmd_buf_put_i64(out, id);
    esmd_buf_append(out, REC_META_TAIL, LIT(REC_META_TAIL));
}

size_t esmd_kafka_record_size(const struct esmd_kafka_view *v)
{
    size_t n = LIT(REC_TOPIC) + esmd_json_string_len(v->topic, strlen(v->topic));
    n += LIT(REC_PARTITION) + esmd_i64_len(v->partition);
    n += LIT(REC_OFFSET) + esmd_i64_len(v->offset);
    n += LIT(REC_TIMESTAMP) + esmd_i64_len(v->timestamp);
    n += LIT(REC_TSTYPE) + strlen(tstype_name(v->tstype));
    if (v->key) /* a null key is left out, as Lambda does */
        n += LIT(REC_KEY) + bytes_b64_len(v->key, v->key_len);
    n += LIT(REC_VALUE) + bytes_b64_len(v->value, v->value_len);
    n += LIT(REC_HEADERS) + LIT(REC_TAIL);
    n += meta_len(REC_KEY_META, v->key_format, v->key_schema_id);
    n += meta_len(REC_VALUE_META, v->value_format, v->value_schema_id);
    if (v->headers) {
        const char *name;
        const void *value;
        size_t size;
        for (size_t i = 0; rd_kafka_header_get_all(v->headers, i, &name, &value, &size) == 0; i++)
            n += (i ? 1 : 0) + header_len(name, value, size);
    }
    return n;
}

void esmd_kafka_record_write(struct esmd_buf *out, const struct esmd_kafka_view *v)
{
    esmd_buf_append(out, REC_TOPIC, LIT(REC_TOPIC));
    esmd_buf_put_json_string(out, v->topic, strlen(v->topic));
    esmd_buf_append(out, REC_PARTITION, LIT(REC_PARTITION));
    esmd_buf_put_i64(out, v->partition);
    esmd_buf_append(out, REC_OFFSET, LIT(REC_OFFSET));
    esmd_buf_put_i64(out, v->offset);
    esmd_buf_append(out, REC_TIMESTAMP, LIT(REC_TIMESTAMP));
    esmd_buf_put_i64(out, v->timestamp);
    esmd_buf_append(out, REC_TSTYPE, LIT(REC_TSTYPE));
    esmd_buf_puts(out, tstype_name(v->tstype));
    if (v->key) {
        esmd_buf_append(out, REC_KEY, LIT(REC_KEY));
        put_bytes_b64(out, v->key, v->key_len);
    }
    esmd_buf_append(out, REC_VALUE, LIT(REC_VALUE));
    put_bytes_b64(out, v->value, v->value_len);
    esmd_buf_append(out, REC_HEADERS, LIT(REC_HEADERS));
    if (v->headers) {
        const char *name;
        const void *value;
        size_t size;
        for (size_t i = 0; rd_kafka_header_get_all(v->headers, i, &name, &value, &size) == 0; i++) {
            if (i)
                esmd_buf_putc(out, ',');
            put_header(out, name, value, size);
        }
    }
    esmd_buf_putc(out, ']');
    put_meta(out, REC_KEY_META, v->key_format, v->key_schema_id);
    put_meta(out, REC_VALUE_META, v->value_format, v->value_schema_id);
    esmd_buf_putc(out, '}');
}

void esmd_kafka_encode_batch(const char *servers, const struct esmd_batch *batch,
                             esmd_kafka_view_fn view_of, struct esmd_buf *out)
{
    esmd_buf_reserve(out, esmd_batch_bytes(batch));
    esmd_buf_append(out, ENV_HEAD, LIT(ENV_HEAD));
    esmd_buf_put_json_string(out, servers, strlen(servers));
    esmd_buf_append(out, ENV_RECORDS, LIT(ENV_RECORDS));
    for (size_t i = 0; i < batch->ngroups; i++) {
        const struct esmd_batch_group *g = &batch->groups[i];
        if (i)
            esmd_buf_putc(out, ',');
        const char *key = esmd_shard_key(g->shard);
        esmd_buf_put_json_string(out, key, strlen(key));
        esmd_buf_append(out, ":[", 2);
        const struct esmd_record *rec = g->head;
        for (size_t j = 0; j < g->n && rec; j++, rec = rec->next) {
            struct esmd_kafka_view v;
            if (j)
                esmd_buf_putc(out, ',');
            view_of(rec, &v);
            esmd_kafka_record_write(out, &v);
        }
        esmd_buf_putc(out, ']');
    }
    esmd_buf_append(out, ENV_TAIL, LIT(ENV_TAIL));
}

/* ---- what filters see ---- */

/* Appends bytes as JSON when they are JSON, as a string when UTF-8, as base64 text otherwise. */
static enum esmd_filter_data put_filter_bytes(struct esmd_buf *out, const void *p, size_t n,
                                              bool base64_fallback, bool known_json)
{
    if (!p) {
        esmd_buf_puts(out, JSON_NULL); /* a JSON null: `[null]` and `exists` patterns see it */
        return ESMD_FILTER_DATA_TEXT;
    }
    if (known_json || esmd_json_valid(p, n)) {
        esmd_buf_append(out, p, n);
        const char *c = p;
        while (*c == ' ' || *c == '\t' || *c == '\n' || *c == '\r')
            c++;
        return *c == '{' || *c == '[' ? ESMD_FILTER_DATA_JSON : ESMD_FILTER_DATA_TEXT;
    }
    if (esmd_utf8_valid(p, n)) {
        esmd_buf_put_json_string(out, p, n);
        return ESMD_FILTER_DATA_TEXT;
    }
    if (base64_fallback) {
        esmd_buf_putc(out, '"');
        esmd_buf_put_base64(out, p, n);
        esmd_buf_putc(out, '"');
    }
    return ESMD_FILTER_DATA_NONE;
}

enum esmd_filter_data esmd_kafka_filter_doc(const struct esmd_kafka_view *v, struct esmd_buf *out)
{
    esmd_buf_puts(out, REC_TOPIC);
    esmd_buf_put_json_string(out, v->topic, strlen(v->topic));
    esmd_buf_puts(out, REC_PARTITION);
    esmd_buf_put_i64(out, v->partition);
    esmd_buf_puts(out, REC_OFFSET);
    esmd_buf_put_i64(out, v->offset);
    if (v->timestamp >= 0) {
        esmd_buf_puts(out, REC_TIMESTAMP);
        esmd_buf_put_i64(out, v->timestamp);
    }
    esmd_buf_puts(out, REC_KEY);
    put_filter_bytes(out, v->key, v->key_len, true, v->key_is_json);
    /* a non-UTF-8 value is left out: the mark is taken back when nothing was written */
    size_t mark = out->len;
    esmd_buf_puts(out, REC_VALUE);
    size_t before = out->len;
    enum esmd_filter_data data =
        put_filter_bytes(out, v->value, v->value_len, false, v->value_is_json);
    if (out->len == before)
        out->len = mark;
    esmd_buf_puts(out, REC_HEADERS);
    size_t idx = 0;
    const char *name;
    const void *val;
    size_t size;
    while (v->headers && rd_kafka_header_get_all(v->headers, idx, &name, &val, &size) ==
                             RD_KAFKA_RESP_ERR_NO_ERROR) {
        esmd_buf_puts(out, idx ? ",{" : "{");
        esmd_buf_put_json_string(out, name, strlen(name));
        esmd_buf_putc(out, ':');
        if (!val)
            esmd_buf_puts(out, JSON_NULL);
        else if (esmd_utf8_valid(val, size))
            esmd_buf_put_json_string(out, val, size);
        else {
            esmd_buf_putc(out, '"');
            esmd_buf_put_base64(out, val, size);
            esmd_buf_putc(out, '"');
        }
        esmd_buf_putc(out, '}');
        idx++;
    }
    esmd_buf_puts(out, REC_TAIL);
    return data;
}

/* ---- failure handling ---- */

void esmd_kafka_failure_info(const char *servers, const struct esmd_kafka_view *v,
                             size_t payload_size, struct esmd_buf *out)
{
    esmd_buf_puts(out, "{\"batchSize\":1,\"bootstrapServers\":");
    esmd_buf_put_json_string(out, servers, strlen(servers));
    esmd_buf_printf(out, ",\"payloadSize\":%zu,\"recordInfo\":{\"offset\":\"%lld\",\"timestamp\":",
                    payload_size, (long long)v->offset);
    if (v->timestamp >= 0) {
        char ts[32];
        esmd_iso8601_ms(v->timestamp, ts);
        esmd_buf_printf(out, "\"%s\"", ts);
    } else {
        esmd_buf_puts(out, JSON_NULL);
    }
    esmd_buf_puts(out, ",\"topic\":");
    esmd_buf_put_json_string(out, v->topic, strlen(v->topic));
    esmd_buf_printf(out, ",\"partition\":%d}}", (int)v->partition);
}

bool esmd_kafka_item_is(const struct esmd_kafka_view *v, const struct cJSON *id)
{
    if (!cJSON_IsObject(id))
        return false;
    const cJSON *part = cJSON_GetObjectItemCaseSensitive(id, "partition");
    const cJSON *off = cJSON_GetObjectItemCaseSensitive(id, "offset");
    if (!cJSON_IsString(part) || !off)
        return false;
    char key[512];
    snprintf(key, sizeof(key), "%s-%d", v->topic, (int)v->partition);
    if (strcmp(part->valuestring, key) != 0)
        return false;
    if (cJSON_IsNumber(off))
        return off->valuedouble == (double)v->offset;
    if (cJSON_IsString(off)) {
        char want[32];
        snprintf(want, sizeof(want), "%lld", (long long)v->offset);
        return strcmp(off->valuestring, want) == 0;
    }
    return false;
}
