/* Event filtering: Lambda's / EventBridge's event-pattern language.
 *
 * Two steps. Compile: pattern texts (JSON objects) are parsed, checked and added to one matcher;
 * an invalid pattern is refused with the reason and its position in the pattern text. Match: the
 * bytes of one JSON event are scanned once and the matcher tells which patterns match. A matcher
 * holds any number of patterns (a mapping's filters are OR'd: a record is kept when any of them
 * matches); each pattern carries the caller's id.
 *
 * Matching does not allocate: scratch space lives in the matcher and grows only while patterns are
 * added (and, for unusually deep or large events, up to a fixed cap). So one matcher serves one
 * thread at a time (esmd's loop thread); it is not safe to match on one matcher from two threads.
 */
#ifndef ESMD_FILTER_H
#define ESMD_FILTER_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Lambda's limits (docs/lambda.md#filter-limits); the config can raise them. */
#define ESMD_FILTER_DEFAULT_MAX_PATTERNS 5
#define ESMD_FILTER_DEFAULT_MAX_PATTERN_LEN 4096

/* Compiled size (docs/filters.md#limits): what one pattern may add to a matcher, and what a
 * mapping's patterns may add together. "$or" repeats the values of the conditions outside it in
 * every alternative, so a short pattern can compile to much more than its text. */
#define ESMD_FILTER_MAX_PATTERN_BYTES ((size_t)4 << 20)
#define ESMD_FILTER_MAX_MAPPING_BYTES ((size_t)16 << 20)

struct esmd_filter;

struct esmd_filter_error {
    /* Byte offset in the pattern text where the problem is (0-based), and the same as a 1-based
     * line and column (columns count bytes). */
    size_t offset;
    int line, column;
    /* What is wrong, e.g. `"prefix" needs a string, got a number` or `unknown operator
     * "prefx"`. No position in it: the caller formats "pattern N:LINE:COL: MESSAGE". */
    char message[256];
};

struct esmd_filter *esmd_filter_new(void);
void esmd_filter_free(struct esmd_filter *f);

/* Compiles one pattern (JSON object text, `len` bytes, need not be NUL-terminated) and adds it to
 * the matcher under `id`. Returns 0, or -1 with *err filled (the matcher is unchanged then); a
 * pattern that compiles to more than ESMD_FILTER_MAX_PATTERN_BYTES is refused. */
int esmd_filter_add(struct esmd_filter *f, const char *pattern, size_t len, uint32_t id,
                    struct esmd_filter_error *err);

/* As esmd_filter_add, leaving out the top-level fields named in `skip` (a NULL-terminated list;
 * NULL for none). Kafka mappings use it for Lambda's fallback to metadata-only filtering when a
 * record's value is not JSON: the same pattern without its "value" (and "key") conditions. A
 * pattern left with no condition at all matches every event. */
int esmd_filter_add_skip(struct esmd_filter *f, const char *pattern, size_t len, uint32_t id,
                         const char *const *skip, struct esmd_filter_error *err);

/* Checks a pattern without keeping it. */
int esmd_filter_check(const char *pattern, size_t len, struct esmd_filter_error *err);

/* As esmd_filter_check, for the patterns of one mapping in turn (what `esmd check-config` and the
 * admin API use): *budget is what is left of the mapping's compiled size (start with
 * ESMD_FILTER_MAX_MAPPING_BYTES). A pattern that does not fit in it is refused, and *budget
 * becomes SIZE_MAX so that the patterns after it are only checked (one such error a mapping); a
 * pattern that fits takes its size from it. */
int esmd_filter_check_budget(const char *pattern, size_t len, size_t *budget,
                             struct esmd_filter_error *err);

size_t esmd_filter_count_patterns(const struct esmd_filter *f);

/* Does any pattern match the JSON event? An event that is not valid JSON (or not an object)
 * matches nothing. */
bool esmd_filter_match(struct esmd_filter *f, const char *event, size_t len);

/* How many of the patterns match the event; with `ids` non-NULL, the ids of up to `max` of them
 * are stored there (in no particular order). Returns -1 when the event is not a valid JSON
 * object. */
int esmd_filter_match_all(struct esmd_filter *f, const char *event, size_t len, uint32_t *ids,
                          size_t max);

#endif
