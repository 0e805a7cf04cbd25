"""End to end: Redis streams (a real redis-server) -> esmd -> a recording HTTP function endpoint.

Each test uses its own stream and consumer group on the session's Redis (tests that restart Redis
start their own). The assertions are about what the endpoint received (the Kinesis-shaped event
of docs/redis.md, schemas/redis-event.schema.json) and what the group's pending entries list
(PEL) says was acknowledged."""

import base64
import json
import os
import signal
import subprocess
import threading
import time

import jsonschema
import pytest

import servers
from endpoint import Response
from servers import wait_for

MAX_PAYLOAD = 6291456
SCHEMA = json.load(open(os.path.join(servers.ROOT, "schemas", "redis-event.schema.json")))
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)
ON_FAILURE = jsonschema.Draft202012Validator(
    json.load(open(os.path.join(servers.ROOT, "schemas", "redis-on-failure.schema.json"))))
FUNCTION_ERROR = {"X-Amz-Function-Error": "Unhandled"}


# ---- helpers --------------------------------------------------------------------------------


def produce(redis, stream, count, size=100, start=0):
    """count generated entries, field v = {"i":start+k,"pad":"x..."} (tests/tools/redistool)."""
    r = subprocess.run([servers.binary("redistool"), "produce", "-u", redis.url, "-s", stream,
                        "--count", str(count), "--size", str(size), "--start", str(start)],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "produced %d" % count, r.stderr
    return count


def xadd(redis, stream, *pairs):
    """One entry with the given (name, value) pairs (str or bytes); returns its ID."""
    args = []
    for n, v in pairs:
        args += [n, v]
    return redis.command("XADD", stream, "*", *args)


def records(endpoint, ok_only=True, requests=None):
    """[(request, record)] in arrival order over the (successful) requests."""
    reqs = requests if requests is not None else (
        endpoint.ok_requests() if ok_only else endpoint.snapshot())
    out = []
    for req in reqs:
        ev = req.json if isinstance(req.json, dict) else {}
        for rec in ev.get("Records") or []:
            out.append((req, rec))
    return out


def seq(rec):
    """The record's sequenceNumber (the entry ID), in either event format."""
    return (rec["kinesis"] if "kinesis" in rec else rec["redis"])["sequenceNumber"]


def fields(rec):
    """The entry's fields: native `fields`, or the kinesis record's data decoded (the JSON object
    of the fields when the source has no data_field)."""
    if "kinesis" in rec:
        return json.loads(base64.b64decode(rec["kinesis"]["data"]))
    return rec["redis"]["fields"]


def index_of(rec):
    """The generated entry's number, or None for entries made by hand."""
    v = fields(rec).get("v")
    try:
        return json.loads(v)["i"]
    except (TypeError, ValueError, KeyError):
        return None


def delivered(endpoint, ok_only=True):
    """{i: times delivered} over the generated entries."""
    out = {}
    for _, rec in records(endpoint, ok_only):
        i = index_of(rec)
        if i is not None:
            out[i] = out.get(i, 0) + 1
    return out


def wait_all_delivered(endpoint, n, timeout=120, start=0):
    want = set(range(start, start + n))

    def done():
        return want <= set(delivered(endpoint))

    try:
        endpoint.wait_for(done, timeout, "entries %d..%d delivered" % (start, start + n - 1))
    except TimeoutError:
        missing = sorted(want - set(delivered(endpoint)))
        raise AssertionError("%d entries never delivered, e.g. %s" % (len(missing), missing[:10]))


def ids(endpoint, ok_only=True):
    return [seq(rec) for _, rec in records(endpoint, ok_only)]


def id_key(entry_id):
    ms, seq = entry_id.split("-")
    return int(ms), int(seq)


def pending(redis, stream, group):
    """Entries delivered to the group and not acknowledged (XPENDING summary)."""
    return redis.command("XPENDING", stream, group)[0]


def wait_pending(redis, stream, group, n, timeout=30):
    last = {}

    def check():
        last["v"] = pending(redis, stream, group)
        return last["v"] == n

    try:
        wait_for(check, timeout, 0.1, "%d pending entries" % n)
    except TimeoutError:
        raise AssertionError("%s entries pending in %s/%s, expected %d" % (
            last.get("v"), stream, group, n))


def ready(proc, timeout=30):
    wait_for(lambda: proc.get("/readyz")[0] == 200, timeout, 0.1, "esmd /readyz 200")


def consumer_of(req):
    """The consumer that sent a request: its idempotency key is <mapping>/<stream>@<consumer>:..."""
    key = req.idempotency_key or ""
    return key.split("/", 1)[1].split("@", 1)[1].rsplit(":", 1)[0]


@pytest.fixture
def redis_config(postgres, redis, endpoint, names):
    """redis_config(stream, **options) -> config dict with one Redis mapping to the endpoint.

    options: group, batch_size, window, timeout, max_concurrency, consumer, visibility_timeout,
    starting_position, server (a servers.Redis, default the session's), mapping_extra,
    event_format, data_field, partition_key_field (left out when not given: kinesis)."""

    def make(stream, group="g", batch_size=100, window="100ms", timeout="10s", max_concurrency=10,
             consumer=None, visibility_timeout=None, starting_position=None, server=None,
             mapping_extra=None, url=None, event_format=None, data_field=None,
             partition_key_field=None):
        src = {"redis": "r", "stream": stream, "group": group}
        for k, v in (("event_format", event_format), ("data_field", data_field),
                     ("partition_key_field", partition_key_field)):
            if v:
                src[k] = v
        if consumer:
            src["consumer"] = consumer
        if visibility_timeout:
            src["visibility_timeout"] = visibility_timeout
        if starting_position:
            src["starting_position"] = starting_position
        m = {"name": names.mapping(), "function": "fn", "source": src, "batch_size": batch_size,
             "maximum_batching_window": window}
        m.update(mapping_extra or {})
        return {
            "postgres": postgres.url,
            "admin": {"listen": "127.0.0.1:0"},
            "connections": {"r": {"type": "redis", "url": url or (server or redis).url}},
            "functions": {"fn": {"url": endpoint.url, "timeout": timeout,
                                 "max_concurrency": max_concurrency}},
            "mappings": [m],
        }

    return make


# ---- delivery -------------------------------------------------------------------------------


def test_all_entries_arrive_in_order_with_the_native_shape(redis, endpoint, esmd, redis_config,
                                                           names):
    stream = names.topic()
    special = [
        xadd(redis, stream, ("type", "order_created"), ("payload", '{"id":1}'),
             ("note", "\u00eb \"q\"\n")),
        xadd(redis, stream, ("k", "1"), ("k", "2"), ("blob", b"\x00\xff\x80"),
             (b"\xfe\xffname", "v")),
    ]
    produce(redis, stream, 2000, size=100)
    total = 2002
    proc = esmd(redis_config(stream, batch_size=100, window="100ms", event_format="native"))
    wait_all_delivered(endpoint, 2000)
    endpoint.wait_for(lambda: len(records(endpoint)) >= total, 30, "all records")
    time.sleep(0.5)  # a duplicate would show up now
    recs = records(endpoint)
    assert len(recs) == total, "duplicates: %d records for %d entries" % (len(recs), total)
    got = [seq(rec) for _, rec in recs]
    assert got == sorted(got, key=id_key), "entries out of stream order"
    assert got[:2] == special
    assert all(r.ok for r in endpoint.snapshot())

    arn = "arn:esmd:redis:127.0.0.1:%d/0:stream/%s" % (redis.port, stream)
    for req in endpoint.ok_requests():
        VALIDATOR.validate(req.json)
        assert set(req.json) == {"Records"}
        assert 1 <= len(req.json["Records"]) <= 100
        assert len(req.body) <= MAX_PAYLOAD
        assert req.request_id and req.idempotency_key
    for _, rec in recs:
        assert set(rec) == NATIVE_RECORD, sorted(rec)
        r = rec["redis"]
        assert rec["eventSource"] == "esmd:redis"
        assert rec["eventName"] == "esmd:redis:record"
        assert rec["eventVersion"] == "1.0"
        assert rec["eventSourceARN"] == arn
        assert rec["eventID"] == "%s:%s" % (stream, r["sequenceNumber"])
        assert r["stream"] == stream
        assert r["deliveryCount"] == 1
        ms = id_key(r["sequenceNumber"])[0]
        assert abs(r["approximateArrivalTimestamp"] - ms / 1000.0) < 0.0005
        assert abs(r["approximateArrivalTimestamp"] - time.time()) < 300
    first, second = recs[0][1]["redis"], recs[1][1]["redis"]
    assert first["fields"] == {"type": "order_created", "payload": '{"id":1}',
                               "note": "\u00eb \"q\"\n"}
    assert "binaryFields" not in first
    # the repeated name is kept twice in the JSON text, in order
    raw = recs[1][0].body.decode()
    assert '"fields":{"k":"1","k":"2"}' in raw
    assert [(base64.b64decode(b["name"]), base64.b64decode(b["value"]))
            for b in second["binaryFields"]] == [(b"blob", b"\x00\xff\x80"), (b"\xfe\xffname",
                                                                              b"v")]
    assert delivered(endpoint) == {i: 1 for i in range(2000)}
    wait_pending(redis, stream, "g", 0)

    m = proc.metrics()
    assert m.get("esmd_polled_events_total") == total
    wait_for(lambda: proc.metrics().get("esmd_committed_events_total") == total, 10, 0.2,
             "esmd_committed_events_total == %d" % total)
    wait_for(lambda: proc.metrics().get("esmd_offset_lag") == 0, 15, 0.2, "esmd_offset_lag 0")
    assert "(bug)" not in proc.log()


KINESIS_RECORD = {"kinesis", "eventSource", "eventVersion", "eventID", "eventName",
                  "invokeIdentityArn", "awsRegion", "eventSourceARN"}
KINESIS_BLOCK = {"kinesisSchemaVersion", "partitionKey", "sequenceNumber", "data",
                 "approximateArrivalTimestamp"}
NATIVE_RECORD = {"redis", "eventSource", "eventVersion", "eventID", "eventName", "eventSourceARN"}


def test_all_entries_arrive_in_order_with_the_kinesis_shape(redis, endpoint, esmd, redis_config,
                                                            names):
    """The default event: Lambda's Kinesis event, data = every field as a JSON object."""
    stream = names.topic()
    special = [
        xadd(redis, stream, ("type", "order_created"), ("payload", '{"id":1}'),
             ("note", "\u00eb \"q\"\n")),
        xadd(redis, stream, ("k", "1"), ("k", "2"), ("blob", b"\x00\xff\x80")),
    ]
    produce(redis, stream, 500, size=100)
    total = 502
    proc = esmd(redis_config(stream, batch_size=100, window="100ms"))
    wait_all_delivered(endpoint, 500)
    endpoint.wait_for(lambda: len(records(endpoint)) >= total, 30, "all records")
    time.sleep(0.5)  # a duplicate would show up now
    recs = records(endpoint)
    assert len(recs) == total, "duplicates: %d records for %d entries" % (len(recs), total)
    got = [seq(rec) for _, rec in recs]
    assert got == sorted(got, key=id_key), "entries out of stream order"
    assert got[:2] == special
    arn = "arn:aws:kinesis:us-east-1:000000000000:stream/%s" % stream
    for req in endpoint.ok_requests():
        VALIDATOR.validate(req.json)
        assert set(req.json) == {"Records"}
    for _, rec in recs:
        assert set(rec) == KINESIS_RECORD, sorted(rec)
        k = rec["kinesis"]
        assert set(k) == KINESIS_BLOCK, sorted(k)
        assert k["kinesisSchemaVersion"] == "1.0"
        assert rec["eventSource"] == "aws:kinesis"
        assert rec["eventName"] == "aws:kinesis:record"
        assert rec["eventVersion"] == "1.0"
        assert rec["eventSourceARN"] == arn
        assert rec["awsRegion"] == "us-east-1"
        assert rec["invokeIdentityArn"] == "arn:aws:iam::000000000000:role/esmd"
        assert rec["eventID"] == "shardId-000000000000:%s" % k["sequenceNumber"]
        assert k["partitionKey"] == k["sequenceNumber"]  # no partition_key_field: the entry ID
        ms = id_key(k["sequenceNumber"])[0]
        assert isinstance(k["approximateArrivalTimestamp"], float)
        assert abs(k["approximateArrivalTimestamp"] - ms / 1000.0) < 0.0005
    assert fields(recs[0][1]) == {"type": "order_created", "payload": '{"id":1}',
                                  "note": "\u00eb \"q\"\n"}
    # a repeated name: the list of its values; bytes that are not UTF-8: U+FFFD
    assert fields(recs[1][1]) == {"k": ["1", "2"], "blob": "\u0000\ufffd\ufffd"}
    assert delivered(endpoint) == {i: 1 for i in range(500)}
    wait_pending(redis, stream, "g", 0)
    wait_for(lambda: proc.metrics().get("esmd_committed_events_total") == total, 10, 0.2,
             "esmd_committed_events_total == %d" % total)


def test_kinesis_data_and_partition_key_fields_with_the_aws_section(redis, endpoint, esmd,
                                                                    redis_config, names):
    """data_field: that field's bytes as they are (binary too); partition_key_field; aws: the
    region and account in every ARN."""
    stream = names.topic()
    a = xadd(redis, stream, ("tenant", "acme"), ("body", '{"id":1}'), ("extra", "x"))
    b = xadd(redis, stream, ("tenant", "globex"), ("body", b"\x00\xff raw"))
    c = xadd(redis, stream, ("other", "y"))  # neither field: every field, the entry ID
    cfg = redis_config(stream, data_field="body", partition_key_field="tenant")
    cfg["aws"] = {"region": "eu-west-3", "account_id": "123456789012"}
    esmd(cfg)
    endpoint.wait_for(lambda: len(records(endpoint)) >= 3, 30, "3 records")
    recs = [rec for _, rec in records(endpoint)]
    for req in endpoint.ok_requests():
        VALIDATOR.validate(req.json)
    assert [seq(r) for r in recs] == [a, b, c]
    assert [r["kinesis"]["partitionKey"] for r in recs] == ["acme", "globex", c]
    assert [base64.b64decode(r["kinesis"]["data"]) for r in recs] == [
        b'{"id":1}', b"\x00\xff raw", b'{"other":"y"}']
    for r in recs:
        assert r["eventSourceARN"] == "arn:aws:kinesis:eu-west-3:123456789012:stream/%s" % stream
        assert r["awsRegion"] == "eu-west-3"
        assert r["invokeIdentityArn"] == "arn:aws:iam::123456789012:role/esmd"
    wait_pending(redis, stream, "g", 0)


def test_kinesis_filters_see_data_decoded(redis, endpoint, esmd, redis_config, names):
    """Kinesis's rule: patterns see data decoded, JSON as JSON; data that is not JSON does not fit
    a pattern that expects JSON, and the record is dropped; metadata can be filtered on."""
    stream = names.topic()
    for i in range(12):
        xadd(redis, stream, ("tenant", "t%d" % (i % 2)),
             ("body", json.dumps({"i": i, "amount": i * 100})))
    xadd(redis, stream, ("tenant", "t0"), ("body", "not json"))
    xadd(redis, stream, ("tenant", "t0"), ("body", b"\xff"))
    cfg = redis_config(stream, batch_size=5, window="50ms", data_field="body",
                       partition_key_field="tenant", mapping_extra={
                           "filters": [{"data": {"amount": [{"numeric": [">=", 900]}]}},
                                       {"partitionKey": ["t1"], "data": {"i": [1, 3]}}]})
    proc = esmd(cfg)
    want = [1, 3, 9, 10, 11]
    endpoint.wait_for(lambda: len(records(endpoint)) >= len(want), 30, "the matching entries")
    wait_pending(redis, stream, "g", 0)
    time.sleep(0.3)
    got = [json.loads(base64.b64decode(rec["kinesis"]["data"]))["i"]
           for _, rec in records(endpoint)]
    assert got == want
    m = proc.metrics()
    assert m.get("esmd_filtered_out_events_total") == 14 - len(want)


def test_batch_size_splits_requests(redis, endpoint, esmd, redis_config, names):
    stream = names.topic()
    produce(redis, stream, 12)
    esmd(redis_config(stream, batch_size=5, window="1s"))
    wait_all_delivered(endpoint, 12)
    time.sleep(1.5)
    assert [len(r.json["Records"]) for r in endpoint.snapshot()] == [5, 5, 2]
    assert [index_of(rec) for _, rec in records(endpoint)] == list(range(12))


def test_batching_window_collects_entries_into_one_request(redis, endpoint, esmd, redis_config,
                                                           names):
    stream = names.topic()
    proc = esmd(redis_config(stream, batch_size=1000, window="1s"))
    ready(proc)
    time.sleep(0.3)
    t0 = time.monotonic()
    produce(redis, stream, 10)
    wait_all_delivered(endpoint, 10)
    time.sleep(1.5)
    reqs = endpoint.snapshot()
    assert [len(r.json["Records"]) for r in reqs] == [10], reqs
    assert reqs[0].t_arrival - t0 >= 0.9


def test_starting_position_latest_skips_what_was_there(redis, endpoint, esmd, redis_config,
                                                       names):
    stream = names.topic()
    produce(redis, stream, 5, start=0)
    proc = esmd(redis_config(stream, starting_position="latest"))
    ready(proc)
    produce(redis, stream, 5, start=100)
    wait_all_delivered(endpoint, 5, start=100)
    time.sleep(0.5)
    assert sorted(delivered(endpoint)) == list(range(100, 105))


@pytest.mark.slow
def test_payload_cap_splits_large_entries(redis, endpoint, esmd, redis_config, names):
    stream = names.topic()
    for i in range(8):  # 8 x 900 KB: well over one 6 MB event
        xadd(redis, stream, ("v", json.dumps({"i": i, "pad": "x" * 900000})))
    esmd(redis_config(stream, batch_size=100, window="2s"))
    wait_all_delivered(endpoint, 8)
    sizes = [len(r.body) for r in endpoint.snapshot()]
    assert max(sizes) <= MAX_PAYLOAD, sizes
    assert len(sizes) >= 2, sizes
    assert [index_of(rec) for _, rec in records(endpoint)] == list(range(8))


def test_entry_over_payload_cap_is_skipped_and_acknowledged(redis, endpoint, esmd, redis_config,
                                                            names):
    stream = names.topic()
    xadd(redis, stream, ("v", json.dumps({"i": 0})))
    xadd(redis, stream, ("v", "x" * 6500000))
    xadd(redis, stream, ("v", json.dumps({"i": 2})))
    proc = esmd(redis_config(stream, batch_size=100, window="200ms"))
    endpoint.wait_for(lambda: len(records(endpoint)) >= 2, 60, "the two small entries")
    wait_pending(redis, stream, "g", 0)
    assert [index_of(rec) for _, rec in records(endpoint, ok_only=False)] == [0, 2]
    assert proc.metrics().get("esmd_oversized_records_total") == 1


def test_failing_function_is_retried_and_nothing_acknowledged_meanwhile(redis, endpoint, esmd,
                                                                        redis_config, names):
    stream = names.topic()
    produce(redis, stream, 20)
    seen_pending = []

    def behaviour(req):
        if req.index < 3:
            seen_pending.append(pending(redis, stream, "g"))
            return Response(500, {"message": "injected failure"})
        return None

    endpoint.behaviour = behaviour
    esmd(redis_config(stream, batch_size=100, window="100ms"))
    wait_all_delivered(endpoint, 20, timeout=90)
    assert seen_pending == [20, 20, 20]
    reqs = endpoint.snapshot()
    failed, retry = reqs[:3], next(r for r in reqs[3:] if r.ok)
    assert all(not r.ok for r in failed)
    keys = {r.idempotency_key for r in failed + [retry]}
    assert len(keys) == 1 and None not in keys
    assert [seq(rec) for _, rec in records(endpoint, requests=[retry])] == \
        [seq(rec) for _, rec in records(endpoint, requests=[failed[0]])]
    assert delivered(endpoint) == {i: 1 for i in range(20)}
    wait_pending(redis, stream, "g", 0)


def test_filters_see_fields_with_json_values(redis, endpoint, esmd, redis_config, names):
    stream = names.topic()
    for i in range(30):
        kind = "keep" if i % 3 == 0 else "drop"
        xadd(redis, stream, ("type", kind), ("v", json.dumps({"i": i, "amount": i * 10})))
    xadd(redis, stream, ("type", "big"), ("v", json.dumps({"i": 1000, "amount": 5000})))
    xadd(redis, stream, ("type", "bin"), ("v", b"\xff"))
    cfg = redis_config(stream, batch_size=7, window="50ms", event_format="native", mapping_extra={
        "filters": [{"fields": {"type": ["keep"]}},
                    {"fields": {"v": {"amount": [{"numeric": [">", 1000]}]}}}]})
    proc = esmd(cfg)
    want = list(range(0, 30, 3)) + [1000]
    endpoint.wait_for(lambda: len(records(endpoint)) >= len(want), 30, "the matching entries")
    wait_pending(redis, stream, "g", 0)
    time.sleep(0.3)
    assert [index_of(rec) for _, rec in records(endpoint)] == want
    m = proc.metrics()
    assert m.get("esmd_filtered_out_events_total") == 32 - 11
    assert m.get("esmd_polled_events_total") == 32


# ---- failure handling (README "Failure handling") -------------------------------------------


def test_partial_batch_response_retries_from_the_first_failed_entry(redis, endpoint, esmd,
                                                                    redis_config, names):
    stream = names.topic()
    produce(redis, stream, 10)
    answered = []

    def behaviour(req):
        if not answered:
            failed = seq(req.json["Records"][3])
            answered.append(failed)
            return Response(200, {"batchItemFailures": [{"itemIdentifier": failed}]})
        return None

    endpoint.behaviour = behaviour
    esmd(redis_config(stream, batch_size=10, window="300ms",
                      mapping_extra={"report_batch_item_failures": True}))
    endpoint.wait_for(lambda: len(endpoint.snapshot()) >= 2, 30, "the retry")
    wait_pending(redis, stream, "g", 0)
    reqs = endpoint.snapshot()
    got = [[index_of(rec) for rec in r.json["Records"]] for r in reqs]
    assert got[0] == list(range(10))
    assert got[1] == list(range(3, 10)), got  # from the failed entry on, as Kinesis
    assert seq(reqs[1].json["Records"][0]) == answered[0]
    assert len(reqs) == 2


@pytest.mark.slow
def test_poison_entry_goes_to_a_redis_on_failure_stream(redis, endpoint, esmd, redis_config,
                                                        names):
    stream = names.topic()
    dlq = stream + "-failed"
    poison_id = None
    for i in range(10):
        eid = xadd(redis, stream, ("v", json.dumps({"i": i, "poison": i == 4})))
        if i == 4:
            poison_id = eid

    def behaviour(req):
        if any(json.loads(fields(r)["v"])["poison"] for r in req.json["Records"]):
            return Response(200, {"errorType": "Poison", "errorMessage": "cannot"},
                            headers=FUNCTION_ERROR)
        return None

    endpoint.behaviour = behaviour
    proc = esmd(redis_config(stream, batch_size=1, window="0ms", mapping_extra={
        "maximum_retry_attempts": 1, "on_failure": "redis://r/" + dlq}))
    endpoint.wait_for(lambda: len(delivered(endpoint)) >= 9, 60, "the 9 good entries")
    wait_for(lambda: redis.command("XLEN", dlq) >= 1, 60, 0.2, "the on-failure entry")
    wait_pending(redis, stream, "g", 0)
    time.sleep(0.5)
    assert sorted(delivered(endpoint)) == [i for i in range(10) if i != 4]
    entries = redis.command("XRANGE", dlq, "-", "+")
    assert len(entries) == 1, entries
    _, (field, value) = entries[0]
    assert field == "payload"
    fr = json.loads(value)
    ON_FAILURE.validate(fr)
    assert fr["requestContext"]["condition"] == "RetryAttemptsExhausted"
    assert fr["responseContext"]["functionError"] == "Unhandled"
    info = fr["RedisBatchInfo"]
    assert info["stream"] == stream and info["group"] == "g"
    assert info["startSequenceNumber"] == info["endSequenceNumber"] == poison_id
    # the kinesis record's eventSourceARN (the default event format)
    assert info["streamArn"] == "arn:aws:kinesis:us-east-1:000000000000:stream/%s" % stream
    # the payload is the entry itself as a one-record event: it can be replayed
    payload = fr["payload"]
    VALIDATOR.validate(payload)
    [rec] = payload["Records"]
    assert seq(rec) == poison_id
    assert json.loads(fields(rec)["v"]) == {"i": 4, "poison": True}
    # payloadSize counts the bytes esmd wrote (the raw text: a re-serialised float such as
    # 1796095358.430 would lose its trailing zero); payload is the record's last field
    raw = value.encode() if isinstance(value, str) else value
    start = raw.index(b'"payload":') + len(b'"payload":')
    assert raw.endswith(b"}") and info["payloadSize"] == len(raw[start:-1])
    assert proc.metrics().get("esmd_on_failure_events_total") == 1


def test_bisect_isolates_a_poison_entry(redis, endpoint, esmd, redis_config, names):
    """With bisecting, only the poison entry is given up; every other entry of its batch is
    delivered once its half succeeds, and the stream moves on."""
    stream = names.topic()
    dlq = stream + "-failed"
    for i in range(10):
        xadd(redis, stream, ("v", json.dumps({"i": i, "poison": i == 6})))

    def behaviour(req):
        if any(json.loads(fields(r)["v"])["poison"] for r in req.json["Records"]):
            return Response(200, {"errorType": "Poison", "errorMessage": "cannot"},
                            headers=FUNCTION_ERROR)
        return None

    endpoint.behaviour = behaviour
    proc = esmd(redis_config(stream, batch_size=10, window="200ms", mapping_extra={
        "maximum_retry_attempts": 0, "bisect_batch_on_function_error": True,
        "on_failure": "redis://r/" + dlq}))
    wait_for(lambda: redis.command("XLEN", dlq) >= 1, 60, 0.2, "the on-failure entry")
    wait_pending(redis, stream, "g", 0)
    time.sleep(0.5)
    assert sorted(delivered(endpoint)) == [i for i in range(10) if i != 6]
    assert all(n == 1 for n in delivered(endpoint).values())
    entries = redis.command("XRANGE", dlq, "-", "+")
    assert len(entries) == 1, entries
    fr = json.loads(entries[0][1][1])
    ON_FAILURE.validate(fr)
    [rec] = fr["payload"]["Records"]
    assert json.loads(fields(rec)["v"]) == {"i": 6, "poison": True}
    assert proc.metrics().get("esmd_batch_bisections_total") >= 3


@pytest.mark.parametrize("answer", [
    {"batchItemFailures": [{"itemIdentifier": "0-0"}]},
    {"batchItemFailures": [{"itemIdentifier": None}]},
    {"batchItemFailures": [{"id": "x"}]},
], ids=["unknown", "null", "wrong-key"])
def test_malformed_partial_batch_response_retries_the_whole_batch(redis, endpoint, esmd,
                                                                  redis_config, names, answer):
    stream = names.topic()
    produce(redis, stream, 4)
    endpoint.script([Response(200, answer)])
    esmd(redis_config(stream, batch_size=10, window="300ms",
                      mapping_extra={"report_batch_item_failures": True}))
    endpoint.wait_for(lambda: len(endpoint.snapshot()) >= 2, 30, "the retry")
    wait_pending(redis, stream, "g", 0)
    reqs = endpoint.snapshot()
    got = [[index_of(rec) for rec in r.json["Records"]] for r in reqs]
    assert got == [[0, 1, 2, 3], [0, 1, 2, 3]]


# ---- crashes, restarts, scaling out ---------------------------------------------------------


@pytest.mark.slow
def test_kill9_mid_batch_then_restart_delivers_everything(redis, endpoint, esmd, redis_config,
                                                          names):
    stream = names.topic()
    produce(redis, stream, 2000)
    endpoint.delay(0.05)
    proc = esmd(redis_config(stream, batch_size=50, window="100ms", event_format="native"),
                env={"ESMD_INSTANCE_ID": "crashy"})
    endpoint.wait_for(lambda: len(delivered(endpoint)) >= 500, 120, "500 entries")
    proc.kill9()
    before = delivered(endpoint)
    assert len(before) < 2000, "killed too late to mean anything"
    left_pending = pending(redis, stream, "g")
    assert left_pending > 0, "nothing was in flight at the kill"
    proc.start()
    wait_all_delivered(endpoint, 2000, timeout=120)
    wait_pending(redis, stream, "g", 0)
    # the entries that were pending at the kill came again from the PEL, counted
    counts = [rec["redis"]["deliveryCount"] for _, rec in records(endpoint)]
    assert max(counts) >= 2
    assert proc.stop() == 0


@pytest.mark.slow
def test_sigterm_under_load_then_restart_loses_nothing(redis, endpoint, esmd, redis_config,
                                                       names):
    stream = names.topic()
    produce(redis, stream, 5000)
    endpoint.delay(0.1)
    proc = esmd(redis_config(stream, batch_size=100, window="100ms", timeout="5s"),
                env={"ESMD_INSTANCE_ID": "graceful"})
    endpoint.wait_for(lambda: len(delivered(endpoint)) >= 1000, 120, "1000 entries")
    t0 = time.monotonic()
    assert proc.stop(signal.SIGTERM, timeout=15) == 0
    assert time.monotonic() - t0 < 5 + 5
    done_before = len(delivered(endpoint))
    assert done_before < 5000
    # what was delivered before the stop was acknowledged on the way out (but for the batch in
    # flight at the SIGTERM, which the core does not acknowledge even when it succeeds)
    assert pending(redis, stream, "g") <= 5000 - done_before + 100
    proc.start()
    wait_all_delivered(endpoint, 5000, timeout=180)
    wait_pending(redis, stream, "g", 0)
    assert proc.stop() == 0


@pytest.mark.slow
def test_redis_restart_under_load_reconnects_and_loses_nothing(endpoint, esmd, redis_config,
                                                               names):
    own = servers.Redis(persistent=True)
    try:
        stream = names.topic()
        produce(own, stream, 3000)
        endpoint.delay(0.02)
        proc = esmd(redis_config(stream, batch_size=50, window="50ms", server=own))
        endpoint.wait_for(lambda: len(delivered(endpoint)) >= 500, 120, "500 entries")
        own.stop()
        wait_for(lambda: proc.get("/readyz")[0] != 200, 15, 0.1, "/readyz to turn not ready")
        time.sleep(1.0)
        own.start()
        ready(proc, timeout=30)
        produce(own, stream, 1000, start=3000)
        wait_all_delivered(endpoint, 4000, timeout=180)
        wait_pending(own, stream, "g", 0)
        assert proc.running()
        # once more, with a crash of Redis (SIGKILL; the AOF is fsynced at every write)
        own.restart(signal.SIGKILL)
        produce(own, stream, 500, start=4000)
        wait_all_delivered(endpoint, 4500, timeout=120)
        wait_pending(own, stream, "g", 0)
        log = proc.log()
        assert "reconnecting" in log and "connected" in log
    finally:
        own.close()


@pytest.mark.slow
def test_two_processes_share_a_group_and_lose_nothing(redis, endpoint, esmd, redis_config,
                                                      names):
    stream = names.topic()
    endpoint.delay(0.01)
    cfg = redis_config(stream, batch_size=20, window="20ms")
    a = esmd(cfg, env={"ESMD_INSTANCE_ID": "esmd-a"})
    b = esmd(dict(cfg), env={"ESMD_INSTANCE_ID": "esmd-b"})
    ready(a)
    ready(b)
    produce(redis, stream, 4000)
    wait_all_delivered(endpoint, 4000, timeout=180)
    wait_pending(redis, stream, "g", 0)
    time.sleep(0.5)
    assert delivered(endpoint) == {i: 1 for i in range(4000)}, "an entry went to both"
    by = {}
    for req in endpoint.ok_requests():
        c = consumer_of(req)
        by[c] = by.get(c, 0) + len(req.json["Records"])
    assert set(by) == {"esmd-a", "esmd-b"}, by
    assert min(by.values()) >= 200, "one process did almost nothing: %s" % by


@pytest.mark.slow
def test_crashed_consumers_entries_are_reclaimed_after_visibility_timeout(redis, endpoint, esmd,
                                                                          redis_config, names):
    stream = names.topic()
    cfg = redis_config(stream, batch_size=10, window="20ms", visibility_timeout="2s",
                       event_format="native")
    holding = threading.Event()

    def behaviour(req):
        if consumer_of(req) == "victim" and not holding.is_set():
            holding.set()
        if consumer_of(req) == "victim":
            return Response(200, delay=30)  # never answered before the kill
        return None

    endpoint.behaviour = behaviour
    victim = esmd(cfg, env={"ESMD_INSTANCE_ID": "victim"})
    ready(victim)
    produce(redis, stream, 200)
    endpoint.wait_for(holding.is_set, 30, "the victim holding a batch")
    time.sleep(0.3)  # it reads on while its batch hangs
    victim.kill9()
    held = len(redis.command("XPENDING", stream, "g", "-", "+", "1000", "victim") or [])
    assert held > 0
    t_kill = time.monotonic()

    survivor = esmd(dict(cfg), env={"ESMD_INSTANCE_ID": "survivor"})
    wait_all_delivered(endpoint, 200, timeout=60)
    wait_pending(redis, stream, "g", 0)
    reclaimed = [(req, rec) for req, rec in records(endpoint)
                 if consumer_of(req) == "survivor" and rec["redis"]["deliveryCount"] >= 2]
    assert len(reclaimed) == held, (len(reclaimed), held)
    assert min(req.t_arrival for req, _ in reclaimed) - t_kill >= 1.5
    assert "reclaimed" in survivor.log()


@pytest.mark.slow
def test_a_live_consumers_failing_batch_is_not_reclaimed(redis, endpoint, esmd, redis_config,
                                                        names):
    """A consumer that keeps retrying a failing batch for longer than the visibility timeout keeps
    its entries (heartbeat XCLAIM): the other consumer does not take them over."""
    stream = names.topic()
    cfg = redis_config(stream, batch_size=10, window="20ms", visibility_timeout="1s",
                       event_format="native")
    t_fail_until = [None]

    def behaviour(req):
        if consumer_of(req) == "a" and time.monotonic() < t_fail_until[0]:
            return Response(500, {"message": "a is failing"})
        return None

    endpoint.behaviour = behaviour
    a = esmd(cfg, env={"ESMD_INSTANCE_ID": "a"})
    b = esmd(dict(cfg), env={"ESMD_INSTANCE_ID": "b"})
    ready(a)
    ready(b)
    time.sleep(0.3)
    t_fail_until[0] = time.monotonic() + 5.0  # five visibility timeouts
    for i in range(20):  # one at a time: the two blocked readers take turns
        produce(redis, stream, 1, start=i)
        time.sleep(0.05)
    wait_all_delivered(endpoint, 20, timeout=60)
    wait_pending(redis, stream, "g", 0)
    failed = [r for r in endpoint.snapshot() if not r.ok]
    assert failed and all(consumer_of(r) == "a" for r in failed), "a never failed"
    assert time.monotonic() >= t_fail_until[0]
    by = {}
    for req, rec in records(endpoint):
        by.setdefault(consumer_of(req), []).append(rec)
        assert rec["redis"]["deliveryCount"] == 1, (consumer_of(req), rec["redis"])
    assert set(by) == {"a", "b"}, by.keys()
    assert delivered(endpoint) == {i: 1 for i in range(20)}


def test_group_deleted_while_running_is_created_again(redis, endpoint, esmd, redis_config,
                                                      names):
    stream = names.topic()
    produce(redis, stream, 5)
    proc = esmd(redis_config(stream, starting_position="latest"))
    ready(proc)
    produce(redis, stream, 5, start=100)
    wait_all_delivered(endpoint, 5, start=100)
    assert sorted(delivered(endpoint)) == list(range(100, 105))
    redis.command("XGROUP", "DESTROY", stream, "g")
    wait_for(lambda: "NOGROUP" in proc.log(), 15, 0.1, "esmd to notice the group is gone")
    ready(proc)
    # the group is created again at the stream's end ($, starting_position latest): entries
    # added before that would be skipped, so wait for the group rather than a fixed time
    wait_for(lambda: any(g[1] == "g" for g in redis.command("XINFO", "GROUPS", stream)), 60, 0.1,
             "esmd to create the group again")
    produce(redis, stream, 5, start=200)
    wait_all_delivered(endpoint, 5, start=200)
    wait_pending(redis, stream, "g", 0)
    assert proc.running()


def test_readyz_follows_the_connection(endpoint, esmd, redis_config, names):
    port = servers.free_port()
    proc = esmd(redis_config(names.topic(), url="redis://127.0.0.1:%d/0" % port))
    time.sleep(1.0)
    status, body = proc.get("/readyz")
    assert status != 200
    assert "cannot connect" in body or "connect" in body, body


def test_golden_events_match_the_schema():
    """The unit tests' golden events (tests/unit/data/redis/) are valid by the event schema."""
    data = os.path.join(servers.ROOT, "tests", "unit", "data", "redis")
    names = sorted(n for n in os.listdir(data) if n.endswith(".json"))
    assert names
    for name in names:
        with open(os.path.join(data, name)) as f:
            VALIDATOR.validate(json.load(f))
    bad = {"Records": [{"redis": {"redisSchemaVersion": "1.0", "stream": "s",
                                  "sequenceNumber": "1-x", "approximateArrivalTimestamp": 0.001,
                                  "deliveryCount": 0, "fields": {}},
                        "eventSource": "esmd:redis", "eventVersion": "1.0", "eventID": "s:1-0",
                        "eventName": "esmd:redis:record",
                        "eventSourceARN": "arn:esmd:redis:h:6379/0:stream/s"}]}
    assert not VALIDATOR.is_valid(bad)
    native = jsonschema.Draft202012Validator({"$defs": SCHEMA["$defs"], "$ref": "#/$defs/record"})
    errors = sorted(e.message for e in native.iter_errors(bad["Records"][0]))
    assert len(errors) == 2, errors  # the ID, the delivery count
    kinesis = jsonschema.Draft202012Validator(
        {"$defs": SCHEMA["$defs"], "$ref": "#/$defs/kinesis_record"})
    good = {"kinesis": {"kinesisSchemaVersion": "1.0", "partitionKey": "1-0",
                        "sequenceNumber": "1-0", "data": "e30=",
                        "approximateArrivalTimestamp": 0.001},
            "eventSource": "aws:kinesis", "eventVersion": "1.0",
            "eventID": "shardId-000000000000:1-0", "eventName": "aws:kinesis:record",
            "invokeIdentityArn": "arn:aws:iam::000000000000:role/esmd", "awsRegion": "us-east-1",
            "eventSourceARN": "arn:aws:kinesis:us-east-1:000000000000:stream/s"}
    kinesis.validate(good)
    VALIDATOR.validate({"Records": [good]})
    bad_k = json.loads(json.dumps(good))
    bad_k["kinesis"]["data"] = "not base64!"
    bad_k["awsRegion"] = "local"
    errors = sorted(e.message for e in kinesis.iter_errors(bad_k))
    assert len(errors) == 2, errors  # the data, the region


# ---- configuration --------------------------------------------------------------------------


def check_config(path):
    return subprocess.run([servers.binary("esmd"), "check-config", str(path)],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=30)


def test_bad_redis_source_config_is_refused_with_clear_messages(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("""\
postgres: postgresql://esmd@127.0.0.1:5432/esmd
connections:
  r: { type: redis, url: "redis://127.0.0.1:6379/0" }
  k: { type: kafka, bootstrap_servers: "127.0.0.1:9092" }
functions:
  fn: { url: "http://127.0.0.1:8080/" }
mappings:
  - name: unknown-connection
    function: fn
    source: { redis: nope, stream: s, group: g }
  - name: kafka-connection
    function: fn
    source: { redis: k, stream: s, group: g }
  - name: no-stream
    function: fn
    source: { redis: r, group: g }
  - name: vt-short
    function: fn
    source: { redis: r, stream: s, group: g, visibility_timeout: 500ms }
  - name: vt-long
    function: fn
    source: { redis: r, stream: s, group: g, visibility_timeout: 13h }
  - name: at-timestamp
    function: fn
    source: { redis: r, stream: s, group: g, starting_position: at_timestamp }
  - name: empty-group
    function: fn
    source: { redis: r, stream: s, group: "" }
""")
    r = check_config(cfg)
    assert r.returncode == 1, r.stdout
    lines = r.stderr.splitlines()
    text = r.stderr

    def has(lineno, *parts):
        for line in lines:
            if line.startswith("%s:%d:" % (cfg, lineno)) and all(p in line for p in parts):
                return True
        raise AssertionError("no error on line %d with %s in:\n%s" % (lineno, parts, text))

    has(10, "mappings[0].source.redis", '"nope"', "not defined")
    has(13, "mappings[1].source.redis", "kafka")
    has(16, "mappings[2].source", "stream")
    has(19, "visibility_timeout", "1s")
    has(22, "visibility_timeout", "12h")
    has(25, "starting_position", "trim_horizon", "latest")
    has(28, "group")


def test_run_refuses_an_unusable_redis_url(tmp_path, postgres):
    cfg = tmp_path / "tls.yaml"
    cfg.write_text("""\
postgres: %s
admin: { listen: "127.0.0.1:%d" }
connections:
  r: { type: redis, url: "rediss://127.0.0.1:6379/0" }
functions:
  fn: { url: "http://127.0.0.1:8080/" }
mappings:
  - { name: m, function: fn, source: { redis: r, stream: s, group: g } }
""" % (postgres.url, servers.free_port()))
    r = subprocess.run([servers.binary("esmd"), "run", "-c", str(cfg)], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True, timeout=30)
    assert r.returncode != 0
    assert "rediss://" in r.stderr and "TLS" in r.stderr, r.stderr[-2000:]


def test_disabled_mapping_reads_nothing_until_enabled(redis, endpoint, esmd, redis_config,
                                                      names):
    """A mapping disabled in its configuration reads nothing from its stream: before, the pause
    it asked for while its shard was being opened was dropped (the connector did not know the
    shard yet), so it read the stream into memory and into its consumer's pending entries,
    waiting for batches that a disabled mapping never forms. Enabled, it delivers everything."""
    from test_parallel import admin_post

    stream = names.topic()
    produce(redis, stream, 2000, size=100)
    cfg = redis_config(stream, mapping_extra={"enabled": False})
    name = cfg["mappings"][0]["name"]
    proc = esmd(cfg)
    ready(proc)
    time.sleep(2.0)  # what XREADGROUP would read has arrived by now
    assert proc.metrics().get("esmd_polled_events_total") == 0
    assert pending(redis, stream, "g") == 0
    assert records(endpoint, ok_only=False) == []
    assert admin_post(proc, "/admin/mappings/%s/resume" % name)[0] == 200
    wait_all_delivered(endpoint, 2000)
    wait_pending(redis, stream, "g", 0)
