//! Snapshot progress events: appended to a per-snapshot log in the database (so a client can
//! resume with `Last-Event-ID`) and pushed live to subscribers. A live channel exists only
//! while someone listens: one without receivers holds nothing a later subscriber could get
//! (it reads the log first), so it is dropped, and the map does not grow with every snapshot.

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

    pub fn subscribe(&self, id: SnapshotId) -> broadcast::Receiver<StoredEvent> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        // Streams that ended left their channels without receivers.
        channels.retain(|other, tx| *other == id || tx.receiver_count() > 0);
        channels
            .entry(id)
            .or_insert_with(|| broadcast::channel(256).0)
            .subscribe()
    }

    /// The live channel of a snapshot someone listens to.
    fn listened(&self, id: SnapshotId) -> Option<broadcast::Sender<StoredEvent>> {
        let mut channels = self.channels.lock().unwrap_or_else(|p| p.into_inner());
        match channels.get(&id) {
            Some(tx) if tx.receiver_count() > 0 => Some(tx.clone()),
            Some(_) => {
                channels.remove(&id);
                None
            }
            None => None,
        }
    }

    /// Live channels kept (for tests and metrics).
    pub fn channel_count(&self) -> usize {
        self.channels.lock().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Records and pushes an event whose name follows its status.
    pub async fn emit(&self, data: SnapshotEventData) {
        let id = data.snapshot_id;
        let event = event_name(data.status);
        let json = serde_json::to_string(&data).expect("event data serializes");
        match self.db.append_event(id, event, &json).await {
            Ok(seq) => {
                if let Some(tx) = self.listened(id) {
                    let _ = tx.send(StoredEvent {
                        seq,
                        event: event.to_string(),
                        data: json,
                    });
                }
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Many snapshots, each streamed to the end: the live channels go with their listeners.
    #[tokio::test]
    async fn channels_are_dropped_when_no_one_listens() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open_sqlite(&dir.path().join("t.db")).await.unwrap();
        let bus = EventBus::new(db);
        let mut kept = Vec::new();
        for i in 0..300 {
            let id = SnapshotId::new();
            let mut rx = bus.subscribe(id);
            bus.emit(data(id, SnapshotStatus::Creating)).await;
            bus.emit(data(id, SnapshotStatus::Ready)).await;
            assert_eq!(rx.recv().await.unwrap().event, "snapshot_creating");
            assert_eq!(rx.recv().await.unwrap().event, "snapshot_ready");
            if i % 100 == 0 {
                kept.push(rx);
            }
            // Events of snapshots no one listens to make no channel at all.
            bus.emit(data(SnapshotId::new(), SnapshotStatus::Ready)).await;
        }
        bus.subscribe(SnapshotId::new());
        assert!(
            bus.channel_count() <= kept.len() + 1,
            "{} channels",
            bus.channel_count()
        );
        drop(kept);
        bus.subscribe(SnapshotId::new());
        assert_eq!(bus.channel_count(), 1);
    }
}
