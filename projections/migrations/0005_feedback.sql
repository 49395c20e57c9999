-- Provider feedback (delivery reports, bounces, complaints, opens, clicks,
-- unsubscribes): the first report of each kind per message. Rates are
-- computed from these; a bounce does not change the status.
ALTER TABLE messages ADD COLUMN opened_at timestamptz;
ALTER TABLE messages ADD COLUMN clicked_at timestamptz;
ALTER TABLE messages ADD COLUMN bounced_at timestamptz;
ALTER TABLE messages ADD COLUMN complained_at timestamptz;
ALTER TABLE messages ADD COLUMN unsubscribed_at timestamptz;

-- Engagement per tenant and sender identity, from provider feedback: of the
-- messages delivered, how many bounced, complained, were opened, clicked,
-- unsubscribed. A rate that falls to zero is a silent drop of feedback (or
-- of delivery) to look at the same day.
CREATE VIEW engagement_rates AS
SELECT tenant_id, identity,
       count(*) AS delivered,
       count(bounced_at) AS bounced,
       count(complained_at) AS complained,
       count(opened_at) AS opened,
       count(clicked_at) AS clicked,
       count(unsubscribed_at) AS unsubscribed,
       ROUND(count(bounced_at)::numeric / NULLIF(count(*), 0), 4) AS bounce_rate,
       ROUND(count(complained_at)::numeric / NULLIF(count(*), 0), 4) AS complaint_rate,
       ROUND(count(opened_at)::numeric / NULLIF(count(*), 0), 4) AS open_rate,
       ROUND(count(clicked_at)::numeric / NULLIF(count(*), 0), 4) AS click_rate
FROM messages
WHERE status = 'delivered'
GROUP BY tenant_id, identity;
-- (Default privileges of 0003 grant SELECT on new views to ledger_reporter.)

-- Messages that reached a terminal status through each sender identity, per
-- hour and status (the identity the message's row names when it ends;
-- delivered, failed and ambiguous outcomes carry it themselves).
CREATE TABLE identity_hourly (
    identity text        NOT NULL,
    hour     timestamptz NOT NULL,
    status   text        NOT NULL,
    messages bigint      NOT NULL,
    PRIMARY KEY (identity, hour, status)
);

-- The template and version each message was rendered from (pinned at
-- acceptance); NULL for inline content.
ALTER TABLE messages ADD COLUMN template text;
ALTER TABLE messages ADD COLUMN template_version integer;

-- Per-campaign progress with its first attempt and, once every recipient
-- has ended, when the last one did (the campaign's send duration).
CREATE OR REPLACE VIEW campaign_progress AS
SELECT i.intent_id, i.tenant_id, i.kind, i.name, i.recipient_count, i.accepted_at, c.cancelled_at,
       COALESCE(SUM(s.messages) FILTER (WHERE s.status IN
           ('delivered', 'failed', 'render_failed', 'suppressed', 'cancelled', 'dead_lettered')), 0)::bigint AS terminal,
       COALESCE(SUM(s.messages) FILTER (WHERE s.status = 'delivered'), 0)::bigint AS delivered,
       COALESCE(SUM(s.messages) FILTER (WHERE s.status IN ('failed', 'render_failed', 'dead_lettered')), 0)::bigint AS failed,
       COALESCE(SUM(s.messages) FILTER (WHERE s.status = 'suppressed'), 0)::bigint AS suppressed,
       COALESCE(SUM(s.messages) FILTER (WHERE s.status = 'cancelled'), 0)::bigint AS cancelled,
       (SELECT min(m.first_attempt_at) FROM messages m WHERE m.intent_id = i.intent_id) AS started_at,
       CASE WHEN COALESCE(SUM(s.messages) FILTER (WHERE s.status IN
                ('delivered', 'failed', 'render_failed', 'suppressed', 'cancelled', 'dead_lettered')), 0) >= i.recipient_count
            THEN (SELECT max(COALESCE(m.delivered_at, m.failed_at, m.suppressed_at, m.updated_at))
                  FROM messages m WHERE m.intent_id = i.intent_id)
       END AS finished_at
FROM intents i
LEFT JOIN intent_status_counts s ON s.intent_id = i.intent_id
LEFT JOIN intent_cancellations c ON c.intent_id = i.intent_id
GROUP BY i.intent_id, c.cancelled_at;
