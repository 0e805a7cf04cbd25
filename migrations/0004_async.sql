-- The asynchronous invocation queue (src/asyncq.c, docs/async.md).
--
-- Invoke with X-Amz-Invocation-Type: Event inserts a row here (many accepted requests share one
-- INSERT and one commit) and answers 202 only after the commit. Workers in every esmd instance
-- claim due rows of a function FOR UPDATE SKIP LOCKED: a claim sets the lease (lease_owner,
-- lease_token) and moves next_attempt_at to the lease's end, so the row of a worker that died
-- becomes due again by itself. After the invocation the row is deleted (success, or routed to
-- on_failure / dead_letter once they are committed in esmd.outbox) or updated for a retry
-- (next_attempt_at = now() + delay, lease cleared). Inserts NOTIFY 'esmd_async' (payload: the
-- function name) to wake the workers.
CREATE SCHEMA IF NOT EXISTS esmd;

CREATE TABLE esmd.async_events (
    id bigserial PRIMARY KEY,
    function text NOT NULL,
    request_id uuid NOT NULL,          -- x-amzn-RequestId given to the caller
    payload text NOT NULL,             -- the event (JSON text, byte for byte as received)
    received_at timestamptz NOT NULL DEFAULT now(),
    attempts integer NOT NULL DEFAULT 0,   -- function errors so far (maximum_retry_attempts)
    invokes integer NOT NULL DEFAULT 0,    -- invocations sent (approximateInvokeCount)
    throttles integer NOT NULL DEFAULT 0,  -- throttles / system errors in a row (backoff step)
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    last_status integer,               -- HTTP status of the last attempt (0: no response)
    last_function_error text,          -- X-Amz-Function-Error of the last attempt
    last_response text,                -- body of the last attempt (up to 1 MiB)
    last_error text,                   -- why the last attempt failed
    lease_owner text,                  -- instance id of the claimer, NULL when not claimed
    lease_token uuid                   -- the claiming process (a new one at every start)
);

CREATE INDEX async_events_due ON esmd.async_events (function, next_attempt_at, id);

COMMENT ON TABLE esmd.async_events IS
    'esmd asynchronous invocations waiting to run or to be retried; see docs/async.md';
COMMENT ON COLUMN esmd.async_events.next_attempt_at IS
    'due at this time: now() at insert, the lease end while claimed, now() + delay after a '
    'retriable failure';

-- Run-time overrides of a function's `async` block (PutFunctionEventInvokeConfig and friends).
-- While a row exists, each non-NULL field wins over the YAML; a NULL field falls back to the
-- YAML (or Lambda's default). on_success / on_failure: '' means "no destination" (Lambda's
-- empty {} object), NULL means "as in the YAML". DeleteFunctionEventInvokeConfig deletes the
-- row: the YAML applies again. Changes NOTIFY 'esmd_async_config' with the function name.
CREATE TABLE esmd.event_invoke_config (
    function_name text PRIMARY KEY,
    maximum_retry_attempts integer CHECK (maximum_retry_attempts BETWEEN 0 AND 2),
    maximum_event_age_seconds integer CHECK (maximum_event_age_seconds BETWEEN 60 AND 21600),
    on_success text,
    on_failure text,
    last_modified timestamptz NOT NULL DEFAULT now()
);

COMMENT ON TABLE esmd.event_invoke_config IS
    'esmd per-function overrides of the YAML async block (Lambda EventInvokeConfig)';

-- Message attributes of an outbox record (SQS's shape, see esmd.message_attributes()), written
-- with pgqueue:// destinations: the async queue's dead-letter messages carry RequestID,
-- ErrorCode and ErrorMessage this way. NULL: none.
ALTER TABLE esmd.outbox ADD COLUMN attributes jsonb;
