#!/usr/bin/env python3
"""Asynchronous invocation benchmark (python3 stdlib only; not a test).

1. accepted events/s: `asyncload` (tests/tools/asyncload.c, libcurl multi) runs --clients
   concurrent keep-alive clients sending Invoke(Event) to `esmd run` for --seconds; every 202
   counted is committed in Postgres (esmd answers after the commit). The workers run meanwhile
   (invoking the `sink` endpoint), as in production.
2. processed invocations/s: esmd is stopped, --events events are inserted into
   esmd.async_events by SQL, esmd is started again and the time until the sink has seen all of
   them and the queue is empty is measured.

    python3 tests/bench/async_bench.py [--build DIR] [--clients 64] [--seconds 10]
                                       [--events 100000] [--max-concurrency 256]
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import pgtmp  # noqa: E402


def log(msg):
    print("[bench] " + msg, file=sys.stderr, flush=True)


def run(args, timeout=900):
    out = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError("%s failed (%d): %s%s" % (" ".join(args), out.returncode, out.stdout,
                                                     out.stderr))
    return out.stdout.strip()


def psql(pg, sql):
    return run([os.path.join(pg.bindir, "psql"), "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1",
                "-d", pg.url, "-c", sql], 600)


def sink_stats(port):
    with urllib.request.urlopen("http://127.0.0.1:%d/stats" % port, timeout=5) as r:
        return json.loads(r.read())


def wait_http(url, timeout=30):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("%s did not answer" % url)


def stop(p, timeout=30):
    if p.poll() is not None:
        return p.returncode
    p.send_signal(signal.SIGTERM)
    try:
        return p.wait(timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        return p.wait()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--build", default="./build", help="dir holding esmd, asyncload, sink")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--size", type=int, default=100, help="payload bytes")
    ap.add_argument("--events", type=int, default=100000)
    ap.add_argument("--max-concurrency", type=int, default=256, help="function max_concurrency")
    a = ap.parse_args()
    tools = {n: os.path.join(a.build, n) for n in ("esmd", "asyncload", "sink")}
    for n, p in tools.items():
        if not os.path.exists(p):
            sys.exit("%s not built (cmake --build %s)" % (p, a.build))
    tmp = tempfile.mkdtemp(prefix="esmd-async-bench-")
    res = {}
    with pgtmp.PgTmp() as pg:
        sink = subprocess.Popen([tools["sink"], "--port", "0", "--pattern", '"pad":'],
                                stdout=subprocess.PIPE, text=True)
        sink_port = int(sink.stdout.readline().strip())
        admin = pgtmp.free_port()
        cfg = os.path.join(tmp, "esmd.yaml")
        with open(cfg, "w") as f:
            f.write("postgres: %s\nadmin:\n  listen: 127.0.0.1:%d\n  token: bench\n"
                    "functions:\n  fn:\n    url: http://127.0.0.1:%d/2015-03-31/functions/"
                    "function/invocations\n    timeout: 30s\n    max_concurrency: %d\n"
                    % (pg.url, admin, sink_port, a.max_concurrency))
        logf = open(os.path.join(tmp, "esmd.stderr"), "ab")
        env = dict(os.environ, ESMD_LOG_LEVEL="warn")

        def start_esmd():
            p = subprocess.Popen([tools["esmd"], "run", "-c", cfg], stdout=logf, stderr=logf,
                                 env=env)
            wait_http("http://127.0.0.1:%d/healthz" % admin)
            return p

        esmd = start_esmd()
        try:
            log("phase 1: %d clients for %.0f s" % (a.clients, a.seconds))
            out = run([tools["asyncload"], "--url", "http://127.0.0.1:%d" % admin, "--function",
                       "fn", "--token", "bench", "--clients", str(a.clients), "--seconds",
                       str(a.seconds), "--size", str(a.size)])
            res["accept"] = json.loads(out)
            log("phase 1: %s" % out)
            stored = int(psql(pg, "SELECT count(*) FROM esmd.async_events"))
            deadline = time.monotonic() + 300
            while int(psql(pg, "SELECT count(*) FROM esmd.async_events")) > 0 and \
                    time.monotonic() < deadline:
                time.sleep(0.2)
            res["accept"]["left_in_queue_at_end"] = stored
            stop(esmd)
            log("phase 2: %d events inserted by SQL, esmd started" % a.events)
            psql(pg, "INSERT INTO esmd.async_events (function, request_id, payload) "
                     "SELECT 'fn', gen_random_uuid(), '{\"pad\":\"' || repeat('x', %d) || '\"}' "
                     "FROM generate_series(1, %d)" % (max(a.size - 10, 1), a.events))
            psql(pg, "VACUUM ANALYZE esmd.async_events")
            base = sink_stats(sink_port)["records"]
            t0 = time.monotonic()
            esmd = start_esmd()
            deadline = t0 + 600
            while True:
                got = sink_stats(sink_port)["records"] - base
                if got >= a.events:
                    left = int(psql(pg, "SELECT count(*) FROM esmd.async_events"))
                    if left == 0:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError("timeout: %d of %d invoked" % (got, a.events))
                time.sleep(0.05)
            t = time.monotonic() - t0
            res["drain"] = {"events": a.events, "seconds": round(t, 3),
                            "invocations_per_s": round(a.events / t),
                            "sink_requests": sink_stats(sink_port)["records"] - base}
        finally:
            stop(esmd)
            stop(sink)
    print("| measure | value |\n|---|---|")
    ac = res["accept"]
    print("| accepted events/s (%d clients, %d-byte payload, 202 after commit) | %s |"
          % (a.clients, a.size, ac["accepted_per_s"]))
    print("| accepted / refused / errors in %.1f s | %d / %d / %d |"
          % (ac["seconds"], ac["accepted"], ac["refused"], ac["errors"]))
    dr = res["drain"]
    print("| processed invocations/s (draining %d queued events, max_concurrency %d) | %s |"
          % (dr["events"], a.max_concurrency, dr["invocations_per_s"]))
    print("| drain time | %.2f s |" % dr["seconds"])
    print("(esmd log: %s)" % os.path.join(tmp, "esmd.stderr"))


if __name__ == "__main__":
    main()
