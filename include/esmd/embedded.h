/* Files compiled into the binary by cmake/embed_files.cmake: the migrations (src/pg.c) and the
 * admin console's static files (src/admin_console.c). Each table ends with a NULL entry. */
#ifndef ESMD_EMBEDDED_H
#define ESMD_EMBEDDED_H

#include <stddef.h>

struct esmd_embedded_file {
    const char *name;          /* file name ("app.js"), or without extension ("0001_init") */
    const unsigned char *data; /* the bytes, followed by a NUL */
    size_t len;                /* without the NUL */
};

extern const struct esmd_embedded_file esmd_migrations[];
extern const size_t esmd_migrations_count;
extern const struct esmd_embedded_file esmd_ui_files[];
extern const size_t esmd_ui_files_count;

#endif
