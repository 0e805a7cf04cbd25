/* libFuzzer target for the allocation-free JSON / UTF-8 checks (src/json.c), with cJSON as the
 * oracle: whatever esmd_json_valid() accepts, cJSON parses too (cJSON is the more lenient of
 * the two), and a valid document is valid UTF-8. Any bytes: no crash, no out-of-bounds read. */
#define _GNU_SOURCE /* memmem */
#include "esmd/json.h"

#include <cJSON.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* a copy of exactly `size` bytes, so reading past the end is caught */
    char *s = malloc(size ? size : 1);
    if (size)
        memcpy(s, data, size);
    bool utf8 = esmd_utf8_valid(s, size);
    if (esmd_json_valid(s, size)) {
        if (!utf8)
            abort();
        /* cJSON refuses lone surrogate escapes (\ud800) that JSON's grammar allows */
        bool escapes = memmem(s, size, "\\u", 2) != NULL;
        cJSON *j = cJSON_ParseWithLength(s, size);
        if (!j && !escapes)
            abort();
        cJSON_Delete(j);
    }
    free(s);
    return 0;
}
