"""FIFO queues of the Postgres queue (docs/pgqueue.md#fifo-queues; migrations/0007_pgqueue_fifo.sql):
message groups delivered in order with at most one batch of a group in flight, groups in
parallel, a failing message holding up its own group only until it is dead-lettered,
deduplication within 5 minutes, and the SQL errors of bad sends. Real Postgres, real esmd, the
recording endpoint.

Order is checked on what the endpoint saw: for every group, the first delivery of each message
comes in sequence order, and so does the last successful one (a message behind a failed one of
its group in a batch is delivered again after it, because esmd does not delete it even when the
function does not name it)."""

import hashlib
import json
import os
import random
import subprocess
import threading

import jsonschema
import pytest

import servers
from endpoint import Response
from servers import assert_error, wait_for
from test_admin_api import ESM, call
from test_pgqueue_e2e import lit, pgq_config, ready  # noqa: F401 (fixtures)

ARN_PREFIX = "arn:aws:sqs:us-east-1:000000000000:"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
with open(os.path.join(ROOT, "schemas", "pgqueue-event.schema.json")) as f:
    EVENT_SCHEMA = json.load(f)


class Fifo:
    """A FIFO queue: esmd.create_queue(..., fifo => true) and sends of {"g":G,"i":I} bodies."""

    def __init__(self, pg, name, content_based=False):
        self.pg = pg
        self.name = name
        pg.sql("SELECT esmd.create_queue(%s, fifo => true, content_based_deduplication => %s)"
               % (lit(name), "true" if content_based else "false"))

    def send(self, body, group, dedup=None):
        return self.pg.sql("SELECT esmd.send(%s, %s, group_id => %s, deduplication_id => %s)" % (
            lit(self.name), lit(body), lit(group), lit(dedup) if dedup else "NULL"))[0][0]

    def send_groups(self, groups, per_group):
        """per_group messages to each of `groups` groups, interleaved (g0 i0, g1 i0, ...), one
        esmd.send each, in one transaction; returns {group: [i, ...]} in send order."""
        self.pg.sql("DO $$ BEGIN FOR i IN 0..%d LOOP FOR g IN 0..%d LOOP "
                    "PERFORM esmd.send(%s, format('{\"g\":\"g%%s\",\"i\":%%s}', g, i), "
                    "group_id => 'g' || g, deduplication_id => format('g%%s-%%s', g, i)); "
                    "END LOOP; END LOOP; END $$" % (per_group - 1, groups - 1, lit(self.name)))
        return {"g%d" % g: list(range(per_group)) for g in range(groups)}

    def count(self, where="true", queue=None):
        return int(self.pg.sql("SELECT count(*) FROM esmd.queue_messages WHERE queue = %s AND %s"
                               % (lit(queue or self.name), where))[0][0])


@pytest.fixture
def fifo(pgq_schema, names):
    def make(suffix="q", content_based=False):
        short = hashlib.sha1(names.mapping().encode()).hexdigest()[:12]
        return Fifo(pgq_schema, "f%s-%s.fifo" % (short, suffix), content_based)
    return make


def recs(req):
    return (req.json or {}).get("Records", [])


def body(r):
    return json.loads(r["body"])


def failed_ids(req):
    """messageIds the answer to req named in batchItemFailures (all of them when it failed)."""
    if not req.ok:
        return {r["messageId"] for r in recs(req)}
    try:
        ans = json.loads(req.response.body or b"{}")
    except ValueError:
        return set()
    return {f["itemIdentifier"] for f in ans.get("batchItemFailures", []) or []}


def assert_fifo_order(reqs, sent):
    """The first delivery, and the last successful one, of each group's messages come in send
    order; no two requests holding the same group overlap in time; each request holds a
    group's messages in order; every message was processed successfully."""
    first, last_ok = {}, {}
    spans = {}
    for n, req in enumerate(reqs):
        bad = failed_ids(req)
        seen = {}
        for pos, r in enumerate(recs(req)):
            b = body(r)
            g, i = b["g"], b["i"]
            a = r["attributes"]
            assert a["MessageGroupId"] == g
            assert isinstance(a["SequenceNumber"], str) and a["SequenceNumber"].isdigit()
            seq = int(a["SequenceNumber"])
            assert seen.get(g, -1) < seq, "group %s out of order inside request %d" % (g, n)
            seen[g] = seq
            first.setdefault((g, i), (n, pos))
            if req.ok and r["messageId"] not in bad:
                last_ok[(g, i)] = (n, pos)
        for g in seen:
            spans.setdefault(g, []).append((req.t_arrival, req.t_done or float("inf"), n))
    for g, ids in sent.items():
        missing = [i for i in ids if (g, i) not in last_ok]
        assert not missing, "group %s: never processed: %s" % (g, missing)
        firsts = [first[(g, i)] for i in ids]
        assert firsts == sorted(firsts), "group %s: first deliveries out of order" % g
        lasts = [last_ok[(g, i)] for i in ids]
        assert lasts == sorted(lasts), "group %s: successes out of order: %s" % (g, lasts)
        s = sorted(spans[g])
        for (a0, d0, n0), (a1, _, n1) in zip(s, s[1:]):
            assert a1 >= d0, "group %s: requests %d and %d were in flight at once" % (g, n0, n1)


# ---- SQL: creating queues, sending, deduplication --------------------------------------------


def test_bad_sends_are_clear_errors(fifo, pgq_schema, names):
    pg = pgq_schema
    q = fifo()
    std = "std-" + hashlib.sha1(names.mapping().encode()).hexdigest()[:10]

    def err(sql):
        with pytest.raises(RuntimeError) as e:
            pg.sql(sql)
        return str(e.value)

    e = err("SELECT esmd.send(%s, 'x', group_id => 'g')" % lit(std))
    assert "queue \"%s\" is a standard queue: group_id is for FIFO queues" % std in e
    e = err("SELECT esmd.send_batch(%s, ARRAY['x'], deduplication_ids => ARRAY['d'])" % lit(std))
    assert "queue \"%s\" is a standard queue: deduplication_ids" % std in e
    e = err("SELECT esmd.send(%s, 'x', deduplication_id => 'd')" % lit(q.name))
    assert "queue \"%s\" is a FIFO queue: group_id is required" % q.name in e
    e = err("SELECT esmd.send(%s, 'x', group_id => 'g')" % lit(q.name))
    assert "queue \"%s\" is a FIFO queue without content-based deduplication: " \
           "deduplication_id is required" % q.name in e
    e = err("SELECT esmd.send(%s, 'x', group_id => 'a b', deduplication_id => 'd')" % lit(q.name))
    assert "bad group_id \"a b\"" in e and q.name in e
    e = err("SELECT esmd.send(%s, 'x', group_id => 'g', deduplication_id => '')" % lit(q.name))
    assert "bad deduplication_id \"\"" in e
    e = err("SELECT esmd.send_batch(%s, ARRAY['x','y'], group_id => 'g', "
            "deduplication_ids => ARRAY['d'])" % lit(q.name))
    assert "1 deduplication ids for 2 bodies" in e
    e = err("SELECT esmd.send('never-made.fifo', 'x', group_id => 'g', deduplication_id => 'd')")
    assert "queue \"never-made.fifo\" is a FIFO queue name but was not created" in e
    assert "esmd.create_queue('never-made.fifo', fifo => true)" in e
    e = err("SELECT esmd.create_queue('plainname', fifo => true)")
    assert "the name of a FIFO queue must end in \".fifo\"" in e
    e = err("SELECT esmd.create_queue('x.fifo')")
    assert "create it with fifo => true" in e
    e = err("SELECT esmd.create_queue(%s, fifo => true, content_based_deduplication => true)"
            % lit(q.name))
    assert "exists with content_based_deduplication => false" in e
    assert pg.sql("SELECT esmd.create_queue(%s, fifo => true)" % lit(q.name))[0][0] == "f"
    # nothing was enqueued by any of them
    assert q.count() == 0
    # a FIFO queue's dead-letter queue is a FIFO queue, as in SQS
    e = err("SELECT * FROM esmd.receive_fifo(%s, 1, '1s', 2, 'dlq')" % lit(q.name))
    assert "must be a FIFO queue" in e
    e = err("SELECT * FROM esmd.receive_fifo(%s, 1, '1s')" % lit(std))
    assert "is not a FIFO queue" in e


def test_deduplication_within_the_window(fifo):
    q = fifo()
    a = q.send("one", "g", "order-1")
    assert q.send("one again", "g", "order-1") == a, "a duplicate must return the first id"
    b = q.send("two", "g", "order-2")
    assert b != a
    assert q.count() == 2
    # still a duplicate once the first message is gone (SQS keeps the id for 5 minutes)
    q.pg.sql("DELETE FROM esmd.queue_messages WHERE message_id = %s" % lit(a))
    assert q.send("one", "g", "order-1") == a
    assert q.count() == 1
    # the window is 5 minutes: an id seen 5 minutes ago is new again (the test backdates it)
    q.pg.sql("UPDATE esmd.queue_deduplication SET sent_at = sent_at - interval '5 minutes 1 second' "
             "WHERE queue = %s AND deduplication_id = 'order-1'" % lit(q.name))
    c = q.send("one, later", "g", "order-1")
    assert c != a
    assert q.count() == 2
    assert q.send("one, later, again", "g", "order-1") == c
    # duplicates inside one send_batch
    ids = [r[0] for r in q.pg.sql(
        "SELECT * FROM esmd.send_batch(%s, ARRAY['x','y','z'], group_id => 'h', "
        "deduplication_ids => ARRAY['k1','k2','k1'])" % lit(q.name))]
    assert ids[0] == ids[2] and ids[0] != ids[1]
    assert q.count() == 4


def test_content_based_deduplication(fifo):
    q = fifo(content_based=True)
    a = q.send("same body", "g")
    assert q.send("same body", "other-group") == a
    assert q.send("another body", "g") != a
    # an explicit id wins over the body's hash
    assert q.send("same body", "g", "explicit") != a
    row = q.pg.sql("SELECT deduplication_id FROM esmd.queue_messages WHERE message_id = %s"
                   % lit(a))[0][0]
    assert row == hashlib.sha256(b"same body").hexdigest()
    assert q.count() == 3


def test_groups_take_turns_sql(fifo):
    """esmd.receive_fifo visits groups round robin: a group that is done at once is not claimed
    again before the others had their turn (claims of 1, each deleted before the next)."""
    q = fifo()
    q.send_groups(4, 3)
    order = []
    for _ in range(12):
        rows = q.pg.sql("SELECT id, receipt, group_id FROM esmd.receive_fifo(%s, 1, '1 hour') "
                        "WHERE kind = 'm'" % lit(q.name))
        assert len(rows) == 1, rows
        order.append(rows[0][2])
        q.pg.sql("SELECT esmd.delete_received(ARRAY[%s]::bigint[], ARRAY[%s]::uuid[])"
                 % (rows[0][0], lit(rows[0][1])))
    assert order == ["g0", "g1", "g2", "g3"] * 3
    assert q.count() == 0


# ---- delivery ---------------------------------------------------------------------------------


def test_event_shape_and_order(fifo, endpoint, esmd, pgq_config):
    q = fifo()
    sent = q.send_groups(3, 8)
    esmd(pgq_config(q.name, batch_size=5, concurrency=3))
    wait_for(lambda: q.count() == 0, 30, 0.1, "the queue to be empty")
    reqs = endpoint.ok_requests()
    assert_fifo_order(reqs, sent)
    seqs = {}
    for req in reqs:
        jsonschema.validate(req.json, EVENT_SCHEMA)
        assert len(recs(req)) <= 5
        for r in recs(req):
            a = r["attributes"]
            assert set(a) == {"ApproximateReceiveCount", "SentTimestamp", "SequenceNumber",
                              "MessageGroupId", "SenderId", "MessageDeduplicationId",
                              "ApproximateFirstReceiveTimestamp"}
            assert all(isinstance(v, str) for v in a.values())
            b = body(r)
            assert a["MessageDeduplicationId"] == "%s-%d" % (b["g"], b["i"])
            assert r["eventSourceARN"] == ARN_PREFIX + q.name
            assert r["eventSourceARN"].endswith(".fifo")
            seqs[r["messageId"]] = int(a["SequenceNumber"])
    assert len(seqs) == 24 and len(set(seqs.values())) == 24


def test_order_per_group_under_random_failures(fifo, endpoint, esmd, pgq_config):
    """Whole-batch failures, function errors and partial batch responses that name one message
    and not the ones behind it (esmd must keep those, as Lambda tells functions to return them)."""
    q = fifo()
    sent = q.send_groups(6, 20)
    rnd = random.Random(14)
    lock = threading.Lock()

    def answer(req):
        with lock:
            x = rnd.random()
            rs = recs(req)
        if not rs or x < 0.55:
            return None
        if x < 0.65:
            return Response(500, {"message": "injected"})
        if x < 0.75:
            return Response(200, {"errorType": "Error", "errorMessage": "boom"},
                            {"X-Amz-Function-Error": "Unhandled"})
        with lock:
            victim = rnd.choice(rs)["messageId"]
        return Response(200, {"batchItemFailures": [{"itemIdentifier": victim}]})

    endpoint.behaviour = answer
    esmd(pgq_config(q.name, batch_size=6, concurrency=4, visibility="1s", timeout="1s",
                    mapping_extra={"report_batch_item_failures": True}))
    wait_for(lambda: q.count() == 0, 90, 0.2, "the queue to be empty")
    reqs = [r for r in endpoint.snapshot() if r.t_done is not None]
    assert_fifo_order(reqs, sent)
    held = 0
    for n, req in enumerate(reqs):
        bad = failed_ids(req)
        if req.ok and bad:
            groups = {r["attributes"]["MessageGroupId"] for r in recs(req)
                      if r["messageId"] in bad}
            held += sum(1 for r in recs(req) if r["attributes"]["MessageGroupId"] in groups)
    assert held > len(reqs) // 20, "the run had too few partial failures to test anything"


def test_poison_message_blocks_its_group_until_dead_lettered(fifo, endpoint, esmd, pgq_config):
    q = fifo()
    dlq = fifo("dlq")
    for i in range(5):
        q.send(json.dumps({"g": "a", "i": i}), "a", "a-%d" % i)
        q.send(json.dumps({"g": "b", "i": i}), "b", "b-%d" % i)

    def answer(req):
        bad = [r["messageId"] for r in recs(req) if body(r) == {"g": "a", "i": 2}]
        return Response(200, {"batchItemFailures": [{"itemIdentifier": m} for m in bad]}) \
            if bad else None

    endpoint.behaviour = answer
    esmd(pgq_config(q.name, batch_size=1, concurrency=2, visibility="2s", timeout="1s",
                    max_receive=2, dlq=dlq.name,
                    mapping_extra={"report_batch_item_failures": True}))
    wait_for(lambda: q.count() == 0, 60, 0.1, "the queue to be empty")
    reqs = [r for r in endpoint.snapshot() if r.t_done is not None]
    got = [(n, body(r)) for n, req in enumerate(reqs) for r in recs(req)]
    poison = [n for n, b in got if b == {"g": "a", "i": 2}]
    assert len(poison) == 2, "the poison message is received max_receive_count times"
    # group b was not held up: it was done before the poison's second receive
    assert max(n for n, b in got if b["g"] == "b") < poison[1]
    # group a: nothing behind the poison before it was dead-lettered, then the rest in order
    after = [(n, b["i"]) for n, b in got if b["g"] == "a" and b["i"] > 2]
    assert after and min(n for n, _ in after) > poison[-1]
    assert [i for _, i in after] == [3, 4]
    rows = q.pg.sql("SELECT group_id, body, dead_letter_source FROM esmd.queue_messages "
                    "WHERE queue = %s" % lit(dlq.name))
    assert [(r[0], json.loads(r[1]), r[2]) for r in rows] == [("a", {"g": "a", "i": 2}, q.name)]
    assert_fifo_order([r for r in reqs if r.ok],
                      {"a": [0, 1, 3, 4], "b": [0, 1, 2, 3, 4]})


def test_groups_run_in_parallel(fifo, endpoint, esmd, pgq_config):
    q = fifo()
    sent = {}
    for g in range(4):  # each group's messages together: a claim of 2 is one group's run
        gid = "g%d" % g
        sent[gid] = list(range(4))
        q.pg.sql("SELECT count(*) FROM esmd.send_batch(%s, ARRAY(SELECT format('{\"g\":\"%s\","
                 "\"i\":%%s}', i) FROM generate_series(0, 3) i), group_id => %s, "
                 "deduplication_ids => ARRAY(SELECT %s || i FROM generate_series(0, 3) i))"
                 % (lit(q.name), gid, lit(gid), lit(gid + "-")))
    endpoint.delay(0.4)
    proc = esmd(pgq_config(q.name, batch_size=2, concurrency=4))
    # as Lambda: no batching window on a FIFO queue, through the admin API either
    st, _, got = call(proc, "GET", ESM)
    u = got["EventSourceMappings"][0]["UUID"]
    assert_error(call(proc, "PUT", ESM + "/" + u, {"MaximumBatchingWindowInSeconds": 1}), 400,
                 "InvalidParameterValueException", "not supported for FIFO queues")
    wait_for(lambda: q.count() == 0, 60, 0.1, "the queue to be empty")
    reqs = endpoint.ok_requests()
    assert_fifo_order(reqs, sent)
    assert endpoint.max_concurrent >= 3, endpoint.max_concurrent
    # every request holds one group (runs of 2 from a group of 4), and different groups overlap
    groups = [{body(r)["g"] for r in recs(req)} for req in reqs]
    assert all(len(g) == 1 for g in groups), groups
    overlaps = sum(1 for i, a in enumerate(reqs) for b in reqs[i + 1:]
                   if b.t_arrival < a.t_done and groups[reqs.index(a)] != groups[reqs.index(b)])
    assert overlaps > 0


@pytest.mark.slow
def test_kill9_keeps_order_and_loses_nothing(fifo, endpoint, esmd, pgq_config):
    q = fifo()
    sent = q.send_groups(10, 30)
    endpoint.delay(0.05)
    proc = esmd(pgq_config(q.name, batch_size=5, concurrency=4, visibility="2s", timeout="1s"))
    endpoint.wait_for(lambda: sum(len(recs(r)) for r in endpoint.ok_requests()) >= 80, 60,
                      "80 delivered")
    proc.kill9()
    assert q.count() > 0
    proc.start()
    wait_for(lambda: q.count() == 0, 90, 0.2, "the queue to be empty")
    # every request counts: one cut by the kill was not settled, so its messages came again
    endpoint.wait_for(lambda: all(r.t_done is not None for r in endpoint.snapshot()), 10,
                      "every request answered")
    assert_fifo_order(endpoint.snapshot(), sent)


def test_fifo_config_is_checked(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("""\
postgres: postgresql://127.0.0.1:9/esmd
functions:
  fn: { url: "http://127.0.0.1:9/", timeout: 1s }
mappings:
  - { name: a, function: fn, maximum_batching_window: 2s, source: { pgqueue: jobs.fifo } }
  - { name: b, function: fn, source: { pgqueue: jobs.fifo, max_receive_count: 2, dead_letter_queue: dlq } }
  - { name: c, function: fn, source: { pgqueue: jobs, max_receive_count: 2, dead_letter_queue: dlq.fifo } }
""")
    r = subprocess.run([servers.binary("esmd"), "check-config", str(cfg)],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=30)
    assert r.returncode == 1
    lines = r.stderr.splitlines()
    for line_no, want in [(5, "a FIFO queue (jobs.fifo) takes no maximum_batching_window"),
                          (6, "the dead_letter_queue of a FIFO queue must be a FIFO queue"),
                          (7, "the dead_letter_queue of a standard queue must be a standard "
                              "queue")]:
        assert any(("bad.yaml:%d:" % line_no) in l and want in l for l in lines), (want, r.stderr)
