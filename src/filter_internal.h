/* The filter engine's internals, shared by its three files (include/esmd/filter.h is the API,
 * docs/filters.md the language as implemented):
 *
 *   filter_parse.c    pattern text -> checked alternatives (struct fp_pattern), with errors
 *                     that carry their position in the text;
 *   filter_compile.c  alternatives -> the matcher's index (trie of paths, value tables, slots),
 *                     the compiled-size limits, and the API's constructors;
 *   filter_match.c    the hot path: one scan of an event over the index, then the decision of
 *                     the candidate alternatives; also the value decoders both sides share
 *                     (numbers, string escapes, case folding, IP addresses), so that the
 *                     matcher's calls to them stay inside one translation unit.
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
#ifndef ESMD_FILTER_INTERNAL_H
#define ESMD_FILTER_INTERNAL_H

#include "esmd/common.h"
#include "esmd/filter.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>

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

/* GROW, and the new elements zeroed. */
#define GROWZ(arr, cap, need)                                                                      \
    do {                                                                                           \
        uint32_t old_ = (cap);                                                                     \
        GROW(arr, cap, need);                                                                      \
        if ((cap) > old_)                                                                          \
            memset((arr) + old_, 0, ((size_t)(cap)-old_) * sizeof(*(arr)));                        \
    } while (0)

/* ------------------------------------------------------------------------------------------ */
/* Index keys and JSON numbers (both sides)                                                   */

/* The first min(n, 8) bytes at p as a zero-padded word (same layout as key8_load). */
static inline uint64_t key8(const char *p, size_t n)
{
    uint64_t v = 0;
    memcpy(&v, p, n < 8 ? n : 8);
    return v;
}

/* The hash of an index key: (owner: field or trie node, kind, bytes). */
uint64_t esmd_filter_key_hash(uint32_t owner, int kind, const void *key, size_t n);

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

/* ------------------------------------------------------------------------------------------ */
/* A parsed pattern (filter_parse.c)                                                          */

/* The parser's memory: chunks freed all at once. */
struct chunk {
    struct chunk *next;
    size_t used, cap;
    max_align_t data[];
};

struct arena {
    struct chunk *head;
};

/* Kinds of value matcher (struct pm). */
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

/* One value of a field's list: an exact value or an operator. */
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

/* A field path, segment by segment from the last (keys split at '.'). */
struct ppath {
    const struct ppath *parent;
    const char *seg;
    size_t len;
    size_t depth;
};

/* A condition: a field and its list of values (an OR). */
struct pcond {
    const struct ppath *path;
    struct pm *m;
    size_t nm;
    bool absent; /* exists:false among the values */
};

/* An alternative: conditions that must all hold (an AND). */
struct alt {
    const struct pcond **c;
    size_t n;
};

struct altset {
    struct alt *a;
    size_t n;
};

/* A checked pattern: its alternatives and everything they point to live in the arena. */
struct fp_pattern {
    struct arena arena;
    struct altset alts;
    const struct pcond **conds; /* every condition once (alternatives share them) */
    size_t nconds, cconds;
};

/* Parses and checks a pattern (len bytes of text), leaving out the top-level fields named in
 * skip (NULL-terminated, or NULL). Returns true with *pat filled, or false with *err filled
 * (err may be NULL). Either way the caller frees *pat with esmd_filter_pattern_free. */
bool esmd_filter_parse(struct fp_pattern *pat, const char *text, size_t len,
                       const char *const *skip, struct esmd_filter_error *err);
void esmd_filter_pattern_free(struct fp_pattern *pat);

/* Fills *err (when not NULL) with a message and the position of byte off of text. */
void esmd_filter_fail(struct esmd_filter_error *err, const char *text, size_t len, size_t off,
                      const char *fmt, ...) ESMD_PRINTF(5, 6);

/* ------------------------------------------------------------------------------------------ */
/* Value decoders (filter_match.c)                                                            */

/* The nearest double to a JSON number already validated (number_end); tmp (tmpcap > n bytes)
 * is scratch for the slow path. */
double esmd_filter_number(const char *s, size_t n, char *tmp, size_t tmpcap);
/* Decodes the body of a JSON string whose escapes are valid into out (room for n bytes). */
size_t esmd_filter_unescape(const char *s, size_t n, char *out);
/* Unicode simple case folding of s into out (room for 2 * n bytes). */
size_t esmd_filter_fold(const char *s, size_t n, char *out);
/* An IPv4 or IPv6 address in text: returns 4 or 6 with out filled, 0 if s is not one. */
int esmd_filter_parse_ip(const char *s, size_t n, uint8_t out[16]);
/* Prepares what matching needs once per process (the "C" locale for numbers). */
void esmd_filter_match_init(void);

#endif
