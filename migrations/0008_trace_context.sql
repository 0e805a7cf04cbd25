-- Trace context (docs/operations.md#trace-context).
--
-- Postgres-queue messages carry an X-Ray trace header, as SQS's AWSTraceHeader system attribute:
-- esmd puts it in the event's attributes.AWSTraceHeader and sends it (and the traceparent it
-- gives) with the function request. A sender supplies it for every message it sends in a
-- transaction, as SQS takes the X-Amzn-Trace-Id header of a SendMessage call for its messages:
--     SELECT set_config('esmd.trace_header', 'Root=1-…;Parent=…;Sampled=1', true);
--     SELECT esmd.send('mail', '…');
-- The column's default reads that setting, so esmd.send, esmd.send_batch and plain INSERTs take
-- it alike; an unset or empty setting gives NULL (no trace). Moves to the dead-letter queue and
-- redrives keep it. A malformed value is kept here but ignored by esmd (never sent on).
CREATE SCHEMA IF NOT EXISTS esmd;

ALTER TABLE esmd.queue_messages
    ADD COLUMN trace_header text DEFAULT nullif(current_setting('esmd.trace_header', true), '');

COMMENT ON COLUMN esmd.queue_messages.trace_header IS
    'X-Ray trace header (SQS AWSTraceHeader), from the sender''s esmd.trace_header setting; '
    'see docs/pgqueue.md#trace-context';

-- Asynchronous invocations keep the trace headers of their Invoke request (traceparent,
-- tracestate, X-Amzn-Trace-Id), sent again with every attempt.
ALTER TABLE esmd.async_events
    ADD COLUMN traceparent text,
    ADD COLUMN tracestate text,
    ADD COLUMN trace_header text;

-- esmd.receive() as in 0002, with the messages' trace_header as a last column.
DROP FUNCTION esmd.receive(text, integer, interval, integer, text);
CREATE FUNCTION esmd.receive(queue text, max_messages integer, visibility_timeout interval,
                             max_receive_count integer DEFAULT 0,
                             dead_letter_queue text DEFAULT NULL)
RETURNS TABLE (kind text, id bigint, message_id uuid, receipt uuid, body text, attributes jsonb,
               attributes_md5 text, body_md5 text, sender text, sent_ms bigint,
               receive_count integer, first_received_ms bigint, dead_letter_source text,
               next_visible_ms bigint, trace_header text)
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
           g.dead_letter_source, NULL::bigint, g.trace_header
    FROM got g
    UNION ALL
    SELECT 'd', d.id, d.message_id, NULL, NULL, NULL, NULL, NULL, NULL, NULL, d.receive_count,
           NULL, NULL, NULL, NULL
    FROM moved d
    UNION ALL
    SELECT 'x', x.id, x.message_id, NULL, NULL, NULL, NULL, NULL, NULL, NULL, x.receive_count,
           NULL, NULL, NULL, NULL
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
                ORDER BY m.visible_at LIMIT 1),
               NULL::text;
    END IF;
END $$;

-- esmd.receive_fifo() as in 0007, with the messages' trace_header as a last column.
DROP FUNCTION esmd.receive_fifo(text, integer, interval, integer, text);
CREATE FUNCTION esmd.receive_fifo(queue text, max_messages integer, visibility_timeout interval,
                                  max_receive_count integer DEFAULT 0,
                                  dead_letter_queue text DEFAULT NULL)
RETURNS TABLE (kind text, id bigint, message_id uuid, receipt uuid, body text, attributes jsonb,
               attributes_md5 text, body_md5 text, sender text, sent_ms bigint,
               receive_count integer, first_received_ms bigint, dead_letter_source text,
               next_visible_ms bigint, group_id text, deduplication_id text, trace_header text)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    q text := receive_fifo.queue;
    lim integer := receive_fifo.max_messages;
    vt interval := receive_fifo.visibility_timeout;
    mrc integer := coalesce(receive_fifo.max_receive_count, 0);
    dlq text := receive_fifo.dead_letter_queue;
    heads bigint[];
    n bigint := 0;
    moved bigint := 0;
BEGIN
    IF lim IS NULL OR lim < 1 OR vt IS NULL OR vt < '0'::interval THEN
        RAISE EXCEPTION 'esmd: receive needs max_messages >= 1 and visibility_timeout >= 0'
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF q IS NULL OR q NOT LIKE '%.fifo' THEN
        RAISE EXCEPTION 'esmd: receive_fifo: % is not a FIFO queue (a name ending in ".fifo"); '
            'use esmd.receive', coalesce(to_json(q)::text, 'NULL')
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF mrc > 0 AND dlq IS NOT NULL THEN
        PERFORM esmd.check_queue_name(dlq);
        IF dlq NOT LIKE '%.fifo' THEN
            RAISE EXCEPTION 'esmd: the dead-letter queue of FIFO queue % must be a FIFO queue, '
                'not %', to_json(q), to_json(dlq) USING ERRCODE = 'invalid_parameter_value';
        END IF;
    END IF;
    -- 1. the visible heads, oldest first, locked (a skip scan finds each group's head)
    SELECT array_agg(h.id ORDER BY h.id) INTO heads FROM (
        SELECT m.id FROM esmd.queue_messages m
        WHERE m.id = ANY (ARRAY(
            WITH RECURSIVE g AS (
                (SELECT m1.group_id FROM esmd.queue_messages m1
                 WHERE m1.queue = q AND m1.group_id IS NOT NULL
                 ORDER BY m1.group_id LIMIT 1)
                UNION ALL
                SELECT (SELECT m2.group_id FROM esmd.queue_messages m2
                        WHERE m2.queue = q AND m2.group_id IS NOT NULL AND m2.group_id > g.group_id
                        ORDER BY m2.group_id LIMIT 1)
                FROM g WHERE g.group_id IS NOT NULL
            )
            SELECT (SELECT m3.id FROM esmd.queue_messages m3
                    WHERE m3.queue = q AND m3.group_id IS NOT NULL AND m3.group_id = g.group_id
                    ORDER BY m3.id LIMIT 1)
            FROM g WHERE g.group_id IS NOT NULL))
          AND m.queue = q AND m.visible_at <= now()
        ORDER BY m.id
        LIMIT lim
        FOR UPDATE SKIP LOCKED
    ) h;
    -- 2. each locked group's run from its head (a new snapshot: what others did before we
    -- locked the heads is seen)
    IF heads IS NOT NULL THEN
        RETURN QUERY
        WITH h AS (
            SELECT hh.id, hh.group_id FROM esmd.queue_messages hh WHERE hh.id = ANY (heads)
        ), cand AS (
            SELECT r.id, r.receive_count, r.visible_at, h.id AS head
            FROM h CROSS JOIN LATERAL (
                SELECT m.id, m.receive_count, m.visible_at FROM esmd.queue_messages m
                WHERE m.queue = q AND m.group_id IS NOT NULL AND m.group_id = h.group_id
                  AND m.id >= h.id
                ORDER BY m.id LIMIT lim) r
        ), run AS (
            SELECT cand.*, bool_or(cand.visible_at > now())
                OVER (PARTITION BY cand.head ORDER BY cand.id) AS stopped
            FROM cand
        ), c AS (
            SELECT run.id, run.receive_count, run.head FROM run WHERE NOT run.stopped
            ORDER BY run.head, run.id LIMIT lim
        ), got AS (
            UPDATE esmd.queue_messages m
            SET visible_at = now() + vt, receive_count = m.receive_count + 1,
                first_received_at = coalesce(m.first_received_at, now()),
                receipt = gen_random_uuid()
            FROM c
            WHERE m.id = c.id AND NOT (mrc > 0 AND c.receive_count >= mrc)
            RETURNING m.*, c.head
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
        SELECT u.kind, u.id, u.message_id, u.receipt, u.body, u.attributes, u.attributes_md5,
               u.body_md5, u.sender, u.sent_ms, u.receive_count, u.first_received_ms,
               u.dead_letter_source, u.next_visible_ms, u.group_id, u.deduplication_id,
               u.trace_header
        FROM (
            SELECT 'm'::text AS kind, g.id, g.message_id, g.receipt, g.body, g.attributes,
                   g.attributes_md5, md5(g.body) AS body_md5, g.sender,
                   (extract(epoch FROM g.sent_at) * 1000)::bigint AS sent_ms, g.receive_count,
                   (extract(epoch FROM g.first_received_at) * 1000)::bigint AS first_received_ms,
                   g.dead_letter_source, NULL::bigint AS next_visible_ms, g.group_id,
                   g.deduplication_id, g.trace_header, g.head AS ord_head
            FROM got g
            UNION ALL
            SELECT 'd', d.id, d.message_id, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
                   d.receive_count, NULL, NULL, NULL, NULL, NULL, NULL, 0
            FROM moved d
            UNION ALL
            SELECT 'x', x.id, x.message_id, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
                   x.receive_count, NULL, NULL, NULL, NULL, NULL, NULL, 0
            FROM dropped x
        ) u
        ORDER BY u.ord_head, u.id;
        GET DIAGNOSTICS n = ROW_COUNT;
        IF mrc > 0 AND dlq IS NOT NULL THEN
            SELECT count(*) INTO moved FROM esmd.queue_messages m
            WHERE m.queue = dlq AND m.dead_letter_source = q AND m.visible_at = now();
            IF moved > 0 THEN
                PERFORM pg_notify('esmd_pgqueue', dlq);
            END IF;
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
                ORDER BY m.visible_at LIMIT 1),
               NULL::text, NULL::text, NULL::text;
    END IF;
END $$;
