/* Scaffolding shared by the unit tests (tests/unit/test_*.c, cmocka): reading files and golden
 * files, running the libev loop until something happens, a scratch PostgreSQL database, and a
 * deterministic random generator. CMakeLists.txt links testutil.c into every unit test;
 * docs/testing.md describes it.
 *
 * Include after <cmocka.h> (and the headers cmocka needs). Every function that checks something
 * fails the running test through cmocka when the check fails. */
#ifndef ESMD_TESTUTIL_H
#define ESMD_TESTUTIL_H

#include <libpq-fe.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct ev_loop;

/* ---- files ---- */

/* The whole file at path, NUL-terminated, malloc'd (the caller frees); *len (when len is not
 * NULL) is its length. NULL when it cannot be read. */
char *esmd_test_read_file(const char *path, size_t *len);
/* The golden file ESMD_TEST_DATA/<dir>/<name> (tests/unit/data/...) without its trailing
 * newlines: the files end with one, the output they hold does not. Fails the test when the file
 * cannot be read. Caller frees. */
char *esmd_test_read_golden(const char *dir, const char *name);
/* Fails the test, showing both, unless got (len bytes) is the golden file dir/name. */
void esmd_test_assert_golden(const char *dir, const char *name, const char *got, size_t len);

/* ---- the loop ---- */

/* Runs loop until cond(arg) is true or timeout_s seconds pass (a 10 ms tick keeps
 * ev_run(EVRUN_ONCE) from blocking); returns cond's last answer. */
bool esmd_test_run_until(struct ev_loop *loop, bool (*cond)(void *), void *arg, double timeout_s);
/* Runs loop for s seconds. */
void esmd_test_run_for(struct ev_loop *loop, double s);
/* Runs loop until *flag is true; fails the test after timeout_s seconds. */
void esmd_test_run_until_flag(struct ev_loop *loop, const bool *flag, double timeout_s);
/* Runs loop until *n reaches target; fails the test unless *n == target after timeout_s. */
void esmd_test_run_until_count(struct ev_loop *loop, const int *n, int target, double timeout_s);

/* ---- HTTP on loopback ---- */

/* For tests that make HTTP requests with libcurl to servers on loopback: no proxy from the
 * environment, curl_global_init() (the test calls curl_global_cleanup() at the end), and only
 * esmd's errors in the log. */
void esmd_test_http_init(void);

/* ---- a scratch PostgreSQL database ----
 * ESMD_TEST_PG holds a libpq conninfo (or URI). esmd_test_pg_setup() (a cmocka group setup)
 * creates the database <prefix>_<pid> there, or, when the role may not create databases, uses
 * ESMD_TEST_PG's own; esmd_test_pg_teardown() drops the database it created. Without
 * ESMD_TEST_PG, esmd_test_pg_conninfo() is NULL and ESMD_TEST_NEED_PG() skips the test. */

/* 0, or -1 when ESMD_TEST_PG is set but the server cannot be used (or, with migrate, esmd's
 * migrations fail). */
int esmd_test_pg_setup(const char *prefix, bool migrate);
int esmd_test_pg_teardown(void);
/* The scratch database's conninfo; NULL without ESMD_TEST_PG. Valid until teardown. */
const char *esmd_test_pg_conninfo(void);
/* A blocking connection to it; fails the test when it cannot connect. PQfinish() it. */
PGconn *esmd_test_pg_connect(void);
/* Runs sql; fails the test when it fails. */
void esmd_test_pg_exec(PGconn *c, const char *sql);
/* Runs sql; the first column of the first row as a long (-1 when there is no row). */
long esmd_test_pg_long(PGconn *c, const char *sql);
/* Runs sql; the first column of the first row, malloc'd ("" when there is no row). */
char *esmd_test_pg_text(PGconn *c, const char *sql);

#define ESMD_TEST_NEED_PG()                                                                        \
    do {                                                                                           \
        if (!esmd_test_pg_conninfo())                                                              \
            skip();                                                                                \
    } while (0)

/* ---- deterministic random numbers ----
 * xorshift64*: the same sequence on every platform and every run. */

void esmd_test_rand_seed(uint64_t seed); /* the default seed is 0x9e3779b97f4a7c15 */
uint64_t esmd_test_rand(void);
size_t esmd_test_rand_n(size_t n); /* 0 <= r < n */

#endif
