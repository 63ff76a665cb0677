//! Snapshots of running computers: capture (guest paused briefly), then compress and upload
//! to the snapshot store in the background, with progress events; restore into new
//! computers; soft delete with background collection of chunks nobody needs.

pub mod boot_files;
pub mod browse;
mod capture;
pub mod events;
mod hibernate;
pub mod history;
pub mod history_routes;
pub mod named;
mod restore;
pub mod routes;

use std::path::PathBuf;

use futures::future::BoxFuture;
use std::sync::Arc;
use std::time::Instant;

use chrono::{SubsecRound, Utc};
use serde::{Deserialize, Serialize};
use stasis_store::{
    Manifest, Progress, SnapshotStore, UploadStats, DISK_CHUNK_SIZE, MANIFEST_VERSION, MEMORY_CHUNK_SIZE,
    STATE_CHUNK_SIZE,
};
use stasis_types::{Computer, ComputerId, ComputerStatus, Snapshot, SnapshotId, SnapshotStatus, TenantId};
use stasis_vmm::MachineConfig;

use crate::computers::{Computers, NewComputer};
use crate::db::{Db, SnapshotRecord};
use crate::error::{Error, Resource, Result};
use events::EventBus;

/// Longest `comment` accepted.
pub const MAX_COMMENT_CHARS: usize = 500;

/// Attempts a snapshot's upload gets before the snapshot fails.
const SNAPSHOT_ATTEMPTS: i64 = 3;

/// Why a snapshot job stopped short.
enum Failure {
    /// May pass on a retry (the store was unreachable, the disk full, the process died).
    Transient(String),
    /// Will not pass however often it is tried (a quota).
    Final(String),
}

impl From<String> for Failure {
    fn from(reason: String) -> Failure {
        Failure::Transient(reason)
    }
}

impl From<&str> for Failure {
    fn from(reason: &str) -> Failure {
        Failure::Transient(reason.to_string())
    }
}

pub struct Snapshots {
    db: Db,
    store: SnapshotStore,
    computers: Arc<Computers>,
    events: Arc<EventBus>,
    materializer: Arc<stasis_store::Materializer>,
    staging: PathBuf,
    /// One collection at a time.
    gc: tokio::sync::Mutex<()>,
    /// Snapshot creates are admitted one at a time, so the quota check and the insert that
    /// counts against it cannot interleave.
    admission: tokio::sync::Mutex<()>,
    jobs: Arc<crate::jobs::Jobs>,
    /// Whether other processes (hosts) upload to the same store: then collection waits for
    /// their uploads and spares chunks younger than `SHARED_GRACE`.
    shared_store: bool,
    /// How long a snapshot is kept when its create names no expiry (None: until deleted).
    default_ttl: Option<std::time::Duration>,
    /// Readers of the disks of snapshots being browsed.
    browsing: browse::Browsing,
}

/// When a new snapshot expires.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Expiry {
    /// The platform's default (`--snapshot-ttl-secs`).
    #[default]
    Default,
    At(chrono::DateTime<Utc>),
    /// Kept until deleted, whatever the default (a name will pin it).
    Never,
}

/// Why a snapshot is deleted (its deletion event says).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Deletion {
    Asked,
    /// Its `expires_at` passed.
    Expired,
}

/// What a snapshot create asks for besides its computer.
#[derive(Debug, Clone, Default)]
pub struct NewSnapshot {
    pub comment: Option<String>,
    pub expiry: Expiry,
}

/// Chunks younger than this are never collected from a store several processes write.
const SHARED_GRACE: std::time::Duration = std::time::Duration::from_secs(60);

/// What a capture left in the staging directory, recorded so an upload interrupted by a
/// platform restart can be finished from it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Captured {
    state: PathBuf,
    /// The RAM file; with `changes_over`, the changed pages alone (a sparse file).
    memory: PathBuf,
    disk: PathBuf,
    machine: MachineConfig,
    pause_ms: u64,
    /// Captured as changes over this snapshot's RAM (held by this host): see
    /// [`stasis_vmm::Vm::capture_changes`].
    #[serde(default)]
    changes_over: Option<SnapshotId>,
}

impl Snapshots {
    /// The jobs snapshots run: captures, restores and collection.
    pub fn job_handlers(self: &Arc<Self>) -> crate::jobs::Handlers {
        use crate::jobs::{JobHandler, JobKind};
        let (capture, collect, computers) = (self.clone(), self.clone(), self.computers.clone());
        let handlers: [(JobKind, Arc<dyn JobHandler>); 3] = [
            (
                JobKind::Snapshot,
                Arc::new(move |target: String, last| {
                    let s = capture.clone();
                    Box::pin(async move { s.snapshot_job(&target, last).await }) as BoxFuture<'static, _>
                }),
            ),
            (
                JobKind::Restore,
                Arc::new(move |target: String, _| {
                    let c = computers.clone();
                    Box::pin(async move { c.restore_job(&target).await }) as BoxFuture<'static, _>
                }),
            ),
            (
                JobKind::Collect,
                Arc::new(move |_: String, _| {
                    let s = collect.clone();
                    Box::pin(async move { s.collect_job().await }) as BoxFuture<'static, _>
                }),
            ),
        ];
        handlers.into_iter().collect()
    }

    pub fn new(
        db: Db,
        store: SnapshotStore,
        computers: Arc<Computers>,
        events: Arc<EventBus>,
        materializer: Arc<stasis_store::Materializer>,
        jobs: Arc<crate::jobs::Jobs>,
        (staging, shared_store, default_ttl): (PathBuf, bool, Option<std::time::Duration>),
    ) -> Arc<Snapshots> {
        Arc::new(Snapshots {
            db,
            store,
            computers,
            events,
            materializer,
            staging,
            gc: tokio::sync::Mutex::new(()),
            admission: tokio::sync::Mutex::new(()),
            jobs,
            shared_store,
            default_ttl,
            browsing: Default::default(),
        })
    }

    /// Queues a collection of the store (the control plane's or embedded platform's job).
    pub async fn schedule_collection(&self, after: std::time::Duration) {
        if let Err(e) = self
            .jobs
            .enqueue(crate::jobs::JobKind::Collect, "store", None, 1000, after)
            .await
        {
            tracing::warn!(error = %e, "queueing a store collection");
        }
    }

    pub fn computers(&self) -> &Arc<Computers> {
        &self.computers
    }

    pub fn events(&self) -> &Arc<EventBus> {
        &self.events
    }

    pub fn db(&self) -> &Db {
        &self.db
    }

    /// The computer a snapshot route names, if the tenant owns it (destroyed ones included:
    /// snapshots outlive their computer).
    async fn owned_computer(&self, tenant: TenantId, id: ComputerId) -> Result<Computer> {
        match self.db.get_computer_any(id).await? {
            Some(c) if c.tenant_id == tenant => Ok(c),
            _ => Err(Error::not_found(Resource::Computer, id)),
        }
    }

    /// A snapshot as a route names it: `404 snapshot not found` unless it exists (not deleted)
    /// under that computer and is this tenant's (another tenant's answers the same, so ids
    /// cannot be probed).
    pub async fn find(&self, tenant: TenantId, computer: ComputerId, id: SnapshotId) -> Result<SnapshotRecord> {
        match self.find_even_deleted(tenant, computer, id).await? {
            r if r.snapshot.status != SnapshotStatus::Deleted => Ok(r),
            _ => Err(Error::not_found(Resource::Snapshot, id)),
        }
    }

    /// As [`Snapshots::find`], deleted snapshots included (their event log stays readable: a
    /// client that follows one sees why it went).
    pub async fn find_even_deleted(
        &self,
        tenant: TenantId,
        computer: ComputerId,
        id: SnapshotId,
    ) -> Result<SnapshotRecord> {
        match self.db.get_snapshot(id).await? {
            Some(r) if r.snapshot.computer_id == computer && r.snapshot.tenant_id == tenant => Ok(r),
            _ => Err(Error::not_found(Resource::Snapshot, id)),
        }
    }

    pub fn validate_comment(comment: Option<String>) -> Result<Option<String>> {
        if let Some(c) = &comment {
            if c.chars().count() > MAX_COMMENT_CHARS {
                return Err(Error::invalid(
                    "comment",
                    format!(
                        "comment must be at most {MAX_COMMENT_CHARS} characters (got {})",
                        c.chars().count()
                    ),
                ));
            }
        }
        Ok(comment)
    }

    /// When a snapshot asked with `expiry` at `now` expires.
    fn expires_at(&self, expiry: Expiry, now: chrono::DateTime<Utc>) -> Option<chrono::DateTime<Utc>> {
        match expiry {
            Expiry::At(t) => Some(t),
            Expiry::Never => None,
            Expiry::Default => self
                .default_ttl
                .and_then(|d| chrono::Duration::from_std(d).ok())
                .map(|d| now + d),
        }
    }

    /// The expiry a create asks for: `ttl_seconds` or `expires_at` (not both), in the future.
    pub fn validate_expiry(ttl_seconds: Option<u64>, expires_at: Option<chrono::DateTime<Utc>>) -> Result<Expiry> {
        const MAX_TTL: u64 = 100 * 365 * 24 * 3600;
        match (ttl_seconds, expires_at) {
            (Some(_), Some(_)) => Err(Error::invalid(
                "ttl_seconds",
                "give ttl_seconds or expires_at, not both",
            )),
            (Some(0), None) => Err(Error::invalid("ttl_seconds", "ttl_seconds must be at least 1")),
            (Some(s), None) if s > MAX_TTL => Err(Error::invalid(
                "ttl_seconds",
                format!("ttl_seconds must be at most {MAX_TTL} (100 years); got {s}"),
            )),
            (Some(s), None) => Ok(Expiry::At(
                Utc::now().trunc_subsecs(3) + chrono::Duration::seconds(s as i64),
            )),
            (None, Some(t)) if t <= Utc::now() => Err(Error::invalid(
                "expires_at",
                format!("expires_at must be in the future; {} has passed", t.to_rfc3339()),
            )),
            (None, Some(t)) => Ok(Expiry::At(t.trunc_subsecs(3))),
            (None, None) => Ok(Expiry::Default),
        }
    }

    pub async fn create(
        self: &Arc<Self>,
        tenant: TenantId,
        computer: ComputerId,
        new: NewSnapshot,
    ) -> Result<Snapshot> {
        let NewSnapshot { comment, expiry } = new;
        let c = match self.db.get_computer(computer).await? {
            Some(c) if c.tenant_id == tenant => c,
            _ => return Err(Error::not_found(Resource::Computer, computer)),
        };
        let host = self.computers.host();
        let name = c.id.to_string();
        let capturable = match c.status {
            ComputerStatus::Running => host.get(&name).is_some(),
            // A stopped computer's snapshot is its disk alone: where its disk is.
            ComputerStatus::Stopped => host.get(&name).is_none() && host.paths(&name).config().exists(),
            _ => false,
        };
        if !capturable {
            return Err(Error::conflict(
                crate::error::Conflict::ComputerNotRunning,
                format!(
                    "computer {} is {}: a snapshot is taken of a running computer (with its memory) or a stopped one (its disk)",
                    c.id,
                    c.status.as_str()
                ),
            ));
        }
        let snapshot = self.record_new(&c, comment, expiry).await?;
        self.enqueue_capture(snapshot.id).await?;
        Ok(snapshot)
    }

    /// Records a new snapshot of computer `c` (`creating`), within its tenant's quota.
    async fn record_new(&self, c: &Computer, comment: Option<String>, expiry: Expiry) -> Result<Snapshot> {
        let tenant = c.tenant_id;
        let admitted = self.admission.lock().await;
        let quota = self
            .computers
            .limits()
            .admit(tenant, crate::limits::Want::Snapshot)
            .await?;
        let now = Utc::now().trunc_subsecs(3);
        let snapshot = Snapshot {
            id: SnapshotId::new(),
            computer_id: c.id,
            tenant_id: tenant,
            comment,
            status: SnapshotStatus::Creating,
            state_size_bytes: None,
            memory_size_bytes: None,
            rootfs_size_bytes: None,
            compressed_size_bytes: None,
            uploaded_bytes: None,
            pause_ms: None,
            s3_bucket: None,
            s3_prefix: None,
            // Its lineage: the computer's previous snapshot, or for the first one of a restored
            // or cloned computer, the snapshot it came from.
            parent_snapshot_id: match self.db.latest_snapshot(c.id).await? {
                Some(previous) => Some(previous),
                None => c.source_snapshot_id,
            },
            error: None,
            created_at: now,
            updated_at: now,
            expires_at: self.expires_at(expiry, now),
            name: None,
        };
        self.db.insert_snapshot(&snapshot, c.size, &c.name).await?;
        self.db.snapshot_env(c.id, snapshot.id).await?;
        drop((quota, admitted));
        let mut e = events::data(snapshot.id, SnapshotStatus::Creating);
        e.step = Some(stasis_types::Step::Queued);
        e.progress = Some(0.0);
        self.events.emit(e).await;
        Ok(snapshot)
    }

    /// Queues the job that captures (unless that is done) and uploads snapshot `id`.
    async fn enqueue_capture(&self, id: SnapshotId) -> Result<()> {
        self.jobs
            .enqueue(
                crate::jobs::JobKind::Snapshot,
                &id.to_string(),
                self.computers.host_id(),
                SNAPSHOT_ATTEMPTS,
                std::time::Duration::ZERO,
            )
            .await?;
        Ok(())
    }

    pub async fn list(&self, tenant: TenantId, computer: ComputerId) -> Result<Vec<Snapshot>> {
        self.owned_computer(tenant, computer).await?;
        Ok(self
            .db
            .list_snapshots(computer)
            .await?
            .into_iter()
            .map(|r| r.snapshot)
            .collect())
    }

    pub async fn delete(self: &Arc<Self>, tenant: TenantId, computer: ComputerId, id: SnapshotId) -> Result<Snapshot> {
        let record = self.find(tenant, computer, id).await?;
        self.delete_record(record, Deletion::Asked).await
    }

    /// Deletes a snapshot that nothing depends on: it turns `deleted` at once (an event says
    /// so, and why), its stored objects are collected in the background. A name pins it
    /// (`409 SNAPSHOT_IN_USE` naming the name); so do a capture or a restore in flight.
    pub(crate) async fn delete_record(self: &Arc<Self>, record: SnapshotRecord, why: Deletion) -> Result<Snapshot> {
        let id = record.snapshot.id;
        if let Some(name) = &record.snapshot.name {
            return Err(Error::conflict(
                crate::error::Conflict::SnapshotInUse,
                format!("snapshot {id} is pinned by the name {name:?}: delete the name first (DELETE /named-snapshots/{name})"),
            ));
        }
        let deletable = [SnapshotStatus::Ready, SnapshotStatus::Failed];
        if !self
            .db
            .transition_snapshot(id, &deletable, SnapshotStatus::Deleted, None)
            .await?
        {
            let why = match self.db.get_snapshot(id).await?.map(|r| r.snapshot.status) {
                Some(SnapshotStatus::Creating | SnapshotStatus::Uploading) => "it is still being taken",
                Some(SnapshotStatus::Restoring) => "a computer is being restored from it",
                Some(SnapshotStatus::Deleted) | None => return Err(Error::not_found(Resource::Snapshot, id)),
                Some(_) => "it is not in a deletable state",
            };
            return Err(Error::conflict(
                crate::error::Conflict::SnapshotInUse,
                format!("snapshot {id} cannot be deleted now: {why}"),
            ));
        }
        // No restore can be made of it now: the variables it kept go.
        self.db.delete_snapshot_env(id).await?;
        let mut e = events::data(id, SnapshotStatus::Deleted);
        if why == Deletion::Expired {
            e.step = Some(stasis_types::Step::Expired);
        }
        self.events.emit(e).await;
        self.schedule_collection(std::time::Duration::ZERO).await;
        self.sweep_local_copies().await;
        let mut s = record.snapshot;
        s.status = SnapshotStatus::Deleted;
        s.updated_at = Utc::now().trunc_subsecs(3);
        Ok(s)
    }

    /// Removes this host's copies of snapshots that are deleted, failed or unknown: their RAM
    /// and device state at once, their disk once no computer restored from them is left (the
    /// store's own copy goes with collection; these would otherwise stay for good, in clear).
    pub async fn sweep_local_copies(&self) {
        for id in self.materializer.cached() {
            let gone = match self.db.get_snapshot(id).await {
                Ok(None) => true,
                Ok(Some(r)) => matches!(r.snapshot.status, SnapshotStatus::Deleted | SnapshotStatus::Failed),
                Err(e) => {
                    tracing::warn!(%id, error = %e, "checking a local snapshot copy");
                    continue;
                }
            };
            if !gone {
                continue;
            }
            match self.db.snapshot_booted_from(id).await {
                Ok(false) => {
                    tracing::info!(%id, "removing the local copy of a snapshot that is gone");
                    self.materializer.evict(id);
                }
                Ok(true) => self.materializer.evict_keeping_disk(id),
                Err(e) => tracing::warn!(%id, error = %e, "checking a local snapshot copy"),
            }
        }
        // The kernels and initrds kept for restores: those of live snapshots stay.
        match self.db.live_descriptions().await {
            Ok(descriptions) => {
                let removed = self
                    .computers
                    .boot_files()
                    .sweep(boot_files::named_by(&descriptions))
                    .await;
                if removed > 0 {
                    tracing::info!(removed, "removed boot files no live snapshot was taken with");
                }
            }
            Err(e) => tracing::warn!(error = %e, "listing the boot files live snapshots need"),
        }
    }

    /// Forgets this host's materialized copy of a snapshot: the next restore reads the store.
    pub fn evict_local_copy(&self, id: SnapshotId) {
        self.materializer.evict(id);
    }

    /// The collection job. With a store other processes upload to, it waits until no upload
    /// is in flight and spares young chunks, coming back for them after the grace period.
    pub async fn collect_job(&self) -> crate::jobs::Outcome {
        use crate::jobs::Outcome;
        if self.shared_store {
            match self
                .db
                .count_snapshots_in(&[SnapshotStatus::Creating, SnapshotStatus::Uploading])
                .await
            {
                Ok(0) => {}
                Ok(_) => return Outcome::Later(std::time::Duration::from_secs(5)),
                Err(e) => return Outcome::Retry(e.to_string()),
            }
        }
        match self.collect_garbage().await {
            Ok(deferred) if deferred > 0 => {
                self.schedule_collection(SHARED_GRACE).await;
                Outcome::Done
            }
            Ok(_) => Outcome::Done,
            Err(e) => Outcome::Retry(e.to_string()),
        }
    }

    /// Deletes what deleted snapshots left in the store: manifests, and chunks no live
    /// snapshot (or computer restored from one) needs. Returns how many unneeded chunks were
    /// spared for being younger than the grace period.
    async fn collect_garbage(&self) -> Result<u64, CollectError> {
        let _one = self.gc.lock().await;
        let grace = if self.shared_store {
            SHARED_GRACE
        } else {
            std::time::Duration::ZERO
        };
        let result = async {
            let live = self.db.live_snapshots().await?;
            for id in self.db.deleted_snapshot_ids().await? {
                let id: SnapshotId = id.parse().map_err(|_| CollectError::BadId(id))?;
                if !live.iter().any(|r| r.snapshot_id == id) {
                    self.store.delete_manifest(id).await?;
                }
            }
            match self.store.collect_garbage(&live, grace).await {
                Ok(gc) => Ok(gc),
                Err(e) => {
                    // A live manifest modified in the store: that snapshot is damaged, as a
                    // restore would find; nothing is collected until it is deleted.
                    if let Some(id) = e.damaged_snapshot() {
                        self.mark_damaged(id, &e).await;
                    }
                    Err(CollectError::Store(e))
                }
            }
        }
        .await;
        match &result {
            Ok(gc) => tracing::info!(
                deleted_chunks = gc.deleted,
                spared_young = gc.young,
                "snapshot store collected"
            ),
            Err(e) => tracing::warn!(error = %e, "collecting the snapshot store"),
        }
        result.map(|gc| gc.young)
    }

    async fn mark_damaged(&self, id: SnapshotId, e: &stasis_store::StoreError) {
        let reason = format!("snapshot {id} is damaged and cannot be restored: {e}");
        let from = [SnapshotStatus::Ready, SnapshotStatus::Restoring];
        if let Ok(true) = self
            .db
            .transition_snapshot(id, &from, SnapshotStatus::Failed, Some(&reason))
            .await
        {
            self.materializer.evict(id);
            let mut e = events::data(id, SnapshotStatus::Failed);
            e.error = Some(reason);
            self.events.emit(e).await;
        }
    }

    /// After a platform restart: finish uploads whose capture completed, fail the others.
    pub async fn recover(self: &Arc<Self>) -> Result<(), sqlx::Error> {
        for r in self
            .db
            .snapshots_in(
                &[SnapshotStatus::Creating, SnapshotStatus::Uploading],
                self.computers.host_id(),
            )
            .await?
        {
            let id = r.snapshot.id;
            let staging = self.staging_dir(id);
            if self
                .db
                .job_pending(crate::jobs::JobKind::Snapshot, &id.to_string())
                .await?
            {
                continue; // its job carries on (the worker takes back this process's leases)
            }
            if staging.join("captured.json").exists() {
                tracing::info!(%id, "resuming an interrupted snapshot upload");
                self.jobs
                    .enqueue(
                        crate::jobs::JobKind::Snapshot,
                        &id.to_string(),
                        self.computers.host_id(),
                        SNAPSHOT_ATTEMPTS,
                        std::time::Duration::ZERO,
                    )
                    .await?;
            } else {
                // (Its RAM file too: it would hold tmpfs memory for nothing.)
                self.drop_staging(id).await;
                let reason = "the platform stopped before the machine was captured";
                let from = [SnapshotStatus::Creating, SnapshotStatus::Uploading];
                self.db
                    .transition_snapshot(id, &from, SnapshotStatus::Failed, Some(reason))
                    .await?;
                let mut e = events::data(id, SnapshotStatus::Failed);
                e.error = Some(reason.into());
                self.events.emit(e).await;
            }
        }
        Ok(())
    }
}
/// Why a collection of the store stopped (it is retried).
#[derive(Debug, thiserror::Error)]
enum CollectError {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("the database lists {0:?} as a deleted snapshot, which is not a snapshot id")]
    BadId(String),
    #[error("{}", crate::encryption::explain(.0))]
    Store(#[from] stasis_store::StoreError),
}
