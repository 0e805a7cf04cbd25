/* kafka://CONNECTION/TOPIC destinations (src/dest_private.h): one idempotent librdkafka
 * producer per connection, made on first use; a row is written when its delivery report comes
 * without error. Delivery reports, errors and logs come through the producer's main queue,
 * served from the loop: the client is set up as the Kafka source's consumer is
 * (include/esmd/kafka_client.h: conf from the connection's properties, log forwarding, the
 * queue-event wake-up). */
#include "dest_private.h"
#include "esmd/kafka_client.h"
#include "esmd/log.h"

#include <ev.h>
#include <librdkafka/rdkafka.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define DESTS_KAFKA_POLL_MAX 64

/* One producer per connection. */
struct kafka_w {
    struct kafka_w *next;
    const struct esmd_dest_env *env;
    const struct esmd_conn_cfg *conn; /* borrowed from the configuration */
    const char *name;                 /* conn->name */
    rd_kafka_t *rk;
    rd_kafka_queue_t *mainq;
    struct esmd_kafka_wake wake; /* the main queue's wake-up */
    ev_timer tick;
    int outstanding; /* messages produced, delivery report not served yet */
    bool fatal;      /* the producer hit a fatal error: replaced before the next message */
};

struct kafka_state {
    const struct esmd_dest_env *env;
    struct kafka_w *kws;
};

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
    esmd_kafka_wake_clear(&kw->wake);
    int i = 0;
    while (kw->rk && i++ < DESTS_KAFKA_POLL_MAX && rd_kafka_poll(kw->rk, 0) > 0)
        ;
    if (kw->rk && i > DESTS_KAFKA_POLL_MAX && !ev_is_active(&kw->tick))
        ev_timer_again(kw->env->loop, &kw->tick); /* more to serve: the tick goes on */
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
    struct esmd_delivery *dl = rkm->_private;
    ESMD_UNUSED(rk);
    if (kw->outstanding > 0)
        kw->outstanding--;
    if (!dl)
        return;
    dl->wp = NULL;
    if (rkm->err) {
        char msg[300];
        snprintf(msg, sizeof(msg), "kafka %s: %s", rd_kafka_err2name(rkm->err),
                 rd_kafka_err2str(rkm->err));
        esmd_outbox_done(dl, ESMD_DEST_FAIL, msg);
    } else {
        esmd_outbox_done(dl, ESMD_DEST_OK, NULL);
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
    esmd_kafka_log(NULL, level, fac, buf);
}

/* The connection's properties a producer takes: not a consumer's, not what esmd sets. */
static enum esmd_kafka_prop_use kw_prop_use(const char *key, void *ud)
{
    const struct kafka_w *kw = ud;
    if (kafka_consumer_only(key))
        return ESMD_KAFKA_PROP_SKIP;
    if (kafka_forced(key)) {
        ESMD_WARN(NULL,
                  "connection %s: kafka property %s is set by esmd for destinations; ignored by "
                  "the destination producer",
                  kw->name, key);
        return ESMD_KAFKA_PROP_SKIP;
    }
    return ESMD_KAFKA_PROP_SET;
}

/* Creates the producer. 0, or ESMD_EIO / ESMD_EINVAL with err. */
static int kw_open(struct kafka_w *kw, char *err, size_t errlen)
{
    char client_id[300], timeout[32];
    snprintf(client_id, sizeof(client_id), "esmd-%s-destinations", kw->env->instance_id);
    snprintf(timeout, sizeof(timeout), "%d", ESMD_DEST_WRITE_TIMEOUT_MS);
    const char *const defaults[][2] = {
        {"bootstrap.servers", kw->conn->bootstrap_servers ? kw->conn->bootstrap_servers : ""},
        {"client.id", client_id},
        {"enable.idempotence", "true"},
        {"acks", "all"},
        {"message.timeout.ms", timeout},
        {"linger.ms", "5"},
    };
    rd_kafka_conf_t *conf = esmd_kafka_conf_new(defaults, ESMD_ARRAY_LEN(defaults), kw->conn,
                                                kw_prop_use, kw, err, errlen);
    if (!conf)
        return ESMD_EINVAL;
    rd_kafka_conf_set_opaque(conf, kw);
    rd_kafka_conf_set_dr_msg_cb(conf, kw_on_dr);
    rd_kafka_conf_set_error_cb(conf, kw_on_error);
    rd_kafka_conf_set_log_cb(conf, kw_on_log);
    char errstr[400];
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof(errstr));
    if (!rk) {
        snprintf(err, errlen, "kafka producer for connection %s: %s", kw->name, errstr);
        rd_kafka_conf_destroy(conf);
        return ESMD_EINVAL;
    }
    rd_kafka_queue_t *mainq = rd_kafka_queue_get_main(rk);
    if (esmd_kafka_wake_start(&kw->wake, rk, mainq, errstr, sizeof(errstr)) != ESMD_OK) {
        snprintf(err, errlen, "kafka producer: %s", errstr);
        rd_kafka_queue_destroy(mainq);
        rd_kafka_destroy(rk);
        return ESMD_EIO;
    }
    kw->rk = rk;
    kw->mainq = mainq;
    kw->fatal = false;
    ESMD_INFO(NULL, "destination producer for connection %s started (%s)", kw->name,
              rd_kafka_name(rk));
    return 0;
}

/* Destroys the producer; messages not yet reported fail ("producer closed"). */
static void kw_close(struct kafka_w *kw)
{
    struct ev_loop *loop = kw->env->loop;
    if (kw->rk) {
        rd_kafka_purge(kw->rk, RD_KAFKA_PURGE_F_QUEUE | RD_KAFKA_PURGE_F_INFLIGHT);
        rd_kafka_poll(kw->rk, 0); /* the purged messages' reports */
        esmd_kafka_wake_stop(&kw->wake, kw->mainq, NULL);
        rd_kafka_queue_destroy(kw->mainq);
        kw->mainq = NULL;
        rd_kafka_destroy(kw->rk);
        kw->rk = NULL;
    }
    esmd_kafka_wake_stop(&kw->wake, NULL, NULL);
    ev_timer_stop(loop, &kw->tick);
    esmd_kafka_wake_close(&kw->wake);
    kw->outstanding = 0;
    /* reports librdkafka did not serve */
    struct esmd_delivery *dl = esmd_outbox_deliveries(kw->env->d), *next;
    for (; dl; dl = next) {
        next = dl->next;
        if (dl->wp == kw) {
            dl->wp = NULL;
            esmd_outbox_done(dl, ESMD_DEST_FAIL,
                             "kafka producer closed before the delivery report");
        }
    }
}

static void kw_write(struct esmd_delivery *dl)
{
    struct kafka_w *kw = dl->dest->conn;
    char err[512];
    if (kw->rk && kw->fatal)
        kw_close(kw);
    if (!kw->rk && kw_open(kw, err, sizeof(err)) != 0) {
        esmd_outbox_done(dl, ESMD_DEST_FAIL, err);
        return;
    }
    rd_kafka_resp_err_t e = rd_kafka_producev(
        kw->rk, RD_KAFKA_V_TOPIC(dl->dest->target), RD_KAFKA_V_VALUE(dl->payload, dl->len),
        RD_KAFKA_V_KEY(dl->key, dl->keylen), RD_KAFKA_V_MSGFLAGS(0), RD_KAFKA_V_OPAQUE(dl),
        RD_KAFKA_V_END);
    if (e) {
        snprintf(err, sizeof(err), "kafka produce: %s", rd_kafka_err2str(e));
        esmd_outbox_done(dl, ESMD_DEST_FAIL, err);
        return;
    }
    dl->wp = kw;
    if (kw->outstanding++ == 0 && !ev_is_active(&kw->tick))
        ev_timer_again(kw->env->loop, &kw->tick); /* safety net for a missed wake-up */
}

/* ---- the writer ---- */

static int kafka_parse(const struct esmd_dests_names *names, const char *uri,
                       struct esmd_dest_uri *out, char *err, size_t errlen)
{
    const char *topic = esmd_dest_parse_conn(names, uri, ESMD_CONN_KAFKA, out, err, errlen);
    if (!topic)
        return ESMD_EINVAL;
    if (!esmd_dest_name_ok(topic, 249, "._-") || strcmp(topic, ".") == 0 ||
        strcmp(topic, "..") == 0) {
        snprintf(err, errlen, "%s must be kafka://CONNECTION/TOPIC (" ESMD_DEST_TOPIC_RULE ")",
                 uri);
        return ESMD_EINVAL;
    }
    out->target = esmd_xstrdup(topic);
    return 0;
}

static void *kafka_open(const struct esmd_dest_env *env)
{
    struct kafka_state *st = esmd_xcalloc(1, sizeof(*st));
    st->env = env;
    return st;
}

static void *kafka_bind(void *state, const struct esmd_dest_uri *u)
{
    struct kafka_state *st = state;
    for (struct kafka_w *kw = st->kws; kw; kw = kw->next)
        if (kw->conn == u->conn)
            return kw;
    struct kafka_w *kw = esmd_xcalloc(1, sizeof(*kw));
    kw->env = st->env;
    kw->conn = u->conn;
    kw->name = u->conn->name;
    esmd_kafka_wake_init(&kw->wake, st->env->loop, kw_io_cb, kw);
    ev_init(&kw->tick, kw_tick_cb);
    kw->tick.repeat = 0.1;
    kw->tick.data = kw;
    kw->next = st->kws;
    st->kws = kw;
    return kw;
}

static void kafka_write(struct esmd_delivery *const *dls, size_t n)
{
    for (size_t i = 0; i < n; i++)
        kw_write(dls[i]);
}

static void kafka_close(void *state)
{
    struct kafka_state *st = state;
    for (struct kafka_w *kw = st->kws; kw; kw = kw->next)
        kw_close(kw);
}

static void kafka_free(void *state)
{
    struct kafka_state *st = state;
    while (st->kws) {
        struct kafka_w *kw = st->kws;
        st->kws = kw->next;
        free(kw);
    }
    free(st);
}

const struct esmd_dest_writer esmd_dest_kafka = {
    .schemes = {"kafka://"},
    .form = "kafka://CONNECTION/TOPIC",
    .cap = 512,
    .takes_key = true,
    .parse = kafka_parse,
    .open = kafka_open,
    .bind = kafka_bind,
    .write = kafka_write,
    .close = kafka_close,
    .free = kafka_free,
};
