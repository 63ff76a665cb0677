//! Garbage collection: chunks no live snapshot needs are deleted, once they are older than a
//! grace period, through the object store's `delete_stream` (on S3 without a key prefix, bulk
//! requests of up to a thousand keys; elsewhere, several deletes at a time).

use std::collections::HashSet;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use futures::StreamExt;
use object_store::path::Path as ObjectPath;

use crate::chunk::ChunkHash;
use crate::manifest_io::Recorded;
#[cfg(test)]
use crate::Part;
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

    /// Deletes the objects through the store's `delete_stream`; returns how many it deleted.
    /// One already gone (another collector was first) is not counted, and is no error; any
    /// other failure stops the collection.
    async fn delete_chunks(&self, doomed: Vec<ObjectPath>) -> Result<u64, StoreError> {
        let mut deleted = 0;
        let mut results = self
            .store
            .delete_stream(futures::stream::iter(doomed.into_iter().map(Ok)).boxed());
        while let Some(result) = results.next().await {
            match result {
                Ok(_) => deleted += 1,
                Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(deleted)
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::{Arc, Mutex};

    use futures::stream::BoxStream;
    use object_store::local::LocalFileSystem;
    use object_store::{
        GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore, PutMultipartOptions, PutOptions,
        PutPayload, PutResult,
    };

    use super::*;
    use crate::tests::{legacy, manifest, noop, sparse_file, tid};

    /// A local store that counts how it is asked to delete, and can lose objects just before
    /// a bulk delete (as when another collector got there first).
    #[derive(Debug)]
    struct Watched {
        inner: LocalFileSystem,
        root: PathBuf,
        /// Objects deleted one by one through `delete`, and paths passed to `delete_stream`.
        single: AtomicU64,
        streamed: Arc<AtomicU64>,
        vanish: Mutex<Vec<ObjectPath>>,
    }

    impl std::fmt::Display for Watched {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            write!(f, "Watched({})", self.inner)
        }
    }

    #[async_trait::async_trait]
    impl ObjectStore for Watched {
        async fn put_opts(&self, at: &ObjectPath, p: PutPayload, o: PutOptions) -> object_store::Result<PutResult> {
            self.inner.put_opts(at, p, o).await
        }

        async fn put_multipart_opts(
            &self,
            at: &ObjectPath,
            o: PutMultipartOptions,
        ) -> object_store::Result<Box<dyn MultipartUpload>> {
            self.inner.put_multipart_opts(at, o).await
        }

        async fn get_opts(&self, at: &ObjectPath, o: GetOptions) -> object_store::Result<GetResult> {
            self.inner.get_opts(at, o).await
        }

        async fn delete(&self, at: &ObjectPath) -> object_store::Result<()> {
            self.single.fetch_add(1, Ordering::Relaxed);
            self.inner.delete(at).await
        }

        fn delete_stream<'a>(
            &'a self,
            locations: BoxStream<'a, object_store::Result<ObjectPath>>,
        ) -> BoxStream<'a, object_store::Result<ObjectPath>> {
            for gone in std::mem::take(&mut *self.vanish.lock().unwrap()) {
                std::fs::remove_file(self.root.join(gone.as_ref())).unwrap();
            }
            let streamed = self.streamed.clone();
            let counted = locations.inspect(move |_| {
                streamed.fetch_add(1, Ordering::Relaxed);
            });
            self.inner.delete_stream(counted.boxed())
        }

        fn list(&self, prefix: Option<&ObjectPath>) -> BoxStream<'static, object_store::Result<ObjectMeta>> {
            self.inner.list(prefix)
        }

        async fn list_with_delimiter(&self, prefix: Option<&ObjectPath>) -> object_store::Result<ListResult> {
            self.inner.list_with_delimiter(prefix).await
        }

        async fn copy(&self, from: &ObjectPath, to: &ObjectPath) -> object_store::Result<()> {
            self.inner.copy(from, to).await
        }

        async fn copy_if_not_exists(&self, from: &ObjectPath, to: &ObjectPath) -> object_store::Result<()> {
            self.inner.copy_if_not_exists(from, to).await
        }
    }

    /// The chunk names of every chunk object in the store under `root`.
    fn stored(root: &std::path::Path) -> HashSet<ChunkHash> {
        let mut out = HashSet::new();
        for dir in std::fs::read_dir(root.join("chunks")).unwrap().flatten() {
            for f in std::fs::read_dir(dir.path()).unwrap().flatten() {
                out.insert(ChunkHash::from_hex(f.file_name().to_str().unwrap()).unwrap());
            }
        }
        out
    }

    #[tokio::test]
    async fn collection_deletes_exactly_the_unneeded_chunks_in_one_stream_and_tolerates_vanished_ones() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("store");
        std::fs::create_dir_all(&root).unwrap();
        let watched = Arc::new(Watched {
            inner: LocalFileSystem::new_with_prefix(&root).unwrap(),
            root: root.clone(),
            single: AtomicU64::new(0),
            streamed: Arc::new(AtomicU64::new(0)),
            vanish: Mutex::new(Vec::new()),
        });
        let store = SnapshotStore::new(watched.clone(), "watched");
        let shared = [7u8; 4096];
        let files = [
            sparse_file(dir.path(), "a", 8192, &[(0, &shared), (4096, &[1u8; 4096])]),
            sparse_file(dir.path(), "b", 8192, &[(0, &shared), (4096, &[2u8; 4096])]),
            sparse_file(dir.path(), "c", 8192, &[(4096, &[3u8; 4096])]),
        ];
        let mut parts = Vec::new();
        for (name, file) in ["a", "b", "c"].iter().zip(&files) {
            let (part, _) = store
                .upload_file(&store.pin().await, tid("t"), file, 4096, noop())
                .await
                .unwrap();
            store.put_manifest(&manifest(name, part.clone())).await.unwrap();
            parts.push(part);
        }
        let chunks = |p: &Part| p.stored_chunks().collect::<HashSet<_>>();
        let (a, b, c) = (chunks(&parts[0]), chunks(&parts[1]), chunks(&parts[2]));
        assert_eq!(stored(&root).len(), 4, "the shared chunk is stored once");

        // Only b lives: a's own chunk and c's go, the shared one and b's own stay. c's chunk
        // vanishes before the delete reaches it: not counted, and no error.
        let only_a = a.difference(&b).copied().collect::<Vec<_>>();
        let only_c = c.iter().copied().collect::<Vec<_>>();
        assert_eq!((only_a.len(), only_c.len()), (1, 1));
        *watched.vanish.lock().unwrap() = vec![ObjectPath::from(only_c[0].key())];
        let gc = store
            .collect_garbage(&[legacy("b", "t")], Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(gc, GcStats { deleted: 1, young: 0 });
        assert_eq!(stored(&root), b, "exactly b's chunks are left");
        assert_eq!(
            watched.streamed.load(Ordering::Relaxed),
            2,
            "both doomed chunks were streamed"
        );
        assert_eq!(watched.single.load(Ordering::Relaxed), 0, "nothing deleted one by one");

        // Nothing lives: the rest goes, through the stream again.
        let gc = store.collect_garbage(&[], Duration::ZERO).await.unwrap();
        assert_eq!(gc, GcStats { deleted: 2, young: 0 });
        assert!(stored(&root).is_empty());
        assert_eq!(watched.streamed.load(Ordering::Relaxed), 4);
        assert_eq!(watched.single.load(Ordering::Relaxed), 0);
    }
}
