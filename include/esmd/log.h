/* JSON-lines logging: one object a line on stderr, scoped by mapping / function / request id. */
#ifndef ESMD_LOG_H
#define ESMD_LOG_H

#include "esmd/common.h"
#include <stdio.h>

enum esmd_log_level { ESMD_LOG_DEBUG, ESMD_LOG_INFO, ESMD_LOG_WARN, ESMD_LOG_ERROR };

/* Scope of a log line; every field may be NULL. All strings borrowed for the call. */
struct esmd_log_ctx {
    const char *mapping;
    const char *function;
    const char *request_id;
    const char *trace_id; /* the trace of the batch or event (include/esmd/trace.h), 32 hex */
};

void esmd_log_set_level(enum esmd_log_level lvl);
/* Parses "debug" | "info" | "warn" | "error"; returns 0 or ESMD_EINVAL. */
int esmd_log_parse_level(const char *s, enum esmd_log_level *out) ESMD_MUST_CHECK;
/* Borrowed stream (default stderr). */
void esmd_log_set_stream(FILE *fp);

/* Writes {"ts","level","msg",mapping?,function?,request_id?,trace_id?}. ctx may be NULL. */
void esmd_log(enum esmd_log_level lvl, const struct esmd_log_ctx *ctx, const char *fmt, ...)
    ESMD_PRINTF(3, 4);
/* As esmd_log, but at most one line per `key` (a static string) per second; suppressed lines
 * are counted and reported as "suppressed":N on the next line that passes. */
void esmd_log_limited(enum esmd_log_level lvl, const struct esmd_log_ctx *ctx, const char *key,
                      const char *fmt, ...) ESMD_PRINTF(4, 5);

/* ---- Lambda's event source mapping system logs (docs/operations.md#esm-logging) ----
 * A mapping's `logging: { system_log_level }` (enum esmd_esm_log_level, esmd/config.h) decides
 * which of its event types are written; they go to esmd's log stream whatever --log-level says. */
enum esmd_esm_event {
    ESMD_ESM_POLLER_STATUS, /* POLLER_STATUS_EVENT, INFO */
    ESMD_ESM_KAFKA_STATUS,  /* KAFKA_STATUS_EVENT, DEBUG */
    ESMD_ESM_PROCESSING,    /* ESM_PROCESSING_EVENT, WARN */
};
/* Whether a mapping whose system_log_level is `configured` writes events of `type`. */
bool esmd_esm_log_enabled(int configured, enum esmd_esm_event type);
/* Writes {"ts","level","msg":"<event type>",mapping?,function?,request_id?,trace_id?,
 * "eventType","logLevel",<members>} when enabled. members: JSON object members, each written
 * as ,"name":value (NULL for none). */
void esmd_esm_log(int configured, const struct esmd_log_ctx *ctx, enum esmd_esm_event type,
                  const char *members, size_t len);

#define ESMD_DEBUG(ctx, ...) esmd_log(ESMD_LOG_DEBUG, ctx, __VA_ARGS__)
#define ESMD_INFO(ctx, ...) esmd_log(ESMD_LOG_INFO, ctx, __VA_ARGS__)
#define ESMD_WARN(ctx, ...) esmd_log(ESMD_LOG_WARN, ctx, __VA_ARGS__)
#define ESMD_ERROR(ctx, ...) esmd_log(ESMD_LOG_ERROR, ctx, __VA_ARGS__)

#endif
