#!/usr/bin/env python3
"""Redis stream → esmd → HTTP function throughput benchmark (python3 stdlib only; not a test).

Starts a throwaway redis-server, fills stream `bench` with generated entries, measures what a
plain client loop doing XREADGROUP + XACK reads (the ceiling), then runs `esmd run` against a
throwaway PostgreSQL and the `sink` function endpoint until the sink has seen every entry, and
prints a table. See tests/bench/README.md.

    python3 tests/bench/redis_bench.py [--build DIR] [--records N] [--batch-size B] ...
"""

import argparse
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as bl  # noqa: E402
from benchlib import log  # noqa: E402


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    bl.add_build_arg(ap, "esmd, redistool, sink")
    ap.add_argument("--records", type=int, default=500000)
    ap.add_argument("--size", type=int, default=100, help="bytes of each entry's one value")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--window", default="0ms", help="maximum_batching_window (redis default 0)")
    ap.add_argument("--concurrency", type=int, default=16, help="function max_concurrency")
    ap.add_argument("--timeout", type=float, default=300, help="seconds to wait for esmd")
    ap.add_argument("--runs", type=int, default=3,
                    help="rounds of (ceiling run, esmd run), each from the start of the stream "
                         "with a fresh group; the best of each is reported")
    ap.add_argument("--skip-esmd", action="store_true", help="only measure the ceiling")
    bl.add_run_args(ap)
    return ap.parse_args()


def redis_cli(port, *args):
    """One command through a tiny RESP client; returns the reply (str, int, list or None)."""
    out = b"*%d\r\n" % len(args)
    for a in args:
        a = str(a).encode()
        out += b"$%d\r\n%s\r\n" % (len(a), a)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(out)
        f = s.makefile("rb")
        return _read(f)


def _read(f):
    line = f.readline().rstrip(b"\r\n")
    t, rest = line[:1], line[1:]
    if t == b"+":
        return rest.decode()
    if t == b"-":
        raise RuntimeError(rest.decode())
    if t == b":":
        return int(rest)
    if t == b"$":
        n = int(rest)
        return None if n < 0 else f.read(n + 2)[:-2].decode(errors="replace")
    if t == b"*":
        n = int(rest)
        return None if n < 0 else [_read(f) for _ in range(n)]
    raise RuntimeError("bad reply %r" % line)


def start_redis(procs, tmp):
    port = bl.free_port()
    exe = shutil.which("redis-server") or "/usr/bin/redis-server"
    logf = open(os.path.join(tmp, "redis.log"), "w")
    p = procs.start("redis", [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no", "--dir", tmp], stdout=logf,
                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    deadline = time.monotonic() + 20
    while True:
        try:
            if redis_cli(port, "PING") == "PONG":
                return p, port
        except (OSError, RuntimeError):
            pass
        if p.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("redis-server did not start:\n" + bl.tail(logf.name))
        time.sleep(0.05)


def write_config(path, pg_url, admin_port, redis_port, sink_port, group, a):
    connections = "  bench-redis:\n    type: redis\n    url: redis://127.0.0.1:%d/0\n" % redis_port
    mappings = """\
  - name: bench
    function: sink
    source:
      redis: bench-redis
      stream: bench
      group: {group}
      starting_position: trim_horizon
    batch_size: {batch}
    maximum_batching_window: {window}
""".format(batch=a.batch_size, window=a.window, group=group)
    bl.esmd_config(path, "redis_bench.py", pg_url, admin_port, sink_port, a.concurrency,
                   connections, mappings)


def run_esmd(a, tools, procs, tmp, redis_port, redis_proc, sink, sink_port, pg, group):
    """One esmd run through the whole stream with a fresh group; returns its figures."""
    cfg = os.path.join(tmp, "esmd-%s.yaml" % group)
    admin_port = bl.free_port()
    write_config(cfg, pg.url, admin_port, redis_port, sink_port, group, a)
    esmd_log = os.path.join(tmp, "esmd-%s.log" % group)
    base = bl.sink_stats(sink_port)
    with open(esmd_log, "w") as logf:
        redis_cpu0, sink_cpu0 = bl.cpu_seconds(redis_proc.pid), bl.cpu_seconds(sink.pid)
        t_start = time.monotonic()
        esmd = procs.start("esmd", a.wrap.split() + [tools["esmd"], "run", "-c", cfg],
                           stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    w = bl.wait_for_sink(esmd, sink_port, a.records, a.timeout, esmd_log, t_start, base)
    cpu = {"esmd": bl.cpu_seconds(esmd.pid), "sink": bl.cpu_seconds(sink.pid) - sink_cpu0,
           "redis": bl.cpu_seconds(redis_proc.pid) - redis_cpu0}
    # what the group still has pending (XACKs are asynchronous: give them a moment)
    pending = None
    for _ in range(50):
        pending = redis_cli(redis_port, "XPENDING", "bench", group)[0]
        if pending == 0:
            break
        time.sleep(0.1)
    time.sleep(0.5)
    stats = bl.sink_stats(sink_port)
    bl.save_metrics(admin_port, os.path.join(tmp, "metrics-%s.txt" % group))
    rc = procs.stop(esmd, timeout=30)
    procs.forget(esmd)
    r = bl.esmd_figures(a.records, t_start, w, stats, base)
    r.update({"pending": pending, "esmd_exit": rc, "cpu": cpu})
    return r


def print_table(a, r):
    rows = [
        ("entries x value bytes", "%d x %d B, one stream; batch_size %d, window %s"
         % (a.records, a.size, a.batch_size, a.window)),
        ("produce (pipelined XADD)", "%.0f entries/s" % r["produce_rate"]),
        ("ceiling (XREADGROUP %d + XACK)" % a.batch_size, "%.0f entries/s (best of %s)"
         % (r["ceiling"], bl.runs_text(r["ceiling_runs"]))),
    ]
    if "esmd_rate" in r:
        rows += [
            ("esmd (first→last record)", "%.0f records/s (best of %s)"
             % (r["esmd_rate"], bl.runs_text(r["esmd_runs"]))),
            ("esmd / ceiling", "%.1f %% (best / best; run by run: %s)"
             % (100.0 * r["esmd_rate"] / r["ceiling"],
                " / ".join("%.0f %%" % (100.0 * e / c)
                           for e, c in zip(r["esmd_runs"], r["ceiling_runs"])))),
            ("best esmd run from process start", "%.0f records/s (first record after %.2f s)"
             % (r["esmd_rate_from_start"], r["esmd_first_s"])),
            ("esmd peak RSS (VmHWM)", "%.1f MB" % r["rss_mb"]),
            ("CPU s during the run", "esmd %.2f, redis %.2f, sink %.2f (of %d CPUs)"
             % (r["cpu"]["esmd"], r["cpu"]["redis"], r["cpu"]["sink"], os.cpu_count())),
        ] + bl.request_rows(r, a.records) + [
            ("pending in the group after", "%s" % r["pending"]),
            ("esmd exit status on SIGTERM", "%s" % r["esmd_exit"]),
        ]
    bl.print_rows(rows)


def main():
    a = parse_args()
    tools = bl.find_tools(a.build, ["redistool"] + ([] if a.skip_esmd else ["sink", "esmd"]),
                          "redis_bench", ["sink", "esmd"])
    procs = bl.Procs()
    tmp = tempfile.mkdtemp(prefix="esmd-bench-")
    results = {}
    try:
        redis_proc, port = start_redis(procs, tmp)
        url = "redis://127.0.0.1:%d/0" % port
        log("redis at %s" % url)
        t0 = time.monotonic()
        out = bl.run([tools["redistool"], "produce", "-u", url, "-s", "bench", "--count",
                        str(a.records), "--size", str(a.size)], 600)
        results["produce_rate"] = a.records / (time.monotonic() - t0)
        log(out)
        if redis_cli(port, "XLEN", "bench") != a.records:
            raise RuntimeError("the stream holds %s entries, not %d"
                               % (redis_cli(port, "XLEN", "bench"), a.records))
        sink = pg = None
        if not a.skip_esmd:
            sink, sink_port = bl.start_sink(procs, tools, '"eventID":')
            pg = bl.PgTmp(keep=a.keep)
            log("start postgres")
            pg.start()
        try:
            # Rounds of (ceiling, esmd), each reading the whole stream with a fresh group: the
            # machine's load changes from minute to minute, so the two are measured side by side
            # and the best of each is kept.
            ceiling_runs, esmd_runs = [], []
            for k in range(a.runs):
                out = bl.run([tools["redistool"], "consume-rate", "-u", url, "-s", "bench",
                                "-g", "ceiling-%d" % k, "--count", str(a.records), "--batch",
                                str(a.batch_size)], 600)
                log(out)
                ceiling_runs.append(float(re.search(r"= ([0-9.]+) entries/s", out).group(1)))
                redis_cli(port, "XGROUP", "DESTROY", "bench", "ceiling-%d" % k)
                if a.skip_esmd:
                    continue
                r = run_esmd(a, tools, procs, tmp, port, redis_proc, sink, sink_port, pg,
                             "esmd-%d" % k)
                log("esmd run %d: %.0f records/s" % (k, r["esmd_rate"]))
                redis_cli(port, "XGROUP", "DESTROY", "bench", "esmd-%d" % k)
                esmd_runs.append(r)
            results["ceiling"] = max(ceiling_runs)
            results["ceiling_runs"] = ceiling_runs
            if esmd_runs:
                best = max(esmd_runs, key=lambda x: x["esmd_rate"])
                results.update(best)
                results["esmd_runs"] = [x["esmd_rate"] for x in esmd_runs]
        finally:
            if pg:
                pg.stop()
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        log("FAILED: %s" % e)
        if a.keep:
            log("files kept in %s" % tmp)
        return 1
    finally:
        procs.stop_all()
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    print_table(a, results)
    if a.keep:
        log("files kept in %s" % tmp)
    return 0


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.default_int_handler)
    sys.exit(main())
