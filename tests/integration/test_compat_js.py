"""Lambda's own JavaScript libraries, unchanged, against esmd (tests/compat/js, installed by
scripts/install-deps with `npm ci` at the versions of its package-lock.json):

- Powertools for AWS Lambda (TypeScript) 2.35: a Node.js function (tests/compat/js/function.mjs)
  behind a real Kafka topic, Postgres queue and Redis stream validates every event with
  Powertools' parser schema for the source, and processes SQS and Kinesis batches with
  BatchProcessor + processPartialResponse; the records it reports in batchItemFailures must be
  exactly the ones esmd delivers again.
- @types/aws-lambda: the captured events type-check with `tsc --strict` as `satisfies
  SelfManagedKafkaEvent`, `SQSEvent` and `KinesisStreamEvent`.
- The AWS SDK for JavaScript v3: every admin operation esmd supports (tests/compat/js/sdk.mjs).

Lambda's libraries are the judges: where they and esmd disagree, esmd changes."""

import base64
import json
import os
import shutil
import subprocess

import pytest

import servers
from servers import wait_for

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
JS = os.path.join(ROOT, "tests", "compat", "js")
NODE = shutil.which("node")

pytestmark = pytest.mark.skipif(
    not NODE or not os.path.isdir(os.path.join(JS, "node_modules")),
    reason="node or tests/compat/js/node_modules missing (run scripts/install-deps)")


class NodeFunction:
    """tests/compat/js/function.mjs MODE on a free port; .url, .events() (captured lines)."""

    def __init__(self, mode, tmp):
        self.port = servers.free_port()
        self.capture = os.path.join(str(tmp), "%s-events.jsonl" % mode)
        self.log = open(os.path.join(str(tmp), "%s-function.log" % mode), "wb")
        self.proc = subprocess.Popen([NODE, os.path.join(JS, "function.mjs"), mode,
                                      str(self.port), self.capture], cwd=JS,
                                     stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        self.url = "http://127.0.0.1:%d/2015-03-31/functions/function/invocations" % self.port
        wait_for(lambda: self._up(), 30, 0.1, "the Node.js function")

    def _up(self):
        if self.proc.poll() is not None:
            raise RuntimeError("function.mjs exited: %s" % open(self.log.name).read()[-2000:])
        return servers.http_get("http://127.0.0.1:%d/" % self.port)[0] == 200

    def events(self):
        if not os.path.exists(self.capture):
            return []
        with open(self.capture) as f:
            return [json.loads(line) for line in f if line.strip()]

    def close(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.log.close()


@pytest.fixture
def node_function(tmp_path):
    started = []

    def make(mode):
        fn = NodeFunction(mode, tmp_path)
        started.append(fn)
        return fn

    yield make
    for fn in started:
        fn.close()


def assert_parsed(fn):
    bad = [e["parseError"] for e in fn.events() if not e["parsed"]]
    assert not bad, "Powertools' parser refused %d event(s): %s" % (len(bad), bad[0])


def typecheck(kind, type_name, events):
    """tsc --strict: every captured event `satisfies` @types/aws-lambda's type."""
    lines = ["import type { %s } from 'aws-lambda';" % type_name, ""]
    for i, ev in enumerate(events):
        lines.append("export const %s%d = %s satisfies %s;" % (kind, i, json.dumps(ev),
                                                               type_name))
    with open(os.path.join(JS, "events.gen.ts"), "w") as f:
        f.write("\n".join(lines) + "\n")
    r = subprocess.run([os.path.join(JS, "node_modules", ".bin", "tsc"), "-p", JS],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, "tsc --strict refused the %s events:\n%s" % (
        type_name, (r.stdout + r.stderr)[-4000:])


def wait_processed(fn, expected, timeout=60):
    def done():
        got = [p for e in fn.events() for p in e["processed"]]
        return len(got) >= expected
    wait_for(done, timeout, 0.2, "%d records processed by the Node.js function" % expected)


@pytest.mark.kafka
def test_powertools_ts_kafka_consumer_and_types(kafka, esmd, kafka_config, names, node_function):
    fn = node_function("kafka")
    topic = kafka.create_topic(names.topic(), 2)
    recs = [{"partition": i % 2, "key": "k%d" % i if i % 3 else None,
             "value": json.dumps({"id": i, "type": "order"}),
             "headers": [["source", "web"], ["n", str(i)]]} for i in range(12)]
    kafka.produce(topic, recs)
    esmd(kafka_config(topic, batch_size=5, url=fn.url))
    wait_processed(fn, 12)
    assert_parsed(fn)
    got = sorted((p for e in fn.events() for p in e["processed"]),
                 key=lambda p: p["value"]["id"])
    assert [p["value"] for p in got] == [{"id": i, "type": "order"} for i in range(12)]
    for p in got:
        i = p["value"]["id"]
        assert p["topic"] == topic and p["partition"] == i % 2
        assert p["key"] == ("k%d" % i if i % 3 else None), p
        assert p["headers"] == [{"source": "web"}, {"n": str(i)}], p["headers"]
    # Lambda leaves the key of a keyless record out, and so does esmd; @types/aws-lambda declares
    # `key: string` all the same, so a keyless record fails its type on Lambda too. The records
    # with a key are checked; that the others have no `key` at all is asserted here.
    keyed = []
    for e in fn.events():
        ev = json.loads(json.dumps(e["event"]))
        for tp, recs in ev["records"].items():
            for r in recs:
                if int(json.loads(base64.b64decode(r["value"]))["id"]) % 3 == 0:
                    assert "key" not in r, r
            ev["records"][tp] = [r for r in recs if "key" in r]
        ev["records"] = {tp: recs for tp, recs in ev["records"].items() if recs}
        if ev["records"]:
            keyed.append(ev)
    assert keyed
    typecheck("kafka", "SelfManagedKafkaEvent", keyed)


def pgqueue_config(postgres, url, queue, name):
    return {
        "postgres": postgres.url,
        "functions": {"fn": {"url": url, "timeout": "2s", "max_concurrency": 4}},
        "mappings": [{"name": name, "function": "fn",
                      # a failed message is visible again after this
                      "source": {"pgqueue": queue, "visibility_timeout": "2s",
                                 "maximum_concurrency": 2},
                      "batch_size": 5, "maximum_batching_window": "200ms",
                      "report_batch_item_failures": True}],
    }


def test_powertools_ts_sqs_batch_processor_partial_failures(postgres, esmd, names,
                                                            node_function):
    fn = node_function("sqs")
    name = names.mapping()
    queue = name + "_q"
    proc = esmd(pgqueue_config(postgres, fn.url, queue, name))
    failing = {2, 5, 11}
    ids = {}
    for i in range(15):
        body = json.dumps({"id": i, "fail": i in failing})
        ids[i] = postgres.sql("SELECT esmd.send('%s', '%s')" % (queue, body))[0][0]
    wait_processed(fn, 15, timeout=90)  # a failed message is processed on its second delivery
    assert_parsed(fn)
    evs = fn.events()
    reported = [mid for e in evs for mid in e["failures"]]
    assert sorted(reported) == sorted(ids[i] for i in failing), reported
    # exactly the reported messages came again: every other message was delivered once
    deliveries = {}
    for e in evs:
        for r in e["event"]["Records"]:
            deliveries[r["messageId"]] = deliveries.get(r["messageId"], 0) + 1
    assert deliveries == {ids[i]: (2 if i in failing else 1) for i in range(15)}, deliveries
    wait_for(lambda: int(postgres.sql("SELECT count(*) FROM esmd.queue_messages WHERE queue = "
                                      "'%s'" % queue)[0][0]) == 0, 30, 0.2, "an empty queue")
    typecheck("sqs", "SQSEvent", [e["event"] for e in evs])
    assert proc.running()


def test_powertools_ts_kinesis_batch_processor_on_a_redis_stream(postgres, redis, esmd, names,
                                                                  node_function):
    fn = node_function("kinesis")
    stream = names.topic()
    failing = {1, 6}
    entry_ids = {}
    for i in range(10):
        entry_ids[i] = redis.command("XADD", stream, "*", "id", str(i),
                                     "fail", "true" if i in failing else "false")
    cfg = {
        "postgres": postgres.url,
        "connections": {"r": {"type": "redis", "url": redis.url}},
        "functions": {"fn": {"url": fn.url, "timeout": "10s", "max_concurrency": 2}},
        "mappings": [{"name": names.mapping(), "function": "fn",
                      "source": {"redis": "r", "stream": stream, "group": "g"},
                      "batch_size": 4, "maximum_batching_window": "200ms",
                      "report_batch_item_failures": True}],
    }
    esmd(cfg)
    # A failed record is retried with what follows it (Kinesis's rule: the batch restarts at
    # the first reported sequence number), so count distinct ids, not deliveries.
    def all_done():
        got = set()
        for e in fn.events():
            for p in e["processed"]:
                got.add(json.loads(p)["id"])
        return got == {str(i) for i in range(10)}
    wait_for(all_done, 60, 0.2, "every entry processed")
    assert_parsed(fn)
    evs = fn.events()
    reported = [sid for e in evs for sid in e["failures"]]
    assert sorted(reported) == sorted(entry_ids[i] for i in failing), (reported, entry_ids)
    for e in evs:
        for r in e["event"]["Records"]:
            assert r["eventSource"] == "aws:kinesis"
    typecheck("kinesis", "KinesisStreamEvent", [e["event"] for e in evs])
    wait_for(lambda: redis.command("XPENDING", stream, "g")[0] == 0, 30, 0.2,
             "nothing pending in the group")


@pytest.mark.kafka
def test_js_sdk_v3_every_admin_operation(esmd, kafka, kafka_config, names):
    cfg = kafka_config(kafka.create_topic(names.topic(), 1))
    cfg["admin"] = {"aws_credentials": {"access_key_id": "esmd-js",
                                        "secret_access_key": "js/secret+KEY"}}
    proc = esmd(cfg)
    r = subprocess.run([NODE, os.path.join(JS, "sdk.mjs"), proc.admin, "esmd-js",
                        "js/secret+KEY", "fn"], capture_output=True, text=True, timeout=120,
                       cwd=JS)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    failed = [c for c in out["checks"] if not c["ok"]]
    assert not failed, json.dumps(failed, indent=1)[:4000]
    assert len(out["checks"]) >= 30, out["checks"]
