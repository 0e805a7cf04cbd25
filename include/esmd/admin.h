/* The admin API for event source mappings (docs/admin.md):
 *
 *  - Lambda-compatible (src/api_esm.c): ListEventSourceMappings, GetEventSourceMapping,
 *    UpdateEventSourceMapping under /2015-03-31/event-source-mappings[/{UUID}] (Enabled,
 *    BatchSize, MaximumBatchingWindowInSeconds, FilterCriteria, DestinationConfig);
 *  - native (src/admin.c): GET /admin/mappings[/{name}], POST /admin/mappings/{name}/pause|resume,
 *    DELETE /admin/mappings/{name}/overrides, POST /admin/filter/test; and /admin/dead-letters
 *    (src/admin_dlq.c).
 *
 * Changes are overrides of the configuration file's values, stored per mapping name in
 * esmd.mapping_overrides (migrations/0005) by src/admin_store.c and applied at once through the
 * mapping API. Every change sends NOTIFY esmd_mapping_overrides (payload: the mapping name) in
 * its transaction; every instance LISTENs on its own Postgres connection and re-reads the row,
 * so all instances with the same configuration converge on what the database holds. At start-up
 * the overrides are read (blocking, before the loop runs) and applied before the mappings start;
 * an overridden field whose value in the file has changed since it was overridden is dropped
 * (the file's new value wins). Requests follow Lambda's conventions through
 * include/esmd/lambda_api.h.
 *
 * A mapping's UUID is a UUIDv5 (SHA-1, RFC 4122 section 4.3) of its name in a fixed esmd
 * namespace, so every instance and every restart agree on it. Everything runs on the loop
 * thread. */
#ifndef ESMD_ADMIN_H
#define ESMD_ADMIN_H

#include "esmd/buf.h"
#include "esmd/config.h"

struct ev_loop;
struct esmd_admin;
struct esmd_admin_auth;
struct esmd_dests;
struct esmd_http;
struct esmd_mapping;

/* Largest request body the admin routes read (bigger ones are answered 413 before the body is
 * read): 256 KB. */
#define ESMD_ADMIN_MAX_BODY (256 * 1024)

/* The NOTIFY channel of override changes. */
#define ESMD_ADMIN_CHANNEL "esmd_mapping_overrides"

/* Creates the admin module. cfg, maps[0..nmaps) (one per configured mapping that runs here;
 * looked up by name), dests (for DestinationConfig URIs; may be NULL: then only "" is
 * accepted) and auth (NULL: loopback clients only) are borrowed and must outlive it. conninfo:
 * the service's Postgres (migrations applied); the module opens its own connection on the loop
 * for writes and LISTEN, and a short blocking one in esmd_admin_load(). instance_id is copied.
 * NULL with err on failure. */
struct esmd_admin *esmd_admin_new(struct ev_loop *loop, const struct esmd_config *cfg,
                                  struct esmd_mapping *const *maps, size_t nmaps,
                                  struct esmd_dests *dests, const struct esmd_admin_auth *auth,
                                  const char *conninfo, const char *instance_id, char *err,
                                  size_t errlen) ESMD_MUST_CHECK;

/* Blocking, before the loop runs (after the mappings are created, before they start): reads the
 * persisted overrides, drops the fields whose configuration value changed since they were
 * overridden, and applies the rest. Returns 0, or ESMD_EIO with err (database unreachable). */
int esmd_admin_load(struct esmd_admin *adm, char *err, size_t errlen) ESMD_MUST_CHECK;

/* Starts listening for changes (LISTEN) and registers the routes on http. 0 or ESMD_EINVAL. */
int esmd_admin_start(struct esmd_admin *adm, struct esmd_http *http) ESMD_MUST_CHECK;

/* The admin console (src/admin_console.c, docs/admin.md#console): registers the public GET /ui/
 * (static files compiled in) and GET /admin/functions (the invoker's per-function numbers).
 * auth and inv are borrowed and must outlive the listener. 0 or ESMD_EINVAL. */
struct esmd_admin_auth;
struct esmd_invoker;
int esmd_admin_console_routes(struct esmd_http *http, const struct esmd_admin_auth *auth,
                              const struct esmd_invoker *inv) ESMD_MUST_CHECK;

/* A reload (docs/operations.md#reload): cfg (borrowed, must outlive the module) replaces the
 * configuration; maps[0..nmaps) are the mappings that run now (a mapping being restarted is
 * missing until esmd_admin_set_mapping() hands it over). Overrides of mappings still configured
 * are kept, except an overridden field whose value in the file changed: dropped, here and in the
 * database, as at start-up (the file's new value applies). Then every mapping is handed the
 * values in force, and the stored rows are read again (those of mappings the reload added). */
void esmd_admin_reconfigure(struct esmd_admin *adm, const struct esmd_config *cfg,
                            struct esmd_mapping *const *maps, size_t nmaps);
/* Hands over the mapping that now runs for its name (one a reload restarted), with the values
 * in force applied. */
void esmd_admin_set_mapping(struct esmd_admin *adm, struct esmd_mapping *map);

/* Closes the Postgres connection (admin requests still waiting for it are answered 503) and
 * frees. Call before the mappings and the listener are freed. NULL ok. */
void esmd_admin_free(struct esmd_admin *adm);

/* ---- pieces, for tests ---- */

/* The UUID esmd gives the mapping `name` (36 chars + NUL into out[37]). */
void esmd_admin_mapping_uuid(const char *name, char out[37]);

/* Checks an UpdateEventSourceMapping body for mapping c as the route does, without
 * destinations (a non-empty DestinationConfig destination is refused). Returns 0, or the status
 * of the error answer with "Type: message" in why. */
int esmd_admin_esm_check(const struct esmd_mapping_cfg *c, const char *body, size_t len, char *why,
                         size_t whylen);

#endif
