/* Protobuf record decoding cost: the wire walker against libprotobuf's parse and reflection
 * (connectors/kafka/kafka_protobuf.cc), on the orders tests/bench/schema_path_bench.py sends.
 *
 *   pb_decode_bench [--records N] [--seconds S]
 *
 * N (default 10000) distinct orders like schema_path_bench's (a customer, 3-5 lines with prices in
 * cents, the total rounded to cents, an enum, a note on about one in three) are written as
 * proto3 wire data of its shop.Order. Each pass decodes
 * them all to JSON one way; passes repeat until S seconds (default 2) of thread CPU time each,
 * the two ways in turn. Prints µs of CPU a record for both and their ratio, after checking they
 * write the same JSON. See tests/bench/README.md. */
#include "../../connectors/kafka/kafka_protobuf.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static const char proto[] =
    "syntax = \"proto3\";\npackage shop;\n"
    "message Order { int64 id = 1; int64 created_at = 2; Status status = 3; Customer customer = "
    "4;\n"
    "  repeated Line lines = 5; double total = 6; string currency = 7; string channel = 8;\n"
    "  optional string note = 9; }\n"
    "message Customer { int64 id = 1; string name = 2; string email = 3; string street = 4;\n"
    "  string city = 5; }\n"
    "message Line { string sku = 1; int32 qty = 2; double price = 3; }\n"
    "enum Status { NEW = 0; PAID = 1; SHIPPED = 2; CANCELLED = 3; }\n";

struct w {
    unsigned char *p;
    size_t len;
};

static void byte(struct w *b, unsigned c)
{
    b->p[b->len++] = (unsigned char)c;
}

static void varint(struct w *b, unsigned long long v)
{
    while (v >= 0x80) {
        byte(b, (unsigned)(v & 0x7f) | 0x80);
        v >>= 7;
    }
    byte(b, (unsigned)v);
}

static void str(struct w *b, int num, const char *s)
{
    varint(b, ((unsigned)num << 3) | 2);
    varint(b, strlen(s));
    memcpy(b->p + b->len, s, strlen(s));
    b->len += strlen(s);
}

static void dbl(struct w *b, int num, double d)
{
    varint(b, ((unsigned)num << 3) | 1);
    memcpy(b->p + b->len, &d, 8); /* little-endian machines */
    b->len += 8;
}

static void sub(struct w *b, int num, const struct w *s)
{
    varint(b, ((unsigned)num << 3) | 2);
    varint(b, s->len);
    memcpy(b->p + b->len, s->p, s->len);
    b->len += s->len;
}

static double cpu_now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

int main(int argc, char **argv)
{
    size_t n = 10000;
    double seconds = 2;
    for (int i = 1; i + 1 < argc; i += 2) {
        if (!strcmp(argv[i], "--records"))
            n = (size_t)atol(argv[i + 1]);
        else if (!strcmp(argv[i], "--seconds"))
            seconds = atof(argv[i + 1]);
    }
    char err[256];
    struct esmd_pb_file f = {NULL, proto, strlen(proto), false};
    struct esmd_pb_schema *s = esmd_pb_schema_new(&f, 1, err, sizeof(err));
    if (!s) {
        fprintf(stderr, "%s\n", err);
        return 1;
    }
    static const char *const cities[] = {"Lisbon", "Porto", "Braga", "Coimbra", "Faro", "Aveiro"};
    static const char *const names[] = {"Ana Silva", "Jo\xc3\xa3o Costa", "Maria Santos",
                                        "Pedro Oliveira", "Rita Ferreira"};
    static const char *const channels[] = {"web", "mobile-app", "store", "phone"};
    struct w *recs = calloc(n, sizeof(*recs));
    size_t bytes = 0;
    for (size_t i = 0; i < n; i++) {
        struct w *r = &recs[i], c = {malloc(256), 0}, l = {malloc(64), 0};
        char name[64], email[64], street[64], sku[32];
        r->p = malloc(1024);
        snprintf(name, sizeof(name), "%s", names[i % 5]);
        snprintf(email, sizeof(email), "customer%zu@example.com", i % 977);
        snprintf(street, sizeof(street), "Rua das Flores %zu", 1 + i % 400);
        varint(r, 1 << 3);
        varint(r, 100000 + i);
        varint(r, 2 << 3);
        varint(r, 1700000000000ULL + i * 1000);
        if (i % 4) {
            varint(r, 3 << 3);
            varint(r, i % 4);
        }
        varint(&c, 1 << 3);
        varint(&c, 1 + (i * 7919) % 1000000);
        str(&c, 2, name);
        str(&c, 3, email);
        str(&c, 4, street);
        str(&c, 5, cities[i % 6]);
        sub(r, 4, &c);
        double total = 0;
        for (size_t k = 0; k < 3 + i % 3; k++) {
            l.len = 0;
            snprintf(sku, sizeof(sku), "SKU-%05zu", (i * 7 + k * 131) % 100000);
            str(&l, 1, sku);
            varint(&l, 2 << 3);
            varint(&l, 1 + (i + k) % 5);
            double price = (double)(100 + (i * 31 + k * 17) % 19900) / 100;
            dbl(&l, 3, price);
            total += price * (double)(1 + (i + k) % 5);
            sub(r, 5, &l);
        }
        dbl(r, 6, (double)llround(total * 100) / 100);
        str(r, 7, "EUR");
        str(r, 8, channels[i % 4]);
        if (i % 3 == 0)
            str(r, 9, "leave at the door");
        bytes += r->len;
        free(c.p);
        free(l.p);
    }
    /* the same JSON both ways */
    for (size_t i = 0; i < n; i++) {
        size_t l1, l2;
        char *a = esmd_pb_decode_via(ESMD_PB_DECODE_REFLECTION, s, NULL, 0, recs[i].p, recs[i].len,
                                     1 << 20, &l1, err, sizeof(err));
        char *b = esmd_pb_decode_via(ESMD_PB_DECODE_WALK, s, NULL, 0, recs[i].p, recs[i].len,
                                     1 << 20, &l2, err, sizeof(err));
        if (!a || !b || l1 != l2 || memcmp(a, b, l1)) {
            fprintf(stderr, "record %zu: the two ways differ\n", i);
            return 1;
        }
        free(a);
        free(b);
    }
    static const enum esmd_pb_way ways[] = {ESMD_PB_DECODE_REFLECTION, ESMD_PB_DECODE_ANY};
    double cpu[2] = {0, 0};
    size_t done[2] = {0, 0};
    while (cpu[0] < seconds || cpu[1] < seconds) {
        for (int w = 0; w < 2; w++) {
            double t0 = cpu_now();
            for (size_t i = 0; i < n; i++) {
                size_t len;
                char *j = esmd_pb_decode_via(ways[w], s, NULL, 0, recs[i].p, recs[i].len, 1 << 20,
                                             &len, err, sizeof(err));
                if (!j)
                    return 1;
                free(j);
            }
            cpu[w] += cpu_now() - t0;
            done[w] += n;
        }
    }
    double us[2] = {1e6 * cpu[0] / (double)done[0], 1e6 * cpu[1] / (double)done[1]};
    printf("%zu orders, %.0f B on average\n", n, (double)bytes / (double)n);
    printf("reflection %.2f us/record, wire walker %.2f us/record, %.1fx\n", us[0], us[1],
           us[0] / us[1]);
    for (size_t i = 0; i < n; i++)
        free(recs[i].p);
    free(recs);
    esmd_pb_schema_free(s);
    return 0;
}
