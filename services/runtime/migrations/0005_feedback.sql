-- Provider feedback is matched to messages by id: the claim also names the
-- message's intent, so a report can become an event about it.
ALTER TABLE delivery_claims ADD COLUMN intent_id uuid;

-- Reports already turned into events, by their provider's id: a provider
-- that sends the same report again (they retry until a 2xx) adds nothing.
CREATE TABLE feedback_seen (
    source            text        NOT NULL,
    provider_event_id text        NOT NULL,
    message_id        uuid        NOT NULL,
    received_at       timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source, provider_event_id)
);
