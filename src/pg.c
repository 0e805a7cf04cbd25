/* PostgreSQL: blocking migrations under an advisory lock, and an asynchronous connection on the
 * loop that reconnects by itself (see include/esmd/pg.h and docs/postgres.md). */
#include "esmd/pg.h"
#include "esmd/backoff.h"
#include "esmd/buf.h"
#include "esmd/embedded.h"
#include "esmd/log.h"

#include <ctype.h>
#include <ev.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* esmd_migrations[]: the migrations/NNNN_*.sql files, embedded (include/esmd/embedded.h). */

/* Session advisory lock key held while migrating: the bytes "esmdmigr" as a big-endian int64. */
#define PG_MIGRATE_LOCK_KEY "7310306898252228466"

#define PG_CONNECT_TIMEOUT_S 10
#define PG_PING_INTERVAL_S 5.0
#define PG_BACKOFF_BASE_MS 100
#define PG_BACKOFF_CAP_MS 5000
#define PG_MAX_PARAMS 65535

/* libpq options esmd sets unless the conninfo says otherwise: they come before "dbname" in the
 * PQconnect*Params arrays, so the expanded conninfo overrides them. */
static const char *const pg_conn_keys[] = {"connect_timeout",
                                           "fallback_application_name",
                                           "keepalives_idle",
                                           "keepalives_interval",
                                           "keepalives_count",
                                           "dbname",
                                           NULL};
#define PG_CONN_DEFAULT_VALUES "10", "esmd", "30", "10", "3"

/* ---- helpers ---------------------------------------------------------------------------- */

static void pg_errf(char *err, size_t errlen, const char *fmt, ...) ESMD_PRINTF(3, 4);
static void pg_errf(char *err, size_t errlen, const char *fmt, ...)
{
    if (!err || errlen == 0)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err, errlen, fmt, ap);
    va_end(ap);
}

/* Copies a libpq message into dst[n] on one line: runs of white space (the newlines of
 * "ERROR: ...\nLINE 1: ...") become one space, ends trimmed. NULL src gives "". */
static void pg_clean(char *dst, size_t n, const char *src)
{
    size_t o = 0;
    bool space = false;
    if (n == 0)
        return;
    for (const char *s = src ? src : ""; *s && o + 1 < n; s++) {
        if (isspace((unsigned char)*s)) {
            space = o > 0;
            continue;
        }
        if (space && o + 2 < n)
            dst[o++] = ' ';
        space = false;
        dst[o++] = *s;
    }
    dst[o] = '\0';
}

/* The connection target without secrets ("host=db port=5432 dbname=esmd user=esmd"), for logs
 * and errors. Caller frees. */
static char *pg_redact(const char *conninfo)
{
    static const char *const keep[] = {"host", "hostaddr", "port", "dbname", "user"};
    char *msg = NULL;
    PQconninfoOption *opts = PQconninfoParse(conninfo, &msg);
    struct esmd_buf b = ESMD_BUF_INIT;
    PQfreemem(msg);
    if (!opts)
        return esmd_xstrdup("(unparsable conninfo)");
    for (size_t k = 0; k < ESMD_ARRAY_LEN(keep); k++) {
        for (const PQconninfoOption *o = opts; o->keyword; o++) {
            /* a value that is itself a connection string could carry a password */
            if (strcmp(o->keyword, keep[k]) != 0 || !o->val || !*o->val || strchr(o->val, '=') ||
                strstr(o->val, "://"))
                continue;
            esmd_buf_printf(&b, "%s%s=%s", b.len ? " " : "", o->keyword, o->val);
        }
    }
    PQconninfoFree(opts);
    if (b.len == 0)
        esmd_buf_puts(&b, "(libpq defaults)");
    return esmd_buf_steal(&b, NULL);
}

static void pg_notice_ignore(void *arg, const char *message)
{
    ESMD_UNUSED(arg);
    ESMD_UNUSED(message);
}

/* ---- migrations ------------------------------------------------------------------------- */

size_t esmd_pg_migration_count(void)
{
    return esmd_migrations_count;
}

const char *esmd_pg_migration_name(size_t i)
{
    return i < esmd_migrations_count ? esmd_migrations[i].name : NULL;
}

/* Length of the version prefix of a migration name: its leading digits ("0001"). */
static size_t pg_version_len(const char *name)
{
    return strspn(name, "0123456789");
}

bool esmd_pg_error_permanent(const PGconn *conn, const PGresult *res)
{
    if (!res || PQstatus(conn) != CONNECTION_OK)
        return false;
    const char *st = PQresultErrorField(res, PG_DIAG_SQLSTATE);
    if (!st || strlen(st) != 5)
        return false;
    static const char *const passing[] = {"08",    "53",    "57P",   "58",   "57014",
                                          "55P03", "40P01", "40001", "25006"};
    for (size_t i = 0; i < ESMD_ARRAY_LEN(passing); i++)
        if (strncmp(st, passing[i], strlen(passing[i])) == 0)
            return false;
    return true;
}

/* Runs sql (one or more statements); true when the last one succeeded (a file of comments only
 * is an empty query: fine). On failure, fills err with "<what>: <server message>" and sets
 * *permanent (esmd_pg_error_permanent). */
static bool pg_exec_ok(PGconn *conn, const char *sql, const char *what, bool *permanent, char *err,
                       size_t errlen)
{
    PGresult *res = PQexec(conn, sql);
    ExecStatusType st = res ? PQresultStatus(res) : PGRES_FATAL_ERROR;
    bool ok = st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK || st == PGRES_EMPTY_QUERY;
    if (!ok) {
        *permanent = esmd_pg_error_permanent(conn, res);
        char msg[1024];
        pg_clean(msg, sizeof(msg), res ? PQresultErrorMessage(res) : PQerrorMessage(conn));
        pg_errf(err, errlen, "%s: %s", what, msg[0] ? msg : PQresStatus(st));
    }
    PQclear(res);
    return ok;
}

static bool pg_is_applied(const PGresult *res, const char *version, size_t vlen)
{
    for (int r = 0; r < PQntuples(res); r++) {
        const char *v = PQgetvalue(res, r, 0);
        if (strlen(v) == vlen && memcmp(v, version, vlen) == 0)
            return true;
    }
    return false;
}

/* Applies one migration in its own transaction: BEGIN; sql; record it; COMMIT. On failure the
 * transaction is rolled back and err names the migration and the server's message. */
static int pg_apply_one(PGconn *conn, const char *name, const char *sql, bool *permanent, char *err,
                        size_t errlen)
{
    char what[256];
    char version[64];
    size_t vlen = pg_version_len(name);
    snprintf(version, sizeof(version), "%.*s", (int)vlen, name);
    snprintf(what, sizeof(what), "migration %s failed", name);

    if (!pg_exec_ok(conn, "BEGIN", what, permanent, err, errlen))
        return ESMD_EIO;
    if (!pg_exec_ok(conn, sql, what, permanent, err, errlen))
        goto fail;
    const char *params[2] = {version, name};
    PGresult *res = PQexecParams(conn,
                                 "INSERT INTO esmd.schema_migrations (version, name) "
                                 "VALUES ($1, $2)",
                                 2, NULL, params, NULL, NULL, 0);
    bool ok = res && PQresultStatus(res) == PGRES_COMMAND_OK;
    if (!ok) {
        *permanent = esmd_pg_error_permanent(conn, res);
        char msg[1024];
        pg_clean(msg, sizeof(msg), res ? PQresultErrorMessage(res) : PQerrorMessage(conn));
        pg_errf(err, errlen, "%s: recording it in esmd.schema_migrations: %s", what, msg);
    }
    PQclear(res);
    if (!ok)
        goto fail;
    if (!pg_exec_ok(conn, "COMMIT", what, permanent, err, errlen))
        goto fail;
    return 0;
fail:
    /* best effort: if the connection is gone, the server rolls back by itself */
    PQclear(PQexec(conn, "ROLLBACK"));
    return ESMD_EIO;
}

static int pg_cmp_names(const char *const *names, size_t a, size_t b)
{
    return strcmp(names[a], names[b]);
}

int esmd_pg_migrate_list(const char *conninfo, const char *const *names, const char *const *sqls,
                         size_t n, int *applied, char *err, size_t errlen)
{
    int rc = ESMD_EIO;
    int done = 0;
    bool locked = false, permanent = false;
    PGconn *conn = NULL;
    PGresult *have = NULL;
    char *desc = NULL;
    size_t *order = NULL;

    if (applied)
        *applied = 0;
    if (err && errlen)
        err[0] = '\0';
    if (!conninfo || (n > 0 && (!names || !sqls))) {
        pg_errf(err, errlen, "migrate: no conninfo or migration list");
        return ESMD_EINVAL;
    }

    /* name order (insertion sort: a handful of files), names "NNNN_what", versions unique */
    order = esmd_xcalloc(n ? n : 1, sizeof(*order));
    for (size_t i = 0; i < n; i++) {
        if (!names[i] || !sqls[i] || pg_version_len(names[i]) == 0) {
            pg_errf(err, errlen,
                    "migration %zu (%s): the name must start with its number and "
                    "have SQL",
                    i, names[i] ? names[i] : "unnamed");
            rc = ESMD_EINVAL;
            goto out;
        }
        size_t j = i;
        while (j > 0 && pg_cmp_names(names, order[j - 1], i) > 0) {
            order[j] = order[j - 1];
            j--;
        }
        order[j] = i;
    }
    for (size_t k = 1; k < n; k++) {
        const char *a = names[order[k - 1]], *b = names[order[k]];
        size_t la = pg_version_len(a), lb = pg_version_len(b);
        if (la == lb && memcmp(a, b, la) == 0) {
            pg_errf(err, errlen, "migrations %s and %s have the same version %.*s", a, b, (int)la,
                    a);
            rc = ESMD_EINVAL;
            goto out;
        }
    }

    const char *const vals[] = {PG_CONN_DEFAULT_VALUES, conninfo, NULL};
    desc = pg_redact(conninfo);
    conn = PQconnectdbParams(pg_conn_keys, vals, 1);
    if (!conn || PQstatus(conn) != CONNECTION_OK) {
        char msg[1024];
        pg_clean(msg, sizeof(msg), conn ? PQerrorMessage(conn) : "out of memory");
        pg_errf(err, errlen, "migrate: connecting to %s: %s", desc, msg);
        goto out;
    }
    PQsetNoticeProcessor(conn, pg_notice_ignore, NULL);

    if (!pg_exec_ok(conn, "SELECT pg_advisory_lock(" PG_MIGRATE_LOCK_KEY ")",
                    "migrate: taking the advisory lock", &permanent, err, errlen))
        goto out;
    locked = true;
    if (!pg_exec_ok(conn,
                    "CREATE SCHEMA IF NOT EXISTS esmd; "
                    "CREATE TABLE IF NOT EXISTS esmd.schema_migrations ("
                    "version text PRIMARY KEY, name text, applied_at timestamptz DEFAULT now())",
                    "migrate: creating esmd.schema_migrations", &permanent, err, errlen))
        goto out;
    have = PQexec(conn, "SELECT version FROM esmd.schema_migrations");
    if (!have || PQresultStatus(have) != PGRES_TUPLES_OK) {
        permanent = esmd_pg_error_permanent(conn, have);
        char msg[1024];
        pg_clean(msg, sizeof(msg), have ? PQresultErrorMessage(have) : PQerrorMessage(conn));
        pg_errf(err, errlen, "migrate: reading esmd.schema_migrations: %s", msg);
        goto out;
    }
    /* Versions in the table that this binary does not know (a newer esmd ran) are left alone. */
    for (size_t k = 0; k < n; k++) {
        size_t i = order[k];
        if (pg_is_applied(have, names[i], pg_version_len(names[i])))
            continue;
        if (pg_apply_one(conn, names[i], sqls[i], &permanent, err, errlen) != 0)
            goto out;
        done++;
    }
    rc = 0;
out:
    if (rc == ESMD_EIO && permanent)
        rc = ESMD_EINVAL;
    if (locked && PQstatus(conn) == CONNECTION_OK)
        PQclear(PQexec(conn, "SELECT pg_advisory_unlock(" PG_MIGRATE_LOCK_KEY ")"));
    PQclear(have);
    PQfinish(conn);
    free(desc);
    free(order);
    if (applied)
        *applied = done;
    return rc;
}

int esmd_pg_migrate(const char *conninfo, int *applied, char *err, size_t errlen)
{
    size_t n = esmd_migrations_count;
    const char **names = esmd_xcalloc(n ? n : 1, sizeof(*names));
    const char **sqls = esmd_xcalloc(n ? n : 1, sizeof(*sqls));
    for (size_t i = 0; i < n; i++) {
        names[i] = esmd_migrations[i].name;
        sqls[i] = (const char *)esmd_migrations[i].data;
    }
    int rc = esmd_pg_migrate_list(conninfo, names, sqls, n, applied, err, errlen);
    free(names);
    free(sqls);
    return rc;
}

/* ---- asynchronous connection ------------------------------------------------------------ */

enum pg_state {
    PG_CONNECTING, /* PQconnectPoll in progress */
    PG_READY,      /* connected: queries are sent one at a time */
    PG_WAITING,    /* connection failed or lost: the retry timer runs */
};

struct pg_query {
    struct pg_query *next;
    char *sql;
    char **params; /* nparams entries, NULL = SQL NULL */
    int nparams;
    int *lengths;                /* NULL: every parameter is NUL-terminated text */
    int *formats;                /* idem; 1 = binary */
    bool ping;                   /* internal SELECT 1: no callback */
    struct pg_listen *listen;    /* internal LISTEN for this subscription: no callback */
    struct pg_prepared *prepare; /* internal PREPARE of this statement: no callback */
    char *stmt;                  /* run this prepared statement (sql: its name, for logs) */
    esmd_pg_cb cb;
    void *ud;
    PGresult *res; /* collected result (owned) */
    char *err;     /* error delivered with it (owned) */
};

struct pg_list {
    struct pg_query *head, *tail;
};

/* One esmd_pg_prepare() statement: prepared again after every (re)connection. */
struct pg_prepared {
    struct pg_prepared *next;
    char *name, *sql; /* owned */
    int nparams;
};

/* One esmd_pg_listen() subscription: LISTEN is issued again after every (re)connection. */
struct pg_listen {
    struct pg_listen *next;
    char *channel; /* owned */
    char *sql;     /* owned: LISTEN "channel" */
    esmd_pg_notify_cb cb;
    void *ud;
};

/* A notification (or a "listening again" mark, payload NULL) waiting for its callback. */
struct pg_note {
    struct pg_note *next;
    struct pg_listen *listen; /* borrowed from pg->listens */
    char *payload;            /* owned; NULL: the LISTEN was (re)established */
};

struct esmd_pg {
    struct ev_loop *loop;
    char *name;     /* for logs */
    char *conninfo; /* secret: never logged */
    char *desc;     /* redacted conninfo, for logs */
    double connect_timeout;
    PGconn *conn;
    enum pg_state state;
    bool degraded; /* connected, but the last ping failed or is overdue */
    bool flushing; /* PQflush returned 1: watch for writable */
    bool closing;  /* esmd_pg_free called; destroyed when depth drops to 0 */
    bool lost_logged;
    int backend_pid; /* the server process of the current or last session (0: none yet) */
    int depth;       /* > 0 while one of our watcher callbacks runs */
    int attempt;
    ev_io io;
    ev_timer retry;                     /* reconnect backoff */
    ev_timer timeout;                   /* connect timeout */
    ev_timer idle;                      /* ping when idle; detects an unanswered ping */
    ev_timer kick;                      /* sends newly queued queries on the next loop turn */
    struct pg_list queue;               /* not yet sent */
    struct pg_query *inflight;          /* sent, collecting its result */
    struct pg_list done;                /* finished, callbacks not yet run */
    struct pg_listen *listens;          /* esmd_pg_listen() subscriptions */
    struct pg_prepared *prepareds;      /* esmd_pg_prepare() statements */
    struct pg_note *notes, *notes_tail; /* notifications not yet delivered */
    char last_error[512];
};

static void pg_list_push(struct pg_list *l, struct pg_query *q)
{
    q->next = NULL;
    if (l->tail)
        l->tail->next = q;
    else
        l->head = q;
    l->tail = q;
}

static void pg_list_push_front(struct pg_list *l, struct pg_query *q)
{
    q->next = l->head;
    l->head = q;
    if (!l->tail)
        l->tail = q;
}

static struct pg_query *pg_list_pop(struct pg_list *l)
{
    struct pg_query *q = l->head;
    if (q) {
        l->head = q->next;
        if (!l->head)
            l->tail = NULL;
        q->next = NULL;
    }
    return q;
}

static void pg_query_free(struct pg_query *q)
{
    if (!q)
        return;
    for (int i = 0; i < q->nparams; i++)
        free(q->params[i]);
    free(q->params);
    free(q->lengths);
    free(q->formats);
    free(q->stmt);
    free(q->sql);
    PQclear(q->res);
    free(q->err);
    free(q);
}

static void pg_note_push(struct esmd_pg *pg, struct pg_listen *l, const char *payload)
{
    struct pg_note *n = esmd_xcalloc(1, sizeof(*n));
    n->listen = l;
    n->payload = payload ? esmd_xstrdup(payload) : NULL;
    if (pg->notes_tail)
        pg->notes_tail->next = n;
    else
        pg->notes = n;
    pg->notes_tail = n;
}

static struct pg_query *pg_listen_query(struct pg_listen *l)
{
    struct pg_query *q = esmd_xcalloc(1, sizeof(*q));
    q->sql = esmd_xstrdup(l->sql);
    q->params = esmd_xcalloc(1, sizeof(*q->params));
    q->listen = l;
    return q;
}

static void pg_set_error(struct esmd_pg *pg, const char *msg)
{
    pg_clean(pg->last_error, sizeof(pg->last_error), msg);
}

/* Watches fd for events, re-registering when either changed (libpq may switch sockets during
 * PQconnectPoll). fd < 0 stops watching. */
static void pg_watch(struct esmd_pg *pg, int fd, int events)
{
    if (ev_is_active(&pg->io)) {
        if (fd == pg->io.fd && events == (pg->io.events & (EV_READ | EV_WRITE)))
            return;
        ev_io_stop(pg->loop, &pg->io);
    }
    if (fd < 0 || events == 0)
        return;
    ev_io_set(&pg->io, fd, events);
    ev_io_start(pg->loop, &pg->io);
}

static struct pg_query *pg_prepare_query(struct pg_prepared *p)
{
    struct pg_query *q = esmd_xcalloc(1, sizeof(*q));
    q->sql = esmd_xstrdup(p->sql);
    q->params = esmd_xcalloc(1, sizeof(*q->params));
    q->prepare = p;
    return q;
}

/* A query finished: queue its callback (run by pg_leave) or, for a ping, note the health. */
static void pg_complete(struct esmd_pg *pg, struct pg_query *q, PGresult *res, const char *err)
{
    if (q->listen) {
        /* a LISTEN lost with the connection is issued again on the next one */
        if (!err)
            pg_note_push(pg, q->listen, NULL);
        else if (strncmp(err, "connection lost", 15) != 0)
            esmd_log_limited(ESMD_LOG_WARN, NULL, "pg_listen", "postgres %s (%s): %s failed: %s",
                             pg->name, pg->desc, q->listen->sql, err);
        PQclear(res);
        pg_query_free(q);
        return;
    }
    if (q->prepare) {
        if (err && strncmp(err, "connection lost", 15) != 0)
            esmd_log_limited(ESMD_LOG_WARN, NULL, "pg_prepare",
                             "postgres %s (%s): preparing %s failed: %s", pg->name, pg->desc,
                             q->prepare->name, err);
        PQclear(res);
        pg_query_free(q);
        return;
    }
    if (q->stmt && err && res) {
        /* the statement is gone (its PREPARE failed, or DISCARD ran): prepare it again */
        const char *state = PQresultErrorField(res, PG_DIAG_SQLSTATE);
        for (struct pg_prepared *p = pg->prepareds; p && state && strcmp(state, "26000") == 0;
             p = p->next)
            if (strcmp(p->name, q->stmt) == 0)
                pg_list_push_front(&pg->queue, pg_prepare_query(p));
    }
    if (q->ping) {
        pg->degraded = err != NULL;
        if (err)
            esmd_log_limited(ESMD_LOG_WARN, NULL, "pg_ping", "postgres %s (%s): ping failed: %s",
                             pg->name, pg->desc, err);
        PQclear(res);
        pg_query_free(q);
        return;
    }
    PQclear(q->res);
    q->res = res;
    q->err = err ? esmd_xstrdup(err) : NULL;
    pg_list_push(&pg->done, q);
}

static void pg_connect_start(struct esmd_pg *pg);

/* The connection failed or was lost: the query in flight gets (NULL, "connection lost: ..."),
 * queued ones wait, and a reconnect is scheduled with backoff. */
static void pg_fail(struct esmd_pg *pg, const char *reason)
{
    bool was_ready = pg->state == PG_READY;
    pg_set_error(pg, reason); /* copy first: reason may live in the PGconn */

    pg_watch(pg, -1, 0);
    ev_timer_stop(pg->loop, &pg->timeout);
    ev_timer_stop(pg->loop, &pg->idle);
    pg->flushing = false;
    if (pg->inflight && pg->inflight->ping) {
        pg_query_free(pg->inflight);
        pg->inflight = NULL;
    }
    if (pg->inflight) {
        struct pg_query *q = pg->inflight;
        char msg[sizeof(pg->last_error) + 64];
        /* the server often says why before closing ("terminating connection due to ...") */
        const char *why = pg->last_error;
        char server[sizeof(pg->last_error)];
        if (q->res && PQresultStatus(q->res) == PGRES_FATAL_ERROR) {
            pg_clean(server, sizeof(server), PQresultErrorMessage(q->res));
            if (server[0])
                why = server;
        }
        snprintf(msg, sizeof(msg), "connection lost: %s", why);
        pg->inflight = NULL;
        pg_complete(pg, q, NULL, msg);
    }
    PQfinish(pg->conn);
    pg->conn = NULL;
    pg->state = PG_WAITING;

    if (was_ready) {
        ESMD_WARN(NULL, "postgres %s (%s): connection lost: %s; reconnecting", pg->name, pg->desc,
                  pg->last_error);
        pg->lost_logged = true;
    } else if (!pg->lost_logged) {
        ESMD_WARN(NULL, "postgres %s (%s): cannot connect: %s; retrying", pg->name, pg->desc,
                  pg->last_error);
        pg->lost_logged = true;
    } else {
        esmd_log_limited(ESMD_LOG_INFO, NULL, "pg_reconnect",
                         "postgres %s (%s): reconnect attempt %d failed: %s", pg->name, pg->desc,
                         pg->attempt, pg->last_error);
    }

    const struct esmd_backoff bo = {PG_BACKOFF_BASE_MS, PG_BACKOFF_CAP_MS};
    int64_t delay = esmd_backoff_delay(&bo, pg->attempt, esmd_random64());
    if (pg->attempt < 64)
        pg->attempt++;
    ev_timer_set(&pg->retry, (double)delay / 1000.0, 0.);
    ev_timer_start(pg->loop, &pg->retry);
}

/* Sends what is buffered; watches for writable while libpq still has output. */
static bool pg_flush(struct esmd_pg *pg)
{
    int r = PQflush(pg->conn);
    if (r < 0) {
        pg_fail(pg, PQerrorMessage(pg->conn));
        return false;
    }
    pg->flushing = r == 1;
    pg_watch(pg, PQsocket(pg->conn), EV_READ | (pg->flushing ? EV_WRITE : 0));
    return true;
}

/* Sends the next queued query when connected and nothing is in flight. */
static void pg_send_next(struct esmd_pg *pg)
{
    while (pg->state == PG_READY && !pg->inflight && pg->queue.head) {
        struct pg_query *q = pg_list_pop(&pg->queue);
        int sent;
        if (q->prepare)
            sent = PQsendPrepare(pg->conn, q->prepare->name, q->sql, q->prepare->nparams, NULL);
        else if (q->stmt)
            sent = PQsendQueryPrepared(pg->conn, q->stmt, q->nparams,
                                       (const char *const *)q->params, q->lengths, q->formats, 0);
        else
            sent = PQsendQueryParams(pg->conn, q->sql, q->nparams, NULL,
                                     (const char *const *)q->params, q->lengths, q->formats, 0);
        if (!sent) {
            if (PQstatus(pg->conn) == CONNECTION_BAD) {
                pg_list_push_front(&pg->queue, q); /* never sent: runs after reconnecting */
                pg_fail(pg, PQerrorMessage(pg->conn));
                return;
            }
            char msg[512];
            pg_clean(msg, sizeof(msg), PQerrorMessage(pg->conn));
            pg_set_error(pg, msg);
            pg_complete(pg, q, NULL, msg);
            continue;
        }
        pg->inflight = q;
        if (!pg_flush(pg))
            return;
    }
}

/* The query in flight returned all its results (q->res holds the last, or the first error). */
static void pg_finish(struct esmd_pg *pg, struct pg_query *q)
{
    PGresult *res = q->res;
    q->res = NULL;
    ev_timer_again(pg->loop, &pg->idle);
    ExecStatusType st = res ? PQresultStatus(res) : PGRES_FATAL_ERROR;
    if (st == PGRES_COMMAND_OK || st == PGRES_TUPLES_OK || st == PGRES_EMPTY_QUERY) {
        pg->degraded = false;
        pg_complete(pg, q, res, NULL);
        return;
    }
    char msg[1024];
    pg_clean(msg, sizeof(msg), res ? PQresultErrorMessage(res) : PQerrorMessage(pg->conn));
    if (!msg[0])
        snprintf(msg, sizeof(msg), "%s", PQresStatus(st));
    pg_set_error(pg, msg);
    pg_complete(pg, q, res, msg);
}

/* Reads every result libpq has complete; sends the next query after each finished one. */
static void pg_collect(struct esmd_pg *pg)
{
    while (pg->state == PG_READY && pg->inflight && !PQisBusy(pg->conn)) {
        struct pg_query *q = pg->inflight;
        PGresult *res = PQgetResult(pg->conn);
        if (res) {
            ExecStatusType st = PQresultStatus(res);
            if (st == PGRES_COPY_IN || st == PGRES_COPY_OUT || st == PGRES_COPY_BOTH) {
                /* not supported: fail the query and start over on a clean connection */
                PQclear(res);
                pg->inflight = NULL;
                pg_complete(pg, q, NULL, "COPY is not supported by esmd_pg_query");
                pg_fail(pg, "connection reset after an unsupported COPY");
                return;
            }
            /* keep the last result, but never let a later one hide an error */
            if (q->res && PQresultStatus(q->res) == PGRES_FATAL_ERROR) {
                PQclear(res);
            } else {
                PQclear(q->res);
                q->res = res;
            }
            continue;
        }
        if (PQstatus(pg->conn) == CONNECTION_BAD)
            break; /* the error came from losing the connection: pg_fail below */
        pg->inflight = NULL;
        pg_finish(pg, q);
        pg_send_next(pg);
    }
    if (pg->state != PG_READY)
        return;
    PGnotify *nf;
    while ((nf = PQnotifies(pg->conn)) != NULL) {
        for (struct pg_listen *l = pg->listens; l; l = l->next) {
            if (strcmp(l->channel, nf->relname) == 0) {
                pg_note_push(pg, l, nf->extra ? nf->extra : "");
                break;
            }
        }
        PQfreemem(nf);
    }
    if (PQstatus(pg->conn) == CONNECTION_BAD)
        pg_fail(pg, PQerrorMessage(pg->conn));
}

static void pg_notice(void *arg, const char *message)
{
    struct esmd_pg *pg = arg;
    char msg[512];
    pg_clean(msg, sizeof(msg), message);
    ESMD_DEBUG(NULL, "postgres %s: %s", pg->name, msg);
}

static void pg_connected(struct esmd_pg *pg)
{
    ev_timer_stop(pg->loop, &pg->timeout);
    if (PQsetnonblocking(pg->conn, 1) != 0) {
        pg_fail(pg, PQerrorMessage(pg->conn));
        return;
    }
    PQsetNoticeProcessor(pg->conn, pg_notice, pg);
    pg->backend_pid = PQbackendPID(pg->conn);
    pg->state = PG_READY;
    pg->degraded = false;
    if (pg->lost_logged)
        ESMD_INFO(NULL, "postgres %s (%s): connection recovered after %d attempt%s", pg->name,
                  pg->desc, pg->attempt, pg->attempt == 1 ? "" : "s");
    else
        ESMD_INFO(NULL, "postgres %s (%s): connected", pg->name, pg->desc);
    pg->lost_logged = false;
    pg->attempt = 0;
    /* subscriptions first: drop LISTENs still queued from before, issue every one again */
    struct pg_list keep = {NULL, NULL};
    struct pg_query *q;
    while ((q = pg_list_pop(&pg->queue)) != NULL) {
        if (q->listen || q->prepare)
            pg_query_free(q);
        else
            pg_list_push(&keep, q);
    }
    pg->queue = keep;
    for (struct pg_listen *l = pg->listens; l; l = l->next)
        pg_list_push_front(&pg->queue, pg_listen_query(l));
    /* prepared statements die with the session: prepare them again, before anything else */
    for (struct pg_prepared *p = pg->prepareds; p; p = p->next)
        pg_list_push_front(&pg->queue, pg_prepare_query(p));
    pg_watch(pg, PQsocket(pg->conn), EV_READ);
    ev_timer_again(pg->loop, &pg->idle);
    pg_send_next(pg);
}

static void pg_connect_step(struct esmd_pg *pg)
{
    PostgresPollingStatusType st = PQconnectPoll(pg->conn);
    int fd = PQsocket(pg->conn);
    switch (st) {
    case PGRES_POLLING_READING:
    case PGRES_POLLING_WRITING:
        if (fd < 0) {
            pg_fail(pg, "libpq has no socket while connecting");
            return;
        }
        pg_watch(pg, fd, st == PGRES_POLLING_READING ? EV_READ : EV_WRITE);
        return;
    case PGRES_POLLING_OK:
        pg_connected(pg);
        return;
    default:
        pg_fail(pg, PQerrorMessage(pg->conn));
        return;
    }
}

static void pg_connect_start(struct esmd_pg *pg)
{
    const char *const vals[] = {PG_CONN_DEFAULT_VALUES, pg->conninfo, NULL};
    pg->state = PG_CONNECTING;
    pg->conn = PQconnectStartParams(pg_conn_keys, vals, 1);
    if (!pg->conn) {
        pg_fail(pg, "out of memory");
        return;
    }
    if (PQstatus(pg->conn) == CONNECTION_BAD || PQsocket(pg->conn) < 0) {
        pg_fail(pg, PQerrorMessage(pg->conn));
        return;
    }
    if (pg->connect_timeout > 0) {
        ev_timer_set(&pg->timeout, pg->connect_timeout, 0.);
        ev_timer_start(pg->loop, &pg->timeout);
    }
    /* libpq: start as if PQconnectPoll had returned PGRES_POLLING_WRITING */
    pg_watch(pg, PQsocket(pg->conn), EV_WRITE);
}

static void pg_destroy(struct esmd_pg *pg)
{
    while (pg->notes) {
        struct pg_note *n = pg->notes;
        pg->notes = n->next;
        free(n->payload);
        free(n);
    }
    while (pg->prepareds) {
        struct pg_prepared *p = pg->prepareds;
        pg->prepareds = p->next;
        free(p->name);
        free(p->sql);
        free(p);
    }
    while (pg->listens) {
        struct pg_listen *l = pg->listens;
        pg->listens = l->next;
        free(l->channel);
        free(l->sql);
        free(l);
    }
    free(pg->name);
    free(pg->conninfo);
    free(pg->desc);
    free(pg);
}

static void pg_enter(struct esmd_pg *pg)
{
    pg->depth++;
}

/* End of a watcher callback: runs the callbacks of finished queries in order, then frees the
 * object if one of them (or anything before) called esmd_pg_free. */
static void pg_leave(struct esmd_pg *pg)
{
    while (!pg->closing && pg->done.head) {
        struct pg_query *q = pg_list_pop(&pg->done);
        if (q->cb)
            q->cb(q->ud, q->res, q->err);
        pg_query_free(q);
    }
    while (!pg->closing && pg->notes) {
        struct pg_note *n = pg->notes;
        pg->notes = n->next;
        if (!pg->notes)
            pg->notes_tail = NULL;
        n->listen->cb(n->listen->ud, n->listen->channel, n->payload);
        free(n->payload);
        free(n);
    }
    if (--pg->depth == 0 && pg->closing)
        pg_destroy(pg);
}

static void pg_io_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    struct esmd_pg *pg = w->data;
    ESMD_UNUSED(loop);
    pg_enter(pg);
    if (pg->state == PG_CONNECTING) {
        pg_connect_step(pg);
    } else if (pg->state == PG_READY) {
        if ((revents & EV_READ) && !PQconsumeInput(pg->conn))
            pg_fail(pg, PQerrorMessage(pg->conn));
        else if (!pg->flushing || pg_flush(pg))
            pg_collect(pg);
    }
    pg_leave(pg);
}

static void pg_retry_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct esmd_pg *pg = w->data;
    ESMD_UNUSED(loop);
    ESMD_UNUSED(revents);
    pg_enter(pg);
    if (pg->state == PG_WAITING)
        pg_connect_start(pg);
    pg_leave(pg);
}

static void pg_timeout_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct esmd_pg *pg = w->data;
    ESMD_UNUSED(loop);
    ESMD_UNUSED(revents);
    pg_enter(pg);
    if (pg->state == PG_CONNECTING) {
        char msg[64];
        snprintf(msg, sizeof(msg), "timeout expired after %g s while connecting",
                 pg->connect_timeout);
        pg_fail(pg, msg);
    }
    pg_leave(pg);
}

/* Every PG_PING_INTERVAL_S without a finished query: send SELECT 1; if the previous ping is
 * still unanswered, the connection is not ready until it answers. */
static void pg_idle_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct esmd_pg *pg = w->data;
    ESMD_UNUSED(loop);
    ESMD_UNUSED(revents);
    pg_enter(pg);
    if (pg->state == PG_READY) {
        if (!pg->inflight && !pg->queue.head) {
            struct pg_query *q = esmd_xcalloc(1, sizeof(*q));
            q->sql = esmd_xstrdup("SELECT 1");
            q->ping = true;
            pg_list_push(&pg->queue, q);
            pg_send_next(pg);
        } else if (pg->inflight && pg->inflight->ping && !pg->degraded) {
            pg->degraded = true;
            esmd_log_limited(ESMD_LOG_WARN, NULL, "pg_ping",
                             "postgres %s (%s): no answer to a ping for %g s", pg->name, pg->desc,
                             PG_PING_INTERVAL_S);
        }
    }
    pg_leave(pg);
}

static void pg_kick_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct esmd_pg *pg = w->data;
    ESMD_UNUSED(loop);
    ESMD_UNUSED(revents);
    pg_enter(pg);
    pg_send_next(pg);
    pg_leave(pg);
}

struct esmd_pg *esmd_pg_new(struct ev_loop *loop, const char *conninfo, const char *name, char *err,
                            size_t errlen)
{
    if (!loop || !conninfo) {
        pg_errf(err, errlen, "postgres: no loop or conninfo");
        return NULL;
    }
    char *msg = NULL;
    PQconninfoOption *opts = PQconninfoParse(conninfo, &msg);
    if (!opts) {
        char clean[512];
        pg_clean(clean, sizeof(clean), msg ? msg : "out of memory");
        pg_errf(err, errlen, "postgres %s: bad conninfo: %s", name ? name : "", clean);
        PQfreemem(msg);
        return NULL;
    }
    double timeout = PG_CONNECT_TIMEOUT_S;
    for (const PQconninfoOption *o = opts; o->keyword; o++) {
        if (strcmp(o->keyword, "connect_timeout") == 0 && o->val && *o->val) {
            timeout = atoi(o->val); /* libpq: 0 or less waits forever, 1 means 2 */
            if (timeout == 1)
                timeout = 2;
        }
    }
    PQconninfoFree(opts);

    struct esmd_pg *pg = esmd_xcalloc(1, sizeof(*pg));
    pg->loop = loop;
    pg->name = esmd_xstrdup(name ? name : "postgres");
    pg->conninfo = esmd_xstrdup(conninfo);
    pg->desc = pg_redact(conninfo);
    pg->connect_timeout = timeout;
    ev_init(&pg->io, pg_io_cb);
    ev_init(&pg->retry, pg_retry_cb);
    ev_init(&pg->timeout, pg_timeout_cb);
    ev_init(&pg->idle, pg_idle_cb);
    pg->idle.repeat = PG_PING_INTERVAL_S;
    ev_init(&pg->kick, pg_kick_cb);
    pg->io.data = pg->retry.data = pg->timeout.data = pg->idle.data = pg->kick.data = pg;
    pg_connect_start(pg);
    return pg;
}

int esmd_pg_backend_pid(const struct esmd_pg *pg)
{
    return pg->backend_pid;
}

int esmd_pg_query(struct esmd_pg *pg, const char *sql, int nparams, const char *const *params,
                  esmd_pg_cb cb, void *ud)
{
    return esmd_pg_query_binary(pg, sql, nparams, params, NULL, NULL, cb, ud);
}

static int pg_query_add(struct esmd_pg *pg, const char *sql, const char *stmt, int nparams,
                        const char *const *params, const int *lengths, const int *formats,
                        esmd_pg_cb cb, void *ud);

int esmd_pg_query_binary(struct esmd_pg *pg, const char *sql, int nparams,
                         const char *const *params, const int *lengths, const int *formats,
                         esmd_pg_cb cb, void *ud)
{
    return pg_query_add(pg, sql, NULL, nparams, params, lengths, formats, cb, ud);
}

int esmd_pg_query_prepared(struct esmd_pg *pg, const char *name, int nparams,
                           const char *const *params, const int *lengths, const int *formats,
                           esmd_pg_cb cb, void *ud)
{
    bool known = false;
    for (struct pg_prepared *p = pg ? pg->prepareds : NULL; p; p = p->next)
        known = known || (strcmp(p->name, name) == 0 && p->nparams == nparams);
    if (!known)
        return ESMD_EINVAL;
    return pg_query_add(pg, name, name, nparams, params, lengths, formats, cb, ud);
}

int esmd_pg_prepare(struct esmd_pg *pg, const char *name, const char *sql, int nparams)
{
    if (!pg || !name || !*name || !sql || nparams < 0 || nparams > PG_MAX_PARAMS)
        return ESMD_EINVAL;
    if (pg->closing)
        return ESMD_ESTATE;
    for (struct pg_prepared *p = pg->prepareds; p; p = p->next)
        if (strcmp(p->name, name) == 0)
            return ESMD_EINVAL;
    struct pg_prepared *p = esmd_xcalloc(1, sizeof(*p));
    p->name = esmd_xstrdup(name);
    p->sql = esmd_xstrdup(sql);
    p->nparams = nparams;
    p->next = pg->prepareds;
    pg->prepareds = p;
    /* connected: prepare now, in turn; otherwise pg_connected() does */
    if (pg->state == PG_READY) {
        pg_list_push(&pg->queue, pg_prepare_query(p));
        if (!pg->inflight && !ev_is_active(&pg->kick)) {
            ev_timer_set(&pg->kick, 0., 0.);
            ev_timer_start(pg->loop, &pg->kick);
        }
    }
    return 0;
}

static int pg_query_add(struct esmd_pg *pg, const char *sql, const char *stmt, int nparams,
                        const char *const *params, const int *lengths, const int *formats,
                        esmd_pg_cb cb, void *ud)
{
    if (!pg || !sql || nparams < 0 || nparams > PG_MAX_PARAMS || (nparams > 0 && !params) ||
        (!lengths != !formats))
        return ESMD_EINVAL;
    for (int i = 0; lengths && i < nparams; i++)
        if ((formats[i] != 0 && formats[i] != 1) || (formats[i] == 1 && lengths[i] < 0))
            return ESMD_EINVAL;
    if (pg->closing)
        return ESMD_ESTATE;
    struct pg_query *q = esmd_xcalloc(1, sizeof(*q));
    q->sql = esmd_xstrdup(sql);
    q->stmt = stmt ? esmd_xstrdup(stmt) : NULL;
    q->nparams = nparams;
    q->params = esmd_xcalloc(nparams ? (size_t)nparams : 1, sizeof(*q->params));
    if (lengths) {
        q->lengths = esmd_xcalloc(nparams ? (size_t)nparams : 1, sizeof(int));
        q->formats = esmd_xcalloc(nparams ? (size_t)nparams : 1, sizeof(int));
        memcpy(q->lengths, lengths, (size_t)nparams * sizeof(int));
        memcpy(q->formats, formats, (size_t)nparams * sizeof(int));
    }
    for (int i = 0; i < nparams; i++) {
        if (!params[i])
            continue;
        if (q->formats && q->formats[i] == 1) {
            q->params[i] = esmd_xmalloc((size_t)q->lengths[i] + 1);
            memcpy(q->params[i], params[i], (size_t)q->lengths[i]);
        } else {
            q->params[i] = esmd_xstrdup(params[i]);
        }
    }
    q->cb = cb;
    q->ud = ud;
    pg_list_push(&pg->queue, q);
    /* An idle connection sends at once (a loop turn saved on every query: it showed in the
     * latency of the async queue's inserts). Callbacks never run inside the caller's stack:
     * whatever finished or failed meanwhile waits in pg->done for the kick below. */
    if (pg->state == PG_READY && !pg->inflight && pg->queue.head == q) {
        pg_enter(pg);
        pg_send_next(pg);
        pg->depth--; /* pg_leave() would run callbacks; the kick does that */
        if (!pg->done.head && !pg->notes)
            return 0;
    }
    if ((pg->state == PG_READY && !pg->inflight) || pg->done.head || pg->notes) {
        if (ev_is_active(&pg->kick))
            return 0;
        ev_timer_set(&pg->kick, 0., 0.);
        ev_timer_start(pg->loop, &pg->kick);
    }
    return 0;
}

int esmd_pg_listen(struct esmd_pg *pg, const char *channel, esmd_pg_notify_cb cb, void *ud)
{
    if (!pg || !channel || !*channel || strlen(channel) > 63 || !cb)
        return ESMD_EINVAL;
    if (pg->closing)
        return ESMD_ESTATE;
    struct pg_listen *l = esmd_xcalloc(1, sizeof(*l));
    l->channel = esmd_xstrdup(channel);
    struct esmd_buf b = ESMD_BUF_INIT;
    esmd_buf_puts(&b, "LISTEN \"");
    for (const char *c = channel; *c; c++) {
        if (*c == '"')
            esmd_buf_putc(&b, '"');
        esmd_buf_putc(&b, *c);
    }
    esmd_buf_putc(&b, '"');
    l->sql = esmd_buf_steal(&b, NULL);
    l->cb = cb;
    l->ud = ud;
    struct pg_listen **pp = &pg->listens;
    while (*pp)
        pp = &(*pp)->next;
    *pp = l;
    /* connected: LISTEN now, in turn; otherwise pg_connected() issues it */
    if (pg->state == PG_READY) {
        pg_list_push(&pg->queue, pg_listen_query(l));
        if (!pg->inflight && !ev_is_active(&pg->kick)) {
            ev_timer_set(&pg->kick, 0., 0.);
            ev_timer_start(pg->loop, &pg->kick);
        }
    }
    return 0;
}

static void pg_close_list(struct pg_list *l, bool keep_results)
{
    struct pg_query *q;
    while ((q = pg_list_pop(l)) != NULL) {
        if (q->cb) {
            if (keep_results)
                q->cb(q->ud, q->res, q->err);
            else
                q->cb(q->ud, NULL, "closed");
        }
        pg_query_free(q);
    }
}

void esmd_pg_free(struct esmd_pg *pg)
{
    if (!pg || pg->closing)
        return;
    pg->closing = true;
    pg_watch(pg, -1, 0);
    ev_timer_stop(pg->loop, &pg->retry);
    ev_timer_stop(pg->loop, &pg->timeout);
    ev_timer_stop(pg->loop, &pg->idle);
    ev_timer_stop(pg->loop, &pg->kick);
    PQfinish(pg->conn);
    pg->conn = NULL;
    pg->state = PG_WAITING;

    /* In order: finished queries get their results, the rest (NULL, "closed"). Callbacks may
     * not queue more (esmd_pg_query returns ESMD_ESTATE) nor free again (ignored). */
    pg_close_list(&pg->done, true);
    struct pg_query *q = pg->inflight;
    pg->inflight = NULL;
    if (q) {
        PQclear(q->res);
        q->res = NULL;
        if (q->cb && !q->ping)
            q->cb(q->ud, NULL, "closed");
        pg_query_free(q);
    }
    pg_close_list(&pg->queue, false);
    if (pg->depth == 0)
        pg_destroy(pg);
}

bool esmd_pg_ready(const struct esmd_pg *pg)
{
    return pg && !pg->closing && pg->state == PG_READY && !pg->degraded;
}

const char *esmd_pg_last_error(const struct esmd_pg *pg)
{
    return pg ? pg->last_error : "";
}

/* ---- binary arrays ---- */

static void pg_put_u32(struct esmd_buf *b, uint32_t v)
{
    unsigned char x[4] = {(unsigned char)(v >> 24), (unsigned char)(v >> 16),
                          (unsigned char)(v >> 8), (unsigned char)v};
    esmd_buf_append(b, x, 4);
}

void esmd_pg_array_start(struct esmd_pg_array *a, unsigned int elem_oid)
{
    esmd_buf_init(&a->buf);
    a->n = 0;
    pg_put_u32(&a->buf, 1);        /* dimensions */
    pg_put_u32(&a->buf, 0);        /* no NULLs */
    pg_put_u32(&a->buf, elem_oid); /* element type */
    pg_put_u32(&a->buf, 0);        /* length: esmd_pg_array_finish */
    pg_put_u32(&a->buf, 1);        /* lower bound */
}

void esmd_pg_array_add(struct esmd_pg_array *a, const void *data, size_t len)
{
    pg_put_u32(&a->buf, (uint32_t)len);
    esmd_buf_append(&a->buf, data, len);
    a->n++;
}

void esmd_pg_array_add_null(struct esmd_pg_array *a)
{
    unsigned char *flags = (unsigned char *)a->buf.data + 4;
    flags[3] = 1;                    /* has NULLs */
    pg_put_u32(&a->buf, UINT32_MAX); /* length -1 */
    a->n++;
}

void esmd_pg_array_add_int4(struct esmd_pg_array *a, int32_t v)
{
    pg_put_u32(&a->buf, 4);
    pg_put_u32(&a->buf, (uint32_t)v);
    a->n++;
}

void esmd_pg_array_add_int8(struct esmd_pg_array *a, int64_t v)
{
    pg_put_u32(&a->buf, 8);
    pg_put_u32(&a->buf, (uint32_t)((uint64_t)v >> 32));
    pg_put_u32(&a->buf, (uint32_t)v);
    a->n++;
}

void esmd_pg_array_finish(struct esmd_pg_array *a)
{
    unsigned char *p = (unsigned char *)a->buf.data + 12;
    p[0] = (unsigned char)(a->n >> 24);
    p[1] = (unsigned char)(a->n >> 16);
    p[2] = (unsigned char)(a->n >> 8);
    p[3] = (unsigned char)a->n;
}
