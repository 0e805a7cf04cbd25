/* The source connectors' emit against a host that releases the record before emit returns, as
 * the core does for a mapping that is stopping (src/mapping.c, host_emit): the connector must
 * not touch the record after host->emit (include/esmd/connector.h). Run under ASan (scripts/test's
 * asan step), a write to the released record is a heap-use-after-free that fails the test; the
 * Redis connector had one (fixed in 5d82f0a). The Kafka connector's test is in
 * tests/unit/test_kafka_mock.c (test_record_released_inside_emit).
 *
 * The tests need live servers: ESMD_TEST_REDIS holds a redis:// URL, ESMD_TEST_PG a PostgreSQL
 * conninfo (testutil.h); without them the tests are skipped
 * (tests/integration/test_emit_released_unit.py runs them against the fixtures' servers). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "testutil.h"

#include "../../src/batch_private.h" /* the fake host makes shards as the core does */
#include "esmd/buf.h"
#include "esmd/config.h"
#include "esmd/connector.h"
#include "esmd/log.h"
#include "esmd/redis_link.h"

#include <ev.h>
#include <hiredis/hiredis.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

extern const struct esmd_connector_ops esmd_connector_redis;
extern const struct esmd_connector_ops esmd_connector_pgqueue;

#define NENTRIES 40
#define MAX_SHARDS 16 /* a Postgres queue opens one per concurrency slot */

/* ---- a host whose emit releases the record at once ---- */

struct fake {
    struct ev_loop *loop;
    struct esmd_log_ctx log;
    struct esmd_host host;
    const struct esmd_connector_ops *ops;
    void *conn;
    struct esmd_shard *shards[MAX_SHARDS]; /* open ones; NULL slots are free */
    int emitted;
    int docs_with_field; /* filter documents that showed the entry's field */
    bool filter_first;   /* ask for the filter document before releasing, as the core filters */
    bool stopped;
};

static struct esmd_shard *fake_shard_open(void *core, const char *key, size_t overhead, void *priv)
{
    struct fake *f = core;
    for (int i = 0; i < MAX_SHARDS; i++)
        if (!f->shards[i])
            return f->shards[i] = esmd_shard_new(key, overhead, priv);
    fail_msg("more than %d shards open", MAX_SHARDS);
    return NULL;
}

static bool is_open(const struct fake *f, const struct esmd_shard *shard)
{
    for (int i = 0; i < MAX_SHARDS; i++)
        if (shard && f->shards[i] == shard)
            return true;
    return false;
}

static void fake_shard_close(void *core, struct esmd_shard *shard)
{
    struct fake *f = core;
    assert_true(is_open(f, shard));
    for (int i = 0; i < MAX_SHARDS; i++)
        if (f->shards[i] == shard)
            f->shards[i] = NULL;
    esmd_shard_free(shard);
}

static void fake_emit(void *core, struct esmd_shard *shard, struct esmd_record *rec)
{
    struct fake *f = core;
    assert_true(is_open(f, shard));
    rec->shard = shard;
    if (f->filter_first) {
        struct esmd_buf doc = ESMD_BUF_INIT;
        f->ops->filter_doc(f->conn, rec, &doc);
        if (strstr(esmd_buf_cstr(&doc), "\"released-at-once\""))
            f->docs_with_field++;
        esmd_buf_free(&doc);
    }
    f->emitted++;
    f->ops->release(f->conn, rec); /* before emit returns: the record is gone */
}

static void fake_set_ready(void *core, bool ready, const char *why)
{
    (void)core;
    (void)ready;
    (void)why;
}

static void on_stopped(void *ud)
{
    struct fake *f = ud;
    f->stopped = true;
}

static bool emitted_all(void *arg)
{
    const struct fake *f = arg;
    return f->emitted >= NENTRIES;
}

static struct esmd_config *load(const char *yaml)
{
    struct esmd_config_errors errs;
    esmd_config_errors_init(&errs);
    struct esmd_config *cfg = esmd_config_parse(yaml, strlen(yaml), "test.yaml", &errs);
    for (size_t i = 0; i < errs.n; i++) {
        char line[1024];
        esmd_config_error_format(&errs.items[i], line, sizeof(line));
        fprintf(stderr, "%s\n", line);
    }
    esmd_config_errors_free(&errs);
    assert_non_null(cfg);
    return cfg;
}

/* Starts the connector of cfg's first mapping on f, runs until every entry was emitted (and
 * released), stops and destroys it. */
static void run_released_at_once(struct fake *f, const struct esmd_connector_ops *ops,
                                 const struct esmd_config *cfg)
{
    f->loop = ev_loop_new(EVFLAG_AUTO);
    f->ops = ops;
    f->log.mapping = cfg->mappings[0].name;
    f->host = (struct esmd_host){
        .loop = f->loop,
        .core = f,
        .log = &f->log,
        .instance_id = "test-instance",
        .shard_open = fake_shard_open,
        .shard_close = fake_shard_close,
        .emit = fake_emit,
        .set_ready = fake_set_ready,
    };
    char err[256] = "";
    f->conn = ops->create(&cfg->mappings[0], &f->host, err, sizeof(err));
    if (!f->conn)
        fail_msg("create: %s", err);
    assert_int_equal(ops->start(f->conn), ESMD_OK);
    if (!esmd_test_run_until(f->loop, emitted_all, f, 30.0))
        fail_msg("%d of %d entries emitted", f->emitted, NENTRIES);
    ops->stop(f->conn, on_stopped, f);
    esmd_test_run_until_flag(f->loop, &f->stopped, 30.0);
    ops->destroy(f->conn);
    assert_int_equal(f->emitted, NENTRIES);
    if (f->filter_first) /* the record's data is there while it is handed over */
        assert_int_equal(f->docs_with_field, NENTRIES);
    for (int i = 0; i < MAX_SHARDS; i++)
        esmd_shard_free(f->shards[i]);
    ev_loop_destroy(f->loop);
}

/* ---- Redis ---- */

static void redis_released_at_once(bool filter_first)
{
    const char *url = getenv("ESMD_TEST_REDIS");
    if (!url || !*url)
        skip();
    char stream[64];
    snprintf(stream, sizeof(stream), "emit-released-%ld-%d", (long)getpid(), (int)filter_first);

    struct esmd_redis_url u;
    char err[256] = "";
    if (esmd_redis_url_parse(url, &u, err, sizeof(err)) != ESMD_OK)
        fail_msg("ESMD_TEST_REDIS: %s", err);
    redisContext *rc = redisConnect(u.host, u.port);
    assert_non_null(rc);
    if (rc->err)
        fail_msg("redis %s: %s", url, rc->errstr);
    redisReply *r = redisCommand(rc, "SELECT %d", u.db);
    assert_non_null(r);
    freeReplyObject(r);
    r = redisCommand(rc, "DEL %s", stream);
    freeReplyObject(r);
    for (int i = 0; i < NENTRIES; i++) {
        r = redisCommand(rc, "XADD %s * pk key-%d note released-at-once i %d", stream, i % 5, i);
        assert_non_null(r);
        assert_int_equal(r->type, REDIS_REPLY_STRING);
        freeReplyObject(r);
    }

    char yaml[1024];
    snprintf(yaml, sizeof(yaml),
             "postgres: postgresql://db/esmd\n"
             "connections: { r: { type: redis, url: '%s' } }\n"
             "functions: { fn: { url: 'http://127.0.0.1:9/' } }\n"
             "mappings:\n"
             "  - name: m\n"
             "    function: fn\n"
             "    source: { redis: r, stream: %s, group: g, partition_key_field: pk }\n",
             url, stream);
    struct esmd_config *cfg = load(yaml);
    struct fake f;
    memset(&f, 0, sizeof(f));
    f.filter_first = filter_first;
    run_released_at_once(&f, &esmd_connector_redis, cfg);
    esmd_config_free(cfg);

    r = redisCommand(rc, "DEL %s", stream);
    freeReplyObject(r);
    redisFree(rc);
    esmd_redis_url_free(&u);
}

static void test_redis_record_released_inside_emit(void **state)
{
    (void)state;
    redis_released_at_once(false);
}

static void test_redis_filter_doc_then_released_inside_emit(void **state)
{
    (void)state;
    redis_released_at_once(true);
}

/* ---- Postgres queue ---- */

static void pgqueue_released_at_once(bool filter_first)
{
    ESMD_TEST_NEED_PG();
    const char *queue = filter_first ? "emit_released_f" : "emit_released";
    PGconn *c = esmd_test_pg_connect();
    char sql[512];
    snprintf(sql, sizeof(sql),
             "SELECT count(*) FROM esmd.send_batch('%s', ARRAY(SELECT "
             "'{\"note\":\"released-at-once\",\"i\":' || i || '}' FROM generate_series(1, %d) i))",
             queue, NENTRIES);
    assert_int_equal(esmd_test_pg_long(c, sql), NENTRIES);

    /* the conninfo as a YAML single-quoted string (it may hold quotes) */
    char pg[1024];
    size_t k = 0;
    for (const char *p = esmd_test_pg_conninfo(); *p && k + 2 < sizeof(pg); p++) {
        if (*p == '\'')
            pg[k++] = '\'';
        pg[k++] = *p;
    }
    pg[k] = '\0';
    /* four slots of 10: the queue claims all NENTRIES at once (a claim waits for free slots) */
    char yaml[2048];
    snprintf(yaml, sizeof(yaml),
             "postgres: '%s'\n"
             "functions: { fn: { url: 'http://127.0.0.1:9/' } }\n"
             "mappings:\n"
             "  - name: m\n"
             "    function: fn\n"
             "    source: { pgqueue: %s, maximum_concurrency: 4 }\n"
             "    batch_size: 10\n",
             pg, queue);
    struct esmd_config *cfg = load(yaml);
    struct fake f;
    memset(&f, 0, sizeof(f));
    f.filter_first = filter_first;
    run_released_at_once(&f, &esmd_connector_pgqueue, cfg);
    esmd_config_free(cfg);
    PQfinish(c);
}

static void test_pgqueue_record_released_inside_emit(void **state)
{
    (void)state;
    pgqueue_released_at_once(false);
}

static void test_pgqueue_filter_doc_then_released_inside_emit(void **state)
{
    (void)state;
    pgqueue_released_at_once(true);
}

static int setup(void **state)
{
    (void)state;
    return esmd_test_pg_setup("esmd_test_emit", true);
}

static int teardown(void **state)
{
    (void)state;
    return esmd_test_pg_teardown();
}

int main(void)
{
    esmd_log_set_level(ESMD_LOG_WARN);
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_redis_record_released_inside_emit),
        cmocka_unit_test(test_redis_filter_doc_then_released_inside_emit),
        cmocka_unit_test(test_pgqueue_record_released_inside_emit),
        cmocka_unit_test(test_pgqueue_filter_doc_then_released_inside_emit),
    };
    return cmocka_run_group_tests(tests, setup, teardown);
}
