-- FIFO queues for the Postgres queue (docs/pgqueue.md#fifo-queues), as SQS FIFO queues.
--
-- A FIFO queue is declared once with esmd.create_queue('orders.fifo', fifo => true); its name
-- ends in ".fifo" (as SQS requires), so every consumer and configuration check knows its kind
-- from the name alone. Its messages carry a group id (SQS MessageGroupId) and a deduplication id
-- (MessageDeduplicationId, or the SHA-256 of the body with content-based deduplication). A send
-- whose deduplication id was seen within the last 5 minutes is accepted but not enqueued again:
-- it returns the first message's id. The row id is the message's SequenceNumber: the senders of
-- one group are serialised (a transaction-level advisory lock per queue and group), so within a
-- group the ids grow in commit order.
--
-- esmd.receive_fifo() claims, per group, the oldest messages only when the group's oldest
-- message (its head) is visible: a group with a message in flight (received, invisible) or
-- delayed is not claimed. Claimed messages of a group are always a run from its head, so
-- "head visible" means "nothing of the group in flight". The head of every group is found with
-- a skip scan of queue_messages_fifo (one index probe per group, not a scan of the messages).
-- Standard queues (every other name) keep esmd.send/esmd.receive exactly as in 0002.
CREATE SCHEMA IF NOT EXISTS esmd;

CREATE TABLE esmd.queues (
    name text PRIMARY KEY,
    fifo boolean NOT NULL,
    content_based_deduplication boolean NOT NULL DEFAULT false,
    created_at timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT queues_fifo_name CHECK (fifo = (name LIKE '%.fifo'))
);
COMMENT ON TABLE esmd.queues IS
    'queues created with esmd.create_queue (FIFO queues must be); see docs/pgqueue.md';

ALTER TABLE esmd.queue_messages
    ADD COLUMN group_id text,
    ADD COLUMN deduplication_id text;
-- A message has a group exactly when its queue is a FIFO queue (also after a move to a
-- dead-letter queue or a redrive). NOT VALID: rows sent before this migration are not re-read.
ALTER TABLE esmd.queue_messages ADD CONSTRAINT queue_messages_fifo_group
    CHECK ((group_id IS NOT NULL) = (queue LIKE '%.fifo')) NOT VALID;
COMMENT ON COLUMN esmd.queue_messages.group_id IS
    'FIFO queues: the message group (SQS MessageGroupId); the row id is its SequenceNumber';

-- The head (oldest message) of each group of a FIFO queue, and a group's run from its head.
CREATE INDEX queue_messages_fifo ON esmd.queue_messages (queue, group_id, id)
    WHERE group_id IS NOT NULL;

-- Deduplication ids seen per FIFO queue (kept after their message is deleted, as in SQS).
CREATE TABLE esmd.queue_deduplication (
    queue text NOT NULL,
    deduplication_id text NOT NULL,
    message_id uuid NOT NULL, -- the first message sent with it
    sent_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (queue, deduplication_id)
);
CREATE INDEX queue_deduplication_sent ON esmd.queue_deduplication (queue, sent_at);

-- SQS's deduplication interval.
CREATE FUNCTION esmd.deduplication_window() RETURNS interval
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$ SELECT interval '5 minutes' $$;

-- Creates a queue (SQS CreateQueue). Standard queues need not be created (a send creates them);
-- FIFO queues must be, with a name ending in ".fifo". Returns true when created, false when it
-- existed with the same attributes; raises when it exists with other ones.
CREATE FUNCTION esmd.create_queue(name text, fifo boolean DEFAULT false,
                                  content_based_deduplication boolean DEFAULT false)
RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    old esmd.queues;
BEGIN
    PERFORM esmd.check_queue_name(create_queue.name);
    IF create_queue.fifo IS NULL OR create_queue.content_based_deduplication IS NULL THEN
        RAISE EXCEPTION 'esmd: create_queue: fifo and content_based_deduplication must be true or '
            'false' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF create_queue.fifo <> (create_queue.name LIKE '%.fifo') THEN
        RAISE EXCEPTION 'esmd: queue %: %', to_json(create_queue.name),
            CASE WHEN create_queue.fifo THEN 'the name of a FIFO queue must end in ".fifo"'
                 ELSE 'a name ending in ".fifo" is a FIFO queue: create it with fifo => true' END
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF create_queue.content_based_deduplication AND NOT create_queue.fifo THEN
        RAISE EXCEPTION 'esmd: queue %: content_based_deduplication is for FIFO queues',
            to_json(create_queue.name) USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO esmd.queues AS q (name, fifo, content_based_deduplication)
    VALUES (create_queue.name, create_queue.fifo, create_queue.content_based_deduplication)
    ON CONFLICT ON CONSTRAINT queues_pkey DO NOTHING;
    IF FOUND THEN
        RETURN true;
    END IF;
    SELECT * INTO old FROM esmd.queues q WHERE q.name = create_queue.name;
    IF old.content_based_deduplication <> create_queue.content_based_deduplication THEN
        RAISE EXCEPTION 'esmd: queue % exists with content_based_deduplication => %',
            to_json(create_queue.name), to_json(old.content_based_deduplication)
            USING ERRCODE = 'duplicate_object';
    END IF;
    RETURN false;
END $$;

-- The FIFO half of esmd.send / esmd.send_batch: bodies (checked by the caller) to FIFO queue
-- `queue`, all in group_id, with dedup_ids[i] as the deduplication id of bodies[i] (NULL: the
-- SHA-256 of the body, with content-based deduplication). A body whose deduplication id was
-- used within esmd.deduplication_window() is not enqueued; its result is the first message's id.
CREATE FUNCTION esmd.send_fifo(queue text, bodies text[], delay interval, attrs jsonb,
                               group_id text, dedup_ids text[])
RETURNS SETOF uuid
LANGUAGE plpgsql AS $$
DECLARE
    q text := send_fifo.queue;
    g text := send_fifo.group_id;
    cbd boolean;
    attrs_md5 text := esmd.attributes_md5(send_fifo.attrs);
    dd text;
    mid uuid;
    fresh uuid;
    added boolean := false;
BEGIN
    SELECT qq.content_based_deduplication INTO cbd FROM esmd.queues qq
    WHERE qq.name = q AND qq.fifo;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'esmd: queue % is a FIFO queue name but was not created: create it with '
            'esmd.create_queue(%, fifo => true)', to_json(q), quote_literal(q)
            USING ERRCODE = 'undefined_object';
    END IF;
    IF g IS NULL THEN
        RAISE EXCEPTION 'esmd: queue % is a FIFO queue: group_id is required (SQS MessageGroupId)',
            to_json(q) USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF g !~ '^[!-~]{1,128}$' THEN
        RAISE EXCEPTION 'esmd: queue %: bad group_id %: 1 to 128 printable ASCII characters, no '
            'spaces', to_json(q), to_json(g) USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF dedup_ids IS NULL AND NOT cbd THEN
        RAISE EXCEPTION 'esmd: queue % is a FIFO queue without content-based deduplication: '
            'deduplication_id is required (SQS MessageDeduplicationId)', to_json(q)
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF dedup_ids IS NOT NULL AND cardinality(dedup_ids) <> cardinality(bodies) THEN
        RAISE EXCEPTION 'esmd: queue %: % deduplication ids for % bodies', to_json(q),
            cardinality(dedup_ids), cardinality(bodies) USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- one sender of the group at a time until commit: ids (sequence numbers) grow in commit order
    PERFORM pg_advisory_xact_lock(hashtextextended(q || E'\n' || g, 1179011410));
    -- forget some expired deduplication ids of the queue
    DELETE FROM esmd.queue_deduplication d
    WHERE d.ctid = ANY (ARRAY(SELECT e.ctid FROM esmd.queue_deduplication e
                              WHERE e.queue = q AND e.sent_at <= now() - esmd.deduplication_window()
                              LIMIT 100));
    FOR i IN 1 .. cardinality(bodies) LOOP
        dd := coalesce(dedup_ids[i], CASE WHEN cbd
                       THEN encode(sha256(convert_to(bodies[i], 'UTF8')), 'hex') END);
        IF dd IS NULL OR dd !~ '^[!-~]{1,128}$' THEN
            RAISE EXCEPTION 'esmd: queue %: bad deduplication_id % (of bodies[%]): 1 to 128 '
                'printable ASCII characters, no spaces', to_json(q),
                coalesce(to_json(dd)::text, 'NULL'), i USING ERRCODE = 'invalid_parameter_value';
        END IF;
        fresh := gen_random_uuid();
        INSERT INTO esmd.queue_deduplication AS d (queue, deduplication_id, message_id)
        VALUES (q, dd, fresh)
        ON CONFLICT ON CONSTRAINT queue_deduplication_pkey DO UPDATE
            SET message_id = excluded.message_id, sent_at = now()
            WHERE d.sent_at <= now() - esmd.deduplication_window()
        RETURNING d.message_id INTO mid;
        IF mid IS NULL THEN -- a duplicate within the window: accepted, not enqueued
            SELECT d.message_id INTO mid FROM esmd.queue_deduplication d
            WHERE d.queue = q AND d.deduplication_id = dd;
            RETURN NEXT mid;
            CONTINUE;
        END IF;
        INSERT INTO esmd.queue_messages (queue, message_id, body, attributes, attributes_md5,
                                         visible_at, group_id, deduplication_id)
        VALUES (q, mid, bodies[i], send_fifo.attrs, attrs_md5, now() + send_fifo.delay, g, dd);
        added := true;
        RETURN NEXT mid;
        mid := NULL;
    END LOOP;
    IF added THEN
        PERFORM pg_notify('esmd_pgqueue', q);
    END IF;
END $$;

-- esmd.send and esmd.send_batch as in 0002, with group_id and deduplication_id(s) for FIFO
-- queues. A standard queue given either, or a FIFO queue without a group id, is an error.
DROP FUNCTION esmd.send(text, text, interval, jsonb);
CREATE FUNCTION esmd.send(queue text, body text, delay interval DEFAULT '0',
                          attributes jsonb DEFAULT NULL, group_id text DEFAULT NULL,
                          deduplication_id text DEFAULT NULL) RETURNS uuid
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
    IF send.queue LIKE '%.fifo' THEN
        SELECT f INTO mid FROM esmd.send_fifo(send.queue, ARRAY[send.body], send.delay, attrs,
            send.group_id, CASE WHEN send.deduplication_id IS NOT NULL
                                THEN ARRAY[send.deduplication_id] END) f;
        RETURN mid;
    END IF;
    IF send.group_id IS NOT NULL OR send.deduplication_id IS NOT NULL THEN
        RAISE EXCEPTION 'esmd: queue % is a standard queue: % is for FIFO queues (names ending in '
            '".fifo", made with esmd.create_queue(name, fifo => true))', to_json(send.queue),
            CASE WHEN send.group_id IS NOT NULL THEN 'group_id' ELSE 'deduplication_id' END
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    INSERT INTO esmd.queue_messages AS m (queue, body, attributes, attributes_md5, visible_at)
    VALUES (send.queue, send.body, attrs, esmd.attributes_md5(attrs), now() + send.delay)
    RETURNING m.message_id INTO mid;
    PERFORM pg_notify('esmd_pgqueue', send.queue);
    RETURN mid;
END $$;

DROP FUNCTION esmd.send_batch(text, text[], interval, jsonb);
CREATE FUNCTION esmd.send_batch(queue text, bodies text[], delay interval DEFAULT '0',
                                attributes jsonb DEFAULT NULL, group_id text DEFAULT NULL,
                                deduplication_ids text[] DEFAULT NULL) RETURNS SETOF uuid
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
    IF send_batch.queue NOT LIKE '%.fifo'
       AND (send_batch.group_id IS NOT NULL OR send_batch.deduplication_ids IS NOT NULL) THEN
        RAISE EXCEPTION 'esmd: queue % is a standard queue: % is for FIFO queues (names ending in '
            '".fifo", made with esmd.create_queue(name, fifo => true))', to_json(send_batch.queue),
            CASE WHEN send_batch.group_id IS NOT NULL THEN 'group_id' ELSE 'deduplication_ids' END
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
    IF send_batch.queue LIKE '%.fifo' THEN
        RETURN QUERY SELECT * FROM esmd.send_fifo(send_batch.queue, bodies, send_batch.delay, attrs,
                                                 send_batch.group_id, send_batch.deduplication_ids);
        RETURN;
    END IF;
    RETURN QUERY
    INSERT INTO esmd.queue_messages AS m (queue, body, attributes, attributes_md5, visible_at)
    SELECT send_batch.queue, b.body, attrs, attrs_md5, now() + send_batch.delay
    FROM unnest(bodies) WITH ORDINALITY AS b(body, i)
    ORDER BY b.i
    RETURNING m.message_id;
    PERFORM pg_notify('esmd_pgqueue', send_batch.queue);
END $$;

-- esmd.receive for FIFO queues: the same rows and arguments, plus each message's group_id and
-- deduplication_id (its id is the SequenceNumber), 'm' rows in delivery order: groups oldest
-- head first, each group's messages in sequence order. Takes up to max_messages messages from
-- the groups whose head is visible (nothing of theirs in flight), each group's run from its head
-- until a message that is not visible. The heads are locked first (FOR UPDATE SKIP LOCKED), so
-- two consumers never claim the same group; a head another consumer holds skips its group.
-- A head received max_receive_count times goes to the dead-letter queue (which must be a FIFO
-- queue) and the messages behind it are delivered: the group goes on.
CREATE FUNCTION esmd.receive_fifo(queue text, max_messages integer, visibility_timeout interval,
                                  max_receive_count integer DEFAULT 0,
                                  dead_letter_queue text DEFAULT NULL)
RETURNS TABLE (kind text, id bigint, message_id uuid, receipt uuid, body text, attributes jsonb,
               attributes_md5 text, body_md5 text, sender text, sent_ms bigint,
               receive_count integer, first_received_ms bigint, dead_letter_source text,
               next_visible_ms bigint, group_id text, deduplication_id text)
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
               u.dead_letter_source, u.next_visible_ms, u.group_id, u.deduplication_id
        FROM (
            SELECT 'm'::text AS kind, g.id, g.message_id, g.receipt, g.body, g.attributes,
                   g.attributes_md5, md5(g.body) AS body_md5, g.sender,
                   (extract(epoch FROM g.sent_at) * 1000)::bigint AS sent_ms, g.receive_count,
                   (extract(epoch FROM g.first_received_at) * 1000)::bigint AS first_received_ms,
                   g.dead_letter_source, NULL::bigint AS next_visible_ms, g.group_id,
                   g.deduplication_id, g.head AS ord_head
            FROM got g
            UNION ALL
            SELECT 'd', d.id, d.message_id, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
                   d.receive_count, NULL, NULL, NULL, NULL, NULL, 0
            FROM moved d
            UNION ALL
            SELECT 'x', x.id, x.message_id, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
                   x.receive_count, NULL, NULL, NULL, NULL, NULL, 0
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
               NULL::text, NULL::text;
    END IF;
END $$;
