"""parallelization_factor (docs/design.md#lanes) on the real Kafka broker and on Redis: records
of one key in order while other keys flow, commits never past the lowest unfinished record.

    Kafka, factor 4, random failures       every record delivered; the first delivery of the
                                           records of each key in offset order; more batches
                                           in flight than partitions
    Kafka, a poison key                    the other lanes' records (before and after it) are
                                           delivered while it fails; the group's committed
                                           offset stays at the poison record's; once it
                                           succeeds everything is committed
    Kafka, kill -9 and restart             every record delivered at least once, first
                                           deliveries per key in order
    Kafka, two instances (rebalance)       a second instance joins with lanes in flight:
                                           every record delivered, per-key order kept
    Redis, factor 4, failures, poison key  per partition key order; a poison key holds only
                                           its own lane
    Kafka, factor 1 -> 8 -> 3 at run time  (admin API, then a reload) with batches in flight and
                                           records arriving: every record once, per-key order,
                                           commits to the end, each factor in force (requests
                                           per partition at once)

The endpoint decides each request's answer from its records (a random failure, or a failure
while it holds the poison key) and keeps, per key, the offsets in the order of their first
delivery."""

import base64
import json
import random
import threading
import time
import urllib.request
import uuid

import pytest
import yaml

from endpoint import Response
from kafka_tally import kafka_cfg
from servers import wait_for

import servers

pytestmark = pytest.mark.kafka

FACTOR = 4


def lane(key, n=FACTOR):
    """The lane esmd gives a key: FNV-1a (32 bits) of its bytes modulo n (src/batch.c)."""
    h = 2166136261
    for c in key.encode():
        h = ((h ^ c) * 16777619) & 0xFFFFFFFF
    return h % n


class KeyOrder:
    """Endpoint behaviour: per key, the positions of its records in the order of their first
    delivery; the answer is a failure when fail(records) says so (True: a 500; a Response: that
    answer)."""

    def __init__(self, endpoint, key_of, pos_of, fail=None):
        self.key_of, self.pos_of, self.fail = key_of, pos_of, fail
        self.lock = threading.Lock()
        self.first = {}  # key -> [positions in first-delivery order]
        self.seen = set()
        self.requests = 0
        endpoint.behaviour = self._on_request

    def _on_request(self, req):
        ev = req.json if isinstance(req.json, dict) else {}
        recs = ev.get("Records")
        if recs is None:
            recs = [r for lst in (ev.get("records") or {}).values() for r in lst]
        with self.lock:
            self.requests += 1
            for r in recs:
                pos = self.pos_of(r)
                if pos not in self.seen:
                    self.seen.add(pos)
                    self.first.setdefault(self.key_of(r), []).append(pos)
        answer = self.fail(recs) if self.fail else None
        if isinstance(answer, Response):
            return answer
        if answer:
            return Response(500, {"errorMessage": "failing on purpose"})
        return None

    def delivered(self):
        with self.lock:
            return len(self.seen)

    def delivered_keys(self, keys):
        with self.lock:
            return sum(len(self.first.get(k, ())) for k in keys)

    def assert_in_order(self):
        with self.lock:
            for k, pos in self.first.items():
                assert pos == sorted(pos), "key %s: first deliveries out of order: %s" % (
                    k, pos[:50])


def kafka_key(r):
    return base64.b64decode(r["key"]).decode() if r.get("key") else None


def kafka_pos(r):
    return (r["partition"], r["offset"])


def keyed_records(nkeys, per_key, parts, prefix="k"):
    """per_key records of each of nkeys keys, interleaved; key i always in partition i % parts.
    Values name key and index."""
    out = []
    for j in range(per_key):
        for i in range(nkeys):
            out.append({"partition": i % parts, "key": "%s%d" % (prefix, i),
                        "value": '{"k":%d,"j":%d}' % (i, j)})
    return out


def parallel_cfg(broker, topic, group, url, mapping, **kw):
    cfg = kafka_cfg(broker, topic, group, url, mapping, **kw)
    cfg["mappings"][0]["source"]["parallelization_factor"] = FACTOR
    cfg["mappings"][0]["maximum_retry_attempts"] = -1
    return cfg


@pytest.fixture
def retry_fast():
    return {"ESMD_MAPPING_RETRY_BACKOFF": "20,200"}


def test_kafka_key_order_under_random_failures(kafka_broker, postgres, endpoint, esmd, names,
                                               retry_fast):
    parts, nkeys, per_key = 2, 24, 40
    topic = kafka_broker.create_topic(names.topic(), parts)
    kafka_broker.produce(topic, records=keyed_records(nkeys, per_key, parts))
    rnd = random.Random(14)
    ko = KeyOrder(endpoint, kafka_key, kafka_pos, fail=lambda recs: rnd.random() < 0.25)
    endpoint.delay(0.05)
    group = names.group()
    proc = esmd(parallel_cfg(kafka_broker, topic, group, endpoint.url, names.mapping(),
                             batch_size=10, window="50ms"), env=retry_fast)
    total = nkeys * per_key
    wait_for(lambda: ko.delivered() >= total, 120, 0.2, "every record delivered")
    ko.assert_in_order()
    assert len(ko.first) == nkeys
    # 2 partitions, 4 lanes each: more batches at once than partitions
    assert endpoint.max_concurrent > parts, endpoint.max_concurrent
    hw = kafka_broker.watermarks(topic)
    wait_for(lambda: kafka_broker.committed(group, topic) == hw, 60, 0.5,
             "the group committed to the end %s" % hw)
    assert proc.stop() == 0


def test_kafka_poison_key_holds_commit_not_other_keys(kafka_broker, postgres, endpoint, esmd,
                                                      names, retry_fast):
    topic = kafka_broker.create_topic(names.topic(), 1)
    keys = ["k%d" % i for i in range(16)]
    poison = keys[0]
    others = [k for k in keys if lane(k) != lane(poison)]
    assert others
    # offsets 0..15: one record of each key; then the poison record; then 10 more of each
    recs = [{"partition": 0, "key": k, "value": "a"} for k in keys[1:]]
    poison_offset = len(recs)
    recs.append({"partition": 0, "key": poison, "value": "poison"})
    recs += [{"partition": 0, "key": k, "value": "b"} for _ in range(10) for k in keys[1:]]
    kafka_broker.produce(topic, records=recs)
    healed = threading.Event()

    def fail(rs):
        # a partial batch response naming the poison record: the records before it in its
        # batch succeed, it and those after it are retried
        if healed.is_set() or not any(kafka_key(r) == poison for r in rs):
            return None
        return Response(200, {"batchItemFailures": [
            {"itemIdentifier": {"partition": "%s-0" % topic, "offset": poison_offset}}]})

    ko = KeyOrder(endpoint, kafka_key, kafka_pos, fail=fail)
    group = names.group()
    cfg = parallel_cfg(kafka_broker, topic, group, endpoint.url, names.mapping(), batch_size=5,
                       window="20ms")
    cfg["mappings"][0]["report_batch_item_failures"] = True
    proc = esmd(cfg, env=retry_fast)
    want = 11 * len(others)  # every record of keys in other lanes, before and after the poison
    wait_for(lambda: ko.delivered_keys(others) >= want, 60, 0.2,
             "the other lanes' records delivered while the poison key fails")
    # every record before the poison one is done: the commit reaches it, and stays there
    wait_for(lambda: kafka_broker.committed(group, topic).get(0) == poison_offset, 30, 0.5,
             "the committed offset to reach the poison record's, %d" % poison_offset)
    for _ in range(3):  # later offsets of other keys are finished, the commit does not pass it
        committed = kafka_broker.committed(group, topic).get(0)
        assert committed == poison_offset, (committed, poison_offset)
        time.sleep(1)
    healed.set()
    hw = kafka_broker.watermarks(topic)
    wait_for(lambda: kafka_broker.committed(group, topic) == hw, 60, 0.5,
             "the commit to reach the end once the poison record succeeds")
    ko.assert_in_order()
    assert ko.delivered() == len(recs)
    assert proc.stop() == 0


def test_kafka_kill9_restart_key_order(kafka_broker, postgres, endpoint, esmd, names,
                                       retry_fast):
    parts, nkeys, per_key = 2, 16, 60
    topic = kafka_broker.create_topic(names.topic(), parts)
    kafka_broker.produce(topic, records=keyed_records(nkeys, per_key, parts))
    ko = KeyOrder(endpoint, kafka_key, kafka_pos)
    endpoint.delay(0.05)
    group = names.group()
    # a short session: the group gives the killed member's partitions away in seconds
    cfg = parallel_cfg(kafka_broker, topic, group, endpoint.url, names.mapping(), batch_size=5,
                       window="20ms", properties={"session.timeout.ms": "6000",
                                                  "heartbeat.interval.ms": "500"})
    a = esmd(cfg, env=retry_fast)
    total = nkeys * per_key
    wait_for(lambda: ko.delivered() >= total // 4, 60, 0.05, "a quarter delivered")
    a.kill9()
    b = esmd(cfg, env=retry_fast)
    wait_for(lambda: ko.delivered() >= total, 120, 0.2, "every record after the restart")
    ko.assert_in_order()
    hw = kafka_broker.watermarks(topic)
    wait_for(lambda: kafka_broker.committed(group, topic) == hw, 60, 0.5,
             "the group committed to the end %s" % hw)
    assert b.stop() == 0


def test_kafka_rebalance_with_lanes_in_flight(kafka_broker, postgres, endpoint, esmd, names):
    parts, nkeys, per_key = 4, 32, 40
    topic = kafka_broker.create_topic(names.topic(), parts)
    kafka_broker.produce(topic, records=keyed_records(nkeys, per_key, parts))
    ko = KeyOrder(endpoint, kafka_key, kafka_pos)
    endpoint.delay(0.05)
    group = names.group()
    cfg = parallel_cfg(kafka_broker, topic, group, endpoint.url, names.mapping(), batch_size=5,
                       window="20ms")
    a = esmd(cfg, env={"ESMD_INSTANCE_ID": "a"})
    total = nkeys * per_key
    wait_for(lambda: ko.delivered() >= total // 5, 60, 0.05, "a fifth delivered")
    b = esmd(cfg, env={"ESMD_INSTANCE_ID": "b"})  # takes partitions over, lanes in flight
    wait_for(lambda: ko.delivered() >= total, 120, 0.2, "every record with two instances")
    ko.assert_in_order()
    hw = kafka_broker.watermarks(topic)
    wait_for(lambda: kafka_broker.committed(group, topic) == hw, 60, 0.5,
             "the group committed to the end %s" % hw)
    assert a.stop() == 0 and b.stop() == 0


def test_redis_key_order_and_poison_key(redis, postgres, endpoint, esmd, names, retry_fast):
    stream = names.topic()
    keys = ["k%d" % i for i in range(16)]
    poison = keys[0]
    others = [k for k in keys if lane(k) != lane(poison)]
    ids = []
    for j in range(20):
        for k in keys:
            ids.append(redis.command("XADD", stream, "*", "pk", k, "j", str(j)))
    order = {i: n for n, i in enumerate(ids)}
    healed = threading.Event()
    rnd = random.Random(8)

    def key_of(r):
        return r["kinesis"]["partitionKey"]

    def fail(rs):
        if not healed.is_set() and any(key_of(r) == poison for r in rs):
            return True
        return rnd.random() < 0.2

    ko = KeyOrder(endpoint, key_of, lambda r: order[r["kinesis"]["sequenceNumber"]], fail=fail)
    cfg = {
        "connections": {"r": {"type": "redis", "url": redis.url}},
        "functions": {"fn": {"url": endpoint.url, "timeout": "10s", "max_concurrency": 10}},
        "mappings": [{
            "name": names.mapping(), "function": "fn",
            "source": {"redis": "r", "stream": stream, "group": names.group(),
                       "partition_key_field": "pk", "parallelization_factor": FACTOR},
            "batch_size": 5, "maximum_batching_window": "20ms", "maximum_retry_attempts": -1,
        }],
    }
    proc = esmd(cfg, env=retry_fast)
    wait_for(lambda: ko.delivered_keys(others) >= 20 * len(others), 60, 0.2,
             "the other lanes' entries delivered while the poison key fails")
    # its first entry, failing, holds its lane: later entries of the key wait
    assert ko.delivered_keys([poison]) < 20
    healed.set()
    wait_for(lambda: ko.delivered() >= len(ids), 60, 0.2, "every entry once the poison heals")
    ko.assert_in_order()
    group = cfg["mappings"][0]["source"]["group"]
    wait_for(lambda: redis.command("XPENDING", stream, group)[0] == 0, 30, 0.2,
             "every entry acked")
    assert proc.stop() == 0


# ---- the factor changed at run time with records in flight ----------------------------------


class PartitionConcurrency(KeyOrder):
    """KeyOrder, and a slow function that keeps, per partition, how many requests holding its
    records are in flight at once (the most since reset_max()), and counts records delivered
    again after a success (the function never fails here, so any second delivery is one)."""

    def __init__(self, endpoint, seconds):
        super().__init__(endpoint, kafka_key, kafka_pos)
        self.seconds = seconds
        self.now = {}
        self.most = {}
        self.again = 0

    def _on_request(self, req):
        recs = [r for lst in ((req.json or {}).get("records") or {}).values() for r in lst]
        parts = {r["partition"] for r in recs}
        with self.lock:
            self.again += sum(1 for r in recs if kafka_pos(r) in self.seen)
            for p in parts:
                self.now[p] = self.now.get(p, 0) + 1
                self.most[p] = max(self.most.get(p, 0), self.now[p])
        try:
            super()._on_request(req)
            time.sleep(self.seconds)
        finally:
            with self.lock:
                for p in parts:
                    self.now[p] -= 1
        return None

    def in_flight(self):
        with self.lock:
            return sum(self.now.values())

    def reset_max(self):
        with self.lock:
            self.most = dict(self.now)

    def max_per_partition(self):
        with self.lock:
            return dict(self.most)


def admin_put(proc, path, body):
    req = urllib.request.Request(proc.admin + path, data=json.dumps(body).encode(), method="PUT",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status, json.loads(r.read().decode())


def admin_post(proc, path):
    req = urllib.request.Request(proc.admin + path, data=b"{}", method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return r.status, json.loads(r.read().decode())


def mapping_uuid(name):
    """The UUID the admin API gives a mapping of the file (src/api_esm.c)."""
    return str(uuid.uuid5(uuid.UUID("5c3c8f5e-6d1a-4f0b-9a57-3e2d7b1c8e40"), name))


def test_kafka_factor_changed_with_records_in_flight(kafka_broker, postgres, esmd, endpoint,
                                                     names):
    """parallelization_factor 1 -> 8 (UpdateEventSourceMapping) -> 3 (a reload of the file)
    while batches are in flight and records keep arriving: each partition drains, then is
    re-laned (docs/design.md#lanes). Every record is delivered once, the first deliveries of
    each key in offset order, the group commits to the end, and each factor is in force: one
    request per partition at a time with 1, more with 8, at most 3 with 3."""
    parts, nkeys = 2, 32
    topic = kafka_broker.create_topic(names.topic(), parts)
    pc = PartitionConcurrency(endpoint, 0.1)
    group, mapping = names.group(), names.mapping()
    cfg = kafka_cfg(kafka_broker, topic, group, endpoint.url, mapping, batch_size=5,
                    window="20ms")
    cfg["mappings"][0]["source"]["parallelization_factor"] = 1
    proc = esmd(cfg)

    produced = [0]
    stop = threading.Event()

    def producer():
        j = 0
        while not stop.is_set():
            recs = keyed_records(nkeys, 2, parts)
            for r in recs:
                r["value"] = r["value"].replace('"j":', '"round":%d,"j":' % j)
            kafka_broker.produce(topic, records=recs)
            produced[0] += len(recs)
            j += 1
            stop.wait(0.2)

    th = threading.Thread(target=producer, daemon=True)
    th.start()
    try:
        def relaned(n):
            log = proc.log()
            return all("shard %s-%d now has %d lanes" % (topic, p, n) in log
                       for p in range(parts))

        def more_delivered(n):
            start = pc.delivered()
            wait_for(lambda: pc.delivered() >= start + n, 90, 0.1,
                     "%d more records delivered" % n)

        more_delivered(100)
        assert all(m == 1 for m in pc.max_per_partition().values()), pc.max_per_partition()

        # 1 -> 8 through the admin API, batches in flight
        wait_for(lambda: pc.in_flight() > 0, 30, 0.005, "a batch in flight")
        st, body = admin_put(proc, "/2015-03-31/event-source-mappings/" + mapping_uuid(mapping),
                             {"ParallelizationFactor": 8})
        assert st in (200, 202) and body["ParallelizationFactor"] == 8, body
        wait_for(lambda: relaned(8), 60, 0.1, "both partitions re-laned to 8")
        pc.reset_max()  # what was in flight before the re-lane is done: only new lanes now
        more_delivered(200)
        most = pc.max_per_partition()
        assert all(most.get(p, 0) > 1 for p in range(parts)), most

        # 8 -> 3 through a reload of the file, batches in flight: applied in place
        with open(proc.config_path) as f:
            text = yaml.safe_load(f)
        text["mappings"][0]["source"]["parallelization_factor"] = 3
        wait_for(lambda: pc.in_flight() > 0, 30, 0.005, "a batch in flight")
        with open(proc.config_path, "w") as f:
            f.write(yaml.safe_dump(text, sort_keys=False))
        st, ans = admin_post(proc, "/admin/reload")
        assert st == 200 and ans["reloaded"] is True, ans
        assert ans["mappings"]["restarted"] == [], ans
        wait_for(lambda: relaned(3), 60, 0.1, "both partitions re-laned to 3")
        pc.reset_max()
        more_delivered(200)
        most = pc.max_per_partition()
        assert all(1 < most.get(p, 0) <= 3 for p in range(parts)), most
    finally:
        stop.set()
        th.join(120)

    wait_for(lambda: pc.delivered() >= produced[0], 120, 0.2,
             "every one of %d records delivered" % produced[0])
    assert pc.delivered() == produced[0]
    assert pc.again == 0, "%d records delivered again after their success" % pc.again
    pc.assert_in_order()
    hw = kafka_broker.watermarks(topic)
    assert sum(hw.values()) == produced[0], hw
    wait_for(lambda: kafka_broker.committed(group, topic) == hw, 60, 0.5,
             "the group committed to the end %s" % hw)
    st, body = servers.http_get(proc.admin + "/admin/mappings/" + mapping)
    assert st == 200 and json.loads(body)["parallelization_factor"] == 3, body
    assert proc.stop() == 0
