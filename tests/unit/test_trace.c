/* Trace context (src/trace.c): which headers are kept, the conversion between W3C traceparent
 * and X-Ray's X-Amzn-Trace-Id, and the trace id put on log lines. */
// clang-format off
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>
// clang-format on
#include "testutil.h"

#include "esmd/trace.h"

#include <string.h>

#define TP "00-5759e988bd862e3fe1be46a994272793-53995c3f42cd8ad8-01"
#define XRAY "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1"

static bool set(struct esmd_trace *t, const char *name, const char *v)
{
    return esmd_trace_set(t, name, v, strlen(v));
}

static void test_traceparent_checked(void **state)
{
    struct esmd_trace t;
    esmd_trace_clear(&t);
    assert_true(set(&t, "traceparent", TP));
    assert_string_equal(t.traceparent, TP);
    assert_true(set(&t, "TraceParent", TP)); /* header names in any case */
    /* W3C's invalid forms: version ff, zero ids, upper case, wrong lengths, 00 with more */
    static const char *const bad[] = {
        "ff-5759e988bd862e3fe1be46a994272793-53995c3f42cd8ad8-01",
        "00-00000000000000000000000000000000-53995c3f42cd8ad8-01",
        "00-5759e988bd862e3fe1be46a994272793-0000000000000000-01",
        "00-5759E988BD862E3FE1BE46A994272793-53995c3f42cd8ad8-01",
        "00-5759e988bd862e3fe1be46a99427279-53995c3f42cd8ad8-01",
        "00-5759e988bd862e3fe1be46a994272793-53995c3f42cd8ad8-01-extra",
        "00-5759e988bd862e3fe1be46a994272793-53995c3f42cd8ad8-0",
        "",
    };
    for (size_t i = 0; i < ESMD_ARRAY_LEN(bad); i++) {
        struct esmd_trace u;
        esmd_trace_clear(&u);
        assert_false(set(&u, "traceparent", bad[i]));
        assert_string_equal(u.traceparent, "");
    }
    /* a later version may carry more fields: its first four are kept */
    struct esmd_trace v;
    esmd_trace_clear(&v);
    assert_true(
        set(&v, "traceparent", "01-5759e988bd862e3fe1be46a994272793-53995c3f42cd8ad8-01-future"));
    assert_string_equal(v.traceparent, "01-5759e988bd862e3fe1be46a994272793-53995c3f42cd8ad8-01");
}

static void test_xray_checked(void **state)
{
    struct esmd_trace t;
    esmd_trace_clear(&t);
    assert_true(set(&t, "x-amzn-trace-id", XRAY));
    assert_string_equal(t.xray, XRAY);
    assert_true(set(&t, "X-Amzn-Trace-Id", "Root=1-5759e988-bd862e3fe1be46a994272793"));
    assert_false(set(&t, "X-Amzn-Trace-Id", "Parent=53995c3f42cd8ad8"));       /* no Root */
    assert_false(set(&t, "X-Amzn-Trace-Id", "Root=2-5759e988-bd862e3fe1be4")); /* bad Root */
    assert_false(set(&t, "X-Amzn-Trace-Id", "Root=1-5759e988-bd862e3fe1be46a994272793\r\nX: y"));
    assert_false(set(&t, "tracestate", "a=b\nc"));
    assert_false(set(&t, "other", TP));
    char big[ESMD_TRACESTATE_MAX + 2];
    memset(big, 'a', sizeof(big) - 1);
    big[sizeof(big) - 1] = '\0';
    assert_false(set(&t, "tracestate", big));
    big[ESMD_TRACESTATE_MAX] = '\0';
    assert_true(set(&t, "tracestate", big));
}

static void test_complete_both_ways(void **state)
{
    struct esmd_trace t;
    char id[ESMD_TRACE_ID_LEN + 1];
    esmd_trace_clear(&t);
    assert_true(set(&t, "traceparent", TP));
    assert_true(set(&t, "tracestate", "congo=t61rcWkgMzE"));
    esmd_trace_complete(&t);
    assert_string_equal(t.xray, XRAY);
    assert_string_equal(t.tracestate, "congo=t61rcWkgMzE");
    assert_true(esmd_trace_id(&t, id));
    assert_string_equal(id, "5759e988bd862e3fe1be46a994272793");

    esmd_trace_clear(&t);
    assert_true(set(&t, "X-Amzn-Trace-Id",
                    "Root=1-5759E988-BD862E3FE1BE46A994272793;Parent=53995C3F42CD8AD8;Sampled=0"));
    assert_true(set(&t, "tracestate", "congo=t61rcWkgMzE"));
    esmd_trace_complete(&t);
    assert_string_equal(t.traceparent, "00-5759e988bd862e3fe1be46a994272793-53995c3f42cd8ad8-00");
    assert_string_equal(t.tracestate, "congo=t61rcWkgMzE");

    /* without a Parent there is no traceparent, and a tracestate alone means nothing */
    esmd_trace_clear(&t);
    assert_true(set(&t, "X-Amzn-Trace-Id", "Root=1-5759e988-bd862e3fe1be46a994272793;Sampled=1"));
    assert_true(set(&t, "tracestate", "congo=t61rcWkgMzE"));
    esmd_trace_complete(&t);
    assert_string_equal(t.traceparent, "");
    assert_string_equal(t.tracestate, "");
    assert_true(esmd_trace_id(&t, id));
    assert_string_equal(id, "5759e988bd862e3fe1be46a994272793");

    /* both given: both sent as they came */
    esmd_trace_clear(&t);
    assert_true(set(&t, "traceparent", TP));
    assert_true(set(&t, "X-Amzn-Trace-Id", "Root=1-00000001-000000000000000000000001"));
    esmd_trace_complete(&t);
    assert_string_equal(t.traceparent, TP);
    assert_string_equal(t.xray, "Root=1-00000001-000000000000000000000001");

    esmd_trace_clear(&t);
    assert_true(esmd_trace_empty(&t));
    assert_false(esmd_trace_id(&t, id));
    assert_string_equal(id, "");
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_traceparent_checked),
        cmocka_unit_test(test_xray_checked),
        cmocka_unit_test(test_complete_both_ways),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
