"""The AWS SDK for Python (boto3, from PyPI: tests/requirements.txt) against esmd's admin
listener, unchanged: every Lambda operation esmd supports (docs/admin.md, docs/async.md), signed
with SigV4, with the request id the SDK reports (`ResponseMetadata.RequestId`) and the error
classes it raises. boto3 is the judge: where it and esmd disagree, esmd changes."""

import io
import json
import uuid

import boto3
import botocore.config
import botocore.exceptions
import pytest
import requests
import yaml

AKID = "esmd-sdk"
SECRET = "sdk/secret+KEY"


def client(proc):
    return boto3.client(
        "lambda", endpoint_url=proc.admin, region_name="us-east-1", aws_access_key_id=AKID,
        aws_secret_access_key=SECRET,
        config=botocore.config.Config(retries={"max_attempts": 1, "mode": "standard"},
                                      connect_timeout=5, read_timeout=30))


def assert_request_id(resp):
    """The id the SDK read from x-amzn-RequestId: present and a UUID."""
    rid = resp["ResponseMetadata"].get("RequestId")
    assert rid, "the SDK reports no request id: %s" % resp["ResponseMetadata"]
    uuid.UUID(rid)
    assert resp["ResponseMetadata"]["HTTPHeaders"].get("x-amzn-requestid") == rid
    return rid


def expect_error(call, code, status):
    with pytest.raises(botocore.exceptions.ClientError) as ei:
        call()
    err = ei.value.response
    assert err["Error"]["Code"] == code, err
    assert err["ResponseMetadata"]["HTTPStatusCode"] == status, err
    assert_request_id(err)
    return err


@pytest.fixture
def lam(esmd, kafka, kafka_config, names):
    """A running esmd with one Kafka mapping (batch size 7) and the boto3 Lambda client."""
    cfg = kafka_config(kafka.create_topic(names.topic(), 1), batch_size=7)
    cfg["admin"] = {"aws_credentials": {"access_key_id": AKID, "secret_access_key": SECRET}}
    cfg["functions"]["fn"]["async"] = {"maximum_retry_attempts": 0}
    proc = esmd(cfg)
    return client(proc), proc, cfg["mappings"][0]["name"]


@pytest.mark.kafka
def test_boto3_event_source_mapping_operations(lam):
    c, _, _ = lam
    listed = c.list_event_source_mappings(FunctionName="fn")
    assert_request_id(listed)
    esms = listed["EventSourceMappings"]
    assert len(esms) == 1 and esms[0]["BatchSize"] == 7
    u = esms[0]["UUID"]

    got = c.get_event_source_mapping(UUID=u)
    assert_request_id(got)
    assert got["UUID"] == u and got["State"] == "Enabled"
    assert got["FunctionArn"].endswith(":function:fn")

    pattern = json.dumps({"value": {"type": ["paid"]}})
    upd = c.update_event_source_mapping(UUID=u, BatchSize=25, Enabled=False,
                                        FilterCriteria={"Filters": [{"Pattern": pattern}]})
    assert_request_id(upd)
    assert upd["BatchSize"] == 25 and upd["State"] in ("Disabled", "Disabling")
    assert upd["FilterCriteria"]["Filters"][0]["Pattern"] == pattern
    assert c.get_event_source_mapping(UUID=u)["BatchSize"] == 25

    # the paginator drives the same route with Marker/MaxItems
    pages = list(c.get_paginator("list_event_source_mappings").paginate(FunctionName="fn"))
    assert [e["UUID"] for p in pages for e in p["EventSourceMappings"]] == [u]

    expect_error(lambda: c.get_event_source_mapping(UUID=str(uuid.uuid4())),
                 "ResourceNotFoundException", 404)
    expect_error(lambda: c.update_event_source_mapping(
        UUID=u, FilterCriteria={"Filters": [{"Pattern": '{"a": [{"prefx": 1}]}'}]}),
        "InvalidParameterValueException", 400)
    # the SDK's modelled exception classes match esmd's error types
    with pytest.raises(c.exceptions.ResourceNotFoundException):
        c.get_event_source_mapping(UUID=str(uuid.uuid4()))


@pytest.mark.kafka
def test_boto3_parallelization_factor(lam, kafka, endpoint):
    """ParallelizationFactor through the SDK: shown, changed at run time (the partition is
    re-laned once drained, docs/design.md#lanes), range-checked; with 4 lanes one partition has
    several batches in flight and each key's records arrive in offset order."""
    c, proc, _ = lam
    u = c.list_event_source_mappings(FunctionName="fn")["EventSourceMappings"][0]["UUID"]
    assert c.get_event_source_mapping(UUID=u)["ParallelizationFactor"] == 1
    upd = c.update_event_source_mapping(UUID=u, ParallelizationFactor=4)
    assert_request_id(upd)
    assert upd["ParallelizationFactor"] == 4
    assert c.get_event_source_mapping(UUID=u)["ParallelizationFactor"] == 4
    err = expect_error(lambda: c.update_event_source_mapping(UUID=u, ParallelizationFactor=11),
                       "InvalidParameterValueException", 400)
    assert "ParallelizationFactor" in err["Error"]["Message"]
    assert c.get_event_source_mapping(UUID=u)["ParallelizationFactor"] == 4

    topic = yaml.safe_load(open(proc.config_path))["mappings"][0]["source"]["topics"][0]
    endpoint.delay(0.2)
    kafka.produce(topic, [{"partition": 0, "key": "k%d" % (i % 8), "value": str(i)}
                              for i in range(56)])
    endpoint.wait_for(lambda: endpoint.record_count() >= 56, 60, "every record delivered")
    assert endpoint.max_concurrent > 1, endpoint.max_concurrent
    per_key = {}
    for _, _, rec in endpoint.records():
        per_key.setdefault(rec["key"], []).append(rec["offset"])
    for k, offs in per_key.items():
        assert offs == sorted(offs), (k, offs)


@pytest.mark.kafka
def test_boto3_event_invoke_config_operations(lam):
    c, _, _ = lam
    put = c.put_function_event_invoke_config(FunctionName="fn", MaximumRetryAttempts=1,
                                             MaximumEventAgeInSeconds=120)
    assert_request_id(put)
    assert put["MaximumRetryAttempts"] == 1 and put["MaximumEventAgeInSeconds"] == 120
    got = c.get_function_event_invoke_config(FunctionName="fn")
    assert_request_id(got)
    assert got["MaximumRetryAttempts"] == 1
    upd = c.update_function_event_invoke_config(FunctionName="fn", MaximumRetryAttempts=2)
    assert_request_id(upd)
    assert upd["MaximumRetryAttempts"] == 2 and upd["MaximumEventAgeInSeconds"] == 120
    listed = c.list_function_event_invoke_configs(FunctionName="fn")
    assert_request_id(listed)
    assert [x["MaximumRetryAttempts"] for x in listed["FunctionEventInvokeConfigs"]] == [2]
    expect_error(lambda: c.put_function_event_invoke_config(FunctionName="fn",
                                                            MaximumRetryAttempts=3),
                 "InvalidParameterValueException", 400)
    expect_error(lambda: c.get_function_event_invoke_config(FunctionName="nosuch"),
                 "ResourceNotFoundException", 404)
    deleted = c.delete_function_event_invoke_config(FunctionName="fn")
    assert_request_id(deleted)
    assert deleted["ResponseMetadata"]["HTTPStatusCode"] == 204


@pytest.mark.kafka
def test_boto3_invoke(lam, endpoint):
    c, _, _ = lam
    ev = c.invoke(FunctionName="fn", InvocationType="Event", Payload=b'{"n": 1}')
    rid = assert_request_id(ev)
    assert ev["StatusCode"] == 202
    dry = c.invoke(FunctionName="fn", InvocationType="DryRun", Payload=b"{}")
    assert_request_id(dry)
    assert dry["StatusCode"] == 204
    sync = c.invoke(FunctionName="fn", InvocationType="RequestResponse", Payload=b'{"n": 2}')
    assert_request_id(sync)
    assert sync["StatusCode"] == 200
    assert json.load(io.BytesIO(sync["Payload"].read())) == {}
    expect_error(lambda: c.invoke(FunctionName="nosuch", InvocationType="Event", Payload=b"{}"),
                 "ResourceNotFoundException", 404)
    # over Lambda's 1 MB limit for an event invocation: 413 with a request id
    err = expect_error(lambda: c.invoke(FunctionName="fn", InvocationType="Event",
                                        Payload=b'"' + b"x" * (1024 * 1024 + 10) + b'"'),
                       "RequestTooLargeException", 413)
    assert err["ResponseMetadata"]["RequestId"] != rid


@pytest.mark.kafka
def test_every_admin_answer_carries_a_request_id(lam):
    """Unsigned, unauthorised and native routes too: one x-amzn-RequestId per answer."""
    _, proc, name = lam
    seen = set()
    for method, path in (("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/metrics"),
                         ("GET", "/2015-03-31/event-source-mappings/"),  # unsigned: refused
                         ("GET", "/admin/mappings"), ("GET", "/admin/mappings/" + name),
                         ("GET", "/nosuch")):
        r = requests.request(method, proc.admin + path, timeout=10)
        rid = r.headers.get("x-amzn-RequestId")
        assert rid, "%s %s (%d) has no x-amzn-RequestId" % (method, path, r.status_code)
        uuid.UUID(rid)
        seen.add(rid)
    assert len(seen) == 7, "request ids are not unique: %s" % seen
