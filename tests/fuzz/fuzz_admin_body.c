/* libFuzzer target for the admin API's JSON bodies (src/lambda_api.c, src/api_eic.c,
 * src/api_esm.c): the strict check, the NUL finder and esmd_json_next's walk over any bytes, then
 * the parsing of Put/UpdateFunctionEventInvokeConfig and UpdateEventSourceMapping bodies as the
 * routes do it. Invariants: a body the strict check refuses is refused by both parsers with 400
 * InvalidRequestContentException; one that holds a NUL in a string is refused; the walk of a
 * valid object sees only spans inside the body. Seeds in tests/fuzz/corpus/admin_body/. */
#include "esmd/admin.h"
#include "esmd/api.h"
#include "esmd/json.h"
#include "esmd/lambda_api.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* Walks every member and element: the spans stay inside [s, s + len). */
static void walk(const char *s, size_t len, int depth)
{
    struct esmd_json_span key, val;
    size_t pos = 0;
    bool obj = len > 0 && s[0] == '{';

    if (depth > 64 || len == 0 || (s[0] != '{' && s[0] != '['))
        return;
    while (esmd_json_next(s, len, &pos, obj ? &key : NULL, &val)) {
        if (val.p < s || val.p + val.n > s + len || pos > len)
            abort();
        walk(val.p, val.n, depth + 1);
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static struct esmd_mapping_cfg c = {
        .name = "m",
        .function = "fn",
        .kind = ESMD_SOURCE_KAFKA,
        .max_filters = 5,
        .max_filter_pattern_length = 4096,
        .batch_size = 100,
    };
    char *s = malloc(size ? size : 1), why[2048];
    struct esmd_buf where = ESMD_BUF_INIT;
    bool valid, nul;
    int st_eic, st_esm;

    if (size)
        memcpy(s, data, size);
    valid = esmd_api_json_check(s, size) == NULL;
    nul = valid && esmd_api_json_find_nul(s, size, "", &where);
    if (valid) {
        size_t ws = 0; /* s holds no NUL terminator: strspn would read past it */
        while (ws < size && strchr(" \t\r\n", s[ws]) && s[ws] != '\0')
            ws++;
        walk(s + ws, size - ws, 0);
    }
    st_eic = esmd_api_eic_check(s, size, why, sizeof(why));
    st_esm = esmd_admin_esm_check(&c, s, size, why, sizeof(why));
    if (!valid && size > 0 &&
        (st_eic != 400 || st_esm != 400 || strncmp(why, "InvalidRequestContentException", 30) != 0))
        abort();
    if (nul && (st_eic != 400 || st_esm != 400))
        abort();
    esmd_buf_free(&where);
    free(s);
    return 0;
}
