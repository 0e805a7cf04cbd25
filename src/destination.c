/* Destinations through a Postgres outbox (include/esmd/destination.h, docs/destinations.md).
 *
 * Two connections to the service's Postgres: `send` runs the INSERTs of esmd_dests_send()
 * (several sends of one loop turn, or that arrive while an INSERT is in flight, share one
 * statement: group commit), `work` runs the delivery worker's statements (claims, deletes,
 * failure updates, pgqueue:// writes, the pending count), one at a time.
 *
 * The worker claims due rows per destination in one statement (a LATERAL sub-select per
 * destination, FOR UPDATE SKIP LOCKED, at most `room` rows each: the destination's in-flight
 * cap minus what it has in flight), so a slow or failing destination never takes the claims of
 * another. Every claimed row is written at once by its destination's writer:
 *   kafka://CONN/TOPIC  one idempotent librdkafka producer per connection; written = delivery
 *                       report without error
 *   redis://CONN/STREAM one hiredis async connection per connection: XADD STREAM * payload JSON
 *   pgqueue://QUEUE     DELETE of the claim's rows and esmd.send_batch() in one statement
 *                       (exactly once)
 *   http(s)://...       POST on a libcurl multi handle; written = 2xx
 *   function://NAME     handed to the function sink (the async invocation queue,
 *                       esmd_dests_set_function_sink): written = the event is committed there
 * A written row is deleted (batched); a failed one gets attempts + 1, last_error and
 * next_attempt_at = now() + backoff (1 s doubling to 5 min, jitter). A destination whose last
 * write failed is "failing": it gets one row at a time (a probe) and no claims until its own
 * backoff has passed; its first success clears it.
 *
 * Claims happen when a send to the destination has committed here, when a destination has
 * room again and its last claim was full, and every DESTS_POLL_S for all destinations (rows
 * of other instances, rows whose backoff has passed). A claim leases the row for
 * DESTS_LEASE_S (lease_token = this process): rows of a crashed process become due when the
 * lease ends, and at start-up the rows of this instance id held by an earlier process are
 * released at once.
 *
 * Everything runs on the loop thread. librdkafka's delivery reports, errors and logs come
 * through its main queue, served from the loop (rd_kafka_queue_io_event_enable). */
#include "esmd/destination.h"
#include "esmd/backoff.h"
#include "esmd/log.h"
#include "esmd/metrics.h"
#include "esmd/pg.h"
#include "esmd/redis_link.h"

#include <curl/curl.h>
#include <errno.h>
#include <ev.h>
#include <fcntl.h>
#include <hiredis/adapters/libev.h>
#include <hiredis/async.h>
#include <hiredis/hiredis.h>
#include <librdkafka/rdkafka.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

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
/* Time limit of one write (HTTP request, Kafka message.timeout.ms, Redis reply). */
#define DESTS_WRITE_TIMEOUT_MS 30000
/* Retry of a DELETE of written rows that failed (connection lost). */
#define DESTS_DELETE_RETRY_S 1.0
/* esmd_dests_stop() waits this long for writes in progress. */
#define DESTS_STOP_TIMEOUT_S 40.0
/* In-flight writes per destination, by kind. */
#define DESTS_CAP_KAFKA 512
#define DESTS_CAP_REDIS 256
#define DESTS_CAP_PGQUEUE 256
#define DESTS_CAP_HTTP 16
#define DESTS_KAFKA_POLL_MAX 64
#define DESTS_REDIS_FIELD "payload"

static const struct esmd_backoff dests_backoff = {1000, 300000};

enum dest_kind { DEST_KAFKA, DEST_REDIS, DEST_PGQUEUE, DEST_HTTP, DEST_FUNCTION };

/* What the worker does with a row after its write. */
enum dl_result {
    DL_OK,      /* written: delete the row */
    DL_DELETED, /* written and already deleted (pgqueue) */
    DL_GONE,    /* our lease was lost: the row belongs to someone else now */
    DL_FAIL,    /* not written: attempts + 1, backoff */
};

struct esmd_dests;
struct dest;

/* ---- writers (one per connection) ---- */

struct kafka_w {
    struct kafka_w *next;
    struct esmd_dests *d;
    char *name;               /* connection name */
    char *servers;            /* bootstrap servers */
    struct esmd_kvlist props; /* owned copies */
    rd_kafka_t *rk;
    rd_kafka_queue_t *mainq;
    int pipefd[2];
    ev_io io;
    ev_timer tick;
    int outstanding; /* messages produced, delivery report not served yet */
    bool fatal;      /* the producer hit a fatal error: replaced before the next message */
};

enum redis_state { RW_IDLE, RW_SETUP, RW_UP };

struct redis_w {
    struct redis_w *next;
    struct esmd_dests *d;
    char *name;
    struct esmd_redis_url url;
    char url_err[300]; /* non-empty: the URL cannot be used */
    redisAsyncContext *ac;
    enum redis_state state;
    int setup_waiting;
    int outstanding;          /* XADDs sent, replies not seen */
    struct delivery *waiting; /* deliveries held until the setup is done (LIFO) */
    double last_activity;     /* ev_now of the last reply or first command */
    ev_timer watchdog;
};

/* ---- destinations (one per URI) ---- */

struct dest {
    struct dest *next;
    struct esmd_dests *d;
    char *uri;   /* owned, as stored in the outbox */
    char *label; /* owned: uri with a password hidden (metrics, readiness, logs) */
    enum dest_kind kind;
    char *target; /* topic, stream, queue or function name (owned); NULL for http */
    struct kafka_w *kw;
    struct redis_w *rw;
    char *unwritable; /* owned: why this instance cannot write it (rows are left alone) */
    int cap;
    int inflight;
    bool failing;    /* the last write failed */
    int failures;    /* consecutive failed probes, for the destination's own backoff */
    double retry_at; /* ev_now before which it gets no claims */
    bool more;       /* claim it at the next round */
    bool configured;
    int64_t pending;
    char last_error[512];
    struct esmd_series *m_ok, *m_fail, *m_pending;
};

/* One claimed row being written. */
struct delivery {
    struct delivery *prev, *next; /* in d->dls */
    struct esmd_dests *d;
    struct dest *dest;
    int64_t id;
    char *payload; /* owned, NUL-terminated */
    size_t len;
    char *attrs;        /* owned: message attributes (JSON) for pgqueue://; NULL: none */
    unsigned char *key; /* owned; NULL: none */
    size_t keylen;
    int attempts; /* before this write */
    bool probe;   /* claimed while the destination was failing */
    bool in_kafka;
    bool queued; /* pgqueue: its statement is sent */
    struct kafka_w *kw;
    struct delivery *wnext; /* redis waiting list */
    CURL *easy;
    struct curl_slist *hdrs;
    char errbuf[CURL_ERROR_SIZE];
};

/* One esmd_dests_send() waiting for its INSERT. */
struct send_rec {
    struct send_rec *next;
    struct dest *dest;
    char *payload; /* owned, NUL-terminated */
    size_t len;
    char *keyhex; /* owned: "\x..." bytea text, NULL: no key */
    char *attrs;  /* owned: message attributes JSON, NULL: none */
    esmd_dests_cb cb;
    void *ud;
};

struct http_sock {
    ev_io io;
    struct esmd_dests *d;
    struct http_sock *prev, *next;
};

struct esmd_dests {
    struct ev_loop *loop;
    char *instance_id;
    char token[37]; /* this process's lease token */
    struct esmd_pg *send_pg, *work_pg;
    struct dest *dests;
    struct kafka_w *kws;
    struct redis_w *rws;
    char **functions; /* names of configured functions, for function:// */
    size_t nfunctions;
    esmd_dests_function_sink fn_sink; /* writes function:// rows; NULL: not available */
    void *fn_sink_ud;

    struct send_rec *sendq, *sendq_tail; /* waiting for an INSERT */
    int inserting;                       /* INSERTs in flight */
    ev_timer send_kick;

    struct delivery *dls; /* every delivery in flight */
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

    CURLM *multi;
    ev_timer curl_tm;
    struct http_sock *socks;

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
static void delivery_done(struct delivery *dl, enum dl_result r, const char *err);

/* ---- small helpers ---- */

static bool has_prefix(const char *s, const char *p)
{
    return strncmp(s, p, strlen(p)) == 0;
}

static bool name_ok(const char *s, size_t max)
{
    size_t n = strlen(s);
    if (n == 0 || n > max)
        return false;
    for (; *s; s++) {
        char c = *s;
        if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
              c == '_' || c == '.' || c == '-'))
            return false;
    }
    return true;
}

static bool printable(const char *s)
{
    for (; *s; s++)
        if ((unsigned char)*s <= 0x20 || *s == 0x7f)
            return false;
    return true;
}

/* Valid UTF-8 (no overlongs, no surrogates) without NUL bytes. */
static bool utf8_ok(const unsigned char *s, size_t n)
{
    size_t i = 0;
    while (i < n) {
        unsigned char c = s[i];
        if (c == 0)
            return false;
        if (c < 0x80) {
            i++;
            continue;
        }
        size_t len;
        uint32_t cp;
        if (c >= 0xc2 && c <= 0xdf) {
            len = 2;
            cp = c & 0x1f;
        } else if (c >= 0xe0 && c <= 0xef) {
            len = 3;
            cp = c & 0x0f;
        } else if (c >= 0xf0 && c <= 0xf4) {
            len = 4;
            cp = c & 0x07;
        } else {
            return false;
        }
        if (i + len > n)
            return false;
        for (size_t k = 1; k < len; k++) {
            if ((s[i + k] & 0xc0) != 0x80)
                return false;
            cp = (cp << 6) | (s[i + k] & 0x3f);
        }
        if ((len == 3 && (cp < 0x800 || (cp >= 0xd800 && cp <= 0xdfff))) ||
            (len == 4 && (cp < 0x10000 || cp > 0x10ffff)))
            return false;
        i += len;
    }
    return true;
}

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

/* http(s)://user:password@host/... → http(s)://user:***@host/...; other URIs unchanged. */
static char *dest_label(const char *uri)
{
    if (!has_prefix(uri, "http://") && !has_prefix(uri, "https://"))
        return esmd_xstrdup(uri);
    const char *auth = strstr(uri, "://") + 3;
    size_t alen = strcspn(auth, "/?#");
    const char *at = NULL;
    for (const char *p = auth; p < auth + alen; p++)
        if (*p == '@')
            at = p;
    const char *colon = at ? memchr(auth, ':', (size_t)(at - auth)) : NULL;
    if (!colon)
        return esmd_xstrdup(uri);
    struct esmd_buf b = ESMD_BUF_INIT;
    esmd_buf_append(&b, uri, (size_t)(colon + 1 - uri));
    esmd_buf_puts(&b, "***");
    esmd_buf_puts(&b, at);
    esmd_buf_cstr(&b);
    return esmd_buf_steal(&b, NULL);
}

static void work_query(struct esmd_dests *d, const char *sql, int n, const char *const *params,
                       esmd_pg_cb cb, void *ud);

/* ---- kafka writer ---- */

/* Properties of a consumer only (librdkafka CONFIGURATION.md, "C"): not given to the producer,
 * which would warn about each. */
static bool kafka_consumer_only(const char *key)
{
    static const char *const keys[] = {
        "group.id",
        "group.instance.id",
        "partition.assignment.strategy",
        "session.timeout.ms",
        "heartbeat.interval.ms",
        "group.protocol.type",
        "group.protocol",
        "group.remote.assignor",
        "coordinator.query.interval.ms",
        "max.poll.interval.ms",
        "enable.auto.commit",
        "auto.commit.interval.ms",
        "enable.auto.offset.store",
        "queued.min.messages",
        "queued.max.messages.kbytes",
        "fetch.wait.max.ms",
        "fetch.queue.backoff.ms",
        "fetch.message.max.bytes",
        "max.partition.fetch.bytes",
        "fetch.max.bytes",
        "fetch.min.bytes",
        "fetch.error.backoff.ms",
        "offset.store.method",
        "isolation.level",
        "enable.partition.eof",
        "check.crcs",
        "auto.offset.reset",
        "consume.callback.max.messages",
        "offset.store.path",
        "offset.store.sync.interval.ms",
        "consume_cb",
        "rebalance_cb",
        "offset_commit_cb",
    };
    for (size_t i = 0; i < ESMD_ARRAY_LEN(keys); i++)
        if (strcmp(key, keys[i]) == 0)
            return true;
    return false;
}

/* Set by esmd for the destination producer: a connection property of that name is ignored. */
static bool kafka_forced(const char *key)
{
    static const char *const keys[] = {"bootstrap.servers", "log.queue", "enable.idempotence",
                                       "acks", "request.required.acks"};
    for (size_t i = 0; i < ESMD_ARRAY_LEN(keys); i++)
        if (strcmp(key, keys[i]) == 0)
            return true;
    return false;
}

static void kw_poll(struct kafka_w *kw)
{
    if (!kw->rk)
        return;
    char junk[64];
    while (read(kw->pipefd[0], junk, sizeof(junk)) > 0)
        ;
    int i = 0;
    while (kw->rk && i++ < DESTS_KAFKA_POLL_MAX && rd_kafka_poll(kw->rk, 0) > 0)
        ;
    if (kw->rk && i > DESTS_KAFKA_POLL_MAX && !ev_is_active(&kw->tick))
        ev_timer_again(kw->d->loop, &kw->tick); /* more to serve: the tick goes on */
}

static void kw_io_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    ESMD_UNUSED(loop);
    ESMD_UNUSED(revents);
    kw_poll(w->data);
}

static void kw_tick_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct kafka_w *kw = w->data;
    ESMD_UNUSED(revents);
    kw_poll(kw);
    if (kw->outstanding == 0)
        ev_timer_stop(loop, w);
}

static void kw_on_dr(rd_kafka_t *rk, const rd_kafka_message_t *rkm, void *opaque)
{
    struct kafka_w *kw = opaque;
    struct delivery *dl = rkm->_private;
    ESMD_UNUSED(rk);
    if (kw->outstanding > 0)
        kw->outstanding--;
    if (!dl)
        return;
    dl->in_kafka = false;
    dl->kw = NULL;
    if (rkm->err) {
        char msg[300];
        snprintf(msg, sizeof(msg), "kafka %s: %s", rd_kafka_err2name(rkm->err),
                 rd_kafka_err2str(rkm->err));
        delivery_done(dl, DL_FAIL, msg);
    } else {
        delivery_done(dl, DL_OK, NULL);
    }
}

static void kw_on_error(rd_kafka_t *rk, int err, const char *reason, void *opaque)
{
    struct kafka_w *kw = opaque;
    if (err == RD_KAFKA_RESP_ERR__FATAL) {
        char fatal[256];
        rd_kafka_resp_err_t ferr = rd_kafka_fatal_error(rk, fatal, sizeof(fatal));
        ESMD_ERROR(NULL,
                   "destination producer for connection %s: fatal error %s: %s; it is "
                   "replaced",
                   kw->name, rd_kafka_err2name(ferr), fatal);
        kw->fatal = true;
        return;
    }
    esmd_log_limited(ESMD_LOG_WARN, NULL, "dest-kafka-error",
                     "destination producer for connection %s: %s: %s", kw->name,
                     rd_kafka_err2name((rd_kafka_resp_err_t)err), reason);
}

static void kw_on_log(const rd_kafka_t *rk, int level, const char *fac, const char *buf)
{
    ESMD_UNUSED(rk);
    if (level <= 3)
        esmd_log_limited(ESMD_LOG_ERROR, NULL, "dest-kafka-log-error", "librdkafka %s: %s", fac,
                         buf);
    else if (level == 4)
        esmd_log_limited(ESMD_LOG_WARN, NULL, "dest-kafka-log-warn", "librdkafka %s: %s", fac, buf);
    else if (level <= 6)
        esmd_log(ESMD_LOG_INFO, NULL, "librdkafka %s: %s", fac, buf);
    else
        esmd_log(ESMD_LOG_DEBUG, NULL, "librdkafka %s: %s", fac, buf);
}

static int kw_set(rd_kafka_conf_t *conf, const char *key, const char *value, char *err,
                  size_t errlen)
{
    char errstr[256];
    if (rd_kafka_conf_set(conf, key, value, errstr, sizeof(errstr)) != RD_KAFKA_CONF_OK) {
        snprintf(err, errlen, "kafka property %s: %s", key, errstr);
        return ESMD_EINVAL;
    }
    return 0;
}

/* Creates the producer. 0, or ESMD_EIO / ESMD_EINVAL with err. */
static int kw_open(struct kafka_w *kw, char *err, size_t errlen)
{
    char client_id[300], timeout[32];
    snprintf(client_id, sizeof(client_id), "esmd-%s-destinations", kw->d->instance_id);
    snprintf(timeout, sizeof(timeout), "%d", DESTS_WRITE_TIMEOUT_MS);
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    const char *defaults[][2] = {
        {"bootstrap.servers", kw->servers},
        {"client.id", client_id},
        {"log.queue", "true"},
        {"enable.idempotence", "true"},
        {"acks", "all"},
        {"message.timeout.ms", timeout},
        {"linger.ms", "5"},
    };
    for (size_t i = 0; i < ESMD_ARRAY_LEN(defaults); i++)
        if (kw_set(conf, defaults[i][0], defaults[i][1], err, errlen) != 0)
            goto fail;
    for (size_t i = 0; i < kw->props.n; i++) {
        const char *key = kw->props.items[i].key, *value = kw->props.items[i].value;
        if (kafka_consumer_only(key))
            continue;
        if (kafka_forced(key)) {
            ESMD_WARN(NULL,
                      "connection %s: kafka property %s is set by esmd for destinations; "
                      "ignored by the destination producer",
                      kw->name, key);
            continue;
        }
        if (kw_set(conf, key, value, err, errlen) != 0)
            goto fail;
    }
    rd_kafka_conf_set_opaque(conf, kw);
    rd_kafka_conf_set_dr_msg_cb(conf, kw_on_dr);
    rd_kafka_conf_set_error_cb(conf, kw_on_error);
    rd_kafka_conf_set_log_cb(conf, kw_on_log);
    char errstr[400];
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof(errstr));
    if (!rk) {
        snprintf(err, errlen, "kafka producer for connection %s: %s", kw->name, errstr);
        goto fail;
    }
    conf = NULL; /* rd_kafka_new took it */
    if (pipe2(kw->pipefd, O_NONBLOCK | O_CLOEXEC) != 0) {
        snprintf(err, errlen, "kafka producer: pipe: %s", strerror(errno));
        kw->pipefd[0] = kw->pipefd[1] = -1;
        rd_kafka_destroy(rk);
        return ESMD_EIO;
    }
    kw->rk = rk;
    rd_kafka_set_log_queue(rk, NULL); /* logs → main queue, served on the loop */
    kw->mainq = rd_kafka_queue_get_main(rk);
    rd_kafka_queue_io_event_enable(kw->mainq, kw->pipefd[1], "1", 1);
    ev_io_set(&kw->io, kw->pipefd[0], EV_READ);
    ev_io_start(kw->d->loop, &kw->io);
    kw->fatal = false;
    ESMD_INFO(NULL, "destination producer for connection %s started (%s)", kw->name,
              rd_kafka_name(rk));
    return 0;
fail:
    if (conf)
        rd_kafka_conf_destroy(conf);
    return ESMD_EINVAL;
}

/* Destroys the producer; messages not yet reported fail ("producer closed"). */
static void kw_close(struct kafka_w *kw)
{
    struct esmd_dests *d = kw->d;
    if (kw->rk) {
        rd_kafka_purge(kw->rk, RD_KAFKA_PURGE_F_QUEUE | RD_KAFKA_PURGE_F_INFLIGHT);
        rd_kafka_poll(kw->rk, 0); /* the purged messages' reports */
        rd_kafka_queue_io_event_enable(kw->mainq, -1, NULL, 0);
        rd_kafka_queue_destroy(kw->mainq);
        kw->mainq = NULL;
        rd_kafka_destroy(kw->rk);
        kw->rk = NULL;
    }
    ev_io_stop(d->loop, &kw->io);
    ev_timer_stop(d->loop, &kw->tick);
    for (int i = 0; i < 2; i++) {
        if (kw->pipefd[i] >= 0)
            close(kw->pipefd[i]);
        kw->pipefd[i] = -1;
    }
    kw->outstanding = 0;
    /* reports librdkafka did not serve */
    struct delivery *dl = d->dls, *next;
    for (; dl; dl = next) {
        next = dl->next;
        if (dl->in_kafka && dl->kw == kw) {
            dl->in_kafka = false;
            dl->kw = NULL;
            delivery_done(dl, DL_FAIL, "kafka producer closed before the delivery report");
        }
    }
}

static void kw_write(struct delivery *dl)
{
    struct kafka_w *kw = dl->dest->kw;
    char err[512];
    if (kw->rk && kw->fatal)
        kw_close(kw);
    if (!kw->rk && kw_open(kw, err, sizeof(err)) != 0) {
        delivery_done(dl, DL_FAIL, err);
        return;
    }
    rd_kafka_resp_err_t e = rd_kafka_producev(
        kw->rk, RD_KAFKA_V_TOPIC(dl->dest->target), RD_KAFKA_V_VALUE(dl->payload, dl->len),
        RD_KAFKA_V_KEY(dl->key, dl->keylen), RD_KAFKA_V_MSGFLAGS(0), RD_KAFKA_V_OPAQUE(dl),
        RD_KAFKA_V_END);
    if (e) {
        snprintf(err, sizeof(err), "kafka produce: %s", rd_kafka_err2str(e));
        delivery_done(dl, DL_FAIL, err);
        return;
    }
    dl->in_kafka = true;
    dl->kw = kw;
    if (kw->outstanding++ == 0 && !ev_is_active(&kw->tick))
        ev_timer_again(kw->d->loop, &kw->tick); /* safety net for a missed wake-up */
}

/* ---- redis writer ---- */

static void rw_fail_waiting(struct redis_w *rw, const char *why)
{
    while (rw->waiting) {
        struct delivery *dl = rw->waiting;
        rw->waiting = dl->wnext;
        dl->wnext = NULL;
        delivery_done(dl, DL_FAIL, why);
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

static void rw_send_xadd(struct redis_w *rw, struct delivery *dl);

static void rw_on_setup(redisAsyncContext *ac, void *reply, void *privdata)
{
    struct redis_w *rw = ac->data;
    const redisReply *r = reply;
    const char *what = privdata;
    if (!rw || rw->ac != ac || !r)
        return; /* the context is going away: rw_on_disconnect handles the rest */
    rw->last_activity = ev_now(rw->d->loop);
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
    struct delivery *rev = NULL;
    while (rw->waiting) {
        struct delivery *dl = rw->waiting;
        rw->waiting = dl->wnext;
        dl->wnext = rev;
        rev = dl;
    }
    while (rev) {
        struct delivery *dl = rev;
        rev = dl->wnext;
        dl->wnext = NULL;
        rw_send_xadd(rw, dl);
    }
}

static void rw_on_xadd(redisAsyncContext *ac, void *reply, void *privdata)
{
    struct redis_w *rw = ac->data;
    struct delivery *dl = privdata;
    const redisReply *r = reply;
    if (rw && rw->outstanding > 0)
        rw->outstanding--;
    if (rw)
        rw->last_activity = ev_now(rw->d->loop);
    if (!r) {
        char why[300];
        snprintf(why, sizeof(why), "redis %s:%d: connection lost before the reply",
                 rw ? rw->url.host : "?", rw ? rw->url.port : 0);
        delivery_done(dl, DL_FAIL, why);
        return;
    }
    if (r->type == REDIS_REPLY_ERROR) {
        char why[400];
        snprintf(why, sizeof(why), "redis XADD: %.*s", (int)r->len, r->str);
        delivery_done(dl, DL_FAIL, why);
        return;
    }
    delivery_done(dl, DL_OK, NULL);
}

static void rw_send_xadd(struct redis_w *rw, struct delivery *dl)
{
    const char *argv[] = {"XADD", dl->dest->target, "*", DESTS_REDIS_FIELD, dl->payload};
    size_t lens[] = {4, strlen(dl->dest->target), 1, strlen(DESTS_REDIS_FIELD), dl->len};
    if (!rw->ac || redisAsyncCommandArgv(rw->ac, rw_on_xadd, dl, 5, argv, lens) != REDIS_OK) {
        delivery_done(dl, DL_FAIL, "redis: cannot send XADD (connection closing)");
        return;
    }
    if (rw->outstanding++ == 0)
        rw->last_activity = ev_now(rw->d->loop);
}

static bool rw_setup_cmd(struct redis_w *rw, const char *what, int argc, const char **argv)
{
    size_t lens[4];
    for (int i = 0; i < argc; i++)
        lens[i] = strlen(argv[i]);
    if (redisAsyncCommandArgv(rw->ac, rw_on_setup, (void *)what, argc, argv, lens) != REDIS_OK)
        return false;
    rw->setup_waiting++;
    return true;
}

static bool rw_connect(struct redis_w *rw, char *err, size_t errlen)
{
    redisAsyncContext *ac = redisAsyncConnect(rw->url.host, rw->url.port);
    if (!ac || ac->err) {
        snprintf(err, errlen, "redis %s:%d: cannot connect: %s", rw->url.host, rw->url.port,
                 ac ? ac->errstr : "out of memory");
        if (ac)
            redisAsyncFree(ac);
        return false;
    }
    ac->data = rw;
    redisLibevAttach(rw->d->loop, ac);
    redisAsyncSetConnectCallback(ac, rw_on_connect);
    redisAsyncSetDisconnectCallback(ac, rw_on_disconnect);
    rw->ac = ac;
    rw->state = RW_SETUP;
    rw->setup_waiting = 0;
    rw->last_activity = ev_now(rw->d->loop);
    bool ok = true;
    if (rw->url.password) {
        const char *argv[3] = {"AUTH", rw->url.user ? rw->url.user : rw->url.password,
                               rw->url.password};
        ok = rw_setup_cmd(rw, "AUTH", rw->url.user ? 3 : 2, argv);
    }
    if (ok && rw->url.db != 0) {
        char db[16];
        snprintf(db, sizeof(db), "%d", rw->url.db);
        const char *argv[2] = {"SELECT", db};
        ok = rw_setup_cmd(rw, "SELECT", 2, argv);
    }
    char name[300];
    snprintf(name, sizeof(name), "esmd-%s-destinations", rw->d->instance_id);
    for (char *c = name; *c; c++)
        if (*c == ' ' || *c == '\n' || *c == '\r')
            *c = '_';
    const char *argv[3] = {"CLIENT", "SETNAME", name};
    if (ok)
        ok = rw_setup_cmd(rw, "CLIENT SETNAME", 3, argv);
    if (!ok) {
        snprintf(err, errlen, "redis %s:%d: cannot send the connection setup", rw->url.host,
                 rw->url.port);
        return false;
    }
    ev_timer_again(rw->d->loop, &rw->watchdog);
    return true;
}

static void rw_write(struct delivery *dl)
{
    struct redis_w *rw = dl->dest->rw;
    char err[400];
    if (rw->url_err[0]) {
        delivery_done(dl, DL_FAIL, rw->url_err);
        return;
    }
    if (!rw->ac && !rw_connect(rw, err, sizeof(err))) {
        delivery_done(dl, DL_FAIL, err);
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
    if (busy && ev_now(loop) - rw->last_activity > DESTS_WRITE_TIMEOUT_MS / 1000.0) {
        ESMD_WARN(NULL, "redis %s:%d (connection %s): no reply in %d s; reconnecting", rw->url.host,
                  rw->url.port, rw->name, DESTS_WRITE_TIMEOUT_MS / 1000);
        redisAsyncContext *ac = rw->ac;
        rw->ac = NULL; /* its callbacks see it is not the writer's connection any more */
        rw->state = RW_IDLE;
        rw->outstanding = 0;
        rw_fail_waiting(rw, "redis: no reply within the write time limit");
        /* pending XADD callbacks get NULL replies: their deliveries fail */
        redisAsyncFree(ac);
    }
}

/* ---- http writer (libcurl multi on the loop, as src/invoke.c) ---- */

static void http_check_done(struct esmd_dests *d)
{
    CURLMsg *msg;
    int left;
    while (d->multi && (msg = curl_multi_info_read(d->multi, &left)) != NULL) {
        if (msg->msg != CURLMSG_DONE)
            continue;
        char *priv = NULL;
        curl_easy_getinfo(msg->easy_handle, CURLINFO_PRIVATE, &priv);
        struct delivery *dl = (struct delivery *)priv;
        if (!dl)
            continue;
        CURLcode cc = msg->data.result;
        long status = 0;
        curl_easy_getinfo(dl->easy, CURLINFO_RESPONSE_CODE, &status);
        char why[CURL_ERROR_SIZE + 64];
        enum dl_result r = DL_OK;
        if (cc != CURLE_OK) {
            r = DL_FAIL;
            if (cc == CURLE_OPERATION_TIMEDOUT)
                snprintf(why, sizeof(why), "http: timed out after %d ms", DESTS_WRITE_TIMEOUT_MS);
            else
                snprintf(why, sizeof(why), "http: %s",
                         dl->errbuf[0] ? dl->errbuf : curl_easy_strerror(cc));
        } else if (status < 200 || status > 299) {
            r = DL_FAIL;
            snprintf(why, sizeof(why), "http: HTTP %ld", status);
        }
        curl_multi_remove_handle(d->multi, dl->easy);
        curl_easy_cleanup(dl->easy);
        dl->easy = NULL;
        curl_slist_free_all(dl->hdrs);
        dl->hdrs = NULL;
        delivery_done(dl, r, r == DL_OK ? NULL : why);
    }
}

static void http_io_cb(struct ev_loop *loop, ev_io *w, int revents)
{
    struct http_sock *sock = (struct http_sock *)w;
    struct esmd_dests *d = sock->d;
    int flags = 0, running;
    ESMD_UNUSED(loop);
    if (revents & EV_READ)
        flags |= CURL_CSELECT_IN;
    if (revents & EV_WRITE)
        flags |= CURL_CSELECT_OUT;
    if (revents & EV_ERROR)
        flags |= CURL_CSELECT_ERR;
    curl_multi_socket_action(d->multi, w->fd, flags, &running);
    http_check_done(d);
}

static void http_timer_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct esmd_dests *d = w->data;
    int running;
    ESMD_UNUSED(loop);
    ESMD_UNUSED(revents);
    curl_multi_socket_action(d->multi, CURL_SOCKET_TIMEOUT, 0, &running);
    http_check_done(d);
}

static int http_socket_fn(CURL *easy, curl_socket_t s, int what, void *userp, void *socketp)
{
    struct esmd_dests *d = userp;
    struct http_sock *sock = socketp;
    ESMD_UNUSED(easy);
    if (what == CURL_POLL_REMOVE) {
        if (sock) {
            ev_io_stop(d->loop, &sock->io);
            if (sock->prev)
                sock->prev->next = sock->next;
            else
                d->socks = sock->next;
            if (sock->next)
                sock->next->prev = sock->prev;
            free(sock);
            curl_multi_assign(d->multi, s, NULL);
        }
        return 0;
    }
    if (!sock) {
        sock = esmd_xcalloc(1, sizeof(*sock));
        sock->d = d;
        sock->next = d->socks;
        if (d->socks)
            d->socks->prev = sock;
        d->socks = sock;
        ev_init(&sock->io, http_io_cb);
        curl_multi_assign(d->multi, s, sock);
    } else {
        ev_io_stop(d->loop, &sock->io);
    }
    int events = 0;
    if (what & CURL_POLL_IN)
        events |= EV_READ;
    if (what & CURL_POLL_OUT)
        events |= EV_WRITE;
    ev_io_set(&sock->io, s, events);
    ev_io_start(d->loop, &sock->io);
    return 0;
}

static int http_timer_fn(CURLM *multi, long timeout_ms, void *userp)
{
    struct esmd_dests *d = userp;
    ESMD_UNUSED(multi);
    ev_timer_stop(d->loop, &d->curl_tm);
    if (timeout_ms >= 0) {
        ev_timer_set(&d->curl_tm, (double)timeout_ms / 1000.0, 0.);
        ev_timer_start(d->loop, &d->curl_tm);
    }
    return 0;
}

static size_t http_discard(char *ptr, size_t size, size_t nmemb, void *userdata)
{
    ESMD_UNUSED(ptr);
    ESMD_UNUSED(userdata);
    return size * nmemb;
}

static void http_write(struct delivery *dl)
{
    struct esmd_dests *d = dl->d;
    if (!d->multi) {
        d->multi = curl_multi_init();
        if (!d->multi) {
            delivery_done(dl, DL_FAIL, "http: curl_multi_init failed");
            return;
        }
        curl_multi_setopt(d->multi, CURLMOPT_SOCKETFUNCTION, http_socket_fn);
        curl_multi_setopt(d->multi, CURLMOPT_SOCKETDATA, d);
        curl_multi_setopt(d->multi, CURLMOPT_TIMERFUNCTION, http_timer_fn);
        curl_multi_setopt(d->multi, CURLMOPT_TIMERDATA, d);
    }
    CURL *easy = curl_easy_init();
    if (!easy) {
        delivery_done(dl, DL_FAIL, "http: curl_easy_init failed");
        return;
    }
    char line[96];
    struct curl_slist *h = curl_slist_append(NULL, "Content-Type: application/json");
    h = curl_slist_append(h, "Expect:");
    snprintf(line, sizeof(line), "X-Esmd-Idempotency-Key: esmd-outbox-%lld", (long long)dl->id);
    h = curl_slist_append(h, line);
    dl->hdrs = h;
    dl->easy = easy;
    dl->errbuf[0] = '\0';
    curl_easy_setopt(easy, CURLOPT_URL, dl->dest->uri);
    curl_easy_setopt(easy, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(easy, CURLOPT_POST, 1L);
    curl_easy_setopt(easy, CURLOPT_POSTFIELDS, dl->payload);
    curl_easy_setopt(easy, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)dl->len);
    curl_easy_setopt(easy, CURLOPT_HTTPHEADER, h);
    curl_easy_setopt(easy, CURLOPT_USERAGENT, "esmd/" ESMD_VERSION);
    curl_easy_setopt(easy, CURLOPT_TIMEOUT_MS, (long)DESTS_WRITE_TIMEOUT_MS);
    curl_easy_setopt(easy, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(easy, CURLOPT_TCP_KEEPALIVE, 1L);
    curl_easy_setopt(easy, CURLOPT_PRIVATE, dl);
    curl_easy_setopt(easy, CURLOPT_ERRORBUFFER, dl->errbuf);
    curl_easy_setopt(easy, CURLOPT_WRITEFUNCTION, http_discard);
    CURLMcode mc = curl_multi_add_handle(d->multi, easy);
    if (!h || mc != CURLM_OK) {
        char why[128];
        snprintf(why, sizeof(why), "http: %s",
                 h ? curl_multi_strerror(mc) : "out of memory building headers");
        curl_easy_cleanup(easy);
        dl->easy = NULL;
        curl_slist_free_all(dl->hdrs);
        dl->hdrs = NULL;
        delivery_done(dl, DL_FAIL, why);
    }
}

/* ---- pgqueue writer: the rows' DELETE and esmd.send_batch() in one statement ----
 * The rows of one claim for one queue go in one statement, so the queue gets them exactly once
 * (a row whose lease was lost is neither deleted nor sent). If the statement fails (a message
 * over the queue's size limit, say), each row is tried alone, so only the bad one fails. */

struct pgq_batch {
    struct esmd_dests *d;
    struct delivery **dls;
    size_t n;
};

static void pgq_send(struct esmd_dests *d, struct delivery **dls, size_t n);

static void pgq_done(void *ud, const PGresult *res, const char *err)
{
    struct pgq_batch *b = ud;
    struct esmd_dests *d = b->d;
    d->work_queries--;
    if ((err || !res) && b->n > 1 && !d->closing &&
        strncmp(err ? err : "", "connection lost", 15) != 0) {
        for (size_t i = 0; i < b->n; i++)
            pgq_send(d, &b->dls[i], 1);
    } else if (err || !res) {
        char why[700];
        snprintf(why, sizeof(why), "pgqueue: %s", err ? err : "no result");
        for (size_t i = 0; i < b->n; i++)
            delivery_done(b->dls[i], DL_FAIL, why);
    } else {
        for (size_t i = 0; i < b->n; i++) {
            char id[24];
            snprintf(id, sizeof(id), "%lld", (long long)b->dls[i]->id);
            bool sent = false;
            for (int r = 0; r < PQntuples(res) && !sent; r++)
                sent = strcmp(PQgetvalue(res, r, 0), id) == 0;
            delivery_done(b->dls[i], sent ? DL_DELETED : DL_GONE, NULL);
        }
    }
    free(b->dls);
    free(b);
    stop_maybe_done(d);
}

/* dls: n deliveries of one pgqueue:// destination, in claim order (copied). */
static void pgq_send(struct esmd_dests *d, struct delivery **dls, size_t n)
{
    struct pgq_batch *b = esmd_xcalloc(1, sizeof(*b));
    b->d = d;
    b->n = n;
    b->dls = esmd_xcalloc(n, sizeof(*b->dls));
    memcpy(b->dls, dls, n * sizeof(*dls));
    struct esmd_buf ids = ESMD_BUF_INIT;
    for (size_t i = 0; i < n; i++)
        esmd_buf_printf(&ids, "%c%lld", i ? ',' : '{', (long long)dls[i]->id);
    esmd_buf_putc(&ids, '}');
    const char *params[] = {esmd_buf_cstr(&ids), d->token, dls[0]->dest->target};
    bool attrs = false;
    for (size_t i = 0; i < n; i++)
        attrs = attrs || dls[i]->attrs != NULL;
    if (attrs) /* message attributes are per send_batch() call: one call per row */
        work_query(d,
                   "WITH done AS (DELETE FROM esmd.outbox WHERE id = ANY($1::bigint[]) "
                   "AND lease_token = $2 RETURNING id, payload, attributes), "
                   "sent AS (SELECT count(*) FROM (SELECT esmd.send_batch($3, ARRAY[payload], "
                   "'0', attributes) FROM (SELECT * FROM done ORDER BY id) o) s) "
                   "SELECT done.id FROM done, sent",
                   3, params, pgq_done, b);
    else
        work_query(d,
                   "WITH done AS (DELETE FROM esmd.outbox WHERE id = ANY($1::bigint[]) "
                   "AND lease_token = $2 RETURNING id, payload), "
                   "sent AS (SELECT count(*) FROM esmd.send_batch($3, "
                   "(SELECT array_agg(payload ORDER BY id) FROM done))) "
                   "SELECT done.id FROM done, sent",
                   3, params, pgq_done, b);
    esmd_buf_free(&ids);
}

/* ---- destinations ---- */

static struct kafka_w *find_kw(struct esmd_dests *d, const char *name, size_t n)
{
    for (struct kafka_w *kw = d->kws; kw; kw = kw->next)
        if (strlen(kw->name) == n && memcmp(kw->name, name, n) == 0)
            return kw;
    return NULL;
}

static struct redis_w *find_rw(struct esmd_dests *d, const char *name, size_t n)
{
    for (struct redis_w *rw = d->rws; rw; rw = rw->next)
        if (strlen(rw->name) == n && memcmp(rw->name, name, n) == 0)
            return rw;
    return NULL;
}

/* Parses uri. Fills kind, target (malloc'd), kw / rw. Returns 0 or ESMD_EINVAL with err. */
static int dest_parse(const struct esmd_dests *dc, const char *uri, enum dest_kind *kind,
                      char **target, struct kafka_w **kw, struct redis_w **rw, char *err,
                      size_t errlen)
{
    struct esmd_dests *d = (struct esmd_dests *)dc;
    *target = NULL;
    *kw = NULL;
    *rw = NULL;
    if (!uri || !*uri) {
        snprintf(err, errlen, "empty destination URI");
        return ESMD_EINVAL;
    }
    if (!printable(uri)) {
        snprintf(err, errlen, "destination URI with spaces or control characters");
        return ESMD_EINVAL;
    }
    if (has_prefix(uri, "kafka://") || has_prefix(uri, "redis://")) {
        bool kafka = has_prefix(uri, "kafka://");
        const char *conn = uri + 8;
        const char *slash = strchr(conn, '/');
        if (!slash || slash == conn || !slash[1]) {
            snprintf(err, errlen, "%s must be %s://CONNECTION/%s", uri, kafka ? "kafka" : "redis",
                     kafka ? "TOPIC" : "STREAM");
            return ESMD_EINVAL;
        }
        size_t n = (size_t)(slash - conn);
        if (kafka) {
            if (!name_ok(slash + 1, 249)) {
                snprintf(err, errlen, "%s: a topic is 1 to 249 of A-Z a-z 0-9 . _ -", uri);
                return ESMD_EINVAL;
            }
            *kw = find_kw(d, conn, n);
        } else {
            *rw = find_rw(d, conn, n);
        }
        if (!*kw && !*rw) {
            snprintf(err, errlen,
                     "%s: connection \"%.*s\" is not a %s connection of the "
                     "configuration",
                     uri, (int)n, conn, kafka ? "kafka" : "redis");
            return ESMD_EINVAL;
        }
        *kind = kafka ? DEST_KAFKA : DEST_REDIS;
        *target = esmd_xstrdup(slash + 1);
        return 0;
    }
    if (has_prefix(uri, "pgqueue://")) {
        if (!name_ok(uri + 10, 64)) {
            snprintf(err, errlen, "%s must be pgqueue://QUEUE (QUEUE 1 to 64 of A-Z a-z 0-9 _ . -)",
                     uri);
            return ESMD_EINVAL;
        }
        *kind = DEST_PGQUEUE;
        *target = esmd_xstrdup(uri + 10);
        return 0;
    }
    if (has_prefix(uri, "http://") || has_prefix(uri, "https://")) {
        const char *host = strstr(uri, "://") + 3;
        if (!*host || *host == '/' || *host == '?' || *host == '#') {
            snprintf(err, errlen, "%s: an http(s) URL needs a host", uri);
            return ESMD_EINVAL;
        }
        *kind = DEST_HTTP;
        return 0;
    }
    if (has_prefix(uri, "function://")) {
        const char *name = uri + 11;
        for (size_t i = 0; i < d->nfunctions; i++) {
            if (strcmp(d->functions[i], name) == 0) {
                *kind = DEST_FUNCTION;
                *target = esmd_xstrdup(name);
                return 0;
            }
        }
        snprintf(err, errlen, "%s: function \"%s\" is not defined in the configuration", uri, name);
        return ESMD_EINVAL;
    }
    snprintf(err, errlen,
             "%s is not a destination URI (function://NAME, http(s)://..., "
             "kafka://CONNECTION/TOPIC, redis://CONNECTION/STREAM or pgqueue://QUEUE)",
             uri);
    return ESMD_EINVAL;
}

static struct dest *dest_find(struct esmd_dests *d, const char *uri)
{
    for (struct dest *dest = d->dests; dest; dest = dest->next)
        if (strcmp(dest->uri, uri) == 0)
            return dest;
    return NULL;
}

/* The destination for uri, created on first use. A URI this instance cannot write (a row of
 * another configuration) gets a destination with `unwritable` set: shown, never claimed. */
static struct dest *dest_get(struct esmd_dests *d, const char *uri)
{
    struct dest *dest = dest_find(d, uri);
    if (dest)
        return dest;
    dest = esmd_xcalloc(1, sizeof(*dest));
    dest->d = d;
    dest->uri = esmd_xstrdup(uri);
    dest->label = dest_label(uri);
    char err[512];
    if (dest_parse(d, uri, &dest->kind, &dest->target, &dest->kw, &dest->rw, err, sizeof(err)) !=
        0) {
        char why[600];
        snprintf(why, sizeof(why), "not written by this instance: %s", err);
        dest->unwritable = esmd_xstrdup(why);
    }
    switch (dest->kind) {
    case DEST_KAFKA:
        dest->cap = DESTS_CAP_KAFKA;
        break;
    case DEST_REDIS:
        dest->cap = DESTS_CAP_REDIS;
        break;
    case DEST_PGQUEUE:
        dest->cap = DESTS_CAP_PGQUEUE;
        break;
    case DEST_HTTP:
        dest->cap = DESTS_CAP_HTTP;
        break;
    case DEST_FUNCTION:
        dest->cap = DESTS_CAP_HTTP;
        break;
    }
    struct esmd_buf labels = ESMD_BUF_INIT;
    esmd_metric_labels(&labels, "destination", dest->label, NULL);
    dest->m_ok = esmd_series(d->m_ok, esmd_buf_cstr(&labels));
    dest->m_fail = esmd_series(d->m_fail, esmd_buf_cstr(&labels));
    dest->m_pending = esmd_series(d->m_pending, esmd_buf_cstr(&labels));
    esmd_buf_free(&labels);
    dest->more = true;
    struct dest **pp = &d->dests;
    while (*pp)
        pp = &(*pp)->next;
    *pp = dest;
    return dest;
}

static void dest_free(struct dest *dest)
{
    free(dest->uri);
    free(dest->label);
    free(dest->target);
    free(dest->unwritable);
    free(dest);
}

/* ---- deliveries ---- */

static void delivery_free(struct delivery *dl)
{
    struct esmd_dests *d = dl->d;
    if (dl->prev)
        dl->prev->next = dl->next;
    else
        d->dls = dl->next;
    if (dl->next)
        dl->next->prev = dl->prev;
    d->ndls--;
    if (dl->easy) {
        if (d->multi)
            curl_multi_remove_handle(d->multi, dl->easy);
        curl_easy_cleanup(dl->easy);
    }
    curl_slist_free_all(dl->hdrs);
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

/* The write of dl finished: counts it, records the outcome in the outbox, frees dl. */
static void delivery_done(struct delivery *dl, enum dl_result r, const char *err)
{
    struct esmd_dests *d = dl->d;
    struct dest *dest = dl->dest;
    if (d->closing) {
        delivery_free(dl);
        return;
    }
    dest->inflight--;
    double now = ev_now(d->loop);
    switch (r) {
    case DL_OK:
    case DL_DELETED:
        esmd_series_inc(dest->m_ok, 1);
        if (dest->failing) {
            ESMD_INFO(NULL, "destination %s: delivering again", dest->label);
            dest->more = true; /* its backlog can go now */
        }
        dest->failing = false;
        dest->failures = 0;
        dest->retry_at = 0;
        dest->last_error[0] = '\0';
        if (r == DL_OK) {
            if (d->ndel == d->capdel) {
                d->capdel = d->capdel ? d->capdel * 2 : 64;
                d->del_ids = esmd_xrealloc(d->del_ids, d->capdel * sizeof(*d->del_ids));
            }
            d->del_ids[d->ndel++] = dl->id;
            dests_kick(d, &d->del_kick);
        }
        break;
    case DL_GONE:
        ESMD_DEBUG(NULL, "destination %s: outbox row %lld was taken over by another instance",
                   dest->label, (long long)dl->id);
        break;
    case DL_FAIL: {
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

static void fn_sink_done(void *ud, bool ok, const char *err)
{
    struct delivery *dl = ud;
    delivery_done(dl, ok ? DL_OK : DL_FAIL, ok ? NULL : err ? err : "not stored");
}

static void delivery_start(struct esmd_dests *d, struct dest *dest, const PGresult *res, int row)
{
    struct delivery *dl = esmd_xcalloc(1, sizeof(*dl));
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
    switch (dest->kind) {
    case DEST_KAFKA:
        kw_write(dl);
        break;
    case DEST_REDIS:
        rw_write(dl);
        break;
    case DEST_PGQUEUE:
        /* sent by claim_done(), with the claim's other rows of this queue */
        break;
    case DEST_HTTP:
        http_write(dl);
        break;
    case DEST_FUNCTION:
        if (!d->fn_sink) {
            delivery_done(dl, DL_FAIL, "the async invocation queue is not running");
            break;
        }
        if (d->fn_sink(d->fn_sink_ud, dest->target, dl->payload, dl->len, fn_sink_done, dl) != 0)
            delivery_done(dl, DL_FAIL, "the async invocation queue refused the record");
        break;
    }
}

/* ---- the worker: claims, deletes ---- */

static void work_query(struct esmd_dests *d, const char *sql, int n, const char *const *params,
                       esmd_pg_cb cb, void *ud)
{
    d->work_queries++; /* every callback takes one off */
    if (!d->work_pg || esmd_pg_query(d->work_pg, sql, n, params, cb, ud) != 0)
        cb(ud, NULL, "closed"); /* only while closing */
}

static int dest_room(const struct dest *dest)
{
    int cap = dest->failing ? 1 : dest->cap;
    int room = cap - dest->inflight;
    return room > DESTS_CLAIM_MAX ? DESTS_CLAIM_MAX : room;
}

/* A claim with the rooms it asked for, to know which destinations may have more. */
struct claim {
    struct esmd_dests *d;
    size_t n;
    struct dest **dests;
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
        int *got = esmd_xcalloc(c->n ? c->n : 1, sizeof(*got));
        for (int r = 0; r < PQntuples(res); r++) {
            const char *uri = PQgetvalue(res, r, 1);
            struct dest *dest = NULL;
            size_t i;
            for (i = 0; i < c->n; i++) {
                if (strcmp(c->dests[i]->uri, uri) == 0) {
                    dest = c->dests[i];
                    break;
                }
            }
            if (!dest)
                continue; /* cannot happen: the claim names its destinations */
            got[i]++;
            delivery_start(d, dest, res, r);
        }
        /* the pgqueue:// rows of the claim, one statement per queue (d->dls is newest first) */
        struct delivery **group = esmd_xcalloc((size_t)PQntuples(res) + 1, sizeof(*group));
        for (size_t i = 0; i < c->n; i++) {
            if (c->dests[i]->kind != DEST_PGQUEUE || got[i] == 0)
                continue;
            size_t k = 0;
            for (struct delivery *dl = d->dls; dl; dl = dl->next)
                if (dl->dest == c->dests[i] && !dl->queued)
                    group[k++] = dl;
            for (size_t a = 0, z = k ? k - 1 : 0; a < z; a++, z--) {
                struct delivery *t = group[a];
                group[a] = group[z];
                group[z] = t;
            }
            for (size_t a = 0; a < k; a++)
                group[a]->queued = true;
            if (k > 0)
                pgq_send(d, group, k);
        }
        free(group);
        for (size_t i = 0; i < c->n; i++)
            if (got[i] >= c->rooms[i])
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
    for (struct dest *dest = d->dests; dest; dest = dest->next) {
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
    for (struct dest *dest = d->dests; dest; dest = dest->next) {
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
    for (struct dest *dest = d->dests; dest; dest = dest->next)
        dest->pending = 0;
    for (int r = 0; r < PQntuples(res); r++) {
        struct dest *dest = dest_get(d, PQgetvalue(res, r, 0));
        dest->pending = strtoll(PQgetvalue(res, r, 1), NULL, 10);
    }
    for (struct dest *dest = d->dests; dest; dest = dest->next) {
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
    /* idle redis connections close; rw_on_disconnect forgets them (or esmd_dests_free) */
    for (struct redis_w *rw = d->rws; rw; rw = rw->next)
        if (rw->ac && rw->outstanding == 0 && !rw->waiting)
            redisAsyncDisconnect(rw->ac);
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
    ev_init(&d->curl_tm, http_timer_cb);
    ev_init(&d->stop_check, stop_check_cb);
    ev_init(&d->stop_timeout, stop_timeout_cb);
    d->send_kick.data = d->claim_kick.data = d->poll_tm.data = d->count_tm.data = d;
    d->del_kick.data = d->curl_tm.data = d->stop_check.data = d->stop_timeout.data = d;

    for (size_t i = 0; i < cfg->nconnections; i++) {
        const struct esmd_conn_cfg *conn = &cfg->connections[i];
        if (!conn->name)
            continue;
        if (conn->type == ESMD_CONN_KAFKA) {
            struct kafka_w *kw = esmd_xcalloc(1, sizeof(*kw));
            kw->d = d;
            kw->name = esmd_xstrdup(conn->name);
            kw->servers = esmd_xstrdup(conn->bootstrap_servers ? conn->bootstrap_servers : "");
            kw->props.n = conn->properties.n;
            kw->props.items = esmd_xcalloc(conn->properties.n + 1, sizeof(*kw->props.items));
            for (size_t k = 0; k < conn->properties.n; k++) {
                kw->props.items[k].key = esmd_xstrdup(conn->properties.items[k].key);
                kw->props.items[k].value = esmd_xstrdup(conn->properties.items[k].value);
            }
            kw->pipefd[0] = kw->pipefd[1] = -1;
            ev_init(&kw->io, kw_io_cb);
            ev_init(&kw->tick, kw_tick_cb);
            kw->tick.repeat = 0.1;
            kw->io.data = kw->tick.data = kw;
            kw->next = d->kws;
            d->kws = kw;
        } else if (conn->type == ESMD_CONN_REDIS) {
            struct redis_w *rw = esmd_xcalloc(1, sizeof(*rw));
            rw->d = d;
            rw->name = esmd_xstrdup(conn->name);
            char uerr[200];
            if (esmd_redis_url_parse(conn->url ? conn->url : "", &rw->url, uerr, sizeof(uerr)) !=
                ESMD_OK)
                snprintf(rw->url_err, sizeof(rw->url_err), "connection %s: %s", rw->name, uerr);
            ev_init(&rw->watchdog, rw_watchdog_cb);
            rw->watchdog.repeat = 1.0;
            rw->watchdog.data = rw;
            rw->next = d->rws;
            d->rws = rw;
        }
    }
    d->functions = esmd_xcalloc(cfg->nfunctions + 1, sizeof(*d->functions));
    for (size_t i = 0; i < cfg->nfunctions; i++)
        if (cfg->functions[i].name)
            d->functions[d->nfunctions++] = esmd_xstrdup(cfg->functions[i].name);

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
    enum dest_kind kind;
    char *target;
    struct kafka_w *kw;
    struct redis_w *rw;
    char buf[512];
    if (!d) {
        snprintf(err, errlen, "no destinations");
        return ESMD_EINVAL;
    }
    int rc = dest_parse(d, uri, &kind, &target, &kw, &rw, buf, sizeof(buf));
    free(target);
    if (rc != 0 && err && errlen)
        snprintf(err, errlen, "%s", buf);
    return rc;
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
    d->fn_sink = sink;
    d->fn_sink_ud = ud;
    if (sink) {
        /* function:// rows waiting in the outbox can go now */
        for (struct dest *dest = d->dests; dest; dest = dest->next)
            if (dest->kind == DEST_FUNCTION)
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
    struct dest *dest = dest_find(d, uri);
    if (!dest || dest->unwritable) {
        if (esmd_dests_check(d, uri, err, sizeof(err)) != 0) {
            esmd_log_limited(ESMD_LOG_WARN, NULL, "dest-send", "destinations: %s", err);
            return ESMD_EINVAL;
        }
        dest = dest_get(d, uri);
    }
    if (!utf8_ok((const unsigned char *)(payload ? payload : ""), len)) {
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
    if (key && dest->kind == DEST_KAFKA) {
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
    if (attrs && dest->kind == DEST_PGQUEUE)
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
    for (struct kafka_w *kw = d->kws; kw; kw = kw->next)
        kw_close(kw);
    for (struct redis_w *rw = d->rws; rw; rw = rw->next) {
        ev_timer_stop(loop, &rw->watchdog);
        rw_fail_waiting(rw, "closed");
        if (rw->ac) {
            redisAsyncContext *ac = rw->ac;
            rw->ac = NULL;
            redisAsyncFree(ac); /* XADD callbacks get NULL replies */
        }
    }
    /* INSERTs in flight report "closed"; work statements end */
    esmd_pg_free(d->send_pg);
    d->send_pg = NULL;
    esmd_pg_free(d->work_pg);
    d->work_pg = NULL;
    while (d->dls)
        delivery_free(d->dls);
    if (d->multi) {
        curl_multi_cleanup(d->multi);
        d->multi = NULL;
    }
    ev_timer_stop(loop, &d->curl_tm);
    while (d->socks) {
        struct http_sock *sock = d->socks;
        d->socks = sock->next;
        ev_io_stop(loop, &sock->io);
        free(sock);
    }
    d->depth--;
    if (d->depth > 0) {
        /* from inside a user callback: the rest is freed when it returns */
        d->free_pending = true;
        d->closing = true;
        return;
    }
    while (d->dests) {
        struct dest *dest = d->dests;
        d->dests = dest->next;
        dest_free(dest);
    }
    while (d->kws) {
        struct kafka_w *kw = d->kws;
        d->kws = kw->next;
        for (size_t i = 0; i < kw->props.n; i++) {
            free(kw->props.items[i].key);
            free(kw->props.items[i].value);
        }
        free(kw->props.items);
        free(kw->name);
        free(kw->servers);
        free(kw);
    }
    while (d->rws) {
        struct redis_w *rw = d->rws;
        d->rws = rw->next;
        free(rw->name);
        esmd_redis_url_free(&rw->url);
        free(rw);
    }
    for (size_t i = 0; i < d->nfunctions; i++)
        free(d->functions[i]);
    free(d->functions);
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
    for (struct dest *dest = d ? d->dests : NULL; dest; dest = dest->next) {
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
