"""End to end: Kafka -> esmd -> a recording HTTP function endpoint.

Every test runs twice, against librdkafka's mock cluster ([mock]) and a real Apache Kafka broker
([broker]) (conftest.py, docs/testing.md "Kafka: mock and real broker"). Each test uses its own
topic and consumer group on the session's cluster and its own endpoint. The assertions are about what the endpoint received (the Lambda self-managed Kafka
event, docs/lambda.md#kafka-event) and what the consumer group committed."""

import base64
import json
import signal
import threading
import time

import pytest

import servers
from endpoint import Response
from servers import wait_for

MAX_PAYLOAD = 6291456
RECORD_FIELDS = {"topic", "partition", "offset", "timestamp", "timestampType", "key", "value",
                 "headers"}


def wait_committed(kafka, group, topic, expected, timeout=60):
    last = {}

    def done():
        last["v"] = kafka.committed(group, topic)
        return last["v"] == expected

    try:
        wait_for(done, timeout, 0.3, "committed offsets %s" % expected)
    except TimeoutError:
        raise AssertionError("committed offsets %s, expected %s" % (last.get("v"), expected))


def assert_exactly_once_in_order(endpoint, hw, requests=None):
    """Every offset below each partition's high watermark was delivered exactly once, in offset
    order, over the successful requests (all of them by default)."""
    reqs = requests if requests is not None else endpoint.ok_requests()
    got = {}
    for req in reqs:
        for _, rec in req.records():
            got.setdefault(rec["partition"], []).append(rec["offset"])
    for p, high in hw.items():
        assert got.get(p, []) == list(range(high)), \
            "partition %d: delivered offsets %s, expected 0..%d in order" % (
                p, _short(got.get(p, [])), high - 1)
    assert set(got) <= set(hw), "records from unknown partitions %s" % (set(got) - set(hw))


def assert_covers(endpoint, hw):
    """At least once: every offset below the watermark arrived in some successful request."""
    got = {}
    for _, _, rec in endpoint.records():
        got.setdefault(rec["partition"], set()).add(rec["offset"])
    for p, high in hw.items():
        missing = set(range(high)) - got.get(p, set())
        assert not missing, "partition %d: %d offsets never delivered, e.g. %s" % (
            p, len(missing), sorted(missing)[:10])


def _short(lst):
    return lst if len(lst) <= 20 else "%s ... %s (%d items)" % (lst[:10], lst[-5:], len(lst))


def b64d(s):
    return base64.b64decode(s)


def ready(esmd, timeout=30):
    wait_for(lambda: esmd.get("/readyz")[0] == 200, timeout, 0.1, "esmd /readyz 200")


# ---------------------------------------------------------------------------------------------


@pytest.mark.kafka
def test_all_records_arrive_in_order_with_lambda_shape(kafka, endpoint, esmd, kafka_config,
                                                       names):
    topic = kafka.create_topic(names.topic(), 4)
    group = names.group()
    special = [
        {"partition": p, "key": "hk%d" % p, "value_b64": base64.b64encode(
            b"\x00\xff\x80 bytes %d" % p).decode(),
         "headers": [["h", "ë"], ["h", "x"], ["empty", ""]], "timestamp": 1545084650987}
        for p in range(4)]
    kafka.produce(topic, special)
    kafka.produce(topic, [{"partition": 2, "value": "no key"}])
    kafka.produce(topic, count=2000, size=100, partitions=4, keyed=True)
    total = 2005

    esmd(kafka_config(topic, batch_size=100, window="100ms", group=group))
    endpoint.wait_records(total, timeout=120)
    time.sleep(0.5)  # anything extra (a duplicate) would show up now

    hw = kafka.watermarks(topic)
    assert sum(hw.values()) == total
    assert_exactly_once_in_order(endpoint, hw)
    assert all(r.ok for r in endpoint.snapshot()), "the endpoint never failed, yet: %s" % [
        r for r in endpoint.snapshot() if not r.ok]

    last_offset = {}
    generated_seen = 0
    for req in endpoint.ok_requests():
        assert req.method == "POST"
        assert req.headers.get("content-type", "").startswith("application/json")
        assert req.request_id and req.idempotency_key
        ev = req.json
        assert set(ev) == {"eventSource", "bootstrapServers", "records"}, ev.keys()
        assert ev["eventSource"] == "SelfManagedKafka"
        assert ev["bootstrapServers"] == kafka.bootstrap
        assert isinstance(ev["records"], dict) and ev["records"]
        assert sum(len(v) for v in ev["records"].values()) <= 100
        for key, recs in ev["records"].items():
            assert recs, "empty group %s" % key
            for rec in recs:
                assert key == "%s-%d" % (rec["topic"], rec["partition"])
                assert rec["topic"] == topic
                # offset order inside the group and across requests
                assert rec["offset"] > last_offset.get(key, -1)
                last_offset[key] = rec["offset"]
                assert isinstance(rec["timestamp"], int) and rec["timestamp"] > 0
                assert rec["timestampType"] == "CREATE_TIME"
                assert isinstance(rec["headers"], list)
                value = b64d(rec["value"])
                if "key" not in rec:  # the one record produced without a key: left out
                    assert value == b"no key" and rec["partition"] == 2
                    assert set(rec) == RECORD_FIELDS - {"key"}, sorted(rec)
                    continue
                assert set(rec) == RECORD_FIELDS, sorted(rec)
                k = b64d(rec["key"]).decode()
                if k.startswith("hk"):
                    p = rec["partition"]
                    assert k == "hk%d" % p
                    assert value == b"\x00\xff\x80 bytes %d" % p
                    assert rec["timestamp"] == 1545084650987
                    assert rec["headers"] == [{"h": [-61, -85]}, {"h": [120]}, {"empty": []}]
                    continue
                doc = json.loads(value)
                assert k == "k%d" % doc["i"]
                assert rec["partition"] == doc["i"] % 4
                assert rec["headers"] == []
                generated_seen += 1
    assert generated_seen == 2000

    wait_committed(kafka, group, topic, hw)


@pytest.mark.kafka
def test_batching_window_collects_records_into_one_request(kafka, endpoint, esmd, kafka_config,
                                                           names):
    topic = kafka.create_topic(names.topic(), 1)
    proc = esmd(kafka_config(topic, batch_size=1000, window="1s"))
    ready(proc)
    time.sleep(1.0)  # let the consumer join and fetch the (empty) partition
    t0 = time.monotonic()
    kafka.produce(topic, [{"partition": 0, "key": "k%d" % i, "value": "v%d" % i}
                          for i in range(10)])
    endpoint.wait_records(10, timeout=30)
    time.sleep(1.5)
    reqs = endpoint.snapshot()
    assert [len(r.records()) for r in reqs] == [10], reqs
    # The window opens at the first record: the request cannot come before it closes.
    assert reqs[0].t_arrival - t0 >= 0.9


@pytest.mark.kafka
def test_batch_size_splits_requests(kafka, endpoint, esmd, kafka_config, names):
    topic = kafka.create_topic(names.topic(), 1)
    kafka.produce(topic, [{"partition": 0, "key": "k%d" % i, "value": "v%d" % i}
                          for i in range(12)])
    esmd(kafka_config(topic, batch_size=5, window="1s"))
    endpoint.wait_records(12, timeout=30)
    time.sleep(1.5)
    reqs = endpoint.snapshot()
    assert [len(r.records()) for r in reqs] == [5, 5, 2], reqs
    assert_exactly_once_in_order(endpoint, {0: 12})


@pytest.mark.kafka
@pytest.mark.slow
def test_payload_cap_splits_large_records(kafka, endpoint, esmd, kafka_config, names):
    topic = kafka.create_topic(names.topic(), 4)
    # 8 records of 900 KB (about 1.2 MB each once base64-encoded): 2 per partition keeps each
    # partition under the mock's 5 MB, and the 8 together are well over one 6 MB event.
    kafka.produce(topic, count=8, size=900000, partitions=4, keyed=True)
    esmd(kafka_config(topic, batch_size=100, window="2s"))
    endpoint.wait_records(8, timeout=120)
    time.sleep(1.0)
    reqs = endpoint.snapshot()
    sizes = [len(r.body) for r in reqs]
    assert max(sizes) <= MAX_PAYLOAD, sizes
    assert len(reqs) >= 2, sizes
    assert_exactly_once_in_order(endpoint, kafka.watermarks(topic))


@pytest.mark.kafka
def test_record_over_payload_cap_is_skipped(kafka, endpoint, esmd, kafka_config, names):
    # A real broker refuses records over its 1 MB max.message.bytes unless the topic allows more.
    topic = kafka.create_topic(names.topic(), 1, config={"max.message.bytes": "10000000"})
    # ~6.5 MB once base64-encoded: can never fit a 6 MB event. 4.9 MB stays under the mock's
    # 5 MB per partition; kafkatool's producer keeps librdkafka's 1 MB message.max.bytes, so
    # librdkafka is driven directly.
    big = b"x" * 4_900_000
    servers.produce_with_librdkafka(
        kafka.bootstrap, topic,
        [(0, b"before", b"small-0"), (0, b"big", big), (0, b"after", b"small-2")],
        {"message.max.bytes": "10000000", "enable.idempotence": "true"})
    assert kafka.watermarks(topic) == {0: 3}
    group = names.group()
    proc = esmd(kafka_config(topic, batch_size=100, window="200ms", group=group))
    endpoint.wait_records(2, timeout=60)
    wait_committed(kafka, group, topic, {0: 3})
    keys = [b64d(rec["key"]) for _, _, rec in endpoint.records(ok_only=False)]
    assert keys == [b"before", b"after"]
    assert max(len(r.body) for r in endpoint.snapshot()) <= MAX_PAYLOAD
    assert proc.metrics().get("esmd_oversized_records_total") == 1


@pytest.mark.kafka
def test_restart_resumes_from_committed_offsets(kafka, endpoint, esmd, kafka_config, names):
    topic = kafka.create_topic(names.topic(), 2)
    group = names.group()
    kafka.produce(topic, count=100, size=50, partitions=2, keyed=True)
    proc = esmd(kafka_config(topic, batch_size=10, window="100ms", group=group))
    endpoint.wait_records(100, timeout=60)
    assert proc.stop(signal.SIGTERM, timeout=30) == 0
    first = endpoint.snapshot()
    assert_exactly_once_in_order(endpoint, {0: 50, 1: 50})
    assert kafka.committed(group, topic) == {0: 50, 1: 50}

    kafka.produce(topic, count=50, size=50, partitions=2, keyed=True)
    proc.start()
    endpoint.wait_records(150, timeout=60)
    time.sleep(2.0)  # a redelivery of the first 100 would arrive by now
    second = endpoint.snapshot()[len(first):]
    offsets = sorted((rec["partition"], rec["offset"]) for r in second for _, rec in r.records())
    assert offsets == [(p, o) for p in (0, 1) for o in range(50, 75)]
    wait_committed(kafka, group, topic, {0: 75, 1: 75})
    assert proc.stop() == 0


def _retried_batch_checks(endpoint, nfailed):
    reqs = endpoint.snapshot()
    failed, later = reqs[:nfailed], reqs[nfailed:]
    assert all(not r.ok for r in failed)
    first_rec = failed[0].records()[0][1]["offset"]
    # The failed batch goes again with the same records...
    for r in failed:
        assert [rec["offset"] for _, rec in r.records()] == \
            [rec["offset"] for _, rec in failed[0].records()]
    retry = next(r for r in later if r.ok)
    assert retry.records()[0][1]["offset"] == first_rec
    # ... under the same idempotency key, each attempt with its own request id.
    keys = {r.idempotency_key for r in failed + [retry]}
    assert len(keys) == 1 and None not in keys, keys
    ids = [r.request_id for r in failed + [retry]]
    assert None not in ids and len(set(ids)) == len(ids), ids


@pytest.mark.kafka
def test_failing_function_is_retried_until_success(kafka, endpoint, esmd, kafka_config, names):
    topic = kafka.create_topic(names.topic(), 1)
    group = names.group()
    kafka.produce(topic, count=20, size=50, partitions=1, keyed=True)
    seen_committed = []

    def behaviour(req):
        if req.index < 3:
            # No batch has succeeded yet, so nothing may be committed.
            seen_committed.append(kafka.committed(group, topic))
            return Response(500, {"message": "injected failure"})
        return None

    endpoint.behaviour = behaviour
    esmd(kafka_config(topic, batch_size=100, window="100ms", group=group))
    endpoint.wait_records(20, timeout=90)
    assert seen_committed == [{0: -1}] * 3
    _retried_batch_checks(endpoint, 3)
    assert_exactly_once_in_order(endpoint, {0: 20})
    wait_committed(kafka, group, topic, {0: 20})


@pytest.mark.kafka
def test_function_timeout_is_retried(kafka, endpoint, esmd, kafka_config, names):
    topic = kafka.create_topic(names.topic(), 1)
    group = names.group()
    kafka.produce(topic, count=20, size=50, partitions=1, keyed=True)
    endpoint.timeout_first(2, delay=4)
    t0 = time.monotonic()
    esmd(kafka_config(topic, batch_size=100, window="100ms", timeout="1s", group=group))
    endpoint.wait_records(20, timeout=90)
    _retried_batch_checks(endpoint, 2)
    reqs = endpoint.snapshot()
    # esmd gave up on each attempt after its 1 s timeout, not after the 4 s the endpoint took.
    retry = next(r for r in reqs if r.ok)
    assert retry.t_arrival - reqs[0].t_arrival < 4.0 + 2.0
    assert_exactly_once_in_order(endpoint, {0: 20})
    wait_committed(kafka, group, topic, {0: 20})
    assert time.monotonic() - t0 < 90


@pytest.mark.kafka
def test_throttled_and_function_errors_are_retried(kafka, endpoint, esmd, kafka_config, names):
    topic = kafka.create_topic(names.topic(), 1)
    group = names.group()
    kafka.produce(topic, count=10, size=50, partitions=1, keyed=True)
    endpoint.script([
        Response(429, {"message": "Rate Exceeded."}, {"Retry-After": "1"}),
        Response(200, {"errorType": "Error", "errorMessage": "boom"},
                 {"X-Amz-Function-Error": "Unhandled"}),
        Response(200, {"errorType": "Error", "errorMessage": "boom"},  # RIE-style body
                 success=False),
    ])
    esmd(kafka_config(topic, batch_size=100, window="100ms", group=group))
    endpoint.wait_records(10, timeout=90)
    reqs = endpoint.snapshot()
    assert len(reqs) >= 4
    # Retry-After: 1 was honoured before the next attempt.
    assert reqs[1].t_arrival - reqs[0].t_arrival >= 0.9
    assert len({r.idempotency_key for r in reqs[:4]}) == 1
    assert_exactly_once_in_order(endpoint, {0: 10}, [r for r in reqs if r.ok])
    wait_committed(kafka, group, topic, {0: 10})


@pytest.mark.kafka
def test_failing_partition_does_not_block_others(kafka, endpoint, esmd, kafka_config, names):
    topic = kafka.create_topic(names.topic(), 4)
    group = names.group()
    release = threading.Event()
    p0_failures = []

    def behaviour(req):
        if 0 in req.partitions() and not release.is_set():
            p0_failures.append(req)
            return Response(500, {"message": "partition 0 is failing"})
        return None

    endpoint.behaviour = behaviour
    proc = esmd(kafka_config(topic, batch_size=10, window="100ms", group=group))
    kafka.produce(topic, [{"partition": 0, "key": "p0-%d" % i, "value": "v"} for i in range(5)])
    endpoint.wait_for(lambda: len(p0_failures) >= 1, 30, "a failed partition-0 request")

    # Partition 0's batch is now failing and being retried; the others must keep flowing.
    kafka.produce(topic, [{"partition": p, "key": "p%d-%d" % (p, i), "value": "v"}
                          for p in (1, 2, 3) for i in range(30)])
    endpoint.wait_records(90, timeout=60)
    assert not release.is_set()
    delivered = endpoint.offsets()
    assert 0 not in delivered
    assert {p: delivered[p] for p in (1, 2, 3)} == {p: list(range(30)) for p in (1, 2, 3)}
    committed = kafka.committed(group, topic)
    assert committed[0] == -1, committed
    wait_committed(kafka, group, topic, {0: -1, 1: 30, 2: 30, 3: 30})
    assert len(p0_failures) >= 2, "partition 0 was not retried meanwhile"

    release.set()
    endpoint.wait_records(95, timeout=60)
    assert_exactly_once_in_order(endpoint, {0: 5, 1: 30, 2: 30, 3: 30})
    wait_committed(kafka, group, topic, {0: 5, 1: 30, 2: 30, 3: 30})
    assert proc.running()


@pytest.mark.kafka
def test_stuck_partitions_filling_the_mapping_do_not_starve_others(kafka, endpoint, esmd,
                                                                   kafka_config, names):
    """Six failing partitions hold more than the mapping-wide limit of waiting records (50,000):
    a healthy partition that receives records meanwhile is paused by that limit, and must be
    resumed as soon as its own records have gone into a batch."""
    topic = kafka.create_topic(names.topic(), 8)
    stuck = set(range(6))

    def behaviour(req):
        if req.partitions() & stuck:
            return Response(500, {"message": "stuck"})
        return None

    endpoint.behaviour = behaviour
    kafka.produce(topic, count=66000, size=20, partitions=6)  # 11,000 in each of 0..5
    proc = esmd(kafka_config(topic, batch_size=10, window="50ms"))
    wait_for(lambda: proc.metrics().get("esmd_pending_records") >= 45000, 60, 0.2,
             "the stuck partitions to fill the mapping's waiting records")

    kafka.produce(topic, [{"partition": p, "key": "k%d" % i, "value": "v"}
                          for p in (6, 7) for i in range(200)])
    try:
        endpoint.wait_records(400, timeout=60)
    except TimeoutError:
        m = proc.metrics()
        raise AssertionError("healthy partitions starved: polled=%s pending=%s last requests=%s" % (
            m.get("esmd_polled_events_total"), m.get("esmd_pending_records"),
            [(sorted(r.partitions()), r.response and r.response.status, len(r.records())) for r in endpoint.requests][-10:]))
    delivered = endpoint.offsets()
    assert {p: delivered.get(p) for p in (6, 7)} == {6: list(range(200)), 7: list(range(200))}
    assert not stuck & set(delivered)
    assert proc.metrics().get("esmd_pending_records") >= 40000, "the stuck records were dropped"
    assert proc.running()


@pytest.mark.kafka
def test_max_concurrency_caps_requests_in_flight(kafka, endpoint, esmd, kafka_config, names):
    topic = kafka.create_topic(names.topic(), 4)
    kafka.produce(topic, count=80, size=50, partitions=4, keyed=True)
    endpoint.delay(0.5)
    esmd(kafka_config(topic, batch_size=5, window="100ms", max_concurrency=2))
    endpoint.wait_records(80, timeout=120)
    assert endpoint.max_concurrent <= 2
    # Four partitions with work and a slow function: both slots are used.
    assert endpoint.max_concurrent == 2
    assert_exactly_once_in_order(endpoint, {p: 20 for p in range(4)})


@pytest.mark.kafka
@pytest.mark.slow
def test_sigterm_under_load_then_restart_loses_nothing(kafka, endpoint, esmd, kafka_config,
                                                       names):
    topic = kafka.create_topic(names.topic(), 4)
    group = names.group()
    kafka.produce(topic, count=5000, size=100, partitions=4, keyed=True)
    endpoint.delay(0.1)
    proc = esmd(kafka_config(topic, batch_size=100, window="100ms", timeout="5s", group=group))
    endpoint.wait_records(1000, timeout=120)
    t0 = time.monotonic()
    assert proc.stop(signal.SIGTERM, timeout=5 + 10) == 0
    assert time.monotonic() - t0 < 5 + 5, "graceful stop took longer than the function timeout"
    delivered_before = endpoint.record_count()
    assert delivered_before < 5000, "the test stopped esmd too late to mean anything"

    proc.start()
    hw = kafka.watermarks(topic)
    assert hw == {p: 1250 for p in range(4)}
    endpoint.wait_for(lambda: len({(rec["partition"], rec["offset"])
                                   for _, _, rec in endpoint.records()}) >= 5000,
                      180, "all 5000 offsets delivered at least once")
    assert_covers(endpoint, hw)
    wait_committed(kafka, group, topic, hw)
    assert proc.stop() == 0


@pytest.mark.kafka
@pytest.mark.slow
def test_crash_then_restart_redelivers_uncommitted(kafka, endpoint, esmd, kafka_config, names):
    topic = kafka.create_topic(names.topic(), 4)
    group = names.group()
    kafka.produce(topic, count=2000, size=100, partitions=4, keyed=True)
    endpoint.delay(0.05)
    proc = esmd(kafka_config(topic, batch_size=50, window="100ms", group=group))
    endpoint.wait_records(500, timeout=120)
    proc.kill9()
    assert endpoint.record_count() < 2000, "the test killed esmd too late to mean anything"
    proc.start()
    hw = kafka.watermarks(topic)
    endpoint.wait_for(lambda: len({(rec["partition"], rec["offset"])
                                   for _, _, rec in endpoint.records()}) >= 2000,
                      120, "all 2000 offsets delivered at least once")
    assert_covers(endpoint, hw)
    wait_committed(kafka, group, topic, hw)
    assert proc.stop() == 0


@pytest.mark.kafka
def test_admin_health_ready_and_metrics(kafka, endpoint, esmd, kafka_config, names):
    topic = kafka.create_topic(names.topic(), 1)
    kafka.produce(topic, count=5, size=20, partitions=1, keyed=True)
    endpoint.fail_first(1)
    proc = esmd(kafka_config(topic, batch_size=100, window="100ms"))
    assert proc.get("/healthz")[0] == 200
    ready(proc)
    status, body = proc.get("/readyz")
    assert status == 200
    json.loads(body)  # JSON detail
    endpoint.wait_records(5, timeout=60)

    def counted():
        m = proc.metrics()
        return m if m.get("esmd_invocations_total", function="fn") >= 2 else None

    m = wait_for(counted, 20, 0.2, "esmd_invocations_total{function=\"fn\"} >= 2")
    assert m.get("esmd_invocations_total", function="fn") >= 2
    errors = [n for n in m.names() if n.startswith("esmd_") and "error" in n]
    assert any(m.get(n, function="fn") >= 1 for n in errors), \
        "no error counter for the failed invocation in %s" % m.names()
    status, text = proc.get("/metrics")
    assert "# TYPE esmd_invocations_total counter" in text
