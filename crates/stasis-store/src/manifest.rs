//! The manifest: everything a restore needs besides the chunks. Versioned, zstd-compressed
//! JSON, read with a size cap.

use serde::{Deserialize, Serialize};

use crate::chunk::{ChunkHash, MAX_CHUNK_SIZE};

/// Bumped on any incompatible change; readers refuse versions they do not know.
pub const MANIFEST_VERSION: u32 = 1;
/// Largest manifest accepted (compressed and decompressed).
pub const MAX_MANIFEST_BYTES: usize = 64 * 1024 * 1024;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Manifest {
    pub version: u32,
    pub snapshot_id: String,
    pub tenant_id: String,
    pub computer_id: String,
    pub parent_snapshot_id: Option<String>,
    pub created_at: String,
    /// How to rebuild the machine (vCPUs, RAM, device line version, image, QEMU version).
    pub machine: serde_json::Value,
    /// VM device state (the migration stream without RAM).
    pub state: Part,
    /// Guest RAM.
    pub memory: Part,
    /// The root disk as the guest sees it (flattened raw).
    pub disk: Part,
}

/// A file cut into fixed-size chunks; `None` marks an all-zero chunk (not stored).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Part {
    pub size: u64,
    pub chunk_size: u32,
    pub chunks: Vec<Option<ChunkHash>>,
}

#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    #[error("manifest is larger than {MAX_MANIFEST_BYTES} bytes")]
    TooLarge,
    #[error("manifest does not decompress: {0}")]
    Decompress(String),
    #[error("manifest is not valid: {0}")]
    Parse(String),
    #[error("manifest version {0} is not supported (this build reads {MANIFEST_VERSION})")]
    Version(u32),
    #[error("it failed authentication: it was modified in the store, or the master key is wrong")]
    Authentication,
    #[error("manifest part {part} is inconsistent: {why}")]
    Inconsistent { part: &'static str, why: String },
}

impl Part {
    pub fn stored_chunks(&self) -> impl Iterator<Item = ChunkHash> + '_ {
        self.chunks.iter().flatten().copied()
    }

    fn check(&self, name: &'static str) -> Result<(), ManifestError> {
        let bad = |why: String| ManifestError::Inconsistent { part: name, why };
        if self.chunk_size == 0 || self.chunk_size as usize > MAX_CHUNK_SIZE {
            return Err(bad(format!("chunk_size {}", self.chunk_size)));
        }
        let expected = self.size.div_ceil(self.chunk_size as u64);
        if self.chunks.len() as u64 != expected {
            return Err(bad(format!("{} chunks for {} bytes", self.chunks.len(), self.size)));
        }
        Ok(())
    }
}

impl Manifest {
    pub fn parts(&self) -> [(&'static str, &Part); 3] {
        [("state", &self.state), ("memory", &self.memory), ("disk", &self.disk)]
    }

    pub fn encode(&self) -> Vec<u8> {
        let json = serde_json::to_vec(self).expect("manifests serialize");
        zstd::bulk::compress(&json, 3).expect("zstd compresses any input")
    }

    pub fn decode(bytes: &[u8]) -> Result<Manifest, ManifestError> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge);
        }
        let json =
            zstd::bulk::decompress(bytes, MAX_MANIFEST_BYTES).map_err(|e| ManifestError::Decompress(e.to_string()))?;
        let version = serde_json::from_slice::<serde_json::Value>(&json)
            .map_err(|e| ManifestError::Parse(e.to_string()))?
            .get("version")
            .and_then(|v| v.as_u64())
            .ok_or_else(|| ManifestError::Parse("no version".into()))?;
        if version != MANIFEST_VERSION as u64 {
            return Err(ManifestError::Version(version as u32));
        }
        let m: Manifest = serde_json::from_slice(&json).map_err(|e| ManifestError::Parse(e.to_string()))?;
        for (name, part) in m.parts() {
            part.check(name)?;
        }
        Ok(m)
    }

    /// Every distinct chunk the manifest needs.
    pub fn chunk_set(&self) -> std::collections::HashSet<ChunkHash> {
        self.parts().iter().flat_map(|(_, p)| p.stored_chunks()).collect()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub(crate) fn sample() -> Manifest {
        let h = ChunkHash::of(b"x");
        Manifest {
            version: MANIFEST_VERSION,
            snapshot_id: "s".into(),
            tenant_id: "t".into(),
            computer_id: "c".into(),
            parent_snapshot_id: None,
            created_at: "2026-01-01T00:00:00Z".into(),
            machine: serde_json::json!({"vcpus": 1}),
            state: Part {
                size: 10,
                chunk_size: 4,
                chunks: vec![Some(h), None, Some(h)],
            },
            memory: Part {
                size: 0,
                chunk_size: 4,
                chunks: vec![],
            },
            disk: Part {
                size: 4,
                chunk_size: 4,
                chunks: vec![None],
            },
        }
    }

    #[test]
    fn round_trips() {
        let m = sample();
        assert_eq!(Manifest::decode(&m.encode()).unwrap(), m);
        assert_eq!(m.chunk_set().len(), 1);
    }

    #[test]
    fn refuses_unknown_versions_and_inconsistent_parts() {
        let mut m = sample();
        m.version = 99;
        assert!(matches!(Manifest::decode(&m.encode()), Err(ManifestError::Version(99))));
        let mut m = sample();
        m.state.chunks.pop();
        assert!(matches!(
            Manifest::decode(&m.encode()),
            Err(ManifestError::Inconsistent { part: "state", .. })
        ));
        assert!(Manifest::decode(b"garbage").is_err());
    }
}
