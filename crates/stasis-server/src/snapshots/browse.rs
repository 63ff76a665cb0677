//! Browsing a snapshot's disk without restoring it: the ext4 file system in the snapshot's
//! disk image is read straight from the store (each chunk verified, as a restore verifies it)
//! by a memory-safe, read-only ext4 reader. Nothing is mounted and no host path is touched:
//! every path is resolved inside the image, and the guest's bytes are only ever parsed by
//! that reader (`ext4-view`, which forbids unsafe code), with bounded work per request.

use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use stasis_store::PartReader;
use stasis_types::{SnapshotTree, TreeEntry, TreeEntryKind};

use super::*;

/// Entries one listing returns at most (the rest are cut, and the listing says so by its
/// length).
pub const MAX_LISTING: usize = 10_000;
/// A folder downloaded as a tar holds at most this many entries and this depth.
const MAX_TAR_ENTRIES: usize = 200_000;
const MAX_TAR_DEPTH: usize = 64;
/// Disk readers kept open (each holds a few chunks in memory).
const READERS_KEPT: usize = 4;
/// Bytes per piece of a download.
const PIECE: usize = 256 * 1024;

/// The disk readers of recently browsed snapshots.
#[derive(Default)]
pub struct Browsing {
    readers: Mutex<Vec<(SnapshotId, Arc<PartReader>)>>,
}

/// What a browse of a snapshot found.
pub enum Browse<T> {
    /// The snapshot is still being taken: ask again in a moment (the SDK's `202 warming`).
    Warming,
    Ready(T),
}

/// A download: its length when it is one file (a folder is a tar of unknown length), and
/// its pieces.
pub struct Download {
    pub folder: bool,
    pub name: String,
    pub len: Option<u64>,
    pub body: tokio::sync::mpsc::Receiver<Result<Bytes, std::io::Error>>,
}

/// The ext4 reader's source: reads through the store on the calling (blocking) thread.
struct StoreDisk {
    reader: Arc<PartReader>,
    runtime: tokio::runtime::Handle,
}

impl ext4_view::Ext4Read for StoreDisk {
    fn read(&mut self, start: u64, dst: &mut [u8]) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        self.runtime
            .block_on(self.reader.read_at(start, dst))
            .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
    }
}

/// A path as a query gives it: absolute, at most 4096 bytes, no NUL.
pub fn check_path(raw: &str) -> Result<String> {
    let path = if raw.is_empty() { "/" } else { raw };
    if !path.starts_with('/') || path.len() > 4096 || path.contains('\0') {
        return Err(Error::invalid(
            "path",
            format!("path must be absolute, at most 4096 bytes (got {raw:?})"),
        ));
    }
    Ok(path.to_string())
}

/// What the reader's error means for a path in the snapshot.
fn fs_error(snapshot: SnapshotId, path: &str, e: ext4_view::Ext4Error) -> Error {
    use ext4_view::Ext4Error as E;
    use stasis_agent_proto::FsErrorKind as K;
    let (kind, why) = match &e {
        E::NotFound => (K::NotFound, "no such file or directory".to_string()),
        E::NotADirectory => (K::NotADirectory, "not a directory".to_string()),
        E::IsADirectory => (K::IsADirectory, "is a directory".to_string()),
        E::IsASpecialFile => (K::Invalid, "is a special file (device, fifo or socket)".to_string()),
        E::NotAbsolute | E::MalformedPath | E::PathTooLong | E::TooManySymlinks => (K::Invalid, e.to_string()),
        E::Io(inner) => {
            // A chunk the store could not give (or gave corrupt): never read as data.
            return Error::Unavailable(format!("reading snapshot {snapshot}'s disk from the store: {inner}"));
        }
        _ => (K::Other, format!("its file system cannot be read there: {e}")),
    };
    Error::File {
        kind,
        message: format!("{path} in snapshot {snapshot}: {why}"),
    }
}

fn entry_kind(t: ext4_view::FileType) -> TreeEntryKind {
    if t.is_dir() {
        TreeEntryKind::Dir
    } else if t.is_symlink() {
        TreeEntryKind::Symlink
    } else if t.is_regular_file() {
        TreeEntryKind::File
    } else {
        TreeEntryKind::Other
    }
}

fn join(dir: &str, name: &str) -> String {
    if dir.ends_with('/') {
        format!("{dir}{name}")
    } else {
        format!("{dir}/{name}")
    }
}

/// One folder's entries, sorted by name (`.` and `..` left out).
fn list(fs: &ext4_view::Ext4, snapshot: SnapshotId, path: &str) -> Result<Vec<TreeEntry>> {
    let mut out = Vec::new();
    for entry in fs.read_dir(path).map_err(|e| fs_error(snapshot, path, e))? {
        let entry = entry.map_err(|e| fs_error(snapshot, path, e))?;
        let name = entry.file_name().display().to_string();
        if name == "." || name == ".." {
            continue;
        }
        if out.len() >= MAX_LISTING {
            break;
        }
        let full = join(path, &name);
        let meta = entry.metadata().map_err(|e| fs_error(snapshot, &full, e))?;
        let kind = entry_kind(meta.file_type());
        let target = match kind {
            TreeEntryKind::Symlink => fs.read_link(full.as_str()).ok().map(|t| t.display().to_string()),
            _ => None,
        };
        out.push(TreeEntry {
            name,
            path: full,
            kind,
            size: meta.len(),
            mode: format!("{:04o}", meta.mode() & 0o7777),
            modified_at: None,
            target,
        });
    }
    out.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(out)
}

/// Writes what it is given to the response, in pieces; fails once the client is gone.
struct Pieces {
    tx: tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
    buf: Vec<u8>,
}

impl Pieces {
    fn send(&mut self) -> std::io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let piece = Bytes::from(std::mem::replace(&mut self.buf, Vec::with_capacity(PIECE)));
        self.tx
            .blocking_send(Ok(piece))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the client went away"))
    }
}

impl std::io::Write for Pieces {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        self.buf.extend_from_slice(data);
        if self.buf.len() >= PIECE {
            self.send()?;
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

/// A folder of the image as a tar, written to `out` (paths relative to the folder, under its
/// own name).
fn tar_folder(fs: &ext4_view::Ext4, snapshot: SnapshotId, root: &str, top: &str, out: Pieces) -> std::io::Result<()> {
    let mut tar = tar::Builder::new(out);
    let mut count = 0usize;
    let mut stack = vec![(root.to_string(), top.to_string(), 0usize)];
    while let Some((dir, rel, depth)) = stack.pop() {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Directory);
        header.set_mode(0o755);
        header.set_size(0);
        tar.append_data(&mut header, format!("{rel}/"), std::io::empty())?;
        let entries = list(fs, snapshot, &dir).map_err(|e| std::io::Error::other(e.to_string()))?;
        for entry in entries {
            count += 1;
            if count > MAX_TAR_ENTRIES {
                return Err(std::io::Error::other(format!(
                    "the folder holds more than {MAX_TAR_ENTRIES} entries; download a smaller one"
                )));
            }
            let rel_entry = format!("{rel}/{}", entry.name);
            let mode = u32::from_str_radix(&entry.mode, 8).unwrap_or(0o644);
            match entry.kind {
                TreeEntryKind::Dir if depth + 1 < MAX_TAR_DEPTH => stack.push((entry.path, rel_entry, depth + 1)),
                TreeEntryKind::Dir => {
                    return Err(std::io::Error::other(format!(
                        "the folder is nested deeper than {MAX_TAR_DEPTH} levels"
                    )))
                }
                TreeEntryKind::File => {
                    let file = fs
                        .open(entry.path.as_str())
                        .map_err(|e| std::io::Error::other(fs_error(snapshot, &entry.path, e).to_string()))?;
                    let mut header = tar::Header::new_gnu();
                    header.set_entry_type(tar::EntryType::Regular);
                    header.set_mode(mode);
                    header.set_size(entry.size);
                    tar.append_data(&mut header, &rel_entry, file)?;
                }
                TreeEntryKind::Symlink => {
                    let mut header = tar::Header::new_gnu();
                    header.set_entry_type(tar::EntryType::Symlink);
                    header.set_mode(0o777);
                    header.set_size(0);
                    tar.append_link(&mut header, &rel_entry, entry.target.unwrap_or_default())?;
                }
                // Devices, fifos and sockets hold no data: left out.
                TreeEntryKind::Other => {}
            }
        }
    }
    std::io::Write::flush(&mut tar.into_inner()?)
}

impl Snapshots {
    /// The snapshot's disk reader, if it is ready (`Warming` while it is being taken).
    async fn disk(&self, tenant: TenantId, id: SnapshotId) -> Result<Browse<Arc<PartReader>>> {
        let record = self.find_any(tenant, id).await?;
        match record.snapshot.status {
            SnapshotStatus::Creating | SnapshotStatus::Uploading => return Ok(Browse::Warming),
            SnapshotStatus::Failed => {
                return Err(Error::conflict(
                    crate::error::Conflict::SnapshotNotReady,
                    format!("snapshot {id} failed; it has no disk to browse"),
                ))
            }
            _ => {}
        }
        if let Some(hit) = self
            .browsing
            .readers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .find(|(s, _)| *s == id)
        {
            return Ok(Browse::Ready(hit.1.clone()));
        }
        let recorded = self
            .db
            .snapshot_recorded(id)
            .await?
            .ok_or_else(|| Error::not_found(Resource::Snapshot, id))?;
        let unreadable = |e: stasis_store::StoreError| {
            Error::Unavailable(format!(
                "reading snapshot {id} from the store: {}",
                crate::encryption::explain(&e)
            ))
        };
        let manifest = self.store.get_manifest_of(&recorded).await.map_err(unreadable)?;
        let reader = Arc::new(
            self.store
                .part_reader(recorded.tenant_id, &manifest, &manifest.disk)
                .await
                .map_err(unreadable)?,
        );
        let mut readers = self.browsing.readers.lock().unwrap_or_else(|p| p.into_inner());
        if readers.len() >= READERS_KEPT {
            readers.remove(0);
        }
        readers.push((id, reader.clone()));
        Ok(Browse::Ready(reader))
    }

    /// Runs `work` on the snapshot's file system, on a blocking thread.
    async fn with_fs<T: Send + 'static>(
        &self,
        tenant: TenantId,
        id: SnapshotId,
        work: impl FnOnce(&ext4_view::Ext4) -> Result<T> + Send + 'static,
    ) -> Result<Browse<T>> {
        let reader = match self.disk(tenant, id).await? {
            Browse::Warming => return Ok(Browse::Warming),
            Browse::Ready(r) => r,
        };
        let runtime = tokio::runtime::Handle::current();
        tokio::task::spawn_blocking(move || {
            let fs =
                ext4_view::Ext4::load(Box::new(StoreDisk { reader, runtime })).map_err(|e| fs_error(id, "/", e))?;
            work(&fs).map(Browse::Ready)
        })
        .await
        .map_err(|e| Error::internal(format!("reading snapshot {id}'s disk: {e}")))?
    }

    /// `GET /snapshots/{id}/tree`: one folder of the snapshot's disk.
    pub async fn tree(&self, tenant: TenantId, id: SnapshotId, path: String) -> Result<Browse<SnapshotTree>> {
        let at = path.clone();
        let listed = self.with_fs(tenant, id, move |fs| list(fs, id, &at)).await?;
        Ok(match listed {
            Browse::Warming => Browse::Warming,
            Browse::Ready(data) => Browse::Ready(SnapshotTree {
                snapshot_id: id,
                path,
                status: "ready".into(),
                data,
            }),
        })
    }

    /// `GET /snapshots/{id}/files`: one file's bytes, or a folder as a tar, streamed.
    pub async fn download(&self, tenant: TenantId, id: SnapshotId, path: String) -> Result<Browse<Download>> {
        let reader = match self.disk(tenant, id).await? {
            Browse::Warming => return Ok(Browse::Warming),
            Browse::Ready(r) => r,
        };
        let (tx, rx) = tokio::sync::mpsc::channel(4);
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<Result<(bool, Option<u64>)>>();
        let at = path.clone();
        let runtime = tokio::runtime::Handle::current();
        // The blocking thread says what it found (or the error) first, then streams.
        let work = tokio::task::spawn_blocking(move || {
            let fs = match ext4_view::Ext4::load(Box::new(StoreDisk { reader, runtime })) {
                Ok(fs) => fs,
                Err(e) => {
                    let _ = ready_tx.send(Err(fs_error(id, "/", e)));
                    return;
                }
            };
            stream_path(
                &fs,
                id,
                &at,
                ready_tx,
                Pieces {
                    tx,
                    buf: Vec::with_capacity(PIECE),
                },
            );
        });
        let name = path
            .trim_end_matches('/')
            .rsplit('/')
            .next()
            .filter(|n| !n.is_empty())
            .unwrap_or("root")
            .to_string();
        match ready_rx.await {
            Ok(found) => {
                let (folder, len) = found?;
                // The stream carries on by itself (the task is detached).
                drop(work);
                Ok(Browse::Ready(Download {
                    folder,
                    name,
                    len,
                    body: rx,
                }))
            }
            Err(_) => {
                let why = match work.await {
                    Err(e) => e.to_string(),
                    Ok(()) => "it ended before it began".into(),
                };
                Err(Error::internal(format!("reading snapshot {id}'s disk: {why}")))
            }
        }
    }
}

/// Streams a file of the image, or a folder of it as a tar, into `out`; says first through
/// `ready` whether it is a folder and how long a file is, or why it cannot be read.
fn stream_path(
    fs: &ext4_view::Ext4,
    id: SnapshotId,
    at: &str,
    ready: tokio::sync::oneshot::Sender<Result<(bool, Option<u64>)>>,
    mut out: Pieces,
) {
    use std::io::{Read, Write};
    let meta = match fs.metadata(at) {
        Ok(m) => m,
        Err(e) => {
            let _ = ready.send(Err(fs_error(id, at, e)));
            return;
        }
    };
    if meta.is_dir() {
        let _ = ready.send(Ok((true, None)));
        let top = at
            .trim_end_matches('/')
            .rsplit('/')
            .next()
            .filter(|n| !n.is_empty())
            .unwrap_or("root");
        if let Err(e) = tar_folder(fs, id, at, top, out) {
            tracing::warn!(snapshot = %id, path = at, error = %e, "a snapshot folder's download ended early");
        }
        return;
    }
    let mut file = match fs.open(at) {
        Ok(f) => f,
        Err(e) => {
            let _ = ready.send(Err(fs_error(id, at, e)));
            return;
        }
    };
    let _ = ready.send(Ok((false, Some(meta.len()))));
    let mut piece = vec![0u8; PIECE];
    loop {
        let n = match file.read(&mut piece) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) => {
                // The stream ends short and in error: nothing wrong is ever sent as data.
                tracing::warn!(snapshot = %id, path = at, error = %e, "reading a snapshot file");
                let _ = out.send();
                let _ = out.tx.blocking_send(Err(std::io::Error::other(e.to_string())));
                return;
            }
        };
        if out.write_all(&piece[..n]).is_err() {
            return; // the client went away
        }
    }
    let _ = out.flush();
}
