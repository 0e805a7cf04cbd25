/* Kafka clients on the loop, shared by the Kafka source (connectors/kafka, a consumer) and the
 * kafka:// destination writer (src/dest_kafka.c, a producer), as Fluent Bit's flb_kafka.c is
 * by in_kafka and out_kafka: the librdkafka conf made from a connection's `properties`, the
 * log lines forwarded to esmd's log on the loop thread, and the queue-event wake-up.
 *
 * librdkafka's callbacks (logs, errors, delivery reports, rebalances) are served from one queue
 * on the loop thread: the client's logs go to its main queue (log.queue=true and
 * rd_kafka_set_log_queue(rk, NULL)), a consumer's main queue is forwarded to its consumer
 * queue (rd_kafka_poll_set_consumer), and that queue writes a byte to a non-blocking pipe when
 * it goes from empty to non-empty (rd_kafka_queue_io_event_enable); an ev_io on the pipe's read
 * end wakes the loop, which empties the pipe and serves the queue (bounded per turn: the owner
 * re-arms itself when more is queued, the pipe fires on empty -> non-empty only). */
#ifndef ESMD_KAFKA_CLIENT_H
#define ESMD_KAFKA_CLIENT_H

#include "esmd/common.h"
#include "esmd/config.h"
#include "esmd/log.h"

#include <ev.h>
#include <librdkafka/rdkafka.h>

/* What a client does with one of its connection's properties. */
enum esmd_kafka_prop_use {
    ESMD_KAFKA_PROP_SET,    /* given to librdkafka */
    ESMD_KAFKA_PROP_SKIP,   /* left out */
    ESMD_KAFKA_PROP_REFUSE, /* the conf is not made: esmd sets it and it cannot be overridden */
};
typedef enum esmd_kafka_prop_use (*esmd_kafka_prop_fn)(const char *key, void *ud);

/* A new conf: log.queue=true, then the defaults (ndefaults key/value pairs, esmd's settings),
 * then conn's properties, each as use(key, ud) says (use NULL: every one is set). Returns the
 * conf (caller owns it: rd_kafka_new() takes it, or rd_kafka_conf_destroy()), or NULL with err
 * ("kafka property KEY: <librdkafka's reason>", or for a refused one "connection NAME: kafka
 * property KEY is set by esmd and cannot be overridden"). Strings are copied. */
rd_kafka_conf_t *esmd_kafka_conf_new(const char *const (*defaults)[2], size_t ndefaults,
                                     const struct esmd_conn_cfg *conn, esmd_kafka_prop_fn use,
                                     void *ud, char *err, size_t errlen);

/* One librdkafka log line into esmd's log, scoped by ctx (NULL ok): levels 0-3 as errors and 4
 * as warnings (both rate-limited), 5-6 as info, 7 as debug. For the owner's log callback,
 * which librdkafka calls on the loop thread when the queue is served. */
void esmd_kafka_log(const struct esmd_log_ctx *ctx, int level, const char *fac, const char *buf);

/* The wake-up of a client's queue. Embedded in its owner; init before anything else. */
struct esmd_kafka_wake {
    struct ev_loop *loop;
    int pipefd[2]; /* -1 when closed */
    ev_io io;      /* the read end; io.data is the owner's */
};

/* No pipe yet; io set to call cb with io.data = data. */
void esmd_kafka_wake_init(struct esmd_kafka_wake *w, struct ev_loop *loop,
                          void (*cb)(struct ev_loop *loop, ev_io *io, int revents), void *data);
/* Sends rk's logs to its main queue (served with q), makes the pipe, has q write to it, and
 * starts the watcher. q: the queue the owner serves (the main queue, or a consumer's queue
 * after rd_kafka_poll_set_consumer). 0, or ESMD_EIO with err (nothing started). */
int esmd_kafka_wake_start(struct esmd_kafka_wake *w, rd_kafka_t *rk, rd_kafka_queue_t *q, char *err,
                          size_t errlen) ESMD_MUST_CHECK;
/* The wake-ups come from `to` instead of `from` (a consumer's close queue, to which the
 * consumer queue is forwarded: only the last queue of a chain may signal). */
void esmd_kafka_wake_move(struct esmd_kafka_wake *w, rd_kafka_queue_t *from, rd_kafka_queue_t *to);
/* Empties the pipe: call before serving the queue. */
void esmd_kafka_wake_clear(struct esmd_kafka_wake *w);
/* No more wake-ups from q1 and q2 (NULL ok), and the watcher stops; the pipe stays open. */
void esmd_kafka_wake_stop(struct esmd_kafka_wake *w, rd_kafka_queue_t *q1, rd_kafka_queue_t *q2);
/* Closes the pipe (after the client is destroyed). Idempotent. */
void esmd_kafka_wake_close(struct esmd_kafka_wake *w);

#endif
