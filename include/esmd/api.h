/* The Lambda-compatible routes of the async queue (docs/async.md, docs/admin.md):
 *   POST /2015-03-31/functions/{FunctionName}/invocations             Invoke (src/api_invoke.c)
 *   PUT|POST|GET|DELETE /2019-09-25/functions/{FunctionName}/event-invoke-config
 *   GET /2019-09-25/functions/{FunctionName}/event-invoke-config/list  (src/api_eic.c)
 * Both follow Lambda's conventions through include/esmd/lambda_api.h and reach the queue only
 * through include/esmd/asyncq.h. Everything runs on the loop thread. */
#ifndef ESMD_API_H
#define ESMD_API_H

#include "esmd/common.h"

struct esmd_admin_auth;
struct esmd_asyncq;
struct esmd_config;
struct esmd_dests;
struct esmd_http;
struct esmd_invoker;

/* What the routes use; every pointer borrowed. The struct itself is borrowed by the routes: it
 * must outlive the listener (esmd_http_stop()). */
struct esmd_api_ctx {
    const struct esmd_config *cfg; /* in force: a reload points it at its configuration */
    struct esmd_asyncq *q;
    struct esmd_invoker *inv;
    struct esmd_dests *dests;           /* event-invoke-config destinations are checked by it */
    const struct esmd_admin_auth *auth; /* NULL: loopback clients only */
};

/* Registers Invoke on http. 0 or ESMD_EINVAL. */
int esmd_api_invoke_routes(const struct esmd_api_ctx *ctx, struct esmd_http *http) ESMD_MUST_CHECK;

/* Registers the event-invoke-config operations on http. 0 or ESMD_EINVAL. */
int esmd_api_eic_routes(const struct esmd_api_ctx *ctx, struct esmd_http *http) ESMD_MUST_CHECK;

/* ---- pieces, for tests ---- */

/* Checks a Put/UpdateFunctionEventInvokeConfig body as the route does, without the destination
 * router (destination URIs are checked for shape only). Returns 0, or the status of the error
 * answer with "Type: message" in why. */
int esmd_api_eic_check(const char *body, size_t len, char *why, size_t whylen);

#endif
