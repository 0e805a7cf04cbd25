"""A function endpoint for the integration tests: a real HTTP/1.1 server (keep-alive,
one thread per connection) on a free loopback port that records every request and answers as
the test says.

    ep = Endpoint()                      # answers 200 {} by default
    ep.url                               # .../2015-03-31/functions/function/invocations
    ep.fail_first(3)                     # first 3 requests: 500
    ep.timeout_first(2, delay=3)         # first 2: sleep 3 s before answering (past the timeout)
    ep.throttle_first(2, retry_after=1)  # first 2: 429 Retry-After: 1
    ep.function_error_first(1)           # first 1: 200 + X-Amz-Function-Error: Unhandled
    ep.delay(0.5)                        # every request takes 0.5 s
    ep.behaviour = lambda req: Response(500) if ... else None   # None = default answer
    Response.reset()                     # close the connection with a TCP RST, no answer
    Response.garbage(b"HTTP/1.1 2")      # these bytes, then close (a malformed answer)
    ep.script([Response(500), Response(200)])                   # by arrival order
    ep.wait_for(lambda: ep.record_count() >= 100, timeout=60)
    ep.max_concurrent                    # most requests ever in flight at once

Each request is a Request: path, headers (lower-case keys), body, json, index (arrival order),
t_arrival / t_done (time.monotonic()), response, ok (True when the answer was a success that
esmd should have taken as delivered).
"""

import base64
import http.server
import json
import socket
import struct
import sys
import threading
import time

INVOKE_PATH = "/2015-03-31/functions/function/invocations"


class Response:
    """How to answer one request. success=None means: 2xx without a function error."""

    def __init__(self, status=200, body=b"{}", headers=None, delay=0.0, success=None,
                 action=None, raw=b""):
        self.action = action  # None: an HTTP answer; "reset" / "garbage": see below
        self.raw = raw
        self.status = status
        self.body = body if isinstance(body, bytes) else json.dumps(body).encode() \
            if not isinstance(body, str) else body.encode()
        self.headers = dict(headers or {})
        self.delay = delay
        if success is None:
            success = action is None and 200 <= status < 300 and not any(
                k.lower() == "x-amz-function-error" for k in self.headers)
        self.success = success

    @classmethod
    def reset(cls, delay=0.0):
        """No answer: the connection is closed with a TCP RST (SO_LINGER 0)."""
        return cls(delay=delay, action="reset", success=False)

    @classmethod
    def garbage(cls, raw, delay=0.0):
        """raw bytes instead of an HTTP answer, then the connection is closed."""
        return cls(delay=delay, action="garbage", raw=raw, success=False)

    def __repr__(self):
        return "Response(%s, delay=%s, success=%s)" % (self.action or self.status, self.delay,
                                                       self.success)


OK = Response()


class Request:
    def __init__(self, index, method, path, headers, body):
        self.index = index
        self.method = method
        self.path = path
        self.headers = headers  # lower-case names
        self.body = body
        self.t_arrival = time.monotonic()
        self.t_done = None
        self.response = None
        try:
            self.json = json.loads(body) if body else None
        except ValueError:
            self.json = None

    @property
    def ok(self):
        return self.response is not None and self.response.success

    @property
    def request_id(self):
        return self.headers.get("x-esmd-request-id")

    @property
    def idempotency_key(self):
        return self.headers.get("x-esmd-idempotency-key")

    def records(self):
        """The Kafka event's records in event order: list of (group key, record dict)."""
        out = []
        recs = (self.json or {}).get("records") if isinstance(self.json, dict) else None
        if isinstance(recs, dict):
            for key, lst in recs.items():
                for r in lst:
                    out.append((key, r))
        elif isinstance(recs, list):
            for r in recs:
                out.append(("", r))
        return out

    def partitions(self):
        """Set of partition numbers in a Kafka event."""
        return {r.get("partition") for _, r in self.records()}

    def __repr__(self):
        return "Request(#%d %s %s, %d bytes, %d records, %r)" % (
            self.index, self.method, self.path, len(self.body), len(self.records()),
            self.response)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "esmd-test-endpoint"

    def log_message(self, *args):  # quiet
        pass

    def _body(self):
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                n = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if n == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                chunks.append(self.rfile.read(n))
                self.rfile.readline()
            return b"".join(chunks)
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _handle(self):
        ep = self.server.endpoint
        body = self._body()
        headers = {k.lower(): v for k, v in self.headers.items()}
        req = ep._arrive(self.command, self.path, headers, body)
        try:
            resp = ep._decide(req)
            if resp.delay:
                ep._closing.wait(resp.delay)
            if resp.action is not None:
                self._break(resp)
                return
            self.send_response(resp.status)
            for k, v in resp.headers.items():
                self.send_header(k, v)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(resp.body)))
            self.end_headers()
            self.wfile.write(resp.body)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, ConnectionAbortedError):
            self.close_connection = True
        finally:
            ep._leave(req)

    def _break(self, resp):
        """Answers with a connection reset or with raw bytes, and closes the connection."""
        self.close_connection = True
        if resp.action == "garbage":
            self.wfile.write(resp.raw)
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_WR)
        else:
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                       struct.pack("ii", 1, 0))
        self.connection.close()

    def do_POST(self):
        self._handle()

    def do_PUT(self):
        self._handle()

    def do_GET(self):
        if self.path == "/stats":
            ep = self.server.endpoint
            body = json.dumps({"requests": len(ep.requests), "records": ep.record_count(),
                               "max_concurrent": ep.max_concurrent}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        self._handle()


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 64

    def handle_error(self, request, client_address):
        """A client that went away (esmd killed or timing out) is not an error of the test."""
        if isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            return
        super().handle_error(request, client_address)


class Endpoint:
    def __init__(self, host="127.0.0.1", port=0):
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._closing = threading.Event()
        self.requests = []
        self.inflight = 0
        self.max_concurrent = 0
        self.behaviour = None  # callable(Request) -> Response | None
        self._script = []
        self.default = OK
        self.server = _Server((host, port), _Handler)
        self.server.endpoint = self
        self.port = self.server.server_address[1]
        self.base = "http://%s:%d" % (host, self.port)
        self.url = self.base + INVOKE_PATH
        self._thread = threading.Thread(target=self.server.serve_forever,
                                        kwargs={"poll_interval": 0.1}, daemon=True)
        self._thread.start()

    # ---- behaviour -------------------------------------------------------------------------

    def script(self, responses):
        """The next requests, in arrival order, get these responses; then the default."""
        with self._lock:
            self._script = list(responses)

    def fail_first(self, n, status=500):
        self.script([Response(status, {"message": "injected failure"}) for _ in range(n)])

    def timeout_first(self, n, delay):
        self.script([Response(200, delay=delay, success=False) for _ in range(n)])

    def throttle_first(self, n, retry_after=1):
        self.script([Response(429, {"message": "Rate Exceeded."},
                              {"Retry-After": str(retry_after)}) for _ in range(n)])

    def function_error_first(self, n):
        self.script([Response(200, {"errorType": "Error", "errorMessage": "boom"},
                              {"X-Amz-Function-Error": "Unhandled"}) for _ in range(n)])

    def delay(self, seconds):
        self.default = Response(200, delay=seconds)

    def _decide(self, req):
        with self._lock:
            resp = self._script.pop(0) if self._script else None
        if resp is None and self.behaviour is not None:
            resp = self.behaviour(req)
        if resp is None:
            resp = self.default
        req.response = resp
        return resp

    # ---- bookkeeping -----------------------------------------------------------------------

    def _arrive(self, method, path, headers, body):
        with self._cond:
            req = Request(len(self.requests), method, path, headers, body)
            self.requests.append(req)
            self.inflight += 1
            self.max_concurrent = max(self.max_concurrent, self.inflight)
            self._cond.notify_all()
            return req

    def _leave(self, req):
        with self._cond:
            req.t_done = time.monotonic()
            self.inflight -= 1
            self._cond.notify_all()

    def snapshot(self):
        with self._lock:
            return list(self.requests)

    def ok_requests(self):
        """Requests that were answered with success (esmd should treat them as delivered)."""
        return [r for r in self.snapshot() if r.ok and r.t_done is not None]

    def records(self, ok_only=True):
        """[(request, group key, record)] in arrival order."""
        reqs = self.ok_requests() if ok_only else self.snapshot()
        return [(req, key, rec) for req in reqs for key, rec in req.records()]

    def record_count(self, ok_only=True):
        return len(self.records(ok_only))

    def offsets(self, ok_only=True):
        """{partition: [offsets in arrival order]} over delivered records."""
        out = {}
        for _, _, rec in self.records(ok_only):
            out.setdefault(rec["partition"], []).append(rec["offset"])
        return out

    def wait_for(self, predicate, timeout=60.0, what="endpoint condition"):
        """Waits until predicate() is truthy (re-checked on every request and every 0.1 s)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                self._lock.release()
                try:
                    v = predicate()
                finally:
                    self._lock.acquire()
                if v:
                    return v
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("timed out after %.1fs waiting for %s (%d requests, "
                                       "%d delivered records)" % (
                                           timeout, what, len(self.requests),
                                           sum(len(r.records()) for r in self.requests
                                               if r.ok)))
                self._cond.wait(min(left, 0.1))

    def wait_records(self, n, timeout=60.0):
        return self.wait_for(lambda: self.record_count() >= n, timeout,
                             "%d delivered records" % n)

    def reset(self):
        with self._lock:
            self.requests = []
            self._script = []
            self.max_concurrent = self.inflight
        self.behaviour = None
        self.default = OK

    def close(self):
        self._closing.set()
        self.server.shutdown()
        self.server.server_close()


def b64(s):
    if isinstance(s, str):
        s = s.encode()
    return base64.b64encode(s).decode()


def unb64(s):
    return None if s is None else base64.b64decode(s)
