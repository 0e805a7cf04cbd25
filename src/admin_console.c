/* The admin console (docs/admin.md#console): the static files of ui/, compiled in
 * (cmake/embed_files.cmake), at /ui/ on the admin listener, and GET /admin/functions. The files
 * are public (they hold no data): every route they read needs the admin credentials, which
 * the page sends as `Authorization: Bearer` from fetch(). Each answer carries a strict
 * Content-Security-Policy (scripts and styles from /ui/ only, no inline script, no frames). */
#include "esmd/admin.h"
#include "esmd/admin_auth.h"
#include "esmd/embedded.h"
#include "esmd/invoke.h"
#include "esmd/lambda_api.h"

#include <stdio.h>
#include <string.h>

#define UI_CSP                                                                                     \
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "              \
    "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"

struct console {
    const struct esmd_admin_auth *auth;
    const struct esmd_invoker *inv;
};

static struct console console; /* one admin listener per process */

static const char *ui_type(const char *name)
{
    static const struct {
        const char *ext, *type;
    } types[] = {{".html", "text/html; charset=utf-8"},
                 {".js", "text/javascript; charset=utf-8"},
                 {".css", "text/css; charset=utf-8"},
                 {".svg", "image/svg+xml"}};
    const char *dot = strrchr(name, '.');

    for (size_t i = 0; dot && i < ESMD_ARRAY_LEN(types); i++)
        if (strcmp(dot, types[i].ext) == 0)
            return types[i].type;
    return "application/octet-stream";
}

/* An ETag of the file's bytes (FNV-1a 64): the files change only with the binary. */
static void ui_etag(const struct esmd_embedded_file *f, char out[24])
{
    uint64_t h = 14695981039346656037ull;

    for (size_t i = 0; i < f->len; i++) {
        h ^= f->data[i];
        h *= 1099511628211ull;
    }
    snprintf(out, 24, "\"%016llx\"", (unsigned long long)h);
}

static void ui_headers(struct esmd_http_req *req)
{
    esmd_http_req_add_header(req, "Content-Security-Policy", UI_CSP);
    esmd_http_req_add_header(req, "X-Content-Type-Options", "nosniff");
    esmd_http_req_add_header(req, "X-Frame-Options", "DENY");
    esmd_http_req_add_header(req, "Referrer-Policy", "no-referrer");
    esmd_http_req_add_header(req, "Cross-Origin-Opener-Policy", "same-origin");
    esmd_http_req_add_header(req, "Cross-Origin-Resource-Policy", "same-origin");
}

static void ui_route(void *ud, struct esmd_http_req *req)
{
    const char *path = esmd_http_req_path(req);
    const char *name;
    char etag[24];

    ESMD_UNUSED(ud);
    ui_headers(req);
    if (strcmp(path, "/ui") == 0) {
        esmd_http_req_add_header(req, "Location", "/ui/");
        esmd_http_respond(req, 308, "text/plain; charset=utf-8", "/ui/\n", 5);
        return;
    }
    name = path + strlen("/ui/");
    if (name[0] == '\0')
        name = "index.html";
    for (size_t i = 0; i < esmd_ui_files_count; i++) {
        const struct esmd_embedded_file *f = &esmd_ui_files[i];
        const char *inm;

        if (strcmp(f->name, name) != 0)
            continue;
        ui_etag(f, etag);
        esmd_http_req_add_header(req, "ETag", etag);
        /* revalidated on every load, so a new binary's files are never mixed with old ones */
        esmd_http_req_add_header(req, "Cache-Control", "no-cache");
        inm = esmd_http_req_header(req, "If-None-Match");
        if (inm != NULL && strcmp(inm, etag) == 0)
            esmd_http_respond(req, 304, NULL, NULL, 0);
        else
            esmd_http_respond(req, 200, ui_type(f->name), (const char *)f->data, f->len);
        return;
    }
    esmd_http_respond(req, 404, "text/plain; charset=utf-8", "not found\n", 10);
}

static void functions_route(void *ud, struct esmd_http_req *req)
{
    struct console *c = ud;
    struct esmd_api_call call;
    struct esmd_buf b = ESMD_BUF_INIT;

    esmd_api_begin(&call, req);
    if (!esmd_admin_authorize(c->auth, req))
        return;
    esmd_invoker_describe(c->inv, &b);
    esmd_api_respond_json(&call, 200, &b);
    esmd_buf_free(&b);
}

int esmd_admin_console_routes(struct esmd_http *http, const struct esmd_admin_auth *auth,
                              const struct esmd_invoker *inv)
{
    console.auth = auth;
    console.inv = inv;
    if (esmd_http_route_public(http, "GET", "/ui", ui_route, NULL) != 0 ||
        esmd_http_route_public(http, "GET", "/ui/*", ui_route, NULL) != 0 ||
        esmd_http_route(http, "GET", "/admin/functions", functions_route, &console) != 0)
        return ESMD_EINVAL;
    return ESMD_OK;
}
