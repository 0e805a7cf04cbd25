/* The core's bookkeeping of a shard, private to src/ (connectors hold `struct esmd_shard *`
 * handles and read them with esmd_shard_key() / esmd_shard_priv(), include/esmd/batch.h).
 * Used by batch.c (a group's overhead) and the mapping (src/mapping*.c), which owns the shards;
 * tests that stand in for the core include it too. */
#ifndef ESMD_BATCH_PRIVATE_H
#define ESMD_BATCH_PRIVATE_H

#include "esmd/batch.h"

/* Shard state as the core tracks it. */
enum esmd_shard_state {
    ESMD_SHARD_IDLE,     /* no record in a batch */
    ESMD_SHARD_OPEN,     /* some of its records are in the batch being formed */
    ESMD_SHARD_INFLIGHT, /* some of its records are in a batch being invoked / retried */
};

/* Seqs in ascending order, a FIFO (a lane's unfinished records). */
struct esmd_seqq {
    int64_t *v;
    size_t head, n, cap;
};

/* A shard the connector opens is split into lanes (docs/design.md#lanes): the core's ordering
 * unit, each with at most one batch in flight and its own pending list. Lane 0 is the shard
 * itself (so with one lane nothing changes, and rec->shard is the connector's handle); lanes
 * 1..n-1 are extra `struct esmd_shard`s with the same key and priv, so the batch, inflight,
 * bisect and partial-response code works on lanes without knowing of them. The connector only
 * ever sees the parent (lanes[0]). */
struct esmd_shard {
    char *key;       /* owned: "topic-3"; the group key in grouped events */
    size_t overhead; /* exact bytes of its group without records, e.g. `"topic-3":[]` */
    void *priv;      /* the connector's */
    enum esmd_shard_state state;
    bool revoked;                         /* the connector lost it: release, never ack */
    bool paused;                          /* the core asked the connector to stop fetching it */
    size_t paused_npending, paused_bytes; /* parent: what waited when it was paused */
    int refs;                             /* batches holding its records + 1 while open */
    struct esmd_record *pending_head, *pending_tail; /* emitted, not yet in a batch */
    size_t npending;
    size_t pending_bytes;
    struct esmd_shard *next; /* the core's list link (parents only) */

    struct esmd_shard *parent;   /* the shard the connector opened (itself for lane 0); not to
                                    be followed once revoked */
    struct esmd_shard **lanes;   /* parent: its nlanes lanes, lanes[0] == itself */
    int nlanes;                  /* parent: >= 1 */
    struct esmd_seqq unfinished; /* lane: seqs emitted to it and not finished, ascending */
    void *former;                /* lane, while OPEN: the forming batch holding its records */
    int64_t emitted_next;        /* parent: one past the highest seq emitted, -1 before any */
    int64_t acked;               /* parent: the last watermark given to ops->ack, -1 none */
    size_t all_npending;         /* parent: records pending over all lanes (backpressure) */
    size_t all_pending_bytes;    /* parent: their bytes */
    bool relane;                 /* parent: paused until drained, then re-laned */
};

/* A new IDLE shard; key is copied. Caller frees with esmd_shard_free(). */
struct esmd_shard *esmd_shard_new(const char *key, size_t overhead, void *priv);
/* Frees the shard or lane (not its pending records; a parent's lanes array, not the other
 * lanes). NULL ok. */
void esmd_shard_free(struct esmd_shard *shard);

/* ---- lanes and the commit watermark (docs/design.md#lanes) ---- */

/* The lane index of a record: FNV-1a (32-bit) of its key modulo nlanes; a record without a key
 * (key NULL) goes by its seq (seq modulo nlanes). */
int esmd_lane_index(const void *key, size_t len, int64_t seq, int nlanes);
/* Gives an idle, drained parent n lanes (1..ESMD_MAX_LANES): lanes 1..n-1 are created or
 * freed. Only when no lane has a record pending, forming, in flight or unfinished. */
void esmd_shard_set_lanes(struct esmd_shard *parent, int n);
/* true when no lane of the parent holds a record (pending, forming, in flight, unfinished). */
bool esmd_shard_drained(const struct esmd_shard *parent);
/* A record of seq was emitted to lane (seq ascending per parent). */
void esmd_lane_emitted(struct esmd_shard *lane, int64_t seq);
/* The lane's records below next_seq are finished. Returns the parent's new watermark when it
 * moved past what was last returned (the caller gives it to ops->ack), else -1. Not for a
 * revoked lane. */
int64_t esmd_lane_finish(struct esmd_shard *lane, int64_t next_seq);
/* The parent's watermark: the lowest unfinished seq over its lanes, or one past the highest
 * seq emitted when none is unfinished; -1 before any record. */
int64_t esmd_shard_watermark(const struct esmd_shard *parent);

#define ESMD_MAX_LANES 10

#endif
