"""Destinations through the Postgres outbox (src/outbox.c, src/dest_*.c, docs/destinations.md),
driven by build/desttool against real servers: Postgres and Redis from the fixtures, librdkafka's
mock cluster (the `kafka` fixture), the recording HTTP endpoint.

Every test uses its own database, so the outbox holds only its rows."""

import base64
import json
import os
import signal
import subprocess
import time

import pytest
import yaml

import servers
from endpoint import Response


def _db(postgres, request):
    name = "dest_%s_%d" % (request.node.name.lower().replace("[", "_").replace("]", "")[-30:],
                           os.getpid())
    name = "".join(c if c.isalnum() or c == "_" else "_" for c in name)
    return postgres.create_db(name), name


class Tool:
    """One `desttool run` process."""

    def __init__(self, tmp_path, config, args, name="tool"):
        self.cfg = tmp_path / ("%s.yaml" % name)
        self.cfg.write_text(yaml.safe_dump(config, sort_keys=False))
        self.report = tmp_path / ("%s-report.json" % name)
        self.log = tmp_path / ("%s.stderr" % name)
        self.argv = [servers.binary("desttool"), "run", "-c", str(self.cfg),
                     "--report", str(self.report)] + list(args)
        self.proc = None
        self.out = []

    def start(self):
        assert os.path.exists(self.argv[0]), "%s not built" % self.argv[0]
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.PIPE,
                                     stderr=open(self.log, "ab"), start_new_session=True)
        return self

    def run(self, timeout=60):
        self.start()
        out, _ = self.proc.communicate(timeout=timeout)
        self.out = out.decode().splitlines()
        assert self.proc.returncode == 0, "desttool exited %d: %s\n%s" % (
            self.proc.returncode, self.out, servers.tail(str(self.log)))
        return self

    def wait_line(self, want, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline().decode()
            if not line:
                raise RuntimeError("desttool exited (%s): %s" % (
                    self.proc.poll(), servers.tail(str(self.log))))
            self.out.append(line.strip())
            if line.strip() == want:
                return
        raise TimeoutError("no %r from desttool" % want)

    def state(self):
        try:
            return json.loads(self.report.read_text())
        except (OSError, ValueError):
            return None

    def metrics(self):
        st = self.state()
        return servers.Metrics(servers.parse_metrics(st["metrics"] if st else ""))

    def stop(self, sig=signal.SIGTERM, timeout=60):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=timeout)
        return self.proc.returncode

    def kill9(self):
        self.proc.kill()
        self.proc.wait()

    def close(self):
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def tools(tmp_path, request):
    started = []

    def make(config, args, name="tool"):
        t = Tool(tmp_path, config, args, name="%s%d" % (name, len(started)))
        started.append(t)
        return t

    yield make
    for t in started:
        t.close()
    rep = getattr(request.node, "rep_call", None)
    if rep is None or rep.failed:
        for t in started:
            print("\n==== %s stderr ====\n%s" % (t.argv, servers.tail(str(t.log), 60)))


def outbox(postgres, db):
    return postgres.sql("SELECT id, destination, attempts, last_error, "
                        "next_attempt_at > now() AS later, lease_owner "
                        "FROM esmd.outbox ORDER BY id", db=db)


def bodies(n, tag="desttool"):
    return [{"i": i, "tag": tag} for i in range(n)]


# ---- each kind receives exactly the payload ------------------------------------------------


def test_dest_http_receives_payload_and_row_deleted(postgres, endpoint, tools, request):
    url, db = _db(postgres, request)
    uri = endpoint.base + "/hook?x=1"
    t = tools({"postgres": url}, ["--send", uri, "--count", "5", "--tag", "h", "--until-empty"])
    t.run()
    assert t.out == ["committed 5", "delivered"]
    got = endpoint.ok_requests()
    assert sorted(r.body for r in got) == sorted(
        json.dumps(b, separators=(",", ":")).encode() for b in bodies(5, "h"))
    for r in got:
        assert r.method == "POST" and r.path == "/hook?x=1"
        assert r.headers["content-type"] == "application/json"
        assert r.headers["x-esmd-idempotency-key"].startswith("esmd-outbox-")
    assert outbox(postgres, db) == []
    m = t.metrics()
    assert m.get("esmd_destination_deliveries_total", destination=uri) == 5
    assert m.get("esmd_destination_delivery_failures_total", destination=uri) == 0


def test_dest_pgqueue_receives_payload_exactly_once(postgres, tools, request):
    url, db = _db(postgres, request)
    body = '{"a": [1, 2.50, "é\\u00e9"],  "b":null}'  # exact bytes, not re-encoded
    t = tools({"postgres": url}, ["--send", "pgqueue://dest_q", "--count", "3", "--body", body,
                                  "--until-empty"])
    t.run()
    rows = postgres.sql("SELECT queue, body FROM esmd.queue_messages ORDER BY id", db=db)
    assert rows == [["dest_q", body]] * 3
    assert outbox(postgres, db) == []


def test_dest_redis_stream_payload_field(postgres, redis, tools, request):
    url, db = _db(postgres, request)
    stream = "dest-stream-%d" % os.getpid()
    cfg = {"postgres": url, "connections": {"r": {"type": "redis", "url": redis.url}}}
    t = tools(cfg, ["--send", "redis://r/" + stream, "--count", "4", "--tag", "r",
                    "--until-empty"])
    t.run()
    entries = redis.command("XRANGE", stream, "-", "+")
    assert len(entries) == 4
    got = []
    for _id, fields in entries:
        assert fields[0] == "payload"
        assert len(fields) == 2
        got.append(json.loads(fields[1]))
    assert sorted(got, key=lambda b: b["i"]) == bodies(4, "r")
    assert outbox(postgres, db) == []


def test_dest_kafka_payload_and_key(postgres, kafka, tools, request):
    url, db = _db(postgres, request)
    topic = "dest-topic-%d" % os.getpid()
    kafka.create_topic(topic, 3)
    cfg = {"postgres": url, "connections": {"k": {
        "type": "kafka", "bootstrap_servers": kafka.bootstrap,
        # consumer-only properties of the connection are not given to the producer
        "properties": {"session.timeout.ms": "6000", "auto.offset.reset": "earliest"}}}}
    t = tools(cfg, ["--send", "kafka://k/" + topic, "--count", "12", "--key", "key-",
                    "--tag", "k", "--until-empty"])
    t.run()
    r = subprocess.run([servers.binary("desttool"), "kafka-dump", "-b", kafka.bootstrap,
                        "-t", topic, "--count", "12", "--timeout", "30"],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=60)
    assert r.returncode == 0, r.stderr.decode()
    msgs = [json.loads(line) for line in r.stdout.decode().splitlines()]
    assert len(msgs) == 12
    by_i = {}
    for m in msgs:
        value = json.loads(m["value"])
        key = base64.b64decode(m["key_b64"]).decode()
        assert key == "key-%d" % value["i"]
        by_i[value["i"]] = m
    assert sorted(by_i) == list(range(12))
    assert {json.loads(m["value"])["tag"] for m in msgs} == {"k"}
    assert outbox(postgres, db) == []
    assert "Configuration property" not in open(t.log).read()


# ---- failures ------------------------------------------------------------------------------


def test_dest_unreachable_retried_with_backoff_without_blocking_others(postgres, endpoint,
                                                                      tools, request):
    url, db = _db(postgres, request)
    bad = endpoint.base + "/down"
    good = endpoint.base + "/up"
    down = {"on": True}
    endpoint.behaviour = lambda req: Response(503, {"message": "down"}) \
        if req.path == "/down" and down["on"] else None
    t = tools({"postgres": url}, ["--send", bad, "--send", good, "--send", "pgqueue://dq",
                                  "--count", "3", "--timeout", "120"]).start()
    t.wait_line("committed 9")
    # the healthy destinations are delivered while the other fails
    endpoint.wait_for(lambda: sum(1 for r in endpoint.ok_requests() if r.path == "/up") >= 3,
                      timeout=20, what="3 records on /up")
    servers.wait_for(lambda: postgres.sql("SELECT count(*) FROM esmd.queue_messages",
                                          db=db)[0][0] == "3", 20, 0.1, "3 queue messages")
    # retried with backoff: after the first claim (the 3 rows at once), the failing
    # destination gets one row at a time, at growing intervals (1 s doubling, jitter in
    # [ceiling/2, ceiling], plus up to 1 s of polling)
    endpoint.wait_for(lambda: sum(1 for r in endpoint.snapshot() if r.path == "/down") >= 6,
                      timeout=40, what="6 attempts on /down")
    tries = [r.t_arrival for r in endpoint.snapshot() if r.path == "/down"]
    assert tries[2] - tries[0] < 0.5, tries
    gaps = [b - a for a, b in zip(tries[2:], tries[3:])]
    assert gaps[0] >= 0.45 and gaps[1] >= 0.95 and gaps[2] >= 1.9, gaps

    def failing_state():
        st = t.state()
        if not st or st["ready"]:
            return None
        d = st["detail"]
        return st if (not d[bad]["ready"] and d[good]["ready"] and d["pgqueue://dq"]["ready"]
                      and d[bad]["pending"] == 3) else None

    st = servers.wait_for(failing_state, 10, 0.1, "readiness detail with the failing destination")
    assert st["detail"][bad]["error"] == "http: HTTP 503"
    m = t.metrics()
    assert m.get("esmd_destination_delivery_failures_total", destination=bad) >= 4
    assert m.get("esmd_destination_deliveries_total", destination=good) == 3
    assert m.get("esmd_destination_deliveries_total", destination="pgqueue://dq") == 3
    assert m.get("esmd_destination_pending", destination=bad) == 3
    rows = outbox(postgres, db)
    assert {r[1] for r in rows} == {bad}
    assert any(int(r[2]) >= 1 and r[3] == "http: HTTP 503" and r[4] == "t" for r in rows), rows
    # back up: the rows are delivered, the destination is ready again, the outbox empties
    down["on"] = False
    endpoint.wait_for(lambda: sum(1 for r in endpoint.ok_requests() if r.path == "/down") >= 3,
                      timeout=30, what="the 3 records on /down")
    servers.wait_for(lambda: outbox(postgres, db) == [], 10, 0.1, "an empty outbox")
    servers.wait_for(lambda: (t.state() or {}).get("ready"), 10, 0.1, "ready again")
    assert t.stop() == 0
    got = sorted(json.loads(r.body)["i"] for r in endpoint.ok_requests() if r.path == "/down")
    assert got == [0, 1, 2]


def test_dest_pending_counts_through_the_index_up_to_100000(postgres, tools, request):
    """esmd_destination_pending counts each destination's rows up to 100,000 (a deeper backlog
    shows 100000: the count walks the outbox_due index, it used to count every row of the table
    every 5 s), every destination in the table, those of no process here too."""
    url, db = _db(postgres, request)
    t = tools({"postgres": url}, ["--timeout", "120"]).start()
    t.wait_line("committed 0")
    bulk, few = "http://127.0.0.1:1/bulk", "http://127.0.0.1:1/few"
    postgres.sql("INSERT INTO esmd.outbox (destination, payload, next_attempt_at) "
                 "SELECT CASE WHEN i <= 100005 THEN '%s' ELSE '%s' END, '{}', "
                 "now() + interval '1 day' FROM generate_series(1, 100007) i" % (bulk, few), db=db)
    servers.wait_for(lambda: t.metrics().get("esmd_destination_pending", destination=few) == 2,
                     20, 0.2, "the count of the rows inserted")
    m = t.metrics()
    assert m.get("esmd_destination_pending", destination=bulk) == 100000
    assert t.state()["detail"][bulk]["pending"] == 100000
    postgres.sql("DELETE FROM esmd.outbox WHERE id % 2 = 0", db=db)
    servers.wait_for(lambda: t.metrics().get("esmd_destination_pending", destination=bulk)
                     == 50003, 20, 0.2, "the count after half the rows went")
    assert t.stop() == 0


def test_dest_kafka_broker_down_retried(postgres, tools, request):
    """A Kafka destination whose cluster is unreachable: failures, then delivery once up."""
    url, db = _db(postgres, request)
    port = servers.free_port()  # nothing listens there
    cfg = {"postgres": url, "connections": {
        "gone": {"type": "kafka", "bootstrap_servers": "127.0.0.1:%d" % port,
                 "properties": {"message.timeout.ms": "1500"}}}}
    t = tools(cfg, ["--send", "kafka://gone/t1", "--count", "2", "--timeout", "60"]).start()
    t.wait_line("committed 2")

    def failed():
        st = t.state()
        return st and not st["ready"] and st["detail"]["kafka://gone/t1"].get("error")

    err = servers.wait_for(failed, 20, 0.1, "a failed kafka write")
    assert "timed out" in err.lower(), err
    assert t.metrics().get("esmd_destination_delivery_failures_total",
                           destination="kafka://gone/t1") >= 1
    assert len(outbox(postgres, db)) == 2
    assert t.stop() == 0


# ---- crash safety --------------------------------------------------------------------------


def test_dest_kill9_after_commit_loses_nothing(postgres, endpoint, tools, request):
    url, db = _db(postgres, request)
    uri = endpoint.base + "/crash"
    hold = {"on": True}
    endpoint.behaviour = lambda req: Response(200, delay=20, success=False) if hold["on"] else None
    t = tools({"postgres": url}, ["--send", uri, "--count", "3", "-i", "crashy",
                                  "--timeout", "120"]).start()
    t.wait_line("committed 3")
    endpoint.wait_for(lambda: len(endpoint.snapshot()) >= 3, 10, "the writes in flight")
    t.kill9()
    rows = outbox(postgres, db)
    assert len(rows) == 3 and all(r[5] == "crashy" for r in rows), rows
    hold["on"] = False
    # the same instance id starts again: the dead process's leases are released at once
    t2 = tools({"postgres": url}, ["-i", "crashy", "--until-empty", "--timeout", "30"])
    started = time.monotonic()
    t2.run()
    assert time.monotonic() - started < 15
    got = sorted(json.loads(r.body)["i"] for r in endpoint.ok_requests())
    assert got == [0, 1, 2]
    assert outbox(postgres, db) == []


def test_dest_other_instance_waits_for_the_lease(postgres, endpoint, tools, request):
    """Rows claimed by a live instance are not written by another one."""
    url, db = _db(postgres, request)
    uri = endpoint.base + "/lease"
    endpoint.behaviour = lambda req: Response(200, delay=4)
    a = tools({"postgres": url}, ["--send", uri, "--count", "2", "-i", "a", "--until-empty",
                                  "--timeout", "60"]).start()
    a.wait_line("committed 2")
    endpoint.wait_for(lambda: len(endpoint.snapshot()) >= 2, 10, "the writes of a")
    b = tools({"postgres": url}, ["-i", "b", "--timeout", "60"]).start()
    time.sleep(1.5)
    assert len(endpoint.snapshot()) == 2  # b did not take the leased rows
    a.wait_line("delivered", timeout=30)
    assert b.stop() == 0
    assert len(endpoint.snapshot()) == 2
    assert outbox(postgres, db) == []


def test_dest_stop_finishes_writes_in_progress(postgres, endpoint, tools, request):
    url, db = _db(postgres, request)
    uri = endpoint.base + "/slow"
    endpoint.behaviour = lambda req: Response(200, delay=1.5)
    t = tools({"postgres": url}, ["--send", uri, "--count", "2", "--timeout", "60"]).start()
    t.wait_line("committed 2")
    endpoint.wait_for(lambda: len(endpoint.snapshot()) >= 2, 10, "the writes in flight")
    assert t.stop() == 0
    assert len(endpoint.ok_requests()) == 2
    assert outbox(postgres, db) == []


# ---- the C unit test against the fixture's Postgres ------------------------------------------


def test_dest_unit_test_against_live_postgres(postgres):
    """build/test_destination with ESMD_TEST_PG (ctest runs it without, skipping its live part)."""
    exe = servers.binary("test_destination")
    assert os.path.exists(exe), "%s not built" % exe
    url = postgres.create_db("unit_dest_%d" % os.getpid())
    r = subprocess.run([exe], cwd=servers.ROOT, env=dict(os.environ, ESMD_TEST_PG=url),
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-6000:]
