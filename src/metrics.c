/* Prometheus metrics registry and text exposition (format 0.0.4).
 *
 * Families are kept in creation order and rendered in that order; the series of a family are
 * rendered in creation order too, so the output is stable for a given program. Everything runs
 * on the loop thread: no locks. */
#include "esmd/metrics.h"
#include "esmd/log.h"

#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const double esmd_default_buckets[] = {0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                                              1,     2.5,  5,     10,   30,  60};
#define ESMD_NBUCKETS ESMD_ARRAY_LEN(esmd_default_buckets)

struct esmd_series {
    struct esmd_metric *m; /* the family it belongs to */
    char *labels;          /* owned; "" for none */
    uint32_t hash;         /* of labels */
    double value;          /* counter / gauge */
    /* histogram: per-bucket (not cumulative) counts, the +Inf overflow last */
    uint64_t buckets[ESMD_NBUCKETS + 1];
    uint64_t count;
    double sum;
    bool hidden; /* esmd_metrics_hide: not rendered until looked up or updated again */
    struct esmd_series *hprev, *hnext; /* while hidden: esmd_registry's hidden list */
};

struct esmd_metric {
    enum esmd_metric_type type;
    const char *name;            /* static */
    const char *help;            /* static */
    struct esmd_series **series; /* owned array of owned series */
    size_t nseries, cap;
};

static struct {
    struct esmd_metric **items; /* owned */
    size_t n, cap;
    /* the hidden series, longest hidden first: past ESMD_METRICS_HIDDEN_MAX the first go */
    struct esmd_series *hidden_first, *hidden_last;
    size_t nhidden;
} esmd_registry;

static uint32_t metrics_hash(const char *s)
{
    uint32_t h = 2166136261u; /* FNV-1a */
    for (; *s; s++) {
        h ^= (unsigned char)*s;
        h *= 16777619u;
    }
    return h;
}

struct esmd_metric *esmd_metric(enum esmd_metric_type type, const char *name, const char *help)
{
    struct esmd_metric *m;

    if (name == NULL)
        return NULL;
    for (size_t i = 0; i < esmd_registry.n; i++) {
        m = esmd_registry.items[i];
        if (strcmp(m->name, name) != 0)
            continue;
        if (m->type != type) {
            ESMD_ERROR(NULL, "metric %s registered twice with different types", name);
            return NULL;
        }
        return m;
    }
    if (esmd_registry.n == esmd_registry.cap) {
        esmd_registry.cap = esmd_registry.cap ? esmd_registry.cap * 2 : 16;
        esmd_registry.items =
            esmd_xrealloc(esmd_registry.items, esmd_registry.cap * sizeof(*esmd_registry.items));
    }
    m = esmd_xcalloc(1, sizeof(*m));
    m->type = type;
    m->name = name;
    m->help = help ? help : "";
    esmd_registry.items[esmd_registry.n++] = m;
    return m;
}

static void series_unhide(struct esmd_series *s)
{
    if (!s->hidden)
        return;
    s->hidden = false;
    if (s->hprev)
        s->hprev->hnext = s->hnext;
    else
        esmd_registry.hidden_first = s->hnext;
    if (s->hnext)
        s->hnext->hprev = s->hprev;
    else
        esmd_registry.hidden_last = s->hprev;
    s->hprev = s->hnext = NULL;
    esmd_registry.nhidden--;
}

static void series_hide(struct esmd_series *s)
{
    s->hidden = true;
    s->hprev = esmd_registry.hidden_last;
    s->hnext = NULL;
    if (s->hprev)
        s->hprev->hnext = s;
    else
        esmd_registry.hidden_first = s;
    esmd_registry.hidden_last = s;
    esmd_registry.nhidden++;
}

/* Takes s out of its family (the others keep their order) and frees it. */
static void series_free(struct esmd_series *s)
{
    struct esmd_metric *m = s->m;

    series_unhide(s);
    for (size_t i = 0; i < m->nseries; i++)
        if (m->series[i] == s) {
            memmove(&m->series[i], &m->series[i + 1], (m->nseries - i - 1) * sizeof(*m->series));
            m->nseries--;
            break;
        }
    free(s->labels);
    free(s);
}

struct esmd_series *esmd_series(struct esmd_metric *m, const char *labels)
{
    struct esmd_series *s;
    uint32_t h;

    if (m == NULL)
        return NULL;
    if (labels == NULL)
        labels = "";
    h = metrics_hash(labels);
    for (size_t i = 0; i < m->nseries; i++) {
        s = m->series[i];
        if (s->hash == h && strcmp(s->labels, labels) == 0) {
            series_unhide(s);
            return s;
        }
    }
    if (m->nseries == m->cap) {
        m->cap = m->cap ? m->cap * 2 : 8;
        m->series = esmd_xrealloc(m->series, m->cap * sizeof(*m->series));
    }
    s = esmd_xcalloc(1, sizeof(*s));
    s->m = m;
    s->labels = esmd_xstrdup(labels);
    s->hash = h;
    m->series[m->nseries++] = s;
    return s;
}

static void metrics_put_escaped(struct esmd_buf *out, const char *s, bool quotes)
{
    for (; *s; s++) {
        if (*s == '\\')
            esmd_buf_puts(out, "\\\\");
        else if (*s == '\n')
            esmd_buf_puts(out, "\\n");
        else if (*s == '"' && quotes)
            esmd_buf_puts(out, "\\\"");
        else
            esmd_buf_putc(out, *s);
    }
}

void esmd_metric_labels(struct esmd_buf *out, ...)
{
    va_list ap;
    const char *name, *value;

    va_start(ap, out);
    while ((name = va_arg(ap, const char *)) != NULL) {
        value = va_arg(ap, const char *);
        if (value == NULL)
            continue;
        if (out->len > 0)
            esmd_buf_putc(out, ',');
        esmd_buf_puts(out, name);
        esmd_buf_puts(out, "=\"");
        metrics_put_escaped(out, value, true);
        esmd_buf_putc(out, '"');
    }
    va_end(ap);
}

void esmd_series_inc(struct esmd_series *s, double v)
{
    if (s == NULL || s->m->type == ESMD_HISTOGRAM)
        return;
    s->value += v;
    series_unhide(s);
}

void esmd_series_set(struct esmd_series *s, double v)
{
    if (s == NULL || s->m->type == ESMD_HISTOGRAM)
        return;
    s->value = v;
    series_unhide(s);
}

void esmd_series_observe(struct esmd_series *s, double v)
{
    size_t i;

    if (s == NULL || s->m->type != ESMD_HISTOGRAM)
        return;
    for (i = 0; i < ESMD_NBUCKETS; i++)
        if (v <= esmd_default_buckets[i])
            break;
    s->buckets[i]++;
    s->count++;
    s->sum += v;
    series_unhide(s);
}

double esmd_series_value(const struct esmd_series *s)
{
    if (s == NULL)
        return 0;
    if (s->m->type == ESMD_HISTOGRAM)
        return (double)s->count;
    return s->value;
}

/* Integers as integers; other values as the shortest %g text that reads back the same. */
static void metrics_put_double(struct esmd_buf *out, double v)
{
    char tmp[40];

    if (isnan(v)) {
        esmd_buf_puts(out, "NaN");
        return;
    }
    if (isinf(v)) {
        esmd_buf_puts(out, v > 0 ? "+Inf" : "-Inf");
        return;
    }
    if (v == floor(v) && fabs(v) < 9007199254740992.0) {
        snprintf(tmp, sizeof(tmp), "%.0f", v);
        esmd_buf_puts(out, tmp);
        return;
    }
    for (int prec = 1; prec <= 17; prec++) {
        snprintf(tmp, sizeof(tmp), "%.*g", prec, v);
        if (strtod(tmp, NULL) == v)
            break;
    }
    esmd_buf_puts(out, tmp);
}

/* name{labels[,extra]} — braces omitted when there is nothing between them. */
static void metrics_put_series_name(struct esmd_buf *out, const char *name, const char *suffix,
                                    const char *labels, const char *extra)
{
    esmd_buf_puts(out, name);
    esmd_buf_puts(out, suffix);
    if (labels[0] == '\0' && extra == NULL)
        return;
    esmd_buf_putc(out, '{');
    esmd_buf_puts(out, labels);
    if (extra != NULL) {
        if (labels[0] != '\0')
            esmd_buf_putc(out, ',');
        esmd_buf_puts(out, extra);
    }
    esmd_buf_putc(out, '}');
}

static void metrics_render_histogram(struct esmd_buf *out, const struct esmd_metric *m,
                                     const struct esmd_series *s)
{
    struct esmd_buf le = ESMD_BUF_INIT;
    uint64_t cum = 0;

    for (size_t i = 0; i <= ESMD_NBUCKETS; i++) {
        cum += s->buckets[i];
        esmd_buf_reset(&le);
        esmd_buf_puts(&le, "le=\"");
        metrics_put_double(&le, i < ESMD_NBUCKETS ? esmd_default_buckets[i] : INFINITY);
        esmd_buf_putc(&le, '"');
        metrics_put_series_name(out, m->name, "_bucket", s->labels, esmd_buf_cstr(&le));
        esmd_buf_putc(out, ' ');
        esmd_buf_put_i64(out, (int64_t)cum);
        esmd_buf_putc(out, '\n');
    }
    metrics_put_series_name(out, m->name, "_sum", s->labels, NULL);
    esmd_buf_putc(out, ' ');
    metrics_put_double(out, s->sum);
    esmd_buf_putc(out, '\n');
    metrics_put_series_name(out, m->name, "_count", s->labels, NULL);
    esmd_buf_putc(out, ' ');
    esmd_buf_put_i64(out, (int64_t)s->count);
    esmd_buf_putc(out, '\n');
    esmd_buf_free(&le);
}

static const char *metrics_type_name(enum esmd_metric_type t)
{
    switch (t) {
    case ESMD_COUNTER:
        return "counter";
    case ESMD_GAUGE:
        return "gauge";
    case ESMD_HISTOGRAM:
        return "histogram";
    }
    return "untyped";
}

/* Whether labels (escaped, `a="x",b="y"`) hold the pair `pair` (`name="value"`, escaped the
 * same way): at the start or after a comma, and ending there or before a comma. An escaped
 * value cannot contain a pair's opening `name="` (its quotes are escaped). */
static bool labels_hold(const char *labels, const char *pair, size_t len)
{
    for (const char *p = labels; (p = strstr(p, pair)) != NULL; p++)
        if ((p == labels || p[-1] == ',') && (p[len] == '\0' || p[len] == ','))
            return true;
    return false;
}

size_t esmd_metrics_hide(const char *name, const char *value)
{
    struct esmd_buf pair = ESMD_BUF_INIT;
    size_t n = 0;

    esmd_metric_labels(&pair, name, value, NULL);
    for (size_t i = 0; pair.len > 0 && i < esmd_registry.n; i++) {
        const struct esmd_metric *m = esmd_registry.items[i];
        for (size_t j = 0; j < m->nseries; j++) {
            struct esmd_series *s = m->series[j];
            if (!s->hidden && labels_hold(s->labels, esmd_buf_cstr(&pair), pair.len)) {
                series_hide(s);
                n++;
            }
        }
    }
    esmd_buf_free(&pair);
    while (esmd_registry.nhidden > ESMD_METRICS_HIDDEN_MAX)
        series_free(esmd_registry.hidden_first);
    return n;
}

size_t esmd_metrics_hidden(void)
{
    return esmd_registry.nhidden;
}

void esmd_metrics_render(struct esmd_buf *out)
{
    for (size_t i = 0; i < esmd_registry.n; i++) {
        const struct esmd_metric *m = esmd_registry.items[i];
        size_t shown = 0;

        for (size_t j = 0; j < m->nseries; j++)
            shown += !m->series[j]->hidden;
        if (shown == 0)
            continue;
        esmd_buf_puts(out, "# HELP ");
        esmd_buf_puts(out, m->name);
        esmd_buf_putc(out, ' ');
        metrics_put_escaped(out, m->help, false);
        esmd_buf_puts(out, "\n# TYPE ");
        esmd_buf_puts(out, m->name);
        esmd_buf_putc(out, ' ');
        esmd_buf_puts(out, metrics_type_name(m->type));
        esmd_buf_putc(out, '\n');
        for (size_t j = 0; j < m->nseries; j++) {
            const struct esmd_series *s = m->series[j];

            if (s->hidden)
                continue;
            if (m->type == ESMD_HISTOGRAM) {
                metrics_render_histogram(out, m, s);
                continue;
            }
            metrics_put_series_name(out, m->name, "", s->labels, NULL);
            esmd_buf_putc(out, ' ');
            metrics_put_double(out, s->value);
            esmd_buf_putc(out, '\n');
        }
    }
}

void esmd_metrics_reset(void)
{
    for (size_t i = 0; i < esmd_registry.n; i++) {
        struct esmd_metric *m = esmd_registry.items[i];

        for (size_t j = 0; j < m->nseries; j++) {
            free(m->series[j]->labels);
            free(m->series[j]);
        }
        free(m->series);
        free(m);
    }
    free(esmd_registry.items);
    esmd_registry.items = NULL;
    esmd_registry.n = esmd_registry.cap = 0;
    esmd_registry.hidden_first = esmd_registry.hidden_last = NULL;
    esmd_registry.nhidden = 0;
}

/* The q-quantile of per-bucket counts b (total observations), as Prometheus estimates it. */
static double buckets_quantile(const uint64_t *b, uint64_t total, double q)
{
    uint64_t seen = 0;

    if (total == 0)
        return -1;
    double rank = q * (double)total;
    for (size_t k = 0; k <= ESMD_NBUCKETS; k++) {
        if (b[k] == 0 || (double)(seen + b[k]) < rank) {
            seen += b[k];
            continue;
        }
        if (k == ESMD_NBUCKETS) /* over the last bound: the bound is all that is known */
            return esmd_default_buckets[ESMD_NBUCKETS - 1];
        double lo = k == 0 ? 0 : esmd_default_buckets[k - 1], hi = esmd_default_buckets[k];
        return lo + (hi - lo) * ((rank - (double)seen) / (double)b[k]);
    }
    return esmd_default_buckets[ESMD_NBUCKETS - 1];
}

static void buckets_add(uint64_t *b, uint64_t *total, const struct esmd_series *s)
{
    for (size_t k = 0; k <= ESMD_NBUCKETS; k++)
        b[k] += s->buckets[k];
    *total += s->count;
}

double esmd_histogram_quantile(const struct esmd_series *const *s, size_t n, double q)
{
    uint64_t b[ESMD_NBUCKETS + 1] = {0}, total = 0;

    for (size_t i = 0; i < n; i++)
        if (s[i] != NULL && s[i]->m->type == ESMD_HISTOGRAM)
            buckets_add(b, &total, s[i]);
    return buckets_quantile(b, total, q);
}

/* Calls fn for every series of m, hidden ones too, whose labels hold name="value". */
static void metric_each(const struct esmd_metric *m, const char *name, const char *value,
                        void (*fn)(const struct esmd_series *, void *), void *arg)
{
    struct esmd_buf pair = ESMD_BUF_INIT;

    esmd_metric_labels(&pair, name, value, NULL);
    for (size_t j = 0; m != NULL && pair.len > 0 && j < m->nseries; j++)
        if (labels_hold(m->series[j]->labels, esmd_buf_cstr(&pair), pair.len))
            fn(m->series[j], arg);
    esmd_buf_free(&pair);
}

static void sum_one(const struct esmd_series *s, void *arg)
{
    *(double *)arg += esmd_series_value(s);
}

double esmd_metric_sum(const struct esmd_metric *m, const char *name, const char *value)
{
    double sum = 0;

    metric_each(m, name, value, sum_one, &sum);
    return sum;
}

struct buckets_acc {
    uint64_t b[ESMD_NBUCKETS + 1], total;
};

static void buckets_one(const struct esmd_series *s, void *arg)
{
    struct buckets_acc *acc = arg;

    buckets_add(acc->b, &acc->total, s);
}

double esmd_metric_quantile(const struct esmd_metric *m, const char *name, const char *value,
                            double q)
{
    struct buckets_acc acc = {{0}, 0};

    if (m == NULL || m->type != ESMD_HISTOGRAM)
        return -1;
    metric_each(m, name, value, buckets_one, &acc);
    return buckets_quantile(acc.b, acc.total, q);
}
