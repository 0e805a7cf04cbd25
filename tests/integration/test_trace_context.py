"""Trace context (docs/operations.md#trace-context): W3C traceparent/tracestate and X-Ray's
X-Amzn-Trace-Id from where they arrive — Kafka record headers, the Postgres queue's trace header
(SQS's AWSTraceHeader), Invoke's request headers — to the function request, into the SQS event's
attributes.AWSTraceHeader, and onto esmd's log lines about the batch or event."""
import json
import time

from endpoint import Response
from servers import wait_for
from test_async_e2e import config as async_config, db, fast, invoke, wait  # noqa: F401
from test_pgqueue_e2e import lit, pgq_config, queues, ready  # noqa: F401

TP_A = "00-5759e988bd862e3fe1be46a994272793-53995c3f42cd8ad8-01"
XRAY_A = "Root=1-5759e988-bd862e3fe1be46a994272793;Parent=53995c3f42cd8ad8;Sampled=1"
ID_A = "5759e988bd862e3fe1be46a994272793"
TP_B = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"
ID_B = "0af7651916cd43dd8448eb211c80319c"


def signed(s):
    """A Kafka header value as the event writes it: an array of signed bytes."""
    return [b - 256 if b > 127 else b for b in s.encode()]


def test_kafka_headers_reach_the_function_and_the_log(kafka, endpoint, esmd, kafka_config,
                                                      names):
    topic = kafka.create_topic(names.topic(), 1)
    # one batch with records of two traces, and one record with none
    kafka.produce(topic, [
        {"partition": 0, "value": "a", "headers": [["traceparent", TP_A],
                                                   ["tracestate", "congo=t61rcWkgMzE"]]},
        {"partition": 0, "value": "b", "headers": [["traceparent", TP_B]]},
        {"partition": 0, "value": "c"},
    ])
    endpoint.fail_first(1)  # a retry: its log line names the batch's trace
    proc = esmd(kafka_config(topic, batch_size=10, window="500ms"))
    endpoint.wait_records(3)
    reqs = endpoint.ok_requests()
    assert len(reqs) == 1, [r.headers for r in reqs]
    h = reqs[0].headers
    # the batch goes with its first traced record's context; X-Ray's form is derived from it
    assert h.get("traceparent") == TP_A
    assert h.get("tracestate") == "congo=t61rcWkgMzE"
    assert h.get("x-amzn-trace-id") == XRAY_A
    # each record keeps its own headers in the event
    recs = reqs[0].json["records"][topic + "-0"]
    assert recs[0]["headers"][0] == {"traceparent": signed(TP_A)}
    assert recs[1]["headers"] == [{"traceparent": signed(TP_B)}]
    assert recs[2]["headers"] == []
    retry = [e for e in proc.log_lines() if "retrying" in e.get("msg", "")]
    assert retry and retry[0].get("trace_id") == ID_A, retry


def test_kafka_malformed_traceparent_is_not_sent(kafka, endpoint, esmd, kafka_config, names):
    topic = kafka.create_topic(names.topic(), 1)
    kafka.produce(topic, [{"partition": 0, "value": "a",
                           "headers": [["traceparent", "00-zz-not-a-trace-01"],
                                       ["X-Amzn-Trace-Id", "Root=bad"]]}])
    esmd(kafka_config(topic, batch_size=10, window="100ms"))
    endpoint.wait_records(1)
    h = endpoint.ok_requests()[0].headers
    assert "traceparent" not in h and "x-amzn-trace-id" not in h and "tracestate" not in h, h


def test_pgqueue_trace_header_in_attributes_and_on_the_request(queues, endpoint, esmd,
                                                               pgq_config, pgq_schema):
    q = queues()
    # the sender's setting applies to what it sends in that transaction, as SQS's header does
    pgq_schema.sql("BEGIN; SELECT set_config('esmd.trace_header', %s, true); "
                   "SELECT esmd.send(%s, 'traced'); COMMIT" % (lit(XRAY_A), lit(q.name)))
    q.send("plain")
    endpoint.fail_first(1)
    proc = esmd(pgq_config(q.name, batch_size=10, window="300ms", visibility="1s", timeout="1s"))
    wait_for(lambda: len(endpoint.ok_requests()) >= 1, 60, 0.05, "a delivered batch")
    time.sleep(0.5)
    by_body = {}
    for req in endpoint.ok_requests():
        for r in req.json["Records"]:
            by_body[r["body"]] = (r, req.headers)
    rec, h = by_body["traced"]
    assert rec["attributes"]["AWSTraceHeader"] == XRAY_A
    assert h.get("x-amzn-trace-id") == XRAY_A
    assert h.get("traceparent") == TP_A
    plain, _ = by_body["plain"]
    assert "AWSTraceHeader" not in plain["attributes"]
    failed = [e for e in proc.log_lines() if "left for redelivery" in e.get("msg", "")]
    assert failed and failed[0].get("trace_id") == ID_A, failed


def test_async_invoke_carries_trace_headers(esmd, db, endpoint):  # noqa: F811
    endpoint.fail_first(1, status=500)  # a retried attempt sends them again
    proc = esmd(fast(async_config(db, endpoint)))
    r = invoke(proc, "fn", {"n": 1}, headers={"traceparent": TP_B, "tracestate": "k=v"})
    assert r.status_code == 202, r.text
    wait(lambda: len(endpoint.ok_requests()) >= 1, what="the event delivered after a retry")
    r = invoke(proc, "fn", {"n": 2}, headers={"X-Amzn-Trace-Id": XRAY_A})
    assert r.status_code == 202, r.text
    wait(lambda: len(endpoint.ok_requests()) >= 2, what="both events delivered")
    by_n = {json.loads(q.body)["n"]: q.headers for q in endpoint.snapshot()}
    assert by_n[1].get("traceparent") == TP_B and by_n[1].get("tracestate") == "k=v"
    assert by_n[1].get("x-amzn-trace-id") == (
        "Root=1-0af76519-16cd43dd8448eb211c80319c;Parent=b7ad6b7169203331;Sampled=0")
    assert by_n[2].get("x-amzn-trace-id") == XRAY_A
    assert by_n[2].get("traceparent") == TP_A
    attempts = [q for q in endpoint.snapshot() if q.headers.get("traceparent") == TP_B]
    assert len(attempts) == 2, "the failed attempt and its retry both carry the trace"
    lines = [e for e in proc.log_lines() if e.get("trace_id") == ID_B]
    assert lines, "no log line names the failed event's trace"


def test_trace_headers_reach_a_sync_invoke(esmd, db, endpoint):  # noqa: F811
    proc = esmd(async_config(db, endpoint))
    r = invoke(proc, "fn", {"n": 3}, itype="RequestResponse", headers={"traceparent": TP_A})
    assert r.status_code == 200, r.text
    h = endpoint.snapshot()[-1].headers
    assert h.get("traceparent") == TP_A and h.get("x-amzn-trace-id") == XRAY_A


def test_pgqueue_fifo_trace_header(queues, endpoint, esmd, pgq_config, pgq_schema):
    q = queues("t.fifo")
    pgq_schema.sql("SELECT esmd.create_queue(%s, fifo => true)" % lit(q.name))
    pgq_schema.sql("BEGIN; SELECT set_config('esmd.trace_header', %s, true); "
                   "SELECT esmd.send(%s, 'traced', group_id => 'g', deduplication_id => 'd1'); "
                   "COMMIT" % (lit(XRAY_A), lit(q.name)))
    cfg = pgq_config(q.name, batch_size=10)
    del cfg["mappings"][0]["maximum_batching_window"]  # a FIFO queue takes none
    esmd(cfg)
    wait_for(lambda: len(endpoint.ok_requests()) >= 1, 60, 0.05, "a delivered batch")
    req = endpoint.ok_requests()[0]
    rec = req.json["Records"][0]
    assert rec["attributes"]["MessageGroupId"] == "g"
    assert rec["attributes"]["AWSTraceHeader"] == XRAY_A
    assert req.headers.get("traceparent") == TP_A
