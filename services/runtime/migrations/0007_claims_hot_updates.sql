-- A claim's state changes three times per message (claimed, attempted,
-- done). An index whose predicate reads `state` makes every such update a
-- non-HOT one (a new entry in every index of the table); room on the page
-- lets the new row version stay there. `ledger ambiguous` scans instead.
DROP INDEX delivery_claims_ambiguous_idx;
ALTER TABLE delivery_claims SET (fillfactor = 50);
