-- One row per delivery attempt of a message.
CREATE TABLE delivery_attempts (
    message_id   uuid        NOT NULL,
    attempt      integer     NOT NULL,
    tenant_id    text        NOT NULL,
    intent_id    uuid        NOT NULL,
    provider     text,
    attempted_at timestamptz,
    -- delivered | failed | retrying | ambiguous; NULL while in flight
    outcome      text,
    outcome_rank smallint    NOT NULL DEFAULT 0,
    error_code   text,
    error        text,
    finished_at  timestamptz,
    PRIMARY KEY (message_id, attempt)
);
CREATE INDEX delivery_attempts_intent_idx ON delivery_attempts (intent_id);

-- Messages per intent and status, maintained from each message's status
-- transitions in the same transaction as the messages themselves.
CREATE TABLE intent_status_counts (
    intent_id uuid   NOT NULL,
    tenant_id text   NOT NULL,
    status    text   NOT NULL,
    messages  bigint NOT NULL,
    PRIMARY KEY (intent_id, status)
);

-- Messages that reached a terminal status, per tenant, hour and status.
CREATE TABLE tenant_hourly (
    tenant_id text        NOT NULL,
    hour      timestamptz NOT NULL,
    status    text        NOT NULL,
    messages  bigint      NOT NULL,
    PRIMARY KEY (tenant_id, hour, status)
);

-- Per-campaign (any intent) progress.
CREATE VIEW campaign_progress AS
SELECT i.intent_id, i.tenant_id, i.kind, i.name, i.recipient_count, i.accepted_at, c.cancelled_at,
       COALESCE(SUM(s.messages) FILTER (WHERE s.status IN
           ('delivered', 'failed', 'render_failed', 'suppressed', 'cancelled', 'dead_lettered')), 0)::bigint AS terminal,
       COALESCE(SUM(s.messages) FILTER (WHERE s.status = 'delivered'), 0)::bigint AS delivered,
       COALESCE(SUM(s.messages) FILTER (WHERE s.status IN ('failed', 'render_failed', 'dead_lettered')), 0)::bigint AS failed,
       COALESCE(SUM(s.messages) FILTER (WHERE s.status = 'suppressed'), 0)::bigint AS suppressed,
       COALESCE(SUM(s.messages) FILTER (WHERE s.status = 'cancelled'), 0)::bigint AS cancelled
FROM intents i
LEFT JOIN intent_status_counts s ON s.intent_id = i.intent_id
LEFT JOIN intent_cancellations c ON c.intent_id = i.intent_id
GROUP BY i.intent_id, c.cancelled_at;

-- Delivery rate per tenant and hour: delivered over everything that ended.
CREATE VIEW delivery_rate_hourly AS
SELECT tenant_id, hour,
       (SUM(messages) FILTER (WHERE status = 'delivered'))::bigint AS delivered,
       SUM(messages)::bigint AS terminal,
       ROUND(SUM(messages) FILTER (WHERE status = 'delivered')::numeric / NULLIF(SUM(messages), 0), 4) AS delivery_rate
FROM tenant_hourly
GROUP BY tenant_id, hour;

-- Time from acceptance to delivery, per tenant.
CREATE VIEW time_to_deliver AS
SELECT tenant_id,
       count(*) AS delivered,
       percentile_cont(0.5) WITHIN GROUP (ORDER BY EXTRACT(EPOCH FROM delivered_at - accepted_at)) AS p50_seconds,
       percentile_cont(0.95) WITHIN GROUP (ORDER BY EXTRACT(EPOCH FROM delivered_at - accepted_at)) AS p95_seconds,
       percentile_cont(0.99) WITHIN GROUP (ORDER BY EXTRACT(EPOCH FROM delivered_at - accepted_at)) AS p99_seconds
FROM messages
WHERE status = 'delivered' AND accepted_at IS NOT NULL
GROUP BY tenant_id;

-- Messages not terminal and not moving for 15 minutes, and ambiguous ones
-- (held for reconciliation).
CREATE VIEW stuck_messages AS
SELECT message_id, tenant_id, intent_id, recipient, status, attempts, last_error_code, updated_at
FROM messages
WHERE status_rank < 50 AND updated_at < now() - interval '15 minutes';

CREATE VIEW ambiguous_messages AS
SELECT message_id, tenant_id, intent_id, recipient, attempts, last_error, updated_at
FROM messages
WHERE status = 'ambiguous';

-- A read-only role for reporting tools. Roles belong to the cluster, so it
-- may exist already (another reporting database, or a concurrent migration).
DO $$
BEGIN
    CREATE ROLE ledger_reporter NOLOGIN;
EXCEPTION WHEN duplicate_object OR unique_violation THEN
    NULL;
END
$$;
GRANT USAGE ON SCHEMA public TO ledger_reporter;
GRANT SELECT ON ALL TABLES IN SCHEMA public TO ledger_reporter;
ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT SELECT ON TABLES TO ledger_reporter;
