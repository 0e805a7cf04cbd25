"""The admin console's routes (src/admin_console.c, src/mapping_watch.c, docs/admin.md
"Console"): the static files at /ui/ and their headers, the JSON routes the page reads (a
mapping's history and given-up records, the functions, the async queue, the destination
queues), and the defences of the mutating routes (no credentials from a cookie or the query
string, cross-origin POSTs refused). Real Redis and Postgres; tests/integration/test_console.py
drives the page itself in Chromium."""

import base64
import json

import requests

from endpoint import Response
from servers import wait_for
from test_async_e2e import TOKEN, config, db, fast, invoke  # noqa: F401
from test_redis_e2e import redis_config, xadd  # noqa: F401

AUTH = {"Authorization": "Bearer " + TOKEN}
FUNCTION_ERROR = {"X-Amz-Function-Error": "Unhandled"}


def get(proc, path, headers=AUTH):
    return requests.get(proc.admin + path, headers=headers, timeout=30)


def with_token(cfg):
    cfg = dict(cfg)
    cfg["admin"] = {"token": TOKEN}
    return cfg


def test_static_files_are_public_with_strict_headers(esmd, db, endpoint):  # noqa: F811
    proc = esmd(config(db, endpoint))
    r = get(proc, "/ui/", headers={})
    assert r.status_code == 200, r.text
    assert r.headers["Content-Type"] == "text/html; charset=utf-8"
    csp = r.headers["Content-Security-Policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert "unsafe-inline" not in csp and "default-src 'none'" in csp
    assert r.headers["X-Content-Type-Options"] == "nosniff"
    assert r.headers["X-Frame-Options"] == "DENY"
    assert r.headers["Cache-Control"] == "no-cache"
    assert "<script" in r.text and "console.js" in r.text
    # no inline script: every <script> has a src
    assert r.text.count("<script") == r.text.count("<script src=")
    r2 = get(proc, "/ui/", headers={"If-None-Match": r.headers["ETag"]})
    assert r2.status_code == 304 and r2.content == b""

    js = get(proc, "/ui/console.js", headers={})
    assert js.status_code == 200 and js.headers["Content-Type"] == "text/javascript; charset=utf-8"
    css = get(proc, "/ui/console.css", headers={})
    assert css.status_code == 200 and css.headers["Content-Type"] == "text/css; charset=utf-8"
    assert get(proc, "/ui/nothing.js", headers={}).status_code == 404
    r = requests.get(proc.admin + "/ui", allow_redirects=False, timeout=30)
    assert r.status_code == 308 and r.headers["Location"] == "/ui/"


def test_data_routes_need_the_token_in_the_header(esmd, db, endpoint):  # noqa: F811
    proc = esmd(with_token(config(db, endpoint)))
    for path in ("/admin/functions", "/admin/async", "/admin/dead-letters", "/admin/mappings"):
        assert get(proc, path, headers={}).status_code == 401, path
        # neither a cookie nor the query string carries credentials
        assert get(proc, path + "?token=" + TOKEN, headers={}).status_code == 401, path
        r = get(proc, path, headers={"Cookie": "token=%s; Authorization=Bearer %s" % (TOKEN, TOKEN)})
        assert r.status_code == 401, path
        assert get(proc, path).status_code == 200, path


def test_cross_origin_posts_are_refused(esmd, db, endpoint):  # noqa: F811
    proc = esmd(with_token(config(db, endpoint)))
    url = proc.admin + "/admin/dead-letters/q1/redrive"
    body = json.dumps({"function": "fn"})
    host = proc.admin.split("//", 1)[1]
    for origin in ("http://evil.example", "null", "http://%s.evil.example" % host,
                   "https://127.0.0.1:1"):
        r = requests.post(url, data=body, headers=dict(AUTH, Origin=origin), timeout=30)
        assert r.status_code == 403, (origin, r.text)
        assert r.headers["x-amzn-ErrorType"] == "AccessDeniedException"
        assert "cross-origin" in r.json()["Message"]
    # the page's own origin, and clients that send none (curl, the SDKs), are served
    r = requests.post(url, data=body, headers=dict(AUTH, Origin="http://" + host), timeout=30)
    assert r.status_code == 200 and r.json()["redriven"] == 0, r.text
    r = requests.post(url, data=body, headers=AUTH, timeout=30)
    assert r.status_code == 200, r.text
    # reads are not refused for their Origin (a browser cannot read them cross-origin anyway)
    assert get(proc, "/admin/functions", headers=dict(AUTH, Origin="http://evil.example")) \
        .status_code == 200


def fail_marked(req):
    """A function error for a batch that holds an entry with the field "bad"."""
    for rec in (req.json or {}).get("Records") or []:
        if "bad" in json.loads(base64.b64decode(rec["kinesis"]["data"])):
            return Response(200, {"errorType": "Poison", "errorMessage": "cannot take <b>it</b>"},
                            headers=FUNCTION_ERROR)
    return None


def test_mapping_history_and_given_up_records(redis, endpoint, esmd, redis_config, names):  # noqa: F811
    stream = names.topic()
    cfg = with_token(redis_config(stream, batch_size=1, mapping_extra={
        "maximum_retry_attempts": 1}))
    name = cfg["mappings"][0]["name"]
    endpoint.behaviour = fail_marked
    proc = esmd(cfg, env={"ESMD_CONSOLE_SAMPLE_MS": "1000",
                          "ESMD_MAPPING_RETRY_BACKOFF": "50,100"})
    xadd(redis, stream, ("ok", "1"))
    xadd(redis, stream, ("bad", "<script>alert(1)</script>"))
    xadd(redis, stream, ("ok", "2"))

    def failures():
        return get(proc, "/admin/mappings/%s/failures" % name).json()["failures"]

    wait_for(lambda: len(failures()) == 1, 30, 0.1, "the given-up record")
    f = failures()[0]
    assert f["condition"] == "RetryAttemptsExhausted"
    assert f["attempts"] == 2 and f["invocations"] == 2
    assert f["status_code"] == 200 and f["function_error"] == "Unhandled"
    assert json.loads(f["error"]) == {"errorType": "Poison", "errorMessage": "cannot take <b>it</b>"}
    assert f["destination"] is None  # discarded: no on_failure
    rec = f["record"]
    assert rec["requestContext"]["condition"] == "RetryAttemptsExhausted"
    data = rec["payload"]["Records"][0]["kinesis"]["data"]
    assert json.loads(base64.b64decode(data)) == {"bad": "<script>alert(1)</script>"}
    assert f["record_bytes"] == len(json.dumps(rec, separators=(",", ":")).encode()) or \
        f["record_bytes"] > 0

    endpoint.wait_for(lambda: len(endpoint.ok_requests()) >= 2, 30, "the good entries")

    def history():
        return get(proc, "/admin/mappings/%s/history" % name).json()

    wait_for(lambda: len(history()["samples"]) >= 3, 30, 0.2, "three samples")
    h = history()
    assert h["interval_ms"] == 1000
    times = [s["time"] for s in h["samples"]]
    assert times == sorted(times)
    assert all(s["lag"] is None or s["lag"] >= 0 for s in h["samples"])
    # the three entries were read: their rate shows in some sample
    assert sum(s["records_per_second"] for s in h["samples"]) > 0
    assert sum(s["failed_per_second"] for s in h["samples"]) > 0

    m = get(proc, "/admin/mappings/" + name).json()
    assert "records_per_second" in m["status"] and m["status"]["retries_under_way"] == 0
    assert get(proc, "/admin/mappings/%s/nothing" % name).status_code == 404
    assert get(proc, "/admin/mappings/nosuch/history").status_code == 404


def test_functions_async_queue_and_destination_queues(esmd, db, endpoint):  # noqa: F811
    cfg = fast(config(db, endpoint, {"maximum_retry_attempts": 0,
                                     "dead_letter": "pgqueue://fn_dlq",
                                     "on_failure": "pgqueue://fn_failed"}), workers=False)
    proc = esmd(cfg)
    for i in range(3):
        assert invoke(proc, "fn", {"i": i}).status_code == 202
    assert invoke(proc, "fn", {"i": 9}, itype="RequestResponse").status_code == 200

    a = get(proc, "/admin/async").json()
    assert a["depth"] == 3 and a["due"] == 3 and a["in_progress"] == 0, a
    assert a["retries_scheduled"] == 0 and a["oldest_age_ms"] >= 0
    assert a["counted_up_to"] == 100000
    assert a["functions"] == [{"function": "fn", "depth": 3, "due": 3, "in_progress": 0,
                               "retries_scheduled": 0,
                               "oldest_age_ms": a["functions"][0]["oldest_age_ms"]}]

    fns = get(proc, "/admin/functions").json()["functions"]
    assert [f["name"] for f in fns] == ["fn"]
    f = fns[0]
    assert f["invocations"] == 1 and f["errors"] == 0 and f["throttles"] == 0
    assert f["max_concurrency"] == 8 and f["concurrency_in_use"] == 0
    assert 0 < f["p50_seconds"] <= f["p99_seconds"]

    q = get(proc, "/admin/dead-letters").json()["queues"]
    assert q == [{"queue": "fn_dlq", "messages": 0, "oldestSentTime": None,
                  "uses": [{"role": "dead_letter", "function": "fn"}]},
                 {"queue": "fn_failed", "messages": 0, "oldestSentTime": None,
                  "uses": [{"role": "on_failure", "function": "fn"}]}], q


def test_loopback_mode_refuses_other_host_names(esmd, db, endpoint):  # noqa: F811
    """Without credentials (loopback clients only), a Host that is a name other than localhost
    is refused: a site whose name resolves to 127.0.0.1 (DNS rebinding) gets nothing."""
    cfg = config(db, endpoint)
    cfg["admin"] = {}
    proc = esmd(cfg)
    port = proc.admin.rsplit(":", 1)[1]
    for host in ("127.0.0.1:" + port, "localhost:" + port, "LOCALHOST", "127.0.0.1"):
        assert get(proc, "/admin/functions", headers={"Host": host}).status_code == 200, host
    for host in ("evil.example:" + port, "evil.example", "localhost.evil.example:" + port,
                 "127.0.0.1.nip.io:" + port):
        r = get(proc, "/admin/functions", headers={"Host": host})
        assert r.status_code == 403, host
        assert "Host header" in r.json()["Message"]
        r = requests.post(proc.admin + "/admin/dead-letters/q/redrive", headers={"Host": host},
                          data=json.dumps({"function": "fn"}), timeout=30)
        assert r.status_code == 403, host
    # the static files hold no data: served whatever the Host
    assert get(proc, "/ui/", headers={"Host": "evil.example"}).status_code == 200
