//! Resuming a paused (hibernated) computer in place: same id, from the snapshot its pause
//! took (its memory and disk), so its processes run on. A computer whose hibernation snapshot
//! failed boots from the disk it kept instead.

use std::sync::Arc;
use std::time::Duration;

use stasis_types::{ActionResponse, ComputerId, ComputerStatus, SnapshotId, SnapshotStatus, TenantId};

use super::{action, Computers};
use crate::error::{Error, Result};

/// Requests open to each computer and when the last one ended.
#[derive(Default)]
pub struct Activity(std::sync::Mutex<std::collections::HashMap<ComputerId, Seen>>);

struct Seen {
    open: usize,
    last: std::time::Instant,
}

/// Holds a computer busy while a request to it is open.
pub struct Busy {
    activity: Arc<Computers>,
    id: ComputerId,
}

impl Drop for Busy {
    fn drop(&mut self) {
        let mut seen = self.activity.activity.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = seen.get_mut(&self.id) {
            s.open = s.open.saturating_sub(1);
            s.last = std::time::Instant::now();
        }
    }
}

impl Activity {
    /// How long `id` has had no request open (counted from the first time it is asked
    /// about, for a computer nothing has asked anything yet).
    pub fn idle_for(&self, id: ComputerId) -> Duration {
        let mut seen = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let s = seen.entry(id).or_insert_with(|| Seen {
            open: 0,
            last: std::time::Instant::now(),
        });
        match s.open {
            0 => s.last.elapsed(),
            _ => Duration::ZERO,
        }
    }

    /// Starts `id`'s idle time over (it just started or resumed).
    pub fn reset(&self, id: ComputerId) {
        let mut seen = self.0.lock().unwrap_or_else(|p| p.into_inner());
        let s = seen.entry(id).or_insert_with(|| Seen {
            open: 0,
            last: std::time::Instant::now(),
        });
        s.last = std::time::Instant::now();
    }

    /// Forgets computers that are gone (their entries would otherwise stay for good).
    pub fn keep_only(&self, ids: &std::collections::HashSet<ComputerId>) {
        let mut seen = self.0.lock().unwrap_or_else(|p| p.into_inner());
        seen.retain(|id, s| s.open > 0 || ids.contains(id));
    }
}

impl Computers {
    /// Marks `id` busy until the returned guard is dropped (a request to it is open).
    pub fn busy(self: &Arc<Self>, id: ComputerId) -> Busy {
        let mut seen = self.activity.0.lock().unwrap_or_else(|p| p.into_inner());
        let s = seen.entry(id).or_insert_with(|| Seen {
            open: 0,
            last: std::time::Instant::now(),
        });
        s.open += 1;
        s.last = std::time::Instant::now();
        Busy {
            activity: self.clone(),
            id,
        }
    }
}

/// How long a resume waits for its hibernation snapshot's upload to finish.
const READY_WAIT: Duration = Duration::from_secs(300);

impl Computers {
    /// `POST /computers/{id}/resume` (and a start of a paused computer).
    pub async fn resume(self: &Arc<Self>, tenant: TenantId, id: ComputerId) -> Result<ActionResponse> {
        let lock = self.lock_for(id);
        let guard = lock.lock().await;
        let c = self.get(tenant, id).await?;
        match c.status {
            ComputerStatus::Running | ComputerStatus::Starting | ComputerStatus::Provisioning => {
                return Ok(action(c.status, "computer is already running or resuming"));
            }
            ComputerStatus::Paused => {}
            other => {
                return Err(Error::conflict(
                    crate::error::Conflict::ComputerBusy,
                    format!(
                        "computer {id} is {}: only a paused computer resumes (a stopped one starts)",
                        other.as_str()
                    ),
                ))
            }
        }
        let admitted = self.admission.lock().await;
        let quota = self.limits.admit(tenant, crate::limits::Want::Computer).await?;
        self.check_capacity(c.size).await?;
        // `starting` while its snapshot finishes uploading: a platform that dies meanwhile
        // boots its kept disk when it is back.
        self.set_status(id, ComputerStatus::Starting, None).await?;
        drop((quota, admitted, guard));
        let snapshot = self.db.hibernation_of(id).await?;
        let this = self.clone();
        tokio::spawn(async move { this.resume_when_ready(id, snapshot).await });
        Ok(action(ComputerStatus::Starting, "computer is resuming"))
    }

    /// Waits (at most `limit`) until `snapshot` can be restored from, and claims it for one
    /// restore (`begin_restore`): whether it was claimed. `false`: it failed, is gone, or was
    /// still being taken when `limit` ran out. Woken by the snapshot's events, polling once a
    /// second besides.
    pub(crate) async fn claim_when_ready(&self, snapshot: SnapshotId, limit: Duration) -> bool {
        let started = std::time::Instant::now();
        let mut events = self.events.subscribe(snapshot);
        loop {
            let status = self
                .db
                .get_snapshot(snapshot)
                .await
                .ok()
                .flatten()
                .map(|r| r.snapshot.status);
            match status {
                Some(SnapshotStatus::Ready | SnapshotStatus::Restoring) => {
                    if self.db.begin_restore(snapshot).await.unwrap_or(false) {
                        return true;
                    }
                }
                Some(SnapshotStatus::Creating | SnapshotStatus::Uploading) if started.elapsed() < limit => {}
                _ => return false,
            }
            let _ = tokio::time::timeout(Duration::from_secs(1), events.recv()).await;
        }
    }

    async fn resume_when_ready(self: Arc<Self>, id: ComputerId, snapshot: Option<SnapshotId>) {
        let ready = match snapshot {
            Some(s) if self.claim_when_ready(s, READY_WAIT).await => Some(s),
            _ => None,
        };
        {
            let lock = self.lock_for(id);
            let _guard = lock.lock().await;
            match self.db.get_computer(id).await {
                Ok(Some(c)) if c.status == ComputerStatus::Starting => {}
                // Stopped or destroyed meanwhile.
                _ => {
                    if let Some(s) = ready {
                        let _ = self.db.end_restore(s).await;
                    }
                    return;
                }
            }
            match ready {
                Some(s) => {
                    // Restored in place: same id, from its hibernation snapshot.
                    let _ = self.db.set_source_snapshot(id, s).await;
                    let _ = self.set_status(id, ComputerStatus::Provisioning, None).await;
                }
                None => {
                    tracing::warn!(%id, ?snapshot, "the hibernation snapshot is not there: booting the disk the computer kept");
                    let _ = self.db.set_hibernation(id, None).await;
                }
            }
        }
        self.clone().boot(id).await;
        let reason = "its hibernation snapshot failed, so it booted from its disk as the pause left it (its processes \
                      did not survive)";
        if ready.is_none() && snapshot.is_some() {
            if let Ok(Some(c)) = self.db.get_computer(id).await {
                if c.status == ComputerStatus::Running {
                    let _ = self.db.set_status(id, ComputerStatus::Running, Some(reason)).await;
                }
            }
        }
    }

    /// After a restore of `id` from `snapshot`: if that was its hibernation snapshot, the
    /// computer rests on it now; the overlays of its run before the pause go, and the
    /// snapshot leaves the platform's view (its chunks stay while the computer needs them).
    pub(crate) async fn finish_resume(&self, id: ComputerId, snapshot: SnapshotId) {
        if !matches!(self.db.hibernation_of(id).await, Ok(Some(s)) if s == snapshot) {
            return;
        }
        let _ = self.db.set_hibernation(id, None).await;
        let _ = self.db.delete_snapshot_env(snapshot).await;
        self.host.drop_stale_disks(&id.to_string()).await;
        let _ = self
            .db
            .transition_snapshot(snapshot, &[SnapshotStatus::Ready], SnapshotStatus::Deleted, None)
            .await;
        tracing::info!(%id, %snapshot, "computer resumed from its hibernation snapshot");
    }
}
