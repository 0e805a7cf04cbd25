/* libFuzzer target for the filter engine: compiling any pattern text and matching any event
 * bytes must give an answer, never a crash, a leak or undefined behaviour, and the API's answers
 * must agree with each other. The input is PATTERN, a newline or NUL, then EVENT (no separator:
 * all pattern, empty event). Seeds: tests/fuzz/corpus/filter (cases of the conformance corpus).
 *   cmake -S . -B build-fuzz -DCMAKE_C_COMPILER=clang -DESMD_FUZZ=ON
 *   cmake --build build-fuzz --target fuzz_filter
 *   ./build-fuzz/fuzz_filter -max_total_time=60 tests/fuzz/corpus/filter
 */
#include "esmd/filter.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* An error must point inside (or just past) the pattern and say something. */
static void check_error(const struct esmd_filter_error *err, size_t len)
{
    if (err->offset > len || err->line < 1 || err->column < 1)
        abort();
    if (memchr(err->message, '\0', sizeof(err->message)) == NULL || err->message[0] == '\0')
        abort();
}

/* match and match_all agree, ids name only added patterns, and a second run gives the same. */
static void check_match(struct esmd_filter *f, const char *event, size_t len, const uint32_t *known,
                        size_t nknown)
{
    uint32_t ids[4];
    int n = esmd_filter_match_all(f, event, len, ids, 4);
    if (n < -1 || (n >= 0 && (size_t)n > esmd_filter_count_patterns(f)))
        abort();
    for (int i = 0; i < n && i < 4; i++) {
        bool ok = false;
        for (size_t k = 0; k < nknown; k++)
            ok = ok || ids[i] == known[k];
        if (!ok)
            abort();
    }
    if (esmd_filter_match(f, event, len) != (n > 0))
        abort();
    if (esmd_filter_match_all(f, event, len, NULL, 0) != n)
        abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    const char *in = (const char *)data;
    size_t plen = 0;
    while (plen < size && in[plen] != '\n' && in[plen] != '\0')
        plen++;
    const char *event = plen < size ? in + plen + 1 : in + size;
    size_t elen = plen < size ? size - plen - 1 : 0;

    /* Copies without a terminating NUL, so ASan sees any read past `len`. */
    char *pattern = malloc(plen ? plen : 1);
    char *ev = malloc(elen ? elen : 1);
    if (!pattern || !ev)
        abort();
    memcpy(pattern, in, plen);
    memcpy(ev, event, elen);

    struct esmd_filter_error err, check_err;
    memset(&check_err, 0, sizeof(check_err));
    int checked = esmd_filter_check(pattern, plen, &check_err);
    if (checked != 0)
        check_error(&check_err, plen);

    /* A mapping's budget: a pattern that passes alone passes against a full budget and takes
     * no more of it than a pattern's limit. */
    size_t budget = ESMD_FILTER_MAX_MAPPING_BYTES;
    struct esmd_filter_error budget_err;
    int budgeted = esmd_filter_check_budget(pattern, plen, &budget, &budget_err);
    if ((budgeted == 0) != (checked == 0))
        abort();
    if (budgeted == 0 && ESMD_FILTER_MAX_MAPPING_BYTES - budget > ESMD_FILTER_MAX_PATTERN_BYTES)
        abort();
    if (budgeted != 0)
        check_error(&budget_err, plen);

    struct esmd_filter *f = esmd_filter_new();
    if (!f)
        abort();
    uint32_t known[2] = {7, 8};
    memset(&err, 0, sizeof(err));
    int added = esmd_filter_add(f, pattern, plen, 7, &err);
    /* Checking and adding judge a pattern the same way, at the same place. */
    if ((added == 0) != (checked == 0))
        abort();
    if (added != 0) {
        check_error(&err, plen);
        if (err.offset != check_err.offset || strcmp(err.message, check_err.message) != 0)
            abort();
        if (esmd_filter_count_patterns(f) != 0)
            abort();
    } else if (esmd_filter_count_patterns(f) != 1) {
        abort();
    }

    /* The Kafka fallback: the same pattern without "value" and "key" (refused no more often). */
    static const char *const skip[] = {"value", "key", NULL};
    size_t before = esmd_filter_count_patterns(f);
    memset(&err, 0, sizeof(err));
    int skipped = esmd_filter_add_skip(f, pattern, plen, 8, skip, &err);
    if (added == 0 && skipped != 0)
        abort();
    if (skipped != 0)
        check_error(&err, plen);
    if (esmd_filter_count_patterns(f) != before + (skipped == 0))
        abort();

    check_match(f, ev, elen, known, 2);
    check_match(f, ev, elen, known, 2);
    /* The pattern text is itself a JSON object: matching it exercises the scanner too. */
    check_match(f, pattern, plen, known, 2);

    esmd_filter_free(f);
    free(pattern);
    free(ev);
    return 0;
}
