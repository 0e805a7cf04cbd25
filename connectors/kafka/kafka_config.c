/* The Kafka source's configuration (docs/configuration.md "source", "connections"): its key
 * tables and checks, read by src/config.c through esmd_connector_kafka. */
#include "kafka_private.h"

#include <stddef.h>
#include <stdio.h>
#include <string.h>

#define GROUP_RULE "1 to 200 characters of letters, digits or -/*:_+=.@"

static bool valid_group(const char *s)
{
    return esmd_config_valid_chars(s, 200, "-/*:_+=.@");
}

static const char *const positions[] = {"trim_horizon", "latest", "at_timestamp", NULL};

bool esmd_kafka_property_reserved(const char *key)
{
    static const char *const reserved[] = {
        "bootstrap.servers",        /* the connection's bootstrap_servers */
        "group.id",                 /* the source's consumer_group */
        "enable.auto.offset.store", /* offsets are stored only when the core acks */
        "log.queue",                /* logs must reach the loop thread */
    };
    for (size_t i = 0; i < ESMD_ARRAY_LEN(reserved); i++)
        if (strcmp(key, reserved[i]) == 0)
            return true;
    return false;
}

/* librdkafka's own parser judges the property, as when the consumer or producer is set up. */
static int check_property(const char *key, const char *value, char *err, size_t errlen)
{
    char why[256];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    rd_kafka_conf_res_t res = rd_kafka_conf_set(conf, key, value, why, sizeof(why));
    rd_kafka_conf_destroy(conf);
    if (res == RD_KAFKA_CONF_OK)
        return 0;
    snprintf(err, errlen, "kafka property %s: %s", key, why);
    return ESMD_EINVAL;
}

#define MAP struct esmd_mapping_cfg

static bool valid_registry_url(const char *s)
{
    const char *rest = strncmp(s, "http://", 7) == 0    ? s + 7
                       : strncmp(s, "https://", 8) == 0 ? s + 8
                                                        : NULL;
    return rest && *rest && !strchr("/?#", *rest) && !strpbrk(s, " \t\r\n");
}

static bool valid_attribute(const char *s)
{
    return strcmp(s, "key") == 0 || strcmp(s, "value") == 0;
}

static const char *const record_formats[] = {"JSON", "SOURCE", NULL};

/* schema_registry: (docs/configuration.md "schema_registry"). */
static const struct esmd_cfg_key registry_keys[] = {
    ESMD_K_CHECK("url", MAP, kafka.schema_registry.url, ESMD_CFG_REQUIRED, valid_registry_url,
                 "an http:// or https:// URL"),
    ESMD_K_STR("username", MAP, kafka.schema_registry.username, ESMD_CFG_NONEMPTY),
    ESMD_K_STR("password", MAP, kafka.schema_registry.password, 0),
    ESMD_K_STR("ca_file", MAP, kafka.schema_registry.ca_file, ESMD_CFG_NONEMPTY),
    ESMD_K_STR("cert_file", MAP, kafka.schema_registry.cert_file, ESMD_CFG_NONEMPTY),
    ESMD_K_STR("key_file", MAP, kafka.schema_registry.key_file, ESMD_CFG_NONEMPTY),
    ESMD_K_ENUM("event_record_format", MAP, kafka.schema_registry.event_record_format,
                record_formats, 0, ESMD_SCHEMA_RECORD_JSON),
    ESMD_K_NAMES("validate", MAP, kafka.schema_registry.validate, kafka.schema_registry.nvalidate,
                 0, valid_attribute, "key or value", "attribute"),
    {0},
};

const struct esmd_cfg_key esmd_kafka_source_keys[] = {
    ESMD_K_CONN("kafka", MAP, kafka.connection, kafka.conn, ESMD_CFG_REQUIRED),
    ESMD_K_NAMES("topics", MAP, kafka.topics, kafka.ntopics, ESMD_CFG_REQUIRED,
                 esmd_config_valid_topic, "a Kafka topic name (" ESMD_CFG_TOPIC_RULE ")", "topic"),
    ESMD_K_CHECK("consumer_group", MAP, kafka.consumer_group, 0, valid_group,
                 "a consumer group id (" GROUP_RULE ")"),
    ESMD_K_ENUM("starting_position", MAP, kafka.starting_position, positions, 0,
                ESMD_START_TRIM_HORIZON),
    ESMD_K_UNIX_TIME("starting_position_timestamp", MAP, kafka.starting_position_timestamp_ms),
    ESMD_K_INT("parallelization_factor", MAP, parallelization_factor, 1,
               ESMD_CFG_MAX_PARALLELIZATION, 0, 1),
    ESMD_K_SECTION("schema_registry", MAP, kafka.schema_registry.set, registry_keys),
    {0},
};

const struct esmd_cfg_key esmd_kafka_conn_keys[] = {
    ESMD_K_STR("bootstrap_servers", struct esmd_conn_cfg, bootstrap_servers,
               ESMD_CFG_REQUIRED | ESMD_CFG_NONEMPTY),
    ESMD_K_PROPERTIES("properties", struct esmd_conn_cfg, properties, check_property),
    {0},
};

void esmd_kafka_cfg_check(struct esmd_mapping_cfg *map, struct esmd_cfg_check *chk)
{
    enum esmd_cfg_state pos = esmd_cfg_state(chk, "source.starting_position");
    bool at = pos == ESMD_CFG_SET && map->kafka.starting_position == ESMD_START_AT_TIMESTAMP;
    bool ts = esmd_cfg_state(chk, "source.starting_position_timestamp") != ESMD_CFG_ABSENT;
    if (at && !ts)
        esmd_cfg_error(chk, "source",
                       "missing required key \"starting_position_timestamp\" (starting_position "
                       "is at_timestamp)");
    if (ts && !at && pos != ESMD_CFG_BAD)
        esmd_cfg_error(chk, "source.starting_position_timestamp",
                       "starting_position_timestamp is only allowed with starting_position: "
                       "at_timestamp");
    /* The consumer's own settings: a source's connection may not set them (a producer's, for a
     * kafka:// destination, may). */
    const struct esmd_conn_cfg *conn = map->kafka.conn;
    for (size_t i = 0; conn && i < conn->properties.n; i++)
        if (esmd_kafka_property_reserved(conn->properties.items[i].key))
            esmd_cfg_error(chk, "source.kafka",
                           "connection %s sets kafka property %s, which esmd sets for a source "
                           "and which cannot be overridden",
                           conn->name, conn->properties.items[i].key);
    struct esmd_schema_registry_cfg *sr = &map->kafka.schema_registry;
    if (sr->set) {
        if (!sr->username != !sr->password)
            esmd_cfg_error(chk, "source.schema_registry",
                           "schema_registry: username and password go together (basic auth)");
        if (!sr->cert_file != !sr->key_file)
            esmd_cfg_error(
                chk, "source.schema_registry",
                "schema_registry: cert_file and key_file go together (client certificate)");
        if (sr->nvalidate == 0) { /* Lambda's usual choice: the value */
            sr->validate = esmd_xcalloc(1, sizeof(char *));
            sr->validate[0] = esmd_xstrdup("value");
            sr->nvalidate = 1;
        }
    }
    if (!map->kafka.consumer_group && map->name) {
        struct esmd_buf b = ESMD_BUF_INIT;
        esmd_buf_printf(&b, "esmd-%s", map->name);
        map->kafka.consumer_group = esmd_buf_steal(&b, NULL);
    }
}
