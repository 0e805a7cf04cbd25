/* Redis connections, shared by the Redis source (connectors/redis) and the redis:// destination
 * writer (src/dest_redis.c): the one parser of redis:// URLs (check-config and run read a URL the
 * same way), docs/redis.md "Connection".
 *
 * A URL is redis://[[user]:password@]host[:port][/db]: user and password percent-decoded (an
 * encoded NUL is refused), host a name, an IPv4 address or [an IPv6 address], port 1 to 65535
 * (default 6379), db 0 to 1000000 (default 0); no query, no fragment. rediss:// (TLS) is
 * refused: this build's hiredis has no TLS. */
#ifndef ESMD_REDIS_LINK_H
#define ESMD_REDIS_LINK_H

#include "esmd/common.h"

#include <stddef.h>

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

#endif
