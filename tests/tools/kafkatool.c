/* kafkatool: the Kafka side of the integration tests and benchmarks (tests/integration fixtures
 * and tests/bench drive exactly this interface; change it only together with them).
 *
 *   kafkatool mock [--brokers N] [--topic NAME:PARTITIONS]...
 *       Starts a librdkafka mock cluster (N brokers, default 3) on 127.0.0.1, creates the topics,
 *       prints the bootstrap servers as one line, then serves until SIGTERM/SIGINT or stdin EOF.
 *       Commands on stdin, one a line, each answered with one line ("ok", "unsupported" or
 *       "error <reason>"):
 *         create TOPIC PARTITIONS     create a topic
 *         fail-commit N [ERR]         the next N OffsetCommit requests fail with ERR (a numeric
 *                                     Kafka error code; default 7 = REQUEST_TIMED_OUT)
 *         broker-down ID | broker-up ID
 *         bootstraps                  answers the bootstrap servers again
 *   kafkatool produce -b BOOTSTRAP -t TOPIC
 *       JSON lines on stdin: {"partition":int,"key":str|null,"value":str|null,"value_b64":str,
 *       "headers":[[name,str|null],...],"timestamp":ms}, all optional. Prints "produced N".
 *   kafkatool produce -b B -t T --count N [--size BYTES] [--partitions P] [--keyed]
 *       Record i has value {"i":i,"pad":"xx..."} of BYTES bytes (default 100; longer only when the
 *       index does not fit), partition i % P (P defaults to the topic's partition count) and,
 *       with --keyed, key "k<i>". Prints "produced N".
 *   kafkatool create-topic -b B -t TOPIC --partitions P [--config KEY=VALUE]...
 *       Creates the topic on a real cluster (admin CreateTopics, replication factor 1, the
 *       topic configs given) and waits until the metadata shows its P partitions with leaders
 *       and each leader answers for its partition (ListOffsets).
 *       A topic that already exists with P partitions is fine; with another count it is an error.
 *   kafkatool add-partitions -b B -t TOPIC --partitions TOTAL
 *       Grows the topic to TOTAL partitions (admin CreatePartitions) and waits until the
 *       metadata shows them and their leaders answer. A topic that already has TOTAL partitions
 *       is fine.
 *   kafkatool committed -b B -g GROUP -t TOPIC [--partitions P]
 *       Prints {"0":offset,...}: the group's committed offsets, -1 when none. Does not join.
 *       Retries for up to 30 s while the group coordinator is not ready (a fresh broker answers
 *       NOT_COORDINATOR, COORDINATOR_LOAD_IN_PROGRESS or COORDINATOR_NOT_AVAILABLE at first).
 *   kafkatool watermarks -b B -t TOPIC
 *       Prints {"0":[low,high],...}.
 *   kafkatool consume-rate -b B -t TOPIC --count N [--group G] [--timeout S]
 *       Reads from the beginning of every partition until N records, prints
 *       "consumed N records in S s = R records/s" (first record to N-th).
 *
 * Every command but mock takes -X KEY=VALUE (repeatable): a librdkafka property for its client,
 * set after kafkatool's own (so it may override them), e.g. -X security.protocol=SASL_PLAINTEXT.
 *
 * Exit status: 0 on success, 1 when Kafka fails (delivery, timeout), 2 on bad usage or input. */
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/signalfd.h>
#include <time.h>
#include <unistd.h>

#include <cjson/cJSON.h>
#include <librdkafka/rdkafka.h>
#include <librdkafka/rdkafka_mock.h>

#include "esmd/buf.h"
#include "esmd/common.h"

/* Kafka protocol ApiKey of OffsetCommit (rdkafka_protocol.h is not installed). */
#define KT_APIKEY_OFFSET_COMMIT 8
#define KT_TIMEOUT_MS 10000

struct kt_opts {
    const char *bootstrap;
    const char *group;
    const char **topics; /* every -t/--topic value; commands but mock use the last one */
    int ntopics;
    const char **props; /* every -X KEY=VALUE, for every client */
    int nprops;
    const char **configs; /* every --config KEY=VALUE of create-topic */
    int nconfigs;
    long count;
    long size;
    int partitions;
    int brokers;
    int timeout_s;
    bool keyed;
};

static ESMD_PRINTF(2, 3) _Noreturn void kt_die(int status, const char *fmt, ...)
{
    va_list ap;
    fputs("kafkatool: ", stderr);
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fputc('\n', stderr);
    exit(status);
}

static const char *kt_topic(const struct kt_opts *o)
{
    if (o->ntopics == 0)
        kt_die(2, "-t TOPIC is required");
    return o->topics[o->ntopics - 1];
}

static const char *kt_bootstrap(const struct kt_opts *o)
{
    if (!o->bootstrap)
        kt_die(2, "-b BOOTSTRAP is required");
    return o->bootstrap;
}

static void kt_conf_set(rd_kafka_conf_t *conf, const char *key, const char *val)
{
    char err[512];
    if (rd_kafka_conf_set(conf, key, val, err, sizeof(err)) != RD_KAFKA_CONF_OK)
        kt_die(2, "%s=%s: %s", key, val, err);
}

/* "KEY=VALUE" split at the first '=' into key (malloc'ed) and *val; dies naming opt if bad. */
static char *kt_split_kv(const char *opt, const char *kv, const char **val)
{
    const char *eq = strchr(kv, '=');
    if (!eq || eq == kv)
        kt_die(2, "%s %s: expected KEY=VALUE", opt, kv);
    *val = eq + 1;
    return esmd_xstrndup(kv, (size_t)(eq - kv));
}

/* Sets every -X KEY=VALUE on conf; called after kafkatool's own settings, so -X wins. */
static void kt_conf_props(rd_kafka_conf_t *conf, const struct kt_opts *o)
{
    for (int i = 0; i < o->nprops; i++) {
        const char *val;
        char *key = kt_split_kv("-X", o->props[i], &val);
        kt_conf_set(conf, key, val);
        free(key);
    }
}

/* Takes ownership of conf. */
static rd_kafka_t *kt_client_new(rd_kafka_type_t type, rd_kafka_conf_t *conf)
{
    char err[512];
    rd_kafka_t *rk = rd_kafka_new(type, conf, err, sizeof(err));
    if (!rk)
        kt_die(1, "rd_kafka_new: %s", err);
    return rk;
}

static double kt_mono(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + (double)ts.tv_nsec / 1e9;
}

/* The topic's partition count from cluster metadata, retried while the topic is being created. */
static int kt_topic_partitions(rd_kafka_t *rk, const char *topic)
{
    rd_kafka_topic_t *rkt = rd_kafka_topic_new(rk, topic, NULL);
    rd_kafka_resp_err_t err = RD_KAFKA_RESP_ERR_NO_ERROR;
    int n = -1;

    if (!rkt)
        kt_die(1, "topic %s: %s", topic, rd_kafka_err2str(rd_kafka_last_error()));
    for (int attempt = 0; attempt < 20 && n < 0; attempt++) {
        const struct rd_kafka_metadata *md;
        if (attempt > 0)
            usleep(250 * 1000);
        err = rd_kafka_metadata(rk, 0, rkt, &md, KT_TIMEOUT_MS);
        if (err)
            continue;
        if (md->topic_cnt == 1 && !md->topics[0].err && md->topics[0].partition_cnt > 0)
            n = md->topics[0].partition_cnt;
        else if (md->topic_cnt == 1)
            err = md->topics[0].err;
        rd_kafka_metadata_destroy(md);
    }
    rd_kafka_topic_destroy(rkt);
    if (n < 0)
        kt_die(1, "topic %s: no metadata: %s", topic, rd_kafka_err2str(err));
    return n;
}

/* ---- mock ------------------------------------------------------------------------------- */

static void kt_mock_answer(const char *line)
{
    fputs(line, stdout);
    fputc('\n', stdout);
    fflush(stdout);
}

static void kt_mock_answer_err(rd_kafka_resp_err_t err)
{
    if (err == RD_KAFKA_RESP_ERR_NO_ERROR) {
        kt_mock_answer("ok");
        return;
    }
    printf("error %s\n", rd_kafka_err2str(err));
    fflush(stdout);
}

static int kt_replicas(int brokers)
{
    return brokers < 3 ? brokers : 3;
}

static rd_kafka_resp_err_t kt_mock_create(rd_kafka_mock_cluster_t *mcluster, int brokers,
                                          const char *topic, int partitions)
{
    return rd_kafka_mock_topic_create(mcluster, topic, partitions, kt_replicas(brokers));
}

/* One stdin command. Returns false on "quit". */
static bool kt_mock_command(rd_kafka_mock_cluster_t *mcluster, int brokers, char *line)
{
    char *save = NULL;
    char *cmd = strtok_r(line, " \t\r", &save);
    char *a1 = cmd ? strtok_r(NULL, " \t\r", &save) : NULL;
    char *a2 = a1 ? strtok_r(NULL, " \t\r", &save) : NULL;
    char *end = NULL;

    if (!cmd)
        return true; /* blank line: no answer */
    if (strcmp(cmd, "create") == 0) {
        long parts = a2 ? strtol(a2, &end, 10) : 0;
        if (!a1 || !a2 || *end || parts < 1 || parts > 100000)
            kt_mock_answer("error usage: create TOPIC PARTITIONS");
        else
            kt_mock_answer_err(kt_mock_create(mcluster, brokers, a1, (int)parts));
    } else if (strcmp(cmd, "fail-commit") == 0) {
        long n = a1 ? strtol(a1, &end, 10) : -1;
        long code = RD_KAFKA_RESP_ERR_REQUEST_TIMED_OUT;
        if (!a1 || *end || n < 0 || n > 1000000) {
            kt_mock_answer("error usage: fail-commit N [ERR]");
            return true;
        }
        if (a2) {
            code = strtol(a2, &end, 10);
            if (*end) {
                kt_mock_answer("error usage: fail-commit N [ERR]");
                return true;
            }
        }
        if (n > 0) {
            rd_kafka_resp_err_t *errs = esmd_xcalloc((size_t)n, sizeof(*errs));
            for (long i = 0; i < n; i++)
                errs[i] = (rd_kafka_resp_err_t)code;
            rd_kafka_mock_push_request_errors_array(mcluster, KT_APIKEY_OFFSET_COMMIT, (size_t)n,
                                                    errs);
            free(errs);
        }
        kt_mock_answer("ok");
    } else if (strcmp(cmd, "broker-down") == 0 || strcmp(cmd, "broker-up") == 0) {
        long id = a1 ? strtol(a1, &end, 10) : -2;
        if (!a1 || *end || id < -1 || id > INT32_MAX) {
            kt_mock_answer("error usage: broker-down|broker-up ID");
        } else if (strcmp(cmd, "broker-down") == 0) {
            kt_mock_answer_err(rd_kafka_mock_broker_set_down(mcluster, (int32_t)id));
        } else {
            kt_mock_answer_err(rd_kafka_mock_broker_set_up(mcluster, (int32_t)id));
        }
    } else if (strcmp(cmd, "bootstraps") == 0) {
        kt_mock_answer(rd_kafka_mock_cluster_bootstraps(mcluster));
    } else if (strcmp(cmd, "quit") == 0) {
        kt_mock_answer("ok");
        return false;
    } else {
        printf("error unknown command: %s\n", cmd);
        fflush(stdout);
    }
    return true;
}

static int kt_cmd_mock(const struct kt_opts *o)
{
    sigset_t sigs;
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    rd_kafka_t *rk;
    rd_kafka_mock_cluster_t *mcluster;
    char *line = NULL;
    size_t len = 0, cap = 0;
    int sfd;
    bool run = true;

    /* Block the signals before librdkafka starts threads (they inherit the mask) and read them
     * from a signalfd beside stdin. */
    sigemptyset(&sigs);
    sigaddset(&sigs, SIGTERM);
    sigaddset(&sigs, SIGINT);
    if (sigprocmask(SIG_BLOCK, &sigs, NULL) != 0)
        kt_die(1, "sigprocmask: %s", strerror(errno));
    sfd = signalfd(-1, &sigs, SFD_CLOEXEC);
    if (sfd < 0)
        kt_die(1, "signalfd: %s", strerror(errno));
    signal(SIGPIPE, SIG_IGN);

    kt_conf_set(conf, "log_level", "4"); /* no "bootstrap.servers not set" notice */
    rk = kt_client_new(RD_KAFKA_PRODUCER, conf);
    mcluster = rd_kafka_mock_cluster_new(rk, o->brokers);
    if (!mcluster)
        kt_die(1, "rd_kafka_mock_cluster_new failed");
    for (int i = 0; i < o->ntopics; i++) {
        const char *colon = strrchr(o->topics[i], ':');
        char *end = NULL;
        long parts = colon ? strtol(colon + 1, &end, 10) : 0;
        char *name;
        rd_kafka_resp_err_t err;

        if (!colon || colon == o->topics[i] || *end || parts < 1 || parts > 100000)
            kt_die(2, "--topic %s: expected NAME:PARTITIONS", o->topics[i]);
        name = esmd_xstrndup(o->topics[i], (size_t)(colon - o->topics[i]));
        err = kt_mock_create(mcluster, o->brokers, name, (int)parts);
        if (err)
            kt_die(1, "create topic %s: %s", name, rd_kafka_err2str(err));
        free(name);
    }
    printf("%s\n", rd_kafka_mock_cluster_bootstraps(mcluster));
    fflush(stdout);

    while (run) {
        struct pollfd pfd[2] = {{.fd = STDIN_FILENO, .events = POLLIN},
                                {.fd = sfd, .events = POLLIN}};
        ssize_t r;
        char *nl;

        if (poll(pfd, 2, -1) < 0) {
            if (errno == EINTR)
                continue;
            kt_die(1, "poll: %s", strerror(errno));
        }
        if (pfd[1].revents)
            break; /* SIGTERM / SIGINT */
        if (!pfd[0].revents)
            continue;
        if (cap - len < 4096) {
            cap = cap ? cap * 2 : 8192;
            line = esmd_xrealloc(line, cap);
        }
        r = read(STDIN_FILENO, line + len, cap - len - 1);
        if (r < 0 && (errno == EINTR || errno == EAGAIN))
            continue;
        if (r <= 0)
            break; /* EOF (or a broken stdin): the parent is gone */
        len += (size_t)r;
        while (run && (nl = memchr(line, '\n', len)) != NULL) {
            size_t used = (size_t)(nl - line) + 1;
            *nl = '\0';
            run = kt_mock_command(mcluster, o->brokers, line);
            memmove(line, line + used, len - used);
            len -= used;
        }
    }
    free(line);
    close(sfd);
    rd_kafka_mock_cluster_destroy(mcluster);
    rd_kafka_destroy(rk);
    return 0;
}

/* ---- produce ---------------------------------------------------------------------------- */

struct kt_produced {
    long delivered;
    long failed;
};

static void kt_dr_cb(rd_kafka_t *rk, const rd_kafka_message_t *rkm, void *opaque)
{
    struct kt_produced *st = opaque;
    if (rkm->err) {
        if (st->failed++ < 5)
            fprintf(stderr, "kafkatool: delivery to %s [%" PRId32 "] failed: %s\n",
                    rd_kafka_topic_name(rkm->rkt), rkm->partition, rd_kafka_err2str(rkm->err));
    } else {
        st->delivered++;
    }
}

/* Enqueues one record, waiting while the local queue is full. vus[0..n) are the record's fields;
 * librdkafka copies everything. */
static void kt_produce_vus(rd_kafka_t *rk, const rd_kafka_vu_t *vus, size_t n)
{
    for (;;) {
        rd_kafka_error_t *error = rd_kafka_produceva(rk, vus, n);
        if (!error)
            return;
        if (rd_kafka_error_code(error) != RD_KAFKA_RESP_ERR__QUEUE_FULL)
            kt_die(1, "produce: %s", rd_kafka_error_string(error));
        rd_kafka_error_destroy(error);
        rd_kafka_poll(rk, 20);
    }
}

static rd_kafka_vu_t kt_vu_mem(rd_kafka_vtype_t type, const void *p, size_t n)
{
    rd_kafka_vu_t vu = {.vtype = type};
    vu.u.mem.ptr = (void *)p;
    vu.u.mem.size = n;
    return vu;
}

static _Noreturn void kt_bad_line(long lineno, const char *what)
{
    kt_die(2, "stdin line %ld: %s", lineno, what);
}

static void kt_produce_json_line(rd_kafka_t *rk, const char *topic, const char *text, size_t len,
                                 long lineno, struct esmd_buf *scratch)
{
    cJSON *rec = cJSON_ParseWithLength(text, len);
    const cJSON *part, *key, *val, *b64, *hdrs, *ts, *h;
    rd_kafka_vu_t *vus;
    size_t n = 0;

    if (!cJSON_IsObject(rec))
        kt_bad_line(lineno, "not a JSON object");
    part = cJSON_GetObjectItemCaseSensitive(rec, "partition");
    key = cJSON_GetObjectItemCaseSensitive(rec, "key");
    val = cJSON_GetObjectItemCaseSensitive(rec, "value");
    b64 = cJSON_GetObjectItemCaseSensitive(rec, "value_b64");
    hdrs = cJSON_GetObjectItemCaseSensitive(rec, "headers");
    ts = cJSON_GetObjectItemCaseSensitive(rec, "timestamp");

    vus = esmd_xcalloc(6 + (size_t)cJSON_GetArraySize(hdrs), sizeof(*vus));
    vus[n].vtype = RD_KAFKA_VTYPE_TOPIC;
    vus[n++].u.cstr = topic;
    vus[n].vtype = RD_KAFKA_VTYPE_MSGFLAGS;
    vus[n++].u.i = RD_KAFKA_MSG_F_COPY;
    if (part && !cJSON_IsNull(part)) {
        if (!cJSON_IsNumber(part) || part->valuedouble < 0 || part->valuedouble > INT32_MAX)
            kt_bad_line(lineno, "\"partition\" must be a non-negative integer");
        vus[n].vtype = RD_KAFKA_VTYPE_PARTITION;
        vus[n++].u.i32 = (int32_t)part->valuedouble;
    }
    if (key && !cJSON_IsNull(key)) {
        if (!cJSON_IsString(key))
            kt_bad_line(lineno, "\"key\" must be a string or null");
        vus[n++] = kt_vu_mem(RD_KAFKA_VTYPE_KEY, key->valuestring, strlen(key->valuestring));
    }
    if (b64 && !cJSON_IsNull(b64)) {
        if (!cJSON_IsString(b64))
            kt_bad_line(lineno, "\"value_b64\" must be a string");
        esmd_buf_reset(scratch);
        if (esmd_base64_decode(b64->valuestring, strlen(b64->valuestring), scratch) != 0)
            kt_bad_line(lineno, "\"value_b64\" is not valid base64");
        /* A non-NULL pointer even for an empty value, so it is "" and not null. */
        vus[n++] = kt_vu_mem(RD_KAFKA_VTYPE_VALUE, esmd_buf_cstr(scratch), scratch->len);
    } else if (val && !cJSON_IsNull(val)) {
        if (!cJSON_IsString(val))
            kt_bad_line(lineno, "\"value\" must be a string or null");
        vus[n++] = kt_vu_mem(RD_KAFKA_VTYPE_VALUE, val->valuestring, strlen(val->valuestring));
    }
    if (ts && !cJSON_IsNull(ts)) {
        if (!cJSON_IsNumber(ts) || ts->valuedouble < 0)
            kt_bad_line(lineno, "\"timestamp\" must be milliseconds since the epoch");
        vus[n].vtype = RD_KAFKA_VTYPE_TIMESTAMP;
        vus[n++].u.i64 = (int64_t)ts->valuedouble;
    }
    if (hdrs && !cJSON_IsNull(hdrs) && !cJSON_IsArray(hdrs))
        kt_bad_line(lineno, "\"headers\" must be an array of [name, value]");
    cJSON_ArrayForEach(h, hdrs)
    {
        const cJSON *hn = cJSON_GetArrayItem(h, 0);
        const cJSON *hv = cJSON_GetArrayItem(h, 1);
        if (!cJSON_IsArray(h) || cJSON_GetArraySize(h) != 2 || !cJSON_IsString(hn) ||
            !(cJSON_IsString(hv) || cJSON_IsNull(hv)))
            kt_bad_line(lineno, "each header must be [name, string|null]");
        vus[n].vtype = RD_KAFKA_VTYPE_HEADER;
        vus[n].u.header.name = hn->valuestring;
        vus[n].u.header.val = cJSON_IsNull(hv) ? NULL : hv->valuestring;
        vus[n++].u.header.size = cJSON_IsNull(hv) ? 0 : (ssize_t)strlen(hv->valuestring);
    }
    kt_produce_vus(rk, vus, n);
    free(vus);
    cJSON_Delete(rec);
}

static long kt_produce_json(rd_kafka_t *rk, const char *topic)
{
    struct esmd_buf scratch = ESMD_BUF_INIT;
    char *line = NULL;
    size_t cap = 0;
    ssize_t len;
    long lineno = 0, queued = 0;

    while ((len = getline(&line, &cap, stdin)) >= 0) {
        size_t n = (size_t)len;
        lineno++;
        while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r' || line[n - 1] == ' '))
            n--;
        if (n == 0)
            continue;
        kt_produce_json_line(rk, topic, line, n, lineno, &scratch);
        queued++;
        rd_kafka_poll(rk, 0);
    }
    free(line);
    esmd_buf_free(&scratch);
    return queued;
}

static long kt_produce_generated(rd_kafka_t *rk, const struct kt_opts *o, const char *topic)
{
    struct esmd_buf val = ESMD_BUF_INIT;
    size_t size = o->size >= 0 ? (size_t)o->size : 100;
    char key[32];
    int parts = o->partitions > 0 ? o->partitions : kt_topic_partitions(rk, topic);

    for (long i = 0; i < o->count; i++) {
        rd_kafka_vu_t vus[5];
        size_t n = 0;
        int klen = snprintf(key, sizeof(key), "k%ld", i);
        size_t head;

        esmd_buf_reset(&val);
        esmd_buf_printf(&val, "{\"i\":%ld,\"pad\":\"", i);
        head = val.len + 2; /* and the closing "} */
        esmd_buf_reserve(&val, size);
        for (size_t k = head; k < size; k++)
            val.data[val.len++] = 'x';
        esmd_buf_puts(&val, "\"}");

        vus[n].vtype = RD_KAFKA_VTYPE_TOPIC;
        vus[n++].u.cstr = topic;
        vus[n].vtype = RD_KAFKA_VTYPE_MSGFLAGS;
        vus[n++].u.i = RD_KAFKA_MSG_F_COPY;
        vus[n].vtype = RD_KAFKA_VTYPE_PARTITION;
        vus[n++].u.i32 = (int32_t)(i % parts);
        vus[n++] = kt_vu_mem(RD_KAFKA_VTYPE_VALUE, val.data, val.len);
        if (o->keyed)
            vus[n++] = kt_vu_mem(RD_KAFKA_VTYPE_KEY, key, (size_t)klen);
        kt_produce_vus(rk, vus, n);
        if ((i & 1023) == 0)
            rd_kafka_poll(rk, 0);
    }
    esmd_buf_free(&val);
    return o->count;
}

static int kt_cmd_produce(const struct kt_opts *o)
{
    const char *topic = kt_topic(o);
    struct kt_produced st = {0, 0};
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    rd_kafka_t *rk;
    long queued;
    rd_kafka_resp_err_t err;

    kt_conf_set(conf, "bootstrap.servers", kt_bootstrap(o));
    kt_conf_set(conf, "enable.idempotence", "true");
    kt_conf_set(conf, "acks", "all");
    kt_conf_set(conf, "linger.ms", "5");
    kt_conf_set(conf, "queue.buffering.max.messages", "1000000");
    kt_conf_set(conf, "message.timeout.ms", "120000");
    kt_conf_props(conf, o);
    rd_kafka_conf_set_dr_msg_cb(conf, kt_dr_cb);
    rd_kafka_conf_set_opaque(conf, &st);
    rk = kt_client_new(RD_KAFKA_PRODUCER, conf);

    queued = o->count >= 0 ? kt_produce_generated(rk, o, topic) : kt_produce_json(rk, topic);
    err = rd_kafka_flush(rk, 180000);
    if (err)
        fprintf(stderr, "kafkatool: flush: %s (%d records not delivered)\n", rd_kafka_err2str(err),
                rd_kafka_outq_len(rk));
    rd_kafka_destroy(rk);

    printf("produced %ld\n", st.delivered);
    fflush(stdout);
    if (st.failed > 0 || st.delivered != queued) {
        fprintf(stderr, "kafkatool: %ld of %ld records not delivered\n", queued - st.delivered,
                queued);
        return 1;
    }
    return 0;
}

/* ---- committed, watermarks -------------------------------------------------------------- */

/* The errors of a group coordinator that is not (yet) ready: worth asking again. */
static bool kt_coordinator_not_ready(rd_kafka_resp_err_t err)
{
    return err == RD_KAFKA_RESP_ERR_NOT_COORDINATOR ||
           err == RD_KAFKA_RESP_ERR_COORDINATOR_LOAD_IN_PROGRESS ||
           err == RD_KAFKA_RESP_ERR_COORDINATOR_NOT_AVAILABLE;
}

static int kt_cmd_committed(const struct kt_opts *o)
{
    const char *topic = kt_topic(o);
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    rd_kafka_topic_partition_list_t *parts;
    rd_kafka_resp_err_t err;
    rd_kafka_t *rk;
    int nparts;

    if (!o->group)
        kt_die(2, "-g GROUP is required");
    kt_conf_set(conf, "bootstrap.servers", kt_bootstrap(o));
    kt_conf_set(conf, "group.id", o->group);
    kt_conf_set(conf, "enable.auto.commit", "false");
    kt_conf_props(conf, o);
    rk = kt_client_new(RD_KAFKA_CONSUMER, conf);
    nparts = o->partitions > 0 ? o->partitions : kt_topic_partitions(rk, topic);

    for (double deadline = kt_mono() + 30;;) {
        parts = rd_kafka_topic_partition_list_new(nparts);
        for (int i = 0; i < nparts; i++)
            rd_kafka_topic_partition_list_add(parts, topic, i);
        err = rd_kafka_committed(rk, parts, KT_TIMEOUT_MS);
        for (int i = 0; !err && i < parts->cnt; i++)
            err = parts->elems[i].err;
        if (!err || !kt_coordinator_not_ready(err) || kt_mono() >= deadline)
            break;
        rd_kafka_topic_partition_list_destroy(parts);
        usleep(200 * 1000);
    }
    if (err)
        kt_die(1, "committed %s, group %s: %s", topic, o->group, rd_kafka_err2str(err));
    putchar('{');
    for (int i = 0; i < parts->cnt; i++) {
        const rd_kafka_topic_partition_t *p = &parts->elems[i];
        printf("%s\"%" PRId32 "\":%" PRId64, i ? "," : "", p->partition,
               p->offset < 0 ? (int64_t)-1 : p->offset);
    }
    printf("}\n");
    fflush(stdout);
    rd_kafka_topic_partition_list_destroy(parts);
    rd_kafka_destroy_flags(rk, RD_KAFKA_DESTROY_F_NO_CONSUMER_CLOSE);
    return 0;
}

static int kt_cmd_watermarks(const struct kt_opts *o)
{
    const char *topic = kt_topic(o);
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    rd_kafka_t *rk;
    int nparts;

    kt_conf_set(conf, "bootstrap.servers", kt_bootstrap(o));
    kt_conf_props(conf, o);
    rk = kt_client_new(RD_KAFKA_PRODUCER, conf);
    nparts = o->partitions > 0 ? o->partitions : kt_topic_partitions(rk, topic);
    putchar('{');
    for (int i = 0; i < nparts; i++) {
        int64_t lo = -1, hi = -1;
        rd_kafka_resp_err_t err =
            rd_kafka_query_watermark_offsets(rk, topic, i, &lo, &hi, KT_TIMEOUT_MS);
        if (err)
            kt_die(1, "watermarks %s [%d]: %s", topic, i, rd_kafka_err2str(err));
        printf("%s\"%d\":[%" PRId64 ",%" PRId64 "]", i ? "," : "", i, lo, hi);
    }
    printf("}\n");
    fflush(stdout);
    rd_kafka_destroy(rk);
    return 0;
}

/* ---- create-topic, add-partitions ------------------------------------------------------- */

/* Waits up to 30 s until the metadata shows `want` partitions of topic, each with a leader.
 * Returns the count last seen (-1: the topic is not known), which differs from want on timeout. */
static int kt_wait_partitions(rd_kafka_t *rk, const char *topic, int want)
{
    rd_kafka_topic_t *rkt = rd_kafka_topic_new(rk, topic, NULL);
    int seen = -1;

    if (!rkt)
        kt_die(1, "topic %s: %s", topic, rd_kafka_err2str(rd_kafka_last_error()));
    for (double deadline = kt_mono() + 30; kt_mono() < deadline; usleep(100 * 1000)) {
        const struct rd_kafka_metadata *md;
        bool led = true;
        if (rd_kafka_metadata(rk, 0, rkt, &md, KT_TIMEOUT_MS) != RD_KAFKA_RESP_ERR_NO_ERROR)
            continue;
        if (md->topic_cnt == 1 && !md->topics[0].err) {
            seen = md->topics[0].partition_cnt;
            for (int i = 0; i < seen; i++)
                led = led && md->topics[0].partitions[i].leader >= 0 &&
                      !md->topics[0].partitions[i].err;
        }
        rd_kafka_metadata_destroy(md);
        if (seen == want && led)
            break;
    }
    rd_kafka_topic_destroy(rkt);
    return seen;
}

/* Waits up to 30 s until every partition's leader answers ListOffsets: a real broker lists a new
 * partition's leader in the metadata a moment before it serves it ("Not leader for partition"),
 * and records produced into that moment may be lost by librdkafka 2.0's idempotent producer. */
static void kt_wait_serving(rd_kafka_t *rk, const char *topic, int partitions)
{
    double deadline = kt_mono() + 30;
    for (int i = 0; i < partitions; i++) {
        for (;;) {
            int64_t lo, hi;
            rd_kafka_resp_err_t err =
                rd_kafka_query_watermark_offsets(rk, topic, i, &lo, &hi, KT_TIMEOUT_MS);
            if (!err)
                break;
            if (kt_mono() >= deadline)
                kt_die(1, "%s [%d] is not served after 30 s: %s", topic, i, rd_kafka_err2str(err));
            usleep(100 * 1000);
        }
    }
}

static rd_kafka_t *kt_admin_client(const struct kt_opts *o)
{
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    kt_conf_set(conf, "bootstrap.servers", kt_bootstrap(o));
    kt_conf_props(conf, o);
    return kt_client_new(RD_KAFKA_PRODUCER, conf);
}

/* Waits for the admin result event of the request sent on queue q; dies on a request error.
 * Returns the one topic's error code and copies its message into msg. */
static rd_kafka_resp_err_t kt_admin_wait(rd_kafka_queue_t *q, bool create, char *msg,
                                         size_t msgsize)
{
    rd_kafka_event_t *ev = rd_kafka_queue_poll(q, 90 * 1000);
    const rd_kafka_topic_result_t **res;
    rd_kafka_resp_err_t err;
    size_t n = 0;

    if (!ev)
        kt_die(1, "no answer from the cluster within 90 s");
    if (rd_kafka_event_error(ev))
        kt_die(1, "%s: %s", create ? "CreateTopics" : "CreatePartitions",
               rd_kafka_event_error_string(ev));
    if (create)
        res = rd_kafka_CreateTopics_result_topics(rd_kafka_event_CreateTopics_result(ev), &n);
    else
        res =
            rd_kafka_CreatePartitions_result_topics(rd_kafka_event_CreatePartitions_result(ev), &n);
    if (n != 1)
        kt_die(1, "%s: %zu topic results, expected 1", create ? "CreateTopics" : "CreatePartitions",
               n);
    err = rd_kafka_topic_result_error(res[0]);
    snprintf(msg, msgsize, "%s",
             rd_kafka_topic_result_error_string(res[0]) ? rd_kafka_topic_result_error_string(res[0])
                                                        : rd_kafka_err2str(err));
    rd_kafka_event_destroy(ev);
    return err;
}

static rd_kafka_AdminOptions_t *kt_admin_options(rd_kafka_t *rk, rd_kafka_admin_op_t op)
{
    char err[512];
    rd_kafka_AdminOptions_t *opts = rd_kafka_AdminOptions_new(rk, op);
    if (rd_kafka_AdminOptions_set_operation_timeout(opts, 60 * 1000, err, sizeof(err)) ||
        rd_kafka_AdminOptions_set_request_timeout(opts, 60 * 1000, err, sizeof(err)))
        kt_die(1, "admin options: %s", err);
    return opts;
}

static int kt_cmd_create_topic(const struct kt_opts *o)
{
    const char *topic = kt_topic(o);
    rd_kafka_t *rk;
    rd_kafka_queue_t *q;
    rd_kafka_NewTopic_t *nt;
    rd_kafka_AdminOptions_t *opts;
    rd_kafka_resp_err_t err;
    char msg[512];
    int seen;

    if (o->partitions <= 0)
        kt_die(2, "create-topic: --partitions P is required");
    rk = kt_admin_client(o);
    q = rd_kafka_queue_new(rk);
    nt = rd_kafka_NewTopic_new(topic, o->partitions, 1, msg, sizeof(msg));
    if (!nt)
        kt_die(2, "create-topic %s: %s", topic, msg);
    for (int i = 0; i < o->nconfigs; i++) {
        const char *val;
        char *key = kt_split_kv("--config", o->configs[i], &val);
        if (rd_kafka_NewTopic_set_config(nt, key, val))
            kt_die(2, "--config %s: refused", o->configs[i]);
        free(key);
    }
    opts = kt_admin_options(rk, RD_KAFKA_ADMIN_OP_CREATETOPICS);
    rd_kafka_CreateTopics(rk, &nt, 1, opts, q);
    err = kt_admin_wait(q, true, msg, sizeof(msg));
    if (err && err != RD_KAFKA_RESP_ERR_TOPIC_ALREADY_EXISTS)
        kt_die(1, "create-topic %s: %s", topic, msg);
    seen = kt_wait_partitions(rk, topic, o->partitions);
    if (seen != o->partitions) {
        if (err == RD_KAFKA_RESP_ERR_TOPIC_ALREADY_EXISTS && seen > 0)
            kt_die(1, "create-topic %s: the topic already exists with %d partitions, not %d", topic,
                   seen, o->partitions);
        kt_die(1,
               "create-topic %s: the metadata shows %d partitions with leaders after 30 s, "
               "expected %d",
               topic, seen, o->partitions);
    }
    kt_wait_serving(rk, topic, o->partitions);
    printf("%s %s %d\n", err ? "exists" : "created", topic, o->partitions);
    fflush(stdout);
    rd_kafka_AdminOptions_destroy(opts);
    rd_kafka_NewTopic_destroy(nt);
    rd_kafka_queue_destroy(q);
    rd_kafka_destroy(rk);
    return 0;
}

static int kt_cmd_add_partitions(const struct kt_opts *o)
{
    const char *topic = kt_topic(o);
    rd_kafka_t *rk;
    rd_kafka_queue_t *q;
    rd_kafka_NewPartitions_t *np;
    rd_kafka_AdminOptions_t *opts;
    rd_kafka_resp_err_t err;
    char msg[512];
    int seen;

    if (o->partitions <= 0)
        kt_die(2, "add-partitions: --partitions TOTAL is required");
    rk = kt_admin_client(o);
    seen = kt_topic_partitions(rk, topic);
    if (seen > o->partitions)
        kt_die(1, "add-partitions %s: the topic has %d partitions, more than %d", topic, seen,
               o->partitions);
    if (seen < o->partitions) {
        q = rd_kafka_queue_new(rk);
        np = rd_kafka_NewPartitions_new(topic, (size_t)o->partitions, msg, sizeof(msg));
        if (!np)
            kt_die(2, "add-partitions %s: %s", topic, msg);
        opts = kt_admin_options(rk, RD_KAFKA_ADMIN_OP_CREATEPARTITIONS);
        rd_kafka_CreatePartitions(rk, &np, 1, opts, q);
        err = kt_admin_wait(q, false, msg, sizeof(msg));
        if (err)
            kt_die(1, "add-partitions %s: %s", topic, msg);
        rd_kafka_AdminOptions_destroy(opts);
        rd_kafka_NewPartitions_destroy(np);
        rd_kafka_queue_destroy(q);
        seen = kt_wait_partitions(rk, topic, o->partitions);
        if (seen != o->partitions)
            kt_die(1, "add-partitions %s: the metadata shows %d partitions after 30 s, expected %d",
                   topic, seen, o->partitions);
    }
    kt_wait_serving(rk, topic, seen);
    printf("partitions %s %d\n", topic, seen);
    fflush(stdout);
    rd_kafka_destroy(rk);
    return 0;
}

/* ---- consume-rate ----------------------------------------------------------------------- */

static int kt_cmd_consume_rate(const struct kt_opts *o)
{
    const char *topic = kt_topic(o);
    rd_kafka_conf_t *conf = rd_kafka_conf_new();
    rd_kafka_topic_partition_list_t *parts;
    rd_kafka_resp_err_t err;
    rd_kafka_t *rk;
    char group[64];
    double t_start, t_first = 0, t_last = 0, deadline;
    long got = 0, errors = 0;
    int nparts;

    if (o->count <= 0)
        kt_die(2, "--count N is required");
    snprintf(group, sizeof(group), "kafkatool-rate-%ld", (long)getpid());
    kt_conf_set(conf, "bootstrap.servers", kt_bootstrap(o));
    kt_conf_set(conf, "group.id", o->group ? o->group : group);
    kt_conf_set(conf, "enable.auto.commit", "false");
    kt_conf_set(conf, "enable.auto.offset.store", "false");
    kt_conf_props(conf, o);
    rk = kt_client_new(RD_KAFKA_CONSUMER, conf);
    rd_kafka_poll_set_consumer(rk);
    nparts = o->partitions > 0 ? o->partitions : kt_topic_partitions(rk, topic);

    parts = rd_kafka_topic_partition_list_new(nparts);
    for (int i = 0; i < nparts; i++)
        rd_kafka_topic_partition_list_add(parts, topic, i)->offset = RD_KAFKA_OFFSET_BEGINNING;
    t_start = kt_mono();
    deadline = t_start + o->timeout_s;
    err = rd_kafka_assign(rk, parts);
    if (err)
        kt_die(1, "assign: %s", rd_kafka_err2str(err));
    rd_kafka_topic_partition_list_destroy(parts);

    while (got < o->count && kt_mono() < deadline) {
        rd_kafka_message_t *rkm = rd_kafka_consumer_poll(rk, 100);
        if (!rkm)
            continue;
        if (rkm->err) {
            if (rkm->err != RD_KAFKA_RESP_ERR__PARTITION_EOF && errors++ < 5)
                fprintf(stderr, "kafkatool: consume: %s\n", rd_kafka_message_errstr(rkm));
        } else {
            if (got++ == 0)
                t_first = kt_mono();
            t_last = kt_mono();
        }
        rd_kafka_message_destroy(rkm);
    }
    rd_kafka_assign(rk, NULL);
    rd_kafka_destroy_flags(rk, RD_KAFKA_DESTROY_F_NO_CONSUMER_CLOSE);
    if (got < o->count) {
        fprintf(stderr, "kafkatool: consumed %ld of %ld records in %d s\n", got, o->count,
                o->timeout_s);
        return 1;
    }
    {
        /* From the first record to the last, as the benchmark measures esmd. */
        double s = t_last - t_first;
        printf("consumed %ld records in %.3f s = %.0f records/s\n", got, s,
               s > 0 ? (double)got / s : 0.0);
        fprintf(stderr, "kafkatool: %.3f s from assign to the last record\n", t_last - t_start);
        fflush(stdout);
    }
    return 0;
}

/* ---- main ------------------------------------------------------------------------------- */

static _Noreturn void kt_usage(int status)
{
    fputs("usage: kafkatool mock [--brokers N] [--topic NAME:PARTITIONS]...\n"
          "       kafkatool produce -b BOOTSTRAP -t TOPIC            < JSON lines\n"
          "       kafkatool produce -b BOOTSTRAP -t TOPIC --count N [--size BYTES]"
          " [--partitions P] [--keyed]\n"
          "       kafkatool create-topic -b BOOTSTRAP -t TOPIC --partitions P"
          " [--config KEY=VALUE]...\n"
          "       kafkatool add-partitions -b BOOTSTRAP -t TOPIC --partitions TOTAL\n"
          "       kafkatool committed -b BOOTSTRAP -g GROUP -t TOPIC [--partitions P]\n"
          "       kafkatool watermarks -b BOOTSTRAP -t TOPIC [--partitions P]\n"
          "       kafkatool consume-rate -b BOOTSTRAP -t TOPIC --count N [--group G]"
          " [--timeout S]\n"
          "every command but mock: -X KEY=VALUE (repeatable) sets a librdkafka property\n",
          status ? stderr : stdout);
    exit(status);
}

static long kt_num(const char *opt, const char *s, long min, long max)
{
    char *end = NULL;
    long v;
    errno = 0;
    v = strtol(s, &end, 10);
    if (errno || end == s || *end || v < min || v > max)
        kt_die(2, "%s: expected an integer in %ld..%ld, got '%s'", opt, min, max, s);
    return v;
}

int main(int argc, char **argv)
{
    enum {
        OPT_COUNT = 256,
        OPT_SIZE,
        OPT_PARTITIONS,
        OPT_KEYED,
        OPT_BROKERS,
        OPT_TIMEOUT,
        OPT_CONFIG
    };
    static const struct option longopts[] = {
        {"bootstrap", required_argument, NULL, 'b'},
        {"topic", required_argument, NULL, 't'},
        {"group", required_argument, NULL, 'g'},
        {"count", required_argument, NULL, OPT_COUNT},
        {"size", required_argument, NULL, OPT_SIZE},
        {"partitions", required_argument, NULL, OPT_PARTITIONS},
        {"keyed", no_argument, NULL, OPT_KEYED},
        {"brokers", required_argument, NULL, OPT_BROKERS},
        {"timeout", required_argument, NULL, OPT_TIMEOUT},
        {"config", required_argument, NULL, OPT_CONFIG},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    struct kt_opts o = {.count = -1, .size = -1, .brokers = 3, .timeout_s = 300};
    const char *cmd;
    int c;

    if (argc < 2)
        kt_usage(2);
    cmd = argv[1];
    if (strcmp(cmd, "-h") == 0 || strcmp(cmd, "--help") == 0)
        kt_usage(0);
    o.topics = esmd_xcalloc((size_t)argc, sizeof(*o.topics));
    o.props = esmd_xcalloc((size_t)argc, sizeof(*o.props));
    o.configs = esmd_xcalloc((size_t)argc, sizeof(*o.configs));
    while ((c = getopt_long(argc - 1, argv + 1, "b:t:g:X:h", longopts, NULL)) != -1) {
        switch (c) {
        case 'b':
            o.bootstrap = optarg;
            break;
        case 't':
            o.topics[o.ntopics++] = optarg;
            break;
        case 'g':
            o.group = optarg;
            break;
        case 'X':
            o.props[o.nprops++] = optarg;
            break;
        case OPT_CONFIG:
            o.configs[o.nconfigs++] = optarg;
            break;
        case OPT_COUNT:
            o.count = kt_num("--count", optarg, 0, 1000000000L);
            break;
        case OPT_SIZE:
            o.size = kt_num("--size", optarg, 0, 100L * 1024 * 1024);
            break;
        case OPT_PARTITIONS:
            o.partitions = (int)kt_num("--partitions", optarg, 1, 100000);
            break;
        case OPT_KEYED:
            o.keyed = true;
            break;
        case OPT_BROKERS:
            o.brokers = (int)kt_num("--brokers", optarg, 1, 100);
            break;
        case OPT_TIMEOUT:
            o.timeout_s = (int)kt_num("--timeout", optarg, 1, 86400);
            break;
        case 'h':
            kt_usage(0);
        default:
            kt_usage(2);
        }
    }
    if (optind != argc - 1)
        kt_die(2, "unexpected argument '%s'", argv[optind + 1]);

    int rc;
    if (strcmp(cmd, "mock") == 0)
        rc = kt_cmd_mock(&o);
    else if (strcmp(cmd, "produce") == 0)
        rc = kt_cmd_produce(&o);
    else if (strcmp(cmd, "committed") == 0)
        rc = kt_cmd_committed(&o);
    else if (strcmp(cmd, "watermarks") == 0)
        rc = kt_cmd_watermarks(&o);
    else if (strcmp(cmd, "create-topic") == 0)
        rc = kt_cmd_create_topic(&o);
    else if (strcmp(cmd, "add-partitions") == 0)
        rc = kt_cmd_add_partitions(&o);
    else if (strcmp(cmd, "consume-rate") == 0)
        rc = kt_cmd_consume_rate(&o);
    else
        kt_usage(2);
    free(o.topics);
    free(o.props);
    free(o.configs);
    return rc;
}
