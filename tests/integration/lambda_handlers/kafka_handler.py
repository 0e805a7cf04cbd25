"""A Kafka consumer as Lambda users write it with Powertools: @kafka_consumer with a JSON value
schema; every record's decoded fields are recorded, the raw event is checked against the
parser's KafkaSelfManagedEventModel and read again through the KafkaEvent data class."""

import base64

from aws_lambda_powertools.utilities.data_classes import KafkaEvent
from aws_lambda_powertools.utilities.kafka import ConsumerRecords, SchemaConfig, kafka_consumer
from aws_lambda_powertools.utilities.parser.models import KafkaSelfManagedEventModel

from _record import record, try_model

SCHEMA = SchemaConfig(value_schema_type="JSON")


def _decoded(rec):
    out = {"topic": rec.topic, "partition": rec.partition, "offset": rec.offset,
           "timestamp": rec.timestamp, "timestamp_type": rec.timestamp_type}
    try:
        out["key"] = rec.key  # base64-decoded text (no key schema), None without a key
        out["value"] = rec.value  # JSON-decoded (value_schema_type JSON)
        out["headers"] = {k: v.decode() if isinstance(v, bytes) else v
                          for k, v in rec.headers.items()}
    except Exception as e:  # noqa: BLE001 - recorded, so the test can say what broke
        out["error"] = "%s: %s" % (type(e).__name__, e)
    return out


@kafka_consumer(schema_config=SCHEMA)
def handler(event: ConsumerRecords, context):
    raw = event.raw_event
    decoded = [_decoded(r) for r in event.records]
    data_class = []
    try:
        ev = KafkaEvent(raw)
        for r in ev.records:
            data_class.append({
                "topic": r.topic, "partition": r.partition, "offset": r.offset,
                "key": base64.b64encode(r.decoded_key).decode() if r.decoded_key is not None
                else None,
                "json_value": r.json_value,
                "headers": {k: v.decode() for k, v in r.decoded_headers.items()}})
        data_class_error = None
    except Exception as e:  # noqa: BLE001
        data_class_error = "%s: %s" % (type(e).__name__, e)
    record(context, raw, decoded=decoded, data_class=data_class,
           data_class_error=data_class_error,
           model_errors=try_model(KafkaSelfManagedEventModel, raw),
           event_source=event.event_source, bootstrap_servers=event.bootstrap_servers)
    return {"statusCode": 200}
