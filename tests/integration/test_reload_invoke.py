"""A configuration reload reaches Invoke, the async queue and event-invoke-config
(docs/async.md#reload, docs/operations.md#reload): a function added by a reload is invoked at
once, a removed one answers ResourceNotFoundException (404) and its queued events wait for it,
a changed url / timeout / async section applies to the next attempt of events queued before the
reload, and a reload racing with many Invokes loses and duplicates nothing.

Real Postgres, recording endpoints (endpoint.py), the AWS SDK for Python (boto3) as the
client. Retry delays are shortened with the async_queue section."""

import json
import signal
import threading
import time

import boto3
import botocore.config
import botocore.exceptions
import pytest
import requests
import yaml

import servers
from endpoint import Endpoint, Response

from test_async_e2e import FAST, db, sink  # noqa: F401 (fixtures: a database, a sink)

AKID = "esmd-reload"
SECRET = "reload/secret+KEY"
TOKEN = "reload-token"


@pytest.fixture
def other():
    """A second function endpoint."""
    ep = Endpoint()
    yield ep
    ep.close()


def config(db, functions, **async_queue):
    return {"postgres": db[0],
            "admin": {"token": TOKEN,
                      "aws_credentials": {"access_key_id": AKID, "secret_access_key": SECRET}},
            "async_queue": dict(FAST, **async_queue), "functions": functions}


def client(proc):
    return boto3.client(
        "lambda", endpoint_url=proc.admin, region_name="us-east-1", aws_access_key_id=AKID,
        aws_secret_access_key=SECRET,
        config=botocore.config.Config(retries={"max_attempts": 1, "mode": "standard"},
                                      connect_timeout=5, read_timeout=30,
                                      max_pool_connections=32))


def rewrite(proc, cfg):
    """Writes cfg as the file (the listener as it was) and reloads by SIGHUP; returns the
    reload's summary from the log."""
    with open(proc.config_path) as f:
        listen = yaml.safe_load(f)["admin"]["listen"]
    cfg = dict(cfg)
    cfg["admin"] = dict(cfg["admin"], listen=listen)
    with open(proc.config_path, "w") as f:
        f.write(yaml.safe_dump(cfg, sort_keys=False))
    before = proc.log().count("SIGHUP: reloaded")
    proc.proc.send_signal(signal.SIGHUP)
    servers.wait_for(lambda: proc.log().count("SIGHUP: reloaded") > before, 20, 0.05,
                     "the SIGHUP reload")
    line = [ln for ln in proc.log().splitlines() if "SIGHUP: reloaded" in ln][-1]
    return json.loads(json.loads(line)["msg"].split("SIGHUP: reloaded: ", 1)[1])


def listed_functions(proc):
    """The names /admin/functions lists."""
    r = requests.get(proc.admin + "/admin/functions", headers={"Authorization": "Bearer " + TOKEN},
                     timeout=10)
    assert r.status_code == 200, r.text
    return sorted(f["name"] for f in r.json()["functions"])


def invoke(c, fn, payload, itype):
    return c.invoke(FunctionName=fn, InvocationType=itype, Payload=json.dumps(payload).encode())


def not_found(call):
    with pytest.raises(botocore.exceptions.ClientError) as ei:
        call()
    err = ei.value.response
    assert err["Error"]["Code"] == "ResourceNotFoundException", err
    assert err["ResponseMetadata"]["HTTPStatusCode"] == 404, err
    return err


def wait(pred, what, timeout=30):
    servers.wait_for(pred, timeout, 0.05, what)


def payloads(ep, key="id"):
    return [json.loads(r.body)[key] for r in ep.ok_requests()]


def queued(postgres, db, fn):
    return int(postgres.sql("SELECT count(*) FROM esmd.async_events WHERE function = '%s'" % fn,
                            db[1])[0][0])


# ---- added, removed -------------------------------------------------------------------------

def test_function_added_is_invoked_at_once_and_a_removed_one_is_not_found(esmd, db, endpoint,
                                                                           other, sink):
    proc = esmd(config(db, {"fn": {"url": endpoint.url}}))
    c = client(proc)
    not_found(lambda: invoke(c, "added", {"id": 0}, "RequestResponse"))

    fns = {"fn": {"url": endpoint.url},
           "added": {"url": other.url, "async": {"maximum_retry_attempts": 1,
                                                 "on_success": sink.url}}}
    ans = rewrite(proc, config(db, fns))
    assert ans["functions"]["added"] == ["added"], ans
    assert ans["needs_restart"] == [], ans
    r = invoke(c, "added", {"id": 1}, "RequestResponse")
    assert r["StatusCode"] == 200 and "FunctionError" not in r
    r = invoke(c, "added", {"id": 2}, "Event")
    assert r["StatusCode"] == 202
    wait(lambda: sorted(payloads(other)) == [1, 2], "both invocations at the added function")
    wait(lambda: len(sink.ok_requests()) == 1, "the added function's on_success record")
    rec = json.loads(sink.ok_requests()[0].body)
    assert rec["requestContext"]["functionArn"].endswith(":function:added:$LATEST")
    assert listed_functions(proc) == ["added", "fn"]
    eic = c.get_function_event_invoke_config(FunctionName="added")
    assert eic["MaximumRetryAttempts"] == 1
    assert eic["DestinationConfig"]["OnSuccess"]["Destination"] == sink.url

    ans = rewrite(proc, config(db, {"fn": {"url": endpoint.url}}))
    assert ans["functions"]["removed"] == ["added"], ans
    not_found(lambda: invoke(c, "added", {"id": 3}, "RequestResponse"))
    not_found(lambda: invoke(c, "added", {"id": 4}, "Event"))
    not_found(lambda: c.get_function_event_invoke_config(FunctionName="added"))
    assert listed_functions(proc) == ["fn"]
    not_found(lambda: c.put_function_event_invoke_config(FunctionName="added",
                                                         MaximumRetryAttempts=0))
    # the function that stays is served throughout
    assert invoke(c, "fn", {"id": 5}, "RequestResponse")["StatusCode"] == 200
    assert sorted(payloads(other)) == [1, 2]
    assert payloads(endpoint) == [5]


def test_removed_function_keeps_its_queued_events_until_it_is_added_back(esmd, postgres, db,
                                                                          endpoint, other):
    """Events of a function removed while they wait for a retry are neither invoked nor dropped;
    when a reload adds the function back they run, at its new url, once each."""
    endpoint.behaviour = lambda req: Response(503, {"message": "down"})
    fns = {"fn": {"url": endpoint.url, "async": {"maximum_event_age": "1h"}}}
    proc = esmd(config(db, fns, backoff_base="1s", backoff_cap="1s"))
    c = client(proc)
    for i in range(5):
        assert invoke(c, "fn", {"id": i}, "Event")["StatusCode"] == 202
    wait(lambda: {json.loads(r.body)["id"] for r in endpoint.snapshot()} == set(range(5)),
         "every event tried once")

    ans = rewrite(proc, config(db, {"keep": {"url": other.url}}))
    assert ans["functions"]["removed"] == ["fn"], ans
    not_found(lambda: invoke(c, "fn", {"id": 9}, "Event"))
    settled = len(endpoint.snapshot())
    # a retry was due every second: after a few seconds without one, they are not claimed
    wait(lambda: queued(postgres, db, "fn") == 5 and
         postgres.sql("SELECT count(*) FROM esmd.async_events WHERE lease_owner IS NOT NULL "
                      "AND next_attempt_at > now()", db[1])[0][0] in (0, "0"),
         "the events back in the queue, not leased")
    before = len(endpoint.snapshot())
    assert before <= settled + 5  # at most the attempts in flight during the reload
    time.sleep(3)  # three retry periods of the old settings
    assert len(endpoint.snapshot()) == before, "a removed function's events were invoked"
    assert queued(postgres, db, "fn") == 5
    assert "reload: function removed" in proc.log()

    ans = rewrite(proc, config(db, {"keep": {"url": other.url}, "fn": {"url": other.url}}))
    assert ans["functions"]["added"] == ["fn"], ans
    wait(lambda: sorted(payloads(other)) == list(range(5)), "the queued events at the new url")
    wait(lambda: queued(postgres, db, "fn") == 0, "the events deleted")
    assert sorted(payloads(other)) == list(range(5))
    assert proc.stop() == 0, servers.tail(proc.logfile, 40)


def test_function_destination_of_a_removed_function_waits_for_it(esmd, db, endpoint, other):
    """A success record for function://target (an event-invoke-config override) made while a
    reload has removed `target` is kept in the outbox, not dropped, and invokes `target` once a
    reload brings it back."""
    proc = esmd(config(db, {"fn": {"url": endpoint.url}, "target": {"url": other.url}}))
    c = client(proc)
    c.put_function_event_invoke_config(
        FunctionName="fn", DestinationConfig={"OnSuccess": {"Destination": "function://target"}})
    rewrite(proc, config(db, {"fn": {"url": endpoint.url}}))
    assert invoke(c, "fn", {"id": 1}, "Event")["StatusCode"] == 202
    wait(lambda: len(endpoint.ok_requests()) == 1, "the event invoked")
    wait(lambda: "function://target: write of outbox row" in proc.log(),
         "the record stored, and refused by the queue while target is away")
    assert "dropped" not in proc.log()
    assert other.snapshot() == []
    rewrite(proc, config(db, {"fn": {"url": endpoint.url}, "target": {"url": other.url}}))
    wait(lambda: len(other.ok_requests()) == 1, "the record invoking target", timeout=60)
    rec = json.loads(other.ok_requests()[0].body)
    assert rec["requestContext"]["condition"] == "Success"
    assert rec["requestPayload"] == {"id": 1}


# ---- changed settings apply to queued events ------------------------------------------------

def test_changed_url_timeout_and_destinations_apply_to_the_next_attempt(esmd, postgres, db,
                                                                        endpoint, other, sink):
    """An event failing at the old url with the old timeout: after the reload its next attempt
    goes to the new url with the new timeout, and the new on_success gets its record."""
    endpoint.behaviour = lambda req: Response(200, delay=3)  # longer than timeout 1s
    other.behaviour = lambda req: Response(200, {"done": True}, delay=2)  # within 10s
    fns = {"fn": {"url": endpoint.url, "timeout": "1s",
                  "async": {"maximum_retry_attempts": 2}}}
    # retry_base 2s: the reload lands between the first attempt and the second
    proc = esmd(config(db, fns, retry_base="2s"))
    c = client(proc)
    rid = invoke(c, "fn", {"id": 7}, "Event")["ResponseMetadata"]["RequestId"]
    wait(lambda: len(endpoint.snapshot()) >= 1, "the first attempt")
    wait(lambda: int(postgres.sql("SELECT attempts FROM esmd.async_events", db[1])[0][0]) == 1
         if queued(postgres, db, "fn") else False, "the timeout counted as a failed attempt")

    fns = {"fn": {"url": other.url, "timeout": "10s",
                  "async": {"maximum_retry_attempts": 2, "on_success": sink.url}}}
    ans = rewrite(proc, config(db, fns, retry_base="2s"))
    assert ans["functions"]["updated"] == [{"name": "fn", "keys": ["url", "timeout", "async"]}], ans
    wait(lambda: len(sink.ok_requests()) == 1, "the success record", timeout=40)
    rec = json.loads(sink.ok_requests()[0].body)
    assert rec["requestContext"]["requestId"] == rid
    assert rec["requestContext"]["condition"] == "Success"
    assert rec["responsePayload"] == {"done": True}
    assert payloads(other) == [7]
    assert len(endpoint.snapshot()) == 1
    wait(lambda: queued(postgres, db, "fn") == 0, "the event deleted")


def test_lowered_retries_and_new_dead_letter_apply_to_queued_events(esmd, postgres, db, endpoint,
                                                                    sink):
    endpoint.behaviour = lambda req: Response(200, {"errorType": "Error", "errorMessage": "boom"},
                                              {"X-Amz-Function-Error": "Unhandled"})
    fns = {"fn": {"url": endpoint.url, "async": {"maximum_retry_attempts": 2}}}
    proc = esmd(config(db, fns, retry_base="2s"))
    c = client(proc)
    invoke(c, "fn", {"id": 1}, "Event")
    wait(lambda: len(endpoint.snapshot()) == 1, "the first attempt")
    fns = {"fn": {"url": endpoint.url,
                  "async": {"maximum_retry_attempts": 1, "on_failure": sink.url,
                            "dead_letter": "pgqueue://reload_dlq"}}}
    rewrite(proc, config(db, fns, retry_base="2s"))
    wait(lambda: len(sink.ok_requests()) == 1, "the failure record")
    rec = json.loads(sink.ok_requests()[0].body)
    assert rec["requestContext"]["condition"] == "RetriesExhausted"
    assert rec["requestContext"]["approximateInvokeCount"] == 2  # 1 + the new 1 retry, not 3
    assert len(endpoint.snapshot()) == 2
    wait(lambda: int(postgres.sql("SELECT count(*) FROM esmd.queue_messages "
                                  "WHERE queue = 'reload_dlq'", db[1])[0][0]) == 1,
         "the dead letter in the new queue")


# ---- a reload racing with Invokes -----------------------------------------------------------

def test_reloads_racing_with_many_invokes_lose_and_duplicate_nothing(esmd, postgres, db,
                                                                     endpoint, other):
    """Eight clients invoke (RequestResponse and Event, `fn` and a function that comes and goes)
    while the file is reloaded over and over (url, timeout, max_concurrency, async, the second
    function added and removed). Every accepted event is invoked exactly once; every
    RequestResponse is answered by one of the two endpoints; no request is answered with a 5xx;
    the log has no sanitizer report."""
    endpoint.default = Response(200, {"ok": 1}, delay=0.02)
    other.default = Response(200, {"ok": 2}, delay=0.02)

    def fns(i):
        out = {"fn": {"url": (endpoint, other)[i % 2].url, "timeout": "%ds" % (5 + i % 3),
                      "max_concurrency": 2 + i % 5,
                      "async": {"maximum_retry_attempts": i % 3}}}
        if i % 2 == 0:
            out["extra"] = {"url": other.url, "max_concurrency": 3}
        return out

    proc = esmd(config(db, fns(0)))
    stop = threading.Event()
    lock = threading.Lock()
    accepted, answered, refused, problems = [], [], [], []

    def worker(w):
        c = client(proc)
        n = 0
        while not stop.is_set():
            n += 1
            fn = "extra" if n % 3 == 0 else "fn"
            itype = "Event" if n % 2 == 0 else "RequestResponse"
            key = "%d-%d" % (w, n)
            try:
                r = invoke(c, fn, {"id": key}, itype)
            except botocore.exceptions.ClientError as e:
                code = e.response["ResponseMetadata"]["HTTPStatusCode"]
                with lock:
                    (refused if code == 404 and fn == "extra" else problems).append(
                        (fn, itype, key, code, e.response["Error"]))
                continue
            except Exception as e:  # noqa: BLE001 (a transport error is a finding)
                with lock:
                    problems.append((fn, itype, key, repr(e)))
                continue
            with lock:
                if itype == "Event":
                    if r["StatusCode"] == 202:
                        accepted.append(key)
                    else:
                        problems.append((fn, itype, key, r["StatusCode"]))
                elif r["StatusCode"] == 200 and "FunctionError" not in r:
                    answered.append(key)
                else:
                    problems.append((fn, itype, key, r["StatusCode"], r.get("FunctionError")))

    threads = [threading.Thread(target=worker, args=(w,), daemon=True) for w in range(8)]
    for t in threads:
        t.start()
    try:
        for i in range(1, 13):
            rewrite(proc, config(db, fns(i)))
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    # the last configuration has both functions: every accepted event runs
    rewrite(proc, config(db, fns(0)))
    assert not problems, problems[:10]
    assert accepted and answered, (len(accepted), len(answered))
    wait(lambda: queued(postgres, db, "fn") + queued(postgres, db, "extra") == 0,
         "every accepted event invoked", timeout=60)
    seen = payloads(endpoint) + payloads(other)
    events = [k for k in seen if k in set(accepted)]
    assert sorted(events) == sorted(accepted), "an accepted event lost or invoked twice"
    sync = [k for k in seen if k in set(answered)]
    assert sorted(sync) == sorted(answered)
    assert not set(seen) & {k for (_, _, k, *_) in refused}, "a refused Invoke was invoked"
    # a graceful stop: exit status 0 (under ASan: no leak, every replaced configuration freed)
    assert proc.stop() == 0, servers.tail(proc.logfile, 40)
    log = proc.log()
    assert "AddressSanitizer" not in log and "runtime error" not in log
