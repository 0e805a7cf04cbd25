/* The Postgres queue's event, modelled on Lambda's SQS event (docs/lambda.md#sqs-event),
 * written straight into a buffer.
 *
 * The writer and its size twin are built from the same string literals, so the sizes the core
 * batches by are the bytes the encoder writes. */
#include "pgqueue_private.h"

#include "esmd/json.h"

#include <stdio.h>
#include <string.h>

#define LIT(s) (sizeof(s) - 1)

#define REC_MESSAGE_ID "{\"messageId\":"
#define REC_RECEIPT ",\"receiptHandle\":"
#define REC_BODY ",\"body\":"
#define REC_COUNT ",\"attributes\":{\"ApproximateReceiveCount\":\""
#define REC_SENT "\",\"SentTimestamp\":\""
#define REC_SENDER "\",\"SenderId\":"
/* FIFO messages: SequenceNumber and MessageGroupId between SentTimestamp and SenderId,
 * MessageDeduplicationId after it (the order of Lambda's SQS FIFO event example). */
#define REC_SEQUENCE "\",\"SequenceNumber\":\""
#define REC_GROUP "\",\"MessageGroupId\":"
#define REC_SENDER_AFTER_GROUP ",\"SenderId\":"
#define REC_DEDUP ",\"MessageDeduplicationId\":"
#define REC_FIRST ",\"ApproximateFirstReceiveTimestamp\":\""
#define REC_TRACE "\",\"AWSTraceHeader\":"
#define REC_DLQ_AFTER_TRACE ",\"DeadLetterQueueSourceArn\":"
#define REC_DLQ_SOURCE "\",\"DeadLetterQueueSourceArn\":"
#define REC_ATTRS_END_DLQ "}"
#define REC_ATTRS_END "\"}"
#define REC_MSG_ATTRS ",\"messageAttributes\":"
#define REC_NO_ATTRS "{}"
#define REC_MD5_BODY ",\"md5OfBody\":"
#define REC_MD5_ATTRS ",\"md5OfMessageAttributes\":"
#define REC_SOURCE ",\"eventSource\":\"" ESMD_PGQUEUE_EVENT_SOURCE "\",\"eventSourceARN\":"
#define REC_REGION ",\"awsRegion\":"
#define REC_TAIL "}"

static size_t str_len(const char *s)
{
    return esmd_json_string_len(s ? s : "", s ? strlen(s) : 0);
}

static void put_str(struct esmd_buf *out, const char *s)
{
    esmd_buf_put_json_string(out, s ? s : "", s ? strlen(s) : 0);
}

/* The receipt handle "<id>:<receipt>" into buf[]; returns its length. */
static size_t receipt_handle(const struct esmd_pgqueue_view *v, char *buf, size_t n)
{
    int len = snprintf(buf, n, "%lld:%s", (long long)v->id, v->receipt ? v->receipt : "");
    return len < 0 ? 0 : (size_t)len < n ? (size_t)len : n - 1;
}

size_t esmd_pgqueue_arn_prefix(char out[ESMD_PGQUEUE_ARN_PREFIX_MAX])
{
    int n = snprintf(out, ESMD_PGQUEUE_ARN_PREFIX_MAX, "arn:aws:sqs:%s:%s:", esmd_aws_region(),
                     esmd_aws_account());
    return n < 0 ? 0 : (size_t)n;
}

size_t esmd_pgqueue_envelope_size(void)
{
    return ESMD_BATCH_RECORDS_ENVELOPE;
}

/* Everything but the body's value. */
static size_t record_size_without_body(const struct esmd_pgqueue_view *v, const char *arn)
{
    char handle[128];
    size_t hlen = receipt_handle(v, handle, sizeof(handle));
    size_t n = LIT(REC_MESSAGE_ID) + str_len(v->message_id);
    n += LIT(REC_RECEIPT) + esmd_json_string_len(handle, hlen);
    n += LIT(REC_BODY);
    n += LIT(REC_COUNT) + esmd_i64_len(v->receive_count);
    n += LIT(REC_SENT) + esmd_i64_len(v->sent_ms);
    if (v->group_id)
        n += LIT(REC_SEQUENCE) + esmd_i64_len(v->id) + LIT(REC_GROUP) + str_len(v->group_id) +
             LIT(REC_SENDER_AFTER_GROUP) + str_len(v->sender) + LIT(REC_DEDUP) +
             str_len(v->dedup_id);
    else
        n += LIT(REC_SENDER) + str_len(v->sender);
    n += LIT(REC_FIRST) + esmd_i64_len(v->first_ms);
    if (v->trace_header) {
        n += LIT(REC_TRACE) + str_len(v->trace_header);
        if (v->dlq_arn)
            n += LIT(REC_DLQ_AFTER_TRACE) + str_len(v->dlq_arn);
        n += LIT(REC_ATTRS_END_DLQ);
    } else if (v->dlq_arn) {
        n += LIT(REC_DLQ_SOURCE) + str_len(v->dlq_arn) + LIT(REC_ATTRS_END_DLQ);
    } else {
        n += LIT(REC_ATTRS_END);
    }
    n += LIT(REC_MSG_ATTRS) + (v->attributes ? v->attributes_len : LIT(REC_NO_ATTRS));
    n += LIT(REC_MD5_BODY) + str_len(v->body_md5);
    if (v->attributes_md5)
        n += LIT(REC_MD5_ATTRS) + str_len(v->attributes_md5);
    n += LIT(REC_SOURCE) + str_len(arn) + LIT(REC_REGION) + str_len(esmd_aws_region()) +
         LIT(REC_TAIL);
    return n;
}

size_t esmd_pgqueue_record_size(const struct esmd_pgqueue_view *v, const char *arn)
{
    return record_size_without_body(v, arn) + esmd_json_string_len(v->body, v->body_len);
}

/* Writes the record; the body as JSON text when body_json, else as a JSON string. */
static void record_write(struct esmd_buf *out, const struct esmd_pgqueue_view *v, const char *arn,
                         bool body_json)
{
    char handle[128];
    size_t hlen = receipt_handle(v, handle, sizeof(handle));
    esmd_buf_append(out, REC_MESSAGE_ID, LIT(REC_MESSAGE_ID));
    put_str(out, v->message_id);
    esmd_buf_append(out, REC_RECEIPT, LIT(REC_RECEIPT));
    esmd_buf_put_json_string(out, handle, hlen);
    esmd_buf_append(out, REC_BODY, LIT(REC_BODY));
    if (body_json)
        esmd_buf_append(out, v->body, v->body_len);
    else
        esmd_buf_put_json_string(out, v->body, v->body_len);
    esmd_buf_append(out, REC_COUNT, LIT(REC_COUNT));
    esmd_buf_put_i64(out, v->receive_count);
    esmd_buf_append(out, REC_SENT, LIT(REC_SENT));
    esmd_buf_put_i64(out, v->sent_ms);
    if (v->group_id) {
        esmd_buf_append(out, REC_SEQUENCE, LIT(REC_SEQUENCE));
        esmd_buf_put_i64(out, v->id);
        esmd_buf_append(out, REC_GROUP, LIT(REC_GROUP));
        put_str(out, v->group_id);
        esmd_buf_append(out, REC_SENDER_AFTER_GROUP, LIT(REC_SENDER_AFTER_GROUP));
        put_str(out, v->sender);
        esmd_buf_append(out, REC_DEDUP, LIT(REC_DEDUP));
        put_str(out, v->dedup_id);
    } else {
        esmd_buf_append(out, REC_SENDER, LIT(REC_SENDER));
        put_str(out, v->sender);
    }
    esmd_buf_append(out, REC_FIRST, LIT(REC_FIRST));
    esmd_buf_put_i64(out, v->first_ms);
    if (v->trace_header) {
        esmd_buf_append(out, REC_TRACE, LIT(REC_TRACE));
        put_str(out, v->trace_header);
        if (v->dlq_arn) {
            esmd_buf_append(out, REC_DLQ_AFTER_TRACE, LIT(REC_DLQ_AFTER_TRACE));
            put_str(out, v->dlq_arn);
        }
        esmd_buf_append(out, REC_ATTRS_END_DLQ, LIT(REC_ATTRS_END_DLQ));
    } else if (v->dlq_arn) {
        esmd_buf_append(out, REC_DLQ_SOURCE, LIT(REC_DLQ_SOURCE));
        put_str(out, v->dlq_arn);
        esmd_buf_append(out, REC_ATTRS_END_DLQ, LIT(REC_ATTRS_END_DLQ));
    } else {
        esmd_buf_append(out, REC_ATTRS_END, LIT(REC_ATTRS_END));
    }
    esmd_buf_append(out, REC_MSG_ATTRS, LIT(REC_MSG_ATTRS));
    if (v->attributes)
        esmd_buf_append(out, v->attributes, v->attributes_len);
    else
        esmd_buf_append(out, REC_NO_ATTRS, LIT(REC_NO_ATTRS));
    esmd_buf_append(out, REC_MD5_BODY, LIT(REC_MD5_BODY));
    put_str(out, v->body_md5);
    if (v->attributes_md5) {
        esmd_buf_append(out, REC_MD5_ATTRS, LIT(REC_MD5_ATTRS));
        put_str(out, v->attributes_md5);
    }
    esmd_buf_append(out, REC_SOURCE, LIT(REC_SOURCE));
    put_str(out, arn);
    esmd_buf_append(out, REC_REGION, LIT(REC_REGION));
    put_str(out, esmd_aws_region());
    esmd_buf_append(out, REC_TAIL, LIT(REC_TAIL));
}

void esmd_pgqueue_record_write(struct esmd_buf *out, const struct esmd_pgqueue_view *v,
                               const char *arn)
{
    record_write(out, v, arn, false);
}

struct pgqueue_encode_ctx {
    const char *arn;
    esmd_pgqueue_view_fn view_of;
};

static void write_message(void *ctx, const struct esmd_record *rec, struct esmd_buf *out)
{
    const struct pgqueue_encode_ctx *c = ctx;
    struct esmd_pgqueue_view v;
    c->view_of(rec, &v);
    record_write(out, &v, c->arn, false);
}

void esmd_pgqueue_encode_batch(const struct esmd_batch *batch, const char *arn,
                               esmd_pgqueue_view_fn view_of, struct esmd_buf *out)
{
    struct pgqueue_encode_ctx c = {arn, view_of};
    esmd_batch_encode_records(batch, write_message, &c, out);
}

enum esmd_filter_data esmd_pgqueue_filter_doc(const struct esmd_pgqueue_view *v, const char *arn,
                                              struct esmd_buf *out)
{
    bool json = esmd_json_valid(v->body, v->body_len);
    record_write(out, v, arn, json);
    return json ? ESMD_FILTER_DATA_JSON : ESMD_FILTER_DATA_TEXT;
}

size_t esmd_pgqueue_json_compact(const char *in, size_t len, char *out)
{
    size_t o = 0;
    bool str = false, esc = false;
    for (size_t i = 0; i < len; i++) {
        char c = in[i];
        if (str) {
            if (esc)
                esc = false;
            else if (c == '\\')
                esc = true;
            else if (c == '"')
                str = false;
        } else if (c == '"') {
            str = true;
        } else if (c == ' ' || c == '\n' || c == '\t' || c == '\r') {
            continue;
        }
        out[o++] = c;
    }
    return o;
}
