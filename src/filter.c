/* Event filtering: Lambda's / EventBridge's event-pattern language. See include/esmd/filter.h
 * for the API and docs/filters.md for the language as implemented.
 *
 * Compile. The pattern text is parsed into a small tree that keeps byte offsets (for errors),
 * checked, and expanded through "$or" into alternatives: conjunctions of field conditions. Every
 * field path goes into one trie of path segments shared by all patterns; every condition of an
 * alternative becomes a "slot"; its values go into per-field tables: one hash table keyed by
 * (field, kind, bytes) for exact strings, numbers, IP addresses, prefixes, suffixes and their
 * case-folded forms, and short lists for numeric ranges, wildcards, CIDR blocks and the
 * "anything-but" conditions. All checks happen before anything is inserted, so a refused pattern
 * leaves the matcher as it was.
 *
 * Match. The event is scanned once by a hand-written tokenizer, without building a tree: members
 * whose path no pattern mentions are skipped (and still validated). Each leaf value at a known
 * path is looked up in its field's tables, and every hit is recorded against its slot together
 * with the array elements the leaf sits in (its "membership"). An alternative whose required slots
 * all got hits is a candidate. It matches when one hit per slot can be chosen so that no two of
 * them come from different elements of the same array (array consistency), and no leaf of an
 * exists:false field is consistent with that choice. All scratch space lives in the matcher and is
 * reused: matching allocates only when an event is bigger than any seen before.
 */
#include "esmd/filter.h"

#include "esmd/common.h"
#include "filter_fold.h"

#include <locale.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#ifdef __SSE2__
#include <emmintrin.h>
#endif

#define NONE UINT32_MAX
#define NEG_BIT 0x80000000u
/* Nesting limit for patterns and events (deeper events are refused as not JSON). */
#define MAX_DEPTH 512
/* How many alternatives one pattern may expand to through "$or". */
#define MAX_ALTS 1024
/* Caps on per-event scratch: an event past them matches nothing. */
#define MAX_HITS (1u << 22)
#define MAX_CHAIN_WORDS (1u << 24)
#define MAX_SCRATCH ((size_t)64 << 20)
/* Array-consistency search budget per alternative and event. */
#define MAX_STEPS (1u << 20)
/* Trie nodes with more children than this are searched through the hash table. */
#define SMALL_NODE 6

/* ------------------------------------------------------------------------------------------ */
/* Storage                                                                                    */

#define GROW(arr, cap, need)                                                                       \
    do {                                                                                           \
        if ((size_t)(need) > (size_t)(cap)) {                                                      \
            size_t ncap_ = (cap) ? (size_t)(cap) : 16;                                             \
            while (ncap_ < (size_t)(need))                                                         \
                ncap_ *= 2;                                                                        \
            (arr) = esmd_xrealloc((arr), ncap_ * sizeof(*(arr)));                                  \
            (cap) = (uint32_t)ncap_;                                                               \
        }                                                                                          \
    } while (0)

/* Kinds of hash-table entries. */
enum {
    K_KEY = 1, /* trie: (node, segment) -> child node */
    K_STR,     /* exact string */
    K_NUM,     /* exact number: the 8 bytes of the double */
    K_PREFIX,  /* prefix of a string */
    K_SUFFIX,  /* suffix of a string */
    K_EIC,     /* case-folded string */
    K_PREFIX_EIC,
    K_SUFFIX_EIC,
    K_IP, /* exact string that is an IP address: family byte + address */
};

/* Length lists of a field, by kind. */
enum { L_PREFIX, L_SUFFIX, L_PREFIX_EIC, L_SUFFIX_EIC };

/* Field flags: which lookups a leaf value needs. */
enum {
    FF_STR = 1,   /* K_STR entries */
    FF_NUM = 2,   /* K_NUM entries */
    FF_EIC = 4,   /* K_EIC entries */
    FF_FOLD = 8,  /* any case-folded lookup */
    FF_IPX = 16,  /* K_IP entries */
    FF_IP = 32,   /* needs the value parsed as an IP address (K_IP or CIDR) */
    FF_NUMV = 64, /* needs the numeric value (K_NUM or ranges) */
};

/* A child of a small trie node, kept inline: the first 8 bytes of its name (zero-padded) let
 * most keys be compared without a call to memcmp. */
struct fkid {
    uint64_t name8, name16; /* bytes 0-7 and 8-15 of the name, zero-padded */
    uint32_t len, node;
};

struct fnode {
    uint32_t name_off, name_len;
    uint32_t first_child, nchildren; /* first_child: the latest added */
    uint32_t field;                  /* NONE: no condition ends here */
    uint64_t lenmask;                /* bit min(len, 63) set for each child's name length */
    struct fkid kids[SMALL_NODE];    /* while nchildren <= SMALL_NODE */
};

struct fentry {
    uint64_t hash;
    uint32_t owner; /* field, or node for K_KEY */
    uint32_t key_off, key_len;
    uint32_t targets; /* list of slots / NEG_BIT|neg */
    uint32_t value;   /* K_KEY: the child node */
    uint8_t kind;
};

struct flink {
    uint32_t val, next;
};

struct frange {
    double lo, hi;
    uint32_t target, next;
    uint8_t lo_incl, hi_incl;
};

struct fwild {
    uint32_t segs, nsegs; /* pairs (offset, length) in wsegs */
    uint32_t target, next;
};

struct fcidr {
    uint8_t addr[16];
    uint8_t family, bits;
    uint32_t target, next;
};

struct ffield {
    uint32_t flags;
    uint32_t lens[4];              /* sorted lists of distinct lengths (flink) */
    uint32_t ranges, wilds, cidrs; /* lists */
    uint32_t any;                  /* exists:true targets (flink) */
    uint32_t negs;                 /* anything-but conditions (flink of neg ids) */
    uint32_t lits[3];              /* false, true, null targets (flink) */
    uint32_t presence;             /* slot recording every leaf, or NONE */
};

struct fslot {
    uint32_t conj; /* NONE for a presence slot */
    uint32_t field;
    uint8_t allow_absent; /* exists:false among its values */
};

struct fconj {
    uint32_t pattern;
    uint32_t first, nslots; /* in conj_slots */
    uint32_t nrequired;
};

/* Per-event state of a slot (valid when stamp == gen). */
struct sstate {
    uint32_t stamp, head, nhits;
    uint32_t root; /* hit by a leaf outside any array: consistent with everything */
};

struct cstate {
    uint32_t stamp, count;
};

struct hit {
    uint32_t memb, next;
};

struct astk {
    uint32_t id, idx;
};

/* A hit keyed by the outermost array element it sits in (for the consistency search). */
struct khit {
    uint64_t key; /* array id << 32 | element index */
    uint32_t memb;
};

struct esmd_filter {
    struct fnode *nodes;
    uint32_t nnodes, cnodes;
    struct ffield *fields;
    uint32_t nfields, cfields;
    struct fentry *ents;
    uint32_t nents, cents;
    uint32_t *index; /* entry + 1, 0 = empty */
    uint32_t index_cap;
    struct flink *links;
    uint32_t nlinks, clinks;
    struct frange *ranges;
    uint32_t nranges, cranges;
    struct fwild *wilds;
    uint32_t nwilds, cwilds;
    uint32_t *wsegs;
    uint32_t nwsegs, cwsegs;
    struct fcidr *cidrs;
    uint32_t ncidrs, ccidrs;
    uint32_t *neg_slot;
    uint32_t nnegs, cnegs;
    struct fslot *slots;
    uint32_t nslots, cslots;
    uint32_t *conj_slots; /* the slots of each alternative, in a row */
    uint32_t nconj_slots, cconj_slots;
    struct fconj *conjs;
    uint32_t nconjs, cconjs;
    uint32_t *pat_ids;
    uint32_t npats, cpats;
    uint32_t *always; /* alternatives without required slots */
    uint32_t nalways, calways;
    char *str;
    uint32_t nstr, cstr;
    uint32_t max_conj_slots;

    /* Scratch for matching. */
    uint32_t gen, leafgen;
    struct sstate *sst;
    uint32_t csst;
    struct cstate *cst;
    uint32_t ccst;
    uint32_t *neg_stamp;
    uint32_t cneg_stamp;
    uint32_t *pat_stamp;
    uint32_t cpat_stamp;
    uint32_t *cands;
    uint32_t ncands, ccands;
    struct hit *hits;
    uint32_t nhits, chits;
    uint32_t *chains;
    uint32_t nchains, cchains;
    struct astk *astk;
    uint32_t adepth, castk;
    uint32_t memb_cache, next_array;
    bool overflow;
    char *sbuf; /* decoded strings */
    size_t csbuf;
    char *fbuf; /* case-folded strings */
    size_t cfbuf;
    uint32_t *u; /* search: union of chosen memberships, pairs (array, index) */
    uint32_t nu, cu;
    uint32_t *open;  /* the slots to decide, fewest options first */
    uint8_t *absent; /* open slot i decided as "field absent" */
    uint32_t *rng;   /* open slot i: its hits kh[rng[4i], rng[4i+1]), presence hits after */
    uint32_t copen;
    struct khit *kh;
    uint32_t nkh, ckh;
    uint32_t steps;
};

/* ------------------------------------------------------------------------------------------ */
/* Hashing, numbers, UTF-8, case folding, IP addresses                                        */

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

/* The first min(n, 8) bytes at p as a zero-padded word (same layout as key8_load). */
static inline uint64_t key8(const char *p, size_t n)
{
    uint64_t v = 0;
    memcpy(&v, p, n < 8 ? n : 8);
    return v;
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

/* Validates the JSON number grammar at p; returns its end or NULL. */
static inline const char *number_end(const char *p, const char *end)
{
    if (p < end && *p == '-')
        p++;
    if (p >= end)
        return NULL;
    if (*p == '0') {
        p++;
    } else if (*p >= '1' && *p <= '9') {
        p++;
        while (p < end && *p >= '0' && *p <= '9')
            p++;
    } else {
        return NULL;
    }
    if (p < end && *p == '.') {
        p++;
        if (p >= end || *p < '0' || *p > '9')
            return NULL;
        while (p < end && *p >= '0' && *p <= '9')
            p++;
    }
    if (p < end && (*p == 'e' || *p == 'E')) {
        p++;
        if (p < end && (*p == '+' || *p == '-'))
            p++;
        if (p >= end || *p < '0' || *p > '9')
            return NULL;
        while (p < end && *p >= '0' && *p <= '9')
            p++;
    }
    return p;
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

/* Decodes one UTF-8 sequence at s (n bytes left, n > 0). Returns its length, with *cp set, or 0
 * for a malformed sequence. */
static size_t utf8_get(const unsigned char *s, size_t n, uint32_t *cp)
{
    unsigned char c = s[0];
    size_t len;
    uint32_t v;
    if (c < 0x80) {
        *cp = c;
        return 1;
    }
    if (c >= 0xC2 && c <= 0xDF) {
        len = 2;
        v = c & 0x1F;
    } else if (c >= 0xE0 && c <= 0xEF) {
        len = 3;
        v = c & 0x0F;
    } else if (c >= 0xF0 && c <= 0xF4) {
        len = 4;
        v = c & 0x07;
    } else {
        return 0;
    }
    if (n < len)
        return 0;
    for (size_t i = 1; i < len; i++) {
        if ((s[i] & 0xC0) != 0x80)
            return 0;
        v = (v << 6) | (s[i] & 0x3F);
    }
    if ((len == 3 && v < 0x800) || (len == 4 && (v < 0x10000 || v > 0x10FFFF)))
        return 0;
    *cp = v;
    return len;
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

/* Unicode simple case folding of s into out (room for 2 * n bytes); malformed UTF-8 bytes are
 * copied as they are. Returns the folded length. */
static size_t fold(const char *s, size_t n, char *out)
{
    const unsigned char *u = (const unsigned char *)s;
    size_t i = 0, o = 0;
    while (i < n) {
        unsigned char c = u[i];
        if (c < 0x80) {
            out[o++] = (char)(c >= 'A' && c <= 'Z' ? c + 32 : c);
            i++;
            continue;
        }
        uint32_t cp;
        size_t len = utf8_get(u + i, n - i, &cp);
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

static int hexval(unsigned char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}

static bool parse_ipv4(const char *s, size_t n, uint8_t out[4])
{
    size_t i = 0;
    for (int k = 0; k < 4; k++) {
        if (k > 0) {
            if (i >= n || s[i] != '.')
                return false;
            i++;
        }
        unsigned v = 0;
        size_t nd = 0, start = i;
        while (i < n && s[i] >= '0' && s[i] <= '9' && nd < 4) {
            v = v * 10 + (unsigned)(s[i] - '0');
            i++;
            nd++;
        }
        if (nd == 0 || nd > 3 || v > 255 || (nd > 1 && s[start] == '0'))
            return false;
        out[k] = (uint8_t)v;
    }
    return i == n;
}

static bool parse_ipv6(const char *s, size_t n, uint8_t out[16])
{
    uint16_t g[8];
    int ng = 0, gap = -1;
    size_t i = 0;
    if (n < 2)
        return false;
    if (s[0] == ':') {
        if (s[1] != ':')
            return false;
        gap = 0;
        i = 2;
        if (i == n)
            goto done;
    }
    for (;;) {
        /* One group, or an IPv4 tail. */
        size_t start = i;
        unsigned v = 0;
        int nd = 0;
        while (i < n && hexval((unsigned char)s[i]) >= 0 && nd < 5) {
            v = v * 16 + (unsigned)hexval((unsigned char)s[i]);
            i++;
            nd++;
        }
        if (i < n && s[i] == '.') {
            uint8_t v4[4];
            if (ng > 6 || !parse_ipv4(s + start, n - start, v4))
                return false;
            g[ng++] = (uint16_t)(v4[0] << 8 | v4[1]);
            g[ng++] = (uint16_t)(v4[2] << 8 | v4[3]);
            i = n;
            break;
        }
        if (nd == 0 || nd > 4 || ng >= 8)
            return false;
        g[ng++] = (uint16_t)v;
        if (i == n)
            break;
        if (s[i] != ':')
            return false;
        i++;
        if (i < n && s[i] == ':') {
            if (gap >= 0)
                return false;
            gap = ng;
            i++;
            if (i == n)
                break;
        } else if (i == n) {
            return false;
        }
    }
done:
    if (gap < 0 ? ng != 8 : ng > 7)
        return false;
    memset(out, 0, 16);
    int tail = gap < 0 ? 0 : ng - gap;
    int head = gap < 0 ? ng : gap;
    for (int k = 0; k < head; k++) {
        out[2 * k] = (uint8_t)(g[k] >> 8);
        out[2 * k + 1] = (uint8_t)g[k];
    }
    for (int k = 0; k < tail; k++) {
        int pos = 8 - tail + k;
        out[2 * pos] = (uint8_t)(g[head + k] >> 8);
        out[2 * pos + 1] = (uint8_t)g[head + k];
    }
    return true;
}

/* Parses an IPv4 or IPv6 address: returns 4 or 6 (out filled), 0 if it is not one. */
static int parse_ip(const char *s, size_t n, uint8_t out[16])
{
    if (n < 2 || n > 45)
        return 0;
    if (memchr(s, ':', n))
        return parse_ipv6(s, n, out) ? 6 : 0;
    return parse_ipv4(s, n, out) ? 4 : 0;
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
            uint32_t cp = (uint32_t)(hexval(h[0]) << 12 | hexval(h[1]) << 8 | hexval(h[2]) << 4 |
                                     hexval(h[3]));
            i += 4;
            if (cp >= 0xD800 && cp <= 0xDBFF && i + 6 <= n && s[i] == '\\' && s[i + 1] == 'u') {
                h = (const unsigned char *)s + i + 2;
                uint32_t lo = (uint32_t)(hexval(h[0]) << 12 | hexval(h[1]) << 8 |
                                         hexval(h[2]) << 4 | hexval(h[3]));
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

/* ------------------------------------------------------------------------------------------ */
/* Compile: arena and pattern parser                                                          */

struct chunk {
    struct chunk *next;
    size_t used, cap;
    max_align_t data[];
};

struct arena {
    struct chunk *head;
};

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
    struct arena arena;
    struct esmd_filter_error *err;
    bool failed;
    const char *const *skip;
};

static void fail(struct cctx *cx, size_t off, const char *fmt, ...) ESMD_PRINTF(3, 4);

static void fail(struct cctx *cx, size_t off, const char *fmt, ...)
{
    if (cx->failed)
        return;
    cx->failed = true;
    if (!cx->err)
        return;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(cx->err->message, sizeof(cx->err->message), fmt, ap);
    va_end(ap);
    if (off > cx->len)
        off = cx->len;
    int line = 1;
    size_t bol = 0;
    for (size_t i = 0; i < off; i++) {
        if (cx->text[i] == '\n') {
            line++;
            bol = i + 1;
        }
    }
    cx->err->offset = off;
    cx->err->line = line;
    cx->err->column = (int)(off - bol) + 1;
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
                    if (i + k >= cx->len || hexval((unsigned char)cx->text[i + k]) < 0) {
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
    char *buf = arena_alloc(&cx->arena, i - start + 1);
    *outlen = unescape(cx->text + start, i - start, buf);
    buf[*outlen] = '\0';
    *out = buf;
    cx->pos = i + 1;
    return true;
}

static struct jv *jp_value(struct cctx *cx, int depth);

static struct jv *jv_new(struct cctx *cx, int type)
{
    struct jv *v = arena_alloc(&cx->arena, sizeof(*v));
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
    v->mems = arena_alloc(&cx->arena, v->n * sizeof(*mems));
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
    v->items = arena_alloc(&cx->arena, v->n * sizeof(*items));
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
        char *tmp = arena_alloc(&cx->arena, n + 1);
        v->s = p;
        v->len = n;
        v->num = number_value(p, n, tmp, n + 1);
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

enum {
    M_STR,
    M_NUM,
    M_FALSE,
    M_TRUE,
    M_NULL,
    M_PREFIX,
    M_SUFFIX,
    M_EIC,
    M_PREFIX_EIC,
    M_SUFFIX_EIC,
    M_WILD,
    M_RANGE,
    M_EXISTS,
    M_CIDR,
    M_ANYBUT,
};

struct pm {
    int kind;
    const char *s; /* strings, case-folded for the EIC kinds */
    size_t len;
    double num;
    double lo, hi;
    bool lo_incl, hi_incl;
    const char **segs; /* M_WILD: the literal pieces between the stars */
    size_t *seglens;
    size_t nsegs;
    uint8_t addr[16]; /* M_CIDR */
    int family, bits;
    struct pm *inner; /* M_ANYBUT: what it excludes */
    size_t ninner;
};

struct ppath {
    const struct ppath *parent;
    const char *seg;
    size_t len;
    size_t depth;
};

struct pcond {
    const struct ppath *path;
    struct pm *m;
    size_t nm;
    bool absent; /* exists:false among the values */
};

struct alt {
    const struct pcond **c;
    size_t n;
};

struct altset {
    struct alt *a;
    size_t n;
};

#define KEYFMT "%.*s%s"
#define KEYARG(k, n) (int)((n) > 60 ? 60 : (n)), (k), ((n) > 60 ? "..." : "")

static bool str_is(const char *s, size_t n, const char *lit)
{
    return n == strlen(lit) && memcmp(s, lit, n) == 0;
}

static const char *fold_arena(struct cctx *cx, const char *s, size_t n, size_t *outlen)
{
    char *buf = arena_alloc(&cx->arena, 2 * n + 1);
    *outlen = fold(s, n, buf);
    return buf;
}

static bool compile_wild(struct cctx *cx, const struct jv *v, const char *op, struct pm *m)
{
    size_t n = v->len, nstars = 0;
    for (size_t i = 0; i < n; i++)
        nstars += v->s[i] == '*';
    char *buf = arena_alloc(&cx->arena, n + 1);
    m->kind = M_WILD;
    m->segs = arena_alloc(&cx->arena, (nstars + 1) * sizeof(*m->segs));
    m->seglens = arena_alloc(&cx->arena, (nstars + 1) * sizeof(*m->seglens));
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
    int family = slash ? parse_ip(v->s, alen, m->addr) : 0;
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
        m->inner = arena_alloc(&cx->arena, sizeof(*m->inner));
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
        m->inner = arena_alloc(&cx->arena, v->n * sizeof(*m->inner));
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
    m->inner = arena_alloc(&cx->arena, n * sizeof(*m->inner));
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
    struct pcond *c = arena_alloc(&cx->arena, sizeof(*c));
    c->path = path;
    c->m = arena_alloc(&cx->arena, arr->n * sizeof(*c->m));
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
    out.a = arena_alloc(&cx->arena, out.n * sizeof(*out.a));
    size_t k = 0;
    for (size_t i = 0; i < set->n; i++) {
        for (size_t j = 0; j < b->n; j++) {
            struct alt *a = &out.a[k++];
            a->n = set->a[i].n + b->a[j].n;
            a->c = arena_alloc(&cx->arena, (a->n ? a->n : 1) * sizeof(*a->c));
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
        struct ppath *p = arena_alloc(&cx->arena, sizeof(*p));
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
    set.a = arena_alloc(&cx->arena, sizeof(*set.a));
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
            struct altset *branches = arena_alloc(&cx->arena, v->n * sizeof(*branches));
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
            u.a = arena_alloc(&cx->arena, total * sizeof(*u.a));
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
                const struct pcond **nc = arena_alloc(&cx->arena, (a->n + 1) * sizeof(*nc));
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

/* ------------------------------------------------------------------------------------------ */
/* Insertion into the matcher (after every check passed: cannot fail)                         */

#define GROWZ(arr, cap, need)                                                                      \
    do {                                                                                           \
        uint32_t old_ = (cap);                                                                     \
        GROW(arr, cap, need);                                                                      \
        if ((cap) > old_)                                                                          \
            memset((arr) + old_, 0, ((size_t)(cap)-old_) * sizeof(*(arr)));                        \
    } while (0)

static uint32_t str_add(struct esmd_filter *f, const void *s, size_t n)
{
    GROW(f->str, f->cstr, (size_t)f->nstr + n + 1);
    uint32_t off = f->nstr;
    if (n)
        memcpy(f->str + off, s, n);
    f->nstr += (uint32_t)n;
    return off;
}

static uint32_t link_add(struct esmd_filter *f, uint32_t val, uint32_t next)
{
    GROW(f->links, f->clinks, f->nlinks + 1);
    f->links[f->nlinks] = (struct flink){val, next};
    return f->nlinks++;
}

static inline uint32_t ht_find(const struct esmd_filter *f, uint32_t owner, int kind,
                               const char *key, size_t n, uint64_t h)
{
    uint32_t mask = f->index_cap - 1;
    for (uint32_t i = (uint32_t)h & mask;; i = (i + 1) & mask) {
        uint32_t e = f->index[i];
        if (!e)
            return NONE;
        const struct fentry *en = &f->ents[e - 1];
        if (en->hash == h && en->owner == owner && en->kind == kind && en->key_len == n &&
            memcmp(f->str + en->key_off, key, n) == 0)
            return e - 1;
    }
}

static void ht_place(struct esmd_filter *f, uint32_t e)
{
    uint32_t mask = f->index_cap - 1, i = (uint32_t)f->ents[e].hash & mask;
    while (f->index[i])
        i = (i + 1) & mask;
    f->index[i] = e + 1;
}

static uint32_t ht_add(struct esmd_filter *f, uint32_t owner, int kind, const void *key, size_t n)
{
    uint64_t h = key_hash(owner, kind, key, n);
    uint32_t e = ht_find(f, owner, kind, key, n, h);
    if (e != NONE)
        return e;
    if ((size_t)(f->nents + 1) * 2 > f->index_cap) {
        free(f->index);
        f->index_cap *= 2;
        f->index = esmd_xcalloc(f->index_cap, sizeof(*f->index));
        for (uint32_t k = 0; k < f->nents; k++)
            ht_place(f, k);
    }
    GROW(f->ents, f->cents, f->nents + 1);
    e = f->nents++;
    struct fentry *en = &f->ents[e];
    en->hash = h;
    en->owner = owner;
    en->kind = (uint8_t)kind;
    en->key_off = str_add(f, key, n);
    en->key_len = (uint32_t)n;
    en->targets = NONE;
    en->value = NONE;
    ht_place(f, e);
    return e;
}

static void entry_target(struct esmd_filter *f, uint32_t field, int kind, const void *key, size_t n,
                         uint32_t target)
{
    uint32_t e = ht_add(f, field, kind, key, n);
    uint32_t l = link_add(f, target, f->ents[e].targets);
    f->ents[e].targets = l;
}

static uint32_t node_child(struct esmd_filter *f, uint32_t node, const char *seg, size_t n)
{
    uint32_t e = ht_add(f, node, K_KEY, seg, n);
    if (f->ents[e].value != NONE)
        return f->ents[e].value;
    GROW(f->nodes, f->cnodes, f->nnodes + 1);
    uint32_t c = f->nnodes++;
    struct fnode *nd = &f->nodes[c];
    memset(nd, 0, sizeof(*nd));
    nd->name_off = f->ents[e].key_off;
    nd->name_len = (uint32_t)n;
    nd->first_child = NONE;
    nd->field = NONE;
    struct fnode *parent = &f->nodes[node];
    parent->lenmask |= 1ull << (n < 63 ? n : 63);
    if (parent->nchildren < SMALL_NODE)
        parent->kids[parent->nchildren] =
            (struct fkid){key8(seg, n), n > 8 ? key8(seg + 8, n - 8) : 0, (uint32_t)n, c};
    parent->first_child = c;
    parent->nchildren++;
    f->ents[e].value = c;
    return c;
}

static uint32_t path_node(struct esmd_filter *f, const struct ppath *path)
{
    if (!path)
        return 0;
    const struct ppath **segs = esmd_xmalloc(path->depth * sizeof(*segs));
    size_t n = 0;
    for (const struct ppath *p = path; p; p = p->parent)
        segs[n++] = p;
    uint32_t node = 0;
    while (n > 0) {
        n--;
        node = node_child(f, node, segs[n]->seg, segs[n]->len);
    }
    free(segs);
    return node;
}

static uint32_t node_field(struct esmd_filter *f, uint32_t node)
{
    if (f->nodes[node].field != NONE)
        return f->nodes[node].field;
    GROW(f->fields, f->cfields, f->nfields + 1);
    uint32_t fi = f->nfields++;
    struct ffield *fd = &f->fields[fi];
    fd->flags = 0;
    for (int i = 0; i < 4; i++)
        fd->lens[i] = NONE;
    fd->ranges = fd->wilds = fd->cidrs = fd->any = fd->negs = NONE;
    fd->lits[0] = fd->lits[1] = fd->lits[2] = NONE;
    fd->presence = NONE;
    f->nodes[node].field = fi;
    return fi;
}

static uint32_t slot_new(struct esmd_filter *f, uint32_t conj, uint32_t field, bool absent)
{
    GROW(f->slots, f->cslots, f->nslots + 1);
    f->slots[f->nslots] = (struct fslot){conj, field, absent};
    return f->nslots++;
}

/* Adds len to a field's sorted list of distinct lengths. */
static void lens_add(struct esmd_filter *f, uint32_t field, int which, size_t len)
{
    uint32_t prev = NONE, cur = f->fields[field].lens[which];
    while (cur != NONE && f->links[cur].val < len) {
        prev = cur;
        cur = f->links[cur].next;
    }
    if (cur != NONE && f->links[cur].val == len)
        return;
    uint32_t l = link_add(f, (uint32_t)len, cur);
    if (prev == NONE)
        f->fields[field].lens[which] = l;
    else
        f->links[prev].next = l;
}

static void add_matcher(struct esmd_filter *f, uint32_t field, const struct pm *m, uint32_t target)
{
    struct ffield *fd = &f->fields[field];
    switch (m->kind) {
    case M_STR: {
        entry_target(f, field, K_STR, m->s, m->len, target);
        fd->flags |= FF_STR;
        /* event-ruler matches IP addresses by value: "2001:db8::1" is "2001:0db8:0:0:0:0:0:1". */
        uint8_t ip[17];
        int family = parse_ip(m->s, m->len, ip + 1);
        if (family) {
            ip[0] = (uint8_t)family;
            entry_target(f, field, K_IP, ip, family == 4 ? 5 : 17, target);
            fd->flags |= FF_IPX | FF_IP;
        }
        break;
    }
    case M_NUM: {
        double d = m->num == 0 ? 0.0 : m->num;
        entry_target(f, field, K_NUM, &d, sizeof(d), target);
        fd->flags |= FF_NUM | FF_NUMV;
        break;
    }
    case M_FALSE:
    case M_TRUE:
    case M_NULL: {
        int k = m->kind - M_FALSE;
        uint32_t l = link_add(f, target, fd->lits[k]);
        fd->lits[k] = l;
        break;
    }
    case M_PREFIX:
    case M_SUFFIX:
    case M_PREFIX_EIC:
    case M_SUFFIX_EIC: {
        static const int kinds[] = {K_PREFIX, K_SUFFIX, 0, K_PREFIX_EIC, K_SUFFIX_EIC};
        static const int lists[] = {L_PREFIX, L_SUFFIX, 0, L_PREFIX_EIC, L_SUFFIX_EIC};
        int i = m->kind - M_PREFIX;
        entry_target(f, field, kinds[i], m->s, m->len, target);
        lens_add(f, field, lists[i], m->len);
        if (m->kind == M_PREFIX_EIC || m->kind == M_SUFFIX_EIC)
            fd->flags |= FF_FOLD;
        break;
    }
    case M_EIC:
        entry_target(f, field, K_EIC, m->s, m->len, target);
        fd->flags |= FF_EIC | FF_FOLD;
        break;
    case M_WILD: {
        GROW(f->wsegs, f->cwsegs, f->nwsegs + 2 * m->nsegs);
        uint32_t segs = f->nwsegs;
        for (size_t i = 0; i < m->nsegs; i++) {
            uint32_t off = str_add(f, m->segs[i], m->seglens[i]);
            f->wsegs[f->nwsegs++] = off;
            f->wsegs[f->nwsegs++] = (uint32_t)m->seglens[i];
        }
        GROW(f->wilds, f->cwilds, f->nwilds + 1);
        f->wilds[f->nwilds] = (struct fwild){segs, (uint32_t)m->nsegs, target, fd->wilds};
        fd->wilds = f->nwilds++;
        break;
    }
    case M_RANGE:
        GROW(f->ranges, f->cranges, f->nranges + 1);
        f->ranges[f->nranges] =
            (struct frange){m->lo, m->hi, target, fd->ranges, m->lo_incl, m->hi_incl};
        fd->ranges = f->nranges++;
        fd->flags |= FF_NUMV;
        break;
    case M_EXISTS: {
        uint32_t l = link_add(f, target, fd->any);
        fd->any = l;
        break;
    }
    case M_CIDR: {
        GROW(f->cidrs, f->ccidrs, f->ncidrs + 1);
        struct fcidr *c = &f->cidrs[f->ncidrs];
        memcpy(c->addr, m->addr, sizeof(c->addr));
        c->family = (uint8_t)m->family;
        c->bits = (uint8_t)m->bits;
        c->target = target;
        c->next = fd->cidrs;
        fd->cidrs = f->ncidrs++;
        fd->flags |= FF_IP;
        break;
    }
    case M_ANYBUT: {
        GROW(f->neg_slot, f->cnegs, f->nnegs + 1);
        uint32_t neg = f->nnegs++;
        f->neg_slot[neg] = target;
        uint32_t l = link_add(f, neg, fd->negs);
        fd->negs = l;
        for (size_t i = 0; i < m->ninner; i++)
            add_matcher(f, field, &m->inner[i], NEG_BIT | neg);
        break;
    }
    default:
        break;
    }
}

static void scratch_fit(struct esmd_filter *f)
{
    GROWZ(f->sst, f->csst, f->nslots);
    GROWZ(f->cst, f->ccst, f->nconjs);
    GROWZ(f->neg_stamp, f->cneg_stamp, f->nnegs);
    GROWZ(f->pat_stamp, f->cpat_stamp, f->npats);
    GROW(f->cands, f->ccands, f->nconjs);
    uint32_t old = f->copen;
    GROW(f->open, f->copen, f->max_conj_slots);
    if (f->copen != old || !f->absent) {
        f->absent = esmd_xrealloc(f->absent, f->copen ? f->copen : 1);
        f->rng = esmd_xrealloc(f->rng, 4 * sizeof(*f->rng) * (f->copen ? f->copen : 1));
    }
}

static void insert(struct esmd_filter *f, const struct altset *set, uint32_t id)
{
    GROW(f->pat_ids, f->cpats, f->npats + 1);
    uint32_t pat = f->npats++;
    f->pat_ids[pat] = id;
    for (size_t a = 0; a < set->n; a++) {
        const struct alt *al = &set->a[a];
        GROW(f->conjs, f->cconjs, f->nconjs + 1);
        uint32_t c = f->nconjs++;
        GROW(f->conj_slots, f->cconj_slots, f->nconj_slots + al->n);
        uint32_t first = f->nconj_slots, nreq = 0;
        for (size_t k = 0; k < al->n; k++) {
            const struct pcond *pc = al->c[k];
            uint32_t field = node_field(f, path_node(f, pc->path));
            if (pc->absent && f->fields[field].presence == NONE) {
                uint32_t ps = slot_new(f, NONE, field, false);
                f->fields[field].presence = ps;
            }
            uint32_t s = slot_new(f, c, field, pc->absent);
            f->conj_slots[f->nconj_slots++] = s;
            nreq += !pc->absent;
            for (size_t i = 0; i < pc->nm; i++)
                add_matcher(f, field, &pc->m[i], s);
        }
        f->conjs[c] = (struct fconj){pat, first, (uint32_t)al->n, nreq};
        if (nreq == 0) {
            GROW(f->always, f->calways, f->nalways + 1);
            f->always[f->nalways++] = c;
        }
        if (al->n > f->max_conj_slots)
            f->max_conj_slots = (uint32_t)al->n;
    }
    scratch_fit(f);
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
            if (hexval((unsigned char)p[k]) < 0)
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

struct esmd_filter *esmd_filter_new(void)
{
    struct esmd_filter *f = esmd_xcalloc(1, sizeof(*f));
    GROW(f->nodes, f->cnodes, 1);
    memset(&f->nodes[0], 0, sizeof(f->nodes[0]));
    f->nodes[0].first_child = NONE;
    f->nodes[0].field = NONE;
    f->nnodes = 1;
    f->index_cap = 64;
    f->index = esmd_xcalloc(f->index_cap, sizeof(*f->index));
    f->astk = esmd_xmalloc(MAX_DEPTH * sizeof(*f->astk));
    f->castk = MAX_DEPTH;
    f->memb_cache = NONE;
    scratch_fit(f);
    pthread_once(&c_locale_once, c_locale_init);
    return f;
}

void esmd_filter_free(struct esmd_filter *f)
{
    if (!f)
        return;
    free(f->nodes);
    free(f->fields);
    free(f->ents);
    free(f->index);
    free(f->links);
    free(f->ranges);
    free(f->wilds);
    free(f->wsegs);
    free(f->cidrs);
    free(f->neg_slot);
    free(f->slots);
    free(f->conj_slots);
    free(f->conjs);
    free(f->pat_ids);
    free(f->always);
    free(f->str);
    free(f->sst);
    free(f->cst);
    free(f->neg_stamp);
    free(f->pat_stamp);
    free(f->cands);
    free(f->hits);
    free(f->chains);
    free(f->astk);
    free(f->sbuf);
    free(f->fbuf);
    free(f->u);
    free(f->open);
    free(f->absent);
    free(f->rng);
    free(f->kh);
    free(f);
}

static int add(struct esmd_filter *f, const char *pattern, size_t len, uint32_t id,
               const char *const *skip, struct esmd_filter_error *err)
{
    struct cctx cx = {
        .text = pattern ? pattern : "", .len = pattern ? len : 0, .err = err, .skip = skip};
    struct altset set;
    bool ok = compile(&cx, &set);
    if (ok && f)
        insert(f, &set, id);
    arena_free(&cx.arena);
    return ok ? 0 : -1;
}

int esmd_filter_add(struct esmd_filter *f, const char *pattern, size_t len, uint32_t id,
                    struct esmd_filter_error *err)
{
    return add(f, pattern, len, id, NULL, err);
}

int esmd_filter_add_skip(struct esmd_filter *f, const char *pattern, size_t len, uint32_t id,
                         const char *const *skip, struct esmd_filter_error *err)
{
    return add(f, pattern, len, id, skip, err);
}

int esmd_filter_check(const char *pattern, size_t len, struct esmd_filter_error *err)
{
    return add(NULL, pattern, len, 0, NULL, err);
}

size_t esmd_filter_count_patterns(const struct esmd_filter *f)
{
    return f ? f->npats : 0;
}

bool esmd_filter_match(struct esmd_filter *f, const char *event, size_t len)
{
    return run(f, event, len, NULL, 0, true) > 0;
}

int esmd_filter_match_all(struct esmd_filter *f, const char *event, size_t len, uint32_t *ids,
                          size_t max)
{
    return run(f, event, len, ids, max, false);
}
