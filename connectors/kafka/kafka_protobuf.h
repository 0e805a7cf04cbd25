/* Private to connectors/kafka: Protobuf records of a schema registry (docs/kafka.md "Schema
 * registry"), decoded with libprotobuf (Debian libprotobuf-dev, libprotoc-dev).
 *
 * A C API over connectors/kafka/kafka_protobuf.cc, a C++ file: no C++ type crosses
 * it, every entry point catches every exception and answers with an error string, and nothing
 * here does I/O. The registry's schema is the text of a .proto file (what Confluent's registry
 * answers by default) or a serialized FileDescriptorProto (what its `?format=serialized` and
 * confluent-kafka's serializers send); the files it imports are google/protobuf's well-known
 * types (compiled into libprotobuf) or files given with it (the registry's `references`). */
#ifndef ESMD_KAFKA_PROTOBUF_H
#define ESMD_KAFKA_PROTOBUF_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Message types nest at most this deep in a record (a longer message-index path, or data nesting
 * deeper, is refused). */
#define ESMD_PB_MAX_DEPTH 64

/* One .proto file: its name as other files import it, and its text, or (binary) the bytes of a
 * serialized FileDescriptorProto. */
struct esmd_pb_file {
    const char *name;
    const char *data;
    size_t len;
    bool binary;
};

struct esmd_pb_schema;

/* Builds the schema of files[0] (its name may be NULL), which may import files[1..n) and the
 * well-known types. NULL with err when a file does not parse or does not link (an import not
 * given, an undefined type, ...). */
struct esmd_pb_schema *esmd_pb_schema_new(const struct esmd_pb_file *files, size_t n, char *err,
                                          size_t errlen);
void esmd_pb_schema_free(struct esmd_pb_schema *s);

/* Decodes msg as the message type at the message-index path idx[0..n) of the schema's file (the
 * idx[0]-th top-level message, its idx[1]-th nested type, ...; n == 0 is the first message).
 * Malformed wire data, a field the type does not have (data not written with this schema), data
 * nesting deeper than ESMD_PB_MAX_DEPTH or a JSON rendering larger than max_json fail. Returns
 * the JSON rendering (protobuf's JSON mapping, docs/lambda.md), malloc'd and NUL-terminated, its
 * length in *json_len; NULL with err. */
char *esmd_pb_decode(const struct esmd_pb_schema *s, const int64_t *idx, size_t n,
                     const unsigned char *msg, size_t len, size_t max_json, size_t *json_len,
                     char *err, size_t errlen);

/* How esmd_pb_decode_via decodes. ANY is esmd_pb_decode: the wire walker (the wire data written
 * straight to JSON along the schema's descriptors) for a message type it handles, libprotobuf's
 * parse and reflection for the others and for every record the walker does not take (so that
 * what is refused is refused, and named, by one path). REFLECTION is only the latter, WALK only
 * the walker (NULL when it does not take the record): the tests compare them. */
enum esmd_pb_way { ESMD_PB_DECODE_ANY, ESMD_PB_DECODE_REFLECTION, ESMD_PB_DECODE_WALK };

char *esmd_pb_decode_via(enum esmd_pb_way way, const struct esmd_pb_schema *s, const int64_t *idx,
                         size_t n, const unsigned char *msg, size_t len, size_t max_json,
                         size_t *json_len, char *err, size_t errlen);

#ifdef __cplusplus
}
#endif

#endif
