-- At most one unfinished (queued or running) job per kind and target, kept by the database so
-- that two enqueues at once cannot both add one (enqueue_job inserts with ON CONFLICT against
-- this index).
--
-- Duplicates that the earlier check-then-insert let through are ended first, keeping one per
-- kind and target: a running one before a queued one, then the oldest.
UPDATE jobs SET status = 'failed', last_error = 'a duplicate of another unfinished job (migration 0009)',
    lease_owner = NULL, lease_until = NULL
WHERE status IN ('queued', 'running') AND EXISTS (
    SELECT 1 FROM jobs AS other
    WHERE other.kind = jobs.kind AND other.target = jobs.target AND other.id <> jobs.id
      AND other.status IN ('queued', 'running')
      AND (CASE WHEN other.status = 'running' THEN 0 ELSE 1 END,
           other.created_at, other.id)
        < (CASE WHEN jobs.status = 'running' THEN 0 ELSE 1 END,
           jobs.created_at, jobs.id)
);

CREATE UNIQUE INDEX jobs_one_unfinished ON jobs (kind, target) WHERE status IN ('queued', 'running');
