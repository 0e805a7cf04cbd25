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

struct esmd_shard {
    char *key;       /* owned: "topic-3"; the group key in grouped events */
    size_t overhead; /* exact bytes of its group without records, e.g. `"topic-3":[]` */
    void *priv;      /* the connector's */
    enum esmd_shard_state state;
    bool revoked; /* the connector lost it: release, never ack */
    bool paused;  /* the core asked the connector to stop fetching it */
    int refs;     /* batches holding its records + 1 while open */
    struct esmd_record *pending_head, *pending_tail; /* emitted, not yet in a batch */
    size_t npending;
    size_t pending_bytes;
    struct esmd_shard *next; /* the core's list link */
};

/* A new IDLE shard; key is copied. Caller frees with esmd_shard_free(). */
struct esmd_shard *esmd_shard_new(const char *key, size_t overhead, void *priv);
/* Frees the shard (not its pending records). NULL ok. */
void esmd_shard_free(struct esmd_shard *shard);

#endif
