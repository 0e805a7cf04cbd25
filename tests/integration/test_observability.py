"""Operating esmd with Prometheus and Grafana (docs/operations.md#alerts, docs/metrics.md,
examples/observability/):

- the series the alerts need: readiness (esmd_ready), the async queue's depth, oldest age and
  maximum event age;
- the alerting rules pass `promtool check rules` and their unit tests (`promtool test rules`,
  synthetic series: each alert fires and does not fire), the Prometheus configuration passes
  `promtool check config`;
- the Grafana dashboard is a dashboard (panels with targets) and its provisioning files are
  well formed;
- every metric name the dashboard and the rules use is one a running esmd exports: esmd is
  started with a mapping of each source kind, a function and the async queue, and scraped.
"""

import json
import os
import re
import shutil
import subprocess

import pytest
import requests
import yaml

import servers
from endpoint import Response

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OBS = os.path.join(ROOT, "examples", "observability")
TOKEN = "test-admin-token"
# the async queue's retry delays and poll interval, shortened (docs/configuration.md)
FAST = {"retry_base": "300ms", "backoff_base": "100ms", "backoff_cap": "400ms",
        "poll_interval": "100ms"}


def wait(pred, timeout=30, what="condition"):
    servers.wait_for(pred, timeout, 0.05, what)


def invoke_event(proc, fn, payload=b"{}"):
    return requests.post("%s/2015-03-31/functions/%s/invocations" % (proc.admin, fn),
                         data=payload, timeout=30,
                         headers={"X-Amz-Invocation-Type": "Event",
                                  "Authorization": "Bearer " + TOKEN})


@pytest.fixture
def db(postgres, request):
    name = "obs_%s_%d" % (request.node.name.lower()[-30:], os.getpid())
    name = "".join(c if c.isalnum() or c == "_" else "_" for c in name)
    return postgres.create_db(name), name


# ---- the series the alerts need ---------------------------------------------------------------


def test_async_queue_depth_oldest_age_and_maximum_event_age(esmd, db, endpoint):
    endpoint.behaviour = lambda req: Response(500)  # system errors: the events stay, retried
    cfg = {"postgres": db[0], "admin": {"token": TOKEN}, "async_queue": FAST,
           "functions": {"fn": {"url": endpoint.url, "timeout": "5s", "max_concurrency": 2,
                                "async": {"maximum_event_age": "120s"}},
                         "idle": {"url": endpoint.url}}}
    proc = esmd(cfg)
    m = proc.metrics()
    assert m.get("esmd_async_maximum_event_age_seconds", function="fn") == 120
    # the default (Lambda's 6 hours) for a function without an async block
    assert m.get("esmd_async_maximum_event_age_seconds", function="idle") == 21600
    for i in range(3):
        assert invoke_event(proc, "fn", json.dumps({"i": i}).encode()).status_code == 202
    # refreshed every 5 s
    wait(lambda: proc.metrics().get("esmd_async_queue_depth", function="fn") == 3, 30,
         "esmd_async_queue_depth 3")
    wait(lambda: proc.metrics().get("esmd_async_oldest_event_age_seconds", function="fn") >= 1,
         30, "an oldest age of a second or more")
    m = proc.metrics()
    assert m.get("esmd_async_queue_depth", function="idle") == 0
    assert m.get("esmd_async_oldest_event_age_seconds", function="idle") == 0
    # an event-invoke-config override is the maximum in force
    r = requests.put("%s/2019-09-25/functions/fn/event-invoke-config" % proc.admin,
                     json={"MaximumEventAgeInSeconds": 300}, timeout=10,
                     headers={"Authorization": "Bearer " + TOKEN})
    assert r.status_code == 200, r.text
    wait(lambda: proc.metrics().get("esmd_async_maximum_event_age_seconds", function="fn") == 300,
         30, "the override's maximum event age")
    # the function recovers: the queue drains and the gauges go back to 0
    endpoint.behaviour = None
    wait(lambda: proc.metrics().get("esmd_async_queue_depth", function="fn") == 0, 30,
         "an empty queue")
    assert proc.metrics().get("esmd_async_oldest_event_age_seconds", function="fn") == 0
    assert len(endpoint.ok_requests()) == 3


def test_ready_gauge_is_what_readyz_answers(esmd, postgres, endpoint, names):
    # a Redis source on a port where nothing listens: the mapping (and so esmd) is not ready
    cfg = {"connections": {"r": {"type": "redis",
                                 "url": "redis://127.0.0.1:%d" % servers.free_port()}},
           "functions": {"fn": {"url": endpoint.url}},
           "mappings": [{"name": names.mapping(), "function": "fn",
                         "source": {"redis": "r", "stream": names.topic(), "group": "g"}}]}
    proc = esmd(cfg)
    assert proc.get("/readyz")[0] == 503
    m = proc.metrics()
    assert m.get("esmd_ready") == 0, m.names()
    proc.stop()
    ok = esmd({"functions": {"fn": {"url": endpoint.url}}})
    wait(lambda: ok.get("/readyz")[0] == 200, 30, "/readyz 200")
    assert ok.metrics().get("esmd_ready") == 1


def test_mapping_on_failure_destination_series_follows_the_override(esmd, kafka_mock, names):
    """esmd_mapping_on_failure names a mapping's on-failure destination as esmd_destination_pending
    labels it (password hidden), 1 while in force, 0 once replaced (UpdateEventSourceMapping)."""
    topic = names.topic()
    kafka_mock.create_topic(topic, 1)
    name = names.mapping()
    secret = "http://u:pw@127.0.0.1:%d/failed" % servers.free_port()
    shown = secret.replace(":pw@", ":***@")
    cfg = {"connections": {"k": {"type": "kafka", "bootstrap_servers": kafka_mock.bootstrap}},
           "functions": {"fn": {"url": "http://127.0.0.1:%d/" % servers.free_port()}},
           "mappings": [{"name": name, "function": "fn", "on_failure": secret,
                         "source": {"kafka": "k", "topics": [topic],
                                    "consumer_group": names.group()}}]}
    proc = esmd(cfg)
    m = proc.metrics()
    assert m.get("esmd_mapping_on_failure", mapping=name, function="fn", destination=shown) == 1
    assert [ls for n, ls, _ in m if n == "esmd_destination_pending"] == [{"destination": shown}]
    assert secret not in proc.get("/metrics")[1]

    status, esms = proc.get("/2015-03-31/event-source-mappings/")
    assert status == 200, esms
    (uuid,) = [e["UUID"] for e in json.loads(esms)["EventSourceMappings"]]
    r = requests.put("%s/2015-03-31/event-source-mappings/%s" % (proc.admin, uuid), timeout=10,
                     json={"DestinationConfig": {"OnFailure": {"Destination": "pgqueue://other"}}})
    assert r.status_code == 202, r.text

    def switched():
        m = proc.metrics()
        return (m.get("esmd_mapping_on_failure", mapping=name, destination="pgqueue://other") == 1
                and m.get("esmd_mapping_on_failure", mapping=name, destination=shown) == 0)
    wait(switched, 30, "the override's destination in force")
    r = requests.put("%s/2015-03-31/event-source-mappings/%s" % (proc.admin, uuid), timeout=10,
                     json={"DestinationConfig": {"OnFailure": {"Destination": ""}}})
    assert r.status_code == 202, r.text
    wait(lambda: proc.metrics().get("esmd_mapping_on_failure", mapping=name) == 0, 30,
         "no destination in force")


def test_mapping_on_failure_series_after_reloads(esmd, kafka_mock, names):
    """A reload that restarts a mapping on a new source and destination leaves the old
    destination at 0 and the new at 1; one that removes the mapping takes every series of it
    out of /metrics (they used to stay, frozen at their last values)."""
    topics = [names.topic(), names.topic()]
    for t in topics:
        kafka_mock.create_topic(t, 1)
    name = names.mapping()

    def config(topic, on_failure, with_mapping=True):
        return {"connections": {"k": {"type": "kafka", "bootstrap_servers": kafka_mock.bootstrap}},
                "functions": {"fn": {"url": "http://127.0.0.1:%d/" % servers.free_port()}},
                "mappings": [{"name": name, "function": "fn", "on_failure": on_failure,
                              "source": {"kafka": "k", "topics": [topic],
                                         "consumer_group": names.group()}}]
                if with_mapping else []}

    proc = esmd(config(topics[0], "pgqueue://first"))

    def reload(cfg):
        cfg = dict(cfg, postgres=proc_postgres, admin={"listen": proc.admin[len("http://"):]})
        with open(proc.config_path, "w") as f:
            yaml.safe_dump(cfg, f)
        r = requests.post(proc.admin + "/admin/reload", timeout=30)
        assert r.status_code == 200 and r.json()["reloaded"] is True, r.text

    with open(proc.config_path) as f:
        proc_postgres = yaml.safe_load(f)["postgres"]
    assert proc.metrics().get("esmd_mapping_on_failure", destination="pgqueue://first") == 1
    reload(config(topics[1], "pgqueue://second"))  # a new source: the mapping restarts
    wait(lambda: proc.metrics().get("esmd_mapping_on_failure", mapping=name,
                                    destination="pgqueue://second") == 1, 30, "the new mapping")
    assert proc.metrics().get("esmd_mapping_on_failure", destination="pgqueue://first") == 0
    assert [n for n, ls, _ in proc.metrics() if ls.get("mapping") == name]
    reload(config(topics[1], None, with_mapping=False))
    wait(lambda: not [n for n, ls, _ in proc.metrics() if ls.get("mapping") == name], 30,
         "the removed mapping's series gone")


# ---- the alerting rules and the Prometheus configuration --------------------------------------

PROM_DIR = os.path.join(OBS, "prometheus")
RULES = os.path.join(PROM_DIR, "esmd-alerts.yml")
RULE_TESTS = os.path.join(PROM_DIR, "esmd-alerts.test.yml")
PROM_CONFIG = os.path.join(PROM_DIR, "prometheus.yml")
DASHBOARD = os.path.join(OBS, "grafana", "dashboards", "esmd.json")
PROVISIONING = os.path.join(OBS, "grafana", "provisioning")


def promtool(*args):
    exe = shutil.which("promtool")
    assert exe, "promtool not found: Debian's prometheus package provides it (scripts/install-deps)"
    r = subprocess.run([exe] + list(args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, timeout=120)
    return r.returncode, r.stdout


def load_rules():
    with open(RULES) as f:
        return [r for g in yaml.safe_load(f)["groups"] for r in g["rules"]]


def test_rules_pass_promtool_check():
    code, out = promtool("check", "rules", RULES)
    assert code == 0, out
    assert "SUCCESS" in out, out


def test_every_alert_has_unit_tests_that_fire_and_do_not_fire():
    code, out = promtool("test", "rules", RULE_TESTS)
    assert code == 0, out
    with open(RULE_TESTS) as f:
        tests = yaml.safe_load(f)["tests"]
    fired, quiet = set(), set()
    for t in tests:
        for case in t.get("alert_rule_test", []):
            (fired if case.get("exp_alerts") else quiet).add(case["alertname"])
    alerts = {r["alert"] for r in load_rules() if "alert" in r}
    assert {"EsmdNotReady", "EsmdLagGrowing", "EsmdMappingStuckOnRetries", "EsmdOutboxBackingUp",
            "EsmdAsyncEventsNearMaximumAge"} <= alerts
    assert alerts - fired == set(), "alerts never shown firing"
    assert alerts - quiet == set(), "alerts never shown staying quiet"


def test_prometheus_config_passes_promtool_and_loads_the_rules():
    code, out = promtool("check", "config", PROM_CONFIG)
    assert code == 0, out
    with open(PROM_CONFIG) as f:
        cfg = yaml.safe_load(f)
    assert [os.path.join(PROM_DIR, p) for p in cfg["rule_files"]] == [RULES]
    jobs = {j["job_name"]: j for j in cfg["scrape_configs"]}
    # EsmdDown selects the job by name; the target is the compose stack's esmd admin listener
    (down,) = [r["expr"] for r in load_rules() if r.get("alert") == "EsmdDown"]
    assert 'up{job="esmd"}' in down and "esmd" in jobs
    assert jobs["esmd"]["static_configs"][0]["targets"] == ["esmd:9000"]
    with open(os.path.join(ROOT, "examples", "esmd.yaml")) as f:
        assert yaml.safe_load(f)["admin"]["listen"].endswith(":9000")


# ---- the Grafana dashboard and provisioning -----------------------------------------------------


def load_dashboard():
    with open(DASHBOARD) as f:
        return json.load(f)


def dashboard_panels(dash):
    for p in dash["panels"]:
        yield p
        for q in p.get("panels", []):  # a collapsed row holds its panels
            yield q


def test_dashboard_is_a_grafana_dashboard(tmp_path):
    dash = load_dashboard()
    assert dash["uid"] and dash["title"] and isinstance(dash["schemaVersion"], int)
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    panels = list(dashboard_panels(dash))
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    cells = set()
    graphs = 0
    for p in panels:
        g = p["gridPos"]
        assert all(isinstance(g[k], int) for k in ("x", "y", "w", "h")), p["title"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"])
                for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, "panel %r overlaps another" % p["title"]
        cells |= mine
        if p["type"] == "row":
            continue
        graphs += 1
        assert p["type"] in ("timeseries", "stat"), p["title"]
        assert p["datasource"]["uid"] == "${datasource}", p["title"]
        assert p["targets"], "panel %r has no query" % p["title"]
        refs = [t["refId"] for t in p["targets"]]
        assert len(refs) == len(set(refs)), p["title"]
        for t in p["targets"]:
            assert t["expr"].strip(), p["title"]
    assert graphs >= 15
    # every query is PromQL Prometheus accepts: promtool checks them as recording rules, with the
    # dashboard's variables replaced by what Grafana puts there
    grafana_vars = {"$__rate_interval": "1m", "$mapping": ".*", "$function": ".*",
                    "$instance": ".*"}
    rules = []
    for i, e in enumerate(dashboard_exprs(dash)):
        for k, v in grafana_vars.items():
            e = e.replace(k, v)
        assert "$" not in e, e
        rules.append({"record": "dashboard:query_%d" % i, "expr": e})
    path = os.path.join(str(tmp_path), "dashboard-queries.yml")
    with open(path, "w") as f:
        yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}, f)
    code, out = promtool("check", "rules", path)
    assert code == 0, out
    # what the issue asks to see, by metric
    used = set().union(*(promql_metric_names(e) for e in dashboard_exprs(dash)))
    for name in ("esmd_polled_events_total", "esmd_offset_lag", "esmd_failed_invoke_events_total",
                 "esmd_batch_retries_total", "esmd_on_failure_events_total",
                 "esmd_pgqueue_dead_lettered_messages_total", "esmd_destination_pending",
                 "esmd_duration_seconds_bucket", "esmd_concurrent_executions",
                 "esmd_throttles_total", "esmd_async_queue_depth", "esmd_mapping_on_failure",
                 "esmd_async_oldest_event_age_seconds"):
        assert name in used, name


def test_grafana_provisioning_matches_the_compose_stack():
    with open(os.path.join(ROOT, "docker-compose.yml")) as f:
        compose = yaml.safe_load(f)["services"]
    with open(os.path.join(PROVISIONING, "datasources", "prometheus.yml")) as f:
        ds = yaml.safe_load(f)
    assert ds["apiVersion"] == 1
    (prom,) = [d for d in ds["datasources"] if d["type"] == "prometheus"]
    assert prom["url"] == "http://prometheus:9090" and "prometheus" in compose
    with open(os.path.join(PROVISIONING, "dashboards", "esmd.yml")) as f:
        prov = yaml.safe_load(f)
    assert prov["apiVersion"] == 1
    (provider,) = prov["providers"]
    mounts = {}
    for v in compose["grafana"]["volumes"]:
        host, target = v.split(":")[:2]
        mounts[target] = os.path.normpath(os.path.join(ROOT, host))
    assert mounts["/etc/grafana/provisioning"] == PROVISIONING
    assert mounts[provider["options"]["path"]] == os.path.dirname(DASHBOARD)
    pmounts = dict(reversed(v.split(":")[:2]) for v in compose["prometheus"]["volumes"])
    assert os.path.normpath(os.path.join(ROOT, pmounts["/etc/prometheus"])) == PROM_DIR
    assert "--config.file=/etc/prometheus/prometheus.yml" in compose["prometheus"]["command"]


# ---- every metric used is one esmd exports ---------------------------------------------------

# Series Prometheus makes itself for every target: not esmd's to export.
PROMETHEUS_OWN = {"up"}
PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and",
                "or", "unless", "offset", "inf", "nan"}


def promql_metric_names(expr):
    """The metric names an expression selects (a small lexer, enough for these files): strings,
    label matchers, ranges and grouping clauses are removed, then every identifier that is not
    called, a keyword or part of a number is a metric name."""
    e = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    e = re.sub(r"'(?:[^'\\]|\\.)*'", "''", e)
    e = re.sub(r"\{[^}]*\}", " ", e)
    e = re.sub(r"\[[^\]]*\]", " ", e)
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    names = set()
    for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", e):
        if m.start() and (e[m.start() - 1].isdigit() or e[m.start() - 1] == "."):
            continue  # 1e3, 5m
        if e[m.end():].lstrip().startswith("(") or m.group(0).lower() in PROMQL_WORDS:
            continue
        names.add(m.group(0))
    return names


def dashboard_exprs(dash):
    for p in dashboard_panels(dash):
        for t in p.get("targets", []):
            yield t["expr"]
    for v in dash["templating"]["list"]:
        if v["type"] != "query":
            continue
        q = v["query"]["query"] if isinstance(v["query"], dict) else v["query"]
        m = re.fullmatch(r"\s*label_values\((.*),\s*[A-Za-z_][A-Za-z0-9_]*\s*\)\s*", q)
        yield m.group(1) if m else q


def used_metric_names():
    """{metric name: [where it is used]} over the dashboard and the rules."""
    used = {}
    for e in dashboard_exprs(load_dashboard()):
        for n in promql_metric_names(e):
            used.setdefault(n, []).append("dashboard: " + e)
    for r in load_rules():
        for n in promql_metric_names(r["expr"]):
            used.setdefault(n, []).append("rule %s" % r.get("alert") or r.get("record"))
    return used


def exported_series_names(text):
    """The series names of a /metrics answer (a histogram's are its _bucket, _sum and _count),
    and {family: type}."""
    names, types = set(), {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            types[name] = kind
        elif line and not line.startswith("#"):
            names.add(re.match(r"[A-Za-z_:][A-Za-z0-9_:]*", line).group(0))
    return names, types


def not_exported(used, names, types):
    """The used names esmd does not export, with a hint for a histogram's family name."""
    out = {}
    for n, where in used.items():
        if n in names or n in PROMETHEUS_OWN:
            continue
        hint = " (a histogram: use %s_bucket, _sum or _count)" % n if types.get(n) == "histogram" \
            else ""
        out[n + hint] = where
    return out


def test_metric_name_lexer():
    assert promql_metric_names(
        'histogram_quantile(0.99, sum by (function, le) (rate(esmd_duration_seconds_bucket'
        '{function=~"$function",instance=~"$instance"}[$__rate_interval])))') == {
        "esmd_duration_seconds_bucket"}
    assert promql_metric_names(
        "max by (function) (a_seconds) > 0.8 * max by (function) (b_seconds offset 5m)\n"
        "unless on(x) group_left(y) c_total and 1e3 < bool d") == {"a_seconds", "b_seconds",
                                                                  "c_total", "d"}
    assert promql_metric_names('label_replace(x, "dst", "$1", "src", "(.*)")') == {"x"}
    # the comparison can fail: a name esmd does not export, a histogram without its suffix
    names, types = exported_series_names(
        "# TYPE h histogram\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n"
        "# TYPE c_total counter\nc_total 1\n")
    missing = not_exported({"c_total": ["a"], "h_count": ["b"], "h": ["c"], "nope": ["d"],
                            "up": ["e"]}, names, types)
    assert set(missing) == {"h (a histogram: use h_bucket, _sum or _count)", "nope"}


def test_every_metric_the_dashboard_and_rules_use_is_exported(esmd, db, endpoint, redis,
                                                              kafka_mock, names):
    """esmd with a mapping of each source kind (Kafka, Redis, Postgres queue) with on-failure
    destinations, a function and its async queue: every series exists from the start (the
    invoker's once an event went through). The names used must be among those scraped."""
    topic = names.topic()
    kafka_mock.create_topic(topic, 2)
    cfg = {"postgres": db[0], "admin": {"token": TOKEN}, "async_queue": FAST,
           "connections": {"k": {"type": "kafka", "bootstrap_servers": kafka_mock.bootstrap},
                           "r": {"type": "redis", "url": redis.url}},
           "functions": {"fn": {"url": endpoint.url, "timeout": "5s", "max_concurrency": 4,
                                "async": {"on_failure": "pgqueue://%s_afail" % names.base.replace("-", "_")}}},
           "mappings": [
               {"name": names.mapping(), "function": "fn",
                "source": {"kafka": "k", "topics": [topic], "consumer_group": names.group()},
                "on_failure": "pgqueue://%s_kfail" % names.base.replace("-", "_")},
               {"name": names.mapping(), "function": "fn",
                "source": {"redis": "r", "stream": names.topic(), "group": names.group()}},
               {"name": names.mapping(), "function": "fn",
                "source": {"pgqueue": names.mapping(), "max_receive_count": 3,
                           "dead_letter_queue": names.mapping()}}]}
    proc = esmd(cfg)
    assert invoke_event(proc, "fn").status_code == 202
    # the invoker's series appear with the first attempt's end
    wait(lambda: proc.metrics().get("esmd_invocations_total", function="fn") == 1, 30,
         "the async event invoked")
    status, text = proc.get("/metrics")
    assert status == 200
    names_, types = exported_series_names(text)
    used = used_metric_names()
    assert len(used) >= 30, sorted(used)
    missing = not_exported(used, names_, types)
    assert not missing, "used but not exported by esmd:\n" + "\n".join(
        "%s: %s" % (n, w[0]) for n, w in sorted(missing.items()))
