/* Exponential backoff with jitter. */
#include "esmd/backoff.h"

#include <sys/random.h>

int64_t esmd_backoff_ceiling(const struct esmd_backoff *b, int attempt)
{
    int64_t c = b->base_ms > 0 ? b->base_ms : 1;
    for (int i = 0; i < attempt && c < b->cap_ms; i++)
        c *= 2;
    return c < b->cap_ms ? c : b->cap_ms;
}

int64_t esmd_backoff_delay(const struct esmd_backoff *b, int attempt, uint64_t rnd)
{
    int64_t c = esmd_backoff_ceiling(b, attempt);
    int64_t half = c / 2;
    return half + (int64_t)(rnd % (uint64_t)(c - half + 1));
}

uint64_t esmd_random64(void)
{
    uint64_t v = 0;
    if (getrandom(&v, sizeof(v), 0) != (ssize_t)sizeof(v))
        v = (uint64_t)esmd_now_ms() * 6364136223846793005ULL + 1442695040888963407ULL;
    return v;
}
