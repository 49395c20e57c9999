-- A claim's outcome is the outcome event exactly as it went on the log,
-- kept to publish it again when the message's record is read a second
-- time. It is written once per message on the hot path and read back
-- only then, so it is kept as the text it is: as jsonb, PostgreSQL parsed
-- every outcome on the way in (about 10 µs a message, measured), for
-- queries that never look inside it except `ledger redrive`'s, which casts.
ALTER TABLE delivery_claims ALTER COLUMN outcome TYPE text USING outcome::text;
