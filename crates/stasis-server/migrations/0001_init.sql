-- Tenants, their API keys (hashed), and computers.
CREATE TABLE tenants (
    id         TEXT PRIMARY KEY,
    name       TEXT NOT NULL UNIQUE,
    created_at TEXT NOT NULL
);

CREATE TABLE api_keys (
    id         TEXT PRIMARY KEY,
    tenant_id  TEXT NOT NULL REFERENCES tenants(id),
    key_hash   TEXT NOT NULL UNIQUE,
    prefix     TEXT NOT NULL,
    created_at TEXT NOT NULL
);

CREATE TABLE computers (
    id                 TEXT PRIMARY KEY,
    tenant_id          TEXT NOT NULL REFERENCES tenants(id),
    name               TEXT NOT NULL,
    slug               TEXT NOT NULL,
    status             TEXT NOT NULL,
    template_type      TEXT NOT NULL,
    size               TEXT NOT NULL,
    metadata           TEXT NOT NULL,
    error              TEXT,
    source_snapshot_id TEXT,
    created_at         TEXT NOT NULL,
    updated_at         TEXT NOT NULL
);

CREATE INDEX computers_by_tenant ON computers (tenant_id, created_at);
