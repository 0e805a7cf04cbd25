/* pgqtool: fills and drains an esmd Postgres queue (migrations/0002_pgqueue.sql) with plain
 * blocking libpq, for the benchmark and by hand.
 *
 *   pgqtool fill  -d CONNINFO -q QUEUE --count N [--size BYTES] [--chunk K]
 *       sends N messages {"i":I,"pad":"xxx..."} of about BYTES bytes (default 100) with
 *       esmd.send_batch, K per call (default 5000); prints "sent N in S s = R messages/s"
 *   pgqtool drain -d CONNINFO -q QUEUE --count N [--batch B] [--visibility 30s]
 *       the ceiling for esmd: a plain loop of esmd.receive(QUEUE, B) and
 *       esmd.delete_received() of what it got, on one connection, until N messages were
 *       received and deleted; prints "drained N messages in S s = R messages/s"
 *
 * Exit status 0, or 1 with the reason on stderr. */
#include <libpq-fe.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

_Noreturn static void die(PGconn *conn, const char *what, PGresult *res)
{
    fprintf(stderr, "pgqtool: %s: %s", what,
            res    ? PQresultErrorMessage(res)
            : conn ? PQerrorMessage(conn)
                   : "?\n");
    PQclear(res);
    PQfinish(conn);
    exit(1);
}

struct buf {
    char *p;
    size_t n, cap;
};

static void put(struct buf *b, const char *s, size_t n)
{
    if (b->n + n + 1 > b->cap) {
        b->cap = (b->n + n + 1) * 2;
        b->p = realloc(b->p, b->cap);
        if (!b->p)
            abort();
    }
    memcpy(b->p + b->n, s, n);
    b->n += n;
    b->p[b->n] = '\0';
}

static void puts_(struct buf *b, const char *s)
{
    put(b, s, strlen(s));
}

static int fill(PGconn *conn, const char *queue, long count, long size, long chunk)
{
    double t0 = now_s();
    long sent = 0;
    struct buf arr = {0};
    char pad[65536];
    while (sent < count) {
        long k = count - sent < chunk ? count - sent : chunk;
        arr.n = 0;
        puts_(&arr, "{");
        for (long i = 0; i < k; i++) {
            char head[64];
            int hl = snprintf(head, sizeof(head), "{\\\"i\\\":%ld,\\\"pad\\\":\\\"", sent + i);
            /* the body is {"i":N,"pad":"xx..."} of `size` bytes (at least the head) */
            long padn = size - (hl - 5) - 2;
            if (padn < 0)
                padn = 0;
            if (padn > (long)sizeof(pad))
                padn = (long)sizeof(pad);
            memset(pad, 'x', (size_t)padn);
            puts_(&arr, i ? ",\"" : "\"");
            put(&arr, head, (size_t)hl);
            put(&arr, pad, (size_t)padn);
            puts_(&arr, "\\\"}\"");
        }
        puts_(&arr, "}");
        const char *params[2] = {queue, arr.p};
        PGresult *res = PQexecParams(conn, "SELECT count(*) FROM esmd.send_batch($1, $2::text[])",
                                     2, NULL, params, NULL, NULL, 0);
        if (PQresultStatus(res) != PGRES_TUPLES_OK)
            die(conn, "esmd.send_batch", res);
        sent += atol(PQgetvalue(res, 0, 0));
        PQclear(res);
    }
    double dt = now_s() - t0;
    printf("sent %ld in %.3f s = %.0f messages/s\n", sent, dt, (double)sent / (dt > 0 ? dt : 1e-9));
    free(arr.p);
    return 0;
}

static int drain(PGconn *conn, const char *queue, long count, long batch, const char *vt)
{
    char lim[32];
    snprintf(lim, sizeof(lim), "%ld", batch);
    struct buf ids = {0}, receipts = {0};
    long got = 0, empty = 0;
    double t0 = 0;
    while (got < count) {
        const char *params[3] = {queue, lim, vt};
        PGresult *res = PQexecParams(conn,
                                     "SELECT id, receipt FROM esmd.receive($1, $2::integer, "
                                     "$3::interval) WHERE kind = 'm'",
                                     3, NULL, params, NULL, NULL, 0);
        if (PQresultStatus(res) != PGRES_TUPLES_OK)
            die(conn, "esmd.receive", res);
        int n = PQntuples(res);
        if (n == 0) {
            PQclear(res);
            if (++empty > 2000) {
                fprintf(stderr, "pgqtool: queue %s empty after %ld of %ld messages\n", queue, got,
                        count);
                return 1;
            }
            struct timespec ts = {0, 5 * 1000 * 1000};
            nanosleep(&ts, NULL);
            continue;
        }
        if (got == 0)
            t0 = now_s();
        empty = 0;
        ids.n = receipts.n = 0;
        puts_(&ids, "{");
        puts_(&receipts, "{");
        for (int r = 0; r < n; r++) {
            if (r) {
                puts_(&ids, ",");
                puts_(&receipts, ",");
            }
            puts_(&ids, PQgetvalue(res, r, 0));
            puts_(&receipts, PQgetvalue(res, r, 1));
        }
        puts_(&ids, "}");
        puts_(&receipts, "}");
        PQclear(res);
        const char *dparams[2] = {ids.p, receipts.p};
        res = PQexecParams(conn, "SELECT esmd.delete_received($1::bigint[], $2::uuid[])", 2, NULL,
                           dparams, NULL, NULL, 0);
        if (PQresultStatus(res) != PGRES_TUPLES_OK)
            die(conn, "esmd.delete_received", res);
        got += atol(PQgetvalue(res, 0, 0));
        PQclear(res);
    }
    double dt = now_s() - t0;
    printf("drained %ld messages in %.3f s = %.0f messages/s\n", got, dt,
           (double)got / (dt > 0 ? dt : 1e-9));
    free(ids.p);
    free(receipts.p);
    return 0;
}

_Noreturn static void usage(void)
{
    fputs("usage: pgqtool fill  -d CONNINFO -q QUEUE --count N [--size BYTES] [--chunk K]\n"
          "       pgqtool drain -d CONNINFO -q QUEUE --count N [--batch B] [--visibility 30s]\n",
          stderr);
    exit(2);
}

int main(int argc, char **argv)
{
    if (argc < 2)
        usage();
    const char *cmd = argv[1], *dsn = NULL, *queue = NULL, *vt = "30 seconds";
    long count = -1, size = 100, chunk = 5000, batch = 100;
    for (int i = 2; i < argc; i++) {
        const char *a = argv[i];
        const char *v = i + 1 < argc ? argv[i + 1] : NULL;
        if (!v)
            usage();
        if (!strcmp(a, "-d"))
            dsn = v;
        else if (!strcmp(a, "-q"))
            queue = v;
        else if (!strcmp(a, "--count"))
            count = atol(v);
        else if (!strcmp(a, "--size"))
            size = atol(v);
        else if (!strcmp(a, "--chunk"))
            chunk = atol(v);
        else if (!strcmp(a, "--batch"))
            batch = atol(v);
        else if (!strcmp(a, "--visibility"))
            vt = v;
        else
            usage();
        i++;
    }
    if (!dsn || !queue || count < 0 || chunk < 1 || batch < 1)
        usage();
    PGconn *conn = PQconnectdb(dsn);
    if (PQstatus(conn) != CONNECTION_OK)
        die(conn, "connect", NULL);
    int rc;
    if (!strcmp(cmd, "fill"))
        rc = fill(conn, queue, count, size, chunk);
    else if (!strcmp(cmd, "drain"))
        rc = drain(conn, queue, count, batch, vt);
    else
        usage();
    PQfinish(conn);
    return rc;
}
