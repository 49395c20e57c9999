-- The status counts and hourly roll-ups follow each statement's message
-- rows in the database itself: statement triggers over the rows the
-- statement inserted (NEW TABLE) and the rows it updated (OLD and NEW
-- TABLE). The old version of an updated row is the one the update locked
-- and replaced, so the counts stay exact with several writers and without
-- reading and locking the rows before writing them.
--
-- A message counts once per intent under its status. It counts in an
-- hourly roll-up under the terminal status it has (status_rank 50) and the
-- hour (UTC) it got there; one that leaves a terminal status (a redrive)
-- leaves its bucket. An updated row takes its old version out of its
-- buckets and puts its new version in: what did not change cancels out
-- (groups that sum to zero are not written), so the counts are always
-- those of the rows as they are, whatever the batches were.
--
-- The tables are named without a schema: they are the ones of the writer's
-- search_path, like the messages table it writes (a rebuild writes its own
-- schema). The statement is planned at each call, for the number of rows
-- the call has (a plan kept from a small batch would not suit a large one).

CREATE FUNCTION messages_counts() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    version text := 'SELECT %s AS sign, intent_id, tenant_id, identity, status, status_rank = 50 AS terminal,
        date_trunc(''hour'', COALESCE(delivered_at, failed_at, suppressed_at, updated_at), ''UTC'') AS hour FROM %s';
    changes text := format(version, 1, 'new_rows');
BEGIN
    IF TG_OP = 'UPDATE' THEN
        changes := format(version, -1, 'old_rows') || ' UNION ALL ' || changes;
    END IF;
    EXECUTE format($sql$
    -- projections migration 0007: messages_counts
    WITH changes AS (%s
    ), counts AS (
        INSERT INTO intent_status_counts (intent_id, tenant_id, status, messages)
        SELECT intent_id, min(tenant_id), status, sum(sign) FROM changes
        GROUP BY intent_id, status HAVING sum(sign) <> 0 ORDER BY intent_id, status
        ON CONFLICT (intent_id, status) DO UPDATE SET messages = intent_status_counts.messages + EXCLUDED.messages
    ), tenants AS (
        INSERT INTO tenant_hourly (tenant_id, hour, status, messages)
        SELECT tenant_id, hour, status, sum(sign) FROM changes WHERE terminal
        GROUP BY 1, 2, 3 HAVING sum(sign) <> 0 ORDER BY 1, 2, 3
        ON CONFLICT (tenant_id, hour, status) DO UPDATE SET messages = tenant_hourly.messages + EXCLUDED.messages
    )
    INSERT INTO identity_hourly (identity, hour, status, messages)
    SELECT identity, hour, status, sum(sign) FROM changes WHERE terminal AND identity IS NOT NULL
    GROUP BY 1, 2, 3 HAVING sum(sign) <> 0 ORDER BY 1, 2, 3
    ON CONFLICT (identity, hour, status) DO UPDATE SET messages = identity_hourly.messages + EXCLUDED.messages
    $sql$, changes);
    RETURN NULL;
END
$$;

CREATE TRIGGER messages_counts_inserted AFTER INSERT ON messages
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION messages_counts();
CREATE TRIGGER messages_counts_updated AFTER UPDATE ON messages
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION messages_counts();
