/* The lease-queue engine (include/esmd/leaseq.h).
 *
 * Connections to the service's Postgres:
 *   ins[0..n-1]  INSERTs: every row handed over while all of them are busy waits and goes, with
 *                the others waiting, into the next INSERT (group commit);
 *   claim        claims and the start-up release (and the policy's own statements);
 *   settle       the settle statements, one at a time: it deletes the finished rows and
 *                reschedules the ones to retry (everything settled during the previous one);
 *                the claim connection when cfg->settle_conn is false. */
#include "esmd/leaseq.h"
#include "esmd/buf.h"
#include "esmd/log.h"

#include <ev.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define LQ_INSERT "esmd_leaseq_insert" /* the prepared INSERT */
#define LQ_SETTLE "esmd_leaseq_settle" /* the prepared settle statement */
#define LQ_SETTLE_RETRY_S 1.0          /* deletes of a failed settle statement go again */
#define LQ_TEXTS_MAX 8                 /* retry_texts / retry_ints per policy */

struct esmd_leaseq_key {
    struct esmd_leaseq_key *next;
    char *name; /* owned */
    char lease[24];
    void *ud;
    bool more; /* may have due rows */
};

/* A retry to write. */
struct lq_upd {
    int64_t id, delay_ms;
    int ints[LQ_TEXTS_MAX];
    char *texts[LQ_TEXTS_MAX]; /* owned or NULL */
};

struct lq_ins {
    struct esmd_leaseq *lq;
    int conn;
    int lost_pid; /* in doubt: the server process of the session the INSERT was lost with */
    struct esmd_leaseq_item *items;
};

struct lq_claim {
    struct esmd_leaseq *lq;
    size_t n;
    struct esmd_leaseq_key **keys;
    int *rooms;
};

struct lq_settle {
    struct esmd_leaseq *lq;
    int64_t *dels; /* owned: put back if the statement fails */
    size_t ndels;
};

struct esmd_leaseq {
    struct ev_loop *loop;
    const struct esmd_leaseq_policy *p;
    void *ud;
    struct esmd_leaseq_cfg cfg;
    char *instance_id;
    char token[37];
    size_t nints, ntexts;

    struct esmd_pg *ins[ESMD_LEASEQ_INSERT_CONNS_MAX], *claim_pg, *settle_pg;
    struct esmd_leaseq_key *keys, **keys_tail;
    size_t nkeys;

    struct esmd_leaseq_item *pend, *pend_tail;
    size_t npend;
    int inserting;
    int indoubt;       /* INSERTs cut off by a lost connection, being looked up */
    char *indoubt_sql; /* which of an array of indoubt_column values exist (1-based indexes) */
    bool ins_busy[ESMD_LEASEQ_INSERT_CONNS_MAX];
    ev_timer ins_kick;

    bool started, releasing, claiming, claim_again, claim_all;
    ev_timer claim_kick, poll_tm;

    int64_t *dels;
    size_t ndels, capdels;
    struct lq_upd *upds;
    size_t nupds, capupds;
    bool settling;
    ev_timer settle_kick;

    bool stopping, closing;
    void (*stop_done)(void *ud, bool late);
    void *stop_ud;
    ev_timer stop_check, stop_timeout;
};

static void claim_round(struct esmd_leaseq *lq);

static void kick(struct esmd_leaseq *lq, ev_timer *w)
{
    if (lq->closing || ev_is_active(w))
        return;
    ev_timer_set(w, 0., 0.);
    ev_timer_start(lq->loop, w);
}

/* ---- stop ---- */

static bool lq_idle(const struct esmd_leaseq *lq)
{
    return lq->pend == NULL && lq->inserting == 0 && lq->indoubt == 0 && !lq->settling &&
           lq->ndels == 0 && lq->nupds == 0 && !lq->claiming && !lq->releasing;
}

void esmd_leaseq_check(struct esmd_leaseq *lq)
{
    if (lq && lq->stopping && lq->stop_done && !lq->closing && lq_idle(lq))
        kick(lq, &lq->stop_check);
}

static void stop_finish(struct esmd_leaseq *lq, bool late)
{
    void (*done)(void *ud, bool late) = lq->stop_done;
    lq->stop_done = NULL;
    ev_timer_stop(lq->loop, &lq->stop_timeout);
    ev_timer_stop(lq->loop, &lq->stop_check);
    if (done)
        done(lq->stop_ud, late); /* may free lq */
}

static void stop_check_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct esmd_leaseq *lq = w->data;
    ESMD_UNUSED(loop);
    ESMD_UNUSED(revents);
    if (lq->stop_done && lq_idle(lq) && (!lq->p->idle || lq->p->idle(lq->ud)))
        stop_finish(lq, false);
}

static void stop_timeout_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    ESMD_UNUSED(loop);
    ESMD_UNUSED(revents);
    stop_finish(w->data, true);
}

static void poll_stop(struct esmd_leaseq *lq)
{
    if (!ev_is_active(&lq->poll_tm))
        return;
    if (lq->cfg.weak_poll)
        ev_ref(lq->loop);
    ev_timer_stop(lq->loop, &lq->poll_tm);
}

void esmd_leaseq_stop(struct esmd_leaseq *lq, double timeout_s, void (*done)(void *ud, bool late),
                      void *ud)
{
    if (!lq || lq->closing)
        return;
    lq->stopping = true;
    lq->stop_done = done;
    lq->stop_ud = ud;
    poll_stop(lq);
    ev_timer_stop(lq->loop, &lq->claim_kick);
    if (timeout_s > 0) {
        ev_timer_stop(lq->loop, &lq->stop_timeout);
        ev_timer_set(&lq->stop_timeout, timeout_s, 0.);
        ev_timer_start(lq->loop, &lq->stop_timeout);
    }
    /* rows accepted but not yet sent still go (their callers wait for the commit) */
    if (lq->pend)
        kick(lq, &lq->ins_kick);
    if (lq->ndels || lq->nupds)
        kick(lq, &lq->settle_kick);
    kick(lq, &lq->stop_check);
}

bool esmd_leaseq_stopping(const struct esmd_leaseq *lq)
{
    return lq && (lq->stopping || lq->closing);
}

/* ---- settling ---- */

static void settle_schedule(struct esmd_leaseq *lq)
{
    if (!lq->settling)
        kick(lq, &lq->settle_kick);
}

/* Appends n ids to the deletes waiting for the next settle. */
static void dels_add(struct esmd_leaseq *lq, const int64_t *ids, size_t n)
{
    if (lq->ndels + n > lq->capdels) {
        lq->capdels = lq->capdels ? 2 * lq->capdels : 256;
        if (lq->capdels < lq->ndels + n)
            lq->capdels = lq->ndels + n;
        lq->dels = esmd_xrealloc(lq->dels, lq->capdels * sizeof(*lq->dels));
    }
    memcpy(lq->dels + lq->ndels, ids, n * sizeof(*ids));
    lq->ndels += n;
}

void esmd_leaseq_delete(struct esmd_leaseq *lq, int64_t id)
{
    if (lq->closing)
        return;
    dels_add(lq, &id, 1);
    settle_schedule(lq);
}

static void upd_free(struct esmd_leaseq *lq, struct lq_upd *u)
{
    for (size_t k = 0; k < lq->ntexts; k++)
        free(u->texts[k]);
}

void esmd_leaseq_retry(struct esmd_leaseq *lq, int64_t id, int64_t delay_ms, const int *ints,
                       char **texts)
{
    if (lq->nupds == lq->capupds) {
        lq->capupds = lq->capupds ? 2 * lq->capupds : 64;
        lq->upds = esmd_xrealloc(lq->upds, lq->capupds * sizeof(*lq->upds));
    }
    struct lq_upd *u = &lq->upds[lq->nupds];
    u->id = id;
    u->delay_ms = delay_ms < 0 ? 0 : delay_ms;
    for (size_t k = 0; k < lq->nints; k++)
        u->ints[k] = ints[k];
    for (size_t k = 0; k < lq->ntexts; k++) {
        u->texts[k] = texts[k];
        texts[k] = NULL;
    }
    if (lq->closing) {
        upd_free(lq, u);
        return;
    }
    lq->nupds++;
    settle_schedule(lq);
}

static void settle_done(void *ud, const PGresult *res, const char *err)
{
    struct lq_settle *s = ud;
    struct esmd_leaseq *lq = s->lq;
    ESMD_UNUSED(res);
    lq->settling = false;
    if (err && !lq->closing) {
        /* the deletes go again after a pause (a connection lost, say); the retries are dropped:
         * their rows run again when their lease ends */
        esmd_log_limited(ESMD_LOG_WARN, NULL, "leaseq-settle",
                         "%s: settling %s failed: %s (deletes retried in %.0f s; rows to retry "
                         "run again after their lease)",
                         lq->p->name, lq->p->rows, err, LQ_SETTLE_RETRY_S);
        dels_add(lq, s->dels, s->ndels);
        /* with them go the retries that came meanwhile (none scheduled a settle: one ran) */
        if ((lq->ndels || lq->nupds) && !ev_is_active(&lq->settle_kick)) {
            ev_timer_set(&lq->settle_kick, LQ_SETTLE_RETRY_S, 0.);
            ev_timer_start(lq->loop, &lq->settle_kick);
        }
    } else if (!lq->closing && (lq->ndels || lq->nupds)) {
        settle_schedule(lq);
    }
    free(s->dels);
    free(s);
    esmd_leaseq_check(lq);
}

/* One statement: at most ESMD_LEASEQ_SETTLE_MAX deletes and as many retries, as binary arrays
 * ($1 ids to delete, $2 the lease token, $3 ids to retry, $4 their delays in ms, then one array
 * per retry_ints and retry_texts column). */
static void settle_flush(struct esmd_leaseq *lq)
{
    if (lq->settling || lq->closing || (lq->ndels == 0 && lq->nupds == 0))
        return;
    size_t nd = lq->ndels < ESMD_LEASEQ_SETTLE_MAX ? lq->ndels : ESMD_LEASEQ_SETTLE_MAX;
    size_t nu = lq->nupds < ESMD_LEASEQ_SETTLE_MAX ? lq->nupds : ESMD_LEASEQ_SETTLE_MAX;
    size_t narr = 4 + lq->nints + lq->ntexts;
    struct esmd_pg_array arr[4 + 2 * LQ_TEXTS_MAX];
    esmd_pg_array_start(&arr[0], ESMD_PG_OID_INT8);
    esmd_pg_array_start(&arr[2], ESMD_PG_OID_INT8);
    esmd_pg_array_start(&arr[3], ESMD_PG_OID_INT8);
    for (size_t k = 0; k < lq->nints; k++)
        esmd_pg_array_start(&arr[4 + k], ESMD_PG_OID_INT4);
    for (size_t k = 0; k < lq->ntexts; k++)
        esmd_pg_array_start(&arr[4 + lq->nints + k], ESMD_PG_OID_TEXT);
    struct lq_settle *s = esmd_xcalloc(1, sizeof(*s));
    s->lq = lq;
    s->ndels = nd;
    s->dels = esmd_xmalloc((nd ? nd : 1) * sizeof(*s->dels));
    for (size_t i = 0; i < nd; i++) {
        s->dels[i] = lq->dels[i];
        esmd_pg_array_add_int8(&arr[0], lq->dels[i]);
    }
    if (lq->ndels > nd)
        memmove(lq->dels, lq->dels + nd, (lq->ndels - nd) * sizeof(*lq->dels));
    lq->ndels -= nd;
    for (size_t i = 0; i < nu; i++) {
        struct lq_upd *u = &lq->upds[i];
        esmd_pg_array_add_int8(&arr[2], u->id);
        esmd_pg_array_add_int8(&arr[3], u->delay_ms);
        for (size_t k = 0; k < lq->nints; k++)
            esmd_pg_array_add_int4(&arr[4 + k], u->ints[k]);
        for (size_t k = 0; k < lq->ntexts; k++) {
            struct esmd_pg_array *a = &arr[4 + lq->nints + k];
            if (u->texts[k])
                esmd_pg_array_add(a, u->texts[k], strlen(u->texts[k]));
            else
                esmd_pg_array_add_null(a);
        }
        upd_free(lq, u);
    }
    if (lq->nupds > nu) /* (never with a NULL array: undefined even for 0 bytes) */
        memmove(lq->upds, lq->upds + nu, (lq->nupds - nu) * sizeof(*lq->upds));
    lq->nupds -= nu;
    const char *params[4 + 2 * LQ_TEXTS_MAX];
    int lengths[4 + 2 * LQ_TEXTS_MAX], formats[4 + 2 * LQ_TEXTS_MAX];
    for (size_t k = 0; k < narr; k++) {
        if (k == 1) {
            params[k] = lq->token;
            lengths[k] = 0;
            formats[k] = 0;
            continue;
        }
        esmd_pg_array_finish(&arr[k]);
        params[k] = arr[k].buf.data;
        lengths[k] = (int)arr[k].buf.len;
        formats[k] = 1;
    }
    lq->settling = true;
    if (esmd_pg_query_prepared(lq->settle_pg, LQ_SETTLE, (int)narr, params, lengths, formats,
                               settle_done, s) != 0) {
        lq->settling = false;
        dels_add(lq, s->dels, s->ndels); /* not sent: the next settle takes them */
        free(s->dels);
        free(s);
    }
    for (size_t k = 0; k < narr; k++)
        if (k != 1)
            esmd_buf_free(&arr[k].buf);
}

static void settle_kick_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    ESMD_UNUSED(loop);
    ESMD_UNUSED(revents);
    settle_flush(w->data);
}

/* The settle statement of the policy's table and retry columns. */
static char *settle_sql(const struct esmd_leaseq *lq)
{
    const struct esmd_leaseq_policy *p = lq->p;
    struct esmd_buf b = ESMD_BUF_INIT;
    esmd_buf_printf(&b,
                    "WITH d AS (DELETE FROM %s WHERE id = ANY($1::bigint[]) "
                    "AND lease_token = $2::uuid RETURNING 1), "
                    "u AS (UPDATE %s t SET next_attempt_at = clock_timestamp() + "
                    "make_interval(secs => u.d / 1000.0), lease_owner = NULL, lease_token = NULL",
                    p->table, p->table);
    if (p->lease_until_column)
        esmd_buf_printf(&b, ", %s = NULL", p->lease_until_column);
    for (size_t k = 0; k < lq->nints; k++)
        esmd_buf_printf(&b, ", %s = u.i%zu", p->retry_ints[k], k);
    for (size_t k = 0; k < lq->ntexts; k++)
        esmd_buf_printf(&b, ", %s = u.s%zu", p->retry_texts[k], k);
    esmd_buf_puts(&b, " FROM unnest($3::bigint[], $4::bigint[]");
    int np = 5;
    for (size_t k = 0; k < lq->nints; k++)
        esmd_buf_printf(&b, ", $%d::int[]", np++);
    for (size_t k = 0; k < lq->ntexts; k++)
        esmd_buf_printf(&b, ", $%d::text[]", np++);
    esmd_buf_puts(&b, ") AS u(id, d");
    for (size_t k = 0; k < lq->nints; k++)
        esmd_buf_printf(&b, ", i%zu", k);
    for (size_t k = 0; k < lq->ntexts; k++)
        esmd_buf_printf(&b, ", s%zu", k);
    esmd_buf_puts(&b, ") WHERE t.id = u.id AND t.lease_token = $2::uuid RETURNING 1) "
                      "SELECT (SELECT count(*) FROM d), (SELECT count(*) FROM u)");
    esmd_buf_cstr(&b);
    return esmd_buf_steal(&b, NULL);
}

/* ---- claims ---- */

static void claim_free(struct lq_claim *c)
{
    free(c->keys);
    free(c->rooms);
    free(c);
}

static void claim_done(void *ud, const PGresult *res, const char *err)
{
    struct lq_claim *c = ud;
    struct esmd_leaseq *lq = c->lq;
    lq->claiming = false;
    if (lq->closing) {
        claim_free(c);
        return;
    }
    if (err || !res) {
        /* not at once again: the poll timer retries every key (a claim that fails keeps failing
         * until the database is fixed, and a retry loop would only hammer it) */
        esmd_log_limited(ESMD_LOG_WARN, NULL, "leaseq-claim",
                         "%s: claiming %s: %s (retried at the next poll)", lq->p->name, lq->p->rows,
                         err ? err : "no result");
        lq->claim_again = false;
        for (size_t i = 0; i < c->n; i++)
            c->keys[i]->more = true;
        claim_free(c);
        esmd_leaseq_check(lq);
        return;
    }
    int *got = esmd_xcalloc(c->n + 1, sizeof(int));
    for (int r = 0; r < PQntuples(res); r++) {
        size_t k = (size_t)strtoul(PQgetvalue(res, r, 0), NULL, 10);
        if (k >= c->n)
            continue; /* cannot happen: the claim names its keys */
        got[k]++;
        lq->p->claimed(lq->ud, c->keys[k]->ud, strtoll(PQgetvalue(res, r, 1), NULL, 10), res, r);
    }
    if (lq->p->claim_end)
        lq->p->claim_end(lq->ud);
    bool more = lq->claim_again;
    lq->claim_again = false;
    for (size_t i = 0; i < c->n; i++) {
        if (got[i] >= c->rooms[i])
            c->keys[i]->more = true;
    }
    for (struct esmd_leaseq_key *key = lq->keys; key; key = key->next)
        more = more || key->more;
    free(got);
    claim_free(c);
    if (more)
        esmd_leaseq_claim_soon(lq);
    esmd_leaseq_check(lq);
}

/* One statement claims for every key that may have due rows and has room: one sub-select per
 * key, each with its own LIMIT known when the statement is planned. (A LIMIT taken from a joined
 * array is estimated at a tenth of the table, and the planner then joined the claimed ids back
 * with a sequential scan of the whole table: a claim cost that grew with the backlog.) The
 * result's column 0 is the key's index in the claim. */
static void claim_round(struct esmd_leaseq *lq)
{
    /* while an INSERT is in doubt, a row it committed must not be claimed, run and deleted
     * before the lookup finds it: it would be inserted again */
    if (lq->stopping || lq->closing || !lq->cfg.claims || !lq->started || lq->releasing ||
        lq->indoubt > 0)
        return;
    if (lq->claiming) {
        lq->claim_again = true;
        return;
    }
    const struct esmd_leaseq_policy *p = lq->p;
    bool all = lq->claim_all;
    lq->claim_all = false;
    struct lq_claim *c = esmd_xcalloc(1, sizeof(*c));
    c->lq = lq;
    c->keys = esmd_xcalloc(lq->nkeys + 1, sizeof(*c->keys));
    c->rooms = esmd_xcalloc(lq->nkeys + 1, sizeof(*c->rooms));
    const char **params = esmd_xcalloc(2 + 3 * lq->nkeys, sizeof(*params));
    char(*rooms)[12] = esmd_xcalloc(lq->nkeys + 1, sizeof(*rooms));
    struct esmd_buf sql = ESMD_BUF_INIT;
    params[0] = lq->instance_id;
    params[1] = lq->token;
    esmd_buf_printf(&sql,
                    "UPDATE %s t SET lease_owner = $1, lease_token = $2::uuid, "
                    "next_attempt_at = now() + make_interval(secs => claimed.lease / 1000.0)",
                    p->table);
    if (p->lease_until_column)
        esmd_buf_printf(&sql, ", %s = now() + make_interval(secs => claimed.lease / 1000.0)",
                        p->lease_until_column);
    esmd_buf_puts(&sql, " FROM (");
    int np = 2;
    for (struct esmd_leaseq_key *key = lq->keys; key; key = key->next) {
        if (!all && !key->more)
            continue;
        int room = p->room(lq->ud, key->ud);
        if (room <= 0)
            continue;
        key->more = false;
        c->keys[c->n] = key;
        c->rooms[c->n] = room;
        snprintf(rooms[c->n], sizeof(rooms[c->n]), "%d", room);
        params[np] = key->name;
        params[np + 1] = rooms[c->n];
        params[np + 2] = key->lease;
        esmd_buf_printf(&sql,
                        "%sSELECT * FROM (SELECT c.id, $%d::bigint AS lease, %zu AS k "
                        "FROM %s c WHERE c.%s = $%d AND c.next_attempt_at <= now() "
                        "ORDER BY c.next_attempt_at, c.id LIMIT $%d::int FOR UPDATE SKIP LOCKED) "
                        "f%zu",
                        c->n ? " UNION ALL " : "", np + 3, c->n, p->table, p->key_column, np + 1,
                        np + 2, c->n);
        np += 3;
        c->n++;
    }
    if (c->n > 0) {
        esmd_buf_printf(&sql, ") AS claimed WHERE t.id = claimed.id RETURNING claimed.k, t.id, %s",
                        p->returning);
        lq->claiming = true;
        if (esmd_pg_query(lq->claim_pg, esmd_buf_cstr(&sql), np, params, claim_done, c) != 0)
            lq->claiming = false;
    }
    if (!lq->claiming)
        claim_free(c);
    free(params);
    free(rooms);
    esmd_buf_free(&sql);
}

static void claim_kick_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    ESMD_UNUSED(loop);
    ESMD_UNUSED(revents);
    claim_round(w->data);
}

void esmd_leaseq_claim_soon(struct esmd_leaseq *lq)
{
    if (lq->stopping || lq->closing || !lq->cfg.claims)
        return;
    kick(lq, &lq->claim_kick);
}

void esmd_leaseq_more(struct esmd_leaseq *lq, struct esmd_leaseq_key *key)
{
    if (key)
        key->more = true;
    else
        lq->claim_all = true;
    esmd_leaseq_claim_soon(lq);
}

static void poll_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct esmd_leaseq *lq = w->data;
    ESMD_UNUSED(loop);
    ESMD_UNUSED(revents);
    esmd_leaseq_more(lq, NULL);
}

struct esmd_leaseq_key *esmd_leaseq_key_add(struct esmd_leaseq *lq, const char *name,
                                            int64_t lease_ms, void *key_ud)
{
    struct esmd_leaseq_key *key = esmd_xcalloc(1, sizeof(*key));
    key->name = esmd_xstrdup(name);
    snprintf(key->lease, sizeof(key->lease), "%lld", (long long)lease_ms);
    key->ud = key_ud;
    key->more = true;
    *lq->keys_tail = key;
    lq->keys_tail = &key->next;
    lq->nkeys++;
    return key;
}

void esmd_leaseq_key_set_lease(struct esmd_leaseq *lq, struct esmd_leaseq_key *key,
                               int64_t lease_ms)
{
    ESMD_UNUSED(lq);
    snprintf(key->lease, sizeof(key->lease), "%lld", (long long)lease_ms);
}

/* ---- start-up: the leases of an earlier process ---- */

static void release_done(void *ud, const PGresult *res, const char *err)
{
    struct esmd_leaseq *lq = ud;
    lq->releasing = false;
    if (lq->closing)
        return;
    if (err) {
        ESMD_WARN(NULL, "%s: releasing the %s of an earlier process: %s", lq->p->name, lq->p->rows,
                  err);
    } else {
        const char *n = res ? PQcmdTuples((PGresult *)res) : "0";
        if (n && *n && strcmp(n, "0") != 0)
            ESMD_INFO(NULL, "%s: %s %s held by an earlier process of instance %s are due again",
                      lq->p->name, n, lq->p->rows, lq->instance_id);
    }
    esmd_leaseq_more(lq, NULL);
    esmd_leaseq_check(lq);
}

void esmd_leaseq_start(struct esmd_leaseq *lq)
{
    const struct esmd_leaseq_policy *p = lq->p;
    struct esmd_buf sql = ESMD_BUF_INIT;
    esmd_buf_printf(&sql,
                    "UPDATE %s SET next_attempt_at = now(), lease_owner = NULL, lease_token = NULL",
                    p->table);
    if (p->lease_until_column)
        esmd_buf_printf(&sql, ", %s = NULL", p->lease_until_column);
    esmd_buf_puts(&sql, " WHERE lease_owner = $1 AND lease_token IS DISTINCT FROM $2::uuid");
    const char *params[] = {lq->instance_id, lq->token};
    lq->started = true;
    lq->releasing = true;
    if (esmd_pg_query(lq->claim_pg, esmd_buf_cstr(&sql), 2, params, release_done, lq) != 0)
        lq->releasing = false;
    esmd_buf_free(&sql);
    if (lq->cfg.claims) {
        ev_timer_set(&lq->poll_tm, lq->cfg.poll_s, lq->cfg.poll_s);
        ev_timer_start(lq->loop, &lq->poll_tm);
        if (lq->cfg.weak_poll)
            ev_unref(lq->loop);
    }
}

/* ---- inserts: group commit ---- */

static void ins_flush(struct esmd_leaseq *lq);

static bool ins_lost(const struct esmd_leaseq *lq, const PGresult *res, const char *err)
{
    return err != NULL && res == NULL && lq->p->indoubt_column != NULL && !lq->closing &&
           strncmp(err, "connection lost", 15) == 0;
}

static void indoubt_ask(struct lq_ins *b);

/* The answer to "which of these rows exist": rows 1-based indexes into b->items. */
static void indoubt_done(void *ud, const PGresult *res, const char *err)
{
    struct lq_ins *b = ud;
    struct esmd_leaseq *lq = b->lq;
    struct esmd_leaseq_item *items = b->items, *found = NULL, **ftail = &found;
    struct esmd_leaseq_item *missing = NULL, *mlast = NULL;
    size_t nfound = 0, nmissing = 0;

    if (ins_lost(lq, res, err)) {
        indoubt_ask(b); /* lost again: ask again once it is back */
        return;
    }
    lq->indoubt--;
    free(b);
    if (err) {
        /* cannot tell (closing, or the lookup failed): the rows are reported failed */
        if (!lq->closing) {
            ESMD_WARN(NULL,
                      "%s: could not find out whether an INSERT cut off by a lost connection was "
                      "committed: %s",
                      lq->p->name, err);
            esmd_leaseq_more(lq, NULL);
            esmd_leaseq_check(lq);
        }
        lq->p->inserted(lq->ud, items, false, err); /* may free lq */
        return;
    }
    int n = PQntuples(res);
    size_t i = 1;
    for (int r = 0; items; i++) {
        struct esmd_leaseq_item *it = items;
        items = it->next;
        it->next = NULL;
        while (r < n && strtoull(PQgetvalue(res, r, 0), NULL, 10) < i)
            r++;
        if ((r < n && strtoull(PQgetvalue(res, r, 0), NULL, 10) == i) ||
            (lq->p->indoubt_claimed && lq->p->indoubt_claimed(lq->ud, it))) {
            *ftail = it;
            ftail = &it->next;
            nfound++;
        } else {
            if (mlast)
                mlast->next = it;
            else
                missing = it;
            mlast = it;
            nmissing++;
        }
    }
    ESMD_INFO(NULL,
              "%s: of an INSERT cut off by a lost connection, %zu %s were committed and %zu were "
              "not (inserted again)",
              lq->p->name, nfound, lq->p->rows, nmissing);
    if (missing) { /* first in line for the next INSERT, in their order */
        mlast->next = lq->pend;
        if (!lq->pend)
            lq->pend_tail = mlast;
        lq->pend = missing;
        lq->npend += nmissing;
        kick(lq, &lq->ins_kick);
    }
    if (lq->indoubt == 0)
        esmd_leaseq_more(lq, NULL); /* claims may go on */
    esmd_leaseq_check(lq);
    if (found)
        lq->p->inserted(lq->ud, found, true, NULL); /* may free lq */
}

static void indoubt_end_done(void *ud, const PGresult *res, const char *err)
{
    const struct esmd_leaseq_policy *p = ud;
    if (err && strncmp(err, "connection lost", 15) != 0 && strcmp(err, "closed") != 0)
        ESMD_WARN(NULL,
                  "%s: could not end the session an INSERT was lost with (%s): a commit it has "
                  "not made visible yet may be taken as not made",
                  p->name, err);
    ESMD_UNUSED(res); /* false: gone already, or still there after 5 s (the server warns) */
}

/* Asks on the INSERT's connection (queued: it runs once the connection is back, before the
 * INSERTs queued after it) which of b's rows exist.
 *
 * First the session the INSERT was lost with is ended and waited for
 * (docs/async.md#in-doubt-inserts): the connection can be lost while the server still runs it (a
 * network cut; or a commit written locally and waiting for a synchronous standby). Until that
 * process is gone its transaction is neither visible nor aborted, so the lookup would take
 * committed rows as missing and insert them again. A process that pg_stat_activity shows is ended
 * only if it is of esmd's role and shows the INSERT; one it no longer shows may still be exiting
 * (it leaves pg_stat_activity before its transaction ends), so it is waited for as well. Never this
 * session. */
static void indoubt_ask(struct lq_ins *b)
{
    struct esmd_leaseq *lq = b->lq;
    if (b->lost_pid > 0) {
        char pid[16];
        snprintf(pid, sizeof(pid), "%d", b->lost_pid);
        const char *eparams[] = {pid, lq->p->insert_sql};
        (void)esmd_pg_query(lq->ins[b->conn],
                            "SELECT pg_terminate_backend($1::int, 5000) WHERE $1::int <> "
                            "pg_backend_pid() AND NOT EXISTS (SELECT 1 FROM pg_stat_activity a "
                            "WHERE a.pid = $1::int AND (a.usename IS DISTINCT FROM current_user "
                            "OR left(a.query, 200) IS DISTINCT FROM left($2, 200)))",
                            2, eparams, indoubt_end_done, (void *)lq->p);
    }
    struct esmd_pg_array arr;
    esmd_pg_array_start(&arr, lq->p->indoubt_oid);
    for (struct esmd_leaseq_item *it = b->items; it; it = it->next)
        lq->p->indoubt_value(lq->ud, it, &arr);
    esmd_pg_array_finish(&arr);
    const char *params[] = {arr.buf.data};
    int lengths[] = {(int)arr.buf.len}, formats[] = {1};
    int rc = esmd_pg_query_binary(lq->ins[b->conn], lq->indoubt_sql, 1, params, lengths, formats,
                                  indoubt_done, b);
    esmd_buf_free(&arr.buf);
    if (rc != 0)
        indoubt_done(b, NULL, "closed");
}

static void ins_done(void *ud, const PGresult *res, const char *err)
{
    struct lq_ins *b = ud;
    struct esmd_leaseq *lq = b->lq;
    struct esmd_leaseq_item *items = b->items;
    lq->inserting--;
    lq->ins_busy[b->conn] = false;
    if (ins_lost(lq, res, err)) {
        /* committed or not? ask once the connection is back; the callers wait for the answer */
        ESMD_WARN(NULL,
                  "%s: the connection was lost during an INSERT (%s): finding out which %s "
                  "were committed before answering for them",
                  lq->p->name, err, lq->p->rows);
        lq->indoubt++;
        b->lost_pid = esmd_pg_backend_pid(lq->ins[b->conn]);
        if (lq->pend)
            kick(lq, &lq->ins_kick);
        indoubt_ask(b); /* may answer at once, and the policy may free lq then */
        return;
    }
    free(b);
    if (err && !lq->closing)
        esmd_log_limited(ESMD_LOG_WARN, NULL, "leaseq-insert", "%s: storing %s: %s", lq->p->name,
                         lq->p->rows, err);
    if (!lq->closing) {
        if (lq->pend)
            kick(lq, &lq->ins_kick);
        esmd_leaseq_check(lq);
    }
    lq->p->inserted(lq->ud, items, err == NULL, err); /* may free lq */
}

/* Every row waiting (up to the policy's rows and bytes) goes into one INSERT on a free
 * connection: one statement, prepared once per connection, whose parameters are binary arrays,
 * so neither side builds, parses or plans a statement per batch. */
static void ins_flush(struct esmd_leaseq *lq)
{
    const struct esmd_leaseq_policy *p = lq->p;
    while (lq->pend && lq->inserting < lq->cfg.insert_conns && !lq->closing) {
        int conn = 0;
        while (lq->ins_busy[conn])
            conn++;
        struct lq_ins *b = esmd_xcalloc(1, sizeof(*b));
        b->lq = lq;
        b->conn = conn;
        struct esmd_pg_array cols[16];
        for (int k = 0; k < p->insert_nparams; k++)
            esmd_pg_array_start(&cols[k], p->insert_oids[k]);
        struct esmd_leaseq_item **tail = &b->items;
        size_t n = 0, bytes = 0;
        while (lq->pend && n < p->insert_max_rows &&
               (n == 0 || bytes + lq->pend->bytes <= p->insert_max_bytes)) {
            struct esmd_leaseq_item *it = lq->pend;
            lq->pend = it->next;
            if (!lq->pend)
                lq->pend_tail = NULL;
            lq->npend--;
            it->next = NULL;
            *tail = it;
            tail = &it->next;
            p->insert_row(lq->ud, it, cols);
            bytes += it->bytes;
            n++;
        }
        const char *params[16];
        int lengths[16], formats[16];
        for (int k = 0; k < p->insert_nparams; k++) {
            esmd_pg_array_finish(&cols[k]);
            params[k] = cols[k].buf.data;
            lengths[k] = (int)cols[k].buf.len;
            formats[k] = 1;
        }
        lq->ins_busy[conn] = true;
        lq->inserting++;
        int rc = esmd_pg_query_prepared(lq->ins[conn], LQ_INSERT, p->insert_nparams, params,
                                        lengths, formats, ins_done, b);
        for (int k = 0; k < p->insert_nparams; k++)
            esmd_buf_free(&cols[k].buf);
        if (rc != 0) {
            ins_done(b, NULL, "closed");
            return; /* (lq may be gone) */
        }
    }
}

static void ins_kick_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    ESMD_UNUSED(loop);
    ESMD_UNUSED(revents);
    ins_flush(w->data);
}

void esmd_leaseq_insert(struct esmd_leaseq *lq, struct esmd_leaseq_item *item)
{
    item->next = NULL;
    if (lq->pend_tail)
        lq->pend_tail->next = item;
    else
        lq->pend = item;
    lq->pend_tail = item;
    lq->npend++;
    kick(lq, &lq->ins_kick);
}

size_t esmd_leaseq_waiting(const struct esmd_leaseq *lq)
{
    return lq ? lq->npend : 0;
}

/* ---- lifecycle ---- */

const char *esmd_leaseq_token(const struct esmd_leaseq *lq)
{
    return lq ? lq->token : "";
}

struct esmd_pg *esmd_leaseq_pg(struct esmd_leaseq *lq, enum esmd_leaseq_conn which)
{
    if (!lq)
        return NULL;
    switch (which) {
    case ESMD_LEASEQ_CLAIM:
        return lq->claim_pg;
    case ESMD_LEASEQ_SETTLE:
        return lq->settle_pg;
    case ESMD_LEASEQ_INSERT:
        return lq->ins[0];
    }
    return NULL;
}

struct esmd_leaseq *esmd_leaseq_new(struct ev_loop *loop, const struct esmd_leaseq_policy *policy,
                                    void *ud, const struct esmd_leaseq_cfg *cfg, char *err,
                                    size_t errlen)
{
    size_t nints = 0, ntexts = 0;
    while (policy->retry_ints && policy->retry_ints[nints])
        nints++;
    while (policy->retry_texts && policy->retry_texts[ntexts])
        ntexts++;
    if (cfg->insert_conns < 1 || cfg->insert_conns > ESMD_LEASEQ_INSERT_CONNS_MAX ||
        policy->insert_nparams < 1 || policy->insert_nparams > 16 || nints > LQ_TEXTS_MAX ||
        ntexts > LQ_TEXTS_MAX) {
        snprintf(err, errlen, "%s: bad lease queue settings", policy->name);
        return NULL;
    }
    struct esmd_leaseq *lq = esmd_xcalloc(1, sizeof(*lq));
    lq->loop = loop;
    lq->p = policy;
    lq->ud = ud;
    lq->cfg = *cfg;
    lq->cfg.conninfo = NULL; /* (not kept) */
    lq->instance_id =
        esmd_xstrdup(cfg->instance_id && *cfg->instance_id ? cfg->instance_id : "esmd");
    lq->cfg.instance_id = lq->instance_id;
    esmd_uuid4(lq->token);
    lq->nints = nints;
    lq->ntexts = ntexts;
    lq->keys_tail = &lq->keys;
    ev_init(&lq->ins_kick, ins_kick_cb);
    ev_init(&lq->claim_kick, claim_kick_cb);
    ev_init(&lq->poll_tm, poll_cb);
    ev_init(&lq->settle_kick, settle_kick_cb);
    ev_init(&lq->stop_check, stop_check_cb);
    ev_init(&lq->stop_timeout, stop_timeout_cb);
    lq->ins_kick.data = lq->claim_kick.data = lq->poll_tm.data = lq->settle_kick.data = lq;
    lq->stop_check.data = lq->stop_timeout.data = lq;

    char name[64];
    char *settle = settle_sql(lq);
    for (int i = 0; i < cfg->insert_conns; i++) {
        snprintf(name, sizeof(name), "%s-insert", policy->name);
        lq->ins[i] = esmd_pg_new(loop, cfg->conninfo, name, err, errlen);
        if (!lq->ins[i])
            goto fail;
        if (esmd_pg_prepare(lq->ins[i], LQ_INSERT, policy->insert_sql, policy->insert_nparams) !=
            0) {
            snprintf(err, errlen, "%s: cannot prepare the insert", policy->name);
            goto fail;
        }
    }
    if (policy->indoubt_column) {
        struct esmd_buf sql = ESMD_BUF_INIT;
        esmd_buf_printf(&sql,
                        "SELECT k.i FROM unnest($1::%s[]) WITH ORDINALITY AS k(v, i) WHERE EXISTS "
                        "(SELECT 1 FROM %s t WHERE t.%s = k.v) ORDER BY k.i",
                        policy->indoubt_type, policy->table, policy->indoubt_column);
        lq->indoubt_sql = esmd_xstrdup(esmd_buf_cstr(&sql));
        esmd_buf_free(&sql);
    }
    snprintf(name, sizeof(name), "%s-worker", policy->name);
    lq->claim_pg = esmd_pg_new(loop, cfg->conninfo, name, err, errlen);
    if (!lq->claim_pg)
        goto fail;
    lq->settle_pg = lq->claim_pg;
    if (cfg->settle_conn) {
        snprintf(name, sizeof(name), "%s-settle", policy->name);
        lq->settle_pg = esmd_pg_new(loop, cfg->conninfo, name, err, errlen);
        if (!lq->settle_pg)
            goto fail;
    }
    if (esmd_pg_prepare(lq->settle_pg, LQ_SETTLE, settle, (int)(4 + nints + ntexts)) != 0) {
        snprintf(err, errlen, "%s: cannot prepare the settle statement", policy->name);
        goto fail;
    }
    free(settle);
    return lq;
fail:
    free(settle);
    esmd_leaseq_free(lq);
    return NULL;
}

void esmd_leaseq_free(struct esmd_leaseq *lq)
{
    if (!lq)
        return;
    lq->closing = true;
    poll_stop(lq);
    ev_timer_stop(lq->loop, &lq->ins_kick);
    ev_timer_stop(lq->loop, &lq->claim_kick);
    ev_timer_stop(lq->loop, &lq->settle_kick);
    ev_timer_stop(lq->loop, &lq->stop_check);
    ev_timer_stop(lq->loop, &lq->stop_timeout);
    if (lq->pend) {
        struct esmd_leaseq_item *items = lq->pend;
        lq->pend = lq->pend_tail = NULL;
        lq->npend = 0;
        lq->p->inserted(lq->ud, items, false, "shutting down");
    }
    /* statements in flight end with "closed": inserts → inserted(!ok), the rest are dropped */
    for (int i = 0; i < lq->cfg.insert_conns; i++)
        esmd_pg_free(lq->ins[i]);
    if (lq->settle_pg != lq->claim_pg)
        esmd_pg_free(lq->settle_pg);
    esmd_pg_free(lq->claim_pg);
    for (size_t i = 0; i < lq->nupds; i++)
        upd_free(lq, &lq->upds[i]);
    free(lq->upds);
    free(lq->dels);
    while (lq->keys) {
        struct esmd_leaseq_key *key = lq->keys;
        lq->keys = key->next;
        free(key->name);
        free(key);
    }
    free(lq->indoubt_sql);
    free(lq->instance_id);
    free(lq);
}
