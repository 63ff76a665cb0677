-- Several hosts: which host runs a computer (NULL: the embedded platform itself), and the
-- hosts that joined the control plane.
ALTER TABLE computers ADD COLUMN host_id TEXT;

CREATE INDEX computers_by_host ON computers (host_id, status);

CREATE TABLE hosts (
    id           TEXT PRIMARY KEY,
    url          TEXT NOT NULL,
    capacity_mib BIGINT NOT NULL,
    vcpus        BIGINT NOT NULL,
    status       TEXT NOT NULL,
    last_seen    TEXT NOT NULL,
    joined_at    TEXT NOT NULL
);
