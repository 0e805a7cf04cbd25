"""A Kafka consumer with Powertools' batch processing: BatchProcessor(EventType.Kafka) and
process_partial_response, whose itemIdentifier is {"partition": "topic-N", "offset": n}. A
record whose JSON value has "fail": N raises for its first N deliveries (counted by
topic-partition-offset in this runtime process)."""

from aws_lambda_powertools.utilities.batch import (BatchProcessor, EventType,
                                                   process_partial_response)
from aws_lambda_powertools.utilities.data_classes.kafka_event import KafkaEventRecord

from _record import record

processor = BatchProcessor(event_type=EventType.Kafka)
_seen = {}


def record_handler(record: KafkaEventRecord):
    key = "%s-%d-%d" % (record.topic, record.partition, record.offset)
    _seen[key] = _seen.get(key, 0) + 1
    value = record.json_value
    if _seen[key] <= int(value.get("fail", 0)):
        raise ValueError("refusing %s" % key)
    return value


def handler(event, context):
    delivered = [{"partition": r["partition"], "offset": r["offset"]}
                 for recs in event.get("records", {}).values() for r in recs]
    try:
        result = process_partial_response(event=event, record_handler=record_handler,
                                          processor=processor, context=context)
    except Exception as e:  # every record failed: Powertools raises, a function error
        record(context, event, delivered=delivered, error=("%s: %s" % (type(e).__name__, e))[:2000])
        raise
    record(context, event, delivered=delivered, result=result)
    return result
