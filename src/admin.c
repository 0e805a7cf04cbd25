/* The admin API for event source mappings (include/esmd/admin.h, docs/admin.md).
 *
 * State: one struct adm_map per configured mapping, holding the mapping (when it runs here) and
 * the last known row of esmd.mapping_overrides for it (adm_ovr). The values in force are the
 * override's where it has one, the configuration file's otherwise; adm_apply() hands the mapping
 * whatever differs from what it has in force, so re-reading an unchanged row does nothing.
 *
 * A change (UpdateEventSourceMapping, pause, resume) is validated, applied to the local mapping
 * at once (the mapping validates it again), then written with one statement that upserts the
 * row, updates esmd.mapping_state and sends the NOTIFY (all in its transaction). The answer waits
 * for that statement; if it fails, the local mapping goes back to the last stored values and the
 * client gets 500. Every instance (this one too) re-reads the row when the NOTIFY arrives, and
 * all rows whenever LISTEN is (re)established. */
#include "esmd/admin.h"
#include "admin_dlq.h"
#include "esmd/admin_auth.h"
#include "esmd/destination.h"
#include "esmd/filter.h"
#include "esmd/http.h"
#include "esmd/json.h"
#include "esmd/log.h"
#include "esmd/mapping.h"
#include "esmd/pg.h"

#include <cJSON.h>
#include <ctype.h>
#include <stdarg.h>
#include <strings.h>
#include <inttypes.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define ADM_JSON "application/json"
#define ADM_ESM_PATH "/2015-03-31/event-source-mappings"
#define ADM_MAPPINGS_PATH "/admin/mappings"
#define ADM_FILTER_TEST_PATH "/admin/filter/test"
#define ADM_PAGE_MAX 100           /* ListEventSourceMappings: at most 100 a page, as Lambda */
#define ADM_TEST_MAX_PATTERNS 100  /* /admin/filter/test */
#define ADM_TEST_MAX_PATTERN 65536 /* bytes */
#define ADM_NOT_FOUND "The resource you requested does not exist."

/* The columns every read of esmd.mapping_overrides returns, in this order. */
#define ADM_OVR_COLS                                                                               \
    "name, enabled, batch_size, window_ms, filters::text, on_failure, "                            \
    "(extract(epoch FROM updated_at) * 1000)::bigint, updated_by"

/* ---- state ---- */

struct adm_ovr {
    bool present;      /* a row exists */
    int enabled;       /* -1 = not overridden, else 0 / 1 */
    int batch_size;    /* 0 = not overridden */
    int64_t window_ms; /* -1 = not overridden */
    bool has_filters;  /* filters overridden (nfilters 0 = no filtering) */
    char **filters;    /* owned */
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

/* One query in flight for a request (req may become NULL: aborted) or for a reload. */
enum adm_op_kind { ADM_OP_WRITE, ADM_OP_RESET, ADM_OP_READ };

struct adm_op {
    struct esmd_admin *adm;
    struct esmd_http_req *req; /* NULL for reloads, or once the client went away */
    enum adm_op_kind kind;
    size_t mi;   /* mapping index; SIZE_MAX: every mapping (reload of all rows) */
    bool lambda; /* answer with the ESM configuration (else the native object) */
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

/* ---- UUIDv5 (SHA-1) ---- */

struct adm_sha1 {
    uint32_t h[5];
    uint64_t len;
    uint8_t blk[64];
    size_t n;
};

static uint32_t rol32(uint32_t x, int k)
{
    return (x << k) | (x >> (32 - k));
}

static void sha1_block(struct adm_sha1 *s, const uint8_t *p)
{
    uint32_t w[80], a = s->h[0], b = s->h[1], c = s->h[2], d = s->h[3], e = s->h[4];

    for (int i = 0; i < 16; i++)
        w[i] = (uint32_t)p[4 * i] << 24 | (uint32_t)p[4 * i + 1] << 16 |
               (uint32_t)p[4 * i + 2] << 8 | (uint32_t)p[4 * i + 3];
    for (int i = 16; i < 80; i++)
        w[i] = rol32(w[i - 3] ^ w[i - 8] ^ w[i - 14] ^ w[i - 16], 1);
    for (int i = 0; i < 80; i++) {
        uint32_t f, k, t;

        if (i < 20) {
            f = (b & c) | (~b & d);
            k = 0x5A827999;
        } else if (i < 40) {
            f = b ^ c ^ d;
            k = 0x6ED9EBA1;
        } else if (i < 60) {
            f = (b & c) | (b & d) | (c & d);
            k = 0x8F1BBCDC;
        } else {
            f = b ^ c ^ d;
            k = 0xCA62C1D6;
        }
        t = rol32(a, 5) + f + e + k + w[i];
        e = d;
        d = c;
        c = rol32(b, 30);
        b = a;
        a = t;
    }
    s->h[0] += a;
    s->h[1] += b;
    s->h[2] += c;
    s->h[3] += d;
    s->h[4] += e;
}

static void sha1_init(struct adm_sha1 *s)
{
    static const uint32_t iv[5] = {0x67452301, 0xEFCDAB89, 0x98BADCFE, 0x10325476, 0xC3D2E1F0};

    memset(s, 0, sizeof(*s));
    memcpy(s->h, iv, sizeof(iv));
}

static void sha1_update(struct adm_sha1 *s, const void *data, size_t len)
{
    const uint8_t *p = data;

    s->len += len;
    while (len > 0) {
        size_t take = 64 - s->n < len ? 64 - s->n : len;

        memcpy(s->blk + s->n, p, take);
        s->n += take;
        p += take;
        len -= take;
        if (s->n == 64) {
            sha1_block(s, s->blk);
            s->n = 0;
        }
    }
}

static void sha1_final(struct adm_sha1 *s, uint8_t out[20])
{
    uint64_t bits = s->len * 8;
    uint8_t pad = 0x80, zero = 0, lenb[8];

    sha1_update(s, &pad, 1);
    while (s->n != 56)
        sha1_update(s, &zero, 1);
    for (int i = 0; i < 8; i++)
        lenb[i] = (uint8_t)(bits >> (56 - 8 * i));
    sha1_update(s, lenb, 8);
    for (int i = 0; i < 5; i++) {
        out[4 * i] = (uint8_t)(s->h[i] >> 24);
        out[4 * i + 1] = (uint8_t)(s->h[i] >> 16);
        out[4 * i + 2] = (uint8_t)(s->h[i] >> 8);
        out[4 * i + 3] = (uint8_t)s->h[i];
    }
}

void esmd_admin_mapping_uuid(const char *name, char out[37])
{
    /* esmd's namespace for mapping names: 5c3c8f5e-6d1a-4f0b-9a57-3e2d7b1c8e40 */
    static const uint8_t ns[16] = {0x5c, 0x3c, 0x8f, 0x5e, 0x6d, 0x1a, 0x4f, 0x0b,
                                   0x9a, 0x57, 0x3e, 0x2d, 0x7b, 0x1c, 0x8e, 0x40};
    struct adm_sha1 s;
    uint8_t h[20];
    size_t o = 0;

    sha1_init(&s);
    sha1_update(&s, ns, sizeof(ns));
    sha1_update(&s, name, strlen(name));
    sha1_final(&s, h);
    h[6] = (uint8_t)((h[6] & 0x0f) | 0x50);
    h[8] = (uint8_t)((h[8] & 0x3f) | 0x80);
    for (int i = 0; i < 16; i++) {
        if (i == 4 || i == 6 || i == 8 || i == 10)
            out[o++] = '-';
        snprintf(out + o, 3, "%02x", h[i]);
        o += 2;
    }
    out[o] = '\0';
}

/* ---- the values in force ---- */

static bool adm_eff_enabled(const struct adm_map *m)
{
    if (m->map)
        return esmd_mapping_enabled(m->map);
    return m->ovr.enabled >= 0 ? m->ovr.enabled == 1 : m->cfg->enabled;
}

static int adm_eff_batch(const struct adm_map *m)
{
    return m->ovr.batch_size > 0 ? m->ovr.batch_size : m->cfg->batch_size;
}

static int64_t adm_eff_window(const struct adm_map *m)
{
    return m->ovr.window_ms >= 0 ? m->ovr.window_ms : m->cfg->maximum_batching_window_ms;
}

static size_t adm_eff_nfilters(const struct adm_map *m)
{
    return m->ovr.has_filters ? m->ovr.nfilters : m->cfg->nfilters;
}

static const char *adm_eff_filter(const struct adm_map *m, size_t i)
{
    return m->ovr.has_filters ? m->ovr.filters[i] : m->cfg->filters[i].pattern;
}

/* NULL = none. */
static const char *adm_eff_on_failure(const struct adm_map *m)
{
    if (m->ovr.on_failure)
        return m->ovr.on_failure[0] ? m->ovr.on_failure : NULL;
    return m->cfg->on_failure;
}

/* What GetEventSourceMapping shows: the mapping's own getters when it runs here. */
static int adm_cur_batch(const struct adm_map *m)
{
    return m->map ? esmd_mapping_batch_size(m->map) : adm_eff_batch(m);
}

static int64_t adm_cur_window(const struct adm_map *m)
{
    return m->map ? esmd_mapping_window_ms(m->map) : adm_eff_window(m);
}

static size_t adm_cur_nfilters(const struct adm_map *m)
{
    return m->map ? esmd_mapping_nfilters(m->map) : adm_eff_nfilters(m);
}

static const char *adm_cur_filter(const struct adm_map *m, size_t i)
{
    return m->map ? esmd_mapping_filter(m->map, i) : adm_eff_filter(m, i);
}

static const char *adm_cur_on_failure(const struct adm_map *m)
{
    const char *s = m->map ? esmd_mapping_on_failure(m->map) : adm_eff_on_failure(m);

    return s && s[0] ? s : NULL;
}

static bool adm_streq(const char *a, const char *b)
{
    if (a == NULL || b == NULL)
        return a == b;
    return strcmp(a, b) == 0;
}

/* Hands the mapping the values in force that differ from what it has. */
static void adm_apply(struct esmd_admin *adm, struct adm_map *m)
{
    struct esmd_mapping_update u = {0};
    const char **filters = NULL;
    size_t nf = adm_eff_nfilters(m);
    bool any = false, enabled;
    char err[512];

    ESMD_UNUSED(adm);
    if (m->map == NULL)
        return;
    if (adm_eff_batch(m) != esmd_mapping_batch_size(m->map)) {
        u.has_batch_size = any = true;
        u.batch_size = adm_eff_batch(m);
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
        ESMD_WARN(&(struct esmd_log_ctx){m->cfg->name, m->cfg->function, NULL},
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
    if (o->batch_size < 0 || o->batch_size > 10000 || o->window_ms > 300000) {
        ovr_clear(o);
        return -1;
    }
    return 0;
}

static struct adm_map *adm_find_name(struct esmd_admin *adm, const char *name, size_t *idx)
{
    for (size_t i = 0; i < adm->nmaps; i++)
        if (strcmp(adm->maps[i].cfg->name, name) == 0) {
            if (idx)
                *idx = i;
            return &adm->maps[i];
        }
    return NULL;
}

static struct adm_map *adm_find_uuid(struct esmd_admin *adm, const char *uuid, size_t *idx)
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
        struct adm_map *m = adm_find_name(adm, PQgetvalue(res, r, 0), &i);

        if (m == NULL)
            continue; /* a mapping another configuration has */
        seen[i] = true;
        if (ovr_from_row(&m->ovr, res, r) != 0)
            ESMD_WARN(&(struct esmd_log_ctx){m->cfg->name, m->cfg->function, NULL},
                      "admin: unreadable row in esmd.mapping_overrides ignored");
    }
    for (size_t i = 0; i < adm->nmaps; i++) {
        if (!seen[i] && (all || i == only))
            ovr_clear(&adm->maps[i].ovr);
        if (seen[i] || all || i == only)
            adm_apply(adm, &adm->maps[i]);
    }
    free(seen);
}

/* ---- JSON output ---- */

static void put_str(struct esmd_buf *b, const char *s)
{
    esmd_buf_put_json_string(b, s, strlen(s));
}

static void put_key(struct esmd_buf *b, bool *first, const char *key)
{
    if (!*first)
        esmd_buf_putc(b, ',');
    *first = false;
    put_str(b, key);
    esmd_buf_putc(b, ':');
}

static void put_seconds(struct esmd_buf *b, int64_t ms)
{
    esmd_buf_printf(b, "%" PRId64 ".%03d", ms / 1000, (int)(ms % 1000));
}

static const char *adm_start_name(enum esmd_starting_position p)
{
    switch (p) {
    case ESMD_START_LATEST:
        return "LATEST";
    case ESMD_START_AT_TIMESTAMP:
        return "AT_TIMESTAMP";
    default:
        return "TRIM_HORIZON";
    }
}

static int64_t adm_last_modified(const struct esmd_admin *adm, const struct adm_map *m)
{
    return m->ovr.present ? m->ovr.updated_ms : adm->started_ms;
}

/* The event source as a string where Lambda has EventSourceArn (redis, pgqueue): an esmd URI. */
static void adm_source_uri(const struct esmd_mapping_cfg *c, struct esmd_buf *b)
{
    if (c->kind == ESMD_SOURCE_REDIS)
        esmd_buf_printf(b, "redis://%s/%s", c->redis.connection, c->redis.stream);
    else if (c->kind == ESMD_SOURCE_PGQUEUE)
        esmd_buf_printf(b, "pgqueue://%s", c->pgqueue.queue);
}

/* Lambda's ESM configuration (docs/lambda.md#esm-response) for m. */
static void adm_esm_json(const struct esmd_admin *adm, const struct adm_map *m, struct esmd_buf *b)
{
    const struct esmd_mapping_cfg *c = m->cfg;
    char arn[512];
    bool first = true, stream = c->kind != ESMD_SOURCE_PGQUEUE;
    size_t nf = adm_cur_nfilters(m);
    const char *dest = adm_cur_on_failure(m);

    esmd_buf_putc(b, '{');
    put_key(b, &first, "UUID");
    put_str(b, m->uuid);
    put_key(b, &first, "EventSourceMappingArn");
    snprintf(arn, sizeof(arn), "arn:aws:lambda:%s:%s:event-source-mapping:%s", esmd_aws_region(),
             esmd_aws_account(), m->uuid);
    put_str(b, arn);
    if (c->kind != ESMD_SOURCE_KAFKA) {
        struct esmd_buf src = ESMD_BUF_INIT;

        adm_source_uri(c, &src);
        put_key(b, &first, "EventSourceArn");
        put_str(b, esmd_buf_cstr(&src));
        esmd_buf_free(&src);
    }
    put_key(b, &first, "FunctionArn");
    esmd_function_arn(c->function, arn, sizeof(arn));
    put_str(b, arn);
    if (c->kind == ESMD_SOURCE_KAFKA || c->kind == ESMD_SOURCE_REDIS) {
        enum esmd_starting_position sp =
            c->kind == ESMD_SOURCE_KAFKA ? c->kafka.starting_position : c->redis.starting_position;
        put_key(b, &first, "StartingPosition");
        put_str(b, adm_start_name(sp));
        if (c->kind == ESMD_SOURCE_KAFKA && sp == ESMD_START_AT_TIMESTAMP) {
            put_key(b, &first, "StartingPositionTimestamp");
            put_seconds(b, c->kafka.starting_position_timestamp_ms);
        }
    }
    put_key(b, &first, "BatchSize");
    esmd_buf_printf(b, "%d", adm_cur_batch(m));
    put_key(b, &first, "MaximumBatchingWindowInSeconds");
    esmd_buf_printf(b, "%" PRId64, adm_cur_window(m) / 1000);
    if (nf > 0) {
        put_key(b, &first, "FilterCriteria");
        esmd_buf_puts(b, "{\"Filters\":[");
        for (size_t i = 0; i < nf; i++) {
            esmd_buf_puts(b, i ? ",{\"Pattern\":" : "{\"Pattern\":");
            put_str(b, adm_cur_filter(m, i));
            esmd_buf_putc(b, '}');
        }
        esmd_buf_puts(b, "]}");
    }
    put_key(b, &first, "LastModified");
    put_seconds(b, adm_last_modified(adm, m));
    put_key(b, &first, "LastProcessingResult");
    put_str(b, m->map ? esmd_mapping_last_result(m->map) : "No records processed");
    put_key(b, &first, "State");
    put_str(b, adm_eff_enabled(m) ? "Enabled" : "Disabled");
    put_key(b, &first, "StateTransitionReason");
    put_str(b, m->ovr.present ? "User action" : "Configuration file");
    if (stream) {
        put_key(b, &first, "DestinationConfig");
        if (dest) {
            esmd_buf_puts(b, "{\"OnFailure\":{\"Destination\":");
            put_str(b, dest);
            esmd_buf_puts(b, "}}");
        } else {
            esmd_buf_puts(b, "{}");
        }
        put_key(b, &first, "MaximumRecordAgeInSeconds");
        esmd_buf_printf(b, "%" PRId64,
                        c->maximum_record_age_ms < 0 ? (int64_t)-1
                                                     : c->maximum_record_age_ms / 1000);
        put_key(b, &first, "BisectBatchOnFunctionError");
        esmd_buf_puts(b, c->bisect_batch_on_function_error ? "true" : "false");
        put_key(b, &first, "MaximumRetryAttempts");
        esmd_buf_printf(b, "%d", c->maximum_retry_attempts);
    }
    put_key(b, &first, "FunctionResponseTypes");
    esmd_buf_puts(b, c->report_batch_item_failures ? "[\"ReportBatchItemFailures\"]" : "[]");
    if (c->kind == ESMD_SOURCE_KAFKA) {
        const char *s = c->kafka.conn ? c->kafka.conn->bootstrap_servers : "";
        bool f2 = true;

        put_key(b, &first, "Topics");
        esmd_buf_putc(b, '[');
        for (size_t i = 0; i < c->kafka.ntopics; i++) {
            if (i)
                esmd_buf_putc(b, ',');
            put_str(b, c->kafka.topics[i]);
        }
        esmd_buf_putc(b, ']');
        put_key(b, &first, "SelfManagedEventSource");
        esmd_buf_puts(b, "{\"Endpoints\":{\"KAFKA_BOOTSTRAP_SERVERS\":[");
        while (s && *s) {
            size_t n;

            while (*s == ',' || isspace((unsigned char)*s))
                s++;
            n = strcspn(s, ", \t");
            if (n > 0) {
                if (!f2)
                    esmd_buf_putc(b, ',');
                f2 = false;
                esmd_buf_put_json_string(b, s, n);
            }
            s += n;
        }
        esmd_buf_puts(b, "]}}");
        put_key(b, &first, "SelfManagedKafkaEventSourceConfig");
        esmd_buf_puts(b, "{\"ConsumerGroupId\":");
        put_str(b, c->kafka.consumer_group ? c->kafka.consumer_group : "");
        esmd_buf_putc(b, '}');
    }
    if (c->kind == ESMD_SOURCE_PGQUEUE) {
        put_key(b, &first, "ScalingConfig");
        esmd_buf_printf(b, "{\"MaximumConcurrency\":%d}", c->pgqueue.maximum_concurrency);
    }
    esmd_buf_putc(b, '}');
}

/* A pattern text as a JSON value (it is one once checked); a string if it is not. */
static void put_pattern(struct esmd_buf *b, const char *p)
{
    if (esmd_json_valid(p, strlen(p)))
        esmd_buf_puts(b, p);
    else
        put_str(b, p);
}

/* The native object: GET /admin/mappings[/{name}]. */
static void adm_native_json(const struct esmd_admin *adm, const struct adm_map *m,
                            struct esmd_buf *b)
{
    static const char *const kinds[] = {"kafka", "redis", "pgqueue"};
    const struct esmd_mapping_cfg *c = m->cfg;
    const struct adm_ovr *o = &m->ovr;
    const char *dest = adm_cur_on_failure(m);
    char iso[32];

    esmd_buf_puts(b, "{\"name\":");
    put_str(b, c->name);
    esmd_buf_puts(b, ",\"uuid\":");
    put_str(b, m->uuid);
    esmd_buf_puts(b, ",\"function\":");
    put_str(b, c->function);
    esmd_buf_printf(b, ",\"source\":\"%s\",\"running\":%s,\"enabled\":%s,\"state\":\"%s\"",
                    kinds[c->kind], m->map ? "true" : "false",
                    adm_eff_enabled(m) ? "true" : "false",
                    adm_eff_enabled(m) ? "Enabled" : "Disabled");
    esmd_buf_printf(b, ",\"batch_size\":%d,\"maximum_batching_window_ms\":%" PRId64,
                    adm_cur_batch(m), adm_cur_window(m));
    esmd_buf_puts(b, ",\"filters\":[");
    for (size_t i = 0; i < adm_cur_nfilters(m); i++) {
        if (i)
            esmd_buf_putc(b, ',');
        put_pattern(b, adm_cur_filter(m, i));
    }
    esmd_buf_puts(b, "],\"on_failure\":");
    if (dest)
        put_str(b, dest);
    else
        esmd_buf_puts(b, "null");
    esmd_buf_puts(b, ",\"overrides\":");
    if (!o->present) {
        esmd_buf_puts(b, "null");
    } else {
        bool first = true;

        esmd_buf_putc(b, '{');
        if (o->enabled >= 0) {
            put_key(b, &first, "enabled");
            esmd_buf_puts(b, o->enabled ? "true" : "false");
        }
        if (o->batch_size > 0) {
            put_key(b, &first, "batch_size");
            esmd_buf_printf(b, "%d", o->batch_size);
        }
        if (o->window_ms >= 0) {
            put_key(b, &first, "maximum_batching_window_ms");
            esmd_buf_printf(b, "%" PRId64, o->window_ms);
        }
        if (o->has_filters) {
            put_key(b, &first, "filters");
            esmd_buf_putc(b, '[');
            for (size_t i = 0; i < o->nfilters; i++) {
                if (i)
                    esmd_buf_putc(b, ',');
                put_pattern(b, o->filters[i]);
            }
            esmd_buf_putc(b, ']');
        }
        if (o->on_failure) {
            put_key(b, &first, "on_failure");
            if (o->on_failure[0])
                put_str(b, o->on_failure);
            else
                esmd_buf_puts(b, "null");
        }
        put_key(b, &first, "updated_at");
        esmd_iso8601_ms(o->updated_ms, iso);
        put_str(b, iso);
        put_key(b, &first, "updated_by");
        if (o->updated_by)
            put_str(b, o->updated_by);
        else
            esmd_buf_puts(b, "null");
        esmd_buf_putc(b, '}');
    }
    esmd_buf_puts(b, ",\"last_processing_result\":");
    put_str(b, m->map ? esmd_mapping_last_result(m->map) : "No records processed");
    esmd_buf_puts(b, ",\"status\":");
    if (m->map)
        esmd_mapping_describe(m->map, b);
    else
        esmd_buf_puts(b, "null");
    esmd_buf_putc(b, '}');
    ESMD_UNUSED(adm);
}

/* ---- answers ---- */

static void adm_respond_buf(struct esmd_http_req *req, int status, struct esmd_buf *b)
{
    esmd_http_respond(req, status, ADM_JSON, esmd_buf_cstr(b), b->len);
}

static void adm_respond_mapping(struct esmd_admin *adm, struct esmd_http_req *req,
                                const struct adm_map *m, bool lambda, int status)
{
    struct esmd_buf b = ESMD_BUF_INIT;

    if (lambda)
        adm_esm_json(adm, m, &b);
    else
        adm_native_json(adm, m, &b);
    adm_respond_buf(req, status, &b);
    esmd_buf_free(&b);
}

static void adm_bad(struct esmd_http_req *req, const char *fmt, ...) ESMD_PRINTF(2, 3);

#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wformat-nonliteral"
static void adm_bad(struct esmd_http_req *req, const char *fmt, ...)
{
    char msg[1024];
    va_list ap;

    va_start(ap, fmt);
    vsnprintf(msg, sizeof(msg), fmt, ap);
    va_end(ap);
    esmd_http_respond_error(req, 400, "InvalidParameterValueException", msg);
}
#pragma GCC diagnostic pop

static bool adm_auth(struct esmd_admin *adm, struct esmd_http_req *req)
{
    return esmd_admin_authorize(adm->auth, req);
}

/* Parses the body as a JSON object. NULL after answering 400 when it is not one. "" gives {}. */
static cJSON *adm_body_object(struct esmd_http_req *req)
{
    size_t len;
    const char *body = esmd_http_req_body(req, &len);
    cJSON *root;

    if (len == 0)
        return cJSON_CreateObject();
    if (!esmd_json_valid(body, len)) {
        esmd_http_respond_error(req, 400, "InvalidRequestContentException",
                                "Could not parse request body into json: not a valid JSON "
                                "document");
        return NULL;
    }
    root = cJSON_ParseWithLength(body, len);
    if (!cJSON_IsObject(root)) {
        cJSON_Delete(root);
        esmd_http_respond_error(req, 400, "InvalidRequestContentException",
                                "Could not parse request body into json: expected a JSON object");
        return NULL;
    }
    return root;
}

/* ---- writes ---- */

static void adm_op_abort(void *ud, struct esmd_http_req *req)
{
    struct adm_op *op = ud;

    ESMD_UNUSED(req);
    op->req = NULL;
}

static void adm_op_done(void *ud, const PGresult *res, const char *err)
{
    struct adm_op *op = ud;
    struct esmd_admin *adm = op->adm;
    bool ok = res != NULL && PQresultStatus(res) == PGRES_TUPLES_OK;

    if (op->req)
        esmd_http_req_on_abort(op->req, NULL, NULL);
    if (op->kind == ADM_OP_READ) {
        if (ok && !adm->closing)
            adm_take_rows(adm, res, op->mi == SIZE_MAX, op->mi);
        else if (!ok && !adm->closing)
            ESMD_WARN(NULL, "admin: could not read esmd.mapping_overrides: %s",
                      err ? err : PQresultErrorMessage(res));
        free(op);
        return;
    }
    struct adm_map *m = &adm->maps[op->mi];
    if (!ok) {
        const char *why = err ? err : PQresultErrorMessage(res);

        ESMD_WARN(&(struct esmd_log_ctx){m->cfg->name, m->cfg->function, NULL},
                  "admin: could not store the change: %s", why);
        if (!adm->closing)
            adm_apply(adm, m); /* back to what the database holds */
        if (op->req) {
            char msg[512];

            snprintf(msg, sizeof(msg), "could not store the change: %s", why);
            esmd_http_respond_error(op->req, adm->closing ? 503 : 500, "ServiceException", msg);
        }
        free(op);
        return;
    }
    if (op->kind == ADM_OP_WRITE) {
        if (PQntuples(res) == 1)
            (void)ovr_from_row(&m->ovr, res, 0);
    } else {
        ovr_clear(&m->ovr);
    }
    adm_apply(adm, m);
    if (op->req)
        adm_respond_mapping(adm, op->req, m, op->lambda, op->lambda ? 202 : 200);
    free(op);
}

/* What a write changes; NULL / has_* false = unchanged. */
struct adm_change {
    int enabled; /* -1 = unchanged */
    int batch_size;
    int64_t window_ms;
    bool has_filters;
    const char **filters;
    size_t nfilters;
    const char *on_failure; /* "" = none */
};

/* Applies ch to the local mapping (validated by it) and stores it; answers req when stored.
 * Returns false after answering 400 when the mapping refuses it. */
static bool adm_write(struct esmd_admin *adm, struct esmd_http_req *req, size_t mi,
                      const struct adm_change *ch, bool lambda)
{
    struct adm_map *m = &adm->maps[mi];
    const struct esmd_mapping_cfg *c = m->cfg;
    struct esmd_buf filters = ESMD_BUF_INIT;
    cJSON *yaml = cJSON_CreateObject();
    char bs[16], win[24], *yaml_text;
    const char *params[8];
    struct adm_op *op;
    int rc;

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
        };
        char err[512];

        if ((u.has_batch_size || u.has_window || u.has_filters || u.has_on_failure) &&
            esmd_mapping_update(m->map, &u, err, sizeof(err)) != 0) {
            adm_bad(req, "%s", err);
            cJSON_Delete(yaml);
            return false;
        }
        if (ch->enabled >= 0)
            esmd_mapping_set_enabled(m->map, ch->enabled == 1);
    }

    /* the file's values the overridden fields are overridden against */
    if (ch->enabled >= 0)
        cJSON_AddBoolToObject(yaml, "enabled", c->enabled);
    if (ch->batch_size > 0)
        cJSON_AddNumberToObject(yaml, "batch_size", c->batch_size);
    if (ch->window_ms >= 0)
        cJSON_AddNumberToObject(yaml, "window_ms", (double)c->maximum_batching_window_ms);
    if (ch->has_filters) {
        cJSON *arr = cJSON_AddArrayToObject(yaml, "filters");

        for (size_t i = 0; i < c->nfilters; i++)
            cJSON_AddItemToArray(arr, cJSON_CreateString(c->filters[i].pattern));
        esmd_buf_putc(&filters, '[');
        for (size_t i = 0; i < ch->nfilters; i++) {
            if (i)
                esmd_buf_putc(&filters, ',');
            put_str(&filters, ch->filters[i]);
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

    op = esmd_xcalloc(1, sizeof(*op));
    op->adm = adm;
    op->req = req;
    op->kind = ADM_OP_WRITE;
    op->mi = mi;
    op->lambda = lambda;
    rc = esmd_pg_query(
        adm->pg,
        "WITH o AS ("
        " INSERT INTO esmd.mapping_overrides AS t (name, enabled, batch_size, window_ms, filters,"
        "  on_failure, yaml, updated_at, updated_by)"
        " VALUES ($1, $2::boolean, $3::integer, $4::integer, $5::jsonb, $6, $7::jsonb, now(), $8)"
        " ON CONFLICT (name) DO UPDATE SET"
        "  enabled = COALESCE(EXCLUDED.enabled, t.enabled),"
        "  batch_size = COALESCE(EXCLUDED.batch_size, t.batch_size),"
        "  window_ms = COALESCE(EXCLUDED.window_ms, t.window_ms),"
        "  filters = COALESCE(EXCLUDED.filters, t.filters),"
        "  on_failure = COALESCE(EXCLUDED.on_failure, t.on_failure),"
        "  yaml = t.yaml || EXCLUDED.yaml, updated_at = now(), updated_by = EXCLUDED.updated_by"
        " RETURNING " ADM_OVR_COLS "),"
        " s AS (UPDATE esmd.mapping_state SET enabled = $2::boolean,"
        "  state = CASE WHEN $2::boolean THEN 'Enabled' ELSE 'Disabled' END,"
        "  state_transition_reason = 'User action', updated_at = now()"
        "  WHERE name = $1 AND $2::boolean IS NOT NULL),"
        " n AS (SELECT pg_notify('" ESMD_ADMIN_CHANNEL "', $1))"
        " SELECT o.* FROM o CROSS JOIN n",
        8, params, adm_op_done, op);
    free(yaml_text);
    esmd_buf_free(&filters);
    if (rc != 0) {
        free(op);
        adm_apply(adm, m);
        esmd_http_respond_error(req, 503, "ServiceException", "shutting down");
        return true;
    }
    esmd_http_req_on_abort(req, adm_op_abort, op);
    return true;
}

/* ---- UpdateEventSourceMapping: request ---- */

static bool json_int(const cJSON *v, int64_t lo, int64_t hi, int64_t *out)
{
    if (!cJSON_IsNumber(v) || v->valuedouble != floor(v->valuedouble) || v->valuedouble < lo ||
        v->valuedouble > hi)
        return false;
    *out = (int64_t)v->valuedouble;
    return true;
}

/* "name", "name:qualifier", "arn:aws:lambda:R:A:function:name[:q]", "A:function:name[:q]" →
 * the name (into out); "" for a function of another region or account (no function of esmd's).
 * false when malformed. */
static bool adm_function_name(const char *s, char *out, size_t outlen)
{
    const char *p = s, *f = strstr(s, ":function:");
    size_t n;

    if (strlen(s) == 0 || strlen(s) > 140)
        return false;
    if (f != NULL && !esmd_function_prefix_ours(s, (size_t)(f - s) + 1)) {
        if (outlen)
            out[0] = '\0';
        return true;
    }
    if (f != NULL)
        p = f + strlen(":function:");
    else if (strncmp(s, "arn:", 4) == 0)
        return false;
    n = strcspn(p, ":");
    if (n == 0 || n > 64 || n >= outlen)
        return false;
    for (size_t i = 0; i < n; i++)
        if (!isalnum((unsigned char)p[i]) && p[i] != '-' && p[i] != '_')
            return false;
    memcpy(out, p, n);
    out[n] = '\0';
    return true;
}

/* Reads FilterCriteria into ch (patterns borrowed from v). false after answering 400. */
static bool adm_read_filters(struct esmd_http_req *req, const struct esmd_mapping_cfg *c,
                             const cJSON *v, struct adm_change *ch)
{
    const cJSON *fl, *it;
    size_t i = 0;

    if (!cJSON_IsObject(v)) {
        adm_bad(req, "FilterCriteria must be an object {\"Filters\":[{\"Pattern\":\"...\"}]}");
        return false;
    }
    cJSON_ArrayForEach(it, v)
    {
        if (strcmp(it->string, "Filters") != 0) {
            adm_bad(req, "FilterCriteria: unknown field \"%s\" (expected Filters)", it->string);
            return false;
        }
    }
    ch->has_filters = true;
    fl = cJSON_GetObjectItemCaseSensitive(v, "Filters");
    if (fl == NULL || cJSON_IsNull(fl))
        return true; /* {} removes all filters */
    if (!cJSON_IsArray(fl)) {
        adm_bad(req, "FilterCriteria.Filters must be an array");
        return false;
    }
    if (cJSON_GetArraySize(fl) > c->max_filters) {
        adm_bad(req,
                "FilterCriteria.Filters: at most %d filters for this mapping (its max_filters), "
                "got %d",
                c->max_filters, cJSON_GetArraySize(fl));
        return false;
    }
    ch->filters = esmd_xcalloc((size_t)cJSON_GetArraySize(fl) + 1, sizeof(char *));
    cJSON_ArrayForEach(it, fl)
    {
        const cJSON *p = cJSON_GetObjectItemCaseSensitive(it, "Pattern");
        struct esmd_filter_error fe;
        size_t len;

        if (!cJSON_IsObject(it) || !cJSON_IsString(p) || cJSON_GetArraySize(it) != 1) {
            adm_bad(req, "FilterCriteria.Filters[%zu] must be {\"Pattern\": string}", i);
            return false;
        }
        len = strlen(p->valuestring);
        if (len > (size_t)c->max_filter_pattern_length) {
            adm_bad(req,
                    "FilterCriteria.Filters[%zu].Pattern is %zu characters long; at most %d for "
                    "this mapping (its max_filter_pattern_length)",
                    i, len, c->max_filter_pattern_length);
            return false;
        }
        if (esmd_filter_check(p->valuestring, len, &fe) != 0) {
            adm_bad(
                req,
                "Invalid filter pattern definition. FilterCriteria.Filters[%zu].Pattern:%d:%d: %s",
                i, fe.line, fe.column, fe.message);
            return false;
        }
        ch->filters[i++] = p->valuestring;
    }
    ch->nfilters = i;
    return true;
}

static bool adm_read_destination(struct esmd_admin *adm, struct esmd_http_req *req,
                                 const struct esmd_mapping_cfg *c, const cJSON *v,
                                 struct adm_change *ch)
{
    const cJSON *it, *of, *d;
    char err[512];

    if (!cJSON_IsObject(v)) {
        adm_bad(req, "DestinationConfig must be an object {\"OnFailure\":{\"Destination\":...}}");
        return false;
    }
    cJSON_ArrayForEach(it, v)
    {
        if (strcmp(it->string, "OnFailure") != 0) {
            adm_bad(req, "Unsupported DestinationConfig parameter for given event source mapping "
                         "type.");
            return false;
        }
    }
    of = cJSON_GetObjectItemCaseSensitive(v, "OnFailure");
    if (of == NULL)
        return true;
    if (c->kind == ESMD_SOURCE_PGQUEUE) {
        adm_bad(req, "Unsupported DestinationConfig parameter for given event source mapping "
                     "type. (a pgqueue mapping dead-letters to its dead_letter_queue)");
        return false;
    }
    if (!cJSON_IsObject(of)) {
        adm_bad(req, "DestinationConfig.OnFailure must be an object {\"Destination\": string}");
        return false;
    }
    cJSON_ArrayForEach(it, of)
    {
        if (strcmp(it->string, "Destination") != 0) {
            adm_bad(req, "DestinationConfig.OnFailure: unknown field \"%s\"", it->string);
            return false;
        }
    }
    d = cJSON_GetObjectItemCaseSensitive(of, "Destination");
    if (d == NULL || cJSON_IsNull(d)) {
        ch->on_failure = "";
        return true;
    }
    if (!cJSON_IsString(d) || strlen(d->valuestring) > 2048) {
        adm_bad(req, "DestinationConfig.OnFailure.Destination must be a destination URI (at "
                     "most 2048 characters) or \"\"");
        return false;
    }
    if (d->valuestring[0] != '\0') {
        if (adm->dests == NULL) {
            adm_bad(req, "DestinationConfig.OnFailure.Destination: destinations are not available");
            return false;
        }
        if (esmd_dests_check(adm->dests, d->valuestring, err, sizeof(err)) != 0) {
            adm_bad(req, "DestinationConfig.OnFailure.Destination: %s", err);
            return false;
        }
        if (strncmp(d->valuestring, "function://", 11) == 0) {
            adm_bad(req, "DestinationConfig.OnFailure.Destination: a function:// destination "
                         "needs the async invocation queue");
            return false;
        }
    }
    ch->on_failure = d->valuestring;
    return true;
}

static void adm_esm_update(struct esmd_admin *adm, struct esmd_http_req *req, const char *uuid)
{
    static const char *const fixed[] = {
        "MaximumRetryAttempts",  "MaximumRecordAgeInSeconds",  "BisectBatchOnFunctionError",
        "FunctionResponseTypes", "ParallelizationFactor",      "TumblingWindowInSeconds",
        "ScalingConfig",         "SourceAccessConfigurations", "KMSKeyArn",
        "MetricsConfig",         "ProvisionedPollerConfig",    "DocumentDBEventSourceConfig",
        "LoggingConfig",
    };
    struct adm_change ch = {.enabled = -1, .window_ms = -1};
    size_t mi;
    struct adm_map *m = adm_find_uuid(adm, uuid, &mi);
    cJSON *root = NULL;
    const cJSON *v;
    int64_t n;

    if (m == NULL) {
        esmd_http_respond_error(req, 404, "ResourceNotFoundException", ADM_NOT_FOUND);
        return;
    }
    if ((root = adm_body_object(req)) == NULL)
        return;
    cJSON_ArrayForEach(v, root)
    {
        const char *k = v->string;

        if (strcmp(k, "Enabled") == 0) {
            if (!cJSON_IsBool(v)) {
                adm_bad(req, "Enabled must be true or false");
                goto out;
            }
            ch.enabled = cJSON_IsTrue(v);
        } else if (strcmp(k, "BatchSize") == 0) {
            if (!json_int(v, 1, 10000, &n)) {
                adm_bad(req, "BatchSize must be an integer from 1 to 10000");
                goto out;
            }
            ch.batch_size = (int)n;
        } else if (strcmp(k, "MaximumBatchingWindowInSeconds") == 0) {
            if (!json_int(v, 0, 300, &n)) {
                adm_bad(req, "MaximumBatchingWindowInSeconds must be an integer from 0 to 300");
                goto out;
            }
            ch.window_ms = n * 1000;
        } else if (strcmp(k, "FilterCriteria") == 0) {
            if (!adm_read_filters(req, m->cfg, v, &ch))
                goto out;
        } else if (strcmp(k, "DestinationConfig") == 0) {
            if (!adm_read_destination(adm, req, m->cfg, v, &ch))
                goto out;
        } else if (strcmp(k, "FunctionName") == 0) {
            char name[80];

            if (!cJSON_IsString(v) || !adm_function_name(v->valuestring, name, sizeof(name))) {
                adm_bad(req, "FunctionName must be a function name or ARN");
                goto out;
            }
            if (strcmp(name, m->cfg->function) != 0) {
                adm_bad(req,
                        "FunctionName: esmd does not move a mapping to another function at run "
                        "time; change `function` of mapping %s in the configuration file",
                        m->cfg->name);
                goto out;
            }
        } else {
            bool known = false;

            for (size_t i = 0; i < ESMD_ARRAY_LEN(fixed); i++)
                known = known || strcmp(k, fixed[i]) == 0;
            if (known)
                adm_bad(req,
                        "%s cannot be changed at run time in esmd; set it for mapping %s in the "
                        "configuration file",
                        k, m->cfg->name);
            else
                adm_bad(req, "unknown field \"%.100s\"", k);
            goto out;
        }
    }
    if (ch.enabled < 0 && ch.batch_size == 0 && ch.window_ms < 0 && !ch.has_filters &&
        ch.on_failure == NULL) {
        adm_respond_mapping(adm, req, m, true, 202);
        goto out;
    }
    (void)adm_write(adm, req, mi, &ch, true);
out:
    free(ch.filters);
    cJSON_Delete(root);
}

/* ---- ListEventSourceMappings / GetEventSourceMapping ---- */

static bool adm_parse_uint(const char *s, int64_t max, int64_t *out)
{
    int64_t v = 0;

    if (s == NULL || *s == '\0' || strlen(s) > 10)
        return false;
    for (; *s; s++) {
        if (*s < '0' || *s > '9')
            return false;
        v = v * 10 + (*s - '0');
    }
    if (v > max)
        return false;
    *out = v;
    return true;
}

static void adm_esm_list(struct esmd_admin *adm, struct esmd_http_req *req)
{
    const char *fn = esmd_http_req_query(req, "FunctionName");
    const char *src = esmd_http_req_query(req, "EventSourceArn");
    const char *marker = esmd_http_req_query(req, "Marker");
    const char *maxs = esmd_http_req_query(req, "MaxItems");
    char name[80];
    int64_t start = 0, max = ADM_PAGE_MAX, count = 0;
    struct esmd_buf b = ESMD_BUF_INIT;
    size_t i;

    if (fn && !adm_function_name(fn, name, sizeof(name))) {
        adm_bad(req, "FunctionName must be a function name or ARN (1 to 140 characters)");
        return;
    }
    if (marker && !adm_parse_uint(marker, (int64_t)adm->nmaps, &start)) {
        adm_bad(req, "Marker is not one this API returned");
        return;
    }
    if (maxs && (!adm_parse_uint(maxs, 10000, &max) || max < 1)) {
        adm_bad(req, "MaxItems must be an integer from 1 to 10000");
        return;
    }
    if (src && (strlen(src) == 0 || strlen(src) > 1024)) {
        adm_bad(req, "EventSourceArn must be 1 to 1024 characters");
        return;
    }
    if (max > ADM_PAGE_MAX)
        max = ADM_PAGE_MAX;
    esmd_buf_puts(&b, "{\"EventSourceMappings\":[");
    for (i = (size_t)start; i < adm->nmaps; i++) {
        const struct adm_map *m = &adm->maps[i];

        if (fn && strcmp(m->cfg->function, name) != 0)
            continue;
        if (src) {
            struct esmd_buf u = ESMD_BUF_INIT;
            bool same;

            adm_source_uri(m->cfg, &u);
            same = strcmp(esmd_buf_cstr(&u), src) == 0;
            esmd_buf_free(&u);
            if (!same)
                continue;
        }
        if (count == max)
            break;
        if (count++ > 0)
            esmd_buf_putc(&b, ',');
        adm_esm_json(adm, m, &b);
    }
    esmd_buf_putc(&b, ']');
    if (i < adm->nmaps)
        esmd_buf_printf(&b, ",\"NextMarker\":\"%zu\"", i);
    esmd_buf_putc(&b, '}');
    adm_respond_buf(req, 200, &b);
    esmd_buf_free(&b);
}

/* The UUID in ".../event-source-mappings/{UUID}[/]" into out; false when malformed. */
static bool adm_path_uuid(const char *rest, char out[37])
{
    size_t n = strlen(rest);

    if (n > 0 && rest[n - 1] == '/')
        n--;
    if (n != 36)
        return false;
    for (size_t i = 0; i < n; i++) {
        bool dash = i == 8 || i == 13 || i == 18 || i == 23;

        if (dash ? rest[i] != '-' : !isxdigit((unsigned char)rest[i]))
            return false;
    }
    memcpy(out, rest, 36);
    out[36] = '\0';
    return true;
}

static void adm_route_esm(void *ud, struct esmd_http_req *req)
{
    struct esmd_admin *adm = ud;
    const char *path = esmd_http_req_path(req), *rest;
    const char *method = esmd_http_req_method(req);
    char uuid[37];
    struct adm_map *m;

    if (!adm_auth(adm, req))
        return;
    rest = path + strlen(ADM_ESM_PATH);
    if (*rest == '/')
        rest++;
    if (*rest == '\0') {
        if (strcmp(method, "PUT") == 0)
            esmd_http_respond_error(req, 404, "ResourceNotFoundException", ADM_NOT_FOUND);
        else
            adm_esm_list(adm, req);
        return;
    }
    if (!adm_path_uuid(rest, uuid)) {
        esmd_http_respond_error(req, 404, "ResourceNotFoundException", ADM_NOT_FOUND);
        return;
    }
    if (strcmp(method, "PUT") == 0) {
        adm_esm_update(adm, req, uuid);
        return;
    }
    m = adm_find_uuid(adm, uuid, NULL);
    if (m == NULL)
        esmd_http_respond_error(req, 404, "ResourceNotFoundException", ADM_NOT_FOUND);
    else
        adm_respond_mapping(adm, req, m, true, 200);
}

/* ---- /admin/mappings ---- */

static void adm_route_mappings(void *ud, struct esmd_http_req *req)
{
    struct esmd_admin *adm = ud;
    const char *path = esmd_http_req_path(req), *method = esmd_http_req_method(req);
    const char *rest = path + strlen(ADM_MAPPINGS_PATH), *slash;
    char name[80], action[32];
    size_t nl, mi;
    struct adm_map *m;

    if (!adm_auth(adm, req))
        return;
    if (*rest == '/')
        rest++;
    if (*rest == '\0') {
        struct esmd_buf b = ESMD_BUF_INIT;

        if (strcmp(method, "GET") != 0 && strcmp(method, "HEAD") != 0) {
            esmd_http_respond_error(req, 404, "ResourceNotFoundException", "no such admin route");
            return;
        }
        esmd_buf_puts(&b, "{\"mappings\":[");
        for (size_t i = 0; i < adm->nmaps; i++) {
            if (i)
                esmd_buf_putc(&b, ',');
            adm_native_json(adm, &adm->maps[i], &b);
        }
        esmd_buf_puts(&b, "]}");
        adm_respond_buf(req, 200, &b);
        esmd_buf_free(&b);
        return;
    }
    slash = strchr(rest, '/');
    nl = slash ? (size_t)(slash - rest) : strlen(rest);
    action[0] = '\0';
    if (slash) {
        if (strlen(slash + 1) >= sizeof(action) || strchr(slash + 1, '/')) {
            esmd_http_respond_error(req, 404, "ResourceNotFoundException", "no such admin route");
            return;
        }
        snprintf(action, sizeof(action), "%s", slash + 1);
    }
    if (nl == 0 || nl >= sizeof(name)) {
        esmd_http_respond_error(req, 404, "ResourceNotFoundException", "no such mapping");
        return;
    }
    memcpy(name, rest, nl);
    name[nl] = '\0';
    m = adm_find_name(adm, name, &mi);
    if (m == NULL) {
        char msg[160];

        snprintf(msg, sizeof(msg), "mapping %s not found", name);
        esmd_http_respond_error(req, 404, "ResourceNotFoundException", msg);
        return;
    }
    if (strcmp(method, "GET") == 0 || strcmp(method, "HEAD") == 0) {
        if (action[0] != '\0')
            esmd_http_respond_error(req, 404, "ResourceNotFoundException", "no such admin route");
        else
            adm_respond_mapping(adm, req, m, false, 200);
        return;
    }
    if (strcmp(method, "POST") == 0 &&
        (strcmp(action, "pause") == 0 || strcmp(action, "resume") == 0)) {
        struct adm_change ch = {.enabled = strcmp(action, "resume") == 0, .window_ms = -1};

        (void)adm_write(adm, req, mi, &ch, false);
        return;
    }
    if (strcmp(method, "DELETE") == 0 && strcmp(action, "overrides") == 0) {
        struct adm_op *op = esmd_xcalloc(1, sizeof(*op));
        const char *params[2] = {m->cfg->name, m->cfg->enabled ? "t" : "f"};

        op->adm = adm;
        op->req = req;
        op->kind = ADM_OP_RESET;
        op->mi = mi;
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
            free(op);
            esmd_http_respond_error(req, 503, "ServiceException", "shutting down");
            return;
        }
        esmd_http_req_on_abort(req, adm_op_abort, op);
        return;
    }
    esmd_http_respond_error(req, 404, "ResourceNotFoundException", "no such admin route");
}

/* ---- /admin/filter/test ----
 * The pattern and the event are matched as sent (numbers keep their text), so the body is
 * scanned for the raw text of "pattern", "patterns" and "event" rather than re-printed from a
 * cJSON tree. The body is valid JSON (esmd_json_valid) before any of this runs. */

static const char *js_ws(const char *p, const char *e)
{
    while (p < e && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r'))
        p++;
    return p;
}

/* End of the value at p (valid JSON assumed). */
static const char *js_skip(const char *p, const char *e)
{
    int depth = 0;

    do {
        p = js_ws(p, e);
        if (p >= e)
            return e;
        if (*p == '"') {
            for (p++; p < e && *p != '"'; p++)
                if (*p == '\\')
                    p++;
            p++;
        } else if (*p == '{' || *p == '[') {
            depth++;
            p++;
        } else if (*p == '}' || *p == ']') {
            depth--;
            p++;
        } else if (*p == ',' || *p == ':') {
            p++;
        } else {
            while (p < e && !strchr(",:]} \t\r\n", *p))
                p++;
        }
    } while (depth > 0);
    return p;
}

struct js_span {
    const char *p;
    size_t n;
};

/* Iterates the members (or elements, with key NULL) of the object / array at *pp. Returns
 * false at the end. */
static bool js_next(const char **pp, const char *e, struct js_span *key, struct js_span *val)
{
    const char *p = js_ws(*pp, e);

    if (p < e && (*p == '{' || *p == '[' || *p == ','))
        p = js_ws(p + 1, e);
    if (p >= e || *p == '}' || *p == ']')
        return false;
    if (key) {
        const char *k = p;

        p = js_skip(p, e);
        key->p = k;
        key->n = (size_t)(p - k);
        p = js_ws(p, e);
        p = js_ws(p + 1, e); /* ':' */
    }
    val->p = p;
    p = js_skip(p, e);
    val->n = (size_t)(p - val->p);
    *pp = p;
    return true;
}

static bool js_key_is(const struct js_span *k, const char *name)
{
    size_t n = strlen(name);

    return k->n == n + 2 && memcmp(k->p + 1, name, n) == 0;
}

/* A pattern or event given as a JSON object (its text) or as a string holding one (decoded;
 * *owned set to the copy the caller frees). */
static const char *adm_json_or_string(struct js_span v, size_t *len, char **owned)
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

static void adm_route_filter_test(void *ud, struct esmd_http_req *req)
{
    struct esmd_admin *adm = ud;
    size_t len, np = 0;
    const char *body = esmd_http_req_body(req, &len), *e = body + len, *p = body;
    struct js_span key, val, pats[ADM_TEST_MAX_PATTERNS], event = {NULL, 0}, mapping = {NULL, 0};
    bool have_pattern = false, have_patterns = false;
    struct esmd_filter *f = NULL;
    char *owned = NULL;
    struct esmd_buf b = ESMD_BUF_INIT;

    if (!adm_auth(adm, req))
        return;
    if (!esmd_json_valid(body, len) || *js_ws(body, e) != '{') {
        esmd_http_respond_error(req, 400, "InvalidRequestContentException",
                                "Could not parse request body into json: expected a JSON object "
                                "{\"pattern\": ..., \"event\": ...}");
        return;
    }
    while (js_next(&p, e, &key, &val)) {
        if (js_key_is(&key, "pattern")) {
            have_pattern = true;
            pats[0] = val;
            np = 1;
        } else if (js_key_is(&key, "patterns")) {
            const char *q = val.p;
            struct js_span item;

            if (val.p[0] != '[') {
                adm_bad(req, "patterns must be an array of patterns");
                return;
            }
            have_patterns = true;
            np = 0;
            while (js_next(&q, val.p + val.n, NULL, &item)) {
                if (np == ADM_TEST_MAX_PATTERNS) {
                    adm_bad(req, "patterns: at most %d", ADM_TEST_MAX_PATTERNS);
                    return;
                }
                pats[np++] = item;
            }
        } else if (js_key_is(&key, "event")) {
            event = val;
        } else if (js_key_is(&key, "mapping")) {
            mapping = val;
        } else {
            adm_bad(req, "unknown field %.*s (expected pattern, patterns, mapping, event)",
                    (int)(key.n < 100 ? key.n : 100), key.p);
            return;
        }
    }
    if ((int)have_pattern + (int)have_patterns + (mapping.p != NULL) != 1) {
        adm_bad(req, "give exactly one of \"pattern\", \"patterns\" or \"mapping\"");
        return;
    }
    if (event.p == NULL) {
        adm_bad(req, "\"event\" is required: a JSON object, or a string holding one");
        return;
    }
    f = esmd_filter_new();
    if (mapping.p != NULL) {
        cJSON *s = cJSON_ParseWithLength(mapping.p, mapping.n);
        struct adm_map *m = cJSON_IsString(s) ? adm_find_name(adm, s->valuestring, NULL) : NULL;

        cJSON_Delete(s);
        if (m == NULL) {
            esmd_http_respond_error(req, 404, "ResourceNotFoundException",
                                    "mapping: no such mapping");
            goto out;
        }
        for (size_t i = 0; i < adm_cur_nfilters(m); i++) {
            const char *pt = adm_cur_filter(m, i);
            struct esmd_filter_error fe;

            if (esmd_filter_add(f, pt, strlen(pt), (uint32_t)i, &fe) != 0) {
                adm_bad(req, "the mapping's filter %zu does not compile: %s", i, fe.message);
                goto out;
            }
        }
        np = adm_cur_nfilters(m);
    } else {
        for (size_t i = 0; i < np; i++) {
            struct esmd_filter_error fe;
            size_t plen;
            const char *pt = adm_json_or_string(pats[i], &plen, &owned);
            char where[32];

            if (have_pattern)
                snprintf(where, sizeof(where), "pattern");
            else
                snprintf(where, sizeof(where), "patterns[%zu]", i);
            if (pt == NULL || (pats[i].p[0] != '{' && pats[i].p[0] != '"')) {
                adm_bad(req, "%s must be a JSON object or a string holding one", where);
                goto out;
            }
            if (plen > ADM_TEST_MAX_PATTERN) {
                adm_bad(req, "%s: at most %d bytes", where, ADM_TEST_MAX_PATTERN);
                goto out;
            }
            if (esmd_filter_add(f, pt, plen, (uint32_t)i, &fe) != 0) {
                struct esmd_buf msg = ESMD_BUF_INIT;

                esmd_buf_printf(&msg, "Invalid filter pattern definition. %s:%d:%d: %s", where,
                                fe.line, fe.column, fe.message);
                esmd_buf_puts(&b, "{\"Type\":\"User\",\"Message\":");
                put_str(&b, esmd_buf_cstr(&msg));
                esmd_buf_printf(&b, ",\"pattern\":%zu,\"line\":%d,\"column\":%d,\"offset\":%zu", i,
                                fe.line, fe.column, fe.offset);
                if (owned == NULL)
                    esmd_buf_printf(&b, ",\"body_offset\":%zu",
                                    (size_t)(pats[i].p - body) + fe.offset);
                esmd_buf_putc(&b, '}');
                esmd_buf_free(&msg);
                esmd_http_req_add_header(req, "x-amzn-ErrorType", "InvalidParameterValueException");
                adm_respond_buf(req, 400, &b);
                goto out;
            }
            free(owned);
            owned = NULL;
        }
    }
    {
        size_t elen;
        const char *ev = adm_json_or_string(event, &elen, &owned);
        uint32_t ids[ADM_TEST_MAX_PATTERNS];
        int hits;

        if (ev == NULL || (event.p[0] != '{' && event.p[0] != '"')) {
            adm_bad(req, "event must be a JSON object or a string holding one");
            goto out;
        }
        hits = esmd_filter_match_all(f, ev, elen, ids, ESMD_ARRAY_LEN(ids));
        if (hits < 0) {
            adm_bad(req, "event must be a JSON object (or a string holding one)");
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
        adm_respond_buf(req, 200, &b);
    }
out:
    free(owned);
    esmd_buf_free(&b);
    esmd_filter_free(f);
}

/* ---- LISTEN ---- */

static void adm_read(struct esmd_admin *adm, const char *name)
{
    struct adm_op *op;
    size_t mi = SIZE_MAX;

    if (name != NULL && adm_find_name(adm, name, &mi) == NULL)
        return; /* not a mapping of this configuration */
    op = esmd_xcalloc(1, sizeof(*op));
    op->adm = adm;
    op->kind = ADM_OP_READ;
    op->mi = mi;
    if (esmd_pg_query(adm->pg,
                      name ? "SELECT " ADM_OVR_COLS " FROM esmd.mapping_overrides WHERE name = $1"
                           : "SELECT " ADM_OVR_COLS " FROM esmd.mapping_overrides",
                      name ? 1 : 0, name ? &name : NULL, adm_op_done, op) != 0)
        free(op);
}

static void adm_notified(void *ud, const char *channel, const char *payload)
{
    struct esmd_admin *adm = ud;

    ESMD_UNUSED(channel);
    if (adm->closing)
        return;
    adm_read(adm, payload); /* NULL: (re)connected, re-read everything */
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
        ovr_clear(&m->ovr);
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
    if (strcmp(field, "filters") == 0) {
        cJSON *arr = cJSON_CreateArray();

        for (size_t i = 0; i < c->nfilters; i++)
            cJSON_AddItemToArray(arr, cJSON_CreateString(c->filters[i].pattern));
        return arr;
    }
    return c->on_failure ? cJSON_CreateString(c->on_failure) : cJSON_CreateNull();
}

static bool pg_ok(PGconn *pg, PGresult *res, ExecStatusType want, char *err, size_t errlen)
{
    bool ok = PQresultStatus(res) == want;

    if (!ok)
        snprintf(err, errlen, "%s", res ? PQresultErrorMessage(res) : PQerrorMessage(pg));
    PQclear(res);
    return ok;
}

int esmd_admin_load(struct esmd_admin *adm, char *err, size_t errlen)
{
    static const char *const fields[] = {"enabled", "batch_size", "window_ms", "filters",
                                         "on_failure"};
    static const int cols[] = {1, 2, 3, 4, 5};
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
        goto out;
    }
    for (int r = 0; r < PQntuples(res); r++) {
        struct adm_map *m = adm_find_name(adm, PQgetvalue(res, r, 0), NULL);
        cJSON *yaml;
        struct esmd_buf drop = ESMD_BUF_INIT;

        if (m == NULL)
            continue;
        yaml = cJSON_Parse(PQgetvalue(res, r, 8));
        /* an overridden field whose file value changed since: the file wins */
        for (size_t k = 0; k < ESMD_ARRAY_LEN(fields); k++) {
            cJSON *now, *then;

            if (PQgetisnull(res, r, cols[k]))
                continue;
            then = cJSON_GetObjectItemCaseSensitive(yaml, fields[k]);
            now = adm_yaml_value(m->cfg, fields[k]);
            if (then == NULL || !cJSON_Compare(now, then, true)) {
                esmd_buf_printf(&drop, "%s%s", drop.len ? "," : "", fields[k]);
                ESMD_INFO(&(struct esmd_log_ctx){m->cfg->name, m->cfg->function, NULL},
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
            PGresult *u = PQexecParams(
                pg,
                "WITH f AS (SELECT string_to_array($2, ',') AS a),"
                " u AS (UPDATE esmd.mapping_overrides SET"
                "  enabled = CASE WHEN 'enabled' = ANY(f.a) THEN NULL ELSE enabled END,"
                "  batch_size = CASE WHEN 'batch_size' = ANY(f.a) THEN NULL ELSE batch_size END,"
                "  window_ms = CASE WHEN 'window_ms' = ANY(f.a) THEN NULL ELSE window_ms END,"
                "  filters = CASE WHEN 'filters' = ANY(f.a) THEN NULL ELSE filters END,"
                "  on_failure = CASE WHEN 'on_failure' = ANY(f.a) THEN NULL ELSE on_failure END,"
                "  yaml = yaml - f.a, updated_at = now()"
                "  FROM f WHERE name = $1 RETURNING name)"
                " SELECT pg_notify('" ESMD_ADMIN_CHANNEL "', $1) FROM u",
                2, NULL, params, NULL, NULL, 0);
            bool ok = pg_ok(pg, u, PGRES_TUPLES_OK, err, errlen);

            esmd_buf_free(&drop);
            if (!ok)
                goto out;
            u = PQexecParams(pg,
                             "DELETE FROM esmd.mapping_overrides WHERE name = $1 AND enabled IS "
                             "NULL AND batch_size IS NULL AND window_ms IS NULL AND filters IS "
                             "NULL AND on_failure IS NULL",
                             1, NULL, params, NULL, NULL, 0);
            if (!pg_ok(pg, u, PGRES_COMMAND_OK, err, errlen))
                goto out;
        }
    }
    PQclear(res);
    res = PQexec(pg, "SELECT " ADM_OVR_COLS " FROM esmd.mapping_overrides");
    if (PQresultStatus(res) != PGRES_TUPLES_OK) {
        snprintf(err, errlen, "reading esmd.mapping_overrides: %s", PQresultErrorMessage(res));
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
                   PGRES_COMMAND_OK, err, errlen))
            goto out;
    }
    for (size_t i = 0; i < adm->nmaps; i++)
        if (adm->maps[i].ovr.present)
            ESMD_INFO(
                &(struct esmd_log_ctx){adm->maps[i].cfg->name, adm->maps[i].cfg->function, NULL},
                "admin: overrides from esmd.mapping_overrides applied");
    rc = ESMD_OK;
out:
    PQclear(res);
    PQfinish(pg);
    return rc;
}

static size_t adm_body_limit(void *ud, struct esmd_http_req *req)
{
    ESMD_UNUSED(ud);
    ESMD_UNUSED(req);
    return ESMD_ADMIN_MAX_BODY;
}

int esmd_admin_start(struct esmd_admin *adm, struct esmd_http *http)
{
    if (adm == NULL || http == NULL)
        return ESMD_EINVAL;
    if (esmd_pg_listen(adm->pg, ESMD_ADMIN_CHANNEL, adm_notified, adm) != 0)
        return ESMD_EINVAL;
    if (esmd_http_route_limited(http, "GET", ADM_ESM_PATH, adm_route_esm, adm_body_limit, adm) !=
            0 ||
        esmd_http_route_limited(http, "GET", ADM_ESM_PATH "/*", adm_route_esm, adm_body_limit,
                                adm) != 0 ||
        esmd_http_route_limited(http, "PUT", ADM_ESM_PATH "/*", adm_route_esm, adm_body_limit,
                                adm) != 0 ||
        esmd_http_route_limited(http, "GET", ADM_MAPPINGS_PATH, adm_route_mappings, adm_body_limit,
                                adm) != 0)
        return ESMD_EINVAL;
    static const char *const methods[] = {"GET", "POST", "DELETE"};
    for (size_t i = 0; i < ESMD_ARRAY_LEN(methods); i++)
        if (esmd_http_route_limited(http, methods[i], ADM_MAPPINGS_PATH "/*", adm_route_mappings,
                                    adm_body_limit, adm) != 0)
            return ESMD_EINVAL;
    if (esmd_http_route_limited(http, "POST", ADM_FILTER_TEST_PATH, adm_route_filter_test,
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
        ovr_clear(&adm->maps[i].ovr);
    free(adm->maps);
    free(adm->conninfo);
    free(adm->instance_id);
    free(adm);
}
