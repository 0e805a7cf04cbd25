/* pgqueue://QUEUE destinations (src/dest_private.h): esmd's Postgres queue, in the outbox's
 * own database. The rows of one claim for one queue are deleted from the outbox and given to
 * esmd.send_batch() in one statement, so the queue gets them exactly once (a row whose lease
 * was lost is neither deleted nor sent). If the statement fails (a message over the queue's
 * size limit, say), each row is tried alone, so only the bad one fails. */
#include "dest_private.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct pgq_batch {
    struct esmd_dests *d;
    struct esmd_delivery **dls;
    size_t n;
};

static void pgq_send(struct esmd_dests *d, struct esmd_delivery *const *dls, size_t n);

static void pgq_done(void *ud, const PGresult *res, const char *err)
{
    struct pgq_batch *b = ud;
    struct esmd_dests *d = b->d;
    if ((err || !res) && b->n > 1 && !esmd_outbox_closing(d) &&
        strncmp(err ? err : "", "connection lost", 15) != 0) {
        for (size_t i = 0; i < b->n; i++)
            pgq_send(d, &b->dls[i], 1);
    } else if (err || !res) {
        char why[700];
        snprintf(why, sizeof(why), "pgqueue: %s", err ? err : "no result");
        for (size_t i = 0; i < b->n; i++)
            esmd_outbox_done(b->dls[i], ESMD_DEST_FAIL, why);
    } else {
        for (size_t i = 0; i < b->n; i++) {
            char id[24];
            snprintf(id, sizeof(id), "%lld", (long long)b->dls[i]->id);
            bool sent = false;
            for (int r = 0; r < PQntuples(res) && !sent; r++)
                sent = strcmp(PQgetvalue(res, r, 0), id) == 0;
            esmd_outbox_done(b->dls[i], sent ? ESMD_DEST_DELETED : ESMD_DEST_GONE, NULL);
        }
    }
    free(b->dls);
    free(b);
}

/* dls: n deliveries of one pgqueue:// destination, in claim order (copied). */
static void pgq_send(struct esmd_dests *d, struct esmd_delivery *const *dls, size_t n)
{
    struct pgq_batch *b = esmd_xcalloc(1, sizeof(*b));
    b->d = d;
    b->n = n;
    b->dls = esmd_xcalloc(n, sizeof(*b->dls));
    memcpy(b->dls, dls, n * sizeof(*dls));
    struct esmd_pg_array ids;
    esmd_pg_array_start(&ids, ESMD_PG_OID_INT8);
    for (size_t i = 0; i < n; i++)
        esmd_pg_array_add_int8(&ids, dls[i]->id);
    esmd_pg_array_finish(&ids);
    const char *params[] = {ids.buf.data, esmd_outbox_token(d), dls[0]->dest->target};
    const int lengths[] = {(int)ids.buf.len, 0, 0}, formats[] = {1, 0, 0};
    bool attrs = false;
    for (size_t i = 0; i < n; i++)
        attrs = attrs || dls[i]->attrs != NULL;
    if (attrs) /* message attributes are per send_batch() call: one call per row */
        esmd_outbox_query(
            d,
            "WITH done AS (DELETE FROM esmd.outbox WHERE id = ANY($1::bigint[]) "
            "AND lease_token = $2 RETURNING id, payload, attributes), "
            "sent AS (SELECT count(*) FROM (SELECT esmd.send_batch($3, ARRAY[payload], "
            "'0', attributes) FROM (SELECT * FROM done ORDER BY id) o) s) "
            "SELECT done.id FROM done, sent",
            3, params, lengths, formats, pgq_done, b);
    else
        esmd_outbox_query(d,
                          "WITH done AS (DELETE FROM esmd.outbox WHERE id = ANY($1::bigint[]) "
                          "AND lease_token = $2 RETURNING id, payload), "
                          "sent AS (SELECT count(*) FROM esmd.send_batch($3, "
                          "(SELECT array_agg(payload ORDER BY id) FROM done))) "
                          "SELECT done.id FROM done, sent",
                          3, params, lengths, formats, pgq_done, b);
    esmd_buf_free(&ids.buf);
}
/* ---- the writer ---- */

static int pgqueue_parse(const struct esmd_dests_names *names, const char *uri,
                         struct esmd_dest_uri *out, char *err, size_t errlen)
{
    ESMD_UNUSED(names);
    const char *queue = uri + strlen("pgqueue://");
    if (!esmd_dest_name_ok(queue, 64, "_.-")) {
        snprintf(err, errlen, "%s must be pgqueue://QUEUE (QUEUE " ESMD_DEST_NAME_RULE ")", uri);
        return ESMD_EINVAL;
    }
    out->target = esmd_xstrdup(queue);
    return 0;
}

static void pgqueue_write(struct esmd_delivery *const *dls, size_t n)
{
    pgq_send(dls[0]->d, dls, n);
}

const struct esmd_dest_writer esmd_dest_pgqueue = {
    .schemes = {"pgqueue://"},
    .form = "pgqueue://QUEUE",
    .cap = 256,
    .takes_attrs = true,
    .parse = pgqueue_parse,
    .write = pgqueue_write,
};
