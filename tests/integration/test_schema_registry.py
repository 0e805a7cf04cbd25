"""The schema registry path end to end (docs/kafka.md, "Schema registry"): records written by
the confluent-kafka client's real AvroSerializer, JSONSerializer and ProtobufSerializer, which
register their schemas over HTTP, produced to the real Kafka broker, consumed and decoded by
esmd, which fetches the schemas over HTTP from the same registry.

The registry is a real one: Apicurio Registry 2.4.2.Final through its Confluent-compatible API
(servers.ApicurioRegistry, one for the module; schemas in an H2 file, so a stopped registry comes
back with them). It keeps a Protobuf schema as it was registered, the base64 descriptor the
Python serializer sends; Confluent's registry answers .proto text, so test_protobuf_value runs on
tests/integration/schema_registry.py, the stand-in (which the benchmark uses too), made to answer
as Confluent's does. test_the_stand_in_answers_as_apicurio checks the stand-in against Apicurio.

    each format, JSON and SOURCE   Avro (key and value) and JSON Schema: the event's key/value
                                   base64 contents and keySchemaMetadata/valueSchemaMetadata
    JSON Schema validation         records not matching their schema, and one whose schema is a
                                   draft esmd does not validate, to on-failure; the others flow
    evolution and failures         two versions of a schema on one topic; an unknown schema id
                                   and a corrupt record among good ones (Avro and a Protobuf
                                   one) go to the on-failure destination (SCHEMA_NOT_FOUND,
                                   DESERIALIZATION_ERROR; an HTTP one, then a redis:// stream)
                                   with their original bytes, the good ones are delivered in
                                   order
    Protobuf                       JSON and SOURCE; a nested message type (message indexes
                                   [0, 0]); a Timestamp; two versions on one topic; the
                                   registry answering .proto text or the serialized descriptor;
                                   a corrupt record among good ones; a filter on a decoded field;
                                   a schema importing another subject (references fetched; one
                                   the registry lacks: its records fail)
    registry stopped mid-run       the partition waits (/readyz 503 naming the registry; paused
                                   once 1,000 records wait), nothing goes to on-failure,
                                   everything is delivered once it is back
    a new schema id                its records wait without pausing the partition
    redirects                      a registry URL answering 307 or 301: followed, the records
                                   decode; the basic auth stays with the configured host; a
                                   redirect loop is the registry down, saying so
    filters                        on a decoded Avro field
    one fetch per id               4 partitions, 3 ids, 3,000 records: 3 fetches
"""

import base64
import json
import struct

import pytest

import servers
from endpoint import Endpoint
from schema_registry import Redirector, Registry
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


@pytest.fixture(scope="module")
def apicurio():
    r = servers.ApicurioRegistry()
    yield r
    r.close()


class RegistryView:
    """The module's Apicurio Registry as one test sees it: .fetches(id) counts this test's
    GET /schemas/ids/{id} requests only (a schema registered again by a later test keeps its
    id, as in Confluent's registry)."""

    def __init__(self, reg):
        self.reg = reg
        self.since = reg.mark()
        self.url = reg.url
        self.stop, self.start, self.running = reg.stop, reg.start, reg.running
        self.schema_type, self.register = reg.schema_type, reg.register

    def fetches(self, schema_id):
        return self.reg.fetches(schema_id, self.since)

    def gets(self, path):
        """This test's GET requests of path (below the Confluent API root)."""
        return sum(1 for method, p, _ in self.reg._requests()[self.since:]
                   if method == "GET" and p == self.reg.API + path)


@pytest.fixture
def registry(apicurio, request):
    apicurio.start()  # a no-op unless a failed test left it stopped
    yield RegistryView(apicurio)
    if _failed(request):
        print("\n==== Apicurio Registry (%s), last lines ====\n%s" % (
            apicurio.logfile, servers.tail(apicurio.logfile, 30)))


def _failed(request):
    rep = getattr(request.node, "rep_call", None)
    return rep is None or rep.failed


@pytest.fixture
def stand_in():
    """The stand-in registry (schema_registry.py), where a test needs an answer Apicurio does not
    give."""
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
    assert registry.schema_type(sid) == "JSON"
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


def test_json_schema_records_validated(kafka, registry, endpoint, dest, esmd, kafka_config,
                                       names):
    """JSON Schema data is validated against its schema (valijson): records the JSONSerializer
    wrote are delivered; records framed by hand with the same registered id whose JSON does not
    match (a string id, a required property missing), and a record whose schema is a draft esmd
    does not validate (2020-12), go to on-failure as DESERIALIZATION_ERRORs with their original
    bytes; the records between them flow."""
    topic = kafka.create_topic(names.topic(), 1)
    ser = Serializers(registry, topic)
    good = [ser.json(ORDER_JSON_SCHEMA, {"id": i, "status": "NEW", "total": i + 0.5})
            for i in range(4)]
    sid = schema_id(good[0])
    frame = b"\x00" + struct.pack(">I", sid)
    wrong_type = frame + json.dumps({"id": "seven", "status": "NEW"}).encode()
    missing = frame + json.dumps({"id": 8, "total": 1}).encode()
    later = dict(ORDER_JSON_SCHEMA, **{"$schema": "https://json-schema.org/draft/2020-12/schema",
                                       "title": "Order2020"})
    ser2020 = Serializers(registry, topic + "-2020")
    draft2020 = ser2020.json(later, {"id": 9, "status": "PAID"})
    assert schema_id(draft2020) != sid
    values = [good[0], wrong_type, good[1], missing, good[2], draft2020, good[3]]
    produce(kafka, topic, [(0, b"k%d" % o, v) for o, v in enumerate(values)])

    proc = esmd(with_registry(kafka_config(topic, batch_size=100, mapping_extra={
        "on_failure": dest.base + "/failed"}), registry))
    endpoint.wait_records(4, timeout=60)
    dest.wait_for(lambda: len(dest.snapshot()) >= 3, 30, "the three on-failure records")
    got = delivered(endpoint)
    assert [r["offset"] for r in got] == [0, 2, 4, 6]
    assert [b64json(r["value"]) for r in got] == \
        [{"id": i, "status": "NEW", "total": i + 0.5} for i in range(4)]
    fails = sorted((r.json for r in dest.snapshot()),
                   key=lambda f: int(f["KafkaBatchInfo"]["recordInfo"]["offset"]))
    assert [f["KafkaBatchInfo"]["recordInfo"]["offset"] for f in fails] == ["1", "3", "5"]
    for f in fails:
        assert f["requestContext"]["condition"] == "DESERIALIZATION_ERROR"
        [(_, [rec])] = f["payload"]["records"].items()
        offset = int(f["KafkaBatchInfo"]["recordInfo"]["offset"])
        assert base64.b64decode(rec["value"]) == values[offset]  # the original bytes
        assert "valueSchemaMetadata" not in rec
    with open(proc.logfile, errors="replace") as log:
        msgs = [json.loads(ln).get("msg", "") for ln in log if ln.startswith("{")]
    # the first failure's line (the others may fall within the log's one-a-second limit)
    assert any("does not match its JSON schema at /id: Value type not permitted by 'type' "
               "constraint" in m for m in msgs), msgs
    assert proc.metrics().get("esmd_undecodable_records_total") == 3


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
    assert registry.schema_type(pb_id) == "PROTOBUF"
    values = [v1[0], unknown, v1[1], corrupt, v1[2], v2[0], pb, v2[1], v2[2]]
    bad = {1: ("SCHEMA_NOT_FOUND", unknown), 3: ("DESERIALIZATION_ERROR", corrupt)}
    produce(kafka, topic, [(0, b"k%d" % o, v) for o, v in enumerate(values)])

    proc = esmd(with_registry(kafka_config(topic, batch_size=100, mapping_extra={
        "on_failure": dest.base + "/failed"}), registry))
    endpoint.wait_records(7, timeout=60)
    dest.wait_for(lambda: len(dest.snapshot()) >= 2, 30, "the two on-failure records")

    got = delivered(endpoint)
    assert [r["offset"] for r in got] == [0, 2, 4, 5, 6, 7, 8]
    assert [b64json(r["value"]) for r in got] == \
        [order(0), order(1), order(2), order(3, v2=True), {"id": "7", "text": "ping"},
         order(4, v2=True), order(5, v2=True)]
    assert [(r["valueSchemaMetadata"]["dataFormat"], r["valueSchemaMetadata"]["schemaId"])
            for r in got] == [("AVRO", str(id1))] * 3 + [("AVRO", str(id2))] + \
        [("PROTOBUF", str(pb_id))] + [("AVRO", str(id2))] * 2

    fails = sorted((r.json for r in dest.snapshot()),
                   key=lambda f: int(f["KafkaBatchInfo"]["recordInfo"]["offset"]))
    assert len(fails) == 2
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
    assert m.get("esmd_undecodable_records_total") == 2


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


@pytest.fixture
def fronts():
    """Redirector(...) fronts made by a test, closed after it."""
    made = []

    def make(*args, **kw):
        made.append(Redirector(*args, **kw))
        return made[-1]
    yield make
    for f in made:
        f.close()


@pytest.mark.parametrize("status", [307, 301])
def test_a_registry_url_that_redirects(status, kafka, registry, endpoint, dest, esmd,
                                       kafka_config, names, fronts):
    """The configured URL answers a redirect to the real registry (a proxy in front, a moved
    registry): esmd follows it and the records decode. It once took the 3xx for the registry
    down: the records waited for ever, /readyz 503."""
    front = fronts(registry.url, status)
    topic = kafka.create_topic(names.topic(), 1)
    ser = Serializers(registry, topic)
    values = [ser.avro(ORDER_V1, order(i)) for i in range(5)]
    produce(kafka, topic, [(0, None, v) for v in values])
    sid = schema_id(values[0])
    proc = esmd(with_registry(kafka_config(topic, batch_size=10, mapping_extra={
        "on_failure": dest.base + "/failed"}), front))
    endpoint.wait_records(5, timeout=60)
    got = delivered(endpoint)
    assert [b64json(r["value"]) for r in got] == [order(i) for i in range(5)]
    assert all(r["valueSchemaMetadata"]["schemaId"] == str(sid) for r in got)
    assert [p for _, p, _ in front.gets()] == ["/schemas/ids/%d" % sid]
    assert registry.fetches(sid) == 1
    assert dest.snapshot() == []
    assert proc.get("/readyz")[0] == 200


def test_registry_credentials_are_not_sent_to_another_host(kafka, stand_in, endpoint, esmd,
                                                          kafka_config, names, fronts):
    """The registry's basic auth goes to the configured host only: a redirect to another host
    (here `localhost` for `127.0.0.1`) is followed without it (libcurl's default, kept and
    documented in docs/kafka.md)."""
    front = fronts(stand_in.url.replace("127.0.0.1", "localhost"), 307)
    topic = kafka.create_topic(names.topic(), 1)
    ser = Serializers(stand_in, topic)
    values = [ser.avro(ORDER_V1, order(i)) for i in range(3)]
    produce(kafka, topic, [(0, None, v) for v in values])
    cfg = with_registry(kafka_config(topic, batch_size=10), front)
    cfg["mappings"][0]["source"]["schema_registry"].update(username="esmd", password="s3cret")
    esmd(cfg)
    endpoint.wait_records(3, timeout=60)
    assert [b64json(r["value"]) for r in delivered(endpoint)] == [order(i) for i in range(3)]
    basic = "Basic " + base64.b64encode(b"esmd:s3cret").decode()
    assert [a for _, _, a in front.gets()] == [basic]
    assert stand_in.fetches(schema_id(values[0])) == 1
    assert all(a is None for a in stand_in.authorizations), stand_in.authorizations


def test_a_redirect_loop_is_the_registry_down_and_says_so(kafka, registry, endpoint, dest, esmd,
                                                         kafka_config, names, fronts):
    """A URL redirecting to itself: after 5 redirects the request fails, /readyz is 503 naming
    the registry URL and the redirects (no hang, no record given up); once the URL answers
    right again the records go on."""
    front = fronts(None, 302)
    topic = kafka.create_topic(names.topic(), 1)
    ser = Serializers(registry, topic)
    values = [ser.avro(ORDER_V1, order(i)) for i in range(3)]
    produce(kafka, topic, [(0, None, v) for v in values])
    proc = esmd(with_registry(kafka_config(topic, batch_size=10, mapping_extra={
        "on_failure": dest.base + "/failed"}), front))
    want = "schema registry %s: schema %d: 5 redirects followed" % (front.url, schema_id(values[0]))

    def says_so():
        status, body = proc.get("/readyz")
        return status == 503 and want in body and "a redirect loop" in body
    wait_for(says_so, 60, 0.2, "/readyz 503 naming the registry and the redirects")
    assert want in proc.log()
    assert len(front.gets()) >= 6  # the first request and 5 redirects
    assert endpoint.snapshot() == [] and dest.snapshot() == []
    assert proc.running()

    front.target = registry.url  # the loop mended: the retry gets through
    endpoint.wait_records(3, timeout=90)
    assert [b64json(r["value"]) for r in delivered(endpoint)] == [order(i) for i in range(3)]
    wait_for(lambda: proc.get("/readyz")[0] == 200, 30, 0.2, "/readyz 200 again")
    assert dest.snapshot() == []


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


# ---- 6. Protobuf -----------------------------------------------------------------------------


def shop_classes(version=1):
    """Message classes built at run time from a FileDescriptorProto (no protoc here):

        syntax = "proto3"; package esmdshop; import "google/protobuf/timestamp.proto";
        message Order {
          message Line { string sku = 1; int32 qty = 2; }
          int64 id = 1; Status status = 2; string customer_name = 3; double total = 4;
          google.protobuf.Timestamp placed_at = 5; repeated Line lines = 6;
          string channel = 7;                                          // version 2 only
        }
        enum Status { NEW = 0; PAID = 1; SHIPPED = 2; }

    -> (Order, Order.Line), from a pool of their own per version."""
    key = "shop%d" % version
    if key not in _PB:
        from google.protobuf import descriptor_pb2, descriptor_pool, message_factory, timestamp_pb2
        F = descriptor_pb2.FieldDescriptorProto
        fdp = descriptor_pb2.FileDescriptorProto(
            name="esmd_shop.proto", package="esmdshop", syntax="proto3",
            dependency=["google/protobuf/timestamp.proto"])
        o = fdp.message_type.add(name="Order")
        line = o.nested_type.add(name="Line")
        line.field.add(name="sku", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
        line.field.add(name="qty", number=2, type=F.TYPE_INT32, label=F.LABEL_OPTIONAL)
        for name, number, typ, type_name, label in [
                ("id", 1, F.TYPE_INT64, None, F.LABEL_OPTIONAL),
                ("status", 2, F.TYPE_ENUM, ".esmdshop.Status", F.LABEL_OPTIONAL),
                ("customer_name", 3, F.TYPE_STRING, None, F.LABEL_OPTIONAL),
                ("total", 4, F.TYPE_DOUBLE, None, F.LABEL_OPTIONAL),
                ("placed_at", 5, F.TYPE_MESSAGE, ".google.protobuf.Timestamp", F.LABEL_OPTIONAL),
                ("lines", 6, F.TYPE_MESSAGE, ".esmdshop.Order.Line", F.LABEL_REPEATED)] + \
                ([("channel", 7, F.TYPE_STRING, None, F.LABEL_OPTIONAL)] if version == 2 else []):
            f = o.field.add(name=name, number=number, type=typ, label=label)
            if type_name:
                f.type_name = type_name
        e = fdp.enum_type.add(name="Status")
        for i, n in enumerate(["NEW", "PAID", "SHIPPED"]):
            e.value.add(name=n, number=i)
        pool = descriptor_pool.DescriptorPool()
        pool.AddSerializedFile(timestamp_pb2.DESCRIPTOR.serialized_pb)
        pool.Add(fdp)
        _PB[key] = (message_factory.GetMessageClass(pool.FindMessageTypeByName("esmdshop.Order")),
                    message_factory.GetMessageClass(
                        pool.FindMessageTypeByName("esmdshop.Order.Line")))
    return _PB[key]


def pb_order(i, version=1):
    Order, _ = shop_classes(version)
    m = Order(id=i, status=i % 3, customer_name="c%d é" % i, total=i + 0.25)
    m.placed_at.seconds = 1700000000 + i
    m.placed_at.nanos = 500000000 if i % 2 else 0
    for k in range(i % 3):
        m.lines.add(sku="s%d" % k, qty=k)
    if version == 2:
        m.channel = "shop-%d" % i
    return m


def pb_serialize(registry, topic, msg):
    s = ProtobufSerializer(type(msg), SchemaRegistryClient({"url": registry.url}),
                           {"use.deprecated.format": False})
    return s(msg, SerializationContext(topic, MessageField.VALUE))


def pb_json(msg):
    """Protobuf's JSON mapping of msg as the protobuf package writes it (json_format): what esmd's
    rendering (libprotobuf's) must equal."""
    from google.protobuf import json_format
    return json_format.MessageToDict(msg)


@pytest.mark.parametrize("fmt", ["JSON", "SOURCE"])
@pytest.mark.parametrize("answers", ["text", "base64"])
def test_protobuf_value(fmt, answers, request, kafka, endpoint, esmd, kafka_config, names):
    """Orders and a nested type (Order.Line: message indexes [0, 0]) on one topic, written by
    ProtobufSerializer, which registers the base64 of the FileDescriptorProto. "text": the
    registry answers esmd .proto text, as Confluent's does (the stand-in); "base64": it answers
    the descriptor as registered, as Apicurio (the real registry) does."""
    registry = request.getfixturevalue("stand_in" if answers == "text" else "registry")
    topic = kafka.create_topic(names.topic(), 1)
    _, Line = shop_classes()
    msgs = [pb_order(i) for i in range(5)] + [Line(sku="loose", qty=3)]
    recs = [(0, b"k%d" % i, pb_serialize(registry, topic, m)) for i, m in enumerate(msgs)]
    produce(kafka, topic, recs)
    sid = schema_id(recs[0][2])
    assert {schema_id(v) for _, _, v in recs} == {sid}
    if answers == "text":
        stored = registry.schemas[sid]
        assert stored["schemaType"] == "PROTOBUF" and "message Order {" in stored["schema"]
    assert recs[0][2][5] == 0 and recs[-1][2][5:8] == b"\x04\x00\x00"  # [0] and [0, 0]
    esmd(with_registry(kafka_config(topic, batch_size=10), registry, fmt))
    endpoint.wait_records(6, timeout=60)
    got = delivered(endpoint)
    assert [r["offset"] for r in got] == list(range(6))
    for r, m, (_, key, value) in zip(got, msgs, recs):
        assert r["valueSchemaMetadata"] == {"dataFormat": "PROTOBUF", "schemaId": str(sid)}
        assert base64.b64decode(r["key"]) == key
        if fmt == "JSON":
            assert b64json(r["value"]) == pb_json(m)
        else:  # as written after the schema id: the message indexes, then the message
            assert base64.b64decode(r["value"]) == value[5:]
    if fmt == "JSON":
        first = b64json(got[1]["value"])
        # protobuf's JSON mapping: lowerCamelCase names, int64 as strings, enums by name,
        # Timestamp as RFC 3339, fields at their default value left out
        assert first == {"id": "1", "status": "PAID", "customerName": "c1 é", "total": 1.25,
                         "placedAt": "2023-11-14T22:13:21.500Z", "lines": [{"sku": "s0"}]}
        assert b64json(got[5]["value"]) == {"sku": "loose", "qty": 3}
    assert registry.fetches(sid) == 1


def test_protobuf_versions_corrupt_records_and_text_or_serialized(kafka, registry, endpoint,
                                                                 dest, esmd, kafka_config, names):
    """Two versions of the schema on one topic; a record cut short and one with bytes appended
    among them go to on-failure with their original bytes. The registry (Apicurio) answers the
    base64 of the descriptor, as the serializer registered it (`?format=serialized`'s form in
    Confluent's), which esmd reads as well as text."""
    topic = kafka.create_topic(names.topic(), 1)
    v1 = [pb_order(i) for i in range(3)]
    v2 = [pb_order(i, version=2) for i in range(3, 6)]
    e1 = [pb_serialize(registry, topic, m) for m in v1]
    e2 = [pb_serialize(registry, topic, m) for m in v2]
    id1, id2 = schema_id(e1[0]), schema_id(e2[0])
    assert id1 != id2
    cut = e1[1][:-4]
    junk = e2[0] + b"\xff"  # a tag that never ends
    values = [e1[0], cut, e1[1], e1[2], junk, e2[0], e2[1], e2[2]]
    produce(kafka, topic, [(0, b"k%d" % o, v) for o, v in enumerate(values)])
    proc = esmd(with_registry(kafka_config(topic, batch_size=100, mapping_extra={
        "on_failure": dest.base + "/failed"}), registry))
    endpoint.wait_records(6, timeout=60)
    dest.wait_for(lambda: len(dest.snapshot()) >= 2, 30, "the two on-failure records")
    got = delivered(endpoint)
    assert [r["offset"] for r in got] == [0, 2, 3, 5, 6, 7]
    assert [b64json(r["value"]) for r in got] == [pb_json(m) for m in v1 + v2]
    assert [r["valueSchemaMetadata"]["schemaId"] for r in got] == [str(id1)] * 3 + [str(id2)] * 3
    assert b64json(got[3]["value"])["channel"] == "shop-3"
    fails = sorted((r.json for r in dest.snapshot()),
                   key=lambda f: int(f["KafkaBatchInfo"]["recordInfo"]["offset"]))
    assert [(f["requestContext"]["condition"], f["KafkaBatchInfo"]["recordInfo"]["offset"])
            for f in fails] == [("DESERIALIZATION_ERROR", "1"), ("DESERIALIZATION_ERROR", "4")]
    for f, raw in zip(fails, (cut, junk)):
        [(_, [rec])] = f["payload"]["records"].items()
        assert base64.b64decode(rec["value"]) == raw and "valueSchemaMetadata" not in rec
    assert registry.fetches(id1) == 1 and registry.fetches(id2) == 1
    assert proc.metrics().get("esmd_undecodable_records_total") == 2


def test_filter_on_a_decoded_protobuf_field(kafka, registry, endpoint, esmd, kafka_config, names):
    topic = kafka.create_topic(names.topic(), 1)
    msgs = [pb_order(i) for i in range(30)]
    produce(kafka, topic, [(0, None, pb_serialize(registry, topic, m)) for m in msgs])
    proc = esmd(with_registry(kafka_config(topic, batch_size=100, mapping_extra={
        "filters": [{"value": {"status": ["SHIPPED"], "customerName": [{"prefix": "c1"}]}}]}),
        registry))
    want = [i for i in range(30) if i % 3 == 2 and ("c%d" % i).startswith("c1")]
    endpoint.wait_records(len(want), timeout=60)
    wait_for(lambda: proc.metrics().get("esmd_filtered_out_events_total") == 30 - len(want),
             30, 0.2, "the other records filtered out")
    assert [int(b64json(r["value"])["id"]) for r in delivered(endpoint)] == want


def sale_class():
    """message Sale in esmd_sale.proto, which imports esmd_common.proto (message Money), both
    built at run time: ProtobufSerializer registers esmd_common.proto under a subject of its own
    and Sale's schema with a reference to it."""
    if "Sale" not in _PB:
        from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
        F = descriptor_pb2.FieldDescriptorProto
        common = descriptor_pb2.FileDescriptorProto(name="esmd_common.proto",
                                                    package="esmdcommon", syntax="proto3")
        money = common.message_type.add(name="Money")
        money.field.add(name="units", number=1, type=F.TYPE_INT64, label=F.LABEL_OPTIONAL)
        money.field.add(name="currency_code", number=2, type=F.TYPE_STRING,
                        label=F.LABEL_OPTIONAL)
        sale = descriptor_pb2.FileDescriptorProto(name="esmd_sale.proto", package="esmdsale",
                                                  syntax="proto3",
                                                  dependency=["esmd_common.proto"])
        m = sale.message_type.add(name="Sale")
        m.field.add(name="id", number=1, type=F.TYPE_INT64, label=F.LABEL_OPTIONAL)
        m.field.add(name="price", number=2, type=F.TYPE_MESSAGE, type_name=".esmdcommon.Money",
                    label=F.LABEL_OPTIONAL)
        pool = descriptor_pool.DescriptorPool()
        pool.Add(common)
        pool.Add(sale)
        _PB["Sale"] = message_factory.GetMessageClass(pool.FindMessageTypeByName("esmdsale.Sale"))
    return _PB["Sale"]


def test_protobuf_schema_references(kafka, registry, endpoint, esmd, kafka_config, names):
    """A schema importing a file of another subject (the registry's `references`), on Apicurio:
    esmd fetches the referenced subject's version once and decodes with both files."""
    topic = kafka.create_topic(names.topic(), 1)
    Sale = sale_class()
    sales = [Sale(id=i, price={"units": 10 * i, "currency_code": "EUR"}) for i in range(1, 4)]
    framed = [pb_serialize(registry, topic, m) for m in sales]
    sid = schema_id(framed[0])
    status, body = servers.http_get("%s/schemas/ids/%d" % (registry.url, sid))
    assert status == 200
    [ref] = json.loads(body)["references"]
    assert ref["name"] == "esmd_common.proto" and ref["subject"] == "esmd_common.proto"
    before = registry.fetches(sid)  # the look-up just above
    produce(kafka, topic, [(0, None, v) for v in framed])
    esmd(with_registry(kafka_config(topic), registry))
    endpoint.wait_records(3, timeout=60)
    got = delivered(endpoint)
    assert [r["offset"] for r in got] == [0, 1, 2]
    assert [b64json(r["value"]) for r in got] == [pb_json(m) for m in sales]
    assert b64json(got[0]["value"])["price"] == {"units": "10", "currencyCode": "EUR"}
    assert registry.fetches(sid) == before + 1
    assert registry.gets("/subjects/esmd_common.proto/versions/%d" % ref["version"]) == 1


def test_protobuf_reference_missing(kafka, stand_in, endpoint, dest, esmd, kafka_config, names):
    """A schema whose referenced subject the registry does not have (the stand-in: a real
    registry refuses to register such a schema) fails its records with DESERIALIZATION_ERROR,
    the log naming the import; the records after it go on."""
    registry = stand_in
    topic = kafka.create_topic(names.topic(), 1)
    gone = registry.register(topic + "-x", 'syntax = "proto3";\npackage s;\n'
                             'import "gone.proto";\nmessage T { g.Gone g = 1; }\n', "PROTOBUF",
                             references=[{"name": "gone.proto", "subject": "gone",
                                          "version": 1}])
    with_gone = b"\x00" + struct.pack(">I", gone) + b"\x00\x0a\x02\x08\x05"
    good = pb_serialize(registry, topic, pb_order(1))
    produce(kafka, topic, [(0, None, with_gone), (0, None, good)])
    proc = esmd(with_registry(kafka_config(topic, mapping_extra={
        "on_failure": dest.base + "/failed"}), registry))
    endpoint.wait_records(1, timeout=60)
    dest.wait_for(lambda: len(dest.snapshot()) >= 1, 30, "the on-failure record")
    assert [b64json(r["value"]) for r in delivered(endpoint)] == [pb_json(pb_order(1))]
    [f] = [r.json for r in dest.snapshot()]
    assert f["requestContext"]["condition"] == "DESERIALIZATION_ERROR"
    assert f["KafkaBatchInfo"]["recordInfo"]["offset"] == "0"
    assert [p for m, p in registry.requests if m == "GET"].count("/subjects/gone/versions/1") == 1
    with open(proc.logfile, errors="replace") as log:
        msgs = [json.loads(ln).get("msg", "") for ln in log if ln.startswith("{")]
    assert any('imports "gone.proto", registered as subject gone version 1, which the registry '
               "does not have" in m for m in msgs)


# ---- 7. the stand-in answers as the real registry ---------------------------------------------


def test_the_stand_in_answers_as_apicurio(registry, names):
    """tests/bench/schema_path_bench.py runs on the stand-in (schema_registry.py). The answers
    esmd reads from a registry, GET /schemas/ids/{id} for an Avro, a JSON Schema and a Protobuf
    schema that the serializers registered and for an id no registry has, are the same from the
    stand-in as from Apicurio in what esmd reads: the status, the schema text, schemaType (absent
    meaning AVRO), the references, and error_code 40403. (For Protobuf the stand-in answers
    .proto text by default, as Confluent's registry does; here it answers as Apicurio.)"""
    stand_in = Registry()
    stand_in.protobuf_text = False  # Apicurio answers a Protobuf schema as it was registered
    try:
        got = []
        for reg in (registry, stand_in):
            ser = Serializers(reg, names.topic())
            ids = [schema_id(ser.avro(ORDER_V1, order(1))),
                   schema_id(ser.json(ORDER_JSON_SCHEMA, {"id": 1, "status": "NEW"})),
                   schema_id(ser.protobuf({"id": 1, "text": "x"})), 987654]
            answers = []
            for sid in ids:
                status, body = servers.http_get("%s/schemas/ids/%d" % (reg.url, sid))
                doc = json.loads(body)
                assert set(doc) <= {"schema", "schemaType", "references", "error_code",
                                    "message"}, doc
                answers.append((status, doc.get("schema"), doc.get("schemaType") or "AVRO",
                                doc.get("references") or [], doc.get("error_code")))
            got.append(answers)
        apicurio, stand = got
        assert [a[0] for a in apicurio] == [200, 200, 200, 404]
        assert [a[2] for a in apicurio[:3]] == ["AVRO", "JSON", "PROTOBUF"]
        assert apicurio[3][4] == 40403
        assert stand == apicurio
    finally:
        stand_in.close()
