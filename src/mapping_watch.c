/* What the admin console (docs/admin.md#console) shows of a mapping that the metrics do not
 * keep: a ring of samples of its lag and throughput (every ESMD_WATCH_INTERVAL_MS, the last 15
 * minutes) and the last records it gave up, with why. Both are bounded: ESMD_WATCH_SAMPLES
 * samples and ESMD_WATCH_FAILURES records of at most ESMD_WATCH_RECORD_MAX bytes each. They live
 * in this process only (another instance has its own). Everything runs on the loop thread. */
#include "mapping_private.h"

#include "esmd/metrics.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct watch_sample {
    int64_t time_ms;
    int64_t lag; /* -1: unknown */
    double polled_ps, invoked_ps, failed_ps;
    size_t inflight, pending;
};

struct esmd_mapping_watch {
    struct watch_sample samples[ESMD_WATCH_SAMPLES];
    size_t nsamples, next; /* next: where the next sample goes */
    int64_t interval_ms;
    int64_t last_ms;                     /* of the last sample (the creation before the first) */
    double polled, invoked, failed;      /* counter values at the last sample */
    char *failures[ESMD_WATCH_FAILURES]; /* JSON objects, a ring */
    size_t nfailures, next_failure;
};

struct esmd_mapping_watch *esmd_mapping_watch_new(const struct esmd_mapping *map)
{
    struct esmd_mapping_watch *w = esmd_xcalloc(1, sizeof(*w));
    /* A testing knob (docs/testing.md): the sampling interval in ms (1000..5000: the stats timer
     * ticks every second), so that a test sees the chart move within seconds. */
    const char *env = getenv("ESMD_CONSOLE_SAMPLE_MS");
    long v = env ? strtol(env, NULL, 10) : 0;
    w->interval_ms = v >= 1000 && v <= ESMD_WATCH_INTERVAL_MS ? v : ESMD_WATCH_INTERVAL_MS;
    w->last_ms = esmd_now_ms();                   /* the first sample counts from the start */
    w->polled = esmd_series_value(map->m.polled); /* not 0: a series outlives its mapping */
    w->invoked = esmd_series_value(map->m.invoked);
    w->failed = esmd_series_value(map->m.failed);
    return w;
}

void esmd_mapping_watch_free(struct esmd_mapping_watch *w)
{
    if (w == NULL)
        return;
    for (size_t i = 0; i < ESMD_WATCH_FAILURES; i++)
        free(w->failures[i]);
    free(w);
}

void esmd_mapping_watch_tick(struct esmd_mapping *map, int64_t lag, int64_t now_ms)
{
    struct esmd_mapping_watch *w = map->watch;
    double polled = esmd_series_value(map->m.polled), invoked = esmd_series_value(map->m.invoked),
           failed = esmd_series_value(map->m.failed);

    if (now_ms - w->last_ms < w->interval_ms - w->interval_ms / 10)
        return; /* the stats timer ticks every second; allow it some slack */
    struct watch_sample *s = &w->samples[w->next];
    double dt = now_ms > w->last_ms ? (double)(now_ms - w->last_ms) / 1000 : 0;
    s->time_ms = now_ms;
    s->lag = lag;
    s->polled_ps = dt > 0 ? (polled - w->polled) / dt : 0;
    s->invoked_ps = dt > 0 ? (invoked - w->invoked) / dt : 0;
    s->failed_ps = dt > 0 ? (failed - w->failed) / dt : 0;
    s->inflight = map->ninflight;
    s->pending = map->npending;
    w->next = (w->next + 1) % ESMD_WATCH_SAMPLES;
    if (w->nsamples < ESMD_WATCH_SAMPLES)
        w->nsamples++;
    w->last_ms = now_ms;
    w->polled = polled;
    w->invoked = invoked;
    w->failed = failed;
}

static void put_str_or_null(struct esmd_buf *b, const char *s)
{
    if (s)
        esmd_buf_put_json_string(b, s, strlen(s));
    else
        esmd_buf_puts(b, "null");
}

void esmd_mapping_watch_failure(struct inflight *inf, const char *record_json, size_t len)
{
    struct esmd_mapping *map = inf->map;
    struct esmd_mapping_watch *w = map->watch;
    struct esmd_buf b = ESMD_BUF_INIT;
    char ts[32];

    esmd_iso8601_ms(esmd_now_ms(), ts);
    esmd_buf_printf(&b, "{\"time\":\"%s\",\"condition\":", ts);
    put_str_or_null(&b, inf->condition);
    esmd_buf_printf(&b, ",\"attempts\":%d,\"invocations\":%d,\"status_code\":", inf->attempts,
                    inf->invokes);
    if (inf->last_status >= 0)
        esmd_buf_printf(&b, "%ld", inf->last_status);
    else
        esmd_buf_puts(&b, "null");
    esmd_buf_puts(&b, ",\"function_error\":");
    put_str_or_null(&b, inf->last_function_error);
    esmd_buf_puts(&b, ",\"error\":");
    put_str_or_null(&b, inf->last_error);
    esmd_buf_puts(&b, ",\"request_id\":");
    put_str_or_null(&b, inf->last_request_id);
    esmd_buf_puts(&b, ",\"destination\":");
    put_str_or_null(&b, map->dests ? map->on_failure : NULL);
    /* the on-failure record (with the record as a one-record event in "payload") */
    esmd_buf_printf(&b, ",\"record_bytes\":%zu,\"record\":", len);
    if (len <= ESMD_WATCH_RECORD_MAX)
        esmd_buf_append(&b, record_json, len);
    else
        esmd_buf_puts(&b, "null");
    esmd_buf_putc(&b, '}');
    free(w->failures[w->next_failure]);
    w->failures[w->next_failure] = esmd_buf_steal(&b, NULL);
    w->next_failure = (w->next_failure + 1) % ESMD_WATCH_FAILURES;
    if (w->nfailures < ESMD_WATCH_FAILURES)
        w->nfailures++;
}

void esmd_mapping_watch_describe(const struct esmd_mapping *map, struct esmd_buf *out)
{
    const struct esmd_mapping_watch *w = map->watch;
    size_t retrying = 0;

    for (const struct inflight *inf = map->inflight; inf; inf = inf->next)
        retrying += inf->attempts > 0 || inf->throttles > 0 || inf->next_part_is_retry;
    if (w->nsamples > 0) {
        const struct watch_sample *s =
            &w->samples[(w->next + ESMD_WATCH_SAMPLES - 1) % ESMD_WATCH_SAMPLES];
        esmd_buf_printf(out, ",\"records_per_second\":%.3f", s->polled_ps);
    } else {
        esmd_buf_puts(out, ",\"records_per_second\":null");
    }
    esmd_buf_printf(out, ",\"retries_under_way\":%zu", retrying);
}

void esmd_mapping_history_json(const struct esmd_mapping *map, struct esmd_buf *out)
{
    const struct esmd_mapping_watch *w = map->watch;
    size_t first = (w->next + ESMD_WATCH_SAMPLES - w->nsamples) % ESMD_WATCH_SAMPLES;

    esmd_buf_printf(out, "{\"interval_ms\":%lld,\"samples\":[", (long long)w->interval_ms);
    for (size_t i = 0; i < w->nsamples; i++) {
        const struct watch_sample *s = &w->samples[(first + i) % ESMD_WATCH_SAMPLES];
        esmd_buf_printf(out, "%s{\"time\":%lld,\"lag\":", i ? "," : "", (long long)s->time_ms);
        if (s->lag >= 0)
            esmd_buf_printf(out, "%lld", (long long)s->lag);
        else
            esmd_buf_puts(out, "null");
        esmd_buf_printf(out,
                        ",\"records_per_second\":%.3f,\"invoked_per_second\":%.3f,"
                        "\"failed_per_second\":%.3f,\"inflight_batches\":%zu,"
                        "\"pending_records\":%zu}",
                        s->polled_ps, s->invoked_ps, s->failed_ps, s->inflight, s->pending);
    }
    esmd_buf_puts(out, "]}");
}

void esmd_mapping_failures_json(const struct esmd_mapping *map, struct esmd_buf *out)
{
    const struct esmd_mapping_watch *w = map->watch;

    esmd_buf_puts(out, "{\"failures\":[");
    for (size_t i = 0; i < w->nfailures; i++) { /* newest first */
        size_t k = (w->next_failure + ESMD_WATCH_FAILURES - 1 - i) % ESMD_WATCH_FAILURES;
        if (i)
            esmd_buf_putc(out, ',');
        esmd_buf_puts(out, w->failures[k]);
    }
    esmd_buf_puts(out, "]}");
}
