/* The Redis stream event encoder: golden events, the exact-size contract, a JSON round trip,
 * the filter document, entry IDs, connection URLs and the ARN.
 *
 * Entries are built by hand as esmd_redis_entry (the encoder never sees a redisReply). Golden
 * files in tests/unit/data/redis/ were written independently of this encoder by golden.py
 * (Python's json and base64), from the same entries. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "testutil.h"

#include "../../src/batch_private.h" /* shards on the stack, as the core makes them */
#include "../../connectors/redis/redis_private.h"

#include <cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* A hand-built record: the core's record plus the entry the encoder reads. */
struct trec {
    struct esmd_record rec;
    struct esmd_redis_entry e;
    struct esmd_redis_field f[16];
};

static const struct esmd_redis_entry *trec_entry(const struct esmd_record *rec)
{
    return &((const struct trec *)rec)->e;
}

static struct trec *trec_new(uint64_t ms, uint64_t seq, int64_t count)
{
    struct trec *t = calloc(1, sizeof(*t));
    t->e.id = (struct esmd_redis_id){ms, seq};
    t->e.delivery_count = count;
    t->e.fields = t->f;
    return t;
}

/* Borrowed bytes: the test's literals live as long as the test. */
static void trec_field(struct trec *t, const char *name, size_t nlen, const char *value,
                       size_t vlen)
{
    assert_true(t->e.nfields < 16);
    t->f[t->e.nfields++] = (struct esmd_redis_field){name, nlen, value, vlen, false};
    esmd_redis_fields_classify(t->f, t->e.nfields);
}

#define FIELD(t, n, v) trec_field(t, n, sizeof(n) - 1, v, sizeof(v) - 1)

static void batch_init(struct esmd_batch *batch)
{
    struct esmd_batch_limits lim = {
        .batch_size = 10000,
        .max_bytes = ESMD_MAX_PAYLOAD,
        .envelope = esmd_redis_envelope_size(),
        .group_by_shard = false,
    };
    esmd_batch_init(batch, &lim);
}

static void trec_add(struct esmd_batch *batch, const struct esmd_redis_source *src, struct trec *t,
                     struct esmd_shard *shard)
{
    t->rec.size = esmd_redis_record_size(src, &t->e);
    t->rec.shard = shard;
    assert_int_equal(esmd_batch_check(batch, &t->rec), ESMD_BATCH_FITS);
    esmd_batch_add(batch, &t->rec);
}

static void assert_golden(const char *name, const struct esmd_redis_source *src,
                          const struct esmd_batch *batch)
{
    struct esmd_buf out = ESMD_BUF_INIT;
    esmd_redis_encode_batch(src, batch, trec_entry, &out);
    const char *got = esmd_buf_cstr(&out);
    assert_int_equal(out.len, esmd_batch_bytes(batch));
    assert_int_equal(strlen(got), esmd_batch_bytes(batch));
    esmd_test_assert_golden("redis", name, got, out.len);
    esmd_buf_free(&out);
}

static void source_for(struct esmd_redis_source *src, const char *url, const char *stream)
{
    struct esmd_redis_url u;
    char err[200];
    assert_int_equal(esmd_redis_url_parse(url, &u, err, sizeof(err)), ESMD_OK);
    char *arn = esmd_redis_arn(&u, stream);
    esmd_redis_source_init(src, stream, arn, NULL);
    free(arn);
    esmd_redis_url_free(&u);
}

/* ---- golden events ---- */

struct two_entries {
    struct esmd_redis_source src;
    struct esmd_shard shard;
    struct esmd_batch batch;
    struct trec *r[2];
};

static void two_entries_build(struct two_entries *te)
{
    source_for(&te->src, "redis://127.0.0.1:6379/0", "orders");
    memset(&te->shard, 0, sizeof(te->shard));
    te->shard.key = "orders@c1";
    batch_init(&te->batch);
    struct trec *a = trec_new(1700000000123ULL, 0, 1);
    FIELD(a, "type", "order_created");
    FIELD(a, "payload", "{\"id\":1,\"total\":9.5}");
    FIELD(a, "note", "\xc3\xab \"quoted\"\n");
    struct trec *b = trec_new(1700000000124ULL, 7, 3);
    FIELD(b, "k", "1");
    FIELD(b, "k", "2"); /* a repeated name: kept, in order */
    FIELD(b, "empty", "");
    FIELD(b, "blob", "\x00\xff\x10\x80");
    FIELD(b, "\xff\xfename", "v");
    FIELD(b, "ctl", "\x01\x7f");
    trec_add(&te->batch, &te->src, a, &te->shard);
    trec_add(&te->batch, &te->src, b, &te->shard);
    te->r[0] = a;
    te->r[1] = b;
}

static void two_entries_free(struct two_entries *te)
{
    esmd_batch_clear(&te->batch);
    esmd_redis_source_free(&te->src);
    free(te->r[0]);
    free(te->r[1]);
}

static void test_two_entries_golden(void **state)
{
    struct two_entries te;
    two_entries_build(&te);
    assert_golden("two_entries.json", &te.src, &te.batch);
    two_entries_free(&te);
}

static void test_escaped_stream_golden(void **state)
{
    const char *stream = "q\"s\\\xc3\xab/x";
    struct esmd_redis_source src;
    source_for(&src, "redis://:secret@[::1]:6380/2", stream);
    struct esmd_shard shard = {.key = "s"};
    struct esmd_batch batch;
    batch_init(&batch);
    struct trec *t = trec_new(5, 1, 2);
    FIELD(t, "a", "b");
    trec_add(&batch, &src, t, &shard);
    assert_golden("escaped_stream.json", &src, &batch);
    esmd_batch_clear(&batch);
    esmd_redis_source_free(&src);
    free(t);
}

/* Records written once beforehand (what the connector does) make the same event. */
struct wrec {
    struct esmd_record rec;
    char *json;
};

static const char *wrec_json(const struct esmd_record *rec)
{
    return ((const struct wrec *)rec)->json;
}

static void test_encode_written_matches(void **state)
{
    struct two_entries te;
    two_entries_build(&te);
    struct esmd_buf want = ESMD_BUF_INIT, got = ESMD_BUF_INIT;
    esmd_redis_encode_batch(&te.src, &te.batch, trec_entry, &want);
    struct wrec w[2];
    struct esmd_batch batch;
    batch_init(&batch);
    for (int i = 0; i < 2; i++) {
        struct esmd_buf one = ESMD_BUF_INIT;
        esmd_redis_record_write(&one, &te.src, &te.r[i]->e);
        memset(&w[i], 0, sizeof(w[i]));
        w[i].rec.size = one.len;
        w[i].rec.shard = &te.shard;
        w[i].json = esmd_buf_steal(&one, NULL);
        esmd_batch_add(&batch, &w[i].rec);
    }
    esmd_redis_encode_written(&batch, wrec_json, &got);
    assert_int_equal(got.len, esmd_batch_bytes(&batch));
    assert_int_equal(got.len, want.len);
    assert_memory_equal(got.data, want.data, want.len);
    for (int i = 0; i < 2; i++)
        free(w[i].json);
    esmd_batch_clear(&batch);
    esmd_buf_free(&want);
    esmd_buf_free(&got);
    two_entries_free(&te);
}

/* ---- the event parses back to the inputs ---- */

static void assert_b64(const cJSON *item, const char *want, size_t len)
{
    assert_true(cJSON_IsString(item));
    struct esmd_buf dec = ESMD_BUF_INIT;
    assert_int_equal(esmd_base64_decode(item->valuestring, strlen(item->valuestring), &dec),
                     ESMD_OK);
    assert_int_equal(dec.len, len);
    if (len)
        assert_memory_equal(dec.data, want, len);
    esmd_buf_free(&dec);
}

/* cJSON strings stop at a NUL: compare up to it (the golden tests cover the rest). */
static void assert_text(const char *got, const char *want, size_t len)
{
    size_t n = strnlen(want, len);
    assert_int_equal(strlen(got), n);
    assert_memory_equal(got, want, n);
}

static void assert_record(const cJSON *o, const char *stream, const struct esmd_redis_entry *e,
                          const char *arn)
{
    char id[ESMD_REDIS_ID_MAX], want[256];
    esmd_redis_id_format(e->id, id);
    const cJSON *r = cJSON_GetObjectItemCaseSensitive(o, "redis");
    assert_true(cJSON_IsObject(r));
    assert_string_equal(cJSON_GetObjectItemCaseSensitive(r, "redisSchemaVersion")->valuestring,
                        "1.0");
    assert_string_equal(cJSON_GetObjectItemCaseSensitive(r, "stream")->valuestring, stream);
    assert_string_equal(cJSON_GetObjectItemCaseSensitive(r, "sequenceNumber")->valuestring, id);
    double ts = cJSON_GetObjectItemCaseSensitive(r, "approximateArrivalTimestamp")->valuedouble;
    assert_true(ts * 1000.0 > (double)e->id.ms - 1.0 && ts * 1000.0 < (double)e->id.ms + 1.0);
    assert_int_equal(cJSON_GetObjectItemCaseSensitive(r, "deliveryCount")->valuedouble,
                     e->delivery_count);
    /* fields: the text pairs in order (cJSON keeps repeated names as separate items) */
    const cJSON *fields = cJSON_GetObjectItemCaseSensitive(r, "fields");
    const cJSON *bin = cJSON_GetObjectItemCaseSensitive(r, "binaryFields");
    assert_true(cJSON_IsObject(fields));
    const cJSON *fi = fields->child;
    const cJSON *bi = bin ? bin->child : NULL;
    size_t nbin = 0;
    for (size_t i = 0; i < e->nfields; i++) {
        const struct esmd_redis_field *f = &e->fields[i];
        if (f->text) {
            assert_non_null(fi);
            assert_text(fi->string, f->name, f->name_len);
            assert_true(cJSON_IsString(fi));
            assert_text(fi->valuestring, f->value, f->value_len);
            fi = fi->next;
        } else {
            assert_non_null(bi);
            assert_int_equal(cJSON_GetArraySize(bi), 2);
            assert_b64(cJSON_GetObjectItemCaseSensitive(bi, "name"), f->name, f->name_len);
            assert_b64(cJSON_GetObjectItemCaseSensitive(bi, "value"), f->value, f->value_len);
            bi = bi->next;
            nbin++;
        }
    }
    assert_null(fi);
    assert_null(bi);
    if (nbin == 0)
        assert_null(bin); /* left out when there is none */
    assert_string_equal(cJSON_GetObjectItemCaseSensitive(o, "eventSource")->valuestring,
                        "esmd:redis");
    assert_string_equal(cJSON_GetObjectItemCaseSensitive(o, "eventVersion")->valuestring, "1.0");
    assert_string_equal(cJSON_GetObjectItemCaseSensitive(o, "eventName")->valuestring,
                        "esmd:redis:record");
    snprintf(want, sizeof(want), "%s:%s", stream, id);
    assert_string_equal(cJSON_GetObjectItemCaseSensitive(o, "eventID")->valuestring, want);
    assert_string_equal(cJSON_GetObjectItemCaseSensitive(o, "eventSourceARN")->valuestring, arn);
    assert_int_equal(cJSON_GetArraySize(o), 6);
}

static void test_round_trip(void **state)
{
    struct two_entries te;
    two_entries_build(&te);
    struct esmd_buf out = ESMD_BUF_INIT;
    esmd_redis_encode_batch(&te.src, &te.batch, trec_entry, &out);
    cJSON *root = cJSON_ParseWithLength(out.data, out.len);
    assert_non_null(root);
    assert_int_equal(cJSON_GetArraySize(root), 1);
    const cJSON *records = cJSON_GetObjectItemCaseSensitive(root, "Records");
    assert_int_equal(cJSON_GetArraySize(records), 2);
    const char *arn = "arn:esmd:redis:127.0.0.1:6379/0:stream/orders";
    assert_record(cJSON_GetArrayItem(records, 0), "orders", &te.r[0]->e, arn);
    assert_record(cJSON_GetArrayItem(records, 1), "orders", &te.r[1]->e, arn);
    cJSON_Delete(root);
    esmd_buf_free(&out);
    two_entries_free(&te);
}

/* ---- exactness on random batches ---- */

/* Random bytes, biased towards what needs escaping: quotes, backslashes, control bytes, bytes
 * that are not valid UTF-8, valid multi-byte sequences. Mostly text when `text`. */
static void rnd_bytes(char *p, size_t n, bool text)
{
    static const char *const pieces[] = {
        "\"", "\\", "\n", "\x01", "\x1f", "\x7f", "\xc3\xab",    "\xe2\x82\xac", "\xf0\x9f\x98\x80",
        "a",  "Z",  "/",  "{",    "\xff", "\xc3", "\xed\xa0\x80"};
    size_t i = 0;
    size_t npieces = ESMD_ARRAY_LEN(pieces) - (text ? 3 : 0);
    while (i < n) {
        if (text || esmd_test_rand_n(3) == 0) {
            const char *s = pieces[esmd_test_rand_n(npieces)];
            for (; *s && i < n; s++)
                p[i++] = *s;
        } else {
            p[i++] = (char)esmd_test_rand();
        }
    }
}

static void test_exact_size_random(void **state)
{
    static const char *const streams[] = {"orders",          "s",      "a:b{c}", "t\"q",
                                          "\xc3\xbc-stream", "ctl\x01"};
    static const char *const urls[] = {"redis://localhost", "redis://10.0.0.1:7000/15",
                                       "redis://u:p@[fe80::1]:6379/3"};
    for (int iter = 0; iter < 300; iter++) {
        struct esmd_redis_source src;
        const char *stream = streams[esmd_test_rand_n(ESMD_ARRAY_LEN(streams))];
        source_for(&src, urls[esmd_test_rand_n(ESMD_ARRAY_LEN(urls))], stream);
        struct esmd_shard shard = {.key = "k"};
        struct esmd_batch batch;
        batch_init(&batch);
        size_t nrec = 1 + esmd_test_rand_n(40);
        struct trec **recs = calloc(nrec, sizeof(*recs));
        char(*bytes)[16][2][64] = calloc(nrec, sizeof(*bytes));
        for (size_t r = 0; r < nrec; r++) {
            uint64_t ms = esmd_test_rand_n(4) == 0 ? esmd_test_rand()
                                                   : (uint64_t)esmd_test_rand_n(2000000000000ULL);
            uint64_t seq = esmd_test_rand_n(3) == 0 ? esmd_test_rand() : esmd_test_rand_n(100);
            recs[r] =
                trec_new(ms, seq, 1 + (int64_t)esmd_test_rand_n(esmd_test_rand_n(2) ? 3 : 1000000));
            size_t nf = esmd_test_rand_n(6);
            for (size_t f = 0; f < nf; f++) {
                size_t nlen = esmd_test_rand_n(20), vlen = esmd_test_rand_n(64);
                rnd_bytes(bytes[r][f][0], nlen, esmd_test_rand_n(8) != 0);
                rnd_bytes(bytes[r][f][1], vlen, esmd_test_rand_n(4) != 0);
                trec_field(recs[r], bytes[r][f][0], nlen, bytes[r][f][1], vlen);
            }
            /* one record alone: its write is exactly its size */
            struct esmd_buf one = ESMD_BUF_INIT;
            esmd_redis_record_write(&one, &src, &recs[r]->e);
            assert_int_equal(one.len, esmd_redis_record_size(&src, &recs[r]->e));
            esmd_buf_free(&one);
            trec_add(&batch, &src, recs[r], &shard);
        }
        struct esmd_buf out = ESMD_BUF_INIT;
        esmd_buf_puts(&out, "prefix:"); /* encode appends */
        esmd_redis_encode_batch(&src, &batch, trec_entry, &out);
        const char *ev = esmd_buf_cstr(&out) + 7;
        assert_int_equal(out.len - 7, esmd_batch_bytes(&batch));
        assert_int_equal(strlen(ev), esmd_batch_bytes(&batch)); /* no NUL inside */
        cJSON *root = cJSON_ParseWithLength(ev, out.len - 7);
        if (!root)
            fail_msg("iteration %d: not JSON: %s", iter, ev);
        const cJSON *records = cJSON_GetObjectItemCaseSensitive(root, "Records");
        assert_int_equal(cJSON_GetArraySize(records), (int)nrec);
        /* every field is in one of the two forms */
        for (size_t r = 0; r < nrec; r++) {
            const cJSON *o = cJSON_GetArrayItem(records, (int)r);
            const cJSON *rr = cJSON_GetObjectItemCaseSensitive(o, "redis");
            assert_string_equal(cJSON_GetObjectItemCaseSensitive(rr, "stream")->valuestring,
                                stream);
            assert_int_equal(
                cJSON_GetArraySize(cJSON_GetObjectItemCaseSensitive(rr, "fields")) +
                    cJSON_GetArraySize(cJSON_GetObjectItemCaseSensitive(rr, "binaryFields")),
                (int)recs[r]->e.nfields);
        }
        cJSON_Delete(root);
        esmd_buf_free(&out);
        esmd_batch_clear(&batch);
        esmd_redis_source_free(&src);
        for (size_t r = 0; r < nrec; r++)
            free(recs[r]);
        free(recs);
        free(bytes);
    }
}

static void test_sizes(void **state)
{
    assert_int_equal(esmd_redis_envelope_size(), strlen("{\"Records\":[]}"));
    struct esmd_redis_source src;
    source_for(&src, "redis://localhost", "s");
    struct esmd_batch batch;
    batch_init(&batch);
    struct esmd_buf out = ESMD_BUF_INIT;
    esmd_redis_encode_batch(&src, &batch, trec_entry, &out);
    assert_string_equal(esmd_buf_cstr(&out), "{\"Records\":[]}");
    esmd_buf_reset(&out);

    /* the largest IDs, no fields */
    struct trec *t = trec_new(UINT64_MAX, UINT64_MAX, INT64_MAX);
    esmd_redis_record_write(&out, &src, &t->e);
    assert_int_equal(out.len, esmd_redis_record_size(&src, &t->e));
    const char *s = esmd_buf_cstr(&out);
    assert_non_null(strstr(s, "\"sequenceNumber\":\"18446744073709551615-18446744073709551615\""));
    assert_non_null(strstr(s, "\"approximateArrivalTimestamp\":18446744073709551.615,"));
    assert_non_null(strstr(s, "\"deliveryCount\":9223372036854775807,\"fields\":{}},"));
    assert_null(strstr(s, "binaryFields"));
    esmd_buf_reset(&out);
    free(t);

    /* arrival under a second: 0.00N */
    t = trec_new(7, 0, 1);
    FIELD(t, "x", "");
    esmd_redis_record_write(&out, &src, &t->e);
    assert_non_null(strstr(esmd_buf_cstr(&out), "\"approximateArrivalTimestamp\":0.007,"));
    assert_int_equal(out.len, esmd_redis_record_size(&src, &t->e));
    free(t);
    esmd_buf_free(&out);
    esmd_batch_clear(&batch);
    esmd_redis_source_free(&src);
}

/* ---- what filters see ---- */

static void check_filter_doc(const struct esmd_redis_source *src, struct trec *t,
                             const char *golden)
{
    struct esmd_buf b = ESMD_BUF_INIT;
    assert_int_equal(esmd_redis_filter_doc(src, &t->e, &b), ESMD_FILTER_DATA_JSON);
    assert_string_equal(esmd_buf_cstr(&b), golden);
    cJSON *j = cJSON_ParseWithLength(b.data, b.len);
    assert_non_null(j);
    cJSON_Delete(j);
    esmd_buf_free(&b);
}

static void test_filter_doc(void **state)
{
    struct esmd_redis_source src;
    source_for(&src, "redis://localhost", "orders");
    struct trec *t = trec_new(1545084650987ULL, 3, 2);
    FIELD(t, "type", "created");
    FIELD(t, "order", "{\"id\":1,\"tags\":[\"a\"]}");
    FIELD(t, "n", " 42 ");
    FIELD(t, "flag", "true");
    FIELD(t, "text", "plain \"text\"");
    FIELD(t, "bin", "\xff\x00");
    FIELD(t, "\xc3", "name not UTF-8");
    FIELD(t, "type", "again");
    check_filter_doc(&src, t,
                     "{\"stream\":\"orders\",\"sequenceNumber\":\"1545084650987-3\","
                     "\"approximateArrivalTimestamp\":1545084650.987,\"fields\":{"
                     "\"type\":\"created\",\"order\":{\"id\":1,\"tags\":[\"a\"]},\"n\": 42 ,"
                     "\"flag\":true,\"text\":\"plain \\\"text\\\"\",\"type\":\"again\"}}");
    free(t);

    /* no text field at all: an empty object */
    t = trec_new(1, 0, 1);
    FIELD(t, "b", "\x80");
    check_filter_doc(&src, t,
                     "{\"stream\":\"orders\",\"sequenceNumber\":\"1-0\","
                     "\"approximateArrivalTimestamp\":0.001,\"fields\":{}}");
    free(t);
    esmd_redis_source_free(&src);
}

/* ---- the kinesis format ---- */

static void kinesis_source(struct esmd_redis_source *src, const char *stream,
                           const char *data_field, const char *pkey_field)
{
    struct esmd_redis_format_opts fmt = {ESMD_REDIS_FORMAT_KINESIS, data_field, pkey_field};
    char *arn = esmd_redis_kinesis_arn(stream);
    esmd_redis_source_init(src, stream, arn, &fmt);
    free(arn);
}

static char *record_of(const struct esmd_redis_source *src, const struct trec *t)
{
    struct esmd_buf b = ESMD_BUF_INIT;
    esmd_redis_record_write(&b, src, &t->e);
    assert_int_equal(b.len, esmd_redis_record_size(src, &t->e));
    esmd_buf_cstr(&b);
    return esmd_buf_steal(&b, NULL);
}

/* data_field and partition_key_field: the exact record, every byte written by hand. */
static void test_kinesis_exact(void **state)
{
    struct esmd_redis_source src;
    kinesis_source(&src, "orders", "payload", "tenant");
    struct trec *t = trec_new(1700000000123ULL, 0, 4);
    FIELD(t, "tenant", "acme");
    FIELD(t, "payload", "{\"id\":1}");
    FIELD(t, "payload", "second"); /* the first one is the data */
    char *got = record_of(&src, t);
    assert_string_equal(
        got, "{\"kinesis\":{\"kinesisSchemaVersion\":\"1.0\",\"partitionKey\":\"acme\","
             "\"sequenceNumber\":\"1700000000123-0\",\"data\":\"eyJpZCI6MX0=\","
             "\"approximateArrivalTimestamp\":1700000000.123},\"eventSource\":\"aws:kinesis\","
             "\"eventVersion\":\"1.0\",\"eventID\":\"shardId-000000000000:1700000000123-0\","
             "\"eventName\":\"aws:kinesis:record\","
             "\"invokeIdentityArn\":\"arn:aws:iam::000000000000:role/esmd\","
             "\"awsRegion\":\"us-east-1\","
             "\"eventSourceARN\":\"arn:aws:kinesis:us-east-1:000000000000:stream/orders\"}");
    free(got);
    free(t);

    /* without the fields: every field as JSON, the entry ID as partitionKey */
    t = trec_new(5, 1, 1);
    FIELD(t, "a", "1");
    got = record_of(&src, t);
    assert_non_null(strstr(got,
                           "\"partitionKey\":\"5-1\",\"sequenceNumber\":\"5-1\","
                           "\"data\":\"eyJhIjoiMSJ9\",\"approximateArrivalTimestamp\":0.005}"));
    free(got);
    free(t);

    /* a partition key that is not UTF-8 is not one: the entry ID */
    t = trec_new(5, 2, 1);
    FIELD(t, "tenant", "\xff");
    got = record_of(&src, t);
    assert_non_null(strstr(got, "\"partitionKey\":\"5-2\""));
    free(got);
    free(t);
    esmd_redis_source_free(&src);
}

/* The record has exactly the members of Lambda's Kinesis record (spec example, docs/redis.md),
 * with the configured region and account in its ARNs. */
static void test_kinesis_spec_shape(void **state)
{
    static const char spec[] =
        "{\"kinesis\":{\"kinesisSchemaVersion\":\"1.0\",\"partitionKey\":\"1\","
        "\"sequenceNumber\":\"49590338271490256608559692538361571095921575989136588898\","
        "\"data\":\"SGVsbG8sIHRoaXMgaXMgYSB0ZXN0Lg==\","
        "\"approximateArrivalTimestamp\":1545084650.987},\"eventSource\":\"aws:kinesis\","
        "\"eventVersion\":\"1.0\",\"eventID\":\"shardId-000000000006:"
        "49590338271490256608559692538361571095921575989136588898\","
        "\"eventName\":\"aws:kinesis:record\","
        "\"invokeIdentityArn\":\"arn:aws:iam::123456789012:role/lambda-role\","
        "\"awsRegion\":\"us-east-2\","
        "\"eventSourceARN\":\"arn:aws:kinesis:us-east-2:123456789012:stream/lambda-stream\"}";
    esmd_aws_set("us-east-2", "123456789012");
    struct esmd_redis_source src;
    kinesis_source(&src, "lambda-stream", "d", "pk");
    struct trec *t = trec_new(1545084650987ULL, 0, 1);
    FIELD(t, "pk", "1");
    FIELD(t, "d", "Hello, this is a test.");
    char *got = record_of(&src, t);
    cJSON *g = cJSON_Parse(got), *w = cJSON_Parse(spec);
    assert_non_null(g);
    assert_non_null(w);
    const cJSON *a, *b;
    assert_int_equal(cJSON_GetArraySize(g), cJSON_GetArraySize(w));
    cJSON_ArrayForEach(b, w)
    {
        a = cJSON_GetObjectItemCaseSensitive(g, b->string);
        if (!a)
            fail_msg("member %s missing", b->string);
        assert_int_equal(a->type, b->type);
    }
    const cJSON *gk = cJSON_GetObjectItemCaseSensitive(g, "kinesis");
    const cJSON *wk = cJSON_GetObjectItemCaseSensitive(w, "kinesis");
    assert_int_equal(cJSON_GetArraySize(gk), cJSON_GetArraySize(wk));
    cJSON_ArrayForEach(b, wk)
    {
        a = cJSON_GetObjectItemCaseSensitive(gk, b->string);
        if (!a)
            fail_msg("kinesis.%s missing", b->string);
        assert_int_equal(a->type, b->type);
        if (strcmp(b->string, "sequenceNumber") != 0) { /* the entry ID, not Kinesis's */
            char *x = cJSON_PrintUnformatted(a), *y = cJSON_PrintUnformatted(b);
            assert_string_equal(x, y);
            free(x);
            free(y);
        }
    }
    static const char *const same[] = {"eventSource", "eventVersion", "eventName", "awsRegion",
                                       "eventSourceARN"};
    for (size_t i = 0; i < ESMD_ARRAY_LEN(same); i++)
        assert_string_equal(cJSON_GetObjectItemCaseSensitive(g, same[i])->valuestring,
                            cJSON_GetObjectItemCaseSensitive(w, same[i])->valuestring);
    assert_string_equal(cJSON_GetObjectItemCaseSensitive(g, "invokeIdentityArn")->valuestring,
                        "arn:aws:iam::123456789012:role/esmd");
    assert_string_equal(cJSON_GetObjectItemCaseSensitive(g, "eventID")->valuestring,
                        "shardId-000000000000:1545084650987-0");
    cJSON_Delete(g);
    cJSON_Delete(w);
    free(got);
    free(t);
    esmd_redis_source_free(&src);
    esmd_aws_set(ESMD_DEFAULT_REGION, ESMD_DEFAULT_ACCOUNT);
}

static cJSON *decoded_data(const cJSON *record, struct esmd_buf *raw)
{
    const cJSON *k = cJSON_GetObjectItemCaseSensitive(record, "kinesis");
    const cJSON *d = cJSON_GetObjectItemCaseSensitive(k, "data");
    assert_true(cJSON_IsString(d));
    esmd_buf_reset(raw);
    assert_int_equal(esmd_base64_decode(d->valuestring, strlen(d->valuestring), raw), ESMD_OK);
    return cJSON_ParseWithLength(raw->data ? raw->data : "", raw->len);
}

/* Without data_field the data is a JSON object of the fields: one member per name, in entry
 * order, a repeated name with the array of its values. */
static void test_kinesis_fields_object(void **state)
{
    struct esmd_redis_source src;
    kinesis_source(&src, "jobs", NULL, NULL);
    struct trec *t = trec_new(1700000000124ULL, 7, 3);
    FIELD(t, "k", "1");
    FIELD(t, "type", "x");
    FIELD(t, "k", "2");
    FIELD(t, "k", "3");
    FIELD(t, "payload", "{\"id\":1}");
    FIELD(t, "bin", "\xff"); /* not UTF-8: U+FFFD */
    char *got = record_of(&src, t);
    cJSON *rec = cJSON_Parse(got);
    struct esmd_buf raw = ESMD_BUF_INIT;
    cJSON *data = decoded_data(rec, &raw);
    assert_non_null(data);
    esmd_buf_cstr(&raw);
    assert_string_equal(raw.data, "{\"k\":[\"1\",\"2\",\"3\"],\"type\":\"x\",\"payload\":"
                                  "\"{\\\"id\\\":1}\",\"bin\":\"\xef\xbf\xbd\"}");
    cJSON_Delete(data);
    cJSON_Delete(rec);
    free(got);
    free(t);

    /* no field: {} */
    t = trec_new(1, 0, 1);
    got = record_of(&src, t);
    assert_non_null(strstr(got, "\"data\":\"e30=\""));
    free(got);
    free(t);
    esmd_buf_free(&raw);
    esmd_redis_source_free(&src);
}

static void test_kinesis_exact_size_random(void **state)
{
    static const char *const names[] = {"a", "data", "pk", "\xc3\xbc", "k\"q"};
    for (int iter = 0; iter < 300; iter++) {
        struct esmd_redis_source src;
        const char *df =
            esmd_test_rand_n(2) ? names[esmd_test_rand_n(ESMD_ARRAY_LEN(names))] : NULL;
        const char *pf =
            esmd_test_rand_n(2) ? names[esmd_test_rand_n(ESMD_ARRAY_LEN(names))] : NULL;
        kinesis_source(&src, esmd_test_rand_n(2) ? "orders" : "t\"q\xc3\xbc", df, pf);
        struct esmd_shard shard = {.key = "k"};
        struct esmd_batch batch;
        batch_init(&batch);
        size_t nrec = 1 + esmd_test_rand_n(30);
        struct trec **recs = calloc(nrec, sizeof(*recs));
        char(*bytes)[8][64] = calloc(nrec, sizeof(*bytes));
        for (size_t r = 0; r < nrec; r++) {
            uint64_t ms = esmd_test_rand_n(4) == 0 ? esmd_test_rand()
                                                   : (uint64_t)esmd_test_rand_n(2000000000000ULL);
            recs[r] = trec_new(
                ms, esmd_test_rand_n(3) == 0 ? esmd_test_rand() : esmd_test_rand_n(100), 1);
            size_t nf = esmd_test_rand_n(8);
            for (size_t f = 0; f < nf; f++) {
                const char *name = names[esmd_test_rand_n(ESMD_ARRAY_LEN(names))];
                size_t vlen = esmd_test_rand_n(64);
                rnd_bytes(bytes[r][f], vlen, esmd_test_rand_n(4) != 0);
                trec_field(recs[r], name, strlen(name), bytes[r][f], vlen);
            }
            char *one = record_of(&src, recs[r]); /* asserts write == size */
            free(one);
            trec_add(&batch, &src, recs[r], &shard);
        }
        struct esmd_buf out = ESMD_BUF_INIT;
        esmd_redis_encode_batch(&src, &batch, trec_entry, &out);
        assert_int_equal(out.len, esmd_batch_bytes(&batch));
        cJSON *root = cJSON_ParseWithLength(out.data, out.len);
        if (!root)
            fail_msg("iteration %d: not JSON: %s", iter, esmd_buf_cstr(&out));
        const cJSON *records = cJSON_GetObjectItemCaseSensitive(root, "Records");
        assert_int_equal(cJSON_GetArraySize(records), (int)nrec);
        struct esmd_buf raw = ESMD_BUF_INIT, want = ESMD_BUF_INIT;
        for (size_t r = 0; r < nrec; r++) {
            const cJSON *o = cJSON_GetArrayItem(records, (int)r);
            cJSON *data = decoded_data(o, &raw);
            esmd_buf_reset(&want);
            esmd_redis_kinesis_data(&src, &recs[r]->e, &want);
            assert_int_equal(raw.len, want.len);
            if (want.len)
                assert_memory_equal(raw.data, want.data, want.len);
            /* the data is the data field's value as it is, or a JSON object */
            const struct esmd_redis_field *f = NULL;
            for (size_t i = 0; df && i < recs[r]->e.nfields && !f; i++)
                if (recs[r]->f[i].name_len == strlen(df) &&
                    !memcmp(recs[r]->f[i].name, df, strlen(df)))
                    f = &recs[r]->f[i];
            if (f) {
                assert_int_equal(raw.len, f->value_len);
                if (f->value_len)
                    assert_memory_equal(raw.data, f->value, f->value_len);
            } else {
                assert_true(cJSON_IsObject(data));
            }
            cJSON_Delete(data);
            char id[ESMD_REDIS_ID_MAX];
            esmd_redis_id_format(recs[r]->e.id, id);
            const cJSON *k = cJSON_GetObjectItemCaseSensitive(o, "kinesis");
            assert_string_equal(cJSON_GetObjectItemCaseSensitive(k, "sequenceNumber")->valuestring,
                                id);
            assert_true(esmd_redis_item_is(recs[r]->e.id,
                                           cJSON_GetObjectItemCaseSensitive(k, "sequenceNumber")));
        }
        esmd_buf_free(&raw);
        esmd_buf_free(&want);
        cJSON_Delete(root);
        esmd_buf_free(&out);
        esmd_batch_clear(&batch);
        esmd_redis_source_free(&src);
        for (size_t r = 0; r < nrec; r++)
            free(recs[r]);
        free(recs);
        free(bytes);
    }
}

static void check_kinesis_doc(const struct esmd_redis_source *src, struct trec *t,
                              enum esmd_filter_data want, const char *golden)
{
    struct esmd_buf b = ESMD_BUF_INIT;
    assert_int_equal(esmd_redis_filter_doc(src, &t->e, &b), want);
    assert_string_equal(esmd_buf_cstr(&b), golden);
    cJSON *j = cJSON_ParseWithLength(b.data, b.len);
    assert_non_null(j);
    cJSON_Delete(j);
    esmd_buf_free(&b);
}

#define KDOC(pk, id, ts, data)                                                                     \
    "{\"kinesisSchemaVersion\":\"1.0\",\"partitionKey\":\"" pk "\",\"sequenceNumber\":\"" id       \
    "\",\"approximateArrivalTimestamp\":" ts data                                                  \
    ",\"eventSourceARN\":\"arn:aws:kinesis:us-east-1:000000000000:stream/s\","                     \
    "\"awsRegion\":\"us-east-1\"}"

/* Kinesis's rule: patterns see data decoded, JSON embedded as JSON. */
static void test_kinesis_filter_doc(void **state)
{
    struct esmd_redis_source all, one;
    kinesis_source(&all, "s", NULL, NULL);
    kinesis_source(&one, "s", "d", "p");
    struct trec *t = trec_new(1545084650987ULL, 3, 2);
    FIELD(t, "p", "tenant-1");
    FIELD(t, "d", " {\"id\":1} ");
    FIELD(t, "n", "42");
    /* every field: the object the function decodes (values are strings) */
    check_kinesis_doc(
        &all, t, ESMD_FILTER_DATA_JSON,
        KDOC("1545084650987-3", "1545084650987-3", "1545084650.987",
             ",\"data\":{\"p\":\"tenant-1\",\"d\":\" {\\\"id\\\":1} \",\"n\":\"42\"}"));
    /* the data field's JSON, embedded */
    check_kinesis_doc(
        &one, t, ESMD_FILTER_DATA_JSON,
        KDOC("tenant-1", "1545084650987-3", "1545084650.987", ",\"data\": {\"id\":1} "));
    free(t);
    t = trec_new(1, 0, 1);
    FIELD(t, "d", "42");
    check_kinesis_doc(&one, t, ESMD_FILTER_DATA_TEXT, KDOC("1-0", "1-0", "0.001", ",\"data\":42"));
    free(t);
    t = trec_new(1, 1, 1);
    FIELD(t, "d", "plain \"text\"");
    check_kinesis_doc(&one, t, ESMD_FILTER_DATA_TEXT,
                      KDOC("1-1", "1-1", "0.001", ",\"data\":\"plain \\\"text\\\"\""));
    free(t);
    t = trec_new(1, 2, 1);
    FIELD(t, "d", "\xff\x00"); /* not UTF-8: no data */
    check_kinesis_doc(&one, t, ESMD_FILTER_DATA_NONE, KDOC("1-2", "1-2", "0.001", ""));
    free(t);
    esmd_redis_source_free(&all);
    esmd_redis_source_free(&one);
}

/* ---- IDs ---- */

static void test_ids(void **state)
{
    struct esmd_redis_id id;
    char buf[ESMD_REDIS_ID_MAX];
    assert_int_equal(esmd_redis_id_parse("0-0", 3, &id), ESMD_OK);
    assert_true(id.ms == 0 && id.seq == 0);
    const char *max = "18446744073709551615-18446744073709551615";
    assert_int_equal(esmd_redis_id_parse(max, strlen(max), &id), ESMD_OK);
    assert_true(id.ms == UINT64_MAX && id.seq == UINT64_MAX);
    assert_int_equal(esmd_redis_id_format(id, buf), strlen(max));
    assert_string_equal(buf, max);
    assert_int_equal(esmd_redis_id_parse("1526919030474-55", 16, &id), ESMD_OK);
    assert_true(id.ms == 1526919030474ULL && id.seq == 55);
    assert_int_equal(esmd_redis_id_format(id, buf), 16);
    assert_string_equal(buf, "1526919030474-55");
    static const char *const bad[] = {"",
                                      "1",
                                      "1-",
                                      "-1",
                                      "a-1",
                                      "1-a",
                                      "1-1 ",
                                      " 1-1",
                                      "1--1",
                                      "1-1-1",
                                      "+1-1",
                                      "18446744073709551616-0",
                                      "0-18446744073709551616"};
    for (size_t i = 0; i < ESMD_ARRAY_LEN(bad); i++)
        if (esmd_redis_id_parse(bad[i], strlen(bad[i]), &id) == ESMD_OK)
            fail_msg("\"%s\" parsed", bad[i]);
    /* only n bytes are read */
    assert_int_equal(esmd_redis_id_parse("12-34xyz", 5, &id), ESMD_OK);
    assert_true(id.ms == 12 && id.seq == 34);
    struct esmd_redis_id a = {1, 2}, b = {1, 3}, c = {2, 0};
    assert_true(esmd_redis_id_cmp(a, b) < 0);
    assert_true(esmd_redis_id_cmp(b, a) > 0);
    assert_true(esmd_redis_id_cmp(b, c) < 0);
    assert_true(esmd_redis_id_cmp(c, c) == 0);
}

/* ---- the ID set ---- */

static void test_idset(void **state)
{
    /* against a plain array, through growth and many removals (backward shifts) */
    struct esmd_redis_idset set = {0};
    enum { N = 20000 };
    static struct esmd_redis_id ids[N];
    static bool in[N];
    for (size_t i = 0; i < N; i++) {
        /* clustered IDs, as a stream's are, and some far apart */
        ids[i] = (struct esmd_redis_id){1700000000000ULL + i / 7, i % 7};
        if (i % 97 == 0)
            ids[i] = (struct esmd_redis_id){esmd_test_rand(), esmd_test_rand()};
    }
    assert_false(esmd_redis_idset_has(&set, ids[0]));
    esmd_redis_idset_remove(&set, ids[0]); /* on an empty set */
    for (int round = 0; round < 200000; round++) {
        size_t i = esmd_test_rand_n(N);
        if (esmd_test_rand_n(3) == 0) {
            esmd_redis_idset_remove(&set, ids[i]);
            in[i] = false;
        } else {
            esmd_redis_idset_insert(&set, ids[i]);
            in[i] = true;
        }
        if (round % 1000 == 0) {
            size_t n = 0;
            for (size_t k = 0; k < N; k++) {
                if (esmd_redis_idset_has(&set, ids[k]) != in[k])
                    fail_msg("round %d: id %zu %s", round, k, in[k] ? "lost" : "phantom");
                n += in[k];
            }
            assert_int_equal(set.n, n);
        }
    }
    /* empty it: nothing left behind */
    for (size_t k = 0; k < N; k++)
        esmd_redis_idset_remove(&set, ids[k]);
    assert_int_equal(set.n, 0);
    for (size_t k = 0; k < set.cap; k++)
        assert_false(set.used[k]);
    esmd_redis_idset_free(&set);
    esmd_redis_idset_free(&set); /* twice is fine */
}

/* ---- failure handling ---- */

static void test_failure_info(void **state)
{
    struct esmd_redis_source src;
    source_for(&src, "redis://127.0.0.1:6379/0", "orders");
    struct esmd_buf b = ESMD_BUF_INIT;
    esmd_redis_failure_info(&src, "g\"1", (struct esmd_redis_id){1700000000123ULL, 4}, 312, &b);
    assert_string_equal(esmd_buf_cstr(&b),
                        "{\"batchSize\":1,\"payloadSize\":312,\"stream\":\"orders\",\"group\":"
                        "\"g\\\"1\",\"startSequenceNumber\":\"1700000000123-4\","
                        "\"endSequenceNumber\":\"1700000000123-4\","
                        "\"approximateArrivalOfFirstRecord\":\"2023-11-14T22:13:20.123Z\","
                        "\"approximateArrivalOfLastRecord\":\"2023-11-14T22:13:20.123Z\","
                        "\"streamArn\":\"arn:esmd:redis:127.0.0.1:6379/0:stream/orders\"}");
    esmd_buf_reset(&b);
    /* an ID whose time no ISO-8601 date can hold */
    esmd_redis_failure_info(&src, "g", (struct esmd_redis_id){UINT64_MAX, 0}, 0, &b);
    assert_non_null(strstr(esmd_buf_cstr(&b), "\"approximateArrivalOfFirstRecord\":null,"));
    cJSON *j = cJSON_ParseWithLength(b.data, b.len);
    assert_non_null(j);
    cJSON_Delete(j);
    esmd_buf_free(&b);
    esmd_redis_source_free(&src);
}

static void test_item_is(void **state)
{
    struct esmd_redis_id id = {1700000000123ULL, 4};
    static const struct {
        const char *json;
        bool want;
    } cases[] = {
        {"\"1700000000123-4\"", true},
        {"\"1700000000123-5\"", false},
        {"\"1700000000123\"", false},
        {"\"\"", false},
        {"1700000000123", false},
        {"null", false},
        {"{\"id\":\"1700000000123-4\"}", false},
    };
    for (size_t i = 0; i < ESMD_ARRAY_LEN(cases); i++) {
        cJSON *j = cJSON_Parse(cases[i].json);
        assert_non_null(j);
        if (esmd_redis_item_is(id, j) != cases[i].want)
            fail_msg("%s: expected %s", cases[i].json, cases[i].want ? "true" : "false");
        cJSON_Delete(j);
    }
    assert_false(esmd_redis_item_is(id, NULL));
}

/* ---- URLs and the ARN ---- */

/* The URL parser's own tests: tests/unit/test_redis_link.c. */
static void check_arn(const char *url, const char *arn)
{
    struct esmd_redis_url u;
    char err[200] = "";
    if (esmd_redis_url_parse(url, &u, err, sizeof(err)) != ESMD_OK)
        fail_msg("%s: %s", url, err);
    char *a = esmd_redis_arn(&u, "jobs");
    assert_string_equal(a, arn);
    free(a);
    esmd_redis_url_free(&u);
}

static void test_urls(void **state)
{
    check_arn("redis://localhost", "arn:esmd:redis:localhost:6379/0:stream/jobs");
    check_arn("redis://localhost/", "arn:esmd:redis:localhost:6379/0:stream/jobs");
    check_arn("redis://127.0.0.1:7000/3", "arn:esmd:redis:127.0.0.1:7000/3:stream/jobs");
    check_arn("redis://:s3cret@redis.example:6380/1",
              "arn:esmd:redis:redis.example:6380/1:stream/jobs");
    check_arn("redis://app:p%40ss%3Aword@h/0", "arn:esmd:redis:h:6379/0:stream/jobs");
    check_arn("redis://[::1]:6390/2", "arn:esmd:redis:[::1]:6390/2:stream/jobs");
    check_arn("redis://[::1]", "arn:esmd:redis:[::1]:6379/0:stream/jobs");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_two_entries_golden),
        cmocka_unit_test(test_escaped_stream_golden),
        cmocka_unit_test(test_round_trip),
        cmocka_unit_test(test_exact_size_random),
        cmocka_unit_test(test_sizes),
        cmocka_unit_test(test_filter_doc),
        cmocka_unit_test(test_ids),
        cmocka_unit_test(test_urls),
        cmocka_unit_test(test_encode_written_matches),
        cmocka_unit_test(test_idset),
        cmocka_unit_test(test_failure_info),
        cmocka_unit_test(test_item_is),
        cmocka_unit_test(test_kinesis_exact),
        cmocka_unit_test(test_kinesis_spec_shape),
        cmocka_unit_test(test_kinesis_fields_object),
        cmocka_unit_test(test_kinesis_exact_size_random),
        cmocka_unit_test(test_kinesis_filter_doc),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
