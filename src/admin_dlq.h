/* The dead-letter routes of the admin API (docs/admin.md "Dead letters", docs/async.md): list,
 * show and re-drive the async dead letters held in a pgqueue:// queue (esmd.queue_messages),
 * back into esmd.async_events. Internal to src/admin.c, which creates it on its own Postgres
 * connection and registers the routes. Everything runs on the loop thread. */
#ifndef ESMD_ADMIN_DLQ_H
#define ESMD_ADMIN_DLQ_H

#include "esmd/config.h"
#include "esmd/http.h"

struct esmd_admin_auth;
struct esmd_admin_dlq;
struct esmd_pg;

#define ESMD_ADMIN_DLQ_PATH "/admin/dead-letters"

/* cfg, auth (NULL: loopback only) and pg are borrowed and must outlive it. */
struct esmd_admin_dlq *esmd_admin_dlq_new(const struct esmd_config *cfg,
                                          const struct esmd_admin_auth *auth, struct esmd_pg *pg);
/* A reload: the functions and queues listed, and the functions a redrive may name, are cfg's
 * from now on (borrowed as esmd_admin_dlq_new's). */
void esmd_admin_dlq_set_config(struct esmd_admin_dlq *d, const struct esmd_config *cfg);
/* Registers GET ESMD_ADMIN_DLQ_PATH/... and POST ESMD_ADMIN_DLQ_PATH/.../redrive. 0 or
 * ESMD_EINVAL. */
int esmd_admin_dlq_routes(struct esmd_admin_dlq *d, struct esmd_http *http,
                          esmd_http_limit_fn limit) ESMD_MUST_CHECK;
/* From now on, queries answered (esmd_pg_free) give 503. */
void esmd_admin_dlq_closing(struct esmd_admin_dlq *d);
/* Frees; call after the connection is freed (its queued queries have been answered). NULL ok. */
void esmd_admin_dlq_free(struct esmd_admin_dlq *d);

#endif
