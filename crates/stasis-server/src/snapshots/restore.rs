//! Restore: a snapshot into a new running computer, from the snapshot's own manifest and
//! machine description, as a job on the host that runs it; clone (a fresh snapshot, restored).

use std::sync::Arc;

use super::*;

/// How a restore's new computer is made.
#[derive(Debug, Clone)]
pub struct Fork {
    /// Its name (default: the snapshot's computer's with `suffix`).
    pub name: Option<String>,
    pub suffix: &'static str,
    /// It starts with the variables the snapshot kept.
    pub env_from_snapshot: bool,
    /// A snapshot still being taken is restored once it is ready (else `409
    /// SNAPSHOT_NOT_READY` at once).
    pub wait_until_ready: bool,
}

impl Fork {
    pub fn restore() -> Fork {
        Fork {
            name: None,
            suffix: "-restored",
            env_from_snapshot: true,
            wait_until_ready: true,
        }
    }
}

impl Snapshots {
    /// Starts restoring `id` into a new computer; answers at once with it `provisioning`.
    pub async fn restore(self: &Arc<Self>, tenant: TenantId, computer: ComputerId, id: SnapshotId) -> Result<Computer> {
        let record = self.find(tenant, computer, id).await?;
        self.restore_record(tenant, record, Fork::restore()).await
    }

    /// Starts restoring the snapshot `record` is of into a new computer made as `fork` says.
    pub async fn restore_record(
        self: &Arc<Self>,
        tenant: TenantId,
        record: SnapshotRecord,
        fork: Fork,
    ) -> Result<Computer> {
        let id = record.snapshot.id;
        let computer = record.snapshot.computer_id;
        self.check_restorable(id, &record)?;
        let new = NewComputer {
            name: fork
                .name
                .unwrap_or_else(|| format!("{}{}", record.computer_name, fork.suffix)),
            size: record.size,
            template_type: stasis_types::DEFAULT_TEMPLATE.into(),
            // Where it came from, in a field the official SDK keeps.
            metadata: lineage_metadata(Default::default(), id),
            // As its snapshot's computer had (or has) it.
            network: self.db.get_computer_any(computer).await?.is_none_or(|c| c.network),
            env: Vec::new(),
            env_from_snapshot: fork.env_from_snapshot,
        };
        if !self.db.begin_restore(id).await? {
            // A snapshot still being taken is restored as soon as it is ready (the seed's
            // "clone a baseline" recipe restores right after creating); failed and deleted
            // snapshots cannot be.
            let status = self.db.get_snapshot(id).await?.map(|r| r.snapshot.status);
            if fork.wait_until_ready && matches!(status, Some(SnapshotStatus::Creating | SnapshotStatus::Uploading)) {
                let restored = self.computers.insert(tenant, new, Some(id)).await?;
                self.restore_when_ready(id, restored.id, "restore");
                return Ok(restored);
            }
            let why = match status {
                Some(SnapshotStatus::Creating | SnapshotStatus::Uploading) => {
                    format!("snapshot {id} is still being taken; retry once it is ready")
                }
                Some(s) => format!(
                    "snapshot {id} is not ready: it is {} and cannot be restored",
                    s.as_str()
                ),
                None => format!("snapshot {id} is gone"),
            };
            return Err(Error::conflict(crate::error::Conflict::SnapshotNotReady, why));
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
    fn check_restorable(&self, id: SnapshotId, record: &SnapshotRecord) -> Result<()> {
        let Some(description) = &record.description else {
            return Ok(());
        };
        let refused = |why: &dyn std::fmt::Display| {
            Error::conflict(
                crate::error::Conflict::SnapshotIncompatible,
                format!("snapshot {id} cannot be restored on this host: {why}"),
            )
        };
        match stasis_vmm::description::Described::parse(description).map_err(|e| refused(&e))? {
            stasis_vmm::description::Described::Current(d) => {
                d.check(&self.computers.host_machine()).map_err(|m| refused(&m))
            }
            stasis_vmm::description::Described::Legacy(_) => Ok(()),
        }
    }

    /// A new computer from a fresh snapshot of a running one (`POST /computers/{id}/clone`).
    pub async fn clone_computer(
        self: &Arc<Self>,
        tenant: TenantId,
        source: ComputerId,
        name: Option<String>,
    ) -> Result<Computer> {
        let original = self.computers.get(tenant, source).await?;
        // A clone is of a running computer (a stopped one's snapshot is its disk: restore that).
        if original.status != ComputerStatus::Running {
            return Err(Error::conflict(
                crate::error::Conflict::ComputerNotRunning,
                "computer is not running",
            ));
        }
        // The clone will need a computer of the quota: refuse before taking the snapshot.
        self.computers
            .limits()
            .check(tenant, crate::limits::Want::Computer)
            .await?;
        let snapshot = self
            .create(
                tenant,
                source,
                NewSnapshot {
                    comment: Some(format!("clone of {}", original.name)),
                    expiry: Expiry::Default,
                },
            )
            .await?;
        let new = NewComputer {
            name: name.unwrap_or_else(|| format!("{}-clone", original.name)),
            size: original.size,
            template_type: original.template_type.clone(),
            metadata: lineage_metadata(original.metadata.clone(), snapshot.id),
            network: original.network,
            env: Vec::new(),
            env_from_snapshot: true,
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
            // However long it takes: the snapshot's job ends it ready or failed.
            if this
                .computers
                .claim_when_ready(snapshot, std::time::Duration::MAX)
                .await
            {
                if let Err(e) = this.computers.enqueue_restore(&this.jobs, computer).await {
                    tracing::warn!(%computer, error = %e, "queueing the restore of a {what}");
                }
            } else {
                let reason = format!("the snapshot for this {what} ({snapshot}) failed");
                let _ = this.db.set_status(computer, ComputerStatus::Error, Some(&reason)).await;
            }
        });
    }
}

impl Computers {
    /// The restore job: boots a computer from its snapshot. The boot records its own outcome
    /// (`running`, or `error` with the reason); run again after a crash, it starts over.
    pub async fn restore_job(self: &Arc<Self>, target: &str) -> crate::jobs::Outcome {
        let Ok(id) = target.parse::<ComputerId>() else {
            return crate::jobs::Outcome::Failed(format!("{target:?} is not a computer id"));
        };
        self.host.kill_stray(&id.to_string());
        self.clone().boot(id).await;
        crate::jobs::Outcome::Done
    }

    /// Queues the restore job of a computer made from a snapshot, on this host.
    pub async fn enqueue_restore(&self, jobs: &crate::jobs::Jobs, id: ComputerId) -> Result<(), sqlx::Error> {
        jobs.enqueue(
            crate::jobs::JobKind::Restore,
            &id.to_string(),
            self.host_id(),
            2,
            std::time::Duration::ZERO,
        )
        .await
    }

    /// The restore path of a computer made from a snapshot: fetch (or reuse) the snapshot's
    /// files on this host, start QEMU on them, resume. The snapshot was marked `restoring`
    /// for this restore by whoever asked for it; it is released here, whatever happens.
    pub(crate) async fn restore_machine(&self, computer: &Computer, snapshot: SnapshotId, image: stasis_image::Image) {
        let id = computer.id;
        let started = Instant::now();
        let (tx, mut rx) = tokio::sync::watch::channel((0u64, 0u64));
        let bus = self.events.clone();
        let reporter = tokio::spawn(async move {
            while rx.changed().await.is_ok() {
                let (done, total) = *rx.borrow_and_update();
                let mut e = events::data(snapshot, SnapshotStatus::Restoring);
                e.step = Some(stasis_types::Step::Downloading);
                e.computer_id = Some(id);
                e.progress = Some(if total == 0 { 1.0 } else { done as f64 / total as f64 });
                e.bytes_done = Some(done);
                e.bytes_total = Some(total);
                bus.progress(e).await;
            }
        });
        let fetched = match self.recorded(snapshot, computer).await {
            Ok(recorded) => self
                .materializer
                .ensure(snapshot, recorded.clone(), move |done, total| {
                    let _ = tx.send((done, total));
                })
                .await
                .map(|files| (files, recorded)),
            Err(e) => {
                drop(tx); // the reporter ends when the sender goes
                Err(e)
            }
        };
        let _ = reporter.await;
        let fetched_ms = started.elapsed().as_millis() as u64;
        let outcome: Result<(), (String, bool)> = match fetched {
            Err(e) => {
                let damaged = matches!(
                    e,
                    stasis_store::StoreError::Corrupt { .. }
                        | stasis_store::StoreError::MissingChunk(_)
                        | stasis_store::StoreError::Manifest { .. }
                        | stasis_store::StoreError::MissingManifest(_)
                        | stasis_store::StoreError::Tampered { .. }
                );
                let reason = if damaged {
                    format!("snapshot {snapshot} is damaged and cannot be restored: {e}")
                } else {
                    format!("reading snapshot {snapshot}: {}", crate::encryption::explain(&e))
                };
                Err((reason, damaged))
            }
            Ok((files, recorded)) => {
                let mut e = events::data(snapshot, SnapshotStatus::Restoring);
                e.step = Some(stasis_types::Step::Starting);
                e.computer_id = Some(id);
                self.events.emit(e).await;
                // A disk-only snapshot (of a stopped computer) has no machine state to load:
                // its restore boots from its disk.
                let disk_only = matches!(
                    self.db.get_snapshot(snapshot).await,
                    Ok(Some(r)) if r.snapshot.memory_size_bytes == Some(0)
                );
                match self
                    .snapshot_machine(computer, snapshot, &recorded, &image, &files)
                    .await
                {
                    Err(refused) => Err((refused.to_string(), false)),
                    Ok(config) => match self.enforce_policy(id).await {
                        Err(e) => Err((e.to_string(), false)),
                        Ok(()) if disk_only => match self.host.boot(&id.to_string(), config).await {
                            Ok(_) => Ok(()),
                            Err(e) => Err((format!("booting from the snapshot's disk failed: {e}"), false)),
                        },
                        Ok(()) => match self
                            .host
                            .restore_changed(
                                &id.to_string(),
                                config,
                                &files.state,
                                &files.memory,
                                files.changes.as_deref(),
                            )
                            .await
                        {
                            Ok(_) => Ok(()),
                            Err(e) => Err((format!("restore failed: {e}"), false)),
                        },
                    },
                }
            }
        };
        match outcome {
            Ok(()) => {
                let restored_ms = started.elapsed().as_millis() as u64;
                let _ = self.set_status(id, ComputerStatus::Running, None).await;
                tracing::info!(%id, %snapshot, fetched_ms, restored_ms, running_ms = started.elapsed().as_millis() as u64,
                    "computer restored");
                let status = self.db.end_restore(snapshot).await.unwrap_or(SnapshotStatus::Ready);
                self.finish_resume(id, snapshot).await;
                let mut e = events::data(snapshot, status);
                e.step = Some(stasis_types::Step::Restored);
                e.computer_id = Some(id);
                e.progress = Some(1.0);
                self.events.emit(e).await;
            }
            Err((reason, damaged)) => {
                tracing::warn!(%id, %snapshot, reason, "restore failed");
                let _ = self.set_status(id, ComputerStatus::Error, Some(&reason)).await;
                let mut status = self.db.end_restore(snapshot).await.unwrap_or(SnapshotStatus::Ready);
                if damaged {
                    let from = [SnapshotStatus::Ready, SnapshotStatus::Restoring];
                    let _ = self
                        .db
                        .transition_snapshot(snapshot, &from, SnapshotStatus::Failed, Some(&reason))
                        .await;
                    self.materializer.evict(snapshot);
                    status = SnapshotStatus::Failed;
                }
                let mut e = events::data(snapshot, status);
                e.step = Some(stasis_types::Step::RestoreFailed);
                e.computer_id = Some(id);
                e.error = Some(reason);
                self.events.emit(e).await;
            }
        }
    }
}

/// A computer's metadata with the snapshot it was made from as `source_snapshot_id` (the
/// official SDK's `Computer` keeps `metadata`, not the top-level field).
fn lineage_metadata(
    mut metadata: serde_json::Map<String, serde_json::Value>,
    snapshot: SnapshotId,
) -> serde_json::Map<String, serde_json::Value> {
    metadata.insert("source_snapshot_id".into(), snapshot.to_string().into());
    metadata
}
