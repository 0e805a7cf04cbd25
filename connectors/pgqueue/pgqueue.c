/* The Postgres queue source: SQS semantics on the esmd.queue_messages table
 * (migrations/0002_pgqueue.sql), driven by the loop through two asynchronous connections.
 *
 * Claims: esmd.receive() takes visible rows with FOR UPDATE SKIP LOCKED, makes them invisible
 * for the visibility timeout and gives each receive a new receipt token; messages already
 * received max_receive_count times are moved to the dead-letter queue there instead. One claim
 * query is in flight at a time, on the "claim" connection, which also LISTENs on the channel
 * esmd_pgqueue (payload: the queue name) so producers wake us; a poll timer (and a timer for the
 * next message becoming visible, which esmd.receive reports) covers what NOTIFY does not.
 *
 * Concurrency: maximum_concurrency shards are opened at start. The core keeps at most one batch
 * in flight per shard, so a claim fetches batch_size messages for each idle shard (no message
 * outstanding, not paused) and emits each batch_size chunk to one of them: up to
 * maximum_concurrency batches are in flight, in no particular order.
 *
 * FIFO queues (a name ending in ".fifo"; docs/pgqueue.md#fifo-queues) claim with
 * esmd.receive_fifo(), which only takes groups with nothing in flight, and a claim fills one
 * idle shard only: its messages (whole runs of groups, in sequence order) form exactly one batch
 * (the core flushes what one loop turn emitted; a FIFO mapping has no batching window), so a
 * group is never in two batches at once. A message behind a failed message of its group in the
 * same shard is never deleted (partial batch responses, a failed first batch of a shard): it
 * comes back after its visibility timeout, behind the failed one.
 *
 * Settling: ack(shard, next_seq) deletes the shard's outstanding messages below next_seq with
 * the receipt of their receive (esmd.delete_received, on the "ack" connection, coalesced: one
 * query in flight, the next carries everything acked meanwhile); a receipt that is no longer the
 * latest (the claim expired and someone received the message again) deletes nothing. nack
 * forgets them: as in Lambda, they become visible again when their visibility timeout ends.
 * stop() gives back (makes visible at once) every claim not yet acked.
 *
 * See docs/pgqueue.md. */
#include "pgqueue_private.h"

#include "esmd/backoff.h"
#include "esmd/connector.h"
#include "esmd/log.h"
#include "esmd/metrics.h"
#include "esmd/pg.h"
#include "esmd/trace.h"

#include <cJSON.h>
#include <ev.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PGQ_CHANNEL "esmd_pgqueue"
/* Claims without a NOTIFY: the fallback poll. */
#define PGQ_POLL_S 1.0
/* A failed claim or delete is tried again after this long. */
#define PGQ_RETRY_S 1.0
/* Queue depth (visible, in flight, oldest age) for the metrics. */
#define PGQ_STATS_S 5.0
/* Longest graceful stop (deletes and give-backs that cannot reach Postgres are abandoned). */
#define PGQ_STOP_TIMEOUT_S 10.0
/* Most messages one claim query asks for (at least batch_size). */
#define PGQ_CLAIM_MAX 5000
/* Most receipts one delete or give-back query carries. */
#define PGQ_SETTLE_MAX 10000
/* A missing schema on a separate queue database: migrations are tried again this often. */
#define PGQ_MIGRATE_RETRY_S 30.0

#define PGQ_CLAIM_SQL                                                                              \
    "SELECT kind, id, message_id, receipt, body, attributes, attributes_md5, body_md5, sender, "   \
    "sent_ms, receive_count, first_received_ms, dead_letter_source, next_visible_ms, NULL, NULL, " \
    "trace_header FROM esmd.receive($1, $2::integer, $3::interval, $4::integer, $5)"
#define PGQ_CLAIM_FIFO_SQL                                                                         \
    "SELECT kind, id, message_id, receipt, body, attributes, attributes_md5, body_md5, sender, "   \
    "sent_ms, receive_count, first_received_ms, dead_letter_source, next_visible_ms, group_id, "   \
    "deduplication_id, trace_header "                                                              \
    "FROM esmd.receive_fifo($1, $2::integer, $3::interval, $4::integer, $5)"
enum {
    COL_KIND,
    COL_ID,
    COL_MESSAGE_ID,
    COL_RECEIPT,
    COL_BODY,
    COL_ATTRS,
    COL_ATTRS_MD5,
    COL_BODY_MD5,
    COL_SENDER,
    COL_SENT,
    COL_COUNT,
    COL_FIRST,
    COL_DLQ_SOURCE,
    COL_NEXT_VISIBLE,
    COL_GROUP,
    COL_DEDUP,
    COL_TRACE,
    COL_N,
};
#define PGQ_DELETE_SQL "SELECT esmd.delete_received($1::bigint[], $2::uuid[])"
#define PGQ_RELEASE_SQL "SELECT esmd.release_received($1::bigint[], $2::uuid[])"
#define PGQ_STATS_SQL                                                                              \
    "SELECT count(*) FILTER (WHERE visible_at <= now()), "                                         \
    "count(*) FILTER (WHERE visible_at > now() AND receive_count > 0), "                           \
    "coalesce(extract(epoch FROM now() - min(sent_at)), 0)::float8 "                               \
    "FROM esmd.queue_messages WHERE queue = $1"

enum pgq_state {
    PGQ_CREATED,  /* create() done, no I/O yet */
    PGQ_RUNNING,  /* start() done */
    PGQ_STOPPING, /* stop(): giving back claims, finishing deletes */
    PGQ_STOPPED,  /* done scheduled or called */
};

/* A message emitted and not yet acked or nacked: what deleting it takes. */
struct pgq_entry {
    int64_t seq;
    int64_t id;
    char receipt[37];
    uint64_t group; /* FIFO: hash of the message group (never 0); 0 for standard queues */
    bool skipped;   /* the core released it unsent (filtered out, or over 6 MB): done with it */
    bool deleted;   /* acked alone (ack_record): its delete is already queued */
    bool held;      /* FIFO: behind a failed message of its group: never deleted by this claim */
};

/* Receipts waiting for a delete or give-back query. */
struct pgq_receipts {
    struct pgq_entry *items;
    size_t n, cap;
};

struct pgq_shard {
    struct esmd_shard *shard; /* the core's handle */
    int64_t next_seq;         /* seq of the next message emitted */
    struct pgq_entry *ents;   /* outstanding, in seq order: ents[head .. head+n) */
    size_t head, n, cap;
    bool paused;
};

/* What we emit: the core's record and the message's view; the strings follow the struct. */
struct pgq_rec {
    struct esmd_record rec; /* first: the core's pointer is ours */
    struct esmd_pgqueue_view v;
};

struct esmd_pgqueue {
    const struct esmd_host *host; /* borrowed until destroy */
    const struct esmd_log_ctx *log;
    char *name; /* mapping name */
    char *queue;
    char *dlq;      /* NULL: none */
    char *conninfo; /* secret */
    bool separate_db;
    bool fifo; /* the queue's name ends in ".fifo" */
    char *arn;
    int batch_size;
    int max_receive;
    int concurrency;
    char vt_param[48];
    char mrc_param[16];

    struct esmd_pg *claim_pg; /* claims and LISTEN */
    struct esmd_pg *ack_pg;   /* deletes, give-backs, stats */

    struct pgq_shard *shards;
    size_t nshards;

    enum pgq_state state;
    bool destroying;
    bool claim_inflight;
    int claim_limit;
    bool maybe_more; /* the queue may have visible messages: claim when a shard is idle */
    char *claim_error;
    double last_migrate;

    struct pgq_receipts del, deleting; /* acked: waiting / in the query in flight */
    struct pgq_receipts rel, releasing;
    bool delete_inflight, release_inflight, stats_inflight;

    ev_timer poll;    /* PGQ_POLL_S fallback; also the retry after failures */
    ev_timer wake;    /* the next message becomes visible */
    ev_timer retry;   /* settle queries again after a failure */
    ev_timer stats;   /* queue depth */
    ev_timer stop_tm; /* PGQ_STOP_TIMEOUT_S */
    ev_timer done_tm; /* 0 s: call done() outside stop() */
    bool watchers_init;

    bool ready;
    int64_t committed;

    void (*done)(void *ud);
    void *done_ud;

    struct {
        struct esmd_series *received, *deleted, *dead_lettered, *discarded, *stale, *released,
            *visible, *in_flight, *oldest;
    } m;
};

static void claim_maybe(struct esmd_pgqueue *pq);
static void settle_flush(struct esmd_pgqueue *pq);
static void stop_check(struct esmd_pgqueue *pq);

/* ---- small helpers ---- */

static void receipts_push(struct pgq_receipts *r, const struct pgq_entry *e)
{
    if (r->n == r->cap) {
        r->cap = r->cap ? r->cap * 2 : 64;
        r->items = esmd_xrealloc(r->items, r->cap * sizeof(*r->items));
    }
    r->items[r->n++] = *e;
}

static void receipts_free(struct pgq_receipts *r)
{
    free(r->items);
    memset(r, 0, sizeof(*r));
}

/* Moves up to PGQ_SETTLE_MAX receipts from the end of src into dst (empty). */
static void receipts_take(struct pgq_receipts *dst, struct pgq_receipts *src)
{
    size_t k = src->n < PGQ_SETTLE_MAX ? src->n : PGQ_SETTLE_MAX;
    for (size_t i = 0; i < k; i++)
        receipts_push(dst, &src->items[src->n - k + i]);
    src->n -= k;
}

/* Puts dst's receipts back into src (a failed query) and empties dst. */
static void receipts_return(struct pgq_receipts *src, struct pgq_receipts *dst)
{
    for (size_t i = 0; i < dst->n; i++)
        receipts_push(src, &dst->items[i]);
    dst->n = 0;
}

/* Postgres array literals of the ids and receipts: {1,2} and {uuid,uuid}. */
static void receipts_params(const struct pgq_receipts *r, struct esmd_buf *ids,
                            struct esmd_buf *receipts)
{
    esmd_buf_putc(ids, '{');
    esmd_buf_putc(receipts, '{');
    for (size_t i = 0; i < r->n; i++) {
        if (i) {
            esmd_buf_putc(ids, ',');
            esmd_buf_putc(receipts, ',');
        }
        esmd_buf_put_i64(ids, r->items[i].id);
        esmd_buf_puts(receipts, r->items[i].receipt);
    }
    esmd_buf_putc(ids, '}');
    esmd_buf_putc(receipts, '}');
}

static void shard_push(struct pgq_shard *ps, const struct pgq_entry *e)
{
    if (ps->head > 0 && ps->head + ps->n == ps->cap) {
        memmove(ps->ents, ps->ents + ps->head, ps->n * sizeof(*ps->ents));
        ps->head = 0;
    }
    if (ps->n == ps->cap) {
        ps->cap = ps->cap ? ps->cap * 2 : 16;
        ps->ents = esmd_xrealloc(ps->ents, ps->cap * sizeof(*ps->ents));
    }
    ps->ents[ps->head + ps->n++] = *e;
}

/* Takes the shard's outstanding entries with seq < next_seq off its front; each goes to `to`
 * (NULL: forgotten). Returns how many. */
static size_t shard_pop(struct pgq_shard *ps, int64_t next_seq, struct pgq_receipts *to)
{
    size_t k = 0;
    while (ps->n > 0 && ps->ents[ps->head].seq < next_seq) {
        if (to && !ps->ents[ps->head].deleted && !ps->ents[ps->head].held)
            receipts_push(to, &ps->ents[ps->head]);
        ps->head++;
        ps->n--;
        k++;
    }
    if (ps->n == 0)
        ps->head = 0;
    return k;
}

/* FNV-1a of a FIFO message's group id, never 0; 0 for none. Equal groups give equal hashes; a
 * collision only holds back a message that could have been deleted (it comes back later). */
static uint64_t group_hash(const char *group)
{
    if (!group)
        return 0;
    uint64_t h = 1469598103934665603ULL;
    for (const unsigned char *p = (const unsigned char *)group; *p; p++)
        h = (h ^ *p) * 1099511628211ULL;
    return h ? h : 1;
}

/* FIFO: is an entry before e in its shard, of the same group, not done (failed, or not acked)? */
static bool group_blocked(const struct pgq_shard *ps, const struct pgq_entry *e)
{
    for (size_t i = ps->head; i < ps->head + ps->n && &ps->ents[i] != e; i++) {
        const struct pgq_entry *o = &ps->ents[i];
        if (o->group == e->group && (o->held || (!o->deleted && !o->skipped)))
            return true;
    }
    return false;
}

static bool is_connection_error(const char *err)
{
    return err && (strncmp(err, "connection lost", 15) == 0 || strcmp(err, "closed") == 0);
}

/* ---- readiness ---- */

static void update_ready(struct esmd_pgqueue *pq)
{
    if (pq->state != PGQ_RUNNING)
        return;
    const char *why = NULL;
    char buf[600];
    if (!esmd_pg_ready(pq->claim_pg) || !esmd_pg_ready(pq->ack_pg)) {
        const char *e = esmd_pg_last_error(esmd_pg_ready(pq->claim_pg) ? pq->ack_pg : pq->claim_pg);
        snprintf(buf, sizeof(buf), "postgres not connected%s%s", *e ? ": " : "", e);
        why = buf;
    } else if (pq->claim_error) {
        snprintf(buf, sizeof(buf), "receiving from queue %s failed: %s", pq->queue,
                 pq->claim_error);
        why = buf;
    }
    bool ready = why == NULL;
    if (ready == pq->ready)
        return;
    pq->ready = ready;
    pq->host->set_ready(pq->host->core, ready, why);
}

/* ---- claims ---- */

static size_t idle_shards(const struct esmd_pgqueue *pq)
{
    size_t k = 0;
    for (size_t i = 0; i < pq->nshards; i++)
        if (pq->shards[i].n == 0 && !pq->shards[i].paused)
            k++;
    return k;
}

static void on_claim(void *ud, const PGresult *res, const char *err);

static void claim_maybe(struct esmd_pgqueue *pq)
{
    if (pq->state != PGQ_RUNNING || pq->claim_inflight || !pq->maybe_more)
        return;
    size_t idle = idle_shards(pq);
    if (idle == 0)
        return;
    if (pq->fifo)
        idle = 1; /* one shard per claim: its messages are one batch */
    size_t want = idle * (size_t)pq->batch_size;
    size_t cap = pq->batch_size > PGQ_CLAIM_MAX ? (size_t)pq->batch_size : PGQ_CLAIM_MAX;
    if (want > cap)
        want = cap;
    char limit[24];
    snprintf(limit, sizeof(limit), "%zu", want);
    const char *params[5] = {pq->queue, limit, pq->vt_param, pq->mrc_param, pq->dlq};
    if (esmd_pg_query(pq->claim_pg, pq->fifo ? PGQ_CLAIM_FIFO_SQL : PGQ_CLAIM_SQL, 5, params,
                      on_claim, pq) != 0)
        return;
    pq->claim_inflight = true;
    pq->claim_limit = (int)want;
    pq->maybe_more = false; /* set again by a NOTIFY, a timer or a full claim */
}

static const char *value(const PGresult *res, int row, int col)
{
    return PQgetisnull(res, row, col) ? NULL : PQgetvalue(res, row, col);
}

static int64_t value_i64(const PGresult *res, int row, int col)
{
    const char *s = value(res, row, col);
    return s ? strtoll(s, NULL, 10) : 0;
}

/* Copies s (len bytes, NUL added) to *p and advances it; returns the copy. */
static char *pack(char **p, const char *s, size_t len)
{
    char *d = *p;
    memcpy(d, s, len);
    d[len] = '\0';
    *p += len + 1;
    return d;
}

/* A received row as a record (strings copied after the struct). */
static struct pgq_rec *rec_from_row(struct esmd_pgqueue *pq, const PGresult *res, int row)
{
    static const int strs[] = {COL_MESSAGE_ID, COL_RECEIPT, COL_ATTRS_MD5, COL_BODY_MD5,
                               COL_SENDER,     COL_ATTRS,   COL_BODY,      COL_DLQ_SOURCE,
                               COL_GROUP,      COL_DEDUP,   COL_TRACE};
    size_t need = sizeof(struct pgq_rec);
    for (size_t i = 0; i < ESMD_ARRAY_LEN(strs); i++)
        need += (size_t)PQgetlength(res, row, strs[i]) + 1;
    const char *src = value(res, row, COL_DLQ_SOURCE);
    char prefix[ESMD_PGQUEUE_ARN_PREFIX_MAX];
    size_t pl = esmd_pgqueue_arn_prefix(prefix);
    if (src)
        need += pl;
    struct pgq_rec *pr = esmd_xmalloc(need);
    memset(pr, 0, sizeof(*pr));
    char *p = (char *)(pr + 1);
    struct esmd_pgqueue_view *v = &pr->v;
    v->id = value_i64(res, row, COL_ID);
    v->message_id = pack(&p, PQgetvalue(res, row, COL_MESSAGE_ID),
                         (size_t)PQgetlength(res, row, COL_MESSAGE_ID));
    v->receipt =
        pack(&p, PQgetvalue(res, row, COL_RECEIPT), (size_t)PQgetlength(res, row, COL_RECEIPT));
    v->body_len = (size_t)PQgetlength(res, row, COL_BODY);
    v->body = pack(&p, PQgetvalue(res, row, COL_BODY), v->body_len);
    if (!PQgetisnull(res, row, COL_ATTRS)) {
        char *a = p;
        v->attributes_len = esmd_pgqueue_json_compact(PQgetvalue(res, row, COL_ATTRS),
                                                      (size_t)PQgetlength(res, row, COL_ATTRS), a);
        a[v->attributes_len] = '\0';
        p += v->attributes_len + 1;
        v->attributes = a;
    }
    if (!PQgetisnull(res, row, COL_ATTRS_MD5))
        v->attributes_md5 = pack(&p, PQgetvalue(res, row, COL_ATTRS_MD5),
                                 (size_t)PQgetlength(res, row, COL_ATTRS_MD5));
    v->body_md5 =
        pack(&p, PQgetvalue(res, row, COL_BODY_MD5), (size_t)PQgetlength(res, row, COL_BODY_MD5));
    v->sender =
        pack(&p, PQgetvalue(res, row, COL_SENDER), (size_t)PQgetlength(res, row, COL_SENDER));
    if (src) {
        char *a = p;
        size_t sl = strlen(src);
        memcpy(a, prefix, pl);
        memcpy(a + pl, src, sl);
        a[pl + sl] = '\0';
        v->dlq_arn = a;
        p += pl + sl + 1;
    }
    if (!PQgetisnull(res, row, COL_GROUP))
        v->group_id =
            pack(&p, PQgetvalue(res, row, COL_GROUP), (size_t)PQgetlength(res, row, COL_GROUP));
    if (!PQgetisnull(res, row, COL_DEDUP))
        v->dedup_id =
            pack(&p, PQgetvalue(res, row, COL_DEDUP), (size_t)PQgetlength(res, row, COL_DEDUP));
    /* a malformed trace header is ignored (docs/pgqueue.md#trace-context) */
    struct esmd_trace t;
    esmd_trace_clear(&t);
    if (!PQgetisnull(res, row, COL_TRACE) &&
        esmd_trace_set(&t, ESMD_TRACE_XRAY, PQgetvalue(res, row, COL_TRACE),
                       (size_t)PQgetlength(res, row, COL_TRACE)))
        v->trace_header = pack(&p, t.xray, strlen(t.xray));
    v->sent_ms = value_i64(res, row, COL_SENT);
    v->first_ms = value_i64(res, row, COL_FIRST);
    v->receive_count = (int)value_i64(res, row, COL_COUNT);
    pr->rec.timestamp_ms = v->sent_ms;
    pr->rec.size = esmd_pgqueue_record_size(v, pq->arn);
    pr->rec.priv = pq;
    return pr;
}

/* Gives rows of a claim back at once (we are stopping, or no shard can take them). */
static void give_back_rows(struct esmd_pgqueue *pq, const PGresult *res)
{
    for (int r = 0; r < PQntuples(res); r++) {
        const char *kind = value(res, r, COL_KIND);
        if (!kind || kind[0] != 'm')
            continue;
        struct pgq_entry e = {.id = value_i64(res, r, COL_ID)};
        snprintf(e.receipt, sizeof(e.receipt), "%s", PQgetvalue(res, r, COL_RECEIPT));
        receipts_push(&pq->rel, &e);
    }
    settle_flush(pq);
}

static void claim_failed(struct esmd_pgqueue *pq, const char *err)
{
    free(pq->claim_error);
    pq->claim_error = esmd_xstrdup(err);
    pq->maybe_more = true;
    esmd_log_limited(ESMD_LOG_WARN, pq->log, "pgqueue-claim", "pgqueue %s: receive failed: %s",
                     pq->queue, err);
    /* A separate queue database without esmd's schema: migrate it (rarely; blocking). */
    double now = ev_now(pq->host->loop);
    if (pq->separate_db && !is_connection_error(err) && strstr(err, "does not exist") &&
        now - pq->last_migrate >= PGQ_MIGRATE_RETRY_S) {
        pq->last_migrate = now;
        char merr[512];
        int applied = 0;
        if (esmd_pg_migrate(pq->conninfo, &applied, merr, sizeof(merr)) == ESMD_OK)
            ESMD_INFO(pq->log, "pgqueue %s: applied %d migrations to the queue's database",
                      pq->queue, applied);
        else
            ESMD_WARN(pq->log, "pgqueue %s: migrating the queue's database: %s", pq->queue, merr);
    }
    /* the poll timer tries again */
    update_ready(pq);
}

static void on_claim(void *ud, const PGresult *res, const char *err)
{
    struct esmd_pgqueue *pq = ud;
    if (pq->destroying)
        return;
    pq->claim_inflight = false;
    if (err || !res || PQnfields(res) < COL_N) {
        claim_failed(pq, err ? err : "unexpected result from esmd.receive");
        stop_check(pq);
        return;
    }
    if (pq->state != PGQ_RUNNING) {
        give_back_rows(pq, res);
        stop_check(pq);
        return;
    }
    if (pq->claim_error) {
        ESMD_INFO(pq->log, "pgqueue %s: receiving again", pq->queue);
        free(pq->claim_error);
        pq->claim_error = NULL;
    }
    update_ready(pq);

    int nrows = PQntuples(res), claimed = 0;
    /* the idle shards, each to take up to batch_size messages (and no more than fits one event) */
    size_t *targets = esmd_xcalloc(pq->nshards ? pq->nshards : 1, sizeof(*targets));
    size_t ntargets = 0;
    for (size_t i = 0; i < pq->nshards; i++)
        if (pq->shards[i].n == 0 && !pq->shards[i].paused && (!pq->fifo || ntargets == 0))
            targets[ntargets++] = i;
    size_t t = 0, chunk = 0, chunk_bytes = 0;
    const size_t budget = ESMD_MAX_PAYLOAD - esmd_pgqueue_envelope_size();
    bool gave_back = false;
    for (int r = 0; r < nrows; r++) {
        const char *kind = value(res, r, COL_KIND);
        if (!kind)
            continue;
        if (kind[0] == 'w') {
            claimed = -1; /* fewer than asked: the queue is drained for now */
            const char *next = value(res, r, COL_NEXT_VISIBLE);
            if (next) {
                double s = (double)strtoll(next, NULL, 10) / 1000.0;
                if (s < PGQ_POLL_S) {
                    ev_timer_stop(pq->host->loop, &pq->wake);
                    ev_timer_set(&pq->wake, s + 0.001, 0.0);
                    ev_timer_start(pq->host->loop, &pq->wake);
                }
            }
            continue;
        }
        if (claimed >= 0)
            claimed++;
        if (kind[0] == 'd' || kind[0] == 'x') {
            bool moved = kind[0] == 'd';
            esmd_series_inc(moved ? pq->m.dead_lettered : pq->m.discarded, 1);
            esmd_log_limited(
                ESMD_LOG_WARN, pq->log, "pgqueue-dead-letter",
                "pgqueue %s: message %s received %s times: %s%s (max_receive_count %d)", pq->queue,
                value(res, r, COL_MESSAGE_ID), value(res, r, COL_COUNT),
                moved ? "moved to dead-letter queue " : "deleted (no dead_letter_queue)",
                moved ? pq->dlq : "", pq->max_receive);
            continue;
        }
        if (kind[0] != 'm')
            continue;
        esmd_series_inc(pq->m.received, 1);
        if (ntargets == 0 || (pq->fifo && gave_back)) {
            /* every shard became busy meanwhile (cannot happen today): give it back */
            struct pgq_entry e = {.id = value_i64(res, r, COL_ID)};
            snprintf(e.receipt, sizeof(e.receipt), "%s", PQgetvalue(res, r, COL_RECEIPT));
            receipts_push(&pq->rel, &e);
            gave_back = true;
            continue;
        }
        struct pgq_rec *pr = rec_from_row(pq, res, r);
        size_t add = pr->rec.size + (chunk ? 1 : 0);
        if (pq->fifo && chunk > 0 && chunk_bytes + add > budget) {
            /* FIFO: over one event's 6 MB. This and every later message (the rest of this
             * group's run, whole later groups) go back: visible at once, their receive count
             * stays one higher. */
            struct pgq_entry e = {.id = pr->v.id};
            snprintf(e.receipt, sizeof(e.receipt), "%s", pr->v.receipt);
            receipts_push(&pq->rel, &e);
            gave_back = true;
            free(pr);
            continue;
        }
        if (chunk > 0 && (chunk >= (size_t)pq->batch_size || chunk_bytes + add > budget) &&
            t + 1 < ntargets) {
            t++;
            chunk = chunk_bytes = 0;
            add = pr->rec.size;
        }
        struct pgq_shard *ps = &pq->shards[targets[t]];
        chunk++;
        chunk_bytes += add;
        pr->rec.seq = ps->next_seq++;
        struct pgq_entry e = {
            .seq = pr->rec.seq, .id = pr->v.id, .group = group_hash(pr->v.group_id)};
        snprintf(e.receipt, sizeof(e.receipt), "%s", pr->v.receipt);
        shard_push(ps, &e);
        pq->host->emit(pq->host->core, ps->shard, &pr->rec);
    }
    free(targets);
    if (gave_back)
        settle_flush(pq);
    if (claimed >= pq->claim_limit)
        pq->maybe_more = true; /* a full claim: there is probably more */
    claim_maybe(pq);
}

static void on_notify(void *ud, const char *channel, const char *payload)
{
    struct esmd_pgqueue *pq = ud;
    if (payload && strcmp(payload, pq->queue) != 0)
        return;
    /* payload NULL: listening (again) after a (re)connection; anything may have been sent */
    pq->maybe_more = true;
    claim_maybe(pq);
}

static void on_poll(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct esmd_pgqueue *pq = w->data;
    pq->maybe_more = true;
    update_ready(pq);
    claim_maybe(pq);
}

static void on_wake(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct esmd_pgqueue *pq = w->data;
    ev_timer_stop(loop, w);
    pq->maybe_more = true;
    claim_maybe(pq);
}

/* ---- settling: deletes and give-backs ---- */

static void on_delete(void *ud, const PGresult *res, const char *err)
{
    struct esmd_pgqueue *pq = ud;
    if (pq->destroying)
        return;
    pq->delete_inflight = false;
    size_t n = pq->deleting.n;
    if (err || !res || PQntuples(res) != 1) {
        esmd_log_limited(ESMD_LOG_WARN, pq->log, "pgqueue-delete",
                         "pgqueue %s: deleting %zu processed messages failed: %s; retrying",
                         pq->queue, n, err ? err : "no result");
        receipts_return(&pq->del, &pq->deleting);
        if (!ev_is_active(&pq->retry) && pq->state != PGQ_STOPPED)
            ev_timer_start(pq->host->loop, &pq->retry);
        stop_check(pq);
        return;
    }
    long long deleted = strtoll(PQgetvalue(res, 0, 0), NULL, 10);
    pq->deleting.n = 0;
    pq->committed += (int64_t)n;
    esmd_series_inc(pq->m.deleted, (double)deleted);
    if ((size_t)deleted < n) {
        esmd_series_inc(pq->m.stale, (double)(n - (size_t)deleted));
        esmd_log_limited(ESMD_LOG_WARN, pq->log, "pgqueue-stale",
                         "pgqueue %s: %zu processed messages were not deleted: their visibility "
                         "timeout had expired and they were received again (they will be "
                         "delivered again; raise visibility_timeout)",
                         pq->queue, n - (size_t)deleted);
    }
    settle_flush(pq);
    /* FIFO: a group is claimed again only once its messages in flight are gone */
    if (pq->fifo && pq->state == PGQ_RUNNING) {
        pq->maybe_more = true;
        claim_maybe(pq);
    }
    stop_check(pq);
}

static void on_release(void *ud, const PGresult *res, const char *err)
{
    struct esmd_pgqueue *pq = ud;
    if (pq->destroying)
        return;
    pq->release_inflight = false;
    if (err || !res || PQntuples(res) != 1) {
        esmd_log_limited(ESMD_LOG_WARN, pq->log, "pgqueue-release",
                         "pgqueue %s: giving back %zu messages failed: %s", pq->queue,
                         pq->releasing.n, err ? err : "no result");
        receipts_return(&pq->rel, &pq->releasing);
        if (!ev_is_active(&pq->retry) && pq->state != PGQ_STOPPED)
            ev_timer_start(pq->host->loop, &pq->retry);
        stop_check(pq);
        return;
    }
    esmd_series_inc(pq->m.released, (double)strtoll(PQgetvalue(res, 0, 0), NULL, 10));
    pq->releasing.n = 0;
    settle_flush(pq);
    stop_check(pq);
}

/* Sends what waits, one delete and one give-back query in flight at most. */
static void settle_flush(struct esmd_pgqueue *pq)
{
    if (pq->state == PGQ_STOPPED || ev_is_active(&pq->retry))
        return;
    if (!pq->delete_inflight && pq->del.n > 0) {
        receipts_take(&pq->deleting, &pq->del);
        struct esmd_buf ids = ESMD_BUF_INIT, receipts = ESMD_BUF_INIT;
        receipts_params(&pq->deleting, &ids, &receipts);
        const char *params[2] = {esmd_buf_cstr(&ids), esmd_buf_cstr(&receipts)};
        if (esmd_pg_query(pq->ack_pg, PGQ_DELETE_SQL, 2, params, on_delete, pq) == 0)
            pq->delete_inflight = true;
        else
            receipts_return(&pq->del, &pq->deleting);
        esmd_buf_free(&ids);
        esmd_buf_free(&receipts);
    }
    if (!pq->release_inflight && pq->rel.n > 0) {
        receipts_take(&pq->releasing, &pq->rel);
        struct esmd_buf ids = ESMD_BUF_INIT, receipts = ESMD_BUF_INIT;
        receipts_params(&pq->releasing, &ids, &receipts);
        const char *params[2] = {esmd_buf_cstr(&ids), esmd_buf_cstr(&receipts)};
        if (esmd_pg_query(pq->ack_pg, PGQ_RELEASE_SQL, 2, params, on_release, pq) == 0)
            pq->release_inflight = true;
        else
            receipts_return(&pq->rel, &pq->releasing);
        esmd_buf_free(&ids);
        esmd_buf_free(&receipts);
    }
}

static void on_retry(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct esmd_pgqueue *pq = w->data;
    ev_timer_stop(loop, w);
    settle_flush(pq);
}

/* ---- queue depth ---- */

static void on_stats_result(void *ud, const PGresult *res, const char *err)
{
    struct esmd_pgqueue *pq = ud;
    if (pq->destroying)
        return;
    pq->stats_inflight = false;
    if (err || !res || PQntuples(res) != 1 || PQnfields(res) != 3)
        return;
    esmd_series_set(pq->m.visible, (double)strtoll(PQgetvalue(res, 0, 0), NULL, 10));
    esmd_series_set(pq->m.in_flight, (double)strtoll(PQgetvalue(res, 0, 1), NULL, 10));
    esmd_series_set(pq->m.oldest, strtod(PQgetvalue(res, 0, 2), NULL));
    stop_check(pq);
}

static void on_stats_timer(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct esmd_pgqueue *pq = w->data;
    if (pq->state != PGQ_RUNNING || pq->stats_inflight || !esmd_pg_ready(pq->ack_pg))
        return;
    const char *params[1] = {pq->queue};
    if (esmd_pg_query(pq->ack_pg, PGQ_STATS_SQL, 1, params, on_stats_result, pq) == 0)
        pq->stats_inflight = true;
}

/* ---- stop ---- */

static void on_done(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct esmd_pgqueue *pq = w->data;
    ev_timer_stop(loop, w);
    void (*done)(void *ud) = pq->done;
    pq->done = NULL;
    if (done)
        done(pq->done_ud); /* may destroy pq: touch nothing after */
}

static void stop_finish(struct esmd_pgqueue *pq, bool timed_out)
{
    struct ev_loop *loop = pq->host->loop;
    size_t left = pq->del.n + pq->deleting.n;
    if (timed_out && left > 0)
        ESMD_WARN(pq->log,
                  "pgqueue %s: stopping without deleting %zu processed messages (Postgres did "
                  "not answer): they will be delivered again after their visibility timeout",
                  pq->queue, left);
    pq->state = PGQ_STOPPED;
    pq->ready = false;
    ev_timer_stop(loop, &pq->poll);
    ev_timer_stop(loop, &pq->wake);
    ev_timer_stop(loop, &pq->retry);
    ev_timer_stop(loop, &pq->stats);
    ev_timer_stop(loop, &pq->stop_tm);
    ev_timer_start(loop, &pq->done_tm);
    ESMD_INFO(pq->log, "pgqueue %s: stopped", pq->queue);
}

/* Stopping: done when no claim, delete or give-back is left. */
static void stop_check(struct esmd_pgqueue *pq)
{
    if (pq->state != PGQ_STOPPING)
        return;
    if (pq->claim_inflight || pq->delete_inflight || pq->release_inflight || pq->del.n > 0 ||
        pq->rel.n > 0 || pq->stats_inflight)
        return;
    stop_finish(pq, false);
}

static void on_stop_timeout(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct esmd_pgqueue *pq = w->data;
    ev_timer_stop(loop, w);
    if (pq->state == PGQ_STOPPING)
        stop_finish(pq, true);
}

/* ---- the operations ---- */

static void pgq_destroy(void *c);

static void *pgq_create(const struct esmd_mapping_cfg *cfg, const struct esmd_host *host, char *err,
                        size_t errlen)
{
    const struct esmd_pgqueue_source_cfg *src = &cfg->pgqueue;
    const char *conninfo = src->connection ? src->connection : src->service_postgres;
    if (cfg->kind != ESMD_SOURCE_PGQUEUE || !src->queue || !conninfo) {
        snprintf(err, errlen, "mapping %s: pgqueue source needs a queue and a postgres connection",
                 cfg->name ? cfg->name : "?");
        return NULL;
    }
    struct esmd_pgqueue *pq = esmd_xcalloc(1, sizeof(*pq));
    pq->host = host;
    pq->log = host->log;
    pq->name = esmd_xstrdup(cfg->name ? cfg->name : "");
    pq->queue = esmd_xstrdup(src->queue);
    pq->dlq = src->max_receive_count > 0 ? esmd_xstrdup(src->dead_letter_queue) : NULL;
    pq->conninfo = esmd_xstrdup(conninfo);
    pq->fifo = esmd_pgqueue_is_fifo(pq->queue);
    pq->separate_db = src->connection &&
                      (!src->service_postgres || strcmp(src->connection, src->service_postgres));
    char prefix[ESMD_PGQUEUE_ARN_PREFIX_MAX];
    size_t alen = esmd_pgqueue_arn_prefix(prefix) + strlen(pq->queue) + 1;
    pq->arn = esmd_xmalloc(alen);
    snprintf(pq->arn, alen, "%s%s", prefix, pq->queue);
    pq->batch_size = cfg->batch_size > 0 ? cfg->batch_size : 10;
    pq->max_receive = src->max_receive_count;
    pq->concurrency = src->maximum_concurrency >= 2 ? src->maximum_concurrency : 2;
    snprintf(pq->vt_param, sizeof(pq->vt_param), "%lld milliseconds",
             (long long)(src->visibility_timeout_ms > 0 ? src->visibility_timeout_ms : 30000));
    snprintf(pq->mrc_param, sizeof(pq->mrc_param), "%d", pq->max_receive);
    pq->last_migrate = -PGQ_MIGRATE_RETRY_S;

    struct esmd_buf labels = ESMD_BUF_INIT;
    esmd_metric_labels(&labels, "mapping", pq->name, "queue", pq->queue, NULL);
    const char *l = esmd_buf_cstr(&labels);
#define SERIES(field, type, mname, help)                                                           \
    pq->m.field = esmd_series(esmd_metric(type, mname, help), l)
    SERIES(received, ESMD_COUNTER, "esmd_pgqueue_received_messages_total",
           "Postgres queue messages received (claimed) by this mapping.");
    SERIES(deleted, ESMD_COUNTER, "esmd_pgqueue_deleted_messages_total",
           "Postgres queue messages deleted after processing (or filtering).");
    SERIES(dead_lettered, ESMD_COUNTER, "esmd_pgqueue_dead_lettered_messages_total",
           "Postgres queue messages moved to the dead-letter queue at max_receive_count.");
    SERIES(discarded, ESMD_COUNTER, "esmd_pgqueue_discarded_messages_total",
           "Postgres queue messages deleted at max_receive_count (no dead_letter_queue).");
    SERIES(stale, ESMD_COUNTER, "esmd_pgqueue_stale_receipts_total",
           "Processed messages not deleted: their visibility timeout had expired and they were "
           "received again.");
    SERIES(released, ESMD_COUNTER, "esmd_pgqueue_released_messages_total",
           "Received messages given back (made visible at once) on stop.");
    SERIES(visible, ESMD_GAUGE, "esmd_pgqueue_messages_visible",
           "Messages of the queue visible now (SQS ApproximateNumberOfMessagesVisible).");
    SERIES(in_flight, ESMD_GAUGE, "esmd_pgqueue_messages_in_flight",
           "Messages of the queue received and invisible (ApproximateNumberOfMessagesNotVisible).");
    SERIES(oldest, ESMD_GAUGE, "esmd_pgqueue_oldest_message_age_seconds",
           "Age of the oldest message of the queue (ApproximateAgeOfOldestMessage).");
#undef SERIES
    esmd_buf_free(&labels);

    pq->claim_pg = esmd_pg_new(host->loop, conninfo, "pgqueue-claim", err, errlen);
    if (!pq->claim_pg)
        goto fail;
    pq->ack_pg = esmd_pg_new(host->loop, conninfo, "pgqueue-ack", err, errlen);
    if (!pq->ack_pg)
        goto fail;

    ev_timer_init(&pq->poll, on_poll, PGQ_POLL_S, PGQ_POLL_S);
    ev_timer_init(&pq->wake, on_wake, 0.0, 0.0);
    ev_timer_init(&pq->retry, on_retry, PGQ_RETRY_S, 0.0);
    ev_timer_init(&pq->stats, on_stats_timer, 0.5, PGQ_STATS_S);
    ev_timer_init(&pq->stop_tm, on_stop_timeout, PGQ_STOP_TIMEOUT_S, 0.0);
    ev_timer_init(&pq->done_tm, on_done, 0.0, 0.0);
    pq->poll.data = pq->wake.data = pq->retry.data = pq->stats.data = pq->stop_tm.data =
        pq->done_tm.data = pq;
    pq->watchers_init = true;
    return pq;
fail:
    pgq_destroy(pq);
    return NULL;
}

static size_t pgq_envelope_size(void *c)
{
    (void)c;
    return esmd_pgqueue_envelope_size();
}

static int pgq_start(void *c)
{
    struct esmd_pgqueue *pq = c;
    if (pq->state != PGQ_CREATED)
        return ESMD_ESTATE;
    if (pq->separate_db) {
        /* `esmd migrate` covers the service's database; the queue's own gets the schema here */
        char merr[512];
        int applied = 0;
        pq->last_migrate = ev_now(pq->host->loop);
        if (esmd_pg_migrate(pq->conninfo, &applied, merr, sizeof(merr)) != ESMD_OK)
            ESMD_WARN(pq->log, "pgqueue %s: migrating the queue's database: %s (trying again)",
                      pq->queue, merr);
        else if (applied > 0)
            ESMD_INFO(pq->log, "pgqueue %s: applied %d migrations to the queue's database",
                      pq->queue, applied);
    }
    pq->shards = esmd_xcalloc((size_t)pq->concurrency, sizeof(*pq->shards));
    pq->nshards = (size_t)pq->concurrency;
    for (size_t i = 0; i < pq->nshards; i++) {
        struct pgq_shard *ps = &pq->shards[i];
        char key[96];
        snprintf(key, sizeof(key), "%s-%zu", pq->queue, i);
        /* seqs start at a random point: the idempotency key (mapping, shard, seq range) of one
         * process's batch never names another process's batch, nor one before a restart */
        ps->next_seq = (int64_t)(esmd_random64() >> 4);
        ps->shard = pq->host->shard_open(pq->host->core, key, 0, ps);
    }
    pq->state = PGQ_RUNNING;
    pq->host->set_ready(pq->host->core, false, "connecting to postgres");
    if (esmd_pg_listen(pq->claim_pg, PGQ_CHANNEL, on_notify, pq) != 0)
        ESMD_WARN(pq->log, "pgqueue %s: cannot LISTEN; polling only", pq->queue);
    struct ev_loop *loop = pq->host->loop;
    ev_timer_start(loop, &pq->poll);
    ev_timer_start(loop, &pq->stats);
    pq->maybe_more = true;
    claim_maybe(pq);
    ESMD_INFO(pq->log,
              "pgqueue consumer started (queue %s, visibility timeout %s, up to %d batches of "
              "%d, max_receive_count %d%s%s)",
              pq->queue, pq->vt_param, pq->concurrency, pq->batch_size, pq->max_receive,
              pq->dlq ? ", dead-letter queue " : "", pq->dlq ? pq->dlq : "");
    return ESMD_OK;
}

static void pgq_pause(void *c, struct esmd_shard *shard)
{
    struct pgq_shard *ps = shard ? esmd_shard_priv(shard) : NULL;
    if (ps)
        ps->paused = true;
}

static void pgq_resume(void *c, struct esmd_shard *shard)
{
    struct pgq_shard *ps = shard ? esmd_shard_priv(shard) : NULL;
    if (!ps || !ps->paused)
        return;
    ps->paused = false;
    claim_maybe(c);
}

static void pgq_ack(void *c, struct esmd_shard *shard, int64_t next_seq)
{
    struct esmd_pgqueue *pq = c;
    struct pgq_shard *ps = shard ? esmd_shard_priv(shard) : NULL;
    if (!ps || pq->state == PGQ_STOPPED)
        return;
    if (shard_pop(ps, next_seq, &pq->del) > 0)
        settle_flush(pq);
    claim_maybe(pq);
}

static void pgq_nack(void *c, struct esmd_shard *shard, int64_t next_seq)
{
    struct esmd_pgqueue *pq = c;
    struct pgq_shard *ps = shard ? esmd_shard_priv(shard) : NULL;
    if (!ps)
        return;
    /* FIFO: the groups of the failed messages; their later messages still outstanding in this
     * shard (a batch the core formed after this one) must not be deleted before them. */
    if (pq->fifo) {
        for (size_t i = ps->head; i < ps->head + ps->n && ps->ents[i].seq < next_seq; i++) {
            const struct pgq_entry *f = &ps->ents[i];
            if (f->deleted || f->skipped)
                continue;
            for (size_t j = i + 1; j < ps->head + ps->n; j++)
                if (ps->ents[j].seq >= next_seq && ps->ents[j].group == f->group)
                    ps->ents[j].held = true;
        }
    }
    /* As Lambda: left invisible until their visibility timeout ends, then received again. */
    shard_pop(ps, next_seq, NULL);
    /* Messages right after the failed batch that the core skipped (filtered out) were to be
     * acked with it (the batch's ack_seq): they are done, delete them. */
    bool del = false;
    while (ps->n > 0 && !ps->ents[ps->head].held &&
           (ps->ents[ps->head].skipped || ps->ents[ps->head].deleted)) {
        del = true;
        shard_pop(ps, ps->ents[ps->head].seq + 1, &pq->del);
    }
    if (del)
        settle_flush(pq);
    claim_maybe(pq);
}

/* The outstanding entry of rec in its shard, or NULL (acked or nacked already). Entries are
 * consecutive seqs: the record's is found by its distance to the first. */
static struct pgq_entry *entry_of(const struct esmd_record *rec)
{
    struct pgq_shard *ps = rec->shard ? esmd_shard_priv(rec->shard) : NULL;
    if (!ps || ps->n == 0)
        return NULL;
    int64_t d = rec->seq - ps->ents[ps->head].seq;
    if (d < 0 || (size_t)d >= ps->n || ps->ents[ps->head + (size_t)d].seq != rec->seq)
        return NULL;
    return &ps->ents[ps->head + (size_t)d];
}

static void pgq_ack_record(void *c, struct esmd_shard *shard, const struct esmd_record *rec)
{
    struct esmd_pgqueue *pq = c;
    struct pgq_entry *e = rec && rec->shard == shard ? entry_of(rec) : NULL;
    if (!e || e->deleted || e->held || pq->state == PGQ_STOPPED)
        return;
    /* FIFO (SQS, Lambda): a message after a failed one of its group is not deleted even if the
     * function did not name it; it is received again behind the failed one. */
    if (e->group && group_blocked(esmd_shard_priv(shard), e)) {
        e->held = true;
        return;
    }
    e->deleted = true;
    receipts_push(&pq->del, e);
    settle_flush(pq);
}

static bool pgq_item_is(void *c, const struct esmd_record *rec, const struct cJSON *id)
{
    (void)c;
    const struct pgq_rec *pr = (const struct pgq_rec *)rec;
    return cJSON_IsString(id) && strcmp(id->valuestring, pr->v.message_id) == 0;
}

static void pgq_release(void *c, struct esmd_record *rec)
{
    (void)c;
    if (rec->filtered || rec->size + esmd_pgqueue_envelope_size() > (size_t)ESMD_MAX_PAYLOAD) {
        struct pgq_entry *e = entry_of(rec);
        if (e)
            e->skipped = true;
    }
    free(rec); /* the strings live in the same block */
}

/* The message's AWSTraceHeader (an X-Ray header; its traceparent is derived from it). */
static bool pgqueue_trace(void *c, const struct esmd_record *rec, struct esmd_trace *out)
{
    (void)c;
    const char *th = ((const struct pgq_rec *)rec)->v.trace_header;
    esmd_trace_clear(out);
    return th && esmd_trace_set(out, ESMD_TRACE_XRAY, th, strlen(th));
}

static void view_of(const struct esmd_record *rec, struct esmd_pgqueue_view *v)
{
    *v = ((const struct pgq_rec *)rec)->v;
}

static void pgq_encode(void *c, const struct esmd_batch *batch, struct esmd_buf *out)
{
    const struct esmd_pgqueue *pq = c;
    esmd_pgqueue_encode_batch(batch, pq->arn, view_of, out);
}

static enum esmd_filter_data pgq_filter_doc(void *c, const struct esmd_record *rec,
                                            struct esmd_buf *out)
{
    const struct esmd_pgqueue *pq = c;
    return esmd_pgqueue_filter_doc(&((const struct pgq_rec *)rec)->v, pq->arn, out);
}

static void pgq_stop(void *c, void (*done)(void *ud), void *ud)
{
    struct esmd_pgqueue *pq = c;
    if (pq->state == PGQ_STOPPING || pq->state == PGQ_STOPPED) {
        if (pq->done)
            return; /* a stop is already under way: keep the first caller's callback */
    }
    pq->done = done;
    pq->done_ud = ud;
    struct ev_loop *loop = pq->host->loop;
    if (pq->state != PGQ_RUNNING) {
        pq->state = PGQ_STOPPED;
        ev_timer_start(loop, &pq->done_tm);
        return;
    }
    pq->state = PGQ_STOPPING;
    ev_timer_stop(loop, &pq->poll);
    ev_timer_stop(loop, &pq->wake);
    ev_timer_stop(loop, &pq->stats);
    /* every claim not acked yet goes back to the queue now */
    size_t back = 0;
    for (size_t i = 0; i < pq->nshards; i++)
        back += shard_pop(&pq->shards[i], INT64_MAX, &pq->rel);
    ev_timer_stop(loop, &pq->retry);
    settle_flush(pq);
    ESMD_INFO(pq->log, "pgqueue %s: stopping: giving back %zu messages, %zu deletes pending",
              pq->queue, back, pq->del.n + pq->deleting.n);
    ev_timer_start(loop, &pq->stop_tm);
    stop_check(pq);
}

static void pgq_destroy(void *c)
{
    struct esmd_pgqueue *pq = c;
    if (!pq)
        return;
    pq->destroying = true;
    if (pq->watchers_init) {
        struct ev_loop *loop = pq->host->loop;
        ev_timer_stop(loop, &pq->poll);
        ev_timer_stop(loop, &pq->wake);
        ev_timer_stop(loop, &pq->retry);
        ev_timer_stop(loop, &pq->stats);
        ev_timer_stop(loop, &pq->stop_tm);
        ev_timer_stop(loop, &pq->done_tm);
    }
    esmd_pg_free(pq->claim_pg); /* callbacks see `destroying` and return */
    esmd_pg_free(pq->ack_pg);
    for (size_t i = 0; i < pq->nshards; i++)
        free(pq->shards[i].ents);
    free(pq->shards);
    receipts_free(&pq->del);
    receipts_free(&pq->deleting);
    receipts_free(&pq->rel);
    receipts_free(&pq->releasing);
    free(pq->claim_error);
    free(pq->name);
    free(pq->queue);
    free(pq->dlq);
    free(pq->conninfo);
    free(pq->arn);
    free(pq);
}

static void pgq_stats(void *c, struct esmd_connector_stats *st)
{
    struct esmd_pgqueue *pq = c;
    st->committed = pq->committed;
    st->ready = pq->ready;
    st->lag = pq->m.visible ? (int64_t)esmd_series_value(pq->m.visible) : -1;
}

const struct esmd_connector_ops esmd_connector_pgqueue = {
    .kind = "pgqueue",
    .grouped = false,
    .queue = true,
    .source = ESMD_SOURCE_PGQUEUE,
    .source_keys = esmd_pgqueue_source_keys,
    .default_batch_size = 10,
    .default_batching_window_ms = 0,
    .cfg_check = esmd_pgqueue_cfg_check,
    .create = pgq_create,
    .envelope_size = pgq_envelope_size,
    .start = pgq_start,
    .pause = pgq_pause,
    .resume = pgq_resume,
    .ack = pgq_ack,
    .nack = pgq_nack,
    .ack_record = pgq_ack_record,
    .item_is = pgq_item_is,
    .trace = pgqueue_trace,
    .release = pgq_release,
    .encode = pgq_encode,
    .filter_doc = pgq_filter_doc,
    .data_key = "body",
    .filter_fallback = false, /* SQS: a mismatch between body and pattern drops the message */
    .stop = pgq_stop,
    .destroy = pgq_destroy,
    .stats = pgq_stats,
};
