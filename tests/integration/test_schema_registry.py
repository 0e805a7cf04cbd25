"""The schema registry path end to end (docs/kafka.md, "Schema registry"): records written by
the confluent-kafka client's real AvroSerializer, JSONSerializer and ProtobufSerializer, which
register their schemas over HTTP, produced to the real Kafka broker, consumed and decoded by
esmd, which fetches the schemas over HTTP from the same registry.

The registry is tests/integration/schema_registry.py, a stand-in speaking Confluent's REST API:
no real registry can run here (its docstring says what was tried).

    each format, JSON and SOURCE   Avro (key and value) and JSON Schema: the event's key/value
                                   base64 contents and keySchemaMetadata/valueSchemaMetadata
    evolution and failures         two versions of a schema on one topic; an unknown schema id,
                                   a corrupt record and a Protobuf record among good ones go to
                                   the on-failure destination (SCHEMA_NOT_FOUND,
                                   DESERIALIZATION_ERROR; an HTTP one, then a redis:// stream)
                                   with their original bytes, the good ones are delivered in
                                   order
    registry stopped mid-run       the partition waits (/readyz 503 naming the registry; paused
                                   once 1,000 records wait), nothing goes to on-failure,
                                   everything is delivered once it is back
    a new schema id                its records wait without pausing the partition
    filters                        on a decoded Avro field
    one fetch per id               4 partitions, 3 ids, 3,000 records: 3 fetches
"""

import base64
import json
import struct

import pytest

import servers
from endpoint import Endpoint
from schema_registry import Registry
from servers import wait_for

sr = pytest.importorskip("confluent_kafka.schema_registry")
from confluent_kafka import Producer  # noqa: E402
from confluent_kafka.schema_registry import SchemaRegistryClient  # noqa: E402
from confluent_kafka.schema_registry.avro import AvroSerializer  # noqa: E402
from confluent_kafka.schema_registry.json_schema import JSONSerializer  # noqa: E402
from confluent_kafka.schema_registry.protobuf import ProtobufSerializer  # noqa: E402
from confluent_kafka.serialization import MessageField, SerializationContext  # noqa: E402

pytestmark = pytest.mark.kafka

ORDER_V1 = {"type": "record", "name": "Order", "namespace": "shop", "fields": [
    {"name": "id", "type": "long"},
    {"name": "status", "type": {"type": "enum", "name": "Status",
                                "symbols": ["NEW", "PAID", "SHIPPED"]}},
    {"name": "customer", "type": "string"},
    {"name": "total", "type": "double"},
    {"name": "note", "type": ["null", "string"], "default": None}]}
ORDER_V2 = json.loads(json.dumps(ORDER_V1))
ORDER_V2["fields"].append({"name": "channel", "type": "string", "default": "web"})
ORDER_KEY = {"type": "record", "name": "OrderKey", "namespace": "shop",
             "fields": [{"name": "id", "type": "long"}]}
ORDER_JSON_SCHEMA = {"$schema": "http://json-schema.org/draft-07/schema#", "title": "Order",
                     "type": "object", "properties": {
                         "id": {"type": "integer"}, "status": {"type": "string"},
                         "customer": {"type": "string"}, "total": {"type": "number"}},
                     "required": ["id", "status"]}


def order(i, v2=False):
    o = {"id": i, "status": ("NEW", "PAID", "SHIPPED")[i % 3], "customer": "c%d é" % i,
         "total": i + 0.25, "note": None if i % 2 else "n%d" % i}
    if v2:
        o["channel"] = "shop-%d" % i
    return o


# ---- fixtures and helpers -------------------------------------------------------------------


@pytest.fixture
def registry():
    r = Registry()
    yield r
    r.close()


@pytest.fixture
def dest():
    ep = Endpoint()
    yield ep
    ep.close()


class Serializers:
    """The confluent-kafka serializers, registering through `registry` over HTTP."""

    def __init__(self, registry, topic):
        self.client = SchemaRegistryClient({"url": registry.url})
        self.topic = topic

    def avro(self, schema, value, field=MessageField.VALUE):
        s = AvroSerializer(self.client, json.dumps(schema))
        return s(value, SerializationContext(self.topic, field))

    def json(self, schema, value):
        s = JSONSerializer(json.dumps(schema), self.client)
        return s(value, SerializationContext(self.topic, MessageField.VALUE))

    def protobuf(self, value):
        s = ProtobufSerializer(protobuf_class(), self.client, {"use.deprecated.format": False})
        return s(protobuf_class()(**value), SerializationContext(self.topic, MessageField.VALUE))


_PB = {}


def protobuf_class():
    """A message class built at run time from a descriptor (no protoc here): message Ping {
    int64 id = 1; string text = 2; }."""
    if "Ping" not in _PB:
        from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
        fdp = descriptor_pb2.FileDescriptorProto(name="esmd_test_ping.proto", package="esmdtest",
                                                 syntax="proto3")
        m = fdp.message_type.add(name="Ping")
        m.field.add(name="id", number=1, type=descriptor_pb2.FieldDescriptorProto.TYPE_INT64,
                    label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
        m.field.add(name="text", number=2, type=descriptor_pb2.FieldDescriptorProto.TYPE_STRING,
                    label=descriptor_pb2.FieldDescriptorProto.LABEL_OPTIONAL)
        pool = descriptor_pool.DescriptorPool()
        pool.Add(fdp)
        _PB["Ping"] = message_factory.GetMessageClass(pool.FindMessageTypeByName("esmdtest.Ping"))
    return _PB["Ping"]


def produce(broker, topic, records):
    """records: (partition, key bytes or None, value bytes) produced in order, with the
    confluent-kafka Producer (librdkafka)."""
    p = Producer({"bootstrap.servers": broker.bootstrap, "enable.idempotence": True,
                  "linger.ms": 5})
    errors = []
    for part, key, value in records:
        p.produce(topic, value=value, key=key, partition=part,
                  on_delivery=lambda err, msg: err and errors.append(err))
        p.poll(0)
    assert p.flush(60) == 0
    assert not errors, errors


def with_registry(cfg, registry, fmt="JSON", validate=("value",)):
    cfg["mappings"][0]["source"]["schema_registry"] = {
        "url": registry.url, "event_record_format": fmt, "validate": list(validate)}
    return cfg


def delivered(endpoint):
    """The delivered records in delivery order."""
    return [rec for _, _, rec in endpoint.records()]


def b64json(s):
    return json.loads(base64.b64decode(s))


def schema_id(framed):
    assert framed[0] == 0
    return struct.unpack(">I", framed[1:5])[0]


@pytest.fixture
def kafka(kafka_broker):
    """These tests use the real broker (conftest's kafka_config builds on this fixture)."""
    return kafka_broker


# ---- 1. each format with JSON and SOURCE ----------------------------------------------------


@pytest.mark.parametrize("fmt", ["JSON", "SOURCE"])
def test_avro_key_and_value(fmt, kafka, registry, endpoint, esmd, kafka_config, names):
    topic = kafka.create_topic(names.topic(), 1)
    ser = Serializers(registry, topic)
    recs = [(0, ser.avro(ORDER_KEY, {"id": i}, MessageField.KEY), ser.avro(ORDER_V1, order(i)))
            for i in range(5)]
    produce(kafka, topic, recs)
    key_id, value_id = schema_id(recs[0][1]), schema_id(recs[0][2])
    assert key_id != value_id
    proc = esmd(with_registry(kafka_config(topic, batch_size=10), registry, fmt,
                              ("key", "value")))
    endpoint.wait_records(5, timeout=60)
    got = delivered(endpoint)
    assert [r["offset"] for r in got] == list(range(5))
    for i, (r, (_, key, value)) in enumerate(zip(got, recs)):
        if fmt == "JSON":
            assert b64json(r["key"]) == {"id": i}
            assert b64json(r["value"]) == order(i)
        else:  # the Avro data as written, without the magic byte and schema id
            assert base64.b64decode(r["key"]) == key[5:]
            assert base64.b64decode(r["value"]) == value[5:]
        assert r["keySchemaMetadata"] == {"dataFormat": "AVRO", "schemaId": str(key_id)}
        assert r["valueSchemaMetadata"] == {"dataFormat": "AVRO", "schemaId": str(value_id)}
    assert registry.fetches(key_id) == 1 and registry.fetches(value_id) == 1
    assert proc.get("/readyz")[0] == 200


@pytest.mark.parametrize("fmt", ["JSON", "SOURCE"])
def test_json_schema_value(fmt, kafka, registry, endpoint, esmd, kafka_config, names):
    topic = kafka.create_topic(names.topic(), 1)
    ser = Serializers(registry, topic)
    values = [{"id": i, "status": "PAID", "customer": "c%d" % i, "total": i * 1.5}
              for i in range(5)]
    recs = [(0, b"k%d" % i, ser.json(ORDER_JSON_SCHEMA, v)) for i, v in enumerate(values)]
    produce(kafka, topic, recs)
    sid = schema_id(recs[0][2])
    assert registry.schemas[sid]["schemaType"] == "JSON"
    esmd(with_registry(kafka_config(topic, batch_size=10), registry, fmt))
    endpoint.wait_records(5, timeout=60)
    got = delivered(endpoint)
    assert [r["offset"] for r in got] == list(range(5))
    for i, r in enumerate(got):
        # the key is not decoded (validate: [value]): as it came, no metadata
        assert base64.b64decode(r["key"]) == b"k%d" % i and "keySchemaMetadata" not in r
        assert r["valueSchemaMetadata"] == {"dataFormat": "JSON", "schemaId": str(sid)}
        if fmt == "JSON":
            assert b64json(r["value"]) == values[i]
        else:
            assert base64.b64decode(r["value"]) == recs[i][2][5:]
    assert registry.fetches(sid) == 1


# ---- 2. evolution, unknown ids, corrupt records, Protobuf -----------------------------------


def test_evolution_and_undecodable_records_to_on_failure(kafka, registry, endpoint, dest, esmd,
                                                         kafka_config, names):
    topic = kafka.create_topic(names.topic(), 1)
    ser = Serializers(registry, topic)
    v1 = [ser.avro(ORDER_V1, order(i)) for i in range(3)]
    v2 = [ser.avro(ORDER_V2, order(i, v2=True)) for i in range(3, 6)]
    id1, id2 = schema_id(v1[0]), schema_id(v2[0])
    assert id1 != id2
    unknown = b"\x00" + struct.pack(">I", 4242) + v1[0][5:]
    corrupt = v1[1][:-3]  # the data cut short: the string and the union are missing
    pb = ser.protobuf({"id": 7, "text": "ping"})
    pb_id = schema_id(pb)
    assert registry.schemas[pb_id]["schemaType"] == "PROTOBUF"
    values = [v1[0], unknown, v1[1], corrupt, v1[2], v2[0], pb, v2[1], v2[2]]
    bad = {1: ("SCHEMA_NOT_FOUND", unknown), 3: ("DESERIALIZATION_ERROR", corrupt),
           6: ("DESERIALIZATION_ERROR", pb)}
    produce(kafka, topic, [(0, b"k%d" % o, v) for o, v in enumerate(values)])

    proc = esmd(with_registry(kafka_config(topic, batch_size=100, mapping_extra={
        "on_failure": dest.base + "/failed"}), registry))
    endpoint.wait_records(6, timeout=60)
    dest.wait_for(lambda: len(dest.snapshot()) >= 3, 30, "the three on-failure records")

    got = delivered(endpoint)
    assert [r["offset"] for r in got] == [0, 2, 4, 5, 7, 8]
    assert [b64json(r["value"]) for r in got] == \
        [order(0), order(1), order(2)] + [order(i, v2=True) for i in range(3, 6)]
    assert [r["valueSchemaMetadata"]["schemaId"] for r in got] == [str(id1)] * 3 + [str(id2)] * 3

    fails = sorted((r.json for r in dest.snapshot()),
                   key=lambda f: int(f["KafkaBatchInfo"]["recordInfo"]["offset"]))
    assert len(fails) == 3
    for f, (offset, (condition, raw)) in zip(fails, sorted(bad.items())):
        assert f["requestContext"]["condition"] == condition
        assert f["KafkaBatchInfo"]["recordInfo"]["offset"] == str(offset)
        [(_, [rec])] = f["payload"]["records"].items()
        # the record as it came: the framed bytes, no schema metadata
        assert base64.b64decode(rec["value"]) == raw
        assert base64.b64decode(rec["key"]) == b"k%d" % offset
        assert "valueSchemaMetadata" not in rec
    assert registry.fetches(4242) == 1
    for sid in (id1, id2, pb_id):
        assert registry.fetches(sid) == 1
    m = proc.metrics()
    assert m.get("esmd_undecodable_records_total") == 3


def test_undecodable_records_to_a_redis_destination(kafka, redis, registry, endpoint, esmd,
                                                    kafka_config, names):
    """The same failures through a redis:// on-failure destination (a stream entry whose
    payload field is the on-failure record)."""
    topic = kafka.create_topic(names.topic(), 1)
    dlq = names.topic() + "-dlq"
    ser = Serializers(registry, topic)
    good = ser.avro(ORDER_V1, order(0))
    unknown = b"\x00" + struct.pack(">I", 9999) + good[5:]
    corrupt = b"\x01" + good[1:]  # not the wire format: magic byte 1
    produce(kafka, topic, [(0, b"a", good), (0, b"b", unknown), (0, b"c", corrupt),
                           (0, b"d", good)])
    cfg = kafka_config(topic, mapping_extra={"on_failure": "redis://r/" + dlq})
    cfg["connections"]["r"] = {"type": "redis", "url": redis.url}
    esmd(with_registry(cfg, registry))
    endpoint.wait_records(2, timeout=60)
    wait_for(lambda: redis.command("XLEN", dlq) >= 2, 30, 0.2, "two on-failure entries")
    assert [(r["offset"], b64json(r["value"])) for r in delivered(endpoint)] == \
        [(0, order(0)), (3, order(0))]
    got = []
    for _, (field, value) in redis.command("XRANGE", dlq, "-", "+"):
        assert field in ("payload", b"payload")
        fr = json.loads(value)
        [(_, [rec])] = fr["payload"]["records"].items()
        got.append((fr["requestContext"]["condition"], base64.b64decode(rec["key"]),
                    base64.b64decode(rec["value"])))
    assert sorted(got) == [("DESERIALIZATION_ERROR", b"c", corrupt),
                           ("SCHEMA_NOT_FOUND", b"b", unknown)]


# ---- 3. the registry stopped mid-run --------------------------------------------------------


SCHEMA_PAUSE = "paused: "  # esmd's debug line when records waiting for a schema pause it


def pause_lines(proc, topic):
    with open(proc.logfile, errors="replace") as f:
        return [ln for ln in f if "kafka %s-0 %s" % (topic, SCHEMA_PAUSE) in ln and
                "wait for their schema" in ln]


def test_registry_down_holds_the_partition(kafka, registry, endpoint, dest, esmd, kafka_config,
                                           names):
    """1,520 records of a new schema id arrive while the registry is down: past the 1,000 that
    may wait unpaused (kafka.c, KAFKA_SR_WAIT_RECORDS) the partition is paused in librdkafka."""
    topic = kafka.create_topic(names.topic(), 1)
    ser = Serializers(registry, topic)
    first = [ser.avro(ORDER_V1, order(i)) for i in range(5)]
    later = [ser.avro(ORDER_V2, order(i, v2=True)) for i in range(5, 1525)]  # a new id
    new_id = schema_id(later[0])
    proc = esmd(with_registry(kafka_config(topic, batch_size=100, mapping_extra={
        "on_failure": dest.base + "/failed"}), registry), env={"ESMD_LOG_LEVEL": "debug"})
    produce(kafka, topic, [(0, None, v) for v in first])
    endpoint.wait_records(5, timeout=60)
    assert registry.fetches(new_id) == 0

    registry.stop()
    produce(kafka, topic, [(0, None, v) for v in later])

    def not_ready():
        status, body = proc.get("/readyz")
        return status == 503 and "schema registry" in body and \
            registry.url in body
    wait_for(not_ready, 30, 0.2, "/readyz 503 naming the schema registry")
    wait_for(lambda: pause_lines(proc, topic), 30, 0.2, "the partition paused")
    assert len(delivered(endpoint)) == 5, "a record whose schema could not be fetched was sent"
    assert dest.snapshot() == [], "records went to on-failure while the registry was down"
    assert proc.running()

    registry.start()
    endpoint.wait_records(1525, timeout=90)
    got = delivered(endpoint)
    assert [r["offset"] for r in got] == list(range(1525))
    assert [b64json(r["value"]) for r in got[5:]] == [order(i, v2=True) for i in range(5, 1525)]
    wait_for(lambda: proc.get("/readyz")[0] == 200, 30, 0.2, "/readyz 200 again")
    assert dest.snapshot() == []
    assert registry.fetches(new_id) == 1  # the one answer it finally got


def test_a_new_schema_id_does_not_pause_the_partition(kafka, registry, endpoint, esmd,
                                                      kafka_config, names):
    """Records of an id not fetched yet wait in esmd, in order, without pausing the partition
    in librdkafka: a pause drops the partition's prefetched records and fetches them again, which
    cost about a second per new schema id (a whole-path rate of 14,000 records/s instead of
    300,000 in tests/bench/schema_path_bench.py). The first records of a fresh esmd all wait for
    the first fetch."""
    topic = kafka.create_topic(names.topic(), 1)
    ser = Serializers(registry, topic)
    values = [ser.avro(ORDER_V1, order(i)) for i in range(200)] + \
        [ser.avro(ORDER_V2, order(i, v2=True)) for i in range(200, 400)]
    produce(kafka, topic, [(0, None, v) for v in values])
    proc = esmd(with_registry(kafka_config(topic, batch_size=100), registry),
                env={"ESMD_LOG_LEVEL": "debug"})
    endpoint.wait_records(400, timeout=60)
    assert [r["offset"] for r in delivered(endpoint)] == list(range(400))
    assert registry.fetches(schema_id(values[0])) == 1
    assert registry.fetches(schema_id(values[-1])) == 1
    assert pause_lines(proc, topic) == []


# ---- 4. filters on a decoded field -----------------------------------------------------------


def test_filter_on_a_decoded_avro_field(kafka, registry, endpoint, esmd, kafka_config, names):
    topic = kafka.create_topic(names.topic(), 1)
    ser = Serializers(registry, topic)
    produce(kafka, topic, [(0, None, ser.avro(ORDER_V1, order(i))) for i in range(30)])
    proc = esmd(with_registry(kafka_config(topic, batch_size=100, mapping_extra={
        "filters": [{"value": {"status": ["PAID"], "total": [{"numeric": [">", 10]}]}}]}),
        registry))
    want = [i for i in range(30) if order(i)["status"] == "PAID" and order(i)["total"] > 10]
    endpoint.wait_records(len(want), timeout=60)
    wait_for(lambda: proc.metrics().get("esmd_filtered_out_events_total") == 30 - len(want),
             30, 0.2, "the other records filtered out")
    assert [b64json(r["value"])["id"] for r in delivered(endpoint)] == want


# ---- 5. one fetch per schema id under load ---------------------------------------------------


def test_one_fetch_per_schema_id_under_load(kafka, registry, endpoint, esmd, kafka_config, names):
    topic = kafka.create_topic(names.topic(), 4)
    ser = Serializers(registry, topic)
    schemas = [ORDER_V1, ORDER_V2, ORDER_KEY]
    samples = [ser.avro(ORDER_V1, order(1)), ser.avro(ORDER_V2, order(1, v2=True)),
               ser.avro(ORDER_KEY, {"id": 1})]
    ids = [schema_id(s) for s in samples]
    assert len(set(ids)) == 3
    n = 3000
    recs = []
    for i in range(n):
        k = i % 3
        v = order(i, v2=True) if k == 1 else {"id": i} if k == 2 else order(i)
        recs.append((i % 4, None, ser.avro(schemas[k], v)))
    produce(kafka, topic, recs)
    esmd(with_registry(kafka_config(topic, batch_size=100, max_concurrency=8), registry))
    endpoint.wait_records(n, timeout=90)
    got = delivered(endpoint)
    for p in range(4):
        assert [r["offset"] for r in got if r["partition"] == p] == list(range(n // 4))
    assert sorted(b64json(r["value"])["id"] for r in got) == list(range(n))
    assert {i: registry.fetches(i) for i in ids} == {i: 1 for i in ids}
