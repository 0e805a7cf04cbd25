/* The override store of the admin API (src/admin_store.h, docs/admin.md "Overrides").
 *
 * Changes are overrides of the configuration file's values, stored per mapping name in
 * esmd.mapping_overrides (migrations/0005). A change (UpdateEventSourceMapping, pause, resume)
 * is applied to the local mapping at once (the mapping validates it), then written with one
 * statement that upserts the row, updates esmd.mapping_state and sends NOTIFY
 * esmd_mapping_overrides (payload: the mapping name), all in its transaction. The answer waits
 * for that statement; if it fails, the local mapping goes back to the last stored values. Every
 * instance (this one too) LISTENs on its own connection and re-reads the row when the NOTIFY
 * arrives, and all rows whenever LISTEN is (re)established, so all instances with the same
 * configuration converge on what the database holds. At start-up the overrides are read
 * (blocking, before the loop runs) and applied before the mappings start; an overridden field
 * whose value in the file has changed since it was overridden is dropped (the file wins). */
#include "admin_dlq.h"
#include "admin_store.h"
#include "esmd/log.h"
#include "esmd/pg.h"

#include <cJSON.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

/* The columns every read of esmd.mapping_overrides returns, in this order. */
#define ADM_OVR_COLS                                                                               \
    "name, enabled, batch_size, window_ms, filters::text, on_failure, "                            \
    "(extract(epoch FROM updated_at) * 1000)::bigint, updated_by, parallelization_factor"

/* Drops the overridden fields $2 (comma-separated names) of mapping $1, tells every instance. */
#define ADM_DROP_FIELDS                                                                            \
    "WITH f AS (SELECT string_to_array($2, ',') AS a),"                                            \
    " u AS (UPDATE esmd.mapping_overrides SET"                                                     \
    "  enabled = CASE WHEN 'enabled' = ANY(f.a) THEN NULL ELSE enabled END,"                       \
    "  batch_size = CASE WHEN 'batch_size' = ANY(f.a) THEN NULL ELSE batch_size END,"              \
    "  window_ms = CASE WHEN 'window_ms' = ANY(f.a) THEN NULL ELSE window_ms END,"                 \
    "  filters = CASE WHEN 'filters' = ANY(f.a) THEN NULL ELSE filters END,"                       \
    "  on_failure = CASE WHEN 'on_failure' = ANY(f.a) THEN NULL ELSE on_failure END,"              \
    "  parallelization_factor = CASE WHEN 'parallelization_factor' = ANY(f.a) THEN NULL"           \
    "   ELSE parallelization_factor END,"                                                          \
    "  yaml = yaml - f.a, updated_at = now()"                                                      \
    "  FROM f WHERE name = $1 RETURNING name)"                                                     \
    " SELECT pg_notify('" ESMD_ADMIN_CHANNEL "', $1) FROM u"
/* Deletes the row of mapping $1 when nothing is overridden any more. */
#define ADM_DELETE_EMPTY                                                                           \
    "DELETE FROM esmd.mapping_overrides WHERE name = $1 AND enabled IS NULL AND batch_size IS "    \
    "NULL AND window_ms IS NULL AND filters IS NULL AND on_failure IS NULL AND "                   \
    "parallelization_factor IS NULL"

/* One query in flight: a write or reset for a route, or a reload. */
enum adm_op_kind { ADM_OP_WRITE, ADM_OP_RESET, ADM_OP_READ };

struct adm_op {
    struct esmd_admin *adm;
    enum adm_op_kind kind;
    size_t mi;  /* mapping index; SIZE_MAX: every mapping (reload of all rows) */
    char *name; /* owned: of mapping mi (a reload may move it to another index, or remove it) */
    esmd_admin_store_cb cb;
    void *ud;
};

static void ovr_clear(struct adm_ovr *o)
{
    for (size_t i = 0; i < o->nfilters; i++)
        free(o->filters[i]);
    free(o->filters);
    free(o->on_failure);
    free(o->updated_by);
    memset(o, 0, sizeof(*o));
    o->enabled = -1;
    o->window_ms = -1;
}

void esmd_admin_store_clear(struct adm_map *m)
{
    ovr_clear(&m->ovr);
}

static bool adm_streq(const char *a, const char *b)
{
    if (a == NULL || b == NULL)
        return a == b;
    return strcmp(a, b) == 0;
}

/* Hands the mapping the values in force that differ from what it has. */
static void adm_apply(struct adm_map *m)
{
    struct esmd_mapping_update u = {0};
    const char **filters = NULL;
    size_t nf = adm_eff_nfilters(m);
    bool any = false, enabled;
    char err[512];

    if (m->map == NULL)
        return;
    if (adm_eff_batch(m) != esmd_mapping_batch_size(m->map)) {
        u.has_batch_size = any = true;
        u.batch_size = adm_eff_batch(m);
    }
    if (adm_eff_factor(m) != esmd_mapping_parallelization_factor(m->map)) {
        u.has_parallelization_factor = any = true;
        u.parallelization_factor = adm_eff_factor(m);
    }
    if (adm_eff_window(m) != esmd_mapping_window_ms(m->map)) {
        u.has_window = any = true;
        u.window_ms = adm_eff_window(m);
    }
    if (nf != esmd_mapping_nfilters(m->map)) {
        u.has_filters = true;
    } else {
        for (size_t i = 0; i < nf; i++)
            if (!adm_streq(adm_eff_filter(m, i), esmd_mapping_filter(m->map, i)))
                u.has_filters = true;
    }
    if (u.has_filters) {
        any = true;
        filters = esmd_xcalloc(nf + 1, sizeof(*filters));
        for (size_t i = 0; i < nf; i++)
            filters[i] = adm_eff_filter(m, i);
        u.filters = filters;
        u.nfilters = nf;
    }
    if (!adm_streq(adm_eff_on_failure(m), adm_cur_on_failure(m))) {
        u.has_on_failure = any = true;
        u.on_failure = adm_eff_on_failure(m);
    }
    if (any && esmd_mapping_update(m->map, &u, err, sizeof(err)) != 0)
        ESMD_WARN(&(struct esmd_log_ctx){m->cfg->name, m->cfg->function, NULL, NULL},
                  "admin: stored override not applied: %s", err);
    free(filters);
    enabled = m->ovr.enabled >= 0 ? m->ovr.enabled == 1 : m->cfg->enabled;
    if (enabled != esmd_mapping_enabled(m->map))
        esmd_mapping_set_enabled(m->map, enabled); /* logs it */
}

/* ---- rows ---- */

/* Fills o from row r of res (ADM_OVR_COLS). Returns 0, or -1 when a column cannot be read
 * (o is cleared then). */
static int ovr_from_row(struct adm_ovr *o, const PGresult *res, int r)
{
    ovr_clear(o);
    o->present = true;
    if (!PQgetisnull(res, r, 1))
        o->enabled = PQgetvalue(res, r, 1)[0] == 't';
    if (!PQgetisnull(res, r, 2))
        o->batch_size = atoi(PQgetvalue(res, r, 2));
    if (!PQgetisnull(res, r, 3))
        o->window_ms = strtoll(PQgetvalue(res, r, 3), NULL, 10);
    if (!PQgetisnull(res, r, 4)) {
        cJSON *arr = cJSON_Parse(PQgetvalue(res, r, 4)), *it;

        if (!cJSON_IsArray(arr)) {
            cJSON_Delete(arr);
            ovr_clear(o);
            return -1;
        }
        o->has_filters = true;
        o->filters = esmd_xcalloc((size_t)cJSON_GetArraySize(arr) + 1, sizeof(char *));
        cJSON_ArrayForEach(it, arr)
        {
            if (cJSON_IsString(it))
                o->filters[o->nfilters++] = esmd_xstrdup(it->valuestring);
        }
        cJSON_Delete(arr);
    }
    if (!PQgetisnull(res, r, 5))
        o->on_failure = esmd_xstrdup(PQgetvalue(res, r, 5));
    o->updated_ms = strtoll(PQgetvalue(res, r, 6), NULL, 10);
    if (!PQgetisnull(res, r, 7))
        o->updated_by = esmd_xstrdup(PQgetvalue(res, r, 7));
    if (!PQgetisnull(res, r, 8))
        o->parallelization_factor = atoi(PQgetvalue(res, r, 8));
    if (o->batch_size < 0 || o->batch_size > 10000 || o->window_ms > 300000 ||
        o->parallelization_factor < 0 || o->parallelization_factor > ESMD_CFG_MAX_PARALLELIZATION) {
        ovr_clear(o);
        return -1;
    }
    return 0;
}

struct adm_map *esmd_admin_find_name(struct esmd_admin *adm, const char *name, size_t *idx)
{
    for (size_t i = 0; i < adm->nmaps; i++)
        if (strcmp(adm->maps[i].cfg->name, name) == 0) {
            if (idx)
                *idx = i;
            return &adm->maps[i];
        }
    return NULL;
}

struct adm_map *esmd_admin_find_uuid(struct esmd_admin *adm, const char *uuid, size_t *idx)
{
    for (size_t i = 0; i < adm->nmaps; i++)
        if (strcasecmp(adm->maps[i].uuid, uuid) == 0) {
            if (idx)
                *idx = i;
            return &adm->maps[i];
        }
    return NULL;
}

/* Takes a result of SELECT ADM_OVR_COLS: the rows it holds replace the overrides of their
 * mappings; when `all`, the mappings without a row lose theirs; with `only` (a mapping index),
 * that mapping loses its override when no row names it. Then applies. */
static void adm_take_rows(struct esmd_admin *adm, const PGresult *res, bool all, size_t only)
{
    bool *seen = esmd_xcalloc(adm->nmaps + 1, sizeof(bool));

    for (int r = 0; r < PQntuples(res); r++) {
        size_t i;
        struct adm_map *m = esmd_admin_find_name(adm, PQgetvalue(res, r, 0), &i);

        if (m == NULL)
            continue; /* a mapping another configuration has */
        seen[i] = true;
        if (ovr_from_row(&m->ovr, res, r) != 0)
            ESMD_WARN(&(struct esmd_log_ctx){m->cfg->name, m->cfg->function, NULL, NULL},
                      "admin: unreadable row in esmd.mapping_overrides ignored");
    }
    for (size_t i = 0; i < adm->nmaps; i++) {
        if (!seen[i] && (all || i == only))
            ovr_clear(&adm->maps[i].ovr);
        if (seen[i] || all || i == only)
            adm_apply(&adm->maps[i]);
    }
    free(seen);
}

/* ---- writes ---- */

static void adm_op_done(void *ud, const PGresult *res, const char *err)
{
    struct adm_op *op = ud;
    struct esmd_admin *adm = op->adm;
    bool ok = res != NULL && PQresultStatus(res) == PGRES_TUPLES_OK;

    size_t mi = op->mi;
    if (op->name && esmd_admin_find_name(adm, op->name, &mi) == NULL) {
        /* the mapping is gone (a reload removed it) */
        if (op->kind != ADM_OP_READ)
            op->cb(op->ud, ESMD_ESTATE);
        free(op->name);
        free(op);
        return;
    }
    if (op->kind == ADM_OP_READ) {
        if (ok && !adm->closing)
            adm_take_rows(adm, res, op->mi == SIZE_MAX, mi);
        else if (!ok && !adm->closing)
            ESMD_WARN(NULL, "admin: could not read esmd.mapping_overrides: %s",
                      err ? err : PQresultErrorMessage(res));
        free(op->name);
        free(op);
        return;
    }
    struct adm_map *m = &adm->maps[mi];
    if (!ok) {
        ESMD_WARN(&(struct esmd_log_ctx){m->cfg->name, m->cfg->function, NULL, NULL},
                  "admin: could not store the change: %s", err ? err : PQresultErrorMessage(res));
        if (!adm->closing)
            adm_apply(m); /* back to what the database holds */
        op->cb(op->ud, adm->closing ? ESMD_ESTATE : ESMD_EIO);
        free(op->name);
        free(op);
        return;
    }
    if (op->kind == ADM_OP_WRITE) {
        if (PQntuples(res) == 1)
            (void)ovr_from_row(&m->ovr, res, 0);
    } else {
        ovr_clear(&m->ovr);
    }
    adm_apply(m);
    op->cb(op->ud, ESMD_OK);
    free(op->name);
    free(op);
}

static struct adm_op *adm_op_new(struct esmd_admin *adm, enum adm_op_kind kind, size_t mi,
                                 esmd_admin_store_cb cb, void *ud)
{
    struct adm_op *op = esmd_xcalloc(1, sizeof(*op));

    op->adm = adm;
    op->kind = kind;
    op->mi = mi;
    op->name = mi < adm->nmaps ? esmd_xstrdup(adm->maps[mi].cfg->name) : NULL;
    op->cb = cb;
    op->ud = ud;
    return op;
}

int esmd_admin_write(struct esmd_admin *adm, size_t mi, const struct adm_change *ch, char *err,
                     size_t errlen, esmd_admin_store_cb cb, void *ud)
{
    struct adm_map *m = &adm->maps[mi];
    const struct esmd_mapping_cfg *c = m->cfg;
    struct esmd_buf filters = ESMD_BUF_INIT;
    cJSON *yaml;
    char bs[16], win[24], pf[16], *yaml_text;
    const char *params[9];
    struct adm_op *op;
    int rc;

    if (adm->closing)
        return ESMD_ESTATE;
    if (m->map) {
        struct esmd_mapping_update u = {
            .has_batch_size = ch->batch_size > 0,
            .batch_size = ch->batch_size,
            .has_window = ch->window_ms >= 0,
            .window_ms = ch->window_ms,
            .has_filters = ch->has_filters,
            .filters = ch->filters,
            .nfilters = ch->nfilters,
            .has_on_failure = ch->on_failure != NULL,
            .on_failure = ch->on_failure && ch->on_failure[0] ? ch->on_failure : NULL,
            .has_parallelization_factor = ch->parallelization_factor > 0,
            .parallelization_factor = ch->parallelization_factor,
        };

        if ((u.has_batch_size || u.has_window || u.has_filters || u.has_on_failure ||
             u.has_parallelization_factor) &&
            esmd_mapping_update(m->map, &u, err, errlen) != 0)
            return ESMD_EINVAL;
        if (ch->enabled >= 0)
            esmd_mapping_set_enabled(m->map, ch->enabled == 1);
    }

    /* the file's values the overridden fields are overridden against */
    yaml = cJSON_CreateObject();
    if (ch->enabled >= 0)
        cJSON_AddBoolToObject(yaml, "enabled", c->enabled);
    if (ch->batch_size > 0)
        cJSON_AddNumberToObject(yaml, "batch_size", c->batch_size);
    if (ch->window_ms >= 0)
        cJSON_AddNumberToObject(yaml, "window_ms", (double)c->maximum_batching_window_ms);
    if (ch->parallelization_factor > 0)
        cJSON_AddNumberToObject(yaml, "parallelization_factor", adm_cfg_factor(c));
    if (ch->has_filters) {
        cJSON *arr = cJSON_AddArrayToObject(yaml, "filters");

        for (size_t i = 0; i < c->nfilters; i++)
            cJSON_AddItemToArray(arr, cJSON_CreateString(c->filters[i].pattern));
        esmd_buf_putc(&filters, '[');
        for (size_t i = 0; i < ch->nfilters; i++) {
            if (i)
                esmd_buf_putc(&filters, ',');
            adm_put_str(&filters, ch->filters[i]);
        }
        esmd_buf_putc(&filters, ']');
    }
    if (ch->on_failure) {
        if (c->on_failure)
            cJSON_AddStringToObject(yaml, "on_failure", c->on_failure);
        else
            cJSON_AddNullToObject(yaml, "on_failure");
    }
    yaml_text = cJSON_PrintUnformatted(yaml);
    cJSON_Delete(yaml);
    snprintf(bs, sizeof(bs), "%d", ch->batch_size);
    snprintf(win, sizeof(win), "%" PRId64, ch->window_ms);
    params[0] = c->name;
    params[1] = ch->enabled < 0 ? NULL : ch->enabled ? "t" : "f";
    params[2] = ch->batch_size > 0 ? bs : NULL;
    params[3] = ch->window_ms >= 0 ? win : NULL;
    params[4] = ch->has_filters ? esmd_buf_cstr(&filters) : NULL;
    params[5] = ch->on_failure;
    params[6] = yaml_text;
    params[7] = adm->instance_id;
    snprintf(pf, sizeof(pf), "%d", ch->parallelization_factor);
    params[8] = ch->parallelization_factor > 0 ? pf : NULL;

    op = adm_op_new(adm, ADM_OP_WRITE, mi, cb, ud);
    rc = esmd_pg_query(
        adm->pg,
        "WITH o AS ("
        " INSERT INTO esmd.mapping_overrides AS t (name, enabled, batch_size, window_ms, filters,"
        "  on_failure, yaml, updated_at, updated_by, parallelization_factor)"
        " VALUES ($1, $2::boolean, $3::integer, $4::integer, $5::jsonb, $6, $7::jsonb, now(), $8,"
        "  $9::integer)"
        " ON CONFLICT (name) DO UPDATE SET"
        "  enabled = COALESCE(EXCLUDED.enabled, t.enabled),"
        "  batch_size = COALESCE(EXCLUDED.batch_size, t.batch_size),"
        "  window_ms = COALESCE(EXCLUDED.window_ms, t.window_ms),"
        "  filters = COALESCE(EXCLUDED.filters, t.filters),"
        "  on_failure = COALESCE(EXCLUDED.on_failure, t.on_failure),"
        "  parallelization_factor = COALESCE(EXCLUDED.parallelization_factor,"
        "   t.parallelization_factor),"
        "  yaml = t.yaml || EXCLUDED.yaml, updated_at = now(), updated_by = EXCLUDED.updated_by"
        " RETURNING " ADM_OVR_COLS "),"
        " s AS (UPDATE esmd.mapping_state SET enabled = $2::boolean,"
        "  state = CASE WHEN $2::boolean THEN 'Enabled' ELSE 'Disabled' END,"
        "  state_transition_reason = 'User action', updated_at = now()"
        "  WHERE name = $1 AND $2::boolean IS NOT NULL),"
        " n AS (SELECT pg_notify('" ESMD_ADMIN_CHANNEL "', $1))"
        " SELECT o.* FROM o CROSS JOIN n",
        9, params, adm_op_done, op);
    free(yaml_text);
    esmd_buf_free(&filters);
    if (rc != 0) {
        free(op->name);
        free(op);
        adm_apply(m);
        return ESMD_ESTATE;
    }
    return ESMD_OK;
}

int esmd_admin_reset(struct esmd_admin *adm, size_t mi, esmd_admin_store_cb cb, void *ud)
{
    const struct adm_map *m = &adm->maps[mi];
    const char *params[2] = {m->cfg->name, m->cfg->enabled ? "t" : "f"};
    struct adm_op *op;

    if (adm->closing)
        return ESMD_ESTATE;
    op = adm_op_new(adm, ADM_OP_RESET, mi, cb, ud);
    if (esmd_pg_query(adm->pg,
                      "WITH d AS (DELETE FROM esmd.mapping_overrides WHERE name = $1"
                      "  RETURNING name),"
                      " s AS (UPDATE esmd.mapping_state SET enabled = $2::boolean,"
                      "  state = CASE WHEN $2::boolean THEN 'Enabled' ELSE 'Disabled' END,"
                      "  state_transition_reason = 'Configuration file', updated_at = now()"
                      "  WHERE name = $1),"
                      " n AS (SELECT pg_notify('" ESMD_ADMIN_CHANNEL "', $1))"
                      " SELECT (SELECT count(*) FROM d), (SELECT count(*) FROM n)",
                      2, params, adm_op_done, op) != 0) {
        free(op->name);
        free(op);
        return ESMD_ESTATE;
    }
    return ESMD_OK;
}

/* ---- LISTEN ---- */

static void adm_read(struct esmd_admin *adm, const char *name)
{
    struct adm_op *op;
    size_t mi = SIZE_MAX;

    if (name != NULL && esmd_admin_find_name(adm, name, &mi) == NULL)
        return; /* not a mapping of this configuration */
    op = adm_op_new(adm, ADM_OP_READ, mi, NULL, NULL);
    if (esmd_pg_query(adm->pg,
                      name ? "SELECT " ADM_OVR_COLS " FROM esmd.mapping_overrides WHERE name = $1"
                           : "SELECT " ADM_OVR_COLS " FROM esmd.mapping_overrides",
                      name ? 1 : 0, name ? &name : NULL, adm_op_done, op) != 0) {
        free(op->name);
        free(op);
    }
}

static void adm_notified(void *ud, const char *channel, const char *payload)
{
    struct esmd_admin *adm = ud;

    ESMD_UNUSED(channel);
    if (adm->closing)
        return;
    adm_read(adm, payload); /* NULL: (re)connected, re-read everything */
}

int esmd_admin_store_listen(struct esmd_admin *adm)
{
    return esmd_pg_listen(adm->pg, ESMD_ADMIN_CHANNEL, adm_notified, adm) != 0 ? ESMD_EINVAL
                                                                               : ESMD_OK;
}

/* ---- reload ---- */

static cJSON *adm_yaml_value(const struct esmd_mapping_cfg *c, const char *field);

static void adm_drop_done(void *ud, const PGresult *res, const char *err)
{
    char *name = ud;

    if (res == NULL ||
        (PQresultStatus(res) != PGRES_TUPLES_OK && PQresultStatus(res) != PGRES_COMMAND_OK))
        ESMD_WARN(NULL, "admin: %s: could not drop the overrides the reload replaced: %s", name,
                  err ? err : PQresultErrorMessage(res));
    free(name);
}

/* The overridden fields of m whose value in the file differs between was and m->cfg are
 * dropped, here and in the database (docs/admin.md: the file's new value applies). */
static void adm_drop_changed(struct esmd_admin *adm, struct adm_map *m,
                             const struct esmd_mapping_cfg *was)
{
    static const char *const fields[] = {"enabled", "batch_size", "window_ms",
                                         "filters", "on_failure", "parallelization_factor"};
    struct adm_ovr *o = &m->ovr;
    bool set[] = {o->enabled >= 0, o->batch_size > 0,     o->window_ms >= 0,
                  o->has_filters,  o->on_failure != NULL, o->parallelization_factor > 0};
    struct esmd_buf drop = ESMD_BUF_INIT;

    if (!o->present)
        return;
    for (size_t k = 0; k < ESMD_ARRAY_LEN(fields); k++) {
        cJSON *then, *now;
        bool same;

        if (!set[k])
            continue;
        then = adm_yaml_value(was, fields[k]);
        now = adm_yaml_value(m->cfg, fields[k]);
        same = cJSON_Compare(then, now, true);
        cJSON_Delete(then);
        cJSON_Delete(now);
        if (same)
            continue;
        esmd_buf_printf(&drop, "%s%s", drop.len ? "," : "", fields[k]);
        ESMD_INFO(&(struct esmd_log_ctx){m->cfg->name, m->cfg->function, NULL, NULL},
                  "admin: %s changed in the configuration file since it was overridden through "
                  "the admin API: the file's value applies",
                  fields[k]);
        if (k == 0)
            o->enabled = -1;
        else if (k == 1)
            o->batch_size = 0;
        else if (k == 2)
            o->window_ms = -1;
        else if (k == 3) {
            for (size_t i = 0; i < o->nfilters; i++)
                free(o->filters[i]);
            free(o->filters);
            o->filters = NULL;
            o->nfilters = 0;
            o->has_filters = false;
        } else if (k == 4) {
            free(o->on_failure);
            o->on_failure = NULL;
        } else {
            o->parallelization_factor = 0;
        }
    }
    if (drop.len > 0) {
        const char *params[2] = {m->cfg->name, esmd_buf_cstr(&drop)};
        char *name = esmd_xstrdup(m->cfg->name);

        /* NULL the dropped fields, delete the row when nothing is left, tell the instances */
        if (esmd_pg_query(adm->pg, ADM_DROP_FIELDS, 2, params, adm_drop_done, name) != 0)
            free(name);
        name = esmd_xstrdup(m->cfg->name);
        if (esmd_pg_query(adm->pg, ADM_DELETE_EMPTY, 1, params, adm_drop_done, name) != 0)
            free(name);
    }
    esmd_buf_free(&drop);
}

void esmd_admin_reconfigure(struct esmd_admin *adm, const struct esmd_config *cfg,
                            struct esmd_mapping *const *maps, size_t nmaps)
{
    struct adm_map *next = esmd_xcalloc(cfg->nmappings + 1, sizeof(*next));

    for (size_t i = 0; i < cfg->nmappings; i++) {
        struct adm_map *m = &next[i];
        struct adm_map *was = esmd_admin_find_name(adm, cfg->mappings[i].name, NULL);

        m->cfg = &cfg->mappings[i];
        esmd_admin_mapping_uuid(m->cfg->name, m->uuid);
        esmd_admin_store_clear(m);
        if (was) { /* its overrides go on */
            m->ovr = was->ovr;
            memset(&was->ovr, 0, sizeof(was->ovr));
        }
        for (size_t j = 0; j < nmaps; j++)
            if (maps[j] && strcmp(esmd_mapping_name(maps[j]), m->cfg->name) == 0)
                m->map = maps[j];
        if (was && !adm->closing)
            adm_drop_changed(adm, m, was->cfg);
    }
    for (size_t i = 0; i < adm->nmaps; i++)
        ovr_clear(&adm->maps[i].ovr);
    free(adm->maps);
    adm->maps = next;
    adm->nmaps = cfg->nmappings;
    adm->cfg = cfg;
    if (adm->dlq)
        esmd_admin_dlq_set_config(adm->dlq, cfg);
    for (size_t i = 0; i < adm->nmaps; i++)
        adm_apply(&adm->maps[i]);
    if (!adm->closing)
        adm_read(adm, NULL); /* rows of mappings the reload added */
}

void esmd_admin_set_mapping(struct esmd_admin *adm, struct esmd_mapping *map)
{
    struct adm_map *m = esmd_admin_find_name(adm, esmd_mapping_name(map), NULL);

    if (m == NULL)
        return;
    m->map = map;
    adm_apply(m);
}

/* ---- start-up ---- */

/* The file's current value of `field` as JSON, to compare with what the override was made
 * against. Caller deletes. */
static cJSON *adm_yaml_value(const struct esmd_mapping_cfg *c, const char *field)
{
    if (strcmp(field, "enabled") == 0)
        return cJSON_CreateBool(c->enabled);
    if (strcmp(field, "batch_size") == 0)
        return cJSON_CreateNumber(c->batch_size);
    if (strcmp(field, "window_ms") == 0)
        return cJSON_CreateNumber((double)c->maximum_batching_window_ms);
    if (strcmp(field, "parallelization_factor") == 0)
        return cJSON_CreateNumber(adm_cfg_factor(c));
    if (strcmp(field, "filters") == 0) {
        cJSON *arr = cJSON_CreateArray();

        for (size_t i = 0; i < c->nfilters; i++)
            cJSON_AddItemToArray(arr, cJSON_CreateString(c->filters[i].pattern));
        return arr;
    }
    return c->on_failure ? cJSON_CreateString(c->on_failure) : cJSON_CreateNull();
}

/* Clears res; false with err and *rc (ESMD_EINVAL for an error retrying will not mend,
 * esmd_pg_error_permanent, else ESMD_EIO) when its status is not `want`. */
static bool pg_ok(PGconn *pg, PGresult *res, ExecStatusType want, int *rc, char *err, size_t errlen)
{
    bool ok = PQresultStatus(res) == want;

    if (!ok) {
        snprintf(err, errlen, "%s", res ? PQresultErrorMessage(res) : PQerrorMessage(pg));
        *rc = esmd_pg_error_permanent(pg, res) ? ESMD_EINVAL : ESMD_EIO;
    }
    PQclear(res);
    return ok;
}

int esmd_admin_load(struct esmd_admin *adm, char *err, size_t errlen)
{
    static const char *const fields[] = {"enabled", "batch_size", "window_ms",
                                         "filters", "on_failure", "parallelization_factor"};
    static const int cols[] = {1, 2, 3, 4, 5, 8};
    PGconn *pg = PQconnectdb(adm->conninfo);
    PGresult *res = NULL;
    int rc = ESMD_EIO;

    if (PQstatus(pg) != CONNECTION_OK) {
        snprintf(err, errlen, "%s", PQerrorMessage(pg));
        goto out;
    }
    res = PQexec(pg, "SELECT " ADM_OVR_COLS ", yaml::text FROM esmd.mapping_overrides");
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        snprintf(err, errlen, "reading esmd.mapping_overrides: %s", PQresultErrorMessage(res));
        rc = esmd_pg_error_permanent(pg, res) ? ESMD_EINVAL : ESMD_EIO;
        goto out;
    }
    for (int r = 0; r < PQntuples(res); r++) {
        struct adm_map *m = esmd_admin_find_name(adm, PQgetvalue(res, r, 0), NULL);
        cJSON *yaml;
        struct esmd_buf drop = ESMD_BUF_INIT;

        if (m == NULL)
            continue;
        yaml = cJSON_Parse(PQgetvalue(res, r, 9));
        /* an overridden field whose file value changed since: the file wins */
        for (size_t k = 0; k < ESMD_ARRAY_LEN(fields); k++) {
            cJSON *now, *then;

            if (PQgetisnull(res, r, cols[k]))
                continue;
            then = cJSON_GetObjectItemCaseSensitive(yaml, fields[k]);
            now = adm_yaml_value(m->cfg, fields[k]);
            if (then == NULL || !cJSON_Compare(now, then, true)) {
                esmd_buf_printf(&drop, "%s%s", drop.len ? "," : "", fields[k]);
                ESMD_INFO(&(struct esmd_log_ctx){m->cfg->name, m->cfg->function, NULL, NULL},
                          "admin: %s changed in the configuration file since it was overridden "
                          "through the admin API: the file's value applies",
                          fields[k]);
            }
            cJSON_Delete(now);
        }
        cJSON_Delete(yaml);
        if (drop.len > 0) {
            /* NULL the dropped fields; delete the row when nothing is left */
            const char *params[2] = {m->cfg->name, esmd_buf_cstr(&drop)};
            PGresult *u = PQexecParams(pg, ADM_DROP_FIELDS, 2, NULL, params, NULL, NULL, 0);
            bool ok = pg_ok(pg, u, PGRES_TUPLES_OK, &rc, err, errlen);

            esmd_buf_free(&drop);
            if (!ok)
                goto out;
            u = PQexecParams(pg, ADM_DELETE_EMPTY, 1, NULL, params, NULL, NULL, 0);
            if (!pg_ok(pg, u, PGRES_COMMAND_OK, &rc, err, errlen))
                goto out;
        }
    }
    PQclear(res);
    res = PQexec(pg, "SELECT " ADM_OVR_COLS " FROM esmd.mapping_overrides");
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        snprintf(err, errlen, "reading esmd.mapping_overrides: %s", PQresultErrorMessage(res));
        rc = esmd_pg_error_permanent(pg, res) ? ESMD_EINVAL : ESMD_EIO;
        goto out;
    }
    adm_take_rows(adm, res, true, SIZE_MAX);
    /* esmd.mapping_state shows the state in force */
    for (size_t i = 0; i < adm->nmaps; i++) {
        const struct adm_map *m = &adm->maps[i];
        const char *params[2];

        if (m->ovr.enabled < 0)
            continue;
        params[0] = m->cfg->name;
        params[1] = m->ovr.enabled ? "t" : "f";
        if (!pg_ok(pg,
                   PQexecParams(pg,
                                "UPDATE esmd.mapping_state SET enabled = $2::boolean, state = "
                                "CASE WHEN $2::boolean THEN 'Enabled' ELSE 'Disabled' END, "
                                "state_transition_reason = 'User action' WHERE name = $1",
                                2, NULL, params, NULL, NULL, 0),
                   PGRES_COMMAND_OK, &rc, err, errlen))
            goto out;
    }
    for (size_t i = 0; i < adm->nmaps; i++)
        if (adm->maps[i].ovr.present)
            ESMD_INFO(&(struct esmd_log_ctx){adm->maps[i].cfg->name, adm->maps[i].cfg->function,
                                             NULL, NULL},
                      "admin: overrides from esmd.mapping_overrides applied");
    rc = ESMD_OK;
out:
    PQclear(res);
    PQfinish(pg);
    return rc;
}
