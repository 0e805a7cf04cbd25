/* The Kafka source: a librdkafka high-level consumer (consumer group) driven by the loop.
 *
 * Threading: librdkafka runs its own threads, but everything it hands to us (messages,
 * rebalances, commit results, errors, statistics, its log lines) is an op on one queue that we
 * serve from the loop thread: the main queue and the log queue are forwarded to the consumer
 * queue, and that queue writes a byte to a non-blocking pipe when it goes from empty to
 * non-empty (rd_kafka_queue_io_event_enable). So every callback below runs on the loop thread.
 * The conf, the log forwarding and the wake-up are the ones the kafka:// destination writer
 * uses too (include/esmd/kafka_client.h).
 *
 * Offsets: enable.auto.offset.store=false and enable.auto.commit=false. The core acks
 * (shard, next_seq) once every record below next_seq is finished; we store that offset and
 * commit stored offsets asynchronously, coalesced to at most one commit per 100 ms. On revoke
 * and on stop the stored offsets are committed synchronously before the partitions go.
 *
 * See docs/kafka.md for the event shape and the behaviour users see. */
#include "kafka_private.h"
#include "kafka_schema.h"

#include "esmd/connector.h"
#include "esmd/kafka_client.h"
#include "esmd/log.h"
#include "esmd/trace.h"

#include <cJSON.h>
#include <ev.h>
#include <librdkafka/rdkafka.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Messages handled per loop turn before yielding to other watchers. */
#define KAFKA_DRAIN_MAX 1000
/* A partition whose records wait for their schema is paused once this many records or bytes
 * (keys and values) wait (docs/kafka.md "Schema registry"). */
#define KAFKA_SR_WAIT_RECORDS 1000
#define KAFKA_SR_WAIT_BYTES (4u << 20)
/* Housekeeping tick: safety net for a missed wake-up, close progress, commit watchdog. */
#define KAFKA_TICK_S 0.1
/* At most one asynchronous commit per interval. */
#define KAFKA_COMMIT_INTERVAL_S 0.1
/* An async commit without a result after this long is considered lost. */
#define KAFKA_COMMIT_WATCHDOG_S 60.0
/* Longest graceful close before we give up and let destroy() drop the consumer. */
#define KAFKA_CLOSE_TIMEOUT_S 30.0
/* Blocking look-ups made on assignment with starting_position at_timestamp. */
#define KAFKA_LOOKUP_TIMEOUT_MS 10000
/* librdkafka statistics interval: used only to notice that brokers are back after an outage. */
#define KAFKA_STATS_INTERVAL_MS "10000"
/* KAFKA_STATUS_EVENT interval (Lambda's: a minute); ESMD_KAFKA_STATUS_INTERVAL_MS overrides it,
 * for tests only (docs/testing.md). */
#define KAFKA_STATUS_INTERVAL_S 60.0
/* Topic metadata refresh: how soon partitions added to a subscribed topic are noticed (the
 * group then rebalances onto them). librdkafka's default is 5 minutes. */
#define KAFKA_METADATA_REFRESH_MS "10000"

/* Why the source is not ready; the kind decides what clears it. */
enum kafka_down {
    KAFKA_UP,
    KAFKA_DOWN_CONN,     /* brokers unreachable: cleared by any sign of a working cluster */
    KAFKA_DOWN_SOURCE,   /* topic missing, authorization: cleared by an assignment or a record */
    KAFKA_DOWN_REGISTRY, /* the schema registry cannot answer: cleared when it answers */
    KAFKA_DOWN_FATAL,    /* the consumer instance is unusable: never cleared */
};

enum kafka_state {
    KAFKA_CREATED, /* create() done, no I/O yet */
    KAFKA_RUNNING, /* start() done */
    KAFKA_CLOSING, /* stop(): consumer close in progress */
    KAFKA_CLOSED,  /* stop() finished (or start() never happened); done scheduled */
};

/* One topic-partition we have seen assigned. Kept after a revoke (the core may still hold
 * records of it) and reused on a later assignment. */
struct kafka_part {
    char *topic; /* owned */
    int32_t partition;
    char *key;                /* owned: "topic-N", the group key in the event */
    struct esmd_shard *shard; /* the core's handle while assigned, else NULL */
    bool paused;              /* paused in librdkafka (stays set across a revoke) */
    bool core_pause;          /* the core asked for a pause (backpressure) */
    /* Records waiting, in order, for their schema (schema registry). Never emitted yet: freed
     * by us on revoke. The partition is paused once KAFKA_SR_WAIT_RECORDS or
     * KAFKA_SR_WAIT_BYTES wait (see part_apply_pause). */
    struct kafka_rec *whead, *wtail;
    int wcount;
    size_t wbytes;
    int64_t first;            /* offset of the first record emitted in this assignment, -1 */
    int64_t next;             /* offset after the last record emitted, -1 */
    int64_t stored;           /* last offset stored by ack, -1 */
    int64_t committed;        /* last offset we saw committed, -1 */
    struct kafka_part *hnext; /* hash chain */
};

/* What we emit: the core's record plus the message it came from. */
struct kafka_rec {
    struct esmd_record rec;  /* first: the core's pointer is ours */
    rd_kafka_message_t *rkm; /* owned; destroyed by release() */
    struct kafka_rec *wnext; /* a partition's wait list */
    struct kafka_dec *dec;   /* owned; NULL: nothing decoded (no registry, or a failed record) */
};

/* What the schema registry decoded of a record: per attribute (key, value) its JSON (what
 * filters see, and what JSON delivers), the data without the framing (what SOURCE delivers). */
struct kafka_dec_attr {
    bool set;
    enum esmd_sr_format format;
    int32_t id;
    char *json; /* owned */
    size_t json_len;
    const unsigned char *src; /* into the message */
    size_t src_len;
};

struct kafka_dec {
    bool source; /* event_record_format SOURCE */
    struct kafka_dec_attr key, value;
};

struct esmd_kafka {
    const struct esmd_host *host; /* borrowed until destroy */
    const struct esmd_log_ctx *log;
    char *servers; /* owned */
    char **topics; /* owned */
    size_t ntopics;
    char *group; /* owned */
    enum esmd_starting_position start;
    int64_t start_ts_ms;
    size_t envelope;

    struct esmd_sr *sr; /* the schema registry; NULL without one */
    bool sr_key, sr_value, sr_source;

    rd_kafka_conf_t *conf; /* owned until rd_kafka_new() takes it */
    rd_kafka_t *rk;
    rd_kafka_queue_t *rkqu;      /* the consumer queue (everything is forwarded here) */
    rd_kafka_queue_t *closeq;    /* receives the consumer queue's ops during close */
    struct esmd_kafka_wake wake; /* the queue's wake-up pipe and its watcher */

    /* The partition whose shard the core is opening: a pause it asks for meanwhile (a disabled
     * mapping) is applied once the partition is assigned (rebalance_assign). */
    struct kafka_part *opening;

    ev_timer kick;      /* 0 s: drain again next turn (a turn's drain was bounded) */
    bool held;          /* the core holds us (backpressure): the queue is not served */
    ev_timer tick;      /* KAFKA_TICK_S housekeeping */
    ev_timer commit_tm; /* next coalesced commit */
    ev_timer done_tm;   /* 0 s: call done() outside stop() */
    ev_timer status_tm; /* KAFKA_STATUS_EVENT, when the mapping's logging asks for it */
    bool watchers_init;
    int esm_level;       /* the mapping's system_log_level (enum esmd_esm_log_level) */
    unsigned generation; /* rebalances this consumer has seen (assignments and revokes) */

    struct kafka_part **buckets;
    size_t nbuckets, nparts, nassigned;

    bool commit_wanted, commit_inflight;
    double last_commit;
    int64_t committed_total;

    enum kafka_down down;
    bool down_auth; /* down (KAFKA_DOWN_CONN) because authentication failed */
    bool ready;
    enum kafka_state state;
    bool draining;

    void (*done)(void *ud);
    void *done_ud;
    double close_deadline;
};

/* ---- small helpers ---- */

static uint64_t part_hash(const char *topic, int32_t partition)
{
    uint64_t h = 1469598103934665603ULL;
    for (const unsigned char *p = (const unsigned char *)topic; *p; p++)
        h = (h ^ *p) * 1099511628211ULL;
    return (h ^ (uint32_t)partition) * 1099511628211ULL;
}

static struct kafka_part *part_find(const struct esmd_kafka *kc, const char *topic,
                                    int32_t partition)
{
    if (!kc->nbuckets)
        return NULL;
    struct kafka_part *part = kc->buckets[part_hash(topic, partition) % kc->nbuckets];
    for (; part; part = part->hnext)
        if (part->partition == partition && strcmp(part->topic, topic) == 0)
            return part;
    return NULL;
}

static void parts_grow(struct esmd_kafka *kc)
{
    size_t n = kc->nbuckets ? kc->nbuckets * 2 : 64;
    struct kafka_part **b = esmd_xcalloc(n, sizeof(*b));
    for (size_t i = 0; i < kc->nbuckets; i++) {
        struct kafka_part *part = kc->buckets[i], *next;
        for (; part; part = next) {
            next = part->hnext;
            size_t j = part_hash(part->topic, part->partition) % n;
            part->hnext = b[j];
            b[j] = part;
        }
    }
    free(kc->buckets);
    kc->buckets = b;
    kc->nbuckets = n;
}

static struct kafka_part *part_get(struct esmd_kafka *kc, const char *topic, int32_t partition)
{
    struct kafka_part *part = part_find(kc, topic, partition);
    if (part)
        return part;
    if (kc->nparts + 1 > kc->nbuckets * 2)
        parts_grow(kc);
    part = esmd_xcalloc(1, sizeof(*part));
    part->topic = esmd_xstrdup(topic);
    part->partition = partition;
    size_t klen = strlen(topic) + 16;
    part->key = esmd_xmalloc(klen);
    snprintf(part->key, klen, "%s-%d", topic, (int)partition);
    part->first = part->next = part->stored = part->committed = -1;
    size_t j = part_hash(topic, partition) % kc->nbuckets;
    part->hnext = kc->buckets[j];
    kc->buckets[j] = part;
    kc->nparts++;
    return part;
}

#define PARTS_FOREACH(kc, part)                                                                    \
    for (size_t part##_b = 0; part##_b < (kc)->nbuckets; part##_b++)                               \
        for (struct kafka_part *part = (kc)->buckets[part##_b]; part; part = part->hnext)

static void kafka_set_ready(struct esmd_kafka *kc)
{
    if (kc->down == KAFKA_DOWN_FATAL || kc->state >= KAFKA_CLOSED)
        return;
    kc->down = KAFKA_UP;
    kc->down_auth = false;
    if (kc->ready)
        return;
    kc->ready = true;
    kc->host->set_ready(kc->host->core, true, NULL);
}

/* A sign that the source works: ready, unless a reason worse than `kind` stands. */
static void kafka_recover(struct esmd_kafka *kc, enum kafka_down kind)
{
    if (kc->down <= kind)
        kafka_set_ready(kc);
}

static void kafka_set_down(struct esmd_kafka *kc, enum kafka_down kind, const char *why)
{
    if (kind < kc->down)
        return; /* a worse reason stands */
    kc->down = kind;
    kc->ready = false;
    kc->host->set_ready(kc->host->core, false, why);
}

static bool is_cooperative(rd_kafka_t *rk)
{
    const char *proto = rd_kafka_rebalance_protocol(rk);
    return proto && strcmp(proto, "COOPERATIVE") == 0;
}

/* ---- commits ---- */

/* Counts committed records (sum of committed-offset deltas) from a commit result. */
static void count_committed(struct esmd_kafka *kc, const rd_kafka_topic_partition_list_t *offsets)
{
    if (!offsets)
        return;
    for (int i = 0; i < offsets->cnt; i++) {
        const rd_kafka_topic_partition_t *p = &offsets->elems[i];
        if (p->err || p->offset < 0)
            continue;
        struct kafka_part *part = part_find(kc, p->topic, p->partition);
        if (!part)
            continue;
        int64_t base = part->committed >= 0 ? part->committed : part->first;
        if (base >= 0 && p->offset > base)
            kc->committed_total += p->offset - base;
        if (p->offset > part->committed)
            part->committed = p->offset;
    }
}

static void log_commit_error(struct esmd_kafka *kc, rd_kafka_resp_err_t err,
                             const rd_kafka_topic_partition_list_t *offsets, const char *what)
{
    if (err && err != RD_KAFKA_RESP_ERR__NO_OFFSET) {
        esmd_log_limited(ESMD_LOG_WARN, kc->log, "kafka-commit", "kafka %s commit failed: %s", what,
                         rd_kafka_err2str(err));
        return;
    }
    for (int i = 0; offsets && i < offsets->cnt; i++) {
        const rd_kafka_topic_partition_t *p = &offsets->elems[i];
        if (p->err)
            esmd_log_limited(ESMD_LOG_WARN, kc->log, "kafka-commit-part",
                             "kafka %s commit of %s-%d@%lld failed: %s", what, p->topic,
                             (int)p->partition, (long long)p->offset, rd_kafka_err2str(p->err));
    }
}

static void on_commit_sync(rd_kafka_t *rk, rd_kafka_resp_err_t err,
                           rd_kafka_topic_partition_list_t *offsets, void *opaque)
{
    struct esmd_kafka *kc = opaque;
    log_commit_error(kc, err, offsets, "synchronous");
    if (!err)
        count_committed(kc, offsets);
}

/* Commits every stored offset of the current assignment and waits for the result. Blocks the
 * loop for one round trip to the group coordinator; skipped when nothing new was stored. */
static void commit_sync(struct esmd_kafka *kc)
{
    ev_timer_stop(kc->host->loop, &kc->commit_tm);
    kc->commit_wanted = false;
    bool any = false;
    PARTS_FOREACH(kc, part)
    {
        if (part->shard && part->stored > part->committed)
            any = true;
    }
    if (!any)
        return;
    rd_kafka_resp_err_t err = rd_kafka_commit_queue(kc->rk, NULL, NULL, on_commit_sync, kc);
    if (err && err != RD_KAFKA_RESP_ERR__NO_OFFSET)
        ESMD_DEBUG(kc->log, "kafka synchronous commit: %s", rd_kafka_err2str(err));
}

static void commit_schedule(struct esmd_kafka *kc);

static void on_commit_async(rd_kafka_t *rk, rd_kafka_resp_err_t err,
                            rd_kafka_topic_partition_list_t *offsets, void *opaque)
{
    struct esmd_kafka *kc = opaque;
    kc->commit_inflight = false;
    log_commit_error(kc, err, offsets, "asynchronous");
    if (!err) {
        count_committed(kc, offsets);
        kafka_recover(kc, KAFKA_DOWN_CONN);
    }
    if (kc->commit_wanted && kc->state == KAFKA_RUNNING)
        commit_schedule(kc);
}

static void commit_async(struct esmd_kafka *kc)
{
    kc->commit_wanted = false;
    kc->last_commit = ev_now(kc->host->loop);
    rd_kafka_resp_err_t err = rd_kafka_commit_queue(kc->rk, NULL, kc->rkqu, on_commit_async, kc);
    if (err) {
        if (err != RD_KAFKA_RESP_ERR__NO_OFFSET)
            esmd_log_limited(ESMD_LOG_WARN, kc->log, "kafka-commit", "kafka commit: %s",
                             rd_kafka_err2str(err));
        return;
    }
    kc->commit_inflight = true;
}

/* At most one commit in flight and one per KAFKA_COMMIT_INTERVAL_S; later acks ride along. */
static void commit_schedule(struct esmd_kafka *kc)
{
    kc->commit_wanted = true;
    if (kc->commit_inflight || ev_is_active(&kc->commit_tm))
        return;
    double now = ev_now(kc->host->loop);
    double due = kc->last_commit + KAFKA_COMMIT_INTERVAL_S;
    if (now >= due) {
        commit_async(kc);
        return;
    }
    ev_timer_set(&kc->commit_tm, due - now, 0.0);
    ev_timer_start(kc->host->loop, &kc->commit_tm);
}

static void on_commit_timer(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct esmd_kafka *kc = w->data;
    ev_timer_stop(loop, w);
    if (kc->state == KAFKA_RUNNING && kc->commit_wanted && !kc->commit_inflight)
        commit_async(kc);
}

/* ---- rebalances ---- */

static rd_kafka_topic_partition_list_t *one_partition(const struct kafka_part *part)
{
    rd_kafka_topic_partition_list_t *list = rd_kafka_topic_partition_list_new(1);
    rd_kafka_topic_partition_list_add(list, part->topic, part->partition);
    return list;
}

/* starting_position at_timestamp: partitions without a committed offset start at the first
 * record at or after the timestamp (the end when there is none). Blocking look-ups. */
static void position_at_timestamp(struct esmd_kafka *kc, rd_kafka_topic_partition_list_t *list)
{
    rd_kafka_topic_partition_list_t *committed = rd_kafka_topic_partition_list_copy(list);
    rd_kafka_topic_partition_list_t *ts = NULL;
    rd_kafka_resp_err_t err = rd_kafka_committed(kc->rk, committed, KAFKA_LOOKUP_TIMEOUT_MS);
    if (err) {
        ESMD_WARN(kc->log,
                  "kafka at_timestamp: cannot read committed offsets (%s); partitions start "
                  "from the earliest record",
                  rd_kafka_err2str(err));
        goto out;
    }
    ts = rd_kafka_topic_partition_list_new(committed->cnt);
    for (int i = 0; i < committed->cnt; i++) {
        const rd_kafka_topic_partition_t *p = &committed->elems[i];
        if (!p->err && p->offset >= 0)
            continue; /* the group's committed offset wins */
        rd_kafka_topic_partition_list_add(ts, p->topic, p->partition)->offset = kc->start_ts_ms;
    }
    if (ts->cnt == 0)
        goto out;
    err = rd_kafka_offsets_for_times(kc->rk, ts, KAFKA_LOOKUP_TIMEOUT_MS);
    if (err) {
        ESMD_WARN(kc->log,
                  "kafka at_timestamp: offset look-up failed (%s); partitions start from the "
                  "earliest record",
                  rd_kafka_err2str(err));
        goto out;
    }
    for (int i = 0; i < ts->cnt; i++) {
        const rd_kafka_topic_partition_t *p = &ts->elems[i];
        if (p->err) {
            ESMD_WARN(kc->log, "kafka at_timestamp: %s-%d: %s; starting from the earliest record",
                      p->topic, (int)p->partition, rd_kafka_err2str(p->err));
            continue;
        }
        rd_kafka_topic_partition_t *dst =
            rd_kafka_topic_partition_list_find(list, p->topic, p->partition);
        if (dst)
            dst->offset = p->offset >= 0 ? p->offset : RD_KAFKA_OFFSET_END;
    }
out:
    if (ts)
        rd_kafka_topic_partition_list_destroy(ts);
    rd_kafka_topic_partition_list_destroy(committed);
}

static void kafka_rec_free(struct kafka_rec *kr);

/* Records that waited for a schema and were never emitted: read again by the next owner. */
static void wait_free(struct kafka_part *part)
{
    while (part->whead) {
        struct kafka_rec *kr = part->whead;
        part->whead = kr->wnext;
        kafka_rec_free(kr);
    }
    part->wtail = NULL;
    part->wcount = 0;
    part->wbytes = 0;
}

static void shard_close_part(struct esmd_kafka *kc, struct kafka_part *part)
{
    wait_free(part);
    struct esmd_shard *shard = part->shard;
    if (!shard)
        return;
    part->shard = NULL;
    kc->nassigned--;
    kc->host->shard_close(kc->host->core, shard);
}

/* POLLER_STATUS_EVENT of a rebalance (docs/operations.md#esm-logging): what changed and what the
 * consumer owns now. librdkafka does not expose the group's generation id: `rebalanceGeneration`
 * counts this consumer's rebalances. */
static void poller_event(struct esmd_kafka *kc, const char *status,
                         const rd_kafka_topic_partition_list_t *parts)
{
    if (!esmd_esm_log_enabled(kc->esm_level, ESMD_ESM_POLLER_STATUS))
        return;
    struct esmd_buf b = ESMD_BUF_INIT;
    esmd_buf_printf(&b, ",\"pollerStatus\":\"%s\",\"consumerGroupId\":", status);
    esmd_buf_put_json_string(&b, kc->group, strlen(kc->group));
    char *member = kc->rk ? rd_kafka_memberid(kc->rk) : NULL;
    esmd_buf_puts(&b, ",\"memberId\":");
    esmd_buf_put_json_string(&b, member ? member : "", member ? strlen(member) : 0);
    if (member)
        rd_kafka_mem_free(kc->rk, member);
    esmd_buf_printf(&b, ",\"rebalanceGeneration\":%u,\"rebalanceProtocol\":\"%s\"", kc->generation,
                    is_cooperative(kc->rk) ? "COOPERATIVE" : "EAGER");
    esmd_buf_puts(&b, ",\"partitions\":[");
    for (int i = 0; parts && i < parts->cnt; i++) {
        char key[512];
        snprintf(key, sizeof(key), "%s-%d", parts->elems[i].topic, (int)parts->elems[i].partition);
        if (i)
            esmd_buf_puts(&b, ",");
        esmd_buf_put_json_string(&b, key, strlen(key));
    }
    esmd_buf_puts(&b, "],\"assignedPartitions\":[");
    bool first = true;
    PARTS_FOREACH(kc, part)
    {
        if (!part->shard)
            continue;
        if (!first)
            esmd_buf_puts(&b, ",");
        first = false;
        esmd_buf_put_json_string(&b, part->key, strlen(part->key));
    }
    esmd_buf_puts(&b, "]");
    esmd_esm_log(kc->esm_level, kc->log, ESMD_ESM_POLLER_STATUS, b.data, b.len);
    esmd_buf_free(&b);
}

static void part_apply_pause(struct esmd_kafka *kc, struct kafka_part *part);

static void rebalance_assign(struct esmd_kafka *kc, rd_kafka_topic_partition_list_t *parts)
{
    bool coop = is_cooperative(kc->rk);
    rd_kafka_topic_partition_list_t *list = rd_kafka_topic_partition_list_copy(parts);
    rd_kafka_topic_partition_list_t *resume = rd_kafka_topic_partition_list_new(0);
    bool emitting = kc->state == KAFKA_RUNNING;
    if (emitting && kc->start == ESMD_START_AT_TIMESTAMP && list->cnt > 0)
        position_at_timestamp(kc, list);
    for (int i = 0; emitting && i < list->cnt; i++) {
        const rd_kafka_topic_partition_t *p = &list->elems[i];
        struct kafka_part *part = part_get(kc, p->topic, p->partition);
        if (part->shard)
            continue; /* already ours (cooperative: assign of an owned partition) */
        part->first = part->next = part->stored = part->committed = -1;
        part->core_pause = false;
        if (part->paused) {
            /* the application pause flag outlives the assignment in librdkafka */
            rd_kafka_topic_partition_list_add(resume, part->topic, part->partition);
            part->paused = false;
        }
        size_t overhead = esmd_kafka_group_overhead(part->key);
        kc->opening = part;
        part->shard = kc->host->shard_open(kc->host->core, part->key, overhead, part);
        kc->opening = NULL;
        kc->nassigned++;
    }
    rd_kafka_resp_err_t err;
    if (coop) {
        rd_kafka_error_t *error = rd_kafka_incremental_assign(kc->rk, list);
        err = error ? rd_kafka_error_code(error) : RD_KAFKA_RESP_ERR_NO_ERROR;
        if (error)
            rd_kafka_error_destroy(error);
    } else {
        err = rd_kafka_assign(kc->rk, list);
    }
    if (err) {
        ESMD_ERROR(kc->log, "kafka assign of %d partitions failed: %s", list->cnt,
                   rd_kafka_err2str(err));
        for (int i = 0; i < list->cnt; i++) {
            struct kafka_part *part = part_find(kc, list->elems[i].topic, list->elems[i].partition);
            if (part)
                shard_close_part(kc, part);
        }
    } else {
        if (resume->cnt > 0)
            rd_kafka_resume_partitions(kc->rk, resume);
        /* pauses the core asked for while opening them (a disabled mapping) */
        for (int i = 0; emitting && i < list->cnt; i++) {
            struct kafka_part *part = part_find(kc, list->elems[i].topic, list->elems[i].partition);
            if (part && part->shard)
                part_apply_pause(kc, part);
        }
        ESMD_INFO(kc->log, "kafka assigned %d partitions (%s), %zu owned", list->cnt,
                  coop ? "cooperative" : "eager", kc->nassigned);
        kc->generation++;
        poller_event(kc, "PARTITIONS_ASSIGNED", list);
        kafka_recover(kc, KAFKA_DOWN_SOURCE);
    }
    rd_kafka_topic_partition_list_destroy(resume);
    rd_kafka_topic_partition_list_destroy(list);
}

static void rebalance_revoke(struct esmd_kafka *kc, rd_kafka_topic_partition_list_t *parts)
{
    bool coop = is_cooperative(kc->rk);
    bool lost = rd_kafka_assignment_lost(kc->rk);
    if (lost)
        ESMD_WARN(kc->log, "kafka assignment lost (%d partitions): not committing", parts->cnt);
    else
        commit_sync(kc);
    for (int i = 0; i < parts->cnt; i++) {
        struct kafka_part *part = part_find(kc, parts->elems[i].topic, parts->elems[i].partition);
        if (part)
            shard_close_part(kc, part);
    }
    if (coop) {
        rd_kafka_error_t *error = rd_kafka_incremental_unassign(kc->rk, parts);
        if (error) {
            ESMD_ERROR(kc->log, "kafka incremental unassign failed: %s",
                       rd_kafka_error_string(error));
            rd_kafka_error_destroy(error);
        }
    } else {
        rd_kafka_resp_err_t err = rd_kafka_assign(kc->rk, NULL);
        if (err)
            ESMD_ERROR(kc->log, "kafka unassign failed: %s", rd_kafka_err2str(err));
    }
    ESMD_INFO(kc->log, "kafka revoked %d partitions, %zu owned", parts->cnt, kc->nassigned);
    kc->generation++;
    poller_event(kc, lost ? "PARTITIONS_LOST" : "PARTITIONS_REVOKED", parts);
}

/* Served from rd_kafka_consumer_poll() / rd_kafka_consume_queue(): loop thread. */
static void on_rebalance(rd_kafka_t *rk, rd_kafka_resp_err_t err,
                         rd_kafka_topic_partition_list_t *parts, void *opaque)
{
    struct esmd_kafka *kc = opaque;
    switch (err) {
    case RD_KAFKA_RESP_ERR__ASSIGN_PARTITIONS:
        rebalance_assign(kc, parts);
        break;
    case RD_KAFKA_RESP_ERR__REVOKE_PARTITIONS:
        rebalance_revoke(kc, parts);
        break;
    default:
        ESMD_ERROR(kc->log, "kafka rebalance failed: %s; dropping every partition",
                   rd_kafka_err2str(err));
        PARTS_FOREACH(kc, part)
        {
            shard_close_part(kc, part);
        }
        rd_kafka_assign(rk, NULL);
        break;
    }
}

/* ---- errors, statistics, logs ---- */

static enum kafka_down classify(rd_kafka_resp_err_t err)
{
    switch (err) {
    case RD_KAFKA_RESP_ERR__FATAL:
        return KAFKA_DOWN_FATAL;
    case RD_KAFKA_RESP_ERR__ALL_BROKERS_DOWN:
    case RD_KAFKA_RESP_ERR__RESOLVE:
    case RD_KAFKA_RESP_ERR__AUTHENTICATION:
    case RD_KAFKA_RESP_ERR_SASL_AUTHENTICATION_FAILED:
        return KAFKA_DOWN_CONN;
    case RD_KAFKA_RESP_ERR_TOPIC_AUTHORIZATION_FAILED:
    case RD_KAFKA_RESP_ERR_GROUP_AUTHORIZATION_FAILED:
    case RD_KAFKA_RESP_ERR_CLUSTER_AUTHORIZATION_FAILED:
    case RD_KAFKA_RESP_ERR_UNKNOWN_TOPIC_OR_PART:
    case RD_KAFKA_RESP_ERR__UNKNOWN_TOPIC:
    case RD_KAFKA_RESP_ERR__UNKNOWN_PARTITION:
        return KAFKA_DOWN_SOURCE;
    default:
        return KAFKA_UP; /* retriable, handled by librdkafka: log only */
    }
}

static void kafka_error(struct esmd_kafka *kc, rd_kafka_resp_err_t err, const char *reason)
{
    char why[512];
    enum kafka_down kind = classify(err);
    if (kind == KAFKA_DOWN_FATAL) {
        char fatal[256];
        rd_kafka_resp_err_t ferr = rd_kafka_fatal_error(kc->rk, fatal, sizeof(fatal));
        snprintf(why, sizeof(why), "kafka fatal error %s: %s", rd_kafka_err2name(ferr), fatal);
        ESMD_ERROR(kc->log, "%s; the consumer stops (restart the mapping)", why);
        kafka_set_down(kc, kind, why);
        return;
    }
    snprintf(why, sizeof(why), "kafka %s: %s", rd_kafka_err2name(err), reason);
    esmd_log_limited(kind == KAFKA_UP ? ESMD_LOG_WARN : ESMD_LOG_ERROR, kc->log, "kafka-error",
                     "%s", why);
    if (kind == KAFKA_UP)
        return;
    bool auth = err == RD_KAFKA_RESP_ERR__AUTHENTICATION ||
                err == RD_KAFKA_RESP_ERR_SASL_AUTHENTICATION_FAILED;
    /* A failed authentication closes the connection, so "all brokers are down" follows it:
     * keep the cause as the reason /readyz reports while it stands. */
    if (!auth && kind == KAFKA_DOWN_CONN && kc->down == KAFKA_DOWN_CONN && kc->down_auth)
        return;
    kafka_set_down(kc, kind, why);
    if (kc->down == KAFKA_DOWN_CONN)
        kc->down_auth = auth;
}

static void on_error(rd_kafka_t *rk, int err, const char *reason, void *opaque)
{
    kafka_error(opaque, (rd_kafka_resp_err_t)err, reason);
}

/* The periodic statistics, both ways: while the brokers are unreachable they tell us when one
 * is back; while we think the cluster works they tell us when no broker connection is up any
 * more. librdkafka reports _ALL_BROKERS_DOWN only when every broker is down at the same
 * moment, which a broker crash under load can miss (the coordinator connection is already
 * reconnecting when the last one goes down), and records still queued from before an outage
 * clear the reason it gave: without this check /readyz could stay 200 for a whole outage. */
static int on_stats(rd_kafka_t *rk, char *json, size_t json_len, void *opaque)
{
    struct esmd_kafka *kc = opaque;
    if ((kc->down != KAFKA_DOWN_CONN && kc->down != KAFKA_UP) || kc->state != KAFKA_RUNNING)
        return 0;
    cJSON *root = cJSON_ParseWithLength(json, json_len);
    const cJSON *brokers = cJSON_GetObjectItemCaseSensitive(root, "brokers");
    const cJSON *b;
    bool up = false, any_up = false;
    int nbrokers = 0;
    cJSON_ArrayForEach(b, brokers)
    {
        const cJSON *state = cJSON_GetObjectItemCaseSensitive(b, "state");
        const cJSON *nodeid = cJSON_GetObjectItemCaseSensitive(b, "nodeid");
        bool is_up = cJSON_IsString(state) && strcmp(state->valuestring, "UP") == 0;
        nbrokers++;
        any_up = any_up || is_up;
        if (is_up && cJSON_IsNumber(nodeid) && nodeid->valuedouble >= 0)
            up = true;
    }
    cJSON_Delete(root);
    if (kc->down == KAFKA_DOWN_CONN) {
        if (up)
            kafka_recover(kc, KAFKA_DOWN_CONN);
    } else if (!any_up && nbrokers > 0) {
        char why[128];
        snprintf(why, sizeof(why), "kafka: no broker connection is up (%d known)", nbrokers);
        ESMD_WARN(kc->log, "%s", why);
        kafka_set_down(kc, KAFKA_DOWN_CONN, why);
    }
    return 0; /* librdkafka frees json */
}

/* librdkafka's log lines, delivered through the log queue: loop thread. */
static void on_log(const rd_kafka_t *rk, int level, const char *fac, const char *buf)
{
    struct esmd_kafka *kc = rd_kafka_opaque(rk);
    esmd_kafka_log(kc ? kc->log : NULL, level, fac, buf);
}

/* ---- consuming ---- */

static void view_of(const struct esmd_record *rec, struct esmd_kafka_view *v)
{
    const struct kafka_rec *kr = (const struct kafka_rec *)rec;
    rd_kafka_message_t *rkm = kr->rkm;
    rd_kafka_headers_t *hdrs = NULL;
    v->topic = rd_kafka_topic_name(rkm->rkt);
    v->partition = rkm->partition;
    v->offset = rkm->offset;
    v->timestamp = rd_kafka_message_timestamp(rkm, &v->tstype);
    if (v->tstype == RD_KAFKA_TIMESTAMP_NOT_AVAILABLE)
        v->timestamp = -1;
    v->key = rkm->key;
    v->key_len = rkm->key ? rkm->key_len : 0;
    v->value = rkm->payload;
    v->value_len = rkm->payload ? rkm->len : 0;
    v->key_format = v->value_format = NULL;
    v->key_schema_id = v->value_schema_id = 0;
    v->key_is_json = v->value_is_json = false;
    const struct kafka_dec *d = kr->dec;
    if (d && d->key.set) {
        v->key = d->source ? (const void *)d->key.src : d->key.json;
        v->key_len = d->source ? d->key.src_len : d->key.json_len;
        v->key_format = esmd_sr_format_name(d->key.format);
        v->key_schema_id = d->key.id;
    }
    if (d && d->value.set) {
        v->value = d->source ? (const void *)d->value.src : d->value.json;
        v->value_len = d->source ? d->value.src_len : d->value.json_len;
        v->value_format = esmd_sr_format_name(d->value.format);
        v->value_schema_id = d->value.id;
    }
    /* parsed once on first call and kept with the message */
    v->headers = rd_kafka_message_headers(rkm, &hdrs) == RD_KAFKA_RESP_ERR_NO_ERROR ? hdrs : NULL;
}

static void emit_rec(struct esmd_kafka *kc, struct kafka_part *part, struct kafka_rec *kr)
{
    struct esmd_kafka_view v;
    view_of(&kr->rec, &v);
    kr->rec.timestamp_ms = v.timestamp >= 0 ? v.timestamp : esmd_now_ms();
    kr->rec.size = esmd_kafka_record_size(&v);
    kc->host->emit(kc->host->core, part->shard, &kr->rec);
}

/* ---- schema registry (docs/kafka.md "Schema registry") ---- */

static void dec_free(struct kafka_dec *d)
{
    if (!d)
        return;
    free(d->key.json);
    free(d->value.json);
    free(d);
}

/* Fails kr with Lambda's condition; the record keeps its bytes as they came. */
static void rec_fail(struct esmd_kafka *kc, struct kafka_rec *kr, const char *condition,
                     const char *attr, const char *why)
{
    esmd_log_limited(ESMD_LOG_WARN, kc->log, "schema-record", "kafka record %s-%d@%lld %s: %s (%s)",
                     rd_kafka_topic_name(kr->rkm->rkt), (int)kr->rkm->partition,
                     (long long)kr->rkm->offset, attr, why, condition);
    dec_free(kr->dec);
    kr->dec = NULL;
    kr->rec.fail = condition;
}

/* Decodes the validated attributes of kr. false: a schema is being fetched (kr waits); true:
 * kr is ready to emit, decoded or failed (kr->rec.fail). */
static bool sr_prepare(struct esmd_kafka *kc, struct kafka_rec *kr)
{
    const rd_kafka_message_t *rkm = kr->rkm;
    struct {
        bool on;
        const char *name;
        const void *data;
        size_t len;
        int32_t id;
        const unsigned char *body;
        size_t body_len;
        const struct esmd_sr_schema *schema;
    } at[2] = {
        {kc->sr_key, "key", rkm->key, rkm->key ? rkm->key_len : 0, 0, NULL, 0, NULL},
        {kc->sr_value, "value", rkm->payload, rkm->payload ? rkm->len : 0, 0, NULL, 0, NULL},
    };
    /* every schema first: nothing is decoded while one is missing */
    for (int i = 0; i < 2; i++) {
        if (!at[i].on || !at[i].data)
            continue; /* a null key or value (a tombstone) stays null */
        if (!esmd_sr_frame(at[i].data, at[i].len, &at[i].id, &at[i].body, &at[i].body_len)) {
            rec_fail(kc, kr, "DESERIALIZATION_ERROR", at[i].name,
                     "not in the schema registry's wire format (magic byte 0, schema id)");
            return true;
        }
        const char *why = NULL;
        switch (esmd_sr_get(kc->sr, at[i].id, &at[i].schema, &why)) {
        case ESMD_SR_PENDING:
            return false;
        case ESMD_SR_MISSING:
            rec_fail(kc, kr, "SCHEMA_NOT_FOUND", at[i].name, why ? why : "unknown schema id");
            return true;
        case ESMD_SR_BAD:
            rec_fail(kc, kr, "DESERIALIZATION_ERROR", at[i].name, why ? why : "unusable schema");
            return true;
        case ESMD_SR_READY:
            break;
        }
    }
    struct kafka_dec *d = esmd_xcalloc(1, sizeof(*d));
    d->source = kc->sr_source;
    kr->dec = d;
    for (int i = 0; i < 2; i++) {
        if (!at[i].on || !at[i].data)
            continue;
        struct kafka_dec_attr *a = i == 0 ? &d->key : &d->value;
        struct esmd_buf out = ESMD_BUF_INIT;
        char err[256];
        if (!esmd_sr_decode(at[i].schema, at[i].body, at[i].body_len, &out, &a->src, &a->src_len,
                            err, sizeof(err))) {
            esmd_buf_free(&out);
            char why[320];
            snprintf(why, sizeof(why), "schema %d: %s", (int)at[i].id, err);
            rec_fail(kc, kr, "DESERIALIZATION_ERROR", at[i].name, why);
            return true;
        }
        a->set = true;
        a->format = esmd_sr_schema_format(at[i].schema);
        a->id = at[i].id;
        esmd_buf_putc(&out, '\0'); /* a NUL after the text; not counted */
        a->json = esmd_buf_steal(&out, &a->json_len);
        a->json_len--;
    }
    return true;
}

/* A schema arrived (or an id turned out missing): the records waiting for it go on, in order. */
static void on_sr_changed(void *ud)
{
    struct esmd_kafka *kc = ud;
    PARTS_FOREACH(kc, part)
    {
        if (!part->whead)
            continue;
        while (part->whead && part->shard && kc->state == KAFKA_RUNNING) {
            struct kafka_rec *kr = part->whead;
            if (!sr_prepare(kc, kr))
                break;
            part->whead = kr->wnext;
            if (!part->whead)
                part->wtail = NULL;
            kr->wnext = NULL;
            part->wcount--;
            part->wbytes -= kr->rkm->len + kr->rkm->key_len;
            emit_rec(kc, part, kr);
        }
        part_apply_pause(kc, part);
    }
}

static void on_sr_down(void *ud, const char *why)
{
    struct esmd_kafka *kc = ud;
    if (why)
        kafka_set_down(kc, KAFKA_DOWN_REGISTRY, why);
    else if (kc->down == KAFKA_DOWN_REGISTRY)
        kafka_set_ready(kc);
}

/* Takes ownership of rkm. */
static void handle_message(struct esmd_kafka *kc, rd_kafka_message_t *rkm)
{
    if (rkm->err) {
        if (rkm->err == RD_KAFKA_RESP_ERR__PARTITION_EOF)
            kafka_recover(kc, KAFKA_DOWN_SOURCE);
        else
            kafka_error(kc, rkm->err, rd_kafka_message_errstr(rkm));
        rd_kafka_message_destroy(rkm);
        return;
    }
    if (kc->state != KAFKA_RUNNING) {
        rd_kafka_message_destroy(rkm); /* never acked: read again by the next owner */
        return;
    }
    const char *topic = rd_kafka_topic_name(rkm->rkt);
    struct kafka_part *part = part_find(kc, topic, rkm->partition);
    if (!part || !part->shard) {
        ESMD_DEBUG(kc->log, "kafka record %s-%d@%lld of an unassigned partition dropped", topic,
                   (int)rkm->partition, (long long)rkm->offset);
        rd_kafka_message_destroy(rkm);
        return;
    }
    if (part->next >= 0 && rkm->offset < part->next) {
        /* the core already has it (seq must ascend per shard) */
        ESMD_DEBUG(kc->log, "kafka record %s@%lld seen again, dropped", part->key,
                   (long long)rkm->offset);
        rd_kafka_message_destroy(rkm);
        return;
    }
    struct kafka_rec *kr = esmd_xcalloc(1, sizeof(*kr));
    kr->rkm = rkm;
    kr->rec.seq = rkm->offset;
    kr->rec.priv = rkm;
    if (part->first < 0)
        part->first = rkm->offset;
    part->next = rkm->offset + 1;
    kafka_recover(kc, KAFKA_DOWN_SOURCE);
    if (kc->sr && (part->whead || !sr_prepare(kc, kr))) {
        /* its schema is being fetched: it waits, and so does the partition (order) */
        if (part->wtail)
            part->wtail->wnext = kr;
        else
            part->whead = kr;
        part->wtail = kr;
        part->wcount++;
        part->wbytes += rkm->len + rkm->key_len;
        part_apply_pause(kc, part);
        return;
    }
    emit_rec(kc, part, kr);
}

static void close_finish(struct esmd_kafka *kc);

/* Serves the queue: up to KAFKA_DRAIN_MAX messages, callbacks on the way. */
static void kafka_drain(struct esmd_kafka *kc)
{
    if (!kc->rk || kc->draining || kc->state == KAFKA_CLOSED)
        return;
    kc->draining = true;
    esmd_kafka_wake_clear(&kc->wake);
    enum kafka_state state = kc->state;
    if (kc->held && state == KAFKA_RUNNING) {
        kc->draining = false; /* what librdkafka prefetched waits in its queue (kafka_hold) */
        return;
    }
    rd_kafka_queue_t *q = state == KAFKA_CLOSING ? kc->closeq : kc->rkqu;
    int n = 0;
    for (; n < KAFKA_DRAIN_MAX && kc->state == state && !(kc->held && state == KAFKA_RUNNING);
         n++) {
        rd_kafka_message_t *rkm = state == KAFKA_CLOSING ? rd_kafka_consume_queue(q, 0)
                                                         : rd_kafka_consumer_poll(kc->rk, 0);
        if (!rkm)
            break;
        handle_message(kc, rkm);
    }
    kc->draining = false;
    if (kc->state == KAFKA_CLOSING && rd_kafka_consumer_closed(kc->rk)) {
        close_finish(kc);
        return;
    }
    /* more may be queued: a bounded turn, a state change, or a callback that yielded */
    if (kc->state != KAFKA_CLOSED &&
        (n == KAFKA_DRAIN_MAX || kc->state != state ||
         rd_kafka_queue_length(kc->state == KAFKA_CLOSING ? kc->closeq : kc->rkqu) > 0))
        ev_timer_start(kc->host->loop, &kc->kick);
}

static void on_io(struct ev_loop *loop, ev_io *w, int revents)
{
    kafka_drain(w->data);
}

static void on_kick(struct ev_loop *loop, ev_timer *w, int revents)
{
    ev_timer_stop(loop, w);
    kafka_drain(w->data);
}

static void on_tick(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct esmd_kafka *kc = w->data;
    kafka_drain(kc);
    double now = ev_now(loop);
    if (kc->state == KAFKA_CLOSING && now >= kc->close_deadline) {
        ESMD_WARN(kc->log, "kafka consumer close did not finish in %.0f s; giving up",
                  KAFKA_CLOSE_TIMEOUT_S);
        close_finish(kc);
        return;
    }
    if (kc->commit_inflight && now - kc->last_commit > KAFKA_COMMIT_WATCHDOG_S) {
        ESMD_WARN(kc->log, "kafka commit result not received in %.0f s; committing again",
                  KAFKA_COMMIT_WATCHDOG_S);
        kc->commit_inflight = false;
        if (kc->state == KAFKA_RUNNING)
            commit_schedule(kc);
    }
}

/* KAFKA_STATUS_EVENT, one line per owned partition (docs/operations.md#esm-logging):
 * endOffset the partition's high watermark as last fetched (-1 before a fetch), consumedOffset
 * the offset after the last record read, processedOffset after the last one finished (stored),
 * committedOffset the group's committed offset as last seen (-1: none yet). */
static void on_status(struct ev_loop *loop, ev_timer *w, int revents)
{
    ESMD_UNUSED(loop);
    ESMD_UNUSED(revents);
    struct esmd_kafka *kc = w->data;
    if (kc->state != KAFKA_RUNNING)
        return;
    struct esmd_buf b = ESMD_BUF_INIT;
    PARTS_FOREACH(kc, part)
    {
        if (!part->shard)
            continue;
        int64_t lo = -1, hi = -1;
        if (rd_kafka_get_watermark_offsets(kc->rk, part->topic, part->partition, &lo, &hi) !=
            RD_KAFKA_RESP_ERR_NO_ERROR)
            hi = -1;
        esmd_buf_reset(&b);
        esmd_buf_puts(&b, ",\"partition\":");
        esmd_buf_put_json_string(&b, part->key, strlen(part->key));
        esmd_buf_puts(&b, ",\"topic\":");
        esmd_buf_put_json_string(&b, part->topic, strlen(part->topic));
        esmd_buf_printf(&b,
                        ",\"partitionId\":%d,\"endOffset\":%lld,\"consumedOffset\":%lld,"
                        "\"processedOffset\":%lld,\"committedOffset\":%lld",
                        (int)part->partition, (long long)hi, (long long)part->next,
                        (long long)part->stored, (long long)part->committed);
        esmd_esm_log(kc->esm_level, kc->log, ESMD_ESM_KAFKA_STATUS, b.data, b.len);
    }
    esmd_buf_free(&b);
}

static void on_done(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct esmd_kafka *kc = w->data;
    ev_timer_stop(loop, w);
    void (*done)(void *ud) = kc->done;
    kc->done = NULL;
    if (done)
        done(kc->done_ud); /* may destroy kc: touch nothing after */
}

static void close_finish(struct esmd_kafka *kc)
{
    kc->state = KAFKA_CLOSED;
    kc->ready = false;
    /* nothing is served any more: stop the wake-ups (the pipe would stay readable) */
    esmd_kafka_wake_stop(&kc->wake, kc->closeq, kc->rkqu);
    ev_timer_stop(kc->host->loop, &kc->tick);
    ev_timer_stop(kc->host->loop, &kc->kick);
    ev_timer_stop(kc->host->loop, &kc->commit_tm);
    ev_timer_stop(kc->host->loop, &kc->status_tm);
    ev_timer_start(kc->host->loop, &kc->done_tm);
    ESMD_INFO(kc->log, "kafka consumer closed");
}

/* ---- the operations ---- */

static void kafka_destroy(void *c);

/* A source's connection may not set what esmd sets for the consumer. */
static enum esmd_kafka_prop_use prop_use(const char *key, void *ud)
{
    ESMD_UNUSED(ud);
    return esmd_kafka_property_reserved(key) ? ESMD_KAFKA_PROP_REFUSE : ESMD_KAFKA_PROP_SET;
}

static void *kafka_create(const struct esmd_mapping_cfg *cfg, const struct esmd_host *host,
                          char *err, size_t errlen)
{
    const struct esmd_kafka_source_cfg *src = &cfg->kafka;
    if (cfg->kind != ESMD_SOURCE_KAFKA || !src->conn || !src->conn->bootstrap_servers ||
        src->ntopics == 0) {
        snprintf(err, errlen, "mapping %s: kafka source needs a kafka connection and topics",
                 cfg->name ? cfg->name : "?");
        return NULL;
    }
    struct esmd_kafka *kc = esmd_xcalloc(1, sizeof(*kc));
    kc->host = host;
    kc->log = host->log;
    esmd_kafka_wake_init(&kc->wake, host->loop, on_io, kc);
    kc->servers = esmd_xstrdup(src->conn->bootstrap_servers);
    kc->topics = esmd_xcalloc(src->ntopics, sizeof(*kc->topics));
    for (size_t i = 0; i < src->ntopics; i++)
        kc->topics[i] = esmd_xstrdup(src->topics[i]);
    kc->ntopics = src->ntopics;
    if (src->consumer_group) {
        kc->group = esmd_xstrdup(src->consumer_group);
    } else {
        size_t n = strlen(cfg->name) + 6;
        kc->group = esmd_xmalloc(n);
        snprintf(kc->group, n, "esmd-%s", cfg->name);
    }
    kc->start = src->starting_position;
    kc->start_ts_ms = src->starting_position_timestamp_ms;
    kc->envelope = esmd_kafka_envelope_size(kc->servers);
    kc->down = KAFKA_UP;
    const struct esmd_schema_registry_cfg *src_sr = &src->schema_registry;
    if (src_sr->set && src_sr->url) {
        struct esmd_sr_hooks hooks = {.changed = on_sr_changed, .down = on_sr_down, .ud = kc};
        kc->sr = esmd_sr_new(src_sr, host->loop, host->log, &hooks, err, errlen);
        if (!kc->sr)
            goto fail;
        for (size_t i = 0; i < src_sr->nvalidate; i++) {
            kc->sr_key = kc->sr_key || strcmp(src_sr->validate[i], "key") == 0;
            kc->sr_value = kc->sr_value || strcmp(src_sr->validate[i], "value") == 0;
        }
        if (src_sr->nvalidate == 0)
            kc->sr_value = true;
        kc->sr_source = src_sr->event_record_format == ESMD_SCHEMA_RECORD_SOURCE;
    }
    kc->esm_level = cfg->system_log_level;

    char client_id[256];
    snprintf(client_id, sizeof(client_id), "esmd-%s",
             host->instance_id ? host->instance_id : "instance");
    const char *const defaults[][2] = {
        {"bootstrap.servers", kc->servers},
        {"group.id", kc->group},
        {"client.id", client_id},
        {"enable.auto.commit", "false"},
        {"enable.auto.offset.store", "false"},
        {"auto.offset.reset", kc->start == ESMD_START_LATEST ? "latest" : "earliest"},
        {"statistics.interval.ms", KAFKA_STATS_INTERVAL_MS},
        {"topic.metadata.refresh.interval.ms", KAFKA_METADATA_REFRESH_MS},
        /* librdkafka (2.0) re-checks a partition whose prefetch queue was full only about once a
         * second, so a full queue stalls the whole consumer. esmd drains the queue at once and
         * does its own flow control (pausing partitions), so bound the queue by bytes only and
         * well below the 64 MB default: the process stays small, fetching keeps going. */
        {"queued.min.messages", "1000000"},
        {"queued.max.messages.kbytes", "16384"},
    };
    kc->conf = esmd_kafka_conf_new(defaults, ESMD_ARRAY_LEN(defaults), src->conn, prop_use, NULL,
                                   err, errlen);
    if (!kc->conf)
        goto fail;
    rd_kafka_conf_set_opaque(kc->conf, kc);
    rd_kafka_conf_set_rebalance_cb(kc->conf, on_rebalance);
    rd_kafka_conf_set_error_cb(kc->conf, on_error);
    rd_kafka_conf_set_stats_cb(kc->conf, on_stats);
    rd_kafka_conf_set_log_cb(kc->conf, on_log);

    ev_timer_init(&kc->kick, on_kick, 0.0, 0.0);
    kc->kick.data = kc;
    ev_timer_init(&kc->tick, on_tick, KAFKA_TICK_S, KAFKA_TICK_S);
    kc->tick.data = kc;
    ev_timer_init(&kc->commit_tm, on_commit_timer, 0.0, 0.0);
    kc->commit_tm.data = kc;
    ev_timer_init(&kc->done_tm, on_done, 0.0, 0.0);
    kc->done_tm.data = kc;
    double every = KAFKA_STATUS_INTERVAL_S;
    const char *env = getenv("ESMD_KAFKA_STATUS_INTERVAL_MS"); /* testing only */
    if (env && atol(env) > 0)
        every = (double)atol(env) / 1000.0;
    ev_timer_init(&kc->status_tm, on_status, every, every);
    kc->status_tm.data = kc;
    kc->watchers_init = true;
    return kc;
fail:
    kafka_destroy(kc);
    return NULL;
}

static size_t kafka_envelope_size(void *c)
{
    const struct esmd_kafka *kc = c;
    return kc->envelope;
}

static int kafka_start(void *c)
{
    struct esmd_kafka *kc = c;
    if (kc->state != KAFKA_CREATED || !kc->conf)
        return ESMD_ESTATE;
    char errstr[512];
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_CONSUMER, kc->conf, errstr, sizeof(errstr));
    if (!rk) {
        ESMD_ERROR(kc->log, "kafka consumer: %s", errstr);
        return ESMD_EIO;
    }
    kc->conf = NULL; /* rd_kafka_new took it */
    kc->rk = rk;
    rd_kafka_poll_set_consumer(rk); /* logs → main queue → consumer queue */
    kc->rkqu = rd_kafka_queue_get_consumer(rk);
    if (esmd_kafka_wake_start(&kc->wake, rk, kc->rkqu, errstr, sizeof(errstr)) != ESMD_OK) {
        ESMD_ERROR(kc->log, "kafka consumer: %s", errstr);
        return ESMD_EIO;
    }

    rd_kafka_topic_partition_list_t *topics = rd_kafka_topic_partition_list_new((int)kc->ntopics);
    for (size_t i = 0; i < kc->ntopics; i++)
        rd_kafka_topic_partition_list_add(topics, kc->topics[i], RD_KAFKA_PARTITION_UA);
    rd_kafka_resp_err_t err = rd_kafka_subscribe(rk, topics);
    rd_kafka_topic_partition_list_destroy(topics);
    if (err) {
        ESMD_ERROR(kc->log, "kafka subscribe: %s", rd_kafka_err2str(err));
        return ESMD_EIO;
    }
    kc->state = KAFKA_RUNNING;
    ev_timer_start(kc->host->loop, &kc->tick);
    if (esmd_esm_log_enabled(kc->esm_level, ESMD_ESM_KAFKA_STATUS))
        ev_timer_start(kc->host->loop, &kc->status_tm);
    ev_timer_start(kc->host->loop, &kc->kick);
    ESMD_INFO(kc->log, "kafka consumer started (group %s, %zu topics, %s)", kc->group, kc->ntopics,
              rd_kafka_name(rk));
    return ESMD_OK;
}

static void pause_resume(struct esmd_kafka *kc, struct esmd_shard *shard, bool pause)
{
    struct kafka_part *part = shard ? esmd_shard_priv(shard) : NULL;
    if (part && part == kc->opening) {
        part->core_pause = pause; /* from inside shard_open: applied once it is assigned */
        return;
    }
    if (!kc->rk || !part || part->shard != shard)
        return;
    part->core_pause = pause;
    part_apply_pause(kc, part);
}

/* Paused in librdkafka while the core asks for it or enough records wait for their schema.
 * Not at the first waiting record: a schema usually arrives within milliseconds, and a pause
 * costs far more than that (librdkafka drops the partition's prefetched records and fetches
 * them again on resume: about a second of the partition's time on the mock cluster, every time
 * a new schema id appears). Records that arrive meanwhile join the wait list, in order; past
 * the limits (a registry that is slow or down) the partition is paused. */
static void part_apply_pause(struct esmd_kafka *kc, struct kafka_part *part)
{
    bool pause = part->core_pause || part->wcount >= KAFKA_SR_WAIT_RECORDS ||
                 part->wbytes >= KAFKA_SR_WAIT_BYTES;
    if (!kc->rk || !part->shard || part->paused == pause)
        return;
    rd_kafka_topic_partition_list_t *list = one_partition(part);
    rd_kafka_resp_err_t err =
        pause ? rd_kafka_pause_partitions(kc->rk, list) : rd_kafka_resume_partitions(kc->rk, list);
    if (!err)
        err = list->elems[0].err;
    rd_kafka_topic_partition_list_destroy(list);
    if (err) {
        ESMD_WARN(kc->log, "kafka %s %s: %s", pause ? "pause" : "resume", part->key,
                  rd_kafka_err2str(err));
        return;
    }
    part->paused = pause;
    if (!pause)
        ESMD_DEBUG(kc->log, "kafka %s resumed", part->key);
    else if (part->core_pause)
        ESMD_DEBUG(kc->log, "kafka %s paused (backpressure)", part->key);
    else
        ESMD_DEBUG(kc->log, "kafka %s paused: %d records (%zu B) wait for their schema", part->key,
                   part->wcount, part->wbytes);
}

static void kafka_pause(void *c, struct esmd_shard *shard)
{
    pause_resume(c, shard, true);
}

static void kafka_resume(void *c, struct esmd_shard *shard)
{
    pause_resume(c, shard, false);
}

/* Backpressure for the whole consumer (docs/kafka.md "Flow control"): the queue is not served
 * while held, so librdkafka keeps its prefetched records and stops fetching once its queue
 * holds queued.max.messages.kbytes; nothing is dropped and fetched again, as a pause would. */
static void kafka_hold(void *c, bool hold)
{
    struct esmd_kafka *kc = c;
    kc->held = hold;
    if (!hold && kc->rk)
        ev_timer_start(kc->host->loop, &kc->kick);
}

static void kafka_ack(void *c, struct esmd_shard *shard, int64_t next_seq)
{
    struct esmd_kafka *kc = c;
    struct kafka_part *part = shard ? esmd_shard_priv(shard) : NULL;
    if (!kc->rk || !part || part->shard != shard || next_seq <= part->stored)
        return; /* revoked, or not moving forward */
    if (kc->state != KAFKA_RUNNING && kc->state != KAFKA_CLOSING)
        return;
    rd_kafka_topic_partition_list_t *list = one_partition(part);
    list->elems[0].offset = next_seq;
    rd_kafka_resp_err_t err = rd_kafka_offsets_store(kc->rk, list);
    if (!err)
        err = list->elems[0].err;
    rd_kafka_topic_partition_list_destroy(list);
    if (err) {
        esmd_log_limited(ESMD_LOG_WARN, kc->log, "kafka-store", "kafka store %s@%lld: %s",
                         part->key, (long long)next_seq, rd_kafka_err2str(err));
        return;
    }
    part->stored = next_seq;
    if (kc->state == KAFKA_RUNNING)
        commit_schedule(kc);
}

static void kafka_rec_free(struct kafka_rec *kr)
{
    if (!kr)
        return;
    rd_kafka_message_destroy(kr->rkm);
    dec_free(kr->dec);
    free(kr);
}

static void kafka_release(void *c, struct esmd_record *rec)
{
    (void)c;
    kafka_rec_free((struct kafka_rec *)rec);
}

static enum esmd_filter_data kafka_filter_doc(void *c, const struct esmd_record *rec,
                                              struct esmd_buf *out)
{
    (void)c;
    struct esmd_kafka_view v;
    view_of(rec, &v);
    /* filters see decoded data as JSON, whatever the event carries */
    const struct kafka_dec *d = ((const struct kafka_rec *)rec)->dec;
    if (d && d->key.set) {
        v.key = d->key.json;
        v.key_len = d->key.json_len;
        v.key_is_json = true;
    }
    if (d && d->value.set) {
        v.value = d->value.json;
        v.value_len = d->value.json_len;
        v.value_is_json = true;
    }
    return esmd_kafka_filter_doc(&v, out);
}

static void kafka_failure_info(void *c, const struct esmd_record *rec, size_t payload_size,
                               struct esmd_buf *out)
{
    struct esmd_kafka *kc = c;
    struct esmd_kafka_view v;
    view_of(rec, &v);
    esmd_kafka_failure_info(kc->servers, &v, payload_size, out);
}

static void kafka_record_key(void *c, const struct esmd_record *rec, const void **key, size_t *len)
{
    (void)c;
    const rd_kafka_message_t *rkm = ((const struct kafka_rec *)rec)->rkm;
    *key = rkm->key;
    *len = rkm->key ? rkm->key_len : 0;
}

static bool kafka_item_is(void *c, const struct esmd_record *rec, const struct cJSON *id)
{
    (void)c;
    struct esmd_kafka_view v;
    view_of(rec, &v);
    return esmd_kafka_item_is(&v, id);
}

/* The record's trace headers: traceparent, tracestate, X-Amzn-Trace-Id (names in any case; the
 * last of a repeated name wins, as a later header overrides an earlier one). */
static bool kafka_trace(void *c, const struct esmd_record *rec, struct esmd_trace *out)
{
    (void)c;
    struct esmd_kafka_view v;
    view_of(rec, &v);
    esmd_trace_clear(out);
    if (!v.headers)
        return false;
    const char *name;
    const void *val;
    size_t len;
    for (size_t i = 0;
         rd_kafka_header_get_all(v.headers, i, &name, &val, &len) == RD_KAFKA_RESP_ERR_NO_ERROR;
         i++) {
        if (val)
            esmd_trace_set(out, name, val, len);
    }
    return !esmd_trace_empty(out);
}

static void kafka_encode(void *c, const struct esmd_batch *batch, struct esmd_buf *out)
{
    const struct esmd_kafka *kc = c;
    esmd_kafka_encode_batch(kc->servers, batch, view_of, out);
}

static void kafka_stop(void *c, void (*done)(void *ud), void *ud)
{
    struct esmd_kafka *kc = c;
    if (kc->state == KAFKA_CLOSING || kc->state == KAFKA_CLOSED) {
        if (kc->done) /* a stop is already under way: keep the first caller's callback */
            return;
    }
    kc->done = done;
    kc->done_ud = ud;
    if (kc->state != KAFKA_RUNNING) {
        kc->state = KAFKA_CLOSED;
        ev_timer_start(kc->host->loop, &kc->done_tm);
        return;
    }
    commit_sync(kc);
    kc->closeq = rd_kafka_queue_new(kc->rk);
    /* the consumer queue is forwarded to closeq: only the final queue may signal */
    esmd_kafka_wake_move(&kc->wake, kc->rkqu, kc->closeq);
    rd_kafka_error_t *error = rd_kafka_consumer_close_queue(kc->rk, kc->closeq);
    if (error) {
        ESMD_WARN(kc->log, "kafka consumer close: %s", rd_kafka_error_string(error));
        rd_kafka_error_destroy(error);
        close_finish(kc);
        return;
    }
    kc->state = KAFKA_CLOSING;
    kc->close_deadline = ev_now(kc->host->loop) + KAFKA_CLOSE_TIMEOUT_S;
    ev_timer_start(kc->host->loop, &kc->kick);
    ESMD_INFO(kc->log, "kafka consumer closing");
}

/* Frees everything. rd_kafka_destroy() blocks until every message is destroyed: the host
 * destroys a connector only once every record it emitted is released. */
static void kafka_free(struct esmd_kafka *kc)
{
    PARTS_FOREACH(kc, part)
    {
        wait_free(part); /* before rd_kafka_destroy(), which waits for every message */
    }
    esmd_sr_free(kc->sr);
    if (kc->rkqu)
        rd_kafka_queue_destroy(kc->rkqu);
    if (kc->closeq)
        rd_kafka_queue_destroy(kc->closeq);
    if (kc->rk) {
        /* Without a finished close, leave without serving callbacks: the core is going away
         * and must not hear of revokes now. The group notices on the session timeout. */
        bool closed = rd_kafka_consumer_closed(kc->rk);
        rd_kafka_destroy_flags(kc->rk, closed ? 0 : RD_KAFKA_DESTROY_F_NO_CONSUMER_CLOSE);
    }
    if (kc->conf)
        rd_kafka_conf_destroy(kc->conf);
    esmd_kafka_wake_close(&kc->wake);
    for (size_t i = 0; i < kc->nbuckets; i++) {
        struct kafka_part *part = kc->buckets[i], *next;
        for (; part; part = next) {
            next = part->hnext;
            free(part->topic);
            free(part->key);
            free(part);
        }
    }
    free(kc->buckets);
    for (size_t i = 0; i < kc->ntopics; i++)
        free(kc->topics[i]);
    free(kc->topics);
    free(kc->servers);
    free(kc->group);
    free(kc);
}

/* Stops every watcher on the loop: the queues' wake-ups, the timers, the schema registry's
 * requests; nothing calls the host afterwards. */
static void kafka_detach(void *c)
{
    struct esmd_kafka *kc = c;
    if (kc->watchers_init) {
        struct ev_loop *loop = kc->host->loop;
        ev_timer_stop(loop, &kc->kick);
        ev_timer_stop(loop, &kc->tick);
        ev_timer_stop(loop, &kc->commit_tm);
        ev_timer_stop(loop, &kc->done_tm);
        ev_timer_stop(loop, &kc->status_tm);
    }
    esmd_kafka_wake_stop(&kc->wake, kc->rkqu, kc->closeq);
    esmd_sr_free(kc->sr);
    kc->sr = NULL;
}

static void kafka_destroy(void *c)
{
    struct esmd_kafka *kc = c;
    if (!kc)
        return;
    kafka_detach(kc);
    kafka_free(kc);
}

static void kafka_stats(void *c, struct esmd_connector_stats *st)
{
    struct esmd_kafka *kc = c;
    st->committed = kc->committed_total;
    st->ready = kc->ready;
    st->lag = -1;
    if (!kc->rk || kc->state != KAFKA_RUNNING)
        return;
    int64_t lag = 0;
    bool known = kc->nassigned == 0;
    PARTS_FOREACH(kc, part)
    {
        if (!part->shard)
            continue;
        int64_t lo, hi;
        if (rd_kafka_get_watermark_offsets(kc->rk, part->topic, part->partition, &lo, &hi) ||
            hi < 0)
            continue; /* nothing fetched yet */
        int64_t base = part->stored >= 0 ? part->stored : part->first >= 0 ? part->first : hi;
        if (hi > base)
            lag += hi - base;
        known = true;
    }
    if (known)
        st->lag = lag;
}

const struct esmd_connector_ops esmd_connector_kafka = {
    .kind = "kafka",
    .grouped = true,
    .source = ESMD_SOURCE_KAFKA,
    .source_keys = esmd_kafka_source_keys,
    .conn_keys = esmd_kafka_conn_keys,
    .default_batch_size = 100,
    .default_batching_window_ms = 500,
    .cfg_check = esmd_kafka_cfg_check,
    .create = kafka_create,
    .envelope_size = kafka_envelope_size,
    .start = kafka_start,
    .pause = kafka_pause,
    .resume = kafka_resume,
    .hold = kafka_hold,
    .ack = kafka_ack,
    .release = kafka_release,
    .encode = kafka_encode,
    .filter_doc = kafka_filter_doc,
    .data_key = "value",
    .filter_fallback = true,
    .batch_info_key = "KafkaBatchInfo",
    .failure_info = kafka_failure_info,
    .record_key = kafka_record_key,
    .item_is = kafka_item_is,
    .trace = kafka_trace,
    .stop = kafka_stop,
    .destroy = kafka_destroy,
    .detach = kafka_detach,
    .stats = kafka_stats,
};
