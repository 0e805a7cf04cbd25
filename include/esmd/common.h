/* Shared basics: error codes, allocation helpers, clocks. */
#ifndef ESMD_COMMON_H
#define ESMD_COMMON_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#define ESMD_VERSION "0.1.0"

/* Return codes: 0 on success, negative ESMD_E* on failure. */
enum {
    ESMD_OK = 0,
    ESMD_EINVAL = -1,  /* bad argument or input */
    ESMD_ENOMEM = -2,  /* out of memory */
    ESMD_EIO = -3,     /* I/O or library failure */
    ESMD_ESTATE = -4,  /* wrong state for the call */
    ESMD_ETOOBIG = -5, /* over a size limit */
    ESMD_ENOENT = -6,  /* not found */
};

#define ESMD_MUST_CHECK __attribute__((warn_unused_result))
#define ESMD_PRINTF(f, a) __attribute__((format(printf, f, a)))
#define ESMD_ARRAY_LEN(a) (sizeof(a) / sizeof((a)[0]))
#define ESMD_UNUSED(x) (void)(x)

/* Lambda's synchronous invocation payload cap: 6 MB. */
#define ESMD_MAX_PAYLOAD 6291456

/* Allocation that aborts the process on out-of-memory (as Redis's zmalloc does):
 * a daemon that cannot allocate a few bytes cannot do anything useful. */
void *esmd_xmalloc(size_t n);
void *esmd_xcalloc(size_t nmemb, size_t n);
void *esmd_xrealloc(void *p, size_t n);
/* Caller frees with free(). NULL in, NULL out. */
char *esmd_xstrdup(const char *s);
char *esmd_xstrndup(const char *s, size_t n);

/* Wall clock in milliseconds since the Unix epoch. */
int64_t esmd_now_ms(void);
/* Monotonic clock in seconds. */
double esmd_mono(void);

/* Writes a random RFC 4122 version-4 UUID (36 chars + NUL) into out[37]. */
void esmd_uuid4(char out[37]);

/* Formats epoch milliseconds as ISO-8601 UTC with milliseconds ("2019-11-14T00:38:06.021Z")
 * into out[32]. */
/* The region and account of every ARN esmd writes or reads: the configuration's `aws` section
 * (docs/configuration.md), set once at start-up with esmd_aws_set(); the defaults until then,
 * as LocalStack's. */
#define ESMD_DEFAULT_REGION "us-east-1"
#define ESMD_DEFAULT_ACCOUNT "000000000000"
/* region, account: copied (at most 63 characters each); NULL keeps the current value. */
void esmd_aws_set(const char *region, const char *account);
const char *esmd_aws_region(void);
const char *esmd_aws_account(void);
/* The ARN esmd gives a configured function in Lambda-shaped records and API answers:
 * arn:aws:lambda:<region>:<account>:function:NAME (unqualified). */
void esmd_function_arn(const char *name, char *out, size_t outlen);
/* Does the n bytes at prefix, what stands before "function:NAME" in a function reference,
 * name this region and account? "" (a bare name), "<account>:" and
 * "arn:aws:lambda:<region>:<account>:" do; anything else (another account or region, another
 * service) does not. */
bool esmd_function_prefix_ours(const char *prefix, size_t n);
void esmd_iso8601_ms(int64_t ms, char out[32]);

/* The value of one hexadecimal digit ('0'-'9', 'a'-'f', 'A'-'F'), or -1 for any other byte.
 * The one hex decoder of the project: percent-decoding, \\u escapes, request ids. */
int esmd_hex_digit(int c);

#endif
