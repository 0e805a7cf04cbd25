/* Batch accounting: which records fit, and the exact size of the event they make. */
#include "batch_private.h"
#include "esmd/buf.h"

#include <stdlib.h>
#include <string.h>

void esmd_batch_init(struct esmd_batch *batch, const struct esmd_batch_limits *lim)
{
    memset(batch, 0, sizeof(*batch));
    batch->lim = *lim;
    batch->bytes = lim->envelope;
}

void esmd_batch_clear(struct esmd_batch *batch)
{
    free(batch->groups);
    struct esmd_batch_limits lim = batch->lim;
    esmd_batch_init(batch, &lim);
}

static struct esmd_batch_group *find_group(const struct esmd_batch *batch,
                                           const struct esmd_shard *shard)
{
    /* Batches hold few shards (partitions of one mapping); search from the end, where the
     * shard being filled usually is. */
    for (size_t i = batch->ngroups; i-- > 0;) {
        if (batch->groups[i].shard == shard)
            return &batch->groups[i];
    }
    return NULL;
}

size_t esmd_batch_bytes_with(const struct esmd_batch *batch, const struct esmd_record *rec)
{
    size_t bytes = batch->bytes + rec->size;
    if (batch->lim.group_by_shard) {
        const struct esmd_batch_group *g = find_group(batch, rec->shard);
        if (g) {
            bytes += 1; /* ',' before it in its group */
        } else {
            bytes += rec->shard->overhead;
            if (batch->ngroups > 0)
                bytes += 1; /* ',' between groups */
        }
    } else if (batch->nrecords > 0) {
        bytes += 1;
    }
    return bytes;
}

enum esmd_batch_fit esmd_batch_check(const struct esmd_batch *batch, const struct esmd_record *rec)
{
    size_t alone =
        batch->lim.envelope + rec->size + (batch->lim.group_by_shard ? rec->shard->overhead : 0);
    if (alone > batch->lim.max_bytes)
        return ESMD_BATCH_TOO_BIG;
    if (batch->nrecords >= (size_t)batch->lim.batch_size)
        return ESMD_BATCH_FULL;
    if (esmd_batch_bytes_with(batch, rec) > batch->lim.max_bytes)
        return ESMD_BATCH_FULL;
    return ESMD_BATCH_FITS;
}

void esmd_batch_add(struct esmd_batch *batch, struct esmd_record *rec)
{
    batch->bytes = esmd_batch_bytes_with(batch, rec);
    struct esmd_batch_group *g = find_group(batch, rec->shard);
    if (!g) {
        if (batch->ngroups == batch->capgroups) {
            batch->capgroups = batch->capgroups ? batch->capgroups * 2 : 4;
            batch->groups = esmd_xrealloc(batch->groups, batch->capgroups * sizeof(*batch->groups));
        }
        g = &batch->groups[batch->ngroups++];
        memset(g, 0, sizeof(*g));
        g->shard = rec->shard;
    }
    rec->next = NULL;
    if (g->tail)
        g->tail->next = rec;
    else
        g->head = rec;
    g->tail = rec;
    g->n++;
    g->ack_seq = rec->seq + 1;
    batch->nrecords++;
}

bool esmd_batch_count_reached(const struct esmd_batch *batch)
{
    return batch->nrecords >= (size_t)batch->lim.batch_size;
}

size_t esmd_batch_bytes(const struct esmd_batch *batch)
{
    return batch->bytes;
}

void esmd_batch_encode_records(const struct esmd_batch *batch,
                               void (*write)(void *ctx, const struct esmd_record *rec,
                                             struct esmd_buf *out),
                               void *ctx, struct esmd_buf *out)
{
    esmd_buf_reserve(out, batch->bytes);
    esmd_buf_append(out, ESMD_BATCH_RECORDS_HEAD, sizeof(ESMD_BATCH_RECORDS_HEAD) - 1);
    size_t k = 0;
    for (size_t i = 0; i < batch->ngroups; i++) {
        const struct esmd_batch_group *g = &batch->groups[i];
        const struct esmd_record *rec = g->head;
        for (size_t j = 0; j < g->n && rec; j++, rec = rec->next) {
            if (k++)
                esmd_buf_putc(out, ',');
            write(ctx, rec, out);
        }
    }
    esmd_buf_append(out, ESMD_BATCH_RECORDS_TAIL, sizeof(ESMD_BATCH_RECORDS_TAIL) - 1);
}

struct esmd_record *esmd_batch_remove_shard(struct esmd_batch *batch,
                                            const struct esmd_shard *shard)
{
    struct esmd_batch_group *g = find_group(batch, shard);
    if (!g)
        return NULL;
    size_t sum = 0;
    for (struct esmd_record *rec = g->head; rec; rec = rec->next)
        sum += rec->size;
    size_t removed = sum;
    if (batch->lim.group_by_shard) {
        removed += shard->overhead + (g->n - 1);
        if (batch->ngroups > 1)
            removed += 1;
    } else {
        /* one flat array: n records lose their n separators, or n-1 when nothing remains */
        removed += g->n == batch->nrecords ? g->n - 1 : g->n;
    }
    struct esmd_record *head = g->head;
    batch->bytes -= removed;
    batch->nrecords -= g->n;
    size_t idx = (size_t)(g - batch->groups);
    memmove(g, g + 1, (batch->ngroups - idx - 1) * sizeof(*g));
    batch->ngroups--;
    return head;
}

struct esmd_shard *esmd_shard_new(const char *key, size_t overhead, void *priv)
{
    struct esmd_shard *shard = esmd_xcalloc(1, sizeof(*shard));
    shard->key = esmd_xstrdup(key);
    shard->overhead = overhead;
    shard->priv = priv;
    shard->state = ESMD_SHARD_IDLE;
    shard->parent = shard;
    shard->lanes = esmd_xcalloc(1, sizeof(*shard->lanes));
    shard->lanes[0] = shard;
    shard->nlanes = 1;
    shard->emitted_next = -1;
    shard->acked = -1;
    return shard;
}

void esmd_shard_free(struct esmd_shard *shard)
{
    if (!shard)
        return;
    free(shard->key);
    free(shard->unfinished.v);
    free(shard->lanes);
    free(shard);
}

/* ---- lanes and the watermark ---- */

int esmd_lane_index(const void *key, size_t len, int64_t seq, int nlanes)
{
    if (nlanes <= 1)
        return 0;
    if (!key) /* no key whose order could be kept: spread by position */
        return (int)((uint64_t)seq % (uint64_t)nlanes);
    uint32_t h = 2166136261u; /* FNV-1a, 32 bits */
    const unsigned char *p = key;
    for (size_t i = 0; i < len; i++)
        h = (h ^ p[i]) * 16777619u;
    return (int)(h % (uint32_t)nlanes);
}

static bool lane_empty(const struct esmd_shard *lane)
{
    return lane->unfinished.n == 0 && !lane->pending_head && lane->state == ESMD_SHARD_IDLE &&
           lane->refs == 0;
}

bool esmd_shard_drained(const struct esmd_shard *parent)
{
    for (int i = 0; i < parent->nlanes; i++)
        if (!lane_empty(parent->lanes[i]))
            return false;
    return true;
}

void esmd_shard_set_lanes(struct esmd_shard *parent, int n)
{
    if (n < 1)
        n = 1;
    if (n > ESMD_MAX_LANES)
        n = ESMD_MAX_LANES;
    for (int i = n; i < parent->nlanes; i++)
        esmd_shard_free(parent->lanes[i]);
    parent->lanes = esmd_xrealloc(parent->lanes, (size_t)n * sizeof(*parent->lanes));
    for (int i = parent->nlanes; i < n; i++) {
        struct esmd_shard *lane = esmd_shard_new(parent->key, parent->overhead, parent->priv);
        free(lane->lanes);
        lane->lanes = NULL;
        lane->nlanes = 0;
        lane->parent = parent;
        parent->lanes[i] = lane;
    }
    parent->nlanes = n;
}

void esmd_lane_emitted(struct esmd_shard *lane, int64_t seq)
{
    struct esmd_seqq *q = &lane->unfinished;
    if (q->n == q->cap) {
        size_t cap = q->cap ? q->cap * 2 : 16;
        int64_t *v = esmd_xcalloc(cap, sizeof(*v));
        for (size_t i = 0; i < q->n; i++)
            v[i] = q->v[(q->head + i) % q->cap];
        free(q->v);
        q->v = v;
        q->cap = cap;
        q->head = 0;
    }
    q->v[(q->head + q->n) % q->cap] = seq;
    q->n++;
    struct esmd_shard *parent = lane->parent;
    if (parent->emitted_next < 0)
        parent->acked = seq; /* nothing below the first record is ours to ack */
    if (seq + 1 > parent->emitted_next)
        parent->emitted_next = seq + 1;
}

int64_t esmd_shard_watermark(const struct esmd_shard *parent)
{
    int64_t low = parent->emitted_next;
    for (int i = 0; i < parent->nlanes; i++) {
        const struct esmd_seqq *q = &parent->lanes[i]->unfinished;
        if (q->n > 0 && q->v[q->head] < low)
            low = q->v[q->head];
    }
    return low;
}

int64_t esmd_lane_finish(struct esmd_shard *lane, int64_t next_seq)
{
    struct esmd_seqq *q = &lane->unfinished;
    while (q->n > 0 && q->v[q->head] < next_seq) {
        q->head = (q->head + 1) % q->cap;
        q->n--;
    }
    struct esmd_shard *parent = lane->parent;
    int64_t wm = esmd_shard_watermark(parent);
    if (wm <= parent->acked)
        return -1;
    parent->acked = wm;
    return wm;
}

const char *esmd_shard_key(const struct esmd_shard *shard)
{
    return shard->key;
}

void *esmd_shard_priv(const struct esmd_shard *shard)
{
    return shard->priv;
}
