"""The dead-letter routes of the admin API (src/admin_dlq.c, docs/admin.md "Dead letters"):
list, show and re-drive the async dead letters of a pgqueue:// dead_letter queue back into the
async queue, in one transaction; Lambda's error shape; admin authentication."""

import json
import uuid

import requests

from endpoint import Response
from servers import assert_error
from test_async_e2e import TOKEN, config, db, fast, invoke, queue_len, wait  # noqa: F401

DL = "/admin/dead-letters"
AUTH = {"Authorization": "Bearer " + TOKEN}


def call(proc, method, path, body=None, raw=None, headers=AUTH):
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    r = requests.request(method, proc.admin + path, data=data, headers=headers, timeout=30)
    try:
        return r.status_code, r.headers, r.json()
    except ValueError:
        return r.status_code, r.headers, r.text


def failing(req):
    return Response(200, {"errorType": "Boom", "errorMessage": "it broke"},
                    {"X-Amz-Function-Error": "Unhandled"})


def dead_lettered(proc, endpoint, payloads, queue="fn_dlq"):
    """Invokes fn with each payload (fn always fails) and waits for every dead letter."""
    rids = []
    for p in payloads:
        r = invoke(proc, "fn", p)
        assert r.status_code == 202, r.text
        rids.append(r.headers["x-amzn-RequestId"])
    wait(lambda: len(call(proc, "GET", "%s/%s" % (DL, queue))[2]["messages"]) == len(payloads),
         what="the dead letters")
    return rids


def test_dead_letters_list_show_and_redrive(esmd, postgres, db, endpoint):  # noqa: F811
    endpoint.behaviour = failing
    proc = esmd(fast(config(db, endpoint, {"maximum_retry_attempts": 0,
                                           "dead_letter": "pgqueue://fn_dlq"})))
    rids = dead_lettered(proc, endpoint, [{"order": 1, "items": [1, 2]}, {"order": 2}])
    assert len(endpoint.snapshot()) == 2
    wait(lambda: queue_len(postgres, db) == 0, what="the events deleted")

    st, _, body = call(proc, "GET", DL + "/fn_dlq")
    assert st == 200, body
    assert body["queue"] == "fn_dlq"
    msgs = body["messages"]
    # oldest first: in the order the dead letters were written, which is not always the order
    # the events were accepted (both can fail in the same claim, concurrently)
    assert sorted(m["requestId"] for m in msgs) == sorted(rids)
    stamps = [m["sentTimestamp"] for m in msgs]
    assert stamps == sorted(stamps), msgs
    first = msgs[0]["requestId"]
    m0 = next(m for m in msgs if m["requestId"] == rids[0])
    assert json.loads(m0["body"]) == {"order": 1, "items": [1, 2]}
    assert m0["errorCode"] == 200
    assert m0["errorMessage"] == "it broke"
    assert m0["function"] == "fn"  # the FunctionName attribute the async queue adds
    assert m0["attributes"]["RequestID"]["stringValue"] == rids[0]
    uuid.UUID(m0["messageId"])
    assert m0["sentTime"].endswith("Z") and isinstance(m0["sentTimestamp"], int)

    st, _, body = call(proc, "GET", DL + "/fn_dlq?limit=1")
    assert st == 200 and [m["requestId"] for m in body["messages"]] == [first], body
    st, _, one = call(proc, "GET", "%s/fn_dlq/%s" % (DL, m0["messageId"]))
    assert st == 200 and one == m0, one
    assert call(proc, "GET", DL + "/empty_queue")[2]["messages"] == []

    # the function is fixed: re-drive the first one, then the rest
    endpoint.behaviour = None
    st, _, body = call(proc, "POST", DL + "/fn_dlq/redrive",
                       {"function": "fn", "messageIds": [m0["messageId"]]})
    assert st == 200, body
    assert body["redriven"] == 1
    assert body["events"] == [{"messageId": m0["messageId"], "requestId": rids[0],
                               "originalRequestId": rids[0]}]
    wait(lambda: len(endpoint.snapshot()) == 3, what="the redriven invocation")
    req = endpoint.snapshot()[2]
    assert json.loads(req.body) == {"order": 1, "items": [1, 2]}
    assert req.idempotency_key == rids[0]  # the original request id is kept

    st, _, body = call(proc, "POST", DL + "/fn_dlq/redrive", {"function": "fn"})
    assert st == 200 and body["redriven"] == 1, body
    assert body["events"][0]["requestId"] == rids[1]
    wait(lambda: len(endpoint.snapshot()) == 4, what="the second redriven invocation")
    assert json.loads(endpoint.snapshot()[3].body) == {"order": 2}
    assert call(proc, "GET", DL + "/fn_dlq")[2]["messages"] == []
    assert int(postgres.sql("SELECT count(*) FROM esmd.queue_messages", db[1])[0][0]) == 0
    wait(lambda: queue_len(postgres, db) == 0, what="the redriven events done")
    assert len(endpoint.snapshot()) == 4

    # nothing left: a redrive of everything is 0
    st, _, body = call(proc, "POST", DL + "/fn_dlq/redrive", {"function": "fn"})
    assert st == 200 and body == {"queue": "fn_dlq", "function": "fn", "redriven": 0,
                                  "events": []}, body


def test_dead_letters_redrive_is_all_or_nothing(esmd, postgres, db, endpoint):  # noqa: F811
    endpoint.behaviour = failing
    proc = esmd(fast(config(db, endpoint, {"maximum_retry_attempts": 0,
                                           "dead_letter": "pgqueue://fn_dlq"})))
    dead_lettered(proc, endpoint, [{"n": 1}])
    mid = call(proc, "GET", DL + "/fn_dlq")[2]["messages"][0]["messageId"]
    absent = str(uuid.uuid4())
    assert_error(call(proc, "POST", DL + "/fn_dlq/redrive",
                      {"function": "fn", "messageIds": [mid, absent]}),
                 404, "ResourceNotFoundException", absent)
    assert len(call(proc, "GET", DL + "/fn_dlq")[2]["messages"]) == 1
    assert queue_len(postgres, db) == 0

    # a message that is not an event (sent by hand) is refused, and nothing moves
    postgres.sql("SELECT esmd.send('fn_dlq', 'not json')", db[1])
    assert_error(call(proc, "POST", DL + "/fn_dlq/redrive", {"function": "fn"}),
                 400, "InvalidParameterValueException", "not a JSON event")
    assert len(call(proc, "GET", DL + "/fn_dlq")[2]["messages"]) == 2
    assert queue_len(postgres, db) == 0


def test_dead_letters_errors_and_auth(esmd, db, endpoint):  # noqa: F811
    proc = esmd(fast(config(db, endpoint, {"dead_letter": "pgqueue://fn_dlq"})))
    # 404
    assert_error(call(proc, "GET", "%s/fn_dlq/%s" % (DL, uuid.uuid4())),
                 404, "ResourceNotFoundException")
    assert_error(call(proc, "POST", DL + "/fn_dlq/redrive", {"function": "nope"}),
                 404, "ResourceNotFoundException", "nope")
    assert_error(call(proc, "POST", DL + "/fn_dlq/other", {"function": "fn"}),
                 404, "ResourceNotFoundException")
    # 400
    for q in ("?limit=0", "?limit=1001", "?limit=x", "?limit=-1"):
        assert_error(call(proc, "GET", DL + "/fn_dlq" + q), 400, "InvalidParameterValueException")
    assert_error(call(proc, "GET", DL + "/fn_dlq/not-a-uuid"), 400,
                 "InvalidParameterValueException")
    assert_error(call(proc, "GET", DL + "/bad%20queue"), 400, "InvalidParameterValueException")
    assert_error(call(proc, "POST", DL + "/fn_dlq/redrive", raw=b"{nope"), 400,
                 "InvalidRequestContentException")
    assert_error(call(proc, "POST", DL + "/fn_dlq/redrive", raw=b""), 400,
                 "InvalidRequestContentException")
    for bad in ({}, {"function": 3}, {"function": "fn", "messageIds": "x"},
                {"function": "fn", "messageIds": []}, {"function": "fn", "messageIds": ["x"]},
                {"function": "fn", "extra": 1}):
        assert_error(call(proc, "POST", DL + "/fn_dlq/redrive", bad), 400,
                     "InvalidParameterValueException")
    # 401 / 403
    assert_error(call(proc, "GET", DL + "/fn_dlq", headers={}), 401,
                 "MissingAuthenticationTokenException")
    assert_error(call(proc, "GET", DL + "/fn_dlq", headers={"Authorization": "Bearer wrong"}),
                 401, "UnrecognizedClientException")
    assert_error(call(proc, "POST", DL + "/fn_dlq/redrive", {"function": "fn"}, headers={}),
                 401, "MissingAuthenticationTokenException")


def test_redrive_of_async_on_failure_records(esmd, postgres, db, endpoint):  # noqa: F811
    """An on-failure record of an async invocation in a pgqueue:// queue is redriven as its
    requestPayload (the original event), with its requestContext.requestId."""
    endpoint.behaviour = failing
    proc = esmd(fast(config(db, endpoint, {"maximum_retry_attempts": 0,
                                           "on_failure": "pgqueue://fn_failed"})))
    r = invoke(proc, "fn", b'{"order": 5,  "note": "<b>x</b>"}')
    assert r.status_code == 202, r.text
    rid = r.headers["x-amzn-RequestId"]
    wait(lambda: len(call(proc, "GET", DL + "/fn_failed")[2]["messages"]) == 1,
         what="the on-failure record")
    msg = call(proc, "GET", DL + "/fn_failed")[2]["messages"][0]
    rec = json.loads(msg["body"])
    assert rec["requestContext"]["requestId"] == rid
    assert rec["requestPayload"] == {"order": 5, "note": "<b>x</b>"}

    endpoint.behaviour = None
    st, _, body = call(proc, "POST", DL + "/fn_failed/redrive",
                       {"function": "fn", "messageIds": [msg["messageId"]]})
    assert st == 200 and body["redriven"] == 1, body
    assert body["events"] == [{"messageId": msg["messageId"], "requestId": rid,
                               "originalRequestId": rid}]
    wait(lambda: len(endpoint.ok_requests()) == 1, what="the redriven event")
    req = endpoint.ok_requests()[0]
    assert json.loads(req.body) == {"order": 5, "note": "<b>x</b>"}  # the event, not the record
    assert req.idempotency_key == rid
    assert call(proc, "GET", DL + "/fn_failed")[2]["messages"] == []
