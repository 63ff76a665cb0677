//! The manifest: everything a restore needs besides the chunks. Versioned, zstd-compressed
//! JSON, read with a size cap.
//!
//! Version 2 added `chunk_names` (how the chunks are named, so a reader verifies them the
//! way they were written); version 1 manifests named chunks by plain BLAKE3 when plaintext,
//! by the sealing key's name hash when sealed, and still read. Version 3 added `boot` (the
//! kernel and initrd the machine was booted with, stored like the other parts) and a typed
//! description of the machine in `machine`; older ones still read.

use serde::{Deserialize, Serialize};

use crate::chunk::{ChunkHash, MAX_CHUNK_SIZE};

/// Bumped on any incompatible change; readers refuse versions they do not know.
pub const MANIFEST_VERSION: u32 = 3;
/// The oldest version still read.
pub const OLDEST_MANIFEST_VERSION: u32 = 1;
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
    /// The machine it was taken on: from version 3 a description the host runtime reads
    /// (QEMU release, machine type, accelerator, CPU model, vCPUs, RAM, device line, kernel
    /// and initrd by hash); before, vCPUs, RAM, accelerator and image only.
    pub machine: serde_json::Value,
    /// VM device state (the migration stream without RAM).
    pub state: Part,
    /// Guest RAM.
    pub memory: Part,
    /// The root disk as the guest sees it (flattened raw).
    pub disk: Part,
    /// How the chunks are named (absent before version 2: see [`ChunkNames::Blake3`]).
    #[serde(default)]
    pub chunk_names: ChunkNames,
    /// The kernel and initrd the machine was booted with (absent before version 3), so a
    /// restore starts the machine it was taken on whatever image the host has now.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<Boot>,
}

/// A machine's boot files, stored as parts (chunked, deduplicated, sealed like the rest).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Boot {
    pub kernel: Part,
    pub initrd: Part,
}

/// How a manifest's chunks are named: a chunk is only accepted if its content hashes, this
/// way, to the name it was fetched by.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChunkNames {
    /// Plain BLAKE3, the same for every tenant (unencrypted stores before version 2): chunks
    /// are shared across tenants.
    #[default]
    Blake3,
    /// BLAKE3 keyed with the tenant's naming key (unencrypted stores from version 2 on): no
    /// chunk is shared across tenants, so deduplication reveals nothing about other tenants.
    TenantKeyed,
    /// Keyed with the tenant's data key, and the chunks are sealed (encrypted stores).
    Sealed,
}

impl ChunkNames {
    pub fn as_str(self) -> &'static str {
        match self {
            ChunkNames::Blake3 => "blake3",
            ChunkNames::TenantKeyed => "tenant_keyed",
            ChunkNames::Sealed => "sealed",
        }
    }
}

/// BLAKE3 of a manifest object exactly as stored (sealed or not). The platform records it
/// when the snapshot is taken and checks it on every read: the stored bytes, rather than the
/// decoded manifest, so a modified object is refused before anything parses it, and no
/// canonical form has to stay stable across versions.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ManifestHash(pub [u8; 32]);

impl ManifestHash {
    pub fn of(stored: &[u8]) -> ManifestHash {
        ManifestHash(*blake3::hash(stored).as_bytes())
    }

    pub fn to_hex(self) -> String {
        hex::encode(self.0)
    }

    pub fn from_hex(s: &str) -> Option<ManifestHash> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(ManifestHash(out))
    }
}

impl std::fmt::Debug for ManifestHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ManifestHash({})", self.to_hex())
    }
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
    #[error(
        "manifest version {0} is not supported (this build reads {OLDEST_MANIFEST_VERSION} to {MANIFEST_VERSION})"
    )]
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
    /// The machine's state: device state, RAM, disk.
    pub fn parts(&self) -> [(&'static str, &Part); 3] {
        [("state", &self.state), ("memory", &self.memory), ("disk", &self.disk)]
    }

    /// Every part, the boot files' included.
    pub fn all_parts(&self) -> Vec<(&'static str, &Part)> {
        let mut all = self.parts().to_vec();
        if let Some(boot) = &self.boot {
            all.push(("kernel", &boot.kernel));
            all.push(("initrd", &boot.initrd));
        }
        all
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
        if !(OLDEST_MANIFEST_VERSION as u64..=MANIFEST_VERSION as u64).contains(&version) {
            return Err(ManifestError::Version(version.min(u32::MAX as u64) as u32));
        }
        let mut m: Manifest = serde_json::from_slice(&json).map_err(|e| ManifestError::Parse(e.to_string()))?;
        if m.version == 1 {
            // Version 1 had no such field: whatever claims to be one names chunks the old way
            // (a sealed reader turns this into `Sealed`).
            m.chunk_names = ChunkNames::Blake3;
        }
        for (name, part) in m.all_parts() {
            part.check(name)?;
        }
        Ok(m)
    }

    /// Every distinct chunk the manifest needs.
    pub fn chunk_set(&self) -> std::collections::HashSet<ChunkHash> {
        self.all_parts().iter().flat_map(|(_, p)| p.stored_chunks()).collect()
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
            chunk_names: ChunkNames::Blake3,
            boot: None,
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

    #[test]
    fn version_1_manifests_read_with_plain_names_whatever_they_claim() {
        let mut m = sample();
        m.chunk_names = ChunkNames::TenantKeyed;
        assert_eq!(
            Manifest::decode(&m.encode()).unwrap().chunk_names,
            ChunkNames::TenantKeyed
        );
        m.version = 1;
        let old = Manifest::decode(&m.encode()).unwrap();
        assert_eq!(old.chunk_names, ChunkNames::Blake3);
        // As an older build wrote it: no field at all.
        let mut json = serde_json::to_value(&m).unwrap();
        json.as_object_mut().unwrap().remove("chunk_names");
        let bytes = zstd::bulk::compress(&serde_json::to_vec(&json).unwrap(), 3).unwrap();
        assert_eq!(Manifest::decode(&bytes).unwrap().chunk_names, ChunkNames::Blake3);
        let h = ManifestHash::of(b"x");
        assert_eq!(ManifestHash::from_hex(&h.to_hex()), Some(h));
        assert_eq!(ManifestHash::from_hex("zz"), None);
    }
}
