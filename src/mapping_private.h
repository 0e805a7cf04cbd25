/* What src/mapping.c (a record's way from the source to the function and back) and
 * src/mapping_failure.c (what happens when the function fails) share. Private to those two files
 * and to the tests that drive them. */
#ifndef ESMD_MAPPING_PRIVATE_H
#define ESMD_MAPPING_PRIVATE_H

#include "batch_private.h"
#include "esmd/backoff.h"
#include "esmd/connector.h"
#include "esmd/log.h"
#include "esmd/mapping.h"
#include "esmd/trace.h"

#include <stdlib.h>

#include <ev.h>

struct cJSON;
struct esmd_filter;
struct esmd_function;
struct esmd_invoke_req;
struct esmd_invoke_result;
struct esmd_series;

/* A batch taken from the forming batch: it holds its shards (state INFLIGHT) until it is
 * settled. It is worked on as parts: the current part (`batch`) is invoked, retried, split
 * (bisect), cut down (partial batch response, record age) or given up (on-failure destination);
 * parts still to do wait on a stack (`todo`, the next one on top), so each shard's records are
 * settled in order. Acks go to the source part by part. */
struct inflight {
    struct esmd_mapping *map;
    struct esmd_shard **shards; /* held (INFLIGHT) until the inflight ends */
    size_t nshards;
    struct esmd_batch batch; /* the current part */
    struct esmd_batch *todo; /* parts after it; the next one is last */
    size_t ntodo, captodo;
    struct esmd_buf body; /* the current part's event, when `encoded` */
    bool encoded;
    char *idem_key;
    /* Of the current part, since it was formed (esmd_mapping_part_begin): */
    int attempts;              /* failed invocations that count toward the retry limit */
    int throttles;             /* throttled attempts (do not count) */
    int invokes;               /* invocations: the on-failure records' approximateInvokeCount */
    bool next_part_is_retry;   /* the retry timer starts a retry (not the next part) */
    long last_status;          /* of the last response, -1 before any */
    char *last_function_error; /* of the last response */
    char *last_request_id;
    char *last_error;      /* of the last failed response: its body (bounded) or the reason */
    const char *condition; /* giving up: the on-failure condition */
    size_t dest_pending;   /* on-failure records not yet stored */
    bool dest_failed;
    struct esmd_invoke_req *req;
    ev_timer retry;
    /* The current part's trace context: its first record's that has one
     * (esmd_mapping_part_trace; docs/operations.md#trace-context). */
    struct esmd_trace trace;
    char trace_id[ESMD_TRACE_ID_LEN + 1]; /* "" when none */
    struct inflight *prev, *next;
};

/* A batch being formed, with its batching window. A mapping forms up to its function's
 * max_concurrency of them at once, as it is at the time (one for queue sources): while the
 * function has free concurrency, records of different lanes go into different batches
 * (docs/design.md#batch-forming). */
struct former {
    struct esmd_mapping *map;
    struct esmd_batch b;
    ev_timer window;
};

struct esmd_mapping {
    const struct esmd_mapping_cfg *cfg;
    struct ev_loop *loop;
    struct esmd_log_ctx log;
    const struct esmd_connector_ops *ops;
    void *conn;
    struct esmd_host host;
    struct esmd_function *fn;
    size_t nheld; /* records the connector emitted and the core has not released yet */

    struct esmd_shard *shards; /* open shards (the connector's handles; lanes hang off them) */
    size_t nshards;
    struct former *formers; /* nformers places for batches being formed (pick_former) */
    size_t nformers;
    ev_prepare pump;
    ev_timer stats_timer;
    bool dirty; /* records or shards changed since the last pump */

    struct inflight *inflight;
    size_t ninflight;

    bool ready;
    char *not_ready_why;
    char last_result[256];

    bool stopping;
    bool connector_stopping;
    void (*stop_done)(void *ud);
    void *stop_ud;
    ev_idle stop_check;

    struct esmd_dests *dests;          /* on-failure destinations; NULL: none configured */
    struct esmd_backoff retry_backoff; /* of failed batches (esmd_mapping_failure_init) */

    /* Values in force: the configuration's, or what the admin API set since. */
    bool enabled;
    int factor; /* parallelization_factor: lanes per shard */
    int batch_size;
    int64_t window_ms;
    char *on_failure; /* owned; NULL = none */
    char **patterns;  /* owned filter patterns (JSON text) */
    size_t npatterns;
    /* Filters (NULL when the mapping has none): one matcher per way the record's data can
     * appear in its filter document (enum esmd_filter_data), see compile_filters(). */
    struct esmd_filter *filters[3];
    bool alias_filters; /* filters[1] and [2] are filters[0] (no fallback) */
    struct esmd_buf filter_doc;

    size_t pending_high;     /* per-shard pause threshold (records) */
    size_t map_pending_high; /* mapping-wide pause threshold (records) */
    size_t npending;         /* records waiting in all shards */
    size_t pending_bytes;    /* their encoded size */
    /* The source is held (ops->hold): docs/design.md#backpressure. paused_*: what paused shards
     * held at the last pump; allow_*: what the budget leaves the other shards. */
    bool held;
    bool hold_expired; /* held for HOLD_MAX_S: pump pauses the shards that hold the records */
    ev_timer hold_timer;
    size_t paused_records, paused_bytes, allow_records, allow_bytes;

    struct esmd_mapping_watch *watch; /* the console's history and failures (mapping_watch.c) */
    /* esmd_committed_events_total when this mapping was made (a mapping restarted, or added
     * back, under the same name goes on from there): the connector's own count adds to it */
    double committed_base;

    struct {
        struct esmd_series *polled, *invoked, *failed, *batches, *oversized, *retries, *throttled,
            *lag, *inflight, *pending, *committed, *filtered, *dropped, *on_failure, *bisections,
            *undecodable, *holds, *pauses;
    } m;
};

/* Hands a record back to the connector that emitted it; the host counts what it holds, so that
 * the connector is destroyed only once every record is back (esmd_mapping_free). */
static inline void esmd_mapping_release(struct esmd_mapping *map, struct esmd_record *rec)
{
    map->nheld--;
    map->ops->release(map->conn, rec);
}

/* ---- src/mapping.c ---- */

/* An ESM_PROCESSING_EVENT about the current part (docs/operations.md#esm-logging): code names
 * what went wrong (errorCode), message says it (errorMessage), action what esmd does next
 * (RETRY, BISECT, REDELIVER, DISCARD, ON_FAILURE). request_id may be NULL. */
void esmd_mapping_processing_event(struct inflight *inf, const char *request_id, const char *code,
                                   const char *message, const char *action);
/* The errorCode of a failed invocation's outcome. */
const char *esmd_mapping_error_code(const struct esmd_invoke_result *res);

/* Takes the current part's trace context from its records (inf->trace, inf->trace_id). */
void esmd_mapping_part_trace(struct inflight *inf);
/* The mapping's log scope for lines about the current part: its trace id, and request_id. */
static inline struct esmd_log_ctx esmd_mapping_part_log(const struct inflight *inf,
                                                        const char *request_id)
{
    struct esmd_log_ctx ctx = inf->map->log;
    ctx.request_id = request_id;
    ctx.trace_id = inf->trace_id[0] ? inf->trace_id : NULL;
    return ctx;
}

/* The current part is finished (acked when `ack`); goes on with the next part, or ends the
 * inflight (which may free inf). */
void esmd_mapping_part_done(struct inflight *inf, bool ack);
/* Starts the current part after delay_ms, from the loop (a retry when `retry`). */
void esmd_mapping_schedule_part(struct inflight *inf, int64_t delay_ms, bool retry);
/* The current part is a batch of its own from now on (the first half of a bisected batch, and
 * every part taken from `todo`): its retries, its approximateInvokeCount and the last response
 * its on-failure records report start again (docs/design.md#retries-per-part). A retry of what
 * is left after a partial batch response is the same batch: no new start. */
static inline void esmd_mapping_part_begin(struct inflight *inf)
{
    inf->attempts = 0;
    inf->throttles = 0;
    inf->invokes = 0;
    inf->last_status = -1;
    free(inf->last_function_error);
    inf->last_function_error = NULL;
    free(inf->last_request_id);
    inf->last_request_id = NULL;
    free(inf->last_error);
    inf->last_error = NULL;
}

/* ---- src/mapping_watch.c: what the admin console shows (docs/admin.md#console) ---- */

#define ESMD_WATCH_INTERVAL_MS 5000 /* a sample every 5 s */
#define ESMD_WATCH_SAMPLES 180      /* 15 minutes of them */
#define ESMD_WATCH_FAILURES 20      /* records given up kept per mapping */
#define ESMD_WATCH_RECORD_MAX 65536 /* bytes of a record kept; larger ones are cut */

/* After metrics_init: the first sample counts from here. */
struct esmd_mapping_watch *esmd_mapping_watch_new(const struct esmd_mapping *map);
void esmd_mapping_watch_free(struct esmd_mapping_watch *w); /* NULL ok */
/* From the stats timer: takes a sample when the last one is ESMD_WATCH_INTERVAL_MS old. */
void esmd_mapping_watch_tick(struct esmd_mapping *map, int64_t lag, int64_t now_ms);
/* A record given up (condition in inf->condition); record_json: the one-record event, or NULL
 * when it was not carried (too big). Keeps the last ESMD_WATCH_FAILURES. */
void esmd_mapping_watch_failure(struct inflight *inf, const char *record_json, size_t len);
/* Appends ,"records_per_second":...,"retries_under_way":... to the describe object. */
void esmd_mapping_watch_describe(const struct esmd_mapping *map, struct esmd_buf *out);

/* ---- src/mapping_failure.c ---- */

/* Sets map->retry_backoff (the default, or the ESMD_MAPPING_RETRY_BACKOFF testing knob). */
void esmd_mapping_failure_init(struct esmd_mapping *map);

/* The records of a part in order (group by group). recs: caller frees. */
struct part_records {
    struct esmd_record **recs;
    size_t n;
};
struct part_records esmd_mapping_part_records(const struct esmd_batch *b);
/* Splits the current part: `keep` says which records stay in it (first), the others make a part
 * done after it. Returns false when nothing would be split off. */
bool esmd_mapping_split_part(struct inflight *inf,
                             bool (*keep)(void *ctx, size_t i, const struct esmd_record *r),
                             void *ctx);

/* Before sending: records past maximum_record_age (a prefix of each shard's records) are split
 * off and given up. true when it did so (the part goes on from the give-up). */
bool esmd_mapping_give_up_expired(struct inflight *inf);
/* The current part's records have failed for good (condition: "RetryAttemptsExhausted",
 * "RecordAgeExceeded", "MaximumPayloadSizeExceeded"): stored for the on-failure destination, or
 * discarded; then the source moves on. */
void esmd_mapping_give_up(struct inflight *inf, const char *condition);
/* A throttled invocation: retried after a backoff (or Retry-After), not counted as an attempt. */
void esmd_mapping_throttled(struct inflight *inf, const struct esmd_invoke_result *res);
/* A failed invocation of the current part: bisected (when `bisect` and configured), retried
 * after a backoff, or given up when the retries are used up. */
void esmd_mapping_part_failed(struct inflight *inf, const struct esmd_invoke_result *res,
                              bool bisect);

/* What a function's response says in batchItemFailures (docs/lambda.md#partial-batch). */
enum esmd_item_failures {
    ESMD_ITEMS_NONE, /* no failure named (an empty body, null, no or an empty list): success */
    ESMD_ITEMS_SOME, /* failed[i] set for each record named */
    ESMD_ITEMS_BAD,  /* not JSON, not a list, or an item that names no record: all failed */
};
/* Parses body (len bytes, need not be NUL-terminated) for a part of n records. item_is(ctx, i,
 * id) says whether the parsed itemIdentifier `id` names record i (NULL: none does). failed: n
 * entries the caller zeroed. On ESMD_ITEMS_BAD, *why says what was wrong (a static string). */
enum esmd_item_failures esmd_mapping_parse_item_failures(const char *body, size_t len, size_t n,
                                                         bool (*item_is)(void *ctx, size_t i,
                                                                         const struct cJSON *id),
                                                         void *ctx, bool *failed, const char **why);

#endif
