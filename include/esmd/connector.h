/* The connector interface: one table of operations per source kind, registered in
 * src/connectors.c. A connector exports exactly one symbol (esmd_connector_<kind>) and sees the
 * core only through the host API below. Everything runs on the one loop thread.
 *
 * Flow: the connector fetches records and hands them to host->emit() in seq order per shard;
 * the core filters, routes each record to a lane of its shard (parallelization_factor lanes,
 * by ops->record_key; docs/design.md#lanes), batches (at most one batch in flight per lane),
 * encodes through ops->encode(), invokes, and when every record of a shard below `next_seq` is
 * finished (success, filtered out, or given up), whatever lane it is in, calls ops->ack() with
 * that watermark. Records go back through ops->release(). The connector only ever sees the
 * handles shard_open gave it: lanes are the core's; rec->shard may be a lane (read it only
 * with esmd_shard_key() / esmd_shard_priv(), which give the shard's). */
#ifndef ESMD_CONNECTOR_H
#define ESMD_CONNECTOR_H

#include "esmd/batch.h"
#include "esmd/buf.h"
#include "esmd/config.h"
#include "esmd/log.h"

struct ev_loop;
struct cJSON;
struct esmd_trace;

/* Given to a connector at create; borrowed, valid until destroy. */
struct esmd_host {
    struct ev_loop *loop;
    void *core;                     /* pass back as the first argument below */
    const struct esmd_log_ctx *log; /* {mapping, function, NULL} */
    const char *instance_id;        /* stable id of this esmd process */

    /* A shard became ours (Kafka: partition assigned). key is copied; overhead is the exact
     * size of its group in the event with no records. Returns the core's handle, opaque to the
     * connector (read it with esmd_shard_key() / esmd_shard_priv(), esmd/batch.h). */
    struct esmd_shard *(*shard_open)(void *core, const char *key, size_t overhead, void *priv);
    /* A shard is no longer ours (revoked): pending records are released, in-flight ones are
     * finished but never acked. The handle must not be used after this call. */
    void (*shard_close)(void *core, struct esmd_shard *shard);
    /* Takes ownership of rec until ops->release() (shard: a handle from shard_open, seq
     * ascending). The core counts the records it holds (see destroy). */
    void (*emit)(void *core, struct esmd_shard *shard, struct esmd_record *rec);
    /* Connection state for /readyz; `why` is copied (NULL when ready). */
    void (*set_ready)(void *core, bool ready, const char *why);
};

struct esmd_connector_stats {
    int64_t lag;       /* records behind the source's end (Kafka: sum of offset lag), -1 unknown */
    int64_t committed; /* records acknowledged to the source since start */
    bool ready;
};

/* How a record's data (Kafka: value; Redis: fields; queue: body) appears in its filter document,
 * which decides how filters treat it (docs/lambda.md#kafka-filtering, #filter-non-json; README
 * "Filtering"). */
enum esmd_filter_data {
    ESMD_FILTER_DATA_JSON, /* a JSON object or array, embedded as it is */
    ESMD_FILTER_DATA_TEXT, /* a JSON scalar embedded as it is, or UTF-8 text as a JSON string */
    ESMD_FILTER_DATA_NONE, /* not UTF-8: left out of the document */
};

struct esmd_connector_ops {
    const char *kind; /* "kafka" | "redis" | "pgqueue": the YAML source key */
    bool grouped;     /* the event groups records by shard */
    /* Queue semantics (pgqueue, as SQS): a failed batch is not retried by the core; its
     * records are handed back with nack() and the source delivers them again later (after
     * its visibility timeout). Streams (false): the core retries the batch in place. */
    bool queue;

    /* Configuration (docs/configuration.md), read by src/config.c before any I/O, so that
     * check-config refuses what the connector would refuse. Key tables end with a {0} entry:
     * the keys of this kind's `source:` section (offsets into struct esmd_mapping_cfg; the
     * kind's own key, e.g. `kafka:`, among them) and of its `connections:` entries besides `type`
     * (offsets into struct esmd_conn_cfg; NULL when the kind has no connections). cfg_check,
     * optional, runs once the mapping is read (errors or not: it looks at esmd_cfg_state()):
     * defaults that depend on other keys, checks across keys. */
    enum esmd_source_kind source;
    const struct esmd_cfg_key *source_keys;
    const struct esmd_cfg_key *conn_keys;
    int default_batch_size;
    int64_t default_batching_window_ms;
    void (*cfg_check)(struct esmd_mapping_cfg *map, struct esmd_cfg_check *chk);

    /* Allocates from validated config; no I/O. NULL with err on failure. */
    void *(*create)(const struct esmd_mapping_cfg *cfg, const struct esmd_host *host, char *err,
                    size_t errlen);
    /* Bytes of the event with no records (constant for an instance). */
    size_t (*envelope_size)(void *c);
    /* Connects and registers watchers on the loop. 0 or ESMD_E*. A failing connection is
     * retried by the connector (shown through set_ready), not reported here. */
    int (*start)(void *c);
    /* Backpressure for one shard: stop / restart fetching it. Idempotent. */
    void (*pause)(void *c, struct esmd_shard *shard);
    void (*resume)(void *c, struct esmd_shard *shard);
    /* Optional, backpressure for the whole source: stop (true) / restart (false) taking records
     * from the client's prefetch queue, which keeps what it prefetched (unlike pause, which
     * drops a shard's prefetched records: fetching them again takes far longer than serving
     * them). Idempotent. With it, the core holds the source while the mapping has too many
     * records waiting and pauses shards only when a hold lasts (docs/design.md#backpressure);
     * without it, shards are paused one by one. */
    void (*hold)(void *c, bool hold);
    /* Every record of shard with seq < next_seq is finished: store and commit it. */
    void (*ack)(void *c, struct esmd_shard *shard, int64_t next_seq);
    /* Queue sources only: the records of shard with seq < next_seq that are not acked yet are
     * given up by this process (their batch failed, or esmd is stopping); they are not deleted
     * and come back from the source later. NULL for streams. */
    void (*nack)(void *c, struct esmd_shard *shard, int64_t next_seq);
    /* Queue sources, optional: the one record is finished (e.g. a message that succeeded in a
     * batch whose other messages the function reported as failed): delete it now. Without it a
     * partial batch response fails the whole batch for a queue source. */
    void (*ack_record)(void *c, struct esmd_shard *shard, const struct esmd_record *rec);
    /* Failure handling (README "Failure handling"). The key of the block describing the source
     * in on-failure records, e.g. "KafkaBatchInfo", and a writer of that block's object for rec
     * alone (a batch of one; payload_size: bytes of its one-record event, 0 when too big to be
     * carried). */
    const char *batch_info_key;
    void (*failure_info)(void *c, const struct esmd_record *rec, size_t payload_size,
                         struct esmd_buf *out);
    /* The record's key: its lane when parallelization_factor > 1, and its key at keyed
     * destinations (Kafka: the message key; Redis: the partition key); *key NULL when none. */
    void (*record_key)(void *c, const struct esmd_record *rec, const void **key, size_t *len);
    /* Does `id` (one batchItemFailures[].itemIdentifier, parsed) name rec? Kafka:
     * {"partition":"<topic>-<n>","offset":<n>}; Redis: the entry id; queue: the messageId. */
    bool (*item_is)(void *c, const struct esmd_record *rec, const struct cJSON *id);
    /* Optional: the trace context rec carries (Kafka: its traceparent, tracestate and
     * X-Amzn-Trace-Id headers; queue: its AWSTraceHeader), each value checked by
     * esmd_trace_set(). Fills *out (cleared first); false when rec carries none
     * (docs/operations.md#trace-context). */
    bool (*trace)(void *c, const struct esmd_record *rec, struct esmd_trace *out);
    /* Frees a record the connector emitted: once per record, possibly after stop() is done,
     * never after destroy(). */
    void (*release)(void *c, struct esmd_record *rec);
    /* Writes the batch as the source's Lambda-shaped event: exactly esmd_batch_bytes() bytes. */
    void (*encode)(void *c, const struct esmd_batch *batch, struct esmd_buf *out);
    /* Writes what filters see of rec, a JSON object, into out (appended; the caller resets it)
     * and says how the data part was written. `data_key` is the document's key for the data. */
    enum esmd_filter_data (*filter_doc)(void *c, const struct esmd_record *rec,
                                        struct esmd_buf *out);
    const char *data_key; /* "value" for Kafka */
    /* Lambda's Kafka rule (docs/lambda.md#kafka-filtering): when the data and a pattern's data
     * condition disagree (an object pattern on text, a value-list pattern on an object, or data
     * that is not UTF-8), only the pattern's other conditions apply. false: patterns apply as
     * written, so such a record is dropped (SQS, Kinesis: docs/lambda.md#filter-non-json). */
    bool filter_fallback;
    /* Graceful stop: stop fetching, commit what was acked, leave the group; calls done(ud) when
     * finished (possibly later, from the loop). Emits nothing after this call. */
    void (*stop)(void *c, void (*done)(void *ud), void *ud);
    /* Frees everything; safe on a half-built object. The host counts the records it was given
     * and calls it only once every one of them is released, so a connector keeps no count of
     * its own (librdkafka's destroy, for one, waits for every message). */
    void (*destroy)(void *c);
    /* Optional: the host goes away with records of the connector still out (a bug in the core:
     * they are never released). Stops every watcher, so that nothing calls the host again; the
     * connector is then left allocated. Without it the host calls destroy() even so (a
     * connector whose records do not hold it up). */
    void (*detach)(void *c);
    void (*stats)(void *c, struct esmd_connector_stats *st);
};

/* Registered connectors (src/connectors.c). NULL when the kind is unknown. */
const struct esmd_connector_ops *esmd_connector_find(const char *kind);
/* The i-th registered connector, NULL past the last: the one list of kinds. */
const struct esmd_connector_ops *esmd_connector_at(size_t i);
/* The connector of a source kind (ops->source == kind); NULL when none is registered. */
const struct esmd_connector_ops *esmd_connector_of(enum esmd_source_kind kind);

#endif
