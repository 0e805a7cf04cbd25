"""Reloading the configuration without a restart (docs/operations.md#reload): SIGHUP and
POST /admin/reload, under load, on the Redis stream and Postgres queue sources and Kafka (the
mock cluster and the real broker); a bad file refused; keys that need a restart; admin-API
overrides; function settings.

Under load a producer writes all the time while the file changes (batch size, filter, a mapping
added, a mapping removed, a source key that restarts a mapping); the endpoint always succeeds,
so every record must arrive exactly once: a record delivered twice is a record whose batch
finished delivered again, a record missing is a record lost."""

import json
import signal
import threading
import time
import urllib.error
import urllib.request

import pytest
import yaml

from endpoint import Endpoint, Response
from servers import wait_for

import servers


# ---- helpers --------------------------------------------------------------------------------


def post(proc, path, body=None, timeout=30):
    req = urllib.request.Request(proc.admin + path, data=json.dumps(body or {}).encode(),
                                 method="POST", headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read().decode())
    except urllib.error.HTTPError as e:
        text = e.read().decode()
        try:
            return e.code, json.loads(text)
        except ValueError:
            return e.code, text


def put(proc, path, body):
    req = urllib.request.Request(proc.admin + path, data=json.dumps(body).encode(), method="PUT",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return r.status, json.loads(r.read().decode())


def read_config(proc):
    with open(proc.config_path) as f:
        return yaml.safe_load(f)


def write_config(proc, cfg):
    with open(proc.config_path, "w") as f:
        f.write(yaml.safe_dump(cfg, sort_keys=False))


def reload(proc, how):
    """Reloads with SIGHUP or POST /admin/reload; returns the POST's answer (None for SIGHUP,
    after the log shows the reload)."""
    if how == "post":
        st, body = post(proc, "/admin/reload")
        assert st == 200, body
        assert body["reloaded"] is True
        return body
    before = proc.log().count("SIGHUP: reloaded")
    proc.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: proc.log().count("SIGHUP: reloaded") > before, 20, 0.05, "SIGHUP reload")
    return None


def mapping_info(proc, name):
    st, body = servers.http_get(proc.admin + "/admin/mappings/" + name)
    assert st == 200, body
    return json.loads(body)


# ---- sources --------------------------------------------------------------------------------


class Source:
    def produce_many(self, src, start, n, kind="keep"):
        for i in range(start, start + n):
            self.produce(src, i, kind)


class RedisSource(Source):
    kind = "redis"

    def __init__(self, redis, names):
        self.redis = redis
        self.names = names

    def connections(self):
        return {"r": {"type": "redis", "url": self.redis.url}}

    def new_source(self):
        return {"redis": "r", "stream": self.names.topic(), "group": "g"}

    def restart_change(self, src):
        src["visibility_timeout"] = "40s"

    def produce(self, src, i, kind="keep"):
        self.redis.command("XADD", src["stream"], "*", "type", kind, "i", str(i))

    def filter(self):
        return {"data": {"type": ["keep"]}}

    @staticmethod
    def ids(req):
        import base64
        out = []
        for rec in (req.json or {}).get("Records") or []:
            data = json.loads(base64.b64decode(rec["kinesis"]["data"]))
            out.append((data["type"], int(data["i"])))
        return out


class PgqueueSource(Source):
    kind = "pgqueue"

    def __init__(self, postgres, names):
        self.pg = postgres
        self.names = names

    def connections(self):
        return {}

    def new_source(self):
        return {"pgqueue": self.names.mapping() + "_q", "visibility_timeout": "30s"}

    def restart_change(self, src):
        src["visibility_timeout"] = "40s"

    def produce(self, src, i, kind="keep"):
        body = json.dumps({"type": kind, "i": i}).replace("'", "''")
        self.pg.sql("SELECT esmd.send('%s', '%s', '0', NULL)" % (src["pgqueue"], body))

    def filter(self):
        return {"body": {"type": ["keep"]}}

    @staticmethod
    def ids(req):
        out = []
        for rec in (req.json or {}).get("Records") or []:
            b = json.loads(rec["body"])
            out.append((b["type"], b["i"]))
        return out


class KafkaSource(Source):
    kind = "kafka"

    def __init__(self, kafka, names):
        self.kafka = kafka
        self.names = names

    def connections(self):
        props = dict(self.kafka.client_properties)
        props.update({"session.timeout.ms": "6000", "heartbeat.interval.ms": "500"})
        return {"k": {"type": "kafka", "bootstrap_servers": self.kafka.bootstrap,
                      "properties": props}}

    def new_source(self):
        t = self.names.topic()
        self.kafka.create_topic(t, 2)
        return {"kafka": "k", "topics": [t], "consumer_group": self.names.group()}

    def restart_change(self, src):
        src["consumer_group"] = src["consumer_group"]  # the group stays: the offsets go on
        src["starting_position"] = "latest"  # only for a new group: no effect on the records

    def produce(self, src, i, kind="keep"):
        self.produce_many(src, i, 1, kind)

    def produce_many(self, src, start, n, kind="keep"):
        self.kafka.produce(src["topics"][0], [{"value": json.dumps({"type": kind, "i": i})}
                                              for i in range(start, start + n)])

    def filter(self):
        return {"value": {"type": ["keep"]}}

    @staticmethod
    def ids(req):
        import base64
        out = []
        for _, rec in req.records():
            v = json.loads(base64.b64decode(rec["value"]))
            out.append((v["type"], v["i"]))
        return out


@pytest.fixture(params=["redis", "pgqueue", pytest.param("kafka-mock", marks=pytest.mark.kafka),
                        pytest.param("kafka-broker", marks=pytest.mark.kafka)])
def source(request, names, postgres):
    if request.param == "redis":
        return RedisSource(request.getfixturevalue("redis"), names)
    if request.param == "pgqueue":
        request.getfixturevalue("pgq_schema")
        return PgqueueSource(postgres, names)
    if request.param == "kafka-mock":
        return KafkaSource(request.getfixturevalue("kafka_mock"), names)
    return KafkaSource(request.getfixturevalue("kafka_broker"), names)


class Producer(threading.Thread):
    """Writes `keep` records to src, numbered from 0, until stopped."""

    def __init__(self, source, src):
        super().__init__(daemon=True)
        self.source, self.src = source, src
        self.n = 0
        self.halt = threading.Event()
        self.error = None

    def run(self):
        try:
            while not self.halt.is_set():
                self.source.produce_many(self.src, self.n, 5)
                self.n += 5
                time.sleep(0.02)
        except Exception as e:  # noqa: BLE001 (reported by the test)
            self.error = e

    def stop(self):
        self.halt.set()
        self.join(30)
        assert self.error is None, self.error
        return self.n


def delivered(endpoint, source, mapping_of=None):
    """{(type, i): times} over the successful requests."""
    out = {}
    for req in endpoint.ok_requests():
        for k in source.ids(req):
            out[k] = out.get(k, 0) + 1
    return out


def base_config(source, endpoint, names):
    return {
        "connections": source.connections(),
        "functions": {"fn": {"url": endpoint.url, "timeout": "10s", "max_concurrency": 4}},
        "mappings": [{"name": names.mapping(), "function": "fn", "source": source.new_source(),
                      "batch_size": 10, "maximum_batching_window": "50ms"}],
    }


# ---- under load -----------------------------------------------------------------------------


def test_reload_under_load(source, esmd, endpoint, names):
    """Batch size, filter, a mapping added and removed, a source change restarting the mapping:
    each reloaded by SIGHUP or POST /admin/reload while a producer writes; every record arrives
    exactly once."""
    cfg = base_config(source, endpoint, names)
    if source.connections() == {}:
        del cfg["connections"]
    proc = esmd(cfg)
    cfg = read_config(proc)
    m1 = cfg["mappings"][0]
    src1 = m1["source"]
    prod = Producer(source, src1)
    prod.start()
    endpoint.wait_for(lambda: len(delivered(endpoint, source)) >= 20, 60, "first records")

    # 1. batch size (SIGHUP)
    m1["batch_size"] = 25
    write_config(proc, cfg)
    reload(proc, "sighup")
    assert mapping_info(proc, m1["name"])["batch_size"] == 25

    # 2. a filter and a mapping added (POST)
    m1["filters"] = [source.filter()]
    src2 = source.new_source()
    m2 = {"name": names.mapping(), "function": "fn", "source": src2, "batch_size": 5,
          "maximum_batching_window": "50ms"}
    cfg["mappings"].append(m2)
    write_config(proc, cfg)
    ans = reload(proc, "post")
    assert ans["mappings"]["updated"] == [{"name": m1["name"], "keys": ["filters"]}], ans
    assert ans["mappings"]["added"] == [m2["name"]], ans
    source.produce_many(src1, 1000000, 10, kind="drop")  # the filter leaves them out
    source.produce_many(src2, 2000000, 20)
    endpoint.wait_for(lambda: all((("keep", i) in delivered(endpoint, source))
                                  for i in range(2000000, 2000020)), 60, "the added mapping")

    # 3. a source change: the mapping restarts (SIGHUP)
    source.restart_change(src1)
    write_config(proc, cfg)
    reload(proc, "sighup")
    wait_for(lambda: "mapping restarted on its new source" in proc.log(), 60, 0.1, "restart")
    time.sleep(1)

    # 4. the added mapping removed (POST)
    cfg["mappings"] = [m1]
    write_config(proc, cfg)
    ans = reload(proc, "post")
    assert ans["mappings"]["removed"] == [m2["name"]], ans
    time.sleep(1)

    n = prod.stop()
    want = {("keep", i) for i in range(n)}
    try:
        endpoint.wait_for(lambda: want <= set(delivered(endpoint, source)), 90, "every record")
    except TimeoutError:
        missing = sorted(want - set(delivered(endpoint, source)))
        raise AssertionError("%d records lost, e.g. %s" % (len(missing), missing[:10]))
    time.sleep(1)
    got = delivered(endpoint, source)
    twice = {k: v for k, v in got.items() if v > 1}
    assert twice == {}, "records delivered again: %s" % sorted(twice.items())[:10]
    assert not any(k[0] == "drop" for k in got), "the filter let records through"
    assert "reload refused" not in proc.log()
    # the replaced configurations and the stopped mappings are freed at exit (ASan: no leak)
    assert proc.stop() == 0


# ---- the rest on Redis (no source specifics) -------------------------------------------------


@pytest.fixture
def rsrc(redis, names):
    return RedisSource(redis, names)


def test_committed_count_goes_on_after_a_restart(rsrc, esmd, endpoint, names):
    """esmd_committed_events_total of a mapping a reload restarts goes on counting from where it
    was: the new connector's commits are added to it (it used to stay put until the new
    connector had committed more than the old one had, as the count was taken as the
    connector's total)."""
    cfg = base_config(rsrc, endpoint, names)
    proc = esmd(cfg)
    cfg = read_config(proc)
    m = cfg["mappings"][0]
    rsrc.produce_many(m["source"], 0, 6)

    def committed():
        return proc.metrics().get("esmd_committed_events_total", mapping=m["name"])

    wait_for(lambda: committed() == 6, 30, 0.2, "6 records committed")
    rsrc.restart_change(m["source"])
    write_config(proc, cfg)
    body = reload(proc, "post")
    assert body["mappings"]["restarted"], body
    rsrc.produce_many(m["source"], 6, 2)
    endpoint.wait_for(lambda: len(delivered(endpoint, rsrc)) == 8, 30, "8 records delivered")
    wait_for(lambda: committed() == 8, 30, 0.2, "8 records committed")
    assert proc.stop() == 0


def test_bad_file_is_refused_and_the_old_config_runs_on(rsrc, esmd, endpoint, names):
    proc = esmd(base_config(rsrc, endpoint, names))
    cfg = read_config(proc)
    good = open(proc.config_path).read()
    bad = good.replace("batch_size: 10", "batch_size: 0\n  bogus_key: 1")
    with open(proc.config_path, "w") as f:
        f.write(bad)
    st, body = post(proc, "/admin/reload")
    assert st == 400 and body["reloaded"] is False, body
    path = proc.config_path
    assert any(e.startswith(path + ":") and "batch_size" in e for e in body["errors"]), body
    assert any("bogus_key" in e for e in body["errors"]), body
    # the messages are check-config's
    import subprocess
    r = subprocess.run([servers.binary("esmd"), "check-config", path], stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True, timeout=30)
    assert r.returncode == 1 and r.stderr.strip().splitlines() == body["errors"]
    # SIGHUP: the same lines in the log
    proc.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: proc.log().count("reload refused: " + body["errors"][0]) >= 2, 20, 0.05,
             "the SIGHUP refusal in the log")
    # the old configuration still delivers
    src = cfg["mappings"][0]["source"]
    for i in range(30):
        rsrc.produce(src, i)
    endpoint.wait_for(lambda: len(delivered(endpoint, rsrc)) >= 30, 30, "delivery")
    assert mapping_info(proc, cfg["mappings"][0]["name"])["batch_size"] == 10


def test_listener_change_needs_a_restart(rsrc, esmd, endpoint, names):
    proc = esmd(base_config(rsrc, endpoint, names))
    cfg = read_config(proc)
    cfg["admin"]["listen"] = "127.0.0.1:%d" % servers.free_port()
    cfg["postgres"] = cfg["postgres"] + "?application_name=other"
    write_config(proc, cfg)
    st, body = post(proc, "/admin/reload")
    assert st == 200, body
    assert sorted(body["needs_restart"]) == ["admin.listen", "postgres"], body
    log = proc.log()
    assert "admin.listen changed: it takes effect only after a restart" in log
    assert "postgres changed: it takes effect only after a restart" in log
    assert proc.get("/healthz")[0] == 200  # the old listener serves on


def test_admin_override_survives_a_reload(rsrc, esmd, endpoint, names):
    """As docs/admin.md says: an override wins while its field's value in the file stays; a
    change of that field in the file makes the file's new value apply (as at start-up)."""
    proc = esmd(base_config(rsrc, endpoint, names))
    cfg = read_config(proc)
    m = cfg["mappings"][0]
    st, _ = post_override(proc, m["name"], 7)
    assert st in (200, 202)
    assert mapping_info(proc, m["name"])["batch_size"] == 7
    # another key changes in the file: the override stays
    m["maximum_batching_window"] = "80ms"
    write_config(proc, cfg)
    reload(proc, "post")
    info = mapping_info(proc, m["name"])
    assert info["batch_size"] == 7 and info["maximum_batching_window_ms"] == 80, info
    # the overridden key changes in the file: the file's new value applies
    m["batch_size"] = 12
    write_config(proc, cfg)
    reload(proc, "sighup")
    assert mapping_info(proc, m["name"])["batch_size"] == 12
    assert "batch_size changed in the configuration file since it was overridden" in proc.log()


def mapping_uuid(name):
    """The UUID the admin API gives a mapping of the file (src/api_esm.c)."""
    import uuid
    return str(uuid.uuid5(uuid.UUID("5c3c8f5e-6d1a-4f0b-9a57-3e2d7b1c8e40"), name))


def post_override(proc, name, batch_size):
    return put(proc, "/2015-03-31/event-source-mappings/" + mapping_uuid(name),
               {"BatchSize": batch_size})


def test_function_settings_apply_to_new_requests(rsrc, esmd, endpoint, names):
    proc = esmd(base_config(rsrc, endpoint, names))
    cfg = read_config(proc)
    src = cfg["mappings"][0]["source"]
    rsrc.produce(src, 0)
    endpoint.wait_for(lambda: len(endpoint.ok_requests()) >= 1, 30, "a first request")
    assert "x-reload" not in endpoint.ok_requests()[0].headers
    # a header
    cfg["functions"]["fn"]["headers"] = {"X-Reload": "two"}
    write_config(proc, cfg)
    ans = reload(proc, "post")
    assert ans["functions"]["updated"] == [{"name": "fn", "keys": ["headers"]}], ans
    rsrc.produce(src, 1)
    endpoint.wait_for(lambda: ("keep", 1) in delivered(endpoint, rsrc), 30, "record 1")
    last = [r for r in endpoint.ok_requests() if ("keep", 1) in rsrc.ids(r)][0]
    assert last.headers.get("x-reload") == "two"
    # the url: another endpoint
    other = Endpoint()
    try:
        cfg["functions"]["fn"]["url"] = other.url
        write_config(proc, cfg)
        reload(proc, "sighup")
        rsrc.produce(src, 2)
        other.wait_for(lambda: any(("keep", 2) in rsrc.ids(r) for r in other.ok_requests()), 30,
                       "record 2 at the new url")
        assert ("keep", 2) not in delivered(endpoint, rsrc)
    finally:
        other.close()


def lane_of(key, n):
    """The lane esmd gives a partition key: FNV-1a (32 bits) modulo n (src/batch.c)."""
    h = 2166136261
    for c in key.encode():
        h = ((h ^ c) * 16777619) & 0xFFFFFFFF
    return h % n


def test_max_concurrency_raised_and_lowered_by_a_reload_applies_to_batch_forming(
        redis, esmd, endpoint, names):
    """A function's max_concurrency changed by a reload applies to the batches formed from now
    on (docs/design.md#batch-forming), raised or lowered: with a long window, records of 4 lanes
    of one stream form 4 batches at once after a raise from 1 to 4 (none waits in its lane),
    and one at a time after the lower back to 1. The window is then cut to 0 through the admin
    API, which sends what was formed."""
    factor = 4
    keys = []
    for i in range(100):
        k = "key%d" % i
        if lane_of(k, factor) not in [lane_of(x, factor) for x in keys]:
            keys.append(k)
        if len(keys) == factor:
            break
    stream, group = names.topic(), names.group()
    mapping = names.mapping()
    cfg = {
        "connections": {"r": {"type": "redis", "url": redis.url}},
        "functions": {"fn": {"url": endpoint.url, "timeout": "10s", "max_concurrency": 1}},
        "mappings": [{"name": mapping, "function": "fn",
                      "source": {"redis": "r", "stream": stream, "group": group,
                                 "partition_key_field": "pk",
                                 "parallelization_factor": factor},
                      "batch_size": 100, "maximum_batching_window": "300s"}],
    }
    proc = esmd(cfg)
    hold = threading.Event()
    endpoint.behaviour = lambda req: (hold.wait(30), None)[1]
    u = mapping_uuid(mapping)

    def form(n_before):
        for k in keys:
            redis.command("XADD", stream, "*", "pk", k, "n", str(n_before))
        wait_for(lambda: proc.metrics().get("esmd_polled_events_total") == n_before + factor,
                 30, 0.05, "%d entries read" % (n_before + factor))
        return mapping_info(proc, mapping)["status"]["pending_records"]

    def flush_with_window(seconds):
        st, body = put(proc, "/2015-03-31/event-source-mappings/" + u,
                       {"MaximumBatchingWindowInSeconds": seconds})
        assert st in (200, 202), body

    # raised 1 -> 4: each lane's entry starts a batch of its own, none waits
    file_cfg = read_config(proc)
    file_cfg["functions"]["fn"]["max_concurrency"] = factor
    write_config(proc, file_cfg)
    ans = reload(proc, "post")
    assert ans["functions"]["updated"] == [{"name": "fn", "keys": ["max_concurrency"]}], ans
    assert form(0) == 0, "entries wait in their lanes with max_concurrency raised to 4"
    flush_with_window(0)
    endpoint.wait_for(lambda: endpoint.inflight == factor, 30, "4 batches in flight at once")
    hold.set()
    endpoint.wait_for(lambda: len(endpoint.ok_requests()) == factor and endpoint.inflight == 0,
                      30, "4 answered")

    # lowered 4 -> 1: one batch forms at a time, the other lanes' entries wait
    hold.clear()
    file_cfg["functions"]["fn"]["max_concurrency"] = 1
    write_config(proc, file_cfg)
    reload(proc, "sighup")
    flush_with_window(300)
    assert form(factor) == factor - 1, "more than one batch forming with max_concurrency 1"
    endpoint.max_concurrent = 0
    flush_with_window(0)
    endpoint.wait_for(lambda: endpoint.inflight == 1, 30, "a batch in flight")
    hold.set()
    endpoint.wait_for(lambda: sum(len(r.json["Records"]) for r in endpoint.ok_requests())
                      == 2 * factor, 30, "every entry delivered")
    assert endpoint.max_concurrent == 1
    wait_for(lambda: redis.command("XPENDING", stream, group)[0] == 0, 30, 0.1, "all acked")


def test_removed_mapping_finishes_its_request_and_sigterm_waits_for_it(rsrc, esmd, endpoint,
                                                                     names):
    """A removed mapping stops gracefully: its request in flight finishes and is committed (not
    delivered again after a restart); a reload meanwhile is refused (409); SIGTERM meanwhile
    waits for it and exits 0."""
    cfg = base_config(rsrc, endpoint, names)
    m2 = {"name": names.mapping(), "function": "fn", "source": rsrc.new_source(),
          "batch_size": 10, "maximum_batching_window": "0ms"}
    cfg["mappings"].append(m2)
    proc = esmd(cfg)
    cfg = read_config(proc)
    endpoint.delay(2.0)
    rsrc.produce(m2["source"], 7)
    endpoint.wait_for(lambda: len(endpoint.snapshot()) >= 1, 30, "the request in flight")
    cfg["mappings"] = cfg["mappings"][:1]
    write_config(proc, cfg)
    st, body = post(proc, "/admin/reload")
    assert st == 200 and body["mappings"]["removed"] == [m2["name"]], body
    st, body = post(proc, "/admin/reload")
    assert st == 409 and body["reloaded"] is False, body
    assert proc.stop() == 0
    assert len(endpoint.ok_requests()) == 1 and rsrc.ids(endpoint.ok_requests()[0]) == [
        ("keep", 7)]
    lines = proc.log_lines()
    stopped = [i for i, l in enumerate(lines)
               if l.get("msg") == "mapping stopped" and l.get("mapping") == m2["name"]]
    exiting = [i for i, l in enumerate(lines) if l.get("msg", "").startswith("esmd exiting")]
    assert stopped and exiting and stopped[0] < exiting[0], "SIGTERM did not wait for the stop"
    # the mapping back: nothing to deliver again
    endpoint.default = Response()
    cfg["mappings"].append(m2)
    write_config(proc, cfg)
    proc.start()
    rsrc.produce(m2["source"], 8)
    endpoint.wait_for(lambda: ("keep", 8) in delivered(endpoint, rsrc), 30, "record 8")
    assert delivered(endpoint, rsrc) == {("keep", 7): 1, ("keep", 8): 1}
