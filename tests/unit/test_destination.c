/* Tests for src/outbox.c and src/destination.c. URI checks, payload checks, readiness detail and
 * shutdown run without a server (the outbox connections are made asynchronously and never succeed).
 * The rest needs a live PostgreSQL: ESMD_TEST_PG holds a libpq conninfo; the test creates a scratch
 * database esmd_test_dest_<pid> there (dropped at the end) and applies the migrations. Without
 * ESMD_TEST_PG those tests are skipped (tests/integration/test_destinations.py runs them
 * against the fixture's server). Kafka, Redis and HTTP end to end: test_destinations.py. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "testutil.h"

#include "esmd/config.h"
#include "esmd/destination.h"
#include "esmd/log.h"
#include "esmd/metrics.h"
#include "esmd/pg.h"

#include <ev.h>
#include <libpq-fe.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define DOWN_PG "host=127.0.0.1 port=1 connect_timeout=2"

/* ---- helpers ---------------------------------------------------------------------------- */

static const char *g_yaml = "postgres: postgresql://localhost/esmd\n"
                            "connections:\n"
                            "  k: { type: kafka, bootstrap_servers: \"127.0.0.1:1\" }\n"
                            "  r: { type: redis, url: \"redis://127.0.0.1:1/0\" }\n"
                            "functions:\n"
                            "  f:\n"
                            "    url: http://127.0.0.1:1/\n"
                            "    async: { on_success: \"http://u:hunter2@127.0.0.1:1/ok\",\n"
                            "             on_failure: pgqueue://failed }\n"
                            "mappings:\n"
                            "  - { name: m, function: f, source: { kafka: k, topics: [t] },\n"
                            "      on_failure: \"kafka://k/failures\" }\n";

static struct esmd_config *config(void)
{
    struct esmd_config_errors errs;
    esmd_config_errors_init(&errs);
    struct esmd_config *cfg = esmd_config_parse_flags(g_yaml, strlen(g_yaml), "test.yaml",
                                                      ESMD_CONFIG_ALLOW_UNBUILT, &errs);
    if (!cfg) {
        char line[512];
        esmd_config_error_format(&errs.items[0], line, sizeof(line));
        fail_msg("config: %s", line);
    }
    esmd_config_errors_free(&errs);
    return cfg;
}

/* One send's outcome. */
struct sent {
    int calls;
    bool ok;
    char err[256];
};

static bool g_in_send; /* set around esmd_dests_send: callbacks must not run then */
static int g_reentrant;

static void on_sent(void *ud, bool ok, const char *err)
{
    struct sent *s = ud;
    if (g_in_send)
        g_reentrant++;
    s->calls++;
    s->ok = ok;
    snprintf(s->err, sizeof(s->err), "%s", err ? err : "");
}

static int do_send(struct esmd_dests *d, const char *uri, const char *payload, const char *key,
                   struct sent *s)
{
    g_in_send = true;
    int rc =
        esmd_dests_send(d, uri, payload, strlen(payload), key, key ? strlen(key) : 0, on_sent, s);
    g_in_send = false;
    return rc;
}

struct all_sent {
    struct sent *s;
    int n;
};

static bool cond_all_sent(void *arg)
{
    struct all_sent *a = arg;
    for (int i = 0; i < a->n; i++)
        if (a->s[i].calls == 0)
            return false;
    return true;
}

static void on_stopped(void *ud)
{
    if (g_in_send)
        g_reentrant++;
    (*(int *)ud)++;
}

static bool cond_int(void *arg)
{
    return *(int *)arg > 0;
}

/* ---- without a server ------------------------------------------------------------------- */

static void test_check_uris(void **state)
{
    (void)state;
    struct ev_loop *loop = ev_loop_new(EVFLAG_AUTO);
    struct esmd_config *cfg = config();
    char err[512];
    struct esmd_dests *d = esmd_dests_new(loop, cfg, DOWN_PG, "unit", err, sizeof(err));
    assert_non_null(d);
    const char *good[] = {"kafka://k/topic.a-1", "redis://r/stream:1",   "pgqueue://q_1",
                          "http://h/x?y=1",      "https://u:p@h:8443/x", "function://f"};
    for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++)
        if (esmd_dests_check(d, good[i], err, sizeof(err)) != 0)
            fail_msg("%s: %s", good[i], err);
    struct {
        const char *uri, *msg;
    } bad[] = {
        {"kafka://r/t", "not a kafka connection"},
        {"kafka://nope/t", "\"nope\""},
        {"kafka://k/", "kafka://CONNECTION/TOPIC"},
        {"kafka://k/a*b", "topic"},
        {"redis://k/s", "not a redis connection"},
        {"pgqueue://bad/name", "pgqueue://QUEUE"},
        {"http://", "needs a host"},
        {"http://a b", "spaces"},
        {"ftp://x", "not a destination URI"},
        {"function://g", "function \"g\" is not defined"},
        {"", "empty"},
        {"kafka://k/..", "not . or .."},
        {"kafka://k/.", "not . or .."},
        {"redis://h:99999999/abc", "connection \"h:99999999\" is not defined"},
        {"redis://r", "redis://CONNECTION/STREAM"},
        {"pgqueue://q\tx", "\"pgqueue://q\\tx\""},
    };
    const struct esmd_dests_names names = {.cfg = cfg};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        err[0] = '\0';
        assert_int_equal(esmd_dests_check(d, bad[i].uri, err, sizeof(err)), ESMD_EINVAL);
        if (!strstr(err, bad[i].msg))
            fail_msg("%s: got \"%s\", want \"%s\"", bad[i].uri, err, bad[i].msg);
        /* the configuration loader's check is the same parser: the same message */
        char err2[512] = "";
        assert_int_equal(esmd_dests_check_uri(&names, bad[i].uri, err2, sizeof(err2)), ESMD_EINVAL);
        assert_string_equal(err, err2);
    }
    for (size_t i = 0; i < sizeof(good) / sizeof(good[0]); i++)
        assert_int_equal(esmd_dests_check_uri(&names, good[i], err, sizeof(err)), 0);
    esmd_dests_free(d);
    esmd_config_free(cfg);
    ev_loop_destroy(loop);
    esmd_metrics_reset();
}

static void test_send_refusals(void **state)
{
    (void)state;
    struct ev_loop *loop = ev_loop_new(EVFLAG_AUTO);
    struct esmd_config *cfg = config();
    char err[512];
    struct esmd_dests *d = esmd_dests_new(loop, cfg, DOWN_PG, "unit", err, sizeof(err));
    assert_non_null(d);
    struct sent s = {0};
    assert_int_equal(do_send(d, "kafka://nope/t", "{}", NULL, &s), ESMD_EINVAL);
    assert_int_equal(esmd_dests_send(d, "pgqueue://q", "{\"a\":\0}", 7, NULL, 0, on_sent, &s),
                     ESMD_EINVAL);
    assert_int_equal(esmd_dests_send(d, "pgqueue://q", "\"\xc3\x28\"", 4, NULL, 0, on_sent, &s),
                     ESMD_EINVAL);
    assert_int_equal(esmd_dests_send(d, "pgqueue://q", "\"\xed\xa0\x80\"", 5, NULL, 0, on_sent, &s),
                     ESMD_EINVAL); /* a surrogate */
    assert_int_equal(esmd_dests_send(d, "pgqueue://q", "{}", 2, NULL, 0, NULL, NULL), ESMD_EINVAL);
    esmd_test_run_for(loop, 0.05);
    assert_int_equal(s.calls, 0);
    esmd_dests_free(d);
    assert_int_equal(s.calls, 0);
    esmd_config_free(cfg);
    ev_loop_destroy(loop);
    esmd_metrics_reset();
}

/* Postgres down: sends wait; stop does not finish while they do; free fails them. */
static void test_free_fails_waiting_sends(void **state)
{
    (void)state;
    FILE *logf = tmpfile();
    esmd_log_set_stream(logf);
    struct ev_loop *loop = ev_loop_new(EVFLAG_AUTO);
    struct esmd_config *cfg = config();
    char err[512];
    struct esmd_dests *d = esmd_dests_new(loop, cfg, DOWN_PG, "unit", err, sizeof(err));
    assert_non_null(d);
    struct sent s[3] = {{0}};
    assert_int_equal(do_send(d, "pgqueue://q", "{\"n\":1}", NULL, &s[0]), 0);
    assert_int_equal(do_send(d, "http://127.0.0.1:1/x", "[1,2]", NULL, &s[1]), 0);
    esmd_test_run_for(loop, 0.1);
    assert_int_equal(do_send(d, "kafka://k/t", "\"é\"", "key", &s[2]), 0);
    int stopped = 0;
    esmd_dests_stop(d, on_stopped, &stopped);
    esmd_test_run_for(loop, 0.2);
    assert_int_equal(stopped, 0);
    for (int i = 0; i < 3; i++)
        assert_int_equal(s[i].calls, 0);
    esmd_dests_free(d);
    for (int i = 0; i < 3; i++) {
        assert_int_equal(s[i].calls, 1);
        assert_false(s[i].ok);
        assert_true(s[i].err[0] != '\0');
    }
    assert_int_equal(stopped, 0);
    esmd_config_free(cfg);
    ev_loop_destroy(loop);
    esmd_metrics_reset();
    esmd_log_set_stream(stderr);
    fclose(logf);
}

static void test_ready_detail(void **state)
{
    (void)state;
    struct ev_loop *loop = ev_loop_new(EVFLAG_AUTO);
    struct esmd_config *cfg = config();
    char err[512];
    struct esmd_dests *d = esmd_dests_new(loop, cfg, DOWN_PG, "unit", err, sizeof(err));
    assert_non_null(d);
    struct esmd_buf b = ESMD_BUF_INIT;
    assert_true(esmd_dests_ready(d, &b));
    const char *detail = esmd_buf_cstr(&b);
    assert_non_null(strstr(detail, "\"kafka://k/failures\":{\"ready\":true,\"pending\":0}"));
    assert_non_null(strstr(detail, "\"pgqueue://failed\":{\"ready\":true,\"pending\":0}"));
    assert_non_null(strstr(detail, "\"http://u:***@127.0.0.1:1/ok\":{\"ready\":true"));
    assert_null(strstr(detail, "hunter2"));
    assert_int_equal(detail[0], '{');
    assert_int_equal(detail[b.len - 1], '}');
    esmd_buf_reset(&b);
    esmd_metrics_render(&b);
    assert_non_null(strstr(esmd_buf_cstr(&b), "esmd_destination_deliveries_total{destination="
                                              "\"kafka://k/failures\"} 0"));
    assert_non_null(strstr(esmd_buf_cstr(&b), "esmd_destination_pending{destination="
                                              "\"pgqueue://failed\"} 0"));
    assert_null(strstr(esmd_buf_cstr(&b), "hunter2"));
    esmd_buf_free(&b);
    esmd_dests_free(d);
    esmd_config_free(cfg);
    ev_loop_destroy(loop);
    esmd_metrics_reset();
}

/* ---- with Postgres ---------------------------------------------------------------------- */

static void reset_outbox(PGconn *c)
{
    esmd_test_pg_exec(c, "DELETE FROM esmd.outbox");
    esmd_test_pg_exec(c, "DELETE FROM esmd.queue_messages");
}

struct rows_cond {
    PGconn *c;
    const char *sql;
    long want;
};

static bool cond_rows(void *arg)
{
    struct rows_cond *rc = arg;
    return esmd_test_pg_long(rc->c, rc->sql) == rc->want;
}

static void wait_rows(struct ev_loop *loop, PGconn *c, const char *sql, long want, double timeout)
{
    struct rows_cond rc = {c, sql, want};
    if (!esmd_test_run_until(loop, cond_rows, &rc, timeout))
        fail_msg("%s: got %ld, want %ld", sql, esmd_test_pg_long(c, sql), want);
}

/* Group commit, a failing destination next to a working one, the failure recorded on the rows,
 * readiness and metrics, graceful stop. */
static void test_send_deliver_and_fail(void **state)
{
    (void)state;
    ESMD_TEST_NEED_PG();
    FILE *logf = tmpfile();
    esmd_log_set_stream(logf);
    PGconn *c = esmd_test_pg_connect();
    reset_outbox(c);
    struct ev_loop *loop = ev_loop_new(EVFLAG_AUTO);
    struct esmd_config *cfg = config();
    char err[512];
    struct esmd_dests *d =
        esmd_dests_new(loop, cfg, esmd_test_pg_conninfo(), "unit", err, sizeof(err));
    assert_non_null(d);
    struct sent s[15];
    memset(s, 0, sizeof(s));
    char body[64];
    for (int i = 0; i < 10; i++) {
        snprintf(body, sizeof(body), "{\"down\":%d}", i);
        assert_int_equal(do_send(d, "http://127.0.0.1:1/refused", body, NULL, &s[i]), 0);
    }
    for (int i = 10; i < 15; i++) {
        snprintf(body, sizeof(body), "{\"up\": %d }", i);
        assert_int_equal(do_send(d, "pgqueue://unit_q", body, NULL, &s[i]), 0);
    }
    struct all_sent all = {s, 15};
    assert_true(esmd_test_run_until(loop, cond_all_sent, &all, 10));
    assert_int_equal(g_reentrant, 0);
    for (int i = 0; i < 15; i++) {
        assert_int_equal(s[i].calls, 1);
        assert_true(s[i].ok);
    }
    /* one INSERT: one transaction start time */
    assert_int_equal(esmd_test_pg_long(c, "SELECT count(DISTINCT created_at) FROM esmd.outbox"), 1);
    /* the working destination is not held up by the failing one */
    wait_rows(loop, c, "SELECT count(*) FROM esmd.queue_messages WHERE queue = 'unit_q'", 5, 10);
    assert_int_equal(esmd_test_pg_long(c, "SELECT count(*) FROM esmd.queue_messages WHERE body ~ "
                                          "'^\\{\"up\": 1[0-4] \\}$'"),
                     5);
    wait_rows(loop, c, "SELECT count(*) FROM esmd.outbox WHERE destination = 'pgqueue://unit_q'", 0,
              10);
    /* the failing one: every row tried once (the first claim takes them all), then backoff */
    wait_rows(loop, c,
              "SELECT count(*) FROM esmd.outbox WHERE attempts >= 1 AND last_error LIKE 'http: %' "
              "AND lease_owner IS NULL AND lease_token IS NULL AND next_attempt_at > now()",
              10, 10);
    struct esmd_buf b = ESMD_BUF_INIT;
    assert_false(esmd_dests_ready(d, &b));
    const char *detail = esmd_buf_cstr(&b);
    assert_non_null(strstr(detail, "\"http://127.0.0.1:1/refused\":{\"ready\":false,\"error\":"
                                   "\"http: "));
    assert_non_null(strstr(detail, "\"pgqueue://unit_q\":{\"ready\":true"));
    esmd_buf_reset(&b);
    esmd_metrics_render(&b);
    assert_non_null(strstr(esmd_buf_cstr(&b), "esmd_destination_deliveries_total{destination="
                                              "\"pgqueue://unit_q\"} 5"));
    assert_null(strstr(esmd_buf_cstr(&b), "esmd_destination_delivery_failures_total{destination="
                                          "\"http://127.0.0.1:1/refused\"} 0"));
    esmd_buf_free(&b);
    int stopped = 0;
    esmd_dests_stop(d, on_stopped, &stopped);
    assert_int_equal(stopped, 0);
    assert_true(esmd_test_run_until(loop, cond_int, &stopped, 10));
    assert_int_equal(stopped, 1);
    esmd_dests_free(d);
    /* rows not delivered stay for the next start */
    assert_int_equal(esmd_test_pg_long(c, "SELECT count(*) FROM esmd.outbox"), 10);
    PQfinish(c);
    esmd_config_free(cfg);
    ev_loop_destroy(loop);
    esmd_metrics_reset();
    esmd_log_set_stream(stderr);
    fclose(logf);
}

/* A record the queue refuses (over its 1 MiB limit) fails alone; the rest of its claim is
 * delivered. */
static void test_pgqueue_refused_record(void **state)
{
    (void)state;
    ESMD_TEST_NEED_PG();
    FILE *logf = tmpfile();
    esmd_log_set_stream(logf);
    PGconn *c = esmd_test_pg_connect();
    reset_outbox(c);
    struct ev_loop *loop = ev_loop_new(EVFLAG_AUTO);
    struct esmd_config *cfg = config();
    char err[512];
    struct esmd_dests *d =
        esmd_dests_new(loop, cfg, esmd_test_pg_conninfo(), "unit", err, sizeof(err));
    assert_non_null(d);
    size_t big = 1100 * 1024;
    char *payload = malloc(big + 3);
    payload[0] = '"';
    memset(payload + 1, 'x', big);
    payload[big + 1] = '"';
    payload[big + 2] = '\0';
    struct sent s[4];
    memset(s, 0, sizeof(s));
    assert_int_equal(do_send(d, "pgqueue://big_q", "1", NULL, &s[0]), 0);
    assert_int_equal(do_send(d, "pgqueue://big_q", payload, NULL, &s[1]), 0);
    assert_int_equal(do_send(d, "pgqueue://big_q", "2", NULL, &s[2]), 0);
    assert_int_equal(do_send(d, "pgqueue://big_q", "3", NULL, &s[3]), 0);
    free(payload);
    struct all_sent all = {s, 4};
    assert_true(esmd_test_run_until(loop, cond_all_sent, &all, 10));
    wait_rows(loop, c, "SELECT count(*) FROM esmd.queue_messages WHERE queue = 'big_q'", 3, 10);
    assert_int_equal(
        esmd_test_pg_long(c, "SELECT count(*) FROM esmd.queue_messages WHERE queue = 'big_q' "
                             "AND body IN ('1', '2', '3')"),
        3);
    wait_rows(loop, c,
              "SELECT count(*) FROM esmd.outbox WHERE attempts >= 1 AND last_error LIKE "
              "'pgqueue: %1048576 bytes%'",
              1, 10);
    assert_int_equal(esmd_test_pg_long(c, "SELECT count(*) FROM esmd.outbox"), 1);
    esmd_dests_free(d);
    PQfinish(c);
    esmd_config_free(cfg);
    ev_loop_destroy(loop);
    esmd_metrics_reset();
    esmd_log_set_stream(stderr);
    fclose(logf);
}

/* Leases: an earlier process of this instance id (released at start), a live other instance
 * (left alone), an expired lease (taken), a row this instance cannot write (left alone). */
static void test_leases(void **state)
{
    (void)state;
    ESMD_TEST_NEED_PG();
    PGconn *c = esmd_test_pg_connect();
    reset_outbox(c);
    esmd_test_pg_exec(c, "INSERT INTO esmd.outbox (destination, payload, lease_owner, lease_token, "
                         "lease_until, next_attempt_at) VALUES "
                         "('pgqueue://lq', '\"mine-earlier\"', 'unit', gen_random_uuid(), "
                         " now() + interval '60 s', now() + interval '60 s'), "
                         "('pgqueue://lq', '\"other-live\"', 'other', gen_random_uuid(), "
                         " now() + interval '60 s', now() + interval '60 s'), "
                         "('pgqueue://lq', '\"other-expired\"', 'other', gen_random_uuid(), "
                         " now() - interval '1 s', now() - interval '1 s'), "
                         "('kafka://elsewhere/t', '\"not-mine\"', NULL, NULL, NULL, now())");
    struct ev_loop *loop = ev_loop_new(EVFLAG_AUTO);
    struct esmd_config *cfg = config();
    char err[512];
    struct esmd_dests *d =
        esmd_dests_new(loop, cfg, esmd_test_pg_conninfo(), "unit", err, sizeof(err));
    assert_non_null(d);
    wait_rows(loop, c, "SELECT count(*) FROM esmd.queue_messages WHERE queue = 'lq'", 2, 10);
    esmd_test_run_for(loop, 1.5);
    assert_int_equal(esmd_test_pg_long(c, "SELECT count(*) FROM esmd.queue_messages WHERE body IN "
                                          "('\"mine-earlier\"', '\"other-expired\"')"),
                     2);
    assert_int_equal(esmd_test_pg_long(c, "SELECT count(*) FROM esmd.outbox WHERE payload IN "
                                          "('\"other-live\"', '\"not-mine\"')"),
                     2);
    assert_int_equal(esmd_test_pg_long(c, "SELECT count(*) FROM esmd.outbox"), 2);
    struct esmd_buf b = ESMD_BUF_INIT;
    assert_true(esmd_dests_ready(d, &b)); /* rows of another configuration: shown only */
    const char *detail = esmd_buf_cstr(&b);
    assert_non_null(strstr(detail, "\"kafka://elsewhere/t\":{\"ready\":false,\"error\":\"not "
                                   "written by this instance: "));
    assert_non_null(strstr(detail, "\"pending\":1}"));
    esmd_buf_free(&b);
    esmd_dests_free(d);
    PQfinish(c);
    esmd_config_free(cfg);
    ev_loop_destroy(loop);
    esmd_metrics_reset();
}

/* esmd_dests_free() from inside a send callback and from the stop callback. */
struct freer {
    struct esmd_dests *d;
    int calls;
};

static void free_on_sent(void *ud, bool ok, const char *err)
{
    struct freer *f = ud;
    (void)ok;
    (void)err;
    if (f->calls++ == 0)
        esmd_dests_free(f->d);
}

static void free_on_stopped(void *ud)
{
    struct freer *f = ud;
    f->calls++;
    esmd_dests_free(f->d);
}

static bool cond_freer(void *arg)
{
    return ((struct freer *)arg)->calls > 0;
}

static void test_free_from_callbacks(void **state)
{
    (void)state;
    ESMD_TEST_NEED_PG();
    PGconn *c = esmd_test_pg_connect();
    reset_outbox(c);
    struct ev_loop *loop = ev_loop_new(EVFLAG_AUTO);
    struct esmd_config *cfg = config();
    char err[512];
    struct freer f = {0};
    f.d = esmd_dests_new(loop, cfg, esmd_test_pg_conninfo(), "unit", err, sizeof(err));
    assert_non_null(f.d);
    for (int i = 0; i < 3; i++)
        assert_int_equal(esmd_dests_send(f.d, "pgqueue://fq", "{}", 2, NULL, 0, free_on_sent, &f),
                         0);
    assert_true(esmd_test_run_until(loop, cond_freer, &f, 10));
    assert_int_equal(f.calls, 3); /* the other two still hear of their commit */
    esmd_test_run_for(loop, 0.2);

    struct freer g = {0};
    g.d = esmd_dests_new(loop, cfg, esmd_test_pg_conninfo(), "unit", err, sizeof(err));
    assert_non_null(g.d);
    esmd_test_run_for(loop, 0.3);
    esmd_dests_stop(g.d, free_on_stopped, &g);
    assert_true(esmd_test_run_until(loop, cond_freer, &g, 10));
    esmd_test_run_for(loop, 0.1);
    PQfinish(c);
    esmd_config_free(cfg);
    ev_loop_destroy(loop);
    esmd_metrics_reset();
}

static int group_setup(void **state)
{
    (void)state;
    return esmd_test_pg_setup("esmd_test_dest", true);
}

static int group_teardown(void **state)
{
    (void)state;
    return esmd_test_pg_teardown();
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_check_uris),
        cmocka_unit_test(test_send_refusals),
        cmocka_unit_test(test_free_fails_waiting_sends),
        cmocka_unit_test(test_ready_detail),
        cmocka_unit_test(test_send_deliver_and_fail),
        cmocka_unit_test(test_pgqueue_refused_record),
        cmocka_unit_test(test_leases),
        cmocka_unit_test(test_free_from_callbacks),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
