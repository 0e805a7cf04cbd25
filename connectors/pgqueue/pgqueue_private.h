/* Private to connectors/pgqueue: the event encoder and the message view it works from.
 *
 * The encoder reads a small view of one received message, so the exact-size contract
 * (esmd_batch_bytes() == bytes written) can be tested with messages built by hand; pgqueue.c
 * fills the view from a received row.
 *
 * Never included by the core (src/); only the files of connectors/pgqueue and the connector's
 * unit tests include it. */
#ifndef ESMD_PGQUEUE_PRIVATE_H
#define ESMD_PGQUEUE_PRIVATE_H

#include "esmd/batch.h"
#include "esmd/buf.h"
#include "esmd/connector.h"

/* What every record says about where it comes from: SQS's (Powertools' parser checks it). */
#define ESMD_PGQUEUE_EVENT_SOURCE "aws:sqs"
/* Room for "arn:aws:sqs:<region>:<account>:" and a NUL. */
#define ESMD_PGQUEUE_ARN_PREFIX_MAX 160
/* Writes the prefix of every queue's ARN, "arn:aws:sqs:<region>:<account>:" (the `aws`
 * section's, esmd_aws_region() and esmd_aws_account()), and a NUL into out; returns its
 * length. A queue's ARN is this prefix and the queue name, as SQS's. */
size_t esmd_pgqueue_arn_prefix(char out[ESMD_PGQUEUE_ARN_PREFIX_MAX]);

/* One received message as the encoder sees it. Every pointer is borrowed for the call. */
struct esmd_pgqueue_view {
    const char *message_id; /* the message's uuid */
    int64_t id;             /* row id: the receipt handle is "<id>:<receipt>" */
    const char *receipt;    /* uuid of this receive */
    const char *body;       /* UTF-8 text (bytes that are not are written as U+FFFD) */
    size_t body_len;
    const char *attributes; /* message attributes: a compact JSON object; NULL: none ({}) */
    size_t attributes_len;
    const char *attributes_md5; /* NULL when there are no attributes */
    const char *body_md5;
    const char *sender;  /* the Postgres role that sent it (SenderId) */
    int64_t sent_ms;     /* epoch ms */
    int64_t first_ms;    /* first receive, epoch ms */
    int receive_count;   /* this receive included */
    const char *dlq_arn; /* ARN of the queue it was dead-lettered from; NULL when it was not */
    /* FIFO queues only (NULL otherwise): MessageGroupId and MessageDeduplicationId; the row id
     * is the SequenceNumber. */
    const char *group_id;
    const char *dedup_id;
    const char *trace_header; /* AWSTraceHeader (a checked X-Ray header); NULL when none */
};

/* Fills *v for rec; the view stays valid while rec is alive. */
typedef void (*esmd_pgqueue_view_fn)(const struct esmd_record *rec, struct esmd_pgqueue_view *v);

/* Exact bytes of {"Records":[]}. */
size_t esmd_pgqueue_envelope_size(void);

/* Exact bytes esmd_pgqueue_record_write() writes for v; arn: the queue's ARN (borrowed). */
size_t esmd_pgqueue_record_size(const struct esmd_pgqueue_view *v, const char *arn);

/* Appends one record, as Lambda's SQS event record (docs/lambda.md#sqs-event):
 * {"messageId":"..","receiptHandle":"<id>:<receipt>","body":"..","attributes":{
 *  "ApproximateReceiveCount":"1","SentTimestamp":"..","SenderId":"..",
 *  "ApproximateFirstReceiveTimestamp":"..","AWSTraceHeader":".." (with a trace header only),
 *  "DeadLetterQueueSourceArn":".." (dead-lettered only)},
 * and for a FIFO message (group_id set) the attributes as in an SQS FIFO event:
 *  {"ApproximateReceiveCount":"1","SentTimestamp":"..","SequenceNumber":"<id>",
 *   "MessageGroupId":"..","SenderId":"..","MessageDeduplicationId":"..",
 *   "ApproximateFirstReceiveTimestamp":"..", ..},
 *  "messageAttributes":{..},"md5OfBody":"..","md5OfMessageAttributes":".." (with attributes only),
 *  "eventSource":"aws:sqs","eventSourceARN":"<arn>","awsRegion":"<region>"}; the region is
 * esmd_aws_region(), which must not change between the size and the write. */
void esmd_pgqueue_record_write(struct esmd_buf *out, const struct esmd_pgqueue_view *v,
                               const char *arn);

/* Appends the whole event {"Records":[...]} for batch: exactly esmd_batch_bytes(batch) bytes
 * when every rec->size came from esmd_pgqueue_record_size() with the same arn and the batch's
 * envelope from esmd_pgqueue_envelope_size(). Records in batch order (groups, then each group's
 * records). arn, batch: borrowed; out: appended to, not reset. */
void esmd_pgqueue_encode_batch(const struct esmd_batch *batch, const char *arn,
                               esmd_pgqueue_view_fn view_of, struct esmd_buf *out);

/* Appends the document filters see of one message: the record as above, with `body` embedded
 * as JSON when it is JSON (ESMD_FILTER_DATA_JSON), as a string otherwise (ESMD_FILTER_DATA_TEXT;
 * bytes that are not UTF-8 become U+FFFD). The connector has no filter fallback: patterns apply
 * as written, which is SQS's rule (docs/lambda.md#filter-non-json): a string body with a JSON data
 * pattern, or a JSON body with a string data pattern, does not match (the message is dropped). */
enum esmd_filter_data esmd_pgqueue_filter_doc(const struct esmd_pgqueue_view *v, const char *arn,
                                              struct esmd_buf *out);

/* Copies JSON text without the white space outside strings (Postgres's jsonb output has
 * ", " and ": ") into out[] (room for len bytes); returns the length written. */
size_t esmd_pgqueue_json_compact(const char *in, size_t len, char *out);

/* Is the queue a FIFO queue? Its name ends in ".fifo", as SQS requires (docs/pgqueue.md). */
bool esmd_pgqueue_is_fifo(const char *name);

/* pgqueue_config.c: the key table and checks of esmd_connector_pgqueue (connector.h). */
extern const struct esmd_cfg_key esmd_pgqueue_source_keys[];
void esmd_pgqueue_cfg_check(struct esmd_mapping_cfg *map, struct esmd_cfg_check *chk);

#endif
