#!/usr/bin/env python3
"""Writes the golden events of tests/unit/test_redis_encode.c with Python's json and base64,
independently of the C encoder (connectors/redis/redis_encode.c). Run from this directory:

    python3 golden.py

The entries here must match the ones the C test builds by hand."""

import base64
import json


def js(s):
    """A JSON string as esmd writes it: UTF-8 kept, control characters escaped."""
    if isinstance(s, bytes):
        s = s.decode("utf-8")
    return json.dumps(s, ensure_ascii=False)


def b64(b):
    return base64.b64encode(b).decode()


def utf8(b):
    try:
        b.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def record(stream, arn, ms, seq, count, fields):
    entry_id = "%d-%d" % (ms, seq)
    text = [(n, v) for n, v in fields if utf8(n) and utf8(v)]
    binary = [(n, v) for n, v in fields if not (utf8(n) and utf8(v))]
    # written by hand: a repeated field name stays repeated, which a dict cannot hold
    out = '{"redis":{"redisSchemaVersion":"1.0","stream":%s,"sequenceNumber":"%s",' % (
        js(stream), entry_id)
    out += '"approximateArrivalTimestamp":%d.%03d,"deliveryCount":%d,' % (ms // 1000, ms % 1000,
                                                                        count)
    out += '"fields":{%s}' % ",".join("%s:%s" % (js(n), js(v)) for n, v in text)
    if binary:
        out += ',"binaryFields":[%s]' % ",".join(
            '{"name":"%s","value":"%s"}' % (b64(n), b64(v)) for n, v in binary)
    out += '},"eventSource":"esmd:redis","eventVersion":"1.0","eventID":%s,' % js(
        "%s:%s" % (stream, entry_id))
    out += '"eventName":"esmd:redis:record","eventSourceARN":%s}' % js(arn)
    json.loads(out)  # well-formed
    return out


def event(records):
    out = '{"Records":[%s]}' % ",".join(records)
    json.loads(out)
    return out


ORDERS_ARN = "arn:esmd:redis:127.0.0.1:6379/0:stream/orders"
two = event([
    record("orders", ORDERS_ARN, 1700000000123, 0, 1, [
        (b"type", b"order_created"),
        (b"payload", b'{"id":1,"total":9.5}'),
        (b"note", '\u00eb "quoted"\n'.encode()),
    ]),
    record("orders", ORDERS_ARN, 1700000000124, 7, 3, [
        (b"k", b"1"),
        (b"k", b"2"),
        (b"empty", b""),
        (b"blob", b"\x00\xff\x10\x80"),
        (b"\xff\xfename", b"v"),
        (b"ctl", b"\x01\x7f"),
    ]),
])
weird_stream = 'q"s\\\u00eb/x'
weird_arn = "arn:esmd:redis:[::1]:6380/2:stream/" + weird_stream
weird = event([record(weird_stream, weird_arn, 5, 1, 2, [(b"a", b"b")])])

with open("two_entries.json", "w") as f:
    f.write(two + "\n")
with open("escaped_stream.json", "w") as f:
    f.write(weird + "\n")
