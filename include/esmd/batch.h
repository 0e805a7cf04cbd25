/* Records, shards and batches: the core's units between a connector and the invoker.
 *
 * A shard is one ordered unit of a source (a Kafka topic-partition, a Redis stream), split by
 * the core into lanes by record key (docs/design.md#lanes): the core keeps at most one batch in
 * flight per lane and hands a lane's records to batches in `seq` order. A batch holds records of
 * several shards (one lane of each), grouped by shard in the event when the source's shape
 * groups them (Kafka's "records":{"topic-0":[...]}), or in one flat array otherwise.
 *
 * Sizes are exact: a connector gives each record's encoded size, each shard's group overhead
 * and the event's envelope size, and its encoder must write exactly esmd_batch_bytes() bytes,
 * so a batch is flushed before the next record would take the event over the 6 MB cap. */
#ifndef ESMD_BATCH_H
#define ESMD_BATCH_H

#include "esmd/common.h"

struct esmd_shard;

struct esmd_record {
    struct esmd_record *next; /* the core's list link */
    struct esmd_shard *shard; /* set by the core on emit: the record's lane */
    int64_t seq;              /* position in the shard (Kafka offset) */
    int64_t timestamp_ms;     /* source timestamp, epoch ms (record age) */
    size_t size;              /* exact bytes of this record's JSON in the event */
    void *priv;               /* the connector's (e.g. rd_kafka_message_t *) */
    bool filtered;            /* set by the core: no filter matched, acked without a batch */
    /* Set by the connector before emit when the record cannot be delivered (a Kafka record its
     * schema registry cannot decode: "SCHEMA_NOT_FOUND", "DESERIALIZATION_ERROR"): filters do not
     * see it, and at its turn the core gives it up alone with this condition. Static string. */
    const char *fail;
};

/* A shard as a connector sees it: an opaque handle that host->shard_open() returns; the core
 * keeps its bookkeeping (src/batch_private.h). Both accessors are for the connectors. */
/* The shard's key as given to shard_open ("topic-3"), e.g. the group key of a grouped event.
 * Borrowed: valid while the handle is. */
const char *esmd_shard_key(const struct esmd_shard *shard);
/* The connector's pointer given to shard_open; NULL once the shard is closed (revoked) while
 * records of it are still in a batch. */
void *esmd_shard_priv(const struct esmd_shard *shard);

struct esmd_batch_group {
    struct esmd_shard *shard;
    struct esmd_record *head, *tail; /* in seq order, linked by rec->next */
    size_t n;
    int64_t ack_seq; /* the shard's next_seq to ack when the batch is done (>= tail->seq + 1:
                        records skipped after the tail, e.g. over the size cap, move it on) */
};

struct esmd_batch_limits {
    int batch_size;      /* records, 1..10000 */
    size_t max_bytes;    /* ESMD_MAX_PAYLOAD */
    size_t envelope;     /* bytes of the event with no record and no group */
    bool group_by_shard; /* grouped (Kafka) or one flat array (Redis, pgqueue) */
};

struct esmd_batch {
    struct esmd_batch_limits lim;
    struct esmd_batch_group *groups; /* owned; in order of first record */
    size_t ngroups, capgroups;
    size_t nrecords;
    size_t bytes;           /* exact size of the encoded event */
    int64_t opened_mono_ms; /* when the first record joined (window start) */
};

enum esmd_batch_fit {
    ESMD_BATCH_FITS,    /* add it */
    ESMD_BATCH_FULL,    /* flush the batch first; the record fits an empty batch */
    ESMD_BATCH_TOO_BIG, /* the record alone exceeds max_bytes: it can never be sent */
};

void esmd_batch_init(struct esmd_batch *batch, const struct esmd_batch_limits *lim);
/* Frees the group array (not the records: they belong to whoever settles them). */
void esmd_batch_clear(struct esmd_batch *batch);
/* Exact size of the event if rec were added. */
size_t esmd_batch_bytes_with(const struct esmd_batch *batch, const struct esmd_record *rec);
enum esmd_batch_fit esmd_batch_check(const struct esmd_batch *batch, const struct esmd_record *rec);
/* Appends rec (its shard's group is created on first use). Records of a shard must come in seq
 * order. Does not check limits: call esmd_batch_check() first. */
void esmd_batch_add(struct esmd_batch *batch, struct esmd_record *rec);
/* true when nrecords == batch_size. */
bool esmd_batch_count_reached(const struct esmd_batch *batch);
size_t esmd_batch_bytes(const struct esmd_batch *batch);
/* The event of the sources with one flat list of records (Redis streams, the Postgres queue):
 * {"Records":[...]}. ESMD_BATCH_RECORDS_ENVELOPE is its size without the records and commas. */
#define ESMD_BATCH_RECORDS_HEAD "{\"Records\":["
#define ESMD_BATCH_RECORDS_TAIL "]}"
#define ESMD_BATCH_RECORDS_ENVELOPE                                                                \
    (sizeof(ESMD_BATCH_RECORDS_HEAD) - 1 + sizeof(ESMD_BATCH_RECORDS_TAIL) - 1)
struct esmd_buf;
/* Writes that event into out: the batch's records in order (group by group), each written by
 * write(ctx, rec, out), separated by commas. Reserves esmd_batch_bytes() first. */
void esmd_batch_encode_records(const struct esmd_batch *batch,
                               void (*write)(void *ctx, const struct esmd_record *rec,
                                             struct esmd_buf *out),
                               void *ctx, struct esmd_buf *out);
/* Takes the shard's records out of the batch (a revoked shard); returns them as a list linked by
 * rec->next (caller releases them), NULL when the shard has none in it. */
struct esmd_record *esmd_batch_remove_shard(struct esmd_batch *batch,
                                            const struct esmd_shard *shard);

#endif
