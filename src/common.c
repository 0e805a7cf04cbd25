/* Allocation helpers, clocks, UUIDs and timestamps. */
#include "esmd/common.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <time.h>

static void oom(size_t n)
{
    fprintf(stderr, "{\"level\":\"error\",\"msg\":\"out of memory allocating %zu bytes\"}\n", n);
    abort();
}

void *esmd_xmalloc(size_t n)
{
    void *p = malloc(n ? n : 1);
    if (!p)
        oom(n);
    return p;
}

void *esmd_xcalloc(size_t nmemb, size_t n)
{
    void *p = calloc(nmemb ? nmemb : 1, n ? n : 1);
    if (!p)
        oom(nmemb * n);
    return p;
}

void *esmd_xrealloc(void *p, size_t n)
{
    void *q = realloc(p, n ? n : 1);
    if (!q)
        oom(n);
    return q;
}

char *esmd_xstrdup(const char *s)
{
    return s ? esmd_xstrndup(s, strlen(s)) : NULL;
}

char *esmd_xstrndup(const char *s, size_t n)
{
    if (!s)
        return NULL;
    char *p = esmd_xmalloc(n + 1);
    memcpy(p, s, n);
    p[n] = '\0';
    return p;
}

int64_t esmd_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

double esmd_mono(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* Random bytes for uuids come from a per-thread pool refilled 4 KiB at a time: one getrandom()
 * per 256 uuids instead of one per uuid (it showed in profiles of the Invoke route). */
void esmd_uuid4(char out[37])
{
    static _Thread_local unsigned char pool[4096];
    static _Thread_local size_t left;
    static const char hex[] = "0123456789abcdef";
    unsigned char b[16];
    if (left < sizeof(b)) {
        if (getrandom(pool, sizeof(pool), 0) != (ssize_t)sizeof(pool)) {
            /* getrandom on Linux >= 3.17 does not fail here; fall back anyway */
            for (size_t i = 0; i < sizeof(pool); i++)
                pool[i] = (unsigned char)rand();
        }
        left = sizeof(pool);
    }
    left -= sizeof(b);
    memcpy(b, pool + left, sizeof(b));
    memset(pool + left, 0, sizeof(b)); /* a byte is never handed out twice */
    b[6] = (unsigned char)((b[6] & 0x0f) | 0x40);
    b[8] = (unsigned char)((b[8] & 0x3f) | 0x80);
    char *o = out;
    for (size_t i = 0; i < sizeof(b); i++) {
        if (i == 4 || i == 6 || i == 8 || i == 10)
            *o++ = '-';
        *o++ = hex[b[i] >> 4];
        *o++ = hex[b[i] & 15];
    }
    *o = '\0';
}

void esmd_iso8601_ms(int64_t ms, char out[32])
{
    time_t secs = (time_t)(ms / 1000);
    int rem = (int)(ms % 1000);
    if (rem < 0) {
        rem += 1000;
        secs -= 1;
    }
    struct tm tm;
    gmtime_r(&secs, &tm);
    size_t n = strftime(out, 32, "%Y-%m-%dT%H:%M:%S", &tm);
    snprintf(out + n, 32 - n, ".%03dZ", rem);
}

static char aws_region[64] = ESMD_DEFAULT_REGION;
static char aws_account[64] = ESMD_DEFAULT_ACCOUNT;

void esmd_aws_set(const char *region, const char *account)
{
    if (region)
        snprintf(aws_region, sizeof(aws_region), "%s", region);
    if (account)
        snprintf(aws_account, sizeof(aws_account), "%s", account);
}

const char *esmd_aws_region(void)
{
    return aws_region;
}

const char *esmd_aws_account(void)
{
    return aws_account;
}

void esmd_function_arn(const char *name, char *out, size_t outlen)
{
    snprintf(out, outlen, "arn:aws:lambda:%s:%s:function:%s", aws_region, aws_account, name);
}

bool esmd_function_prefix_ours(const char *prefix, size_t n)
{
    char want[160];
    if (n == 0)
        return true;
    int w = snprintf(want, sizeof(want), "%s:", aws_account);
    if ((size_t)w == n && memcmp(prefix, want, n) == 0)
        return true;
    w = snprintf(want, sizeof(want), "arn:aws:lambda:%s:%s:", aws_region, aws_account);
    return (size_t)w == n && memcmp(prefix, want, n) == 0;
}

int esmd_hex_digit(int c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    if (c >= 'A' && c <= 'F')
        return c - 'A' + 10;
    return -1;
}
