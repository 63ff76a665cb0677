//! Snapshots materialized on this host: the state, RAM and disk files of a snapshot rebuilt
//! from the store (sparse, every chunk verified), once per snapshot and shared by every
//! computer restored from it. Only a cache: deleting it costs a download, nothing else.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use stasis_types::SnapshotId;

use crate::{Manifest, Progress, Recorded, SnapshotStore, StoreError};

pub struct Materializer {
    store: SnapshotStore,
    root: PathBuf,
    /// Where RAM files go: a tmpfs where there is one (restored machines map them, and their
    /// own snapshots need shared memory underneath to write-protect).
    memory_root: PathBuf,
    locks: Mutex<HashMap<SnapshotId, Arc<tokio::sync::Mutex<()>>>>,
}

/// A snapshot's files on local disk.
#[derive(Debug, Clone)]
pub struct Materialized {
    pub state: PathBuf,
    /// Its RAM file; with `changes`, the RAM file of the snapshot the changes are over.
    pub memory: PathBuf,
    /// A snapshot captured as changes over another's RAM, kept as such on the host that took
    /// it: the changed pages (the data of a sparse file as long as the RAM).
    pub changes: Option<PathBuf>,
    pub disk: PathBuf,
    pub manifest: Manifest,
}

const COMPLETE: &str = "manifest.json";
/// A hibernated computer's RAM, kept on disk beside the rest of its snapshot's copy.
const PARKED: &str = "memory.parked";
/// A snapshot kept as changes: the changed pages, and the id of the snapshot they are over.
const CHANGES: &str = "memory.changes";
const CHANGES_BASE: &str = "memory.base";

impl Materializer {
    pub fn new(store: SnapshotStore, root: PathBuf, memory_root: PathBuf) -> Materializer {
        Materializer {
            store,
            root,
            memory_root,
            locks: Mutex::new(HashMap::new()),
        }
    }

    /// Whether the store encrypts what it writes.
    pub fn encrypts(&self) -> bool {
        self.store.encrypted()
    }

    pub fn memory_root(&self) -> &Path {
        &self.memory_root
    }

    /// Makes the RAM directory, owner-only, or checks that the one there is this platform's
    /// own: it sits in a world-writable tmpfs under a name anyone can work out, and whoever
    /// owned it could swap the RAM files computers are restored from.
    pub fn ensure_memory_root(&self) -> std::io::Result<()> {
        secure_dir(&self.memory_root)
    }

    pub fn dir(&self, id: SnapshotId) -> PathBuf {
        self.root.join(id.to_string())
    }

    /// Where the RAM file of snapshot `id` is kept on this host.
    pub fn memory_of(&self, id: SnapshotId) -> PathBuf {
        self.memory_path(id)
    }

    fn memory_path(&self, id: SnapshotId) -> PathBuf {
        self.memory_root.join(format!("{id}.memory"))
    }

    fn files(&self, id: SnapshotId, dir: &Path, manifest: Manifest) -> Materialized {
        Materialized {
            state: dir.join("state"),
            memory: self.memory_path(id),
            changes: None,
            disk: dir.join("disk.raw"),
            manifest,
        }
    }

    /// The snapshot a RAM file of this cache is of (`<id>.memory` in the RAM directory).
    pub fn snapshot_of_memory(&self, memory: &Path) -> Option<SnapshotId> {
        if memory.parent() != Some(self.memory_root.as_path()) {
            return None;
        }
        memory.file_name()?.to_str()?.strip_suffix(".memory")?.parse().ok()
    }

    /// The manifest of a snapshot this host holds a complete copy of, RAM file included.
    pub fn held(&self, id: SnapshotId) -> Option<Manifest> {
        let bytes = std::fs::read(self.dir(id).join(COMPLETE)).ok()?;
        let manifest = serde_json::from_slice::<Manifest>(&bytes).ok()?;
        self.memory_path(id).exists().then_some(manifest)
    }

    /// The snapshot's files, fetched and verified if this host does not have them yet.
    /// `progress(done, total)` follows the download. `recorded`: what the database says of
    /// the snapshot, which its manifest must agree with (see [`SnapshotStore::get_manifest_of`]).
    pub async fn ensure(
        &self,
        id: SnapshotId,
        recorded: Recorded,
        progress: impl Fn(u64, u64) + Send + Sync + 'static,
    ) -> Result<Materialized, StoreError> {
        let lock = self.lock_of(id);
        let _one_download = lock.lock().await;
        let dir = self.dir(id);
        if let Ok(bytes) = std::fs::read(dir.join(COMPLETE)) {
            if let Ok(manifest) = serde_json::from_slice::<Manifest>(&bytes) {
                let files = self.files(id, &dir, manifest);
                if files.state.exists() && files.disk.exists() {
                    if files.memory.exists() {
                        return Ok(files);
                    }
                    // Kept as changes over another snapshot's RAM, while this host still has it.
                    if let Some(files) = self.over_base(id, &dir, &files) {
                        return Ok(files);
                    }
                    // RAM parked on disk (a hibernation): back into the RAM directory, no
                    // download. Whatever goes wrong, the store still has it.
                    let parked = dir.join(PARKED);
                    if parked.exists() {
                        match self.unpark(id, &parked).await {
                            Ok(()) => return Ok(files),
                            Err(e) => tracing::warn!(%id, error = %e, "taking back RAM parked on disk; fetching it"),
                        }
                    }
                }
            }
        }
        let manifest = self.store.get_manifest_of(&recorded).await?;
        let tmp = self.root.join(format!(".{id}.tmp"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)
            .and_then(|_| self.ensure_memory_root())
            .map_err(|source| StoreError::Io {
                context: format!("creating {} and {}", tmp.display(), self.memory_root.display()),
                source,
            })?;
        let total: u64 = manifest.parts().iter().map(|(_, p)| p.size).sum();
        let progress = Arc::new(progress);
        let mut files = self.files(id, &tmp, manifest.clone());
        let memory_tmp = self.memory_root.join(format!(".{id}.memory.tmp"));
        files.memory = memory_tmp.clone();
        let mut base = 0;
        for (part, path) in [
            (&manifest.state, &files.state),
            (&manifest.memory, &files.memory),
            (&manifest.disk, &files.disk),
        ] {
            let p = progress.clone();
            let tracker: Progress = Arc::new(move |done| p(base + done, total));
            if let Err(e) = self
                .store
                .materialize(recorded.tenant_id, &manifest, part, path, tracker)
                .await
            {
                let _ = std::fs::remove_dir_all(&tmp);
                let _ = std::fs::remove_file(&memory_tmp);
                return Err(e);
            }
            base += part.size;
        }
        let json = serde_json::to_vec(&manifest).expect("manifests serialize");
        let write = std::fs::write(tmp.join(COMPLETE), json)
            .and_then(|_| std::fs::rename(&memory_tmp, self.memory_path(id)))
            .and_then(|_| {
                let _ = std::fs::remove_dir_all(&dir);
                std::fs::rename(&tmp, &dir)
            })
            .map_err(|source| StoreError::Io {
                context: "publishing the materialized snapshot".into(),
                source,
            });
        write?;
        self.enforce_budget();
        Ok(self.files(id, &dir, manifest))
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
        self.ensure_memory_root()?;
        self.adopt_with(id, manifest, state, disk, |_, files| {
            std::fs::rename(memory, &files.memory)
        })?;
        self.enforce_budget();
        Ok(())
    }

    /// Publishes a snapshot's copy made of `state`, `disk` and what `memory` puts in place
    /// (given the copy's directory while it is made, and its files' names there).
    fn adopt_with(
        &self,
        id: SnapshotId,
        manifest: &Manifest,
        state: &Path,
        disk: &Path,
        memory: impl FnOnce(&Path, &Materialized) -> std::io::Result<()>,
    ) -> std::io::Result<()> {
        let tmp = self.root.join(format!(".{id}.adopt"));
        let _ = std::fs::remove_dir_all(&tmp);
        std::fs::create_dir_all(&tmp)?;
        let files = self.files(id, &tmp, manifest.clone());
        std::fs::rename(state, &files.state)?;
        memory(&tmp, &files)?;
        std::fs::rename(disk, &files.disk)?;
        std::fs::write(
            tmp.join(COMPLETE),
            serde_json::to_vec(manifest).expect("manifests serialize"),
        )?;
        let dir = self.dir(id);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::rename(&tmp, &dir)
    }

    /// The files of a snapshot kept as changes, if the RAM they are over is still here.
    fn over_base(&self, id: SnapshotId, dir: &Path, files: &Materialized) -> Option<Materialized> {
        let changes = dir.join(CHANGES);
        let base: SnapshotId = std::fs::read_to_string(dir.join(CHANGES_BASE))
            .ok()?
            .trim()
            .parse()
            .ok()?;
        if base == id || !changes.exists() {
            return None;
        }
        let base_memory = self.memory_path(base);
        let base_manifest = self.held(base)?;
        if base_manifest.memory.size != files.manifest.memory.size {
            return None;
        }
        Some(Materialized {
            memory: base_memory,
            changes: Some(changes),
            ..files.clone()
        })
    }

    /// Takes the files of a snapshot captured as `changes` over snapshot `base`'s RAM (which
    /// this host holds) as its materialized copy: this host restores it from those two, with
    /// no RAM file of its own (host memory in proportion to what changed). Where `base`'s RAM
    /// is gone by then, a restore fetches this snapshot's RAM whole.
    pub fn adopt_changes(
        &self,
        id: SnapshotId,
        manifest: &Manifest,
        state: &Path,
        changes: &Path,
        base: SnapshotId,
        disk: &Path,
    ) -> std::io::Result<()> {
        self.adopt_with(id, manifest, state, disk, |tmp, _| {
            move_or_copy(changes, &tmp.join(CHANGES))?;
            std::fs::write(tmp.join(CHANGES_BASE), base.to_string())
        })
    }

    /// Moves a snapshot's RAM out of the RAM directory (memory) onto the disk beside the rest
    /// of its copy (a hibernated computer holds no memory on its host, yet resumes without a
    /// download). Holes stay holes; the file is synced before the RAM copy goes.
    pub async fn park_memory(&self, id: SnapshotId) -> std::io::Result<u64> {
        let lock = self.lock_of(id);
        let _no_restore_meanwhile = lock.lock().await;
        let (from, to) = (self.memory_path(id), self.dir(id).join(PARKED));
        let tmp = to.with_extension("tmp");
        tokio::task::spawn_blocking(move || move_sparse(&from, &tmp, &to))
            .await
            .map_err(std::io::Error::other)?
    }

    /// Moves parked RAM back into the RAM directory (the caller holds the snapshot's lock);
    /// the parked copy goes once the RAM directory holds it.
    async fn unpark(&self, id: SnapshotId, parked: &Path) -> std::io::Result<()> {
        self.ensure_memory_root()?;
        let (from, to) = (parked.to_path_buf(), self.memory_path(id));
        let tmp = self.memory_root.join(format!(".{id}.memory.tmp"));
        tokio::task::spawn_blocking(move || move_sparse(&from, &tmp, &to))
            .await
            .map_err(std::io::Error::other)??;
        self.enforce_budget();
        Ok(())
    }

    fn lock_of(&self, id: SnapshotId) -> Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(id)
            .or_default()
            .clone()
    }

    /// Keeps the RAM files within budget (a quarter of the host's memory): the least recently
    /// used go first. A file a running machine maps stays mapped after it is deleted, so this
    /// never disturbs a computer; a later restore just fetches the RAM again.
    pub fn enforce_budget(&self) {
        let budget = host_memory_bytes() / 4;
        let mut files: Vec<(std::time::SystemTime, u64, PathBuf)> = std::fs::read_dir(&self.memory_root)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".memory"))
            .filter_map(|e| {
                use std::os::unix::fs::MetadataExt;
                let m = e.metadata().ok()?;
                Some((m.accessed().or_else(|_| m.modified()).ok()?, m.blocks() * 512, e.path()))
            })
            .collect();
        let mut total: u64 = files.iter().map(|f| f.1).sum();
        files.sort();
        for (_, size, path) in files {
            if total <= budget {
                break;
            }
            tracing::info!(file = %path.display(), size, "evicting a cached snapshot RAM file");
            let _ = std::fs::remove_file(&path);
            total = total.saturating_sub(size);
        }
    }

    /// Removes every RAM file (the platform is shutting down and its computers are stopped).
    pub fn clear_memory(&self) {
        let _ = std::fs::remove_dir_all(&self.memory_root);
    }

    /// Snapshots this host holds files of (materialized copies, RAM files).
    pub fn cached(&self) -> Vec<SnapshotId> {
        let mut ids: Vec<SnapshotId> = std::fs::read_dir(&self.root)
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse().ok())
            .collect();
        for e in std::fs::read_dir(&self.memory_root).into_iter().flatten().flatten() {
            let name = e.file_name();
            if let Some(id) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".memory"))
                .and_then(|n| n.parse().ok())
            {
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
        }
        ids
    }

    /// Forgets a snapshot's local files but its disk, which computers restored from it boot
    /// on (their overlays rest on it).
    pub fn evict_keeping_disk(&self, id: SnapshotId) {
        let _ = std::fs::remove_file(self.memory_path(id));
        let dir = self.dir(id);
        let _ = std::fs::remove_file(dir.join("state"));
        let _ = std::fs::remove_file(dir.join(PARKED));
        let _ = std::fs::remove_file(dir.join(CHANGES));
        // Without its manifest the copy no longer counts as complete for a restore.
        let _ = std::fs::remove_file(dir.join(COMPLETE));
    }

    /// Forgets a snapshot's local files.
    pub fn evict(&self, id: SnapshotId) {
        let _ = std::fs::remove_file(self.memory_path(id));
        let _ = std::fs::remove_dir_all(self.dir(id));
    }
}

/// Renames `from` to `to`, or where they are on two file systems moves it sparse.
fn move_or_copy(from: &Path, to: &Path) -> std::io::Result<()> {
    match std::fs::rename(from, to) {
        Ok(()) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc_exdev()) => {
            move_sparse(from, &to.with_extension("tmp"), to).map(|_| ())
        }
        Err(e) => Err(e),
    }
}

fn libc_exdev() -> i32 {
    rustix::io::Errno::XDEV.raw_os_error()
}

/// Moves `from` to `to` across file systems: a sparse copy into `tmp`, renamed over `to`, then
/// `from` removed (`tmp` removed instead where the copy fails). Returns the bytes of data moved.
fn move_sparse(from: &Path, tmp: &Path, to: &Path) -> std::io::Result<u64> {
    let copied = copy_sparse(from, tmp).and_then(|n| std::fs::rename(tmp, to).map(|_| n));
    if copied.is_err() {
        let _ = std::fs::remove_file(tmp);
    }
    let n = copied?;
    std::fs::remove_file(from)?;
    Ok(n)
}

/// Copies `from` to a new file `to` (created owner-only, not over an existing one), its data
/// only: holes stay holes. Synced. Returns the bytes of data copied.
fn copy_sparse(from: &Path, to: &Path) -> std::io::Result<u64> {
    use std::os::unix::fs::{FileExt, OpenOptionsExt};
    let src = std::fs::File::open(from)?;
    let size = src.metadata()?.len();
    let _ = std::fs::remove_file(to);
    let dst = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(to)?;
    dst.set_len(size)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut copied = 0;
    for (start, end) in super::data_ranges(&src, size).0 {
        let mut at = start;
        while at < end {
            let n = ((end - at) as usize).min(buf.len());
            src.read_exact_at(&mut buf[..n], at)?;
            dst.write_all_at(&buf[..n], at)?;
            at += n as u64;
            copied += n as u64;
        }
    }
    dst.sync_all()?;
    Ok(copied)
}

/// Creates `dir` (its parent must exist) owner-only, or accepts the one there only if it is a
/// real directory (not a link) owned by this process's user; one made by an older version is
/// made owner-only. Anything else is refused, naming the owner.
pub fn secure_dir(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
    match std::fs::DirBuilder::new().mode(0o700).create(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(e),
    }
    let meta = std::fs::symlink_metadata(dir)?;
    let me = rustix::process::geteuid().as_raw();
    if !meta.file_type().is_dir() || meta.uid() != me {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!(
                "{} is not this platform's: it is {} owned by uid {} (this platform runs as uid {me}); remove it and start again",
                dir.display(),
                if meta.file_type().is_dir() { "a directory" } else { "not a directory" },
                meta.uid()
            ),
        ));
    }
    if meta.mode() & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// The machine's RAM (4 GiB when /proc/meminfo cannot tell).
pub fn host_memory_bytes() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(4 << 30, |kb| kb * 1024)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(dir: &Path) -> u32 {
        std::fs::metadata(dir).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn the_ram_directory_is_made_owner_only_and_only_a_real_directory_of_ours_is_accepted() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("memory");
        secure_dir(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        // One an older version left open is tightened, and accepted.
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        secure_dir(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        // A link (to a directory of ours, even) and a file are refused, naming the owner.
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        let file = tmp.path().join("file");
        std::fs::write(&file, b"").unwrap();
        let me = rustix::process::geteuid().as_raw();
        for refused in [&link, &file] {
            let err = secure_dir(refused).unwrap_err();
            assert_eq!(err.kind(), std::io::ErrorKind::PermissionDenied, "{err}");
            assert!(err.to_string().contains(&format!("owned by uid {me}")), "{err}");
        }
    }
}
