"""The admin console (/ui/, docs/admin.md "Console") in a real browser: headless Chromium
(Debian's /usr/bin/chromium) driven by Playwright (tests/browser/console.mjs, playwright-core
installed by scripts/install-deps with `npm ci` in tests/browser), against esmd with a real Redis
stream, Postgres (the async queue and a pgqueue:// dead-letter queue) and a recording function.

The script logs in, pauses the mapping, sees the lag of the records produced meanwhile, resumes
it and sees the lag fall to 0, inspects a record the mapping gave up (it holds <script> and an
<img onerror>: shown as text, nothing runs), redrives a dead letter after a confirmation, and
visits every view. A screenshot of each view is saved in the directory the test prints
(ESMD_CONSOLE_SHOTS to choose it)."""

import base64
import json
import os
import queue
import shutil
import subprocess
import threading

import pytest
import requests

import servers
from endpoint import Response
from test_async_e2e import TOKEN, invoke, wait
from test_redis_e2e import produce, xadd

JS = os.path.join(servers.ROOT, "tests", "browser")
NODE = shutil.which("node")
CHROMIUM = "/usr/bin/chromium"
FUNCTION_ERROR = {"X-Amz-Function-Error": "Unhandled"}
POISON = "<script>__esmdXss(1)</script><img src=x onerror=__esmdXss(2)>"
DLQ_MARK = "dead-letter-<i>17</i>"
PRODUCED = 300

pytestmark = pytest.mark.skipif(
    not NODE or not os.path.isdir(os.path.join(JS, "node_modules")) or
    not os.access(CHROMIUM, os.X_OK),
    reason="node, tests/browser/node_modules or /usr/bin/chromium missing "
           "(run scripts/install-deps)")


class Function:
    """The endpoint's behaviour: a batch holding the poison entry fails (the mapping gives it
    up); the event holding DLQ_MARK fails the first time only (it is dead-lettered, and the
    redrive succeeds); stream batches take a little time, so that the lag falls in steps."""

    def __init__(self):
        self.lock = threading.Lock()
        self.dlq_calls = 0

    def __call__(self, req):
        ev = req.json if isinstance(req.json, dict) else {}
        if ev.get("mark") == DLQ_MARK:
            with self.lock:
                self.dlq_calls += 1
                first = self.dlq_calls == 1
            if first:
                return Response(200, {"errorType": "Boom", "errorMessage": "not yet"},
                                headers=FUNCTION_ERROR)
            return None
        recs = ev.get("Records") or []
        for rec in recs:
            fields = json.loads(base64.b64decode(rec["kinesis"]["data"]))
            if "bad" in fields:
                return Response(200, {"errorType": "Poison",
                                      "errorMessage": "cannot take <b>it</b>"},
                                headers=FUNCTION_ERROR)
        return Response(200, b"{}", delay=0.15) if recs else None


def test_console_in_chromium(redis, postgres, endpoint, esmd, names, tmp_path):
    shots = os.environ.get("ESMD_CONSOLE_SHOTS") or str(tmp_path / "console-screenshots")
    os.makedirs(shots, exist_ok=True)
    print("\nconsole screenshots: %s" % shots)
    db = postgres.create_db("console_%d" % os.getpid())
    stream, mapping = names.topic(), "orders"  # the database is this test's own
    fn = Function()
    endpoint.behaviour = fn
    cfg = {
        "postgres": db,
        "admin": {"token": TOKEN},
        "async_queue": {"retry_base": "300ms", "backoff_base": "100ms", "backoff_cap": "400ms",
                        "poll_interval": "100ms"},
        "connections": {"r": {"type": "redis", "url": redis.url}},
        "functions": {"fn": {"url": endpoint.url, "timeout": "10s", "max_concurrency": 4,
                             "async": {"maximum_retry_attempts": 0,
                                       "dead_letter": "pgqueue://fn_dlq"}}},
        "mappings": [{"name": mapping, "function": "fn",
                      "source": {"redis": "r", "stream": stream, "group": "g"},
                      "batch_size": 10, "maximum_batching_window": "50ms",
                      "maximum_retry_attempts": 0}],
    }
    proc = esmd(cfg, env={"ESMD_CONSOLE_SAMPLE_MS": "1000",
                          "ESMD_MAPPING_RETRY_BACKOFF": "50,100"})
    # before the browser comes: a record the mapping gives up, and a dead letter
    xadd(redis, stream, ("bad", POISON))
    assert invoke(proc, "fn", {"mark": DLQ_MARK}).status_code == 202
    wait(lambda: len(requests.get(proc.admin + "/admin/dead-letters/fn_dlq", timeout=10,
                                  headers={"Authorization": "Bearer " + TOKEN})
                     .json()["messages"]) == 1, what="the dead letter")

    args = {"url": proc.admin, "token": TOKEN, "mapping": mapping, "queue": "fn_dlq",
            "shots": shots, "chromium": CHROMIUM, "poison": POISON,
            "deadLetterMark": DLQ_MARK, "produced": PRODUCED}
    node = subprocess.Popen([NODE, os.path.join(JS, "console.mjs"), json.dumps(args)], cwd=JS,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    out = queue.Queue()
    threading.Thread(target=lambda: [out.put(line) for line in node.stdout] + [out.put(None)],
                     daemon=True).start()
    log = []
    try:
        while True:
            try:
                line = out.get(timeout=150)
            except queue.Empty:
                raise AssertionError("console.mjs silent for 150 s; so far:\n" + "".join(log))
            if line is None:
                break
            log.append(line)
            if line.startswith("ASK produce"):
                produce(redis, stream, PRODUCED)
            elif line.startswith("ASK delivered"):
                wait(lambda: fn.dlq_calls == 2 and any(
                    r.json == {"mark": DLQ_MARK} for r in endpoint.ok_requests()),
                     what="the redriven event delivered")
            if line.startswith("ASK "):
                node.stdin.write("done\n")
                node.stdin.flush()
        rc = node.wait(timeout=30)
    finally:
        if node.poll() is None:
            os.killpg(node.pid, 9)
            node.wait()
    err = node.stderr.read()
    assert rc == 0 and log and log[-1].strip() == "OK", "".join(log) + err
    for view in ("login", "mappings", "mapping", "queues", "queue", "redrive-confirm", "async",
                 "functions", "console"):
        assert os.path.getsize(os.path.join(shots, view + ".png")) > 1000, view
    # what the browser did reached esmd: the mapping is enabled again, the dead letter is gone
    assert fn.dlq_calls == 2
