//! Uploads: a file is cut into chunks, and each chunk is read, named (hashed), compressed
//! (or sealed) and stored, several at once; all-zero chunks are not stored, and chunks the
//! store already has are not uploaded again.

use std::collections::HashSet;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, PutPayload};
use stasis_types::TenantId;

use crate::chunk::{self, ChunkHash};
use crate::codec::Codec;
use crate::error::{io, joined};
use crate::manifest::{Manifest, Part};
use crate::materialize::{data_ranges, exact_data_ranges, DataRanges};
use crate::{Pin, Progress, SnapshotStore, StoreError, PARALLEL};

/// What an upload did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UploadStats {
    /// Bytes of the file (its logical size).
    pub raw_bytes: u64,
    /// Bytes in all-zero chunks (not stored).
    pub zero_bytes: u64,
    /// Chunks written to the store by this upload, and their stored (compressed) size.
    pub new_chunks: u64,
    pub uploaded_bytes: u64,
    /// Chunks the store already had.
    pub reused_chunks: u64,
    /// Stored (compressed) size of every distinct chunk the file needs, new or reused.
    pub stored_bytes: u64,
}

impl UploadStats {
    pub fn add(&mut self, other: UploadStats) {
        self.raw_bytes += other.raw_bytes;
        self.zero_bytes += other.zero_bytes;
        self.new_chunks += other.new_chunks;
        self.uploaded_bytes += other.uploaded_bytes;
        self.reused_chunks += other.reused_chunks;
        self.stored_bytes += other.stored_bytes;
    }
}

/// What became of one chunk, with the stored size of the object it is kept in.
enum Outcome {
    Zero,
    Reused(u64),
    New(u64),
}

/// One chunk done: where it sits in the file, its name (none when all zero), its outcome.
struct Chunked {
    index: usize,
    len: u64,
    hash: Option<ChunkHash>,
    outcome: Outcome,
}

/// What every chunk of one file's upload shares.
struct FileUpload {
    file: std::fs::File,
    size: u64,
    chunk_size: u64,
    data: DataRanges,
    codec: Codec,
    store: Arc<dyn ObjectStore>,
    /// RAM kept as changes: `file` holds the changed pages (its data), over this base.
    over: Option<Base>,
}

/// The RAM a changes file is over: the base snapshot's local file and its stored part.
struct Base {
    file: std::fs::File,
    data: DataRanges,
    chunks: Vec<Option<ChunkHash>>,
}

impl SnapshotStore {
    /// Cuts `path` into chunks and stores the ones the store lacks; `tenant`'s key seals them
    /// if the store is encrypted.
    pub async fn upload_file(
        &self,
        _pin: &Pin,
        tenant: TenantId,
        path: &Path,
        chunk_size: u32,
        progress: Progress,
    ) -> Result<(Part, UploadStats), StoreError> {
        let file = std::fs::File::open(path).map_err(io(format!("opening {}", path.display())))?;
        let size = file.metadata().map_err(io("stat"))?.len();
        let data = data_ranges(&file, size);
        let count = size.div_ceil(chunk_size as u64) as usize;
        let codec = self
            .codec(self.chunk_names(), &tenant.to_string(), true, "being uploaded")
            .await?;
        let upload = Arc::new(FileUpload {
            file,
            size,
            chunk_size: chunk_size as u64,
            data,
            codec,
            store: self.store.clone(),
            over: None,
        });
        self.upload_chunks(upload, count, chunk_size, progress).await
    }

    /// Stores RAM kept as changes (see `stasis_vmm::changes`): the base snapshot's RAM (its
    /// local file `base_file`, stored as `base`, named `base_names`) with the pages of
    /// `changes` (the data of a sparse file as long as the RAM) over it. A chunk with no
    /// changed page is the base's chunk as its manifest names it: not read, not hashed, only
    /// checked to be in the store (stored again from the base file if it is not). The others
    /// are read from both files and stored as [`SnapshotStore::upload_file`] stores chunks.
    #[allow(clippy::too_many_arguments)]
    pub async fn upload_changes(
        &self,
        pin: &Pin,
        tenant: TenantId,
        base: &Part,
        base_names: crate::ChunkNames,
        base_file: &Path,
        changes: &Path,
        progress: Progress,
    ) -> Result<(Part, UploadStats), StoreError> {
        let file = std::fs::File::open(changes).map_err(io(format!("opening {}", changes.display())))?;
        let size = file.metadata().map_err(io("stat"))?.len();
        let base_f = std::fs::File::open(base_file).map_err(io(format!("opening {}", base_file.display())))?;
        let base_size = base_f.metadata().map_err(io("stat"))?.len();
        if base_names != self.chunk_names() || base.size != size || base_size < size {
            // Named another way, or another size: stored whole, as any RAM file.
            tracing::debug!("RAM changes not over a compatible base: stored whole");
            let whole = changes.with_extension("whole");
            let runs = exact_data_ranges(&file, size).map_err(io("finding the changed pages"))?;
            let (b, c, out) = (base_f, file, whole.clone());
            joined(
                tokio::task::spawn_blocking(move || apply_over(&b, &c, &runs, &out, size)).await,
                "applying the changes over their base",
            )?
            .map_err(io("applying the changes over their base"))?;
            let r = self.upload_file(pin, tenant, &whole, base.chunk_size, progress).await;
            let _ = std::fs::remove_file(&whole);
            return r;
        }
        let data = exact_data_ranges(&file, size).map_err(io("finding the changed pages"))?;
        let count = size.div_ceil(base.chunk_size as u64) as usize;
        let codec = self
            .codec(self.chunk_names(), &tenant.to_string(), true, "being uploaded")
            .await?;
        let base_data = data_ranges(&base_f, size);
        let upload = Arc::new(FileUpload {
            file,
            size,
            chunk_size: base.chunk_size as u64,
            data,
            codec,
            store: self.store.clone(),
            over: Some(Base {
                file: base_f,
                data: base_data,
                chunks: base.chunks.clone(),
            }),
        });
        self.upload_chunks(upload, count, base.chunk_size, progress).await
    }

    async fn upload_chunks(
        &self,
        upload: Arc<FileUpload>,
        count: usize,
        chunk_size: u32,
        progress: Progress,
    ) -> Result<(Part, UploadStats), StoreError> {
        let size = upload.size;
        let done = Arc::new(AtomicU64::new(0));
        let chunks: Vec<Chunked> = futures::stream::iter(0..count)
            .map(|index| {
                let (upload, done, progress) = (upload.clone(), done.clone(), progress.clone());
                async move {
                    let chunk = upload.chunk(index).await?;
                    progress(done.fetch_add(chunk.len, Ordering::Relaxed) + chunk.len);
                    Ok::<_, StoreError>(chunk)
                }
            })
            .buffer_unordered(PARALLEL)
            .try_collect()
            .await?;
        Ok(tally(size, chunk_size, count, chunks))
    }

    /// Checks that every chunk the manifest names is in the store.
    pub async fn verify_present(&self, manifest: &Manifest) -> Result<(), StoreError> {
        futures::stream::iter(manifest.chunk_set())
            .map(|h| {
                let store = self.store.clone();
                async move {
                    match store.head(&ObjectPath::from(h.key())).await {
                        Ok(_) => Ok(()),
                        Err(object_store::Error::NotFound { .. }) => Err(StoreError::MissingChunk(h)),
                        Err(e) => Err(e.into()),
                    }
                }
            })
            .buffer_unordered(PARALLEL * 4)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }
}

impl FileUpload {
    /// Chunk `index`: read, named, and stored unless it is all zeros or already stored.
    async fn chunk(self: Arc<Self>, index: usize) -> Result<Chunked, StoreError> {
        let start = index as u64 * self.chunk_size;
        let len = (self.size - start).min(self.chunk_size);
        if let Some(base) = &self.over {
            if !self.data.overlaps(start, start + len) {
                // Unchanged: the base's chunk.
                let hash = base.chunks.get(index).copied().flatten();
                let outcome = match hash {
                    None => Outcome::Zero,
                    Some(h) => match self.stored_size(h).await? {
                        Some(n) => Outcome::Reused(n),
                        None => {
                            // Gone from the store (its snapshots deleted and collected): stored
                            // again from the base's file, under the name its bytes have.
                            return self.clone().changed_chunk(index, start, len).await;
                        }
                    },
                };
                return Ok(Chunked {
                    index,
                    len,
                    hash,
                    outcome,
                });
            }
            return self.clone().changed_chunk(index, start, len).await;
        }
        let read = self.clone().read(start, len).await?;
        self.stored(index, len, read).await
    }

    /// A chunk read (its name and bytes, none when all zeros), stored unless the store has it.
    async fn stored(&self, index: usize, len: u64, read: Option<(ChunkHash, Vec<u8>)>) -> Result<Chunked, StoreError> {
        let (hash, outcome) = match read {
            None => (None, Outcome::Zero),
            Some((hash, raw)) => (Some(hash), self.store_chunk(hash, raw).await?),
        };
        Ok(Chunked {
            index,
            len,
            hash,
            outcome,
        })
    }

    /// The chunk's bytes and name; `None` when they are all zeros (a hole is not even read).
    async fn read(self: Arc<Self>, start: u64, len: u64) -> Result<Option<(ChunkHash, Vec<u8>)>, StoreError> {
        if !self.data.overlaps(start, start + len) {
            return Ok(None);
        }
        let read = tokio::task::spawn_blocking(move || -> std::io::Result<Option<(ChunkHash, Vec<u8>)>> {
            let mut buf = vec![0u8; len as usize];
            self.file.read_exact_at(&mut buf, start)?;
            if chunk::is_zero(&buf) {
                return Ok(None);
            }
            Ok(Some((self.codec.name(&buf), buf)))
        })
        .await;
        joined(read, "reading a chunk")?.map_err(io("reading a chunk"))
    }

    /// A chunk of RAM kept as changes: the base's bytes with the changed pages over them.
    async fn changed_chunk(self: Arc<Self>, index: usize, start: u64, len: u64) -> Result<Chunked, StoreError> {
        let this = self.clone();
        let read = tokio::task::spawn_blocking(move || -> std::io::Result<Option<(ChunkHash, Vec<u8>)>> {
            let base = this.over.as_ref().expect("a chunk of changes has a base");
            let mut buf = vec![0u8; len as usize];
            if base.data.overlaps(start, start + len) {
                read_up_to(&base.file, &mut buf, start)?;
            }
            for (s, e) in this.data.within(start, start + len) {
                this.file
                    .read_exact_at(&mut buf[(s - start) as usize..(e - start) as usize], s)?;
            }
            if chunk::is_zero(&buf) {
                return Ok(None);
            }
            Ok(Some((this.codec.name(&buf), buf)))
        })
        .await;
        let read = joined(read, "reading a chunk")?.map_err(io("reading a chunk"))?;
        self.stored(index, len, read).await
    }

    /// The stored size of chunk `hash`, if the store has it.
    async fn stored_size(&self, hash: ChunkHash) -> Result<Option<u64>, StoreError> {
        match self.store.head(&ObjectPath::from(hash.key())).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Stores the chunk named `hash` unless the store has it already.
    async fn store_chunk(&self, hash: ChunkHash, raw: Vec<u8>) -> Result<Outcome, StoreError> {
        let key = ObjectPath::from(hash.key());
        if let Some(n) = self.stored_size(hash).await? {
            return Ok(Outcome::Reused(n));
        }
        let codec = self.codec.clone();
        let stored = joined(
            tokio::task::spawn_blocking(move || codec.encode(hash, &raw)).await,
            "compressing a chunk",
        )?;
        let n = stored.len() as u64;
        self.store.put(&key, PutPayload::from(stored)).await?;
        Ok(Outcome::New(n))
    }
}

/// Reads into `buf` from `offset` until it is full or the file ends (the rest stays zeros).
fn read_up_to(f: &std::fs::File, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
    let mut got = 0;
    while got < buf.len() {
        match f.read_at(&mut buf[got..], offset + got as u64) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// `base` with the `changed` ranges of `changes` over it, into a new file `out` of `size`.
fn apply_over(
    base: &std::fs::File,
    changes: &std::fs::File,
    changed: &DataRanges,
    out: &Path,
    size: u64,
) -> std::io::Result<()> {
    let out = std::fs::File::create(out)?;
    out.set_len(size)?;
    let mut buf = vec![0u8; 1 << 20];
    for (s, e) in data_ranges(base, size).within(0, size) {
        let mut pos = s;
        while pos < e {
            let n = ((e - pos) as usize).min(buf.len());
            read_up_to(base, &mut buf[..n], pos)?;
            out.write_all_at(&buf[..n], pos)?;
            pos += n as u64;
        }
    }
    for (s, e) in changed.within(0, size) {
        let mut pos = s;
        while pos < e {
            let n = ((e - pos) as usize).min(buf.len());
            changes.read_exact_at(&mut buf[..n], pos)?;
            out.write_all_at(&buf[..n], pos)?;
            pos += n as u64;
        }
    }
    out.sync_all()
}

/// The part the chunks make up, and what storing them did.
fn tally(size: u64, chunk_size: u32, count: usize, done: Vec<Chunked>) -> (Part, UploadStats) {
    let mut chunks = vec![None; count];
    let mut stats = UploadStats {
        raw_bytes: size,
        ..Default::default()
    };
    let mut distinct = HashSet::new();
    for Chunked {
        index,
        len,
        hash,
        outcome,
    } in done
    {
        chunks[index] = hash;
        let stored = match outcome {
            Outcome::Zero => {
                stats.zero_bytes += len;
                0
            }
            Outcome::Reused(n) => {
                stats.reused_chunks += 1;
                n
            }
            Outcome::New(n) => {
                stats.new_chunks += 1;
                stats.uploaded_bytes += n;
                n
            }
        };
        if hash.is_some_and(|h| distinct.insert(h)) {
            stats.stored_bytes += stored;
        }
    }
    let part = Part {
        size,
        chunk_size,
        chunks,
    };
    (part, stats)
}
