/* The mapping's pure pieces: the batchItemFailures parser of partial batch responses
 * (src/mapping_failure.c) and the one Retry-After clamp (esmd_invoke_retry_delay); and the host
 * side of the connector interface: shard handles and the count of records the core holds. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "../../src/mapping_private.h"
#include "esmd/invoke.h"
#include "esmd/metrics.h"

#include "esmd/config.h"

#include <cJSON.h>
#include <ev.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* A part of three records whose identifiers are "a", "b", "c" (as pgqueue's messageIds). */
static const char *const ids[] = {"a", "b", "c"};

static bool str_item_is(void *ctx, size_t i, const cJSON *id)
{
    (void)ctx;
    return cJSON_IsString(id) && strcmp(id->valuestring, ids[i]) == 0;
}

static enum esmd_item_failures parse(const char *body, bool failed[3], const char **why)
{
    memset(failed, 0, 3 * sizeof(*failed));
    *why = NULL;
    return esmd_mapping_parse_item_failures(body, strlen(body), 3, str_item_is, NULL, failed, why);
}

static void test_no_failure(void **state)
{
    static const char *const bodies[] = {
        "",
        " \r\n\t",
        "null",
        "{}",
        "[]",
        "\"x\"",
        "42",
        "{\"batchItemFailures\":null}",
        "{\"batchItemFailures\":[]}",
        "{\"other\":[{\"itemIdentifier\":\"zz\"}]}",
        "{\"BatchItemFailures\":{}}", /* the key is case-sensitive */
    };
    for (size_t k = 0; k < ESMD_ARRAY_LEN(bodies); k++) {
        bool failed[3];
        const char *why;
        if (parse(bodies[k], failed, &why) != ESMD_ITEMS_NONE)
            fail_msg("%s: not a success", bodies[k]);
        assert_false(failed[0] || failed[1] || failed[2]);
        assert_null(why);
    }
}

static void test_some_failed(void **state)
{
    bool failed[3];
    const char *why;
    assert_int_equal(parse("{\"batchItemFailures\":[{\"itemIdentifier\":\"b\"}]}", failed, &why),
                     ESMD_ITEMS_SOME);
    assert_false(failed[0]);
    assert_true(failed[1]);
    assert_false(failed[2]);
    /* named twice, and with other members around */
    assert_int_equal(parse(" {\"x\":1,\"batchItemFailures\":[{\"itemIdentifier\":\"c\",\"y\":2},"
                           "{\"itemIdentifier\":\"a\"},{\"itemIdentifier\":\"c\"}]}\n",
                           failed, &why),
                     ESMD_ITEMS_SOME);
    assert_true(failed[0]);
    assert_false(failed[1]);
    assert_true(failed[2]);
}

static void test_unusable(void **state)
{
    static const struct {
        const char *body;
        const char *why;
    } cases[] = {
        {"not json", "the response is not JSON"},
        {"{\"batchItemFailures\":", "the response is not JSON"},
        {"{\"batchItemFailures\":{}}", "batchItemFailures is not a list"},
        {"{\"batchItemFailures\":\"a\"}", "batchItemFailures is not a list"},
        {"{\"batchItemFailures\":[{\"itemIdentifier\":\"zz\"}]}", "an itemIdentifier"},
        {"{\"batchItemFailures\":[{\"itemIdentifier\":\"\"}]}", "an itemIdentifier"},
        {"{\"batchItemFailures\":[{\"itemIdentifier\":null}]}", "an itemIdentifier"},
        {"{\"batchItemFailures\":[{}]}", "an itemIdentifier"},
        {"{\"batchItemFailures\":[\"a\"]}", "an itemIdentifier"},
        {"{\"batchItemFailures\":[{\"itemIdentifier\":\"a\"},{\"itemIdentifier\":\"d\"}]}",
         "an itemIdentifier"},
    };
    for (size_t k = 0; k < ESMD_ARRAY_LEN(cases); k++) {
        bool failed[3];
        const char *why;
        if (parse(cases[k].body, failed, &why) != ESMD_ITEMS_BAD)
            fail_msg("%s: not refused", cases[k].body);
        assert_non_null(why);
        if (strncmp(why, cases[k].why, strlen(cases[k].why)) != 0)
            fail_msg("%s: %s", cases[k].body, why);
    }
}

/* Only `len` bytes are read; without a matcher no identifier names a record. */
static void test_bounds(void **state)
{
    bool failed[3] = {false, false, false};
    const char *why = NULL;
    const char *body = "{}{\"batchItemFailures\":[{\"itemIdentifier\":\"a\"}]}";
    assert_int_equal(esmd_mapping_parse_item_failures(body, 2, 3, str_item_is, NULL, failed, &why),
                     ESMD_ITEMS_NONE);
    assert_int_equal(
        esmd_mapping_parse_item_failures(body + 2, strlen(body + 2), 3, NULL, NULL, failed, &why),
        ESMD_ITEMS_BAD);
    assert_int_equal(esmd_mapping_parse_item_failures("  ", 0, 3, NULL, NULL, failed, &why),
                     ESMD_ITEMS_NONE);
}

static int64_t delay(int64_t retry_after_ms, int64_t backoff_ms, int64_t cap_ms)
{
    struct esmd_invoke_result res = {.outcome = ESMD_INVOKE_THROTTLED,
                                     .retry_after_ms = retry_after_ms};
    return esmd_invoke_retry_delay(&res, backoff_ms, cap_ms);
}

static void test_retry_after_clamp(void **state)
{
    assert_int_equal(delay(-1, 300, 300000), 300);          /* no Retry-After: the backoff */
    assert_int_equal(delay(0, 300, 300000), 300);           /* "0": never sooner than the backoff */
    assert_int_equal(delay(100, 300, 300000), 300);         /* shorter than the backoff */
    assert_int_equal(delay(5000, 300, 300000), 5000);       /* longer: honoured */
    assert_int_equal(delay(300000, 300, 300000), 300000);   /* up to the cap */
    assert_int_equal(delay(86400000, 300, 300000), 300000); /* past it: the cap */
    assert_int_equal(delay(20000, 8000, 10000), 10000);     /* the async queue's cap */
}

/* A mapping of a Redis source that is never started: its host API is driven by hand. Redis
 * records are one malloc'd block, so plain esmd_records stand in for them. */
static const char host_yaml[] =
    "postgres: \"host=127.0.0.1\"\n"
    "connections: { r: { type: redis, url: \"redis://127.0.0.1:9\" } }\n"
    "functions: { fn: { url: \"http://127.0.0.1:9/\" } }\n"
    "mappings: [{ name: m, function: fn, source: { redis: r, stream: s, group: g } }]\n";

static struct esmd_record *new_rec(int64_t seq)
{
    struct esmd_record *rec = calloc(1, sizeof(*rec));
    rec->seq = seq;
    rec->size = 10;
    rec->timestamp_ms = esmd_now_ms();
    return rec;
}

/* The host_yaml mapping on a loop of its own (not started). */
struct host_env {
    struct esmd_config *cfg;
    struct ev_loop *loop;
    struct esmd_invoker *inv;
};

static struct esmd_mapping *host_env_new(struct host_env *e)
{
    struct esmd_config_errors errs;
    esmd_config_errors_init(&errs);
    e->cfg = esmd_config_parse(host_yaml, strlen(host_yaml), "t.yaml", &errs);
    esmd_config_errors_free(&errs);
    assert_non_null(e->cfg);
    e->loop = ev_loop_new(EVFLAG_AUTO);
    char err[256] = "";
    e->inv = esmd_invoker_new(e->loop, err, sizeof(err));
    assert_non_null(e->inv);
    assert_non_null(esmd_invoker_add_function(e->inv, &e->cfg->functions[0]));
    struct esmd_mapping *map =
        esmd_mapping_new(e->loop, &e->cfg->mappings[0], e->inv, "t", err, sizeof(err));
    if (!map)
        fail_msg("%s", err);
    return map;
}

/* After esmd_mapping_free. */
static void host_env_free(struct host_env *e)
{
    esmd_invoker_free(e->inv);
    ev_loop_destroy(e->loop);
    esmd_config_free(e->cfg);
}

static void test_host_counts_records(void **state)
{
    struct host_env env;
    struct esmd_mapping *map = host_env_new(&env);
    const struct esmd_host *host = &map->host;

    /* the handle is opaque to the connector: key and priv through the accessors */
    int priv;
    struct esmd_shard *shard = host->shard_open(host->core, "s@g", 2, &priv);
    assert_string_equal(esmd_shard_key(shard), "s@g");
    assert_ptr_equal(esmd_shard_priv(shard), &priv);
    for (int i = 0; i < 5; i++)
        host->emit(host->core, shard, new_rec(i));
    assert_int_equal(map->nheld, 5);
    /* a revoked shard's pending records go back at once */
    host->shard_close(host->core, shard);
    assert_int_equal(map->nheld, 0);

    /* records still held when the mapping is freed go back before the connector is destroyed
     * (ASan sees a leak or a use after free otherwise) */
    shard = host->shard_open(host->core, "s@g", 2, NULL);
    for (int i = 0; i < 3; i++)
        host->emit(host->core, shard, new_rec(i));
    assert_int_equal(map->nheld, 3);
    esmd_mapping_free(map);
    host_env_free(&env);
}

static void on_guard(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)revents;
    *(bool *)w->data = true;
    ev_break(loop, EVBREAK_ALL);
}

/* A mapping freed with a record the core still counts as held (a bug elsewhere: the connector
 * cannot be destroyed the usual way) stops its connector all the same: none of the connector's
 * watchers stays armed to call into the freed mapping (the loop has nothing left to run). */
static void test_free_with_a_record_out_disarms_the_connector(void **state)
{
    (void)state;
    struct host_env env;
    struct esmd_mapping *map = host_env_new(&env);
    struct ev_loop *loop = env.loop;
    assert_int_equal(esmd_mapping_start(map), ESMD_OK); /* connects to a closed port: retries */
    for (int i = 0; i < 20; i++)
        ev_run(loop, EVRUN_NOWAIT);
    map->nheld++; /* a record the core lost track of */
    esmd_mapping_free(map);
    bool timed_out = false;
    ev_timer guard;
    ev_timer_init(&guard, on_guard, 3.0, 0.0);
    guard.data = &timed_out;
    ev_timer_start(loop, &guard);
    ev_unref(loop); /* the guard alone does not keep the loop running */
    ev_run(loop, 0);
    ev_ref(loop);
    ev_timer_stop(loop, &guard);
    assert_false(timed_out);
    host_env_free(&env);
}

/* The console's rings (src/mapping_watch.c) stay bounded: ESMD_WATCH_SAMPLES samples, oldest
 * first, and ESMD_WATCH_FAILURES given-up records, newest first, each record cut at
 * ESMD_WATCH_RECORD_MAX bytes. */
static void test_watch_rings_are_bounded(void **state)
{
    (void)state;
    struct host_env env;
    struct esmd_mapping *map = host_env_new(&env);

    int64_t t0 = esmd_now_ms();
    for (int i = 1; i <= ESMD_WATCH_SAMPLES + 20; i++) {
        esmd_series_inc(map->m.polled, 5 * ESMD_WATCH_INTERVAL_MS / 1000); /* 5 records/s */
        esmd_mapping_watch_tick(map, i, t0 + (int64_t)i * ESMD_WATCH_INTERVAL_MS);
        /* a tick before the interval is up takes no sample */
        esmd_mapping_watch_tick(map, -1, t0 + (int64_t)i * ESMD_WATCH_INTERVAL_MS + 1000);
    }
    struct esmd_buf b = ESMD_BUF_INIT;
    esmd_mapping_history_json(map, &b);
    cJSON *h = cJSON_Parse(esmd_buf_cstr(&b));
    assert_non_null(h);
    cJSON *samples = cJSON_GetObjectItem(h, "samples");
    assert_int_equal(cJSON_GetArraySize(samples), ESMD_WATCH_SAMPLES);
    /* the oldest kept is sample 21 (the first 20 were overwritten), the newest the last */
    assert_int_equal(cJSON_GetObjectItem(cJSON_GetArrayItem(samples, 0), "lag")->valueint, 21);
    assert_int_equal(
        cJSON_GetObjectItem(cJSON_GetArrayItem(samples, ESMD_WATCH_SAMPLES - 1), "lag")->valueint,
        ESMD_WATCH_SAMPLES + 20);
    assert_float_equal(
        cJSON_GetObjectItem(cJSON_GetArrayItem(samples, 5), "records_per_second")->valuedouble, 5,
        1e-9);
    cJSON_Delete(h);

    struct inflight inf = {
        .map = map, .condition = "RetryAttemptsExhausted", .attempts = 3, .last_status = -1};
    char big[ESMD_WATCH_RECORD_MAX + 10];
    memset(big, 'x', sizeof(big));
    big[0] = '"';
    big[sizeof(big) - 1] = '"';
    for (int i = 0; i < ESMD_WATCH_FAILURES + 5; i++) {
        char rec[32];
        snprintf(rec, sizeof(rec), "{\"n\":%d}", i);
        if (i == ESMD_WATCH_FAILURES + 4)
            esmd_mapping_watch_failure(&inf, big, sizeof(big));
        else
            esmd_mapping_watch_failure(&inf, rec, strlen(rec));
    }
    esmd_buf_reset(&b);
    esmd_mapping_failures_json(map, &b);
    cJSON *f = cJSON_Parse(esmd_buf_cstr(&b));
    assert_non_null(f);
    cJSON *list = cJSON_GetObjectItem(f, "failures");
    assert_int_equal(cJSON_GetArraySize(list), ESMD_WATCH_FAILURES);
    cJSON *newest = cJSON_GetArrayItem(list, 0), *second = cJSON_GetArrayItem(list, 1);
    assert_true(cJSON_IsNull(cJSON_GetObjectItem(newest, "record"))); /* over the cap */
    assert_int_equal(cJSON_GetObjectItem(newest, "record_bytes")->valueint, (int)sizeof(big));
    assert_int_equal(cJSON_GetObjectItem(cJSON_GetObjectItem(second, "record"), "n")->valueint,
                     ESMD_WATCH_FAILURES + 3);
    assert_int_equal(
        cJSON_GetObjectItem(cJSON_GetArrayItem(list, ESMD_WATCH_FAILURES - 1), "record")
            ->child->valueint,
        5);
    assert_string_equal(cJSON_GetObjectItem(second, "condition")->valuestring,
                        "RetryAttemptsExhausted");
    assert_true(cJSON_IsNull(cJSON_GetObjectItem(second, "status_code")));
    cJSON_Delete(f);
    esmd_buf_free(&b);

    esmd_mapping_free(map);
    host_env_free(&env);
}

/* The commit watermark of a shard with lanes (docs/design.md#lanes): the lowest unfinished seq
 * over the lanes, or one past the highest emitted when none is unfinished; it only moves up. */
static void test_watermark(void **state)
{
    (void)state;
    struct esmd_shard *p = esmd_shard_new("t-0", 2, NULL);
    assert_int_equal(p->nlanes, 1);
    assert_int_equal(esmd_shard_watermark(p), -1); /* nothing emitted */
    esmd_shard_set_lanes(p, 3);
    assert_int_equal(p->nlanes, 3);
    assert_ptr_equal(p->lanes[0], p);
    struct esmd_shard *a = p->lanes[0], *b = p->lanes[1], *c = p->lanes[2];
    assert_ptr_equal(b->parent, p);
    assert_string_equal(esmd_shard_key(c), "t-0");
    /* seqs 10..15: a gets 10, 13; b gets 11, 14; c gets 12, 15 */
    struct esmd_shard *lane_of_seq[] = {a, b, c, a, b, c};
    for (int i = 0; i < 6; i++)
        esmd_lane_emitted(lane_of_seq[i], 10 + i);
    assert_int_equal(esmd_shard_watermark(p), 10);
    /* later lanes finish first: the watermark stays at the lowest unfinished record */
    assert_int_equal(esmd_lane_finish(b, 15), -1);
    assert_int_equal(esmd_lane_finish(c, 16), -1);
    assert_int_equal(esmd_shard_watermark(p), 10);
    /* a finishes 10: 13 is a's next unfinished, the lowest */
    assert_int_equal(esmd_lane_finish(a, 11), 13);
    assert_false(esmd_shard_drained(p));
    /* all finished: one past the highest emitted */
    assert_int_equal(esmd_lane_finish(a, 14), 16);
    assert_true(esmd_shard_drained(p));
    /* a finish that moves nothing returns -1; the watermark never goes back */
    assert_int_equal(esmd_lane_finish(a, 14), -1);
    esmd_lane_emitted(b, 16);
    assert_int_equal(esmd_shard_watermark(p), 16);
    assert_int_equal(esmd_lane_finish(b, 17), 17);
    /* many records through one lane (the queue grows and wraps) */
    for (int i = 17; i < 1000; i++)
        esmd_lane_emitted(c, i);
    assert_int_equal(esmd_lane_finish(c, 500), 500);
    for (int i = 1000; i < 1100; i++)
        esmd_lane_emitted(c, i);
    assert_int_equal(esmd_shard_watermark(p), 500);
    assert_int_equal(esmd_lane_finish(c, 1100), 1100);
    /* back to one lane */
    esmd_shard_set_lanes(p, 1);
    assert_int_equal(p->nlanes, 1);
    esmd_shard_free(p);
}

/* Lanes by key: FNV-1a of the key, stable; keyless records by position. */
static void test_lane_index(void **state)
{
    (void)state;
    assert_int_equal(esmd_lane_index("k", 1, 7, 1), 0);
    /* FNV-1a 32 of "a" is 0xe40c292c */
    assert_int_equal(esmd_lane_index("a", 1, 0, 10), (int)(0xe40c292cu % 10));
    assert_int_equal(esmd_lane_index("a", 1, 999, 10), esmd_lane_index("a", 1, 3, 10));
    assert_int_equal(esmd_lane_index(NULL, 0, 13, 4), 1);
    assert_int_equal(esmd_lane_index(NULL, 0, 16, 4), 0);
    int seen[8] = {0};
    char key[16];
    for (int i = 0; i < 800; i++) {
        int n = snprintf(key, sizeof(key), "key-%d", i);
        seen[esmd_lane_index(key, (size_t)n, 0, 8)]++;
    }
    for (int i = 0; i < 8; i++)
        assert_true(seen[i] > 50); /* every lane gets a share */
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_no_failure),
        cmocka_unit_test(test_some_failed),
        cmocka_unit_test(test_unusable),
        cmocka_unit_test(test_bounds),
        cmocka_unit_test(test_retry_after_clamp),
        cmocka_unit_test(test_host_counts_records),
        cmocka_unit_test(test_free_with_a_record_out_disarms_the_connector),
        cmocka_unit_test(test_watch_rings_are_bounded),
        cmocka_unit_test(test_watermark),
        cmocka_unit_test(test_lane_index),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
