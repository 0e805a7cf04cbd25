/* Lambda's API conventions (include/esmd/lambda_api.h, docs/admin.md). */
#include "esmd/lambda_api.h"
#include "esmd/config.h"
#include "esmd/http.h"
#include "esmd/json.h"

#include <inttypes.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- answers ---- */

void esmd_api_begin(struct esmd_api_call *call, struct esmd_http_req *req)
{
    call->req = req;
    esmd_uuid4(call->rid);
}

void esmd_api_respond(struct esmd_api_call *call, int status, const char *content_type,
                      const char *body, size_t len)
{
    esmd_http_req_add_header(call->req, "x-amzn-RequestId", call->rid);
    esmd_http_respond(call->req, status, content_type, body, len);
    call->req = NULL;
}

void esmd_api_respond_json(struct esmd_api_call *call, int status, const struct esmd_buf *json)
{
    esmd_api_respond(call, status, "application/json", json->data ? json->data : "", json->len);
}

static void api_verr(struct esmd_api_err *e, int status, const char *type, const char *fmt,
                     va_list ap) ESMD_PRINTF(4, 0);

static void api_verr(struct esmd_api_err *e, int status, const char *type, const char *fmt,
                     va_list ap)
{
    e->status = status;
    e->type = type;
    vsnprintf(e->message, sizeof(e->message), fmt, ap);
}

void esmd_api_err_set(struct esmd_api_err *e, int status, const char *type, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    api_verr(e, status, type, fmt, ap);
    va_end(ap);
}

void esmd_api_err_bad(struct esmd_api_err *e, const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    api_verr(e, 400, "InvalidParameterValueException", fmt, ap);
    va_end(ap);
}

void esmd_api_answer_err(struct esmd_api_call *call, const struct esmd_api_err *e)
{
    esmd_http_req_add_header(call->req, "x-amzn-RequestId", call->rid);
    esmd_http_respond_error(call->req, e->status, e->type, e->message);
    call->req = NULL;
}

void esmd_api_error(struct esmd_api_call *call, int status, const char *type, const char *fmt, ...)
{
    struct esmd_api_err e;
    va_list ap;

    va_start(ap, fmt);
    api_verr(&e, status, type, fmt, ap);
    va_end(ap);
    esmd_api_answer_err(call, &e);
}

void esmd_api_bad(struct esmd_api_call *call, const char *fmt, ...)
{
    struct esmd_api_err e;
    va_list ap;

    va_start(ap, fmt);
    api_verr(&e, 400, "InvalidParameterValueException", fmt, ap);
    va_end(ap);
    esmd_api_answer_err(call, &e);
}

/* ---- FunctionName ---- */

static bool api_name_char(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '-' ||
           c == '_';
}

int esmd_api_function_parse(const char *s, size_t n, struct esmd_api_fn *out)
{
    static const char fn_tag[] = ":function:";
    const char *p = s, *e = s + n, *name, *colon;
    size_t nl, ql;

    memset(out, 0, sizeof(*out));
    if (n == 0 || n > ESMD_API_FUNCTION_MAX || memchr(s, '\0', n) != NULL)
        return ESMD_EINVAL;
    for (const char *f = s; f + sizeof(fn_tag) - 1 <= e; f++)
        if (memcmp(f, fn_tag, sizeof(fn_tag) - 1) == 0) {
            /* what stands before "function:": "ACCOUNT:" or "arn:aws:lambda:R:A:" */
            out->ours = esmd_function_prefix_ours(s, (size_t)(f - s) + 1);
            p = f + sizeof(fn_tag) - 1;
            break;
        }
    if (p == s) {
        if (n >= 4 && memcmp(s, "arn:", 4) == 0)
            return ESMD_EINVAL; /* an ARN without ":function:" */
        out->ours = true;
    }
    name = p;
    colon = memchr(p, ':', (size_t)(e - p));
    nl = (size_t)((colon ? colon : e) - name);
    if (nl == 0 || nl > ESMD_API_NAME_MAX)
        return ESMD_EINVAL;
    for (size_t i = 0; i < nl; i++)
        if (!api_name_char(name[i]))
            return ESMD_EINVAL;
    memcpy(out->name, name, nl);
    if (colon != NULL) {
        ql = (size_t)(e - colon - 1);
        if (ql == 0 || ql > ESMD_API_QUALIFIER_MAX)
            return ESMD_EINVAL;
        for (size_t i = 0; i < ql; i++)
            if (!api_name_char(colon[1 + i]) && colon[1 + i] != '$')
                return ESMD_EINVAL;
        memcpy(out->qualifier, colon + 1, ql);
    }
    return ESMD_OK;
}

const struct esmd_function_cfg *esmd_api_resolve_function(struct esmd_api_call *call,
                                                          const struct esmd_config *cfg,
                                                          const char *seg)
{
    const char *qarg = esmd_http_req_query(call->req, "Qualifier");
    const char *qual;
    struct esmd_api_fn fn;
    char arn[300];

    if (esmd_api_function_parse(seg, strlen(seg), &fn) != 0) {
        esmd_api_bad(call,
                     "1 validation error detected: Value '%.200s' at 'functionName' failed to "
                     "satisfy constraint: Member must satisfy regular expression pattern: "
                     "(arn:(aws[a-zA-Z-]*)?:lambda:)?([a-z]{2}(-gov)?-[a-z]+-\\d{1}:)?(\\d{12}:)?"
                     "(function:)?([a-zA-Z0-9-_]+)(:(\\$LATEST|[a-zA-Z0-9-_]+))?",
                     seg);
        return NULL;
    }
    if (qarg && *qarg == '\0')
        qarg = NULL;
    qual = fn.qualifier[0] ? fn.qualifier : qarg;
    if (fn.ours && (!fn.qualifier[0] || strcmp(fn.qualifier, "$LATEST") == 0) &&
        (qarg == NULL || strcmp(qarg, "$LATEST") == 0))
        for (size_t i = 0; i < cfg->nfunctions; i++)
            if (strcmp(cfg->functions[i].name, fn.name) == 0)
                return &cfg->functions[i];
    esmd_function_arn(fn.name, arn, sizeof(arn));
    esmd_api_error(call, 404, "ResourceNotFoundException", "Function not found: %s%s%.128s", arn,
                   qual ? ":" : "", qual ? qual : "");
    return NULL;
}

/* ---- integer parameters ---- */

bool esmd_api_json_int(const cJSON *v, const struct esmd_api_range *r, int64_t *out)
{
    if (!cJSON_IsNumber(v) || v->valuedouble != floor(v->valuedouble) ||
        v->valuedouble < (double)r->min || v->valuedouble > (double)r->max)
        return false;
    *out = (int64_t)v->valuedouble;
    return true;
}

bool esmd_api_query_int(const char *s, const struct esmd_api_range *r, int64_t *out)
{
    int64_t v = 0;

    if (s == NULL || *s == '\0' || strlen(s) > 10)
        return false;
    for (; *s; s++) {
        if (*s < '0' || *s > '9')
            return false;
        v = v * 10 + (*s - '0');
    }
    if (v < r->min || v > r->max)
        return false;
    *out = v;
    return true;
}

void esmd_api_range_err(struct esmd_api_err *e, const struct esmd_api_range *r, const char *value)
{
    if (r->member == NULL)
        esmd_api_err_bad(e, "%s must be an integer from %" PRId64 " to %" PRId64, r->name, r->min,
                         r->max);
    else if (value == NULL)
        esmd_api_err_bad(e,
                         "1 validation error detected: Value at '%s' failed to satisfy "
                         "constraint: Member must have value between %" PRId64 " and %" PRId64,
                         r->member, r->min, r->max);
    else
        esmd_api_err_bad(e,
                         "1 validation error detected: Value '%.64s' at '%s' failed to satisfy "
                         "constraint: Member must have value between %" PRId64 " and %" PRId64,
                         value, r->member, r->min, r->max);
}

void esmd_api_range_error(struct esmd_api_call *call, const struct esmd_api_range *r,
                          const char *value)
{
    struct esmd_api_err e;

    esmd_api_range_err(&e, r, value);
    esmd_api_answer_err(call, &e);
}

/* ---- request bodies ---- */

const char *esmd_api_json_check(const char *body, size_t len)
{
    if (!esmd_utf8_valid(body, len))
        return "the body is not valid UTF-8";
    if (!esmd_json_valid(body, len))
        return "not one JSON document (control characters must be escaped, nothing may follow "
               "the document)";
    return NULL;
}

/* Whether the JSON string s[0..n) (with its quotes) holds a \u0000 escape. */
static bool api_string_has_nul(const char *s, size_t n)
{
    for (size_t i = 1; i + 1 < n; i++) {
        if (s[i] != '\\')
            continue;
        if (s[i + 1] == 'u' && i + 5 < n && memcmp(s + i + 2, "0000", 4) == 0)
            return true;
        i++; /* the escaped character */
    }
    return false;
}

static bool api_find_nul(const char *s, size_t len, struct esmd_buf *where, int depth)
{
    struct esmd_json_span key, val;
    size_t pos = 0, idx = 0, mark = where->len;
    bool obj = len > 0 && s[0] == '{';

    if (len > 0 && s[0] == '"')
        return api_string_has_nul(s, len);
    if (len == 0 || (s[0] != '[' && !obj) || depth > ESMD_JSON_MAX_DEPTH)
        return false;
    while (esmd_json_next(s, len, &pos, obj ? &key : NULL, &val)) {
        where->len = mark;
        if (obj) {
            if (where->len > 0)
                esmd_buf_putc(where, '.');
            esmd_buf_append(where, key.p + 1, key.n - 2);
            if (api_string_has_nul(key.p, key.n))
                return true;
        } else {
            esmd_buf_printf(where, "[%zu]", idx++);
        }
        if (api_find_nul(val.p, val.n, where, depth + 1))
            return true;
    }
    where->len = mark;
    return false;
}

bool esmd_api_json_find_nul(const char *s, size_t len, const char *prefix, struct esmd_buf *where)
{
    while (len > 0 && (*s == ' ' || *s == '\t' || *s == '\n' || *s == '\r')) {
        s++;
        len--;
    }
    esmd_buf_reset(where);
    esmd_buf_puts(where, prefix);
    if (api_find_nul(s, len, where, 0)) {
        esmd_buf_cstr(where);
        return true;
    }
    esmd_buf_reset(where);
    return false;
}

cJSON *esmd_api_parse_object(const char *body, size_t len, bool empty_ok, struct esmd_api_err *e)
{
    struct esmd_buf where = ESMD_BUF_INIT;
    const char *why;
    cJSON *root;

    if (len == 0 && empty_ok)
        return cJSON_CreateObject();
    if ((why = esmd_api_json_check(body, len)) != NULL) {
        esmd_api_err_set(e, 400, "InvalidRequestContentException",
                         "Could not parse request body into json: %s", why);
        return NULL;
    }
    root = cJSON_ParseWithLength(body, len);
    if (!cJSON_IsObject(root)) {
        cJSON_Delete(root);
        esmd_api_err_set(e, 400, "InvalidRequestContentException",
                         "Could not parse request body into json: expected a JSON object");
        return NULL;
    }
    if (esmd_api_json_find_nul(body, len, "", &where)) {
        cJSON_Delete(root);
        esmd_api_err_bad(e, "%.200s must not contain a NUL character (\\u0000)",
                         esmd_buf_cstr(&where));
        esmd_buf_free(&where);
        return NULL;
    }
    esmd_buf_free(&where);
    return root;
}

cJSON *esmd_api_body_object(struct esmd_api_call *call, bool empty_ok)
{
    size_t len;
    const char *body = esmd_http_req_body(call->req, &len);
    struct esmd_api_err e;
    cJSON *root = esmd_api_parse_object(body, len, empty_ok, &e);

    if (root == NULL)
        esmd_api_answer_err(call, &e);
    return root;
}

/* ---- paths ---- */

int esmd_api_path_parse(const char *raw, struct esmd_api_path *p)
{
    const char *s, *end;
    size_t len;
    char *o;
    int rc = ESMD_OK;

    memset(p, 0, sizeof(*p));
    if (*raw == '/')
        raw++;
    len = strlen(raw);
    if (len > 0 && raw[len - 1] == '/')
        len--; /* one trailing '/' */
    p->buf = o = esmd_xmalloc(len + 1);
    for (s = raw, end = raw + len; len > 0;) {
        const char *slash = memchr(s, '/', (size_t)(end - s));
        const char *segend = slash ? slash : end;

        if (p->n == ESMD_API_MAX_SEGMENTS) {
            rc = ESMD_ETOOBIG;
            break;
        }
        p->seg[p->n++] = o;
        for (; s < segend && rc == ESMD_OK; s++) {
            int hi = -1, lo = -1;

            if (*s == '%' && segend - s >= 3)
                hi = esmd_hex_digit(s[1]), lo = esmd_hex_digit(s[2]);
            if (hi < 0 || lo < 0) {
                *o++ = *s;
            } else if (hi == 0 && lo == 0) {
                rc = ESMD_EINVAL;
            } else if ((*o++ = (char)(hi << 4 | lo)) == '/') {
                rc = ESMD_EINVAL;
            } else {
                s += 2;
            }
        }
        *o++ = '\0';
        if (rc != ESMD_OK || slash == NULL)
            break;
        s = slash + 1;
    }
    if (rc != ESMD_OK)
        esmd_api_path_free(p);
    return rc;
}

void esmd_api_path_free(struct esmd_api_path *p)
{
    free(p->buf);
    memset(p, 0, sizeof(*p));
}

bool esmd_api_path_split(struct esmd_api_call *call, struct esmd_api_path *p)
{
    int rc = esmd_api_path_parse(esmd_http_req_raw_path(call->req), p);

    if (rc == ESMD_EINVAL)
        esmd_api_bad(call, "the path holds an encoded '/' (%%2F) or NUL (%%00) in a segment");
    else if (rc != ESMD_OK)
        esmd_api_error(call, 404, "ResourceNotFoundException", "no route for %s %s",
                       esmd_http_req_method(call->req), esmd_http_req_path(call->req));
    return rc == ESMD_OK;
}
