/* One event source mapping at run time: source connector → batches → invoker → outcome.
 *
 * The mapping owns its shards (ordered units of the source), each split into
 * parallelization_factor lanes by record key, the records emitted to it until they are settled,
 * the batches being formed and the batches in flight. At most one batch is in flight per lane,
 * so records of a key are delivered in order (of a shard, with one lane); a batch may hold
 * several shards' records, one lane of each. A shard's committed position is the lowest record
 * not finished over its lanes (docs/design.md#lanes). A batch is flushed when it holds batch_size
 * records, when the batching window (opened by its first record) expires, or when the next record
 * would take the event over 6 MB. A failed batch is retried with exponential backoff and jitter
 * (its shards do not advance meanwhile, other shards keep flowing) until it succeeds or, with the
 * failure-handling controls (maximum_retry_attempts, maximum_record_age,
 * bisect_batch_on_function_error, report_batch_item_failures), its records are given up: stored for
 * the on-failure destination or discarded, and the source moves on. Queue sources redeliver failed
 * batches themselves. */
#ifndef ESMD_MAPPING_H
#define ESMD_MAPPING_H

#include "esmd/buf.h"
#include "esmd/config.h"

struct ev_loop;
struct esmd_invoker;
struct esmd_mapping;
struct esmd_dests;

/* cfg is borrowed and must outlive the mapping; the mapping's function must be registered in
 * inv. NULL with err on failure (unknown source kind, connector refused the config). */
struct esmd_mapping *esmd_mapping_new(struct ev_loop *loop, const struct esmd_mapping_cfg *cfg,
                                      struct esmd_invoker *inv, const char *instance_id, char *err,
                                      size_t errlen) ESMD_MUST_CHECK;
/* Where on-failure records go (the mapping's on_failure URI); set before start. NULL: records
 * given up are discarded. dests must outlive the mapping's stop. */
void esmd_mapping_set_destinations(struct esmd_mapping *map, struct esmd_dests *dests);
int esmd_mapping_start(struct esmd_mapping *map) ESMD_MUST_CHECK;
/* Graceful stop: no new batches; batches waiting for a retry and records not yet sent are
 * abandoned (not acked: they will be read again); requests in flight finish, and are acked if
 * they succeed; then the connector commits and closes. done(ud) runs from the loop when all of
 * that is finished. */
void esmd_mapping_stop(struct esmd_mapping *map, void (*done)(void *ud), void *ud);
/* Abandons what is still in flight (cancels requests) and frees. NULL ok. */
void esmd_mapping_free(struct esmd_mapping *map);

/* ---- run-time changes (admin API: UpdateEventSourceMapping, /admin pause/resume) ----
 * They apply to this process's mapping at once and last until the next change or restart; the
 * admin API persists them and replays them at start-up and on other instances. */

/* Stops (false) or restarts (true) fetching and invoking: batches in flight finish; records
 * already read wait, unsent. Idempotent. */
void esmd_mapping_set_enabled(struct esmd_mapping *map, bool enabled);
bool esmd_mapping_enabled(const struct esmd_mapping *map);

/* What UpdateEventSourceMapping may change. Unset fields (has_* false / NULL) keep their value. */
struct esmd_mapping_update {
    bool has_batch_size;
    int batch_size; /* 1..10000 */
    bool has_window;
    int64_t window_ms; /* 0..300000 */
    bool has_filters;
    const char *const *filters; /* patterns as JSON text; nfilters 0 = no filtering */
    size_t nfilters;
    bool has_on_failure;
    const char *on_failure; /* destination URI, NULL = none */
    bool has_parallelization_factor;
    int parallelization_factor; /* 1..10; Kafka and Redis sources only */
};

/* Validates everything first and applies nothing on error (err names the field and why, e.g.
 * "FilterCriteria.Filters[1].Pattern: unknown operator \"prefx\" ..."). New values apply to the
 * batches formed from now on. 0 or ESMD_EINVAL. */
int esmd_mapping_update(struct esmd_mapping *map, const struct esmd_mapping_update *u, char *err,
                        size_t errlen);

/* A reload (docs/operations.md#reload): the mapping reads its settings from cfg from now on
 * (the retry controls, report_batch_item_failures, the filter limits); cfg has the same name,
 * function and source (the connector keeps the cfg it was created with) and must outlive the
 * mapping. The values esmd_mapping_update() sets (batch size, window, filters, on_failure) and
 * `enabled` are not touched: the admin module hands them over, with its overrides. */
void esmd_mapping_set_cfg(struct esmd_mapping *map, const struct esmd_mapping_cfg *cfg);

/* The values in force (after updates), for GetEventSourceMapping. */
int esmd_mapping_batch_size(const struct esmd_mapping *map);
int64_t esmd_mapping_window_ms(const struct esmd_mapping *map);
size_t esmd_mapping_nfilters(const struct esmd_mapping *map);
const char *esmd_mapping_filter(const struct esmd_mapping *map, size_t i); /* JSON text */
const char *esmd_mapping_on_failure(const struct esmd_mapping *map);       /* or NULL */
int esmd_mapping_parallelization_factor(const struct esmd_mapping *map);
const struct esmd_mapping_cfg *esmd_mapping_cfg(const struct esmd_mapping *map);

const char *esmd_mapping_name(const struct esmd_mapping *map);
bool esmd_mapping_ready(const struct esmd_mapping *map);
/* Appends a JSON object with the mapping's state: ready, reason, shards, in-flight batches,
 * pending records, lag, last processing result. */
void esmd_mapping_describe(const struct esmd_mapping *map, struct esmd_buf *out);
/* The admin console's data (docs/admin.md#console): {"interval_ms":5000,"samples":[{"time":
 * epoch ms,"lag":n|null,"records_per_second":x,"invoked_per_second":x,"failed_per_second":x,
 * "inflight_batches":n,"pending_records":n}, ...]} (the last 15 minutes, oldest first), and
 * {"failures":[...]} (the last records given up, newest first). */
void esmd_mapping_history_json(const struct esmd_mapping *map, struct esmd_buf *out);
void esmd_mapping_failures_json(const struct esmd_mapping *map, struct esmd_buf *out);
/* "OK", "No records processed", or the last failure ("PROBLEM: function error ..."). */
const char *esmd_mapping_last_result(const struct esmd_mapping *map);

#endif
