/* http(s):// destinations (src/dest_private.h): a POST of the row's payload on one libcurl multi
 * handle per router, driven by the loop (include/esmd/curl_ev.h); a row is written when the
 * answer is 2xx. The header X-Esmd-Idempotency-Key: esmd-outbox-<row id> lets the receiver
 * drop a row written twice (a write whose answer was lost is written again). */
#include "dest_private.h"
#include "esmd/curl_ev.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct http_state {
    const struct esmd_dest_env *env;
    struct esmd_curl_ev ce; /* ce.multi made on the first write */
};

/* One POST in flight: dl->wp. */
struct http_req {
    CURL *easy;
    struct curl_slist *hdrs;
    char errbuf[CURL_ERROR_SIZE];
};

static void http_req_free(struct http_state *st, struct esmd_delivery *dl)
{
    struct http_req *req = dl->wp;
    if (!req)
        return;
    dl->wp = NULL;
    if (req->easy) {
        if (st->ce.multi)
            curl_multi_remove_handle(st->ce.multi, req->easy);
        curl_easy_cleanup(req->easy);
    }
    curl_slist_free_all(req->hdrs);
    free(req);
}

static void http_done(struct esmd_curl_ev *ce, CURL *easy, CURLcode cc, void *priv)
{
    struct http_state *st = ce->ud;
    struct esmd_delivery *dl = priv;
    struct http_req *req = dl ? dl->wp : NULL;
    if (!req)
        return;
    long status = 0;
    curl_easy_getinfo(easy, CURLINFO_RESPONSE_CODE, &status);
    char why[CURL_ERROR_SIZE + 64];
    enum esmd_dest_result r = ESMD_DEST_OK;
    if (cc != CURLE_OK) {
        r = ESMD_DEST_FAIL;
        if (cc == CURLE_OPERATION_TIMEDOUT)
            snprintf(why, sizeof(why), "http: timed out after %d ms", ESMD_DEST_WRITE_TIMEOUT_MS);
        else
            snprintf(why, sizeof(why), "http: %s",
                     req->errbuf[0] ? req->errbuf : curl_easy_strerror(cc));
    } else if (status < 200 || status > 299) {
        r = ESMD_DEST_FAIL;
        snprintf(why, sizeof(why), "http: HTTP %ld", status);
    }
    http_req_free(st, dl);
    esmd_outbox_done(dl, r, r == ESMD_DEST_OK ? NULL : why);
}

static size_t http_discard_body(char *ptr, size_t size, size_t nmemb, void *userdata)
{
    ESMD_UNUSED(ptr);
    ESMD_UNUSED(userdata);
    return size * nmemb;
}

static void http_write_one(struct http_state *st, struct esmd_delivery *dl)
{
    char err[160];
    if (!st->ce.multi &&
        esmd_curl_ev_init(&st->ce, st->env->loop, http_done, st, err, sizeof(err)) != 0) {
        esmd_outbox_done(dl, ESMD_DEST_FAIL, "http: curl_multi_init failed");
        return;
    }
    CURL *easy = curl_easy_init();
    if (!easy) {
        esmd_outbox_done(dl, ESMD_DEST_FAIL, "http: curl_easy_init failed");
        return;
    }
    struct http_req *req = esmd_xcalloc(1, sizeof(*req));
    char line[96];
    struct curl_slist *h = curl_slist_append(NULL, "Content-Type: application/json");
    h = curl_slist_append(h, "Expect:");
    snprintf(line, sizeof(line), "X-Esmd-Idempotency-Key: esmd-outbox-%lld", (long long)dl->id);
    h = curl_slist_append(h, line);
    req->hdrs = h;
    req->easy = easy;
    dl->wp = req;
    curl_easy_setopt(easy, CURLOPT_URL, dl->dest->uri);
    curl_easy_setopt(easy, CURLOPT_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(easy, CURLOPT_POST, 1L);
    curl_easy_setopt(easy, CURLOPT_POSTFIELDS, dl->payload);
    curl_easy_setopt(easy, CURLOPT_POSTFIELDSIZE_LARGE, (curl_off_t)dl->len);
    curl_easy_setopt(easy, CURLOPT_HTTPHEADER, h);
    curl_easy_setopt(easy, CURLOPT_USERAGENT, "esmd/" ESMD_VERSION);
    curl_easy_setopt(easy, CURLOPT_TIMEOUT_MS, (long)ESMD_DEST_WRITE_TIMEOUT_MS);
    curl_easy_setopt(easy, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(easy, CURLOPT_TCP_KEEPALIVE, 1L);
    curl_easy_setopt(easy, CURLOPT_PRIVATE, dl);
    curl_easy_setopt(easy, CURLOPT_ERRORBUFFER, req->errbuf);
    curl_easy_setopt(easy, CURLOPT_WRITEFUNCTION, http_discard_body);
    CURLMcode mc = curl_multi_add_handle(st->ce.multi, easy);
    if (!h || mc != CURLM_OK) {
        char why[128];
        snprintf(why, sizeof(why), "http: %s",
                 h ? curl_multi_strerror(mc) : "out of memory building headers");
        req->easy = NULL;
        curl_easy_cleanup(easy);
        http_req_free(st, dl);
        esmd_outbox_done(dl, ESMD_DEST_FAIL, why);
    }
}

/* ---- the writer ---- */

static int http_parse(const struct esmd_dests_names *names, const char *uri,
                      struct esmd_dest_uri *out, char *err, size_t errlen)
{
    ESMD_UNUSED(names);
    ESMD_UNUSED(out);
    const char *host = strstr(uri, "://") + 3;
    if (!*host || *host == '/' || *host == '?' || *host == '#') {
        snprintf(err, errlen, "%s: an http(s) URL needs a host", uri);
        return ESMD_EINVAL;
    }
    return 0;
}

static void *http_open(const struct esmd_dest_env *env)
{
    struct http_state *st = esmd_xcalloc(1, sizeof(*st));
    st->env = env;
    return st;
}

static void http_write(struct esmd_delivery *const *dls, size_t n)
{
    for (size_t i = 0; i < n; i++)
        http_write_one(dls[i]->dest->conn, dls[i]);
}

static void http_discard(struct esmd_delivery *dl)
{
    http_req_free(dl->dest->conn, dl);
}

/* Requests in flight are dropped (their rows stay leased), then the multi handle. */
static void http_close(void *state)
{
    struct http_state *st = state;
    for (struct esmd_delivery *dl = esmd_outbox_deliveries(st->env->d); dl; dl = dl->next)
        if (dl->dest->w == &esmd_dest_http)
            http_req_free(st, dl);
    esmd_curl_ev_close(&st->ce);
}

const struct esmd_dest_writer esmd_dest_http = {
    .schemes = {"http://", "https://"},
    .form = "http(s)://...",
    .cap = 16,
    .parse = http_parse,
    .open = http_open,
    .write = http_write,
    .discard = http_discard,
    .close = http_close,
    .free = free,
};
