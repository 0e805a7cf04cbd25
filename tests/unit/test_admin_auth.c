/* SigV4 verification (src/admin_auth.c) against AWS's published test-suite vector "get-vanilla"
 * and a POST with a body and a query, plus the refusals. */
#include "esmd/admin_auth.h"
#include "esmd/buf.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>

#include <cmocka.h>

struct hdrs {
    const char *const *kv; /* name, value, ..., NULL */
};

static const char *hdr(void *ud, const char *name)
{
    const struct hdrs *h = ud;
    for (size_t i = 0; h->kv[i]; i += 2)
        if (strcasecmp(h->kv[i], name) == 0)
            return h->kv[i + 1];
    return NULL;
}

#define AKID "AKIDEXAMPLE"
#define SECRET "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY"
/* 2015-08-30T12:36:00Z */
#define NOW_MS 1440938160000LL

static const char vanilla_auth[] =
    "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, "
    "SignedHeaders=host;x-amz-date, "
    "Signature=5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31";

static enum esmd_sigv4_result check(const char *auth, const char *service, int64_t now,
                                    const char *secret)
{
    static const char *const kv[] = {"Host", "example.amazonaws.com", "X-Amz-Date",
                                     "20150830T123600Z", NULL};
    struct hdrs h = {kv};
    char why[256];
    return esmd_admin_sigv4_check(AKID, secret, service, auth, "GET", "/", "", "", 0, hdr, &h, now,
                                  why, sizeof(why));
}

static void test_vanilla(void **state)
{
    (void)state;
    assert_int_equal(check(vanilla_auth, "service", NOW_MS, SECRET), ESMD_SIGV4_OK);
    /* 14 minutes off: still fine; 16: stale */
    assert_int_equal(check(vanilla_auth, "service", NOW_MS + 14 * 60000, SECRET), ESMD_SIGV4_OK);
    assert_int_equal(check(vanilla_auth, "service", NOW_MS + 16 * 60000, SECRET), ESMD_SIGV4_STALE);
    assert_int_equal(check(vanilla_auth, "service", NOW_MS - 16 * 60000, SECRET), ESMD_SIGV4_STALE);
}

static void test_refusals(void **state)
{
    (void)state;
    assert_int_equal(check(vanilla_auth, "lambda", NOW_MS, SECRET), ESMD_SIGV4_WRONG_SERVICE);
    assert_int_equal(check(vanilla_auth, "service", NOW_MS, "other"), ESMD_SIGV4_MISMATCH);
    char bad[sizeof(vanilla_auth)];
    memcpy(bad, vanilla_auth, sizeof(bad));
    bad[strlen(bad) - 1] = '0';
    assert_int_equal(check(bad, "service", NOW_MS, SECRET), ESMD_SIGV4_MISMATCH);
    assert_int_equal(check("Bearer x", "service", NOW_MS, SECRET), ESMD_SIGV4_MALFORMED);
    assert_int_equal(check("AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/"
                           "aws4_request",
                           "service", NOW_MS, SECRET),
                     ESMD_SIGV4_MALFORMED);
    char other[sizeof(vanilla_auth) + 8];
    snprintf(other, sizeof(other), "%s", vanilla_auth);
    memcpy(strstr(other, "AKIDEXAMPLE"), "AKIDEXAMPLF", 11);
    assert_int_equal(check(other, "service", NOW_MS, SECRET), ESMD_SIGV4_UNKNOWN_KEY);
}

/* The query canonicalisation: encoded, sorted by name then value. */
static void test_query(void **state)
{
    (void)state;
    const char *names[] = {"Param2", "Param1", "a b", "e"};
    const char *values[] = {"value2", "value1", "x/y", NULL};
    struct esmd_buf b = ESMD_BUF_INIT;
    esmd_admin_sigv4_query(&b, names, values, 4);
    assert_string_equal(esmd_buf_cstr(&b), "Param1=value1&Param2=value2&a%20b=x%2Fy&e=");
    esmd_buf_free(&b);
}

/* "get-vanilla-query-order-key-case" of the AWS suite. */
static void test_query_vector(void **state)
{
    (void)state;
    static const char *const kv[] = {"Host", "example.amazonaws.com", "X-Amz-Date",
                                     "20150830T123600Z", NULL};
    struct hdrs h = {kv};
    char why[256];
    const char *names[] = {"Param2", "Param1"};
    const char *values[] = {"value2", "value1"};
    struct esmd_buf q = ESMD_BUF_INIT;
    esmd_admin_sigv4_query(&q, names, values, 2);
    const char *auth =
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, "
        "SignedHeaders=host;x-amz-date, "
        "Signature=b97d918cfa904a5beff61c982a1b6f458b799221646efd99d3219ec94cdf2500";
    assert_int_equal(esmd_admin_sigv4_check(AKID, SECRET, "service", auth, "GET", "/",
                                            esmd_buf_cstr(&q), "", 0, hdr, &h, NOW_MS, why,
                                            sizeof(why)),
                     ESMD_SIGV4_OK);
    esmd_buf_free(&q);
}

/* "post-x-www-form-urlencoded" of the AWS suite: a body and a content-type header. */
static void test_post_body_vector(void **state)
{
    (void)state;
    static const char *const kv[] = {"Host",
                                     "example.amazonaws.com",
                                     "X-Amz-Date",
                                     "20150830T123600Z",
                                     "Content-Type",
                                     "application/x-www-form-urlencoded",
                                     NULL};
    struct hdrs h = {kv};
    char why[256];
    const char *auth =
        "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/service/aws4_request, "
        "SignedHeaders=content-type;host;x-amz-date, "
        "Signature=ff11897932ad3f4e8b18135d722051e5ac45fc38421b1da7b9d196a0fe09473a";
    assert_int_equal(esmd_admin_sigv4_check(AKID, SECRET, "service", auth, "POST", "/", "",
                                            "Param1=value1", 13, hdr, &h, NOW_MS, why, sizeof(why)),
                     ESMD_SIGV4_OK);
    /* another body: the payload hash differs */
    assert_int_equal(esmd_admin_sigv4_check(AKID, SECRET, "service", auth, "POST", "/", "",
                                            "Param1=value2", 13, hdr, &h, NOW_MS, why, sizeof(why)),
                     ESMD_SIGV4_MISMATCH);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_vanilla),
        cmocka_unit_test(test_refusals),
        cmocka_unit_test(test_query),
        cmocka_unit_test(test_query_vector),
        cmocka_unit_test(test_post_body_vector),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
