/* The filter engine against the shared conformance corpus (tests/unit/data/filter/
 * filter-corpus.jsonl, the project's conformance cases for the pattern language): one case a line,
 * {"id", "feature", "pattern", "event", "match", "verified": {ENGINE:
 * true|false|"unsupported..."}}.
 *
 * A case is disputed when its feature is "disputed", or when the engines that gave a verdict
 * disagree with each other or with "match". Every other case must give "match". Disputed cases
 * must give the choice written down in docs/filters.md (table `choices` below); a disputed case
 * without a recorded choice is reported, not failed.
 *
 * The pattern and the event are handed to the engine as their exact bytes in the line (not as
 * cJSON re-serialized them): duplicate keys and \u escapes are part of what is tested.
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <cmocka.h>

#include "esmd/filter.h"

#include <cjson/cJSON.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define CORPUS ESMD_TEST_DATA "/filter/filter-corpus.jsonl"

/* Our answer for each disputed case (docs/filters.md, "Disputed cases"). */
static const struct {
    int id;
    bool match;
} choices[] = {
    {236, true},  /* exists:false is array-consistent (event-ruler) */
    {348, true},  /* exists:true + exists:false in one array element (event-ruler) */
    {389, true},  /* 35.0 equals 35: numbers compare by value (event-ruler, quamina) */
    {390, true},  /* numeric ranges use the full double range */
    {391, false}, /* numeric keeps full double precision */
    {392, true},  /* IP-address strings compare by address (event-ruler) */
    {405, true},  /* duplicate keys in a pattern: the last one wins */
    {406, true},  /* "a.b" in a pattern is the path a -> b (event-ruler) */
};

/* Skips one JSON value in s starting at i (whitespace allowed before it); returns the index
 * just past it, or 0 if the text is malformed. Enough for the corpus lines, which are valid. */
static size_t skip_json(const char *s, size_t n, size_t i)
{
    int depth = 0;
    while (i < n && (s[i] == ' ' || s[i] == '\t'))
        i++;
    do {
        if (i >= n)
            return 0;
        char c = s[i];
        if (c == '"') {
            for (i++; i < n && s[i] != '"'; i++)
                if (s[i] == '\\')
                    i++;
            i++;
        } else if (c == '{' || c == '[') {
            depth++;
            i++;
        } else if (c == '}' || c == ']') {
            depth--;
            i++;
        } else if (depth == 0) {
            while (i < n && s[i] != ',' && s[i] != '}' && s[i] != ']')
                i++;
        } else {
            i++;
        }
    } while (depth > 0);
    return i;
}

/* Finds the raw text of the top-level member `key` of the JSON object in line. */
static bool member_span(const char *line, size_t n, const char *key, const char **out,
                        size_t *outlen)
{
    size_t klen = strlen(key);
    size_t i = 1; /* past '{' */
    while (i < n) {
        while (i < n && (line[i] == ' ' || line[i] == ','))
            i++;
        if (i >= n || line[i] != '"')
            return false;
        size_t kstart = i + 1;
        size_t kend = skip_json(line, n, i);
        if (!kend)
            return false;
        i = kend;
        while (i < n && (line[i] == ' ' || line[i] == ':'))
            i++;
        size_t vstart = i, vend = skip_json(line, n, i);
        if (!vend)
            return false;
        if (kend - 1 - kstart == klen && memcmp(line + kstart, key, klen) == 0) {
            *out = line + vstart;
            *outlen = vend - vstart;
            return true;
        }
        i = vend;
    }
    return false;
}

static bool is_disputed(const cJSON *c)
{
    const cJSON *feature = cJSON_GetObjectItemCaseSensitive(c, "feature");
    if (cJSON_IsString(feature) && strcmp(feature->valuestring, "disputed") == 0)
        return true;
    if (cJSON_GetObjectItemCaseSensitive(c, "disputed"))
        return true;
    bool want = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(c, "match"));
    const cJSON *v, *verified = cJSON_GetObjectItemCaseSensitive(c, "verified");
    cJSON_ArrayForEach(v, verified)
    {
        if (cJSON_IsBool(v) && (bool)cJSON_IsTrue(v) != want)
            return true;
    }
    return false;
}

static void test_corpus(void **state)
{
    FILE *fp = fopen(CORPUS, "rb");
    assert_non_null(fp);
    char *line = NULL;
    size_t cap = 0;
    ssize_t got;
    int total = 0, undisputed = 0, passed = 0, disputed = 0, disputed_as_chosen = 0;
    char failed[4096] = "", disputed_ids[1024] = "";
    while ((got = getline(&line, &cap, fp)) > 0) {
        size_t n = (size_t)got;
        while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r'))
            n--;
        if (n == 0)
            continue;
        cJSON *c = cJSON_ParseWithLength(line, n);
        assert_non_null(c);
        const cJSON *jid = cJSON_GetObjectItemCaseSensitive(c, "id");
        assert_true(cJSON_IsNumber(jid));
        int id = jid->valueint;
        bool want = cJSON_IsTrue(cJSON_GetObjectItemCaseSensitive(c, "match"));
        const char *pat, *ev;
        size_t plen, elen;
        assert_true(member_span(line, n, "pattern", &pat, &plen));
        assert_true(member_span(line, n, "event", &ev, &elen));
        total++;

        struct esmd_filter *f = esmd_filter_new();
        struct esmd_filter_error err;
        memset(&err, 0, sizeof(err));
        int rc = esmd_filter_add(f, pat, plen, 1, &err);
        bool got_match = false;
        if (rc != 0)
            fprintf(stderr, "case %d: pattern refused at %d:%d: %s\n", id, err.line, err.column,
                    err.message);
        else
            got_match = esmd_filter_match(f, ev, elen);
        uint32_t ids[2];
        int nm = rc == 0 ? esmd_filter_match_all(f, ev, elen, ids, 2) : -1;
        assert_int_equal(rc == 0 && nm > 0, got_match);
        esmd_filter_free(f);

        char idbuf[16];
        snprintf(idbuf, sizeof(idbuf), " %d", id);
        if (is_disputed(c)) {
            disputed++;
            strncat(disputed_ids, idbuf, sizeof(disputed_ids) - strlen(disputed_ids) - 1);
            bool known = false;
            for (size_t k = 0; k < sizeof(choices) / sizeof(choices[0]); k++) {
                if (choices[k].id != id)
                    continue;
                known = true;
                if (rc == 0 && got_match == choices[k].match)
                    disputed_as_chosen++;
                else
                    fprintf(stderr, "disputed case %d: got %s, our documented choice is %s\n", id,
                            got_match ? "match" : "no match",
                            choices[k].match ? "match" : "no match");
            }
            if (!known)
                fprintf(stderr, "disputed case %d has no recorded choice (got %s)\n", id,
                        got_match ? "match" : "no match");
        } else {
            undisputed++;
            if (rc == 0 && got_match == want) {
                passed++;
            } else {
                strncat(failed, idbuf, sizeof(failed) - strlen(failed) - 1);
                fprintf(stderr, "case %d FAILED: want %s, got %s\n", id,
                        want ? "match" : "no match", got_match ? "match" : "no match");
            }
        }
        cJSON_Delete(c);
    }
    free(line);
    fclose(fp);
    printf("filter corpus: %d cases; %d of %d non-disputed passed; %d disputed (%s), %d as "
           "documented\n",
           total, passed, undisputed, disputed, disputed_ids[0] ? disputed_ids + 1 : "none",
           disputed_as_chosen);
    if (failed[0])
        printf("failing case ids:%s\n", failed);
    assert_true(total > 0);
    assert_int_equal(passed, undisputed);
    assert_int_equal(disputed_as_chosen, (int)(sizeof(choices) / sizeof(choices[0])));
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_corpus),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
