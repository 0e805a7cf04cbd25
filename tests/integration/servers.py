"""Real servers on loopback for the integration tests and scripts/dev-up.

Every class here starts one process on a free 127.0.0.1 port, knows how to wait until it
answers, and stops it (and removes its temporary directory) in stop(). Only the Python standard
library is used, so scripts/dev-up can import this module without pytest.

    Postgres   initdb + postgres as the `postgres` user when run as root (it refuses root)
    Redis      redis-server (persistent=True: an fsynced AOF), restartable on its port
    KafkaMock  build/kafkatool mock (librdkafka's mock cluster speaking the Kafka protocol)
    KafkaBroker  scripts/kafka-broker: a real single-node KRaft Apache Kafka (same interface)
    ApicurioRegistry  scripts/apicurio-registry: a real schema registry (Confluent's API)
    Esmd       build/esmd run -c FILE, stderr captured to a file
"""

import glob
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.error
import urllib.request

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def build_dir():
    """The build tree under test: $ESMD_BUILD (relative to the repo root) or build/."""
    d = os.environ.get("ESMD_BUILD", "build")
    return d if os.path.isabs(d) else os.path.join(ROOT, d)


def binary(name):
    return os.path.join(build_dir(), name)


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout=30.0, interval=0.05, what="condition"):
    """Polls predicate() until it returns something truthy; returns that value.
    Raises TimeoutError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        v = predicate()
        if v:
            return v
        if time.monotonic() > deadline:
            raise TimeoutError("timed out after %.1fs waiting for %s" % (timeout, what))
        time.sleep(interval)


def tail(path, lines=60):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        return "(cannot read %s: %s)" % (path, e)
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])


def _stop_process(proc, sig=signal.SIGTERM, timeout=10.0):
    """Sends sig, waits up to timeout, then SIGKILL. Returns the exit code."""
    if proc is None:
        return None
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        except ProcessLookupError:
            pass
    return proc.returncode


# ---------------------------------------------------------------------------------------------
# PostgreSQL


def pg_bindir():
    """Directory of initdb/postgres/psql: the newest /usr/lib/postgresql/N/bin (Debian keeps
    the server binaries off PATH), else wherever initdb is on PATH."""
    for cand in sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                       key=lambda p: int(p.split("/")[-2]) if p.split("/")[-2].isdigit() else 0,
                       reverse=True):
        if os.path.exists(os.path.join(cand, "initdb")):
            return cand
    initdb = shutil.which("initdb")
    if initdb:
        return os.path.dirname(os.path.realpath(initdb))
    raise RuntimeError("PostgreSQL server binaries not found: install the `postgresql` package "
                       "(scripts/install-deps)")


class Postgres:
    """A throw-away PostgreSQL cluster: data directory and unix socket in a temporary directory,
    TCP on 127.0.0.1:port, fsync off (speed; nothing here must survive a power cut).

    .url (postgresql://postgres@127.0.0.1:PORT/esmd), .port, .dsn(db), .sql(query, db),
    .create_db(name), .stop(), .start(). Runs as the `postgres` user when we are root."""

    def __init__(self, dbname="esmd"):
        self.bindir = pg_bindir()
        self.dbname = dbname
        self.port = free_port()
        self.tmp = tempfile.mkdtemp(prefix="esmd-pg-")
        self.data = os.path.join(self.tmp, "data")
        self.logfile = os.path.join(self.tmp, "postgres.log")
        self.proc = None
        self._user = None
        if os.geteuid() == 0:
            pw = pwd.getpwnam("postgres")
            self._user = (pw.pw_uid, pw.pw_gid)
            os.chown(self.tmp, *self._user)
        self._run([os.path.join(self.bindir, "initdb"), "-D", self.data, "-U", "postgres",
                   "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync"])
        self.start()
        self.create_db(dbname)

    @property
    def url(self):
        return self.dsn(self.dbname)

    def dsn(self, db=None):
        return "postgresql://postgres@127.0.0.1:%d/%s" % (self.port, db or self.dbname)

    def _popen_kw(self):
        kw = {}
        if self._user:
            kw.update(user=self._user[0], group=self._user[1], extra_groups=[])
        return kw

    def _run(self, argv, **kw):
        r = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=self.tmp,
                           **self._popen_kw(), **kw)
        if r.returncode != 0:
            raise RuntimeError("%s failed (%d):\n%s" % (argv[0], r.returncode,
                                                       r.stdout.decode(errors="replace")))
        return r.stdout.decode()

    def start(self):
        if self.proc and self.proc.poll() is None:
            return
        log = open(self.logfile, "ab")
        self.proc = subprocess.Popen(
            [os.path.join(self.bindir, "postgres"), "-D", self.data, "-p", str(self.port),
             "-k", self.tmp, "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
             "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
             "-c", "max_connections=200", "-c", "shared_buffers=32MB"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=self.tmp,
            start_new_session=True, **self._popen_kw())
        log.close()

        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError("postgres exited (%s):\n%s" % (self.proc.returncode,
                                                                  tail(self.logfile)))
            r = subprocess.run([os.path.join(self.bindir, "pg_isready"), "-q", "-h", "127.0.0.1",
                                "-p", str(self.port), "-U", "postgres"])
            return r.returncode == 0

        wait_for(ready, 30, 0.1, "postgres to accept connections")

    def stop(self):
        """Fast shutdown (SIGINT); the data directory stays for start()."""
        _stop_process(self.proc, signal.SIGINT, 30)

    def sql(self, query, db=None):
        """Runs query with psql; returns the rows as lists of strings (unaligned, tab-separated)."""
        out = self._run([os.path.join(self.bindir, "psql"), "-X", "-q", "-At", "-F", "\t",
                         "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", str(self.port),
                         "-U", "postgres", "-d", db or self.dbname, "-c", query])
        return [line.split("\t") for line in out.splitlines() if line]

    def create_db(self, name):
        self.sql('CREATE DATABASE "%s"' % name, db="postgres")
        return self.dsn(name)

    def close(self):
        self.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Redis


class Redis:
    """redis-server on 127.0.0.1:port. .url, .port, .command(*args) (tiny RESP),
    .stop(sig) / .start() / .restart() on the same port. Without persistence by default; with
    persistent=True the data survives a stop (an append-only file fsynced at every write)."""

    def __init__(self, persistent=False):
        self.exe = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not os.path.exists(self.exe):
            raise RuntimeError("redis-server not found: install `redis-server` "
                               "(scripts/install-deps)")
        self.persistent = persistent
        self.port = free_port()
        self.tmp = tempfile.mkdtemp(prefix="esmd-redis-")
        self.logfile = os.path.join(self.tmp, "redis.log")
        self.proc = None
        self.start()

    def start(self):
        if self.proc and self.proc.poll() is None:
            return
        persist = ["--appendonly", "yes", "--appendfsync", "always"] if self.persistent else \
            ["--appendonly", "no"]
        log = open(self.logfile, "ab")
        self.proc = subprocess.Popen(
            [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", ""] + persist +
            ["--dir", self.tmp, "--daemonize", "no"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
        log.close()

        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError("redis-server exited:\n" + tail(self.logfile))
            try:
                return self.command("PING") == "PONG"
            except (OSError, RuntimeError):  # not listening yet, or -LOADING
                return False

        wait_for(ready, 20, 0.05, "redis to answer PING")

    def stop(self, sig=signal.SIGTERM):
        """SIGTERM: a clean shutdown; SIGKILL: a crash. The port stays ours for start()."""
        _stop_process(self.proc, sig, 10)

    def restart(self, sig=signal.SIGTERM):
        self.stop(sig)
        self.start()

    @property
    def url(self):
        return "redis://127.0.0.1:%d/0" % self.port

    def command(self, *args):
        """Sends one command, returns the decoded reply (simple types and flat arrays)."""
        out = b"*%d\r\n" % len(args)
        for a in args:
            a = a if isinstance(a, bytes) else str(a).encode()
            out += b"$%d\r\n%s\r\n" % (len(a), a)
        with socket.create_connection(("127.0.0.1", self.port), timeout=5) as s:
            s.sendall(out)
            f = s.makefile("rb")
            return self._read(f)

    def _read(self, f):
        line = f.readline().rstrip(b"\r\n")
        t, rest = line[:1], line[1:]
        if t == b"+":
            return rest.decode()
        if t == b"-":
            raise RuntimeError(rest.decode())
        if t == b":":
            return int(rest)
        if t == b"$":
            n = int(rest)
            if n < 0:
                return None
            data = f.read(n + 2)[:-2]
            return data.decode(errors="replace")
        if t == b"*":
            n = int(rest)
            return None if n < 0 else [self._read(f) for _ in range(n)]
        raise RuntimeError("bad RESP reply %r" % line)

    def close(self):
        _stop_process(self.proc, signal.SIGTERM, 10)
        shutil.rmtree(self.tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# Kafka (librdkafka's mock cluster through build/kafkatool)


class _KafkaClient:
    """What KafkaMock and KafkaBroker share: kafkatool's client commands against .bootstrap,
    with .client_properties (librdkafka properties, e.g. SASL) given to each as -X KEY=VALUE."""

    client_properties = {}

    def _xargs(self):
        out = []
        for k, v in self.client_properties.items():
            out += ["-X", "%s=%s" % (k, v)]
        return out

    def _tool(self, args, stdin=None, timeout=120):
        r = subprocess.run([self.tool] + args + self._xargs(), input=stdin, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, timeout=timeout)
        if r.returncode != 0:
            raise RuntimeError("kafkatool %s failed (%d): %s" % (
                " ".join(args[:1]), r.returncode, r.stderr.decode(errors="replace")[-2000:]))
        return r.stdout.decode()

    def produce(self, topic, records=None, count=None, size=None, partitions=None, keyed=False,
                extra_args=(), timeout=120):
        """Produces either `records` (dicts with partition/key/value/value_b64/headers/timestamp,
        sent as JSON lines) or `count` generated records. Returns how many were produced."""
        args = ["produce", "-b", self.bootstrap, "-t", topic] + list(extra_args)
        stdin = None
        if records is not None:
            stdin = "".join(json.dumps(r) + "\n" for r in records).encode()
        else:
            args += ["--count", str(count)]
            if size is not None:
                args += ["--size", str(size)]
            if partitions is not None:
                args += ["--partitions", str(partitions)]
            if keyed:
                args.append("--keyed")
            stdin = b""
        out = self._tool(args, stdin, timeout)
        n = None
        for line in out.splitlines():
            if line.startswith("produced "):
                n = int(line.split()[1])
        expected = len(records) if records is not None else count
        if n != expected:
            raise RuntimeError("kafkatool produce: expected 'produced %d', got %r" %
                               (expected, out[-500:]))
        return n

    def committed(self, group, topic):
        out = self._tool(["committed", "-b", self.bootstrap, "-g", group, "-t", topic], timeout=60)
        return {int(k): int(v) for k, v in json.loads(out).items()}

    def watermarks(self, topic):
        """{partition: high watermark}; accepts the tool's forms {"0":high}, {"0":[low,high]}
        and {"0":{"low":..,"high":..}}."""
        out = self._tool(["watermarks", "-b", self.bootstrap, "-t", topic], timeout=60)
        res = {}
        for k, v in json.loads(out).items():
            if isinstance(v, list):
                v = v[-1]
            elif isinstance(v, dict):
                v = v["high"]
            res[int(k)] = int(v)
        return res


class KafkaMock(_KafkaClient):
    """`kafkatool mock` running in the background.

    .bootstrap             "127.0.0.1:PORT,..." (the line the mock prints first)
    .create_topic(n, p)    creates topic n with p partitions (stdin command `create`)
    .command(line)         any stdin command; returns the mock's one-line answer
    .produce(topic, records=None, count=N, size=B, partitions=P, keyed=True, timeout=...)
    .committed(group, topic) -> {partition: offset}   (-1 = nothing committed)
    .watermarks(topic)       -> {partition: high watermark}
    .kind                    "mock" (KafkaBroker's is "broker")
    """

    kind = "mock"

    def __init__(self, topics=(), brokers=None):
        self.tool = binary("kafkatool")
        if not os.path.exists(self.tool):
            raise RuntimeError("%s not built" % self.tool)
        argv = [self.tool, "mock"]
        if brokers:
            argv += ["--brokers", str(brokers)]
        for name, parts in topics:
            argv += ["--topic", "%s:%d" % (name, parts)]
        self.tmp = tempfile.mkdtemp(prefix="esmd-kafka-")
        self.logfile = os.path.join(self.tmp, "mock.log")
        self._err = open(self.logfile, "ab")
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._err, start_new_session=True)
        self._lock = threading.Lock()
        self.bootstrap = self._readline(30).strip()
        if not self.bootstrap:
            raise RuntimeError("kafkatool mock printed no bootstrap servers:\n" +
                               tail(self.logfile))

    def _readline(self, timeout):
        box = []
        t = threading.Thread(target=lambda: box.append(self.proc.stdout.readline()), daemon=True)
        t.start()
        t.join(timeout)
        if not box:
            raise TimeoutError("kafkatool mock did not answer within %ss:\n%s" %
                               (timeout, tail(self.logfile)))
        line = box[0].decode(errors="replace")
        if not line and self.proc.poll() is not None:
            raise RuntimeError("kafkatool mock exited (%s):\n%s" % (self.proc.returncode,
                                                                    tail(self.logfile)))
        return line

    def command(self, line, timeout=30):
        with self._lock:
            self.proc.stdin.write((line.rstrip("\n") + "\n").encode())
            self.proc.stdin.flush()
            return self._readline(timeout).strip()

    def create_topic(self, name, parts, config=None):
        """config (topic configs such as max.message.bytes) is for KafkaBroker: the mock keeps
        no topic configuration and enforces no record size limit, so it is ignored here."""
        ans = self.command("create %s %d" % (name, parts))
        if ans != "ok":
            raise RuntimeError("create %s %d: %s" % (name, parts, ans))
        return name

    def close(self):
        if self.proc.poll() is None:
            try:
                self.proc.stdin.close()  # EOF asks the mock to exit
            except OSError:
                pass
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                _stop_process(self.proc, signal.SIGTERM, 10)
        self._err.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


class KafkaBroker(_KafkaClient):
    """A real single-node Apache Kafka (KRaft) from scripts/kafka-broker, with KafkaMock's
    interface (.bootstrap, .create_topic, .produce, .committed, .watermarks, .close) and:

    .kind                  "broker"
    .dir                   the broker's directory (server.properties, server.log, data/)
    .plaintext_bootstrap   the PLAINTEXT listener (= .bootstrap unless sasl is given)
    .client_properties     librdkafka properties a client needs ({} or the SASL/PLAIN ones)
    .add_partitions(topic, total)
    .kill()                SIGKILL, as a crash; .start() brings it back on the same port with
                           the same data; .stop() is a graceful stop
    .consumer_groups(*args) -> str   stdout of Kafka's ConsumerGroupCommand on the plaintext
                           listener, e.g. consumer_groups("--describe", "--group", g)
    .logfile               the broker's server.log

    KafkaBroker(sasl="user:password") makes .bootstrap a SASL_PLAINTEXT listener (PLAIN) with
    that one user. The data lives in a temporary directory removed by close(). The mock's fault
    injection (.command) does not exist here: it raises."""

    kind = "broker"

    def __init__(self, sasl=None):
        self.script = os.path.join(ROOT, "scripts", "kafka-broker")
        self.tool = binary("kafkatool")
        if not os.path.exists(self.tool):
            raise RuntimeError("%s not built" % self.tool)
        self.client_properties = {}
        args = []
        if sasl is not None:
            user, sep, password = sasl.partition(":")
            if not user or not sep:
                raise ValueError("KafkaBroker(sasl=%r): expected 'user:password'" % (sasl,))
            self.client_properties = {"security.protocol": "SASL_PLAINTEXT",
                                      "sasl.mechanism": "PLAIN",
                                      "sasl.username": user, "sasl.password": password}
            args = ["--sasl-plain", sasl]
        self.sasl = sasl
        self.tmp = tempfile.mkdtemp(prefix="esmd-kafka-broker-")
        self.dir = os.path.join(self.tmp, "broker")
        self.logfile = os.path.join(self.dir, "server.log")
        try:
            self.bootstrap = self._start(args)
            with open(os.path.join(self.dir, "plaintext.address")) as f:
                self.plaintext_bootstrap = f.read().strip()
        except BaseException:
            self.close()
            raise

    def _script(self, args, timeout=180):
        try:
            r = subprocess.run([self.script] + list(args), stdin=subprocess.DEVNULL,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError("scripts/kafka-broker %s: no answer within %ss; broker log:\n%s" %
                               (" ".join(args[:1]), timeout, tail(self.logfile)))
        if r.returncode != 0:
            raise RuntimeError("scripts/kafka-broker %s failed (%d):\n%s" % (
                " ".join(args[:1]), r.returncode, r.stderr.decode(errors="replace")[-3000:]))
        return r.stdout.decode(errors="replace")

    def _start(self, extra=()):
        lines = self._script(["start", self.dir] + list(extra)).split()
        if not lines or ":" not in lines[-1]:
            raise RuntimeError("scripts/kafka-broker start printed no address")
        return lines[-1]

    def start(self):
        """(Re)starts the broker after kill() or stop(): same port, same data."""
        addr = self._start()
        if addr != self.bootstrap:
            raise RuntimeError("the broker came back on %s, not %s" % (addr, self.bootstrap))

    def stop(self):
        self._script(["stop", self.dir], timeout=90)

    def kill(self):
        self._script(["kill", self.dir], timeout=30)

    def running(self):
        try:
            with open(os.path.join(self.dir, "broker.pid")) as f:
                os.kill(int(f.read().strip()), 0)
            return True
        except (OSError, ValueError):
            return False

    def command(self, line, timeout=30):
        raise NotImplementedError(
            "KafkaBroker has no fault injection (%r is a `kafkatool mock` command): mark the "
            "test @pytest.mark.mock_only(reason) or use .kill()/.stop()/.start()" % line)

    def create_topic(self, name, parts, config=None):
        """Creates topic name with parts partitions (replication 1) and the topic configs in
        config (e.g. {"max.message.bytes": "10000000"}); returns name once the metadata shows
        every partition with a leader."""
        args = ["create-topic", "-b", self.bootstrap, "-t", name, "--partitions", str(parts)]
        for k, v in (config or {}).items():
            args += ["--config", "%s=%s" % (k, v)]
        self._tool(args, timeout=120)
        return name

    def produce(self, topic, records=None, count=None, **kw):
        """KafkaMock.produce, then a check that the topic's high watermarks grew by at least as
        many records as were acknowledged: a record acknowledged and not stored fails here, at
        once and by name, instead of as a delivery that never comes."""
        before = self.watermarks(topic)
        n = super().produce(topic, records, count, **kw)
        after = self.watermarks(topic)
        grown = sum(after.values()) - sum(before.get(p, 0) for p in after)
        if grown < n:  # more is another producer writing meanwhile
            raise RuntimeError("produced %d records to %s, acknowledged, but its high "
                               "watermarks grew by %d (%s -> %s)" % (n, topic, grown, before,
                                                                     after))
        return n

    def add_partitions(self, topic, total):
        self._tool(["add-partitions", "-b", self.bootstrap, "-t", topic,
                    "--partitions", str(total)], timeout=120)

    def consumer_groups(self, *args):
        return self._script(["consumer-groups", "--bootstrap-server", self.plaintext_bootstrap] +
                            list(args), timeout=120)

    def close(self):
        """The data goes away with the directory: no need for a graceful stop."""
        if os.path.exists(os.path.join(self.dir, "broker.pid")):
            try:
                self.kill()
            except RuntimeError:
                pass
        shutil.rmtree(self.tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# A real schema registry: Apicurio Registry (docs/testing.md, "A real schema registry")


class ApicurioRegistry:
    """Apicurio Registry (built by scripts/apicurio-registry) on 127.0.0.1:port, with schemas
    in an H2 database file, so that .stop() / .start() bring it back on the same port with the
    same schemas.

    .url          its Confluent-compatible API, http://127.0.0.1:PORT/apis/ccompat/v7 (what a
                  serializer's `url` and esmd's schema_registry.url take)
    .stop()       SIGTERM (clients then get "connection refused"); .start() again; .running()
    .mark()       a position in its access log; .fetches(schema_id, since=mark) counts the
                  GET {url}/schemas/ids/{id} requests after it (as the stand-in's .fetches)
    .schema_type(id)  "AVRO" | "JSON" | "PROTOBUF", asked with a query string that .fetches
                  does not count
    .register(subject, schema, schema_type, references) -> id, over the API
    .logfile      the registry's output, access log included"""

    API = "/apis/ccompat/v7"
    # One access-log line a request; the request line is what .fetches() reads.
    ACCESS = re.compile(r"esmd-access \"(\w+) (\S+) HTTP/[0-9.]+\" (\d+)")

    def __init__(self):
        self.script = os.path.join(ROOT, "scripts", "apicurio-registry")
        r = subprocess.run([self.script, "jar"], stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=1200)
        if r.returncode != 0:
            raise RuntimeError("scripts/apicurio-registry jar failed (%d):\n%s" % (
                r.returncode, r.stderr.decode(errors="replace")[-3000:]))
        self.jar = r.stdout.decode().strip().splitlines()[-1]
        self.port = free_port()
        self.tmp = tempfile.mkdtemp(prefix="esmd-apicurio-")
        self.logfile = os.path.join(self.tmp, "registry.log")
        self.proc = None
        try:
            self.start()
        except BaseException:
            self.close()
            raise

    @property
    def base(self):
        return "http://127.0.0.1:%d" % self.port

    @property
    def url(self):
        return self.base + self.API

    def start(self, timeout=120):
        if self.running():
            return
        log = open(self.logfile, "ab")
        self.proc = subprocess.Popen(
            ["java", "-Xms64m", "-Xmx384m", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1",
             "-Dquarkus.http.host=127.0.0.1", "-Dquarkus.http.port=%d" % self.port,
             "-Dquarkus.datasource.jdbc.url=jdbc:h2:file:%s/db" % self.tmp,
             "-Dquarkus.datasource.jdbc.min-size=1", "-Dquarkus.datasource.jdbc.initial-size=1",
             "-Dquarkus.http.access-log.enabled=true",
             "-Dquarkus.http.access-log.pattern=esmd-access \"%r\" %s",
             "-Dquarkus.log.level=WARN", "-Dquarkus.log.category.\"io.quarkus.http.access-log\""
             ".level=INFO", "-jar", self.jar],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=self.tmp,
            start_new_session=True)
        log.close()

        def ready():
            if self.proc.poll() is not None:
                raise RuntimeError("Apicurio Registry exited (%s):\n%s" % (
                    self.proc.returncode, tail(self.logfile)))
            return http_get(self.url + "/schemas/types", 2.0)[0] == 200
        wait_for(ready, timeout, 0.2, "Apicurio Registry on %s" % self.url)

    def stop(self):
        _stop_process(self.proc, signal.SIGTERM, 30)

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def _requests(self):
        try:
            with open(self.logfile, errors="replace") as f:
                return [m.groups() for m in map(self.ACCESS.search, f) if m]
        except OSError:
            return []

    def mark(self):
        return len(self._requests())

    def fetches(self, schema_id, since=0):
        path = "%s/schemas/ids/%d" % (self.API, schema_id)
        return sum(1 for method, p, _ in self._requests()[since:] if method == "GET" and p == path)

    def schema_type(self, schema_id):
        status, body = http_get("%s/schemas/ids/%d?esmd-test=type" % (self.url, schema_id))
        if status != 200:
            raise RuntimeError("schema %d: %d %s" % (schema_id, status, body[:300]))
        return json.loads(body).get("schemaType") or "AVRO"

    def register(self, subject, schema, schema_type="AVRO", references=None):
        """Registers over the API (what a producer's serializer does) -> the id."""
        body = json.dumps({"schema": schema, "schemaType": schema_type,
                           "references": references or []}).encode()
        req = urllib.request.Request("%s/subjects/%s/versions" % (self.url, subject), data=body,
                                     headers={"Content-Type":
                                              "application/vnd.schemaregistry.v1+json"})
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return json.loads(r.read())["id"]
        except urllib.error.HTTPError as e:
            raise RuntimeError("registering under %s: %d %s" % (subject, e.code,
                                                               e.read()[:300])) from None

    def close(self):
        self.stop()
        shutil.rmtree(self.tmp, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# esmd


def http_get(url, timeout=5.0):
    """(status, body text); status 0 when the connection fails."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except (urllib.error.URLError, OSError):
        return 0, ""


def parse_metrics(text):
    """Prometheus text -> list of (name, {label: value}, float)."""
    out = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        labels = {}
        if "{" in line:
            name, rest = line.split("{", 1)
            body, _, value = rest.rpartition("}")
            i = 0
            while i < len(body):
                eq = body.index("=", i)
                key = body[i:eq].strip().lstrip(",").strip()
                j = eq + 2  # past ="
                val = []
                while body[j] != '"':
                    if body[j] == "\\":
                        j += 1
                        val.append({"n": "\n"}.get(body[j], body[j]))
                    else:
                        val.append(body[j])
                    j += 1
                labels[key] = "".join(val)
                i = j + 1
                while i < len(body) and body[i] in ", ":
                    i += 1
            value = value.split()[0]
        else:
            name, value = line.split()[:2]
        out.append((name.strip(), labels, float(value)))
    return out


class Metrics(list):
    """Parsed /metrics: a list of (name, labels, value) with a summing lookup."""

    def get(self, name, **labels):
        """Sum of the series of `name` whose labels include `labels` (0.0 if none)."""
        return sum(v for n, ls, v in self
                   if n == name and all(ls.get(k) == str(x) for k, x in labels.items()))

    def names(self):
        return sorted({n for n, _, _ in self})


class Esmd:
    """One `esmd run -c CONFIG` process. The config file is written by the caller.

    .admin ("http://127.0.0.1:PORT"), .start(wait=True), .stop(sig, timeout) -> exit code,
    .kill9(), .restart(), .metrics(), .get(path), .log() (captured stderr), .log_lines() (JSON)
    """

    def __init__(self, config_path, admin_port, env=None, argv_extra=(), logfile=None):
        self.config_path = config_path
        self.admin = "http://127.0.0.1:%d" % admin_port
        self.env = dict(os.environ, **(env or {}))
        self.argv = [binary("esmd"), "run", "-c", config_path] + list(argv_extra)
        self.logfile = logfile or os.path.splitext(config_path)[0] + ".stderr"
        self.proc = None
        self.runs = 0

    def start(self, wait=True, timeout=30):
        if not os.path.exists(self.argv[0]):
            raise RuntimeError("%s not built" % self.argv[0])
        self.runs += 1
        log = open(self.logfile, "ab")
        log.write(b"---- start %d ----\n" % self.runs)
        log.flush()
        self.proc = subprocess.Popen(self.argv, stdin=subprocess.DEVNULL, stdout=log,
                                     stderr=log, env=self.env, start_new_session=True)
        log.close()
        if wait:
            self.wait_healthy(timeout)
        return self

    def wait_healthy(self, timeout=30):
        def healthy():
            if self.proc.poll() is not None:
                raise RuntimeError("esmd exited with %s before /healthz answered; stderr:\n%s" %
                                   (self.proc.returncode, tail(self.logfile)))
            return self.get("/healthz")[0] == 200
        wait_for(healthy, timeout, 0.05, "esmd /healthz")

    def get(self, path, timeout=5.0):
        return http_get(self.admin + path, timeout)

    def metrics(self):
        status, body = self.get("/metrics")
        if status != 200:
            raise RuntimeError("/metrics answered %d: %s" % (status, body[:500]))
        return Metrics(parse_metrics(body))

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def stop(self, sig=signal.SIGTERM, timeout=30):
        """Sends sig and waits up to timeout seconds; returns the exit code (negative for a
        signal). Raises TimeoutError (after SIGKILL) if it did not exit in time."""
        if self.proc is None:
            return None
        if self.proc.poll() is not None:
            return self.proc.returncode
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise TimeoutError("esmd did not exit within %ss after signal %d; stderr:\n%s" %
                               (timeout, sig, tail(self.logfile)))

    def kill9(self):
        if self.running():
            self.proc.kill()
            self.proc.wait()
        return self.proc.returncode

    def restart(self, wait=True):
        code = self.stop()
        self.start(wait=wait)
        return code

    def log(self):
        try:
            with open(self.logfile, "rb") as f:
                return f.read().decode("utf-8", "replace")
        except OSError:
            return ""

    def log_lines(self):
        """The JSON objects among the captured stderr lines."""
        out = []
        for line in self.log().splitlines():
            line = line.strip()
            if line.startswith("{"):
                try:
                    out.append(json.loads(line))
                except ValueError:
                    pass
        return out

    def close(self):
        if self.running():
            try:
                self.stop(timeout=15)
            except TimeoutError:
                pass


def produce_with_librdkafka(bootstrap, topic, records, properties=None, timeout=60):
    """Produces [(partition, key bytes|None, value bytes|None)] through librdkafka itself (ctypes),
    for what kafkatool's fixed producer settings cannot send, such as a record over librdkafka's
    default message.max.bytes. Raises RuntimeError when a record is not delivered."""
    import ctypes
    import ctypes.util

    lib = ctypes.CDLL(ctypes.util.find_library("rdkafka") or "librdkafka.so.1")
    vp, cp, sz = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t
    lib.rd_kafka_conf_new.restype = vp
    lib.rd_kafka_conf_set.argtypes = [vp, cp, cp, cp, sz]
    lib.rd_kafka_new.restype = vp
    lib.rd_kafka_new.argtypes = [ctypes.c_int, vp, cp, sz]
    lib.rd_kafka_topic_new.restype = vp
    lib.rd_kafka_topic_new.argtypes = [vp, cp, vp]
    lib.rd_kafka_produce.argtypes = [vp, ctypes.c_int32, ctypes.c_int, cp, sz, cp, sz, vp]
    lib.rd_kafka_flush.argtypes = [vp, ctypes.c_int]
    lib.rd_kafka_outq_len.argtypes = [vp]
    lib.rd_kafka_topic_destroy.argtypes = [vp]
    lib.rd_kafka_destroy.argtypes = [vp]
    lib.rd_kafka_last_error.restype = ctypes.c_int
    lib.rd_kafka_err2str.restype = cp
    lib.rd_kafka_err2str.argtypes = [ctypes.c_int]

    err = ctypes.create_string_buffer(512)
    conf = lib.rd_kafka_conf_new()
    props = {"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": "0"}
    props.update(properties or {})
    for k, v in props.items():
        if lib.rd_kafka_conf_set(conf, k.encode(), str(v).encode(), err, 512) != 0:
            raise RuntimeError("%s=%s: %s" % (k, v, err.value.decode()))
    # Delivery reports: a record the broker refuses (MSG_SIZE_TOO_LARGE, ...) leaves the queue
    # too, so an empty queue alone does not mean delivered. rd_kafka_message_t starts with its
    # rd_kafka_resp_err_t err.
    failures = []
    dr_type = ctypes.CFUNCTYPE(None, vp, ctypes.POINTER(ctypes.c_int), vp)

    def on_delivery(_rk, rkmessage, _opaque):
        if rkmessage[0] != 0:
            failures.append(lib.rd_kafka_err2str(rkmessage[0]).decode())

    dr_cb = dr_type(on_delivery)
    lib.rd_kafka_conf_set_dr_msg_cb.argtypes = [vp, dr_type]
    lib.rd_kafka_conf_set_dr_msg_cb(conf, dr_cb)
    rk = lib.rd_kafka_new(0, conf, err, 512)  # RD_KAFKA_PRODUCER
    if not rk:
        raise RuntimeError("rd_kafka_new: " + err.value.decode())
    rkt = lib.rd_kafka_topic_new(rk, topic.encode(), None)
    try:
        for partition, key, value in records:
            if lib.rd_kafka_produce(rkt, partition, 2, value, len(value or b""), key,
                                    len(key or b""), None) != 0:  # RD_KAFKA_MSG_F_COPY
                raise RuntimeError("produce: " + lib.rd_kafka_err2str(
                    lib.rd_kafka_last_error()).decode())
        lib.rd_kafka_flush(rk, int(timeout * 1000))
        if lib.rd_kafka_outq_len(rk) != 0:
            raise RuntimeError("records not delivered within %ss" % timeout)
        if failures:
            raise RuntimeError("%d of %d records not delivered: %s" % (
                len(failures), len(records), "; ".join(sorted(set(failures)))))
    finally:
        lib.rd_kafka_topic_destroy(rkt)
        lib.rd_kafka_destroy(rk)


def assert_error(resp, status, etype, contains=None):
    """resp = (status, headers, parsed body): Lambda's error shape with that status and type."""
    st, hdrs, body = resp
    assert st == status, (st, body)
    assert hdrs.get("x-amzn-ErrorType") == etype, (dict(hdrs), body)
    assert body["Type"] == "User", body
    if contains:
        assert contains in body["Message"], body
