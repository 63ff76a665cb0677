-- Snapshots as a graph (issue 17): when a snapshot expires, names that pin snapshots, and
-- the indexes the account-wide history and the lineage queries read by.
ALTER TABLE snapshots ADD COLUMN expires_at TEXT;

-- A name pins one snapshot of its tenant: unique per tenant, one name per snapshot; a pinned
-- snapshot never expires and is not in the history list.
CREATE TABLE named_snapshots (
    tenant_id   TEXT NOT NULL,
    name        TEXT NOT NULL,
    snapshot_id TEXT NOT NULL UNIQUE,
    created_at  TEXT NOT NULL,
    PRIMARY KEY (tenant_id, name)
);

CREATE INDEX snapshots_by_tenant ON snapshots (tenant_id, created_at);
CREATE INDEX snapshots_by_parent ON snapshots (parent_snapshot_id);
CREATE INDEX snapshots_by_expiry ON snapshots (expires_at);

-- What a snapshot is for: `snapshot` (asked for: in the history and the computer's list) or
-- `hibernation` (a paused computer's memory and disk, until it resumes).
ALTER TABLE snapshots ADD COLUMN kind TEXT NOT NULL DEFAULT 'snapshot';

-- A paused (hibernated) computer's snapshot, and the idle time after which a computer is
-- paused by itself (0: never).
ALTER TABLE computers ADD COLUMN hibernation_snapshot_id TEXT;
ALTER TABLE computers ADD COLUMN auto_stop_seconds BIGINT NOT NULL DEFAULT 0;
