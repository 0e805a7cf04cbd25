/* Trace context: W3C traceparent/tracestate and AWS X-Ray's X-Amzn-Trace-Id, carried from where
 * they arrive (Kafka record headers, the Postgres queue's trace header, Invoke's request headers)
 * to the function request (docs/operations.md#trace-context, docs/lambda.md#trace-context).
 *
 * Values are checked before they are kept: a malformed header is dropped (never sent on), so
 * what reaches the function is always well-formed. */
#ifndef ESMD_TRACE_H
#define ESMD_TRACE_H

#include "esmd/common.h"

#include <stddef.h>

#define ESMD_TRACEPARENT_MAX 55 /* version 00: "00-<32 hex>-<16 hex>-<2 hex>" */
#define ESMD_TRACESTATE_MAX 512 /* W3C: what every tracer must pass on */
#define ESMD_XRAY_MAX 256       /* Root, Parent, Sampled, Lineage and a little more */
#define ESMD_TRACE_ID_LEN 32    /* the trace id as 32 lowercase hex digits */

/* "" when absent. */
struct esmd_trace {
    char traceparent[ESMD_TRACEPARENT_MAX + 1];
    char tracestate[ESMD_TRACESTATE_MAX + 1];
    char xray[ESMD_XRAY_MAX + 1];
};

/* Header names, as sent to the function. */
#define ESMD_TRACE_TRACEPARENT "traceparent"
#define ESMD_TRACE_TRACESTATE "tracestate"
#define ESMD_TRACE_XRAY "X-Amzn-Trace-Id"

static inline void esmd_trace_clear(struct esmd_trace *t)
{
    t->traceparent[0] = t->tracestate[0] = t->xray[0] = '\0';
}

static inline bool esmd_trace_empty(const struct esmd_trace *t)
{
    return !t->traceparent[0] && !t->xray[0];
}

/* Takes one header (name compared case-insensitively with the three above; len bytes of value,
 * not NUL-terminated) into t when its value is well-formed: returns true when kept, false for
 * another name or a malformed value. A later header of the same name replaces an earlier one. */
bool esmd_trace_set(struct esmd_trace *t, const char *name, const char *value, size_t len);

/* Fills in what one form gives the other (X-Ray's documented mapping between the two ids):
 * an X-Amzn-Trace-Id from a traceparent ("Root=1-<8>-<24>;Parent=<16>;Sampled=<0|1>"), or a
 * traceparent from an X-Amzn-Trace-Id that has a Root and a Parent. Drops a tracestate that has
 * no traceparent (W3C: it is meaningless alone). */
void esmd_trace_complete(struct esmd_trace *t);

/* The trace id as 32 lowercase hex digits and a NUL into out (the W3C trace id; an X-Ray root
 * "1-5759e988-bd862e3fe1be46a994272793" gives "5759e988bd862e3fe1be46a994272793"); false and ""
 * when t has none. */
bool esmd_trace_id(const struct esmd_trace *t, char out[ESMD_TRACE_ID_LEN + 1]);

#endif
