/* Scaffolding shared by the unit tests: see testutil.h. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "testutil.h"

#include "esmd/buf.h"
#include "esmd/log.h"
#include "esmd/pg.h"

#include <curl/curl.h>
#include <ev.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* ---- files ---- */

char *esmd_test_read_file(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    struct esmd_buf b = ESMD_BUF_INIT;
    char chunk[4096];
    size_t n;
    while ((n = fread(chunk, 1, sizeof(chunk), f)) > 0)
        esmd_buf_append(&b, chunk, n);
    fclose(f);
    return esmd_buf_steal(&b, len);
}

char *esmd_test_read_golden(const char *dir, const char *name)
{
    char path[512];
    snprintf(path, sizeof(path), "%s/%s/%s", ESMD_TEST_DATA, dir, name);
    size_t n;
    char *s = esmd_test_read_file(path, &n);
    if (!s) {
        fail_msg("cannot open %s", path);
        return NULL;
    }
    while (n > 0 && s[n - 1] == '\n')
        s[--n] = '\0';
    return s;
}

void esmd_test_assert_golden(const char *dir, const char *name, const char *got, size_t len)
{
    char *want = esmd_test_read_golden(dir, name);
    if (strlen(want) != len || memcmp(got, want, len) != 0)
        fail_msg("%s differs:\n got: %.*s\nwant: %s", name, (int)len, got, want);
    free(want);
}

/* ---- the loop ---- */

static void tick_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)loop;
    (void)w;
    (void)revents;
}

bool esmd_test_run_until(struct ev_loop *loop, bool (*cond)(void *), void *arg, double timeout_s)
{
    ev_timer tick;
    ev_timer_init(&tick, tick_cb, 0.01, 0.01);
    ev_timer_start(loop, &tick);
    double end = ev_time() + timeout_s;
    bool ok;
    while (!(ok = cond(arg)) && ev_time() < end)
        ev_run(loop, EVRUN_ONCE);
    ev_timer_stop(loop, &tick);
    return ok;
}

static bool cond_false(void *arg)
{
    (void)arg;
    return false;
}

void esmd_test_run_for(struct ev_loop *loop, double s)
{
    esmd_test_run_until(loop, cond_false, NULL, s);
}

static bool cond_flag(void *arg)
{
    return *(const bool *)arg;
}

void esmd_test_run_until_flag(struct ev_loop *loop, const bool *flag, double timeout_s)
{
    assert_true(esmd_test_run_until(loop, cond_flag, (void *)flag, timeout_s));
}

struct count {
    const int *n;
    int target;
};

static bool cond_count(void *arg)
{
    const struct count *c = arg;
    return *c->n >= c->target;
}

void esmd_test_run_until_count(struct ev_loop *loop, const int *n, int target, double timeout_s)
{
    struct count c = {n, target};
    esmd_test_run_until(loop, cond_count, &c, timeout_s);
    assert_int_equal(*n, target);
}

/* ---- HTTP on loopback ---- */

void esmd_test_http_init(void)
{
    unsetenv("http_proxy");
    unsetenv("HTTP_PROXY");
    unsetenv("all_proxy");
    unsetenv("ALL_PROXY");
    curl_global_init(CURL_GLOBAL_DEFAULT);
    esmd_log_set_level(ESMD_LOG_ERROR);
}

/* ---- a scratch PostgreSQL database ---- */

static const char *g_base;    /* ESMD_TEST_PG */
static char g_conninfo[2048]; /* the scratch database */
static char g_dbname[64];
static bool g_own_db;

/* base's options with dbname replaced, as a quoted keyword=value conninfo. */
static void build_conninfo(const char *base, const char *db, char *out, size_t n)
{
    char *msg = NULL;
    PQconninfoOption *opts = PQconninfoParse(base, &msg);
    assert_non_null(opts);
    size_t o = 0;
    for (const PQconninfoOption *opt = opts; opt->keyword; opt++) {
        if (!opt->val || !*opt->val || strcmp(opt->keyword, "dbname") == 0)
            continue;
        o += (size_t)snprintf(out + o, n - o, "%s='", opt->keyword);
        for (const char *s = opt->val; *s && o + 3 < n; s++) {
            if (*s == '\'' || *s == '\\')
                out[o++] = '\\';
            out[o++] = *s;
        }
        o += (size_t)snprintf(out + o, n - o, "' ");
        assert_true(o < n);
    }
    snprintf(out + o, n - o, "dbname='%s'", db);
    PQconninfoFree(opts);
}

int esmd_test_pg_setup(const char *prefix, bool migrate)
{
    const char *base = getenv("ESMD_TEST_PG");
    if (!base || !*base)
        return 0;
    g_base = base;
    PGconn *c = PQconnectdb(base);
    if (PQstatus(c) != CONNECTION_OK) {
        fprintf(stderr, "ESMD_TEST_PG: cannot connect: %s", PQerrorMessage(c));
        PQfinish(c);
        return -1;
    }
    snprintf(g_dbname, sizeof(g_dbname), "%s_%d", prefix, (int)getpid());
    char sql[128];
    snprintf(sql, sizeof(sql), "CREATE DATABASE %s", g_dbname);
    PGresult *res = PQexec(c, sql);
    if (PQresultStatus(res) == PGRES_COMMAND_OK) {
        g_own_db = true;
        build_conninfo(base, g_dbname, g_conninfo, sizeof(g_conninfo));
    } else {
        fprintf(stderr, "# cannot create a scratch database (%s); using ESMD_TEST_PG's own\n",
                PQresultErrorMessage(res));
        snprintf(g_conninfo, sizeof(g_conninfo), "%s", base);
    }
    PQclear(res);
    PQfinish(c);
    if (migrate) {
        char err[512];
        if (esmd_pg_migrate(g_conninfo, NULL, err, sizeof(err)) != 0) {
            fprintf(stderr, "migrate: %s\n", err);
            return -1;
        }
    }
    return 0;
}

int esmd_test_pg_teardown(void)
{
    if (!g_own_db)
        return 0;
    PGconn *c = PQconnectdb(g_base);
    char sql[128];
    snprintf(sql, sizeof(sql), "DROP DATABASE IF EXISTS %s WITH (FORCE)", g_dbname);
    PQclear(PQexec(c, sql));
    PQfinish(c);
    g_own_db = false;
    return 0;
}

const char *esmd_test_pg_conninfo(void)
{
    return g_base ? g_conninfo : NULL;
}

PGconn *esmd_test_pg_connect(void)
{
    PGconn *c = PQconnectdb(g_conninfo);
    assert_non_null(c);
    if (PQstatus(c) != CONNECTION_OK)
        fail_msg("connect: %s", PQerrorMessage(c));
    return c;
}

static PGresult *exec_checked(PGconn *c, const char *sql)
{
    PGresult *res = PQexec(c, sql);
    ExecStatusType st = PQresultStatus(res);
    if (st != PGRES_TUPLES_OK && st != PGRES_COMMAND_OK)
        fail_msg("%s: %s", sql, PQresultErrorMessage(res));
    return res;
}

void esmd_test_pg_exec(PGconn *c, const char *sql)
{
    PQclear(exec_checked(c, sql));
}

long esmd_test_pg_long(PGconn *c, const char *sql)
{
    PGresult *res = exec_checked(c, sql);
    long v = PQntuples(res) > 0 ? atol(PQgetvalue(res, 0, 0)) : -1;
    PQclear(res);
    return v;
}

char *esmd_test_pg_text(PGconn *c, const char *sql)
{
    PGresult *res = exec_checked(c, sql);
    char *v = strdup(PQntuples(res) > 0 ? PQgetvalue(res, 0, 0) : "");
    PQclear(res);
    return v;
}

/* ---- deterministic random numbers ---- */

static uint64_t rng_state = 0x9e3779b97f4a7c15ULL;

void esmd_test_rand_seed(uint64_t seed)
{
    rng_state = seed;
}

uint64_t esmd_test_rand(void)
{
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 2685821657736338717ULL;
}

size_t esmd_test_rand_n(size_t n)
{
    return (size_t)(esmd_test_rand() % n);
}
