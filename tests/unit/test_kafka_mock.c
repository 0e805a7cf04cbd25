/* The Kafka connector end to end against librdkafka's in-process mock cluster (loopback only).
 *
 * A small fake host stands in for the core: it opens shards, keeps what is emitted (checking
 * seq order per shard), pauses / resumes / acks on demand, and releases records at the end.
 * Every wait runs the ev loop with a deadline, so a broken connector fails instead of hanging.
 * The mock's consumer group delays the first join by ~3 s, so each test takes a few seconds. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "testutil.h"

#include "../../src/batch_private.h" /* the fake host makes shards as the core does */
#include "esmd/connector.h"
#include "esmd/log.h"

#include <cJSON.h>
#include <ev.h>
#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

extern const struct esmd_connector_ops esmd_connector_kafka;
static const struct esmd_connector_ops *ops = &esmd_connector_kafka;

#define NPART 4
#define NREC 200
#define JOIN_TIMEOUT_S 30.0

/* ---- the mock cluster ---- */

struct cluster {
    rd_kafka_t *mrk; /* hosts the mock cluster */
    rd_kafka_mock_cluster_t *mcluster;
    const char *bootstraps;
    rd_kafka_t *producer;
};

static struct cluster g_cluster;

/* The test producer's own librdkafka lines (it sees the outage test's brokers go down). */
static void quiet_log(const rd_kafka_t *rk, int level, const char *fac, const char *buf) {}

static int cluster_setup(void **state)
{
    char errstr[256];
    const char *lvl = getenv("ESMD_TEST_LOG");
    enum esmd_log_level level = ESMD_LOG_WARN;
    if (lvl && esmd_log_parse_level(lvl, &level) != ESMD_OK)
        level = ESMD_LOG_WARN;
    esmd_log_set_level(level);

    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    rd_kafka_conf_set(conf, "log_level", "3", errstr, sizeof(errstr));
    g_cluster.mrk = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof(errstr));
    assert_non_null(g_cluster.mrk);
    g_cluster.mcluster = rd_kafka_mock_cluster_new(g_cluster.mrk, 3);
    assert_non_null(g_cluster.mcluster);
    g_cluster.bootstraps = rd_kafka_mock_cluster_bootstraps(g_cluster.mcluster);

    conf = rd_kafka_conf_new();
    assert_int_equal(
        rd_kafka_conf_set(conf, "bootstrap.servers", g_cluster.bootstraps, errstr, sizeof(errstr)),
        RD_KAFKA_CONF_OK);
    rd_kafka_conf_set(conf, "linger.ms", "5", errstr, sizeof(errstr));
    rd_kafka_conf_set_log_cb(conf, quiet_log);
    g_cluster.producer = rd_kafka_new(RD_KAFKA_PRODUCER, conf, errstr, sizeof(errstr));
    assert_non_null(g_cluster.producer);
    return 0;
}

static int cluster_teardown(void **state)
{
    rd_kafka_destroy(g_cluster.producer);
    rd_kafka_mock_cluster_destroy(g_cluster.mcluster);
    rd_kafka_destroy(g_cluster.mrk);
    return 0;
}

static void topic_create(const char *topic)
{
    assert_int_equal(rd_kafka_mock_topic_create(g_cluster.mcluster, topic, NPART, 3),
                     RD_KAFKA_RESP_ERR_NO_ERROR);
}

/* Record i goes to partition i % NPART with key "key-i", value "value-i" and a header
 * idx=i; every third record also has a header "ë" with a non-ASCII value. Offsets per
 * partition are therefore i / NPART when producing from 0. */
static void produce(const char *topic, int from, int n)
{
    for (int i = from; i < from + n; i++) {
        char key[32], value[32], idx[16];
        snprintf(key, sizeof(key), "key-%d", i);
        snprintf(value, sizeof(value), "value-%d", i);
        snprintf(idx, sizeof(idx), "%d", i);
        rd_kafka_headers_t *hdrs = rd_kafka_headers_new(2);
        rd_kafka_header_add(hdrs, "idx", -1, idx, -1);
        if (i % 3 == 0)
            rd_kafka_header_add(hdrs, "\xc3\xab", -1, "\xc3\xab", 2);
        rd_kafka_resp_err_t err = rd_kafka_producev(
            g_cluster.producer, RD_KAFKA_V_TOPIC(topic), RD_KAFKA_V_PARTITION(i % NPART),
            RD_KAFKA_V_KEY(key, strlen(key)), RD_KAFKA_V_VALUE(value, strlen(value)),
            RD_KAFKA_V_HEADERS(hdrs), RD_KAFKA_V_MSGFLAGS(RD_KAFKA_MSG_F_COPY), RD_KAFKA_V_END);
        if (err) {
            rd_kafka_headers_destroy(hdrs);
            fail_msg("produce: %s", rd_kafka_err2str(err));
        }
    }
    assert_int_equal(rd_kafka_flush(g_cluster.producer, 10000), RD_KAFKA_RESP_ERR_NO_ERROR);
}

/* Committed offsets of group for topic's partitions, read by a separate client. */
static void committed(const char *group, const char *topic, int64_t out[NPART])
{
    char errstr[256];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    rd_kafka_conf_set(conf, "bootstrap.servers", g_cluster.bootstraps, errstr, sizeof(errstr));
    rd_kafka_conf_set(conf, "group.id", group, errstr, sizeof(errstr));
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_CONSUMER, conf, errstr, sizeof(errstr));
    assert_non_null(rk);
    rd_kafka_topic_partition_list_t *list = rd_kafka_topic_partition_list_new(NPART);
    for (int p = 0; p < NPART; p++)
        rd_kafka_topic_partition_list_add(list, topic, p);
    assert_int_equal(rd_kafka_committed(rk, list, 10000), RD_KAFKA_RESP_ERR_NO_ERROR);
    for (int p = 0; p < NPART; p++)
        out[p] = rd_kafka_topic_partition_list_find(list, topic, p)->offset;
    rd_kafka_topic_partition_list_destroy(list);
    rd_kafka_destroy(rk);
}

/* ---- the fake host ---- */

struct part_log {
    struct esmd_shard *shard; /* open shard, NULL when closed */
    int opens, closes;
    struct esmd_record **recs; /* every record emitted, in order; released at the end */
    size_t n, cap;
    int64_t last_seq;
    bool pause_on_first; /* pause the shard from inside emit, as the core does */
    bool paused;
    size_t n_at_pause;
};

struct fake {
    struct ev_loop *loop;
    struct esmd_log_ctx log;
    struct esmd_host host;
    const char *topic;
    void *conn;
    struct part_log parts[NPART];
    size_t total;
    int nopen;
    bool release_in_emit; /* release each record before emit returns (a stopping mapping) */
    bool ready;
    bool stopped;
    ev_timer guard; /* keeps ev_run(ONCE) returning while we wait */
};

static int part_of(struct fake *f, const char *key)
{
    size_t tl = strlen(f->topic);
    assert_true(strncmp(key, f->topic, tl) == 0 && key[tl] == '-');
    int p = atoi(key + tl + 1);
    assert_true(p >= 0 && p < NPART);
    return p;
}

static struct esmd_shard *fake_shard_open(void *core, const char *key, size_t overhead, void *priv)
{
    struct fake *f = core;
    int p = part_of(f, key);
    char want[64];
    snprintf(want, sizeof(want), "\"%s\":[]", key);
    assert_int_equal(overhead, strlen(want));
    assert_null(f->parts[p].shard);
    struct esmd_shard *shard = esmd_shard_new(key, overhead, priv);
    f->parts[p].shard = shard;
    f->parts[p].opens++;
    f->parts[p].last_seq = -1;
    f->nopen++;
    return shard;
}

static void fake_shard_close(void *core, struct esmd_shard *shard)
{
    struct fake *f = core;
    int p = part_of(f, esmd_shard_key(shard));
    assert_ptr_equal(f->parts[p].shard, shard);
    f->parts[p].shard = NULL;
    f->parts[p].closes++;
    f->nopen--;
    for (size_t i = 0; i < f->parts[p].n; i++)
        if (f->parts[p].recs[i]->shard == shard)
            f->parts[p].recs[i]->shard = NULL;
    esmd_shard_free(shard);
}

static void fake_emit(void *core, struct esmd_shard *shard, struct esmd_record *rec)
{
    struct fake *f = core;
    assert_false(f->stopped);
    int p = part_of(f, esmd_shard_key(shard));
    struct part_log *pl = &f->parts[p];
    assert_ptr_equal(pl->shard, shard);
    if (rec->seq <= pl->last_seq)
        fail_msg("%s: seq %lld after %lld", esmd_shard_key(shard), (long long)rec->seq,
                 (long long)pl->last_seq);
    pl->last_seq = rec->seq;
    rec->shard = shard;
    rec->next = NULL;
    assert_true(rec->size > 0);
    if (f->release_in_emit) {
        /* as the core does for a mapping that is stopping: the connector must not touch the
         * record after emit (under ASan a write to it fails the test) */
        f->total++;
        ops->release(f->conn, rec);
        return;
    }
    if (pl->n == pl->cap) {
        pl->cap = pl->cap ? pl->cap * 2 : 64;
        pl->recs = realloc(pl->recs, pl->cap * sizeof(*pl->recs));
    }
    pl->recs[pl->n++] = rec;
    f->total++;
    if (pl->pause_on_first && !pl->paused) {
        pl->paused = true;
        ops->pause(f->conn, shard);
        pl->n_at_pause = pl->n;
    }
}

static void fake_set_ready(void *core, bool ready, const char *why)
{
    struct fake *f = core;
    f->ready = ready;
}

static void fake_guard(struct ev_loop *loop, ev_timer *w, int revents) {}

static void fake_init(struct fake *f, const char *topic)
{
    memset(f, 0, sizeof(*f));
    f->loop = ev_loop_new(EVFLAG_AUTO);
    f->topic = topic;
    f->log.mapping = topic;
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
    for (int p = 0; p < NPART; p++)
        f->parts[p].last_seq = -1;
    ev_timer_init(&f->guard, fake_guard, 0.05, 0.05);
    ev_timer_start(f->loop, &f->guard);
}

static void fake_release_all(struct fake *f)
{
    for (int p = 0; p < NPART; p++) {
        for (size_t i = 0; i < f->parts[p].n; i++)
            ops->release(f->conn, f->parts[p].recs[i]);
        free(f->parts[p].recs);
        f->parts[p].recs = NULL;
        f->parts[p].n = f->parts[p].cap = 0;
    }
}

/* Releases what it holds, destroys the connector, frees open shards and the loop. */
static void fake_free(struct fake *f)
{
    fake_release_all(f);
    ops->destroy(f->conn);
    for (int p = 0; p < NPART; p++) {
        esmd_shard_free(f->parts[p].shard);
    }
    ev_timer_stop(f->loop, &f->guard);
    ev_loop_destroy(f->loop);
}

/* Mapping config for the mock cluster; props: NULL-terminated key, value pairs. */
struct test_cfg {
    struct esmd_conn_cfg conn;
    struct esmd_kv props[8];
    char *topics[1];
    struct esmd_mapping_cfg map;
};

static void test_cfg_init(struct test_cfg *tc, const char *topic, const char *group,
                          enum esmd_starting_position start, const char *const *props)
{
    memset(tc, 0, sizeof(*tc));
    tc->conn.name = "mock";
    tc->conn.type = ESMD_CONN_KAFKA;
    tc->conn.bootstrap_servers = (char *)g_cluster.bootstraps;
    size_t n = 0;
    /* faster group protocol for tests; user properties pass through as is */
    static const char *const base[] = {"session.timeout.ms", "6000", "heartbeat.interval.ms", "500",
                                       NULL};
    for (size_t i = 0; base[i]; i += 2, n++)
        tc->props[n] = (struct esmd_kv){(char *)base[i], (char *)base[i + 1]};
    for (size_t i = 0; props && props[i]; i += 2, n++)
        tc->props[n] = (struct esmd_kv){(char *)props[i], (char *)props[i + 1]};
    tc->conn.properties.items = tc->props;
    tc->conn.properties.n = n;
    tc->topics[0] = (char *)topic;
    tc->map.name = (char *)topic;
    tc->map.function = "fn";
    tc->map.enabled = true;
    tc->map.kind = ESMD_SOURCE_KAFKA;
    tc->map.kafka.connection = "mock";
    tc->map.kafka.conn = &tc->conn;
    tc->map.kafka.topics = tc->topics;
    tc->map.kafka.ntopics = 1;
    tc->map.kafka.consumer_group = (char *)group;
    tc->map.kafka.starting_position = start;
    tc->map.batch_size = 100;
}

static void fake_start(struct fake *f, struct test_cfg *tc)
{
    char err[256] = "";
    f->conn = ops->create(&tc->map, &f->host, err, sizeof(err));
    if (!f->conn)
        fail_msg("create: %s", err);
    assert_int_equal(ops->start(f->conn), ESMD_OK);
}

typedef bool (*pred_fn)(struct fake *f, void *arg);

struct pred_call {
    struct fake *f;
    pred_fn pred;
    void *arg;
};

static bool pred_holds(void *p)
{
    struct pred_call *c = p;
    return c->pred(c->f, c->arg);
}

static bool run_until(struct fake *f, pred_fn pred, void *arg, double timeout_s)
{
    struct pred_call c = {f, pred, arg};
    return esmd_test_run_until(f->loop, pred_holds, &c, timeout_s);
}

static bool total_at_least(struct fake *f, void *arg)
{
    return f->total >= *(size_t *)arg;
}

static bool shards_open(struct fake *f, void *arg)
{
    return f->nopen == *(int *)arg;
}

/* The connector's committed total (its stats) has reached *arg: the broker answered the
 * commits. Tests wait for this with a deadline rather than for a fixed time, which a loaded
 * machine can outlast (a 0.5 s wait once did in CI). */
static bool committed_at_least(struct fake *f, void *arg)
{
    struct esmd_connector_stats st;
    ops->stats(f->conn, &st);
    return st.committed >= *(int64_t *)arg;
}

static bool is_stopped(struct fake *f, void *arg)
{
    return f->stopped;
}

static void on_stopped(void *ud)
{
    struct fake *f = ud;
    assert_false(f->stopped); /* done is called once */
    f->stopped = true;
}

static void fake_stop(struct fake *f)
{
    ops->stop(f->conn, on_stopped, f);
    assert_false(f->stopped); /* never from inside stop() */
    if (!run_until(f, is_stopped, NULL, JOIN_TIMEOUT_S))
        fail_msg("stop did not finish");
}

static void wait_total(struct fake *f, size_t n)
{
    if (!run_until(f, total_at_least, &n, JOIN_TIMEOUT_S))
        fail_msg("%zu records emitted, expected %zu", f->total, n);
}

/* Offsets of partition p are exactly from..from+n-1, each once. */
static void assert_contiguous(const struct part_log *pl, int64_t from, size_t n)
{
    assert_int_equal(pl->n, n);
    for (size_t i = 0; i < pl->n; i++)
        assert_int_equal(pl->recs[i]->seq, from + (int64_t)i);
}

/* ---- tests ---- */

static void test_create_errors(void **state)
{
    struct fake f;
    fake_init(&f, "errs");
    char err[256] = "";
    struct test_cfg tc;
    static const char *const bad[] = {"no.such.property", "1", NULL};
    test_cfg_init(&tc, "errs", "g", ESMD_START_TRIM_HORIZON, bad);
    assert_null(ops->create(&tc.map, &f.host, err, sizeof(err)));
    assert_non_null(strstr(err, "no.such.property"));

    static const char *const reserved[] = {"enable.auto.offset.store", "true", NULL};
    test_cfg_init(&tc, "errs", "g", ESMD_START_TRIM_HORIZON, reserved);
    assert_null(ops->create(&tc.map, &f.host, err, sizeof(err)));
    assert_non_null(strstr(err, "enable.auto.offset.store"));

    static const char *const badval[] = {"fetch.wait.max.ms", "soon", NULL};
    test_cfg_init(&tc, "errs", "g", ESMD_START_TRIM_HORIZON, badval);
    assert_null(ops->create(&tc.map, &f.host, err, sizeof(err)));
    assert_non_null(strstr(err, "fetch.wait.max.ms"));

    /* a good one: envelope size, and stop/destroy without start */
    test_cfg_init(&tc, "errs", "g", ESMD_START_TRIM_HORIZON, NULL);
    f.conn = ops->create(&tc.map, &f.host, err, sizeof(err));
    assert_non_null(f.conn);
    char want[256];
    snprintf(want, sizeof(want),
             "{\"eventSource\":\"SelfManagedKafka\",\"bootstrapServers\":\"%s\",\"records\":{}}",
             g_cluster.bootstraps);
    assert_int_equal(ops->envelope_size(f.conn), strlen(want));
    struct esmd_connector_stats st;
    ops->stats(f.conn, &st);
    assert_int_equal(st.lag, -1);
    assert_false(st.ready);
    ops->stop(f.conn, on_stopped, &f);
    assert_false(f.stopped);
    assert_true(run_until(&f, is_stopped, NULL, 5.0));
    fake_free(&f);
}

/* Everything is emitted in order; an encoded batch of real messages is exact and decodes to
 * what was produced; acks are committed and a second instance resumes exactly there. */
static void test_consume_ack_resume(void **state)
{
    const char *topic = "resume";
    const char *group = "g-resume";
    topic_create(topic);
    produce(topic, 0, NREC);

    struct fake f;
    fake_init(&f, topic);
    struct test_cfg tc;
    test_cfg_init(&tc, topic, group, ESMD_START_TRIM_HORIZON, NULL);
    fake_start(&f, &tc);
    wait_total(&f, NREC);
    esmd_test_run_for(f.loop, 0.3); /* nothing more arrives */
    assert_int_equal(f.total, NREC);
    assert_true(f.ready);
    for (int p = 0; p < NPART; p++) {
        assert_int_equal(f.parts[p].opens, 1);
        assert_non_null(f.parts[p].shard);
        assert_contiguous(&f.parts[p], 0, NREC / NPART);
    }

    /* encode real records: 3 of partition 0 and 2 of partition 1 */
    struct esmd_batch batch;
    struct esmd_batch_limits lim = {100, ESMD_MAX_PAYLOAD, ops->envelope_size(f.conn), true};
    esmd_batch_init(&batch, &lim);
    for (int i = 0; i < 3; i++)
        esmd_batch_add(&batch, f.parts[0].recs[i]);
    for (int i = 0; i < 2; i++)
        esmd_batch_add(&batch, f.parts[1].recs[i]);
    struct esmd_buf out = ESMD_BUF_INIT;
    ops->encode(f.conn, &batch, &out);
    assert_int_equal(out.len, esmd_batch_bytes(&batch));
    cJSON *root = cJSON_ParseWithLength(out.data, out.len);
    assert_non_null(root);
    char gkey[64];
    snprintf(gkey, sizeof(gkey), "%s-0", topic);
    const cJSON *g0 =
        cJSON_GetObjectItemCaseSensitive(cJSON_GetObjectItemCaseSensitive(root, "records"), gkey);
    assert_int_equal(cJSON_GetArraySize(g0), 3);
    const cJSON *r0 = cJSON_GetArrayItem(g0, 0); /* record i = 0: key-0, value-0, idx, ë */
    assert_string_equal(cJSON_GetObjectItemCaseSensitive(r0, "key")->valuestring, "a2V5LTA=");
    assert_string_equal(cJSON_GetObjectItemCaseSensitive(r0, "value")->valuestring, "dmFsdWUtMA==");
    assert_string_equal(cJSON_GetObjectItemCaseSensitive(r0, "timestampType")->valuestring,
                        "CREATE_TIME");
    char *headers = cJSON_PrintUnformatted(cJSON_GetObjectItemCaseSensitive(r0, "headers"));
    assert_string_equal(headers, "[{\"idx\":[48]},{\"\xc3\xab\":[-61,-85]}]");
    free(headers);
    const cJSON *r1 = cJSON_GetArrayItem(g0, 1); /* record i = 4, offset 1 */
    assert_int_equal(cJSON_GetObjectItemCaseSensitive(r1, "offset")->valueint, 1);
    assert_int_equal(cJSON_GetObjectItemCaseSensitive(r1, "partition")->valueint, 0);
    cJSON_Delete(root);
    esmd_buf_free(&out);
    esmd_batch_clear(&batch);

    /* ack p: next_seq 5*(p+1), in two steps and once backwards (ignored) */
    int64_t acked[NPART];
    for (int p = 0; p < NPART; p++) {
        acked[p] = 5 * (p + 1);
        ops->ack(f.conn, f.parts[p].shard, 2);
        ops->ack(f.conn, f.parts[p].shard, acked[p]);
        ops->ack(f.conn, f.parts[p].shard, 1);
    }
    int64_t want = 5 + 10 + 15 + 20;
    if (!run_until(&f, committed_at_least, &want, JOIN_TIMEOUT_S))
        fail_msg("the coalesced async commit did not complete");
    struct esmd_connector_stats st;
    ops->stats(f.conn, &st);
    assert_int_equal(st.committed, 5 + 10 + 15 + 20);
    assert_int_equal(st.lag, NREC - (5 + 10 + 15 + 20));
    assert_true(st.ready);
    fake_stop(&f);
    for (int p = 0; p < NPART; p++)
        assert_int_equal(f.parts[p].closes, 1); /* revoked on close */
    fake_free(&f);

    int64_t got[NPART];
    committed(group, topic, got);
    for (int p = 0; p < NPART; p++)
        assert_int_equal(got[p], acked[p]);

    /* a new instance of the group resumes exactly at the acked offsets */
    fake_init(&f, topic);
    fake_start(&f, &tc);
    size_t rest = 0;
    for (int p = 0; p < NPART; p++)
        rest += (size_t)(NREC / NPART - acked[p]);
    wait_total(&f, rest);
    esmd_test_run_for(f.loop, 0.3);
    assert_int_equal(f.total, rest);
    for (int p = 0; p < NPART; p++)
        assert_contiguous(&f.parts[p], acked[p], (size_t)(NREC / NPART - acked[p]));
    fake_stop(&f);
    fake_free(&f);
    committed(group, topic, got); /* nothing acked: nothing moved */
    for (int p = 0; p < NPART; p++)
        assert_int_equal(got[p], acked[p]);
}

/* A host that releases every record inside emit (the core does for a mapping that is stopping):
 * the connector touches no record after emit, which ASan checks (scripts/test's asan step); the
 * Redis connector wrote to the released record once (tests/unit/test_redis_emit.c). */
static void test_record_released_inside_emit(void **state)
{
    const char *topic = "released";
    topic_create(topic);
    produce(topic, 0, NREC);
    struct fake f;
    fake_init(&f, topic);
    f.release_in_emit = true;
    struct test_cfg tc;
    test_cfg_init(&tc, topic, "g-released", ESMD_START_TRIM_HORIZON, NULL);
    fake_start(&f, &tc);
    wait_total(&f, NREC);
    fake_stop(&f);
    assert_int_equal(f.total, NREC);
    fake_free(&f);
}

/* starting_position latest: records already in the topic are skipped. */
static void test_latest(void **state)
{
    const char *topic = "latest";
    topic_create(topic);
    produce(topic, 0, NREC);
    struct fake f;
    fake_init(&f, topic);
    struct test_cfg tc;
    test_cfg_init(&tc, topic, "g-latest", ESMD_START_LATEST, NULL);
    fake_start(&f, &tc);
    int n = NPART;
    assert_true(run_until(&f, shards_open, &n, JOIN_TIMEOUT_S));
    esmd_test_run_for(f.loop, 1.5); /* positions resolve to the end */
    assert_int_equal(f.total, 0);
    produce(topic, NREC, 2 * NPART);
    wait_total(&f, 2 * NPART);
    esmd_test_run_for(f.loop, 0.3);
    assert_int_equal(f.total, 2 * NPART);
    for (int p = 0; p < NPART; p++)
        assert_contiguous(&f.parts[p], NREC / NPART, 2);
    fake_stop(&f);
    fake_free(&f);
}

/* A paused partition emits nothing; after resume it continues without gaps or duplicates. */
static void test_pause_resume(void **state)
{
    const char *topic = "pause";
    topic_create(topic);
    produce(topic, 0, NREC);
    struct fake f;
    fake_init(&f, topic);
    f.parts[0].pause_on_first = true;
    struct test_cfg tc;
    /* small fetches: the paused partition has records in flight and prefetched */
    static const char *const small_fetch[] = {"message.max.bytes",
                                              "1000",
                                              "fetch.max.bytes",
                                              "2000",
                                              "max.partition.fetch.bytes",
                                              "1000",
                                              NULL};
    test_cfg_init(&tc, topic, "g-pause", ESMD_START_TRIM_HORIZON, small_fetch);
    fake_start(&f, &tc);
    size_t others = (size_t)(NREC / NPART * (NPART - 1));
    wait_total(&f, others + 1);
    esmd_test_run_for(f.loop, 0.5);
    for (int p = 1; p < NPART; p++)
        assert_contiguous(&f.parts[p], 0, NREC / NPART);
    assert_int_equal(f.parts[0].n, f.parts[0].n_at_pause); /* nothing after the pause */
    assert_true(f.parts[0].n < NREC / NPART);
    ops->pause(f.conn, f.parts[0].shard); /* idempotent */

    f.parts[0].pause_on_first = false;
    f.parts[0].paused = false;
    ops->resume(f.conn, f.parts[0].shard);
    ops->resume(f.conn, f.parts[0].shard); /* idempotent */
    wait_total(&f, NREC);
    esmd_test_run_for(f.loop, 0.3);
    assert_contiguous(&f.parts[0], 0, NREC / NPART);
    fake_stop(&f);
    fake_free(&f);
}

/* The cooperative-sticky assignor (incremental assign / unassign) and a second member joining:
 * partitions move between instances without loss or duplicates of acked records. */
static void test_cooperative_two_members(void **state)
{
    const char *topic = "coop";
    topic_create(topic);
    produce(topic, 0, NREC);
    static const char *const coop[] = {"partition.assignment.strategy", "cooperative-sticky", NULL};
    struct test_cfg tc;
    test_cfg_init(&tc, topic, "g-coop", ESMD_START_TRIM_HORIZON, coop);
    struct fake a, b;
    fake_init(&a, topic);
    fake_start(&a, &tc);
    wait_total(&a, NREC);
    for (int p = 0; p < NPART; p++) {
        assert_contiguous(&a.parts[p], 0, NREC / NPART);
        ops->ack(a.conn, a.parts[p].shard, NREC / NPART);
    }
    /* committed before b joins: b starts where a acked */
    int64_t all = NREC;
    if (!run_until(&a, committed_at_least, &all, JOIN_TIMEOUT_S))
        fail_msg("a's commit did not complete");

    /* b shares a's loop so both are served while the group rebalances */
    fake_init(&b, topic);
    ev_loop_destroy(b.loop);
    b.loop = a.loop;
    b.host.loop = a.loop;
    fake_start(&b, &tc);
    double deadline = ev_time() + JOIN_TIMEOUT_S;
    while (!(a.nopen > 0 && b.nopen > 0 && a.nopen + b.nopen == NPART) && ev_time() < deadline)
        ev_run(a.loop, EVRUN_ONCE);
    assert_true(a.nopen > 0 && b.nopen > 0);
    assert_int_equal(a.nopen + b.nopen, NPART);
    produce(topic, NREC, 2 * NPART); /* two more per partition, offsets 50 and 51 */
    deadline = ev_time() + JOIN_TIMEOUT_S;
    while (a.total + b.total < NREC + 2 * NPART && ev_time() < deadline)
        ev_run(a.loop, EVRUN_ONCE);
    assert_int_equal(a.total + b.total, NREC + 2 * NPART);
    for (int p = 0; p < NPART; p++) {
        /* whoever owns p now got exactly the new records of p */
        struct part_log *owner = a.parts[p].shard ? &a.parts[p] : &b.parts[p];
        int64_t last = owner->recs[owner->n - 1]->seq;
        assert_int_equal(last, NREC / NPART + 1);
        if (owner == &b.parts[p])
            assert_contiguous(owner, NREC / NPART, 2);
    }
    ops->stop(b.conn, on_stopped, &b);
    while (!b.stopped && ev_time() < deadline)
        ev_run(a.loop, EVRUN_ONCE);
    assert_true(b.stopped);
    b.loop = NULL;
    fake_release_all(&b);
    ops->destroy(b.conn);
    fake_stop(&a);
    fake_free(&a);
}

/* More records than one loop turn drains (1000): the drain re-arms itself until done. */
static void test_many(void **state)
{
    const char *topic = "many";
    const int many = 4000;
    topic_create(topic);
    produce(topic, 0, many);
    struct fake f;
    fake_init(&f, topic);
    struct test_cfg tc;
    test_cfg_init(&tc, topic, "g-many", ESMD_START_TRIM_HORIZON, NULL);
    fake_start(&f, &tc);
    wait_total(&f, (size_t)many);
    esmd_test_run_for(f.loop, 0.3);
    for (int p = 0; p < NPART; p++)
        assert_contiguous(&f.parts[p], 0, (size_t)(many / NPART));
    /* released early (as the core does after a batch) while the consumer runs on */
    fake_release_all(&f);
    fake_stop(&f);
    fake_free(&f);
}

/* destroy() without stop(), as the core does when it frees a mapping that never stopped: the
 * records come back first (the core counts them and destroys only then), and the consumer is
 * torn down without closing, with no hang. */
static void test_destroy_without_stop(void **state)
{
    const char *topic = "nostop";
    topic_create(topic);
    produce(topic, 0, 20);
    struct fake f;
    fake_init(&f, topic);
    struct test_cfg tc;
    test_cfg_init(&tc, topic, "g-nostop", ESMD_START_TRIM_HORIZON, NULL);
    fake_start(&f, &tc);
    wait_total(&f, 20);
    fake_free(&f);
}

/* detach (connector.h: the host goes away with records out): nothing reaches the host
 * afterwards, though the topic has more; destroy still works once the records are back. */
static void test_detach_with_records_out(void **state)
{
    const char *topic = "detach";
    topic_create(topic);
    produce(topic, 0, 20);
    struct fake f;
    fake_init(&f, topic);
    struct test_cfg tc;
    test_cfg_init(&tc, topic, "g-detach", ESMD_START_TRIM_HORIZON, NULL);
    fake_start(&f, &tc);
    wait_total(&f, 20);
    ops->detach(f.conn);
    produce(topic, 20, 20);
    size_t more = 21;
    assert_false(run_until(&f, total_at_least, &more, 3.0));
    assert_int_equal(f.total, 20);
    fake_free(&f);
}

static bool is_ready(struct fake *f, void *arg)
{
    return f->ready == *(bool *)arg;
}

/* All brokers down: not ready (and nothing lost); back up: ready again on an idle topic (through
 * librdkafka's statistics), and consumption continues where it was. */
static void test_broker_outage(void **state)
{
    const char *topic = "outage";
    topic_create(topic);
    produce(topic, 0, 40);
    struct fake f;
    fake_init(&f, topic);
    struct test_cfg tc;
    static const char *const fast_stats[] = {"statistics.interval.ms", "500",
                                             "reconnect.backoff.max.ms", "500", NULL};
    test_cfg_init(&tc, topic, "g-outage", ESMD_START_TRIM_HORIZON, fast_stats);
    fake_start(&f, &tc);
    wait_total(&f, 40);
    assert_true(f.ready);
    for (int b = 1; b <= 3; b++)
        rd_kafka_mock_broker_set_down(g_cluster.mcluster, b);
    bool want = false;
    assert_true(run_until(&f, is_ready, &want, JOIN_TIMEOUT_S));
    for (int b = 1; b <= 3; b++)
        rd_kafka_mock_broker_set_up(g_cluster.mcluster, b);
    want = true;
    assert_true(run_until(&f, is_ready, &want, JOIN_TIMEOUT_S));
    produce(topic, 40, 8);
    wait_total(&f, 48);
    esmd_test_run_for(f.loop, 0.3);
    for (int p = 0; p < NPART; p++) {
        struct part_log *pl = &f.parts[p];
        assert_true(pl->n >= 12);
        assert_int_equal(pl->recs[pl->n - 1]->seq, 11);
    }
    fake_stop(&f);
    fake_free(&f);
}

/* at_timestamp without a committed offset: a timestamp after every record starts at the end. */
static void test_at_timestamp(void **state)
{
    const char *topic = "atts";
    topic_create(topic);
    produce(topic, 0, NREC);
    struct fake f;
    fake_init(&f, topic);
    struct test_cfg tc;
    test_cfg_init(&tc, topic, "g-atts", ESMD_START_AT_TIMESTAMP, NULL);
    tc.map.kafka.starting_position_timestamp_ms = esmd_now_ms() + 3600 * 1000;
    fake_start(&f, &tc);
    int n = NPART;
    assert_true(run_until(&f, shards_open, &n, JOIN_TIMEOUT_S));
    esmd_test_run_for(f.loop, 1.0);
    assert_int_equal(f.total, 0);
    produce(topic, NREC, NPART);
    wait_total(&f, NPART);
    for (int p = 0; p < NPART; p++)
        assert_contiguous(&f.parts[p], NREC / NPART, 1);
    fake_stop(&f);
    fake_free(&f);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_create_errors),
        cmocka_unit_test(test_consume_ack_resume),
        cmocka_unit_test(test_latest),
        cmocka_unit_test(test_record_released_inside_emit),
        cmocka_unit_test(test_pause_resume),
        cmocka_unit_test(test_cooperative_two_members),
        cmocka_unit_test(test_at_timestamp),
        cmocka_unit_test(test_many),
        cmocka_unit_test(test_destroy_without_stop),
        cmocka_unit_test(test_detach_with_records_out),
        cmocka_unit_test(test_broker_outage), /* last: it takes the cluster down for a while */
    };
    return cmocka_run_group_tests(tests, cluster_setup, cluster_teardown);
}
