/* The Kafka source's configuration (docs/configuration.md "source", "connections"): its key
 * tables and checks, read by src/config.c through esmd_connector_kafka. */
#include "kafka_private.h"

#include <stddef.h>
#include <string.h>

#define GROUP_RULE "1 to 200 characters of letters, digits or -/*:_+=.@"

static bool valid_group(const char *s)
{
    return esmd_config_valid_chars(s, 200, "-/*:_+=.@");
}

static const char *const positions[] = {"trim_horizon", "latest", "at_timestamp", NULL};

#define MAP struct esmd_mapping_cfg

const struct esmd_cfg_key esmd_kafka_source_keys[] = {
    ESMD_K_CONN("kafka", MAP, kafka.connection, kafka.conn, ESMD_CFG_REQUIRED),
    ESMD_K_NAMES("topics", MAP, kafka.topics, kafka.ntopics, ESMD_CFG_REQUIRED,
                 esmd_config_valid_topic, "a Kafka topic name (" ESMD_CFG_TOPIC_RULE ")", "topic"),
    ESMD_K_CHECK("consumer_group", MAP, kafka.consumer_group, 0, valid_group,
                 "a consumer group id (" GROUP_RULE ")"),
    ESMD_K_ENUM("starting_position", MAP, kafka.starting_position, positions, 0,
                ESMD_START_TRIM_HORIZON),
    ESMD_K_UNIX_TIME("starting_position_timestamp", MAP, kafka.starting_position_timestamp_ms),
    {0},
};

const struct esmd_cfg_key esmd_kafka_conn_keys[] = {
    ESMD_K_STR("bootstrap_servers", struct esmd_conn_cfg, bootstrap_servers,
               ESMD_CFG_REQUIRED | ESMD_CFG_NONEMPTY),
    ESMD_K_PROPERTIES("properties", struct esmd_conn_cfg, properties),
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
    if (!map->kafka.consumer_group && map->name) {
        struct esmd_buf b = ESMD_BUF_INIT;
        esmd_buf_printf(&b, "esmd-%s", map->name);
        map->kafka.consumer_group = esmd_buf_steal(&b, NULL);
    }
}
