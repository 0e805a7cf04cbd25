/* libFuzzer target for the redis:// URL parser (src/redis_link.c), shared by the Redis source,
 * the redis:// destination writer and check-config: any bytes must give a URL or an error,
 * never a crash, a leak or undefined behaviour. Seeds: tests/fuzz/corpus/redis_url.
 *   CC=clang cmake -S . -B build-fuzz -DESMD_FUZZ=ON -DESMD_BUILD_TESTS=OFF
 *   make -C build-fuzz fuzz_redis_url
 *   ./build-fuzz/fuzz_redis_url -max_total_time=30 tests/fuzz/corpus/redis_url
 */
#include "esmd/redis_link.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *url = malloc(size + 1);
    if (!url)
        return 0;
    memcpy(url, data, size);
    url[size] = '\0';
    struct esmd_redis_url u;
    char err[200];
    if (esmd_redis_url_parse(url, &u, err, sizeof(err)) == ESMD_OK) {
        /* what a good URL holds is in range */
        if (!u.host || !u.host[0] || u.port < 1 || u.port > 65535 || u.db < 0 || u.db > 1000000)
            abort();
        esmd_redis_url_free(&u);
    } else if (!err[0] || u.host || u.user || u.password) {
        abort();
    }
    free(url);
    return 0;
}
