/* The admin API (include/esmd/admin.h, docs/admin.md): its life cycle, and the native /admin
 * routes: GET /admin/mappings[/{name}[/history|/failures]], POST
 * /admin/mappings/{name}/pause|resume, DELETE /admin/mappings/{name}/overrides and POST
 * /admin/filter/test. Lambda's event-source-mapping API is src/api_esm.c, the override store
 * src/admin_store.c (state shared through src/admin_store.h), the dead letters src/admin_dlq.c. */
#include "admin_dlq.h"
#include "admin_store.h"
#include "esmd/admin_auth.h"
#include "esmd/filter.h"
#include "esmd/json.h"
#include "esmd/lambda_api.h"
#include "esmd/log.h"
#include "esmd/pg.h"

#include <cJSON.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define ADM_TEST_MAX_PATTERNS 100  /* /admin/filter/test */
#define ADM_TEST_MAX_PATTERN 65536 /* bytes */
#define ADM_NAME_MAX 80            /* a mapping name in a path */

/* ---- answers ---- */

/* A pattern text as a JSON value (it is one once checked); a string if it is not. */
static void put_pattern(struct esmd_buf *b, const char *p)
{
    if (esmd_json_valid(p, strlen(p)))
        esmd_buf_puts(b, p);
    else
        adm_put_str(b, p);
}

/* The native object: GET /admin/mappings[/{name}]. */
static void adm_native_json(const struct esmd_admin *adm, const struct adm_map *m,
                            struct esmd_buf *b)
{
    const struct esmd_mapping_cfg *c = m->cfg;
    const struct adm_ovr *o = &m->ovr;
    const char *dest = adm_cur_on_failure(m);
    char iso[32];

    esmd_buf_puts(b, "{\"name\":");
    adm_put_str(b, c->name);
    esmd_buf_puts(b, ",\"uuid\":");
    adm_put_str(b, m->uuid);
    esmd_buf_puts(b, ",\"function\":");
    adm_put_str(b, c->function);
    esmd_buf_printf(b, ",\"source\":\"%s\",\"running\":%s,\"enabled\":%s,\"state\":\"%s\"",
                    esmd_config_kind_name(c->kind), m->map ? "true" : "false",
                    adm_eff_enabled(m) ? "true" : "false",
                    adm_eff_enabled(m) ? "Enabled" : "Disabled");
    esmd_buf_printf(b,
                    ",\"batch_size\":%d,\"maximum_batching_window_ms\":%" PRId64
                    ",\"parallelization_factor\":%d",
                    adm_cur_batch(m), adm_cur_window(m), adm_cur_factor(m));
    esmd_buf_puts(b, ",\"filters\":[");
    for (size_t i = 0; i < adm_cur_nfilters(m); i++) {
        if (i)
            esmd_buf_putc(b, ',');
        put_pattern(b, adm_cur_filter(m, i));
    }
    esmd_buf_puts(b, "],\"on_failure\":");
    if (dest)
        adm_put_str(b, dest);
    else
        esmd_buf_puts(b, "null");
    esmd_buf_puts(b, ",\"overrides\":");
    if (!o->present) {
        esmd_buf_puts(b, "null");
    } else {
        bool first = true;

        esmd_buf_putc(b, '{');
        if (o->enabled >= 0) {
            adm_put_key(b, &first, "enabled");
            esmd_buf_puts(b, o->enabled ? "true" : "false");
        }
        if (o->batch_size > 0) {
            adm_put_key(b, &first, "batch_size");
            esmd_buf_printf(b, "%d", o->batch_size);
        }
        if (o->window_ms >= 0) {
            adm_put_key(b, &first, "maximum_batching_window_ms");
            esmd_buf_printf(b, "%" PRId64, o->window_ms);
        }
        if (o->parallelization_factor > 0) {
            adm_put_key(b, &first, "parallelization_factor");
            esmd_buf_printf(b, "%d", o->parallelization_factor);
        }
        if (o->has_filters) {
            adm_put_key(b, &first, "filters");
            esmd_buf_putc(b, '[');
            for (size_t i = 0; i < o->nfilters; i++) {
                if (i)
                    esmd_buf_putc(b, ',');
                put_pattern(b, o->filters[i]);
            }
            esmd_buf_putc(b, ']');
        }
        if (o->on_failure) {
            adm_put_key(b, &first, "on_failure");
            if (o->on_failure[0])
                adm_put_str(b, o->on_failure);
            else
                esmd_buf_puts(b, "null");
        }
        adm_put_key(b, &first, "updated_at");
        esmd_iso8601_ms(o->updated_ms, iso);
        adm_put_str(b, iso);
        adm_put_key(b, &first, "updated_by");
        if (o->updated_by)
            adm_put_str(b, o->updated_by);
        else
            esmd_buf_puts(b, "null");
        esmd_buf_putc(b, '}');
    }
    esmd_buf_puts(b, ",\"last_processing_result\":");
    adm_put_str(b, adm_last_result(m));
    esmd_buf_puts(b, ",\"status\":");
    if (m->map)
        esmd_mapping_describe(m->map, b);
    else
        esmd_buf_puts(b, "null");
    esmd_buf_putc(b, '}');
    ESMD_UNUSED(adm);
}

void esmd_admin_answer_mapping(struct esmd_admin *adm, struct esmd_api_call *call,
                               const struct adm_map *m, bool lambda, int status)
{
    struct esmd_buf b = ESMD_BUF_INIT;

    if (lambda)
        esmd_admin_esm_json(adm, m, &b);
    else
        adm_native_json(adm, m, &b);
    esmd_api_respond_json(call, status, &b);
    esmd_buf_free(&b);
}

/* A change waiting for its statement. */
struct adm_call {
    struct esmd_admin *adm;
    struct esmd_api_call call; /* call.req NULL once the client went away */
    size_t mi;
    char *name; /* owned: of mapping mi (a reload may move or remove it) */
    bool lambda;
};

static void adm_call_abort(void *ud, struct esmd_http_req *req)
{
    struct adm_call *ac = ud;

    ESMD_UNUSED(req);
    ac->call.req = NULL;
}

static void adm_call_done(void *ud, int rc)
{
    struct adm_call *ac = ud;

    if (ac->call.req) {
        esmd_http_req_on_abort(ac->call.req, NULL, NULL);
        const struct adm_map *m = esmd_admin_find_name(ac->adm, ac->name, NULL);
        if (rc == ESMD_OK && m) /* the database's message is in the log, not for the client */
            esmd_admin_answer_mapping(ac->adm, &ac->call, m, ac->lambda, ac->lambda ? 202 : 200);
        else if (rc == ESMD_ESTATE)
            esmd_api_error(&ac->call, 503, "ServiceException", "shutting down");
        else
            esmd_api_error(&ac->call, 500, "ServiceException", "could not store the change");
    }
    free(ac->name);
    free(ac);
}

void esmd_admin_change(struct esmd_admin *adm, struct esmd_api_call *call, size_t mi,
                       const struct adm_change *ch, bool lambda)
{
    struct adm_call *ac = esmd_xcalloc(1, sizeof(*ac));
    char err[512];
    int rc;

    ac->adm = adm;
    ac->call = *call;
    ac->mi = mi;
    ac->name = esmd_xstrdup(adm->maps[mi].cfg->name);
    ac->lambda = lambda;
    rc = ch ? esmd_admin_write(adm, mi, ch, err, sizeof(err), adm_call_done, ac)
            : esmd_admin_reset(adm, mi, adm_call_done, ac);
    if (rc != ESMD_OK) {
        free(ac->name);
        free(ac);
        if (rc == ESMD_EINVAL)
            esmd_api_bad(call, "%s", err);
        else
            esmd_api_error(call, 503, "ServiceException", "shutting down");
        return;
    }
    esmd_http_req_on_abort(call->req, adm_call_abort, ac);
}

/* ---- /admin/mappings ---- */

static void adm_list(struct esmd_admin *adm, struct esmd_api_call *call)
{
    struct esmd_buf b = ESMD_BUF_INIT;

    esmd_buf_puts(&b, "{\"mappings\":[");
    for (size_t i = 0; i < adm->nmaps; i++) {
        if (i)
            esmd_buf_putc(&b, ',');
        adm_native_json(adm, &adm->maps[i], &b);
    }
    esmd_buf_puts(&b, "]}");
    esmd_api_respond_json(call, 200, &b);
    esmd_buf_free(&b);
}

/* GET /admin/mappings/{name}/history and .../failures: what this instance keeps in memory
 * (src/mapping_watch.c); empty for a mapping that does not run here. */
static void adm_watch(struct esmd_api_call *call, const struct adm_map *m, bool history)
{
    struct esmd_buf b = ESMD_BUF_INIT;

    if (m->map && history)
        esmd_mapping_history_json(m->map, &b);
    else if (m->map)
        esmd_mapping_failures_json(m->map, &b);
    else
        esmd_buf_puts(&b, history ? "{\"interval_ms\":5000,\"samples\":[]}" : "{\"failures\":[]}");
    esmd_api_respond_json(call, 200, &b);
    esmd_buf_free(&b);
}

static void adm_route_mappings(void *ud, struct esmd_http_req *req)
{
    struct esmd_admin *adm = ud;
    const char *method = esmd_http_req_method(req), *name, *action;
    bool get = strcmp(method, "GET") == 0 || strcmp(method, "HEAD") == 0;
    struct esmd_api_call call;
    struct esmd_api_path p;
    struct adm_map *m;
    size_t mi;

    esmd_api_begin(&call, req);
    if (!esmd_admin_authorize(adm->auth, req))
        return;
    if (!esmd_api_path_split(&call, &p))
        return;
    if (p.n < 2 || p.n > 4 || strcmp(p.seg[0], "admin") != 0 || strcmp(p.seg[1], "mappings") != 0 ||
        (p.n == 2 && !get)) {
        esmd_api_error(&call, 404, "ResourceNotFoundException", "no such admin route");
        goto out;
    }
    if (p.n == 2) {
        adm_list(adm, &call);
        goto out;
    }
    name = p.seg[2];
    action = p.n == 4 ? p.seg[3] : "";
    if (name[0] == '\0' || strlen(name) >= ADM_NAME_MAX) {
        esmd_api_error(&call, 404, "ResourceNotFoundException", "no such mapping");
        goto out;
    }
    if ((m = esmd_admin_find_name(adm, name, &mi)) == NULL) {
        esmd_api_error(&call, 404, "ResourceNotFoundException", "mapping %s not found", name);
        goto out;
    }
    if (get && action[0] == '\0') {
        esmd_admin_answer_mapping(adm, &call, m, false, 200);
    } else if (get && (strcmp(action, "history") == 0 || strcmp(action, "failures") == 0)) {
        adm_watch(&call, m, action[0] == 'h');
    } else if (strcmp(method, "POST") == 0 &&
               (strcmp(action, "pause") == 0 || strcmp(action, "resume") == 0)) {
        struct adm_change ch = {.enabled = strcmp(action, "resume") == 0, .window_ms = -1};

        esmd_admin_change(adm, &call, mi, &ch, false);
    } else if (strcmp(method, "DELETE") == 0 && strcmp(action, "overrides") == 0) {
        esmd_admin_change(adm, &call, mi, NULL, false);
    } else {
        esmd_api_error(&call, 404, "ResourceNotFoundException", "no such admin route");
    }
out:
    esmd_api_path_free(&p);
}

/* ---- /admin/filter/test ----
 * The pattern and the event are matched as sent (numbers keep their text), so the body is walked
 * as text (esmd_json_next) for "pattern", "patterns", "mapping" and "event" rather than
 * re-printed from a cJSON tree. The body passes the strict check before any of this runs. */

/* A pattern or event given as a JSON object (its text) or as a string holding one (decoded;
 * *owned set to the copy the caller frees). */
static const char *adm_json_or_string(struct esmd_json_span v, size_t *len, char **owned)
{
    *owned = NULL;
    if (v.n > 0 && v.p[0] == '"') {
        cJSON *s = cJSON_ParseWithLength(v.p, v.n);

        if (cJSON_IsString(s)) {
            *owned = esmd_xstrdup(s->valuestring);
            *len = strlen(*owned);
        }
        cJSON_Delete(s);
        return *owned;
    }
    *len = v.n;
    return v.p;
}

/* A pattern of the request that holds a NUL: false after answering 400. */
static bool adm_pattern_nul_free(struct esmd_api_call *call, struct esmd_json_span v,
                                 const char *where)
{
    struct esmd_buf at = ESMD_BUF_INIT;
    bool found = esmd_api_json_find_nul(v.p, v.n, where, &at);

    if (found)
        esmd_api_bad(call, "%.200s must not contain a NUL character (\\u0000)", esmd_buf_cstr(&at));
    esmd_buf_free(&at);
    return !found;
}

/* Answers a pattern that does not compile: Lambda's error shape with where it failed. */
static void adm_pattern_error(struct esmd_api_call *call, const char *where, size_t i,
                              const struct esmd_filter_error *fe, long body_offset)
{
    struct esmd_buf msg = ESMD_BUF_INIT, b = ESMD_BUF_INIT;

    esmd_buf_printf(&msg, "Invalid filter pattern definition. %s:%d:%d: %s", where, fe->line,
                    fe->column, fe->message);
    esmd_buf_puts(&b, "{\"Type\":\"User\",\"Message\":");
    adm_put_str(&b, esmd_buf_cstr(&msg));
    esmd_buf_printf(&b, ",\"pattern\":%zu,\"line\":%d,\"column\":%d,\"offset\":%zu", i, fe->line,
                    fe->column, fe->offset);
    if (body_offset >= 0)
        esmd_buf_printf(&b, ",\"body_offset\":%ld", body_offset);
    esmd_buf_putc(&b, '}');
    esmd_http_req_add_header(call->req, "x-amzn-ErrorType", "InvalidParameterValueException");
    esmd_api_respond_json(call, 400, &b);
    esmd_buf_free(&msg);
    esmd_buf_free(&b);
}

/* Compiles the filters of the mapping named by the JSON string v into f; *np gets their count.
 * false after answering. */
static bool adm_test_mapping(struct esmd_admin *adm, struct esmd_api_call *call,
                             struct esmd_json_span v, struct esmd_filter *f, size_t *np)
{
    cJSON *s = cJSON_ParseWithLength(v.p, v.n);
    struct adm_map *m = cJSON_IsString(s) ? esmd_admin_find_name(adm, s->valuestring, NULL) : NULL;

    cJSON_Delete(s);
    if (m == NULL) {
        esmd_api_error(call, 404, "ResourceNotFoundException", "mapping: no such mapping");
        return false;
    }
    for (size_t i = 0; i < adm_cur_nfilters(m); i++) {
        const char *pt = adm_cur_filter(m, i);
        struct esmd_filter_error fe;

        if (esmd_filter_add(f, pt, strlen(pt), (uint32_t)i, &fe) != 0) {
            esmd_api_bad(call, "the mapping's filter %zu does not compile: %s", i, fe.message);
            return false;
        }
    }
    *np = adm_cur_nfilters(m);
    return true;
}

/* Compiles the np patterns given into f. false after answering. */
static bool adm_test_patterns(struct esmd_api_call *call, const char *body,
                              const struct esmd_json_span *pats, size_t np, bool single,
                              struct esmd_filter *f)
{
    for (size_t i = 0; i < np; i++) {
        struct esmd_filter_error fe;
        size_t plen;
        char *owned, where[32];
        const char *pt;

        if (single)
            snprintf(where, sizeof(where), "pattern");
        else
            snprintf(where, sizeof(where), "patterns[%zu]", i);
        if (!adm_pattern_nul_free(call, pats[i], where))
            return false;
        pt = adm_json_or_string(pats[i], &plen, &owned);
        if (pt == NULL || (pats[i].p[0] != '{' && pats[i].p[0] != '"')) {
            esmd_api_bad(call, "%s must be a JSON object or a string holding one", where);
            free(owned);
            return false;
        }
        if (plen > ADM_TEST_MAX_PATTERN) {
            esmd_api_bad(call, "%s: at most %d bytes", where, ADM_TEST_MAX_PATTERN);
            free(owned);
            return false;
        }
        if (esmd_filter_add(f, pt, plen, (uint32_t)i, &fe) != 0) {
            adm_pattern_error(call, where, i, &fe,
                              owned ? -1 : (long)((size_t)(pats[i].p - body) + fe.offset));
            free(owned);
            return false;
        }
        free(owned);
    }
    return true;
}

/* Matches the event v against f and answers {"match":..., "matching_patterns":[...]}. */
static void adm_test_match(struct esmd_api_call *call, struct esmd_json_span v,
                           struct esmd_filter *f, size_t np)
{
    struct esmd_buf b = ESMD_BUF_INIT;
    uint32_t ids[ADM_TEST_MAX_PATTERNS];
    size_t elen;
    char *owned;
    const char *ev = adm_json_or_string(v, &elen, &owned);
    int hits;

    if (ev == NULL || (v.p[0] != '{' && v.p[0] != '"')) {
        esmd_api_bad(call, "event must be a JSON object or a string holding one");
        goto out;
    }
    hits = esmd_filter_match_all(f, ev, elen, ids, ESMD_ARRAY_LEN(ids));
    if (hits < 0) {
        esmd_api_bad(call, "event must be a JSON object (or a string holding one)");
        goto out;
    }
    esmd_buf_printf(&b, "{\"match\":%s,\"matching_patterns\":[", hits > 0 ? "true" : "false");
    /* ids come in no particular order: list them sorted */
    for (size_t i = 0, k = 0; i < np && k < (size_t)hits; i++) {
        for (int j = 0; j < hits && j < (int)ESMD_ARRAY_LEN(ids); j++)
            if (ids[j] == i) {
                esmd_buf_printf(&b, "%s%zu", k++ ? "," : "", i);
                break;
            }
    }
    esmd_buf_puts(&b, "]}");
    esmd_api_respond_json(call, 200, &b);
out:
    free(owned);
    esmd_buf_free(&b);
}

static void adm_route_filter_test(void *ud, struct esmd_http_req *req)
{
    struct esmd_admin *adm = ud;
    size_t len, np = 0, pos = 0;
    const char *body = esmd_http_req_body(req, &len);
    struct esmd_json_span key, val, pats[ADM_TEST_MAX_PATTERNS];
    struct esmd_json_span event = {NULL, 0}, mapping = {NULL, 0};
    bool have_pattern = false, have_patterns = false;
    struct esmd_filter *f = NULL;
    struct esmd_api_call call;

    esmd_api_begin(&call, req);
    if (!esmd_admin_authorize(adm->auth, req))
        return;
    if (esmd_api_json_check(body, len) != NULL || body[strspn(body, " \t\r\n")] != '{') {
        esmd_api_error(&call, 400, "InvalidRequestContentException",
                       "Could not parse request body into json: expected a JSON object "
                       "{\"pattern\": ..., \"event\": ...}");
        return;
    }
    while (esmd_json_next(body, len, &pos, &key, &val)) {
        if (esmd_json_key_is(&key, "pattern")) {
            have_pattern = true;
            pats[0] = val;
            np = 1;
        } else if (esmd_json_key_is(&key, "patterns")) {
            struct esmd_json_span item;
            size_t q = 0;

            if (val.p[0] != '[') {
                esmd_api_bad(&call, "patterns must be an array of patterns");
                return;
            }
            have_patterns = true;
            np = 0;
            while (esmd_json_next(val.p, val.n, &q, NULL, &item)) {
                if (np == ADM_TEST_MAX_PATTERNS) {
                    esmd_api_bad(&call, "patterns: at most %d", ADM_TEST_MAX_PATTERNS);
                    return;
                }
                pats[np++] = item;
            }
        } else if (esmd_json_key_is(&key, "event")) {
            event = val;
        } else if (esmd_json_key_is(&key, "mapping")) {
            mapping = val;
        } else {
            esmd_api_bad(&call, "unknown field %.*s (expected pattern, patterns, mapping, event)",
                         (int)(key.n < 100 ? key.n : 100), key.p);
            return;
        }
    }
    if ((int)have_pattern + (int)have_patterns + (mapping.p != NULL) != 1) {
        esmd_api_bad(&call, "give exactly one of \"pattern\", \"patterns\" or \"mapping\"");
        return;
    }
    if (event.p == NULL) {
        esmd_api_bad(&call, "\"event\" is required: a JSON object, or a string holding one");
        return;
    }
    f = esmd_filter_new();
    if (mapping.p != NULL ? adm_test_mapping(adm, &call, mapping, f, &np)
                          : adm_test_patterns(&call, body, pats, np, have_pattern, f))
        adm_test_match(&call, event, f, np);
    esmd_filter_free(f);
}

/* ---- life cycle ---- */

struct esmd_admin *esmd_admin_new(struct ev_loop *loop, const struct esmd_config *cfg,
                                  struct esmd_mapping *const *maps, size_t nmaps,
                                  struct esmd_dests *dests, const struct esmd_admin_auth *auth,
                                  const char *conninfo, const char *instance_id, char *err,
                                  size_t errlen)
{
    struct esmd_admin *adm;

    if (loop == NULL || cfg == NULL || conninfo == NULL) {
        snprintf(err, errlen, "admin: missing loop, configuration or conninfo");
        return NULL;
    }
    adm = esmd_xcalloc(1, sizeof(*adm));
    adm->loop = loop;
    adm->cfg = cfg;
    adm->dests = dests;
    adm->auth = auth;
    adm->conninfo = esmd_xstrdup(conninfo);
    adm->instance_id = esmd_xstrdup(instance_id ? instance_id : "");
    adm->started_ms = esmd_now_ms();
    adm->nmaps = cfg->nmappings;
    adm->maps = esmd_xcalloc(cfg->nmappings + 1, sizeof(*adm->maps));
    for (size_t i = 0; i < cfg->nmappings; i++) {
        struct adm_map *m = &adm->maps[i];

        m->cfg = &cfg->mappings[i];
        esmd_admin_mapping_uuid(m->cfg->name, m->uuid);
        esmd_admin_store_clear(m);
        for (size_t j = 0; j < nmaps; j++)
            if (maps[j] && strcmp(esmd_mapping_name(maps[j]), m->cfg->name) == 0)
                m->map = maps[j];
    }
    adm->pg = esmd_pg_new(loop, conninfo, "admin", err, errlen);
    if (adm->pg == NULL) {
        esmd_admin_free(adm);
        return NULL;
    }
    adm->dlq = esmd_admin_dlq_new(cfg, auth, adm->pg);
    return adm;
}

static size_t adm_body_limit(void *ud, struct esmd_http_req *req)
{
    ESMD_UNUSED(ud);
    ESMD_UNUSED(req);
    return ESMD_ADMIN_MAX_BODY;
}

int esmd_admin_start(struct esmd_admin *adm, struct esmd_http *http)
{
    static const char *const methods[] = {"GET", "POST", "DELETE"};

    if (adm == NULL || http == NULL)
        return ESMD_EINVAL;
    if (esmd_admin_store_listen(adm) != 0 || esmd_admin_esm_routes(adm, http, adm_body_limit) != 0)
        return ESMD_EINVAL;
    if (esmd_http_route_limited(http, "GET", "/admin/mappings", adm_route_mappings, adm_body_limit,
                                adm) != 0)
        return ESMD_EINVAL;
    for (size_t i = 0; i < ESMD_ARRAY_LEN(methods); i++)
        if (esmd_http_route_limited(http, methods[i], "/admin/mappings/*", adm_route_mappings,
                                    adm_body_limit, adm) != 0)
            return ESMD_EINVAL;
    if (esmd_http_route_limited(http, "POST", "/admin/filter/test", adm_route_filter_test,
                                adm_body_limit, adm) != 0)
        return ESMD_EINVAL;
    if (esmd_admin_dlq_routes(adm->dlq, http, adm_body_limit) != 0)
        return ESMD_EINVAL;
    return ESMD_OK;
}

void esmd_admin_free(struct esmd_admin *adm)
{
    if (adm == NULL)
        return;
    adm->closing = true;
    esmd_admin_dlq_closing(adm->dlq);
    esmd_pg_free(adm->pg); /* queries still queued are answered from here */
    adm->pg = NULL;
    esmd_admin_dlq_free(adm->dlq);
    adm->dlq = NULL;
    for (size_t i = 0; i < adm->nmaps; i++)
        esmd_admin_store_clear(&adm->maps[i]);
    free(adm->maps);
    free(adm->conninfo);
    free(adm->instance_id);
    free(adm);
}
