/* A set of entry IDs: open addressing, linear probing, backward-shift deletion (no tombstones,
 * so a set that sees millions of inserts and removes stays as fast as a fresh one). */
#include "redis_private.h"

#include <stdlib.h>
#include <string.h>

static uint64_t id_hash(struct esmd_redis_id id)
{
    uint64_t h = id.ms * 0x9e3779b97f4a7c15ULL ^ (id.seq + 0x632be59bd9b4e019ULL);
    h ^= h >> 31;
    h *= 0xbf58476d1ce4e5b9ULL;
    return h ^ (h >> 29);
}

static bool id_eq(struct esmd_redis_id a, struct esmd_redis_id b)
{
    return a.ms == b.ms && a.seq == b.seq;
}

static void idset_grow(struct esmd_redis_idset *s)
{
    struct esmd_redis_idset old = *s;
    s->cap = old.cap ? old.cap * 2 : 1024;
    s->slots = esmd_xcalloc(s->cap, sizeof(*s->slots));
    s->used = esmd_xcalloc(s->cap, sizeof(*s->used));
    s->n = 0;
    for (size_t i = 0; i < old.cap; i++)
        if (old.used[i])
            esmd_redis_idset_insert(s, old.slots[i]);
    free(old.slots);
    free(old.used);
}

void esmd_redis_idset_insert(struct esmd_redis_idset *s, struct esmd_redis_id id)
{
    if ((s->n + 1) * 2 > s->cap)
        idset_grow(s);
    size_t mask = s->cap - 1, i = (size_t)id_hash(id) & mask;
    while (s->used[i]) {
        if (id_eq(s->slots[i], id))
            return;
        i = (i + 1) & mask;
    }
    s->used[i] = true;
    s->slots[i] = id;
    s->n++;
}

bool esmd_redis_idset_has(const struct esmd_redis_idset *s, struct esmd_redis_id id)
{
    if (!s->cap)
        return false;
    size_t mask = s->cap - 1, i = (size_t)id_hash(id) & mask;
    while (s->used[i]) {
        if (id_eq(s->slots[i], id))
            return true;
        i = (i + 1) & mask;
    }
    return false;
}

void esmd_redis_idset_remove(struct esmd_redis_idset *s, struct esmd_redis_id id)
{
    if (!s->cap)
        return;
    size_t mask = s->cap - 1, i = (size_t)id_hash(id) & mask;
    while (s->used[i] && !id_eq(s->slots[i], id))
        i = (i + 1) & mask;
    if (!s->used[i])
        return;
    /* backward shift: move later members of the run into the hole when their home allows */
    size_t hole = i;
    for (size_t j = (i + 1) & mask; s->used[j]; j = (j + 1) & mask) {
        size_t home = (size_t)id_hash(s->slots[j]) & mask;
        bool movable = hole <= j ? (home <= hole || home > j) : (home <= hole && home > j);
        if (movable) {
            s->slots[hole] = s->slots[j];
            hole = j;
        }
    }
    s->used[hole] = false;
    s->n--;
}

void esmd_redis_idset_free(struct esmd_redis_idset *s)
{
    free(s->slots);
    free(s->used);
    memset(s, 0, sizeof(*s));
}
