"""The event-source-mapping admin API (docs/admin.md): Lambda's List/Get/UpdateEventSourceMapping
under /2015-03-31/event-source-mappings, the native /admin/mappings routes and the filter dry-run;
changes stored in esmd.mapping_overrides, applied at once, heard by every instance (LISTEN /
NOTIFY) and kept across restarts."""

import base64
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import uuid

import pytest

from servers import assert_error, wait_for
from test_async_e2e import db  # noqa: F401 (fixture)
from test_kafka_e2e import wait_committed

ESM = "/2015-03-31/event-source-mappings"


def call(proc, method, path, body=None, headers=None, raw=None, timeout=10):
    """(status, headers, parsed JSON or text) of one admin request."""
    data = raw if raw is not None else (None if body is None else json.dumps(body).encode())
    req = urllib.request.Request(proc.admin + path, data=data, method=method,
                                 headers=dict({"Content-Type": "application/json"},
                                              **(headers or {})))
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            status, hdrs, text = r.status, r.headers, r.read().decode()
    except urllib.error.HTTPError as e:
        status, hdrs, text = e.code, e.headers, e.read().decode()
    try:
        return status, hdrs, json.loads(text)
    except ValueError:
        return status, hdrs, text


def the_esm(proc):
    status, _, body = call(proc, "GET", ESM + "/")
    assert status == 200, body
    assert len(body["EventSourceMappings"]) == 1, body
    return body["EventSourceMappings"][0]


def mapping_uuid(name):
    return str(uuid.uuid5(uuid.UUID("5c3c8f5e-6d1a-4f0b-9a57-3e2d7b1c8e40"), name))


def overrides_row(postgres, name):
    """The override row as a list of strings ("" for NULL), or None."""
    rows = postgres.sql("SELECT enabled, batch_size, window_ms, filters::text, on_failure "
                        "FROM esmd.mapping_overrides WHERE name = '%s'" % name)
    return rows[0] if rows else None


@pytest.mark.kafka
def test_admin_list_get_and_errors(kafka, esmd, kafka_config, names, postgres):
    topic = kafka.create_topic(names.topic(), 1)
    cfg = kafka_config(topic, batch_size=10, window="2s",
                       mapping_extra={"filters": [{"value": {"type": ["a"]}}],
                                      "maximum_retry_attempts": 3,
                                      "report_batch_item_failures": True})
    name = cfg["mappings"][0]["name"]
    proc = esmd(cfg)

    esm = the_esm(proc)
    u = mapping_uuid(name)
    assert esm["UUID"] == u
    assert esm["EventSourceMappingArn"] == \
        "arn:aws:lambda:us-east-1:000000000000:event-source-mapping:" + u
    assert esm["FunctionArn"] == "arn:aws:lambda:us-east-1:000000000000:function:fn"
    assert esm["BatchSize"] == 10
    assert esm["MaximumBatchingWindowInSeconds"] == 2
    assert esm["State"] == "Enabled"
    assert esm["Topics"] == [topic]
    assert esm["StartingPosition"] == "TRIM_HORIZON"
    assert esm["MaximumRetryAttempts"] == 3
    assert esm["FunctionResponseTypes"] == ["ReportBatchItemFailures"]
    assert esm["SelfManagedEventSource"]["Endpoints"]["KAFKA_BOOTSTRAP_SERVERS"] == \
        kafka.bootstrap.split(",")
    assert esm["SelfManagedKafkaEventSourceConfig"]["ConsumerGroupId"] == \
        cfg["mappings"][0]["source"]["consumer_group"]
    assert json.loads(esm["FilterCriteria"]["Filters"][0]["Pattern"]) == {"value": {"type": ["a"]}}
    assert esm["DestinationConfig"] == {}
    assert isinstance(esm["LastModified"], float)
    assert esm["LastProcessingResult"]

    # Get, with and without the trailing-slash form of the list
    st, _, got = call(proc, "GET", ESM + "/" + u)
    assert st == 200 and got == dict(got, UUID=u, BatchSize=10)
    st, _, lst = call(proc, "GET", ESM)
    assert st == 200 and lst["EventSourceMappings"][0]["UUID"] == u

    # List filters and paging
    st, _, lst = call(proc, "GET", ESM + "/?FunctionName=other")
    assert st == 200 and lst["EventSourceMappings"] == []
    st, _, lst = call(proc, "GET", ESM + "/?FunctionName=arn:aws:lambda:us-east-1:000000000000:"
                      "function:fn&MaxItems=1")
    assert st == 200 and len(lst["EventSourceMappings"]) == 1
    assert_error(call(proc, "GET", ESM + "/?MaxItems=0"), 400, "InvalidParameterValueException")
    assert_error(call(proc, "GET", ESM + "/?Marker=zz"), 400, "InvalidParameterValueException")

    # errors
    assert_error(call(proc, "GET", ESM + "/" + str(uuid.uuid4())), 404,
                 "ResourceNotFoundException")
    assert_error(call(proc, "GET", ESM + "/not-a-uuid"), 404, "ResourceNotFoundException")
    assert_error(call(proc, "PUT", ESM + "/" + str(uuid.uuid4()), {"BatchSize": 5}), 404,
                 "ResourceNotFoundException")
    for bad in (0, 10001, 2.5, "10", None):
        assert_error(call(proc, "PUT", ESM + "/" + u, {"BatchSize": bad}), 400,
                     "InvalidParameterValueException", "BatchSize")
    assert_error(call(proc, "PUT", ESM + "/" + u, {"MaximumBatchingWindowInSeconds": 301}), 400,
                 "InvalidParameterValueException", "MaximumBatchingWindowInSeconds")
    assert_error(call(proc, "PUT", ESM + "/" + u, {"Enabled": "no"}), 400,
                 "InvalidParameterValueException", "Enabled")
    assert_error(call(proc, "PUT", ESM + "/" + u, {"FilterCriteria": {"Filters": [
        {"Pattern": '{"value": {"type": [{"prefx": "a"}]}}'}]}}), 400,
        "InvalidParameterValueException", "Invalid filter pattern definition.")
    st, _, body = call(proc, "PUT", ESM + "/" + u, {"FilterCriteria": {"Filters": [
        {"Pattern": '{"value": {"type": [{"prefx": "a"}]}}'}]}})
    assert "prefx" in body["Message"] and "Filters[0].Pattern:1:" in body["Message"], body
    # compiled size (docs/filters.md#limits): 400 values repeated in 1,024 "$or" alternatives
    # is about 3.6 MB; 5 of them pass the 16 MB of a mapping, one of 800 values the 4 MB of a
    # pattern (both under the 4,096 characters of max_filter_pattern_length)
    ors = {"o%d" % i: {"$or": [{"a": [1]}, {"b": [2]}]} for i in range(10)}
    big = json.dumps(dict(ors, v=list(range(400))), separators=(",", ":"))
    assert_error(call(proc, "PUT", ESM + "/" + u, {"FilterCriteria": {"Filters": [
        {"Pattern": big}] * 5}}), 400, "InvalidParameterValueException",
        "Filters[4].Pattern:1:1: with this pattern, the mapping's filters compile to")
    assert_error(call(proc, "PUT", ESM + "/" + u, {"FilterCriteria": {"Filters": [
        {"Pattern": json.dumps(dict(ors, v=list(range(800))), separators=(",", ":"))}]}}), 400,
        "InvalidParameterValueException", "more than the limit of 4 MB per pattern")
    assert_error(call(proc, "PUT", ESM + "/" + u, {"FilterCriteria": {"Filters": [
        {"Pattern": "{}"}] * 6}}), 400, "InvalidParameterValueException", "at most 5")
    assert_error(call(proc, "PUT", ESM + "/" + u, {"DestinationConfig": {
        "OnSuccess": {"Destination": "pgqueue://x"}}}), 400, "InvalidParameterValueException",
        "Unsupported DestinationConfig parameter")
    assert_error(call(proc, "PUT", ESM + "/" + u, {"DestinationConfig": {
        "OnFailure": {"Destination": "nosuch://x"}}}), 400, "InvalidParameterValueException",
        "Destination")
    assert_error(call(proc, "PUT", ESM + "/" + u, {"MaximumRetryAttempts": 1}), 400,
                 "InvalidParameterValueException", "configuration file")
    assert_error(call(proc, "PUT", ESM + "/" + u, {"FunctionName": "other"}), 400,
                 "InvalidParameterValueException", "FunctionName")
    assert_error(call(proc, "PUT", ESM + "/" + u, {"Bogus": 1}), 400,
                 "InvalidParameterValueException", "Bogus")
    assert_error(call(proc, "PUT", ESM + "/" + u, raw=b"{not json"), 400,
                 "InvalidRequestContentException")
    assert_error(call(proc, "PUT", ESM + "/" + u, raw=b"[1]"), 400,
                 "InvalidRequestContentException")
    # bodies over 256 KB are refused before they are read
    st, hdrs, body = call(proc, "PUT", ESM + "/" + u, raw=b" " * (256 * 1024 + 1))
    assert st == 413 and hdrs.get("x-amzn-ErrorType") == "RequestTooLargeException"
    assert_error(call(proc, "POST", ESM + "/"), 405, "MethodNotAllowedException")
    # nothing of that was stored
    assert overrides_row(postgres, name) is None


@pytest.mark.kafka
def test_admin_update_applies_to_a_running_kafka_mapping(kafka, endpoint, esmd, kafka_config,
                                                         names, postgres):
    topic = kafka.create_topic(names.topic(), 1)
    group = names.group()
    cfg = kafka_config(topic, batch_size=3, window="100ms", group=group)
    name = cfg["mappings"][0]["name"]
    proc = esmd(cfg)
    u = mapping_uuid(name)

    kafka.produce(topic, [{"partition": 0, "value": json.dumps({"type": "a", "i": i})}
                          for i in range(6)])
    endpoint.wait_records(6, timeout=30)
    assert max(len(r.records()) for r in endpoint.ok_requests()) <= 3

    # Enabled=false: records stop
    st, _, esm = call(proc, "PUT", ESM + "/" + u, {"Enabled": False})
    assert st == 202, esm
    assert esm["State"] == "Disabled"
    assert esm["StateTransitionReason"] == "User action"
    assert overrides_row(postgres, name)[0] == "f"
    assert postgres.sql("SELECT state FROM esmd.mapping_state WHERE name = '%s'" % name) == \
        [["Disabled"]]
    wait_committed(kafka, group, topic, {0: 6})
    kafka.produce(topic, [{"partition": 0, "value": json.dumps({"type": "a", "i": i})}
                          for i in range(6, 10)])
    time.sleep(2.0)
    assert endpoint.record_count() == 6, "records were delivered while disabled"

    # BatchSize 10 and a window, then enable: the waiting records come as one batch
    st, _, esm = call(proc, "PUT", ESM + "/" + u, {"BatchSize": 10,
                                                   "MaximumBatchingWindowInSeconds": 1})
    assert st == 202 and esm["BatchSize"] == 10 and esm["MaximumBatchingWindowInSeconds"] == 1
    assert esm["State"] == "Disabled"
    n_req = len(endpoint.ok_requests())
    st, _, esm = call(proc, "PUT", ESM + "/" + u, {"Enabled": True})
    assert st == 202 and esm["State"] == "Enabled"
    endpoint.wait_records(10, timeout=30)
    new = endpoint.ok_requests()[n_req:]
    assert [len(r.records()) for r in new] == [4], new

    # FilterCriteria: only matching records arrive; {} removes the filters again
    st, _, esm = call(proc, "PUT", ESM + "/" + u, {
        "FilterCriteria": {"Filters": [{"Pattern": json.dumps({"value": {"type": ["keep"]}})}]},
        "MaximumBatchingWindowInSeconds": 0})
    assert st == 202, esm
    assert json.loads(esm["FilterCriteria"]["Filters"][0]["Pattern"]) == \
        {"value": {"type": ["keep"]}}
    kafka.produce(topic, [{"partition": 0, "value": json.dumps(
        {"type": "keep" if i % 2 else "drop", "i": i})} for i in range(10, 20)])
    wait_committed(kafka, group, topic, {0: 20})
    time.sleep(0.3)
    later = [json.loads(base64.b64decode(rec["value"]))["i"]
             for _, _, rec in endpoint.records()][10:]
    assert later == [11, 13, 15, 17, 19]

    st, _, esm = call(proc, "PUT", ESM + "/" + u, {"FilterCriteria": {}})
    assert st == 202 and "FilterCriteria" not in esm
    kafka.produce(topic, [{"partition": 0, "value": json.dumps({"type": "drop", "i": 20})}])
    endpoint.wait_records(16, timeout=30)

    # DestinationConfig with an esmd URI, then "" removes it
    st, _, esm = call(proc, "PUT", ESM + "/" + u, {
        "DestinationConfig": {"OnFailure": {"Destination": "pgqueue://admin_failed"}}})
    assert st == 202, esm
    assert esm["DestinationConfig"] == {"OnFailure": {"Destination": "pgqueue://admin_failed"}}
    st, _, esm = call(proc, "PUT", ESM + "/" + u, {
        "DestinationConfig": {"OnFailure": {"Destination": ""}}})
    assert st == 202 and esm["DestinationConfig"] == {}
    row = overrides_row(postgres, name)
    assert row[1:] == ["10", "0", "[]", ""], row


@pytest.mark.kafka
def test_admin_change_reaches_other_instance_and_survives_restart(kafka, esmd, kafka_config,
                                                                  names, postgres):
    topic = kafka.create_topic(names.topic(), 2)
    cfg = kafka_config(topic, batch_size=7)
    name = cfg["mappings"][0]["name"]
    a = esmd(cfg)
    b = esmd(cfg)
    u = mapping_uuid(name)
    assert the_esm(b)["BatchSize"] == 7

    st, _, esm = call(a, "PUT", ESM + "/" + u, {"BatchSize": 42, "Enabled": False})
    assert st == 202 and esm["BatchSize"] == 42

    def b_sees():
        e = the_esm(b)
        return e["BatchSize"] == 42 and e["State"] == "Disabled"
    wait_for(b_sees, 10, 0.1, "the change on the other instance")
    st, _, nat = call(b, "GET", "/admin/mappings/" + name)
    assert st == 200 and nat["overrides"]["batch_size"] == 42 and nat["enabled"] is False
    assert nat["status"] is not None

    # a restart keeps the override
    a.restart()
    e = the_esm(a)
    assert e["BatchSize"] == 42 and e["State"] == "Disabled"

    # reset through /admin: the file's values come back on both
    st, _, nat = call(b, "DELETE", "/admin/mappings/%s/overrides" % name)
    assert st == 200 and nat["overrides"] is None and nat["batch_size"] == 7, nat
    wait_for(lambda: the_esm(a)["BatchSize"] == 7 and the_esm(a)["State"] == "Enabled", 10, 0.1,
             "the reset on the other instance")
    assert overrides_row(postgres, name) is None


@pytest.mark.kafka
def test_admin_override_dropped_when_the_file_value_changes(kafka, esmd, kafka_config, names,
                                                            postgres, tmp_path):
    topic = kafka.create_topic(names.topic(), 1)
    cfg = kafka_config(topic, batch_size=7, window="1s")
    name = cfg["mappings"][0]["name"]
    proc = esmd(cfg)
    u = mapping_uuid(name)
    st, _, _ = call(proc, "PUT", ESM + "/" + u, {"BatchSize": 42,
                                                 "MaximumBatchingWindowInSeconds": 3})
    assert st == 202
    proc.stop()

    # the file's batch_size changes, its window does not: the window override stays
    cfg["mappings"][0]["batch_size"] = 8
    proc2 = esmd(cfg)
    e = the_esm(proc2)
    assert e["BatchSize"] == 8
    assert e["MaximumBatchingWindowInSeconds"] == 3
    assert overrides_row(postgres, name)[1:3] == ["", "3000"]


@pytest.mark.kafka
def test_admin_pause_resume(kafka, endpoint, esmd, kafka_config, names, postgres):
    topic = kafka.create_topic(names.topic(), 1)
    group = names.group()
    cfg = kafka_config(topic, batch_size=5, group=group)
    name = cfg["mappings"][0]["name"]
    proc = esmd(cfg)

    st, _, lst = call(proc, "GET", "/admin/mappings")
    assert st == 200 and [m["name"] for m in lst["mappings"]] == [name]
    assert lst["mappings"][0]["uuid"] == mapping_uuid(name)

    st, _, nat = call(proc, "POST", "/admin/mappings/%s/pause" % name)
    assert st == 200 and nat["enabled"] is False and nat["state"] == "Disabled", nat
    assert nat["overrides"]["enabled"] is False
    kafka.produce(topic, [{"partition": 0, "value": "x%d" % i} for i in range(5)])
    time.sleep(2.0)
    assert endpoint.record_count() == 0
    st, _, nat = call(proc, "POST", "/admin/mappings/%s/resume" % name)
    assert st == 200 and nat["enabled"] is True
    endpoint.wait_records(5, timeout=30)
    assert overrides_row(postgres, name)[0] == "t"

    assert_error(call(proc, "POST", "/admin/mappings/nosuch/pause"), 404,
                 "ResourceNotFoundException")
    assert_error(call(proc, "POST", "/admin/mappings/%s/jump" % name), 404,
                 "ResourceNotFoundException")
    assert_error(call(proc, "GET", "/admin/mappings/nosuch"), 404, "ResourceNotFoundException")


EIC = "/2019-09-25/functions/fn/event-invoke-config"


@pytest.mark.kafka
def test_admin_bodies_pass_one_strict_check(kafka, esmd, kafka_config, names, postgres):
    """Issue 13, defects 2 and 3: every admin JSON body is checked before use (UTF-8, one JSON
    document and nothing after it, no raw control character, an object) and a NUL in a string
    that esmd stores or compiles is refused naming the field; nothing is stored, and no database
    error text reaches the client."""
    topic = kafka.create_topic(names.topic(), 1)
    cfg = kafka_config(topic)
    name = cfg["mappings"][0]["name"]
    u = mapping_uuid(name)
    proc = esmd(cfg)
    call(proc, "DELETE", EIC)
    bad_bodies = [
        b'{"MaximumRetryAttempts":0}\x00garbage',
        b'{"MaximumRetryAttempts":0} trailing',
        b'{"MaximumRetryAttempts":0}{"MaximumRetryAttempts":1}',
        b'}}]]',
        b'{"MaximumRetryAttempts":0,"x":"a\x01b"}',
        b'{"DestinationConfig":{"OnFailure":{"Destination":"pgqueue://q\xff\xfe"}}}',
        b'{"MaximumRetryAttempts":0,"x":"\xc0\xaf"}',
        b'[]',
    ]
    for body in bad_bodies:
        for method, path in (("PUT", EIC), ("POST", EIC), ("PUT", ESM + "/" + u)):
            st, hdrs, got = call(proc, method, path, raw=body)
            assert_error((st, hdrs, got), 400, "InvalidRequestContentException")
            assert hdrs.get("x-amzn-RequestId"), (method, path, body)
    for method in ("PUT", "POST"):
        st, _, got = call(proc, method, EIC, {"DestinationConfig": {"OnFailure": {
            "Destination": "function://fn\u0000evil"}}})
        assert_error((st, _, got), 400, "InvalidParameterValueException",
                     "DestinationConfig.OnFailure.Destination")
    assert_error(call(proc, "PUT", EIC, {"DestinationConfig": {"OnSuccess": {
        "Destination": "arn:aws:lambda:us-east-1:000000000000:function:fn\u0000x"}}}), 400,
        "InvalidParameterValueException", "DestinationConfig.OnSuccess.Destination")
    assert_error(call(proc, "GET", EIC), 404, "ResourceNotFoundException")
    assert postgres.sql("SELECT count(*) FROM esmd.event_invoke_config "
                        "WHERE function_name = 'fn'") == [["0"]]

    pattern = json.dumps({"value": {"type": ["a"]}})
    assert_error(call(proc, "PUT", ESM + "/" + u, {"FilterCriteria": {"Filters": [
        {"Pattern": "{}"}, {"Pattern": pattern + "\u0000junk"}]}}), 400,
        "InvalidParameterValueException", "FilterCriteria.Filters[1].Pattern")
    assert_error(call(proc, "PUT", ESM + "/" + u, {"DestinationConfig": {"OnFailure": {
        "Destination": "pgqueue://admin_failed\u0000evil"}}}), 400,
        "InvalidParameterValueException", "DestinationConfig.OnFailure.Destination")
    assert_error(call(proc, "POST", "/admin/filter/test", {
        "pattern": {"value": ["a\u0000b"]}, "event": {"value": "a"}}), 400,
        "InvalidParameterValueException", "pattern.value[0]")
    assert_error(call(proc, "POST", "/admin/filter/test", {
        "patterns": ["{}", pattern + "\u0000junk"], "event": {"value": "a"}}), 400,
        "InvalidParameterValueException", "patterns[1]")
    assert_error(call(proc, "POST", "/admin/filter/test", raw=b'{"pattern":{}} x'), 400,
                 "InvalidRequestContentException")
    # a NUL in an event is data, not a stored value
    st, _, got = call(proc, "POST", "/admin/filter/test", {
        "pattern": {"value": [{"prefix": "a"}]}, "event": {"value": "a\u0000b"}})
    assert st == 200 and got["match"] is True, got
    assert overrides_row(postgres, name) is None
    assert "FilterCriteria" not in the_esm(proc)


@pytest.mark.kafka
def test_admin_routes_on_the_raw_path(kafka, esmd, kafka_config, names, postgres):
    """Issue 13, defect 4: an encoded NUL or '/' inside a path segment is a 400, never another
    resource (MHD decodes %00 into the end of the path and %2F into a separator)."""
    topic = kafka.create_topic(names.topic(), 1)
    cfg = kafka_config(topic)
    name = cfg["mappings"][0]["name"]
    proc = esmd(cfg)
    call(proc, "DELETE", EIC)
    for method, path, body in (
            ("POST", "/admin/mappings/%s/pause%%00x" % name, None),
            ("POST", "/admin/mappings/%s%%2Fpause" % name, None),
            ("POST", "/admin/mappings/%s%%2fpause" % name, None),
            ("DELETE", "/admin/mappings/%s/overrides%%00" % name, None),
            ("PUT", EIC + "%00x", {"MaximumRetryAttempts": 0}),
            ("PUT", "/2019-09-25/functions/fn%2Fevent-invoke-config", {"MaximumRetryAttempts": 0}),
            ("PUT", ESM + "/" + mapping_uuid(name) + "%00", {"Enabled": False}),
            ("POST", "/2015-03-31/functions/fn%2Finvocations", {}),
            ("GET", "/admin/mappings%%2F%s" % name, None)):
        st, hdrs, got = call(proc, method, path, body)
        assert_error((st, hdrs, got), 400, "InvalidParameterValueException", "encoded")
    assert the_esm(proc)["State"] == "Enabled"
    assert overrides_row(postgres, name) is None
    assert_error(call(proc, "GET", EIC), 404, "ResourceNotFoundException")
    # encoded characters that are not '/' or NUL are decoded as before
    st, _, nat = call(proc, "GET", "/admin/mappings/%s" % name.replace("-", "%2D"))
    assert st == 200 and nat["name"] == name, nat
    st, _, got = call(proc, "GET", "/2019-09-25/functions/"
                      "arn%3Aaws%3Alambda%3Aus-east-1%3A000000000000%3Afunction%3Afn"
                      "/event-invoke-config")
    assert st == 404 and "doesn't have an EventInvokeConfig" in got["Message"], got


def test_admin_yaml_disabled_mapping_can_be_enabled(esmd, kafka, kafka_config, endpoint, names):
    topic = kafka.create_topic(names.topic(), 1)
    cfg = kafka_config(topic, mapping_extra={"enabled": False})
    name = cfg["mappings"][0]["name"]
    proc = esmd(cfg)
    kafka.produce(topic, [{"partition": 0, "value": "v%d" % i} for i in range(3)])
    assert the_esm(proc)["State"] == "Disabled"
    time.sleep(1.5)
    assert endpoint.record_count() == 0
    st, _, esm = call(proc, "PUT", ESM + "/" + mapping_uuid(name), {"Enabled": True})
    assert st == 202 and esm["State"] == "Enabled"
    endpoint.wait_records(3, timeout=30)


def test_disabled_kafka_mapping_reads_nothing_until_enabled(esmd, kafka, kafka_config, endpoint,
                                                            names):
    """A mapping disabled in its configuration pauses each partition as it is assigned, so the
    consumer fetches nothing: before, the pause asked for while the partition was being opened
    was dropped (the connector did not know the shard yet) and the whole topic was read into
    esmd's memory, waiting for a batch that a disabled mapping never forms."""
    total = 3000
    topic = kafka.create_topic(names.topic(), 2)
    kafka.produce(topic, [{"partition": i % 2, "value": "v%d" % i} for i in range(total)])
    cfg = kafka_config(topic, mapping_extra={"enabled": False})
    name = cfg["mappings"][0]["name"]
    proc = esmd(cfg)

    def status():
        st, _, nat = call(proc, "GET", "/admin/mappings/" + name)
        assert st == 200, nat
        return nat["status"]

    wait_for(lambda: status()["shards"] == 2, 60, 0.2, "both partitions assigned")
    time.sleep(2.0)  # what librdkafka fetches would have arrived by now
    assert proc.metrics().get("esmd_polled_events_total") == 0
    assert status()["pending_records"] == 0
    assert endpoint.record_count() == 0
    st, _, esm = call(proc, "PUT", ESM + "/" + mapping_uuid(name), {"Enabled": True})
    assert st == 202 and esm["State"] == "Enabled"
    endpoint.wait_records(total, timeout=60)
    offsets = endpoint.offsets()
    assert sorted(offsets) == [0, 1]
    for p in (0, 1):
        assert offsets[p] == list(range(total // 2)), p


def test_admin_filter_dry_run(esmd, kafka, kafka_config, names):
    cfg = kafka_config(names.topic(), mapping_extra={"filters": [{"value": {"n": [300]}}]})
    name = cfg["mappings"][0]["name"]
    proc = esmd(cfg)
    t = "/admin/filter/test"

    st, _, r = call(proc, "POST", t, {"pattern": {"a": ["x"]}, "event": {"a": "x"}})
    assert st == 200 and r == {"match": True, "matching_patterns": [0]}
    st, _, r = call(proc, "POST", t, {"pattern": '{"a": ["x"]}', "event": {"a": "y"}})
    assert st == 200 and r["match"] is False
    st, _, r = call(proc, "POST", t, {"patterns": [{"a": ["y"]}, '{"a": [{"prefix": "x"}]}',
                                                   {"b": [{"exists": False}]}],
                                      "event": '{"a": "xyz"}'})
    assert st == 200 and r == {"match": True, "matching_patterns": [1, 2]}
    # numbers compare by value, as a mapping's filters (docs/filters.md)
    st, _, r = call(proc, "POST", t, raw=b'{"pattern": {"n": [300]}, "event": {"n": 3.0e2}}')
    assert st == 200 and r["match"] is True
    st, _, r = call(proc, "POST", t, raw=b'{"mapping": "%s", "event": {"value": {"n": 300}}}'
                    % name.encode())
    assert st == 200 and r["match"] is True

    # invalid patterns: 400 with the reason and the position
    st, hdrs, r = call(proc, "POST", t, raw=b'{"pattern": {"a": [{"prefx": "x"}]}, "event": {}}')
    assert st == 400 and hdrs["x-amzn-ErrorType"] == "InvalidParameterValueException"
    assert "prefx" in r["Message"] and r["pattern"] == 0 and r["line"] == 1, r
    assert r["body_offset"] == r["offset"] + len(b'{"pattern": ')
    st, _, r = call(proc, "POST", t, {"patterns": [{"a": ["x"]}, '{"a": '], "event": {}})
    assert st == 400 and r["pattern"] == 1 and "patterns[1]" in r["Message"], r
    assert_error(call(proc, "POST", t, {"event": {}}), 400, "InvalidParameterValueException")
    assert_error(call(proc, "POST", t, {"pattern": {"a": ["x"]}}), 400,
                 "InvalidParameterValueException", "event")
    assert_error(call(proc, "POST", t, {"pattern": {"a": ["x"]}, "event": [1]}), 400,
                 "InvalidParameterValueException", "event")
    assert_error(call(proc, "POST", t, {"pattern": 5, "event": {}}), 400,
                 "InvalidParameterValueException", "pattern")
    assert_error(call(proc, "POST", t, {"pattern": {}, "event": {}, "x": 1}), 400,
                 "InvalidParameterValueException", "unknown field")
    assert_error(call(proc, "POST", t, raw=b"nope"), 400, "InvalidRequestContentException")
    assert_error(call(proc, "POST", t, {"mapping": "nosuch", "event": {}}), 404,
                 "ResourceNotFoundException")


def test_admin_routes_need_credentials_when_a_token_is_set(esmd, kafka, kafka_config, names):
    cfg = kafka_config(names.topic())
    cfg["admin"] = {"token": "s3cret"}
    proc = esmd(cfg)
    for method, path in (("GET", ESM + "/"), ("GET", "/admin/mappings"),
                         ("POST", "/admin/filter/test")):
        st, hdrs, _ = call(proc, method, path, {})
        assert st in (401, 403), (method, path, st)
        st, _, _ = call(proc, method, path, {"pattern": {}, "event": {}},
                        headers={"Authorization": "Bearer s3cret"})
        assert st == 200, (method, path, st)
    assert proc.get("/healthz")[0] == 200


def aws_cli():
    exe = shutil.which("aws")
    if not exe:
        return None
    try:
        r = subprocess.run([exe, "--version"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return exe if r.returncode == 0 else None


@pytest.mark.skipif(aws_cli() is None, reason="the AWS CLI is not installed")
def test_admin_aws_cli(esmd, kafka, kafka_config, names, tmp_path):
    cfg = kafka_config(names.topic(), batch_size=9)
    cfg["admin"] = {"aws_credentials": {"access_key_id": "esmd-test",
                                        "secret_access_key": "esmd-test-secret"}}
    name = cfg["mappings"][0]["name"]
    proc = esmd(cfg)
    env = dict(os.environ, AWS_ACCESS_KEY_ID="esmd-test", AWS_SECRET_ACCESS_KEY="esmd-test-secret",
               AWS_DEFAULT_REGION="us-east-1", AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_PAGER="")
    env.pop("AWS_PROFILE", None)

    def aws(*args):
        r = subprocess.run([aws_cli(), "lambda"] + list(args) +
                           ["--endpoint-url", proc.admin, "--output", "json"],
                           capture_output=True, env=env, timeout=60)
        return r.returncode, r.stdout.decode(), r.stderr.decode()

    rc, out, err = aws("list-event-source-mappings", "--function-name", "fn")
    assert rc == 0, err
    esms = json.loads(out)["EventSourceMappings"]
    assert [e["UUID"] for e in esms] == [mapping_uuid(name)]
    u = esms[0]["UUID"]
    rc, out, err = aws("get-event-source-mapping", "--uuid", u)
    assert rc == 0, err
    assert json.loads(out)["BatchSize"] == 9
    rc, out, err = aws("update-event-source-mapping", "--uuid", u, "--batch-size", "25",
                       "--filter-criteria", json.dumps({"Filters": [
                           {"Pattern": json.dumps({"value": {"t": ["x"]}})}]}),
                       "--no-enabled")
    assert rc == 0, err
    got = json.loads(out)
    assert got["BatchSize"] == 25 and got["State"] == "Disabled"
    rc, out, err = aws("get-event-source-mapping", "--uuid", "00000000-0000-0000-0000-000000000000")
    assert rc != 0 and "ResourceNotFoundException" in err, err
    rc, out, err = aws("update-event-source-mapping", "--uuid", u, "--filter-criteria",
                       json.dumps({"Filters": [{"Pattern": '{"a": [{"prefx": 1}]}'}]}))
    assert rc != 0 and "InvalidParameterValueException" in err, err

    # a wrong secret is refused
    env["AWS_SECRET_ACCESS_KEY"] = "wrong"
    rc, out, err = aws("get-event-source-mapping", "--uuid", u)
    assert rc != 0


def test_admin_dead_letter_routes_check_bodies_and_paths(esmd, postgres, db, endpoint):  # noqa: F811
    """Issue 13, defects 2-4 on /admin/dead-letters: a NUL in the function of a redrive, an
    encoded '/' or NUL in the path, and a queue message that is not JSON are refused without
    moving anything, and no database error text reaches the client."""
    from test_admin_dead_letters import DL, call as dl_call, dead_lettered, failing
    from test_async_e2e import FAST, config as async_config, queue_len

    endpoint.behaviour = failing
    proc = esmd(async_config(db, endpoint, {"maximum_retry_attempts": 0,
                                            "dead_letter": "pgqueue://fn_dlq"}), env=FAST)
    dead_lettered(proc, endpoint, [{"n": 1}])
    assert_error(dl_call(proc, "POST", DL + "/fn_dlq/redrive", {"function": "fn\u0000x"}), 400,
                 "InvalidParameterValueException", "function must not contain a NUL")
    for path in (DL + "/fn_dlq%2Fredrive", DL + "/fn_dlq/redrive%00x", DL + "%2Ffn_dlq/redrive"):
        assert_error(dl_call(proc, "POST", path, {"function": "fn"}), 400,
                     "InvalidParameterValueException", "encoded")
    assert_error(dl_call(proc, "POST", DL + "/fn_dlq/redrive", raw=b'{"function":"fn"} x'), 400,
                 "InvalidRequestContentException")
    postgres.sql("SELECT esmd.send('fn_dlq', 'not json')", db[1])
    st, hdrs, body = dl_call(proc, "POST", DL + "/fn_dlq/redrive", {"function": "fn"})
    assert_error((st, hdrs, body), 400, "InvalidParameterValueException", "not a JSON event")
    assert "invalid input syntax" not in body["Message"] and "ERROR" not in body["Message"], body
    assert len(dl_call(proc, "GET", DL + "/fn_dlq")[2]["messages"]) == 2
    assert queue_len(postgres, db) == 0


@pytest.mark.kafka
def test_admin_shows_the_schema_registry_config(kafka, esmd, kafka_config, names):
    """A Kafka mapping's schema_registry as Lambda's SchemaRegistryConfig (docs/admin.md): the
    URL without its user:password@, no password anywhere; Update refuses to change it. The topic
    stays empty, so the registry is never asked for a schema."""
    topic = kafka.create_topic(names.topic(), 1)
    cfg = kafka_config(topic)
    cfg["mappings"][0]["source"]["schema_registry"] = {
        "url": "http://reg:s3cret-pw@127.0.0.1:9/apis/ccompat/v7",
        "username": "esmd", "password": "s3cret-pw",
        "ca_file": "/etc/esmd/ca.pem", "cert_file": "/etc/esmd/c.pem", "key_file": "/etc/esmd/k.pem",
        "event_record_format": "SOURCE", "validate": ["key", "value"],
    }
    proc = esmd(cfg)
    st, _, raw = call(proc, "GET", ESM + "/")
    assert st == 200
    assert "s3cret-pw" not in json.dumps(raw)
    esm = raw["EventSourceMappings"][0]
    assert esm["SelfManagedKafkaEventSourceConfig"]["SchemaRegistryConfig"] == {
        "SchemaRegistryURI": "http://127.0.0.1:9/apis/ccompat/v7",
        "EventRecordFormat": "SOURCE",
        "AccessConfigs": [{"Type": "BASIC_AUTH"},
                          {"Type": "CLIENT_CERTIFICATE_TLS_AUTH", "URI": "/etc/esmd/c.pem"},
                          {"Type": "SERVER_ROOT_CA_CERT", "URI": "/etc/esmd/ca.pem"}],
        "SchemaValidationConfigs": [{"Attribute": "KEY"}, {"Attribute": "VALUE"}],
    }
    st, _, err = call(proc, "PUT", ESM + "/" + esm["UUID"],
                      {"SelfManagedKafkaEventSourceConfig": {"SchemaRegistryConfig": {}}})
    assert st == 400 and "cannot be changed at run time" in json.dumps(err), err
    # a mapping without a registry has none
    cfg2 = kafka_config(kafka.create_topic(names.topic(), 1))
    proc2 = esmd(cfg2)
    assert "SchemaRegistryConfig" not in \
        the_esm(proc2)["SelfManagedKafkaEventSourceConfig"]
