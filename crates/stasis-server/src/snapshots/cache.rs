//! Snapshots materialized on this host: the state, RAM and disk files of a snapshot rebuilt
//! from the store (sparse, every chunk verified), once per snapshot and shared by every
//! computer restored from it. Only a cache: deleting it costs a download, nothing else.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use stasis_store::{Manifest, Progress, SnapshotStore, StoreError};
use stasis_types::SnapshotId;

pub struct Materializer {
    store: SnapshotStore,
    root: PathBuf,
    locks: Mutex<HashMap<SnapshotId, Arc<tokio::sync::Mutex<()>>>>,
}

/// A snapshot's files on local disk.
#[derive(Debug, Clone)]
pub struct Materialized {
    pub state: PathBuf,
    pub memory: PathBuf,
    pub disk: PathBuf,
    pub manifest: Manifest,
}

const COMPLETE: &str = "manifest.json";

impl Materializer {
    pub fn new(store: SnapshotStore, root: PathBuf) -> Materializer {
        Materializer {
            store,
            root,
            locks: Mutex::new(HashMap::new()),
        }
    }

    pub fn dir(&self, id: SnapshotId) -> PathBuf {
        self.root.join(id.to_string())
    }

    fn files(dir: &Path, manifest: Manifest) -> Materialized {
        Materialized {
            state: dir.join("state"),
            memory: dir.join("memory"),
            disk: dir.join("disk.raw"),
            manifest,
        }
    }

    /// The snapshot's files, fetched and verified if this host does not have them yet.
    /// `progress(done, total)` follows the download.
    pub async fn ensure(
        &self,
        id: SnapshotId,
        progress: impl Fn(u64, u64) + Send + Sync + 'static,
    ) -> Result<Materialized, StoreError> {
        let lock = self
            .locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id)
            .or_default()
            .clone();
        let _one_download = lock.lock().await;
        let dir = self.dir(id);
        if let Ok(bytes) = std::fs::read(dir.join(COMPLETE)) {
            if let Ok(manifest) = serde_json::from_slice::<Manifest>(&bytes) {
                let files = Self::files(&dir, manifest);
                if files.state.exists() && files.memory.exists() && files.disk.exists() {
                    return Ok(files);
                }
            }
        }
        let manifest = self.store.get_manifest(&id.to_string()).await?;
        let tmp = self.root.join(format!(".{id}.tmp"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp).map_err(|source| StoreError::Io {
            context: format!("creating {}", tmp.display()),
            source,
        })?;
        let total: u64 = manifest.parts().iter().map(|(_, p)| p.size).sum();
        let progress = Arc::new(progress);
        let files = Self::files(&tmp, manifest.clone());
        let mut base = 0;
        for (part, path) in [
            (&manifest.state, &files.state),
            (&manifest.memory, &files.memory),
            (&manifest.disk, &files.disk),
        ] {
            let p = progress.clone();
            let tracker: Progress = Arc::new(move |done| p(base + done, total));
            if let Err(e) = self.store.materialize(part, path, tracker).await {
                let _ = std::fs::remove_dir_all(&tmp);
                return Err(e);
            }
            base += part.size;
        }
        let json = serde_json::to_vec(&manifest).expect("manifests serialize");
        let write = std::fs::write(tmp.join(COMPLETE), json)
            .and_then(|_| {
                let _ = std::fs::remove_dir_all(&dir);
                std::fs::rename(&tmp, &dir)
            })
            .map_err(|source| StoreError::Io {
                context: "publishing the materialized snapshot".into(),
                source,
            });
        write?;
        Ok(Self::files(&dir, manifest))
    }

    /// Takes the files a snapshot was just made from as its materialized copy: this host then
    /// restores it without downloading anything. (They are exactly what the chunks were cut
    /// from.)
    pub fn adopt(
        &self,
        id: SnapshotId,
        manifest: &Manifest,
        state: &Path,
        memory: &Path,
        disk: &Path,
    ) -> std::io::Result<()> {
        let tmp = self.root.join(format!(".{id}.adopt"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)?;
        let files = Self::files(&tmp, manifest.clone());
        std::fs::rename(state, &files.state)?;
        std::fs::rename(memory, &files.memory)?;
        std::fs::rename(disk, &files.disk)?;
        std::fs::write(
            tmp.join(COMPLETE),
            serde_json::to_vec(manifest).expect("manifests serialize"),
        )?;
        let dir = self.dir(id);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::rename(&tmp, &dir)
    }

    /// Forgets a snapshot's local files.
    pub fn evict(&self, id: SnapshotId) {
        let _ = std::fs::remove_dir_all(self.dir(id));
    }
}
