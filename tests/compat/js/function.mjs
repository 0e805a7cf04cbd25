// A function endpoint written the way a Lambda user writes a Node.js handler with Powertools for
// AWS Lambda (TypeScript): the event is validated with Powertools' parser schema for its source
// and processed with BatchProcessor + processPartialResponse. Served over HTTP as esmd's
// endpoint contract wants it (docs/endpoint.md): POST the event, answer the handler's result.
//
//   node function.mjs MODE PORT CAPTURE_FILE
//     MODE: kafka | sqs | kinesis
//     Every event received is appended to CAPTURE_FILE as one JSON line
//     {"event": ..., "parsed": bool, "parseError": str|null, "failures": [itemIdentifier...],
//      "processed": [payload...]}.
//
// A record whose decoded payload is a JSON object with "fail": true (or "true") fails the first time its
// "id" is seen (the record handler throws), and succeeds afterwards: Powertools reports it in
// batchItemFailures, and esmd must deliver exactly those records again.
import { appendFileSync } from 'node:fs';
import { createServer } from 'node:http';

import {
  BatchProcessor,
  EventType,
  processPartialResponse,
} from '@aws-lambda-powertools/batch';
import { kafkaConsumer, SchemaType } from '@aws-lambda-powertools/kafka';
import {
  KafkaSelfManagedEventSchema,
  KinesisDataStreamSchema,
  SqsSchema,
} from '@aws-lambda-powertools/parser/schemas';

const [mode, port, capture] = process.argv.slice(2);
const schemas = {
  kafka: KafkaSelfManagedEventSchema,
  sqs: SqsSchema,
  kinesis: KinesisDataStreamSchema,
};
if (!schemas[mode] || !port || !capture) {
  console.error('usage: node function.mjs kafka|sqs|kinesis PORT CAPTURE_FILE');
  process.exit(2);
}
const seen = new Set();

// The payload of one record, as the record's own library reads it.
function payloadOf(record) {
  if (mode === 'sqs') return record.body;
  return Buffer.from(record.kinesis.data, 'base64').toString();
}

async function handler(event) {
  const out = { event, parsed: false, parseError: null, failures: [], processed: [] };
  try {
    schemas[mode].parse(event);
    out.parsed = true;
  } catch (e) {
    out.parseError = String(e && e.message ? e.message : e).slice(0, 2000);
  }
  if (mode === 'kafka') {
    // Powertools' Kafka consumer: values deserialized as JSON, keys as text, headers decoded.
    await kafkaConsumer(
      async (ev) => {
        for (const r of ev.records) {
          out.processed.push({
            topic: r.topic,
            partition: r.partition,
            offset: r.offset,
            key: r.key === undefined ? null : r.key,
            value: r.value,
            headers: r.headers,
          });
        }
      },
      { value: { type: SchemaType.JSON } }
    )(event, {});
    appendFileSync(capture, JSON.stringify(out) + '\n');
    return {};
  }
  const processor = new BatchProcessor(
    mode === 'sqs' ? EventType.SQS : EventType.KinesisDataStreams
  );
  const recordHandler = async (record) => {
    const text = payloadOf(record);
    let doc = null;
    try {
      doc = JSON.parse(text);
    } catch {
      doc = null;
    }
    if (doc && (doc.fail === true || doc.fail === "true") && !seen.has(String(doc.id))) {
      seen.add(String(doc.id));
      throw new Error(`record ${doc.id} fails once`);
    }
    out.processed.push(text);
  };
  const result = await processPartialResponse(event, recordHandler, processor, {
    throwOnFullBatchFailure: false,
  });
  out.failures = result.batchItemFailures.map((f) => f.itemIdentifier);
  appendFileSync(capture, JSON.stringify(out) + '\n');
  return result;
}

const server = createServer((req, res) => {
  if (req.method === 'GET') {
    res.writeHead(200, { 'Content-Type': 'application/json' });
    res.end('{"ok":true}');
    return;
  }
  const chunks = [];
  req.on('data', (c) => chunks.push(c));
  req.on('end', async () => {
    let status = 200;
    let body;
    try {
      body = JSON.stringify(await handler(JSON.parse(Buffer.concat(chunks).toString())));
    } catch (e) {
      // What the Runtime Interface Emulator answers for an unhandled error.
      body = JSON.stringify({ errorType: e.name || 'Error', errorMessage: String(e.message) });
    }
    res.writeHead(status, { 'Content-Type': 'application/json' });
    res.end(body);
  });
});
server.keepAliveTimeout = 60000;
server.listen(Number(port), '127.0.0.1', () => console.log(`listening ${port}`));
