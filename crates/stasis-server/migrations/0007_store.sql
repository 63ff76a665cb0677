-- Store integrity (audit 10b, 11).
--
-- The BLAKE3 hash (hex) of each snapshot's manifest object exactly as written to the store,
-- recorded when the snapshot becomes ready; every read of the manifest must match it, so
-- someone who can write to the store cannot swap it. NULL for snapshots taken before: those
-- are read as found (a hash recorded now would vouch for whatever is in the store today).
ALTER TABLE snapshots ADD COLUMN manifest_blake3 TEXT;

-- Each tenant's random salt (hex) for naming its chunks in an unencrypted store (a keyed
-- BLAKE3), made on first need: no chunk is shared across tenants, so deduplication and the
-- upload figures say nothing about what other tenants store.
CREATE TABLE tenant_chunk_salts (
    tenant_id TEXT PRIMARY KEY,
    salt TEXT NOT NULL,
    created_at TEXT NOT NULL
);
