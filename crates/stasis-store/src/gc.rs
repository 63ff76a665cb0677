//! Garbage collection: chunks no live snapshot needs are deleted, once they are older than a
//! grace period.

use std::collections::HashSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use object_store::path::Path as ObjectPath;

use crate::chunk::ChunkHash;
use crate::manifest_io::Recorded;
use crate::{SnapshotStore, StoreError};

/// What a collection did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcStats {
    /// Chunks deleted.
    pub deleted: u64,
    /// Unneeded chunks spared for being younger than the grace period.
    pub young: u64,
}

impl SnapshotStore {
    /// Deletes chunks no live snapshot needs, whichever way they are named. `live` are the
    /// snapshots whose manifests must stay whole, as recorded; one that fails its checks stops
    /// the collection (its real chunks are unknown, so none may go) with an error naming it.
    /// Chunks younger than `grace` are kept too (an upload may be about to name them).
    pub async fn collect_garbage(&self, live: &[Recorded], grace: Duration) -> Result<GcStats, StoreError> {
        let _guard = self.gc_lock.write().await;
        let needed = self.needed_chunks(live).await?;
        let (doomed, young) = self.unneeded_chunks(&needed, grace).await?;
        let deleted = self.delete_chunks(doomed).await?;
        Ok(GcStats { deleted, young })
    }

    /// Every chunk the live snapshots' manifests name.
    async fn needed_chunks(&self, live: &[Recorded]) -> Result<HashSet<ChunkHash>, StoreError> {
        let mut needed = HashSet::new();
        for recorded in live {
            match self.get_manifest_of(recorded).await {
                Ok(m) => needed.extend(m.chunk_set()),
                // A live snapshot without a manifest is still uploading; the grace period
                // protects what it has written so far.
                Err(StoreError::MissingManifest(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(needed)
    }

    /// The chunk objects not `needed` and older than `grace`, and how many younger ones were
    /// spared.
    async fn unneeded_chunks(
        &self,
        needed: &HashSet<ChunkHash>,
        grace: Duration,
    ) -> Result<(Vec<ObjectPath>, u64), StoreError> {
        let cutoff = SystemTime::now() - grace;
        let mut listing = self.store.list(Some(&ObjectPath::from("chunks")));
        let mut doomed = Vec::new();
        let mut young = 0;
        while let Some(meta) = listing.next().await {
            let meta = meta?;
            let Some(hash) = meta.location.filename().and_then(ChunkHash::from_hex) else {
                continue;
            };
            if needed.contains(&hash) {
                continue;
            }
            let modified = UNIX_EPOCH + Duration::from_millis(meta.last_modified.timestamp_millis().max(0) as u64);
            if modified <= cutoff {
                doomed.push(meta.location);
            } else {
                young += 1;
            }
        }
        Ok((doomed, young))
    }

    /// Deletes the objects, one after the other; returns how many it deleted. One already
    /// gone (another collector was first) is not counted, and is no error.
    async fn delete_chunks(&self, doomed: Vec<ObjectPath>) -> Result<u64, StoreError> {
        let mut deleted = 0;
        for key in doomed {
            match self.store.delete(&key).await {
                Ok(()) => deleted += 1,
                Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(deleted)
    }
}
