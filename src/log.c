/* JSON-lines logger. */
#include "esmd/log.h"
#include "esmd/buf.h"
#include "esmd/config.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <strings.h>
#include <sys/time.h>
#include <time.h>

static enum esmd_log_level g_level = ESMD_LOG_INFO;
static FILE *g_stream;

static const char *const level_names[] = {"debug", "info", "warn", "error"};

void esmd_log_set_level(enum esmd_log_level lvl)
{
    g_level = lvl;
}

int esmd_log_parse_level(const char *s, enum esmd_log_level *out)
{
    for (size_t i = 0; i < ESMD_ARRAY_LEN(level_names); i++) {
        if (strcasecmp(s, level_names[i]) == 0) {
            *out = (enum esmd_log_level)i;
            return ESMD_OK;
        }
    }
    return ESMD_EINVAL;
}

void esmd_log_set_stream(FILE *fp)
{
    g_stream = fp;
}

static void put_field(struct esmd_buf *b, const char *name, const char *value)
{
    if (!value)
        return;
    esmd_buf_printf(b, ",\"%s\":", name);
    esmd_buf_put_json_string(b, value, strlen(value));
}

/* One line: the common members, then `extra` (JSON members, each ,"name":value). */
static void write_line(enum esmd_log_level lvl, const struct esmd_log_ctx *ctx, long suppressed,
                       const char *msg, const char *extra, size_t extra_len)
{
    char ts[32];
    esmd_iso8601_ms(esmd_now_ms(), ts);
    struct esmd_buf b = ESMD_BUF_INIT;
    esmd_buf_printf(&b, "{\"ts\":\"%s\",\"level\":\"%s\",\"msg\":", ts, level_names[lvl]);
    esmd_buf_put_json_string(&b, msg, strlen(msg));
    if (ctx) {
        put_field(&b, "mapping", ctx->mapping);
        put_field(&b, "function", ctx->function);
        put_field(&b, "request_id", ctx->request_id);
        put_field(&b, "trace_id", ctx->trace_id);
    }
    if (suppressed > 0)
        esmd_buf_printf(&b, ",\"suppressed\":%ld", suppressed);
    if (extra)
        esmd_buf_append(&b, extra, extra_len);
    esmd_buf_puts(&b, "}\n");
    FILE *fp = g_stream ? g_stream : stderr;
    fwrite(b.data, 1, b.len, fp);
    fflush(fp);
    esmd_buf_free(&b);
}

__attribute__((format(printf, 4, 0))) static void vlog(enum esmd_log_level lvl,
                                                       const struct esmd_log_ctx *ctx,
                                                       long suppressed, const char *fmt, va_list ap)
{
    char msg[2048];
    vsnprintf(msg, sizeof(msg), fmt, ap);
    write_line(lvl, ctx, suppressed, msg, NULL, 0);
}

void esmd_log(enum esmd_log_level lvl, const struct esmd_log_ctx *ctx, const char *fmt, ...)
{
    if (lvl < g_level)
        return;
    va_list ap;
    va_start(ap, fmt);
    vlog(lvl, ctx, 0, fmt, ap);
    va_end(ap);
}

/* A small table of rate-limit slots keyed by the static key pointer and the scope. */
struct limit_slot {
    const char *key;
    const char *mapping;
    const char *function;
    double last;
    long suppressed;
};

static struct limit_slot g_slots[64];

void esmd_log_limited(enum esmd_log_level lvl, const struct esmd_log_ctx *ctx, const char *key,
                      const char *fmt, ...)
{
    if (lvl < g_level)
        return;
    const char *m = ctx ? ctx->mapping : NULL;
    const char *f = ctx ? ctx->function : NULL;
    unsigned h = (unsigned)((uintptr_t)key >> 3) ^ (unsigned)((uintptr_t)m >> 3) * 31u ^
                 (unsigned)((uintptr_t)f >> 3) * 131u;
    struct limit_slot *s = &g_slots[h % ESMD_ARRAY_LEN(g_slots)];
    double now = esmd_mono();
    long suppressed = 0;
    if (s->key == key && s->mapping == m && s->function == f) {
        if (now - s->last < 1.0) {
            s->suppressed++;
            return;
        }
        suppressed = s->suppressed;
    }
    s->key = key;
    s->mapping = m;
    s->function = f;
    s->last = now;
    s->suppressed = 0;
    va_list ap;
    va_start(ap, fmt);
    vlog(lvl, ctx, suppressed, fmt, ap);
    va_end(ap);
}

/* ---- event source mapping system logs ---- */

static const struct {
    const char *name;
    int level; /* enum esmd_esm_log_level */
    const char *level_name;
    enum esmd_log_level log_level;
} esm_events[] = {
    [ESMD_ESM_POLLER_STATUS] = {"POLLER_STATUS_EVENT", ESMD_ESM_LOG_INFO, "INFO", ESMD_LOG_INFO},
    [ESMD_ESM_KAFKA_STATUS] = {"KAFKA_STATUS_EVENT", ESMD_ESM_LOG_DEBUG, "DEBUG", ESMD_LOG_DEBUG},
    [ESMD_ESM_PROCESSING] = {"ESM_PROCESSING_EVENT", ESMD_ESM_LOG_WARN, "WARN", ESMD_LOG_WARN},
};

bool esmd_esm_log_enabled(int configured, enum esmd_esm_event type)
{
    return configured != ESMD_ESM_LOG_OFF && esm_events[type].level >= configured;
}

void esmd_esm_log(int configured, const struct esmd_log_ctx *ctx, enum esmd_esm_event type,
                  const char *members, size_t len)
{
    if (!esmd_esm_log_enabled(configured, type))
        return;
    struct esmd_buf b = ESMD_BUF_INIT;
    esmd_buf_printf(&b, ",\"eventType\":\"%s\",\"logLevel\":\"%s\"", esm_events[type].name,
                    esm_events[type].level_name);
    if (members)
        esmd_buf_append(&b, members, len);
    write_line(esm_events[type].log_level, ctx, 0, esm_events[type].name, b.data, b.len);
    esmd_buf_free(&b);
}
