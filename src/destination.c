/* Destinations by URI scheme (src/dest_private.h): the table of writers, and the one parser of
 * destination URIs, used by the outbox (src/outbox.c) for what it stores and writes, by the
 * admin API (esmd_dests_check) and by the configuration loader (esmd_dests_check_uri), so that
 * check-config and run accept the same URIs. */
#include "dest_private.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Every kind of destination, in the order the forms are listed in messages. */
static const struct esmd_dest_writer *const writers[] = {
    &esmd_dest_function, &esmd_dest_http, &esmd_dest_kafka, &esmd_dest_redis, &esmd_dest_pgqueue,
};

const struct esmd_dest_writer *const *esmd_dest_writers(size_t *n)
{
    *n = ESMD_ARRAY_LEN(writers);
    return writers;
}

static bool has_prefix(const char *s, const char *p)
{
    return strncmp(s, p, strlen(p)) == 0;
}

bool esmd_dest_name_ok(const char *s, size_t max, const char *extra)
{
    size_t n = strlen(s);
    if (n == 0 || n > max)
        return false;
    for (; *s; s++) {
        char c = *s;
        if (!((c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
              strchr(extra, c)))
            return false;
    }
    return true;
}

static bool printable(const char *s)
{
    for (; *s; s++)
        if ((unsigned char)*s <= 0x20 || *s == 0x7f)
            return false;
    return true;
}

const char *esmd_dest_parse_conn(const struct esmd_dests_names *names, const char *uri,
                                 enum esmd_conn_type type, struct esmd_dest_uri *out, char *err,
                                 size_t errlen)
{
    const struct esmd_dest_writer *w =
        type == ESMD_CONN_KAFKA ? &esmd_dest_kafka : &esmd_dest_redis;
    const char *kind = type == ESMD_CONN_KAFKA ? "kafka" : "redis";
    const char *conn = uri + strlen(w->schemes[0]);
    const char *slash = strchr(conn, '/');
    if (!slash || slash == conn || !slash[1]) {
        snprintf(err, errlen, "%s must be %s%s", uri, w->form,
                 type == ESMD_CONN_KAFKA ? " (" ESMD_DEST_TOPIC_RULE ")" : "");
        return NULL;
    }
    char name[128];
    size_t n = (size_t)(slash - conn);
    const struct esmd_conn_cfg *c = NULL;
    if (n < sizeof(name)) {
        memcpy(name, conn, n);
        name[n] = '\0';
        c = names->connection ? names->connection(names->ud, name)
                              : esmd_config_connection(names->cfg, name);
    }
    if (!c) {
        snprintf(err, errlen, "%s: connection \"%.*s\" is not defined in the configuration", uri,
                 (int)n, conn);
        return NULL;
    }
    if (c->type != type) {
        snprintf(err, errlen, "%s: connection \"%s\" is a %s connection, not a %s connection", uri,
                 c->name, type == ESMD_CONN_KAFKA ? "redis" : "kafka", kind);
        return NULL;
    }
    out->conn = c;
    return slash + 1;
}

int esmd_dest_parse(const struct esmd_dests_names *names, const char *uri,
                    const struct esmd_dest_writer **w, struct esmd_dest_uri *out, char *err,
                    size_t errlen)
{
    memset(out, 0, sizeof(*out));
    *w = NULL;
    if (!uri || !*uri) {
        snprintf(err, errlen, "empty destination URI");
        return ESMD_EINVAL;
    }
    if (!printable(uri)) {
        struct esmd_buf b = ESMD_BUF_INIT;
        esmd_buf_put_json_string(&b, uri, strlen(uri));
        snprintf(err, errlen, "destination URI with spaces or control characters: %s",
                 esmd_buf_cstr(&b));
        esmd_buf_free(&b);
        return ESMD_EINVAL;
    }
    for (size_t i = 0; i < ESMD_ARRAY_LEN(writers); i++) {
        for (const char *const *s = writers[i]->schemes; *s; s++) {
            if (!has_prefix(uri, *s))
                continue;
            int rc = writers[i]->parse(names, uri, out, err, errlen);
            if (rc != 0) {
                free(out->target);
                memset(out, 0, sizeof(*out));
                return rc;
            }
            *w = writers[i];
            return 0;
        }
    }
    struct esmd_buf forms = ESMD_BUF_INIT;
    for (size_t i = 0; i < ESMD_ARRAY_LEN(writers); i++)
        esmd_buf_printf(&forms, "%s%s",
                        i == 0                             ? ""
                        : i + 1 == ESMD_ARRAY_LEN(writers) ? " or "
                                                           : ", ",
                        writers[i]->form);
    snprintf(err, errlen, "%s is not a destination URI (%s)", uri, esmd_buf_cstr(&forms));
    esmd_buf_free(&forms);
    return ESMD_EINVAL;
}

const struct esmd_function_cfg *esmd_dest_find_function(const struct esmd_dests_names *names,
                                                        const char *name)
{
    return names->function ? names->function(names->ud, name)
                           : esmd_config_function(names->cfg, name);
}

int esmd_dests_check_uri(const struct esmd_dests_names *names, const char *uri, char *err,
                         size_t errlen)
{
    const struct esmd_dest_writer *w;
    struct esmd_dest_uri u;
    char buf[512];
    int rc = esmd_dest_parse(names, uri, &w, &u, buf, sizeof(buf));
    if (rc == 0)
        free(u.target);
    else if (err && errlen)
        snprintf(err, errlen, "%s", buf);
    return rc;
}

/* http(s)://user:password@host/... → http(s)://user:***@host/...; other URIs unchanged. */
char *esmd_dest_label(const char *uri)
{
    if (!has_prefix(uri, "http://") && !has_prefix(uri, "https://"))
        return esmd_xstrdup(uri);
    const char *auth = strstr(uri, "://") + 3;
    size_t alen = strcspn(auth, "/?#");
    const char *at = NULL;
    for (const char *p = auth; p < auth + alen; p++)
        if (*p == '@')
            at = p;
    const char *colon = at ? memchr(auth, ':', (size_t)(at - auth)) : NULL;
    if (!colon)
        return esmd_xstrdup(uri);
    struct esmd_buf b = ESMD_BUF_INIT;
    esmd_buf_append(&b, uri, (size_t)(colon + 1 - uri));
    esmd_buf_puts(&b, "***");
    esmd_buf_puts(&b, at);
    esmd_buf_cstr(&b);
    return esmd_buf_steal(&b, NULL);
}
