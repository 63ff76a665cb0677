-- A computer's own egress policy (the SDK's `network_policy`): its rules, as JSON in the
-- order given, and what happens to traffic none of them matches. No row: allow what the
-- platform allows.
CREATE TABLE network_policies (
    computer_id    TEXT PRIMARY KEY,
    tenant_id      TEXT NOT NULL,
    rules          TEXT NOT NULL,
    default_effect TEXT NOT NULL,
    inserted_at    TEXT NOT NULL,
    updated_at     TEXT NOT NULL
);
