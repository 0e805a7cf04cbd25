/* redis://CONNECTION/STREAM destinations (src/dest_private.h): one hiredis async connection per
 * connection, made on first use and set up as the Redis source's links are
 * (esmd_redis_link_open: AUTH, SELECT, CLIENT SETNAME); a row is written by XADD STREAM *
 * payload JSON. A reply overdue by the write time limit drops the connection. */
#include "dest_private.h"
#include "esmd/log.h"
#include "esmd/redis_link.h"

#include <ev.h>
#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define DESTS_REDIS_FIELD "payload"

enum redis_state { RW_IDLE, RW_SETUP, RW_UP };

/* One connection per configured connection. */
struct redis_w {
    struct redis_w *next;
    const struct esmd_dest_env *env;
    const struct esmd_conn_cfg *conn; /* borrowed from the configuration */
    const char *name;                 /* conn->name */
    struct esmd_redis_url url;
    char url_err[300]; /* non-empty: the URL cannot be used */
    redisAsyncContext *ac;
    enum redis_state state;
    int setup_waiting;
    int outstanding;               /* XADDs sent, replies not seen */
    struct esmd_delivery *waiting; /* deliveries held until the setup is done (LIFO, wnext) */
    double last_activity;          /* ev_now of the last reply or first command */
    ev_timer watchdog;
};

struct redis_state_all {
    const struct esmd_dest_env *env;
    struct redis_w *rws;
};

static void rw_fail_waiting(struct redis_w *rw, const char *why)
{
    while (rw->waiting) {
        struct esmd_delivery *dl = rw->waiting;
        rw->waiting = dl->wnext;
        dl->wnext = NULL;
        esmd_outbox_done(dl, ESMD_DEST_FAIL, why);
    }
}

static void rw_on_connect(const redisAsyncContext *ac, int status)
{
    struct redis_w *rw = ac->data;
    if (!rw || status == REDIS_OK || rw->ac != ac)
        return;
    char why[300];
    snprintf(why, sizeof(why), "redis %s:%d: cannot connect: %s", rw->url.host, rw->url.port,
             ac->errstr[0] ? ac->errstr : "error");
    rw->ac = NULL; /* hiredis frees it after this callback */
    rw->state = RW_IDLE;
    rw_fail_waiting(rw, why);
}

static void rw_on_disconnect(const redisAsyncContext *ac, int status)
{
    struct redis_w *rw = ac->data;
    if (!rw || rw->ac != ac)
        return;
    char why[300];
    snprintf(why, sizeof(why), "redis %s:%d: connection lost: %s", rw->url.host, rw->url.port,
             status == REDIS_OK ? "closed" : (ac->errstr[0] ? ac->errstr : "error"));
    rw->ac = NULL;
    rw->state = RW_IDLE;
    rw_fail_waiting(rw, why);
}

static void rw_send_xadd(struct redis_w *rw, struct esmd_delivery *dl);

static void rw_on_setup(redisAsyncContext *ac, void *reply, void *privdata)
{
    struct redis_w *rw = ac->data;
    const redisReply *r = reply;
    const char *what = privdata;
    if (!rw || rw->ac != ac || !r)
        return; /* the context is going away: rw_on_disconnect handles the rest */
    rw->last_activity = ev_now(rw->env->loop);
    if (r->type == REDIS_REPLY_ERROR) {
        char why[400];
        snprintf(why, sizeof(why), "redis %s:%d: %s: %.*s", rw->url.host, rw->url.port, what,
                 (int)r->len, r->str);
        rw_fail_waiting(rw, why);
        redisAsyncDisconnect(ac); /* a later write connects again */
        return;
    }
    if (--rw->setup_waiting > 0)
        return;
    rw->state = RW_UP;
    /* the waiting list is LIFO: send in claim order */
    struct esmd_delivery *rev = NULL;
    while (rw->waiting) {
        struct esmd_delivery *dl = rw->waiting;
        rw->waiting = dl->wnext;
        dl->wnext = rev;
        rev = dl;
    }
    while (rev) {
        struct esmd_delivery *dl = rev;
        rev = dl->wnext;
        dl->wnext = NULL;
        rw_send_xadd(rw, dl);
    }
}

static void rw_on_xadd(redisAsyncContext *ac, void *reply, void *privdata)
{
    struct redis_w *rw = ac->data;
    struct esmd_delivery *dl = privdata;
    const redisReply *r = reply;
    if (rw && rw->outstanding > 0)
        rw->outstanding--;
    if (rw)
        rw->last_activity = ev_now(rw->env->loop);
    if (!r) {
        char why[300];
        snprintf(why, sizeof(why), "redis %s:%d: connection lost before the reply",
                 rw ? rw->url.host : "?", rw ? rw->url.port : 0);
        esmd_outbox_done(dl, ESMD_DEST_FAIL, why);
        return;
    }
    if (r->type == REDIS_REPLY_ERROR) {
        char why[400];
        snprintf(why, sizeof(why), "redis XADD: %.*s", (int)r->len, r->str);
        esmd_outbox_done(dl, ESMD_DEST_FAIL, why);
        return;
    }
    esmd_outbox_done(dl, ESMD_DEST_OK, NULL);
}

static void rw_send_xadd(struct redis_w *rw, struct esmd_delivery *dl)
{
    const char *argv[] = {"XADD", dl->dest->target, "*", DESTS_REDIS_FIELD, dl->payload};
    size_t lens[] = {4, strlen(dl->dest->target), 1, strlen(DESTS_REDIS_FIELD), dl->len};
    if (!rw->ac || redisAsyncCommandArgv(rw->ac, rw_on_xadd, dl, 5, argv, lens) != REDIS_OK) {
        esmd_outbox_done(dl, ESMD_DEST_FAIL, "redis: cannot send XADD (connection closing)");
        return;
    }
    if (rw->outstanding++ == 0)
        rw->last_activity = ev_now(rw->env->loop);
}

static const struct esmd_redis_link_cbs rw_cbs = {
    .on_connect = rw_on_connect,
    .on_disconnect = rw_on_disconnect,
    .on_setup = rw_on_setup,
};

static bool rw_connect(struct redis_w *rw, char *err, size_t errlen)
{
    char name[300];
    snprintf(name, sizeof(name), "esmd-%s-destinations", rw->env->instance_id);
    int nsetup;
    redisAsyncContext *ac =
        esmd_redis_link_open(rw->env->loop, &rw->url, name, &rw_cbs, rw, &nsetup, err, errlen);
    if (!ac)
        return false;
    rw->ac = ac;
    rw->state = RW_SETUP;
    rw->setup_waiting = nsetup;
    rw->last_activity = ev_now(rw->env->loop);
    ev_timer_again(rw->env->loop, &rw->watchdog);
    return true;
}

static void rw_write(struct esmd_delivery *dl)
{
    struct redis_w *rw = dl->dest->conn;
    char err[400];
    if (rw->url_err[0]) {
        esmd_outbox_done(dl, ESMD_DEST_FAIL, rw->url_err);
        return;
    }
    if (!rw->ac && !rw_connect(rw, err, sizeof(err))) {
        esmd_outbox_done(dl, ESMD_DEST_FAIL, err);
        return;
    }
    if (rw->state != RW_UP) {
        dl->wnext = rw->waiting;
        rw->waiting = dl;
        return;
    }
    rw_send_xadd(rw, dl);
}

/* A reply (or the setup) overdue by the write time limit: the connection is dropped; every
 * write on it fails and the next one connects again. */
static void rw_watchdog_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct redis_w *rw = w->data;
    ESMD_UNUSED(revents);
    if (!rw->ac) {
        ev_timer_stop(loop, w);
        return;
    }
    bool busy = rw->outstanding > 0 || rw->state != RW_UP;
    if (busy && ev_now(loop) - rw->last_activity > ESMD_DEST_WRITE_TIMEOUT_MS / 1000.0) {
        ESMD_WARN(NULL, "redis %s:%d (connection %s): no reply in %d s; reconnecting", rw->url.host,
                  rw->url.port, rw->name, ESMD_DEST_WRITE_TIMEOUT_MS / 1000);
        redisAsyncContext *ac = rw->ac;
        rw->ac = NULL; /* its callbacks see it is not the writer's connection any more */
        rw->state = RW_IDLE;
        rw->outstanding = 0;
        rw_fail_waiting(rw, "redis: no reply within the write time limit");
        /* pending XADD callbacks get NULL replies: their deliveries fail */
        redisAsyncFree(ac);
    }
}

/* ---- the writer ---- */

static int redis_parse(const struct esmd_dests_names *names, const char *uri,
                       struct esmd_dest_uri *out, char *err, size_t errlen)
{
    const char *stream = esmd_dest_parse_conn(names, uri, ESMD_CONN_REDIS, out, err, errlen);
    if (!stream)
        return ESMD_EINVAL;
    out->target = esmd_xstrdup(stream);
    return 0;
}

static void *redis_open(const struct esmd_dest_env *env)
{
    struct redis_state_all *st = esmd_xcalloc(1, sizeof(*st));
    st->env = env;
    return st;
}

static void *redis_bind(void *state, const struct esmd_dest_uri *u)
{
    struct redis_state_all *st = state;
    for (struct redis_w *rw = st->rws; rw; rw = rw->next)
        if (rw->conn == u->conn)
            return rw;
    struct redis_w *rw = esmd_xcalloc(1, sizeof(*rw));
    rw->env = st->env;
    rw->conn = u->conn;
    rw->name = u->conn->name;
    char uerr[200];
    if (esmd_redis_url_parse(u->conn->url ? u->conn->url : "", &rw->url, uerr, sizeof(uerr)) !=
        ESMD_OK)
        snprintf(rw->url_err, sizeof(rw->url_err), "connection %s: %s", rw->name, uerr);
    ev_init(&rw->watchdog, rw_watchdog_cb);
    rw->watchdog.repeat = 1.0;
    rw->watchdog.data = rw;
    rw->next = st->rws;
    st->rws = rw;
    return rw;
}

static void redis_write(struct esmd_delivery *const *dls, size_t n)
{
    for (size_t i = 0; i < n; i++)
        rw_write(dls[i]);
}

/* Idle connections close; rw_on_disconnect forgets them. */
static void redis_idle(void *state)
{
    struct redis_state_all *st = state;
    for (struct redis_w *rw = st->rws; rw; rw = rw->next)
        if (rw->ac && rw->outstanding == 0 && !rw->waiting)
            redisAsyncDisconnect(rw->ac);
}

static void redis_close(void *state)
{
    struct redis_state_all *st = state;
    for (struct redis_w *rw = st->rws; rw; rw = rw->next) {
        ev_timer_stop(st->env->loop, &rw->watchdog);
        rw_fail_waiting(rw, "closed");
        if (rw->ac) {
            redisAsyncContext *ac = rw->ac;
            rw->ac = NULL;
            redisAsyncFree(ac); /* XADD callbacks get NULL replies */
        }
    }
}

static void redis_free(void *state)
{
    struct redis_state_all *st = state;
    while (st->rws) {
        struct redis_w *rw = st->rws;
        st->rws = rw->next;
        esmd_redis_url_free(&rw->url);
        free(rw);
    }
    free(st);
}

const struct esmd_dest_writer esmd_dest_redis = {
    .schemes = {"redis://"},
    .form = "redis://CONNECTION/STREAM",
    .cap = 256,
    .parse = redis_parse,
    .open = redis_open,
    .bind = redis_bind,
    .write = redis_write,
    .idle = redis_idle,
    .close = redis_close,
    .free = redis_free,
};
