/* Tests for src/pg.c against a live PostgreSQL server.
 *
 * ESMD_TEST_PG holds a libpq conninfo (or URI). The test creates a scratch database
 * esmd_test_pg_<pid> there and drops it at the end; if the role may not create databases it
 * uses the given database and drops its schema esmd between tests. Without ESMD_TEST_PG every
 * test that needs the server is skipped. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "testutil.h"

#include "esmd/log.h"
#include "esmd/pg.h"

#include <ev.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* ---- helpers ---------------------------------------------------------------------------- */

static void assert_scalar(PGconn *c, const char *sql, const char *want)
{
    char *v = esmd_test_pg_text(c, sql);
    if (strcmp(v, want) != 0)
        fail_msg("%s: got '%s', want '%s'", sql, v, want);
    free(v);
}

static void reset_schema(void)
{
    PGconn *c = esmd_test_pg_connect();
    PQsetNoticeProcessor(c, NULL, NULL);
    free(esmd_test_pg_text(c, "SET client_min_messages = warning"));
    free(esmd_test_pg_text(c, "DROP SCHEMA IF EXISTS esmd CASCADE"));
    PQfinish(c);
}

static bool cond_ready(void *arg)
{
    return esmd_pg_ready(arg);
}

static bool cond_not_ready(void *arg)
{
    return !esmd_pg_ready(arg);
}

/* One query's outcome, filled by on_result. */
struct outcome {
    int calls;
    int seq;
    bool have_res;
    ExecStatusType status;
    bool value_null;
    char value[256];
    char value2[256];
    char err[1024];
};

static int g_seq;
static bool g_in_query; /* set around esmd_pg_query: callbacks must not run then */
static int g_reentrant;

static void on_result(void *ud, const PGresult *res, const char *err)
{
    struct outcome *o = ud;
    if (g_in_query)
        g_reentrant++;
    o->calls++;
    o->seq = ++g_seq;
    o->have_res = res != NULL;
    if (res) {
        o->status = PQresultStatus(res);
        if (PQntuples(res) > 0 && PQnfields(res) > 0) {
            o->value_null = PQgetisnull(res, 0, 0);
            snprintf(o->value, sizeof(o->value), "%s", PQgetvalue(res, 0, 0));
            if (PQnfields(res) > 1)
                snprintf(o->value2, sizeof(o->value2), "%s", PQgetvalue(res, 0, 1));
        }
    }
    snprintf(o->err, sizeof(o->err), "%s", err ? err : "");
}

static bool cond_called(void *arg)
{
    return ((struct outcome *)arg)->calls > 0;
}

static void query(struct esmd_pg *pg, const char *sql, int n, const char *const *params,
                  struct outcome *o)
{
    g_in_query = true;
    assert_int_equal(esmd_pg_query(pg, sql, n, params, on_result, o), 0);
    g_in_query = false;
    assert_int_equal(o->calls, 0);
}

static struct esmd_pg *connect_ready(struct ev_loop *loop)
{
    char err[256] = "";
    struct esmd_pg *pg = esmd_pg_new(loop, esmd_test_pg_conninfo(), "test", err, sizeof(err));
    if (!pg)
        fail_msg("esmd_pg_new: %s", err);
    assert_true(esmd_test_run_until(loop, cond_ready, pg, 10));
    return pg;
}

/* ---- tests without a server ------------------------------------------------------------- */

static void test_migration_names(void **state)
{
    (void)state;
    assert_true(esmd_pg_migration_count() >= 1);
    assert_string_equal(esmd_pg_migration_name(0), "0001_mapping_state");
    assert_null(esmd_pg_migration_name(esmd_pg_migration_count()));
}

static void test_bad_conninfo(void **state)
{
    (void)state;
    struct ev_loop *loop = ev_loop_new(EVFLAG_AUTO);
    char err[256] = "";
    assert_null(esmd_pg_new(loop, "host=localhost bogus_option=1", "t", err, sizeof(err)));
    assert_non_null(strstr(err, "bogus_option"));
    assert_null(esmd_pg_new(loop, "postgresql://u@h/d?nope=1", "t", err, sizeof(err)));
    assert_true(err[0] != '\0');
    ev_loop_destroy(loop);
}

static void test_migrate_list_validation(void **state)
{
    (void)state;
    char err[256] = "";
    int applied = -1;
    const char *bad_names[] = {"no_number"};
    const char *sqls[] = {"SELECT 1", "SELECT 1"};
    /* rejected before connecting: port 1 is never dialled */
    assert_int_equal(esmd_pg_migrate_list("host=127.0.0.1 port=1", bad_names, sqls, 1, &applied,
                                          err, sizeof(err)),
                     ESMD_EINVAL);
    assert_int_equal(applied, 0);
    assert_non_null(strstr(err, "no_number"));
    const char *dup_names[] = {"0002_a", "0002_b"};
    assert_int_equal(esmd_pg_migrate_list("host=127.0.0.1 port=1", dup_names, sqls, 2, &applied,
                                          err, sizeof(err)),
                     ESMD_EINVAL);
    assert_non_null(strstr(err, "same version"));
}

/* Unreachable server: not ready, queries wait, free closes them; no password in logs. */
static void test_unreachable_and_redacted(void **state)
{
    (void)state;
    FILE *logf = tmpfile();
    assert_non_null(logf);
    esmd_log_set_stream(logf);
    struct ev_loop *loop = ev_loop_new(EVFLAG_AUTO);
    char err[256] = "";
    struct esmd_pg *pg =
        esmd_pg_new(loop, "host=127.0.0.1 port=1 user=someone password=hunter2 connect_timeout=2",
                    "down", err, sizeof(err));
    assert_non_null(pg);
    struct outcome o = {0};
    query(pg, "SELECT 1", 0, NULL, &o);
    esmd_test_run_for(loop, 0.5); /* a few reconnect attempts */
    assert_false(esmd_pg_ready(pg));
    assert_int_equal(o.calls, 0);
    assert_true(esmd_pg_last_error(pg)[0] != '\0');
    esmd_pg_free(pg);
    assert_int_equal(o.calls, 1);
    assert_false(o.have_res);
    assert_string_equal(o.err, "closed");
    ev_loop_destroy(loop);

    esmd_log_set_stream(NULL);
    fflush(logf);
    long len = ftell(logf);
    assert_true(len > 0);
    char *text = calloc(1, (size_t)len + 1);
    rewind(logf);
    assert_int_equal(fread(text, 1, (size_t)len, logf), (size_t)len);
    fclose(logf);
    assert_non_null(strstr(text, "cannot connect"));
    assert_non_null(strstr(text, "user=someone"));
    assert_null(strstr(text, "hunter2"));
    /* one "cannot connect" line, not one per attempt */
    assert_null(strstr(strstr(text, "cannot connect") + 1, "cannot connect"));
    free(text);
}

/* ---- migrations ------------------------------------------------------------------------- */

static void test_migrate_applies_all_then_none(void **state)
{
    (void)state;
    ESMD_TEST_NEED_PG();
    reset_schema();
    char err[512] = "";
    int applied = -1;
    assert_int_equal(esmd_pg_migrate(esmd_test_pg_conninfo(), &applied, err, sizeof(err)), 0);
    assert_string_equal(err, "");
    assert_int_equal(applied, (int)esmd_pg_migration_count());

    PGconn *c = esmd_test_pg_connect();
    char want[32];
    snprintf(want, sizeof(want), "%zu", esmd_pg_migration_count());
    assert_scalar(c, "SELECT count(*) FROM esmd.schema_migrations", want);
    assert_scalar(c,
                  "SELECT version || ' ' || name || ' ' || (applied_at IS NOT NULL) "
                  "FROM esmd.schema_migrations ORDER BY version LIMIT 1",
                  "0001 0001_mapping_state true");
    /* mapping_state with Lambda's defaults */
    free(esmd_test_pg_text(c, "INSERT INTO esmd.mapping_state (name, function, source_kind) "
                              "VALUES ('m1', 'orders', 'kafka')"));
    assert_scalar(c,
                  "SELECT concat_ws('|', enabled, state, state_transition_reason, "
                  "last_processing_result, config IS NULL, instance_id IS NULL, "
                  "updated_at IS NOT NULL) FROM esmd.mapping_state WHERE name = 'm1'",
                  "t|Creating|User action|No records processed|t|t|t");
    PGresult *res = PQexec(c, "UPDATE esmd.mapping_state SET state = 'Running'");
    assert_int_equal(PQresultStatus(res), PGRES_FATAL_ERROR);
    assert_string_equal(PQresultErrorField(res, PG_DIAG_SQLSTATE), "23514"); /* check_violation */
    PQclear(res);
    /* a version from a newer esmd is left alone */
    free(esmd_test_pg_text(
        c, "INSERT INTO esmd.schema_migrations (version, name) VALUES ('9999', 'x')"));

    applied = -1;
    assert_int_equal(esmd_pg_migrate(esmd_test_pg_conninfo(), &applied, err, sizeof(err)), 0);
    assert_int_equal(applied, 0);
    snprintf(want, sizeof(want), "%zu", esmd_pg_migration_count() + 1);
    assert_scalar(c, "SELECT count(*) FROM esmd.schema_migrations", want);
    assert_scalar(c, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'", "0");
    PQfinish(c);
}

struct migrator {
    int rc;
    int applied;
    char err[512];
};

static const char *g_conc_names[] = {"0001_slow", "0002_more"};
static const char *g_conc_sqls[] = {
    "CREATE TABLE esmd.t_conc (id int); SELECT pg_sleep(0.5);",
    "INSERT INTO esmd.t_conc VALUES (1);",
};

static void *migrator_main(void *arg)
{
    struct migrator *m = arg;
    m->rc = esmd_pg_migrate_list(esmd_test_pg_conninfo(), g_conc_names, g_conc_sqls, 2, &m->applied,
                                 m->err, sizeof(m->err));
    return NULL;
}

static void test_migrate_concurrent(void **state)
{
    (void)state;
    ESMD_TEST_NEED_PG();
    reset_schema();
    struct migrator m[2];
    memset(m, 0, sizeof(m));
    pthread_t th[2];
    for (int i = 0; i < 2; i++)
        assert_int_equal(pthread_create(&th[i], NULL, migrator_main, &m[i]), 0);
    for (int i = 0; i < 2; i++)
        assert_int_equal(pthread_join(th[i], NULL), 0);
    for (int i = 0; i < 2; i++)
        if (m[i].rc != 0)
            fail_msg("migrator %d: %s", i, m[i].err);
    /* one applied both, the other waited for the lock and found nothing to do */
    assert_int_equal(m[0].applied + m[1].applied, 2);
    assert_true(m[0].applied == 0 || m[1].applied == 0);
    PGconn *c = esmd_test_pg_connect();
    assert_scalar(c, "SELECT string_agg(version, ',' ORDER BY version) FROM esmd.schema_migrations",
                  "0001,0002");
    assert_scalar(c, "SELECT count(*) FROM esmd.t_conc", "1");
    PQfinish(c);
}

static void test_migrate_broken(void **state)
{
    (void)state;
    ESMD_TEST_NEED_PG();
    reset_schema();
    /* given out of order: applied in name order */
    const char *names[] = {"0003_after", "0001_ok", "0002_broken"};
    const char *broken = "CREATE TABLE esmd.t_half (id int); INSERT INTO esmd.t_half VALUES (1);\n"
                         "SELECT * FROM esmd.no_such_table;";
    const char *sqls[] = {"CREATE TABLE esmd.t_after (id int);", "CREATE TABLE esmd.t_ok (id int);",
                          broken};
    char err[512] = "";
    int applied = -1;
    assert_int_equal(
        esmd_pg_migrate_list(esmd_test_pg_conninfo(), names, sqls, 3, &applied, err, sizeof(err)),
        ESMD_EINVAL); /* an error retrying will not mend (start-up exits 1 on it) */
    assert_int_equal(applied, 1);
    assert_non_null(strstr(err, "0002_broken"));
    assert_non_null(strstr(err, "esmd.no_such_table"));
    assert_non_null(strstr(err, "does not exist"));
    assert_null(strchr(err, '\n'));

    PGconn *c = esmd_test_pg_connect();
    assert_scalar(c, "SELECT string_agg(version, ',' ORDER BY version) FROM esmd.schema_migrations",
                  "0001");
    assert_scalar(c, "SELECT to_regclass('esmd.t_ok') IS NOT NULL", "t");
    assert_scalar(c, "SELECT to_regclass('esmd.t_half') IS NULL", "t");
    assert_scalar(c, "SELECT to_regclass('esmd.t_after') IS NULL", "t");
    assert_scalar(c, "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'", "0");

    /* fixed: the rest applies */
    sqls[2] = "CREATE TABLE esmd.t_half (id int);";
    assert_int_equal(
        esmd_pg_migrate_list(esmd_test_pg_conninfo(), names, sqls, 3, &applied, err, sizeof(err)),
        0);
    assert_int_equal(applied, 2);
    assert_scalar(c, "SELECT string_agg(version, ',' ORDER BY version) FROM esmd.schema_migrations",
                  "0001,0002,0003");
    PQfinish(c);
}

/* Start-up's split of database errors (esmd_pg_error_permanent): the server's answer to a
 * statement that cannot work is permanent; a cancelled statement, a lock wait cut short and a
 * read-only server (a standby during a failover) may pass; no result, or a connection gone,
 * too. */
static bool permanent_after(PGconn *c, const char *setup, const char *sql)
{
    if (setup)
        PQclear(PQexec(c, setup));
    PGresult *res = PQexec(c, sql);
    assert_int_equal(PQresultStatus(res), PGRES_FATAL_ERROR);
    bool p = esmd_pg_error_permanent(c, res);
    PQclear(res);
    PQclear(PQexec(c, "RESET ALL"));
    return p;
}

static void test_error_permanent(void **state)
{
    (void)state;
    ESMD_TEST_NEED_PG();
    PGconn *c = esmd_test_pg_connect();
    assert_true(permanent_after(c, NULL, "SELECT * FROM esmd.no_such_table"));           /* 42P01 */
    assert_true(permanent_after(c, NULL, "SELECT 1/0"));                                 /* 22012 */
    assert_false(permanent_after(c, "SET statement_timeout = 1", "SELECT pg_sleep(1)")); /* 57014 */
    assert_false(permanent_after(c, "SET default_transaction_read_only = on",
                                 "CREATE TABLE esmd.t_read_only (id int)")); /* 25006 */
    assert_false(esmd_pg_error_permanent(c, NULL));
    PQfinish(c);
}

static void test_migrate_connect_error(void **state)
{
    (void)state;
    char err[512] = "";
    int applied = -1;
    assert_int_equal(esmd_pg_migrate("host=127.0.0.1 port=1 password=hunter2 connect_timeout=2",
                                     &applied, err, sizeof(err)),
                     ESMD_EIO);
    assert_int_equal(applied, 0);
    assert_non_null(strstr(err, "connecting to host=127.0.0.1 port=1"));
    assert_null(strstr(err, "hunter2"));
}

/* ---- asynchronous connection ------------------------------------------------------------ */

static void test_async_order_params_errors(void **state)
{
    (void)state;
    ESMD_TEST_NEED_PG();
    struct ev_loop *loop = ev_loop_new(EVFLAG_AUTO);
    char err[256] = "";
    struct esmd_pg *pg = esmd_pg_new(loop, esmd_test_pg_conninfo(), "test", err, sizeof(err));
    assert_non_null(pg);
    g_seq = 0;
    g_reentrant = 0;

    /* queued before the connection is up */
    struct outcome o[6];
    memset(o, 0, sizeof(o));
    const char *p1[] = {"41"};
    const char *p2[] = {NULL, "x"};
    const char *p3[] = {"a", "it's"};
    query(pg, "SELECT $1::int + 1", 1, p1, &o[0]);
    query(pg, "SELECT $1::text IS NULL, $2::text", 2, p2, &o[1]);
    query(pg, "SELECT $1::text || $2::text", 2, p3, &o[2]);
    query(pg, "SELECT 1/0", 0, NULL, &o[3]);
    query(pg, "SELECT $1::text", 1, p2, &o[4]);
    assert_int_equal(esmd_pg_query(pg, "SELECT 1", 0, NULL, NULL, NULL), 0); /* no callback */
    assert_int_equal(esmd_pg_query(pg, NULL, 0, NULL, on_result, &o[5]), ESMD_EINVAL);
    assert_int_equal(esmd_pg_query(pg, "SELECT $1", 1, NULL, on_result, &o[5]), ESMD_EINVAL);
    assert_int_equal(esmd_pg_query(pg, "SELECT 1", -1, NULL, on_result, &o[5]), ESMD_EINVAL);

    assert_true(esmd_test_run_until(loop, cond_called, &o[4], 10));
    assert_true(esmd_pg_ready(pg));
    assert_int_equal(g_reentrant, 0);
    for (int i = 0; i < 5; i++) {
        assert_int_equal(o[i].calls, 1);
        assert_int_equal(o[i].seq, i + 1);
    }
    assert_string_equal(o[0].err, "");
    assert_int_equal(o[0].status, PGRES_TUPLES_OK);
    assert_string_equal(o[0].value, "42");
    assert_string_equal(o[1].value, "t");
    assert_string_equal(o[1].value2, "x");
    assert_string_equal(o[2].value, "ait's");
    /* server error: the result and its message */
    assert_true(o[3].have_res);
    assert_int_equal(o[3].status, PGRES_FATAL_ERROR);
    assert_non_null(strstr(o[3].err, "division by zero"));
    assert_non_null(strstr(esmd_pg_last_error(pg), "division by zero"));
    /* the connection carries on after it */
    assert_string_equal(o[4].err, "");
    assert_true(o[4].value_null);
    assert_true(esmd_pg_ready(pg));

    /* queued on a ready, idle connection: still deferred to the loop */
    struct outcome late = {0};
    query(pg, "SELECT 'late'", 0, NULL, &late);
    assert_true(esmd_test_run_until(loop, cond_called, &late, 10));
    assert_string_equal(late.value, "late");
    assert_int_equal(g_reentrant, 0);

    /* binary array parameters (esmd_pg_array_*): elements byte for byte, in order */
    static const char *const texts[] = {"a\"b", "back\\slash", "", "\xc3\xbcn\xc3\xaf",
                                        "{}",   "x,y"};
    struct esmd_pg_array ta, ua;
    esmd_pg_array_start(&ta, ESMD_PG_OID_TEXT);
    for (size_t i = 0; i < sizeof(texts) / sizeof(texts[0]); i++)
        esmd_pg_array_add(&ta, texts[i], strlen(texts[i]));
    esmd_pg_array_finish(&ta);
    esmd_pg_array_start(&ua, ESMD_PG_OID_UUID);
    unsigned char u[16];
    for (int i = 0; i < 16; i++)
        u[i] = (unsigned char)(i * 17);
    esmd_pg_array_add(&ua, u, sizeof(u));
    esmd_pg_array_finish(&ua);
    const char *bp[] = {ta.buf.data, ua.buf.data};
    const int bl[] = {(int)ta.buf.len, (int)ua.buf.len}, bf[] = {1, 1};
    struct outcome bin = {0};
    g_in_query = true;
    assert_int_equal(
        esmd_pg_query_binary(pg,
                             "SELECT string_agg(t, '|' ORDER BY o), "
                             "(SELECT string_agg(v::text, ',') FROM unnest($2::uuid[]) v) "
                             "FROM unnest($1::text[]) WITH ORDINALITY AS x(t, o)",
                             2, bp, bl, bf, on_result, &bin),
        0);
    g_in_query = false;
    esmd_buf_free(&ta.buf);
    esmd_buf_free(&ua.buf);
    assert_int_equal(esmd_pg_query_binary(pg, "SELECT 1", 1, bp, bl, NULL, on_result, &bin),
                     ESMD_EINVAL); /* lengths without formats */
    assert_true(esmd_test_run_until(loop, cond_called, &bin, 10));
    assert_string_equal(bin.err, "");
    assert_string_equal(bin.value, "a\"b|back\\slash||\xc3\xbcn\xc3\xaf|{}|x,y");
    assert_string_equal(bin.value2, "00112233-4455-6677-8899-aabbccddeeff");
    assert_int_equal(g_reentrant, 0);

    /* int4, int8 and NULL elements */
    struct esmd_pg_array ia, la, na;
    esmd_pg_array_start(&ia, ESMD_PG_OID_INT4);
    esmd_pg_array_add_int4(&ia, -7);
    esmd_pg_array_add_int4(&ia, 2147483647);
    esmd_pg_array_finish(&ia);
    esmd_pg_array_start(&la, ESMD_PG_OID_INT8);
    esmd_pg_array_add_int8(&la, -5000000000LL);
    esmd_pg_array_add_int8(&la, 9007199254740993LL);
    esmd_pg_array_finish(&la);
    esmd_pg_array_start(&na, ESMD_PG_OID_TEXT);
    esmd_pg_array_add(&na, "x", 1);
    esmd_pg_array_add_null(&na);
    esmd_pg_array_add(&na, "", 0);
    esmd_pg_array_finish(&na);
    const char *np[] = {ia.buf.data, la.buf.data, na.buf.data};
    const int nl[] = {(int)ia.buf.len, (int)la.buf.len, (int)na.buf.len}, nf[] = {1, 1, 1};
    struct outcome nums = {0};
    assert_int_equal(esmd_pg_query_binary(pg,
                                          "SELECT array_to_string($1::int[], ',') || ';' || "
                                          "array_to_string($2::bigint[], ','), "
                                          "array_to_string($3::text[], ',', 'NULL')",
                                          3, np, nl, nf, on_result, &nums),
                     0);
    esmd_buf_free(&ia.buf);
    esmd_buf_free(&la.buf);
    esmd_buf_free(&na.buf);
    assert_true(esmd_test_run_until(loop, cond_called, &nums, 10));
    assert_string_equal(nums.err, "");
    assert_string_equal(nums.value, "-7,2147483647;-5000000000,9007199254740993");
    assert_string_equal(nums.value2, "x,NULL,");

    esmd_pg_free(pg);
    ev_loop_destroy(loop);
}

static void test_async_reconnect(void **state)
{
    (void)state;
    ESMD_TEST_NEED_PG();
    struct ev_loop *loop = ev_loop_new(EVFLAG_AUTO);
    struct esmd_pg *pg = connect_ready(loop);
    g_seq = 0;

    struct outcome pid1 = {0};
    query(pg, "SELECT pg_backend_pid()", 0, NULL, &pid1);
    assert_true(esmd_test_run_until(loop, cond_called, &pid1, 10));

    /* a long query in flight, one queued behind it, then the backend is killed */
    struct outcome sleeping = {0}, before = {0}, after = {0};
    query(pg, "SELECT pg_sleep(30)", 0, NULL, &sleeping);
    esmd_test_run_for(loop, 0.3);
    query(pg, "SELECT pg_backend_pid()", 0, NULL, &before);
    PGconn *c = esmd_test_pg_connect();
    char sql[512];
    snprintf(sql, sizeof(sql), "SELECT pg_terminate_backend(%s)", pid1.value);
    assert_scalar(c, sql, "t");

    assert_true(esmd_test_run_until(loop, cond_not_ready, pg, 10));
    assert_true(esmd_test_run_until(loop, cond_called, &sleeping, 10));
    assert_false(sleeping.have_res);
    assert_true(strncmp(sleeping.err, "connection lost: ", 17) == 0);
    assert_true(esmd_pg_last_error(pg)[0] != '\0');

    /* issued after the loss: waits for the reconnection */
    const char *pa[] = {"after"};
    query(pg, "SELECT $1::text, pg_backend_pid()", 1, pa, &after);
    assert_true(esmd_test_run_until(loop, cond_called, &after, 15));
    assert_true(esmd_pg_ready(pg));
    assert_int_equal(before.calls, 1);
    assert_string_equal(before.err, "");
    assert_string_not_equal(before.value, pid1.value);
    assert_string_equal(after.err, "");
    assert_string_equal(after.value, "after");
    assert_string_equal(after.value2, before.value);
    assert_true(sleeping.seq < before.seq && before.seq < after.seq);

    /* killed while idle: noticed without a query, then back */
    snprintf(sql, sizeof(sql), "SELECT pg_terminate_backend(%s)", after.value2);
    assert_scalar(c, sql, "t");
    assert_true(esmd_test_run_until(loop, cond_not_ready, pg, 10));
    assert_true(esmd_test_run_until(loop, cond_ready, pg, 15));
    PQfinish(c);
    esmd_pg_free(pg);
    ev_loop_destroy(loop);
}

/* After 5 s idle the connection pings (SELECT 1). */
/* A prepared statement: registered before the connection is up, run with binary and text
 * parameters, prepared again on the new session after the backend is killed, and again after
 * DEALLOCATE (the first run after it fails, the next works). */
static void test_prepared(void **state)
{
    (void)state;
    ESMD_TEST_NEED_PG();
    struct ev_loop *loop = ev_loop_new(EVFLAG_AUTO);
    char err[256] = "";
    struct esmd_pg *pg = esmd_pg_new(loop, esmd_test_pg_conninfo(), "test", err, sizeof(err));
    assert_non_null(pg);
    assert_int_equal(esmd_pg_prepare(pg, "twice", "SELECT $1::int * 2, pg_backend_pid()", 1), 0);
    assert_int_equal(esmd_pg_prepare(pg, "twice", "SELECT 1", 0), ESMD_EINVAL); /* taken */
    const char *p21[] = {"21"}, *p5[] = {"5"}, *p7[] = {"7"};
    struct outcome a = {0}, b = {0}, c1 = {0}, c2 = {0}, bad = {0};
    assert_int_equal(esmd_pg_query_prepared(pg, "nope", 0, NULL, NULL, NULL, on_result, &bad),
                     ESMD_EINVAL);
    assert_int_equal(esmd_pg_query_prepared(pg, "twice", 1, p21, NULL, NULL, on_result, &a), 0);
    assert_true(esmd_test_run_until(loop, cond_called, &a, 10));
    assert_string_equal(a.err, "");
    assert_string_equal(a.value, "42");

    PGconn *conn = esmd_test_pg_connect();
    char sql[512];
    snprintf(sql, sizeof(sql), "SELECT pg_terminate_backend(%s)", a.value2);
    assert_scalar(conn, sql, "t");
    assert_true(esmd_test_run_until(loop, cond_not_ready, pg, 10));
    assert_int_equal(esmd_pg_query_prepared(pg, "twice", 1, p5, NULL, NULL, on_result, &b), 0);
    assert_true(esmd_test_run_until(loop, cond_called, &b, 15));
    assert_string_equal(b.err, "");
    assert_string_equal(b.value, "10");
    assert_string_not_equal(b.value2, a.value2); /* a new session, prepared again */

    struct outcome gone = {0};
    query(pg, "DEALLOCATE twice", 0, NULL, &gone);
    assert_true(esmd_test_run_until(loop, cond_called, &gone, 10));
    assert_int_equal(esmd_pg_query_prepared(pg, "twice", 1, p7, NULL, NULL, on_result, &c1), 0);
    assert_true(esmd_test_run_until(loop, cond_called, &c1, 10));
    assert_non_null(strstr(c1.err, "does not exist"));
    assert_int_equal(esmd_pg_query_prepared(pg, "twice", 1, p7, NULL, NULL, on_result, &c2), 0);
    assert_true(esmd_test_run_until(loop, cond_called, &c2, 10));
    assert_string_equal(c2.err, "");
    assert_string_equal(c2.value, "14");
    PQfinish(conn);
    esmd_pg_free(pg);
    ev_loop_destroy(loop);
}

static void test_async_idle_ping(void **state)
{
    (void)state;
    ESMD_TEST_NEED_PG();
    struct ev_loop *loop = ev_loop_new(EVFLAG_AUTO);
    struct esmd_pg *pg = connect_ready(loop);
    struct outcome pid = {0};
    query(pg, "SELECT pg_backend_pid()", 0, NULL, &pid);
    assert_true(esmd_test_run_until(loop, cond_called, &pid, 10));
    esmd_test_run_for(loop, 5.6);
    assert_true(esmd_pg_ready(pg));
    PGconn *c = esmd_test_pg_connect();
    char sql[512];
    snprintf(sql, sizeof(sql), "SELECT query FROM pg_stat_activity WHERE pid = %s", pid.value);
    assert_scalar(c, sql, "SELECT 1");
    PQfinish(c);
    esmd_pg_free(pg);
    ev_loop_destroy(loop);
}

/* free with queued queries: each gets (NULL, "closed"), in order, and may not queue more. */
struct closer {
    struct esmd_pg *pg;
    struct outcome o;
    int query_rc;
};

static void on_closed(void *ud, const PGresult *res, const char *err)
{
    struct closer *cl = ud;
    on_result(&cl->o, res, err);
    cl->query_rc = esmd_pg_query(cl->pg, "SELECT 1", 0, NULL, NULL, NULL);
}

static void on_free_pg(void *ud, const PGresult *res, const char *err)
{
    struct closer *cl = ud;
    on_result(&cl->o, res, err);
    esmd_pg_free(cl->pg); /* from inside our own callback */
}

static void test_async_free(void **state)
{
    (void)state;
    ESMD_TEST_NEED_PG();
    struct ev_loop *loop = ev_loop_new(EVFLAG_AUTO);
    char err[256] = "";
    g_seq = 0;

    /* free before connected */
    struct esmd_pg *pg = esmd_pg_new(loop, esmd_test_pg_conninfo(), "test", err, sizeof(err));
    assert_non_null(pg);
    struct closer cl[3];
    memset(cl, 0, sizeof(cl));
    for (int i = 0; i < 3; i++) {
        cl[i].pg = pg;
        assert_int_equal(esmd_pg_query(pg, "SELECT 1", 0, NULL, on_closed, &cl[i]), 0);
    }
    esmd_pg_free(pg);
    for (int i = 0; i < 3; i++) {
        assert_int_equal(cl[i].o.calls, 1);
        assert_int_equal(cl[i].o.seq, i + 1);
        assert_false(cl[i].o.have_res);
        assert_string_equal(cl[i].o.err, "closed");
        assert_int_equal(cl[i].query_rc, ESMD_ESTATE);
    }
    esmd_test_run_for(loop, 0.1); /* no watcher of the freed object may fire */

    /* free from inside a result callback, with one in flight and one queued */
    pg = connect_ready(loop);
    struct closer first = {.pg = pg}, rest[2];
    memset(rest, 0, sizeof(rest));
    assert_int_equal(esmd_pg_query(pg, "SELECT 1", 0, NULL, on_free_pg, &first), 0);
    for (int i = 0; i < 2; i++) {
        rest[i].pg = pg;
        assert_int_equal(esmd_pg_query(pg, "SELECT pg_sleep(0.2)", 0, NULL, on_closed, &rest[i]),
                         0);
    }
    assert_true(esmd_test_run_until(loop, cond_called, &first.o, 10));
    assert_string_equal(first.o.err, "");
    assert_true(first.o.have_res);
    for (int i = 0; i < 2; i++) {
        assert_int_equal(rest[i].o.calls, 1);
        assert_string_equal(rest[i].o.err, "closed");
    }
    esmd_test_run_for(loop, 0.3);
    ev_loop_destroy(loop);
}

/* LISTEN: subscribed before the connection exists, a NULL-payload mark once listening, only
 * the channel's notifications, and LISTEN again (with a new mark) after a reconnection. */
struct notes {
    int marks;
    int n;
    char last[256];
    char channel[64];
};

static void on_note(void *ud, const char *channel, const char *payload)
{
    struct notes *nt = ud;
    if (g_in_query)
        g_reentrant++;
    snprintf(nt->channel, sizeof(nt->channel), "%s", channel);
    if (!payload) {
        nt->marks++;
        return;
    }
    nt->n++;
    snprintf(nt->last, sizeof(nt->last), "%s", payload);
}

static bool cond_marks1(void *arg)
{
    return ((struct notes *)arg)->marks >= 1;
}

static bool cond_marks2(void *arg)
{
    return ((struct notes *)arg)->marks >= 2;
}

static bool cond_note1(void *arg)
{
    return ((struct notes *)arg)->n >= 1;
}

static bool cond_note2(void *arg)
{
    return ((struct notes *)arg)->n >= 2;
}

static void test_async_listen(void **state)
{
    (void)state;
    ESMD_TEST_NEED_PG();
    struct ev_loop *loop = ev_loop_new(EVFLAG_AUTO);
    char err[256] = "";
    struct esmd_pg *pg = esmd_pg_new(loop, esmd_test_pg_conninfo(), "test", err, sizeof(err));
    assert_non_null(pg);
    char long_name[80];
    memset(long_name, 'c', 64);
    long_name[64] = '\0';
    assert_int_equal(esmd_pg_listen(pg, "", on_note, NULL), ESMD_EINVAL);
    assert_int_equal(esmd_pg_listen(pg, long_name, on_note, NULL), ESMD_EINVAL);
    assert_int_equal(esmd_pg_listen(pg, "x", NULL, NULL), ESMD_EINVAL);
    struct notes nt = {0}, q = {0};
    g_reentrant = 0;
    g_in_query = true;
    assert_int_equal(esmd_pg_listen(pg, "esmd_test_chan", on_note, &nt), 0);
    g_in_query = false;
    assert_true(esmd_test_run_until(loop, cond_marks1, &nt, 10));
    assert_int_equal(nt.n, 0);
    assert_string_equal(nt.channel, "esmd_test_chan");

    /* a channel name that needs quoting, subscribed while connected */
    assert_int_equal(esmd_pg_listen(pg, "Odd \"Chan\"", on_note, &q), 0);
    assert_true(esmd_test_run_until(loop, cond_marks1, &q, 10));

    PGconn *c = esmd_test_pg_connect();
    PQclear(PQexec(c, "NOTIFY other_chan, 'nope'"));
    PQclear(PQexec(c, "NOTIFY esmd_test_chan, 'hello'"));
    PQclear(PQexec(c, "SELECT pg_notify('Odd \"Chan\"', 'odd')"));
    assert_true(esmd_test_run_until(loop, cond_note1, &nt, 10));
    assert_true(esmd_test_run_until(loop, cond_note1, &q, 10));
    assert_string_equal(nt.last, "hello");
    assert_string_equal(q.last, "odd");

    /* the connection is lost: LISTEN again, a new mark, notifications flow again */
    struct outcome pid = {0};
    query(pg, "SELECT pg_backend_pid()", 0, NULL, &pid);
    assert_true(esmd_test_run_until(loop, cond_called, &pid, 10));
    char sql[512];
    snprintf(sql, sizeof(sql), "SELECT pg_terminate_backend(%s)", pid.value);
    assert_scalar(c, sql, "t");
    assert_true(esmd_test_run_until(loop, cond_not_ready, pg, 10));
    assert_true(esmd_test_run_until(loop, cond_marks2, &nt, 15));
    assert_true(esmd_test_run_until(loop, cond_marks2, &q, 15));
    PQclear(PQexec(c, "NOTIFY esmd_test_chan, 'again'"));
    assert_true(esmd_test_run_until(loop, cond_note2, &nt, 10));
    assert_string_equal(nt.last, "again");
    assert_int_equal(nt.n, 2);
    assert_int_equal(g_reentrant, 0);
    PQfinish(c);
    esmd_pg_free(pg);
    ev_loop_destroy(loop);
}

static int group_setup(void **state)
{
    (void)state;
    return esmd_test_pg_setup("esmd_test_pg", false);
}

static int group_teardown(void **state)
{
    (void)state;
    return esmd_test_pg_teardown();
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_migration_names),
        cmocka_unit_test(test_bad_conninfo),
        cmocka_unit_test(test_migrate_list_validation),
        cmocka_unit_test(test_unreachable_and_redacted),
        cmocka_unit_test(test_error_permanent),
        cmocka_unit_test(test_migrate_connect_error),
        cmocka_unit_test(test_migrate_applies_all_then_none),
        cmocka_unit_test(test_migrate_concurrent),
        cmocka_unit_test(test_migrate_broken),
        cmocka_unit_test(test_async_order_params_errors),
        cmocka_unit_test(test_async_reconnect),
        cmocka_unit_test(test_prepared),
        cmocka_unit_test(test_async_idle_ping),
        cmocka_unit_test(test_async_free),
        cmocka_unit_test(test_async_listen),
    };
    return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
