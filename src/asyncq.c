/* The asynchronous invocation queue (include/esmd/asyncq.h, docs/async.md): a policy on the
 * lease-queue engine (include/esmd/leaseq.h) over esmd.async_events, one key per function.
 *
 * The engine's connections to the service's Postgres:
 *   insert (async_queue.insert_connections, 2)  INSERTs of accepted events (group commit);
 *   worker  LISTEN esmd_async / esmd_async_config, claims, event-invoke-config queries;
 *   settle  settling (one statement deletes the finished events and reschedules the ones to
 *           retry), and the NOTIFYs that wake the other instances.
 *
 * A claimed event is "outstanding" until it is settled. Per function at most 2 ×
 * max_concurrency events are outstanding (the invoker sends max_concurrency at a time and
 * queues the rest), and the lease is 2 × timeout + 30 s so a queued event is not taken over.
 * Settling order guarantees at-least-once: a record for a destination is committed in the
 * outbox (esmd_dests_send) before the event is deleted; a crash before the delete runs the event
 * again when its lease ends (at once when the same instance id restarts). */
#include "esmd/asyncq.h"
#include "esmd/backoff.h"
#include "esmd/destination.h"
#include "esmd/invoke.h"
#include "esmd/json.h"
#include "esmd/leaseq.h"
#include "esmd/log.h"
#include "esmd/metrics.h"
#include "esmd/pg.h"
#include "esmd/trace.h"

#include <cJSON.h>
#include <ev.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define AQ_INS_MAX_ROWS 4000
#define AQ_INS_MAX_BYTES (16 * 1024 * 1024)
#define AQ_CLAIM_MAX 1000
#define AQ_RESP_KEEP (1024 * 1024) /* largest last_response kept for a later record */
#define AQ_SETTLE_FAIL_DELAY_MS 5000
#define AQ_NOTIFY_GAP_S 0.01 /* at most 100 NOTIFYs a second (see notify_flush) */
#define AQ_CHANNEL "esmd_async"
#define AQ_CONFIG_CHANNEL "esmd_async_config"
#define AQ_COUNT_S 5.0        /* the depth and oldest-age gauges are refreshed this often */
#define AQ_COUNT_MAX "100000" /* the depth gauge counts no further (docs/async.md#metrics) */

struct esmd_asyncq;

/* A run-time override (esmd.event_invoke_config row). */
struct aq_override {
    bool has;
    int mra;            /* -1: not set */
    int age_s;          /* -1: not set */
    char *on_success;   /* NULL: not set; "": none */
    char *on_failure;   /* idem */
    double modified_at; /* epoch seconds */
};

/* A function of the queue. Its settings are read through the invoker's handle at each use
 * (fn_cfg()), which a reload points at the new configuration (esmd_asyncq_reconfigure): the
 * next attempt of every event, queued before the reload or not, takes them. A function a
 * reload removed stays, marked `removed`: its events are not claimed until a reload adds it
 * again (docs/async.md#reload). */
struct aq_fn {
    struct esmd_asyncq *q;
    char *name;                  /* owned */
    struct esmd_function *fn;    /* the invoker's */
    struct esmd_leaseq_key *key; /* the engine's */
    bool removed;                /* not in the configuration in force */
    struct aq_override ov;
    int outstanding; /* claimed, not settled */
    bool notify;     /* events stored since the last NOTIFY */
    struct esmd_series *m_received, *m_age, *m_drop_retries, *m_drop_age, *m_dlq_err;
    struct esmd_series *m_depth, *m_oldest, *m_max_age; /* gauges (docs/async.md#metrics) */
};

/* An accepted event waiting for its INSERT. */
struct aq_pending {
    struct esmd_leaseq_item item; /* first: the engine's */
    struct aq_fn *f;
    char rid[37];
    char *payload; /* owned */
    size_t len;
    struct esmd_trace trace; /* the Invoke request's, empty when none */
    esmd_asyncq_cb cb;
    void *ud;
};

/* A claimed event. */
struct aq_ev {
    struct aq_ev *prev, *next; /* in q->evs */
    struct esmd_asyncq *q;
    struct aq_fn *f;
    int64_t id;
    char rid[37];
    char *payload; /* owned */
    size_t len;
    int64_t received_ms;
    int attempts, invokes, throttles;
    int last_status;
    char *last_fe, *last_resp, *last_err; /* owned or NULL */
    struct esmd_trace trace;              /* sent with every attempt */
    char trace_id[ESMD_TRACE_ID_LEN + 1]; /* on its log lines, "" when none */
    struct esmd_invoke_req *ireq;
    int sends;        /* destination sends waiting for their commit */
    bool send_failed; /* one could not be stored: retry the settling later */
    bool routed_failure;
};

/* One esmd_dests_send() in flight; ev NULL once the queue is freed. */
struct aq_send {
    struct aq_send *prev, *next;
    struct aq_ev *ev;
    bool dlq;
};

/* The request ids of the last AQ_CLAIMED_RING events this process claimed: an INSERT in doubt
 * asks here for the ids the lookup did not find (docs/async.md#in-doubt-inserts). */
#define AQ_CLAIMED_RING 4096

struct esmd_asyncq {
    char (*claimed_rids)[37]; /* ring of AQ_CLAIMED_RING */
    size_t claimed_next;
    struct ev_loop *loop;
    struct esmd_invoker *inv;
    struct esmd_dests *dests;
    struct aq_fn **fns; /* each owned; never freed before the queue (events point at them) */
    size_t nfns;
    double started_at;

    /* async_queue settings */
    int64_t retry_base_ms;
    struct esmd_backoff backoff;
    size_t max_async;
    int64_t lease_ms_override; /* -1: 2 × timeout + 30 s */

    struct esmd_leaseq *lq;
    struct esmd_pg *work, *done; /* the engine's claim and settle connections (borrowed) */
    bool notifying;              /* a NOTIFY in flight, or the gap after it */
    ev_timer notify_gap;

    struct aq_ev *evs;
    struct aq_send *sends;
    int config_queries;
    ev_timer count_tm; /* refreshes the depth and oldest-age gauges */
    int counting;      /* those queries in flight (one per function) */

    bool stopping, closing;
    void (*stop_done)(void *ud);
    void *stop_ud;
};

static void stop_maybe_done(struct esmd_asyncq *q);

/* ---- helpers ---- */

/* The function `name`, removed by a reload or not. */
static struct aq_fn *fn_find(struct esmd_asyncq *q, const char *name)
{
    for (size_t i = 0; i < q->nfns; i++)
        if (strcmp(q->fns[i]->name, name) == 0)
            return q->fns[i];
    return NULL;
}

/* The function `name` when the configuration in force has it. */
static struct aq_fn *fn_live(struct esmd_asyncq *q, const char *name)
{
    struct aq_fn *f = fn_find(q, name);
    return f && !f->removed ? f : NULL;
}

/* The function's settings in force (the last reload's; a removed function's last ones). */
static const struct esmd_function_cfg *fn_cfg(const struct aq_fn *f)
{
    return esmd_function_cfg(f->fn);
}

static int fn_mra(const struct aq_fn *f)
{
    return f->ov.has && f->ov.mra >= 0 ? f->ov.mra : fn_cfg(f)->async.maximum_retry_attempts;
}

static int64_t fn_age_ms(const struct aq_fn *f)
{
    return f->ov.has && f->ov.age_s >= 0 ? (int64_t)f->ov.age_s * 1000
                                         : fn_cfg(f)->async.maximum_event_age_ms;
}

/* The effective destination: the override's ("" = none) or the YAML's; NULL when none. */
static const char *fn_dest(const struct aq_fn *f, bool success)
{
    const char *o = success ? f->ov.on_success : f->ov.on_failure;
    const char *y = success ? fn_cfg(f)->async.on_success : fn_cfg(f)->async.on_failure;
    const char *r = f->ov.has && o ? o : y;
    return r && *r ? r : NULL;
}

static int64_t fn_lease_ms(const struct aq_fn *f)
{
    if (f->q->lease_ms_override > 0)
        return f->q->lease_ms_override;
    return 2 * fn_cfg(f)->timeout_ms + 30000;
}

static void ov_clear(struct aq_override *ov)
{
    free(ov->on_success);
    free(ov->on_failure);
    memset(ov, 0, sizeof(*ov));
    ov->mra = ov->age_s = -1;
}

/* ---- records ---- */

/* Writes a JSON value for a response body: the body when it is JSON, null when empty, else a
 * JSON string. */
static void put_json_value(struct esmd_buf *b, const char *s, size_t n)
{
    if (!s || n == 0)
        esmd_buf_puts(b, "null");
    else if (esmd_json_valid(s, n))
        esmd_buf_append(b, s, n);
    else
        esmd_buf_put_json_string(b, s, n);
}

static void put_function_arn(struct esmd_buf *b, const char *name)
{
    char arn[256];
    esmd_function_arn(name, arn, sizeof(arn));
    esmd_buf_puts(b, "\"");
    esmd_buf_puts(b, arn);
    esmd_buf_puts(b, ":$LATEST\"");
}

/* The invocation record (docs/lambda.md#invocation-record). status < 0: the function never answered
 * (no responseContext / responsePayload). */
static void build_record(struct esmd_buf *b, const struct aq_ev *ev, const char *condition,
                         int status, const char *fe, const char *resp, size_t resplen)
{
    char ts[32];
    esmd_iso8601_ms(esmd_now_ms(), ts);
    esmd_buf_printf(b, "{\"version\":\"1.0\",\"timestamp\":\"%s\",\"requestContext\":{", ts);
    esmd_buf_printf(b, "\"requestId\":\"%s\",\"functionArn\":", ev->rid);
    put_function_arn(b, ev->f->name);
    esmd_buf_printf(b, ",\"condition\":\"%s\",\"approximateInvokeCount\":%d},", condition,
                    ev->invokes);
    esmd_buf_puts(b, "\"requestPayload\":");
    esmd_buf_append(b, ev->payload, ev->len);
    if (status >= 0) {
        esmd_buf_printf(b,
                        ",\"responseContext\":{\"statusCode\":%d,\"executedVersion\":"
                        "\"$LATEST\"",
                        status);
        if (fe) {
            esmd_buf_puts(b, ",\"functionError\":");
            esmd_buf_put_json_string(b, fe, strlen(fe));
        }
        esmd_buf_puts(b, "},\"responsePayload\":");
        put_json_value(b, resp, resplen);
    }
    esmd_buf_putc(b, '}');
}

/* ---- settling ---- */

static void ev_free(struct aq_ev *ev)
{
    struct esmd_asyncq *q = ev->q;
    if (ev->prev)
        ev->prev->next = ev->next;
    else if (q->evs == ev)
        q->evs = ev->next;
    if (ev->next)
        ev->next->prev = ev->prev;
    ev->f->outstanding--;
    free(ev->payload);
    free(ev->last_fe);
    free(ev->last_resp);
    free(ev->last_err);
    free(ev);
}

/* The event is finished: delete it (batched). */
static void settle_delete(struct aq_ev *ev)
{
    esmd_leaseq_delete(ev->q->lq, ev->id);
    ev_free(ev);
}

/* The columns a retry writes (esmd_leaseq_retry): the counters and the last attempt. */
static const char *const aq_retry_ints[] = {"attempts", "invokes", "throttles", "last_status",
                                            NULL};
static const char *const aq_retry_texts[] = {"last_function_error", "last_response", "last_error",
                                             NULL};

/* The event runs again in delay_ms with its counters as they are now. */
static void settle_retry(struct aq_ev *ev, int64_t delay_ms)
{
    const int ints[] = {ev->attempts, ev->invokes, ev->throttles, ev->last_status};
    char *texts[] = {ev->last_fe, ev->last_resp, ev->last_err}; /* taken */
    ev->last_fe = ev->last_resp = ev->last_err = NULL;
    esmd_leaseq_retry(ev->q->lq, ev->id, delay_ms, ints, texts);
    ev_free(ev);
}

static void sends_done(struct aq_ev *ev)
{
    if (ev->sends > 0)
        return;
    if (ev->send_failed)
        settle_retry(ev, AQ_SETTLE_FAIL_DELAY_MS); /* routed again when it is claimed again */
    else
        settle_delete(ev);
}

static void send_cb(void *ud, bool ok, const char *err)
{
    struct aq_send *s = ud;
    struct aq_ev *ev = s->ev;
    if (ev) {
        struct esmd_asyncq *q = ev->q;
        if (s->prev)
            s->prev->next = s->next;
        else if (q->sends == s)
            q->sends = s->next;
        if (s->next)
            s->next->prev = s->prev;
    }
    bool dlq = s->dlq;
    free(s);
    if (!ev)
        return;
    if (!ok) {
        struct esmd_log_ctx lc = {NULL, ev->f->name, ev->rid,
                                  ev->trace_id[0] ? ev->trace_id : NULL};
        esmd_log_limited(ESMD_LOG_WARN, &lc, "async-send",
                         "async: could not store the %s record: %s (retrying)",
                         dlq ? "dead-letter" : "destination", err ? err : "?");
        if (dlq)
            esmd_series_inc(ev->f->m_dlq_err, 1);
        ev->send_failed = true;
    }
    struct esmd_asyncq *q = ev->q;
    ev->sends--;
    sends_done(ev); /* may free ev */
    stop_maybe_done(q);
}

/* Stores one record for uri (with attrs: SQS-style message attributes, keyed by nothing;
 * without: keyed by the request id); the event is settled when every send has committed. A
 * record the destination refuses is logged and counted; one refused while stopping makes the
 * event settle as a retry, so it is routed again later. */
static void send_out(struct aq_ev *ev, const char *uri, const char *payload, size_t len,
                     const char *attrs, bool dlq)
{
    struct esmd_asyncq *q = ev->q;
    struct aq_send *s = esmd_xcalloc(1, sizeof(*s));
    s->ev = ev;
    s->dlq = dlq;
    int rc =
        attrs ? esmd_dests_send_attrs(q->dests, uri, payload, len, attrs, send_cb, s)
              : esmd_dests_send(q->dests, uri, payload, len, ev->rid, strlen(ev->rid), send_cb, s);
    if (rc != 0) {
        struct esmd_log_ctx lc = {NULL, ev->f->name, ev->rid,
                                  ev->trace_id[0] ? ev->trace_id : NULL};
        esmd_log_limited(ESMD_LOG_ERROR, &lc, "async-send-refused",
                         "async: destination %s refused the %s (%s)%s", uri,
                         dlq ? "dead letter" : "record",
                         rc == ESMD_EINVAL ? "unknown destination or bad record" : "stopping",
                         rc == ESMD_EINVAL ? ": dropped" : ": routed again later");
        if (dlq)
            esmd_series_inc(ev->f->m_dlq_err, 1);
        if (rc != ESMD_EINVAL)
            ev->send_failed = true;
        free(s);
        return;
    }
    s->next = q->sends;
    if (q->sends)
        q->sends->prev = s;
    q->sends = s;
    ev->sends++;
}

/* The dead-letter message: the event alone; request id, error code and message travel as
 * message attributes where the destination has them (pgqueue://), see docs/async.md. */
static void send_dead_letter(struct aq_ev *ev, const char *uri)
{
    struct esmd_buf attrs = ESMD_BUF_INIT;
    const char *msg = ev->last_err ? ev->last_err : "";
    char trunc[1025];
    size_t n = strlen(msg);
    if (ev->last_resp) {
        /* the function's errorMessage when it gave one */
        cJSON *j = cJSON_Parse(ev->last_resp);
        const cJSON *m = j ? cJSON_GetObjectItemCaseSensitive(j, "errorMessage") : NULL;
        if (cJSON_IsString(m)) {
            snprintf(trunc, sizeof(trunc), "%s", m->valuestring);
            msg = trunc;
            n = strlen(trunc);
        }
        cJSON_Delete(j);
    }
    if (n > 1024) {
        snprintf(trunc, sizeof(trunc), "%.*s", 1024, msg);
        msg = trunc;
        n = strlen(trunc);
    }
    esmd_buf_printf(&attrs,
                    "{\"RequestID\":{\"dataType\":\"String\",\"stringValue\":\"%s\"},"
                    "\"ErrorCode\":{\"dataType\":\"Number\",\"stringValue\":\"%d\"},"
                    "\"ErrorMessage\":{\"dataType\":\"String\",\"stringValue\":",
                    ev->rid, ev->last_status > 0 ? ev->last_status : 500);
    esmd_buf_put_json_string(&attrs, msg, n);
    /* esmd's addition: which function, so /admin/dead-letters can show and re-drive it */
    esmd_buf_puts(&attrs, "},\"FunctionName\":{\"dataType\":\"String\",\"stringValue\":");
    esmd_buf_put_json_string(&attrs, ev->f->name, strlen(ev->f->name));
    esmd_buf_puts(&attrs, "}}");
    send_out(ev, uri, ev->payload, ev->len, esmd_buf_cstr(&attrs), true);
    esmd_buf_free(&attrs);
}

/* Retries are over or the event is too old: on_failure record and dead-letter message. */
static void route_failure(struct aq_ev *ev, const char *condition)
{
    struct aq_fn *f = ev->f;
    const char *uri = fn_dest(f, false);
    const char *dlq = fn_cfg(f)->async.dead_letter;
    struct esmd_log_ctx lc = {NULL, f->name, ev->rid, ev->trace_id[0] ? ev->trace_id : NULL};
    esmd_series_inc(strcmp(condition, "EventAgeExceeded") == 0 ? f->m_drop_age : f->m_drop_retries,
                    1);
    ESMD_INFO(&lc, "async: event dropped (%s) after %d invocation(s)%s", condition, ev->invokes,
              uri || dlq ? "; routed to its destinations" : "");
    ev->routed_failure = true;
    if (uri) {
        struct esmd_buf rec = ESMD_BUF_INIT;
        const char *resp = ev->last_resp;
        build_record(&rec, ev, condition, ev->last_status > 0 ? ev->last_status : -1, ev->last_fe,
                     resp, resp ? strlen(resp) : 0);
        send_out(ev, uri, rec.data, rec.len, NULL, false);
        esmd_buf_free(&rec);
    }
    if (dlq)
        send_dead_letter(ev, dlq);
    sends_done(ev);
}

/* Keeps a copy for the event's row, whose text columns take only well-formed UTF-8 without
 * NUL: a function's answer may be any bytes (a retry update that Postgres refused left the
 * event to run again after its lease, its attempt not counted). */
static void set_str(char **dst, const char *s, size_t n)
{
    free(*dst);
    *dst = NULL;
    if (s) {
        struct esmd_buf b = ESMD_BUF_INIT;
        esmd_buf_put_text(&b, s, n);
        *dst = esmd_buf_steal(&b, NULL);
    }
}

static void ev_invoked(void *ud, const struct esmd_invoke_result *res)
{
    struct aq_ev *ev = ud;
    struct esmd_asyncq *q = ev->q;
    struct aq_fn *f = ev->f;
    ev->ireq = NULL;
    if (q->closing) {
        ev_free(ev);
        return;
    }
    int64_t now = esmd_now_ms();
    bool function_error = false;
    switch (res->outcome) {
    case ESMD_INVOKE_CANCELLED:
        settle_retry(ev, 0);
        goto out;
    case ESMD_INVOKE_OK: {
        ev->invokes++;
        const char *uri = fn_dest(f, true);
        if (uri) {
            struct esmd_buf rec = ESMD_BUF_INIT;
            build_record(&rec, ev, "Success", (int)res->status, NULL, res->body, res->body_len);
            send_out(ev, uri, rec.data, rec.len, NULL, false);
            esmd_buf_free(&rec);
        }
        sends_done(ev);
        goto out;
    }
    case ESMD_INVOKE_FUNCTION_ERROR:
    case ESMD_INVOKE_TIMEOUT:
        function_error = true;
        break;
    case ESMD_INVOKE_ERROR:
        /* an endpoint that rejects the event (4xx other than 429) counts as a function error;
         * 5xx and transport errors are system errors, retried until the event is too old */
        function_error = res->status >= 400 && res->status < 500;
        break;
    case ESMD_INVOKE_THROTTLED:
        break;
    }
    if (res->outcome != ESMD_INVOKE_THROTTLED && res->status != 0)
        ev->invokes++;
    ev->last_status = (int)res->status;
    if (res->body_len <= AQ_RESP_KEEP && res->body_len > 0)
        set_str(&ev->last_resp, res->body, res->body_len);
    else
        set_str(&ev->last_resp, NULL, 0);
    if (res->outcome == ESMD_INVOKE_TIMEOUT && !esmd_json_valid(res->body, res->body_len)) {
        char msg[160];
        char ts[32];
        esmd_iso8601_ms(now, ts);
        snprintf(msg, sizeof(msg), "{\"errorMessage\":\"%s %s Task timed out after %.2f seconds\"}",
                 ts, ev->rid, esmd_invoke_timeout_seconds(res, fn_cfg(f)->timeout_ms));
        set_str(&ev->last_resp, msg, strlen(msg));
    }
    if (function_error) {
        const char *fe = res->function_error;
        if (!fe || (strcmp(fe, "Handled") != 0 && strcmp(fe, "Unhandled") != 0))
            fe = "Unhandled";
        set_str(&ev->last_fe, fe, strlen(fe));
    } else {
        set_str(&ev->last_fe, NULL, 0);
    }
    set_str(&ev->last_err, res->error ? res->error : esmd_invoke_outcome_name(res->outcome),
            strlen(res->error ? res->error : esmd_invoke_outcome_name(res->outcome)));
    int64_t deadline = ev->received_ms + fn_age_ms(f);
    if (function_error) {
        ev->attempts++;
        ev->throttles = 0;
        if (ev->attempts > fn_mra(f)) {
            route_failure(ev, "RetriesExhausted");
            goto out;
        }
        int64_t delay = q->retry_base_ms * ev->attempts;
        if (now + delay > deadline)
            delay = deadline - now + 1; /* it ages out then */
        settle_retry(ev, delay);
        goto out;
    }
    {
        int64_t delay = esmd_invoke_retry_delay(
            res, esmd_backoff_delay(&q->backoff, ev->throttles, esmd_random64()),
            q->backoff.cap_ms);
        ev->throttles++;
        if (now >= deadline) {
            route_failure(ev, "EventAgeExceeded");
            goto out;
        }
        if (now + delay > deadline)
            delay = deadline - now + 1;
        settle_retry(ev, delay);
    }
out:
    esmd_leaseq_claim_soon(q->lq);
    stop_maybe_done(q);
}

/* ---- claims ---- */

/* Columns of a claimed event, from ESMD_LEASEQ_COL0 on. */
enum {
    AQ_COL_RID = ESMD_LEASEQ_COL0,
    AQ_COL_PAYLOAD,
    AQ_COL_RECEIVED,
    AQ_COL_ATTEMPTS,
    AQ_COL_INVOKES,
    AQ_COL_THROTTLES,
    AQ_COL_STATUS,
    AQ_COL_FE,
    AQ_COL_RESP,
    AQ_COL_ERR,
    AQ_COL_TRACEPARENT,
    AQ_COL_TRACESTATE,
    AQ_COL_XRAY,
};

static void aq_claimed(void *ud, void *key_ud, int64_t id, const PGresult *res, int r)
{
    struct esmd_asyncq *q = ud;
    struct aq_fn *f = key_ud;
    struct aq_ev *ev = esmd_xcalloc(1, sizeof(*ev));
    ev->q = q;
    ev->f = f;
    f->outstanding++;
    ev->next = q->evs;
    if (q->evs)
        q->evs->prev = ev;
    q->evs = ev;
    ev->id = id;
    snprintf(ev->rid, sizeof(ev->rid), "%s", PQgetvalue(res, r, AQ_COL_RID));
    memcpy(q->claimed_rids[q->claimed_next++ % AQ_CLAIMED_RING], ev->rid, sizeof(ev->rid));
    ev->len = (size_t)PQgetlength(res, r, AQ_COL_PAYLOAD);
    ev->payload = esmd_xstrndup(PQgetvalue(res, r, AQ_COL_PAYLOAD), ev->len);
    ev->received_ms = strtoll(PQgetvalue(res, r, AQ_COL_RECEIVED), NULL, 10);
    ev->attempts = atoi(PQgetvalue(res, r, AQ_COL_ATTEMPTS));
    ev->invokes = atoi(PQgetvalue(res, r, AQ_COL_INVOKES));
    ev->throttles = atoi(PQgetvalue(res, r, AQ_COL_THROTTLES));
    ev->last_status =
        PQgetisnull(res, r, AQ_COL_STATUS) ? 0 : atoi(PQgetvalue(res, r, AQ_COL_STATUS));
    if (!PQgetisnull(res, r, AQ_COL_FE))
        ev->last_fe = esmd_xstrdup(PQgetvalue(res, r, AQ_COL_FE));
    if (!PQgetisnull(res, r, AQ_COL_RESP))
        ev->last_resp = esmd_xstrdup(PQgetvalue(res, r, AQ_COL_RESP));
    if (!PQgetisnull(res, r, AQ_COL_ERR))
        ev->last_err = esmd_xstrdup(PQgetvalue(res, r, AQ_COL_ERR));
    static const int trace_cols[] = {AQ_COL_TRACEPARENT, AQ_COL_TRACESTATE, AQ_COL_XRAY};
    static const char *const trace_names[] = {ESMD_TRACE_TRACEPARENT, ESMD_TRACE_TRACESTATE,
                                              ESMD_TRACE_XRAY};
    for (size_t i = 0; i < ESMD_ARRAY_LEN(trace_cols); i++)
        if (!PQgetisnull(res, r, trace_cols[i]))
            esmd_trace_set(&ev->trace, trace_names[i], PQgetvalue(res, r, trace_cols[i]),
                           (size_t)PQgetlength(res, r, trace_cols[i]));
    esmd_trace_id(&ev->trace, ev->trace_id);
    int64_t now = esmd_now_ms();
    if (now - ev->received_ms > fn_age_ms(f)) {
        route_failure(ev, "EventAgeExceeded");
        return;
    }
    if (ev->attempts > fn_mra(f)) {
        route_failure(ev, "RetriesExhausted");
        return;
    }
    esmd_series_observe(f->m_age, (double)(now - ev->received_ms) / 1000.0);
    ev->ireq = esmd_invoke_start_traced(f->fn, ev->payload, ev->len, ev->rid, NULL, &ev->trace,
                                        ev_invoked, ev);
    if (!ev->ireq) /* the invoker is shutting down: run it later */
        settle_retry(ev, 0);
}

/* Outstanding events per function: 2 × max_concurrency. */
static int aq_room(void *ud, void *key_ud)
{
    const struct aq_fn *f = key_ud;
    ESMD_UNUSED(ud);
    if (f->removed) /* its events wait for the function to come back */
        return 0;
    int mc = fn_cfg(f)->max_concurrency > 0 ? fn_cfg(f)->max_concurrency : 1;
    int room = 2 * mc - f->outstanding;
    return room > AQ_CLAIM_MAX ? AQ_CLAIM_MAX : room;
}

/* ---- accepting: group commit ---- */

static void pending_free(struct aq_pending *p)
{
    free(p->payload);
    free(p);
}

static void notify_flush(struct esmd_asyncq *q);

static void notify_gap_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct esmd_asyncq *q = w->data;
    ESMD_UNUSED(loop);
    ESMD_UNUSED(revents);
    q->notifying = false;
    notify_flush(q);
    stop_maybe_done(q);
}

static void notify_done(void *ud, const PGresult *res, const char *err)
{
    struct esmd_asyncq *q = ud;
    ESMD_UNUSED(res);
    if (q->closing)
        return;
    if (err) /* the other instances find the events at their next poll */
        esmd_log_limited(ESMD_LOG_WARN, NULL, "async-notify", "async: NOTIFY failed: %s", err);
    ev_timer_set(&q->notify_gap, AQ_NOTIFY_GAP_S, 0.);
    ev_timer_start(q->loop, &q->notify_gap);
}

/* Wakes the workers of every instance (this one's are woken directly) for the functions that
 * got events since the last NOTIFY: one statement at a time, at most one every
 * AQ_NOTIFY_GAP_S, on the settling connection, outside the inserts. A transaction that
 * NOTIFYs takes a database-wide lock at commit and holds it across the commit's WAL flush,
 * which serialised the inserts' commits; and one NOTIFY per insert doubled the statements. */
static void notify_flush(struct esmd_asyncq *q)
{
    if (q->notifying || q->closing)
        return;
    struct esmd_pg_array names;
    esmd_pg_array_start(&names, ESMD_PG_OID_TEXT);
    for (size_t i = 0; i < q->nfns; i++) {
        if (!q->fns[i]->notify)
            continue;
        q->fns[i]->notify = false;
        esmd_pg_array_add(&names, q->fns[i]->name, strlen(q->fns[i]->name));
    }
    if (names.n > 0) {
        esmd_pg_array_finish(&names);
        const char *params[] = {names.buf.data};
        const int lengths[] = {(int)names.buf.len}, formats[] = {1};
        q->notifying = true;
        if (esmd_pg_query_binary(
                q->done, "SELECT pg_notify('" AQ_CHANNEL "', f) FROM unnest($1::text[]) AS f", 1,
                params, lengths, formats, notify_done, q) != 0)
            q->notifying = false;
    }
    esmd_buf_free(&names.buf);
}

static void aq_inserted(void *ud, struct esmd_leaseq_item *items, bool ok, const char *err)
{
    struct esmd_asyncq *q = ud;
    while (items) {
        struct aq_pending *p = (struct aq_pending *)items;
        items = items->next;
        if (ok) {
            esmd_series_inc(p->f->m_received, 1);
            esmd_leaseq_more(q->lq, p->f->key);
            p->f->notify = true;
        }
        p->cb(p->ud, ok, p->rid, ok ? NULL : err);
        pending_free(p);
    }
    if (q->closing)
        return;
    if (ok)
        notify_flush(q);
    stop_maybe_done(q);
}

/* The event's request id as a uuid element (16 bytes). */
static void aq_add_request_id(const struct aq_pending *p, struct esmd_pg_array *arr)
{
    unsigned char u[16];
    for (size_t i = 0, k = 0; i < 16; k++) {
        if (p->rid[k] == '-')
            continue;
        u[i++] = (unsigned char)(esmd_hex_digit(p->rid[k]) << 4 | esmd_hex_digit(p->rid[k + 1]));
        k++;
    }
    esmd_pg_array_add(arr, u, sizeof(u));
}

/* One row of the INSERT: function, request id (16 bytes), payload. */
static void aq_insert_row(void *ud, struct esmd_leaseq_item *item, struct esmd_pg_array *cols)
{
    struct aq_pending *p = (struct aq_pending *)item;
    ESMD_UNUSED(ud);
    esmd_pg_array_add(&cols[0], p->f->name, strlen(p->f->name));
    aq_add_request_id(p, &cols[1]);
    esmd_pg_array_add(&cols[2], p->payload, p->len);
    esmd_pg_array_add(&cols[3], p->trace.traceparent, strlen(p->trace.traceparent));
    esmd_pg_array_add(&cols[4], p->trace.tracestate, strlen(p->trace.tracestate));
    esmd_pg_array_add(&cols[5], p->trace.xray, strlen(p->trace.xray));
}

/* An INSERT cut off by a lost connection: its events are looked up by request id, which esmd
 * made and the caller has not seen yet (docs/async.md#in-doubt-inserts). */
static void aq_indoubt_value(void *ud, struct esmd_leaseq_item *item, struct esmd_pg_array *arr)
{
    ESMD_UNUSED(ud);
    aq_add_request_id((const struct aq_pending *)item, arr);
}

static bool aq_indoubt_claimed(void *ud, struct esmd_leaseq_item *item)
{
    const struct esmd_asyncq *q = ud;
    const struct aq_pending *p = (const struct aq_pending *)item;
    size_t n = q->claimed_next < AQ_CLAIMED_RING ? q->claimed_next : AQ_CLAIMED_RING;
    for (size_t i = 0; i < n; i++) {
        if (strcasecmp(q->claimed_rids[i], p->rid) == 0)
            return true;
    }
    return false;
}

static bool aq_policy_idle(void *ud)
{
    const struct esmd_asyncq *q = ud;
    return q->evs == NULL && !q->notifying && q->config_queries == 0 && !q->counting;
}

static const unsigned int aq_insert_oids[] = {ESMD_PG_OID_TEXT, ESMD_PG_OID_UUID, ESMD_PG_OID_TEXT,
                                              ESMD_PG_OID_TEXT, ESMD_PG_OID_TEXT, ESMD_PG_OID_TEXT};

static const struct esmd_leaseq_policy aq_policy = {
    .name = "async",
    .rows = "events",
    .table = "esmd.async_events",
    .key_column = "function",
    .returning = "t.request_id, t.payload, (extract(epoch FROM t.received_at) * 1000)::bigint, "
                 "t.attempts, t.invokes, t.throttles, t.last_status, t.last_function_error, "
                 "t.last_response, t.last_error, t.traceparent, t.tracestate, t.trace_header",
    /* trace headers: "" for none (NULL in the row) */
    .insert_sql = "INSERT INTO esmd.async_events (function, request_id, payload, traceparent, "
                  "tracestate, trace_header) "
                  "SELECT f, r, p, nullif(tp, ''), nullif(ts, ''), nullif(x, '') "
                  "FROM unnest($1::text[], $2::uuid[], $3::text[], $4::text[], $5::text[], "
                  "$6::text[]) AS u(f, r, p, tp, ts, x)",
    .insert_nparams = 6,
    .insert_oids = aq_insert_oids,
    .insert_max_rows = AQ_INS_MAX_ROWS,
    .insert_max_bytes = AQ_INS_MAX_BYTES,
    .insert_row = aq_insert_row,
    .inserted = aq_inserted,
    .indoubt_column = "request_id",
    .indoubt_type = "uuid",
    .indoubt_oid = ESMD_PG_OID_UUID,
    .indoubt_value = aq_indoubt_value,
    .indoubt_claimed = aq_indoubt_claimed,
    .retry_ints = aq_retry_ints,
    .retry_texts = aq_retry_texts,
    .room = aq_room,
    .claimed = aq_claimed,
    .idle = aq_policy_idle,
};

int esmd_asyncq_enqueue(struct esmd_asyncq *q, const char *function, const char *payload,
                        size_t len, const struct esmd_trace *trace, esmd_asyncq_cb cb, void *ud)
{
    if (!q || !function || !cb)
        return ESMD_EINVAL;
    if (q->stopping || q->closing)
        return ESMD_ESTATE;
    struct aq_fn *f = fn_live(q, function);
    if (!f)
        return ESMD_ENOENT;
    if (len > q->max_async)
        return ESMD_ETOOBIG;
    if (len == 0) {
        payload = "{}";
        len = 2;
    }
    if (!esmd_json_valid(payload, len))
        return ESMD_EINVAL;
    struct aq_pending *p = esmd_xcalloc(1, sizeof(*p));
    p->f = f;
    esmd_uuid4(p->rid);
    p->payload = esmd_xstrndup(payload, len);
    p->len = len;
    if (trace) {
        p->trace = *trace;
        esmd_trace_complete(&p->trace);
    }
    p->item.bytes = len;
    p->cb = cb;
    p->ud = ud;
    esmd_leaseq_insert(q->lq, &p->item);
    return ESMD_OK;
}

/* ---- event-invoke-config: memory ---- */

/* Applies a row (columns: function_name, mra, age, on_success, on_failure, modified epoch s). */
static void ov_apply_row(struct esmd_asyncq *q, const PGresult *res, int r)
{
    struct aq_fn *f = fn_find(q, PQgetvalue(res, r, 0));
    if (!f)
        return;
    ov_clear(&f->ov);
    f->ov.has = true;
    f->ov.mra = PQgetisnull(res, r, 1) ? -1 : atoi(PQgetvalue(res, r, 1));
    f->ov.age_s = PQgetisnull(res, r, 2) ? -1 : atoi(PQgetvalue(res, r, 2));
    if (!PQgetisnull(res, r, 3))
        f->ov.on_success = esmd_xstrdup(PQgetvalue(res, r, 3));
    if (!PQgetisnull(res, r, 4))
        f->ov.on_failure = esmd_xstrdup(PQgetvalue(res, r, 4));
    f->ov.modified_at = strtod(PQgetvalue(res, r, 5), NULL);
}

#define OV_COLUMNS                                                                                 \
    "function_name, maximum_retry_attempts, maximum_event_age_seconds, on_success, on_failure, "   \
    "extract(epoch FROM last_modified)::float8"

struct reload {
    struct esmd_asyncq *q;
    char *name; /* NULL: all */
};

/* The maximum event age in force (the override's or the YAML's), for alerts on the oldest
 * event's age. */
static void max_age_gauges(struct esmd_asyncq *q)
{
    for (size_t i = 0; i < q->nfns; i++)
        esmd_series_set(q->fns[i]->m_max_age, (double)fn_age_ms(q->fns[i]) / 1000.0);
}

static void reload_done(void *ud, const PGresult *res, const char *err)
{
    struct reload *rl = ud;
    struct esmd_asyncq *q = rl->q;
    q->config_queries--;
    if (!q->closing) {
        if (err || !res) {
            esmd_log_limited(ESMD_LOG_WARN, NULL, "async-config",
                             "async: loading event-invoke-config: %s", err ? err : "?");
        } else {
            if (rl->name) {
                struct aq_fn *f = fn_find(q, rl->name);
                if (f)
                    ov_clear(&f->ov);
            } else {
                for (size_t i = 0; i < q->nfns; i++)
                    ov_clear(&q->fns[i]->ov);
            }
            for (int r = 0; r < PQntuples(res); r++)
                ov_apply_row(q, res, r);
            max_age_gauges(q);
        }
        stop_maybe_done(q);
    }
    free(rl->name);
    free(rl);
}

static void config_reload(struct esmd_asyncq *q, const char *name)
{
    struct reload *rl = esmd_xcalloc(1, sizeof(*rl));
    rl->q = q;
    rl->name = name ? esmd_xstrdup(name) : NULL;
    const char *params[] = {name};
    q->config_queries++;
    if (esmd_pg_query(q->work,
                      name ? "SELECT " OV_COLUMNS " FROM esmd.event_invoke_config "
                             "WHERE function_name = $1"
                           : "SELECT " OV_COLUMNS " FROM esmd.event_invoke_config",
                      name ? 1 : 0, name ? params : NULL, reload_done, rl) != 0)
        reload_done(rl, NULL, "closed");
}

static void on_notify(void *ud, const char *channel, const char *payload)
{
    struct esmd_asyncq *q = ud;
    if (q->closing)
        return;
    if (strcmp(channel, AQ_CONFIG_CHANNEL) == 0) {
        config_reload(q, payload);
        return;
    }
    if (payload == NULL) {
        esmd_leaseq_more(q->lq, NULL);
    } else {
        struct aq_fn *f = fn_find(q, payload);
        if (f)
            esmd_leaseq_more(q->lq, f->key);
    }
}

/* ---- the depth and oldest-age gauges ---- */

static void count_done(void *ud, const PGresult *res, const char *err)
{
    struct aq_fn *f = ud;
    struct esmd_asyncq *q = f->q;
    q->counting--;
    if (q->closing)
        return;
    if (err || !res || PQntuples(res) != 1) {
        esmd_log_limited(ESMD_LOG_WARN, NULL, "async-count", "async: counting events: %s",
                         err ? err : "no row");
    } else {
        esmd_series_set(f->m_depth, strtod(PQgetvalue(res, 0, 0), NULL));
        esmd_series_set(f->m_oldest,
                        PQgetisnull(res, 0, 1) ? 0 : strtod(PQgetvalue(res, 0, 1), NULL));
    }
    stop_maybe_done(q);
}

/* Every instance's events of the function: the queue is shared, like Lambda's per-function
 * queue. Both parts walk an index, never the table, so a deep backlog costs at most
 * AQ_COUNT_MAX index entries: the count in async_events_due order (an index-only scan), the
 * oldest as the first accepted (the lowest id; retries keep theirs). */
#define AQ_COUNT_SQL                                                                               \
    "SELECT (SELECT count(*) FROM (SELECT 1 FROM esmd.async_events WHERE function = $1 "           \
    "ORDER BY function, next_attempt_at, id LIMIT " AQ_COUNT_MAX ") d), "                          \
    "(SELECT GREATEST(extract(epoch FROM now() - received_at), 0)::float8 "                        \
    "FROM esmd.async_events WHERE function = $1 ORDER BY id LIMIT 1)"

static void count_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct esmd_asyncq *q = w->data;
    ESMD_UNUSED(loop);
    ESMD_UNUSED(revents);
    if (q->counting || q->stopping || q->closing)
        return;
    for (size_t i = 0; i < q->nfns; i++) {
        const char *params[] = {q->fns[i]->name};
        q->counting++;
        if (esmd_pg_query(q->work, AQ_COUNT_SQL, 1, params, count_done, q->fns[i]) != 0)
            count_done(q->fns[i], NULL, "closed");
    }
}

/* ---- event-invoke-config: for the API (src/api_eic.c) ---- */

bool esmd_asyncq_accepting(const struct esmd_asyncq *q)
{
    return q && !q->stopping && !q->closing;
}

size_t esmd_asyncq_max_payload(const struct esmd_asyncq *q)
{
    return q->max_async;
}

int esmd_asyncq_eic_get(struct esmd_asyncq *q, const char *function, struct esmd_asyncq_eic *out)
{
    const struct aq_fn *f = fn_live(q, function);
    if (!f)
        return ESMD_ENOENT;
    out->set = f->ov.has || fn_cfg(f)->async.set;
    out->maximum_retry_attempts = fn_mra(f);
    out->maximum_event_age_s = fn_age_ms(f) / 1000;
    out->on_success = fn_dest(f, true);
    out->on_failure = fn_dest(f, false);
    out->last_modified = f->ov.has ? f->ov.modified_at : q->started_at;
    return ESMD_OK;
}

struct eic_op {
    struct esmd_asyncq *q;
    struct aq_fn *f;
    bool is_delete;
    esmd_asyncq_eic_cb cb;
    void *ud;
};

static void eic_done(void *ud, const PGresult *res, const char *err)
{
    struct eic_op *op = ud;
    struct esmd_asyncq *q = op->q;
    int rc = ESMD_OK;
    q->config_queries--;
    if (err || !res) {
        ESMD_WARN(&(struct esmd_log_ctx){NULL, op->f->name, NULL, NULL},
                  "async: storing the event-invoke-config: %s", err ? err : "no result");
        rc = ESMD_EIO;
    } else if (op->is_delete && PQntuples(res) == 0) {
        rc = ESMD_ENOENT;
    } else if (!q->closing) {
        if (op->is_delete)
            ov_clear(&op->f->ov);
        else if (PQntuples(res) > 0)
            ov_apply_row(q, res, 0);
    }
    op->cb(op->ud, rc);
    free(op);
    if (!q->closing)
        stop_maybe_done(q);
}

static int eic_query(struct esmd_asyncq *q, const char *function, bool is_delete, const char *sql,
                     int nparams, const char *const *params, esmd_asyncq_eic_cb cb, void *ud)
{
    struct aq_fn *f = fn_live(q, function);
    if (!f)
        return ESMD_ENOENT;
    if (q->closing)
        return ESMD_ESTATE;
    struct eic_op *op = esmd_xcalloc(1, sizeof(*op));
    op->q = q;
    op->f = f;
    op->is_delete = is_delete;
    op->cb = cb;
    op->ud = ud;
    q->config_queries++;
    if (esmd_pg_query(q->work, sql, nparams, params, eic_done, op) != 0) {
        q->config_queries--;
        free(op);
        return ESMD_ESTATE;
    }
    return ESMD_OK;
}

int esmd_asyncq_eic_put(struct esmd_asyncq *q, const char *function,
                        const struct esmd_asyncq_eic_change *ch, esmd_asyncq_eic_cb cb, void *ud)
{
    char mra[16], age[16];
    snprintf(mra, sizeof(mra), "%d", ch->maximum_retry_attempts);
    snprintf(age, sizeof(age), "%d", ch->maximum_event_age_s);
    bool has_mra = ch->maximum_retry_attempts >= 0, has_age = ch->maximum_event_age_s >= 0;
    /* replace: every field is set (absent = NULL: falls back to the YAML); else only those given */
    const char *params[] = {function,
                            has_mra ? mra : NULL,
                            has_age ? age : NULL,
                            ch->on_success,
                            ch->on_failure,
                            ch->replace || has_mra ? "t" : "f",
                            ch->replace || has_age ? "t" : "f",
                            ch->replace || ch->on_success ? "t" : "f",
                            ch->replace || ch->on_failure ? "t" : "f"};
    return eic_query(
        q, function, false,
        "WITH up AS (INSERT INTO esmd.event_invoke_config AS t (function_name, "
        "maximum_retry_attempts, maximum_event_age_seconds, on_success, on_failure, "
        "last_modified) VALUES ($1, $2::int, $3::int, $4, $5, now()) "
        "ON CONFLICT (function_name) DO UPDATE SET "
        "maximum_retry_attempts = CASE WHEN $6::bool THEN EXCLUDED.maximum_retry_attempts "
        "ELSE t.maximum_retry_attempts END, "
        "maximum_event_age_seconds = CASE WHEN $7::bool THEN "
        "EXCLUDED.maximum_event_age_seconds ELSE t.maximum_event_age_seconds END, "
        "on_success = CASE WHEN $8::bool THEN EXCLUDED.on_success ELSE t.on_success END, "
        "on_failure = CASE WHEN $9::bool THEN EXCLUDED.on_failure ELSE t.on_failure END, "
        "last_modified = now() RETURNING " OV_COLUMNS "), "
        "n AS (SELECT pg_notify('" AQ_CONFIG_CHANNEL "', $1)) "
        "SELECT up.* FROM up, n",
        9, params, cb, ud);
}

int esmd_asyncq_eic_delete(struct esmd_asyncq *q, const char *function, esmd_asyncq_eic_cb cb,
                           void *ud)
{
    const char *params[] = {function};
    return eic_query(q, function, true,
                     "WITH d AS (DELETE FROM esmd.event_invoke_config WHERE function_name = $1 "
                     "RETURNING function_name) "
                     "SELECT pg_notify('" AQ_CONFIG_CHANNEL "', function_name) FROM d",
                     1, params, cb, ud);
}

/* ---- the function:// destination sink ---- */

struct sink_call {
    esmd_dests_sink_cb cb;
    void *ud;
};

static void sink_done(void *ud, bool ok, const char *rid, const char *err)
{
    struct sink_call *sc = ud;
    ESMD_UNUSED(rid);
    sc->cb(sc->ud, ok, err);
    free(sc);
}

static int sink(void *ud, const char *function, const char *payload, size_t len,
                esmd_dests_sink_cb cb, void *cbud)
{
    struct esmd_asyncq *q = ud;
    struct sink_call *sc = esmd_xcalloc(1, sizeof(*sc));
    sc->cb = cb;
    sc->ud = cbud;
    int rc = esmd_asyncq_enqueue(q, function, payload, len, NULL, sink_done, sc);
    if (rc != 0)
        free(sc);
    return rc;
}

/* Adds the function `name` (the invoker's function of that name; none: nothing added). */
static struct aq_fn *fn_add(struct esmd_asyncq *q, const char *name)
{
    struct esmd_function *fn = esmd_invoker_function(q->inv, name);
    if (!fn)
        return NULL;
    struct esmd_metric *m_rcv = esmd_metric(ESMD_COUNTER, "esmd_async_events_received_total",
                                            "Asynchronous invocation events accepted (committed).");
    struct esmd_metric *m_age =
        esmd_metric(ESMD_HISTOGRAM, "esmd_async_event_age_seconds",
                    "Age of an async event when it is invoked (from acceptance).");
    struct esmd_metric *m_drop =
        esmd_metric(ESMD_COUNTER, "esmd_async_events_dropped_total",
                    "Async events dropped without a successful invocation (routed to on_failure "
                    "/ dead_letter when configured).");
    struct esmd_metric *m_dlq = esmd_metric(ESMD_COUNTER, "esmd_dead_letter_errors_total",
                                            "Failed attempts to store a dead-letter message.");
    struct esmd_metric *m_depth =
        esmd_metric(ESMD_GAUGE, "esmd_async_queue_depth",
                    "Async events of the function in the queue (waiting, running or waiting for a "
                    "retry), all instances; refreshed every 5 s.");
    struct esmd_metric *m_oldest =
        esmd_metric(ESMD_GAUGE, "esmd_async_oldest_event_age_seconds",
                    "Age of the oldest async event of the function in the queue (0 when empty); "
                    "refreshed every 5 s.");
    struct esmd_metric *m_max_age =
        esmd_metric(ESMD_GAUGE, "esmd_async_maximum_event_age_seconds",
                    "The function's maximum event age in force (event-invoke-config or YAML).");
    struct aq_fn *f = esmd_xcalloc(1, sizeof(*f));
    f->q = q;
    f->name = esmd_xstrdup(name);
    f->fn = fn;
    ov_clear(&f->ov);
    f->key = esmd_leaseq_key_add(q->lq, f->name, fn_lease_ms(f), f);
    struct esmd_buf l = ESMD_BUF_INIT;
    esmd_metric_labels(&l, "function", f->name, NULL);
    f->m_received = esmd_series(m_rcv, esmd_buf_cstr(&l));
    f->m_age = esmd_series(m_age, esmd_buf_cstr(&l));
    f->m_dlq_err = esmd_series(m_dlq, esmd_buf_cstr(&l));
    f->m_depth = esmd_series(m_depth, esmd_buf_cstr(&l));
    f->m_oldest = esmd_series(m_oldest, esmd_buf_cstr(&l));
    f->m_max_age = esmd_series(m_max_age, esmd_buf_cstr(&l));
    esmd_buf_reset(&l);
    esmd_metric_labels(&l, "function", f->name, "reason", "RetriesExhausted", NULL);
    f->m_drop_retries = esmd_series(m_drop, esmd_buf_cstr(&l));
    esmd_buf_reset(&l);
    esmd_metric_labels(&l, "function", f->name, "reason", "EventAgeExceeded", NULL);
    f->m_drop_age = esmd_series(m_drop, esmd_buf_cstr(&l));
    esmd_buf_free(&l);
    q->fns = esmd_xrealloc(q->fns, (q->nfns + 1) * sizeof(*q->fns));
    q->fns[q->nfns++] = f;
    return f;
}

void esmd_asyncq_reconfigure(struct esmd_asyncq *q, const struct esmd_config *cfg)
{
    if (!q || !cfg || q->closing)
        return;
    for (size_t i = 0; i < q->nfns; i++)
        q->fns[i]->removed = esmd_config_function(cfg, q->fns[i]->name) == NULL;
    for (size_t i = 0; i < cfg->nfunctions; i++) {
        const char *name = cfg->functions[i].name;
        struct aq_fn *f = fn_find(q, name);
        bool added = f == NULL;
        if (added && (f = fn_add(q, name)) == NULL)
            continue;
        f->fn = esmd_invoker_function(q->inv, name);
        /* the lease of the claims from now on follows the timeout */
        esmd_leaseq_key_set_lease(q->lq, f->key, fn_lease_ms(f));
        if (added) /* an override stored for it earlier (the function was here before) */
            config_reload(q, name);
        esmd_leaseq_more(q->lq, f->key); /* events of a function added back run now */
    }
    max_age_gauges(q);
}

/* ---- lifecycle ---- */

struct esmd_asyncq *esmd_asyncq_new(struct ev_loop *loop, const struct esmd_config *cfg,
                                    struct esmd_invoker *inv, struct esmd_dests *dests,
                                    const char *conninfo, const char *instance_id, char *err,
                                    size_t errlen)
{
    if (!loop || !cfg || !inv || !dests || !conninfo) {
        snprintf(err, errlen,
                 "async queue: missing loop, configuration, invoker, destinations "
                 "or postgres");
        return NULL;
    }
    const struct esmd_async_queue_cfg *acfg = &cfg->async_queue;
    struct esmd_asyncq *q = esmd_xcalloc(1, sizeof(*q));
    q->claimed_rids = esmd_xcalloc(AQ_CLAIMED_RING, sizeof(*q->claimed_rids));
    q->loop = loop;
    q->inv = inv;
    q->dests = dests;
    q->started_at = (double)esmd_now_ms() / 1000.0;
    q->retry_base_ms = acfg->retry_base_ms;
    q->backoff.base_ms = acfg->backoff_base_ms;
    q->backoff.cap_ms = acfg->backoff_cap_ms;
    q->max_async = (size_t)acfg->max_payload;
    if (q->max_async > ESMD_MAX_PAYLOAD)
        q->max_async = ESMD_MAX_PAYLOAD;
    q->lease_ms_override = acfg->lease_ms;
    ev_init(&q->notify_gap, notify_gap_cb);
    q->notify_gap.data = q;
    ev_init(&q->count_tm, count_cb);
    q->count_tm.data = q;

    const struct esmd_leaseq_cfg lcfg = {
        .conninfo = conninfo,
        .instance_id = instance_id,
        .insert_conns = acfg->insert_connections,
        .settle_conn = true,
        .claims = acfg->workers,
        .poll_s = (double)acfg->poll_ms / 1000.0,
        .weak_poll = true, /* the poll timer alone does not keep the loop running */
    };
    q->lq = esmd_leaseq_new(loop, &aq_policy, q, &lcfg, err, errlen);
    if (!q->lq)
        goto fail;
    q->work = esmd_leaseq_pg(q->lq, ESMD_LEASEQ_CLAIM);
    q->done = esmd_leaseq_pg(q->lq, ESMD_LEASEQ_SETTLE);

    for (size_t i = 0; i < cfg->nfunctions; i++)
        fn_add(q, cfg->functions[i].name);

    if (esmd_pg_listen(q->work, AQ_CHANNEL, on_notify, q) != 0 ||
        esmd_pg_listen(q->work, AQ_CONFIG_CHANNEL, on_notify, q) != 0) {
        snprintf(err, errlen, "async queue: LISTEN failed");
        goto fail;
    }
    esmd_leaseq_start(q->lq);
    max_age_gauges(q);
    config_reload(q, NULL);
    ev_timer_set(&q->count_tm, 0.2, AQ_COUNT_S);
    ev_timer_start(loop, &q->count_tm);
    esmd_dests_set_function_sink(dests, sink, q);
    return q;
fail:
    esmd_asyncq_free(q);
    return NULL;
}

static void stop_maybe_done(struct esmd_asyncq *q)
{
    if (q->stopping && !q->closing)
        esmd_leaseq_check(q->lq);
}

static void lq_stopped(void *ud, bool late)
{
    struct esmd_asyncq *q = ud;
    ESMD_UNUSED(late);
    void (*done)(void *ud) = q->stop_done;
    q->stop_done = NULL;
    if (done)
        done(q->stop_ud);
}

void esmd_asyncq_stop(struct esmd_asyncq *q, void (*done)(void *ud), void *ud)
{
    if (!q)
        return;
    q->stopping = true;
    ev_timer_stop(q->loop, &q->count_tm);
    q->stop_done = done;
    q->stop_ud = ud;
    /* accepted events not yet sent to Postgres still go (their callers wait for the commit) */
    esmd_leaseq_stop(q->lq, 0, lq_stopped, q);
}

void esmd_asyncq_free(struct esmd_asyncq *q)
{
    if (!q)
        return;
    q->closing = true;
    if (q->dests)
        esmd_dests_set_function_sink(q->dests, NULL, NULL);
    ev_timer_stop(q->loop, &q->notify_gap);
    ev_timer_stop(q->loop, &q->count_tm);
    /* invocations in flight: cancelled (their events keep the lease and run again later) */
    while (q->evs) {
        struct aq_ev *ev = q->evs;
        if (ev->ireq) {
            esmd_invoke_cancel(ev->ireq); /* ev_invoked frees it (closing) */
            if (q->evs == ev)
                ev_free(ev);
        } else {
            ev_free(ev);
        }
    }
    for (struct aq_send *s = q->sends; s; s = s->next)
        s->ev = NULL; /* freed by their callback */
    q->sends = NULL;
    /* accepted events not committed: their callers get !ok ("shutting down", "closed") */
    esmd_leaseq_free(q->lq);
    for (size_t i = 0; i < q->nfns; i++) {
        ov_clear(&q->fns[i]->ov);
        free(q->fns[i]->name);
        free(q->fns[i]);
    }
    free(q->fns);
    free(q->claimed_rids);
    free(q);
}

bool esmd_asyncq_ready(struct esmd_asyncq *q, struct esmd_buf *detail)
{
    bool ready = q && esmd_pg_ready(esmd_leaseq_pg(q->lq, ESMD_LEASEQ_INSERT)) &&
                 esmd_pg_ready(q->work) && !q->stopping;
    if (detail) {
        int out = 0;
        for (size_t i = 0; q && i < q->nfns; i++)
            out += q->fns[i]->outstanding;
        esmd_buf_printf(detail, "{\"ready\":%s,\"claimed\":%d,\"accepting\":%zu}",
                        ready ? "true" : "false", out, q ? esmd_leaseq_waiting(q->lq) : (size_t)0);
    }
    return ready;
}
