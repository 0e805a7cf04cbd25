/* The Postgres outbox of destinations (include/esmd/destination.h, docs/destinations.md).
 *
 * Two connections to the service's Postgres: `send` runs the INSERTs of esmd_dests_send()
 * (several sends of one loop turn, or that arrive while an INSERT is in flight, share one
 * statement: group commit), `work` runs the delivery worker's statements (claims, deletes,
 * failure updates, pgqueue:// writes, the pending count), one at a time.
 *
 * The worker claims due rows per destination in one statement (a LATERAL sub-select per
 * destination, FOR UPDATE SKIP LOCKED, at most `room` rows each: the destination's in-flight
 * cap minus what it has in flight), so a slow or failing destination never takes the claims of
 * another. The rows of a claim are handed at once to their destination's writer, found by the
 * URI's scheme in the table of writers (src/destination.c; one file each: src/dest_kafka.c,
 * dest_redis.c, dest_http.c, dest_pgqueue.c, dest_function.c), which reports each row's
 * outcome with esmd_outbox_done(). A written row is deleted (batched); a failed one gets attempts +
 * 1, last_error and next_attempt_at = now() + backoff (1 s doubling to 5 min, jitter). A
 * destination whose last write failed is "failing": it gets one row at a time (a probe) and no
 * claims until its own backoff has passed; its first success clears it.
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
/* Retry of a DELETE of written rows that failed (connection lost). */
#define DESTS_DELETE_RETRY_S 1.0
/* esmd_dests_stop() waits this long for writes in progress. */
#define DESTS_STOP_TIMEOUT_S 40.0

static const struct esmd_backoff dests_backoff = {1000, 300000};

/* One esmd_dests_send() waiting for its INSERT. */
struct send_rec {
    struct send_rec *next;
    struct esmd_dest *dest;
    char *payload; /* owned, NUL-terminated */
    size_t len;
    char *keyhex; /* owned: "\x..." bytea text, NULL: no key */
    char *attrs;  /* owned: message attributes JSON, NULL: none */
    esmd_dests_cb cb;
    void *ud;
};

/* At most this many kinds of destination (the writers' table, src/destination.c). */
#define DESTS_MAX_WRITERS 8

struct esmd_dests {
    struct esmd_dest_env env; /* what the writers see */
    struct ev_loop *loop;
    char *instance_id;
    char token[37]; /* this process's lease token */
    struct esmd_pg *send_pg, *work_pg;
    struct esmd_dest *dests;
    const struct esmd_dest_writer *const *writers;
    size_t nwriters;
    void *wstate[DESTS_MAX_WRITERS]; /* each writer's open() */

    struct send_rec *sendq, *sendq_tail; /* waiting for an INSERT */
    int inserting;                       /* INSERTs in flight */
    ev_timer send_kick;

    struct esmd_delivery *dls; /* every delivery in flight */
    int ndls;
    bool claiming;
    bool poll_due;
    bool reclaimed; /* the start-up release of our old leases has run */
    ev_timer claim_kick, poll_tm, count_tm;
    bool counting;

    int64_t *del_ids;
    size_t ndel, capdel;
    bool deleting;
    ev_timer del_kick;
    int work_queries; /* work statements in flight (for stop) */

    bool stopping, closing, free_pending;
    int depth; /* > 0 while user callbacks run */
    void (*stop_done)(void *ud);
    void *stop_ud;
    ev_timer stop_check, stop_timeout;

    struct esmd_metric *m_ok, *m_fail, *m_pending;
};

static void dests_destroy(struct esmd_dests *d);
static void claim_schedule(struct esmd_dests *d);
static void stop_maybe_done(struct esmd_dests *d);
static void work_query(struct esmd_dests *d, const char *sql, int n, const char *const *params,
                       esmd_pg_cb cb, void *ud);

/* ---- small helpers ---- */

/* An element of a Postgres array literal: "..." with \ and " escaped. */
static void put_array_text(struct esmd_buf *b, const char *s)
{
    esmd_buf_putc(b, '"');
    for (; *s; s++) {
        if (*s == '"' || *s == '\\')
            esmd_buf_putc(b, '\\');
        esmd_buf_putc(b, *s);
    }
    esmd_buf_putc(b, '"');
}

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
    dest->more = true;
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

static void dests_kick(struct esmd_dests *d, ev_timer *w)
{
    if (d->closing || ev_is_active(w))
        return;
    ev_timer_set(w, 0., 0.);
    ev_timer_start(d->loop, w);
}

static void fail_done(void *ud, const PGresult *res, const char *err)
{
    struct esmd_dests *d = ud;
    ESMD_UNUSED(res);
    d->work_queries--;
    if (err && !d->closing)
        esmd_log_limited(ESMD_LOG_WARN, NULL, "dest-fail-update",
                         "destinations: recording a failed write: %s (the row is retried when "
                         "its lease ends)",
                         err);
    stop_maybe_done(d);
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
            dest->more = true; /* its backlog can go now */
        }
        dest->failing = false;
        dest->failures = 0;
        dest->retry_at = 0;
        dest->last_error[0] = '\0';
        if (r == ESMD_DEST_OK) {
            if (d->ndel == d->capdel) {
                d->capdel = d->capdel ? d->capdel * 2 : 64;
                d->del_ids = esmd_xrealloc(d->del_ids, d->capdel * sizeof(*d->del_ids));
            }
            d->del_ids[d->ndel++] = dl->id;
            dests_kick(d, &d->del_kick);
        }
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
        char id[24], secs[32];
        snprintf(id, sizeof(id), "%lld", (long long)dl->id);
        snprintf(secs, sizeof(secs), "%.3f", (double)delay / 1000.0);
        const char *params[] = {id, d->token, dest->last_error, secs};
        work_query(d,
                   "UPDATE esmd.outbox SET attempts = attempts + 1, last_error = $3, "
                   "next_attempt_at = now() + make_interval(secs => $4::float8), "
                   "lease_owner = NULL, lease_token = NULL, lease_until = NULL "
                   "WHERE id = $1 AND lease_token = $2",
                   4, params, fail_done, d);
        break;
    }
    }
    delivery_free(dl);
    if (!d->stopping)
        claim_schedule(d);
    stop_maybe_done(d);
}

/* A delivery of the claimed row `row` of res, in flight (not written yet). */
static struct esmd_delivery *delivery_new(struct esmd_dests *d, struct esmd_dest *dest,
                                          const PGresult *res, int row)
{
    struct esmd_delivery *dl = esmd_xcalloc(1, sizeof(*dl));
    dl->d = d;
    dl->dest = dest;
    dl->id = strtoll(PQgetvalue(res, row, 0), NULL, 10);
    dl->len = (size_t)PQgetlength(res, row, 2);
    dl->payload = esmd_xstrndup(PQgetvalue(res, row, 2), dl->len);
    if (!PQgetisnull(res, row, 3)) {
        size_t n = 0;
        unsigned char *k = PQunescapeBytea((const unsigned char *)PQgetvalue(res, row, 3), &n);
        if (k) {
            dl->key = esmd_xmalloc(n ? n : 1);
            memcpy(dl->key, k, n);
            dl->keylen = n;
            PQfreemem(k);
        }
    }
    dl->attempts = atoi(PQgetvalue(res, row, 4));
    if (!PQgetisnull(res, row, 5))
        dl->attrs = esmd_xstrdup(PQgetvalue(res, row, 5));
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
    return d->token;
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
                       esmd_pg_cb cb, void *ud)
{
    struct writer_query *q = esmd_xmalloc(sizeof(*q));
    *q = (struct writer_query){d, cb, ud};
    work_query(d, sql, n, params, writer_query_done, q);
}

/* ---- the worker: claims, deletes ---- */

static void work_query(struct esmd_dests *d, const char *sql, int n, const char *const *params,
                       esmd_pg_cb cb, void *ud)
{
    d->work_queries++; /* every callback takes one off */
    if (!d->work_pg || esmd_pg_query(d->work_pg, sql, n, params, cb, ud) != 0)
        cb(ud, NULL, "closed"); /* only while closing */
}

static int dest_room(const struct esmd_dest *dest)
{
    int cap = dest->failing ? 1 : dest->cap;
    int room = cap - dest->inflight;
    return room > DESTS_CLAIM_MAX ? DESTS_CLAIM_MAX : room;
}

/* A claim with the rooms it asked for, to know which destinations may have more. */
struct claim {
    struct esmd_dests *d;
    size_t n;
    struct esmd_dest **dests;
    int *rooms;
};

static void claim_done(void *ud, const PGresult *res, const char *err)
{
    struct claim *c = ud;
    struct esmd_dests *d = c->d;
    d->work_queries--;
    d->claiming = false;
    if (d->closing) {
        free(c->dests);
        free(c->rooms);
        free(c);
        return;
    }
    if (err || !res) {
        esmd_log_limited(ESMD_LOG_WARN, NULL, "dest-claim",
                         "destinations: claiming outbox rows: %s", err ? err : "no result");
        for (size_t i = 0; i < c->n; i++)
            c->dests[i]->more = true; /* the poll timer tries again */
    } else {
        /* the claim's rows by destination, in claim order: each destination's writer gets its
         * rows at once (pgqueue:// writes them in one statement) */
        int nrows = PQntuples(res);
        size_t *got = esmd_xcalloc(c->n + 1, sizeof(*got));
        size_t *at = esmd_xcalloc((size_t)nrows + 1, sizeof(*at));
        for (int r = 0; r < nrows; r++) {
            const char *uri = PQgetvalue(res, r, 1);
            size_t i = 0;
            while (i < c->n && strcmp(c->dests[i]->uri, uri) != 0)
                i++;
            at[r] = i; /* c->n: cannot happen, the claim names its destinations */
            got[i]++;
        }
        size_t *first = esmd_xcalloc(c->n + 1, sizeof(*first));
        for (size_t i = 1; i <= c->n; i++)
            first[i] = first[i - 1] + got[i - 1];
        struct esmd_delivery **group = esmd_xcalloc((size_t)nrows + 1, sizeof(*group));
        size_t *fill = esmd_xcalloc(c->n + 1, sizeof(*fill));
        for (int r = 0; r < nrows; r++)
            if (at[r] < c->n)
                group[first[at[r]] + fill[at[r]]++] = delivery_new(d, c->dests[at[r]], res, r);
        for (size_t i = 0; i < c->n; i++)
            if (got[i] > 0)
                c->dests[i]->w->write(group + first[i], got[i]);
        free(group);
        free(fill);
        free(first);
        free(at);
        for (size_t i = 0; i < c->n; i++)
            if (got[i] >= (size_t)c->rooms[i])
                c->dests[i]->more = true;
        free(got);
    }
    free(c->dests);
    free(c->rooms);
    free(c);
    if (!d->stopping)
        claim_schedule(d);
    stop_maybe_done(d);
}

/* One claim statement for every destination that may have due rows and has room. */
static void claim_round(struct esmd_dests *d)
{
    if (d->stopping || d->closing || d->claiming)
        return;
    double now = ev_now(d->loop);
    bool all = d->poll_due;
    d->poll_due = false;
    struct esmd_buf names = ESMD_BUF_INIT, rooms = ESMD_BUF_INIT;
    struct claim *c = esmd_xcalloc(1, sizeof(*c));
    c->d = d;
    size_t cap = 0;
    for (struct esmd_dest *dest = d->dests; dest; dest = dest->next) {
        if (dest->unwritable || (!all && !dest->more) || dest->retry_at > now)
            continue;
        int room = dest_room(dest);
        if (room <= 0)
            continue;
        dest->more = false;
        if (c->n == cap) {
            cap = cap ? cap * 2 : 8;
            c->dests = esmd_xrealloc(c->dests, cap * sizeof(*c->dests));
            c->rooms = esmd_xrealloc(c->rooms, cap * sizeof(*c->rooms));
        }
        c->dests[c->n] = dest;
        c->rooms[c->n] = room;
        esmd_buf_putc(&names, c->n ? ',' : '{');
        put_array_text(&names, dest->uri);
        esmd_buf_printf(&rooms, "%s%d", c->n ? "," : "{", room);
        c->n++;
    }
    if (c->n == 0) {
        free(c);
        esmd_buf_free(&names);
        esmd_buf_free(&rooms);
        return;
    }
    esmd_buf_putc(&names, '}');
    esmd_buf_putc(&rooms, '}');
    char lease[16];
    snprintf(lease, sizeof(lease), "%d", DESTS_LEASE_S);
    const char *params[] = {d->instance_id, d->token, lease, esmd_buf_cstr(&names),
                            esmd_buf_cstr(&rooms)};
    d->claiming = true;
    work_query(
        d,
        "UPDATE esmd.outbox o SET lease_owner = $1, lease_token = $2, "
        "lease_until = now() + make_interval(secs => $3::float8), "
        "next_attempt_at = now() + make_interval(secs => $3::float8) "
        "FROM (SELECT x.id FROM unnest($4::text[], $5::int[]) AS w(destination, room) "
        "CROSS JOIN LATERAL (SELECT c.id FROM esmd.outbox c "
        "WHERE c.destination = w.destination AND c.next_attempt_at <= now() "
        "ORDER BY c.next_attempt_at, c.id LIMIT w.room FOR UPDATE SKIP LOCKED) x) AS claimed "
        "WHERE o.id = claimed.id "
        "RETURNING o.id, o.destination, o.payload, o.key, o.attempts, o.attributes",
        5, params, claim_done, c);
    esmd_buf_free(&names);
    esmd_buf_free(&rooms);
}

static void claim_schedule(struct esmd_dests *d)
{
    if (d->claiming || d->stopping)
        return;
    for (struct esmd_dest *dest = d->dests; dest; dest = dest->next) {
        if (dest->more && !dest->unwritable && dest_room(dest) > 0 &&
            dest->retry_at <= ev_now(d->loop)) {
            dests_kick(d, &d->claim_kick);
            return;
        }
    }
}

static void claim_kick_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    ESMD_UNUSED(loop);
    ESMD_UNUSED(revents);
    claim_round(w->data);
}

static void poll_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct esmd_dests *d = w->data;
    ESMD_UNUSED(loop);
    ESMD_UNUSED(revents);
    d->poll_due = true;
    claim_round(d);
}

struct del_batch {
    struct esmd_dests *d;
    int64_t *ids;
    size_t n;
};

static void del_flush(struct esmd_dests *d);

static void del_done(void *ud, const PGresult *res, const char *err)
{
    struct del_batch *b = ud;
    struct esmd_dests *d = b->d;
    ESMD_UNUSED(res);
    d->work_queries--;
    d->deleting = false;
    if (err && !d->closing) {
        esmd_log_limited(ESMD_LOG_WARN, NULL, "dest-delete",
                         "destinations: deleting %zu written outbox rows: %s; retrying", b->n, err);
        /* put them back: retried after a pause */
        for (size_t i = 0; i < b->n; i++) {
            if (d->ndel == d->capdel) {
                d->capdel = d->capdel ? d->capdel * 2 : 64;
                d->del_ids = esmd_xrealloc(d->del_ids, d->capdel * sizeof(*d->del_ids));
            }
            d->del_ids[d->ndel++] = b->ids[i];
        }
        if (!ev_is_active(&d->del_kick)) {
            ev_timer_set(&d->del_kick, DESTS_DELETE_RETRY_S, 0.);
            ev_timer_start(d->loop, &d->del_kick);
        }
    } else if (!d->closing && d->ndel > 0) {
        dests_kick(d, &d->del_kick);
    }
    free(b->ids);
    free(b);
    stop_maybe_done(d);
}

static void del_flush(struct esmd_dests *d)
{
    if (d->deleting || d->ndel == 0 || d->closing)
        return;
    struct del_batch *b = esmd_xcalloc(1, sizeof(*b));
    b->d = d;
    b->ids = d->del_ids;
    b->n = d->ndel;
    d->del_ids = NULL;
    d->ndel = d->capdel = 0;
    struct esmd_buf ids = ESMD_BUF_INIT;
    for (size_t i = 0; i < b->n; i++)
        esmd_buf_printf(&ids, "%c%lld", i ? ',' : '{', (long long)b->ids[i]);
    esmd_buf_putc(&ids, '}');
    const char *params[] = {esmd_buf_cstr(&ids), d->token};
    d->deleting = true;
    work_query(d, "DELETE FROM esmd.outbox WHERE id = ANY($1::bigint[]) AND lease_token = $2", 2,
               params, del_done, b);
    esmd_buf_free(&ids);
}

static void del_kick_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    ESMD_UNUSED(loop);
    ESMD_UNUSED(revents);
    del_flush(w->data);
}

/* At start-up: rows leased by an earlier process of this instance id are due again now. */
static void reclaim_done(void *ud, const PGresult *res, const char *err)
{
    struct esmd_dests *d = ud;
    d->work_queries--;
    if (d->closing)
        return;
    if (err) {
        ESMD_WARN(NULL, "destinations: releasing the outbox rows of an earlier process: %s", err);
    } else {
        d->reclaimed = true;
        const char *n = res ? PQcmdTuples((PGresult *)res) : "0";
        if (n && strcmp(n, "0") != 0 && *n)
            ESMD_INFO(NULL,
                      "destinations: %s outbox rows held by an earlier process of instance %s "
                      "are due again",
                      n, d->instance_id);
    }
    d->poll_due = true;
    claim_round(d);
    stop_maybe_done(d);
}

/* ---- the pending gauge ---- */

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
    work_query(d, "SELECT destination, count(*) FROM esmd.outbox GROUP BY destination", 0, NULL,
               count_done, d);
}

/* ---- sends (group commit) ---- */

struct insert {
    struct esmd_dests *d;
    struct send_rec *recs;
};

static void send_rec_free(struct send_rec *s)
{
    free(s->payload);
    free(s->keyhex);
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

static void insert_done(void *ud, const PGresult *res, const char *err)
{
    struct insert *ins = ud;
    struct esmd_dests *d = ins->d;
    ESMD_UNUSED(res);
    d->inserting--;
    bool ok = err == NULL;
    if (!ok && !d->closing)
        esmd_log_limited(ESMD_LOG_WARN, NULL, "dest-insert",
                         "destinations: storing records in the outbox: %s", err);
    dests_enter(d);
    while (ins->recs) {
        struct send_rec *s = ins->recs;
        ins->recs = s->next;
        if (ok && !d->closing)
            s->dest->more = true;
        s->cb(s->ud, ok, ok ? NULL : err);
        send_rec_free(s);
    }
    free(ins);
    if (!d->closing && !d->free_pending) {
        if (ok && !d->stopping)
            claim_schedule(d);
        if (d->sendq)
            dests_kick(d, &d->send_kick);
        stop_maybe_done(d);
    }
    dests_leave(d);
}

static void send_flush(struct esmd_dests *d)
{
    if (d->closing || !d->sendq || d->inserting > 0)
        return;
    struct esmd_buf sql = ESMD_BUF_INIT;
    struct insert *ins = esmd_xcalloc(1, sizeof(*ins));
    ins->d = d;
    struct send_rec **tail = &ins->recs;
    size_t n = 0, bytes = 0;
    esmd_buf_puts(&sql, "INSERT INTO esmd.outbox (destination, payload, key, attributes) VALUES ");
    while (d->sendq && n < DESTS_SEND_BATCH_ROWS &&
           (n == 0 || bytes + d->sendq->len <= DESTS_SEND_BATCH_BYTES)) {
        struct send_rec *s = d->sendq;
        d->sendq = s->next;
        if (!d->sendq)
            d->sendq_tail = NULL;
        s->next = NULL;
        *tail = s;
        tail = &s->next;
        esmd_buf_printf(&sql, "%s($%zu, $%zu, $%zu::bytea, $%zu::jsonb)", n ? ", " : "", 4 * n + 1,
                        4 * n + 2, 4 * n + 3, 4 * n + 4);
        bytes += s->len;
        n++;
    }
    const char **params = esmd_xcalloc(4 * n, sizeof(*params));
    size_t i = 0;
    for (struct send_rec *s = ins->recs; s; s = s->next, i++) {
        params[4 * i] = s->dest->uri;
        params[4 * i + 1] = s->payload;
        params[4 * i + 2] = s->keyhex;
        params[4 * i + 3] = s->attrs;
    }
    d->inserting++;
    if (esmd_pg_query(d->send_pg, esmd_buf_cstr(&sql), (int)(4 * n), params, insert_done, ins) != 0)
        insert_done(ins, NULL, "closed");
    free(params);
    esmd_buf_free(&sql);
}

static void send_kick_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    ESMD_UNUSED(loop);
    ESMD_UNUSED(revents);
    send_flush(w->data);
}

/* ---- stop ---- */

static bool dests_idle(const struct esmd_dests *d)
{
    return d->ndls == 0 && d->work_queries == 0 && d->ndel == 0 && !d->sendq && d->inserting == 0;
}

static void stop_finish(struct esmd_dests *d)
{
    ev_timer_stop(d->loop, &d->stop_timeout);
    ev_timer_stop(d->loop, &d->stop_check);
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

static void stop_check_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct esmd_dests *d = w->data;
    ESMD_UNUSED(loop);
    ESMD_UNUSED(revents);
    if (d->stopping && d->stop_done && dests_idle(d))
        stop_finish(d);
}

static void stop_timeout_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct esmd_dests *d = w->data;
    ESMD_UNUSED(loop);
    ESMD_UNUSED(revents);
    if (!d->stop_done)
        return;
    ESMD_WARN(NULL,
              "destinations: %d writes still in progress after %.0f s; stopping without them "
              "(their rows are delivered after their lease ends)",
              d->ndls, DESTS_STOP_TIMEOUT_S);
    stop_finish(d);
}

static void stop_maybe_done(struct esmd_dests *d)
{
    if (d->stopping && d->stop_done && !d->closing && dests_idle(d))
        dests_kick(d, &d->stop_check);
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
    esmd_uuid4(d->token);
    d->m_ok = esmd_metric(ESMD_COUNTER, "esmd_destination_deliveries_total",
                          "Records written to their destination (outbox rows delivered).");
    d->m_fail = esmd_metric(ESMD_COUNTER, "esmd_destination_delivery_failures_total",
                            "Failed writes to a destination (each is retried with backoff).");
    d->m_pending = esmd_metric(ESMD_GAUGE, "esmd_destination_pending",
                               "Records in the outbox for the destination (refreshed every 5 s).");
    ev_init(&d->send_kick, send_kick_cb);
    ev_init(&d->claim_kick, claim_kick_cb);
    ev_init(&d->poll_tm, poll_cb);
    ev_init(&d->count_tm, count_cb);
    ev_init(&d->del_kick, del_kick_cb);
    ev_init(&d->stop_check, stop_check_cb);
    ev_init(&d->stop_timeout, stop_timeout_cb);
    d->send_kick.data = d->claim_kick.data = d->poll_tm.data = d->count_tm.data = d;
    d->del_kick.data = d->stop_check.data = d->stop_timeout.data = d;

    d->env.d = d;
    d->env.loop = loop;
    d->env.names.cfg = cfg;
    d->env.instance_id = d->instance_id;
    d->env.token = d->token;
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

    d->send_pg = esmd_pg_new(loop, conninfo, "outbox-send", err, errlen);
    if (d->send_pg)
        d->work_pg = esmd_pg_new(loop, conninfo, "outbox-worker", err, errlen);
    if (!d->send_pg || !d->work_pg) {
        dests_destroy(d);
        return NULL;
    }
    const char *params[] = {d->instance_id, d->token};
    work_query(d,
               "UPDATE esmd.outbox SET next_attempt_at = now(), lease_owner = NULL, "
               "lease_token = NULL, lease_until = NULL "
               "WHERE lease_owner = $1 AND lease_token IS DISTINCT FROM $2::uuid",
               2, params, reclaim_done, d);
    ev_timer_set(&d->poll_tm, DESTS_POLL_S, DESTS_POLL_S);
    ev_timer_start(loop, &d->poll_tm);
    ev_timer_set(&d->count_tm, 0.2, DESTS_COUNT_S);
    ev_timer_start(loop, &d->count_tm);
    return d;
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
                dest->more = true;
        if (!d->stopping && !d->closing)
            claim_schedule(d);
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
    if (key && dest->w->takes_key) {
        struct esmd_buf b = ESMD_BUF_INIT;
        static const char hex[] = "0123456789abcdef";
        esmd_buf_puts(&b, "\\x");
        for (size_t i = 0; i < keylen; i++) {
            unsigned char c = ((const unsigned char *)key)[i];
            esmd_buf_putc(&b, hex[c >> 4]);
            esmd_buf_putc(&b, hex[c & 15]);
        }
        esmd_buf_cstr(&b);
        s->keyhex = esmd_buf_steal(&b, NULL);
    }
    if (attrs && dest->w->takes_attrs)
        s->attrs = esmd_xstrdup(attrs);
    s->cb = cb;
    s->ud = ud;
    if (d->sendq_tail)
        d->sendq_tail->next = s;
    else
        d->sendq = s;
    d->sendq_tail = s;
    dests_kick(d, &d->send_kick);
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
    ev_timer_stop(d->loop, &d->poll_tm);
    ev_timer_stop(d->loop, &d->count_tm);
    ev_timer_stop(d->loop, &d->claim_kick);
    ev_timer_set(&d->stop_timeout, DESTS_STOP_TIMEOUT_S, 0.);
    ev_timer_start(d->loop, &d->stop_timeout);
    /* redis writes held for a setup that never ends are bounded by the watchdog */
    if (dests_idle(d))
        dests_kick(d, &d->stop_check);
}

static void dests_destroy(struct esmd_dests *d)
{
    d->closing = true;
    d->free_pending = false;
    struct ev_loop *loop = d->loop;
    ev_timer_stop(loop, &d->send_kick);
    ev_timer_stop(loop, &d->claim_kick);
    ev_timer_stop(loop, &d->poll_tm);
    ev_timer_stop(loop, &d->count_tm);
    ev_timer_stop(loop, &d->del_kick);
    ev_timer_stop(loop, &d->stop_check);
    ev_timer_stop(loop, &d->stop_timeout);

    /* sends that never reached an INSERT */
    dests_enter(d);
    while (d->sendq) {
        struct send_rec *s = d->sendq;
        d->sendq = s->next;
        s->cb(s->ud, false, "shutting down");
        send_rec_free(s);
    }
    d->sendq_tail = NULL;

    /* writes in progress are dropped: their rows stay leased and are delivered later */
    for (size_t i = 0; i < d->nwriters; i++)
        if (d->writers[i]->close)
            d->writers[i]->close(d->wstate[i]);
    /* INSERTs in flight report "closed"; work statements end */
    esmd_pg_free(d->send_pg);
    d->send_pg = NULL;
    esmd_pg_free(d->work_pg);
    d->work_pg = NULL;
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
    free(d->del_ids);
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
