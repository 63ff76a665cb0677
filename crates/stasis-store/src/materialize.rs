//! Materialization: a part of a snapshot rebuilt from the store into a local file (sparse:
//! zero chunks stay holes), every chunk verified; the data ranges of sparse files; and the
//! host's local copies of snapshots built from them (`cache`).

pub mod cache;

use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjectPath;
use object_store::ObjectStore;
use stasis_types::TenantId;

use crate::chunk::{ChunkError, ChunkHash};
use crate::codec::Codec;
use crate::error::{io, joined, modified, unauthentic};
use crate::manifest::{Manifest, Part};
use crate::{read_bounded, Progress, SnapshotStore, StoreError, PARALLEL};

/// Fetching and opening the chunks of one snapshot: each stored object size-checked before
/// its body is read, then verified against its name (and opened with the tenant's key).
#[derive(Clone)]
pub(crate) struct ChunkSource {
    /// `None` when the part has no stored chunk (nothing to open).
    codec: Option<Codec>,
    store: Arc<dyn ObjectStore>,
    /// The most a stored chunk of the part can take.
    max_stored: u64,
    /// For messages.
    snapshot_id: Arc<str>,
}

/// What every chunk of one part's materialization shares.
struct PartWriter {
    file: std::fs::File,
    size: u64,
    chunk_size: u64,
    source: ChunkSource,
}

impl SnapshotStore {
    /// The chunk source of `part` of `manifest`, with `tenant`'s keys: the snapshot's tenant as
    /// the platform recorded it (a manifest naming another is refused).
    pub(crate) async fn chunk_source(
        &self,
        tenant: TenantId,
        manifest: &Manifest,
        part: &Part,
    ) -> Result<ChunkSource, StoreError> {
        let snapshot_id: Arc<str> = manifest.snapshot_id.as_str().into();
        let tenant = tenant.to_string();
        if manifest.tenant_id != tenant {
            return Err(modified(
                &snapshot_id,
                format!(
                    "names tenant {}, but the snapshot is tenant {tenant}'s",
                    manifest.tenant_id
                ),
            ));
        }
        let codec = if part.chunks.iter().any(Option::is_some) {
            Some(self.codec(manifest.chunk_names, &tenant, false, &snapshot_id).await?)
        } else {
            None
        };
        Ok(ChunkSource {
            codec,
            store: self.store.clone(),
            max_stored: crate::seal::max_stored_len(part.chunk_size),
            snapshot_id,
        })
    }
}

impl ChunkSource {
    /// The stored object of chunk `hash`, refused unread when it is larger than any chunk.
    async fn fetch(&self, hash: ChunkHash) -> Result<impl AsRef<[u8]> + Send + 'static, StoreError> {
        let got = match self.store.get(&ObjectPath::from(hash.key())).await {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => return Err(StoreError::MissingChunk(hash)),
            Err(e) => return Err(e.into()),
        };
        let max = self.max_stored;
        read_bounded(got, max).await?.map_err(|size| StoreError::Corrupt {
            chunk: hash,
            source: ChunkError::TooLarge { size, max },
        })
    }

    /// Opens (verifies) a stored chunk that must hold `len` bytes.
    fn open(&self, hash: ChunkHash, stored: &[u8], len: u64) -> Result<Vec<u8>, StoreError> {
        let snapshot_id = &self.snapshot_id;
        let Some(codec) = &self.codec else {
            return Err(StoreError::MissingChunk(hash));
        };
        let raw = codec.open(stored, hash).map_err(|source| match source {
            ChunkError::Authentication => unauthentic(snapshot_id, format!("chunk {hash} of snapshot {snapshot_id}")),
            source => StoreError::Corrupt { chunk: hash, source },
        })?;
        if raw.len() as u64 != len {
            return Err(StoreError::Corrupt {
                chunk: hash,
                source: ChunkError::Length(raw.len()),
            });
        }
        Ok(raw)
    }

    /// Chunk `hash` of `len` bytes, fetched and verified (off the async runtime's threads).
    pub(crate) async fn get(&self, hash: ChunkHash, len: u64) -> Result<Vec<u8>, StoreError> {
        let stored = self.fetch(hash).await?;
        let this = self.clone();
        joined(
            tokio::task::spawn_blocking(move || this.open(hash, stored.as_ref(), len)).await,
            "opening a chunk",
        )?
    }
}

impl SnapshotStore {
    /// Rebuilds a part of `manifest` into `dest` (sparse: zero chunks stay holes), verifying
    /// every chunk the way the manifest names them, with `tenant`'s keys: the snapshot's
    /// tenant as the platform recorded it (a manifest naming another is refused). Each chunk
    /// object is size-checked before its body is read.
    pub async fn materialize(
        &self,
        tenant: TenantId,
        manifest: &Manifest,
        part: &Part,
        dest: &Path,
        progress: Progress,
    ) -> Result<(), StoreError> {
        let source = self.chunk_source(tenant, manifest, part).await?;
        let file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(dest)
            .map_err(io(format!("creating {}", dest.display())))?;
        file.set_len(part.size).map_err(io("sizing the file"))?;
        let writer = Arc::new(PartWriter {
            file,
            size: part.size,
            chunk_size: part.chunk_size as u64,
            source,
        });
        let done = Arc::new(AtomicU64::new(0));
        // Owned items and handles: futures that borrow from the iterator are not `Send` for
        // every lifetime, which spawned callers need.
        futures::stream::iter(part.chunks.clone().into_iter().enumerate())
            .map(|(index, hash)| {
                let (writer, done, progress) = (writer.clone(), done.clone(), progress.clone());
                async move {
                    let len = writer.clone().chunk(index, hash).await?;
                    progress(done.fetch_add(len, Ordering::Relaxed) + len);
                    Ok::<(), StoreError>(())
                }
            })
            .buffer_unordered(PARALLEL)
            .try_collect::<Vec<()>>()
            .await?;
        writer.file.sync_all().map_err(io("syncing"))?;
        Ok(())
    }
}

impl PartWriter {
    /// Writes chunk `index` (named `hash`, or a hole) in place; returns its length.
    async fn chunk(self: Arc<Self>, index: usize, hash: Option<ChunkHash>) -> Result<u64, StoreError> {
        let offset = index as u64 * self.chunk_size;
        let len = (self.size - offset).min(self.chunk_size);
        let Some(hash) = hash else {
            return Ok(len); // a hole: the sized file reads zeros there already
        };
        let stored = self.source.fetch(hash).await?;
        let written = tokio::task::spawn_blocking(move || {
            let raw = self.source.open(hash, stored.as_ref(), len)?;
            self.file.write_all_at(&raw, offset).map_err(io("writing a chunk"))
        })
        .await;
        joined(written, "writing a chunk")??;
        Ok(len)
    }
}

/// Data (non-hole) ranges of a file, from SEEK_DATA/SEEK_HOLE; the whole file where the file
/// system cannot tell.
pub(crate) struct DataRanges(Vec<(u64, u64)>);

impl DataRanges {
    pub(crate) fn overlaps(&self, start: u64, end: u64) -> bool {
        self.within(start, end).next().is_some()
    }

    /// The data between `start` and `end`, range by range, cut to that window.
    pub(crate) fn within(&self, start: u64, end: u64) -> impl Iterator<Item = (u64, u64)> + '_ {
        // Ranges are in order and apart: skip those that end before the window.
        let first = self.0.partition_point(|&(_, e)| e <= start);
        self.0[first..]
            .iter()
            .take_while(move |&&(s, _)| s < end)
            .map(move |&(s, e)| (s.max(start), e.min(end)))
    }
}

/// The data of `file` exactly, or an error: where a changes file's data are the pages that
/// changed, taking all of it for data (as [`data_ranges`] does when it cannot tell) would
/// write its holes' zeros over the base.
pub(crate) fn exact_data_ranges(file: &std::fs::File, size: u64) -> std::io::Result<DataRanges> {
    use rustix::fs::{seek, SeekFrom};
    let mut ranges = Vec::new();
    let mut pos = 0;
    while pos < size {
        let data = match seek(file, SeekFrom::Data(pos)) {
            Ok(data) => data,
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(e.into()),
        };
        let hole = seek(file, SeekFrom::Hole(data))?;
        ranges.push((data, hole.min(size)));
        pos = hole;
    }
    Ok(DataRanges(ranges))
}

pub(crate) fn data_ranges(file: &std::fs::File, size: u64) -> DataRanges {
    use rustix::fs::{seek, SeekFrom};
    let mut ranges = Vec::new();
    let mut pos = 0;
    while pos < size {
        let data = match seek(file, SeekFrom::Data(pos)) {
            Ok(data) => data,
            Err(rustix::io::Errno::NXIO) => break, // no more data
            Err(_) => return DataRanges(vec![(0, size)]),
        };
        let Ok(hole) = seek(file, SeekFrom::Hole(data)) else {
            return DataRanges(vec![(0, size)]);
        };
        ranges.push((data, hole));
        pos = hole;
    }
    DataRanges(ranges)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tests::sparse_file;

    #[test]
    fn data_ranges_find_the_data_and_skip_the_holes() {
        let dir = tempfile::tempdir().unwrap();
        let k = 1024u64;
        let path = sparse_file(
            dir.path(),
            "f",
            1024 * k,
            &[(256 * k, &[1; 4096]), (768 * k, &[2; 100])],
        );
        let file = std::fs::File::open(&path).unwrap();
        let ranges = data_ranges(&file, 1024 * k);
        assert!(ranges.overlaps(256 * k, 256 * k + 4096) && ranges.overlaps(768 * k, 768 * k + 100));
        // Where the file system can tell (this test's does), holes are no data.
        assert_eq!(ranges.0, [(256 * k, 260 * k), (768 * k, 772 * k)]);
        assert!(
            !ranges.overlaps(0, 256 * k) && !ranges.overlaps(260 * k, 768 * k) && !ranges.overlaps(772 * k, 1024 * k)
        );
        // All hole: no data at all. Empty: nothing to look at.
        let path = sparse_file(dir.path(), "holes", 1024 * k, &[]);
        assert!(data_ranges(&std::fs::File::open(&path).unwrap(), 1024 * k).0.is_empty());
        let path = sparse_file(dir.path(), "empty", 0, &[]);
        assert!(data_ranges(&std::fs::File::open(&path).unwrap(), 0).0.is_empty());
    }
}
