-- A computer's environment variables (the SDK's `computer.env`, `create(env=)`,
-- `start(env=)`): every exec in it runs with them. A snapshot keeps the variables as they
-- were when it was taken, and a restore or clone of it starts with those.
CREATE TABLE computer_env (
    computer_id TEXT NOT NULL,
    name        TEXT NOT NULL,
    value       TEXT NOT NULL,
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL,
    PRIMARY KEY (computer_id, name)
);

CREATE TABLE snapshot_env (
    snapshot_id TEXT NOT NULL,
    name        TEXT NOT NULL,
    value       TEXT NOT NULL,
    PRIMARY KEY (snapshot_id, name)
);
