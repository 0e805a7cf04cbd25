/* One event source mapping: poll → batch → invoke → settle. See include/esmd/mapping.h. */
#include "esmd/mapping.h"
#include "esmd/backoff.h"
#include "esmd/batch.h"
#include "esmd/connector.h"
#include "esmd/filter.h"
#include "esmd/invoke.h"
#include "esmd/log.h"
#include "esmd/metrics.h"

#include <cJSON.h>
#include <ev.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* A shard stops being fetched when max(2 x batch_size, PENDING_MIN_RECORDS) of its records, or
 * PENDING_MAX_BYTES, wait for a batch; and, while the whole mapping holds
 * max(4 x batch_size, MAP_PENDING_MIN_RECORDS) waiting records, as soon as it has a full batch
 * waiting. It resumes under half its own limits when the mapping is under half its limit or the
 * shard has less than a batch waiting: stuck shards holding the mapping's budget slow the others
 * down to a batch at a time, never to a stop. */
#define PENDING_MIN_RECORDS 10000
#define PENDING_MAX_BYTES (8u * 1024 * 1024)
#define MAP_PENDING_MIN_RECORDS 50000
/* Retries of a failed batch: exponential from 250 ms up to 30 s, with jitter. */
static const struct esmd_backoff retry_backoff = {250, 30000};
/* Throttled invocations back off from 100 ms up to 10 s; a Retry-After is honoured up to 5 min. */
static const struct esmd_backoff throttle_backoff = {100, 10000};
#define RETRY_AFTER_CAP_MS 300000

struct inflight {
    struct esmd_mapping *map;
    struct esmd_batch batch;
    struct esmd_buf body;
    char *idem_key;
    int attempts;  /* failed attempts that count (errors, timeouts, function errors) */
    int throttles; /* throttled attempts (do not count) */
    struct esmd_invoke_req *req;
    ev_timer retry;
    struct inflight *prev, *next;
};

struct esmd_mapping {
    const struct esmd_mapping_cfg *cfg;
    struct ev_loop *loop;
    struct esmd_log_ctx log;
    const struct esmd_connector_ops *ops;
    void *conn;
    struct esmd_host host;
    struct esmd_function *fn;

    struct esmd_shard *shards; /* open shards */
    size_t nshards;
    struct esmd_batch forming;
    ev_timer window;
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

    /* Filters (NULL when the mapping has none): one matcher per way the record's data can
     * appear in its filter document (enum esmd_filter_data), see compile_filters(). */
    struct esmd_filter *filters[3];
    bool alias_filters; /* filters[1] and [2] are filters[0] (no fallback) */
    struct esmd_buf filter_doc;

    size_t pending_high;     /* per-shard pause threshold (records) */
    size_t map_pending_high; /* mapping-wide pause threshold (records) */
    size_t npending;         /* records waiting in all shards */

    struct {
        struct esmd_series *polled, *invoked, *failed, *batches, *oversized, *retries, *throttled,
            *lag, *inflight, *pending, *committed, *filtered;
    } m;
};

/* ---- metrics ---- */

static void metrics_init(struct esmd_mapping *map)
{
    struct esmd_buf labels = ESMD_BUF_INIT;
    esmd_metric_labels(&labels, "mapping", map->cfg->name, "function", map->cfg->function, NULL);
    const char *l = esmd_buf_cstr(&labels);
#define SERIES(field, type, name, help) map->m.field = esmd_series(esmd_metric(type, name, help), l)
    SERIES(polled, ESMD_COUNTER, "esmd_polled_events_total", "Records read from the source.");
    SERIES(invoked, ESMD_COUNTER, "esmd_invoked_events_total",
           "Records sent to the function, counted again on each retry.");
    SERIES(failed, ESMD_COUNTER, "esmd_failed_invoke_events_total",
           "Records in invocations that failed (function error, error, timeout).");
    SERIES(batches, ESMD_COUNTER, "esmd_batches_total", "Batches sent (first attempts).");
    SERIES(oversized, ESMD_COUNTER, "esmd_oversized_records_total",
           "Records larger than the 6 MB payload cap on their own: skipped, never sent.");
    SERIES(retries, ESMD_COUNTER, "esmd_batch_retries_total", "Retries of failed batches.");
    SERIES(throttled, ESMD_COUNTER, "esmd_batch_throttles_total",
           "Batch invocations answered 429 (retried, not counted as attempts).");
    SERIES(lag, ESMD_GAUGE, "esmd_offset_lag", "Records behind the end of the source (sum).");
    SERIES(inflight, ESMD_GAUGE, "esmd_inflight_batches", "Batches being invoked or retried.");
    SERIES(pending, ESMD_GAUGE, "esmd_pending_records", "Records read and waiting for a batch.");
    SERIES(filtered, ESMD_COUNTER, "esmd_filtered_out_events_total",
           "Records that matched none of the mapping's filters: acked without being sent.");
    SERIES(committed, ESMD_COUNTER, "esmd_committed_events_total",
           "Records acknowledged to the source (sum of committed offset deltas).");
#undef SERIES
    esmd_buf_free(&labels);
}

static void set_last_result(struct esmd_mapping *map, const char *fmt, ...) ESMD_PRINTF(2, 3);
static void set_last_result(struct esmd_mapping *map, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(map->last_result, sizeof(map->last_result), fmt, ap);
    va_end(ap);
}

/* ---- shards ---- */

static void release_list(struct esmd_mapping *map, struct esmd_record *rec)
{
    while (rec) {
        struct esmd_record *next = rec->next;
        map->ops->release(map->conn, rec);
        rec = next;
    }
}

static void shard_free(struct esmd_shard *shard)
{
    free(shard->key);
    free(shard);
}

static struct esmd_shard *host_shard_open(void *core, const char *key, size_t overhead, void *priv)
{
    struct esmd_mapping *map = core;
    struct esmd_shard *shard = esmd_xcalloc(1, sizeof(*shard));
    shard->key = esmd_xstrdup(key);
    shard->overhead = overhead;
    shard->priv = priv;
    shard->state = ESMD_SHARD_IDLE;
    shard->next = map->shards;
    map->shards = shard;
    map->nshards++;
    ESMD_DEBUG(&map->log, "shard %s assigned", key);
    return shard;
}

static void host_shard_close(void *core, struct esmd_shard *shard)
{
    struct esmd_mapping *map = core;
    for (struct esmd_shard **pp = &map->shards; *pp; pp = &(*pp)->next) {
        if (*pp == shard) {
            *pp = shard->next;
            map->nshards--;
            break;
        }
    }
    shard->next = NULL;
    release_list(map, shard->pending_head);
    shard->pending_head = shard->pending_tail = NULL;
    map->npending -= shard->npending;
    shard->npending = shard->pending_bytes = 0;
    if (shard->state == ESMD_SHARD_OPEN) {
        release_list(map, esmd_batch_remove_shard(&map->forming, shard));
        shard->state = ESMD_SHARD_IDLE;
        if (map->forming.nrecords == 0)
            ev_timer_stop(map->loop, &map->window);
    }
    ESMD_DEBUG(&map->log, "shard %s revoked", shard->key);
    if (shard->state == ESMD_SHARD_INFLIGHT) {
        shard->revoked = true; /* freed when its batch settles; never acked */
        shard->priv = NULL;
    } else {
        shard_free(shard);
    }
    map->dirty = true;
}

static void host_emit(void *core, struct esmd_shard *shard, struct esmd_record *rec)
{
    struct esmd_mapping *map = core;
    rec->shard = shard;
    rec->next = NULL;
    esmd_series_inc(map->m.polled, 1);
    if (map->stopping) {
        map->ops->release(map->conn, rec);
        return;
    }
    rec->filtered = false;
    if (map->filters[0]) {
        esmd_buf_reset(&map->filter_doc);
        enum esmd_filter_data d = map->ops->filter_doc(map->conn, rec, &map->filter_doc);
        if (!esmd_filter_match(map->filters[d], map->filter_doc.data, map->filter_doc.len)) {
            rec->filtered = true;
            esmd_series_inc(map->m.filtered, 1);
        }
    }
    if (shard->pending_tail)
        shard->pending_tail->next = rec;
    else
        shard->pending_head = rec;
    shard->pending_tail = rec;
    shard->npending++;
    shard->pending_bytes += rec->size;
    map->npending++;
    if (!shard->paused &&
        (shard->npending >= map->pending_high || shard->pending_bytes >= PENDING_MAX_BYTES ||
         (map->npending >= map->map_pending_high &&
          shard->npending >= (size_t)map->cfg->batch_size))) {
        shard->paused = true;
        map->ops->pause(map->conn, shard);
    }
    map->dirty = true;
}

static void host_set_ready(void *core, bool ready, const char *why)
{
    struct esmd_mapping *map = core;
    if (map->ready != ready)
        ESMD_INFO(&map->log, "source %s%s%s", ready ? "ready" : "not ready", why ? ": " : "",
                  why ? why : "");
    map->ready = ready;
    free(map->not_ready_why);
    map->not_ready_why = esmd_xstrdup(why);
}

/* ---- batches ---- */

static void pump(struct esmd_mapping *map);
static void invoke(struct inflight *inf);

static char *idempotency_key(const struct esmd_mapping *map, const struct esmd_batch *batch)
{
    struct esmd_buf b = ESMD_BUF_INIT;
    esmd_buf_puts(&b, map->cfg->name);
    esmd_buf_putc(&b, '/');
    for (size_t i = 0; i < batch->ngroups; i++) {
        const struct esmd_batch_group *g = &batch->groups[i];
        esmd_buf_printf(&b, "%s%s:%lld-%lld", i ? "," : "", g->shard->key, (long long)g->head->seq,
                        (long long)g->tail->seq);
    }
    if (b.len > 200) {
        /* Too long for a header worth sending: FNV-1a of the same coordinates. */
        uint64_t h = 1469598103934665603ULL;
        for (size_t i = 0; i < b.len; i++)
            h = (h ^ (unsigned char)b.data[i]) * 1099511628211ULL;
        esmd_buf_reset(&b);
        esmd_buf_printf(&b, "%s/%zu-shards-%016llx", map->cfg->name, batch->ngroups,
                        (unsigned long long)h);
    }
    return esmd_buf_steal(&b, NULL);
}

static void flush(struct esmd_mapping *map)
{
    ev_timer_stop(map->loop, &map->window);
    if (map->forming.nrecords == 0)
        return;
    struct inflight *inf = esmd_xcalloc(1, sizeof(*inf));
    inf->map = map;
    inf->batch = map->forming;
    esmd_batch_init(&map->forming, &inf->batch.lim);
    for (size_t i = 0; i < inf->batch.ngroups; i++) {
        struct esmd_shard *shard = inf->batch.groups[i].shard;
        shard->state = ESMD_SHARD_INFLIGHT;
        shard->refs++;
    }
    map->ops->encode(map->conn, &inf->batch, &inf->body);
    if (inf->body.len != esmd_batch_bytes(&inf->batch))
        ESMD_ERROR(&map->log, "encoder wrote %zu bytes, expected %zu (bug)", inf->body.len,
                   esmd_batch_bytes(&inf->batch));
    inf->idem_key = idempotency_key(map, &inf->batch);
    ev_init(&inf->retry, NULL);
    inf->retry.data = inf;
    inf->next = map->inflight;
    if (map->inflight)
        map->inflight->prev = inf;
    map->inflight = inf;
    map->ninflight++;
    esmd_series_set(map->m.inflight, (double)map->ninflight);
    esmd_series_inc(map->m.batches, 1);
    invoke(inf);
}

static void inflight_unlink(struct inflight *inf)
{
    struct esmd_mapping *map = inf->map;
    if (inf->prev)
        inf->prev->next = inf->next;
    else
        map->inflight = inf->next;
    if (inf->next)
        inf->next->prev = inf->prev;
    map->ninflight--;
    esmd_series_set(map->m.inflight, (double)map->ninflight);
}

/* Queue sources: hands the batch's records back to the source (not deleted, redelivered). */
static void inflight_nack(struct inflight *inf)
{
    struct esmd_mapping *map = inf->map;
    if (!map->ops->nack)
        return;
    for (size_t i = 0; i < inf->batch.ngroups; i++) {
        struct esmd_batch_group *g = &inf->batch.groups[i];
        if (!g->shard->revoked)
            map->ops->nack(map->conn, g->shard, g->tail->seq + 1);
    }
}

/* Settles a batch: acks its shards when `ack` (success), releases its records, frees it. */
static void inflight_finish(struct inflight *inf, bool ack)
{
    struct esmd_mapping *map = inf->map;
    ev_timer_stop(map->loop, &inf->retry);
    inflight_unlink(inf);
    for (size_t i = 0; i < inf->batch.ngroups; i++) {
        struct esmd_batch_group *g = &inf->batch.groups[i];
        struct esmd_shard *shard = g->shard;
        if (ack && !shard->revoked)
            map->ops->ack(map->conn, shard, g->ack_seq);
        release_list(map, g->head);
        shard->refs--;
        shard->state = ESMD_SHARD_IDLE;
        if (shard->revoked && shard->refs == 0)
            shard_free(shard);
    }
    esmd_batch_clear(&inf->batch);
    esmd_buf_free(&inf->body);
    free(inf->idem_key);
    free(inf);
    map->dirty = true;
}

static void on_retry_timer(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct inflight *inf = w->data;
    ev_timer_stop(loop, w);
    if (inf->map->stopping) {
        inflight_nack(inf);
        inflight_finish(inf, false);
        return;
    }
    esmd_series_inc(inf->map->m.retries, 1);
    invoke(inf);
}

static void schedule_retry(struct inflight *inf, int64_t delay_ms)
{
    ev_timer_init(&inf->retry, on_retry_timer, (double)delay_ms / 1000.0, 0.0);
    inf->retry.data = inf;
    ev_timer_start(inf->map->loop, &inf->retry);
}

static void on_invoke_result(void *ud, const struct esmd_invoke_result *res)
{
    struct inflight *inf = ud;
    struct esmd_mapping *map = inf->map;
    inf->req = NULL;
    struct esmd_log_ctx ctx = map->log;
    ctx.request_id = res->request_id;

    if (res->outcome == ESMD_INVOKE_OK) {
        set_last_result(map, "OK");
        inflight_finish(inf, true);
        return;
    }
    if (res->outcome == ESMD_INVOKE_CANCELLED || map->stopping) {
        /* Not acked: the records are read again by whoever owns the shard next. */
        inflight_nack(inf);
        inflight_finish(inf, false);
        return;
    }
    if (map->ops->queue && res->outcome != ESMD_INVOKE_THROTTLED) {
        /* Queue semantics: the source redelivers the batch after its visibility timeout. */
        esmd_series_inc(map->m.failed, (double)inf->batch.nrecords);
        set_last_result(map, "PROBLEM: Function call failed: %s",
                        res->error ? res->error
                                   : (res->function_error ? res->function_error : "failed"));
        esmd_log_limited(ESMD_LOG_WARN, &ctx, "batch-failed",
                         "batch of %zu messages (%s) %s: %s; left for redelivery",
                         inf->batch.nrecords, inf->idem_key, esmd_invoke_outcome_name(res->outcome),
                         res->error ? res->error
                                    : (res->function_error ? res->function_error : "failed"));
        inflight_nack(inf);
        inflight_finish(inf, false);
        return;
    }
    int64_t delay;
    if (res->outcome == ESMD_INVOKE_THROTTLED) {
        esmd_series_inc(map->m.throttled, 1);
        delay = esmd_backoff_delay(&throttle_backoff, inf->throttles++, esmd_random64());
        set_last_result(map, "PROBLEM: Function call throttled");
    } else {
        esmd_series_inc(map->m.failed, (double)inf->batch.nrecords);
        delay = esmd_backoff_delay(&retry_backoff, inf->attempts++, esmd_random64());
        if (res->outcome == ESMD_INVOKE_FUNCTION_ERROR)
            set_last_result(map, "PROBLEM: Function call failed: %s",
                            res->function_error ? res->function_error : "function error");
        else if (res->outcome == ESMD_INVOKE_TIMEOUT)
            set_last_result(map, "PROBLEM: Function call timed out");
        else
            set_last_result(map, "PROBLEM: Function call failed: %s",
                            res->error ? res->error : "error");
    }
    if (res->retry_after_ms >= 0) {
        int64_t ra =
            res->retry_after_ms < RETRY_AFTER_CAP_MS ? res->retry_after_ms : RETRY_AFTER_CAP_MS;
        if (ra > delay)
            delay = ra;
    }
    esmd_log_limited(ESMD_LOG_WARN, &ctx, "batch-retry",
                     "batch of %zu records (%s) %s: %s; retrying in %lld ms (attempt %d)",
                     inf->batch.nrecords, inf->idem_key, esmd_invoke_outcome_name(res->outcome),
                     res->error ? res->error
                                : (res->function_error ? res->function_error : "failed"),
                     (long long)delay, inf->attempts + inf->throttles);
    schedule_retry(inf, delay);
}

static void invoke(struct inflight *inf)
{
    struct esmd_mapping *map = inf->map;
    esmd_series_inc(map->m.invoked, (double)inf->batch.nrecords);
    inf->req = esmd_invoke_start(map->fn, inf->body.data, inf->body.len, inf->idem_key,
                                 map->cfg->name, on_invoke_result, inf);
}

static void on_window(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct esmd_mapping *map = w->data;
    ev_timer_stop(loop, w);
    flush(map);
    map->dirty = true;
}

/* A record that is finished without being sent (filtered out, or over the 6 MB cap alone): its
 * offset is acked with the batch its shard is forming, or at once when the shard has nothing
 * outstanding (pump only takes records of shards with no batch in flight). */
static void skip_record(struct esmd_mapping *map, struct esmd_shard *shard, struct esmd_record *rec)
{
    int64_t next = rec->seq + 1;
    if (shard->state == ESMD_SHARD_OPEN) {
        /* Earlier records of the shard are in the forming batch: move its ack past this one. */
        for (size_t i = 0; i < map->forming.ngroups; i++)
            if (map->forming.groups[i].shard == shard)
                map->forming.groups[i].ack_seq = next;
    } else {
        map->ops->ack(map->conn, shard, next);
    }
    map->ops->release(map->conn, rec);
}

static void skip_oversized(struct esmd_mapping *map, struct esmd_shard *shard,
                           struct esmd_record *rec)
{
    esmd_series_inc(map->m.oversized, 1);
    ESMD_ERROR(&map->log,
               "record %s@%lld is %zu bytes encoded, over the %d-byte payload cap: skipped",
               shard->key, (long long)rec->seq, rec->size, ESMD_MAX_PAYLOAD);
    skip_record(map, shard, rec);
}

/* Moves pending records into batches; runs once per loop turn, before the loop sleeps. */
static void pump(struct esmd_mapping *map)
{
    if (map->stopping)
        return;
    for (struct esmd_shard *shard = map->shards; shard; shard = shard->next) {
        while (shard->pending_head && shard->state != ESMD_SHARD_INFLIGHT) {
            struct esmd_record *rec = shard->pending_head;
            enum esmd_batch_fit fit =
                rec->filtered ? ESMD_BATCH_FITS : esmd_batch_check(&map->forming, rec);
            if (fit == ESMD_BATCH_FULL) {
                flush(map);
                continue; /* the shard may now be in flight, or start the next batch */
            }
            shard->pending_head = rec->next;
            if (!shard->pending_head)
                shard->pending_tail = NULL;
            shard->npending--;
            shard->pending_bytes -= rec->size;
            map->npending--;
            if (rec->filtered) {
                skip_record(map, shard, rec);
                continue;
            }
            if (fit == ESMD_BATCH_TOO_BIG) {
                skip_oversized(map, shard, rec);
                continue;
            }
            if (map->forming.nrecords == 0) {
                map->forming.opened_mono_ms = (int64_t)(ev_now(map->loop) * 1000.0);
                if (map->cfg->maximum_batching_window_ms > 0) {
                    ev_timer_set(&map->window,
                                 (double)map->cfg->maximum_batching_window_ms / 1000.0, 0.0);
                    ev_timer_start(map->loop, &map->window);
                }
            }
            esmd_batch_add(&map->forming, rec);
            shard->state = ESMD_SHARD_OPEN;
            if (esmd_batch_count_reached(&map->forming))
                flush(map);
        }
        if (shard->paused && shard->npending <= map->pending_high / 2 &&
            shard->pending_bytes <= PENDING_MAX_BYTES / 2 &&
            (map->npending <= map->map_pending_high / 2 ||
             shard->npending < (size_t)map->cfg->batch_size)) {
            shard->paused = false;
            map->ops->resume(map->conn, shard);
        }
    }
    if (map->forming.nrecords > 0 && map->cfg->maximum_batching_window_ms == 0)
        flush(map);
    esmd_series_set(map->m.pending, (double)map->npending);
}

static void on_prepare(struct ev_loop *loop, ev_prepare *w, int revents)
{
    struct esmd_mapping *map = w->data;
    if (!map->dirty)
        return;
    map->dirty = false;
    pump(map);
}

static void on_stats(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct esmd_mapping *map = w->data;
    struct esmd_connector_stats st = {.lag = -1};
    map->ops->stats(map->conn, &st);
    if (st.lag >= 0)
        esmd_series_set(map->m.lag, (double)st.lag);
    double committed = esmd_series_value(map->m.committed);
    if ((double)st.committed > committed)
        esmd_series_inc(map->m.committed, (double)st.committed - committed);
}

/* ---- lifecycle ---- */

static void free_filters(struct esmd_mapping *map)
{
    for (int d = 0; d < 3; d++) {
        if (d == 0 || !map->alias_filters)
            esmd_filter_free(map->filters[d]);
        map->filters[d] = NULL;
    }
    esmd_buf_free(&map->filter_doc);
}

/* One matcher per way the record's data can appear (enum esmd_filter_data). Without fallback
 * (SQS, Kinesis: §5.4) all three are the patterns as written. With Lambda's Kafka fallback
 * (§2.7): when the data and a pattern's condition on it disagree, only the pattern's other
 * conditions apply — so [JSON] (an object or array) keeps object conditions and drops value-list
 * ones, [TEXT] (a scalar or text) keeps value-list conditions and drops object ones, [NONE]
 * (not UTF-8) drops every data condition. Only top-level data conditions; patterns were checked
 * at config load. */
static int compile_filters(struct esmd_mapping *map, char *err, size_t errlen)
{
    const struct esmd_mapping_cfg *cfg = map->cfg;
    const char *key = map->ops->data_key;
    const char *const skip[] = {key, NULL};
    bool fallback = map->ops->filter_fallback && key;
    int nmatchers = fallback ? 3 : 1;
    for (int d = 0; d < nmatchers; d++)
        map->filters[d] = esmd_filter_new();
    for (size_t i = 0; i < cfg->nfilters; i++) {
        const char *p = cfg->filters[i].pattern;
        size_t len = strlen(p);
        bool has_data = false, object_data = false;
        if (fallback) {
            cJSON *j = cJSON_ParseWithLength(p, len);
            const cJSON *data = cJSON_GetObjectItemCaseSensitive(j, key);
            has_data = data != NULL;
            object_data = cJSON_IsObject(data);
            cJSON_Delete(j);
        }
        for (int d = 0; d < nmatchers; d++) {
            bool strip = has_data && (d == ESMD_FILTER_DATA_NONE ||
                                      (d == ESMD_FILTER_DATA_JSON && !object_data) ||
                                      (d == ESMD_FILTER_DATA_TEXT && object_data));
            struct esmd_filter_error fe;
            int rc = strip ? esmd_filter_add_skip(map->filters[d], p, len, (uint32_t)i, skip, &fe)
                           : esmd_filter_add(map->filters[d], p, len, (uint32_t)i, &fe);
            if (rc != 0) {
                snprintf(err, errlen, "mapping %s: filters[%zu]: %s (at %d:%d of %s)", cfg->name, i,
                         fe.message, fe.line, fe.column, p);
                return ESMD_EINVAL;
            }
        }
    }
    map->alias_filters = nmatchers == 1;
    for (int d = nmatchers; d < 3; d++)
        map->filters[d] = map->filters[0];
    return 0;
}

struct esmd_mapping *esmd_mapping_new(struct ev_loop *loop, const struct esmd_mapping_cfg *cfg,
                                      struct esmd_invoker *inv, const char *instance_id, char *err,
                                      size_t errlen)
{
    static const char *const kinds[] = {"kafka", "redis", "pgqueue"};
    const struct esmd_connector_ops *ops = esmd_connector_find(kinds[cfg->kind]);
    if (!ops) {
        snprintf(err, errlen, "mapping %s: source kind %s is not available in this build",
                 cfg->name, kinds[cfg->kind]);
        return NULL;
    }
    struct esmd_function *fn = esmd_invoker_function(inv, cfg->function);
    if (!fn) {
        snprintf(err, errlen, "mapping %s: function %s is not registered", cfg->name,
                 cfg->function);
        return NULL;
    }
    struct esmd_mapping *map = esmd_xcalloc(1, sizeof(*map));
    map->cfg = cfg;
    map->loop = loop;
    map->ops = ops;
    map->fn = fn;
    map->log.mapping = cfg->name;
    map->log.function = cfg->function;
    map->pending_high = (size_t)cfg->batch_size * 2;
    if (map->pending_high < PENDING_MIN_RECORDS)
        map->pending_high = PENDING_MIN_RECORDS;
    map->map_pending_high = (size_t)cfg->batch_size * 4;
    if (map->map_pending_high < MAP_PENDING_MIN_RECORDS)
        map->map_pending_high = MAP_PENDING_MIN_RECORDS;
    snprintf(map->last_result, sizeof(map->last_result), "No records processed");
    if (cfg->nfilters > 0 && compile_filters(map, err, errlen) != 0) {
        free_filters(map);
        free(map);
        return NULL;
    }
    map->host = (struct esmd_host){
        .loop = loop,
        .core = map,
        .log = &map->log,
        .instance_id = instance_id,
        .shard_open = host_shard_open,
        .shard_close = host_shard_close,
        .emit = host_emit,
        .set_ready = host_set_ready,
    };
    map->conn = ops->create(cfg, &map->host, err, errlen);
    if (!map->conn) {
        free_filters(map);
        free(map);
        return NULL;
    }
    struct esmd_batch_limits lim = {
        .batch_size = cfg->batch_size,
        .max_bytes = ESMD_MAX_PAYLOAD,
        .envelope = ops->envelope_size(map->conn),
        .group_by_shard = ops->grouped,
    };
    esmd_batch_init(&map->forming, &lim);
    ev_init(&map->window, on_window);
    map->window.data = map;
    ev_prepare_init(&map->pump, on_prepare);
    map->pump.data = map;
    ev_timer_init(&map->stats_timer, on_stats, 1.0, 1.0);
    map->stats_timer.data = map;
    metrics_init(map);
    return map;
}

int esmd_mapping_start(struct esmd_mapping *map)
{
    ev_prepare_start(map->loop, &map->pump);
    ev_timer_start(map->loop, &map->stats_timer);
    int rc = map->ops->start(map->conn);
    if (rc != ESMD_OK)
        return rc;
    ESMD_INFO(&map->log, "mapping started (%s source, batch_size %d, window %lld ms)",
              map->ops->kind, map->cfg->batch_size,
              (long long)map->cfg->maximum_batching_window_ms);
    return ESMD_OK;
}

static void on_connector_stopped(void *ud)
{
    struct esmd_mapping *map = ud;
    on_stats(map->loop, &map->stats_timer, 0); /* final committed count */
    ev_timer_stop(map->loop, &map->stats_timer);
    ESMD_INFO(&map->log, "mapping stopped");
    if (map->stop_done)
        map->stop_done(map->stop_ud);
}

/* Waits for in-flight requests, then stops the connector. */
static void on_stop_check(struct ev_loop *loop, ev_idle *w, int revents)
{
    struct esmd_mapping *map = w->data;
    if (map->ninflight > 0)
        return;
    ev_idle_stop(loop, w);
    if (!map->connector_stopping) {
        map->connector_stopping = true;
        map->ops->stop(map->conn, on_connector_stopped, map);
    }
}

void esmd_mapping_stop(struct esmd_mapping *map, void (*done)(void *ud), void *ud)
{
    if (map->stopping)
        return;
    map->stopping = true;
    map->stop_done = done;
    map->stop_ud = ud;
    ev_prepare_stop(map->loop, &map->pump);
    ev_timer_stop(map->loop, &map->window);
    /* Records not yet sent are given up without an ack: they are read again after restart. */
    for (size_t i = 0; i < map->forming.ngroups; i++) {
        map->forming.groups[i].shard->state = ESMD_SHARD_IDLE;
        release_list(map, map->forming.groups[i].head);
    }
    esmd_batch_clear(&map->forming);
    for (struct esmd_shard *s = map->shards; s; s = s->next) {
        release_list(map, s->pending_head);
        s->pending_head = s->pending_tail = NULL;
        s->npending = s->pending_bytes = 0;
        map->npending = 0;
        if (!s->paused) {
            s->paused = true;
            map->ops->pause(map->conn, s);
        }
    }
    /* Batches waiting for a retry are abandoned now; those in flight finish. */
    for (struct inflight *inf = map->inflight, *next; inf; inf = next) {
        next = inf->next;
        if (!inf->req) {
            inflight_nack(inf);
            inflight_finish(inf, false);
        }
    }
    ESMD_INFO(&map->log, "mapping stopping: %zu batches in flight", map->ninflight);
    ev_idle_init(&map->stop_check, on_stop_check);
    map->stop_check.data = map;
    ev_idle_start(map->loop, &map->stop_check);
}

void esmd_mapping_free(struct esmd_mapping *map)
{
    if (!map)
        return;
    map->stopping = true;
    ev_prepare_stop(map->loop, &map->pump);
    ev_timer_stop(map->loop, &map->window);
    ev_timer_stop(map->loop, &map->stats_timer);
    ev_idle_stop(map->loop, &map->stop_check);
    while (map->inflight) {
        struct inflight *inf = map->inflight;
        if (inf->req) {
            struct esmd_invoke_req *req = inf->req;
            esmd_invoke_cancel(req); /* calls on_invoke_result → inflight_finish */
        } else {
            inflight_finish(inf, false);
        }
    }
    for (size_t i = 0; i < map->forming.ngroups; i++)
        release_list(map, map->forming.groups[i].head);
    esmd_batch_clear(&map->forming);
    free(map->forming.groups);
    while (map->shards) {
        struct esmd_shard *s = map->shards;
        map->shards = s->next;
        release_list(map, s->pending_head);
        shard_free(s);
    }
    map->ops->destroy(map->conn);
    free_filters(map);
    free(map->not_ready_why);
    free(map);
}

const char *esmd_mapping_name(const struct esmd_mapping *map)
{
    return map->cfg->name;
}

bool esmd_mapping_ready(const struct esmd_mapping *map)
{
    return map->ready;
}

const char *esmd_mapping_last_result(const struct esmd_mapping *map)
{
    return map->last_result;
}

void esmd_mapping_describe(const struct esmd_mapping *map, struct esmd_buf *out)
{
    struct esmd_connector_stats st = {.lag = -1};
    map->ops->stats(map->conn, &st);
    esmd_buf_printf(out, "{\"ready\":%s,\"reason\":", map->ready ? "true" : "false");
    if (map->not_ready_why)
        esmd_buf_put_json_string(out, map->not_ready_why, strlen(map->not_ready_why));
    else
        esmd_buf_puts(out, "null");
    esmd_buf_printf(out,
                    ",\"shards\":%zu,\"inflight_batches\":%zu,\"pending_records\":%zu,"
                    "\"lag\":%lld,\"last_processing_result\":",
                    map->nshards, map->ninflight, map->npending, (long long)st.lag);
    esmd_buf_put_json_string(out, map->last_result, strlen(map->last_result));
    esmd_buf_putc(out, '}');
}
