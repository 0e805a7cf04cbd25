/* Kafka clients on the loop (include/esmd/kafka_client.h). */
#include "esmd/kafka_client.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

static int conf_set(rd_kafka_conf_t *conf, const char *key, const char *value, char *err,
                    size_t errlen)
{
    char errstr[256];
    if (rd_kafka_conf_set(conf, key, value, errstr, sizeof(errstr)) != RD_KAFKA_CONF_OK) {
        snprintf(err, errlen, "kafka property %s: %s", key, errstr);
        return ESMD_EINVAL;
    }
    return ESMD_OK;
}

rd_kafka_conf_t *esmd_kafka_conf_new(const char *const (*defaults)[2], size_t ndefaults,
                                     const struct esmd_conn_cfg *conn, esmd_kafka_prop_fn use,
                                     void *ud, char *err, size_t errlen)
{
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    if (conf_set(conf, "log.queue", "true", err, errlen) != ESMD_OK)
        goto fail;
    for (size_t i = 0; i < ndefaults; i++)
        if (conf_set(conf, defaults[i][0], defaults[i][1], err, errlen) != ESMD_OK)
            goto fail;
    const struct esmd_kvlist *props = &conn->properties;
    for (size_t i = 0; i < props->n; i++) {
        const char *key = props->items[i].key;
        switch (use ? use(key, ud) : ESMD_KAFKA_PROP_SET) {
        case ESMD_KAFKA_PROP_SKIP:
            continue;
        case ESMD_KAFKA_PROP_REFUSE:
            snprintf(err, errlen,
                     "connection %s: kafka property %s is set by esmd and cannot be overridden",
                     conn->name ? conn->name : "?", key);
            goto fail;
        case ESMD_KAFKA_PROP_SET:
            break;
        }
        if (conf_set(conf, key, props->items[i].value, err, errlen) != ESMD_OK)
            goto fail;
    }
    return conf;
fail:
    rd_kafka_conf_destroy(conf);
    return NULL;
}

void esmd_kafka_log(const struct esmd_log_ctx *ctx, int level, const char *fac, const char *buf)
{
    if (level <= 3)
        esmd_log_limited(ESMD_LOG_ERROR, ctx, "kafka-log-error", "librdkafka %s: %s", fac, buf);
    else if (level == 4)
        esmd_log_limited(ESMD_LOG_WARN, ctx, "kafka-log-warn", "librdkafka %s: %s", fac, buf);
    else if (level <= 6)
        esmd_log(ESMD_LOG_INFO, ctx, "librdkafka %s: %s", fac, buf);
    else
        esmd_log(ESMD_LOG_DEBUG, ctx, "librdkafka %s: %s", fac, buf);
}

void esmd_kafka_wake_init(struct esmd_kafka_wake *w, struct ev_loop *loop,
                          void (*cb)(struct ev_loop *loop, ev_io *io, int revents), void *data)
{
    w->loop = loop;
    w->pipefd[0] = w->pipefd[1] = -1;
    ev_io_init(&w->io, cb, -1, EV_READ);
    w->io.data = data;
}

int esmd_kafka_wake_start(struct esmd_kafka_wake *w, rd_kafka_t *rk, rd_kafka_queue_t *q, char *err,
                          size_t errlen)
{
    if (pipe2(w->pipefd, O_NONBLOCK | O_CLOEXEC) != 0) {
        snprintf(err, errlen, "pipe: %s", strerror(errno));
        w->pipefd[0] = w->pipefd[1] = -1;
        return ESMD_EIO;
    }
    rd_kafka_set_log_queue(rk, NULL); /* logs -> the main queue, served on the loop */
    rd_kafka_queue_io_event_enable(q, w->pipefd[1], "1", 1);
    ev_io_set(&w->io, w->pipefd[0], EV_READ);
    ev_io_start(w->loop, &w->io);
    return ESMD_OK;
}

void esmd_kafka_wake_move(struct esmd_kafka_wake *w, rd_kafka_queue_t *from, rd_kafka_queue_t *to)
{
    rd_kafka_queue_io_event_enable(from, -1, NULL, 0);
    rd_kafka_queue_io_event_enable(to, w->pipefd[1], "1", 1);
}

void esmd_kafka_wake_clear(struct esmd_kafka_wake *w)
{
    char junk[256];
    if (w->pipefd[0] >= 0)
        while (read(w->pipefd[0], junk, sizeof(junk)) > 0)
            ;
}

void esmd_kafka_wake_stop(struct esmd_kafka_wake *w, rd_kafka_queue_t *q1, rd_kafka_queue_t *q2)
{
    if (q1)
        rd_kafka_queue_io_event_enable(q1, -1, NULL, 0);
    if (q2)
        rd_kafka_queue_io_event_enable(q2, -1, NULL, 0);
    ev_io_stop(w->loop, &w->io);
}

void esmd_kafka_wake_close(struct esmd_kafka_wake *w)
{
    for (int i = 0; i < 2; i++) {
        if (w->pipefd[i] >= 0)
            close(w->pipefd[i]);
        w->pipefd[i] = -1;
    }
}
