/* Function invoker: one libcurl multi handle driven by the libev loop (include/esmd/curl_ev.h,
 * shared with the http(s):// destination writer).
 *
 * curl's socket callback only arms ev_io watchers and its timer callback the one ev_timer; the
 * watchers call curl_multi_socket_action() and then drain curl_multi_info_read(). A request is
 * QUEUED (waiting for a concurrency slot of its function), ACTIVE (its easy handle is in the
 * multi), DEFERRED (failed before it could be sent; its callback waits for the next loop turn)
 * or CALLING (its callback is running; it is freed when the callback returns). Easy handles are
 * pooled and reused; connections live in the multi's connection cache and are kept alive. */
#include "esmd/invoke.h"
#include "esmd/buf.h"
#include "esmd/curl_ev.h"
#include "esmd/metrics.h"
#include "esmd/trace.h"

#include <cJSON.h>
#include <curl/curl.h>
#include <ev.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

/* Bodies larger than this are parsed for the RIE's {"errorType","errorMessage"} only when they
 * contain "errorType". */
#define ESMD_INVOKE_PARSE_MAX (64 * 1024)
#define ESMD_INVOKE_DEFAULT_TIMEOUT_MS 30000
#define ESMD_INVOKE_FNERR_MAX 128

struct esmd_invoke_link {
    struct esmd_invoke_link *prev, *next;
};

enum esmd_req_state { REQ_QUEUED, REQ_ACTIVE, REQ_DEFERRED, REQ_CALLING };

/* Per (function, mapping) series, looked up once. */
struct esmd_fn_stats {
    struct esmd_fn_stats *next;
    char *mapping; /* owned; NULL for requests without a mapping */
    struct esmd_series *invocations, *errors, *throttles, *timeouts, *function_errors;
    struct esmd_series *duration;
};

struct esmd_function {
    struct esmd_invoker *inv;
    const struct esmd_function_cfg *cfg; /* borrowed */
    bool removed; /* by a reload: not listed (esmd_invoker_remove_function) */
    int max_concurrency;
    long timeout_ms;
    unsigned gen;   /* esmd_invoker_update_function() count: easy handles of older ones go */
    char **headers; /* owned: "Name: value" lines from cfg->headers */
    size_t nheaders;
    bool has_content_type;
    int inflight, nqueued;
    struct esmd_invoke_link queue;  /* REQ_QUEUED, FIFO */
    struct esmd_invoke_link active; /* REQ_ACTIVE */
    struct esmd_fn_stats *stats;    /* owned list */
    struct esmd_series *concurrent, *queued;
    CURL **pool; /* idle easy handles, already set up for this function (max_concurrency) */
    size_t npool;
};

struct esmd_invoke_req {
    struct esmd_invoke_link link; /* in fn->queue, fn->active or inv->deferred */
    enum esmd_req_state state;
    struct esmd_function *fn;
    struct esmd_fn_stats *stats;
    const char *body; /* borrowed */
    size_t len;
    char *idempotency_key; /* owned */
    char *mapping;         /* owned */
    esmd_invoke_cb cb;
    void *ud;
    char request_id[37];
    struct esmd_trace trace;              /* sent as headers; empty when none */
    char trace_id[ESMD_TRACE_ID_LEN + 1]; /* for log lines, "" when none */
    CURL *easy;                           /* while ACTIVE; back to the pool afterwards */
    unsigned gen;                         /* fn->gen when easy was set up */
    long timeout_ms;                      /* fn->timeout_ms when it was sent */
    struct curl_slist *headers;           /* owned */
    struct esmd_buf resp;
    bool too_large;
    char function_error[ESMD_INVOKE_FNERR_MAX]; /* from X-Amz-Function-Error, "" if none */
    char retry_after[64];                       /* raw Retry-After value, "" if none */
    double started;                             /* esmd_mono() when sent */
    enum esmd_invoke_outcome deferred_outcome;  /* REQ_DEFERRED */
    char errbuf[CURL_ERROR_SIZE];
};

struct esmd_invoker {
    struct ev_loop *loop;
    struct esmd_curl_ev ce; /* the multi handle on the loop */
    ev_timer deferred_timer;
    struct esmd_invoke_link deferred; /* REQ_DEFERRED */
    struct esmd_function **fns;       /* owned */
    size_t nfns;
    long total_concurrency;
    int calling; /* > 0 while a request callback runs */
    bool closing;
    struct esmd_metric *m_invocations, *m_errors, *m_throttles, *m_timeouts, *m_function_errors;
    struct esmd_metric *m_duration, *m_concurrent, *m_queued;
};

static void invoke_pump(struct esmd_function *fn);

/* ---- intrusive lists ---- */

static void link_init(struct esmd_invoke_link *head)
{
    head->prev = head->next = head;
}

static bool link_empty(const struct esmd_invoke_link *head)
{
    return head->next == head;
}

static void link_append(struct esmd_invoke_link *head, struct esmd_invoke_link *l)
{
    l->prev = head->prev;
    l->next = head;
    head->prev->next = l;
    head->prev = l;
}

static void link_remove(struct esmd_invoke_link *l)
{
    l->prev->next = l->next;
    l->next->prev = l->prev;
    l->prev = l->next = l;
}

static struct esmd_invoke_req *link_req(struct esmd_invoke_link *l)
{
    return (struct esmd_invoke_req *)((char *)l - offsetof(struct esmd_invoke_req, link));
}

/* ---- names, parsing ---- */

const char *esmd_invoke_outcome_name(enum esmd_invoke_outcome o)
{
    switch (o) {
    case ESMD_INVOKE_OK:
        return "ok";
    case ESMD_INVOKE_FUNCTION_ERROR:
        return "function_error";
    case ESMD_INVOKE_THROTTLED:
        return "throttled";
    case ESMD_INVOKE_ERROR:
        return "error";
    case ESMD_INVOKE_TIMEOUT:
        return "timeout";
    case ESMD_INVOKE_CANCELLED:
        return "cancelled";
    }
    return "unknown";
}

/* Retry-After: delay-seconds or an HTTP-date. Returns milliseconds from now, -1 if invalid. */
static int64_t invoke_parse_retry_after(const char *v)
{
    const char *p = v;
    int64_t secs = 0;
    time_t t;

    while (*p == ' ' || *p == '\t')
        p++;
    if (*p == '\0')
        return -1;
    if (*p >= '0' && *p <= '9') {
        for (; *p >= '0' && *p <= '9'; p++) {
            if (secs > INT64_MAX / 10000)
                return -1;
            secs = secs * 10 + (*p - '0');
        }
        while (*p == ' ' || *p == '\t')
            p++;
        return *p == '\0' ? secs * 1000 : -1;
    }
    t = curl_getdate(p, NULL);
    if (t == (time_t)-1)
        return -1;
    secs = (int64_t)t * 1000 - esmd_now_ms();
    return secs > 0 ? secs : 0;
}

/* Header values must not carry CR/LF or other control bytes: they become %XX. Caller frees. */
static char *invoke_header_safe(const char *s)
{
    struct esmd_buf b = ESMD_BUF_INIT;

    for (; *s; s++) {
        unsigned char c = (unsigned char)*s;
        if (c < 0x20 || c == 0x7f)
            esmd_buf_printf(&b, "%%%02X", c);
        else
            esmd_buf_putc(&b, (char)c);
    }
    esmd_buf_cstr(&b);
    return esmd_buf_steal(&b, NULL);
}

static size_t invoke_write_fn(char *ptr, size_t size, size_t nmemb, void *userdata)
{
    struct esmd_invoke_req *req = userdata;
    size_t n = size * nmemb;

    if (req->resp.len + n > ESMD_MAX_PAYLOAD) {
        req->too_large = true;
        return 0; /* aborts the transfer with CURLE_WRITE_ERROR */
    }
    esmd_buf_append(&req->resp, ptr, n);
    return n;
}

/* Copies a header value (trimmed) into out if the line is `name: value`. */
static bool invoke_header_value(const char *line, size_t n, const char *name, char *out,
                                size_t outlen)
{
    size_t nl = strlen(name), vl;
    const char *v, *end = line + n;

    if (n <= nl || strncasecmp(line, name, nl) != 0 || line[nl] != ':')
        return false;
    v = line + nl + 1;
    while (v < end && (*v == ' ' || *v == '\t'))
        v++;
    while (end > v && (end[-1] == '\r' || end[-1] == '\n' || end[-1] == ' ' || end[-1] == '\t'))
        end--;
    vl = (size_t)(end - v);
    if (vl >= outlen)
        vl = outlen - 1;
    memcpy(out, v, vl);
    out[vl] = '\0';
    return true;
}

static size_t invoke_header_fn(char *buffer, size_t size, size_t nitems, void *userdata)
{
    struct esmd_invoke_req *req = userdata;
    size_t n = size * nitems;

    /* A new status line (after a 100 Continue, say) starts a new header block. */
    if (n >= 5 && strncmp(buffer, "HTTP/", 5) == 0) {
        req->function_error[0] = '\0';
        req->retry_after[0] = '\0';
        return n;
    }
    if (!invoke_header_value(buffer, n, "X-Amz-Function-Error", req->function_error,
                             sizeof(req->function_error)))
        invoke_header_value(buffer, n, "Retry-After", req->retry_after, sizeof(req->retry_after));
    return n;
}

/* ---- metrics ---- */

static struct esmd_fn_stats *invoke_stats(struct esmd_function *fn, const char *mapping)
{
    struct esmd_invoker *inv = fn->inv;
    struct esmd_fn_stats *st;
    struct esmd_buf labels = ESMD_BUF_INIT;
    const char *l;

    for (st = fn->stats; st != NULL; st = st->next) {
        if (mapping == NULL ? st->mapping == NULL
                            : st->mapping != NULL && strcmp(st->mapping, mapping) == 0)
            return st;
    }
    st = esmd_xcalloc(1, sizeof(*st));
    st->mapping = esmd_xstrdup(mapping);
    esmd_metric_labels(&labels, "function", fn->cfg->name, "mapping", mapping, NULL);
    l = esmd_buf_cstr(&labels);
    st->invocations = esmd_series(inv->m_invocations, l);
    st->errors = esmd_series(inv->m_errors, l);
    st->throttles = esmd_series(inv->m_throttles, l);
    st->timeouts = esmd_series(inv->m_timeouts, l);
    st->function_errors = esmd_series(inv->m_function_errors, l);
    st->duration = esmd_series(inv->m_duration, l);
    esmd_buf_free(&labels);
    st->next = fn->stats;
    fn->stats = st;
    return st;
}

static void invoke_gauges(struct esmd_function *fn)
{
    esmd_series_set(fn->concurrent, fn->inflight);
    esmd_series_set(fn->queued, fn->nqueued);
}

static void invoke_count(struct esmd_invoke_req *req, const struct esmd_invoke_result *res)
{
    struct esmd_fn_stats *st = req->stats;

    if (st == NULL) /* its mapping was forgotten (esmd_invoker_forget_mapping) */
        return;
    switch (res->outcome) {
    case ESMD_INVOKE_CANCELLED:
        return;
    case ESMD_INVOKE_THROTTLED:
        esmd_series_inc(st->throttles, 1);
        return;
    case ESMD_INVOKE_FUNCTION_ERROR:
        esmd_series_inc(st->function_errors, 1);
        esmd_series_inc(st->errors, 1);
        break;
    case ESMD_INVOKE_TIMEOUT:
        esmd_series_inc(st->timeouts, 1);
        esmd_series_inc(st->errors, 1);
        break;
    case ESMD_INVOKE_ERROR:
        esmd_series_inc(st->errors, 1);
        break;
    case ESMD_INVOKE_OK:
        break;
    }
    esmd_series_inc(st->invocations, 1);
    esmd_series_observe(st->duration, res->duration_s);
}

static const char *invoke_log_key(enum esmd_invoke_outcome o)
{
    switch (o) {
    case ESMD_INVOKE_FUNCTION_ERROR:
        return "invoke.function_error";
    case ESMD_INVOKE_THROTTLED:
        return "invoke.throttled";
    case ESMD_INVOKE_TIMEOUT:
        return "invoke.timeout";
    default:
        return "invoke.error";
    }
}

/* ---- request lifecycle ---- */

static void invoke_release_easy(struct esmd_function *fn, CURL *easy)
{
    if (easy == NULL)
        return;
    /* The request that pointed at it is about to be freed. */
    curl_easy_setopt(easy, CURLOPT_PRIVATE, NULL);
    curl_easy_setopt(easy, CURLOPT_ERRORBUFFER, NULL);
    curl_easy_setopt(easy, CURLOPT_WRITEDATA, NULL);
    curl_easy_setopt(easy, CURLOPT_HEADERDATA, NULL);
    curl_easy_setopt(easy, CURLOPT_HTTPHEADER, NULL);
    curl_easy_setopt(easy, CURLOPT_POSTFIELDS, NULL);
    if (!fn->inv->closing && fn->npool < (size_t)fn->max_concurrency) {
        fn->pool[fn->npool++] = easy;
        return;
    }
    curl_easy_cleanup(easy);
}

static void invoke_req_free(struct esmd_invoke_req *req)
{
    if (req->easy != NULL && req->gen != req->fn->gen) /* set up for the function's old url */
        curl_easy_cleanup(req->easy);
    else
        invoke_release_easy(req->fn, req->easy);
    curl_slist_free_all(req->headers);
    esmd_buf_free(&req->resp);
    free(req->idempotency_key);
    free(req->mapping);
    free(req);
}

/* Takes the request out of whatever list it is in; the caller then completes it. */
static void invoke_detach(struct esmd_invoke_req *req)
{
    struct esmd_function *fn = req->fn;

    switch (req->state) {
    case REQ_QUEUED:
        link_remove(&req->link);
        fn->nqueued--;
        break;
    case REQ_ACTIVE:
        link_remove(&req->link);
        curl_multi_remove_handle(fn->inv->ce.multi, req->easy);
        fn->inflight--;
        break;
    case REQ_DEFERRED:
        link_remove(&req->link);
        break;
    case REQ_CALLING:
        break;
    }
    req->state = REQ_CALLING;
    invoke_gauges(fn);
}

/* Runs the callback of a detached request, frees it, and lets the next queued one start. */
static void invoke_complete(struct esmd_invoke_req *req, struct esmd_invoke_result *res)
{
    struct esmd_function *fn = req->fn;
    struct esmd_invoker *inv = fn->inv;
    struct esmd_log_ctx ctx = {req->mapping, fn->cfg->name, req->request_id,
                               req->trace_id[0] ? req->trace_id : NULL};

    res->request_id = req->request_id;
    if (res->body == NULL) {
        res->body = "";
        res->body_len = 0;
    }
    invoke_count(req, res);
    if (res->outcome != ESMD_INVOKE_OK && res->outcome != ESMD_INVOKE_CANCELLED)
        esmd_log_limited(
            ESMD_LOG_WARN, &ctx, invoke_log_key(res->outcome), "invoke failed: %s (status %ld): %s",
            esmd_invoke_outcome_name(res->outcome), res->status, res->error ? res->error : "");
    inv->calling++;
    req->cb(req->ud, res);
    inv->calling--;
    invoke_req_free(req);
    invoke_pump(fn);
}

static void invoke_complete_simple(struct esmd_invoke_req *req, enum esmd_invoke_outcome o,
                                   const char *error)
{
    struct esmd_invoke_result res = {0};

    res.outcome = o;
    res.retry_after_ms = -1;
    res.error = error;
    invoke_complete(req, &res);
}

static void invoke_deferred_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct esmd_invoker *inv = w->data;
    size_t n = 0;

    ESMD_UNUSED(loop);
    ESMD_UNUSED(revents);
    /* Only those present now: a callback that defers again waits for the next turn. */
    for (struct esmd_invoke_link *l = inv->deferred.next; l != &inv->deferred; l = l->next)
        n++;
    while (n-- > 0 && !link_empty(&inv->deferred)) {
        struct esmd_invoke_req *req = link_req(inv->deferred.next);
        enum esmd_invoke_outcome o = req->deferred_outcome;
        char msg[CURL_ERROR_SIZE];

        snprintf(msg, sizeof(msg), "%s", req->errbuf);
        invoke_detach(req);
        invoke_complete_simple(req, o, msg);
    }
    if (!link_empty(&inv->deferred)) {
        ev_timer_set(&inv->deferred_timer, 0., 0.);
        ev_timer_start(inv->loop, &inv->deferred_timer);
    }
}

/* A request that failed before it could be sent: its callback runs on the next loop turn. */
static void invoke_defer(struct esmd_invoke_req *req, enum esmd_invoke_outcome o, const char *error)
{
    struct esmd_invoker *inv = req->fn->inv;

    req->state = REQ_DEFERRED;
    req->deferred_outcome = o;
    if (error != req->errbuf)
        snprintf(req->errbuf, sizeof(req->errbuf), "%s", error);
    link_append(&inv->deferred, &req->link);
    if (!ev_is_active(&inv->deferred_timer)) {
        ev_timer_set(&inv->deferred_timer, 0., 0.);
        ev_timer_start(inv->loop, &inv->deferred_timer);
    }
}

/* An easy handle with the function's fixed options: one it used before (libcurl keeps the
 * options; no curl_easy_reset and setting them again on every request), or a new one. */
static CURL *invoke_get_easy(struct esmd_function *fn)
{
    CURL *easy;

    if (fn->npool > 0)
        return fn->pool[--fn->npool];
    easy = curl_easy_init();
    if (easy == NULL)
        return NULL;
    curl_easy_setopt(easy, CURLOPT_URL, fn->cfg->url);
    curl_easy_setopt(easy, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(easy, CURLOPT_POST, 1L);
    curl_easy_setopt(easy, CURLOPT_USERAGENT, "esmd/" ESMD_VERSION);
    curl_easy_setopt(easy, CURLOPT_TIMEOUT_MS, fn->timeout_ms);
    curl_easy_setopt(easy, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(easy, CURLOPT_TCP_KEEPALIVE, 1L);
    curl_easy_setopt(easy, CURLOPT_WRITEFUNCTION, invoke_write_fn);
    curl_easy_setopt(easy, CURLOPT_HEADERFUNCTION, invoke_header_fn);
    return easy;
}

/* The trace headers (include/esmd/trace.h): checked when they were taken, so safe as they are. */
static struct curl_slist *invoke_trace_headers(struct curl_slist *h, const struct esmd_trace *t)
{
    const char *names[] = {ESMD_TRACE_TRACEPARENT, ESMD_TRACE_TRACESTATE, ESMD_TRACE_XRAY};
    const char *values[] = {t->traceparent, t->tracestate, t->xray};
    char line[ESMD_TRACESTATE_MAX + 32];

    for (size_t i = 0; i < ESMD_ARRAY_LEN(names); i++) {
        if (!values[i][0])
            continue;
        snprintf(line, sizeof(line), "%s: %s", names[i], values[i]);
        h = curl_slist_append(h, line);
    }
    return h;
}

/* Builds the easy handle and adds it to the multi. 0, or -1 with req->errbuf set. */
static int invoke_send(struct esmd_invoke_req *req)
{
    struct esmd_function *fn = req->fn;
    struct esmd_invoker *inv = fn->inv;
    struct curl_slist *h = NULL;
    char line[256];
    CURLMcode mc;
    CURL *easy;
    int rc = -1;

    easy = invoke_get_easy(fn);
    if (easy == NULL) {
        snprintf(req->errbuf, sizeof(req->errbuf), "curl_easy_init failed");
        goto out;
    }
    req->easy = easy;
    req->gen = fn->gen;
    req->timeout_ms = fn->timeout_ms;
    for (size_t i = 0; i < fn->nheaders; i++)
        h = curl_slist_append(h, fn->headers[i]);
    if (!fn->has_content_type)
        h = curl_slist_append(h, "Content-Type: application/json");
    h = curl_slist_append(h, "Expect:");
    snprintf(line, sizeof(line), "X-Esmd-Request-Id: %s", req->request_id);
    h = curl_slist_append(h, line);
    if (req->idempotency_key != NULL) {
        struct esmd_buf b = ESMD_BUF_INIT;

        esmd_buf_puts(&b, "X-Esmd-Idempotency-Key: ");
        esmd_buf_puts(&b, req->idempotency_key);
        h = curl_slist_append(h, esmd_buf_cstr(&b));
        esmd_buf_free(&b);
    }
    h = invoke_trace_headers(h, &req->trace);
    req->headers = h;
    if (h == NULL) {
        snprintf(req->errbuf, sizeof(req->errbuf), "out of memory building headers");
        goto out;
    }
    req->errbuf[0] = '\0';
    curl_easy_setopt(easy, CURLOPT_POSTFIELDS, req->body);
    curl_easy_setopt(easy, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)req->len);
    curl_easy_setopt(easy, CURLOPT_HTTPHEADER, req->headers);
    curl_easy_setopt(easy, CURLOPT_PRIVATE, req);
    curl_easy_setopt(easy, CURLOPT_ERRORBUFFER, req->errbuf);
    curl_easy_setopt(easy, CURLOPT_WRITEDATA, req);
    curl_easy_setopt(easy, CURLOPT_HEADERDATA, req);
    req->started = esmd_mono();
    mc = curl_multi_add_handle(inv->ce.multi, easy);
    if (mc != CURLM_OK) {
        snprintf(req->errbuf, sizeof(req->errbuf), "curl_multi_add_handle: %s",
                 curl_multi_strerror(mc));
        goto out;
    }
    rc = 0;
out:
    if (rc != 0 && req->easy != NULL) {
        invoke_release_easy(fn, req->easy);
        req->easy = NULL;
    }
    return rc;
}

/* Starts queued requests while the function has free slots. */
static void invoke_pump(struct esmd_function *fn)
{
    while (!fn->inv->closing && fn->inflight < fn->max_concurrency && !link_empty(&fn->queue)) {
        struct esmd_invoke_req *req = link_req(fn->queue.next);

        link_remove(&req->link);
        fn->nqueued--;
        if (invoke_send(req) != 0) {
            invoke_defer(req, ESMD_INVOKE_ERROR, req->errbuf);
            continue;
        }
        req->state = REQ_ACTIVE;
        link_append(&fn->active, &req->link);
        fn->inflight++;
    }
    invoke_gauges(fn);
}

/* Says what went wrong with a transfer that ended without a whole answer, in the words an
 * operator reads in the log and in on-failure records (docs/endpoint.md#errors), rather than
 * libcurl's: a malformed answer is not a plain "error" of a 200. */
static void invoke_transfer_error(const struct esmd_invoke_req *req, CURLcode cc, char *msg,
                                  size_t len)
{
    const char *detail = req->errbuf[0] != '\0' ? req->errbuf : curl_easy_strerror(cc);

    if (req->too_large) {
        snprintf(msg, len, "response over 6 MB (more than %d bytes)", ESMD_MAX_PAYLOAD);
        return;
    }
    switch (cc) {
    case CURLE_PARTIAL_FILE:
        snprintf(msg, len, "truncated response: the connection closed before the body ended (%s)",
                 detail);
        return;
    case CURLE_GOT_NOTHING:
        snprintf(msg, len, "no response: the connection closed before an answer (%s)", detail);
        return;
    case CURLE_OUT_OF_MEMORY:
        /* what libcurl 7.88 reports for a header block over its 100 KB limit */
        snprintf(msg, len, "response headers too large (libcurl keeps at most 100 KB of them)");
        return;
    case CURLE_UNSUPPORTED_PROTOCOL:
    case CURLE_WEIRD_SERVER_REPLY:
        snprintf(msg, len, "malformed response: not HTTP/1.x (%s)", detail);
        return;
    case CURLE_RECV_ERROR:
        if (strstr(detail, "chunked") != NULL)
            snprintf(msg, len, "invalid chunked encoding (%s)", detail);
        else
            snprintf(msg, len, "connection failed while reading the response (%s)", detail);
        return;
    case CURLE_SEND_ERROR:
        snprintf(msg, len, "connection failed while sending the request (%s)", detail);
        return;
    default:
        snprintf(msg, len, "%s", detail);
    }
}

/* Classifies a finished transfer and completes the request. */
static void invoke_finish(struct esmd_invoke_req *req, CURLcode cc)
{
    struct esmd_invoke_result res = {0};
    char msg[CURL_ERROR_SIZE + 128];
    char fnerr[ESMD_INVOKE_FNERR_MAX];
    long status = 0;
    cJSON *doc = NULL;
    const char *body;

    curl_easy_getinfo(req->easy, CURLINFO_RESPONSE_CODE, &status);
    body = esmd_buf_cstr(&req->resp);
    res.status = status;
    res.body = body;
    res.body_len = req->resp.len;
    res.retry_after_ms = -1;
    res.duration_s = esmd_mono() - req->started;
    if (res.duration_s < 0)
        res.duration_s = 0;
    msg[0] = '\0';
    invoke_detach(req);

    if (cc != CURLE_OK) {
        if (cc == CURLE_OPERATION_TIMEDOUT) {
            res.outcome = ESMD_INVOKE_TIMEOUT;
            snprintf(msg, sizeof(msg), "timed out after %ld ms", req->timeout_ms);
        } else {
            res.outcome = ESMD_INVOKE_ERROR;
            invoke_transfer_error(req, cc, msg, sizeof(msg));
        }
        res.error = msg;
        goto done;
    }
    if (status == 429 || status == 503)
        res.retry_after_ms = invoke_parse_retry_after(req->retry_after);
    if (status < 200 || status > 299) {
        res.outcome = status == 429 ? ESMD_INVOKE_THROTTLED : ESMD_INVOKE_ERROR;
        snprintf(msg, sizeof(msg), "HTTP %ld", status);
        res.error = msg;
        goto done;
    }
    if (req->function_error[0] != '\0') {
        res.outcome = ESMD_INVOKE_FUNCTION_ERROR;
        res.function_error = req->function_error;
        snprintf(msg, sizeof(msg), "function error: %s", req->function_error);
        res.error = msg;
        goto done;
    }
    /* Only error-shaped bodies are parsed: big success bodies are not. */
    if (body[strspn(body, " \t\r\n")] == '{' &&
        (req->resp.len < ESMD_INVOKE_PARSE_MAX ||
         memmem(body, req->resp.len, "\"errorType\"", 11) != NULL)) {
        const cJSON *type, *emsg;

        doc = cJSON_ParseWithLength(body, req->resp.len);
        type = cJSON_GetObjectItemCaseSensitive(doc, "errorType");
        emsg = cJSON_GetObjectItemCaseSensitive(doc, "errorMessage");
        if (cJSON_IsObject(doc) && cJSON_IsString(type) && cJSON_IsString(emsg)) {
            res.outcome = ESMD_INVOKE_FUNCTION_ERROR;
            snprintf(fnerr, sizeof(fnerr), "%s", type->valuestring);
            res.function_error = fnerr;
            snprintf(msg, sizeof(msg), "%s: %s", type->valuestring, emsg->valuestring);
            res.error = msg;
            goto done;
        }
    }
    if (strncmp(body, "Task timed out after", 20) == 0) {
        res.outcome = ESMD_INVOKE_TIMEOUT;
        snprintf(msg, sizeof(msg), "%.*s", (int)strcspn(body, "\r\n"), body);
        res.error = msg;
        goto done;
    }
    res.outcome = ESMD_INVOKE_OK;
done:
    invoke_complete(req, &res);
    cJSON_Delete(doc);
}

/* A transfer finished (from the curl_ev watchers). */
static void invoke_done(struct esmd_curl_ev *ce, CURL *easy, CURLcode result, void *priv)
{
    struct esmd_invoke_req *req = priv;

    ESMD_UNUSED(ce);
    ESMD_UNUSED(easy);
    if (req == NULL || req->state != REQ_ACTIVE)
        return;
    invoke_finish(req, result);
}

/* ---- public API ---- */

struct esmd_invoker *esmd_invoker_new(struct ev_loop *loop, char *err, size_t errlen)
{
    struct esmd_invoker *inv;

    if (loop == NULL) {
        snprintf(err, errlen, "no event loop");
        return NULL;
    }
    inv = esmd_xcalloc(1, sizeof(*inv));
    inv->loop = loop;
    link_init(&inv->deferred);
    if (esmd_curl_ev_init(&inv->ce, loop, invoke_done, inv, err, errlen) != 0) {
        free(inv);
        return NULL;
    }
    ev_timer_init(&inv->deferred_timer, invoke_deferred_cb, 0., 0.);
    inv->deferred_timer.data = inv;
    inv->m_invocations = esmd_metric(ESMD_COUNTER, "esmd_invocations_total",
                                     "Function invocations sent and answered or failed "
                                     "(throttled and cancelled requests excluded).");
    inv->m_errors = esmd_metric(ESMD_COUNTER, "esmd_errors_total",
                                "Invocations that ended in a function error, an error or a "
                                "timeout.");
    inv->m_throttles =
        esmd_metric(ESMD_COUNTER, "esmd_throttles_total", "Invocations answered with HTTP 429.");
    inv->m_timeouts = esmd_metric(ESMD_COUNTER, "esmd_timeouts_total",
                                  "Invocations that timed out (esmd's timeout or the RIE's).");
    inv->m_function_errors = esmd_metric(ESMD_COUNTER, "esmd_function_errors_total",
                                         "Invocations answered with a function error.");
    inv->m_duration = esmd_metric(ESMD_HISTOGRAM, "esmd_duration_seconds",
                                  "Invocation duration from send to response, in seconds.");
    inv->m_concurrent = esmd_metric(ESMD_GAUGE, "esmd_concurrent_executions",
                                    "Requests in flight to the function.");
    inv->m_queued = esmd_metric(ESMD_GAUGE, "esmd_invoke_queued",
                                "Requests waiting for a concurrency slot of the function.");
    return inv;
}

static void invoke_cancel_list(struct esmd_invoke_link *head)
{
    while (!link_empty(head)) {
        struct esmd_invoke_req *req = link_req(head->next);

        invoke_detach(req);
        invoke_complete_simple(req, ESMD_INVOKE_CANCELLED, "cancelled: invoker shut down");
    }
}

void esmd_invoker_free(struct esmd_invoker *inv)
{
    if (inv == NULL)
        return;
    /* Freeing from inside an invoke callback would pull the invoker from under its caller. */
    if (inv->calling > 0) {
        ESMD_ERROR(NULL, "esmd_invoker_free called from an invoke callback: ignored");
        return;
    }
    inv->closing = true;
    for (size_t i = 0; i < inv->nfns; i++)
        invoke_cancel_list(&inv->fns[i]->queue);
    for (size_t i = 0; i < inv->nfns; i++)
        invoke_cancel_list(&inv->fns[i]->active);
    invoke_cancel_list(&inv->deferred);
    ev_timer_stop(inv->loop, &inv->deferred_timer);
    for (size_t i = 0; i < inv->nfns; i++) {
        struct esmd_function *fn = inv->fns[i];
        for (size_t k = 0; k < fn->npool; k++)
            curl_easy_cleanup(fn->pool[k]);
        fn->npool = 0;
    }
    esmd_curl_ev_close(&inv->ce);
    for (size_t i = 0; i < inv->nfns; i++) {
        struct esmd_function *fn = inv->fns[i];

        while (fn->stats != NULL) {
            struct esmd_fn_stats *st = fn->stats;

            fn->stats = st->next;
            free(st->mapping);
            free(st);
        }
        for (size_t j = 0; j < fn->nheaders; j++)
            free(fn->headers[j]);
        free(fn->headers);
        free(fn->pool);
        free(fn);
    }
    free(inv->fns);
    free(inv);
}

/* The "Name: value" lines of cfg's headers (invalid names are logged and left out). */
static void invoke_set_headers(struct esmd_function *fn, const struct esmd_function_cfg *cfg)
{
    for (size_t j = 0; j < fn->nheaders; j++)
        free(fn->headers[j]);
    free(fn->headers);
    fn->nheaders = 0;
    fn->has_content_type = false;
    fn->headers = esmd_xcalloc(cfg->headers.n + 1, sizeof(*fn->headers));
    for (size_t i = 0; i < cfg->headers.n; i++) {
        const struct esmd_kv *kv = &cfg->headers.items[i];
        struct esmd_buf b = ESMD_BUF_INIT;
        char *value;

        if (kv->key == NULL || kv->key[0] == '\0' || strpbrk(kv->key, ":\r\n \t") != NULL) {
            struct esmd_log_ctx ctx = {NULL, cfg->name, NULL, NULL};
            ESMD_WARN(&ctx, "function header name \"%s\" is not valid: not sent",
                      kv->key ? kv->key : "");
            continue;
        }
        if (strcasecmp(kv->key, "Content-Type") == 0)
            fn->has_content_type = true;
        value = invoke_header_safe(kv->value ? kv->value : "");
        esmd_buf_printf(&b, "%s: %s", kv->key, value);
        free(value);
        esmd_buf_cstr(&b);
        fn->headers[fn->nheaders++] = esmd_buf_steal(&b, NULL);
    }
}

struct esmd_function *esmd_invoker_add_function(struct esmd_invoker *inv,
                                                const struct esmd_function_cfg *cfg)
{
    struct esmd_function *fn;
    struct esmd_buf labels = ESMD_BUF_INIT;

    if (inv == NULL || cfg == NULL || cfg->name == NULL || cfg->url == NULL || inv->closing)
        return NULL;
    if (esmd_invoker_function(inv, cfg->name) != NULL)
        return NULL;
    fn = esmd_xcalloc(1, sizeof(*fn));
    fn->inv = inv;
    fn->cfg = cfg;
    fn->max_concurrency = cfg->max_concurrency > 0 ? cfg->max_concurrency : 1;
    fn->timeout_ms = cfg->timeout_ms > 0 ? (long)cfg->timeout_ms : ESMD_INVOKE_DEFAULT_TIMEOUT_MS;
    link_init(&fn->queue);
    link_init(&fn->active);
    invoke_set_headers(fn, cfg);
    esmd_metric_labels(&labels, "function", cfg->name, NULL);
    fn->concurrent = esmd_series(inv->m_concurrent, esmd_buf_cstr(&labels));
    fn->queued = esmd_series(inv->m_queued, esmd_buf_cstr(&labels));
    esmd_buf_free(&labels);
    invoke_gauges(fn);

    inv->fns = esmd_xrealloc(inv->fns, (inv->nfns + 1) * sizeof(*inv->fns));
    inv->fns[inv->nfns++] = fn;
    inv->total_concurrency += fn->max_concurrency;
    fn->pool = esmd_xcalloc((size_t)fn->max_concurrency, sizeof(*fn->pool));
    curl_multi_setopt(inv->ce.multi, CURLMOPT_MAXCONNECTS, inv->total_concurrency);
    return fn;
}

void esmd_invoker_update_function(struct esmd_invoker *inv, const struct esmd_function_cfg *cfg)
{
    struct esmd_function *fn = esmd_invoker_function(inv, cfg ? cfg->name : NULL);
    int mc = cfg && cfg->max_concurrency > 0 ? cfg->max_concurrency : 1;

    if (fn == NULL)
        return;
    fn->removed = false;
    fn->cfg = cfg;
    fn->timeout_ms = cfg->timeout_ms > 0 ? (long)cfg->timeout_ms : ESMD_INVOKE_DEFAULT_TIMEOUT_MS;
    invoke_set_headers(fn, cfg);
    /* Idle handles carry the old url and timeout: dropped. Those of requests in flight are
     * dropped when their request ends (req->gen). */
    fn->gen++;
    for (size_t k = 0; k < fn->npool; k++)
        curl_easy_cleanup(fn->pool[k]);
    fn->npool = 0;
    if (mc != fn->max_concurrency) {
        inv->total_concurrency += mc - fn->max_concurrency;
        fn->max_concurrency = mc;
        free(fn->pool);
        fn->pool = esmd_xcalloc((size_t)mc, sizeof(*fn->pool));
        curl_multi_setopt(inv->ce.multi, CURLMOPT_MAXCONNECTS, inv->total_concurrency);
        invoke_pump(fn); /* more slots: requests waiting start now */
    }
}

void esmd_invoker_remove_function(struct esmd_invoker *inv, const char *name)
{
    struct esmd_function *fn = esmd_invoker_function(inv, name);
    if (fn != NULL)
        fn->removed = true;
}

struct esmd_function *esmd_invoker_function(struct esmd_invoker *inv, const char *name)
{
    if (inv == NULL || name == NULL)
        return NULL;
    for (size_t i = 0; i < inv->nfns; i++)
        if (strcmp(inv->fns[i]->cfg->name, name) == 0)
            return inv->fns[i];
    return NULL;
}

const char *esmd_function_name(const struct esmd_function *fn)
{
    return fn ? fn->cfg->name : NULL;
}

const struct esmd_function_cfg *esmd_function_cfg(const struct esmd_function *fn)
{
    return fn ? fn->cfg : NULL;
}

int esmd_function_inflight(const struct esmd_function *fn)
{
    return fn ? fn->inflight : 0;
}

int esmd_function_max_concurrency(const struct esmd_function *fn)
{
    return fn->max_concurrency;
}

int esmd_function_queued(const struct esmd_function *fn)
{
    return fn ? fn->nqueued : 0;
}

struct esmd_invoke_req *esmd_invoke_start(struct esmd_function *fn, const char *body, size_t len,
                                          const char *idempotency_key, const char *mapping,
                                          esmd_invoke_cb cb, void *ud)
{
    return esmd_invoke_start_traced(fn, body, len, idempotency_key, mapping, NULL, cb, ud);
}

struct esmd_invoke_req *esmd_invoke_start_traced(struct esmd_function *fn, const char *body,
                                                 size_t len, const char *idempotency_key,
                                                 const char *mapping,
                                                 const struct esmd_trace *trace, esmd_invoke_cb cb,
                                                 void *ud)
{
    struct esmd_invoke_req *req;

    if (fn == NULL || cb == NULL || (body == NULL && len > 0) || fn->inv->closing)
        return NULL;
    req = esmd_xcalloc(1, sizeof(*req));
    req->fn = fn;
    req->body = body ? body : "";
    req->len = len;
    req->idempotency_key = idempotency_key ? invoke_header_safe(idempotency_key) : NULL;
    req->mapping = esmd_xstrdup(mapping);
    req->cb = cb;
    req->ud = ud;
    esmd_uuid4(req->request_id);
    if (trace) {
        req->trace = *trace;
        esmd_trace_complete(&req->trace);
        esmd_trace_id(&req->trace, req->trace_id);
    }
    esmd_buf_init(&req->resp);
    req->stats = invoke_stats(fn, mapping);
    req->state = REQ_QUEUED;
    link_append(&fn->queue, &req->link);
    fn->nqueued++;
    invoke_pump(fn);
    return req;
}

void esmd_invoke_cancel(struct esmd_invoke_req *req)
{
    /* From inside its own callback the request is already finishing: nothing to abort. */
    if (req == NULL || req->state == REQ_CALLING)
        return;
    invoke_detach(req);
    invoke_complete_simple(req, ESMD_INVOKE_CANCELLED, "cancelled");
}

double esmd_invoke_timeout_seconds(const struct esmd_invoke_result *res, int64_t timeout_ms)
{
    static const char rie_timeout[] = "Task timed out after ";

    if (res->body && strncmp(res->body, rie_timeout, sizeof(rie_timeout) - 1) == 0) {
        const char *num = res->body + sizeof(rie_timeout) - 1; /* the body is NUL-terminated */
        char *end;
        double v = strtod(num, &end);

        if (end != num && v >= 0 && v < 1e6)
            return v;
    }
    return (double)timeout_ms / 1000.0;
}

/* Unlinks req->stats == st from the requests of list head. */
static void forget_stats_in(struct esmd_invoke_link *head, const struct esmd_fn_stats *st)
{
    for (struct esmd_invoke_link *l = head->next; l != head; l = l->next) {
        struct esmd_invoke_req *req = (struct esmd_invoke_req *)l;
        if (req->stats == st)
            req->stats = NULL;
    }
}

void esmd_invoker_forget_mapping(struct esmd_invoker *inv, const char *mapping)
{
    for (size_t i = 0; inv != NULL && mapping != NULL && i < inv->nfns; i++) {
        struct esmd_function *fn = inv->fns[i];
        for (struct esmd_fn_stats **pp = &fn->stats; *pp != NULL;) {
            struct esmd_fn_stats *st = *pp;
            if (st->mapping == NULL || strcmp(st->mapping, mapping) != 0) {
                pp = &st->next;
                continue;
            }
            forget_stats_in(&fn->queue, st);
            forget_stats_in(&fn->active, st);
            forget_stats_in(&inv->deferred, st);
            *pp = st->next;
            free(st->mapping);
            free(st);
        }
    }
}

void esmd_invoker_describe(const struct esmd_invoker *inv, struct esmd_buf *out)
{
    esmd_buf_puts(out, "{\"functions\":[");
    bool first = true;
    for (size_t i = 0; inv != NULL && i < inv->nfns; i++) {
        const struct esmd_function *fn = inv->fns[i];
        if (fn->removed)
            continue;
        const char *name = fn->cfg->name;
        double inv_n = esmd_metric_sum(inv->m_invocations, "function", name);
        double err = esmd_metric_sum(inv->m_errors, "function", name);
        double ferr = esmd_metric_sum(inv->m_function_errors, "function", name);
        double tmo = esmd_metric_sum(inv->m_timeouts, "function", name);
        double thr = esmd_metric_sum(inv->m_throttles, "function", name);
        esmd_buf_puts(out, first ? "{\"name\":" : ",{\"name\":");
        first = false;
        esmd_buf_put_json_string(out, fn->cfg->name, strlen(fn->cfg->name));
        esmd_buf_puts(out, ",\"url\":");
        esmd_buf_put_json_string(out, fn->cfg->url, strlen(fn->cfg->url));
        esmd_buf_printf(out,
                        ",\"max_concurrency\":%d,\"concurrency_in_use\":%d,\"queued\":%d,"
                        "\"invocations\":%.0f,\"errors\":%.0f,\"function_errors\":%.0f,"
                        "\"timeouts\":%.0f,\"throttles\":%.0f",
                        fn->max_concurrency, fn->inflight, fn->nqueued, inv_n, err, ferr, tmo, thr);
        static const struct {
            const char *key;
            double q;
        } qs[] = {{"p50_seconds", 0.5}, {"p99_seconds", 0.99}};
        for (size_t k = 0; k < ESMD_ARRAY_LEN(qs); k++) {
            double v = esmd_metric_quantile(inv->m_duration, "function", name, qs[k].q);
            if (v < 0)
                esmd_buf_printf(out, ",\"%s\":null", qs[k].key);
            else
                esmd_buf_printf(out, ",\"%s\":%.4f", qs[k].key, v);
        }
        esmd_buf_putc(out, '}');
    }
    esmd_buf_puts(out, "]}");
}
