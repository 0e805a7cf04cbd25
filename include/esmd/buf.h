/* Growable byte buffer, and the JSON / base64 writers the hot path uses instead of cJSON trees. */
#ifndef ESMD_BUF_H
#define ESMD_BUF_H

#include "esmd/common.h"

struct esmd_buf {
    char *data; /* owned; NUL-terminated after esmd_buf_cstr() */
    size_t len;
    size_t cap;
};

#define ESMD_BUF_INIT                                                                              \
    {                                                                                              \
        NULL, 0, 0                                                                                 \
    }

void esmd_buf_init(struct esmd_buf *b);
/* Frees the storage; the buffer is empty and reusable afterwards. */
void esmd_buf_free(struct esmd_buf *b);
/* Empties the buffer, keeping its storage. */
void esmd_buf_reset(struct esmd_buf *b);
/* Makes room for at least `extra` more bytes (plus a NUL). */
void esmd_buf_reserve(struct esmd_buf *b, size_t extra);
void esmd_buf_append(struct esmd_buf *b, const void *p, size_t n);
void esmd_buf_puts(struct esmd_buf *b, const char *s);
void esmd_buf_putc(struct esmd_buf *b, char c);
void esmd_buf_printf(struct esmd_buf *b, const char *fmt, ...) ESMD_PRINTF(2, 3);
void esmd_buf_put_i64(struct esmd_buf *b, int64_t v);
/* Returns data NUL-terminated (never NULL); borrowed, valid until the next change. */
const char *esmd_buf_cstr(struct esmd_buf *b);
/* Moves the storage out: caller frees the returned pointer with free(); b becomes empty. */
char *esmd_buf_steal(struct esmd_buf *b, size_t *len);

/* JSON string with quotes. Control characters, '"' and '\\' are escaped; bytes that are not
 * valid UTF-8 become U+FFFD. esmd_json_string_len() is the exact length it writes. */
void esmd_buf_put_json_string(struct esmd_buf *b, const char *s, size_t n);
size_t esmd_json_string_len(const char *s, size_t n);
/* The bytes as text a database or a log line takes: well-formed UTF-8 without NUL. Malformed
 * sequences and NUL bytes become U+FFFD; everything else is copied as it is. */
void esmd_buf_put_text(struct esmd_buf *b, const char *s, size_t n);
/* Standard base64 with padding, no quotes. esmd_base64_len() is the exact length. */
void esmd_buf_put_base64(struct esmd_buf *b, const void *p, size_t n);
size_t esmd_base64_len(size_t n);
/* Decodes standard base64 (padding optional). Returns 0, or ESMD_EINVAL on bad input. */
int esmd_base64_decode(const char *s, size_t n, struct esmd_buf *out) ESMD_MUST_CHECK;
/* Number of decimal characters of v, sign included. */
size_t esmd_i64_len(int64_t v);

#endif
