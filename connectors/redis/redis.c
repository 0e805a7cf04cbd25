/* The Redis stream source: one stream read within a consumer group (XREADGROUP), driven by
 * hiredis's async API on the loop (libev adapter).
 *
 * Two connections per mapping: the read link carries XREADGROUP (BLOCK on new entries) and the
 * XPENDING look-ups of its history reads; the command link carries XGROUP CREATE, XACK, the
 * heartbeat XCLAIMs, XAUTOCLAIM and XINFO. Both are opened together (a "session"); when either
 * fails, both are dropped and the session is opened again after a backoff, with /readyz false
 * meanwhile. Nothing is lost across a reconnect: entries read but not acknowledged stay in the
 * group's pending entries list (PEL) and XACKs not confirmed are sent again.
 *
 * Delivery order and acks: the stream is one shard. Every entry handed to the core gets the next
 * `seq` (a counter that starts from the wall clock in microseconds, so seqs, and the idempotency
 * keys built from them, are not reused by a later process) and its ID goes to the back of a
 * ring. ack(next_seq) means every entry below next_seq is finished: their IDs leave the ring
 * from the front in XACK commands (one in flight, coalesced).
 *
 * Where entries come from:
 *   1. history: at every session start the consumer first reads its own PEL
 *      (XREADGROUP ... STREAMS s <id>) from 0 (first session) or from the highest ID it has
 *      handed over (later sessions: entries whose read reply was lost with the connection);
 *   2. new entries: XREADGROUP ... BLOCK ... STREAMS s >;
 *   3. reclaims: every visibility_timeout / 4, XAUTOCLAIM takes entries that have been pending
 *      for at least visibility_timeout on any consumer of the group (a crashed instance).
 * Entries the consumer still holds are never handed over twice (a set of the ring's IDs), and it
 * keeps them from being reclaimed by the others: each reclaim tick first resets their idle time
 * (XCLAIM ... JUSTID to itself, for those idle for over half the visibility timeout).
 *
 * Delivery counts: entries read with `>` are on their first delivery (1). For history reads and
 * reclaims, which increment the group's counter, the count is read back with XPENDING over the
 * range of the reply before the entries are handed over.
 *
 * See docs/redis.md for the event shape and the behaviour users see. */
#include "redis_private.h"

#include "esmd/backoff.h"
#include "esmd/connector.h"
#include "esmd/log.h"

#include <ev.h>
#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* XREADGROUP BLOCK: how long a read waits for new entries before it is sent again. */
#define REDIS_BLOCK_MS 1000
/* Entries per XREADGROUP (fewer, larger reads cost Redis and esmd less per entry). */
#define REDIS_READ_COUNT "500"
/* XACKs are coalesced: at most one in flight, and at most one per interval. */
#define REDIS_ACK_INTERVAL_S 0.005
/* Entries per XAUTOCLAIM, IDs per XACK and per heartbeat XCLAIM. */
#define REDIS_CLAIM_COUNT 100
#define REDIS_ACK_MAX 4096
#define REDIS_HEARTBEAT_MAX 1000
/* A session that is not up after this long is dropped and tried again. */
#define REDIS_CONNECT_TIMEOUT_S 5.0
/* A link waiting this long past its expected answer is considered dead. */
#define REDIS_REPLY_TIMEOUT_S ((double)REDIS_BLOCK_MS / 1000.0 + 10.0)
/* Longest graceful stop (final XACKs) before the links are dropped. */
#define REDIS_STOP_TIMEOUT_S 10.0
/* XINFO GROUPS for the lag metric. */
#define REDIS_STATS_INTERVAL_S 5.0
#define REDIS_WATCHDOG_S 1.0
/* Reconnects back off from 200 ms up to 5 s. */
static const struct esmd_backoff reconnect_backoff = {200, 5000};

enum redis_state {
    REDIS_CREATED,  /* create() done, no I/O yet */
    REDIS_RUNNING,  /* start() done */
    REDIS_STOPPING, /* stop(): final XACKs, then disconnect */
    REDIS_CLOSED,   /* stopped (or never started); done scheduled */
};

enum { LINK_READ, LINK_CMD, NLINKS };

struct redis_link {
    redisAsyncContext *ac; /* NULL when closed; hiredis frees it after its disconnect callback */
    unsigned waiting;      /* replies expected */
    double busy_since;     /* when it last sent into an idle link or got a reply */
};

enum read_phase { READ_HISTORY, READ_NEW };

/* What we emit: the core's record and its JSON, written once when the entry is handed over
 * (off the path from one batch to the next), without the fields (`e.fields` NULL): they live in
 * the reply or the copy the entry came from, and the core asks for its filter document only
 * while the entry is handed over (emit, through esmd_redis.emitting). */
struct redis_rec {
    struct esmd_record rec; /* first: the core's pointer is ours */
    struct esmd_redis_entry e;
    size_t pkey_len; /* the partition key (esmd_redis_partition_key), after the JSON */
    bool has_pkey;
    char json[]; /* rec.size bytes, then pkey_len bytes */
};

/* An entry read from a PEL (history read or reclaim) waiting for its delivery count: the
 * entry with a copy of its fields, then their bytes. */
struct pel_entry {
    struct esmd_redis_entry e;
    struct esmd_redis_field fields[];
};

struct stage {
    struct pel_entry **items;
    size_t n, cap;
};

enum { STAGE_READ, STAGE_CLAIM, NSTAGES };

/* argv for redisAsyncCommandArgv (hiredis copies it while formatting the command). */
struct cmd {
    const char **argv;
    size_t *lens;
    size_t n, cap;
    char *ids; /* ESMD_REDIS_ID_MAX bytes per ID slot */
    size_t nids, capids;
};

struct esmd_redis {
    const struct esmd_host *host; /* borrowed until destroy */
    /* The record being handed to host->emit and the entry it came from (with its fields). */
    const struct esmd_record *emitting;
    const struct esmd_redis_entry *emitting_entry;
    const struct esmd_log_ctx *log;
    struct esmd_redis_url url;
    char *stream, *group, *consumer; /* owned */
    bool start_latest;
    int64_t vt_ms;
    struct esmd_redis_source src;
    char *shard_key; /* owned: "<stream>@<consumer>", printable */
    char *client_name[NLINKS];
    struct esmd_shard *shard;

    struct redis_link link[NLINKS];
    bool failing;       /* the session is being dropped: replies are ignored */
    bool disconnecting; /* stopping: redisAsyncDisconnect() called on the links */
    bool up;            /* both links set up and the group exists */
    int setup_waiting;  /* setup replies not yet received */
    double session_started;
    int attempt;              /* reconnects since the last good session */
    long long read_client_id; /* CLIENT ID of the read link, -1 unknown */
    char last_error[256];

    enum read_phase phase;
    struct esmd_redis_id hist_cursor;
    struct esmd_redis_id read_max; /* highest ID handed over */
    bool have_read_max;
    bool read_inflight;
    bool paused;
    struct stage stage[NSTAGES];

    /* IDs handed over and not yet acknowledged to Redis, in seq order: ring[front] has seq
     * front_seq, and seqs are consecutive. */
    struct esmd_redis_id *ring;
    size_t ring_cap, ring_front, ring_len;
    int64_t front_seq, next_seq;
    int64_t ack_upto; /* every seq below is finished */
    size_t xack_sent; /* ring entries (from the front) in the XACK in flight */
    bool xack_inflight;
    struct esmd_redis_idset held;

    bool reclaim_inflight;
    struct esmd_redis_id claim_cursor;
    bool stats_inflight;

    int64_t lag;
    int64_t committed_total;
    bool ready;

    enum redis_state state;
    void (*done)(void *ud);
    void *done_ud;

    struct cmd cmd;
    struct esmd_buf json;                 /* scratch: the record being handed over */
    struct esmd_redis_entry view;         /* scratch: an entry of the reply being read */
    struct esmd_redis_field *view_fields; /* owned */
    size_t view_cap;
    ev_timer reconnect_tm, teardown_tm, reclaim_tm, stats_tm, watchdog_tm, stop_tm, done_tm, ack_tm;
    bool watchers_init;
};

/* ---- small helpers ---- */

static void cmd_reset(struct cmd *c)
{
    c->n = 0;
    c->nids = 0;
}

static void cmd_add(struct cmd *c, const char *s, size_t n)
{
    if (c->n == c->cap) {
        c->cap = c->cap ? c->cap * 2 : 16;
        c->argv = esmd_xrealloc(c->argv, c->cap * sizeof(*c->argv));
        c->lens = esmd_xrealloc(c->lens, c->cap * sizeof(*c->lens));
    }
    c->argv[c->n] = s;
    c->lens[c->n] = n;
    c->n++;
}

static void cmd_adds(struct cmd *c, const char *s)
{
    cmd_add(c, s, strlen(s));
}

/* Makes room for k ID arguments; must come before any cmd_add_id() of this command. */
static void cmd_reserve_ids(struct cmd *c, size_t k)
{
    if (k > c->capids) {
        c->capids = k;
        c->ids = esmd_xrealloc(c->ids, k * ESMD_REDIS_ID_MAX);
    }
}

static void cmd_add_id(struct cmd *c, struct esmd_redis_id id)
{
    char *slot = c->ids + c->nids++ * ESMD_REDIS_ID_MAX;
    cmd_add(c, slot, esmd_redis_id_format(id, slot));
}

static void cmd_free(struct cmd *c)
{
    free(c->argv);
    free(c->lens);
    free(c->ids);
}

static struct esmd_redis_id ring_at(const struct esmd_redis *rc, size_t i)
{
    return rc->ring[(rc->ring_front + i) % rc->ring_cap];
}

static void ring_push(struct esmd_redis *rc, struct esmd_redis_id id)
{
    if (rc->ring_len == rc->ring_cap) {
        size_t cap = rc->ring_cap ? rc->ring_cap * 2 : 1024;
        struct esmd_redis_id *r = esmd_xmalloc(cap * sizeof(*r));
        for (size_t i = 0; i < rc->ring_len; i++)
            r[i] = ring_at(rc, i);
        free(rc->ring);
        rc->ring = r;
        rc->ring_cap = cap;
        rc->ring_front = 0;
    }
    rc->ring[(rc->ring_front + rc->ring_len) % rc->ring_cap] = id;
    rc->ring_len++;
    esmd_redis_idset_insert(&rc->held, id);
}

static void ring_pop(struct esmd_redis *rc, size_t k)
{
    for (size_t i = 0; i < k && rc->ring_len > 0; i++) {
        esmd_redis_idset_remove(&rc->held, rc->ring[rc->ring_front]);
        rc->ring_front = (rc->ring_front + 1) % rc->ring_cap;
        rc->ring_len--;
        rc->front_seq++;
    }
}

/* Ring entries the core has finished (seq < ack_upto). */
static size_t ring_acked(const struct esmd_redis *rc)
{
    if (rc->ack_upto <= rc->front_seq)
        return 0;
    int64_t k = rc->ack_upto - rc->front_seq;
    return (size_t)k < rc->ring_len ? (size_t)k : rc->ring_len;
}

static void stage_clear(struct stage *st)
{
    for (size_t i = 0; i < st->n; i++)
        free(st->items[i]);
    st->n = 0;
}

static void stage_push(struct stage *st, struct pel_entry *pe)
{
    if (st->n == st->cap) {
        st->cap = st->cap ? st->cap * 2 : 64;
        st->items = esmd_xrealloc(st->items, st->cap * sizeof(*st->items));
    }
    st->items[st->n++] = pe;
}

static const struct esmd_redis_entry *entry_of(const struct esmd_record *rec)
{
    return &((const struct redis_rec *)rec)->e;
}

static bool reply_is(const redisReply *r, int type)
{
    return r && r->type == type;
}

/* An error reply that starts with `code` (e.g. "NOGROUP"). */
static bool error_is(const redisReply *r, const char *code)
{
    size_t n = strlen(code);
    return reply_is(r, REDIS_REPLY_ERROR) && r->len >= n && memcmp(r->str, code, n) == 0 &&
           (r->len == n || r->str[n] == ' ');
}

static bool parse_id(const redisReply *r, struct esmd_redis_id *id)
{
    return (reply_is(r, REDIS_REPLY_STRING) || reply_is(r, REDIS_REPLY_STATUS)) &&
           esmd_redis_id_parse(r->str, r->len, id) == ESMD_OK;
}

/* ---- readiness ---- */

static void set_ready(struct esmd_redis *rc, bool ready, const char *why)
{
    if (rc->state == REDIS_CLOSED || !rc->host)
        return;
    if (rc->ready == ready && ready)
        return;
    rc->ready = ready;
    rc->host->set_ready(rc->host->core, ready, why);
}

/* ---- sessions ---- */

static void session_fail(struct esmd_redis *rc, const char *fmt, ...) ESMD_PRINTF(2, 3);
static void read_next(struct esmd_redis *rc);
static void ack_kick(struct esmd_redis *rc);
static void ack_schedule(struct esmd_redis *rc);
static void stop_check(struct esmd_redis *rc);
static void reclaim_start(struct esmd_redis *rc);

/* The connector when ac is a link of the live session, else NULL (a reply to a session that is
 * being dropped, or a NULL reply while hiredis frees the context). Counts the reply. */
static struct esmd_redis *live(redisAsyncContext *ac, void *reply)
{
    struct esmd_redis *rc = ac->data;
    if (!rc || rc->failing || !reply)
        return NULL;
    for (int i = 0; i < NLINKS; i++) {
        struct redis_link *l = &rc->link[i];
        if (l->ac == ac) {
            if (l->waiting > 0)
                l->waiting--;
            l->busy_since = ev_now(rc->host->loop);
            return rc;
        }
    }
    return NULL;
}

/* Sends the command in rc->cmd on a link; false (and the session dropped) when hiredis refuses
 * it (the context is going away). */
static bool send_cmd(struct esmd_redis *rc, int which, redisCallbackFn *fn, void *privdata)
{
    struct redis_link *l = &rc->link[which];
    if (!l->ac || rc->failing || rc->disconnecting)
        return false;
    if (redisAsyncCommandArgv(l->ac, fn, privdata, (int)rc->cmd.n, rc->cmd.argv, rc->cmd.lens) !=
        REDIS_OK) {
        session_fail(rc, "redis: cannot send %.*s: %s", (int)rc->cmd.lens[0], rc->cmd.argv[0],
                     l->ac->errstr ? l->ac->errstr : "connection closing");
        return false;
    }
    if (l->waiting++ == 0)
        l->busy_since = ev_now(rc->host->loop);
    return true;
}

static void on_teardown(struct ev_loop *loop, ev_timer *w, int revents);

/* Drops the session: replies still coming are ignored, the links are freed on the next loop
 * turn (never inside a hiredis callback), then a new session starts after a backoff. */
static void session_fail(struct esmd_redis *rc, const char *fmt, ...)
{
    if (rc->failing || rc->state == REDIS_CLOSED)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(rc->last_error, sizeof(rc->last_error), fmt, ap);
    va_end(ap);
    rc->failing = true;
    bool was_up = rc->up;
    rc->up = false;
    rc->read_inflight = false;
    rc->xack_inflight = false;
    rc->xack_sent = 0;
    rc->reclaim_inflight = false;
    rc->stats_inflight = false;
    for (int i = 0; i < NSTAGES; i++)
        stage_clear(&rc->stage[i]); /* still pending in Redis: read again */
    ev_timer_stop(rc->host->loop, &rc->reclaim_tm);
    ev_timer_stop(rc->host->loop, &rc->ack_tm);
    if (rc->state == REDIS_RUNNING) {
        if (was_up)
            ESMD_WARN(rc->log, "%s; reconnecting", rc->last_error);
        else
            esmd_log_limited(ESMD_LOG_WARN, rc->log, "redis-connect", "%s; retrying",
                             rc->last_error);
        set_ready(rc, false, rc->last_error);
    }
    ev_timer_start(rc->host->loop, &rc->teardown_tm);
}

static void links_free(struct esmd_redis *rc)
{
    for (int i = 0; i < NLINKS; i++) {
        redisAsyncContext *ac = rc->link[i].ac;
        rc->link[i].ac = NULL;
        rc->link[i].waiting = 0;
        if (ac)
            redisAsyncFree(ac); /* pending callbacks get NULL replies and are ignored */
    }
}

static void session_start(struct esmd_redis *rc);

static void on_teardown(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct esmd_redis *rc = w->data;
    ev_timer_stop(loop, w);
    links_free(rc);
    if (rc->state == REDIS_STOPPING) {
        stop_check(rc);
        return;
    }
    if (rc->state != REDIS_RUNNING)
        return;
    int64_t delay = esmd_backoff_delay(&reconnect_backoff, rc->attempt, esmd_random64());
    if (rc->attempt < 30)
        rc->attempt++;
    ev_timer_set(&rc->reconnect_tm, (double)delay / 1000.0, 0.0);
    ev_timer_start(loop, &rc->reconnect_tm);
}

static void on_reconnect(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct esmd_redis *rc = w->data;
    ev_timer_stop(loop, w);
    if (rc->state == REDIS_RUNNING)
        session_start(rc);
}

static struct redis_link *link_of(const redisAsyncContext *ac)
{
    struct esmd_redis *rc = ac->data;
    if (!rc)
        return NULL;
    for (int i = 0; i < NLINKS; i++)
        if (rc->link[i].ac == ac)
            return &rc->link[i];
    return NULL;
}

static void on_connect(const redisAsyncContext *ac, int status)
{
    struct redis_link *l = link_of(ac);
    if (!l || status == REDIS_OK)
        return;
    struct esmd_redis *rc = ac->data;
    l->ac = NULL; /* hiredis frees it after this callback */
    session_fail(rc, "redis %s:%d: cannot connect: %s", rc->url.host, rc->url.port,
                 ac->errstr ? ac->errstr : "error");
}

static void on_disconnect(const redisAsyncContext *ac, int status)
{
    struct redis_link *l = link_of(ac);
    if (!l)
        return;
    struct esmd_redis *rc = ac->data;
    l->ac = NULL; /* hiredis frees it after this callback */
    if (rc->state == REDIS_STOPPING && rc->disconnecting && !rc->failing) {
        stop_check(rc);
        return;
    }
    session_fail(rc, "redis %s:%d: connection lost: %s", rc->url.host, rc->url.port,
                 status == REDIS_OK ? "closed" : (ac->errstr ? ac->errstr : "error"));
}

static void session_up(struct esmd_redis *rc)
{
    rc->up = true;
    rc->attempt = 0;
    ESMD_INFO(rc->log, "redis %s:%d connected: stream %s, group %s, consumer %s", rc->url.host,
              rc->url.port, rc->stream, rc->group, rc->consumer);
    set_ready(rc, true, NULL);
    rc->phase = READ_HISTORY;
    rc->hist_cursor = rc->have_read_max ? rc->read_max : (struct esmd_redis_id){0, 0};
    read_next(rc);
    ack_kick(rc);
    /* the first reclaim tick soon: heartbeats for what we hold, entries of crashed consumers */
    double every = rc->reclaim_tm.repeat;
    ev_timer_set(&rc->reclaim_tm, every < 0.05 ? every : 0.05, every);
    ev_timer_start(rc->host->loop, &rc->reclaim_tm);
}

static void on_setup(redisAsyncContext *ac, void *reply, void *privdata)
{
    struct esmd_redis *rc = live(ac, reply);
    if (!rc)
        return;
    const redisReply *r = reply;
    const char *what = privdata;
    if (reply_is(r, REDIS_REPLY_ERROR)) {
        if (strcmp(what, "XGROUP CREATE") != 0 || !error_is(r, "BUSYGROUP")) {
            session_fail(rc, "redis %s:%d: %s: %.*s", rc->url.host, rc->url.port, what, (int)r->len,
                         r->str);
            return;
        }
    } else if (strcmp(what, "CLIENT ID") == 0 && reply_is(r, REDIS_REPLY_INTEGER)) {
        rc->read_client_id = r->integer;
    } else if (strcmp(what, "XGROUP CREATE") == 0) {
        ESMD_INFO(rc->log, "redis group %s created on stream %s (from %s)", rc->group, rc->stream,
                  rc->start_latest ? "the end: latest" : "the beginning: trim_horizon");
    }
    if (--rc->setup_waiting == 0 && rc->state == REDIS_RUNNING)
        session_up(rc);
}

static const struct esmd_redis_link_cbs link_cbs = {
    .on_connect = on_connect,
    .on_disconnect = on_disconnect,
    .on_setup = on_setup,
};

static void session_start(struct esmd_redis *rc)
{
    rc->failing = false;
    rc->disconnecting = false;
    rc->up = false;
    rc->setup_waiting = 0;
    rc->read_client_id = -1;
    rc->session_started = ev_now(rc->host->loop);
    /* AUTH, SELECT and CLIENT SETNAME are queued now and written once connected */
    for (int i = 0; i < NLINKS; i++) {
        char why[300];
        int nsetup;
        redisAsyncContext *ac = esmd_redis_link_open(rc->host->loop, &rc->url, rc->client_name[i],
                                                     &link_cbs, rc, &nsetup, why, sizeof(why));
        if (!ac) {
            session_fail(rc, "%s", why);
            return;
        }
        rc->link[i].ac = ac;
        rc->link[i].waiting = (unsigned)nsetup;
        rc->link[i].busy_since = ev_now(rc->host->loop);
        rc->setup_waiting += nsetup;
    }
    struct cmd *c = &rc->cmd;
    cmd_reset(c);
    cmd_adds(c, "CLIENT");
    cmd_adds(c, "ID");
    if (!send_cmd(rc, LINK_READ, on_setup, "CLIENT ID"))
        return;
    rc->setup_waiting++;
    cmd_reset(c);
    cmd_adds(c, "XGROUP");
    cmd_adds(c, "CREATE");
    cmd_adds(c, rc->stream);
    cmd_adds(c, rc->group);
    cmd_adds(c, rc->start_latest ? "$" : "0");
    cmd_adds(c, "MKSTREAM");
    if (!send_cmd(rc, LINK_CMD, on_setup, "XGROUP CREATE"))
        return;
    rc->setup_waiting++;
}

/* ---- records ---- */

/* Checks one entry of a reply ([id, [name, value, ...]]) and returns its field list, or NULL:
 * with *deleted set when the entry's data is gone (a PEL entry trimmed or deleted from the
 * stream), else when the reply is not what Redis sends. */
static const redisReply *entry_fields(const redisReply *entry, struct esmd_redis_id *id,
                                      bool *deleted)
{
    *deleted = false;
    if (!reply_is(entry, REDIS_REPLY_ARRAY) || entry->elements != 2 ||
        !parse_id(entry->element[0], id))
        return NULL;
    const redisReply *f = entry->element[1];
    if (reply_is(f, REDIS_REPLY_NIL)) {
        *deleted = true;
        return NULL;
    }
    if (!reply_is(f, REDIS_REPLY_ARRAY) || f->elements % 2 != 0)
        return NULL;
    for (size_t i = 0; i < f->elements; i++)
        if (!reply_is(f->element[i], REDIS_REPLY_STRING))
            return NULL;
    return f;
}

/* The entry as a view into the reply (rc's scratch field array); valid during the callback. */
static const struct esmd_redis_entry *entry_view(struct esmd_redis *rc, struct esmd_redis_id id,
                                                 const redisReply *f)
{
    size_t nfields = f->elements / 2;
    if (nfields > rc->view_cap) {
        rc->view_cap = nfields;
        rc->view_fields = esmd_xrealloc(rc->view_fields, nfields * sizeof(*rc->view_fields));
    }
    for (size_t i = 0; i < nfields; i++) {
        const redisReply *name = f->element[2 * i], *value = f->element[2 * i + 1];
        rc->view_fields[i] =
            (struct esmd_redis_field){name->str, name->len, value->str, value->len, false};
    }
    esmd_redis_fields_classify(rc->view_fields, nfields);
    rc->view = (struct esmd_redis_entry){id, 1, rc->view_fields, nfields};
    return &rc->view;
}

/* The entry with a copy of its fields, for handing over after the reply is gone. */
static struct pel_entry *entry_copy(struct esmd_redis_id id, const redisReply *f)
{
    size_t nfields = f->elements / 2, bytes = 0;
    for (size_t i = 0; i < f->elements; i++)
        bytes += f->element[i]->len;
    size_t head = sizeof(struct pel_entry) + nfields * sizeof(struct esmd_redis_field);
    struct pel_entry *pe = esmd_xmalloc(head + bytes + 1);
    char *p = (char *)pe + head;
    for (size_t i = 0; i < nfields; i++) {
        struct esmd_redis_field *fd = &pe->fields[i];
        const redisReply *name = f->element[2 * i], *value = f->element[2 * i + 1];
        memcpy(p, name->str, name->len);
        fd->name = p;
        fd->name_len = name->len;
        p += name->len;
        memcpy(p, value->str, value->len);
        fd->value = p;
        fd->value_len = value->len;
        p += value->len;
    }
    esmd_redis_fields_classify(pe->fields, nfields);
    pe->e = (struct esmd_redis_entry){id, 1, pe->fields, nfields};
    return pe;
}

/* Hands an entry to the core as a record (e is borrowed for the call); nothing when we hold
 * its ID already. */
static void emit(struct esmd_redis *rc, const struct esmd_redis_entry *e)
{
    if (esmd_redis_idset_has(&rc->held, e->id))
        return;
    struct esmd_buf *json = &rc->json;
    esmd_buf_reset(json);
    esmd_redis_record_write(json, &rc->src, e);
    const struct esmd_redis_field *pk = esmd_redis_partition_key(&rc->src, e);
    size_t pkey_len = pk ? pk->value_len : 0;
    struct redis_rec *rr = esmd_xmalloc(sizeof(*rr) + json->len + pkey_len);
    memset(&rr->rec, 0, sizeof(rr->rec));
    memcpy(rr->json, json->data, json->len);
    rr->has_pkey = pk != NULL;
    rr->pkey_len = pkey_len;
    if (pk)
        memcpy(rr->json + json->len, pk->value, pkey_len);
    rr->rec.size = json->len;
    rr->rec.seq = rc->next_seq++;
    rr->rec.timestamp_ms = e->id.ms > (uint64_t)INT64_MAX ? INT64_MAX : (int64_t)e->id.ms;
    rr->e = *e;
    rr->e.fields = NULL; /* they belong to the caller: rc->emitting shows them to filter_doc */
    rr->e.nfields = 0;
    ring_push(rc, e->id);
    if (!rc->have_read_max || esmd_redis_id_cmp(e->id, rc->read_max) > 0) {
        rc->read_max = e->id;
        rc->have_read_max = true;
    }
    /* The core may release rr before emit returns (a mapping that is stopping): rr is not
     * touched after this call. */
    rc->emitting = &rr->rec;
    rc->emitting_entry = e;
    rc->host->emit(rc->host->core, rc->shard, &rr->rec);
    rc->emitting = NULL;
    rc->emitting_entry = NULL;
}

static void on_other(redisAsyncContext *ac, void *reply, void *privdata);

/* XACK for entries whose data is gone from the stream: nothing to deliver. */
static void ack_deleted(struct esmd_redis *rc, const struct esmd_redis_id *ids, size_t n)
{
    if (n == 0)
        return;
    ESMD_WARN(rc->log,
              "redis stream %s: %zu pending entries were deleted or trimmed from the stream "
              "before delivery: acknowledged without invoking",
              rc->stream, n);
    struct cmd *c = &rc->cmd;
    cmd_reset(c);
    cmd_reserve_ids(c, n);
    cmd_adds(c, "XACK");
    cmd_adds(c, rc->stream);
    cmd_adds(c, rc->group);
    for (size_t i = 0; i < n; i++)
        cmd_add_id(c, ids[i]);
    send_cmd(rc, LINK_CMD, on_other, "XACK");
}

/* ---- delivery counts of PEL entries ---- */

static void stage_done(struct esmd_redis *rc, int which);

/* XPENDING <stream> <group> <first> <last> <count> <consumer>: [[id, consumer, idle, count]...] */
static void on_pending(redisAsyncContext *ac, void *reply, void *privdata)
{
    struct esmd_redis *rc = live(ac, reply);
    if (!rc)
        return;
    int which = privdata == &rc->stage[STAGE_READ] ? STAGE_READ : STAGE_CLAIM;
    struct stage *st = &rc->stage[which];
    const redisReply *r = reply;
    size_t j = 0;
    if (reply_is(r, REDIS_REPLY_ARRAY)) {
        /* both lists are in ID order: merge */
        for (size_t i = 0; i < st->n; i++) {
            struct pel_entry *rr = st->items[i];
            struct esmd_redis_id id;
            while (j < r->elements) {
                const redisReply *p = r->element[j];
                if (!reply_is(p, REDIS_REPLY_ARRAY) || p->elements < 4 ||
                    !parse_id(p->element[0], &id)) {
                    j = r->elements;
                    break;
                }
                int c = esmd_redis_id_cmp(id, rr->e.id);
                if (c > 0)
                    break;
                j++;
                if (c == 0 && reply_is(p->element[3], REDIS_REPLY_INTEGER) &&
                    p->element[3]->integer > 0) {
                    rr->e.delivery_count = p->element[3]->integer;
                    break;
                }
            }
        }
    } else {
        esmd_log_limited(ESMD_LOG_WARN, rc->log, "redis-xpending",
                         "redis XPENDING: %s; delivery counts unknown",
                         reply_is(r, REDIS_REPLY_ERROR) ? r->str : "unexpected reply");
    }
    stage_done(rc, which);
}

/* Asks for the delivery counts of the staged entries (which all come from one PEL read). */
static void stage_counts(struct esmd_redis *rc, int which, int link, size_t extra)
{
    struct stage *st = &rc->stage[which];
    /* if the counts cannot be read: on a second delivery at least */
    for (size_t i = 0; i < st->n; i++)
        st->items[i]->e.delivery_count = 2;
    struct esmd_redis_id lo = st->items[0]->e.id, hi = lo;
    for (size_t i = 1; i < st->n; i++) {
        if (esmd_redis_id_cmp(st->items[i]->e.id, lo) < 0)
            lo = st->items[i]->e.id;
        if (esmd_redis_id_cmp(st->items[i]->e.id, hi) > 0)
            hi = st->items[i]->e.id;
    }
    char count[24];
    snprintf(count, sizeof(count), "%zu", st->n + extra);
    struct cmd *c = &rc->cmd;
    cmd_reset(c);
    cmd_reserve_ids(c, 2);
    cmd_adds(c, "XPENDING");
    cmd_adds(c, rc->stream);
    cmd_adds(c, rc->group);
    cmd_add_id(c, lo);
    cmd_add_id(c, hi);
    cmd_adds(c, count);
    cmd_adds(c, rc->consumer);
    send_cmd(rc, link, on_pending, st);
}

/* The staged entries have their counts: hand them over, then go on reading / reclaiming. */
static void stage_done(struct esmd_redis *rc, int which)
{
    struct stage *st = &rc->stage[which];
    size_t n = st->n;
    st->n = 0;
    for (size_t i = 0; i < n; i++) {
        if (rc->state == REDIS_RUNNING)
            emit(rc, &st->items[i]->e);
        free(st->items[i]);
    }
    if (which == STAGE_READ)
        read_next(rc);
    else
        reclaim_start(rc);
}

/* ---- reading ---- */

static void on_read(redisAsyncContext *ac, void *reply, void *privdata)
{
    struct esmd_redis *rc = live(ac, reply);
    if (!rc)
        return;
    rc->read_inflight = false;
    const redisReply *r = reply;
    if (rc->state != REDIS_RUNNING) {
        /* stopping: whatever came stays pending in the group and is read again later */
        stop_check(rc);
        return;
    }
    if (reply_is(r, REDIS_REPLY_ERROR)) {
        if (error_is(r, "NOGROUP"))
            session_fail(rc, "redis stream %s: the group %s or the stream is gone (NOGROUP)",
                         rc->stream, rc->group);
        else
            session_fail(rc, "redis XREADGROUP on %s: %.*s", rc->stream, (int)r->len, r->str);
        return;
    }
    if (reply_is(r, REDIS_REPLY_NIL)) { /* BLOCK ran out */
        read_next(rc);
        return;
    }
    /* [[stream, [entry, ...]]] */
    const redisReply *entries = NULL;
    if (reply_is(r, REDIS_REPLY_ARRAY) && r->elements >= 1 &&
        reply_is(r->element[0], REDIS_REPLY_ARRAY) && r->element[0]->elements == 2 &&
        reply_is(r->element[0]->element[1], REDIS_REPLY_ARRAY))
        entries = r->element[0]->element[1];
    if (!entries && !reply_is(r, REDIS_REPLY_ARRAY)) {
        session_fail(rc, "redis XREADGROUP on %s: unexpected reply type %d", rc->stream, r->type);
        return;
    }
    size_t n = entries ? entries->elements : 0;
    if (rc->phase == READ_HISTORY && n == 0) {
        rc->phase = READ_NEW;
        read_next(rc);
        return;
    }
    struct esmd_redis_id *gone = NULL;
    size_t ngone = 0;
    for (size_t i = 0; i < n; i++) {
        bool deleted;
        struct esmd_redis_id id;
        const redisReply *f = entry_fields(entries->element[i], &id, &deleted);
        if (!f && !deleted) {
            free(gone);
            session_fail(rc, "redis XREADGROUP on %s: malformed entry in the reply", rc->stream);
            return;
        }
        if (rc->phase == READ_HISTORY) {
            rc->hist_cursor = id;
            if (deleted) {
                if (!gone)
                    gone = esmd_xmalloc(n * sizeof(*gone));
                gone[ngone++] = id;
            } else {
                stage_push(&rc->stage[STAGE_READ], entry_copy(id, f));
            }
        } else if (f) {
            emit(rc, entry_view(rc, id, f));
        }
    }
    ack_deleted(rc, gone, ngone);
    free(gone);
    if (rc->stage[STAGE_READ].n > 0)
        stage_counts(rc, STAGE_READ, LINK_READ, rc->ring_len);
    else
        read_next(rc);
}

static void read_next(struct esmd_redis *rc)
{
    if (!rc->up || rc->read_inflight || rc->paused || rc->state != REDIS_RUNNING ||
        rc->stage[STAGE_READ].n > 0)
        return;
    char block[16], cursor[ESMD_REDIS_ID_MAX];
    struct cmd *c = &rc->cmd;
    cmd_reset(c);
    cmd_adds(c, "XREADGROUP");
    cmd_adds(c, "GROUP");
    cmd_adds(c, rc->group);
    cmd_adds(c, rc->consumer);
    cmd_adds(c, "COUNT");
    cmd_adds(c, REDIS_READ_COUNT);
    if (rc->phase == READ_NEW) {
        snprintf(block, sizeof(block), "%d", REDIS_BLOCK_MS);
        cmd_adds(c, "BLOCK");
        cmd_adds(c, block);
    }
    cmd_adds(c, "STREAMS");
    cmd_adds(c, rc->stream);
    if (rc->phase == READ_NEW)
        cmd_adds(c, ">");
    else
        cmd_add(c, cursor, esmd_redis_id_format(rc->hist_cursor, cursor));
    if (send_cmd(rc, LINK_READ, on_read, NULL))
        rc->read_inflight = true;
}

/* ---- acknowledgements ---- */

static void on_xack(redisAsyncContext *ac, void *reply, void *privdata)
{
    struct esmd_redis *rc = live(ac, reply);
    if (!rc)
        return;
    const redisReply *r = reply;
    rc->xack_inflight = false;
    if (reply_is(r, REDIS_REPLY_ERROR) && !error_is(r, "NOGROUP")) {
        size_t n = rc->xack_sent;
        rc->xack_sent = 0;
        session_fail(rc, "redis XACK of %zu entries on %s: %.*s", n, rc->stream, (int)r->len,
                     r->str);
        return;
    }
    if (reply_is(r, REDIS_REPLY_ERROR))
        esmd_log_limited(ESMD_LOG_WARN, rc->log, "redis-xack-nogroup",
                         "redis XACK on %s: the group %s is gone (NOGROUP): nothing to acknowledge",
                         rc->stream, rc->group);
    else
        rc->committed_total += (int64_t)rc->xack_sent;
    ring_pop(rc, rc->xack_sent);
    rc->xack_sent = 0;
    if (rc->state == REDIS_STOPPING)
        ack_kick(rc);
    else
        ack_schedule(rc);
    stop_check(rc);
}

/* Sends one XACK with the finished entries at the front of the ring, unless one is in flight. */
static void ack_kick(struct esmd_redis *rc)
{
    ev_timer_stop(rc->host->loop, &rc->ack_tm);
    if (!rc->up || rc->xack_inflight)
        return;
    size_t k = ring_acked(rc);
    if (k == 0)
        return;
    if (k > REDIS_ACK_MAX)
        k = REDIS_ACK_MAX;
    struct cmd *c = &rc->cmd;
    cmd_reset(c);
    cmd_reserve_ids(c, k);
    cmd_adds(c, "XACK");
    cmd_adds(c, rc->stream);
    cmd_adds(c, rc->group);
    for (size_t i = 0; i < k; i++)
        cmd_add_id(c, ring_at(rc, i));
    if (send_cmd(rc, LINK_CMD, on_xack, NULL)) {
        rc->xack_inflight = true;
        rc->xack_sent = k;
    }
}

/* An XACK soon: later acks ride along (at most one XACK per REDIS_ACK_INTERVAL_S). */
static void ack_schedule(struct esmd_redis *rc)
{
    if (!rc->up || rc->xack_inflight || ev_is_active(&rc->ack_tm) || ring_acked(rc) == 0)
        return;
    ev_timer_set(&rc->ack_tm, REDIS_ACK_INTERVAL_S, 0.0);
    ev_timer_start(rc->host->loop, &rc->ack_tm);
}

static void on_ack_timer(struct ev_loop *loop, ev_timer *w, int revents)
{
    ack_kick(w->data);
}

/* ---- reclaiming ---- */

/* A reply only worth a log line when it is an error; privdata: the command's name. */
static void on_other(redisAsyncContext *ac, void *reply, void *privdata)
{
    struct esmd_redis *rc = live(ac, reply);
    if (rc && reply_is(reply, REDIS_REPLY_ERROR))
        esmd_log_limited(ESMD_LOG_WARN, rc->log, "redis-other", "redis %s: %s",
                         (const char *)privdata, ((redisReply *)reply)->str);
}

/* Resets the idle time of the entries we hold and have not finished, so that no other
 * consumer reclaims them: XCLAIM to ourselves, JUSTID (the delivery count does not change),
 * only for those idle for half the visibility timeout or more. */
static void heartbeat(struct esmd_redis *rc)
{
    size_t from = ring_acked(rc);
    char idle[24];
    snprintf(idle, sizeof(idle), "%lld", (long long)(rc->vt_ms / 2));
    while (from < rc->ring_len) {
        size_t k = rc->ring_len - from;
        if (k > REDIS_HEARTBEAT_MAX)
            k = REDIS_HEARTBEAT_MAX;
        struct cmd *c = &rc->cmd;
        cmd_reset(c);
        cmd_reserve_ids(c, k);
        cmd_adds(c, "XCLAIM");
        cmd_adds(c, rc->stream);
        cmd_adds(c, rc->group);
        cmd_adds(c, rc->consumer);
        cmd_adds(c, idle);
        for (size_t i = 0; i < k; i++)
            cmd_add_id(c, ring_at(rc, from + i));
        cmd_adds(c, "JUSTID");
        if (!send_cmd(rc, LINK_CMD, on_other, "XCLAIM JUSTID"))
            return;
        from += k;
    }
}

/* XAUTOCLAIM reply: [next cursor, [entry, ...], [deleted id, ...]] */
static void on_autoclaim(redisAsyncContext *ac, void *reply, void *privdata)
{
    struct esmd_redis *rc = live(ac, reply);
    if (!rc)
        return;
    const redisReply *r = reply;
    if (reply_is(r, REDIS_REPLY_ERROR)) {
        rc->reclaim_inflight = false;
        if (error_is(r, "NOGROUP")) {
            session_fail(rc, "redis stream %s: the group %s or the stream is gone (NOGROUP)",
                         rc->stream, rc->group);
            return;
        }
        esmd_log_limited(ESMD_LOG_WARN, rc->log, "redis-xautoclaim", "redis XAUTOCLAIM on %s: %s",
                         rc->stream, r->str);
        return;
    }
    struct esmd_redis_id next;
    if (!reply_is(r, REDIS_REPLY_ARRAY) || r->elements < 2 || !parse_id(r->element[0], &next) ||
        !reply_is(r->element[1], REDIS_REPLY_ARRAY)) {
        rc->reclaim_inflight = false;
        session_fail(rc, "redis XAUTOCLAIM on %s: unexpected reply", rc->stream);
        return;
    }
    rc->claim_cursor = next;
    if (rc->state != REDIS_RUNNING) {
        rc->reclaim_inflight = false;
        stop_check(rc);
        return;
    }
    const redisReply *entries = r->element[1];
    size_t ndeleted = r->elements >= 3 && reply_is(r->element[2], REDIS_REPLY_ARRAY)
                          ? r->element[2]->elements
                          : 0;
    struct stage *st = &rc->stage[STAGE_CLAIM];
    for (size_t i = 0; i < entries->elements; i++) {
        bool deleted;
        struct esmd_redis_id id;
        const redisReply *f = entry_fields(entries->element[i], &id, &deleted);
        if (deleted) {
            ndeleted++; /* Redis 6.2 lists them here; 7.0 drops them from the PEL itself */
            continue;
        }
        if (!f) {
            rc->reclaim_inflight = false;
            session_fail(rc, "redis XAUTOCLAIM on %s: malformed entry in the reply", rc->stream);
            return;
        }
        if (esmd_redis_idset_has(&rc->held, id))
            continue; /* ours, in the core's hands: it was idle too long (a reconnect) */
        stage_push(st, entry_copy(id, f));
    }
    if (ndeleted)
        ESMD_WARN(rc->log,
                  "redis stream %s: %zu reclaimed entries were deleted or trimmed from the stream "
                  "before delivery: dropped",
                  rc->stream, ndeleted);
    if (st->n == 0) {
        reclaim_start(rc);
        return;
    }
    ESMD_INFO(rc->log,
              "redis stream %s: reclaimed %zu entries pending for over %lld ms (a consumer of "
              "group %s stopped without acknowledging them)",
              rc->stream, st->n, (long long)rc->vt_ms, rc->group);
    /* our PEL over that range also holds entries we hold: ask for enough */
    stage_counts(rc, STAGE_CLAIM, LINK_CMD, rc->ring_len);
}

/* Sends the next XAUTOCLAIM of a scan, or ends the scan (cursor back at 0-0, paused, stopping). */
static void reclaim_start(struct esmd_redis *rc)
{
    bool scanning = rc->reclaim_inflight;
    bool wrapped = rc->claim_cursor.ms == 0 && rc->claim_cursor.seq == 0;
    if (!rc->up || rc->state != REDIS_RUNNING || rc->paused || rc->phase != READ_NEW ||
        (scanning && wrapped)) {
        rc->reclaim_inflight = false;
        return;
    }
    char idle[24], count[16], cursor[ESMD_REDIS_ID_MAX];
    snprintf(idle, sizeof(idle), "%lld", (long long)rc->vt_ms);
    snprintf(count, sizeof(count), "%d", REDIS_CLAIM_COUNT);
    struct cmd *c = &rc->cmd;
    cmd_reset(c);
    cmd_adds(c, "XAUTOCLAIM");
    cmd_adds(c, rc->stream);
    cmd_adds(c, rc->group);
    cmd_adds(c, rc->consumer);
    cmd_adds(c, idle);
    cmd_add(c, cursor, esmd_redis_id_format(rc->claim_cursor, cursor));
    cmd_adds(c, "COUNT");
    cmd_adds(c, count);
    rc->reclaim_inflight = send_cmd(rc, LINK_CMD, on_autoclaim, NULL);
}

static void on_reclaim_tick(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct esmd_redis *rc = w->data;
    if (!rc->up || rc->state != REDIS_RUNNING)
        return;
    /* on the same link, ahead of XAUTOCLAIM: what we hold is never idle long enough for it */
    heartbeat(rc);
    if (!rc->reclaim_inflight && !rc->failing)
        reclaim_start(rc);
}

/* ---- statistics ---- */

/* XINFO GROUPS <stream>: [[name, g, consumers, n, pending, n, last-delivered-id, id,
 * entries-read, n, lag, n|nil], ...] (lag since Redis 7.0). */
static void on_xinfo(redisAsyncContext *ac, void *reply, void *privdata)
{
    struct esmd_redis *rc = live(ac, reply);
    if (!rc)
        return;
    rc->stats_inflight = false;
    const redisReply *r = reply;
    if (!reply_is(r, REDIS_REPLY_ARRAY))
        return;
    for (size_t i = 0; i < r->elements; i++) {
        const redisReply *g = r->element[i];
        if (!reply_is(g, REDIS_REPLY_ARRAY))
            continue;
        bool ours = false;
        long long pending = -1, lag = -1;
        for (size_t k = 0; k + 1 < g->elements; k += 2) {
            const redisReply *key = g->element[k], *val = g->element[k + 1];
            if (!reply_is(key, REDIS_REPLY_STRING) && !reply_is(key, REDIS_REPLY_STATUS))
                continue;
            if (strcmp(key->str, "name") == 0)
                ours = reply_is(val, REDIS_REPLY_STRING) && val->len == strlen(rc->group) &&
                       memcmp(val->str, rc->group, val->len) == 0;
            else if (strcmp(key->str, "pending") == 0 && reply_is(val, REDIS_REPLY_INTEGER))
                pending = val->integer;
            else if (strcmp(key->str, "lag") == 0 && reply_is(val, REDIS_REPLY_INTEGER))
                lag = val->integer;
        }
        if (ours) {
            rc->lag = pending >= 0 && lag >= 0 ? (int64_t)(pending + lag) : -1;
            return;
        }
    }
}

static void on_stats_tick(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct esmd_redis *rc = w->data;
    if (!rc->up || rc->stats_inflight || rc->state != REDIS_RUNNING)
        return;
    struct cmd *c = &rc->cmd;
    cmd_reset(c);
    cmd_adds(c, "XINFO");
    cmd_adds(c, "GROUPS");
    cmd_adds(c, rc->stream);
    rc->stats_inflight = send_cmd(rc, LINK_CMD, on_xinfo, NULL);
}

/* Drops a session that does not come up, or a link that stopped answering. */
static void on_watchdog(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct esmd_redis *rc = w->data;
    if (rc->failing || (rc->state != REDIS_RUNNING && rc->state != REDIS_STOPPING))
        return;
    if (!rc->link[LINK_READ].ac && !rc->link[LINK_CMD].ac)
        return;
    double now = ev_now(loop);
    if (!rc->up && rc->state == REDIS_RUNNING &&
        now - rc->session_started > REDIS_CONNECT_TIMEOUT_S) {
        session_fail(rc, "redis %s:%d: no answer within %.0f s of connecting", rc->url.host,
                     rc->url.port, REDIS_CONNECT_TIMEOUT_S);
        return;
    }
    for (int i = 0; i < NLINKS; i++) {
        const struct redis_link *l = &rc->link[i];
        if (l->ac && l->waiting > 0 && now - l->busy_since > REDIS_REPLY_TIMEOUT_S) {
            session_fail(rc, "redis %s:%d: no reply for %.0f s", rc->url.host, rc->url.port,
                         now - l->busy_since);
            return;
        }
    }
}

/* ---- stopping ---- */

static void on_done(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct esmd_redis *rc = w->data;
    ev_timer_stop(loop, w);
    void (*done)(void *ud) = rc->done;
    rc->done = NULL;
    if (done)
        done(rc->done_ud); /* may destroy rc: touch nothing after */
}

static void stop_finish(struct esmd_redis *rc)
{
    struct ev_loop *loop = rc->host->loop;
    rc->state = REDIS_CLOSED;
    rc->ready = false;
    ev_timer_stop(loop, &rc->reconnect_tm);
    ev_timer_stop(loop, &rc->teardown_tm);
    ev_timer_stop(loop, &rc->reclaim_tm);
    ev_timer_stop(loop, &rc->stats_tm);
    ev_timer_stop(loop, &rc->watchdog_tm);
    ev_timer_stop(loop, &rc->stop_tm);
    ev_timer_stop(loop, &rc->ack_tm);
    ev_timer_start(loop, &rc->done_tm);
    size_t left = ring_acked(rc);
    if (left)
        ESMD_WARN(rc->log,
                  "redis consumer stopped with %zu finished entries not acknowledged: they stay "
                  "pending and are delivered again",
                  left);
    else
        ESMD_INFO(rc->log, "redis consumer stopped");
}

/* Ends the stop once the last read answered and the finished entries are acknowledged (or the
 * session is gone): disconnects, then finishes when both links are closed. */
static void stop_check(struct esmd_redis *rc)
{
    if (rc->state != REDIS_STOPPING)
        return;
    bool open = rc->link[LINK_READ].ac || rc->link[LINK_CMD].ac;
    if (!open) {
        if (!ev_is_active(&rc->teardown_tm))
            stop_finish(rc);
        return;
    }
    if (rc->failing)
        return; /* on_teardown frees the links, then comes back here */
    if (rc->up && (rc->read_inflight || rc->xack_inflight || ring_acked(rc) > 0))
        return;
    if (rc->disconnecting)
        return;
    rc->disconnecting = true;
    for (int i = 0; i < NLINKS; i++)
        if (rc->link[i].ac)
            redisAsyncDisconnect(rc->link[i].ac); /* after pending replies; then on_disconnect */
}

static void on_stop_timeout(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct esmd_redis *rc = w->data;
    ev_timer_stop(loop, w);
    if (rc->state != REDIS_STOPPING)
        return;
    ESMD_WARN(rc->log, "redis consumer: stop took over %.0f s; closing the connections",
              REDIS_STOP_TIMEOUT_S);
    rc->failing = true;
    ev_timer_stop(loop, &rc->teardown_tm);
    links_free(rc);
    stop_finish(rc);
}

/* ---- the operations ---- */

static void redis_destroy(void *c);

static char *printable_dup(const char *s)
{
    char *d = esmd_xstrdup(s);
    for (char *p = d; *p; p++)
        if ((unsigned char)*p <= 0x20 || (unsigned char)*p >= 0x7f)
            *p = '_';
    return d;
}

static void *redis_create(const struct esmd_mapping_cfg *cfg, const struct esmd_host *host,
                          char *err, size_t errlen)
{
    const struct esmd_redis_source_cfg *src = &cfg->redis;
    if (cfg->kind != ESMD_SOURCE_REDIS || !src->conn || !src->conn->url || !src->stream ||
        !src->group) {
        snprintf(err, errlen, "mapping %s: redis source needs a redis connection, stream and group",
                 cfg->name ? cfg->name : "?");
        return NULL;
    }
    struct esmd_redis *rc = esmd_xcalloc(1, sizeof(*rc));
    rc->host = host;
    rc->log = host->log;
    char uerr[200];
    if (esmd_redis_url_parse(src->conn->url, &rc->url, uerr, sizeof(uerr)) != ESMD_OK) {
        snprintf(err, errlen, "mapping %s: connection %s: %s", cfg->name,
                 src->conn->name ? src->conn->name : "?", uerr);
        free(rc);
        return NULL;
    }
    rc->stream = esmd_xstrdup(src->stream);
    rc->group = esmd_xstrdup(src->group);
    rc->consumer = esmd_xstrdup(src->consumer       ? src->consumer
                                : host->instance_id ? host->instance_id
                                                    : "esmd");
    rc->start_latest = src->starting_position == ESMD_START_LATEST;
    rc->vt_ms = src->visibility_timeout_ms > 0 ? src->visibility_timeout_ms : 30000;
    struct esmd_redis_format_opts fmt = {
        .format = src->event_format == ESMD_REDIS_EVENT_NATIVE ? ESMD_REDIS_FORMAT_NATIVE
                                                               : ESMD_REDIS_FORMAT_KINESIS,
        .data_field = src->data_field,
        .partition_key_field = src->partition_key_field,
    };
    char *arn = fmt.format == ESMD_REDIS_FORMAT_KINESIS ? esmd_redis_kinesis_arn(rc->stream)
                                                        : esmd_redis_arn(&rc->url, rc->stream);
    esmd_redis_source_init(&rc->src, rc->stream, arn, &fmt);
    free(arn);
    size_t klen = strlen(rc->stream) + strlen(rc->consumer) + 2;
    char *key = esmd_xmalloc(klen);
    snprintf(key, klen, "%s@%s", rc->stream, rc->consumer);
    rc->shard_key = printable_dup(key);
    free(key);
    for (int i = 0; i < NLINKS; i++) {
        size_t n = strlen(cfg->name) + 16;
        char *name = esmd_xmalloc(n);
        snprintf(name, n, "esmd:%s:%s", cfg->name, i == LINK_READ ? "read" : "cmd");
        rc->client_name[i] = printable_dup(name);
        free(name);
    }
    /* seqs (and the idempotency keys made of them) differ from any earlier process's */
    rc->next_seq = rc->front_seq = rc->ack_upto = esmd_now_ms() * 1000;
    rc->lag = -1;

    struct ev_loop *loop = host->loop;
    (void)loop;
    ev_timer_init(&rc->reconnect_tm, on_reconnect, 0.0, 0.0);
    ev_timer_init(&rc->teardown_tm, on_teardown, 0.0, 0.0);
    double every = (double)rc->vt_ms / 4000.0;
    ev_timer_init(&rc->reclaim_tm, on_reclaim_tick, every, every);
    ev_timer_init(&rc->stats_tm, on_stats_tick, 0.5, REDIS_STATS_INTERVAL_S);
    ev_timer_init(&rc->watchdog_tm, on_watchdog, REDIS_WATCHDOG_S, REDIS_WATCHDOG_S);
    ev_timer_init(&rc->stop_tm, on_stop_timeout, REDIS_STOP_TIMEOUT_S, 0.0);
    ev_timer_init(&rc->done_tm, on_done, 0.0, 0.0);
    ev_timer_init(&rc->ack_tm, on_ack_timer, REDIS_ACK_INTERVAL_S, 0.0);
    ev_timer *timers[] = {&rc->reconnect_tm, &rc->teardown_tm, &rc->reclaim_tm, &rc->stats_tm,
                          &rc->watchdog_tm,  &rc->stop_tm,     &rc->done_tm,    &rc->ack_tm};
    for (size_t i = 0; i < ESMD_ARRAY_LEN(timers); i++)
        timers[i]->data = rc;
    rc->watchers_init = true;
    return rc;
}

static size_t redis_envelope_size(void *c)
{
    (void)c;
    return esmd_redis_envelope_size();
}

static int redis_start(void *c)
{
    struct esmd_redis *rc = c;
    if (rc->state != REDIS_CREATED)
        return ESMD_ESTATE;
    rc->shard = rc->host->shard_open(rc->host->core, rc->shard_key, 0, rc);
    rc->state = REDIS_RUNNING;
    set_ready(rc, false, "connecting to redis");
    ev_timer_start(rc->host->loop, &rc->watchdog_tm);
    ev_timer_start(rc->host->loop, &rc->stats_tm);
    ESMD_INFO(rc->log, "redis consumer starting: %s:%d/%d stream %s, group %s, consumer %s",
              rc->url.host, rc->url.port, rc->url.db, rc->stream, rc->group, rc->consumer);
    session_start(rc);
    return ESMD_OK;
}

static void redis_pause(void *c, struct esmd_shard *shard)
{
    struct esmd_redis *rc = c;
    /* (by priv: a pause of a disabled mapping comes from inside shard_open, before rc->shard is
     * set) */
    if (shard && esmd_shard_priv(shard) == rc)
        rc->paused = true;
}

static void redis_resume(void *c, struct esmd_shard *shard)
{
    struct esmd_redis *rc = c;
    if (shard != rc->shard || !rc->paused)
        return;
    rc->paused = false;
    read_next(rc);
}

static void redis_ack(void *c, struct esmd_shard *shard, int64_t next_seq)
{
    struct esmd_redis *rc = c;
    if (shard != rc->shard || next_seq <= rc->ack_upto)
        return;
    if (next_seq > rc->next_seq)
        next_seq = rc->next_seq; /* never past what we handed over */
    rc->ack_upto = next_seq;
    if (rc->state == REDIS_STOPPING)
        ack_kick(rc);
    else
        ack_schedule(rc);
}

/* The partition key (partition_key_field's value): the lane of a record, and the key of its
 * on-failure record at a keyed destination. Entries without one (no partition_key_field, the
 * field missing or not UTF-8) have no key: their partitionKey is the entry ID, unique anyway. */
static void redis_record_key(void *c, const struct esmd_record *rec, const void **key, size_t *len)
{
    (void)c;
    const struct redis_rec *rr = (const struct redis_rec *)rec;
    *key = rr->has_pkey ? rr->json + rec->size : NULL;
    *len = rr->pkey_len;
}

static void redis_release(void *c, struct esmd_record *rec)
{
    (void)c;
    free(rec);
}

static const char *json_of(const struct esmd_record *rec)
{
    return ((const struct redis_rec *)rec)->json;
}

static void redis_encode(void *c, const struct esmd_batch *batch, struct esmd_buf *out)
{
    (void)c;
    esmd_redis_encode_written(batch, json_of, out);
}

static enum esmd_filter_data redis_filter_doc(void *c, const struct esmd_record *rec,
                                              struct esmd_buf *out)
{
    const struct esmd_redis *rc = c;
    /* The core asks while the record is handed over (emit), the only time its fields exist. */
    const struct esmd_redis_entry *e = rec == rc->emitting ? rc->emitting_entry : entry_of(rec);
    return esmd_redis_filter_doc(&rc->src, e, out);
}

static void redis_failure_info(void *c, const struct esmd_record *rec, size_t payload_size,
                               struct esmd_buf *out)
{
    const struct esmd_redis *rc = c;
    esmd_redis_failure_info(&rc->src, rc->group, entry_of(rec)->id, payload_size, out);
}

static bool redis_item_is(void *c, const struct esmd_record *rec, const struct cJSON *id)
{
    (void)c;
    return esmd_redis_item_is(entry_of(rec)->id, id);
}

static void redis_stop(void *c, void (*done)(void *ud), void *ud)
{
    struct esmd_redis *rc = c;
    if ((rc->state == REDIS_STOPPING || rc->state == REDIS_CLOSED) && rc->done)
        return; /* a stop is already under way: keep the first caller's callback */
    rc->done = done;
    rc->done_ud = ud;
    if (rc->state == REDIS_STOPPING)
        return;
    if (rc->state != REDIS_RUNNING) {
        rc->state = REDIS_CLOSED;
        ev_timer_start(rc->host->loop, &rc->done_tm);
        return;
    }
    struct ev_loop *loop = rc->host->loop;
    rc->state = REDIS_STOPPING;
    ev_timer_stop(loop, &rc->reconnect_tm);
    ev_timer_stop(loop, &rc->reclaim_tm);
    ev_timer_stop(loop, &rc->stats_tm);
    ev_timer_start(loop, &rc->stop_tm);
    for (int i = 0; i < NSTAGES; i++)
        stage_clear(&rc->stage[i]); /* not handed over: stay pending, read again later */
    ESMD_INFO(rc->log, "redis consumer stopping");
    if (rc->up && rc->read_inflight && rc->phase == READ_NEW && rc->read_client_id >= 0) {
        /* cut the blocking read short rather than wait for it */
        char id[24];
        snprintf(id, sizeof(id), "%lld", rc->read_client_id);
        struct cmd *cm = &rc->cmd;
        cmd_reset(cm);
        cmd_adds(cm, "CLIENT");
        cmd_adds(cm, "UNBLOCK");
        cmd_adds(cm, id);
        send_cmd(rc, LINK_CMD, on_other, "CLIENT UNBLOCK");
    }
    ack_kick(rc);
    stop_check(rc);
}

static void redis_free(struct esmd_redis *rc)
{
    for (int i = 0; i < NSTAGES; i++) {
        stage_clear(&rc->stage[i]);
        free(rc->stage[i].items);
    }
    free(rc->ring);
    esmd_redis_idset_free(&rc->held);
    cmd_free(&rc->cmd);
    esmd_buf_free(&rc->json);
    free(rc->view_fields);
    esmd_redis_source_free(&rc->src);
    esmd_redis_url_free(&rc->url);
    for (int i = 0; i < NLINKS; i++)
        free(rc->client_name[i]);
    free(rc->stream);
    free(rc->group);
    free(rc->consumer);
    free(rc->shard_key);
    free(rc);
}

static void redis_destroy(void *c)
{
    struct esmd_redis *rc = c;
    if (!rc)
        return;
    if (rc->watchers_init) {
        struct ev_loop *loop = rc->host->loop;
        ev_timer *timers[] = {&rc->reconnect_tm, &rc->teardown_tm, &rc->reclaim_tm, &rc->stats_tm,
                              &rc->watchdog_tm,  &rc->stop_tm,     &rc->done_tm,    &rc->ack_tm};
        for (size_t i = 0; i < ESMD_ARRAY_LEN(timers); i++)
            ev_timer_stop(loop, timers[i]);
    }
    rc->failing = true; /* every callback from here on is ignored */
    rc->state = REDIS_CLOSED;
    links_free(rc);
    redis_free(rc);
}

static void redis_stats(void *c, struct esmd_connector_stats *st)
{
    const struct esmd_redis *rc = c;
    st->committed = rc->committed_total;
    st->ready = rc->ready;
    st->lag = rc->state == REDIS_RUNNING ? rc->lag : -1;
}

const struct esmd_connector_ops esmd_connector_redis = {
    .kind = "redis",
    .grouped = false,
    .queue = false,
    .source = ESMD_SOURCE_REDIS,
    .source_keys = esmd_redis_source_keys,
    .conn_keys = esmd_redis_conn_keys,
    .default_batch_size = 100,
    .default_batching_window_ms = 0,
    .cfg_check = esmd_redis_cfg_check,
    .create = redis_create,
    .envelope_size = redis_envelope_size,
    .start = redis_start,
    .pause = redis_pause,
    .resume = redis_resume,
    .ack = redis_ack,
    .nack = NULL,
    .release = redis_release,
    .encode = redis_encode,
    .filter_doc = redis_filter_doc,
    .data_key = "fields",
    .filter_fallback = false, /* Kinesis (docs/lambda.md#filter-non-json): patterns as written */
    .batch_info_key = "RedisBatchInfo",
    .failure_info = redis_failure_info,
    .record_key = redis_record_key,
    .item_is = redis_item_is,
    .stop = redis_stop,
    .destroy = redis_destroy,
    .stats = redis_stats,
};
