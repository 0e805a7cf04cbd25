/* The admin HTTP listener: libmicrohttpd on a thread of its own (sockets, HTTP parsing, bodies);
 * every complete request is handed to the loop, where its handler runs (src/http.c). Built-in
 * routes: GET /healthz, GET /readyz, GET /metrics. Other routes are registered by the subsystems
 * that own them (admin API, async queue). */
#ifndef ESMD_HTTP_H
#define ESMD_HTTP_H

#include "esmd/buf.h"

struct ev_loop;
struct esmd_http;

/* Readiness probe: append a JSON object with details (e.g. {"postgres":true,"mappings":{...}})
 * to detail and return whether the service is ready. */
typedef bool (*esmd_http_ready_fn)(void *ud, struct esmd_buf *detail);

/* Connection limits (docs/admin.md "Connection limits"). One client address may hold
 * per_client connections and all clients together max_connections. Past either, a connection
 * still gets a place in a small reserve (reserve places in all, ESMD_HTTP_RESERVE_PER_CLIENT per
 * address) where only the built-in routes (/healthz, /readyz, /metrics) are served: anything
 * else is answered 429 TooManyRequestsException without reading its body. A reserve connection
 * serves one request and is closed after ESMD_HTTP_RESERVE_TIMEOUT_S idle seconds. Past the
 * reserve, connections are closed as soon as they are accepted. */
#define ESMD_HTTP_MAX_CONNECTIONS 1000
#define ESMD_HTTP_PER_CLIENT 512
#define ESMD_HTTP_RESERVE 20
#define ESMD_HTTP_RESERVE_PER_CLIENT 2
#define ESMD_HTTP_RESERVE_TIMEOUT_S 5
struct esmd_http_limits {
    unsigned max_connections; /* 0 = ESMD_HTTP_MAX_CONNECTIONS */
    unsigned per_client;      /* 0 = ESMD_HTTP_PER_CLIENT */
    unsigned reserve;         /* 0 = ESMD_HTTP_RESERVE */
};

/* Listens on "host:port" (IPv4, [IPv6] or name). limits: NULL or borrowed (0 fields = the
 * defaults). NULL with err on failure (bad address, port in use). */
struct esmd_http *esmd_http_start(struct ev_loop *loop, const char *listen,
                                  const struct esmd_http_limits *limits, char *err,
                                  size_t errlen) ESMD_MUST_CHECK;
void esmd_http_set_ready_fn(struct esmd_http *http, esmd_http_ready_fn fn, void *ud);
/* The port actually bound (useful with port 0). */
int esmd_http_port(const struct esmd_http *http);
/* Stops listening and frees. NULL ok. Requests still unanswered get their abort callback (see
 * esmd_http_req_on_abort) and the client a 503. */
void esmd_http_stop(struct esmd_http *http);

/* ---- routes (additive: for the admin API and later subsystems) ---- */

struct esmd_http_req; /* one request; owned by the listener */

/* Runs on the loop thread once the whole request body has arrived (and, with an authentication
 * function, was authenticated: see esmd_http_set_auth). The handler must answer
 * exactly once with esmd_http_respond*(), now or later from the loop (the connection is
 * suspended meanwhile). req is borrowed: valid until the answer, or until its abort callback. */
typedef void (*esmd_http_handler)(void *ud, struct esmd_http_req *req);
typedef void (*esmd_http_abort_fn)(void *ud, struct esmd_http_req *req);

/* Adds a route. method: "GET", "POST", ... (a GET route also answers HEAD); path: exact, or a
 * prefix when it ends in a '*' (as in "/admin/" + '*'). Routes are tried in the order added;
 * a path that matches with another method gets 405, no match 404 (Lambda's error shape).
 * method and path are copied. Returns 0 or ESMD_EINVAL. */
int esmd_http_route(struct esmd_http *http, const char *method, const char *path,
                    esmd_http_handler fn, void *ud) ESMD_MUST_CHECK;

/* As esmd_http_route, for a route that needs no authentication (the admin console's static
 * files, which hold no data): not served on a reserve connection (only the built-in routes
 * are). */
int esmd_http_route_public(struct esmd_http *http, const char *method, const char *path,
                           esmd_http_handler fn, void *ud) ESMD_MUST_CHECK;

/* Body limit of a route, decided from the request line and headers before the body is read:
 * returns the largest body accepted (bytes; at most ESMD_MAX_PAYLOAD). A request whose
 * Content-Length (or body so far) is larger is answered 413 RequestTooLargeException without
 * reading the rest. It runs on the listener's thread, not the loop: it may read the request
 * and what does not change after start (configuration), nothing else. */
typedef size_t (*esmd_http_limit_fn)(void *ud, struct esmd_http_req *req);
/* As esmd_http_route, with a body limit function for the route (NULL = ESMD_MAX_PAYLOAD). */
int esmd_http_route_limited(struct esmd_http *http, const char *method, const char *path,
                            esmd_http_handler fn, esmd_http_limit_fn limit,
                            void *ud) ESMD_MUST_CHECK;

/* ---- authentication (before any body is read) ---- */

enum esmd_http_auth {
    ESMD_HTTP_AUTH_OK,     /* authenticated: the body is read, then the handler runs */
    ESMD_HTTP_AUTH_BODY,   /* undecided: call again once the whole body is in */
    ESMD_HTTP_AUTH_DENIED, /* refused: the function has answered req (an error) */
};
/* Authentication of every request to a registered route (the built-in /healthz, /readyz and
 * /metrics are open). Called on the listener's thread (the rules of esmd_http_limit_fn apply:
 * it may read req and what does not change after start, and log with esmd_http_req_warn()
 * only): first with body false, from the request line and headers, before a byte of the body
 * is read (a request refused then has its body dropped unread); when that answered
 * ESMD_HTTP_AUTH_BODY, again with body true once the whole body is in (anything but
 * ESMD_HTTP_AUTH_DENIED then hands the request to its handler unauthenticated). A request that
 * matches no route is answered 404/405 from its headers, without this function. */
typedef enum esmd_http_auth (*esmd_http_auth_fn)(void *ud, struct esmd_http_req *req, bool body);
/* Sets the authentication function (ud borrowed: must outlive the listener). Set it before the
 * routes it protects are added. */
void esmd_http_set_auth(struct esmd_http *http, esmd_http_auth_fn fn, void *ud);
/* Whether the authentication function accepted req (ESMD_HTTP_AUTH_OK), so that a handler
 * need not check its credentials again. */
bool esmd_http_req_authenticated(const struct esmd_http_req *req);
/* Logs a warning from any thread: from the listener's, the line is handed to the loop. key: a
 * string with static storage, the rate-limit key as esmd_log_limited()'s; msg is copied. */
void esmd_http_req_warn(struct esmd_http_req *req, const char *key, const char *msg);

/* Request accessors; returned strings are borrowed, valid as long as req. */
const char *esmd_http_req_method(const struct esmd_http_req *req);
const char *esmd_http_req_path(const struct esmd_http_req *req); /* without the query */
/* The path as the client sent it, percent-encoding kept, without the query: what the Lambda API
 * routes split into segments (an encoded '/' or NUL must not change the route: see
 * src/lambda_api.c). esmd_http_req_path() is the decoded one (MHD cuts it at a %00). */
const char *esmd_http_req_raw_path(const struct esmd_http_req *req);
const char *esmd_http_req_header(const struct esmd_http_req *req, const char *name); /* or NULL */
const char *esmd_http_req_query(const struct esmd_http_req *req, const char *name);  /* or NULL */
/* Calls fn(ud, name, value) for every query argument, decoded, in the order sent (value NULL
 * for an argument without '='). For request signing (SigV4). */
void esmd_http_req_query_each(const struct esmd_http_req *req,
                              void (*fn)(void *ud, const char *name, const char *value), void *ud);
/* NUL-terminated body ("" when none); *len set when len is not NULL. Capped at
 * ESMD_MAX_PAYLOAD: bigger requests are answered 413 before any handler runs. */
const char *esmd_http_req_body(const struct esmd_http_req *req, size_t *len);
/* Whether the client connected from 127.0.0.0/8 or ::1. */
bool esmd_http_req_is_loopback(const struct esmd_http_req *req);
/* Called, instead of waiting forever, when the listener stops before the handler answered;
 * req is invalid once it returns (do not answer it). */
void esmd_http_req_on_abort(struct esmd_http_req *req, esmd_http_abort_fn fn, void *ud);

/* Adds a header (copied) to the coming answer. */
void esmd_http_req_add_header(struct esmd_http_req *req, const char *name, const char *value);
/* Answers. body (len bytes) is copied; content_type NULL = none. req is invalid afterwards. */
void esmd_http_respond(struct esmd_http_req *req, int status, const char *content_type,
                       const char *body, size_t len);
/* Lambda's error shape (docs/lambda.md#errors): x-amzn-ErrorType: type and
 * {"Type":"User","Message":message} ("Service" instead of "User" for a status of 500 or more). */
void esmd_http_respond_error(struct esmd_http_req *req, int status, const char *type,
                             const char *message);

#endif
