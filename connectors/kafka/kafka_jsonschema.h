/* Private to connectors/kafka: JSON Schema records of a schema registry (docs/kafka.md "Schema
 * registry"), validated with valijson (Debian libvalijson-dev, header-only) over nlohmann/json
 * (nlohmann-json3-dev).
 *
 * A C API over connectors/kafka/kafka_jsonschema.cc: no C++ type crosses it, every entry point
 * catches every exception and answers with an error string, and nothing here does I/O (a $ref to
 * another document is refused, never fetched). */
#ifndef ESMD_KAFKA_JSONSCHEMA_H
#define ESMD_KAFKA_JSONSCHEMA_H

#include <stdbool.h>
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

/* A schema or a record nesting deeper than this is refused, and so is a schema pattern nesting its
 * groups deeper. */
#define ESMD_JS_MAX_DEPTH 64
/* valijson's schema parser recurses per level of the schema, and into a $ref's target: a schema
 * whose $refs, followed, may nest deeper than this (in JSON levels) is refused. */
#define ESMD_JS_MAX_REF_DEPTH 256
/* With a schema that matches strings against regular expressions (`pattern`,
 * `patternProperties`, the date and time `format`s), a string or property name longer than this
 * is refused rather than matched (std::regex recurses per character). */
#define ESMD_JS_MAX_REGEX_INPUT 4096

struct esmd_js_schema;

/* Compiles the schema text (drafts 4, 6 and 7; no `$schema` is draft 7). NULL with err when it is
 * not JSON, names another draft, refers to another document, refers to itself in a loop that
 * does not descend into the data, or nests deeper than ESMD_JS_MAX_DEPTH. */
struct esmd_js_schema *esmd_js_schema_new(const char *text, size_t len, char *err, size_t errlen);
void esmd_js_schema_free(struct esmd_js_schema *s);

/* Validates doc (one JSON document) against s. false with err naming the JSON pointer of the
 * first failing value and the keyword. */
bool esmd_js_validate(const struct esmd_js_schema *s, const char *doc, size_t len, char *err,
                      size_t errlen);

#ifdef __cplusplus
}
#endif

#endif
