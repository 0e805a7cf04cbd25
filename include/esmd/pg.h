/* PostgreSQL: migrations (blocking, before the loop runs) and an asynchronous connection on the
 * loop (libpq non-blocking: PQconnectStartParams/PQconnectPoll, PQsendQueryParams, PQflush,
 * PQconsumeInput/PQisBusy/PQgetResult), reconnecting with backoff when the server goes away. */
#ifndef ESMD_PG_H
#define ESMD_PG_H

#include "esmd/buf.h"
#include "esmd/common.h"
#include <libpq-fe.h>

struct ev_loop;
struct esmd_pg;

/* Applies the migrations compiled into the binary (migrations/NNNN_*.sql) that are not yet in
 * esmd.schema_migrations, in order, each in its own transaction, under a session advisory lock
 * so concurrent instances do not race. *applied (may be NULL) gets how many ran. Blocking.
 * Returns 0, or with the reason (server message and migration name) in err: ESMD_EIO for a
 * failure that may pass by itself (esmd_pg_error_permanent() false: no connection, the server
 * starting or stopping, a lock or resource wait), ESMD_EINVAL for one that will not (a
 * permission refused, a migration's SQL failing): start-up retries only the first kind. */
int esmd_pg_migrate(const char *conninfo, int *applied, char *err, size_t errlen) ESMD_MUST_CHECK;
/* As esmd_pg_migrate, with an explicit list (tests, tools): names[i] ("NNNN_what": the leading
 * digits are the version recorded) and sqls[i] (no transaction control in it), n entries, all
 * borrowed. Applied in name order; on the first failure that migration is rolled back, the
 * ones before it stay, *applied counts them, and err reads "migration NAME failed: <server
 * message>". ESMD_EINVAL for a nameless or unnumbered entry or two with the same version. */
int esmd_pg_migrate_list(const char *conninfo, const char *const *names, const char *const *sqls,
                         size_t n, int *applied, char *err, size_t errlen) ESMD_MUST_CHECK;

/* Whether the failed result res of a blocking query on conn is an error that retrying will not
 * mend (docs/operations.md#start-up): the server answered with an SQLSTATE outside the classes
 * of a connection lost or refused (08), a server starting, stopping or short of resources (53,
 * 57P, 58), a query cancelled or timed out (57014), a lock, deadlock or serialization
 * conflict (55P03, 40P01, 40001), and a server that only reads (25006: a standby, as during a
 * failover). false without a result or with the connection lost. */
bool esmd_pg_error_permanent(const PGconn *conn, const PGresult *res);

/* Number of migrations compiled in, and their names ("0001_mapping_state"), for `esmd version`. */
size_t esmd_pg_migration_count(void);
const char *esmd_pg_migration_name(size_t i);

/* Result callback: res is borrowed (valid during the call; NULL when the query could not run,
 * with err set: connection lost, server error text). Runs from the loop, never inside
 * esmd_pg_query(). */
typedef void (*esmd_pg_cb)(void *ud, const PGresult *res, const char *err);

/* Creates an asynchronous connection; connects at once and reconnects by itself. name is for
 * logs. NULL with err on a malformed conninfo. */
struct esmd_pg *esmd_pg_new(struct ev_loop *loop, const char *conninfo, const char *name, char *err,
                            size_t errlen) ESMD_MUST_CHECK;
/* Closes the connection; queued queries get cb(ud, NULL, "closed"). NULL ok. */
void esmd_pg_free(struct esmd_pg *pg);
/* Queues a parameterised query (text params, copied; NULL entries are SQL NULL). Queries run
 * one at a time in order. cb may be NULL. Returns 0, ESMD_EINVAL, or ESMD_ESTATE once
 * esmd_pg_free() has started (from a "closed" callback). If the connection is lost while the
 * query is in flight, cb gets (NULL, "connection lost: ...") and the query is not retried;
 * queries still queued wait for the reconnection. */
int esmd_pg_query(struct esmd_pg *pg, const char *sql, int nparams, const char *const *params,
                  esmd_pg_cb cb, void *ud);
/* As esmd_pg_query, with libpq's lengths and formats per parameter (both NULL, or both
 * nparams long): formats[i] 1 = binary (lengths[i] bytes, copied; NUL bytes allowed), 0 = text
 * (NUL-terminated, lengths[i] ignored). For arrays sent in binary (esmd_pg_array_*). */
int esmd_pg_query_binary(struct esmd_pg *pg, const char *sql, int nparams,
                         const char *const *params, const int *lengths, const int *formats,
                         esmd_pg_cb cb, void *ud);

/* Registers a statement prepared on the connection (PQsendPrepare, parameter types from the
 * SQL's casts) now if connected, and again after every reconnection before any other query;
 * and again if an execution finds it gone. name: unique on this connection. 0 or ESMD_EINVAL.
 * A failed PREPARE is logged; executions then fail with Postgres's error. */
int esmd_pg_prepare(struct esmd_pg *pg, const char *name, const char *sql, int nparams);
/* As esmd_pg_query_binary, running the prepared statement name (registered with nparams). */
int esmd_pg_query_prepared(struct esmd_pg *pg, const char *name, int nparams,
                           const char *const *params, const int *lengths, const int *formats,
                           esmd_pg_cb cb, void *ud);

/* A one-dimensional array in Postgres's binary format (array_send), for a binary parameter:
 * start it with the element type's OID, add elements, then send a->buf (a->buf.len bytes). */
struct esmd_pg_array {
    struct esmd_buf buf;
    size_t n;
};
#define ESMD_PG_OID_BYTEA 17
#define ESMD_PG_OID_INT8 20
#define ESMD_PG_OID_INT4 23
#define ESMD_PG_OID_TEXT 25
#define ESMD_PG_OID_UUID 2950
void esmd_pg_array_start(struct esmd_pg_array *a, unsigned int elem_oid);
/* One element of len bytes in the element type's binary form (text, bytea: the bytes; uuid:
 * 16). */
void esmd_pg_array_add(struct esmd_pg_array *a, const void *data, size_t len);
/* A NULL element. */
void esmd_pg_array_add_null(struct esmd_pg_array *a);
/* An int4 / int8 element (arrays of ESMD_PG_OID_INT4 / ESMD_PG_OID_INT8). */
void esmd_pg_array_add_int4(struct esmd_pg_array *a, int32_t v);
void esmd_pg_array_add_int8(struct esmd_pg_array *a, int64_t v);
/* Writes the element count into the header; a->buf then holds the parameter. */
void esmd_pg_array_finish(struct esmd_pg_array *a);

/* Notification callback: channel and payload borrowed, valid during the call. payload is NULL
 * when the LISTEN has just been (re)established, after the first connection and after every
 * reconnection: notifications sent while it was not listening are lost, so catch up then.
 * Runs from the loop, never inside esmd_pg_listen(). */
typedef void (*esmd_pg_notify_cb)(void *ud, const char *channel, const char *payload);

/* Subscribes to NOTIFYs on channel (1..63 bytes; copied): LISTEN is issued in turn with the
 * queries, and again first thing after every reconnection. cb(ud, ...) gets each notification
 * of that channel (and the NULL-payload marks above) until esmd_pg_free(). Returns 0,
 * ESMD_EINVAL, or ESMD_ESTATE once esmd_pg_free() has started. */
int esmd_pg_listen(struct esmd_pg *pg, const char *channel, esmd_pg_notify_cb cb, void *ud);
/* true while connected and the last query or ping succeeded. */
bool esmd_pg_ready(const struct esmd_pg *pg);
/* The server process (PQbackendPID) of the current session, or of the last one while the
 * connection is lost; 0 before the first. */
int esmd_pg_backend_pid(const struct esmd_pg *pg);
/* Last connection or query error, "" if none. Borrowed. */
const char *esmd_pg_last_error(const struct esmd_pg *pg);

#endif
