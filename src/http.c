/* The admin HTTP listener: libmicrohttpd with one thread of its own, so that reading and
 * writing the sockets and parsing HTTP run beside the loop instead of on it (for the async
 * queue's Invoke route that was most of the loop's time). The thread uses poll(), not epoll:
 * libmicrohttpd 0.9.75's internal epoll loop could leave resumed connections unserved when a
 * burst of 128 connections was ready at once (clients stalled until their timeout; see
 * test_many_concurrent_clients_all_answered), and poll() also saves the epoll_ctl() calls
 * that every suspend and resume cost.
 *
 * Two threads touch a request, one after the other:
 *   MHD's thread  creates it, decides its body limit (the route's limit function runs there, so
 *                 it may only read what does not change after start), collects the body, then
 *                 suspends the connection and hands the request over (inbox + ev_async);
 *   the loop      dispatches it to the route's handler, which answers now or later from the
 *                 loop: esmd_http_respond() stores the answer and resumes the connection; from
 *                 then on the request belongs to MHD's thread again, which queues the answer
 *                 and frees the request in its completion callback.
 * An oversized body (413), a request that matches no route (404/405), one refused by the
 * authentication function, one over the connection limits (429) and requests during shutdown
 * (503) are answered on MHD's thread without a handler; all but the last two from the request
 * line and headers, before any of the body is read (docs/admin.md "Authentication"). MHD's log
 * lines and esmd_http_req_warn()'s are handed to the loop too (the logger is not thread-safe).
 *
 * Connection limits: MHD's accept policy and connection notifications (both on MHD's thread)
 * count the connections of every client address in http->clients; a connection past the limits
 * goes to the reserve, marked in its socket context (struct http_conn). */
#include "esmd/http.h"
#include "esmd/log.h"
#include "esmd/metrics.h"

#include <arpa/inet.h>
#include <ev.h>
#include <microhttpd.h>
#include <netdb.h>
#include <netinet/in.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <time.h>

#define ESMD_HTTP_CONN_TIMEOUT_S 60
#define ESMD_JSON "application/json"

struct esmd_http_route {
    char *method; /* owned */
    char *path;   /* owned; without the trailing '*' of a prefix */
    size_t plen;
    bool prefix;
    bool open;    /* no authentication: the built-in routes and esmd_http_route_public() */
    bool builtin; /* /healthz, /readyz, /metrics: also served on a reserve connection */
    esmd_http_handler fn;
    esmd_http_limit_fn limit;
    void *ud;
};

struct esmd_http_hdr {
    char *name, *value; /* owned */
};

struct esmd_http_req {
    struct esmd_http *http;
    struct MHD_Connection *conn;
    const char *method; /* borrowed from MHD: valid for the request */
    const char *url;
    char *raw_path; /* owned: the request target as sent, up to '?' (http_uri_log) */
    struct esmd_buf body;
    bool too_large;
    size_t max_body;        /* ESMD_MAX_PAYLOAD or the route's limit */
    size_t discarded;       /* body bytes dropped after too_large */
    esmd_http_auth_fn auth; /* NULL: an open route (or no authentication set) */
    void *auth_ud;
    bool auth_body;     /* auth is to be called again with the body */
    bool authenticated; /* auth answered ESMD_HTTP_AUTH_OK */
    bool dispatched;    /* the handler ran (or an error answer was chosen) */
    bool answered;      /* esmd_http_respond() was called */
    bool queued;        /* the answer was handed to MHD */
    bool suspended;
    int status;
    struct MHD_Response *resp;  /* owned until queued */
    struct esmd_http_hdr *hdrs; /* owned: headers for the answer */
    size_t nhdrs;
    esmd_http_abort_fn abort_fn;
    void *abort_ud;
    struct esmd_http_req *prev, *next; /* in http->pending while suspended */
    struct esmd_http_req *inbox_next;  /* in http->inbox, waiting for the loop */
};

/* A client address with connections (MHD's thread only). IPv4 as v4-mapped IPv6. */
struct http_client {
    struct in6_addr addr;
    unsigned n;        /* connections within the limits */
    unsigned nreserve; /* connections in the reserve */
};

/* One connection: its socket context (MHD's thread only). */
struct http_conn {
    struct in6_addr addr;
    bool reserve;
};

struct esmd_http {
    struct ev_loop *loop;
    struct MHD_Daemon *daemon;
    ev_async wake;                  /* MHD's thread → loop: inbox or log lines */
    pthread_mutex_t mu;             /* guards routes (added while MHD runs), inbox, logs */
    struct esmd_http_route *routes; /* owned */
    size_t nroutes;
    struct esmd_http_req *inbox, **inbox_tail; /* suspended, for the loop to dispatch */
    struct esmd_buf logs;                      /* MHD's log lines, '\n'-separated */
    esmd_http_ready_fn ready_fn;
    void *ready_ud;
    esmd_http_auth_fn auth; /* under mu */
    void *auth_ud;
    struct esmd_http_limits lim; /* the defaults applied */
    struct http_client *clients; /* MHD's thread: owned, nclients of them */
    size_t nclients, capclients;
    unsigned nconns, nreserve;     /* MHD's thread: connections within the limits, in reserve */
    struct esmd_http_req *pending; /* loop: dispatched, suspended, unanswered */
    int port;
    atomic_bool stopping;
    atomic_int active; /* requests MHD has not completed yet */
    char lasterr[256]; /* last message of MHD's error log (start-up errors) */
};

/* ---- the hand-over to the loop ---- */

static void http_dispatch(struct esmd_http_req *req);

static void http_wake_cb(struct ev_loop *loop, ev_async *w, int revents)
{
    struct esmd_http *http = w->data;
    struct esmd_http_req *reqs;
    struct esmd_buf logs = ESMD_BUF_INIT;

    ESMD_UNUSED(loop);
    ESMD_UNUSED(revents);
    pthread_mutex_lock(&http->mu);
    reqs = http->inbox;
    http->inbox = NULL;
    http->inbox_tail = &http->inbox;
    if (http->logs.len > 0) {
        logs = http->logs;
        esmd_buf_init(&http->logs);
    }
    pthread_mutex_unlock(&http->mu);
    /* lines of the key (a pointer: esmd_log_limited's rate-limit key), message, '\n' */
    for (char *line = logs.data, *nl; line && line < logs.data + logs.len; line = nl + 1) {
        const char *key;

        memcpy(&key, line, sizeof(key));
        line += sizeof(key);
        nl = memchr(line, '\n', (size_t)(logs.data + logs.len - line));
        *nl = '\0';
        esmd_log_limited(ESMD_LOG_WARN, NULL, key, "%s", line);
    }
    esmd_buf_free(&logs);
    while (reqs != NULL) {
        struct esmd_http_req *req = reqs;

        reqs = req->inbox_next;
        req->inbox_next = NULL;
        /* In the pending list before the handler runs: it may answer at once, and once the
         * connection is resumed the request is MHD's again (and soon freed). */
        req->next = http->pending;
        if (http->pending)
            http->pending->prev = req;
        http->pending = req;
        if (atomic_load(&http->stopping))
            esmd_http_respond_error(req, 503, "ServiceException", "shutting down");
        else
            http_dispatch(req);
    }
}

/* Any thread: a warning for the loop to log (rate-limited per key: a string with static
 * storage). */
static void http_log_push(struct esmd_http *http, const char *key, const char *msg)
{
    size_t n = strlen(msg);

    while (n > 0 && (msg[n - 1] == '\n' || msg[n - 1] == '\r'))
        n--;
    pthread_mutex_lock(&http->mu);
    if (http->logs.len < 64 * 1024) {
        size_t at;

        esmd_buf_append(&http->logs, &key, sizeof(key));
        at = http->logs.len;
        esmd_buf_append(&http->logs, msg, n);
        for (size_t i = at; i < http->logs.len; i++)
            if (http->logs.data[i] == '\n')
                http->logs.data[i] = ' ';
        esmd_buf_putc(&http->logs, '\n');
    }
    pthread_mutex_unlock(&http->mu);
    if (http->daemon != NULL)
        ev_async_send(http->loop, &http->wake);
}

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wformat-nonliteral"
/* MHD's thread (or MHD_start_daemon's caller): kept for start-up errors, logged by the loop. */
static void http_mhd_log(void *cls, const char *fmt, va_list ap)
{
    struct esmd_http *http = cls;
    char line[256] = "http: ";
    size_t n;

    vsnprintf(line + 6, sizeof(line) - 6, fmt, ap);
    n = strlen(line);
    while (n > 6 && (line[n - 1] == '\n' || line[n - 1] == '\r'))
        line[--n] = '\0';
    pthread_mutex_lock(&http->mu);
    snprintf(http->lasterr, sizeof(http->lasterr), "%s", line + 6);
    pthread_mutex_unlock(&http->mu);
    http_log_push(http, "http.mhd", line);
}
#pragma GCC diagnostic pop

void esmd_http_req_warn(struct esmd_http_req *req, const char *key, const char *msg)
{
    http_log_push(req->http, key, msg);
}

/* ---- requests ---- */

static void http_pending_remove(struct esmd_http_req *req)
{
    struct esmd_http *http = req->http;

    if (req->prev)
        req->prev->next = req->next;
    else if (http->pending == req)
        http->pending = req->next;
    if (req->next)
        req->next->prev = req->prev;
    req->prev = req->next = NULL;
}

static void http_req_free(struct esmd_http_req *req)
{
    if (req == NULL)
        return;
    if (req->resp)
        MHD_destroy_response(req->resp);
    for (size_t i = 0; i < req->nhdrs; i++) {
        free(req->hdrs[i].name);
        free(req->hdrs[i].value);
    }
    free(req->hdrs);
    free(req->raw_path);
    esmd_buf_free(&req->body);
    free(req);
}

static void http_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                           enum MHD_RequestTerminationCode toe)
{
    struct esmd_http_req *req = *con_cls;

    ESMD_UNUSED(conn);
    ESMD_UNUSED(toe);
    if (req == NULL)
        return;
    if (req->suspended) {
        /* Only when the daemon stops (MHD does not end suspended connections otherwise), and
         * esmd_http_stop() answers them all first; never leave a dangling pointer anyway. */
        http_pending_remove(req);
        if (req->abort_fn)
            req->abort_fn(req->abort_ud, req);
    }
    if (req->conn != NULL) /* http_access counted it */
        atomic_fetch_sub(&((struct esmd_http *)cls)->active, 1);
    http_req_free(req);
    *con_cls = NULL;
}

/* MHD's thread, once the request line is read and before MHD decodes it: the request object
 * starts here, holding the path as sent (http_access fills in the rest on its first call). */
static void *http_uri_log(void *cls, const char *uri, struct MHD_Connection *conn)
{
    struct esmd_http_req *req = esmd_xcalloc(1, sizeof(*req));

    ESMD_UNUSED(conn);
    req->http = cls;
    req->raw_path = esmd_xstrndup(uri, strcspn(uri, "?"));
    return req;
}

const char *esmd_http_req_method(const struct esmd_http_req *req)
{
    return req->method;
}

const char *esmd_http_req_path(const struct esmd_http_req *req)
{
    return req->url;
}

const char *esmd_http_req_raw_path(const struct esmd_http_req *req)
{
    return req->raw_path ? req->raw_path : req->url;
}

const char *esmd_http_req_header(const struct esmd_http_req *req, const char *name)
{
    return MHD_lookup_connection_value(req->conn, MHD_HEADER_KIND, name);
}

const char *esmd_http_req_query(const struct esmd_http_req *req, const char *name)
{
    return MHD_lookup_connection_value(req->conn, MHD_GET_ARGUMENT_KIND, name);
}

struct http_query_iter {
    void (*fn)(void *ud, const char *name, const char *value);
    void *ud;
};

static enum MHD_Result http_query_iter(void *cls, enum MHD_ValueKind kind, const char *key,
                                       const char *value)
{
    struct http_query_iter *it = cls;

    ESMD_UNUSED(kind);
    it->fn(it->ud, key, value);
    return MHD_YES;
}

void esmd_http_req_query_each(const struct esmd_http_req *req,
                              void (*fn)(void *ud, const char *name, const char *value), void *ud)
{
    struct http_query_iter it = {fn, ud};

    MHD_get_connection_values(req->conn, MHD_GET_ARGUMENT_KIND, http_query_iter, &it);
}

const char *esmd_http_req_body(const struct esmd_http_req *req, size_t *len)
{
    if (len)
        *len = req->body.len;
    return req->body.data ? req->body.data : "";
}

bool esmd_http_req_is_loopback(const struct esmd_http_req *req)
{
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(req->conn, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
    const struct sockaddr *sa;

    if (ci == NULL || ci->client_addr == NULL)
        return false;
    sa = ci->client_addr;
    if (sa->sa_family == AF_INET) {
        const struct sockaddr_in *sin = (const struct sockaddr_in *)sa;
        return (ntohl(sin->sin_addr.s_addr) >> 24) == 127;
    }
    if (sa->sa_family == AF_INET6) {
        const struct sockaddr_in6 *sin6 = (const struct sockaddr_in6 *)sa;
        const uint8_t *a = sin6->sin6_addr.s6_addr;
        if (IN6_IS_ADDR_LOOPBACK(&sin6->sin6_addr))
            return true;
        return IN6_IS_ADDR_V4MAPPED(&sin6->sin6_addr) && a[12] == 127;
    }
    return false;
}

void esmd_http_req_on_abort(struct esmd_http_req *req, esmd_http_abort_fn fn, void *ud)
{
    req->abort_fn = fn;
    req->abort_ud = ud;
}

void esmd_http_req_add_header(struct esmd_http_req *req, const char *name, const char *value)
{
    if (name == NULL || value == NULL)
        return;
    req->hdrs = esmd_xrealloc(req->hdrs, (req->nhdrs + 1) * sizeof(*req->hdrs));
    req->hdrs[req->nhdrs].name = esmd_xstrdup(name);
    req->hdrs[req->nhdrs].value = esmd_xstrdup(value);
    req->nhdrs++;
}

void esmd_http_respond(struct esmd_http_req *req, int status, const char *content_type,
                       const char *body, size_t len)
{
    struct MHD_Response *resp;

    if (req == NULL)
        return;
    if (req->answered) {
        ESMD_ERROR(NULL, "http: %s %s answered twice", req->method, req->url);
        return;
    }
    resp = MHD_create_response_from_buffer(len, (void *)(body ? body : ""), MHD_RESPMEM_MUST_COPY);
    if (resp == NULL) {
        /* Out of memory in MHD: the connection is closed instead of answered. */
        resp = MHD_create_response_from_buffer(0, (void *)"", MHD_RESPMEM_PERSISTENT);
        status = 500;
    }
    if (resp != NULL) {
        if (content_type != NULL)
            MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, content_type);
        bool has_rid = false;
        for (size_t i = 0; i < req->nhdrs; i++) {
            MHD_add_response_header(resp, req->hdrs[i].name, req->hdrs[i].value);
            has_rid = has_rid || strcasecmp(req->hdrs[i].name, "x-amzn-RequestId") == 0;
        }
        /* Every answer carries a request id, as Lambda's do: the SDKs report it
         * ($metadata.requestId, ResponseMetadata.RequestId). Handlers that know the id of the
         * work they did (Invoke) set their own. docs/admin.md */
        if (!has_rid) {
            char rid[37];
            esmd_uuid4(rid);
            MHD_add_response_header(resp, "x-amzn-RequestId", rid);
        }
    }
    req->answered = true;
    req->dispatched = true;
    req->status = status;
    req->resp = resp;
    if (req->suspended) {
        /* the loop's last touch: after the resume the request is MHD's thread's */
        req->suspended = false;
        http_pending_remove(req);
        MHD_resume_connection(req->conn);
    }
}

void esmd_http_respond_error(struct esmd_http_req *req, int status, const char *type,
                             const char *message)
{
    struct esmd_buf b = ESMD_BUF_INIT;

    if (req == NULL)
        return;
    esmd_buf_puts(&b, status >= 500 ? "{\"Type\":\"Service\"" : "{\"Type\":\"User\"");
    esmd_buf_puts(&b, ",\"Message\":");
    esmd_buf_put_json_string(&b, message, strlen(message));
    esmd_buf_putc(&b, '}');
    esmd_http_req_add_header(req, "x-amzn-ErrorType", type);
    esmd_http_respond(req, status, ESMD_JSON, esmd_buf_cstr(&b), b.len);
    esmd_buf_free(&b);
}

/* ---- routing ---- */

static bool http_method_matches(const char *route, const char *method)
{
    return strcmp(route, method) == 0 || (strcmp(route, "GET") == 0 && strcmp(method, "HEAD") == 0);
}

static bool http_path_matches(const struct esmd_http_route *r, const char *path)
{
    if (r->prefix)
        return strncmp(path, r->path, r->plen) == 0;
    return strcmp(path, r->path) == 0;
}

static void http_dispatch(struct esmd_http_req *req)
{
    struct esmd_http *http = req->http;
    struct esmd_buf allow = ESMD_BUF_INIT, msg = ESMD_BUF_INIT;

    req->dispatched = true;
    if (req->too_large) {
        esmd_buf_printf(&msg, "request body is larger than %zu bytes", req->max_body);
        esmd_http_respond_error(req, 413, "RequestTooLargeException", esmd_buf_cstr(&msg));
        goto out;
    }
    for (size_t i = 0; i < http->nroutes; i++) {
        const struct esmd_http_route *r = &http->routes[i];

        if (!http_path_matches(r, req->url))
            continue;
        if (http_method_matches(r->method, req->method)) {
            r->fn(r->ud, req); /* req may be answered (and soon freed) from here on */
            goto out;
        }
        if (strstr(esmd_buf_cstr(&allow), r->method) == NULL) {
            if (allow.len > 0)
                esmd_buf_puts(&allow, ", ");
            esmd_buf_puts(&allow, r->method);
        }
    }
    if (allow.len > 0) {
        esmd_buf_printf(&msg, "method %s not allowed on %s", req->method, req->url);
        esmd_http_req_add_header(req, "Allow", esmd_buf_cstr(&allow));
        esmd_http_respond_error(req, 405, "MethodNotAllowedException", esmd_buf_cstr(&msg));
        goto out;
    }
    esmd_buf_printf(&msg, "no route for %s %s", req->method, req->url);
    esmd_http_respond_error(req, 404, "ResourceNotFoundException", esmd_buf_cstr(&msg));
out:
    esmd_buf_free(&allow);
    esmd_buf_free(&msg);
}

/* What the request line and headers decide, before any body is read (MHD's thread): the body
 * limit of the first route that matches (method and path), whether it is open, and the
 * authentication function. false when no route matches: req is answered (404 / 405). */
static bool http_route_lookup(struct esmd_http *http, struct esmd_http_req *req, bool *open,
                              bool *builtin)
{
    esmd_http_limit_fn limit = NULL;
    void *limit_ud = NULL;
    bool found = false;
    size_t lim = ESMD_MAX_PAYLOAD;

    pthread_mutex_lock(&http->mu); /* routes may still be being added */
    for (size_t i = 0; i < http->nroutes; i++) {
        const struct esmd_http_route *r = &http->routes[i];

        if (!http_path_matches(r, req->url) || !http_method_matches(r->method, req->method))
            continue;
        found = true;
        *open = r->open;
        *builtin = r->builtin;
        limit = r->limit;
        limit_ud = r->ud;
        break;
    }
    if (found && !*open) {
        req->auth = http->auth;
        req->auth_ud = http->auth_ud;
    }
    if (!found)
        http_dispatch(req); /* no handler runs: 404 or 405 */
    pthread_mutex_unlock(&http->mu);
    if (limit != NULL)
        lim = limit(limit_ud, req);
    req->max_body = lim > ESMD_MAX_PAYLOAD ? ESMD_MAX_PAYLOAD : lim;
    return found;
}

/* ---- connection limits (MHD's thread) ---- */

static void http_sockaddr_v6(const struct sockaddr *sa, struct in6_addr *out)
{
    memset(out, 0, sizeof(*out));
    if (sa == NULL)
        return;
    if (sa->sa_family == AF_INET6) {
        *out = ((const struct sockaddr_in6 *)sa)->sin6_addr;
    } else if (sa->sa_family == AF_INET) {
        out->s6_addr[10] = 0xff;
        out->s6_addr[11] = 0xff;
        memcpy(&out->s6_addr[12], &((const struct sockaddr_in *)sa)->sin_addr, 4);
    }
}

/* The entry of addr, or NULL (add: a new one, counts 0). Linear: at most one entry per open
 * connection, looked up once per accepted and per closed connection. */
static struct http_client *http_client(struct esmd_http *http, const struct in6_addr *addr,
                                       bool add)
{
    for (size_t i = 0; i < http->nclients; i++)
        if (memcmp(&http->clients[i].addr, addr, sizeof(*addr)) == 0)
            return &http->clients[i];
    if (!add)
        return NULL;
    if (http->nclients == http->capclients) {
        http->capclients = http->capclients ? 2 * http->capclients : 16;
        http->clients = esmd_xrealloc(http->clients, http->capclients * sizeof(*http->clients));
    }
    http->clients[http->nclients] = (struct http_client){.addr = *addr};
    return &http->clients[http->nclients++];
}

enum http_admit { HTTP_ADMIT_FULL, HTTP_ADMIT_RESERVE, HTTP_ADMIT_REFUSE };

static enum http_admit http_admit(const struct esmd_http *http, const struct http_client *c)
{
    if ((c == NULL || c->n < http->lim.per_client) && http->nconns < http->lim.max_connections)
        return HTTP_ADMIT_FULL;
    if (http->nreserve < http->lim.reserve &&
        (c == NULL || c->nreserve < ESMD_HTTP_RESERVE_PER_CLIENT))
        return HTTP_ADMIT_RESERVE;
    return HTTP_ADMIT_REFUSE;
}

static enum MHD_Result http_accept_policy(void *cls, const struct sockaddr *addr, socklen_t len)
{
    struct esmd_http *http = cls;
    struct in6_addr a;
    char text[INET6_ADDRSTRLEN], msg[160];

    ESMD_UNUSED(len);
    http_sockaddr_v6(addr, &a);
    if (http_admit(http, http_client(http, &a, false)) != HTTP_ADMIT_REFUSE)
        return MHD_YES;
    if (inet_ntop(AF_INET6, &a, text, sizeof(text)) == NULL)
        snprintf(text, sizeof(text), "?");
    snprintf(msg, sizeof(msg), "http: refused a connection from %s: too many connections", text);
    http_log_push(http, "http.limit", msg);
    return MHD_NO;
}

static void http_notify(void *cls, struct MHD_Connection *conn, void **socket_context,
                        enum MHD_ConnectionNotificationCode toe)
{
    struct esmd_http *http = cls;
    struct http_conn *hc = *socket_context;
    struct http_client *c;

    if (toe == MHD_CONNECTION_NOTIFY_STARTED) {
        const union MHD_ConnectionInfo *ci =
            MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CLIENT_ADDRESS);

        hc = esmd_xcalloc(1, sizeof(*hc));
        http_sockaddr_v6(ci ? ci->client_addr : NULL, &hc->addr);
        c = http_client(http, &hc->addr, true);
        /* the accept policy let it in: within the limits, or in the reserve */
        hc->reserve = http_admit(http, c) != HTTP_ADMIT_FULL;
        if (hc->reserve) {
            c->nreserve++;
            http->nreserve++;
            MHD_set_connection_option(conn, MHD_CONNECTION_OPTION_TIMEOUT,
                                      (unsigned int)ESMD_HTTP_RESERVE_TIMEOUT_S);
        } else {
            c->n++;
            http->nconns++;
        }
        *socket_context = hc;
        return;
    }
    if (hc == NULL)
        return;
    c = http_client(http, &hc->addr, false);
    if (c != NULL) {
        if (hc->reserve) {
            c->nreserve--;
            http->nreserve--;
        } else {
            c->n--;
            http->nconns--;
        }
        if (c->n == 0 && c->nreserve == 0)
            *c = http->clients[--http->nclients];
    }
    free(hc);
    *socket_context = NULL;
}

static bool http_conn_reserve(struct MHD_Connection *conn)
{
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(conn, MHD_CONNECTION_INFO_SOCKET_CONTEXT);
    const struct http_conn *hc = ci ? ci->socket_context : NULL;

    return hc != NULL && hc->reserve;
}

/* Hands a stored answer to MHD. */
static enum MHD_Result http_queue(struct esmd_http_req *req)
{
    enum MHD_Result ret;

    if (req->resp == NULL)
        return MHD_NO; /* closes the connection */
    ret = MHD_queue_response(req->conn, (unsigned int)req->status, req->resp);
    MHD_destroy_response(req->resp);
    req->resp = NULL;
    req->queued = true;
    return ret;
}

/* The first call for a request: its line and headers are in, none of its body. Answers now
 * (returns true) what needs no body: no route, over the limits, too large, refused. */
static bool http_headers(struct esmd_http *http, struct esmd_http_req *req)
{
    const char *cl =
        MHD_lookup_connection_value(req->conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
    bool open = false, builtin = false, reserve = http_conn_reserve(req->conn);

    if (reserve) /* one request a reserve connection */
        esmd_http_req_add_header(req, MHD_HTTP_HEADER_CONNECTION, "close");
    if (!http_route_lookup(http, req, &open, &builtin))
        return true;
    if (reserve && !builtin) { /* and only the built-in routes */
        esmd_http_respond_error(req, 429, "TooManyRequestsException",
                                "too many connections from this address or to esmd: only "
                                "/healthz, /readyz and /metrics are served on this one");
        return true;
    }
    if (cl != NULL && strtoull(cl, NULL, 10) > req->max_body) {
        req->too_large = true;
        http_dispatch(req); /* the 413 */
        return true;
    }
    if (req->auth != NULL) {
        switch (req->auth(req->auth_ud, req, false)) {
        case ESMD_HTTP_AUTH_OK:
            req->authenticated = true;
            break;
        case ESMD_HTTP_AUTH_BODY:
            req->auth_body = true;
            break;
        case ESMD_HTTP_AUTH_DENIED:
            if (!req->answered)
                esmd_http_respond_error(req, 403, "AccessDeniedException", "access denied");
            return true;
        }
    }
    return false;
}

static enum MHD_Result http_access(void *cls, struct MHD_Connection *conn, const char *url,
                                   const char *method, const char *version, const char *upload_data,
                                   size_t *upload_data_size, void **con_cls)
{
    struct esmd_http *http = cls;
    struct esmd_http_req *req = *con_cls;

    ESMD_UNUSED(version);
    if (req == NULL || req->conn == NULL) {
        atomic_fetch_add(&http->active, 1);
        if (req == NULL)
            req = esmd_xcalloc(1, sizeof(*req));
        req->http = http;
        req->conn = conn;
        req->method = method;
        req->url = url;
        esmd_buf_init(&req->body);
        *con_cls = req;
        if (http_headers(http, req)) /* answered: MHD drops the body and closes */
            return http_queue(req);
        return MHD_YES;
    }
    if (*upload_data_size > 0) {
        if (req->dispatched || req->too_large) {
            /* Dropped; an endless (chunked) body is cut off after as much again. */
            req->discarded += *upload_data_size;
            if (req->discarded > ESMD_MAX_PAYLOAD)
                return MHD_NO;
        } else if (req->body.len + *upload_data_size > req->max_body) {
            req->too_large = true;
        } else {
            esmd_buf_append(&req->body, upload_data, *upload_data_size);
        }
        *upload_data_size = 0;
        return MHD_YES;
    }
    if (req->queued)
        return MHD_YES;
    if (req->answered) /* resumed by esmd_http_respond() */
        return http_queue(req);
    esmd_buf_cstr(&req->body);
    if (req->too_large || atomic_load(&http->stopping)) {
        if (req->too_large)
            http_dispatch(req); /* the 413: no handler runs */
        else
            esmd_http_respond_error(req, 503, "ServiceException", "shutting down");
        return http_queue(req);
    }
    if (req->auth_body) {
        enum esmd_http_auth r = req->auth(req->auth_ud, req, true);

        if (r == ESMD_HTTP_AUTH_DENIED) {
            if (!req->answered)
                esmd_http_respond_error(req, 403, "AccessDeniedException", "access denied");
            return http_queue(req);
        }
        req->authenticated = r == ESMD_HTTP_AUTH_OK;
    }
    /* Over to the loop, suspended until the handler answers. */
    req->dispatched = true;
    req->suspended = true;
    MHD_suspend_connection(conn);
    pthread_mutex_lock(&http->mu);
    *http->inbox_tail = req;
    http->inbox_tail = &req->inbox_next;
    pthread_mutex_unlock(&http->mu);
    ev_async_send(http->loop, &http->wake);
    return MHD_YES;
}

/* ---- built-in routes ---- */

static void http_healthz(void *ud, struct esmd_http_req *req)
{
    static const char body[] = "{\"status\":\"ok\"}";

    ESMD_UNUSED(ud);
    esmd_http_respond(req, 200, ESMD_JSON, body, sizeof(body) - 1);
}

/* Whether the service is ready, its detail appended to detail (the /readyz body). */
static bool http_ready(struct esmd_http *http, struct esmd_buf *detail)
{
    bool ready = true;

    if (http->ready_fn != NULL)
        ready = http->ready_fn(http->ready_ud, detail);
    else
        esmd_buf_puts(detail, "{\"status\":\"ok\"}");
    if (detail->len == 0)
        esmd_buf_puts(detail, "{}");
    return ready;
}

static void http_readyz(void *ud, struct esmd_http_req *req)
{
    struct esmd_http *http = ud;
    struct esmd_buf detail = ESMD_BUF_INIT;
    bool ready = http_ready(http, &detail);

    esmd_http_respond(req, ready ? 200 : 503, ESMD_JSON, esmd_buf_cstr(&detail), detail.len);
    esmd_buf_free(&detail);
}

static void http_metrics(void *ud, struct esmd_http_req *req)
{
    struct esmd_http *http = ud;
    struct esmd_buf out = ESMD_BUF_INIT;

    /* readiness as /readyz would answer it now (docs/metrics.md): alerts need it as a series */
    bool ready = http_ready(http, &out);
    esmd_buf_reset(&out);
    esmd_series_set(esmd_series(esmd_metric(ESMD_GAUGE, "esmd_ready",
                                            "1 when /readyz answers 200 (ready), 0 when 503."),
                                ""),
                    ready ? 1 : 0);
    esmd_metrics_render(&out);
    esmd_http_respond(req, 200, "text/plain; version=0.0.4; charset=utf-8", esmd_buf_cstr(&out),
                      out.len);
    esmd_buf_free(&out);
}

/* ---- listener ---- */

/* "host:port", "[v6]:port" or "name:port" → one address (IPv4 preferred for names). */
static int http_parse_listen(const char *listen, struct sockaddr_storage *ss, char *err,
                             size_t errlen)
{
    char host[256];
    const char *port, *colon;
    struct addrinfo hints, *res = NULL, *pick;
    size_t hl;
    char *end;
    unsigned long p;
    int rc = ESMD_EINVAL, gai;

    if (listen == NULL || listen[0] == '\0') {
        snprintf(err, errlen, "listen address is empty");
        goto out;
    }
    if (listen[0] == '[') {
        const char *close = strchr(listen, ']');

        if (close == NULL || close[1] != ':') {
            snprintf(err, errlen, "listen address \"%s\": expected [IPv6]:port", listen);
            goto out;
        }
        hl = (size_t)(close - listen - 1);
        if (hl >= sizeof(host)) {
            snprintf(err, errlen, "listen address \"%s\": host too long", listen);
            goto out;
        }
        memcpy(host, listen + 1, hl);
        port = close + 2;
    } else {
        colon = strrchr(listen, ':');
        if (colon == NULL || memchr(listen, ':', (size_t)(colon - listen)) != NULL) {
            snprintf(err, errlen,
                     "listen address \"%s\": expected host:port, [IPv6]:port or name:port", listen);
            goto out;
        }
        hl = (size_t)(colon - listen);
        if (hl >= sizeof(host)) {
            snprintf(err, errlen, "listen address \"%s\": host too long", listen);
            goto out;
        }
        memcpy(host, listen, hl);
        port = colon + 1;
    }
    host[hl] = '\0';
    p = strtoul(port, &end, 10);
    if (port[0] < '0' || port[0] > '9' || *end != '\0' || p > 65535) {
        snprintf(err, errlen, "listen address \"%s\": port must be 0..65535", listen);
        goto out;
    }
    memset(&hints, 0, sizeof(hints));
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    hints.ai_flags = AI_NUMERICSERV | AI_PASSIVE;
    gai = getaddrinfo(host[0] ? host : NULL, port, &hints, &res);
    if (gai != 0) {
        snprintf(err, errlen, "listen address \"%s\": %s", listen, gai_strerror(gai));
        goto out;
    }
    pick = res;
    for (struct addrinfo *ai = res; ai != NULL; ai = ai->ai_next) {
        if (ai->ai_family == AF_INET) {
            pick = ai;
            break;
        }
    }
    if (pick->ai_family != AF_INET && pick->ai_family != AF_INET6) {
        snprintf(err, errlen, "listen address \"%s\": not an IP address", listen);
        goto out;
    }
    memset(ss, 0, sizeof(*ss));
    memcpy(ss, pick->ai_addr, pick->ai_addrlen);
    rc = 0;
out:
    if (res)
        freeaddrinfo(res);
    return rc;
}

static int http_route_add(struct esmd_http *http, const char *method, const char *path,
                          esmd_http_handler fn, esmd_http_limit_fn limit, void *ud, bool open,
                          bool builtin)
{
    struct esmd_http_route *r;
    size_t n;

    if (http == NULL || method == NULL || path == NULL || path[0] != '/' || fn == NULL)
        return ESMD_EINVAL;
    pthread_mutex_lock(&http->mu); /* MHD's thread reads the routes for body limits */
    http->routes = esmd_xrealloc(http->routes, (http->nroutes + 1) * sizeof(*http->routes));
    r = &http->routes[http->nroutes++];
    n = strlen(path);
    r->prefix = n > 0 && path[n - 1] == '*';
    r->plen = r->prefix ? n - 1 : n;
    r->path = esmd_xstrndup(path, r->plen);
    r->method = esmd_xstrdup(method);
    r->fn = fn;
    r->limit = limit;
    r->ud = ud;
    r->open = open;
    r->builtin = builtin;
    pthread_mutex_unlock(&http->mu);
    return ESMD_OK;
}

int esmd_http_route(struct esmd_http *http, const char *method, const char *path,
                    esmd_http_handler fn, void *ud)
{
    return http_route_add(http, method, path, fn, NULL, ud, false, false);
}

int esmd_http_route_public(struct esmd_http *http, const char *method, const char *path,
                           esmd_http_handler fn, void *ud)
{
    return http_route_add(http, method, path, fn, NULL, ud, true, false);
}

int esmd_http_route_limited(struct esmd_http *http, const char *method, const char *path,
                            esmd_http_handler fn, esmd_http_limit_fn limit, void *ud)
{
    return http_route_add(http, method, path, fn, limit, ud, false, false);
}

void esmd_http_set_auth(struct esmd_http *http, esmd_http_auth_fn fn, void *ud)
{
    if (http == NULL)
        return;
    pthread_mutex_lock(&http->mu); /* MHD's thread reads it for every request */
    http->auth = fn;
    http->auth_ud = ud;
    pthread_mutex_unlock(&http->mu);
}

bool esmd_http_req_authenticated(const struct esmd_http_req *req)
{
    return req != NULL && req->authenticated;
}

static void http_free(struct esmd_http *http)
{
    for (size_t i = 0; i < http->nroutes; i++) {
        free(http->routes[i].method);
        free(http->routes[i].path);
    }
    free(http->routes);
    free(http->clients);
    esmd_buf_free(&http->logs);
    pthread_mutex_destroy(&http->mu);
    free(http);
}

struct esmd_http *esmd_http_start(struct ev_loop *loop, const char *listen,
                                  const struct esmd_http_limits *limits, char *err, size_t errlen)
{
    struct esmd_http *http;
    struct sockaddr_storage ss;
    const union MHD_DaemonInfo *info;
    unsigned int flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_POLL | MHD_USE_ERROR_LOG |
                         MHD_ALLOW_SUSPEND_RESUME;
    uint16_t port;

    if (loop == NULL) {
        snprintf(err, errlen, "no event loop");
        return NULL;
    }
    if (http_parse_listen(listen, &ss, err, errlen) != 0)
        return NULL;
    http = esmd_xcalloc(1, sizeof(*http));
    http->loop = loop;
    pthread_mutex_init(&http->mu, NULL);
    http->inbox_tail = &http->inbox;
    esmd_buf_init(&http->logs);
    atomic_init(&http->stopping, false);
    atomic_init(&http->active, 0);
    if (limits != NULL)
        http->lim = *limits;
    if (http->lim.max_connections == 0)
        http->lim.max_connections = ESMD_HTTP_MAX_CONNECTIONS;
    if (http->lim.per_client == 0)
        http->lim.per_client = ESMD_HTTP_PER_CLIENT;
    if (http->lim.reserve == 0)
        http->lim.reserve = ESMD_HTTP_RESERVE;
    ev_async_init(&http->wake, http_wake_cb);
    http->wake.data = http;
    ev_async_start(loop, &http->wake);
    if (ss.ss_family == AF_INET6) {
        flags |= MHD_USE_IPv6;
        port = ntohs(((struct sockaddr_in6 *)&ss)->sin6_port);
    } else {
        port = ntohs(((struct sockaddr_in *)&ss)->sin_port);
    }
    if (http_route_add(http, "GET", "/healthz", http_healthz, NULL, http, true, true) != 0 ||
        http_route_add(http, "GET", "/readyz", http_readyz, NULL, http, true, true) != 0 ||
        http_route_add(http, "GET", "/metrics", http_metrics, NULL, http, true, true) != 0) {
        snprintf(err, errlen, "cannot register the built-in routes");
        goto fail;
    }
    http->daemon = MHD_start_daemon(
        flags, port, http_accept_policy, http, http_access, http, MHD_OPTION_EXTERNAL_LOGGER,
        http_mhd_log, http, MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&ss,
        MHD_OPTION_NOTIFY_COMPLETED, http_completed, http, MHD_OPTION_URI_LOG_CALLBACK,
        http_uri_log, http, MHD_OPTION_NOTIFY_CONNECTION, http_notify, http,
        MHD_OPTION_CONNECTION_LIMIT, (unsigned int)(http->lim.max_connections + http->lim.reserve),
        MHD_OPTION_CONNECTION_TIMEOUT, (unsigned int)ESMD_HTTP_CONN_TIMEOUT_S, MHD_OPTION_END);
    if (http->daemon == NULL) {
        snprintf(err, errlen, "cannot listen on %s: %s", listen,
                 http->lasterr[0] ? http->lasterr : "libmicrohttpd failed to start");
        goto fail;
    }
    info = MHD_get_daemon_info(http->daemon, MHD_DAEMON_INFO_BIND_PORT);
    http->port = info ? info->port : port;
    return http;
fail:
    if (http->daemon)
        MHD_stop_daemon(http->daemon);
    ev_async_stop(loop, &http->wake);
    http_free(http);
    return NULL;
}

void esmd_http_set_ready_fn(struct esmd_http *http, esmd_http_ready_fn fn, void *ud)
{
    if (http == NULL)
        return;
    http->ready_fn = fn;
    http->ready_ud = ud;
}

int esmd_http_port(const struct esmd_http *http)
{
    return http ? http->port : -1;
}

void esmd_http_stop(struct esmd_http *http)
{
    if (http == NULL)
        return;
    atomic_store(&http->stopping, true);
    /* MHD must not be stopped with suspended connections: answer them 503 and resume. Those
     * handed over but not dispatched yet get their 503 from here. */
    http_wake_cb(http->loop, &http->wake, 0);
    while (http->pending != NULL) {
        struct esmd_http_req *req = http->pending;

        http_pending_remove(req);
        if (req->abort_fn) {
            esmd_http_abort_fn fn = req->abort_fn;

            req->abort_fn = NULL;
            fn(req->abort_ud, req);
        }
        /* Unless the abort callback answered it: then it is resumed already. */
        if (req->suspended)
            esmd_http_respond_error(req, 503, "ServiceException", "shutting down");
    }
    /* Let MHD's thread send those answers (it closes connections when stopped): at most 1 s. */
    for (int i = 0; i < 200 && atomic_load(&http->active) > 0; i++) {
        nanosleep(&(struct timespec){0, 5 * 1000 * 1000}, NULL);
        http_wake_cb(http->loop, &http->wake, 0); /* one handed over as stopping began */
    }
    MHD_stop_daemon(http->daemon);
    ev_async_stop(http->loop, &http->wake);
    /* anything still in the inbox was completed (freed) by MHD_stop_daemon; only log lines */
    http->inbox = NULL;
    http->inbox_tail = &http->inbox;
    http_wake_cb(http->loop, &http->wake, 0);
    http_free(http);
}
