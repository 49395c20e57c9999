-- Dead letters sent back to their topic by `ledger dlq reprocess` (or
-- `ledger redrive --status dead-lettered`): each once, unless asked again.
CREATE TABLE dead_letters_reprocessed (
    event_id       uuid        PRIMARY KEY,
    target_topic   text        NOT NULL,
    reprocessed_at timestamptz NOT NULL DEFAULT now(),
    reprocessed_by text        NOT NULL
);
