/* Filter engine throughput: how many events a second one matcher (one thread) sorts through.
 *
 *   filter_bench PATTERNS.jsonl EVENTS.jsonl [--seconds S]
 *   filter_bench --compile-test [COUNT]
 *
 * PATTERNS.jsonl holds one {"set": SET, "name": NAME, "pattern": "<pattern JSON as a string>"}
 * a line, EVENTS.jsonl one event a line (the format tests/bench/filter_workload.py
 * writes). For each set, in the order the sets first appear, the set's patterns are compiled
 * into one matcher (id = index in the set), then every event is run through
 * esmd_filter_match_all, pass after pass, until at least S seconds (default 1) were measured.
 * One line a set on stdout:
 *
 *   SET patterns=N matches=M events/sec=R compile_ms=C passes=P cpu_events/sec=U
 *
 * M is the number of (event, pattern) pairs that match over one pass of the events; R counts
 * events, not pairs, per second of wall-clock time, U per second of the thread's CPU time.
 * --compile-test times compiling COUNT (default 10000) generated patterns into one matcher: all on
 * one field (COMPILE_EXACT) and a mix of every operator over many fields (COMPILE_MIXED), best of 3
 * runs each.
 *
 * Events are loaded into memory first; nothing but matching is timed. See tests/bench/README.md.
 */
#include "esmd/common.h"
#include "esmd/filter.h"

#include <cjson/cJSON.h>
#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* CPU time of the calling thread in seconds: unlike wall-clock time, it does not count the
 * time the thread waited for a CPU on a busy machine. */
static double thread_cpu(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

struct span {
    const char *p;
    size_t len;
};

struct lines {
    char *data; /* owned: the whole file */
    struct span *items;
    size_t n;
};

struct pattern {
    char *set;  /* owned */
    char *name; /* owned */
    char *text; /* owned */
    size_t len;
};

/* Reads a whole file and splits it into its non-empty lines (without "\n" or "\r\n").
 * Returns 0, or -1 with a message on stderr. */
static int lines_read(const char *path, struct lines *out)
{
    FILE *fp = fopen(path, "rb");
    if (!fp) {
        fprintf(stderr, "filter_bench: %s: %s\n", path, strerror(errno));
        return -1;
    }
    size_t cap = 1 << 20, len = 0;
    char *data = esmd_xmalloc(cap);
    size_t got;
    while ((got = fread(data + len, 1, cap - len, fp)) > 0) {
        len += got;
        if (len == cap) {
            cap *= 2;
            data = esmd_xrealloc(data, cap);
        }
    }
    int err = ferror(fp);
    fclose(fp);
    if (err) {
        fprintf(stderr, "filter_bench: %s: read error\n", path);
        free(data);
        return -1;
    }
    size_t ncap = 1024, n = 0;
    struct span *items = esmd_xmalloc(ncap * sizeof(*items));
    size_t start = 0;
    for (size_t i = 0; i <= len; i++) {
        if (i < len && data[i] != '\n')
            continue;
        size_t end = i;
        if (end > start && data[end - 1] == '\r')
            end--;
        if (end > start) {
            if (n == ncap) {
                ncap *= 2;
                items = esmd_xrealloc(items, ncap * sizeof(*items));
            }
            items[n++] = (struct span){data + start, end - start};
        }
        start = i + 1;
    }
    *out = (struct lines){data, items, n};
    return 0;
}

static void lines_free(struct lines *l)
{
    free(l->data);
    free(l->items);
}

static char *json_str(const cJSON *obj, const char *key)
{
    const cJSON *v = cJSON_GetObjectItemCaseSensitive(obj, key);
    return cJSON_IsString(v) ? esmd_xstrdup(v->valuestring) : NULL;
}

/* Parses PATTERNS.jsonl. Returns the number of patterns, or -1 with a message on stderr. */
static long patterns_read(const char *path, struct pattern **out)
{
    struct lines l;
    if (lines_read(path, &l) != 0)
        return -1;
    struct pattern *pats = esmd_xcalloc(l.n + 1, sizeof(*pats));
    long n = 0;
    for (size_t i = 0; i < l.n; i++) {
        cJSON *j = cJSON_ParseWithLength(l.items[i].p, l.items[i].len);
        struct pattern p = {0};
        if (j) {
            p.set = json_str(j, "set");
            p.name = json_str(j, "name");
            p.text = json_str(j, "pattern");
        }
        cJSON_Delete(j);
        if (!p.set || !p.text) {
            fprintf(stderr,
                    "filter_bench: %s: line %zu: want {\"set\": STRING, \"name\": STRING, "
                    "\"pattern\": STRING}\n",
                    path, i + 1);
            free(p.set);
            free(p.name);
            free(p.text);
            for (long k = 0; k < n; k++) {
                free(pats[k].set);
                free(pats[k].name);
                free(pats[k].text);
            }
            free(pats);
            lines_free(&l);
            return -1;
        }
        if (!p.name)
            p.name = esmd_xstrdup("?");
        p.len = strlen(p.text);
        pats[n++] = p;
    }
    lines_free(&l);
    *out = pats;
    return n;
}

static void patterns_free(struct pattern *pats, long n)
{
    for (long i = 0; i < n; i++) {
        free(pats[i].set);
        free(pats[i].name);
        free(pats[i].text);
    }
    free(pats);
}

/* One pass over the events: the number of (event, pattern) matches; counts events that are not
 * JSON objects in *bad. */
static uint64_t match_pass(struct esmd_filter *f, const struct lines *events, uint32_t *ids,
                           size_t max, uint64_t *bad)
{
    uint64_t total = 0;
    for (size_t i = 0; i < events->n; i++) {
        int m = esmd_filter_match_all(f, events->items[i].p, events->items[i].len, ids, max);
        if (m < 0)
            (*bad)++;
        else
            total += (uint64_t)m;
    }
    return total;
}

/* Compiles the patterns of `set` (in file order, ids 0, 1, ...) into one matcher and measures
 * it. Returns 0, or -1 if a pattern does not compile or the counts disagree. */
static int bench_set(const struct pattern *pats, long npats, const char *set,
                     const struct lines *events, double min_seconds)
{
    struct esmd_filter *f = esmd_filter_new();
    uint32_t id = 0;
    double t0 = esmd_mono();
    for (long i = 0; i < npats; i++) {
        if (strcmp(pats[i].set, set) != 0)
            continue;
        struct esmd_filter_error err;
        if (esmd_filter_add(f, pats[i].text, pats[i].len, id, &err) != 0) {
            fprintf(stderr, "filter_bench: %s %s: pattern %" PRIu32 ":%d:%d: %s\n", set,
                    pats[i].name, id + 1, err.line, err.column, err.message);
            esmd_filter_free(f);
            return -1;
        }
        id++;
    }
    double compile_ms = (esmd_mono() - t0) * 1000.0;
    if (esmd_filter_count_patterns(f) != id) {
        fprintf(stderr, "filter_bench: %s: the matcher holds %zu patterns, %" PRIu32 " added\n",
                set, esmd_filter_count_patterns(f), id);
        esmd_filter_free(f);
        return -1;
    }

    size_t max = id ? id : 1;
    uint32_t *ids = esmd_xcalloc(max, sizeof(*ids));
    uint64_t bad = 0;
    /* The first pass counts the matches and warms the caches; it is not timed. */
    uint64_t matches = match_pass(f, events, ids, max, &bad);
    if (bad)
        fprintf(stderr, "filter_bench: %s: %" PRIu64 " events are not JSON objects\n", set, bad);

    uint64_t passes = 0, total = 0, ignored = 0;
    double elapsed = 0, cpu0 = thread_cpu();
    t0 = esmd_mono();
    do {
        total += match_pass(f, events, ids, max, &ignored);
        passes++;
        elapsed = esmd_mono() - t0;
    } while (elapsed < min_seconds);
    double cpu = thread_cpu() - cpu0;
    int rc = 0;
    if (total != matches * passes) {
        fprintf(stderr,
                "filter_bench: %s: %" PRIu64 " matches over %" PRIu64 " passes, expected %" PRIu64
                " each: the engine is not deterministic\n",
                set, total, passes, matches);
        rc = -1;
    }
    double n = (double)(events->n * passes);
    printf("%s patterns=%" PRIu32 " matches=%" PRIu64 " events/sec=%.0f compile_ms=%.3f "
           "passes=%" PRIu64 " cpu_events/sec=%.0f\n",
           set, id, matches, elapsed > 0 ? n / elapsed : 0, compile_ms, passes,
           cpu > 0 ? n / cpu : 0);
    fflush(stdout);
    free(ids);
    esmd_filter_free(f);
    return rc;
}

static int bench_file(const char *patterns_path, const char *events_path, double min_seconds)
{
    struct pattern *pats = NULL;
    long npats = patterns_read(patterns_path, &pats);
    if (npats < 0)
        return 1;
    struct lines events;
    if (lines_read(events_path, &events) != 0) {
        patterns_free(pats, npats);
        return 1;
    }
    if (events.n == 0) {
        fprintf(stderr, "filter_bench: %s: no events\n", events_path);
        patterns_free(pats, npats);
        lines_free(&events);
        return 1;
    }
    size_t bytes = 0;
    for (size_t i = 0; i < events.n; i++)
        bytes += events.items[i].len;
    fprintf(stderr, "filter_bench: %ld patterns, %zu events (%.1f bytes on average)\n", npats,
            events.n, (double)bytes / (double)events.n);

    int rc = 0;
    for (long i = 0; i < npats; i++) {
        bool seen = false;
        for (long k = 0; k < i && !seen; k++)
            seen = strcmp(pats[k].set, pats[i].set) == 0;
        if (!seen && bench_set(pats, npats, pats[i].set, &events, min_seconds) != 0)
            rc = 1;
    }
    patterns_free(pats, npats);
    lines_free(&events);
    return rc;
}

/* ---- --compile-test ---- */

static const char *const fields[] = {"source", "detail-type", "region", "account", "time"};
static const char *const subfields[] = {"status", "orderId", "name", "email", "tier", "sku"};

/* Writes generated pattern number i into buf (mixed: every operator, many field paths). */
static size_t gen_mixed(char *buf, size_t size, unsigned i)
{
    const char *top = fields[(i / 10) % ESMD_ARRAY_LEN(fields)];
    const char *sub = subfields[(i / 10) % ESMD_ARRAY_LEN(subfields)];
    int n;
    switch (i % 10) {
    case 0:
        n = snprintf(buf, size, "{\"detail\":{\"%s\":[\"value-%u\",\"other-%u\"]}}", sub, i, i);
        break;
    case 1:
        n = snprintf(buf, size, "{\"%s\":[{\"prefix\":\"p%u-\"}]}", top, i);
        break;
    case 2:
        n = snprintf(buf, size, "{\"detail\":{\"%s\":[{\"suffix\":\"-%u\"}]}}", sub, i);
        break;
    case 3:
        n = snprintf(buf, size, "{\"%s\":[{\"equals-ignore-case\":\"Value-%u\"}]}", top, i);
        break;
    case 4:
        n = snprintf(buf, size, "{\"detail\":{\"%s\":[{\"wildcard\":\"w*%u*x\"}]}}", sub, i);
        break;
    case 5:
        n = snprintf(buf, size, "{\"%s\":[{\"anything-but\":[\"a%u\",\"b%u\"]}]}", top, i, i);
        break;
    case 6:
        n = snprintf(buf, size, "{\"detail\":{\"n%u\":[{\"numeric\":[\">=\",%u,\"<\",%u.5]}]}}",
                     i % 97, i, i + 10);
        break;
    case 7:
        n = snprintf(buf, size, "{\"detail\":{\"ip\":[{\"cidr\":\"10.%u.%u.0/24\"}]}}",
                     (i >> 8) & 255, i & 255);
        break;
    case 8:
        n = snprintf(buf, size, "{\"detail\":{\"f%u\":[{\"exists\":%s}]}}", i % 113,
                     i & 16 ? "true" : "false");
        break;
    default:
        n = snprintf(buf, size,
                     "{\"source\":[\"app.s%u\"],\"%s\":[{\"prefix\":\"q%u\"}],\"detail\":{\"%s\":"
                     "[\"c%u\",{\"numeric\":[\">\",%u]}]}}",
                     i % 7, fields[1 + (i / 10) % 4], i, sub, i, i);
        break;
    }
    return n > 0 && (size_t)n < size ? (size_t)n : 0;
}

static size_t gen_exact(char *buf, size_t size, unsigned i)
{
    int n = snprintf(buf, size, "{\"detail\":{\"orderId\":[\"o-%u\"]}}", i * 37);
    return n > 0 && (size_t)n < size ? (size_t)n : 0;
}

/* Compiles `count` generated patterns into one matcher: milliseconds, or -1 on an error. */
static double compile_run(size_t (*gen)(char *, size_t, unsigned), unsigned count)
{
    char buf[512];
    struct esmd_filter *f = esmd_filter_new();
    double t0 = esmd_mono();
    for (unsigned i = 0; i < count; i++) {
        size_t len = gen(buf, sizeof(buf), i);
        struct esmd_filter_error err;
        if (esmd_filter_add(f, buf, len, i, &err) != 0) {
            fprintf(stderr, "filter_bench: generated pattern %u:%d:%d: %s\n%.*s\n", i + 1, err.line,
                    err.column, err.message, (int)len, buf);
            esmd_filter_free(f);
            return -1;
        }
    }
    double ms = (esmd_mono() - t0) * 1000.0;
    esmd_filter_free(f);
    return ms;
}

static int compile_test(unsigned count)
{
    static const struct {
        const char *name;
        size_t (*gen)(char *, size_t, unsigned);
    } kinds[] = {{"COMPILE_EXACT", gen_exact}, {"COMPILE_MIXED", gen_mixed}};
    for (size_t k = 0; k < ESMD_ARRAY_LEN(kinds); k++) {
        double runs[3], best = -1;
        for (int r = 0; r < 3; r++) {
            runs[r] = compile_run(kinds[k].gen, count);
            if (runs[r] < 0)
                return 1;
            if (best < 0 || runs[r] < best)
                best = runs[r];
        }
        printf("%s patterns=%u compile_ms=%.3f runs_ms=%.3f,%.3f,%.3f\n", kinds[k].name, count,
               best, runs[0], runs[1], runs[2]);
        fflush(stdout);
    }
    return 0;
}

static const char usage[] =
    "usage: filter_bench PATTERNS.jsonl EVENTS.jsonl [--seconds S]\n"
    "       filter_bench --compile-test [COUNT]\n"
    "\n"
    "Prints `SET patterns=N matches=M events/sec=R compile_ms=C passes=P cpu_events/sec=U`\n"
    "for each set of PATTERNS.jsonl, or with --compile-test the time to compile COUNT (default\n"
    "10000) generated patterns into one matcher. See tests/bench/README.md.\n";

int main(int argc, char **argv)
{
    if (argc >= 2 && (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0)) {
        fputs(usage, stdout);
        return 0;
    }
    if (argc >= 2 && strcmp(argv[1], "--compile-test") == 0) {
        unsigned long count = 10000;
        if (argc > 3) {
            fputs(usage, stderr);
            return 2;
        }
        if (argc == 3) {
            char *end;
            count = strtoul(argv[2], &end, 10);
            if (*end || count == 0 || count > 10000000) {
                fprintf(stderr, "filter_bench: bad COUNT '%s'\n", argv[2]);
                return 2;
            }
        }
        return compile_test((unsigned)count);
    }
    double seconds = 1.0;
    if (argc == 5 && strcmp(argv[3], "--seconds") == 0) {
        char *end;
        seconds = strtod(argv[4], &end);
        if (*end || !(seconds >= 0)) {
            fprintf(stderr, "filter_bench: bad --seconds '%s'\n", argv[4]);
            return 2;
        }
    } else if (argc != 3) {
        fputs(usage, stderr);
        return 2;
    }
    return bench_file(argv[1], argv[2], seconds);
}
