/* The mapping's pure pieces: the batchItemFailures parser of partial batch responses
 * (src/mapping_failure.c) and the one Retry-After clamp (esmd_invoke_retry_delay). */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "../../src/mapping_private.h"
#include "esmd/invoke.h"

#include <cJSON.h>
#include <string.h>

/* A part of three records whose identifiers are "a", "b", "c" (as pgqueue's messageIds). */
static const char *const ids[] = {"a", "b", "c"};

static bool str_item_is(void *ctx, size_t i, const cJSON *id)
{
    (void)ctx;
    return cJSON_IsString(id) && strcmp(id->valuestring, ids[i]) == 0;
}

static enum esmd_item_failures parse(const char *body, bool failed[3], const char **why)
{
    memset(failed, 0, 3 * sizeof(*failed));
    *why = NULL;
    return esmd_mapping_parse_item_failures(body, strlen(body), 3, str_item_is, NULL, failed, why);
}

static void test_no_failure(void **state)
{
    static const char *const bodies[] = {
        "",
        " \r\n\t",
        "null",
        "{}",
        "[]",
        "\"x\"",
        "42",
        "{\"batchItemFailures\":null}",
        "{\"batchItemFailures\":[]}",
        "{\"other\":[{\"itemIdentifier\":\"zz\"}]}",
        "{\"BatchItemFailures\":{}}", /* the key is case-sensitive */
    };
    for (size_t k = 0; k < ESMD_ARRAY_LEN(bodies); k++) {
        bool failed[3];
        const char *why;
        if (parse(bodies[k], failed, &why) != ESMD_ITEMS_NONE)
            fail_msg("%s: not a success", bodies[k]);
        assert_false(failed[0] || failed[1] || failed[2]);
        assert_null(why);
    }
}

static void test_some_failed(void **state)
{
    bool failed[3];
    const char *why;
    assert_int_equal(parse("{\"batchItemFailures\":[{\"itemIdentifier\":\"b\"}]}", failed, &why),
                     ESMD_ITEMS_SOME);
    assert_false(failed[0]);
    assert_true(failed[1]);
    assert_false(failed[2]);
    /* named twice, and with other members around */
    assert_int_equal(parse(" {\"x\":1,\"batchItemFailures\":[{\"itemIdentifier\":\"c\",\"y\":2},"
                           "{\"itemIdentifier\":\"a\"},{\"itemIdentifier\":\"c\"}]}\n",
                           failed, &why),
                     ESMD_ITEMS_SOME);
    assert_true(failed[0]);
    assert_false(failed[1]);
    assert_true(failed[2]);
}

static void test_unusable(void **state)
{
    static const struct {
        const char *body;
        const char *why;
    } cases[] = {
        {"not json", "the response is not JSON"},
        {"{\"batchItemFailures\":", "the response is not JSON"},
        {"{\"batchItemFailures\":{}}", "batchItemFailures is not a list"},
        {"{\"batchItemFailures\":\"a\"}", "batchItemFailures is not a list"},
        {"{\"batchItemFailures\":[{\"itemIdentifier\":\"zz\"}]}", "an itemIdentifier"},
        {"{\"batchItemFailures\":[{\"itemIdentifier\":\"\"}]}", "an itemIdentifier"},
        {"{\"batchItemFailures\":[{\"itemIdentifier\":null}]}", "an itemIdentifier"},
        {"{\"batchItemFailures\":[{}]}", "an itemIdentifier"},
        {"{\"batchItemFailures\":[\"a\"]}", "an itemIdentifier"},
        {"{\"batchItemFailures\":[{\"itemIdentifier\":\"a\"},{\"itemIdentifier\":\"d\"}]}",
         "an itemIdentifier"},
    };
    for (size_t k = 0; k < ESMD_ARRAY_LEN(cases); k++) {
        bool failed[3];
        const char *why;
        if (parse(cases[k].body, failed, &why) != ESMD_ITEMS_BAD)
            fail_msg("%s: not refused", cases[k].body);
        assert_non_null(why);
        if (strncmp(why, cases[k].why, strlen(cases[k].why)) != 0)
            fail_msg("%s: %s", cases[k].body, why);
    }
}

/* Only `len` bytes are read; without a matcher no identifier names a record. */
static void test_bounds(void **state)
{
    bool failed[3] = {false, false, false};
    const char *why = NULL;
    const char *body = "{}{\"batchItemFailures\":[{\"itemIdentifier\":\"a\"}]}";
    assert_int_equal(esmd_mapping_parse_item_failures(body, 2, 3, str_item_is, NULL, failed, &why),
                     ESMD_ITEMS_NONE);
    assert_int_equal(
        esmd_mapping_parse_item_failures(body + 2, strlen(body + 2), 3, NULL, NULL, failed, &why),
        ESMD_ITEMS_BAD);
    assert_int_equal(esmd_mapping_parse_item_failures("  ", 0, 3, NULL, NULL, failed, &why),
                     ESMD_ITEMS_NONE);
}

static int64_t delay(int64_t retry_after_ms, int64_t backoff_ms, int64_t cap_ms)
{
    struct esmd_invoke_result res = {.outcome = ESMD_INVOKE_THROTTLED,
                                     .retry_after_ms = retry_after_ms};
    return esmd_invoke_retry_delay(&res, backoff_ms, cap_ms);
}

static void test_retry_after_clamp(void **state)
{
    assert_int_equal(delay(-1, 300, 300000), 300);          /* no Retry-After: the backoff */
    assert_int_equal(delay(0, 300, 300000), 300);           /* "0": never sooner than the backoff */
    assert_int_equal(delay(100, 300, 300000), 300);         /* shorter than the backoff */
    assert_int_equal(delay(5000, 300, 300000), 5000);       /* longer: honoured */
    assert_int_equal(delay(300000, 300, 300000), 300000);   /* up to the cap */
    assert_int_equal(delay(86400000, 300, 300000), 300000); /* past it: the cap */
    assert_int_equal(delay(20000, 8000, 10000), 10000);     /* the async queue's cap */
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_no_failure),        cmocka_unit_test(test_some_failed),
        cmocka_unit_test(test_unusable),          cmocka_unit_test(test_bounds),
        cmocka_unit_test(test_retry_after_clamp),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
