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
