/* UTF-8 and JSON validation without allocation. See include/esmd/json.h. */
#include "esmd/json.h"

#include <stdint.h>
#include <string.h>

size_t esmd_utf8_decode(const unsigned char *s, size_t n, uint32_t *out)
{
    unsigned char c = s[0];
    if (c < 0x80) {
        if (out)
            *out = c;
        return 1;
    }
    size_t len;
    uint32_t cp;
    if (c >= 0xC2 && c <= 0xDF) {
        len = 2;
        cp = c & 0x1F;
    } else if (c >= 0xE0 && c <= 0xEF) {
        len = 3;
        cp = c & 0x0F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        len = 4;
        cp = c & 0x07;
    } else {
        return 0;
    }
    if (n < len)
        return 0;
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80)
            return 0;
        cp = (cp << 6) | (s[i] & 0x3F);
    }
    if ((len == 3 && cp < 0x800) || (len == 4 && (cp < 0x10000 || cp > 0x10FFFF)) ||
        (cp >= 0xD800 && cp <= 0xDFFF))
        return 0;
    if (out)
        *out = cp;
    return len;
}

size_t esmd_utf8_seq(const unsigned char *s, size_t n)
{
    return esmd_utf8_decode(s, n, NULL);
}

bool esmd_utf8_valid(const char *str, size_t len)
{
    const unsigned char *s = (const unsigned char *)str;
    size_t i = 0;
    while (i < len) {
        if (s[i] < 0x80) {
            i++;
            continue;
        }
        size_t n = esmd_utf8_seq(s + i, len - i);
        if (n == 0)
            return false;
        i += n;
    }
    return true;
}

struct scan {
    const unsigned char *s;
    size_t len, i;
};

static void skip_ws(struct scan *sc)
{
    while (sc->i < sc->len && (sc->s[sc->i] == ' ' || sc->s[sc->i] == '\t' ||
                               sc->s[sc->i] == '\n' || sc->s[sc->i] == '\r'))
        sc->i++;
}

static bool is_hex(unsigned char c)
{
    return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'f') || (c >= 'A' && c <= 'F');
}

/* At the opening quote. */
static bool scan_string(struct scan *sc)
{
    sc->i++;
    while (sc->i < sc->len) {
        unsigned char c = sc->s[sc->i];
        if (c == '"') {
            sc->i++;
            return true;
        }
        if (c < 0x20)
            return false;
        if (c == '\\') {
            if (++sc->i >= sc->len)
                return false;
            c = sc->s[sc->i];
            if (c == 'u') {
                if (sc->len - sc->i < 5)
                    return false;
                for (int k = 1; k <= 4; k++)
                    if (!is_hex(sc->s[sc->i + k]))
                        return false;
                sc->i += 5;
            } else if (c == '"' || c == '\\' || c == '/' || c == 'b' || c == 'f' || c == 'n' ||
                       c == 'r' || c == 't') {
                sc->i++;
            } else {
                return false;
            }
            continue;
        }
        if (c < 0x80) {
            sc->i++;
            continue;
        }
        size_t n = esmd_utf8_seq(sc->s + sc->i, sc->len - sc->i);
        if (n == 0)
            return false;
        sc->i += n;
    }
    return false;
}

static bool digits(struct scan *sc)
{
    size_t start = sc->i;
    while (sc->i < sc->len && sc->s[sc->i] >= '0' && sc->s[sc->i] <= '9')
        sc->i++;
    return sc->i > start;
}

static bool scan_number(struct scan *sc)
{
    if (sc->s[sc->i] == '-')
        sc->i++;
    if (sc->i >= sc->len)
        return false;
    if (sc->s[sc->i] == '0')
        sc->i++;
    else if (!digits(sc))
        return false;
    if (sc->i < sc->len && sc->s[sc->i] == '.') {
        sc->i++;
        if (!digits(sc))
            return false;
    }
    if (sc->i < sc->len && (sc->s[sc->i] == 'e' || sc->s[sc->i] == 'E')) {
        sc->i++;
        if (sc->i < sc->len && (sc->s[sc->i] == '+' || sc->s[sc->i] == '-'))
            sc->i++;
        if (!digits(sc))
            return false;
    }
    return true;
}

static bool scan_literal(struct scan *sc, const char *lit, size_t n)
{
    if (sc->len - sc->i < n)
        return false;
    for (size_t k = 0; k < n; k++)
        if (sc->s[sc->i + k] != (unsigned char)lit[k])
            return false;
    sc->i += n;
    return true;
}

/* One scalar value, or false. Containers are handled by the caller's loop. */
static bool scan_scalar(struct scan *sc)
{
    switch (sc->s[sc->i]) {
    case '"':
        return scan_string(sc);
    case 't':
        return scan_literal(sc, "true", 4);
    case 'f':
        return scan_literal(sc, "false", 5);
    case 'n':
        return scan_literal(sc, "null", 4);
    default:
        return scan_number(sc);
    }
}

/* One value at sc->i, and the whitespace after it; false when it is not valid JSON. */
static bool scan_value(struct scan *sc)
{
    /* stack[d] is the container at depth d: '{' or '['. */
    char stack[ESMD_JSON_MAX_DEPTH];
    int depth = 0;
    for (;;) {
        /* expecting a value */
        if (sc->i >= sc->len)
            return false;
        unsigned char c = sc->s[sc->i];
        if (c == '{' || c == '[') {
            if (depth == ESMD_JSON_MAX_DEPTH)
                return false;
            stack[depth++] = (char)c;
            sc->i++;
            skip_ws(sc);
            if (sc->i < sc->len && sc->s[sc->i] == (c == '{' ? '}' : ']')) {
                sc->i++;
                depth--;
                goto after_value;
            }
            if (c == '{')
                goto object_key;
            continue;
        }
        if (!scan_scalar(sc))
            return false;
    after_value:
        skip_ws(sc);
        if (depth == 0)
            return true;
        if (sc->i >= sc->len)
            return false;
        c = sc->s[sc->i++];
        if (c == ',') {
            skip_ws(sc);
            if (stack[depth - 1] == '{')
                goto object_key;
            continue;
        }
        if (c != (stack[depth - 1] == '{' ? '}' : ']'))
            return false;
        depth--;
        goto after_value;
    object_key:
        if (sc->i >= sc->len || sc->s[sc->i] != '"' || !scan_string(sc))
            return false;
        skip_ws(sc);
        if (sc->i >= sc->len || sc->s[sc->i] != ':')
            return false;
        sc->i++;
        skip_ws(sc);
    }
}

/* On the batch-encoding path: everything it calls is inlined into it (flatten), the scanner
 * in registers, whatever esmd_json_next() makes the compiler choose for the shared pieces. */
__attribute__((flatten)) bool esmd_json_valid(const char *str, size_t len)
{
    struct scan sc = {(const unsigned char *)str, len, 0};
    skip_ws(&sc);
    return scan_value(&sc) && sc.i == sc.len;
}

bool esmd_json_next(const char *s, size_t len, size_t *pos, struct esmd_json_span *key,
                    struct esmd_json_span *val)
{
    struct scan sc = {(const unsigned char *)s, len, *pos};
    skip_ws(&sc);
    if (sc.i < sc.len && (sc.s[sc.i] == '{' || sc.s[sc.i] == '[' || sc.s[sc.i] == ','))
        sc.i++;
    skip_ws(&sc);
    if (sc.i >= sc.len || sc.s[sc.i] == '}' || sc.s[sc.i] == ']')
        return false;
    if (key != NULL) {
        key->p = s + sc.i;
        if (sc.s[sc.i] != '"' || !scan_string(&sc))
            return false;
        key->n = (size_t)(s + sc.i - key->p);
        skip_ws(&sc);
        if (sc.i >= sc.len || sc.s[sc.i] != ':')
            return false;
        sc.i++;
        skip_ws(&sc);
    }
    if (sc.i >= sc.len)
        return false;
    val->p = s + sc.i;
    if (!scan_value(&sc))
        return false;
    val->n = (size_t)(s + sc.i - val->p);
    while (val->n > 0 && (val->p[val->n - 1] == ' ' || val->p[val->n - 1] == '\t' ||
                          val->p[val->n - 1] == '\n' || val->p[val->n - 1] == '\r'))
        val->n--;
    *pos = sc.i;
    return true;
}

bool esmd_json_key_is(const struct esmd_json_span *key, const char *name)
{
    size_t n = strlen(name);

    return key->n == n + 2 && memcmp(key->p + 1, name, n) == 0;
}
