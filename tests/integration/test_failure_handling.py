"""Failure handling on a Kafka mapping (README "Failure handling"): retry limits, bisecting,
partial batch responses, record age, records over the payload cap, and the on-failure records
that reach a destination (here an HTTP endpoint, a second recording server)."""

import base64
import json
import os
import time

import jsonschema
import pytest

import servers
from endpoint import Endpoint, Response
from test_kafka_e2e import wait_committed

FUNCTION_ERROR = {"X-Amz-Function-Error": "Unhandled"}
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
with open(os.path.join(ROOT, "schemas", "kafka-on-failure.schema.json")) as f:
    ON_FAILURE_SCHEMA = json.load(f)


@pytest.fixture
def dest():
    ep = Endpoint()
    yield ep
    ep.close()


def value_of(rec):
    return json.loads(base64.b64decode(rec["value"]))


def poison_behaviour(req):
    """A function error for any batch holding a record whose value has "poison"."""
    if any(value_of(rec).get("poison") for _, rec in req.records()):
        return Response(200, {"errorType": "Poison", "errorMessage": "cannot handle it"},
                        headers=FUNCTION_ERROR)
    return None


def failure_records(dest):
    recs = [r.json for r in dest.snapshot()]
    for r in recs:
        jsonschema.validate(r, ON_FAILURE_SCHEMA)
    return recs


def delivered_offsets(endpoint):
    return sorted(rec["offset"] for _, _, rec in endpoint.records())


@pytest.mark.kafka
def test_bisect_isolates_the_poison_record(kafka, endpoint, dest, esmd, kafka_config, names):
    topic = kafka.create_topic(names.topic(), 1)
    group = names.group()
    kafka.produce(topic, [{"partition": 0, "key": "k%d" % i,
                           "value": json.dumps({"i": i, "poison": i == 7})} for i in range(20)])
    endpoint.behaviour = poison_behaviour
    proc = esmd(kafka_config(topic, batch_size=10, window="100ms", group=group, mapping_extra={
        "maximum_retry_attempts": 1, "bisect_batch_on_function_error": True,
        "on_failure": dest.base + "/failed"}))
    wait_committed(kafka, group, topic, {0: 20}, timeout=90)
    dest.wait_for(lambda: len(dest.snapshot()) >= 1, 30, "the on-failure record")
    time.sleep(0.5)

    assert delivered_offsets(endpoint) == [i for i in range(20) if i != 7]
    recs = failure_records(dest)
    assert len(recs) == 1, recs
    fr = recs[0]
    assert fr["requestContext"]["condition"] == "RetryAttemptsExhausted"
    assert fr["requestContext"]["functionArn"].endswith(":function:fn")
    # the invocations of the batch that gave the record up: the one-record part, sent once and
    # retried once (the enclosing batches' invocations are not counted)
    assert fr["requestContext"]["approximateInvokeCount"] == 2
    assert fr["responseContext"]["functionError"] == "Unhandled"
    assert fr["version"] == "1.0" and fr["timestamp"].endswith("Z")
    info = fr["KafkaBatchInfo"]
    assert info["batchSize"] == 1 and info["bootstrapServers"] == kafka.bootstrap
    assert info["recordInfo"]["offset"] == "7"
    # the payload is the record itself as a one-record event: it can be replayed
    payload = fr["payload"]
    assert payload["eventSource"] == "SelfManagedKafka"
    [(key, [rec])] = payload["records"].items()
    assert key == "%s-0" % topic and rec["offset"] == 7
    assert base64.b64decode(rec["key"]) == b"k7" and value_of(rec)["poison"] is True
    raw = dest.snapshot()[0].body  # the bytes esmd wrote; payload is the record's last field
    start = raw.index(b'"payload":') + len(b'"payload":')
    assert raw.endswith(b"}") and info["payloadSize"] == len(raw[start:-1])
    m = proc.metrics()
    assert m.get("esmd_on_failure_events_total") == 1
    assert m.get("esmd_batch_bisections_total") >= 3


@pytest.mark.kafka
def test_bisected_parts_each_get_their_own_retries(kafka, endpoint, dest, esmd, kafka_config,
                                                   names):
    """Two poison records that end up in different halves: each one-record part is sent and
    retried maximum_retry_attempts times, and its on-failure record says so
    (approximateInvokeCount 3). The count was the invocations of every enclosing batch (varying
    with how the records were batched), and the second part began with the retries the first
    had used up, so it was given up after one invocation."""
    topic = kafka.create_topic(names.topic(), 1)
    group = names.group()
    kafka.produce(topic, [{"partition": 0, "key": "k%d" % i,
                           "value": json.dumps({"i": i, "poison": i in (1, 6)})}
                          for i in range(8)])
    endpoint.behaviour = poison_behaviour
    esmd(kafka_config(topic, batch_size=8, window="500ms", group=group, mapping_extra={
        "maximum_retry_attempts": 2, "bisect_batch_on_function_error": True,
        "on_failure": dest.base + "/failed"}))
    wait_committed(kafka, group, topic, {0: 8}, timeout=90)
    dest.wait_for(lambda: len(dest.snapshot()) >= 2, 30, "two on-failure records")
    recs = failure_records(dest)
    assert sorted(r["KafkaBatchInfo"]["recordInfo"]["offset"] for r in recs) == ["1", "6"]
    assert [r["requestContext"]["approximateInvokeCount"] for r in recs] == [3, 3]
    alone = {}
    for req in endpoint.snapshot():
        offs = [rec["offset"] for _, rec in req.records()]
        if len(offs) == 1:
            alone[offs[0]] = alone.get(offs[0], 0) + 1
    assert alone.get(1) == 3 and alone.get(6) == 3, alone
    assert delivered_offsets(endpoint) == [0, 2, 3, 4, 5, 7]


@pytest.mark.kafka
def test_without_bisect_the_whole_batch_goes_to_the_destination(kafka, endpoint, dest, esmd,
                                                                 kafka_config, names):
    topic = kafka.create_topic(names.topic(), 1)
    group = names.group()
    kafka.produce(topic, [{"partition": 0, "value": json.dumps({"i": i, "poison": i == 7})}
                          for i in range(20)])
    endpoint.behaviour = poison_behaviour
    esmd(kafka_config(topic, batch_size=5, window="100ms", group=group, mapping_extra={
        "maximum_retry_attempts": 2, "on_failure": dest.base + "/failed"}))
    wait_committed(kafka, group, topic, {0: 20}, timeout=90)
    dest.wait_for(lambda: len(dest.snapshot()) >= 5, 30, "5 on-failure records")
    time.sleep(0.5)
    assert delivered_offsets(endpoint) == [0, 1, 2, 3, 4] + list(range(10, 20))
    offsets = sorted(int(r["KafkaBatchInfo"]["recordInfo"]["offset"]) for r in failure_records(dest))
    assert offsets == [5, 6, 7, 8, 9]
    assert all(r["requestContext"]["approximateInvokeCount"] == 3 for r in failure_records(dest))
    # 1 try + 2 retries of the failing batch
    assert sum(1 for r in endpoint.snapshot()
               if any(rec["offset"] == 5 for _, rec in r.records())) == 3


@pytest.mark.kafka
def test_retries_exhausted_without_destination_discards_and_moves_on(kafka, endpoint, esmd,
                                                                     kafka_config, names):
    topic = kafka.create_topic(names.topic(), 1)
    group = names.group()
    kafka.produce(topic, [{"partition": 0, "value": json.dumps({"i": i, "poison": i == 2})}
                          for i in range(6)])
    endpoint.behaviour = poison_behaviour
    proc = esmd(kafka_config(topic, batch_size=3, window="100ms", group=group,
                             mapping_extra={"maximum_retry_attempts": 0}))
    wait_committed(kafka, group, topic, {0: 6}, timeout=60)
    assert delivered_offsets(endpoint) == [3, 4, 5]
    assert proc.metrics().get("esmd_dropped_events_total") == 3


@pytest.mark.kafka
def test_partial_batch_response_retries_from_the_lowest_failure(kafka, endpoint, esmd,
                                                               kafka_config, names):
    topic = kafka.create_topic(names.topic(), 2)
    group = names.group()
    kafka.produce(topic, [{"partition": p, "value": json.dumps({"i": i})}
                          for p in (0, 1) for i in range(6)])
    state = {"reported": False}

    def behaviour(req):
        offs = {(rec["partition"], rec["offset"]) for _, rec in req.records()}
        if (0, 3) in offs and not state["reported"]:
            state["reported"] = True
            return Response(200, {"batchItemFailures": [
                {"itemIdentifier": {"partition": "%s-0" % topic, "offset": 4}},
                {"itemIdentifier": {"partition": "%s-0" % topic, "offset": 3}}]})
        return None

    endpoint.behaviour = behaviour
    # max_concurrency 1: one batch holds both partitions (with free concurrency each partition
    # would get a batch of its own, docs/design.md#batch-forming)
    esmd(kafka_config(topic, batch_size=20, window="300ms", group=group, max_concurrency=1,
                      mapping_extra={"report_batch_item_failures": True}))
    wait_committed(kafka, group, topic, {0: 6, 1: 6}, timeout=60)
    time.sleep(0.3)
    reqs = endpoint.ok_requests()
    assert len(reqs) == 2, reqs
    first = {(rec["partition"], rec["offset"]) for _, rec in reqs[0].records()}
    second = [(rec["partition"], rec["offset"]) for _, rec in reqs[1].records()]
    assert first == {(p, i) for p in (0, 1) for i in range(6)}
    # partition 1 had no failure and partition 0 succeeded below offset 3: only 3.. again
    assert second == [(0, 3), (0, 4), (0, 5)]


@pytest.mark.kafka
@pytest.mark.parametrize("answer", [
    {"batchItemFailures": [{"itemIdentifier": {"partition": "nope-0", "offset": 1}}]},
    {"batchItemFailures": [{"itemIdentifier": ""}]},
    {"batchItemFailures": [{"wrongKey": {"offset": 1}}]},
    {"batchItemFailures": "not a list"},
], ids=["unknown", "empty", "wrong-key", "not-a-list"])
def test_malformed_partial_batch_response_fails_the_whole_batch(kafka, endpoint, esmd,
                                                                kafka_config, names, answer):
    topic = kafka.create_topic(names.topic(), 1)
    group = names.group()
    kafka.produce(topic, [{"partition": 0, "value": json.dumps({"i": i})} for i in range(3)])
    endpoint.script([Response(200, answer)])
    esmd(kafka_config(topic, batch_size=10, window="200ms", group=group,
                      mapping_extra={"report_batch_item_failures": True}))
    wait_committed(kafka, group, topic, {0: 3}, timeout=60)
    reqs = endpoint.snapshot()
    assert len(reqs) == 2
    assert [rec["offset"] for _, rec in reqs[1].records()] == [0, 1, 2]


@pytest.mark.kafka
def test_empty_partial_batch_response_is_success(kafka, endpoint, esmd, kafka_config, names):
    topic = kafka.create_topic(names.topic(), 1)
    group = names.group()
    kafka.produce(topic, [{"partition": 0, "value": "{}"} for _ in range(3)])
    endpoint.script([Response(200, {"batchItemFailures": []})])
    esmd(kafka_config(topic, batch_size=10, window="200ms", group=group,
                      mapping_extra={"report_batch_item_failures": True}))
    wait_committed(kafka, group, topic, {0: 3}, timeout=60)
    time.sleep(0.3)
    assert len(endpoint.snapshot()) == 1


@pytest.mark.kafka
def test_records_past_their_age_go_to_the_destination_unsent(kafka, endpoint, dest, esmd,
                                                             kafka_config, names):
    topic = kafka.create_topic(names.topic(), 1)
    group = names.group()
    old = int(time.time() * 1000) - 120_000
    kafka.produce(topic, [{"partition": 0, "value": json.dumps({"i": i}), "timestamp": old}
                          for i in range(3)])
    kafka.produce(topic, [{"partition": 0, "value": json.dumps({"i": 3})}])
    esmd(kafka_config(topic, batch_size=10, window="200ms", group=group, mapping_extra={
        "maximum_record_age": "60s", "on_failure": dest.base + "/failed"}))
    wait_committed(kafka, group, topic, {0: 4}, timeout=60)
    dest.wait_for(lambda: len(dest.snapshot()) >= 3, 30, "3 on-failure records")
    assert delivered_offsets(endpoint) == [3]
    recs = failure_records(dest)
    assert sorted(int(r["KafkaBatchInfo"]["recordInfo"]["offset"]) for r in recs) == [0, 1, 2]
    for r in recs:
        assert r["requestContext"]["condition"] == "RecordAgeExceeded"
        assert r["requestContext"]["approximateInvokeCount"] == 0
        assert r["responseContext"] is None


@pytest.mark.kafka
def test_record_over_the_payload_cap_goes_to_the_destination(kafka, endpoint, dest, esmd,
                                                             kafka_config, names):
    # A real broker refuses records over its 1 MB max.message.bytes unless the topic allows more.
    topic = kafka.create_topic(names.topic(), 1, config={"max.message.bytes": "10000000"})
    big = b"x" * 4_900_000
    servers.produce_with_librdkafka(
        kafka.bootstrap, topic,
        [(0, b"before", b"small-0"), (0, b"big", big), (0, b"after", b"small-2")],
        {"message.max.bytes": "10000000", "enable.idempotence": "true"})
    group = names.group()
    esmd(kafka_config(topic, batch_size=100, window="200ms", group=group,
                      mapping_extra={"on_failure": dest.base + "/failed"}))
    wait_committed(kafka, group, topic, {0: 3}, timeout=60)
    dest.wait_for(lambda: len(dest.snapshot()) >= 1, 30, "the on-failure record")
    assert delivered_offsets(endpoint) == [0, 2]
    [fr] = failure_records(dest)
    assert fr["requestContext"]["condition"] == "MaximumPayloadSizeExceeded"
    assert fr["responseContext"] is None
    assert "payload" not in fr
    ri = fr["KafkaBatchInfo"]["recordInfo"]
    assert ri["offset"] == "1" and ri["topic"] == topic and ri["partition"] == 0


def test_stream_controls_are_refused_for_queue_sources(tmp_path):
    import subprocess
    cfg = tmp_path / "q.yaml"
    cfg.write_text("""postgres: postgresql://localhost/esmd
functions:
  f: { url: "http://localhost:8080/" }
mappings:
  - name: q
    function: f
    source: { pgqueue: jobs }
    maximum_retry_attempts: 3
    on_failure: http://localhost:9/failed
""")
    r = subprocess.run([servers.binary("esmd"), "check-config", str(cfg)], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 1
    assert "maximum_retry_attempts is for stream sources" in r.stderr
    assert "on_failure is for stream sources" in r.stderr


@pytest.mark.kafka
def test_on_failure_record_replays_the_original_record(kafka, endpoint, dest, esmd, kafka_config,
                                                       names):
    """The payload of an on-failure record carries the record itself: produced again, it reaches
    the function exactly as it first did (key, value bytes, headers)."""
    topic = kafka.create_topic(names.topic(), 1)
    group = names.group()
    raw = b"\x00\xffbinary \xe2\x82\xac"
    kafka.produce(topic, [{"partition": 0, "key": "k-1",
                           "value_b64": base64.b64encode(raw).decode(),
                           "headers": [["h", "v1"], ["h", "v2"]]}])
    state = {"fail": True}

    def behaviour(req):
        if state["fail"]:
            return Response(500, {"message": "down"})
        return None

    endpoint.behaviour = behaviour
    esmd(kafka_config(topic, batch_size=10, window="100ms", group=group, mapping_extra={
        "maximum_retry_attempts": 0, "on_failure": dest.base + "/failed"}))
    dest.wait_for(lambda: len(dest.snapshot()) >= 1, 30, "the on-failure record")
    [fr] = failure_records(dest)
    [(key, [orig])] = fr["payload"]["records"].items()
    assert fr["responseContext"]["statusCode"] == 500

    # replay: produce the record from the payload again, the function works now
    state["fail"] = False
    hdrs = [[name, bytes(b & 0xFF for b in vals).decode()]
            for h in orig["headers"] for name, vals in h.items()]
    kafka.produce(topic, [{"partition": orig["partition"],
                           "key": base64.b64decode(orig["key"]).decode(),
                           "value_b64": orig["value"], "headers": hdrs}])
    endpoint.wait_records(1, timeout=30)
    [(_, _, again)] = endpoint.records()
    assert again["offset"] == 1
    for field in ("key", "value", "headers", "topic", "partition"):
        assert again[field] == orig[field], field
    assert base64.b64decode(again["value"]) == raw


@pytest.mark.kafka
def test_unlimited_retries_with_a_destination_mean_ten(kafka, endpoint, dest, esmd, kafka_config,
                                                      names):
    """Lambda's rule: maximum_retry_attempts -1 with an on-failure destination is 10 retries
    (without a destination, -1 retries forever: test_kafka_e2e's retry tests)."""
    topic = kafka.create_topic(names.topic(), 1)
    group = names.group()
    kafka.produce(topic, [{"partition": 0, "value": json.dumps({"i": 0, "poison": True})}])
    endpoint.behaviour = poison_behaviour
    esmd(kafka_config(topic, batch_size=10, window="50ms", group=group,
                      mapping_extra={"on_failure": dest.base + "/failed"}),
         env={"ESMD_MAPPING_RETRY_BACKOFF": "10,20"})
    dest.wait_for(lambda: len(dest.snapshot()) >= 1, 60, "the on-failure record")
    wait_committed(kafka, group, topic, {0: 1})
    [fr] = failure_records(dest)
    assert fr["requestContext"]["approximateInvokeCount"] == 11
    assert len(endpoint.snapshot()) == 11
