/* The YAML configuration (include/esmd/config.h, docs/configuration.md).
 *
 * Three steps:
 *   1. libyaml events become a tree of nodes; every node keeps file:line:col and its place in
 *      its parent (from which messages get its key path, "mappings[0].source.topics") and, for
 *      scalars, the text with ${VAR} already expanded; maps of more than SMALL_MAP keys are
 *      indexed, so loading is linear in the file, which is bounded (MAX_*);
 *   2. each section is read through a key table (struct esmd_cfg_key: name, type, range, flags),
 *      the only place where a key is declared; unknown keys are errors. A source's keys and a
 *      connection's are the connector's own tables (include/esmd/connector.h), read here with its
 *      own checks, so check-config refuses what the connector would;
 *   3. checks that need the whole file (destinations).
 * Every problem is appended to the error list; reading goes on after an error, so one run reports
 * them all. The errors of one load are sorted by position at the end. */
#include "esmd/config.h"
#include "esmd/destination.h"

#include "esmd/buf.h"
#include "esmd/connector.h"
#include "esmd/filter.h"

#include <cJSON.h>
#include <yaml.h>

#include <assert.h>
#include <ctype.h>
#include <errno.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* What one file may hold (docs/configuration.md, "Values"). */
#define MAX_DEPTH 64                     /* nesting levels of the YAML document */
#define MAX_FILE_SIZE (16 * 1024 * 1024) /* bytes */
#define MAX_NODES 1000000                /* YAML nodes: keys' values, list items, scalars */
#define MAX_MAPPINGS 10000
#define MAX_FUNCTIONS 10000
#define MAX_CONNECTIONS 1000
#define SMALL_MAP 8                 /* a map with more pairs gets an index of its keys */
#define SHOW_NAMES 20               /* names listed in "(defined: ...)" */
#define MAX_FILTERS_LIMIT 100       /* how far max_filters may raise Lambda's 5 */
#define MAX_PATTERN_LEN_LIMIT 65536 /* how far max_filter_pattern_length may raise 4096 */
#define SHOW_MAX 60                 /* characters of a value quoted in a message */
#define DEFAULT_LISTEN "127.0.0.1:9000"

#define MS_SEC 1000LL
#define MS_MIN (60 * MS_SEC)
#define MS_HOUR (60 * MS_MIN)

_Static_assert(sizeof(enum esmd_starting_position) == sizeof(int), "enum fields are read as int");
_Static_assert(sizeof(enum esmd_conn_type) == sizeof(int), "enum fields are read as int");

/* ---- errors ---- */

void esmd_config_errors_init(struct esmd_config_errors *errs)
{
    errs->items = NULL;
    errs->n = errs->cap = 0;
}

void esmd_config_errors_free(struct esmd_config_errors *errs)
{
    if (!errs)
        return;
    for (size_t i = 0; i < errs->n; i++) {
        free(errs->items[i].file);
        free(errs->items[i].key);
        free(errs->items[i].message);
    }
    free(errs->items);
    esmd_config_errors_init(errs);
}

void esmd_config_error_format(const struct esmd_config_error *e, char *out, size_t outlen)
{
    if (!outlen)
        return;
    char pos[32] = "";
    if (e->line > 0)
        snprintf(pos, sizeof(pos), ":%d:%d", e->line, e->col);
    const char *file = e->file ? e->file : "";
    const char *msg = e->message ? e->message : "";
    if (e->key && *e->key)
        snprintf(out, outlen, "%s%s: %s: %s", file, pos, e->key, msg);
    else
        snprintf(out, outlen, "%s%s: %s", file, pos, msg);
}

ESMD_PRINTF(6, 0)
static void errs_addv(struct esmd_config_errors *errs, const char *file, int line, int col,
                      const char *key, const char *fmt, va_list ap)
{
    if (errs->n == errs->cap) {
        errs->cap = errs->cap ? errs->cap * 2 : 8;
        errs->items = esmd_xrealloc(errs->items, errs->cap * sizeof(*errs->items));
    }
    va_list ap2;
    va_copy(ap2, ap);
    int len = vsnprintf(NULL, 0, fmt, ap);
    char *msg = esmd_xmalloc(len > 0 ? (size_t)len + 1 : 1);
    if (len > 0)
        vsnprintf(msg, (size_t)len + 1, fmt, ap2);
    else
        msg[0] = '\0';
    va_end(ap2);

    struct esmd_config_error *e = &errs->items[errs->n++];
    e->file = esmd_xstrdup(file ? file : "");
    e->line = line;
    e->col = col;
    e->key = esmd_xstrdup(key ? key : "");
    e->message = msg;
}

ESMD_PRINTF(3, 4)
static void errs_add(struct esmd_config_errors *errs, const char *file, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    errs_addv(errs, file, 0, 0, "", fmt, ap);
    va_end(ap);
}

struct sort_item {
    struct esmd_config_error e;
    size_t seq;
};

static int cmp_errors(const void *a, const void *b)
{
    const struct sort_item *x = a, *y = b;
    if (x->e.line != y->e.line)
        return x->e.line < y->e.line ? -1 : 1;
    if (x->e.col != y->e.col)
        return x->e.col < y->e.col ? -1 : 1;
    return x->seq < y->seq ? -1 : (x->seq > y->seq);
}

/* Sorts errs->items[first..] by position, keeping the order of errors at the same position. */
static void sort_errors(struct esmd_config_errors *errs, size_t first)
{
    size_t n = errs->n - first;
    if (n < 2)
        return;
    struct sort_item *tmp = esmd_xmalloc(n * sizeof(*tmp));
    for (size_t i = 0; i < n; i++) {
        tmp[i].e = errs->items[first + i];
        tmp[i].seq = i;
    }
    qsort(tmp, n, sizeof(*tmp), cmp_errors);
    for (size_t i = 0; i < n; i++)
        errs->items[first + i] = tmp[i].e;
    free(tmp);
}

/* ---- nodes ---- */

enum node_kind { NODE_SCALAR, NODE_MAP, NODE_LIST };

struct node_pair;

/* An index of borrowed strings for lookups in constant time: map keys, mapping, function and
 * connection names. Open addressing; a slot holds an index into the caller's array + 1. */
struct strindex {
    uint32_t *slots; /* owned; NULL while empty */
    size_t cap;      /* a power of two */
    size_t n;
};

/* One YAML node. Scalars hold their text with ${VAR} expanded; a map keeps its keys in document
 * order (duplicates are reported and dropped when the tree is built). A node's key path
 * ("mappings[0].source.topics[1]") and name ("topics[1]") are computed from its parents when a
 * message needs them (node_path(), node_name()), so the tree takes memory linear in the file. */
struct esmd_cfg_node {
    enum node_kind kind;
    int line, col;                      /* 1-based */
    const struct esmd_cfg_node *parent; /* NULL for the document */
    const char *key; /* borrowed: the key of a map's value (NULL for a list item) */
    size_t index;    /* a list item's position */
    char *value;     /* owned: scalar text */
    bool quoted;     /* scalar written quoted, as a block, or tagged !!str: always a string */
    bool bad;        /* an error about this node was reported already; readers skip it */
    struct node_pair *pairs; /* NODE_MAP */
    size_t npairs;
    struct strindex keys; /* NODE_MAP with more than SMALL_MAP pairs: index of pairs by key */
    struct esmd_cfg_node **items; /* NODE_LIST */
    size_t nitems;
};

struct node_pair {
    char *key; /* owned */
    int line, col;
    struct esmd_cfg_node *val; /* owned */
};

/* A destination URI read before the functions and connections it names are all known. */
struct pending_dest {
    const struct esmd_cfg_node *n;
    char **uri; /* the field in the config; cleared when the URI is wrong */
};

struct esmd_cfg_loader {
    const char *file;
    const char *text;
    size_t len;
    unsigned flags;
    struct esmd_config_errors *errs;
    struct esmd_config *cfg;
    yaml_parser_t parser;
    bool yaml_failed; /* a syntax error was reported: there is no usable tree */
    size_t nnodes;    /* nodes built so far (MAX_NODES) */
    struct pending_dest *dests;
    size_t ndests, capdests;
    const struct esmd_cfg_node *functions, *connections; /* their sections: name → index lookups */
    const struct esmd_connector_ops *source_ops;         /* the kind of the source being read */
    struct strindex mapping_names;                       /* names of the mappings read so far */
    struct esmd_buf path, name; /* node_path()'s and node_name()'s results */
    char shown[SHOW_MAX + 8];   /* show()'s result */
};

/* ---- string index ---- */

static uint64_t compares; /* esmd_config_compares() */

uint64_t esmd_config_compares(void)
{
    return compares;
}

static bool same_key(const char *a, const char *b)
{
    compares++;
    return strcmp(a, b) == 0;
}

static size_t str_hash(const char *s)
{
    uint64_t h = 1469598103934665603ULL; /* FNV-1a */
    for (; *s; s++)
        h = (h ^ (unsigned char)*s) * 1099511628211ULL;
    return (size_t)(h ^ (h >> 32));
}

/* The index of the entry whose key (key_at(arr, index)) is key, or -1. */
static long strindex_find(const struct strindex *ix, const char *key,
                          const char *(*key_at)(const void *arr, size_t i), const void *arr)
{
    if (!ix->slots)
        return -1;
    for (size_t i = str_hash(key) & (ix->cap - 1);; i = (i + 1) & (ix->cap - 1)) {
        uint32_t slot = ix->slots[i];
        if (!slot)
            return -1;
        if (same_key(key_at(arr, slot - 1), key))
            return (long)slot - 1;
    }
}

/* Adds entry `index` (keys must be unique: look up first). */
static void strindex_add(struct strindex *ix, size_t index,
                         const char *(*key_at)(const void *arr, size_t i), const void *arr)
{
    if (2 * (ix->n + 1) > ix->cap) { /* keep at most half full */
        size_t cap = ix->cap ? ix->cap * 2 : 16;
        uint32_t *old = ix->slots;
        size_t oldcap = ix->cap;
        ix->slots = esmd_xcalloc(cap, sizeof(*ix->slots));
        ix->cap = cap;
        for (size_t j = 0; j < oldcap; j++) {
            if (!old[j])
                continue;
            size_t i = str_hash(key_at(arr, old[j] - 1)) & (cap - 1);
            while (ix->slots[i])
                i = (i + 1) & (cap - 1);
            ix->slots[i] = old[j];
        }
        free(old);
    }
    size_t i = str_hash(key_at(arr, index)) & (ix->cap - 1);
    while (ix->slots[i])
        i = (i + 1) & (ix->cap - 1);
    ix->slots[i] = (uint32_t)index + 1;
    ix->n++;
}

static void strindex_free(struct strindex *ix)
{
    free(ix->slots);
    *ix = (struct strindex){0};
}

static const char *pair_key_at(const void *arr, size_t i)
{
    return ((const struct node_pair *)arr)[i].key;
}

/* ---- nodes ---- */

static void put_path(struct esmd_buf *b, const struct esmd_cfg_node *n)
{
    if (!n->parent)
        return;
    put_path(b, n->parent);
    if (n->key)
        esmd_buf_printf(b, "%s%s", b->len ? "." : "", n->key);
    else
        esmd_buf_printf(b, "[%zu]", n->index);
}

/* n's key path, "" for the document. Valid until the next call. */
static const char *node_path(struct esmd_cfg_loader *ld, const struct esmd_cfg_node *n)
{
    esmd_buf_reset(&ld->path);
    put_path(&ld->path, n);
    return esmd_buf_cstr(&ld->path);
}

static void put_name(struct esmd_buf *b, const struct esmd_cfg_node *n)
{
    if (!n->parent)
        return;
    if (n->key) {
        esmd_buf_puts(b, n->key);
        return;
    }
    put_name(b, n->parent);
    esmd_buf_printf(b, "[%zu]", n->index);
}

/* The last part of n's key path ("batch_size", "topics[1]"). Valid until the next call. */
static const char *node_name(struct esmd_cfg_loader *ld, const struct esmd_cfg_node *n)
{
    esmd_buf_reset(&ld->name);
    put_name(&ld->name, n);
    return esmd_buf_cstr(&ld->name);
}

ESMD_PRINTF(5, 6)
static void ld_err_at(struct esmd_cfg_loader *ld, int line, int col, const char *key,
                      const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    errs_addv(ld->errs, ld->file, line, col, key, fmt, ap);
    va_end(ap);
}

/* An error at node n, under n's key path. */
ESMD_PRINTF(3, 4)
static void ld_err(struct esmd_cfg_loader *ld, const struct esmd_cfg_node *n, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    errs_addv(ld->errs, ld->file, n->line, n->col, node_path(ld, n), fmt, ap);
    va_end(ap);
}

static void node_free(struct esmd_cfg_node *n)
{
    if (!n)
        return;
    for (size_t i = 0; i < n->npairs; i++) {
        node_free(n->pairs[i].val);
        free(n->pairs[i].key);
    }
    for (size_t i = 0; i < n->nitems; i++)
        node_free(n->items[i]);
    free(n->pairs);
    strindex_free(&n->keys);
    free(n->items);
    free(n->value);
    free(n);
}

/* key is borrowed: it must live as long as the node (the parent's pair owns it). */
static struct esmd_cfg_node *node_new(struct esmd_cfg_loader *ld, enum node_kind kind, int line,
                                      int col, const struct esmd_cfg_node *parent, const char *key,
                                      size_t index)
{
    struct esmd_cfg_node *n = esmd_xcalloc(1, sizeof(*n));
    n->kind = kind;
    n->line = line;
    n->col = col;
    n->parent = parent;
    n->key = key;
    n->index = index;
    ld->nnodes++;
    return n;
}

static const struct node_pair *map_find(const struct esmd_cfg_node *n, const char *key)
{
    if (!n || n->kind != NODE_MAP)
        return NULL;
    if (n->keys.slots) {
        long i = strindex_find(&n->keys, key, pair_key_at, n->pairs);
        return i < 0 ? NULL : &n->pairs[i];
    }
    for (size_t i = 0; i < n->npairs; i++)
        if (same_key(n->pairs[i].key, key))
            return &n->pairs[i];
    return NULL;
}

static const struct esmd_cfg_node *map_get(const struct esmd_cfg_node *n, const char *key)
{
    const struct node_pair *p = map_find(n, key);
    return p ? p->val : NULL;
}

static bool is_null(const struct esmd_cfg_node *n)
{
    if (n->kind != NODE_SCALAR || n->quoted)
        return false;
    const char *v = n->value;
    return !*v || !strcmp(v, "~") || !strcmp(v, "null") || !strcmp(v, "Null") || !strcmp(v, "NULL");
}

/* How a value is shown in messages: plain scalars as written, quoted ones in quotes, long ones
 * cut, control characters as '?'. Valid until the next call. */
static const char *show_text(struct esmd_cfg_loader *ld, const char *s, bool quoted)
{
    size_t len = strlen(s), cut = len > SHOW_MAX ? SHOW_MAX - 3 : len, o = 0;
    if (quoted)
        ld->shown[o++] = '"';
    for (size_t i = 0; i < cut; i++) {
        unsigned char c = (unsigned char)s[i];
        ld->shown[o++] = (char)(c < 0x20 || c == 0x7f ? '?' : c);
    }
    if (cut < len) {
        memcpy(ld->shown + o, "...", 3);
        o += 3;
    }
    if (quoted)
        ld->shown[o++] = '"';
    ld->shown[o] = '\0';
    return ld->shown;
}

static const char *show(struct esmd_cfg_loader *ld, const struct esmd_cfg_node *n)
{
    if (n->kind == NODE_MAP)
        return "a mapping";
    if (n->kind == NODE_LIST)
        return "a list";
    if (!n->quoted && !*n->value)
        return "nothing";
    if (is_null(n))
        return "null";
    return show_text(ld, n->value, n->quoted);
}

/* ---- building the tree ---- */

static void yaml_syntax_error(struct esmd_cfg_loader *ld)
{
    yaml_parser_t *p = &ld->parser;
    int line = (int)p->problem_mark.line + 1, col = (int)p->problem_mark.column + 1;
    if (p->error == YAML_READER_ERROR) {
        /* The reader reports a byte offset only. */
        size_t end = p->problem_offset < ld->len ? p->problem_offset : ld->len;
        line = 1;
        col = 1;
        for (size_t i = 0; i < end; i++) {
            if (ld->text[i] == '\n') {
                line++;
                col = 1;
            } else {
                col++;
            }
        }
    }
    const char *problem = p->problem ? p->problem : "out of memory";
    if (p->context)
        ld_err_at(ld, line, col, "", "YAML syntax error: %s (%s at line %d, column %d)", problem,
                  p->context, (int)p->context_mark.line + 1, (int)p->context_mark.column + 1);
    else
        ld_err_at(ld, line, col, "", "YAML syntax error: %s", problem);
    ld->yaml_failed = true;
}

static bool next_event(struct esmd_cfg_loader *ld, yaml_event_t *ev)
{
    if (yaml_parser_parse(&ld->parser, ev))
        return true;
    yaml_syntax_error(ld);
    return false;
}

static bool is_var_name(const char *s, size_t n)
{
    if (n == 0 || (s[0] >= '0' && s[0] <= '9'))
        return false;
    for (size_t i = 0; i < n; i++) {
        char c = s[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '_'))
            return false;
    }
    return true;
}

/* Returns s with every ${VAR} replaced from the environment and $${ written as ${; caller frees.
 * Unset or malformed references are reported at n, which is then marked bad. */
static char *expand_vars(struct esmd_cfg_loader *ld, struct esmd_cfg_node *n, const char *s)
{
    if (!strchr(s, '$'))
        return esmd_xstrdup(s);
    struct esmd_buf b = ESMD_BUF_INIT;
    const char *p = s;
    while (*p) {
        if (p[0] == '$' && p[1] == '$' && p[2] == '{') {
            esmd_buf_puts(&b, "${");
            p += 3;
        } else if (p[0] == '$' && p[1] == '{') {
            const char *name = p + 2, *end = strchr(name, '}');
            if (!end) {
                ld_err(ld, n, "unterminated ${ (write $${ for a literal ${)");
                n->bad = true;
                break;
            }
            size_t len = (size_t)(end - name);
            if (!is_var_name(name, len)) {
                ld_err(ld, n,
                       "\"${%.*s}\" is not a variable reference: a name has letters, digits "
                       "and _ and does not start with a digit (write $${ for a literal ${)",
                       (int)(len > SHOW_MAX ? SHOW_MAX : len), name);
                n->bad = true;
            } else {
                char *var = esmd_xstrndup(name, len);
                const char *val = getenv(var);
                if (val) {
                    esmd_buf_puts(&b, val);
                } else {
                    ld_err(ld, n, "environment variable \"%s\" is not set", var);
                    n->bad = true;
                }
                free(var);
            }
            p = end + 1;
        } else {
            esmd_buf_putc(&b, *p++);
        }
    }
    return esmd_buf_steal(&b, NULL);
}

static bool is_str_tag(const char *tag)
{
    return !strcmp(tag, "tag:yaml.org,2002:str") || !strcmp(tag, "!!str");
}

static struct esmd_cfg_node *parse_node(struct esmd_cfg_loader *ld, yaml_event_t *ev,
                                        const struct esmd_cfg_node *parent, const char *key,
                                        size_t index, int depth);

static void map_add(struct esmd_cfg_node *n, char *key, int line, int col,
                    struct esmd_cfg_node *val)
{
    if ((n->npairs & (n->npairs - 1)) == 0) /* 0, 1, 2, 4, ...: grow by doubling */
        n->pairs = esmd_xrealloc(n->pairs, (n->npairs ? n->npairs * 2 : 1) * sizeof(*n->pairs));
    n->pairs[n->npairs++] = (struct node_pair){key, line, col, val};
    if (n->npairs == SMALL_MAP + 1) {
        for (size_t i = 0; i < n->npairs; i++)
            strindex_add(&n->keys, i, pair_key_at, n->pairs);
    } else if (n->npairs > SMALL_MAP) {
        strindex_add(&n->keys, n->npairs - 1, pair_key_at, n->pairs);
    }
}

static bool parse_map_body(struct esmd_cfg_loader *ld, struct esmd_cfg_node *n, int depth)
{
    for (;;) {
        yaml_event_t kev, vev;
        if (!next_event(ld, &kev))
            return false;
        if (kev.type == YAML_MAPPING_END_EVENT) {
            yaml_event_delete(&kev);
            return true;
        }
        int kline = (int)kev.start_mark.line + 1, kcol = (int)kev.start_mark.column + 1;
        char *key = NULL;
        if (kev.type == YAML_SCALAR_EVENT) {
            key = esmd_xstrndup((const char *)kev.data.scalar.value, kev.data.scalar.length);
            yaml_event_delete(&kev);
        } else {
            ld_err_at(ld, kline, kcol, node_path(ld, n),
                      "a key must be a scalar, not a list or mapping");
            struct esmd_cfg_node *junk =
                parse_node(ld, &kev, n->parent, n->key, n->index, depth + 1);
            if (!junk)
                return false;
            node_free(junk);
        }
        if (!next_event(ld, &vev)) {
            free(key);
            return false;
        }
        struct esmd_cfg_node *val = parse_node(ld, &vev, n, key ? key : "", 0, depth + 1);
        if (!val) {
            free(key);
            return false;
        }
        const struct node_pair *dup = key ? map_find(n, key) : NULL;
        if (!key || dup) {
            if (dup)
                ld_err_at(ld, kline, kcol, node_path(ld, val),
                          "key \"%s\" appears twice (first at line %d)", show_text(ld, key, false),
                          dup->line);
            node_free(val);
            free(key);
            continue;
        }
        map_add(n, key, kline, kcol, val);
    }
}

static bool parse_list_body(struct esmd_cfg_loader *ld, struct esmd_cfg_node *n, int depth)
{
    for (;;) {
        yaml_event_t ev;
        if (!next_event(ld, &ev))
            return false;
        if (ev.type == YAML_SEQUENCE_END_EVENT) {
            yaml_event_delete(&ev);
            return true;
        }
        struct esmd_cfg_node *item = parse_node(ld, &ev, n, NULL, n->nitems, depth + 1);
        if (!item)
            return false;
        if ((n->nitems & (n->nitems - 1)) == 0)
            n->items = esmd_xrealloc(n->items, (n->nitems ? n->nitems * 2 : 1) * sizeof(*n->items));
        n->items[n->nitems++] = item;
    }
}

/* Builds the node that starts with *ev, which it consumes, as the value of key in parent (key
 * borrowed, NULL for list item `index`). Returns NULL after a YAML syntax error or past a limit
 * (already reported). */
static struct esmd_cfg_node *parse_node(struct esmd_cfg_loader *ld, yaml_event_t *ev,
                                        const struct esmd_cfg_node *parent, const char *key,
                                        size_t index, int depth)
{
    int line = (int)ev->start_mark.line + 1, col = (int)ev->start_mark.column + 1;
    struct esmd_cfg_node *n = NULL;
    bool ok = true;

    if (ld->nnodes >= MAX_NODES) {
        ld_err_at(ld, line, col, "",
                  "the file holds more than %d YAML nodes (values and list items), the limit",
                  MAX_NODES);
        ld->yaml_failed = true;
        yaml_event_delete(ev);
        return NULL;
    }
    switch (ev->type) {
    case YAML_SCALAR_EVENT: {
        n = node_new(ld, NODE_SCALAR, line, col, parent, key, index);
        const char *tag = (const char *)ev->data.scalar.tag;
        const char *v = (const char *)ev->data.scalar.value;
        n->quoted = ev->data.scalar.style != YAML_PLAIN_SCALAR_STYLE || (tag && is_str_tag(tag));
        if (strlen(v) != ev->data.scalar.length) {
            ld_err(ld, n, "%s must not contain a NUL character", node_name(ld, n));
            n->bad = true;
            n->value = esmd_xstrdup("");
        } else {
            n->value = expand_vars(ld, n, v);
        }
        break;
    }
    case YAML_ALIAS_EVENT:
        n = node_new(ld, NODE_SCALAR, line, col, parent, key, index);
        n->value = esmd_xstrdup("");
        ld_err(ld, n, "YAML aliases (*%s) are not supported",
               show_text(ld, (const char *)ev->data.alias.anchor, false));
        n->bad = true;
        break;
    case YAML_SEQUENCE_START_EVENT:
    case YAML_MAPPING_START_EVENT: {
        bool map = ev->type == YAML_MAPPING_START_EVENT;
        n = node_new(ld, map ? NODE_MAP : NODE_LIST, line, col, parent, key, index);
        if (depth >= MAX_DEPTH) {
            ld_err(ld, n, "the document is nested deeper than %d levels", MAX_DEPTH);
            ld->yaml_failed = true;
            ok = false;
            break;
        }
        yaml_event_delete(ev);
        ok = map ? parse_map_body(ld, n, depth) : parse_list_body(ld, n, depth);
        if (!ok)
            node_free(n);
        return ok ? n : NULL;
    }
    default:
        n = node_new(ld, NODE_SCALAR, line, col, parent, key, index);
        ld_err(ld, n, "YAML syntax error: unexpected event");
        ld->yaml_failed = true;
        ok = false;
        break;
    }
    yaml_event_delete(ev);
    if (!ok) {
        node_free(n);
        return NULL;
    }
    return n;
}

/* Returns the document's root node, or NULL for an empty file or after a syntax error
 * (ld->yaml_failed). */
static struct esmd_cfg_node *load_tree(struct esmd_cfg_loader *ld)
{
    struct esmd_cfg_node *root = NULL;
    yaml_event_t ev;
    if (!yaml_parser_initialize(&ld->parser)) {
        ld_err_at(ld, 0, 0, "", "cannot initialise the YAML parser");
        ld->yaml_failed = true;
        return NULL;
    }
    yaml_parser_set_input_string(&ld->parser, (const unsigned char *)ld->text, ld->len);

    if (!next_event(ld, &ev)) /* stream start */
        goto cleanup;
    yaml_event_delete(&ev);
    if (!next_event(ld, &ev))
        goto cleanup;
    if (ev.type == YAML_STREAM_END_EVENT) { /* no document at all */
        yaml_event_delete(&ev);
        goto cleanup;
    }
    yaml_event_delete(&ev); /* document start */
    if (!next_event(ld, &ev))
        goto cleanup;
    root = parse_node(ld, &ev, NULL, NULL, 0, 0);
    if (!root || !next_event(ld, &ev)) /* document end */
        goto cleanup;
    yaml_event_delete(&ev);
    if (!next_event(ld, &ev))
        goto cleanup;
    if (ev.type == YAML_DOCUMENT_START_EVENT)
        ld_err_at(ld, (int)ev.start_mark.line + 1, (int)ev.start_mark.column + 1, "",
                  "a configuration file holds one YAML document, found a second one");
    yaml_event_delete(&ev);

cleanup:
    yaml_parser_delete(&ld->parser);
    if (ld->yaml_failed) {
        node_free(root);
        return NULL;
    }
    return root;
}

/* ---- names, URLs and other string checks ---- */

static bool is_alnum(char c)
{
    return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9');
}

bool esmd_config_valid_chars(const char *s, size_t maxlen, const char *extra)
{
    size_t n = strlen(s);
    if (n == 0 || n > maxlen)
        return false;
    for (const char *p = s; *p; p++)
        if (!is_alnum(*p) && !strchr(extra, *p))
            return false;
    return true;
}

static bool has_space(const char *s)
{
    for (const unsigned char *p = (const unsigned char *)s; *p; p++)
        if (*p <= 0x20 || *p == 0x7f)
            return true;
    return false;
}

static bool has_prefix(const char *s, const char *prefix)
{
    return strncmp(s, prefix, strlen(prefix)) == 0;
}

#define FUNCTION_NAME_RULE "1 to 64 characters of letters, digits, '_' or '-'"

/* Mapping, connection and queue names. */
bool esmd_config_valid_name(const char *s)
{
    return esmd_config_valid_chars(s, 64, "_.-");
}

static bool valid_function_name(const char *s)
{
    return esmd_config_valid_chars(s, 64, "_-");
}

bool esmd_config_valid_topic(const char *s)
{
    return esmd_config_valid_chars(s, 249, "._-") && strcmp(s, ".") != 0 && strcmp(s, "..") != 0;
}

static bool valid_http_url(const char *s)
{
    const char *rest = has_prefix(s, "http://") ? s + 7 : has_prefix(s, "https://") ? s + 8 : NULL;
    return rest && *rest && !strchr("/?#", *rest) && !has_space(s);
}

/* host:port with port 1..65535; an IPv6 host in brackets. */
static bool valid_listen(const char *s)
{
    const char *colon = strrchr(s, ':');
    if (!colon || colon == s)
        return false;
    const char *port = colon + 1;
    size_t plen = strlen(port);
    if (plen == 0 || plen > 5 || port[0] == '0')
        return false;
    long v = 0;
    for (const char *p = port; *p; p++) {
        if (*p < '0' || *p > '9')
            return false;
        v = v * 10 + (*p - '0');
    }
    if (v > 65535)
        return false;
    if (s[0] == '[') {
        if (colon[-1] != ']' || colon - s < 3)
            return false;
        for (const char *p = s + 1; p < colon - 1; p++)
            if (!(is_alnum(*p) || *p == ':' || *p == '.'))
                return false;
        return true;
    }
    for (const char *p = s; p < colon; p++)
        if (*p == ':' || *p == '[' || *p == ']' || (unsigned char)*p <= 0x20 || *p == 0x7f)
            return false;
    return true;
}

static bool valid_header_name(const char *s)
{
    return esmd_config_valid_chars(s, 256, "!#$%&'*+-.^_`|~");
}

/* Decimal integer with optional sign, no spaces. */
static bool parse_i64(const char *s, int64_t *out)
{
    const char *p = s;
    bool neg = *p == '-';
    if (*p == '-' || *p == '+')
        p++;
    if (!*p)
        return false;
    uint64_t v = 0;
    for (; *p; p++) {
        if (*p < '0' || *p > '9')
            return false;
        v = v * 10 + (uint64_t)(*p - '0');
        if (v > (uint64_t)INT64_MAX)
            return false;
    }
    *out = neg ? -(int64_t)v : (int64_t)v;
    return true;
}

/* JSON's number grammar: -?(0|[1-9][0-9]*)(\.[0-9]+)?([eE][+-]?[0-9]+)? */
static bool is_json_number(const char *s)
{
    const char *p = s;
    if (*p == '-')
        p++;
    if (*p == '0')
        p++;
    else if (*p >= '1' && *p <= '9')
        while (*p >= '0' && *p <= '9')
            p++;
    else
        return false;
    if (*p == '.') {
        p++;
        if (*p < '0' || *p > '9')
            return false;
        while (*p >= '0' && *p <= '9')
            p++;
    }
    if (*p == 'e' || *p == 'E') {
        p++;
        if (*p == '+' || *p == '-')
            p++;
        if (*p < '0' || *p > '9')
            return false;
        while (*p >= '0' && *p <= '9')
            p++;
    }
    return *p == '\0';
}

/* Reads the leading decimal digits of s (at least one) into *v; returns the unit after them,
 * or NULL when there are no digits or the number overflows. */
static const char *parse_count(const char *s, int64_t *v)
{
    if (!s || *s < '0' || *s > '9')
        return NULL;
    *v = 0;
    for (; *s >= '0' && *s <= '9'; s++) {
        if (*v > (INT64_MAX - (*s - '0')) / 10)
            return NULL;
        *v = *v * 10 + (*s - '0');
    }
    return s;
}

int esmd_parse_duration_ms(const char *s, int64_t *out)
{
    int64_t v;
    const char *p = parse_count(s, &v);
    if (!p)
        return ESMD_EINVAL;
    int64_t mult;
    if (!strcmp(p, "ms"))
        mult = 1;
    else if (!strcmp(p, "s"))
        mult = MS_SEC;
    else if (!strcmp(p, "m"))
        mult = MS_MIN;
    else if (!strcmp(p, "h"))
        mult = MS_HOUR;
    else
        return ESMD_EINVAL;
    if (v > INT64_MAX / mult)
        return ESMD_EINVAL;
    *out = v * mult;
    return 0;
}

int esmd_parse_size(const char *s, int64_t *out)
{
    int64_t v;
    const char *p = parse_count(s, &v);
    if (!p)
        return ESMD_EINVAL;
    int64_t mult;
    if (!*p || !strcmp(p, "B"))
        mult = 1;
    else if (!strcmp(p, "KB"))
        mult = 1024;
    else if (!strcmp(p, "MB"))
        mult = 1024 * 1024;
    else
        return ESMD_EINVAL;
    if (v > INT64_MAX / mult)
        return ESMD_EINVAL;
    *out = v * mult;
    return 0;
}

/* A duration the way messages show it: the largest unit that divides it ("15m", "6h", "500ms");
 * minutes only above one minute, so 60 s stays "60s". */
const char *esmd_config_fmt_duration(int64_t ms, char out[32])
{
    if (ms == 0)
        snprintf(out, 32, "0s");
    else if (ms % MS_HOUR == 0)
        snprintf(out, 32, "%lldh", (long long)(ms / MS_HOUR));
    else if (ms % MS_MIN == 0 && ms > MS_MIN)
        snprintf(out, 32, "%lldm", (long long)(ms / MS_MIN));
    else if (ms % MS_SEC == 0)
        snprintf(out, 32, "%llds", (long long)(ms / MS_SEC));
    else
        snprintf(out, 32, "%lldms", (long long)ms);
    return out;
}

/* ---- typed readers: each reports its own error and returns false ---- */

/* The scalar text of n, or NULL after "must be a string". */
static const char *read_text(struct esmd_cfg_loader *ld, const struct esmd_cfg_node *n)
{
    if (n->bad)
        return NULL;
    if (n->kind != NODE_SCALAR || is_null(n)) {
        ld_err(ld, n, "%s must be a string, got %s", node_name(ld, n), show(ld, n));
        return NULL;
    }
    return n->value;
}

static bool expect_map(struct esmd_cfg_loader *ld, const struct esmd_cfg_node *n)
{
    if (n->bad)
        return false;
    if (n->kind == NODE_MAP)
        return true;
    const char *name = node_name(ld, n);
    ld_err(ld, n, "%s must be a mapping, got %s", *name ? name : "the configuration", show(ld, n));
    return false;
}

static bool expect_list(struct esmd_cfg_loader *ld, const struct esmd_cfg_node *n)
{
    if (n->bad)
        return false;
    if (n->kind == NODE_LIST)
        return true;
    ld_err(ld, n, "%s must be a list, got %s", node_name(ld, n), show(ld, n));
    return false;
}

/* An integer in min..max, or -1 too with minus_one. Plain scalars only: "10" is a string. */
static bool read_int(struct esmd_cfg_loader *ld, const struct esmd_cfg_node *n, int64_t min,
                     int64_t max, bool minus_one, int64_t *out)
{
    if (n->bad)
        return false;
    int64_t v;
    if (n->kind == NODE_SCALAR && !n->quoted && parse_i64(n->value, &v) &&
        ((minus_one && v == -1) || (v >= min && v <= max))) {
        *out = v;
        return true;
    }
    ld_err(ld, n, "%s must be %san integer from %lld to %lld, got %s", node_name(ld, n),
           minus_one ? "-1 or " : "", (long long)min, (long long)max, show(ld, n));
    return false;
}

static bool read_bool(struct esmd_cfg_loader *ld, const struct esmd_cfg_node *n, bool *out)
{
    if (n->bad)
        return false;
    if (n->kind == NODE_SCALAR && !n->quoted &&
        (!strcmp(n->value, "true") || !strcmp(n->value, "false"))) {
        *out = n->value[0] == 't';
        return true;
    }
    ld_err(ld, n, "%s must be true or false, got %s", node_name(ld, n), show(ld, n));
    return false;
}

/* A duration in min..max milliseconds, or -1 too with minus_one. */
static bool read_duration(struct esmd_cfg_loader *ld, const struct esmd_cfg_node *n, int64_t min,
                          int64_t max, bool minus_one, int64_t *out)
{
    if (n->bad)
        return false;
    int64_t v;
    if (n->kind == NODE_SCALAR && !is_null(n)) {
        if (minus_one && !n->quoted && !strcmp(n->value, "-1")) {
            *out = -1;
            return true;
        }
        if (esmd_parse_duration_ms(n->value, &v) == 0 && v >= min && v <= max) {
            *out = v;
            return true;
        }
        if (!n->quoted && parse_i64(n->value, &v) && v >= 0) {
            ld_err(ld, n, "%s needs a unit: ms, s, m or h, got %s", node_name(ld, n), show(ld, n));
            return false;
        }
    }
    char lo[32], hi[32];
    ld_err(ld, n, "%s must be %sa duration from %s to %s, got %s", node_name(ld, n),
           minus_one ? "-1 or " : "", esmd_config_fmt_duration(min, lo),
           esmd_config_fmt_duration(max, hi), show(ld, n));
    return false;
}

static bool read_enum(struct esmd_cfg_loader *ld, const struct esmd_cfg_node *n,
                      const char *const *names, int *out)
{
    if (n->bad)
        return false;
    if (n->kind == NODE_SCALAR && !is_null(n))
        for (int i = 0; names[i]; i++)
            if (!strcmp(n->value, names[i])) {
                *out = i;
                return true;
            }
    struct esmd_buf b = ESMD_BUF_INIT;
    for (int i = 0; names[i]; i++)
        esmd_buf_printf(&b, "%s%s", i ? ", " : "", names[i]);
    ld_err(ld, n, "%s must be one of %s, got %s", node_name(ld, n), esmd_buf_cstr(&b), show(ld, n));
    esmd_buf_free(&b);
    return false;
}

/* ---- key tables ---- */

struct cfg_table {
    const struct esmd_cfg_key *keys;
    size_t n;
};

#define TABLE(k) ((struct cfg_table){k, ESMD_ARRAY_LEN(k)})

/* A table that ends with a {0} entry (a connector's). */
static struct cfg_table table_of(const struct esmd_cfg_key *keys)
{
    size_t n = 0;
    while (keys[n].name)
        n++;
    return (struct cfg_table){keys, n};
}

static void defer_dest(struct esmd_cfg_loader *ld, const struct esmd_cfg_node *n, char **uri)
{
    if (ld->ndests == ld->capdests) {
        ld->capdests = ld->capdests ? ld->capdests * 2 : 8;
        ld->dests = esmd_xrealloc(ld->dests, ld->capdests * sizeof(*ld->dests));
    }
    ld->dests[ld->ndests++] = (struct pending_dest){n, uri};
}

enum kv_kind { KV_PROPERTIES, KV_HEADERS };

static bool read_kvlist(struct esmd_cfg_loader *ld, const struct esmd_cfg_node *n,
                        struct esmd_kvlist *list, enum kv_kind kind,
                        int (*check)(const char *key, const char *value, char *err, size_t errlen));
static bool read_names(struct esmd_cfg_loader *ld, const struct esmd_cfg_key *k,
                       const struct esmd_cfg_node *n, void *obj);
static bool read_unix_time(struct esmd_cfg_loader *ld, const struct esmd_cfg_node *n, int64_t *out);
static bool read_connection(struct esmd_cfg_loader *ld, const struct esmd_cfg_key *k,
                            const struct esmd_cfg_node *n, void *obj);
static bool read_section(struct esmd_cfg_loader *ld, const struct esmd_cfg_node *n,
                         struct cfg_table t, void *obj);

/* A string key: its checks, then the copy into *field. */
static bool read_str(struct esmd_cfg_loader *ld, const struct esmd_cfg_key *k,
                     const struct esmd_cfg_node *n, char **field)
{
    const char *s = read_text(ld, n);
    if (!s)
        return false;
    if ((k->flags & ESMD_CFG_NONEMPTY) && !*s) {
        ld_err(ld, n, "%s must not be empty", node_name(ld, n));
        return false;
    }
    if (k->check && !k->check(s)) {
        ld_err(ld, n, "%s must be %s, got %s", node_name(ld, n), k->what, show(ld, n));
        return false;
    }
    char why[256];
    if (k->parse && k->parse(s, why, sizeof(why)) != 0) {
        /* The value is not shown: the parser's message names the problem, and a URL may hold a
         * password. */
        ld_err(ld, n, "%s is not %s: %s", node_name(ld, n), k->what, why);
        return false;
    }
    free(*field);
    *field = esmd_xstrdup(s);
    if (k->type == ESMD_CFG_DEST)
        defer_dest(ld, n, field);
    return true;
}

/* Reads n as key k into obj; false after an error (n is then marked bad). */
static bool read_key(struct esmd_cfg_loader *ld, const struct esmd_cfg_key *k,
                     const struct esmd_cfg_node *n, void *obj)
{
    char *field = (char *)obj + k->offset;
    int64_t v;
    bool ok = false;
    switch (k->type) {
    case ESMD_CFG_STR:
    case ESMD_CFG_DEST:
        ok = read_str(ld, k, n, (char **)(void *)field);
        break;
    case ESMD_CFG_INT:
        if ((ok = read_int(ld, n, k->min, k->max, k->flags & ESMD_CFG_MINUS_ONE, &v)))
            *(int *)(void *)field = (int)v;
        break;
    case ESMD_CFG_BOOL:
        ok = read_bool(ld, n, (bool *)(void *)field);
        break;
    case ESMD_CFG_DURATION:
        if ((ok = read_duration(ld, n, k->min, k->max, k->flags & ESMD_CFG_MINUS_ONE, &v)))
            *(int64_t *)(void *)field = v;
        break;
    case ESMD_CFG_ENUM:
        ok = read_enum(ld, n, k->names, (int *)(void *)field);
        break;
    case ESMD_CFG_CONNECTION:
        ok = read_connection(ld, k, n, obj);
        break;
    case ESMD_CFG_NAMES:
        ok = read_names(ld, k, n, obj);
        break;
    case ESMD_CFG_UNIX_TIME:
        ok = read_unix_time(ld, n, (int64_t *)(void *)field);
        break;
    case ESMD_CFG_PROPERTIES:
        ok = read_kvlist(ld, n, (struct esmd_kvlist *)(void *)field, KV_PROPERTIES, k->check_kv);
        break;
    case ESMD_CFG_CUSTOM:
        ok = k->read(ld, n, obj);
        break;
    case ESMD_CFG_SECTION:
        ok = read_section(ld, n, table_of(k->sub), obj);
        *(bool *)(void *)field = ok;
        break;
    }
    if (!ok) /* the nodes are the loader's: readers get them const so they do not change them */
        ((struct esmd_cfg_node *)(uintptr_t)n)->bad = true;
    return ok;
}

static long table_find(struct cfg_table t, const char *name)
{
    for (size_t i = 0; i < t.n; i++)
        if (same_key(t.keys[i].name, name))
            return (long)i;
    return -1;
}

static bool in_list(const char *const *list, const char *s)
{
    for (; list && *list; list++)
        if (same_key(*list, s))
            return true;
    return false;
}

#define MAX_TABLE 32 /* keys in one table */

static void set_default(const struct esmd_cfg_key *k, void *obj)
{
    char *field = (char *)obj + k->offset;
    if (!k->def)
        return;
    if (k->type == ESMD_CFG_DURATION)
        *(int64_t *)(void *)field = k->def;
    else if (k->type == ESMD_CFG_INT || k->type == ESMD_CFG_ENUM)
        *(int *)(void *)field = (int)k->def;
}

/* Reads mapping n through table t into obj: unknown keys (except those in skip) are errors,
 * known ones are read in table order, missing required ones reported at n. Returns false when n
 * is not a mapping. Each of n's keys is compared with the table's once: linear in n's size. */
static bool read_section_skip(struct esmd_cfg_loader *ld, const struct esmd_cfg_node *n,
                              struct cfg_table t, void *obj, const char *const *skip)
{
    if (!expect_map(ld, n))
        return false;
    const struct esmd_cfg_node *vals[MAX_TABLE] = {0};
    assert(t.n <= MAX_TABLE);
    for (size_t i = 0; i < t.n; i++)
        set_default(&t.keys[i], obj);
    for (size_t i = 0; i < n->npairs; i++) {
        const struct node_pair *p = &n->pairs[i];
        long k = table_find(t, p->key);
        if (k >= 0) {
            vals[k] = p->val;
            continue;
        }
        if (in_list(skip, p->key))
            continue;
        struct esmd_buf b = ESMD_BUF_INIT;
        for (size_t j = 0; j < t.n; j++)
            esmd_buf_printf(&b, "%s%s", j ? ", " : "", t.keys[j].name);
        ld_err_at(ld, p->line, p->col, node_path(ld, p->val), "unknown key \"%s\" (allowed: %s)",
                  show_text(ld, p->key, false), esmd_buf_cstr(&b));
        esmd_buf_free(&b);
    }
    for (size_t i = 0; i < t.n; i++) {
        const struct esmd_cfg_key *k = &t.keys[i];
        if (vals[i])
            read_key(ld, k, vals[i], obj);
        else if (k->flags & ESMD_CFG_REQUIRED)
            ld_err(ld, n, "missing required key \"%s\"", k->name);
    }
    return true;
}

static bool read_section(struct esmd_cfg_loader *ld, const struct esmd_cfg_node *n,
                         struct cfg_table t, void *obj)
{
    return read_section_skip(ld, n, t, obj, NULL);
}

/* "(defined: a, b)" or "(none is defined)" for the names in a config array. */
static char *defined_names(const void *arr, size_t n, size_t size, size_t name_offset)
{
    struct esmd_buf b = ESMD_BUF_INIT;
    esmd_buf_puts(&b, n ? "(defined: " : "(none is defined)");
    for (size_t i = 0; i < n && i < SHOW_NAMES; i++) {
        const char *name =
            *(char *const *)(const void *)((const char *)arr + i * size + name_offset);
        esmd_buf_printf(&b, "%s%s", i ? ", " : "", name ? name : "");
    }
    if (n > SHOW_NAMES)
        esmd_buf_printf(&b, " and %zu more", n - SHOW_NAMES);
    if (n)
        esmd_buf_putc(&b, ')');
    return esmd_buf_steal(&b, NULL);
}

/* The connector whose connections are of this type. */
static const struct esmd_connector_ops *conn_connector(enum esmd_conn_type type)
{
    const struct esmd_connector_ops *ops;
    for (size_t i = 0; (ops = esmd_connector_at(i)); i++)
        if (ops->conn_keys && (int)ops->source == (int)type)
            return ops;
    return NULL;
}

static const char *conn_type_name(enum esmd_conn_type type)
{
    const struct esmd_connector_ops *ops = conn_connector(type);
    return ops ? ops->kind : "?";
}

static const struct esmd_conn_cfg *resolve_conn(struct esmd_cfg_loader *ld,
                                                const struct esmd_cfg_node *n, const char *name,
                                                enum esmd_conn_type type, const char *what)
{
    const struct esmd_config *cfg = ld->cfg;
    const struct node_pair *p = map_find(ld->connections, name);
    const struct esmd_conn_cfg *conn = p ? &cfg->connections[p - ld->connections->pairs] : NULL;
    if (!conn) {
        char *names = defined_names(cfg->connections, cfg->nconnections, sizeof(*conn),
                                    offsetof(struct esmd_conn_cfg, name));
        ld_err(ld, n, "connection \"%s\" is not defined in connections %s",
               show_text(ld, name, false), names);
        free(names);
        return NULL;
    }
    if (conn->type != type) {
        ld_err(ld, n, "connection \"%s\" is of type %s, a %s %s needs a %s connection", conn->name,
               conn_type_name(conn->type), conn_type_name(type), what, conn_type_name(type));
        return NULL;
    }
    return conn;
}

static const struct esmd_function_cfg *
resolve_function(struct esmd_cfg_loader *ld, const struct esmd_cfg_node *n, const char *name)
{
    const struct esmd_config *cfg = ld->cfg;
    const struct node_pair *p = map_find(ld->functions, name);
    const struct esmd_function_cfg *fn = p ? &cfg->functions[p - ld->functions->pairs] : NULL;
    if (!fn) {
        char *names = defined_names(cfg->functions, cfg->nfunctions, sizeof(*fn),
                                    offsetof(struct esmd_function_cfg, name));
        ld_err(ld, n, "function \"%s\" is not defined in functions %s", show_text(ld, name, false),
               names);
        free(names);
    }
    return fn;
}

/* ---- sections ---- */

/* A mapping of name → scalar into list; scalars of any type are kept as written. */
/* check (NULL: none) judges each pair; its message is the error. */
static bool read_kvlist(struct esmd_cfg_loader *ld, const struct esmd_cfg_node *n,
                        struct esmd_kvlist *list, enum kv_kind kind,
                        int (*check)(const char *key, const char *value, char *err, size_t errlen))
{
    if (!expect_map(ld, n))
        return false;
    list->items = esmd_xcalloc(n->npairs, sizeof(*list->items));
    for (size_t i = 0; i < n->npairs; i++) {
        const struct node_pair *p = &n->pairs[i];
        if (kind == KV_HEADERS && !valid_header_name(p->key)) {
            ld_err_at(ld, p->line, p->col, node_path(ld, p->val),
                      "\"%s\" is not a valid HTTP header name (letters, digits and "
                      "!#$%%&'*+-.^_`|~)",
                      show_text(ld, p->key, false));
            continue;
        }
        if (kind == KV_PROPERTIES && !*p->key) {
            ld_err_at(ld, p->line, p->col, node_path(ld, p->val),
                      "a property name must not be empty");
            continue;
        }
        const char *s = read_text(ld, p->val);
        if (!s)
            continue;
        if (kind == KV_HEADERS && strpbrk(s, "\r\n")) {
            ld_err(ld, p->val, "%s must not contain line breaks", node_name(ld, p->val));
            continue;
        }
        char why[256];
        if (check && check(p->key, s, why, sizeof(why)) != 0) {
            ld_err(ld, p->val, "%s", why);
            continue;
        }
        list->items[list->n].key = esmd_xstrdup(p->key);
        list->items[list->n].value = esmd_xstrdup(s);
        list->n++;
    }
    return true;
}

/* aws */

/* An AWS region name: two letters, one or more "-word" parts, a "-" and a number
 * ("us-east-1", "eu-central-2", "us-gov-west-1", "ap-southeast-10"). */
static bool valid_region(const char *s)
{
    size_t i = 0, words = 0;
    if (!islower((unsigned char)s[0]) || !islower((unsigned char)s[1]) || s[2] != '-')
        return false;
    i = 3;
    for (;;) {
        size_t start = i;
        while (islower((unsigned char)s[i]))
            i++;
        if (i == start || s[i] != '-')
            break;
        words++;
        i++;
    }
    if (!words || !isdigit((unsigned char)s[i]))
        return false;
    while (isdigit((unsigned char)s[i]))
        i++;
    return s[i] == '\0' && i <= 32;
}

static bool valid_account_id(const char *s)
{
    size_t i = 0;
    while (isdigit((unsigned char)s[i]))
        i++;
    return i == 12 && s[i] == '\0';
}

static bool read_aws(struct esmd_cfg_loader *ld, const struct esmd_cfg_node *n, void *obj)
{
    static const struct esmd_cfg_key keys[] = {
        ESMD_K_CHECK("region", struct esmd_aws_cfg, region, 0, valid_region,
                     "an AWS region name such as us-east-1"),
        ESMD_K_CHECK("account_id", struct esmd_aws_cfg, account_id, 0, valid_account_id,
                     "an AWS account id of 12 digits such as 000000000000"),
    };
    struct esmd_config *cfg = obj;
    return read_section(ld, n, TABLE(keys), &cfg->aws);
}

/* async_queue */

/* Every key has a default (workers: true, set with the others in esmd_config_parse_flags). */
static const struct esmd_cfg_key async_queue_keys[] = {
    ESMD_K_DUR("retry_base", struct esmd_async_queue_cfg, retry_base_ms, 1, MS_HOUR, 0, MS_MIN),
    ESMD_K_DUR("backoff_base", struct esmd_async_queue_cfg, backoff_base_ms, 1, MS_HOUR, 0, MS_SEC),
    ESMD_K_DUR("backoff_cap", struct esmd_async_queue_cfg, backoff_cap_ms, 1, MS_HOUR, 0,
               5 * MS_MIN),
    ESMD_K_DUR("poll_interval", struct esmd_async_queue_cfg, poll_ms, 10, MS_MIN, 0, MS_SEC),
    ESMD_K_DUR("lease", struct esmd_async_queue_cfg, lease_ms, MS_SEC, MS_HOUR, ESMD_CFG_MINUS_ONE,
               -1),
    ESMD_K_INT("max_payload", struct esmd_async_queue_cfg, max_payload, 1, ESMD_MAX_PAYLOAD, 0,
               1024 * 1024),
    ESMD_K_BOOL("workers", struct esmd_async_queue_cfg, workers),
    ESMD_K_INT("insert_connections", struct esmd_async_queue_cfg, insert_connections, 1, 8, 0, 2),
};

static bool read_async_queue(struct esmd_cfg_loader *ld, const struct esmd_cfg_node *n, void *obj)
{
    struct esmd_config *cfg = obj;
    return read_section(ld, n, TABLE(async_queue_keys), &cfg->async_queue);
}

/* admin */

static bool read_aws_credentials(struct esmd_cfg_loader *ld, const struct esmd_cfg_node *n,
                                 void *obj)
{
    static const struct esmd_cfg_key keys[] = {
        ESMD_K_STR("access_key_id", struct esmd_admin_cfg, access_key_id,
                   ESMD_CFG_REQUIRED | ESMD_CFG_NONEMPTY),
        ESMD_K_STR("secret_access_key", struct esmd_admin_cfg, secret_access_key,
                   ESMD_CFG_REQUIRED | ESMD_CFG_NONEMPTY),
    };
    return read_section(ld, n, TABLE(keys), obj);
}

static bool read_admin(struct esmd_cfg_loader *ld, const struct esmd_cfg_node *n, void *obj)
{
    static const struct esmd_cfg_key keys[] = {
        ESMD_K_CHECK("listen", struct esmd_admin_cfg, listen, 0, valid_listen,
                     "host:port (e.g. 127.0.0.1:9000)"),
        ESMD_K_STR("token", struct esmd_admin_cfg, token, ESMD_CFG_NONEMPTY),
        ESMD_K_CUSTOM("aws_credentials", read_aws_credentials, 0),
        ESMD_K_INT("max_connections_per_client", struct esmd_admin_cfg, max_connections_per_client,
                   1, 100000, 0, 0), /* 0: the listener's default */
    };
    struct esmd_config *cfg = obj;
    return read_section(ld, n, TABLE(keys), &cfg->admin);
}

/* connections */

/* The connector kinds that have connections, or that are source kinds: "kafka, redis" and, with
 * `or`, "kafka, redis or pgqueue". */
static void put_kinds(struct esmd_buf *b, bool connections, const char *last_sep)
{
    const struct esmd_connector_ops *ops;
    size_t count = 0, total = 0;
    for (size_t i = 0; (ops = esmd_connector_at(i)); i++)
        total += !connections || ops->conn_keys;
    for (size_t i = 0; (ops = esmd_connector_at(i)); i++) {
        if (connections && !ops->conn_keys)
            continue;
        if (count)
            esmd_buf_puts(b, count + 1 == total ? last_sep : ", ");
        esmd_buf_puts(b, ops->kind);
        count++;
    }
}

/* A connection: `type` names the connector, whose conn_keys are the other keys. While the type
 * is missing or wrong, every key of every type is allowed and none but type is required. */
static void read_connection_entry(struct esmd_cfg_loader *ld, const struct esmd_cfg_node *n,
                                  struct esmd_conn_cfg *conn)
{
    const struct esmd_connector_ops *ops, *type_ops = NULL;
    const char *kinds[8];
    size_t nkinds = 0;
    for (size_t i = 0; (ops = esmd_connector_at(i)); i++) {
        if (!ops->conn_keys)
            continue;
        assert(nkinds + 1 < ESMD_ARRAY_LEN(kinds));
        kinds[nkinds++] = ops->kind;
    }
    kinds[nkinds] = NULL;

    struct esmd_cfg_key keys[MAX_TABLE];
    size_t nkeys = 0;
    keys[nkeys++] = (struct esmd_cfg_key){.name = "type",
                                          .type = ESMD_CFG_ENUM,
                                          .flags = ESMD_CFG_REQUIRED,
                                          .offset = offsetof(struct esmd_conn_cfg, type),
                                          .names = kinds};
    const struct esmd_cfg_node *type = map_get(n, "type");
    for (size_t i = 0; type && type->kind == NODE_SCALAR && (ops = esmd_connector_at(i)); i++)
        if (ops->conn_keys && !strcmp(type->value, ops->kind))
            type_ops = ops;
    for (size_t i = 0; (ops = esmd_connector_at(i)); i++) {
        if (!ops->conn_keys || (type_ops && ops != type_ops))
            continue;
        for (size_t j = 0; ops->conn_keys[j].name; j++) {
            assert(nkeys < MAX_TABLE);
            keys[nkeys] = ops->conn_keys[j];
            if (!type_ops)
                keys[nkeys].flags &= ~ESMD_CFG_REQUIRED;
            nkeys++;
        }
    }
    read_section(ld, n, (struct cfg_table){keys, nkeys}, conn);
    if (type_ops) /* type was read as an index into kinds: make it the connector's kind */
        conn->type = (enum esmd_conn_type)type_ops->source;
}

static bool read_connections(struct esmd_cfg_loader *ld, const struct esmd_cfg_node *n, void *obj)
{
    struct esmd_config *cfg = obj;
    if (!expect_map(ld, n))
        return false;
    cfg->connections = esmd_xcalloc(n->npairs, sizeof(*cfg->connections));
    cfg->nconnections = n->npairs;
    ld->connections = n;
    for (size_t i = 0; i < n->npairs; i++) {
        const struct node_pair *p = &n->pairs[i];
        struct esmd_conn_cfg *conn = &cfg->connections[i];
        conn->name = esmd_xstrdup(p->key);
        if (!esmd_config_valid_name(p->key))
            ld_err_at(ld, p->line, p->col, node_path(ld, p->val),
                      "a connection name must be " ESMD_CFG_NAME_RULE ", got \"%s\"",
                      show_text(ld, p->key, false));
        read_connection_entry(ld, p->val, conn);
    }
    return true;
}

/* functions */

static bool read_headers(struct esmd_cfg_loader *ld, const struct esmd_cfg_node *n, void *obj)
{
    struct esmd_function_cfg *fn = obj;
    return read_kvlist(ld, n, &fn->headers, KV_HEADERS, NULL);
}

static bool read_async(struct esmd_cfg_loader *ld, const struct esmd_cfg_node *n, void *obj)
{
    static const struct esmd_cfg_key keys[] = {
        ESMD_K_INT("maximum_retry_attempts", struct esmd_async_cfg, maximum_retry_attempts, 0, 2, 0,
                   0),
        ESMD_K_DUR("maximum_event_age", struct esmd_async_cfg, maximum_event_age_ms, 60 * MS_SEC,
                   6 * MS_HOUR, 0, 0),
        ESMD_K_DEST("on_success", struct esmd_async_cfg, on_success),
        ESMD_K_DEST("on_failure", struct esmd_async_cfg, on_failure),
        ESMD_K_DEST("dead_letter", struct esmd_async_cfg, dead_letter),
    };
    struct esmd_function_cfg *fn = obj;
    fn->async.set = read_section(ld, n, TABLE(keys), &fn->async);
    return fn->async.set;
}

static const struct esmd_cfg_key function_keys[] = {
    ESMD_K_CHECK("url", struct esmd_function_cfg, url, ESMD_CFG_REQUIRED, valid_http_url,
                 "an http:// or https:// URL"),
    ESMD_K_DUR("timeout", struct esmd_function_cfg, timeout_ms, 1 * MS_SEC, 15 * MS_MIN, 0, 0),
    ESMD_K_INT("max_concurrency", struct esmd_function_cfg, max_concurrency, 1, 10000, 0, 0),
    ESMD_K_CUSTOM("headers", read_headers, 0),
    ESMD_K_CUSTOM("async", read_async, 0),
};

static bool read_functions(struct esmd_cfg_loader *ld, const struct esmd_cfg_node *n, void *obj)
{
    struct esmd_config *cfg = obj;
    if (!expect_map(ld, n))
        return false;
    cfg->functions = esmd_xcalloc(n->npairs, sizeof(*cfg->functions));
    cfg->nfunctions = n->npairs;
    ld->functions = n;
    for (size_t i = 0; i < n->npairs; i++) {
        const struct node_pair *p = &n->pairs[i];
        struct esmd_function_cfg *fn = &cfg->functions[i];
        fn->name = esmd_xstrdup(p->key);
        fn->timeout_ms = 30 * MS_SEC;
        fn->max_concurrency = 10;
        fn->async.maximum_retry_attempts = 2;
        fn->async.maximum_event_age_ms = 6 * MS_HOUR;
        if (!valid_function_name(p->key))
            ld_err_at(ld, p->line, p->col, node_path(ld, p->val),
                      "a function name must be " FUNCTION_NAME_RULE ", got \"%s\"",
                      show_text(ld, p->key, false));
        read_section(ld, p->val, TABLE(function_keys), fn);
    }
    return true;
}

/* mappings: sources, read through their connector's key table */

/* A connection name, resolved to a connection of the source's kind. */
static bool read_connection(struct esmd_cfg_loader *ld, const struct esmd_cfg_key *k,
                            const struct esmd_cfg_node *n, void *obj)
{
    const char *s = read_text(ld, n);
    if (!s)
        return false;
    char **name = (char **)(void *)((char *)obj + k->offset);
    const struct esmd_conn_cfg **conn =
        (const struct esmd_conn_cfg **)(void *)((char *)obj + k->aux);
    free(*name);
    *name = esmd_xstrdup(s);
    *conn = resolve_conn(ld, n, s, (enum esmd_conn_type)ld->source_ops->source, "source");
    return *conn != NULL;
}

static const char *string_at(const void *arr, size_t i)
{
    return ((char *const *)arr)[i];
}

/* Appends name n to (*names)[*count]; seen indexes the names read so far. */
static bool read_name(struct esmd_cfg_loader *ld, const struct esmd_cfg_key *k,
                      const struct esmd_cfg_node *n, char **names, size_t *count,
                      struct strindex *seen)
{
    const char *s = read_text(ld, n);
    if (!s)
        return false;
    if (k->check && !k->check(s)) {
        ld_err(ld, n, "%s must be %s, got %s", node_name(ld, n), k->what, show(ld, n));
        return false;
    }
    if (strindex_find(seen, s, string_at, names) >= 0) {
        ld_err(ld, n, "%s \"%s\" is listed twice", k->item, s);
        return false;
    }
    names[(*count)++] = esmd_xstrdup(s);
    strindex_add(seen, *count - 1, string_at, names);
    return true;
}

static bool read_names(struct esmd_cfg_loader *ld, const struct esmd_cfg_key *k,
                       const struct esmd_cfg_node *n, void *obj)
{
    char ***names = (char ***)(void *)((char *)obj + k->offset);
    size_t *count = (size_t *)(void *)((char *)obj + k->aux);
    if (n->bad)
        return false;
    struct strindex seen = {0};
    bool ok = true;
    if (n->kind == NODE_SCALAR && !is_null(n)) {
        *names = esmd_xcalloc(1, sizeof(**names));
        ok = read_name(ld, k, n, *names, count, &seen);
    } else if (n->kind != NODE_LIST || n->nitems == 0) {
        ld_err(ld, n, "%s must be a %s name or a non-empty list of %s names, got %s",
               node_name(ld, n), k->item, k->item,
               n->kind == NODE_LIST ? "an empty list" : show(ld, n));
        ok = false;
    } else {
        *names = esmd_xcalloc(n->nitems, sizeof(**names));
        for (size_t i = 0; i < n->nitems; i++)
            ok &= read_name(ld, k, n->items[i], *names, count, &seen);
    }
    strindex_free(&seen);
    return ok;
}

static bool read_unix_time(struct esmd_cfg_loader *ld, const struct esmd_cfg_node *n, int64_t *out)
{
    if (n->bad)
        return false;
    int64_t v;
    if (n->kind != NODE_SCALAR || n->quoted || !parse_i64(n->value, &v) || v < 0 ||
        v > INT64_MAX / 1000) {
        ld_err(ld, n, "%s must be a Unix time in seconds, got %s", node_name(ld, n), show(ld, n));
        return false;
    }
    if (v > esmd_now_ms() / 1000) {
        ld_err(ld, n, "%s must not be in the future, got %s", node_name(ld, n), show(ld, n));
        return false;
    }
    *out = v * 1000;
    return true;
}

/* The kinds (source keys) besides the one read: skipped, as they are reported already. */
static const char *const *source_kind_keys(void)
{
    static const char *keys[8];
    if (!keys[0]) {
        const struct esmd_connector_ops *ops;
        for (size_t i = 0; (ops = esmd_connector_at(i)); i++) {
            assert(i + 1 < ESMD_ARRAY_LEN(keys));
            keys[i] = ops->kind;
        }
    }
    return keys;
}

static bool read_source(struct esmd_cfg_loader *ld, const struct esmd_cfg_node *n, void *obj)
{
    struct esmd_mapping_cfg *map = obj;
    if (!expect_map(ld, n))
        return false;
    const struct esmd_connector_ops *kind = NULL;
    for (size_t i = 0; i < n->npairs; i++) {
        const struct node_pair *p = &n->pairs[i];
        const struct esmd_connector_ops *ops = esmd_connector_find(p->key);
        if (!ops)
            continue;
        if (!kind) {
            kind = ops;
            continue;
        }
        struct esmd_buf b = ESMD_BUF_INIT;
        put_kinds(&b, false, " or ");
        ld_err_at(ld, p->line, p->col, node_path(ld, p->val),
                  "a source has only one of %s (found %s and %s)", esmd_buf_cstr(&b), kind->kind,
                  ops->kind);
        esmd_buf_free(&b);
    }
    if (!kind) {
        struct esmd_buf b = ESMD_BUF_INIT;
        put_kinds(&b, false, " or ");
        ld_err(ld, n, "source needs one of the keys %s (the source kind)", esmd_buf_cstr(&b));
        esmd_buf_free(&b);
        return false;
    }
    map->kind = kind->source;
    ld->source_ops = kind;
    read_section_skip(ld, n, table_of(kind->source_keys), map, source_kind_keys());
    return true;
}

/* The connector's checks, once the mapping is read. */

struct esmd_cfg_check {
    struct esmd_cfg_loader *ld;
    const struct esmd_cfg_node *mapping, *source;
};

/* The node key names (see esmd_cfg_check in config.h) and the section that holds it. */
static const struct esmd_cfg_node *check_node(const struct esmd_cfg_check *chk, const char *key,
                                              const struct esmd_cfg_node **section)
{
    *section = chk->mapping;
    if (!key)
        return chk->mapping;
    if (!strcmp(key, "source"))
        return chk->source;
    if (!strncmp(key, "source.", 7)) {
        *section = chk->source;
        return map_get(chk->source, key + 7);
    }
    return map_get(chk->mapping, key);
}

enum esmd_cfg_state esmd_cfg_state(const struct esmd_cfg_check *chk, const char *key)
{
    const struct esmd_cfg_node *section;
    const struct esmd_cfg_node *n = check_node(chk, key, &section);
    return !n ? ESMD_CFG_ABSENT : n->bad ? ESMD_CFG_BAD : ESMD_CFG_SET;
}

void esmd_cfg_error(struct esmd_cfg_check *chk, const char *key, const char *fmt, ...)
{
    const struct esmd_cfg_node *section;
    const struct esmd_cfg_node *n = check_node(chk, key, &section);
    if (!n)
        n = section;
    va_list ap;
    va_start(ap, fmt);
    errs_addv(chk->ld->errs, chk->ld->file, n->line, n->col, node_path(chk->ld, n), fmt, ap);
    va_end(ap);
}

/* mappings */

static const char *mapping_name_at(const void *arr, size_t i)
{
    return ((const struct esmd_mapping_cfg *)arr)[i].name;
}

static bool read_mapping_name(struct esmd_cfg_loader *ld, const struct esmd_cfg_node *n, void *obj)
{
    struct esmd_mapping_cfg *map = obj;
    const char *s = read_text(ld, n);
    if (!s)
        return false;
    if (!esmd_config_valid_name(s)) {
        ld_err(ld, n, "name must be " ESMD_CFG_NAME_RULE ", got %s", show(ld, n));
        return false;
    }
    long other = strindex_find(&ld->mapping_names, s, mapping_name_at, ld->cfg->mappings);
    if (other >= 0) {
        ld_err(ld, n, "mapping name \"%s\" is already used by mappings[%ld]", s, other);
        return false;
    }
    map->name = esmd_xstrdup(s);
    strindex_add(&ld->mapping_names, (size_t)(map - ld->cfg->mappings), mapping_name_at,
                 ld->cfg->mappings);
    return true;
}

static bool read_mapping_function(struct esmd_cfg_loader *ld, const struct esmd_cfg_node *n,
                                  void *obj)
{
    struct esmd_mapping_cfg *map = obj;
    const char *s = read_text(ld, n);
    if (!s)
        return false;
    map->function = esmd_xstrdup(s);
    map->fn = resolve_function(ld, n, s);
    return map->fn != NULL;
}

/* A filter pattern as JSON: plain scalars written as JSON numbers stay numbers exactly as
 * written, true/false and null become JSON literals, everything else is a string. */
static cJSON *node_to_json(const struct esmd_cfg_node *n)
{
    cJSON *j = NULL;
    switch (n->kind) {
    case NODE_MAP:
        j = cJSON_CreateObject();
        for (size_t i = 0; j && i < n->npairs; i++)
            cJSON_AddItemToObject(j, n->pairs[i].key, node_to_json(n->pairs[i].val));
        return j;
    case NODE_LIST:
        j = cJSON_CreateArray();
        for (size_t i = 0; j && i < n->nitems; i++)
            cJSON_AddItemToArray(j, node_to_json(n->items[i]));
        return j;
    case NODE_SCALAR:
        break;
    }
    const char *v = n->value;
    if (n->quoted)
        return cJSON_CreateString(v);
    if (is_null(n))
        return cJSON_CreateNull();
    if (!strcmp(v, "true") || !strcmp(v, "True") || !strcmp(v, "TRUE"))
        return cJSON_CreateTrue();
    if (!strcmp(v, "false") || !strcmp(v, "False") || !strcmp(v, "FALSE"))
        return cJSON_CreateFalse();
    if (is_json_number(v))
        return cJSON_CreateRaw(v);
    return cJSON_CreateString(v);
}

static bool read_filters(struct esmd_cfg_loader *ld, const struct esmd_cfg_node *n, void *obj)
{
    struct esmd_mapping_cfg *map = obj;
    if (!expect_list(ld, n))
        return false;
    map->filters = esmd_xcalloc(n->nitems, sizeof(*map->filters));
    size_t budget = ESMD_FILTER_MAX_MAPPING_BYTES; /* compiled size left for the mapping */
    for (size_t i = 0; i < n->nitems; i++) {
        const struct esmd_cfg_node *item = n->items[i];
        if (item->bad)
            continue;
        if (item->kind != NODE_MAP) {
            ld_err(ld, item, "%s must be a mapping (a filter pattern), got %s", node_name(ld, item),
                   show(ld, item));
            continue;
        }
        cJSON *j = node_to_json(item);
        char *text = j ? cJSON_PrintUnformatted(j) : NULL;
        cJSON_Delete(j);
        if (!text) {
            ld_err(ld, item, "out of memory converting the pattern to JSON");
            continue;
        }
        struct esmd_filter_error ferr;
        size_t tlen = strlen(text);
        if (esmd_filter_check_budget(text, tlen, &budget, &ferr) != 0) {
            ld_err(ld, item, "%s is not a valid filter pattern: %s (at character %zu of %.200s%s)",
                   node_name(ld, item), ferr.message, ferr.offset + 1, text,
                   tlen > 200 ? "..." : "");
        } else {
            struct esmd_filter_cfg *f = &map->filters[map->nfilters++];
            f->pattern = esmd_xstrdup(text);
            f->line = item->line;
            f->col = item->col;
        }
        cJSON_free(text);
    }
    return true;
}

/* `logging: { system_log_level: DEBUG | INFO | WARN }` (Lambda's LoggingConfig). */
static bool read_logging(struct esmd_cfg_loader *ld, const struct esmd_cfg_node *n, void *obj)
{
    static const char *const levels[] = {"DEBUG", "INFO", "WARN", NULL};
    struct logging {
        int level;
    } lg = {0};
    static const struct esmd_cfg_key keys[] = {
        ESMD_K_ENUM("system_log_level", struct logging, level, levels, ESMD_CFG_REQUIRED, 0),
    };
    if (!read_section(ld, n, TABLE(keys), &lg))
        return false;
    ((struct esmd_mapping_cfg *)obj)->system_log_level = ESMD_ESM_LOG_DEBUG + lg.level;
    return true;
}

static const struct esmd_cfg_key mapping_keys[] = {
    ESMD_K_CUSTOM("name", read_mapping_name, ESMD_CFG_REQUIRED),
    ESMD_K_CUSTOM("function", read_mapping_function, ESMD_CFG_REQUIRED),
    ESMD_K_BOOL("enabled", struct esmd_mapping_cfg, enabled),
    ESMD_K_CUSTOM("source", read_source, ESMD_CFG_REQUIRED),
    ESMD_K_INT("batch_size", struct esmd_mapping_cfg, batch_size, 1, 10000, 0, 0),
    ESMD_K_DUR("maximum_batching_window", struct esmd_mapping_cfg, maximum_batching_window_ms, 0,
               300 * MS_SEC, 0, 0),
    ESMD_K_CUSTOM("filters", read_filters, 0),
    ESMD_K_INT("max_filters", struct esmd_mapping_cfg, max_filters, 1, MAX_FILTERS_LIMIT, 0, 0),
    ESMD_K_INT("max_filter_pattern_length", struct esmd_mapping_cfg, max_filter_pattern_length, 1,
               MAX_PATTERN_LEN_LIMIT, 0, 0),
    ESMD_K_INT("maximum_retry_attempts", struct esmd_mapping_cfg, maximum_retry_attempts, 0, 10000,
               ESMD_CFG_MINUS_ONE, 0),
    ESMD_K_DUR("maximum_record_age", struct esmd_mapping_cfg, maximum_record_age_ms, 60 * MS_SEC,
               7 * 24 * MS_HOUR, ESMD_CFG_MINUS_ONE, 0),
    ESMD_K_BOOL("bisect_batch_on_function_error", struct esmd_mapping_cfg,
                bisect_batch_on_function_error),
    ESMD_K_BOOL("report_batch_item_failures", struct esmd_mapping_cfg, report_batch_item_failures),
    ESMD_K_DEST("on_failure", struct esmd_mapping_cfg, on_failure),
    ESMD_K_CUSTOM("logging", read_logging, 0),
};

static void read_mapping(struct esmd_cfg_loader *ld, const struct esmd_cfg_node *n,
                         struct esmd_mapping_cfg *map)
{
    map->enabled = true;
    map->batch_size = 0;                  /* unset: the default depends on the source */
    map->maximum_batching_window_ms = -1; /* same */
    map->maximum_retry_attempts = -1;
    map->maximum_record_age_ms = -1;
    ld->source_ops = NULL;
    if (!read_section(ld, n, TABLE(mapping_keys), map))
        return;

    const struct esmd_connector_ops *ops = ld->source_ops;
    if (map->batch_size == 0)
        map->batch_size = ops ? ops->default_batch_size : 100;
    if (map->max_filters == 0)
        map->max_filters = ESMD_FILTER_DEFAULT_MAX_PATTERNS;
    if (map->max_filter_pattern_length == 0)
        map->max_filter_pattern_length = ESMD_FILTER_DEFAULT_MAX_PATTERN_LEN;
    const struct esmd_cfg_node *fl = map_get(n, "filters");
    if (fl && map->nfilters > (size_t)map->max_filters)
        ld_err(ld, fl, "filters may have at most %d patterns (max_filters), got %zu",
               map->max_filters, map->nfilters);
    for (size_t i = 0; fl && i < map->nfilters; i++) {
        size_t len = strlen(map->filters[i].pattern);
        if (len > (size_t)map->max_filter_pattern_length) {
            char key[256];
            snprintf(key, sizeof(key), "%s[%zu]", node_path(ld, fl), i);
            ld_err_at(ld, map->filters[i].line, map->filters[i].col, key,
                      "filters[%zu] is %zu characters long as JSON, more than the limit of %d "
                      "(max_filter_pattern_length)",
                      i, len, map->max_filter_pattern_length);
        }
    }
    if (map->maximum_batching_window_ms < 0)
        map->maximum_batching_window_ms = ops ? ops->default_batching_window_ms : 0;
    if (ops && ops->cfg_check) {
        struct esmd_cfg_check chk = {ld, n, map_get(n, "source")};
        ops->cfg_check(map, &chk);
    }
}

static bool read_mappings(struct esmd_cfg_loader *ld, const struct esmd_cfg_node *n, void *obj)
{
    struct esmd_config *cfg = obj;
    if (!expect_list(ld, n))
        return false;
    cfg->mappings = esmd_xcalloc(n->nitems, sizeof(*cfg->mappings));
    cfg->nmappings = n->nitems;
    for (size_t i = 0; i < n->nitems; i++)
        read_mapping(ld, n->items[i], &cfg->mappings[i]);
    return true;
}

/* the document; table order is reading order: names are defined before they are used */
static const struct esmd_cfg_key top_keys[] = {
    ESMD_K_STR("postgres", struct esmd_config, postgres, ESMD_CFG_REQUIRED | ESMD_CFG_NONEMPTY),
    ESMD_K_CUSTOM("aws", read_aws, 0),
    ESMD_K_CUSTOM("admin", read_admin, 0),
    ESMD_K_CUSTOM("async_queue", read_async_queue, 0),
    ESMD_K_CUSTOM("connections", read_connections, 0),
    ESMD_K_CUSTOM("functions", read_functions, 0),
    ESMD_K_CUSTOM("mappings", read_mappings, 0),
};

/* ---- destinations ---- */

/* Lookups through the loader's indexes, for the destination parser. */
static const struct esmd_conn_cfg *dest_connection(void *ud, const char *name)
{
    struct esmd_cfg_loader *ld = ud;
    const struct node_pair *p = map_find(ld->connections, name);
    return p ? &ld->cfg->connections[p - ld->connections->pairs] : NULL;
}

static const struct esmd_function_cfg *dest_function(void *ud, const char *name)
{
    struct esmd_cfg_loader *ld = ud;
    const struct node_pair *p = map_find(ld->functions, name);
    return p ? &ld->cfg->functions[p - ld->functions->pairs] : NULL;
}

/* The destination module's own parser (src/destination.c), the one the running service uses. */
static bool check_destination(struct esmd_cfg_loader *ld, const struct esmd_cfg_node *n,
                              const char *uri)
{
    char err[600];
    const struct esmd_dests_names names = {ld->cfg, dest_connection, dest_function, ld};
    if (esmd_dests_check_uri(&names, uri, err, sizeof(err)) != 0) {
        ld_err(ld, n, "%s", err);
        return false;
    }
    return true;
}

static void check_destinations(struct esmd_cfg_loader *ld)
{
    for (size_t i = 0; i < ld->ndests; i++) {
        struct pending_dest *d = &ld->dests[i];
        if (!check_destination(ld, d->n, *d->uri)) {
            free(*d->uri);
            *d->uri = NULL;
        }
    }
}

/* ---- features not built yet ----
 * None at the moment: the async block and function:// destinations are built (src/asyncq.c).
 * A feature parsed before it runs gets a refuse_unbuilt() here again, called when
 * !(flags & ESMD_CONFIG_ALLOW_UNBUILT), with its line in a bad fixture and docs/configuration.md
 * "Not available yet". */

/* ---- limits ---- */

/* The sections of the document are within what one file may hold; otherwise reports the first
 * one that is not and nothing else is read. */
static bool within_limits(struct esmd_cfg_loader *ld, const struct esmd_cfg_node *root)
{
    static const struct {
        const char *section;
        size_t max;
        const char *what;
    } limits[] = {
        {"mappings", MAX_MAPPINGS, "mappings"},
        {"functions", MAX_FUNCTIONS, "functions"},
        {"connections", MAX_CONNECTIONS, "connections"},
    };
    for (size_t i = 0; i < ESMD_ARRAY_LEN(limits); i++) {
        const struct esmd_cfg_node *n = map_get(root, limits[i].section);
        size_t count = !n ? 0 : n->kind == NODE_LIST ? n->nitems : n->npairs;
        if (count > limits[i].max) {
            ld_err(ld, n, "the file defines %zu %s, more than the limit of %zu", count,
                   limits[i].what, limits[i].max);
            return false;
        }
    }
    return true;
}

/* ---- public ---- */

const char *esmd_config_kind_name(enum esmd_source_kind kind)
{
    const struct esmd_connector_ops *ops = esmd_connector_of(kind);
    return ops ? ops->kind : "?";
}

static void kvlist_free(struct esmd_kvlist *l)
{
    for (size_t i = 0; i < l->n; i++) {
        free(l->items[i].key);
        free(l->items[i].value);
    }
    free(l->items);
}

/* Frees what the keys of a table read into obj. */
static void free_fields(const struct esmd_cfg_key *keys, void *obj)
{
    for (const struct esmd_cfg_key *k = keys; k && k->name; k++) {
        void *field = (char *)obj + k->offset;
        switch (k->type) {
        case ESMD_CFG_STR:
        case ESMD_CFG_DEST:
        case ESMD_CFG_CONNECTION:
            free(*(char **)field);
            *(char **)field = NULL;
            break;
        case ESMD_CFG_NAMES: {
            char **names = *(char ***)field;
            size_t *n = (size_t *)(void *)((char *)obj + k->aux);
            for (size_t i = 0; i < *n; i++)
                free(names[i]);
            free(names);
            *(char ***)field = NULL;
            *n = 0;
            break;
        }
        case ESMD_CFG_PROPERTIES:
            kvlist_free(field);
            *(struct esmd_kvlist *)field = (struct esmd_kvlist){0};
            break;
        case ESMD_CFG_SECTION:
            free_fields(k->sub, obj);
            *(bool *)field = false;
            break;
        default:
            break;
        }
    }
}

/* Frees the fields of every connector's connection keys (conn) or source keys (a mapping). */
static void free_connector_fields(void *obj, bool conn)
{
    const struct esmd_connector_ops *ops;
    for (size_t i = 0; (ops = esmd_connector_at(i)); i++)
        free_fields(conn ? ops->conn_keys : ops->source_keys, obj);
}

void esmd_config_free(struct esmd_config *cfg)
{
    if (!cfg)
        return;
    free(cfg->path);
    free(cfg->postgres);
    free(cfg->aws.region);
    free(cfg->aws.account_id);
    free(cfg->admin.listen);
    free(cfg->admin.token);
    free(cfg->admin.access_key_id);
    free(cfg->admin.secret_access_key);
    for (size_t i = 0; i < cfg->nconnections; i++) {
        struct esmd_conn_cfg *c = &cfg->connections[i];
        free(c->name);
        free_connector_fields(c, true);
    }
    free(cfg->connections);
    for (size_t i = 0; i < cfg->nfunctions; i++) {
        struct esmd_function_cfg *fn = &cfg->functions[i];
        free(fn->name);
        free(fn->url);
        kvlist_free(&fn->headers);
        free(fn->async.on_success);
        free(fn->async.on_failure);
        free(fn->async.dead_letter);
    }
    free(cfg->functions);
    for (size_t i = 0; i < cfg->nmappings; i++) {
        struct esmd_mapping_cfg *map = &cfg->mappings[i];
        free(map->name);
        free(map->function);
        free_connector_fields(map, false);
        for (size_t j = 0; j < map->nfilters; j++)
            free(map->filters[j].pattern);
        free(map->filters);
        free(map->on_failure);
    }
    free(cfg->mappings);
    free(cfg);
}

struct esmd_config *esmd_config_parse_flags(const char *text, size_t len, const char *filename,
                                            unsigned flags, struct esmd_config_errors *errs)
{
    struct esmd_cfg_loader ld = {0};
    ld.file = filename ? filename : "<config>";
    ld.text = text ? text : "";
    ld.len = text ? len : 0;
    ld.flags = flags;
    ld.errs = errs;
    size_t first = errs->n;

    struct esmd_config *cfg = esmd_xcalloc(1, sizeof(*cfg));
    cfg->path = esmd_xstrdup(ld.file);
    cfg->admin.listen = esmd_xstrdup(DEFAULT_LISTEN);
    cfg->aws.region = esmd_xstrdup(ESMD_DEFAULT_REGION);
    cfg->aws.account_id = esmd_xstrdup(ESMD_DEFAULT_ACCOUNT);
    for (size_t i = 0; i < ESMD_ARRAY_LEN(async_queue_keys); i++)
        set_default(&async_queue_keys[i], &cfg->async_queue);
    cfg->async_queue.workers = true;
    ld.cfg = cfg;

    struct esmd_cfg_node *root = NULL;
    bool too_big = ld.len > MAX_FILE_SIZE;
    if (too_big)
        errs_add(errs, ld.file, "the file is larger than %d MB", MAX_FILE_SIZE / 1024 / 1024);
    else
        root = load_tree(&ld);
    if (!too_big && !ld.yaml_failed && within_limits(&ld, root)) {
        if (!root || is_null(root)) { /* an empty file: report what is missing */
            int line = root ? root->line : 1, col = root ? root->col : 1;
            node_free(root);
            root = node_new(&ld, NODE_MAP, line, col, NULL, NULL, 0);
        }
        read_section(&ld, root, TABLE(top_keys), cfg);
        check_destinations(&ld);
        for (size_t i = 0; i < cfg->nmappings; i++)
            cfg->mappings[i].pgqueue.service_postgres = cfg->postgres;
    }
    node_free(root);
    free(ld.dests);
    strindex_free(&ld.mapping_names);
    esmd_buf_free(&ld.path);
    esmd_buf_free(&ld.name);
    sort_errors(errs, first);
    if (errs->n > first) {
        esmd_config_free(cfg);
        return NULL;
    }
    return cfg;
}

struct esmd_config *esmd_config_parse(const char *text, size_t len, const char *filename,
                                      struct esmd_config_errors *errs)
{
    return esmd_config_parse_flags(text, len, filename, 0, errs);
}

struct esmd_config *esmd_config_load(const char *path, struct esmd_config_errors *errs)
{
    struct esmd_config *cfg = NULL;
    struct esmd_buf b = ESMD_BUF_INIT;
    FILE *f = fopen(path, "rb");
    if (!f) {
        errs_add(errs, path, "cannot open the file: %s", strerror(errno));
        goto cleanup;
    }
    char chunk[65536];
    size_t got;
    while ((got = fread(chunk, 1, sizeof(chunk), f)) > 0) {
        if (b.len + got > MAX_FILE_SIZE) {
            errs_add(errs, path, "the file is larger than %d MB", MAX_FILE_SIZE / 1024 / 1024);
            goto cleanup;
        }
        esmd_buf_append(&b, chunk, got);
    }
    if (ferror(f)) {
        errs_add(errs, path, "cannot read the file: %s", strerror(errno));
        goto cleanup;
    }
    cfg = esmd_config_parse(b.data, b.len, path, errs);

cleanup:
    if (f)
        fclose(f);
    esmd_buf_free(&b);
    return cfg;
}

const struct esmd_function_cfg *esmd_config_function(const struct esmd_config *cfg,
                                                     const char *name)
{
    if (!cfg || !name)
        return NULL;
    for (size_t i = 0; i < cfg->nfunctions; i++)
        if (cfg->functions[i].name && !strcmp(cfg->functions[i].name, name))
            return &cfg->functions[i];
    return NULL;
}

const struct esmd_conn_cfg *esmd_config_connection(const struct esmd_config *cfg, const char *name)
{
    if (!cfg || !name)
        return NULL;
    for (size_t i = 0; i < cfg->nconnections; i++)
        if (cfg->connections[i].name && !strcmp(cfg->connections[i].name, name))
            return &cfg->connections[i];
    return NULL;
}

const struct esmd_cfg_key *esmd_config_keys(const char *section, size_t *n)
{
    struct cfg_table t = {NULL, 0};
    if (!strcmp(section, "mappings"))
        t = TABLE(mapping_keys);
    else if (!strcmp(section, "functions"))
        t = TABLE(function_keys);
    else if (!strcmp(section, "async_queue"))
        t = TABLE(async_queue_keys);
    *n = t.n;
    return t.keys;
}
