/* Allocation-free checks of untrusted bytes: is it UTF-8, is it one JSON document.
 * Used to decide how a record's payload is shown to filters (as JSON, as a string, or not at
 * all) without building a tree. */
#ifndef ESMD_JSON_H
#define ESMD_JSON_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Maximum nesting esmd_json_valid() accepts (deeper documents are "not JSON"). */
#define ESMD_JSON_MAX_DEPTH 512

/* The one UTF-8 decoder of the project. Decodes the well-formed sequence at s (n > 0 bytes
 * available): returns its length (1..4) and stores its code point in *cp (cp may be NULL), or
 * returns 0 if malformed (RFC 3629: no overlongs, no surrogates, nothing above U+10FFFF). */
size_t esmd_utf8_decode(const unsigned char *s, size_t n, uint32_t *cp);

/* Length of the well-formed UTF-8 sequence at s (1..4; n bytes available), 0 if malformed. */
size_t esmd_utf8_seq(const unsigned char *s, size_t n);

/* Well-formed UTF-8 (RFC 3629: no overlongs, no surrogates, nothing above U+10FFFF). */
bool esmd_utf8_valid(const char *s, size_t len);

/* Exactly one JSON value (RFC 8259), optionally surrounded by whitespace, with well-formed UTF-8
 * in its strings and valid escapes; NUL bytes are refused. */
bool esmd_json_valid(const char *s, size_t len);

/* A piece of a JSON text: p[0..n), borrowed from the text. */
struct esmd_json_span {
    const char *p;
    size_t n;
};

/* Walks the members of the object (key set) or the elements of the array (key NULL) at s[0..len)
 * (one JSON value; *pos starts at 0 and is advanced by each call), as the text sent: numbers
 * keep their digits, strings their escapes (key and string values include the quotes). Returns
 * false at the end, or at the first thing that is not valid JSON. For bodies that passed
 * esmd_json_valid() where a value must be seen as sent (a filter pattern, an event). */
bool esmd_json_next(const char *s, size_t len, size_t *pos, struct esmd_json_span *key,
                    struct esmd_json_span *val);

/* Whether a key span from esmd_json_next() is the string name (no escapes in name). */
bool esmd_json_key_is(const struct esmd_json_span *key, const char *name);

#endif
