/* The filter's pattern parser: pattern text (JSON) -> a tree that keeps byte offsets -> checked
 * operators -> alternatives, the conjunctions "$or" expands to (filter_internal.h). Every error
 * says what is wrong and where; nothing here touches a matcher. */
#include "filter_internal.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------------------------------ */
/* Compile: arena and pattern parser                                                          */

static void *arena_alloc(struct arena *a, size_t n)
{
    n = (n + 15) & ~(size_t)15;
    struct chunk *c = a->head;
    if (!c || c->cap - c->used < n) {
        size_t cap = n > 16384 ? n : 16384;
        c = esmd_xmalloc(sizeof(*c) + cap);
        c->next = a->head;
        c->used = 0;
        c->cap = cap;
        a->head = c;
    }
    void *p = (char *)c->data + c->used;
    c->used += n;
    return p;
}

static void arena_free(struct arena *a)
{
    while (a->head) {
        struct chunk *next = a->head->next;
        free(a->head);
        a->head = next;
    }
}

enum { J_NULL, J_FALSE, J_TRUE, J_NUM, J_STR, J_ARR, J_OBJ };

struct jmem;

struct jv {
    int type;
    size_t off; /* where the value starts in the pattern text */
    const char *s;
    size_t len; /* J_STR: decoded bytes */
    double num;
    struct jv **items; /* J_ARR */
    struct jmem *mems; /* J_OBJ */
    size_t n;
};

struct jmem {
    const char *key;
    size_t klen, koff;
    struct jv *val;
};

struct cctx {
    const char *text;
    size_t len, pos;
    struct fp_pattern *pat; /* its arena holds the tree; its conds list grows */
    struct esmd_filter_error *err;
    bool failed;
    const char *const *skip;
};

static void fail(struct cctx *cx, size_t off, const char *fmt, ...) ESMD_PRINTF(3, 4);

static void fail_at(struct esmd_filter_error *err, const char *text, size_t len, size_t off,
                    const char *fmt, va_list ap) ESMD_PRINTF(5, 0);

static void fail_at(struct esmd_filter_error *err, const char *text, size_t len, size_t off,
                    const char *fmt, va_list ap)
{
    vsnprintf(err->message, sizeof(err->message), fmt, ap);
    if (off > len)
        off = len;
    int line = 1;
    size_t bol = 0;
    for (size_t i = 0; i < off; i++) {
        if (text[i] == '\n') {
            line++;
            bol = i + 1;
        }
    }
    err->offset = off;
    err->line = line;
    err->column = (int)(off - bol) + 1;
}

void esmd_filter_fail(struct esmd_filter_error *err, const char *text, size_t len, size_t off,
                      const char *fmt, ...)
{
    if (!err)
        return;
    va_list ap;
    va_start(ap, fmt);
    fail_at(err, text, len, off, fmt, ap);
    va_end(ap);
}

static void fail(struct cctx *cx, size_t off, const char *fmt, ...)
{
    if (cx->failed)
        return;
    cx->failed = true;
    if (!cx->err)
        return;
    va_list ap;
    va_start(ap, fmt);
    fail_at(cx->err, cx->text, cx->len, off, fmt, ap);
    va_end(ap);
}

static const char *type_name(const struct jv *v)
{
    switch (v->type) {
    case J_NULL:
        return "null";
    case J_FALSE:
    case J_TRUE:
        return "a boolean";
    case J_NUM:
        return "a number";
    case J_STR:
        return "a string";
    case J_ARR:
        return "an array";
    default:
        return "an object";
    }
}

static void jp_ws(struct cctx *cx)
{
    while (cx->pos < cx->len) {
        char c = cx->text[cx->pos];
        if (c != ' ' && c != '\t' && c != '\n' && c != '\r')
            break;
        cx->pos++;
    }
}

static void fail_unexpected(struct cctx *cx)
{
    if (cx->pos >= cx->len) {
        fail(cx, cx->len, "invalid JSON: unexpected end of input");
        return;
    }
    unsigned char c = (unsigned char)cx->text[cx->pos];
    if (c >= 0x20 && c < 0x7F)
        fail(cx, cx->pos, "invalid JSON: unexpected character '%c'", c);
    else
        fail(cx, cx->pos, "invalid JSON: unexpected byte 0x%02X", c);
}

/* At the opening quote: checks and decodes a string into the arena. */
static bool jp_string(struct cctx *cx, const char **out, size_t *outlen)
{
    size_t start = cx->pos + 1, i = start;
    while (i < cx->len) {
        unsigned char c = (unsigned char)cx->text[i];
        if (c == '"')
            break;
        if (c < 0x20) {
            fail(cx, i, "invalid JSON: control character in a string");
            return false;
        }
        if (c == '\\') {
            if (i + 1 >= cx->len)
                break;
            char e = cx->text[i + 1];
            if (e == 'u') {
                for (size_t k = 2; k < 6; k++) {
                    if (i + k >= cx->len || esmd_hex_digit((unsigned char)cx->text[i + k]) < 0) {
                        fail(cx, i, "invalid JSON: \\u must be followed by 4 hex digits");
                        return false;
                    }
                }
                i += 6;
                continue;
            }
            if (!strchr("\"\\/bfnrt", e) || e == '\0') {
                fail(cx, i, "invalid JSON: invalid escape sequence in a string");
                return false;
            }
            i += 2;
            continue;
        }
        i++;
    }
    if (i >= cx->len) {
        fail(cx, cx->pos, "invalid JSON: unterminated string");
        return false;
    }
    char *buf = arena_alloc(&cx->pat->arena, i - start + 1);
    *outlen = esmd_filter_unescape(cx->text + start, i - start, buf);
    buf[*outlen] = '\0';
    *out = buf;
    cx->pos = i + 1;
    return true;
}

static struct jv *jp_value(struct cctx *cx, int depth);

static struct jv *jv_new(struct cctx *cx, int type)
{
    struct jv *v = arena_alloc(&cx->pat->arena, sizeof(*v));
    memset(v, 0, sizeof(*v));
    v->type = type;
    v->off = cx->pos;
    return v;
}

static struct jv *jp_object(struct cctx *cx, int depth)
{
    struct jv *v = jv_new(cx, J_OBJ);
    size_t cap = 0;
    struct jmem *mems = NULL;
    cx->pos++;
    jp_ws(cx);
    if (cx->pos < cx->len && cx->text[cx->pos] == '}') {
        cx->pos++;
        return v;
    }
    for (;;) {
        jp_ws(cx);
        if (cx->pos >= cx->len || cx->text[cx->pos] != '"') {
            if (cx->pos >= cx->len)
                fail_unexpected(cx);
            else
                fail(cx, cx->pos, "invalid JSON: expected a string key");
            goto fail;
        }
        struct jmem m = {.koff = cx->pos};
        if (!jp_string(cx, &m.key, &m.klen))
            goto fail;
        jp_ws(cx);
        if (cx->pos >= cx->len || cx->text[cx->pos] != ':') {
            if (cx->pos >= cx->len)
                fail_unexpected(cx);
            else
                fail(cx, cx->pos, "invalid JSON: expected ':' after an object key");
            goto fail;
        }
        cx->pos++;
        m.val = jp_value(cx, depth + 1);
        if (!m.val)
            goto fail;
        if (v->n == cap) {
            cap = cap ? cap * 2 : 8;
            mems = esmd_xrealloc(mems, cap * sizeof(*mems));
        }
        mems[v->n++] = m;
        jp_ws(cx);
        if (cx->pos < cx->len && cx->text[cx->pos] == ',') {
            cx->pos++;
            continue;
        }
        if (cx->pos < cx->len && cx->text[cx->pos] == '}') {
            cx->pos++;
            break;
        }
        if (cx->pos >= cx->len)
            fail_unexpected(cx);
        else
            fail(cx, cx->pos, "invalid JSON: expected ',' or '}' after an object member");
        goto fail;
    }
    v->mems = arena_alloc(&cx->pat->arena, v->n * sizeof(*mems));
    memcpy(v->mems, mems, v->n * sizeof(*mems));
    free(mems);
    return v;
fail:
    free(mems);
    return NULL;
}

static struct jv *jp_array(struct cctx *cx, int depth)
{
    struct jv *v = jv_new(cx, J_ARR);
    size_t cap = 0;
    struct jv **items = NULL;
    cx->pos++;
    jp_ws(cx);
    if (cx->pos < cx->len && cx->text[cx->pos] == ']') {
        cx->pos++;
        return v;
    }
    for (;;) {
        struct jv *item = jp_value(cx, depth + 1);
        if (!item)
            goto fail;
        if (v->n == cap) {
            cap = cap ? cap * 2 : 8;
            items = esmd_xrealloc(items, cap * sizeof(*items));
        }
        items[v->n++] = item;
        jp_ws(cx);
        if (cx->pos < cx->len && cx->text[cx->pos] == ',') {
            cx->pos++;
            continue;
        }
        if (cx->pos < cx->len && cx->text[cx->pos] == ']') {
            cx->pos++;
            break;
        }
        if (cx->pos >= cx->len)
            fail_unexpected(cx);
        else
            fail(cx, cx->pos, "invalid JSON: expected ',' or ']' after an array element");
        goto fail;
    }
    v->items = arena_alloc(&cx->pat->arena, v->n * sizeof(*items));
    memcpy(v->items, items, v->n * sizeof(*items));
    free(items);
    return v;
fail:
    free(items);
    return NULL;
}

static struct jv *jp_value(struct cctx *cx, int depth)
{
    jp_ws(cx);
    if (cx->pos >= cx->len) {
        fail_unexpected(cx);
        return NULL;
    }
    const char *p = cx->text + cx->pos;
    size_t left = cx->len - cx->pos;
    switch (*p) {
    case '{':
    case '[':
        if (depth >= MAX_DEPTH) {
            fail(cx, cx->pos, "invalid JSON: nested deeper than %d levels", MAX_DEPTH);
            return NULL;
        }
        return *p == '{' ? jp_object(cx, depth) : jp_array(cx, depth);
    case '"': {
        struct jv *v = jv_new(cx, J_STR);
        return jp_string(cx, &v->s, &v->len) ? v : NULL;
    }
    case 't':
    case 'f':
    case 'n': {
        static const char *const lit[] = {"true", "false", "null"};
        static const int type[] = {J_TRUE, J_FALSE, J_NULL};
        int k = *p == 't' ? 0 : *p == 'f' ? 1 : 2;
        size_t n = strlen(lit[k]);
        if (left < n || memcmp(p, lit[k], n) != 0) {
            fail(cx, cx->pos, "invalid JSON: invalid literal (expected true, false or null)");
            return NULL;
        }
        struct jv *v = jv_new(cx, type[k]);
        cx->pos += n;
        return v;
    }
    default: {
        const char *e = number_end(p, p + left);
        if (e && e < p + left && ((*e >= '0' && *e <= '9') || *e == '.')) {
            fail(cx, cx->pos, "invalid JSON: invalid number");
            return NULL;
        }
        if (!e) {
            if (*p == '-' || (*p >= '0' && *p <= '9'))
                fail(cx, cx->pos, "invalid JSON: invalid number");
            else
                fail_unexpected(cx);
            return NULL;
        }
        struct jv *v = jv_new(cx, J_NUM);
        size_t n = (size_t)(e - p);
        char *tmp = arena_alloc(&cx->pat->arena, n + 1);
        v->s = p;
        v->len = n;
        v->num = esmd_filter_number(p, n, tmp, n + 1);
        if (!isfinite(v->num)) {
            fail(cx, cx->pos, "number %.*s is out of range", (int)(n > 40 ? 40 : n), p);
            return NULL;
        }
        cx->pos += n;
        return v;
    }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Compile: checking the pattern and expanding "$or"                                          */

#define KEYFMT "%.*s%s"
#define KEYARG(k, n) (int)((n) > 60 ? 60 : (n)), (k), ((n) > 60 ? "..." : "")

static bool str_is(const char *s, size_t n, const char *lit)
{
    return n == strlen(lit) && memcmp(s, lit, n) == 0;
}

static const char *fold_arena(struct cctx *cx, const char *s, size_t n, size_t *outlen)
{
    char *buf = arena_alloc(&cx->pat->arena, 2 * n + 1);
    *outlen = esmd_filter_fold(s, n, buf);
    return buf;
}

static bool compile_wild(struct cctx *cx, const struct jv *v, const char *op, struct pm *m)
{
    size_t n = v->len, nstars = 0;
    for (size_t i = 0; i < n; i++)
        nstars += v->s[i] == '*';
    char *buf = arena_alloc(&cx->pat->arena, n + 1);
    m->kind = M_WILD;
    m->segs = arena_alloc(&cx->pat->arena, (nstars + 1) * sizeof(*m->segs));
    m->seglens = arena_alloc(&cx->pat->arena, (nstars + 1) * sizeof(*m->seglens));
    m->nsegs = 0;
    size_t o = 0, segstart = 0;
    bool star_before = false;
    for (size_t i = 0; i < n; i++) {
        char c = v->s[i];
        if (c == '\\') {
            if (i + 1 < n && (v->s[i + 1] == '*' || v->s[i + 1] == '\\')) {
                buf[o++] = v->s[++i];
                star_before = false;
                continue;
            }
            fail(cx, v->off, "\"%s\": a backslash must be followed by '*' or '\\'", op);
            return false;
        }
        if (c == '*') {
            if (star_before) {
                fail(cx, v->off, "\"%s\": consecutive '*' characters are not allowed", op);
                return false;
            }
            m->segs[m->nsegs] = buf + segstart;
            m->seglens[m->nsegs++] = o - segstart;
            segstart = o;
            star_before = true;
            continue;
        }
        buf[o++] = c;
        star_before = false;
    }
    m->segs[m->nsegs] = buf + segstart;
    m->seglens[m->nsegs++] = o - segstart;
    return true;
}

static bool compile_cidr(struct cctx *cx, const struct jv *v, struct pm *m)
{
    const char *slash = memchr(v->s, '/', v->len);
    size_t alen = slash ? (size_t)(slash - v->s) : 0;
    int family = slash ? esmd_filter_parse_ip(v->s, alen, m->addr) : 0;
    size_t blen = slash ? v->len - alen - 1 : 0;
    int bits = 0;
    bool ok = family != 0 && blen >= 1 && blen <= 3;
    for (size_t i = 0; ok && i < blen; i++) {
        char c = slash[1 + i];
        ok = c >= '0' && c <= '9' && !(i == 0 && c == '0' && blen > 1);
        bits = bits * 10 + (c - '0');
    }
    if (ok)
        ok = bits <= (family == 4 ? 32 : 128);
    if (!ok) {
        fail(cx, v->off,
             "\"cidr\": invalid CIDR block \"" KEYFMT
             "\" (want ADDRESS/BITS, like \"10.0.0.0/24\")",
             KEYARG(v->s, v->len));
        return false;
    }
    m->kind = M_CIDR;
    m->family = family;
    m->bits = bits;
    int nbytes = family == 4 ? 4 : 16;
    for (int i = 0; i < nbytes; i++) {
        int keep = bits - 8 * i;
        if (keep <= 0)
            m->addr[i] = 0;
        else if (keep < 8)
            m->addr[i] &= (uint8_t)(0xFF << (8 - keep));
    }
    return true;
}

static int numeric_op(const struct jv *v)
{
    static const char *const ops[] = {"=", "<", "<=", ">", ">="};
    if (v->type != J_STR)
        return -1;
    for (int i = 0; i < 5; i++)
        if (str_is(v->s, v->len, ops[i]))
            return i;
    return -1;
}

static bool compile_numeric(struct cctx *cx, const struct jv *v, struct pm *m)
{
    if (v->type != J_ARR) {
        fail(cx, v->off, "\"numeric\" needs an array like [\">\", 0, \"<=\", 5], got %s",
             type_name(v));
        return false;
    }
    if (v->n != 2 && v->n != 4) {
        fail(cx, v->off, "\"numeric\" needs 2 or 4 elements, got %zu", v->n);
        return false;
    }
    int op[2];
    for (size_t i = 0; i < v->n; i += 2) {
        const struct jv *o = v->items[i], *x = v->items[i + 1];
        op[i / 2] = numeric_op(o);
        if (op[i / 2] < 0) {
            if (o->type == J_STR)
                fail(cx, o->off,
                     "\"numeric\": unknown comparison \"" KEYFMT
                     "\" (allowed: \"=\", \"<\", \"<=\", \">\", \">=\")",
                     KEYARG(o->s, o->len));
            else
                fail(cx, o->off,
                     "\"numeric\": expected a comparison (\"=\", \"<\", \"<=\", \">\", \">=\"), "
                     "got %s",
                     type_name(o));
            return false;
        }
        if (x->type != J_NUM) {
            fail(cx, x->off, "\"numeric\": expected a number after \"%.*s\", got %s", (int)o->len,
                 o->s, type_name(x));
            return false;
        }
    }
    m->kind = M_RANGE;
    m->lo = -INFINITY;
    m->hi = INFINITY;
    m->lo_incl = m->hi_incl = false;
    if (v->n == 2) {
        double x = v->items[1]->num;
        switch (op[0]) {
        case 0:
            m->lo = m->hi = x;
            m->lo_incl = m->hi_incl = true;
            break;
        case 1:
        case 2:
            m->hi = x;
            m->hi_incl = op[0] == 2;
            break;
        default:
            m->lo = x;
            m->lo_incl = op[0] == 4;
            break;
        }
        return true;
    }
    if (op[0] < 3 || op[1] == 0 || op[1] > 2) {
        fail(cx, op[0] < 3 ? v->items[0]->off : v->items[2]->off,
             "\"numeric\": a range is a lower bound (\">\" or \">=\") followed by an upper bound "
             "(\"<\" or \"<=\")");
        return false;
    }
    m->lo = v->items[1]->num;
    m->lo_incl = op[0] == 4;
    m->hi = v->items[3]->num;
    m->hi_incl = op[1] == 2;
    if (!(m->lo < m->hi)) {
        fail(cx, v->items[3]->off,
             "\"numeric\": the lower bound must be less than the upper bound");
        return false;
    }
    return true;
}

static bool compile_anybut(struct cctx *cx, const struct jv *v, struct pm *m)
{
    m->kind = M_ANYBUT;
    if (v->type == J_STR || v->type == J_NUM) {
        m->inner = arena_alloc(&cx->pat->arena, sizeof(*m->inner));
        memset(m->inner, 0, sizeof(*m->inner));
        m->ninner = 1;
        m->inner->kind = v->type == J_STR ? M_STR : M_NUM;
        m->inner->s = v->s;
        m->inner->len = v->len;
        m->inner->num = v->num;
        return true;
    }
    if (v->type == J_ARR) {
        if (v->n == 0) {
            fail(cx, v->off, "\"anything-but\" list is empty");
            return false;
        }
        m->inner = arena_alloc(&cx->pat->arena, v->n * sizeof(*m->inner));
        memset(m->inner, 0, v->n * sizeof(*m->inner));
        m->ninner = v->n;
        for (size_t i = 0; i < v->n; i++) {
            const struct jv *x = v->items[i];
            if (x->type != J_STR && x->type != J_NUM) {
                fail(cx, x->off, "\"anything-but\" list values must be strings or numbers, got %s",
                     type_name(x));
                return false;
            }
            if (x->type != v->items[0]->type) {
                fail(cx, x->off, "\"anything-but\" list must hold only strings or only numbers");
                return false;
            }
            m->inner[i].kind = x->type == J_STR ? M_STR : M_NUM;
            m->inner[i].s = x->s;
            m->inner[i].len = x->len;
            m->inner[i].num = x->num;
        }
        return true;
    }
    if (v->type != J_OBJ) {
        fail(cx, v->off,
             "\"anything-but\" needs a string, a number, a list of strings or of numbers, or an "
             "object, got %s",
             type_name(v));
        return false;
    }
    if (v->n != 1) {
        fail(cx, v->off, "an operator object must have exactly one key, got %zu", v->n);
        return false;
    }
    const struct jmem *mem = &v->mems[0];
    int kind;
    if (str_is(mem->key, mem->klen, "prefix"))
        kind = M_PREFIX;
    else if (str_is(mem->key, mem->klen, "suffix"))
        kind = M_SUFFIX;
    else if (str_is(mem->key, mem->klen, "equals-ignore-case"))
        kind = M_EIC;
    else if (str_is(mem->key, mem->klen, "wildcard"))
        kind = M_WILD;
    else {
        fail(cx, mem->koff,
             "unknown operator \"" KEYFMT "\" inside \"anything-but\" (allowed: \"prefix\", "
             "\"suffix\", \"equals-ignore-case\", \"wildcard\")",
             KEYARG(mem->key, mem->klen));
        return false;
    }
    const struct jv *x = mem->val;
    const struct jv *const *vals = (const struct jv *const *)&mem->val;
    size_t n = 1;
    if (x->type == J_ARR) {
        vals = (const struct jv *const *)x->items;
        n = x->n;
    }
    bool ok = x->type == J_STR || (x->type == J_ARR && n > 0);
    for (size_t i = 0; ok && i < n; i++)
        ok = vals[i]->type == J_STR;
    if (!ok) {
        fail(cx, x->off,
             "\"anything-but\": \"" KEYFMT "\" needs a string or a non-empty list of strings, "
             "got %s",
             KEYARG(mem->key, mem->klen),
             x->type == J_ARR && n > 0 ? "a list with other values" : type_name(x));
        return false;
    }
    m->inner = arena_alloc(&cx->pat->arena, n * sizeof(*m->inner));
    memset(m->inner, 0, n * sizeof(*m->inner));
    m->ninner = n;
    for (size_t i = 0; i < n; i++) {
        struct pm *in = &m->inner[i];
        in->kind = kind;
        in->s = vals[i]->s;
        in->len = vals[i]->len;
        if (kind == M_EIC)
            in->s = fold_arena(cx, vals[i]->s, vals[i]->len, &in->len);
        if (kind == M_WILD && !compile_wild(cx, vals[i], "wildcard", in))
            return false;
    }
    return true;
}

/* One operator object of a value list: {"prefix": ...} and so on. */
static bool compile_operator(struct cctx *cx, const struct jv *v, struct pm *m, bool *absent)
{
    if (v->n != 1) {
        fail(cx, v->off, "an operator object must have exactly one key, got %zu", v->n);
        return false;
    }
    const struct jmem *mem = &v->mems[0];
    const char *k = mem->key;
    size_t kn = mem->klen;
    const struct jv *x = mem->val;
    if (str_is(k, kn, "prefix") || str_is(k, kn, "suffix")) {
        bool prefix = k[0] == 'p';
        if (x->type == J_STR) {
            m->kind = prefix ? M_PREFIX : M_SUFFIX;
            m->s = x->s;
            m->len = x->len;
            return true;
        }
        if (x->type == J_OBJ && x->n == 1) {
            const struct jmem *in = &x->mems[0];
            if (!str_is(in->key, in->klen, "equals-ignore-case")) {
                fail(cx, in->koff,
                     "unknown operator \"" KEYFMT "\" inside \"%s\" (allowed: "
                     "\"equals-ignore-case\")",
                     KEYARG(in->key, in->klen), prefix ? "prefix" : "suffix");
                return false;
            }
            if (in->val->type != J_STR) {
                fail(cx, in->val->off, "\"equals-ignore-case\" needs a string, got %s",
                     type_name(in->val));
                return false;
            }
            m->kind = prefix ? M_PREFIX_EIC : M_SUFFIX_EIC;
            m->s = fold_arena(cx, in->val->s, in->val->len, &m->len);
            return true;
        }
        fail(cx, x->off, "\"%s\" needs a string or {\"equals-ignore-case\": STRING}, got %s",
             prefix ? "prefix" : "suffix", type_name(x));
        return false;
    }
    if (str_is(k, kn, "equals-ignore-case")) {
        if (x->type != J_STR) {
            fail(cx, x->off, "\"equals-ignore-case\" needs a string, got %s", type_name(x));
            return false;
        }
        m->kind = M_EIC;
        m->s = fold_arena(cx, x->s, x->len, &m->len);
        return true;
    }
    if (str_is(k, kn, "wildcard")) {
        if (x->type != J_STR) {
            fail(cx, x->off, "\"wildcard\" needs a string, got %s", type_name(x));
            return false;
        }
        return compile_wild(cx, x, "wildcard", m);
    }
    if (str_is(k, kn, "numeric"))
        return compile_numeric(cx, x, m);
    if (str_is(k, kn, "exists")) {
        if (x->type != J_TRUE && x->type != J_FALSE) {
            fail(cx, x->off, "\"exists\" needs true or false, got %s", type_name(x));
            return false;
        }
        m->kind = M_EXISTS;
        *absent = x->type == J_FALSE;
        return true;
    }
    if (str_is(k, kn, "cidr")) {
        if (x->type != J_STR) {
            fail(cx, x->off, "\"cidr\" needs a string, got %s", type_name(x));
            return false;
        }
        return compile_cidr(cx, x, m);
    }
    if (str_is(k, kn, "anything-but"))
        return compile_anybut(cx, x, m);
    fail(cx, mem->koff,
         "unknown operator \"" KEYFMT "\" (allowed: \"prefix\", \"suffix\", "
         "\"equals-ignore-case\", \"wildcard\", \"anything-but\", \"numeric\", \"exists\", "
         "\"cidr\")",
         KEYARG(k, kn));
    return false;
}

/* A field's list of values: an OR of exact values and operators. */
static const struct pcond *compile_values(struct cctx *cx, const struct jv *arr,
                                          const struct ppath *path, const struct jmem *mem)
{
    if (arr->n == 0) {
        fail(cx, arr->off, "field \"" KEYFMT "\" has an empty list of values",
             KEYARG(mem->key, mem->klen));
        return NULL;
    }
    struct pcond *c = arena_alloc(&cx->pat->arena, sizeof(*c));
    struct fp_pattern *pat = cx->pat;
    if (pat->nconds == pat->cconds) {
        pat->cconds = pat->cconds ? 2 * pat->cconds : 16;
        pat->conds = esmd_xrealloc(pat->conds, pat->cconds * sizeof(*pat->conds));
    }
    pat->conds[pat->nconds++] = c;
    c->path = path;
    c->m = arena_alloc(&cx->pat->arena, arr->n * sizeof(*c->m));
    c->nm = 0;
    c->absent = false;
    for (size_t i = 0; i < arr->n; i++) {
        const struct jv *x = arr->items[i];
        struct pm *m = &c->m[c->nm];
        memset(m, 0, sizeof(*m));
        switch (x->type) {
        case J_STR:
            m->kind = M_STR;
            m->s = x->s;
            m->len = x->len;
            break;
        case J_NUM:
            m->kind = M_NUM;
            m->num = x->num;
            break;
        case J_TRUE:
            m->kind = M_TRUE;
            break;
        case J_FALSE:
            m->kind = M_FALSE;
            break;
        case J_NULL:
            m->kind = M_NULL;
            break;
        case J_ARR:
            fail(cx, x->off, "field \"" KEYFMT "\": a list of values cannot contain an array",
                 KEYARG(mem->key, mem->klen));
            return NULL;
        default: {
            bool absent = false;
            if (!compile_operator(cx, x, m, &absent))
                return NULL;
            if (m->kind == M_EXISTS && absent) {
                c->absent = true;
                continue; /* not a value matcher: checked when the alternative is */
            }
            break;
        }
        }
        c->nm++;
    }
    return c;
}

static bool cross(struct cctx *cx, struct altset *set, const struct altset *b, size_t off)
{
    if (set->n * b->n > MAX_ALTS) {
        fail(cx, off, "\"$or\" expands the pattern to more than %d alternatives", MAX_ALTS);
        return false;
    }
    struct altset out;
    out.n = set->n * b->n;
    out.a = arena_alloc(&cx->pat->arena, out.n * sizeof(*out.a));
    size_t k = 0;
    for (size_t i = 0; i < set->n; i++) {
        for (size_t j = 0; j < b->n; j++) {
            struct alt *a = &out.a[k++];
            a->n = set->a[i].n + b->a[j].n;
            a->c = arena_alloc(&cx->pat->arena, (a->n ? a->n : 1) * sizeof(*a->c));
            if (set->a[i].n)
                memcpy(a->c, set->a[i].c, set->a[i].n * sizeof(*a->c));
            if (b->a[j].n)
                memcpy(a->c + set->a[i].n, b->a[j].c, b->a[j].n * sizeof(*a->c));
        }
    }
    *set = out;
    return true;
}

/* The path of a member: pattern keys are split at '.' (event-ruler joins nested names with '.',
 * so {"a.b": ...} and {"a": {"b": ...}} are the same path). */
static const struct ppath *path_extend(struct cctx *cx, const struct ppath *parent, const char *key,
                                       size_t n)
{
    size_t start = 0;
    for (size_t i = 0; i <= n; i++) {
        if (i < n && key[i] != '.')
            continue;
        struct ppath *p = arena_alloc(&cx->pat->arena, sizeof(*p));
        p->parent = parent;
        p->seg = key + start;
        p->len = i - start;
        p->depth = parent ? parent->depth + 1 : 1;
        parent = p;
        start = i + 1;
    }
    return parent;
}

static bool skipped_key(const struct cctx *cx, const char *key, size_t n)
{
    if (!cx->skip)
        return false;
    const char *dot = memchr(key, '.', n);
    size_t first = dot ? (size_t)(dot - key) : n;
    for (const char *const *s = cx->skip; *s; s++)
        if (str_is(key, first, *s))
            return true;
    return false;
}

static bool compile_object(struct cctx *cx, const struct jv *obj, const struct ppath *prefix,
                           bool top, struct altset *out)
{
    struct altset set;
    set.n = 1;
    set.a = arena_alloc(&cx->pat->arena, sizeof(*set.a));
    set.a[0].c = NULL;
    set.a[0].n = 0;
    for (size_t i = 0; i < obj->n; i++) {
        const struct jmem *mem = &obj->mems[i];
        /* Duplicate keys: the last one wins (every one must still be valid). */
        bool keep = !(top && skipped_key(cx, mem->key, mem->klen));
        for (size_t j = i + 1; keep && j < obj->n; j++)
            if (obj->mems[j].klen == mem->klen &&
                memcmp(obj->mems[j].key, mem->key, mem->klen) == 0)
                keep = false;
        const struct jv *v = mem->val;
        if (str_is(mem->key, mem->klen, "$or")) {
            if (v->type != J_ARR) {
                fail(cx, v->off, "\"$or\" needs an array of at least 2 objects, got %s",
                     type_name(v));
                return false;
            }
            if (v->n < 2) {
                fail(cx, v->off, "\"$or\" needs an array of at least 2 objects, got %zu", v->n);
                return false;
            }
            struct altset u = {NULL, 0};
            struct altset *branches = arena_alloc(&cx->pat->arena, v->n * sizeof(*branches));
            size_t total = 0;
            for (size_t k = 0; k < v->n; k++) {
                const struct jv *b = v->items[k];
                if (b->type != J_OBJ || b->n == 0) {
                    fail(cx, b->off, "\"$or\" entries must be non-empty objects, got %s",
                         b->type == J_OBJ ? "an empty object" : type_name(b));
                    return false;
                }
                if (!compile_object(cx, b, prefix, top, &branches[k]))
                    return false;
                total += branches[k].n;
                if (total > MAX_ALTS) {
                    fail(cx, mem->koff, "\"$or\" expands the pattern to more than %d alternatives",
                         MAX_ALTS);
                    return false;
                }
            }
            u.a = arena_alloc(&cx->pat->arena, total * sizeof(*u.a));
            for (size_t k = 0; k < v->n; k++) {
                memcpy(u.a + u.n, branches[k].a, branches[k].n * sizeof(*u.a));
                u.n += branches[k].n;
            }
            if (keep && !cross(cx, &set, &u, mem->koff))
                return false;
            continue;
        }
        const struct ppath *path = path_extend(cx, prefix, mem->key, mem->klen);
        if (v->type == J_OBJ) {
            if (v->n == 0) {
                fail(cx, v->off, "field \"" KEYFMT "\" holds an empty object",
                     KEYARG(mem->key, mem->klen));
                return false;
            }
            struct altset sub;
            if (!compile_object(cx, v, path, false, &sub))
                return false;
            if (keep && !cross(cx, &set, &sub, mem->koff))
                return false;
        } else if (v->type == J_ARR) {
            const struct pcond *c = compile_values(cx, v, path, mem);
            if (!c)
                return false;
            if (!keep)
                continue;
            for (size_t k = 0; k < set.n; k++) {
                struct alt *a = &set.a[k];
                const struct pcond **nc = arena_alloc(&cx->pat->arena, (a->n + 1) * sizeof(*nc));
                if (a->n)
                    memcpy(nc, a->c, a->n * sizeof(*nc));
                nc[a->n++] = c;
                a->c = nc;
            }
        } else {
            fail(cx, v->off, "field \"" KEYFMT "\" must hold a list of values or an object, got %s",
                 KEYARG(mem->key, mem->klen), type_name(v));
            return false;
        }
    }
    *out = set;
    return true;
}

/* Parses and checks a whole pattern. On success *out holds its alternatives (arena memory). */
static bool compile(struct cctx *cx, struct altset *out)
{
    cx->pos = 0;
    struct jv *root = jp_value(cx, 0);
    if (!root)
        return false;
    jp_ws(cx);
    if (cx->pos < cx->len) {
        fail(cx, cx->pos, "invalid JSON: unexpected characters after the pattern");
        return false;
    }
    if (root->type != J_OBJ) {
        fail(cx, root->off, "a pattern must be a JSON object, got %s", type_name(root));
        return false;
    }
    return compile_object(cx, root, NULL, true, out);
}

bool esmd_filter_parse(struct fp_pattern *pat, const char *text, size_t len,
                       const char *const *skip, struct esmd_filter_error *err)
{
    memset(pat, 0, sizeof(*pat));
    struct cctx cx = {
        .text = text ? text : "", .len = text ? len : 0, .pat = pat, .err = err, .skip = skip};
    return compile(&cx, &pat->alts);
}

void esmd_filter_pattern_free(struct fp_pattern *pat)
{
    arena_free(&pat->arena);
    free(pat->conds);
    memset(pat, 0, sizeof(*pat));
}
