/* Schema registry records (docs/kafka.md "Schema registry"): Confluent's framing, the Avro
 * decoder, JSON Schema records checked (with kafka_jsonschema.cc) and Protobuf ones decoded (with
 * kafka_protobuf.cc), and the registry client (kafka_schema.h).
 *
 * Avro: Apache Avro C parses the writer's schema; the binary data is walked here along that
 * schema, straight into JSON, with every length checked against the bytes left before anything
 * is allocated (the data is untrusted: a record claiming a 2^60-byte string fails, it does not
 * allocate), nesting bounded and the output capped. */
#include "kafka_schema.h"

#include "kafka_jsonschema.h"
#include "kafka_protobuf.h"

#include "esmd/backoff.h"
#include "esmd/curl_ev.h"
#include "esmd/json.h"

#include <avro.h>
#include <cJSON.h>
#include <ev.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Nesting of Avro types (records in records, arrays, maps, unions) a record may use. */
#define SR_MAX_DEPTH 64
/* Largest registry answer read. */
#define SR_MAX_RESPONSE (8 * 1024 * 1024)
/* One registry request. */
#define SR_TIMEOUT_MS 10000L
/* Redirects one request follows (a registry behind a proxy or moved: docs/kafka.md). */
#define SR_MAX_REDIRS 5L

const char *esmd_sr_format_name(enum esmd_sr_format f)
{
    switch (f) {
    case ESMD_SR_AVRO:
        return "AVRO";
    case ESMD_SR_JSON:
        return "JSON";
    case ESMD_SR_PROTOBUF:
        return "PROTOBUF";
    }
    return "AVRO";
}

bool esmd_sr_frame(const void *data, size_t len, int32_t *id, const unsigned char **body,
                   size_t *body_len)
{
    const unsigned char *p = data;
    if (!p || len < 5 || p[0] != 0)
        return false;
    *id = (int32_t)(((uint32_t)p[1] << 24) | ((uint32_t)p[2] << 16) | ((uint32_t)p[3] << 8) |
                    (uint32_t)p[4]);
    *body = p + 5;
    *body_len = len - 5;
    return true;
}

/* ---- reading Avro's binary encoding ---- */

struct rd {
    const unsigned char *p;
    size_t n, pos;
};

/* A zigzag varint (Avro's int and long; Protobuf framing's indexes). */
static bool rd_long(struct rd *r, int64_t *v)
{
    uint64_t u = 0;
    for (int shift = 0; shift < 70; shift += 7) {
        if (r->pos >= r->n)
            return false;
        unsigned char b = r->p[r->pos++];
        if (shift == 63 && (b & 0x7e))
            return false; /* more than 64 bits */
        u |= (uint64_t)(b & 0x7f) << shift;
        if (!(b & 0x80)) {
            *v = (int64_t)(u >> 1) ^ -(int64_t)(u & 1);
            return true;
        }
    }
    return false;
}

size_t esmd_sr_protobuf_path(const unsigned char *p, size_t len, int64_t *idx, size_t max,
                             size_t *count)
{
    struct rd r = {p, len, 0};
    int64_t n, v;
    if (!rd_long(&r, &n) || n < 0 || (uint64_t)n > len || (idx && (uint64_t)n > max))
        return 0;
    for (int64_t i = 0; i < n; i++) {
        if (!rd_long(&r, &v) || v < 0)
            return 0;
        if (idx)
            idx[i] = v;
    }
    *count = (size_t)n;
    return r.pos;
}

size_t esmd_sr_protobuf_indexes(const unsigned char *p, size_t len, int64_t *count)
{
    size_t n = 0, used = esmd_sr_protobuf_path(p, len, NULL, 0, &n);
    if (used)
        *count = (int64_t)n;
    return used;
}

/* Array and map items that take no bytes (null, an empty record) one record may hold: past it a
 * few bytes could claim billions of them. */
#define SR_MAX_EMPTY_ITEMS 65536

struct walk {
    struct rd r;
    size_t empty_items;
    struct esmd_buf *out;
    char *err;
    size_t errlen;
};

static bool walk_fail(struct walk *w, const char *fmt, ...) ESMD_PRINTF(2, 3);

static bool walk_fail(struct walk *w, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(w->err, w->errlen, fmt, ap);
    va_end(ap);
    return false;
}

/* A length-prefixed string or bytes: [p, p+len) within the data. */
static bool rd_len(struct walk *w, const unsigned char **p, size_t *len, const char *what)
{
    int64_t n;
    if (!rd_long(&w->r, &n))
        return walk_fail(w, "Avro data ends inside the length of a %s", what);
    if (n < 0 || (uint64_t)n > w->r.n - w->r.pos)
        return walk_fail(w, "Avro %s length is negative or past the end of the data", what);
    *p = w->r.p + w->r.pos;
    *len = (size_t)n;
    w->r.pos += (size_t)n;
    return true;
}

/* Bytes as a JSON string of the code points U+0000..U+00FF (Avro's JSON encoding of bytes). */
static void put_latin1(struct esmd_buf *out, const unsigned char *p, size_t n)
{
    struct esmd_buf tmp = ESMD_BUF_INIT;
    esmd_buf_reserve(&tmp, n * 2);
    for (size_t i = 0; i < n; i++) {
        if (p[i] < 0x80) {
            esmd_buf_putc(&tmp, (char)p[i]);
        } else {
            esmd_buf_putc(&tmp, (char)(0xc0 | (p[i] >> 6)));
            esmd_buf_putc(&tmp, (char)(0x80 | (p[i] & 0x3f)));
        }
    }
    esmd_buf_put_json_string(out, tmp.data ? tmp.data : "", tmp.len);
    esmd_buf_free(&tmp);
}

/* A decimal that reads back as v (JSON has no NaN or infinity: null). Most values in records
 * (prices, rates) have few decimals: n / 10^k for the smallest k up to 8 that gives v back
 * exactly is written with integer arithmetic ("9.99", "3.0"); others take the shortest of
 * %.{prec}g that reads back (slower: printf and strtod). */
static void put_double(struct esmd_buf *out, double v, bool single)
{
    if (!isfinite(v)) {
        esmd_buf_puts(out, "null");
        return;
    }
    static const double p10[] = {1, 10, 100, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8};
    for (int k = 0; k <= 8 && fabs(v) < 1e15; k++) {
        double scaled = v * p10[k];
        if (fabs(scaled) >= 9007199254740992.0) /* 2^53: no longer exact */
            break;
        int64_t n = llround(scaled);
        double back = (double)n / p10[k];
        if (single ? (float)back != (float)v : back != v)
            continue;
        char digits[32], s[40];
        uint64_t u = n < 0 ? (uint64_t)0 - (uint64_t)n : (uint64_t)n;
        int len = 0;
        do {
            digits[len++] = (char)('0' + u % 10);
            u /= 10;
        } while (u || len <= k);
        size_t o = 0;
        if (n < 0 || (n == 0 && signbit(v)))
            s[o++] = '-';
        for (int i = len - 1; i >= k; i--)
            s[o++] = digits[i];
        s[o++] = '.';
        if (k == 0)
            s[o++] = '0';
        for (int i = k - 1; i >= 0; i--)
            s[o++] = digits[i];
        esmd_buf_append(out, s, o);
        return;
    }
    char s[40];
    int lo = single ? 6 : 15, hi = single ? 9 : 17;
    for (int prec = lo; prec <= hi; prec++) {
        snprintf(s, sizeof(s), "%.*g", prec, v);
        double back = strtod(s, NULL);
        if (single ? (float)back == (float)v : back == v)
            break;
    }
    esmd_buf_puts(out, s);
}

/* An Avro schema compiled once, when it is fetched, for the walk: Avro C's accessors look fields
 * and symbols up in hash tables and names need escaping, so each node holds its children and
 * its names as JSON text ready to copy ("\"name\":", "\"SYMBOL\""). Named types referred to by
 * name (links) point at their one node; recursive types make cycles. */
struct sr_node {
    avro_type_t type;
    size_t n;              /* fields, symbols, branches */
    struct sr_node **kids; /* record: field types; union: branches; array, map: kids[0] */
    char **names;          /* record: "\"field\":"; enum: "\"SYMBOL\"" */
    size_t *name_lens;
    int64_t fixed_size;
    avro_schema_t src;
    struct sr_node *all; /* every node of the schema, for freeing */
};

static bool walk_value(struct walk *w, const struct sr_node *s, int depth);

/* An array's or a map's blocks: a count (negative: followed by the block's byte size), items,
 * until a count of 0. */
static bool walk_blocks(struct walk *w, const struct sr_node *items, bool map, int depth)
{
    esmd_buf_putc(w->out, map ? '{' : '[');
    bool first = true;
    for (;;) {
        int64_t count, size;
        if (!rd_long(&w->r, &count))
            return walk_fail(w, "Avro data ends inside a %s block count", map ? "map" : "array");
        if (count == 0)
            break;
        if (count < 0) {
            if (count == INT64_MIN || !rd_long(&w->r, &size))
                return walk_fail(w, "Avro %s block is malformed", map ? "map" : "array");
            count = -count;
        }
        for (int64_t i = 0; i < count; i++) {
            if (w->out->len > ESMD_SR_MAX_JSON)
                return walk_fail(w, "decoded %s is larger than the event can carry",
                                 map ? "map" : "array");
            if (!first)
                esmd_buf_putc(w->out, ',');
            first = false;
            if (map) {
                const unsigned char *k = NULL;
                size_t klen = 0;
                if (!rd_len(w, &k, &klen, "map key"))
                    return false;
                if (!esmd_utf8_valid((const char *)k, klen))
                    return walk_fail(w, "Avro %s is not UTF-8", "map key");
                esmd_buf_put_json_string(w->out, (const char *)k, klen);
                esmd_buf_putc(w->out, ':');
            }
            size_t at = w->r.pos;
            if (!walk_value(w, items, depth + 1))
                return false;
            if (w->r.pos == at && ++w->empty_items > SR_MAX_EMPTY_ITEMS)
                return walk_fail(w, "Avro %s holds more than %d items of no bytes",
                                 map ? "map" : "array", SR_MAX_EMPTY_ITEMS);
        }
    }
    esmd_buf_putc(w->out, map ? '}' : ']');
    return true;
}

static bool walk_value(struct walk *w, const struct sr_node *s, int depth)
{
    if (depth > SR_MAX_DEPTH)
        return walk_fail(w, "Avro data nests deeper than %d levels", SR_MAX_DEPTH);
    if (w->out->len > ESMD_SR_MAX_JSON)
        return walk_fail(w, "decoded %s is larger than the event can carry", "record");
    const unsigned char *p;
    size_t len;
    int64_t v;
    switch (s->type) {
    case AVRO_NULL:
        esmd_buf_append(w->out, "null", 4);
        return true;
    case AVRO_BOOLEAN:
        if (w->r.pos >= w->r.n || w->r.p[w->r.pos] > 1)
            return walk_fail(w, "Avro %s is not 0 or 1", "boolean");
        if (w->r.p[w->r.pos++])
            esmd_buf_append(w->out, "true", 4);
        else
            esmd_buf_append(w->out, "false", 5);
        return true;
    case AVRO_INT32:
    case AVRO_INT64:
        if (!rd_long(&w->r, &v))
            return walk_fail(w, "Avro data ends inside %s", "a number");
        if (s->type == AVRO_INT32 && (v < INT32_MIN || v > INT32_MAX))
            return walk_fail(w, "Avro %s is out of range", "int");
        esmd_buf_put_i64(w->out, v);
        return true;
    case AVRO_FLOAT: {
        if (w->r.n - w->r.pos < 4)
            return walk_fail(w, "Avro data ends inside %s", "a float");
        uint32_t u = 0;
        for (int i = 3; i >= 0; i--)
            u = (u << 8) | w->r.p[w->r.pos + (size_t)i];
        w->r.pos += 4;
        float f;
        memcpy(&f, &u, sizeof(f));
        put_double(w->out, (double)f, true);
        return true;
    }
    case AVRO_DOUBLE: {
        if (w->r.n - w->r.pos < 8)
            return walk_fail(w, "Avro data ends inside %s", "a double");
        uint64_t u = 0;
        for (int i = 7; i >= 0; i--)
            u = (u << 8) | w->r.p[w->r.pos + (size_t)i];
        w->r.pos += 8;
        double d;
        memcpy(&d, &u, sizeof(d));
        put_double(w->out, d, false);
        return true;
    }
    case AVRO_STRING:
        if (!rd_len(w, &p, &len, "string"))
            return false;
        if (!esmd_utf8_valid((const char *)p, len))
            return walk_fail(w, "Avro %s is not UTF-8", "string");
        esmd_buf_put_json_string(w->out, (const char *)p, len);
        return true;
    case AVRO_BYTES:
        if (!rd_len(w, &p, &len, "bytes"))
            return false;
        put_latin1(w->out, p, len);
        return true;
    case AVRO_FIXED:
        if (s->fixed_size < 0 || (uint64_t)s->fixed_size > w->r.n - w->r.pos)
            return walk_fail(w, "Avro data ends inside %s", "a fixed");
        put_latin1(w->out, w->r.p + w->r.pos, (size_t)s->fixed_size);
        w->r.pos += (size_t)s->fixed_size;
        return true;
    case AVRO_ENUM:
        if (!rd_long(&w->r, &v))
            return walk_fail(w, "Avro data ends inside %s", "an enum");
        if (v < 0 || (uint64_t)v >= s->n)
            return walk_fail(w, "Avro %s symbol index is out of range", "enum");
        esmd_buf_append(w->out, s->names[v], s->name_lens[v]);
        return true;
    case AVRO_RECORD:
        esmd_buf_putc(w->out, '{');
        for (size_t i = 0; i < s->n; i++) {
            if (i)
                esmd_buf_putc(w->out, ',');
            esmd_buf_append(w->out, s->names[i], s->name_lens[i]);
            if (!walk_value(w, s->kids[i], depth + 1))
                return false;
        }
        esmd_buf_putc(w->out, '}');
        return true;
    case AVRO_ARRAY:
        return walk_blocks(w, s->kids[0], false, depth);
    case AVRO_MAP:
        return walk_blocks(w, s->kids[0], true, depth);
    case AVRO_UNION:
        if (!rd_long(&w->r, &v))
            return walk_fail(w, "Avro data ends inside %s", "a union index");
        if (v < 0 || (uint64_t)v >= s->n)
            return walk_fail(w, "Avro %s branch index is out of range", "union");
        return walk_value(w, s->kids[v], depth + 1);
    default:
        break;
    }
    return walk_fail(w, "Avro schema has a type esmd does not know (%d)", (int)s->type);
}

/* ---- compiling a schema ---- */

struct sr_compile {
    struct sr_node *all; /* every node made, linked through ->all */
    bool bad;
};

static char *json_name(const char *name, const char *suffix, size_t *len)
{
    struct esmd_buf b = ESMD_BUF_INIT;
    esmd_buf_put_json_string(&b, name, strlen(name));
    esmd_buf_puts(&b, suffix);
    return esmd_buf_steal(&b, len);
}

static struct sr_node *compile(struct sr_compile *c, avro_schema_t s)
{
    if (!s) {
        c->bad = true;
        return NULL;
    }
    if (avro_typeof(s) == AVRO_LINK)
        s = avro_schema_link_target(s);
    /* a named type already made (a link to it, or a recursive reference) */
    for (struct sr_node *n = c->all; n; n = n->all)
        if (n->src == s &&
            (n->type == AVRO_RECORD || n->type == AVRO_ENUM || n->type == AVRO_FIXED))
            return n;
    struct sr_node *n = esmd_xcalloc(1, sizeof(*n));
    n->type = avro_typeof(s);
    n->src = s;
    n->all = c->all;
    c->all = n;
    switch (n->type) {
    case AVRO_RECORD:
        n->n = avro_schema_record_size(s);
        n->kids = esmd_xcalloc(n->n + 1, sizeof(*n->kids));
        n->names = esmd_xcalloc(n->n + 1, sizeof(*n->names));
        n->name_lens = esmd_xcalloc(n->n + 1, sizeof(*n->name_lens));
        for (size_t i = 0; i < n->n; i++) {
            const char *name = avro_schema_record_field_name(s, (int)i);
            if (!name) {
                c->bad = true;
                name = "";
            }
            n->names[i] = json_name(name, ":", &n->name_lens[i]);
            n->kids[i] = compile(c, avro_schema_record_field_get_by_index(s, (int)i));
        }
        break;
    case AVRO_ENUM: {
        int k = avro_schema_enum_number_of_symbols(s);
        n->n = k > 0 ? (size_t)k : 0;
        n->names = esmd_xcalloc(n->n + 1, sizeof(*n->names));
        n->name_lens = esmd_xcalloc(n->n + 1, sizeof(*n->name_lens));
        for (size_t i = 0; i < n->n; i++) {
            const char *sym = avro_schema_enum_get(s, (int)i);
            n->names[i] = json_name(sym ? sym : "", "", &n->name_lens[i]);
        }
        break;
    }
    case AVRO_FIXED:
        n->fixed_size = avro_schema_fixed_size(s);
        break;
    case AVRO_ARRAY:
    case AVRO_MAP:
        n->n = 1;
        n->kids = esmd_xcalloc(1, sizeof(*n->kids));
        n->kids[0] = compile(c, n->type == AVRO_ARRAY ? avro_schema_array_items(s)
                                                      : avro_schema_map_values(s));
        break;
    case AVRO_UNION:
        n->n = avro_schema_union_size(s);
        n->kids = esmd_xcalloc(n->n + 1, sizeof(*n->kids));
        for (size_t i = 0; i < n->n; i++)
            n->kids[i] = compile(c, avro_schema_union_branch(s, (int)i));
        break;
    default:
        break;
    }
    return n;
}

static void nodes_free(struct sr_node *all)
{
    while (all) {
        struct sr_node *next = all->all;
        for (size_t i = 0; all->names && i < all->n; i++)
            free(all->names[i]);
        free(all->names);
        free(all->name_lens);
        free(all->kids);
        free(all);
        all = next;
    }
}

/* ---- schemas ---- */

struct esmd_sr_schema {
    enum esmd_sr_format format;
    avro_schema_t avro;   /* AVRO */
    struct sr_node *root; /* AVRO: compiled */
    struct sr_node *all;
    struct esmd_pb_schema *pb; /* PROTOBUF */
    struct esmd_js_schema *js; /* JSON */
};

/* The registry's Protobuf schema is .proto text (Confluent's default answer) or the base64 of a
 * serialized FileDescriptorProto (`?format=serialized`, and what confluent-kafka's serializers
 * register): text that is only base64 and decodes is the latter (a .proto file has spaces or
 * semicolons). */
static void protobuf_file(struct esmd_pb_file *f, const char *name, const char *text, size_t len,
                          struct esmd_buf *bin)
{
    bool b64 = len > 0;
    for (size_t i = 0; i < len && b64; i++) {
        unsigned char c = (unsigned char)text[i];
        b64 = (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') ||
              c == '+' || c == '/' || c == '=';
    }
    if (b64 && esmd_base64_decode(text, len, bin) != 0)
        b64 = false;
    f->name = name;
    f->data = b64 ? (bin->data ? bin->data : "") : text;
    f->len = b64 ? bin->len : len;
    f->binary = b64;
}

static struct esmd_pb_schema *protobuf_schema(const char *text, size_t len,
                                              const struct esmd_sr_file *refs, size_t nrefs,
                                              char *err, size_t errlen)
{
    struct esmd_pb_file *files = esmd_xcalloc(nrefs + 1, sizeof(*files));
    struct esmd_buf *bins = esmd_xcalloc(nrefs + 1, sizeof(*bins));
    protobuf_file(&files[0], NULL, text, len, &bins[0]);
    for (size_t i = 0; i < nrefs; i++)
        protobuf_file(&files[i + 1], refs[i].name, refs[i].text, strlen(refs[i].text),
                      &bins[i + 1]);
    char why[400];
    struct esmd_pb_schema *pb = esmd_pb_schema_new(files, nrefs + 1, why, sizeof(why));
    if (!pb)
        snprintf(err, errlen, "the Protobuf schema cannot be used: %s", why);
    for (size_t i = 0; i <= nrefs; i++)
        esmd_buf_free(&bins[i]);
    free(bins);
    free(files);
    return pb;
}

struct esmd_sr_schema *esmd_sr_schema_new(enum esmd_sr_format f, const char *text, size_t len,
                                          char *err, size_t errlen)
{
    struct esmd_sr_schema *s = esmd_xcalloc(1, sizeof(*s));
    s->format = f;
    switch (f) {
    case ESMD_SR_AVRO:
        if (avro_schema_from_json_length(text, len, &s->avro) != 0) {
            snprintf(err, errlen, "not an Avro schema: %s", avro_strerror());
            free(s);
            return NULL;
        } else {
            struct sr_compile c = {0};
            s->root = compile(&c, s->avro);
            s->all = c.all;
            if (c.bad) {
                snprintf(err, errlen, "the Avro schema has a field or type Avro C cannot read");
                esmd_sr_schema_free(s);
                return NULL;
            }
        }
        return s;
    case ESMD_SR_JSON:
        if (!esmd_json_valid(text, len)) {
            snprintf(err, errlen, "the JSON schema is not JSON");
            free(s);
            return NULL;
        }
        s->js = esmd_js_schema_new(text, len, err, errlen);
        if (!s->js) {
            free(s);
            return NULL;
        }
        return s;
    case ESMD_SR_PROTOBUF:
        s->pb = protobuf_schema(text, len, NULL, 0, err, errlen);
        if (!s->pb) {
            free(s);
            return NULL;
        }
        return s;
    }
    snprintf(err, errlen, "unknown schema format");
    free(s);
    return NULL;
}

struct esmd_sr_schema *esmd_sr_schema_new_protobuf(const char *text, size_t len,
                                                   const struct esmd_sr_file *refs, size_t nrefs,
                                                   char *err, size_t errlen)
{
    struct esmd_sr_schema *s = esmd_xcalloc(1, sizeof(*s));
    s->format = ESMD_SR_PROTOBUF;
    s->pb = protobuf_schema(text, len, refs, nrefs, err, errlen);
    if (!s->pb) {
        free(s);
        return NULL;
    }
    return s;
}

void esmd_sr_schema_free(struct esmd_sr_schema *s)
{
    if (!s)
        return;
    nodes_free(s->all);
    esmd_pb_schema_free(s->pb);
    esmd_js_schema_free(s->js);
    if (s->avro)
        avro_schema_decref(s->avro);
    free(s);
}

enum esmd_sr_format esmd_sr_schema_format(const struct esmd_sr_schema *s)
{
    return s->format;
}

bool esmd_sr_decode(const struct esmd_sr_schema *s, const unsigned char *body, size_t len,
                    struct esmd_buf *out, const unsigned char **src, size_t *src_len, char *err,
                    size_t errlen)
{
    size_t mark = out->len;
    *src = body;
    *src_len = len;
    if (s->format == ESMD_SR_JSON) {
        if (!esmd_json_valid((const char *)body, len)) {
            snprintf(err, errlen, "the data is not one JSON document in UTF-8");
            return false;
        }
        if (!esmd_js_validate(s->js, (const char *)body, len, err, errlen))
            return false;
        esmd_buf_append(out, body, len);
        return true;
    }
    if (s->format == ESMD_SR_PROTOBUF) {
        /* the message indexes pick the type; SOURCE keeps them (only the magic byte and the
         * schema id are the registry's framing, docs/kafka.md) */
        int64_t idx[ESMD_PB_MAX_DEPTH];
        size_t n = 0, used = esmd_sr_protobuf_path(body, len, idx, ESMD_PB_MAX_DEPTH, &n);
        if (!used) {
            snprintf(err, errlen, "the Protobuf message indexes are malformed");
            return false;
        }
        size_t jlen = 0;
        char *json = esmd_pb_decode(s->pb, idx, n, body + used, len - used, ESMD_SR_MAX_JSON, &jlen,
                                    err, errlen);
        if (!json)
            return false;
        esmd_buf_append(out, json, jlen);
        free(json);
        return true;
    }
    struct walk w = {{body, len, 0}, 0, out, err, errlen};
    if (!walk_value(&w, s->root, 0)) {
        out->len = mark;
        return false;
    }
    if (w.r.pos != len) {
        snprintf(err, errlen, "%zu bytes left after the Avro data (not written with this schema)",
                 len - w.r.pos);
        out->len = mark;
        return false;
    }
    return true;
}

/* ---- the registry ---- */

/* A file a Protobuf schema imports from another subject (the answer's `references`). */
struct sr_ref {
    char *name, *subject;
    int version; /* <= 0: latest */
    char *text;  /* once fetched */
};

/* Files one schema may import, directly or not: past it the schema is refused. */
#define SR_MAX_REFS 64

struct sr_entry {
    int32_t id;
    enum esmd_sr_state st;
    struct esmd_sr_schema *schema; /* READY */
    char *why;                     /* MISSING, BAD */
    bool inflight;
    /* A Protobuf schema with references, while they are fetched one after the other: its text
     * (set once the id's answer is in) and the files, refs[next_ref] the one asked next. */
    char *text;
    struct sr_ref *refs;
    size_t nrefs, next_ref;
    struct sr_entry *next;
    struct sr_entry *fnext; /* MISSING, BAD: the next one answered so (sr->failed) */
};

static void entry_refs_free(struct sr_entry *e)
{
    for (size_t i = 0; i < e->nrefs; i++) {
        free(e->refs[i].name);
        free(e->refs[i].subject);
        free(e->refs[i].text);
    }
    free(e->refs);
    free(e->text);
    e->refs = NULL;
    e->text = NULL;
    e->nrefs = e->next_ref = 0;
}

static void entry_bad(struct sr_entry *e, const char *why)
{
    e->st = ESMD_SR_BAD;
    e->why = esmd_xstrdup(why);
    entry_refs_free(e);
}

struct sr_req {
    struct esmd_sr *sr;
    struct sr_entry *e;
    CURL *easy;
    struct curl_slist *hdrs;
    struct esmd_buf body;
    bool too_big; /* the answer passed SR_MAX_RESPONSE */
    char errbuf[CURL_ERROR_SIZE];
    struct sr_req *prev, *next;
};

#define SR_BUCKETS 256
/* Ids answered MISSING or BAD kept at most: past it the oldest is forgotten (asked again if a
 * record names it again), so records with ever new ids (data not written by a registry's
 * serializer that happens to start with a 0 byte) do not grow the cache without bound. */
#define SR_MAX_FAILED 1024

struct esmd_sr {
    struct ev_loop *loop;
    const struct esmd_log_ctx *log;
    struct esmd_sr_hooks hooks;
    char *base; /* url without trailing slashes */
    char *user, *pass, *ca, *cert, *key;
    struct esmd_curl_ev ce;
    bool ce_init;
    struct sr_entry *buckets[SR_BUCKETS];
    struct sr_entry *failed_head, *failed_tail; /* MISSING, BAD: oldest first */
    size_t nfailed;
    struct sr_req *reqs;
    ev_timer retry;
    int attempt;
    bool down;
};

static const struct esmd_backoff sr_backoff = {.base_ms = 250, .cap_ms = 30000};

static struct sr_entry *entry_find(struct esmd_sr *sr, int32_t id)
{
    struct sr_entry *e = sr->buckets[(uint32_t)id % SR_BUCKETS];
    while (e && e->id != id)
        e = e->next;
    return e;
}

static size_t on_body(char *p, size_t size, size_t n, void *ud)
{
    struct sr_req *req = ud;
    size_t len = size * n;
    if (req->body.len + len > SR_MAX_RESPONSE) {
        req->too_big = true;
        return 0; /* curl fails the transfer */
    }
    esmd_buf_append(&req->body, p, len);
    return len;
}

/* The retry timer asks again for every id still waiting (on_retry), after a backoff. */
static void retry_arm(struct esmd_sr *sr)
{
    if (!ev_is_active(&sr->retry)) {
        double d = (double)esmd_backoff_delay(&sr_backoff, sr->attempt, esmd_random64()) / 1000.0;
        if (sr->attempt < 30)
            sr->attempt++;
        ev_timer_set(&sr->retry, d, 0.0);
        ev_timer_start(sr->loop, &sr->retry);
    }
}

static void req_start(struct esmd_sr *sr, struct sr_entry *e)
{
    struct sr_req *req = esmd_xcalloc(1, sizeof(*req));
    req->sr = sr;
    req->e = e;
    req->easy = curl_easy_init();
    if (!req->easy) {
        free(req);
        retry_arm(sr); /* e stays pending: the timer asks again */
        return;
    }
    /* The URL is as long as the configured base makes it (libcurl copies it). */
    struct esmd_buf url;
    esmd_buf_init(&url);
    CURL *c = req->easy;
    if (e->text) { /* the next reference: GET /subjects/{subject}/versions/{version} */
        const struct sr_ref *r = &e->refs[e->next_ref];
        char *subj = curl_easy_escape(c, r->subject, 0);
        char ver[16] = "latest";
        if (r->version > 0)
            snprintf(ver, sizeof(ver), "%d", r->version);
        esmd_buf_printf(&url, "%s/subjects/%s/versions/%s", sr->base, subj ? subj : "", ver);
        curl_free(subj);
    } else {
        esmd_buf_printf(&url, "%s/schemas/ids/%d", sr->base, (int)e->id);
    }
    req->hdrs = curl_slist_append(NULL, "Accept: application/vnd.schemaregistry.v1+json, "
                                        "application/json");
    curl_easy_setopt(c, CURLOPT_URL, esmd_buf_cstr(&url));
    esmd_buf_free(&url);
    curl_easy_setopt(c, CURLOPT_PROTOCOLS_STR, "http,https");
    /* Redirects (301, 302, 303, 307, 308) are followed, over http and https only. The basic
     * auth credentials go to the configured scheme, host and port only, never to another one a
     * redirect names: libcurl's default (CURLOPT_UNRESTRICTED_AUTH 0), set here to say so.
     * The TLS settings (ca_file, client certificate) apply to every host. docs/kafka.md. */
    curl_easy_setopt(c, CURLOPT_FOLLOWLOCATION, 1L);
    curl_easy_setopt(c, CURLOPT_MAXREDIRS, SR_MAX_REDIRS);
    curl_easy_setopt(c, CURLOPT_REDIR_PROTOCOLS_STR, "http,https");
    curl_easy_setopt(c, CURLOPT_UNRESTRICTED_AUTH, 0L);
    curl_easy_setopt(c, CURLOPT_HTTPHEADER, req->hdrs);
    curl_easy_setopt(c, CURLOPT_USERAGENT, "esmd/" ESMD_VERSION);
    curl_easy_setopt(c, CURLOPT_TIMEOUT_MS, SR_TIMEOUT_MS);
    curl_easy_setopt(c, CURLOPT_NOSIGNAL, 1L);
    curl_easy_setopt(c, CURLOPT_PRIVATE, req);
    curl_easy_setopt(c, CURLOPT_ERRORBUFFER, req->errbuf);
    curl_easy_setopt(c, CURLOPT_WRITEFUNCTION, on_body);
    curl_easy_setopt(c, CURLOPT_WRITEDATA, req);
    if (sr->user) {
        curl_easy_setopt(c, CURLOPT_HTTPAUTH, (long)CURLAUTH_BASIC);
        curl_easy_setopt(c, CURLOPT_USERNAME, sr->user);
        curl_easy_setopt(c, CURLOPT_PASSWORD, sr->pass ? sr->pass : "");
    }
    if (sr->ca)
        curl_easy_setopt(c, CURLOPT_CAINFO, sr->ca);
    if (sr->cert) {
        curl_easy_setopt(c, CURLOPT_SSLCERT, sr->cert);
        curl_easy_setopt(c, CURLOPT_SSLKEY, sr->key);
    }
    if (curl_multi_add_handle(sr->ce.multi, c) != CURLM_OK) {
        curl_slist_free_all(req->hdrs);
        curl_easy_cleanup(c);
        free(req);
        retry_arm(sr);
        return;
    }
    e->inflight = true;
    req->next = sr->reqs;
    if (sr->reqs)
        sr->reqs->prev = req;
    sr->reqs = req;
}

static void req_free(struct esmd_sr *sr, struct sr_req *req)
{
    if (req->prev)
        req->prev->next = req->next;
    else
        sr->reqs = req->next;
    if (req->next)
        req->next->prev = req->prev;
    curl_multi_remove_handle(sr->ce.multi, req->easy);
    curl_easy_cleanup(req->easy);
    curl_slist_free_all(req->hdrs);
    esmd_buf_free(&req->body);
    free(req);
}

static void sr_set_down(struct esmd_sr *sr, const char *why)
{
    char msg[700];
    snprintf(msg, sizeof(msg), "schema registry %s: %s", sr->base, why);
    esmd_log_limited(ESMD_LOG_WARN, sr->log, "schema-registry", "%s; records wait, retrying", msg);
    sr->down = true;
    if (sr->hooks.down)
        sr->hooks.down(sr->hooks.ud, msg);
    retry_arm(sr);
}

/* Appends the references of an answer ([{"name","subject","version"}]) not listed yet (by name)
 * to e's files to fetch. false with err when one is malformed or there are too many. */
static bool add_refs(struct sr_entry *e, const cJSON *refs, char *err, size_t errlen)
{
    const cJSON *r;
    if (!cJSON_IsArray(refs))
        return true;
    cJSON_ArrayForEach(r, refs)
    {
        const cJSON *name = cJSON_GetObjectItemCaseSensitive(r, "name");
        const cJSON *subj = cJSON_GetObjectItemCaseSensitive(r, "subject");
        const cJSON *ver = cJSON_GetObjectItemCaseSensitive(r, "version");
        if (!cJSON_IsString(name) || !cJSON_IsString(subj) || (ver && !cJSON_IsNumber(ver))) {
            snprintf(err, errlen, "a reference of the schema has no name or subject");
            return false;
        }
        bool seen = false;
        for (size_t i = 0; i < e->nrefs && !seen; i++)
            seen = strcmp(e->refs[i].name, name->valuestring) == 0;
        if (seen)
            continue;
        if (e->nrefs >= SR_MAX_REFS) {
            snprintf(err, errlen, "the schema imports more than %d files", SR_MAX_REFS);
            return false;
        }
        e->refs = esmd_xrealloc(e->refs, (e->nrefs + 1) * sizeof(*e->refs));
        struct sr_ref *n = &e->refs[e->nrefs++];
        n->name = esmd_xstrdup(name->valuestring);
        n->subject = esmd_xstrdup(subj->valuestring);
        n->version = ver && ver->valuedouble >= 1 && ver->valuedouble <= INT32_MAX
                         ? (int)ver->valuedouble
                         : 0;
        n->text = NULL;
    }
    return true;
}

/* The answer of GET /schemas/ids/{id}: {"schema":"...","schemaType":"AVRO"|"JSON"|"PROTOBUF"}
 * (no schemaType: Avro). false when it is not such an answer. */
static bool parse_answer(struct sr_entry *e, const struct esmd_buf *body)
{
    cJSON *root = cJSON_ParseWithLength(body->data ? body->data : "", body->len);
    const cJSON *schema = cJSON_GetObjectItemCaseSensitive(root, "schema");
    const cJSON *type = cJSON_GetObjectItemCaseSensitive(root, "schemaType");
    if (!cJSON_IsString(schema) || (type && !cJSON_IsString(type) && !cJSON_IsNull(type))) {
        cJSON_Delete(root);
        return false;
    }
    enum esmd_sr_format f = ESMD_SR_AVRO;
    const char *t = cJSON_IsString(type) ? type->valuestring : "AVRO";
    char err[512];
    if (strcmp(t, "JSON") == 0)
        f = ESMD_SR_JSON;
    else if (strcmp(t, "PROTOBUF") == 0)
        f = ESMD_SR_PROTOBUF;
    else if (strcmp(t, "AVRO") != 0)
        f = (enum esmd_sr_format) - 1;
    const cJSON *refs = cJSON_GetObjectItemCaseSensitive(root, "references");
    if ((int)f < 0) {
        snprintf(err, sizeof(err), "schema type %.64s is not AVRO, JSON or PROTOBUF", t);
        e->schema = NULL;
    } else if (f == ESMD_SR_PROTOBUF && cJSON_IsArray(refs) && refs->child) {
        /* imports of other subjects: fetched next, then the schema is built (on_done) */
        e->text = esmd_xstrdup(schema->valuestring);
        bool ok = add_refs(e, refs, err, sizeof(err));
        cJSON_Delete(root);
        if (!ok)
            entry_bad(e, err);
        return true;
    } else {
        e->schema = esmd_sr_schema_new(f, schema->valuestring, strlen(schema->valuestring), err,
                                       sizeof(err));
    }
    e->st = e->schema ? ESMD_SR_READY : ESMD_SR_BAD;
    if (!e->schema)
        e->why = esmd_xstrdup(err);
    cJSON_Delete(root);
    return true;
}

/* The answer of GET /subjects/{s}/versions/{v} for e's next reference: its text, and the files
 * it imports in turn. Once the last is in, the schema is built. false when it is not a
 * registry's answer. */
static bool parse_ref_answer(struct sr_entry *e, const struct esmd_buf *body)
{
    cJSON *root = cJSON_ParseWithLength(body->data ? body->data : "", body->len);
    const cJSON *schema = cJSON_GetObjectItemCaseSensitive(root, "schema");
    if (!cJSON_IsString(schema)) {
        cJSON_Delete(root);
        return false;
    }
    char err[512];
    e->refs[e->next_ref].text = esmd_xstrdup(schema->valuestring);
    e->next_ref++;
    bool ok = add_refs(e, cJSON_GetObjectItemCaseSensitive(root, "references"), err, sizeof(err));
    cJSON_Delete(root);
    if (!ok) {
        entry_bad(e, err);
        return true;
    }
    if (e->next_ref < e->nrefs)
        return true;
    struct esmd_sr_file *files = esmd_xcalloc(e->nrefs, sizeof(*files));
    for (size_t i = 0; i < e->nrefs; i++) {
        files[i].name = e->refs[i].name;
        files[i].text = e->refs[i].text;
    }
    e->schema =
        esmd_sr_schema_new_protobuf(e->text, strlen(e->text), files, e->nrefs, err, sizeof(err));
    free(files);
    if (e->schema) {
        e->st = ESMD_SR_READY;
        entry_refs_free(e);
    } else {
        entry_bad(e, err);
    }
    return true;
}

/* A 404's body carries the registry's error code: 40403 (no such schema), 40401 (no such
 * subject), 40402 (no such version). */
static bool is_not_found(const struct esmd_buf *body, double want1, double want2)
{
    cJSON *root = cJSON_ParseWithLength(body->data ? body->data : "", body->len);
    const cJSON *code = cJSON_GetObjectItemCaseSensitive(root, "error_code");
    bool yes = cJSON_IsNumber(code) && (code->valuedouble == want1 || code->valuedouble == want2);
    cJSON_Delete(root);
    return yes;
}

static void entry_free(struct sr_entry *e)
{
    esmd_sr_schema_free(e->schema);
    free(e->why);
    entry_refs_free(e);
    free(e);
}

/* e was answered MISSING or BAD: it joins the failed ones, and the oldest of them goes past
 * SR_MAX_FAILED (no pointer to an entry outlives the esmd_sr_get() call that returned it). */
static void failed_add(struct esmd_sr *sr, struct sr_entry *e)
{
    if (sr->failed_tail)
        sr->failed_tail->fnext = e;
    else
        sr->failed_head = e;
    sr->failed_tail = e;
    if (++sr->nfailed <= SR_MAX_FAILED)
        return;
    struct sr_entry *old = sr->failed_head;
    sr->failed_head = old->fnext;
    sr->nfailed--;
    for (struct sr_entry **pp = &sr->buckets[(uint32_t)old->id % SR_BUCKETS]; *pp;
         pp = &(*pp)->next)
        if (*pp == old) {
            *pp = old->next;
            break;
        }
    entry_free(old);
}

static void on_done(struct esmd_curl_ev *ce, CURL *easy, CURLcode result, void *priv)
{
    (void)ce;
    (void)easy;
    struct sr_req *req = priv;
    struct esmd_sr *sr = req->sr;
    struct sr_entry *e = req->e;
    long status = 0;
    char why[600];
    e->inflight = false;
    curl_easy_getinfo(req->easy, CURLINFO_RESPONSE_CODE, &status);
    bool answered = false;
    if (req->too_big) {
        /* that id's answer, every time: its records fail rather than hold the registry down */
        snprintf(why, sizeof(why), "the registry's answer for schema %d is larger than %d MB",
                 (int)e->id, SR_MAX_RESPONSE / (1024 * 1024));
        entry_bad(e, why);
        answered = true;
    } else if (result == CURLE_TOO_MANY_REDIRECTS) {
        long n = 0;
        char *last = NULL;
        curl_easy_getinfo(req->easy, CURLINFO_REDIRECT_COUNT, &n);
        curl_easy_getinfo(req->easy, CURLINFO_REDIRECT_URL, &last);
        snprintf(why, sizeof(why),
                 "schema %d: %ld redirects followed and the next one, to %.300s, is past the "
                 "limit of %ld (a redirect loop?)",
                 (int)e->id, n, last ? last : "?", SR_MAX_REDIRS);
    } else if (result != CURLE_OK) {
        snprintf(why, sizeof(why), "%s", req->errbuf[0] ? req->errbuf : curl_easy_strerror(result));
    } else if (status == 200) {
        answered = e->text ? parse_ref_answer(e, &req->body) : parse_answer(e, &req->body);
        if (!answered)
            snprintf(why, sizeof(why), "schema %d: the answer is not a registry's schema",
                     (int)e->id);
    } else if (status == 404 && !e->text && is_not_found(&req->body, 40403, 40403)) {
        e->st = ESMD_SR_MISSING;
        e->why = esmd_xstrdup("the registry does not know this schema id (40403)");
        answered = true;
    } else if (status == 404 && e->text && is_not_found(&req->body, 40401, 40402)) {
        const struct sr_ref *r = &e->refs[e->next_ref];
        snprintf(why, sizeof(why),
                 "the Protobuf schema imports \"%.200s\", registered as subject %.200s version "
                 "%d, which the registry does not have",
                 r->name, r->subject, r->version);
        entry_bad(e, why);
        answered = true;
    } else {
        snprintf(why, sizeof(why), "HTTP %ld for schema %d%s", status, (int)e->id,
                 status == 404                   ? " without error code 40403 (is the url right?)"
                 : status >= 300 && status < 400 ? " without a Location to follow"
                                                 : "");
    }
    req_free(sr, req);
    if (!answered) {
        sr_set_down(sr, why);
        return;
    }
    if (e->st == ESMD_SR_MISSING || e->st == ESMD_SR_BAD)
        failed_add(sr, e);
    if (e->st == ESMD_SR_BAD)
        ESMD_WARN(sr->log, "schema registry: schema %d cannot be used: %s", (int)e->id, e->why);
    sr->attempt = 0;
    if (sr->down) {
        sr->down = false;
        ESMD_INFO(sr->log, "schema registry %s answers again", sr->base);
        if (sr->hooks.down)
            sr->hooks.down(sr->hooks.ud, NULL);
    }
    if (e->st == ESMD_SR_PENDING) { /* a reference to fetch next */
        if (!ev_is_active(&sr->retry))
            req_start(sr, e);
        return;
    }
    if (sr->hooks.changed)
        sr->hooks.changed(sr->hooks.ud);
}

/* Every id still waiting without a request in flight is asked again. */
static void on_retry(struct ev_loop *loop, ev_timer *w, int revents)
{
    (void)revents;
    struct esmd_sr *sr = w->data;
    ev_timer_stop(loop, w);
    for (size_t i = 0; i < SR_BUCKETS; i++)
        for (struct sr_entry *e = sr->buckets[i]; e; e = e->next)
            if (e->st == ESMD_SR_PENDING && !e->inflight)
                req_start(sr, e);
}

static char *dup_or_null(const char *s)
{
    return s ? esmd_xstrdup(s) : NULL;
}

struct esmd_sr *esmd_sr_new(const struct esmd_schema_registry_cfg *cfg, struct ev_loop *loop,
                            const struct esmd_log_ctx *log, const struct esmd_sr_hooks *hooks,
                            char *err, size_t errlen)
{
    struct esmd_sr *sr = esmd_xcalloc(1, sizeof(*sr));
    sr->loop = loop;
    sr->log = log;
    sr->hooks = *hooks;
    sr->base = esmd_xstrdup(cfg->url);
    size_t n = strlen(sr->base);
    while (n > 0 && sr->base[n - 1] == '/')
        sr->base[--n] = '\0';
    sr->user = dup_or_null(cfg->username);
    sr->pass = dup_or_null(cfg->password);
    sr->ca = dup_or_null(cfg->ca_file);
    sr->cert = dup_or_null(cfg->cert_file);
    sr->key = dup_or_null(cfg->key_file);
    ev_timer_init(&sr->retry, on_retry, 0.0, 0.0);
    sr->retry.data = sr;
    if (esmd_curl_ev_init(&sr->ce, loop, on_done, sr, err, errlen) != 0) {
        esmd_sr_free(sr);
        return NULL;
    }
    sr->ce_init = true;
    return sr;
}

void esmd_sr_free(struct esmd_sr *sr)
{
    if (!sr)
        return;
    ev_timer_stop(sr->loop, &sr->retry);
    while (sr->reqs)
        req_free(sr, sr->reqs);
    if (sr->ce_init)
        esmd_curl_ev_close(&sr->ce);
    for (size_t i = 0; i < SR_BUCKETS; i++) {
        struct sr_entry *e = sr->buckets[i], *next;
        for (; e; e = next) {
            next = e->next;
            entry_free(e);
        }
    }
    free(sr->base);
    free(sr->user);
    free(sr->pass);
    free(sr->ca);
    free(sr->cert);
    free(sr->key);
    free(sr);
}

enum esmd_sr_state esmd_sr_get(struct esmd_sr *sr, int32_t id, const struct esmd_sr_schema **s,
                               const char **why)
{
    struct sr_entry *e = entry_find(sr, id);
    if (!e) {
        e = esmd_xcalloc(1, sizeof(*e));
        e->id = id;
        e->st = ESMD_SR_PENDING;
        size_t b = (uint32_t)id % SR_BUCKETS;
        e->next = sr->buckets[b];
        sr->buckets[b] = e;
        if (!ev_is_active(&sr->retry)) /* while the registry is down, the timer asks */
            req_start(sr, e);
    }
    *s = e->schema;
    *why = e->why;
    return e->st;
}
