/* The Redis source's configuration (docs/configuration.md "source", "connections"; docs/redis.md):
 * its key tables and checks, read by src/config.c through esmd_connector_redis. A connection's
 * url is read by the parser the connector and the redis:// destination connect with
 * (esmd_redis_url_parse), so check-config refuses exactly the URLs run would refuse. */
#include "redis_private.h"

#include <stddef.h>
#include <stdio.h>

static const char *const positions[] = {"trim_horizon", "latest", NULL};
static const char *const formats[] = {"kinesis", "native", NULL};

#define MAP struct esmd_mapping_cfg

const struct esmd_cfg_key esmd_redis_source_keys[] = {
    ESMD_K_CONN("redis", MAP, redis.connection, redis.conn, ESMD_CFG_REQUIRED),
    ESMD_K_STR("stream", MAP, redis.stream, ESMD_CFG_REQUIRED | ESMD_CFG_NONEMPTY),
    ESMD_K_STR("group", MAP, redis.group, ESMD_CFG_REQUIRED | ESMD_CFG_NONEMPTY),
    ESMD_K_STR("consumer", MAP, redis.consumer, ESMD_CFG_NONEMPTY),
    ESMD_K_ENUM("starting_position", MAP, redis.starting_position, positions, 0,
                ESMD_START_TRIM_HORIZON),
    ESMD_K_DUR("visibility_timeout", MAP, redis.visibility_timeout_ms, ESMD_CFG_VISIBILITY_MIN_MS,
               ESMD_CFG_VISIBILITY_MAX_MS, 0, ESMD_CFG_VISIBILITY_DEFAULT_MS),
    ESMD_K_ENUM("event_format", MAP, redis.event_format, formats, 0, ESMD_REDIS_EVENT_KINESIS),
    ESMD_K_STR("data_field", MAP, redis.data_field, ESMD_CFG_NONEMPTY),
    ESMD_K_STR("partition_key_field", MAP, redis.partition_key_field, ESMD_CFG_NONEMPTY),
    ESMD_K_INT("parallelization_factor", MAP, parallelization_factor, 1,
               ESMD_CFG_MAX_PARALLELIZATION, 0, 1),
    {0},
};

static int check_url(const char *s, char *err, size_t errlen)
{
    struct esmd_redis_url u;
    int rc = esmd_redis_url_parse(s, &u, err, errlen);
    esmd_redis_url_free(&u);
    return rc;
}

const struct esmd_cfg_key esmd_redis_conn_keys[] = {
    ESMD_K_PARSE("url", struct esmd_conn_cfg, url, ESMD_CFG_REQUIRED, check_url,
                 "a usable redis URL"),
    {0},
};

/* data_field and partition_key_field shape the kinesis record; the native one has neither. */
void esmd_redis_cfg_check(struct esmd_mapping_cfg *map, struct esmd_cfg_check *chk)
{
    static const char *const kinesis_only[] = {"data_field", "partition_key_field"};
    if (map->redis.event_format != ESMD_REDIS_EVENT_NATIVE)
        return;
    for (size_t i = 0; i < ESMD_ARRAY_LEN(kinesis_only); i++) {
        char key[64];
        snprintf(key, sizeof(key), "source.%s", kinesis_only[i]);
        if (esmd_cfg_state(chk, key) != ESMD_CFG_ABSENT)
            esmd_cfg_error(chk, key,
                           "%s is for event_format: kinesis; the native event carries every field "
                           "in fields and binaryFields",
                           kinesis_only[i]);
    }
}
