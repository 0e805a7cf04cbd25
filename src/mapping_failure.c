/* Failure handling of a mapping's batches (README "Failure handling", docs/lambda.md#stream-errors,
 * #partial-batch): retries with backoff, throttles, maximum_record_age,
 * bisect_batch_on_function_error, the partial batch response's batchItemFailures, and giving
 * records up to the on-failure destination. The record's way through the mapping is in
 * src/mapping.c. */
#include "mapping_private.h"

#include "esmd/destination.h"
#include "esmd/invoke.h"
#include "esmd/metrics.h"

#include <cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Retries of a failed batch: exponential from 250 ms up to 30 s, with jitter. */
static const struct esmd_backoff default_retry_backoff = {250, 30000};
/* Throttled invocations back off from 100 ms up to 10 s; a Retry-After is honoured up to 5 min. */
static const struct esmd_backoff throttle_backoff = {100, 10000};
#define RETRY_AFTER_CAP_MS 300000
/* Lambda: unlimited retries with an on-failure destination mean 10. */
#define ON_FAILURE_DEFAULT_RETRIES 10

void esmd_mapping_failure_init(struct esmd_mapping *map)
{
    map->retry_backoff = default_retry_backoff;
    /* A testing knob (docs/testing): "BASE_MS,CAP_MS" for the retries of failed batches. */
    const char *rb = getenv("ESMD_MAPPING_RETRY_BACKOFF");
    long long base, cap;
    if (rb && sscanf(rb, "%lld,%lld", &base, &cap) == 2 && base > 0 && cap >= base) {
        map->retry_backoff.base_ms = base;
        map->retry_backoff.cap_ms = cap;
    }
}

/* ---- parts: splitting the current part ---- */

struct part_records esmd_mapping_part_records(const struct esmd_batch *b)
{
    struct part_records pr = {esmd_xcalloc(b->nrecords ? b->nrecords : 1, sizeof(*pr.recs)), 0};
    for (size_t i = 0; i < b->ngroups; i++)
        for (struct esmd_record *r = b->groups[i].head; r; r = r->next)
            pr.recs[pr.n++] = r;
    return pr;
}

static void push_todo(struct inflight *inf, struct esmd_batch *part)
{
    if (inf->ntodo == inf->captodo) {
        inf->captodo = inf->captodo ? inf->captodo * 2 : 4;
        inf->todo = esmd_xrealloc(inf->todo, inf->captodo * sizeof(*inf->todo));
    }
    inf->todo[inf->ntodo++] = *part;
}

/* Rebuilds a part from records (in shard order). A group whose last record is the last record
 * of its group in `from` keeps that group's ack position (records skipped after it). */
static void part_from(struct esmd_batch *dst, const struct esmd_batch *from,
                      struct esmd_record **recs, size_t n)
{
    esmd_batch_init(dst, &from->lim);
    for (size_t i = 0; i < n; i++)
        esmd_batch_add(dst, recs[i]);
    for (size_t i = 0; i < dst->ngroups; i++) {
        struct esmd_batch_group *g = &dst->groups[i];
        for (size_t j = 0; j < from->ngroups; j++)
            if (from->groups[j].shard == g->shard && from->groups[j].tail == g->tail)
                g->ack_seq = from->groups[j].ack_seq;
    }
}

bool esmd_mapping_split_part(struct inflight *inf,
                             bool (*keep)(void *ctx, size_t i, const struct esmd_record *r),
                             void *ctx)
{
    struct part_records pr = esmd_mapping_part_records(&inf->batch);
    struct esmd_record **a = esmd_xcalloc(pr.n ? pr.n : 1, sizeof(*a));
    struct esmd_record **b = esmd_xcalloc(pr.n ? pr.n : 1, sizeof(*b));
    size_t na = 0, nb = 0;
    for (size_t i = 0; i < pr.n; i++) {
        if (keep(ctx, i, pr.recs[i]))
            a[na++] = pr.recs[i];
        else
            b[nb++] = pr.recs[i];
    }
    bool split = na > 0 && nb > 0;
    if (split) {
        struct esmd_batch first, second, old = inf->batch;
        part_from(&first, &old, a, na);
        part_from(&second, &old, b, nb);
        esmd_batch_clear(&old);
        push_todo(inf, &second);
        inf->batch = first;
        inf->encoded = false;
    }
    free(a);
    free(b);
    free(pr.recs);
    return split;
}

/* ---- maximum_record_age ---- */

/* Records older than maximum_record_age, as a prefix of each shard's records. */
struct age_ctx {
    const struct esmd_mapping *map;
    int64_t now_ms;
    const struct esmd_shard *shard; /* the shard of the previous record */
    bool expired;                   /* the previous record of that shard was expired */
};

static bool keep_expired_prefix(void *ctx, size_t i, const struct esmd_record *r)
{
    (void)i;
    struct age_ctx *a = ctx;
    if (r->shard != a->shard) {
        a->shard = r->shard;
        a->expired = true;
    }
    a->expired = a->expired && a->now_ms - r->timestamp_ms > a->map->cfg->maximum_record_age_ms;
    return a->expired;
}

bool esmd_mapping_give_up_expired(struct inflight *inf)
{
    struct esmd_mapping *map = inf->map;
    if (map->cfg->maximum_record_age_ms < 0 || map->ops->queue)
        return false;
    struct age_ctx a = {map, esmd_now_ms(), NULL, false};
    struct part_records pr = esmd_mapping_part_records(&inf->batch);
    size_t nexpired = 0;
    for (size_t i = 0; i < pr.n; i++)
        nexpired += keep_expired_prefix(&a, i, pr.recs[i]);
    free(pr.recs);
    if (nexpired == 0)
        return false;
    a = (struct age_ctx){map, a.now_ms, NULL, false};
    esmd_mapping_split_part(inf, keep_expired_prefix, &a);
    esmd_mapping_give_up(inf, "RecordAgeExceeded");
    return true;
}

/* ---- retries, throttles, bisecting ---- */

/* The retry limit in force: Lambda's rule for streams is that unlimited retries (-1) with an
 * on-failure destination mean 10. -1: unlimited. */
static int retry_limit(const struct esmd_mapping *map)
{
    int n = map->cfg->maximum_retry_attempts;
    if (n < 0 && map->on_failure)
        return ON_FAILURE_DEFAULT_RETRIES;
    return n;
}

static void log_failure(struct inflight *inf, const struct esmd_invoke_result *res,
                        const char *what, int64_t delay, const char *action)
{
    struct esmd_log_ctx ctx = esmd_mapping_part_log(inf, res->request_id);
    const char *reason =
        res->error ? res->error : (res->function_error ? res->function_error : "failed");
    esmd_log_limited(ESMD_LOG_WARN, &ctx, "batch-retry",
                     "batch of %zu records (%s) %s: %s; %s%lld ms (attempt %d)",
                     inf->batch.nrecords, inf->idem_key, esmd_invoke_outcome_name(res->outcome),
                     reason, what, (long long)delay, inf->invokes);
    esmd_mapping_processing_event(inf, res->request_id, esmd_mapping_error_code(res), reason,
                                  action);
}

void esmd_mapping_throttled(struct inflight *inf, const struct esmd_invoke_result *res)
{
    /* Not an invocation: retried until the records expire, without using up retries. */
    int64_t delay = esmd_invoke_retry_delay(
        res, esmd_backoff_delay(&throttle_backoff, inf->throttles++, esmd_random64()),
        RETRY_AFTER_CAP_MS);
    log_failure(inf, res, "retrying in ", delay, "RETRY");
    esmd_mapping_schedule_part(inf, delay, true);
}

static bool keep_first_half(void *ctx, size_t i, const struct esmd_record *r)
{
    (void)r;
    return i < *(size_t *)ctx;
}

void esmd_mapping_part_failed(struct inflight *inf, const struct esmd_invoke_result *res,
                              bool bisect)
{
    struct esmd_mapping *map = inf->map;
    if (bisect && map->cfg->bisect_batch_on_function_error && inf->batch.nrecords > 1) {
        /* Splitting does not use up the retry quota (Lambda). */
        size_t half = (inf->batch.nrecords + 1) / 2;
        log_failure(inf, res, "bisecting; first half in ", 0, "BISECT");
        esmd_mapping_split_part(inf, keep_first_half, &half);
        esmd_mapping_part_begin(inf);
        esmd_series_inc(map->m.bisections, 1);
        esmd_mapping_schedule_part(inf, 0, false);
        return;
    }
    inf->attempts++;
    int limit = retry_limit(map);
    if (limit >= 0 && inf->attempts > limit) {
        esmd_mapping_give_up(inf, "RetryAttemptsExhausted");
        return;
    }
    int64_t delay = esmd_invoke_retry_delay(
        res, esmd_backoff_delay(&map->retry_backoff, inf->attempts - 1, esmd_random64()),
        RETRY_AFTER_CAP_MS);
    log_failure(inf, res, "retrying in ", delay, "RETRY");
    esmd_mapping_schedule_part(inf, delay, true);
}

/* ---- partial batch responses ---- */

enum esmd_item_failures esmd_mapping_parse_item_failures(const char *body, size_t len, size_t n,
                                                         bool (*item_is)(void *ctx, size_t i,
                                                                         const struct cJSON *id),
                                                         void *ctx, bool *failed, const char **why)
{
    const char *p = body, *end = body + len;
    while (p < end && (*p == ' ' || *p == '\t' || *p == '\n' || *p == '\r'))
        p++;
    if (p == end || *p == '\0')
        return ESMD_ITEMS_NONE; /* an empty response */
    cJSON *j = cJSON_ParseWithLength(body, len);
    if (!j) {
        *why = "the response is not JSON";
        return ESMD_ITEMS_BAD;
    }
    enum esmd_item_failures rc = ESMD_ITEMS_NONE;
    const cJSON *list = cJSON_GetObjectItemCaseSensitive(j, "batchItemFailures");
    if (cJSON_IsNull(j) || !cJSON_IsObject(j) || !list || cJSON_IsNull(list)) {
        rc = ESMD_ITEMS_NONE;
    } else if (!cJSON_IsArray(list)) {
        *why = "batchItemFailures is not a list";
        rc = ESMD_ITEMS_BAD;
    } else {
        const cJSON *item;
        cJSON_ArrayForEach(item, list)
        {
            const cJSON *id = cJSON_GetObjectItemCaseSensitive(item, "itemIdentifier");
            bool found = false;
            if (id && !cJSON_IsNull(id) && !(cJSON_IsString(id) && !*id->valuestring) && item_is) {
                for (size_t i = 0; i < n && !found; i++) {
                    if (item_is(ctx, i, id)) {
                        failed[i] = true;
                        found = true;
                    }
                }
            }
            if (!found) {
                *why = "an itemIdentifier is missing, malformed or not in the batch";
                rc = ESMD_ITEMS_BAD;
                break;
            }
            rc = ESMD_ITEMS_SOME;
        }
    }
    cJSON_Delete(j);
    return rc;
}

/* ---- giving up: on-failure records ---- */

/* Appends the on-failure record of rec (docs/lambda.md#kafka-on-failure, the Kafka-topic form,
 * for every destination kind): invocation and response context, the source's block for a batch of
 * one, and the record itself as a one-record event (left out when it is too big to carry). */
static void failure_record(struct inflight *inf, struct esmd_record *rec, struct esmd_buf *out)
{
    struct esmd_mapping *map = inf->map;
    struct esmd_buf payload = ESMD_BUF_INIT;
    bool carry = strcmp(inf->condition, "MaximumPayloadSizeExceeded") != 0;
    if (carry) {
        struct esmd_batch one;
        esmd_batch_init(&one, &inf->batch.lim);
        struct esmd_record *next = rec->next;
        esmd_batch_add(&one, rec);
        map->ops->encode(map->conn, &one, &payload);
        rec->next = next;
        esmd_batch_clear(&one);
    }
    char ts[32], arn[256];
    esmd_iso8601_ms(esmd_now_ms(), ts);
    esmd_function_arn(map->cfg->function, arn, sizeof(arn));
    esmd_buf_puts(out, "{\"requestContext\":{\"requestId\":");
    if (inf->last_request_id)
        esmd_buf_put_json_string(out, inf->last_request_id, strlen(inf->last_request_id));
    else
        esmd_buf_puts(out, "null");
    esmd_buf_puts(out, ",\"functionArn\":");
    esmd_buf_put_json_string(out, arn, strlen(arn));
    esmd_buf_printf(out, ",\"condition\":\"%s\",\"approximateInvokeCount\":%d},", inf->condition,
                    inf->invokes);
    if (inf->last_status >= 0) {
        esmd_buf_printf(out,
                        "\"responseContext\":{\"statusCode\":%ld,\"executedVersion\":\"$LATEST\","
                        "\"functionError\":",
                        inf->last_status);
        if (inf->last_function_error)
            esmd_buf_put_json_string(out, inf->last_function_error,
                                     strlen(inf->last_function_error));
        else
            esmd_buf_puts(out, "null");
        esmd_buf_puts(out, "},");
    } else {
        esmd_buf_puts(out, "\"responseContext\":null,");
    }
    esmd_buf_printf(out, "\"version\":\"1.0\",\"timestamp\":\"%s\"", ts);
    if (map->ops->batch_info_key && map->ops->failure_info) {
        esmd_buf_printf(out, ",\"%s\":", map->ops->batch_info_key);
        map->ops->failure_info(map->conn, rec, payload.len, out);
    }
    if (carry) {
        esmd_buf_puts(out, ",\"payload\":");
        esmd_buf_append(out, payload.data, payload.len);
    }
    esmd_buf_putc(out, '}');
    esmd_buf_free(&payload);
}

static void on_failure_stored(void *ud, bool ok, const char *err)
{
    struct inflight *inf = ud;
    struct esmd_mapping *map = inf->map;
    inf->dest_pending--;
    if (!map) { /* the mapping was freed meanwhile (inflight_end): the records went back */
        if (inf->dest_pending == 0)
            free(inf);
        return;
    }
    if (!ok) {
        inf->dest_failed = true;
        esmd_log_limited(ESMD_LOG_ERROR, &map->log, "on-failure-store",
                         "on-failure record for %s not stored: %s; trying again", map->on_failure,
                         err ? err : "error");
        esmd_mapping_processing_event(inf, inf->last_request_id, "OnFailureDestinationFailed",
                                      err ? err : "error", "RETRY");
    }
    if (inf->dest_pending > 0)
        return;
    if (inf->dest_failed) {
        inf->dest_failed = false;
        /* the source stays unacked; the records are offered again (some may be stored twice):
         * the retry timer sees inf->condition and gives the part up again */
        esmd_mapping_schedule_part(inf, esmd_backoff_delay(&map->retry_backoff, 4, esmd_random64()),
                                   true);
        return;
    }
    esmd_mapping_part_done(inf, true);
}

/* The console keeps the last records given up (mapping_watch.c): those of a part discarded
 * without a destination too, as the on-failure record they would have had. */
static void watch_discarded(struct inflight *inf)
{
    struct part_records pr = esmd_mapping_part_records(&inf->batch);
    struct esmd_buf rec_json = ESMD_BUF_INIT;
    for (size_t i = pr.n > ESMD_WATCH_FAILURES ? pr.n - ESMD_WATCH_FAILURES : 0; i < pr.n; i++) {
        esmd_buf_reset(&rec_json);
        failure_record(inf, pr.recs[i], &rec_json);
        esmd_mapping_watch_failure(inf, rec_json.data, rec_json.len);
    }
    esmd_buf_free(&rec_json);
    free(pr.recs);
}

/* Each record goes to the on-failure destination (stored in the outbox before the source is
 * acked), or is discarded and counted without one. Then the source moves on. */
void esmd_mapping_give_up(struct inflight *inf, const char *condition)
{
    struct esmd_mapping *map = inf->map;
    inf->condition = condition;
    esmd_mapping_part_trace(inf);
    struct esmd_log_ctx ctx = esmd_mapping_part_log(inf, inf->last_request_id);
    if (!map->on_failure || !map->dests) {
        watch_discarded(inf);
        esmd_series_inc(map->m.dropped, (double)inf->batch.nrecords);
        ESMD_ERROR(&ctx, "%zu records (%s) discarded after %d invocations: %s", inf->batch.nrecords,
                   inf->idem_key ? inf->idem_key : "not sent", inf->invokes, condition);
        esmd_mapping_processing_event(inf, inf->last_request_id, condition,
                                      "records given up and discarded (no on_failure)", "DISCARD");
        esmd_mapping_part_done(inf, true);
        return;
    }
    struct part_records pr = esmd_mapping_part_records(&inf->batch);
    struct esmd_buf rec_json = ESMD_BUF_INIT;
    inf->dest_pending = 1; /* held until every record is offered */
    for (size_t i = 0; i < pr.n; i++) {
        esmd_buf_reset(&rec_json);
        failure_record(inf, pr.recs[i], &rec_json);
        if (pr.n - i <= ESMD_WATCH_FAILURES)
            esmd_mapping_watch_failure(inf, rec_json.data, rec_json.len);
        const void *key = NULL;
        size_t keylen = 0;
        if (map->ops->record_key)
            map->ops->record_key(map->conn, pr.recs[i], &key, &keylen);
        if (esmd_dests_send(map->dests, map->on_failure, rec_json.data, rec_json.len, key, keylen,
                            on_failure_stored, inf) == 0) {
            inf->dest_pending++;
            esmd_series_inc(map->m.on_failure, 1);
        } else {
            inf->dest_failed = true;
        }
    }
    esmd_buf_free(&rec_json);
    free(pr.recs);
    ESMD_WARN(&ctx, "%zu records sent to on-failure destination %s: %s", pr.n, map->on_failure,
              condition);
    esmd_mapping_processing_event(inf, inf->last_request_id, condition,
                                  "records given up and sent to the on-failure destination",
                                  "ON_FAILURE");
    on_failure_stored(inf, true, NULL);
}
