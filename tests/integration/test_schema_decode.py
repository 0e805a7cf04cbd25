"""esmd's schema registry decoders (connectors/kafka/kafka_schema.c, through build/srdecode)
against records written by the real serializers of the confluent-kafka Python client
(AvroSerializer, JSONSerializer) with fastavro and jsonschema underneath.

The serializers register their schemas with confluent-kafka's own in-memory registry client
(MockSchemaRegistryClient): only the bytes they write are used here, framing included, so the
decoders meet exactly what producers put on a topic. The registry side (fetching, caching,
waiting, a registry that is down) is not covered here: see the README, "Schema registry".

    every Avro type      records, nested records, enums, fixed, arrays, maps, unions, named-type
                         references, logical types; random values; esmd's JSON equals what
                         fastavro reads back (bytes as code points U+0000..U+00FF, unions as
                         their plain value)
    schema evolution     records written with version 1 and version 2 of a schema, each decoded
                         with the schema of its own id
    corrupt records      truncated or extended data, wrong union branch: refused, never garbage
    JSON Schema          the serializer's JSON comes through unchanged; broken JSON is refused
"""

import json
import math
import os
import random
import subprocess
import tempfile

import pytest

import servers

sr = pytest.importorskip("confluent_kafka.schema_registry")
from confluent_kafka.schema_registry._sync.mock_schema_registry_client import \
    MockSchemaRegistryClient  # noqa: E402
from confluent_kafka.schema_registry.avro import AvroSerializer  # noqa: E402
from confluent_kafka.schema_registry.json_schema import JSONSerializer  # noqa: E402
from confluent_kafka.serialization import MessageField, SerializationContext  # noqa: E402

ORDER_V1 = {
    "type": "record", "name": "Order", "namespace": "shop",
    "fields": [
        {"name": "id", "type": "long"},
        {"name": "qty", "type": "int"},
        {"name": "customer", "type": "string"},
        {"name": "paid", "type": "boolean"},
        {"name": "price", "type": "double"},
        {"name": "weight", "type": "float"},
        {"name": "blob", "type": "bytes"},
        {"name": "code", "type": {"type": "fixed", "name": "Code", "size": 3}},
        {"name": "state", "type": {"type": "enum", "name": "State",
                                   "symbols": ["NEW", "PAID", "SHIPPED"]}},
        {"name": "tags", "type": {"type": "array", "items": "string"}},
        {"name": "attrs", "type": {"type": "map", "values": ["null", "long", "string"]}},
        {"name": "note", "type": ["null", "string"], "default": None},
        {"name": "address", "type": {"type": "record", "name": "Address", "fields": [
            {"name": "city", "type": "string"},
            {"name": "zip", "type": ["null", "int"]}]}},
        {"name": "billing", "type": ["null", "Address"]},
        {"name": "alt_code", "type": "Code"},
        {"name": "day", "type": {"type": "int", "logicalType": "date"}},
        {"name": "at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
        {"name": "lines", "type": {"type": "array", "items": {
            "type": "record", "name": "Line", "fields": [
                {"name": "sku", "type": "string"}, {"name": "n", "type": "int"}]}}},
    ],
}

ORDER_V2 = json.loads(json.dumps(ORDER_V1))
ORDER_V2["fields"].append({"name": "channel", "type": "string", "default": "web"})

TEXT = ["", "a", "héllo", "日本語", "emoji \U0001F600", "quote \" and \\ and \n\t", "\x00\x1f"]


def rand_text(r):
    return r.choice(TEXT) + "".join(r.choice("abcxyz") for _ in range(r.randint(0, 8)))


def rand_address(r):
    return {"city": rand_text(r), "zip": r.choice([None, r.randint(-2**31, 2**31 - 1)])}


def rand_order(r, v2=False):
    o = {
        "id": r.choice([0, -1, 2**63 - 1, -2**63, r.randint(-2**40, 2**40)]),
        "qty": r.choice([0, 1, -1, 2**31 - 1, -2**31, r.randint(-1000, 1000)]),
        "customer": rand_text(r),
        "paid": r.random() < 0.5,
        "price": r.choice([0.0, -0.5, 1e300, 5e-324, 0.1, r.uniform(-1e6, 1e6)]),
        "weight": r.choice([0.0, 1.5, -2.25, 3.4028234663852886e38, r.uniform(-100, 100)]),
        "blob": bytes(r.randrange(256) for _ in range(r.randint(0, 12))),
        "code": bytes(r.randrange(256) for _ in range(3)),
        "state": r.choice(["NEW", "PAID", "SHIPPED"]),
        "tags": [rand_text(r) for _ in range(r.randint(0, 4))],
        "attrs": {rand_text(r): r.choice([None, r.randint(-5, 5), rand_text(r)])
                  for _ in range(r.randint(0, 4))},
        "note": r.choice([None, rand_text(r)]),
        "address": rand_address(r),
        "billing": r.choice([None, rand_address(r)]),
        "alt_code": b"\x00\x7f\xff",
        "day": r.randint(0, 30000),
        "at": r.randint(0, 2**41),
        "lines": [{"sku": rand_text(r), "n": r.randint(0, 9)} for _ in range(r.randint(0, 3))],
    }
    if v2:
        o["channel"] = rand_text(r)
    return o


def expected_json(o):
    """What esmd writes for a value fastavro wrote: bytes as code points U+0000..U+00FF."""
    if isinstance(o, bytes):
        return o.decode("latin-1")
    if isinstance(o, dict):
        return {k: expected_json(v) for k, v in o.items()}
    if isinstance(o, list):
        return [expected_json(v) for v in o]
    return o


def same(a, b, path="value"):
    if isinstance(a, float) or isinstance(b, float):
        assert isinstance(a, (int, float)) and isinstance(b, (int, float)), path
        assert math.isclose(a, b, rel_tol=1e-6, abs_tol=0) or a == b, "%s: %r != %r" % (path, a, b)
        return
    assert type(a) is type(b), "%s: %r != %r" % (path, a, b)
    if isinstance(a, dict):
        assert list(a) == list(b), "%s: keys %s != %s" % (path, list(a), list(b))
        for k in a:
            same(a[k], b[k], path + "." + k)
    elif isinstance(a, list):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, "%s[%d]" % (path, i))
    else:
        assert a == b, "%s: %r != %r" % (path, a, b)


def srdecode(fmt, schema_text, records):
    with tempfile.NamedTemporaryFile("w", suffix=".schema", delete=False) as f:
        f.write(schema_text)
    try:
        out = subprocess.run([servers.binary("srdecode"), fmt, f.name],
                             input="".join(r.hex() + "\n" for r in records),
                             capture_output=True, text=True, timeout=60, check=True).stdout
    finally:
        os.unlink(f.name)
    lines = out.split("\n")[:-1]  # not splitlines(): U+2028 and the like may be in the JSON
    assert len(lines) == len(records)
    return lines


def ok(line):
    assert line.startswith("OK "), line
    _, sid, text = line.split(" ", 2)
    return int(sid), json.loads(text)


@pytest.fixture
def registry():
    return MockSchemaRegistryClient({"url": "mock://esmd-test"})


def avro_serializer(registry, schema):
    return AvroSerializer(registry, json.dumps(schema), conf={"auto.register.schemas": True})


def test_avro_records_of_every_type_decode_as_fastavro_reads_them(registry):
    ser = avro_serializer(registry, ORDER_V1)
    ctx = SerializationContext("orders", MessageField.VALUE)
    r = random.Random(15)
    orders = [rand_order(r) for _ in range(300)]
    records = [ser(o, ctx) for o in orders]
    assert all(rec[0] == 0 for rec in records)  # Confluent framing
    lines = srdecode("AVRO", json.dumps(ORDER_V1), records)
    ids = set()
    for o, line in zip(orders, lines):
        sid, got = ok(line)
        ids.add(sid)
        same(got, expected_json(o))
    assert len(ids) == 1


def test_schema_evolution_each_record_with_the_schema_of_its_id(registry):
    ctx = SerializationContext("orders", MessageField.VALUE)
    r = random.Random(2)
    v1 = [rand_order(r) for _ in range(20)]
    v2 = [rand_order(r, v2=True) for _ in range(20)]
    rec1 = [avro_serializer(registry, ORDER_V1)(o, ctx) for o in v1]
    rec2 = [avro_serializer(registry, ORDER_V2)(o, ctx) for o in v2]
    id1, id2 = rec1[0][1:5], rec2[0][1:5]
    assert id1 != id2, "the registry gave version 2 its own id"
    for schema, recs, orders in ((ORDER_V1, rec1, v1), (ORDER_V2, rec2, v2)):
        for o, line in zip(orders, srdecode("AVRO", json.dumps(schema), recs)):
            same(ok(line)[1], expected_json(o))
    # the other version's schema does not read them: refused, not misread
    for line in srdecode("AVRO", json.dumps(ORDER_V1), rec2):
        assert line.startswith("ERR "), line


def test_corrupt_avro_records_are_refused(registry):
    ser = avro_serializer(registry, ORDER_V1)
    ctx = SerializationContext("orders", MessageField.VALUE)
    good = ser(rand_order(random.Random(3)), ctx)
    r = random.Random(4)
    bad = [good[:n] for n in range(5, len(good))]  # every truncation
    bad.append(good + b"\x00")  # a byte too many
    bad.append(b"\x01" + good[1:])  # not the magic byte
    lines = srdecode("AVRO", json.dumps(ORDER_V1), bad)
    assert all(line.startswith("ERR ") for line in lines), [l for l in lines if l[:3] != "ERR"]
    # random corruption: refused, or decoded to valid JSON (a flipped digit is still a number)
    flipped = []
    for _ in range(300):
        b = bytearray(good)
        b[r.randrange(5, len(b))] ^= 1 << r.randrange(8)
        flipped.append(bytes(b))
    for line in srdecode("AVRO", json.dumps(ORDER_V1), flipped):
        if line.startswith("OK "):
            ok(line)
        else:
            assert line.startswith("ERR "), line


JSON_SCHEMA = {
    "$schema": "http://json-schema.org/draft-07/schema#",
    "title": "Payment", "type": "object",
    "properties": {"id": {"type": "integer"}, "amount": {"type": "number"},
                   "tags": {"type": "array", "items": {"type": "string"}}},
    "required": ["id", "amount"],
}


def test_json_schema_records_come_through_unchanged(registry):
    ser = JSONSerializer(json.dumps(JSON_SCHEMA), registry)
    ctx = SerializationContext("payments", MessageField.VALUE)
    values = [{"id": i, "amount": i * 1.25, "tags": ["a", "é"][: i % 3]} for i in range(50)]
    records = [ser(v, ctx) for v in values]
    for v, line in zip(values, srdecode("JSON", json.dumps(JSON_SCHEMA), records)):
        assert ok(line)[1] == v
    broken = [records[0][:-1], records[0][:5] + b"\xff\xfe"]
    assert all(l.startswith("ERR ") for l in srdecode("JSON", json.dumps(JSON_SCHEMA), broken))
