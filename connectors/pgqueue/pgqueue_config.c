/* The Postgres queue source's configuration (docs/configuration.md "source"; docs/pgqueue.md): its
 * key table and checks, read by src/config.c through esmd_connector_pgqueue. */
#include "pgqueue_private.h"

#include <libpq-fe.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>

#define MAP struct esmd_mapping_cfg
#define QUEUE_NAME "a queue name (" ESMD_CFG_NAME_RULE ")"

/* libpq's own parser judges the connection string, as when the connector connects. Its message
 * is not repeated: it quotes the string, which may hold a password. */
static int check_conninfo(const char *s, char *err, size_t errlen)
{
    char *msg = NULL;
    PQconninfoOption *opts = PQconninfoParse(s, &msg);
    bool ok = opts != NULL;
    PQconninfoFree(opts);
    PQfreemem(msg);
    if (ok)
        return 0;
    snprintf(err, errlen, "libpq cannot parse it (see libpq's \"Connection Strings\")");
    return ESMD_EINVAL;
}

bool esmd_pgqueue_is_fifo(const char *name)
{
    size_t n = strlen(name);
    return n > 5 && strcmp(name + n - 5, ".fifo") == 0;
}

const struct esmd_cfg_key esmd_pgqueue_source_keys[] = {
    ESMD_K_CHECK("pgqueue", MAP, pgqueue.queue, ESMD_CFG_REQUIRED, esmd_config_valid_name,
                 QUEUE_NAME),
    ESMD_K_PARSE("connection", MAP, pgqueue.connection, ESMD_CFG_NONEMPTY, check_conninfo,
                 "a usable Postgres connection string"),
    ESMD_K_DUR("visibility_timeout", MAP, pgqueue.visibility_timeout_ms, ESMD_CFG_VISIBILITY_MIN_MS,
               ESMD_CFG_VISIBILITY_MAX_MS, 0, ESMD_CFG_VISIBILITY_DEFAULT_MS),
    ESMD_K_INT("max_receive_count", MAP, pgqueue.max_receive_count, 1, 1000, 0, 0),
    ESMD_K_CHECK("dead_letter_queue", MAP, pgqueue.dead_letter_queue, 0, esmd_config_valid_name,
                 QUEUE_NAME),
    ESMD_K_INT("maximum_concurrency", MAP, pgqueue.maximum_concurrency, 2, 1000, 0, 2),
    {0},
};

void esmd_pgqueue_cfg_check(struct esmd_mapping_cfg *map, struct esmd_cfg_check *chk)
{
    const struct esmd_pgqueue_source_cfg *q = &map->pgqueue;
    bool dlq = esmd_cfg_state(chk, "source.dead_letter_queue") != ESMD_CFG_ABSENT;
    if (dlq && esmd_cfg_state(chk, "source.max_receive_count") == ESMD_CFG_ABSENT)
        esmd_cfg_error(chk, "source.dead_letter_queue",
                       "dead_letter_queue needs max_receive_count (the receives before a message "
                       "moves there)");
    else if (dlq && q->queue && q->dead_letter_queue && !strcmp(q->queue, q->dead_letter_queue))
        esmd_cfg_error(chk, "source.dead_letter_queue",
                       "dead_letter_queue must not be the queue itself");

    /* FIFO queues (docs/pgqueue.md#fifo-queues): as SQS, the dead-letter queue is of the same
     * kind; as Lambda, no batching window (a FIFO claim is exactly one batch). */
    bool fifo = q->queue && esmd_pgqueue_is_fifo(q->queue);
    if (dlq && q->queue && q->dead_letter_queue &&
        esmd_pgqueue_is_fifo(q->dead_letter_queue) != fifo)
        esmd_cfg_error(chk, "source.dead_letter_queue",
                       fifo ? "the dead_letter_queue of a FIFO queue must be a FIFO queue (a name "
                              "ending in \".fifo\"), as in SQS"
                            : "the dead_letter_queue of a standard queue must be a standard queue "
                              "(a name not ending in \".fifo\"), as in SQS");
    if (fifo && esmd_cfg_state(chk, "maximum_batching_window") != ESMD_CFG_ABSENT &&
        map->maximum_batching_window_ms > 0)
        esmd_cfg_error(chk, "maximum_batching_window",
                       "a FIFO queue (%s) takes no maximum_batching_window, as in Lambda: each "
                       "claim of its message groups is sent as one batch at once",
                       q->queue);

    /* Lambda's SQS mappings have no stream retry controls: failed messages come back after the
     * visibility timeout and go to the dead-letter queue after max_receive_count receives. */
    static const char *const stream_only[] = {"maximum_retry_attempts", "maximum_record_age",
                                              "bisect_batch_on_function_error", "on_failure"};
    for (size_t i = 0; i < ESMD_ARRAY_LEN(stream_only); i++)
        if (esmd_cfg_state(chk, stream_only[i]) != ESMD_CFG_ABSENT)
            esmd_cfg_error(chk, stream_only[i],
                           "%s is for stream sources (kafka, redis); a pgqueue source retries "
                           "through its visibility_timeout and max_receive_count, and "
                           "dead-letters to its dead_letter_queue",
                           stream_only[i]);

    /* A redrive policy, as SQS's, names both how many receives and where to. */
    if (q->max_receive_count > 0 && !q->dead_letter_queue)
        esmd_cfg_error(chk, "source.max_receive_count",
                       "max_receive_count needs dead_letter_queue (where a message goes once it "
                       "has been received max_receive_count times)");
    /* As Lambda refuses an SQS queue whose visibility timeout is below the function timeout. */
    if (map->fn && map->fn->timeout_ms > q->visibility_timeout_ms) {
        bool set = esmd_cfg_state(chk, "source.visibility_timeout") != ESMD_CFG_ABSENT;
        char a[32], b[32];
        esmd_cfg_error(chk, "source.visibility_timeout",
                       "visibility_timeout (%s%s) must not be shorter than the timeout of function "
                       "\"%s\" (%s)",
                       esmd_config_fmt_duration(q->visibility_timeout_ms, a),
                       set ? "" : ", the default", map->fn->name,
                       esmd_config_fmt_duration(map->fn->timeout_ms, b));
    }
}
