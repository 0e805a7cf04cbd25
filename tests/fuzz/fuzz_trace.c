/* libFuzzer target for the trace-header checks (src/trace.c): any bytes as any of the three
 * headers, then the conversion and the trace id. What is kept is printable ASCII (safe as an
 * HTTP header and in JSON), and the ids are 32 lowercase hex digits. */
#include "esmd/trace.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static void check_printable(const char *s)
{
    for (; *s; s++)
        if ((unsigned char)*s < 0x20 || (unsigned char)*s > 0x7e)
            abort();
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const char *const names[] = {"traceparent", "tracestate", "X-Amzn-Trace-Id"};
    if (size < 1)
        return 0;
    const char *name = names[data[0] % 3];
    /* a copy of exactly size-1 bytes, so reading past the end is caught */
    size_t n = size - 1;
    char *s = malloc(n ? n : 1);
    if (n)
        memcpy(s, data + 1, n);
    struct esmd_trace t;
    esmd_trace_clear(&t);
    esmd_trace_set(&t, "traceparent", "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                   55);
    esmd_trace_set(&t, name, s, n);
    esmd_trace_complete(&t);
    check_printable(t.traceparent);
    check_printable(t.tracestate);
    check_printable(t.xray);
    char id[ESMD_TRACE_ID_LEN + 1];
    if (esmd_trace_id(&t, id)) {
        if (strlen(id) != ESMD_TRACE_ID_LEN || strspn(id, "0123456789abcdef") != ESMD_TRACE_ID_LEN)
            abort();
    }
    free(s);
    return 0;
}
