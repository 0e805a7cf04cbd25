/* Unit tests for src/config.c: good files round-trip to the expected structs; every bad file in
 * tests/unit/data/config/bad/NAME.yaml gives exactly the lines in NAME.err; durations, sizes,
 * ${VAR}, filters as JSON, and the key tables against schemas/config.schema.json. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "testutil.h"

#include "esmd/buf.h"
#include "esmd/config.h"
#include "esmd/connector.h"

#include <cJSON.h>
#include <dirent.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define CONFIG_DATA "tests/unit/data/config" /* relative to the repo root */

/* ---- helpers ---- */

/* All errors formatted, one per line, each ending in '\n'. Caller frees. */
static char *format_errors(const struct esmd_config_errors *errs)
{
    struct esmd_buf b = ESMD_BUF_INIT;
    for (size_t i = 0; i < errs->n; i++) {
        char line[8192];
        esmd_config_error_format(&errs->items[i], line, sizeof(line));
        esmd_buf_printf(&b, "%s\n", line);
    }
    return esmd_buf_steal(&b, NULL);
}

static struct esmd_config *parse_str(const char *text, unsigned flags,
                                     struct esmd_config_errors *errs)
{
    return esmd_config_parse_flags(text, strlen(text), "test.yaml", flags, errs);
}

/* Parses text, expects failure and exactly `expected` (lines joined by '\n', no final one). */
static void expect_errors(const char *text, unsigned flags, const char *expected)
{
    struct esmd_config_errors errs;
    esmd_config_errors_init(&errs);
    struct esmd_config *cfg = parse_str(text, flags, &errs);
    assert_null(cfg);
    char *got = format_errors(&errs);
    struct esmd_buf want = ESMD_BUF_INIT;
    esmd_buf_printf(&want, "%s\n", expected);
    assert_string_equal(got, esmd_buf_cstr(&want));
    esmd_buf_free(&want);
    free(got);
    esmd_config_errors_free(&errs);
}

static struct esmd_config *expect_ok(const char *text, unsigned flags)
{
    struct esmd_config_errors errs;
    esmd_config_errors_init(&errs);
    struct esmd_config *cfg = parse_str(text, flags, &errs);
    if (!cfg) {
        char *got = format_errors(&errs);
        fail_msg("unexpected errors:\n%s", got);
    }
    esmd_config_errors_free(&errs);
    return cfg;
}

static struct esmd_config *load_good(const char *name, unsigned flags)
{
    char path[512];
    snprintf(path, sizeof(path), CONFIG_DATA "/good/%s", name);
    char *text = esmd_test_read_file(path, NULL);
    assert_non_null(text);
    struct esmd_config_errors errs;
    esmd_config_errors_init(&errs);
    struct esmd_config *cfg = esmd_config_parse_flags(text, strlen(text), path, flags, &errs);
    if (!cfg) {
        char *got = format_errors(&errs);
        fail_msg("%s:\n%s", path, got);
    }
    free(text);
    esmd_config_errors_free(&errs);
    return cfg;
}

static const char *kv_get(const struct esmd_kvlist *l, const char *key)
{
    for (size_t i = 0; i < l->n; i++)
        if (!strcmp(l->items[i].key, key))
            return l->items[i].value;
    return NULL;
}

/* ---- good files ---- */

static void test_good_full(void **state)
{
    (void)state;
    struct esmd_config *cfg = load_good("full.yaml", ESMD_CONFIG_ALLOW_UNBUILT);

    assert_string_equal(cfg->path, CONFIG_DATA "/good/full.yaml");
    assert_string_equal(cfg->postgres, "postgresql://esmd:esmd@localhost:5432/esmd");
    assert_string_equal(cfg->aws.region, "eu-central-2");
    assert_string_equal(cfg->aws.account_id, "123456789012");
    assert_string_equal(cfg->admin.listen, "[::1]:9100");
    assert_string_equal(cfg->admin.token, "s3cret-token");
    assert_string_equal(cfg->admin.access_key_id, "esmd-admin");
    assert_string_equal(cfg->admin.secret_access_key, "aws-secret");
    const struct esmd_async_queue_cfg *aq = &cfg->async_queue;
    assert_int_equal(aq->retry_base_ms, 300);
    assert_int_equal(aq->backoff_base_ms, 100);
    assert_int_equal(aq->backoff_cap_ms, 120000);
    assert_int_equal(aq->poll_ms, 50);
    assert_int_equal(aq->lease_ms, 90000);
    assert_int_equal(aq->max_payload, 256 * 1024);
    assert_false(aq->workers);
    assert_int_equal(aq->insert_connections, 4);

    assert_int_equal(cfg->nconnections, 2);
    const struct esmd_conn_cfg *k = esmd_config_connection(cfg, "main-kafka");
    assert_non_null(k);
    assert_int_equal(k->type, ESMD_CONN_KAFKA);
    assert_string_equal(k->bootstrap_servers, "localhost:9092,localhost:9093");
    assert_int_equal(k->properties.n, 3);
    assert_string_equal(k->properties.items[0].key, "security.protocol");
    assert_string_equal(kv_get(&k->properties, "security.protocol"), "plaintext");
    assert_string_equal(kv_get(&k->properties, "fetch.wait.max.ms"), "100");
    assert_string_equal(kv_get(&k->properties, "enable.idempotence"), "true");
    assert_null(k->url);
    const struct esmd_conn_cfg *r = esmd_config_connection(cfg, "main-redis");
    assert_non_null(r);
    assert_int_equal(r->type, ESMD_CONN_REDIS);
    assert_string_equal(r->url, "redis://localhost:6379/0");
    assert_null(esmd_config_connection(cfg, "nope"));

    assert_int_equal(cfg->nfunctions, 2);
    const struct esmd_function_cfg *fn = esmd_config_function(cfg, "orders");
    assert_non_null(fn);
    assert_string_equal(fn->url, "http://localhost:8080/2015-03-31/functions/function/invocations");
    assert_int_equal(fn->timeout_ms, 45000);
    assert_int_equal(fn->max_concurrency, 25);
    assert_int_equal(fn->headers.n, 2);
    assert_string_equal(kv_get(&fn->headers, "Authorization"), "Bearer s3cret-token");
    assert_string_equal(kv_get(&fn->headers, "X-Literal"), "${NOT_EXPANDED}");
    assert_true(fn->async.set);
    assert_int_equal(fn->async.maximum_retry_attempts, 1);
    assert_int_equal(fn->async.maximum_event_age_ms, 90000);
    assert_string_equal(fn->async.on_success, "redis://main-redis/orders-done");
    assert_string_equal(fn->async.on_failure, "function://orders-failed");
    assert_string_equal(fn->async.dead_letter, "pgqueue://orders_dlq");
    const struct esmd_function_cfg *fn2 = esmd_config_function(cfg, "orders-failed");
    assert_non_null(fn2);
    assert_string_equal(fn2->url, "https://example.com/failed");
    assert_int_equal(fn2->timeout_ms, 30000); /* defaults */
    assert_int_equal(fn2->max_concurrency, 10);
    assert_int_equal(fn2->headers.n, 0);
    assert_false(fn2->async.set);
    assert_int_equal(fn2->async.maximum_retry_attempts, 2);
    assert_int_equal(fn2->async.maximum_event_age_ms, 6 * 3600 * 1000);
    assert_null(fn2->async.on_success);

    assert_int_equal(cfg->nmappings, 5);
    const struct esmd_mapping_cfg *m = &cfg->mappings[0];
    assert_string_equal(m->name, "orders-from-kafka");
    assert_string_equal(m->function, "orders");
    assert_ptr_equal(m->fn, fn);
    assert_false(m->enabled);
    assert_int_equal(m->kind, ESMD_SOURCE_KAFKA);
    assert_string_equal(m->kafka.connection, "main-kafka");
    assert_ptr_equal(m->kafka.conn, k);
    assert_int_equal(m->kafka.ntopics, 2);
    assert_string_equal(m->kafka.topics[0], "orders");
    assert_string_equal(m->kafka.topics[1], "orders.v2");
    assert_string_equal(m->kafka.consumer_group, "orders-group");
    assert_int_equal(m->kafka.starting_position, ESMD_START_LATEST);
    assert_int_equal(m->batch_size, 500);
    assert_int_equal(m->maximum_batching_window_ms, 2000);
    assert_int_equal(m->nfilters, 2);
    assert_string_equal(m->filters[0].pattern,
                        "{\"value\":{\"type\":[\"order_created\"],\"amount\":[{\"numeric\":[\">\","
                        "1.5,\"<=\",2.50]}]}}");
    assert_int_equal(m->filters[0].line, 49);
    assert_int_equal(m->filters[0].col, 9);
    assert_string_equal(m->filters[1].pattern,
                        "{\"value\":{\"flag\":[true,null,\"true\",\"42\",7e3]}}");
    assert_int_equal(m->filters[1].line, 50);
    assert_int_equal(m->maximum_retry_attempts, 10);
    assert_int_equal(m->maximum_record_age_ms, 3600 * 1000);
    assert_true(m->bisect_batch_on_function_error);
    assert_true(m->report_batch_item_failures);
    assert_string_equal(m->on_failure, "kafka://main-kafka/orders-failed");

    m = &cfg->mappings[1];
    assert_string_equal(m->name, "orders.replay");
    assert_true(m->enabled);
    assert_int_equal(m->kafka.ntopics, 1);
    assert_string_equal(m->kafka.topics[0], "orders");
    assert_string_equal(m->kafka.consumer_group, "esmd-orders.replay");
    assert_int_equal(m->kafka.starting_position, ESMD_START_AT_TIMESTAMP);
    assert_int_equal(m->kafka.starting_position_timestamp_ms, 1700000000000LL);
    assert_int_equal(m->batch_size, 100);
    assert_int_equal(m->maximum_batching_window_ms, 500);
    assert_int_equal(m->nfilters, 0);
    assert_int_equal(m->maximum_retry_attempts, -1);
    assert_int_equal(m->maximum_record_age_ms, -1);
    assert_false(m->bisect_batch_on_function_error);
    assert_false(m->report_batch_item_failures);
    assert_null(m->on_failure);

    m = &cfg->mappings[2];
    assert_string_equal(m->name, "jobs-from-redis");
    assert_ptr_equal(m->fn, fn2);
    assert_int_equal(m->kind, ESMD_SOURCE_REDIS);
    assert_string_equal(m->redis.connection, "main-redis");
    assert_ptr_equal(m->redis.conn, r);
    assert_string_equal(m->redis.stream, "jobs");
    assert_string_equal(m->redis.group, "esmd");
    assert_string_equal(m->redis.consumer, "worker-1");
    assert_int_equal(m->redis.starting_position, ESMD_START_LATEST);
    assert_int_equal(m->redis.visibility_timeout_ms, 120000);
    assert_int_equal(m->redis.event_format, ESMD_REDIS_EVENT_KINESIS);
    assert_string_equal(m->redis.data_field, "payload");
    assert_string_equal(m->redis.partition_key_field, "tenant");
    assert_int_equal(m->batch_size, 50);
    assert_int_equal(m->maximum_batching_window_ms, 0);
    assert_string_equal(m->on_failure, "http://localhost:9999/failed");

    m = &cfg->mappings[3];
    assert_string_equal(m->name, "mail_from_pg");
    assert_int_equal(m->kind, ESMD_SOURCE_PGQUEUE);
    assert_string_equal(m->pgqueue.queue, "mail");
    assert_null(m->pgqueue.connection);
    assert_int_equal(m->pgqueue.visibility_timeout_ms, 30000);
    assert_int_equal(m->pgqueue.max_receive_count, 0);
    assert_null(m->pgqueue.dead_letter_queue);
    assert_int_equal(m->pgqueue.maximum_concurrency, 2);
    assert_int_equal(m->batch_size, 10);
    assert_int_equal(m->maximum_batching_window_ms, 0);
    assert_null(m->on_failure);

    m = &cfg->mappings[4];
    assert_string_equal(m->pgqueue.queue, "mail2");
    assert_string_equal(m->pgqueue.connection, "postgresql://other/db");
    assert_int_equal(m->pgqueue.visibility_timeout_ms, 12 * 3600 * 1000);
    assert_int_equal(m->pgqueue.max_receive_count, 5);
    assert_string_equal(m->pgqueue.dead_letter_queue, "mail2_dlq");
    assert_int_equal(m->pgqueue.maximum_concurrency, 20);
    assert_int_equal(m->maximum_batching_window_ms, 0);

    esmd_config_free(cfg);
}

static void test_good_minimal_defaults(void **state)
{
    (void)state;
    struct esmd_config *cfg = load_good("minimal.yaml", 0);
    assert_string_equal(cfg->aws.region, "us-east-1");
    assert_string_equal(cfg->aws.account_id, "000000000000");
    assert_string_equal(cfg->admin.listen, "127.0.0.1:9000");
    assert_null(cfg->admin.token);
    assert_null(cfg->admin.access_key_id);
    assert_null(cfg->admin.secret_access_key);
    const struct esmd_async_queue_cfg *aq = &cfg->async_queue;
    assert_int_equal(aq->retry_base_ms, 60000);
    assert_int_equal(aq->backoff_base_ms, 1000);
    assert_int_equal(aq->backoff_cap_ms, 300000);
    assert_int_equal(aq->poll_ms, 1000);
    assert_int_equal(aq->lease_ms, -1);
    assert_int_equal(aq->max_payload, 1048576);
    assert_true(aq->workers);
    assert_int_equal(aq->insert_connections, 2);
    assert_int_equal(cfg->connections[0].properties.n, 0);
    const struct esmd_function_cfg *fn = &cfg->functions[0];
    assert_int_equal(fn->timeout_ms, 30000);
    assert_int_equal(fn->max_concurrency, 10);
    assert_false(fn->async.set);
    const struct esmd_mapping_cfg *m = &cfg->mappings[0];
    assert_true(m->enabled);
    assert_int_equal(m->kind, ESMD_SOURCE_KAFKA);
    assert_string_equal(m->kafka.consumer_group, "esmd-m");
    assert_int_equal(m->kafka.starting_position, ESMD_START_TRIM_HORIZON);
    assert_int_equal(m->batch_size, 100);
    assert_int_equal(m->maximum_batching_window_ms, 500);
    assert_int_equal(m->nfilters, 0);
    assert_int_equal(m->maximum_retry_attempts, -1);
    assert_int_equal(m->maximum_record_age_ms, -1);
    assert_false(m->bisect_batch_on_function_error);
    assert_false(m->report_batch_item_failures);
    assert_null(m->on_failure);
    esmd_config_free(cfg);
}

/* Every good file but full.yaml (which uses features not built yet) loads as esmd run would. */
static void test_good_files_load(void **state)
{
    (void)state;
    DIR *d = opendir(CONFIG_DATA "/good");
    assert_non_null(d);
    struct dirent *de;
    int n = 0;
    while ((de = readdir(d)) != NULL) {
        size_t len = strlen(de->d_name);
        if (len < 5 || strcmp(de->d_name + len - 5, ".yaml") != 0)
            continue;
        char path[512];
        snprintf(path, sizeof(path), CONFIG_DATA "/good/%s", de->d_name);
        bool unbuilt = !strcmp(de->d_name, "full.yaml");
        struct esmd_config_errors errs;
        esmd_config_errors_init(&errs);
        struct esmd_config *cfg = NULL;
        if (unbuilt) {
            char *text = esmd_test_read_file(path, NULL);
            cfg =
                esmd_config_parse_flags(text, strlen(text), path, ESMD_CONFIG_ALLOW_UNBUILT, &errs);
            free(text);
        } else {
            cfg = esmd_config_load(path, &errs);
        }
        if (!cfg) {
            char *got = format_errors(&errs);
            fail_msg("%s:\n%s", path, got);
        }
        esmd_config_free(cfg);
        esmd_config_errors_free(&errs);
        n++;
    }
    closedir(d);
    assert_true(n >= 4);
}

/* ---- bad files: NAME.yaml gives exactly the lines of NAME.err ---- */

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static void test_bad_files(void **state)
{
    (void)state;
    DIR *d = opendir(CONFIG_DATA "/bad");
    assert_non_null(d);
    char *names[256];
    size_t n = 0;
    struct dirent *de;
    while ((de = readdir(d)) != NULL && n < ESMD_ARRAY_LEN(names)) {
        size_t len = strlen(de->d_name);
        if (len > 5 && strcmp(de->d_name + len - 5, ".yaml") == 0)
            names[n++] = esmd_xstrndup(de->d_name, len - 5);
    }
    closedir(d);
    qsort(names, n, sizeof(*names), cmp_str);
    assert_true(n >= 30);

    int failures = 0;
    for (size_t i = 0; i < n; i++) {
        char yaml[512], err[512];
        snprintf(yaml, sizeof(yaml), CONFIG_DATA "/bad/%s.yaml", names[i]);
        snprintf(err, sizeof(err), CONFIG_DATA "/bad/%s.err", names[i]);
        char *want = esmd_test_read_file(err, NULL);
        struct esmd_config_errors errs;
        esmd_config_errors_init(&errs);
        struct esmd_config *cfg = esmd_config_load(yaml, &errs);
        char *got = format_errors(&errs);
        if (!want) {
            print_error("%s: missing %s; the loader says:\n%s", yaml, err, got);
            failures++;
        } else if (cfg || errs.n == 0) {
            print_error("%s: loaded without errors\n", yaml);
            failures++;
        } else if (strcmp(want, got) != 0) {
            print_error("%s: expected\n%s--- got\n%s", yaml, want, got);
            failures++;
        }
        esmd_config_free(cfg);
        esmd_config_errors_free(&errs);
        free(got);
        free(want);
        free(names[i]);
    }
    assert_int_equal(failures, 0);
}

/* ---- error classes inline (exact message and position) ---- */

#define FN "functions: { f: { url: \"http://localhost/\" } }\n"
#define KAFKA "connections: { k: { type: kafka, bootstrap_servers: \"b:9092\" } }\n"

static void test_error_yaml_syntax(void **state)
{
    (void)state;
    expect_errors("postgres: x\nfunctions: {a: [1, 2}\n", 0,
                  "test.yaml:2:21: YAML syntax error: did not find expected ',' or ']' (while "
                  "parsing a flow sequence at line 2, column 16)");
    expect_errors("postgres: x\n\tfunctions: {}\n", 0,
                  "test.yaml:2:1: YAML syntax error: found a tab character that violates "
                  "indentation (while scanning a plain scalar at line 1, column 11)");
    /* Invalid UTF-8 is a reader error: the position comes from the byte offset. */
    expect_errors("postgres: x\nadmin: {token: \"\xff\"}\n", 0,
                  "test.yaml:2:17: YAML syntax error: invalid leading UTF-8 octet");
}

static void test_error_unknown_keys(void **state)
{
    (void)state;
    expect_errors("postgres: x\nadmin: { listen: \"a:1\", tokn: t }\n", 0,
                  "test.yaml:2:25: admin.tokn: unknown key \"tokn\" (allowed: listen, token, "
                  "aws_credentials, max_connections_per_client)");
    expect_errors("postgres: x\n" KAFKA FN
                  "mappings:\n  - name: m\n    function: f\n    source: { kafka: k, topics: "
                  "[t], topic: t }\n",
                  0,
                  "test.yaml:7:38: mappings[0].source.topic: unknown key \"topic\" (allowed: "
                  "kafka, topics, consumer_group, starting_position, "
                  "starting_position_timestamp, parallelization_factor, schema_registry)");
}

/* parallelization_factor: 1 to 10 on Kafka and Redis sources; a pgqueue source has none. */
static void test_parallelization_factor(void **state)
{
    (void)state;
    expect_errors("postgres: x\n" KAFKA FN
                  "mappings:\n  - name: m\n    function: f\n    source: { kafka: k, topics: "
                  "[t], parallelization_factor: 11 }\n",
                  0,
                  "test.yaml:7:62: mappings[0].source.parallelization_factor: "
                  "parallelization_factor must be an integer from 1 to 10, got 11");
    expect_errors("postgres: x\n" KAFKA FN
                  "mappings:\n  - name: m\n    function: f\n    source: { kafka: k, topics: "
                  "[t], parallelization_factor: 0 }\n",
                  0,
                  "test.yaml:7:62: mappings[0].source.parallelization_factor: "
                  "parallelization_factor must be an integer from 1 to 10, got 0");
}

static void test_error_missing_and_types(void **state)
{
    (void)state;
    expect_errors("admin: {}\n", 0, "test.yaml:1:1: missing required key \"postgres\"");
    expect_errors("", 0, "test.yaml:1:1: missing required key \"postgres\"");
    expect_errors("postgres: [a]\n", 0,
                  "test.yaml:1:11: postgres: postgres must be a string, got a list");
    expect_errors("postgres:\n", 0,
                  "test.yaml:1:10: postgres: postgres must be a string, got "
                  "nothing");
    expect_errors("postgres: x\nfunctions: { f: { url: \"http://h/\", timeout: ~ } }\n", 0,
                  "test.yaml:2:46: functions.f.timeout: timeout must be a duration from 1s to "
                  "15m, got null");
    expect_errors("postgres: x\nmappings: {}\n", 0,
                  "test.yaml:2:11: mappings: mappings must be a list, got a mapping");
}

static void test_error_ranges(void **state)
{
    (void)state;
    expect_errors("postgres: x\n" KAFKA FN
                  "mappings: [{ name: m, function: f, source: { kafka: k, topics: [t] }, "
                  "batch_size: 0 }]\n",
                  0,
                  "test.yaml:4:83: mappings[0].batch_size: batch_size must be an integer from 1 "
                  "to 10000, got 0");
    expect_errors("postgres: x\nfunctions: { f: { url: \"http://h/\", max_concurrency: 2.5 } "
                  "}\n",
                  0,
                  "test.yaml:2:54: functions.f.max_concurrency: max_concurrency must be an "
                  "integer from 1 to 10000, got 2.5");
    expect_errors("postgres: x\nfunctions: { f: { url: \"http://h/\", timeout: 30 } }\n", 0,
                  "test.yaml:2:46: functions.f.timeout: timeout needs a unit: ms, s, m or h, got "
                  "30");
    expect_errors("postgres: x\nasync_queue: { max_payload: 7MB, poll_interval: 5ms, lease: 0s, "
                  "insert_connections: 9, workers: 0 }\n",
                  0,
                  "test.yaml:2:29: async_queue.max_payload: max_payload must be an integer from "
                  "1 to 6291456, got 7MB\n"
                  "test.yaml:2:49: async_queue.poll_interval: poll_interval must be a duration "
                  "from 10ms to 60s, got 5ms\n"
                  "test.yaml:2:61: async_queue.lease: lease must be -1 or a duration from 1s to "
                  "1h, got 0s\n"
                  "test.yaml:2:85: async_queue.insert_connections: insert_connections must be an "
                  "integer from 1 to 8, got 9\n"
                  "test.yaml:2:97: async_queue.workers: workers must be true or false, got 0");
}

static void test_error_references(void **state)
{
    (void)state;
    /* No functions at all. */
    expect_errors("postgres: x\n" KAFKA
                  "mappings: [{ name: m, function: f, source: { kafka: k, topics: [t] } }]\n",
                  0,
                  "test.yaml:3:33: mappings[0].function: function \"f\" is not defined in "
                  "functions (none is defined)");
    expect_errors("postgres: x\n" FN "connections: { r: { type: redis, url: \"redis://h\" } }\n"
                  "mappings: [{ name: m, function: f, source: { kafka: r, topics: [t] } }]\n",
                  0,
                  "test.yaml:4:53: mappings[0].source.kafka: connection \"r\" is of type redis, a "
                  "kafka source needs a kafka connection");
}

static void test_error_refused_features(void **state)
{
    (void)state;
    /* function:// destinations and the async block are built: accepted without the flag. */
    const char *text = "postgres: x\n" KAFKA FN
                       "mappings: [{ name: m, function: f, source: { kafka: k, topics: [t] }, "
                       "on_failure: \"function://f\" }]\n";
    struct esmd_config *cfg = expect_ok(text, 0);
    assert_string_equal(cfg->mappings[0].on_failure, "function://f");
    esmd_config_free(cfg);
    /* The failure-handling controls are built: accepted as they are. */
    cfg = expect_ok("postgres: x\n" KAFKA FN
                    "mappings: [{ name: m, function: f, source: { kafka: k, topics: [t] }, "
                    "bisect_batch_on_function_error: true, report_batch_item_failures: true, "
                    "maximum_retry_attempts: 3, maximum_record_age: 60s, "
                    "on_failure: \"http://h/x\" }]\n",
                    0);
    assert_true(cfg->mappings[0].bisect_batch_on_function_error);
    assert_int_equal(cfg->mappings[0].maximum_retry_attempts, 3);
    esmd_config_free(cfg);
}

/* ---- ${VAR} ---- */

static void test_env_expansion(void **state)
{
    (void)state;
    /* Block style: in flow style ({...}) a plain ${VAR} is a YAML syntax error. */
    struct esmd_config *cfg =
        expect_ok("postgres: \"postgresql://${ESMD_TEST_HOST}/db?x=$$y&z=$${LITERAL}\"\n" KAFKA FN
                  "mappings:\n"
                  "  - name: m\n"
                  "    function: f\n"
                  "    source: { kafka: k, topics: [t] }\n"
                  "    batch_size: ${ESMD_TEST_BATCH}\n",
                  0);
    assert_string_equal(cfg->postgres, "postgresql://localhost/db?x=$$y&z=${LITERAL}");
    assert_int_equal(cfg->mappings[0].batch_size, 250);
    esmd_config_free(cfg);

    /* Quoted, the value is a string, which an integer key refuses. */
    expect_errors("postgres: x\n" KAFKA FN
                  "mappings: [{ name: m, function: f, source: { kafka: k, topics: [t] }, "
                  "batch_size: \"${ESMD_TEST_BATCH}\" }]\n",
                  0,
                  "test.yaml:4:83: mappings[0].batch_size: batch_size must be an integer from 1 "
                  "to 10000, got \"250\"");
    expect_errors("postgres: ${ESMD_TEST_UNSET}${ESMD_TEST_UNSET2}\n", 0,
                  "test.yaml:1:11: postgres: environment variable \"ESMD_TEST_UNSET\" is not set\n"
                  "test.yaml:1:11: postgres: environment variable \"ESMD_TEST_UNSET2\" is not "
                  "set");
    /* Keys are not expanded; an unknown ${...} key is just an unknown key. */
    expect_errors("postgres: x\n${ESMD_TEST_HOST}: 1\n", 0,
                  "test.yaml:2:1: ${ESMD_TEST_HOST}: unknown key \"${ESMD_TEST_HOST}\" (allowed: "
                  "postgres, aws, admin, async_queue, connections, functions, mappings)");
}

/* ---- filters as JSON ---- */

static void test_filters_json(void **state)
{
    (void)state;
    struct esmd_config *cfg =
        expect_ok("postgres: x\n" KAFKA FN "mappings:\n"
                  "  - name: m\n"
                  "    function: f\n"
                  "    source: { kafka: k, topics: [t] }\n"
                  "    filters:\n"
                  "      - value:\n"
                  "          n: [0, -1.5, 1e3, 007, +1, .5, 0x10, 1_000]\n"
                  "          b: [true, True, FALSE, yes, \"false\"]\n"
                  "          z: [null, ~, Null, \"null\", '']\n"
                  "          s: [\"quoted \\\"q\\\"\", plain text, 'x\\y', \"tab\\there\"]\n"
                  "          nested: { a: { b: [{ prefix: \"us-\" }] } }\n"
                  "      - {}\n",
                  ESMD_CONFIG_ALLOW_UNBUILT);
    const struct esmd_mapping_cfg *m = &cfg->mappings[0];
    assert_int_equal(m->nfilters, 2);
    assert_string_equal(m->filters[0].pattern,
                        "{\"value\":{"
                        "\"n\":[0,-1.5,1e3,\"007\",\"+1\",\".5\",\"0x10\",\"1_000\"],"
                        "\"b\":[true,true,false,\"yes\",\"false\"],"
                        "\"z\":[null,null,null,\"null\",\"\"],"
                        "\"s\":[\"quoted \\\"q\\\"\",\"plain text\",\"x\\\\y\",\"tab\\there\"],"
                        "\"nested\":{\"a\":{\"b\":[{\"prefix\":\"us-\"}]}}}}");
    assert_int_equal(m->filters[0].line, 9);
    assert_int_equal(m->filters[0].col, 9);
    assert_string_equal(m->filters[1].pattern, "{}");
    assert_int_equal(m->filters[1].line, 15);
    /* Every pattern is valid JSON. */
    for (size_t i = 0; i < m->nfilters; i++) {
        cJSON *j = cJSON_Parse(m->filters[i].pattern);
        assert_non_null(j);
        cJSON_Delete(j);
    }
    esmd_config_free(cfg);
}

/* ---- durations and sizes ---- */

static void test_parse_duration(void **state)
{
    (void)state;
    int64_t v = -7;
    assert_int_equal(esmd_parse_duration_ms("500ms", &v), 0);
    assert_int_equal(v, 500);
    assert_int_equal(esmd_parse_duration_ms("30s", &v), 0);
    assert_int_equal(v, 30000);
    assert_int_equal(esmd_parse_duration_ms("5m", &v), 0);
    assert_int_equal(v, 300000);
    assert_int_equal(esmd_parse_duration_ms("6h", &v), 0);
    assert_int_equal(v, 21600000);
    assert_int_equal(esmd_parse_duration_ms("0s", &v), 0);
    assert_int_equal(v, 0);
    assert_int_equal(esmd_parse_duration_ms("007s", &v), 0);
    assert_int_equal(v, 7000);
    v = 42;
    const char *bad[] = {"",
                         "30",
                         "s",
                         "-1s",
                         "+1s",
                         "1.5s",
                         "1 s",
                         " 1s",
                         "1s ",
                         "1S",
                         "1d",
                         "1hm",
                         "1h30m",
                         "ms",
                         "9223372036854775807ms1",
                         "9223372036854775808ms",
                         "2562047788016h",
                         "99999999999999999999s"};
    for (size_t i = 0; i < ESMD_ARRAY_LEN(bad); i++) {
        if (esmd_parse_duration_ms(bad[i], &v) != ESMD_EINVAL)
            fail_msg("\"%s\" parsed as a duration", bad[i]);
    }
    assert_int_equal(v, 42); /* untouched on error */
    assert_int_equal(esmd_parse_duration_ms(NULL, &v), ESMD_EINVAL);
    assert_int_equal(esmd_parse_duration_ms("9223372036854775807ms", &v), 0);
    assert_int_equal(v, INT64_MAX);
    assert_int_equal(esmd_parse_duration_ms("2562047788015h", &v), 0);
    assert_int_equal(v, 2562047788015LL * 3600000);
}

static void test_parse_size(void **state)
{
    (void)state;
    int64_t v = -7;
    assert_int_equal(esmd_parse_size("0", &v), 0);
    assert_int_equal(v, 0);
    assert_int_equal(esmd_parse_size("123", &v), 0);
    assert_int_equal(v, 123);
    assert_int_equal(esmd_parse_size("123B", &v), 0);
    assert_int_equal(v, 123);
    assert_int_equal(esmd_parse_size("256KB", &v), 0);
    assert_int_equal(v, 262144);
    assert_int_equal(esmd_parse_size("6MB", &v), 0);
    assert_int_equal(v, ESMD_MAX_PAYLOAD);
    v = 42;
    const char *bad[] = {"",
                         "KB",
                         "-1",
                         "1.5MB",
                         "1 KB",
                         "1kb",
                         "1GB",
                         "1K",
                         "1MBB",
                         "9007199254740992MB",
                         "99999999999999999999"};
    for (size_t i = 0; i < ESMD_ARRAY_LEN(bad); i++) {
        if (esmd_parse_size(bad[i], &v) != ESMD_EINVAL)
            fail_msg("\"%s\" parsed as a size", bad[i]);
    }
    assert_int_equal(v, 42);
    assert_int_equal(esmd_parse_size(NULL, &v), ESMD_EINVAL);
}

/* ---- the error list and its format ---- */

static void test_error_format(void **state)
{
    (void)state;
    char out[256];
    struct esmd_config_error e = {"f.yaml", 3, 7, "mappings[0].batch_size", "bad"};
    esmd_config_error_format(&e, out, sizeof(out));
    assert_string_equal(out, "f.yaml:3:7: mappings[0].batch_size: bad");
    e.key = "";
    esmd_config_error_format(&e, out, sizeof(out));
    assert_string_equal(out, "f.yaml:3:7: bad");
    e.line = 0;
    esmd_config_error_format(&e, out, sizeof(out));
    assert_string_equal(out, "f.yaml: bad");
    esmd_config_error_format(&e, out, 5); /* truncated, still terminated */
    assert_string_equal(out, "f.ya");
}

static void test_errors_append_and_missing_file(void **state)
{
    (void)state;
    struct esmd_config_errors errs;
    esmd_config_errors_init(&errs);
    assert_null(esmd_config_load(CONFIG_DATA "/no-such-file.yaml", &errs));
    assert_int_equal(errs.n, 1);
    assert_null(esmd_config_parse("postgres: [\n", 12, "b.yaml", &errs));
    assert_int_equal(errs.n, 2); /* appended, earlier errors kept in place */
    char *got = format_errors(&errs);
    assert_string_equal(got, CONFIG_DATA
                        "/no-such-file.yaml: cannot open the file: No such file "
                        "or directory\n"
                        "b.yaml:2:1: YAML syntax error: did not find expected node content "
                        "(while parsing a flow node at line 2, column 1)\n");
    free(got);
    esmd_config_errors_free(&errs);
    assert_int_equal(errs.n, 0);
    esmd_config_errors_free(&errs); /* twice is fine */

    struct esmd_config *cfg = esmd_config_parse(NULL, 0, NULL, &errs);
    assert_null(cfg);
    assert_int_equal(errs.n, 1);
    assert_string_equal(errs.items[0].file, "<config>");
    esmd_config_errors_free(&errs);
    esmd_config_free(NULL);
}

static void test_deep_nesting(void **state)
{
    (void)state;
    struct esmd_buf b = ESMD_BUF_INIT;
    esmd_buf_puts(&b, "postgres: x\nmappings: ");
    for (int i = 0; i < 10000; i++)
        esmd_buf_putc(&b, '[');
    struct esmd_config_errors errs;
    esmd_config_errors_init(&errs);
    assert_null(esmd_config_parse(b.data, b.len, "deep.yaml", &errs));
    assert_int_equal(errs.n, 1);
    assert_string_equal(errs.items[0].message, "the document is nested deeper than 64 levels");
    esmd_config_errors_free(&errs);
    esmd_buf_free(&b);
}

/* ---- linear loading and limits ---- */

/* Key comparisons made by one parse of text (errors or not). */
static uint64_t compares_of(const struct esmd_buf *text)
{
    struct esmd_config_errors errs;
    esmd_config_errors_init(&errs);
    uint64_t before = esmd_config_compares();
    esmd_config_free(esmd_config_parse(text->data, text->len, "scale.yaml", &errs));
    esmd_config_errors_free(&errs);
    return esmd_config_compares() - before;
}

/* n unknown top-level keys, n mappings with distinct names referring to n functions by name and
 * as destinations, and a mapping of n topics. */
static void scale_file(struct esmd_buf *b, int n)
{
    esmd_buf_reset(b);
    esmd_buf_puts(b, "postgres: x\nconnections: { k: { type: kafka, bootstrap_servers: h } }\n");
    for (int i = 0; i < n; i++)
        esmd_buf_printf(b, "unknown%d: 1\n", i);
    esmd_buf_puts(b, "functions:\n");
    for (int i = 0; i < n; i++)
        esmd_buf_printf(b, "  f%d: { url: http://h/ }\n", i);
    esmd_buf_puts(b, "mappings:\n");
    for (int i = 0; i < n; i++)
        esmd_buf_printf(b,
                        "  - { name: m%d, function: f%d, on_failure: function://f%d,"
                        " source: { kafka: k, topics: t } }\n",
                        i, i, i);
    esmd_buf_puts(b, "  - { name: topics, function: f0, source: { kafka: k, topics: [");
    for (int i = 0; i < n; i++)
        esmd_buf_printf(b, "%st%d", i ? ", " : "", i);
    esmd_buf_puts(b, "] } }\n");
}

/* Loading is linear: four times the keys, names and topics make about four times the key
 * comparisons (quadratic lookups made sixteen times as many). Counted, not timed. */
static void test_linear_loading(void **state)
{
    (void)state;
    struct esmd_buf b = ESMD_BUF_INIT;
    scale_file(&b, 1000);
    uint64_t small = compares_of(&b);
    scale_file(&b, 4000);
    uint64_t large = compares_of(&b);
    esmd_buf_free(&b);
    assert_true(small > 0);
    if (large > 5 * small)
        fail_msg("4x the file made %.1fx the key comparisons (%llu, %llu)",
                 (double)large / (double)small, (unsigned long long)small,
                 (unsigned long long)large);
}

/* One error naming the limit, and nothing else read: `count` empty items in section `what`, a
 * list of {} or, with a name prefix, a map of NAME: {}. */
static void expect_limit(const char *what, int count, const char *prefix, const char *expected)
{
    struct esmd_buf b = ESMD_BUF_INIT;
    esmd_buf_printf(&b, "postgres: x\n%s: %c", what, prefix ? '{' : '[');
    for (int i = 0; i < count; i++) {
        esmd_buf_puts(&b, i ? ", " : "");
        if (prefix)
            esmd_buf_printf(&b, "%s%d: {}", prefix, i);
        else
            esmd_buf_puts(&b, "{}");
    }
    esmd_buf_printf(&b, "%c\n", prefix ? '}' : ']');
    struct esmd_config_errors errs;
    esmd_config_errors_init(&errs);
    assert_null(esmd_config_parse(b.data, b.len, "big.yaml", &errs));
    char *got = format_errors(&errs);
    assert_string_equal(got, expected);
    free(got);
    esmd_config_errors_free(&errs);
    esmd_buf_free(&b);
}

static void test_limits(void **state)
{
    (void)state;
    expect_limit("mappings", 10001, NULL,
                 "big.yaml:2:11: mappings: the file defines 10001 mappings, more than the limit "
                 "of 10000\n");
    expect_limit("functions", 10001, "f",
                 "big.yaml:2:12: functions: the file defines 10001 functions, more than the "
                 "limit of 10000\n");
    expect_limit("connections", 1001, "c",
                 "big.yaml:2:14: connections: the file defines 1001 connections, more than the "
                 "limit of 1000\n");
    /* At the limits: no limit error (other errors, as the items are empty). */
    struct esmd_buf b = ESMD_BUF_INIT;
    esmd_buf_puts(&b, "postgres: x\nmappings: [");
    for (int i = 0; i < 10000; i++)
        esmd_buf_puts(&b, i ? ", {}" : "{}");
    esmd_buf_puts(&b, "]\n");
    struct esmd_config_errors errs;
    esmd_config_errors_init(&errs);
    assert_null(esmd_config_parse(b.data, b.len, "big.yaml", &errs));
    assert_int_equal(errs.n, 3 * 10000); /* name, function, source missing */
    esmd_config_errors_free(&errs);

    /* Nodes: a million list items. */
    esmd_buf_reset(&b);
    esmd_buf_puts(&b, "postgres: x\nx: [");
    for (int i = 0; i < 1000000; i++)
        esmd_buf_puts(&b, i ? ",1" : "1");
    esmd_buf_puts(&b, "]\n");
    esmd_config_errors_init(&errs);
    assert_null(esmd_config_parse(b.data, b.len, "big.yaml", &errs));
    char *got = format_errors(&errs);
    assert_string_equal(got, "big.yaml:2:1999999: the file holds more than 1000000 YAML nodes "
                             "(values and list items), the limit\n");
    free(got);
    esmd_config_errors_free(&errs);

    /* Size: parsing from memory has the same limit as reading a file. */
    esmd_buf_reset(&b);
    esmd_buf_puts(&b, "postgres: x\n#");
    while (b.len <= 16 * 1024 * 1024)
        esmd_buf_puts(&b, "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef");
    esmd_buf_puts(&b, "\n");
    esmd_config_errors_init(&errs);
    assert_null(esmd_config_parse(b.data, b.len, "big.yaml", &errs));
    got = format_errors(&errs);
    assert_string_equal(got, "big.yaml: the file is larger than 16 MB\n");
    free(got);
    esmd_config_errors_free(&errs);
    esmd_buf_free(&b);
}

/* ---- the key tables against schemas/config.schema.json ----
 * An unknown key in each section makes the loader list that section's table; the list must be
 * the schema's properties for the same section. */

struct section {
    const char *def; /* $defs name, NULL for the document */
    const char *yaml;
};

static const struct section sections[] = {
    {NULL, "postgres: x\nzz_unknown: 1\n"},
    {"aws", "postgres: x\naws: { zz_unknown: 1 }\n"},
    {"admin", "postgres: x\nadmin: { zz_unknown: 1 }\n"},
    {"aws_credentials", "postgres: x\nadmin: { aws_credentials: { zz_unknown: 1 } }\n"},
    {"async_queue", "postgres: x\nasync_queue: { zz_unknown: 1 }\n"},
    {"kafka_connection", "postgres: x\nconnections: { k: { type: kafka, zz_unknown: 1 } }\n"},
    {"redis_connection", "postgres: x\nconnections: { k: { type: redis, zz_unknown: 1 } }\n"},
    {"function", "postgres: x\nfunctions: { f: { zz_unknown: 1 } }\n"},
    {"async", "postgres: x\nfunctions: { f: { async: { zz_unknown: 1 } } }\n"},
    {"mapping", "postgres: x\nmappings: [{ zz_unknown: 1 }]\n"},
    {"kafka_source", "postgres: x\nmappings: [{ source: { kafka: k, zz_unknown: 1 } }]\n"},
    {"redis_source", "postgres: x\nmappings: [{ source: { redis: r, zz_unknown: 1 } }]\n"},
    {"pgqueue_source", "postgres: x\nmappings: [{ source: { pgqueue: q, zz_unknown: 1 } }]\n"},
};

static void test_key_tables_match_schema(void **state)
{
    (void)state;
    char *text = esmd_test_read_file("schemas/config.schema.json", NULL);
    assert_non_null(text);
    cJSON *schema = cJSON_Parse(text);
    free(text);
    assert_non_null(schema);
    const char *prefix = "unknown key \"zz_unknown\" (allowed: ";

    for (size_t i = 0; i < ESMD_ARRAY_LEN(sections); i++) {
        const struct section *s = &sections[i];
        const cJSON *node = schema;
        if (s->def)
            node = cJSON_GetObjectItemCaseSensitive(
                cJSON_GetObjectItemCaseSensitive(schema, "$defs"), s->def);
        const cJSON *props = cJSON_GetObjectItemCaseSensitive(node, "properties");
        if (!props)
            fail_msg("schema has no properties for %s", s->def ? s->def : "the document");
        const cJSON *extra = cJSON_GetObjectItemCaseSensitive(node, "additionalProperties");
        assert_true(cJSON_IsFalse(extra));

        struct esmd_config_errors errs;
        esmd_config_errors_init(&errs);
        struct esmd_config *cfg = parse_str(s->yaml, ESMD_CONFIG_ALLOW_UNBUILT, &errs);
        assert_null(cfg);
        const char *list = NULL;
        for (size_t j = 0; j < errs.n && !list; j++)
            if (!strncmp(errs.items[j].message, prefix, strlen(prefix)))
                list = errs.items[j].message + strlen(prefix);
        if (!list)
            fail_msg("no unknown-key error for %s", s->yaml);

        /* Same names in the same order. */
        struct esmd_buf want = ESMD_BUF_INIT;
        const cJSON *p;
        cJSON_ArrayForEach(p, props)
        {
            esmd_buf_printf(&want, "%s%s", want.len ? ", " : "", p->string);
        }
        esmd_buf_putc(&want, ')');
        if (strcmp(list, esmd_buf_cstr(&want)) != 0)
            fail_msg("%s: loader allows (%s, schema has (%s", s->def ? s->def : "document", list,
                     esmd_buf_cstr(&want));
        esmd_buf_free(&want);
        esmd_config_errors_free(&errs);
    }
    cJSON_Delete(schema);
}

/* Each connector's own key tables (connector.h: source_keys, conn_keys) against the schema's
 * "<kind>_source" and "<kind>_connection" and docs/configuration.md: names in order, required
 * keys, enum values, integer ranges, defaults. */
static const cJSON *schema_def(const cJSON *schema, const char *name)
{
    const cJSON *def =
        cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(schema, "$defs"), name);
    if (!def)
        fail_msg("schemas/config.schema.json has no $defs/%s", name);
    return def;
}

static bool schema_requires(const cJSON *def, const char *key)
{
    const cJSON *r;
    cJSON_ArrayForEach(r, cJSON_GetObjectItemCaseSensitive(def, "required"))
    {
        if (cJSON_IsString(r) && !strcmp(r->valuestring, key))
            return true;
    }
    return false;
}

static void check_table(const cJSON *def, const char *defname, const struct esmd_cfg_key *keys,
                        bool with_type, const char *docs)
{
    const cJSON *props = cJSON_GetObjectItemCaseSensitive(def, "properties");
    const cJSON *p = props ? props->child : NULL;
    if (with_type) {
        if (!p || strcmp(p->string, "type") != 0)
            fail_msg("%s: the first property must be type", defname);
        p = p->next;
    }
    size_t nrequired = with_type;
    for (const struct esmd_cfg_key *k = keys; k->name; k++, p = p->next) {
        if (!p || strcmp(p->string, k->name) != 0)
            fail_msg("%s: the table has %s where the schema has %s", defname, k->name,
                     p ? p->string : "no more keys");
        char quoted[128];
        snprintf(quoted, sizeof(quoted), "`%s`", k->name);
        if (!strstr(docs, quoted))
            fail_msg("docs/configuration.md does not document %s (%s)", quoted, defname);
        bool required = k->flags & ESMD_CFG_REQUIRED;
        nrequired += required;
        if (required != schema_requires(def, k->name))
            fail_msg("%s.%s: required in %s only", defname, k->name,
                     required ? "the table" : "the schema");
        const cJSON *dflt = cJSON_GetObjectItemCaseSensitive(p, "default");
        switch (k->type) {
        case ESMD_CFG_ENUM: {
            const cJSON *e = cJSON_GetObjectItemCaseSensitive(p, "enum");
            size_t i = 0;
            const cJSON *v;
            cJSON_ArrayForEach(v, e)
            {
                if (!k->names[i] || strcmp(k->names[i], v->valuestring) != 0)
                    fail_msg("%s.%s: enum differs at %zu", defname, k->name, i);
                i++;
            }
            if (k->names[i])
                fail_msg("%s.%s: the schema lacks %s", defname, k->name, k->names[i]);
            if (dflt && strcmp(dflt->valuestring, k->names[k->def]) != 0)
                fail_msg("%s.%s: default %s in the schema", defname, k->name, dflt->valuestring);
            break;
        }
        case ESMD_CFG_INT: {
            const cJSON *lo = cJSON_GetObjectItemCaseSensitive(p, "minimum");
            const cJSON *hi = cJSON_GetObjectItemCaseSensitive(p, "maximum");
            if (!lo || !hi || (int64_t)lo->valuedouble != k->min ||
                (int64_t)hi->valuedouble != k->max)
                fail_msg("%s.%s: range differs from the schema's", defname, k->name);
            if ((dflt ? (int64_t)dflt->valuedouble : 0) != k->def)
                fail_msg("%s.%s: default differs from the schema's", defname, k->name);
            break;
        }
        case ESMD_CFG_DURATION: {
            char want[32];
            if (k->def &&
                (!dflt || strcmp(dflt->valuestring, esmd_config_fmt_duration(k->def, want)) != 0))
                fail_msg("%s.%s: default differs from the schema's", defname, k->name);
            break;
        }
        default:
            break;
        }
    }
    if (p)
        fail_msg("%s: the schema has %s, the table does not", defname, p->string);
    if ((size_t)cJSON_GetArraySize(cJSON_GetObjectItemCaseSensitive(def, "required")) != nrequired)
        fail_msg("%s: the schema requires keys the table does not", defname);
}

static void test_connector_tables_match_schema(void **state)
{
    (void)state;
    char *text = esmd_test_read_file("schemas/config.schema.json", NULL);
    char *docs = esmd_test_read_file("docs/configuration.md", NULL);
    assert_non_null(text);
    assert_non_null(docs);
    cJSON *schema = cJSON_Parse(text);
    assert_non_null(schema);
    const struct esmd_connector_ops *ops;
    size_t nsources = 0, nconns = 0;
    for (size_t i = 0; (ops = esmd_connector_at(i)); i++) {
        char name[64];
        snprintf(name, sizeof(name), "%s_source", ops->kind);
        check_table(schema_def(schema, name), name, ops->source_keys, false, docs);
        assert_string_equal(ops->source_keys[0].name, ops->kind); /* the kind's own key first */
        nsources++;
        if (!ops->conn_keys)
            continue;
        snprintf(name, sizeof(name), "%s_connection", ops->kind);
        const cJSON *def = schema_def(schema, name);
        check_table(def, name, ops->conn_keys, true, docs);
        const cJSON *type = cJSON_GetObjectItemCaseSensitive(
            cJSON_GetObjectItemCaseSensitive(def, "properties"), "type");
        assert_string_equal(cJSON_GetObjectItemCaseSensitive(type, "const")->valuestring,
                            ops->kind);
        nconns++;
    }
    /* Every kind, and only those, among the schema's sources and connections. */
    const cJSON *source = cJSON_GetObjectItemCaseSensitive(
        cJSON_GetObjectItemCaseSensitive(schema_def(schema, "mapping"), "properties"), "source");
    assert_int_equal(cJSON_GetArraySize(cJSON_GetObjectItemCaseSensitive(source, "oneOf")),
                     nsources);
    const cJSON *conns = cJSON_GetObjectItemCaseSensitive(
        cJSON_GetObjectItemCaseSensitive(schema, "properties"), "connections");
    assert_int_equal(cJSON_GetArraySize(cJSON_GetObjectItemCaseSensitive(
                         cJSON_GetObjectItemCaseSensitive(conns, "additionalProperties"), "oneOf")),
                     nconns);
    cJSON_Delete(schema);
    free(text);
    free(docs);
}

int main(void)
{
    /* The tests use paths relative to the repo root, wherever they are started from. */
    if (chdir(ESMD_TEST_DATA "/../../..") != 0) {
        perror("chdir");
        return 1;
    }
    setenv("ESMD_TEST_TOKEN", "s3cret-token", 1);
    setenv("ESMD_TEST_SECRET", "aws-secret", 1);
    setenv("ESMD_TEST_HOST", "localhost", 1);
    setenv("ESMD_TEST_BATCH", "250", 1);
    unsetenv("ESMD_TEST_UNSET");
    unsetenv("ESMD_TEST_UNSET2");

    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_good_full),
        cmocka_unit_test(test_good_minimal_defaults),
        cmocka_unit_test(test_good_files_load),
        cmocka_unit_test(test_bad_files),
        cmocka_unit_test(test_error_yaml_syntax),
        cmocka_unit_test(test_error_unknown_keys),
        cmocka_unit_test(test_parallelization_factor),
        cmocka_unit_test(test_error_missing_and_types),
        cmocka_unit_test(test_error_ranges),
        cmocka_unit_test(test_error_references),
        cmocka_unit_test(test_error_refused_features),
        cmocka_unit_test(test_env_expansion),
        cmocka_unit_test(test_filters_json),
        cmocka_unit_test(test_parse_duration),
        cmocka_unit_test(test_parse_size),
        cmocka_unit_test(test_error_format),
        cmocka_unit_test(test_errors_append_and_missing_file),
        cmocka_unit_test(test_deep_nesting),
        cmocka_unit_test(test_key_tables_match_schema),
        cmocka_unit_test(test_connector_tables_match_schema),
        cmocka_unit_test(test_linear_loading),
        cmocka_unit_test(test_limits),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
