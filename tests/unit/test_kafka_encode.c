/* The Kafka event encoder: golden events, the exact-size contract, and a JSON round trip.
 *
 * Records are built by hand as esmd_kafka_view (the encoder never sees a librdkafka message).
 * Golden files in tests/unit/data/kafka/ were written independently of this encoder (Python's
 * json and base64); spec_example.json is the event of docs/lambda.md#kafka-event, compact. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "testutil.h"

#include "../../src/batch_private.h" /* shards on the stack, as the core makes them */
#include "../../connectors/kafka/kafka_private.h"

#include <cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* A hand-built record: the core's record plus the view the encoder reads. */
struct trec {
    struct esmd_record rec;
    struct esmd_kafka_view v;
    rd_kafka_headers_t *hdrs; /* owned */
    void *key, *value;        /* owned copies */
};

static void trec_view(const struct esmd_record *rec, struct esmd_kafka_view *v)
{
    *v = ((const struct trec *)rec)->v;
}

static void *dup_bytes(const void *p, size_t n)
{
    if (!p)
        return NULL;
    void *d = malloc(n ? n : 1);
    memcpy(d, p, n);
    return d;
}

static struct trec *trec_new(const char *topic, int32_t partition, int64_t offset, int64_t ts,
                             rd_kafka_timestamp_type_t tstype, const void *key, size_t klen,
                             const void *value, size_t vlen)
{
    struct trec *t = calloc(1, sizeof(*t));
    t->key = dup_bytes(key, klen);
    t->value = dup_bytes(value, vlen);
    t->v = (struct esmd_kafka_view){
        .topic = topic,
        .partition = partition,
        .offset = offset,
        .timestamp = ts,
        .tstype = tstype,
        .key = t->key,
        .key_len = klen,
        .value = t->value,
        .value_len = vlen,
    };
    t->rec.seq = offset;
    return t;
}

/* value NULL = a header with a null value. */
static void trec_header(struct trec *t, const char *name, const void *value, size_t size)
{
    if (!t->hdrs)
        t->hdrs = rd_kafka_headers_new(4);
    rd_kafka_header_add(t->hdrs, name, -1, value, value ? (ssize_t)size : 0);
    t->v.headers = t->hdrs;
}

static void trec_add(struct esmd_batch *batch, struct trec *t, struct esmd_shard *shard)
{
    t->rec.size = esmd_kafka_record_size(&t->v);
    t->rec.shard = shard;
    assert_int_equal(esmd_batch_check(batch, &t->rec), ESMD_BATCH_FITS);
    esmd_batch_add(batch, &t->rec);
}

static void trec_free(struct trec *t)
{
    if (t->hdrs)
        rd_kafka_headers_destroy(t->hdrs);
    free(t->key);
    free(t->value);
    free(t);
}

static void shard_init(struct esmd_shard *shard, const char *key)
{
    memset(shard, 0, sizeof(*shard));
    shard->key = (char *)key;
    shard->overhead = esmd_kafka_group_overhead(key);
}

static void batch_init(struct esmd_batch *batch, const char *servers)
{
    struct esmd_batch_limits lim = {
        .batch_size = 10000,
        .max_bytes = ESMD_MAX_PAYLOAD,
        .envelope = esmd_kafka_envelope_size(servers),
        .group_by_shard = true,
    };
    esmd_batch_init(batch, &lim);
}

static void assert_golden(const char *name, const struct esmd_batch *batch, const char *servers)
{
    struct esmd_buf out = ESMD_BUF_INIT;
    esmd_kafka_encode_batch(servers, batch, trec_view, &out);
    const char *got = esmd_buf_cstr(&out);
    assert_int_equal(out.len, esmd_batch_bytes(batch));
    assert_int_equal(strlen(got), esmd_batch_bytes(batch));
    esmd_test_assert_golden("kafka", name, got, out.len);
    esmd_buf_free(&out);
}

/* ---- golden events ---- */

static void test_spec_example(void **state)
{
    const char *servers = "b-1.example:9092,b-2.example:9092";
    struct esmd_shard s0;
    shard_init(&s0, "mytopic-0");
    struct esmd_batch batch;
    batch_init(&batch, servers);
    struct trec *t = trec_new("mytopic", 0, 15, 1545084650987LL, RD_KAFKA_TIMESTAMP_CREATE_TIME,
                              "recordKey", 9, "Hello, this is a test.", 22);
    trec_header(t, "headerKey", "headerValue", 11);
    trec_add(&batch, t, &s0);
    assert_golden("spec_example.json", &batch, servers);
    esmd_batch_clear(&batch);
    trec_free(t);
}

struct two_partitions {
    struct esmd_shard s0, s1;
    struct esmd_batch batch;
    struct trec *r[3];
};

static const char two_servers[] = "localhost:9092,kafka-2:9093";
static const unsigned char binary_value[] = {0x00, 0xff, 0x10, 0x80, 0x7f};
static const char json_value[] = "{\"type\":\"order_created\",\"id\":1}";

static void two_partitions_build(struct two_partitions *tp)
{
    shard_init(&tp->s0, "orders-0");
    shard_init(&tp->s1, "orders-1");
    batch_init(&tp->batch, two_servers);
    struct trec *r1 = trec_new("orders", 0, 41, 1700000000000LL, RD_KAFKA_TIMESTAMP_CREATE_TIME,
                               "order-1", 7, json_value, strlen(json_value));
    trec_header(r1, "trace-id", "abc", 3);
    trec_header(r1, "lang", "\xc3\xab", 2); /* "ë" */
    trec_header(r1, "k", "1", 1);
    trec_header(r1, "k", "2", 1); /* repeated name: kept, in order */
    struct trec *r2 = trec_new("orders", 0, 42, 1700000000001LL, RD_KAFKA_TIMESTAMP_LOG_APPEND_TIME,
                               NULL, 0, binary_value, sizeof(binary_value));
    struct trec *r3 = trec_new("orders", 1, 7, -1, RD_KAFKA_TIMESTAMP_NOT_AVAILABLE, "", 0, NULL,
                               0); /* empty key, tombstone */
    trec_header(r3, "empty", "", 0);
    trec_header(r3, "nullval", NULL, 0);
    trec_header(r3, "q\"\\", "\x80", 1);
    /* interleaved arrival: groups keep the order of their first record */
    trec_add(&tp->batch, r1, &tp->s0);
    trec_add(&tp->batch, r3, &tp->s1);
    trec_add(&tp->batch, r2, &tp->s0);
    tp->r[0] = r1;
    tp->r[1] = r2;
    tp->r[2] = r3;
}

static void two_partitions_free(struct two_partitions *tp)
{
    esmd_batch_clear(&tp->batch);
    for (int i = 0; i < 3; i++)
        trec_free(tp->r[i]);
}

static void test_two_partitions_golden(void **state)
{
    struct two_partitions tp;
    two_partitions_build(&tp);
    assert_golden("two_partitions.json", &tp.batch, two_servers);
    two_partitions_free(&tp);
}

/* ---- the event parses back to the inputs ---- */

static void assert_b64(const cJSON *item, const void *want, size_t len)
{
    if (!want) {
        assert_true(cJSON_IsNull(item));
        return;
    }
    assert_true(cJSON_IsString(item));
    struct esmd_buf dec = ESMD_BUF_INIT;
    assert_int_equal(esmd_base64_decode(item->valuestring, strlen(item->valuestring), &dec),
                     ESMD_OK);
    assert_int_equal(dec.len, len);
    if (len)
        assert_memory_equal(dec.data, want, len);
    esmd_buf_free(&dec);
}

static void assert_record(const cJSON *o, const struct trec *t)
{
    const struct esmd_kafka_view *v = &t->v;
    assert_string_equal(cJSON_GetObjectItemCaseSensitive(o, "topic")->valuestring, v->topic);
    assert_int_equal(cJSON_GetObjectItemCaseSensitive(o, "partition")->valuedouble, v->partition);
    assert_int_equal(cJSON_GetObjectItemCaseSensitive(o, "offset")->valuedouble, v->offset);
    assert_true(cJSON_GetObjectItemCaseSensitive(o, "timestamp")->valuedouble ==
                (double)v->timestamp);
    const cJSON *key = cJSON_GetObjectItemCaseSensitive(o, "key");
    if (v->key)
        assert_b64(key, v->key, v->key_len);
    else
        assert_null(key); /* a null key is left out, as Lambda does */
    assert_b64(cJSON_GetObjectItemCaseSensitive(o, "value"), v->value, v->value_len);
    const cJSON *headers = cJSON_GetObjectItemCaseSensitive(o, "headers");
    assert_true(cJSON_IsArray(headers));
    size_t i = 0;
    const cJSON *h;
    cJSON_ArrayForEach(h, headers)
    {
        const char *name;
        const void *value;
        size_t size;
        assert_int_equal(rd_kafka_header_get_all(v->headers, i, &name, &value, &size), 0);
        assert_int_equal(cJSON_GetArraySize(h), 1); /* one-key objects */
        const cJSON *val = h->child;
        assert_string_equal(val->string, name);
        if (!value) {
            assert_true(cJSON_IsNull(val));
        } else {
            assert_int_equal(cJSON_GetArraySize(val), (int)size);
            const unsigned char *b = value;
            size_t j = 0;
            const cJSON *n;
            cJSON_ArrayForEach(n, val)
            {
                assert_true(n->valuedouble >= -128 && n->valuedouble <= 127);
                assert_int_equal((unsigned char)(signed char)n->valueint, b[j]);
                j++;
            }
        }
        i++;
    }
    size_t want = 0;
    const char *name;
    const void *value;
    size_t size;
    while (v->headers && rd_kafka_header_get_all(v->headers, want, &name, &value, &size) == 0)
        want++;
    assert_int_equal(i, want);
}

static void test_round_trip(void **state)
{
    struct two_partitions tp;
    two_partitions_build(&tp);
    struct esmd_buf out = ESMD_BUF_INIT;
    esmd_kafka_encode_batch(two_servers, &tp.batch, trec_view, &out);
    cJSON *root = cJSON_ParseWithLength(out.data, out.len);
    assert_non_null(root);
    assert_string_equal(cJSON_GetObjectItemCaseSensitive(root, "eventSource")->valuestring,
                        "SelfManagedKafka");
    assert_string_equal(cJSON_GetObjectItemCaseSensitive(root, "bootstrapServers")->valuestring,
                        two_servers);
    const cJSON *records = cJSON_GetObjectItemCaseSensitive(root, "records");
    assert_int_equal(cJSON_GetArraySize(records), 2);
    const cJSON *p0 = cJSON_GetObjectItemCaseSensitive(records, "orders-0");
    const cJSON *p1 = cJSON_GetObjectItemCaseSensitive(records, "orders-1");
    assert_int_equal(cJSON_GetArraySize(p0), 2);
    assert_int_equal(cJSON_GetArraySize(p1), 1);
    assert_record(cJSON_GetArrayItem(p0, 0), tp.r[0]);
    assert_record(cJSON_GetArrayItem(p0, 1), tp.r[1]);
    assert_record(cJSON_GetArrayItem(p1, 0), tp.r[2]);
    assert_string_equal(
        cJSON_GetObjectItemCaseSensitive(cJSON_GetArrayItem(p0, 1), "timestampType")->valuestring,
        "LOG_APPEND_TIME");
    assert_string_equal(
        cJSON_GetObjectItemCaseSensitive(cJSON_GetArrayItem(p1, 0), "timestampType")->valuestring,
        "NO_TIMESTAMP_TYPE");
    cJSON_Delete(root);
    esmd_buf_free(&out);
    two_partitions_free(&tp);
}

/* ---- exactness on random batches ---- */

/* Random bytes, biased towards what needs escaping: quotes, backslashes, control bytes, bytes
 * that are not valid UTF-8, valid multi-byte sequences. No NUL when `cstring`. */
static void rnd_bytes(unsigned char *p, size_t n, bool cstring)
{
    static const char *const pieces[] = {"\"",
                                         "\\",
                                         "\n",
                                         "\x01",
                                         "\x1f",
                                         "\x7f",
                                         "\xc3\xab",
                                         "\xe2\x82\xac",
                                         "\xf0\x9f\x98\x80",
                                         "\xff",
                                         "\xc3",
                                         "\xed\xa0\x80",
                                         "a",
                                         "Z",
                                         "/"};
    size_t i = 0;
    while (i < n) {
        if (esmd_test_rand_n(3) == 0) {
            const char *s = pieces[esmd_test_rand_n(ESMD_ARRAY_LEN(pieces))];
            for (; *s && i < n; s++)
                p[i++] = (unsigned char)*s;
        } else {
            unsigned char c = (unsigned char)esmd_test_rand();
            p[i++] = cstring && c == 0 ? 'x' : c;
        }
    }
}

static void test_exact_size_random(void **state)
{
    static const char *const topics[] = {"orders",         "t",       "a.b_c-d", "t\"q",
                                         "\xc3\xbc-topic", "ctl\x01", "bad\xff"};
    static const char *const servers[] = {"localhost:9092", "b1:9092,b2:9092", "we\"ird\\\x02"};
    for (int iter = 0; iter < 300; iter++) {
        const char *srv = servers[esmd_test_rand_n(ESMD_ARRAY_LEN(servers))];
        struct esmd_batch batch;
        batch_init(&batch, srv);
        size_t nshards = 1 + esmd_test_rand_n(5);
        struct esmd_shard shards[5];
        char keys[5][64];
        const char *shard_topic[5];
        int32_t shard_part[5];
        for (size_t s = 0; s < nshards; s++) {
            shard_topic[s] = topics[esmd_test_rand_n(ESMD_ARRAY_LEN(topics))];
            shard_part[s] = (int32_t)(s * 1000 + esmd_test_rand_n(1000));
            snprintf(keys[s], sizeof(keys[s]), "%s-%d", shard_topic[s], (int)shard_part[s]);
            shard_init(&shards[s], keys[s]);
        }
        int64_t next_offset[5] = {0};
        size_t nrec = 1 + esmd_test_rand_n(40);
        struct trec **recs = calloc(nrec, sizeof(*recs));
        for (size_t r = 0; r < nrec; r++) {
            size_t s = esmd_test_rand_n(nshards);
            unsigned char key[40], value[300];
            size_t klen = esmd_test_rand_n(sizeof(key)), vlen = esmd_test_rand_n(sizeof(value));
            rnd_bytes(key, klen, false);
            rnd_bytes(value, vlen, false);
            int64_t ts = esmd_test_rand_n(4) == 0 ? -1 : (int64_t)(esmd_test_rand() >> 1);
            rd_kafka_timestamp_type_t tt = (rd_kafka_timestamp_type_t)esmd_test_rand_n(3);
            next_offset[s] += 1 + (int64_t)esmd_test_rand_n(esmd_test_rand_n(2) ? 3 : 1000000000);
            recs[r] = trec_new(shard_topic[s], shard_part[s], next_offset[s], ts, tt,
                               esmd_test_rand_n(5) ? key : NULL, klen,
                               esmd_test_rand_n(5) ? value : NULL, vlen);
            size_t nh = esmd_test_rand_n(5);
            for (size_t h = 0; h < nh; h++) {
                unsigned char name[16], hv[20];
                size_t nlen = esmd_test_rand_n(sizeof(name) - 1),
                       hlen = esmd_test_rand_n(sizeof(hv));
                rnd_bytes(name, nlen, true);
                name[nlen] = '\0';
                rnd_bytes(hv, hlen, false);
                trec_header(recs[r], (const char *)name, esmd_test_rand_n(4) ? hv : NULL, hlen);
            }
            /* one record alone: its write is exactly its size */
            struct esmd_buf one = ESMD_BUF_INIT;
            esmd_kafka_record_write(&one, &recs[r]->v);
            assert_int_equal(one.len, esmd_kafka_record_size(&recs[r]->v));
            esmd_buf_free(&one);
            trec_add(&batch, recs[r], &shards[s]);
        }
        struct esmd_buf out = ESMD_BUF_INIT;
        esmd_buf_puts(&out, "prefix:"); /* encode appends */
        esmd_kafka_encode_batch(srv, &batch, trec_view, &out);
        const char *ev = esmd_buf_cstr(&out) + 7;
        assert_int_equal(out.len - 7, esmd_batch_bytes(&batch));
        assert_int_equal(strlen(ev), esmd_batch_bytes(&batch)); /* no NUL inside */
        cJSON *root = cJSON_ParseWithLength(ev, out.len - 7);
        if (!root)
            fail_msg("iteration %d: not JSON: %s", iter, ev);
        const cJSON *records = cJSON_GetObjectItemCaseSensitive(root, "records");
        assert_int_equal(cJSON_GetArraySize(records), (int)batch.ngroups);
        size_t total = 0;
        const cJSON *g;
        cJSON_ArrayForEach(g, records) total += (size_t)cJSON_GetArraySize(g);
        assert_int_equal(total, nrec);
        cJSON_Delete(root);
        esmd_buf_free(&out);
        esmd_batch_clear(&batch);
        for (size_t r = 0; r < nrec; r++)
            trec_free(recs[r]);
        free(recs);
    }
}

static void test_sizes(void **state)
{
    const char *servers = "localhost:9092";
    char want[256];
    snprintf(want, sizeof(want),
             "{\"eventSource\":\"SelfManagedKafka\",\"bootstrapServers\":\"%s\",\"records\":{}}",
             servers);
    assert_int_equal(esmd_kafka_envelope_size(servers), strlen(want));
    assert_int_equal(esmd_kafka_group_overhead("orders-3"), strlen("\"orders-3\":[]"));
    assert_int_equal(esmd_kafka_group_overhead("q\"-0"), strlen("\"q\\\"-0\":[]"));

    /* an empty batch is the envelope */
    struct esmd_batch batch;
    batch_init(&batch, servers);
    struct esmd_buf out = ESMD_BUF_INIT;
    esmd_kafka_encode_batch(servers, &batch, trec_view, &out);
    assert_string_equal(esmd_buf_cstr(&out), want);
    esmd_buf_free(&out);
    esmd_batch_clear(&batch);

    /* every signed byte value */
    struct trec *t = trec_new("t", 0, 0, 0, RD_KAFKA_TIMESTAMP_CREATE_TIME, NULL, 0, NULL, 0);
    unsigned char all[256];
    for (int i = 0; i < 256; i++)
        all[i] = (unsigned char)i;
    trec_header(t, "all", all, sizeof(all));
    esmd_kafka_record_write(&out, &t->v);
    assert_int_equal(out.len, esmd_kafka_record_size(&t->v));
    const char *s = esmd_buf_cstr(&out);
    assert_non_null(strstr(s, "{\"all\":[0,1,2,"));
    assert_non_null(strstr(s, ",126,127,-128,-127,"));
    assert_non_null(strstr(s, ",-2,-1]}"));
    /* a null key is left out; a null value is JSON null */
    assert_null(strstr(s, "\"key\""));
    assert_non_null(strstr(s, "\"timestampType\":\"CREATE_TIME\",\"value\":null,"));
    esmd_buf_free(&out);
    trec_free(t);
}

/* What filters see of a record (README "Filtering"): JSON embedded, text as a string, binary
 * key as base64, binary value left out, null as null; headers as strings. */
static void check_filter_doc(struct trec *t, enum esmd_filter_data want, const char *golden)
{
    struct esmd_buf b = ESMD_BUF_INIT;
    enum esmd_filter_data got = esmd_kafka_filter_doc(&t->v, &b);
    assert_string_equal(esmd_buf_cstr(&b), golden);
    assert_int_equal(got, want);
    esmd_buf_free(&b);
}

static void test_filter_doc(void **state)
{
    (void)state;
    const char *json = "{\"type\":\"created\",\"n\":[1,2.5]}";
    struct trec *t = trec_new("orders", 3, 42, 1545084650987, RD_KAFKA_TIMESTAMP_CREATE_TIME, "k-1",
                              3, json, strlen(json));
    trec_header(t, "source", "web", 3);
    trec_header(t, "bin", "\xff\x00", 2);
    trec_header(t, "none", NULL, 0);
    check_filter_doc(t, ESMD_FILTER_DATA_JSON,
                     "{\"topic\":\"orders\",\"partition\":3,\"offset\":42,\"timestamp\":"
                     "1545084650987,\"key\":\"k-1\",\"value\":{\"type\":\"created\",\"n\":[1,2.5]},"
                     "\"headers\":[{\"source\":\"web\"},{\"bin\":\"/wA=\"},{\"none\":null}]}");
    trec_free(t);

    /* a JSON key, a text value, no timestamp */
    t = trec_new("t", 0, 7, -1, RD_KAFKA_TIMESTAMP_NOT_AVAILABLE, "{\"id\":1}", 8, "plain \"text\"",
                 12);
    check_filter_doc(t, ESMD_FILTER_DATA_TEXT,
                     "{\"topic\":\"t\",\"partition\":0,\"offset\":7,\"key\":{\"id\":1},"
                     "\"value\":\"plain \\\"text\\\"\",\"headers\":[]}");
    trec_free(t);

    /* a binary key and value: the key as base64, the value left out */
    t = trec_new("t", 1, 0, 5, RD_KAFKA_TIMESTAMP_CREATE_TIME, "\x80\x81", 2, "\xc3\x28", 2);
    check_filter_doc(t, ESMD_FILTER_DATA_NONE,
                     "{\"topic\":\"t\",\"partition\":1,\"offset\":0,\"timestamp\":5,"
                     "\"key\":\"gIE=\",\"headers\":[]}");
    trec_free(t);

    /* null key and value (a tombstone): JSON nulls, a scalar */
    t = trec_new("t", 1, 9, 5, RD_KAFKA_TIMESTAMP_CREATE_TIME, NULL, 0, NULL, 0);
    check_filter_doc(t, ESMD_FILTER_DATA_TEXT,
                     "{\"topic\":\"t\",\"partition\":1,\"offset\":9,\"timestamp\":5,"
                     "\"key\":null,\"value\":null,\"headers\":[]}");
    trec_free(t);

    /* a number that is JSON on its own: embedded as it is, a scalar */
    t = trec_new("t", 0, 1, 5, RD_KAFKA_TIMESTAMP_CREATE_TIME, NULL, 0, " 42 ", 4);
    check_filter_doc(t, ESMD_FILTER_DATA_TEXT,
                     "{\"topic\":\"t\",\"partition\":0,\"offset\":1,\"timestamp\":5,"
                     "\"key\":null,\"value\": 42 ,\"headers\":[]}");
    trec_free(t);

    /* an array value is JSON data like an object */
    t = trec_new("t", 0, 2, 5, RD_KAFKA_TIMESTAMP_CREATE_TIME, NULL, 0, "\n[1]", 4);
    check_filter_doc(t, ESMD_FILTER_DATA_JSON,
                     "{\"topic\":\"t\",\"partition\":0,\"offset\":2,\"timestamp\":5,"
                     "\"key\":null,\"value\":\n[1],\"headers\":[]}");
    trec_free(t);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_spec_example),      cmocka_unit_test(test_two_partitions_golden),
        cmocka_unit_test(test_round_trip),        cmocka_unit_test(test_sizes),
        cmocka_unit_test(test_exact_size_random), cmocka_unit_test(test_filter_doc),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
