/* The Redis stream event (Lambda's Kinesis event by default, or esmd's native Kinesis-like
 * shape; docs/redis.md), written straight into a buffer, the filter document, and entry IDs.
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

/* the kinesis format */
#define KIN_HEAD "{\"kinesis\":{\"kinesisSchemaVersion\":\"1.0\",\"partitionKey\":"
#define KIN_SEQ ",\"sequenceNumber\":\""
#define KIN_DATA "\",\"data\":\""
#define KIN_TS "\",\"approximateArrivalTimestamp\":"
#define KIN_META                                                                                   \
    "},\"eventSource\":\"aws:kinesis\",\"eventVersion\":\"1.0\",\"eventID\":"                      \
    "\"" ESMD_REDIS_SHARD_ID ":"
#define KIN_IDENTITY "\",\"eventName\":\"aws:kinesis:record\",\"invokeIdentityArn\":"
#define KIN_REGION ",\"awsRegion\":"
#define KIN_ARN ",\"eventSourceARN\":"
#define KIN_TAIL "}"

#define KDOC_HEAD "{\"kinesisSchemaVersion\":\"1.0\",\"partitionKey\":"
#define KDOC_TS "\",\"approximateArrivalTimestamp\":"
#define KDOC_DATA ",\"data\":"
#define KDOC_ARN ",\"eventSourceARN\":"
#define KDOC_REGION ",\"awsRegion\":"
#define KDOC_TAIL "}"

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

static char *dup_len(const char *s, size_t *len)
{
    if (!s) {
        *len = 0;
        return NULL;
    }
    *len = strlen(s);
    return esmd_xstrdup(s);
}

void esmd_redis_source_init(struct esmd_redis_source *src, const char *stream, const char *arn,
                            const struct esmd_redis_format_opts *fmt)
{
    memset(src, 0, sizeof(*src));
    src->format = fmt ? fmt->format : ESMD_REDIS_FORMAT_NATIVE;
    src->stream_json = json_string_dup(stream, &src->stream_json_len);
    src->arn_json = json_string_dup(arn, &src->arn_json_len);
    if (src->format != ESMD_REDIS_FORMAT_KINESIS)
        return;
    src->data_field = dup_len(fmt->data_field, &src->data_field_len);
    src->pkey_field = dup_len(fmt->partition_key_field, &src->pkey_field_len);
    char identity[160];
    snprintf(identity, sizeof(identity), "arn:aws:iam::%s:role/esmd", esmd_aws_account());
    src->identity_json = json_string_dup(identity, &src->identity_json_len);
    src->region_json = json_string_dup(esmd_aws_region(), &src->region_json_len);
}

void esmd_redis_source_free(struct esmd_redis_source *src)
{
    if (!src)
        return;
    free(src->stream_json);
    free(src->arn_json);
    free(src->data_field);
    free(src->pkey_field);
    free(src->identity_json);
    free(src->region_json);
    src->stream_json = src->arn_json = src->data_field = src->pkey_field = NULL;
    src->identity_json = src->region_json = NULL;
}

char *esmd_redis_kinesis_arn(const char *stream)
{
    struct esmd_buf b = ESMD_BUF_INIT;
    esmd_buf_printf(&b, "arn:aws:kinesis:%s:%s:stream/%s", esmd_aws_region(), esmd_aws_account(),
                    stream);
    esmd_buf_cstr(&b);
    return esmd_buf_steal(&b, NULL);
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

/* ---- the kinesis format ---- */

static bool same_name(const struct esmd_redis_field *f, const char *name, size_t len)
{
    return f->name_len == len && (len == 0 || memcmp(f->name, name, len) == 0);
}

/* The first field called name (n bytes), or NULL. */
static const struct esmd_redis_field *field_named(const struct esmd_redis_entry *e,
                                                  const char *name, size_t n)
{
    for (size_t i = 0; i < e->nfields; i++)
        if (same_name(&e->fields[i], name, n))
            return &e->fields[i];
    return NULL;
}

/* Every field as one JSON object, in entry order; a name that repeats is written once, at its
 * first place, with the array of its values. */
static void put_fields_object(struct esmd_buf *out, const struct esmd_redis_entry *e)
{
    esmd_buf_putc(out, '{');
    size_t n = 0;
    for (size_t i = 0; i < e->nfields; i++) {
        const struct esmd_redis_field *f = &e->fields[i];
        bool seen = false;
        size_t count = 0;
        for (size_t j = 0; j < i && !seen; j++)
            seen = same_name(&e->fields[j], f->name, f->name_len);
        if (seen)
            continue;
        for (size_t j = i; j < e->nfields; j++)
            count += same_name(&e->fields[j], f->name, f->name_len);
        if (n++)
            esmd_buf_putc(out, ',');
        esmd_buf_put_json_string(out, f->name, f->name_len);
        esmd_buf_putc(out, ':');
        if (count == 1) {
            esmd_buf_put_json_string(out, f->value, f->value_len);
            continue;
        }
        esmd_buf_putc(out, '[');
        size_t k = 0;
        for (size_t j = i; j < e->nfields; j++) {
            const struct esmd_redis_field *g = &e->fields[j];
            if (!same_name(g, f->name, f->name_len))
                continue;
            if (k++)
                esmd_buf_putc(out, ',');
            esmd_buf_put_json_string(out, g->value, g->value_len);
        }
        esmd_buf_putc(out, ']');
    }
    esmd_buf_putc(out, '}');
}

/* The data_field's field, or NULL when the data is every field. */
static const struct esmd_redis_field *data_of(const struct esmd_redis_source *src,
                                              const struct esmd_redis_entry *e)
{
    return src->data_field ? field_named(e, src->data_field, src->data_field_len) : NULL;
}

void esmd_redis_kinesis_data(const struct esmd_redis_source *src, const struct esmd_redis_entry *e,
                             struct esmd_buf *out)
{
    const struct esmd_redis_field *f = data_of(src, e);
    if (f)
        esmd_buf_append(out, f->value, f->value_len);
    else
        put_fields_object(out, e);
}

/* The partitionKey's text: the partition_key_field's first value when it is UTF-8, else NULL
 * (the entry ID). */
static const struct esmd_redis_field *pkey_of(const struct esmd_redis_source *src,
                                              const struct esmd_redis_entry *e)
{
    return esmd_redis_partition_key(src, e);
}

const struct esmd_redis_field *esmd_redis_partition_key(const struct esmd_redis_source *src,
                                                        const struct esmd_redis_entry *e)
{
    if (!src->pkey_field)
        return NULL;
    const struct esmd_redis_field *f = field_named(e, src->pkey_field, src->pkey_field_len);
    return f && esmd_utf8_valid(f->value, f->value_len) ? f : NULL;
}

static size_t pkey_len(const struct esmd_redis_source *src, const struct esmd_redis_entry *e)
{
    const struct esmd_redis_field *f = pkey_of(src, e);
    return f ? esmd_json_string_len(f->value, f->value_len) : id_len(e->id) + 2;
}

static void put_pkey(struct esmd_buf *out, const struct esmd_redis_source *src,
                     const struct esmd_redis_entry *e)
{
    const struct esmd_redis_field *f = pkey_of(src, e);
    if (f) {
        esmd_buf_put_json_string(out, f->value, f->value_len);
        return;
    }
    esmd_buf_putc(out, '"');
    put_id(out, e->id);
    esmd_buf_putc(out, '"');
}

static size_t data_len(const struct esmd_redis_source *src, const struct esmd_redis_entry *e)
{
    const struct esmd_redis_field *f = data_of(src, e);
    if (f)
        return f->value_len;
    struct esmd_buf b = ESMD_BUF_INIT;
    put_fields_object(&b, e);
    size_t n = b.len;
    esmd_buf_free(&b);
    return n;
}

static size_t kinesis_record_size(const struct esmd_redis_source *src,
                                  const struct esmd_redis_entry *e)
{
    size_t idl = id_len(e->id);
    size_t n = LIT(KIN_HEAD) + pkey_len(src, e);
    n += LIT(KIN_SEQ) + idl;
    n += LIT(KIN_DATA) + esmd_base64_len(data_len(src, e));
    n += LIT(KIN_TS) + ts_len(e->id.ms);
    n += LIT(KIN_META) + idl;
    n += LIT(KIN_IDENTITY) + src->identity_json_len;
    n += LIT(KIN_REGION) + src->region_json_len;
    n += LIT(KIN_ARN) + src->arn_json_len + LIT(KIN_TAIL);
    return n;
}

static void kinesis_record_write(struct esmd_buf *out, const struct esmd_redis_source *src,
                                 const struct esmd_redis_entry *e)
{
    esmd_buf_append(out, KIN_HEAD, LIT(KIN_HEAD));
    put_pkey(out, src, e);
    esmd_buf_append(out, KIN_SEQ, LIT(KIN_SEQ));
    put_id(out, e->id);
    esmd_buf_append(out, KIN_DATA, LIT(KIN_DATA));
    const struct esmd_redis_field *f = data_of(src, e);
    if (f) {
        esmd_buf_put_base64(out, f->value, f->value_len);
    } else {
        struct esmd_buf b = ESMD_BUF_INIT;
        put_fields_object(&b, e);
        esmd_buf_put_base64(out, b.data, b.len);
        esmd_buf_free(&b);
    }
    esmd_buf_append(out, KIN_TS, LIT(KIN_TS));
    put_ts(out, e->id.ms);
    esmd_buf_append(out, KIN_META, LIT(KIN_META));
    put_id(out, e->id);
    esmd_buf_append(out, KIN_IDENTITY, LIT(KIN_IDENTITY));
    esmd_buf_append(out, src->identity_json, src->identity_json_len);
    esmd_buf_append(out, KIN_REGION, LIT(KIN_REGION));
    esmd_buf_append(out, src->region_json, src->region_json_len);
    esmd_buf_append(out, KIN_ARN, LIT(KIN_ARN));
    esmd_buf_append(out, src->arn_json, src->arn_json_len);
    esmd_buf_append(out, KIN_TAIL, LIT(KIN_TAIL));
}

/* The first non-space byte of s, or 0. */
static char first_byte(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (s[i] != ' ' && s[i] != '\t' && s[i] != '\n' && s[i] != '\r')
            return s[i];
    return 0;
}

static enum esmd_filter_data kinesis_filter_doc(const struct esmd_redis_source *src,
                                                const struct esmd_redis_entry *e,
                                                struct esmd_buf *out)
{
    enum esmd_filter_data d = ESMD_FILTER_DATA_JSON;
    esmd_buf_append(out, KDOC_HEAD, LIT(KDOC_HEAD));
    put_pkey(out, src, e);
    esmd_buf_append(out, KIN_SEQ, LIT(KIN_SEQ));
    put_id(out, e->id);
    esmd_buf_append(out, KDOC_TS, LIT(KDOC_TS));
    put_ts(out, e->id.ms);
    const struct esmd_redis_field *f = data_of(src, e);
    if (!f) {
        esmd_buf_append(out, KDOC_DATA, LIT(KDOC_DATA));
        put_fields_object(out, e); /* always a JSON object */
    } else if (esmd_json_valid(f->value, f->value_len)) {
        char c = first_byte(f->value, f->value_len);
        d = c == '{' || c == '[' ? ESMD_FILTER_DATA_JSON : ESMD_FILTER_DATA_TEXT;
        esmd_buf_append(out, KDOC_DATA, LIT(KDOC_DATA));
        esmd_buf_append(out, f->value, f->value_len);
    } else if (esmd_utf8_valid(f->value, f->value_len)) {
        d = ESMD_FILTER_DATA_TEXT;
        esmd_buf_append(out, KDOC_DATA, LIT(KDOC_DATA));
        esmd_buf_put_json_string(out, f->value, f->value_len);
    } else {
        d = ESMD_FILTER_DATA_NONE; /* not UTF-8: nothing a pattern can match */
    }
    esmd_buf_append(out, KDOC_ARN, LIT(KDOC_ARN));
    esmd_buf_append(out, src->arn_json, src->arn_json_len);
    esmd_buf_append(out, KDOC_REGION, LIT(KDOC_REGION));
    esmd_buf_append(out, src->region_json, src->region_json_len);
    esmd_buf_append(out, KDOC_TAIL, LIT(KDOC_TAIL));
    return d;
}

/* ---- the native format ---- */

size_t esmd_redis_envelope_size(void)
{
    return ESMD_BATCH_RECORDS_ENVELOPE;
}

size_t esmd_redis_record_size(const struct esmd_redis_source *src, const struct esmd_redis_entry *e)
{
    if (src->format == ESMD_REDIS_FORMAT_KINESIS)
        return kinesis_record_size(src, e);
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
    if (src->format == ESMD_REDIS_FORMAT_KINESIS) {
        kinesis_record_write(out, src, e);
        return;
    }
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

struct redis_encode_ctx {
    const struct esmd_redis_source *src;
    esmd_redis_entry_fn entry_of;
    esmd_redis_json_fn json_of;
};

static void write_entry(void *ctx, const struct esmd_record *rec, struct esmd_buf *out)
{
    const struct redis_encode_ctx *c = ctx;
    esmd_redis_record_write(out, c->src, c->entry_of(rec));
}

static void write_json(void *ctx, const struct esmd_record *rec, struct esmd_buf *out)
{
    const struct redis_encode_ctx *c = ctx;
    esmd_buf_append(out, c->json_of(rec), rec->size);
}

void esmd_redis_encode_batch(const struct esmd_redis_source *src, const struct esmd_batch *batch,
                             esmd_redis_entry_fn entry_of, struct esmd_buf *out)
{
    struct redis_encode_ctx c = {.src = src, .entry_of = entry_of};
    esmd_batch_encode_records(batch, write_entry, &c, out);
}

void esmd_redis_encode_written(const struct esmd_batch *batch, esmd_redis_json_fn json_of,
                               struct esmd_buf *out)
{
    struct redis_encode_ctx c = {.json_of = json_of};
    esmd_batch_encode_records(batch, write_json, &c, out);
}

/* ---- what filters see ---- */

enum esmd_filter_data esmd_redis_filter_doc(const struct esmd_redis_source *src,
                                            const struct esmd_redis_entry *e, struct esmd_buf *out)
{
    if (src->format == ESMD_REDIS_FORMAT_KINESIS)
        return kinesis_filter_doc(src, e, out);
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
