/* sink: the fastest function endpoint the benchmarks can point esmd at.
 *
 *   sink [--port P] [--pattern TEXT] [--delay-ms MS]
 *       P = 0 (default) picks a free port; TEXT (default "offset": with its quotes) is what
 *       marks one record in an event: "eventID": for the Redis event, for example; MS > 0: each
 *       POST is answered MS milliseconds after its body arrived (a slow function: one thread
 *       per connection then, so concurrent requests wait side by side)
 *
 * Prints the port it listens on (127.0.0.1 and every other address) as one line on stdout, then
 * serves until SIGTERM/SIGINT:
 *   POST <any path>   reads the body, answers 200 {} (keep-alive), counts the request, its body
 *                     bytes and its records (occurrences of the pattern in the body: each
 *                     record of a Kafka event has exactly one "offset":)
 *   GET /stats        {"requests":N,"records":M,"bytes":B}
 *
 * libmicrohttpd runs everything on its own threads (epoll, a pool of two); the counters are
 * C11 atomics, so this file needs no pthread calls. */
#include <errno.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <time.h>

#include <microhttpd.h>

#define SINK_PATTERN_MAX 64

static const char *sink_pattern = "\"offset\":";
static size_t sink_pattern_len;
static size_t sink_fail[SINK_PATTERN_MAX]; /* KMP: longest proper border of pattern[0..i] */

static atomic_uint_fast64_t sink_requests;
static atomic_uint_fast64_t sink_records;
static atomic_uint_fast64_t sink_bytes;
static struct MHD_Response *sink_ok; /* shared "{}": MHD reference-counts queued responses */
static long sink_delay_ms;

/* One request. The body arrives in chunks: the pattern is counted by a KMP matcher whose state
 * carries over from one chunk to the next. */
struct sink_req {
    bool post;
    size_t state; /* pattern characters matched so far */
    uint64_t records;
    uint64_t bytes;
};

static void sink_scan(struct sink_req *req, const char *p, size_t n)
{
    const char *end = p + n;
    size_t state = req->state;

    while (p < end) {
        char c;
        if (state == 0) {
            p = memchr(p, sink_pattern[0], (size_t)(end - p));
            if (!p)
                break;
        }
        c = *p++;
        while (state > 0 && c != sink_pattern[state])
            state = sink_fail[state - 1];
        if (c == sink_pattern[state])
            state++;
        if (state == sink_pattern_len) {
            req->records++;
            state = sink_fail[state - 1];
        }
    }
    req->state = state;
}

static enum MHD_Result sink_send(struct MHD_Connection *conn, unsigned int status, const char *body)
{
    struct MHD_Response *resp =
        MHD_create_response_from_buffer(strlen(body), (void *)body, MHD_RESPMEM_MUST_COPY);
    enum MHD_Result ret;

    if (!resp)
        return MHD_NO;
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "application/json");
    ret = MHD_queue_response(conn, status, resp);
    MHD_destroy_response(resp);
    return ret;
}

static enum MHD_Result sink_handle(void *cls, struct MHD_Connection *conn, const char *url,
                                   const char *method, const char *version, const char *upload_data,
                                   size_t *upload_data_size, void **con_cls)
{
    struct sink_req *req = *con_cls;

    if (!req) {
        req = calloc(1, sizeof(*req));
        if (!req)
            return MHD_NO;
        req->post = strcmp(method, MHD_HTTP_METHOD_POST) == 0;
        *con_cls = req;
        return MHD_YES;
    }
    if (*upload_data_size > 0) {
        if (req->post) {
            sink_scan(req, upload_data, *upload_data_size);
            req->bytes += *upload_data_size;
        }
        *upload_data_size = 0;
        return MHD_YES;
    }
    if (req->post) {
        if (sink_delay_ms > 0) {
            struct timespec ts = {sink_delay_ms / 1000, (sink_delay_ms % 1000) * 1000000L};
            while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
                ;
        }
        atomic_fetch_add_explicit(&sink_requests, 1, memory_order_relaxed);
        atomic_fetch_add_explicit(&sink_records, req->records, memory_order_relaxed);
        atomic_fetch_add_explicit(&sink_bytes, req->bytes, memory_order_relaxed);
        return MHD_queue_response(conn, MHD_HTTP_OK, sink_ok);
    }
    if (strcmp(method, MHD_HTTP_METHOD_GET) == 0 && strcmp(url, "/stats") == 0) {
        char body[128];
        snprintf(body, sizeof(body), "{\"requests\":%llu,\"records\":%llu,\"bytes\":%llu}",
                 (unsigned long long)atomic_load(&sink_requests),
                 (unsigned long long)atomic_load(&sink_records),
                 (unsigned long long)atomic_load(&sink_bytes));
        return sink_send(conn, MHD_HTTP_OK, body);
    }
    return sink_send(conn, MHD_HTTP_NOT_FOUND, "{\"error\":\"not found\"}");
}

static void sink_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                           enum MHD_RequestTerminationCode toe)
{
    free(*con_cls);
    *con_cls = NULL;
}

static void sink_usage(FILE *out)
{
    fputs(
        "usage: sink [--port P] [--pattern TEXT] [--delay-ms MS]   (P = 0 picks a free port; the\n"
        "       port is printed on stdout; TEXT, default \"offset\":, marks one record in an "
        "event;\n"
        "       MS: answer each POST after MS milliseconds)\n",
        out);
}

int main(int argc, char **argv)
{
    static const char ok_body[] = "{}";
    long port = 0;
    struct MHD_Daemon *d;
    const union MHD_DaemonInfo *info;
    sigset_t sigs;
    int sig = 0;

    for (int i = 1; i < argc; i++) {
        char *end = NULL;
        if (strcmp(argv[i], "--port") == 0 && i + 1 < argc) {
            port = strtol(argv[++i], &end, 10);
            if (*end || port < 0 || port > 65535) {
                fprintf(stderr, "sink: --port: expected 0..65535, got '%s'\n", argv[i]);
                return 2;
            }
        } else if (strcmp(argv[i], "--pattern") == 0 && i + 1 < argc) {
            sink_pattern = argv[++i];
            if (!*sink_pattern || strlen(sink_pattern) > SINK_PATTERN_MAX) {
                fprintf(stderr, "sink: --pattern: 1 to %d bytes\n", SINK_PATTERN_MAX);
                return 2;
            }
        } else if (strcmp(argv[i], "--delay-ms") == 0 && i + 1 < argc) {
            sink_delay_ms = strtol(argv[++i], &end, 10);
            if (*end || sink_delay_ms < 0 || sink_delay_ms > 600000) {
                fprintf(stderr, "sink: --delay-ms: expected 0..600000, got '%s'\n", argv[i]);
                return 2;
            }
        } else if (strcmp(argv[i], "-h") == 0 || strcmp(argv[i], "--help") == 0) {
            sink_usage(stdout);
            return 0;
        } else {
            sink_usage(stderr);
            return 2;
        }
    }

    sink_pattern_len = strlen(sink_pattern);
    for (size_t i = 1, k = 0; i < sink_pattern_len; i++) {
        while (k > 0 && sink_pattern[i] != sink_pattern[k])
            k = sink_fail[k - 1];
        if (sink_pattern[i] == sink_pattern[k])
            k++;
        sink_fail[i] = k;
    }

    /* MHD's threads inherit this mask; the main thread waits for the signals. */
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGTERM);
    sigaddset(&sigs, SIGINT);
    sigprocmask(SIG_BLOCK, &sigs, NULL);
    signal(SIGPIPE, SIG_IGN);

    sink_ok = MHD_create_response_from_buffer(sizeof(ok_body) - 1, (void *)ok_body,
                                              MHD_RESPMEM_PERSISTENT);
    if (!sink_ok)
        return 1;
    MHD_add_response_header(sink_ok, MHD_HTTP_HEADER_CONTENT_TYPE, "application/json");

    if (sink_delay_ms > 0) /* a thread per connection: a slow answer holds only its own */
        d = MHD_start_daemon(
            MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_THREAD_PER_CONNECTION | MHD_USE_POLL,
            (uint16_t)port, NULL, NULL, sink_handle, NULL, MHD_OPTION_CONNECTION_LIMIT,
            (unsigned int)1000, MHD_OPTION_CONNECTION_TIMEOUT, (unsigned int)120,
            MHD_OPTION_NOTIFY_COMPLETED, sink_completed, NULL, MHD_OPTION_END);
    else
        d = MHD_start_daemon(MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_EPOLL, (uint16_t)port, NULL,
                             NULL, sink_handle, NULL, MHD_OPTION_THREAD_POOL_SIZE, (unsigned int)2,
                             MHD_OPTION_CONNECTION_LIMIT, (unsigned int)1000,
                             MHD_OPTION_CONNECTION_TIMEOUT, (unsigned int)120,
                             MHD_OPTION_NOTIFY_COMPLETED, sink_completed, NULL, MHD_OPTION_END);
    if (!d) {
        fprintf(stderr, "sink: cannot listen on port %ld: %s\n", port, strerror(errno));
        return 1;
    }
    info = MHD_get_daemon_info(d, MHD_DAEMON_INFO_BIND_PORT);
    printf("%u\n", info ? (unsigned int)info->port : (unsigned int)port);
    fflush(stdout);

    while (sigwait(&sigs, &sig) != 0)
        ;
    MHD_stop_daemon(d);
    MHD_destroy_response(sink_ok);
    return 0;
}
