"""Filters on a Kafka mapping, end to end: only matching records reach the function, and the
offsets of the records filtered out are committed all the same (README "Filtering")."""

import base64
import json
import time

import pytest

from test_kafka_e2e import wait_committed


def delivered_values(endpoint):
    """{partition: [decoded value bytes, in arrival order]} over the successful requests."""
    out = {}
    for _, _, rec in endpoint.records():
        v = rec["value"]
        out.setdefault(rec["partition"], []).append(
            None if v is None else base64.b64decode(v))
    return out


@pytest.mark.kafka
def test_only_matching_records_are_sent_and_all_are_committed(kafka, endpoint, esmd,
                                                              kafka_config, names):
    topic = kafka.create_topic(names.topic(), 2)
    group = names.group()
    records = []
    for i in range(40):
        kind = "keep" if i % 4 == 0 else "drop"
        records.append({"partition": 0, "key": "k%d" % i,
                        "value": json.dumps({"type": kind, "i": i, "amount": i * 10})})
    # partition 1: the numeric condition of the second pattern, and nothing else
    for i in range(10):
        records.append({"partition": 1, "value": json.dumps({"type": "other", "amount": i * 100})})
    kafka.produce(topic, records)
    cfg = kafka_config(topic, batch_size=7, window="50ms", group=group, mapping_extra={
        "filters": [{"value": {"type": ["keep"]}},
                    {"value": {"amount": [{"numeric": [">", 500]}]}, "partition": [1]}]})
    proc = esmd(cfg)

    wait_committed(kafka, group, topic, {0: 40, 1: 10})
    time.sleep(0.3)
    got = delivered_values(endpoint)
    assert [json.loads(v)["i"] for v in got[0]] == list(range(0, 40, 4))
    assert [json.loads(v)["amount"] for v in got[1]] == [600, 700, 800, 900]
    assert proc.metrics().get("esmd_filtered_out_events_total") == 50 - 10 - 4
    assert proc.metrics().get("esmd_polled_events_total") == 50


@pytest.mark.kafka
def test_batch_entirely_filtered_out_invokes_nothing_and_is_committed(kafka, endpoint, esmd,
                                                                      kafka_config, names):
    topic = kafka.create_topic(names.topic(), 1)
    group = names.group()
    kafka.produce(topic, [{"partition": 0, "value": json.dumps({"type": "drop", "i": i})}
                          for i in range(25)])
    proc = esmd(kafka_config(topic, batch_size=10, window="50ms", group=group,
                             mapping_extra={"filters": [{"value": {"type": ["keep"]}}]}))
    wait_committed(kafka, group, topic, {0: 25})
    time.sleep(0.5)
    assert endpoint.snapshot() == [], "a filtered-out batch was sent"
    assert proc.metrics().get("esmd_filtered_out_events_total") == 25

    # records that match later still flow, after the dropped ones
    kafka.produce(topic, [{"partition": 0, "value": json.dumps({"type": "keep", "i": 99})}])
    endpoint.wait_records(1, timeout=30)
    assert [json.loads(v)["i"] for v in delivered_values(endpoint)[0]] == [99]
    wait_committed(kafka, group, topic, {0: 26})


@pytest.mark.kafka
def test_values_that_do_not_fit_the_pattern_fall_back_to_metadata(kafka, endpoint, esmd,
                                                                  kafka_config, names):
    """Lambda's Kafka rule (docs/lambda.md#kafka-filtering): when the value and a pattern's value
    condition disagree (object pattern on text, value-list pattern on an object, bytes that are
    not UTF-8), only the pattern's other conditions apply."""
    topic = kafka.create_topic(names.topic(), 1)
    group = names.group()
    kafka.produce(topic, [
        {"partition": 0, "value": json.dumps({"type": "drop"})},  # 0: A no; B metadata: no
        {"partition": 0, "value": "plain text"},  # 1: A's metadata (offset <= 3): yes
        {"partition": 0, "value_b64": base64.b64encode(b"\xff\xfe").decode()},  # 2: same
        {"partition": 0, "value": json.dumps({"type": "keep"})},  # 3: A as written: yes
        {"partition": 0, "value": "ping-42"},  # 4: B as written (text, prefix): yes
        {"partition": 0, "value": "pong"},  # 5: A metadata no (offset), B prefix no
        {"partition": 0, "value": json.dumps({"type": "other"})},  # 6: B's metadata: yes
    ])
    proc = esmd(kafka_config(topic, batch_size=10, window="50ms", group=group, mapping_extra={
        "filters": [{"value": {"type": ["keep"]}, "offset": [{"numeric": ["<=", 3]}]},
                    {"value": [{"prefix": "ping-"}], "offset": [{"numeric": [">", 3]}]}]}))
    wait_committed(kafka, group, topic, {0: 7})
    time.sleep(0.3)
    assert [rec["offset"] for _, _, rec in endpoint.records()] == [1, 2, 3, 4, 6]
    assert proc.metrics().get("esmd_filtered_out_events_total") == 2


@pytest.mark.kafka
def test_filters_on_key_headers_and_metadata(kafka, endpoint, esmd, kafka_config, names):
    topic = kafka.create_topic(names.topic(), 1)
    group = names.group()
    kafka.produce(topic, [
        {"partition": 0, "key": "eu-1", "value": "{}", "headers": [["source", "web"]]},
        {"partition": 0, "key": "us-1", "value": "{}", "headers": [["source", "web"]]},
        {"partition": 0, "key": "eu-2", "value": "{}", "headers": [["source", "batch"]]},
        {"partition": 0, "key": json.dumps({"region": "eu"}), "value": "{}"},
    ])
    esmd(kafka_config(topic, batch_size=10, window="50ms", group=group, mapping_extra={
        "filters": [{"key": [{"prefix": "eu-"}], "headers": {"source": ["web"]}},
                    {"key": {"region": ["eu"]}, "offset": [{"numeric": [">=", 3]}]}]}))
    wait_committed(kafka, group, topic, {0: 4})
    time.sleep(0.3)
    assert [rec["offset"] for _, _, rec in endpoint.records()] == [0, 3]


def test_invalid_pattern_is_refused_at_load(tmp_path):
    import subprocess
    import servers
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("""postgres: postgresql://localhost/esmd
connections:
  k: { type: kafka, bootstrap_servers: "localhost:9092" }
functions:
  f: { url: "http://localhost:8080/" }
mappings:
  - name: m
    function: f
    source: { kafka: k, topics: [t] }
    filters:
      - value: { id: [{ prefx: a }] }
      - value: { n: [{ numeric: [">", "ten"] }] }
""")
    r = subprocess.run([servers.binary("esmd"), "check-config", str(cfg)], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 1
    lines = [l for l in r.stderr.splitlines() if "filters[" in l]
    assert len(lines) == 2, r.stderr
    assert lines[0].startswith("%s:11:9: mappings[0].filters[0]: " % cfg), lines[0]
    assert "prefx" in lines[0] and "not a valid filter pattern" in lines[0]
    assert lines[1].startswith("%s:12:9: mappings[0].filters[1]: " % cfg), lines[1]
    assert "numeric" in lines[1]
