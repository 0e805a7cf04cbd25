/* redistool: the Redis side of the integration tests and benchmarks (tests/integration and
 * tests/bench/redis_bench.py drive exactly this interface; change it only together with them).
 *
 *   redistool produce -u URL -s STREAM --count N [--size BYTES] [--start I]
 *       Appends N entries (XADD STREAM * v VALUE, pipelined 1,000 at a time). Entry i (from
 *       --start, default 0) has one field `v`, {"i":i,"pad":"xx..."} of BYTES bytes (default 100;
 *       longer only when the index does not fit). Prints "produced N".
 *   redistool consume-rate -u URL -s STREAM -g GROUP --count N [--batch B] [--timeout S]
 *       The ceiling of the benchmark: a plain client loop doing what esmd does with Redis and
 *       nothing else. Creates GROUP at the start of the stream (it must not exist), then
 *       XREADGROUP COUNT B (default 100) followed by XACK of what it read, one after the other,
 *       until N entries were read and acknowledged. Prints
 *       "consumed N entries in S s = R entries/s" (first read to last XACK).
 *
 * Exit status: 0 on success, 1 when Redis fails or times out, 2 on bad usage. */
#include <getopt.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <hiredis/hiredis.h>

#include "../../connectors/redis/redis_private.h"
#include "esmd/buf.h"
#include "esmd/common.h"

#define RT_PIPELINE 1000

struct rt_opts {
    const char *url;
    const char *stream;
    const char *group;
    long count;
    long size;
    long start;
    long batch;
    int timeout_s;
};

static ESMD_PRINTF(2, 3) _Noreturn void rt_die(int status, const char *fmt, ...)
{
    va_list ap;
    fputs("redistool: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(status);
}

static double rt_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static redisContext *rt_connect(const struct rt_opts *o)
{
    struct esmd_redis_url u;
    char err[256];
    if (esmd_redis_url_parse(o->url, &u, err, sizeof(err)) != ESMD_OK)
        rt_die(2, "%s: %s", o->url, err);
    redisContext *c = redisConnect(u.host, u.port);
    if (!c || c->err)
        rt_die(1, "connect %s:%d: %s", u.host, u.port, c ? c->errstr : "out of memory");
    redisReply *r = NULL;
    if (u.password) {
        r = u.user ? redisCommand(c, "AUTH %s %s", u.user, u.password)
                   : redisCommand(c, "AUTH %s", u.password);
        if (!r || r->type == REDIS_REPLY_ERROR)
            rt_die(1, "AUTH: %s", r ? r->str : c->errstr);
        freeReplyObject(r);
    }
    if (u.db) {
        r = redisCommand(c, "SELECT %d", u.db);
        if (!r || r->type == REDIS_REPLY_ERROR)
            rt_die(1, "SELECT: %s", r ? r->str : c->errstr);
        freeReplyObject(r);
    }
    esmd_redis_url_free(&u);
    return c;
}

/* ---- produce ---- */

static void rt_value(struct esmd_buf *val, long i, long size)
{
    esmd_buf_reset(val);
    esmd_buf_printf(val, "{\"i\":%ld,\"pad\":\"", i);
    while ((long)val->len + 2 < size)
        esmd_buf_putc(val, 'x');
    esmd_buf_puts(val, "\"}");
}

static int rt_produce(const struct rt_opts *o)
{
    redisContext *c = rt_connect(o);
    struct esmd_buf val = ESMD_BUF_INIT;
    long done = 0;
    while (done < o->count) {
        long n = o->count - done < RT_PIPELINE ? o->count - done : RT_PIPELINE;
        for (long k = 0; k < n; k++) {
            rt_value(&val, o->start + done + k, o->size);
            const char *argv[] = {"XADD", o->stream, "*", "v", val.data};
            size_t lens[] = {4, strlen(o->stream), 1, 1, val.len};
            if (redisAppendCommandArgv(c, 5, argv, lens) != REDIS_OK)
                rt_die(1, "XADD: %s", c->errstr);
        }
        for (long k = 0; k < n; k++) {
            redisReply *r;
            if (redisGetReply(c, (void **)&r) != REDIS_OK)
                rt_die(1, "XADD: %s", c->errstr);
            if (r->type == REDIS_REPLY_ERROR)
                rt_die(1, "XADD: %s", r->str);
            freeReplyObject(r);
        }
        done += n;
    }
    esmd_buf_free(&val);
    redisFree(c);
    printf("produced %ld\n", done);
    return 0;
}

/* ---- consume-rate ---- */

static int rt_consume_rate(const struct rt_opts *o)
{
    redisContext *c = rt_connect(o);
    redisReply *r = redisCommand(c, "XGROUP CREATE %s %s 0 MKSTREAM", o->stream, o->group);
    if (!r || r->type == REDIS_REPLY_ERROR)
        rt_die(1, "XGROUP CREATE: %s", r ? r->str : c->errstr);
    freeReplyObject(r);
    char count[24];
    snprintf(count, sizeof(count), "%ld", o->batch);
    const char **ack = malloc(((size_t)o->batch + 3) * sizeof(*ack));
    size_t *acklen = malloc(((size_t)o->batch + 3) * sizeof(*acklen));
    long got = 0;
    double t0 = 0, deadline = rt_now() + o->timeout_s;
    while (got < o->count) {
        if (rt_now() > deadline)
            rt_die(1, "timeout: %ld of %ld entries after %d s", got, o->count, o->timeout_s);
        const char *argv[] = {"XREADGROUP", "GROUP", o->group,  "bench",   "COUNT", count,
                              "BLOCK",      "1000",  "STREAMS", o->stream, ">"};
        r = redisCommandArgv(c, 11, argv, NULL);
        if (!r || r->type == REDIS_REPLY_ERROR)
            rt_die(1, "XREADGROUP: %s", r ? r->str : c->errstr);
        if (r->type != REDIS_REPLY_ARRAY) {
            freeReplyObject(r);
            continue; /* BLOCK ran out */
        }
        if (t0 == 0)
            t0 = rt_now();
        const redisReply *entries = r->element[0]->element[1];
        size_t n = 0;
        ack[n++] = "XACK";
        ack[n++] = o->stream;
        ack[n++] = o->group;
        for (size_t i = 0; i < entries->elements; i++)
            ack[n++] = entries->element[i]->element[0]->str;
        for (size_t i = 0; i < n; i++)
            acklen[i] = strlen(ack[i]);
        redisReply *a = redisCommandArgv(c, (int)n, ack, acklen);
        if (!a || a->type != REDIS_REPLY_INTEGER || a->integer != (long long)entries->elements)
            rt_die(1, "XACK: %s", a && a->type == REDIS_REPLY_ERROR ? a->str : "unexpected reply");
        freeReplyObject(a);
        got += (long)entries->elements;
        freeReplyObject(r);
    }
    double secs = rt_now() - t0;
    printf("consumed %ld entries in %.3f s = %.0f entries/s\n", got, secs,
           (double)got / (secs > 1e-9 ? secs : 1e-9));
    free(ack);
    free(acklen);
    redisFree(c);
    return 0;
}

static _Noreturn void rt_usage(int status)
{
    fputs("usage: redistool produce -u URL -s STREAM --count N [--size BYTES] [--start I]\n"
          "       redistool consume-rate -u URL -s STREAM -g GROUP --count N [--batch B]"
          " [--timeout S]\n",
          status ? stderr : stdout);
    exit(status);
}

int main(int argc, char **argv)
{
    if (argc < 2)
        rt_usage(2);
    const char *cmd = argv[1];
    struct rt_opts o = {.size = 100, .batch = 100, .timeout_s = 600};
    static const struct option longopts[] = {
        {"url", required_argument, NULL, 'u'},   {"stream", required_argument, NULL, 's'},
        {"group", required_argument, NULL, 'g'}, {"count", required_argument, NULL, 'n'},
        {"size", required_argument, NULL, 'z'},  {"start", required_argument, NULL, 'i'},
        {"batch", required_argument, NULL, 'b'}, {"timeout", required_argument, NULL, 't'},
        {"help", no_argument, NULL, 'h'},        {NULL, 0, NULL, 0},
    };
    int ch;
    optind = 2;
    while ((ch = getopt_long(argc, argv, "u:s:g:n:z:i:b:t:h", longopts, NULL)) != -1) {
        switch (ch) {
        case 'u':
            o.url = optarg;
            break;
        case 's':
            o.stream = optarg;
            break;
        case 'g':
            o.group = optarg;
            break;
        case 'n':
            o.count = atol(optarg);
            break;
        case 'z':
            o.size = atol(optarg);
            break;
        case 'i':
            o.start = atol(optarg);
            break;
        case 'b':
            o.batch = atol(optarg);
            break;
        case 't':
            o.timeout_s = atoi(optarg);
            break;
        case 'h':
            rt_usage(0);
        default:
            rt_usage(2);
        }
    }
    if (!o.url || !o.stream || o.count < 0 || o.batch < 1)
        rt_usage(2);
    if (strcmp(cmd, "produce") == 0)
        return rt_produce(&o);
    if (strcmp(cmd, "consume-rate") == 0) {
        if (!o.group)
            rt_usage(2);
        return rt_consume_rate(&o);
    }
    rt_usage(2);
}
