/* Prometheus metrics: a process-wide registry of families (counter, gauge, histogram), each with
 * labelled series. Single-threaded (the loop thread); series handles are looked up once at setup
 * and updated on the hot path with plain stores. */
#ifndef ESMD_METRICS_H
#define ESMD_METRICS_H

#include "esmd/buf.h"

enum esmd_metric_type { ESMD_COUNTER, ESMD_GAUGE, ESMD_HISTOGRAM };

struct esmd_metric; /* a family */
struct esmd_series; /* one label set of a family */

/* Returns the family of that name, creating it on first use (name and help are static strings).
 * Histograms use the default duration buckets (seconds: 0.005 .. 60). NULL (logged) when the
 * name exists with another type; every function below accepts NULL and then does nothing. */
struct esmd_metric *esmd_metric(enum esmd_metric_type type, const char *name, const char *help);
/* Returns the series for the label set, creating it on first use. labels is the text between
 * the braces, already escaped, e.g. `function="orders",mapping="m1"` ("" for none): build it
 * with esmd_metric_labels(). Owned by the registry. */
struct esmd_series *esmd_series(struct esmd_metric *m, const char *labels);
/* Formats label pairs (NULL-terminated name, value, name, value, ..., NULL) with escaping.
 * Appends to out, with a ',' first when out is not empty; a pair whose value is NULL is
 * skipped (e.g. an optional mapping label). */
void esmd_metric_labels(struct esmd_buf *out, ...);

void esmd_series_inc(struct esmd_series *s, double v);     /* counters and gauges */
void esmd_series_set(struct esmd_series *s, double v);     /* gauges */
void esmd_series_observe(struct esmd_series *s, double v); /* histograms */
double esmd_series_value(const struct esmd_series *s);     /* histograms: observation count */
/* The q-quantile (0..1) of the observations of n histogram series together, estimated as
 * Prometheus's histogram_quantile() does (linear within the bucket); -1 when there are none.
 * Over the last bound, that bound. NULL series are skipped. */
double esmd_histogram_quantile(const struct esmd_series *const *s, size_t n, double q);
/* Over every series of family m whose labels hold name="value", hidden ones too (e.g. a
 * function's invocations over every mapping it served): the sum of their values (histograms:
 * observation counts), and for a histogram the q-quantile of their observations together (-1
 * when there are none, or m is not a histogram). */
double esmd_metric_sum(const struct esmd_metric *m, const char *name, const char *value);
double esmd_metric_quantile(const struct esmd_metric *m, const char *name, const char *value,
                            double q);

/* Hidden series kept (about 20 a removed mapping): past this, the longest hidden are freed. */
#define ESMD_METRICS_HIDDEN_MAX 4096

/* Takes out of the exposition every series whose labels hold name="value" (a mapping a reload
 * removed: its series leave /metrics rather than stay frozen at their last values, a gauge
 * such as esmd_inflight_batches too). A hidden series shows again, with its values, once it is
 * looked up again (esmd_series) or updated: the same mapping added back goes on from there.
 * The last ESMD_METRICS_HIDDEN_MAX hidden series are kept so; older ones are freed (they show
 * nothing, and one looked up again starts anew, from 0: for a counter, a reset, which
 * Prometheus's rate() and increase() take in their stride). So whoever holds handles to the
 * series it hides must drop them first (the mapping is freed, the invoker forgets it:
 * esmd_invoker_forget_mapping), and no handle of a hidden series may be kept. Returns how many
 * series it hid. */
size_t esmd_metrics_hide(const char *name, const char *value);
/* How many hidden series are kept (at most ESMD_METRICS_HIDDEN_MAX). */
size_t esmd_metrics_hidden(void);

/* Appends the Prometheus text exposition (0.0.4) of every family that has a series to out,
 * families and series in creation order. */
void esmd_metrics_render(struct esmd_buf *out);
/* Frees the registry (tests, shutdown). Every family and series handle becomes invalid: free
 * their users (e.g. the invoker) first. */
void esmd_metrics_reset(void);

#endif
