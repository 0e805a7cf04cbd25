"""Lambda's event source mapping system logs (docs/operations.md#esm-logging): a mapping's
`logging: { system_log_level }` writes POLLER_STATUS_EVENT, KAFKA_STATUS_EVENT and
ESM_PROCESSING_EVENT as JSON lines on esmd's log; the level filters which appear."""
import subprocess

import servers
from endpoint import Response
from servers import wait_for
from test_pgqueue_e2e import pgq_config, queues  # noqa: F401

STATUS_ENV = {"ESMD_KAFKA_STATUS_INTERVAL_MS": "300", "ESMD_MAPPING_RETRY_BACKOFF": "50,100"}
EVENT_TYPES = {"POLLER_STATUS_EVENT", "KAFKA_STATUS_EVENT", "ESM_PROCESSING_EVENT"}


def events(proc, kind=None):
    return [e for e in proc.log_lines()
            if e.get("eventType") in EVENT_TYPES and (kind is None or e["eventType"] == kind)]


def logging(level):
    return {"mapping_extra": {"logging": {"system_log_level": level}}}


def test_kafka_debug_poller_and_status_events(kafka, endpoint, esmd, kafka_config, names):
    topic = kafka.create_topic(names.topic(), 2)
    kafka.produce(topic, [{"partition": 0, "value": "a%d" % i} for i in range(7)] +
                  [{"partition": 1, "value": "b%d" % i} for i in range(3)])
    group = names.group()
    cfg = kafka_config(topic, group=group, **logging("DEBUG"))
    mapping = cfg["mappings"][0]["name"]
    proc = esmd(cfg, env=STATUS_ENV)
    endpoint.wait_records(10)
    want = {"%s-0" % topic: 7, "%s-1" % topic: 3}

    def settled():
        last = {}
        for e in events(proc, "KAFKA_STATUS_EVENT"):
            last[e["partition"]] = e
        return len(last) == 2 and all(
            last[p]["endOffset"] == n and last[p]["consumedOffset"] == n and
            last[p]["processedOffset"] == n and last[p]["committedOffset"] == n
            for p, n in want.items())
    wait_for(settled, 60, 0.2, "KAFKA_STATUS_EVENT lines with every offset at the end")
    # what the lines say was committed is what the group has
    assert kafka.committed(group, topic) == {0: 7, 1: 3}

    st = events(proc, "KAFKA_STATUS_EVENT")[-1]
    assert st["level"] == "debug" and st["logLevel"] == "DEBUG" and st["msg"] == st["eventType"]
    assert st["mapping"] == mapping and st["function"] == "fn"
    assert st["topic"] == topic and st["partition"] == "%s-%d" % (topic, st["partitionId"])
    assert {"endOffset", "consumedOffset", "processedOffset", "committedOffset"} <= set(st)

    polls = events(proc, "POLLER_STATUS_EVENT")
    assert polls[0]["pollerStatus"] == "STARTED" and polls[0]["source"] == "kafka"
    assigned = [e for e in polls if e["pollerStatus"] == "PARTITIONS_ASSIGNED"]
    assert assigned, polls
    a = assigned[-1]
    assert a["logLevel"] == "INFO" and a["consumerGroupId"] == group
    assert sorted(a["assignedPartitions"]) == sorted(want) and sorted(a["partitions"]) == sorted(want)
    assert a["rebalanceGeneration"] >= 1 and a["memberId"]
    assert a["rebalanceProtocol"] in ("EAGER", "COOPERATIVE")
    assert not events(proc, "ESM_PROCESSING_EVENT"), "nothing went wrong"

    # a graceful stop revokes the partitions: said too
    proc.stop(timeout=30)
    revoked = [e for e in events(proc, "POLLER_STATUS_EVENT")
               if e["pollerStatus"] in ("PARTITIONS_REVOKED", "PARTITIONS_LOST")]
    assert revoked and revoked[-1]["assignedPartitions"] == [], revoked
    assert revoked[-1]["rebalanceGeneration"] > a["rebalanceGeneration"]


def test_warn_level_shows_processing_events_only(kafka, endpoint, esmd, kafka_config, names):
    topic = kafka.create_topic(names.topic(), 1)
    kafka.produce(topic, [{"partition": 0, "value": "x"}])
    # a throttle, then an error status twice: retried once, then given up (1 retry allowed)
    endpoint.script([Response(429, {"message": "Rate Exceeded."}, {"Retry-After": "0"}),
                     Response(500, {"message": "boom"}), Response(500, {"message": "boom"})])
    cfg = kafka_config(topic, mapping_extra={"logging": {"system_log_level": "WARN"},
                                             "maximum_retry_attempts": 1})
    proc = esmd(cfg, env=STATUS_ENV)

    def given_up():
        return any(e["action"] == "DISCARD" for e in events(proc, "ESM_PROCESSING_EVENT"))
    wait_for(given_up, 60, 0.1, "the give-up's ESM_PROCESSING_EVENT")
    ev = events(proc, "ESM_PROCESSING_EVENT")
    got = [(e["error"]["errorCode"], e["action"]) for e in ev]
    assert got == [("Throttled", "RETRY"), ("FunctionErrorStatus", "RETRY"),
                   ("RetryAttemptsExhausted", "DISCARD")], got
    for e in ev:
        assert e["level"] == "warn" and e["logLevel"] == "WARN" and e["batchSize"] == 1
        assert e["error"]["errorMessage"]
    assert ev[1]["request_id"] and ev[1]["invokeCount"] == 1
    assert ev[2]["invokeCount"] == 2
    # WARN lets neither INFO nor DEBUG events through
    assert {e["eventType"] for e in events(proc)} == {"ESM_PROCESSING_EVENT"}


def test_no_logging_no_system_logs(kafka, endpoint, esmd, kafka_config, names):
    topic = kafka.create_topic(names.topic(), 1)
    kafka.produce(topic, [{"partition": 0, "value": "x"}])
    endpoint.fail_first(1)
    proc = esmd(kafka_config(topic), env=STATUS_ENV)
    endpoint.wait_records(1)
    wait_for(lambda: len(endpoint.ok_requests()) >= 1, 30, 0.1, "the retried batch")
    assert not events(proc)


def test_pgqueue_poller_started_and_redelivery_event(queues, endpoint, esmd, pgq_config):
    q = queues()
    q.send("m")
    endpoint.fail_first(1)
    cfg = pgq_config(q.name, visibility="1s", timeout="1s", **logging("INFO"))
    proc = esmd(cfg)
    wait_for(lambda: len(endpoint.ok_requests()) >= 1, 60, 0.1, "the redelivered message")
    polls = events(proc, "POLLER_STATUS_EVENT")
    assert [(e["pollerStatus"], e["source"]) for e in polls] == [("STARTED", "pgqueue")]
    proc_ev = events(proc, "ESM_PROCESSING_EVENT")
    assert [(e["error"]["errorCode"], e["action"]) for e in proc_ev] == [
        ("FunctionErrorStatus", "REDELIVER")]


def test_logging_config_checked_and_shown(tmp_path, esmd, kafka, kafka_config, names):
    bad = tmp_path / "bad.yaml"
    bad.write_text("postgres: postgresql://x\nfunctions: { fn: { url: 'http://127.0.0.1:9/' } }\n"
                   "mappings:\n  - name: m\n    function: fn\n    source: { pgqueue: q }\n"
                   "    logging: { system_log_level: TRACE }\n")
    r = subprocess.run([servers.binary("esmd"), "check-config", str(bad)], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True, timeout=30)
    assert r.returncode == 1
    assert ("%s:7:34: mappings[0].logging.system_log_level: " % bad) in r.stderr + r.stdout, \
        r.stderr + r.stdout
    assert "DEBUG, INFO, WARN" in r.stderr + r.stdout

    topic = kafka.create_topic(names.topic(), 1)
    proc = esmd(kafka_config(topic, **logging("INFO")))
    status, body = proc.get("/2015-03-31/event-source-mappings")
    assert status == 200, body
    import json
    esm = json.loads(body)["EventSourceMappings"][0]
    assert esm["LoggingConfig"] == {"SystemLogLevel": "INFO"}
