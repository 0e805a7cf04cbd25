/* libFuzzer target for destination URIs: the one parser (src/destination.c) through the table of
 * writers, as the configuration loader, the admin API and the outbox use it, against a fixed
 * configuration (connections k: kafka, r: redis; functions f, g). Any bytes must give a writer
 * and what the URI names, or an error; never a crash, a leak or undefined behaviour. Also the
 * label (the URI with an http password hidden). Seeds: tests/fuzz/corpus/dest_uri.
 *   CC=clang cmake -S . -B build-fuzz -DESMD_FUZZ=ON -DESMD_BUILD_TESTS=OFF
 *   make -C build-fuzz fuzz_dest_uri
 *   ./build-fuzz/fuzz_dest_uri -max_total_time=30 tests/fuzz/corpus/dest_uri
 */
#include "../../src/dest_private.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

static const char config_yaml[] = "postgres: postgresql://localhost/esmd\n"
                                  "connections:\n"
                                  "  k: { type: kafka, bootstrap_servers: \"localhost:9092\" }\n"
                                  "  r: { type: redis, url: \"redis://:pw@localhost:6379/2\" }\n"
                                  "functions:\n"
                                  "  f: { url: \"http://localhost:8080/\" }\n"
                                  "  g: { url: \"http://localhost:8081/\" }\n";

static struct esmd_config *config(void)
{
    static struct esmd_config *cfg;
    if (!cfg) {
        struct esmd_config_errors errs;
        esmd_config_errors_init(&errs);
        cfg = esmd_config_parse(config_yaml, sizeof(config_yaml) - 1, "fuzz.yaml", &errs);
        esmd_config_errors_free(&errs);
        if (!cfg)
            abort();
    }
    return cfg;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *uri = malloc(size + 1);
    if (!uri)
        return 0;
    memcpy(uri, data, size);
    uri[size] = '\0';
    const struct esmd_dests_names names = {.cfg = config()};
    const struct esmd_dest_writer *w = NULL;
    struct esmd_dest_uri u;
    char err[512] = "";
    if (esmd_dest_parse(&names, uri, &w, &u, err, sizeof(err)) == 0) {
        /* the writer is the one of the URI's scheme; what it names is in the URI */
        bool scheme = false;
        for (const char *const *s = w->schemes; *s; s++)
            scheme = scheme || strncmp(uri, *s, strlen(*s)) == 0;
        if (!scheme || w->cap <= 0 || !w->write)
            abort();
        if (u.target && (!*u.target || !strstr(uri, u.target)))
            abort();
        if ((w == &esmd_dest_kafka || w == &esmd_dest_redis) &&
            (!u.conn ||
             u.conn->type != (w == &esmd_dest_kafka ? ESMD_CONN_KAFKA : ESMD_CONN_REDIS)))
            abort();
        free(u.target);
    } else if (!err[0] || w || u.target) {
        abort();
    }
    /* the public check agrees */
    char err2[512];
    if ((esmd_dests_check_uri(&names, uri, err2, sizeof(err2)) == 0) != (w != NULL))
        abort();
    free(esmd_dest_label(uri));
    free(uri);
    return 0;
}
