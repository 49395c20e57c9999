-- Which tenant owns an intent is only ever looked up by the intent's id
-- (its primary key): a status request or a cancellation. The index by
-- (tenant, accepted_at) was read by no query, and every accepted message
-- wrote an entry to it: a batch of 1,000 messages is 1,000 owner rows in
-- the claim that precedes producing. Inserting 300,000 owner rows took
-- 1.85–1.98 s with it and 1.38–1.85 s without (psql, session 39).
-- Listings by tenant are the read model's (its own intents_tenant_idx).
DROP INDEX IF EXISTS intents_tenant_idx;
