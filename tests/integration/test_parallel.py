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

The endpoint decides each request's answer from its records (a random failure, or a failure
while it holds the poison key) and keeps, per key, the offsets in the order of their first
delivery."""

import base64
import random
import threading
import time

import pytest

from endpoint import Response
from kafka_tally import kafka_cfg
from servers import wait_for

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
