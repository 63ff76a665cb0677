//! Random access to one part of a snapshot straight from the store: a read fetches the chunks
//! it covers (each verified as a restore verifies it), keeping the last few in memory, so a
//! file system in a snapshot's disk can be browsed without materializing the disk.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use stasis_types::TenantId;

use crate::manifest::{Manifest, Part};
use crate::materialize::ChunkSource;
use crate::{SnapshotStore, StoreError};

/// Chunks kept in memory by one reader (1 MiB each for disks).
const CACHED_CHUNKS: usize = 16;

/// Reads one part of a snapshot at any offset.
pub struct PartReader {
    source: ChunkSource,
    part: Part,
    /// The most recently read chunks, newest last: (index, bytes).
    cache: Mutex<VecDeque<(usize, Arc<Vec<u8>>)>>,
}

impl SnapshotStore {
    /// A reader of `part` of `manifest`, with `tenant`'s keys (the snapshot's tenant as the
    /// platform recorded it).
    pub async fn part_reader(
        &self,
        tenant: TenantId,
        manifest: &Manifest,
        part: &Part,
    ) -> Result<PartReader, StoreError> {
        Ok(PartReader {
            source: self.chunk_source(tenant, manifest, part).await?,
            part: part.clone(),
            cache: Mutex::new(VecDeque::new()),
        })
    }
}

impl PartReader {
    pub fn size(&self) -> u64 {
        self.part.size
    }

    /// Fills `buf` from `offset`; a read past the end fails naming the range.
    pub async fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), StoreError> {
        let end = offset
            .checked_add(buf.len() as u64)
            .filter(|&e| e <= self.part.size)
            .ok_or_else(|| {
                StoreError::Config(format!(
                    "a read of {} bytes at {offset} is past the end of a {}-byte part",
                    buf.len(),
                    self.part.size
                ))
            })?;
        let chunk_size = self.part.chunk_size as u64;
        let mut pos = offset;
        while pos < end {
            let index = (pos / chunk_size) as usize;
            let start = index as u64 * chunk_size;
            let take = (end.min(start + chunk_size) - pos) as usize;
            let dst = &mut buf[(pos - offset) as usize..][..take];
            match self.chunk(index).await? {
                None => dst.fill(0),
                Some(bytes) => dst.copy_from_slice(&bytes[(pos - start) as usize..][..take]),
            }
            pos += take as u64;
        }
        Ok(())
    }

    /// Chunk `index`'s bytes (None: all zeros, not stored).
    async fn chunk(&self, index: usize) -> Result<Option<Arc<Vec<u8>>>, StoreError> {
        let Some(hash) = self.part.chunks[index] else {
            return Ok(None);
        };
        if let Some(hit) = self.cached(index) {
            return Ok(Some(hit));
        }
        let chunk_size = self.part.chunk_size as u64;
        let len = (self.part.size - index as u64 * chunk_size).min(chunk_size);
        let bytes = Arc::new(self.source.get(hash, len).await?);
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if cache.len() >= CACHED_CHUNKS {
            cache.pop_front();
        }
        cache.push_back((index, bytes.clone()));
        Ok(Some(bytes))
    }

    fn cached(&self, index: usize) -> Option<Arc<Vec<u8>>> {
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        let at = cache.iter().position(|(i, _)| *i == index)?;
        let hit = cache.remove(at)?;
        let bytes = hit.1.clone();
        cache.push_back(hit);
        Some(bytes)
    }
}
