-- The reporting read model. Written only by the projector; read by reports.
-- Every row can be rebuilt from the log.

CREATE TABLE messages (
    message_id          uuid PRIMARY KEY,
    tenant_id           text        NOT NULL,
    intent_id           uuid        NOT NULL,
    channel             text,
    recipient           text,
    status              text        NOT NULL,
    status_rank         smallint    NOT NULL,
    attempts            integer     NOT NULL DEFAULT 0,
    error_attempt       integer     NOT NULL DEFAULT 0,
    last_error_code     text,
    last_error          text,
    provider_message_id text,
    accepted_at         timestamptz,
    rendered_at         timestamptz,
    first_attempt_at    timestamptz,
    delivered_at        timestamptz,
    failed_at           timestamptz,
    suppressed_at       timestamptz,
    updated_at          timestamptz NOT NULL
);
CREATE INDEX messages_intent_idx ON messages (intent_id);
CREATE INDEX messages_tenant_status_idx ON messages (tenant_id, status);

CREATE TABLE intents (
    intent_id       uuid PRIMARY KEY,
    tenant_id       text        NOT NULL,
    kind            text        NOT NULL,
    channel         text        NOT NULL,
    priority        text        NOT NULL,
    recipient_count integer     NOT NULL,
    batch_count     integer     NOT NULL,
    accepted_at     timestamptz NOT NULL
);
CREATE INDEX intents_tenant_idx ON intents (tenant_id, accepted_at);

CREATE TABLE dead_letters (
    event_id         uuid PRIMARY KEY,
    tenant_id        text        NOT NULL,
    source_topic     text        NOT NULL,
    source_partition integer     NOT NULL,
    source_offset    bigint      NOT NULL,
    consumer         text        NOT NULL,
    code             text        NOT NULL,
    reason           text        NOT NULL,
    occurred_at      timestamptz NOT NULL
);

-- Consumed offsets, committed in the same transaction as the rows they
-- produced: the projection is exactly-once whatever Kafka's committed
-- offsets say.
CREATE TABLE projector_offsets (
    consumer    text    NOT NULL,
    topic       text    NOT NULL,
    partition   integer NOT NULL,
    next_offset bigint  NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer, topic, partition)
);

CREATE VIEW message_status_summary AS
SELECT tenant_id, status, count(*) AS messages
FROM messages
GROUP BY tenant_id, status;
