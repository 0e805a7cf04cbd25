/* libFuzzer target for the SigV4 verifier (src/admin_auth.c): the Authorization header parser
 * (scheme, Credential, SignedHeaders, Signature), the X-Amz-Date and X-Amz-Content-Sha256
 * checks, the canonical query (esmd_admin_sigv4_query: URI encoding, sorting) and the canonical
 * request (path encoding, header trimming). Input, one field a line:
 *   Authorization value, method, path as sent, then "name: value" headers and "?name=value"
 *   query arguments ("?name" without '=': no value), up to an empty line; the body after it
 *   ("no body line": the check from the headers alone only).
 * Oracle: a request refused from its headers is refused with its body too, and the check with
 * the body never answers NEED_BODY. */
#include "esmd/admin_auth.h"
#include "esmd/buf.h"

#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#define FZ_MAX 32

struct fz_hdrs {
    const char *name[FZ_MAX], *value[FZ_MAX];
    size_t n;
};

static const char *fz_hdr(void *ud, const char *name)
{
    const struct fz_hdrs *h = ud;

    for (size_t i = 0; i < h->n; i++)
        if (strcasecmp(h->name[i], name) == 0)
            return h->value[i];
    return NULL;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    char *s = malloc(size + 1), *line, *save = NULL, *body = NULL, *end;
    const char *fields[3] = {"", "GET", "/"};
    const char *qn[FZ_MAX], *qv[FZ_MAX];
    struct fz_hdrs h = {.n = 0};
    struct esmd_buf q = ESMD_BUF_INIT;
    size_t nf = 0, nq = 0, blen = 0;
    char why[256];
    enum esmd_sigv4_result rh, rb;

    memcpy(s, data, size);
    s[size] = '\0';
    /* the body: after the first empty line */
    end = strstr(s, "\n\n");
    if (end != NULL) {
        *end = '\0';
        body = end + 2;
        blen = size - (size_t)(body - s);
    }
    for (line = strtok_r(s, "\n", &save); line; line = strtok_r(NULL, "\n", &save)) {
        if (nf < 3) {
            fields[nf++] = line;
        } else if (line[0] == '?' && nq < FZ_MAX) {
            char *eq = strchr(line + 1, '=');
            if (eq)
                *eq = '\0';
            qn[nq] = line + 1;
            qv[nq++] = eq ? eq + 1 : NULL;
        } else if (h.n < FZ_MAX) {
            char *colon = strchr(line, ':');
            if (colon == NULL)
                continue;
            *colon = '\0';
            h.name[h.n] = line;
            h.value[h.n++] = colon[1] == ' ' ? colon + 2 : colon + 1;
        }
    }
    esmd_admin_sigv4_query(&q, qn, qv, nq);
    rh = esmd_admin_sigv4_check("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
                                "service", fields[0], fields[1], fields[2], esmd_buf_cstr(&q), NULL,
                                0, fz_hdr, &h, 1440938160000LL, why, sizeof(why));
    if (body != NULL) {
        rb = esmd_admin_sigv4_check("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY",
                                    "service", fields[0], fields[1], fields[2], esmd_buf_cstr(&q),
                                    body, blen, fz_hdr, &h, 1440938160000LL, why, sizeof(why));
        if (rb == ESMD_SIGV4_NEED_BODY)
            abort();
        if (rh != ESMD_SIGV4_OK && rh != ESMD_SIGV4_NEED_BODY && rb == ESMD_SIGV4_OK)
            abort();
    }
    esmd_buf_free(&q);
    free(s);
    return 0;
}
