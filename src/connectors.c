/* The one table of source connectors: the one list of kinds (config.c reads it for the source
 * keys, the connection types and their messages). */
#include "esmd/connector.h"

#include <string.h>

extern const struct esmd_connector_ops esmd_connector_kafka;
extern const struct esmd_connector_ops esmd_connector_redis;
extern const struct esmd_connector_ops esmd_connector_pgqueue;

static const struct esmd_connector_ops *const connectors[] = {
    &esmd_connector_kafka,
    &esmd_connector_redis,
    &esmd_connector_pgqueue,
};

const struct esmd_connector_ops *esmd_connector_find(const char *kind)
{
    for (size_t i = 0; i < ESMD_ARRAY_LEN(connectors); i++)
        if (strcmp(connectors[i]->kind, kind) == 0)
            return connectors[i];
    return NULL;
}

const struct esmd_connector_ops *esmd_connector_at(size_t i)
{
    return i < ESMD_ARRAY_LEN(connectors) ? connectors[i] : NULL;
}

const struct esmd_connector_ops *esmd_connector_of(enum esmd_source_kind kind)
{
    for (size_t i = 0; i < ESMD_ARRAY_LEN(connectors); i++)
        if (connectors[i]->source == kind)
            return connectors[i];
    return NULL;
}
