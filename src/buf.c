/* Growable buffer and the JSON / base64 writers. */
#include "esmd/buf.h"
#include "esmd/json.h"

#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void esmd_buf_init(struct esmd_buf *b)
{
    b->data = NULL;
    b->len = b->cap = 0;
}

void esmd_buf_free(struct esmd_buf *b)
{
    free(b->data);
    esmd_buf_init(b);
}

void esmd_buf_reset(struct esmd_buf *b)
{
    b->len = 0;
}

void esmd_buf_reserve(struct esmd_buf *b, size_t extra)
{
    size_t need = b->len + extra + 1;
    if (need <= b->cap)
        return;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < need)
        cap *= 2;
    b->data = esmd_xrealloc(b->data, cap);
    b->cap = cap;
}

void esmd_buf_append(struct esmd_buf *b, const void *p, size_t n)
{
    if (n == 0)
        return;
    esmd_buf_reserve(b, n);
    memcpy(b->data + b->len, p, n);
    b->len += n;
}

void esmd_buf_puts(struct esmd_buf *b, const char *s)
{
    esmd_buf_append(b, s, strlen(s));
}

void esmd_buf_putc(struct esmd_buf *b, char c)
{
    esmd_buf_reserve(b, 1);
    b->data[b->len++] = c;
}

void esmd_buf_printf(struct esmd_buf *b, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    va_list ap2;
    va_copy(ap2, ap);
    int n = vsnprintf(NULL, 0, fmt, ap);
    va_end(ap);
    if (n > 0) {
        esmd_buf_reserve(b, (size_t)n);
        vsnprintf(b->data + b->len, (size_t)n + 1, fmt, ap2);
        b->len += (size_t)n;
    }
    va_end(ap2);
}

size_t esmd_i64_len(int64_t v)
{
    size_t n = 1;
    uint64_t u;
    if (v < 0) {
        n++;
        u = (uint64_t)(-(v + 1)) + 1;
    } else {
        u = (uint64_t)v;
    }
    while (u >= 10) {
        u /= 10;
        n++;
    }
    return n;
}

void esmd_buf_put_i64(struct esmd_buf *b, int64_t v)
{
    char tmp[24];
    size_t n = esmd_i64_len(v);
    uint64_t u = v < 0 ? (uint64_t)(-(v + 1)) + 1 : (uint64_t)v;
    size_t i = n;
    do {
        tmp[--i] = (char)('0' + u % 10);
        u /= 10;
    } while (u);
    if (v < 0)
        tmp[0] = '-';
    esmd_buf_append(b, tmp, n);
}

const char *esmd_buf_cstr(struct esmd_buf *b)
{
    esmd_buf_reserve(b, 0);
    b->data[b->len] = '\0';
    return b->data;
}

char *esmd_buf_steal(struct esmd_buf *b, size_t *len)
{
    esmd_buf_cstr(b);
    char *p = b->data;
    if (len)
        *len = b->len;
    esmd_buf_init(b);
    return p;
}

/* Bytes written for one input position; *adv gets the input bytes consumed. */
static size_t json_char_len(const unsigned char *s, size_t n, size_t *adv)
{
    unsigned char c = s[0];
    if (c == '"' || c == '\\' || c == '\b' || c == '\f' || c == '\n' || c == '\r' || c == '\t') {
        *adv = 1;
        return 2;
    }
    if (c < 0x20) {
        *adv = 1;
        return 6;
    }
    size_t l = esmd_utf8_seq(s, n);
    if (l == 0) {
        *adv = 1;
        return 3; /* U+FFFD as UTF-8 */
    }
    *adv = l;
    return l;
}

void esmd_buf_put_text(struct esmd_buf *b, const char *s, size_t n)
{
    const unsigned char *p = (const unsigned char *)s;
    size_t i = 0, from = 0;
    while (i < n) {
        size_t l = p[i] == 0 ? 0 : esmd_utf8_seq(p + i, n - i);
        if (l > 0) {
            i += l;
            continue;
        }
        esmd_buf_append(b, s + from, i - from);
        esmd_buf_append(b, "\xEF\xBF\xBD", 3); /* U+FFFD */
        from = ++i;
    }
    esmd_buf_append(b, s + from, n - from);
}

size_t esmd_json_string_len(const char *s, size_t n)
{
    const unsigned char *p = (const unsigned char *)s;
    size_t out = 2, i = 0;
    while (i < n) {
        unsigned char c = p[i];
        if (c >= 0x20 && c < 0x80 && c != '"' && c != '\\') {
            out++;
            i++;
            continue;
        }
        size_t adv;
        out += json_char_len(p + i, n - i, &adv);
        i += adv;
    }
    return out;
}

void esmd_buf_put_json_string(struct esmd_buf *b, const char *s, size_t n)
{
    static const char hex[] = "0123456789abcdef";
    const unsigned char *p = (const unsigned char *)s;
    esmd_buf_reserve(b, n + 2);
    esmd_buf_putc(b, '"');
    size_t i = 0;
    while (i < n) {
        /* copy the longest run of plain ASCII at once */
        size_t j = i;
        while (j < n && p[j] >= 0x20 && p[j] < 0x80 && p[j] != '"' && p[j] != '\\')
            j++;
        if (j > i) {
            esmd_buf_append(b, p + i, j - i);
            i = j;
            if (i >= n)
                break;
        }
        unsigned char c = p[i];
        switch (c) {
        case '"':
            esmd_buf_append(b, "\\\"", 2);
            i++;
            continue;
        case '\\':
            esmd_buf_append(b, "\\\\", 2);
            i++;
            continue;
        case '\b':
            esmd_buf_append(b, "\\b", 2);
            i++;
            continue;
        case '\f':
            esmd_buf_append(b, "\\f", 2);
            i++;
            continue;
        case '\n':
            esmd_buf_append(b, "\\n", 2);
            i++;
            continue;
        case '\r':
            esmd_buf_append(b, "\\r", 2);
            i++;
            continue;
        case '\t':
            esmd_buf_append(b, "\\t", 2);
            i++;
            continue;
        default:
            break;
        }
        if (c < 0x20) {
            char u[6] = {'\\', 'u', '0', '0', hex[c >> 4], hex[c & 15]};
            esmd_buf_append(b, u, 6);
            i++;
            continue;
        }
        size_t l = esmd_utf8_seq(p + i, n - i);
        if (l == 0) {
            esmd_buf_append(b, "\xef\xbf\xbd", 3);
            i++;
        } else {
            esmd_buf_append(b, p + i, l);
            i += l;
        }
    }
    esmd_buf_putc(b, '"');
}

size_t esmd_base64_len(size_t n)
{
    return (n + 2) / 3 * 4;
}

void esmd_buf_put_base64(struct esmd_buf *b, const void *p, size_t n)
{
    static const char tbl[] = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    const unsigned char *s = p;
    size_t outlen = esmd_base64_len(n);
    esmd_buf_reserve(b, outlen);
    char *o = b->data + b->len;
    size_t i = 0;
    for (; i + 3 <= n; i += 3) {
        uint32_t v = (uint32_t)s[i] << 16 | (uint32_t)s[i + 1] << 8 | s[i + 2];
        *o++ = tbl[v >> 18];
        *o++ = tbl[(v >> 12) & 63];
        *o++ = tbl[(v >> 6) & 63];
        *o++ = tbl[v & 63];
    }
    if (i < n) {
        uint32_t v = (uint32_t)s[i] << 16;
        if (i + 1 < n)
            v |= (uint32_t)s[i + 1] << 8;
        *o++ = tbl[v >> 18];
        *o++ = tbl[(v >> 12) & 63];
        *o++ = i + 1 < n ? tbl[(v >> 6) & 63] : '=';
        *o++ = '=';
    }
    b->len += outlen;
}

static int b64val(unsigned char c)
{
    if (c >= 'A' && c <= 'Z')
        return c - 'A';
    if (c >= 'a' && c <= 'z')
        return c - 'a' + 26;
    if (c >= '0' && c <= '9')
        return c - '0' + 52;
    if (c == '+')
        return 62;
    if (c == '/')
        return 63;
    return -1;
}

int esmd_base64_decode(const char *s, size_t n, struct esmd_buf *out)
{
    while (n > 0 && s[n - 1] == '=')
        n--;
    if (n % 4 == 1)
        return ESMD_EINVAL;
    esmd_buf_reserve(out, n / 4 * 3 + 3);
    uint32_t acc = 0;
    int bits = 0;
    for (size_t i = 0; i < n; i++) {
        int v = b64val((unsigned char)s[i]);
        if (v < 0)
            return ESMD_EINVAL;
        acc = (acc << 6) | (uint32_t)v;
        bits += 6;
        if (bits >= 8) {
            bits -= 8;
            esmd_buf_putc(out, (char)((acc >> bits) & 0xff));
        }
    }
    return ESMD_OK;
}
