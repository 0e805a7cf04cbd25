/* Private to the destination files: the outbox engine (src/outbox.c), the router by URI scheme
 * (src/destination.c) and the writers (src/dest_kafka.c, dest_redis.c, dest_http.c,
 * dest_pgqueue.c, dest_function.c). Public API: include/esmd/destination.h.
 *
 * A writer is one `struct esmd_dest_writer`: its URI scheme, the parser of its URIs, and what
 * it needs to write the outbox rows of a destination of its kind (open a state per router,
 * bind a destination to a connection, write claimed rows, close). The table of writers is in
 * destination.c; nothing else switches on the kind of a destination.
 *
 * Everything runs on the loop thread. */
#ifndef ESMD_DEST_PRIVATE_H
#define ESMD_DEST_PRIVATE_H

#include "esmd/config.h"
#include "esmd/destination.h"
#include "esmd/pg.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct ev_loop;
struct esmd_series;
struct esmd_leaseq_key;

/* Time limit of one write (HTTP request, Kafka message.timeout.ms, Redis reply). */
#define ESMD_DEST_WRITE_TIMEOUT_MS 30000

/* What the outbox does with a row after its write. */
enum esmd_dest_result {
    ESMD_DEST_OK,      /* written: delete the row */
    ESMD_DEST_DELETED, /* written and already deleted (pgqueue) */
    ESMD_DEST_GONE,    /* our lease was lost: the row belongs to someone else now */
    ESMD_DEST_FAIL,    /* not written: attempts + 1, backoff */
};

/* What the writers see of their router; owned by the router, valid until esmd_dests_free. */
struct esmd_dest_env {
    struct esmd_dests *d;
    struct ev_loop *loop;
    struct esmd_dests_names names; /* the configuration, borrowed from esmd_dests_new's caller */
    const char *instance_id;
    const char *token;                /* this process's lease token (uuid text) */
    esmd_dests_function_sink fn_sink; /* function:// rows; NULL: not available */
    void *fn_sink_ud;
};

/* What a URI names, once parsed. */
struct esmd_dest_uri {
    char *target; /* owned: topic, stream, queue or function name; NULL for http(s) */
    const struct esmd_conn_cfg *conn; /* kafka://, redis://: the connection (borrowed from cfg) */
};

struct esmd_dest;
struct esmd_delivery;

/* One kind of destination. */
struct esmd_dest_writer {
    const char *schemes[3]; /* the URI prefixes ("kafka://"), NULL-terminated */
    const char *form;       /* the URI's form, for messages: "kafka://CONNECTION/TOPIC" */
    int cap;                /* writes in flight per destination */
    bool takes_key;         /* keeps the send's Kafka key */
    bool takes_attrs;       /* keeps the send's message attributes */
    /* Checks uri (it starts with scheme and holds no space or control character) against
     * the configuration's names and fills *out. 0, or ESMD_EINVAL with err (naming the URI). */
    int (*parse)(const struct esmd_dests_names *names, const char *uri, struct esmd_dest_uri *out,
                 char *err, size_t errlen);
    /* The kind's state for one router (env borrowed until close); NULL when it keeps none. */
    void *(*open)(const struct esmd_dest_env *env);
    /* What a destination of this kind writes through (a connection's producer, ...), made on
     * first use; stored in dest->conn. u: as parse() filled it. NULL op: state itself. */
    void *(*bind)(void *state, const struct esmd_dest_uri *u);
    /* Writes n claimed rows of one destination, in claim order. Each gets
     * esmd_outbox_done() once, possibly from inside this call. */
    void (*write)(struct esmd_delivery *const *dls, size_t n);
    /* The writer's part of dl (dl->wp) when dl is freed before its write finished. NULL ok. */
    void (*discard)(struct esmd_delivery *dl);
    /* Graceful stop, the router idle: closes idle connections. NULL ok. */
    void (*idle)(void *state);
    /* esmd_dests_free: drops every write in progress (their rows stay leased) and every
     * connection. Idempotent; the state stays until free. NULL ok. */
    void (*close)(void *state);
    void (*free)(void *state); /* NULL ok */
};

extern const struct esmd_dest_writer esmd_dest_kafka, esmd_dest_redis, esmd_dest_http,
    esmd_dest_pgqueue, esmd_dest_function;

/* The writers, in the order of the table (destination.c); n set to their number. */
const struct esmd_dest_writer *const *esmd_dest_writers(size_t *n);

/* Parses uri through the writers' table: the writer of its scheme and what it names. 0, or
 * ESMD_EINVAL with err. On success *w is set and out filled (free out->target). */
int esmd_dest_parse(const struct esmd_dests_names *names, const char *uri,
                    const struct esmd_dest_writer **w, struct esmd_dest_uri *out, char *err,
                    size_t errlen) ESMD_MUST_CHECK;
/* The function called name, or NULL. */
const struct esmd_function_cfg *esmd_dest_find_function(const struct esmd_dests_names *names,
                                                        const char *name);
/* For kafka:// and redis://: the CONNECTION of "<scheme>CONNECTION/REST", a connection of
 * cfg of the given type (out->conn), and REST (inside uri). NULL with err when the URI is not
 * of that form (refused with the writer's form) or names no such connection. */
const char *esmd_dest_parse_conn(const struct esmd_dests_names *names, const char *uri,
                                 enum esmd_conn_type type, struct esmd_dest_uri *out, char *err,
                                 size_t errlen);
/* 1 to max characters, each a letter, a digit or one of extra. */
bool esmd_dest_name_ok(const char *s, size_t max, const char *extra);
#define ESMD_DEST_TOPIC_RULE                                                                       \
    "a topic is 1 to 249 characters of letters, digits, '.', '_' or '-', not . or .."
#define ESMD_DEST_NAME_RULE "1 to 64 characters of letters, digits, '_', '.' or '-'"

/* One destination (one URI). */
struct esmd_dest {
    struct esmd_dest *next;
    struct esmd_dests *d;
    char *uri;   /* owned, as stored in the outbox */
    char *label; /* owned: uri with a password hidden (metrics, readiness, logs) */
    const struct esmd_dest_writer *w; /* NULL when unwritable */
    size_t wi;                        /* w's index in the table */
    char *target;     /* owned: topic, stream, queue or function name; NULL for http */
    void *conn;       /* w->bind()'s, borrowed */
    char *unwritable; /* owned: why this instance cannot write it (rows are left alone) */
    int cap;
    int inflight;
    bool failing;                /* the last write failed */
    int failures;                /* consecutive failed probes, for the destination's own backoff */
    double retry_at;             /* ev_now before which it gets no claims */
    struct esmd_leaseq_key *key; /* the outbox's lease-queue key (src/leaseq.c) */
    bool configured;
    int64_t pending;
    char last_error[512];
    struct esmd_series *m_ok, *m_fail, *m_pending;
};

/* One claimed row being written. */
struct esmd_delivery {
    struct esmd_delivery *prev, *next; /* in the router's list */
    struct esmd_dests *d;
    struct esmd_dest *dest;
    int64_t id;
    char *payload; /* owned, NUL-terminated */
    size_t len;
    char *attrs;        /* owned: message attributes (JSON) for pgqueue://; NULL: none */
    unsigned char *key; /* owned; NULL: none */
    size_t keylen;
    int attempts; /* before this write */
    bool probe;   /* claimed while the destination was failing */
    /* the writer's */
    void *wp;                    /* what the write in progress holds (discard() frees it) */
    struct esmd_delivery *wnext; /* a list of the writer's */
};

/* The write of dl finished: counts it, records the outcome in the outbox, frees dl. err: why
 * it failed (ESMD_DEST_FAIL), copied. */
void esmd_outbox_done(struct esmd_delivery *dl, enum esmd_dest_result r, const char *err);
/* The deliveries in flight (newest first; follow ->next). */
struct esmd_delivery *esmd_outbox_deliveries(struct esmd_dests *d);
/* Runs sql on the worker's connection; cb is called once (with err "closed" while closing,
 * possibly from inside this call). params borrowed for the call; lengths and formats as
 * esmd_pg_query_binary's (both NULL: text). */
void esmd_outbox_query(struct esmd_dests *d, const char *sql, int n, const char *const *params,
                       const int *lengths, const int *formats, esmd_pg_cb cb, void *ud);
/* This process's lease token (uuid text), what the outbox's lease_token holds for our claims. */
const char *esmd_outbox_token(const struct esmd_dests *d);
/* Whether the router is being freed (writes finishing now are not recorded). */
bool esmd_outbox_closing(const struct esmd_dests *d);

#endif
