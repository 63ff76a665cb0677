-- Per-tenant limits set by the operator (`stasis tenant limits`); NULL means the platform's
-- default (the serve flags).
ALTER TABLE tenants ADD COLUMN max_computers BIGINT;
ALTER TABLE tenants ADD COLUMN max_snapshots BIGINT;
ALTER TABLE tenants ADD COLUMN max_stored_bytes BIGINT;
ALTER TABLE tenants ADD COLUMN rate_per_sec BIGINT;
