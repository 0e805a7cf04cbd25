-- FIFO claims that do not visit every group (docs/pgqueue.md#fifo-queues).
--
-- 0007's esmd.receive_fifo found the head of every group of the queue on every claim: one index
-- probe per group, 3 s a claim with 100,000 groups. It now visits groups in group_id order from
-- where the previous claim of the queue stopped (esmd.queues.claim_cursor), wrapping around, and
-- stops once it has max_messages visible heads: a claim costs the groups it passes over (those
-- with a message in flight or delayed) plus the ones it takes, and every group gets its turn
-- (round robin over the groups that have messages). Claims of one queue take turns on its
-- esmd.queues row, so consumers do not race for the same heads.
ALTER TABLE esmd.queues ADD COLUMN claim_cursor text;
COMMENT ON COLUMN esmd.queues.claim_cursor IS
    'FIFO queues: the group the next claim starts at (NULL: the first one)';

-- esmd.receive for FIFO queues, as in 0008 (0007 with the trace_header column) but for how the
-- heads are found: the same rows and arguments, plus each message's group_id, deduplication_id
-- (its id is the SequenceNumber) and trace_header, 'm' rows in delivery order: groups in the
-- order they were visited, each group's messages in sequence order. Takes up to max_messages
-- messages from groups whose head is visible (nothing of theirs in flight), each group's run
-- from its head until a message that is not visible. The heads are locked (FOR UPDATE SKIP
-- LOCKED) before their runs are read, so two consumers never claim the same group.
-- A head received max_receive_count times goes to the dead-letter queue (which must be a FIFO
-- queue) and the messages behind it are delivered: the group goes on.
DROP FUNCTION esmd.receive_fifo(text, integer, interval, integer, text);
CREATE FUNCTION esmd.receive_fifo(queue text, max_messages integer,
                                  visibility_timeout interval,
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
    cand_heads bigint[] := '{}';
    start_at text;
    cur text;
    nxt text;
    wrapped boolean := false;
    hid bigint;
    hvis timestamptz;
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
    -- 1. claims of this queue take turns (the row of esmd.queues; a FIFO queue that only got
    -- messages by dead-lettering gets its row here); then the heads, group after group in
    -- group_id order from where the last claim stopped, wrapping around, until lim visible
    -- heads are found or every group was seen: one or two index probes per group visited
    -- esmd.queues.claim_cursor: the group the next claim starts at (NULL: the first one)
    INSERT INTO esmd.queues AS qq (name, fifo) VALUES (q, true)
    ON CONFLICT ON CONSTRAINT queues_pkey DO NOTHING;
    SELECT qq.claim_cursor INTO start_at FROM esmd.queues qq WHERE qq.name = q FOR UPDATE;
    LOOP
        IF cur IS NULL AND NOT wrapped THEN -- the first group visited: start_at or after
            SELECT m.group_id INTO nxt FROM esmd.queue_messages m
            WHERE m.queue = q AND m.group_id IS NOT NULL AND m.group_id >= coalesce(start_at, '')
            ORDER BY m.group_id LIMIT 1;
        ELSE
            SELECT m.group_id INTO nxt FROM esmd.queue_messages m
            WHERE m.queue = q AND m.group_id IS NOT NULL AND m.group_id > coalesce(cur, '')
            ORDER BY m.group_id LIMIT 1;
        END IF;
        IF nxt IS NULL THEN
            EXIT WHEN wrapped OR start_at IS NULL;
            wrapped := true; -- on from the first group, up to start_at
            cur := NULL;
            CONTINUE;
        END IF;
        EXIT WHEN wrapped AND nxt >= start_at;
        SELECT m.id, m.visible_at INTO hid, hvis FROM esmd.queue_messages m
        WHERE m.queue = q AND m.group_id IS NOT NULL AND m.group_id = nxt
        ORDER BY m.id LIMIT 1;
        cur := nxt;
        IF hvis <= now() THEN
            cand_heads := cand_heads || hid;
            EXIT WHEN cardinality(cand_heads) >= lim;
        END IF;
    END LOOP;
    -- the next claim starts at the group after the last one visited (below: or at the first
    -- head this claim left for lack of room)
    SELECT m.group_id INTO nxt FROM esmd.queue_messages m
    WHERE m.queue = q AND m.group_id IS NOT NULL AND m.group_id > coalesce(cur, '')
    ORDER BY m.group_id LIMIT 1;
    UPDATE esmd.queues qq SET claim_cursor = nxt WHERE qq.name = q;
    -- the heads locked, in visiting order (one another consumer holds is skipped)
    SELECT array_agg(h.id ORDER BY h.ord) INTO heads FROM (
        SELECT m.id, u.ord FROM esmd.queue_messages m
        JOIN unnest(cand_heads) WITH ORDINALITY AS u(id, ord) ON u.id = m.id
        WHERE m.queue = q AND m.visible_at <= now()
        FOR UPDATE OF m SKIP LOCKED
    ) h;
    -- 2. each locked group's run from its head (a new snapshot: what others did before we
    -- locked the heads is seen)
    IF heads IS NOT NULL THEN
        RETURN QUERY
        WITH h AS (
            SELECT hh.id, hh.group_id, u.ord FROM unnest(heads) WITH ORDINALITY AS u(id, ord)
            JOIN esmd.queue_messages hh ON hh.id = u.id
        ), cand AS (
            SELECT r.id, r.receive_count, r.visible_at, h.ord AS head
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
        -- a visited head left visible (no room in this claim) is where the next claim starts
        SELECT m.group_id INTO nxt FROM unnest(heads) WITH ORDINALITY AS u(id, ord)
        JOIN esmd.queue_messages m ON m.id = u.id
        WHERE m.queue = q AND m.visible_at <= now()
        ORDER BY u.ord LIMIT 1;
        IF nxt IS NOT NULL THEN
            UPDATE esmd.queues qq SET claim_cursor = nxt WHERE qq.name = q;
        END IF;
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
