/* Private to connectors/kafka: the event encoder and the record view it works from.
 *
 * The encoder never touches a rd_kafka_message_t: it reads a small view of one record, so the
 * exact-size contract (esmd_batch_bytes() == bytes written) can be tested with records built
 * by hand. kafka.c fills the view from a consumed message; tests fill it directly.
 *
 * Never included by the core (src/); only the files of connectors/kafka and the connector's unit
 * tests include it. */
#ifndef ESMD_KAFKA_PRIVATE_H
#define ESMD_KAFKA_PRIVATE_H

#include "esmd/batch.h"
#include "esmd/buf.h"
#include "esmd/connector.h"

#include <librdkafka/rdkafka.h>

/* One Kafka record as the encoder sees it. Every pointer is borrowed for the call. */
struct esmd_kafka_view {
    const char *topic; /* NUL-terminated */
    int32_t partition;
    int64_t offset;
    int64_t timestamp; /* epoch ms; -1 when not available */
    rd_kafka_timestamp_type_t tstype;
    const void *key; /* NULL: the record has a null key (the "key" member is left out) */
    size_t key_len;
    const void *value; /* NULL: null value, e.g. a tombstone (written as JSON null) */
    size_t value_len;
    const rd_kafka_headers_t *headers; /* NULL: no headers (written as []) */
    /* Schema registry (docs/kafka.md "Schema registry"): the dataFormat of a decoded key or value
     * ("AVRO", "JSON", "PROTOBUF") and its schema id, written as keySchemaMetadata /
     * valueSchemaMetadata; NULL: not decoded, left out. */
    const char *key_format, *value_format;
    int32_t key_schema_id, value_schema_id;
    /* The key / value is JSON esmd wrote itself (decoded): filter documents embed it without
     * checking it again. */
    bool key_is_json, value_is_json;
};

/* Fills *v for rec; the view stays valid while rec is alive. */
typedef void (*esmd_kafka_view_fn)(const struct esmd_record *rec, struct esmd_kafka_view *v);

/* Exact bytes of {"eventSource":"SelfManagedKafka","bootstrapServers":"<servers>","records":{}}.
 * servers: borrowed. */
size_t esmd_kafka_envelope_size(const char *servers);

/* Exact bytes of the group `"<key>":[]` (key JSON-escaped). key: borrowed. */
size_t esmd_kafka_group_overhead(const char *key);

/* Exact bytes esmd_kafka_record_write() writes for v. */
size_t esmd_kafka_record_size(const struct esmd_kafka_view *v);

/* Appends one record object:
 * {"topic":"t","partition":0,"offset":15,"timestamp":1545084650987,
 *  "timestampType":"CREATE_TIME","key":"<base64>","value":"<base64>"|null,
 *  "headers":[{"name":[104,-61,-85]},{"name":null}]}
 * and, for decoded schema registry data, before the closing brace:
 *  ,"keySchemaMetadata":{"dataFormat":"AVRO","schemaId":"12"},"valueSchemaMetadata":{...}
 * Header values are arrays of signed bytes (Java's byte, -128..127), in header order with
 * repeated names kept; a header with a null value is written as null. */
void esmd_kafka_record_write(struct esmd_buf *out, const struct esmd_kafka_view *v);

/* Appends the whole event for batch (exactly esmd_batch_bytes(batch) bytes when every
 * rec->size came from esmd_kafka_record_size() and every shard->overhead from
 * esmd_kafka_group_overhead()). Groups come in batch order, each group's records in the order
 * linked from head. servers, batch: borrowed; out: appended to, not reset. */
void esmd_kafka_encode_batch(const char *servers, const struct esmd_batch *batch,
                             esmd_kafka_view_fn view_of, struct esmd_buf *out);

/* Appends the document filters see of one record:
 * {"topic":"t","partition":0,"offset":15,"timestamp":1545084650987,"key":K,"value":V,
 *  "headers":[{"name":"text"},...]}
 * key and value: embedded as they are when they are JSON; as a JSON string when they are UTF-8
 * but not JSON; a non-UTF-8 key as its base64 text; a null key or value as null; a non-UTF-8
 * value is left out. Header values: as strings when UTF-8, base64 otherwise, null when null.
 * timestamp: left out when the record has none. Returns how the value was written. */
/* Appends the KafkaBatchInfo object of an on-failure record for v alone (Lambda's Kafka-topic
 * destination form, docs/lambda.md#kafka-on-failure):
 * {"batchSize":1,"bootstrapServers":"…","payloadSize":N,
 *  "recordInfo":{"offset":"15","timestamp":"2019-11-14T00:38:04.835Z","topic":"t","partition":0}}
 * topic and partition are esmd's additions (the payload, which has them, is left out of records
 * over the payload cap). */
void esmd_kafka_failure_info(const char *servers, const struct esmd_kafka_view *v,
                             size_t payload_size, struct esmd_buf *out);

/* Does a batchItemFailures itemIdentifier, {"partition":"<topic>-<n>","offset":<n>}, name v?
 * The offset may be a number or a string of digits. */
bool esmd_kafka_item_is(const struct esmd_kafka_view *v, const struct cJSON *id);

enum esmd_filter_data esmd_kafka_filter_doc(const struct esmd_kafka_view *v, struct esmd_buf *out);

/* kafka_config.c: the key tables and checks of esmd_connector_kafka (connector.h). */
extern const struct esmd_cfg_key esmd_kafka_source_keys[];
extern const struct esmd_cfg_key esmd_kafka_conn_keys[];
void esmd_kafka_cfg_check(struct esmd_mapping_cfg *map, struct esmd_cfg_check *chk);
/* A librdkafka property esmd sets for a source, which a connection may not override. */
bool esmd_kafka_property_reserved(const char *key);

#endif
