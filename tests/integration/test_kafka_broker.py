"""End to end against a real Apache Kafka broker (scripts/kafka-broker, single-node KRaft): what
librdkafka's mock cluster cannot show.

    broker SIGKILL and restart under load    nothing lost, nothing stuck, esmd ready again
    2 then 3 esmd instances in one group     every record delivered, one instance leaving;
                                             commits read back with Kafka's own tool
    1,000,000 records                        beyond the mock's retention: exactly once, in order
    partitions added at run time             picked up by esmd's metadata refresh
    backpressure, a stuck partition          160,000 records on 2 partitions, one failing: the
                                             consumer is held at the budget, the stuck
                                             partition paused, the other delivered in full;
                                             then everything exactly once, in order
    backpressure, the budget spread          3 partitions of under two batches each behind a
                                             function that does not answer: a consumer
                                             joining the group still gets its partition
    a revoked partition's failing batch      its old owner stops retrying it; then
                                             everything delivered and committed
    SASL/PLAIN                               through the connection's properties; a wrong
                                             password is a 503 and a log line, not a crash

The endpoint does not keep the bodies here: a Tally counts every delivery as it arrives (per
partition: the offsets delivered at least once, the duplicates, and any first delivery out of
offset order), so a million records cost a few integers."""

import json
import re
import signal
import threading
import time

import pytest

import servers
from endpoint import Endpoint, Response
from kafka_tally import Producer, Tally, kafka_cfg, wait_committed
from servers import wait_for

pytestmark = pytest.mark.kafka


# ---- helpers --------------------------------------------------------------------------------


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


def join_group(broker, group, topic, timeout=60):
    """A confluent-kafka consumer joins `group` on `topic` (committing nothing) and polls until it
    gets partitions or `timeout` passes. Returns (consumer, the partitions it got: [] if none);
    the caller closes the consumer (leaving the group)."""
    import confluent_kafka

    assigned = []
    other = confluent_kafka.Consumer({"bootstrap.servers": broker.plaintext_bootstrap,
                                      "group.id": group, "enable.auto.commit": False,
                                      "auto.offset.reset": "earliest"})
    other.subscribe([topic], on_assign=lambda c, ps: assigned.extend(ps))
    deadline = time.monotonic() + timeout
    while not assigned and time.monotonic() < deadline:
        other.poll(0.2)
    return other, assigned


def filled_topic(broker, names, parts, count, size, timeout):
    """A new topic of `parts` partitions holding `count` records of `size` B (record i in
    partition i % parts), a new group name, and the topic's watermarks."""
    topic = broker.create_topic(names.topic(), parts)
    broker.produce(topic, count=count, size=size, partitions=parts, timeout=timeout)
    return topic, names.group(), broker.watermarks(topic)


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
    # The broker has the commit before esmd has run its commit callback, which counts it.
    wait_for(lambda: proc.metrics().get("esmd_committed_events_total") == total, 30, 0.2,
             "esmd_committed_events_total to reach %d" % total)
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


# ---- 5. backpressure: the budget held by a stuck partition -----------------------------------


def test_backpressure_stuck_partition_does_not_hold_the_other(broker, postgres, endpoint, esmd,
                                                              names):
    """docs/design.md#backpressure: more records wait than the mapping's budget (50,000), all of
    partition 0, whose records fail (a partial batch response names the first of them) until
    partition 1 is delivered in full. The consumer is held at the budget; the hold lasts, so
    partition 0 is paused and the consumer served again: partition 1 is not starved. Then
    partition 0 heals: every record succeeds exactly once, in offset order, all committed."""
    parts, total, budget = 2, 160_000, 50_000
    topic, group, hw = filled_topic(broker, names, parts, total, 20, 240)
    assert hw == {0: total // 2, 1: total // 2}
    healed = threading.Event()
    lock = threading.Lock()
    done = {0: [], 1: []}  # offsets that succeeded, in the order of their success

    def on_request(req):
        ev = req.json if isinstance(req.json, dict) else {}
        recs = [r for lst in (ev.get("records") or {}).values() for r in lst]
        failing = None
        if not healed.is_set():
            p0 = [r["offset"] for r in recs if r["partition"] == 0]
            failing = min(p0) if p0 else None
        with lock:
            for r in recs:
                if r["partition"] == 0 and failing is not None:
                    continue  # named below: it and the rest of its partition are retried
                done[r["partition"]].append(r["offset"])
        req.body, req.json = b"", None
        if failing is None:
            return None
        return Response(200, {"batchItemFailures": [
            {"itemIdentifier": {"partition": "%s-0" % topic, "offset": failing}}]})

    endpoint.behaviour = on_request
    cfg = kafka_cfg(broker, topic, group, endpoint.url, names.mapping(), batch_size=500,
                    window="50ms", timeout="30s")
    cfg["mappings"][0]["report_batch_item_failures"] = True
    cfg["mappings"][0]["maximum_retry_attempts"] = -1
    proc = esmd(cfg, env={"ESMD_MAPPING_RETRY_BACKOFF": "20,200"})
    peak = [0.0]

    def metric(name):
        m = proc.metrics()
        peak[0] = max(peak[0], m.get("esmd_pending_records"))
        return m.get(name)

    # the budget is reached (partition 0 alone has more records than it), the consumer held,
    # and the hold lasts (partition 0 never drains): partition 0 is paused
    wait_for(lambda: metric("esmd_source_holds_total") >= 1, 120, 0.2, "the consumer held")
    wait_for(lambda: metric("esmd_shard_pauses_total") >= 1, 120, 0.2, "partition 0 paused")

    def partition_1_done():
        metric("esmd_pending_records")
        with lock:
            return len(done[1]) >= hw[1]
    wait_for(partition_1_done, 180, 0.2, "partition 1 delivered while partition 0 fails")
    with lock:
        assert not done[0], "partition 0 succeeded before it healed: %s" % done[0][:5]
    healed.set()

    def all_done():
        metric("esmd_pending_records")
        with lock:
            return len(done[0]) >= hw[0]
    wait_for(all_done, 180, 0.2, "partition 0 delivered once healed")
    time.sleep(1.0)  # a redelivery would show up now
    with lock:
        for p in range(parts):
            assert done[p] == list(range(hw[p])), (
                "partition %d: %d successes, not offsets 0..%d once each in order" % (
                    p, len(done[p]), hw[p] - 1))
    wait_committed(broker, group, topic, hw, timeout=60)
    # memory stays bounded (docs/design.md#backpressure): the budget, plus two batches for each
    # shard paused with records waiting, plus one turn of the consumer's queue (1,000 records)
    assert peak[0] <= budget + parts * 2 * 500 + 1000, peak[0]
    assert proc.stop() == 0


def test_backpressure_hold_spread_over_partitions_lets_a_rebalance_through(broker, postgres,
                                                                            endpoint, esmd,
                                                                            names):
    """docs/design.md#backpressure: a hold that lasts a second lets the consumer be served, so a
    rebalance waits at most about that second, also when the budget (50,000 records) is spread
    over partitions that each have less than two batches waiting (batch_size 10,000: 3
    partitions of 19,500 records) behind a function that does not answer. Before, those
    partitions were paused and resumed at once and the consumer held again in the same turn: a
    consumer joining the group got nothing until the function answered. Then the function
    answers: every record delivered, first deliveries in offset order, all committed."""
    pytest.importorskip("confluent_kafka")
    parts, per = 3, 19_500
    topic, group, hw = filled_topic(broker, names, parts, parts * per, 20, 240)
    assert hw == {p: per for p in range(parts)}
    tally = Tally(endpoint, topic)
    count = tally._on_request
    answer = threading.Event()

    def blocked(req):
        answer.wait(300)
        return count(req)

    endpoint.behaviour = blocked
    proc = esmd(kafka_cfg(broker, topic, group, endpoint.url, names.mapping(), batch_size=10_000,
                          window="0s", max_concurrency=4, timeout="300s"))
    try:
        wait_for(lambda: proc.metrics().get("esmd_source_holds_total") >= 1, 120, 0.2,
                 "the consumer held")
        other, assigned = join_group(broker, group, topic)
        try:
            assert assigned, ("a consumer joining the group got no partition in 60 s while "
                              "esmd was held by a function that did not answer")
            assert not answer.is_set()
        finally:
            other.close()  # leaves the group; nothing committed
    finally:
        answer.set()
    tally.wait_complete(hw, 180)
    lost, dups = tally.report("hold spread over partitions", hw)
    assert lost == 0
    tally.assert_in_order(hw)
    wait_committed(broker, group, topic, hw, timeout=60)
    assert proc.stop() == 0


def test_revoked_partition_is_not_retried_by_its_old_owner(broker, postgres, endpoint, esmd,
                                                           names):
    """docs/kafka.md#rebalances-and-scaling-out: a batch of a partition taken away by a rebalance
    is not retried any more by the instance that lost it (its new owner reads the records again):
    before, its retries went on (here for ever: maximum_retry_attempts -1), sending records of a
    partition another consumer owned and holding them and a concurrency slot. The function fails
    every batch; a consumer joins the group and takes a partition; esmd's requests with records
    of that partition stop. Then the function heals, the consumer leaves: everything delivered
    and committed."""
    pytest.importorskip("confluent_kafka")
    parts, per = 2, 20
    topic, group, hw = filled_topic(broker, names, parts, parts * per, 20, 60)
    healed = threading.Event()
    lock = threading.Lock()
    sent = {p: 0 for p in range(parts)}  # requests holding records of partition p
    tally = Tally(endpoint, topic)
    count = tally._on_request

    def on_request(req):
        ev = req.json if isinstance(req.json, dict) else {}
        ps = {r["partition"] for lst in (ev.get("records") or {}).values() for r in lst}
        with lock:
            for p in ps:
                sent[p] += 1
        if not healed.is_set():
            req.body, req.json = b"", None
            return Response(500, {"message": "failing until healed"})
        return count(req)

    endpoint.behaviour = on_request
    cfg = kafka_cfg(broker, topic, group, endpoint.url, names.mapping(), batch_size=10,
                    window="0s")
    cfg["mappings"][0]["maximum_retry_attempts"] = -1
    proc = esmd(cfg, env={"ESMD_MAPPING_RETRY_BACKOFF": "50,100"})
    wait_for(lambda: all(sent[p] >= 3 for p in range(parts)), 60, 0.1,
             "both partitions' batches retried")
    other, assigned = join_group(broker, group, topic)
    try:
        assert assigned, "the joining consumer got no partition"
        lost = assigned[0].partition
        kept = 1 - lost

        def shards():
            other.poll(0.1)
            st, body = proc.get("/admin/mappings/" + cfg["mappings"][0]["name"])
            return json.loads(body)["status"]["shards"] if st == 200 else -1

        wait_for(lambda: shards() == 1, 60, 0.1, "esmd to own the other partition")
        for _ in range(10):  # a request under way when the partition was revoked ends
            other.poll(0.1)
        with lock:
            before = dict(sent)

        def retried_kept():
            other.poll(0.1)
            with lock:
                return sent[kept] >= before[kept] + 10
        wait_for(retried_kept, 60, 0.1, "esmd retrying the partition it kept")
        with lock:
            after = dict(sent)
        assert after[lost] == before[lost], (
            "esmd went on retrying partition %d after it was revoked: %d more requests" % (
                lost, after[lost] - before[lost]))
    finally:
        other.close()
    healed.set()
    tally.wait_complete(hw, 120)
    lost_n, dups = tally.report("revoked while retrying", hw)
    assert lost_n == 0
    wait_committed(broker, group, topic, hw, timeout=60)
    assert proc.stop() == 0
