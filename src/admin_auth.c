/* Admin API authentication (include/esmd/admin_auth.h, docs/async.md "Authentication"):
 * bearer token or AWS Signature Version 4, checked with OpenSSL's HMAC / SHA-256. */
#include "esmd/admin_auth.h"
#include "esmd/buf.h"
#include "esmd/http.h"
#include "esmd/lambda_api.h"
#include "esmd/log.h"

#include <openssl/crypto.h>
#include <openssl/evp.h>
#include <openssl/hmac.h>
#include <openssl/sha.h>
#include <ctype.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <time.h>

#define SIGV4_ALGO "AWS4-HMAC-SHA256"
#define SIGV4_MAX_SKEW_MS (15 * 60 * 1000)
#define SIGV4_MAX_HEADERS 64
#define SIGV4_UNSIGNED "UNSIGNED-PAYLOAD"

struct esmd_admin_auth {
    char *token; /* NULL = none */
    char *access_key_id;
    char *secret;
};

struct esmd_admin_auth *esmd_admin_auth_new(const struct esmd_admin_cfg *cfg)
{
    struct esmd_admin_auth *a = esmd_xcalloc(1, sizeof(*a));

    if (cfg != NULL) {
        if (cfg->token && cfg->token[0])
            a->token = esmd_xstrdup(cfg->token);
        if (cfg->access_key_id && cfg->access_key_id[0] && cfg->secret_access_key) {
            a->access_key_id = esmd_xstrdup(cfg->access_key_id);
            a->secret = esmd_xstrdup(cfg->secret_access_key);
        }
    }
    return a;
}

void esmd_admin_auth_free(struct esmd_admin_auth *a)
{
    if (a == NULL)
        return;
    if (a->token)
        OPENSSL_cleanse(a->token, strlen(a->token));
    if (a->secret)
        OPENSSL_cleanse(a->secret, strlen(a->secret));
    free(a->token);
    free(a->access_key_id);
    free(a->secret);
    free(a);
}

/* ---- crypto helpers ---- */

static void sha256_hex(const void *p, size_t n, char out[65])
{
    static const char hex[] = "0123456789abcdef";
    unsigned char md[SHA256_DIGEST_LENGTH];

    SHA256(p, n, md);
    for (int i = 0; i < SHA256_DIGEST_LENGTH; i++) {
        out[2 * i] = hex[md[i] >> 4];
        out[2 * i + 1] = hex[md[i] & 15];
    }
    out[64] = '\0';
}

static void hmac256(const void *key, size_t keylen, const void *msg, size_t n,
                    unsigned char out[32])
{
    unsigned int len = 32;

    HMAC(EVP_sha256(), key, (int)keylen, msg, n, out, &len);
}

static bool sha256_hex_valid(const char *s)
{
    size_t i = 0;

    while (i < 64 && esmd_hex_digit(s[i]) >= 0)
        i++;
    return i == 64 && s[64] == '\0';
}

/* Constant-time equality of two strings of any lengths (a: from the request, b: the secret). */
static bool secret_equal(const char *a, size_t alen, const char *b, size_t blen)
{
    /* Every byte of a (the caller's) is compared with a byte of b (the secret, cycled), so the
     * time depends on alen only, never on where a difference is nor on b's content. (It used to
     * hash both with SHA-256 first: two digests per request showed in the Invoke route's
     * profile.) */
    volatile unsigned char diff = (unsigned char)(alen != blen);

    if (blen == 0)
        return alen == 0;
    for (size_t i = 0, j = 0; i < alen; i++) {
        diff |= (unsigned char)(a[i] ^ b[j]);
        j = j + 1 == blen ? 0 : j + 1;
    }
    return diff == 0;
}

/* ---- canonical request pieces ---- */

static bool unreserved(unsigned char c)
{
    return (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' ||
           c == '_' || c == '.' || c == '~';
}

static void uri_encode(struct esmd_buf *b, const char *s, size_t n, bool keep_slash)
{
    static const char hex[] = "0123456789ABCDEF";

    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        if (unreserved(c) || (keep_slash && c == '/')) {
            esmd_buf_putc(b, (char)c);
        } else {
            esmd_buf_putc(b, '%');
            esmd_buf_putc(b, hex[c >> 4]);
            esmd_buf_putc(b, hex[c & 15]);
        }
    }
}

struct qpair {
    char *k, *v; /* encoded */
};

static int qpair_cmp(const void *a, const void *b)
{
    const struct qpair *x = a, *y = b;
    int c = strcmp(x->k, y->k);
    return c ? c : strcmp(x->v, y->v);
}

void esmd_admin_sigv4_query(struct esmd_buf *out, const char *const *names,
                            const char *const *values, size_t n)
{
    struct qpair *p = esmd_xcalloc(n + 1, sizeof(*p));
    struct esmd_buf b = ESMD_BUF_INIT;

    for (size_t i = 0; i < n; i++) {
        esmd_buf_reset(&b);
        uri_encode(&b, names[i], strlen(names[i]), false);
        p[i].k = esmd_xstrdup(esmd_buf_cstr(&b));
        esmd_buf_reset(&b);
        if (values[i])
            uri_encode(&b, values[i], strlen(values[i]), false);
        p[i].v = esmd_xstrdup(esmd_buf_cstr(&b));
    }
    qsort(p, n, sizeof(*p), qpair_cmp);
    for (size_t i = 0; i < n; i++) {
        if (i)
            esmd_buf_putc(out, '&');
        esmd_buf_printf(out, "%s=%s", p[i].k, p[i].v);
        free(p[i].k);
        free(p[i].v);
    }
    free(p);
    esmd_buf_free(&b);
}

/* Appends the value with leading/trailing blanks removed and inner runs of blanks as one space. */
static void put_trimmed(struct esmd_buf *b, const char *v)
{
    bool space = false, any = false;

    for (; *v; v++) {
        if (*v == ' ' || *v == '\t') {
            space = any;
            continue;
        }
        if (space)
            esmd_buf_putc(b, ' ');
        space = false;
        any = true;
        esmd_buf_putc(b, *v);
    }
}

/* Finds "key=" in the comma-separated Authorization parameters; copies its value into out. */
static bool auth_param(const char *params, const char *key, char *out, size_t outlen)
{
    size_t kl = strlen(key);
    const char *p = params;

    while (*p) {
        while (*p == ' ' || *p == ',')
            p++;
        if (strncmp(p, key, kl) == 0 && p[kl] == '=') {
            const char *v = p + kl + 1, *e = strchr(v, ',');
            size_t n = e ? (size_t)(e - v) : strlen(v);
            while (n > 0 && v[n - 1] == ' ')
                n--;
            if (n >= outlen)
                return false;
            memcpy(out, v, n);
            out[n] = '\0';
            return true;
        }
        p = strchr(p, ',');
        if (p == NULL)
            break;
    }
    return false;
}

/* "20150830T123600Z" → epoch ms; -1 when malformed. */
static int64_t parse_amz_date(const char *s)
{
    struct tm tm;
    int n = 0;

    if (s == NULL || strlen(s) != 16)
        return -1;
    memset(&tm, 0, sizeof(tm));
    if (sscanf(s, "%4d%2d%2dT%2d%2d%2dZ%n", &tm.tm_year, &tm.tm_mon, &tm.tm_mday, &tm.tm_hour,
               &tm.tm_min, &tm.tm_sec, &n) != 6 ||
        n != 16)
        return -1;
    tm.tm_year -= 1900;
    tm.tm_mon -= 1;
    return (int64_t)timegm(&tm) * 1000;
}

enum esmd_sigv4_result esmd_admin_sigv4_check(const char *access_key_id, const char *secret,
                                              const char *service, const char *authorization,
                                              const char *method, const char *path,
                                              const char *canonical_query, const char *body,
                                              size_t len, esmd_sigv4_header_fn hdr, void *ud,
                                              int64_t now_ms, char *why, size_t whylen)
{
    char cred[512], signed_hdrs[1024], sig[128], scope_date[16], region[64], svc[64], term[32];
    char akid[256], body_hash[65], creq_hash[65];
    struct esmd_buf creq = ESMD_BUF_INIT, sts = ESMD_BUF_INIT, tmp = ESMD_BUF_INIT;
    enum esmd_sigv4_result rc = ESMD_SIGV4_MALFORMED;
    const char *amz_date, *csha, *params, *payload = NULL;
    size_t nh = 0;

    snprintf(why, whylen, "the Authorization header is not an AWS Signature Version 4 one");
    if (authorization == NULL || strncmp(authorization, SIGV4_ALGO " ", strlen(SIGV4_ALGO) + 1))
        goto out;
    params = authorization + strlen(SIGV4_ALGO) + 1;
    if (!auth_param(params, "Credential", cred, sizeof(cred)) ||
        !auth_param(params, "SignedHeaders", signed_hdrs, sizeof(signed_hdrs)) ||
        !auth_param(params, "Signature", sig, sizeof(sig)))
        goto out;
    /* Credential = AKID/DATE/REGION/SERVICE/aws4_request */
    {
        char *parts[5], *save = NULL, *tok;
        int np = 0;
        char copy[512];
        snprintf(copy, sizeof(copy), "%s", cred);
        for (tok = strtok_r(copy, "/", &save); tok && np < 5; tok = strtok_r(NULL, "/", &save))
            parts[np++] = tok;
        if (np != 5 || tok != NULL || strlen(parts[0]) >= sizeof(akid) || strlen(parts[1]) != 8 ||
            strlen(parts[2]) >= sizeof(region) || strlen(parts[3]) >= sizeof(svc) ||
            strlen(parts[4]) >= sizeof(term)) {
            snprintf(why, whylen, "malformed Credential in the Authorization header");
            goto out;
        }
        snprintf(akid, sizeof(akid), "%s", parts[0]);
        snprintf(scope_date, sizeof(scope_date), "%s", parts[1]);
        snprintf(region, sizeof(region), "%s", parts[2]);
        snprintf(svc, sizeof(svc), "%s", parts[3]);
        snprintf(term, sizeof(term), "%s", parts[4]);
    }
    if (strcmp(term, "aws4_request") != 0) {
        snprintf(why, whylen, "Credential should be scoped with a valid terminator: aws4_request");
        goto out;
    }
    if (access_key_id == NULL || secret == NULL ||
        !secret_equal(akid, strlen(akid), access_key_id, strlen(access_key_id))) {
        rc = ESMD_SIGV4_UNKNOWN_KEY;
        snprintf(why, whylen, "The security token included in the request is invalid.");
        goto out;
    }
    if (strcmp(svc, service) != 0) {
        rc = ESMD_SIGV4_WRONG_SERVICE;
        snprintf(why, whylen, "Credential should be scoped to correct service: '%s'", service);
        goto out;
    }
    amz_date = hdr(ud, "x-amz-date");
    {
        int64_t t = parse_amz_date(amz_date);
        if (t < 0 || strncmp(amz_date, scope_date, 8) != 0) {
            rc = ESMD_SIGV4_STALE;
            snprintf(why, whylen, "X-Amz-Date is missing, malformed or not the credential date");
            goto out;
        }
        if (t < now_ms - SIGV4_MAX_SKEW_MS || t > now_ms + SIGV4_MAX_SKEW_MS) {
            rc = ESMD_SIGV4_STALE;
            snprintf(why, whylen, "Signature expired: %s is more than 15 minutes away from now",
                     amz_date);
            goto out;
        }
    }
    /* The payload hash: the body's, or (body not read yet) the one the client declares */
    csha = hdr(ud, "x-amz-content-sha256");
    if (csha != NULL && strcmp(csha, SIGV4_UNSIGNED) == 0) {
        /* A signature that does not cover the body: only where there is nothing to swap. */
        if (strcmp(method, "GET") != 0 && strcmp(method, "HEAD") != 0) {
            rc = ESMD_SIGV4_UNSIGNED;
            snprintf(why, whylen,
                     "X-Amz-Content-Sha256: " SIGV4_UNSIGNED " is accepted on GET and HEAD only: "
                     "sign the payload");
            goto out;
        }
        payload = SIGV4_UNSIGNED;
    } else if (csha != NULL && !sha256_hex_valid(csha)) {
        rc = ESMD_SIGV4_BAD_HASH;
        snprintf(why, whylen,
                 "X-Amz-Content-Sha256 must be the SHA-256 of the body (64 hex digits) "
                 "or " SIGV4_UNSIGNED);
        goto out;
    } else if (body != NULL) {
        sha256_hex(body, len, body_hash);
        if (csha != NULL && strcasecmp(csha, body_hash) != 0) {
            rc = ESMD_SIGV4_BAD_HASH;
            snprintf(why, whylen, "X-Amz-Content-Sha256 does not match the request body");
            goto out;
        }
        payload = body_hash;
    } else if (csha != NULL) {
        for (int i = 0; i < 64; i++)
            body_hash[i] = (char)tolower((unsigned char)csha[i]);
        body_hash[64] = '\0';
        payload = body_hash;
    } /* else the signature waits for the body */

    /* canonical request */
    esmd_buf_printf(&creq, "%s\n", method);
    /* The path as sent, encoded once more: what the SDKs sign for every service but S3 (an
     * SDK sends /a%3Ab and signs /a%253Ab). Not the decoded path: /a%2Fb and /a/b, /x%00y and
     * /x would sign alike. */
    uri_encode(&creq, path, strlen(path), true);
    esmd_buf_printf(&creq, "\n%s\n", canonical_query ? canonical_query : "");
    {
        char copy[1024], *save = NULL;
        bool has_host = false;
        snprintf(copy, sizeof(copy), "%s", signed_hdrs);
        for (char *h = strtok_r(copy, ";", &save); h; h = strtok_r(NULL, ";", &save)) {
            const char *v;
            if (nh == SIGV4_MAX_HEADERS) {
                snprintf(why, whylen, "too many signed headers");
                goto out;
            }
            for (char *c = h; *c; c++)
                if (*c >= 'A' && *c <= 'Z') {
                    snprintf(why, whylen, "SignedHeaders must be lowercase");
                    goto out;
                }
            nh++;
            if (strcmp(h, "host") == 0)
                has_host = true;
            v = hdr(ud, h);
            if (v == NULL) {
                snprintf(why, whylen, "signed header %s is not in the request", h);
                goto out;
            }
            esmd_buf_printf(&creq, "%s:", h);
            put_trimmed(&creq, v);
            esmd_buf_putc(&creq, '\n');
        }
        if (!has_host) {
            snprintf(why, whylen, "the host header must be signed");
            goto out;
        }
    }
    if (payload == NULL) {
        rc = ESMD_SIGV4_NEED_BODY;
        why[0] = '\0';
        goto out;
    }
    esmd_buf_printf(&creq, "\n%s\n%s", signed_hdrs, payload);
    sha256_hex(creq.data, creq.len, creq_hash);
    esmd_buf_printf(&sts, SIGV4_ALGO "\n%s\n%s/%s/%s/aws4_request\n%s", amz_date, scope_date,
                    region, svc, creq_hash);
    {
        unsigned char k[32], expect[32];
        char hex[65];
        static const char digits[] = "0123456789abcdef";
        esmd_buf_reset(&tmp);
        esmd_buf_printf(&tmp, "AWS4%s", secret);
        hmac256(tmp.data, tmp.len, scope_date, strlen(scope_date), k);
        OPENSSL_cleanse(tmp.data, tmp.len);
        hmac256(k, 32, region, strlen(region), k);
        hmac256(k, 32, svc, strlen(svc), k);
        hmac256(k, 32, "aws4_request", 12, k);
        hmac256(k, 32, sts.data, sts.len, expect);
        for (int i = 0; i < 32; i++) {
            hex[2 * i] = digits[expect[i] >> 4];
            hex[2 * i + 1] = digits[expect[i] & 15];
        }
        hex[64] = '\0';
        if (!secret_equal(hex, 64, sig, strlen(sig))) {
            rc = ESMD_SIGV4_MISMATCH;
            snprintf(why, whylen,
                     "The request signature we calculated does not match the signature you "
                     "provided. Check your AWS Secret Access Key and signing method.");
            goto out;
        }
    }
    rc = ESMD_SIGV4_OK;
    why[0] = '\0';
out:
    esmd_buf_free(&creq);
    esmd_buf_free(&sts);
    esmd_buf_free(&tmp);
    return rc;
}

/* ---- the request check ---- */

static const char *req_header(void *ud, const char *name)
{
    return esmd_http_req_header(ud, name);
}

struct qcollect {
    const char **names, **values;
    size_t n, cap;
};

static void q_add(void *ud, const char *name, const char *value)
{
    struct qcollect *q = ud;

    if (q->n == q->cap) {
        q->cap = q->cap ? 2 * q->cap : 8;
        q->names = esmd_xrealloc(q->names, q->cap * sizeof(*q->names));
        q->values = esmd_xrealloc(q->values, q->cap * sizeof(*q->values));
    }
    q->names[q->n] = name;
    q->values[q->n] = value;
    q->n++;
}

static void deny(struct esmd_http_req *req, int status, const char *type, const char *msg)
{
    struct esmd_api_call call;

    esmd_api_begin(&call, req);
    esmd_api_error(&call, status, type, "%s", msg);
}

/* A request that changes something (any method but GET and HEAD) sent by a browser from another
 * origin: its Origin header names another scheme://host:port than the Host it was sent to (or
 * is "null"). The console's defence against cross-site requests besides its credentials being a
 * header no other site can make a browser send (docs/admin.md#console). Clients that send no
 * Origin (curl, the SDKs) are not affected. */
static bool cross_origin(struct esmd_http_req *req)
{
    const char *method = esmd_http_req_method(req);
    const char *origin = esmd_http_req_header(req, "Origin");
    const char *host = esmd_http_req_header(req, "Host");

    if (strcmp(method, "GET") == 0 || strcmp(method, "HEAD") == 0 || origin == NULL)
        return false;
    if (host == NULL || host[0] == '\0')
        return true;
    for (size_t i = 0; i < 2; i++) {
        const char *scheme = i ? "https://" : "http://";
        size_t n = strlen(scheme);
        if (strncasecmp(origin, scheme, n) == 0 && strcasecmp(origin + n, host) == 0)
            return false;
    }
    return true;
}

/* Without credentials configured, loopback clients are served: a Host that is a name other than
 * localhost is refused, so that a page of another site whose name was made to resolve to
 * 127.0.0.1 (DNS rebinding) cannot read or change anything through a visitor's browser. An IP
 * literal (with or without a port, [IPv6] in brackets), "localhost", or no Host are accepted. */
static bool host_is_loopback_safe(const char *host)
{
    size_t n;

    if (host == NULL || host[0] == '\0')
        return true;
    if (host[0] == '[') /* an IPv6 literal */
        return strchr(host, ']') != NULL;
    n = strcspn(host, ":");
    if (n == strlen("localhost") && strncasecmp(host, "localhost", n) == 0)
        return true;
    for (size_t i = 0; i < n; i++)
        if (!isdigit((unsigned char)host[i]) && host[i] != '.')
            return false;
    return n > 0;
}

/* The check of esmd_admin_authorize() and esmd_admin_auth_request(). with_body: the body is in
 * (then the answer is OK or DENIED); without it, a SigV4 request may answer BODY. */
static enum esmd_http_auth auth_check(const struct esmd_admin_auth *a, struct esmd_http_req *req,
                                      bool with_body)
{
    const char *authz = esmd_http_req_header(req, "Authorization");
    bool any = a && (a->token || a->access_key_id);

    if (cross_origin(req)) {
        deny(req, 403, "AccessDeniedException",
             "cross-origin request refused: its Origin is not the address it was sent to");
        return ESMD_HTTP_AUTH_DENIED;
    }

    if (!any) {
        if (!host_is_loopback_safe(esmd_http_req_header(req, "Host"))) {
            deny(req, 403, "AccessDeniedException",
                 "without admin.token or admin.aws_credentials, the admin API answers requests "
                 "for an IP address or localhost only (the Host header names another host)");
            return ESMD_HTTP_AUTH_DENIED;
        }
        if (esmd_http_req_is_loopback(req))
            return ESMD_HTTP_AUTH_OK;
        deny(req, 403, "AccessDeniedException",
             "the admin API accepts only loopback clients when neither admin.token nor "
             "admin.aws_credentials is configured");
        return ESMD_HTTP_AUTH_DENIED;
    }
    if (authz == NULL || authz[0] == '\0') {
        deny(req, 401, "MissingAuthenticationTokenException",
             "Missing Authentication Token: send Authorization: Bearer <admin.token> or sign the "
             "request with AWS Signature Version 4");
        return ESMD_HTTP_AUTH_DENIED;
    }
    if (strncasecmp(authz, "Bearer ", 7) == 0) {
        const char *t = authz + 7;
        while (*t == ' ')
            t++;
        if (a->token && secret_equal(t, strlen(t), a->token, strlen(a->token)))
            return ESMD_HTTP_AUTH_OK;
        deny(req, 401, "UnrecognizedClientException", "The bearer token is invalid.");
        return ESMD_HTTP_AUTH_DENIED;
    }
    if (strncmp(authz, SIGV4_ALGO " ", strlen(SIGV4_ALGO) + 1) == 0) {
        struct qcollect q = {0};
        struct esmd_buf cq = ESMD_BUF_INIT;
        size_t len = 0;
        const char *body = with_body ? esmd_http_req_body(req, &len) : NULL;
        char why[256], line[300];
        enum esmd_sigv4_result r;

        esmd_http_req_query_each(req, q_add, &q);
        esmd_admin_sigv4_query(&cq, q.names, q.values, q.n);
        r = esmd_admin_sigv4_check(a->access_key_id, a->secret, "lambda", authz,
                                   esmd_http_req_method(req), esmd_http_req_raw_path(req),
                                   esmd_buf_cstr(&cq), body, len, req_header, req, esmd_now_ms(),
                                   why, sizeof(why));
        free(q.names);
        free(q.values);
        esmd_buf_free(&cq);
        switch (r) {
        case ESMD_SIGV4_OK: {
            /* Signed over the hash the client declares (X-Amz-Content-Sha256): the body must
             * still be read and found to have that hash, or a captured request could be sent
             * again with another body. UNSIGNED-PAYLOAD (GET/HEAD only) has nothing to check. */
            const char *csha = with_body ? NULL : req_header(req, "x-amz-content-sha256");
            if (csha != NULL && strcmp(csha, SIGV4_UNSIGNED) != 0)
                return ESMD_HTTP_AUTH_BODY;
            return ESMD_HTTP_AUTH_OK;
        }
        case ESMD_SIGV4_NEED_BODY:
            return ESMD_HTTP_AUTH_BODY; /* only without the body */
        case ESMD_SIGV4_UNKNOWN_KEY:
            deny(req, 403, "UnrecognizedClientException", why);
            return ESMD_HTTP_AUTH_DENIED;
        case ESMD_SIGV4_STALE:
            deny(req, 403, "InvalidSignatureException", why);
            return ESMD_HTTP_AUTH_DENIED;
        default:
            snprintf(line, sizeof(line), "admin: refused a request: %s", why);
            esmd_http_req_warn(req, "admin-auth", line);
            deny(req, 403, "InvalidSignatureException", why);
            return ESMD_HTTP_AUTH_DENIED;
        }
    }
    deny(req, 401, "UnrecognizedClientException",
         "unsupported Authorization scheme (Bearer or AWS4-HMAC-SHA256)");
    return ESMD_HTTP_AUTH_DENIED;
}

bool esmd_admin_authorize(const struct esmd_admin_auth *a, struct esmd_http_req *req)
{
    if (esmd_http_req_authenticated(req))
        return true;
    return auth_check(a, req, true) == ESMD_HTTP_AUTH_OK;
}

enum esmd_http_auth esmd_admin_auth_request(void *ud, struct esmd_http_req *req, bool body)
{
    return auth_check(ud, req, body);
}
