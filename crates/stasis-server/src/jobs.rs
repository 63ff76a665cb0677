//! The job worker: claims due jobs from the database (each under a lease it keeps renewing
//! while it works), runs them, and records the outcome: done, failed, or queued again with
//! backoff. A process that dies simply stops renewing; its jobs are claimed again when their
//! leases run out, or at once by the same process when it starts again. Every step of every
//! job is safe to repeat (uploads are content-addressed, manifests are overwritten whole,
//! collection deletes only what no snapshot names).

use std::sync::Arc;
use std::time::Duration;

use std::collections::HashMap;

use futures::future::BoxFuture;

pub use crate::db::JobKind;
use crate::db::{Db, JobEnd, JobRecord};

const LEASE: Duration = Duration::from_secs(30);
/// Jobs one process runs at once (restores of a baseline come five or more at a time).
const PARALLEL: usize = 16;

/// What running a job came to.
pub enum Outcome {
    Done,
    /// Failed for good (the handler has recorded what that means, e.g. a failed snapshot).
    Failed(String),
    /// Failed this time: run again after a backoff.
    Retry(String),
    /// Not now (something else must finish first): run again after this long.
    Later(Duration),
}

/// What runs one kind of job: the services register theirs (the worker knows no service).
pub trait JobHandler: Send + Sync {
    /// Runs the job for `target`; `last` says this is its last attempt.
    fn run<'a>(&'a self, target: &'a str, last: bool) -> BoxFuture<'a, Outcome>;
}

/// A closure over a service is a handler: it gets the job's target and whether this is its
/// last attempt.
impl<F> JobHandler for F
where
    F: Fn(String, bool) -> BoxFuture<'static, Outcome> + Send + Sync,
{
    fn run<'a>(&'a self, target: &'a str, last: bool) -> BoxFuture<'a, Outcome> {
        self(target.to_string(), last)
    }
}

/// The handler of each kind of job this process runs.
pub type Handlers = HashMap<JobKind, Arc<dyn JobHandler>>;

pub struct Jobs {
    db: Db,
    /// Stable across restarts of this process (role and data dir), to release its old leases.
    identity: String,
    /// This run's lease owner: `identity/uuid`.
    owner: String,
    /// Jobs bound to this host (None: the control plane's or embedded platform's).
    host_id: Option<stasis_types::HostId>,
    wake: tokio::sync::Notify,
}

impl Jobs {
    pub fn new(db: Db, identity: String, host_id: Option<stasis_types::HostId>) -> Arc<Jobs> {
        let owner = format!("{identity}/{}", uuid::Uuid::new_v4().simple());
        Arc::new(Jobs {
            db,
            identity,
            owner,
            host_id,
            wake: tokio::sync::Notify::new(),
        })
    }

    /// Queues a job (unless one is pending for the same target) and wakes the worker.
    pub async fn enqueue(
        &self,
        kind: JobKind,
        target: &str,
        host: Option<&stasis_types::HostId>,
        max_attempts: i64,
        after: Duration,
    ) -> Result<(), sqlx::Error> {
        self.db.enqueue_job(kind, target, host, max_attempts, after).await?;
        self.wake.notify_one();
        Ok(())
    }

    /// Claims and runs jobs for as long as the process lives.
    pub async fn work(self: Arc<Self>, handlers: Handlers) {
        let handlers = Arc::new(handlers);
        match self.db.release_jobs_of(&self.identity).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(jobs = n, "taking back the jobs an earlier run left unfinished"),
            Err(e) => tracing::warn!(error = %e, "releasing earlier leases"),
        }
        let slots = Arc::new(tokio::sync::Semaphore::new(PARALLEL));
        loop {
            let Ok(slot) = slots.clone().acquire_owned().await else {
                return;
            };
            match self.db.claim_job(&self.owner, LEASE, self.host_id.as_ref()).await {
                Ok(Some(job)) => {
                    let (this, handlers) = (self.clone(), handlers.clone());
                    tokio::spawn(async move {
                        this.run(job, &handlers).await;
                        drop(slot);
                    });
                }
                Ok(None) => {
                    drop(slot);
                    let _ = tokio::time::timeout(Duration::from_millis(500), self.wake.notified()).await;
                }
                Err(e) => {
                    drop(slot);
                    tracing::warn!(error = %e, "claiming a job");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                }
            }
        }
    }

    async fn run(&self, job: JobRecord, handlers: &Handlers) {
        let renewer = {
            let (db, id, owner) = (self.db.clone(), job.id.clone(), self.owner.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(LEASE / 3).await;
                    if !db.renew_job(&id, &owner, LEASE).await.unwrap_or(true) {
                        tracing::warn!(job = id, "lost the lease of a running job");
                        return;
                    }
                }
            })
        };
        let last = job.attempts >= job.max_attempts;
        let outcome = match JobKind::parse(&job.kind).and_then(|k| handlers.get(&k)) {
            Some(handler) => handler.run(&job.target, last).await,
            None => Outcome::Failed(format!("no handler for job kind {:?} here", job.kind)),
        };
        renewer.abort();
        let (status, error, after) = match outcome {
            Outcome::Done => (JobEnd::Done, None, None),
            Outcome::Failed(e) => (JobEnd::Failed, Some(e), None),
            Outcome::Retry(e) if last => (JobEnd::Failed, Some(e), None),
            Outcome::Retry(e) => {
                let backoff = Duration::from_secs(1 << job.attempts.clamp(0, 6));
                tracing::info!(
                    job = job.id,
                    kind = job.kind,
                    attempt = job.attempts,
                    error = e,
                    ?backoff,
                    "job will be retried"
                );
                (JobEnd::Again, Some(e), Some(backoff))
            }
            Outcome::Later(after) => (JobEnd::Again, None, Some(after)),
        };
        if let Err(e) = self
            .db
            .finish_job(&job.id, &self.owner, status, error.as_deref(), after)
            .await
        {
            tracing::warn!(job = job.id, error = %e, "recording a job's outcome");
        }
        if after.is_some() {
            self.wake.notify_one();
        }
    }
}
