-- An SSE ticket may be bound to the one snapshot it was asked for (NULL: any of its tenant's).
ALTER TABLE sse_tickets ADD COLUMN snapshot_id TEXT;

-- Old idempotency records are pruned by age.
CREATE INDEX idempotency_keys_by_age ON idempotency_keys (created_at);
