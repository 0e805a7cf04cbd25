/* asyncload: many concurrent Invoke(Event) clients against esmd, for tests/bench/async_bench.py.
 *
 *   asyncload --url http://127.0.0.1:PORT --function NAME [--token T] [--clients 64]
 *             [--count N | --seconds S] [--size BYTES]
 *
 * Each client is one keep-alive connection that sends POST
 * /2015-03-31/functions/NAME/invocations (X-Amz-Invocation-Type: Event, a JSON payload of about
 * BYTES bytes) and the next one as soon as the answer arrives, on one libcurl multi handle.
 * Stops after N requests in total or S seconds, then prints one JSON line:
 *   {"sent":N,"accepted":A,"refused":R,"errors":E,"seconds":T,"accepted_per_s":X}
 * accepted = answers 202 (each one durable in Postgres: esmd answers after the commit). */
#include <curl/curl.h>
#include <getopt.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

struct client {
    CURL *easy;
    struct curl_slist *hdrs;
};

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static size_t discard(char *p, size_t s, size_t n, void *ud)
{
    (void)p;
    (void)ud;
    return s * n;
}

int main(int argc, char **argv)
{
    static const struct option opts[] = {
        {"url", required_argument, NULL, 'u'},   {"function", required_argument, NULL, 'f'},
        {"token", required_argument, NULL, 't'}, {"clients", required_argument, NULL, 'c'},
        {"count", required_argument, NULL, 'n'}, {"seconds", required_argument, NULL, 's'},
        {"size", required_argument, NULL, 'b'},  {NULL, 0, NULL, 0},
    };
    const char *url = NULL, *fn = "fn", *token = NULL;
    int clients = 64, size = 100, ch;
    long count = 0;
    double seconds = 0;
    while ((ch = getopt_long(argc, argv, "u:f:t:c:n:s:b:", opts, NULL)) != -1) {
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
        default:
            fprintf(stderr, "usage: asyncload --url URL --function NAME [--token T] "
                            "[--clients N] [--count N | --seconds S] [--size BYTES]\n");
            return 2;
        }
    }
    if (!url || clients < 1 || (count <= 0 && seconds <= 0)) {
        fprintf(stderr, "asyncload: --url and --count or --seconds are required\n");
        return 2;
    }
    curl_global_init(CURL_GLOBAL_ALL);
    char full[1024], auth[512];
    snprintf(full, sizeof(full), "%s/2015-03-31/functions/%s/invocations", url, fn);
    snprintf(auth, sizeof(auth), "Authorization: Bearer %s", token ? token : "");
    size_t plen = size > 16 ? (size_t)size : 16;
    char *payload = malloc(plen + 1);
    memcpy(payload, "{\"pad\":\"", 8);
    memset(payload + 8, 'x', plen - 10);
    memcpy(payload + plen - 2, "\"}", 2);
    payload[plen] = '\0';

    CURLM *multi = curl_multi_init();
    struct client *cl = calloc((size_t)clients, sizeof(*cl));
    long sent = 0, accepted = 0, refused = 0, errors = 0;
    double start = now_s(), end;
    for (int i = 0; i < clients; i++) {
        CURL *e = curl_easy_init();
        cl[i].easy = e;
        cl[i].hdrs = curl_slist_append(NULL, "X-Amz-Invocation-Type: Event");
        cl[i].hdrs = curl_slist_append(cl[i].hdrs, "Content-Type: application/json");
        cl[i].hdrs = curl_slist_append(cl[i].hdrs, "Expect:");
        if (token)
            cl[i].hdrs = curl_slist_append(cl[i].hdrs, auth);
        curl_easy_setopt(e, CURLOPT_URL, full);
        curl_easy_setopt(e, CURLOPT_HTTPHEADER, cl[i].hdrs);
        curl_easy_setopt(e, CURLOPT_POSTFIELDS, payload);
        curl_easy_setopt(e, CURLOPT_POSTFIELDSIZE, (long)plen);
        curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, discard);
        curl_easy_setopt(e, CURLOPT_TIMEOUT, 30L);
        curl_easy_setopt(e, CURLOPT_PRIVATE, &cl[i]);
        if (count <= 0 || sent < count) {
            curl_multi_add_handle(multi, e);
            sent++;
        }
    }
    int running = 1;
    while (running) {
        curl_multi_perform(multi, &running);
        CURLMsg *m;
        int left;
        while ((m = curl_multi_info_read(multi, &left)) != NULL) {
            if (m->msg != CURLMSG_DONE)
                continue;
            CURL *e = m->easy_handle;
            long status = 0;
            if (m->data.result == CURLE_OK) {
                curl_easy_getinfo(e, CURLINFO_RESPONSE_CODE, &status);
                if (status == 202)
                    accepted++;
                else
                    refused++;
            } else {
                errors++;
            }
            curl_multi_remove_handle(multi, e);
            bool more = count > 0 ? sent < count : now_s() - start < seconds;
            if (more) {
                curl_multi_add_handle(multi, e);
                sent++;
                running = 1;
            }
        }
        if (running)
            curl_multi_poll(multi, NULL, 0, 100, NULL);
    }
    end = now_s();
    printf("{\"sent\":%ld,\"accepted\":%ld,\"refused\":%ld,\"errors\":%ld,\"seconds\":%.3f,"
           "\"accepted_per_s\":%.0f}\n",
           sent, accepted, refused, errors, end - start, (double)accepted / (end - start));
    for (int i = 0; i < clients; i++) {
        curl_easy_cleanup(cl[i].easy);
        curl_slist_free_all(cl[i].hdrs);
    }
    free(cl);
    free(payload);
    curl_multi_cleanup(multi);
    curl_global_cleanup();
    return errors > 0 && accepted == 0 ? 1 : 0;
}
