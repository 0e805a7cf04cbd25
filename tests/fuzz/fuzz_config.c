/* libFuzzer target for the configuration loader: any bytes must give a config or a list of
 * errors, never a crash, a leak or undefined behaviour. Seeds: tests/unit/data/config.
 *   cmake -S . -B build-fuzz -DCMAKE_C_COMPILER=clang -DESMD_FUZZ=ON
 *   cmake --build build-fuzz --target fuzz_config
 *   ./build-fuzz/fuzz_config -max_total_time=60 tests/unit/data/config/good
 * tests/unit/data/config/bad
 */
#include "esmd/config.h"

#include <stdint.h>
#include <stdlib.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    /* The first byte picks the flags, so both the refusing and the accepting paths run. */
    unsigned flags = size > 0 && (data[0] & 1) ? ESMD_CONFIG_ALLOW_UNBUILT : 0;
    struct esmd_config_errors errs;
    esmd_config_errors_init(&errs);
    struct esmd_config *cfg =
        esmd_config_parse_flags((const char *)data, size, "fuzz.yaml", flags, &errs);
    if (cfg) {
        /* A config comes with no errors, and what it points to resolves. */
        if (errs.n != 0)
            abort();
        for (size_t i = 0; i < cfg->nmappings; i++)
            if (!cfg->mappings[i].fn ||
                cfg->mappings[i].fn != esmd_config_function(cfg, cfg->mappings[i].function))
                abort();
    } else if (errs.n == 0) {
        abort();
    }
    char line[1024];
    for (size_t i = 0; i < errs.n; i++)
        esmd_config_error_format(&errs.items[i], line, sizeof(line));
    esmd_config_free(cfg);
    esmd_config_errors_free(&errs);
    return 0;
}
