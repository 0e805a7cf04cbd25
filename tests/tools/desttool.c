/* desttool: drives the destinations (src/outbox.c) outside a mapping, for
 * tests/integration/test_destinations.py.
 *
 *   desttool run -c CONFIG [-i INSTANCE] [--send URI]... [--count N] [--key PREFIX] [--tag TAG]
 *                [--body TEXT] [--until-empty] [--report FILE] [--timeout S]
 *       Applies the migrations to the config's `postgres`, creates the destinations
 *       (esmd_dests_new), sends N records to each URI, all in the same loop turn (record i is
 *       {"i":i,"tag":TAG} unless --body gives the text; --key: the Kafka key PREFIX<i>), prints
 *       "committed M" (M = N x URIs) once every send is committed, then runs the loop. With
 * --until-empty it prints "delivered" when esmd.outbox has no row left, stops (esmd_dests_stop) and
 * exits 0; otherwise it runs until SIGTERM / SIGINT, then stops the same way. --report FILE is
 * rewritten every 0.1 s with {"ready":bool,"detail":{...},"metrics":"<Prometheus text>"}. Exit 1 on
 * timeout (default 60 s) or a failed send, 2 on bad usage. desttool kafka-dump -b BOOTSTRAP -t
 * TOPIC --count N [--timeout S] Reads every partition of TOPIC from the beginning until N messages
 * and prints one JSON line each: {"partition":P,"offset":O,"key_b64":..|null,"value":"..."}. */
#include "esmd/buf.h"
#include "esmd/config.h"
#include "esmd/destination.h"
#include "esmd/log.h"
#include "esmd/metrics.h"
#include "esmd/pg.h"

#include <curl/curl.h>
#include <ev.h>
#include <getopt.h>
#include <librdkafka/rdkafka.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static _Noreturn void die(int status, const char *fmt, ...) ESMD_PRINTF(2, 3);

#include <stdarg.h>
static _Noreturn void die(int status, const char *fmt, ...)
{
    va_list ap;
    fputs("desttool: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(status);
}

struct opts {
    const char *config;
    const char *instance;
    const char *send[16];
    int nsend;
    long count;
    const char *key;
    const char *tag;
    const char *body;
    bool until_empty;
    const char *report;
    double timeout;
    const char *bootstrap;
    const char *topic;
};

struct run {
    struct opts *o;
    struct ev_loop *loop;
    struct esmd_dests *d;
    PGconn *check;
    long committed, failed;
    bool announced, stopping, delivered;
    int status;
    ev_timer tick, deadline;
    ev_signal sigterm, sigint;
};

static void on_sent(void *ud, bool ok, const char *err)
{
    struct run *r = ud;
    if (ok) {
        r->committed++;
    } else {
        r->failed++;
        fprintf(stderr, "desttool: send failed: %s\n", err ? err : "?");
    }
}

static void on_stopped(void *ud)
{
    struct run *r = ud;
    ev_break(r->loop, EVBREAK_ALL);
}

static void stop(struct run *r, int status)
{
    if (r->stopping)
        return;
    r->stopping = true;
    r->status = status;
    esmd_dests_stop(r->d, on_stopped, r);
}

static void write_report(struct run *r)
{
    struct esmd_buf b = ESMD_BUF_INIT, detail = ESMD_BUF_INIT, metrics = ESMD_BUF_INIT;
    bool ready = esmd_dests_ready(r->d, &detail);
    esmd_metrics_render(&metrics);
    esmd_buf_printf(&b, "{\"ready\":%s,\"detail\":%s,\"metrics\":", ready ? "true" : "false",
                    esmd_buf_cstr(&detail));
    esmd_buf_put_json_string(&b, metrics.data ? metrics.data : "", metrics.len);
    esmd_buf_puts(&b, "}\n");
    char tmp[4096];
    snprintf(tmp, sizeof(tmp), "%s.tmp", r->o->report);
    FILE *f = fopen(tmp, "w");
    if (f) {
        fwrite(b.data, 1, b.len, f);
        fclose(f);
        rename(tmp, r->o->report);
    }
    esmd_buf_free(&b);
    esmd_buf_free(&detail);
    esmd_buf_free(&metrics);
}

static long outbox_rows(struct run *r)
{
    PGresult *res = PQexec(r->check, "SELECT count(*) FROM esmd.outbox");
    long n = -1;
    if (PQresultStatus(res) == PGRES_TUPLES_OK)
        n = atol(PQgetvalue(res, 0, 0));
    else
        fprintf(stderr, "desttool: counting the outbox: %s", PQresultErrorMessage(res));
    PQclear(res);
    return n;
}

static void tick_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct run *r = w->data;
    (void)loop;
    (void)revents;
    if (r->o->report)
        write_report(r);
    if (r->failed > 0 && !r->stopping) {
        stop(r, 1);
        return;
    }
    if (!r->announced && r->committed == r->o->nsend * r->o->count) {
        r->announced = true;
        printf("committed %ld\n", r->committed);
        fflush(stdout);
    }
    if (r->announced && r->o->until_empty && !r->delivered && outbox_rows(r) == 0) {
        r->delivered = true;
        printf("delivered\n");
        fflush(stdout);
        stop(r, 0);
    }
}

static void deadline_cb(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct run *r = w->data;
    (void)loop;
    (void)revents;
    fprintf(stderr, "desttool: timed out after %.0f s (committed %ld)\n", r->o->timeout,
            r->committed);
    if (r->stopping)
        ev_break(r->loop, EVBREAK_ALL);
    stop(r, 1);
}

static void signal_cb(struct ev_loop *loop, ev_signal *w, int revents)
{
    struct run *r = w->data;
    (void)loop;
    (void)revents;
    stop(r, 0);
}

static int cmd_run(struct opts *o)
{
    struct esmd_config_errors errs;
    esmd_config_errors_init(&errs);
    FILE *f = fopen(o->config, "r");
    if (!f)
        die(2, "cannot open %s", o->config);
    struct esmd_buf text = ESMD_BUF_INIT;
    char chunk[4096];
    size_t n;
    while ((n = fread(chunk, 1, sizeof(chunk), f)) > 0)
        esmd_buf_append(&text, chunk, n);
    fclose(f);
    struct esmd_config *cfg = esmd_config_parse_flags(text.data ? text.data : "", text.len,
                                                      o->config, ESMD_CONFIG_ALLOW_UNBUILT, &errs);
    esmd_buf_free(&text);
    if (!cfg) {
        for (size_t i = 0; i < errs.n; i++) {
            char line[1024];
            esmd_config_error_format(&errs.items[i], line, sizeof(line));
            fprintf(stderr, "%s\n", line);
        }
        esmd_config_errors_free(&errs);
        return 2;
    }
    esmd_config_errors_free(&errs);

    char err[1024];
    if (esmd_pg_migrate(cfg->postgres, NULL, err, sizeof(err)) != 0)
        die(1, "migrate: %s", err);

    struct run r = {.o = o, .loop = ev_default_loop(0), .status = 0};
    r.check = PQconnectdb(cfg->postgres);
    if (PQstatus(r.check) != CONNECTION_OK)
        die(1, "connect: %s", PQerrorMessage(r.check));
    r.d = esmd_dests_new(r.loop, cfg, cfg->postgres, o->instance, err, sizeof(err));
    if (!r.d)
        die(1, "esmd_dests_new: %s", err);
    for (long k = 0; k < o->nsend * o->count; k++) {
        long i = k % o->count;
        const char *uri = o->send[k / o->count];
        struct esmd_buf body = ESMD_BUF_INIT;
        char key[256];
        if (o->body) {
            esmd_buf_puts(&body, o->body);
        } else {
            esmd_buf_printf(&body, "{\"i\":%ld,\"tag\":", i);
            esmd_buf_put_json_string(&body, o->tag, strlen(o->tag));
            esmd_buf_putc(&body, '}');
        }
        if (o->key)
            snprintf(key, sizeof(key), "%s%ld", o->key, i);
        int rc = esmd_dests_send(r.d, uri, esmd_buf_cstr(&body), body.len, o->key ? key : NULL,
                                 o->key ? strlen(key) : 0, on_sent, &r);
        esmd_buf_free(&body);
        if (rc != 0)
            die(1, "esmd_dests_send(%s): %d", uri, rc);
    }
    ev_timer_init(&r.tick, tick_cb, 0.05, 0.1);
    r.tick.data = &r;
    ev_timer_start(r.loop, &r.tick);
    ev_timer_init(&r.deadline, deadline_cb, o->timeout, 0.);
    r.deadline.data = &r;
    ev_timer_start(r.loop, &r.deadline);
    ev_signal_init(&r.sigterm, signal_cb, SIGTERM);
    ev_signal_init(&r.sigint, signal_cb, SIGINT);
    r.sigterm.data = r.sigint.data = &r;
    ev_signal_start(r.loop, &r.sigterm);
    ev_signal_start(r.loop, &r.sigint);
    ev_run(r.loop, 0);
    if (o->report)
        write_report(&r);
    ev_timer_stop(r.loop, &r.tick);
    ev_timer_stop(r.loop, &r.deadline);
    ev_signal_stop(r.loop, &r.sigterm);
    ev_signal_stop(r.loop, &r.sigint);
    esmd_dests_free(r.d);
    ev_run(r.loop, EVRUN_NOWAIT);
    PQfinish(r.check);
    esmd_config_free(cfg);
    esmd_metrics_reset();
    return r.status;
}

static int cmd_kafka_dump(struct opts *o)
{
    char errstr[512];
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    if (rd_kafka_conf_set(conf, "bootstrap.servers", o->bootstrap, errstr, sizeof(errstr)) ||
        rd_kafka_conf_set(conf, "group.id", "desttool-dump", errstr, sizeof(errstr)) ||
        rd_kafka_conf_set(conf, "enable.auto.commit", "false", errstr, sizeof(errstr)))
        die(2, "%s", errstr);
    rd_kafka_t *rk = rd_kafka_new(RD_KAFKA_CONSUMER, conf, errstr, sizeof(errstr));
    if (!rk)
        die(1, "%s", errstr);
    rd_kafka_poll_set_consumer(rk);
    const struct rd_kafka_metadata *md = NULL;
    rd_kafka_topic_t *rkt = rd_kafka_topic_new(rk, o->topic, NULL);
    time_t end = time(NULL) + (time_t)o->timeout;
    int nparts = 0;
    while (time(NULL) < end) {
        rd_kafka_resp_err_t err = rd_kafka_metadata(rk, 0, rkt, &md, 5000);
        if (!err && md->topic_cnt == 1 && !md->topics[0].err && md->topics[0].partition_cnt > 0) {
            nparts = md->topics[0].partition_cnt;
            rd_kafka_metadata_destroy(md);
            break;
        }
        if (!err)
            rd_kafka_metadata_destroy(md);
        struct timespec ts = {0, 200 * 1000 * 1000};
        nanosleep(&ts, NULL);
    }
    rd_kafka_topic_destroy(rkt);
    if (nparts == 0)
        die(1, "topic %s has no partitions", o->topic);
    rd_kafka_topic_partition_list_t *list = rd_kafka_topic_partition_list_new(nparts);
    for (int p = 0; p < nparts; p++)
        rd_kafka_topic_partition_list_add(list, o->topic, p)->offset = RD_KAFKA_OFFSET_BEGINNING;
    rd_kafka_assign(rk, list);
    rd_kafka_topic_partition_list_destroy(list);
    long got = 0;
    while (got < o->count && time(NULL) < end) {
        rd_kafka_message_t *rkm = rd_kafka_consumer_poll(rk, 200);
        if (!rkm)
            continue;
        if (rkm->err) {
            rd_kafka_message_destroy(rkm);
            continue;
        }
        struct esmd_buf b = ESMD_BUF_INIT;
        esmd_buf_printf(&b, "{\"partition\":%d,\"offset\":%lld,\"key_b64\":", (int)rkm->partition,
                        (long long)rkm->offset);
        if (rkm->key) {
            esmd_buf_putc(&b, '"');
            esmd_buf_put_base64(&b, rkm->key, rkm->key_len);
            esmd_buf_putc(&b, '"');
        } else {
            esmd_buf_puts(&b, "null");
        }
        esmd_buf_puts(&b, ",\"value\":");
        esmd_buf_put_json_string(&b, rkm->payload ? rkm->payload : "", rkm->payload ? rkm->len : 0);
        esmd_buf_puts(&b, "}\n");
        fwrite(b.data, 1, b.len, stdout);
        esmd_buf_free(&b);
        rd_kafka_message_destroy(rkm);
        got++;
    }
    fflush(stdout);
    rd_kafka_consumer_close(rk);
    rd_kafka_destroy(rk);
    if (got < o->count)
        die(1, "read %ld of %ld messages", got, o->count);
    return 0;
}

static _Noreturn void usage(int status)
{
    fputs("usage: desttool run -c CONFIG [-i INSTANCE] [--send URI] [--count N] [--key PREFIX]\n"
          "                    [--tag TAG] [--body TEXT] [--until-empty] [--report FILE]\n"
          "                    [--timeout S]\n"
          "       desttool kafka-dump -b BOOTSTRAP -t TOPIC --count N [--timeout S]\n",
          status ? stderr : stdout);
    exit(status);
}

int main(int argc, char **argv)
{
    curl_global_init(CURL_GLOBAL_DEFAULT);
    signal(SIGPIPE, SIG_IGN);
    if (argc < 2)
        usage(2);
    const char *cmd = argv[1];
    struct opts o = {.count = 1, .tag = "desttool", .timeout = 60, .instance = "desttool"};
    static const struct option longopts[] = {
        {"config", required_argument, NULL, 'c'},
        {"instance", required_argument, NULL, 'i'},
        {"send", required_argument, NULL, 's'},
        {"count", required_argument, NULL, 'n'},
        {"key", required_argument, NULL, 'k'},
        {"tag", required_argument, NULL, 'T'},
        {"body", required_argument, NULL, 'B'},
        {"until-empty", no_argument, NULL, 'e'},
        {"report", required_argument, NULL, 'r'},
        {"timeout", required_argument, NULL, 'x'},
        {"bootstrap", required_argument, NULL, 'b'},
        {"topic", required_argument, NULL, 't'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    int c;
    optind = 2;
    while ((c = getopt_long(argc, argv, "c:i:s:n:k:T:B:er:x:b:t:h", longopts, NULL)) != -1) {
        switch (c) {
        case 'c':
            o.config = optarg;
            break;
        case 'i':
            o.instance = optarg;
            break;
        case 's':
            if (o.nsend == (int)ESMD_ARRAY_LEN(o.send))
                die(2, "at most %d --send", (int)ESMD_ARRAY_LEN(o.send));
            o.send[o.nsend++] = optarg;
            break;
        case 'n':
            o.count = atol(optarg);
            break;
        case 'k':
            o.key = optarg;
            break;
        case 'T':
            o.tag = optarg;
            break;
        case 'B':
            o.body = optarg;
            break;
        case 'e':
            o.until_empty = true;
            break;
        case 'r':
            o.report = optarg;
            break;
        case 'x':
            o.timeout = atof(optarg);
            break;
        case 'b':
            o.bootstrap = optarg;
            break;
        case 't':
            o.topic = optarg;
            break;
        case 'h':
            usage(0);
        default:
            usage(2);
        }
    }
    const char *lvl = getenv("ESMD_LOG_LEVEL");
    enum esmd_log_level level;
    if (lvl && esmd_log_parse_level(lvl, &level) == 0)
        esmd_log_set_level(level);
    int rc;
    if (strcmp(cmd, "run") == 0) {
        if (!o.config)
            usage(2);
        rc = cmd_run(&o);
    } else if (strcmp(cmd, "kafka-dump") == 0) {
        if (!o.bootstrap || !o.topic)
            usage(2);
        rc = cmd_kafka_dump(&o);
    } else {
        usage(2);
    }
    curl_global_cleanup();
    return rc;
}
