-- Snapshots, their progress events, SSE tickets, and idempotent POSTs.
CREATE TABLE snapshots (
    id                    TEXT PRIMARY KEY,
    computer_id           TEXT NOT NULL,
    tenant_id             TEXT NOT NULL REFERENCES tenants(id),
    comment               TEXT,
    status                TEXT NOT NULL,
    state_size_bytes      BIGINT,
    memory_size_bytes     BIGINT,
    rootfs_size_bytes     BIGINT,
    compressed_size_bytes BIGINT,
    uploaded_bytes        BIGINT,
    pause_ms              BIGINT,
    s3_bucket             TEXT,
    s3_prefix             TEXT,
    parent_snapshot_id    TEXT,
    error                 TEXT,
    restores_active       BIGINT NOT NULL DEFAULT 0,
    machine               TEXT,
    created_at            TEXT NOT NULL,
    updated_at            TEXT NOT NULL
);

CREATE INDEX snapshots_by_computer ON snapshots (computer_id, created_at);

CREATE TABLE snapshot_events (
    snapshot_id TEXT NOT NULL,
    seq         BIGINT NOT NULL,
    event       TEXT NOT NULL,
    data        TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    PRIMARY KEY (snapshot_id, seq)
);

CREATE TABLE sse_tickets (
    ticket_hash TEXT PRIMARY KEY,
    tenant_id   TEXT NOT NULL,
    expires_at  TEXT NOT NULL,
    used        BIGINT NOT NULL DEFAULT 0
);

CREATE TABLE idempotency_keys (
    tenant_id   TEXT NOT NULL,
    key         TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    status      BIGINT,
    body        TEXT,
    created_at  TEXT NOT NULL,
    PRIMARY KEY (tenant_id, key)
);
