/* The Postgres queue's event encoder: golden events, the exact-size contract, a JSON round
 * trip, and what filters see (SQS's rules for string and JSON bodies).
 *
 * Messages are built by hand as esmd_pgqueue_view. The golden files in tests/unit/data/pgqueue/
 * were written independently of this encoder, with Python's json and hashlib (compact separators,
 * ensure_ascii=False); spec_example.json is the SQS event of docs/lambda.md#sqs-event as a
 * Postgres queue sends it. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "testutil.h"

#include "../../src/batch_private.h" /* shards on the stack, as the core makes them */
#include "../../connectors/pgqueue/pgqueue_private.h"

#include "esmd/filter.h"
#include "esmd/json.h"

#include <cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* SQS's ARNs, with the `aws` section's region and account (the defaults unless a test sets
 * them with set_aws()). */
#define DEFAULT_PREFIX "arn:aws:sqs:us-east-1:000000000000:"
static char queue_arn[ESMD_PGQUEUE_ARN_PREFIX_MAX + 16] = DEFAULT_PREFIX "my-queue";
#define ARN queue_arn

static void set_aws(const char *region, const char *account)
{
    esmd_aws_set(region, account);
    char prefix[ESMD_PGQUEUE_ARN_PREFIX_MAX];
    esmd_pgqueue_arn_prefix(prefix);
    snprintf(queue_arn, sizeof(queue_arn), "%smy-queue", prefix);
}

/* A hand-built message: the core's record plus the view the encoder reads. */
struct tmsg {
    struct esmd_record rec;
    struct esmd_pgqueue_view v;
    char *body; /* owned copy */
};

static void tmsg_view(const struct esmd_record *rec, struct esmd_pgqueue_view *v)
{
    *v = ((const struct tmsg *)rec)->v;
}

static struct tmsg *tmsg_new(const struct esmd_pgqueue_view *v)
{
    struct tmsg *t = calloc(1, sizeof(*t));
    t->v = *v;
    t->body = malloc(v->body_len + 1);
    memcpy(t->body, v->body, v->body_len);
    t->body[v->body_len] = '\0';
    t->v.body = t->body;
    t->rec.seq = v->id;
    return t;
}

static void tmsg_free(struct tmsg *t)
{
    free(t->body);
    free(t);
}

static void tmsg_add(struct esmd_batch *batch, struct tmsg *t, struct esmd_shard *shard)
{
    t->rec.size = esmd_pgqueue_record_size(&t->v, ARN);
    t->rec.shard = shard;
    assert_int_equal(esmd_batch_check(batch, &t->rec), ESMD_BATCH_FITS);
    esmd_batch_add(batch, &t->rec);
}

static void batch_init(struct esmd_batch *batch)
{
    struct esmd_batch_limits lim = {
        .batch_size = 10000,
        .max_bytes = ESMD_MAX_PAYLOAD,
        .envelope = esmd_pgqueue_envelope_size(),
        .group_by_shard = false,
    };
    esmd_batch_init(batch, &lim);
}

static void shard_init(struct esmd_shard *shard, const char *key)
{
    memset(shard, 0, sizeof(*shard));
    shard->key = (char *)key;
}

static void assert_golden(const char *name, const struct esmd_batch *batch)
{
    struct esmd_buf out = ESMD_BUF_INIT;
    esmd_pgqueue_encode_batch(batch, ARN, tmsg_view, &out);
    const char *got = esmd_buf_cstr(&out);
    assert_int_equal(out.len, esmd_batch_bytes(batch));
    assert_int_equal(strlen(got), esmd_batch_bytes(batch));
    esmd_test_assert_golden("pgqueue", name, got, out.len);
    esmd_buf_free(&out);
}

/* ---- golden events ---- */

static const char spec_attrs[] =
    "{\"Attr1\":{\"dataType\":\"String\",\"stringValue\":\"v\",\"binaryListValues\":[],"
    "\"stringListValues\":[]},\"Attr2\":{\"dataType\":\"Binary\",\"binaryValue\":\"MTEwMA==\","
    "\"binaryListValues\":[],\"stringListValues\":[]}}";

static void test_spec_example(void **state)
{
    struct esmd_shard s0;
    shard_init(&s0, "my-queue-0");
    struct esmd_batch batch;
    batch_init(&batch);
    /* the spec's example comes from us-east-2, account 123456789012 */
    set_aws("us-east-2", "123456789012");
    assert_string_equal(ARN, "arn:aws:sqs:us-east-2:123456789012:my-queue");
    struct esmd_pgqueue_view v = {
        .message_id = "059f36b4-87a3-44ab-83d2-661975830a7d",
        .id = 42,
        .receipt = "5e1f4b2c-7d0e-4b7a-9f1e-2c3d4e5f6a7b",
        .body = "Test message.",
        .body_len = 13,
        .attributes = spec_attrs,
        .attributes_len = strlen(spec_attrs),
        .attributes_md5 = "582c92c5c5b6ac403040a4f3ab3115c9",
        .body_md5 = "e4e68fb7bd0e697a0ae8f1bb342846b3",
        .sender = "esmd",
        .sent_ms = 1545082649183LL,
        .first_ms = 1545082649185LL,
        .receive_count = 1,
    };
    struct tmsg *t = tmsg_new(&v);
    tmsg_add(&batch, t, &s0);
    assert_golden("spec_example.json", &batch);
    esmd_batch_clear(&batch);
    tmsg_free(t);
    set_aws(ESMD_DEFAULT_REGION, ESMD_DEFAULT_ACCOUNT);
}

/* By default a queue's ARN is SQS's in us-east-1, account 000000000000. */
static void test_arn_prefix(void **state)
{
    char prefix[ESMD_PGQUEUE_ARN_PREFIX_MAX];
    assert_int_equal(esmd_pgqueue_arn_prefix(prefix), strlen(DEFAULT_PREFIX));
    assert_string_equal(prefix, DEFAULT_PREFIX);
    set_aws("ap-southeast-10", "123456789012");
    assert_int_equal(esmd_pgqueue_arn_prefix(prefix),
                     strlen("arn:aws:sqs:ap-southeast-10:123456789012:"));
    assert_string_equal(prefix, "arn:aws:sqs:ap-southeast-10:123456789012:");
    set_aws(ESMD_DEFAULT_REGION, ESMD_DEFAULT_ACCOUNT);
    assert_string_equal(ARN, DEFAULT_PREFIX "my-queue");
}

static const char odd_body[] = "line1\nline2\t\"quoted\" \\ back /slash \xc3\xab\xe2\x82\xac"
                               "\xf0\x9f\x98\x80 \x01\x1f\x7f";
static const char json_body[] = "{\"type\":\"order_created\",\"id\":1}";
static const char n_attrs[] = "{\"n\":{\"dataType\":\"Number\",\"stringValue\":\"42\","
                              "\"binaryListValues\":[],\"stringListValues\":[]}}";

struct two_messages {
    struct esmd_shard s0, s1;
    struct esmd_batch batch;
    struct tmsg *m[2];
};

static void two_messages_build(struct two_messages *tm)
{
    shard_init(&tm->s0, "my-queue-0");
    shard_init(&tm->s1, "my-queue-1");
    batch_init(&tm->batch);
    struct esmd_pgqueue_view a = {
        .message_id = "9b2f3a6e-0c1d-4e5f-8a9b-0c1d2e3f4a5b",
        .id = 7,
        .receipt = "00000000-0000-4000-8000-000000000001",
        .body = odd_body,
        .body_len = sizeof(odd_body) - 1,
        .body_md5 = "b3bf240ce488223ad6c2b366c1224dc6",
        .sender = "app_writer",
        .sent_ms = 1700000000000LL,
        .first_ms = 1700000000500LL,
        .receive_count = 3,
        .dlq_arn = DEFAULT_PREFIX "orders",
    };
    struct esmd_pgqueue_view b = {
        .message_id = "1c2d3e4f-5a6b-4c7d-8e9f-0a1b2c3d4e5f",
        .id = 9007199254740993LL,
        .receipt = "ffffffff-ffff-4fff-bfff-ffffffffffff",
        .body = json_body,
        .body_len = sizeof(json_body) - 1,
        .attributes = n_attrs,
        .attributes_len = sizeof(n_attrs) - 1,
        .attributes_md5 = "0123456789abcdef0123456789abcdef",
        .body_md5 = "919a911f677ddafa270120831ee5a193",
        .sender = "esmd",
        .sent_ms = 1700000000001LL,
        .first_ms = 1700000000002LL,
        .receive_count = 1,
    };
    tm->m[0] = tmsg_new(&a);
    tm->m[1] = tmsg_new(&b);
    /* two shards in one flat event: records in batch order */
    tmsg_add(&tm->batch, tm->m[0], &tm->s0);
    tmsg_add(&tm->batch, tm->m[1], &tm->s1);
}

static void two_messages_free(struct two_messages *tm)
{
    esmd_batch_clear(&tm->batch);
    tmsg_free(tm->m[0]);
    tmsg_free(tm->m[1]);
}

static void test_two_messages_golden(void **state)
{
    struct two_messages tm;
    two_messages_build(&tm);
    assert_golden("two_messages.json", &tm.batch);
    two_messages_free(&tm);
}

/* AWSTraceHeader in attributes, where Lambda puts SQS's system attribute: with and without a
 * DeadLetterQueueSourceArn after it. */
static void test_trace_header_golden(void **state)
{
    struct esmd_shard s0;
    shard_init(&s0, "my-queue-0");
    struct esmd_batch batch;
    batch_init(&batch);
    struct esmd_pgqueue_view a = {
        .message_id = "059f36b4-87a3-44ab-83d2-661975830a7d",
        .id = 42,
        .receipt = "5e1f4b2c-7d0e-4b7a-9f1e-2c3d4e5f6a7b",
        .body = "traced",
        .body_len = 6,
        .body_md5 = "e4e68fb7bd0e697a0ae8f1bb342846b3",
        .sender = "esmd",
        .sent_ms = 1545082649183LL,
        .first_ms = 1545082649185LL,
        .receive_count = 1,
        .trace_header =
            "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1",
    };
    struct esmd_pgqueue_view b = a;
    b.id = 43;
    b.dlq_arn = DEFAULT_PREFIX "orders";
    struct tmsg *t[2] = {tmsg_new(&a), tmsg_new(&b)};
    tmsg_add(&batch, t[0], &s0);
    tmsg_add(&batch, t[1], &s0);
    assert_golden("trace_header.json", &batch);
    esmd_batch_clear(&batch);
    tmsg_free(t[0]);
    tmsg_free(t[1]);
}

/* ---- the event parses back to the inputs ---- */

static const char *str_item(const cJSON *o, const char *key)
{
    const cJSON *it = cJSON_GetObjectItemCaseSensitive(o, key);
    assert_true(cJSON_IsString(it));
    return it->valuestring;
}

/* A FIFO queue's event (docs/pgqueue.md#fifo-queues): SequenceNumber (the row id),
 * MessageGroupId and MessageDeduplicationId among the attributes, as strings, in the order of
 * Lambda's SQS FIFO example; the ARN ends in ".fifo" as the queue's name does. Two messages of
 * one group in sequence order, the second one dead-lettered from another FIFO queue. */
static void test_fifo_golden(void **state)
{
    snprintf(queue_arn, sizeof(queue_arn), DEFAULT_PREFIX "orders.fifo");
    struct esmd_shard s0;
    shard_init(&s0, "orders.fifo-0");
    struct esmd_batch batch;
    batch_init(&batch);
    struct esmd_pgqueue_view a = {
        .message_id = "6f1c2a3b-4d5e-4f60-8a7b-9c0d1e2f3a4b",
        .id = 18849496460467696LL,
        .receipt = "00000000-0000-4000-8000-000000000002",
        .body = "first",
        .body_len = 5,
        .body_md5 = "8b04d5e3775d298e78455efc5ca404d5",
        .sender = "app_writer",
        .sent_ms = 1573251510774LL,
        .first_ms = 1573251510774LL,
        .receive_count = 1,
        .group_id = "customer-\"42\"\\x",
        .dedup_id = "order-1",
    };
    struct esmd_pgqueue_view b = {
        .message_id = "7a8b9c0d-1e2f-4a3b-8c4d-5e6f7a8b9c0d",
        .id = 18849496460467697LL,
        .receipt = "00000000-0000-4000-8000-000000000003",
        .body = json_body,
        .body_len = sizeof(json_body) - 1,
        .attributes = n_attrs,
        .attributes_len = sizeof(n_attrs) - 1,
        .attributes_md5 = "0123456789abcdef0123456789abcdef",
        .body_md5 = "919a911f677ddafa270120831ee5a193",
        .sender = "esmd",
        .sent_ms = 1573251510775LL,
        .first_ms = 1573251510800LL,
        .receive_count = 2,
        .dlq_arn = DEFAULT_PREFIX "orders-src.fifo",
        .group_id = "customer-\"42\"\\x",
        .dedup_id = "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
    };
    struct tmsg *ta = tmsg_new(&a), *tb = tmsg_new(&b);
    tmsg_add(&batch, ta, &s0);
    tmsg_add(&batch, tb, &s0);
    assert_golden("fifo_messages.json", &batch);

    struct esmd_buf out = ESMD_BUF_INIT;
    esmd_pgqueue_encode_batch(&batch, ARN, tmsg_view, &out);
    cJSON *root = cJSON_ParseWithLength(out.data, out.len);
    assert_non_null(root);
    const cJSON *r = cJSON_GetArrayItem(cJSON_GetObjectItemCaseSensitive(root, "Records"), 1);
    const cJSON *attrs = cJSON_GetObjectItemCaseSensitive(r, "attributes");
    assert_string_equal(str_item(attrs, "SequenceNumber"), "18849496460467697");
    assert_string_equal(str_item(attrs, "MessageGroupId"), "customer-\"42\"\\x");
    assert_string_equal(str_item(attrs, "MessageDeduplicationId"), b.dedup_id);
    assert_string_equal(str_item(attrs, "SenderId"), "esmd");
    assert_string_equal(str_item(attrs, "DeadLetterQueueSourceArn"), b.dlq_arn);
    assert_string_equal(str_item(r, "eventSourceARN"), DEFAULT_PREFIX "orders.fifo");
    cJSON_Delete(root);
    esmd_buf_free(&out);
    esmd_batch_clear(&batch);
    tmsg_free(ta);
    tmsg_free(tb);
    set_aws(ESMD_DEFAULT_REGION, ESMD_DEFAULT_ACCOUNT);
}

static void test_round_trip(void **state)
{
    struct two_messages tm;
    two_messages_build(&tm);
    struct esmd_buf out = ESMD_BUF_INIT;
    esmd_pgqueue_encode_batch(&tm.batch, ARN, tmsg_view, &out);
    cJSON *root = cJSON_ParseWithLength(out.data, out.len);
    assert_non_null(root);
    assert_int_equal(cJSON_GetArraySize(root), 1);
    const cJSON *records = cJSON_GetObjectItemCaseSensitive(root, "Records");
    assert_int_equal(cJSON_GetArraySize(records), 2);
    for (int i = 0; i < 2; i++) {
        const cJSON *r = cJSON_GetArrayItem(records, i);
        const struct esmd_pgqueue_view *v = &tm.m[i]->v;
        assert_string_equal(str_item(r, "messageId"), v->message_id);
        char handle[128];
        snprintf(handle, sizeof(handle), "%lld:%s", (long long)v->id, v->receipt);
        assert_string_equal(str_item(r, "receiptHandle"), handle);
        assert_string_equal(str_item(r, "body"), v->body);
        const cJSON *attrs = cJSON_GetObjectItemCaseSensitive(r, "attributes");
        char num[32];
        snprintf(num, sizeof(num), "%d", v->receive_count);
        assert_string_equal(str_item(attrs, "ApproximateReceiveCount"), num);
        snprintf(num, sizeof(num), "%lld", (long long)v->sent_ms);
        assert_string_equal(str_item(attrs, "SentTimestamp"), num);
        snprintf(num, sizeof(num), "%lld", (long long)v->first_ms);
        assert_string_equal(str_item(attrs, "ApproximateFirstReceiveTimestamp"), num);
        assert_string_equal(str_item(attrs, "SenderId"), v->sender);
        if (v->dlq_arn)
            assert_string_equal(str_item(attrs, "DeadLetterQueueSourceArn"), v->dlq_arn);
        else
            assert_null(cJSON_GetObjectItemCaseSensitive(attrs, "DeadLetterQueueSourceArn"));
        assert_true(cJSON_IsObject(cJSON_GetObjectItemCaseSensitive(r, "messageAttributes")));
        assert_string_equal(str_item(r, "md5OfBody"), v->body_md5);
        if (v->attributes_md5)
            assert_string_equal(str_item(r, "md5OfMessageAttributes"), v->attributes_md5);
        else
            assert_null(cJSON_GetObjectItemCaseSensitive(r, "md5OfMessageAttributes"));
        assert_string_equal(str_item(r, "eventSource"), "aws:sqs");
        assert_string_equal(str_item(r, "eventSourceARN"), ARN);
        assert_string_equal(str_item(r, "awsRegion"), "us-east-1");
    }
    const cJSON *ma =
        cJSON_GetObjectItemCaseSensitive(cJSON_GetArrayItem(records, 1), "messageAttributes");
    assert_string_equal(str_item(cJSON_GetObjectItemCaseSensitive(ma, "n"), "stringValue"), "42");
    cJSON_Delete(root);
    esmd_buf_free(&out);
    two_messages_free(&tm);
}

static void test_empty_batch(void **state)
{
    struct esmd_batch batch;
    batch_init(&batch);
    struct esmd_buf out = ESMD_BUF_INIT;
    esmd_pgqueue_encode_batch(&batch, ARN, tmsg_view, &out);
    assert_string_equal(esmd_buf_cstr(&out), "{\"Records\":[]}");
    assert_int_equal(out.len, esmd_batch_bytes(&batch));
    esmd_buf_free(&out);
}

/* ---- exactness on random batches ---- */

/* Random bytes, biased towards what needs escaping, and bytes that are not valid UTF-8. */
static void rnd_bytes(char *p, size_t n)
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
                                         "{",
                                         "/"};
    size_t i = 0;
    while (i < n) {
        if (esmd_test_rand_n(3) == 0) {
            const char *s = pieces[esmd_test_rand_n(ESMD_ARRAY_LEN(pieces))];
            for (; *s && i < n; s++)
                p[i++] = *s;
        } else {
            char c = (char)esmd_test_rand();
            p[i++] = c ? c : 'x';
        }
    }
}

static void test_exact_size_random(void **state)
{
    static const char *const attrs[] = {NULL, "{}", n_attrs, spec_attrs};
    static const char *const senders[] = {"esmd", "we\"ird\\", "r\xc3\xb4le"};
    static const char *const arns[] = {NULL, DEFAULT_PREFIX "orders", DEFAULT_PREFIX "q\"x"};
    static const char *const groups[] = {NULL, "g", "we\"ird\\", "gr\xc3\xb4upe"};
    static const char *const traces[] = {
        NULL, "Root=1-5759e988-bd862e3fe1be46a994272793",
        "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1"};
    for (int iter = 0; iter < 300; iter++) {
        struct esmd_batch batch;
        batch_init(&batch);
        struct esmd_shard shards[3];
        shard_init(&shards[0], "q-0");
        shard_init(&shards[1], "q-1");
        shard_init(&shards[2], "q-2");
        size_t n = 1 + esmd_test_rand_n(30);
        struct tmsg **msgs = calloc(n, sizeof(*msgs));
        for (size_t i = 0; i < n; i++) {
            char body[400];
            size_t blen = esmd_test_rand_n(sizeof(body));
            rnd_bytes(body, blen);
            const char *a = attrs[esmd_test_rand_n(ESMD_ARRAY_LEN(attrs))];
            struct esmd_pgqueue_view v = {
                .message_id = "0b6c5b8e-6a3e-4c55-9a43-0e4b7e9f1d2a",
                .id = (int64_t)(esmd_test_rand() >> (1 + esmd_test_rand_n(62))),
                .receipt = "5e1f4b2c-7d0e-4b7a-9f1e-2c3d4e5f6a7b",
                .body = body,
                .body_len = blen,
                .attributes = a,
                .attributes_len = a ? strlen(a) : 0,
                .attributes_md5 = a ? "582c92c5c5b6ac403040a4f3ab3115c9" : NULL,
                .body_md5 = "e4e68fb7bd0e697a0ae8f1bb342846b3",
                .sender = senders[esmd_test_rand_n(ESMD_ARRAY_LEN(senders))],
                .sent_ms = (int64_t)(esmd_test_rand() >> 1),
                .first_ms = esmd_test_rand_n(2) ? (int64_t)(esmd_test_rand() >> 1) : 0,
                .receive_count = (int)esmd_test_rand_n(100000),
                .dlq_arn = arns[esmd_test_rand_n(ESMD_ARRAY_LEN(arns))],
                .group_id = groups[esmd_test_rand_n(ESMD_ARRAY_LEN(groups))],
                .trace_header = traces[esmd_test_rand_n(ESMD_ARRAY_LEN(traces))],
            };
            if (v.group_id) /* FIFO messages always have both */
                v.dedup_id = groups[1 + esmd_test_rand_n(ESMD_ARRAY_LEN(groups) - 1)];
            msgs[i] = tmsg_new(&v);
            tmsg_add(&batch, msgs[i], &shards[esmd_test_rand_n(3)]);
        }
        struct esmd_buf out = ESMD_BUF_INIT;
        esmd_pgqueue_encode_batch(&batch, ARN, tmsg_view, &out);
        assert_int_equal(out.len, esmd_batch_bytes(&batch));
        /* invalid UTF-8 is written as U+FFFD: the event is always valid JSON */
        assert_true(esmd_json_valid(out.data, out.len));
        cJSON *root = cJSON_ParseWithLength(out.data, out.len);
        assert_non_null(root);
        assert_int_equal(cJSON_GetArraySize(cJSON_GetObjectItemCaseSensitive(root, "Records")),
                         (int)n);
        cJSON_Delete(root);
        esmd_buf_free(&out);
        esmd_batch_clear(&batch);
        for (size_t i = 0; i < n; i++)
            tmsg_free(msgs[i]);
        free(msgs);
    }
}

/* ---- what filters see ---- */

static struct tmsg *body_msg(const char *body)
{
    struct esmd_pgqueue_view v = {
        .message_id = "059f36b4-87a3-44ab-83d2-661975830a7d",
        .id = 1,
        .receipt = "5e1f4b2c-7d0e-4b7a-9f1e-2c3d4e5f6a7b",
        .body = body,
        .body_len = strlen(body),
        .attributes = n_attrs,
        .attributes_len = sizeof(n_attrs) - 1,
        .attributes_md5 = "0123456789abcdef0123456789abcdef",
        .body_md5 = "e4e68fb7bd0e697a0ae8f1bb342846b3",
        .sender = "esmd",
        .sent_ms = 1,
        .first_ms = 2,
        .receive_count = 1,
    };
    return tmsg_new(&v);
}

static void test_filter_doc_shape(void **state)
{
    struct tmsg *j = body_msg(" {\"a\": [1, 2]} ");
    struct tmsg *s = body_msg("plain text");
    struct esmd_buf out = ESMD_BUF_INIT;
    assert_int_equal(esmd_pgqueue_filter_doc(&j->v, ARN, &out), ESMD_FILTER_DATA_JSON);
    cJSON *doc = cJSON_ParseWithLength(out.data, out.len);
    assert_non_null(doc);
    const cJSON *body = cJSON_GetObjectItemCaseSensitive(doc, "body");
    assert_true(cJSON_IsObject(body));
    assert_int_equal(cJSON_GetArraySize(cJSON_GetObjectItemCaseSensitive(body, "a")), 2);
    assert_string_equal(str_item(doc, "eventSourceARN"), ARN);
    assert_true(cJSON_IsObject(cJSON_GetObjectItemCaseSensitive(doc, "messageAttributes")));
    cJSON_Delete(doc);
    esmd_buf_reset(&out);
    /* a body that is not JSON is a string */
    assert_int_equal(esmd_pgqueue_filter_doc(&s->v, ARN, &out), ESMD_FILTER_DATA_TEXT);
    doc = cJSON_ParseWithLength(out.data, out.len);
    assert_non_null(doc);
    assert_string_equal(str_item(doc, "body"), "plain text");
    cJSON_Delete(doc);
    esmd_buf_free(&out);
    tmsg_free(j);
    tmsg_free(s);
}

static bool matches(const char *pattern, const char *body)
{
    struct esmd_filter *f = esmd_filter_new();
    struct esmd_filter_error fe;
    if (esmd_filter_add(f, pattern, strlen(pattern), 0, &fe) != 0)
        fail_msg("pattern %s: %s", pattern, fe.message);
    struct tmsg *t = body_msg(body);
    struct esmd_buf out = ESMD_BUF_INIT;
    esmd_pgqueue_filter_doc(&t->v, ARN, &out);
    bool m = esmd_filter_match(f, out.data, out.len);
    esmd_buf_free(&out);
    tmsg_free(t);
    esmd_filter_free(f);
    return m;
}

/* docs/lambda.md#filter-non-json, SQS: plain string body with a plain string pattern filters
 * normally; with a JSON (object) pattern it is dropped; a JSON body with a string pattern is
 * dropped; JSON with JSON filters normally; no data pattern filters on metadata only. The
 * connector has no filter fallback, so the core matches every record with the patterns as
 * written, as here. */
static void test_filter_sqs_rules(void **state)
{
    assert_true(matches("{\"body\":[\"hello\"]}", "hello"));
    assert_true(matches("{\"body\":[{\"prefix\":\"he\"}]}", "hello"));
    assert_false(matches("{\"body\":[\"bye\"]}", "hello"));
    assert_false(matches("{\"body\":{\"status\":[\"ERROR\"]}}", "hello"));
    assert_false(matches("{\"body\":[\"hello\"]}", "{\"status\":\"ERROR\"}"));
    assert_true(matches("{\"body\":{\"status\":[\"ERROR\"]}}", "{\"status\":\"ERROR\"}"));
    assert_false(matches("{\"body\":{\"status\":[\"ERROR\"]}}", "{\"status\":\"OK\"}"));
    assert_true(matches("{\"eventSourceARN\":[\"" DEFAULT_PREFIX "my-queue\"]}", "anything"));
    assert_true(matches("{\"eventSource\":[\"aws:sqs\"],\"awsRegion\":[\"us-east-1\"]}", "x"));
    assert_true(matches("{\"messageAttributes\":{\"n\":{\"stringValue\":[\"42\"]}}}", "x"));
    assert_true(matches("{\"attributes\":{\"ApproximateReceiveCount\":[\"1\"]}}", "{}"));
}

/* ---- compacting Postgres's jsonb text ---- */

static void test_json_compact(void **state)
{
    const char *in = "{\"a\": {\"b\": [1, 2]}, \"c\": \"x y: z\", \"d\\\" e\": \"\\\\ \"}";
    char out[128];
    size_t n = esmd_pgqueue_json_compact(in, strlen(in), out);
    out[n] = '\0';
    assert_string_equal(out, "{\"a\":{\"b\":[1,2]},\"c\":\"x y: z\",\"d\\\" e\":\"\\\\ \"}");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_spec_example),        cmocka_unit_test(test_arn_prefix),
        cmocka_unit_test(test_two_messages_golden), cmocka_unit_test(test_round_trip),
        cmocka_unit_test(test_empty_batch),         cmocka_unit_test(test_exact_size_random),
        cmocka_unit_test(test_filter_doc_shape),    cmocka_unit_test(test_filter_sqs_rules),
        cmocka_unit_test(test_json_compact),        cmocka_unit_test(test_fifo_golden),
        cmocka_unit_test(test_trace_header_golden),
    };
    esmd_test_rand_seed(0x2545f4914f6cdd1dULL);
    return cmocka_run_group_tests(tests, NULL, NULL);
}
