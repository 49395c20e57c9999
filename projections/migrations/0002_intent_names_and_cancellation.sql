-- Campaign names, and cancellations of intents (kept apart from `intents`
-- because a cancellation may be projected before its intent's header).
ALTER TABLE intents ADD COLUMN name text;

CREATE TABLE intent_cancellations (
    intent_id    uuid PRIMARY KEY,
    cancelled_at timestamptz NOT NULL
);
