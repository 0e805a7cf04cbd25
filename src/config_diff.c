/* What changed between two configurations, for a reload (include/esmd/config.h, "reload";
 * docs/operations.md#reload).
 *
 * Keys are compared through the same key tables the loader reads them with (src/config.c's and
 * each connector's), so a key added to a table is compared without a change here. Keys of type
 * ESMD_CFG_CUSTOM are compared by name below; esmd_config_diff_knows() lists them and the unit
 * tests check that it knows every one of the tables'.
 *
 * A mapping's source section or connection, its function, its source kind or its `logging`: a
 * restart of that mapping. Its other keys, and the source's parallelization_factor: applied in
 * place. A function's url, timeout,
 * max_concurrency, headers, `async` block: in place (new requests, the async queue's next
 * attempts); `postgres`, `aws`, `admin` and `async_queue`: only after a restart of esmd, as an
 * `async` destination on a connection the running router does not know
 * (esmd_config_keep_unroutable()). */
#include "esmd/buf.h"
#include "esmd/config.h"
#include "esmd/connector.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static bool str_same(const char *a, const char *b)
{
    if (!a || !b)
        return a == b;
    return strcmp(a, b) == 0;
}

static bool kvlist_same(const struct esmd_kvlist *a, const struct esmd_kvlist *b)
{
    if (a->n != b->n)
        return false;
    for (size_t i = 0; i < a->n; i++)
        if (!str_same(a->items[i].key, b->items[i].key) ||
            !str_same(a->items[i].value, b->items[i].value))
            return false;
    return true;
}

/* Key k has the same value in the structs a and b. CUSTOM keys: true (compared by the caller). */
static bool key_same(const struct esmd_cfg_key *k, const void *a, const void *b)
{
    const char *pa = (const char *)a + k->offset, *pb = (const char *)b + k->offset;
    switch (k->type) {
    case ESMD_CFG_STR:
    case ESMD_CFG_DEST:
    case ESMD_CFG_CONNECTION: /* the name; the connection's own keys: conn_same() */
        return str_same(*(char *const *)pa, *(char *const *)pb);
    case ESMD_CFG_INT:
    case ESMD_CFG_ENUM:
        return *(const int *)pa == *(const int *)pb;
    case ESMD_CFG_BOOL:
        return *(const bool *)pa == *(const bool *)pb;
    case ESMD_CFG_DURATION:
    case ESMD_CFG_UNIX_TIME:
        return *(const int64_t *)pa == *(const int64_t *)pb;
    case ESMD_CFG_NAMES: {
        char *const *na = *(char **const *)pa, *const *nb = *(char **const *)pb;
        size_t ca = *(const size_t *)((const char *)a + k->aux);
        size_t cb = *(const size_t *)((const char *)b + k->aux);
        if (ca != cb)
            return false;
        for (size_t i = 0; i < ca; i++)
            if (!str_same(na[i], nb[i]))
                return false;
        return true;
    }
    case ESMD_CFG_PROPERTIES:
        return kvlist_same((const struct esmd_kvlist *)pa, (const struct esmd_kvlist *)pb);
    case ESMD_CFG_CUSTOM:
        return true;
    case ESMD_CFG_SECTION: /* the block is there in both or neither, with the same keys */
        if (*(const bool *)pa != *(const bool *)pb)
            return false;
        for (const struct esmd_cfg_key *sk = k->sub; sk && sk->name; sk++)
            if (!key_same(sk, a, b))
                return false;
        return true;
    }
    return false;
}

/* The keys of a connection of kind ops. */
static bool conn_same(const struct esmd_connector_ops *ops, const struct esmd_conn_cfg *a,
                      const struct esmd_conn_cfg *b)
{
    if (!a || !b)
        return a == b;
    if (a->type != b->type || !ops->conn_keys)
        return a->type == b->type;
    for (size_t i = 0; ops->conn_keys[i].name; i++)
        if (!key_same(&ops->conn_keys[i], a, b))
            return false;
    return true;
}

static void add_key(struct esmd_buf *b, const char *key)
{
    if (b->len)
        esmd_buf_puts(b, ", ");
    esmd_buf_puts(b, key);
}

/* A source key applied in place rather than by a restart: the parallelization factor, which the
 * running mapping takes as UpdateEventSourceMapping's does (each shard drains, then is re-laned;
 * docs/design.md#lanes). */
static bool source_key_in_place(const struct esmd_cfg_key *k)
{
    return !strcmp(k->name, "parallelization_factor");
}

/* The source section (the kind's keys but those applied in place) and the connections it
 * names. */
static bool source_same(const struct esmd_mapping_cfg *a, const struct esmd_mapping_cfg *b)
{
    if (a->kind != b->kind)
        return false;
    const struct esmd_connector_ops *ops = esmd_connector_of(a->kind);
    if (!ops)
        return false;
    for (size_t i = 0; ops->source_keys[i].name; i++) {
        const struct esmd_cfg_key *k = &ops->source_keys[i];
        if (k->type == ESMD_CFG_CUSTOM)
            return false; /* not comparable: restart, which is always safe */
        if (source_key_in_place(k))
            continue;
        if (!key_same(k, a, b))
            return false;
        if (k->type == ESMD_CFG_CONNECTION &&
            !conn_same(ops, *(const struct esmd_conn_cfg *const *)((const char *)a + k->aux),
                       *(const struct esmd_conn_cfg *const *)((const char *)b + k->aux)))
            return false;
    }
    return true;
}

static bool filters_same(const struct esmd_mapping_cfg *a, const struct esmd_mapping_cfg *b)
{
    if (a->nfilters != b->nfilters)
        return false;
    for (size_t i = 0; i < a->nfilters; i++)
        if (!str_same(a->filters[i].pattern, b->filters[i].pattern))
            return false;
    return true;
}

static void diff_mapping(const struct esmd_mapping_cfg *a, const struct esmd_mapping_cfg *b,
                         struct esmd_config_change *c)
{
    struct esmd_buf keys = ESMD_BUF_INIT;
    bool restart = false;
    size_t n;
    const struct esmd_cfg_key *t = esmd_config_keys("mappings", &n);
    for (size_t i = 0; i < n; i++) {
        const struct esmd_cfg_key *k = &t[i];
        bool same = true;
        if (k->type != ESMD_CFG_CUSTOM)
            same = key_same(k, a, b);
        else if (!strcmp(k->name, "function"))
            same = str_same(a->function, b->function);
        else if (!strcmp(k->name, "source"))
            same = source_same(a, b);
        else if (!strcmp(k->name, "filters"))
            same = filters_same(a, b);
        else if (!strcmp(k->name, "logging"))
            same = a->system_log_level == b->system_log_level;
        if (!strcmp(k->name, "source") && a->kind == b->kind &&
            a->parallelization_factor != b->parallelization_factor)
            add_key(&keys, "source.parallelization_factor");
        if (same)
            continue;
        add_key(&keys, k->name);
        /* logging: the source's own system logs (a Kafka consumer's) take it when created */
        if (!strcmp(k->name, "function") || !strcmp(k->name, "source") ||
            !strcmp(k->name, "logging"))
            restart = true;
    }
    c->action = restart ? ESMD_RELOAD_RESTART : keys.len ? ESMD_RELOAD_UPDATE : ESMD_RELOAD_SAME;
    c->keys = keys.len ? esmd_buf_steal(&keys, NULL) : NULL;
    esmd_buf_free(&keys);
}

static bool async_same(const struct esmd_async_cfg *a, const struct esmd_async_cfg *b)
{
    return a->set == b->set && a->maximum_retry_attempts == b->maximum_retry_attempts &&
           a->maximum_event_age_ms == b->maximum_event_age_ms &&
           str_same(a->on_success, b->on_success) && str_same(a->on_failure, b->on_failure) &&
           str_same(a->dead_letter, b->dead_letter);
}

static void diff_function(const struct esmd_function_cfg *a, const struct esmd_function_cfg *b,
                          struct esmd_config_change *c)
{
    struct esmd_buf keys = ESMD_BUF_INIT;
    size_t n;
    const struct esmd_cfg_key *t = esmd_config_keys("functions", &n);
    for (size_t i = 0; i < n; i++) {
        const struct esmd_cfg_key *k = &t[i];
        if (k->type != ESMD_CFG_CUSTOM) {
            if (!key_same(k, a, b))
                add_key(&keys, k->name);
        } else if (!strcmp(k->name, "headers")) {
            if (!kvlist_same(&a->headers, &b->headers))
                add_key(&keys, k->name);
        } else if (!strcmp(k->name, "async") && !async_same(&a->async, &b->async)) {
            add_key(&keys, k->name); /* the async queue's next attempts */
        }
    }
    c->action = keys.len ? ESMD_RELOAD_UPDATE : ESMD_RELOAD_SAME;
    c->keys = keys.len ? esmd_buf_steal(&keys, NULL) : NULL;
    esmd_buf_free(&keys);
}

static void need_restart(struct esmd_config_diff *d, bool changed, const char *key)
{
    if (!changed)
        return;
    d->restart = esmd_xrealloc(d->restart, (d->nrestart + 1) * sizeof(char *));
    d->restart[d->nrestart++] = esmd_xstrdup(key);
}

void esmd_config_diff(const struct esmd_config *old, const struct esmd_config *cur,
                      struct esmd_config_diff *d)
{
    memset(d, 0, sizeof(*d));
    need_restart(d, !str_same(old->postgres, cur->postgres), "postgres");
    need_restart(d, !str_same(old->aws.region, cur->aws.region), "aws.region");
    need_restart(d, !str_same(old->aws.account_id, cur->aws.account_id), "aws.account_id");
    need_restart(d, !str_same(old->admin.listen, cur->admin.listen), "admin.listen");
    need_restart(d, !str_same(old->admin.token, cur->admin.token), "admin.token");
    need_restart(d,
                 !str_same(old->admin.access_key_id, cur->admin.access_key_id) ||
                     !str_same(old->admin.secret_access_key, cur->admin.secret_access_key),
                 "admin.aws_credentials");
    need_restart(d, old->admin.max_connections_per_client != cur->admin.max_connections_per_client,
                 "admin.max_connections_per_client");
    size_t n;
    const struct esmd_cfg_key *aq = esmd_config_keys("async_queue", &n);
    for (size_t i = 0; i < n; i++) {
        char key[128];
        snprintf(key, sizeof(key), "async_queue.%s", aq[i].name);
        need_restart(d, !key_same(&aq[i], &old->async_queue, &cur->async_queue), key);
    }

    d->functions = esmd_xcalloc(cur->nfunctions + 1, sizeof(*d->functions));
    d->nfunctions = cur->nfunctions;
    for (size_t i = 0; i < cur->nfunctions; i++) {
        const struct esmd_function_cfg *was = esmd_config_function(old, cur->functions[i].name);
        if (was) {
            diff_function(was, &cur->functions[i], &d->functions[i]);
        } else {
            d->functions[i].action = ESMD_RELOAD_ADD;
        }
    }

    d->mappings = esmd_xcalloc(cur->nmappings + 1, sizeof(*d->mappings));
    d->nmappings = cur->nmappings;
    for (size_t i = 0; i < cur->nmappings; i++) {
        const struct esmd_mapping_cfg *was = NULL;
        for (size_t j = 0; j < old->nmappings && !was; j++)
            if (str_same(old->mappings[j].name, cur->mappings[i].name))
                was = &old->mappings[j];
        if (was)
            diff_mapping(was, &cur->mappings[i], &d->mappings[i]);
        else
            d->mappings[i].action = ESMD_RELOAD_ADD;
    }
    d->removed = esmd_xcalloc(old->nmappings + 1, sizeof(*d->removed));
    for (size_t j = 0; j < old->nmappings; j++) {
        bool found = false;
        for (size_t i = 0; i < cur->nmappings && !found; i++)
            found = str_same(old->mappings[j].name, cur->mappings[i].name);
        d->removed[j] = !found;
        d->nremoved += !found;
    }
}

void esmd_config_diff_free(struct esmd_config_diff *d)
{
    if (!d)
        return;
    for (size_t i = 0; i < d->nmappings; i++)
        free(d->mappings[i].keys);
    free(d->mappings);
    for (size_t i = 0; i < d->nfunctions; i++)
        free(d->functions[i].keys);
    free(d->functions);
    free(d->removed);
    for (size_t i = 0; i < d->nrestart; i++)
        free(d->restart[i]);
    free(d->restart);
    memset(d, 0, sizeof(*d));
}

static void set_str(char **dst, const char *src)
{
    free(*dst);
    *dst = src ? esmd_xstrdup(src) : NULL;
}

void esmd_config_keep_restart_keys(struct esmd_config *cur, const struct esmd_config *old)
{
    set_str(&cur->postgres, old->postgres);
    set_str(&cur->aws.region, old->aws.region);
    set_str(&cur->aws.account_id, old->aws.account_id);
    set_str(&cur->admin.listen, old->admin.listen);
    set_str(&cur->admin.token, old->admin.token);
    set_str(&cur->admin.access_key_id, old->admin.access_key_id);
    set_str(&cur->admin.secret_access_key, old->admin.secret_access_key);
    cur->admin.max_connections_per_client = old->admin.max_connections_per_client;
    cur->async_queue = old->async_queue; /* no pointers in it */
    for (size_t i = 0; i < cur->nmappings; i++)
        if (cur->mappings[i].kind == ESMD_SOURCE_PGQUEUE)
            cur->mappings[i].pgqueue.service_postgres = cur->postgres;
}

void esmd_config_keep_unroutable(struct esmd_config *cur, const struct esmd_config *old,
                                 bool (*routable)(void *ud, const char *uri), void *ud,
                                 struct esmd_config_diff *d)
{
    for (size_t i = 0; i < cur->nfunctions; i++) {
        struct esmd_function_cfg *f = &cur->functions[i];
        const struct esmd_function_cfg *was = esmd_config_function(old, f->name);
        struct {
            const char *key;
            char **now;
            char *const *before;
        } uris[] = {
            {"on_success", &f->async.on_success, was ? &was->async.on_success : NULL},
            {"on_failure", &f->async.on_failure, was ? &was->async.on_failure : NULL},
            {"dead_letter", &f->async.dead_letter, was ? &was->async.dead_letter : NULL},
        };
        for (size_t k = 0; k < ESMD_ARRAY_LEN(uris); k++) {
            const char *before = uris[k].before ? *uris[k].before : NULL;
            if (!*uris[k].now || str_same(*uris[k].now, before) || routable(ud, *uris[k].now))
                continue;
            char key[256];
            snprintf(key, sizeof(key), "functions.%s.async.%s", f->name, uris[k].key);
            need_restart(d, true, key);
            set_str(uris[k].now, before);
        }
    }
}

bool esmd_config_diff_knows(const char *section, const char *key)
{
    static const char *const mappings[] = {"name", "function", "source", "filters", "logging"};
    static const char *const functions[] = {"headers", "async"};
    const char *const *known = !strcmp(section, "mappings") ? mappings : functions;
    size_t n = !strcmp(section, "mappings") ? ESMD_ARRAY_LEN(mappings) : ESMD_ARRAY_LEN(functions);
    for (size_t i = 0; i < n; i++)
        if (!strcmp(known[i], key))
            return true;
    return false;
}
