/* Lambda's API conventions that need no server (src/lambda_api.c): FunctionName parsing, the
 * raw-path segments, the strict body check, NUL detection, integer ranges; and the JSON walk
 * they rely on (esmd_json_next). The routes are tested end to end in
 * tests/integration/test_admin_api.py. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "esmd/json.h"
#include "esmd/lambda_api.h"

#include <string.h>

static int parse(const char *s, struct esmd_api_fn *fn)
{
    return esmd_api_function_parse(s, strlen(s), fn);
}

static void test_function_parse(void **state)
{
    struct esmd_api_fn fn;
    char long_name[80];

    (void)state;
    assert_int_equal(parse("fn", &fn), 0);
    assert_string_equal(fn.name, "fn");
    assert_string_equal(fn.qualifier, "");
    assert_true(fn.ours);
    assert_int_equal(parse("my-fn_2:$LATEST", &fn), 0);
    assert_string_equal(fn.name, "my-fn_2");
    assert_string_equal(fn.qualifier, "$LATEST");
    assert_int_equal(parse("arn:aws:lambda:us-east-1:000000000000:function:fn:v1", &fn), 0);
    assert_string_equal(fn.name, "fn");
    assert_string_equal(fn.qualifier, "v1");
    assert_true(fn.ours);
    assert_int_equal(parse("000000000000:function:fn", &fn), 0);
    assert_true(fn.ours);
    assert_int_equal(parse("arn:aws:lambda:eu-west-3:000000000000:function:fn", &fn), 0);
    assert_false(fn.ours);
    assert_int_equal(parse("123456789012:function:fn", &fn), 0);
    assert_false(fn.ours);

    assert_int_equal(parse("", &fn), ESMD_EINVAL);
    assert_int_equal(parse("arn:aws:sqs:us-east-1:000000000000:q", &fn), ESMD_EINVAL);
    assert_int_equal(parse("a.b", &fn), ESMD_EINVAL);
    assert_int_equal(parse("fn:", &fn), ESMD_EINVAL);
    assert_int_equal(parse("fn:v1:v2", &fn), ESMD_EINVAL);
    assert_int_equal(parse("arn:aws:lambda:us-east-1:000000000000:function:", &fn), ESMD_EINVAL);
    memset(long_name, 'x', 65);
    long_name[65] = '\0';
    assert_int_equal(parse(long_name, &fn), ESMD_EINVAL);
    long_name[64] = '\0';
    assert_int_equal(parse(long_name, &fn), 0);
    /* a NUL inside the bytes given is never part of a name */
    assert_int_equal(esmd_api_function_parse("fn\0x", 4, &fn), ESMD_EINVAL);
}

static void test_path_parse(void **state)
{
    struct esmd_api_path p;

    (void)state;
    assert_int_equal(esmd_api_path_parse("/admin/mappings/m1/pause", &p), 0);
    assert_int_equal(p.n, 4);
    assert_string_equal(p.seg[2], "m1");
    assert_string_equal(p.seg[3], "pause");
    esmd_api_path_free(&p);

    /* one trailing '/' dropped; encoded characters decoded; bad escapes kept as sent */
    assert_int_equal(esmd_api_path_parse("/2015-03-31/functions/arn%3Aaws%3ax%25%zz%4/", &p), 0);
    assert_int_equal(p.n, 3);
    assert_string_equal(p.seg[2], "arn:aws:x%%zz%4");
    esmd_api_path_free(&p);
    assert_int_equal(esmd_api_path_parse("/a//b", &p), 0);
    assert_int_equal(p.n, 3);
    assert_string_equal(p.seg[1], "");
    esmd_api_path_free(&p);
    assert_int_equal(esmd_api_path_parse("/", &p), 0);
    assert_int_equal(p.n, 0);
    esmd_api_path_free(&p);

    /* an encoded NUL or '/' is never a separator or an end */
    assert_int_equal(esmd_api_path_parse("/admin/mappings/m1/pause%00x", &p), ESMD_EINVAL);
    assert_int_equal(p.n, 0);
    assert_int_equal(esmd_api_path_parse("/admin/mappings/m1%2Fpause", &p), ESMD_EINVAL);
    assert_int_equal(esmd_api_path_parse("/admin/mappings/m1%2fpause", &p), ESMD_EINVAL);
    assert_int_equal(esmd_api_path_parse("/admin%2Fmappings", &p), ESMD_EINVAL);
    assert_int_equal(esmd_api_path_parse("/a/b/c/d/e/f/g/h", &p), 0);
    esmd_api_path_free(&p);
    assert_int_equal(esmd_api_path_parse("/a/b/c/d/e/f/g/h/i", &p), ESMD_ETOOBIG);
}

static void test_json_check(void **state)
{
    static const char nul_then_garbage[] = "{\"a\":0}\0garbage";

    (void)state;
    assert_null(esmd_api_json_check("{\"a\":[1,\"x\"]}", 13));
    assert_null(esmd_api_json_check(" {} \n", 5));
    assert_non_null(esmd_api_json_check(nul_then_garbage, sizeof(nul_then_garbage) - 1));
    assert_non_null(esmd_api_json_check("{} x", 4));
    assert_non_null(esmd_api_json_check("{}{}", 4));
    assert_non_null(esmd_api_json_check("}}]]", 4));
    assert_non_null(esmd_api_json_check("{\"a\":\"\x01\"}", 9));
    assert_non_null(esmd_api_json_check("{\"a\":\"\xff\"}", 9));
    assert_non_null(esmd_api_json_check("{\"a\":\"\xc0\xaf\"}", 10));
    assert_non_null(esmd_api_json_check("", 0));
}

static bool find_nul(const char *s, const char *prefix, const char *want)
{
    struct esmd_buf where = ESMD_BUF_INIT;
    bool found = esmd_api_json_find_nul(s, strlen(s), prefix, &where);

    if (found)
        assert_string_equal(esmd_buf_cstr(&where), want);
    esmd_buf_free(&where);
    return found;
}

static void test_find_nul(void **state)
{
    (void)state;
    assert_true(find_nul("{\"DestinationConfig\":{\"OnFailure\":{\"Destination\":\"q\\u0000x\"}}}",
                         "", "DestinationConfig.OnFailure.Destination"));
    assert_true(find_nul(" {\"FilterCriteria\":{\"Filters\":[{\"Pattern\":\"{}\"},"
                         "{\"Pattern\":\"{}\\u0000junk\"}]}}",
                         "", "FilterCriteria.Filters[1].Pattern"));
    assert_true(find_nul("{\"a\\u0000\":1}", "", "a\\u0000"));
    assert_true(find_nul("[\"\\u0000\"]", "patterns", "patterns[0]"));
    assert_true(find_nul("\"\\u0000\"", "pattern", "pattern"));
    /* an escaped backslash followed by u0000 is no NUL; other escapes are not NULs */
    assert_false(find_nul("{\"a\":\"\\\\u0000\",\"b\":\"\\u0001\\u0010\"}", "", ""));
    assert_true(find_nul("{\"a\":\"\\\\\\u0000\"}", "", "a"));
    assert_false(find_nul("{\"a\":[1,2,{\"b\":null}],\"c\":\"u0000\"}", "", ""));
}

static void test_json_next(void **state)
{
    static const char doc[] = " { \"n\" : 1.50 , \"a\":[ 1e2 ,\"x\\\"y\", {\"k\":[]} ] } ";
    struct esmd_json_span key, val, item;
    size_t pos = 0, q = 0;

    (void)state;
    assert_true(esmd_json_next(doc, sizeof(doc) - 1, &pos, &key, &val));
    assert_true(esmd_json_key_is(&key, "n"));
    assert_int_equal(val.n, 4);
    assert_memory_equal(val.p, "1.50", 4); /* numbers keep their text */
    assert_true(esmd_json_next(doc, sizeof(doc) - 1, &pos, &key, &val));
    assert_true(esmd_json_key_is(&key, "a"));
    assert_false(esmd_json_key_is(&key, "ab"));
    assert_true(esmd_json_next(val.p, val.n, &q, NULL, &item));
    assert_memory_equal(item.p, "1e2", item.n);
    assert_true(esmd_json_next(val.p, val.n, &q, NULL, &item));
    assert_int_equal(item.n, 6);
    assert_true(esmd_json_next(val.p, val.n, &q, NULL, &item));
    assert_memory_equal(item.p, "{\"k\":[]}", item.n);
    assert_false(esmd_json_next(val.p, val.n, &q, NULL, &item));
    assert_false(esmd_json_next(doc, sizeof(doc) - 1, &pos, &key, &val));
    pos = 0;
    assert_false(esmd_json_next("{}", 2, &pos, &key, &val));
    pos = 0;
    assert_false(esmd_json_next("{\"a\":tru}", 9, &pos, &key, &val));
}

static void test_ranges(void **state)
{
    static const struct esmd_api_range r = {"MaxItems", "maxItems", 1, 50};
    int64_t v = -1;
    cJSON *n;

    (void)state;
    assert_true(esmd_api_query_int("50", &r, &v));
    assert_int_equal(v, 50);
    assert_false(esmd_api_query_int("51", &r, &v));
    assert_false(esmd_api_query_int("0", &r, &v));
    assert_false(esmd_api_query_int("+5", &r, &v));
    assert_false(esmd_api_query_int("5 ", &r, &v));
    assert_false(esmd_api_query_int("99999999999", &r, &v));
    assert_false(esmd_api_query_int("", &r, &v));
    n = cJSON_CreateNumber(2.5);
    assert_false(esmd_api_json_int(n, &r, &v));
    cJSON_SetNumberValue(n, 7);
    assert_true(esmd_api_json_int(n, &r, &v));
    assert_int_equal(v, 7);
    cJSON_Delete(n);
    n = cJSON_CreateString("7");
    assert_false(esmd_api_json_int(n, &r, &v));
    cJSON_Delete(n);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_function_parse), cmocka_unit_test(test_path_parse),
        cmocka_unit_test(test_json_check),     cmocka_unit_test(test_find_nul),
        cmocka_unit_test(test_json_next),      cmocka_unit_test(test_ranges),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
