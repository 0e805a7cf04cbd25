/* Invoker against an in-process HTTP server (libmicrohttpd, its own threads) on 127.0.0.1. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "testutil.h"

#include <arpa/inet.h>
#include <curl/curl.h>
#include <ev.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#include "esmd/invoke.h"
#include "esmd/metrics.h"

#define BIG_LEN (7 * 1024 * 1024)
#define MED_LEN (100 * 1024)
#define MAX_SEEN 256

/* ---- the test server ---- */

struct seen {
    char path[128];
    char request_id[64];
    char idempotency_key[128];
    char extra[64];
    char auth[64];
    char content_type[64];
    bool has_expect;
    size_t body_len;
};

static struct {
    struct MHD_Daemon *daemon;
    int port;
    pthread_mutex_t mu;
    int cur, max; /* concurrent requests in the handler, and the most seen */
    int connections;
    struct seen seen[MAX_SEEN];
    int nseen;
    char *big, *medium_ok, *medium_err;
} srv = {.mu = PTHREAD_MUTEX_INITIALIZER};

struct srv_req {
    size_t body_len;
};

static void copy_header(struct MHD_Connection *c, const char *name, char *out, size_t outlen)
{
    const char *v = MHD_lookup_connection_value(c, MHD_HEADER_KIND, name);
    snprintf(out, outlen, "%s", v ? v : "");
}

static enum MHD_Result reply(struct MHD_Connection *c, unsigned int status, const char *body,
                             size_t len, const char *hname, const char *hvalue)
{
    struct MHD_Response *r =
        MHD_create_response_from_buffer(len, (void *)body, MHD_RESPMEM_PERSISTENT);
    enum MHD_Result ret;

    if (hname)
        MHD_add_response_header(r, hname, hvalue);
    ret = MHD_queue_response(c, status, r);
    MHD_destroy_response(r);
    return ret;
}

static enum MHD_Result srv_access(void *cls, struct MHD_Connection *c, const char *url,
                                  const char *method, const char *version, const char *upload,
                                  size_t *upload_size, void **con_cls)
{
    struct srv_req *sr = *con_cls;
    struct seen *s = NULL;
    static const char ok[] = "{\"ok\":true}";

    (void)cls;
    (void)method;
    (void)version;
    (void)upload;
    if (sr == NULL) {
        *con_cls = calloc(1, sizeof(*sr));
        return MHD_YES;
    }
    if (*upload_size > 0) {
        sr->body_len += *upload_size;
        *upload_size = 0;
        return MHD_YES;
    }
    pthread_mutex_lock(&srv.mu);
    if (srv.nseen < MAX_SEEN) {
        s = &srv.seen[srv.nseen++];
        snprintf(s->path, sizeof(s->path), "%s", url);
        copy_header(c, "X-Esmd-Request-Id", s->request_id, sizeof(s->request_id));
        copy_header(c, "X-Esmd-Idempotency-Key", s->idempotency_key, sizeof(s->idempotency_key));
        copy_header(c, "X-Test-Extra", s->extra, sizeof(s->extra));
        copy_header(c, "Authorization", s->auth, sizeof(s->auth));
        copy_header(c, "Content-Type", s->content_type, sizeof(s->content_type));
        s->has_expect = MHD_lookup_connection_value(c, MHD_HEADER_KIND, "Expect") != NULL;
        s->body_len = sr->body_len;
    }
    pthread_mutex_unlock(&srv.mu);

    if (strcmp(url, "/ok") == 0)
        return reply(c, 200, ok, strlen(ok), NULL, NULL);
    if (strcmp(url, "/fnerr") == 0) {
        static const char b[] = "{\"errorMessage\":\"boom\"}";
        return reply(c, 200, b, strlen(b), "X-Amz-Function-Error", "Unhandled");
    }
    if (strcmp(url, "/2015-03-31/functions/function/invocations") == 0) {
        static const char b[] =
            "{\"errorType\":\"ValueError\",\"errorMessage\":\"bad input\",\"stackTrace\":[]}";
        return reply(c, 200, b, strlen(b), NULL, NULL);
    }
    if (strcmp(url, "/rie-timeout") == 0) {
        static const char b[] = "Task timed out after 3.00 seconds";
        return reply(c, 200, b, strlen(b), NULL, NULL);
    }
    if (strcmp(url, "/throttle") == 0)
        return reply(c, 429, "", 0, "Retry-After", "2");
    if (strcmp(url, "/throttle-date") == 0) {
        char date[64];
        time_t t = time(NULL) + 10;
        struct tm tm;
        gmtime_r(&t, &tm);
        strftime(date, sizeof(date), "%a, %d %b %Y %H:%M:%S GMT", &tm);
        return reply(c, 429, "", 0, "Retry-After", date);
    }
    if (strcmp(url, "/unavailable") == 0)
        return reply(c, 503, "", 0, "Retry-After", "1");
    if (strcmp(url, "/bad") == 0)
        return reply(c, 400, "no", 2, NULL, NULL);
    if (strcmp(url, "/big") == 0)
        return reply(c, 200, srv.big, BIG_LEN, NULL, NULL);
    if (strcmp(url, "/medium-ok") == 0)
        return reply(c, 200, srv.medium_ok, MED_LEN, NULL, NULL);
    if (strcmp(url, "/medium-err") == 0)
        return reply(c, 200, srv.medium_err, MED_LEN, NULL, NULL);
    if (strcmp(url, "/slow") == 0) {
        const char *ms = MHD_lookup_connection_value(c, MHD_GET_ARGUMENT_KIND, "ms");
        pthread_mutex_lock(&srv.mu);
        if (++srv.cur > srv.max)
            srv.max = srv.cur;
        pthread_mutex_unlock(&srv.mu);
        usleep((useconds_t)(ms ? atoi(ms) : 100) * 1000);
        pthread_mutex_lock(&srv.mu);
        srv.cur--;
        pthread_mutex_unlock(&srv.mu);
        return reply(c, 200, ok, strlen(ok), NULL, NULL);
    }
    return reply(c, 404, "", 0, NULL, NULL);
}

static void srv_completed(void *cls, struct MHD_Connection *c, void **con_cls,
                          enum MHD_RequestTerminationCode toe)
{
    (void)cls;
    (void)c;
    (void)toe;
    free(*con_cls);
    *con_cls = NULL;
}

static void srv_notify_conn(void *cls, struct MHD_Connection *c, void **socket_context,
                            enum MHD_ConnectionNotificationCode code)
{
    (void)cls;
    (void)c;
    (void)socket_context;
    if (code != MHD_CONNECTION_NOTIFY_STARTED)
        return;
    pthread_mutex_lock(&srv.mu);
    srv.connections++;
    pthread_mutex_unlock(&srv.mu);
}

static int srv_connections(void)
{
    int n;
    pthread_mutex_lock(&srv.mu);
    n = srv.connections;
    pthread_mutex_unlock(&srv.mu);
    return n;
}

/* Waits until no earlier slow request (e.g. one the client timed out) is still in the server,
 * then resets the high-water mark. */
static void srv_quiesce(void)
{
    for (int i = 0; i < 500; i++) {
        int cur;
        pthread_mutex_lock(&srv.mu);
        cur = srv.cur;
        if (cur == 0)
            srv.max = 0;
        pthread_mutex_unlock(&srv.mu);
        if (cur == 0)
            return;
        usleep(10000);
    }
    fail_msg("the test server stays busy");
}

static const struct seen *srv_find(const char *request_id)
{
    const struct seen *s = NULL;
    pthread_mutex_lock(&srv.mu);
    for (int i = 0; i < srv.nseen; i++)
        if (strcmp(srv.seen[i].request_id, request_id) == 0)
            s = &srv.seen[i];
    pthread_mutex_unlock(&srv.mu);
    return s;
}

static int group_setup(void **state)
{
    const union MHD_DaemonInfo *info;
    struct sockaddr_in sin = {0};
    static const char prefix[] = "{\"errorType\":\"Big\",\"errorMessage\":\"m\",\"trace\":\"";

    (void)state;
    srv.big = malloc(BIG_LEN);
    memset(srv.big, 'x', BIG_LEN);
    srv.medium_ok = malloc(MED_LEN);
    memset(srv.medium_ok, 'x', MED_LEN);
    memcpy(srv.medium_ok, "{\"data\":\"", 9);
    memcpy(srv.medium_ok + MED_LEN - 2, "\"}", 2);
    srv.medium_err = malloc(MED_LEN);
    memset(srv.medium_err, 'x', MED_LEN);
    memcpy(srv.medium_err, prefix, strlen(prefix));
    memcpy(srv.medium_err + MED_LEN - 2, "\"}", 2);

    sin.sin_family = AF_INET;
    sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    sin.sin_port = 0;
    srv.daemon = MHD_start_daemon(
        MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_THREAD_PER_CONNECTION | MHD_USE_ERROR_LOG, 0,
        NULL, NULL, srv_access, NULL, MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&sin,
        MHD_OPTION_NOTIFY_COMPLETED, srv_completed, NULL, MHD_OPTION_NOTIFY_CONNECTION,
        srv_notify_conn, NULL, MHD_OPTION_END);
    if (srv.daemon == NULL)
        return -1;
    info = MHD_get_daemon_info(srv.daemon, MHD_DAEMON_INFO_BIND_PORT);
    srv.port = info->port;
    return 0;
}

static int group_teardown(void **state)
{
    (void)state;
    MHD_stop_daemon(srv.daemon);
    free(srv.big);
    free(srv.medium_ok);
    free(srv.medium_err);
    return 0;
}

/* ---- client side ---- */

struct got {
    int n; /* callbacks run */
    enum esmd_invoke_outcome outcome;
    long status;
    char body[64];
    size_t body_len;
    char function_error[64];
    int64_t retry_after_ms;
    char error[256];
    char request_id[40];
    int max_inflight; /* of `fn` when set, seen from callbacks */
    struct esmd_function *fn;
};

static bool in_start; /* a callback must never run inside esmd_invoke_start() */
static int results;   /* on_result calls, all tests */

static void on_result(void *ud, const struct esmd_invoke_result *res)
{
    struct got *g = ud;

    assert_false(in_start);
    results++;
    g->n++;
    g->outcome = res->outcome;
    g->status = res->status;
    snprintf(g->body, sizeof(g->body), "%s", res->body);
    g->body_len = res->body_len;
    snprintf(g->function_error, sizeof(g->function_error), "%s",
             res->function_error ? res->function_error : "");
    g->retry_after_ms = res->retry_after_ms;
    snprintf(g->error, sizeof(g->error), "%s", res->error ? res->error : "");
    snprintf(g->request_id, sizeof(g->request_id), "%s", res->request_id);
    assert_true(res->duration_s >= 0);
    if (res->outcome == ESMD_INVOKE_OK)
        assert_null(res->error);
    else
        assert_non_null(res->error);
    if (g->fn && esmd_function_inflight(g->fn) > g->max_inflight)
        g->max_inflight = esmd_function_inflight(g->fn);
}

struct ctx {
    struct ev_loop *loop;
    struct esmd_invoker *inv;
    struct esmd_function_cfg cfg[4];
    char url[4][128];
    char name[4][16];
    struct esmd_kv kv[2];
};

static struct esmd_function *add_fn(struct ctx *c, int i, const char *name, const char *url,
                                    int64_t timeout_ms, int max_concurrency)
{
    struct esmd_function *fn;

    snprintf(c->url[i], sizeof(c->url[i]), "%s", url);
    c->cfg[i].name = (char *)name;
    c->cfg[i].url = c->url[i];
    c->cfg[i].timeout_ms = timeout_ms;
    c->cfg[i].max_concurrency = max_concurrency;
    c->cfg[i].headers.items = c->kv;
    c->cfg[i].headers.n = 2;
    fn = esmd_invoker_add_function(c->inv, &c->cfg[i]);
    assert_non_null(fn);
    return fn;
}

static int setup(void **state)
{
    struct ctx *c = calloc(1, sizeof(*c));
    char err[256];

    c->loop = ev_loop_new(EVFLAG_AUTO);
    c->inv = esmd_invoker_new(c->loop, err, sizeof(err));
    if (c->inv == NULL)
        return -1;
    c->kv[0].key = "X-Test-Extra";
    c->kv[0].value = "hello";
    c->kv[1].key = "Authorization";
    c->kv[1].value = "Bearer t0ken";
    *state = c;
    return 0;
}

static int teardown(void **state)
{
    struct ctx *c = *state;

    esmd_invoker_free(c->inv);
    ev_loop_destroy(c->loop);
    esmd_metrics_reset();
    free(c);
    return 0;
}

static struct esmd_invoke_req *start(struct esmd_function *fn, const char *body, const char *key,
                                     const char *mapping, struct got *g)
{
    struct esmd_invoke_req *req;

    in_start = true;
    req = esmd_invoke_start(fn, body, strlen(body), key, mapping, on_result, g);
    in_start = false;
    assert_non_null(req);
    return req;
}

/* Each test uses one slot per function: the config must outlive the invoker. */
static struct got invoke_one(struct ctx *c, int slot, const char *path, int64_t timeout_ms,
                             const char *mapping)
{
    char url[128];
    struct esmd_function *fn;
    struct got g = {0};

    snprintf(url, sizeof(url), "http://127.0.0.1:%d%s", srv.port, path);
    snprintf(c->name[slot], sizeof(c->name[slot]), "fn%d", slot);
    fn = add_fn(c, slot, c->name[slot], url, timeout_ms, 1);
    start(fn, "{\"Records\":[]}", "key-1", mapping, &g);
    esmd_test_run_until_count(c->loop, &g.n, 1, 20.);
    return g;
}

static double metric_value(enum esmd_metric_type type, const char *name, const char *fn,
                           const char *mapping)
{
    struct esmd_buf b = ESMD_BUF_INIT;
    double v;

    esmd_metric_labels(&b, "function", fn, "mapping", mapping, NULL);
    v = esmd_series_value(esmd_series(esmd_metric(type, name, ""), esmd_buf_cstr(&b)));
    esmd_buf_free(&b);
    return v;
}

/* ---- tests ---- */

static void test_ok_and_headers(void **state)
{
    struct ctx *c = *state;
    struct esmd_function *fn;
    struct got g1 = {0}, g2 = {0};
    const struct seen *s1, *s2;
    char url[128];

    snprintf(url, sizeof(url), "http://127.0.0.1:%d/ok", srv.port);
    fn = add_fn(c, 0, "orders", url, 5000, 4);
    assert_ptr_equal(esmd_invoker_function(c->inv, "orders"), fn);
    assert_null(esmd_invoker_add_function(c->inv, &c->cfg[0])); /* same name */
    assert_string_equal(esmd_function_name(fn), "orders");
    start(fn, "{\"Records\":[1]}", "kafka:orders:0:42-45", "m1", &g1);
    start(fn, "{\"Records\":[2]}", "bad\nkey", NULL, &g2);
    esmd_test_run_until_count(c->loop, &g1.n, 1, 20.);
    esmd_test_run_until_count(c->loop, &g2.n, 1, 20.);

    assert_int_equal(g1.outcome, ESMD_INVOKE_OK);
    assert_int_equal(g1.status, 200);
    assert_string_equal(g1.body, "{\"ok\":true}");
    assert_int_equal(g1.retry_after_ms, -1);
    assert_string_equal(g1.function_error, "");
    assert_int_equal(strlen(g1.request_id), 36);
    assert_string_not_equal(g1.request_id, g2.request_id);

    s1 = srv_find(g1.request_id);
    s2 = srv_find(g2.request_id);
    assert_non_null(s1);
    assert_non_null(s2);
    assert_string_equal(s1->path, "/ok");
    assert_string_equal(s1->idempotency_key, "kafka:orders:0:42-45");
    assert_string_equal(s2->idempotency_key, "bad%0Akey");
    assert_string_equal(s1->extra, "hello");
    assert_string_equal(s1->auth, "Bearer t0ken");
    assert_string_equal(s1->content_type, "application/json");
    assert_false(s1->has_expect);
    assert_int_equal(s1->body_len, strlen("{\"Records\":[1]}"));

    assert_true(metric_value(ESMD_COUNTER, "esmd_invocations_total", "orders", "m1") == 1);
    assert_true(metric_value(ESMD_COUNTER, "esmd_invocations_total", "orders", NULL) == 1);
    assert_true(metric_value(ESMD_COUNTER, "esmd_errors_total", "orders", "m1") == 0);
    assert_true(metric_value(ESMD_HISTOGRAM, "esmd_duration_seconds", "orders", "m1") == 1);
    assert_int_equal(esmd_function_inflight(fn), 0);
    assert_int_equal(esmd_function_queued(fn), 0);
}

static void test_classification(void **state)
{
    struct ctx *c = *state;
    struct got g;

    g = invoke_one(c, 0, "/fnerr", 5000, "m1");
    assert_int_equal(g.outcome, ESMD_INVOKE_FUNCTION_ERROR);
    assert_int_equal(g.status, 200);
    assert_string_equal(g.function_error, "Unhandled");
    assert_string_equal(g.body, "{\"errorMessage\":\"boom\"}");

    g = invoke_one(c, 1, "/2015-03-31/functions/function/invocations", 5000, "m1");
    assert_int_equal(g.outcome, ESMD_INVOKE_FUNCTION_ERROR);
    assert_string_equal(g.function_error, "ValueError");
    assert_string_equal(g.error, "ValueError: bad input");

    g = invoke_one(c, 2, "/rie-timeout", 5000, "m1");
    assert_int_equal(g.outcome, ESMD_INVOKE_TIMEOUT);
    assert_string_equal(g.error, "Task timed out after 3.00 seconds");

    g = invoke_one(c, 3, "/throttle", 5000, "m1");
    assert_int_equal(g.outcome, ESMD_INVOKE_THROTTLED);
    assert_int_equal(g.status, 429);
    assert_int_equal(g.retry_after_ms, 2000);

    assert_true(metric_value(ESMD_COUNTER, "esmd_function_errors_total", "fn0", "m1") == 1);
    assert_true(metric_value(ESMD_COUNTER, "esmd_function_errors_total", "fn1", "m1") == 1);
    assert_true(metric_value(ESMD_COUNTER, "esmd_errors_total", "fn1", "m1") == 1);
    assert_true(metric_value(ESMD_COUNTER, "esmd_timeouts_total", "fn2", "m1") == 1);
    assert_true(metric_value(ESMD_COUNTER, "esmd_errors_total", "fn2", "m1") == 1);
    assert_true(metric_value(ESMD_COUNTER, "esmd_throttles_total", "fn3", "m1") == 1);
    assert_true(metric_value(ESMD_COUNTER, "esmd_invocations_total", "fn3", "m1") == 0);
    assert_true(metric_value(ESMD_COUNTER, "esmd_errors_total", "fn3", "m1") == 0);
}

static void test_errors(void **state)
{
    struct ctx *c = *state;
    struct got g;

    g = invoke_one(c, 0, "/unavailable", 5000, NULL);
    assert_int_equal(g.outcome, ESMD_INVOKE_ERROR);
    assert_int_equal(g.status, 503);
    assert_int_equal(g.retry_after_ms, 1000);
    assert_string_equal(g.error, "HTTP 503");

    g = invoke_one(c, 1, "/bad", 5000, NULL);
    assert_int_equal(g.outcome, ESMD_INVOKE_ERROR);
    assert_int_equal(g.status, 400);
    assert_int_equal(g.retry_after_ms, -1);
    assert_string_equal(g.body, "no");

    g = invoke_one(c, 2, "/throttle-date", 5000, NULL);
    assert_int_equal(g.outcome, ESMD_INVOKE_THROTTLED);
    assert_in_range(g.retry_after_ms, 5000, 11000);

    g = invoke_one(c, 3, "/big", 5000, NULL);
    assert_int_equal(g.outcome, ESMD_INVOKE_ERROR);
    assert_string_equal(g.error, "response over 6 MB (more than 6291456 bytes)");
    assert_true(metric_value(ESMD_COUNTER, "esmd_errors_total", "fn3", NULL) == 1);
}

static void test_large_bodies(void **state)
{
    struct ctx *c = *state;
    struct got g;

    g = invoke_one(c, 0, "/medium-ok", 5000, NULL);
    assert_int_equal(g.outcome, ESMD_INVOKE_OK);
    assert_int_equal(g.body_len, MED_LEN);

    g = invoke_one(c, 1, "/medium-err", 5000, NULL);
    assert_int_equal(g.outcome, ESMD_INVOKE_FUNCTION_ERROR);
    assert_string_equal(g.function_error, "Big");
}

static void test_timeout(void **state)
{
    struct ctx *c = *state;
    struct got g;

    g = invoke_one(c, 0, "/slow?ms=1000", 200, "m1");
    assert_int_equal(g.outcome, ESMD_INVOKE_TIMEOUT);
    assert_int_equal(g.status, 0);
    assert_string_equal(g.error, "timed out after 200 ms");
    assert_true(metric_value(ESMD_COUNTER, "esmd_timeouts_total", "fn0", "m1") == 1);
}

static void test_connection_refused(void **state)
{
    struct ctx *c = *state;
    struct sockaddr_in sin = {0};
    socklen_t sl = sizeof(sin);
    char url[128];
    struct esmd_function *fn;
    struct got g = {0};
    int fd;

    fd = socket(AF_INET, SOCK_STREAM, 0);
    sin.sin_family = AF_INET;
    sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(bind(fd, (struct sockaddr *)&sin, sizeof(sin)), 0);
    assert_int_equal(getsockname(fd, (struct sockaddr *)&sin, &sl), 0);
    close(fd); /* nobody listens there now */
    snprintf(url, sizeof(url), "http://127.0.0.1:%d/", ntohs(sin.sin_port));
    fn = add_fn(c, 0, "closed", url, 5000, 1);
    start(fn, "{}", "k", "m1", &g);
    esmd_test_run_until_count(c->loop, &g.n, 1, 20.);
    assert_int_equal(g.outcome, ESMD_INVOKE_ERROR);
    assert_int_equal(g.status, 0);
    assert_true(strlen(g.error) > 0);
}

/* ---- a raw server for malformed answers ---- */

/* Each connection: reads the request (headers and Content-Length body), writes the bytes the
 * path names, half-closes and waits for the client to close. One connection at a time. */
struct raw_srv {
    int fd, port;
    pthread_t thread;
};

static const char *raw_answer(const char *path, size_t *len)
{
    static char *big_header;
    static const struct {
        const char *path, *bytes;
    } answers[] = {
        {"/truncated", "HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n{\"tr"},
        {"/chunked", "HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nnot hex\r\n"},
        {"/nothing", ""},
        {"/cut", "HTTP/1.1 2"},
        {"/not-http", "\x01\x02 this is not HTTP\r\n\r\n"},
    };
    if (strcmp(path, "/big-header") == 0) {
        static const char head[] = "HTTP/1.1 200 OK\r\nX-Big: ";
        static const char tail[] = "\r\nContent-Length: 2\r\n\r\n{}";
        size_t n = 1024 * 1024;
        if (!big_header) {
            big_header = malloc(sizeof(head) + n + sizeof(tail));
            memcpy(big_header, head, sizeof(head) - 1);
            memset(big_header + sizeof(head) - 1, 'a', n);
            memcpy(big_header + sizeof(head) - 1 + n, tail, sizeof(tail));
        }
        *len = strlen(big_header);
        return big_header;
    }
    for (size_t i = 0; i < sizeof(answers) / sizeof(answers[0]); i++)
        if (strcmp(path, answers[i].path) == 0) {
            *len = strlen(answers[i].bytes);
            return answers[i].bytes;
        }
    *len = 0;
    return "";
}

static void *raw_serve(void *arg)
{
    struct raw_srv *r = arg;
    for (;;) {
        char buf[8192], path[64] = "";
        size_t have = 0, len;
        int c = accept(r->fd, NULL, NULL);
        if (c < 0)
            return NULL;
        for (;;) { /* the headers */
            ssize_t n = recv(c, buf + have, sizeof(buf) - 1 - have, 0);
            if (n <= 0)
                break;
            have += (size_t)n;
            buf[have] = '\0';
            char *end = strstr(buf, "\r\n\r\n");
            if (end) {
                const char *cl = strcasestr(buf, "Content-Length:");
                size_t body = cl ? strtoul(cl + 15, NULL, 10) : 0;
                size_t got = have - (size_t)(end + 4 - buf);
                while (got < body) { /* the rest of the body */
                    char sink[4096];
                    n = recv(c, sink, sizeof(sink), 0);
                    if (n <= 0)
                        break;
                    got += (size_t)n;
                }
                break;
            }
        }
        sscanf(buf, "POST %63s", path);
        const char *answer = raw_answer(path, &len);
        for (size_t off = 0; off < len;) {
            ssize_t n = send(c, answer + off, len - off, MSG_NOSIGNAL);
            if (n <= 0)
                break;
            off += (size_t)n;
        }
        shutdown(c, SHUT_WR);
        while (recv(c, buf, sizeof(buf), 0) > 0)
            ;
        close(c);
    }
}

static void raw_start(struct raw_srv *r)
{
    struct sockaddr_in sin = {0};
    socklen_t sl = sizeof(sin);

    r->fd = socket(AF_INET, SOCK_STREAM, 0);
    sin.sin_family = AF_INET;
    sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    assert_int_equal(bind(r->fd, (struct sockaddr *)&sin, sizeof(sin)), 0);
    assert_int_equal(listen(r->fd, 16), 0);
    assert_int_equal(getsockname(r->fd, (struct sockaddr *)&sin, &sl), 0);
    r->port = ntohs(sin.sin_port);
    assert_int_equal(pthread_create(&r->thread, NULL, raw_serve, r), 0);
}

static void raw_stop(struct raw_srv *r)
{
    shutdown(r->fd, SHUT_RDWR); /* accept() returns an error: the thread ends */
    pthread_join(r->thread, NULL);
    close(r->fd);
}

/* What the function did wrong is in the error message, not "error (status 200)" with
 * libcurl's words only (and not "Out of memory" for a big header). */
static void test_malformed_answers(void **state)
{
    struct ctx *c = *state;
    struct raw_srv r;
    static const struct {
        const char *path, *prefix;
    } cases[] = {
        {"/truncated", "truncated response: the connection closed before the body ended ("},
        {"/chunked", "invalid chunked encoding ("},
        {"/nothing", "no response: the connection closed before an answer ("},
        {"/cut", "no response: the connection closed before an answer ("},
        {"/not-http", "malformed response: not HTTP/1.x ("},
        {"/big-header", "response headers too large"},
    };

    raw_start(&r);
    for (size_t i = 0; i < sizeof(cases) / sizeof(cases[0]); i++) {
        char url[128], err[256];
        struct got g = {0};
        struct esmd_function *fn;

        /* a fresh invoker per case: a function's config slot must outlive it */
        esmd_invoker_free(c->inv);
        c->inv = esmd_invoker_new(c->loop, err, sizeof(err));
        assert_non_null(c->inv);
        snprintf(url, sizeof(url), "http://127.0.0.1:%d%s", r.port, cases[i].path);
        fn = add_fn(c, 0, "raw", url, 5000, 1);
        start(fn, "{}", "k", NULL, &g);
        esmd_test_run_until_count(c->loop, &g.n, 1, 20.);
        assert_int_equal(g.outcome, ESMD_INVOKE_ERROR);
        if (strncmp(g.error, cases[i].prefix, strlen(cases[i].prefix)) != 0)
            fail_msg("%s: error \"%s\", expected it to start with \"%s\"", cases[i].path, g.error,
                     cases[i].prefix);
    }
    raw_stop(&r);
}

static void test_max_concurrency(void **state)
{
    struct ctx *c = *state;
    struct esmd_function *fn;
    struct got g[10];
    int max, base = results;
    char url[128];

    memset(g, 0, sizeof(g));
    srv_quiesce();
    snprintf(url, sizeof(url), "http://127.0.0.1:%d/slow?ms=100", srv.port);
    fn = add_fn(c, 0, "slow", url, 5000, 2);
    for (int i = 0; i < 10; i++) {
        g[i].fn = fn;
        start(fn, "{}", "k", "m1", &g[i]);
    }
    assert_int_equal(esmd_function_inflight(fn), 2);
    assert_int_equal(esmd_function_queued(fn), 8);
    assert_true(metric_value(ESMD_GAUGE, "esmd_invoke_queued", "slow", NULL) == 8);
    assert_true(metric_value(ESMD_GAUGE, "esmd_concurrent_executions", "slow", NULL) == 2);
    esmd_test_run_until_count(c->loop, &results, base + 10, 20.);
    for (int i = 0; i < 10; i++) {
        assert_int_equal(g[i].outcome, ESMD_INVOKE_OK);
        assert_true(g[i].max_inflight <= 2);
    }
    pthread_mutex_lock(&srv.mu);
    max = srv.max;
    pthread_mutex_unlock(&srv.mu);
    assert_in_range(max, 1, 2);
    assert_int_equal(esmd_function_inflight(fn), 0);
    assert_true(metric_value(ESMD_GAUGE, "esmd_invoke_queued", "slow", NULL) == 0);
    assert_true(metric_value(ESMD_COUNTER, "esmd_invocations_total", "slow", "m1") == 10);
}

static void test_keep_alive(void **state)
{
    struct ctx *c = *state;
    struct esmd_function *fn;
    struct got g[6];
    char url[128];
    int before, base = results;

    memset(g, 0, sizeof(g));
    snprintf(url, sizeof(url), "http://127.0.0.1:%d/ok", srv.port);
    fn = add_fn(c, 0, "ka", url, 5000, 1);
    before = srv_connections();
    for (int i = 0; i < 6; i++) {
        start(fn, "{}", "k", NULL, &g[i]);
    }
    esmd_test_run_until_count(c->loop, &results, base + 6, 20.);
    for (int i = 0; i < 6; i++)
        assert_int_equal(g[i].outcome, ESMD_INVOKE_OK);
    /* Six requests, one after the other, on one kept-alive connection. */
    assert_int_equal(srv_connections() - before, 1);
}

static void test_cancel(void **state)
{
    struct ctx *c = *state;
    struct esmd_function *fn;
    struct esmd_invoke_req *a, *b;
    struct got ga = {0}, gb = {0}, gc = {0};
    char url[128];

    snprintf(url, sizeof(url), "http://127.0.0.1:%d/slow?ms=500", srv.port);
    fn = add_fn(c, 0, "cancel", url, 5000, 1);
    a = start(fn, "{}", "k", NULL, &ga);
    b = start(fn, "{}", "k", NULL, &gb);
    assert_int_equal(esmd_function_queued(fn), 1);

    esmd_invoke_cancel(b); /* queued: its callback runs before cancel returns */
    assert_int_equal(gb.n, 1);
    assert_int_equal(gb.outcome, ESMD_INVOKE_CANCELLED);
    assert_int_equal(esmd_function_queued(fn), 0);

    esmd_test_run_for(c->loop, 0.1); /* a is on the wire now */
    assert_int_equal(ga.n, 0);
    esmd_invoke_cancel(a);
    assert_int_equal(ga.n, 1);
    assert_int_equal(ga.outcome, ESMD_INVOKE_CANCELLED);
    assert_int_equal(esmd_function_inflight(fn), 0);

    /* The invoker works on afterwards (the config is borrowed: point it at /ok). */
    snprintf(c->url[0], sizeof(c->url[0]), "http://127.0.0.1:%d/ok", srv.port);
    start(fn, "{}", "k", NULL, &gc);
    esmd_test_run_until_count(c->loop, &gc.n, 1, 20.);
    assert_int_equal(gc.outcome, ESMD_INVOKE_OK);
    esmd_test_run_for(c->loop, 0.05);
    assert_int_equal(ga.n, 1); /* never called twice */
    assert_true(metric_value(ESMD_COUNTER, "esmd_invocations_total", "cancel", NULL) == 1);
}

/* Cancelling from another request's callback, and starting new requests from a callback. */
struct chain {
    struct esmd_function *fn;
    struct esmd_invoke_req *victim;
    struct got *victim_got;
    struct got next;
    int n;
};

static void on_chain(void *ud, const struct esmd_invoke_result *res)
{
    struct chain *ch = ud;

    assert_false(in_start);
    ch->n++;
    assert_int_equal(res->outcome, ESMD_INVOKE_OK);
    esmd_invoke_cancel(ch->victim);
    assert_int_equal(ch->victim_got->outcome, ESMD_INVOKE_CANCELLED);
    assert_non_null(esmd_invoke_start(ch->fn, "{}", 2, "k", NULL, on_result, &ch->next));
}

static void test_cancel_from_callback(void **state)
{
    struct ctx *c = *state;
    struct chain ch = {0};
    struct got victim = {0};
    char url[128];

    snprintf(url, sizeof(url), "http://127.0.0.1:%d/ok", srv.port);
    ch.fn = add_fn(c, 0, "chain", url, 5000, 1);
    in_start = true;
    assert_non_null(esmd_invoke_start(ch.fn, "{}", 2, "k", NULL, on_chain, &ch));
    in_start = false;
    ch.victim = start(ch.fn, "{}", "k", NULL, &victim);
    ch.victim_got = &victim;
    esmd_test_run_until_count(c->loop, &ch.next.n, 1, 20.);
    assert_int_equal(ch.n, 1);
    assert_int_equal(victim.n, 1);
    assert_int_equal(ch.next.outcome, ESMD_INVOKE_OK);
}

static void test_free_cancels(void **state)
{
    struct ctx *c = *state;
    struct esmd_function *fn;
    struct got ga = {0}, gb = {0};
    char url[128];

    snprintf(url, sizeof(url), "http://127.0.0.1:%d/slow?ms=300", srv.port);
    fn = add_fn(c, 0, "freeing", url, 5000, 1);
    start(fn, "{}", "k", NULL, &ga);
    start(fn, "{}", "k", NULL, &gb);
    esmd_test_run_for(c->loop, 0.05);
    esmd_invoker_free(c->inv);
    c->inv = NULL;
    assert_int_equal(ga.n, 1);
    assert_int_equal(gb.n, 1);
    assert_int_equal(ga.outcome, ESMD_INVOKE_CANCELLED);
    assert_int_equal(gb.outcome, ESMD_INVOKE_CANCELLED);
}

/* A reload (esmd_invoker_update_function): the request in flight finishes on the old url and
 * headers; queued and later requests use the new ones, on handles set up for the new url (not
 * the old request's, which goes back last); a higher max_concurrency starts queued requests. */
static void test_update_function(void **state)
{
    struct ctx *c = *state;
    struct esmd_function *fn;
    struct got g[4];
    static struct esmd_kv kv2[1] = {{"X-Test-Extra", "bye"}};
    char url[128];
    int base = results;

    memset(g, 0, sizeof(g));
    srv_quiesce();
    snprintf(url, sizeof(url), "http://127.0.0.1:%d/slow?ms=300", srv.port);
    fn = add_fn(c, 0, "upd", url, 5000, 1);
    for (int i = 0; i < 3; i++)
        start(fn, "{}", "k", NULL, &g[i]);
    assert_int_equal(esmd_function_inflight(fn), 1);
    assert_int_equal(esmd_function_queued(fn), 2);

    c->cfg[1] = c->cfg[0];
    snprintf(c->url[1], sizeof(c->url[1]), "http://127.0.0.1:%d/ok", srv.port);
    c->cfg[1].url = c->url[1];
    c->cfg[1].max_concurrency = 3;
    c->cfg[1].headers.items = kv2;
    c->cfg[1].headers.n = 1;
    esmd_invoker_update_function(c->inv, &c->cfg[1]);
    assert_int_equal(esmd_function_inflight(fn), 3); /* the two queued ones started */
    assert_int_equal(esmd_function_queued(fn), 0);
    esmd_test_run_until_count(c->loop, &results, base + 3, 20.);
    start(fn, "{}", "k", NULL, &g[3]);
    esmd_test_run_until_count(c->loop, &results, base + 4, 20.);

    for (int i = 0; i < 4; i++) {
        const struct seen *s = srv_find(g[i].request_id);
        assert_int_equal(g[i].outcome, ESMD_INVOKE_OK);
        assert_non_null(s);
        assert_string_equal(s->path, i == 0 ? "/slow" : "/ok");
        assert_string_equal(s->extra, i == 0 ? "hello" : "bye");
        assert_string_equal(s->auth, i == 0 ? "Bearer t0ken" : "");
    }
    assert_ptr_equal(esmd_invoker_function(c->inv, "upd"), fn);
}

/* The "invocations" esmd_invoker_describe gives function name. */
static int described_invocations(struct ctx *c, const char *name)
{
    struct esmd_buf out = ESMD_BUF_INIT, key = ESMD_BUF_INIT;
    int n = -1;

    esmd_invoker_describe(c->inv, &out);
    esmd_buf_printf(&key, "{\"name\":\"%s\",", name);
    const char *at = strstr(esmd_buf_cstr(&out), esmd_buf_cstr(&key));
    if (at && (at = strstr(at, "\"invocations\":")) != NULL)
        n = atoi(at + strlen("\"invocations\":"));
    esmd_buf_free(&out);
    esmd_buf_free(&key);
    return n;
}

/* A mapping a reload removed: the invoker forgets it (esmd_invoker_forget_mapping), then its
 * series are hidden. The function's totals keep its counts while the hidden series are kept;
 * once they are freed (more hidden than ESMD_METRICS_HIDDEN_MAX) nothing of the invoker uses
 * them (ASan), and the mapping added back counts anew. A request of a forgotten mapping still
 * out is not counted. */
static void test_forget_mapping(void **state)
{
    struct ctx *c = *state;
    struct got g1 = {0}, g2 = {0}, g3 = {0}, late = {0};
    char url[128], name[32];

    snprintf(url, sizeof(url), "http://127.0.0.1:%d/ok", srv.port);
    struct esmd_function *fn = add_fn(c, 0, "forget", url, 5000, 4);
    snprintf(url, sizeof(url), "http://127.0.0.1:%d/slow?ms=300", srv.port);
    struct esmd_function *slow = add_fn(c, 1, "forget-slow", url, 5000, 1);
    start(fn, "{}", "k", "gone", &g1);
    start(fn, "{}", "k", NULL, &g2);
    esmd_test_run_until_count(c->loop, &g1.n, 1, 20.);
    esmd_test_run_until_count(c->loop, &g2.n, 1, 20.);
    esmd_invoker_forget_mapping(c->inv, "gone");
    /* invocations, errors, throttles, timeouts, function errors, duration */
    assert_int_equal(esmd_metrics_hide("mapping", "gone"), 6);
    assert_int_equal(described_invocations(c, "forget"), 2);

    start(slow, "{}", "k", "late", &late);
    esmd_test_run_for(c->loop, 0.1); /* on the wire */
    esmd_invoker_forget_mapping(c->inv, "late");
    esmd_metrics_hide("mapping", "late");
    esmd_test_run_until_count(c->loop, &late.n, 1, 20.);
    assert_int_equal(late.outcome, ESMD_INVOKE_OK);
    assert_int_equal(described_invocations(c, "forget-slow"), 0);

    /* more series hidden than are kept: "gone"'s are freed, and leave the totals */
    struct esmd_metric *filler = esmd_metric(ESMD_COUNTER, "t_filler_total", "F.");
    for (int i = 0; i < ESMD_METRICS_HIDDEN_MAX; i++) {
        struct esmd_buf l = ESMD_BUF_INIT;
        snprintf(name, sizeof(name), "f%d", i);
        esmd_metric_labels(&l, "mapping", name, NULL);
        esmd_series_inc(esmd_series(filler, esmd_buf_cstr(&l)), 1);
        esmd_metrics_hide("mapping", name);
        esmd_buf_free(&l);
    }
    assert_int_equal(described_invocations(c, "forget"), 1);
    start(fn, "{}", "k", "gone", &g3); /* added back: anew */
    esmd_test_run_until_count(c->loop, &g3.n, 1, 20.);
    assert_true(metric_value(ESMD_COUNTER, "esmd_invocations_total", "forget", "gone") == 1);
    assert_int_equal(described_invocations(c, "forget"), 2);
}

static void test_bad_arguments(void **state)
{
    struct ctx *c = *state;
    struct got g = {0};

    assert_null(esmd_invoke_start(NULL, "{}", 2, "k", NULL, on_result, &g));
    assert_null(esmd_invoker_add_function(c->inv, NULL));
    assert_null(esmd_invoker_function(c->inv, "nope"));
    assert_string_equal(esmd_invoke_outcome_name(ESMD_INVOKE_THROTTLED), "throttled");
    esmd_invoke_cancel(NULL);
    esmd_invoker_free(NULL);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_ok_and_headers, setup, teardown),
        cmocka_unit_test_setup_teardown(test_classification, setup, teardown),
        cmocka_unit_test_setup_teardown(test_errors, setup, teardown),
        cmocka_unit_test_setup_teardown(test_large_bodies, setup, teardown),
        cmocka_unit_test_setup_teardown(test_timeout, setup, teardown),
        cmocka_unit_test_setup_teardown(test_connection_refused, setup, teardown),
        cmocka_unit_test_setup_teardown(test_malformed_answers, setup, teardown),
        cmocka_unit_test_setup_teardown(test_max_concurrency, setup, teardown),
        cmocka_unit_test_setup_teardown(test_keep_alive, setup, teardown),
        cmocka_unit_test_setup_teardown(test_cancel, setup, teardown),
        cmocka_unit_test_setup_teardown(test_cancel_from_callback, setup, teardown),
        cmocka_unit_test_setup_teardown(test_free_cancels, setup, teardown),
        cmocka_unit_test_setup_teardown(test_update_function, setup, teardown),
        cmocka_unit_test_setup_teardown(test_forget_mapping, setup, teardown),
        cmocka_unit_test_setup_teardown(test_bad_arguments, setup, teardown),
    };
    int rc;

    esmd_test_http_init();
    rc = cmocka_run_group_tests(tests, group_setup, group_teardown);
    curl_global_cleanup();
    return rc;
}
