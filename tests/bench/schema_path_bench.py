#!/usr/bin/env python3
"""Schema registry through the whole path: Kafka → esmd (Avro or Protobuf decoded) → HTTP function,
against the same data as plain JSON in the same run (issue 15, part 6; not a test).

Run with the test environment's python (.venv/bin/python): the Avro records are written by the
confluent-kafka client's real AvroSerializer and the Protobuf records by its ProtobufSerializer
(the message classes built at run time from a descriptor: no protoc here), which register the
schema over HTTP with the
registry stand-in tests/integration/schema_registry.py (a JVM registry beside the measured path
would blur the ratio; test_schema_registry.py checks the stand-in against the real Apicurio
Registry); esmd fetches the schema from it over HTTP.

Broker: librdkafka's mock cluster (build/kafkatool mock), as kafka_bench.py's first series: no
JVM sharing the two CPUs, so the figures move less from run to run. Three topics hold the same
orders, as Confluent-framed Avro (about 200 B a record), as Confluent-framed Protobuf (the same
fields), and as the JSON of the same values (what a producer without a registry would write).
Each round runs esmd once on each topic (one mapping, a consumer group of its own, from
trim_horizon) until the sink has seen every record, rotating which goes first; the ratios Avro /
JSON and Protobuf / JSON of records/s are taken within each round.

    .venv/bin/python tests/bench/schema_path_bench.py [--build DIR] [--records N] [--rounds R]
"""

import argparse
import base64
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchlib as bl  # noqa: E402
from benchlib import log  # noqa: E402

sys.path.insert(0, os.path.join(bl.ROOT, "tests", "integration"))
from schema_registry import Registry  # noqa: E402

ORDER = {"type": "record", "name": "Order", "namespace": "shop", "fields": [
    {"name": "id", "type": "long"},
    {"name": "created_at", "type": {"type": "long", "logicalType": "timestamp-millis"}},
    {"name": "status", "type": {"type": "enum", "name": "Status",
                                "symbols": ["NEW", "PAID", "SHIPPED", "CANCELLED"]}},
    {"name": "customer", "type": {"type": "record", "name": "Customer", "fields": [
        {"name": "id", "type": "long"}, {"name": "name", "type": "string"},
        {"name": "email", "type": "string"}, {"name": "street", "type": "string"},
        {"name": "city", "type": "string"}]}},
    {"name": "lines", "type": {"type": "array", "items": {
        "type": "record", "name": "Line", "fields": [
            {"name": "sku", "type": "string"}, {"name": "qty", "type": "int"},
            {"name": "price", "type": "double"}]}}},
    {"name": "total", "type": "double"},
    {"name": "currency", "type": "string"},
    {"name": "channel", "type": "string"},
    {"name": "note", "type": ["null", "string"], "default": None}]}

CITIES = ["Lisbon", "Porto", "Braga", "Coimbra", "Faro", "Aveiro"]
STREETS = ["das Flores", "de Santa Catarina", "Augusta", "do Ouro", "da Prata"]
NAMES = ["Ana Silva", "João Costa", "Maria Santos", "Pedro Oliveira", "Rita Ferreira"]


def make_order(r, i):
    lines = [{"sku": "SKU-%05d" % r.randrange(100000), "qty": r.randint(1, 5),
              "price": round(r.uniform(1, 200), 2)} for _ in range(r.randint(3, 5))]
    name = r.choice(NAMES)
    return {"id": 1000000 + i, "created_at": 1765000000000 + i * 37,
            "status": r.choice(["NEW", "PAID", "SHIPPED", "CANCELLED"]),
            "customer": {"id": r.randrange(1, 10 ** 6), "name": name,
                         "email": name.lower().replace(" ", ".") + "@example.com",
                         "street": "Rua %s %d" % (r.choice(STREETS), r.randint(1, 400)),
                         "city": r.choice(CITIES)},
            "lines": lines, "total": round(sum(x["qty"] * x["price"] for x in lines), 2),
            "currency": "EUR", "channel": r.choice(["web", "mobile-app", "store", "phone"]),
            "note": None if r.random() < 0.7 else "leave at the door"}


def protobuf_order_class():
    """The Avro schema above as a proto3 message (package shop), built without protoc."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
    F = descriptor_pb2.FieldDescriptorProto
    fdp = descriptor_pb2.FileDescriptorProto(name="shop_order.proto", package="shop",
                                             syntax="proto3")

    def message(parent, name, fields):
        m = parent.add(name=name)
        for i, (fname, typ, *rest) in enumerate(fields, 1):
            f = m.field.add(name=fname, number=i, type=typ, label=F.LABEL_OPTIONAL)
            for r in rest:
                if r == "repeated":
                    f.label = F.LABEL_REPEATED
                elif r == "optional":
                    f.proto3_optional = True
                    f.oneof_index = len(m.oneof_decl)
                    m.oneof_decl.add(name="_" + fname)
                else:
                    f.type_name = r
        return m

    message(fdp.message_type, "Order", [
        ("id", F.TYPE_INT64), ("created_at", F.TYPE_INT64),
        ("status", F.TYPE_ENUM, ".shop.Status"), ("customer", F.TYPE_MESSAGE, ".shop.Customer"),
        ("lines", F.TYPE_MESSAGE, ".shop.Line", "repeated"), ("total", F.TYPE_DOUBLE),
        ("currency", F.TYPE_STRING), ("channel", F.TYPE_STRING),
        ("note", F.TYPE_STRING, "optional")])
    message(fdp.message_type, "Customer", [
        ("id", F.TYPE_INT64), ("name", F.TYPE_STRING), ("email", F.TYPE_STRING),
        ("street", F.TYPE_STRING), ("city", F.TYPE_STRING)])
    message(fdp.message_type, "Line", [
        ("sku", F.TYPE_STRING), ("qty", F.TYPE_INT32), ("price", F.TYPE_DOUBLE)])
    e = fdp.enum_type.add(name="Status")
    for i, n in enumerate(["NEW", "PAID", "SHIPPED", "CANCELLED"]):
        e.value.add(name=n, number=i)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("shop.Order"))


def to_protobuf(cls, o):
    m = cls(id=o["id"], created_at=o["created_at"], status=o["status"], total=o["total"],
            currency=o["currency"], channel=o["channel"], customer=o["customer"],
            lines=o["lines"])
    if o["note"] is not None:
        m.note = o["note"]
    return m


def parse_args():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    bl.add_build_arg(ap, "esmd, kafkatool, sink")
    ap.add_argument("--records", type=int, default=200000, help="records per topic")
    ap.add_argument("--partitions", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="esmd runs per topic")
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--window", default="500ms", help="maximum_batching_window")
    ap.add_argument("--concurrency", type=int, default=16, help="function max_concurrency")
    ap.add_argument("--timeout", type=float, default=300, help="seconds to wait for esmd")
    ap.add_argument("--property", action="append", default=[], metavar="KEY=VALUE",
                    help="librdkafka property for esmd's connection (repeatable)")
    bl.add_run_args(ap)
    return ap.parse_args()


def write_config(path, a, pg_url, admin_port, bootstrap, sink_port, topic, group, registry):
    connections = '  bench-kafka:\n    type: kafka\n    bootstrap_servers: "%s"\n' % bootstrap
    if a.property:
        connections += "    properties:\n" + "".join(
            "      %s: %s\n" % tuple(json.dumps(x) for x in kv.split("=", 1)) for kv in a.property)
    sr = ""
    if registry:
        sr = ("      schema_registry:\n        url: %s\n        event_record_format: JSON\n"
              % registry)
    mappings = """\
  - name: bench
    function: sink
    source:
      kafka: bench-kafka
      topics: [{topic}]
      consumer_group: {group}
      starting_position: trim_horizon
{sr}    batch_size: {batch}
    maximum_batching_window: {window}
""".format(topic=topic, group=group, sr=sr, batch=a.batch_size, window=a.window)
    bl.esmd_config(path, "schema_path_bench.py", pg_url, admin_port, sink_port, a.concurrency,
                   connections, mappings)


def produce(tools, bootstrap, topic, values, partitions):
    lines = "".join(json.dumps({"partition": i % partitions, "key": None,
                                "value_b64": base64.b64encode(v).decode()}) + "\n"
                    for i, v in enumerate(values))
    out = subprocess.run([tools["kafkatool"], "produce", "-b", bootstrap, "-t", topic],
                         input=lines.encode(), capture_output=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError("kafkatool produce: %s" % out.stderr.decode(errors="replace"))


def one_run(a, tools, tmp, pg, bootstrap, sink_port, topic, registry, n):
    cfg = os.path.join(tmp, "esmd-%s-%d.yaml" % (topic, n))
    admin_port = bl.free_port()
    write_config(cfg, a, pg.url, admin_port, bootstrap, sink_port, topic,
                 "bench-%s-%d" % (topic, n), registry)
    esmd_log = os.path.join(tmp, "esmd-%s-%d.log" % (topic, n))
    procs = bl.Procs()
    try:
        base = bl.sink_stats(sink_port)
        with open(esmd_log, "w") as logf:
            t_start = time.monotonic()
            esmd = procs.start("esmd", a.wrap.split() + [tools["esmd"], "run", "-c", cfg],
                               stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        w = bl.wait_for_sink(esmd, sink_port, a.records, a.timeout, esmd_log, t_start, base)
        cpu = bl.cpu_seconds(esmd.pid)
        stats = bl.sink_stats(sink_port)
        r = bl.esmd_figures(a.records, t_start, w, stats, base)
        r["cpu"] = cpu
        rc = procs.stop(esmd, timeout=30)
        if rc != 0:
            raise RuntimeError("esmd exited with %d; %s" % (rc, bl.tail(esmd_log)))
        return r
    finally:
        procs.stop_all()


def main():
    a = parse_args()
    from confluent_kafka.schema_registry import SchemaRegistryClient
    from confluent_kafka.schema_registry.avro import AvroSerializer
    from confluent_kafka.schema_registry.protobuf import ProtobufSerializer
    from confluent_kafka.serialization import MessageField, SerializationContext

    tools = bl.find_tools(a.build, ["kafkatool", "sink", "esmd"], "schema_path_bench")
    registry = Registry()
    tmp = tempfile.mkdtemp(prefix="esmd-schema-bench-")
    procs = bl.Procs()
    pg = bl.PgTmp(keep=a.keep)
    try:
        r = random.Random(15)
        orders = [make_order(r, i) for i in range(a.records)]
        ser = AvroSerializer(SchemaRegistryClient({"url": registry.url}), json.dumps(ORDER))
        ctx = SerializationContext("avro", MessageField.VALUE)
        t0 = time.monotonic()
        avro = [ser(o, ctx) for o in orders]
        log("%d records serialized by AvroSerializer in %.1f s" % (len(avro),
                                                                   time.monotonic() - t0))
        cls = protobuf_order_class()
        pser = ProtobufSerializer(cls, SchemaRegistryClient({"url": registry.url}),
                                  {"use.deprecated.format": False})
        pctx = SerializationContext("protobuf", MessageField.VALUE)
        t0 = time.monotonic()
        pb = [pser(to_protobuf(cls, o), pctx) for o in orders]
        log("%d records serialized by ProtobufSerializer in %.1f s" % (len(pb),
                                                                       time.monotonic() - t0))
        plain = [json.dumps(o, ensure_ascii=False, separators=(",", ":")).encode()
                 for o in orders]
        sizes = {"avro": statistics.mean(len(v) for v in avro),
                 "protobuf": statistics.mean(len(v) for v in pb),
                 "json": statistics.mean(len(v) for v in plain)}

        mock = procs.start("mock", [tools["kafkatool"], "mock", "--topic",
                                    "avro:%d" % a.partitions, "--topic",
                                    "protobuf:%d" % a.partitions, "--topic",
                                    "json:%d" % a.partitions],
                           stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        bootstrap = bl.first_line(mock, "kafkatool mock")
        for topic, values in (("avro", avro), ("protobuf", pb), ("json", plain)):
            produce(tools, bootstrap, topic, values, a.partitions)
            wm = json.loads(bl.run([tools["kafkatool"], "watermarks", "-b", bootstrap, "-t",
                                    topic], 60))
            if sum(hi - lo for lo, hi in wm.values()) != a.records:
                raise RuntimeError("the mock holds %s of topic %s (its 5 MB per partition?):"
                                   " raise --partitions" % (wm, topic))
        sink, sink_port = bl.start_sink(procs, tools)
        log("start postgres")
        pg.start()

        rounds = []
        for n in range(a.rounds):
            topics = ["json", "avro", "protobuf"]
            order_ = topics[n % 3:] + topics[:n % 3]
            res = {}
            for topic in order_:
                res[topic] = one_run(a, tools, tmp, pg, bootstrap, sink_port, topic,
                                     registry.url if topic != "json" else None, n)
                log("round %d %s: %.0f records/s" % (n + 1, topic, res[topic]["esmd_rate"]))
            rounds.append(res)
        fetches = registry.all_fetches()
    finally:
        procs.stop_all()
        pg.stop()
        registry.close()
        if not a.keep:
            import shutil
            shutil.rmtree(tmp, ignore_errors=True)

    print()
    print("Kafka (librdkafka mock cluster, %d partitions) -> esmd -> sink; %d records per topic;"
          " Avro %.0f B framed, Protobuf %.0f B framed, the same values as JSON %.0f B;"
          " batch_size %d, max_concurrency %d; %d CPUs" % (
              a.partitions, a.records, sizes["avro"], sizes["protobuf"], sizes["json"],
              a.batch_size, a.concurrency, os.cpu_count()))
    print("schema fetches per id: %s" % fetches)
    print()
    print("| round | JSON records/s | Avro records/s | Protobuf records/s | Avro / JSON |"
          " Protobuf / JSON | esmd CPU µs/record: JSON | Avro | Protobuf |")
    print("|---|---|---|---|---|---|---|---|---|")
    ratios, pratios = [], []
    for n, res in enumerate(rounds, 1):
        ratio = res["avro"]["esmd_rate"] / res["json"]["esmd_rate"]
        pratio = res["protobuf"]["esmd_rate"] / res["json"]["esmd_rate"]
        ratios.append(ratio)
        pratios.append(pratio)
        print("| %d | %s | %s | %s | %.2f | %.2f | %.1f | %.1f | %.1f |" % (
            n, "{:,.0f}".format(res["json"]["esmd_rate"]),
            "{:,.0f}".format(res["avro"]["esmd_rate"]),
            "{:,.0f}".format(res["protobuf"]["esmd_rate"]), ratio, pratio,
            1e6 * res["json"]["cpu"] / a.records, 1e6 * res["avro"]["cpu"] / a.records,
            1e6 * res["protobuf"]["cpu"] / a.records))
    print()
    print("median Avro / JSON: %.2f, Protobuf / JSON: %.2f (target: at least 0.50)" % (
        statistics.median(ratios), statistics.median(pratios)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
