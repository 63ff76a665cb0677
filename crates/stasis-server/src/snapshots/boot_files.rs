//! The kernels and initrds snapshots were taken with, on this host: a restore starts its
//! machine with the snapshot's own boot files, not the current image's. Each is kept once per
//! content hash in `cache/boot/<blake3>` (root's, never a QEMU's to write), taken from the
//! current image when it is the same file, otherwise rebuilt from the snapshot's parts in the
//! store (every chunk verified as it is read) and then checked whole against the hash its
//! manifest records. In the store they are parts like the others, so they stay as long as
//! any snapshot names them.

use std::path::{Path, PathBuf};

use stasis_store::{Manifest, Part, Recorded, SnapshotStore};
use stasis_vmm::description::BootFile;

pub struct BootFiles {
    store: SnapshotStore,
    root: PathBuf,
    fetching: tokio::sync::Mutex<()>,
}

impl BootFiles {
    pub fn new(store: SnapshotStore, root: PathBuf) -> BootFiles {
        BootFiles {
            store,
            root,
            fetching: tokio::sync::Mutex::new(()),
        }
    }

    /// A local file holding `want`: `image_file` if that is it, else the kept copy, else one
    /// rebuilt from `part` of the snapshot `manifest` describes.
    pub async fn ensure(
        &self,
        recorded: &Recorded,
        manifest: &Manifest,
        what: &str,
        want: &BootFile,
        part: &Part,
        image_file: &Path,
    ) -> Result<PathBuf, String> {
        if !want.is_well_formed() {
            return Err(format!("its {what} is not named by a well-formed hash"));
        }
        if part.size != want.bytes {
            return Err(format!(
                "its {what} is recorded as {} bytes but stored as {}",
                want.bytes, part.size
            ));
        }
        let image = image_file.to_path_buf();
        let current = tokio::task::spawn_blocking(move || BootFile::of_remembered(&image).ok())
            .await
            .ok()
            .flatten();
        if current.as_ref() == Some(want) {
            return Ok(image_file.to_path_buf());
        }
        let kept = self.root.join(&want.blake3);
        if is_kept(&kept, want.bytes) {
            return Ok(kept);
        }
        let _one_at_a_time = self.fetching.lock().await;
        if is_kept(&kept, want.bytes) {
            return Ok(kept);
        }
        std::fs::create_dir_all(&self.root)
            .and_then(|_| stasis_store::secure_dir(&self.root))
            .map_err(|e| format!("preparing {}: {e}", self.root.display()))?;
        let tmp = self.root.join(format!(".{}.tmp", want.blake3));
        let _ = std::fs::remove_file(&tmp);
        self.store
            .materialize(recorded.tenant_id, manifest, part, &tmp, std::sync::Arc::new(|_| {}))
            .await
            .map_err(|e| format!("reading its {what} from the store: {e}"))?;
        let check = tmp.clone();
        let got = tokio::task::spawn_blocking(move || BootFile::of(&check))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("reading its {what}: {e}"))?;
        if &got != want {
            let _ = std::fs::remove_file(&tmp);
            return Err(format!(
                "its {what} read from the store hashes to {}, not {} as its manifest records",
                got.blake3, want.blake3
            ));
        }
        std::fs::rename(&tmp, &kept).map_err(|e| format!("keeping its {what}: {e}"))?;
        tracing::info!(file = %kept.display(), what, "boot file of a snapshot fetched from the store");
        Ok(kept)
    }
}

/// A kept copy counts if it is a plain file of the right length (only this module writes
/// there, renaming a file into place after checking its hash).
fn is_kept(path: &Path, bytes: u64) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_file() && m.len() == bytes)
}
