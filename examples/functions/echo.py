#!/usr/bin/env python3
"""A sample function for esmd: answers every POST with 200 `{}` and prints one line per event.

It serves the Lambda Runtime Interface Emulator's path, so esmd (or anything that speaks to a
Lambda container image) can invoke it unchanged:

    POST /2015-03-31/functions/function/invocations   (and POST /)
    GET  /                                             200, for health checks

    python3 examples/functions/echo.py [--host 0.0.0.0] [--port 8080]

Standard library only. A Kafka event prints as
    orders-0: 3 records, offsets 10..12; orders-1: 1 record, offset 7 (412 bytes)
"""

import argparse
import base64
import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

INVOKE_PATH = "/2015-03-31/functions/function/invocations"


def summarize(event, nbytes):
    if not isinstance(event, dict):
        return "non-object event (%d bytes)" % nbytes
    records = event.get("records")
    if isinstance(records, dict):  # Kafka: {"topic-N": [...]}
        parts = []
        for key, recs in records.items():
            offs = [r.get("offset") for r in recs]
            if len(offs) == 1:
                parts.append("%s: 1 record, offset %s" % (key, offs[0]))
            else:
                parts.append("%s: %d records, offsets %s..%s" % (key, len(offs), offs[0],
                                                                 offs[-1]))
        first = next(iter(records.values()), [{}])[0] if records else {}
        sample = ""
        if first.get("value"):
            try:
                sample = " first value %r" % base64.b64decode(first["value"])[:60].decode(
                    "utf-8", "replace")
            except ValueError:
                pass
        return "%s (%d bytes)%s" % ("; ".join(parts) or "no records", nbytes, sample)
    if isinstance(records, list):  # Kinesis- / SQS-shaped
        return "%d records (%d bytes)" % (len(records), nbytes)
    return "event with keys %s (%d bytes)" % (sorted(event)[:8], nbytes)


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as esmd reuses connections

    def log_message(self, *args):
        pass

    def _answer(self, status, body):
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        self._answer(200, b'{"status":"ok"}')

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if self.path not in (INVOKE_PATH, "/"):
            self._answer(404, b'{"message":"not found"}')
            return
        try:
            event = json.loads(body) if body else None
            line = summarize(event, len(body))
        except ValueError:
            line = "invalid JSON (%d bytes)" % len(body)
        rid = self.headers.get("X-Esmd-Request-Id", "-")
        print("%s %s %s" % (time.strftime("%H:%M:%S"), rid, line), flush=True)
        self._answer(200, b"{}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--host", default="0.0.0.0")
    ap.add_argument("--port", type=int, default=8080)
    args = ap.parse_args()
    srv = ThreadingHTTPServer((args.host, args.port), Handler)
    srv.daemon_threads = True
    print("echo function listening on http://%s:%d%s" % (args.host, srv.server_address[1],
                                                          INVOKE_PATH), flush=True)
    try:
        srv.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        srv.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
