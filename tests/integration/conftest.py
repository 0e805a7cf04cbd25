"""Fixtures for the integration tests: real servers on loopback (servers.py) and a recording
function endpoint (endpoint.py). The binaries under test come from $ESMD_BUILD (default build/).

    postgres   session: servers.Postgres (.url, .dsn(db), .sql(q, db), .create_db(n), .stop/.start)
    redis      session: servers.Redis (.url, .command(...))
    kafka_mock    session: servers.KafkaMock (.bootstrap, .create_topic, .produce, .committed, ...)
    kafka_broker  session: servers.KafkaBroker, a real Apache Kafka (same interface, plus .kill,
               .start, .stop, .add_partitions, .consumer_groups); started on first use
    kafka      per test: one of the two. In the modules of BOTH_KAFKAS every test that takes
               `kafka` runs twice, as [mock] and [broker] (pytest_generate_tests below); a test
               marked @pytest.mark.mock_only(reason) (it needs the mock's fault injection,
               kafka.command) runs as [mock] only. Every other module gets the mock alone
               (not parametrized, ids unchanged).
    endpoint   per test: endpoint.Endpoint (answers 200 {} unless told otherwise)
    names      per test: unique topic / group / mapping names (names.topic(), names.group(), ...)
    kafka_config  per test: builds a one-mapping Kafka config dict for the fixtures above
               (MOCK_CONSUMER_PROPERTIES on the mock only)
    pgq_schema session: esmd's migrations applied to `postgres` (esmd.send, esmd.queue_messages,
               ... for Postgres-queue tests before any esmd runs)
    esmd       per test: factory esmd(config, start=True) -> servers.Esmd; config is a dict
               (written as YAML) or YAML text; admin.listen is set to a free port and, in text,
               {postgres} {bootstrap} {endpoint} {admin} are filled in. Every esmd started is
               stopped at teardown; on failure the tail of its stderr is printed.
"""

import hashlib
import os
import re
import subprocess
import sys

import pytest
import yaml

sys.path.insert(0, os.path.dirname(__file__))

import servers  # noqa: E402
from endpoint import Endpoint  # noqa: E402


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


def _failed(request):
    rep = getattr(request.node, "rep_call", None)
    return rep is None or rep.failed


@pytest.fixture(scope="session")
def postgres():
    pg = servers.Postgres()
    yield pg
    pg.close()


@pytest.fixture(scope="session")
def redis():
    r = servers.Redis()
    yield r
    r.close()


@pytest.fixture(scope="session")
def kafka_mock():
    k = servers.KafkaMock()
    yield k
    k.close()


@pytest.fixture(scope="session")
def kafka_broker():
    """One real broker for the whole session (it takes seconds to start); tests use their own
    topics and groups on it, as on the mock."""
    k = servers.KafkaBroker()
    yield k
    k.close()


@pytest.fixture
def own_broker(request):
    """own_broker(sasl=None): a broker of the test's own (for kills, restarts, SASL), closed at
    the end of the test (request it before `esmd`, so that esmd is stopped first)."""
    made = []

    def make(sasl=None):
        b = servers.KafkaBroker(sasl=sasl)
        made.append(b)
        return b

    yield make
    failed = getattr(request.node, "rep_call", None) is None or request.node.rep_call.failed
    for b in made:
        if failed:
            print("\n==== broker server.log (%s), last lines ====\n%s" % (
                b.dir, servers.tail(b.logfile, 40)))
        b.close()


# The modules whose Kafka tests run against both the mock and the real broker (docs/testing.md,
# "Kafka: mock and real broker").
BOTH_KAFKAS = {"test_kafka_e2e", "test_failure_handling", "test_destinations"}
KAFKA_KINDS = ("mock", "broker")


def pytest_generate_tests(metafunc):
    if "kafka" not in metafunc.fixturenames:
        return
    module = metafunc.module.__name__.rpartition(".")[2]
    mark = metafunc.definition.get_closest_marker("mock_only")
    if mark is not None and not (mark.args or mark.kwargs.get("reason")):
        raise pytest.UsageError("%s: @pytest.mark.mock_only needs a reason (what of the mock's "
                                "fault injection the test uses)" % metafunc.definition.nodeid)
    if module not in BOTH_KAFKAS:
        return
    kinds = ["mock"] if mark is not None else list(KAFKA_KINDS)
    metafunc.parametrize("kafka", kinds, indirect=True, ids=kinds)


@pytest.fixture
def kafka(request):
    """The Kafka of this test: request.param ("mock" or "broker") where pytest_generate_tests
    parametrized it, else the mock."""
    kind = getattr(request, "param", "mock")
    if kind not in KAFKA_KINDS:
        raise ValueError("kafka fixture: unknown kind %r (expected one of %s)" % (kind,
                                                                                 KAFKA_KINDS))
    return request.getfixturevalue("kafka_" + kind)


@pytest.fixture
def endpoint():
    ep = Endpoint()
    yield ep
    ep.close()


class Names:
    def __init__(self, test_name):
        base = re.sub(r"[^a-z0-9]+", "-", test_name.lower()).strip("-")[:34]
        # parametrized names share their first characters: a digest keeps them apart
        digest = hashlib.sha1(test_name.encode()).hexdigest()[:6]
        self.base = "%s-%s-%d" % (base, digest, os.getpid() % 10000)
        self.n = 0

    def _next(self, kind):
        self.n += 1
        return "%s-%s%d" % (self.base, kind, self.n)

    def topic(self):
        return self._next("t")

    def group(self):
        return self._next("g")

    def mapping(self):
        return self._next("m").replace("-", "_")[-60:]


@pytest.fixture
def names(request):
    return Names(request.node.name)


# librdkafka 2.0's mock cluster does not act on LeaveGroup: a consumer that joins the group of
# one that has just closed waits for the old member's session to time out (45 s by default).
# The shortest session the mock accepts keeps restart tests at seconds instead of a minute.
MOCK_CONSUMER_PROPERTIES = {"session.timeout.ms": "6000", "heartbeat.interval.ms": "500"}


@pytest.fixture
def kafka_config(postgres, kafka, endpoint, names):
    """kafka_config(topic, **options) -> config dict with one Kafka mapping to the endpoint.

    options: batch_size, window (maximum_batching_window), timeout, max_concurrency, group,
    mapping (name), starting_position, url, mapping_extra (dict merged into the mapping),
    function_extra (dict merged into the function), properties (librdkafka properties merged
    into the connection's). The connection carries kafka.client_properties (SASL, when the
    broker has it) and, on the mock only, MOCK_CONSUMER_PROPERTIES."""

    def make(topic, batch_size=100, window="100ms", timeout="10s", max_concurrency=10,
             group=None, mapping=None, starting_position="trim_horizon", url=None,
             mapping_extra=None, function_extra=None, properties=None):
        fn = {"url": url or endpoint.url, "timeout": timeout, "max_concurrency": max_concurrency}
        fn.update(function_extra or {})
        m = {
            "name": mapping or names.mapping(),
            "function": "fn",
            "source": {"kafka": "kafka", "topics": [topic],
                       "consumer_group": group or names.group(),
                       "starting_position": starting_position},
            "batch_size": batch_size,
            "maximum_batching_window": window,
        }
        m.update(mapping_extra or {})
        props = dict(kafka.client_properties)
        if kafka.kind == "mock":
            props.update(MOCK_CONSUMER_PROPERTIES)
        props.update(properties or {})
        conn = {"type": "kafka", "bootstrap_servers": kafka.bootstrap}
        if props:
            conn["properties"] = props
        return {
            "postgres": postgres.url,
            "admin": {"listen": "127.0.0.1:0"},
            "connections": {"kafka": conn},
            "functions": {"fn": fn},
            "mappings": [m],
        }

    return make


@pytest.fixture
def esmd(request, tmp_path, postgres, endpoint):
    started = []

    def factory(config, start=True, env=None, wait=True, filename="esmd.yaml"):
        port = servers.free_port()
        listen = "127.0.0.1:%d" % port
        if isinstance(config, dict):
            config = dict(config)
            config["admin"] = dict(config.get("admin") or {}, listen=listen)
            config.setdefault("postgres", postgres.url)
            text = yaml.safe_dump(config, sort_keys=False)
        else:
            text = config
            for k, v in (("postgres", postgres.url), ("endpoint", endpoint.url),
                         ("admin", listen)):
                text = text.replace("{%s}" % k, v)
            if "kafka" in request.fixturenames:
                text = text.replace("{bootstrap}", request.getfixturevalue("kafka").bootstrap)
        path = tmp_path / ("%d-%s" % (len(started), filename))
        path.write_text(text)
        proc = servers.Esmd(str(path), port, env=env)
        started.append(proc)
        if start:
            proc.start(wait=wait)
        return proc

    yield factory

    for proc in started:
        proc.close()
    if _failed(request):
        for proc in started:
            print("\n==== esmd stderr (%s), last lines ====\n%s" % (proc.logfile,
                                                                  servers.tail(proc.logfile, 80)))
            print("==== config ====\n%s" % open(proc.config_path).read())


@pytest.fixture(scope="session")
def pgq_schema(postgres, tmp_path_factory):
    """esmd's migrations applied to the session database (esmd run does it too, at start)."""
    cfg = tmp_path_factory.mktemp("pgq") / "migrate.yaml"
    cfg.write_text("postgres: %s\nfunctions: { fn: { url: 'http://127.0.0.1:9/' } }\n"
                   "mappings: [{ name: m, function: fn, source: { pgqueue: q } }]\n"
                   % postgres.url)
    r = subprocess.run([servers.binary("esmd"), "migrate", "-c", str(cfg)],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return postgres
