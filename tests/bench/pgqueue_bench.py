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
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pgtmp  # noqa: E402

QUEUE = "bench"


def log(msg):
    print("[bench] " + msg, file=sys.stderr, flush=True)


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build", default="./build", help="dir holding esmd, pgqtool, sink")
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
    ap.add_argument("--wrap", default="",
                    help="command line to run esmd under, e.g. 'perf record -g -o esmd.perf'")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (config, logs)")
    return ap.parse_args()


def run(args, timeout=900):
    out = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError("%s failed (%d): %s%s" % (" ".join(args), out.returncode, out.stdout,
                                                     out.stderr))
    return out.stdout.strip()


def psql(pg, sql):
    return run([os.path.join(pg.bindir, "psql"), "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1",
                "-d", pg.url, "-c", sql], 600)


def tail(path, n=30):
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


def sink_stats(port):
    with urllib.request.urlopen("http://127.0.0.1:%d/stats" % port, timeout=5) as r:
        return json.loads(r.read())


def proc_status(pid, key):
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def cpu_seconds(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def pg_cpu_seconds(pg):
    """CPU seconds of the postmaster and its live children (the backends)."""
    try:
        with open(os.path.join(pg.datadir, "postmaster.pid")) as f:
            master = int(f.readline())
    except (OSError, ValueError):
        return 0.0
    total = cpu_seconds(master)
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % d) as f:
                ppid = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        if ppid == master:
            total += cpu_seconds(int(d))
    return total


def stop(p, timeout=30):
    if p.poll() is not None:
        return p.returncode
    p.send_signal(signal.SIGTERM)
    try:
        return p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        return p.wait()


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
    with open(path, "w") as f:
        f.write("""\
# Generated by tests/bench/pgqueue_bench.py
postgres: {pg}
admin:
  listen: 127.0.0.1:{admin}
functions:
  sink:
    url: http://127.0.0.1:{sink}/2015-03-31/functions/function/invocations
    timeout: 30s
    max_concurrency: {fconc}
mappings:
  - name: bench
    function: sink
    source:
      pgqueue: {queue}
      visibility_timeout: 60s
      maximum_concurrency: {conc}
    batch_size: {batch}
    maximum_batching_window: {window}
""".format(pg=pg_url, admin=admin_port, sink=sink_port, fconc=a.function_concurrency,
           queue=QUEUE, conc=a.concurrency, batch=a.batch_size, window=a.window))


def run_esmd(a, tools, pg, tmp, results):
    sink = subprocess.Popen([tools["sink"], "--port", "0", "--pattern", '"messageId":'],
                            stdout=subprocess.PIPE, text=True)
    esmd = None
    try:
        sink_port = int(sink.stdout.readline().strip())
        cfg = os.path.join(tmp, "esmd.yaml")
        admin_port = pgtmp.free_port()
        write_config(cfg, pg.url, admin_port, sink_port, a)
        esmd_log = os.path.join(tmp, "esmd.log")
        sink_cpu0 = cpu_seconds(sink.pid)
        pg_cpu0 = pg_cpu_seconds(pg)
        t_start = time.monotonic()
        with open(esmd_log, "w") as logf:
            esmd = subprocess.Popen(a.wrap.split() + [tools["esmd"], "run", "-c", cfg],
                                    stdout=logf, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL)
        t_first = t_last = None
        hwm = 0
        last, last_progress = -1, time.monotonic()
        deadline = t_start + a.timeout
        while True:
            now = time.monotonic()
            if esmd.poll() is not None:
                raise RuntimeError("esmd exited with %d:\n%s" % (esmd.returncode, tail(esmd_log)))
            hwm = max(hwm, proc_status(esmd.pid, "VmHWM") or 0)
            stats = sink_stats(sink_port)
            if stats["records"] > 0 and t_first is None:
                t_first = now
            if stats["records"] != last:
                last, last_progress = stats["records"], now
                if stats["records"] >= a.messages:
                    t_last = now
                    break
            if now > deadline:
                raise RuntimeError("timeout: the sink saw %d of %d messages; esmd log:\n%s"
                                   % (stats["records"], a.messages, tail(esmd_log)))
            if now - last_progress > 10:
                log("no progress for %.0f s at %d messages" % (now - last_progress, last))
                last_progress = now
            time.sleep(0.02)
        cpu = {"esmd": cpu_seconds(esmd.pid), "sink": cpu_seconds(sink.pid) - sink_cpu0,
               "postgres": pg_cpu_seconds(pg) - pg_cpu0}
        # the last deletes follow the last invocation: wait for the queue to be empty
        left = None
        for _ in range(200):
            left = int(psql(pg, "SELECT count(*) FROM esmd.queue_messages"))
            if left == 0:
                break
            time.sleep(0.1)
        t_empty = time.monotonic()
        stats = sink_stats(sink_port)
        with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % admin_port, timeout=5) as r:
            with open(os.path.join(tmp, "metrics.txt"), "wb") as f:
                f.write(r.read())
        rc = stop(esmd)
        results.update({
            "esmd_rate": a.messages / max(t_last - t_first, 1e-9),
            "esmd_rate_empty": a.messages / max(t_empty - t_first, 1e-9),
            "esmd_rate_from_start": a.messages / max(t_last - t_start, 1e-9),
            "esmd_first_s": t_first - t_start,
            "rss_mb": hwm / 1024.0,
            "requests": stats["requests"],
            "records_seen": stats["records"],
            "bytes": stats["bytes"],
            "left": left,
            "esmd_exit": rc,
            "cpu": cpu,
        })
    finally:
        if esmd is not None:
            stop(esmd)
        stop(sink)


def print_table(a, r):
    rows = [
        ("messages x body bytes", "%d x %d B, batch_size %d, maximum_concurrency %d"
         % (a.messages, a.size, a.batch_size, a.concurrency)),
        ("fill (esmd.send_batch)", "%.0f messages/s" % r["fill_rate"]),
        ("ceiling (receive+delete loop)", "%.0f messages/s (best of %s)"
         % (r["ceiling"], " / ".join("%.0f" % x for x in r["ceiling_runs"]))),
    ]
    if "esmd_rate" in r:
        reqs = r["requests"]
        rows += [
            ("esmd (first→last message)", "%.0f messages/s" % r["esmd_rate"]),
            ("esmd / ceiling", "%.1f %%" % (100.0 * r["esmd_rate"] / r["ceiling"])),
            ("esmd (first message→queue empty)", "%.0f messages/s" % r["esmd_rate_empty"]),
            ("esmd (from process start)", "%.0f messages/s (first message after %.2f s)"
             % (r["esmd_rate_from_start"], r["esmd_first_s"])),
            ("esmd peak RSS (VmHWM)", "%.1f MB" % r["rss_mb"]),
            ("CPU s during the run", "esmd %.2f, postgres %.2f, sink %.2f (of %d CPUs)"
             % (r["cpu"]["esmd"], r["cpu"]["postgres"], r["cpu"]["sink"], os.cpu_count())),
            ("requests", "%d" % reqs),
            ("avg messages/request", "%.1f" % (r["records_seen"] / reqs if reqs else 0)),
            ("avg request body", "%.1f KB" % (r["bytes"] / reqs / 1024.0 if reqs else 0)),
            ("messages at sink", "%d (%d duplicates)" % (r["records_seen"],
                                                         r["records_seen"] - a.messages)),
            ("messages left in the table", "%s" % r["left"]),
            ("esmd exit status on SIGTERM", "%s" % r["esmd_exit"]),
        ]
    width = max(len(k) for k, _ in rows)
    print()
    for k, v in rows:
        print("%-*s  %s" % (width, k, v))
    sys.stdout.flush()


def main():
    a = parse_args()
    tools = {n: os.path.join(a.build, n) for n in ("pgqtool", "sink", "esmd")}
    for n in ["pgqtool", "esmd"] + ([] if a.skip_esmd else ["sink"]):
        if not os.access(tools[n], os.X_OK):
            sys.exit("pgqueue_bench: %s not found or not executable (build it, or --build DIR)"
                     % tools[n])
    tmp = tempfile.mkdtemp(prefix="esmd-pgq-bench-")
    pg = pgtmp.PgTmp(keep=a.keep, settings={"max_wal_size": "4GB", "shared_buffers": "256MB"})
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
