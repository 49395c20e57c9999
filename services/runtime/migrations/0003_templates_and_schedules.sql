-- Template versions: the registry ingest assigns versions from and resolves
-- "latest" against. Renderers read templates from the templates topic.
CREATE TABLE templates (
    tenant_id    text        NOT NULL,
    name         text        NOT NULL,
    version      integer     NOT NULL,
    channel      text        NOT NULL,
    content      jsonb       NOT NULL,
    content_hash bytea       NOT NULL,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, name, version)
);

-- Recipient batches whose send_at is ahead, held by the renderers until due
-- (taken with FOR UPDATE SKIP LOCKED, so any instance may render them).
CREATE TABLE scheduled_batches (
    intent_id   uuid        NOT NULL,
    batch_index integer     NOT NULL,
    tenant_id   text        NOT NULL,
    due_at      timestamptz NOT NULL,
    event       jsonb       NOT NULL,
    PRIMARY KEY (intent_id, batch_index)
);
CREATE INDEX scheduled_batches_due_idx ON scheduled_batches (due_at);
