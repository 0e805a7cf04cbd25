"""An SQS consumer with Powertools' batch processing: BatchProcessor(EventType.SQS) and
process_partial_response. A record whose JSON body has "fail": N raises while its
ApproximateReceiveCount is at most N, so exactly those messages come back in batchItemFailures.
The raw event is checked against the parser's SqsModel."""

import json

from aws_lambda_powertools.utilities.batch import (BatchProcessor, EventType,
                                                   process_partial_response)
from aws_lambda_powertools.utilities.data_classes.sqs_event import SQSRecord
from aws_lambda_powertools.utilities.parser.models import SqsModel

from _record import record, try_model

processor = BatchProcessor(event_type=EventType.SQS)


def record_handler(record: SQSRecord):
    rec = record
    body = json.loads(rec.body)
    if int(rec.attributes.approximate_receive_count) <= int(body.get("fail", 0)):
        raise ValueError("refusing message %s" % body.get("i"))
    return body


def handler(event, context):
    model_errors = try_model(SqsModel, event)
    try:
        result = process_partial_response(event=event, record_handler=record_handler,
                                          processor=processor, context=context)
    except Exception as e:  # every record failed: Powertools raises, a function error
        record(context, event, error=("%s: %s" % (type(e).__name__, e))[:2000],
               model_errors=model_errors)
        raise
    record(context, event, result=result, model_errors=model_errors)
    return result
