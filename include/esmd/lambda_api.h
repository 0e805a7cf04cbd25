/* Lambda's API conventions, written once for every Lambda-compatible and admin route
 * (docs/admin.md, docs/lambda.md#api-shapes):
 *
 *  - every answer carries x-amzn-RequestId (struct esmd_api_call);
 *  - errors have Lambda's shape: x-amzn-ErrorType and {"Type":"User"|"Service","Message":...};
 *  - FunctionName is a name, name:qualifier, a partial or a full ARN (esmd_api_function_parse);
 *  - integer parameters are checked against a table of ranges (struct esmd_api_range);
 *  - a JSON body passes one strict check before use (esmd_api_body_object): well-formed UTF-8,
 *    exactly one JSON document and nothing after it, an object, no NUL in any string;
 *  - routes split the raw path into decoded segments (esmd_api_path_split): an encoded '/' or
 *    NUL inside a segment is a 400, never another resource.
 *
 * Everything runs on the loop thread. */
#ifndef ESMD_LAMBDA_API_H
#define ESMD_LAMBDA_API_H

#include "esmd/buf.h"
#include "esmd/common.h"

#include <cJSON.h>

struct esmd_config;
struct esmd_function_cfg;
struct esmd_http_req;

/* ---- answers ---- */

/* One API request: the HTTP request (borrowed; NULL once answered or aborted) and the request id
 * its answer carries. */
struct esmd_api_call {
    struct esmd_http_req *req;
    char rid[37];
};

/* Starts call for req with a fresh request id. */
void esmd_api_begin(struct esmd_api_call *call, struct esmd_http_req *req);

/* Answers with x-amzn-RequestId: call->rid; body copied; content_type NULL = none. call->req is
 * NULL afterwards. */
void esmd_api_respond(struct esmd_api_call *call, int status, const char *content_type,
                      const char *body, size_t len);
/* The same with a JSON body. */
void esmd_api_respond_json(struct esmd_api_call *call, int status, const struct esmd_buf *json);

/* Answers in Lambda's error shape, with the request id. A status of 500 or more is a "Service"
 * error: its message must not carry internals (database errors are logged, not sent). */
void esmd_api_error(struct esmd_api_call *call, int status, const char *type, const char *fmt, ...)
    ESMD_PRINTF(4, 5);

/* 400 InvalidParameterValueException with message fmt. */
void esmd_api_bad(struct esmd_api_call *call, const char *fmt, ...) ESMD_PRINTF(2, 3);

/* An error answer decided by code that has no request (a body parser), sent with
 * esmd_api_answer_err(). */
struct esmd_api_err {
    int status;
    const char *type; /* static */
    char message[1024];
};
void esmd_api_err_set(struct esmd_api_err *e, int status, const char *type, const char *fmt, ...)
    ESMD_PRINTF(4, 5);
/* 400 InvalidParameterValueException. */
void esmd_api_err_bad(struct esmd_api_err *e, const char *fmt, ...) ESMD_PRINTF(2, 3);
void esmd_api_answer_err(struct esmd_api_call *call, const struct esmd_api_err *e);

/* ---- FunctionName ---- */

#define ESMD_API_FUNCTION_MAX 170 /* FunctionName, any form */
#define ESMD_API_NAME_MAX 64      /* the name in it */
#define ESMD_API_QUALIFIER_MAX 128

struct esmd_api_fn {
    char name[ESMD_API_NAME_MAX + 1];
    char qualifier[ESMD_API_QUALIFIER_MAX + 1]; /* "" when none */
    bool ours; /* false: an ARN of another region or account (no function of esmd's) */
};

/* Parses the n bytes at s: "NAME", "NAME:QUALIFIER", "ACCOUNT:function:NAME[:QUALIFIER]" or
 * "arn:aws:lambda:REGION:ACCOUNT:function:NAME[:QUALIFIER]". NAME is 1 to 64 of [A-Za-z0-9-_];
 * QUALIFIER 1 to 128 of [A-Za-z0-9-_$]. Returns 0, or ESMD_EINVAL when malformed. */
int esmd_api_function_parse(const char *s, size_t n, struct esmd_api_fn *out) ESMD_MUST_CHECK;

/* Resolves the FunctionName path segment seg (decoded) and the Qualifier query argument of call
 * to a function of cfg; only $LATEST (or none) is a qualifier. Returns it (borrowed from cfg),
 * or NULL after answering 400 (malformed) or 404 ResourceNotFoundException. */
const struct esmd_function_cfg *esmd_api_resolve_function(struct esmd_api_call *call,
                                                          const struct esmd_config *cfg,
                                                          const char *seg);

/* ---- integer parameters ---- */

/* One integer parameter: its name as sent, the name Lambda's validation message uses
 * ("maximumRetryAttempts"; NULL for esmd's own message) and its inclusive range. */
struct esmd_api_range {
    const char *name;
    const char *member;
    int64_t min, max;
};

/* An integral JSON number within r. */
bool esmd_api_json_int(const cJSON *v, const struct esmd_api_range *r, int64_t *out);
/* A query argument: 1 to 10 decimal digits, within r. */
bool esmd_api_query_int(const char *s, const struct esmd_api_range *r, int64_t *out);
/* The 400 InvalidParameterValueException of a value outside r (value: as sent, or NULL). */
void esmd_api_range_err(struct esmd_api_err *e, const struct esmd_api_range *r, const char *value);
/* Answers it. */
void esmd_api_range_error(struct esmd_api_call *call, const struct esmd_api_range *r,
                          const char *value);

/* ---- request bodies ---- */

/* The strict check of an admin JSON body: well-formed UTF-8, exactly one JSON document
 * (RFC 8259; no raw control character in a string, nothing but whitespace after it). Returns
 * NULL when it passes, else the reason (a static string). */
const char *esmd_api_json_check(const char *body, size_t len);

/* Finds the first string (value or member name) of the valid JSON document s[0..len) that holds
 * a NUL (\u0000). Returns true and writes its place into where ("DestinationConfig.OnFailure.
 * Destination", "Filters[2].Pattern"; prefix, may be "", is put before it), or false. */
bool esmd_api_json_find_nul(const char *s, size_t len, const char *prefix, struct esmd_buf *where);

/* body[0..len) as a cJSON object (caller deletes), after the strict check and with no NUL in any
 * string. An empty body gives {} when empty_ok. NULL with e: 400 InvalidRequestContentException
 * (not one JSON object) or InvalidParameterValueException (a NUL, naming the field). */
cJSON *esmd_api_parse_object(const char *body, size_t len, bool empty_ok, struct esmd_api_err *e);
/* The same for the body of call: NULL after answering. */
cJSON *esmd_api_body_object(struct esmd_api_call *call, bool empty_ok);

/* ---- paths ---- */

#define ESMD_API_MAX_SEGMENTS 8

/* The path of a request as percent-decoded segments ("/a/b%3Ac/" → "a", "b:c"; one trailing
 * '/' is dropped). */
struct esmd_api_path {
    size_t n;
    char *seg[ESMD_API_MAX_SEGMENTS]; /* into buf */
    char *buf;                        /* owned */
};

/* Splits the raw path of s (as sent: esmd_http_req_raw_path()) into decoded segments. Returns 0,
 * ESMD_EINVAL when a segment decodes to a NUL or a '/' (%00, %2F) and ESMD_ETOOBIG past
 * ESMD_API_MAX_SEGMENTS segments; p is empty then. Free with esmd_api_path_free(). */
int esmd_api_path_parse(const char *raw, struct esmd_api_path *p) ESMD_MUST_CHECK;
void esmd_api_path_free(struct esmd_api_path *p);

/* esmd_api_path_parse() of call's request: false after answering 400
 * InvalidParameterValueException (encoded '/' or NUL in a segment) or 404 (too many). */
bool esmd_api_path_split(struct esmd_api_call *call, struct esmd_api_path *p);

#endif
