/* esmd_json_valid / esmd_utf8_valid: what counts as a JSON payload for filtering. */
#include "esmd/common.h"
#include "esmd/json.h"

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <cmocka.h>

static bool valid(const char *s)
{
    return esmd_json_valid(s, strlen(s));
}

static void test_valid_documents(void **state)
{
    (void)state;
    const char *ok[] = {
        "{}",
        "[]",
        " {\"a\" : [1, -2.5e+3, 0, 0.1, 1E9, true, false, null, \"x\"]} ",
        "\"just a string\"",
        "42",
        "-0",
        "null",
        "[[[[]]]]",
        "{\"a\":{\"b\":{\"c\":[{}]}}}",
        "\"\\u00e9\\n\\t\\\"\\\\\\/\"",
        "\"h\xc3\xa9llo \xe2\x82\xac \xf0\x9f\x98\x80\"",
        "\t\r\n[1]\n",
    };
    for (size_t i = 0; i < sizeof(ok) / sizeof(ok[0]); i++)
        if (!valid(ok[i]))
            fail_msg("should be valid JSON: %s", ok[i]);
}

static void test_invalid_documents(void **state)
{
    (void)state;
    const char *bad[] = {
        "",
        "   ",
        "{",
        "}",
        "[1,]",
        "[,1]",
        "{\"a\":1,}",
        "{\"a\"}",
        "{\"a\" 1}",
        "{a:1}",
        "{1:1}",
        "[1 2]",
        "01",
        "1.",
        ".5",
        "1e",
        "+1",
        "-",
        "tru",
        "nul",
        "True",
        "\"unterminated",
        "\"bad escape \\x\"",
        "\"short \\u12\"",
        "\"control \x01 char\"",
        "\"overlong \xc0\xaf\"",
        "\"surrogate \xed\xa0\x80\"",
        "\"truncated \xe2\x82\"",
        "\"too big \xf4\x90\x80\x80\"",
        "{} {}",
        "[1]]",
        "plain text",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++)
        if (valid(bad[i]))
            fail_msg("should not be valid JSON: %s", bad[i]);
    /* a NUL byte inside the length */
    assert_false(esmd_json_valid("[1]\0", 4));
    assert_false(esmd_json_valid("\"a\0b\"", 5));
}

static void test_depth_limit(void **state)
{
    (void)state;
    size_t n = ESMD_JSON_MAX_DEPTH;
    char *s = malloc(2 * n + 2);
    memset(s, '[', n);
    memset(s + n, ']', n);
    assert_true(esmd_json_valid(s, 2 * n));
    memset(s, '[', n + 1);
    memset(s + n + 1, ']', n + 1);
    assert_false(esmd_json_valid(s, 2 * n + 2));
    free(s);
}

static void test_utf8(void **state)
{
    (void)state;
    assert_true(esmd_utf8_valid("", 0));
    assert_true(esmd_utf8_valid("plain", 5));
    assert_true(esmd_utf8_valid("\xc3\xa9\xe2\x82\xac\xf0\x9f\x98\x80", 9));
    assert_true(esmd_utf8_valid("a\0b", 3)); /* NUL is valid UTF-8 */
    assert_false(esmd_utf8_valid("\xff", 1));
    assert_false(esmd_utf8_valid("\xc3", 1));
    assert_false(esmd_utf8_valid("\xe0\x80\x80", 3)); /* overlong */
    assert_false(esmd_utf8_valid("\xed\xb0\x80", 3)); /* surrogate */
    assert_false(esmd_utf8_valid("\x80", 1));
}

static void test_utf8_decode(void **state)
{
    (void)state;
    uint32_t cp = 0;
    assert_int_equal(esmd_utf8_decode((const unsigned char *)"A", 1, &cp), 1);
    assert_int_equal(cp, 0x41);
    assert_int_equal(esmd_utf8_decode((const unsigned char *)"\xc3\xa9", 2, &cp), 2);
    assert_int_equal(cp, 0xE9);
    assert_int_equal(esmd_utf8_decode((const unsigned char *)"\xe2\x82\xac", 3, &cp), 3);
    assert_int_equal(cp, 0x20AC);
    assert_int_equal(esmd_utf8_decode((const unsigned char *)"\xf0\x9f\x98\x80", 4, &cp), 4);
    assert_int_equal(cp, 0x1F600);
    assert_int_equal(esmd_utf8_decode((const unsigned char *)"\xf0\x9f\x98", 3, &cp), 0);
    assert_int_equal(esmd_utf8_decode((const unsigned char *)"\xf4\x90\x80\x80", 4, NULL), 0);
}

static void test_hex_digit(void **state)
{
    (void)state;
    assert_int_equal(esmd_hex_digit('0'), 0);
    assert_int_equal(esmd_hex_digit('9'), 9);
    assert_int_equal(esmd_hex_digit('a'), 10);
    assert_int_equal(esmd_hex_digit('F'), 15);
    assert_int_equal(esmd_hex_digit('g'), -1);
    assert_int_equal(esmd_hex_digit('/'), -1);
    assert_int_equal(esmd_hex_digit(0), -1);
    assert_int_equal(esmd_hex_digit(0xC3), -1);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_valid_documents), cmocka_unit_test(test_invalid_documents),
        cmocka_unit_test(test_depth_limit),     cmocka_unit_test(test_utf8),
        cmocka_unit_test(test_utf8_decode),     cmocka_unit_test(test_hex_digit),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
