// The AWS SDK for JavaScript v3 (@aws-sdk/client-lambda), unchanged, against esmd's admin
// listener: every Lambda operation esmd supports (docs/admin.md, docs/async.md), SigV4-signed.
//
//   node sdk.mjs ENDPOINT ACCESS_KEY SECRET FUNCTION
//
// Prints one JSON object: {"ok": bool, "checks": [{"name", "ok", "detail"}...]}. A check fails
// when an operation answers differently from Lambda's contract, when the SDK reports no request
// id ($metadata.requestId), or when an error is not the SDK's modelled exception class.
import {
  DeleteFunctionEventInvokeConfigCommand,
  GetEventSourceMappingCommand,
  GetFunctionEventInvokeConfigCommand,
  InvalidParameterValueException,
  InvokeCommand,
  LambdaClient,
  ListEventSourceMappingsCommand,
  ListFunctionEventInvokeConfigsCommand,
  PutFunctionEventInvokeConfigCommand,
  RequestTooLargeException,
  ResourceNotFoundException,
  UpdateEventSourceMappingCommand,
  UpdateFunctionEventInvokeConfigCommand,
} from '@aws-sdk/client-lambda';

const [endpoint, accessKeyId, secretAccessKey, fn] = process.argv.slice(2);
const client = new LambdaClient({
  endpoint,
  region: 'us-east-1',
  credentials: { accessKeyId, secretAccessKey },
  maxAttempts: 1,
});
const checks = [];
const uuidRe = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

function check(name, ok, detail) {
  checks.push({ name, ok: Boolean(ok), detail: detail === undefined ? null : detail });
}

async function op(name, command, expect) {
  try {
    const out = await client.send(command);
    check(`${name}: request id`, uuidRe.test(out.$metadata.requestId || ''), out.$metadata);
    if (expect) check(name, expect(out), out);
    return out;
  } catch (e) {
    check(name, false, `${e.name}: ${e.message}`);
    return null;
  }
}

async function fails(name, command, cls, status) {
  try {
    const out = await client.send(command);
    check(name, false, { unexpectedSuccess: out });
  } catch (e) {
    check(`${name}: class ${cls.name}`, e instanceof cls, `${e.name}: ${e.message}`);
    check(`${name}: status ${status}`, e.$metadata && e.$metadata.httpStatusCode === status,
      e.$metadata);
    check(`${name}: request id`, uuidRe.test((e.$metadata && e.$metadata.requestId) || ''),
      e.$metadata);
  }
}

const listed = await op('ListEventSourceMappings',
  new ListEventSourceMappingsCommand({ FunctionName: fn }),
  (o) => o.EventSourceMappings.length === 1);
const uuid = listed && listed.EventSourceMappings[0].UUID;
if (uuid) {
  await op('GetEventSourceMapping', new GetEventSourceMappingCommand({ UUID: uuid }),
    (o) => o.UUID === uuid && o.FunctionArn.endsWith(`:function:${fn}`));
  const pattern = JSON.stringify({ value: { type: ['paid'] } });
  await op('UpdateEventSourceMapping',
    new UpdateEventSourceMappingCommand({
      UUID: uuid, BatchSize: 33, FilterCriteria: { Filters: [{ Pattern: pattern }] },
    }),
    (o) => o.BatchSize === 33 && o.FilterCriteria.Filters[0].Pattern === pattern);
  await fails('UpdateEventSourceMapping with a bad pattern',
    new UpdateEventSourceMappingCommand({
      UUID: uuid, FilterCriteria: { Filters: [{ Pattern: '{"a": [{"prefx": 1}]}' }] },
    }), InvalidParameterValueException, 400);
}
await fails('GetEventSourceMapping of an unknown UUID',
  new GetEventSourceMappingCommand({ UUID: '00000000-0000-4000-8000-000000000000' }),
  ResourceNotFoundException, 404);

await op('PutFunctionEventInvokeConfig',
  new PutFunctionEventInvokeConfigCommand({ FunctionName: fn, MaximumRetryAttempts: 1 }),
  (o) => o.MaximumRetryAttempts === 1);
await op('UpdateFunctionEventInvokeConfig',
  new UpdateFunctionEventInvokeConfigCommand({ FunctionName: fn, MaximumEventAgeInSeconds: 90 }),
  (o) => o.MaximumRetryAttempts === 1 && o.MaximumEventAgeInSeconds === 90);
await op('GetFunctionEventInvokeConfig',
  new GetFunctionEventInvokeConfigCommand({ FunctionName: fn }),
  (o) => o.MaximumEventAgeInSeconds === 90);
await op('ListFunctionEventInvokeConfigs',
  new ListFunctionEventInvokeConfigsCommand({ FunctionName: fn }),
  (o) => o.FunctionEventInvokeConfigs.length === 1);
await op('DeleteFunctionEventInvokeConfig',
  new DeleteFunctionEventInvokeConfigCommand({ FunctionName: fn }));
await fails('GetFunctionEventInvokeConfig of an unknown function',
  new GetFunctionEventInvokeConfigCommand({ FunctionName: 'nosuch' }),
  ResourceNotFoundException, 404);

const enc = new TextEncoder();
await op('Invoke Event', new InvokeCommand({
  FunctionName: fn, InvocationType: 'Event', Payload: enc.encode('{"n":1}'),
}), (o) => o.StatusCode === 202);
await op('Invoke DryRun', new InvokeCommand({
  FunctionName: fn, InvocationType: 'DryRun', Payload: enc.encode('{}'),
}), (o) => o.StatusCode === 204);
await op('Invoke RequestResponse', new InvokeCommand({
  FunctionName: fn, InvocationType: 'RequestResponse', Payload: enc.encode('{"n":2}'),
}), (o) => o.StatusCode === 200 && new TextDecoder().decode(o.Payload) === '{}');
await fails('Invoke of an unknown function', new InvokeCommand({
  FunctionName: 'nosuch', InvocationType: 'Event', Payload: enc.encode('{}'),
}), ResourceNotFoundException, 404);
await fails('Invoke Event over 1 MB', new InvokeCommand({
  FunctionName: fn, InvocationType: 'Event',
  Payload: enc.encode(JSON.stringify('x'.repeat(1024 * 1024 + 10))),
}), RequestTooLargeException, 413);

console.log(JSON.stringify({ ok: checks.every((c) => c.ok), checks }));
