//! Snapshot progress events: appended to a per-snapshot log in the database (so a client can
//! resume with `Last-Event-ID`) and pushed live to subscribers.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use stasis_types::{SnapshotEventData, SnapshotId, SnapshotStatus};
use tokio::sync::broadcast;

use crate::db::Db;

/// One event as stored and streamed.
#[derive(Debug, Clone)]
pub struct StoredEvent {
    pub seq: i64,
    pub event: String,
    pub data: String,
}

/// The SSE event name for a status.
pub fn event_name(status: SnapshotStatus) -> &'static str {
    stasis_types::SnapshotEventName::for_status(status).as_str()
}

/// Progress events closer together than this (and less than 5% apart) are not recorded.
const PROGRESS_EVERY: Duration = Duration::from_millis(250);

pub struct EventBus {
    db: Db,
    channels: Mutex<HashMap<SnapshotId, broadcast::Sender<StoredEvent>>>,
    last_progress: Mutex<HashMap<SnapshotId, (Instant, f64)>>,
}

impl EventBus {
    pub fn new(db: Db) -> EventBus {
        EventBus {
            db,
            channels: Mutex::new(HashMap::new()),
            last_progress: Mutex::new(HashMap::new()),
        }
    }

    fn sender(&self, id: SnapshotId) -> broadcast::Sender<StoredEvent> {
        self.channels
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id)
            .or_insert_with(|| broadcast::channel(256).0)
            .clone()
    }

    pub fn subscribe(&self, id: SnapshotId) -> broadcast::Receiver<StoredEvent> {
        self.sender(id).subscribe()
    }

    /// Records and pushes an event whose name follows its status.
    pub async fn emit(&self, data: SnapshotEventData) {
        let id = data.snapshot_id;
        let event = event_name(data.status);
        let json = serde_json::to_string(&data).expect("event data serializes");
        match self.db.append_event(id, event, &json).await {
            Ok(seq) => {
                let _ = self.sender(id).send(StoredEvent {
                    seq,
                    event: event.to_string(),
                    data: json,
                });
            }
            Err(e) => tracing::warn!(%id, error = %e, "recording a snapshot event"),
        }
        if data.status.is_final() {
            self.last_progress.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        }
    }

    /// Like [`emit`](Self::emit) for progress updates, but thinned out so a fast upload does
    /// not write thousands of rows. The first and the last (progress 1.0) always go out.
    pub async fn progress(&self, data: SnapshotEventData) {
        let p = data.progress.unwrap_or(0.0);
        {
            let mut last = self.last_progress.lock().unwrap_or_else(|p| p.into_inner());
            let now = Instant::now();
            if let Some((at, prev)) = last.get(&data.snapshot_id) {
                if p < 1.0 && now.duration_since(*at) < PROGRESS_EVERY && p - prev < 0.05 {
                    return;
                }
            }
            last.insert(data.snapshot_id, (now, p));
        }
        self.emit(data).await;
    }
}

/// A blank event for `id` in `status`.
pub fn data(id: SnapshotId, status: SnapshotStatus) -> SnapshotEventData {
    SnapshotEventData {
        snapshot_id: id,
        status,
        step: None,
        progress: None,
        error: None,
        computer_id: None,
        bytes_done: None,
        bytes_total: None,
    }
}
