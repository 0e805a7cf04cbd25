"""End to end: the Postgres queue (esmd.queue_messages, migrations/0002_pgqueue.sql) -> esmd ->
a recording HTTP function endpoint, plus the queue's SQL functions on their own.

Each test uses its own queue names on the session's Postgres. The assertions are about what the
endpoint received (Lambda's SQS event, docs/lambda.md#sqs-event) and what is left in the
table: a message is deleted only once a batch holding it succeeded (or a filter dropped it)."""

import hashlib
import json
import os
import signal
import subprocess
import threading
import time

import pytest

import servers
from endpoint import Endpoint, Response
from servers import wait_for

MAX_PAYLOAD = 6291456
RECORD_FIELDS = {"messageId", "receiptHandle", "body", "attributes", "messageAttributes",
                 "md5OfBody", "eventSource", "eventSourceARN", "awsRegion"}
ARN_PREFIX = "arn:aws:sqs:us-east-1:000000000000:"  # the aws section's defaults


# ---- helpers ----------------------------------------------------------------------------------


def lit(s):
    return "'" + s.replace("'", "''") + "'"


class Queue:
    """SQL helpers for one queue name."""

    def __init__(self, pg, name):
        self.pg = pg
        self.name = name

    def send(self, body, delay="0", attributes=None):
        return self.pg.sql("SELECT esmd.send(%s, %s, %s, %s)" % (
            lit(self.name), lit(body), lit(delay),
            lit(json.dumps(attributes)) if attributes is not None else "NULL"))[0][0]

    def send_many(self, n, start=0, size=None):
        """n bodies {"i":I,...} (padded to about `size` bytes) in one send_batch."""
        body = ("format('{\"i\":%s}', i)" if size is None else
                "format('{\"i\":%%s,\"pad\":\"%%s\"}', i, repeat('x', %d))" % max(0, size - 20))
        self.pg.sql("SELECT count(*) FROM esmd.send_batch(%s, ARRAY(SELECT %s "
                    "FROM generate_series(%d, %d) i))" % (lit(self.name), body, start,
                                                          start + n - 1))
        return list(range(start, start + n))

    def count(self, where="true"):
        return int(self.pg.sql("SELECT count(*) FROM esmd.queue_messages WHERE queue = %s AND %s"
                               % (lit(self.name), where))[0][0])


@pytest.fixture
def queues(pgq_schema, names):
    def make(suffix="q"):
        return Queue(pgq_schema, names.mapping() + "_" + suffix)
    return make


@pytest.fixture
def pgq_config(postgres, endpoint, names):
    """pgq_config(queue, **options) -> config dict with one pgqueue mapping to the endpoint."""

    def make(queue, batch_size=10, window="0ms", timeout="10s", max_concurrency=10,
             visibility="30s", concurrency=2, max_receive=None, dlq=None, url=None,
             mapping_extra=None, source_extra=None, extra_mappings=()):
        src = {"pgqueue": queue, "visibility_timeout": visibility,
               "maximum_concurrency": concurrency}
        if max_receive is not None:
            src["max_receive_count"] = max_receive
        if dlq is not None:
            src["dead_letter_queue"] = dlq
        src.update(source_extra or {})
        m = {"name": names.mapping(), "function": "fn", "source": src, "batch_size": batch_size,
             "maximum_batching_window": window}
        m.update(mapping_extra or {})
        return {
            "postgres": postgres.url,
            "functions": {"fn": {"url": url or endpoint.url, "timeout": timeout,
                                 "max_concurrency": max_concurrency}},
            "mappings": [m] + list(extra_mappings),
        }

    return make


def records(endpoint, ok_only=True, requests=None):
    """[(request, record)] of SQS-shaped events, in arrival order."""
    reqs = requests if requests is not None else (
        endpoint.ok_requests() if ok_only else endpoint.snapshot())
    out = []
    for req in reqs:
        for r in (req.json or {}).get("Records", []):
            out.append((req, r))
    return out


def delivered_ids(endpoint, ok_only=True):
    """Multiset (dict i -> times) of the generated bodies' "i" over delivered records."""
    got = {}
    for _, r in records(endpoint, ok_only):
        try:
            i = json.loads(r["body"])["i"]
        except (ValueError, KeyError, TypeError):
            continue
        got[i] = got.get(i, 0) + 1
    return got


def wait_delivered(endpoint, ids, timeout=60):
    want = set(ids)
    endpoint.wait_for(lambda: want <= set(delivered_ids(endpoint)), timeout,
                      "%d messages delivered" % len(want))


def ready(esmd, timeout=30):
    wait_for(lambda: esmd.get("/readyz")[0] == 200, timeout, 0.1, "esmd /readyz 200")


# ---- delivery ---------------------------------------------------------------------------------


def test_all_messages_arrive_with_sqs_shape(queues, endpoint, esmd, pgq_config):
    q = queues()
    ids = q.send_many(1500)
    plain = q.send("plain text body", attributes={"kind": "greeting", "n": 7})
    esmd(pgq_config(q.name, batch_size=50, window="100ms", concurrency=4))
    wait_delivered(endpoint, ids, timeout=120)
    endpoint.wait_for(lambda: any(r["messageId"] == plain for _, r in records(endpoint)), 30,
                      "the plain message")
    wait_for(lambda: q.count() == 0, 30, 0.2, "the queue to be empty (deleted after success)")
    time.sleep(0.5)

    got = delivered_ids(endpoint)
    assert set(got) == set(ids)
    assert all(v == 1 for v in got.values()), "duplicates without failures: %s" % {
        k: v for k, v in got.items() if v > 1}
    assert all(r.ok for r in endpoint.snapshot())
    seen_ids = set()
    for req, r in records(endpoint):
        assert req.method == "POST"
        assert req.headers.get("content-type", "").startswith("application/json")
        assert req.request_id and req.idempotency_key
        assert set(req.json) == {"Records"}
        assert len(req.json["Records"]) <= 50
        assert RECORD_FIELDS <= set(r) <= RECORD_FIELDS | {"md5OfMessageAttributes"}, sorted(r)
        assert r["eventSource"] == "aws:sqs"
        assert r["eventSourceARN"] == ARN_PREFIX + q.name
        assert r["awsRegion"] == "us-east-1"
        assert r["md5OfBody"] == hashlib.md5(r["body"].encode()).hexdigest()
        a = r["attributes"]
        assert a["ApproximateReceiveCount"] == "1"
        assert a["SenderId"] == "postgres"
        assert all(isinstance(v, str) for v in a.values())
        assert int(a["ApproximateFirstReceiveTimestamp"]) >= int(a["SentTimestamp"]) > 0
        mid, _, receipt = r["receiptHandle"].partition(":")
        assert mid.isdigit() and len(receipt) == 36
        assert r["messageId"] not in seen_ids
        seen_ids.add(r["messageId"])
        if r["messageId"] == plain:
            assert r["body"] == "plain text body"
            assert r["messageAttributes"] == {
                "kind": {"dataType": "String", "stringValue": "greeting",
                         "stringListValues": [], "binaryListValues": []},
                "n": {"dataType": "Number", "stringValue": "7", "stringListValues": [],
                      "binaryListValues": []}}
            assert r["md5OfMessageAttributes"] == q.pg.sql(
                "SELECT esmd.attributes_md5(esmd.message_attributes(%s))"
                % lit('{"kind":"greeting","n":7}'))[0][0]
        else:
            assert r["messageAttributes"] == {}
            assert "md5OfMessageAttributes" not in r


def test_batching_window_collects_messages(queues, endpoint, esmd, pgq_config):
    q = queues()
    proc = esmd(pgq_config(q.name, batch_size=100, window="2s"))
    ready(proc)
    t0 = time.monotonic()
    ids = q.send_many(30)
    wait_delivered(endpoint, ids, timeout=30)
    reqs = endpoint.ok_requests()
    assert len(reqs) == 1, reqs
    assert len(reqs[0].json["Records"]) == 30
    assert reqs[0].t_arrival - t0 >= 1.5, "sent before the window closed"


def test_batch_size_and_payload_cap(queues, endpoint, esmd, pgq_config):
    q = queues()
    small = q.send_many(95)
    big = q.send_many(14, start=1000, size=900 * 1024)  # 900 KB bodies: 6 fit in 6 MB
    esmd(pgq_config(q.name, batch_size=10, concurrency=3))
    wait_delivered(endpoint, small + big, timeout=120)
    for req in endpoint.ok_requests():
        assert len(req.json["Records"]) <= 10
        assert len(req.body) <= MAX_PAYLOAD, len(req.body)
    assert max(len(r.body) for r in endpoint.ok_requests()) > 4 * 1024 * 1024


def test_maximum_concurrency_bounds_batches_in_flight(queues, endpoint, esmd, pgq_config):
    q = queues()
    ids = q.send_many(60)
    endpoint.delay(0.4)
    esmd(pgq_config(q.name, batch_size=2, concurrency=4, max_concurrency=50))
    wait_delivered(endpoint, ids, timeout=60)
    assert endpoint.max_concurrent == 4, endpoint.max_concurrent


def test_delayed_message_waits_for_its_delay(queues, endpoint, esmd, pgq_config):
    q = queues()
    proc = esmd(pgq_config(q.name))
    ready(proc)
    t0 = time.monotonic()
    mid = q.send("later", delay="2 seconds")
    endpoint.wait_for(lambda: len(records(endpoint)) >= 1, 30, "the delayed message")
    req, r = records(endpoint)[0]
    assert r["messageId"] == mid
    assert req.t_arrival - t0 >= 1.9


def test_filters_drop_and_delete_per_sqs_rules(queues, endpoint, esmd, pgq_config):
    q = queues()
    keep = q.send('{"type":"order","n":1}')
    other = q.send('{"type":"refund","n":2}')
    text = q.send("order as plain text")
    last = q.send('{"type":"order","n":3}')
    cfg = pgq_config(q.name, mapping_extra={"filters": [{"body": {"type": ["order"]}}]})
    proc = esmd(cfg)
    endpoint.wait_for(lambda: {keep, last} <= {r["messageId"] for _, r in records(endpoint)},
                      30, "the matching messages")
    wait_for(lambda: q.count() == 0, 30, 0.2, "filtered-out messages deleted")
    got = {r["messageId"] for _, r in records(endpoint)}
    assert other not in got and text not in got
    m = proc.metrics()
    assert m.get("esmd_filtered_out_events_total", mapping=cfg["mappings"][0]["name"]) == 2


# ---- failures, visibility, dead letters -------------------------------------------------------


def test_failed_batch_with_filtered_messages_frees_its_slot(queues, endpoint, esmd, pgq_config):
    """A failed batch whose shard also held filtered-out messages (acked with the batch) must not
    leave that slot busy: both batches in flight again afterwards, filtered messages deleted."""
    q = queues()
    pg = q.pg
    pg.sql("SELECT count(*) FROM esmd.send_batch(%s, ARRAY(SELECT format("
           "'{\"keep\":%%s,\"i\":%%s}', (i %% 2 = 0)::text, i) FROM generate_series(0, 7) i))"
           % lit(q.name))
    endpoint.fail_first(1)
    cfg = pgq_config(q.name, batch_size=2, concurrency=2, visibility="1s", timeout="1s",
                     mapping_extra={"filters": [{"body": {"keep": [True]}}]})
    proc = esmd(cfg)
    wait_delivered(endpoint, [0, 2, 4, 6], timeout=30)
    wait_for(lambda: q.count() == 0, 30, 0.2, "kept and filtered messages deleted")
    endpoint.reset()
    endpoint.delay(0.5)
    pg.sql("SELECT count(*) FROM esmd.send_batch(%s, ARRAY(SELECT format("
           "'{\"keep\":true,\"i\":%%s}', i) FROM generate_series(100, 115) i))" % lit(q.name))
    ids = list(range(100, 116))
    wait_delivered(endpoint, ids, timeout=30)
    assert endpoint.max_concurrent == 2, "a slot stayed busy after the failed batch"
    assert proc.running()


def test_failed_batch_comes_back_after_visibility_timeout(queues, endpoint, esmd, pgq_config):
    q = queues()
    ids = q.send_many(5)
    endpoint.fail_first(2)
    esmd(pgq_config(q.name, batch_size=10, visibility="1s", timeout="1s"))
    wait_delivered(endpoint, ids, timeout=30)
    reqs = endpoint.snapshot()
    assert [r.ok for r in reqs[:3]] == [False, False, True]
    # each receive waited for the visibility timeout of the failed one
    assert reqs[1].t_arrival - reqs[0].t_arrival >= 0.9
    assert reqs[2].t_arrival - reqs[1].t_arrival >= 0.9
    firsts, handles = set(), []
    for i, req in enumerate(reqs[:3]):
        for r in req.json["Records"]:
            assert r["attributes"]["ApproximateReceiveCount"] == str(i + 1)
            firsts.add((r["messageId"], r["attributes"]["ApproximateFirstReceiveTimestamp"]))
            handles.append(r["receiptHandle"])
    assert len(firsts) == 5, "the first receive time changed between receives"
    assert len(set(handles)) == 15, "a receipt handle was reused"
    wait_for(lambda: q.count() == 0, 30, 0.2, "the queue to be empty")


def test_partial_batch_response_deletes_the_rest(queues, endpoint, esmd, pgq_config):
    """report_batch_item_failures (SQS): the listed messages come back after their visibility
    timeout, the others are deleted at once."""
    q = queues()
    ids = q.send_many(6)
    first = {}

    def answer(req):
        if first:
            return None
        recs = (req.json or {}).get("Records", [])
        bad = [r["messageId"] for r in recs if json.loads(r["body"])["i"] in (2, 4)]
        first["bad"] = bad
        return Response(200, {"batchItemFailures": [{"itemIdentifier": m} for m in bad]})

    endpoint.behaviour = answer
    esmd(pgq_config(q.name, batch_size=10, visibility="2s", timeout="1s",
                    mapping_extra={"report_batch_item_failures": True}))
    endpoint.wait_for(lambda: bool(first), 30, "the first batch")
    wait_for(lambda: q.count() == 2, 10, 0.05, "the 4 messages that succeeded deleted")
    assert q.count("visible_at > now()") == 2, "the failed ones came back before their timeout"
    endpoint.wait_for(lambda: len(records(endpoint)) >= 8, 30, "the failed ones again")
    again = [r for _, r in records(endpoint)][6:]
    assert sorted(r["messageId"] for r in again) == sorted(first["bad"])
    assert all(r["attributes"]["ApproximateReceiveCount"] == "2" for r in again)
    wait_for(lambda: q.count() == 0, 10, 0.1, "the queue to be empty")
    assert sorted(delivered_ids(endpoint)) == ids


@pytest.mark.parametrize("answer", [
    {"batchItemFailures": [{"itemIdentifier": "00000000-0000-0000-0000-000000000000"}]},
    {"batchItemFailures": [{"itemIdentifier": ""}]},
    {"batchItemFailures": [{"messageId": "x"}]},
    {"batchItemFailures": 5},
], ids=["unknown", "empty", "wrong-key", "not-a-list"])
def test_malformed_partial_batch_response_fails_the_whole_batch(queues, endpoint, esmd,
                                                                pgq_config, answer):
    """As SQS: an identifier that is empty, missing or not in the batch fails the whole batch,
    so every message of it comes back after the visibility timeout and nothing is deleted."""
    q = queues()
    q.send_many(3)
    endpoint.script([Response(200, answer)])
    esmd(pgq_config(q.name, batch_size=10, visibility="2s", timeout="1s",
                    mapping_extra={"report_batch_item_failures": True}))
    endpoint.wait_for(lambda: len(endpoint.snapshot()) >= 1, 30, "the first batch")
    time.sleep(0.5)
    assert q.count() == 3, "a message of the failed batch was deleted"
    endpoint.wait_for(lambda: len(records(endpoint)) >= 6, 30, "the batch again")
    got = [r for _, r in records(endpoint)]
    assert sorted(r["messageId"] for r in got[3:]) == sorted(r["messageId"] for r in got[:3])
    assert all(r["attributes"]["ApproximateReceiveCount"] == "2" for r in got[3:])
    wait_for(lambda: q.count() == 0, 10, 0.1, "the queue to be empty")


def test_poison_message_ends_in_dlq_and_the_rest_flows(queues, endpoint, esmd, pgq_config):
    q, dlq = queues("q"), queues("dlq")
    ids = q.send_many(40)
    poison = q.send("poison")
    endpoint.behaviour = lambda req: Response(500) if any(
        r.get("body") == "poison" for r in (req.json or {}).get("Records", [])) else None
    dlq_ep = Endpoint()
    try:
        cfg = pgq_config(q.name, batch_size=1, visibility="1s", timeout="1s", max_receive=2,
                         dlq=dlq.name, concurrency=3)
        cfg["functions"]["dlq_fn"] = {"url": dlq_ep.url, "timeout": "5s"}
        cfg["mappings"].append({"name": cfg["mappings"][0]["name"] + "_dlq", "function": "dlq_fn",
                                "source": {"pgqueue": dlq.name}})
        proc = esmd(cfg)
        wait_delivered(endpoint, ids, timeout=60)
        dlq_ep.wait_for(lambda: len(records(dlq_ep)) >= 1, 30, "the poison message in the DLQ")
        _, r = records(dlq_ep)[0]
        assert r["messageId"] == poison and r["body"] == "poison"
        assert r["eventSourceARN"] == ARN_PREFIX + dlq.name
        assert r["attributes"]["DeadLetterQueueSourceArn"] == ARN_PREFIX + q.name
        assert r["attributes"]["ApproximateReceiveCount"] == "1"
        tries = [req for req, r in records(endpoint, ok_only=False) if r["body"] == "poison"]
        assert len(tries) == 2, "received %d times with max_receive_count 2" % len(tries)
        wait_for(lambda: q.count() == 0 and dlq.count() == 0, 30, 0.2, "both queues empty")
        wait_for(lambda: proc.metrics().get("esmd_pgqueue_dead_lettered_messages_total",
                                            queue=q.name) == 1, 10, 0.2, "the DLQ metric")
    finally:
        dlq_ep.close()


def test_dlq_is_readable_and_redrivable_sql(queues):
    q, dlq = queues("q"), queues("dlq")
    pg = q.pg
    mid = q.send("poison")
    for _ in range(2):
        rows = pg.sql("SELECT kind FROM esmd.receive(%s, 10, '0', 2, %s) WHERE kind <> 'w'"
                      % (lit(q.name), lit(dlq.name)))
        assert rows == [["m"]]
    rows = pg.sql("SELECT kind, message_id, receive_count FROM esmd.receive(%s, 10, '0', 2, %s) "
                  "WHERE kind <> 'w'" % (lit(q.name), lit(dlq.name)))
    assert rows == [["d", mid, "2"]]
    assert q.count() == 0 and dlq.count("dead_letter_source = %s" % lit(q.name)) == 1
    assert pg.sql("SELECT visible, dead_lettered FROM esmd.queue_stats WHERE queue = %s"
                  % lit(dlq.name)) == [["1", "1"]]
    # back to where it came from, receive count reset
    assert pg.sql("SELECT esmd.redrive(%s)" % lit(dlq.name)) == [["1"]]
    assert pg.sql("SELECT message_id, receive_count, dead_letter_source IS NULL FROM "
                  "esmd.queue_messages WHERE queue = %s" % lit(q.name)) == [[mid, "0", "t"]]
    # without a dead-letter queue, max_receive_count deletes
    pg.sql("SELECT esmd.receive(%s, 10, '0', 1)" % lit(q.name))
    rows = pg.sql("SELECT kind FROM esmd.receive(%s, 10, '0', 1) WHERE kind <> 'w'"
                  % lit(q.name))
    assert rows == [["x"]] and q.count() == 0


def test_late_delete_of_an_expired_claim_deletes_nothing_sql(queues):
    q = queues()
    pg = q.pg
    q.send("one")
    sql = ("SELECT id || ':' || receipt FROM esmd.receive(%s, 1, '50 milliseconds') "
           "WHERE kind = 'm'" % lit(q.name))
    first = pg.sql(sql)[0][0]
    time.sleep(0.15)
    second = pg.sql(sql)[0][0]  # the claim expired: received again, new receipt
    assert first != second
    assert first.split(":")[0] == second.split(":")[0]
    assert pg.sql("SELECT esmd.delete_message(%s)" % lit(first)) == [["f"]]
    assert pg.sql("SELECT esmd.change_message_visibility(%s, '1 hour')" % lit(first)) == [["f"]]
    assert q.count() == 1
    assert pg.sql("SELECT esmd.delete_message(%s)" % lit(second)) == [["t"]]
    assert q.count() == 0


def test_sql_api_checks_its_arguments(queues):
    q = queues()
    pg = q.pg
    for bad, msg in [
        ("SELECT esmd.send('bad queue', 'x')", "bad queue name"),
        ("SELECT esmd.send(%s, NULL)" % lit(q.name), "cannot be NULL"),
        ("SELECT esmd.send(%s, 'x', '-1 second')" % lit(q.name), "delay must be 0 or more"),
        ("SELECT esmd.send(%s, repeat('x', 1048577))" % lit(q.name), "over the 1048576"),
        ("SELECT esmd.send(%s, 'x', '0', '{\"a\":[1]}')" % lit(q.name), "must be a string"),
        ("SELECT esmd.delete_message('nope')", "is not a receipt handle"),
    ]:
        with pytest.raises(RuntimeError) as e:
            pg.sql(bad)
        assert msg in str(e.value), (bad, str(e.value))
    ids = pg.sql("SELECT * FROM esmd.send_batch(%s, ARRAY['a','b','c'], '0', '{\"k\":\"v\"}')"
                 % lit(q.name))
    assert len(ids) == 3
    assert pg.sql("SELECT body FROM esmd.queue_messages WHERE queue = %s ORDER BY id"
                  % lit(q.name)) == [["a"], ["b"], ["c"]]
    assert pg.sql("SELECT esmd.purge(%s)" % lit(q.name)) == [["3"]]


# ---- crashes, restarts, several instances -----------------------------------------------------


@pytest.mark.slow
def test_kill9_mid_batch_then_restart_loses_nothing(queues, endpoint, esmd, pgq_config):
    q = queues()
    ids = q.send_many(600)
    endpoint.delay(0.2)
    proc = esmd(pgq_config(q.name, batch_size=20, concurrency=3, visibility="2s", timeout="1s"))
    endpoint.wait_for(lambda: len(delivered_ids(endpoint)) >= 100, 60, "100 delivered")
    proc.kill9()
    before = len(delivered_ids(endpoint))
    assert before < 600
    proc.start()
    wait_delivered(endpoint, ids, timeout=120)
    wait_for(lambda: q.count() == 0, 30, 0.2, "the queue to be empty")


@pytest.mark.slow
def test_sigterm_gives_back_unsent_claims(queues, endpoint, esmd, pgq_config):
    q = queues()
    proc = esmd(pgq_config(q.name, batch_size=100, window="20s"))
    ready(proc)
    q.send_many(5)
    wait_for(lambda: q.count("receive_count = 1 AND visible_at > now()") == 5, 20, 0.1,
             "the 5 messages claimed into a batch being formed")
    assert proc.stop(timeout=20) == 0
    assert endpoint.snapshot() == []
    assert q.count("visible_at <= now() AND receive_count = 1") == 5, "claims not given back"


@pytest.mark.slow
def test_postgres_restart_under_load_loses_nothing(queues, endpoint, esmd, pgq_config):
    q = queues()
    ids = q.send_many(3000)
    endpoint.delay(0.05)
    proc = esmd(pgq_config(q.name, batch_size=25, concurrency=4, visibility="3s", timeout="2s"))
    endpoint.wait_for(lambda: len(delivered_ids(endpoint)) >= 300, 60, "300 delivered")
    q.pg.stop()
    try:
        wait_for(lambda: proc.get("/readyz")[0] == 503, 20, 0.1, "/readyz 503 without postgres")
        time.sleep(1)
    finally:
        q.pg.start()
    ready(proc, 60)
    wait_delivered(endpoint, ids, timeout=180)
    wait_for(lambda: q.count() == 0, 60, 0.2, "the queue to be empty")
    assert proc.running()


@pytest.mark.slow
def test_two_instances_split_the_work(queues, endpoint, esmd, pgq_config):
    q = queues()
    ids = q.send_many(2000)
    endpoint.delay(0.02)
    cfg = pgq_config(q.name, batch_size=20, concurrency=3)
    a = esmd(cfg, env={"ESMD_INSTANCE_ID": "a"})
    b = esmd(cfg, env={"ESMD_INSTANCE_ID": "b"})
    wait_delivered(endpoint, ids, timeout=120)
    wait_for(lambda: q.count() == 0, 30, 0.2, "the queue to be empty")
    got = delivered_ids(endpoint)
    assert all(v == 1 for v in got.values()), "a message went to both instances"
    per = [a.metrics().get("esmd_pgqueue_received_messages_total", queue=q.name),
           b.metrics().get("esmd_pgqueue_received_messages_total", queue=q.name)]
    assert sum(per) == 2000 and min(per) > 0, per
    keys = [req.idempotency_key for req in endpoint.ok_requests()]
    assert len(set(keys)) == len(keys), "two batches shared an idempotency key"


def test_metrics_and_readiness(queues, endpoint, esmd, pgq_config):
    q = queues()
    ids = q.send_many(10)
    cfg = pgq_config(q.name)
    proc = esmd(cfg)
    wait_delivered(endpoint, ids)
    ready(proc)
    name = cfg["mappings"][0]["name"]

    def settled():
        m = proc.metrics()
        return (m.get("esmd_pgqueue_received_messages_total", mapping=name) == 10 and
                m.get("esmd_pgqueue_deleted_messages_total", mapping=name) == 10 and
                m.get("esmd_committed_events_total", mapping=name) == 10)
    wait_for(settled, 20, 0.2, "received / deleted / committed metrics")
    m = proc.metrics()
    for n in ("esmd_pgqueue_messages_visible", "esmd_pgqueue_messages_in_flight",
              "esmd_pgqueue_oldest_message_age_seconds", "esmd_pgqueue_stale_receipts_total"):
        assert n in m.names(), n


# ---- configuration ----------------------------------------------------------------------------


def test_bad_pgqueue_config_is_refused(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("""\
postgres: postgresql://127.0.0.1:9/esmd
functions:
  slow: { url: "http://127.0.0.1:9/", timeout: 60s }
mappings:
  - { name: a, function: slow, source: { pgqueue: jobs, visibility_timeout: 30s } }
  - { name: b, function: slow, source: { pgqueue: jobs, visibility_timeout: 5m, dead_letter_queue: d } }
  - { name: c, function: slow, source: { pgqueue: "bad name", maximum_concurrency: 1 } }
  - { name: d, function: slow, source: { pgqueue: jobs, visibility_timeout: 5m, max_receive_count: 2, dead_letter_queue: jobs } }
""")
    r = subprocess.run([servers.binary("esmd"), "check-config", str(cfg)],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=30)
    assert r.returncode == 1
    for want in ["must not be shorter than the timeout of function \"slow\" (60s)",
                 "dead_letter_queue needs max_receive_count",
                 "pgqueue must be a queue name",
                 "maximum_concurrency",
                 "dead_letter_queue must not be the queue itself"]:
        assert want in r.stderr, (want, r.stderr)
    assert "not available" not in r.stderr
