/* The asynchronous invocation queue (include/esmd/asyncq.h, docs/async.md).
 *
 * Connections to the service's Postgres:
 *   ins[0], ins[1]  INSERTs of accepted events: every event accepted while both are busy waits
 *                   and goes, with all the others waiting, into the next INSERT (group commit);
 *   work            LISTEN esmd_async / esmd_async_config, claims, event-invoke-config queries;
 *   done            settling: one statement deletes the finished events and reschedules the
 *                   ones to retry (everything settled during the previous statement).
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
#include "esmd/log.h"
#include "esmd/metrics.h"
#include "esmd/pg.h"

#include <cJSON.h>
#include <ev.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define AQ_INS_CONNS_MAX 8
#define AQ_INS_MAX_ROWS 4000
#define AQ_INS_MAX_BYTES (16 * 1024 * 1024)
#define AQ_CLAIM_MAX 1000
#define AQ_SETTLE_MAX 256          /* ids per settle statement (see settle_flush) */
#define AQ_RESP_KEEP (1024 * 1024) /* largest last_response kept for a later record */
#define AQ_SETTLE_FAIL_DELAY_MS 5000
#define AQ_NOTIFY_GAP_S 0.01 /* at most 100 NOTIFYs a second (see notify_flush) */
#define AQ_CHANNEL "esmd_async"
#define AQ_INSERT "esmd_async_insert" /* the prepared INSERT of accepted events */
#define AQ_CONFIG_CHANNEL "esmd_async_config"

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

struct aq_fn {
    struct esmd_asyncq *q;
    const struct esmd_function_cfg *cfg; /* borrowed */
    struct esmd_function *fn;            /* the invoker's */
    struct aq_override ov;
    int outstanding; /* claimed, not settled */
    bool more;       /* may have due events */
    bool notify;     /* events stored since the last NOTIFY */
    struct esmd_series *m_received, *m_age, *m_drop_retries, *m_drop_age, *m_dlq_err;
};

/* An accepted event waiting for its INSERT. */
struct aq_pending {
    struct aq_pending *next;
    struct aq_fn *f;
    char rid[37];
    char *payload; /* owned */
    size_t len;
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

/* A retry to write. */
struct aq_upd {
    int64_t id;
    int attempts, invokes, throttles, status;
    int64_t delay_ms;
    char *fe, *resp, *err; /* owned or NULL */
};

struct esmd_asyncq {
    struct ev_loop *loop;
    struct esmd_invoker *inv;
    struct esmd_dests *dests;
    char *instance_id;
    char token[37];
    struct aq_fn *fns;
    size_t nfns;
    double started_at;

    /* knobs */
    int64_t retry_base_ms;
    struct esmd_backoff backoff;
    double poll_s;
    size_t max_async;
    int64_t lease_ms_override; /* -1: 2 × timeout + 30 s */

    struct esmd_pg *ins[AQ_INS_CONNS_MAX], *work, *done;
    bool notifying; /* a NOTIFY in flight, or the gap after it */
    ev_timer notify_gap;
    int nins;     /* insert connections in use */
    bool workers; /* false: accept events, never claim any (ESMD_ASYNC_WORKERS=0) */
    struct aq_pending *pend, *pend_tail;
    size_t npend;
    int inserting;
    bool ins_busy[AQ_INS_CONNS_MAX];
    ev_timer ins_kick;

    bool claiming, claim_again, claim_all;
    ev_timer claim_kick, poll_tm;

    struct aq_ev *evs;
    struct aq_send *sends;
    int64_t *dels;
    size_t ndels, capdels;
    struct aq_upd *upds;
    size_t nupds, capupds;
    bool settling;
    ev_timer settle_kick;
    int config_queries;

    bool stopping, closing;
    void (*stop_done)(void *ud);
    void *stop_ud;
    ev_timer stop_check;
};

static void claim_schedule(struct esmd_asyncq *q);
static void settle_schedule(struct esmd_asyncq *q);
static void stop_maybe_done(struct esmd_asyncq *q);

/* ---- helpers ---- */

static int64_t env_ms(const char *name, int64_t def, int64_t min)
{
    const char *v = getenv(name);
    char *end;
    long long n;
    if (!v || !*v)
        return def;
    n = strtoll(v, &end, 10);
    if (*end || n < min) {
        ESMD_WARN(NULL, "async: ignoring %s=%s (an integer >= %lld)", name, v, (long long)min);
        return def;
    }
    return n;
}

static void kick(struct esmd_asyncq *q, ev_timer *w)
{
    if (ev_is_active(w))
        return;
    ev_timer_set(w, 0., 0.);
    ev_timer_start(q->loop, w);
}

static struct aq_fn *fn_find(struct esmd_asyncq *q, const char *name)
{
    for (size_t i = 0; i < q->nfns; i++)
        if (strcmp(q->fns[i].cfg->name, name) == 0)
            return &q->fns[i];
    return NULL;
}

static int fn_mra(const struct aq_fn *f)
{
    return f->ov.has && f->ov.mra >= 0 ? f->ov.mra : f->cfg->async.maximum_retry_attempts;
}

static int64_t fn_age_ms(const struct aq_fn *f)
{
    return f->ov.has && f->ov.age_s >= 0 ? (int64_t)f->ov.age_s * 1000
                                         : f->cfg->async.maximum_event_age_ms;
}

/* The effective destination: the override's ("" = none) or the YAML's; NULL when none. */
static const char *fn_dest(const struct aq_fn *f, bool success)
{
    const char *o = success ? f->ov.on_success : f->ov.on_failure;
    const char *y = success ? f->cfg->async.on_success : f->cfg->async.on_failure;
    const char *r = f->ov.has && o ? o : y;
    return r && *r ? r : NULL;
}

static int64_t fn_lease_ms(const struct aq_fn *f)
{
    if (f->q->lease_ms_override > 0)
        return f->q->lease_ms_override;
    return 2 * f->cfg->timeout_ms + 30000;
}

static void put_array_text(struct esmd_buf *b, const char *s)
{
    if (!s) {
        esmd_buf_puts(b, "NULL");
        return;
    }
    esmd_buf_putc(b, '"');
    for (; *s; s++) {
        if (*s == '"' || *s == '\\')
            esmd_buf_putc(b, '\\');
        esmd_buf_putc(b, *s);
    }
    esmd_buf_putc(b, '"');
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
    put_function_arn(b, ev->f->cfg->name);
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
    struct esmd_asyncq *q = ev->q;
    if (q->ndels == q->capdels) {
        q->capdels = q->capdels ? 2 * q->capdels : 256;
        q->dels = esmd_xrealloc(q->dels, q->capdels * sizeof(*q->dels));
    }
    q->dels[q->ndels++] = ev->id;
    ev_free(ev);
    settle_schedule(q);
}

/* The event runs again in delay_ms with its counters as they are now. */
static void settle_retry(struct aq_ev *ev, int64_t delay_ms)
{
    struct esmd_asyncq *q = ev->q;
    if (q->nupds == q->capupds) {
        q->capupds = q->capupds ? 2 * q->capupds : 64;
        q->upds = esmd_xrealloc(q->upds, q->capupds * sizeof(*q->upds));
    }
    struct aq_upd *u = &q->upds[q->nupds++];
    u->id = ev->id;
    u->attempts = ev->attempts;
    u->invokes = ev->invokes;
    u->throttles = ev->throttles;
    u->status = ev->last_status;
    u->delay_ms = delay_ms < 0 ? 0 : delay_ms;
    u->fe = ev->last_fe;
    u->resp = ev->last_resp;
    u->err = ev->last_err;
    ev->last_fe = ev->last_resp = ev->last_err = NULL;
    ev_free(ev);
    settle_schedule(q);
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
        struct esmd_log_ctx lc = {NULL, ev->f->cfg->name, ev->rid};
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
        struct esmd_log_ctx lc = {NULL, ev->f->cfg->name, ev->rid};
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
    esmd_buf_put_json_string(&attrs, ev->f->cfg->name, strlen(ev->f->cfg->name));
    esmd_buf_puts(&attrs, "}}");
    send_out(ev, uri, ev->payload, ev->len, esmd_buf_cstr(&attrs), true);
    esmd_buf_free(&attrs);
}

/* Retries are over or the event is too old: on_failure record and dead-letter message. */
static void route_failure(struct aq_ev *ev, const char *condition)
{
    struct aq_fn *f = ev->f;
    const char *uri = fn_dest(f, false);
    struct esmd_log_ctx lc = {NULL, f->cfg->name, ev->rid};
    esmd_series_inc(strcmp(condition, "EventAgeExceeded") == 0 ? f->m_drop_age : f->m_drop_retries,
                    1);
    ESMD_INFO(&lc, "async: event dropped (%s) after %d invocation(s)%s", condition, ev->invokes,
              uri || f->cfg->async.dead_letter ? "; routed to its destinations" : "");
    ev->routed_failure = true;
    if (uri) {
        struct esmd_buf rec = ESMD_BUF_INIT;
        const char *resp = ev->last_resp;
        build_record(&rec, ev, condition, ev->last_status > 0 ? ev->last_status : -1, ev->last_fe,
                     resp, resp ? strlen(resp) : 0);
        send_out(ev, uri, rec.data, rec.len, NULL, false);
        esmd_buf_free(&rec);
    }
    if (f->cfg->async.dead_letter)
        send_dead_letter(ev, f->cfg->async.dead_letter);
    sends_done(ev);
}

static void set_str(char **dst, const char *s, size_t n)
{
    free(*dst);
    *dst = s ? esmd_xstrndup(s, n) : NULL;
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
                 ts, ev->rid, esmd_invoke_timeout_seconds(res, f->cfg->timeout_ms));
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
        int64_t delay = esmd_backoff_delay(&q->backoff, ev->throttles, esmd_random64());
        if (res->retry_after_ms > delay)
            delay =
                res->retry_after_ms > q->backoff.cap_ms ? q->backoff.cap_ms : res->retry_after_ms;
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
    if (!q->stopping)
        claim_schedule(q);
    stop_maybe_done(q);
}

/* ---- the settle statement ---- */

static void settle_done(void *ud, const PGresult *res, const char *err)
{
    struct esmd_asyncq *q = ud;
    ESMD_UNUSED(res);
    q->settling = false;
    if (err && !q->closing)
        esmd_log_limited(ESMD_LOG_WARN, NULL, "async-settle",
                         "async: settling events failed: %s (they run again after their lease)",
                         err);
    if (q->closing)
        return;
    if (q->ndels || q->nupds)
        settle_schedule(q);
    stop_maybe_done(q);
}

static void settle_flush(struct esmd_asyncq *q)
{
    if (q->settling || q->closing || (q->ndels == 0 && q->nupds == 0))
        return;
    struct esmd_buf dels = ESMD_BUF_INIT, ids = ESMD_BUF_INIT, att = ESMD_BUF_INIT,
                    inv = ESMD_BUF_INIT, thr = ESMD_BUF_INIT, st = ESMD_BUF_INIT,
                    dly = ESMD_BUF_INIT, fe = ESMD_BUF_INIT, rsp = ESMD_BUF_INIT,
                    er = ESMD_BUF_INIT;
    /* at most AQ_SETTLE_MAX of each per statement: the planner joins a longer array of ids with
     * a scan of the whole table instead of the primary key; the rest goes in the next one */
    size_t nd = q->ndels < AQ_SETTLE_MAX ? q->ndels : AQ_SETTLE_MAX;
    size_t nu = q->nupds < AQ_SETTLE_MAX ? q->nupds : AQ_SETTLE_MAX;
    esmd_buf_putc(&dels, '{');
    for (size_t i = 0; i < nd; i++)
        esmd_buf_printf(&dels, "%s%lld", i ? "," : "", (long long)q->dels[i]);
    esmd_buf_putc(&dels, '}');
    if (q->ndels > nd)
        memmove(q->dels, q->dels + nd, (q->ndels - nd) * sizeof(*q->dels));
    q->ndels -= nd;
    struct esmd_buf *arrs[] = {&ids, &att, &inv, &thr, &st, &dly, &fe, &rsp, &er};
    for (size_t k = 0; k < ESMD_ARRAY_LEN(arrs); k++)
        esmd_buf_putc(arrs[k], '{');
    for (size_t i = 0; i < nu; i++) {
        struct aq_upd *u = &q->upds[i];
        const char *sep = i ? "," : "";
        esmd_buf_printf(&ids, "%s%lld", sep, (long long)u->id);
        esmd_buf_printf(&att, "%s%d", sep, u->attempts);
        esmd_buf_printf(&inv, "%s%d", sep, u->invokes);
        esmd_buf_printf(&thr, "%s%d", sep, u->throttles);
        esmd_buf_printf(&st, "%s%d", sep, u->status);
        esmd_buf_printf(&dly, "%s%lld", sep, (long long)u->delay_ms);
        esmd_buf_puts(&fe, sep);
        put_array_text(&fe, u->fe);
        esmd_buf_puts(&rsp, sep);
        put_array_text(&rsp, u->resp);
        esmd_buf_puts(&er, sep);
        put_array_text(&er, u->err);
        free(u->fe);
        free(u->resp);
        free(u->err);
    }
    if (q->nupds > nu) /* (never with a NULL array: undefined even for 0 bytes) */
        memmove(q->upds, q->upds + nu, (q->nupds - nu) * sizeof(*q->upds));
    q->nupds -= nu;
    for (size_t k = 0; k < ESMD_ARRAY_LEN(arrs); k++)
        esmd_buf_putc(arrs[k], '}');
    const char *params[] = {esmd_buf_cstr(&dels), q->token,
                            esmd_buf_cstr(&ids),  esmd_buf_cstr(&att),
                            esmd_buf_cstr(&inv),  esmd_buf_cstr(&thr),
                            esmd_buf_cstr(&st),   esmd_buf_cstr(&dly),
                            esmd_buf_cstr(&fe),   esmd_buf_cstr(&rsp),
                            esmd_buf_cstr(&er)};
    q->settling = true;
    if (esmd_pg_query(q->done,
                      "WITH d AS (DELETE FROM esmd.async_events WHERE id = ANY($1::bigint[]) "
                      "AND lease_token = $2::uuid RETURNING 1), "
                      "u AS (UPDATE esmd.async_events e SET attempts = u.a, invokes = u.i, "
                      "throttles = u.t, last_status = u.s, "
                      "next_attempt_at = clock_timestamp() + make_interval(secs => u.d / 1000.0), "
                      "last_function_error = u.fe, last_response = u.r, last_error = u.er, "
                      "lease_owner = NULL, lease_token = NULL "
                      "FROM unnest($3::bigint[], $4::int[], $5::int[], $6::int[], $7::int[], "
                      "$8::bigint[], $9::text[], $10::text[], $11::text[]) "
                      "AS u(id, a, i, t, s, d, fe, r, er) "
                      "WHERE e.id = u.id AND e.lease_token = $2::uuid RETURNING 1) "
                      "SELECT (SELECT count(*) FROM d), (SELECT count(*) FROM u)",
                      11, params, settle_done, q) != 0)
        q->settling = false;
    for (size_t k = 0; k < ESMD_ARRAY_LEN(arrs); k++)
        esmd_buf_free(arrs[k]);
    esmd_buf_free(&dels);
}

static void settle_kick_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    ESMD_UNUSED(loop);
    ESMD_UNUSED(revents);
    settle_flush(w->data);
}

static void settle_schedule(struct esmd_asyncq *q)
{
    if (!q->settling)
        kick(q, &q->settle_kick);
}

/* ---- claims ---- */

static void aq_ev_start(struct esmd_asyncq *q, struct aq_fn *f, const PGresult *res, int r)
{
    struct aq_ev *ev = esmd_xcalloc(1, sizeof(*ev));
    ev->q = q;
    ev->f = f;
    f->outstanding++;
    ev->next = q->evs;
    if (q->evs)
        q->evs->prev = ev;
    q->evs = ev;
    ev->id = strtoll(PQgetvalue(res, r, 0), NULL, 10);
    snprintf(ev->rid, sizeof(ev->rid), "%s", PQgetvalue(res, r, 2));
    ev->len = (size_t)PQgetlength(res, r, 3);
    ev->payload = esmd_xstrndup(PQgetvalue(res, r, 3), ev->len);
    ev->received_ms = strtoll(PQgetvalue(res, r, 4), NULL, 10);
    ev->attempts = atoi(PQgetvalue(res, r, 5));
    ev->invokes = atoi(PQgetvalue(res, r, 6));
    ev->throttles = atoi(PQgetvalue(res, r, 7));
    ev->last_status = PQgetisnull(res, r, 8) ? 0 : atoi(PQgetvalue(res, r, 8));
    if (!PQgetisnull(res, r, 9))
        ev->last_fe = esmd_xstrdup(PQgetvalue(res, r, 9));
    if (!PQgetisnull(res, r, 10))
        ev->last_resp = esmd_xstrdup(PQgetvalue(res, r, 10));
    if (!PQgetisnull(res, r, 11))
        ev->last_err = esmd_xstrdup(PQgetvalue(res, r, 11));
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
    ev->ireq = esmd_invoke_start(f->fn, ev->payload, ev->len, ev->rid, NULL, ev_invoked, ev);
    if (!ev->ireq) /* the invoker is shutting down: run it later */
        settle_retry(ev, 0);
}

struct claim {
    struct esmd_asyncq *q;
    size_t n;
    struct aq_fn **fns;
    int *rooms;
};

static void claim_done(void *ud, const PGresult *res, const char *err)
{
    struct claim *c = ud;
    struct esmd_asyncq *q = c->q;
    q->claiming = false;
    if (q->closing) {
        free(c->fns);
        free(c->rooms);
        free(c);
        return;
    }
    if (err || !res) {
        /* not at once again: the poll timer retries every function (a claim that fails keeps
         * failing until the database is fixed, and a retry loop would only hammer it) */
        esmd_log_limited(ESMD_LOG_WARN, NULL, "async-claim",
                         "async: claiming events: %s (retried at the next poll)",
                         err ? err : "no result");
        q->claim_again = false;
    } else {
        int *got = esmd_xcalloc(c->n + 1, sizeof(int));
        for (int r = 0; r < PQntuples(res); r++) {
            const char *name = PQgetvalue(res, r, 1);
            for (size_t i = 0; i < c->n; i++) {
                if (strcmp(c->fns[i]->cfg->name, name) == 0) {
                    got[i]++;
                    aq_ev_start(q, c->fns[i], res, r);
                    break;
                }
            }
        }
        for (size_t i = 0; i < c->n; i++)
            if (got[i] >= c->rooms[i])
                c->fns[i]->more = true;
        free(got);
    }
    free(c->fns);
    free(c->rooms);
    free(c);
    if (q->claim_again && !q->stopping) {
        q->claim_again = false;
        claim_schedule(q);
    }
    for (size_t i = 0; i < q->nfns; i++)
        if (q->fns[i].more && !q->stopping)
            claim_schedule(q);
    stop_maybe_done(q);
}

static int fn_room(const struct aq_fn *f)
{
    int mc = f->cfg->max_concurrency > 0 ? f->cfg->max_concurrency : 1;
    int room = 2 * mc - f->outstanding;
    return room > AQ_CLAIM_MAX ? AQ_CLAIM_MAX : room;
}

static void claim_round(struct esmd_asyncq *q)
{
    if (q->stopping || q->closing || !q->workers)
        return;
    if (q->claiming) {
        q->claim_again = true;
        return;
    }
    bool all = q->claim_all;
    q->claim_all = false;
    struct claim *c = esmd_xcalloc(1, sizeof(*c));
    c->q = q;
    c->fns = esmd_xcalloc(q->nfns + 1, sizeof(*c->fns));
    c->rooms = esmd_xcalloc(q->nfns + 1, sizeof(*c->rooms));
    /* One subquery per function, each with its own LIMIT known when the statement is planned:
     * a LIMIT taken from a joined array is estimated at a tenth of the table, and the planner
     * then joins the claimed ids back with a sequential scan of the whole queue (a claim cost
     * that grew with the backlog). */
    struct esmd_buf sql = ESMD_BUF_INIT;
    const char **params = esmd_xcalloc(2 + 3 * q->nfns, sizeof(*params));
    char(*nums)[2][24] = esmd_xcalloc(q->nfns + 1, sizeof(*nums));
    params[0] = q->instance_id;
    params[1] = q->token;
    esmd_buf_puts(&sql, "UPDATE esmd.async_events e SET lease_owner = $1, lease_token = $2::uuid, "
                        "next_attempt_at = now() + make_interval(secs => claimed.lease / 1000.0) "
                        "FROM (");
    int np = 2;
    for (size_t i = 0; i < q->nfns; i++) {
        struct aq_fn *f = &q->fns[i];
        int room = fn_room(f);
        if ((!all && !f->more) || room <= 0)
            continue;
        f->more = false;
        c->fns[c->n] = f;
        c->rooms[c->n] = room;
        snprintf(nums[c->n][0], sizeof(nums[c->n][0]), "%d", room);
        snprintf(nums[c->n][1], sizeof(nums[c->n][1]), "%lld", (long long)fn_lease_ms(f));
        params[np] = f->cfg->name;
        params[np + 1] = nums[c->n][0];
        params[np + 2] = nums[c->n][1];
        esmd_buf_printf(&sql,
                        "%sSELECT * FROM (SELECT c.id, $%d::bigint AS lease "
                        "FROM esmd.async_events c "
                        "WHERE c.function = $%d AND c.next_attempt_at <= now() "
                        "ORDER BY c.next_attempt_at, c.id LIMIT $%d::int FOR UPDATE SKIP LOCKED) "
                        "f%zu",
                        c->n ? " UNION ALL " : "", np + 3, np + 1, np + 2, c->n);
        np += 3;
        c->n++;
    }
    if (c->n > 0) {
        esmd_buf_puts(&sql, ") AS claimed WHERE e.id = claimed.id "
                            "RETURNING e.id, e.function, e.request_id, e.payload, "
                            "(extract(epoch FROM e.received_at) * 1000)::bigint, e.attempts, "
                            "e.invokes, e.throttles, e.last_status, e.last_function_error, "
                            "e.last_response, e.last_error");
        q->claiming = true;
        if (esmd_pg_query(q->work, esmd_buf_cstr(&sql), np, params, claim_done, c) != 0)
            q->claiming = false;
    }
    if (!q->claiming) {
        free(c->fns);
        free(c->rooms);
        free(c);
    }
    free(params);
    free(nums);
    esmd_buf_free(&sql);
}

static void claim_kick_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    ESMD_UNUSED(loop);
    ESMD_UNUSED(revents);
    claim_round(w->data);
}

static void claim_schedule(struct esmd_asyncq *q)
{
    if (q->stopping || q->closing)
        return;
    kick(q, &q->claim_kick);
}

static void poll_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct esmd_asyncq *q = w->data;
    ESMD_UNUSED(loop);
    ESMD_UNUSED(revents);
    q->claim_all = true;
    claim_schedule(q);
}

/* ---- accepting: group commit ---- */

static void pending_free(struct aq_pending *p)
{
    free(p->payload);
    free(p);
}

struct ins_batch {
    struct esmd_asyncq *q;
    int conn;
    struct aq_pending *recs;
};

static void ins_flush(struct esmd_asyncq *q);
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
    struct esmd_buf names = ESMD_BUF_INIT;
    for (size_t i = 0; i < q->nfns; i++) {
        if (!q->fns[i].notify)
            continue;
        q->fns[i].notify = false;
        esmd_buf_putc(&names, names.len ? ',' : '{');
        put_array_text(&names, q->fns[i].cfg->name);
    }
    if (names.len == 0)
        return;
    esmd_buf_putc(&names, '}');
    const char *params[] = {esmd_buf_cstr(&names)};
    q->notifying = true;
    if (esmd_pg_query(q->done, "SELECT pg_notify('" AQ_CHANNEL "', f) FROM unnest($1::text[]) AS f",
                      1, params, notify_done, q) != 0)
        q->notifying = false;
    esmd_buf_free(&names);
}

static void ins_done(void *ud, const PGresult *res, const char *err)
{
    struct ins_batch *b = ud;
    struct esmd_asyncq *q = b->q;
    ESMD_UNUSED(res);
    q->inserting--;
    q->ins_busy[b->conn] = false;
    bool ok = err == NULL;
    if (!ok && !q->closing)
        esmd_log_limited(ESMD_LOG_WARN, NULL, "async-insert", "async: storing events: %s", err);
    while (b->recs) {
        struct aq_pending *p = b->recs;
        b->recs = p->next;
        if (ok) {
            esmd_series_inc(p->f->m_received, 1);
            p->f->more = true;
            p->f->notify = true;
        }
        p->cb(p->ud, ok, p->rid, ok ? NULL : err);
        pending_free(p);
    }
    free(b);
    if (q->closing)
        return;
    if (ok) {
        claim_schedule(q);
        notify_flush(q);
    }
    if (q->pend)
        ins_flush(q);
    stop_maybe_done(q);
}

/* 0..15 for a hex digit, -1 otherwise. */
static int hexval(char c)
{
    return c >= '0' && c <= '9' ? c - '0' : c >= 'a' && c <= 'f' ? c - 'a' + 10 : -1;
}

/* Every event waiting (up to AQ_INS_MAX_ROWS / AQ_INS_MAX_BYTES) goes into one INSERT on a free
 * connection: one statement, prepared once per connection (AQ_INSERT), whose three parameters
 * are binary arrays (functions, request ids, payloads), so neither side builds, parses or plans
 * a statement per batch. */
static void ins_flush(struct esmd_asyncq *q)
{
    while (q->pend && q->inserting < q->nins) {
        int conn = 0;
        while (q->ins_busy[conn])
            conn++;
        struct ins_batch *b = esmd_xcalloc(1, sizeof(*b));
        b->q = q;
        struct esmd_pg_array fns, rids, payloads;
        esmd_pg_array_start(&fns, ESMD_PG_OID_TEXT);
        esmd_pg_array_start(&rids, ESMD_PG_OID_UUID);
        esmd_pg_array_start(&payloads, ESMD_PG_OID_TEXT);
        struct aq_pending **tail = &b->recs;
        size_t n = 0, bytes = 0;
        while (q->pend && n < AQ_INS_MAX_ROWS &&
               (n == 0 || bytes + q->pend->len < AQ_INS_MAX_BYTES)) {
            struct aq_pending *p = q->pend;
            q->pend = p->next;
            if (!q->pend)
                q->pend_tail = NULL;
            q->npend--;
            p->next = NULL;
            *tail = p;
            tail = &p->next;
            unsigned char u[16];
            for (size_t i = 0, k = 0; i < 16; k++) {
                if (p->rid[k] == '-')
                    continue;
                u[i++] = (unsigned char)(hexval(p->rid[k]) << 4 | hexval(p->rid[k + 1]));
                k++;
            }
            esmd_pg_array_add(&fns, p->f->cfg->name, strlen(p->f->cfg->name));
            esmd_pg_array_add(&rids, u, sizeof(u));
            esmd_pg_array_add(&payloads, p->payload, p->len);
            bytes += p->len;
            n++;
        }
        esmd_pg_array_finish(&fns);
        esmd_pg_array_finish(&rids);
        esmd_pg_array_finish(&payloads);
        const char *params[] = {fns.buf.data, rids.buf.data, payloads.buf.data};
        const int lengths[] = {(int)fns.buf.len, (int)rids.buf.len, (int)payloads.buf.len};
        const int formats[] = {1, 1, 1};
        b->conn = conn;
        q->ins_busy[conn] = true;
        q->inserting++;
        if (esmd_pg_query_prepared(q->ins[conn], AQ_INSERT, 3, params, lengths, formats, ins_done,
                                   b) != 0)
            ins_done(b, NULL, "closed");
        esmd_buf_free(&fns.buf);
        esmd_buf_free(&rids.buf);
        esmd_buf_free(&payloads.buf);
    }
}

static void ins_kick_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    ESMD_UNUSED(loop);
    ESMD_UNUSED(revents);
    ins_flush(w->data);
}

int esmd_asyncq_enqueue(struct esmd_asyncq *q, const char *function, const char *payload,
                        size_t len, esmd_asyncq_cb cb, void *ud)
{
    if (!q || !function || !cb)
        return ESMD_EINVAL;
    if (q->stopping || q->closing)
        return ESMD_ESTATE;
    struct aq_fn *f = fn_find(q, function);
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
    p->cb = cb;
    p->ud = ud;
    if (q->pend_tail)
        q->pend_tail->next = p;
    else
        q->pend = p;
    q->pend_tail = p;
    q->npend++;
    kick(q, &q->ins_kick);
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
                    ov_clear(&q->fns[i].ov);
            }
            for (int r = 0; r < PQntuples(res); r++)
                ov_apply_row(q, res, r);
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
        q->claim_all = true;
    } else {
        struct aq_fn *f = fn_find(q, payload);
        if (f)
            f->more = true;
    }
    claim_schedule(q);
}

static void release_done(void *ud, const PGresult *res, const char *err)
{
    struct esmd_asyncq *q = ud;
    ESMD_UNUSED(res);
    q->config_queries--;
    if (err && !q->closing)
        ESMD_WARN(NULL, "async: releasing the leases of an earlier process: %s", err);
    if (!q->closing) {
        q->claim_all = true;
        claim_schedule(q);
        stop_maybe_done(q);
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
    const struct aq_fn *f = fn_find(q, function);
    if (!f)
        return ESMD_ENOENT;
    out->set = f->ov.has || f->cfg->async.set;
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
        ESMD_WARN(&(struct esmd_log_ctx){NULL, op->f->cfg->name, NULL},
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
    struct aq_fn *f = fn_find(q, function);
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
    int rc = esmd_asyncq_enqueue(q, function, payload, len, sink_done, sc);
    if (rc != 0)
        free(sc);
    return rc;
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
    struct esmd_asyncq *q = esmd_xcalloc(1, sizeof(*q));
    q->loop = loop;
    q->inv = inv;
    q->dests = dests;
    q->instance_id = esmd_xstrdup(instance_id && *instance_id ? instance_id : "esmd");
    esmd_uuid4(q->token);
    q->started_at = (double)esmd_now_ms() / 1000.0;
    q->retry_base_ms = env_ms("ESMD_ASYNC_RETRY_BASE_MS", 60000, 1);
    q->backoff.base_ms = env_ms("ESMD_ASYNC_BACKOFF_BASE_MS", 1000, 1);
    q->backoff.cap_ms = env_ms("ESMD_ASYNC_BACKOFF_CAP_MS", 300000, 1);
    q->poll_s = (double)env_ms("ESMD_ASYNC_POLL_MS", 1000, 10) / 1000.0;
    q->max_async = (size_t)env_ms("ESMD_ASYNC_MAX_PAYLOAD", 1048576, 1);
    if (q->max_async > ESMD_MAX_PAYLOAD)
        q->max_async = ESMD_MAX_PAYLOAD;
    q->lease_ms_override = env_ms("ESMD_ASYNC_LEASE_MS", -1, 1000);
    q->workers = env_ms("ESMD_ASYNC_WORKERS", 1, 0) != 0;
    q->nins = (int)env_ms("ESMD_ASYNC_INSERT_CONNS", 2, 1);
    if (q->nins > AQ_INS_CONNS_MAX) {
        ESMD_WARN(NULL, "async: ESMD_ASYNC_INSERT_CONNS=%d is more than %d: using %d", q->nins,
                  AQ_INS_CONNS_MAX, AQ_INS_CONNS_MAX);
        q->nins = AQ_INS_CONNS_MAX;
    }

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
    q->fns = esmd_xcalloc(cfg->nfunctions + 1, sizeof(*q->fns));
    for (size_t i = 0; i < cfg->nfunctions; i++) {
        struct aq_fn *f = &q->fns[q->nfns];
        f->q = q;
        f->cfg = &cfg->functions[i];
        f->fn = esmd_invoker_function(inv, f->cfg->name);
        if (!f->fn)
            continue;
        ov_clear(&f->ov);
        struct esmd_buf l = ESMD_BUF_INIT;
        esmd_metric_labels(&l, "function", f->cfg->name, NULL);
        f->m_received = esmd_series(m_rcv, esmd_buf_cstr(&l));
        f->m_age = esmd_series(m_age, esmd_buf_cstr(&l));
        f->m_dlq_err = esmd_series(m_dlq, esmd_buf_cstr(&l));
        esmd_buf_reset(&l);
        esmd_metric_labels(&l, "function", f->cfg->name, "reason", "RetriesExhausted", NULL);
        f->m_drop_retries = esmd_series(m_drop, esmd_buf_cstr(&l));
        esmd_buf_reset(&l);
        esmd_metric_labels(&l, "function", f->cfg->name, "reason", "EventAgeExceeded", NULL);
        f->m_drop_age = esmd_series(m_drop, esmd_buf_cstr(&l));
        esmd_buf_free(&l);
        q->nfns++;
    }
    ev_init(&q->ins_kick, ins_kick_cb);
    ev_init(&q->claim_kick, claim_kick_cb);
    ev_init(&q->settle_kick, settle_kick_cb);
    ev_init(&q->poll_tm, poll_cb);
    ev_init(&q->notify_gap, notify_gap_cb);
    q->ins_kick.data = q->claim_kick.data = q->settle_kick.data = q->poll_tm.data = q;
    q->notify_gap.data = q;

    for (int i = 0; i < q->nins; i++) {
        q->ins[i] = esmd_pg_new(loop, conninfo, "async-insert", err, errlen);
        if (!q->ins[i])
            goto fail;
        if (esmd_pg_prepare(q->ins[i], AQ_INSERT,
                            "INSERT INTO esmd.async_events (function, request_id, payload) "
                            "SELECT * FROM unnest($1::text[], $2::uuid[], $3::text[])",
                            3) != 0) {
            snprintf(err, errlen, "async queue: cannot prepare the insert");
            goto fail;
        }
    }
    q->work = esmd_pg_new(loop, conninfo, "async-worker", err, errlen);
    if (!q->work)
        goto fail;
    q->done = esmd_pg_new(loop, conninfo, "async-settle", err, errlen);
    if (!q->done)
        goto fail;
    if (esmd_pg_listen(q->work, AQ_CHANNEL, on_notify, q) != 0 ||
        esmd_pg_listen(q->work, AQ_CONFIG_CHANNEL, on_notify, q) != 0) {
        snprintf(err, errlen, "async queue: LISTEN failed");
        goto fail;
    }
    {
        const char *params[] = {q->instance_id, q->token};
        q->config_queries++;
        if (esmd_pg_query(q->work,
                          "UPDATE esmd.async_events SET next_attempt_at = now(), "
                          "lease_owner = NULL, lease_token = NULL "
                          "WHERE lease_owner = $1 AND lease_token IS DISTINCT FROM $2::uuid",
                          2, params, release_done, q) != 0)
            q->config_queries--;
    }
    config_reload(q, NULL);
    esmd_dests_set_function_sink(dests, sink, q);
    ev_timer_set(&q->poll_tm, q->poll_s, q->poll_s);
    ev_timer_start(loop, &q->poll_tm);
    ev_unref(loop); /* the poll timer alone does not keep the loop running */
    return q;
fail:
    esmd_asyncq_free(q);
    return NULL;
}

static bool aq_idle(const struct esmd_asyncq *q)
{
    return q->evs == NULL && q->pend == NULL && q->inserting == 0 && !q->settling &&
           !q->notifying && q->ndels == 0 && q->nupds == 0 && !q->claiming &&
           q->config_queries == 0;
}

static void stop_check_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct esmd_asyncq *q = w->data;
    ESMD_UNUSED(loop);
    ESMD_UNUSED(revents);
    if (!q->stopping || !q->stop_done || !aq_idle(q))
        return;
    void (*done)(void *ud) = q->stop_done;
    q->stop_done = NULL;
    done(q->stop_ud);
}

static void stop_maybe_done(struct esmd_asyncq *q)
{
    if (q->stopping && q->stop_done && !q->closing && aq_idle(q))
        kick(q, &q->stop_check);
}

void esmd_asyncq_stop(struct esmd_asyncq *q, void (*done)(void *ud), void *ud)
{
    if (!q)
        return;
    q->stopping = true;
    q->stop_done = done;
    q->stop_ud = ud;
    ev_init(&q->stop_check, stop_check_cb);
    q->stop_check.data = q;
    if (ev_is_active(&q->poll_tm)) {
        ev_ref(q->loop);
        ev_timer_stop(q->loop, &q->poll_tm);
    }
    ev_timer_stop(q->loop, &q->claim_kick);
    /* accepted events not yet sent to Postgres still go (their callers wait for the commit) */
    ins_flush(q);
    settle_schedule(q);
    kick(q, &q->stop_check);
}

void esmd_asyncq_free(struct esmd_asyncq *q)
{
    if (!q)
        return;
    q->closing = true;
    if (q->dests)
        esmd_dests_set_function_sink(q->dests, NULL, NULL);
    if (ev_is_active(&q->poll_tm)) {
        ev_ref(q->loop);
        ev_timer_stop(q->loop, &q->poll_tm);
    }
    ev_timer_stop(q->loop, &q->ins_kick);
    ev_timer_stop(q->loop, &q->claim_kick);
    ev_timer_stop(q->loop, &q->settle_kick);
    ev_timer_stop(q->loop, &q->stop_check);
    ev_timer_stop(q->loop, &q->notify_gap);
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
    while (q->pend) {
        struct aq_pending *p = q->pend;
        q->pend = p->next;
        p->cb(p->ud, false, p->rid, "shutting down");
        pending_free(p);
    }
    for (int i = 0; i < q->nins; i++)
        esmd_pg_free(q->ins[i]); /* inserts in flight: ins_done(closed) → their callers */
    esmd_pg_free(q->work);
    esmd_pg_free(q->done);
    for (size_t i = 0; i < q->nupds; i++) {
        free(q->upds[i].fe);
        free(q->upds[i].resp);
        free(q->upds[i].err);
    }
    free(q->upds);
    free(q->dels);
    for (size_t i = 0; i < q->nfns; i++)
        ov_clear(&q->fns[i].ov);
    free(q->fns);
    free(q->instance_id);
    free(q);
}

bool esmd_asyncq_ready(struct esmd_asyncq *q, struct esmd_buf *detail)
{
    bool ready = q && esmd_pg_ready(q->ins[0]) && esmd_pg_ready(q->work) && !q->stopping;
    if (detail) {
        int out = 0;
        for (size_t i = 0; q && i < q->nfns; i++)
            out += q->fns[i].outstanding;
        esmd_buf_printf(detail, "{\"ready\":%s,\"claimed\":%d,\"accepting\":%zu}",
                        ready ? "true" : "false", out, q ? q->npend : (size_t)0);
    }
    return ready;
}
