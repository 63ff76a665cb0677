//! Durable jobs with leases. Claiming is one statement: on PostgreSQL the candidate row is
//! locked with `FOR UPDATE SKIP LOCKED`, so workers on several processes never take the same
//! job and never wait on each other; on SQLite the single writer gives the same guarantee.

use chrono::{SecondsFormat, Utc};
use sqlx::Row;

use super::{now, Backend, Db};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRecord {
    pub id: String,
    pub kind: String,
    pub target: String,
    pub attempts: i64,
    pub max_attempts: i64,
}

fn at(after: std::time::Duration) -> String {
    (Utc::now() + chrono::Duration::from_std(after).unwrap_or_default()).to_rfc3339_opts(SecondsFormat::Millis, true)
}

impl Db {
    /// Adds a job (for `host`, or for the control plane / embedded platform when None) unless
    /// an unfinished one of the same kind and target exists. Returns whether it was added.
    pub async fn enqueue_job(
        &self,
        kind: &str,
        target: &str,
        host: Option<&str>,
        max_attempts: i64,
        after: std::time::Duration,
    ) -> Result<bool, sqlx::Error> {
        if self.job_pending(kind, target).await? {
            return Ok(false);
        }
        let t = now();
        sqlx::query(
            "INSERT INTO jobs (id, kind, target, host_id, status, attempts, max_attempts, run_after, created_at, \
             updated_at) VALUES ($1, $2, $3, $4, 'queued', 0, $5, $6, $7, $8)",
        )
        .bind(uuid::Uuid::new_v4().to_string())
        .bind(kind)
        .bind(target)
        .bind(host.map(str::to_string))
        .bind(max_attempts)
        .bind(at(after))
        .bind(t.clone())
        .bind(t)
        .execute(self.pool())
        .await?;
        Ok(true)
    }

    /// Takes the lease of one job that is due (queued and its time has come, or running under
    /// a lease that ran out), counting an attempt.
    pub async fn claim_job(
        &self,
        owner: &str,
        lease: std::time::Duration,
        host: Option<&str>,
    ) -> Result<Option<JobRecord>, sqlx::Error> {
        let scope = if host.is_some() {
            "host_id = $4"
        } else {
            "host_id IS NULL"
        };
        let lock = match self.backend() {
            Backend::Postgres => "FOR UPDATE SKIP LOCKED",
            Backend::Sqlite => "",
        };
        let sql = format!(
            "UPDATE jobs SET status = 'running', lease_owner = $1, lease_until = $2, attempts = attempts + 1, \
             updated_at = $3 WHERE id = (SELECT id FROM jobs WHERE {scope} AND \
             ((status = 'queued' AND run_after <= $3) OR (status = 'running' AND lease_until < $3)) \
             ORDER BY run_after LIMIT 1 {lock}) \
             RETURNING id, kind, target, attempts, max_attempts"
        );
        let mut q = sqlx::query(&sql).bind(owner).bind(at(lease)).bind(now());
        if let Some(h) = host {
            q = q.bind(h.to_string());
        }
        let row = q.fetch_optional(self.pool()).await?;
        Ok(row.and_then(|r| {
            Some(JobRecord {
                id: r.try_get("id").ok()?,
                kind: r.try_get("kind").ok()?,
                target: r.try_get("target").ok()?,
                attempts: r.try_get("attempts").ok()?,
                max_attempts: r.try_get("max_attempts").ok()?,
            })
        }))
    }

    /// Extends a lease the owner still holds; false if it lost it.
    pub async fn renew_job(&self, id: &str, owner: &str, lease: std::time::Duration) -> Result<bool, sqlx::Error> {
        let done =
            sqlx::query("UPDATE jobs SET lease_until = $1 WHERE id = $2 AND lease_owner = $3 AND status = 'running'")
                .bind(at(lease))
                .bind(id)
                .bind(owner)
                .execute(self.pool())
                .await?;
        Ok(done.rows_affected() > 0)
    }

    /// Ends a job: `done`, `failed`, or back to `queued` to run again after `retry_after`.
    pub async fn finish_job(
        &self,
        id: &str,
        owner: &str,
        status: &str,
        error: Option<&str>,
        retry_after: Option<std::time::Duration>,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "UPDATE jobs SET status = $1, last_error = $2, run_after = $3, lease_owner = NULL, lease_until = NULL, \
             updated_at = $4 WHERE id = $5 AND lease_owner = $6",
        )
        .bind(status)
        .bind(error.map(str::to_string))
        .bind(at(retry_after.unwrap_or_default()))
        .bind(now())
        .bind(id)
        .bind(owner)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Gives back, at start, the leases an earlier run of this same process (`identity`) held
    /// when it died, so its jobs run again now rather than when the leases run out.
    pub async fn release_jobs_of(&self, identity: &str) -> Result<u64, sqlx::Error> {
        let done = sqlx::query(
            "UPDATE jobs SET status = 'queued', lease_owner = NULL, lease_until = NULL, attempts = attempts - 1 \
             WHERE status = 'running' AND lease_owner LIKE $1",
        )
        .bind(format!("{identity}/%"))
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected())
    }

    /// Fails the unfinished jobs bound to a host (it was lost).
    pub async fn fail_jobs_of_host(&self, host: &str, reason: &str) -> Result<(), sqlx::Error> {
        sqlx::query(
            "UPDATE jobs SET status = 'failed', last_error = $1, lease_owner = NULL, lease_until = NULL, updated_at = $2 \
             WHERE host_id = $3 AND status IN ('queued', 'running')",
        )
        .bind(reason)
        .bind(now())
        .bind(host)
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Whether an unfinished job of this kind exists for `target`.
    pub async fn job_pending(&self, kind: &str, target: &str) -> Result<bool, sqlx::Error> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM jobs WHERE kind = $1 AND target = $2 AND status IN ('queued', 'running')",
        )
        .bind(kind)
        .bind(target)
        .fetch_one(self.pool())
        .await?;
        Ok(n > 0)
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn a_job_is_held_by_one_worker_until_its_lease_runs_out() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open_sqlite(&dir.path().join("j.db")).await.unwrap();
        assert!(db.enqueue_job("snapshot", "s1", None, 3, Duration::ZERO).await.unwrap());
        assert!(
            !db.enqueue_job("snapshot", "s1", None, 3, Duration::ZERO).await.unwrap(),
            "one pending job per target"
        );
        db.enqueue_job("snapshot", "s2", Some("host-b"), 3, Duration::ZERO)
            .await
            .unwrap();

        let job = db
            .claim_job("a/1", Duration::from_millis(300), None)
            .await
            .unwrap()
            .unwrap();
        assert_eq!((job.target.as_str(), job.attempts), ("s1", 1));
        assert!(
            db.claim_job("b/1", Duration::from_secs(30), None)
                .await
                .unwrap()
                .is_none(),
            "held"
        );
        let other = db
            .claim_job("host-b/1", Duration::from_secs(30), Some("host-b"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(other.target, "s2", "a host claims only its own jobs");

        // The holder dies; once its lease runs out another worker takes the job over.
        tokio::time::sleep(Duration::from_millis(400)).await;
        let again = db
            .claim_job("b/1", Duration::from_secs(30), None)
            .await
            .unwrap()
            .unwrap();
        assert_eq!((again.id.as_str(), again.attempts), (job.id.as_str(), 2));
        assert!(
            !db.renew_job(&job.id, "a/1", Duration::from_secs(30)).await.unwrap(),
            "a lost lease"
        );
        db.finish_job(&job.id, "a/1", "done", None, None).await.unwrap();
        assert!(
            db.job_pending("snapshot", "s1").await.unwrap(),
            "only the holder ends a job"
        );

        // Retried later: not due before its time.
        db.finish_job(&job.id, "b/1", "queued", Some("boom"), Some(Duration::from_secs(60)))
            .await
            .unwrap();
        assert!(db
            .claim_job("c/1", Duration::from_secs(30), None)
            .await
            .unwrap()
            .is_none());

        // A restarted process takes back what its earlier run held.
        assert_eq!(db.release_jobs_of("host-b").await.unwrap(), 1);
        let back = db
            .claim_job("host-b/2", Duration::from_secs(30), Some("host-b"))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (back.target.as_str(), back.attempts),
            ("s2", 1),
            "the released attempt is not counted"
        );
        db.finish_job(&back.id, "host-b/2", "done", None, None).await.unwrap();
        assert!(!db.job_pending("snapshot", "s2").await.unwrap());
    }
}
