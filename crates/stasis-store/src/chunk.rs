//! A chunk: up to one part's `chunk_size` bytes, named by the BLAKE3 hash of its raw content,
//! stored zstd-compressed behind a small header. Decoding checks everything it can: header,
//! length, and that the content hashes to the name it was fetched by.

use serde::{Deserialize, Serialize};

/// `STCK` + format version.
const MAGIC: &[u8; 4] = b"STCK";
const FORMAT: u8 = 1;
const HEADER_LEN: usize = 4 + 1 + 3 + 4;
/// Largest raw chunk any part may use (a bound for decoding untrusted objects).
pub const MAX_CHUNK_SIZE: usize = 16 * 1024 * 1024;

/// BLAKE3 of a chunk's raw bytes.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChunkHash(pub [u8; 32]);

impl ChunkHash {
    pub fn of(data: &[u8]) -> ChunkHash {
        ChunkHash(*blake3::hash(data).as_bytes())
    }

    pub fn to_hex(self) -> String {
        hex::encode(self.0)
    }

    pub fn from_hex(s: &str) -> Option<ChunkHash> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).ok()?;
        Some(ChunkHash(out))
    }

    /// Object key: `chunks/ab/abcd…`.
    pub fn key(self) -> String {
        let h = self.to_hex();
        format!("chunks/{}/{}", &h[..2], h)
    }
}

impl std::fmt::Debug for ChunkHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "ChunkHash({})", &self.to_hex()[..16])
    }
}

impl std::fmt::Display for ChunkHash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl Serialize for ChunkHash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for ChunkHash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        ChunkHash::from_hex(&s).ok_or_else(|| serde::de::Error::custom("a chunk hash is 64 hex digits"))
    }
}

/// Compresses a raw chunk into its stored form.
pub fn encode(raw: &[u8], level: i32) -> Vec<u8> {
    let compressed = zstd::bulk::compress(raw, level).expect("zstd compresses any input");
    let mut out = Vec::with_capacity(HEADER_LEN + compressed.len());
    out.extend_from_slice(MAGIC);
    out.push(FORMAT);
    out.extend_from_slice(&[0, 0, 0]);
    out.extend_from_slice(&(raw.len() as u32).to_le_bytes());
    out.extend_from_slice(&compressed);
    out
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ChunkError {
    #[error("not a chunk object (bad header)")]
    Header,
    #[error("unsupported chunk format {0}")]
    Format(u8),
    #[error("declared length {0} is out of bounds")]
    Length(usize),
    #[error("cannot decompress: {0}")]
    Decompress(String),
    #[error("content hashes to {actual}, not to its name")]
    HashMismatch { actual: String },
    #[error("it failed authentication: it was modified in the store, or the master key is wrong")]
    Authentication,
    /// Refused from the object's size, before its body is read.
    #[error("the object is {size} bytes, more than the {max} a chunk of its part can take")]
    TooLarge { size: u64, max: u64 },
}

/// The most an encoded (plaintext) chunk of up to `chunk_size` raw bytes can take.
pub fn max_encoded_len(chunk_size: u32) -> u64 {
    let raw = (chunk_size as usize).min(MAX_CHUNK_SIZE);
    (zstd::zstd_safe::compress_bound(raw) + HEADER_LEN) as u64
}

/// Decodes a stored chunk and checks it is exactly the chunk named `expected`.
pub fn decode(stored: &[u8], expected: ChunkHash) -> Result<Vec<u8>, ChunkError> {
    decode_with(stored, expected, ChunkHash::of)
}

/// [`decode`], for chunks named by another function of their content (sealed chunks).
pub fn decode_with(
    stored: &[u8],
    expected: ChunkHash,
    name: impl Fn(&[u8]) -> ChunkHash,
) -> Result<Vec<u8>, ChunkError> {
    if stored.len() < HEADER_LEN || &stored[..4] != MAGIC {
        return Err(ChunkError::Header);
    }
    if stored[4] != FORMAT {
        return Err(ChunkError::Format(stored[4]));
    }
    let len = u32::from_le_bytes(stored[8..12].try_into().expect("4 bytes")) as usize;
    if len == 0 || len > MAX_CHUNK_SIZE {
        return Err(ChunkError::Length(len));
    }
    let raw = zstd::bulk::decompress(&stored[HEADER_LEN..], len).map_err(|e| ChunkError::Decompress(e.to_string()))?;
    if raw.len() != len {
        return Err(ChunkError::Length(raw.len()));
    }
    let actual = name(&raw);
    if actual != expected {
        return Err(ChunkError::HashMismatch {
            actual: actual.to_hex(),
        });
    }
    Ok(raw)
}

/// Whether every byte is zero (such chunks are never stored).
pub fn is_zero(data: &[u8]) -> bool {
    let (prefix, words, suffix) = {
        // SAFETY: u64 has no invalid bit patterns; align_to only reinterprets aligned middles.
        unsafe { data.align_to::<u64>() }
    };
    prefix.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0) && suffix.iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_verifies() {
        let raw: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let h = ChunkHash::of(&raw);
        let stored = encode(&raw, 3);
        assert!(stored.len() < raw.len());
        assert_eq!(decode(&stored, h).unwrap(), raw);
        assert!(h.key().starts_with(&format!("chunks/{}/", &h.to_hex()[..2])));
        assert_eq!(ChunkHash::from_hex(&h.to_hex()), Some(h));
    }

    #[test]
    fn tampering_is_detected() {
        let raw = vec![7u8; 4096];
        let h = ChunkHash::of(&raw);
        let mut stored = encode(&raw, 3);
        // The wrong name.
        assert!(matches!(
            decode(&stored, ChunkHash::of(b"other")),
            Err(ChunkError::HashMismatch { .. })
        ));
        // A flipped byte in the compressed body.
        let last = stored.len() - 1;
        stored[last] ^= 0xff;
        assert!(decode(&stored, h).is_err());
        // A bad header, a lying length.
        assert_eq!(decode(b"nope", h), Err(ChunkError::Header));
        let mut lying = encode(&raw, 3);
        lying[8..12].copy_from_slice(&(u32::MAX).to_le_bytes());
        assert!(matches!(decode(&lying, h), Err(ChunkError::Length(_))));
    }

    #[test]
    fn the_stored_bound_holds_for_incompressible_chunks() {
        let raw: Vec<u8> = (0..65_536u32)
            .map(|i| (i.wrapping_mul(2654435761) >> 7) as u8)
            .collect();
        assert!(encode(&raw, 19).len() as u64 <= max_encoded_len(65_536));
        assert!(max_encoded_len(u32::MAX) < 2 * MAX_CHUNK_SIZE as u64);
    }

    #[test]
    fn zero_detection() {
        assert!(is_zero(&vec![0u8; 8193]));
        let mut v = vec![0u8; 8193];
        v[8192] = 1;
        assert!(!is_zero(&v));
        v[8192] = 0;
        v[3] = 1;
        assert!(!is_zero(&v));
        assert!(is_zero(&[]));
    }
}
