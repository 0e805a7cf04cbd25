/* The asynchronous invocation queue (docs/design.md#async-life, docs/async.md), on Postgres
 * (migrations/0004_async.sql). The Lambda-compatible routes that drive it (Invoke,
 * event-invoke-config) are in src/api_invoke.c and src/api_eic.c (include/esmd/api.h).
 *
 * Accepting: events are inserted by group commit (every event accepted while an INSERT is in
 * flight goes into the next one) and acknowledged (202, or the enqueue callback) only after the
 * commit. Workers claim due events FOR UPDATE SKIP LOCKED with a lease, woken by LISTEN/NOTIFY
 * (channel esmd_async) with a poll timer as fallback, invoke them through the invoker (within
 * the function's max_concurrency), and settle them in batches: success → on_success record;
 * function errors retried maximum_retry_attempts times (about 1 and 2 minutes apart); throttles,
 * 5xx and transport errors retried with backoff (1 s doubling to 5 min) until the event is older
 * than maximum_event_age; then the on_failure record (RetriesExhausted / EventAgeExceeded) and
 * the dead_letter message. Records go through the destination outbox (esmd_dests_send): an
 * event is deleted only after its records are committed there, so a crash loses nothing
 * (at-least-once).
 *
 * The queue is a policy on the lease-queue engine (include/esmd/leaseq.h). Its timings, lease,
 * payload limit, workers and insert connections are cfg->async_queue (docs/configuration.md).
 *
 * Everything runs on the loop thread. */
#ifndef ESMD_ASYNCQ_H
#define ESMD_ASYNCQ_H

#include "esmd/buf.h"
#include "esmd/common.h"
#include "esmd/config.h"

struct ev_loop;
struct esmd_asyncq;
struct esmd_invoker;
struct esmd_dests;

/* Creates the queue and starts its workers (Postgres connections: two for inserts, one for
 * claims / LISTEN / configuration, one for settling). inv and dests are borrowed and must
 * outlive the queue; cfg only for the call (the functions' settings are read through inv).
 * instance_id: this process's stable id (leases). NULL with err. */
struct esmd_asyncq *esmd_asyncq_new(struct ev_loop *loop, const struct esmd_config *cfg,
                                    struct esmd_invoker *inv, struct esmd_dests *dests,
                                    const char *conninfo, const char *instance_id, char *err,
                                    size_t errlen) ESMD_MUST_CHECK;

/* A reload (docs/async.md#reload): the queue follows cfg's functions (call it after the
 * invoker's esmd_invoker_add_function / esmd_invoker_update_function for them). Each function
 * reads its settings (timeout, max_concurrency, async) through the invoker's handle at each use,
 * so the next attempt of an event queued earlier takes the new ones; cfg itself is not kept. A
 * function cfg adds is accepted and claimed at once; one it no longer has is refused by Invoke
 * and esmd_asyncq_enqueue (ESMD_ENOENT) and its events stay queued, not claimed, until a
 * reload adds it back (claimed events finish on its last settings). */
void esmd_asyncq_reconfigure(struct esmd_asyncq *q, const struct esmd_config *cfg);

/* cb of esmd_asyncq_enqueue(): ok once the event is committed (request_id: its id), or !ok with
 * err. Strings borrowed for the call. */
typedef void (*esmd_asyncq_cb)(void *ud, bool ok, const char *request_id, const char *err);

struct esmd_trace;
/* Queues an asynchronous invocation of `function` with payload (JSON, len bytes, copied) and the
 * trace context of its request (copied, sent with every attempt; NULL for none).
 * Returns 0 (cb will run from the loop, never inside this call), ESMD_ENOENT for an unknown
 * function, ESMD_ETOOBIG over the async payload limit, ESMD_EINVAL for a payload that is not
 * JSON, ESMD_ESTATE once the queue is stopping (cb not called on errors). */
int esmd_asyncq_enqueue(struct esmd_asyncq *q, const char *function, const char *payload,
                        size_t len, const struct esmd_trace *trace, esmd_asyncq_cb cb,
                        void *ud) ESMD_MUST_CHECK;

/* Graceful stop: accepting stops (Invoke answers 503), no new claims; invocations in flight
 * finish and are settled; done(ud) from the loop when idle. Then free. */
void esmd_asyncq_stop(struct esmd_asyncq *q, void (*done)(void *ud), void *ud);
/* Frees now; claimed events not settled keep their lease and run again after it. NULL ok.
 * Enqueues not committed get cb(!ok) from inside this call. */
void esmd_asyncq_free(struct esmd_asyncq *q);

/* Whether events are accepted (false once stopping). */
bool esmd_asyncq_accepting(const struct esmd_asyncq *q);
/* The largest payload of an event (async_queue.max_payload; at most ESMD_MAX_PAYLOAD). */
size_t esmd_asyncq_max_payload(const struct esmd_asyncq *q);

/* ---- event-invoke-config (the run-time overrides of a function's `async` section) ---- */

/* A function's event-invoke-config in force: its override where it has one, else its
 * configuration's. Strings borrowed until the next change (the loop turn). */
struct esmd_asyncq_eic {
    bool set; /* an `async` section or an override exists (Get finds a configuration) */
    int maximum_retry_attempts;
    int64_t maximum_event_age_s;
    const char *on_success, *on_failure; /* destination URIs; NULL: none */
    double last_modified;                /* epoch seconds */
};

/* Fills out for `function`. 0, or ESMD_ENOENT for a function the queue does not have. */
int esmd_asyncq_eic_get(struct esmd_asyncq *q, const char *function,
                        struct esmd_asyncq_eic *out) ESMD_MUST_CHECK;

/* A change (validated by the caller). */
struct esmd_asyncq_eic_change {
    bool replace;                        /* every field (absent ones fall back to the file's) */
    int maximum_retry_attempts;          /* -1: not given */
    int maximum_event_age_s;             /* -1: not given */
    const char *on_success, *on_failure; /* NULL: not given; "": none */
};

/* cb of a change: rc 0 once stored and in force here (every instance hears it through NOTIFY),
 * ESMD_ENOENT for a delete that found no override, ESMD_EIO when the database failed (logged). */
typedef void (*esmd_asyncq_eic_cb)(void *ud, int rc);

/* Stores ch for `function` (strings copied). Returns 0 (cb runs from the loop), ESMD_ENOENT
 * (unknown function) or ESMD_ESTATE (closing); cb is not called on errors. */
int esmd_asyncq_eic_put(struct esmd_asyncq *q, const char *function,
                        const struct esmd_asyncq_eic_change *ch, esmd_asyncq_eic_cb cb,
                        void *ud) ESMD_MUST_CHECK;
/* Deletes the override of `function`; as esmd_asyncq_eic_put. */
int esmd_asyncq_eic_delete(struct esmd_asyncq *q, const char *function, esmd_asyncq_eic_cb cb,
                           void *ud) ESMD_MUST_CHECK;

/* Appends {"ready":bool,"queued_here":N,...} for /readyz; returns readiness. */
bool esmd_asyncq_ready(struct esmd_asyncq *q, struct esmd_buf *detail);

#endif
