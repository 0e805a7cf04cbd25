#!/usr/bin/env python3
"""Kafka → esmd → HTTP function throughput benchmark (python3 stdlib only; not a test).

One series per broker: librdkafka's mock cluster (kafkatool mock) and a real single-node Kafka
(scripts/kafka-broker, KRaft, started in a temporary directory and stopped at the end). Each
series fills topic `bench` with generated records, measures what a plain librdkafka consumer
reads from that broker (the ceiling), then runs `esmd run` against a throwaway PostgreSQL and the
`sink` function endpoint until the sink has seen every record, and prints a table; esmd's rate is
given as a ratio to the ceiling of the same series. See tests/bench/README.md.

    python3 tests/bench/kafka_bench.py [--broker mock|real|both] [--build DIR] [--records N]
        [--partitions 4,8,32] ...

With several partition counts, each gets its own series (topic, ceiling, esmd) per broker and
the summary has one line per count: how esmd's share of the ceiling depends on the partition
count (docs/design.md#batch-forming).
"""

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as bl  # noqa: E402
from benchlib import log  # noqa: E402

# The mock cluster silently deletes the oldest message sets of a partition past 5 MB (or 100,000
# message sets). A record costs its value, its key and about 12 bytes of record and batch
# overhead: 1,000,000 records of 100 B need 32 partitions (3.5 MB each); 16 would keep only 75 %.
MOCK_MAX_BYTES = 5 * 1024 * 1024
RECORD_OVERHEAD = 12

KAFKA_BROKER = os.path.join(bl.ROOT, "scripts", "kafka-broker")

# The librdkafka queue settings esmd gives its consumer (connectors/kafka/kafka.c, docs/kafka.md
# "Flow control"). The ceiling consumer gets them too: with librdkafka's defaults a plain
# consumer stalls whenever its prefetch queue fills, and would be a low, unfair ceiling.
ESMD_CONSUMER_PROPS = ["queued.min.messages=1000000", "queued.max.messages.kbytes=16384"]


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    bl.add_build_arg(ap, "esmd, kafkatool, sink")
    ap.add_argument("--broker", choices=("mock", "real", "both"), default="both",
                    help="mock: librdkafka's mock cluster; real: Kafka from scripts/kafka-broker;"
                         " both (default): one series on each, mock first")
    ap.add_argument("--records", type=int, default=1000000)
    ap.add_argument("--size", type=int, default=100, help="value bytes per record")
    ap.add_argument("--partitions", default="32",
                    help="topic partitions, or a comma-separated list of counts, one series "
                         "each (the mock keeps 5 MB per partition)")
    ap.add_argument("--keyed", action="store_true", help="give each record a key k<i>")
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--window", default="500ms", help="maximum_batching_window")
    ap.add_argument("--concurrency", type=int, default=16, help="function max_concurrency")
    ap.add_argument("--timeout", type=float, default=300, help="seconds to wait for esmd")
    ap.add_argument("--delay-ms", type=int, default=0,
                    help="the sink answers each request after this long (a slow function: the"
                         " consumer's prefetch fills up, which shows its memory)")
    ap.add_argument("--ceiling-runs", type=int, default=3,
                    help="consume-rate runs; the best is the ceiling")
    ap.add_argument("--ceiling-defaults", action="store_true",
                    help="ceiling consumer with librdkafka's default queue settings instead of"
                         " esmd's")
    ap.add_argument("--skip-esmd", action="store_true", help="only measure the ceiling")
    ap.add_argument("--property", action="append", default=[], metavar="KEY=VALUE",
                    help="librdkafka property for esmd's connection (repeatable)")
    bl.add_run_args(ap)
    return ap.parse_args()


def write_config(path, pg_url, admin_port, bootstrap, sink_port, a):
    props = ""
    if a.property:
        props = "    properties:\n" + "".join(
            "      %s: %s\n" % tuple(json.dumps(x) for x in kv.split("=", 1)) for kv in a.property)
    connections = """\
  bench-kafka:
    type: kafka
    bootstrap_servers: "{boot}"
{props}""".format(boot=bootstrap, props=props)
    mappings = """\
  - name: bench
    function: sink
    source:
      kafka: bench-kafka
      topics: [bench]
      consumer_group: bench
      starting_position: trim_horizon
    batch_size: {batch}
    maximum_batching_window: {window}
""".format(batch=a.batch_size, window=a.window)
    bl.esmd_config(path, "kafka_bench.py", pg_url, admin_port, sink_port, a.concurrency,
                   connections, mappings)


def run_esmd(a, tools, procs, tmp, bootstrap, broker_pid, results):
    sink, sink_port = bl.start_sink(procs, tools, delay_ms=a.delay_ms)

    pg = bl.PgTmp(keep=a.keep)
    log("start postgres")
    pg.start()
    try:
        cfg = os.path.join(tmp, "esmd.yaml")
        admin_port = bl.free_port()
        write_config(cfg, pg.url, admin_port, bootstrap, sink_port, a)
        esmd_log = os.path.join(tmp, "esmd.log")
        with open(esmd_log, "w") as logf:
            broker_cpu0, sink_cpu0 = bl.cpu_seconds(broker_pid), bl.cpu_seconds(sink.pid)
            t_start = time.monotonic()
            esmd = procs.start("esmd", a.wrap.split() + [tools["esmd"], "run", "-c", cfg],
                               stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        w = bl.wait_for_sink(esmd, sink_port, a.records, a.timeout, esmd_log, t_start)
        cpu = {"esmd": bl.cpu_seconds(esmd.pid), "sink": bl.cpu_seconds(sink.pid) - sink_cpu0,
               "broker": bl.cpu_seconds(broker_pid) - broker_cpu0}

        # Offsets esmd committed for the group (commits are asynchronous: give them a moment).
        committed = None
        for _ in range(50):
            out = bl.run([tools["kafkatool"], "committed", "-b", bootstrap, "-g", "bench",
                          "-t", "bench", "--partitions", str(a.partitions)], 60)
            committed = sum(max(v, 0) for v in json.loads(out).values())
            if committed >= a.records:
                break
            time.sleep(0.2)
        time.sleep(0.5)
        stats = bl.sink_stats(sink_port)
        # esmd's own view of the run (durations, batches, retries), kept with --keep.
        bl.save_metrics(admin_port, os.path.join(tmp, "metrics.txt"))

        rc = procs.stop(esmd, timeout=30)
        results.update(bl.esmd_figures(a.records, t_start, w, stats))
        results.update({"committed": committed, "esmd_exit": rc, "cpu": cpu})
    finally:
        procs.stop_all()
        pg.stop()


BROKER_NAMES = {"mock": "librdkafka mock cluster", "real": "Apache Kafka (KRaft, 1 node)"}


def print_table(a, kind, r):
    rows = [
        ("broker", "%s at %s" % (BROKER_NAMES[kind] + (" " + r["version"] if r.get("version")
                                                        else ""), r["bootstrap"])),
        ("records x value bytes", "%d x %d B over %d partitions%s"
         % (a.records, a.size, a.partitions, ", keyed" if a.keyed else "")),
        ("produce", "%.0f records/s" % r["produce_rate"]),
        ("ceiling (librdkafka consumer)", "%.0f records/s (best of %s; %s)"
         % (r["ceiling"], bl.runs_text(r["ceiling_runs"]),
            ("librdkafka's defaults" if a.ceiling_defaults else "esmd's queue settings")
            + (" + --property" if a.property else ""))),
    ]
    if "esmd_rate" in r:
        rows += [
            ("esmd (first→last record)", "%.0f records/s" % r["esmd_rate"]),
            ("esmd / ceiling", "%.1f %% (of the median ceiling run: %.1f %%)"
             % (100.0 * r["esmd_rate"] / r["ceiling"],
                100.0 * r["esmd_rate"] / statistics.median(r["ceiling_runs"]))),
            ("esmd (from process start)", "%.0f records/s (first record after %.2f s)"
             % (r["esmd_rate_from_start"], r["esmd_first_s"])),
            ("esmd peak RSS (VmHWM)", "%.1f MB" % r["rss_mb"]),
            ("CPU s during the run", "esmd %.2f, %s %.2f, sink %.2f (of %d CPUs)"
             % (r["cpu"]["esmd"], "mock cluster" if kind == "mock" else "Kafka JVM",
                r["cpu"]["broker"], r["cpu"]["sink"], os.cpu_count())),
        ] + bl.request_rows(r, a.records) + [
            ("committed offsets (sum)", "%s" % r["committed"]),
            ("esmd exit status on SIGTERM", "%s" % r["esmd_exit"]),
        ]
    bl.print_rows(rows)


def print_summary(a, series):
    """One line per series, after the tables, when there is more than one."""
    print()
    print("%-6s  %-10s  %-20s  %-16s  %-14s  %s" % (
        "broker", "partitions", "ceiling records/s", "esmd records/s", "esmd / ceiling",
        "records/request"))
    for kind, parts, r in series:
        esmd = ("%.0f" % r["esmd_rate"]) if "esmd_rate" in r else "-"
        ratio = ("%.1f %%" % (100.0 * r["esmd_rate"] / r["ceiling"])) if "esmd_rate" in r \
            else "-"
        per_req = ("%.0f" % (r["records_seen"] / r["requests"])) if r.get("requests") else "-"
        print("%-6s  %-10d  %-20s  %-16s  %-14s  %s" % (kind, parts, "%.0f" % r["ceiling"], esmd,
                                                      ratio, per_req))
    sys.stdout.flush()


class MockBroker:
    """kafkatool mock with the topic, in the series' Procs (stopped with them)."""

    def __init__(self, a, tools, procs, tmp):
        self.proc = procs.start("mock", [tools["kafkatool"], "mock", "--topic",
                                         "bench:%d" % a.partitions],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.bootstrap = bl.first_line(self.proc, "kafkatool mock")
        self.pid = self.proc.pid
        self.version = ""
        log("mock cluster at %s" % self.bootstrap)

    def stop(self):
        pass  # Procs.stop_all stops it


class RealBroker:
    """scripts/kafka-broker in DIR: started here, topic created with kafkatool create-topic,
    stopped gracefully by stop()."""

    def __init__(self, a, tools, procs, tmp):
        self.dir = os.path.join(tmp, "kafka")
        self.pid = None
        log("start Kafka: %s start %s" % (KAFKA_BROKER, self.dir))
        t0 = time.monotonic()
        out = subprocess.run([KAFKA_BROKER, "start", self.dir], stdout=subprocess.PIPE,
                             text=True, timeout=300)
        if out.returncode != 0:
            raise RuntimeError("scripts/kafka-broker start failed (%d; its log tail is above)"
                               % out.returncode)
        lines = out.stdout.strip().splitlines()
        self.bootstrap = lines[-1].strip() if lines else ""
        with open(os.path.join(self.dir, "broker.pid")) as f:
            self.pid = int(f.read().strip())
        self.version = os.environ.get("ESMD_KAFKA_VERSION", "") or kafka_version()
        log("Kafka %s at %s (started in %.1f s)" % (self.version, self.bootstrap,
                                                    time.monotonic() - t0))
        log(bl.run([tools["kafkatool"], "create-topic", "-b", self.bootstrap, "-t", "bench",
                      "--partitions", str(a.partitions)], 120))

    def stop(self):
        if self.pid is None:
            return
        log("stop Kafka (graceful)")
        subprocess.run([KAFKA_BROKER, "stop", self.dir], timeout=120)
        self.pid = None


def kafka_version():
    """The default version scripts/kafka-broker starts (its KAFKA_VERSION line)."""
    try:
        with open(KAFKA_BROKER) as f:
            m = re.search(r"^KAFKA_VERSION=\$\{ESMD_KAFKA_VERSION:-([^}]+)\}", f.read(), re.M)
            return m.group(1) if m else ""
    except OSError:
        return ""


def real_broker_missing():
    """Why scripts/kafka-broker cannot run here, or None."""
    if not shutil.which("java"):
        return "no java (scripts/install-deps installs it)"
    jars = subprocess.run([KAFKA_BROKER, "classpath", "--check"], capture_output=True)
    if jars.returncode != 0 and not shutil.which("mvn"):
        return "Kafka's jars are not cached and there is no mvn to fetch them"
    return None


def run_series(a, kind, tools, tmp):
    """Broker, produce, ceiling and esmd for one broker kind; returns the results."""
    procs = bl.Procs()
    results = {}
    broker = None
    try:
        broker = (MockBroker if kind == "mock" else RealBroker)(a, tools, procs, tmp)
        results["bootstrap"] = broker.bootstrap
        results["version"] = broker.version
        bootstrap = broker.bootstrap

        t0 = time.monotonic()
        out = bl.run([tools["kafkatool"], "produce", "-b", bootstrap, "-t", "bench",
                        "--count", str(a.records), "--size", str(a.size),
                        "--partitions", str(a.partitions)] + (["--keyed"] if a.keyed else []),
                       600)
        results["produce_rate"] = a.records / (time.monotonic() - t0)
        log(out)
        wm = json.loads(bl.run([tools["kafkatool"], "watermarks", "-b", bootstrap, "-t",
                                  "bench"], 60))
        kept = sum(hi - lo for lo, hi in wm.values())
        if kept != a.records:
            raise RuntimeError("the broker holds %d of %d records (the mock's retention?): lower "
                               "--records or raise --partitions" % (kept, a.records))

        # The ceiling varies from run to run (the broker and the consumer share the CPUs):
        # take the best of a few runs, each with a fresh consumer from the beginning. It gets
        # the properties esmd's consumer gets (esmd's queue settings and --property).
        props = ([] if a.ceiling_defaults else ESMD_CONSUMER_PROPS) + a.property
        xargs = [x for kv in props for x in ("-X", kv)]
        runs = []
        for _ in range(a.ceiling_runs):
            out = bl.run([tools["kafkatool"], "consume-rate", "-b", bootstrap, "-t", "bench",
                            "--count", str(a.records)] + xargs, 600)
            log(out)
            runs.append(float(re.search(r"= ([0-9.]+) records/s", out).group(1)))
        results["ceiling"] = max(runs)
        results["ceiling_runs"] = runs

        if not a.skip_esmd:
            run_esmd(a, tools, procs, tmp, bootstrap, broker.pid, results)
    finally:
        procs.stop_all()
        if broker is not None:
            broker.stop()
    return results


def main():
    a = parse_args()
    counts = [int(x) for x in str(a.partitions).split(",")]
    kinds = ["mock", "real"] if a.broker == "both" else [a.broker]
    a.partitions = min(counts)  # the tightest fit for the mock's check below
    per_part = -(-a.records // a.partitions)
    per_record = a.size + RECORD_OVERHEAD + (2 + len(str(a.records)) if a.keyed else 0)
    if "mock" in kinds and per_part * per_record > MOCK_MAX_BYTES * 0.95:
        sys.exit("kafka_bench: %d records of %d B per partition (~%.1f MB) do not fit the mock's"
                 " 5 MB per partition: raise --partitions, lower --records / --size, or use"
                 " --broker real" % (per_part, a.size, per_part * per_record / 1048576.0))
    if "real" in kinds:
        why = real_broker_missing()
        if why and a.broker == "real":
            sys.exit("kafka_bench: cannot start a real Kafka broker: %s" % why)
        if why:
            log("skipping the real-broker series: %s" % why)
            kinds.remove("real")
    tools = bl.find_tools(a.build, ["kafkatool"] + ([] if a.skip_esmd else ["sink", "esmd"]),
                          "kafka_bench", ["sink", "esmd"])

    tmp = tempfile.mkdtemp(prefix="esmd-bench-")
    series = []
    status = 0
    try:
        for parts in counts:
            a.partitions = parts
            for kind in kinds:
                log("=== series on the %s, %d partitions ===" % (BROKER_NAMES[kind], parts))
                stmp = os.path.join(tmp, "%s-%d" % (kind, parts))
                os.mkdir(stmp)
                try:
                    r = run_series(a, kind, tools, stmp)
                except (RuntimeError, subprocess.TimeoutExpired, OSError) as e:
                    log("FAILED (%s series, %d partitions): %s" % (kind, parts, e))
                    status = 1
                    continue
                print_table(a, kind, r)
                series.append((kind, parts, r))
    finally:
        if a.keep:
            log("files kept in %s" % tmp)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    if len(series) > 1:
        print_summary(a, series)
    return status


if __name__ == "__main__":
    sys.exit(main())
