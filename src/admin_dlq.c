/* Dead-lettered async events in pgqueue:// queues (src/admin_dlq.h, docs/admin.md):
 *
 *   GET  /admin/dead-letters/{queue}?limit=N       oldest first (default 100, at most 1000)
 *   GET  /admin/dead-letters/{queue}/{messageId}   one message, 404 when absent
 *   POST /admin/dead-letters/{queue}/redrive       {"function": NAME, "messageIds": [...]}
 *   GET  /admin/dead-letters                        the pgqueue:// queues the configuration
 *                                                   writes to, with their message counts
 *   GET  /admin/async                               the async queue: depth, ages, retries
 *
 * asyncq writes a dead letter as the event (body) with the attributes RequestID, ErrorCode and
 * ErrorMessage; it does not record the function, so a redrive names it. A redrive is one
 * statement (so one transaction): it locks the queue's visible messages (SKIP LOCKED: a message
 * a consumer holds is left alone), inserts each as a new event of the function, keeping the
 * original request id (esmd.async_events.request_id is not unique), deletes the messages and
 * sends NOTIFY esmd_async so the workers wake at once. The JSON answers are built by Postgres. */
#include "admin_dlq.h"

#include "esmd/admin_auth.h"
#include "esmd/lambda_api.h"
#include "esmd/log.h"
#include "esmd/pg.h"

#include <cJSON.h>
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define DLQ_LIMIT_DEFAULT 100
#define DLQ_LIMIT_MAX 1000
#define DLQ_MAX_IDS 1000
#define DLQ_QUEUE_MAX 64
#define DLQ_UUID_RE                                                                                \
    "'^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$'"

/* The JSON object of one message m of esmd.queue_messages. */
#define DLQ_OBJ                                                                                    \
    "json_build_object('messageId', m.message_id, 'queue', m.queue, "                              \
    "'function', m.attributes->'FunctionName'->>'stringValue', "                                   \
    "'requestId', m.attributes->'RequestID'->>'stringValue', "                                     \
    "'errorCode', CASE WHEN m.attributes->'ErrorCode'->>'stringValue' ~ '^[0-9]{1,9}$' "           \
    "THEN (m.attributes->'ErrorCode'->>'stringValue')::integer END, "                              \
    "'errorMessage', m.attributes->'ErrorMessage'->>'stringValue', "                               \
    "'sentTime', to_char(m.sent_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"'), "     \
    "'sentTimestamp', (extract(epoch FROM m.sent_at) * 1000)::bigint, "                            \
    "'receiveCount', m.receive_count, 'attributes', m.attributes, 'body', m.body)"

struct esmd_admin_dlq {
    const struct esmd_config *cfg;
    const struct esmd_admin_auth *auth;
    struct esmd_pg *pg;
    bool closing;
};

enum dlq_kind { DLQ_LIST, DLQ_SHOW, DLQ_REDRIVE, DLQ_QUEUES, DLQ_ASYNC };

struct dlq_op {
    struct esmd_admin_dlq *d;
    struct esmd_api_call call; /* call.req NULL once the client went away */
    enum dlq_kind kind;
};

struct esmd_admin_dlq *esmd_admin_dlq_new(const struct esmd_config *cfg,
                                          const struct esmd_admin_auth *auth, struct esmd_pg *pg)
{
    struct esmd_admin_dlq *d = esmd_xcalloc(1, sizeof(*d));

    d->cfg = cfg;
    d->auth = auth;
    d->pg = pg;
    return d;
}

void esmd_admin_dlq_set_config(struct esmd_admin_dlq *d, const struct esmd_config *cfg)
{
    d->cfg = cfg;
}

void esmd_admin_dlq_closing(struct esmd_admin_dlq *d)
{
    if (d)
        d->closing = true;
}

void esmd_admin_dlq_free(struct esmd_admin_dlq *d)
{
    free(d);
}

/* ---- checks ---- */

static bool dlq_queue_name(const char *s, size_t n)
{
    if (n == 0 || n > DLQ_QUEUE_MAX)
        return false;
    for (size_t i = 0; i < n; i++)
        if (!isalnum((unsigned char)s[i]) && s[i] != '_' && s[i] != '.' && s[i] != '-')
            return false;
    return true;
}

static bool dlq_uuid(const char *s)
{
    static const char pat[] = "xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx";

    if (strlen(s) != sizeof(pat) - 1)
        return false;
    for (size_t i = 0; pat[i]; i++)
        if (pat[i] == '-' ? s[i] != '-' : !isxdigit((unsigned char)s[i]))
            return false;
    return true;
}

/* ---- answers ---- */

static void dlq_abort(void *ud, struct esmd_http_req *req)
{
    struct dlq_op *op = ud;

    (void)req;
    op->call.req = NULL;
}

static void dlq_done(void *ud, const PGresult *res, const char *err)
{
    struct dlq_op *op = ud;
    struct esmd_api_call *call = &op->call;
    bool ok = res != NULL && PQresultStatus(res) == PGRES_TUPLES_OK;

    if (call->req == NULL) {
        free(op);
        return;
    }
    esmd_http_req_on_abort(call->req, NULL, NULL);
    if (!ok) {
        const char *state = res ? PQresultErrorField(res, PG_DIAG_SQLSTATE) : NULL;

        /* the database's message goes to the log, not to the client */
        ESMD_WARN(NULL, "admin: dead-letter queue: %s", err ? err : PQresultErrorMessage(res));
        if (op->kind == DLQ_REDRIVE && state && strcmp(state, "22P02") == 0)
            esmd_api_bad(call, "a message of the queue is not a JSON event; nothing was redriven");
        else
            esmd_api_error(call, op->d->closing ? 503 : 500, "ServiceException",
                           "could not read the dead-letter queue");
    } else if (op->kind == DLQ_SHOW && PQntuples(res) == 0) {
        esmd_api_error(call, 404, "ResourceNotFoundException",
                       "no such message in the dead-letter queue");
    } else if (op->kind == DLQ_REDRIVE && PQntuples(res) == 1 && !PQgetisnull(res, 0, 1)) {
        esmd_api_error(call, 404, "ResourceNotFoundException",
                       "messages not in the queue (or being received by a consumer): %.600s; "
                       "nothing was redriven",
                       PQgetvalue(res, 0, 1));
    } else if (PQntuples(res) != 1 || PQgetisnull(res, 0, 0)) {
        esmd_api_error(call, 500, "ServiceException", "unexpected answer from Postgres");
    } else {
        esmd_api_respond(call, 200, "application/json", PQgetvalue(res, 0, 0),
                         (size_t)PQgetlength(res, 0, 0));
    }
    free(op);
}

static void dlq_query(struct esmd_admin_dlq *d, struct esmd_api_call *call, enum dlq_kind kind,
                      const char *sql, int n, const char *const *params)
{
    struct dlq_op *op = esmd_xcalloc(1, sizeof(*op));

    op->d = d;
    op->call = *call;
    op->kind = kind;
    if (d->closing || esmd_pg_query(d->pg, sql, n, params, dlq_done, op) != 0) {
        free(op);
        esmd_api_error(call, 503, "ServiceException", "shutting down");
        return;
    }
    esmd_http_req_on_abort(call->req, dlq_abort, op);
}

/* ---- routes ---- */

/* Adds {"queue":..., "role":..., "function"|"mapping": owner} to b for a pgqueue:// uri. */
static void dlq_use(struct esmd_buf *b, const char *uri, const char *role, const char *owner_key,
                    const char *owner)
{
    static const char scheme[] = "pgqueue://";

    if (uri == NULL || strncmp(uri, scheme, sizeof(scheme) - 1) != 0)
        return;
    if (b->len > 1)
        esmd_buf_putc(b, ',');
    esmd_buf_puts(b, "{\"queue\":");
    esmd_buf_put_json_string(b, uri + sizeof(scheme) - 1, strlen(uri + sizeof(scheme) - 1));
    esmd_buf_printf(b, ",\"role\":\"%s\",\"%s\":", role, owner_key);
    esmd_buf_put_json_string(b, owner, strlen(owner));
    esmd_buf_putc(b, '}');
}

/* The queues the configuration file names as destinations (the functions' async dead_letter,
 * on_failure, on_success; the mappings' on_failure; the pgqueue sources' dead_letter_queue),
 * each with its uses and message counts. Overrides made at run time are not listed. */
static void dlq_queues(struct esmd_admin_dlq *d, struct esmd_api_call *call)
{
    const struct esmd_config *c = d->cfg;
    struct esmd_buf uses = ESMD_BUF_INIT;

    esmd_buf_putc(&uses, '[');
    for (size_t i = 0; i < c->nfunctions; i++) {
        const struct esmd_function_cfg *f = &c->functions[i];
        dlq_use(&uses, f->async.dead_letter, "dead_letter", "function", f->name);
        dlq_use(&uses, f->async.on_failure, "on_failure", "function", f->name);
        dlq_use(&uses, f->async.on_success, "on_success", "function", f->name);
    }
    for (size_t i = 0; i < c->nmappings; i++) {
        const struct esmd_mapping_cfg *m = &c->mappings[i];
        char uri[128];
        dlq_use(&uses, m->on_failure, "on_failure", "mapping", m->name);
        if (m->kind == ESMD_SOURCE_PGQUEUE && m->pgqueue.dead_letter_queue) {
            snprintf(uri, sizeof(uri), "pgqueue://%s", m->pgqueue.dead_letter_queue);
            dlq_use(&uses, uri, "dead_letter_queue", "mapping", m->name);
        }
    }
    esmd_buf_putc(&uses, ']');
    const char *params[1] = {esmd_buf_cstr(&uses)};
    dlq_query(d, call, DLQ_QUEUES,
              "SELECT json_build_object('queues', coalesce(json_agg(json_build_object("
              " 'queue', q.queue, 'uses', q.uses, 'messages', (SELECT count(*) FROM"
              " esmd.queue_messages m WHERE m.queue = q.queue), 'oldestSentTime', (SELECT"
              " to_char(min(m.sent_at) AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.MS\"Z\"')"
              " FROM esmd.queue_messages m WHERE m.queue = q.queue)) ORDER BY q.queue),"
              " '[]'::json))::text FROM (SELECT e->>'queue' AS queue, json_agg(e::jsonb - 'queue')"
              " AS uses FROM json_array_elements($1::json) e GROUP BY e->>'queue') q",
              1, params);
    esmd_buf_free(&uses);
}

/* The async queue (esmd.async_events): per configured function, events waiting (due or
 * scheduled for a retry) and being invoked (claimed), and the oldest event's age. Like the
 * depth gauge of src/asyncq.c, each function's events are walked in the async_events_due
 * index's order and counted up to DLQ_ASYNC_COUNT_MAX, the oldest found by the primary key:
 * a deep backlog is never scanned (docs/admin.md). */
#define DLQ_ASYNC_COUNT_MAX "100000"
static void dlq_async(struct esmd_admin_dlq *d, struct esmd_api_call *call)
{
    const struct esmd_config *c = d->cfg;
    struct esmd_buf fns = ESMD_BUF_INIT;

    esmd_buf_putc(&fns, '{');
    for (size_t i = 0; i < c->nfunctions; i++) {
        if (i)
            esmd_buf_putc(&fns, ',');
        esmd_buf_put_json_string(&fns, c->functions[i].name, strlen(c->functions[i].name));
    }
    esmd_buf_putc(&fns, '}');
    const char *params[1] = {esmd_buf_cstr(&fns)};
    dlq_query(
        d, call, DLQ_ASYNC,
        "WITH per AS (SELECT f.fn, c.depth, c.due, c.in_progress, c.retries_scheduled,"
        "  (SELECT (extract(epoch FROM now() - e.received_at) * 1000)::bigint FROM"
        "   esmd.async_events e WHERE e.function = f.fn ORDER BY e.id LIMIT 1) AS oldest_age_ms"
        " FROM unnest($1::text[]) AS f(fn), LATERAL (SELECT count(*) AS depth,"
        "  count(*) FILTER (WHERE x.lease_owner IS NULL AND x.next_attempt_at <= now()) AS due,"
        "  count(*) FILTER (WHERE x.lease_owner IS NOT NULL) AS in_progress,"
        "  count(*) FILTER (WHERE x.lease_owner IS NULL AND (x.attempts > 0 OR x.throttles > 0)"
        "   AND x.next_attempt_at > now()) AS retries_scheduled"
        "  FROM (SELECT e.lease_owner, e.attempts, e.throttles, e.next_attempt_at"
        "   FROM esmd.async_events e WHERE e.function = f.fn"
        "   ORDER BY e.function, e.next_attempt_at, e.id LIMIT " DLQ_ASYNC_COUNT_MAX ") x) c)"
        " SELECT json_build_object('depth', coalesce(sum(depth), 0), 'due', coalesce(sum(due), 0),"
        "  'in_progress', coalesce(sum(in_progress), 0),"
        "  'retries_scheduled', coalesce(sum(retries_scheduled), 0),"
        "  'oldest_age_ms', max(oldest_age_ms), 'counted_up_to', " DLQ_ASYNC_COUNT_MAX ","
        "  'functions', coalesce(json_agg(json_build_object('function', fn, 'depth', depth,"
        "   'due', due, 'in_progress', in_progress, 'retries_scheduled', retries_scheduled,"
        "   'oldest_age_ms', oldest_age_ms) ORDER BY fn), '[]'::json))::text FROM per",
        1, params);
    esmd_buf_free(&fns);
}

static void dlq_list(struct esmd_admin_dlq *d, struct esmd_api_call *call, const char *queue)
{
    static const struct esmd_api_range limits = {"limit", NULL, 1, DLQ_LIMIT_MAX};
    const char *ls = esmd_http_req_query(call->req, "limit");
    int64_t limit = DLQ_LIMIT_DEFAULT;
    char lbuf[24];

    if (ls != NULL && !esmd_api_query_int(ls, &limits, &limit)) {
        esmd_api_range_error(call, &limits, ls);
        return;
    }
    snprintf(lbuf, sizeof(lbuf), "%lld", (long long)limit);
    const char *params[2] = {queue, lbuf};
    dlq_query(d, call, DLQ_LIST,
              "SELECT json_build_object('queue', $1::text, 'messages', coalesce(json_agg(" DLQ_OBJ
              " ORDER BY m.sent_at, m.id), '[]'::json))::text FROM (SELECT * FROM "
              "esmd.queue_messages WHERE queue = $1 ORDER BY sent_at, id LIMIT $2::integer) m",
              2, params);
}

static void dlq_show(struct esmd_admin_dlq *d, struct esmd_api_call *call, const char *queue,
                     const char *mid)
{
    if (!dlq_uuid(mid)) {
        esmd_api_bad(call, "messageId must be a UUID");
        return;
    }
    const char *params[2] = {queue, mid};
    dlq_query(d, call, DLQ_SHOW,
              "SELECT " DLQ_OBJ "::text FROM esmd.queue_messages m "
              "WHERE m.queue = $1 AND m.message_id = $2::uuid",
              2, params);
}

static void dlq_redrive(struct esmd_admin_dlq *d, struct esmd_api_call *call, const char *queue)
{
    cJSON *root = esmd_api_body_object(call, false);
    const cJSON *fn = NULL, *ids = NULL, *it;
    struct esmd_buf idlist = ESMD_BUF_INIT;

    if (root == NULL)
        return;
    cJSON_ArrayForEach(it, root)
    {
        if (strcmp(it->string, "function") == 0) {
            fn = it;
        } else if (strcmp(it->string, "messageIds") == 0) {
            ids = it;
        } else {
            esmd_api_bad(call, "unknown field %.100s (expected function, messageIds)", it->string);
            goto out;
        }
    }
    if (!cJSON_IsString(fn) || fn->valuestring[0] == '\0') {
        esmd_api_bad(call, "function (a configured function's name) is required: the function "
                           "to invoke with the dead letters (listing shows each one's "
                           "FunctionName)");
        goto out;
    }
    if (esmd_config_function(d->cfg, fn->valuestring) == NULL) {
        esmd_api_error(call, 404, "ResourceNotFoundException", "Function not found: %.100s",
                       fn->valuestring);
        goto out;
    }
    if (ids != NULL) {
        int n = cJSON_GetArraySize(ids);

        if (!cJSON_IsArray(ids) || n < 1 || n > DLQ_MAX_IDS) {
            esmd_api_bad(call, "messageIds must be an array of 1 to 1000 message ids");
            goto out;
        }
        esmd_buf_putc(&idlist, '{');
        cJSON_ArrayForEach(it, ids)
        {
            if (!cJSON_IsString(it) || !dlq_uuid(it->valuestring)) {
                esmd_api_bad(call, "messageIds must hold message ids (UUIDs)");
                goto out;
            }
            if (idlist.len > 1)
                esmd_buf_putc(&idlist, ',');
            esmd_buf_puts(&idlist, it->valuestring);
        }
        esmd_buf_putc(&idlist, '}');
    }
    /* $1 queue, $2 function, $3 message ids (NULL: every visible message). Answers one row:
     * the JSON answer, and the missing ids (then nothing was changed). */
    const char *params[3] = {queue, fn->valuestring, ids ? esmd_buf_cstr(&idlist) : NULL};
    dlq_query(
        d, call, DLQ_REDRIVE,
        "WITH want AS (SELECT DISTINCT unnest($3::uuid[]) AS mid),"
        " m AS MATERIALIZED (SELECT q.id, q.message_id, q.body, q.sent_at,"
        "  q.attributes->'RequestID'->>'stringValue' AS orig"
        "  FROM esmd.queue_messages q WHERE q.queue = $1 AND q.visible_at <= now()"
        "  AND ($3::uuid[] IS NULL OR q.message_id IN (SELECT mid FROM want))"
        "  ORDER BY q.sent_at, q.id FOR UPDATE SKIP LOCKED),"
        " miss AS (SELECT string_agg(w.mid::text, ', ' ORDER BY w.mid::text) AS ids FROM want w"
        "  WHERE w.mid NOT IN (SELECT message_id FROM m)),"
        /* an async invocation record (on-failure / on-success destination): its requestPayload
         * is the event, its requestContext.requestId the original request id */
        " r AS (SELECT m.*, CASE WHEN json_typeof(m.body::json) = 'object'"
        "  AND m.body::json->'requestContext' IS NOT NULL"
        "  AND m.body::json->'requestPayload' IS NOT NULL THEN m.body::json END AS rec FROM m),"
        " s0 AS (SELECT r.id, r.message_id, r.sent_at,"
        "  coalesce(r.orig, r.rec->'requestContext'->>'requestId') AS orig,"
        "  CASE WHEN r.rec IS NOT NULL THEN (r.rec->'requestPayload')::text ELSE r.body END"
        "  AS payload FROM r),"
        " sel AS MATERIALIZED (SELECT s0.id, s0.message_id, s0.sent_at, s0.orig, s0.payload,"
        "  CASE WHEN s0.orig ~ " DLQ_UUID_RE " THEN s0.orig::uuid ELSE gen_random_uuid() END"
        "  AS rid FROM s0 WHERE (SELECT ids FROM miss) IS NULL),"
        " ins AS (INSERT INTO esmd.async_events (function, request_id, payload)"
        "  SELECT $2, s.rid, s.payload FROM sel s ORDER BY s.sent_at, s.id RETURNING id),"
        " del AS (DELETE FROM esmd.queue_messages q USING sel s WHERE q.id = s.id"
        "  RETURNING q.id),"
        " n AS (SELECT pg_notify('esmd_async', $2) WHERE EXISTS (SELECT 1 FROM sel))"
        " SELECT CASE WHEN (SELECT ids FROM miss) IS NULL THEN json_build_object("
        "  'queue', $1::text, 'function', $2::text,"
        "  'redriven', (SELECT count(*) FROM del) + 0 * (SELECT count(*) FROM ins)"
        "   + 0 * (SELECT count(*) FROM n),"
        "  'events', coalesce((SELECT json_agg(json_build_object('messageId', s.message_id,"
        "   'requestId', s.rid, 'originalRequestId', s.orig) ORDER BY s.sent_at, s.id)"
        "   FROM sel s), '[]'::json))::text END,"
        " (SELECT ids FROM miss)",
        3, params);
out:
    esmd_buf_free(&idlist);
    cJSON_Delete(root);
}

static void dlq_route(void *ud, struct esmd_http_req *req)
{
    struct esmd_admin_dlq *d = ud;
    const char *method = esmd_http_req_method(req), *queue, *sub;
    bool get = strcmp(method, "GET") == 0 || strcmp(method, "HEAD") == 0;
    struct esmd_api_call call;
    struct esmd_api_path p;

    esmd_api_begin(&call, req);
    if (!esmd_admin_authorize(d->auth, req))
        return;
    if (!esmd_api_path_split(&call, &p))
        return;
    if (p.n == 2 && get && strcmp(p.seg[0], "admin") == 0) {
        if (strcmp(p.seg[1], "dead-letters") == 0)
            dlq_queues(d, &call);
        else if (strcmp(p.seg[1], "async") == 0)
            dlq_async(d, &call);
        else
            esmd_api_error(&call, 404, "ResourceNotFoundException", "no such admin route");
        goto out;
    }
    if (p.n < 3 || p.n > 4 || strcmp(p.seg[0], "admin") != 0 ||
        strcmp(p.seg[1], "dead-letters") != 0 || p.seg[2][0] == '\0' ||
        (p.n == 4 && p.seg[3][0] == '\0')) {
        esmd_api_error(&call, 404, "ResourceNotFoundException", "no such admin route");
        goto out;
    }
    queue = p.seg[2];
    sub = p.n == 4 ? p.seg[3] : "";
    if (!dlq_queue_name(queue, strlen(queue)))
        esmd_api_bad(&call, "the queue name must be 1 to 64 of A-Z a-z 0-9 _ . -");
    else if (get && sub[0] == '\0')
        dlq_list(d, &call, queue);
    else if (get)
        dlq_show(d, &call, queue, sub);
    else if (strcmp(method, "POST") == 0 && strcmp(sub, "redrive") == 0)
        dlq_redrive(d, &call, queue);
    else
        esmd_api_error(&call, 404, "ResourceNotFoundException", "no such admin route");
out:
    esmd_api_path_free(&p);
}

int esmd_admin_dlq_routes(struct esmd_admin_dlq *d, struct esmd_http *http,
                          esmd_http_limit_fn limit)
{
    if (d == NULL || http == NULL)
        return ESMD_EINVAL;
    if (esmd_http_route_limited(http, "GET", ESMD_ADMIN_DLQ_PATH, dlq_route, limit, d) != 0 ||
        esmd_http_route_limited(http, "GET", "/admin/async", dlq_route, limit, d) != 0 ||
        esmd_http_route_limited(http, "GET", ESMD_ADMIN_DLQ_PATH "/*", dlq_route, limit, d) != 0 ||
        esmd_http_route_limited(http, "POST", ESMD_ADMIN_DLQ_PATH "/*", dlq_route, limit, d) != 0)
        return ESMD_EINVAL;
    return ESMD_OK;
}
