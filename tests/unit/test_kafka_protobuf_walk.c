/* The Protobuf wire walker (connectors/kafka/kafka_protobuf.cc, WireWalker) against the
 * reflection path it stands in for: many generated records of tests/unit/pb_walk_schemas.h
 * (every scalar type with its edge values, packed and unpacked, nested, maps, oneofs, enums
 * with undeclared numbers, proto2 and proto3), and corrupted copies of them (truncated, bytes
 * changed, inserted or removed), decoded both ways: the same JSON, byte for byte, or the same
 * refusal with the same message. Also that the walker does take the valid records (it is not
 * compared with itself by declining everything) and declines a type with a well-known type.
 * PBWALK_SHOW=1 in the environment prints each record's outcome ("walk" when the walker took it).
 */
#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>
#include <cmocka.h>

#include "../../connectors/kafka/kafka_protobuf.h"
#include "pb_walk_schemas.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* ---- a random record writer, along a description of the schemas' wire shapes ---- */

enum kind { K_VARINT, K_I64, K_I32, K_STR, K_BYTES, K_MSG, K_MAP };

struct gfield {
    int num;
    enum kind kind;
    int sub;      /* K_MSG, K_MAP: index into types[] */
    int repeated; /* a packable repeated field: packed data too */
};

struct gtype {
    const struct gfield *f;
    size_t n;
};

/* proto3: Inner, All, the map entries; proto2: Q, Opt, Q's map entry */
static const struct gfield g_inner[] = {
    {1, K_VARINT, 0, 0}, {2, K_STR, 0, 0}, {3, K_MSG, 0, 0}, {4, K_VARINT, 0, 0}};
static const struct gfield g_all[] = {
    {1, K_VARINT, 0, 0},  {2, K_VARINT, 0, 0},  {3, K_VARINT, 0, 0},  {4, K_VARINT, 0, 0},
    {5, K_VARINT, 0, 0},  {6, K_VARINT, 0, 0},  {7, K_I32, 0, 0},     {8, K_I64, 0, 0},
    {9, K_I32, 0, 0},     {10, K_I64, 0, 0},    {11, K_I32, 0, 0},    {12, K_I64, 0, 0},
    {13, K_VARINT, 0, 0}, {14, K_STR, 0, 0},    {15, K_BYTES, 0, 0},  {16, K_VARINT, 0, 0},
    {17, K_MSG, 0, 0},    {18, K_VARINT, 0, 1}, {19, K_VARINT, 0, 1}, {20, K_VARINT, 0, 1},
    {21, K_VARINT, 0, 1}, {22, K_VARINT, 0, 1}, {23, K_VARINT, 0, 1}, {24, K_I32, 0, 1},
    {25, K_I64, 0, 1},    {26, K_I32, 0, 1},    {27, K_I64, 0, 1},    {28, K_I32, 0, 1},
    {29, K_I64, 0, 1},    {30, K_VARINT, 0, 1}, {31, K_STR, 0, 0},    {32, K_BYTES, 0, 0},
    {33, K_VARINT, 0, 1}, {34, K_MSG, 0, 0},    {35, K_VARINT, 0, 1}, {36, K_MAP, 2, 0},
    {37, K_MAP, 3, 0},    {38, K_MAP, 4, 0},    {39, K_MAP, 5, 0},    {40, K_MAP, 6, 0},
    {41, K_MAP, 7, 0},    {42, K_MAP, 8, 0},    {43, K_STR, 0, 0},    {44, K_MSG, 0, 0},
    {45, K_VARINT, 0, 0}, {46, K_VARINT, 0, 0}, {47, K_VARINT, 0, 0}, {48, K_STR, 0, 0},
    {49, K_I64, 0, 0},    {50, K_VARINT, 0, 0}, {100000, K_I32, 0, 0}};
static const struct gfield g_si[] = {{1, K_STR, 0, 0}, {2, K_VARINT, 0, 0}};
static const struct gfield g_ls[] = {{1, K_VARINT, 0, 0}, {2, K_STR, 0, 0}};
static const struct gfield g_bi[] = {{1, K_VARINT, 0, 0}, {2, K_MSG, 0, 0}};
static const struct gfield g_uc[] = {{1, K_VARINT, 0, 0}, {2, K_VARINT, 0, 0}};
static const struct gfield g_sd[] = {{1, K_VARINT, 0, 0}, {2, K_I64, 0, 0}};
static const struct gfield g_fb[] = {{1, K_I32, 0, 0}, {2, K_BYTES, 0, 0}};
static const struct gfield g_sm[] = {{1, K_STR, 0, 0}, {2, K_MSG, 0, 0}};
static const struct gfield g_q[] = {
    {1, K_VARINT, 0, 0},  {2, K_STR, 0, 0},     {3, K_VARINT, 0, 0},  {4, K_VARINT, 0, 1},
    {5, K_VARINT, 0, 1},  {6, K_MSG, 9, 0},     {7, K_MAP, 11, 0},    {8, K_BYTES, 0, 0},
    {9, K_I32, 0, 0},     {10, K_VARINT, 0, 1}, {11, K_VARINT, 0, 0}, {12, K_VARINT, 0, 0},
    {13, K_VARINT, 0, 0}, {14, K_MSG, 9, 0}};
static const struct gfield g_opt[] = {{1, K_VARINT, 0, 0}, {2, K_MSG, 9, 0}, {3, K_MSG, 9, 0}};
static const struct gfield g_me[] = {{1, K_STR, 0, 0}, {2, K_VARINT, 0, 0}};

#define T(a)                                                                                       \
    {                                                                                              \
        a, sizeof(a) / sizeof(a[0])                                                                \
    }
static const struct gtype types[] = {T(g_inner), T(g_all), T(g_si), T(g_ls), T(g_bi),  T(g_uc),
                                     T(g_sd),    T(g_fb),  T(g_sm), T(g_q),  T(g_opt), T(g_me)};

struct bytes {
    unsigned char *p;
    size_t len, cap;
};

static void put(struct bytes *b, const void *p, size_t n)
{
    if (b->len + n > b->cap) {
        b->cap = (b->len + n) * 2 + 64;
        b->p = realloc(b->p, b->cap);
        assert_non_null(b->p);
    }
    if (n)
        memcpy(b->p + b->len, p, n);
    b->len += n;
}

static uint64_t rng = 0x9e3779b97f4a7c15ULL;

static uint64_t rnd(void)
{
    rng ^= rng << 13;
    rng ^= rng >> 7;
    rng ^= rng << 17;
    return rng;
}

static unsigned pick(unsigned n)
{
    return (unsigned)(rnd() % n);
}

/* a varint; now and then overlong (a value padded with continuation bytes, up to 10 in all) */
static void put_varint(struct bytes *b, uint64_t v, int overlong)
{
    unsigned char d[12];
    size_t n = 0;
    do {
        d[n++] = (unsigned char)((v & 0x7f) | 0x80);
        v >>= 7;
    } while (v);
    d[n - 1] &= 0x7f;
    if (overlong) {
        while (n < 10 && overlong--) {
            d[n - 1] |= 0x80;
            d[n++] = 0;
        }
    }
    put(b, d, n);
}

static void put_tag(struct bytes *b, int num, int wire)
{
    put_varint(b, ((uint64_t)num << 3) | (unsigned)wire, pick(200) == 0);
}

static uint64_t edge_varint(void)
{
    static const uint64_t v[] = {0,
                                 1,
                                 2,
                                 3,
                                 127,
                                 128,
                                 150,
                                 300,
                                 0x7fffffff,
                                 0x80000000,
                                 0xfffffffe,
                                 0xffffffff,
                                 0x100000000ULL,
                                 0xffffffff80000000ULL, /* INT32_MIN, sign-extended */
                                 0xfffffffffffffffbULL, /* -5 */
                                 0xffffffffffffffffULL,
                                 0x8000000000000000ULL,
                                 0x7fffffffffffffffULL,
                                 0x100000001ULL};
    switch (pick(4)) {
    case 0:
        return rnd();
    case 1:
        return pick(4);
    default:
        return v[pick(sizeof(v) / sizeof(v[0]))];
    }
}

static uint32_t edge_32(void)
{
    static const uint32_t v[] = {0,
                                 0x80000000 /* -0.0f */,
                                 0x7fc00000 /* NaN */,
                                 0xffc00001 /* -NaN */,
                                 0x7f800000 /* inf */,
                                 0xff800000 /* -inf */,
                                 0x3fc00000 /* 1.5 */,
                                 0x3dcccccd /* 0.1 */,
                                 0x7f7fffff /* max */,
                                 0x00000001 /* denormal */,
                                 0xffffffff,
                                 0x7fffffff,
                                 1,
                                 0x4b189680 /* 1e7 */};
    return pick(3) ? v[pick(sizeof(v) / sizeof(v[0]))] : (uint32_t)rnd();
}

static uint64_t edge_64(void)
{
    static const uint64_t v[] = {0,
                                 0x8000000000000000ULL, /* -0.0 */
                                 0x7ff8000000000000ULL, /* NaN */
                                 0x7ff0000000000000ULL, /* inf */
                                 0xfff0000000000000ULL, /* -inf */
                                 0x3fb999999999999aULL, /* 0.1 */
                                 0x4058ff5c28f5c28fULL, /* 99.99 */
                                 0x7fefffffffffffffULL, /* max */
                                 0x0000000000000001ULL, /* denormal */
                                 0x430c6bf526340000ULL, /* 1e15 */
                                 0x4341c37937e08000ULL, /* 1e16 */
                                 0xffffffffffffffffULL,
                                 1};
    return pick(3) ? v[pick(sizeof(v) / sizeof(v[0]))] : rnd();
}

static void put_le(struct bytes *b, uint64_t v, int n)
{
    unsigned char d[8];
    for (int i = 0; i < n; i++)
        d[i] = (unsigned char)(v >> (8 * i));
    put(b, d, (size_t)n);
}

static const char *const strings[] = {"",
                                      "a",
                                      "h\xc3\xa9llo",
                                      "\xe6\x97\xa5\xe6\x9c\xac",
                                      "\xf0\x9f\x98\x80",
                                      "q\"\\\n\x01/",
                                      "\xff bad",
                                      "\xed\xa0\x80",
                                      "\xc0\x80",
                                      "\xf4\x90\x80\x80",
                                      "Lisbon",
                                      "tab\there"};

static void gen_message(struct bytes *b, int type, int depth);

static void put_value(struct bytes *b, const struct gfield *f, int depth)
{
    switch (f->kind) {
    case K_VARINT:
        put_varint(b, edge_varint(), pick(30) == 0 ? (int)pick(4) + 1 : 0);
        break;
    case K_I32:
        put_le(b, edge_32(), 4);
        break;
    case K_I64:
        put_le(b, edge_64(), 8);
        break;
    default:
        break;
    }
    (void)depth;
}

static void put_len(struct bytes *b, const struct bytes *inner)
{
    put_varint(b, inner->len, pick(100) == 0);
    put(b, inner->p, inner->len);
}

static void gen_field(struct bytes *b, const struct gfield *f, int depth)
{
    struct bytes in = {0};
    if (pick(60) == 0) { /* a wire type not the field's */
        put_tag(b, f->num, (int)pick(6));
        put_varint(b, 1, 0);
        return;
    }
    switch (f->kind) {
    case K_VARINT:
    case K_I32:
    case K_I64:
        if (f->repeated && pick(2)) {
            unsigned n = pick(5);
            for (unsigned i = 0; i < n; i++)
                put_value(&in, f, depth);
            put_tag(b, f->num, 2);
            put_len(b, &in);
        } else {
            put_tag(b, f->num, f->kind == K_VARINT ? 0 : f->kind == K_I64 ? 1 : 5);
            put_value(b, f, depth);
        }
        break;
    case K_STR: {
        const char *s = strings[pick(sizeof(strings) / sizeof(strings[0]))];
        put_tag(b, f->num, 2);
        put_varint(b, strlen(s), 0);
        put(b, s, strlen(s));
        break;
    }
    case K_BYTES: {
        unsigned n = pick(6);
        for (unsigned i = 0; i < n; i++) {
            unsigned char c = (unsigned char)rnd();
            put(&in, &c, 1);
        }
        put_tag(b, f->num, 2);
        put_len(b, &in);
        break;
    }
    case K_MSG:
    case K_MAP:
        if (depth < 4)
            gen_message(&in, f->sub, depth + 1);
        put_tag(b, f->num, 2);
        put_len(b, &in);
        break;
    }
    free(in.p);
}

static void gen_message(struct bytes *b, int type, int depth)
{
    const struct gtype *t = &types[type];
    unsigned n = pick(depth ? 5 : 12);
    if (type == 9 && pick(8)) /* Q's required id, most of the time */
        gen_field(b, &t->f[0], depth);
    for (unsigned i = 0; i < n; i++) {
        if (pick(80) == 0) { /* a field the type does not have */
            put_tag(b, 99, 0);
            put_varint(b, 7, 0);
            continue;
        }
        gen_field(b, &t->f[pick((unsigned)t->n)], depth);
    }
}

/* ---- the two paths ---- */

struct stats {
    unsigned records, accepted, walked;
};

static void compare(const struct esmd_pb_schema *s, const int64_t *idx, size_t n,
                    const unsigned char *msg, size_t len, size_t max, struct stats *st)
{
    char e1[512] = "", e2[512] = "", e3[512] = "";
    size_t l1 = 0, l2 = 0, l3 = 0;
    char *a = esmd_pb_decode_via(ESMD_PB_DECODE_REFLECTION, s, idx, n, msg, len, max, &l1, e1,
                                 sizeof(e1));
    char *b = esmd_pb_decode_via(ESMD_PB_DECODE_ANY, s, idx, n, msg, len, max, &l2, e2, sizeof(e2));
    char *w =
        esmd_pb_decode_via(ESMD_PB_DECODE_WALK, s, idx, n, msg, len, max, &l3, e3, sizeof(e3));
    st->records++;
    if ((a == NULL) != (b == NULL) || (a && (l1 != l2 || memcmp(a, b, l1) != 0)) ||
        (!a && strcmp(e1, e2) != 0) || (w && (!a || l3 != l1 || memcmp(w, a, l1) != 0))) {
        fprintf(stderr, "paths differ on %zu bytes:", len);
        for (size_t i = 0; i < len; i++)
            fprintf(stderr, " %02x", msg[i]);
        fprintf(stderr, "\nreflection: %s\nany:        %s\nwalk:       %s\n", a ? a : e1,
                b ? b : e2, w ? w : e3);
        fail();
    }
    if (getenv("PBWALK_SHOW"))
        fprintf(stderr, "%s | %s\n", w ? "walk" : "    ", a ? a : e1);
    if (a)
        st->accepted++;
    if (w)
        st->walked++;
    free(a);
    free(b);
    free(w);
}

/* a corrupted copy of msg: truncated, a byte changed, inserted or removed */
static size_t corrupt(const unsigned char *msg, size_t len, unsigned char *out)
{
    if (!len)
        return 0;
    memcpy(out, msg, len);
    size_t at = pick((unsigned)len);
    switch (pick(5)) {
    case 0:
        return at;
    case 1:
        out[at] = (unsigned char)rnd();
        return len;
    case 2:
        out[at] ^= (unsigned char)(1u << pick(8));
        return len;
    case 3:
        memmove(out + at + 1, out + at, len - at);
        out[at] = (unsigned char)(pick(2) ? 0x80 : rnd());
        return len + 1;
    default:
        memmove(out + at, out + at + 1, len - at - 1);
        return len - 1;
    }
}

static struct esmd_pb_schema *schema(const char *text)
{
    char err[256];
    struct esmd_pb_file f = {NULL, text, strlen(text), false};
    struct esmd_pb_schema *s = esmd_pb_schema_new(&f, 1, err, sizeof(err));
    if (!s)
        fprintf(stderr, "%s\n", err);
    assert_non_null(s);
    return s;
}

static void generated(struct esmd_pb_schema *s, int type, int64_t idx, unsigned count,
                      struct stats *valid, struct stats *bad)
{
    unsigned char *c = NULL;
    for (unsigned i = 0; i < count; i++) {
        struct bytes b = {0};
        gen_message(&b, type, 0);
        size_t max = pick(20) ? 1 << 20 : 40; /* now and then past the JSON limit */
        compare(s, &idx, 1, b.p ? b.p : (const unsigned char *)"", b.len, max, valid);
        c = realloc(c, b.len + 2);
        for (int k = 0; k < 3; k++) {
            size_t n = corrupt(b.p, b.len, c);
            compare(s, &idx, 1, c, n, 1 << 20, bad);
        }
        free(b.p);
    }
    free(c);
}

/* Prints what a generated run gave, and checks that the walker took most valid records (the rest
 * have a string not UTF-8, an undeclared field, data past the JSON limit, ...). */
static void walked_most(const char *what, const struct stats *v, const struct stats *b)
{
    fprintf(stderr, "%s: %u records, %u accepted, %u by the walker; corrupted: %u, %u, %u\n", what,
            v->records, v->accepted, v->walked, b->records, b->accepted, b->walked);
    assert_true(v->walked * 10 >= v->accepted * 9);
}

static void test_generated_proto3(void **state)
{
    (void)state;
    struct esmd_pb_schema *s = schema(PB_WALK_PROTO3);
    struct stats v = {0}, b = {0};
    generated(s, 1, 1, 20000, &v, &b);
    generated(s, 0, 0, 2000, &v, &b);
    walked_most("proto3", &v, &b);
    assert_true(v.accepted * 4 >= v.records);
    assert_true(b.walked > 0);
    esmd_pb_schema_free(s);
}

static void test_generated_proto2(void **state)
{
    (void)state;
    struct esmd_pb_schema *s = schema(PB_WALK_PROTO2);
    struct stats v = {0}, b = {0};
    generated(s, 9, 0, 10000, &v, &b);
    generated(s, 10, 1, 10000, &v, &b);
    walked_most("proto2", &v, &b);
    assert_true(v.accepted * 10 >= v.records);
    esmd_pb_schema_free(s);
}

/* Hand-made records for what the generator reaches only by chance. */
static void test_edges(void **state)
{
    (void)state;
    struct esmd_pb_schema *s3 = schema(PB_WALK_PROTO3), *s2 = schema(PB_WALK_PROTO2);
    struct stats st = {0};
    int64_t all = 1, inner = 0, wkt = 2, q = 0, opt = 1;
#define R(s, idx, ...)                                                                             \
    do {                                                                                           \
        static const unsigned char m[] = {__VA_ARGS__};                                            \
        compare(s, &idx, 1, m, sizeof(m), 1 << 20, &st);                                           \
    } while (0)
    R(s3, all, 0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01); /* i32 -1 */
    R(s3, all, 0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f); /* 10th byte */
    R(s3, all, 0x08, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01); /* 11 */
    R(s3, all, 0x08, 0x80, 0x80, 0x80, 0x80, 0x10); /* 2^32: int32 0 */
    R(s3, all, 0x68, 0x80, 0x80, 0x80, 0x80, 0x10); /* bool of 2^32 */
    R(s3, all, 0x28, 0xff, 0xff, 0xff, 0xff, 0x0f); /* sint32 extreme */
    R(s3, all, 0x30, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01); /* sint64 */
    R(s3, all, 0x5d, 0x00, 0x00, 0x00, 0x80);                                     /* float -0.0 */
    R(s3, all, 0x61, 0, 0, 0, 0, 0, 0, 0, 0x80);                                  /* double -0.0 */
    R(s3, all, 0x61, 0, 0, 0, 0, 0, 0, 0xf8, 0x7f);                               /* NaN */
    R(s3, all, 0x7a, 0x00);                                                       /* empty bytes */
    R(s3, all, 0x92, 0x01, 0x00);                                                 /* empty packed */
    R(s3, all, 0x90, 0x01, 0x01, 0x92, 0x01, 0x02, 0x02, 0x03, 0x90, 0x01, 0x04); /* mixed */
    R(s3, all, 0x8a, 0x01, 0x02, 0x08, 0x01, 0x8a, 0x01, 0x02, 0x10, 0x02);       /* merged inner */
    R(s3, all, 0x8a, 0x01, 0x02, 0x08, 0x01, 0x08, 0x05, 0x8a, 0x01, 0x02, 0x08, 0x02);
    /* duplicate map keys, entries without key or value */
    R(s3, all, 0xa2, 0x02, 0x05, 0x0a, 0x01, 'k', 0x10, 0x01, 0xa2, 0x02, 0x05, 0x0a, 0x01, 'k',
      0x10, 0x02);
    R(s3, all, 0xa2, 0x02, 0x00, 0xaa, 0x02, 0x00, 0xb2, 0x02, 0x00, 0xba, 0x02, 0x00);
    R(s3, all, 0xb2, 0x02, 0x02, 0x08, 0x01, 0xd2, 0x02, 0x03, 0x0a, 0x01, 'x');
    /* oneof: member after member, a message member cleared, merged */
    R(s3, all, 0xda, 0x02, 0x01, 'a', 0xe8, 0x02, 0x07);
    R(s3, all, 0xe2, 0x02, 0x02, 0x08, 0x01, 0xe8, 0x02, 0x07);
    R(s3, all, 0xe2, 0x02, 0x02, 0x08, 0x01, 0xe2, 0x02, 0x02, 0x10, 0x01);
    R(s3, all, 0xe8, 0x02, 0x00); /* oneof member at its default: written */
    R(s3, all, 0xf0, 0x02, 0x00); /* optional at its default: written */
    R(s3, all, 0x80, 0x01, 0xfb, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x01); /* NEG */
    R(s3, all, 0x80, 0x01, 0x09);                         /* undeclared open enum */
    R(s3, all, 0x88, 0x01, 0x00);                         /* inner, wrong wire type */
    R(s3, all, 0x0b, 0x0c);                               /* a group */
    R(s3, all, 0x0c);                                     /* an end group */
    R(s3, all, 0x00);                                     /* field 0 */
    R(s3, all, 0x88, 0x00, 0x01);                         /* overlong tag */
    R(s3, all, 0x72, 0x81, 0x00, 'a');                    /* overlong length */
    R(s3, all, 0x72, 0x05, 'a');                          /* length past the end */
    R(s3, all, 0x72, 0x02, 0xc3, 0xa9);                   /* é */
    R(s3, all, 0x72, 0x01, 0xff);                         /* not UTF-8 */
    R(s3, all, 0xfa, 0x01, 0x01, 0xff, 0xfa, 0x01, 0x00); /* ... in a replaced value */
    R(s3, wkt, 0x08, 0x01, 0x12, 0x02, 0x08, 0x05);
    R(s3, inner, 0x1a, 0x00, 0x08, 0x00);
    R(s2, q, 0x08, 0x00);                                     /* required at its default */
    R(s2, q, 0x10, 0x01);                                     /* required missing */
    R(s2, q, 0x08, 0x01, 0x18, 0x07);                         /* undeclared closed enum */
    R(s2, q, 0x08, 0x01, 0x2a, 0x02, 0x01, 0x07);             /* ... packed */
    R(s2, q, 0x08, 0x01, 0x3a, 0x04, 0x0a, 0x00, 0x10, 0x09); /* ... as a map value */
    R(s2, q, 0x08, 0x01, 0x3a, 0x00);                         /* entry: the enum's first value */
    R(s2, q, 0x08, 0x01, 0x12, 0x01, 0xff);                   /* proto2 string not UTF-8 */
    R(s2, q, 0x08, 0x01, 0x18, 0x03, 0x18, 0x01);             /* last value wins */
    R(s2, opt, 0x12, 0x00);                                   /* nested required missing */
    R(s2, opt, 0x12, 0x02, 0x08, 0x01, 0x1a, 0x00);
#undef R
    /* nesting: Inner.kids 70 deep, and 60 */
    for (int depth = 60; depth <= 70; depth += 10) {
        struct bytes b = {0};
        for (int i = 0; i < depth; i++) {
            struct bytes outer = {0};
            put_tag(&outer, 3, 2);
            put_varint(&outer, b.len, 0);
            put(&outer, b.p, b.len);
            free(b.p);
            b = outer;
        }
        compare(s3, &inner, 1, b.p, b.len, 1 << 20, &st);
        free(b.p);
    }
    /* the type with a Timestamp is left to libprotobuf */
    static const unsigned char ts[] = {0x08, 0x01};
    char err[256];
    size_t len;
    assert_null(esmd_pb_decode_via(ESMD_PB_DECODE_WALK, s3, &wkt, 1, ts, sizeof(ts), 1 << 20, &len,
                                   err, sizeof(err)));
    char *json = esmd_pb_decode(s3, &wkt, 1, ts, sizeof(ts), 1 << 20, &len, err, sizeof(err));
    assert_non_null(json);
    assert_string_equal(json, "{\"a\":1}");
    free(json);
    /* ... and the others are the walker's */
    static const unsigned char one[] = {0x08, 0x96, 0x01, 0x90, 0x03, 0x01};
    json = esmd_pb_decode_via(ESMD_PB_DECODE_WALK, s3, &all, 1, one, sizeof(one), 1 << 20, &len,
                              err, sizeof(err));
    assert_non_null(json);
    assert_string_equal(json, "{\"i32\":150,\"snakeCaseName\":1}");
    free(json);
    esmd_pb_schema_free(s3);
    esmd_pb_schema_free(s2);
}

/* A schema chaining 20,000 message types (M0 has an M1, which has an M2, ...): the schema's
 * preparation walked the chain by recursion and overflowed the stack. Now it is prepared, and a
 * record nested a few levels decodes the same both ways. */
static void test_long_type_chain(void **state)
{
    (void)state;
    enum { CHAIN = 20000 };
    size_t cap = (size_t)CHAIN * 48 + 256, len = 0;
    char *text = malloc(cap);
    assert_non_null(text);
    len += (size_t)snprintf(text + len, cap - len, "syntax = \"proto3\";\n");
    for (int i = 0; i < CHAIN; i++)
        len += (size_t)snprintf(text + len, cap - len, "message M%d { M%d f = 1; }\n", i, i + 1);
    len += (size_t)snprintf(text + len, cap - len, "message M%d { int32 x = 1; }\n", CHAIN);
    struct esmd_pb_schema *s = schema(text);
    free(text);
    /* M0{f: M1{f: M2{f: M3{}}}} */
    static const unsigned char rec[] = {0x0a, 0x04, 0x0a, 0x02, 0x0a, 0x00};
    int64_t idx = 0;
    struct stats st = {0};
    compare(s, &idx, 1, rec, sizeof(rec), 1 << 20, &st);
    assert_int_equal(st.accepted, 1);
    assert_int_equal(st.walked, 1);
    char err[256];
    size_t n;
    char *json = esmd_pb_decode(s, &idx, 1, rec, sizeof(rec), 1 << 20, &n, err, sizeof(err));
    assert_non_null(json);
    assert_string_equal(json, "{\"f\":{\"f\":{\"f\":{}}}}");
    free(json);
    esmd_pb_schema_free(s);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_edges),
        cmocka_unit_test(test_generated_proto3),
        cmocka_unit_test(test_generated_proto2),
        cmocka_unit_test(test_long_type_chain),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
