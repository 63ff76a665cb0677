//! Hibernation: `POST /computers/{id}/pause` stops a running computer keeping its memory, a
//! snapshot and a stop in one step. The guest is paused, captured (it never runs past that
//! instant), and its QEMU ends: the computer is `paused` and holds no memory on its host (the
//! capture uploads in the background, and the host keeps no RAM copy of it). A resume
//! (`POST /computers/{id}/resume`, or a start) restores it in place from that snapshot.

use std::sync::Arc;

use stasis_types::ActionResponse;

use super::*;

impl Snapshots {
    /// `POST /computers/{id}/pause`.
    pub async fn pause(self: &Arc<Self>, tenant: TenantId, id: ComputerId) -> Result<ActionResponse> {
        let guard = self.computers.lifecycle_lock(id).await;
        let c = match self.db.get_computer(id).await? {
            Some(c) if c.tenant_id == tenant => c,
            _ => return Err(Error::not_found(Resource::Computer, id)),
        };
        if c.status == ComputerStatus::Paused {
            return Ok(ActionResponse {
                success: true,
                status: "paused".into(),
                message: "computer is already paused".into(),
            });
        }
        let host = self.computers.host();
        let name = id.to_string();
        let vm = match (c.status, host.get(&name)) {
            (ComputerStatus::Running, Some(vm)) => vm,
            (status, _) => {
                return Err(Error::conflict(
                    crate::error::Conflict::ComputerNotRunning,
                    format!("computer {id} is {}: only a running computer pauses", status.as_str()),
                ))
            }
        };
        let snapshot = self.record_new(&c, Some("hibernation".into()), Expiry::Never).await?;
        self.db.mark_hibernation(snapshot.id).await?;
        let staging = self.staging_dir(snapshot.id);
        let captured = async {
            std::fs::create_dir_all(&staging).map_err(|e| format!("creating the staging directory: {e}"))?;
            self.materializer
                .ensure_memory_root()
                .map_err(|e| format!("preparing the RAM directory: {e}"))?;
            let capture = vm
                .capture_final(&staging, &self.staging_memory(snapshot.id))
                .await
                .map_err(|e| format!("capturing the machine: {e}"))?;
            let captured = Captured {
                state: capture.state,
                memory: capture.memory,
                disk: capture.disk,
                machine: capture.machine,
                pause_ms: 0,
                changes_over: None,
            };
            std::fs::write(
                staging.join("captured.json"),
                serde_json::to_vec(&captured).expect("serializes"),
            )
            .map_err(|e| format!("recording the capture: {e}"))
        }
        .await;
        if let Err(reason) = captured {
            // Not captured: the guest runs on as it was, and the snapshot is failed.
            self.drop_staging(snapshot.id).await;
            let from = [SnapshotStatus::Creating];
            let _ = self
                .db
                .transition_snapshot(snapshot.id, &from, SnapshotStatus::Failed, Some(&reason))
                .await;
            return Err(Error::Unavailable(format!(
                "computer {id} could not be paused: {reason}"
            )));
        }
        // Captured: the QEMU ends now (its guest never runs past the capture), its disks stay
        // until the resume no longer needs them.
        host.halt(&name).await;
        self.db.set_hibernation(id, Some(snapshot.id)).await?;
        self.computers.set_status(id, ComputerStatus::Paused, None).await?;
        drop(guard);
        self.enqueue_capture(snapshot.id).await?;
        tracing::info!(%id, snapshot = %snapshot.id, "computer paused");
        Ok(ActionResponse {
            success: true,
            status: "paused".into(),
            message: format!("computer paused: its memory and disk are in snapshot {}", snapshot.id),
        })
    }

    /// Pauses this platform's running computers that have been idle past their idle timeout
    /// (`/auto-stop`): the SDK's idle timeout keeps memory rather than discarding it.
    pub async fn pause_idle(self: &Arc<Self>) -> Result<usize> {
        let computers = self.computers.clone();
        let due = self.db.auto_stopping(computers.host_id()).await?;
        let live: std::collections::HashSet<ComputerId> = due.iter().map(|(id, _)| *id).collect();
        computers.activity.keep_only(&live);
        let mut paused = 0;
        for (id, seconds) in due {
            if computers.activity.idle_for(id) < std::time::Duration::from_secs(seconds) {
                continue;
            }
            let Some(c) = self.db.get_computer(id).await? else {
                continue;
            };
            match self.pause(c.tenant_id, id).await {
                Ok(_) => {
                    tracing::info!(%id, seconds, "computer paused after its idle timeout");
                    paused += 1;
                }
                Err(e) => tracing::warn!(%id, error = %e, "pausing an idle computer"),
            }
        }
        Ok(paused)
    }

    /// Looks for idle computers every `every` for as long as the platform runs.
    pub fn spawn_auto_stop(self: &Arc<Self>, every: std::time::Duration) -> tokio::task::JoinHandle<()> {
        self.every(every, "looking for idle computers", |s| {
            Box::pin(async move { s.pause_idle().await.map(drop) })
        })
    }
}
