-- The Postgres queue (connectors/pgqueue, docs/pgqueue.md): SQS-like queues in one table.
--
-- Producers call esmd.send() / esmd.send_batch(); each sends a NOTIFY on the channel
-- 'esmd_pgqueue' with the queue name as payload, which wakes the consumers. Consumers claim
-- visible rows with esmd.receive() (FOR UPDATE SKIP LOCKED, oldest visible first): the rows
-- become invisible for the visibility timeout, their receive count goes up and each receive gets
-- a new receipt token. A processed message is deleted with the receipt of the receive that
-- processed it (esmd.delete_received), so a late delete of an expired claim never deletes a
-- message another consumer holds now. A message that has already been received
-- max_receive_count times is moved to the dead-letter queue at its next receive, as SQS's
-- redrive policy does; a dead-letter queue is a queue like any other (esmd.redrive moves
-- messages back).
CREATE SCHEMA IF NOT EXISTS esmd;

CREATE TABLE esmd.queue_messages (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue text NOT NULL,
    message_id uuid NOT NULL DEFAULT gen_random_uuid(),
    body text NOT NULL,
    attributes jsonb,            -- message attributes in SQS's shape, NULL when none
    attributes_md5 text,         -- SQS's MD5 of the message attributes, NULL when none
    sender text NOT NULL DEFAULT session_user,
    sent_at timestamptz NOT NULL DEFAULT now(),
    visible_at timestamptz NOT NULL DEFAULT now(),
    receive_count integer NOT NULL DEFAULT 0,
    first_received_at timestamptz,
    receipt uuid,                -- token of the latest receive; NULL before the first
    dead_letter_source text      -- the queue it was dead-lettered from, NULL otherwise
);

-- esmd.receive() reads one queue's visible rows oldest-visible first.
CREATE INDEX queue_messages_visible ON esmd.queue_messages (queue, visible_at);

COMMENT ON TABLE esmd.queue_messages IS
    'esmd Postgres queues: one row per message; see docs/pgqueue.md';
COMMENT ON COLUMN esmd.queue_messages.visible_at IS
    'not received before this time: now() + delay at send, now() + visibility timeout at receive';
COMMENT ON COLUMN esmd.queue_messages.receipt IS
    'random token of the latest receive; the receipt handle is "<id>:<receipt>"';

-- The largest message (body plus attributes as JSON text), as SQS: 1 MiB.
CREATE FUNCTION esmd.max_message_bytes() RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT 1048576 $$;

-- Message attributes in SQS's shape. Accepts SQS's own form
--   {"name": {"dataType": "String"|"Number"|"Binary"[.custom], "stringValue"|"binaryValue": ...}}
-- and shorthands: a JSON string is a String attribute, a number a Number, a boolean a String
-- ("true"/"false"). NULL or {} gives NULL (no attributes). Raises on anything else.
CREATE FUNCTION esmd.message_attributes(attributes jsonb) RETURNS jsonb
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    result jsonb := '{}';
    k text;
    v jsonb;
    dt text;
    val text;
    n integer := 0;
BEGIN
    IF attributes IS NULL OR attributes = '{}'::jsonb THEN
        RETURN NULL;
    END IF;
    IF jsonb_typeof(attributes) <> 'object' THEN
        RAISE EXCEPTION 'esmd: message attributes must be a JSON object, got %',
            jsonb_typeof(attributes) USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOR k, v IN SELECT * FROM jsonb_each(attributes) LOOP
        n := n + 1;
        IF n > 10 THEN
            RAISE EXCEPTION 'esmd: a message has at most 10 attributes'
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
        IF char_length(k) > 256 OR k !~ '^[A-Za-z0-9_.-]+$' OR k ~ '^\.|\.$|\.\.'
           OR k ~* '^(aws|amazon)\.' THEN
            RAISE EXCEPTION 'esmd: bad message attribute name %: 1 to 256 of A-Z a-z 0-9 _ - ., '
                'not starting or ending with a period, no "..", no AWS. or Amazon. prefix',
                to_json(k) USING ERRCODE = 'invalid_parameter_value';
        END IF;
        CASE jsonb_typeof(v)
        WHEN 'string' THEN
            dt := 'String';
            val := v #>> '{}';
        WHEN 'boolean' THEN
            dt := 'String';
            val := v::text;
        WHEN 'number' THEN
            dt := 'Number';
            val := v::text;
        WHEN 'object' THEN
            dt := v ->> 'dataType';
            IF dt IS NULL OR dt !~ '^(String|Number|Binary)(\.[A-Za-z0-9_.-]{1,248})?$' THEN
                RAISE EXCEPTION 'esmd: message attribute % needs a dataType of String, Number or '
                    'Binary (optionally .custom), got %', to_json(k), coalesce(to_json(dt)::text,
                    'none') USING ERRCODE = 'invalid_parameter_value';
            END IF;
            IF dt LIKE 'Binary%' THEN
                val := v ->> 'binaryValue';
                IF val IS NULL THEN
                    RAISE EXCEPTION 'esmd: binary message attribute % needs a binaryValue (base64)',
                        to_json(k) USING ERRCODE = 'invalid_parameter_value';
                END IF;
                PERFORM decode(val, 'base64'); -- raises on bad base64
            ELSE
                val := v ->> 'stringValue';
                IF val IS NULL THEN
                    RAISE EXCEPTION 'esmd: message attribute % needs a stringValue', to_json(k)
                        USING ERRCODE = 'invalid_parameter_value';
                END IF;
                IF dt LIKE 'Number%' AND val !~ '^[-+]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][-+]?[0-9]+)?$'
                THEN
                    RAISE EXCEPTION 'esmd: message attribute % is a Number but % is not a number',
                        to_json(k), to_json(val) USING ERRCODE = 'invalid_parameter_value';
                END IF;
            END IF;
        ELSE
            RAISE EXCEPTION 'esmd: message attribute % must be a string, a number, a boolean or '
                '{"dataType":..,"stringValue"|"binaryValue":..}, got %', to_json(k),
                jsonb_typeof(v) USING ERRCODE = 'invalid_parameter_value';
        END CASE;
        result := result || jsonb_build_object(k, jsonb_build_object(
            CASE WHEN dt LIKE 'Binary%' THEN 'binaryValue' ELSE 'stringValue' END, val,
            'stringListValues', '[]'::jsonb, 'binaryListValues', '[]'::jsonb, 'dataType', dt));
    END LOOP;
    RETURN result;
END $$;

-- SQS's MD5 of message attributes (md5OfMessageAttributes): for each attribute in name order,
-- length-prefixed (4 bytes, big-endian) name and data type, a transport byte (1 string,
-- 2 binary), length-prefixed value bytes. NULL for no attributes.
CREATE FUNCTION esmd.attributes_md5(attributes jsonb) RETURNS text
LANGUAGE sql IMMUTABLE AS $$
    SELECT md5(string_agg(
        int4send(octet_length(convert_to(e.k, 'UTF8'))) || convert_to(e.k, 'UTF8')
        || int4send(octet_length(convert_to(e.v ->> 'dataType', 'UTF8')))
        || convert_to(e.v ->> 'dataType', 'UTF8')
        || CASE WHEN e.v ? 'binaryValue'
                THEN '\x02'::bytea || int4send(length(decode(e.v ->> 'binaryValue', 'base64')))
                     || decode(e.v ->> 'binaryValue', 'base64')
                ELSE '\x01'::bytea || int4send(octet_length(convert_to(e.v ->> 'stringValue',
                                                                        'UTF8')))
                     || convert_to(e.v ->> 'stringValue', 'UTF8')
           END,
        ''::bytea ORDER BY convert_to(e.k, 'UTF8')))
    FROM jsonb_each(attributes) AS e(k, v)
    WHERE attributes IS NOT NULL
$$;

CREATE FUNCTION esmd.check_queue_name(queue text) RETURNS void
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF queue IS NULL OR queue !~ '^[A-Za-z0-9_.-]{1,64}$' THEN
        RAISE EXCEPTION 'esmd: bad queue name %: 1 to 64 of A-Z a-z 0-9 _ . -',
            coalesce(to_json(queue)::text, 'NULL') USING ERRCODE = 'invalid_parameter_value';
    END IF;
END $$;

-- Sends one message; returns its message id. delay: not received before now() + delay.
CREATE FUNCTION esmd.send(queue text, body text, delay interval DEFAULT '0',
                          attributes jsonb DEFAULT NULL) RETURNS uuid
LANGUAGE plpgsql AS $$
DECLARE
    attrs jsonb := esmd.message_attributes(send.attributes);
    mid uuid;
BEGIN
    PERFORM esmd.check_queue_name(send.queue);
    IF send.body IS NULL THEN
        RAISE EXCEPTION 'esmd: a message body cannot be NULL'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF send.delay IS NULL OR send.delay < '0'::interval THEN
        RAISE EXCEPTION 'esmd: delay must be 0 or more, got %', send.delay
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF octet_length(send.body) + coalesce(octet_length(attrs::text), 0) > esmd.max_message_bytes()
    THEN
        RAISE EXCEPTION 'esmd: message of % bytes (body and attributes) is over the % bytes limit',
            octet_length(send.body) + coalesce(octet_length(attrs::text), 0),
            esmd.max_message_bytes() USING ERRCODE = 'program_limit_exceeded';
    END IF;
    INSERT INTO esmd.queue_messages AS m (queue, body, attributes, attributes_md5, visible_at)
    VALUES (send.queue, send.body, attrs, esmd.attributes_md5(attrs), now() + send.delay)
    RETURNING m.message_id INTO mid;
    PERFORM pg_notify('esmd_pgqueue', send.queue);
    RETURN mid;
END $$;

-- Sends every body of bodies (in one transaction, one NOTIFY), all with the same delay and
-- attributes; returns their message ids in the order of bodies.
CREATE FUNCTION esmd.send_batch(queue text, bodies text[], delay interval DEFAULT '0',
                                attributes jsonb DEFAULT NULL) RETURNS SETOF uuid
LANGUAGE plpgsql AS $$
DECLARE
    attrs jsonb := esmd.message_attributes(send_batch.attributes);
    attrs_md5 text := esmd.attributes_md5(attrs);
    attrs_bytes integer := coalesce(octet_length(attrs::text), 0);
    big integer;
BEGIN
    PERFORM esmd.check_queue_name(send_batch.queue);
    IF send_batch.delay IS NULL OR send_batch.delay < '0'::interval THEN
        RAISE EXCEPTION 'esmd: delay must be 0 or more, got %', send_batch.delay
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF bodies IS NULL OR cardinality(bodies) = 0 THEN
        RETURN;
    END IF;
    SELECT b.i INTO big FROM unnest(bodies) WITH ORDINALITY AS b(body, i)
    WHERE b.body IS NULL OR octet_length(b.body) + attrs_bytes > esmd.max_message_bytes()
    LIMIT 1;
    IF big IS NOT NULL THEN
        RAISE EXCEPTION 'esmd: bodies[%] is NULL or over the % bytes message limit', big,
            esmd.max_message_bytes() USING ERRCODE = 'program_limit_exceeded';
    END IF;
    RETURN QUERY
    INSERT INTO esmd.queue_messages AS m (queue, body, attributes, attributes_md5, visible_at)
    SELECT send_batch.queue, b.body, attrs, attrs_md5, now() + send_batch.delay
    FROM unnest(bodies) WITH ORDINALITY AS b(body, i)
    ORDER BY b.i
    RETURNING m.message_id;
    PERFORM pg_notify('esmd_pgqueue', send_batch.queue);
END $$;

-- Receives up to max_messages visible messages of queue, oldest visible first, skipping rows
-- other consumers are locking. Each becomes invisible for visibility_timeout, its receive count
-- goes up, its first receive time is set once, and it gets a new receipt token.
-- With max_receive_count > 0, a message already received that many times is not delivered but
-- moved to dead_letter_queue (its receive count reset, dead_letter_source set) or, with no
-- dead-letter queue, deleted.
-- Rows: kind 'm' a message received; 'd' a message moved to the dead-letter queue; 'x' a message
-- deleted at max_receive_count; and, when fewer than max_messages were claimed, one 'w' row whose
-- next_visible_ms is the time until the next message of the queue becomes visible (NULL: none).
-- Times are epoch milliseconds.
CREATE FUNCTION esmd.receive(queue text, max_messages integer, visibility_timeout interval,
                             max_receive_count integer DEFAULT 0,
                             dead_letter_queue text DEFAULT NULL)
RETURNS TABLE (kind text, id bigint, message_id uuid, receipt uuid, body text, attributes jsonb,
               attributes_md5 text, body_md5 text, sender text, sent_ms bigint,
               receive_count integer, first_received_ms bigint, dead_letter_source text,
               next_visible_ms bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    q text := receive.queue;
    lim integer := receive.max_messages;
    vt interval := receive.visibility_timeout;
    mrc integer := coalesce(receive.max_receive_count, 0);
    dlq text := receive.dead_letter_queue;
    n bigint;
    moved bigint := 0;
BEGIN
    IF lim IS NULL OR lim < 1 OR vt IS NULL OR vt < '0'::interval THEN
        RAISE EXCEPTION 'esmd: receive needs max_messages >= 1 and visibility_timeout >= 0'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF mrc > 0 AND dlq IS NOT NULL THEN
        PERFORM esmd.check_queue_name(dlq);
    END IF;
    RETURN QUERY
    WITH c AS (
        SELECT m.id, m.receive_count FROM esmd.queue_messages m
        WHERE m.queue = q AND m.visible_at <= now()
        ORDER BY m.visible_at
        LIMIT lim
        FOR UPDATE SKIP LOCKED
    ), got AS (
        UPDATE esmd.queue_messages m
        SET visible_at = now() + vt, receive_count = m.receive_count + 1,
            first_received_at = coalesce(m.first_received_at, now()), receipt = gen_random_uuid()
        FROM c
        WHERE m.id = c.id AND NOT (mrc > 0 AND c.receive_count >= mrc)
        RETURNING m.*
    ), moved AS (
        UPDATE esmd.queue_messages m
        SET queue = dlq, visible_at = now(), receive_count = 0, first_received_at = NULL,
            receipt = NULL, dead_letter_source = q
        FROM c
        WHERE m.id = c.id AND mrc > 0 AND c.receive_count >= mrc AND dlq IS NOT NULL
        RETURNING m.id, m.message_id, c.receive_count
    ), dropped AS (
        DELETE FROM esmd.queue_messages m
        USING c
        WHERE m.id = c.id AND mrc > 0 AND c.receive_count >= mrc AND dlq IS NULL
        RETURNING m.id, m.message_id, c.receive_count
    )
    SELECT 'm'::text, g.id, g.message_id, g.receipt, g.body, g.attributes, g.attributes_md5,
           md5(g.body), g.sender, (extract(epoch FROM g.sent_at) * 1000)::bigint,
           g.receive_count, (extract(epoch FROM g.first_received_at) * 1000)::bigint,
           g.dead_letter_source, NULL::bigint
    FROM got g
    UNION ALL
    SELECT 'd', d.id, d.message_id, NULL, NULL, NULL, NULL, NULL, NULL, NULL, d.receive_count,
           NULL, NULL, NULL
    FROM moved d
    UNION ALL
    SELECT 'x', x.id, x.message_id, NULL, NULL, NULL, NULL, NULL, NULL, NULL, x.receive_count,
           NULL, NULL, NULL
    FROM dropped x;
    GET DIAGNOSTICS n = ROW_COUNT;
    IF mrc > 0 AND dlq IS NOT NULL THEN
        -- wake the dead-letter queue's consumers (nothing is sent if no row moved: cheap test)
        SELECT count(*) INTO moved FROM esmd.queue_messages m
        WHERE m.queue = dlq AND m.dead_letter_source = q AND m.visible_at = now();
        IF moved > 0 THEN
            PERFORM pg_notify('esmd_pgqueue', dlq);
        END IF;
    END IF;
    IF n < lim THEN
        RETURN QUERY
        SELECT 'w'::text, NULL::bigint, NULL::uuid, NULL::uuid, NULL::text, NULL::jsonb,
               NULL::text, NULL::text, NULL::text, NULL::bigint, NULL::integer, NULL::bigint,
               NULL::text,
               (SELECT greatest(0, ceil(extract(epoch FROM (m.visible_at - now())) * 1000))::bigint
                FROM esmd.queue_messages m
                WHERE m.queue = q AND m.visible_at > now()
                ORDER BY m.visible_at LIMIT 1);
    END IF;
END $$;

-- Deletes the received messages whose latest receive is the one given, pairwise
-- (ids[i], receipts[i]); returns how many were deleted. A receipt that is no longer the latest
-- (the message was received again, moved or redriven since) deletes nothing.
CREATE FUNCTION esmd.delete_received(ids bigint[], receipts uuid[]) RETURNS integer
LANGUAGE sql AS $$
    WITH d AS (
        DELETE FROM esmd.queue_messages m
        USING unnest(ids, receipts) AS r(id, receipt)
        WHERE m.id = r.id AND m.receipt = r.receipt
        RETURNING 1
    )
    SELECT count(*)::integer FROM d
$$;

-- Makes received messages visible again now (a consumer gives them back before their
-- visibility timeout), pairwise as esmd.delete_received; returns how many. Their receive count
-- stays. Wakes the consumers of their queues.
CREATE FUNCTION esmd.release_received(ids bigint[], receipts uuid[]) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    n integer := 0;
    q text;
BEGIN
    FOR q IN
        WITH u AS (
            UPDATE esmd.queue_messages m SET visible_at = now()
            FROM unnest(ids, receipts) AS r(id, receipt)
            WHERE m.id = r.id AND m.receipt = r.receipt AND m.visible_at > now()
            RETURNING m.queue
        )
        SELECT u.queue FROM u
    LOOP
        n := n + 1;
        PERFORM pg_notify('esmd_pgqueue', q); -- repeated payloads fold into one at commit
    END LOOP;
    RETURN n;
END $$;

-- The receipt handle of a receive is "<id>:<receipt>" (the event's receiptHandle).
CREATE FUNCTION esmd.parse_receipt_handle(receipt_handle text, OUT id bigint, OUT receipt uuid)
LANGUAGE plpgsql IMMUTABLE AS $$
BEGIN
    IF receipt_handle IS NULL OR receipt_handle !~
        '^[0-9]{1,19}:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$' THEN
        RAISE EXCEPTION 'esmd: % is not a receipt handle', coalesce(to_json(receipt_handle)::text,
                                                                   'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    id := split_part(receipt_handle, ':', 1)::bigint;
    receipt := split_part(receipt_handle, ':', 2)::uuid;
END $$;

-- SQS DeleteMessage: deletes the message if receipt_handle is its latest receive.
CREATE FUNCTION esmd.delete_message(receipt_handle text) RETURNS boolean
LANGUAGE sql AS $$
    SELECT esmd.delete_received(ARRAY[h.id], ARRAY[h.receipt]) = 1
    FROM esmd.parse_receipt_handle(receipt_handle) h
$$;

-- SQS ChangeMessageVisibility: the message (if receipt_handle is its latest receive) becomes
-- visible after visibility_timeout from now (0: at once).
CREATE FUNCTION esmd.change_message_visibility(receipt_handle text, visibility_timeout interval)
RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    h record;
    q text;
BEGIN
    IF visibility_timeout IS NULL OR visibility_timeout < '0'::interval THEN
        RAISE EXCEPTION 'esmd: visibility_timeout must be 0 or more'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    h := esmd.parse_receipt_handle(receipt_handle);
    UPDATE esmd.queue_messages m SET visible_at = now() + visibility_timeout
    WHERE m.id = h.id AND m.receipt = h.receipt
    RETURNING m.queue INTO q;
    IF q IS NULL THEN
        RETURN false;
    END IF;
    IF visibility_timeout = '0'::interval THEN
        PERFORM pg_notify('esmd_pgqueue', q);
    END IF;
    RETURN true;
END $$;

-- Moves the visible messages of from_queue (a dead-letter queue) to to_queue, or, when to_queue
-- is NULL, each back to the queue it was dead-lettered from (messages that were not
-- dead-lettered stay). At most max_messages (NULL: all). Receive counts start again from 0.
-- Returns how many moved.
CREATE FUNCTION esmd.redrive(from_queue text, to_queue text DEFAULT NULL,
                             max_messages integer DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    n bigint := 0;
    k bigint;
    q text;
BEGIN
    PERFORM esmd.check_queue_name(from_queue);
    IF to_queue IS NOT NULL THEN
        PERFORM esmd.check_queue_name(to_queue);
    END IF;
    FOR q, k IN
        WITH c AS (
            SELECT m.id FROM esmd.queue_messages m
            WHERE m.queue = from_queue AND m.visible_at <= now()
              AND (to_queue IS NOT NULL OR m.dead_letter_source IS NOT NULL)
            ORDER BY m.visible_at
            LIMIT max_messages
            FOR UPDATE SKIP LOCKED
        ), u AS (
            UPDATE esmd.queue_messages m
            SET queue = coalesce(to_queue, m.dead_letter_source), visible_at = now(),
                receive_count = 0, first_received_at = NULL, receipt = NULL,
                dead_letter_source = NULL
            FROM c WHERE m.id = c.id
            RETURNING m.queue
        )
        SELECT u.queue, count(*) FROM u GROUP BY u.queue
    LOOP
        n := n + k;
        PERFORM pg_notify('esmd_pgqueue', q);
    END LOOP;
    RETURN n;
END $$;

-- Deletes every message of queue (received or not); returns how many.
CREATE FUNCTION esmd.purge(queue text) RETURNS bigint
LANGUAGE sql AS $$
    WITH d AS (DELETE FROM esmd.queue_messages m WHERE m.queue = purge.queue RETURNING 1)
    SELECT count(*) FROM d
$$;

-- Per queue: messages visible now, in flight (received, invisible), delayed (never received,
-- not visible yet), dead-lettered (in this queue from another), and the oldest message's age.
CREATE VIEW esmd.queue_stats AS
SELECT m.queue,
       count(*) FILTER (WHERE m.visible_at <= now()) AS visible,
       count(*) FILTER (WHERE m.visible_at > now() AND m.receive_count > 0) AS in_flight,
       count(*) FILTER (WHERE m.visible_at > now() AND m.receive_count = 0) AS delayed,
       count(*) FILTER (WHERE m.dead_letter_source IS NOT NULL) AS dead_lettered,
       now() - min(m.sent_at) AS oldest_age
FROM esmd.queue_messages m
GROUP BY m.queue;
