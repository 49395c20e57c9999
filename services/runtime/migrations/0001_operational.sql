-- Operational state of the sending machinery. Never read by reports.

CREATE TABLE tenants (
    tenant_id    text PRIMARY KEY,
    -- SHA-256 of the API key; the key itself is shown once and never stored.
    api_key_hash bytea       NOT NULL UNIQUE,
    created_at   timestamptz NOT NULL DEFAULT now()
);

-- One row per (tenant, Idempotency-Key): the request's hash and the intent
-- it became. 'pending' until the broker acknowledged the intent.
CREATE TABLE idempotency_keys (
    tenant_id    text        NOT NULL,
    key          text        NOT NULL,
    request_hash bytea       NOT NULL,
    intent_id    uuid        NOT NULL,
    state        text        NOT NULL CHECK (state IN ('pending', 'accepted')),
    response     jsonb,
    created_at   timestamptz NOT NULL DEFAULT now(),
    expires_at   timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, key)
);
CREATE INDEX idempotency_keys_expiry_idx ON idempotency_keys (expires_at);

-- A message is claimed before its provider is called (invariant 4).
--   claimed   : owned by a dispatcher; the provider has not been called
--   attempted : the attempted event is on the log; the call may have happened
--   done      : the outcome is recorded here and on the log
--   ambiguous : attempted, then its dispatcher vanished; held for reconciliation
CREATE TABLE delivery_claims (
    message_id  uuid PRIMARY KEY,
    tenant_id   text        NOT NULL,
    state       text        NOT NULL CHECK (state IN ('claimed', 'attempted', 'done', 'ambiguous')),
    attempt     integer     NOT NULL,
    claimed_by  text        NOT NULL,
    lease_until timestamptz NOT NULL,
    outcome     jsonb,
    updated_at  timestamptz NOT NULL DEFAULT now()
);
