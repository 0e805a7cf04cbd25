"""End to end against a real Apache Kafka broker (scripts/kafka-broker, single-node KRaft): what
librdkafka's mock cluster cannot show.

    broker SIGKILL and restart under load    nothing lost, nothing stuck, esmd ready again
    2 then 3 esmd instances in one group     every record delivered, one instance leaving;
                                             commits read back with Kafka's own tool
    1,000,000 records                        beyond the mock's retention: exactly once, in order
    partitions added at run time             picked up by esmd's metadata refresh
    SASL/PLAIN                               through the connection's properties; a wrong
                                             password is a 503 and a log line, not a crash

The endpoint does not keep the bodies here: a Tally counts every delivery as it arrives (per
partition: the offsets delivered at least once, the duplicates, and any first delivery out of
offset order), so a million records cost a few integers."""

import re
import signal
import threading
import time

import pytest

import servers
from endpoint import Endpoint
from servers import wait_for

pytestmark = pytest.mark.kafka


# ---- helpers --------------------------------------------------------------------------------


class Tally:
    """Installed as the endpoint's behaviour: counts the Kafka records of every request as it
    arrives, then drops the request's body and parsed JSON.

    Per partition: frontier[p] = n means offsets 0..n-1 have all been delivered at least once;
    dups[p] counts deliveries of offsets already delivered; a first delivery above the frontier
    (a gap: the partition's first deliveries out of offset order) is counted in `gaps`, kept
    aside and absorbed once the frontier reaches it."""

    def __init__(self, endpoint, topic):
        self.topic = topic
        self.lock = threading.Condition()
        self.frontier = {}
        self.dups = {}
        self.ahead = {}
        self.gaps = 0
        self.wrong_topic = 0
        self.records = 0
        self.requests = 0
        self.examples = []  # the first few anomalies, for the failure message
        endpoint.behaviour = self._on_request

    def _note(self, what):
        if len(self.examples) < 20:
            self.examples.append(what)

    def _on_request(self, req):
        ev = req.json if isinstance(req.json, dict) else {}
        groups = ev.get("records") or {}
        with self.lock:
            self.requests += 1
            for key, recs in groups.items():
                for rec in recs:
                    self._one(key, rec)
            self.lock.notify_all()
        req.body = b""
        req.json = None
        return None  # the endpoint's default answer

    def _one(self, key, rec):
        p, o = rec["partition"], rec["offset"]
        self.records += 1
        if rec["topic"] != self.topic or key != "%s-%d" % (self.topic, p):
            self.wrong_topic += 1
            self._note("record of %s under %s" % (rec["topic"], key))
            return
        f = self.frontier.get(p, 0)
        ahead = self.ahead.setdefault(p, set())
        if o < f or o in ahead:
            self.dups[p] = self.dups.get(p, 0) + 1
        elif o == f:
            f += 1
            while f in ahead:
                ahead.discard(f)
                f += 1
            self.frontier[p] = f
        else:
            self.gaps += 1
            ahead.add(o)
            self._note("partition %d: offset %d first delivered while %d was not yet" % (p, o, f))

    def delivered(self):
        with self.lock:
            return sum(self.frontier.values()) + sum(len(a) for a in self.ahead.values())

    def lost(self, hw):
        """Offsets below the watermarks never delivered."""
        with self.lock:
            return sum(max(0, high - self.frontier.get(p, 0) -
                           len([o for o in self.ahead.get(p, ()) if o < high]))
                       for p, high in hw.items())

    def duplicates(self):
        with self.lock:
            return sum(self.dups.values())

    def wait_complete(self, hw, timeout, what="every offset delivered"):
        deadline = time.monotonic() + timeout
        with self.lock:
            while not all(self.frontier.get(p, 0) >= high for p, high in hw.items()):
                left = deadline - time.monotonic()
                if left <= 0:
                    short = {p: (self.frontier.get(p, 0), high) for p, high in hw.items()
                             if self.frontier.get(p, 0) < high}
                    raise AssertionError(
                        "timed out after %ds waiting for %s: partitions (delivered, end) %s; "
                        "%d requests, %d records; anomalies %s" % (
                            timeout, what, short, self.requests, self.records, self.examples))
                self.lock.wait(min(left, 0.2))

    def report(self, name, hw):
        lost, dups = self.lost(hw), self.duplicates()
        print("\n%s: %d records at the end of %d partitions; %d deliveries in %d requests; "
              "lost %d, duplicates %d, out of order %d" % (
                  name, sum(hw.values()), len(hw), self.records, self.requests, lost, dups,
                  self.gaps))
        return lost, dups

    def assert_in_order(self, hw):
        with self.lock:
            assert self.wrong_topic == 0, self.examples
            assert self.gaps == 0, "first deliveries out of offset order: %s" % self.examples
            assert set(self.frontier) <= set(hw), \
                "records of partitions %s, not in the topic" % (set(self.frontier) - set(hw))
            for p, high in hw.items():
                assert self.frontier.get(p, 0) == high, \
                    "partition %d: offsets 0..%d delivered, the partition ends at %d" % (
                        p, self.frontier.get(p, 0) - 1, high)


def kafka_cfg(broker, topic, group, url, mapping, batch_size=100, window="100ms",
              max_concurrency=10, timeout="10s", properties=None):
    conn = {"type": "kafka", "bootstrap_servers": broker.bootstrap}
    if properties:
        conn["properties"] = dict(properties)
    return {
        "connections": {"broker": conn},
        "functions": {"fn": {"url": url, "timeout": timeout, "max_concurrency": max_concurrency}},
        "mappings": [{
            "name": mapping,
            "function": "fn",
            "source": {"kafka": "broker", "topics": [topic], "consumer_group": group,
                       "starting_position": "trim_horizon"},
            "batch_size": batch_size,
            "maximum_batching_window": window,
        }],
    }


def wait_committed(broker, group, topic, expected, timeout=60):
    last = {}

    def done():
        last["v"] = broker.committed(group, topic)
        return last["v"] == expected

    try:
        wait_for(done, timeout, 0.5, "committed offsets %s" % expected)
    except TimeoutError:
        raise AssertionError("group %s committed %s after %ds, the partitions end at %s" % (
            group, last.get("v"), timeout, expected))


def ready(proc, timeout=60):
    wait_for(lambda: proc.get("/readyz")[0] == 200, timeout, 0.2, "esmd /readyz 200")


def describe_group(broker, group, topic):
    """{partition: (CURRENT-OFFSET, LOG-END-OFFSET)} of `topic` from Kafka's own
    kafka-consumer-groups --describe (a '-' current offset, nothing committed, is -1)."""
    out = broker.consumer_groups("--describe", "--group", group)
    rows, cols = {}, None
    for line in out.splitlines():
        fields = line.split()
        if not fields:
            continue
        if fields[0] == "GROUP":
            cols = fields
            continue
        if cols is None or len(fields) < 5 or fields[1] != topic:
            continue
        rec = dict(zip(cols, fields))
        cur = rec["CURRENT-OFFSET"]
        rows[int(rec["PARTITION"])] = (-1 if cur == "-" else int(cur), int(rec["LOG-END-OFFSET"]))
    if cols is None:
        raise AssertionError("kafka-consumer-groups printed no table:\n%s" % out)
    return rows


class Producer(threading.Thread):
    """Produces `chunk` records at a time to `topic` until stop(); counts what was produced."""

    def __init__(self, broker, topic, partitions, chunk=1000, pause=0.05, size=100):
        super().__init__(daemon=True)
        self.broker, self.topic, self.partitions = broker, topic, partitions
        self.chunk, self.pause, self.size = chunk, pause, size
        self.produced = 0
        self.error = None
        self._halt = threading.Event()

    def run(self):
        try:
            while not self._halt.is_set():
                self.produced += self.broker.produce(self.topic, count=self.chunk,
                                                     size=self.size,
                                                     partitions=self.partitions, keyed=True)
                self._halt.wait(self.pause)
        except Exception as e:  # reported by stop()
            self.error = e

    def stop(self):
        self._halt.set()
        self.join(180)
        assert not self.is_alive(), "the producer did not stop"
        if self.error:
            raise self.error
        return self.produced


@pytest.fixture(scope="module")
def broker(request):
    """The session's broker (conftest's kafka_broker) when there is one, else one for this
    module."""
    try:
        shared = request.getfixturevalue("kafka_broker")
    except pytest.FixtureLookupError:
        shared = None
    if shared is not None:
        yield shared
        return
    b = servers.KafkaBroker()
    try:
        yield b
    finally:
        b.close()


@pytest.fixture
def own_broker(request):
    """own_broker(sasl=None): a broker of the test's own, closed at the end of the test (request
    it before `esmd`, so that esmd is stopped first)."""
    made = []

    def make(sasl=None):
        b = servers.KafkaBroker(sasl=sasl)
        made.append(b)
        return b

    yield make
    failed = getattr(request.node, "rep_call", None) is None or request.node.rep_call.failed
    for b in made:
        if failed:
            print("\n==== broker server.log (%s), last lines ====\n%s" % (
                b.dir, servers.tail(b.logfile, 40)))
        b.close()


# ---- 1. the broker crashes and comes back ---------------------------------------------------


@pytest.mark.slow
def test_broker_sigkill_and_restart_under_load(own_broker, postgres, endpoint, esmd, names):
    b = own_broker()
    topic = b.create_topic(names.topic(), 4)
    group = names.group()
    tally = Tally(endpoint, topic)
    endpoint.delay(0.02)  # slow enough that esmd is in the middle of the topic at the crash
    proc = esmd(kafka_cfg(b, topic, group, endpoint.url, names.mapping(), batch_size=100,
                          max_concurrency=4))
    # The producer keeps going through the crash: its records in flight wait in librdkafka
    # (idempotent, 120 s message timeout) and are delivered once the broker is back.
    producer = Producer(b, topic, 4, chunk=1000, pause=0.05)
    producer.start()
    wait_for(lambda: tally.delivered() >= 3000, 90, 0.1, "3000 records delivered before the crash")

    b.kill()
    assert not b.running()
    produced_at_kill, delivered_at_kill = producer.produced, tally.delivered()
    # Every broker is gone: the mapping is reported not ready meanwhile, esmd keeps running.
    wait_for(lambda: proc.get("/readyz")[0] == 503, 30, 0.2, "/readyz 503 with the broker down")
    assert proc.running()

    b.start()
    wait_for(lambda: producer.produced > produced_at_kill + 3000, 60, 0.2,
             "the producer to go on after the restart")
    produced = producer.stop()
    hw = b.watermarks(topic)
    assert sum(hw.values()) >= produced, \
        "the broker lost acknowledged records in the crash: %s, %d produced" % (hw, produced)
    assert delivered_at_kill < sum(hw.values())

    tally.wait_complete(hw, 120, "every offset below the watermarks after the restart")
    lost, dups = tally.report("broker kill -9", hw)
    assert lost == 0
    tally.assert_in_order(hw)
    wait_committed(b, group, topic, hw, timeout=60)
    assert proc.running()
    ready(proc, 30)
    assert proc.stop() == 0


# ---- 2. instances join and leave the group --------------------------------------------------


@pytest.mark.slow
def test_three_instances_one_leaving_commit_everything(broker, postgres, endpoint, esmd, names):
    parts = 6
    topic = broker.create_topic(names.topic(), parts)
    group = names.group()
    tally = Tally(endpoint, topic)
    endpoint.delay(0.01)
    cfg = kafka_cfg(broker, topic, group, endpoint.url, names.mapping(), batch_size=100)
    producer = Producer(broker, topic, parts, chunk=600, pause=0.05)
    producer.start()

    def invoked(proc):
        return proc.metrics().get("esmd_invocations_total", function="fn")

    a = esmd(cfg, env={"ESMD_INSTANCE_ID": "a"})
    b = esmd(cfg, env={"ESMD_INSTANCE_ID": "b"})
    wait_for(lambda: invoked(a) > 0 and invoked(b) > 0, 60, 0.2,
             "both instances to own partitions and invoke")
    c = esmd(cfg, env={"ESMD_INSTANCE_ID": "c"})
    wait_for(lambda: invoked(c) > 0, 60, 0.2, "the third instance to get partitions and invoke")
    b_before = invoked(b)
    assert b.stop(signal.SIGTERM, timeout=30) == 0  # leaves the group under load
    time.sleep(2)  # a and c take b's partitions over while records keep coming
    produced = producer.stop()

    hw = broker.watermarks(topic)
    assert sum(hw.values()) == produced
    tally.wait_complete(hw, 120)
    lost, dups = tally.report("3 instances, one leaving", hw)
    assert lost == 0
    tally.assert_in_order(hw)
    assert b_before > 0 and invoked(a) > 0 and invoked(c) > 0

    # Kafka's own view of the group: every partition committed to its end.
    last = {}

    def committed_to_end():
        last["v"] = describe_group(broker, group, topic)
        return last["v"] == {p: (hw[p], hw[p]) for p in hw}

    try:
        wait_for(committed_to_end, 60, 1.0, "kafka-consumer-groups to show the end offsets")
    except TimeoutError:
        raise AssertionError("kafka-consumer-groups --describe: (CURRENT, LOG-END) %s, "
                             "end offsets %s" % (last.get("v"), hw))
    assert a.stop() == 0 and c.stop() == 0


# ---- 3. a million records -------------------------------------------------------------------


@pytest.mark.slow
def test_one_million_records_exactly_once_in_order(broker, postgres, endpoint, esmd, names):
    parts, total = 4, 1_000_000
    topic = broker.create_topic(names.topic(), parts)
    group = names.group()
    t0 = time.monotonic()
    broker.produce(topic, count=total, size=30, partitions=parts, timeout=240)
    hw = broker.watermarks(topic)
    assert hw == {p: total // parts for p in range(parts)}  # 250,000 a partition
    t_produced = time.monotonic() - t0

    tally = Tally(endpoint, topic)
    t1 = time.monotonic()
    proc = esmd(kafka_cfg(broker, topic, group, endpoint.url, names.mapping(), batch_size=10000,
                          window="500ms", timeout="30s"))
    tally.wait_complete(hw, 180)
    t_consumed = time.monotonic() - t1
    time.sleep(1.0)  # a redelivery would show up now
    lost, dups = tally.report("1,000,000 records", hw)
    print("produced in %.1fs, delivered in %.1fs (%.0f records/s)" % (
        t_produced, t_consumed, total / t_consumed))
    assert lost == 0 and dups == 0
    assert tally.records == total
    tally.assert_in_order(hw)
    wait_committed(broker, group, topic, hw, timeout=60)
    assert proc.metrics().get("esmd_committed_events_total") == total
    assert proc.stop() == 0


# ---- 4. partitions added at run time --------------------------------------------------------


def test_partitions_added_while_running_are_consumed(broker, postgres, endpoint, esmd, names):
    topic = broker.create_topic(names.topic(), 2)
    group = names.group()
    tally = Tally(endpoint, topic)
    broker.produce(topic, count=200, size=50, partitions=2, keyed=True)
    proc = esmd(kafka_cfg(broker, topic, group, endpoint.url, names.mapping()))
    tally.wait_complete({0: 100, 1: 100}, 60, "the first two partitions")

    broker.add_partitions(topic, 4)
    t0 = time.monotonic()
    broker.produce(topic, [{"partition": p, "key": "new%d-%d" % (p, i), "value": "v%d" % i}
                           for p in (2, 3) for i in range(50)] +
                   [{"partition": p, "key": "old%d-%d" % (p, i), "value": "v%d" % i}
                    for p in (0, 1) for i in range(10)])
    hw = broker.watermarks(topic)
    assert hw == {0: 110, 1: 110, 2: 50, 3: 50}
    # esmd refreshes the topic metadata every 10 s (librdkafka's default is 5 minutes); the
    # group then rebalances onto the new partitions.
    tally.wait_complete(hw, 45, "the records of the added partitions")
    print("\nadded partitions consumed %.1fs after they were created" % (time.monotonic() - t0))
    lost, dups = tally.report("partitions added", hw)
    assert lost == 0
    tally.assert_in_order(hw)
    wait_committed(broker, group, topic, hw, timeout=30)
    assert proc.stop() == 0


# ---- 5. SASL/PLAIN ---------------------------------------------------------------------------


@pytest.mark.slow
def test_sasl_plain_delivers_and_wrong_password_is_reported(own_broker, postgres, endpoint, esmd,
                                                            names):
    b = own_broker(sasl="esmd:s3cret-pw")
    assert b.client_properties["security.protocol"] == "SASL_PLAINTEXT"
    topic = b.create_topic(names.topic(), 2)
    b.produce(topic, count=300, size=50, partitions=2, keyed=True)
    hw = b.watermarks(topic)
    sasl = {"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "PLAIN",
            "sasl.username": "esmd", "sasl.password": "s3cret-pw"}

    # The right password: everything delivered and committed.
    group = names.group()
    tally = Tally(endpoint, topic)
    good = esmd(kafka_cfg(b, topic, group, endpoint.url, names.mapping(), properties=sasl))
    tally.wait_complete(hw, 60)
    tally.assert_in_order(hw)
    wait_committed(b, group, topic, hw, timeout=30)
    ready(good, 30)
    assert good.stop() == 0

    # A wrong password: not ready, a log line that says why, and esmd keeps running.
    other = Endpoint()
    try:
        bad_group = names.group()
        bad = esmd(kafka_cfg(b, topic, bad_group, other.url, names.mapping(),
                             properties=dict(sasl, **{"sasl.password": "wrong"})))

        def auth_lines():  # esmd's own line for librdkafka's error, not only librdkafka's log
            return [ln for ln in bad.log_lines()
                    if ln.get("level") == "error" and
                    ln.get("msg", "").startswith("kafka _AUTHENTICATION: ")]

        lines = wait_for(auth_lines, 30, 0.2, "an error line about the authentication failure")
        print("\nesmd logged: %s" % lines[0]["msg"])
        assert re.search(r"SASL authentication error", lines[0]["msg"]), lines[0]
        status, body = bad.get("/readyz")
        assert status == 503, body
        assert re.search(r"authenticat", body, re.I), "the /readyz detail does not say why: %s" % body
        # No crash, no hang: still running and answering a few seconds later, still not ready.
        time.sleep(4)
        assert bad.running()
        assert bad.get("/healthz")[0] == 200
        assert bad.get("/readyz")[0] == 503
        assert other.snapshot() == [], "records delivered with a wrong password"
        assert b.committed(bad_group, topic) == {0: -1, 1: -1}
        assert bad.stop(timeout=40) == 0
    finally:
        other.close()
