/* The filter engine's hot path: scanning an event over a matcher's index and deciding which
 * patterns match (see filter_internal.h for the design), and the value decoders the pattern
 * parser shares with it. Everything the scan calls per leaf is static here, so that it inlines. */
#include "filter_fold.h"
#include "filter_internal.h"

#include "esmd/json.h"

#include <arpa/inet.h>
#include <locale.h>
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#ifdef __SSE2__
#include <emmintrin.h>
#endif

/* ------------------------------------------------------------------------------------------ */
/* Hashing (index keys)                                                                       */

static inline uint64_t load64(const unsigned char *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

static inline uint64_t load32(const unsigned char *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

static inline uint64_t mum(uint64_t a, uint64_t b)
{
#ifdef __SIZEOF_INT128__
    unsigned __int128 r = (unsigned __int128)a * b;
    return (uint64_t)r ^ (uint64_t)(r >> 64);
#else
    uint64_t r = (a ^ (a >> 31)) * (b | 1);
    return r ^ (r >> 29);
#endif
}

#define H1 0xa0761d6478bd642full
#define H2 0xe7037ed1a0b428dbull
#define H3 0x8ebc6af09c88c6e3ull

/* A fast 64-bit hash of n bytes (wyhash-style multiply-fold), salted with seed. */
static uint64_t fhash(const void *key, size_t n, uint64_t seed)
{
    const unsigned char *p = key;
    uint64_t a, b;
    seed ^= H1;
    if (n <= 16) {
        if (n >= 4) {
            size_t k = (n >> 3) << 2;
            a = (load32(p) << 32) | load32(p + k);
            b = (load32(p + n - 4) << 32) | load32(p + n - 4 - k);
        } else if (n > 0) {
            a = ((uint64_t)p[0] << 16) | ((uint64_t)p[n >> 1] << 8) | p[n - 1];
            b = 0;
        } else {
            a = b = 0;
        }
    } else {
        size_t i = n;
        while (i > 16) {
            seed = mum(load64(p) ^ H2, load64(p + 8) ^ seed);
            p += 16;
            i -= 16;
        }
        a = load64(p + i - 16);
        b = load64(p + i - 8);
    }
    return mum(H2 ^ n, mum(a ^ H2, b ^ seed));
}

/* As key8, reading 8 bytes at once when p + 8 <= limit. */
static inline uint64_t key8_load(const char *p, size_t n, const char *limit)
{
    if (limit - p < 8)
        return key8(p, n);
    uint64_t v;
    memcpy(&v, p, 8);
    if (n >= 8)
        return v;
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
    return n ? v & (~0ull << (64 - 8 * n)) : 0;
#else
    return v & ((1ull << (8 * n)) - 1);
#endif
}

static inline uint64_t key_hash(uint32_t owner, int kind, const void *key, size_t n)
{
    return fhash(key, n, (((uint64_t)owner << 8) | (uint64_t)kind) * H3);
}

uint64_t esmd_filter_key_hash(uint32_t owner, int kind, const void *key, size_t n)
{
    return key_hash(owner, kind, key, n);
}

/* ------------------------------------------------------------------------------------------ */
/* Values: numbers, UTF-8, case folding, IP addresses, wildcards, string escapes              */

static pthread_once_t c_locale_once = PTHREAD_ONCE_INIT;
static locale_t c_locale;

static void c_locale_init(void)
{
    c_locale = newlocale(LC_ALL_MASK, "C", (locale_t)0);
}

static const double pow10_tab[] = {1e0,  1e1,  1e2,  1e3,  1e4,  1e5,  1e6,  1e7,
                                   1e8,  1e9,  1e10, 1e11, 1e12, 1e13, 1e14, 1e15,
                                   1e16, 1e17, 1e18, 1e19, 1e20, 1e21, 1e22};

/* Converts a JSON number (already validated) to the nearest double. */
static double number_value(const char *s, size_t n, char *tmp, size_t tmpcap)
{
    const char *p = s, *end = s + n;
    bool neg = false;
    if (*p == '-') {
        neg = true;
        p++;
    }
    uint64_t m = 0;
    int digits = 0, exp10 = 0;
    while (p < end && *p >= '0' && *p <= '9') {
        if (digits < 19) {
            m = m * 10 + (uint64_t)(*p - '0');
            if (m)
                digits++;
        } else {
            exp10++;
        }
        p++;
    }
    if (p < end && *p == '.') {
        p++;
        while (p < end && *p >= '0' && *p <= '9') {
            if (digits < 19) {
                m = m * 10 + (uint64_t)(*p - '0');
                if (m)
                    digits++;
                exp10--;
            }
            p++;
        }
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        p++;
        bool eneg = false;
        if (*p == '+' || *p == '-')
            eneg = *p++ == '-';
        int e = 0;
        while (p < end && *p >= '0' && *p <= '9') {
            if (e < 100000)
                e = e * 10 + (*p - '0');
            p++;
        }
        exp10 += eneg ? -e : e;
    }
    if (m == 0)
        return neg ? -0.0 : 0.0;
    if (digits < 19 && m <= (1ull << 53) && exp10 >= -22 && exp10 <= 22) {
        double d = (double)m;
        d = exp10 < 0 ? d / pow10_tab[-exp10] : d * pow10_tab[exp10];
        return neg ? -d : d;
    }
    /* Slow path: the C library's correctly rounded conversion, in the "C" locale. */
    if (n + 1 > tmpcap)
        n = tmpcap - 1; /* callers size tmp for the number; never taken */
    memcpy(tmp, s, n);
    tmp[n] = '\0';
    pthread_once(&c_locale_once, c_locale_init);
    return c_locale ? strtod_l(tmp, NULL, c_locale) : strtod(tmp, NULL);
}

static size_t utf8_put(char *out, uint32_t cp)
{
    if (cp < 0x80) {
        out[0] = (char)cp;
        return 1;
    }
    if (cp < 0x800) {
        out[0] = (char)(0xC0 | (cp >> 6));
        out[1] = (char)(0x80 | (cp & 0x3F));
        return 2;
    }
    if (cp < 0x10000) {
        out[0] = (char)(0xE0 | (cp >> 12));
        out[1] = (char)(0x80 | ((cp >> 6) & 0x3F));
        out[2] = (char)(0x80 | (cp & 0x3F));
        return 3;
    }
    out[0] = (char)(0xF0 | (cp >> 18));
    out[1] = (char)(0x80 | ((cp >> 12) & 0x3F));
    out[2] = (char)(0x80 | ((cp >> 6) & 0x3F));
    out[3] = (char)(0x80 | (cp & 0x3F));
    return 4;
}

static uint32_t fold_cp(uint32_t cp)
{
    size_t lo = 0, hi = ESMD_ARRAY_LEN(esmd_fold_tab);
    while (lo < hi) {
        size_t mid = (lo + hi) / 2;
        if (esmd_fold_tab[mid][0] < cp)
            lo = mid + 1;
        else
            hi = mid;
    }
    if (lo < ESMD_ARRAY_LEN(esmd_fold_tab) && esmd_fold_tab[lo][0] == cp)
        return esmd_fold_tab[lo][1];
    return cp;
}

/* fold from byte i (o bytes written so far) on, where the text is not ASCII. */
static __attribute__((noinline)) size_t fold_utf8(const unsigned char *u, size_t n, size_t i,
                                                  char *out, size_t o)
{
    while (i < n) {
        unsigned char c = u[i];
        if (c < 0x80) {
            out[o++] = (char)(c >= 'A' && c <= 'Z' ? c + 32 : c);
            i++;
            continue;
        }
        uint32_t cp;
        size_t len = esmd_utf8_decode(u + i, n - i, &cp);
        if (len == 0) {
            out[o++] = (char)c;
            i++;
            continue;
        }
        o += utf8_put(out + o, fold_cp(cp));
        i += len;
    }
    return o;
}

/* Unicode simple case folding of s into out (room for 2 * n bytes); malformed UTF-8 bytes are
 * copied as they are. Returns the folded length. ASCII, the common case, stays in this loop. */
static size_t fold(const char *s, size_t n, char *out)
{
    const unsigned char *u = (const unsigned char *)s;
    for (size_t i = 0; i < n; i++) {
        unsigned char c = u[i];
        if (c >= 0x80)
            return fold_utf8(u, n, i, out, i);
        out[i] = (char)(c >= 'A' && c <= 'Z' ? c + 32 : c);
    }
    return n;
}

/* Parses an IPv4 or IPv6 address: returns 4 or 6 (out filled), 0 if it is not one. inet_pton
 * takes the forms event-ruler takes: dotted quads without leading zeros, and RFC 4291's text
 * forms of IPv6 (with "::" and an IPv4 tail). IPv4 first: the common case, and it gives up at
 * the first character of anything else. */
static int parse_ip(const char *s, size_t n, uint8_t out[16])
{
    char buf[46];
    if (n < 2 || n >= sizeof(buf))
        return 0;
    memcpy(buf, s, n);
    buf[n] = '\0';
    if (strlen(buf) != n) /* a NUL inside (from \u0000) would cut the text short */
        return 0;
    if (inet_pton(AF_INET, buf, out) == 1)
        return 4;
    if (memchr(buf, ':', n) && inet_pton(AF_INET6, buf, out) == 1)
        return 6;
    return 0;
}

static bool cidr_contains(const struct fcidr *c, int family, const uint8_t *addr)
{
    if (c->family != family)
        return false;
    unsigned bits = c->bits, full = bits / 8, rest = bits % 8;
    if (memcmp(c->addr, addr, full) != 0)
        return false;
    if (rest) {
        uint8_t mask = (uint8_t)(0xFF << (8 - rest));
        return (c->addr[full] & mask) == (addr[full] & mask);
    }
    return true;
}

/* Glob with '*' only: segs are the literal pieces between the stars (nsegs = stars + 1). */
static bool wild_match(const char *pool, const uint32_t *segs, uint32_t nsegs, const char *s,
                       size_t n)
{
    const char *first = pool + segs[0];
    size_t flen = segs[1];
    if (nsegs == 1)
        return n == flen && memcmp(s, first, n) == 0;
    const char *last = pool + segs[2 * (nsegs - 1)];
    size_t llen = segs[2 * (nsegs - 1) + 1];
    if (n < flen + llen || memcmp(s, first, flen) != 0 || memcmp(s + n - llen, last, llen) != 0)
        return false;
    size_t pos = flen, lim = n - llen;
    for (uint32_t i = 1; i + 1 < nsegs; i++) {
        const char *seg = pool + segs[2 * i];
        size_t len = segs[2 * i + 1];
        if (len == 0)
            continue;
        if (lim - pos < len)
            return false;
        const char *hit = memmem(s + pos, lim - pos, seg, len);
        if (!hit)
            return false;
        pos = (size_t)(hit - s) + len;
    }
    return true;
}

/* The 4 hex digits of a \u escape (already validated). */
static inline uint32_t hex4(const unsigned char *h)
{
    return (uint32_t)(esmd_hex_digit(h[0]) << 12 | esmd_hex_digit(h[1]) << 8 |
                      esmd_hex_digit(h[2]) << 4 | esmd_hex_digit(h[3]));
}

/* Decodes the body of a JSON string whose escapes are known to be valid into out (room for n
 * bytes: decoding never grows). Lone surrogates become U+FFFD. Returns the decoded length. */
static size_t unescape(const char *s, size_t n, char *out)
{
    size_t i = 0, o = 0;
    while (i < n) {
        char c = s[i];
        if (c != '\\') {
            out[o++] = c;
            i++;
            continue;
        }
        char e = s[i + 1];
        i += 2;
        switch (e) {
        case 'b':
            out[o++] = '\b';
            break;
        case 'f':
            out[o++] = '\f';
            break;
        case 'n':
            out[o++] = '\n';
            break;
        case 'r':
            out[o++] = '\r';
            break;
        case 't':
            out[o++] = '\t';
            break;
        case 'u': {
            const unsigned char *h = (const unsigned char *)s + i;
            uint32_t cp = hex4(h);
            i += 4;
            if (cp >= 0xD800 && cp <= 0xDBFF && i + 6 <= n && s[i] == '\\' && s[i + 1] == 'u') {
                h = (const unsigned char *)s + i + 2;
                uint32_t lo = hex4(h);
                if (lo >= 0xDC00 && lo <= 0xDFFF) {
                    cp = 0x10000 + ((cp - 0xD800) << 10) + (lo - 0xDC00);
                    i += 6;
                } else {
                    cp = 0xFFFD;
                }
            } else if (cp >= 0xD800 && cp <= 0xDFFF) {
                cp = 0xFFFD;
            }
            o += utf8_put(out + o, cp);
            break;
        }
        default: /* '"', '\\', '/' */
            out[o++] = e;
            break;
        }
    }
    return o;
}

/* The decoders, for the pattern parser (filter_internal.h). */

double esmd_filter_number(const char *s, size_t n, char *tmp, size_t tmpcap)
{
    return number_value(s, n, tmp, tmpcap);
}

size_t esmd_filter_unescape(const char *s, size_t n, char *out)
{
    return unescape(s, n, out);
}

size_t esmd_filter_fold(const char *s, size_t n, char *out)
{
    return fold(s, n, out);
}

int esmd_filter_parse_ip(const char *s, size_t n, uint8_t out[16])
{
    return parse_ip(s, n, out);
}

void esmd_filter_match_init(void)
{
    pthread_once(&c_locale_once, c_locale_init);
}

/* ------------------------------------------------------------------------------------------ */
/* Matching: the event scanner                                                                */

#define LIKELY(x) __builtin_expect(!!(x), 1)
#define UNLIKELY(x) __builtin_expect(!!(x), 0)
#define ALWAYS_INLINE inline __attribute__((always_inline))

static const char *ws_slow(const char *p, const char *end)
{
    while (p < end && (*p == ' ' || *p == '\n' || *p == '\r' || *p == '\t'))
        p++;
    return p;
}

/* Skips whitespace; events are usually compact, so the first test nearly always decides. */
static ALWAYS_INLINE const char *ws(const char *p, const char *end)
{
    if (LIKELY(p < end && (unsigned char)*p > ' '))
        return p;
    return ws_slow(p, end);
}

/* At a backslash inside a string: returns what follows the escape, or NULL if it is invalid. */
static inline const char *esc_end(const char *p, const char *end)
{
    if (end - p < 2)
        return NULL;
    switch (p[1]) {
    case '"':
    case '\\':
    case '/':
    case 'b':
    case 'f':
    case 'n':
    case 'r':
    case 't':
        return p + 2;
    case 'u':
        if (end - p < 6)
            return NULL;
        for (int k = 2; k < 6; k++)
            if (esmd_hex_digit((unsigned char)p[k]) < 0)
                return NULL;
        return p + 6;
    default:
        return NULL;
    }
}

/* p is just past an opening quote. Returns the closing quote, or NULL when the string is not
 * valid JSON (control character, bad escape, no end); sets *esc when it holds escapes. */
static ALWAYS_INLINE const char *str_end(const char *p, const char *end, bool *esc)
{
#ifdef __SSE2__
    const __m128i quote = _mm_set1_epi8('"'), bslash = _mm_set1_epi8('\\');
    const __m128i ctl = _mm_set1_epi8(0x1F);
    while (end - p >= 16) {
        __m128i x = _mm_loadu_si128((const __m128i *)(const void *)p);
        __m128i t = _mm_or_si128(_mm_or_si128(_mm_cmpeq_epi8(x, quote), _mm_cmpeq_epi8(x, bslash)),
                                 _mm_cmpeq_epi8(_mm_min_epu8(x, ctl), x));
        unsigned mask = (unsigned)_mm_movemask_epi8(t);
        if (!mask) {
            p += 16;
            continue;
        }
        p += __builtin_ctz(mask);
        if (*p == '"')
            return p;
        if (*p != '\\')
            return NULL;
        p = esc_end(p, end);
        if (!p)
            return NULL;
        *esc = true;
    }
#endif
    while (p < end) {
        unsigned char c = (unsigned char)*p;
        if (c == '"')
            return p;
        if (c == '\\') {
            p = esc_end(p, end);
            if (!p)
                return NULL;
            *esc = true;
            continue;
        }
        if (c < 0x20)
            return NULL;
        p++;
    }
    return NULL;
}

static inline const char *literal_end(const char *p, const char *end)
{
    size_t left = (size_t)(end - p);
    switch (*p) {
    case 't':
        return left >= 4 && memcmp(p, "true", 4) == 0 ? p + 4 : NULL;
    case 'f':
        return left >= 5 && memcmp(p, "false", 5) == 0 ? p + 5 : NULL;
    default:
        return left >= 4 && memcmp(p, "null", 4) == 0 ? p + 4 : NULL;
    }
}

/* Skips (and validates) one value no pattern looks into. depth: nesting around it. */
static const char *skip_value(const char *p, const char *end, int depth)
{
    char stack[MAX_DEPTH];
    int sp = 0;
    bool esc;
value:
    p = ws(p, end);
    if (p >= end)
        return NULL;
    switch (*p) {
    case '"':
        p = str_end(p + 1, end, &esc);
        if (!p)
            return NULL;
        p++;
        break;
    case '{':
    case '[': {
        char close = *p == '{' ? '}' : ']';
        if (depth + sp >= MAX_DEPTH)
            return NULL;
        p = ws(p + 1, end);
        if (p < end && *p == close) {
            p++;
            break;
        }
        stack[sp++] = close;
        if (close == '}')
            goto key;
        goto value;
    }
    case 't':
    case 'f':
    case 'n':
        p = literal_end(p, end);
        if (!p)
            return NULL;
        break;
    default:
        p = number_end(p, end);
        if (!p)
            return NULL;
        break;
    }
    while (sp > 0) {
        p = ws(p, end);
        if (p >= end)
            return NULL;
        if (*p == ',') {
            p++;
            if (stack[sp - 1] == '}')
                goto key;
            goto value;
        }
        if (*p != stack[sp - 1])
            return NULL;
        p++;
        sp--;
    }
    return p;
key:
    p = ws(p, end);
    if (p >= end || *p != '"')
        return NULL;
    p = str_end(p + 1, end, &esc);
    if (!p)
        return NULL;
    p = ws(p + 1, end);
    if (p >= end || *p != ':')
        return NULL;
    p++;
    goto value;
}

static bool sbuf_fit(struct esmd_filter *f, size_t n)
{
    if (n <= f->csbuf)
        return true;
    if (n > MAX_SCRATCH) {
        f->overflow = true;
        return false;
    }
    size_t cap = f->csbuf ? f->csbuf : 256;
    while (cap < n)
        cap *= 2;
    f->sbuf = esmd_xrealloc(f->sbuf, cap);
    f->csbuf = cap;
    return true;
}

static uint32_t memb_now(struct esmd_filter *f)
{
    if (f->memb_cache != NONE)
        return f->memb_cache;
    size_t need = (size_t)f->nchains + 1 + 2 * (size_t)f->adepth;
    if (need > f->cchains) {
        if (need > MAX_CHAIN_WORDS) {
            f->overflow = true;
            return NONE;
        }
        GROW(f->chains, f->cchains, need);
    }
    uint32_t m = f->nchains;
    uint32_t *c = f->chains + m;
    c[0] = f->adepth;
    for (uint32_t i = 0; i < f->adepth; i++) {
        c[1 + 2 * i] = f->astk[i].id;
        c[2 + 2 * i] = f->astk[i].idx;
    }
    f->nchains = (uint32_t)need;
    f->memb_cache = m;
    return m;
}

static void hit_slot(struct esmd_filter *f, uint32_t s)
{
    struct sstate *st = &f->sst[s];
    if (st->stamp != f->gen) {
        st->stamp = f->gen;
        st->head = NONE;
        st->nhits = 0;
        st->root = 0;
        const struct fslot *sl = &f->slots[s];
        if (sl->conj != NONE && !sl->allow_absent) {
            struct cstate *cs = &f->cst[sl->conj];
            if (cs->stamp != f->gen) {
                cs->stamp = f->gen;
                cs->count = 0;
            }
            if (++cs->count == f->conjs[sl->conj].nrequired)
                f->cands[f->ncands++] = sl->conj;
        }
    }
    if (st->root)
        return;
    if (f->adepth == 0) {
        st->root = 1;
        return;
    }
    uint32_t m = memb_now(f);
    if (m == NONE)
        return;
    if (st->head != NONE && f->hits[st->head].memb == m)
        return;
    if (f->nhits == f->chits) {
        if (f->nhits >= MAX_HITS) {
            f->overflow = true;
            return;
        }
        GROW(f->hits, f->chits, f->nhits + 1);
    }
    f->hits[f->nhits] = (struct hit){m, st->head};
    st->head = f->nhits++;
    st->nhits++;
}

static inline void fire(struct esmd_filter *f, uint32_t t)
{
    if (t & NEG_BIT)
        f->neg_stamp[t & ~NEG_BIT] = f->leafgen;
    else
        hit_slot(f, t);
}

static inline void fire_list(struct esmd_filter *f, uint32_t l)
{
    for (; l != NONE; l = f->links[l].next)
        fire(f, f->links[l].val);
}

static inline void lookup_fire(struct esmd_filter *f, uint32_t field, int kind, const char *s,
                               size_t n)
{
    uint32_t e = ht_find(f, field, kind, s, n, key_hash(field, kind, s, n));
    if (e != NONE)
        fire_list(f, f->ents[e].targets);
}

static inline void leaf_begin(struct esmd_filter *f, const struct ffield *fd)
{
    if (++f->leafgen == 0) {
        memset(f->neg_stamp, 0, (size_t)f->cneg_stamp * sizeof(*f->neg_stamp));
        f->leafgen = 1;
    }
    if (fd->presence != NONE)
        hit_slot(f, fd->presence);
    if (fd->any != NONE)
        fire_list(f, fd->any);
}

/* anything-but: a condition none of whose excluded values matched this leaf is satisfied. */
static inline void leaf_end(struct esmd_filter *f, const struct ffield *fd)
{
    for (uint32_t l = fd->negs; l != NONE; l = f->links[l].next) {
        uint32_t neg = f->links[l].val;
        if (f->neg_stamp[neg] != f->leafgen)
            hit_slot(f, f->neg_slot[neg]);
    }
}

/* The case-insensitive lookups of a string leaf: on its simple case folding. */
static void leaf_fold(struct esmd_filter *f, uint32_t field, const struct ffield *fd, const char *s,
                      size_t n)
{
    if (2 * n + 16 > MAX_SCRATCH) {
        f->overflow = true;
        return;
    }
    if (2 * n + 16 > f->cfbuf) {
        size_t cap = f->cfbuf ? f->cfbuf : 256;
        while (cap < 2 * n + 16)
            cap *= 2;
        f->fbuf = esmd_xrealloc(f->fbuf, cap);
        f->cfbuf = cap;
    }
    size_t fn = fold(s, n, f->fbuf);
    const char *fs = f->fbuf;
    if (fd->flags & FF_EIC)
        lookup_fire(f, field, K_EIC, fs, fn);
    for (uint32_t l = fd->lens[L_PREFIX_EIC]; l != NONE && f->links[l].val <= fn;
         l = f->links[l].next)
        lookup_fire(f, field, K_PREFIX_EIC, fs, f->links[l].val);
    for (uint32_t l = fd->lens[L_SUFFIX_EIC]; l != NONE && f->links[l].val <= fn;
         l = f->links[l].next)
        lookup_fire(f, field, K_SUFFIX_EIC, fs + fn - f->links[l].val, f->links[l].val);
}

static void leaf_str(struct esmd_filter *f, uint32_t field, const char *s, size_t n)
{
    const struct ffield *fd = &f->fields[field];
    leaf_begin(f, fd);
    if (fd->flags & FF_STR)
        lookup_fire(f, field, K_STR, s, n);
    for (uint32_t l = fd->lens[L_PREFIX]; l != NONE && f->links[l].val <= n; l = f->links[l].next)
        lookup_fire(f, field, K_PREFIX, s, f->links[l].val);
    for (uint32_t l = fd->lens[L_SUFFIX]; l != NONE && f->links[l].val <= n; l = f->links[l].next)
        lookup_fire(f, field, K_SUFFIX, s + n - f->links[l].val, f->links[l].val);
    if (fd->flags & FF_FOLD)
        leaf_fold(f, field, fd, s, n);
    for (uint32_t w = fd->wilds; w != NONE; w = f->wilds[w].next) {
        const struct fwild *wd = &f->wilds[w];
        if (wild_match(f->str, f->wsegs + wd->segs, wd->nsegs, s, n))
            fire(f, wd->target);
    }
    if (fd->flags & FF_IP) {
        uint8_t ip[17];
        int family = parse_ip(s, n, ip + 1);
        if (family) {
            if (fd->flags & FF_IPX) {
                ip[0] = (uint8_t)family;
                lookup_fire(f, field, K_IP, (const char *)ip, family == 4 ? 5 : 17);
            }
            for (uint32_t c = fd->cidrs; c != NONE; c = f->cidrs[c].next)
                if (cidr_contains(&f->cidrs[c], family, ip + 1))
                    fire(f, f->cidrs[c].target);
        }
    }
    leaf_end(f, fd);
}

static void leaf_num(struct esmd_filter *f, uint32_t field, const char *s, size_t n)
{
    const struct ffield *fd = &f->fields[field];
    leaf_begin(f, fd);
    if (fd->flags & FF_NUMV) {
        char tmp[64];
        char *buf = tmp;
        size_t cap = sizeof(tmp);
        if (n + 1 > cap && sbuf_fit(f, n + 1)) {
            buf = f->sbuf;
            cap = f->csbuf;
        }
        if (n + 1 <= cap) {
            double d = number_value(s, n, buf, cap);
            if (fd->flags & FF_NUM) {
                double k = d == 0 ? 0.0 : d;
                lookup_fire(f, field, K_NUM, (const char *)&k, sizeof(k));
            }
            for (uint32_t r = fd->ranges; r != NONE; r = f->ranges[r].next) {
                const struct frange *rg = &f->ranges[r];
                if ((rg->lo_incl ? d >= rg->lo : d > rg->lo) &&
                    (rg->hi_incl ? d <= rg->hi : d < rg->hi))
                    fire(f, rg->target);
            }
        }
    }
    leaf_end(f, fd);
}

static void leaf_lit(struct esmd_filter *f, uint32_t field, int k)
{
    const struct ffield *fd = &f->fields[field];
    leaf_begin(f, fd);
    fire_list(f, fd->lits[k]);
    leaf_end(f, fd);
}

/* The child of node named k[0..n); the bytes up to limit may be read. */
static ALWAYS_INLINE uint32_t child_lookup(const struct esmd_filter *f, uint32_t node,
                                           const char *k, size_t n, const char *limit)
{
    const struct fnode *nd = &f->nodes[node];
    if (!(nd->lenmask & (1ull << (n < 63 ? n : 63))))
        return NONE;
    if (nd->nchildren <= SMALL_NODE) {
        uint64_t k8 = key8_load(k, n, limit);
        uint64_t k16 = n > 8 ? key8_load(k + 8, n - 8, limit) : 0;
        for (uint32_t i = 0; i < nd->nchildren; i++) {
            const struct fkid *kid = &nd->kids[i];
            if (kid->len == n && kid->name8 == k8 && kid->name16 == k16 &&
                (n <= 16 ||
                 memcmp(f->str + f->nodes[kid->node].name_off + 16, k + 16, n - 16) == 0))
                return kid->node;
        }
        return NONE;
    }
    uint32_t e = ht_find(f, node, K_KEY, k, n, key_hash(node, K_KEY, k, n));
    return e == NONE ? NONE : f->ents[e].value;
}

/* Event-ruler joins path segments with '.', so a member "a.b" is also member "b" of member "a". */
static uint32_t child_dotted(const struct esmd_filter *f, uint32_t node, const char *k, size_t n,
                             const char *limit)
{
    size_t start = 0;
    for (size_t i = 0; i <= n; i++) {
        if (i < n && k[i] != '.')
            continue;
        node = child_lookup(f, node, k + start, i - start, limit);
        if (node == NONE)
            return NONE;
        start = i + 1;
    }
    return node;
}

static inline uint32_t child_of(const struct esmd_filter *f, uint32_t node, const char *k, size_t n,
                                const char *limit)
{
    const struct fnode *nd = &f->nodes[node];
    if (nd->first_child == NONE)
        return NONE;
    uint32_t c = child_lookup(f, node, k, n, limit);
    if (c != NONE)
        return c;
    /* A dotted key can only lead somewhere if it has a '.' right after a child's length. */
    for (uint64_t m = nd->lenmask; m; m &= m - 1) {
        unsigned len = (unsigned)__builtin_ctzll(m);
        if (len >= n)
            break;
        if (len == 63 ? memchr(k, '.', n) != NULL : k[len] == '.')
            return child_dotted(f, node, k, n, limit);
    }
    return NONE;
}

static const char *scan_value(struct esmd_filter *f, const char *p, const char *end, uint32_t node,
                              int depth);

/* At '{' of an object whose members may be interesting. */
static const char *scan_object(struct esmd_filter *f, const char *p, const char *end, uint32_t node,
                               int depth)
{
    if (depth > MAX_DEPTH)
        return NULL;
    p = ws(p + 1, end);
    if (p < end && *p == '}')
        return p + 1;
    for (;;) {
        if (p >= end || *p != '"')
            return NULL;
        bool esc = false;
        const char *k = p + 1, *q = str_end(k, end, &esc);
        if (!q)
            return NULL;
        size_t kn = (size_t)(q - k);
        const char *limit = end;
        if (esc) {
            if (!sbuf_fit(f, kn + 8))
                return NULL;
            kn = unescape(k, kn, f->sbuf);
            k = f->sbuf;
            limit = f->sbuf + f->csbuf;
        }
        uint32_t child = child_of(f, node, k, kn, limit);
        p = ws(q + 1, end);
        if (p >= end || *p != ':')
            return NULL;
        p = ws(p + 1, end);
        if (p >= end)
            return NULL;
        if (child != NONE) {
            p = scan_value(f, p, end, child, depth);
        } else if (*p == '"') { /* the common cases of skipping, inline */
            bool skip_esc;
            p = str_end(p + 1, end, &skip_esc);
            p = p ? p + 1 : NULL;
        } else if ((*p >= '0' && *p <= '9') || *p == '-') {
            p = number_end(p, end);
        } else {
            p = skip_value(p, end, depth);
        }
        if (!p)
            return NULL;
        p = ws(p, end);
        if (p >= end)
            return NULL;
        if (*p == ',') {
            p = ws(p + 1, end);
            continue;
        }
        return *p == '}' ? p + 1 : NULL;
    }
}

/* At '[': arrays are transparent in paths; their elements are numbered for array consistency. */
static const char *scan_array(struct esmd_filter *f, const char *p, const char *end, uint32_t node,
                              int depth)
{
    if (depth > MAX_DEPTH)
        return NULL;
    p = ws(p + 1, end);
    if (p < end && *p == ']')
        return p + 1;
    uint32_t level = f->adepth++;
    f->astk[level].id = ++f->next_array;
    f->astk[level].idx = 0;
    f->memb_cache = NONE;
    for (;;) {
        if (p >= end)
            return NULL;
        p = scan_value(f, p, end, node, depth);
        if (!p)
            return NULL;
        p = ws(p, end);
        if (p >= end)
            return NULL;
        if (*p == ',') {
            f->astk[level].idx++;
            f->memb_cache = NONE;
            p = ws(p + 1, end);
            continue;
        }
        if (*p != ']')
            return NULL;
        f->adepth--;
        f->memb_cache = NONE;
        return p + 1;
    }
}

/* At the first byte of a value at trie node `node`. */
static const char *scan_value(struct esmd_filter *f, const char *p, const char *end, uint32_t node,
                              int depth)
{
    const struct fnode *nd = &f->nodes[node];
    uint32_t field = nd->field;
    switch (*p) {
    case '{':
        if (nd->first_child == NONE)
            return skip_value(p, end, depth);
        return scan_object(f, p, end, node, depth + 1);
    case '[':
        return scan_array(f, p, end, node, depth + 1);
    case '"': {
        bool esc = false;
        const char *s = p + 1, *q = str_end(s, end, &esc);
        if (!q)
            return NULL;
        if (field != NONE) {
            size_t n = (size_t)(q - s);
            if (esc) {
                if (!sbuf_fit(f, n + 1))
                    return NULL;
                n = unescape(s, n, f->sbuf);
                s = f->sbuf;
            }
            leaf_str(f, field, s, n);
        }
        return q + 1;
    }
    case 't':
    case 'f':
    case 'n': {
        const char *q = literal_end(p, end);
        if (q && field != NONE)
            leaf_lit(f, field, *p == 'f' ? 0 : *p == 't' ? 1 : 2);
        return q;
    }
    default: {
        const char *q = number_end(p, end);
        if (q && field != NONE)
            leaf_num(f, field, p, (size_t)(q - p));
        return q;
    }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Matching: deciding the candidates                                                          */

static bool chain_consistent(const struct esmd_filter *f, uint32_t m)
{
    const uint32_t *c = f->chains + m;
    for (uint32_t i = 0; i < c[0]; i++) {
        uint32_t arr = c[1 + 2 * i], idx = c[2 + 2 * i];
        for (uint32_t j = 0; j < f->nu; j += 2) {
            if (f->u[j] == arr) {
                if (f->u[j + 1] != idx)
                    return false;
                break;
            }
        }
    }
    return true;
}

/* Adds a membership to the chosen union if it is consistent with it. */
static bool u_add(struct esmd_filter *f, uint32_t m)
{
    if (!chain_consistent(f, m))
        return false;
    uint32_t depth = f->chains[m];
    GROW(f->u, f->cu, f->nu + 2 * depth);
    const uint32_t *c = f->chains + m;
    uint32_t base = f->nu;
    for (uint32_t i = 0; i < depth; i++) {
        uint32_t arr = c[1 + 2 * i];
        bool have = false;
        for (uint32_t j = 0; j < base && !have; j += 2)
            have = f->u[j] == arr;
        if (!have) {
            f->u[f->nu++] = arr;
            f->u[f->nu++] = c[2 + 2 * i];
        }
    }
    return true;
}

/* Is array `arr` fixed in the chosen union? Its element index goes to *idx. */
static inline bool u_lookup(const struct esmd_filter *f, uint32_t arr, uint32_t *idx)
{
    for (uint32_t j = 0; j < f->nu; j += 2) {
        if (f->u[j] == arr) {
            *idx = f->u[j + 1];
            return true;
        }
    }
    return false;
}

static int khit_cmp(const void *a, const void *b)
{
    uint64_t x = ((const struct khit *)a)->key, y = ((const struct khit *)b)->key;
    return x < y ? -1 : x > y;
}

/* Copies a slot's hits into kh[*lo, *hi), sorted by their outermost array element, so that the
 * search visits only the elements the choices so far allow. */
static void load_hits(struct esmd_filter *f, uint32_t slot, uint32_t *lo, uint32_t *hi)
{
    const struct sstate *st = &f->sst[slot];
    *lo = f->nkh;
    if (st->stamp == f->gen && st->nhits > 0) {
        GROW(f->kh, f->ckh, (size_t)f->nkh + st->nhits);
        for (uint32_t h = st->head; h != NONE; h = f->hits[h].next) {
            const uint32_t *c = f->chains + f->hits[h].memb; /* depth >= 1: not a root hit */
            f->kh[f->nkh++] = (struct khit){(uint64_t)c[1] << 32 | c[2], f->hits[h].memb};
        }
    }
    *hi = f->nkh;
    if (*hi - *lo > 1)
        qsort(f->kh + *lo, *hi - *lo, sizeof(*f->kh), khit_cmp);
}

/* First index in kh[lo, hi) whose key is >= key. */
static uint32_t kh_lower(const struct esmd_filter *f, uint32_t lo, uint32_t hi, uint64_t key)
{
    while (lo < hi) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (f->kh[mid].key < key)
            lo = mid + 1;
        else
            hi = mid;
    }
    return lo;
}

/* Narrows kh[*a, *b) (one group: same outermost array, starting at *a) to the hits the chosen
 * union allows, and returns the end of the group. */
static uint32_t kh_group(const struct esmd_filter *f, uint32_t *a, uint32_t *b)
{
    uint32_t arr = (uint32_t)(f->kh[*a].key >> 32), idx;
    uint32_t gend = kh_lower(f, *a, *b, ((uint64_t)arr + 1) << 32);
    if (u_lookup(f, arr, &idx)) {
        uint64_t k = (uint64_t)arr << 32 | idx;
        *a = kh_lower(f, *a, gend, k);
        *b = kh_lower(f, *a, gend, k + 1);
    } else {
        *b = gend;
    }
    return gend;
}

/* Every exists:false chosen as "absent" holds when no leaf of its field is consistent with the
 * union of the chosen hits. */
static bool absent_ok(struct esmd_filter *f, uint32_t nopen)
{
    for (uint32_t i = 0; i < nopen; i++) {
        if (!f->absent[i])
            continue;
        uint32_t lo = f->rng[4 * i + 2], hi = f->rng[4 * i + 3];
        for (uint32_t g = lo; g < hi;) {
            uint32_t a = g, b = hi;
            g = kh_group(f, &a, &b);
            for (uint32_t h = a; h < b; h++) {
                if (++f->steps > MAX_STEPS)
                    return false;
                if (chain_consistent(f, f->kh[h].memb))
                    return false;
            }
        }
    }
    return true;
}

/* Chooses one option for each open slot, i onwards: a hit consistent with the choices so far,
 * or (for exists:false) the field's absence, checked once everything is chosen. */
static bool search(struct esmd_filter *f, uint32_t i, uint32_t nopen)
{
    if (i == nopen)
        return absent_ok(f, nopen);
    uint32_t lo = f->rng[4 * i], hi = f->rng[4 * i + 1];
    for (uint32_t g = lo; g < hi;) {
        uint32_t a = g, b = hi;
        g = kh_group(f, &a, &b);
        for (uint32_t h = a; h < b; h++) {
            if (++f->steps > MAX_STEPS)
                return false;
            uint32_t mark = f->nu;
            if (u_add(f, f->kh[h].memb) && search(f, i + 1, nopen))
                return true;
            f->nu = mark;
        }
    }
    const struct fslot *sl = &f->slots[f->open[i]];
    if (sl->allow_absent && !f->sst[f->fields[sl->field].presence].root) {
        f->absent[i] = 1;
        bool ok = search(f, i + 1, nopen);
        f->absent[i] = 0;
        return ok;
    }
    return false;
}

static bool conj_eval(struct esmd_filter *f, uint32_t c)
{
    const struct fconj *cj = &f->conjs[c];
    uint32_t nopen = 0;
    for (uint32_t k = 0; k < cj->nslots; k++) {
        uint32_t s = f->conj_slots[cj->first + k];
        const struct sstate *st = &f->sst[s];
        bool hit = st->stamp == f->gen;
        if (hit && st->root)
            continue; /* a leaf outside any array: consistent with every choice */
        const struct fslot *sl = &f->slots[s];
        if (sl->allow_absent) {
            const struct sstate *pr = &f->sst[f->fields[sl->field].presence];
            if (pr->stamp != f->gen)
                continue; /* the field is nowhere in the event */
            if (pr->root && !hit)
                return false;
        } else if (!hit) {
            return false;
        }
        f->open[nopen] = s;
        f->absent[nopen] = 0;
        nopen++;
    }
    if (nopen == 0)
        return true;
    /* Fewest options first. */
    for (uint32_t i = 1; i < nopen; i++) {
        uint32_t s = f->open[i], key = f->sst[s].stamp == f->gen ? f->sst[s].nhits : 0;
        uint32_t j = i;
        while (j > 0) {
            uint32_t p = f->open[j - 1];
            uint32_t pk = f->sst[p].stamp == f->gen ? f->sst[p].nhits : 0;
            if (pk <= key)
                break;
            f->open[j] = p;
            j--;
        }
        f->open[j] = s;
    }
    f->nkh = 0;
    for (uint32_t i = 0; i < nopen; i++) {
        const struct fslot *sl = &f->slots[f->open[i]];
        load_hits(f, f->open[i], &f->rng[4 * i], &f->rng[4 * i + 1]);
        f->rng[4 * i + 2] = f->rng[4 * i + 3] = f->nkh;
        if (sl->allow_absent)
            load_hits(f, f->fields[sl->field].presence, &f->rng[4 * i + 2], &f->rng[4 * i + 3]);
    }
    f->nu = 0;
    f->steps = 0;
    return search(f, 0, nopen);
}

static int run(struct esmd_filter *f, const char *event, size_t len, uint32_t *ids, size_t max,
               bool first_only)
{
    if (++f->gen == 0) {
        memset(f->sst, 0, (size_t)f->csst * sizeof(*f->sst));
        memset(f->cst, 0, (size_t)f->ccst * sizeof(*f->cst));
        memset(f->pat_stamp, 0, (size_t)f->cpat_stamp * sizeof(*f->pat_stamp));
        f->gen = 1;
    }
    f->ncands = 0;
    f->nhits = 0;
    f->nchains = 0;
    f->adepth = 0;
    f->memb_cache = NONE;
    f->next_array = 0;
    f->overflow = false;
    if (!event)
        return -1;
    if (first_only && f->npats == 0)
        return 0; /* nothing can match; validity does not matter */
    const char *end = event + len, *p = ws(event, end);
    if (p >= end || *p != '{')
        return -1;
    p = scan_object(f, p, end, 0, 1);
    if (!p || ws(p, end) != end || f->overflow)
        return -1;
    int count = 0;
    uint32_t total = f->ncands + f->nalways;
    for (uint32_t i = 0; i < total; i++) {
        uint32_t c = i < f->ncands ? f->cands[i] : f->always[i - f->ncands];
        uint32_t pat = f->conjs[c].pattern;
        if (f->pat_stamp[pat] == f->gen || !conj_eval(f, c))
            continue;
        f->pat_stamp[pat] = f->gen;
        if (ids && (size_t)count < max)
            ids[count] = f->pat_ids[pat];
        count++;
        if (first_only)
            break;
    }
    return count;
}

/* ------------------------------------------------------------------------------------------ */
/* API                                                                                        */

bool esmd_filter_match(struct esmd_filter *f, const char *event, size_t len)
{
    return run(f, event, len, NULL, 0, true) > 0;
}

int esmd_filter_match_all(struct esmd_filter *f, const char *event, size_t len, uint32_t *ids,
                          size_t max)
{
    return run(f, event, len, ids, max, false);
}
