/* Admin API authentication (docs/admin.md#authentication): the listener calls
 * esmd_admin_auth_request() for every request to an admin route (all but /healthz, /readyz and
 * /metrics) from its headers, before reading the body; every admin route handler also calls
 * esmd_admin_authorize() first (a no-op for a request the listener authenticated).
 *
 * Accepted credentials:
 *  - `Authorization: Bearer <admin.token>` (compared in constant time);
 *  - AWS Signature Version 4 made with admin.aws_credentials (service `lambda`, any region):
 *    the canonical request is rebuilt from the request (method, path, query, signed headers,
 *    SHA-256 of the body) and the signature checked with HMAC-SHA-256; X-Amz-Date must be
 *    within 15 minutes of now; X-Amz-Content-Sha256, when sent, must match the body. With an
 *    X-Amz-Content-Sha256 the signature is checked from the headers, and the body against it
 *    once in; without, the headers are checked first (key, scope, date, signed headers) and the
 *    signature once the body is in. `X-Amz-Content-Sha256: UNSIGNED-PAYLOAD` is accepted on GET
 *    and HEAD only.
 * With neither admin.token nor admin.aws_credentials configured, only loopback clients
 * (127.0.0.0/8, ::1) are accepted.
 *
 * Refusals are answered in Lambda's error shape: 401 UnrecognizedClientException (no or
 * unknown credentials), 403 InvalidSignatureException / AccessDeniedException (bad signature,
 * stale date, wrong service, non-loopback client without credentials configured). */
#ifndef ESMD_ADMIN_AUTH_H
#define ESMD_ADMIN_AUTH_H

#include "esmd/common.h"
#include "esmd/config.h"
#include "esmd/http.h"

struct esmd_http_req;
struct esmd_admin_auth;

/* Copies what it needs from cfg (token, access key id, secret). Never NULL. Free with
 * esmd_admin_auth_free(). */
struct esmd_admin_auth *esmd_admin_auth_new(const struct esmd_admin_cfg *cfg);
void esmd_admin_auth_free(struct esmd_admin_auth *a); /* NULL ok */

/* true when the request carries valid credentials (or, with none configured, comes from a
 * loopback client): the route handler goes on. false when it does not: the request has been
 * answered (401 or 403, Lambda's error shape) and is invalid; the handler returns at once.
 * a == NULL authorizes loopback clients only. Call it first thing in the route handler (the
 * body has been read: SigV4 hashes it). true at once for a request the listener authenticated
 * with esmd_admin_auth_request(). */
bool esmd_admin_authorize(const struct esmd_admin_auth *a, struct esmd_http_req *req);

/* The listener's authentication function (esmd_http_auth_fn; ud: the struct esmd_admin_auth,
 * borrowed): the same checks as esmd_admin_authorize(), from the headers alone when body is
 * false (a SigV4 request without X-Amz-Content-Sha256 then answers ESMD_HTTP_AUTH_BODY).
 * Refusals are answered as esmd_admin_authorize() does. Thread-safe. */
enum esmd_http_auth esmd_admin_auth_request(void *ud, struct esmd_http_req *req, bool body);

/* ---- SigV4 pieces, for tests ---- */

/* Result of esmd_admin_sigv4_check(). */
enum esmd_sigv4_result {
    ESMD_SIGV4_OK,
    ESMD_SIGV4_MALFORMED,     /* Authorization header not a SigV4 one / missing fields */
    ESMD_SIGV4_UNKNOWN_KEY,   /* access key id not the configured one */
    ESMD_SIGV4_WRONG_SERVICE, /* credential scope service is not "lambda" */
    ESMD_SIGV4_STALE,         /* X-Amz-Date missing, malformed or more than 15 min away */
    ESMD_SIGV4_BAD_HASH,      /* X-Amz-Content-Sha256 does not match the body, or is neither
                                 a SHA-256 nor UNSIGNED-PAYLOAD */
    ESMD_SIGV4_MISMATCH,      /* the signature does not match */
    ESMD_SIGV4_UNSIGNED,      /* UNSIGNED-PAYLOAD with a method other than GET or HEAD */
    ESMD_SIGV4_NEED_BODY,     /* body NULL: all but the signature is right; it needs the body */
};

/* Header lookup for esmd_admin_sigv4_check(): value of header `name` (case-insensitive) or
 * NULL. */
typedef const char *(*esmd_sigv4_header_fn)(void *ud, const char *name);

/* Verifies a SigV4 Authorization header for `service` ("lambda" for the admin API; any region).
 * method; path: the request path as sent, percent-encoding kept (no query; it is encoded once
 * more, as the AWS SDKs do for every service but S3);
 * canonical_query: the canonical query string (esmd_admin_sigv4_query(); "" when none);
 * body/len: the payload, or NULL when it has not been read yet (then the payload hash is the
 * X-Amz-Content-Sha256 header's, and without one the result is at best
 * ESMD_SIGV4_NEED_BODY); headers through hdr(ud, name); now_ms: wall clock, epoch ms. All
 * borrowed. why/whylen: a message for the client when neither OK nor NEED_BODY. */
enum esmd_sigv4_result esmd_admin_sigv4_check(const char *access_key_id, const char *secret,
                                              const char *service, const char *authorization,
                                              const char *method, const char *path,
                                              const char *canonical_query, const char *body,
                                              size_t len, esmd_sigv4_header_fn hdr, void *ud,
                                              int64_t now_ms, char *why, size_t whylen);

/* Appends to out the canonical query string of the decoded name/value pairs (n of them; a NULL
 * value is an empty one): each RFC 3986-encoded, sorted by name then value, joined by '&'. */
struct esmd_buf;
void esmd_admin_sigv4_query(struct esmd_buf *out, const char *const *names,
                            const char *const *values, size_t n);

#endif
