/* Function invoker: HTTP POSTs on one libcurl multi handle driven by the libev loop.
 *
 * Endpoint contract (docs/endpoint.md): 2xx = success unless X-Amz-Function-Error is set or the
 * body is the Runtime Interface Emulator's {"errorType","errorMessage"} object (= function error);
 * a 2xx whose body is the RIE's "Task timed out after N seconds" text = timeout; 429 = throttled;
 * other 4xx/5xx and transport failures = error; curl timeout (the function's `timeout`) =
 * timeout. Per function: max_concurrency in-flight requests (shared by every user of the
 * function; the rest wait in FIFO order), extra headers, kept-alive connections. */
#ifndef ESMD_INVOKE_H
#define ESMD_INVOKE_H

#include "esmd/common.h"
#include "esmd/buf.h"
#include "esmd/config.h"
#include "esmd/log.h"

struct ev_loop;
struct esmd_invoker;
struct esmd_function;
struct esmd_invoke_req;

enum esmd_invoke_outcome {
    ESMD_INVOKE_OK,
    ESMD_INVOKE_FUNCTION_ERROR,
    ESMD_INVOKE_THROTTLED,
    ESMD_INVOKE_ERROR, /* other 4xx/5xx, connection refused/reset, ... */
    ESMD_INVOKE_TIMEOUT,
    ESMD_INVOKE_CANCELLED, /* esmd_invoke_cancel() or invoker shutdown before it was sent */
};

/* Everything in it is borrowed: valid only during the callback. */
struct esmd_invoke_result {
    enum esmd_invoke_outcome outcome;
    long status;      /* HTTP status, 0 when no response */
    const char *body; /* response body (NUL-terminated), "" when none */
    size_t body_len;
    const char *function_error; /* X-Amz-Function-Error value, or the RIE errorType; else NULL */
    int64_t retry_after_ms;     /* from Retry-After on 429/503; -1 when absent */
    double duration_s;          /* from send to response */
    const char *error;          /* human-readable reason when not OK; else NULL */
    const char *request_id;     /* the X-Esmd-Request-Id sent */
};

typedef void (*esmd_invoke_cb)(void *ud, const struct esmd_invoke_result *res);

/* How long to wait before sending again after a failed or throttled invocation: backoff_ms, or
 * the response's Retry-After when that is longer, honoured up to cap_ms. The one clamp of
 * Retry-After for every caller (mappings, the async queue). */
static inline int64_t esmd_invoke_retry_delay(const struct esmd_invoke_result *res,
                                              int64_t backoff_ms, int64_t cap_ms)
{
    int64_t ra = res->retry_after_ms < cap_ms ? res->retry_after_ms : cap_ms;
    return ra > backoff_ms ? ra : backoff_ms;
}

/* NULL on failure with the reason in err. */
struct esmd_invoker *esmd_invoker_new(struct ev_loop *loop, char *err,
                                      size_t errlen) ESMD_MUST_CHECK;
/* Cancels what is queued or in flight (callbacks get ESMD_INVOKE_CANCELLED) and frees. NULL ok.
 * Not from inside an invoke callback (ignored and logged). */
void esmd_invoker_free(struct esmd_invoker *inv);

/* Registers a function. cfg is borrowed and must outlive the invoker. The returned handle is
 * owned by the invoker. NULL if a function of that name exists already. */
struct esmd_function *esmd_invoker_add_function(struct esmd_invoker *inv,
                                                const struct esmd_function_cfg *cfg);
/* A reload (docs/operations.md#reload): the function cfg->name takes url, timeout, headers and
 * max_concurrency from cfg (borrowed, must outlive the invoker) for the requests sent from now
 * on; requests in flight finish on the old settings. A lower max_concurrency lets the requests
 * in flight finish and sends no new one above it. No-op when no function has that name. */
void esmd_invoker_update_function(struct esmd_invoker *inv, const struct esmd_function_cfg *cfg);
/* A reload removed the function from the file: it is no longer listed by
 * esmd_invoker_describe(); the handle stays (requests in flight, and the users that still hold
 * it, go on with its last settings) until esmd_invoker_update_function() brings it back. */
void esmd_invoker_remove_function(struct esmd_invoker *inv, const char *name);
/* A mapping a reload removed: every function drops its handles to the mapping's series (its
 * metrics, about to be hidden: esmd_metrics_hide), so that they can be freed. Its counts stay in
 * esmd_invoker_describe's while the series are kept. A request of that mapping still out (none
 * once the mapping is freed) is no longer counted. */
void esmd_invoker_forget_mapping(struct esmd_invoker *inv, const char *mapping);
struct esmd_function *esmd_invoker_function(struct esmd_invoker *inv, const char *name);
const char *esmd_function_name(const struct esmd_function *fn);
/* The configuration the function's new requests use (the last esmd_invoker_update_function's). */
const struct esmd_function_cfg *esmd_function_cfg(const struct esmd_function *fn);
/* Requests sent and not yet answered / waiting for a concurrency slot. */
/* Appends {"functions":[{"name","url","max_concurrency","concurrency_in_use","queued",
 * "invocations","errors","function_errors","timeouts","throttles","p50_seconds","p99_seconds"}]}:
 * counts since the start, over every caller (mappings, the async queue, Invoke), read from the
 * metrics (a removed mapping's too, while its hidden series are kept: esmd_metrics_hide);
 * latencies estimated from esmd_duration_seconds's buckets (null before any). For the admin
 * console. */
void esmd_invoker_describe(const struct esmd_invoker *inv, struct esmd_buf *out);
int esmd_function_inflight(const struct esmd_function *fn);
int esmd_function_queued(const struct esmd_function *fn);
/* The function's max_concurrency (at least 1). */
int esmd_function_max_concurrency(const struct esmd_function *fn);

/* Starts (or queues, when the function is at max_concurrency) one POST of `body`.
 * body: borrowed, must stay valid until cb runs or esmd_invoke_cancel() returns.
 * idempotency_key: copied; sent as X-Esmd-Idempotency-Key. mapping: copied, for logs and
 * metrics (NULL for async invocations). cb runs exactly once, from the loop, never inside this
 * call. The returned handle is valid until cb runs. NULL (and cb never runs) when fn or cb is
 * NULL or the invoker is shutting down (a CANCELLED callback during esmd_invoker_free()).
 * Control bytes in idempotency_key are sent as %XX. */
struct esmd_invoke_req *esmd_invoke_start(struct esmd_function *fn, const char *body, size_t len,
                                          const char *idempotency_key, const char *mapping,
                                          esmd_invoke_cb cb, void *ud);
struct esmd_trace;
/* As esmd_invoke_start, with the trace context sent as headers (traceparent, tracestate,
 * X-Amzn-Trace-Id; each form completed from the other, esmd_trace_complete()) and its trace id
 * on the request's log lines. trace: copied; NULL or empty for none. */
struct esmd_invoke_req *esmd_invoke_start_traced(struct esmd_function *fn, const char *body,
                                                 size_t len, const char *idempotency_key,
                                                 const char *mapping,
                                                 const struct esmd_trace *trace, esmd_invoke_cb cb,
                                                 void *ud);
/* Aborts a request; its cb is called with ESMD_INVOKE_CANCELLED before this returns. A no-op
 * from inside the request's own callback. */
void esmd_invoke_cancel(struct esmd_invoke_req *req);

const char *esmd_invoke_outcome_name(enum esmd_invoke_outcome o);

/* The seconds a timed-out invocation ran, for Lambda's "Task timed out after N seconds": the
 * function's own timeout when its answer said so (the RIE answers "Task timed out after 1.00
 * seconds" for AWS_LAMBDA_FUNCTION_TIMEOUT=1), else timeout_ms, which cut the request off. */
double esmd_invoke_timeout_seconds(const struct esmd_invoke_result *res, int64_t timeout_ms);

#endif
