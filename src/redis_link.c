/* Redis connections shared by the Redis source and the redis:// writer
 * (include/esmd/redis_link.h): the URL parser and the link setup. */
#include "esmd/redis_link.h"

#include <ev.h>
#include <hiredis/adapters/libev.h>
#include <hiredis/async.h>

#include <hiredis/hiredis.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Percent-decodes n bytes of s; NULL on a bad escape or an encoded NUL. */
static char *pct_decode(const char *s, size_t n)
{
    char *out = esmd_xmalloc(n + 1);
    size_t k = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] != '%') {
            out[k++] = s[i];
            continue;
        }
        int hi = i + 1 < n ? esmd_hex_digit(s[i + 1]) : -1;
        int lo = i + 2 < n ? esmd_hex_digit(s[i + 2]) : -1;
        if (hi < 0 || lo < 0 || (hi == 0 && lo == 0)) {
            free(out);
            return NULL;
        }
        out[k++] = (char)(hi * 16 + lo);
        i += 2;
    }
    out[k] = '\0';
    return out;
}

/* A decimal number of at most 9 digits in [lo, hi]; -1 when not. */
static long small_number(const char *s, size_t n, long lo, long hi)
{
    if (n == 0 || n > 9)
        return -1;
    long v = 0;
    for (size_t i = 0; i < n; i++) {
        if (s[i] < '0' || s[i] > '9')
            return -1;
        v = v * 10 + (s[i] - '0');
    }
    return v < lo || v > hi ? -1 : v;
}

void esmd_redis_url_free(struct esmd_redis_url *u)
{
    if (!u)
        return;
    free(u->host);
    free(u->user);
    free(u->password);
    memset(u, 0, sizeof(*u));
}

int esmd_redis_url_parse(const char *url, struct esmd_redis_url *u, char *err, size_t errlen)
{
    memset(u, 0, sizeof(*u));
    u->port = 6379;
    if (strncmp(url, "rediss://", 9) == 0) {
        snprintf(
            err, errlen,
            "rediss:// (TLS) is not supported by this build of esmd (hiredis %d.%d has no TLS)",
            HIREDIS_MAJOR, HIREDIS_MINOR);
        return ESMD_EINVAL;
    }
    if (strncmp(url, "redis://", 8) != 0) {
        snprintf(err, errlen, "a redis URL starts with redis://");
        return ESMD_EINVAL;
    }
    const char *p = url + 8;
    const char *end = p + strcspn(p, "/?#");
    if (*end == '?' || *end == '#' || strchr(end, '?') || strchr(end, '#')) {
        snprintf(err, errlen, "query parameters and fragments are not supported in a redis URL");
        return ESMD_EINVAL;
    }
    /* userinfo: the part before the last '@' of the authority */
    const char *at = NULL;
    for (const char *q = p; q < end; q++)
        if (*q == '@')
            at = q;
    if (at) {
        const char *colon = memchr(p, ':', (size_t)(at - p));
        if (!colon) {
            snprintf(
                err, errlen,
                "a redis URL names a user without a password (write redis://user:password@host "
                "or redis://:password@host)");
            goto fail;
        }
        if (colon > p && !(u->user = pct_decode(p, (size_t)(colon - p)))) {
            snprintf(err, errlen, "bad percent-escape in the user of the redis URL");
            goto fail;
        }
        if (!(u->password = pct_decode(colon + 1, (size_t)(at - colon - 1)))) {
            snprintf(err, errlen, "bad percent-escape in the password of the redis URL");
            goto fail;
        }
        p = at + 1;
    }
    /* host[:port] */
    const char *host = p, *host_end;
    const char *port = NULL;
    if (*p == '[') {
        const char *close = memchr(p, ']', (size_t)(end - p));
        if (!close || close == p + 1) {
            snprintf(err, errlen, "bad IPv6 address in the redis URL (write [addr]:port)");
            goto fail;
        }
        host = p + 1;
        host_end = close;
        if (close + 1 < end) {
            if (close[1] != ':') {
                snprintf(err, errlen, "unexpected text after ] in the redis URL");
                goto fail;
            }
            port = close + 2;
        }
    } else {
        host_end = memchr(p, ':', (size_t)(end - p));
        if (host_end)
            port = host_end + 1;
        else
            host_end = end;
    }
    if (host_end == host) {
        snprintf(err, errlen, "the redis URL has no host");
        goto fail;
    }
    u->host = esmd_xstrndup(host, (size_t)(host_end - host));
    if (port) {
        long v = small_number(port, (size_t)(end - port), 1, 65535);
        if (v < 0) {
            snprintf(err, errlen, "the port of the redis URL must be 1 to 65535");
            goto fail;
        }
        u->port = (int)v;
    }
    /* /db */
    if (*end == '/' && end[1]) {
        long v = small_number(end + 1, strlen(end + 1), 0, 1000000);
        if (v < 0) {
            snprintf(err, errlen, "the path of the redis URL must be a database number, e.g. /0");
            goto fail;
        }
        u->db = (int)v;
    }
    return ESMD_OK;
fail:
    esmd_redis_url_free(u);
    return ESMD_EINVAL;
}

/* ---- the link ---- */

static bool link_setup_cmd(redisAsyncContext *ac, const struct esmd_redis_link_cbs *cbs,
                           const char *what, int argc, const char **argv, int *nsetup)
{
    size_t lens[3];
    for (int i = 0; i < argc; i++)
        lens[i] = strlen(argv[i]);
    if (redisAsyncCommandArgv(ac, cbs->on_setup, (void *)what, argc, argv, lens) != REDIS_OK)
        return false;
    (*nsetup)++;
    return true;
}

redisAsyncContext *esmd_redis_link_open(struct ev_loop *loop, const struct esmd_redis_url *u,
                                        const char *client_name,
                                        const struct esmd_redis_link_cbs *cbs, void *data,
                                        int *nsetup, char *err, size_t errlen)
{
    *nsetup = 0;
    redisAsyncContext *ac = redisAsyncConnect(u->host, u->port);
    if (!ac || ac->err) {
        snprintf(err, errlen, "redis %s:%d: cannot connect: %s", u->host, u->port,
                 ac ? ac->errstr : "out of memory");
        if (ac)
            redisAsyncFree(ac);
        return NULL;
    }
    ac->data = data;
    redisEnableKeepAlive(&ac->c); /* best effort: notices a dead peer on an idle link */
    redisLibevAttach(loop, ac);
    redisAsyncSetConnectCallback(ac, cbs->on_connect);
    redisAsyncSetDisconnectCallback(ac, cbs->on_disconnect);
    /* queued now, written once connected */
    bool ok = true;
    if (u->password) {
        const char *argv[3] = {"AUTH", u->user ? u->user : u->password, u->password};
        ok = link_setup_cmd(ac, cbs, "AUTH", u->user ? 3 : 2, argv, nsetup);
    }
    if (ok && u->db != 0) {
        char db[16];
        snprintf(db, sizeof(db), "%d", u->db);
        const char *argv[2] = {"SELECT", db};
        ok = link_setup_cmd(ac, cbs, "SELECT", 2, argv, nsetup);
    }
    if (ok) {
        char *name = esmd_xstrdup(client_name);
        for (char *p = name; *p; p++)
            if ((unsigned char)*p <= 0x20 || (unsigned char)*p >= 0x7f)
                *p = '_';
        const char *argv[3] = {"CLIENT", "SETNAME", name};
        ok = link_setup_cmd(ac, cbs, "CLIENT SETNAME", 3, argv, nsetup);
        free(name);
    }
    if (!ok) {
        snprintf(err, errlen, "redis %s:%d: cannot send the connection setup: %s", u->host, u->port,
                 ac->errstr[0] ? ac->errstr : "connection closing");
        ac->data = NULL; /* the callbacks see a context that is not theirs */
        redisAsyncFree(ac);
        *nsetup = 0;
        return NULL;
    }
    return ac;
}
