"""A small Confluent-compatible schema registry for the tests (tests/integration/
test_schema_registry.py, tests/bench/schema_path_bench.py).

It STANDS IN for a real registry where the real one here cannot serve: the benchmark
(tests/bench/schema_path_bench.py), where a JVM beside the measured path would blur the ratio,
and test_protobuf_value, which needs Confluent's answer for a Protobuf schema (.proto text;
Apicurio answers the base64 descriptor as it was registered).
test_schema_registry.py runs on the real Apicurio Registry (servers.ApicurioRegistry) and checks
that this stand-in answers esmd's GET /schemas/ids/{id} as Apicurio does
(test_the_stand_in_answers_as_apicurio). What talks to it on the producing side is real:
the confluent-kafka client's AvroSerializer, JSONSerializer and ProtobufSerializer (their own
SchemaRegistryClient, over HTTP); on the consuming side esmd's libcurl client.

The subset of Confluent's REST API those two use (docs/kafka.md, "Schema registry"):

    POST /subjects/{subject}/versions      register; the same schema again keeps its id
                                           -> {"id": N, "subject", "version", "schema", ...}
    POST /subjects/{subject}               look a schema up -> the same shape, or 40403
    GET  /schemas/ids/{id}[?format=...]    {"schema": "...", "schemaType": "JSON"|"PROTOBUF"}
                                           (no schemaType for Avro, as Confluent answers)
                                           or 404 {"error_code": 40403, "message": ...}
    GET  /subjects, /subjects/{s}/versions, /subjects/{s}/versions/{n|latest}
    GET  /config, PUT /config[/{s}]        {"compatibilityLevel": "BACKWARD"} (no checks made)

Protobuf schemas, as Confluent's registry keeps them: one registered as the base64 of a serialized
FileDescriptorProto (what ProtobufSerializer sends) is stored as .proto text (proto_text.py) and
answered as text; `?format=serialized` answers the base64 instead (only for schemas registered
so: the stand-in has no .proto parser). .protobuf_text = False makes it answer the base64 form
by default, as a registry that keeps what it was given would.

Redirector(target) is a front that answers every request with a redirect (status 307 unless
told) to the same path under target, a base URL; Redirector(None) redirects to itself, a loop.
.requests holds (method, path, Authorization header or None) of what it was asked; the stand-in's
.authorizations holds the Authorization header (or None) of every request it answered.

Ids are global and start at 1, as Confluent's. Registry(port=0) picks a free loopback port;
.stop() closes the socket (clients get "connection refused"), .start() listens again on the
same port with the same schemas. .fetches(id) counts the GET /schemas/ids/{id} requests.
"""

import base64
import http.server
import json
import re
import threading
import urllib.parse

import proto_text


def _error(status, code, message):
    return status, {"error_code": code, "message": message}


class Registry:
    def __init__(self, host="127.0.0.1", port=0):
        self.host = host
        self.port = port
        self.lock = threading.RLock()  # _shape and _norm run with it held, and take it
        self.schemas = {}      # id -> {"schema": text, "schemaType": t, "references": [...]}
        self.subjects = {}     # subject -> [id of version 1, id of version 2, ...]
        self.fetch_counts = {}  # id -> GET /schemas/ids/{id} requests
        self.serialized = {}   # Protobuf schema text -> the base64 it was registered as
        self.protobuf_text = True
        self.requests = []     # (method, path) of every request
        self.authorizations = []  # the Authorization header (or None) of every request
        self.server = None
        self.thread = None
        self.start()

    # ---- life cycle ----------------------------------------------------------------------

    @property
    def url(self):
        return "http://%s:%d" % (self.host, self.port)

    def start(self):
        if self.server is not None:
            return
        registry = self

        class Handler(_Handler):
            reg = registry

        srv = _Server((self.host, self.port), Handler)
        self.port = srv.server_address[1]
        self.server = srv
        self.thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def stop(self):
        srv, self.server = self.server, None
        if srv is not None:
            srv.shutdown()
            srv.server_close()
            self.thread.join(5)

    def running(self):
        return self.server is not None

    close = stop

    # ---- what the tests read -------------------------------------------------------------

    def fetches(self, schema_id):
        with self.lock:
            return self.fetch_counts.get(schema_id, 0)

    def all_fetches(self):
        with self.lock:
            return dict(self.fetch_counts)

    def register(self, subject, schema, schema_type="AVRO", references=None):
        """Registers directly (what a producer's serializer does over HTTP) -> the id."""
        sid, _ = self._register(subject, {"schema": schema if isinstance(schema, str) else
                                          json.dumps(schema), "schemaType": schema_type,
                                          "references": references or []})
        return sid

    # ---- the API -------------------------------------------------------------------------

    def _norm(self, body):
        s = {"schema": body.get("schema", ""),
             "schemaType": (body.get("schemaType") or "AVRO").upper(),
             "references": body.get("references") or []}
        if s["schemaType"] == "PROTOBUF":
            s["schema"] = self._protobuf_text(s["schema"])
        return s

    def _protobuf_text(self, schema):
        """base64 of a FileDescriptorProto -> .proto text (Confluent stores text); text as is."""
        from google.protobuf import descriptor_pb2
        try:
            raw = base64.b64decode(schema, validate=True)
            fdp = descriptor_pb2.FileDescriptorProto.FromString(raw)
            text = proto_text.to_text(fdp)
        except Exception:  # not base64, not a descriptor, or not something to_text writes
            return schema
        with self.lock:
            self.serialized[text] = schema
        return text

    def _schema_text(self, s, query):
        """The schema as GET answers it: Protobuf as text, or base64 with ?format=serialized."""
        if s["schemaType"] != "PROTOBUF":
            return s["schema"]
        fmt = urllib.parse.parse_qs(query).get("format", [""])[0]
        if fmt == "serialized" or not self.protobuf_text:
            with self.lock:
                return self.serialized.get(s["schema"], s["schema"])
        return s["schema"]

    def _find(self, subject, s):
        for version, sid in enumerate(self.subjects.get(subject, []), 1):
            if self.schemas[sid] == s:
                return sid, version
        return None, None

    def _register(self, subject, body):
        s = self._norm(body)
        with self.lock:
            sid, version = self._find(subject, s)
            if sid is None:
                sid = next((i for i, x in self.schemas.items() if x == s), None)
                if sid is None:
                    sid = len(self.schemas) + 1
                    self.schemas[sid] = s
                self.subjects.setdefault(subject, []).append(sid)
                version = len(self.subjects[subject])
            return sid, version

    def _shape(self, subject, version, sid, query=""):
        s = self.schemas[sid]
        out = {"subject": subject, "version": version, "id": sid,
               "schema": self._schema_text(s, query)}
        if s["schemaType"] != "AVRO":
            out["schemaType"] = s["schemaType"]
        if s["references"]:
            out["references"] = s["references"]
        return out

    def handle(self, method, path, body):
        """-> (status, JSON body)."""
        with self.lock:
            self.requests.append((method, path))
        path, _, query = path.partition("?")
        parts = [urllib.parse.unquote(p) for p in path.strip("/").split("/")]
        if method == "GET" and len(parts) == 3 and parts[:2] == ["schemas", "ids"]:
            try:
                sid = int(parts[2])
            except ValueError:
                return _error(404, 40403, "Schema not found")
            with self.lock:
                self.fetch_counts[sid] = self.fetch_counts.get(sid, 0) + 1
                s = self.schemas.get(sid)
            if s is None:
                return _error(404, 40403, "Schema %d not found" % sid)
            out = {"schema": self._schema_text(s, query)}
            if s["schemaType"] != "AVRO":
                out["schemaType"] = s["schemaType"]
            if s["references"]:
                out["references"] = s["references"]
            return 200, out
        if parts[0] == "subjects":
            return self._subjects(method, parts[1:], body, query)
        if parts[0] == "config":
            return 200, {"compatibilityLevel": "BACKWARD"}
        if parts == ["schemas", "types"]:
            return 200, ["AVRO", "JSON", "PROTOBUF"]
        return _error(404, 404, "HTTP 404 Not Found")

    def _subjects(self, method, rest, body, query=""):
        if not rest:
            with self.lock:
                return 200, sorted(self.subjects)
        subject = rest[0]
        if method == "POST" and len(rest) == 2 and rest[1] == "versions":
            if not isinstance(body, dict) or not isinstance(body.get("schema"), str):
                return _error(422, 42201, "Invalid schema")
            sid, version = self._register(subject, body)
            with self.lock:
                return 200, self._shape(subject, version, sid)
        if method == "POST" and len(rest) == 1:
            if not isinstance(body, dict):
                return _error(422, 42201, "Invalid schema")
            with self.lock:
                if subject not in self.subjects:
                    return _error(404, 40401, "Subject '%s' not found." % subject)
                sid, version = self._find(subject, self._norm(body))
                if sid is None:
                    return _error(404, 40403, "Schema not found")
                return 200, self._shape(subject, version, sid)
        if method == "GET":
            with self.lock:
                ids = self.subjects.get(subject)
                if ids is None:
                    return _error(404, 40401, "Subject '%s' not found." % subject)
                if len(rest) == 2 and rest[1] == "versions":
                    return 200, list(range(1, len(ids) + 1))
                if len(rest) == 3 and rest[1] == "versions":
                    n = len(ids) if rest[2] == "latest" else int(rest[2]) if \
                        re.fullmatch(r"[0-9]+", rest[2]) else 0
                    if not 1 <= n <= len(ids):
                        return _error(404, 40402, "Version %s not found." % rest[2])
                    return 200, self._shape(subject, n, ids[n - 1], query)
        return _error(404, 404, "HTTP 404 Not Found")


class _Handler(http.server.BaseHTTPRequestHandler):
    # HTTP/1.0: one request a connection, so that once .stop() has closed the listening socket
    # no kept-alive connection goes on answering
    protocol_version = "HTTP/1.0"
    reg = None

    def log_message(self, *args):  # quiet
        pass

    def _do(self, method):
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n) if n else b""
        try:
            body = json.loads(raw) if raw else None
        except ValueError:
            body = None
        with self.reg.lock:
            self.reg.authorizations.append(self.headers.get("Authorization"))
        status, out = self.reg.handle(method, self.path, body)
        data = json.dumps(out).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/vnd.schemaregistry.v1+json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._do("GET")

    def do_POST(self):
        self._do("POST")

    def do_PUT(self):
        self._do("PUT")

    def do_DELETE(self):
        self._do("DELETE")


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class Redirector:
    """An HTTP front answering every request with `status` and Location: target + the request's
    path (target None: this front's own URL + the path, a redirect loop)."""

    def __init__(self, target, status=307, host="127.0.0.1"):
        self.target = target
        self.status = status
        self.lock = threading.Lock()
        self.requests = []  # (method, path, Authorization or None)
        front = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):
                with front.lock:
                    front.requests.append(("GET", self.path, self.headers.get("Authorization")))
                base = front.target if front.target is not None else front.url
                body = b"moved\n"
                self.send_response(front.status)
                self.send_header("Location", base.rstrip("/") + self.path)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = _Server((host, 0), Handler)
        self.url = "http://%s:%d" % (host, self.server.server_address[1])
        self.thread = threading.Thread(target=self.server.serve_forever,
                                       kwargs={"poll_interval": 0.05}, daemon=True)
        self.thread.start()

    def gets(self):
        with self.lock:
            return [r for r in self.requests if r[0] == "GET"]

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)
