-- Durable jobs: work that must finish (or fail) even if the process doing it dies. A worker
-- claims a job by taking its lease, and a job whose lease runs out is claimed again.
CREATE TABLE jobs (
    id           TEXT PRIMARY KEY,
    kind         TEXT NOT NULL,
    target       TEXT NOT NULL,
    host_id      TEXT,
    status       TEXT NOT NULL,
    attempts     BIGINT NOT NULL DEFAULT 0,
    max_attempts BIGINT NOT NULL,
    run_after    TEXT NOT NULL,
    lease_owner  TEXT,
    lease_until  TEXT,
    last_error   TEXT,
    created_at   TEXT NOT NULL,
    updated_at   TEXT NOT NULL
);

CREATE INDEX jobs_ready ON jobs (status, run_after);
CREATE INDEX jobs_by_target ON jobs (target, status);
