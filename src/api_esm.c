/* Lambda's event-source-mapping API (docs/admin.md): ListEventSourceMappings,
 * GetEventSourceMapping and UpdateEventSourceMapping under /2015-03-31/event-source-mappings
 * (Enabled, BatchSize, MaximumBatchingWindowInSeconds, FilterCriteria, DestinationConfig,
 * ParallelizationFactor of Kafka and Redis mappings). A
 * mapping's UUID is a UUIDv5 (SHA-1, RFC 4122 section 4.3) of its name in a fixed esmd
 * namespace, so every instance and every restart agree on it. Changes go through the override
 * store (src/admin_store.c). */
#include "admin_store.h"
#include "esmd/admin_auth.h"
#include "esmd/destination.h"
#include "esmd/filter.h"
#include "esmd/lambda_api.h"

#include <cJSON.h>
#include <ctype.h>
#include <inttypes.h>
#include <openssl/sha.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define ESM_PATH "/2015-03-31/event-source-mappings"
#define ESM_PAGE_MAX 100 /* ListEventSourceMappings: at most 100 a page, as Lambda */
#define ESM_NOT_FOUND "The resource you requested does not exist."
#define ESM_FUNCTION_MAX 140 /* FunctionName of List and Update */

static const struct esmd_api_range esm_batch = {"BatchSize", NULL, 1, 10000};
static const struct esmd_api_range esm_window = {"MaximumBatchingWindowInSeconds", NULL, 0, 300};
static const struct esmd_api_range esm_max_items = {"MaxItems", NULL, 1, 10000};
static const struct esmd_api_range esm_factor = {"ParallelizationFactor", NULL, 1,
                                                 ESMD_CFG_MAX_PARALLELIZATION};

/* ---- UUIDv5 ---- */

void esmd_admin_mapping_uuid(const char *name, char out[37])
{
    /* esmd's namespace for mapping names: 5c3c8f5e-6d1a-4f0b-9a57-3e2d7b1c8e40 */
    static const uint8_t ns[16] = {0x5c, 0x3c, 0x8f, 0x5e, 0x6d, 0x1a, 0x4f, 0x0b,
                                   0x9a, 0x57, 0x3e, 0x2d, 0x7b, 0x1c, 0x8e, 0x40};
    struct esmd_buf in = ESMD_BUF_INIT;
    uint8_t h[SHA_DIGEST_LENGTH];
    size_t o = 0;

    esmd_buf_append(&in, ns, sizeof(ns));
    esmd_buf_puts(&in, name);
    SHA1((const unsigned char *)in.data, in.len, h);
    esmd_buf_free(&in);
    h[6] = (uint8_t)((h[6] & 0x0f) | 0x50);
    h[8] = (uint8_t)((h[8] & 0x3f) | 0x80);
    for (int i = 0; i < 16; i++) {
        if (i == 4 || i == 6 || i == 8 || i == 10)
            out[o++] = '-';
        snprintf(out + o, 3, "%02x", h[i]);
        o += 2;
    }
    out[o] = '\0';
}

/* ---- the ESM configuration ---- */

static void put_seconds(struct esmd_buf *b, int64_t ms)
{
    esmd_buf_printf(b, "%" PRId64 ".%03d", ms / 1000, (int)(ms % 1000));
}

static const char *adm_start_name(enum esmd_starting_position p)
{
    switch (p) {
    case ESMD_START_LATEST:
        return "LATEST";
    case ESMD_START_AT_TIMESTAMP:
        return "AT_TIMESTAMP";
    default:
        return "TRIM_HORIZON";
    }
}

static int64_t adm_last_modified(const struct esmd_admin *adm, const struct adm_map *m)
{
    return m->ovr.present ? m->ovr.updated_ms : adm->started_ms;
}

/* The event source as a string where Lambda has EventSourceArn (redis, pgqueue): an esmd URI. */
static void adm_source_uri(const struct esmd_mapping_cfg *c, struct esmd_buf *b)
{
    if (c->kind == ESMD_SOURCE_REDIS)
        esmd_buf_printf(b, "redis://%s/%s", c->redis.connection, c->redis.stream);
    else if (c->kind == ESMD_SOURCE_PGQUEUE)
        esmd_buf_printf(b, "pgqueue://%s", c->pgqueue.queue);
}

/* Lambda's ESM configuration (docs/lambda.md#esm-response) for m. */
/* ,"SchemaRegistryConfig":{...} of a Kafka source with a schema registry (docs/admin.md): Lambda's
 * shape; AccessConfigs name what is configured (URI: the file for certificates, none for basic
 * auth: esmd has no secrets manager, and the password is never shown); a user:password@ in the
 * URL is left out. */
static void put_schema_registry(struct esmd_buf *b, const struct esmd_schema_registry_cfg *sr)
{
    if (!sr->set || !sr->url)
        return;
    const char *url = sr->url, *host = strstr(url, "://");
    host = host ? host + 3 : url;
    size_t hostlen = strcspn(host, "/?#");
    const char *at = memchr(host, '@', hostlen);
    struct esmd_buf shown = ESMD_BUF_INIT;
    esmd_buf_append(&shown, url, (size_t)(host - url));
    esmd_buf_puts(&shown, at ? at + 1 : host);
    esmd_buf_puts(b, ",\"SchemaRegistryConfig\":{\"SchemaRegistryURI\":");
    adm_put_str(b, esmd_buf_cstr(&shown));
    esmd_buf_free(&shown);
    esmd_buf_puts(b, ",\"EventRecordFormat\":");
    adm_put_str(b, sr->event_record_format == ESMD_SCHEMA_RECORD_SOURCE ? "SOURCE" : "JSON");
    esmd_buf_puts(b, ",\"AccessConfigs\":[");
    bool any = false;
    if (sr->username) {
        esmd_buf_puts(b, "{\"Type\":\"BASIC_AUTH\"}");
        any = true;
    }
    if (sr->cert_file) {
        esmd_buf_puts(b, any ? ",{\"Type\":\"CLIENT_CERTIFICATE_TLS_AUTH\",\"URI\":"
                             : "{\"Type\":\"CLIENT_CERTIFICATE_TLS_AUTH\",\"URI\":");
        adm_put_str(b, sr->cert_file);
        esmd_buf_putc(b, '}');
        any = true;
    }
    if (sr->ca_file) {
        esmd_buf_puts(b, any ? ",{\"Type\":\"SERVER_ROOT_CA_CERT\",\"URI\":"
                             : "{\"Type\":\"SERVER_ROOT_CA_CERT\",\"URI\":");
        adm_put_str(b, sr->ca_file);
        esmd_buf_putc(b, '}');
    }
    esmd_buf_puts(b, "],\"SchemaValidationConfigs\":[");
    for (size_t i = 0; i < sr->nvalidate; i++)
        esmd_buf_puts(b, strcmp(sr->validate[i], "key") == 0
                             ? (i ? ",{\"Attribute\":\"KEY\"}" : "{\"Attribute\":\"KEY\"}")
                             : (i ? ",{\"Attribute\":\"VALUE\"}" : "{\"Attribute\":\"VALUE\"}"));
    esmd_buf_puts(b, "]}");
}

void esmd_admin_esm_json(const struct esmd_admin *adm, const struct adm_map *m, struct esmd_buf *b)
{
    const struct esmd_mapping_cfg *c = m->cfg;
    char arn[512];
    bool first = true, stream = c->kind != ESMD_SOURCE_PGQUEUE;
    size_t nf = adm_cur_nfilters(m);
    const char *dest = adm_cur_on_failure(m);

    esmd_buf_putc(b, '{');
    adm_put_key(b, &first, "UUID");
    adm_put_str(b, m->uuid);
    adm_put_key(b, &first, "EventSourceMappingArn");
    snprintf(arn, sizeof(arn), "arn:aws:lambda:%s:%s:event-source-mapping:%s", esmd_aws_region(),
             esmd_aws_account(), m->uuid);
    adm_put_str(b, arn);
    if (c->kind != ESMD_SOURCE_KAFKA) {
        struct esmd_buf src = ESMD_BUF_INIT;

        adm_source_uri(c, &src);
        adm_put_key(b, &first, "EventSourceArn");
        adm_put_str(b, esmd_buf_cstr(&src));
        esmd_buf_free(&src);
    }
    adm_put_key(b, &first, "FunctionArn");
    esmd_function_arn(c->function, arn, sizeof(arn));
    adm_put_str(b, arn);
    if (c->kind == ESMD_SOURCE_KAFKA || c->kind == ESMD_SOURCE_REDIS) {
        enum esmd_starting_position sp =
            c->kind == ESMD_SOURCE_KAFKA ? c->kafka.starting_position : c->redis.starting_position;
        adm_put_key(b, &first, "StartingPosition");
        adm_put_str(b, adm_start_name(sp));
        if (c->kind == ESMD_SOURCE_KAFKA && sp == ESMD_START_AT_TIMESTAMP) {
            adm_put_key(b, &first, "StartingPositionTimestamp");
            put_seconds(b, c->kafka.starting_position_timestamp_ms);
        }
    }
    adm_put_key(b, &first, "BatchSize");
    esmd_buf_printf(b, "%d", adm_cur_batch(m));
    adm_put_key(b, &first, "MaximumBatchingWindowInSeconds");
    esmd_buf_printf(b, "%" PRId64, adm_cur_window(m) / 1000);
    if (nf > 0) {
        adm_put_key(b, &first, "FilterCriteria");
        esmd_buf_puts(b, "{\"Filters\":[");
        for (size_t i = 0; i < nf; i++) {
            esmd_buf_puts(b, i ? ",{\"Pattern\":" : "{\"Pattern\":");
            adm_put_str(b, adm_cur_filter(m, i));
            esmd_buf_putc(b, '}');
        }
        esmd_buf_puts(b, "]}");
    }
    adm_put_key(b, &first, "LastModified");
    put_seconds(b, adm_last_modified(adm, m));
    adm_put_key(b, &first, "LastProcessingResult");
    adm_put_str(b, adm_last_result(m));
    adm_put_key(b, &first, "State");
    adm_put_str(b, adm_eff_enabled(m) ? "Enabled" : "Disabled");
    adm_put_key(b, &first, "StateTransitionReason");
    adm_put_str(b, m->ovr.present ? "User action" : "Configuration file");
    if (stream) {
        adm_put_key(b, &first, "DestinationConfig");
        if (dest) {
            esmd_buf_puts(b, "{\"OnFailure\":{\"Destination\":");
            adm_put_str(b, dest);
            esmd_buf_puts(b, "}}");
        } else {
            esmd_buf_puts(b, "{}");
        }
        adm_put_key(b, &first, "MaximumRecordAgeInSeconds");
        esmd_buf_printf(b, "%" PRId64,
                        c->maximum_record_age_ms < 0 ? (int64_t)-1
                                                     : c->maximum_record_age_ms / 1000);
        adm_put_key(b, &first, "BisectBatchOnFunctionError");
        esmd_buf_puts(b, c->bisect_batch_on_function_error ? "true" : "false");
        adm_put_key(b, &first, "MaximumRetryAttempts");
        esmd_buf_printf(b, "%d", c->maximum_retry_attempts);
        adm_put_key(b, &first, "ParallelizationFactor");
        esmd_buf_printf(b, "%d", adm_cur_factor(m));
    }
    adm_put_key(b, &first, "FunctionResponseTypes");
    esmd_buf_puts(b, c->report_batch_item_failures ? "[\"ReportBatchItemFailures\"]" : "[]");
    if (c->system_log_level != ESMD_ESM_LOG_OFF) {
        static const char *const levels[] = {[ESMD_ESM_LOG_DEBUG] = "DEBUG",
                                             [ESMD_ESM_LOG_INFO] = "INFO",
                                             [ESMD_ESM_LOG_WARN] = "WARN"};
        adm_put_key(b, &first, "LoggingConfig");
        esmd_buf_printf(b, "{\"SystemLogLevel\":\"%s\"}", levels[c->system_log_level]);
    }
    if (c->kind == ESMD_SOURCE_KAFKA) {
        const char *s = c->kafka.conn ? c->kafka.conn->bootstrap_servers : "";
        bool f2 = true;

        adm_put_key(b, &first, "Topics");
        esmd_buf_putc(b, '[');
        for (size_t i = 0; i < c->kafka.ntopics; i++) {
            if (i)
                esmd_buf_putc(b, ',');
            adm_put_str(b, c->kafka.topics[i]);
        }
        esmd_buf_putc(b, ']');
        adm_put_key(b, &first, "SelfManagedEventSource");
        esmd_buf_puts(b, "{\"Endpoints\":{\"KAFKA_BOOTSTRAP_SERVERS\":[");
        while (s && *s) {
            size_t n;

            while (*s == ',' || isspace((unsigned char)*s))
                s++;
            n = strcspn(s, ", \t");
            if (n > 0) {
                if (!f2)
                    esmd_buf_putc(b, ',');
                f2 = false;
                esmd_buf_put_json_string(b, s, n);
            }
            s += n;
        }
        esmd_buf_puts(b, "]}}");
        adm_put_key(b, &first, "SelfManagedKafkaEventSourceConfig");
        esmd_buf_puts(b, "{\"ConsumerGroupId\":");
        adm_put_str(b, c->kafka.consumer_group ? c->kafka.consumer_group : "");
        put_schema_registry(b, &c->kafka.schema_registry);
        esmd_buf_putc(b, '}');
    }
    if (c->kind == ESMD_SOURCE_PGQUEUE) {
        adm_put_key(b, &first, "ScalingConfig");
        esmd_buf_printf(b, "{\"MaximumConcurrency\":%d}", c->pgqueue.maximum_concurrency);
    }
    esmd_buf_putc(b, '}');
}

/* ---- UpdateEventSourceMapping ---- */

/* FunctionName of List and Update into name ("" for a function of another region or account);
 * false when malformed. */
static bool esm_function_name(const char *s, char name[ESMD_API_NAME_MAX + 1])
{
    struct esmd_api_fn fn;

    if (strlen(s) > ESM_FUNCTION_MAX || esmd_api_function_parse(s, strlen(s), &fn) != 0)
        return false;
    snprintf(name, ESMD_API_NAME_MAX + 1, "%s", fn.ours ? fn.name : "");
    return true;
}

/* Reads FilterCriteria into ch (patterns borrowed from v). false with e. */
static bool esm_read_filters(struct esmd_api_err *e, const struct esmd_mapping_cfg *c,
                             const cJSON *v, struct adm_change *ch)
{
    const cJSON *fl, *it;
    size_t i = 0;

    if (!cJSON_IsObject(v)) {
        esmd_api_err_bad(e,
                         "FilterCriteria must be an object {\"Filters\":[{\"Pattern\":\"...\"}]}");
        return false;
    }
    cJSON_ArrayForEach(it, v)
    {
        if (strcmp(it->string, "Filters") != 0) {
            esmd_api_err_bad(e, "FilterCriteria: unknown field \"%s\" (expected Filters)",
                             it->string);
            return false;
        }
    }
    ch->has_filters = true;
    fl = cJSON_GetObjectItemCaseSensitive(v, "Filters");
    if (fl == NULL || cJSON_IsNull(fl))
        return true; /* {} removes all filters */
    if (!cJSON_IsArray(fl)) {
        esmd_api_err_bad(e, "FilterCriteria.Filters must be an array");
        return false;
    }
    if (cJSON_GetArraySize(fl) > c->max_filters) {
        esmd_api_err_bad(
            e,
            "FilterCriteria.Filters: at most %d filters for this mapping (its max_filters), "
            "got %d",
            c->max_filters, cJSON_GetArraySize(fl));
        return false;
    }
    free(ch->filters); /* a second FilterCriteria */
    ch->filters = esmd_xcalloc((size_t)cJSON_GetArraySize(fl) + 1, sizeof(char *));
    size_t budget = ESMD_FILTER_MAX_MAPPING_BYTES; /* compiled size left for the mapping */
    cJSON_ArrayForEach(it, fl)
    {
        const cJSON *p = cJSON_GetObjectItemCaseSensitive(it, "Pattern");
        struct esmd_filter_error fe;
        size_t len;

        if (!cJSON_IsObject(it) || !cJSON_IsString(p) || cJSON_GetArraySize(it) != 1) {
            esmd_api_err_bad(e, "FilterCriteria.Filters[%zu] must be {\"Pattern\": string}", i);
            return false;
        }
        len = strlen(p->valuestring);
        if (len > (size_t)c->max_filter_pattern_length) {
            esmd_api_err_bad(
                e,
                "FilterCriteria.Filters[%zu].Pattern is %zu characters long; at most %d for "
                "this mapping (its max_filter_pattern_length)",
                i, len, c->max_filter_pattern_length);
            return false;
        }
        if (esmd_filter_check_budget(p->valuestring, len, &budget, &fe) != 0) {
            esmd_api_err_bad(
                e,
                "Invalid filter pattern definition. FilterCriteria.Filters[%zu].Pattern:%d:%d: %s",
                i, fe.line, fe.column, fe.message);
            return false;
        }
        ch->filters[i++] = p->valuestring;
    }
    ch->nfilters = i;
    return true;
}

static bool esm_read_destination(struct esmd_api_err *e, const struct esmd_dests *dests,
                                 const struct esmd_mapping_cfg *c, const cJSON *v,
                                 struct adm_change *ch)
{
    const cJSON *it, *of, *d;
    char err[512];

    if (!cJSON_IsObject(v)) {
        esmd_api_err_bad(
            e, "DestinationConfig must be an object {\"OnFailure\":{\"Destination\":...}}");
        return false;
    }
    cJSON_ArrayForEach(it, v)
    {
        if (strcmp(it->string, "OnFailure") != 0) {
            esmd_api_err_bad(
                e, "Unsupported DestinationConfig parameter for given event source mapping "
                   "type.");
            return false;
        }
    }
    of = cJSON_GetObjectItemCaseSensitive(v, "OnFailure");
    if (of == NULL)
        return true;
    if (c->kind == ESMD_SOURCE_PGQUEUE) {
        esmd_api_err_bad(e,
                         "Unsupported DestinationConfig parameter for given event source mapping "
                         "type. (a pgqueue mapping dead-letters to its dead_letter_queue)");
        return false;
    }
    if (!cJSON_IsObject(of)) {
        esmd_api_err_bad(e,
                         "DestinationConfig.OnFailure must be an object {\"Destination\": string}");
        return false;
    }
    cJSON_ArrayForEach(it, of)
    {
        if (strcmp(it->string, "Destination") != 0) {
            esmd_api_err_bad(e, "DestinationConfig.OnFailure: unknown field \"%s\"", it->string);
            return false;
        }
    }
    d = cJSON_GetObjectItemCaseSensitive(of, "Destination");
    if (d == NULL || cJSON_IsNull(d)) {
        ch->on_failure = "";
        return true;
    }
    if (!cJSON_IsString(d) || strlen(d->valuestring) > 2048) {
        esmd_api_err_bad(e, "DestinationConfig.OnFailure.Destination must be a destination URI (at "
                            "most 2048 characters) or \"\"");
        return false;
    }
    if (d->valuestring[0] != '\0') {
        if (dests == NULL) {
            esmd_api_err_bad(
                e, "DestinationConfig.OnFailure.Destination: destinations are not available");
            return false;
        }
        if (esmd_dests_check(dests, d->valuestring, err, sizeof(err)) != 0) {
            esmd_api_err_bad(e, "DestinationConfig.OnFailure.Destination: %s", err);
            return false;
        }
        if (strncmp(d->valuestring, "function://", 11) == 0) {
            esmd_api_err_bad(e,
                             "DestinationConfig.OnFailure.Destination: a function:// destination "
                             "needs the async invocation queue");
            return false;
        }
    }
    ch->on_failure = d->valuestring;
    return true;
}

/* Parses an UpdateEventSourceMapping body for mapping c into ch (strings borrowed from *root,
 * which the caller deletes, and ch->filters, which it frees). dests NULL: destinations refused.
 * false with e. */
/* A pgqueue mapping reading a FIFO queue (its name ends in ".fifo", docs/pgqueue.md#fifo-queues):
 * as Lambda, no batching window (each claim of its groups is sent as one batch at once). */
static bool esm_fifo_queue(const struct esmd_mapping_cfg *c)
{
    size_t n = c->kind == ESMD_SOURCE_PGQUEUE && c->pgqueue.queue ? strlen(c->pgqueue.queue) : 0;
    return n > 5 && strcmp(c->pgqueue.queue + n - 5, ".fifo") == 0;
}

static bool esm_parse(const struct esmd_mapping_cfg *c, const struct esmd_dests *dests,
                      const char *body, size_t len, cJSON **root, struct adm_change *ch,
                      struct esmd_api_err *e)
{
    static const char *const fixed[] = {
        "MaximumRetryAttempts",
        "MaximumRecordAgeInSeconds",
        "BisectBatchOnFunctionError",
        "FunctionResponseTypes",
        "TumblingWindowInSeconds",
        "ScalingConfig",
        "SourceAccessConfigurations",
        "KMSKeyArn",
        "MetricsConfig",
        "ProvisionedPollerConfig",
        "DocumentDBEventSourceConfig",
        "LoggingConfig",
        "SelfManagedKafkaEventSourceConfig",
    };
    const cJSON *v;
    int64_t n;

    if ((*root = esmd_api_parse_object(body, len, true, e)) == NULL)
        return false;
    cJSON_ArrayForEach(v, *root)
    {
        const char *k = v->string;

        if (strcmp(k, "Enabled") == 0) {
            if (!cJSON_IsBool(v)) {
                esmd_api_err_bad(e, "Enabled must be true or false");
                return false;
            }
            ch->enabled = cJSON_IsTrue(v);
        } else if (strcmp(k, esm_batch.name) == 0) {
            if (!esmd_api_json_int(v, &esm_batch, &n)) {
                esmd_api_range_err(e, &esm_batch, NULL);
                return false;
            }
            ch->batch_size = (int)n;
        } else if (strcmp(k, esm_window.name) == 0) {
            if (!esmd_api_json_int(v, &esm_window, &n)) {
                esmd_api_range_err(e, &esm_window, NULL);
                return false;
            }
            ch->window_ms = n * 1000;
            if (n > 0 && esm_fifo_queue(c)) {
                esmd_api_err_bad(e,
                                 "MaximumBatchingWindowInSeconds is not supported for FIFO "
                                 "queues (%s)",
                                 c->pgqueue.queue);
                return false;
            }
        } else if (strcmp(k, esm_factor.name) == 0) {
            if (c->kind == ESMD_SOURCE_PGQUEUE) {
                esmd_api_err_bad(e,
                                 "ParallelizationFactor: a pgqueue source has none (mapping "
                                 "%s); it is for Kafka and Redis-stream mappings",
                                 c->name);
                return false;
            }
            if (!esmd_api_json_int(v, &esm_factor, &n)) {
                esmd_api_range_err(e, &esm_factor, NULL);
                return false;
            }
            ch->parallelization_factor = (int)n;
        } else if (strcmp(k, "FilterCriteria") == 0) {
            if (!esm_read_filters(e, c, v, ch))
                return false;
        } else if (strcmp(k, "DestinationConfig") == 0) {
            if (!esm_read_destination(e, dests, c, v, ch))
                return false;
        } else if (strcmp(k, "FunctionName") == 0) {
            char name[ESMD_API_NAME_MAX + 1];

            if (!cJSON_IsString(v) || !esm_function_name(v->valuestring, name)) {
                esmd_api_err_bad(e, "FunctionName must be a function name or ARN");
                return false;
            }
            if (strcmp(name, c->function) != 0) {
                esmd_api_err_bad(e,
                                 "FunctionName: esmd does not move a mapping to another function "
                                 "at run time; change `function` of mapping %s in the "
                                 "configuration file",
                                 c->name);
                return false;
            }
        } else {
            bool known = false;

            for (size_t i = 0; i < ESMD_ARRAY_LEN(fixed); i++)
                known = known || strcmp(k, fixed[i]) == 0;
            if (known)
                esmd_api_err_bad(e,
                                 "%s cannot be changed at run time in esmd; set it for mapping %s "
                                 "in the configuration file",
                                 k, c->name);
            else
                esmd_api_err_bad(e, "unknown field \"%.100s\"", k);
            return false;
        }
    }
    return true;
}

int esmd_admin_esm_check(const struct esmd_mapping_cfg *c, const char *body, size_t len, char *why,
                         size_t whylen)
{
    struct adm_change ch = {.enabled = -1, .window_ms = -1};
    struct esmd_api_err e;
    cJSON *root = NULL;
    int status = 0;

    if (!esm_parse(c, NULL, body, len, &root, &ch, &e)) {
        snprintf(why, whylen, "%s: %s", e.type, e.message);
        status = e.status;
    }
    free(ch.filters);
    cJSON_Delete(root);
    return status;
}

static void esm_update(struct esmd_admin *adm, struct esmd_api_call *call, const char *uuid)
{
    struct adm_change ch = {.enabled = -1, .window_ms = -1};
    size_t mi, len;
    struct adm_map *m = esmd_admin_find_uuid(adm, uuid, &mi);
    const char *body = esmd_http_req_body(call->req, &len);
    struct esmd_api_err e;
    cJSON *root = NULL;

    if (m == NULL) {
        esmd_api_error(call, 404, "ResourceNotFoundException", ESM_NOT_FOUND);
        return;
    }
    if (!esm_parse(m->cfg, adm->dests, body, len, &root, &ch, &e))
        esmd_api_answer_err(call, &e);
    else if (ch.enabled < 0 && ch.batch_size == 0 && ch.window_ms < 0 && !ch.has_filters &&
             ch.on_failure == NULL && ch.parallelization_factor == 0)
        esmd_admin_answer_mapping(adm, call, m, true, 202);
    else
        esmd_admin_change(adm, call, mi, &ch, true);
    free(ch.filters);
    cJSON_Delete(root);
}

/* ---- ListEventSourceMappings / GetEventSourceMapping ---- */

static void esm_list(struct esmd_admin *adm, struct esmd_api_call *call)
{
    const char *fn = esmd_http_req_query(call->req, "FunctionName");
    const char *src = esmd_http_req_query(call->req, "EventSourceArn");
    const char *marker = esmd_http_req_query(call->req, "Marker");
    const char *maxs = esmd_http_req_query(call->req, "MaxItems");
    const struct esmd_api_range markers = {"Marker", NULL, 0, (int64_t)adm->nmaps};
    char name[ESMD_API_NAME_MAX + 1];
    int64_t start = 0, max = ESM_PAGE_MAX, count = 0;
    struct esmd_buf b = ESMD_BUF_INIT;
    size_t i;

    if (fn && !esm_function_name(fn, name)) {
        esmd_api_bad(call, "FunctionName must be a function name or ARN (1 to 140 characters)");
        return;
    }
    if (marker && !esmd_api_query_int(marker, &markers, &start)) {
        esmd_api_bad(call, "Marker is not one this API returned");
        return;
    }
    if (maxs && !esmd_api_query_int(maxs, &esm_max_items, &max)) {
        esmd_api_range_error(call, &esm_max_items, maxs);
        return;
    }
    if (src && (strlen(src) == 0 || strlen(src) > 1024)) {
        esmd_api_bad(call, "EventSourceArn must be 1 to 1024 characters");
        return;
    }
    if (max > ESM_PAGE_MAX)
        max = ESM_PAGE_MAX;
    esmd_buf_puts(&b, "{\"EventSourceMappings\":[");
    for (i = (size_t)start; i < adm->nmaps; i++) {
        const struct adm_map *m = &adm->maps[i];

        if (fn && strcmp(m->cfg->function, name) != 0)
            continue;
        if (src) {
            struct esmd_buf u = ESMD_BUF_INIT;
            bool same;

            adm_source_uri(m->cfg, &u);
            same = strcmp(esmd_buf_cstr(&u), src) == 0;
            esmd_buf_free(&u);
            if (!same)
                continue;
        }
        if (count == max)
            break;
        if (count++ > 0)
            esmd_buf_putc(&b, ',');
        esmd_admin_esm_json(adm, m, &b);
    }
    esmd_buf_putc(&b, ']');
    if (i < adm->nmaps)
        esmd_buf_printf(&b, ",\"NextMarker\":\"%zu\"", i);
    esmd_buf_putc(&b, '}');
    esmd_api_respond_json(call, 200, &b);
    esmd_buf_free(&b);
}

/* A UUID (any case): 8-4-4-4-12 hex digits. */
static bool esm_is_uuid(const char *s)
{
    if (strlen(s) != 36)
        return false;
    for (size_t i = 0; i < 36; i++) {
        bool dash = i == 8 || i == 13 || i == 18 || i == 23;

        if (dash ? s[i] != '-' : !isxdigit((unsigned char)s[i]))
            return false;
    }
    return true;
}

static void esm_route(void *ud, struct esmd_http_req *req)
{
    struct esmd_admin *adm = ud;
    const char *method = esmd_http_req_method(req);
    struct esmd_api_call call;
    struct esmd_api_path p;
    struct adm_map *m;

    esmd_api_begin(&call, req);
    if (!esmd_admin_authorize(adm->auth, req))
        return;
    if (!esmd_api_path_split(&call, &p))
        return;
    if (p.n < 2 || p.n > 3 || strcmp(p.seg[0], "2015-03-31") != 0 ||
        strcmp(p.seg[1], "event-source-mappings") != 0) {
        esmd_api_error(&call, 404, "ResourceNotFoundException", ESM_NOT_FOUND);
    } else if (p.n == 2) {
        if (strcmp(method, "PUT") == 0)
            esmd_api_error(&call, 404, "ResourceNotFoundException", ESM_NOT_FOUND);
        else
            esm_list(adm, &call);
    } else if (!esm_is_uuid(p.seg[2])) {
        esmd_api_error(&call, 404, "ResourceNotFoundException", ESM_NOT_FOUND);
    } else if (strcmp(method, "PUT") == 0) {
        esm_update(adm, &call, p.seg[2]);
    } else if ((m = esmd_admin_find_uuid(adm, p.seg[2], NULL)) == NULL) {
        esmd_api_error(&call, 404, "ResourceNotFoundException", ESM_NOT_FOUND);
    } else {
        esmd_admin_answer_mapping(adm, &call, m, true, 200);
    }
    esmd_api_path_free(&p);
}

int esmd_admin_esm_routes(struct esmd_admin *adm, struct esmd_http *http, esmd_http_limit_fn limit)
{
    if (esmd_http_route_limited(http, "GET", ESM_PATH, esm_route, limit, adm) != 0 ||
        esmd_http_route_limited(http, "GET", ESM_PATH "/*", esm_route, limit, adm) != 0 ||
        esmd_http_route_limited(http, "PUT", ESM_PATH "/*", esm_route, limit, adm) != 0)
        return ESMD_EINVAL;
    return ESMD_OK;
}
