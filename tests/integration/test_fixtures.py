"""The harness itself: every server fixture comes up, answers, and (Postgres) restarts."""

import socket

import requests

from endpoint import Response


def test_postgres_answers_and_restarts(postgres):
    assert postgres.sql("SELECT 1") == [["1"]]
    assert postgres.url.startswith("postgresql://postgres@127.0.0.1:")
    postgres.stop()
    postgres.start()
    assert postgres.sql("SELECT current_database()") == [["esmd"]]


def test_redis_answers(redis):
    assert redis.command("PING") == "PONG"
    assert redis.command("SET", "k", "v") == "OK"
    assert redis.command("GET", "k") == "v"


def test_kafka_mock_topic_produce_watermarks(kafka, names):
    topic = kafka.create_topic(names.topic(), 2)
    assert kafka.produce(topic, [{"partition": 0, "key": "a", "value": "x"},
                                 {"partition": 1, "value": "y"}]) == 2
    assert kafka.produce(topic, count=4, size=10, partitions=2, keyed=True) == 4
    assert kafka.watermarks(topic) == {0: 3, 1: 3}
    assert kafka.committed(names.group(), topic) == {0: -1, 1: -1}
    host, port = kafka.bootstrap.split(",")[0].rsplit(":", 1)
    socket.create_connection((host, int(port)), timeout=5).close()


def test_endpoint_records_and_scripts(endpoint):
    endpoint.script([Response(500)])
    s = requests.Session()  # keep-alive: both requests on one connection
    r1 = s.post(endpoint.url, json={"a": 1}, headers={"X-Esmd-Request-Id": "r1"})
    r2 = s.post(endpoint.url, json={"a": 2})
    assert (r1.status_code, r2.status_code) == (500, 200)
    assert r2.json() == {}
    reqs = endpoint.snapshot()
    assert [r.json for r in reqs] == [{"a": 1}, {"a": 2}]
    assert reqs[0].request_id == "r1" and not reqs[0].ok and reqs[1].ok
    assert endpoint.max_concurrent == 1
    assert requests.get(endpoint.base + "/stats").json()["requests"] == 2
