/* srdecode: esmd's schema registry decoder (connectors/kafka/kafka_schema.c) from the command
 * line, for tests/integration/test_schema_decode.py, which checks it against records written by
 * the real serializers of the confluent-kafka Python client.
 *
 *   srdecode AVRO|JSON SCHEMA_FILE < RECORDS
 *
 * RECORDS: one record a line, as hex (Confluent-framed: magic byte, schema id, data). Prints one
 * line a record: "OK <id> <json>" or "ERR <message>". Exit status 0, or 2 on bad usage. */
#include "../../connectors/kafka/kafka_schema.h"

#include "esmd/common.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

int main(int argc, char **argv)
{
    if (argc != 3 || (strcmp(argv[1], "AVRO") != 0 && strcmp(argv[1], "JSON") != 0)) {
        fprintf(stderr, "usage: srdecode AVRO|JSON SCHEMA_FILE < hex records, one a line\n");
        return 2;
    }
    FILE *f = fopen(argv[2], "rb");
    if (!f) {
        perror(argv[2]);
        return 2;
    }
    static char text[1 << 20];
    size_t tlen = fread(text, 1, sizeof(text), f);
    fclose(f);
    char err[512];
    enum esmd_sr_format fmt = strcmp(argv[1], "AVRO") == 0 ? ESMD_SR_AVRO : ESMD_SR_JSON;
    struct esmd_sr_schema *s = esmd_sr_schema_new(fmt, text, tlen, err, sizeof(err));
    if (!s) {
        fprintf(stderr, "srdecode: %s\n", err);
        return 2;
    }
    static char line[1 << 22];
    static unsigned char rec[1 << 21];
    while (fgets(line, sizeof(line), stdin)) {
        size_t n = 0;
        for (size_t i = 0;
             esmd_hex_digit(line[i]) >= 0 && esmd_hex_digit(line[i + 1]) >= 0 && n < sizeof(rec);
             i += 2)
            rec[n++] = (unsigned char)(esmd_hex_digit(line[i]) * 16 + esmd_hex_digit(line[i + 1]));
        int32_t id;
        const unsigned char *body, *src;
        size_t body_len, src_len;
        if (!esmd_sr_frame(rec, n, &id, &body, &body_len)) {
            printf("ERR not framed\n");
            continue;
        }
        struct esmd_buf out = ESMD_BUF_INIT;
        if (esmd_sr_decode(s, body, body_len, &out, &src, &src_len, err, sizeof(err)))
            printf("OK %d %s\n", (int)id, esmd_buf_cstr(&out));
        else
            printf("ERR %s\n", err);
        esmd_buf_free(&out);
    }
    esmd_sr_schema_free(s);
    return 0;
}
