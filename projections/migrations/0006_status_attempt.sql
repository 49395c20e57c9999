-- A redriven message (`ledger redrive`) starts over from its terminal
-- state: its status is that of its latest delivery attempt, then the
-- highest rank (see projections::fold::supersedes). status_rank is now the
-- rank of the current status.
ALTER TABLE messages ADD COLUMN status_attempt int NOT NULL DEFAULT 0;
UPDATE messages SET status_attempt = attempts WHERE attempts > 0;
COMMENT ON COLUMN messages.status_attempt IS
    'delivery attempt the status belongs to (0: before any attempt; 2147483647: provider feedback)';
