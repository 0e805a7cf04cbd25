/* The YAML configuration (docs/configuration.md): loading, validation, typed structs.
 *
 * libyaml events are turned into nodes that keep file:line:column; each section is read through
 * a key table; every problem is collected (not only the first) as
 *   FILE:LINE:COL: KEY-PATH: message naming the allowed values
 * Unknown keys are errors. ${VAR} in scalars is replaced from the environment (unset = error). */
#ifndef ESMD_CONFIG_H
#define ESMD_CONFIG_H

#include "esmd/common.h"

/* ---- errors ---- */

struct esmd_config_error {
    char *file;    /* owned */
    int line, col; /* 1-based; 0 when unknown */
    char *key;     /* owned; key path like "mappings[0].batch_size" ("" for the document) */
    char *message; /* owned */
};

struct esmd_config_errors {
    struct esmd_config_error *items; /* owned */
    size_t n, cap;
};

void esmd_config_errors_init(struct esmd_config_errors *errs);
void esmd_config_errors_free(struct esmd_config_errors *errs);
/* Writes "file:line:col: key: message" (one line, no newline) into out. */
void esmd_config_error_format(const struct esmd_config_error *e, char *out, size_t outlen);

/* ---- typed configuration ---- */

struct esmd_kv {
    char *key;   /* owned */
    char *value; /* owned */
};

struct esmd_kvlist {
    struct esmd_kv *items; /* owned */
    size_t n;
};

enum esmd_conn_type { ESMD_CONN_KAFKA, ESMD_CONN_REDIS };

struct esmd_conn_cfg {
    char *name;
    enum esmd_conn_type type;
    char *bootstrap_servers;       /* kafka: required */
    struct esmd_kvlist properties; /* kafka: librdkafka properties, passed as is */
    char *url;                     /* redis: required, redis://host:port/db */
};

struct esmd_async_cfg {
    bool set;                     /* the `async` block was present */
    int maximum_retry_attempts;   /* 0..2, default 2 */
    int64_t maximum_event_age_ms; /* 60 s..6 h, default 6 h */
    char *on_success;             /* destination URI or NULL */
    char *on_failure;
    char *dead_letter;
};

struct esmd_function_cfg {
    char *name;
    char *url;                  /* required, http:// or https:// */
    int64_t timeout_ms;         /* 1 s..15 min, default 30 s (duration) */
    int max_concurrency;        /* 1..10000, default 10 */
    struct esmd_kvlist headers; /* extra request headers */
    struct esmd_async_cfg async;
};

enum esmd_source_kind { ESMD_SOURCE_KAFKA, ESMD_SOURCE_REDIS, ESMD_SOURCE_PGQUEUE };

enum esmd_starting_position {
    ESMD_START_TRIM_HORIZON,
    ESMD_START_LATEST,
    ESMD_START_AT_TIMESTAMP,
};

struct esmd_kafka_source_cfg {
    char *connection;                 /* name in `connections`, type kafka */
    const struct esmd_conn_cfg *conn; /* resolved; borrowed from the config */
    char **topics;                    /* owned; 1..n names */
    size_t ntopics;
    char *consumer_group;                          /* default "esmd-<mapping name>" */
    enum esmd_starting_position starting_position; /* default trim_horizon */
    int64_t starting_position_timestamp_ms;        /* with at_timestamp: required, not future */
};

/* The event a redis source sends (docs/redis.md). */
enum esmd_redis_event_format {
    ESMD_REDIS_EVENT_KINESIS, /* Lambda's Kinesis event (the default) */
    ESMD_REDIS_EVENT_NATIVE,  /* esmd's redis record: fields, binaryFields, deliveryCount */
};

struct esmd_redis_source_cfg {
    char *connection;
    const struct esmd_conn_cfg *conn;
    char *stream;
    char *group;
    char *consumer;                                /* NULL = stable instance id */
    enum esmd_starting_position starting_position; /* trim_horizon | latest */
    int64_t visibility_timeout_ms;                 /* default 30 s */
    enum esmd_redis_event_format event_format;     /* default kinesis */
    char *data_field;          /* kinesis: the field that is `data`; NULL = every field as JSON */
    char *partition_key_field; /* kinesis: the field that is `partitionKey`; NULL = entry ID */
};

struct esmd_pgqueue_source_cfg {
    char *queue;
    char *connection;              /* postgres conninfo; NULL = the service's `postgres` */
    const char *service_postgres;  /* borrowed: the top-level `postgres` (set by the loader) */
    int64_t visibility_timeout_ms; /* default 30 s */
    int max_receive_count;         /* 0 = no redrive; 1..1000 */
    char *dead_letter_queue;
    int maximum_concurrency; /* 2..1000, default 2 */
};

struct esmd_filter_cfg {
    char *pattern; /* owned: the pattern as JSON text (the YAML mapping converted) */
    int line, col; /* where it stands in the file */
};

struct esmd_mapping_cfg {
    char *name;                         /* required, unique; [A-Za-z0-9_.-]{1,64} */
    char *function;                     /* name in `functions` */
    const struct esmd_function_cfg *fn; /* resolved; borrowed */
    bool enabled;                       /* default true */
    enum esmd_source_kind kind;
    struct esmd_kafka_source_cfg kafka;     /* valid when kind == ESMD_SOURCE_KAFKA */
    struct esmd_redis_source_cfg redis;     /* ... REDIS */
    struct esmd_pgqueue_source_cfg pgqueue; /* ... PGQUEUE */
    int batch_size;                         /* 1..10000; default 100 (pgqueue: 10) */
    int64_t maximum_batching_window_ms;     /* 0..300 s; default 500 ms for kafka, 0 otherwise */
    struct esmd_filter_cfg *filters;        /* owned; OR'd */
    size_t nfilters;
    int max_filters;                     /* 1..100; default 5 (Lambda's quota) */
    int max_filter_pattern_length;       /* 1..65536; default 4096 (Lambda's limit) */
    int maximum_retry_attempts;          /* -1 or 0..10000; default -1 */
    int64_t maximum_record_age_ms;       /* -1 or 60 s..7 d; default -1 */
    bool bisect_batch_on_function_error; /* default false */
    bool report_batch_item_failures;     /* default false */
    char *on_failure;                    /* destination URI or NULL */
};

struct esmd_admin_cfg {
    char *listen;        /* host:port, default 127.0.0.1:9000 */
    char *token;         /* NULL = none */
    char *access_key_id; /* aws_credentials, NULL = none */
    char *secret_access_key;
};

/* The region and account of every ARN esmd writes or reads (docs/configuration.md, `aws`). */
struct esmd_aws_cfg {
    char *region;     /* default "us-east-1"; [a-z]{2}(-[a-z]+)+-[0-9]+ */
    char *account_id; /* default "000000000000"; 12 digits */
};

struct esmd_config {
    char *path;     /* the file it was read from */
    char *postgres; /* required conninfo / URI */
    struct esmd_aws_cfg aws;
    struct esmd_admin_cfg admin;
    struct esmd_conn_cfg *connections;
    size_t nconnections;
    struct esmd_function_cfg *functions;
    size_t nfunctions;
    struct esmd_mapping_cfg *mappings;
    size_t nmappings;
};

/* Reads and validates a file. Returns a config the caller frees with esmd_config_free(), or
 * NULL with every problem appended to errs (errs must be initialised). */
struct esmd_config *esmd_config_load(const char *path,
                                     struct esmd_config_errors *errs) ESMD_MUST_CHECK;
/* Same from memory; `filename` is used in messages only. */
struct esmd_config *esmd_config_parse(const char *text, size_t len, const char *filename,
                                      struct esmd_config_errors *errs) ESMD_MUST_CHECK;
/* Flags for esmd_config_parse_flags(). */
enum {
    /* Accept the features this version parses and validates but does not run yet (see
     * docs/configuration.md, "Not available yet"); for tests and for work on those features. */
    ESMD_CONFIG_ALLOW_UNBUILT = 1u << 0,
};
/* esmd_config_parse() with flags (ESMD_CONFIG_*); esmd_config_parse() is flags = 0. */
struct esmd_config *esmd_config_parse_flags(const char *text, size_t len, const char *filename,
                                            unsigned flags,
                                            struct esmd_config_errors *errs) ESMD_MUST_CHECK;
void esmd_config_free(struct esmd_config *cfg);
/* For tests: the key comparisons (string compares in key and name lookups) made by every load so
 * far in this process. Loading is linear: a file with four times the keys makes about four times
 * as many. */
uint64_t esmd_config_compares(void);

const struct esmd_function_cfg *esmd_config_function(const struct esmd_config *cfg,
                                                     const char *name);
const struct esmd_conn_cfg *esmd_config_connection(const struct esmd_config *cfg, const char *name);

/* Durations: integer + unit ms|s|m|h ("500ms", "30s", "5m", "6h"). Returns 0 or ESMD_EINVAL. */
int esmd_parse_duration_ms(const char *s, int64_t *out) ESMD_MUST_CHECK;
/* Sizes: integer with optional unit B|KB|MB (1 KB = 1024 B). Returns 0 or ESMD_EINVAL. */
int esmd_parse_size(const char *s, int64_t *out) ESMD_MUST_CHECK;

#endif
