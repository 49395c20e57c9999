-- A message's row is written at each stage (accepted, rendered, attempted,
-- delivered …). When no indexed column changes and its page has room,
-- PostgreSQL updates the row in place (a HOT update): no new entry in any
-- index, and the page's dead versions are reclaimed as it goes. The status
-- changes at every stage, so no index of messages names it; the identity
-- is set at the first attempt, so none names it either. The counts and
-- roll-ups (intent_status_counts, tenant_hourly, identity_hourly) answer
-- "how many in each status"; a list of the messages in one status reads
-- the table, or one tenant's or one campaign's rows through these indexes.
DROP INDEX messages_tenant_status_idx;
DROP INDEX messages_identity_idx;
CREATE INDEX messages_tenant_accepted_idx ON messages (tenant_id, accepted_at);
-- Half of each page is left free at insert for the versions that follow.
ALTER TABLE messages SET (fillfactor = 50);
