/* The one redis:// URL parser (src/redis_link.c), shared by the Redis source, the redis://
 * destination writer and check-config. */
#include "esmd/redis_link.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

static void check_url(const char *url, const char *host, int port, int db, const char *user,
                      const char *password)
{
    struct esmd_redis_url u;
    char err[200] = "";
    if (esmd_redis_url_parse(url, &u, err, sizeof(err)) != ESMD_OK)
        fail_msg("%s: %s", url, err);
    assert_string_equal(u.host, host);
    assert_int_equal(u.port, port);
    assert_int_equal(u.db, db);
    if (user)
        assert_string_equal(u.user, user);
    else
        assert_null(u.user);
    if (password)
        assert_string_equal(u.password, password);
    else
        assert_null(u.password);
    esmd_redis_url_free(&u);
    assert_null(u.host);
}

static void check_bad_url(const char *url, const char *message_part)
{
    struct esmd_redis_url u;
    char err[200] = "";
    assert_int_equal(esmd_redis_url_parse(url, &u, err, sizeof(err)), ESMD_EINVAL);
    if (!strstr(err, message_part))
        fail_msg("%s: \"%s\" does not say \"%s\"", url, err, message_part);
    /* nothing to free on failure */
    assert_null(u.host);
    assert_null(u.user);
    assert_null(u.password);
}

static void test_good(void **state)
{
    (void)state;
    check_url("redis://localhost", "localhost", 6379, 0, NULL, NULL);
    check_url("redis://localhost/", "localhost", 6379, 0, NULL, NULL);
    check_url("redis://127.0.0.1:7000/3", "127.0.0.1", 7000, 3, NULL, NULL);
    check_url("redis://:s3cret@redis.example:6380/1", "redis.example", 6380, 1, NULL, "s3cret");
    check_url("redis://app:p%40ss%3Aword@h/0", "h", 6379, 0, "app", "p@ss:word");
    check_url("redis://a:b@c@h", "h", 6379, 0, "a", "b@c");
    check_url("redis://[::1]:6390/2", "::1", 6390, 2, NULL, NULL);
    check_url("redis://[::1]", "::1", 6379, 0, NULL, NULL);
    check_url("redis://h:1/1000000", "h", 1, 1000000, NULL, NULL);
    check_url("redis://h:65535/0", "h", 65535, 0, NULL, NULL);
    check_url("redis://:pw@h", "h", 6379, 0, NULL, "pw");
    check_url("redis://:@h", "h", 6379, 0, NULL, "");
    check_url("redis://u:p%2Fq%2fr@h:7/9", "h", 7, 9, "u", "p/q/r");
    check_url("redis://u%3A1:p@h", "h", 6379, 0, "u:1", "p");
    check_url("redis://[fe80::1%25eth0]:7000", "fe80::1%25eth0", 7000, 0, NULL, NULL);
}

static void test_bad(void **state)
{
    (void)state;
    /* what check-config accepted and run refused before one parser did both */
    check_bad_url("redis://h:99999999/abc", "port");
    check_bad_url("redis://h:6379/abc", "database number");
    check_bad_url("rediss://:pw@h:6380/2", "TLS");
    check_bad_url("rediss://localhost", "TLS");
    check_bad_url("http://localhost", "redis://");
    check_bad_url("redis://", "no host");
    check_bad_url("redis://:6379", "no host");
    check_bad_url("redis://h:0", "port");
    check_bad_url("redis://h:65536", "port");
    check_bad_url("redis://h:12ab", "port");
    check_bad_url("redis://h/x", "database number");
    check_bad_url("redis://h/1/2", "database number");
    check_bad_url("redis://h/0?timeout=1", "query");
    check_bad_url("redis://user@h", "without a password");
    check_bad_url("redis://:%zz@h", "percent");
    check_bad_url("redis://:%00@h", "percent");
    check_bad_url("redis://[::1", "IPv6");
    check_bad_url("redis://[::1]x", "after ]");
    check_bad_url("", "redis://");
    check_bad_url("REDIS://h", "redis://");
    check_bad_url("redis://h:", "port");
    check_bad_url("redis://h:+1", "port");
    check_bad_url("redis://h:-1", "port");
    check_bad_url("redis://h:1234567890", "port");
    check_bad_url("redis://h/1000001", "database number");
    check_bad_url("redis://h/-1", "database number");
    check_bad_url("redis://h#frag", "fragment");
    check_bad_url("redis://h/0#frag", "fragment");
    check_bad_url("redis://:%4@h", "percent");
    check_bad_url("redis://:%4g@h", "percent");
    check_bad_url("redis://:%@h", "percent");
    check_bad_url("redis://%00:p@h", "percent");
    check_bad_url("redis://u:p@", "no host");
    check_bad_url("redis://[]:1", "IPv6");
}

/* The error never repeats the URL: it may hold a password. */
static void test_error_hides_password(void **state)
{
    (void)state;
    const char *bad[] = {"redis://:s3cret@h:0", "redis://u:s3cret@h/x", "redis://:s3cret@h?x=1",
                         "redis://:s3cret@[::1"};
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        struct esmd_redis_url u;
        char err[200] = "";
        assert_int_equal(esmd_redis_url_parse(bad[i], &u, err, sizeof(err)), ESMD_EINVAL);
        assert_null(strstr(err, "s3cret"));
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_good),
        cmocka_unit_test(test_bad),
        cmocka_unit_test(test_error_hides_password),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
