/* Lambda's event-invoke-config operations (include/esmd/api.h, docs/async.md):
 *   PUT    .../event-invoke-config       PutFunctionEventInvokeConfig (every field)
 *   POST   .../event-invoke-config       UpdateFunctionEventInvokeConfig (the fields sent)
 *   GET    .../event-invoke-config       GetFunctionEventInvokeConfig
 *   DELETE .../event-invoke-config       DeleteFunctionEventInvokeConfig
 *   GET    .../event-invoke-config/list  ListFunctionEventInvokeConfigs
 * under /2019-09-25/functions/{FunctionName}. The body is checked strictly (lambda_api.h), the
 * values against their ranges and the destinations by esmd_dests_check(); the queue stores them
 * (esmd_asyncq_eic_put). */
#include "esmd/admin_auth.h"
#include "esmd/api.h"
#include "esmd/asyncq.h"
#include "esmd/config.h"
#include "esmd/destination.h"
#include "esmd/http.h"
#include "esmd/lambda_api.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define EIC_DEST_MAX 350 /* characters of a Destination */

static const struct esmd_api_range eic_mra = {"MaximumRetryAttempts", "maximumRetryAttempts", 0, 2};
static const struct esmd_api_range eic_age = {"MaximumEventAgeInSeconds",
                                              "maximumEventAgeInSeconds", 60, 21600};
static const struct esmd_api_range eic_max_items = {"MaxItems", "maxItems", 1, 50};

/* ---- answers ---- */

static void put_dest_json(struct esmd_buf *b, const char *uri)
{
    if (uri && *uri) {
        esmd_buf_puts(b, "{\"Destination\":");
        esmd_buf_put_json_string(b, uri, strlen(uri));
        esmd_buf_putc(b, '}');
    } else {
        esmd_buf_puts(b, "{}");
    }
}

/* The configuration of `function` in force, as Lambda's FunctionEventInvokeConfig. */
static void eic_json(struct esmd_buf *b, const char *function, const struct esmd_asyncq_eic *e)
{
    char arn[300];
    esmd_function_arn(function, arn, sizeof(arn));
    esmd_buf_printf(b,
                    "{\"FunctionArn\":\"%s:$LATEST\",\"LastModified\":%.3f,"
                    "\"MaximumRetryAttempts\":%d,\"MaximumEventAgeInSeconds\":%lld,"
                    "\"DestinationConfig\":{\"OnSuccess\":",
                    arn, e->last_modified, e->maximum_retry_attempts,
                    (long long)e->maximum_event_age_s);
    put_dest_json(b, e->on_success);
    esmd_buf_puts(b, ",\"OnFailure\":");
    put_dest_json(b, e->on_failure);
    esmd_buf_puts(b, "}}");
}

static void eic_respond(const struct esmd_api_ctx *ctx, struct esmd_api_call *call,
                        const char *function)
{
    struct esmd_asyncq_eic e;
    struct esmd_buf b = ESMD_BUF_INIT;
    if (esmd_asyncq_eic_get(ctx->q, function, &e) != 0) { /* a reload removed it meanwhile */
        char arn[300];
        esmd_function_arn(function, arn, sizeof(arn));
        esmd_api_error(call, 404, "ResourceNotFoundException", "Function not found: %s", arn);
        return;
    }
    eic_json(&b, function, &e);
    esmd_api_respond_json(call, 200, &b);
    esmd_buf_free(&b);
}

static void eic_not_found(struct esmd_api_call *call, const char *function)
{
    char arn[300];
    esmd_function_arn(function, arn, sizeof(arn));
    esmd_api_error(call, 404, "ResourceNotFoundException",
                   "The function %s:$LATEST doesn't have an EventInvokeConfig", arn);
}

/* ---- writes ---- */

struct eic_call {
    const struct esmd_api_ctx *ctx;
    struct esmd_api_call call; /* call.req NULL once the client went away */
    char *function;            /* owned: a reload may free the configuration meanwhile */
    bool is_delete;
};

static void eic_abort(void *ud, struct esmd_http_req *req)
{
    struct eic_call *ec = ud;
    ESMD_UNUSED(req);
    ec->call.req = NULL;
}

static void eic_done(void *ud, int rc)
{
    struct eic_call *ec = ud;
    if (ec->call.req) {
        esmd_http_req_on_abort(ec->call.req, NULL, NULL);
        if (rc == ESMD_ENOENT)
            eic_not_found(&ec->call, ec->function);
        else if (rc != 0) /* the database's message is in the log, not for the client */
            esmd_api_error(&ec->call, 500, "ServiceException", "could not store the configuration");
        else if (ec->is_delete)
            esmd_api_respond(&ec->call, 204, NULL, "", 0);
        else
            eic_respond(ec->ctx, &ec->call, ec->function);
    }
    free(ec->function);
    free(ec);
}

/* Reads DestinationConfig.<which> (obj may be NULL) into out: an esmd destination URI, or a
 * Lambda function ARN of this region and account (becomes function://NAME); "" for none.
 * false with why. dests NULL: the URI is not checked further. */
static bool eic_dest(const struct esmd_dests *dests, const cJSON *obj, const char *which, char *out,
                     size_t outlen, char *why, size_t whylen)
{
    out[0] = '\0';
    if (obj == NULL || cJSON_IsNull(obj))
        return true;
    if (!cJSON_IsObject(obj)) {
        snprintf(why, whylen, "DestinationConfig.%s must be an object", which);
        return false;
    }
    const cJSON *d = cJSON_GetObjectItemCaseSensitive(obj, "Destination");
    if (d == NULL || cJSON_IsNull(d) || (cJSON_IsString(d) && d->valuestring[0] == '\0'))
        return true;
    if (!cJSON_IsString(d) || strlen(d->valuestring) > EIC_DEST_MAX) {
        snprintf(why, whylen,
                 "DestinationConfig.%s.Destination must be a string of at most %d characters",
                 which, EIC_DEST_MAX);
        return false;
    }
    const char *v = d->valuestring;
    if (strncmp(v, "arn:", 4) == 0) {
        struct esmd_api_fn fn;
        if (strncmp(v, "arn:aws:lambda:", 15) != 0 || strstr(v, ":function:") == NULL ||
            esmd_api_function_parse(v, strlen(v), &fn) != 0) {
            snprintf(why, whylen,
                     "DestinationConfig.%s.Destination %s: esmd takes a destination URI "
                     "(function://NAME, http(s)://..., kafka://CONNECTION/TOPIC, "
                     "redis://CONNECTION/STREAM, pgqueue://QUEUE) or a Lambda function ARN",
                     which, v);
            return false;
        }
        if (!fn.ours) {
            snprintf(why, whylen,
                     "DestinationConfig.%s.Destination %s: not a function of this region and "
                     "account (arn:aws:lambda:%s:%s:function:NAME)",
                     which, v, esmd_aws_region(), esmd_aws_account());
            return false;
        }
        snprintf(out, outlen, "function://%s", fn.name);
    } else {
        snprintf(out, outlen, "%s", v);
    }
    char err[512];
    if (dests && esmd_dests_check(dests, out, err, sizeof(err)) != 0) {
        snprintf(why, whylen, "DestinationConfig.%s.Destination: %s", which, err);
        return false;
    }
    return true;
}

/* Parses the body of a Put (replace) or Update into ch (destinations into succ and fail, destlen
 * bytes each). false with e. */
static bool eic_parse(const struct esmd_dests *dests, const char *body, size_t len,
                      struct esmd_asyncq_eic_change *ch, char *succ, char *fail, size_t destlen,
                      struct esmd_api_err *e)
{
    cJSON *j = esmd_api_parse_object(body, len, false, e);
    char why[700];
    int64_t n;
    bool ok = false;
    if (!j)
        return false;
    const cJSON *m = cJSON_GetObjectItemCaseSensitive(j, "MaximumRetryAttempts");
    const cJSON *a = cJSON_GetObjectItemCaseSensitive(j, "MaximumEventAgeInSeconds");
    const cJSON *dc = cJSON_GetObjectItemCaseSensitive(j, "DestinationConfig");
    if (m && !cJSON_IsNull(m)) {
        if (!esmd_api_json_int(m, &eic_mra, &n)) {
            esmd_api_range_err(e, &eic_mra, NULL);
            goto out;
        }
        ch->maximum_retry_attempts = (int)n;
    }
    if (a && !cJSON_IsNull(a)) {
        if (!esmd_api_json_int(a, &eic_age, &n)) {
            esmd_api_range_err(e, &eic_age, NULL);
            goto out;
        }
        ch->maximum_event_age_s = (int)n;
    }
    if (dc && !cJSON_IsNull(dc)) {
        if (!cJSON_IsObject(dc)) {
            esmd_api_err_bad(e, "DestinationConfig must be an object");
            goto out;
        }
        const cJSON *os = cJSON_GetObjectItemCaseSensitive(dc, "OnSuccess");
        const cJSON *of = cJSON_GetObjectItemCaseSensitive(dc, "OnFailure");
        if (!eic_dest(dests, os, "OnSuccess", succ, destlen, why, sizeof(why)) ||
            !eic_dest(dests, of, "OnFailure", fail, destlen, why, sizeof(why))) {
            esmd_api_err_bad(e, "%s", why);
            goto out;
        }
        ch->on_success = os ? succ : NULL;
        ch->on_failure = of ? fail : NULL;
    }
    ok = true;
out:
    cJSON_Delete(j);
    return ok;
}

int esmd_api_eic_check(const char *body, size_t len, char *why, size_t whylen)
{
    struct esmd_asyncq_eic_change ch = {.maximum_retry_attempts = -1, .maximum_event_age_s = -1};
    char succ[EIC_DEST_MAX + 64], fail[EIC_DEST_MAX + 64];
    struct esmd_api_err e;
    if (eic_parse(NULL, body, len, &ch, succ, fail, sizeof(succ), &e))
        return 0;
    snprintf(why, whylen, "%s: %s", e.type, e.message);
    return e.status;
}

static void eic_change(const struct esmd_api_ctx *ctx, struct esmd_api_call *call,
                       const struct esmd_function_cfg *fc, bool is_delete, bool replace)
{
    struct esmd_asyncq_eic_change ch = {
        .replace = replace, .maximum_retry_attempts = -1, .maximum_event_age_s = -1};
    char succ[EIC_DEST_MAX + 64], fail[EIC_DEST_MAX + 64];
    struct esmd_api_err e;
    size_t len;
    const char *body = esmd_http_req_body(call->req, &len);
    int rc;
    if (!is_delete && !eic_parse(ctx->dests, body, len, &ch, succ, fail, sizeof(succ), &e)) {
        esmd_api_answer_err(call, &e);
        return;
    }
    struct eic_call *ec = esmd_xcalloc(1, sizeof(*ec));
    ec->ctx = ctx;
    ec->call = *call;
    ec->function = esmd_xstrdup(fc->name);
    ec->is_delete = is_delete;
    rc = is_delete ? esmd_asyncq_eic_delete(ctx->q, fc->name, eic_done, ec)
                   : esmd_asyncq_eic_put(ctx->q, fc->name, &ch, eic_done, ec);
    if (rc != 0) {
        free(ec->function);
        free(ec);
        if (rc == ESMD_ENOENT)
            eic_not_found(call, fc->name);
        else
            esmd_api_error(call, 503, "ServiceException", "shutting down");
        return;
    }
    esmd_http_req_on_abort(call->req, eic_abort, ec);
}

/* ---- the route ---- */

static void eic_list(const struct esmd_api_ctx *ctx, struct esmd_api_call *call,
                     const struct esmd_function_cfg *fc)
{
    const char *mi = esmd_http_req_query(call->req, "MaxItems");
    struct esmd_asyncq_eic e;
    struct esmd_buf b = ESMD_BUF_INIT;
    int64_t n;
    if (mi && !esmd_api_query_int(mi, &eic_max_items, &n)) {
        esmd_api_range_error(call, &eic_max_items, mi);
        return;
    }
    esmd_buf_puts(&b, "{\"FunctionEventInvokeConfigs\":[");
    if (esmd_asyncq_eic_get(ctx->q, fc->name, &e) == 0 && e.set)
        eic_json(&b, fc->name, &e);
    esmd_buf_puts(&b, "]}");
    esmd_api_respond_json(call, 200, &b);
    esmd_buf_free(&b);
}

static void route_eic(void *ud, struct esmd_http_req *req)
{
    const struct esmd_api_ctx *ctx = ud;
    const char *method = esmd_http_req_method(req);
    bool get = strcmp(method, "GET") == 0 || strcmp(method, "HEAD") == 0, list;
    struct esmd_api_call call;
    struct esmd_api_path p;
    const struct esmd_function_cfg *fc;
    struct esmd_asyncq_eic e;

    esmd_api_begin(&call, req);
    if (!esmd_admin_authorize(ctx->auth, req))
        return;
    if (!esmd_api_path_split(&call, &p))
        return;
    list = p.n == 5 && strcmp(p.seg[4], "list") == 0;
    if ((p.n != 4 && !list) || strcmp(p.seg[0], "2019-09-25") != 0 ||
        strcmp(p.seg[1], "functions") != 0 || strcmp(p.seg[3], "event-invoke-config") != 0) {
        esmd_api_error(&call, 404, "ResourceNotFoundException", "no route for %s %s", method,
                       esmd_http_req_path(req));
        goto out;
    }
    if (list && !get) {
        esmd_http_req_add_header(req, "Allow", "GET");
        esmd_api_error(&call, 405, "MethodNotAllowedException", "method %s not allowed on %s",
                       method, esmd_http_req_path(req));
        goto out;
    }
    if ((fc = esmd_api_resolve_function(&call, ctx->cfg, p.seg[2])) == NULL)
        goto out;
    if (list) {
        eic_list(ctx, &call, fc);
    } else if (get) {
        if (esmd_asyncq_eic_get(ctx->q, fc->name, &e) != 0 || !e.set)
            eic_not_found(&call, fc->name);
        else
            eic_respond(ctx, &call, fc->name);
    } else {
        eic_change(ctx, &call, fc, strcmp(method, "DELETE") == 0, strcmp(method, "PUT") == 0);
    }
out:
    esmd_api_path_free(&p);
}

int esmd_api_eic_routes(const struct esmd_api_ctx *ctx, struct esmd_http *http)
{
    static const char *const methods[] = {"GET", "PUT", "POST", "DELETE"};
    if (!ctx || !ctx->q || !ctx->dests || !http)
        return ESMD_EINVAL;
    for (size_t i = 0; i < ESMD_ARRAY_LEN(methods); i++)
        if (esmd_http_route(http, methods[i], "/2019-09-25/functions/*", route_eic, (void *)ctx) !=
            0)
            return ESMD_EINVAL;
    return ESMD_OK;
}
