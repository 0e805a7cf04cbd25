/* The filter's compiler: checked alternatives (filter_parse.c) -> the matcher's index, which
 * filter_match.c scans (filter_internal.h). Insertion cannot fail: every check, the compiled
 * size included, happens before anything is inserted, so a refused pattern leaves the matcher as
 * it was. */
#include "filter_internal.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ------------------------------------------------------------------------------------------ */
/* Insertion into the matcher (after every check passed: cannot fail)                         */

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

static void ht_place(struct esmd_filter *f, uint32_t e)
{
    uint32_t mask = f->index_cap - 1, i = (uint32_t)f->ents[e].hash & mask;
    while (f->index[i])
        i = (i + 1) & mask;
    f->index[i] = e + 1;
}

static uint32_t ht_add(struct esmd_filter *f, uint32_t owner, int kind, const void *key, size_t n)
{
    uint64_t h = esmd_filter_key_hash(owner, kind, key, n);
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
        int family = esmd_filter_parse_ip(m->s, m->len, ip + 1);
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
    esmd_filter_match_init();
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

/* ------------------------------------------------------------------------------------------ */
/* Compiled size                                                                              */

/* Bytes of index entry for a value (an entry, its share of the open-addressing table, the key). */
#define ENTRY_COST(keylen) (sizeof(struct fentry) + 4 * sizeof(uint32_t) + (keylen))

/* What a value of a condition adds to a matcher. shared: what the alternatives that hold the
 * condition share (index entries of its keys, made once); otherwise what each of them adds
 * (links to its slot, range, wildcard and CIDR records: "$or" multiplies these). */
static size_t value_cost(const struct pm *m, bool shared)
{
    switch (m->kind) {
    case M_STR: { /* and one more entry when the string is an IP address */
        uint8_t ip[16];
        size_t n = esmd_filter_parse_ip(m->s, m->len, ip) ? 2 : 1;
        return shared ? ENTRY_COST(m->len) + (n - 1) * ENTRY_COST(17) : n * sizeof(struct flink);
    }
    case M_NUM:
        return shared ? ENTRY_COST(sizeof(double)) : sizeof(struct flink);
    case M_PREFIX:
    case M_SUFFIX:
    case M_PREFIX_EIC:
    case M_SUFFIX_EIC:
    case M_EIC:
        return shared ? ENTRY_COST(m->len) + sizeof(struct flink) : sizeof(struct flink);
    case M_WILD: {
        if (shared)
            return 0;
        size_t n = sizeof(struct fwild) + m->nsegs * 2 * sizeof(uint32_t);
        for (size_t i = 0; i < m->nsegs; i++)
            n += m->seglens[i];
        return n;
    }
    case M_RANGE:
        return shared ? 0 : sizeof(struct frange);
    case M_CIDR:
        return shared ? 0 : sizeof(struct fcidr);
    case M_ANYBUT: {
        size_t n = shared ? 0 : 2 * sizeof(uint32_t) + sizeof(struct flink);
        for (size_t i = 0; i < m->ninner; i++)
            n += value_cost(&m->inner[i], shared);
        return n;
    }
    default: /* true, false, null, exists: a link */
        return shared ? 0 : sizeof(struct flink);
    }
}

/* An upper bound of the bytes a pattern adds to a matcher (index and per-event scratch), before
 * the doubling of arrays: its conditions' paths and keys once, and for each alternative its
 * slots and every value's records again. */
static size_t pattern_cost(const struct fp_pattern *pat)
{
    size_t cost = 3 * sizeof(uint32_t); /* id, per-event stamp */
    for (size_t i = 0; i < pat->nconds; i++) {
        const struct pcond *pc = pat->conds[i];
        cost += sizeof(struct ffield);
        for (const struct ppath *p = pc->path; p; p = p->parent)
            cost += sizeof(struct fnode) + ENTRY_COST(p->len);
        for (size_t k = 0; k < pc->nm; k++)
            cost += value_cost(&pc->m[k], true);
        if (pc->absent) /* the field's presence slot */
            cost += sizeof(struct fslot) + sizeof(struct sstate);
    }
    for (size_t a = 0; a < pat->alts.n; a++) {
        const struct alt *al = &pat->alts.a[a];
        cost += sizeof(struct fconj) + sizeof(struct cstate) + 2 * sizeof(uint32_t);
        for (size_t k = 0; k < al->n; k++) {
            const struct pcond *pc = al->c[k];
            cost += sizeof(struct fslot) + sizeof(struct sstate) + sizeof(uint32_t);
            for (size_t i = 0; i < pc->nm; i++)
                cost += value_cost(&pc->m[i], false);
        }
    }
    return cost;
}

static void fail_size(struct esmd_filter_error *err, const char *what, size_t cost, size_t limit,
                      const char *per)
{
    if (!err)
        return;
    memset(err, 0, sizeof(*err));
    err->line = err->column = 1;
    snprintf(err->message, sizeof(err->message),
             "%s to %.1f MB, more than the limit of %zu MB per %s (docs/filters.md#limits): use "
             "fewer values, or fewer \"$or\" alternatives that repeat them",
             what, (double)cost / (1 << 20), limit >> 20, per);
}

/* Parses and checks a pattern, checks its compiled size against the limit per pattern and
 * against *budget (when not NULL: what is left for the mapping), and adds it to f (when not
 * NULL). */
static int add(struct esmd_filter *f, const char *pattern, size_t len, uint32_t id,
               const char *const *skip, size_t *budget, struct esmd_filter_error *err)
{
    struct fp_pattern pat;
    bool ok = esmd_filter_parse(&pat, pattern, len, skip, err);
    if (ok) {
        size_t cost = pattern_cost(&pat);
        if (cost > ESMD_FILTER_MAX_PATTERN_BYTES) {
            fail_size(err, "the pattern compiles", cost, ESMD_FILTER_MAX_PATTERN_BYTES, "pattern");
            ok = false;
        } else if (budget && *budget != SIZE_MAX && cost > *budget) {
            fail_size(err, "with this pattern, the mapping's filters compile",
                      ESMD_FILTER_MAX_MAPPING_BYTES - *budget + cost, ESMD_FILTER_MAX_MAPPING_BYTES,
                      "mapping");
            *budget = SIZE_MAX; /* said once: the patterns after it are only checked */
            ok = false;
        } else if (budget && *budget != SIZE_MAX) {
            *budget -= cost;
        }
    }
    if (ok && f)
        insert(f, &pat.alts, id);
    esmd_filter_pattern_free(&pat);
    return ok ? 0 : -1;
}

int esmd_filter_add(struct esmd_filter *f, const char *pattern, size_t len, uint32_t id,
                    struct esmd_filter_error *err)
{
    return add(f, pattern, len, id, NULL, NULL, err);
}

int esmd_filter_add_skip(struct esmd_filter *f, const char *pattern, size_t len, uint32_t id,
                         const char *const *skip, struct esmd_filter_error *err)
{
    return add(f, pattern, len, id, skip, NULL, err);
}

int esmd_filter_check(const char *pattern, size_t len, struct esmd_filter_error *err)
{
    return add(NULL, pattern, len, 0, NULL, NULL, err);
}

int esmd_filter_check_budget(const char *pattern, size_t len, size_t *budget,
                             struct esmd_filter_error *err)
{
    return add(NULL, pattern, len, 0, NULL, budget, err);
}

size_t esmd_filter_count_patterns(const struct esmd_filter *f)
{
    return f ? f->npats : 0;
}
