/* esmd: the command line (run, check-config, migrate, match, version) and the service's main
 * loop. */
#include "esmd/admin.h"
#include "esmd/admin_auth.h"
#include "esmd/api.h"
#include "esmd/asyncq.h"
#include "esmd/buf.h"
#include "esmd/config.h"
#include "esmd/destination.h"
#include "esmd/filter.h"
#include "esmd/http.h"
#include "esmd/invoke.h"
#include "esmd/log.h"
#include "esmd/mapping.h"
#include "esmd/metrics.h"
#include "esmd/pg.h"

#include <curl/curl.h>
#include <librdkafka/rdkafka.h>
#include <errno.h>
#include <ev.h>
#include <getopt.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#define EXIT_USAGE 2

static const char usage_main[] =
    "usage: esmd <command> [options]\n"
    "\n"
    "Event source mappings and asynchronous invocation for HTTP functions.\n"
    "\n"
    "commands:\n"
    "  run -c FILE            run the service with the configuration FILE\n"
    "  check-config FILE      validate FILE and list every problem in it\n"
    "  migrate -c FILE        apply pending database migrations and exit\n"
    "  match -p PATTERN       tell which JSON events on stdin a filter pattern keeps\n"
    "  version                print the version\n"
    "\n"
    "`esmd <command> --help` describes a command.\n";

static const char usage_run[] =
    "usage: esmd run -c FILE [--log-level LEVEL] [--instance-id ID]\n"
    "\n"
    "Runs the service: applies pending migrations, starts the admin listener and every enabled\n"
    "mapping, and runs until SIGTERM or SIGINT, then stops gracefully (requests in flight finish,\n"
    "finished work is committed) and exits 0. SIGHUP (or POST /admin/reload) reloads FILE.\n"
    "\n"
    "  -c, --config FILE      configuration file (required)\n"
    "  -l, --log-level LEVEL  debug | info | warn | error (default info; env ESMD_LOG_LEVEL)\n"
    "  -i, --instance-id ID   this process's stable id (default env ESMD_INSTANCE_ID, else the\n"
    "                         host name)\n";

static const char usage_check[] =
    "usage: esmd check-config FILE\n"
    "\n"
    "Validates FILE without connecting to anything. Prints `FILE: ok` and exits 0, or prints\n"
    "every problem as `FILE:LINE:COLUMN: KEY: MESSAGE` on stderr and exits 1.\n";

static const char usage_migrate[] =
    "usage: esmd migrate -c FILE\n"
    "\n"
    "Applies the database migrations built into this binary that the database named by the\n"
    "configuration's `postgres` does not have yet, under an advisory lock, and exits.\n"
    "\n"
    "  -c, --config FILE      configuration file (required)\n";

static const char usage_match[] =
    "usage: esmd match (-p PATTERN | -f FILE)...\n"
    "\n"
    "Tries filter patterns on events, as a mapping's `filters` do: reads events from stdin, one\n"
    "JSON document a line, and prints a line for each, `true` when any of the patterns matches\n"
    "the event (several patterns are OR'd) and `false` when none does.\n"
    "\n"
    "  -p, --pattern PATTERN  a pattern: a JSON object (repeatable)\n"
    "  -f, --pattern-file F   a file holding one pattern, which may span lines (repeatable)\n"
    "\n"
    "At least one pattern is required; they are numbered from 1 in the order given. The\n"
    "configuration's limits on the number and length of patterns do not apply here. An invalid\n"
    "pattern is reported as `pattern N:LINE:COLUMN: MESSAGE` on stderr and exits 2 before any\n"
    "event is read. A line that is not a JSON object prints `false`, and `esmd match: line N:\n"
    "not a JSON object` on stderr, and reading goes on. Exits 0 at the end of the input, or 1\n"
    "if some line was not a JSON object or stdin could not be read.\n";

static const char usage_version[] = "usage: esmd version\n\nPrints the version of esmd.\n";

static bool wants_help(int argc, char **argv)
{
    for (int i = 1; i < argc; i++)
        if (strcmp(argv[i], "--help") == 0 || strcmp(argv[i], "-h") == 0)
            return true;
    return false;
}

/* Loads and validates; prints every error. NULL on failure. */
static struct esmd_config *load_config(const char *path)
{
    struct esmd_config_errors errs;
    esmd_config_errors_init(&errs);
    struct esmd_config *cfg = esmd_config_load(path, &errs);
    if (!cfg) {
        char line[2048];
        for (size_t i = 0; i < errs.n; i++) {
            esmd_config_error_format(&errs.items[i], line, sizeof(line));
            fprintf(stderr, "%s\n", line);
        }
        if (errs.n == 0)
            fprintf(stderr, "%s: could not load the configuration\n", path);
    } else {
        esmd_aws_set(cfg->aws.region, cfg->aws.account_id); /* every ARN from now on */
    }
    esmd_config_errors_free(&errs);
    return cfg;
}

/* Parses `-c FILE` (+ run's options). Returns 0, or an exit code. */
struct run_opts {
    const char *config;
    const char *log_level;
    const char *instance_id;
};

static int parse_opts(int argc, char **argv, const char *usage, bool run, struct run_opts *o)
{
    static const struct option longopts[] = {
        {"config", required_argument, NULL, 'c'},
        {"log-level", required_argument, NULL, 'l'},
        {"instance-id", required_argument, NULL, 'i'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    optind = 1;
    int ch;
    while ((ch = getopt_long(argc, argv, run ? "c:l:i:h" : "c:h", longopts, NULL)) != -1) {
        switch (ch) {
        case 'c':
            o->config = optarg;
            break;
        case 'l':
            o->log_level = optarg;
            break;
        case 'i':
            o->instance_id = optarg;
            break;
        case 'h':
            fputs(usage, stdout);
            return -1;
        default:
            fputs(usage, stderr);
            return EXIT_USAGE;
        }
        if (!run && ch != 'c' && ch != 'h') {
            fputs(usage, stderr);
            return EXIT_USAGE;
        }
    }
    if (optind < argc) {
        fprintf(stderr, "esmd: unexpected argument '%s'\n%s", argv[optind], usage);
        return EXIT_USAGE;
    }
    if (!o->config) {
        fprintf(stderr, "esmd: -c FILE is required\n%s", usage);
        return EXIT_USAGE;
    }
    return 0;
}

static int cmd_check_config(int argc, char **argv)
{
    if (wants_help(argc, argv)) {
        fputs(usage_check, stdout);
        return 0;
    }
    if (argc != 2) {
        fputs(usage_check, stderr);
        return EXIT_USAGE;
    }
    struct esmd_config *cfg = load_config(argv[1]);
    if (!cfg)
        return 1;
    printf("%s: ok\n", argv[1]);
    esmd_config_free(cfg);
    return 0;
}

static int cmd_migrate(int argc, char **argv)
{
    struct run_opts o = {0};
    int rc = parse_opts(argc, argv, usage_migrate, false, &o);
    if (rc)
        return rc < 0 ? 0 : rc;
    struct esmd_config *cfg = load_config(o.config);
    if (!cfg)
        return 1;
    char err[1024];
    int applied = 0;
    if (esmd_pg_migrate(cfg->postgres, &applied, err, sizeof(err)) != ESMD_OK) {
        fprintf(stderr, "esmd migrate: %s\n", err);
        esmd_config_free(cfg);
        return 1;
    }
    printf("applied %d migration%s (%zu known)\n", applied, applied == 1 ? "" : "s",
           esmd_pg_migration_count());
    esmd_config_free(cfg);
    return 0;
}

/* ---- esmd match ---- */

/* Reads stdin a line at a time. stdout is flushed before every read that may block, so a
 * program driving `esmd match` through pipes gets each answer without waiting for more input. */
struct line_reader {
    int fd;
    char *buf;
    size_t start, len, cap; /* unread bytes: buf[start, len) */
    bool eof;
};

/* Returns 1 with the next line (borrowed, without its "\n" or "\r\n") in *line and *n, 0 at
 * the end of the input, or -1 on a read error (errno set). */
static int reader_next(struct line_reader *r, const char **line, size_t *n)
{
    size_t scanned = r->start;
    for (;;) {
        char *nl = r->len > scanned ? memchr(r->buf + scanned, '\n', r->len - scanned) : NULL;
        if (nl || (r->eof && r->start < r->len)) {
            size_t end = nl ? (size_t)(nl - r->buf) : r->len;
            *line = r->buf + r->start;
            *n = end - r->start;
            if (*n > 0 && (*line)[*n - 1] == '\r')
                (*n)--;
            r->start = nl ? end + 1 : end;
            return 1;
        }
        if (r->eof)
            return 0;
        scanned = r->len;
        if (r->start > 0) {
            memmove(r->buf, r->buf + r->start, r->len - r->start);
            r->len -= r->start;
            scanned -= r->start;
            r->start = 0;
        }
        if (r->len == r->cap) {
            r->cap = r->cap ? r->cap * 2 : 65536;
            r->buf = esmd_xrealloc(r->buf, r->cap);
        }
        fflush(stdout);
        ssize_t got = read(r->fd, r->buf + r->len, r->cap - r->len);
        if (got < 0 && errno == EINTR)
            continue;
        if (got < 0)
            return -1;
        if (got == 0)
            r->eof = true;
        r->len += (size_t)got;
    }
}

/* Reads a whole file: caller frees with free(). NULL with errno set on failure. */
static char *read_file(const char *path, size_t *len)
{
    FILE *fp = fopen(path, "rb");
    if (!fp)
        return NULL;
    struct esmd_buf b = ESMD_BUF_INIT;
    char chunk[8192];
    size_t got;
    while ((got = fread(chunk, 1, sizeof(chunk), fp)) > 0)
        esmd_buf_append(&b, chunk, got);
    bool failed = ferror(fp);
    fclose(fp);
    if (failed) {
        esmd_buf_free(&b);
        errno = EIO;
        return NULL;
    }
    return esmd_buf_steal(&b, len);
}

/* Compiles one pattern into f as number n (1-based). Prints the error and returns false if it
 * is invalid. */
static bool match_add_pattern(struct esmd_filter *f, uint32_t n, const char *text, size_t len)
{
    struct esmd_filter_error err;
    if (esmd_filter_add(f, text, len, n, &err) == 0)
        return true;
    fprintf(stderr, "pattern %u:%d:%d: %s\n", (unsigned)n, err.line, err.column, err.message);
    return false;
}

static int cmd_match(int argc, char **argv)
{
    static const struct option longopts[] = {
        {"pattern", required_argument, NULL, 'p'},
        {"pattern-file", required_argument, NULL, 'f'},
        {"help", no_argument, NULL, 'h'},
        {NULL, 0, NULL, 0},
    };
    struct esmd_filter *f = esmd_filter_new();
    struct line_reader r = {.fd = STDIN_FILENO};
    uint32_t npatterns = 0;
    int rc = 0;
    optind = 1;
    int ch;
    while ((ch = getopt_long(argc, argv, "p:f:h", longopts, NULL)) != -1) {
        switch (ch) {
        case 'p':
            if (!match_add_pattern(f, ++npatterns, optarg, strlen(optarg)))
                rc = EXIT_USAGE;
            break;
        case 'f': {
            size_t len;
            char *text = read_file(optarg, &len);
            if (!text) {
                fprintf(stderr, "esmd match: %s: %s\n", optarg, strerror(errno));
                rc = EXIT_USAGE;
                goto out;
            }
            if (!match_add_pattern(f, ++npatterns, text, len))
                rc = EXIT_USAGE;
            free(text);
            break;
        }
        case 'h':
            fputs(usage_match, stdout);
            goto out;
        default:
            fputs(usage_match, stderr);
            rc = EXIT_USAGE;
            goto out;
        }
    }
    if (rc)
        goto out;
    if (optind < argc) {
        fprintf(stderr, "esmd: unexpected argument '%s'\n%s", argv[optind], usage_match);
        rc = EXIT_USAGE;
        goto out;
    }
    if (npatterns == 0) {
        fprintf(stderr, "esmd: at least one -p PATTERN or -f FILE is required\n%s", usage_match);
        rc = EXIT_USAGE;
        goto out;
    }

    const char *line;
    size_t len;
    unsigned long lineno = 0;
    int got;
    while ((got = reader_next(&r, &line, &len)) == 1) {
        lineno++;
        int m = esmd_filter_match_all(f, line, len, NULL, 0);
        if (m < 0) {
            fprintf(stderr, "esmd match: line %lu: not a JSON object\n", lineno);
            rc = 1;
        }
        fputs(m > 0 ? "true\n" : "false\n", stdout);
    }
    if (got < 0) {
        fprintf(stderr, "esmd match: reading stdin: %s\n", strerror(errno));
        rc = 1;
    }
    if (fflush(stdout) != 0 || ferror(stdout)) {
        fprintf(stderr, "esmd match: writing stdout: %s\n", strerror(errno));
        rc = 1;
    }

out:
    free(r.buf);
    esmd_filter_free(f);
    return rc;
}

static int cmd_version(int argc, char **argv)
{
    if (wants_help(argc, argv)) {
        fputs(usage_version, stdout);
        return 0;
    }
    printf("esmd %s (librdkafka %s, libcurl %s, %zu migrations)\n", ESMD_VERSION,
           rd_kafka_version_str(), curl_version_info(CURLVERSION_NOW)->version,
           esmd_pg_migration_count());
    return 0;
}

/* ---- the service ---- */

struct service {
    struct ev_loop *loop;
    struct esmd_config *cfg;
    char instance_id[256];
    struct esmd_invoker *inv;
    struct esmd_http *http;
    struct esmd_pg *pg;
    struct esmd_dests *dests;
    struct esmd_mapping **maps;
    struct esmd_config **born; /* per mapping: the configuration its source connector was made
                                * from (the connector keeps pointers into it) */
    size_t nmaps;
    struct esmd_admin_auth *auth; /* admin API credentials */
    struct esmd_api_ctx api;      /* the Invoke and event-invoke-config routes' */
    struct esmd_admin *admin;     /* mapping admin API (UpdateEventSourceMapping, /admin/) */
    struct esmd_asyncq *asyncq;   /* asynchronous invocation queue (Invoke, event-invoke-config) */
    const char *config_path;
    /* Configurations replaced by reloads. The first (the start-up's) is kept until exit: the
     * listener and the destinations' connections keep pointers into it. A later one is freed
     * once nothing refers to it any more (cfg_in_use()): the invoker's functions (which the
     * mappings, the async queue and Invoke requests in flight read their settings through) and
     * the mappings. */
    struct esmd_config **old_cfgs;
    size_t nold_cfgs;
    struct retiring
        *retiring; /* mappings a reload stops (removed, or restarting on a new source) */
    size_t nretiring;
    size_t nstopping; /* mappings service_stop() stopped */
    size_t nstopped;
    bool stopping;
    ev_signal sigterm, sigint, sighup;
    ev_timer deadline;
    ev_timer state_timer;
    char **written_results; /* last_processing_result last written per mapping */
};

static bool service_ready(void *ud, struct esmd_buf *detail)
{
    struct service *svc = ud;
    bool pg_ok = svc->pg && esmd_pg_ready(svc->pg);
    bool ready = pg_ok && !svc->stopping;
    esmd_buf_printf(detail, "{\"postgres\":{\"ready\":%s", pg_ok ? "true" : "false");
    if (svc->pg && !pg_ok) {
        const char *e = esmd_pg_last_error(svc->pg);
        esmd_buf_puts(detail, ",\"error\":");
        esmd_buf_put_json_string(detail, e, strlen(e));
    }
    esmd_buf_puts(detail, "},\"mappings\":{");
    for (size_t i = 0; i < svc->nmaps; i++) {
        const char *name = svc->cfg->mappings[i].name;
        if (i)
            esmd_buf_putc(detail, ',');
        esmd_buf_put_json_string(detail, name, strlen(name));
        esmd_buf_putc(detail, ':');
        if (!svc->maps[i]) { /* a reload restarts it (briefly), or could not create it */
            esmd_buf_puts(detail, "{\"ready\":false,\"reason\":\"");
            esmd_buf_puts(detail, svc->nretiring ? "restarting after a configuration reload"
                                                 : "not created: see the log");
            esmd_buf_puts(detail, "\"}");
            ready = ready && svc->nretiring > 0;
            continue;
        }
        esmd_mapping_describe(svc->maps[i], detail);
        if (!esmd_mapping_ready(svc->maps[i]))
            ready = false;
    }
    /* a failing destination shows here but does not make esmd unready: it blocks nothing */
    esmd_buf_puts(detail, "},\"destinations\":");
    if (svc->dests)
        esmd_dests_ready(svc->dests, detail);
    else
        esmd_buf_puts(detail, "{}");
    /* the async queue is needed to accept Invoke(Event): its Postgres connections must be up */
    esmd_buf_puts(detail, ",\"async\":");
    if (svc->asyncq) {
        if (!esmd_asyncq_ready(svc->asyncq, detail))
            ready = false;
    } else {
        esmd_buf_puts(detail, "null");
    }
    esmd_buf_printf(detail, ",\"stopping\":%s}", svc->stopping ? "true" : "false");
    return ready;
}

/* Writes changed last_processing_result values to esmd.mapping_state. */
static void on_state_timer(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct service *svc = w->data;
    for (size_t i = 0; i < svc->nmaps; i++) {
        if (!svc->maps[i])
            continue;
        const char *res = esmd_mapping_last_result(svc->maps[i]);
        if (svc->written_results[i] && strcmp(svc->written_results[i], res) == 0)
            continue;
        free(svc->written_results[i]);
        svc->written_results[i] = esmd_xstrdup(res);
        const char *params[] = {esmd_mapping_name(svc->maps[i]), res};
        if (esmd_pg_query(svc->pg,
                          "UPDATE esmd.mapping_state SET last_processing_result = $2, "
                          "updated_at = now() WHERE name = $1",
                          2, params, NULL, NULL) != ESMD_OK)
            ESMD_WARN(NULL, "could not queue the mapping state update");
    }
}

static void on_dests_stopped(void *ud)
{
    struct service *svc = ud;
    ESMD_INFO(NULL, "all mappings stopped; exiting");
    ev_break(svc->loop, EVBREAK_ALL);
}

static void on_asyncq_stopped(void *ud)
{
    struct service *svc = ud;
    if (svc->dests)
        esmd_dests_stop(svc->dests, on_dests_stopped, svc);
    else
        on_dests_stopped(svc);
}

/* Mappings first (they may still hand on-failure records to the destinations), then the async
 * queue (it settles its invocations in flight, handing records to the destinations), then the
 * destination writers (what they have not delivered stays in the outbox). */
static void service_finish(struct service *svc)
{
    if (svc->asyncq) {
        esmd_asyncq_stop(svc->asyncq, on_asyncq_stopped, svc);
        return;
    }
    if (svc->dests)
        esmd_dests_stop(svc->dests, on_dests_stopped, svc);
    else
        on_dests_stopped(svc);
}

static void on_mapping_stopped(void *ud)
{
    struct service *svc = ud;
    if (++svc->nstopped == svc->nstopping && svc->nretiring == 0)
        service_finish(svc);
}

static void on_deadline(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct service *svc = w->data;
    ESMD_WARN(NULL, "shutdown deadline reached: abandoning work still in flight (not committed)");
    ev_break(loop, EVBREAK_ALL);
    ESMD_UNUSED(svc);
}

static void service_stop(struct service *svc, const char *why)
{
    if (svc->stopping) {
        ESMD_WARN(NULL, "%s again: stopping now, abandoning work in flight", why);
        ev_break(svc->loop, EVBREAK_ALL);
        return;
    }
    svc->stopping = true;
    int64_t longest = 0;
    for (size_t i = 0; i < svc->cfg->nfunctions; i++)
        if (svc->cfg->functions[i].timeout_ms > longest)
            longest = svc->cfg->functions[i].timeout_ms;
    ESMD_INFO(NULL, "%s: stopping (in-flight requests get up to %lld ms)", why, (long long)longest);
    ev_timer_init(&svc->deadline, on_deadline, (double)longest / 1000.0 + 5.0, 0.0);
    svc->deadline.data = svc;
    ev_timer_start(svc->loop, &svc->deadline);
    ev_unref(svc->loop);
    on_state_timer(svc->loop, &svc->state_timer, 0);
    for (size_t i = 0; i < svc->nmaps; i++)
        svc->nstopping += svc->maps[i] != NULL;
    if (svc->nstopping == 0 && svc->nretiring == 0) {
        service_finish(svc);
        return;
    }
    for (size_t i = 0; i < svc->nmaps; i++)
        if (svc->maps[i])
            esmd_mapping_stop(svc->maps[i], on_mapping_stopped, svc);
}

/* A configured mapping's row of esmd.mapping_state: $1 name, $2 function, $3 source kind,
 * $4 enabled, $5 state, $6 instance id. */
#define MAPPING_STATE_UPSERT                                                                       \
    "INSERT INTO esmd.mapping_state (name, function, source_kind, enabled, state, "                \
    "state_transition_reason, instance_id, updated_at) "                                           \
    "VALUES ($1, $2, $3, $4, $5, 'Configuration file', $6, now()) "                                \
    "ON CONFLICT (name) DO UPDATE SET function = $2, source_kind = $3, enabled = $4, "             \
    "state = $5, state_transition_reason = 'Configuration file', instance_id = $6, "               \
    "updated_at = now()"

/* The parameters of MAPPING_STATE_UPSERT for mapping m. */
static void mapping_state_params(const char *params[6], const struct esmd_mapping_cfg *m,
                                 const char *instance_id)
{
    params[0] = m->name;
    params[1] = m->function;
    params[2] = esmd_config_kind_name(m->kind);
    params[3] = m->enabled ? "t" : "f";
    params[4] = m->enabled ? "Enabled" : "Disabled";
    params[5] = instance_id;
}

/* Records the configured mappings in esmd.mapping_state (blocking, before the loop runs). */
static int write_mapping_state(void *ud, char *err, size_t errlen)
{
    const struct service *svc = ud;
    const struct esmd_config *cfg = svc->cfg;
    PGconn *pg = PQconnectdb(cfg->postgres);
    int rc = ESMD_OK;
    if (PQstatus(pg) != CONNECTION_OK) {
        snprintf(err, errlen, "%s", PQerrorMessage(pg));
        rc = ESMD_EIO;
        goto out;
    }
    for (size_t i = 0; i < cfg->nmappings; i++) {
        const struct esmd_mapping_cfg *m = &cfg->mappings[i];
        const char *params[6];
        mapping_state_params(params, m, svc->instance_id);
        PGresult *res = PQexecParams(pg, MAPPING_STATE_UPSERT, 6, NULL, params, NULL, NULL, 0);
        if (PQresultStatus(res) != PGRES_COMMAND_OK) {
            snprintf(err, errlen, "mapping %s: %s", m->name, PQresultErrorMessage(res));
            rc = esmd_pg_error_permanent(pg, res) ? ESMD_EINVAL : ESMD_EIO;
        }
        PQclear(res);
        if (rc)
            break;
    }
out:
    PQfinish(pg);
    return rc;
}

/* ---- reload (SIGHUP, POST /admin/reload; docs/operations.md#reload) ---- */

/* A mapping a reload stops: removed from the file, or restarting on a new source (`next`). */
struct retiring {
    struct service *svc;
    struct esmd_mapping *map;
    struct esmd_config *born;            /* its connector's configuration */
    struct esmd_config *tree;            /* the configuration its settings come from */
    const struct esmd_mapping_cfg *next; /* NULL: removed */
    ev_timer later;
    struct retiring *prev_r, *next_r; /* svc->retiring */
};

static void retiring_unlink(struct retiring *r)
{
    if (r->prev_r)
        r->prev_r->next_r = r->next_r;
    else
        r->svc->retiring = r->next_r;
    if (r->next_r)
        r->next_r->prev_r = r->prev_r;
}

static void record_mapping_state(struct service *svc, const struct esmd_mapping_cfg *m)
{
    const char *params[6];
    mapping_state_params(params, m, svc->instance_id);
    if (esmd_pg_query(svc->pg, MAPPING_STATE_UPSERT, 6, params, NULL, NULL) != ESMD_OK)
        ESMD_WARN(NULL, "could not queue the mapping state update");
}

/* Creates the mapping of mc (not started). NULL when that failed (logged). */
static struct esmd_mapping *mapping_create(struct service *svc, const struct esmd_mapping_cfg *mc)
{
    char err[1024];
    struct esmd_mapping *map =
        esmd_mapping_new(svc->loop, mc, svc->inv, svc->instance_id, err, sizeof(err));
    if (!map) {
        ESMD_ERROR(&(struct esmd_log_ctx){mc->name, mc->function, NULL, NULL}, "reload: %s", err);
        return NULL;
    }
    esmd_mapping_set_destinations(map, svc->dests);
    if (!mc->enabled)
        esmd_mapping_set_enabled(map, false);
    return map;
}

static void mapping_launch(struct service *svc, struct esmd_mapping *map)
{
    const struct esmd_mapping_cfg *mc = esmd_mapping_cfg(map);
    if (esmd_mapping_start(map) != ESMD_OK)
        ESMD_ERROR(&(struct esmd_log_ctx){mc->name, mc->function, NULL, NULL},
                   "reload: mapping could not start");
    record_mapping_state(svc, mc);
}

/* Whether anything running refers to the replaced configuration c: a mapping whose connector was
 * made from it, a mapping stopping that still reads its settings, or a function of the invoker
 * (one the file no longer has keeps its last settings). */
static bool cfg_in_use(const struct service *svc, const struct esmd_config *c)
{
    for (size_t i = 0; i < svc->nmaps; i++)
        if (svc->born[i] == c)
            return true;
    for (const struct retiring *r = svc->retiring; r; r = r->next_r)
        if (r->born == c || r->tree == c)
            return true;
    for (size_t k = 0; k < c->nfunctions; k++) {
        const struct esmd_function *fn = esmd_invoker_function(svc->inv, c->functions[k].name);
        if (fn && esmd_function_cfg(fn) == &c->functions[k])
            return true;
    }
    return false;
}

/* Frees the replaced configurations nothing refers to any more (not the start-up's). */
static void free_unused_cfgs(struct service *svc)
{
    size_t kept = svc->nold_cfgs ? 1 : 0;
    for (size_t i = 1; i < svc->nold_cfgs; i++) {
        if (cfg_in_use(svc, svc->old_cfgs[i]))
            svc->old_cfgs[kept++] = svc->old_cfgs[i];
        else {
            ESMD_DEBUG(NULL, "reload: a replaced configuration is freed (nothing runs on it)");
            esmd_config_free(svc->old_cfgs[i]);
        }
    }
    svc->nold_cfgs = kept;
}

/* From the loop, after the stop: the old mapping is freed (not from inside its own stop
 * callback), the new one of a restart starts. */
static void on_retired(struct ev_loop *loop, ev_timer *w, int revents)
{
    struct retiring *r = w->data;
    struct service *svc = r->svc;
    ESMD_UNUSED(loop);
    ESMD_UNUSED(revents);
    retiring_unlink(r);
    /* a removed mapping's series leave /metrics (docs/metrics.md); a restarted one's go on */
    char *removed = r->next ? NULL : esmd_xstrdup(esmd_mapping_name(r->map));
    esmd_mapping_free(r->map);
    if (removed) {
        esmd_invoker_forget_mapping(svc->inv, removed); /* its handles, before they can go */
        esmd_metrics_hide("mapping", removed);
        free(removed);
    }
    if (r->next && !svc->stopping) {
        struct esmd_mapping *map = mapping_create(svc, r->next);
        for (size_t i = 0; map && i < svc->nmaps; i++)
            if (&svc->cfg->mappings[i] == r->next) {
                svc->maps[i] = map;
                svc->born[i] = svc->cfg;
            }
        if (map) {
            esmd_admin_set_mapping(svc->admin, map); /* its overrides, before it starts */
            mapping_launch(svc, map);
            ESMD_INFO(&(struct esmd_log_ctx){r->next->name, r->next->function, NULL, NULL},
                      "reload: mapping restarted on its new source");
        }
    }
    free(r);
    free_unused_cfgs(svc);
    if (--svc->nretiring == 0 && svc->stopping && svc->nstopped == svc->nstopping)
        service_finish(svc);
}

static void on_retire_stopped(void *ud)
{
    struct retiring *r = ud;
    ev_timer_init(&r->later, on_retired, 0., 0.);
    r->later.data = r;
    ev_timer_start(r->svc->loop, &r->later);
}

static void retire(struct service *svc, struct esmd_mapping *map, struct esmd_config *born,
                   const struct esmd_mapping_cfg *next)
{
    struct retiring *r = esmd_xcalloc(1, sizeof(*r));
    r->svc = svc;
    r->map = map;
    r->born = born;
    r->tree = svc->cfg;
    r->next = next;
    r->next_r = svc->retiring;
    if (svc->retiring)
        svc->retiring->prev_r = r;
    svc->retiring = r;
    svc->nretiring++;
    esmd_mapping_stop(map, on_retire_stopped, r);
}

/* Appends "KEYS" (", "-separated) as a JSON array. */
static void put_keys(struct esmd_buf *b, const char *keys)
{
    esmd_buf_putc(b, '[');
    for (const char *p = keys; p && *p;) {
        const char *e = strstr(p, ", ");
        size_t n = e ? (size_t)(e - p) : strlen(p);
        if (p != keys)
            esmd_buf_putc(b, ',');
        esmd_buf_put_json_string(b, p, n);
        p = e ? e + 2 : p + n;
    }
    esmd_buf_putc(b, ']');
}

static void put_name(struct esmd_buf *b, bool *first, const char *name, const char *keys)
{
    if (!*first)
        esmd_buf_putc(b, ',');
    *first = false;
    if (keys) {
        esmd_buf_puts(b, "{\"name\":");
        esmd_buf_put_json_string(b, name, strlen(name));
        esmd_buf_puts(b, ",\"keys\":");
        put_keys(b, keys);
        esmd_buf_putc(b, '}');
    } else {
        esmd_buf_put_json_string(b, name, strlen(name));
    }
}

/* The mappings of diff d with action a (or, with a < 0, those removed from old) as a JSON
 * array. */
static void put_mappings(struct esmd_buf *b, const struct esmd_config *old,
                         const struct esmd_config *cur, const struct esmd_config_diff *d, int a)
{
    bool first = true;
    esmd_buf_putc(b, '[');
    if (a < 0) {
        for (size_t j = 0; j < old->nmappings; j++)
            if (d->removed[j])
                put_name(b, &first, old->mappings[j].name, NULL);
    } else {
        for (size_t i = 0; i < cur->nmappings; i++)
            if ((int)d->mappings[i].action == a)
                put_name(b, &first, cur->mappings[i].name,
                         a == ESMD_RELOAD_UPDATE || a == ESMD_RELOAD_RESTART ? d->mappings[i].keys
                                                                             : NULL);
    }
    esmd_buf_putc(b, ']');
}

/* Whether the running destination router can store records for uri. */
static bool dest_routable(void *ud, const char *uri)
{
    char err[512];
    return esmd_dests_check(ud, uri, err, sizeof(err)) == 0;
}

/* Reloads the configuration file. Writes the answer (JSON) to out, returns its HTTP status:
 * 200 reloaded, 400 the file was refused (errors listed), 409 a reload is still stopping
 * mappings, 503 esmd is stopping. */
static int service_reload(struct service *svc, const char *why, struct esmd_buf *out)
{
    if (svc->stopping) {
        esmd_buf_puts(out, "{\"reloaded\":false,\"error\":\"esmd is stopping\"}");
        return 503;
    }
    if (svc->nretiring > 0) {
        ESMD_WARN(NULL, "%s: reload refused: the last reload is still stopping %zu mappings", why,
                  svc->nretiring);
        esmd_buf_printf(out,
                        "{\"reloaded\":false,\"error\":\"the last reload is still stopping %zu "
                        "mappings; try again\"}",
                        svc->nretiring);
        return 409;
    }
    ESMD_INFO(NULL, "%s: reloading %s", why, svc->config_path);
    struct esmd_config_errors errs;
    esmd_config_errors_init(&errs);
    struct esmd_config *cfg = esmd_config_load(svc->config_path, &errs);
    if (!cfg) {
        esmd_buf_puts(out, "{\"reloaded\":false,\"errors\":[");
        char line[2048];
        for (size_t i = 0; i < errs.n; i++) {
            esmd_config_error_format(&errs.items[i], line, sizeof(line));
            ESMD_ERROR(NULL, "reload refused: %s", line);
            if (i)
                esmd_buf_putc(out, ',');
            esmd_buf_put_json_string(out, line, strlen(line));
        }
        if (errs.n == 0) {
            snprintf(line, sizeof(line), "%s: could not load the configuration", svc->config_path);
            ESMD_ERROR(NULL, "reload refused: %s", line);
            esmd_buf_put_json_string(out, line, strlen(line));
        }
        esmd_buf_puts(out, "]}");
        ESMD_WARN(NULL, "reload refused: the configuration in force is unchanged");
        esmd_config_errors_free(&errs);
        return 400;
    }
    esmd_config_errors_free(&errs);

    struct esmd_config *old = svc->cfg;
    struct esmd_config_diff d;
    esmd_config_diff(old, cfg, &d);
    esmd_config_keep_restart_keys(cfg, old);
    /* function:// destinations may name the functions this reload adds */
    esmd_dests_set_functions(svc->dests, cfg);
    esmd_config_keep_unroutable(cfg, old, dest_routable, svc->dests, &d);
    for (size_t i = 0; i < d.nrestart; i++)
        ESMD_WARN(NULL,
                  "reload: %s changed: it takes effect only after a restart (the old value "
                  "stays in force)",
                  d.restart[i]);

    /* functions: new requests (mappings' batches, Invoke, the async queue's next attempts) use
     * the new settings; requests in flight finish on the old ones, whose configuration stays
     * until nothing refers to it (cfg_in_use) */
    for (size_t i = 0; i < cfg->nfunctions; i++) {
        const struct esmd_function_cfg *fc = &cfg->functions[i];
        struct esmd_log_ctx lc = {NULL, fc->name, NULL, NULL};
        if (d.functions[i].action == ESMD_RELOAD_ADD) {
            if (esmd_invoker_function(svc->inv, fc->name)) /* removed by an earlier reload */
                esmd_invoker_update_function(svc->inv, fc);
            else
                esmd_invoker_add_function(svc->inv, fc);
            ESMD_INFO(&lc, "reload: function added");
        } else {
            esmd_invoker_update_function(svc->inv, fc);
            if (d.functions[i].action == ESMD_RELOAD_UPDATE)
                ESMD_INFO(&lc, "reload: %s apply to new requests", d.functions[i].keys);
        }
    }

    for (size_t j = 0; j < old->nfunctions; j++)
        if (!esmd_config_function(cfg, old->functions[j].name)) {
            esmd_invoker_remove_function(svc->inv, old->functions[j].name);
            ESMD_INFO(&(struct esmd_log_ctx){NULL, old->functions[j].name, NULL, NULL},
                      "reload: function removed: Invoke answers 404; its queued async events "
                      "wait for it (docs/async.md#reload)");
        }
    esmd_asyncq_reconfigure(svc->asyncq, cfg);

    /* mappings */
    struct esmd_mapping **maps = esmd_xcalloc(cfg->nmappings + 1, sizeof(*maps));
    struct esmd_config **born = esmd_xcalloc(cfg->nmappings + 1, sizeof(*born));
    bool *launch = esmd_xcalloc(cfg->nmappings + 1, sizeof(*launch)); /* created here */
    for (size_t i = 0; i < cfg->nmappings; i++) {
        const struct esmd_mapping_cfg *mc = &cfg->mappings[i];
        struct esmd_log_ctx lc = {mc->name, mc->function, NULL, NULL};
        struct esmd_mapping *was = NULL;
        struct esmd_config *was_born = NULL;
        for (size_t j = 0; j < svc->nmaps && !was; j++)
            if (!strcmp(old->mappings[j].name, mc->name)) {
                was = svc->maps[j];
                was_born = svc->born[j];
            }
        switch (d.mappings[i].action) {
        case ESMD_RELOAD_SAME:
        case ESMD_RELOAD_UPDATE:
            maps[i] = was;
            born[i] = was_born;
            if (was)
                esmd_mapping_set_cfg(was, mc);
            if (d.mappings[i].action == ESMD_RELOAD_UPDATE)
                ESMD_INFO(&lc, "reload: %s apply in place", d.mappings[i].keys);
            break;
        case ESMD_RELOAD_RESTART:
            ESMD_INFO(&lc, "reload: %s changed: the mapping stops gracefully and starts again",
                      d.mappings[i].keys);
            if (was)
                retire(svc, was, was_born, mc);
            break;
        case ESMD_RELOAD_ADD:
            ESMD_INFO(&lc, "reload: mapping added");
            break;
        }
        /* added, or one that an earlier reload could not create: created now */
        if (!was) {
            maps[i] = mapping_create(svc, mc);
            born[i] = cfg;
            launch[i] = maps[i] != NULL;
        }
    }
    for (size_t j = 0; j < old->nmappings; j++) {
        if (!d.removed[j] || !svc->maps[j])
            continue;
        ESMD_INFO(
            &(struct esmd_log_ctx){old->mappings[j].name, old->mappings[j].function, NULL, NULL},
            "reload: mapping removed: it stops gracefully");
        retire(svc, svc->maps[j], svc->born[j], NULL);
    }
    for (size_t i = 0; i < svc->nmaps; i++)
        free(svc->written_results[i]);
    free(svc->written_results);
    svc->written_results = esmd_xcalloc(cfg->nmappings + 1, sizeof(char *));
    free(svc->maps);
    svc->maps = maps;
    free(svc->born);
    svc->born = born;
    svc->nmaps = cfg->nmappings;
    svc->old_cfgs = esmd_xrealloc(svc->old_cfgs, (svc->nold_cfgs + 1) * sizeof(*svc->old_cfgs));
    svc->old_cfgs[svc->nold_cfgs++] = old;
    svc->cfg = cfg;
    svc->api.cfg = cfg; /* Invoke and event-invoke-config resolve names in it */
    /* the values in force: the file's, or the admin API's overrides */
    esmd_admin_reconfigure(svc->admin, cfg, maps, cfg->nmappings);
    for (size_t i = 0; i < cfg->nmappings; i++)
        if (launch[i])
            mapping_launch(svc, maps[i]);
        else if (d.mappings[i].action == ESMD_RELOAD_UPDATE)
            record_mapping_state(svc, &cfg->mappings[i]);
    free(launch);

    esmd_buf_puts(out, "{\"reloaded\":true,\"file\":");
    esmd_buf_put_json_string(out, svc->config_path, strlen(svc->config_path));
    esmd_buf_puts(out, ",\"mappings\":{\"updated\":");
    put_mappings(out, old, cfg, &d, ESMD_RELOAD_UPDATE);
    esmd_buf_puts(out, ",\"restarted\":");
    put_mappings(out, old, cfg, &d, ESMD_RELOAD_RESTART);
    esmd_buf_puts(out, ",\"added\":");
    put_mappings(out, old, cfg, &d, ESMD_RELOAD_ADD);
    esmd_buf_puts(out, ",\"removed\":");
    put_mappings(out, old, cfg, &d, -1);
    esmd_buf_puts(out, ",\"unchanged\":");
    put_mappings(out, old, cfg, &d, ESMD_RELOAD_SAME);
    esmd_buf_puts(out, "},\"functions\":{\"updated\":[");
    bool first = true;
    for (size_t i = 0; i < cfg->nfunctions; i++)
        if (d.functions[i].action == ESMD_RELOAD_UPDATE)
            put_name(out, &first, cfg->functions[i].name, d.functions[i].keys);
    esmd_buf_puts(out, "],\"added\":[");
    first = true;
    for (size_t i = 0; i < cfg->nfunctions; i++)
        if (d.functions[i].action == ESMD_RELOAD_ADD)
            put_name(out, &first, cfg->functions[i].name, NULL);
    esmd_buf_puts(out, "],\"removed\":[");
    first = true;
    for (size_t j = 0; j < old->nfunctions; j++)
        if (!esmd_config_function(cfg, old->functions[j].name))
            put_name(out, &first, old->functions[j].name, NULL);
    esmd_buf_puts(out, "]},\"needs_restart\":[");
    for (size_t i = 0; i < d.nrestart; i++) {
        if (i)
            esmd_buf_putc(out, ',');
        esmd_buf_put_json_string(out, d.restart[i], strlen(d.restart[i]));
    }
    esmd_buf_puts(out, "]}");
    ESMD_INFO(NULL, "%s: reloaded: %s", why, esmd_buf_cstr(out));
    esmd_config_diff_free(&d);
    free_unused_cfgs(svc); /* old too, unless something still runs on it */
    return 200;
}

static void route_reload(void *ud, struct esmd_http_req *req)
{
    struct service *svc = ud;
    struct esmd_buf b = ESMD_BUF_INIT;
    int status = service_reload(svc, "POST /admin/reload", &b);
    esmd_http_respond(req, status, "application/json", b.data, b.len);
    esmd_buf_free(&b);
}

static void on_signal(struct ev_loop *loop, ev_signal *w, int revents)
{
    struct service *svc = w->data;
    if (w->signum == SIGHUP) {
        struct esmd_buf b = ESMD_BUF_INIT;
        (void)service_reload(svc, "SIGHUP", &b);
        esmd_buf_free(&b);
        return;
    }
    service_stop(svc, w->signum == SIGTERM ? "SIGTERM" : "SIGINT");
}

static int apply_migrations(void *ud, char *err, size_t errlen)
{
    const struct service *svc = ud;
    int applied = 0;
    int rc = esmd_pg_migrate(svc->cfg->postgres, &applied, err, errlen);
    if (rc == ESMD_OK && applied > 0)
        ESMD_INFO(NULL, "applied %d database migration%s", applied, applied == 1 ? "" : "s");
    return rc;
}

static int load_overrides(void *ud, char *err, size_t errlen)
{
    const struct service *svc = ud;
    return esmd_admin_load(svc->admin, err, errlen);
}

/* SIGTERM or SIGINT while start-up waits for the database (before the loop's ev_signal
 * watchers exist): stop waiting and exit 0, as a stop after start-up does. */
static volatile sig_atomic_t startup_stop_signal;

static void on_startup_signal(int sig)
{
    startup_stop_signal = sig;
}

/* Until the loop's watchers take over: SIGTERM/SIGINT end start-up, SIGHUP is ignored. */
static void startup_signals(void)
{
    struct sigaction sa = {0};
    sa.sa_handler = on_startup_signal;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGTERM, &sa, NULL);
    sigaction(SIGINT, &sa, NULL);
    sa.sa_handler = SIG_IGN;
    sigaction(SIGHUP, &sa, NULL);
}

/* Runs one start-up step that needs the database until it succeeds. esmd does not give up on a
 * database that is not ready (docs/operations.md#start-up): it may be down, starting, restarting
 * or shutting down, or a lock may hold a step up, and each such failure (the step returns
 * ESMD_EIO) is logged and retried after 1, 1, 1, then 2 seconds, for as long as it takes. An
 * error that retrying will not mend (ESMD_EINVAL: esmd_pg_error_permanent, such as a permission
 * refused or a migration failing) is logged and returned at once: esmd exits 1. A stop signal
 * ends the wait: returns ESMD_ESTATE then, ESMD_OK once the step succeeded. Every step is
 * idempotent. */
static int startup_step(struct service *svc, const char *what,
                        int (*step)(void *ud, char *err, size_t errlen))
{
    char err[1024];
    for (int attempt = 0; !startup_stop_signal; attempt++) {
        err[0] = '\0';
        int rc = step(svc, err, sizeof(err));
        if (rc == ESMD_OK) {
            if (attempt > 0)
                ESMD_INFO(NULL, "%s: done after %d attempts", what, attempt + 1);
            return ESMD_OK;
        }
        size_t n = strlen(err);
        while (n > 0 && (err[n - 1] == '\n' || err[n - 1] == ' '))
            err[--n] = '\0';
        if (rc == ESMD_EINVAL) {
            ESMD_ERROR(NULL, "%s failed: %s (an error retrying will not mend: not retried)", what,
                       err);
            return ESMD_EINVAL;
        }
        ESMD_WARN(NULL, "%s: database not ready (%s); retrying", what, err);
        unsigned left = attempt < 3 ? 1 : 2;
        while (left > 0 && !startup_stop_signal)
            left = sleep(left);
    }
    ESMD_INFO(NULL, "%s: stopped by %s before start-up ended", what,
              startup_stop_signal == SIGTERM ? "SIGTERM" : "SIGINT");
    return ESMD_ESTATE;
}

static int cmd_run(int argc, char **argv)
{
    struct run_opts o = {0};
    int rc = parse_opts(argc, argv, usage_run, true, &o);
    if (rc)
        return rc < 0 ? 0 : rc;
    const char *lvl = o.log_level ? o.log_level : getenv("ESMD_LOG_LEVEL");
    if (lvl) {
        enum esmd_log_level l;
        if (esmd_log_parse_level(lvl, &l) != ESMD_OK) {
            fprintf(stderr, "esmd: unknown log level '%s' (debug, info, warn, error)\n", lvl);
            return EXIT_USAGE;
        }
        esmd_log_set_level(l);
    }
    struct service svc = {0};
    svc.config_path = o.config;
    svc.cfg = load_config(o.config);
    if (!svc.cfg)
        return 1;
    const char *iid = o.instance_id ? o.instance_id : getenv("ESMD_INSTANCE_ID");
    if (iid)
        snprintf(svc.instance_id, sizeof(svc.instance_id), "%s", iid);
    else if (gethostname(svc.instance_id, sizeof(svc.instance_id) - 1) != 0)
        snprintf(svc.instance_id, sizeof(svc.instance_id), "esmd-%d", (int)getpid());
    ESMD_INFO(NULL, "esmd %s starting (instance %s, config %s)", ESMD_VERSION, svc.instance_id,
              o.config);

    int exit_code = 1;
    char err[1024];
    startup_signals();
    if ((rc = startup_step(&svc, "database migrations", apply_migrations)) != ESMD_OK ||
        (rc = startup_step(&svc, "recording the mapping state", write_mapping_state)) != ESMD_OK) {
        exit_code = rc == ESMD_ESTATE ? 0 : 1;
        goto out;
    }

    signal(SIGPIPE, SIG_IGN);
    svc.loop = ev_default_loop(EVFLAG_AUTO);
    ev_signal_init(&svc.sigterm, on_signal, SIGTERM);
    ev_signal_init(&svc.sigint, on_signal, SIGINT);
    ev_signal_init(&svc.sighup, on_signal, SIGHUP);
    svc.sigterm.data = svc.sigint.data = svc.sighup.data = &svc;

    svc.inv = esmd_invoker_new(svc.loop, err, sizeof(err));
    if (!svc.inv) {
        ESMD_ERROR(NULL, "invoker: %s", err);
        goto out;
    }
    for (size_t i = 0; i < svc.cfg->nfunctions; i++)
        esmd_invoker_add_function(svc.inv, &svc.cfg->functions[i]);

    svc.pg = esmd_pg_new(svc.loop, svc.cfg->postgres, "state", err, sizeof(err));
    if (!svc.pg) {
        ESMD_ERROR(NULL, "postgres: %s", err);
        goto out;
    }
    /* Always: the outbox may hold records of an earlier run to deliver. */
    svc.dests =
        esmd_dests_new(svc.loop, svc.cfg, svc.cfg->postgres, svc.instance_id, err, sizeof(err));
    if (!svc.dests) {
        ESMD_ERROR(NULL, "destinations: %s", err);
        goto out;
    }
    svc.http =
        esmd_http_start(svc.loop, svc.cfg->admin.listen,
                        &(struct esmd_http_limits){
                            .per_client = (unsigned)svc.cfg->admin.max_connections_per_client},
                        err, sizeof(err));
    if (!svc.http) {
        ESMD_ERROR(NULL, "admin listener %s: %s", svc.cfg->admin.listen, err);
        goto out;
    }
    esmd_http_set_ready_fn(svc.http, service_ready, &svc);
    ESMD_INFO(NULL, "admin listener on %s", svc.cfg->admin.listen);

    svc.maps = esmd_xcalloc(svc.cfg->nmappings + 1, sizeof(*svc.maps));
    svc.born = esmd_xcalloc(svc.cfg->nmappings + 1, sizeof(*svc.born));
    svc.written_results = esmd_xcalloc(svc.cfg->nmappings + 1, sizeof(char *));
    /* Every mapping is created, the disabled ones too (the admin API may enable them); the
     * admin API's persisted overrides are applied before any starts. */
    for (size_t i = 0; i < svc.cfg->nmappings; i++) {
        const struct esmd_mapping_cfg *mc = &svc.cfg->mappings[i];
        struct esmd_mapping *map =
            esmd_mapping_new(svc.loop, mc, svc.inv, svc.instance_id, err, sizeof(err));
        if (!map) {
            ESMD_ERROR(NULL, "%s", err);
            goto out;
        }
        svc.born[svc.nmaps] = svc.cfg;
        svc.maps[svc.nmaps++] = map;
        esmd_mapping_set_destinations(map, svc.dests);
        if (!mc->enabled) {
            ESMD_INFO(&(struct esmd_log_ctx){mc->name, mc->function, NULL, NULL},
                      "mapping disabled in the configuration");
            esmd_mapping_set_enabled(map, false);
        }
    }
    svc.auth = esmd_admin_auth_new(&svc.cfg->admin);
    /* Credentials are checked from the headers, before a request's body is read. */
    esmd_http_set_auth(svc.http, esmd_admin_auth_request, svc.auth);
    svc.asyncq = esmd_asyncq_new(svc.loop, svc.cfg, svc.inv, svc.dests, svc.cfg->postgres,
                                 svc.instance_id, err, sizeof(err));
    if (!svc.asyncq) {
        ESMD_ERROR(NULL, "async queue: %s", err);
        goto out;
    }
    svc.api = (struct esmd_api_ctx){svc.cfg, svc.asyncq, svc.inv, svc.dests, svc.auth};
    if (esmd_api_invoke_routes(&svc.api, svc.http) != ESMD_OK ||
        esmd_api_eic_routes(&svc.api, svc.http) != ESMD_OK) {
        ESMD_ERROR(NULL, "async queue: could not register its routes");
        goto out;
    }
    svc.admin = esmd_admin_new(svc.loop, svc.cfg, svc.maps, svc.nmaps, svc.dests, svc.auth,
                               svc.cfg->postgres, svc.instance_id, err, sizeof(err));
    if (!svc.admin) {
        ESMD_ERROR(NULL, "admin API: %s", err);
        goto out;
    }
    if ((rc = startup_step(&svc, "reading the mapping overrides", load_overrides)) != ESMD_OK) {
        exit_code = rc == ESMD_ESTATE ? 0 : 1;
        goto out;
    }
    if (esmd_admin_start(svc.admin, svc.http) != ESMD_OK ||
        esmd_admin_console_routes(svc.http, svc.auth, svc.inv) != ESMD_OK ||
        esmd_http_route(svc.http, "POST", "/admin/reload", route_reload, &svc) != ESMD_OK) {
        ESMD_ERROR(NULL, "admin API: could not register its routes");
        goto out;
    }
    for (size_t i = 0; i < svc.nmaps; i++) {
        if (esmd_mapping_start(svc.maps[i]) != ESMD_OK) {
            const struct esmd_mapping_cfg *mc = &svc.cfg->mappings[i];
            ESMD_ERROR(&(struct esmd_log_ctx){mc->name, mc->function, NULL, NULL},
                       "mapping could not start");
            goto out;
        }
    }
    ev_timer_init(&svc.state_timer, on_state_timer, 5.0, 5.0);
    svc.state_timer.data = &svc;
    ev_timer_start(svc.loop, &svc.state_timer);
    ev_unref(svc.loop); /* the state timer alone does not keep the loop running */

    /* The loop's own signal watchers replace start-up's handlers; a stop signal that came
     * meanwhile stops the service as soon as the loop runs. */
    ev_signal_start(svc.loop, &svc.sigterm);
    ev_signal_start(svc.loop, &svc.sigint);
    ev_signal_start(svc.loop, &svc.sighup);
    if (startup_stop_signal)
        service_stop(&svc, startup_stop_signal == SIGTERM ? "SIGTERM" : "SIGINT");
    ev_run(svc.loop, 0);
    exit_code = 0;

out:
    /* The admin API first (its queries still waiting may touch the mappings and answer admin
     * requests), then the destinations: nothing may call into a freed mapping afterwards. */
    esmd_admin_free(svc.admin);
    esmd_asyncq_free(svc.asyncq); /* before the destinations: it holds sends in flight */
    esmd_dests_free(svc.dests);
    for (size_t i = 0; i < svc.nmaps; i++)
        esmd_mapping_free(svc.maps[i]);
    while (svc.retiring) { /* the shutdown deadline came first */
        struct retiring *r = svc.retiring;
        retiring_unlink(r);
        ev_timer_stop(svc.loop, &r->later);
        esmd_mapping_free(r->map);
        free(r);
    }
    if (svc.written_results)
        for (size_t i = 0; i < svc.nmaps; i++)
            free(svc.written_results[i]);
    free(svc.written_results);
    free(svc.maps);
    free(svc.born);
    esmd_http_stop(svc.http);
    esmd_admin_auth_free(svc.auth);
    esmd_pg_free(svc.pg);
    esmd_invoker_free(svc.inv);
    esmd_config_free(svc.cfg);
    for (size_t i = 0; i < svc.nold_cfgs; i++)
        esmd_config_free(svc.old_cfgs[i]);
    free(svc.old_cfgs);
    esmd_metrics_reset();
    ESMD_INFO(NULL, "esmd exiting with status %d", exit_code);
    return exit_code;
}

int main(int argc, char **argv)
{
    curl_global_init(CURL_GLOBAL_ALL);
    int rc;
    if (argc < 2) {
        fputs(usage_main, stderr);
        rc = EXIT_USAGE;
    } else if (strcmp(argv[1], "--help") == 0 || strcmp(argv[1], "-h") == 0 ||
               strcmp(argv[1], "help") == 0) {
        fputs(usage_main, stdout);
        rc = 0;
    } else if (strcmp(argv[1], "run") == 0) {
        rc = cmd_run(argc - 1, argv + 1);
    } else if (strcmp(argv[1], "check-config") == 0) {
        rc = cmd_check_config(argc - 1, argv + 1);
    } else if (strcmp(argv[1], "migrate") == 0) {
        rc = cmd_migrate(argc - 1, argv + 1);
    } else if (strcmp(argv[1], "match") == 0) {
        rc = cmd_match(argc - 1, argv + 1);
    } else if (strcmp(argv[1], "version") == 0 || strcmp(argv[1], "--version") == 0) {
        rc = cmd_version(argc - 1, argv + 1);
    } else {
        fprintf(stderr, "esmd: unknown command '%s'\n\n%s", argv[1], usage_main);
        rc = EXIT_USAGE;
    }
    curl_global_cleanup();
    return rc;
}
