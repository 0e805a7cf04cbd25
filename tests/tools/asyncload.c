/* asyncload: many concurrent Invoke(Event) clients against esmd, for tests/bench/async_bench.py.
 *
 *   asyncload --url http://HOST:PORT --function NAME [--token T] [--clients 64]
 *             [--count N | --seconds S] [--size BYTES] [--type Event|DryRun]
 *
 * Each client is one keep-alive connection that sends POST
 * /2015-03-31/functions/NAME/invocations (X-Amz-Invocation-Type: Event, a JSON payload of about
 * BYTES bytes) and the next one as soon as the answer arrives. Stops after N requests in total
 * or S seconds (requests in flight then are waited for), then prints one JSON line:
 *   {"sent":N,"accepted":A,"refused":R,"errors":E,"seconds":T,"accepted_per_s":X,
 *    "cpu_s":C,"p50_ms":..,"p99_ms":..,"p999_ms":..}   (answer latency percentiles)
 * accepted = answers 202 (each one durable in Postgres: esmd answers after the commit), or 204
 * with --type DryRun (validated, nothing stored: the ceiling of the HTTP path); cpu_s is
 * the CPU time asyncload itself used, so a benchmark can say what the load cost.
 *
 * The generator shares the machine with esmd and Postgres, so it is written to cost little: one
 * epoll loop over plain sockets, the request built once, and a response parser that knows only
 * what an HTTP/1.1 answer with a Content-Length needs (libcurl cost about as much CPU per
 * request as esmd itself). */
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define RBUF 16384

struct client {
    int fd;
    size_t out;     /* bytes of the request written */
    bool busy;      /* a request is in flight */
    double sent_at; /* when it was sent */
    char in[RBUF];  /* the answer so far */
    size_t inlen;
};

static const char *req;
static size_t reqlen;
static struct addrinfo *addr;
static int epfd;
static long sent, accepted, refused, errors;
static long lat_us[100001]; /* answers by latency in microseconds (the last: 100 ms or more) */

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static int client_connect(struct client *c)
{
    c->fd = socket(addr->ai_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (c->fd < 0 || connect(c->fd, addr->ai_addr, addr->ai_addrlen) != 0) {
        perror("asyncload: connect");
        if (c->fd >= 0)
            close(c->fd);
        c->fd = -1;
        return -1;
    }
    int one = 1;
    fcntl(c->fd, F_SETFL, fcntl(c->fd, F_GETFL) | O_NONBLOCK);
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    struct epoll_event ee = {.events = EPOLLIN, .data.ptr = c};
    epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ee);
    c->inlen = 0;
    return 0;
}

/* Writes what is left of the request; EPOLLOUT is asked for only when the socket is full. */
static void client_write(struct client *c)
{
    while (c->out < reqlen) {
        ssize_t n = send(c->fd, req + c->out, reqlen - c->out, MSG_NOSIGNAL);
        if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            struct epoll_event ee = {.events = EPOLLIN | EPOLLOUT, .data.ptr = c};
            epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ee);
            return;
        }
        if (n < 0)
            return; /* the read side sees the error */
        c->out += (size_t)n;
    }
}

static void client_send(struct client *c)
{
    c->busy = true;
    c->out = 0;
    c->sent_at = now_s();
    sent++;
    client_write(c);
}

/* Length of a complete answer at the start of c->in, 0 if incomplete, -1 if malformed; the
 * status goes to *status. */
static long answer_len(struct client *c, int *status)
{
    char *end = memmem(c->in, c->inlen, "\r\n\r\n", 4);
    if (!end)
        return c->inlen >= RBUF ? -1 : 0;
    size_t head = (size_t)(end - c->in) + 4;
    if (c->inlen < 12 || memcmp(c->in, "HTTP/1.", 7) != 0)
        return -1;
    *status = atoi(c->in + 9);
    long body = 0;
    for (char *p = c->in; p < end; p++) {
        if (*p == '\n' && strncasecmp(p + 1, "content-length:", 15) == 0) {
            body = atol(p + 16);
            break;
        }
    }
    if (head + (size_t)body > RBUF)
        return -1;
    return c->inlen >= head + (size_t)body ? (long)(head + (size_t)body) : 0;
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"url", required_argument, NULL, 'u'},
        {"function", required_argument, NULL, 'f'},
        {"token", required_argument, NULL, 't'},
        {"clients", required_argument, NULL, 'c'},
        {"count", required_argument, NULL, 'n'},
        {"seconds", required_argument, NULL, 's'},
        {"size", required_argument, NULL, 'b'},
        {"type", required_argument, NULL, 'y'},
        {NULL, 0, NULL, 0},
    };
    const char *url = NULL, *fn = "fn", *token = NULL, *type = "Event";
    int clients = 64, size = 100, ch, want;
    long count = 0;
    double seconds = 0;
    while ((ch = getopt_long(argc, argv, "u:f:t:c:n:s:b:y:", opts, NULL)) != -1) {
        switch (ch) {
        case 'u':
            url = optarg;
            break;
        case 'f':
            fn = optarg;
            break;
        case 't':
            token = optarg;
            break;
        case 'c':
            clients = atoi(optarg);
            break;
        case 'n':
            count = atol(optarg);
            break;
        case 's':
            seconds = atof(optarg);
            break;
        case 'b':
            size = atoi(optarg);
            break;
        case 'y':
            type = optarg;
            break;
        default:
            fprintf(stderr, "usage: asyncload --url URL --function NAME [--token T] "
                            "[--clients N] [--count N | --seconds S] [--size BYTES] "
                            "[--type Event|DryRun]\n");
            return 2;
        }
    }
    char host[256], port[16];
    if (!url || clients < 1 || (count <= 0 && seconds <= 0) ||
        sscanf(url, "http://%255[^:/]:%15[0-9]", host, port) != 2) {
        fprintf(stderr, "asyncload: --url http://HOST:PORT and --count or --seconds are "
                        "required\n");
        return 2;
    }
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM};
    int gai = getaddrinfo(host, port, &hints, &addr);
    if (gai != 0) {
        fprintf(stderr, "asyncload: %s: %s\n", host, gai_strerror(gai));
        return 2;
    }
    size_t plen = size > 16 ? (size_t)size : 16;
    char *payload = malloc(plen + 1);
    memcpy(payload, "{\"pad\":\"", 8);
    memset(payload + 8, 'x', plen - 10);
    memcpy(payload + plen - 2, "\"}", 2);
    payload[plen] = '\0';
    size_t cap = plen + 1024 + strlen(fn) + (token ? strlen(token) : 0);
    char *r = malloc(cap);
    int hl = snprintf(r, cap,
                      "POST /2015-03-31/functions/%s/invocations HTTP/1.1\r\n"
                      "Host: %s:%s\r\nX-Amz-Invocation-Type: %s\r\n"
                      "Content-Type: application/json\r\n%s%s%sContent-Length: %zu\r\n\r\n",
                      fn, host, port, type, token ? "Authorization: Bearer " : "",
                      token ? token : "", token ? "\r\n" : "", plen);
    memcpy(r + hl, payload, plen);
    req = r;
    reqlen = (size_t)hl + plen;

    want = strcmp(type, "DryRun") == 0 ? 204 : 202;
    epfd = epoll_create1(EPOLL_CLOEXEC);
    struct client *cl = calloc((size_t)clients, sizeof(*cl));
    double start = now_s(), end;
    int active = 0;
    for (int i = 0; i < clients; i++) {
        if (client_connect(&cl[i]) != 0)
            return 1;
        if (count <= 0 || sent < count) {
            client_send(&cl[i]);
            active++;
        }
    }
    struct epoll_event evs[256];
    while (active > 0) {
        int n = epoll_wait(epfd, evs, 256, 1000);
        for (int k = 0; k < n; k++) {
            struct client *c = evs[k].data.ptr;
            if (evs[k].events & EPOLLOUT) {
                client_write(c);
                if (c->out >= reqlen) {
                    struct epoll_event ee = {.events = EPOLLIN, .data.ptr = c};
                    epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ee);
                }
            }
            if (!(evs[k].events & (EPOLLIN | EPOLLERR | EPOLLHUP)))
                continue;
            ssize_t got = recv(c->fd, c->in + c->inlen, RBUF - c->inlen, 0);
            if (got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK))
                continue;
            bool more = count > 0 ? sent < count : now_s() - start < seconds;
            if (got <= 0) { /* closed or failed: the request in flight is an error */
                epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
                close(c->fd);
                if (c->busy)
                    errors++;
                c->busy = false;
                if (more && client_connect(c) == 0)
                    client_send(c);
                else
                    active--;
                continue;
            }
            c->inlen += (size_t)got;
            int status = 0;
            long len;
            while (c->busy && (len = answer_len(c, &status)) != 0) {
                if (len < 0) {
                    fprintf(stderr, "asyncload: malformed answer\n");
                    return 1;
                }
                if (status == want)
                    accepted++;
                else
                    refused++;
                long us = (long)((now_s() - c->sent_at) * 1e6);
                lat_us[us < 0 ? 0 : us > 100000 ? 100000 : us]++;
                memmove(c->in, c->in + len, c->inlen - (size_t)len);
                c->inlen -= (size_t)len;
                c->busy = false;
                more = count > 0 ? sent < count : now_s() - start < seconds;
                if (more)
                    client_send(c);
                else
                    active--;
            }
        }
    }
    end = now_s();
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    double cpu = (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6 +
                 (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6;
    long pct[3] = {0, 0, 0}, seen = 0, answers = accepted + refused;
    const double at[3] = {0.5, 0.99, 0.999};
    for (long us = 0, k = 0; us <= 100000 && k < 3; us++) {
        seen += lat_us[us];
        while (k < 3 && answers > 0 && (double)seen >= at[k] * (double)answers)
            pct[k++] = us;
    }
    printf("{\"sent\":%ld,\"accepted\":%ld,\"refused\":%ld,\"errors\":%ld,\"seconds\":%.3f,"
           "\"accepted_per_s\":%.0f,\"cpu_s\":%.2f,\"p50_ms\":%.2f,\"p99_ms\":%.2f,"
           "\"p999_ms\":%.2f}\n",
           sent, accepted, refused, errors, end - start, (double)accepted / (end - start), cpu,
           (double)pct[0] / 1000, (double)pct[1] / 1000, (double)pct[2] / 1000);
    for (int i = 0; i < clients; i++)
        if (cl[i].fd >= 0)
            close(cl[i].fd);
    free(cl);
    free(payload);
    free(r);
    freeaddrinfo(addr);
    return errors > 0 && accepted == 0 ? 1 : 0;
}
