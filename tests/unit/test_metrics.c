/* Metrics registry and the Prometheus text exposition. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>
#include <stdio.h>
#include <string.h>

#include "esmd/metrics.h"

static int teardown(void **state)
{
    (void)state;
    esmd_metrics_reset();
    return 0;
}

static void test_labels_escaping(void **state)
{
    struct esmd_buf b = ESMD_BUF_INIT;

    (void)state;
    esmd_metric_labels(&b, "function", "a\"b\\c\nd", "mapping", NULL, NULL);
    assert_string_equal(esmd_buf_cstr(&b), "function=\"a\\\"b\\\\c\\nd\"");
    esmd_metric_labels(&b, "mapping", "m1", NULL);
    assert_string_equal(esmd_buf_cstr(&b), "function=\"a\\\"b\\\\c\\nd\",mapping=\"m1\"");
    esmd_buf_reset(&b);
    esmd_metric_labels(&b, NULL);
    assert_string_equal(esmd_buf_cstr(&b), "");
    esmd_buf_free(&b);
}

static void test_counter_gauge_render(void **state)
{
    struct esmd_metric *c, *g;
    struct esmd_series *s1, *s2, *gs;
    struct esmd_buf labels = ESMD_BUF_INIT, out = ESMD_BUF_INIT;

    (void)state;
    c = esmd_metric(ESMD_COUNTER, "esmd_test_total", "A test counter.\nWith \\ and \"quotes\".");
    assert_non_null(c);
    assert_ptr_equal(esmd_metric(ESMD_COUNTER, "esmd_test_total", "ignored"), c);
    assert_null(esmd_metric(ESMD_GAUGE, "esmd_test_total", "wrong type"));

    esmd_metric_labels(&labels, "function", "orders", "mapping", "m\"1", NULL);
    s1 = esmd_series(c, esmd_buf_cstr(&labels));
    assert_ptr_equal(esmd_series(c, esmd_buf_cstr(&labels)), s1);
    s2 = esmd_series(c, "");
    esmd_series_inc(s1, 1);
    esmd_series_inc(s1, 2);
    esmd_series_inc(s2, 0.5);
    assert_true(esmd_series_value(s1) == 3);

    g = esmd_metric(ESMD_GAUGE, "esmd_test_gauge", "A gauge.");
    gs = esmd_series(g, "function=\"orders\"");
    esmd_series_set(gs, 7);
    esmd_series_inc(gs, -2);
    esmd_series_observe(gs, 1); /* ignored on a gauge */
    assert_true(esmd_series_value(gs) == 5);

    /* A family without series is not rendered. */
    assert_non_null(esmd_metric(ESMD_COUNTER, "esmd_test_empty_total", "Nothing."));
    /* NULL handles are accepted. */
    esmd_series_inc(NULL, 1);
    assert_null(esmd_series(NULL, ""));

    esmd_metrics_render(&out);
    assert_string_equal(esmd_buf_cstr(&out),
                        "# HELP esmd_test_total A test counter.\\nWith \\\\ and \"quotes\".\n"
                        "# TYPE esmd_test_total counter\n"
                        "esmd_test_total{function=\"orders\",mapping=\"m\\\"1\"} 3\n"
                        "esmd_test_total 0.5\n"
                        "# HELP esmd_test_gauge A gauge.\n"
                        "# TYPE esmd_test_gauge gauge\n"
                        "esmd_test_gauge{function=\"orders\"} 5\n");
    esmd_buf_free(&labels);
    esmd_buf_free(&out);
}

static void test_histogram_render(void **state)
{
    struct esmd_metric *h;
    struct esmd_series *s, *bare;
    struct esmd_buf out = ESMD_BUF_INIT;

    (void)state;
    h = esmd_metric(ESMD_HISTOGRAM, "esmd_test_seconds", "Durations.");
    s = esmd_series(h, "function=\"f\"");
    esmd_series_observe(s, 0.004);
    esmd_series_observe(s, 0.005); /* le is inclusive */
    esmd_series_observe(s, 0.3);
    esmd_series_observe(s, 2);
    esmd_series_observe(s, 100); /* only +Inf */
    esmd_series_inc(s, 1);       /* ignored on a histogram */
    assert_true(esmd_series_value(s) == 5);
    bare = esmd_series(h, "");
    esmd_series_observe(bare, 0.1);

    esmd_metrics_render(&out);
    assert_string_equal(esmd_buf_cstr(&out),
                        "# HELP esmd_test_seconds Durations.\n"
                        "# TYPE esmd_test_seconds histogram\n"
                        "esmd_test_seconds_bucket{function=\"f\",le=\"0.005\"} 2\n"
                        "esmd_test_seconds_bucket{function=\"f\",le=\"0.01\"} 2\n"
                        "esmd_test_seconds_bucket{function=\"f\",le=\"0.025\"} 2\n"
                        "esmd_test_seconds_bucket{function=\"f\",le=\"0.05\"} 2\n"
                        "esmd_test_seconds_bucket{function=\"f\",le=\"0.1\"} 2\n"
                        "esmd_test_seconds_bucket{function=\"f\",le=\"0.25\"} 2\n"
                        "esmd_test_seconds_bucket{function=\"f\",le=\"0.5\"} 3\n"
                        "esmd_test_seconds_bucket{function=\"f\",le=\"1\"} 3\n"
                        "esmd_test_seconds_bucket{function=\"f\",le=\"2.5\"} 4\n"
                        "esmd_test_seconds_bucket{function=\"f\",le=\"5\"} 4\n"
                        "esmd_test_seconds_bucket{function=\"f\",le=\"10\"} 4\n"
                        "esmd_test_seconds_bucket{function=\"f\",le=\"30\"} 4\n"
                        "esmd_test_seconds_bucket{function=\"f\",le=\"60\"} 4\n"
                        "esmd_test_seconds_bucket{function=\"f\",le=\"+Inf\"} 5\n"
                        "esmd_test_seconds_sum{function=\"f\"} 102.309\n"
                        "esmd_test_seconds_count{function=\"f\"} 5\n"
                        "esmd_test_seconds_bucket{le=\"0.005\"} 0\n"
                        "esmd_test_seconds_bucket{le=\"0.01\"} 0\n"
                        "esmd_test_seconds_bucket{le=\"0.025\"} 0\n"
                        "esmd_test_seconds_bucket{le=\"0.05\"} 0\n"
                        "esmd_test_seconds_bucket{le=\"0.1\"} 1\n"
                        "esmd_test_seconds_bucket{le=\"0.25\"} 1\n"
                        "esmd_test_seconds_bucket{le=\"0.5\"} 1\n"
                        "esmd_test_seconds_bucket{le=\"1\"} 1\n"
                        "esmd_test_seconds_bucket{le=\"2.5\"} 1\n"
                        "esmd_test_seconds_bucket{le=\"5\"} 1\n"
                        "esmd_test_seconds_bucket{le=\"10\"} 1\n"
                        "esmd_test_seconds_bucket{le=\"30\"} 1\n"
                        "esmd_test_seconds_bucket{le=\"60\"} 1\n"
                        "esmd_test_seconds_bucket{le=\"+Inf\"} 1\n"
                        "esmd_test_seconds_sum 0.1\n"
                        "esmd_test_seconds_count 1\n");
    esmd_buf_free(&out);
}

/* esmd_histogram_quantile: linear within the bucket, over several series, -1 when empty. */
static void test_histogram_quantile(void **state)
{
    (void)state;
    struct esmd_metric *h = esmd_metric(ESMD_HISTOGRAM, "q_seconds", "q");
    struct esmd_series *a = esmd_series(h, "m=\"a\""), *b = esmd_series(h, "m=\"b\"");
    const struct esmd_series *both[] = {a, b, NULL};

    assert_true(esmd_histogram_quantile(both, 2, 0.5) < 0);
    for (int i = 0; i < 50; i++)
        esmd_series_observe(a, 0.003); /* bucket (0, 0.005] */
    for (int i = 0; i < 50; i++)
        esmd_series_observe(b, 0.2); /* bucket (0.1, 0.25] */
    /* the median is the top of the first bucket; p99 is 98% into the second */
    assert_float_equal(esmd_histogram_quantile(both, 2, 0.5), 0.005, 1e-9);
    assert_float_equal(esmd_histogram_quantile(both, 3, 0.99), 0.1 + 0.15 * 0.98, 1e-9);
    assert_float_equal(esmd_histogram_quantile(both, 1, 0.99), 0.005 * 0.99, 1e-9);
    esmd_series_observe(b, 1000); /* over the last bound: that bound */
    assert_float_equal(esmd_histogram_quantile(both + 1, 1, 1.0), 60, 1e-9);
}

/* A removed mapping's series leave the exposition (every family, only that mapping: not a
 * mapping whose name merely contains it, nor one whose other label holds it), and come back
 * with their values once looked up or updated again. */
static void test_hide(void **state)
{
    struct esmd_metric *c = esmd_metric(ESMD_COUNTER, "t_total", "T.");
    struct esmd_metric *g = esmd_metric(ESMD_GAUGE, "t_gauge", "G.");
    struct esmd_metric *h = esmd_metric(ESMD_HISTOGRAM, "t_seconds", "H.");
    struct esmd_buf out = ESMD_BUF_INIT;

    (void)state;
    struct esmd_series *gone = esmd_series(c, "function=\"f\",mapping=\"m1\"");
    struct esmd_series *gauge = esmd_series(g, "mapping=\"m1\"");
    esmd_series_observe(esmd_series(h, "mapping=\"m1\",function=\"f\""), 0.1);
    esmd_series_inc(gone, 3);
    esmd_series_set(gauge, 7);
    esmd_series_inc(esmd_series(c, "function=\"f\",mapping=\"m10\""), 1);
    esmd_series_inc(esmd_series(c, "function=\"mapping=\\\"m1\\\"\""), 1);
    assert_int_equal(esmd_metrics_hide("mapping", "m1"), 3);
    assert_int_equal(esmd_metrics_hide("mapping", "m1"), 0); /* already hidden */
    esmd_metrics_render(&out);
    const char *text = esmd_buf_cstr(&out);
    assert_null(strstr(text, "mapping=\"m1\"}"));
    assert_null(strstr(text, "mapping=\"m1\","));
    assert_null(strstr(text, "t_gauge")); /* no series left: no HELP or TYPE either */
    assert_null(strstr(text, "t_seconds"));
    assert_non_null(strstr(text, "t_total{function=\"f\",mapping=\"m10\"} 1\n"));
    assert_non_null(strstr(text, "t_total{function=\"mapping=\\\"m1\\\"\"} 1\n"));
    /* back: updated, or looked up again (the mapping added back) */
    esmd_series_inc(gone, 1);
    assert_ptr_equal(esmd_series(g, "mapping=\"m1\""), gauge);
    esmd_buf_reset(&out);
    esmd_metrics_render(&out);
    text = esmd_buf_cstr(&out);
    assert_non_null(strstr(text, "t_total{function=\"f\",mapping=\"m1\"} 4\n"));
    assert_non_null(strstr(text, "t_gauge{mapping=\"m1\"} 7\n"));
    assert_null(strstr(text, "t_seconds"));
    esmd_buf_free(&out);
}

/* Labels of mapping name (function "f"). */
static const char *mapping_labels(struct esmd_buf *b, const char *name)
{
    esmd_buf_reset(b);
    esmd_metric_labels(b, "function", "f", "mapping", name, NULL);
    return esmd_buf_cstr(b);
}

/* Mappings removed (and some added back) over and over, as reloads do: the hidden series kept
 * stay at most ESMD_METRICS_HIDDEN_MAX (they once all stayed, about 20 a removed mapping name,
 * for good), what the exposition shows does not change, the last hidden come back with their
 * values and the oldest (freed) start anew. */
static void test_hidden_series_are_bounded(void **state)
{
    struct esmd_metric *c = esmd_metric(ESMD_COUNTER, "t_total", "T.");
    struct esmd_metric *g = esmd_metric(ESMD_GAUGE, "t_gauge", "G.");
    struct esmd_metric *h = esmd_metric(ESMD_HISTOGRAM, "t_seconds", "H.");
    struct esmd_buf l = ESMD_BUF_INIT, before = ESMD_BUF_INIT, after = ESMD_BUF_INIT;
    char name[32];
    const int rounds = ESMD_METRICS_HIDDEN_MAX; /* 3 series each: 3x the bound hidden */

    (void)state;
    esmd_series_inc(esmd_series(c, mapping_labels(&l, "live")), 5);
    esmd_series_set(esmd_series(g, mapping_labels(&l, "live")), 2);
    esmd_series_observe(esmd_series(h, mapping_labels(&l, "live")), 0.3);
    esmd_metrics_render(&before);
    for (int r = 0; r < rounds; r++) {
        snprintf(name, sizeof(name), "m%d", r);
        esmd_series_inc(esmd_series(c, mapping_labels(&l, name)), r + 1);
        esmd_series_set(esmd_series(g, mapping_labels(&l, name)), 1);
        esmd_series_observe(esmd_series(h, mapping_labels(&l, name)), 0.01);
        /* "back" comes back every round: its series go on, it never ages out */
        esmd_series_inc(esmd_series(c, mapping_labels(&l, "back")), 1);
        assert_int_equal(esmd_metrics_hide("mapping", name), 3);
        assert_int_equal(esmd_metrics_hide("mapping", "back"), 1);
        assert_true(esmd_metrics_hidden() <= ESMD_METRICS_HIDDEN_MAX);
    }
    assert_int_equal(esmd_metrics_hidden(), ESMD_METRICS_HIDDEN_MAX);
    esmd_metrics_render(&after);
    assert_string_equal(esmd_buf_cstr(&after), esmd_buf_cstr(&before));

    /* the last removed comes back with its values; "back" with all of its rounds */
    snprintf(name, sizeof(name), "m%d", rounds - 1);
    assert_float_equal(esmd_series_value(esmd_series(c, mapping_labels(&l, name))), rounds, 1e-9);
    assert_float_equal(esmd_series_value(esmd_series(h, mapping_labels(&l, name))), 1, 1e-9);
    assert_float_equal(esmd_series_value(esmd_series(c, mapping_labels(&l, "back"))), rounds, 1e-9);
    /* the first removed was freed: it starts anew */
    assert_float_equal(esmd_series_value(esmd_series(c, mapping_labels(&l, "m0"))), 0, 1e-9);
    assert_float_equal(esmd_series_value(esmd_series(g, mapping_labels(&l, "m0"))), 0, 1e-9);
    assert_int_equal(esmd_metrics_hidden(), ESMD_METRICS_HIDDEN_MAX - 3);
    esmd_buf_reset(&after);
    esmd_metrics_render(&after);
    assert_non_null(strstr(esmd_buf_cstr(&after), "t_total{function=\"f\",mapping=\"m0\"} 0\n"));
    assert_non_null(strstr(esmd_buf_cstr(&after), "t_total{function=\"f\",mapping=\"live\"} 5\n"));
    esmd_buf_free(&l);
    esmd_buf_free(&before);
    esmd_buf_free(&after);
}

/* esmd_metric_sum / esmd_metric_quantile: over the series holding the pair, hidden ones too. */
static void test_metric_sum_and_quantile(void **state)
{
    struct esmd_metric *c = esmd_metric(ESMD_COUNTER, "t_total", "T.");
    struct esmd_metric *h = esmd_metric(ESMD_HISTOGRAM, "t_seconds", "H.");

    (void)state;
    assert_float_equal(esmd_metric_sum(c, "function", "f"), 0, 1e-9);
    assert_true(esmd_metric_quantile(h, "function", "f", 0.5) < 0);
    esmd_series_inc(esmd_series(c, "function=\"f\",mapping=\"a\""), 2);
    esmd_series_inc(esmd_series(c, "function=\"f\",mapping=\"b\""), 3);
    esmd_series_inc(esmd_series(c, "function=\"f2\",mapping=\"a\""), 100);
    esmd_series_inc(esmd_series(c, "function=\"f\""), 1);
    for (int i = 0; i < 50; i++) {
        esmd_series_observe(esmd_series(h, "function=\"f\",mapping=\"a\""), 0.001);
        esmd_series_observe(esmd_series(h, "function=\"f\",mapping=\"b\""), 0.2);
        esmd_series_observe(esmd_series(h, "function=\"f2\""), 50);
    }
    assert_int_equal(esmd_metrics_hide("mapping", "b"), 2);
    assert_float_equal(esmd_metric_sum(c, "function", "f"), 6, 1e-9);
    assert_float_equal(esmd_metric_sum(c, "mapping", "a"), 102, 1e-9);
    assert_float_equal(esmd_metric_sum(h, "function", "f"), 100, 1e-9);
    assert_float_equal(esmd_metric_quantile(h, "function", "f", 0.5), 0.005, 1e-9);
    assert_float_equal(esmd_metric_quantile(h, "function", "f", 0.99), 0.1 + 0.15 * 0.98, 1e-9);
    assert_true(esmd_metric_quantile(c, "function", "f", 0.5) < 0); /* not a histogram */
    assert_float_equal(esmd_metric_sum(NULL, "function", "f"), 0, 1e-9);
}

static void test_reset(void **state)
{
    struct esmd_buf out = ESMD_BUF_INIT;

    (void)state;
    esmd_series_inc(esmd_series(esmd_metric(ESMD_COUNTER, "esmd_x_total", "X."), ""), 1);
    esmd_metrics_reset();
    esmd_metrics_render(&out);
    assert_int_equal(out.len, 0);
    esmd_buf_free(&out);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test_teardown(test_labels_escaping, teardown),
        cmocka_unit_test_teardown(test_counter_gauge_render, teardown),
        cmocka_unit_test_teardown(test_histogram_render, teardown),
        cmocka_unit_test_teardown(test_histogram_quantile, teardown),
        cmocka_unit_test_teardown(test_hide, teardown),
        cmocka_unit_test_teardown(test_hidden_series_are_bounded, teardown),
        cmocka_unit_test_teardown(test_metric_sum_and_quantile, teardown),
        cmocka_unit_test_teardown(test_reset, teardown),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
