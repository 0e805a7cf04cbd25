/* The YAML configuration (docs/configuration.md): loading, validation, typed structs.
 *
 * libyaml events are turned into nodes that keep file:line:column; each section is read through
 * a key table; every problem is collected (not only the first) as
 *   FILE:LINE:COL: KEY-PATH: message naming the allowed values
 * Unknown keys are errors. ${VAR} in scalars is replaced from the environment (unset = error). */
#ifndef ESMD_CONFIG_H
#define ESMD_CONFIG_H

#include "esmd/common.h"

#include <stddef.h>

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

enum esmd_source_kind { ESMD_SOURCE_KAFKA, ESMD_SOURCE_REDIS, ESMD_SOURCE_PGQUEUE };

/* The kind of a connection is that of the connector that declares its keys
 * (include/esmd/connector.h, conn_keys). */
enum esmd_conn_type { ESMD_CONN_KAFKA = ESMD_SOURCE_KAFKA, ESMD_CONN_REDIS = ESMD_SOURCE_REDIS };

struct esmd_conn_cfg {
    char *name;
    enum esmd_conn_type type;
    char *bootstrap_servers;       /* kafka: required */
    struct esmd_kvlist properties; /* kafka: librdkafka properties, passed as is */
    char *url;                     /* redis: required, redis://host:port/db (redis_link.h) */
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

enum esmd_starting_position {
    ESMD_START_TRIM_HORIZON,
    ESMD_START_LATEST,
    ESMD_START_AT_TIMESTAMP,
};

/* A Kafka source's schema registry (docs/kafka.md "Schema registry"; Lambda's
 * SchemaRegistryConfig). */
enum esmd_schema_record_format {
    ESMD_SCHEMA_RECORD_JSON,   /* the decoded data, as JSON (the default) */
    ESMD_SCHEMA_RECORD_SOURCE, /* the data as written, without the registry's framing */
};

struct esmd_schema_registry_cfg {
    bool set;        /* the block is in the file */
    char *url;       /* required: http:// or https://, a Confluent-compatible registry */
    char *username;  /* basic auth, with password */
    char *password;  /* never shown */
    char *ca_file;   /* PEM CA bundle for https */
    char *cert_file; /* client certificate (PEM), with key_file */
    char *key_file;
    enum esmd_schema_record_format event_record_format;
    char **validate; /* "key" | "value"; default value */
    size_t nvalidate;
};

struct esmd_kafka_source_cfg {
    char *connection;                 /* name in `connections`, type kafka */
    const struct esmd_conn_cfg *conn; /* resolved; borrowed from the config */
    char **topics;                    /* owned; 1..n names */
    size_t ntopics;
    char *consumer_group;                          /* default "esmd-<mapping name>" */
    enum esmd_starting_position starting_position; /* default trim_horizon */
    int64_t starting_position_timestamp_ms;        /* with at_timestamp: required, not future */
    struct esmd_schema_registry_cfg schema_registry;
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

/* A mapping's system logs: `logging: { system_log_level }`, Lambda's LoggingConfig
 * (docs/operations.md#esm-logging). A level lets its events and the less detailed ones through. */
enum esmd_esm_log_level {
    ESMD_ESM_LOG_OFF, /* no `logging`: no system logs */
    ESMD_ESM_LOG_DEBUG,
    ESMD_ESM_LOG_INFO,
    ESMD_ESM_LOG_WARN,
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
    int parallelization_factor; /* kafka, redis: 1..10, default 1 (lanes per shard); pgqueue: 0 */
    int64_t maximum_batching_window_ms; /* 0..300 s; default 500 ms for kafka, 0 otherwise */
    struct esmd_filter_cfg *filters;    /* owned; OR'd */
    size_t nfilters;
    int max_filters;                     /* 1..100; default 5 (Lambda's quota) */
    int max_filter_pattern_length;       /* 1..65536; default 4096 (Lambda's limit) */
    int maximum_retry_attempts;          /* -1 or 0..10000; default -1 */
    int64_t maximum_record_age_ms;       /* -1 or 60 s..7 d; default -1 */
    bool bisect_batch_on_function_error; /* default false */
    bool report_batch_item_failures;     /* default false */
    char *on_failure;                    /* destination URI or NULL */
    int system_log_level;                /* enum esmd_esm_log_level; OFF without `logging` */
};

struct esmd_admin_cfg {
    char *listen;        /* host:port, default 127.0.0.1:9000 */
    char *token;         /* NULL = none */
    char *access_key_id; /* aws_credentials, NULL = none */
    char *secret_access_key;
    int max_connections_per_client; /* 1..100000; 0 = the listener's default (512) */
};

/* The region and account of every ARN esmd writes or reads (docs/configuration.md, `aws`). */
struct esmd_aws_cfg {
    char *region;     /* default "us-east-1"; [a-z]{2}(-[a-z]+)+-[0-9]+ */
    char *account_id; /* default "000000000000"; 12 digits */
};

/* How the asynchronous invocation queue runs (docs/configuration.md, `async_queue`). */
struct esmd_async_queue_cfg {
    int64_t retry_base_ms;   /* 1 ms..1 h, default 1 m: retry n of a function error after n × */
    int64_t backoff_base_ms; /* 1 ms..1 h, default 1 s: throttles and system errors, doubling */
    int64_t backoff_cap_ms;  /* 1 ms..1 h, default 5 m: ... up to this */
    int64_t poll_ms;         /* 10 ms..1 m, default 1 s: claims without a wake-up */
    int64_t lease_ms;        /* 1 s..1 h, or -1 (default): 2 × the function's timeout + 30 s */
    int max_payload;         /* bytes, 1..6 MB, default 1 MB: an Event invocation's payload */
    bool workers;            /* default true; false: accept events, never claim any */
    int insert_connections;  /* 1..8, default 2 */
};

struct esmd_config {
    char *path;     /* the file it was read from */
    char *postgres; /* required conninfo / URI */
    struct esmd_aws_cfg aws;
    struct esmd_admin_cfg admin;
    struct esmd_async_queue_cfg async_queue;
    struct esmd_conn_cfg *connections;
    size_t nconnections;
    struct esmd_function_cfg *functions;
    size_t nfunctions;
    struct esmd_mapping_cfg *mappings;
    size_t nmappings;
};

/* ---- key tables ----
 * Every section of the file is read through a table of its keys, the only place a key is
 * declared: src/config.c's for the core sections, each connector's for its `source:` keys and its
 * `connections:` entries (include/esmd/connector.h). schemas/config.schema.json and
 * docs/configuration.md are tested against the same tables. */

enum esmd_cfg_type {
    ESMD_CFG_STR,        /* char *; optional check() or parse() */
    ESMD_CFG_INT,        /* int in min..max */
    ESMD_CFG_BOOL,       /* bool: true | false */
    ESMD_CFG_DURATION,   /* int64_t milliseconds in min..max */
    ESMD_CFG_ENUM,       /* enum (int) indexing names */
    ESMD_CFG_DEST,       /* char *: destination URI, checked when the whole file is read */
    ESMD_CFG_CONNECTION, /* source tables only: char *, the name of a connection of the
                          * connector's own kind; the resolved const struct esmd_conn_cfg * is
                          * stored at `aux` */
    ESMD_CFG_NAMES,      /* char ** at offset, size_t count at aux: one `item` name or a
                          * non-empty list of them, each passing check(), none twice */
    ESMD_CFG_UNIX_TIME,  /* int64_t milliseconds: a Unix time in seconds, not in the future */
    ESMD_CFG_PROPERTIES, /* struct esmd_kvlist: name -> scalar, kept as written; check_kv() */
    ESMD_CFG_CUSTOM,     /* src/config.c's own sections: read() */
    ESMD_CFG_SECTION,    /* a nested mapping read through the table `sub` ({0}-terminated; its
                          * offsets are of the same struct); bool at offset: it was read */
};

#define ESMD_CFG_REQUIRED 0x1u
#define ESMD_CFG_NONEMPTY 0x2u  /* STR: "" is an error */
#define ESMD_CFG_MINUS_ONE 0x4u /* INT, DURATION: -1 is allowed besides min..max */

struct esmd_cfg_loader; /* private to src/config.c */
struct esmd_cfg_node;

struct esmd_cfg_key {
    const char *name;
    enum esmd_cfg_type type;
    unsigned flags;
    size_t offset; /* of the field in the section's struct */
    size_t aux;    /* CONNECTION, NAMES: of the second field */
    int64_t min, max;
    int64_t def;                  /* INT, DURATION, ENUM: the value when absent (0: none) */
    bool (*check)(const char *s); /* STR, NAMES */
    const char *what;             /* STR, NAMES: what check() or parse() wants, for messages */
    const char *item;             /* NAMES: what one name is ("topic") */
    /* STR: a parser whose message (in err) says what is wrong; 0 when s is good. The error is
     * "KEY is not WHAT: MESSAGE", without the value (a URL may hold a password). */
    int (*parse)(const char *s, char *err, size_t errlen);
    const char *const *names; /* ENUM: NULL-terminated */
    /* PROPERTIES: judges one pair (0: good), with a message that names the key. */
    int (*check_kv)(const char *key, const char *value, char *err, size_t errlen);
    bool (*read)(struct esmd_cfg_loader *ld, const struct esmd_cfg_node *n, void *obj); /* CUSTOM */
    const struct esmd_cfg_key *sub; /* SECTION */
};

/* The visibility timeout of the sources that have one (redis, pgqueue): 1s to 12h, 30s. */
#define ESMD_CFG_VISIBILITY_MIN_MS 1000
#define ESMD_CFG_VISIBILITY_MAX_MS (12 * 3600 * 1000)
#define ESMD_CFG_VISIBILITY_DEFAULT_MS 30000
/* parallelization_factor (Kafka, Redis sources): lanes per shard, as Lambda's 1..10. */
#define ESMD_CFG_MAX_PARALLELIZATION 10

/* Table entries: key n of the field f of struct st (f may be nested: "kafka.topics"); fl is
 * ESMD_CFG_* flags, d the default (ESMD_CFG_INT, DURATION, ENUM), w what check() or parse() wants,
 * for messages. A connector's table ends with {0}. */
#define ESMD_K_STR(n, st, f, fl)                                                                   \
    {                                                                                              \
        .name = n, .type = ESMD_CFG_STR, .flags = fl, .offset = offsetof(st, f)                    \
    }
#define ESMD_K_CHECK(n, st, f, fl, fn, w)                                                          \
    {                                                                                              \
        .name = n, .type = ESMD_CFG_STR, .flags = fl, .offset = offsetof(st, f), .check = fn,      \
        .what = w                                                                                  \
    }
#define ESMD_K_PARSE(n, st, f, fl, fn, w)                                                          \
    {                                                                                              \
        .name = n, .type = ESMD_CFG_STR, .flags = fl, .offset = offsetof(st, f), .parse = fn,      \
        .what = w                                                                                  \
    }
#define ESMD_K_INT(n, st, f, lo, hi, fl, d)                                                        \
    {                                                                                              \
        .name = n, .type = ESMD_CFG_INT, .flags = fl, .offset = offsetof(st, f), .min = lo,        \
        .max = hi, .def = d                                                                        \
    }
#define ESMD_K_BOOL(n, st, f)                                                                      \
    {                                                                                              \
        .name = n, .type = ESMD_CFG_BOOL, .offset = offsetof(st, f)                                \
    }
#define ESMD_K_DUR(n, st, f, lo, hi, fl, d)                                                        \
    {                                                                                              \
        .name = n, .type = ESMD_CFG_DURATION, .flags = fl, .offset = offsetof(st, f), .min = lo,   \
        .max = hi, .def = d                                                                        \
    }
#define ESMD_K_ENUM(n, st, f, list, fl, d)                                                         \
    {                                                                                              \
        .name = n, .type = ESMD_CFG_ENUM, .flags = fl, .offset = offsetof(st, f), .names = list,   \
        .def = d                                                                                   \
    }
#define ESMD_K_DEST(n, st, f)                                                                      \
    {                                                                                              \
        .name = n, .type = ESMD_CFG_DEST, .offset = offsetof(st, f)                                \
    }
#define ESMD_K_CONN(n, st, f, conn, fl)                                                            \
    {                                                                                              \
        .name = n, .type = ESMD_CFG_CONNECTION, .flags = fl, .offset = offsetof(st, f),            \
        .aux = offsetof(st, conn)                                                                  \
    }
#define ESMD_K_NAMES(n, st, f, count, fl, fn, w, it)                                               \
    {                                                                                              \
        .name = n, .type = ESMD_CFG_NAMES, .flags = fl, .offset = offsetof(st, f),                 \
        .aux = offsetof(st, count), .check = fn, .what = w, .item = it                             \
    }
#define ESMD_K_UNIX_TIME(n, st, f)                                                                 \
    {                                                                                              \
        .name = n, .type = ESMD_CFG_UNIX_TIME, .offset = offsetof(st, f)                           \
    }
#define ESMD_K_PROPERTIES(n, st, f, fn)                                                            \
    {                                                                                              \
        .name = n, .type = ESMD_CFG_PROPERTIES, .offset = offsetof(st, f), .check_kv = fn          \
    }
#define ESMD_K_SECTION(n, st, f, table)                                                            \
    {                                                                                              \
        .name = n, .type = ESMD_CFG_SECTION, .offset = offsetof(st, f), .sub = table               \
    }
#define ESMD_K_CUSTOM(n, fn, fl)                                                                   \
    {                                                                                              \
        .name = n, .type = ESMD_CFG_CUSTOM, .flags = fl, .read = fn                                \
    }

/* Given to a connector's cfg_check (include/esmd/connector.h) for the mapping being read. A key
 * is "source.NAME" for a key of the source section, "source" for the section itself, or a key of
 * the mapping ("on_failure"; NULL for the mapping itself). */
struct esmd_cfg_check;

enum esmd_cfg_state {
    ESMD_CFG_ABSENT, /* not in the file */
    ESMD_CFG_SET,    /* read into the config */
    ESMD_CFG_BAD,    /* in the file, with an error reported */
};

enum esmd_cfg_state esmd_cfg_state(const struct esmd_cfg_check *chk, const char *key);
/* Reports an error at key, or at the section holding it when the key is absent. */
void esmd_cfg_error(struct esmd_cfg_check *chk, const char *key, const char *fmt, ...)
    ESMD_PRINTF(3, 4);

/* Names of mappings, connections and queues: 1 to 64 characters of letters, digits, '_', '.' or
 * '-' (ESMD_CFG_NAME_RULE). Kafka topic names: ESMD_CFG_TOPIC_RULE. */
#define ESMD_CFG_NAME_RULE "1 to 64 characters of letters, digits, '_', '.' or '-'"
#define ESMD_CFG_TOPIC_RULE "1 to 249 characters of letters, digits, '.', '_' or '-'"
bool esmd_config_valid_name(const char *s);
/* 1 to maxlen characters, each a letter, a digit or one of extra. */
bool esmd_config_valid_chars(const char *s, size_t maxlen, const char *extra);
bool esmd_config_valid_topic(const char *s);
/* The name of a source kind, its YAML key ("kafka"), from the connectors' registry. */
const char *esmd_config_kind_name(enum esmd_source_kind kind);
/* A duration the way messages show it ("15m", "6h", "500ms"); returns out. */
const char *esmd_config_fmt_duration(int64_t ms, char out[32]);

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

/* The key table of a section of the file: "mappings", "functions" or "async_queue" (for
 * src/config_diff.c and the tests). *n set to its length. */
const struct esmd_cfg_key *esmd_config_keys(const char *section, size_t *n);

/* ---- reload: what changed between two configurations (src/config_diff.c, docs/operations.md) */

enum esmd_reload_action {
    ESMD_RELOAD_SAME,    /* nothing changed */
    ESMD_RELOAD_UPDATE,  /* settings that apply in place (batch size, filters, retries, ...) */
    ESMD_RELOAD_RESTART, /* its source, connection or function changed: stopped, started again */
    ESMD_RELOAD_ADD,     /* not in the old configuration */
};

struct esmd_config_change {
    enum esmd_reload_action action;
    char *keys; /* owned: the changed keys, ", "-separated ("batch_size, filters"); NULL if none */
};

struct esmd_config_diff {
    struct esmd_config_change *mappings; /* owned: one per mapping of the new configuration */
    size_t nmappings;
    bool *removed;   /* owned: one per mapping of the old one: not in the new */
    size_t nremoved; /* how many are true */
    struct esmd_config_change *functions; /* owned: one per function of the new configuration
                                           * (SAME, UPDATE or ADD) */
    size_t nfunctions;
    char **restart; /* owned: changed keys that take effect only after a restart ("postgres",
                     * "admin.listen", ...); they keep their old value */
    size_t nrestart;
};

/* Compares old and cur (both loaded and valid). d is filled; free it with
 * esmd_config_diff_free(). Mappings and functions are matched by name. */
void esmd_config_diff(const struct esmd_config *old, const struct esmd_config *cur,
                      struct esmd_config_diff *d);
void esmd_config_diff_free(struct esmd_config_diff *d);
/* Gives cur the old values of what needs a restart (`postgres`, `aws`, `admin`,
 * `async_queue`), so that the configuration a reload installs is the one that runs. */
void esmd_config_keep_restart_keys(struct esmd_config *cur, const struct esmd_config *old);
/* A function's `async` destination (on_success, on_failure, dead_letter) that changed and that
 * routable(ud, uri) refuses (a connection the running destination router was not made with)
 * keeps its old value (none for a new function) until a restart: listed in d->restart as
 * "functions.NAME.async.KEY". */
void esmd_config_keep_unroutable(struct esmd_config *cur, const struct esmd_config *old,
                                 bool (*routable)(void *ud, const char *uri), void *ud,
                                 struct esmd_config_diff *d);
/* Whether src/config_diff.c compares a key of type ESMD_CFG_CUSTOM of the table `section` (the
 * unit tests check that every one is). */
bool esmd_config_diff_knows(const char *section, const char *key);

/* Durations: integer + unit ms|s|m|h ("500ms", "30s", "5m", "6h"). Returns 0 or ESMD_EINVAL. */
int esmd_parse_duration_ms(const char *s, int64_t *out) ESMD_MUST_CHECK;
/* Sizes: integer with optional unit B|KB|MB (1 KB = 1024 B). Returns 0 or ESMD_EINVAL. */
int esmd_parse_size(const char *s, int64_t *out) ESMD_MUST_CHECK;

#endif
