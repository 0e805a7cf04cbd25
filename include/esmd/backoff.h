/* Exponential backoff with full jitter: delay = random(0, min(cap, base * 2^attempt)). */
#ifndef ESMD_BACKOFF_H
#define ESMD_BACKOFF_H

#include "esmd/common.h"

struct esmd_backoff {
    int64_t base_ms; /* first ceiling */
    int64_t cap_ms;  /* largest ceiling */
};

/* Ceiling for attempt n (0-based): min(cap, base * 2^n), overflow-safe. */
int64_t esmd_backoff_ceiling(const struct esmd_backoff *b, int attempt);
/* Delay for attempt n: uniformly random in [ceiling/2, ceiling] ("equal jitter", so a retry is
 * never immediate), drawn from `rnd`, a 64-bit random value (tests pass fixed ones). */
int64_t esmd_backoff_delay(const struct esmd_backoff *b, int attempt, uint64_t rnd);
/* A random 64-bit value for esmd_backoff_delay(). */
uint64_t esmd_random64(void);

#endif
