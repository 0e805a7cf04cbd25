"""What the benchmark scripts share (python3 stdlib only): finding the built tools, starting and
stopping children, the `sink` endpoint, esmd's generated configuration, waiting for the sink to
see every record, reading /proc, and printing the table. See tests/bench/README.md.

    import benchlib as bl
    tools = bl.find_tools(a.build, ["esmd", "sink"], "kafka_bench")
    procs = bl.Procs()
    sink, sink_port = bl.start_sink(procs, tools, '"offset":')
    ...
    esmd = procs.start("esmd", [tools["esmd"], "run", "-c", cfg], ...)
    seen = bl.wait_for_sink(esmd, sink_port, count, timeout, esmd_log)
"""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pgtmp import PgTmp, free_port  # noqa: E402,F401  (re-exported for the scripts)

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))


def log(msg):
    """Progress, on stderr (the tables go to stdout)."""
    print("[bench] " + msg, file=sys.stderr, flush=True)


def default_build():
    return os.environ.get("ESMD_BUILD", "./build")


def add_build_arg(ap, holding):
    ap.add_argument("--build", default=default_build(),
                    help="dir holding %s (default: $ESMD_BUILD or ./build)" % holding)


def add_run_args(ap):
    """--wrap and --keep, which every esmd benchmark takes."""
    ap.add_argument("--wrap", default="",
                    help="command line to run esmd under, e.g. 'perf record -g -o esmd.perf'")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (config, logs)")


def find_tools(build, need, prog, names=()):
    """{name: path} of the tools in build; exits with a message when one of `need` is missing.
    `names` adds tools that are looked up but optional."""
    tools = {n: os.path.join(build, n) for n in list(need) + list(names)}
    for n in need:
        if not os.access(tools[n], os.X_OK):
            sys.exit("%s: %s not found or not executable (build it, or --build DIR)"
                     % (prog, tools[n]))
    return tools


def run(args, timeout=900):
    """Runs a tool to its end; its stdout, stripped. RuntimeError when it fails."""
    out = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError("%s failed (%d): %s%s" % (" ".join(args), out.returncode, out.stdout,
                                                     out.stderr))
    return out.stdout.strip()


def psql(pg, sql):
    """One statement on a PgTmp through psql; its unaligned output."""
    return run([os.path.join(pg.bindir, "psql"), "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1",
                "-d", pg.url, "-c", sql], 600)


def tail(path, n=30):
    """The last n lines of a log file ('' when unreadable)."""
    try:
        with open(path, errors="replace") as f:
            return "".join(f.readlines()[-n:])
    except OSError:
        return ""


def stop(p, timeout=30):
    """SIGTERM (after closing its stdin), then SIGKILL after timeout s; the exit status."""
    if p.poll() is not None:
        return p.returncode
    if p.stdin:
        try:
            p.stdin.close()
        except OSError:
            pass
    p.send_signal(signal.SIGTERM)
    try:
        return p.wait(timeout)
    except subprocess.TimeoutExpired:
        log("pid %d did not stop in %d s: killing it" % (p.pid, timeout))
        p.kill()
        return p.wait()


class Procs:
    """Every child we start, stopped in reverse order."""

    def __init__(self):
        self.items = []

    def start(self, name, args, **kw):
        log("start %s: %s" % (name, " ".join(args)))
        p = subprocess.Popen(args, **kw)
        self.items.append((name, p))
        return p

    def stop(self, p, timeout=15):
        return stop(p, timeout)

    def forget(self, p):
        """p was stopped by hand: stop_all leaves it alone."""
        self.items = [(n, q) for n, q in self.items if q is not p]

    def stop_all(self):
        for _, p in reversed(self.items):
            stop(p, 15)
        self.items = []


def first_line(p, what):
    """The first stdout line of a child that prints one when it is ready."""
    line = p.stdout.readline()
    if not line:
        raise RuntimeError("%s exited before printing its address (rc %s)" % (what, p.poll()))
    return line.strip()


def start_sink(procs, tools, pattern=None, delay_ms=0):
    """tests/tools/sink counting occurrences of `pattern` (its default: Kafka's '"offset":') as
    records, answering each request after delay_ms (a slow function); (process, port)."""
    args = [tools["sink"], "--port", "0"] + (["--pattern", pattern] if pattern else []) + \
        (["--delay-ms", str(delay_ms)] if delay_ms else [])
    p = procs.start("sink", args, stdout=subprocess.PIPE, text=True)
    return p, int(first_line(p, "sink"))


def sink_stats(port):
    """{"requests", "records", "bytes"} the sink has seen since it started."""
    with urllib.request.urlopen("http://127.0.0.1:%d/stats" % port, timeout=5) as r:
        return json.loads(r.read())


def wait_http(url, timeout=30):
    """Until url answers 200 (RuntimeError after timeout s)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("%s did not answer" % url)


def save_metrics(admin_port, path):
    """esmd's /metrics at this moment, into path (kept with --keep)."""
    with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % admin_port, timeout=5) as r:
        with open(path, "wb") as f:
            f.write(r.read())


def proc_status(pid, key):
    """A /proc/PID/status field in kB, or None."""
    try:
        with open("/proc/%d/status" % pid) as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return None


def cpu_seconds(pid):
    """User + system CPU seconds a live process has used so far, or 0."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def pg_cpu_seconds(pg):
    """CPU seconds of a PgTmp's postmaster and its live children (the backends)."""
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


def esmd_config(path, generator, pg_url, admin_port, sink_port, concurrency, connections="",
                mappings="", extra=""):
    """Writes esmd's YAML: postgres, the admin listener, `connections` (YAML text, indented as
    under `connections:`), one function `sink` (the sink endpoint, timeout 30 s, max_concurrency)
    and `mappings` (YAML text, indented as under `mappings:`). `extra` goes after `admin:`'s
    listen line (e.g. a token)."""
    cfg = "# Generated by tests/bench/%s\npostgres: %s\nadmin:\n  listen: 127.0.0.1:%d\n%s" % (
        generator, pg_url, admin_port, extra)
    if connections:
        cfg += "connections:\n" + connections
    cfg += ("functions:\n  sink:\n    url: http://127.0.0.1:%d/2015-03-31/functions/function/"
            "invocations\n    timeout: 30s\n    max_concurrency: %d\n" % (sink_port, concurrency))
    if mappings:
        cfg += "mappings:\n" + mappings
    with open(path, "w") as f:
        f.write(cfg)


def wait_for_sink(esmd, sink_port, count, timeout, esmd_log, t_start, base=None,
                  what="records", warn_after=5):
    """Polls the sink every 20 ms until it has seen `count` records more than `base` (a
    sink_stats() taken before esmd started), following esmd's peak RSS. RuntimeError when esmd
    exits or after timeout s. Returns {"t_first", "t_last" (monotonic times of the first and
    the last record at the sink), "hwm_kb"}."""
    b = base["records"] if base else 0
    t_first = None
    hwm = 0
    last = -1
    last_progress = last_warn = time.monotonic()
    deadline = t_start + timeout
    while True:
        now = time.monotonic()
        if esmd.poll() is not None:
            raise RuntimeError("esmd exited with %d; last lines of %s:\n%s"
                               % (esmd.returncode, esmd_log, tail(esmd_log)))
        hwm = max(hwm, proc_status(esmd.pid, "VmHWM") or 0)
        seen = sink_stats(sink_port)["records"] - b
        if seen > 0 and t_first is None:
            t_first = now
        if seen != last:
            last = seen
            last_progress = now
            if seen >= count:
                hwm = max(hwm, proc_status(esmd.pid, "VmHWM") or 0)
                return {"t_first": t_first, "t_last": now, "hwm_kb": hwm}
        if now > deadline:
            raise RuntimeError("timeout: sink saw %d of %d %s after %.0f s; esmd log:\n%s"
                               % (seen, count, what, timeout, tail(esmd_log)))
        if now - last_progress > warn_after and now - last_warn > warn_after:
            last_warn = now
            log("no progress for %.0f s at %d %s" % (now - last_progress, seen, what))
        time.sleep(0.02)


def esmd_figures(count, t_start, w, stats, base=None):
    """The figures of one esmd run every benchmark reports: rates first→last and from the
    process start, time to the first record, peak RSS, and what the sink saw (less base)."""
    b = base or {"requests": 0, "records": 0, "bytes": 0}
    return {
        "esmd_rate": count / max(w["t_last"] - w["t_first"], 1e-9),
        "esmd_rate_from_start": count / max(w["t_last"] - t_start, 1e-9),
        "esmd_first_s": w["t_first"] - t_start,
        "esmd_span_s": w["t_last"] - w["t_first"],
        "rss_mb": w["hwm_kb"] / 1024.0,
        "requests": stats["requests"] - b["requests"],
        "records_seen": stats["records"] - b["records"],
        "bytes": stats["bytes"] - b["bytes"],
    }


def runs_text(xs):
    """'1234 / 1200 / 1190': every run of a measure."""
    return " / ".join("%.0f" % x for x in xs)


def request_rows(r, count, what="records"):
    """The table rows about what the sink received."""
    reqs = r["requests"]
    return [
        ("requests", "%d" % reqs),
        ("avg %s/request" % what, "%.1f" % (r["records_seen"] / reqs if reqs else 0)),
        ("avg request body", "%.1f KB" % (r["bytes"] / reqs / 1024.0 if reqs else 0)),
        ("%s at sink" % what, "%d (%d duplicates)" % (r["records_seen"],
                                                     r["records_seen"] - count)),
    ]


def print_rows(rows):
    """A two-column table, keys aligned, after a blank line, on stdout."""
    width = max(len(k) for k, _ in rows)
    print()
    for k, v in rows:
        print("%-*s  %s" % (width, k, v))
    sys.stdout.flush()
