#!/usr/bin/env python3
"""Postgres queue → esmd → HTTP function throughput benchmark (python3 stdlib only; not a test).

Starts a throwaway PostgreSQL (pgtmp.py), applies esmd's migrations, fills a queue with generated
messages (pgqtool fill), measures a plain client loop doing the same claims and deletes esmd
does, without invoking anything (pgqtool drain: the ceiling), fills the queue again, then runs
`esmd run` with the `sink` function endpoint until the sink has seen every message and the queue
is empty, and prints a table. See tests/bench/README.md.

    python3 tests/bench/pgqueue_bench.py [--build DIR] [--messages N] [--batch-size B] ...
"""

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as bl  # noqa: E402
from benchlib import log, psql, run  # noqa: E402

QUEUE = "bench"


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    bl.add_build_arg(ap, "esmd, pgqtool, sink")
    ap.add_argument("--messages", type=int, default=500000)
    ap.add_argument("--size", type=int, default=100, help="body bytes per message")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--window", default="0ms", help="maximum_batching_window")
    ap.add_argument("--concurrency", type=int, default=8,
                    help="source maximum_concurrency (batches in flight)")
    ap.add_argument("--function-concurrency", type=int, default=16,
                    help="function max_concurrency")
    ap.add_argument("--ceiling-runs", type=int, default=1,
                    help="plain claim+delete loop runs; the best is the ceiling")
    ap.add_argument("--timeout", type=float, default=600, help="seconds to wait for esmd")
    ap.add_argument("--skip-esmd", action="store_true", help="only measure the ceiling")
    bl.add_run_args(ap)
    return ap.parse_args()


def fill(a, tools, pg):
    out = run([tools["pgqtool"], "fill", "-d", pg.url, "-q", QUEUE, "--count", str(a.messages),
               "--size", str(a.size)])
    log(out)
    psql(pg, "VACUUM ANALYZE esmd.queue_messages")
    n = int(psql(pg, "SELECT count(*) FROM esmd.queue_messages WHERE queue = '%s'" % QUEUE))
    if n != a.messages:
        raise RuntimeError("the queue holds %d messages, expected %d" % (n, a.messages))
    return float(out.split("=")[-1].split()[0])


def write_config(path, pg_url, admin_port, sink_port, a):
    mappings = """\
  - name: bench
    function: sink
    source:
      pgqueue: {queue}
      visibility_timeout: 60s
      maximum_concurrency: {conc}
    batch_size: {batch}
    maximum_batching_window: {window}
""".format(queue=QUEUE, conc=a.concurrency, batch=a.batch_size, window=a.window)
    bl.esmd_config(path, "pgqueue_bench.py", pg_url, admin_port, sink_port,
                   a.function_concurrency, mappings=mappings)


def run_esmd(a, tools, pg, tmp, results):
    procs = bl.Procs()
    try:
        sink, sink_port = bl.start_sink(procs, tools, '"messageId":')
        cfg = os.path.join(tmp, "esmd.yaml")
        admin_port = bl.free_port()
        write_config(cfg, pg.url, admin_port, sink_port, a)
        esmd_log = os.path.join(tmp, "esmd.log")
        sink_cpu0 = bl.cpu_seconds(sink.pid)
        pg_cpu0 = bl.pg_cpu_seconds(pg)
        t_start = time.monotonic()
        with open(esmd_log, "w") as logf:
            esmd = procs.start("esmd", a.wrap.split() + [tools["esmd"], "run", "-c", cfg],
                               stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        w = bl.wait_for_sink(esmd, sink_port, a.messages, a.timeout, esmd_log, t_start,
                             what="messages", warn_after=10)
        cpu = {"esmd": bl.cpu_seconds(esmd.pid), "sink": bl.cpu_seconds(sink.pid) - sink_cpu0,
               "postgres": bl.pg_cpu_seconds(pg) - pg_cpu0}
        # the last deletes follow the last invocation: wait for the queue to be empty
        left = None
        for _ in range(200):
            left = int(psql(pg, "SELECT count(*) FROM esmd.queue_messages"))
            if left == 0:
                break
            time.sleep(0.1)
        t_empty = time.monotonic()
        stats = bl.sink_stats(sink_port)
        bl.save_metrics(admin_port, os.path.join(tmp, "metrics.txt"))
        rc = procs.stop(esmd, timeout=30)
        results.update(bl.esmd_figures(a.messages, t_start, w, stats))
        results.update({
            "esmd_rate_empty": a.messages / max(t_empty - w["t_first"], 1e-9),
            "left": left,
            "esmd_exit": rc,
            "cpu": cpu,
        })
    finally:
        procs.stop_all()


def print_table(a, r):
    rows = [
        ("messages x body bytes", "%d x %d B, batch_size %d, maximum_concurrency %d"
         % (a.messages, a.size, a.batch_size, a.concurrency)),
        ("fill (esmd.send_batch)", "%.0f messages/s" % r["fill_rate"]),
        ("ceiling (receive+delete loop)", "%.0f messages/s (best of %s)"
         % (r["ceiling"], bl.runs_text(r["ceiling_runs"]))),
    ]
    if "esmd_rate" in r:
        rows += [
            ("esmd (first→last message)", "%.0f messages/s" % r["esmd_rate"]),
            ("esmd / ceiling", "%.1f %%" % (100.0 * r["esmd_rate"] / r["ceiling"])),
            ("esmd (first message→queue empty)", "%.0f messages/s" % r["esmd_rate_empty"]),
            ("esmd (from process start)", "%.0f messages/s (first message after %.2f s)"
             % (r["esmd_rate_from_start"], r["esmd_first_s"])),
            ("esmd peak RSS (VmHWM)", "%.1f MB" % r["rss_mb"]),
            ("CPU s during the run", "esmd %.2f, postgres %.2f, sink %.2f (of %d CPUs)"
             % (r["cpu"]["esmd"], r["cpu"]["postgres"], r["cpu"]["sink"], os.cpu_count())),
        ] + bl.request_rows(r, a.messages, "messages") + [
            ("messages left in the table", "%s" % r["left"]),
            ("esmd exit status on SIGTERM", "%s" % r["esmd_exit"]),
        ]
    bl.print_rows(rows)


def main():
    a = parse_args()
    tools = bl.find_tools(a.build, ["pgqtool", "esmd"] + ([] if a.skip_esmd else ["sink"]),
                          "pgqueue_bench", ["sink"])
    tmp = tempfile.mkdtemp(prefix="esmd-pgq-bench-")
    pg = bl.PgTmp(keep=a.keep, settings={"max_wal_size": "4GB", "shared_buffers": "256MB"})
    results = {}
    try:
        log("start postgres")
        pg.start()
        migrate_cfg = os.path.join(tmp, "migrate.yaml")
        with open(migrate_cfg, "w") as f:
            f.write("postgres: %s\nfunctions: { f: { url: 'http://127.0.0.1:9/' } }\n"
                    "mappings: [{ name: m, function: f, source: { pgqueue: %s } }]\n"
                    % (pg.url, QUEUE))
        log(run([tools["esmd"], "migrate", "-c", migrate_cfg]))
        runs = []
        for i in range(a.ceiling_runs):
            results["fill_rate"] = fill(a, tools, pg)
            out = run([tools["pgqtool"], "drain", "-d", pg.url, "-q", QUEUE, "--count",
                       str(a.messages), "--batch", str(a.batch_size)])
            log(out)
            runs.append(float(out.split("=")[-1].split()[0]))
        results["ceiling"] = max(runs)
        results["ceiling_runs"] = runs
        if not a.skip_esmd:
            fill(a, tools, pg)
            run_esmd(a, tools, pg, tmp, results)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        log("FAILED: %s" % e)
        if a.keep:
            log("files kept in %s" % tmp)
        return 1
    finally:
        pg.stop()
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print_table(a, results)
    if a.keep:
        log("files kept in %s (postgres in %s)" % (tmp, pg.tmpdir))
    return 0


if __name__ == "__main__":
    sys.exit(main())
