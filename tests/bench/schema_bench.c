/* Schema registry decoding cost: the Kafka connector's per-record work for Avro records of about
 * 200 B decoded to JSON, against the same data arriving as plain JSON, in the same run.
 *
 *   schema_bench [--records N] [--seconds S]
 *
 * N (default 10000) distinct records of an order schema are generated (varying ids, names, 1-3
 * lines) and Avro-encoded with Confluent's framing; the plain-JSON twin of each record is its
 * decoded JSON, so both sides carry the same data. One pass over the records does what the
 * connector does per record in the two cases:
 *
 *   json   the record's exact size, its filter document, its event JSON (kafka_encode.c)
 *   avro   the framing, the Avro walk into JSON (kafka_schema.c), then the same three, with the
 *          decoded value and valueSchemaMetadata
 *
 * Passes repeat until S seconds (default 2) of thread CPU time each; prints records/s of CPU
 * for both and their ratio. The schema is parsed once, as the registry cache does; what this
 * leaves out (librdkafka, batching, HTTP) costs the same on both sides, so the whole path's
 * ratio is closer to 1 than this one. See tests/bench/README.md. */
#include "../../connectors/kafka/kafka_private.h"
#include "../../connectors/kafka/kafka_schema.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static const char schema_text[] =
    "{\"type\":\"record\",\"name\":\"Order\",\"fields\":["
    "{\"name\":\"order_id\",\"type\":\"long\"},{\"name\":\"customer\",\"type\":\"string\"},"
    "{\"name\":\"email\",\"type\":\"string\"},"
    "{\"name\":\"status\",\"type\":{\"type\":\"enum\",\"name\":\"S\",\"symbols\":[\"NEW\","
    "\"PAID\",\"SHIPPED\"]}},"
    "{\"name\":\"lines\",\"type\":{\"type\":\"array\",\"items\":{\"type\":\"record\",\"name\":"
    "\"Line\",\"fields\":[{\"name\":\"sku\",\"type\":\"string\"},{\"name\":\"qty\",\"type\":"
    "\"int\"},{\"name\":\"price\",\"type\":\"double\"}]}}},"
    "{\"name\":\"note\",\"type\":[\"null\",\"string\"]},"
    "{\"name\":\"created\",\"type\":\"long\"}]}";

static double thread_cpu(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

static void put_long(struct esmd_buf *b, int64_t v)
{
    uint64_t z = ((uint64_t)v << 1) ^ (uint64_t)(v >> 63);
    do {
        unsigned char c = (unsigned char)(z & 0x7f);
        z >>= 7;
        esmd_buf_putc(b, (char)(z ? c | 0x80 : c));
    } while (z);
}

static void put_str(struct esmd_buf *b, const char *s)
{
    put_long(b, (int64_t)strlen(s));
    esmd_buf_puts(b, s);
}

static void put_double(struct esmd_buf *b, double d)
{
    unsigned char raw[8];
    memcpy(raw, &d, 8); /* little-endian host, as Avro */
    esmd_buf_append(b, raw, 8);
}

struct rec {
    char *avro; /* framed */
    size_t avro_len;
    char *json;
    size_t json_len;
};

static const char *names[] = {"Ada Lovelace", "Grace Hopper", "Alan Turing", "Edsger Dijkstra"};

static void make(struct rec *r, int i, const struct esmd_sr_schema *s)
{
    struct esmd_buf b = ESMD_BUF_INIT;
    esmd_buf_append(&b, "\0\0\0\0\1", 5); /* magic byte, schema id 1 */
    put_long(&b, 100000 + i);
    put_str(&b, names[i % 4]);
    char email[64];
    snprintf(email, sizeof(email), "customer%d@example.com", i);
    put_str(&b, email);
    put_long(&b, i % 3);
    int lines = 1 + i % 3;
    put_long(&b, lines);
    for (int l = 0; l < lines; l++) {
        char sku[32];
        snprintf(sku, sizeof(sku), "SKU-%05d", (i * 7 + l) % 100000);
        put_str(&b, sku);
        put_long(&b, 1 + l);
        put_double(&b, 9.99 + l);
    }
    put_long(&b, 0);
    if (i % 2) {
        put_long(&b, 1);
        put_str(&b, "leave at the door");
    } else {
        put_long(&b, 0);
    }
    put_long(&b, 1765100000000LL + i);
    r->avro = esmd_buf_steal(&b, &r->avro_len);
    struct esmd_buf out = ESMD_BUF_INIT;
    const unsigned char *src;
    size_t src_len;
    char err[256];
    if (!esmd_sr_decode(s, (const unsigned char *)r->avro + 5, r->avro_len - 5, &out, &src,
                        &src_len, err, sizeof(err))) {
        fprintf(stderr, "schema_bench: record %d: %s\n", i, err);
        exit(1);
    }
    r->json = esmd_buf_steal(&out, &r->json_len);
}

/* What the connector does per record once it has the value to deliver; the filter document
 * only when the mapping has filters. */
static size_t connector_work(struct esmd_kafka_view *v, struct esmd_buf *doc, struct esmd_buf *ev,
                             bool filters)
{
    size_t size = esmd_kafka_record_size(v);
    if (filters) {
        esmd_buf_reset(doc);
        esmd_kafka_filter_doc(v, doc);
        size += doc->len;
    }
    esmd_buf_reset(ev);
    esmd_kafka_record_write(ev, v);
    return size;
}

int main(int argc, char **argv)
{
    int n = 10000;
    double seconds = 2.0;
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--records") && i + 1 < argc)
            n = atoi(argv[++i]);
        else if (!strcmp(argv[i], "--seconds") && i + 1 < argc)
            seconds = atof(argv[++i]);
        else {
            fprintf(stderr, "usage: schema_bench [--records N] [--seconds S]\n");
            return 2;
        }
    }
    char err[256];
    struct esmd_sr_schema *s =
        esmd_sr_schema_new(ESMD_SR_AVRO, schema_text, strlen(schema_text), err, sizeof(err));
    if (!s) {
        fprintf(stderr, "schema_bench: %s\n", err);
        return 1;
    }
    struct rec *recs = calloc((size_t)n, sizeof(*recs));
    size_t avro_bytes = 0, json_bytes = 0;
    for (int i = 0; i < n; i++) {
        make(&recs[i], i, s);
        avro_bytes += recs[i].avro_len;
        json_bytes += recs[i].json_len;
    }
    struct esmd_buf doc = ESMD_BUF_INIT, ev = ESMD_BUF_INIT, dec = ESMD_BUF_INIT;
    struct esmd_kafka_view v = {.topic = "orders",
                                .partition = 3,
                                .timestamp = 1765100000000LL,
                                .tstype = RD_KAFKA_TIMESTAMP_CREATE_TIME,
                                .key = "k",
                                .key_len = 1};
    volatile size_t sink = 0;
    printf("records=%d avro_bytes/record=%.0f json_bytes/record=%.0f\n", n, (double)avro_bytes / n,
           (double)json_bytes / n);
    for (int filters = 0; filters < 2; filters++) {
        double rate[2];
        for (int mode = 0; mode < 2; mode++) {
            long done = 0;
            double t0 = thread_cpu(), t;
            do {
                for (int i = 0; i < n; i++, done++) {
                    v.offset = done;
                    if (mode == 0) {
                        v.value = recs[i].json;
                        v.value_len = recs[i].json_len;
                        v.value_format = NULL;
                        v.value_is_json = false;
                    } else {
                        int32_t id;
                        const unsigned char *body, *src;
                        size_t body_len, src_len;
                        if (!esmd_sr_frame(recs[i].avro, recs[i].avro_len, &id, &body, &body_len))
                            abort();
                        esmd_buf_reset(&dec);
                        if (!esmd_sr_decode(s, body, body_len, &dec, &src, &src_len, err,
                                            sizeof(err)))
                            abort();
                        v.value = dec.data;
                        v.value_len = dec.len;
                        v.value_format = "AVRO";
                        v.value_schema_id = id;
                        v.value_is_json = true; /* as kafka.c gives its filter document */
                    }
                    sink += connector_work(&v, &doc, &ev, filters);
                }
                t = thread_cpu() - t0;
            } while (t < seconds);
            rate[mode] = (double)done / t;
        }
        printf("%s: json records/s (CPU)=%.0f avro records/s (CPU)=%.0f avro/json=%.2f\n",
               filters ? "with filters" : "no filters", rate[0], rate[1], rate[1] / rate[0]);
    }
    for (int i = 0; i < n; i++) {
        free(recs[i].avro);
        free(recs[i].json);
    }
    free(recs);
    esmd_buf_free(&doc);
    esmd_buf_free(&ev);
    esmd_buf_free(&dec);
    esmd_sr_schema_free(s);
    return sink == 0;
}
