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

/// Why a snapshot's kernel or initrd is not here to start its machine with.
#[derive(Debug, thiserror::Error)]
pub enum BootFileError {
    #[error("its {what} is not named by a well-formed hash")]
    Malformed { what: &'static str },
    #[error("its {what} is recorded as {recorded} bytes but stored as {stored}")]
    Size {
        what: &'static str,
        recorded: u64,
        stored: u64,
    },
    #[error("its {what} read from the store hashes to {got}, not {want} as its manifest records")]
    Hash {
        what: &'static str,
        got: String,
        want: String,
    },
    #[error("reading its {what} from the store: {source}")]
    Store {
        what: &'static str,
        #[source]
        source: stasis_store::StoreError,
    },
    #[error("{doing} its {what}: {source}")]
    Io {
        what: &'static str,
        doing: &'static str,
        #[source]
        source: std::io::Error,
    },
}

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
        what: &'static str,
        want: &BootFile,
        part: &Part,
        image_file: &Path,
    ) -> Result<PathBuf, BootFileError> {
        let io = |doing: &'static str| move |source: std::io::Error| BootFileError::Io { what, doing, source };
        if !want.is_well_formed() {
            return Err(BootFileError::Malformed { what });
        }
        if part.size != want.bytes {
            return Err(BootFileError::Size {
                what,
                recorded: want.bytes,
                stored: part.size,
            });
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
            .map_err(io("preparing the folder for"))?;
        let tmp = self.root.join(format!(".{}.tmp", want.blake3));
        let _ = std::fs::remove_file(&tmp);
        self.store
            .materialize(recorded.tenant_id, manifest, part, &tmp, std::sync::Arc::new(|_| {}))
            .await
            .map_err(|source| BootFileError::Store { what, source })?;
        let check = tmp.clone();
        let got = tokio::task::spawn_blocking(move || BootFile::of(&check))
            .await
            .map_err(std::io::Error::other)
            .and_then(|read| read)
            .map_err(io("hashing"))?;
        if &got != want {
            let _ = std::fs::remove_file(&tmp);
            return Err(BootFileError::Hash {
                what,
                got: got.blake3,
                want: want.blake3.clone(),
            });
        }
        std::fs::rename(&tmp, &kept).map_err(io("keeping"))?;
        tracing::info!(file = %kept.display(), what, "boot file of a snapshot fetched from the store");
        Ok(kept)
    }
}

impl BootFiles {
    /// Removes the kept copies no name in `keep` (the content hashes live snapshots' machines
    /// were booted with) is for; returns how many went. A copy removed and needed after all
    /// (a snapshot taken meanwhile) is fetched again from the store, where it is a part.
    pub async fn sweep(&self, keep: std::collections::HashSet<String>) -> usize {
        let _no_fetch_meanwhile = self.fetching.lock().await;
        let root = self.root.clone();
        tokio::task::spawn_blocking(move || {
            let Ok(entries) = std::fs::read_dir(&root) else {
                return 0;
            };
            let mut removed = 0;
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                // Only what this module writes: plain files named by a hash (a leftover
                // `.<hash>.tmp` of a fetch that died goes too).
                let hash = name.strip_prefix('.').and_then(|n| n.strip_suffix(".tmp")).unwrap_or(&name);
                let is_file = entry.file_type().is_ok_and(|t| t.is_file());
                let named = hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit());
                if !is_file || !named || (keep.contains(hash) && hash == name) {
                    continue;
                }
                match std::fs::remove_file(entry.path()) {
                    Ok(()) => removed += 1,
                    Err(e) => tracing::warn!(file = %entry.path().display(), error = %e, "removing a boot file no snapshot needs"),
                }
            }
            removed
        })
        .await
        .unwrap_or(0)
    }
}

/// The content hashes of the kernels and initrds `descriptions` name.
pub fn named_by(descriptions: &[serde_json::Value]) -> std::collections::HashSet<String> {
    use stasis_vmm::description::Described;
    descriptions
        .iter()
        .filter_map(|d| match Described::parse(d) {
            Ok(Described::Current(d)) => Some([d.kernel.blake3, d.initrd.blake3]),
            _ => None,
        })
        .flatten()
        .collect()
}

/// A kept copy counts if it is a plain file of the right length (only this module writes
/// there, renaming a file into place after checking its hash).
fn is_kept(path: &Path, bytes: u64) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_file() && m.len() == bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_sweep_keeps_what_live_snapshots_name_and_nothing_it_did_not_write() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("boot");
        std::fs::create_dir(&root).unwrap();
        let files = BootFiles::new(SnapshotStore::local(&dir.path().join("objects")).unwrap(), root.clone());
        let (kept, gone, dying) = ("a".repeat(64), "b".repeat(64), "c".repeat(64));
        for name in [kept.clone(), gone.clone(), format!(".{dying}.tmp"), "notes".into()] {
            std::fs::write(root.join(name), b"x").unwrap();
        }
        std::fs::create_dir(root.join("d".repeat(64))).unwrap();
        let removed = files.sweep([kept.clone()].into_iter().collect()).await;
        assert_eq!(removed, 2);
        let mut left: Vec<String> = std::fs::read_dir(&root)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, vec![kept, "d".repeat(64), "notes".to_string()]);
    }

    #[test]
    fn the_boot_files_named_are_those_of_current_descriptions() {
        let file = |c: char| serde_json::json!({"blake3": c.to_string().repeat(64), "bytes": 1});
        let current = serde_json::json!({
            "format": 1, "qemu": {"major": 10, "minor": 0}, "machine_type": "microvm", "accel": "tcg",
            "cpu_model": "max", "vcpus": 1, "memory_mib": 512, "device_line": 1, "tsc_khz": null,
            "image_id": "img", "kernel": file('e'), "initrd": file('f'),
        });
        let legacy = serde_json::json!({"vcpus": 1, "memory_mib": 512, "accel": "tcg", "image_id": "img"});
        let named = named_by(&[current, legacy, serde_json::json!("junk")]);
        assert_eq!(named, ["e".repeat(64), "f".repeat(64)].into_iter().collect());
    }
}
