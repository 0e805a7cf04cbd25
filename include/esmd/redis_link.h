/* Redis connections, shared by the Redis source (connectors/redis) and the redis:// destination
 * writer (src/dest_redis.c): the one parser of redis:// URLs (check-config and run read a URL the
 * same way, docs/redis.md "Connection") and the one link setup (connect with hiredis's async API
 * on the loop, AUTH, SELECT, CLIENT SETNAME).
 *
 * A URL is redis://[[user]:password@]host[:port][/db]: user and password percent-decoded (an
 * encoded NUL is refused), host a name, an IPv4 address or [an IPv6 address], port 1 to 65535
 * (default 6379), db 0 to 1000000 (default 0); no query, no fragment. rediss:// (TLS) is
 * refused: this build's hiredis has no TLS. */
#ifndef ESMD_REDIS_LINK_H
#define ESMD_REDIS_LINK_H

#include "esmd/common.h"

#include <stddef.h>

struct ev_loop;
struct redisAsyncContext;

/* A parsed URL. Every string is owned (free with esmd_redis_url_free()); user and password are
 * NULL when absent. */
struct esmd_redis_url {
    char *host; /* a name, an IPv4 address or an IPv6 address (without its brackets) */
    int port;   /* default 6379 */
    int db;     /* default 0 */
    char *user;
    char *password;
};

/* Parses url into *u. Returns 0, or ESMD_EINVAL with a message naming the problem in err (the
 * URL itself is not repeated: it may hold a password). *u needs no free on failure. */
int esmd_redis_url_parse(const char *url, struct esmd_redis_url *u, char *err,
                         size_t errlen) ESMD_MUST_CHECK;
/* Frees the strings of u and zeroes it; NULL ok. */
void esmd_redis_url_free(struct esmd_redis_url *u);

/* What a link reports (hiredis callbacks; ac->data is the data given to esmd_redis_link_open). */
struct esmd_redis_link_cbs {
    void (*on_connect)(const struct redisAsyncContext *ac, int status);
    void (*on_disconnect)(const struct redisAsyncContext *ac, int status);
    /* The reply to each setup command; privdata: the command's name ("AUTH", "SELECT",
     * "CLIENT SETNAME"), static. reply NULL when the context is being freed. */
    void (*on_setup)(struct redisAsyncContext *ac, void *reply, void *privdata);
};

/* Opens an async connection to u's server on loop (hiredis with its libev adapter, TCP
 * keepalive), with ac->data = data and cbs's callbacks (cbs borrowed: static), and queues the
 * link's setup, written once connected: AUTH [user] password when u has a password, SELECT db
 * when db is not 0, and CLIENT SETNAME client_name (bytes <= 0x20 and >= 0x7f become '_').
 * Returns the context, owned by hiredis (freed after its disconnect callback, or by the caller
 * with redisAsyncDisconnect() / redisAsyncFree()), with *nsetup = the setup commands queued
 * (at least 1); or NULL with err ("redis HOST:PORT: cannot connect: ..."), nothing left open. u
 * and client_name are read during the call only. */
struct redisAsyncContext *esmd_redis_link_open(struct ev_loop *loop, const struct esmd_redis_url *u,
                                               const char *client_name,
                                               const struct esmd_redis_link_cbs *cbs, void *data,
                                               int *nsetup, char *err, size_t errlen);

#endif
