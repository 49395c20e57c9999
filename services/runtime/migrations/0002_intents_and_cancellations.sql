-- Which tenant owns which intent (for GET and cancel), and cancellations,
-- which dispatchers check atomically with their claims.
CREATE TABLE intents (
    intent_id       uuid PRIMARY KEY,
    tenant_id       text        NOT NULL,
    kind            text        NOT NULL,
    idempotency_key text,
    accepted_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX intents_tenant_idx ON intents (tenant_id, accepted_at);

CREATE TABLE cancelled_intents (
    intent_id    uuid PRIMARY KEY,
    tenant_id    text        NOT NULL,
    cancelled_at timestamptz NOT NULL DEFAULT now()
);
