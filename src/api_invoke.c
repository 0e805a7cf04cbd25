/* Lambda's Invoke (include/esmd/api.h, docs/async.md): POST
 * /2015-03-31/functions/{FunctionName}/invocations with X-Amz-Invocation-Type RequestResponse
 * (the function's answer, through the invoker), Event (queued: 202 once committed) or DryRun
 * (204). */
#include "esmd/api.h"
#include "esmd/admin_auth.h"
#include "esmd/asyncq.h"
#include "esmd/trace.h"
#include "esmd/config.h"
#include "esmd/http.h"
#include "esmd/invoke.h"
#include "esmd/json.h"
#include "esmd/lambda_api.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define INV_JSON "application/json"

/* ---- RequestResponse ---- */

struct sync_call {
    struct esmd_api_call call; /* call.req NULL once the client went away */
    struct esmd_invoke_req *ireq;
    char *body;
    int64_t timeout_ms; /* the function's, for a timeout's message */
};

static void sync_abort(void *ud, struct esmd_http_req *req)
{
    struct sync_call *sc = ud;
    ESMD_UNUSED(req);
    sc->call.req = NULL;
    if (sc->ireq)
        esmd_invoke_cancel(sc->ireq); /* sync_done frees sc */
}

static void sync_done(void *ud, const struct esmd_invoke_result *res)
{
    struct sync_call *sc = ud;
    struct esmd_http_req *req = sc->call.req;
    sc->ireq = NULL;
    if (req) {
        esmd_http_req_on_abort(req, NULL, NULL);
        switch (res->outcome) {
        case ESMD_INVOKE_OK:
        case ESMD_INVOKE_FUNCTION_ERROR:
        case ESMD_INVOKE_TIMEOUT: {
            esmd_http_req_add_header(req, "X-Amz-Executed-Version", "$LATEST");
            if (res->outcome != ESMD_INVOKE_OK) {
                const char *fe = res->function_error;
                if (!fe || (strcmp(fe, "Handled") != 0 && strcmp(fe, "Unhandled") != 0))
                    fe = "Unhandled";
                esmd_http_req_add_header(req, "X-Amz-Function-Error", fe);
            }
            if (res->outcome == ESMD_INVOKE_TIMEOUT && !esmd_json_valid(res->body, res->body_len)) {
                char msg[200], ts[32];
                esmd_iso8601_ms(esmd_now_ms(), ts);
                snprintf(msg, sizeof(msg),
                         "{\"errorMessage\":\"%s %s Task timed out after %.2f seconds\","
                         "\"errorType\":\"Sandbox.Timedout\"}",
                         ts, sc->call.rid, esmd_invoke_timeout_seconds(res, sc->timeout_ms));
                esmd_api_respond(&sc->call, 200, INV_JSON, msg, strlen(msg));
            } else if (res->body_len == 0) {
                esmd_api_respond(&sc->call, 200, INV_JSON, "null", 4);
            } else {
                esmd_api_respond(&sc->call, 200, INV_JSON, res->body, res->body_len);
            }
            break;
        }
        case ESMD_INVOKE_THROTTLED: {
            char ra[32];
            int64_t s = res->retry_after_ms > 0 ? (res->retry_after_ms + 999) / 1000 : 1;
            snprintf(ra, sizeof(ra), "%lld", (long long)s);
            esmd_http_req_add_header(req, "Retry-After", ra);
            esmd_api_error(&sc->call, 429, "TooManyRequestsException",
                           "Rate Exceeded. (the function endpoint answered 429)");
            break;
        }
        case ESMD_INVOKE_ERROR:
            esmd_api_error(&sc->call, 502, "ServiceException", "the function endpoint failed: %s",
                           res->error ? res->error : "error");
            break;
        case ESMD_INVOKE_CANCELLED:
            esmd_api_error(&sc->call, 503, "ServiceException", "shutting down");
            break;
        }
    }
    free(sc->body);
    free(sc);
}

/* ---- Event ---- */

struct event_call {
    struct esmd_api_call call; /* call.req NULL once the client went away */
};

static void event_abort(void *ud, struct esmd_http_req *req)
{
    struct event_call *ec = ud;
    ESMD_UNUSED(req);
    ec->call.req = NULL;
}

static void event_done(void *ud, bool ok, const char *rid, const char *err)
{
    struct event_call *ec = ud;
    if (ec->call.req) {
        esmd_http_req_on_abort(ec->call.req, NULL, NULL);
        snprintf(ec->call.rid, sizeof(ec->call.rid), "%s", rid); /* the event's id */
        if (ok)
            esmd_api_respond(&ec->call, 202, NULL, "", 0);
        else /* Postgres's words (err) are in esmd's log, not for the client */
            esmd_api_error(&ec->call, 500, "ServiceException",
                           "could not store the event; it was not accepted (esmd's log says why)");
    }
    free(ec);
}

/* ---- the route ---- */

static size_t invoke_limit(void *ud, struct esmd_http_req *req)
{
    const struct esmd_api_ctx *ctx = ud;
    const char *t = esmd_http_req_header(req, "X-Amz-Invocation-Type");
    return t && strcmp(t, "Event") == 0 ? esmd_asyncq_max_payload(ctx->q) : ESMD_MAX_PAYLOAD;
}

/* The request's trace headers (traceparent, tracestate, X-Amzn-Trace-Id); malformed ones are
 * dropped (docs/operations.md#trace-context). */
static void request_trace(struct esmd_http_req *req, struct esmd_trace *t)
{
    static const char *const names[] = {ESMD_TRACE_TRACEPARENT, ESMD_TRACE_TRACESTATE,
                                        ESMD_TRACE_XRAY};
    esmd_trace_clear(t);
    for (size_t i = 0; i < ESMD_ARRAY_LEN(names); i++) {
        const char *v = esmd_http_req_header(req, names[i]);
        if (v)
            esmd_trace_set(t, names[i], v, strlen(v));
    }
}

static void invoke_event(const struct esmd_api_ctx *ctx, struct esmd_api_call *call,
                         const struct esmd_function_cfg *fc, const char *body, size_t len)
{
    struct event_call *ec = esmd_xcalloc(1, sizeof(*ec));
    ec->call = *call;
    struct esmd_trace trace;
    request_trace(call->req, &trace);
    int rc = esmd_asyncq_enqueue(ctx->q, fc->name, body, len, &trace, event_done, ec);
    if (rc != 0) {
        free(ec);
        if (rc == ESMD_ETOOBIG)
            esmd_api_error(call, 413, "RequestTooLargeException",
                           "Request must be smaller than %zu bytes for the InvokeFunction "
                           "operation with InvocationType Event",
                           esmd_asyncq_max_payload(ctx->q));
        else if (rc == ESMD_ESTATE)
            esmd_api_error(call, 503, "ServiceException", "shutting down");
        else
            esmd_api_error(call, 500, "ServiceException", "could not queue the event");
        return;
    }
    esmd_http_req_on_abort(call->req, event_abort, ec);
}

static void invoke_sync(const struct esmd_api_ctx *ctx, struct esmd_api_call *call,
                        const struct esmd_function_cfg *fc, const char *body, size_t len)
{
    struct esmd_function *fn = esmd_invoker_function(ctx->inv, fc->name);
    struct sync_call *sc = esmd_xcalloc(1, sizeof(*sc));
    sc->call = *call;
    sc->timeout_ms = fc->timeout_ms;
    if (len == 0) {
        body = "{}";
        len = 2;
    }
    sc->body = esmd_xstrndup(body, len);
    struct esmd_trace trace;
    request_trace(call->req, &trace);
    sc->ireq =
        fn ? esmd_invoke_start_traced(fn, sc->body, len, sc->call.rid, NULL, &trace, sync_done, sc)
           : NULL;
    if (!sc->ireq) {
        free(sc->body);
        free(sc);
        esmd_api_error(call, 503, "ServiceException", "shutting down");
        return;
    }
    esmd_http_req_on_abort(call->req, sync_abort, sc);
}

static void route_invoke(void *ud, struct esmd_http_req *req)
{
    const struct esmd_api_ctx *ctx = ud;
    struct esmd_api_call call;
    struct esmd_api_path p;
    const struct esmd_function_cfg *fc;

    esmd_api_begin(&call, req);
    if (!esmd_admin_authorize(ctx->auth, req))
        return;
    if (!esmd_api_path_split(&call, &p))
        return;
    if (p.n != 4 || strcmp(p.seg[0], "2015-03-31") != 0 || strcmp(p.seg[1], "functions") != 0 ||
        strcmp(p.seg[3], "invocations") != 0) {
        esmd_api_error(&call, 404, "ResourceNotFoundException", "no route for POST %s",
                       esmd_http_req_path(req));
        goto out;
    }
    if ((fc = esmd_api_resolve_function(&call, ctx->cfg, p.seg[2])) == NULL)
        goto out;
    const char *type = esmd_http_req_header(req, "X-Amz-Invocation-Type");
    if (!type || !*type)
        type = "RequestResponse";
    size_t len;
    const char *body = esmd_http_req_body(req, &len);
    if (strcmp(type, "DryRun") == 0) {
        esmd_api_respond(&call, 204, NULL, "", 0);
        goto out;
    }
    bool event = strcmp(type, "Event") == 0;
    if (!event && strcmp(type, "RequestResponse") != 0) {
        esmd_api_bad(&call,
                     "1 validation error detected: Value '%.64s' at 'invocationType' failed to "
                     "satisfy constraint: Member must satisfy enum value set: [Event, "
                     "RequestResponse, DryRun]",
                     type);
        goto out;
    }
    if (len > 0 && !esmd_json_valid(body, len)) {
        esmd_api_error(&call, 400, "InvalidRequestContentException",
                       "Could not parse request body into json: the payload is not one JSON "
                       "document");
        goto out;
    }
    if (!esmd_asyncq_accepting(ctx->q)) {
        esmd_api_error(&call, 503, "ServiceException", "shutting down");
        goto out;
    }
    if (event)
        invoke_event(ctx, &call, fc, body, len);
    else
        invoke_sync(ctx, &call, fc, body, len);
out:
    esmd_api_path_free(&p);
}

int esmd_api_invoke_routes(const struct esmd_api_ctx *ctx, struct esmd_http *http)
{
    if (!ctx || !ctx->q || !ctx->inv || !http)
        return ESMD_EINVAL;
    return esmd_http_route_limited(http, "POST", "/2015-03-31/functions/*", route_invoke,
                                   invoke_limit, (void *)ctx);
}
