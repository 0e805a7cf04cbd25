/* Admin HTTP listener: built-in routes, registered routes, answers from the loop, stop with a
 * request still waiting. The loop runs on the test thread; each request is made with libcurl
 * easy from a helper thread that wakes the loop with an ev_async when it is done. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "testutil.h"

#include <arpa/inet.h>
#include <curl/curl.h>
#include <ev.h>
#include <netinet/in.h>
#include <pthread.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "esmd/http.h"
#include "esmd/log.h"
#include "esmd/metrics.h"

struct fetch {
    /* in */
    char url[256];
    const char *method;
    const char *body;
    size_t body_len;
    bool chunked;
    const char *source; /* client address to connect from (CURLOPT_INTERFACE), or NULL */
    const char *header; /* one more request header line, or NULL */
    struct ev_loop *loop;
    ev_async *wake;
    /* out */
    CURLcode cc;
    long status;
    struct esmd_buf resp;
    char content_type[128];
    char error_type[128];
    char allow[64];
    char x_test[64];
    char connection[64];
};

static size_t fetch_write(char *p, size_t size, size_t n, void *ud)
{
    struct fetch *f = ud;
    esmd_buf_append(&f->resp, p, size * n);
    return size * n;
}

static void fetch_header_value(const char *line, size_t n, const char *name, char *out,
                               size_t outlen)
{
    size_t nl = strlen(name);
    const char *v;
    size_t vl;

    if (n <= nl + 1 || strncasecmp(line, name, nl) != 0 || line[nl] != ':')
        return;
    v = line + nl + 1;
    while (*v == ' ')
        v++;
    vl = n - (size_t)(v - line);
    while (vl > 0 && (v[vl - 1] == '\r' || v[vl - 1] == '\n'))
        vl--;
    snprintf(out, outlen, "%.*s", (int)vl, v);
}

static size_t fetch_header(char *p, size_t size, size_t n, void *ud)
{
    struct fetch *f = ud;
    fetch_header_value(p, size * n, "Content-Type", f->content_type, sizeof(f->content_type));
    fetch_header_value(p, size * n, "x-amzn-ErrorType", f->error_type, sizeof(f->error_type));
    fetch_header_value(p, size * n, "Allow", f->allow, sizeof(f->allow));
    fetch_header_value(p, size * n, "X-Test", f->x_test, sizeof(f->x_test));
    fetch_header_value(p, size * n, "Connection", f->connection, sizeof(f->connection));
    return size * n;
}

struct upload {
    const char *p;
    size_t left;
};

static size_t fetch_read(char *buf, size_t size, size_t n, void *ud)
{
    struct upload *u = ud;
    size_t k = size * n < u->left ? size * n : u->left;
    memcpy(buf, u->p, k);
    u->p += k;
    u->left -= k;
    return k;
}

static void *fetch_thread(void *arg)
{
    struct fetch *f = arg;
    CURL *easy = curl_easy_init();
    struct curl_slist *h = NULL;
    struct upload up = {f->body, f->body_len};

    curl_easy_setopt(easy, CURLOPT_URL, f->url);
    curl_easy_setopt(easy, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(easy, CURLOPT_TIMEOUT, 20L);
    curl_easy_setopt(easy, CURLOPT_WRITEFUNCTION, fetch_write);
    curl_easy_setopt(easy, CURLOPT_WRITEDATA, f);
    curl_easy_setopt(easy, CURLOPT_HEADERFUNCTION, fetch_header);
    curl_easy_setopt(easy, CURLOPT_HEADERDATA, f);
    h = curl_slist_append(h, "X-Client: test");
    h = curl_slist_append(h, "Expect:");
    if (f->header != NULL)
        h = curl_slist_append(h, f->header);
    if (f->source != NULL)
        curl_easy_setopt(easy, CURLOPT_INTERFACE, f->source);
    if (f->chunked) {
        h = curl_slist_append(h, "Transfer-Encoding: chunked");
        curl_easy_setopt(easy, CURLOPT_UPLOAD, 1L);
        curl_easy_setopt(easy, CURLOPT_READFUNCTION, fetch_read);
        curl_easy_setopt(easy, CURLOPT_READDATA, &up);
        curl_easy_setopt(easy, CURLOPT_CUSTOMREQUEST, "POST");
    } else if (f->body != NULL) {
        curl_easy_setopt(easy, CURLOPT_POSTFIELDS, f->body);
        curl_easy_setopt(easy, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)f->body_len);
    }
    curl_easy_setopt(easy, CURLOPT_HTTPHEADER, h);
    if (f->method != NULL && strcmp(f->method, "HEAD") == 0)
        curl_easy_setopt(easy, CURLOPT_NOBODY, 1L);
    else if (f->method != NULL && !f->chunked)
        curl_easy_setopt(easy, CURLOPT_CUSTOMREQUEST, f->method);
    f->cc = curl_easy_perform(easy);
    curl_easy_getinfo(easy, CURLINFO_RESPONSE_CODE, &f->status);
    curl_easy_cleanup(easy);
    curl_slist_free_all(h);
    ev_async_send(f->loop, f->wake);
    return NULL;
}

static void wake_cb(struct ev_loop *loop, ev_async *w, int revents)
{
    (void)loop;
    (void)revents;
    *(bool *)w->data = true;
}

static void guard_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)revents;
    *(bool *)w->data = true;
}

struct ctx {
    struct ev_loop *loop;
    struct esmd_http *http;
    int port;
};

/* Starts a request in a helper thread and runs the loop until it is done. */
static void fetch_start(struct ctx *c, struct fetch *f, pthread_t *th, ev_async *wake, bool *done,
                        const char *method, const char *path)
{
    snprintf(f->url, sizeof(f->url), "http://127.0.0.1:%d%s", c->port, path);
    f->method = method;
    f->loop = c->loop;
    f->wake = wake;
    esmd_buf_init(&f->resp);
    *done = false;
    ev_async_init(wake, wake_cb);
    wake->data = done;
    ev_async_start(c->loop, wake);
    assert_int_equal(pthread_create(th, NULL, fetch_thread, f), 0);
}

static void fetch_finish(struct ctx *c, pthread_t th, ev_async *wake)
{
    pthread_join(th, NULL);
    ev_async_stop(c->loop, wake);
}

static void fetch(struct ctx *c, struct fetch *f, const char *method, const char *path)
{
    pthread_t th;
    ev_async wake;
    bool done;

    fetch_start(c, f, &th, &wake, &done, method, path);
    esmd_test_run_until_flag(c->loop, &done, 20.);
    fetch_finish(c, th, &wake);
}

static const struct esmd_http_limits *setup_limits;

static int setup(void **state)
{
    struct ctx *c = calloc(1, sizeof(*c));
    char err[256];

    c->loop = ev_loop_new(EVFLAG_AUTO);
    c->http = esmd_http_start(c->loop, "127.0.0.1:0", setup_limits, err, sizeof(err));
    if (c->http == NULL) {
        fprintf(stderr, "esmd_http_start: %s\n", err);
        return -1;
    }
    c->port = esmd_http_port(c->http);
    *state = c;
    return 0;
}

/* per_client 3, max_connections 6, reserve 2 */
static int setup_small(void **state)
{
    static const struct esmd_http_limits lim = {
        .max_connections = 6, .per_client = 3, .reserve = 2};
    int rc;

    setup_limits = &lim;
    rc = setup(state);
    setup_limits = NULL;
    return rc;
}

/* per_client 1, reserve 1 */
static int setup_tiny(void **state)
{
    static const struct esmd_http_limits lim = {.per_client = 1, .reserve = 1};
    int rc;

    setup_limits = &lim;
    rc = setup(state);
    setup_limits = NULL;
    return rc;
}

static int teardown(void **state)
{
    struct ctx *c = *state;

    esmd_http_stop(c->http);
    ev_loop_destroy(c->loop);
    esmd_metrics_reset();
    free(c);
    return 0;
}

/* ---- tests ---- */

static void test_healthz(void **state)
{
    struct ctx *c = *state;
    struct fetch f = {0};

    assert_true(c->port > 0);
    fetch(c, &f, NULL, "/healthz");
    assert_int_equal(f.cc, CURLE_OK);
    assert_int_equal(f.status, 200);
    assert_string_equal(f.content_type, "application/json");
    assert_string_equal(esmd_buf_cstr(&f.resp), "{\"status\":\"ok\"}");
    esmd_buf_free(&f.resp);

    memset(&f, 0, sizeof(f));
    fetch(c, &f, "HEAD", "/healthz");
    assert_int_equal(f.cc, CURLE_OK);
    assert_int_equal(f.status, 200);
    assert_int_equal(f.resp.len, 0);
    esmd_buf_free(&f.resp);
}

static bool ready_value;

static bool ready_fn(void *ud, struct esmd_buf *detail)
{
    assert_ptr_equal(ud, &ready_value);
    esmd_buf_printf(detail, "{\"postgres\":%s}", ready_value ? "true" : "false");
    return ready_value;
}

static void test_readyz(void **state)
{
    struct ctx *c = *state;
    struct fetch f = {0};

    fetch(c, &f, NULL, "/readyz"); /* no probe registered: ready */
    assert_int_equal(f.status, 200);
    assert_string_equal(f.content_type, "application/json");
    esmd_buf_free(&f.resp);

    esmd_http_set_ready_fn(c->http, ready_fn, &ready_value);
    ready_value = true;
    memset(&f, 0, sizeof(f));
    fetch(c, &f, NULL, "/readyz");
    assert_int_equal(f.status, 200);
    assert_string_equal(esmd_buf_cstr(&f.resp), "{\"postgres\":true}");
    esmd_buf_free(&f.resp);

    ready_value = false;
    memset(&f, 0, sizeof(f));
    fetch(c, &f, NULL, "/readyz");
    assert_int_equal(f.status, 503);
    assert_string_equal(esmd_buf_cstr(&f.resp), "{\"postgres\":false}");
    esmd_buf_free(&f.resp);
}

static void test_metrics(void **state)
{
    struct ctx *c = *state;
    struct fetch f = {0};

    esmd_series_inc(
        esmd_series(esmd_metric(ESMD_COUNTER, "esmd_http_test_total", "Test."), "function=\"f\""),
        3);
    fetch(c, &f, NULL, "/metrics");
    assert_int_equal(f.status, 200);
    assert_string_equal(f.content_type, "text/plain; version=0.0.4; charset=utf-8");
    assert_string_equal(esmd_buf_cstr(&f.resp),
                        "# HELP esmd_http_test_total Test.\n"
                        "# TYPE esmd_http_test_total counter\n"
                        "esmd_http_test_total{function=\"f\"} 3\n"
                        "# HELP esmd_ready 1 when /readyz answers 200 (ready), 0 when 503.\n"
                        "# TYPE esmd_ready gauge\n"
                        "esmd_ready 1\n");
    esmd_buf_free(&f.resp);

    /* esmd_ready is what /readyz would answer at the scrape */
    esmd_http_set_ready_fn(c->http, ready_fn, &ready_value);
    ready_value = false;
    memset(&f, 0, sizeof(f));
    fetch(c, &f, NULL, "/metrics");
    assert_int_equal(f.status, 200);
    assert_non_null(strstr(esmd_buf_cstr(&f.resp), "\nesmd_ready 0\n"));
    esmd_buf_free(&f.resp);
    ready_value = true;
    memset(&f, 0, sizeof(f));
    fetch(c, &f, NULL, "/metrics");
    assert_non_null(strstr(esmd_buf_cstr(&f.resp), "\nesmd_ready 1\n"));
    esmd_buf_free(&f.resp);
}

static void test_not_found_and_method(void **state)
{
    struct ctx *c = *state;
    struct fetch f = {0};

    fetch(c, &f, NULL, "/nope");
    assert_int_equal(f.status, 404);
    assert_string_equal(f.content_type, "application/json");
    assert_string_equal(f.error_type, "ResourceNotFoundException");
    assert_string_equal(esmd_buf_cstr(&f.resp),
                        "{\"Type\":\"User\",\"Message\":\"no route for GET /nope\"}");
    esmd_buf_free(&f.resp);

    memset(&f, 0, sizeof(f));
    fetch(c, &f, "DELETE", "/metrics");
    assert_int_equal(f.status, 405);
    assert_string_equal(f.allow, "GET");
    assert_non_null(strstr(esmd_buf_cstr(&f.resp), "\"Type\":\"User\""));
    esmd_buf_free(&f.resp);
}

/* A registered route answering at once, with the request's details. */
static void echo_handler(void *ud, struct esmd_http_req *req)
{
    struct esmd_buf b = ESMD_BUF_INIT;
    size_t len;
    const char *body = esmd_http_req_body(req, &len);
    const char *q = esmd_http_req_query(req, "q");

    assert_ptr_equal(ud, (void *)0x1);
    esmd_buf_printf(&b, "%s %s q=%s client=%s loopback=%d body=%zu:%s", esmd_http_req_method(req),
                    esmd_http_req_path(req), q ? q : "-", esmd_http_req_header(req, "x-client"),
                    esmd_http_req_is_loopback(req), len, len < 64 ? body : "(long)");
    esmd_http_req_add_header(req, "X-Test", "echo");
    esmd_http_respond(req, 201, "text/plain", esmd_buf_cstr(&b), b.len);
    esmd_buf_free(&b);
}

static void test_route(void **state)
{
    struct ctx *c = *state;
    struct fetch f = {0};

    assert_int_equal(esmd_http_route(c->http, "POST", "/admin/*", echo_handler, (void *)0x1), 0);
    assert_int_equal(esmd_http_route(c->http, "POST", "bad", echo_handler, NULL), ESMD_EINVAL);
    f.body = "hello";
    f.body_len = 5;
    fetch(c, &f, "POST", "/admin/dlq/x?q=1");
    assert_int_equal(f.status, 201);
    assert_string_equal(f.x_test, "echo");
    assert_string_equal(esmd_buf_cstr(&f.resp),
                        "POST /admin/dlq/x q=1 client=test loopback=1 body=5:hello");
    esmd_buf_free(&f.resp);

    memset(&f, 0, sizeof(f));
    fetch(c, &f, NULL, "/admin/x"); /* prefix matches, method does not */
    assert_int_equal(f.status, 405);
    assert_string_equal(f.allow, "POST");
    esmd_buf_free(&f.resp);
}

static void test_too_large(void **state)
{
    struct ctx *c = *state;
    struct fetch f = {0};
    size_t n = ESMD_MAX_PAYLOAD + 10;
    char *big = malloc(n);

    memset(big, 'a', n);
    assert_int_equal(esmd_http_route(c->http, "POST", "/echo", echo_handler, (void *)0x1), 0);
    /* Chunked: the body is read and dropped, the handler never runs. */
    f.body = big;
    f.body_len = n;
    f.chunked = true;
    fetch(c, &f, "POST", "/echo");
    assert_int_equal(f.status, 413);
    assert_string_equal(f.error_type, "RequestTooLargeException");
    esmd_buf_free(&f.resp);

    /* With a Content-Length over the cap the answer comes before the body is read. */
    memset(&f, 0, sizeof(f));
    f.body = big;
    f.body_len = n;
    fetch(c, &f, "POST", "/echo");
    if (f.cc == CURLE_OK) /* or the server closed the connection while curl was still sending */
        assert_int_equal(f.status, 413);
    esmd_buf_free(&f.resp);

    /* Exactly at the cap is accepted. */
    memset(&f, 0, sizeof(f));
    f.body = big;
    f.body_len = ESMD_MAX_PAYLOAD;
    fetch(c, &f, "POST", "/echo");
    assert_int_equal(f.status, 201);
    assert_non_null(strstr(esmd_buf_cstr(&f.resp), "body=6291456:(long)"));
    esmd_buf_free(&f.resp);
    free(big);
}

/* A chunked body past the limit is dropped while it lasts (its 413 comes at its end), but not
 * forever: more than 6 MB past the limit and the connection is closed unanswered. */
static void test_endless_chunked_body_cut_off(void **state)
{
    struct ctx *c = *state;
    struct fetch f = {0};
    size_t n = 2 * (size_t)ESMD_MAX_PAYLOAD + 1024 * 1024;
    char *big = malloc(n);

    memset(big, 'a', n);
    assert_int_equal(esmd_http_route(c->http, "POST", "/echo", echo_handler, (void *)0x1), 0);
    f.body = big;
    f.body_len = n;
    f.chunked = true;
    fetch(c, &f, "POST", "/echo");
    assert_int_not_equal(f.cc, CURLE_OK);
    esmd_buf_free(&f.resp);
    free(big);
}

/* A route answering later, from a loop timer (the connection is suspended meanwhile). */
struct later {
    ev_timer timer;
    struct esmd_http_req *req;
    int handled;
};

static void later_timer_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct later *l = (struct later *)w;
    static const char body[] = "{\"later\":true}";

    (void)loop;
    (void)revents;
    esmd_http_req_add_header(l->req, "X-Test", "later");
    esmd_http_respond(l->req, 200, "application/json", body, sizeof(body) - 1);
    l->req = NULL;
}

static struct ev_loop *later_loop;

static void later_handler(void *ud, struct esmd_http_req *req)
{
    struct later *l = ud;

    l->handled++;
    l->req = req;
    ev_timer_init(&l->timer, later_timer_cb, 0.05, 0.);
    ev_timer_start(later_loop, &l->timer);
}

static void test_answer_later(void **state)
{
    struct ctx *c = *state;
    struct later l = {0};
    struct fetch f = {0}, g = {0};
    pthread_t th;
    ev_async wake;
    bool done;

    later_loop = c->loop;
    assert_int_equal(esmd_http_route(c->http, "GET", "/later", later_handler, &l), 0);
    fetch(c, &f, NULL, "/later");
    assert_int_equal(l.handled, 1);
    assert_int_equal(f.status, 200);
    assert_string_equal(f.x_test, "later");
    assert_string_equal(esmd_buf_cstr(&f.resp), "{\"later\":true}");
    esmd_buf_free(&f.resp);

    /* Other requests are served while one waits. */
    fetch_start(c, &f, &th, &wake, &done, NULL, "/later");
    memset(&g, 0, sizeof(g));
    fetch(c, &g, NULL, "/healthz");
    assert_int_equal(g.status, 200);
    esmd_buf_free(&g.resp);
    esmd_test_run_until_flag(c->loop, &done, 20.);
    fetch_finish(c, th, &wake);
    assert_int_equal(f.status, 200);
    esmd_buf_free(&f.resp);
}

/* A route that never answers: stopping the listener aborts it and the client gets a 503. */
struct never {
    struct esmd_http_req *req;
    int aborted;
};

static void never_abort(void *ud, struct esmd_http_req *req)
{
    struct never *n = ud;

    assert_ptr_equal(req, n->req);
    n->aborted++;
    n->req = NULL;
}

static void never_handler(void *ud, struct esmd_http_req *req)
{
    struct never *n = ud;

    n->req = req;
    esmd_http_req_on_abort(req, never_abort, n);
}

static void test_stop_with_pending(void **state)
{
    struct ctx *c = *state;
    struct never n = {0};
    struct fetch f = {0};
    pthread_t th;
    ev_async wake;
    bool done;
    ev_timer guard;
    bool expired = false;

    assert_int_equal(esmd_http_route(c->http, "GET", "/never", never_handler, &n), 0);
    fetch_start(c, &f, &th, &wake, &done, NULL, "/never");
    ev_timer_init(&guard, guard_cb, 20., 0.);
    guard.data = &expired;
    ev_timer_start(c->loop, &guard);
    while (n.req == NULL && !expired)
        ev_run(c->loop, EVRUN_ONCE);
    ev_timer_stop(c->loop, &guard);
    assert_non_null(n.req);

    esmd_http_stop(c->http);
    c->http = NULL;
    assert_int_equal(n.aborted, 1);
    fetch_finish(c, th, &wake);
    assert_int_equal(f.cc, CURLE_OK);
    assert_int_equal(f.status, 503);
    assert_string_equal(f.error_type, "ServiceException");
    esmd_buf_free(&f.resp);
}

static void test_listen_addresses(void **state)
{
    struct ctx *c = *state;
    char err[256];
    char addr[64];
    struct esmd_http *h;

    err[0] = '\0';
    assert_null(esmd_http_start(c->loop, "nonsense", NULL, err, sizeof(err)));
    assert_non_null(strstr(err, "expected host:port"));
    assert_null(esmd_http_start(c->loop, "127.0.0.1:99999", NULL, err, sizeof(err)));
    assert_non_null(strstr(err, "port must be"));
    assert_null(esmd_http_start(c->loop, "::1:80", NULL, err, sizeof(err)));
    assert_null(esmd_http_start(c->loop, "[::1:80", NULL, err, sizeof(err)));
    assert_null(esmd_http_start(c->loop, "no-such-host.invalid:80", NULL, err, sizeof(err)));

    /* Port in use. */
    snprintf(addr, sizeof(addr), "127.0.0.1:%d", c->port);
    err[0] = '\0';
    assert_null(esmd_http_start(c->loop, addr, NULL, err, sizeof(err)));
    assert_non_null(strstr(err, "cannot listen on"));

    h = esmd_http_start(c->loop, "localhost:0", NULL, err, sizeof(err));
    assert_non_null(h);
    assert_true(esmd_http_port(h) > 0);
    esmd_http_stop(h);

    /* IPv6 loopback, when the host has it. */
    h = esmd_http_start(c->loop, "[::1]:0", NULL, err, sizeof(err));
    if (h != NULL) {
        assert_true(esmd_http_port(h) > 0);
        esmd_http_stop(h);
    }
    esmd_http_stop(NULL);
}

/* ---- authentication before the body, connection limits ---- */

/* A raw connection from source (an address of 127.0.0.0/8) to the listener. */
static int raw_connect(struct ctx *c, const char *source)
{
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    struct sockaddr_in sin = {.sin_family = AF_INET};
    struct timeval tv = {20, 0};

    assert_true(fd >= 0);
    assert_int_equal(setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv)), 0);
    assert_int_equal(inet_pton(AF_INET, source, &sin.sin_addr), 1);
    assert_int_equal(bind(fd, (struct sockaddr *)&sin, sizeof(sin)), 0);
    sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    sin.sin_port = htons((uint16_t)c->port);
    assert_int_equal(connect(fd, (struct sockaddr *)&sin, sizeof(sin)), 0);
    return fd;
}

/* Sends text and reads the answer until the server closes the connection (the answers under
 * test close it); returns what was read. The loop does not run meanwhile: only answers given
 * on the listener's thread arrive. */
static void raw_exchange(int fd, const char *text, struct esmd_buf *out)
{
    char buf[4096];
    ssize_t n;

    assert_int_equal(send(fd, text, strlen(text), MSG_NOSIGNAL), (ssize_t)strlen(text));
    while ((n = recv(fd, buf, sizeof(buf), 0)) > 0)
        esmd_buf_append(out, buf, (size_t)n);
    assert_int_equal(n, 0); /* closed by the server, not timed out */
    close(fd);
}

struct authc {
    int calls, body_calls;
};

/* X-Key: good → OK; later → decided with the body ("hello" passes); anything else → 401. */
static enum esmd_http_auth test_auth(void *ud, struct esmd_http_req *req, bool body)
{
    struct authc *a = ud;
    const char *k = esmd_http_req_header(req, "X-Key");

    if (body) {
        a->body_calls++;
        if (strcmp(esmd_http_req_body(req, NULL), "hello") == 0)
            return ESMD_HTTP_AUTH_OK;
        esmd_http_respond_error(req, 403, "InvalidSignatureException", "bad body");
        return ESMD_HTTP_AUTH_DENIED;
    }
    a->calls++;
    if (k != NULL && strcmp(k, "good") == 0)
        return ESMD_HTTP_AUTH_OK;
    if (k != NULL && strcmp(k, "later") == 0)
        return ESMD_HTTP_AUTH_BODY;
    esmd_http_respond_error(req, 401, "UnrecognizedClientException", "no credentials");
    return ESMD_HTTP_AUTH_DENIED;
}

static int auth_handled;

static void auth_handler(void *ud, struct esmd_http_req *req)
{
    struct esmd_buf b = ESMD_BUF_INIT;
    size_t len;

    (void)ud;
    auth_handled++;
    esmd_http_req_body(req, &len);
    esmd_buf_printf(&b, "authenticated=%d body=%zu", esmd_http_req_authenticated(req), len);
    esmd_http_respond(req, 201, "text/plain", esmd_buf_cstr(&b), b.len);
    esmd_buf_free(&b);
}

static void post_with(struct ctx *c, struct fetch *f, const char *header, const char *body)
{
    memset(f, 0, sizeof(*f));
    f->header = header;
    f->body = body;
    f->body_len = strlen(body);
    fetch(c, f, "POST", "/echo");
}

/* Issue 13, defect 1: a request without credentials is refused from its headers; its body
 * (6 MB announced, none sent) is never waited for nor read. */
static void test_auth_before_body(void **state)
{
    struct ctx *c = *state;
    struct authc a = {0};
    struct fetch f = {0};
    struct esmd_buf out = ESMD_BUF_INIT;

    esmd_http_set_auth(c->http, test_auth, &a);
    assert_int_equal(esmd_http_route(c->http, "POST", "/echo", auth_handler, NULL), 0);
    auth_handled = 0;

    raw_exchange(raw_connect(c, "127.0.0.1"),
                 "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 6000000\r\n\r\n", &out);
    assert_non_null(strstr(esmd_buf_cstr(&out), "HTTP/1.1 401"));
    assert_non_null(strstr(esmd_buf_cstr(&out), "UnrecognizedClientException"));
    assert_int_equal(a.calls, 1);

    /* No route: 404 from the headers too, without the authentication function. */
    esmd_buf_reset(&out);
    raw_exchange(raw_connect(c, "127.0.0.1"),
                 "POST /nope HTTP/1.1\r\nHost: x\r\nContent-Length: 6000000\r\n\r\n", &out);
    assert_non_null(strstr(esmd_buf_cstr(&out), "HTTP/1.1 404"));
    assert_int_equal(a.calls, 1);
    esmd_buf_free(&out);

    /* The built-in routes are open. */
    fetch(c, &f, NULL, "/healthz");
    assert_int_equal(f.status, 200);
    esmd_buf_free(&f.resp);
    assert_int_equal(a.calls, 1);

    /* Accepted from the headers. */
    post_with(c, &f, "X-Key: good", "hello");
    assert_int_equal(f.status, 201);
    assert_string_equal(esmd_buf_cstr(&f.resp), "authenticated=1 body=5");
    esmd_buf_free(&f.resp);
    assert_int_equal(a.body_calls, 0);

    /* Decided with the body: accepted, then refused. */
    post_with(c, &f, "X-Key: later", "hello");
    assert_int_equal(f.status, 201);
    assert_string_equal(esmd_buf_cstr(&f.resp), "authenticated=1 body=5");
    esmd_buf_free(&f.resp);
    post_with(c, &f, "X-Key: later", "hellO");
    assert_int_equal(f.status, 403);
    assert_string_equal(f.error_type, "InvalidSignatureException");
    esmd_buf_free(&f.resp);
    assert_int_equal(a.body_calls, 2);
    assert_int_equal(auth_handled, 2);
}

static void fetch_from(struct ctx *c, struct fetch *f, const char *source, const char *method,
                       const char *path)
{
    memset(f, 0, sizeof(*f));
    f->source = source;
    if (method != NULL && strcmp(method, "POST") == 0) {
        f->body = "hello";
        f->body_len = 5;
    }
    fetch(c, f, method, path);
}

/* Issue 13, defect 1: one address over its cap gets only the built-in routes (429 for the
 * rest), other addresses are served; with every place taken, /healthz still answers. */
static void test_connection_limits(void **state)
{
    struct ctx *c = *state;
    struct fetch f;
    int idle[6];

    assert_int_equal(esmd_http_route(c->http, "POST", "/echo", echo_handler, (void *)0x1), 0);
    for (int i = 0; i < 3; i++) /* 127.0.0.1 at its cap (3) */
        idle[i] = raw_connect(c, "127.0.0.1");

    fetch_from(c, &f, "127.0.0.1", "POST", "/echo");
    assert_int_equal(f.cc, CURLE_OK);
    assert_int_equal(f.status, 429);
    assert_string_equal(f.error_type, "TooManyRequestsException");
    assert_string_equal(f.connection, "close");
    esmd_buf_free(&f.resp);
    fetch_from(c, &f, "127.0.0.1", NULL, "/healthz");
    assert_int_equal(f.status, 200);
    assert_string_equal(f.connection, "close");
    esmd_buf_free(&f.resp);
    fetch_from(c, &f, "127.0.0.2", "POST", "/echo");
    assert_int_equal(f.status, 201);
    esmd_buf_free(&f.resp);

    /* All six places taken (3 + 3): every address gets the reserve only. */
    for (int i = 3; i < 6; i++)
        idle[i] = raw_connect(c, "127.0.0.3");
    fetch_from(c, &f, "127.0.0.4", "POST", "/echo");
    assert_int_equal(f.status, 429);
    esmd_buf_free(&f.resp);
    fetch_from(c, &f, "127.0.0.4", NULL, "/healthz");
    assert_int_equal(f.status, 200);
    esmd_buf_free(&f.resp);
    fetch_from(c, &f, "127.0.0.5", NULL, "/metrics");
    assert_int_equal(f.status, 200);
    esmd_buf_free(&f.resp);

    /* Places free again: served. */
    for (int i = 0; i < 6; i++)
        close(idle[i]);
    for (int i = 0; i < 200; i++) {
        fetch_from(c, &f, "127.0.0.1", "POST", "/echo");
        esmd_buf_free(&f.resp);
        if (f.status == 201)
            break;
    }
    assert_int_equal(f.status, 201);
}

/* Past the reserve (one place, one per address here), connections are closed unanswered. */
static void test_connection_refused_past_reserve(void **state)
{
    struct ctx *c = *state;
    struct fetch f;
    int a = raw_connect(c, "127.0.0.1"), b = raw_connect(c, "127.0.0.1");

    fetch_from(c, &f, "127.0.0.1", NULL, "/healthz");
    assert_int_not_equal(f.cc, CURLE_OK);
    esmd_buf_free(&f.resp);
    fetch_from(c, &f, "127.0.0.2", NULL, "/healthz");
    assert_int_equal(f.status, 200);
    esmd_buf_free(&f.resp);
    close(a);
    close(b);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_setup_teardown(test_healthz, setup, teardown),
        cmocka_unit_test_setup_teardown(test_readyz, setup, teardown),
        cmocka_unit_test_setup_teardown(test_metrics, setup, teardown),
        cmocka_unit_test_setup_teardown(test_not_found_and_method, setup, teardown),
        cmocka_unit_test_setup_teardown(test_route, setup, teardown),
        cmocka_unit_test_setup_teardown(test_too_large, setup, teardown),
        cmocka_unit_test_setup_teardown(test_endless_chunked_body_cut_off, setup, teardown),
        cmocka_unit_test_setup_teardown(test_answer_later, setup, teardown),
        cmocka_unit_test_setup_teardown(test_stop_with_pending, setup, teardown),
        cmocka_unit_test_setup_teardown(test_listen_addresses, setup, teardown),
        cmocka_unit_test_setup_teardown(test_auth_before_body, setup, teardown),
        cmocka_unit_test_setup_teardown(test_connection_limits, setup_small, teardown),
        cmocka_unit_test_setup_teardown(test_connection_refused_past_reserve, setup_tiny, teardown),
    };
    int rc;

    esmd_test_http_init();
    rc = cmocka_run_group_tests(tests, NULL, NULL);
    curl_global_cleanup();
    return rc;
}
