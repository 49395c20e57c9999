-- The sender identity (provider account) of each message's latest attempt,
-- and of each attempt.
ALTER TABLE messages ADD COLUMN identity text;
-- The attempt the identity came from: a later attempt's identity wins.
ALTER TABLE messages ADD COLUMN identity_attempt integer NOT NULL DEFAULT 0;
ALTER TABLE delivery_attempts ADD COLUMN identity text;
CREATE INDEX messages_identity_idx ON messages (identity, status) WHERE identity IS NOT NULL;
