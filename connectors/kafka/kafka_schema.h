/* Private to connectors/kafka: the schema registry client and the decoders of Confluent-framed
 * records (docs/kafka.md "Schema registry").
 *
 * Two layers:
 *  - pure functions over untrusted bytes (the framing, the Avro walker, the JSON check), with no
 *    I/O, which tests/fuzz/fuzz_kafka_schema.c and the unit tests call directly;
 *  - the registry (esmd_sr_*): schemas fetched over HTTP with libcurl on the loop, cached by id for
 *    the life of the process, one request per id however many records wait for it; a registry
 *    that cannot answer is retried with backoff and reported through the `down` callback. */
#ifndef ESMD_KAFKA_SCHEMA_H
#define ESMD_KAFKA_SCHEMA_H

#include "esmd/buf.h"
#include "esmd/config.h"
#include "esmd/log.h"

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

struct ev_loop;

enum esmd_sr_format {
    ESMD_SR_AVRO,
    ESMD_SR_JSON,
    ESMD_SR_PROTOBUF,
};

/* Lambda's dataFormat names: "AVRO", "JSON", "PROTOBUF". */
const char *esmd_sr_format_name(enum esmd_sr_format f);

/* Largest decoded JSON of one key or value: past it the record is a DESERIALIZATION_ERROR (the
 * event could not carry it anyway). */
#define ESMD_SR_MAX_JSON (6 * 1024 * 1024)

/* Confluent's wire format: magic byte 0, the schema id (4 bytes, big-endian), then the data.
 * Returns false when data is not framed so. *body points into data. */
bool esmd_sr_frame(const void *data, size_t len, int32_t *id, const unsigned char **body,
                   size_t *body_len);

/* Protobuf framing after the schema id: the message indexes, a zigzag varint count then that
 * many zigzag varints (a count of 0 stands for [0], the first message). Returns the bytes they
 * take (the message follows), or 0 when malformed; *count gets how many indexes were written. */
size_t esmd_sr_protobuf_indexes(const unsigned char *p, size_t len, int64_t *count);
/* The same, writing the indexes to idx[0..*count) (malformed, 0, when there are more than max). */
size_t esmd_sr_protobuf_path(const unsigned char *p, size_t len, int64_t *idx, size_t max,
                             size_t *count);

/* A parsed schema, as cached. */
struct esmd_sr_schema;

/* Parses the registry's schema text for format f. NULL with err when the text is not a schema
 * esmd can use (the records that name it are DESERIALIZATION_ERRORs). */
struct esmd_sr_schema *esmd_sr_schema_new(enum esmd_sr_format f, const char *text, size_t len,
                                          char *err, size_t errlen);
/* A file a Protobuf schema imports, as the registry answered it for a reference. */
struct esmd_sr_file {
    const char *name; /* as the schema imports it */
    const char *text; /* .proto text or base64 of a FileDescriptorProto */
};
/* A Protobuf schema that imports refs[0..nrefs) (and any well-known type). */
struct esmd_sr_schema *esmd_sr_schema_new_protobuf(const char *text, size_t len,
                                                   const struct esmd_sr_file *refs, size_t nrefs,
                                                   char *err, size_t errlen);
void esmd_sr_schema_free(struct esmd_sr_schema *s);
enum esmd_sr_format esmd_sr_schema_format(const struct esmd_sr_schema *s);

/* Decodes body (the data after the framing's schema id) with schema s, appending its JSON to
 * out. Avro: the binary encoding walked by the writer's schema (unions as their plain value,
 * bytes and fixed as strings of code points U+0000..U+00FF, as Avro's JSON encoding writes them);
 * the whole body must be used. JSON: the body must be one JSON document in UTF-8 (appended as
 * it is). Protobuf: the message indexes pick the message type of the schema's file, the rest
 * is that message (kafka_protobuf.h), rendered with protobuf's JSON mapping. *src and *src_len
 * get the data as written after the schema id (what SOURCE delivers; for Protobuf the message
 * indexes and the message). false with err (out is then left as it was). */
bool esmd_sr_decode(const struct esmd_sr_schema *s, const unsigned char *body, size_t len,
                    struct esmd_buf *out, const unsigned char **src, size_t *src_len, char *err,
                    size_t errlen);

/* ---- the registry ---- */

struct esmd_sr;

/* A look-up's answer. */
enum esmd_sr_state {
    ESMD_SR_READY,   /* *schema set */
    ESMD_SR_PENDING, /* being fetched: the caller waits for `changed` */
    ESMD_SR_MISSING, /* the registry does not know the id (40403): SCHEMA_NOT_FOUND */
    ESMD_SR_BAD,     /* the registry's schema cannot be used: DESERIALIZATION_ERROR */
};

struct esmd_sr_hooks {
    /* A fetch finished (a schema arrived, or an id turned out missing or bad). */
    void (*changed)(void *ud);
    /* The registry cannot be reached or answers errors (why set; records wait), or answers
     * again (why NULL). */
    void (*down)(void *ud, const char *why);
    void *ud;
};

/* NULL with err when libcurl cannot be set up. cfg is copied. */
struct esmd_sr *esmd_sr_new(const struct esmd_schema_registry_cfg *cfg, struct ev_loop *loop,
                            const struct esmd_log_ctx *log, const struct esmd_sr_hooks *hooks,
                            char *err, size_t errlen);
/* Aborts the requests in flight; safe on NULL. */
void esmd_sr_free(struct esmd_sr *sr);

/* The schema of id: cached, or fetched (one request per id). */
enum esmd_sr_state esmd_sr_get(struct esmd_sr *sr, int32_t id, const struct esmd_sr_schema **s,
                               const char **why);

#endif
