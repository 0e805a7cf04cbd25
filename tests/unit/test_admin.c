/* The admin API's pieces that need no server: mapping UUIDs (UUIDv5 of the name, from
 * libcrypto's SHA-1) and the parsing of UpdateEventSourceMapping and event-invoke-config bodies.
 * The routes are tested end to end in tests/integration/test_admin_api.py. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "esmd/admin.h"
#include "esmd/api.h"

#include <string.h>

/* Expected values from Python: uuid.uuid5(uuid.UUID("5c3c8f5e-6d1a-4f0b-9a57-3e2d7b1c8e40"),
 * name). The 64-byte name crosses a SHA-1 block boundary with the 16-byte namespace. */
static void test_mapping_uuid(void **state)
{
    char out[37];
    char x64[65];

    (void)state;
    esmd_admin_mapping_uuid("orders-from-kafka", out);
    assert_string_equal(out, "5479768f-da87-5ac2-94d6-b74353c006ec");
    esmd_admin_mapping_uuid("a", out);
    assert_string_equal(out, "954166f9-8359-5a47-91b6-8a2b6afab973");
    memset(x64, 'x', 64);
    x64[64] = '\0';
    esmd_admin_mapping_uuid(x64, out);
    assert_string_equal(out, "6bf5ec6e-037d-57cd-a994-0db1b2e1712b");
}

static int esm(const char *body, char *why, size_t whylen)
{
    static const struct esmd_mapping_cfg c = {
        .name = "m",
        .function = "fn",
        .kind = ESMD_SOURCE_KAFKA,
        .max_filters = 5,
        .max_filter_pattern_length = 4096,
    };

    return esmd_admin_esm_check(&c, body, strlen(body), why, whylen);
}

static void test_esm_body(void **state)
{
    char why[2048];

    (void)state;
    assert_int_equal(esm("", why, sizeof(why)), 0);
    assert_int_equal(esm("{\"BatchSize\":10,\"Enabled\":false,\"FunctionName\":\"arn:aws:lambda:"
                         "us-east-1:000000000000:function:fn\",\"FilterCriteria\":{\"Filters\":"
                         "[{\"Pattern\":\"{\\\"a\\\":[1]}\"}]}}",
                         why, sizeof(why)),
                     0);
    assert_int_equal(esm("{\"BatchSize\":10} x", why, sizeof(why)), 400);
    assert_non_null(strstr(why, "InvalidRequestContentException"));
    assert_int_equal(esm("{\"FilterCriteria\":{\"Filters\":[{\"Pattern\":\"{}\\u0000junk\"}]}}",
                         why, sizeof(why)),
                     400);
    assert_non_null(strstr(why, "FilterCriteria.Filters[0].Pattern must not contain a NUL"));
    assert_int_equal(esm("{\"BatchSize\":10001}", why, sizeof(why)), 400);
    assert_non_null(strstr(why, "BatchSize must be an integer from 1 to 10000"));
    assert_int_equal(esm("{\"FunctionName\":\"other\"}", why, sizeof(why)), 400);
    /* two FilterCriteria: the second wins, nothing leaks */
    assert_int_equal(esm("{\"FilterCriteria\":{\"Filters\":[{\"Pattern\":\"{}\"}]},"
                         "\"FilterCriteria\":{\"Filters\":[]}}",
                         why, sizeof(why)),
                     0);
}

static void test_eic_body(void **state)
{
    char why[2048];
    const char *ok = "{\"MaximumRetryAttempts\":1,\"MaximumEventAgeInSeconds\":60,"
                     "\"DestinationConfig\":{\"OnFailure\":{\"Destination\":\"arn:aws:lambda:"
                     "us-east-1:000000000000:function:fn\"}}}";

    (void)state;
    assert_int_equal(esmd_api_eic_check(ok, strlen(ok), why, sizeof(why)), 0);
    assert_int_equal(esmd_api_eic_check("", 0, why, sizeof(why)), 400);
    assert_int_equal(esmd_api_eic_check("{\"MaximumRetryAttempts\":0}\0g", 28, why, sizeof(why)),
                     400);
    assert_non_null(strstr(why, "InvalidRequestContentException"));
    assert_int_equal(esmd_api_eic_check("{\"MaximumRetryAttempts\":3}", 26, why, sizeof(why)), 400);
    assert_non_null(strstr(why, "'maximumRetryAttempts'"));
    ok = "{\"DestinationConfig\":{\"OnSuccess\":{\"Destination\":\"function://fn\\u0000x\"}}}";
    assert_int_equal(esmd_api_eic_check(ok, strlen(ok), why, sizeof(why)), 400);
    assert_non_null(strstr(why, "DestinationConfig.OnSuccess.Destination must not contain a NUL"));
    ok = "{\"DestinationConfig\":{\"OnFailure\":{\"Destination\":\"arn:aws:lambda:eu-west-3:"
         "000000000000:function:fn\"}}}";
    assert_int_equal(esmd_api_eic_check(ok, strlen(ok), why, sizeof(why)), 400);
    assert_non_null(strstr(why, "not a function of this region and account"));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_mapping_uuid),
        cmocka_unit_test(test_esm_body),
        cmocka_unit_test(test_eic_body),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
