-- Delivery: retries, sender identities' budgets, suppressions.

-- A transient failure hands the claim to the retries topic:
--   retrying : attempt `attempt` is due at next_attempt_at; only the retry
--              record of that attempt may claim it
ALTER TABLE delivery_claims DROP CONSTRAINT delivery_claims_state_check;
ALTER TABLE delivery_claims ADD CONSTRAINT delivery_claims_state_check
    CHECK (state IN ('claimed', 'attempted', 'retrying', 'done', 'ambiguous'));
ALTER TABLE delivery_claims ADD COLUMN next_attempt_at timestamptz;
ALTER TABLE delivery_claims ADD COLUMN identity text;
CREATE INDEX delivery_claims_ambiguous_idx ON delivery_claims (tenant_id) WHERE state = 'ambiguous';

-- The governor of each sender identity, shared by every dispatcher
-- instance: a GCRA theoretical arrival time (rate limits per second and
-- minute) and a per-UTC-day counter. Reservations advance them under a row
-- lock, so more instances never multiply the rate, and a restart finds the
-- budget where it was.
CREATE TABLE governor_state (
    identity   text        PRIMARY KEY,
    tat        timestamptz NOT NULL DEFAULT now(),
    day        date        NOT NULL DEFAULT (now() AT TIME ZONE 'UTC')::date,
    day_used   bigint      NOT NULL DEFAULT 0,
    updated_at timestamptz NOT NULL DEFAULT now()
);

-- Recipients a tenant must not send to. Recipients are stored trimmed and
-- lower-cased.
CREATE TABLE suppressions (
    tenant_id  text        NOT NULL,
    recipient  text        NOT NULL,
    reason     text        NOT NULL CHECK (reason IN ('hard_bounce', 'complaint', 'unsubscribe', 'manual', 'expired_subscription')),
    source     text        NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, recipient)
);
