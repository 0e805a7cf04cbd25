/* Unit tests for src/config_diff.c: what a reload applies in place, what restarts a mapping,
 * what needs a restart of esmd (docs/operations.md#reload), and that every custom key of the
 * tables is compared. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "testutil.h"

#include "esmd/config.h"
#include "esmd/connector.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* A file with three mappings (kafka, redis, pgqueue) on two connections and one function; the
 * placeholders %s are filled with per-test text (sections or keys). */
static const char base[] = "postgres: postgresql://db/esmd\n"
                           "%s"
                           "connections:\n"
                           "  k: { type: kafka, bootstrap_servers: 'b:9092'%s }\n"
                           "  r: { type: redis, url: 'redis://r:6379/0' }\n"
                           "functions:\n"
                           "  fn: { url: 'http://f/'%s }\n"
                           "%s"
                           "mappings:\n"
                           "  - name: ka\n"
                           "    function: %s\n"
                           "    source: { kafka: k, topics: [t]%s }\n"
                           "%s"
                           "  - name: re\n"
                           "    function: fn\n"
                           "    source: { redis: r, stream: s, group: g }\n"
                           "  - name: pq\n"
                           "    function: fn\n"
                           "    source: { pgqueue: q }\n"
                           "%s";

struct parts {
    const char *top, *kconn, *fn, *fn2, *kfn, *ksrc, *kmap, *more;
};

static struct esmd_config *load(struct parts p)
{
    char text[8192];
    snprintf(text, sizeof(text), base, p.top ? p.top : "", p.kconn ? p.kconn : "", p.fn ? p.fn : "",
             p.fn2 ? p.fn2 : "", p.kfn ? p.kfn : "fn", p.ksrc ? p.ksrc : "", p.kmap ? p.kmap : "",
             p.more ? p.more : "");
    struct esmd_config_errors errs;
    esmd_config_errors_init(&errs);
    struct esmd_config *cfg = esmd_config_parse(text, strlen(text), "t.yaml", &errs);
    if (!cfg) {
        char line[1024];
        for (size_t i = 0; i < errs.n; i++) {
            esmd_config_error_format(&errs.items[i], line, sizeof(line));
            fprintf(stderr, "%s\n", line);
        }
    }
    esmd_config_errors_free(&errs);
    assert_non_null(cfg);
    return cfg;
}

static void diff(struct parts a, struct parts b, struct esmd_config_diff *d,
                 struct esmd_config **olda, struct esmd_config **newb)
{
    *olda = load(a);
    *newb = load(b);
    esmd_config_diff(*olda, *newb, d);
}

static void done(struct esmd_config_diff *d, struct esmd_config *a, struct esmd_config *b)
{
    esmd_config_diff_free(d);
    esmd_config_free(a);
    esmd_config_free(b);
}

static void test_same_file_changes_nothing(void **state)
{
    (void)state;
    struct esmd_config_diff d;
    struct esmd_config *a, *b;
    diff((struct parts){0}, (struct parts){0}, &d, &a, &b);
    assert_int_equal(d.nmappings, 3);
    for (size_t i = 0; i < d.nmappings; i++) {
        assert_int_equal(d.mappings[i].action, ESMD_RELOAD_SAME);
        assert_null(d.mappings[i].keys);
    }
    assert_int_equal(d.nremoved, 0);
    assert_int_equal(d.functions[0].action, ESMD_RELOAD_SAME);
    assert_int_equal(d.nrestart, 0);
    done(&d, a, b);
}

static void test_settings_apply_in_place(void **state)
{
    (void)state;
    struct esmd_config_diff d;
    struct esmd_config *a, *b;
    diff((struct parts){0},
         (struct parts){.kmap = "    batch_size: 7\n    filters: [{value: {a: [1]}}]\n"
                                "    maximum_retry_attempts: 3\n    enabled: false\n"},
         &d, &a, &b);
    assert_int_equal(d.mappings[0].action, ESMD_RELOAD_UPDATE);
    assert_string_equal(d.mappings[0].keys, "enabled, batch_size, filters, maximum_retry_attempts");
    assert_int_equal(d.mappings[1].action, ESMD_RELOAD_SAME);
    assert_int_equal(d.nrestart, 0);
    done(&d, a, b);
    /* the source's parallelization_factor: in place (the shards are re-laned), unless another
     * source key changed too */
    diff((struct parts){0}, (struct parts){.ksrc = ", parallelization_factor: 4"}, &d, &a, &b);
    assert_int_equal(d.mappings[0].action, ESMD_RELOAD_UPDATE);
    assert_string_equal(d.mappings[0].keys, "source.parallelization_factor");
    done(&d, a, b);
    diff((struct parts){.ksrc = ", parallelization_factor: 4"},
         (struct parts){.ksrc = ", parallelization_factor: 3, consumer_group: other"}, &d, &a, &b);
    assert_int_equal(d.mappings[0].action, ESMD_RELOAD_RESTART);
    assert_string_equal(d.mappings[0].keys, "source.parallelization_factor, source");
    done(&d, a, b);
}

static void test_source_connection_and_function_restart_the_mapping(void **state)
{
    (void)state;
    struct esmd_config_diff d;
    struct esmd_config *a, *b;
    /* a source key */
    diff((struct parts){0}, (struct parts){.ksrc = ", consumer_group: other"}, &d, &a, &b);
    assert_int_equal(d.mappings[0].action, ESMD_RELOAD_RESTART);
    assert_string_equal(d.mappings[0].keys, "source");
    done(&d, a, b);
    /* the schema registry: added, a key inside it changed, or unchanged */
    const char *sr1 = ", schema_registry: { url: 'http://sr:8081', validate: [key, value] }";
    const char *sr2 = ", schema_registry: { url: 'http://sr:8081', validate: [value] }";
    diff((struct parts){0}, (struct parts){.ksrc = sr1}, &d, &a, &b);
    assert_int_equal(d.mappings[0].action, ESMD_RELOAD_RESTART);
    assert_string_equal(d.mappings[0].keys, "source");
    done(&d, a, b);
    diff((struct parts){.ksrc = sr1}, (struct parts){.ksrc = sr2}, &d, &a, &b);
    assert_int_equal(d.mappings[0].action, ESMD_RELOAD_RESTART);
    done(&d, a, b);
    diff((struct parts){.ksrc = sr1}, (struct parts){.ksrc = sr1}, &d, &a, &b);
    assert_int_equal(d.mappings[0].action, ESMD_RELOAD_SAME);
    done(&d, a, b);
    /* the connection it uses: only the kafka mapping */
    diff((struct parts){0}, (struct parts){.kconn = ", properties: { client.id: x }"}, &d, &a, &b);
    assert_int_equal(d.mappings[0].action, ESMD_RELOAD_RESTART);
    assert_int_equal(d.mappings[1].action, ESMD_RELOAD_SAME);
    assert_int_equal(d.mappings[2].action, ESMD_RELOAD_SAME);
    done(&d, a, b);
    /* another function */
    const char *other = "  other: { url: 'http://o/' }\n";
    diff((struct parts){.fn2 = other}, (struct parts){.fn2 = other, .kfn = "other"}, &d, &a, &b);
    assert_int_equal(d.mappings[0].action, ESMD_RELOAD_RESTART);
    assert_string_equal(d.mappings[0].keys, "function");
    assert_int_equal(d.functions[1].action, ESMD_RELOAD_SAME);
    done(&d, a, b);
}

static void test_mappings_added_and_removed(void **state)
{
    (void)state;
    struct esmd_config_diff d;
    struct esmd_config *a, *b;
    const char *extra = "  - name: more\n    function: fn\n    source: { pgqueue: q2 }\n";
    diff((struct parts){.more = extra}, (struct parts){0}, &d, &a, &b);
    assert_int_equal(d.nremoved, 1);
    assert_true(d.removed[3]);
    assert_false(d.removed[0]);
    done(&d, a, b);
    diff((struct parts){0}, (struct parts){.more = extra}, &d, &a, &b);
    assert_int_equal(d.nremoved, 0);
    assert_int_equal(d.mappings[3].action, ESMD_RELOAD_ADD);
    done(&d, a, b);
}

static void test_function_settings_and_restart_keys(void **state)
{
    (void)state;
    struct esmd_config_diff d;
    struct esmd_config *a, *b;
    diff((struct parts){0},
         (struct parts){.top = "admin: { listen: '127.0.0.1:9999' }\n",
                        .fn = ", timeout: 5s, headers: { X-A: b }, async: { "
                              "maximum_retry_attempts: 0 }"},
         &d, &a, &b);
    assert_int_equal(d.functions[0].action, ESMD_RELOAD_UPDATE);
    assert_string_equal(d.functions[0].keys, "timeout, headers, async");
    assert_int_equal(d.nrestart, 1);
    assert_string_equal(d.restart[0], "admin.listen");
    for (size_t i = 0; i < d.nmappings; i++)
        assert_int_equal(d.mappings[i].action, ESMD_RELOAD_SAME);
    /* what needs a restart keeps its old value in the new tree; `async` applies */
    esmd_config_keep_restart_keys(b, a);
    assert_string_equal(b->admin.listen, a->admin.listen);
    assert_int_equal(b->functions[0].async.maximum_retry_attempts, 0);
    assert_int_equal(b->functions[0].timeout_ms, 5000); /* applies */
    assert_ptr_equal(b->mappings[2].pgqueue.service_postgres, b->postgres);
    done(&d, a, b);
    /* a new function: serves mappings and Invoke at once */
    diff((struct parts){0}, (struct parts){.fn2 = "  other: { url: 'http://o/' }\n"}, &d, &a, &b);
    assert_int_equal(d.nfunctions, 2);
    assert_int_equal(d.functions[1].action, ESMD_RELOAD_ADD);
    assert_int_equal(d.nrestart, 0);
    done(&d, a, b);
}

static bool routable_http_only(void *ud, const char *uri)
{
    (void)ud;
    return strncmp(uri, "http", 4) == 0;
}

/* An `async` destination the running router cannot store keeps its old value, named as needing
 * a restart; one it can store applies. */
static void test_unroutable_async_destination_waits_for_a_restart(void **state)
{
    (void)state;
    struct esmd_config_diff d;
    struct esmd_config *a, *b;
    diff((struct parts){.fn = ", async: { on_failure: 'http://old/' }"},
         (struct parts){.fn = ", async: { on_failure: 'pgqueue://f', on_success: 'http://s/' }"},
         &d, &a, &b);
    esmd_config_keep_unroutable(b, a, routable_http_only, NULL, &d);
    assert_int_equal(d.nrestart, 1);
    assert_string_equal(d.restart[0], "functions.fn.async.on_failure");
    assert_string_equal(b->functions[0].async.on_failure, "http://old/");
    assert_string_equal(b->functions[0].async.on_success, "http://s/");
    done(&d, a, b);
}

static void test_every_custom_key_is_compared(void **state)
{
    (void)state;
    static const char *const sections[] = {"mappings", "functions"};
    for (size_t s = 0; s < 2; s++) {
        size_t n;
        const struct esmd_cfg_key *t = esmd_config_keys(sections[s], &n);
        assert_true(n > 0);
        for (size_t i = 0; i < n; i++)
            if (t[i].type == ESMD_CFG_CUSTOM && !esmd_config_diff_knows(sections[s], t[i].name))
                fail_msg("%s.%s: a custom key src/config_diff.c does not compare", sections[s],
                         t[i].name);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_same_file_changes_nothing),
        cmocka_unit_test(test_settings_apply_in_place),
        cmocka_unit_test(test_source_connection_and_function_restart_the_mapping),
        cmocka_unit_test(test_mappings_added_and_removed),
        cmocka_unit_test(test_function_settings_and_restart_keys),
        cmocka_unit_test(test_unroutable_async_destination_waits_for_a_restart),
        cmocka_unit_test(test_every_custom_key_is_compared),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
