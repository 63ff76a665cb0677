//! Snapshots of running computers: capture (guest paused briefly), then compress and upload
//! to the snapshot store in the background, with progress events; restore into new
//! computers; soft delete with background collection of chunks nobody needs.

pub mod boot_files;
pub mod events;
pub mod routes;

use std::path::PathBuf;
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
use crate::error::{ApiError, ApiResult};
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
}

/// Chunks younger than this are never collected from a store several processes write.
const SHARED_GRACE: std::time::Duration = std::time::Duration::from_secs(60);

/// What a capture left in the staging directory, recorded so an upload interrupted by a
/// platform restart can be finished from it.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Captured {
    state: PathBuf,
    memory: PathBuf,
    disk: PathBuf,
    machine: MachineConfig,
    pause_ms: u64,
}

impl Snapshots {
    pub fn new(
        db: Db,
        store: SnapshotStore,
        computers: Arc<Computers>,
        events: Arc<EventBus>,
        materializer: Arc<stasis_store::Materializer>,
        jobs: Arc<crate::jobs::Jobs>,
        (staging, shared_store): (PathBuf, bool),
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
    async fn owned_computer(&self, tenant: TenantId, id: ComputerId) -> ApiResult<Computer> {
        match self.db.get_computer_any(id).await? {
            Some(c) if c.tenant_id == tenant => Ok(c),
            _ => Err(ApiError::NotFound { kind: "computer" }),
        }
    }

    /// A snapshot as a route names it: `404 snapshot not found` unless it exists (not deleted)
    /// under that computer and is this tenant's (another tenant's answers the same, so ids
    /// cannot be probed).
    pub async fn find(&self, tenant: TenantId, computer: ComputerId, id: SnapshotId) -> ApiResult<SnapshotRecord> {
        match self.db.get_snapshot(id).await? {
            Some(r)
                if r.snapshot.computer_id == computer
                    && r.snapshot.status != SnapshotStatus::Deleted
                    && r.snapshot.tenant_id == tenant =>
            {
                Ok(r)
            }
            _ => Err(ApiError::NotFound { kind: "snapshot" }),
        }
    }

    pub fn validate_comment(body: &crate::body::JsonObject) -> ApiResult<Option<String>> {
        let comment = body.optional_str("comment")?;
        if let Some(c) = &comment {
            if c.chars().count() > MAX_COMMENT_CHARS {
                return Err(ApiError::invalid(
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

    pub async fn create(
        self: &Arc<Self>,
        tenant: TenantId,
        computer: ComputerId,
        comment: Option<String>,
    ) -> ApiResult<Snapshot> {
        let c = match self.db.get_computer(computer).await? {
            Some(c) if c.tenant_id == tenant => c,
            _ => return Err(ApiError::NotFound { kind: "computer" }),
        };
        if c.status != ComputerStatus::Running || self.computers.host().get(&c.id.to_string()).is_none() {
            return Err(ApiError::conflict(
                crate::error::Conflict::ComputerNotRunning,
                "computer is not running",
            ));
        }
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
            parent_snapshot_id: self.db.latest_ready_snapshot(c.id).await?,
            error: None,
            created_at: now,
            updated_at: now,
        };
        self.db.insert_snapshot(&snapshot, c.size, &c.name).await?;
        drop((quota, admitted));
        let mut e = events::data(snapshot.id, SnapshotStatus::Creating);
        e.step = Some(stasis_types::Step::Queued);
        e.progress = Some(0.0);
        self.events.emit(e).await;
        self.jobs
            .enqueue(
                crate::jobs::JobKind::Snapshot,
                &snapshot.id.to_string(),
                self.computers.host_id(),
                SNAPSHOT_ATTEMPTS,
                std::time::Duration::ZERO,
            )
            .await?;
        Ok(snapshot)
    }

    pub async fn list(&self, tenant: TenantId, computer: ComputerId) -> ApiResult<Vec<Snapshot>> {
        self.owned_computer(tenant, computer).await?;
        Ok(self
            .db
            .list_snapshots(computer)
            .await?
            .into_iter()
            .map(|r| r.snapshot)
            .collect())
    }

    pub async fn delete(
        self: &Arc<Self>,
        tenant: TenantId,
        computer: ComputerId,
        id: SnapshotId,
    ) -> ApiResult<Snapshot> {
        let record = self.find(tenant, computer, id).await?;
        let deletable = [SnapshotStatus::Ready, SnapshotStatus::Failed];
        if !self
            .db
            .transition_snapshot(id, &deletable, SnapshotStatus::Deleted, None)
            .await?
        {
            return Err(ApiError::conflict(
                crate::error::Conflict::SnapshotInUse,
                "snapshot is not in a deletable state",
            ));
        }
        self.events.emit(events::data(id, SnapshotStatus::Deleted)).await;
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
    }

    /// Starts restoring `id` into a new computer; answers at once with it `provisioning`.
    pub async fn restore(
        self: &Arc<Self>,
        tenant: TenantId,
        computer: ComputerId,
        id: SnapshotId,
    ) -> ApiResult<Computer> {
        let record = self.find(tenant, computer, id).await?;
        self.check_restorable(id, &record)?;
        let new = NewComputer {
            name: format!("{}-restored", record.computer_name),
            size: record.size,
            template_type: stasis_types::DEFAULT_TEMPLATE.into(),
            metadata: Default::default(),
        };
        if !self.db.begin_restore(id).await? {
            // A snapshot still being taken is restored as soon as it is ready (the seed's
            // "clone a baseline" recipe restores right after creating); failed and deleted
            // snapshots cannot be.
            if matches!(
                record.snapshot.status,
                SnapshotStatus::Creating | SnapshotStatus::Uploading
            ) {
                let restored = self.computers.insert(tenant, new, Some(id)).await?;
                self.restore_when_ready(id, restored.id, "restore");
                return Ok(restored);
            }
            return Err(ApiError::conflict(
                crate::error::Conflict::SnapshotNotReady,
                "snapshot is not ready",
            ));
        }
        let mut e = events::data(id, SnapshotStatus::Restoring);
        e.step = Some(stasis_types::Step::Queued);
        e.progress = Some(0.0);
        let restored = match self.computers.insert(tenant, new, Some(id)).await {
            Ok(c) => c,
            Err(err) => {
                let _ = self.db.end_restore(id).await;
                return Err(err);
            }
        };
        e.computer_id = Some(restored.id);
        self.events.emit(e).await;
        self.computers.enqueue_restore(&self.jobs, restored.id).await?;
        Ok(restored)
    }

    /// Refuses, before anything is recorded, a snapshot whose machine this host cannot load
    /// (another QEMU release, accelerator, CPU model, device line): `409
    /// snapshot_incompatible` naming the difference. (Snapshots from before machine
    /// descriptions are checked by the restore itself, against their manifest.)
    fn check_restorable(&self, id: SnapshotId, record: &SnapshotRecord) -> ApiResult<()> {
        let Some(description) = &record.description else {
            return Ok(());
        };
        let refused = |why: String| {
            ApiError::conflict(
                crate::error::Conflict::SnapshotIncompatible,
                format!("snapshot {id} cannot be restored on this host: {why}"),
            )
        };
        match stasis_vmm::description::Described::parse(description).map_err(refused)? {
            stasis_vmm::description::Described::Current(d) => d
                .check(&self.computers.host_machine())
                .map_err(|m| refused(m.to_string())),
            stasis_vmm::description::Described::Legacy(_) => Ok(()),
        }
    }

    /// A new computer from a fresh snapshot of a running one (`POST /computers/{id}/clone`).
    pub async fn clone_computer(
        self: &Arc<Self>,
        tenant: TenantId,
        source: ComputerId,
        name: Option<String>,
    ) -> ApiResult<Computer> {
        let original = self.computers.get(tenant, source).await?;
        // The clone will need a computer of the quota: refuse before taking the snapshot.
        self.computers
            .limits()
            .check(tenant, crate::limits::Want::Computer)
            .await?;
        let snapshot = self
            .create(tenant, source, Some(format!("clone of {}", original.name)))
            .await?;
        let new = NewComputer {
            name: name.unwrap_or_else(|| format!("{}-clone", original.name)),
            size: original.size,
            template_type: original.template_type.clone(),
            metadata: original.metadata.clone(),
        };
        let clone = self.computers.insert(tenant, new, Some(snapshot.id)).await?;
        self.restore_when_ready(snapshot.id, clone.id, "clone");
        Ok(clone)
    }

    /// Starts the restore of `computer` from `snapshot` once the snapshot is ready (it is being
    /// taken now); if the snapshot fails, the computer turns `error` saying so.
    fn restore_when_ready(self: &Arc<Self>, snapshot: SnapshotId, computer: ComputerId, what: &'static str) {
        let this = self.clone();
        tokio::spawn(async move {
            let mut rx = this.events.subscribe(snapshot);
            loop {
                let status = this
                    .db
                    .get_snapshot(snapshot)
                    .await
                    .ok()
                    .flatten()
                    .map(|r| r.snapshot.status);
                match status {
                    Some(SnapshotStatus::Ready | SnapshotStatus::Restoring) => {
                        if this.db.begin_restore(snapshot).await.unwrap_or(false) {
                            if let Err(e) = this.computers.enqueue_restore(&this.jobs, computer).await {
                                tracing::warn!(%computer, error = %e, "queueing the restore of a {what}");
                            }
                            return;
                        }
                    }
                    Some(SnapshotStatus::Creating | SnapshotStatus::Uploading) => {}
                    _ => {
                        let reason = format!("the snapshot for this {what} ({snapshot}) failed");
                        let _ = this.db.set_status(computer, ComputerStatus::Error, Some(&reason)).await;
                        return;
                    }
                }
                let _ = tokio::time::timeout(std::time::Duration::from_secs(1), rx.recv()).await;
            }
        });
    }

    /// Where the capture's RAM goes (beside the materialized RAM files, so a finished
    /// snapshot's RAM can be kept by a rename).
    fn staging_memory(&self, id: SnapshotId) -> PathBuf {
        self.materializer.memory_root().join(format!(".{id}.staging"))
    }

    /// Forgets this host's materialized copy of a snapshot: the next restore reads the store.
    pub fn evict_local_copy(&self, id: SnapshotId) {
        self.materializer.evict(id);
    }

    fn staging_dir(&self, id: SnapshotId) -> PathBuf {
        self.staging.join(id.to_string())
    }

    /// The snapshot job: capture (unless done already), upload, then `ready`. A failed upload
    /// is tried again (the capture is kept for it); on the `last` attempt, or if the capture
    /// itself failed, the snapshot ends `failed` with the reason.
    pub async fn snapshot_job(self: &Arc<Self>, target: &str, last: bool) -> crate::jobs::Outcome {
        use crate::jobs::Outcome;
        let Ok(id) = target.parse::<SnapshotId>() else {
            return Outcome::Failed(format!("{target:?} is not a snapshot id"));
        };
        match self.db.get_snapshot(id).await {
            Ok(Some(r)) if matches!(r.snapshot.status, SnapshotStatus::Creating | SnapshotStatus::Uploading) => {}
            Ok(_) => return Outcome::Done, // ended meanwhile (or its host was lost)
            Err(e) => return Outcome::Retry(e.to_string()),
        }
        let staging = self.staging_dir(id);
        let result = self.capture_and_upload(id, &staging).await;
        let captured = staging.join("captured.json").exists();
        match result {
            Ok(()) => {
                let _ = std::fs::remove_dir_all(&staging);
                let _ = std::fs::remove_file(self.staging_memory(id));
                Outcome::Done
            }
            Err(Failure::Transient(reason)) if captured && !last => {
                tracing::warn!(%id, reason, "snapshot upload failed; it will be retried");
                let mut e = events::data(id, SnapshotStatus::Uploading);
                e.step = Some(stasis_types::Step::Retrying);
                e.error = Some(reason.clone());
                self.events.emit(e).await;
                Outcome::Retry(reason)
            }
            Err(Failure::Transient(reason) | Failure::Final(reason)) => {
                let _ = std::fs::remove_dir_all(&staging);
                let _ = std::fs::remove_file(self.staging_memory(id));
                tracing::warn!(%id, reason, "snapshot failed");
                let from = [SnapshotStatus::Creating, SnapshotStatus::Uploading];
                let _ = self
                    .db
                    .transition_snapshot(id, &from, SnapshotStatus::Failed, Some(&reason))
                    .await;
                let mut e = events::data(id, SnapshotStatus::Failed);
                e.error = Some(reason.clone());
                self.events.emit(e).await;
                Outcome::Failed(reason)
            }
        }
    }

    async fn capture_and_upload(&self, id: SnapshotId, staging: &std::path::Path) -> Result<(), Failure> {
        let record = self
            .db
            .get_snapshot(id)
            .await
            .map_err(|e| e.to_string())?
            .ok_or("the snapshot vanished")?;
        // Chunks this upload finds or writes must not be collected before the manifest names them.
        let pin = self.store.pin().await;
        let marker = staging.join("captured.json");
        let captured = match std::fs::read(&marker)
            .ok()
            .and_then(|b| serde_json::from_slice::<Captured>(&b).ok())
        {
            Some(c) => c, // resumed after a restart: the capture is already done
            None => {
                std::fs::create_dir_all(staging).map_err(|e| format!("creating the staging directory: {e}"))?;
                let mut e = events::data(id, SnapshotStatus::Creating);
                e.step = Some(stasis_types::Step::Capturing);
                e.progress = Some(0.0);
                self.events.emit(e).await;
                let computer = record.snapshot.computer_id;
                let guard = self.computers.lifecycle_lock(computer).await;
                let running = self.db.get_computer(computer).await.ok().flatten();
                let vm = match (
                    running.map(|c| c.status),
                    self.computers.host().get(&computer.to_string()),
                ) {
                    (Some(ComputerStatus::Running), Some(vm)) => vm,
                    _ => return Err("computer is not running".into()),
                };
                self.materializer
                    .ensure_memory_root()
                    .map_err(|e| format!("preparing the RAM directory: {e}"))?;
                let capture = vm
                    .capture(staging, &self.staging_memory(id))
                    .await
                    .map_err(|e| format!("capturing the machine: {e}"))?;
                drop(guard);
                // The frozen overlay served its purpose: fold it away while the upload runs.
                let machine = vm.clone();
                tokio::spawn(async move {
                    match machine.compact_disk().await {
                        Ok(n) => tracing::debug!(%computer, removed = n, "disk overlays folded"),
                        Err(e) => tracing::warn!(%computer, error = %e, "folding the disk's overlays"),
                    }
                });
                let captured = Captured {
                    state: capture.state,
                    memory: capture.memory,
                    disk: capture.disk,
                    machine: capture.machine,
                    pause_ms: capture.paused.as_millis() as u64,
                };
                std::fs::write(&marker, serde_json::to_vec(&captured).expect("serializes"))
                    .map_err(|e| format!("recording the capture: {e}"))?;
                captured
            }
        };
        tracing::info!(%id, pause_ms = captured.pause_ms, "snapshot captured");

        self.db
            .transition_snapshot(id, &[SnapshotStatus::Creating], SnapshotStatus::Uploading, None)
            .await
            .map_err(|e| e.to_string())?;
        let mut e = events::data(id, SnapshotStatus::Uploading);
        e.step = Some(stasis_types::Step::Preparing);
        e.progress = Some(0.0);
        self.events.emit(e).await;

        // The capture flattened the disk inside the machine's confinement. (A capture recorded
        // by a version that left that to the upload names the frozen qcow2 instead: its
        // headers are the machine's QEMU's to write, so it is not read here.)
        let flat = captured.disk.clone();
        if flat.extension().is_some_and(|e| e == "qcow2") {
            return Err("the capture was recorded by an earlier version of stasis that left the disk unflattened; take the snapshot again".into());
        }

        // The machine it was taken on, its kernel and initrd by content: a restore starts that
        // machine again, whatever image and QEMU the restoring host has by then.
        let description = describe(&captured.machine)
            .await
            .map_err(|e| Failure::Final(format!("describing the machine: {e}")))?;
        let size_of = |p: &std::path::Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
        let total = size_of(&captured.state)
            + size_of(&captured.memory)
            + size_of(&flat)
            + description.kernel.bytes
            + description.initrd.bytes;
        let (tx, mut rx) = tokio::sync::watch::channel(0u64);
        let bus = self.events.clone();
        let reporter = tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let done = *rx.borrow_and_update();
                let mut e = events::data(id, SnapshotStatus::Uploading);
                e.step = Some(stasis_types::Step::Uploading);
                e.progress = Some(if total == 0 {
                    1.0
                } else {
                    (done as f64 / total as f64).min(1.0)
                });
                e.bytes_done = Some(done);
                e.bytes_total = Some(total);
                bus.progress(e).await;
            }
        });
        let started = Instant::now();
        let tenant = record.snapshot.tenant_id;
        let mut stats = UploadStats::default();
        let mut parts = Vec::new();
        let mut base = 0u64;
        for (path, chunk_size) in [
            (&captured.state, STATE_CHUNK_SIZE),
            (&captured.memory, MEMORY_CHUNK_SIZE),
            (&flat, DISK_CHUNK_SIZE),
            (&captured.machine.kernel, DISK_CHUNK_SIZE),
            (&captured.machine.initrd, DISK_CHUNK_SIZE),
        ] {
            let tx = tx.clone();
            let offset = base;
            let progress: Progress = Arc::new(move |done| {
                let _ = tx.send(offset + done);
            });
            let (part, s) = self
                .store
                .upload_file(&pin, tenant, path, chunk_size, progress)
                .await
                .map_err(|e| format!("uploading to the snapshot store: {e}"))?;
            base += part.size;
            tracing::debug!(%id, file = %path.display(), new_chunks = s.new_chunks, reused = s.reused_chunks,
                uploaded = s.uploaded_bytes, "part uploaded");
            stats.add(s);
            parts.push(part);
        }
        drop(tx);
        let _ = reporter.await;
        let [state, memory, disk, kernel, initrd]: [stasis_store::Part; 5] = parts.try_into().expect("five parts");
        if (kernel.size, initrd.size) != (description.kernel.bytes, description.initrd.bytes) {
            // Replaced under us (an image rebuilt meanwhile): what was hashed is not what went up.
            return Err("the machine's kernel or initrd changed while the snapshot was uploaded".into());
        }
        let mut machine = serde_json::to_value(&description).expect("descriptions serialize");
        machine["size"] = record.size.as_str().into();
        machine["computer_name"] = record.computer_name.clone().into();
        let s = &record.snapshot;
        let manifest = Manifest {
            version: MANIFEST_VERSION,
            snapshot_id: id.to_string(),
            tenant_id: s.tenant_id.to_string(),
            computer_id: s.computer_id.to_string(),
            parent_snapshot_id: s.parent_snapshot_id.map(|p| p.to_string()),
            created_at: s.created_at.to_rfc3339(),
            machine,
            state,
            memory,
            disk,
            chunk_names: self.store.chunk_names(),
            boot: Some(stasis_store::manifest::Boot { kernel, initrd }),
        };
        // Its size is known now: within the tenant's bytes-stored quota, or it fails for good
        // (before its manifest exists, so the collector takes its new chunks). The quota stays
        // locked until it is recorded, so two snapshots finishing at once cannot both pass.
        let quota = match self
            .computers
            .limits()
            .admit_stored(s.tenant_id, stats.stored_bytes)
            .await
        {
            Ok(lock) => lock,
            Err(e @ crate::error::ApiError::Quota(_)) => return Err(Failure::Final(e.to_string())),
            Err(e) => return Err(format!("checking the bytes-stored quota: {e}").into()),
        };
        let written = self
            .store
            .put_manifest(&manifest)
            .await
            .map_err(|e| format!("writing the manifest: {e}"))?;
        let manifest_bytes = written.bytes;
        self.store
            .verify_present(&manifest)
            .await
            .map_err(|e| format!("checking the upload: {e}"))?;
        drop(pin);
        tracing::info!(
            %id,
            raw = stats.raw_bytes,
            uploaded = stats.uploaded_bytes,
            new_chunks = stats.new_chunks,
            reused_chunks = stats.reused_chunks,
            ms = started.elapsed().as_millis() as u64,
            "snapshot uploaded"
        );
        let done = self
            .db
            .complete_snapshot(
                id,
                manifest.state.size,
                manifest.memory.size,
                manifest.disk.size,
                stats.stored_bytes + manifest_bytes,
                stats.uploaded_bytes + manifest_bytes,
                captured.pause_ms,
                self.store.bucket(),
                &format!("{}snapshots/{id}/", self.store.prefix()),
                self.store.encrypted(),
                written.hash,
                (
                    record.size,
                    &record.computer_name,
                    &serde_json::to_value(&description).expect("descriptions serialize"),
                ),
            )
            .await
            .map_err(|e| e.to_string())?;
        drop(quota);
        if let Err(e) = self
            .materializer
            .adopt(id, &manifest, &captured.state, &captured.memory, &flat)
        {
            tracing::warn!(%id, error = %e, "keeping the snapshot's files for local restores");
        }
        if done {
            let mut e = events::data(id, SnapshotStatus::Ready);
            e.progress = Some(1.0);
            e.bytes_done = Some(total);
            e.bytes_total = Some(total);
            self.events.emit(e).await;
        }
        Ok(())
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
            Err(e) => Outcome::Retry(e),
        }
    }

    /// Deletes what deleted snapshots left in the store: manifests, and chunks no live
    /// snapshot (or computer restored from one) needs. Returns how many unneeded chunks were
    /// spared for being younger than the grace period.
    async fn collect_garbage(&self) -> Result<u64, String> {
        let _one = self.gc.lock().await;
        let grace = if self.shared_store {
            SHARED_GRACE
        } else {
            std::time::Duration::ZERO
        };
        let result = async {
            let live = self.db.live_snapshots().await.map_err(|e| e.to_string())?;
            for id in self.db.deleted_snapshot_ids().await.map_err(|e| e.to_string())? {
                let id: SnapshotId = id.parse().map_err(|e| format!("snapshot id {id:?}: {e}"))?;
                if !live.iter().any(|r| r.snapshot_id == id) {
                    self.store.delete_manifest(id).await.map_err(|e| e.to_string())?;
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
                    Err(crate::encryption::explain(&e))
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
            Err(e) => tracing::warn!(error = e, "collecting the snapshot store"),
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
                let _ = std::fs::remove_dir_all(&staging);
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

/// The description of the machine a capture was taken of (its boot files hashed off the
/// async runtime).
async fn describe(machine: &MachineConfig) -> Result<stasis_vmm::description::MachineDescription, String> {
    let machine = machine.clone();
    tokio::task::spawn_blocking(move || stasis_vmm::description::MachineDescription::describe(&machine))
        .await
        .map_err(|e| format!("describing the machine: {e}"))?
}
