"""A real Lambda runtime as an esmd function: the Runtime Interface Emulator (RIE) running a Python
handler through awslambdaric, exactly as a Lambda container image's entrypoint does
(`aws-lambda-rie python -m awslambdaric module.handler`).

    rie = Rie("kafka_handler.handler", timeout=3)    # a handler of tests/integration/lambda_handlers
    rie.url          # http://127.0.0.1:PORT/2015-03-31/functions/function/invocations
    rie.records()    # what the handler wrote: one JSON object per invocation (lambda_handlers/_record.py)
    rie.log()        # the RIE's stdout+stderr (START/END/REPORT lines, tracebacks, its own logs)
    rie.alive()      # the RIE process is still running
    rie.close()

The RIE serves one invocation at a time: a second request while one is running is not queued
(this build logs `ReserveFailed: AlreadyReserved` and panics, so both requests lose their
answer and the process exits). esmd's function for a Rie must have `max_concurrency: 1`
(FUNCTION below); N concurrent invocations need N RIEs behind N functions.

The RIE is the binary scripts/install-deps builds into ${ESMD_CACHE:-~/.cache/esmd}/bin (it
honours XDG_CACHE_HOME as install-deps does); $ESMD_RIE overrides the path. The handler runs on
the Python of .venv/ (awslambdaric and aws-lambda-powertools from tests/requirements.txt);
$ESMD_LAMBDA_PYTHON overrides it.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request

import servers

HANDLERS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "lambda_handlers")
INVOKE_PATH = "/2015-03-31/functions/function/invocations"
RECORD_ENV = "ESMD_TEST_RECORD_FILE"


def rie_binary():
    if os.environ.get("ESMD_RIE"):
        return os.environ["ESMD_RIE"]
    cache = os.environ.get("ESMD_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "esmd")
    return os.path.join(cache, "bin", "aws-lambda-rie")


def lambda_python():
    if os.environ.get("ESMD_LAMBDA_PYTHON"):
        return os.environ["ESMD_LAMBDA_PYTHON"]
    venv = os.path.join(servers.ROOT, ".venv", "bin", "python")
    return venv if os.path.exists(venv) else sys.executable


def function(rie, timeout="10s", **extra):
    """esmd's `functions:` entry for a Rie: its URL, one request at a time."""
    fn = {"url": rie.url, "timeout": timeout, "max_concurrency": 1}
    fn.update(extra)
    return fn


class Rie:
    """One aws-lambda-rie process running `handler` (module.function in lambda_handlers/).

    timeout: AWS_LAMBDA_FUNCTION_TIMEOUT in seconds (the RIE's default is 300).
    env: more environment for the handler (the RIE passes its environment to the runtime).
    warm: invoke it once before returning (see warm_up)."""

    def __init__(self, handler, timeout=None, env=None, name="esmd-test-fn", warm=True):
        self.exe = rie_binary()
        if not os.access(self.exe, os.X_OK):
            raise RuntimeError("%s not found: scripts/install-deps builds the Runtime Interface "
                               "Emulator there (or set ESMD_RIE)" % self.exe)
        self.python = lambda_python()
        self.handler = handler
        self.tmp = tempfile.mkdtemp(prefix="esmd-rie-")
        self.record_file = os.path.join(self.tmp, "records.jsonl")
        self.logfile = os.path.join(self.tmp, "rie.log")
        self.port = servers.free_port()
        self.api_port = servers.free_port()  # the Runtime API; the RIE's default 9001 is shared
        self.url = "http://127.0.0.1:%d%s" % (self.port, INVOKE_PATH)
        e = dict(os.environ)
        e.update({
            "PYTHONPATH": HANDLERS,
            "AWS_LAMBDA_FUNCTION_NAME": name,
            "AWS_REGION": "us-east-1", "AWS_DEFAULT_REGION": "us-east-1",
            "POWERTOOLS_SERVICE_NAME": name,
            RECORD_ENV: self.record_file,
        })
        if timeout is not None:
            e["AWS_LAMBDA_FUNCTION_TIMEOUT"] = str(timeout)
        e.update(env or {})
        log = open(self.logfile, "ab")
        self.proc = subprocess.Popen(
            [self.exe, "--runtime-interface-emulator-address", "127.0.0.1:%d" % self.port,
             "--runtime-api-address", "127.0.0.1:%d" % self.api_port,
             self.python, "-m", "awslambdaric", handler],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=self.tmp,
            env=e, start_new_session=True)
        log.close()
        # The RIE has no health route and every POST on its path is an invocation (Init runs on
        # the first one), so "answers" means: accepts TCP connections.
        servers.wait_for(self._listening, 20, 0.05, "aws-lambda-rie on port %d" % self.port)
        if warm:
            self.warm_up()

    def warm_up(self):
        """One invocation with an empty event, before esmd sends any: the runtime's Init (the
        handler module's imports: Powertools, pydantic) runs on the first invocation and takes
        seconds on a loaded machine, longer than the short function timeouts some tests use;
        esmd would time out, send the next request, and the RIE serves one at a time (a second
        request crashes it). The warm-up's record, whatever the handler made of `{}`, is
        removed."""
        req = urllib.request.Request(self.url, data=b"{}", method="POST",
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                resp.read()
        except urllib.error.HTTPError as e:  # a handler error is still a warm runtime
            e.read()
        try:
            os.unlink(self.record_file)
        except FileNotFoundError:
            pass

    def _listening(self):
        if self.proc.poll() is not None:
            raise RuntimeError("aws-lambda-rie exited (%s):\n%s" % (self.proc.returncode,
                                                                   servers.tail(self.logfile)))
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        except OSError:
            return False

    def alive(self):
        return self.proc.poll() is None

    def records(self):
        """The handler's records, in invocation order (lambda_handlers/_record.py)."""
        try:
            with open(self.record_file) as f:
                return [json.loads(line) for line in f if line.strip()]
        except FileNotFoundError:
            return []

    def log(self):
        return servers.tail(self.logfile, 100000)

    def close(self):
        servers._stop_process(self.proc, timeout=10)
        shutil.rmtree(self.tmp, ignore_errors=True)
