-- Ports of a computer that its owner exposed: each has a preview URL, and is private (the
-- key or a signed link) or public (anyone with the URL).
CREATE TABLE ports (
    computer_id TEXT NOT NULL,
    port        BIGINT NOT NULL,
    visibility  TEXT NOT NULL,
    name        TEXT,
    created_at  TEXT NOT NULL,
    updated_at  TEXT NOT NULL,
    PRIMARY KEY (computer_id, port)
);

-- The platform's own secrets (the key that signs preview links), each made once.
CREATE TABLE platform_secrets (
    name  TEXT PRIMARY KEY,
    value TEXT NOT NULL
);

-- A preview URL names its computer by slug, so live computers' slugs are unique: where two
-- share one already, all but one of them get their id's first eight characters appended.
UPDATE computers SET slug = slug || '-' || substr(id, 1, 8)
WHERE status <> 'destroyed'
  AND id NOT IN (
    SELECT MIN(id) FROM computers WHERE status <> 'destroyed' GROUP BY slug
  );
CREATE UNIQUE INDEX computers_live_slug ON computers (slug) WHERE status <> 'destroyed';
