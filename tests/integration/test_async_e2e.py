"""The asynchronous invocation queue (src/asyncq.c, docs/async.md) and the Lambda-compatible
routes that drive it (Invoke, event-invoke-config), with admin authentication
(src/admin_auth.c): real Postgres, recording endpoints that fail on demand, the real AWS CLI.

Every test uses its own database, so the queue holds only its events. Retry delays are
shortened with the async_queue section of the configuration (fast())."""

import json
import os
import shutil
import subprocess
import threading
import time
import uuid

import jsonschema
import pytest
import requests

import servers
from endpoint import Endpoint, Response

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOKEN = "test-admin-token"
AKID = "esmd-admin"
SECRET = "s3cr3t/KEY+value"
# the async queue's retry delays and poll interval, shortened (docs/configuration.md, async_queue)
FAST = {"retry_base": "300ms", "backoff_base": "100ms", "backoff_cap": "400ms",
        "poll_interval": "100ms"}


def fast(cfg, **settings):
    """cfg with the FAST async_queue settings, and settings besides."""
    cfg = dict(cfg)
    cfg["async_queue"] = dict(FAST, **settings)
    return cfg


def _schema(name):
    with open(os.path.join(ROOT, "schemas", name)) as f:
        return json.load(f)


RECORD_SCHEMA = _schema("async-invocation-record.schema.json")
DLQ_SCHEMA = _schema("async-dead-letter.schema.json")


@pytest.fixture
def db(postgres, request):
    name = "async_%s_%d" % (request.node.name.lower()[-30:], os.getpid())
    name = "".join(c if c.isalnum() or c == "_" else "_" for c in name)
    return postgres.create_db(name), name


@pytest.fixture
def sink():
    """A second recording endpoint, used as an http:// destination."""
    ep = Endpoint()
    yield ep
    ep.close()


def config(db, endpoint, async_block=None, functions_extra=None, admin=None):
    fn = {"url": endpoint.url, "timeout": "5s", "max_concurrency": 8}
    if async_block is not None:
        fn["async"] = async_block
    fns = {"fn": fn}
    fns.update(functions_extra or {})
    return {"postgres": db[0], "admin": admin or {"token": TOKEN,
                                                  "aws_credentials": {"access_key_id": AKID,
                                                                      "secret_access_key": SECRET}},
            "functions": fns}


def invoke(proc, fn, payload=b"{}", itype="Event", token=TOKEN, headers=None):
    h = {"X-Amz-Invocation-Type": itype}
    if token:
        h["Authorization"] = "Bearer " + token
    h.update(headers or {})
    data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return requests.post("%s/2015-03-31/functions/%s/invocations" % (proc.admin, fn), data=data,
                         headers=h, timeout=30)


def wait(pred, timeout=30, what="condition"):
    servers.wait_for(pred, timeout, 0.05, what)


def queue_len(postgres, db):
    return int(postgres.sql("SELECT count(*) FROM esmd.async_events", db[1])[0][0])


# ---- readiness ------------------------------------------------------------------------------

def test_readyz_reports_the_async_queue(esmd, db, endpoint):
    proc = esmd(config(db, endpoint))
    wait(lambda: proc.get("/readyz")[0] == 200, what="/readyz 200")
    status, body = proc.get("/readyz")
    detail = json.loads(body)
    assert detail["async"]["ready"] is True, detail
    assert {"claimed", "accepting"} <= set(detail["async"]), detail


# ---- accepting, success, the record ---------------------------------------------------------

def test_async_event_accepted_invoked_and_success_record(esmd, postgres, db, endpoint, sink):
    proc = esmd(fast(config(db, endpoint, {"on_success": sink.url})))
    r = invoke(proc, "fn", {"order": 1})
    assert r.status_code == 202, r.text
    assert r.content == b""
    rid = r.headers["x-amzn-RequestId"]
    uuid.UUID(rid)
    wait(lambda: len(sink.snapshot()) >= 1, what="the success record")
    reqs = endpoint.snapshot()
    assert len(reqs) == 1
    assert json.loads(reqs[0].body) == {"order": 1}
    assert reqs[0].idempotency_key == rid
    rec = json.loads(sink.snapshot()[0].body)
    jsonschema.validate(rec, RECORD_SCHEMA)
    assert rec["requestContext"]["condition"] == "Success"
    assert rec["requestContext"]["requestId"] == rid
    assert rec["requestContext"]["functionArn"].endswith(":function:fn:$LATEST")
    assert rec["requestContext"]["approximateInvokeCount"] == 1
    assert rec["requestPayload"] == {"order": 1}
    assert rec["responseContext"] == {"statusCode": 200, "executedVersion": "$LATEST"}
    assert rec["responsePayload"] == {}
    wait(lambda: queue_len(postgres, db) == 0, what="the event deleted")
    m = proc.metrics()
    assert m.get("esmd_async_events_received_total", function="fn") == 1
    assert m.get("esmd_async_event_age_seconds_count", function="fn") == 1


# ---- retries ---------------------------------------------------------------------------------

def test_async_function_error_retried_then_success(esmd, db, endpoint, sink):
    endpoint.function_error_first(2)
    proc = esmd(fast(config(db, endpoint, {"on_success": sink.url, "on_failure": sink.url})))
    assert invoke(proc, "fn", {"a": 1}).status_code == 202
    wait(lambda: len(sink.snapshot()) >= 1, what="the record")
    reqs = endpoint.snapshot()
    assert len(reqs) == 3
    # about 1 and 2 × the base apart (300 ms here, 1 min by default)
    assert reqs[1].t_arrival - reqs[0].t_arrival >= 0.25
    assert reqs[2].t_arrival - reqs[1].t_arrival >= 0.55
    assert len({r.idempotency_key for r in reqs}) == 1
    rec = json.loads(sink.snapshot()[0].body)
    assert rec["requestContext"]["condition"] == "Success"
    assert rec["requestContext"]["approximateInvokeCount"] == 3


def test_async_function_error_with_bytes_that_are_not_text(esmd, postgres, db, endpoint, sink):
    """A function error whose body is not UTF-8 (and holds a NUL): the event's row keeps the
    answer as text (malformed bytes become U+FFFD), so the retry is stored and counted. Postgres
    refused the retry update before: the event ran again only after its lease, its attempt not
    counted, without end."""
    endpoint.behaviour = lambda req: Response(200, b"\xff\xfe not text \x00 \xc3(",
                                              {"X-Amz-Function-Error": "Unhandled"})
    proc = esmd(fast(config(db, endpoint, {"maximum_retry_attempts": 2, "on_failure": sink.url})))
    invoke(proc, "fn", {"x": 1})
    wait(lambda: len(sink.snapshot()) >= 1, timeout=30, what="the failure record")
    assert len(endpoint.snapshot()) == 3  # 1 + maximum_retry_attempts
    rec = json.loads(sink.snapshot()[0].body)
    jsonschema.validate(rec, RECORD_SCHEMA)
    assert rec["requestContext"]["condition"] == "RetriesExhausted"
    assert rec["requestContext"]["approximateInvokeCount"] == 3
    assert "not text" in json.dumps(rec["responsePayload"])


def test_async_retries_exhausted_on_failure_and_dead_letter(esmd, postgres, db, endpoint, sink):
    endpoint.behaviour = lambda req: Response(200, {"errorType": "Boom", "errorMessage": "it broke"},
                                              {"X-Amz-Function-Error": "Unhandled"})
    proc = esmd(fast(config(db, endpoint, {"maximum_retry_attempts": 1, "on_failure": sink.url,
                                           "dead_letter": "pgqueue://fn_dlq"})))
    r = invoke(proc, "fn", {"x": [1, 2]})
    rid = r.headers["x-amzn-RequestId"]
    wait(lambda: len(sink.snapshot()) >= 1, what="the failure record")
    assert len(endpoint.snapshot()) == 2  # 1 + maximum_retry_attempts
    rec = json.loads(sink.snapshot()[0].body)
    jsonschema.validate(rec, RECORD_SCHEMA)
    assert rec["requestContext"]["condition"] == "RetriesExhausted"
    assert rec["requestContext"]["approximateInvokeCount"] == 2
    assert rec["responseContext"] == {"statusCode": 200, "executedVersion": "$LATEST",
                                      "functionError": "Unhandled"}
    assert rec["responsePayload"] == {"errorType": "Boom", "errorMessage": "it broke"}
    rows = []
    wait(lambda: rows.extend(postgres.sql(
        "SELECT body, attributes FROM esmd.queue_messages WHERE queue = 'fn_dlq'", db[1])) or rows,
        what="the dead-letter message")
    body, attrs = rows[0]
    assert json.loads(body) == {"x": [1, 2]}
    attrs = json.loads(attrs)
    jsonschema.validate(attrs, DLQ_SCHEMA)
    assert attrs["RequestID"]["stringValue"] == rid
    assert attrs["ErrorCode"]["stringValue"] == "200"
    assert attrs["ErrorMessage"]["stringValue"] == "it broke"
    assert attrs["FunctionName"]["stringValue"] == "fn"
    m = proc.metrics()
    assert m.get("esmd_async_events_dropped_total", function="fn", reason="RetriesExhausted") == 1
    wait(lambda: queue_len(postgres, db) == 0, what="the event deleted")


def test_async_zero_retries(esmd, db, endpoint, sink):
    endpoint.function_error_first(5)
    proc = esmd(fast(config(db, endpoint, {"maximum_retry_attempts": 0, "on_failure": sink.url})))
    invoke(proc, "fn", {})
    wait(lambda: len(sink.snapshot()) >= 1, what="the failure record")
    assert len(endpoint.snapshot()) == 1


def test_async_throttles_and_5xx_retried_with_backoff(esmd, db, endpoint, sink):
    endpoint.script([Response(429, {"message": "slow down"}), Response(503, {}),
                     Response(500, {})])
    proc = esmd(fast(config(db, endpoint, {"maximum_retry_attempts": 0, "on_success": sink.url,
                                           "on_failure": sink.url})))
    invoke(proc, "fn", {"t": 1})
    wait(lambda: len(sink.snapshot()) >= 1, what="the record")
    # throttles and system errors do not use up maximum_retry_attempts (0 here)
    assert len(endpoint.snapshot()) == 4
    rec = json.loads(sink.snapshot()[0].body)
    assert rec["requestContext"]["condition"] == "Success"
    assert rec["requestContext"]["approximateInvokeCount"] == 3  # the 429 is not an invocation


def test_async_event_age_exceeded_while_failing(esmd, postgres, db, endpoint, sink):
    endpoint.behaviour = lambda req: Response(503, {"message": "down"})
    proc = esmd(fast(config(db, endpoint, {"maximum_event_age": "60s", "on_failure": sink.url,
                                           "dead_letter": "pgqueue://age_dlq"})))
    # an event accepted 59.5 s ago (as if the function had been failing for a minute)
    postgres.sql("INSERT INTO esmd.async_events (function, request_id, payload, received_at) "
                 "VALUES ('fn', '%s', '{\"old\":true}', now() - interval '59.5 s')"
                 % uuid.uuid4(), db[1])
    wait(lambda: len(sink.snapshot()) >= 1, timeout=15, what="the age-exceeded record")
    rec = json.loads(sink.snapshot()[0].body)
    jsonschema.validate(rec, RECORD_SCHEMA)
    assert rec["requestContext"]["condition"] == "EventAgeExceeded"
    assert rec["responseContext"]["statusCode"] == 503
    assert len(endpoint.snapshot()) >= 1
    wait(lambda: postgres.sql("SELECT count(*) FROM esmd.queue_messages WHERE queue='age_dlq'",
                              db[1])[0][0] == "1", what="dead letter")
    assert proc.metrics().get("esmd_async_events_dropped_total", function="fn",
                              reason="EventAgeExceeded") == 1


def test_async_too_old_event_never_invoked(esmd, postgres, db, endpoint, sink):
    proc = esmd(fast(config(db, endpoint, {"maximum_event_age": "60s", "on_failure": sink.url})))
    postgres.sql("INSERT INTO esmd.async_events (function, request_id, payload, received_at) "
                 "VALUES ('fn', '%s', '[1]', now() - interval '2 hours')" % uuid.uuid4(), db[1])
    wait(lambda: len(sink.snapshot()) >= 1, what="the record")
    rec = json.loads(sink.snapshot()[0].body)
    assert rec["requestContext"]["condition"] == "EventAgeExceeded"
    assert rec["requestContext"]["approximateInvokeCount"] == 0
    assert "responseContext" not in rec
    assert endpoint.snapshot() == []
    assert proc.running()


def test_async_function_destination(esmd, db, endpoint, sink):
    """function://NAME destinations are async invocations of that function."""
    endpoint.behaviour = lambda req: Response(500, {})  # 5xx from fn: 4xx would be a function error
    endpoint.function_error_first(1)
    cfg = config(db, endpoint, {"maximum_retry_attempts": 0, "on_failure": "function://handler"},
                 functions_extra={"handler": {"url": sink.url, "timeout": "5s"}})
    proc = esmd(fast(cfg))
    invoke(proc, "fn", {"k": "v"})
    wait(lambda: len(sink.snapshot()) >= 1, what="the handler invocation")
    rec = json.loads(sink.snapshot()[0].body)
    assert rec["requestContext"]["condition"] == "RetriesExhausted"
    assert rec["requestPayload"] == {"k": "v"}
    assert proc.metrics().get("esmd_async_events_received_total", function="handler") == 1


# ---- the Invoke route --------------------------------------------------------------------------

def test_invoke_request_response_dryrun_and_errors(esmd, db, endpoint):
    proc = esmd(fast(config(db, endpoint)))
    endpoint.script([Response(200, {"answer": 42})])
    r = invoke(proc, "fn", {"q": 1}, itype="RequestResponse")
    assert r.status_code == 200 and r.json() == {"answer": 42}
    assert r.headers["X-Amz-Executed-Version"] == "$LATEST"
    assert "X-Amz-Function-Error" not in r.headers
    endpoint.function_error_first(1)
    r = invoke(proc, "fn", {"q": 2}, itype=None, headers={"X-Amz-Invocation-Type": ""})
    assert r.status_code == 200 and r.headers["X-Amz-Function-Error"] == "Unhandled"
    assert r.json()["errorMessage"] == "boom"
    n = len(endpoint.snapshot())
    r = invoke(proc, "fn", {}, itype="DryRun")
    assert r.status_code == 204 and len(endpoint.snapshot()) == n
    r = invoke(proc, "nope", {})
    assert r.status_code == 404
    assert r.headers["x-amzn-ErrorType"] == "ResourceNotFoundException"
    assert r.json()["Type"] == "User" and "Function not found" in r.json()["Message"]
    r = invoke(proc, "fn", b"{not json")
    assert r.status_code == 400
    assert r.headers["x-amzn-ErrorType"] == "InvalidRequestContentException"
    r = invoke(proc, "fn", {}, itype="Sometimes")
    assert r.status_code == 400
    assert r.headers["x-amzn-ErrorType"] == "InvalidParameterValueException"
    big = b'"' + b"x" * 1048576 + b'"'
    r = invoke(proc, "fn", big)
    assert r.status_code == 413
    assert r.headers["x-amzn-ErrorType"] == "RequestTooLargeException"
    ok = b'"' + b"x" * (1048576 - 2) + b'"'
    assert invoke(proc, "fn", ok).status_code == 202
    # the qualified and ARN forms of the name
    assert invoke(proc, "fn:$LATEST", {}).status_code == 202
    assert invoke(proc, "arn:aws:lambda:us-east-1:000000000000:function:fn", {}).status_code == 202
    assert invoke(proc, "fn:7", {}).status_code == 404


def test_invoke_413_before_reading_the_body(esmd, db, endpoint):
    """A Content-Length over the limit is answered without waiting for the body."""
    import socket
    proc = esmd(fast(config(db, endpoint)))
    host, port = proc.admin[len("http://"):].split(":")
    s = socket.create_connection((host, int(port)), timeout=5)
    s.sendall(b"POST /2015-03-31/functions/fn/invocations HTTP/1.1\r\nHost: x\r\n"
              b"Authorization: Bearer " + TOKEN.encode() + b"\r\n"
              b"X-Amz-Invocation-Type: Event\r\nContent-Length: 2000000\r\n\r\n{")
    data = s.recv(4096)
    s.close()
    assert data.startswith(b"HTTP/1.1 413"), data


# ---- authentication ---------------------------------------------------------------------------

def test_admin_auth_bearer(esmd, db, endpoint):
    proc = esmd(fast(config(db, endpoint)))
    r = invoke(proc, "fn", {}, token=None)
    assert r.status_code == 401
    assert r.headers["x-amzn-ErrorType"] == "MissingAuthenticationTokenException"
    r = invoke(proc, "fn", {}, token="wrong")
    assert r.status_code == 401
    # prefixes, extensions, the token repeated, one byte off: all refused
    for bad in (TOKEN[:-1], TOKEN + "x", TOKEN + TOKEN, "x" + TOKEN[1:], TOKEN[:-1] + "X"):
        assert invoke(proc, "fn", {}, token=bad).status_code == 401, bad
    assert invoke(proc, "fn", {}).status_code == 202
    # the probes need nothing
    assert proc.get("/healthz")[0] == 200
    assert proc.get("/metrics")[0] == 200


def test_admin_auth_loopback_only_without_credentials(esmd, db, endpoint):
    cfg = config(db, endpoint)
    cfg["admin"] = {}
    proc = esmd(fast(cfg))
    assert invoke(proc, "fn", {}, token=None).status_code == 202


# ---- event-invoke-config -----------------------------------------------------------------------

def eic(proc, fn, method="GET", body=None, suffix=""):
    return requests.request(method, "%s/2019-09-25/functions/%s/event-invoke-config%s"
                            % (proc.admin, fn, suffix),
                            data=json.dumps(body) if body is not None else None,
                            headers={"Authorization": "Bearer " + TOKEN}, timeout=10)


def test_event_invoke_config_overrides_yaml(esmd, db, endpoint, sink):
    endpoint.behaviour = lambda req: Response(200, {"errorMessage": "no"},
                                              {"X-Amz-Function-Error": "Unhandled"})
    proc = esmd(fast(config(db, endpoint, {"maximum_retry_attempts": 2, "on_failure": sink.url})))
    r = eic(proc, "fn")
    assert r.status_code == 200, r.text
    got = r.json()
    assert got["MaximumRetryAttempts"] == 2 and got["MaximumEventAgeInSeconds"] == 21600
    assert got["DestinationConfig"] == {"OnSuccess": {}, "OnFailure": {"Destination": sink.url}}
    assert got["FunctionArn"].endswith(":function:fn:$LATEST")
    # Put: the row wins field by field (unset fields fall back to the YAML)
    r = eic(proc, "fn", "PUT", {"MaximumRetryAttempts": 0})
    assert r.status_code == 200, r.text
    assert r.json()["MaximumRetryAttempts"] == 0
    assert r.json()["DestinationConfig"]["OnFailure"] == {"Destination": sink.url}
    invoke(proc, "fn", {"n": 1})
    wait(lambda: len(sink.snapshot()) >= 1, what="record")
    assert len(endpoint.snapshot()) == 1
    # Update merges
    r = eic(proc, "fn", "POST", {"MaximumEventAgeInSeconds": 120})
    assert r.json()["MaximumRetryAttempts"] == 0 and r.json()["MaximumEventAgeInSeconds"] == 120
    r = eic(proc, "fn", suffix="/list")
    assert r.status_code == 200 and len(r.json()["FunctionEventInvokeConfigs"]) == 1
    # validation
    for bad in ({"MaximumRetryAttempts": 3}, {"MaximumEventAgeInSeconds": 59},
                {"DestinationConfig": {"OnFailure": {"Destination": "sqs://nope"}}},
                {"DestinationConfig": {"OnFailure": {"Destination":
                                                     "arn:aws:sqs:us-east-1:1:q"}}}):
        r = eic(proc, "fn", "PUT", bad)
        assert r.status_code == 400, bad
        assert r.headers["x-amzn-ErrorType"] == "InvalidParameterValueException"
    # Delete: back to the YAML
    assert eic(proc, "fn", "DELETE").status_code == 204
    assert eic(proc, "fn", "DELETE").status_code == 404
    assert eic(proc, "fn").json()["MaximumRetryAttempts"] == 2
    assert eic(proc, "nope").status_code == 404


def test_event_invoke_config_shared_by_instances(esmd, db, endpoint):
    cfg = config(db, endpoint)
    a = esmd(fast(cfg), env=dict(ESMD_INSTANCE_ID="a"))
    b = esmd(fast(cfg), env=dict(ESMD_INSTANCE_ID="b"))
    assert eic(a, "fn").status_code == 404  # no async block, no row
    assert eic(a, "fn", "PUT", {"MaximumRetryAttempts": 1,
                                "DestinationConfig": {"OnFailure": {
                                    "Destination": "arn:aws:lambda:us-east-1:000000000000:function:fn"}}}
               ).status_code == 200
    wait(lambda: eic(b, "fn").status_code == 200, what="b to hear of it (NOTIFY)")
    got = eic(b, "fn").json()
    assert got["MaximumRetryAttempts"] == 1
    assert got["DestinationConfig"]["OnFailure"] == {"Destination": "function://fn"}


def test_function_arns_carry_the_aws_section_and_others_are_not_ours(esmd, db, endpoint):
    """aws.region / aws.account_id are in every function ARN esmd writes, and a function ARN of
    another region or account names no function of esmd's."""
    cfg = config(db, endpoint)
    cfg["aws"] = {"region": "eu-west-3", "account_id": "123456789012"}
    proc = esmd(fast(cfg))
    ours = "arn:aws:lambda:eu-west-3:123456789012:function:fn"
    assert invoke(proc, ours, {"n": 1}, itype="DryRun").status_code == 204
    assert invoke(proc, "123456789012:function:fn", itype="DryRun").status_code == 204
    for other in ("arn:aws:lambda:us-east-1:000000000000:function:fn",
                  "arn:aws:lambda:eu-west-3:000000000000:function:fn", "000000000000:function:fn"):
        r = invoke(proc, other, itype="DryRun")
        assert r.status_code == 404, (other, r.status_code, r.text)
        assert r.headers["x-amzn-ErrorType"] == "ResourceNotFoundException"
    r = eic(proc, "fn", "PUT", {"DestinationConfig": {"OnFailure": {
        "Destination": "arn:aws:lambda:us-east-1:000000000000:function:fn"}}})
    assert r.status_code == 400 and "not a function of this region and account" in r.text, r.text
    r = eic(proc, "fn", "PUT", {"DestinationConfig": {"OnFailure": {"Destination": ours}}})
    assert r.status_code == 200, r.text
    assert r.json()["FunctionArn"] == ours + ":$LATEST"
    assert r.json()["DestinationConfig"]["OnFailure"] == {"Destination": "function://fn"}

# ---- the AWS CLI ---------------------------------------------------------------------------------

def aws(proc, *args, secret=SECRET, check=True):
    exe = shutil.which("aws")
    if not exe:
        pytest.skip("the AWS CLI (Debian package awscli) is not installed")
    env = dict(os.environ, AWS_ACCESS_KEY_ID=AKID, AWS_SECRET_ACCESS_KEY=secret,
               AWS_DEFAULT_REGION="eu-west-3", AWS_EC2_METADATA_DISABLED="true",
               AWS_CONFIG_FILE="/dev/null", AWS_SHARED_CREDENTIALS_FILE="/dev/null",
               AWS_MAX_ATTEMPTS="1")
    r = subprocess.run([exe, "--endpoint-url", proc.admin, "--output", "json", "lambda"]
                       + list(args), env=env, capture_output=True, text=True, timeout=60)
    if check:
        assert r.returncode == 0, "aws %s: %s %s" % (args, r.stdout, r.stderr)
    return r


def test_aws_cli_invoke_and_event_invoke_config(esmd, db, endpoint, tmp_path):
    proc = esmd(fast(config(db, endpoint)))
    out = tmp_path / "out.json"
    endpoint.script([Response(200, {"hello": "cli"})])
    r = aws(proc, "invoke", "--function-name", "fn", "--payload", '{"from":"cli"}', str(out))
    assert json.loads(r.stdout)["StatusCode"] == 200
    assert json.loads(out.read_text()) == {"hello": "cli"}
    r = aws(proc, "invoke", "--function-name", "fn", "--invocation-type", "Event",
            "--payload", '{"async":true}', str(out))
    assert json.loads(r.stdout)["StatusCode"] == 202
    wait(lambda: any(json.loads(q.body) == {"async": True} for q in endpoint.snapshot()),
         what="the async invocation")
    r = aws(proc, "put-function-event-invoke-config", "--function-name", "fn",
            "--maximum-retry-attempts", "1", "--maximum-event-age-in-seconds", "300")
    got = json.loads(r.stdout)
    assert got["MaximumRetryAttempts"] == 1 and got["MaximumEventAgeInSeconds"] == 300
    r = aws(proc, "update-function-event-invoke-config", "--function-name", "fn",
            "--destination-config", '{"OnFailure":{"Destination":"pgqueue://cli_dlq"}}')
    assert json.loads(r.stdout)["DestinationConfig"]["OnFailure"]["Destination"] == \
        "pgqueue://cli_dlq"
    r = aws(proc, "get-function-event-invoke-config", "--function-name", "fn")
    assert json.loads(r.stdout)["MaximumRetryAttempts"] == 1
    r = aws(proc, "list-function-event-invoke-configs", "--function-name", "fn")
    assert len(json.loads(r.stdout)["FunctionEventInvokeConfigs"]) == 1
    aws(proc, "delete-function-event-invoke-config", "--function-name", "fn")
    r = aws(proc, "get-function-event-invoke-config", "--function-name", "fn", check=False)
    assert r.returncode != 0 and "ResourceNotFoundException" in r.stderr
    r = aws(proc, "put-function-event-invoke-config", "--function-name", "fn",
            "--maximum-retry-attempts", "5", check=False)
    assert r.returncode != 0
    # a wrong secret is refused
    r = aws(proc, "invoke", "--function-name", "fn", str(out), secret="not-the-secret",
            check=False)
    assert r.returncode != 0 and "InvalidSignatureException" in r.stderr


def test_sigv4_refusals(esmd, db, endpoint):
    proc = esmd(fast(config(db, endpoint)))
    url = "%s/2015-03-31/functions/fn/invocations" % proc.admin
    bad = ("AWS4-HMAC-SHA256 Credential=%s/20240101/us-east-1/lambda/aws4_request, "
           "SignedHeaders=host;x-amz-date, Signature=%s" % (AKID, "0" * 64))
    r = requests.post(url, data=b"{}", headers={"Authorization": bad,
                                                "X-Amz-Date": "20240101T000000Z"})
    assert r.status_code == 403  # stale date
    r = requests.post(url, data=b"{}", headers={
        "Authorization": bad.replace(AKID, "someone-else"), "X-Amz-Date": "20240101T000000Z"})
    assert r.status_code == 403
    assert r.headers["x-amzn-ErrorType"] == "UnrecognizedClientException"


# ---- durability and sharing ------------------------------------------------------------------------

def _flood(proc, n, threads, accepted, lock, stop):
    def worker(k):
        s = requests.Session()
        for i in range(k, n, threads):
            if stop.is_set():
                return
            try:
                r = s.post("%s/2015-03-31/functions/fn/invocations" % proc.admin,
                           data=json.dumps({"i": i}).encode(),
                           headers={"X-Amz-Invocation-Type": "Event",
                                    "Authorization": "Bearer " + TOKEN}, timeout=10)
            except requests.RequestException:
                return
            if r.status_code == 202:
                with lock:
                    accepted[r.headers["x-amzn-RequestId"]] = i
    ts = [threading.Thread(target=worker, args=(k,)) for k in range(threads)]
    for t in ts:
        t.start()
    return ts


def test_async_kill9_loses_no_accepted_event(esmd, postgres, db, endpoint):
    endpoint.delay(0.005)
    proc = esmd(fast(config(db, endpoint)), env=dict(ESMD_INSTANCE_ID="k"))
    accepted, lock, stop = {}, threading.Lock(), threading.Event()
    ts = _flood(proc, 3000, 16, accepted, lock, stop)
    wait(lambda: len(accepted) >= 800, what="some 202s")
    proc.kill9()
    stop.set()
    for t in ts:
        t.join()
    n = len(accepted)
    assert n >= 800
    proc.start()
    seen = lambda: {q.idempotency_key for q in endpoint.ok_requests()}  # noqa: E731
    wait(lambda: set(accepted) <= seen(), timeout=90, what="every accepted event invoked")
    wait(lambda: queue_len(postgres, db) == 0, what="the queue empty")


def test_async_two_instances_share_the_queue(esmd, postgres, db, endpoint):
    endpoint.delay(0.002)
    cfg = config(db, endpoint)
    a = esmd(fast(cfg), env=dict(ESMD_INSTANCE_ID="a"))
    b = esmd(fast(cfg), env=dict(ESMD_INSTANCE_ID="b"))
    accepted, lock, stop = {}, threading.Lock(), threading.Event()
    ts = _flood(a, 1000, 8, accepted, lock, stop) + _flood(b, 1000, 8, {}, lock, stop)
    for t in ts:
        t.join()
    wait(lambda: queue_len(postgres, db) == 0, timeout=60, what="the queue drained")
    keys = [q.idempotency_key for q in endpoint.ok_requests()]
    assert len(set(keys)) == 2000  # every event ...
    assert len(keys) == 2000  # ... once: no lease expired here, so no double invocation
    ma = a.metrics().get("esmd_async_event_age_seconds_count", function="fn") or 0
    mb = b.metrics().get("esmd_async_event_age_seconds_count", function="fn") or 0
    assert ma + mb == len(keys)
    assert ma > 0 and mb > 0, (ma, mb)


def test_claims_do_not_scan_the_whole_queue(esmd, postgres, db, endpoint):
    """A claim joins the rows it locked back to the table by primary key. It once took each
    function's LIMIT from a joined array, which the planner estimates at a tenth of the table:
    with a backlog every claim became a sequential scan of the whole queue and the drain rate
    fell as the backlog grew. Here a backlog of 30,000 analysed rows must be claimed without one
    sequential scan but the one at start that hands back this instance's leases."""
    cfg = config(db, endpoint)
    cfg["functions"]["fn"]["max_concurrency"] = 32
    proc = esmd(fast(cfg))  # creates the schema
    proc.stop()
    postgres.sql("INSERT INTO esmd.async_events (function, request_id, payload) "
                 "SELECT 'fn', gen_random_uuid(), '{\"n\":' || g || '}' "
                 "FROM generate_series(1, 30000) g", db[1])
    postgres.sql("ANALYZE esmd.async_events", db[1])

    def settled_stats():
        # a backend flushes its statistics when it exits, which is after esmd has gone
        others = ("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                  "AND pid <> pg_backend_pid()")
        wait(lambda: postgres.sql(others, db[1])[0][0] == "0", what="esmd's backends gone")
        return [int(v) for v in postgres.sql(
            "SELECT coalesce(seq_scan, 0), coalesce(idx_scan, 0) FROM pg_stat_user_tables "
            "WHERE relid = 'esmd.async_events'::regclass", db[1])[0]]

    seq0, idx0 = settled_stats()
    proc.start()
    wait(lambda: len(endpoint.ok_requests()) >= 1000, what="1,000 events invoked")
    proc.stop()
    seq1, idx1 = settled_stats()
    assert idx1 > idx0, "no claim ran"
    assert seq1 - seq0 <= 1, "%d sequential scans of esmd.async_events" % (seq1 - seq0)


def test_failing_claims_are_retried_at_the_poll_interval(esmd, postgres, db, endpoint):
    """A claim that fails (here: a column renamed under esmd) is logged and retried at the next
    poll, not at once: it once retried in a loop, thousands of statements a second against a
    database that was already in trouble. Once the table is right again the queue runs."""
    proc = esmd(fast(config(db, endpoint)))  # polls every 100 ms
    postgres.sql("ALTER TABLE esmd.async_events RENAME COLUMN payload TO payload_moved", db[1])
    time.sleep(3)

    def failed_claims():  # the warnings, with the ones the rate limit folded into "suppressed"
        return sum(1 + int(l.get("suppressed", 0)) for l in proc.log_lines()
                   if "claiming events" in (l.get("msg") or ""))
    assert failed_claims() > 0, proc.log()[-2000:]
    assert any("payload" in l["msg"] for l in proc.log_lines()
               if "claiming events" in (l.get("msg") or ""))
    assert failed_claims() < 100, "%d failed claims in 3 s" % failed_claims()
    postgres.sql("ALTER TABLE esmd.async_events RENAME COLUMN payload_moved TO payload", db[1])
    assert invoke(proc, "fn", {"after": 1}).status_code == 202
    wait(lambda: len(endpoint.ok_requests()) == 1, what="the event invoked after the repair")


def test_failed_settle_deletes_are_retried(esmd, postgres, db, endpoint):
    """A settle statement that fails (here: a column renamed under esmd while an invocation is in
    flight) has its deletes sent again a second later: the finished event is deleted once the
    table is right, not invoked a second time when its lease (40 s here) ends."""
    endpoint.delay(2)
    proc = esmd(fast(config(db, endpoint)))
    assert invoke(proc, "fn", {"once": 1}).status_code == 202
    wait(lambda: len(endpoint.snapshot()) == 1, what="the invocation started")
    postgres.sql("ALTER TABLE esmd.async_events RENAME COLUMN last_error TO last_error_moved",
                 db[1])
    wait(lambda: any("settling events failed" in (l.get("msg") or "") for l in proc.log_lines()),
         what="the failed settle")
    time.sleep(1.5)
    postgres.sql("ALTER TABLE esmd.async_events RENAME COLUMN last_error_moved TO last_error",
                 db[1])
    wait(lambda: queue_len(postgres, db) == 0, timeout=10, what="the event deleted")
    assert len(endpoint.ok_requests()) == 1


def test_many_concurrent_clients_all_answered(esmd, db, endpoint):
    """128 and more keep-alive clients at once, every request answered (DryRun: the HTTP path
    alone, then Event). The listener's thread once ran libmicrohttpd in epoll mode, where a
    burst of exactly as many ready connections as its event array holds (128) could leave
    resumed connections unserved until they timed out: clients stalled for a minute."""
    proc = esmd(fast(config(db, endpoint), workers=False))
    load = servers.binary("asyncload")
    for clients, kind in ((128, "DryRun"), (256, "DryRun"), (128, "Event"), (128, "DryRun"),
                          (129, "DryRun"), (128, "DryRun"), (200, "Event"), (128, "DryRun")):
        out = subprocess.run([load, "--url", proc.admin, "--function", "fn", "--token", TOKEN,
                              "--clients", str(clients), "--seconds", "1", "--type", kind],
                             capture_output=True, text=True, timeout=20)
        assert out.returncode == 0, out.stderr
        res = json.loads(out.stdout)
        assert res["accepted"] == res["sent"] > 0, (clients, kind, res)
        assert (res["refused"], res["errors"]) == (0, 0), (clients, kind, res)
