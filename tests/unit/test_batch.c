/* Batching decisions: count, exact event size, the 6 MB boundary, shard grouping. */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "../../src/batch_private.h" /* builds shards as the core does */

#include <string.h>

static struct esmd_shard make_shard(const char *key, size_t overhead)
{
    struct esmd_shard s;
    memset(&s, 0, sizeof(s));
    s.key = (char *)key;
    s.overhead = overhead;
    return s;
}

static struct esmd_record make_rec(struct esmd_shard *s, int64_t seq, size_t size)
{
    struct esmd_record r;
    memset(&r, 0, sizeof(r));
    r.shard = s;
    r.seq = seq;
    r.size = size;
    return r;
}

static void test_count_limit(void **state)
{
    struct esmd_batch_limits lim = {3, ESMD_MAX_PAYLOAD, 10, true};
    struct esmd_batch b;
    esmd_batch_init(&b, &lim);
    struct esmd_shard s = make_shard("t-0", 8);
    struct esmd_record r[4];
    for (int i = 0; i < 4; i++)
        r[i] = make_rec(&s, i, 5);
    for (int i = 0; i < 3; i++) {
        assert_int_equal(esmd_batch_check(&b, &r[i]), ESMD_BATCH_FITS);
        assert_false(esmd_batch_count_reached(&b));
        esmd_batch_add(&b, &r[i]);
    }
    assert_true(esmd_batch_count_reached(&b));
    assert_int_equal(esmd_batch_check(&b, &r[3]), ESMD_BATCH_FULL);
    assert_int_equal(b.nrecords, 3);
    assert_int_equal(b.ngroups, 1);
    assert_int_equal(b.groups[0].ack_seq, 3);
    esmd_batch_clear(&b);
}

/* {"records":{}} is the envelope (10); `"t-0":[]` the group (8); records 5 bytes; commas. */
static void test_exact_bytes_grouped(void **state)
{
    struct esmd_batch_limits lim = {100, ESMD_MAX_PAYLOAD, 10, true};
    struct esmd_batch b;
    esmd_batch_init(&b, &lim);
    assert_int_equal(esmd_batch_bytes(&b), 10);
    struct esmd_shard s0 = make_shard("t-0", 8), s1 = make_shard("t-1", 8);
    struct esmd_record a = make_rec(&s0, 0, 5), c = make_rec(&s0, 1, 5), d = make_rec(&s1, 7, 5);
    esmd_batch_add(&b, &a);
    assert_int_equal(esmd_batch_bytes(&b), 10 + 8 + 5);
    esmd_batch_add(&b, &d);
    assert_int_equal(esmd_batch_bytes(&b), 10 + 8 + 5 + 1 + 8 + 5);
    assert_int_equal(esmd_batch_bytes_with(&b, &c), 10 + 8 + 5 + 1 + 8 + 5 + 1 + 5);
    esmd_batch_add(&b, &c);
    assert_int_equal(b.ngroups, 2);
    assert_ptr_equal(b.groups[0].head, &a);
    assert_ptr_equal(b.groups[0].tail, &c);
    assert_int_equal(b.groups[0].n, 2);
    assert_int_equal(b.groups[1].n, 1);
    /* removing a revoked shard gives its records back and the exact size shrinks */
    struct esmd_record *gone = esmd_batch_remove_shard(&b, &s0);
    assert_ptr_equal(gone, &a);
    assert_int_equal(esmd_batch_bytes(&b), 10 + 8 + 5);
    assert_int_equal(b.nrecords, 1);
    esmd_batch_clear(&b);
}

static void test_exact_bytes_flat(void **state)
{
    struct esmd_batch_limits lim = {100, ESMD_MAX_PAYLOAD, 14, false};
    struct esmd_batch b;
    esmd_batch_init(&b, &lim);
    struct esmd_shard s0 = make_shard("a", 99), s1 = make_shard("b", 99);
    struct esmd_record a = make_rec(&s0, 0, 5), c = make_rec(&s1, 0, 7);
    esmd_batch_add(&b, &a);
    assert_int_equal(esmd_batch_bytes(&b), 14 + 5);
    esmd_batch_add(&b, &c);
    assert_int_equal(esmd_batch_bytes(&b), 14 + 5 + 1 + 7);
    assert_non_null(esmd_batch_remove_shard(&b, &s0));
    assert_int_equal(esmd_batch_bytes(&b), 14 + 7);
    esmd_batch_clear(&b);
}

/* The 6 MB boundary: a batch may reach exactly ESMD_MAX_PAYLOAD bytes, never one more. */
static void test_payload_boundary(void **state)
{
    const size_t env = 100, ovh = 10;
    struct esmd_batch_limits lim = {10000, ESMD_MAX_PAYLOAD, env, true};
    struct esmd_batch b;
    esmd_batch_init(&b, &lim);
    struct esmd_shard s = make_shard("t-0", ovh);
    /* two records filling the cap exactly: env + ovh + r1 + 1 + r2 == cap */
    size_t r1 = 3000000;
    size_t r2 = ESMD_MAX_PAYLOAD - env - ovh - r1 - 1;
    struct esmd_record a = make_rec(&s, 0, r1), c = make_rec(&s, 1, r2);
    esmd_batch_add(&b, &a);
    assert_int_equal(esmd_batch_check(&b, &c), ESMD_BATCH_FITS);
    esmd_batch_add(&b, &c);
    assert_int_equal(esmd_batch_bytes(&b), ESMD_MAX_PAYLOAD);
    struct esmd_record tiny = make_rec(&s, 2, 1);
    assert_int_equal(esmd_batch_check(&b, &tiny), ESMD_BATCH_FULL);
    esmd_batch_clear(&b);

    /* one byte more than fits: full, and the record starts the next batch */
    esmd_batch_init(&b, &lim);
    struct esmd_record c2 = make_rec(&s, 1, r2 + 1);
    esmd_batch_add(&b, &a);
    assert_int_equal(esmd_batch_check(&b, &c2), ESMD_BATCH_FULL);
    esmd_batch_clear(&b);
    assert_int_equal(esmd_batch_check(&b, &c2), ESMD_BATCH_FITS);

    /* a record that alone makes the event exactly the cap fits; one byte more can never */
    struct esmd_record whole = make_rec(&s, 3, ESMD_MAX_PAYLOAD - env - ovh);
    assert_int_equal(esmd_batch_check(&b, &whole), ESMD_BATCH_FITS);
    struct esmd_record over = make_rec(&s, 4, ESMD_MAX_PAYLOAD - env - ovh + 1);
    assert_int_equal(esmd_batch_check(&b, &over), ESMD_BATCH_TOO_BIG);
    esmd_batch_add(&b, &a);
    assert_int_equal(esmd_batch_check(&b, &over), ESMD_BATCH_TOO_BIG);
    esmd_batch_clear(&b);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_count_limit),
        cmocka_unit_test(test_exact_bytes_grouped),
        cmocka_unit_test(test_exact_bytes_flat),
        cmocka_unit_test(test_payload_boundary),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
