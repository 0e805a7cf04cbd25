/* The Redis stream event (Kinesis-shaped, spec/lambda-semantics.md §4.1 and docs/redis.md),
 * written straight into a buffer, the filter document, and entry IDs.
 *
 * Every writer here has a size twin; both are built from the same string literals so the sizes
 * the core batches by are the bytes the encoder writes. */
#include "redis_private.h"

#include "esmd/json.h"

#include <cJSON.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define LIT(s) (sizeof(s) - 1)

#define ENV_HEAD "{\"Records\":["
#define ENV_TAIL "]}"

#define REC_HEAD "{\"redis\":{\"redisSchemaVersion\":\"1.0\",\"stream\":"
#define REC_SEQ ",\"sequenceNumber\":\""
#define REC_TS "\",\"approximateArrivalTimestamp\":"
#define REC_COUNT ",\"deliveryCount\":"
#define REC_FIELDS ",\"fields\":{"
#define REC_BINARY "},\"binaryFields\":["
#define REC_BIN_NAME "{\"name\":\""
#define REC_BIN_VALUE "\",\"value\":\""
#define REC_BIN_TAIL "\"}"
#define REC_BINARY_END "]"
#define REC_FIELDS_END "}"
#define REC_META "},\"eventSource\":\"esmd:redis\",\"eventVersion\":\"1.0\",\"eventID\":"
#define REC_ARN ",\"eventName\":\"esmd:redis:record\",\"eventSourceARN\":"
#define REC_TAIL "}"

#define DOC_STREAM "{\"stream\":"
#define DOC_TAIL "}}"

/* ---- numbers and IDs ---- */

static size_t u64_len(uint64_t v)
{
    size_t n = 1;
    while (v >= 10) {
        v /= 10;
        n++;
    }
    return n;
}

static size_t u64_write(char *out, uint64_t v)
{
    char tmp[20];
    size_t n = 0;
    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    for (size_t i = 0; i < n; i++)
        out[i] = tmp[n - 1 - i];
    return n;
}

int esmd_redis_id_parse(const char *s, size_t n, struct esmd_redis_id *id)
{
    uint64_t part[2] = {0, 0};
    size_t i = 0;
    for (int k = 0; k < 2; k++) {
        size_t start = i;
        while (i < n && s[i] >= '0' && s[i] <= '9') {
            uint64_t d = (uint64_t)(s[i] - '0');
            if (part[k] > (UINT64_MAX - d) / 10)
                return ESMD_EINVAL;
            part[k] = part[k] * 10 + d;
            i++;
        }
        if (i == start)
            return ESMD_EINVAL;
        if (k == 0) {
            if (i >= n || s[i] != '-')
                return ESMD_EINVAL;
            i++;
        }
    }
    if (i != n)
        return ESMD_EINVAL;
    id->ms = part[0];
    id->seq = part[1];
    return ESMD_OK;
}

size_t esmd_redis_id_format(struct esmd_redis_id id, char out[ESMD_REDIS_ID_MAX])
{
    size_t n = u64_write(out, id.ms);
    out[n++] = '-';
    n += u64_write(out + n, id.seq);
    out[n] = '\0';
    return n;
}

int esmd_redis_id_cmp(struct esmd_redis_id a, struct esmd_redis_id b)
{
    if (a.ms != b.ms)
        return a.ms < b.ms ? -1 : 1;
    if (a.seq != b.seq)
        return a.seq < b.seq ? -1 : 1;
    return 0;
}

static size_t id_len(struct esmd_redis_id id)
{
    return u64_len(id.ms) + 1 + u64_len(id.seq);
}

static void put_id(struct esmd_buf *out, struct esmd_redis_id id)
{
    char tmp[ESMD_REDIS_ID_MAX];
    esmd_buf_append(out, tmp, esmd_redis_id_format(id, tmp));
}

/* Epoch seconds with milliseconds, from the ID's ms part: 1700000000.123 (a JSON number). */
static size_t ts_len(uint64_t ms)
{
    return u64_len(ms / 1000) + 4;
}

static void put_ts(struct esmd_buf *out, uint64_t ms)
{
    char tmp[32];
    size_t n = u64_write(tmp, ms / 1000);
    unsigned frac = (unsigned)(ms % 1000);
    tmp[n++] = '.';
    tmp[n++] = (char)('0' + frac / 100);
    tmp[n++] = (char)('0' + frac / 10 % 10);
    tmp[n++] = (char)('0' + frac % 10);
    esmd_buf_append(out, tmp, n);
}

/* ---- the source's shared strings ---- */

static char *json_string_dup(const char *s, size_t *len)
{
    struct esmd_buf b = ESMD_BUF_INIT;
    esmd_buf_put_json_string(&b, s, strlen(s));
    esmd_buf_cstr(&b);
    return esmd_buf_steal(&b, len);
}

void esmd_redis_source_init(struct esmd_redis_source *src, const char *stream, const char *arn)
{
    src->stream_json = json_string_dup(stream, &src->stream_json_len);
    src->arn_json = json_string_dup(arn, &src->arn_json_len);
}

void esmd_redis_source_free(struct esmd_redis_source *src)
{
    if (!src)
        return;
    free(src->stream_json);
    free(src->arn_json);
    src->stream_json = src->arn_json = NULL;
}

char *esmd_redis_arn(const struct esmd_redis_url *u, const char *stream)
{
    struct esmd_buf b = ESMD_BUF_INIT;
    bool v6 = strchr(u->host, ':') != NULL;
    esmd_buf_printf(&b, "arn:esmd:redis:%s%s%s:%d/%d:stream/%s", v6 ? "[" : "", u->host,
                    v6 ? "]" : "", u->port, u->db, stream);
    esmd_buf_cstr(&b);
    return esmd_buf_steal(&b, NULL);
}

/* ---- the event ---- */

void esmd_redis_fields_classify(struct esmd_redis_field *fields, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        struct esmd_redis_field *f = &fields[i];
        f->text = esmd_utf8_valid(f->name, f->name_len) && esmd_utf8_valid(f->value, f->value_len);
    }
}

size_t esmd_redis_envelope_size(void)
{
    return LIT(ENV_HEAD) + LIT(ENV_TAIL);
}

size_t esmd_redis_record_size(const struct esmd_redis_source *src, const struct esmd_redis_entry *e)
{
    size_t idl = id_len(e->id);
    size_t n = LIT(REC_HEAD) + src->stream_json_len;
    n += LIT(REC_SEQ) + idl;
    n += LIT(REC_TS) + ts_len(e->id.ms);
    n += LIT(REC_COUNT) + esmd_i64_len(e->delivery_count);
    n += LIT(REC_FIELDS);
    size_t ntext = 0, nbin = 0;
    for (size_t i = 0; i < e->nfields; i++) {
        const struct esmd_redis_field *f = &e->fields[i];
        if (f->text) {
            n += (ntext++ ? 1 : 0) + esmd_json_string_len(f->name, f->name_len) + 1 +
                 esmd_json_string_len(f->value, f->value_len);
        } else {
            n += (nbin++ ? 1 : 0) + LIT(REC_BIN_NAME) + esmd_base64_len(f->name_len) +
                 LIT(REC_BIN_VALUE) + esmd_base64_len(f->value_len) + LIT(REC_BIN_TAIL);
        }
    }
    n += nbin ? LIT(REC_BINARY) + LIT(REC_BINARY_END) : LIT(REC_FIELDS_END);
    /* eventID: the stream's JSON string with ":<id>" before its closing quote */
    n += LIT(REC_META) + src->stream_json_len + 1 + idl;
    n += LIT(REC_ARN) + src->arn_json_len + LIT(REC_TAIL);
    return n;
}

void esmd_redis_record_write(struct esmd_buf *out, const struct esmd_redis_source *src,
                             const struct esmd_redis_entry *e)
{
    esmd_buf_append(out, REC_HEAD, LIT(REC_HEAD));
    esmd_buf_append(out, src->stream_json, src->stream_json_len);
    esmd_buf_append(out, REC_SEQ, LIT(REC_SEQ));
    put_id(out, e->id);
    esmd_buf_append(out, REC_TS, LIT(REC_TS));
    put_ts(out, e->id.ms);
    esmd_buf_append(out, REC_COUNT, LIT(REC_COUNT));
    esmd_buf_put_i64(out, e->delivery_count);
    esmd_buf_append(out, REC_FIELDS, LIT(REC_FIELDS));
    size_t ntext = 0, nbin = 0;
    for (size_t i = 0; i < e->nfields; i++) {
        const struct esmd_redis_field *f = &e->fields[i];
        if (!f->text) {
            nbin++;
            continue;
        }
        if (ntext++)
            esmd_buf_putc(out, ',');
        esmd_buf_put_json_string(out, f->name, f->name_len);
        esmd_buf_putc(out, ':');
        esmd_buf_put_json_string(out, f->value, f->value_len);
    }
    if (nbin) {
        esmd_buf_append(out, REC_BINARY, LIT(REC_BINARY));
        size_t k = 0;
        for (size_t i = 0; i < e->nfields; i++) {
            const struct esmd_redis_field *f = &e->fields[i];
            if (f->text)
                continue;
            if (k++)
                esmd_buf_putc(out, ',');
            esmd_buf_append(out, REC_BIN_NAME, LIT(REC_BIN_NAME));
            esmd_buf_put_base64(out, f->name, f->name_len);
            esmd_buf_append(out, REC_BIN_VALUE, LIT(REC_BIN_VALUE));
            esmd_buf_put_base64(out, f->value, f->value_len);
            esmd_buf_append(out, REC_BIN_TAIL, LIT(REC_BIN_TAIL));
        }
        esmd_buf_append(out, REC_BINARY_END, LIT(REC_BINARY_END));
    } else {
        esmd_buf_append(out, REC_FIELDS_END, LIT(REC_FIELDS_END));
    }
    esmd_buf_append(out, REC_META, LIT(REC_META));
    esmd_buf_append(out, src->stream_json, src->stream_json_len - 1); /* without its '"' */
    esmd_buf_putc(out, ':');
    put_id(out, e->id);
    esmd_buf_putc(out, '"');
    esmd_buf_append(out, REC_ARN, LIT(REC_ARN));
    esmd_buf_append(out, src->arn_json, src->arn_json_len);
    esmd_buf_append(out, REC_TAIL, LIT(REC_TAIL));
}

void esmd_redis_encode_batch(const struct esmd_redis_source *src, const struct esmd_batch *batch,
                             esmd_redis_entry_fn entry_of, struct esmd_buf *out)
{
    esmd_buf_reserve(out, esmd_batch_bytes(batch));
    esmd_buf_append(out, ENV_HEAD, LIT(ENV_HEAD));
    size_t k = 0;
    for (size_t i = 0; i < batch->ngroups; i++) {
        const struct esmd_batch_group *g = &batch->groups[i];
        const struct esmd_record *rec = g->head;
        for (size_t j = 0; j < g->n && rec; j++, rec = rec->next) {
            if (k++)
                esmd_buf_putc(out, ',');
            esmd_redis_record_write(out, src, entry_of(rec));
        }
    }
    esmd_buf_append(out, ENV_TAIL, LIT(ENV_TAIL));
}

void esmd_redis_encode_written(const struct esmd_batch *batch, esmd_redis_json_fn json_of,
                               struct esmd_buf *out)
{
    esmd_buf_reserve(out, esmd_batch_bytes(batch));
    esmd_buf_append(out, ENV_HEAD, LIT(ENV_HEAD));
    size_t k = 0;
    for (size_t i = 0; i < batch->ngroups; i++) {
        const struct esmd_batch_group *g = &batch->groups[i];
        const struct esmd_record *rec = g->head;
        for (size_t j = 0; j < g->n && rec; j++, rec = rec->next) {
            if (k++)
                esmd_buf_putc(out, ',');
            esmd_buf_append(out, json_of(rec), rec->size);
        }
    }
    esmd_buf_append(out, ENV_TAIL, LIT(ENV_TAIL));
}

/* ---- what filters see ---- */

enum esmd_filter_data esmd_redis_filter_doc(const struct esmd_redis_source *src,
                                            const struct esmd_redis_entry *e, struct esmd_buf *out)
{
    esmd_buf_append(out, DOC_STREAM, LIT(DOC_STREAM));
    esmd_buf_append(out, src->stream_json, src->stream_json_len);
    esmd_buf_append(out, REC_SEQ, LIT(REC_SEQ));
    put_id(out, e->id);
    esmd_buf_append(out, REC_TS, LIT(REC_TS));
    put_ts(out, e->id.ms);
    esmd_buf_append(out, REC_FIELDS, LIT(REC_FIELDS));
    size_t n = 0;
    for (size_t i = 0; i < e->nfields; i++) {
        const struct esmd_redis_field *f = &e->fields[i];
        if (!f->text)
            continue; /* not UTF-8: not something a pattern can name or match */
        if (n++)
            esmd_buf_putc(out, ',');
        esmd_buf_put_json_string(out, f->name, f->name_len);
        esmd_buf_putc(out, ':');
        if (esmd_json_valid(f->value, f->value_len))
            esmd_buf_append(out, f->value, f->value_len);
        else
            esmd_buf_put_json_string(out, f->value, f->value_len);
    }
    esmd_buf_append(out, DOC_TAIL, LIT(DOC_TAIL));
    return ESMD_FILTER_DATA_JSON;
}

/* ---- failure handling ---- */

/* 9999-12-31T23:59:59.999Z: the last instant an ISO-8601 year of four digits can say. */
#define ISO_MAX_MS 253402300799999ULL

static void put_iso(struct esmd_buf *out, uint64_t ms)
{
    if (ms > ISO_MAX_MS) {
        esmd_buf_puts(out, "null");
        return;
    }
    char ts[32];
    esmd_iso8601_ms((int64_t)ms, ts);
    esmd_buf_putc(out, '"');
    esmd_buf_puts(out, ts);
    esmd_buf_putc(out, '"');
}

void esmd_redis_failure_info(const struct esmd_redis_source *src, const char *group,
                             struct esmd_redis_id id, size_t payload_size, struct esmd_buf *out)
{
    esmd_buf_printf(out, "{\"batchSize\":1,\"payloadSize\":%zu,\"stream\":", payload_size);
    esmd_buf_append(out, src->stream_json, src->stream_json_len);
    esmd_buf_puts(out, ",\"group\":");
    esmd_buf_put_json_string(out, group, strlen(group));
    esmd_buf_puts(out, ",\"startSequenceNumber\":\"");
    put_id(out, id);
    esmd_buf_puts(out, "\",\"endSequenceNumber\":\"");
    put_id(out, id);
    esmd_buf_puts(out, "\",\"approximateArrivalOfFirstRecord\":");
    put_iso(out, id.ms);
    esmd_buf_puts(out, ",\"approximateArrivalOfLastRecord\":");
    put_iso(out, id.ms);
    esmd_buf_puts(out, ",\"streamArn\":");
    esmd_buf_append(out, src->arn_json, src->arn_json_len);
    esmd_buf_putc(out, '}');
}

bool esmd_redis_item_is(struct esmd_redis_id id, const struct cJSON *item)
{
    struct esmd_redis_id got;
    if (!cJSON_IsString(item) || !item->valuestring)
        return false;
    return esmd_redis_id_parse(item->valuestring, strlen(item->valuestring), &got) == ESMD_OK &&
           esmd_redis_id_cmp(got, id) == 0;
}
