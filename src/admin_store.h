/* The admin module's state and its override store (src/admin_store.c), shared by the admin's
 * three files: src/admin.c (life cycle, the native /admin routes), src/api_esm.c (Lambda's
 * event-source-mapping API) and src/admin_store.c (esmd.mapping_overrides: load, apply, write,
 * NOTIFY). Private to src/.
 *
 * One struct adm_map per configured mapping holds the mapping (when it runs here) and the last
 * known row of esmd.mapping_overrides for it (adm_ovr). The values in force are the override's
 * where it has one, the configuration file's otherwise; esmd_admin_apply() hands the mapping
 * whatever differs from what it has, so re-reading an unchanged row does nothing. Everything
 * runs on the loop thread. */
#ifndef ESMD_ADMIN_STORE_H
#define ESMD_ADMIN_STORE_H

#include "esmd/admin.h"
#include "esmd/buf.h"
#include "esmd/config.h"
#include "esmd/http.h"
#include "esmd/mapping.h"

#include <string.h>

struct esmd_pg;
struct esmd_admin_dlq;

/* A row of esmd.mapping_overrides. */
struct adm_ovr {
    bool present;               /* a row exists */
    int enabled;                /* -1 = not overridden, else 0 / 1 */
    int batch_size;             /* 0 = not overridden */
    int64_t window_ms;          /* -1 = not overridden */
    int parallelization_factor; /* 0 = not overridden */
    bool has_filters;           /* filters overridden (nfilters 0 = no filtering) */
    char **filters;             /* owned */
    size_t nfilters;
    char *on_failure;   /* owned; NULL = not overridden, "" = none */
    int64_t updated_ms; /* when the row last changed */
    char *updated_by;   /* owned; instance id, or NULL */
};

struct adm_map {
    const struct esmd_mapping_cfg *cfg; /* borrowed */
    struct esmd_mapping *map;           /* borrowed; NULL when it does not run here */
    char uuid[37];
    struct adm_ovr ovr;
};

struct esmd_admin {
    struct ev_loop *loop;
    const struct esmd_config *cfg;
    struct esmd_dests *dests;
    const struct esmd_admin_auth *auth;
    char *conninfo;
    char *instance_id;
    struct esmd_pg *pg;         /* owned: writes and LISTEN */
    struct esmd_admin_dlq *dlq; /* owned: /admin/dead-letters (src/admin_dlq.c), on pg */
    struct adm_map *maps;
    size_t nmaps;
    int64_t started_ms;
    bool closing;
};

/* ---- the values in force ---- */

static inline bool adm_eff_enabled(const struct adm_map *m)
{
    if (m->map)
        return esmd_mapping_enabled(m->map);
    return m->ovr.enabled >= 0 ? m->ovr.enabled == 1 : m->cfg->enabled;
}

static inline int adm_eff_batch(const struct adm_map *m)
{
    return m->ovr.batch_size > 0 ? m->ovr.batch_size : m->cfg->batch_size;
}

/* The file's parallelization_factor (a pgqueue source has none: 1). */
static inline int adm_cfg_factor(const struct esmd_mapping_cfg *c)
{
    return c->parallelization_factor > 0 ? c->parallelization_factor : 1;
}

static inline int adm_eff_factor(const struct adm_map *m)
{
    return m->ovr.parallelization_factor > 0 ? m->ovr.parallelization_factor
                                             : adm_cfg_factor(m->cfg);
}

static inline int adm_cur_factor(const struct adm_map *m)
{
    return m->map ? esmd_mapping_parallelization_factor(m->map) : adm_eff_factor(m);
}

static inline int64_t adm_eff_window(const struct adm_map *m)
{
    return m->ovr.window_ms >= 0 ? m->ovr.window_ms : m->cfg->maximum_batching_window_ms;
}

static inline size_t adm_eff_nfilters(const struct adm_map *m)
{
    return m->ovr.has_filters ? m->ovr.nfilters : m->cfg->nfilters;
}

static inline const char *adm_eff_filter(const struct adm_map *m, size_t i)
{
    return m->ovr.has_filters ? m->ovr.filters[i] : m->cfg->filters[i].pattern;
}

/* NULL = none. */
static inline const char *adm_eff_on_failure(const struct adm_map *m)
{
    if (m->ovr.on_failure)
        return m->ovr.on_failure[0] ? m->ovr.on_failure : NULL;
    return m->cfg->on_failure;
}

/* What the API shows: the mapping's own getters when it runs here. */
static inline int adm_cur_batch(const struct adm_map *m)
{
    return m->map ? esmd_mapping_batch_size(m->map) : adm_eff_batch(m);
}

static inline int64_t adm_cur_window(const struct adm_map *m)
{
    return m->map ? esmd_mapping_window_ms(m->map) : adm_eff_window(m);
}

static inline size_t adm_cur_nfilters(const struct adm_map *m)
{
    return m->map ? esmd_mapping_nfilters(m->map) : adm_eff_nfilters(m);
}

static inline const char *adm_cur_filter(const struct adm_map *m, size_t i)
{
    return m->map ? esmd_mapping_filter(m->map, i) : adm_eff_filter(m, i);
}

static inline const char *adm_cur_on_failure(const struct adm_map *m)
{
    const char *s = m->map ? esmd_mapping_on_failure(m->map) : adm_eff_on_failure(m);

    return s && s[0] ? s : NULL;
}

static inline const char *adm_last_result(const struct adm_map *m)
{
    return m->map ? esmd_mapping_last_result(m->map) : "No records processed";
}

/* ---- lookups ---- */

/* The mapping named name / with UUID uuid (any case), its index into *idx (idx may be NULL);
 * NULL when there is none. */
struct adm_map *esmd_admin_find_name(struct esmd_admin *adm, const char *name, size_t *idx);
struct adm_map *esmd_admin_find_uuid(struct esmd_admin *adm, const char *uuid, size_t *idx);

/* ---- changes ---- */

/* What a write changes; NULL / has_* false = unchanged. */
struct adm_change {
    int enabled; /* -1 = unchanged */
    int batch_size;
    int64_t window_ms;
    int parallelization_factor; /* 0 = unchanged */
    bool has_filters;
    const char **filters;
    size_t nfilters;
    const char *on_failure; /* "" = none */
};

/* cb of a write or reset: rc 0 once stored and in force here (every instance hears the NOTIFY);
 * ESMD_EIO when the database failed (logged; the mapping is back to what the database holds);
 * ESMD_ESTATE when the module is closing. */
typedef void (*esmd_admin_store_cb)(void *ud, int rc);

/* Applies ch to the mapping of index mi (which validates it) and stores it (strings copied).
 * Returns 0 (cb runs from the loop), ESMD_EINVAL with err when the mapping refuses the change,
 * or ESMD_ESTATE (closing); cb is not called on errors. */
int esmd_admin_write(struct esmd_admin *adm, size_t mi, const struct adm_change *ch, char *err,
                     size_t errlen, esmd_admin_store_cb cb, void *ud) ESMD_MUST_CHECK;
/* Deletes the override of mapping mi (the file's values apply again); as esmd_admin_write. */
int esmd_admin_reset(struct esmd_admin *adm, size_t mi, esmd_admin_store_cb cb,
                     void *ud) ESMD_MUST_CHECK;

/* LISTENs for changes of every instance. 0 or ESMD_EINVAL. */
int esmd_admin_store_listen(struct esmd_admin *adm) ESMD_MUST_CHECK;
/* Forgets the override of m (at free). */
void esmd_admin_store_clear(struct adm_map *m);

/* ---- routes ---- */

struct esmd_api_call;

/* Appends Lambda's EventSourceMappingConfiguration of m (src/api_esm.c). */
void esmd_admin_esm_json(const struct esmd_admin *adm, const struct adm_map *m, struct esmd_buf *b);

/* Answers call with m: Lambda's ESM configuration (lambda) or the native object. */
void esmd_admin_answer_mapping(struct esmd_admin *adm, struct esmd_api_call *call,
                               const struct adm_map *m, bool lambda, int status);

/* Writes ch (esmd_admin_write; NULL: esmd_admin_reset) for mapping mi and answers call: 400 when
 * the mapping refuses it, the mapping (as esmd_admin_answer_mapping; lambda: 202, else 200) once
 * stored, 500 / 503 when it could not be. */
void esmd_admin_change(struct esmd_admin *adm, struct esmd_api_call *call, size_t mi,
                       const struct adm_change *ch, bool lambda);

/* Registers Lambda's List/Get/UpdateEventSourceMapping (src/api_esm.c). 0 or ESMD_EINVAL. */
int esmd_admin_esm_routes(struct esmd_admin *adm, struct esmd_http *http,
                          esmd_http_limit_fn limit) ESMD_MUST_CHECK;

/* JSON output helpers shared by the two answer shapes. */
static inline void adm_put_str(struct esmd_buf *b, const char *s)
{
    esmd_buf_put_json_string(b, s, strlen(s));
}

static inline void adm_put_key(struct esmd_buf *b, bool *first, const char *key)
{
    if (!*first)
        esmd_buf_putc(b, ',');
    *first = false;
    adm_put_str(b, key);
    esmd_buf_putc(b, ':');
}

#endif
