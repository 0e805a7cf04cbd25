#!/usr/bin/env python3
"""FIFO Postgres queue → esmd → a slow function: records/s by message group count (python3
stdlib only; not a test).

Starts a throwaway PostgreSQL (pgtmp.py), applies esmd's migrations, and for a standard queue
(the reference) and FIFO queues whose messages are spread over 1, 10 and 100 message groups
(docs/pgqueue.md#fifo-queues) fills the queue, runs `esmd run` against an in-process HTTP
function that takes 100 ms per call, and measures messages/s from the first message at the
function to the last. Prints each rate and its ratio to the standard queue's of the same run.
See tests/bench/README.md.

    python3 tests/bench/pgqueue_fifo_bench.py [--build DIR] [--messages N] [--groups 1,10,100]
"""

import argparse
import http.server
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as bl  # noqa: E402
from benchlib import log, psql, run  # noqa: E402


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    bl.add_build_arg(ap, "esmd")
    ap.add_argument("--messages", type=int, default=3000,
                    help="messages per run (the 1-group run takes --messages-one-group)")
    ap.add_argument("--messages-one-group", type=int, default=400)
    ap.add_argument("--groups", default="1,10,100", help="FIFO runs: message groups, comma list")
    ap.add_argument("--delay-ms", type=int, default=100, help="the function's time per call")
    ap.add_argument("--batch-size", type=int, default=10, help="10: Lambda's FIFO maximum")
    ap.add_argument("--concurrency", type=int, default=10,
                    help="source maximum_concurrency (batches in flight)")
    ap.add_argument("--timeout", type=float, default=300, help="seconds to wait for each run")
    bl.add_run_args(ap)
    return ap.parse_args()


class SlowFunction:
    """An HTTP function answering `200 {}` after delay s, counting "messageId" occurrences."""

    def __init__(self, delay):
        fn = self
        self.delay = delay
        self.lock = threading.Lock()
        self.records = 0
        self.t_first = self.t_last = None

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def setup(self):
                super().setup()
                # headers and body are two writes: without this, Nagle's algorithm and the
                # client's delayed ACK add ~40 ms to every call
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                time.sleep(fn.delay)
                n = body.count(b'"messageId":')
                now = time.monotonic()
                with fn.lock:
                    fn.records += n
                    fn.t_first = fn.t_first or now
                    fn.t_last = now
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def reset(self):
        with self.lock:
            self.records = 0
            self.t_first = self.t_last = None

    def close(self):
        self.server.shutdown()


def fill(pg, queue, messages, groups):
    """messages bodies {"i":N}; FIFO (groups > 0): message N in group g(N % groups), in order."""
    t0 = time.monotonic()
    if groups == 0:
        psql(pg, "SELECT count(*) FROM esmd.send_batch('%s', ARRAY(SELECT format('{\"i\":%%s}', i) "
                 "FROM generate_series(1, %d) i))" % (queue, messages))
    else:
        psql(pg, "SELECT esmd.create_queue('%s', fifo => true)" % queue)
        psql(pg, "SELECT count(*) FROM generate_series(0, %d) g, LATERAL esmd.send_batch('%s', "
                 "ARRAY(SELECT format('{\"i\":%%s}', i) FROM generate_series(1, %d) i "
                 "WHERE i %% %d = g), group_id => 'g' || g, deduplication_ids => "
                 "ARRAY(SELECT 'd' || i FROM generate_series(1, %d) i WHERE i %% %d = g))"
                 % (groups - 1, queue, messages, groups, messages, groups))
    psql(pg, "VACUUM ANALYZE esmd.queue_messages")
    n = int(psql(pg, "SELECT count(*) FROM esmd.queue_messages WHERE queue = '%s'" % queue))
    if n != messages:
        raise RuntimeError("queue %s holds %d messages, expected %d" % (queue, n, messages))
    return messages / max(time.monotonic() - t0, 1e-9)


def run_one(a, tools, pg, tmp, fn, queue, messages):
    procs = bl.Procs()
    fn.reset()
    try:
        cfg = os.path.join(tmp, "esmd-%s.yaml" % queue)
        admin_port = bl.free_port()
        mappings = """\
  - name: bench
    function: sink
    source:
      pgqueue: {queue}
      visibility_timeout: 60s
      maximum_concurrency: {conc}
    batch_size: {batch}
""".format(queue=queue, conc=a.concurrency, batch=a.batch_size)
        bl.esmd_config(cfg, "pgqueue_fifo_bench.py", pg.url, admin_port, fn.port,
                       a.concurrency + 6, mappings=mappings)
        esmd_log = os.path.join(tmp, "esmd-%s.log" % queue)
        t_start = time.monotonic()
        with open(esmd_log, "w") as logf:
            esmd = procs.start("esmd", a.wrap.split() + [tools["esmd"], "run", "-c", cfg],
                               stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        while fn.records < messages:
            if esmd.poll() is not None:
                raise RuntimeError("esmd exited (%s); see %s" % (esmd.returncode, esmd_log))
            if time.monotonic() - t_start > a.timeout:
                raise RuntimeError("%s: %d of %d messages after %.0f s" % (
                    queue, fn.records, messages, a.timeout))
            time.sleep(0.02)
        with fn.lock:
            rate = fn.records / max(fn.t_last - fn.t_first, 1e-9)
            seen = fn.records
        left = None
        for _ in range(100):
            left = int(psql(pg, "SELECT count(*) FROM esmd.queue_messages WHERE queue = '%s'"
                            % queue))
            if left == 0:
                break
            time.sleep(0.1)
        procs.stop(esmd, timeout=30)
        return {"rate": rate, "seen": seen, "left": left}
    finally:
        procs.stop_all()


def main():
    a = parse_args()
    tools = bl.find_tools(a.build, ["esmd"], "pgqueue_fifo_bench", [])
    groups = [int(g) for g in a.groups.split(",") if g]
    tmp = tempfile.mkdtemp(prefix="esmd-pgq-fifo-bench-")
    pg = bl.PgTmp(keep=a.keep, settings={"shared_buffers": "128MB"})
    fn = SlowFunction(a.delay_ms / 1000.0)
    rows = []
    try:
        log("start postgres")
        pg.start()
        migrate_cfg = os.path.join(tmp, "migrate.yaml")
        with open(migrate_cfg, "w") as f:
            f.write("postgres: %s\nfunctions: { f: { url: 'http://127.0.0.1:9/' } }\n"
                    "mappings: [{ name: m, function: f, source: { pgqueue: q } }]\n" % pg.url)
        log(run([tools["esmd"], "migrate", "-c", migrate_cfg]))
        for g in [0] + groups:
            queue = "bench-std" if g == 0 else "bench-%d.fifo" % g
            n = a.messages_one_group if g == 1 else a.messages
            log("%s: fill %d messages" % (queue, n))
            fill(pg, queue, n, g)
            log("%s: run esmd" % queue)
            r = run_one(a, tools, pg, tmp, fn, queue, n)
            r.update({"queue": queue, "groups": g, "messages": n})
            log("%s: %.0f messages/s" % (queue, r["rate"]))
            rows.append(r)
    except (RuntimeError, subprocess.TimeoutExpired) as e:
        log("FAILED: %s" % e)
        if a.keep:
            log("files kept in %s" % tmp)
        return 1
    finally:
        fn.close()
        pg.stop()
        if not a.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    ref = rows[0]["rate"]
    out = [("function", "%d ms per call; batch_size %d, maximum_concurrency %d"
            % (a.delay_ms, a.batch_size, a.concurrency)),
           ("ideal (all batches full, all slots busy)", "%.0f messages/s"
            % (a.batch_size * a.concurrency * 1000.0 / a.delay_ms))]
    for r in rows:
        what = "standard queue (reference)" if r["groups"] == 0 else \
            "FIFO, %d group%s" % (r["groups"], "" if r["groups"] == 1 else "s")
        out.append(("%s, %d messages" % (what, r["messages"]),
                    "%.0f messages/s, %.2f of standard, %s left" % (
                        r["rate"], r["rate"] / ref, r["left"])))
    bl.print_rows(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
