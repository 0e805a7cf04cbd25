"""A Kinesis Data Streams consumer with Powertools' batch processing:
BatchProcessor(EventType.KinesisDataStreams) and process_partial_response. A record whose data
(base64 JSON) has "fail": N raises for its first N deliveries (counted in the record file by
sequenceNumber), so exactly those records are in batchItemFailures. The raw event is checked
against the parser's KinesisDataStreamModel."""

import json
import os

from aws_lambda_powertools.utilities.batch import (BatchProcessor, EventType,
                                                   process_partial_response)
from aws_lambda_powertools.utilities.data_classes.kinesis_stream_event import \
    KinesisStreamRecord
from aws_lambda_powertools.utilities.parser.models import KinesisDataStreamModel

from _record import record, try_model

processor = BatchProcessor(event_type=EventType.KinesisDataStreams)
_seen = {}  # sequenceNumber -> deliveries seen by this runtime process


def record_handler(record: KinesisStreamRecord):
    rec = record
    seq = rec.kinesis.sequence_number
    _seen[seq] = _seen.get(seq, 0) + 1
    data = rec.kinesis.data_as_json()
    if _seen[seq] <= int(data.get("fail", 0)):
        raise ValueError("refusing record %s" % seq)
    return data


def handler(event, context):
    try:
        result = process_partial_response(event=event, record_handler=record_handler,
                                          processor=processor, context=context)
    except Exception as e:  # every record failed: Powertools raises, a function error
        record(context, event, error=("%s: %s" % (type(e).__name__, e))[:2000],
               model_errors=try_model(KinesisDataStreamModel, event))
        raise
    decoded = []
    for r in event.get("Records", []):
        k = KinesisStreamRecord(r).kinesis
        try:
            decoded.append({"sequenceNumber": k.sequence_number,
                            "partitionKey": k.partition_key, "data": k.data_as_json()})
        except Exception as e:  # noqa: BLE001
            decoded.append({"error": "%s: %s" % (type(e).__name__, e)})
    record(context, event, result=result, decoded=decoded,
           model_errors=try_model(KinesisDataStreamModel, event), pid=os.getpid())
    return result
