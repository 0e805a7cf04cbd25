/* Destinations: where on-failure records (event source mappings) and invocation records (async
 * queue: on_success / on_failure / dead_letter) go. docs/design.md#destinations,
 * docs/destinations.md.
 *
 * URIs: kafka://CONNECTION/TOPIC (produced with the given key), redis://CONNECTION/STREAM (XADD),
 * pgqueue://QUEUE (esmd's Postgres queue, esmd.send()), http://… and https://… (POST, 2xx =
 * delivered), function://NAME (an async invocation of a configured function: the record is
 * enqueued through the function sink, esmd_dests_set_function_sink(); delivered = committed in
 * the async queue).
 *
 * Delivery is reliable through a Postgres outbox: esmd_dests_send() inserts the record into
 * esmd.outbox and reports once that insert is committed; only then may the caller acknowledge
 * its source. A delivery worker on the loop claims due outbox rows (FOR UPDATE SKIP LOCKED, with
 * a lease, so several esmd processes share the work and a crashed one's rows are taken over),
 * writes them to their destination, and deletes them once written. A failed write is retried
 * with backoff (1 s doubling to 5 min, jitter), forever; a destination that keeps failing shows
 * in esmd_destination_delivery_failures_total{destination} and in /readyz detail, and never
 * blocks other destinations or the mappings (the outbox absorbs the records).
 *
 * Everything runs on the loop thread. */
#ifndef ESMD_DESTINATION_H
#define ESMD_DESTINATION_H

#include "esmd/buf.h"
#include "esmd/config.h"

#include <stdbool.h>
#include <stddef.h>

struct ev_loop;
struct esmd_dests;

/* Creates the router for every destination URI the configuration names (connections are made
 * lazily, on first delivery) and starts the delivery worker (two Postgres connections: sends,
 * worker). cfg is borrowed until esmd_dests_free() (URIs are checked against it, and the
 * writers read their connections' settings there). conninfo: the service's
 * Postgres (outbox; migrations applied). instance_id: the stable id of this process (leases;
 * rows held by an earlier process with the same id are released at once). NULL with err. */
struct esmd_dests *esmd_dests_new(struct ev_loop *loop, const struct esmd_config *cfg,
                                  const char *conninfo, const char *instance_id, char *err,
                                  size_t errlen);
/* Frees everything now: writes in progress are abandoned (their rows stay leased and are
 * delivered later), sends not committed get their callback (!ok) from inside this call. NULL
 * ok. From inside one of this router's callbacks it finishes when that callback returns. */
void esmd_dests_free(struct esmd_dests *d);

/* Called once the record is durably in the outbox (ok) or could not be stored (!ok, err says
 * why; the caller keeps its source unacknowledged and tries again later). */
typedef void (*esmd_dests_cb)(void *ud, bool ok, const char *err);

/* Stores `payload` (a JSON document, len bytes, copied) for delivery to `uri`. key/keylen: the
 * Kafka message key for kafka:// destinations (NULL: no key); ignored by the other kinds.
 * Returns 0 (cb will be called, never from inside this call) or ESMD_EINVAL for an unknown URI
 * (cb not called). A URI is known when esmd_dests_check() accepts it: it need not be named in
 * the configuration. The payload must be UTF-8 without NUL bytes (ESMD_EINVAL otherwise).
 * ESMD_ESTATE once esmd_dests_free() has started. Sends made after esmd_dests_stop() are
 * stored (and delivered by the next start). Sends not committed when esmd_dests_free() runs get
 * cb(ud, false, "closed" or "shutting down") from inside esmd_dests_free(). */
int esmd_dests_send(struct esmd_dests *d, const char *uri, const char *payload, size_t len,
                    const void *key, size_t keylen, esmd_dests_cb cb, void *ud);

/* As esmd_dests_send, with message attributes (a JSON object in SQS's shape, as
 * esmd.message_attributes() takes; copied) for pgqueue:// destinations; other kinds ignore
 * them. No key. */
int esmd_dests_send_attrs(struct esmd_dests *d, const char *uri, const char *payload, size_t len,
                          const char *attributes, esmd_dests_cb cb, void *ud);

/* Writer of function:// destinations (the async invocation queue). sink(ud, function, payload,
 * len, cb, cbud) queues an async invocation of function (payload borrowed for the call) and
 * returns 0, then calls cb(cbud, ok, err) once it is committed (ok) or could not be (!ok; the
 * row is retried with backoff); non-zero: refused now (retried with backoff). */
typedef void (*esmd_dests_sink_cb)(void *ud, bool ok, const char *err);
typedef int (*esmd_dests_function_sink)(void *ud, const char *function, const char *payload,
                                        size_t len, esmd_dests_sink_cb cb, void *cbud);
/* Sets (or with NULL removes) the function:// writer; until one is set, function:// rows wait
 * in the outbox (their writes fail and are retried). ud borrowed. */
void esmd_dests_set_function_sink(struct esmd_dests *d, esmd_dests_function_sink sink, void *ud);

/* A reload (docs/operations.md#reload): function:// URIs are checked against cfg's functions
 * from now on (borrowed until the next call or esmd_dests_free()); connections stay those of
 * esmd_dests_new's configuration. */
void esmd_dests_set_functions(struct esmd_dests *d, const struct esmd_config *cfg);

/* Whether uri is a destination this router can store: a well-formed URI whose connection
 * (kafka://, redis://) is defined in the configuration with the right type, or whose function
 * (function://) is. Returns 0, or ESMD_EINVAL with the reason in err. For the admin API. */
int esmd_dests_check(const struct esmd_dests *d, const char *uri, char *err,
                     size_t errlen) ESMD_MUST_CHECK;

/* Where the connection and function names of destination URIs are looked up: cfg, by
 * esmd_config_connection() / esmd_config_function() unless the lookups are given (the
 * configuration loader gives its indexes, so that checking every URI of a file stays linear).
 * Borrowed. */
struct esmd_dests_names {
    const struct esmd_config *cfg;
    const struct esmd_conn_cfg *(*connection)(void *ud, const char *name);   /* NULL ok */
    const struct esmd_function_cfg *(*function)(void *ud, const char *name); /* NULL ok */
    void *ud;
};

/* Whether uri is a destination a router made from this configuration can store, by the same
 * parser as esmd_dests_check() (the configuration loader checks every destination URI with it,
 * so that check-config and run refuse the same URIs): a well-formed URI whose connection
 * (kafka://, redis://) or function (function://) the configuration defines. Returns 0, or
 * ESMD_EINVAL with the reason in err (the URI named). */
int esmd_dests_check_uri(const struct esmd_dests_names *names, const char *uri, char *err,
                         size_t errlen) ESMD_MUST_CHECK;

/* uri with the password of an http(s) URL shown as ***, as the destination label of the
 * metrics and /readyz shows it; caller frees. */
char *esmd_dest_label(const char *uri);

/* Graceful stop: no new claims; writes in progress finish; done(ud) when idle (sends and
 * writes finished, at most 40 s), from the loop, never inside this call. Then free. */
void esmd_dests_stop(struct esmd_dests *d, void (*done)(void *ud), void *ud);

/* Appends the readiness detail, a JSON object {"<uri>":{"ready":bool,"error":"…",
 * "pending":N}, …} ("error" only when there is one; a password in an http URI is shown as ***);
 * returns false when a destination has failed its last delivery. A destination seen in the
 * outbox that this process cannot write (no such connection here) is listed with ready false
 * but does not make the result false. detail may be NULL. */
bool esmd_dests_ready(struct esmd_dests *d, struct esmd_buf *detail);

#endif
