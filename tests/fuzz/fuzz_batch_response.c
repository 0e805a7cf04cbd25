/* libFuzzer target for a function's partial batch response (batchItemFailures,
 * esmd_mapping_parse_item_failures in src/mapping_failure.c), matched against the records of a
 * Kafka, a Redis-stream and a queue part through the connectors' own itemIdentifier matchers.
 * Any bytes: no crash, no read past `size`, and the answer is consistent: a success names no
 * record, a partial answer names at least one, a refusal says why. */
#include "../../connectors/kafka/kafka_private.h"
#include "../../connectors/redis/redis_private.h"
#include "../../src/mapping_private.h"

#include <cJSON.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

#define NREC 4

/* Kafka: records of partitions t-0 and t-1 (offsets 5, 6, 0, 41). */
static bool kafka_is(void *ctx, size_t i, const cJSON *id)
{
    (void)ctx;
    static const int32_t part[NREC] = {0, 0, 1, 1};
    static const int64_t off[NREC] = {5, 6, 0, 41};
    struct esmd_kafka_view v = {.topic = "t", .partition = part[i], .offset = off[i]};
    return esmd_kafka_item_is(&v, id);
}

/* Redis: entry ids 1-0, 1-1, 1700000000000-5, 18446744073709551615-18446744073709551615. */
static bool redis_is(void *ctx, size_t i, const cJSON *id)
{
    (void)ctx;
    static const struct esmd_redis_id ids[NREC] = {
        {1, 0}, {1, 1}, {1700000000000u, 5}, {UINT64_MAX, UINT64_MAX}};
    return esmd_redis_item_is(ids[i], id);
}

/* Queue: messageIds compared as strings. */
static bool queue_is(void *ctx, size_t i, const cJSON *id)
{
    (void)ctx;
    static const char *const ids[NREC] = {"m1", "m2", "ä", "00000000-0000-0000-0000-000000000000"};
    return cJSON_IsString(id) && strcmp(id->valuestring, ids[i]) == 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* a copy of exactly `size` bytes, so reading past the end is caught */
    char *s = malloc(size ? size : 1);
    if (size)
        memcpy(s, data, size);
    bool (*const matchers[])(void *, size_t, const cJSON *) = {kafka_is, redis_is, queue_is, NULL};
    for (size_t m = 0; m < sizeof(matchers) / sizeof(matchers[0]); m++) {
        bool failed[NREC] = {false};
        const char *why = NULL;
        enum esmd_item_failures rc =
            esmd_mapping_parse_item_failures(s, size, NREC, matchers[m], NULL, failed, &why);
        size_t nfailed = 0;
        for (size_t i = 0; i < NREC; i++)
            nfailed += failed[i];
        if (rc == ESMD_ITEMS_NONE && (nfailed > 0 || why))
            abort();
        if (rc == ESMD_ITEMS_SOME && (nfailed == 0 || why || !matchers[m]))
            abort();
        if (rc == ESMD_ITEMS_BAD && !why)
            abort();
    }
    free(s);
    return 0;
}
