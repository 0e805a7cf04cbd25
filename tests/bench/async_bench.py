#!/usr/bin/env python3
"""Asynchronous invocation benchmark (python3 stdlib only; not a test).

Postgres runs with fsync, synchronous_commit and full_page_writes on: a 202 is as durable as
the server can make it (the other benchmarks turn them off; here they are what is measured).

1. accepted events/s: `asyncload` (tests/tools/asyncload.c, plain sockets and epoll) runs
   --clients concurrent keep-alive clients sending Invoke(Event) to `esmd run` for --seconds;
   every 202 counted is committed in Postgres (esmd answers after the commit). Measured twice:
   with the workers off (async_queue.workers: false: acceptance alone, the queue grows) and with the
   workers invoking the `sink` endpoint at the same time on the same two cores.
2. processed invocations/s: esmd is stopped, --events events are inserted into
   esmd.async_events by SQL, esmd is started again and the time until the sink has seen all of
   them and the queue is empty is measured.

Phases repeat --runs times (best of, the machine is shared and noisy); every run is printed.

    python3 tests/bench/async_bench.py [--build DIR] [--esmd PATH] [--clients 64] [--seconds 8]
                                       [--events 100000] [--max-concurrency 256] [--runs 3]
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as bl  # noqa: E402
from benchlib import log, psql, run, sink_stats, stop  # noqa: E402


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    bl.add_build_arg(ap, "esmd, asyncload, sink")
    ap.add_argument("--esmd", help="the esmd binary (default: BUILD/esmd)")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=8)
    ap.add_argument("--size", type=int, default=100, help="payload bytes")
    ap.add_argument("--events", type=int, default=100000)
    ap.add_argument("--max-concurrency", type=int, default=256, help="function max_concurrency")
    ap.add_argument("--runs", type=int, default=3, help="runs of each phase (best of)")
    a = ap.parse_args()
    tools = bl.find_tools(a.build, ["asyncload", "sink"] + ([] if a.esmd else ["esmd"]),
                          "async_bench")
    if a.esmd:
        tools["esmd"] = a.esmd
    tmp = tempfile.mkdtemp(prefix="esmd-async-bench-")
    runs = {"accept_alone": [], "accept_draining": [], "drain": []}
    durable = {"fsync": "on", "synchronous_commit": "on", "full_page_writes": "on"}
    procs = bl.Procs()
    with bl.PgTmp(settings=durable) as pg:
        sink, sink_port = bl.start_sink(procs, tools, '"pad":')
        admin = bl.free_port()
        cfgs = {}
        for workers in (True, False):
            cfgs[workers] = os.path.join(tmp, "esmd-workers-%s.yaml" % ("on" if workers else "off"))
            bl.esmd_config(cfgs[workers], "async_bench.py", pg.url, admin, sink_port,
                           a.max_concurrency, extra="  token: bench\nasync_queue:\n  workers: %s\n"
                           % ("true" if workers else "false"))
        cfg = cfgs[True]
        logf = open(os.path.join(tmp, "esmd.stderr"), "ab")
        esmd = None

        def start_esmd(workers=True):
            env = dict(os.environ, ESMD_LOG_LEVEL="warn")
            p = subprocess.Popen([tools["esmd"], "run", "-c", cfgs[workers]], stdout=logf,
                                 stderr=logf, env=env)
            bl.wait_http("http://127.0.0.1:%d/healthz" % admin)
            return p

        def queued():
            return int(psql(pg, "SELECT count(*) FROM esmd.async_events"))

        def accept(workers):
            nonlocal esmd
            psql(pg, "TRUNCATE esmd.async_events")
            esmd = start_esmd(workers)
            base = sink_stats(sink_port)["records"]
            c0 = bl.cpu_seconds(esmd.pid)
            out = json.loads(run([tools["asyncload"], "--url", "http://127.0.0.1:%d" % admin,
                                  "--function", "sink", "--token", "bench", "--clients",
                                  str(a.clients), "--seconds", str(a.seconds), "--size",
                                  str(a.size)]))
            out["esmd_cpu_s"] = round(bl.cpu_seconds(esmd.pid) - c0, 2)
            stop(esmd)
            # every 202 is either still queued or was invoked (the sink counts what it got)
            out["queued"] = queued()
            out["invoked"] = sink_stats(sink_port)["records"] - base
            if out["queued"] + out["invoked"] < out["accepted"]:
                raise RuntimeError("%d accepted but %d queued and %d invoked" % (
                    out["accepted"], out["queued"], out["invoked"]))
            log("accept (workers %s): %s" % ("on" if workers else "off", json.dumps(out)))
            return out

        def pgbench(script, clients, params):
            path = os.path.join(tmp, "pgbench.sql")
            with open(path, "w") as f:
                f.write(script)
            args = [os.path.join(pg.bindir, "pgbench"), "-n", "-M", "extended", "-f", path,
                    "-c", str(clients), "-j", "2", "-T", str(int(a.seconds))]
            for k, v in params.items():
                args += ["-D", "%s=%s" % (k, v)]
            out = run(args + [pg.url], 600)
            tps = [float(l.split("=")[1].split()[0]) for l in out.splitlines()
                   if l.startswith("tps")]
            psql(pg, "TRUNCATE esmd.async_events")
            return tps[0]

        try:
            run([tools["esmd"], "migrate", "-c", cfg])
            # What the same Postgres does alone (pgbench, same table, same payload): every
            # client commits one row at a time (what a queue without group commit does), and
            # two connections commit 16 rows a statement (about what esmd's batches hold).
            payload = '{"pad":"%s"}' % ("x" * max(a.size - 10, 1))
            one = pgbench("INSERT INTO esmd.async_events (function, request_id, payload) "
                          "VALUES (:fn, gen_random_uuid(), :p);\n", a.clients,
                          {"fn": "sink", "p": payload})
            rows16 = ", ".join("(:fn, gen_random_uuid(), :p)" for _ in range(16))
            sixteen = pgbench("INSERT INTO esmd.async_events (function, request_id, payload) "
                              "VALUES %s;\n" % rows16, 2, {"fn": "sink", "p": payload}) * 16
            log("postgres alone: %d clients x 1 row/commit %.0f rows/s; 2 x 16 rows %.0f rows/s"
                % (a.clients, one, sixteen))
            for _ in range(a.runs):
                runs["accept_alone"].append(accept(False))
                runs["accept_draining"].append(accept(True))
            for _ in range(a.runs):
                psql(pg, "TRUNCATE esmd.async_events")
                psql(pg, "INSERT INTO esmd.async_events (function, request_id, payload) "
                         "SELECT 'sink', gen_random_uuid(), '{\"pad\":\"' || repeat('x', %d) "
                         "|| '\"}' FROM generate_series(1, %d)"
                     % (max(a.size - 10, 1), a.events))
                psql(pg, "VACUUM ANALYZE esmd.async_events")
                base = sink_stats(sink_port)["records"]
                t0 = time.monotonic()
                esmd = start_esmd()
                c0 = bl.cpu_seconds(esmd.pid)
                deadline = t0 + 600
                while True:
                    got = sink_stats(sink_port)["records"] - base
                    if got >= a.events and queued() == 0:
                        break
                    if time.monotonic() > deadline:
                        raise RuntimeError("timeout: %d of %d invoked" % (got, a.events))
                    time.sleep(0.05)
                t = time.monotonic() - t0
                d = {"events": a.events, "seconds": round(t, 3),
                     "invocations_per_s": round(a.events / t),
                     "sink_requests": sink_stats(sink_port)["records"] - base,
                     "esmd_cpu_s": round(bl.cpu_seconds(esmd.pid) - c0, 2)}
                stop(esmd)
                log("drain: %s" % json.dumps(d))
                runs["drain"].append(d)
        finally:
            if esmd:
                stop(esmd)
            procs.stop_all()

    def best(key, field):
        return max(runs[key], key=lambda r: r[field])

    print("| measure (best of %d) | value |\n|---|---|" % a.runs)
    for key, what in (("accept_alone", "workers off"), ("accept_draining",
                                                        "workers invoking meanwhile")):
        r = best(key, "accepted_per_s")
        print("| accepted events/s, %s (%d clients, %d-byte payload, 202 after a durable "
              "commit) | %s |" % (what, a.clients, a.size, r["accepted_per_s"]))
        print("| … all runs | %s |" % ", ".join(str(x["accepted_per_s"]) for x in runs[key]))
        print("| … esmd / load generator CPU in %.1f s | %.2f s / %.2f s |"
              % (r["seconds"], r["esmd_cpu_s"], r["cpu_s"]))
    print("| Postgres alone (pgbench, same table): %d clients, one row per commit | %.0f rows/s |"
          % (a.clients, one))
    print("| Postgres alone: 2 connections, 16 rows per commit | %.0f rows/s |" % sixteen)
    r = best("drain", "invocations_per_s")
    print("| processed invocations/s (draining %d queued events, max_concurrency %d) | %s |"
          % (r["events"], a.max_concurrency, r["invocations_per_s"]))
    print("| … all runs | %s |" % ", ".join(str(x["invocations_per_s"]) for x in runs["drain"]))
    print("| … drain time, esmd CPU | %.2f s, %.2f s |" % (r["seconds"], r["esmd_cpu_s"]))
    print("(esmd log: %s)" % os.path.join(tmp, "esmd.stderr"))


if __name__ == "__main__":
    main()
