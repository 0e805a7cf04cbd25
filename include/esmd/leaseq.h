/* A lease queue on a Postgres table: the engine under the asynchronous invocation queue
 * (src/asyncq.c) and the destination outbox (src/outbox.c); docs/async.md, docs/destinations.md.
 * Each of them is a policy (struct esmd_leaseq_policy): its table and SQL, what a claimed row
 * means, how it is settled.
 *
 * The table has `id bigint` (primary key), a text column the claims are grouped by (the key: a
 * function, a destination), `next_attempt_at timestamptz`, `lease_owner text`, `lease_token
 * uuid`, optionally a `lease_until timestamptz`, and an index on (key, next_attempt_at, id).
 * Workers of every esmd instance share it:
 *
 *   insert   rows handed to esmd_leaseq_insert() wait while the insert connections are busy and
 *            then go together into one INSERT (group commit), a statement prepared once per
 *            connection whose parameters are binary arrays (one element per row, one array per
 *            column); the policy hears of them (inserted) only after the commit, and when the
 *            connection is lost mid-INSERT, only once the engine has found out which rows the
 *            database has (indoubt_column);
 *   claim    one statement claims due rows for every key that may have some and has room (the
 *            policy says how much): one sub-select per key, each with its own LIMIT, FOR UPDATE
 *            SKIP LOCKED, ordered by (next_attempt_at, id) on the index, joined back to the table
 *            by primary key. A claim sets lease_owner (the instance id), lease_token (a random id
 *            of this process) and moves next_attempt_at (and lease_until) to the lease's end, so
 *            a row whose worker died becomes due again by itself;
 *   settle   a claimed row is deleted (esmd_leaseq_delete) or rescheduled with the policy's
 *            columns (esmd_leaseq_retry); both are batched into one statement, at most
 *            ESMD_LEASEQ_SETTLE_MAX ids of each, and act only on rows that still carry this
 *            process's lease token;
 *   wake     claims run when the policy says a key may have due rows (esmd_leaseq_more), for
 *            every key at the poll interval, and at once for a key whose last claim was full;
 *            a claim that fails is retried at the next poll, not at once;
 *   start    esmd_leaseq_start() first releases the rows this instance id leased in an earlier
 *            process (they are due again at once), then claims;
 *   stop     esmd_leaseq_stop(): no more claims; inserts and settles still go; done once both
 *            the engine and the policy (idle) have nothing in flight.
 *
 * Everything runs on the loop thread. */
#ifndef ESMD_LEASEQ_H
#define ESMD_LEASEQ_H

#include "esmd/common.h"
#include "esmd/pg.h"

struct ev_loop;
struct esmd_leaseq;

/* Ids per settle statement (of each kind): the planner joins a longer array of ids with a scan
 * of the whole table instead of the primary key. */
#define ESMD_LEASEQ_SETTLE_MAX 256
/* The columns of a claimed row: 0 and 1 are the engine's (the key, the id); the policy's
 * `returning` start here. */
#define ESMD_LEASEQ_COL0 2

/* A row waiting for its INSERT: embed it in the policy's own record. */
struct esmd_leaseq_item {
    struct esmd_leaseq_item *next; /* the engine's */
    size_t bytes;                  /* counted against insert_max_bytes */
};

/* What a queue is: its table and SQL, and what its rows mean (static; borrowed). */
struct esmd_leaseq_policy {
    const char *name; /* log prefix: "async", "destinations" */
    const char *rows; /* what a row is, in logs: "events", "outbox rows" */
    const char *table;
    const char *key_column;
    const char *lease_until_column; /* NULL: the table has none */
    /* The columns of a claimed row after its id (ESMD_LEASEQ_COL0), of alias t:
     * "t.payload, t.attempts". */
    const char *returning;

    /* The INSERT, prepared on every insert connection: insert_nparams binary arrays of the
     * element types insert_oids (ESMD_PG_OID_*), e.g. "INSERT INTO T (a, b) SELECT * FROM
     * unnest($1::text[], $2::uuid[])". */
    const char *insert_sql;
    int insert_nparams;
    const unsigned int *insert_oids;
    size_t insert_max_rows, insert_max_bytes; /* per INSERT */
    /* Adds one row's elements, one to each of the insert_nparams arrays. */
    void (*insert_row)(void *ud, struct esmd_leaseq_item *item, struct esmd_pg_array *cols);
    /* The rows of one INSERT (linked by next, in order; the policy owns them again) after its
     * commit (ok) or failure (err: Postgres's message, "closed" when freed). The engine does not
     * touch itself after this call: the policy may free it from here. */
    void (*inserted)(void *ud, struct esmd_leaseq_item *items, bool ok, const char *err);
    /* In-doubt INSERTs (docs/async.md#in-doubt-inserts). When the connection is lost with an
     * INSERT in flight, its commit may have happened or not. With indoubt_column set (a column
     * of the table that holds a value unique to each row, of SQL type indoubt_type and element
     * OID indoubt_oid), the engine asks, once the connection is back and before this process
     * claims again, which of the INSERT's rows exist: those are inserted(ok), the others go
     * into the next INSERT. NULL: such an INSERT is reported failed (inserted(!ok)). */
    const char *indoubt_column;
    const char *indoubt_type;
    unsigned int indoubt_oid;
    /* Adds item's value of indoubt_column to arr (one element). */
    void (*indoubt_value)(void *ud, struct esmd_leaseq_item *item, struct esmd_pg_array *arr);
    /* Optional: true when this process has claimed item's row already (so it was committed),
     * for a row the lookup does not find: a claim that started before the loss was noticed
     * can run the row and delete it before the lookup. */
    bool (*indoubt_claimed)(void *ud, struct esmd_leaseq_item *item);

    /* The columns esmd_leaseq_retry() sets (NULL-terminated lists): from int4 values, from
     * text values. NULL: none. */
    const char *const *retry_ints;
    const char *const *retry_texts;

    /* Rows a claim may take for key now (<= 0: none, and the key keeps its "more" mark). */
    int (*room)(void *ud, void *key_ud);
    /* One claimed row: res is borrowed (row `row`, columns ESMD_LEASEQ_COL0...). */
    void (*claimed)(void *ud, void *key_ud, int64_t id, const PGresult *res, int row);
    /* After every row of a claim (NULL: nothing to do). */
    void (*claim_end)(void *ud);
    /* true when the policy has nothing in flight (for esmd_leaseq_stop). */
    bool (*idle)(void *ud);
};

/* How one queue runs (copied). */
struct esmd_leaseq_cfg {
    const char *conninfo;
    const char *instance_id; /* this process's stable id (leases); NULL or "": "esmd" */
    int insert_conns;        /* 1..ESMD_LEASEQ_INSERT_CONNS_MAX */
    bool settle_conn;        /* settles on a connection of their own, else on the claim one */
    bool claims;             /* false: insert only, never claim */
    double poll_s;           /* every key is claimed this often */
    bool weak_poll;          /* the poll timer alone does not keep the loop running */
};
#define ESMD_LEASEQ_INSERT_CONNS_MAX 8

/* Which connection esmd_leaseq_pg() returns: the policy may run its own statements there
 * (LISTEN on the claim connection, say). */
enum esmd_leaseq_conn { ESMD_LEASEQ_CLAIM, ESMD_LEASEQ_SETTLE, ESMD_LEASEQ_INSERT };

/* Creates the queue and its connections (no claims before esmd_leaseq_start). policy and ud are
 * borrowed and must outlive the queue. NULL with err. */
struct esmd_leaseq *esmd_leaseq_new(struct ev_loop *loop, const struct esmd_leaseq_policy *policy,
                                    void *ud, const struct esmd_leaseq_cfg *cfg, char *err,
                                    size_t errlen) ESMD_MUST_CHECK;
/* Releases the earlier process's leases of this instance id, then claims; starts the poll. */
void esmd_leaseq_start(struct esmd_leaseq *lq);
/* Frees now: rows waiting for an INSERT and INSERTs in flight get inserted(!ok); claimed rows
 * not settled keep their lease and run again after it. NULL ok. */
void esmd_leaseq_free(struct esmd_leaseq *lq);

/* Adds a key (name copied) with the lease its claims take; key_ud is handed to room() and
 * claimed(). The key starts marked (it may have due rows). Returns the key (freed with the
 * queue). */
struct esmd_leaseq_key *esmd_leaseq_key_add(struct esmd_leaseq *lq, const char *name,
                                            int64_t lease_ms, void *key_ud);
/* The lease of key's claims from the next claim round on (rows claimed keep theirs). */
void esmd_leaseq_key_set_lease(struct esmd_leaseq *lq, struct esmd_leaseq_key *key,
                               int64_t lease_ms);
/* key may have due rows: claim it at the next round (scheduled now). NULL key: every key. */
void esmd_leaseq_more(struct esmd_leaseq *lq, struct esmd_leaseq_key *key);
/* Runs a claim round soon for the keys marked (after rows were settled: room again). */
void esmd_leaseq_claim_soon(struct esmd_leaseq *lq);

/* Queues item for the next INSERT (takes it until inserted()). */
void esmd_leaseq_insert(struct esmd_leaseq *lq, struct esmd_leaseq_item *item);
/* Rows waiting for an INSERT (not yet sent). */
size_t esmd_leaseq_waiting(const struct esmd_leaseq *lq);

/* The claimed row id is finished: deleted with the next settle statement. */
void esmd_leaseq_delete(struct esmd_leaseq *lq, int64_t id);
/* The claimed row id runs again in delay_ms, with retry_ints set from ints and retry_texts from
 * texts (NULL entries: SQL NULL; the strings are taken, freed by the queue). */
void esmd_leaseq_retry(struct esmd_leaseq *lq, int64_t id, int64_t delay_ms, const int *ints,
                       char **texts);

/* Graceful stop: no more claims; waiting inserts and settles still go; done(ud, false) from the
 * loop once the queue and the policy are idle, or done(ud, true) after timeout_s (> 0; 0: no
 * limit). The policy calls esmd_leaseq_check() when it may have become idle. */
void esmd_leaseq_stop(struct esmd_leaseq *lq, double timeout_s, void (*done)(void *ud, bool late),
                      void *ud);
void esmd_leaseq_check(struct esmd_leaseq *lq);
bool esmd_leaseq_stopping(const struct esmd_leaseq *lq);

/* This process's lease token (uuid text; borrowed): what lease_token holds for our claims. */
const char *esmd_leaseq_token(const struct esmd_leaseq *lq);
/* A connection of the queue (borrowed), for the policy's own statements. */
struct esmd_pg *esmd_leaseq_pg(struct esmd_leaseq *lq, enum esmd_leaseq_conn which);

#endif
