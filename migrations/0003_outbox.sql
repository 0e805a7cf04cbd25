-- The destination outbox (src/destination.c, docs/destinations.md). A record for a destination
-- (an on-failure record of a mapping, an invocation record of the async queue) is inserted here
-- and committed before its source is acknowledged; a delivery worker in every esmd instance
-- claims due rows, writes them to their destination and deletes them once written.
--
-- Claiming: rows whose next_attempt_at has passed, per destination, FOR UPDATE SKIP LOCKED.
-- A claim sets the lease (lease_owner, lease_token, lease_until) and moves next_attempt_at to
-- the lease's end, so a row whose holder died becomes due again by itself when the lease ends.
-- A failed write: attempts + 1, next_attempt_at = now() + backoff, last_error, lease cleared.
-- pgqueue:// rows are deleted and sent with esmd.send_batch() (0002_pgqueue) in one statement.
CREATE SCHEMA IF NOT EXISTS esmd;

CREATE TABLE esmd.outbox (
    id bigserial PRIMARY KEY,
    destination text NOT NULL,         -- the destination URI, as configured
    payload text NOT NULL,             -- the JSON document, byte for byte as it will be written
    key bytea,                         -- kafka:// message key; NULL: no key
    created_at timestamptz NOT NULL DEFAULT now(),
    next_attempt_at timestamptz NOT NULL DEFAULT now(),
    attempts integer NOT NULL DEFAULT 0,
    last_error text,
    lease_owner text,                  -- instance id of the claimer, NULL when not claimed
    lease_token uuid,                  -- the claiming process (a new one at every start)
    lease_until timestamptz
);

-- Claims read one destination's due rows oldest first; the pending gauge counts per destination.
CREATE INDEX outbox_due ON esmd.outbox (destination, next_attempt_at, id);

COMMENT ON TABLE esmd.outbox IS
    'esmd destination outbox: records waiting to be written to their destination';
COMMENT ON COLUMN esmd.outbox.next_attempt_at IS
    'due at this time: now() at insert, the lease end while claimed, now() + backoff after a '
    'failure';
COMMENT ON COLUMN esmd.outbox.lease_token IS
    'random id of the esmd process holding the row; a write is deleted only with the same token';
