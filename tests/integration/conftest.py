"""Fixtures for the integration tests: real servers on loopback (servers.py) and a recording
function endpoint (endpoint.py). The binaries under test come from $ESMD_BUILD (default build/).

    postgres   session: servers.Postgres (.url, .dsn(db), .sql(q, db), .create_db(n), .stop/.start)
    redis      session: servers.Redis (.url, .command(...))
    kafka      session: servers.KafkaMock (.bootstrap, .create_topic, .produce, .committed, ...)
    endpoint   per test: endpoint.Endpoint (answers 200 {} unless told otherwise)
    names      per test: unique topic / group / mapping names (names.topic(), names.group(), ...)
    kafka_config  per test: builds a one-mapping Kafka config dict for the fixtures above
    esmd       per test: factory esmd(config, start=True) -> servers.Esmd; config is a dict
               (written as YAML) or YAML text; admin.listen is set to a free port and, in text,
               {postgres} {bootstrap} {endpoint} {admin} are filled in. Every esmd started is
               stopped at teardown; on failure the tail of its stderr is printed.
"""

import hashlib
import os
import re
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
def kafka():
    k = servers.KafkaMock()
    yield k
    k.close()


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
    function_extra (dict merged into the function)."""

    def make(topic, batch_size=100, window="100ms", timeout="10s", max_concurrency=10,
             group=None, mapping=None, starting_position="trim_horizon", url=None,
             mapping_extra=None, function_extra=None):
        fn = {"url": url or endpoint.url, "timeout": timeout, "max_concurrency": max_concurrency}
        fn.update(function_extra or {})
        m = {
            "name": mapping or names.mapping(),
            "function": "fn",
            "source": {"kafka": "mock", "topics": [topic],
                       "consumer_group": group or names.group(),
                       "starting_position": starting_position},
            "batch_size": batch_size,
            "maximum_batching_window": window,
        }
        m.update(mapping_extra or {})
        return {
            "postgres": postgres.url,
            "admin": {"listen": "127.0.0.1:0"},
            "connections": {"mock": {"type": "kafka", "bootstrap_servers": kafka.bootstrap,
                                     "properties": MOCK_CONSUMER_PROPERTIES}},
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
