/* The filter engine: every operator, invalid patterns with their exact messages and positions,
 * array consistency, $or, escapes, numbers, CIDR, wildcards, skip lists, ids, and matching
 * without allocation. The shared conformance corpus is run by test_filter_corpus.c. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "esmd/filter.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Compiles one pattern (which must be valid) into a new matcher. */
static struct esmd_filter *one(const char *pattern)
{
    struct esmd_filter *f = esmd_filter_new();
    struct esmd_filter_error err;
    memset(&err, 0, sizeof(err));
    int rc = esmd_filter_add(f, pattern, strlen(pattern), 1, &err);
    if (rc != 0)
        fail_msg("pattern %s refused at %d:%d: %s", pattern, err.line, err.column, err.message);
    return f;
}

static bool ev(struct esmd_filter *f, const char *event)
{
    bool m = esmd_filter_match(f, event, strlen(event));
    int n = esmd_filter_match_all(f, event, strlen(event), NULL, 0);
    assert_int_equal(m, n > 0); /* the two entry points always agree */
    return m;
}

/* Does `pattern` match `event`? */
static bool pm(const char *pattern, const char *event)
{
    struct esmd_filter *f = one(pattern);
    bool m = ev(f, event);
    esmd_filter_free(f);
    return m;
}

#define YES(p, e) assert_true(pm(p, e))
#define NO(p, e) assert_false(pm(p, e))

static void test_exact(void **state)
{
    YES("{\"a\": [\"x\"]}", "{\"a\": \"x\"}");
    NO("{\"a\": [\"x\"]}", "{\"a\": \"X\"}");
    NO("{\"a\": [\"x\"]}", "{\"a\": \"xx\"}");
    NO("{\"a\": [\"x\"]}", "{\"b\": \"x\"}");
    YES("{\"a\": [\"\"]}", "{\"a\": \"\"}"); /* empty string */
    NO("{\"a\": [\"\"]}", "{\"a\": null}");
    YES("{\"a\": [null]}", "{\"a\": null}");
    NO("{\"a\": [null]}", "{\"a\": \"null\"}");
    NO("{\"a\": [null]}", "{}"); /* null is a value: absent is not null */
    YES("{\"a\": [true]}", "{\"a\": true}");
    NO("{\"a\": [true]}", "{\"a\": \"true\"}");
    YES("{\"a\": [false]}", "{\"a\": false}");
    NO("{\"a\": [false]}", "{\"a\": true}");
    YES("{\"a\": [5]}", "{\"a\": 5}");
    NO("{\"a\": [5]}", "{\"a\": \"5\"}");
    NO("{\"a\": [\"5\"]}", "{\"a\": 5}");
    /* OR across values, AND across fields, nesting. */
    YES("{\"a\": [\"x\", \"y\"]}", "{\"a\": \"y\"}");
    YES("{\"a\": [\"x\"], \"b\": [1]}", "{\"b\": 1, \"c\": 0, \"a\": \"x\"}");
    NO("{\"a\": [\"x\"], \"b\": [1]}", "{\"a\": \"x\"}");
    YES("{\"a\": {\"b\": {\"c\": [\"x\"]}}}", "{\"a\": {\"z\": [1, {}], \"b\": {\"c\": \"x\"}}}");
    NO("{\"a\": {\"b\": [\"x\"]}}", "{\"a\": \"x\"}");
    NO("{\"a\": [\"x\"]}", "{\"a\": {\"b\": \"x\"}}");
    /* Arrays on the event side: any element. */
    YES("{\"a\": [\"x\"]}", "{\"a\": [\"y\", \"x\"]}");
    YES("{\"a\": [\"x\"]}", "{\"a\": [[\"y\", [\"x\"]]]}");
    NO("{\"a\": [\"x\"]}", "{\"a\": []}");
    YES("{\"a\": {\"b\": [2]}}", "{\"a\": [{\"b\": 1}, {\"b\": 2}]}");
    /* Unicode compares byte for byte. */
    YES("{\"a\": [\"\xc3\xa9t\xc3\xa9\"]}", "{\"a\": \"\xc3\xa9t\xc3\xa9\"}");
    NO("{\"a\": [\"\xc3\xa9t\xc3\xa9\"]}", "{\"a\": \"\xc3\x89T\xc3\x89\"}");
}

static void test_numbers(void **state)
{
    /* Exact numbers compare by value (event-ruler and quamina; see docs/filters.md). */
    YES("{\"a\": [300]}", "{\"a\": 3.0e2}");
    YES("{\"a\": [3.0e2]}", "{\"a\": 300}");
    YES("{\"a\": [300]}", "{\"a\": 300.000}");
    YES("{\"a\": [0]}", "{\"a\": -0}");
    YES("{\"a\": [-0.0]}", "{\"a\": 0}");
    YES("{\"a\": [0.1]}", "{\"a\": 1e-1}");
    NO("{\"a\": [1.0000001]}", "{\"a\": 1.0000002}");
    YES("{\"a\": [12345678901234567890]}", "{\"a\": 1.2345678901234567890e19}");
    YES("{\"a\": [1e300]}", "{\"a\": 1000e297}");
    YES("{\"a\": [-5.5]}", "{\"a\": -55E-1}");
    /* numeric */
    YES("{\"a\": [{\"numeric\": [\"=\", 100]}]}", "{\"a\": 1e2}");
    NO("{\"a\": [{\"numeric\": [\"=\", 100]}]}", "{\"a\": 100.5}");
    YES("{\"a\": [{\"numeric\": [\"<\", 0]}]}", "{\"a\": -1}");
    NO("{\"a\": [{\"numeric\": [\"<\", 0]}]}", "{\"a\": 0}");
    YES("{\"a\": [{\"numeric\": [\"<=\", 0]}]}", "{\"a\": -0}");
    YES("{\"a\": [{\"numeric\": [\">\", 10]}]}", "{\"a\": 10.000001}");
    NO("{\"a\": [{\"numeric\": [\">\", 10]}]}", "{\"a\": 10}");
    YES("{\"a\": [{\"numeric\": [\">=\", 10]}]}", "{\"a\": 10}");
    const char *range = "{\"a\": [{\"numeric\": [\">\", 0, \"<=\", 5]}]}";
    NO(range, "{\"a\": 0}");
    YES(range, "{\"a\": 0.0001}");
    YES(range, "{\"a\": 5}");
    NO(range, "{\"a\": 5.0000001}");
    NO(range, "{\"a\": \"3\"}"); /* numeric only matches JSON numbers */
    NO(range, "{\"a\": true}");
    YES(range, "{\"a\": [9, 3]}");
    YES("{\"a\": [{\"numeric\": [\">=\", -1e308, \"<\", 1e308]}]}", "{\"a\": 6e9}");
    YES("{\"a\": [{\"numeric\": [\">\", 5000000000]}]}", "{\"a\": 6000000000}");
    YES("{\"a\": [{\"numeric\": [\"<\", -1e-300]}]}", "{\"a\": -2e-300}");
    /* Long number texts go through the slow path. */
    YES("{\"a\": [{\"numeric\": [\"=\", 0.5]}]}",
        "{\"a\": 0.50000000000000000000000000000000000000000000000000000000000000000000000000}");
    /* Several numeric conditions OR'd. */
    YES("{\"a\": [{\"numeric\": [\"<\", 0]}, {\"numeric\": [\">\", 10]}]}", "{\"a\": 11}");
    NO("{\"a\": [{\"numeric\": [\"<\", 0]}, {\"numeric\": [\">\", 10]}]}", "{\"a\": 5}");
}

static void test_prefix_suffix(void **state)
{
    YES("{\"a\": [{\"prefix\": \"ab\"}]}", "{\"a\": \"abc\"}");
    YES("{\"a\": [{\"prefix\": \"ab\"}]}", "{\"a\": \"ab\"}");
    NO("{\"a\": [{\"prefix\": \"ab\"}]}", "{\"a\": \"a\"}");
    NO("{\"a\": [{\"prefix\": \"ab\"}]}", "{\"a\": \"Abc\"}");
    NO("{\"a\": [{\"prefix\": \"1\"}]}", "{\"a\": 123}");
    YES("{\"a\": [{\"prefix\": \"\"}]}", "{\"a\": \"\"}");
    YES("{\"a\": [{\"suffix\": \".png\"}]}", "{\"a\": \"x.png\"}");
    NO("{\"a\": [{\"suffix\": \".png\"}]}", "{\"a\": \"x.PNG\"}");
    NO("{\"a\": [{\"suffix\": \"23\"}]}", "{\"a\": 123}");
    YES("{\"a\": [{\"prefix\": {\"equals-ignore-case\": \"AB\"}}]}", "{\"a\": \"aBc\"}");
    NO("{\"a\": [{\"prefix\": {\"equals-ignore-case\": \"AB\"}}]}", "{\"a\": \"xab\"}");
    YES("{\"a\": [{\"suffix\": {\"equals-ignore-case\": \".PnG\"}}]}", "{\"a\": \"X.png\"}");
    NO("{\"a\": [{\"suffix\": {\"equals-ignore-case\": \".PnG\"}}]}", "{\"a\": \"png\"}");
    /* Many prefixes of many lengths on one field. */
    struct esmd_filter *f = esmd_filter_new();
    for (uint32_t i = 0; i < 300; i++) {
        char p[128];
        snprintf(p, sizeof(p), "{\"e\": [{\"prefix\": \"user%u@\"}]}", i);
        assert_int_equal(esmd_filter_add(f, p, strlen(p), i, NULL), 0);
    }
    uint32_t ids[4];
    const char *e = "{\"e\": \"user42@example.com\"}";
    assert_int_equal(esmd_filter_match_all(f, e, strlen(e), ids, 4), 1);
    assert_int_equal(ids[0], 42);
    assert_false(ev(f, "{\"e\": \"user42example.com\"}"));
    esmd_filter_free(f);
}

static void test_equals_ignore_case(void **state)
{
    YES("{\"a\": [{\"equals-ignore-case\": \"AbC\"}]}", "{\"a\": \"aBc\"}");
    NO("{\"a\": [{\"equals-ignore-case\": \"AbC\"}]}", "{\"a\": \"aBcd\"}");
    NO("{\"a\": [{\"equals-ignore-case\": \"5\"}]}", "{\"a\": 5}");
    /* Unicode simple case folding: É/é, final sigma, Kelvin sign (3 bytes) vs k (1 byte). */
    YES("{\"a\": [{\"equals-ignore-case\": \"\xc3\x89\x63ole\"}]}", "{\"a\": \"\xc3\xa9\x43OLE\"}");
    YES("{\"a\": [{\"equals-ignore-case\": \"\xce\xa3\xce\x91\xce\xa3\"}]}",
        "{\"a\": \"\xcf\x83\xce\xb1\xcf\x82\"}");
    YES("{\"a\": [{\"equals-ignore-case\": \"\xe2\x84\xaa\"}]}", "{\"a\": \"k\"}");
    /* Simple folding does not expand: "ß" is not "ss". */
    NO("{\"a\": [{\"equals-ignore-case\": \"\xc3\x9f\"}]}", "{\"a\": \"ss\"}");
    /* \u escapes are decoded before folding. */
    YES("{\"a\": [{\"equals-ignore-case\": \"\\u00c9\"}]}", "{\"a\": \"\\u00e9\"}");
}

static void test_anything_but(void **state)
{
    YES("{\"a\": [{\"anything-but\": \"x\"}]}", "{\"a\": \"y\"}");
    NO("{\"a\": [{\"anything-but\": \"x\"}]}", "{\"a\": \"x\"}");
    NO("{\"a\": [{\"anything-but\": \"x\"}]}", "{}"); /* needs the field */
    YES("{\"a\": [{\"anything-but\": \"x\"}]}", "{\"a\": 5}");
    YES("{\"a\": [{\"anything-but\": [\"x\", \"y\"]}]}", "{\"a\": \"z\"}");
    NO("{\"a\": [{\"anything-but\": [\"x\", \"y\"]}]}", "{\"a\": \"y\"}");
    YES("{\"a\": [{\"anything-but\": [\"x\"]}]}", "{\"a\": [\"x\", \"z\"]}");
    NO("{\"a\": [{\"anything-but\": [\"x\"]}]}", "{\"a\": [\"x\", \"x\"]}");
    NO("{\"a\": [{\"anything-but\": 5}]}", "{\"a\": 5.0}");
    YES("{\"a\": [{\"anything-but\": 5}]}", "{\"a\": \"5\"}");
    NO("{\"a\": [{\"anything-but\": [1, 2]}]}", "{\"a\": 2e0}");
    YES("{\"a\": [{\"anything-but\": [1, 2]}]}", "{\"a\": 3}");
    YES("{\"a\": [{\"anything-but\": {\"prefix\": \"x\"}}]}", "{\"a\": \"yx\"}");
    NO("{\"a\": [{\"anything-but\": {\"prefix\": \"x\"}}]}", "{\"a\": \"xy\"}");
    YES("{\"a\": [{\"anything-but\": {\"prefix\": \"1\"}}]}", "{\"a\": 123}");
    NO("{\"a\": [{\"anything-but\": {\"prefix\": [\"x\", \"y\"]}}]}", "{\"a\": \"yz\"}");
    NO("{\"a\": [{\"anything-but\": {\"suffix\": \"z\"}}]}", "{\"a\": \"xyz\"}");
    YES("{\"a\": [{\"anything-but\": {\"suffix\": \"z\"}}]}", "{\"a\": \"zy\"}");
    NO("{\"a\": [{\"anything-but\": {\"equals-ignore-case\": \"AbC\"}}]}", "{\"a\": \"abc\"}");
    YES("{\"a\": [{\"anything-but\": {\"equals-ignore-case\": [\"AbC\"]}}]}", "{\"a\": \"abcd\"}");
    NO("{\"a\": [{\"anything-but\": {\"wildcard\": \"*.jar\"}}]}", "{\"a\": \"x.jar\"}");
    YES("{\"a\": [{\"anything-but\": {\"wildcard\": [\"*.jar\", \"*.war\"]}}]}",
        "{\"a\": \"x.ear\"}");
    /* With another value in the same list: either one. */
    YES("{\"a\": [{\"anything-but\": \"x\"}, \"x\"]}", "{\"a\": \"x\"}");
}

static void test_exists(void **state)
{
    YES("{\"a\": [{\"exists\": true}]}", "{\"a\": 1}");
    YES("{\"a\": [{\"exists\": true}]}", "{\"a\": null}");
    YES("{\"a\": [{\"exists\": true}]}", "{\"a\": [0]}");
    NO("{\"a\": [{\"exists\": true}]}", "{\"a\": []}");
    NO("{\"a\": [{\"exists\": true}]}", "{\"a\": {\"b\": 1}}"); /* leaves only */
    NO("{\"a\": [{\"exists\": true}]}", "{}");
    YES("{\"a\": [{\"exists\": false}]}", "{}");
    YES("{\"a\": [{\"exists\": false}]}", "{\"a\": []}");
    YES("{\"a\": [{\"exists\": false}]}", "{\"a\": {\"b\": 1}}");
    NO("{\"a\": [{\"exists\": false}]}", "{\"a\": null}");
    NO("{\"a\": [{\"exists\": false}]}", "{\"a\": [[1]]}");
    YES("{\"a\": {\"b\": [{\"exists\": false}]}}", "{\"a\": 1}");
    YES("{\"a\": [{\"exists\": false}], \"b\": [1]}", "{\"b\": 1}");
    NO("{\"a\": [{\"exists\": false}], \"b\": [1]}", "{\"b\": 1, \"a\": 0}");
    /* exists:false OR a value. */
    YES("{\"a\": [{\"exists\": false}, \"x\"]}", "{}");
    YES("{\"a\": [{\"exists\": false}, \"x\"]}", "{\"a\": \"x\"}");
    NO("{\"a\": [{\"exists\": false}, \"x\"]}", "{\"a\": \"y\"}");
    /* A pattern of only exists:false matches events without the field. */
    struct esmd_filter *f = one("{\"x\": {\"y\": [{\"exists\": false}]}}");
    assert_true(ev(f, "{\"a\": 1}"));
    assert_true(ev(f, "{\"x\": {\"z\": 1}}"));
    assert_false(ev(f, "{\"x\": {\"y\": \"\"}}"));
    assert_false(ev(f, "{\"x\": [{\"z\": 1}, {\"y\": 2}]}"));
    esmd_filter_free(f);
}

static void test_wildcard(void **state)
{
    YES("{\"a\": [{\"wildcard\": \"*\"}]}", "{\"a\": \"\"}");
    YES("{\"a\": [{\"wildcard\": \"a*c\"}]}", "{\"a\": \"ac\"}");
    YES("{\"a\": [{\"wildcard\": \"a*c\"}]}", "{\"a\": \"abbbc\"}");
    NO("{\"a\": [{\"wildcard\": \"a*c\"}]}", "{\"a\": \"abcd\"}");
    YES("{\"a\": [{\"wildcard\": \"*a*b*\"}]}", "{\"a\": \"xxaxxbxx\"}");
    NO("{\"a\": [{\"wildcard\": \"*a*b*\"}]}", "{\"a\": \"xxbxxaxx\"}");
    YES("{\"a\": [{\"wildcard\": \"ab*ab\"}]}", "{\"a\": \"abab\"}");
    NO("{\"a\": [{\"wildcard\": \"ab*ab\"}]}", "{\"a\": \"aba\"}");
    YES("{\"a\": [{\"wildcard\": \"abc\"}]}", "{\"a\": \"abc\"}"); /* no star: exact */
    NO("{\"a\": [{\"wildcard\": \"abc\"}]}", "{\"a\": \"abcd\"}");
    NO("{\"a\": [{\"wildcard\": \"*\"}]}", "{\"a\": 5}"); /* strings only */
    /* Escapes: \* is a literal star, \\ a literal backslash (JSON-escaped once more here). */
    YES("{\"a\": [{\"wildcard\": \"a\\\\*b\"}]}", "{\"a\": \"a*b\"}");
    NO("{\"a\": [{\"wildcard\": \"a\\\\*b\"}]}", "{\"a\": \"axb\"}");
    YES("{\"a\": [{\"wildcard\": \"a\\\\\\\\b\"}]}", "{\"a\": \"a\\\\b\"}");
    YES("{\"a\": [{\"wildcard\": \"a\\\\\\\\*\"}]}", "{\"a\": \"a\\\\zzz\"}");
    YES("{\"a\": [{\"wildcard\": \"\\\\**\"}]}", "{\"a\": \"*x\"}");
    NO("{\"a\": [{\"wildcard\": \"\\\\**\"}]}", "{\"a\": \"x*\"}");
}

static void test_cidr(void **state)
{
    YES("{\"ip\": [{\"cidr\": \"10.0.0.0/8\"}]}", "{\"ip\": \"10.255.1.2\"}");
    NO("{\"ip\": [{\"cidr\": \"10.0.0.0/8\"}]}", "{\"ip\": \"11.0.0.1\"}");
    YES("{\"ip\": [{\"cidr\": \"10.1.128.0/17\"}]}", "{\"ip\": \"10.1.200.3\"}");
    NO("{\"ip\": [{\"cidr\": \"10.1.128.0/17\"}]}", "{\"ip\": \"10.1.127.3\"}");
    YES("{\"ip\": [{\"cidr\": \"0.0.0.0/0\"}]}", "{\"ip\": \"1.2.3.4\"}");
    YES("{\"ip\": [{\"cidr\": \"1.2.3.4/32\"}]}", "{\"ip\": \"1.2.3.4\"}");
    NO("{\"ip\": [{\"cidr\": \"1.2.3.4/32\"}]}", "{\"ip\": \"1.2.3.5\"}");
    YES("{\"ip\": [{\"cidr\": \"10.0.0.77/24\"}]}", "{\"ip\": \"10.0.0.1\"}"); /* host bits */
    NO("{\"ip\": [{\"cidr\": \"10.0.0.0/8\"}]}", "{\"ip\": \"10.0.0\"}");
    NO("{\"ip\": [{\"cidr\": \"10.0.0.0/8\"}]}", "{\"ip\": \"10.0.0.256\"}");
    NO("{\"ip\": [{\"cidr\": \"10.0.0.0/8\"}]}", "{\"ip\": \"010.0.0.1\"}");
    NO("{\"ip\": [{\"cidr\": \"10.0.0.0/8\"}]}", "{\"ip\": 10}");
    YES("{\"ip\": [{\"cidr\": \"2001:db8::/32\"}]}", "{\"ip\": \"2001:DB8:ffff::1\"}");
    NO("{\"ip\": [{\"cidr\": \"2001:db8::/32\"}]}", "{\"ip\": \"2001:db9::1\"}");
    YES("{\"ip\": [{\"cidr\": \"::/0\"}]}", "{\"ip\": \"::1\"}");
    NO("{\"ip\": [{\"cidr\": \"::/0\"}]}", "{\"ip\": \"1.2.3.4\"}"); /* families differ */
    YES("{\"ip\": [{\"cidr\": \"::ffff:0:0/96\"}]}", "{\"ip\": \"::ffff:10.1.2.3\"}");
    YES("{\"ip\": [{\"cidr\": \"fe80::1/128\"}]}", "{\"ip\": \"fe80:0:0:0:0:0:0:1\"}");
    NO("{\"ip\": [{\"cidr\": \"fe80::1/128\"}]}", "{\"ip\": \"fe80::1::2\"}");
    YES("{\"ip\": [{\"cidr\": \"2001:db8:1:2:3:4:5:0/127\"}]}",
        "{\"ip\": \"2001:db8:1:2:3:4:5:1\"}");
    /* Exact strings that are IP addresses compare by address (event-ruler). */
    YES("{\"ip\": [\"2001:db8::1\"]}", "{\"ip\": \"2001:0db8:0:0:0:0:0:1\"}");
    YES("{\"ip\": [\"2001:0db8::0:1\"]}", "{\"ip\": \"2001:db8::1\"}");
    NO("{\"ip\": [\"2001:db8::1\"]}", "{\"ip\": \"2001:db8::2\"}");
    NO("{\"ip\": [\"08:23\"]}", "{\"ip\": \"8:23\"}"); /* not an address */
    /* A NUL inside the text is not the end of the address (inet_pton reads C strings). */
    NO("{\"ip\": [{\"cidr\": \"10.0.0.0/8\"}]}", "{\"ip\": \"10.0.0.1\\u0000x\"}");
    NO("{\"ip\": [\"10.0.0.1\"]}", "{\"ip\": \"10.0.0.1\\u0000\"}");
    YES("{\"ip\": [{\"cidr\": \"1:2:3:4:5:6:7::/112\"}]}", "{\"ip\": \"1:2:3:4:5:6:7:ff\"}");
    NO("{\"ip\": [{\"cidr\": \"::/0\"}]}", "{\"ip\": \"1:2:3:4:5:6:7:8::\"}");
    NO("{\"ip\": [{\"cidr\": \"::/0\"}]}", "{\"ip\": \"::01.2.3.4\"}");
    struct esmd_filter_error err;
    const char *bad = "{\"ip\": [{\"cidr\": \"10.0.0.0\\u0000/8\"}]}";
    assert_int_equal(esmd_filter_check(bad, strlen(bad), &err), -1);
    bad = "{\"ip\": [{\"cidr\": \"10.0.0.00/8\"}]}";
    assert_int_equal(esmd_filter_check(bad, strlen(bad), &err), -1);
}

static void test_or(void **state)
{
    const char *p = "{\"a\": [1], \"$or\": [{\"b\": [\"x\"]}, {\"c\": {\"d\": [\"y\"]}}]}";
    YES(p, "{\"a\": 1, \"b\": \"x\"}");
    YES(p, "{\"a\": 1, \"c\": {\"d\": \"y\"}}");
    NO(p, "{\"a\": 2, \"b\": \"x\"}");
    NO(p, "{\"a\": 1, \"b\": \"y\"}");
    /* $or inside a nested object, and inside an $or branch. */
    p = "{\"d\": {\"$or\": [{\"x\": [1]}, {\"y\": [2], \"$or\": [{\"z\": [3]}, {\"w\": [4]}]}]}}";
    YES(p, "{\"d\": {\"x\": 1}}");
    YES(p, "{\"d\": {\"y\": 2, \"w\": 4}}");
    NO(p, "{\"d\": {\"y\": 2}}");
    NO(p, "{\"x\": 1}");
    /* Two $or in parallel: both must hold. */
    p = "{\"$or\": [{\"a\": [1]}, {\"b\": [1]}], \"c\": {\"$or\": [{\"a\": [1]}, {\"b\": [1]}]}}";
    YES(p, "{\"b\": 1, \"c\": {\"a\": 1}}");
    NO(p, "{\"b\": 1, \"c\": {\"x\": 1}}");
    /* exists:false in a branch. */
    p = "{\"$or\": [{\"a\": [{\"exists\": false}]}, {\"b\": [1]}]}";
    YES(p, "{\"c\": 1}");
    YES(p, "{\"a\": 0, \"b\": 1}");
    NO(p, "{\"a\": 0}");
    /* One pattern that matches through several alternatives is counted once. */
    struct esmd_filter *f = one("{\"$or\": [{\"a\": [1]}, {\"b\": [1]}]}");
    uint32_t ids[4];
    assert_int_equal(esmd_filter_match_all(f, "{\"a\":1,\"b\":1}", 13, ids, 4), 1);
    esmd_filter_free(f);
}

static void test_array_consistency(void **state)
{
    const char *p = "{\"d\": {\"name\": [\"alice\"], \"status\": [\"active\"]}}";
    YES(p, "{\"d\": [{\"name\": \"alice\", \"status\": \"active\"}]}");
    NO(p, "{\"d\": [{\"name\": \"alice\"}, {\"status\": \"active\"}]}");
    YES(p, "{\"d\": [{\"name\": \"bob\", \"status\": \"active\"}, {\"name\": \"alice\", "
           "\"status\": [\"idle\", \"active\"]}]}");
    /* Fields outside the array combine with any element. */
    YES("{\"v\": [1], \"d\": {\"n\": [\"x\"]}}",
        "{\"v\": 1, \"d\": [{\"n\": \"y\"}, {\"n\": \"x\"}]}");
    /* Different arrays do not constrain each other. */
    YES("{\"a\": {\"x\": [1]}, \"b\": {\"y\": [2]}}",
        "{\"a\": [{\"x\": 0}, {\"x\": 1}], \"b\": [{\"y\": 2}, {\"y\": 0}]}");
    /* Nested arrays: the outer element must be the same, inner arrays are separate. */
    p = "{\"o\": {\"i\": {\"k\": [\"c\"], \"v\": [\"b\"]}}}";
    YES(p, "{\"o\": [{\"i\": [{\"k\": \"c\", \"v\": \"b\"}]}]}");
    NO(p, "{\"o\": [{\"i\": [{\"k\": \"c\"}, {\"v\": \"b\"}]}]}");
    NO(p, "{\"o\": [{\"i\": [{\"k\": \"c\"}]}, {\"i\": [{\"v\": \"b\"}]}]}");
    p = "{\"o\": {\"a\": [1], \"i\": {\"k\": [2]}}}";
    YES(p, "{\"o\": [{\"a\": 0}, {\"a\": 1, \"i\": [{\"k\": 0}, {\"k\": 2}]}]}");
    NO(p, "{\"o\": [{\"a\": 1, \"i\": [{\"k\": 0}]}, {\"a\": 0, \"i\": [{\"k\": 2}]}]}");
    /* exists:false is judged in the chosen element. */
    p = "{\"e\": {\"n\": [\"anna\"], \"ids\": [{\"exists\": false}]}}";
    YES(p, "{\"e\": [{\"n\": \"john\", \"ids\": [1]}, {\"n\": \"anna\"}]}");
    NO(p, "{\"e\": [{\"n\": \"john\"}, {\"n\": \"anna\", \"ids\": [1]}]}");
    NO(p, "{\"e\": [{\"n\": \"anna\"}], \"x\": 1, \"e.ids\": 5}"); /* e.ids is e -> ids */
    /* A search over many elements stays correct. */
    char big[8192];
    size_t n = (size_t)snprintf(big, sizeof(big), "{\"d\": [");
    for (int i = 0; i < 200; i++)
        n += (size_t)snprintf(big + n, sizeof(big) - n, "%s{\"name\": \"alice\", \"s\": %d}",
                              i ? "," : "", i);
    snprintf(big + n, sizeof(big) - n, "]}");
    assert_true(pm("{\"d\": {\"name\": [\"alice\"], \"s\": [199]}}", big));
    assert_false(pm("{\"d\": {\"name\": [\"bob\"], \"s\": [199]}}", big));

    /* 20,000 elements that all have a, b and c, and all but the first (or all) have e: the
     * search must find the first element without trying every pair of elements. */
    size_t cap = 20000 * 40 + 64;
    char *huge = malloc(cap);
    p = "{\"d\": {\"a\": [1], \"b\": [2], \"c\": [3], \"e\": [{\"exists\": false}]}}";
    for (int all_e = 0; all_e <= 1; all_e++) {
        n = (size_t)snprintf(huge, cap, "{\"d\": [");
        for (int i = 0; i < 20000; i++)
            n += (size_t)snprintf(huge + n, cap - n, "%s{\"a\": 1, \"b\": 2, \"c\": 3%s}",
                                  i ? "," : "", i || all_e ? ", \"e\": 0" : "");
        snprintf(huge + n, cap - n, "]}");
        assert_int_equal(pm(p, huge), !all_e);
    }
    free(huge);
}

static void test_escapes(void **state)
{
    /* \u escapes (with surrogate pairs) equal raw UTF-8, on both sides and in keys. */
    YES("{\"a\": [\"x\\u0078\\ud83d\\udc8by\"]}", "{\"a\": \"xx\xf0\x9f\x92\x8by\"}");
    YES("{\"a\": [\"xx\xf0\x9f\x92\x8by\"]}", "{\"a\": \"x\\u0078\\ud83d\\udc8by\"}");
    YES("{\"\\u0061\": [\"/\"]}", "{\"a\": \"\\/\"}");
    YES("{\"a\": [\"/\"]}", "{\"\\u0061\": \"\\/\"}");
    YES("{\"a\": [\"q\\\"\\\\\\n\\t\"]}", "{\"a\": \"q\\u0022\\u005c\\u000a\\u0009\"}");
    YES("{\"k\\\"ey\": [1]}", "{\"k\\\"ey\": 1}");
    /* A lone surrogate decodes to U+FFFD on both sides. */
    YES("{\"a\": [\"\\ud800\"]}", "{\"a\": \"\xef\xbf\xbd\"}");
    /* Prefix and wildcard see decoded text. */
    YES("{\"a\": [{\"prefix\": \"\\u00e9\"}]}", "{\"a\": \"\xc3\xa9t\xc3\xa9\"}");
    YES("{\"a\": [{\"wildcard\": \"*\\u00e9\"}]}", "{\"a\": \"t\\u00e9\"}");
}

static void test_paths(void **state)
{
    /* Duplicate keys: the last one wins. */
    YES("{\"a\": [\"x\"], \"a\": [\"y\"]}", "{\"a\": \"y\"}");
    NO("{\"a\": [\"x\"], \"a\": [\"y\"]}", "{\"a\": \"x\"}");
    /* Dotted names are paths (event-ruler), in patterns and in events. */
    YES("{\"a.b\": [\"x\"]}", "{\"a\": {\"b\": \"x\"}}");
    YES("{\"a\": {\"b\": [\"x\"]}}", "{\"a.b\": \"x\"}");
    YES("{\"a\": {\"b\": {\"c\": [\"x\"]}}}", "{\"a\": {\"b.c\": \"x\"}}");
    NO("{\"a.b\": [\"x\"]}", "{\"ab\": \"x\"}");
    /* More children than the inline table holds (lookups go through the hash table). */
    char p[2048], e[2048];
    size_t pn = (size_t)snprintf(p, sizeof(p), "{"), en = (size_t)snprintf(e, sizeof(e), "{");
    for (int i = 0; i < 40; i++) {
        pn += (size_t)snprintf(p + pn, sizeof(p) - pn, "%s\"field_number_%d\": [%d]", i ? "," : "",
                               i, i);
        en += (size_t)snprintf(e + en, sizeof(e) - en, "%s\"field_number_%d\": %d", i ? "," : "",
                               39 - i, 39 - i);
    }
    snprintf(p + pn, sizeof(p) - pn, "}");
    snprintf(e + en, sizeof(e) - en, "}");
    YES(p, e);
    e[strlen(e) - 2] = '7'; /* field_number_0: 7 */
    NO(p, e);
}

static void test_invalid_events(void **state)
{
    struct esmd_filter *f = one("{\"a\": [{\"exists\": false}]}");
    static const char *const bad[] = {
        "",
        "   ",
        "[]",
        "\"x\"",
        "5",
        "{",
        "{\"a\"}",
        "{\"a\": }",
        "{\"b\": 1,}",
        "{\"b\": [1,]}",
        "{\"b\": 01}",
        "{\"b\": 1.}",
        "{\"b\": -}",
        "{\"b\": tru}",
        "{\"b\": \"x\" }x",
        "{\"b\": \"\\x\"}",
        "{\"b\": \"\\u12g4\"}",
        "{\"b\": \"a\nb\"}",
        "{\"b\": {\"c\": [1, {\"d\": }]}}",
        "{'b': 1}",
        "{} {}",
    };
    for (size_t i = 0; i < sizeof(bad) / sizeof(bad[0]); i++) {
        if (ev(f, bad[i]))
            fail_msg("invalid event matched: %s", bad[i]);
        assert_int_equal(esmd_filter_match_all(f, bad[i], strlen(bad[i]), NULL, 0), -1);
    }
    assert_int_equal(esmd_filter_match_all(f, NULL, 0, NULL, 0), -1);
    assert_true(ev(f, " \t\r\n{}\n"));
    assert_true(ev(f, "{\"b\": [1, 2.5e-3, -0, true, false, null, \"\", {}, []]}"));
    /* Embedded NUL: the length counts, not the terminator. */
    assert_int_equal(esmd_filter_match_all(f, "{}\0", 3, NULL, 0), -1);
    /* Nesting: 512 levels (the object and 511 arrays) are fine, 513 are refused, both where a
     * pattern looks (a) and where the scanner only skips (b). */
    char *deep = malloc(2000);
    for (int key = 0; key < 2; key++) {
        for (int depth = 511; depth <= 512; depth++) {
            size_t n = 0;
            deep[n++] = '{';
            memcpy(deep + n, key ? "\"b\":" : "\"a\":", 4);
            n += 4;
            for (int i = 0; i < depth; i++)
                deep[n++] = '[';
            for (int i = 0; i < depth; i++)
                deep[n++] = ']';
            deep[n++] = '}';
            assert_int_equal(esmd_filter_match_all(f, deep, n, NULL, 0), depth == 511 ? 1 : -1);
        }
    }
    free(deep);
    esmd_filter_free(f);
}

struct bad_case {
    const char *pattern;
    size_t offset;
    int line, column;
    const char *message;
};

static const struct bad_case bad_patterns[] = {
    {"[1]", 0, 1, 1, "a pattern must be a JSON object, got an array"},
    {"\"x\"", 0, 1, 1, "a pattern must be a JSON object, got a string"},
    {"{\"a\": \"x\"}", 6, 1, 7,
     "field \"a\" must hold a list of values or an object, got a string"},
    {"{\"a\": []}", 6, 1, 7, "field \"a\" has an empty list of values"},
    {"{\"a\": {}}", 6, 1, 7, "field \"a\" holds an empty object"},
    {"{\"a\": [[\"x\"]]}", 7, 1, 8, "field \"a\": a list of values cannot contain an array"},
    {"{\"a\": [{\"prefx\": \"x\"}]}", 8, 1, 9,
     "unknown operator \"prefx\" (allowed: \"prefix\", \"suffix\", \"equals-ignore-case\", "
     "\"wildcard\", \"anything-but\", \"numeric\", \"exists\", \"cidr\")"},
    {"{\"a\": [{}]}", 7, 1, 8, "an operator object must have exactly one key, got 0"},
    {"{\"a\": [{\"prefix\": \"x\", \"suffix\": \"y\"}]}", 7, 1, 8,
     "an operator object must have exactly one key, got 2"},
    {"{\"a\": [{\"prefix\": 5}]}", 18, 1, 19,
     "\"prefix\" needs a string or {\"equals-ignore-case\": STRING}, got a number"},
    {"{\"a\": [{\"prefix\": {\"equals-ignore-case\": 5}}]}", 41, 1, 42,
     "\"equals-ignore-case\" needs a string, got a number"},
    {"{\"a\": [{\"prefix\": {\"foo\": \"x\"}}]}", 19, 1, 20,
     "unknown operator \"foo\" inside \"prefix\" (allowed: \"equals-ignore-case\")"},
    {"{\"a\": [{\"suffix\": null}]}", 18, 1, 19,
     "\"suffix\" needs a string or {\"equals-ignore-case\": STRING}, got null"},
    {"{\"a\": [{\"equals-ignore-case\": [\"x\"]}]}", 30, 1, 31,
     "\"equals-ignore-case\" needs a string, got an array"},
    {"{\"a\": [{\"wildcard\": 1}]}", 20, 1, 21, "\"wildcard\" needs a string, got a number"},
    {"{\"a\": [{\"wildcard\": \"a**b\"}]}", 20, 1, 21,
     "\"wildcard\": consecutive '*' characters are not allowed"},
    {"{\"a\": [{\"wildcard\": \"a\\\\xb\"}]}", 20, 1, 21,
     "\"wildcard\": a backslash must be followed by '*' or '\\'"},
    {"{\"a\": [{\"wildcard\": \"ab\\\\\"}]}", 20, 1, 21,
     "\"wildcard\": a backslash must be followed by '*' or '\\'"},
    {"{\"a\": [{\"numeric\": 5}]}", 19, 1, 20,
     "\"numeric\" needs an array like [\">\", 0, \"<=\", 5], got a number"},
    {"{\"a\": [{\"numeric\": [\">\", 5, \"<\"]}]}", 19, 1, 20,
     "\"numeric\" needs 2 or 4 elements, got 3"},
    {"{\"a\": [{\"numeric\": [\"=>\", 5]}]}", 20, 1, 21,
     "\"numeric\": unknown comparison \"=>\" (allowed: \"=\", \"<\", \"<=\", \">\", \">=\")"},
    {"{\"a\": [{\"numeric\": [5, 5]}]}", 20, 1, 21,
     "\"numeric\": expected a comparison (\"=\", \"<\", \"<=\", \">\", \">=\"), got a number"},
    {"{\"a\": [{\"numeric\": [\">\", \"5\"]}]}", 25, 1, 26,
     "\"numeric\": expected a number after \">\", got a string"},
    {"{\"a\": [{\"numeric\": [\"<\", 10, \">\", 5]}]}", 20, 1, 21,
     "\"numeric\": a range is a lower bound (\">\" or \">=\") followed by an upper bound (\"<\" "
     "or \"<=\")"},
    {"{\"a\": [{\"numeric\": [\">\", 10, \">\", 5]}]}", 29, 1, 30,
     "\"numeric\": a range is a lower bound (\">\" or \">=\") followed by an upper bound (\"<\" "
     "or \"<=\")"},
    {"{\"a\": [{\"numeric\": [\"=\", 10, \"<\", 50]}]}", 20, 1, 21,
     "\"numeric\": a range is a lower bound (\">\" or \">=\") followed by an upper bound (\"<\" "
     "or \"<=\")"},
    {"{\"a\": [{\"numeric\": [\">\", 10, \"<\", 10]}]}", 34, 1, 35,
     "\"numeric\": the lower bound must be less than the upper bound"},
    {"{\"a\": [{\"exists\": \"true\"}]}", 18, 1, 19,
     "\"exists\" needs true or false, got a string"},
    {"{\"a\": [{\"cidr\": 10}]}", 16, 1, 17, "\"cidr\" needs a string, got a number"},
    {"{\"a\": [{\"cidr\": \"10.0.0.0\"}]}", 16, 1, 17,
     "\"cidr\": invalid CIDR block \"10.0.0.0\" (want ADDRESS/BITS, like \"10.0.0.0/24\")"},
    {"{\"a\": [{\"cidr\": \"10.0.0.0/33\"}]}", 16, 1, 17,
     "\"cidr\": invalid CIDR block \"10.0.0.0/33\" (want ADDRESS/BITS, like \"10.0.0.0/24\")"},
    {"{\"a\": [{\"cidr\": \"10.0.0/8\"}]}", 16, 1, 17,
     "\"cidr\": invalid CIDR block \"10.0.0/8\" (want ADDRESS/BITS, like \"10.0.0.0/24\")"},
    {"{\"a\": [{\"cidr\": \"2001:db8::/129\"}]}", 16, 1, 17,
     "\"cidr\": invalid CIDR block \"2001:db8::/129\" (want ADDRESS/BITS, like \"10.0.0.0/24\")"},
    {"{\"a\": [{\"cidr\": \"2001:db8:::/64\"}]}", 16, 1, 17,
     "\"cidr\": invalid CIDR block \"2001:db8:::/64\" (want ADDRESS/BITS, like \"10.0.0.0/24\")"},
    {"{\"a\": [{\"anything-but\": true}]}", 24, 1, 25,
     "\"anything-but\" needs a string, a number, a list of strings or of numbers, or an object, "
     "got a boolean"},
    {"{\"a\": [{\"anything-but\": []}]}", 24, 1, 25, "\"anything-but\" list is empty"},
    {"{\"a\": [{\"anything-but\": [\"x\", 1]}]}", 30, 1, 31,
     "\"anything-but\" list must hold only strings or only numbers"},
    {"{\"a\": [{\"anything-but\": [null]}]}", 25, 1, 26,
     "\"anything-but\" list values must be strings or numbers, got null"},
    {"{\"a\": [{\"anything-but\": {\"numeric\": [\">\", 1]}}]}", 25, 1, 26,
     "unknown operator \"numeric\" inside \"anything-but\" (allowed: \"prefix\", \"suffix\", "
     "\"equals-ignore-case\", \"wildcard\")"},
    {"{\"a\": [{\"anything-but\": {\"prefix\": 1}}]}", 35, 1, 36,
     "\"anything-but\": \"prefix\" needs a string or a non-empty list of strings, got a number"},
    {"{\"a\": [{\"anything-but\": {\"prefix\": []}}]}", 35, 1, 36,
     "\"anything-but\": \"prefix\" needs a string or a non-empty list of strings, got an array"},
    {"{\"a\": [{\"anything-but\": {\"suffix\": [\"x\", 2]}}]}", 35, 1, 36,
     "\"anything-but\": \"suffix\" needs a string or a non-empty list of strings, got a list with "
     "other values"},
    {"{\"a\": [{\"anything-but\": {\"wildcard\": \"x**\"}}]}", 37, 1, 38,
     "\"wildcard\": consecutive '*' characters are not allowed"},
    {"{\"$or\": {\"a\": [\"x\"]}}", 8, 1, 9,
     "\"$or\" needs an array of at least 2 objects, got an object"},
    {"{\"$or\": [{\"a\": [\"x\"]}]}", 8, 1, 9,
     "\"$or\" needs an array of at least 2 objects, got 1"},
    {"{\"$or\": [{\"a\": [\"x\"]}, \"b\"]}", 23, 1, 24,
     "\"$or\" entries must be non-empty objects, got a string"},
    {"{\"$or\": [{\"a\": [\"x\"]}, {}]}", 23, 1, 24,
     "\"$or\" entries must be non-empty objects, got an empty object"},
    /* Positions count lines and byte columns. */
    {"{\"a\": [\"x\"],\n \"b\": [{\"prefx\": 1}]}", 21, 2, 9,
     "unknown operator \"prefx\" (allowed: \"prefix\", \"suffix\", \"equals-ignore-case\", "
     "\"wildcard\", \"anything-but\", \"numeric\", \"exists\", \"cidr\")"},
    {"{\n\n  \"a\": [\n    {\"exists\": 1}]}", 27, 4, 16,
     "\"exists\" needs true or false, got a number"},
    /* Syntax. */
    {"", 0, 1, 1, "invalid JSON: unexpected end of input"},
    {"{\"a\": [\"x\"]", 11, 1, 12, "invalid JSON: unexpected end of input"},
    {"{\"a\" [\"x\"]}", 5, 1, 6, "invalid JSON: expected ':' after an object key"},
    {"{\"a\": [\"x\"]} x", 13, 1, 14, "invalid JSON: unexpected characters after the pattern"},
    {"{\"a\": [\"x\" \"y\"]}", 11, 1, 12,
     "invalid JSON: expected ',' or ']' after an array element"},
    {"{\"a\": [\"x\"] \"b\": [1]}", 12, 1, 13,
     "invalid JSON: expected ',' or '}' after an object member"},
    {"{\"a\": [\"\\q\"]}", 8, 1, 9, "invalid JSON: invalid escape sequence in a string"},
    {"{\"a\": [\"\\u12\"]}", 8, 1, 9, "invalid JSON: \\u must be followed by 4 hex digits"},
    {"{\"a\": [\"x\ny\"]}", 9, 1, 10, "invalid JSON: control character in a string"},
    {"{\"a\": [\"x", 7, 1, 8, "invalid JSON: unterminated string"},
    {"{\"a\": [01]}", 7, 1, 8, "invalid JSON: invalid number"},
    {"{\"a\": [1e999]}", 7, 1, 8, "number 1e999 is out of range"},
    {"{a: 1}", 1, 1, 2, "invalid JSON: expected a string key"},
    {"{\"a\": [tru]}", 7, 1, 8, "invalid JSON: invalid literal (expected true, false or null)"},
    {"{\"a\": [#]}", 7, 1, 8, "invalid JSON: unexpected character '#'"},
    {"{\"a\": [\x01]}", 7, 1, 8, "invalid JSON: unexpected byte 0x01"},
};

static void test_invalid_patterns(void **state)
{
    struct esmd_filter *f = one("{\"k\": [\"v\"]}");
    for (size_t i = 0; i < sizeof(bad_patterns) / sizeof(bad_patterns[0]); i++) {
        const struct bad_case *c = &bad_patterns[i];
        struct esmd_filter_error err, err2;
        memset(&err, 0, sizeof(err));
        memset(&err2, 0, sizeof(err2));
        int rc = esmd_filter_check(c->pattern, strlen(c->pattern), &err);
        if (rc == 0)
            fail_msg("pattern accepted: %s", c->pattern);
        if (strcmp(err.message, c->message) != 0 || err.offset != c->offset ||
            err.line != c->line || err.column != c->column)
            fail_msg("pattern %s: got %zu %d:%d \"%s\", want %zu %d:%d \"%s\"", c->pattern,
                     err.offset, err.line, err.column, err.message, c->offset, c->line, c->column,
                     c->message);
        /* Adding refuses it the same way and leaves the matcher as it was. */
        assert_int_equal(esmd_filter_add(f, c->pattern, strlen(c->pattern), 9, &err2), -1);
        assert_string_equal(err2.message, err.message);
        assert_int_equal(err2.offset, err.offset);
        assert_int_equal(esmd_filter_count_patterns(f), 1);
        assert_int_equal(esmd_filter_add_skip(f, c->pattern, strlen(c->pattern), 9,
                                              (const char *const[]){"a", NULL}, NULL),
                         -1);
    }
    assert_true(ev(f, "{\"k\": \"v\", \"a\": 1}"));
    assert_false(ev(f, "{\"k\": \"w\"}"));
    esmd_filter_free(f);
    /* A NULL error pointer is allowed. */
    assert_int_equal(esmd_filter_check("[", 1, NULL), -1);
    /* The length counts, not a terminator. */
    assert_int_equal(esmd_filter_check("{\"a\": [1]}xyz", 10, NULL), 0);
}

static void test_or_limit(void **state)
{
    /* 11 parallel $or of 2 branches = 2048 alternatives: refused. 10 = 1024: accepted. */
    char p[4096];
    for (int k = 10; k <= 11; k++) {
        size_t n = (size_t)snprintf(p, sizeof(p), "{");
        for (int i = 0; i < k; i++)
            n += (size_t)snprintf(p + n, sizeof(p) - n,
                                  "%s\"f%d\": {\"$or\": [{\"a\": [1]}, {\"b\": [2]}]}",
                                  i ? "," : "", i);
        snprintf(p + n, sizeof(p) - n, "}");
        struct esmd_filter_error err;
        int rc = esmd_filter_check(p, strlen(p), &err);
        if (k == 10) {
            assert_int_equal(rc, 0);
        } else {
            assert_int_equal(rc, -1);
            assert_string_equal(err.message,
                                "\"$or\" expands the pattern to more than 1024 alternatives");
        }
    }
}

static void test_skip(void **state)
{
    static const char *const skip[] = {"value", "key", NULL};
    struct esmd_filter *f = esmd_filter_new();
    const char *p = "{\"value\": {\"a\": [1]}, \"topic\": [\"t\"]}";
    assert_int_equal(esmd_filter_add_skip(f, p, strlen(p), 7, skip, NULL), 0);
    assert_true(ev(f, "{\"topic\": \"t\"}"));
    assert_true(ev(f, "{\"topic\": \"t\", \"value\": {\"a\": 2}}"));
    assert_false(ev(f, "{\"topic\": \"u\"}"));
    esmd_filter_free(f);

    /* Nothing left: matches every event (any valid object). */
    f = esmd_filter_new();
    p = "{\"value\": {\"a\": [1]}, \"key\": [\"k\"]}";
    assert_int_equal(esmd_filter_add_skip(f, p, strlen(p), 7, skip, NULL), 0);
    assert_true(ev(f, "{}"));
    assert_true(ev(f, "{\"x\": [1, 2]}"));
    assert_false(ev(f, "not json"));
    esmd_filter_free(f);

    /* Dotted names and $or branches at the top level are skipped too; nested fields are not. */
    f = esmd_filter_new();
    p = "{\"value.a\": [1], \"$or\": [{\"key\": [\"k\"]}, {\"partition\": [0]}], "
        "\"h\": {\"value\": [2]}}";
    assert_int_equal(esmd_filter_add_skip(f, p, strlen(p), 7, skip, NULL), 0);
    assert_true(ev(f, "{\"h\": {\"value\": 2}}"));
    assert_false(ev(f, "{\"h\": {\"value\": 3}}"));
    esmd_filter_free(f);

    /* Skipped parts are still checked. */
    struct esmd_filter_error err;
    p = "{\"value\": {\"a\": [{\"prefx\": 1}]}, \"topic\": [\"t\"]}";
    assert_int_equal(esmd_filter_add_skip(NULL, p, strlen(p), 7, skip, &err), -1);
    assert_int_equal(err.offset, 18);

    /* A top-level {} matches everything; NULL skip list is allowed. */
    f = esmd_filter_new();
    assert_int_equal(esmd_filter_add_skip(f, "{}", 2, 3, NULL, NULL), 0);
    assert_true(ev(f, "{\"a\": 1}"));
    esmd_filter_free(f);
}

static void test_match_all_ids(void **state)
{
    struct esmd_filter *f = esmd_filter_new();
    assert_int_equal(esmd_filter_count_patterns(f), 0);
    assert_false(ev(f, "{\"a\": 1}"));
    assert_int_equal(esmd_filter_match_all(f, "{\"a\": 1}", 8, NULL, 0), 0);
    static const char *const pats[] = {
        "{\"a\": [1]}", "{\"a\": [{\"numeric\": [\">\", 0]}]}",
        "{\"b\": [1]}", "{\"a\": [1], \"c\": [{\"exists\": false}]}",
        "{\"a\": [1]}",
    };
    for (uint32_t i = 0; i < 5; i++)
        assert_int_equal(esmd_filter_add(f, pats[i], strlen(pats[i]), 100 + i, NULL), 0);
    assert_int_equal(esmd_filter_count_patterns(f), 5);
    uint32_t ids[8];
    const char *e = "{\"a\": 1}";
    int n = esmd_filter_match_all(f, e, strlen(e), ids, 8);
    assert_int_equal(n, 4);
    bool seen[5] = {false};
    for (int i = 0; i < n; i++) {
        assert_true(ids[i] >= 100 && ids[i] < 105);
        seen[ids[i] - 100] = true;
    }
    assert_true(seen[0] && seen[1] && !seen[2] && seen[3] && seen[4]);
    /* max bounds what is stored, not the count. */
    ids[1] = 12345;
    assert_int_equal(esmd_filter_match_all(f, e, strlen(e), ids, 1), 4);
    assert_int_equal(ids[1], 12345);
    assert_int_equal(esmd_filter_match_all(f, e, strlen(e), NULL, 8), 4);
    e = "{\"a\": 1, \"c\": 0}";
    assert_int_equal(esmd_filter_match_all(f, e, strlen(e), ids, 8), 3);
    e = "{\"b\": 1}";
    assert_int_equal(esmd_filter_match_all(f, e, strlen(e), ids, 8), 1);
    assert_int_equal(ids[0], 102);
    assert_int_equal(esmd_filter_match_all(f, "{", 1, ids, 8), -1);
    /* A checked pattern is not kept. */
    assert_int_equal(esmd_filter_check(pats[2], strlen(pats[2]), NULL), 0);
    assert_int_equal(esmd_filter_count_patterns(f), 5);
    esmd_filter_free(f);
    esmd_filter_free(NULL);
}

/* {"v": [0, 1, ..., n-1]} with `nor` parallel two-branch "$or" beside it (2^nor alternatives,
 * each repeating the n values). Caller frees. */
static char *big_pattern(int n, int nor, size_t *len)
{
    size_t cap = (size_t)n * 8 + (size_t)nor * 64 + 64, o = 0;
    char *p = malloc(cap);
    o += (size_t)snprintf(p + o, cap - o, "{\"v\": [");
    for (int i = 0; i < n; i++)
        o += (size_t)snprintf(p + o, cap - o, "%s%d", i ? "," : "", i);
    o += (size_t)snprintf(p + o, cap - o, "]");
    for (int i = 0; i < nor; i++)
        o += (size_t)snprintf(p + o, cap - o, ", \"o%d\": {\"$or\": [{\"a\": [1]}, {\"b\": [2]}]}",
                              i);
    o += (size_t)snprintf(p + o, cap - o, "}");
    *len = o;
    return p;
}

static void test_compiled_size(void **state)
{
    struct esmd_filter_error err;
    size_t len;
    /* Near the longest pattern max_filter_pattern_length allows (65,536): 12,000 numbers fit. */
    char *p = big_pattern(12000, 0, &len);
    assert_true(len < 65536);
    struct esmd_filter *f = esmd_filter_new();
    assert_int_equal(esmd_filter_add(f, p, len, 1, &err), 0);
    assert_true(ev(f, "{\"v\": 11999}"));
    free(p);
    /* 1,000 values repeated in 1,024 alternatives, under 10 KB of text: refused, matcher as it
     * was, and the same from esmd_filter_check. */
    p = big_pattern(1000, 10, &len);
    assert_true(len < 10000);
    assert_int_equal(esmd_filter_add(f, p, len, 2, &err), -1);
    assert_string_equal(err.message,
                        "the pattern compiles to 8.3 MB, more than the limit of 4 MB per pattern "
                        "(docs/filters.md#limits): use fewer values, or fewer \"$or\" alternatives "
                        "that repeat them");
    assert_int_equal(err.line, 1);
    assert_int_equal(err.column, 1);
    assert_int_equal(esmd_filter_count_patterns(f), 1);
    assert_int_equal(esmd_filter_check(p, len, &err), -1);
    free(p);
    /* 64 alternatives of the same values: fits. */
    p = big_pattern(1000, 6, &len);
    assert_int_equal(esmd_filter_add(f, p, len, 3, &err), 0);
    assert_int_equal(esmd_filter_count_patterns(f), 2);
    free(p);
    esmd_filter_free(f);

    /* A mapping's patterns together: 10,000 values each (49 KB of text, about 0.6 MB compiled),
     * the 27th is past 16 MB; said once, and the patterns after it are still checked. */
    p = big_pattern(10000, 0, &len);
    size_t budget = ESMD_FILTER_MAX_MAPPING_BYTES;
    int refused = -1, errors = 0;
    for (int i = 0; i < 100; i++) {
        if (esmd_filter_check_budget(p, len, &budget, &err) != 0) {
            errors++;
            if (refused < 0)
                refused = i;
        }
    }
    assert_int_equal(refused, 26);
    assert_int_equal(errors, 1);
    assert_true(strstr(err.message, "with this pattern, the mapping's filters compile to 16.") ==
                err.message);
    assert_non_null(strstr(err.message, "more than the limit of 16 MB per mapping"));
    const char *syntax = "{\"v\": [}";
    assert_int_equal(esmd_filter_check_budget(syntax, strlen(syntax), &budget, &err), -1);
    assert_string_equal(err.message, "invalid JSON: unexpected character '}'");
    free(p);
}

static void test_many_patterns(void **state)
{
    /* 5000 exact patterns on one field and 5000 on distinct fields in one matcher. */
    struct esmd_filter *f = esmd_filter_new();
    char p[128];
    for (uint32_t i = 0; i < 5000; i++) {
        snprintf(p, sizeof(p), "{\"d\": {\"id\": [\"o-%u\"]}}", i);
        assert_int_equal(esmd_filter_add(f, p, strlen(p), i, NULL), 0);
        snprintf(p, sizeof(p), "{\"f%u\": [%u]}", i, i);
        assert_int_equal(esmd_filter_add(f, p, strlen(p), 10000 + i, NULL), 0);
    }
    assert_int_equal(esmd_filter_count_patterns(f), 10000);
    uint32_t ids[4];
    const char *e = "{\"d\": {\"id\": \"o-4242\"}, \"f17\": 17, \"f18\": 17}";
    assert_int_equal(esmd_filter_match_all(f, e, strlen(e), ids, 4), 2);
    assert_true((ids[0] == 4242 && ids[1] == 10017) || (ids[0] == 10017 && ids[1] == 4242));
    assert_false(ev(f, "{\"d\": {\"id\": \"o-5000\"}}"));
    esmd_filter_free(f);
}

/* Counting allocations to show that matching does not allocate once scratch has grown. Not
 * possible under AddressSanitizer (it owns malloc), so only in plain builds with glibc. */
#if defined(__SANITIZE_ADDRESS__)
#define NO_ALLOC_COUNT 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define NO_ALLOC_COUNT 1
#endif
#endif

#if !defined(NO_ALLOC_COUNT) && defined(__GLIBC__)
extern void *__libc_malloc(size_t);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
static size_t alloc_calls;
void *malloc(size_t n)
{
    alloc_calls++;
    return __libc_malloc(n);
}
void *calloc(size_t a, size_t b)
{
    alloc_calls++;
    return __libc_calloc(a, b);
}
void *realloc(void *p, size_t n)
{
    alloc_calls++;
    return __libc_realloc(p, n);
}
#define HAVE_ALLOC_COUNT 1
#endif

static void test_no_alloc(void **state)
{
#ifdef HAVE_ALLOC_COUNT
    size_t at_start = alloc_calls;
    struct esmd_filter *f = esmd_filter_new();
    if (alloc_calls == at_start) { /* malloc is not ours (valgrind replaces it): no count */
        esmd_filter_free(f);
        skip();
    }
    static const char *const pats[] = {
        "{\"d\": {\"items\": {\"sku\": [{\"prefix\": \"S\"}], \"n\": [{\"exists\": true}]}}}",
        "{\"d\": {\"email\": [{\"wildcard\": \"*@x.*\"}], \"t\": [{\"equals-ignore-case\": "
        "\"GOLD\"}]}}",
        "{\"d\": {\"amount\": [{\"numeric\": [\">\", 10]}], \"coupon\": [{\"exists\": false}]}}",
        "{\"d\": {\"ip\": [{\"cidr\": \"10.0.0.0/8\"}]}, \"$or\": [{\"s\": [\"a\"]}, {\"s\": "
        "[{\"anything-but\": \"b\"}]}]}",
    };
    for (uint32_t i = 0; i < 4; i++)
        assert_int_equal(esmd_filter_add(f, pats[i], strlen(pats[i]), i, NULL), 0);
    const char *e = "{\"s\": \"c\", \"d\": {\"items\": [{\"sku\": \"S1\", \"n\": 1}, {\"sku\": "
                    "\"T\"}], \"email\": \"Bob@x.org\", \"t\": \"gold\", \"amount\": 12.5, "
                    "\"ip\": \"10.1.2.3\", \"k\\u00e9y\": [[1], {\"a\": null}]}}";
    uint32_t ids[4];
    assert_int_equal(esmd_filter_match_all(f, e, strlen(e), ids, 4), 4); /* warms scratch */
    size_t before = alloc_calls;
    for (int i = 0; i < 100; i++) {
        assert_int_equal(esmd_filter_match_all(f, e, strlen(e), ids, 4), 4);
        assert_true(esmd_filter_match(f, e, strlen(e)));
    }
    assert_int_equal(alloc_calls, before);
    esmd_filter_free(f);
#else
    skip();
#endif
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_exact),
        cmocka_unit_test(test_numbers),
        cmocka_unit_test(test_prefix_suffix),
        cmocka_unit_test(test_equals_ignore_case),
        cmocka_unit_test(test_anything_but),
        cmocka_unit_test(test_exists),
        cmocka_unit_test(test_wildcard),
        cmocka_unit_test(test_cidr),
        cmocka_unit_test(test_or),
        cmocka_unit_test(test_array_consistency),
        cmocka_unit_test(test_escapes),
        cmocka_unit_test(test_paths),
        cmocka_unit_test(test_invalid_events),
        cmocka_unit_test(test_invalid_patterns),
        cmocka_unit_test(test_or_limit),
        cmocka_unit_test(test_skip),
        cmocka_unit_test(test_match_all_ids),
        cmocka_unit_test(test_many_patterns),
        cmocka_unit_test(test_compiled_size),
        cmocka_unit_test(test_no_alloc),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
