"""A real Lambda runtime behind esmd (issue 11): handlers written as Lambda users write them,
with aws-lambda-powertools, run by awslambdaric under the Runtime Interface Emulator
(lambda_rie.py), invoked by esmd's mappings and its async queue.

Each handler records what it got and what it decided (lambda_handlers/_record.py); the tests
assert on those records, on what esmd did with the answers (redeliveries, what is left in the
source, destination records), and that Powertools' own parser models accept esmd's events."""

import base64
import json
import os
import subprocess
import threading
import time

import pytest
import requests

import servers
from endpoint import Endpoint
from lambda_rie import Rie, function
from servers import wait_for

TOKEN = "rie-test-token"
FAST_ASYNC = {"retry_base": "300ms", "backoff_base": "100ms", "backoff_cap": "400ms",
              "poll_interval": "100ms"}  # async_queue (docs/configuration.md)


def fast_async(cfg):
    """cfg with the async queue's retry delays and poll interval shortened."""
    return dict(cfg, async_queue=FAST_ASYNC)


# ---- fixtures ---------------------------------------------------------------------------------


@pytest.fixture
def rie(request):
    """rie(handler, **kw) -> lambda_rie.Rie, closed at teardown (its log printed on failure)."""
    started = []

    def make(handler, **kw):
        r = Rie(handler, **kw)
        started.append(r)
        return r

    yield make
    rep = getattr(request.node, "rep_call", None)
    for r in started:
        if rep is None or rep.failed:
            print("\n==== aws-lambda-rie %s, last lines ====\n%s" % (
                r.handler, "\n".join(r.log().splitlines()[-60:])))
        r.close()


@pytest.fixture
def sink():
    """A recording endpoint used as an http:// destination."""
    ep = Endpoint()
    yield ep
    ep.close()


@pytest.fixture
def db(postgres, request):
    name = "rie_%s_%d" % (request.node.name.lower()[-30:], os.getpid())
    name = "".join(c if c.isalnum() or c == "_" else "_" for c in name)
    return postgres.create_db(name), name


def migrate(dsn, tmp_path):
    """esmd's migrations on dsn (esmd run does it too, but the queue's SQL functions are needed
    before esmd starts, so that the messages are there for its first claim)."""
    cfg = tmp_path / "migrate.yaml"
    cfg.write_text("postgres: %s\nfunctions: { fn: { url: 'http://127.0.0.1:9/' } }\n"
                   "mappings: [{ name: m, function: fn, source: { pgqueue: q } }]\n" % dsn)
    r = subprocess.run([servers.binary("esmd"), "migrate", "-c", str(cfg)],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60)
    assert r.returncode == 0, r.stderr


def invoke_event(proc, payload, fn="fn"):
    r = requests.post("%s/2015-03-31/functions/%s/invocations" % (proc.admin, fn),
                      data=json.dumps(payload).encode(),
                      headers={"X-Amz-Invocation-Type": "Event",
                               "Authorization": "Bearer " + TOKEN}, timeout=30)
    assert r.status_code == 202, r.text
    return r.headers["x-amzn-RequestId"]


def async_config(db, rie_, async_block, timeout="10s"):
    fn = function(rie_, timeout=timeout)
    fn["async"] = async_block
    return {"postgres": db[0], "admin": {"token": TOKEN}, "functions": {"fn": fn}}


def sink_records(sink):
    return [json.loads(r.body) for r in sink.snapshot()]


# ---- the RIE itself ----------------------------------------------------------------------------


def test_rie_answers_and_serves_one_invocation_at_a_time(rie):
    """What the documentation says of the RIE: results, errors and timeouts come back as 200
    (errors as {errorType, errorMessage} without X-Amz-Function-Error, timeouts as plain text),
    and a request that arrives while another runs is not served."""
    r = rie("async_handler.handler", timeout=1)
    ok = requests.post(r.url, json={"id": "a"}, timeout=20)
    assert ok.status_code == 200 and ok.json() == {"ok": "a", "attempt": 1}
    err = requests.post(r.url, json={"id": "b", "fail_times": 1}, timeout=20)
    assert err.status_code == 200, err.text
    assert "x-amz-function-error" not in {k.lower() for k in err.headers}
    assert err.json()["errorType"] == "OrderFailed"
    assert err.json()["errorMessage"] == "attempt 1 of event b failed"
    slow = requests.post(r.url, json={"id": "c", "sleep": 3}, timeout=20)
    assert slow.status_code == 200
    assert slow.text == "Task timed out after 1.00 seconds"
    again = requests.post(r.url, json={"id": "d"}, timeout=20)  # the runtime is started again
    assert again.json() == {"ok": "d", "attempt": 1}

    answers = {}

    def call(name, payload):
        try:
            resp = requests.post(r.url, json=payload, timeout=10)
            answers[name] = (resp.status_code, resp.text)
        except requests.RequestException as e:
            answers[name] = (None, type(e).__name__)

    first = threading.Thread(target=call, args=("first", {"id": "e", "sleep": 0.5}))
    first.start()
    time.sleep(0.2)
    call("second", {"id": "f"})
    first.join()
    # The second request is never answered with the function's result; with this RIE build it is
    # refused and the RIE itself goes down (ReserveFailed, then a panic).
    assert answers["second"][0] != 200, answers
    assert [x["event"]["id"] for x in r.records()].count("f") == 0, r.records()


# ---- the async queue --------------------------------------------------------------------------


def test_async_handler_exception_retried_then_on_failure_and_dead_letter(rie, esmd, postgres, db,
                                                                         sink):
    r = rie("async_handler.handler")
    proc = esmd(fast_async(async_config(db, r, {"maximum_retry_attempts": 1,
                                                "on_failure": sink.url,
                                                "dead_letter": "pgqueue://fn_dlq"})))
    payload = {"id": "e1", "fail_times": 99, "order": [1, 2]}
    rid = invoke_event(proc, payload)
    wait_for(lambda: sink.snapshot(), 60, 0.1, "the on-failure record")
    time.sleep(0.5)

    calls = r.records()
    assert [c["event"] for c in calls] == [payload, payload]  # 1 + maximum_retry_attempts
    assert [c["attempt"] for c in calls] == [1, 2]
    assert len({c["request_id"] for c in calls}) == 2  # each attempt is a new invocation
    recs = sink_records(sink)
    assert len(recs) == 1, recs
    rec = recs[0]
    assert rec["requestContext"]["requestId"] == rid
    assert rec["requestContext"]["condition"] == "RetriesExhausted"
    assert rec["requestContext"]["approximateInvokeCount"] == 2
    assert rec["requestPayload"] == payload
    # Lambda: an exception the handler did not catch is functionError "Unhandled"
    assert rec["responseContext"] == {"statusCode": 200, "executedVersion": "$LATEST",
                                      "functionError": "Unhandled"}, rec["responseContext"]
    assert rec["responsePayload"]["errorType"] == "OrderFailed"
    assert rec["responsePayload"]["errorMessage"] == "attempt 2 of event e1 failed"
    rows = []
    wait_for(lambda: rows.extend(postgres.sql(
        "SELECT body, attributes FROM esmd.queue_messages WHERE queue = 'fn_dlq'", db[1])) or rows,
        30, 0.1, "the dead letter")
    assert json.loads(rows[0][0]) == payload
    attrs = json.loads(rows[0][1])
    assert attrs["RequestID"]["stringValue"] == rid
    assert attrs["ErrorCode"]["stringValue"] == "200"
    assert attrs["ErrorMessage"]["stringValue"] == "attempt 2 of event e1 failed"
    m = proc.metrics()
    assert m.get("esmd_async_events_dropped_total", function="fn", reason="RetriesExhausted") == 1


def test_async_handler_fails_once_then_succeeds(rie, esmd, db, sink):
    r = rie("async_handler.handler")
    proc = esmd(fast_async(async_config(db, r, {"maximum_retry_attempts": 2,
                                                "on_success": sink.url,
                                                "on_failure": sink.url})))
    payload = {"id": "e2", "fail_times": 1}
    rid = invoke_event(proc, payload)
    wait_for(lambda: sink.snapshot(), 60, 0.1, "the success record")
    time.sleep(0.5)
    assert [c["attempt"] for c in r.records()] == [1, 2]
    recs = sink_records(sink)
    assert len(recs) == 1, recs
    assert recs[0]["requestContext"]["condition"] == "Success"
    assert recs[0]["requestContext"]["requestId"] == rid
    assert recs[0]["requestContext"]["approximateInvokeCount"] == 2
    assert recs[0]["responseContext"] == {"statusCode": 200, "executedVersion": "$LATEST"}
    assert recs[0]["responsePayload"] == {"ok": "e2", "attempt": 2}


def test_async_rie_timeout_is_a_retried_failure(rie, esmd, db, sink):
    """AWS_LAMBDA_FUNCTION_TIMEOUT=1 and a handler that sleeps 3 s: the RIE answers 200 with the
    text `Task timed out after 1.00 seconds` (and restarts the runtime); esmd takes that as a
    timeout, which for the async queue is a function error: retried, then RetriesExhausted."""
    r = rie("async_handler.handler", timeout=1)
    proc = esmd(fast_async(async_config(db, r, {"maximum_retry_attempts": 1,
                                                "on_failure": sink.url})))
    payload = {"id": "slow", "sleep": 3}
    rid = invoke_event(proc, payload)
    wait_for(lambda: sink.snapshot(), 60, 0.1, "the on-failure record")
    time.sleep(0.5)
    assert [c["attempt"] for c in r.records()] == [1, 2]
    rec = sink_records(sink)[0]
    assert rec["requestContext"]["requestId"] == rid
    assert rec["requestContext"]["condition"] == "RetriesExhausted"
    assert rec["requestContext"]["approximateInvokeCount"] == 2
    assert rec["responseContext"] == {"statusCode": 200, "executedVersion": "$LATEST",
                                      "functionError": "Unhandled"}, rec["responseContext"]
    # Lambda's payload for a timeout is {"errorMessage": "<time> <request id> Task timed out
    # after 1.00 seconds"}; the RIE's text carries the duration, esmd must keep it.
    msg = rec["responsePayload"]["errorMessage"]
    assert msg.endswith("Task timed out after 1.00 seconds"), rec["responsePayload"]
    m = proc.metrics()
    assert m.get("esmd_invocations_total", function="fn") >= 2


def test_async_burst_through_one_rie_with_max_concurrency_1(rie, esmd, db, sink):
    r = rie("async_handler.handler")
    proc = esmd(fast_async(async_config(db, r, {"maximum_retry_attempts": 0,
                                                "on_success": sink.url,
                                                "on_failure": sink.url})))
    n = 20
    for i in range(n):
        invoke_event(proc, {"id": "b%d" % i, "sleep": 0.05})
    wait_for(lambda: len(sink.snapshot()) >= n, 90, 0.1, "%d records" % n)
    conds = [x["requestContext"]["condition"] for x in sink_records(sink)]
    assert conds == ["Success"] * n, conds
    assert sorted(c["event"]["id"] for c in r.records()) == sorted("b%d" % i for i in range(n))
    assert r.alive(), "the RIE went down"
    assert "AlreadyReserved" not in r.log()


# ---- Postgres queue: SQS batch processing -----------------------------------------------------


def test_pgqueue_sqs_batch_processor_partial_failures(rie, esmd, postgres, db, tmp_path):
    migrate(db[0], tmp_path)
    r = rie("sqs_handler.handler")
    q = "orders"
    bodies = [{"i": i, "fail": 1} if i in (1, 4) else {"i": i} for i in range(6)]
    postgres.sql("SELECT count(*) FROM esmd.send_batch('%s', ARRAY[%s])" % (
        q, ",".join("'%s'" % json.dumps(b) for b in bodies)), db[1])
    cfg = {"postgres": db[0], "functions": {"fn": function(r, timeout="2s")},
           "mappings": [{"name": "sqs", "function": "fn", "batch_size": 10,
                         "maximum_batching_window": "500ms", "report_batch_item_failures": True,
                         "source": {"pgqueue": q, "visibility_timeout": "2s",
                                    "maximum_concurrency": 2, "max_receive_count": 5,
                                    "dead_letter_queue": q + "_dlq"}}]}
    esmd(cfg)

    def left():
        return int(postgres.sql("SELECT count(*) FROM esmd.queue_messages WHERE queue = '%s'"
                                % q, db[1])[0][0])

    wait_for(lambda: left() == 0, 60, 0.2, "the queue to be empty")
    time.sleep(0.5)
    calls = r.records()
    delivered = {}
    for c in calls:
        for rec in c["event"]["Records"]:
            i = json.loads(rec["body"])["i"]
            delivered.setdefault(i, []).append(rec["attributes"]["ApproximateReceiveCount"])
    assert delivered == {0: ["1"], 1: ["1", "2"], 2: ["1"], 3: ["1"], 4: ["1", "2"], 5: ["1"]}
    first = calls[0]
    ids = {json.loads(x["body"])["i"]: x["messageId"] for x in first["event"]["Records"]}
    assert len(first["event"]["Records"]) == 6
    assert first["result"] == {"batchItemFailures": [{"itemIdentifier": ids[1]},
                                                     {"itemIdentifier": ids[4]}]}
    assert all(c["result"] == {"batchItemFailures": []} for c in calls[1:])
    # the redelivered messages are the same SQS messages
    again = {x["messageId"] for c in calls[1:] for x in c["event"]["Records"]}
    assert again == {ids[1], ids[4]}
    assert int(postgres.sql("SELECT count(*) FROM esmd.queue_messages WHERE queue = '%s_dlq'"
                            % q, db[1])[0][0]) == 0
    # Powertools' parser accepts esmd's SQS event as it is
    assert all(c["model_errors"] is None for c in calls), [c["model_errors"] for c in calls]


# ---- Kafka: Powertools' Kafka consumer --------------------------------------------------------


def test_kafka_powertools_consumer_decodes_records_unchanged(rie, esmd, kafka, postgres, names):
    r = rie("kafka_handler.handler")
    topic = kafka.create_topic(names.topic(), 2)
    produced = [
        {"partition": 0, "key": "order-1", "value": json.dumps({"type": "created", "n": 1}),
         "headers": [["source", "web"], ["trace", "ë-1"]]},
        {"partition": 1, "key": "order-2", "value": json.dumps({"type": "paid", "amount": 1.5}),
         "headers": []},
        {"partition": 0, "value": json.dumps([1, "two", None])},  # no key
    ]
    kafka.produce(topic, produced)
    cfg = {"postgres": postgres.url,
           "connections": {"k": {"type": "kafka", "bootstrap_servers": kafka.bootstrap}},
           "functions": {"fn": function(r)},
           "mappings": [{"name": names.mapping(), "function": "fn", "batch_size": 10,
                         "maximum_batching_window": "1s",
                         "source": {"kafka": "k", "topics": [topic],
                                    "consumer_group": names.group(),
                                    "starting_position": "trim_horizon"}}]}
    esmd(cfg)
    wait_for(lambda: sum(len(c["decoded"]) for c in r.records()) >= 3, 60, 0.1,
             "3 records at the handler")
    time.sleep(0.5)
    calls = r.records()
    assert all(c["model_errors"] is None for c in calls), [c["model_errors"] for c in calls]
    assert all(c["data_class_error"] is None for c in calls), [c["data_class_error"]
                                                                for c in calls]
    assert all(c["event_source"] == "SelfManagedKafka" for c in calls)
    assert all(c["bootstrap_servers"] == kafka.bootstrap for c in calls)
    got = sorted((d for c in calls for d in c["decoded"]), key=lambda d: (d["partition"],
                                                                            d["offset"]))
    assert [d.get("error") for d in got] == [None] * 3, got
    want = sorted(({"partition": p["partition"], "key": p.get("key"),
                    "value": json.loads(p["value"]),
                    "headers": dict(p.get("headers") or [])} for p in produced),
                  key=lambda d: d["partition"])
    assert [{k: d[k] for k in ("partition", "key", "value", "headers")} for d in got] == want
    assert [(d["partition"], d["offset"]) for d in got] == [(0, 0), (0, 1), (1, 0)]
    assert all(d["topic"] == topic and d["timestamp_type"] == "CREATE_TIME" for d in got)
    dc = sorted((d for c in calls for d in c["data_class"]),
                key=lambda d: (d["partition"], d["offset"]))
    assert [d["json_value"] for d in dc] == [w["value"] for w in want]
    assert [d["headers"] for d in dc] == [w["headers"] for w in want]


# ---- Redis stream: Kinesis batch processing ---------------------------------------------------


def test_redis_kinesis_batch_processor_partial_failures(rie, esmd, redis, postgres, names):
    r = rie("kinesis_handler.handler")
    stream = names.topic()
    entries = []
    for i in range(5):
        fields = ["i", str(i)] + (["fail", "1"] if i == 2 else [])
        entries.append(redis.command("XADD", stream, "*", *fields))
    cfg = {"postgres": postgres.url,
           "connections": {"r": {"type": "redis", "url": redis.url}},
           "functions": {"fn": function(r)},
           "mappings": [{"name": names.mapping(), "function": "fn", "batch_size": 10,
                         "maximum_batching_window": "500ms", "report_batch_item_failures": True,
                         "source": {"redis": "r", "stream": stream, "group": "g",
                                    "starting_position": "trim_horizon"}}]}
    esmd(cfg)
    wait_for(r.records, 30, 0.1, "the first invocation")
    shape = r.records()[0]["event"]["Records"][0]
    assert shape.get("eventSource") == "aws:kinesis" and "kinesis" in shape, shape
    wait_for(lambda: redis.command("XPENDING", stream, "g")[0] == 0 and len(r.records()) >= 2,
             60, 0.2, "every entry acknowledged")
    time.sleep(0.5)
    calls = r.records()
    assert all(c["model_errors"] is None for c in calls), [c["model_errors"] for c in calls]
    assert all(c["event"]["Records"][0].get("eventSource") == "aws:kinesis" for c in calls)
    first = calls[0]
    assert [x["kinesis"]["sequenceNumber"] for x in first["event"]["Records"]] == entries
    assert first["result"] == {"batchItemFailures": [{"itemIdentifier": entries[2]}]}
    # Kinesis semantics: the batch is retried from the first failed record, so entries 2..4
    # come again and 0, 1 do not.
    again = [x["kinesis"]["sequenceNumber"] for c in calls[1:] for x in c["event"]["Records"]]
    assert again == entries[2:], again
    assert all(c["result"] == {"batchItemFailures": []} for c in calls[1:])


def test_kafka_powertools_batch_processor_partial_failures(rie, esmd, kafka, postgres, names):
    """BatchProcessor(EventType.Kafka) answers {"itemIdentifier": {"partition": "topic-N",
    "offset": n}}: esmd commits the partition below that record and sends it again from there;
    the other partition is not sent again."""
    r = rie("kafka_batch_handler.handler")
    topic = kafka.create_topic(names.topic(), 2)
    group = names.group()
    kafka.produce(topic, [{"partition": 0, "value": json.dumps(
        {"i": i, "fail": 1} if i == 2 else {"i": i})} for i in range(5)] +
        [{"partition": 1, "value": json.dumps({"i": 10 + i})} for i in range(2)])
    cfg = {"postgres": postgres.url,
           "connections": {"k": {"type": "kafka", "bootstrap_servers": kafka.bootstrap}},
           "functions": {"fn": function(r)},
           "mappings": [{"name": names.mapping(), "function": "fn", "batch_size": 10,
                         "maximum_batching_window": "1s", "report_batch_item_failures": True,
                         "source": {"kafka": "k", "topics": [topic], "consumer_group": group,
                                    "starting_position": "trim_horizon"}}]}
    proc = esmd(cfg)
    wait_for(lambda: any(c.get("result") == {"batchItemFailures": []} and
                         any(d["partition"] == 0 and d["offset"] == 2 for d in c["delivered"])
                         for c in r.records()), 60, 0.1, "the failed record delivered again")
    time.sleep(1.5)
    calls = r.records()
    assert all("error" not in c for c in calls), [c.get("error") for c in calls]
    sent = [(d["partition"], d["offset"]) for c in calls for d in c["delivered"]]
    failures = [f for c in calls for f in c["result"]["batchItemFailures"]]
    assert failures == [{"itemIdentifier": {"partition": "%s-0" % topic, "offset": 2}}]
    # partition 0 again from the failed record on (3 and 4 too when they were in its batch);
    # nothing before it, nothing of partition 1
    times = {k: sent.count(k) for k in set(sent)}
    assert set(times) == {(0, 0), (0, 1), (0, 2), (0, 3), (0, 4), (1, 0), (1, 1)}, sent
    assert times[(0, 0)] == times[(0, 1)] == times[(1, 0)] == times[(1, 1)] == 1, sent
    assert times[(0, 2)] == 2 and times[(0, 3)] in (1, 2) and times[(0, 4)] in (1, 2), sent
    again = sent.index((0, 2), sent.index((0, 2)) + 1)
    assert [o for p, o in sent[again:] if p == 0] == [2, 3, 4], sent
    proc.stop()
    assert kafka.committed(group, topic) == {0: 5, 1: 2}


# ---- synchronous Invoke through esmd, with boto3 ----------------------------------------------


def test_sync_invoke_with_boto3_result_error_and_timeout(rie, esmd, db):
    """RequestResponse through esmd's Invoke to the RIE, read by boto3 as Lambda's answers: the
    result; a handler exception as FunctionError Unhandled with the RIE's error object; a run past
    AWS_LAMBDA_FUNCTION_TIMEOUT as FunctionError Unhandled with Lambda's Sandbox.Timedout."""
    import boto3
    from botocore.config import Config

    r = rie("async_handler.handler", timeout=1)
    cfg = {"postgres": db[0],
           "admin": {"aws_credentials": {"access_key_id": "AKIDRIE",
                                         "secret_access_key": "rie-secret"}},
           "functions": {"fn": function(r, timeout="10s")}}
    proc = esmd(cfg)
    client = boto3.client("lambda", endpoint_url=proc.admin, region_name="us-east-1",
                          aws_access_key_id="AKIDRIE", aws_secret_access_key="rie-secret",
                          config=Config(retries={"max_attempts": 1}, read_timeout=30))

    ok = client.invoke(FunctionName="fn", Payload=json.dumps({"id": "s1"}))
    assert ok["StatusCode"] == 200 and "FunctionError" not in ok
    assert ok["ExecutedVersion"] == "$LATEST"
    assert json.loads(ok["Payload"].read()) == {"ok": "s1", "attempt": 1}

    err = client.invoke(FunctionName="fn", Payload=json.dumps({"id": "s2", "fail_times": 1}))
    assert err["StatusCode"] == 200 and err["FunctionError"] == "Unhandled"
    body = json.loads(err["Payload"].read())
    assert body["errorType"] == "OrderFailed"
    assert body["errorMessage"] == "attempt 1 of event s2 failed"
    assert isinstance(body["stackTrace"], list)

    slow = client.invoke(FunctionName="fn", Payload=json.dumps({"id": "s3", "sleep": 3}))
    assert slow["StatusCode"] == 200 and slow["FunctionError"] == "Unhandled"
    body = json.loads(slow["Payload"].read())
    assert body["errorType"] == "Sandbox.Timedout"
    assert body["errorMessage"].endswith("Task timed out after 1.00 seconds"), body
    assert [c["event"]["id"] for c in r.records()] == ["s1", "s2", "s3"]
