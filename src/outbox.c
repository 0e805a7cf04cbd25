/* The Postgres outbox of destinations (include/esmd/destination.h, docs/destinations.md).
 *
 * A policy on the lease-queue engine (include/esmd/leaseq.h) over esmd.outbox, one key per
 * destination URI. Two connections to the service's Postgres: the engine's insert connection
 * runs the INSERTs of esmd_dests_send() (several sends of one loop turn, or that arrive while an
 * INSERT is in flight, share one statement: group commit), its worker connection runs the
 * claims, the settle statements (deletes and failure updates), pgqueue:// writes and the
 * pending count, one at a time.
 *
 * The engine claims due rows per destination in one statement (a sub-select per destination,
 * FOR UPDATE SKIP LOCKED, at most `room` rows each: the destination's in-flight cap minus what
 * it has in flight), so a slow or failing destination never takes the claims of another. The rows
 * of a claim are handed at once to their destination's writer, found by the URI's scheme in the
 * table of writers (src/destination.c; one file each: src/dest_kafka.c, dest_redis.c, dest_http.c,
 * dest_pgqueue.c, dest_function.c), which reports each row's outcome with esmd_outbox_done(). A
 * written row is deleted (batched); a failed one gets attempts + 1, last_error and next_attempt_at
 * = now() + backoff (1 s doubling to 5 min, jitter). A destination whose last write failed is
 * "failing": it gets one row at a time (a probe) and no claims until its own backoff has passed;
 * its first success clears it.
 *
 * Claims happen when a send to the destination has committed here, when a destination has
 * room again and its last claim was full, and every DESTS_POLL_S for all destinations (rows
 * of other instances, rows whose backoff has passed). A claim leases the row for
 * DESTS_LEASE_S (lease_token = this process): rows of a crashed process become due when the
 * lease ends, and at start-up the rows of this instance id held by an earlier process are
 * released at once.
 *
 * Everything runs on the loop thread. */
#include "dest_private.h"
#include "esmd/backoff.h"
#include "esmd/json.h"
#include "esmd/leaseq.h"
#include "esmd/log.h"
#include "esmd/metrics.h"

#include <ev.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* A claim holds a row this long; a write must finish well inside it. */
#define DESTS_LEASE_S 60
/* Every destination is looked at this often even without a wake-up. */
#define DESTS_POLL_S 1.0
/* The pending gauge (rows per destination) is refreshed this often. */
#define DESTS_COUNT_S 5.0
/* Rows claimed for one destination in one statement. */
#define DESTS_CLAIM_MAX 64
/* Group commit: rows and payload bytes in one INSERT. */
#define DESTS_SEND_BATCH_ROWS 500
#define DESTS_SEND_BATCH_BYTES (8 * 1024 * 1024)
/* esmd_dests_stop() waits this long for writes in progress. */
#define DESTS_STOP_TIMEOUT_S 40.0

static const struct esmd_backoff dests_backoff = {1000, 300000};

/* One esmd_dests_send() waiting for its INSERT. */
struct send_rec {
    struct esmd_leaseq_item item; /* first: the engine's */
    struct esmd_dest *dest;
    char *payload; /* owned, NUL-terminated */
    size_t len;
    unsigned char *key; /* owned, NULL: no key */
    size_t keylen;
    char *attrs; /* owned: message attributes JSON, NULL: none */
    esmd_dests_cb cb;
    void *ud;
};

/* At most this many kinds of destination (the writers' table, src/destination.c). */
#define DESTS_MAX_WRITERS 8

struct esmd_dests {
    struct esmd_dest_env env;            /* what the writers see */
    const struct esmd_config *functions; /* function:// names: esmd_dests_set_functions() */
    char **fn_seen;                      /* owned: every function name those have had */
    size_t nfn_seen;
    struct ev_loop *loop;
    char *instance_id;
    struct esmd_leaseq *lq;
    struct esmd_dest *dests;
    const struct esmd_dest_writer *const *writers;
    size_t nwriters;
    void *wstate[DESTS_MAX_WRITERS]; /* each writer's open() */

    struct esmd_delivery *dls; /* every delivery in flight */
    int ndls;
    struct esmd_delivery **claimed; /* the rows of the claim being handed out */
    size_t nclaimed, capclaimed;
    ev_timer count_tm;
    bool counting;
    int work_queries; /* the pending count and the writers' statements in flight (for stop) */

    bool stopping, closing, free_pending;
    int depth; /* > 0 while user callbacks run */
    void (*stop_done)(void *ud);
    void *stop_ud;

    struct esmd_metric *m_ok, *m_fail, *m_pending;
};

static void dests_destroy(struct esmd_dests *d);
static void stop_maybe_done(struct esmd_dests *d);
static void work_query(struct esmd_dests *d, const char *sql, int n, const char *const *params,
                       const int *lengths, const int *formats, esmd_pg_cb cb, void *ud);

/* ---- destinations ---- */

static struct esmd_dest *dest_find(struct esmd_dests *d, const char *uri)
{
    for (struct esmd_dest *dest = d->dests; dest; dest = dest->next)
        if (strcmp(dest->uri, uri) == 0)
            return dest;
    return NULL;
}

/* The destination for uri, created on first use. A URI this instance cannot write (a row of
 * another configuration) gets a destination with `unwritable` set: shown, never claimed. */
static struct esmd_dest *dest_get(struct esmd_dests *d, const char *uri)
{
    struct esmd_dest *dest = dest_find(d, uri);
    if (dest)
        return dest;
    dest = esmd_xcalloc(1, sizeof(*dest));
    dest->d = d;
    dest->uri = esmd_xstrdup(uri);
    dest->label = esmd_dest_label(uri);
    char err[512];
    struct esmd_dest_uri u;
    if (esmd_dest_parse(&d->env.names, uri, &dest->w, &u, err, sizeof(err)) != 0) {
        char why[600];
        snprintf(why, sizeof(why), "not written by this instance: %s", err);
        dest->unwritable = esmd_xstrdup(why);
    } else {
        while (d->writers[dest->wi] != dest->w)
            dest->wi++;
        void *state = d->wstate[dest->wi];
        dest->target = u.target;
        dest->conn = dest->w->bind ? dest->w->bind(state, &u) : state;
        dest->cap = dest->w->cap;
    }
    struct esmd_buf labels = ESMD_BUF_INIT;
    esmd_metric_labels(&labels, "destination", dest->label, NULL);
    dest->m_ok = esmd_series(d->m_ok, esmd_buf_cstr(&labels));
    dest->m_fail = esmd_series(d->m_fail, esmd_buf_cstr(&labels));
    dest->m_pending = esmd_series(d->m_pending, esmd_buf_cstr(&labels));
    esmd_buf_free(&labels);
    dest->key = esmd_leaseq_key_add(d->lq, uri, (int64_t)DESTS_LEASE_S * 1000, dest);
    struct esmd_dest **pp = &d->dests;
    while (*pp)
        pp = &(*pp)->next;
    *pp = dest;
    return dest;
}

static void dest_free(struct esmd_dest *dest)
{
    free(dest->uri);
    free(dest->label);
    free(dest->target);
    free(dest->unwritable);
    free(dest);
}

/* ---- deliveries ---- */

static void delivery_free(struct esmd_delivery *dl)
{
    struct esmd_dests *d = dl->d;
    if (dl->prev)
        dl->prev->next = dl->next;
    else
        d->dls = dl->next;
    if (dl->next)
        dl->next->prev = dl->prev;
    d->ndls--;
    if (dl->wp && dl->dest->w->discard)
        dl->dest->w->discard(dl);
    free(dl->payload);
    free(dl->attrs);
    free(dl->key);
    free(dl);
}

void esmd_outbox_done(struct esmd_delivery *dl, enum esmd_dest_result r, const char *err)
{
    struct esmd_dests *d = dl->d;
    struct esmd_dest *dest = dl->dest;
    if (d->closing) {
        delivery_free(dl);
        return;
    }
    dest->inflight--;
    double now = ev_now(d->loop);
    switch (r) {
    case ESMD_DEST_OK:
    case ESMD_DEST_DELETED:
        esmd_series_inc(dest->m_ok, 1);
        if (dest->failing) {
            ESMD_INFO(NULL, "destination %s: delivering again", dest->label);
            esmd_leaseq_more(d->lq, dest->key); /* its backlog can go now */
        }
        dest->failing = false;
        dest->failures = 0;
        dest->retry_at = 0;
        dest->last_error[0] = '\0';
        if (r == ESMD_DEST_OK)
            esmd_leaseq_delete(d->lq, dl->id);
        break;
    case ESMD_DEST_GONE:
        ESMD_DEBUG(NULL, "destination %s: outbox row %lld was taken over by another instance",
                   dest->label, (long long)dl->id);
        break;
    case ESMD_DEST_FAIL: {
        esmd_series_inc(dest->m_fail, 1);
        snprintf(dest->last_error, sizeof(dest->last_error), "%s", err ? err : "write failed");
        if (!dest->failing) {
            dest->failing = true;
            dest->failures = 1;
        } else if (dl->probe && dest->failures < 64) {
            dest->failures++;
        }
        int64_t ddelay = esmd_backoff_delay(&dests_backoff, dest->failures - 1, esmd_random64());
        dest->retry_at = now + (double)ddelay / 1000.0;
        int64_t delay = esmd_backoff_delay(&dests_backoff, dl->attempts, esmd_random64());
        esmd_log_limited(ESMD_LOG_WARN, NULL, "dest-write",
                         "destination %s: write of outbox row %lld failed (attempt %d): %s; "
                         "retrying in %.1f s",
                         dest->label, (long long)dl->id, dl->attempts + 1, dest->last_error,
                         (double)delay / 1000.0);
        const int attempts[] = {dl->attempts + 1};
        char *last_error[] = {esmd_xstrdup(dest->last_error)};
        esmd_leaseq_retry(d->lq, dl->id, delay, attempts, last_error);
        break;
    }
    }
    delivery_free(dl);
    esmd_leaseq_claim_soon(d->lq);
    stop_maybe_done(d);
}

/* A delivery of the claimed row `row` of res, in flight (not written yet). */
/* Columns of a claimed row, from ESMD_LEASEQ_COL0 on. */
enum { OB_COL_PAYLOAD = ESMD_LEASEQ_COL0, OB_COL_KEY, OB_COL_ATTEMPTS, OB_COL_ATTRS };

static struct esmd_delivery *delivery_new(struct esmd_dests *d, struct esmd_dest *dest, int64_t id,
                                          const PGresult *res, int row)
{
    struct esmd_delivery *dl = esmd_xcalloc(1, sizeof(*dl));
    dl->d = d;
    dl->dest = dest;
    dl->id = id;
    dl->len = (size_t)PQgetlength(res, row, OB_COL_PAYLOAD);
    dl->payload = esmd_xstrndup(PQgetvalue(res, row, OB_COL_PAYLOAD), dl->len);
    if (!PQgetisnull(res, row, OB_COL_KEY)) {
        size_t n = 0;
        unsigned char *k =
            PQunescapeBytea((const unsigned char *)PQgetvalue(res, row, OB_COL_KEY), &n);
        if (k) {
            dl->key = esmd_xmalloc(n ? n : 1);
            memcpy(dl->key, k, n);
            dl->keylen = n;
            PQfreemem(k);
        }
    }
    dl->attempts = atoi(PQgetvalue(res, row, OB_COL_ATTEMPTS));
    if (!PQgetisnull(res, row, OB_COL_ATTRS))
        dl->attrs = esmd_xstrdup(PQgetvalue(res, row, OB_COL_ATTRS));
    dl->probe = dest->failing;
    dl->next = d->dls;
    if (d->dls)
        d->dls->prev = dl;
    d->dls = dl;
    d->ndls++;
    dest->inflight++;
    return dl;
}

/* ---- what the writers call ---- */

struct esmd_delivery *esmd_outbox_deliveries(struct esmd_dests *d)
{
    return d->dls;
}

const char *esmd_outbox_token(const struct esmd_dests *d)
{
    return esmd_leaseq_token(d->lq);
}

bool esmd_outbox_closing(const struct esmd_dests *d)
{
    return d->closing;
}

/* A writer's statement on the worker's connection. */
struct writer_query {
    struct esmd_dests *d;
    esmd_pg_cb cb;
    void *ud;
};

static void writer_query_done(void *ud, const PGresult *res, const char *err)
{
    struct writer_query q = *(struct writer_query *)ud;
    free(ud);
    q.d->work_queries--;
    q.cb(q.ud, res, err);
    stop_maybe_done(q.d);
}

void esmd_outbox_query(struct esmd_dests *d, const char *sql, int n, const char *const *params,
                       const int *lengths, const int *formats, esmd_pg_cb cb, void *ud)
{
    struct writer_query *q = esmd_xmalloc(sizeof(*q));
    *q = (struct writer_query){d, cb, ud};
    work_query(d, sql, n, params, lengths, formats, writer_query_done, q);
}

/* ---- the worker: the policy's statements, claims ---- */

static void work_query(struct esmd_dests *d, const char *sql, int n, const char *const *params,
                       const int *lengths, const int *formats, esmd_pg_cb cb, void *ud)
{
    struct esmd_pg *pg = esmd_leaseq_pg(d->lq, ESMD_LEASEQ_CLAIM);
    d->work_queries++; /* every callback takes one off */
    if (!pg || esmd_pg_query_binary(pg, sql, n, params, lengths, formats, cb, ud) != 0)
        cb(ud, NULL, "closed"); /* only while closing */
}

/* Rows a claim may take for dest: none while it cannot be written or its backoff runs; one (a
 * probe) while it is failing; else its in-flight cap minus what it has in flight. */
static int ob_room(void *ud, void *key_ud)
{
    const struct esmd_dests *d = ud;
    const struct esmd_dest *dest = key_ud;
    if (dest->unwritable || dest->retry_at > ev_now(d->loop))
        return 0;
    int cap = dest->failing ? 1 : dest->cap;
    int room = cap - dest->inflight;
    return room > DESTS_CLAIM_MAX ? DESTS_CLAIM_MAX : room;
}

static void ob_claimed(void *ud, void *key_ud, int64_t id, const PGresult *res, int row)
{
    struct esmd_dests *d = ud;
    if (d->nclaimed == d->capclaimed) {
        d->capclaimed = d->capclaimed ? 2 * d->capclaimed : 64;
        d->claimed = esmd_xrealloc(d->claimed, d->capclaimed * sizeof(*d->claimed));
    }
    d->claimed[d->nclaimed++] = delivery_new(d, key_ud, id, res, row);
}

/* The claim's rows by destination, in claim order: each destination's writer gets its rows at
 * once (pgqueue:// writes them in one statement). */
static void ob_claim_end(void *ud)
{
    struct esmd_dests *d = ud;
    size_t n = d->nclaimed;
    struct esmd_delivery **group = esmd_xcalloc(n + 1, sizeof(*group));
    size_t *first = esmd_xcalloc(n + 1, sizeof(*first)); /* where each destination's run starts */
    size_t ngroups = 0, k = 0;
    for (size_t i = 0; i < n; i++) {
        if (!d->claimed[i])
            continue;
        struct esmd_dest *dest = d->claimed[i]->dest;
        first[ngroups++] = k;
        for (size_t j = i; j < n; j++) {
            if (d->claimed[j] && d->claimed[j]->dest == dest) {
                group[k++] = d->claimed[j];
                d->claimed[j] = NULL;
            }
        }
    }
    first[ngroups] = k;
    d->nclaimed = 0;
    for (size_t g = 0; g < ngroups; g++)
        group[first[g]]->dest->w->write(group + first[g], first[g + 1] - first[g]);
    free(first);
    free(group);
}

/* ---- the pending gauge ---- */

/* Rows per destination, every process's together, walking the outbox_due index rather than the
 * table (a backlog must not turn this into a scan of every row every 5 s): the destinations by
 * a skip scan (one index probe each, at most OUTBOX_COUNT_DESTS of them), and each one's rows
 * counted up to OUTBOX_COUNT_MAX (a deeper backlog shows that number: docs/destinations.md). */
#define OUTBOX_COUNT_MAX "100000"
#define OUTBOX_COUNT_DESTS "1000"
#define OUTBOX_COUNT_SQL                                                                           \
    "WITH RECURSIVE dests(destination, n) AS ("                                                    \
    "(SELECT destination, 1 FROM esmd.outbox ORDER BY destination LIMIT 1) UNION ALL "             \
    "SELECT (SELECT o.destination FROM esmd.outbox o WHERE o.destination > dests.destination "     \
    "ORDER BY o.destination LIMIT 1), n + 1 FROM dests "                                           \
    "WHERE dests.destination IS NOT NULL AND n < " OUTBOX_COUNT_DESTS ") "                         \
    "SELECT destination, (SELECT count(*) FROM (SELECT 1 FROM esmd.outbox o "                      \
    "WHERE o.destination = dests.destination LIMIT " OUTBOX_COUNT_MAX ") c) "                      \
    "FROM dests WHERE destination IS NOT NULL"

static void count_done(void *ud, const PGresult *res, const char *err)
{
    struct esmd_dests *d = ud;
    d->work_queries--;
    d->counting = false;
    if (d->closing)
        return;
    if (err || !res) {
        stop_maybe_done(d);
        return;
    }
    for (struct esmd_dest *dest = d->dests; dest; dest = dest->next)
        dest->pending = 0;
    for (int r = 0; r < PQntuples(res); r++) {
        struct esmd_dest *dest = dest_get(d, PQgetvalue(res, r, 0));
        dest->pending = strtoll(PQgetvalue(res, r, 1), NULL, 10);
    }
    for (struct esmd_dest *dest = d->dests; dest; dest = dest->next) {
        esmd_series_set(dest->m_pending, (double)dest->pending);
        /* its rows are gone (written by another process, deleted by hand): nothing fails */
        if (dest->failing && dest->pending == 0 && dest->inflight == 0) {
            dest->failing = false;
            dest->failures = 0;
            dest->retry_at = 0;
            dest->last_error[0] = '\0';
        }
    }
    stop_maybe_done(d);
}

static void count_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct esmd_dests *d = w->data;
    ESMD_UNUSED(loop);
    ESMD_UNUSED(revents);
    if (d->counting || d->stopping)
        return;
    d->counting = true;
    work_query(d, OUTBOX_COUNT_SQL, 0, NULL, NULL, NULL, count_done, d);
}

/* ---- sends (group commit) ---- */

static void send_rec_free(struct send_rec *s)
{
    free(s->payload);
    free(s->key);
    free(s->attrs);
    free(s);
}

static void dests_enter(struct esmd_dests *d)
{
    d->depth++;
}

static void dests_leave(struct esmd_dests *d)
{
    if (--d->depth == 0 && d->free_pending)
        dests_destroy(d);
}

/* One row of the INSERT: destination, payload, key (bytea), attributes (text, cast to jsonb). */
static void ob_insert_row(void *ud, struct esmd_leaseq_item *item, struct esmd_pg_array *cols)
{
    struct send_rec *s = (struct send_rec *)item;
    ESMD_UNUSED(ud);
    esmd_pg_array_add(&cols[0], s->dest->uri, strlen(s->dest->uri));
    esmd_pg_array_add(&cols[1], s->payload, s->len);
    if (s->key)
        esmd_pg_array_add(&cols[2], s->key, s->keylen);
    else
        esmd_pg_array_add_null(&cols[2]);
    if (s->attrs)
        esmd_pg_array_add(&cols[3], s->attrs, strlen(s->attrs));
    else
        esmd_pg_array_add_null(&cols[3]);
}

static void ob_inserted(void *ud, struct esmd_leaseq_item *items, bool ok, const char *err)
{
    struct esmd_dests *d = ud;
    dests_enter(d);
    while (items) {
        struct send_rec *s = (struct send_rec *)items;
        items = items->next;
        if (ok && !d->closing)
            esmd_leaseq_more(d->lq, s->dest->key);
        s->cb(s->ud, ok, ok ? NULL : err);
        send_rec_free(s);
    }
    if (!d->closing && !d->free_pending)
        stop_maybe_done(d);
    dests_leave(d); /* may free d */
}

static bool ob_idle(void *ud)
{
    const struct esmd_dests *d = ud;
    return d->ndls == 0 && d->work_queries == 0;
}

static const unsigned int ob_insert_oids[] = {ESMD_PG_OID_TEXT, ESMD_PG_OID_TEXT, ESMD_PG_OID_BYTEA,
                                              ESMD_PG_OID_TEXT};
static const char *const ob_retry_ints[] = {"attempts", NULL};
static const char *const ob_retry_texts[] = {"last_error", NULL};

static const struct esmd_leaseq_policy ob_policy = {
    .name = "destinations",
    .rows = "outbox rows",
    .table = "esmd.outbox",
    .key_column = "destination",
    .lease_until_column = "lease_until",
    .returning = "t.payload, t.key, t.attempts, t.attributes",
    .insert_sql = "INSERT INTO esmd.outbox (destination, payload, key, attributes) "
                  "SELECT d, p, k, a::jsonb FROM unnest($1::text[], $2::text[], $3::bytea[], "
                  "$4::text[]) AS r(d, p, k, a)",
    .insert_nparams = 4,
    .insert_oids = ob_insert_oids,
    .insert_max_rows = DESTS_SEND_BATCH_ROWS,
    .insert_max_bytes = DESTS_SEND_BATCH_BYTES,
    .insert_row = ob_insert_row,
    .inserted = ob_inserted,
    .retry_ints = ob_retry_ints,
    .retry_texts = ob_retry_texts,
    .room = ob_room,
    .claimed = ob_claimed,
    .claim_end = ob_claim_end,
    .idle = ob_idle,
};

/* ---- stop ---- */

static void stop_finish(void *ud, bool late)
{
    struct esmd_dests *d = ud;
    if (late)
        ESMD_WARN(NULL,
                  "destinations: %d writes still in progress after %.0f s; stopping without them "
                  "(their rows are delivered after their lease ends)",
                  d->ndls, DESTS_STOP_TIMEOUT_S);
    /* idle connections close */
    for (size_t i = 0; i < d->nwriters; i++)
        if (d->writers[i]->idle)
            d->writers[i]->idle(d->wstate[i]);
    void (*done)(void *ud) = d->stop_done;
    d->stop_done = NULL;
    if (done) {
        dests_enter(d);
        done(d->stop_ud);
        dests_leave(d);
    }
}

static void stop_maybe_done(struct esmd_dests *d)
{
    if (d->stopping && !d->closing)
        esmd_leaseq_check(d->lq);
}

/* ---- public ---- */

struct esmd_dests *esmd_dests_new(struct ev_loop *loop, const struct esmd_config *cfg,
                                  const char *conninfo, const char *instance_id, char *err,
                                  size_t errlen)
{
    if (!loop || !cfg || !conninfo) {
        snprintf(err, errlen, "destinations: no loop, configuration or postgres");
        return NULL;
    }
    struct esmd_dests *d = esmd_xcalloc(1, sizeof(*d));
    d->loop = loop;
    d->instance_id = esmd_xstrdup(instance_id && *instance_id ? instance_id : "esmd");
    d->m_ok = esmd_metric(ESMD_COUNTER, "esmd_destination_deliveries_total",
                          "Records written to their destination (outbox rows delivered).");
    d->m_fail = esmd_metric(ESMD_COUNTER, "esmd_destination_delivery_failures_total",
                            "Failed writes to a destination (each is retried with backoff).");
    d->m_pending = esmd_metric(ESMD_GAUGE, "esmd_destination_pending",
                               "Records in the outbox for the destination (refreshed every 5 s).");
    ev_init(&d->count_tm, count_cb);
    d->count_tm.data = d;
    const struct esmd_leaseq_cfg lcfg = {
        .conninfo = conninfo,
        .instance_id = d->instance_id,
        .insert_conns = 1, /* one INSERT at a time: a destination's rows keep their order */
        .settle_conn = false,
        .claims = true,
        .poll_s = DESTS_POLL_S,
    };
    d->lq = esmd_leaseq_new(loop, &ob_policy, d, &lcfg, err, errlen);
    if (!d->lq) {
        dests_destroy(d);
        return NULL;
    }

    d->env.d = d;
    d->env.loop = loop;
    d->env.names.cfg = cfg;
    d->env.instance_id = d->instance_id;
    d->env.token = esmd_leaseq_token(d->lq);
    d->writers = esmd_dest_writers(&d->nwriters);
    for (size_t i = 0; i < d->nwriters && i < DESTS_MAX_WRITERS; i++)
        d->wstate[i] = d->writers[i]->open ? d->writers[i]->open(&d->env) : NULL;

    /* every URI of the configuration, so that readiness and metrics show them from the start */
    for (size_t i = 0; i < cfg->nmappings; i++)
        if (cfg->mappings[i].on_failure)
            dest_get(d, cfg->mappings[i].on_failure)->configured = true;
    for (size_t i = 0; i < cfg->nfunctions; i++) {
        const struct esmd_async_cfg *a = &cfg->functions[i].async;
        const char *uris[] = {a->on_success, a->on_failure, a->dead_letter};
        for (size_t k = 0; k < ESMD_ARRAY_LEN(uris); k++)
            if (uris[k])
                dest_get(d, uris[k])->configured = true;
    }

    /* the rows this instance id leased in an earlier process are due again, then claims */
    esmd_leaseq_start(d->lq);
    ev_timer_set(&d->count_tm, 0.2, DESTS_COUNT_S);
    ev_timer_start(loop, &d->count_tm);
    return d;
}

/* function:// names: the configuration in force's functions, and those a reload removed: a
 * record for one of them is stored and waits in the outbox (the async queue refuses it, so it
 * is retried with backoff) until a reload brings the function back (docs/async.md#reload). */
static const struct esmd_function_cfg *dests_function(void *ud, const char *name)
{
    static const struct esmd_function_cfg removed; /* "known": function_parse asks no more */
    const struct esmd_dests *d = ud;
    const struct esmd_function_cfg *f = esmd_config_function(d->functions, name);
    for (size_t i = 0; !f && i < d->nfn_seen; i++)
        if (strcmp(d->fn_seen[i], name) == 0)
            f = &removed;
    return f;
}

static void fn_seen_add(struct esmd_dests *d, const struct esmd_config *cfg)
{
    for (size_t k = 0; k < cfg->nfunctions; k++) {
        const char *name = cfg->functions[k].name;
        size_t i = 0;
        while (i < d->nfn_seen && strcmp(d->fn_seen[i], name) != 0)
            i++;
        if (i < d->nfn_seen)
            continue;
        d->fn_seen = esmd_xrealloc(d->fn_seen, (d->nfn_seen + 1) * sizeof(*d->fn_seen));
        d->fn_seen[d->nfn_seen++] = esmd_xstrdup(name);
    }
}

void esmd_dests_set_functions(struct esmd_dests *d, const struct esmd_config *cfg)
{
    if (!d || !cfg)
        return;
    if (!d->functions)
        fn_seen_add(d, d->env.names.cfg); /* the start-up's */
    fn_seen_add(d, cfg);
    d->functions = cfg;
    d->env.names.function = dests_function;
    d->env.names.ud = d; /* names.connection stays NULL: the start-up configuration's */
}

int esmd_dests_check(const struct esmd_dests *d, const char *uri, char *err, size_t errlen)
{
    if (!d) {
        snprintf(err, errlen, "no destinations");
        return ESMD_EINVAL;
    }
    return esmd_dests_check_uri(&d->env.names, uri, err, errlen);
}

static int dests_send(struct esmd_dests *d, const char *uri, const char *payload, size_t len,
                      const void *key, size_t keylen, const char *attrs, esmd_dests_cb cb,
                      void *ud);

int esmd_dests_send(struct esmd_dests *d, const char *uri, const char *payload, size_t len,
                    const void *key, size_t keylen, esmd_dests_cb cb, void *ud)
{
    return dests_send(d, uri, payload, len, key, keylen, NULL, cb, ud);
}

int esmd_dests_send_attrs(struct esmd_dests *d, const char *uri, const char *payload, size_t len,
                          const char *attributes, esmd_dests_cb cb, void *ud)
{
    return dests_send(d, uri, payload, len, NULL, 0, attributes, cb, ud);
}

void esmd_dests_set_function_sink(struct esmd_dests *d, esmd_dests_function_sink sink, void *ud)
{
    if (!d)
        return;
    d->env.fn_sink = sink;
    d->env.fn_sink_ud = ud;
    if (sink) {
        /* function:// rows waiting in the outbox can go now */
        for (struct esmd_dest *dest = d->dests; dest; dest = dest->next)
            if (dest->w == &esmd_dest_function)
                esmd_leaseq_more(d->lq, dest->key);
    }
}

static int dests_send(struct esmd_dests *d, const char *uri, const char *payload, size_t len,
                      const void *key, size_t keylen, const char *attrs, esmd_dests_cb cb, void *ud)
{
    if (!d || !uri || !cb || (!payload && len > 0))
        return ESMD_EINVAL;
    if (d->closing || d->free_pending)
        return ESMD_ESTATE;
    char err[512];
    struct esmd_dest *dest = dest_find(d, uri);
    if (!dest || dest->unwritable) {
        if (esmd_dests_check(d, uri, err, sizeof(err)) != 0) {
            esmd_log_limited(ESMD_LOG_WARN, NULL, "dest-send", "destinations: %s", err);
            return ESMD_EINVAL;
        }
        dest = dest_get(d, uri);
    }
    if (!esmd_utf8_valid(payload ? payload : "", len) || (len > 0 && memchr(payload, 0, len))) {
        esmd_log_limited(ESMD_LOG_WARN, NULL, "dest-send",
                         "destinations: a record for %s is not UTF-8 text without NUL bytes: "
                         "refused",
                         dest->label);
        return ESMD_EINVAL;
    }
    struct send_rec *s = esmd_xcalloc(1, sizeof(*s));
    s->dest = dest;
    s->payload = esmd_xstrndup(payload ? payload : "", len);
    s->len = len;
    s->item.bytes = len;
    if (key && dest->w->takes_key) {
        s->key = esmd_xmalloc(keylen ? keylen : 1);
        memcpy(s->key, key, keylen);
        s->keylen = keylen;
    }
    if (attrs && dest->w->takes_attrs)
        s->attrs = esmd_xstrdup(attrs);
    s->cb = cb;
    s->ud = ud;
    esmd_leaseq_insert(d->lq, &s->item);
    return 0;
}

void esmd_dests_stop(struct esmd_dests *d, void (*done)(void *ud), void *ud)
{
    if (!d || d->closing)
        return;
    if (d->stopping && d->stop_done)
        return; /* a stop is under way: the first caller's callback stays */
    d->stopping = true;
    d->stop_done = done;
    d->stop_ud = ud;
    ev_timer_stop(d->loop, &d->count_tm);
    /* redis writes held for a setup that never ends are bounded by the watchdog */
    esmd_leaseq_stop(d->lq, DESTS_STOP_TIMEOUT_S, stop_finish, d);
}

static void dests_destroy(struct esmd_dests *d)
{
    d->closing = true;
    d->free_pending = false;
    ev_timer_stop(d->loop, &d->count_tm);

    /* sends that never reached an INSERT get "shutting down", INSERTs in flight "closed"; work
     * statements end */
    dests_enter(d);
    struct esmd_leaseq *lq = d->lq;
    d->lq = NULL;
    esmd_leaseq_free(lq);

    /* writes in progress are dropped: their rows stay leased and are delivered later */
    for (size_t i = 0; i < d->nwriters; i++)
        if (d->writers[i]->close)
            d->writers[i]->close(d->wstate[i]);
    while (d->dls)
        delivery_free(d->dls);
    d->depth--;
    if (d->depth > 0) {
        /* from inside a user callback: the rest is freed when it returns */
        d->free_pending = true;
        d->closing = true;
        return;
    }
    while (d->dests) {
        struct esmd_dest *dest = d->dests;
        d->dests = dest->next;
        dest_free(dest);
    }
    for (size_t i = 0; i < d->nwriters; i++)
        if (d->writers[i]->free)
            d->writers[i]->free(d->wstate[i]);
    free(d->claimed);
    for (size_t i = 0; i < d->nfn_seen; i++)
        free(d->fn_seen[i]);
    free(d->fn_seen);
    free(d->instance_id);
    free(d);
}

void esmd_dests_free(struct esmd_dests *d)
{
    if (!d || d->closing)
        return;
    if (d->depth > 0) {
        /* from inside one of our callbacks: finish when it returns */
        d->free_pending = true;
        return;
    }
    dests_destroy(d);
}

bool esmd_dests_ready(struct esmd_dests *d, struct esmd_buf *detail)
{
    bool ready = true;
    if (detail)
        esmd_buf_putc(detail, '{');
    size_t n = 0;
    for (struct esmd_dest *dest = d ? d->dests : NULL; dest; dest = dest->next) {
        bool ok = !dest->failing && !dest->unwritable;
        if (dest->failing)
            ready = false;
        if (!detail)
            continue;
        if (n++)
            esmd_buf_putc(detail, ',');
        esmd_buf_put_json_string(detail, dest->label, strlen(dest->label));
        esmd_buf_printf(detail, ":{\"ready\":%s", ok ? "true" : "false");
        const char *why = dest->unwritable ? dest->unwritable : dest->last_error;
        if (why[0]) {
            esmd_buf_puts(detail, ",\"error\":");
            esmd_buf_put_json_string(detail, why, strlen(why));
        }
        esmd_buf_printf(detail, ",\"pending\":%lld}", (long long)dest->pending);
    }
    if (detail)
        esmd_buf_putc(detail, '}');
    return ready;
}
