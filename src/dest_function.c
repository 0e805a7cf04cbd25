/* function://NAME destinations (src/dest_private.h): an async invocation of a configured
 * function, handed to the function sink (the async invocation queue,
 * esmd_dests_set_function_sink); a row is written once the event is committed there. */
#include "dest_private.h"

#include <stdio.h>
#include <string.h>

static void fn_sink_done(void *ud, bool ok, const char *err)
{
    struct esmd_delivery *dl = ud;
    esmd_outbox_done(dl, ok ? ESMD_DEST_OK : ESMD_DEST_FAIL, ok ? NULL : err ? err : "not stored");
}

static int function_parse(const struct esmd_dests_names *names, const char *uri,
                          struct esmd_dest_uri *out, char *err, size_t errlen)
{
    const char *name = uri + strlen("function://");
    if (!esmd_dest_find_function(names, name)) {
        snprintf(err, errlen, "%s: function \"%s\" is not defined in the configuration", uri, name);
        return ESMD_EINVAL;
    }
    out->target = esmd_xstrdup(name);
    return 0;
}

static void *function_open(const struct esmd_dest_env *env)
{
    return (void *)env;
}

static void function_write(struct esmd_delivery *const *dls, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        struct esmd_delivery *dl = dls[i];
        const struct esmd_dest_env *env = dl->dest->conn;
        if (!env->fn_sink)
            esmd_outbox_done(dl, ESMD_DEST_FAIL, "the async invocation queue is not running");
        else if (env->fn_sink(env->fn_sink_ud, dl->dest->target, dl->payload, dl->len, fn_sink_done,
                              dl) != 0)
            esmd_outbox_done(dl, ESMD_DEST_FAIL, "the async invocation queue refused the record");
    }
}

const struct esmd_dest_writer esmd_dest_function = {
    .schemes = {"function://"},
    .form = "function://NAME",
    .cap = 16,
    .parse = function_parse,
    .open = function_open,
    .write = function_write,
};
