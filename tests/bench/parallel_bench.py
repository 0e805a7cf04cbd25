#!/usr/bin/env python3
"""parallelization_factor benchmark: a slow function behind a topic with few partitions
(python3 stdlib only; not a test).

librdkafka's mock cluster (kafkatool mock) holds a topic of 2 partitions filled with keyed
records; the `sink` endpoint answers every request after 100 ms. For each factor (1, 2, 4, 8,
10) esmd runs with a fresh consumer group until the sink has seen every record, and the table
gives records/s and the ratio to factor 1 of the same run. With one batch in flight per lane,
the rate should grow with the factor until the function's max_concurrency caps it. See
tests/bench/README.md.

    python3 tests/bench/parallel_bench.py [--build DIR] [--records N] [--factors 1,2,4,8,10]
"""

import argparse
import os
import subprocess
import sys
import tempfile
import shutil
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as bl  # noqa: E402
from benchlib import log  # noqa: E402


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    bl.add_build_arg(ap, "esmd, kafkatool, sink")
    ap.add_argument("--records", type=int, default=20000)
    ap.add_argument("--size", type=int, default=90, help="value bytes per record")
    ap.add_argument("--partitions", type=int, default=2)
    ap.add_argument("--factors", default="1,2,4,8,10")
    ap.add_argument("--delay-ms", type=int, default=100, help="the function's time per call")
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--window", default="100ms", help="maximum_batching_window")
    ap.add_argument("--concurrency", type=int, default=32, help="function max_concurrency")
    ap.add_argument("--timeout", type=float, default=600, help="seconds to wait for each run")
    bl.add_run_args(ap)
    return ap.parse_args()


def write_config(path, pg_url, admin_port, bootstrap, sink_port, a, factor):
    connections = """\
  bench-kafka:
    type: kafka
    bootstrap_servers: "{boot}"
""".format(boot=bootstrap)
    mappings = """\
  - name: bench
    function: sink
    source:
      kafka: bench-kafka
      topics: [bench]
      consumer_group: bench-f{factor}
      starting_position: trim_horizon
      parallelization_factor: {factor}
    batch_size: {batch}
    maximum_batching_window: {window}
""".format(batch=a.batch_size, window=a.window, factor=factor)
    bl.esmd_config(path, "parallel_bench.py", pg_url, admin_port, sink_port, a.concurrency,
                   connections, mappings)


def run_factor(a, tools, procs, tmp, bootstrap, sink_port, pg, factor):
    cfg = os.path.join(tmp, "esmd-f%d.yaml" % factor)
    admin_port = bl.free_port()
    write_config(cfg, pg.url, admin_port, bootstrap, sink_port, a, factor)
    esmd_log = os.path.join(tmp, "esmd-f%d.log" % factor)
    base = bl.sink_stats(sink_port)
    with open(esmd_log, "w") as logf:
        t_start = time.monotonic()
        esmd = procs.start("esmd", a.wrap.split() + [tools["esmd"], "run", "-c", cfg],
                           stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        w = bl.wait_for_sink(esmd, sink_port, a.records, a.timeout, esmd_log, t_start, base)
        time.sleep(0.3)
        r = bl.esmd_figures(a.records, t_start, w, bl.sink_stats(sink_port), base)
    finally:
        procs.stop(esmd, timeout=30)
        procs.forget(esmd)
    return r


def main():
    a = parse_args()
    factors = [int(x) for x in a.factors.split(",")]
    tools = bl.find_tools(a.build, ["kafkatool", "sink", "esmd"], "parallel_bench")
    tmp = tempfile.mkdtemp(prefix="esmd-bench-")
    procs = bl.Procs()
    pg = bl.PgTmp(keep=a.keep)
    results = []
    try:
        mock = procs.start("mock", [tools["kafkatool"], "mock", "--topic",
                                    "bench:%d" % a.partitions],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        bootstrap = bl.first_line(mock, "kafkatool mock")
        log(bl.run([tools["kafkatool"], "produce", "-b", bootstrap, "-t", "bench", "--count",
                    str(a.records), "--size", str(a.size), "--partitions", str(a.partitions),
                    "--keyed"], 600))
        _, sink_port = bl.start_sink(procs, tools, delay_ms=a.delay_ms)
        log("start postgres")
        pg.start()
        for f in factors:
            log("=== parallelization_factor %d ===" % f)
            results.append((f, run_factor(a, tools, procs, tmp, bootstrap, sink_port, pg, f)))
    finally:
        procs.stop_all()
        pg.stop()
        if a.keep:
            log("files kept in %s" % tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)

    print()
    print("%d keyed records of %d B over %d partitions (librdkafka mock cluster); a function "
          "taking %d ms per call, max_concurrency %d; batch_size %d, window %s"
          % (a.records, a.size, a.partitions, a.delay_ms, a.concurrency, a.batch_size,
             a.window))
    print("%-8s  %-12s  %-10s  %-9s  %s" % ("factor", "records/s", "requests", "rec/req",
                                             "x factor %d" % factors[0]))
    base = results[0][1]["esmd_rate"]
    for f, r in results:
        print("%-8d  %-12.0f  %-10d  %-9.1f  %.2f" % (
            f, r["esmd_rate"], r["requests"], r["records_seen"] / max(r["requests"], 1),
            r["esmd_rate"] / base))
    return 0


if __name__ == "__main__":
    sys.exit(main())
