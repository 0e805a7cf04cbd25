/* Trace context: parsing, checking and converting trace headers (include/esmd/trace.h). */
#include "esmd/trace.h"

#include <stdio.h>
#include <string.h>
#include <strings.h>

static bool lower_hex(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f')))
            return false;
    return true;
}

static bool any_hex(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (esmd_hex_digit((unsigned char)s[i]) < 0)
            return false;
    return true;
}

static bool all_zero(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (s[i] != '0')
            return false;
    return true;
}

/* Printable ASCII, no control bytes: safe as an HTTP header value and a JSON string. */
static bool printable(const char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if ((unsigned char)s[i] < 0x20 || (unsigned char)s[i] > 0x7e)
            return false;
    return true;
}

/* W3C Trace Context, level 1: version 00 is exactly 55 characters; a later version (not ff)
 * starts with the same four fields and may have more after a '-'. Only the four fields are
 * kept (as version 00 would be). */
static bool traceparent_ok(const char *s, size_t n)
{
    if (n < 55 || !lower_hex(s, 2) || s[2] != '-' || !lower_hex(s + 3, 32) || s[35] != '-' ||
        !lower_hex(s + 36, 16) || s[52] != '-' || !lower_hex(s + 53, 2))
        return false;
    if (memcmp(s, "ff", 2) == 0 || all_zero(s + 3, 32) || all_zero(s + 36, 16))
        return false;
    if (memcmp(s, "00", 2) == 0)
        return n == 55;
    return n == 55 || s[55] == '-';
}

/* The value of key ("Root", "Parent", "Sampled") in "Root=..;Parent=..;Sampled=1": *len bytes at
 * the returned pointer, NULL when absent. */
static const char *xray_field(const char *s, size_t n, const char *key, size_t *len)
{
    size_t kl = strlen(key);
    size_t i = 0;
    while (i < n) {
        while (i < n && s[i] == ' ')
            i++;
        size_t end = i;
        while (end < n && s[end] != ';')
            end++;
        if (end - i > kl && strncasecmp(s + i, key, kl) == 0 && s[i + kl] == '=') {
            *len = end - i - kl - 1;
            return s + i + kl + 1;
        }
        i = end + 1;
    }
    return NULL;
}

/* X-Ray's root: "1-" 8 hex (epoch seconds) "-" 24 hex. */
static bool xray_root_ok(const char *r, size_t n)
{
    return n == 35 && r[0] == '1' && r[1] == '-' && any_hex(r + 2, 8) && r[10] == '-' &&
           any_hex(r + 11, 24) && !(all_zero(r + 2, 8) && all_zero(r + 11, 24));
}

static bool xray_ok(const char *s, size_t n)
{
    size_t rl;
    const char *root = xray_field(s, n, "Root", &rl);
    return n <= ESMD_XRAY_MAX && printable(s, n) && root && xray_root_ok(root, rl);
}

static void copy(char *dst, size_t cap, const char *s, size_t n)
{
    if (n >= cap)
        n = cap - 1;
    memcpy(dst, s, n);
    dst[n] = '\0';
}

bool esmd_trace_set(struct esmd_trace *t, const char *name, const char *value, size_t len)
{
    if (!name || !value)
        return false;
    if (strcasecmp(name, ESMD_TRACE_TRACEPARENT) == 0) {
        if (!traceparent_ok(value, len))
            return false;
        copy(t->traceparent, sizeof(t->traceparent), value, 55);
        return true;
    }
    if (strcasecmp(name, ESMD_TRACE_TRACESTATE) == 0) {
        if (len == 0 || len > ESMD_TRACESTATE_MAX || !printable(value, len))
            return false;
        copy(t->tracestate, sizeof(t->tracestate), value, len);
        return true;
    }
    if (strcasecmp(name, ESMD_TRACE_XRAY) == 0) {
        if (!xray_ok(value, len))
            return false;
        copy(t->xray, sizeof(t->xray), value, len);
        return true;
    }
    return false;
}

static void lower(char *s, size_t n)
{
    for (size_t i = 0; i < n; i++)
        if (s[i] >= 'A' && s[i] <= 'F')
            s[i] = (char)(s[i] - 'A' + 'a');
}

void esmd_trace_complete(struct esmd_trace *t)
{
    if (t->traceparent[0] && !t->xray[0]) {
        const char *p = t->traceparent;
        int sampled = esmd_hex_digit((unsigned char)p[54]) & 1;
        snprintf(t->xray, sizeof(t->xray), "Root=1-%.8s-%.24s;Parent=%.16s;Sampled=%d", p + 3,
                 p + 11, p + 36, sampled);
    } else if (t->xray[0] && !t->traceparent[0]) {
        size_t n = strlen(t->xray), rl, pl, sl = 0;
        const char *root = xray_field(t->xray, n, "Root", &rl);
        const char *parent = xray_field(t->xray, n, "Parent", &pl);
        const char *sampled = xray_field(t->xray, n, "Sampled", &sl);
        if (root && xray_root_ok(root, rl) && parent && pl == 16 && any_hex(parent, 16) &&
            !all_zero(parent, 16)) {
            snprintf(t->traceparent, sizeof(t->traceparent), "00-%.8s%.24s-%.16s-%s", root + 2,
                     root + 11, parent, sampled && sl == 1 && sampled[0] == '1' ? "01" : "00");
            lower(t->traceparent, 55);
        }
    }
    if (!t->traceparent[0])
        t->tracestate[0] = '\0';
}

bool esmd_trace_id(const struct esmd_trace *t, char out[ESMD_TRACE_ID_LEN + 1])
{
    out[0] = '\0';
    if (t->traceparent[0]) {
        memcpy(out, t->traceparent + 3, 32);
        out[32] = '\0';
        return true;
    }
    if (t->xray[0]) {
        size_t rl;
        const char *root = xray_field(t->xray, strlen(t->xray), "Root", &rl);
        if (root && xray_root_ok(root, rl)) {
            memcpy(out, root + 2, 8);
            memcpy(out + 8, root + 11, 24);
            out[32] = '\0';
            lower(out, 32);
            return true;
        }
    }
    return false;
}
