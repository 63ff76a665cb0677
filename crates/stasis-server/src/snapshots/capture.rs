//! Capture: a running computer's snapshot taken (the guest paused for milliseconds), then
//! compressed and uploaded to the store in the background, as the snapshot job.

use std::path::PathBuf;
use std::sync::Arc;

use super::*;

impl Snapshots {
    /// Where the capture's RAM goes (beside the materialized RAM files, so a finished
    /// snapshot's RAM can be kept by a rename).
    pub(super) fn staging_memory(&self, id: SnapshotId) -> PathBuf {
        self.materializer.memory_root().join(format!(".{id}.staging"))
    }

    /// Removes a capture's staging (a directory of disk and state, and the RAM file), off the
    /// async runtime: the RAM file alone may be gigabytes of tmpfs pages to free.
    pub(super) async fn drop_staging(&self, id: SnapshotId) {
        let (dir, memory) = (self.staging_dir(id), self.staging_memory(id));
        let removed = tokio::task::spawn_blocking(move || {
            let _ = std::fs::remove_dir_all(&dir);
            let _ = std::fs::remove_file(&memory);
        })
        .await;
        if let Err(e) = removed {
            tracing::warn!(%id, error = %e, "removing a capture's staging");
        }
    }

    pub(super) fn staging_dir(&self, id: SnapshotId) -> PathBuf {
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
                self.drop_staging(id).await;
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
                self.drop_staging(id).await;
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
                let now = self.db.get_computer(computer).await.ok().flatten();
                self.materializer
                    .ensure_memory_root()
                    .map_err(|e| format!("preparing the RAM directory: {e}"))?;
                let host = self.computers.host();
                let capture = match (now.map(|c| c.status), host.get(&computer.to_string())) {
                    (Some(ComputerStatus::Running), Some(vm)) => {
                        let capture = self.capture_running(id, &vm, staging).await?;
                        // The frozen overlay served its purpose: fold it away while the
                        // upload runs.
                        tokio::spawn(async move {
                            match vm.compact_disk().await {
                                Ok(n) => tracing::debug!(%computer, removed = n, "disk overlays folded"),
                                Err(e) => tracing::warn!(%computer, error = %e, "folding the disk's overlays"),
                            }
                        });
                        capture
                    }
                    // A stopped computer's snapshot is its disk alone (held by the lock: it
                    // cannot start meanwhile).
                    (Some(ComputerStatus::Stopped), None) => whole(
                        host.capture_stopped(&computer.to_string(), staging, &self.staging_memory(id))
                            .await
                            .map_err(|e| format!("capturing the stopped computer's disk: {e}"))?,
                    ),
                    _ => return Err("computer is neither running nor stopped".into()),
                };
                drop(guard);
                let captured = capture;
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
        for (path, chunk_size, is_memory) in [
            (&captured.state, STATE_CHUNK_SIZE, false),
            (&captured.memory, MEMORY_CHUNK_SIZE, true),
            (&flat, DISK_CHUNK_SIZE, false),
            (&captured.machine.kernel, DISK_CHUNK_SIZE, false),
            (&captured.machine.initrd, DISK_CHUNK_SIZE, false),
        ] {
            let tx = tx.clone();
            let offset = base;
            let progress: Progress = Arc::new(move |done| {
                let _ = tx.send(offset + done);
            });
            let uploaded = match captured.changes_over {
                Some(base) if is_memory => {
                    // Changes over a snapshot's RAM: that snapshot's chunks where nothing changed.
                    let Some(over) = self.materializer.held(base) else {
                        return Err(Failure::Final(format!(
                            "the RAM of snapshot {base}, which this capture's changes are over, is no longer on this host; take the snapshot again"
                        )));
                    };
                    self.store
                        .upload_changes(
                            &pin,
                            tenant,
                            &over.memory,
                            over.chunk_names,
                            &self.materializer.memory_of(base),
                            path,
                            progress,
                        )
                        .await
                }
                _ => self.store.upload_file(&pin, tenant, path, chunk_size, progress).await,
            };
            let (part, s) = uploaded.map_err(|e| format!("uploading to the snapshot store: {e}"))?;
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
            Err(e @ Error::Quota(_)) => return Err(Failure::Final(e.to_string())),
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
        let adopted = match captured.changes_over {
            Some(base) => {
                self.materializer
                    .adopt_changes(id, &manifest, &captured.state, &captured.memory, base, &flat)
            }
            None => self
                .materializer
                .adopt(id, &manifest, &captured.state, &captured.memory, &flat),
        };
        if let Err(e) = adopted {
            tracing::warn!(%id, error = %e, "keeping the snapshot's files for local restores");
        }
        // (Before the snapshot reads as ready: whoever sees it ready finds its files in place.)
        // A paused computer holds no memory on its host: its RAM goes to the disk beside the
        // rest of the snapshot's copy, and comes back from there when it resumes (from the
        // store where that fails).
        if matches!(self.db.hibernation_of(s.computer_id).await, Ok(Some(h)) if h == id) {
            match self.materializer.park_memory(id).await {
                Ok(bytes) => tracing::info!(%id, bytes, "a hibernated computer's RAM is parked on disk"),
                Err(e) => {
                    tracing::warn!(%id, error = %e, "parking a hibernated computer's RAM on disk; its resume fetches it");
                    self.materializer.evict_keeping_disk(id);
                }
            }
        }
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
        if done {
            let mut e = events::data(id, SnapshotStatus::Ready);
            e.progress = Some(1.0);
            e.bytes_done = Some(total);
            e.bytes_total = Some(total);
            self.events.emit(e).await;
        }
        Ok(())
    }
}

/// The most a capture of changes copies with the guest paused (where the kernel cannot track
/// what the guest writes meanwhile): about 10 ms of copying, so its pause stays within twice a
/// booted computer's.
const MAX_PAUSED_COPY: u64 = 8 << 20;

/// A capture of the whole machine, as recorded.
fn whole(capture: stasis_vmm::snapshot::Capture) -> Captured {
    Captured {
        state: capture.state,
        memory: capture.memory,
        disk: capture.disk,
        machine: capture.machine,
        pause_ms: capture.paused.as_millis() as u64,
        changes_over: None,
    }
}

impl Snapshots {
    /// Captures a running computer: a restored one whose snapshot's RAM this host still holds
    /// (and maps) as the changes it made since (no twin, no copy of its whole RAM, the pause
    /// in proportion to what changed); any other, or where that cannot be done, whole.
    async fn capture_running(
        &self,
        id: SnapshotId,
        vm: &stasis_vmm::Vm,
        staging: &std::path::Path,
    ) -> Result<Captured, Failure> {
        let config = vm.config();
        let base = (!config.ram_shared)
            .then(|| self.materializer.snapshot_of_memory(&config.ram_path))
            .flatten()
            .filter(|b| self.materializer.held(*b).is_some());
        if let Some(base) = base {
            let reference = self.materializer.dir(base).join("state");
            match vm
                .capture_changes(staging, &staging.join("memory.changes"), &reference, MAX_PAUSED_COPY)
                .await
            {
                Ok(c) => {
                    tracing::info!(%id, %base, pause_ms = c.paused.as_millis() as u64,
                        changed_bytes = stasis_vmm::changes::pages(&c.runs) * stasis_vmm::changes::PAGE,
                        runs = c.runs.len(), "captured as changes");
                    return Ok(Captured {
                        state: c.state,
                        memory: c.changes,
                        disk: c.disk,
                        machine: c.machine,
                        pause_ms: c.paused.as_millis() as u64,
                        changes_over: Some(base),
                    });
                }
                Err(e) => {
                    tracing::info!(%id, reason = %e, "not captured as its changes; captured whole");
                }
            }
        }
        let capture = vm
            .capture(staging, &self.staging_memory(id))
            .await
            .map_err(|e| format!("capturing the machine: {e}"))?;
        Ok(whole(capture))
    }
}

/// The description of the machine a capture was taken of (its boot files hashed off the
/// async runtime).
async fn describe(machine: &MachineConfig) -> Result<stasis_vmm::description::MachineDescription> {
    let machine = machine.clone();
    tokio::task::spawn_blocking(move || stasis_vmm::description::MachineDescription::describe(&machine))
        .await
        .map_err(Error::internal)?
        .map_err(Error::internal)
}
