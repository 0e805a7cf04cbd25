/* The buffer, JSON string and base64 writers, backoff, and uuids. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "esmd/backoff.h"
#include "esmd/buf.h"
#include "esmd/common.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static void check_json(const char *in, size_t n, const char *want)
{
    struct esmd_buf b = ESMD_BUF_INIT;
    esmd_buf_put_json_string(&b, in, n);
    assert_int_equal(b.len, strlen(want));
    assert_memory_equal(b.data, want, b.len);
    assert_int_equal(esmd_json_string_len(in, n), b.len);
    esmd_buf_free(&b);
}

static void test_json_string(void **state)
{
    check_json("abc", 3, "\"abc\"");
    check_json("", 0, "\"\"");
    check_json("a\"b\\c", 5, "\"a\\\"b\\\\c\"");
    check_json("\n\t\r\b\f", 5, "\"\\n\\t\\r\\b\\f\"");
    check_json("\x01\x1f", 2, "\"\\u0001\\u001f\"");
    check_json("\xc3\xab", 2, "\"\xc3\xab\"");                 /* ë stays UTF-8 */
    check_json("\xf0\x9f\x98\x80", 4, "\"\xf0\x9f\x98\x80\""); /* 4-byte sequence */
    check_json("a\xff"
               "b",
               3,
               "\"a\xef\xbf\xbd"
               "b\"");                         /* invalid byte → U+FFFD */
    check_json("\xc3", 1, "\"\xef\xbf\xbd\""); /* truncated sequence */
    check_json("\xed\xa0\x80", 3, "\"\xef\xbf\xbd\xef\xbf\xbd\xef\xbf\xbd\""); /* surrogate */
    check_json("\xc0\x80", 2, "\"\xef\xbf\xbd\xef\xbf\xbd\"");                 /* overlong */
    check_json("nul\0x", 5, "\"nul\\u0000x\"");
}

static void test_text(void **state)
{
    (void)state;
    struct esmd_buf b = ESMD_BUF_INIT;
    esmd_buf_put_text(&b, "ok \xc3\xa9", 5);
    assert_memory_equal(b.data, "ok \xc3\xa9", 5);
    assert_int_equal(b.len, 5);
    b.len = 0;
    /* a stray byte, a NUL, a truncated sequence at the end */
    esmd_buf_put_text(&b,
                      "a\xff"
                      "b\0c\xe2\x82",
                      7);
    assert_int_equal(b.len, 15);
    assert_memory_equal(b.data,
                        "a\xef\xbf\xbd"
                        "b\xef\xbf\xbd"
                        "c\xef\xbf\xbd\xef\xbf\xbd",
                        13);
    esmd_buf_free(&b);
}

static void test_base64(void **state)
{
    const char *cases[][2] = {{"", ""},
                              {"f", "Zg=="},
                              {"fo", "Zm8="},
                              {"foo", "Zm9v"},
                              {"foob", "Zm9vYg=="},
                              {"fooba", "Zm9vYmE="},
                              {"foobar", "Zm9vYmFy"}};
    for (size_t i = 0; i < ESMD_ARRAY_LEN(cases); i++) {
        struct esmd_buf b = ESMD_BUF_INIT, d = ESMD_BUF_INIT;
        esmd_buf_put_base64(&b, cases[i][0], strlen(cases[i][0]));
        assert_int_equal(b.len, esmd_base64_len(strlen(cases[i][0])));
        assert_string_equal(esmd_buf_cstr(&b), cases[i][1]);
        assert_int_equal(esmd_base64_decode(b.data, b.len, &d), ESMD_OK);
        assert_int_equal(d.len, strlen(cases[i][0]));
        assert_memory_equal(esmd_buf_cstr(&d), cases[i][0], d.len);
        esmd_buf_free(&b);
        esmd_buf_free(&d);
    }
    unsigned char bin[256];
    for (int i = 0; i < 256; i++)
        bin[i] = (unsigned char)i;
    struct esmd_buf b = ESMD_BUF_INIT, d = ESMD_BUF_INIT;
    esmd_buf_put_base64(&b, bin, sizeof(bin));
    assert_int_equal(esmd_base64_decode(b.data, b.len, &d), ESMD_OK);
    assert_memory_equal(d.data, bin, sizeof(bin));
    esmd_buf_free(&d);
    assert_int_equal(esmd_base64_decode("Zm9v!", 5, &d), ESMD_EINVAL);
    esmd_buf_free(&b);
    esmd_buf_free(&d);
}

static void test_i64(void **state)
{
    int64_t vals[] = {0, 7, -7, 10, 99, 100, -100, INT64_MAX, INT64_MIN};
    for (size_t i = 0; i < ESMD_ARRAY_LEN(vals); i++) {
        char want[32];
        snprintf(want, sizeof(want), "%lld", (long long)vals[i]);
        struct esmd_buf b = ESMD_BUF_INIT;
        esmd_buf_put_i64(&b, vals[i]);
        assert_string_equal(esmd_buf_cstr(&b), want);
        assert_int_equal(esmd_i64_len(vals[i]), strlen(want));
        esmd_buf_free(&b);
    }
}

static void test_backoff(void **state)
{
    struct esmd_backoff b = {250, 30000};
    assert_int_equal(esmd_backoff_ceiling(&b, 0), 250);
    assert_int_equal(esmd_backoff_ceiling(&b, 1), 500);
    assert_int_equal(esmd_backoff_ceiling(&b, 6), 16000);
    assert_int_equal(esmd_backoff_ceiling(&b, 7), 30000);
    assert_int_equal(esmd_backoff_ceiling(&b, 1000000), 30000); /* no overflow */
    /* delay within [ceiling/2, ceiling], both ends reachable */
    assert_int_equal(esmd_backoff_delay(&b, 0, 0), 125);
    assert_int_equal(esmd_backoff_delay(&b, 0, 125), 250);
    assert_int_equal(esmd_backoff_delay(&b, 7, 0), 15000);
    for (uint64_t r = 0; r < 5000; r += 7) {
        int64_t d = esmd_backoff_delay(&b, 3, r * 2654435761u);
        assert_true(d >= 1000 && d <= 2000);
    }
}

static int cmp_uuid(const void *a, const void *b)
{
    return strcmp(a, b);
}

/* Version 4, RFC 4122 variant, lower-case 8-4-4-4-12 hex, and no repeats across the refills of
 * the random pool (256 uuids per refill). */
static void test_uuid4(void **state)
{
    (void)state;
    enum { N = 2000 };
    char(*u)[37] = calloc(N, sizeof(*u));
    assert_non_null(u);
    for (int i = 0; i < N; i++) {
        esmd_uuid4(u[i]);
        assert_int_equal(strlen(u[i]), 36);
        for (int k = 0; k < 36; k++) {
            if (k == 8 || k == 13 || k == 18 || k == 23)
                assert_int_equal(u[i][k], '-');
            else
                assert_non_null(strchr("0123456789abcdef", u[i][k]));
        }
        assert_int_equal(u[i][14], '4');
        assert_non_null(strchr("89ab", u[i][19]));
    }
    qsort(u, N, sizeof(*u), cmp_uuid);
    for (int i = 1; i < N; i++)
        assert_true(strcmp(u[i - 1], u[i]) != 0);
    free(u);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_json_string), cmocka_unit_test(test_text),
        cmocka_unit_test(test_base64),      cmocka_unit_test(test_i64),
        cmocka_unit_test(test_backoff),     cmocka_unit_test(test_uuid4),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
