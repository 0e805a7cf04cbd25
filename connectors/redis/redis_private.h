/* Private to connectors/redis: stream entry IDs, the event encoder and the filter document, and
 * the entry view they work from (the connection URL: include/esmd/redis_link.h).
 *
 * The encoder never touches a redisReply: it reads a small view of one entry, so the exact-size
 * contract (esmd_batch_bytes() == bytes written) can be tested with entries built by hand.
 * redis.c fills the view from a reply; tests fill it directly.
 *
 * Never included by the core (src/); only the files of connectors/redis and the connector's unit
 * tests include it. */
#ifndef ESMD_REDIS_PRIVATE_H
#define ESMD_REDIS_PRIVATE_H

#include "esmd/batch.h"
#include "esmd/buf.h"
#include "esmd/connector.h"
#include "esmd/redis_link.h"

struct cJSON;

/* ---- entry IDs ---- */

/* A stream entry ID "<ms>-<seq>": two unsigned 64-bit numbers, ordered as a pair. */
struct esmd_redis_id {
    uint64_t ms;
    uint64_t seq;
};

/* Room for the longest ID text: 20 digits, '-', 20 digits, NUL. */
#define ESMD_REDIS_ID_MAX 42

/* Parses exactly "<ms>-<seq>" (decimal, no sign, no spaces, each part fits 64 bits) from the n
 * bytes at s. Returns 0, or ESMD_EINVAL. */
int esmd_redis_id_parse(const char *s, size_t n, struct esmd_redis_id *id) ESMD_MUST_CHECK;
/* Writes the ID's text and a NUL into out; returns its length. */
size_t esmd_redis_id_format(struct esmd_redis_id id, char out[ESMD_REDIS_ID_MAX]);
/* <0, 0, >0 as a is before, equal to, after b. */
int esmd_redis_id_cmp(struct esmd_redis_id a, struct esmd_redis_id b);

/* A set of IDs (the entries a consumer holds). Zero-initialise; free with
 * esmd_redis_idset_free(). Inserting an ID already there, or removing one that is not, does
 * nothing. */
struct esmd_redis_idset {
    struct esmd_redis_id *slots; /* owned */
    bool *used;                  /* owned */
    size_t cap, n;               /* cap: a power of two, or 0 */
};

void esmd_redis_idset_insert(struct esmd_redis_idset *s, struct esmd_redis_id id);
bool esmd_redis_idset_has(const struct esmd_redis_idset *s, struct esmd_redis_id id);
void esmd_redis_idset_remove(struct esmd_redis_idset *s, struct esmd_redis_id id);
void esmd_redis_idset_free(struct esmd_redis_idset *s);

/* ---- what the encoder reads ---- */

/* One field of an entry: a name/value pair of byte strings (binary-safe, may hold NUL). */
struct esmd_redis_field {
    const char *name;
    size_t name_len;
    const char *value;
    size_t value_len;
    bool text; /* name and value are both UTF-8: set by esmd_redis_fields_classify() */
};

/* One entry as the encoder sees it. Pointers are borrowed for the call. */
struct esmd_redis_entry {
    struct esmd_redis_id id;
    int64_t delivery_count; /* times the group delivered it, this delivery included (>= 1) */
    const struct esmd_redis_field *fields;
    size_t nfields;
};

/* Sets each field's `text` flag (both name and value well-formed UTF-8). */
void esmd_redis_fields_classify(struct esmd_redis_field *fields, size_t n);

/* How entries become records (the source's `event_format`, docs/redis.md). */
enum esmd_redis_format {
    ESMD_REDIS_FORMAT_KINESIS, /* Lambda's Kinesis record: data, partitionKey, aws:kinesis */
    ESMD_REDIS_FORMAT_NATIVE,  /* esmd's redis record: fields, binaryFields, deliveryCount */
};

/* The format and, for kinesis, where data and partitionKey come from. Strings borrowed. */
struct esmd_redis_format_opts {
    enum esmd_redis_format format;
    const char *data_field;          /* NULL: data is every field as a JSON object */
    const char *partition_key_field; /* NULL: partitionKey is the entry ID */
};

/* What every record of one mapping shares, JSON-escaped once (esmd_redis_source_init). */
struct esmd_redis_source {
    enum esmd_redis_format format;
    char *stream_json; /* owned: the stream name as a JSON string, quotes included */
    size_t stream_json_len;
    char *arn_json; /* owned: the eventSourceARN as a JSON string */
    size_t arn_json_len;
    /* kinesis only */
    char *data_field; /* owned; NULL: every field as a JSON object */
    size_t data_field_len;
    char *pkey_field; /* owned; NULL: the entry ID */
    size_t pkey_field_len;
    char *identity_json; /* owned: invokeIdentityArn as a JSON string */
    size_t identity_json_len;
    char *region_json; /* owned: awsRegion as a JSON string */
    size_t region_json_len;
};

/* stream, arn: borrowed (copied); fmt: borrowed, NULL for the native format. The kinesis format
 * takes the region and account from esmd_aws_region() / esmd_aws_account() now. Free with
 * esmd_redis_source_free(). */
void esmd_redis_source_init(struct esmd_redis_source *src, const char *stream, const char *arn,
                            const struct esmd_redis_format_opts *fmt);
void esmd_redis_source_free(struct esmd_redis_source *src);

/* The native eventSourceARN: "arn:esmd:redis:<host>:<port>/<db>:stream/<stream>". Caller
 * frees. */
char *esmd_redis_arn(const struct esmd_redis_url *u, const char *stream);
/* The kinesis eventSourceARN: "arn:aws:kinesis:<region>:<account>:stream/<stream>" (the `aws`
 * section's region and account). Caller frees. */
char *esmd_redis_kinesis_arn(const char *stream);

/* The kinesis record's shard: the stream is one shard. */
#define ESMD_REDIS_SHARD_ID "shardId-000000000000"

/* ---- the event ---- */

/* Exact bytes of {"Records":[]}. */
size_t esmd_redis_envelope_size(void);

/* The kinesis record's partition key: the first UTF-8 value of partition_key_field; NULL when
 * partition_key_field is not set, missing or not UTF-8 (the partitionKey is the entry ID then). */
const struct esmd_redis_field *esmd_redis_partition_key(const struct esmd_redis_source *src,
                                                        const struct esmd_redis_entry *e);
/* Exact bytes esmd_redis_record_write() writes for e. */
size_t esmd_redis_record_size(const struct esmd_redis_source *src,
                              const struct esmd_redis_entry *e);

/* Appends one record in the source's format (docs/redis.md). Kinesis, Lambda's Kinesis record:
 * {"kinesis":{"kinesisSchemaVersion":"1.0","partitionKey":"<pk>","sequenceNumber":"<id>",
 *   "data":"<base64>","approximateArrivalTimestamp":1700000000.123},"eventSource":"aws:kinesis",
 *  "eventVersion":"1.0","eventID":"shardId-000000000000:<id>","eventName":"aws:kinesis:record",
 *  "invokeIdentityArn":"arn:aws:iam::<account>:role/esmd","awsRegion":"<region>",
 *  "eventSourceARN":"arn:aws:kinesis:<region>:<account>:stream/<stream>"}
 * data: the value of the first field named data_field, as it is; without data_field (or when
 * the entry has no such field) every field as a JSON object in entry order, a name that
 * repeats with the array of its values (bytes that are not UTF-8 become U+FFFD).
 * partitionKey: the first UTF-8 value of partition_key_field, else the entry ID.
 * Native:
 * {"redis":{"redisSchemaVersion":"1.0","stream":"s","sequenceNumber":"1700000000000-0",
 *   "approximateArrivalTimestamp":1700000000.000,"deliveryCount":1,
 *   "fields":{"name":"value",...},"binaryFields":[{"name":"<b64>","value":"<b64>"}]},
 *  "eventSource":"esmd:redis","eventVersion":"1.0","eventID":"s:1700000000000-0",
 *  "eventName":"esmd:redis:record","eventSourceARN":"arn:esmd:redis:..."}
 * Text fields (name and value UTF-8) go to "fields" in entry order (a repeated name is repeated);
 * the others to "binaryFields", both parts base64, in entry order; "binaryFields" is left out
 * when there is none. Flags must have been set by esmd_redis_fields_classify(). */
void esmd_redis_record_write(struct esmd_buf *out, const struct esmd_redis_source *src,
                             const struct esmd_redis_entry *e);

/* The entry of a record the connector emitted; borrowed, valid while rec is alive. */
typedef const struct esmd_redis_entry *(*esmd_redis_entry_fn)(const struct esmd_record *rec);

/* Appends {"Records":[...]} with every record of batch (groups in batch order, records in the
 * order linked from head): exactly esmd_batch_bytes(batch) bytes when every rec->size came from
 * esmd_redis_record_size() and the batch's envelope from esmd_redis_envelope_size(), with no
 * group overhead (ungrouped). out: appended to, not reset. */
void esmd_redis_encode_batch(const struct esmd_redis_source *src, const struct esmd_batch *batch,
                             esmd_redis_entry_fn entry_of, struct esmd_buf *out);

/* The record's JSON as esmd_redis_record_write() wrote it (rec->size bytes); borrowed. */
typedef const char *(*esmd_redis_json_fn)(const struct esmd_record *rec);

/* As esmd_redis_encode_batch(), from records written beforehand (each rec->size bytes at
 * json_of(rec)): the same bytes, copied. */
void esmd_redis_encode_written(const struct esmd_batch *batch, esmd_redis_json_fn json_of,
                               struct esmd_buf *out);

/* The bytes of a kinesis record's data (before base64) into out (appended). */
void esmd_redis_kinesis_data(const struct esmd_redis_source *src, const struct esmd_redis_entry *e,
                             struct esmd_buf *out);

/* Appends the document filters see of one entry. Kinesis: the kinesis block's members with
 * data decoded (Kinesis's rule: JSON embedded as JSON, other UTF-8 as a string, left out when
 * not UTF-8), and the record's eventSourceARN and awsRegion:
 * {"kinesisSchemaVersion":"1.0","partitionKey":"<pk>","sequenceNumber":"<id>",
 *  "approximateArrivalTimestamp":1700000000.123,"data":{...},"eventSourceARN":"...",
 *  "awsRegion":"..."}
 * Native:
 * {"stream":"s","sequenceNumber":"1700000000000-0","approximateArrivalTimestamp":1700000000.000,
 *  "fields":{"type":"created","order":{"id":1},"n":42}}
 * A field value that is JSON is embedded as JSON, other UTF-8 values as JSON strings; fields
 * whose name or value is not UTF-8 are left out. Native: always ESMD_FILTER_DATA_JSON (the
 * data part, `fields`, is an object). */
enum esmd_filter_data esmd_redis_filter_doc(const struct esmd_redis_source *src,
                                            const struct esmd_redis_entry *e, struct esmd_buf *out);

/* ---- failure handling ---- */

/* Appends the RedisBatchInfo object of an on-failure record for one entry (a batch of one),
 * modelled on Kinesis's KinesisBatchInfo (docs/lambda.md#kinesis-on-failure):
 * {"batchSize":1,"payloadSize":312,"stream":"s","group":"g","startSequenceNumber":"<id>",
 *  "endSequenceNumber":"<id>","approximateArrivalOfFirstRecord":"<ISO-8601>",
 *  "approximateArrivalOfLastRecord":"<ISO-8601>","streamArn":"arn:esmd:redis:..."}
 * The arrival times come from the ID (null past year 9999). group: borrowed. */
void esmd_redis_failure_info(const struct esmd_redis_source *src, const char *group,
                             struct esmd_redis_id id, size_t payload_size, struct esmd_buf *out);

/* Does `item` (one batchItemFailures[].itemIdentifier) name the entry `id`? It must be the
 * entry ID as a string ("1700000000123-0", the record's sequenceNumber). */
bool esmd_redis_item_is(struct esmd_redis_id id, const struct cJSON *item);

/* redis_config.c: the key tables and checks of esmd_connector_redis (connector.h). */
extern const struct esmd_cfg_key esmd_redis_source_keys[];
extern const struct esmd_cfg_key esmd_redis_conn_keys[];
void esmd_redis_cfg_check(struct esmd_mapping_cfg *map, struct esmd_cfg_check *chk);

#endif
