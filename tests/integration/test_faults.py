"""Faults an operator meets, injected by the test: the database going away while esmd starts,
stop signals during start-up, and — on every source — esmd killed with SIGKILL again and again
under load, the servers restarted, and a function that fails, hangs, resets the connection and
answers garbage at random (docs/operations.md).

Each load test prints its tally (`lost`, `duplicates`, `out of order`) and asserts: nothing
lost, first deliveries in order where the source orders (Kafka partition, Redis stream),
nothing left pending at the end, and esmd still running, stopping with exit status 0."""

import base64
import json
import os
import random
import signal
import subprocess
import threading
import time

import pytest
import requests
import yaml

import servers
from endpoint import Response
from kafka_tally import Producer, Tally, kafka_cfg, wait_committed
from servers import wait_for

KILLS = 3
# Failed batches are retried after 20 ms doubling to 200 ms instead of 250 ms .. 30 s.
FAST_RETRIES = {"ESMD_MAPPING_RETRY_BACKOFF": "20,200"}


class Chaos:
    """A seeded function that misbehaves at random: per request a 500, a hang past the
    function's timeout, a connection reset, or one of several malformed answers (a truncated
    body, broken chunked encoding, no HTTP at all); otherwise None (the endpoint's default
    200). `counts` says how often each happened."""

    GARBAGE = [
        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"tr",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nnot hex\r\n",
        b"\x00\x01\x02 this is not HTTP\r\n\r\n",
        b"HTTP/1.1 2",
    ]

    def __init__(self, seed, fail=0.08, hang=0.01, reset=0.03, garbage=0.03, hang_s=2.0):
        self.rng = random.Random(seed)
        self.lock = threading.Lock()
        self.p = [("fail", fail), ("hang", hang), ("reset", reset), ("garbage", garbage)]
        self.hang_s = hang_s
        self.counts = {k: 0 for k, _ in self.p}

    def __call__(self, req):
        with self.lock:
            x = self.rng.random()
            pick = None
            for kind, p in self.p:
                if x < p:
                    pick = kind
                    break
                x -= p
            if pick is None:
                return None
            self.counts[pick] += 1
            g = self.rng.choice(self.GARBAGE)
        if pick == "fail":
            return Response(500, {"message": "injected failure"})
        if pick == "hang":
            return Response(200, delay=self.hang_s, success=False)
        if pick == "reset":
            return Response.reset()
        return Response.garbage(g)


class ChaosTally(Tally):
    """The Kafka Tally behind a Chaos function: only records answered with success count."""

    def __init__(self, endpoint, topic, chaos):
        super().__init__(endpoint, topic)
        self.chaos = chaos

    def _on_request(self, req):
        resp = self.chaos(req)
        if resp is None:
            super()._on_request(req)
        return resp


class Ledger:
    """Deliveries by item number behind a Chaos function, for the Redis and Postgres-queue
    sources: `key(record)` gives a record's number. Counts successful deliveries per number and
    first deliveries that came below an earlier first delivery (out of order)."""

    def __init__(self, endpoint, chaos, key):
        self.chaos, self.key = chaos, key
        self.lock = threading.Condition()
        self.times = {}
        self.highest_first = -1
        self.out_of_order = 0
        self.examples = []
        endpoint.behaviour = self._on_request

    def _on_request(self, req):
        resp = self.chaos(req)
        if resp is not None:
            return resp
        ev = req.json if isinstance(req.json, dict) else {}
        with self.lock:
            for rec in ev.get("Records") or []:
                i = self.key(rec)
                if i not in self.times:
                    if i < self.highest_first:
                        self.out_of_order += 1
                        if len(self.examples) < 10:
                            self.examples.append("%d first delivered after %d" % (
                                i, self.highest_first))
                    self.highest_first = max(self.highest_first, i)
                self.times[i] = self.times.get(i, 0) + 1
            self.lock.notify_all()
        req.body, req.json = b"", None
        return None

    def delivered(self):
        with self.lock:
            return len(self.times)

    def wait_all(self, n, timeout):
        deadline = time.monotonic() + timeout
        with self.lock:
            while len([i for i in range(n) if i in self.times]) < n:
                left = deadline - time.monotonic()
                if left <= 0:
                    missing = [i for i in range(n) if i not in self.times]
                    raise AssertionError("%d of %d never delivered, e.g. %s" % (
                        len(missing), n, missing[:10]))
                self.lock.wait(min(left, 0.2))

    def report(self, name, n):
        with self.lock:
            lost = len([i for i in range(n) if i not in self.times])
            dups = sum(t - 1 for t in self.times.values())
            print("\n%s: %d items; lost %d, duplicates %d, out of order %d; function %s" % (
                name, n, lost, dups, self.out_of_order, self.chaos.counts))
            return lost, dups


class Feeder(threading.Thread):
    """Sends items 0..total-1 in chunks, send(start, count) a chunk, from a thread of its own. A
    chunk whose send raises one of `retry_on` (its server is restarting) is sent again after
    0.2 s; an entry of it that got through before the failure then exists twice, which the
    tallies count as a duplicate delivery, never as a loss."""

    def __init__(self, total, chunk, send, retry_on):
        super().__init__(daemon=True)
        self.total, self.chunk, self.send, self.retry_on = total, chunk, send, retry_on
        self.sent = 0
        self.start()

    def run(self):
        while self.sent < self.total:
            n = min(self.chunk, self.total - self.sent)
            try:
                self.send(self.sent, n)
                self.sent += n
            except self.retry_on:
                time.sleep(0.2)
                continue
            time.sleep(0.05)

    def finish(self, timeout=180):
        self.join(timeout)
        assert self.sent == self.total, "sent %d of %d" % (self.sent, self.total)


def kill_and_restart_under_load(proc, delivered, kills=KILLS, step=800, timeout=120):
    """SIGKILLs esmd `kills` times, each after `step` more items were delivered, and starts it
    again at once (a service manager's restart)."""
    for k in range(kills):
        target = delivered() + step
        wait_for(lambda: delivered() >= target, timeout, 0.05,
                 "%d delivered before kill %d" % (target, k + 1))
        assert proc.running(), servers.tail(proc.logfile)
        proc.kill9()
        proc.start()


def redis_mapping_config(postgres, redis, endpoint, stream, name):
    return {
        "postgres": postgres.url,
        "admin": {"listen": "127.0.0.1:0"},
        "connections": {"r": {"type": "redis", "url": redis.url}},
        "functions": {"fn": {"url": endpoint.url, "timeout": "10s"}},
        "mappings": [{"name": name, "function": "fn",
                      "source": {"redis": "r", "stream": stream, "group": "g",
                                 "starting_position": "trim_horizon"},
                      "batch_size": 10, "maximum_batching_window": "50ms"}],
    }


class LockHolder:
    """A psql session that holds `LOCK TABLE name IN ACCESS EXCLUSIVE MODE` until it ends."""

    def __init__(self, postgres, table):
        kw = postgres._popen_kw()
        self.proc = subprocess.Popen(
            [os.path.join(postgres.bindir, "psql"), "-X", "-q", "-At", "-h", "127.0.0.1", "-p",
             str(postgres.port), "-U", "postgres", "-d", postgres.dbname],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            cwd=postgres.tmp, **kw)
        self.proc.stdin.write("BEGIN;\nLOCK TABLE %s IN ACCESS EXCLUSIVE MODE;\n"
                              "SELECT 'locked';\n" % table)
        self.proc.stdin.flush()
        line = self.proc.stdout.readline().strip()
        assert line == "locked", "psql could not take the lock: %r" % line

    def close(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def kinesis_records(endpoint):
    """Records of the Kinesis-shaped events that were answered 200."""
    return [rec for req in endpoint.ok_requests() if isinstance(req.json, dict)
            for rec in req.json.get("Records") or []]


def waiting_on_locks(postgres):
    rows = postgres.sql("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'")
    return int(rows[0][0])


@pytest.mark.parametrize("table", ["esmd.mapping_state", "esmd.mapping_overrides"])
def test_postgres_restart_during_start_up_is_waited_out(postgres, redis, endpoint, esmd, names,
                                                        table):
    """A start-up step blocked on a lock when PostgreSQL restarts: esmd retries the step (it
    used to exit 1 with 'could not record mapping state: … the database system is shutting
    down'), comes up and delivers."""
    stream = names.topic()
    cfg = redis_mapping_config(postgres, redis, endpoint, stream, names.mapping())
    proc = esmd(cfg, start=False)
    r = subprocess.run([servers.binary("esmd"), "migrate", "-c", proc.config_path],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=60)
    assert r.returncode == 0, r.stdout
    holder = LockHolder(postgres, table)
    try:
        proc.start(wait=False)
        wait_for(lambda: waiting_on_locks(postgres) > 0, 30, 0.1,
                 "esmd's start-up to wait on the lock of %s" % table)
        assert proc.running()
        postgres.stop()  # fast shutdown: the lock holder and esmd's session are cut off
        time.sleep(1.0)  # esmd meets a database that refuses connections, then none at all
        assert proc.running(), servers.tail(proc.logfile)
    finally:
        holder.close()
        postgres.start()
    proc.wait_healthy(60)
    log = proc.log()
    assert "database not ready" in log
    assert "exiting with status 1" not in log
    n = 25
    for i in range(n):
        redis.command("XADD", stream, "*", "v", str(i))
    endpoint.wait_for(lambda: len(kinesis_records(endpoint)) >= n, 60, "%d records" % n)
    assert proc.stop() == 0


def test_stop_signal_while_waiting_for_the_database(postgres, endpoint, esmd, names, tmp_path):
    """No database at all: esmd logs that it waits and retries, and SIGTERM ends the wait with
    exit status 0 (a service manager's stop, not a failure)."""
    port = servers.free_port()  # nothing listens there
    cfg = {
        "postgres": "postgresql://postgres@127.0.0.1:%d/esmd?connect_timeout=2" % port,
        "admin": {"listen": "127.0.0.1:0"},
        "functions": {"fn": {"url": endpoint.url}},
    }
    proc = esmd(cfg, start=False)
    proc.start(wait=False)
    wait_for(lambda: proc.log().count("database not ready") >= 2, 30, 0.1,
             "two failed start-up attempts in the log")
    assert proc.running()
    assert proc.stop(timeout=10) == 0
    assert "stopped by SIGTERM before start-up ended" in proc.log()


def test_a_permanent_database_error_at_start_up_exits_1(postgres, endpoint, esmd, names):
    """A start-up step failing for a reason retrying will not mend (a role that may not create
    esmd's schema: permission denied, SQLSTATE 42501) ends start-up at once with exit status 1
    and the server's message in the log; it used to be retried forever as "database not
    ready". (Connection failures are still waited out: the tests above.)"""
    role, db = names.mapping(), names.mapping()
    postgres.sql('CREATE ROLE "%s" LOGIN' % role, db="postgres")
    postgres.create_db(db)
    cfg = {
        "postgres": "postgresql://%s@127.0.0.1:%d/%s" % (role, postgres.port, db),
        "admin": {"listen": "127.0.0.1:0"},
        "functions": {"fn": {"url": endpoint.url}},
    }
    proc = esmd(cfg, start=False)
    proc.start(wait=False)
    assert proc.proc.wait(30) == 1
    log = proc.log()
    assert "database migrations failed" in log and "permission denied" in log, log
    assert "database not ready" not in log


def outbox_inserts_waiting(postgres):
    rows = postgres.sql("SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
                        "AND query LIKE 'INSERT INTO esmd.outbox%'")
    return int(rows[0][0])


@pytest.mark.parametrize("how", ["reload", "sigterm"])
def test_stop_waits_for_the_on_failure_store(postgres, redis, endpoint, esmd, names, how):
    """A mapping stopped (removed by a reload, or SIGTERM) while the records it gave up are being
    stored for its on-failure destination (the outbox INSERT waits on a lock): the stop waits for
    the store, then acks the records; they reach the destination once, and the source has
    nothing pending. (The stop used to free the batch at once: nothing acked, and the store's
    answer then wrote into freed memory.)"""
    stream, failed = names.topic(), names.topic()
    cfg = redis_mapping_config(postgres, redis, endpoint, stream, names.mapping())
    m = cfg["mappings"][0]
    m.update({"maximum_retry_attempts": 0, "on_failure": "redis://r/" + failed,
              "maximum_batching_window": "0ms"})
    keep = {"name": names.mapping(), "function": "fn",
            "source": {"redis": "r", "stream": names.topic(), "group": "g"}}
    cfg["mappings"].append(keep)  # a reload leaves one mapping running
    endpoint.default = Response(500, {"errorMessage": "no"})
    proc = esmd(cfg)
    holder = LockHolder(postgres, "esmd.outbox")
    try:
        redis.command("XADD", stream, "*", "v", "1")
        wait_for(lambda: outbox_inserts_waiting(postgres) > 0, 30, 0.1,
                 "the on-failure record's INSERT to wait on the lock")
        if how == "reload":
            with open(proc.config_path) as f:
                cfg = yaml.safe_load(f)
            cfg["mappings"] = cfg["mappings"][1:]
            with open(proc.config_path, "w") as f:
                f.write(yaml.safe_dump(cfg, sort_keys=False))
            r = requests.post(proc.admin + "/admin/reload", timeout=10)
            assert r.status_code == 200 and r.json()["mappings"]["removed"] == [m["name"]], r.text
            r = requests.post(proc.admin + "/admin/reload", timeout=10)
            assert r.status_code == 409, r.text  # the removed mapping is still stopping
        else:
            proc.proc.send_signal(signal.SIGTERM)
    finally:
        holder.close()
    if how == "sigterm":
        assert proc.proc.wait(30) == 0
        # stored once: delivered, or (the stop came before the delivery worker claimed it) in
        # the outbox for the next start
        outbox = postgres.sql("SELECT count(*) FROM esmd.outbox WHERE destination = '%s'"
                              % m["on_failure"])
        assert redis.command("XLEN", failed) + int(outbox[0][0]) == 1
    else:
        wait_for(lambda: redis.command("XLEN", failed) == 1, 30, 0.2,
                 "the on-failure record delivered")
    wait_for(lambda: redis.command("XPENDING", stream, "g")[0] == 0, 30, 0.2,
             "the given-up record acked once stored")
    if how == "reload":
        assert proc.stop() == 0
        assert redis.command("XLEN", failed) == 1
    assert "heap-use-after-free" not in proc.log()


# ---- load under faults, per source ------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.kafka
def test_kafka_kill9_with_a_chaotic_function(kafka_broker, postgres, endpoint, esmd, names):
    """The broker's own crash under load is test_kafka_broker.py's
    test_broker_sigkill_and_restart_under_load."""
    b = kafka_broker
    topic = b.create_topic(names.topic(), 4)
    group = names.group()
    chaos = Chaos(seed=7)
    tally = ChaosTally(endpoint, topic, chaos)
    # A member killed with SIGKILL never leaves the group: its successor waits for the session
    # to time out, so the shortest session the broker allows keeps the test at seconds.
    cfg = kafka_cfg(b, topic, group, endpoint.url, names.mapping(), batch_size=50,
                    window="20ms", max_concurrency=4, timeout="1s",
                    properties={"session.timeout.ms": "6000", "heartbeat.interval.ms": "500"})
    proc = esmd(cfg, env=FAST_RETRIES)
    producer = Producer(b, topic, 4, chunk=400, pause=0.2)
    producer.start()
    kill_and_restart_under_load(proc, tally.delivered)
    wait_for(lambda: producer.produced >= 10000, 120, 0.1, "10,000 records produced")
    produced = producer.stop()
    hw = b.watermarks(topic)
    assert sum(hw.values()) >= produced
    tally.wait_complete(hw, 180, "every offset delivered after %d kills" % KILLS)
    lost, _ = tally.report("kafka: %d x kill -9, chaotic function %s" % (
        KILLS, chaos.counts), hw)
    assert lost == 0
    tally.assert_in_order(hw)
    wait_committed(b, group, topic, hw, timeout=60)
    assert proc.running()
    assert proc.stop() == 0


def kinesis_item(rec):
    """The generated entry's number: redistool's field v = {"i": N, ...}, in the data."""
    return json.loads(json.loads(base64.b64decode(rec["kinesis"]["data"]))["v"])["i"]


@pytest.mark.slow
def test_redis_kill9_and_a_redis_restart_with_a_chaotic_function(postgres, endpoint, esmd,
                                                                 names):
    r = servers.Redis(persistent=True)
    try:
        stream = names.topic()
        chaos = Chaos(seed=11)
        ledger = Ledger(endpoint, chaos, kinesis_item)
        cfg = redis_mapping_config(postgres, r, endpoint, stream, names.mapping())
        cfg["functions"]["fn"].update(timeout="1s", max_concurrency=4)
        cfg["mappings"][0]["source"]["visibility_timeout"] = "5s"
        proc = esmd(cfg, env=FAST_RETRIES)
        total = 6000

        def produce(start, count):
            subprocess.run([servers.binary("redistool"), "produce", "-u", r.url, "-s", stream,
                            "--count", str(count), "--size", "60", "--start", str(start)],
                           check=True, timeout=60, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)

        feeder = Feeder(total, 300, produce, subprocess.CalledProcessError)
        kill_and_restart_under_load(proc, ledger.delivered, step=600)
        r.restart()
        feeder.finish()
        ledger.wait_all(total, 180)
        lost, _ = ledger.report("redis: %d x kill -9, Redis restart" % KILLS, total)
        assert lost == 0
        assert ledger.out_of_order == 0, ledger.examples
        wait_for(lambda: r.command("XPENDING", stream, "g")[0] == 0, 60, 0.2,
                 "no entry pending in the group")
        assert proc.running()
        assert proc.stop() == 0
    finally:
        r.close()


@pytest.mark.slow
def test_pgqueue_kill9_and_a_postgres_restart_with_a_chaotic_function(postgres, endpoint, esmd,
                                                                      names):
    queue, dlq = names.mapping() + "_q", names.mapping() + "_dlq"
    chaos = Chaos(seed=13)
    ledger = Ledger(endpoint, chaos, lambda rec: json.loads(rec["body"])["i"])
    cfg = {
        "postgres": postgres.url,
        "functions": {"fn": {"url": endpoint.url, "timeout": "1s", "max_concurrency": 8}},
        "mappings": [{"name": names.mapping(), "function": "fn",
                      "source": {"pgqueue": queue, "visibility_timeout": "3s",
                                 "maximum_concurrency": 4, "max_receive_count": 1000,
                                 "dead_letter_queue": dlq},
                      "batch_size": 20, "maximum_batching_window": "0ms"}],
    }
    proc = esmd(cfg, env=FAST_RETRIES)
    total = 4000

    def send(start, count):
        postgres.sql("SELECT count(*) FROM esmd.send_batch('%s', ARRAY(SELECT "
                     "format('{\"i\":%%s}', i) FROM generate_series(%d, %d) i))" % (
                         queue, start, start + count - 1))

    feeder = Feeder(total, 200, send, RuntimeError)
    kill_and_restart_under_load(proc, ledger.delivered, step=500)
    postgres.stop()
    time.sleep(1.0)
    postgres.start()
    feeder.finish()
    ledger.wait_all(total, 180)
    lost, _ = ledger.report("pgqueue: %d x kill -9, PostgreSQL restart" % KILLS, total)
    assert lost == 0
    wait_for(lambda: not postgres.sql("SELECT 1 FROM esmd.queue_messages WHERE queue = '%s' "
                                      "LIMIT 1" % queue), 60, 0.2, "the queue drained")
    dead = postgres.sql("SELECT count(*) FROM esmd.queue_messages WHERE queue = '%s'" % dlq)
    assert dead == [["0"]], "%s messages dead-lettered" % dead[0][0]
    assert proc.running()
    assert proc.stop() == 0


class AsyncLoad:
    """Clients sending asynchronous invocations ({"i": N}, Event) through the Invoke route until
    stopped, each answer noted by N: 202 (accepted), another HTTP status (refused: esmd says the
    event was not stored), or no answer (esmd killed mid-request: in doubt for the client)."""

    def __init__(self, proc, clients=8):
        self.proc = proc
        self.lock = threading.Lock()
        self.accepted, self.refused, self.unanswered = set(), {}, set()
        self.next = 0
        self.halt = threading.Event()
        self.threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]
        for t in self.threads:
            t.start()

    def _run(self):
        s = requests.Session()
        while not self.halt.is_set():
            with self.lock:
                i = self.next
                self.next += 1
            try:
                r = s.post("%s/2015-03-31/functions/fn/invocations" % self.proc.admin,
                           data=json.dumps({"i": i}).encode(),
                           headers={"X-Amz-Invocation-Type": "Event"}, timeout=10)
            except requests.RequestException:
                with self.lock:
                    self.unanswered.add(i)
                s = requests.Session()
                time.sleep(0.05)  # esmd is down: try the next event a little later
                continue
            with self.lock:
                if r.status_code == 202:
                    self.accepted.add(i)
                else:
                    self.refused[i] = "%d %s" % (r.status_code, r.text[:200])

    def stop(self):
        self.halt.set()
        for t in self.threads:
            t.join(30)


@pytest.mark.slow
def test_async_kill9_and_a_postgres_restart_with_a_chaotic_function(postgres, endpoint, esmd,
                                                                    names):
    """Every event answered 202 is invoked with success or dead-lettered after its retries; an
    event answered with an error status was not stored (it is never invoked): esmd gives no
    false 500 when PostgreSQL restarts under an insert (docs/async.md#in-doubt-inserts)."""
    db = postgres.create_db(names.mapping() + "_db")
    chaos = Chaos(seed=17)
    lock = threading.Lock()
    ok, invoked = set(), set()

    def behave(req):
        try:
            i = json.loads(req.body)["i"]
        except (ValueError, KeyError, TypeError):
            return None
        with lock:
            invoked.add(i)
        resp = chaos(req)
        if resp is None:
            with lock:
                ok.add(i)
        return resp

    endpoint.behaviour = behave
    cfg = {
        "postgres": db,
        "async_queue": {"retry_base": "100ms", "backoff_base": "50ms", "backoff_cap": "200ms",
                        "poll_interval": "100ms"},
        "functions": {"fn": {"url": endpoint.url, "timeout": "1s", "max_concurrency": 8,
                             "async": {"maximum_retry_attempts": 2,
                                       "dead_letter": "pgqueue://fault_dlq"}}},
    }
    proc = esmd(cfg)
    load = AsyncLoad(proc)
    try:
        kill_and_restart_under_load(proc, lambda: len(ok), step=400)
        postgres.stop()
        time.sleep(1.0)
        postgres.start()
        target = len(load.accepted) + 400
        wait_for(lambda: len(load.accepted) >= target, 120, 0.1, "events accepted after the "
                 "PostgreSQL restart")
    finally:
        load.stop()

    def dead_lettered():
        rows = postgres.sql("SELECT body FROM esmd.queue_messages WHERE queue = 'fault_dlq'",
                            db=db.rsplit("/", 1)[1])
        return {json.loads(r[0])["i"] for r in rows}

    accepted = set(load.accepted)
    wait_for(lambda: accepted <= ok | dead_lettered(), 180, 0.2,
             "every accepted event invoked with success or dead-lettered")
    dlq = dead_lettered()
    falsely_refused = sorted(i for i in load.refused if i in invoked)
    print("\nasync: %d x kill -9, PostgreSQL restart: %d accepted, %d refused, %d unanswered; "
          "lost 0, dead-lettered %d, refused yet invoked %d; function %s" % (
              KILLS, len(accepted), len(load.refused), len(load.unanswered), len(dlq & accepted),
              len(falsely_refused), chaos.counts))
    assert not falsely_refused, ["%d: %s" % (i, load.refused[i]) for i in falsely_refused[:5]]
    wait_for(lambda: postgres.sql("SELECT count(*) FROM esmd.async_events",
                                  db=db.rsplit("/", 1)[1])[0][0] == "0", 60, 0.2,
             "the async queue empty")
    assert proc.running()
    assert proc.stop() == 0


def event_invoker(proc, result):
    """A thread (not started) that sends one Invoke `Event` to esmd; its answer goes to
    result["r"]."""
    def invoke():
        result["r"] = requests.post("%s/2015-03-31/functions/fn/invocations" % proc.admin,
                                    data=b'{"n": 1}', timeout=60,
                                    headers={"X-Amz-Invocation-Type": "Event"})
    return threading.Thread(target=invoke)


def standby_missing(postgres, missing):
    """With missing, commits of a database with synchronous_commit on wait (SyncRep) for a
    synchronous standby that does not exist; without, they go on."""
    postgres.sql("ALTER SYSTEM SET synchronous_standby_names = 'nobody'" if missing else
                 "ALTER SYSTEM RESET synchronous_standby_names", db="postgres")
    postgres.sql("SELECT pg_reload_conf()", db="postgres")


def syncrep_insert_sql(dbname):
    """The pid of an async INSERT of dbname committed locally and waiting for a standby."""
    return ("SELECT pid FROM pg_stat_activity WHERE datname = '%s' AND wait_event = "
            "'SyncRep' AND query LIKE '%%INSERT INTO esmd.async_events%%'" % dbname)


class CuttableProxy:
    """A TCP proxy on loopback to `port` whose connections the test can cut on the client side
    (cut()): esmd sees its connection lost, while the server's process lives on, as after a
    network cut."""

    def __init__(self, port):
        import socket
        self.target = port
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(64)
        self.port = self.lsock.getsockname()[1]
        self.pairs = []
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        import socket
        while True:
            try:
                c, _ = self.lsock.accept()
            except OSError:
                return
            u = socket.create_connection(("127.0.0.1", self.target))
            with self.lock:
                self.pairs.append((c, u))
            threading.Thread(target=self._pump, args=(c, u), daemon=True).start()
            threading.Thread(target=self._pump, args=(u, c), daemon=True).start()

    @staticmethod
    def _pump(a, b):
        try:
            while True:
                d = a.recv(65536)
                if not d:
                    break
                b.sendall(d)
        except OSError:
            pass

    def cut(self):
        """Closes esmd's side of every connection; the server side stays open (its process
        does not learn of the cut while it waits)."""
        import socket
        with self.lock:
            pairs, self.pairs = self.pairs, []
        for c, _ in pairs:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()
        return [u for _, u in pairs]

    def close(self):
        self.lsock.close()


def test_async_insert_in_doubt_while_its_session_lives_on(postgres, endpoint, esmd, names):
    """The connection is cut on esmd's side while the INSERT of an accepted event has committed
    locally and waits for a synchronous standby (wait event SyncRep), and its server process
    lives on. esmd used to look the event up at once: the still running transaction hid the row,
    the event was inserted a second time and invoked twice. Now esmd ends that process and waits
    for it first (docs/async.md#in-doubt-inserts): the committed row is found, the answer is 202
    and the event is invoked once."""
    dbname = names.mapping() + "_db"
    postgres.create_db(dbname)
    postgres.sql('ALTER DATABASE "%s" SET synchronous_commit = on' % dbname, db="postgres")
    proxy = CuttableProxy(postgres.port)
    cfg = {"postgres": "postgresql://postgres@127.0.0.1:%d/%s" % (proxy.port, dbname),
           "async_queue": {"poll_interval": "100ms"},
           "functions": {"fn": {"url": endpoint.url}}}
    proc = esmd(cfg)
    result = {}
    t = event_invoker(proc, result)
    waiting_insert = syncrep_insert_sql(dbname)
    upstream = []
    try:
        standby_missing(postgres, True)
        t.start()
        wait_for(lambda: postgres.sql(waiting_insert, db="postgres"), 30, 0.05,
                 "the INSERT to wait for the standby after its local commit")
        upstream = proxy.cut()
        # the answer comes while the standby is still missing: a second INSERT would wait for it
        t.join(20)
        answered_in_doubt = not t.is_alive()
    finally:
        standby_missing(postgres, False)
        t.join(60)
        for u in upstream:
            u.close()
        proxy.close()
    r = result["r"]
    assert r.status_code == 202, (r.status_code, r.text)
    assert answered_in_doubt, "esmd answered only once the standby wait ended (inserted again)"
    assert "of an INSERT cut off by a lost connection, 1 events were committed" in proc.log()
    endpoint.wait_for(lambda: len(endpoint.ok_requests()) >= 1, 30, "the event invoked")
    time.sleep(1.0)  # a second INSERT of the event would be invoked by now
    assert len(endpoint.ok_requests()) == 1


def test_async_insert_cut_off_after_its_commit_is_answered_202(postgres, endpoint, esmd, names):
    """The connection is lost after the INSERT of an accepted event committed and before esmd
    heard so. esmd used to answer 500 ("storing events: connection lost") for an event it then
    invoked: a client retrying on 500 made a duplicate. Now it looks the event up by its request
    id once the connection is back and answers 202.

    The commit is caught in the act deterministically: with synchronous_commit on in the test's
    database and a synchronous standby that does not exist, a commit is written locally and then
    waits (wait event SyncRep); terminating that backend cuts the connection of a committed
    INSERT (Postgres: "the transaction has already committed locally")."""
    dbname = names.mapping() + "_db"
    db = postgres.create_db(dbname)
    postgres.sql('ALTER DATABASE "%s" SET synchronous_commit = on' % dbname, db="postgres")
    cfg = {"postgres": db, "async_queue": {"poll_interval": "100ms"},
           "functions": {"fn": {"url": endpoint.url}}}
    proc = esmd(cfg)
    result = {}
    t = event_invoker(proc, result)
    waiting_insert = syncrep_insert_sql(dbname)
    try:
        standby_missing(postgres, True)
        t.start()
        wait_for(lambda: postgres.sql(waiting_insert, db="postgres"), 30, 0.05,
                 "the INSERT to wait for the standby after its local commit")
        pid = postgres.sql(waiting_insert, db="postgres")[0][0]
        postgres.sql("SELECT pg_terminate_backend(%s)" % pid, db="postgres")
    finally:
        standby_missing(postgres, False)
        t.join(60)
    r = result["r"]
    assert r.status_code == 202, (r.status_code, r.text)
    endpoint.wait_for(lambda: len(endpoint.ok_requests()) >= 1, 30, "the event invoked")
    time.sleep(1.0)  # a second INSERT of the event would be invoked by now
    assert len(endpoint.ok_requests()) == 1
    assert "1 events were committed and 0 were not" in proc.log()
    assert proc.stop() == 0
