//! Durable jobs with leases. Claiming is one statement: on PostgreSQL the candidate row is
//! locked with `FOR UPDATE SKIP LOCKED`, so workers on several processes never take the same
//! job and never wait on each other; on SQLite the single writer gives the same guarantee.

use chrono::{SecondsFormat, Utc};
use sqlx::Row;
use stasis_types::HostId;

use super::{now, Backend, Db};

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JobKind {
    /// Capture a snapshot (if not yet) and upload it; bound to the host running the computer.
    Snapshot,
    /// Boot a computer from its snapshot; bound to the host it was placed on.
    Restore,
    /// Collect the store: manifests of deleted snapshots and chunks no snapshot needs.
    Collect,
}

impl JobKind {
    pub fn as_str(self) -> &'static str {
        match self {
            JobKind::Snapshot => "snapshot",
            JobKind::Restore => "restore",
            JobKind::Collect => "collect",
        }
    }

    pub fn parse(s: &str) -> Option<JobKind> {
        [JobKind::Snapshot, JobKind::Restore, JobKind::Collect]
            .into_iter()
            .find(|k| k.as_str() == s)
    }
}

/// Where a job ends up when a run of it finishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobEnd {
    Done,
    Failed,
    /// Queued again, to run after a while.
    Again,
}

impl JobEnd {
    fn as_str(self) -> &'static str {
        match self {
            JobEnd::Done => "done",
            JobEnd::Failed => "failed",
            JobEnd::Again => "queued",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobRecord {
    pub id: String,
    /// As stored (a kind this build does not know is failed by the worker, naming it).
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
    /// One statement, so it holds when several enqueue at once: the unique index on unfinished
    /// jobs (migration 0009) turns the second insert into nothing.
    pub async fn enqueue_job(
        &self,
        kind: JobKind,
        target: &str,
        host: Option<&HostId>,
        max_attempts: i64,
        after: std::time::Duration,
    ) -> Result<bool, sqlx::Error> {
        let t = now();
        let done = sqlx::query(
            "INSERT INTO jobs (id, kind, target, host_id, status, attempts, max_attempts, run_after, created_at, \
             updated_at) VALUES ($1, $2, $3, $4, 'queued', 0, $5, $6, $7, $8) \
             ON CONFLICT (kind, target) WHERE status IN ('queued', 'running') DO NOTHING",
        )
        .bind(uuid::Uuid::new_v4().to_string())
        .bind(kind.as_str())
        .bind(target)
        .bind(host.map(|h| h.as_str().to_string()))
        .bind(max_attempts)
        .bind(at(after))
        .bind(t.clone())
        .bind(t)
        .execute(self.pool())
        .await?;
        Ok(done.rows_affected() == 1)
    }

    /// Takes the lease of one job that is due (queued and its time has come, or running under
    /// a lease that ran out), counting an attempt.
    pub async fn claim_job(
        &self,
        owner: &str,
        lease: std::time::Duration,
        host: Option<&HostId>,
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

    /// Ends a run of a job: done, failed, or queued again to run after `retry_after`.
    pub async fn finish_job(
        &self,
        id: &str,
        owner: &str,
        end: JobEnd,
        error: Option<&str>,
        retry_after: Option<std::time::Duration>,
    ) -> Result<(), sqlx::Error> {
        sqlx::query(
            "UPDATE jobs SET status = $1, last_error = $2, run_after = $3, lease_owner = NULL, lease_until = NULL, \
             updated_at = $4 WHERE id = $5 AND lease_owner = $6",
        )
        .bind(end.as_str())
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
    pub async fn fail_jobs_of_host(&self, host: &HostId, reason: &str) -> Result<(), sqlx::Error> {
        sqlx::query(
            "UPDATE jobs SET status = 'failed', last_error = $1, lease_owner = NULL, lease_until = NULL, updated_at = $2 \
             WHERE host_id = $3 AND status IN ('queued', 'running')",
        )
        .bind(reason)
        .bind(now())
        .bind(host.as_str())
        .execute(self.pool())
        .await?;
        Ok(())
    }

    /// Whether an unfinished job of this kind exists for `target`.
    pub async fn job_pending(&self, kind: JobKind, target: &str) -> Result<bool, sqlx::Error> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COUNT(*) FROM jobs WHERE kind = $1 AND target = $2 AND status IN ('queued', 'running')",
        )
        .bind(kind.as_str())
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
        assert!(db
            .enqueue_job(JobKind::Snapshot, "s1", None, 3, Duration::ZERO)
            .await
            .unwrap());
        assert!(
            !db.enqueue_job(JobKind::Snapshot, "s1", None, 3, Duration::ZERO)
                .await
                .unwrap(),
            "one pending job per target"
        );
        db.enqueue_job(
            JobKind::Snapshot,
            "s2",
            Some(&"host-b".parse().unwrap()),
            3,
            Duration::ZERO,
        )
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
            .claim_job("host-b/1", Duration::from_secs(30), Some(&"host-b".parse().unwrap()))
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
        db.finish_job(&job.id, "a/1", JobEnd::Done, None, None).await.unwrap();
        assert!(
            db.job_pending(JobKind::Snapshot, "s1").await.unwrap(),
            "only the holder ends a job"
        );

        // Retried later: not due before its time.
        db.finish_job(
            &job.id,
            "b/1",
            JobEnd::Again,
            Some("boom"),
            Some(Duration::from_secs(60)),
        )
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
            .claim_job("host-b/2", Duration::from_secs(30), Some(&"host-b".parse().unwrap()))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(
            (back.target.as_str(), back.attempts),
            ("s2", 1),
            "the released attempt is not counted"
        );
        db.finish_job(&back.id, "host-b/2", JobEnd::Done, None, None)
            .await
            .unwrap();
        assert!(!db.job_pending(JobKind::Snapshot, "s2").await.unwrap());
    }

    /// Enqueues of one job from many tasks at once (each on its own connection) add one row.
    async fn concurrent_enqueues_add_one_job(db: &Db) {
        for round in 0..5 {
            let target = format!("s{round}");
            let tasks: Vec<_> = (0..16)
                .map(|_| {
                    let (db, target) = (db.clone(), target.clone());
                    tokio::spawn(async move {
                        db.enqueue_job(JobKind::Snapshot, &target, None, 3, Duration::ZERO)
                            .await
                    })
                })
                .collect();
            let mut added = 0;
            for t in tasks {
                added += t.await.unwrap().unwrap() as usize;
            }
            let rows: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM jobs WHERE kind = 'snapshot' AND target = $1")
                .bind(&target)
                .fetch_one(db.pool())
                .await
                .unwrap();
            assert_eq!((added, rows), (1, 1), "round {round}: one enqueue wins, one row");
        }
        // A finished job does not count: the next enqueue adds a new one.
        let job = db
            .claim_job("w/1", Duration::from_secs(30), None)
            .await
            .unwrap()
            .unwrap();
        db.finish_job(&job.id, "w/1", JobEnd::Done, None, None).await.unwrap();
        assert!(db
            .enqueue_job(JobKind::Snapshot, &job.target, None, 3, Duration::ZERO)
            .await
            .unwrap());
        assert!(!db
            .enqueue_job(JobKind::Snapshot, &job.target, None, 3, Duration::ZERO)
            .await
            .unwrap());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_enqueues_of_a_job_add_one_row_on_sqlite() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open_sqlite(&dir.path().join("j.db")).await.unwrap();
        concurrent_enqueues_add_one_job(&db).await;
    }

    /// The same on a real PostgreSQL when the e2e services run (STASIS_TEST_POSTGRES), in a
    /// scratch database dropped after.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn concurrent_enqueues_of_a_job_add_one_row_on_postgres() {
        let Some(admin) = std::env::var("STASIS_TEST_POSTGRES").ok().filter(|v| !v.is_empty()) else {
            eprintln!("STASIS_TEST_POSTGRES is not set: skipped");
            return;
        };
        sqlx::any::install_default_drivers();
        let admin_pool = sqlx::any::AnyPoolOptions::new()
            .max_connections(1)
            .connect(&admin)
            .await
            .unwrap();
        let name = format!("stasis_jobs_{}", uuid::Uuid::new_v4().simple());
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&admin_pool)
            .await
            .unwrap();
        let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap();
        let db = Db::open(&format!("{base}/{name}")).await.unwrap();
        concurrent_enqueues_add_one_job(&db).await;
        db.pool().close().await;
        sqlx::query(&format!("DROP DATABASE {name} WITH (FORCE)"))
            .execute(&admin_pool)
            .await
            .unwrap();
    }

    /// Duplicates the old check-then-insert let through are ended by migration 0009, keeping
    /// a running one, else the oldest.
    #[tokio::test]
    async fn migration_0009_ends_duplicate_unfinished_jobs() {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("sqlite://{}?mode=rwc", dir.path().join("j.db").display());
        sqlx::any::install_default_drivers();
        let pool = sqlx::any::AnyPoolOptions::new()
            .max_connections(1)
            .connect(&url)
            .await
            .unwrap();
        let mut conn = pool.acquire().await.unwrap();
        use sqlx::migrate::Migrate;
        conn.ensure_migrations_table().await.unwrap();
        for m in crate::db::MIGRATOR.iter().filter(|m| m.version < 9) {
            conn.apply(m).await.unwrap();
        }
        for (id, target, status, created) in [
            ("a", "s1", "queued", "2026-01-01"),
            ("b", "s1", "running", "2026-01-02"),
            ("c", "s1", "queued", "2026-01-03"),
            ("d", "s2", "queued", "2026-01-03"),
            ("e", "s2", "queued", "2026-01-01"),
            ("f", "s2", "done", "2025-01-01"),
        ] {
            sqlx::query(
                "INSERT INTO jobs (id, kind, target, status, max_attempts, run_after, created_at, updated_at) \
                 VALUES ($1, 'snapshot', $2, $3, 3, $4, $4, $4)",
            )
            .bind(id)
            .bind(target)
            .bind(status)
            .bind(created)
            .execute(&mut *conn)
            .await
            .unwrap();
        }
        drop(conn);
        pool.close().await;
        let db = Db::open(&url).await.unwrap();
        let rows: Vec<(String, String)> = sqlx::query("SELECT id, status FROM jobs ORDER BY id")
            .fetch_all(db.pool())
            .await
            .unwrap()
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
        let got: Vec<(&str, &str)> = rows.iter().map(|(i, s)| (i.as_str(), s.as_str())).collect();
        assert_eq!(
            got,
            [
                ("a", "failed"),
                ("b", "running"),
                ("c", "failed"),
                ("d", "failed"),
                ("e", "queued"),
                ("f", "done")
            ]
        );
        assert!(!db
            .enqueue_job(JobKind::Snapshot, "s2", None, 3, Duration::ZERO)
            .await
            .unwrap());
    }
}
