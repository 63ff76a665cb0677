-- Encryption at rest (`serve --master-key-file`): each tenant's data key, made on first need,
-- wrapped by the operator's master key (hex), and the id of the master key that wrapped it.
CREATE TABLE tenant_keys (
    tenant_id TEXT PRIMARY KEY,
    wrapped_key TEXT NOT NULL,
    master_key_id TEXT NOT NULL,
    created_at TEXT NOT NULL
);

-- Whether a snapshot was stored encrypted: a server with a master key then refuses an
-- unencrypted manifest in its place (someone with write access to the store cannot swap in
-- a plaintext snapshot).
ALTER TABLE snapshots ADD COLUMN sealed BIGINT NOT NULL DEFAULT 0;
