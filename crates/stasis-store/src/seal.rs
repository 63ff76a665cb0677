//! Encryption at rest (only when the operator gives a master key; without one nothing here is
//! used and the store is exactly as it always was).
//!
//! Every tenant has its own random 32-byte data key, kept by the caller (the server keeps it
//! in its database) wrapped by the operator's master key. From a data key come three subkeys
//! (BLAKE3 `derive_key`): one names chunks, one seals chunks, one seals manifests.
//!
//! ```text
//! chunk name       BLAKE3 keyed hash of the raw chunk (names key): identical data of two
//!                  tenants gets two names, so nothing is shared and nothing can be confirmed
//! sealed chunk     "STCE" 1 | nonce (24) | XChaCha20-Poly1305(chunk key, the plaintext chunk
//!                  object of `chunk::encode`), associated data "STCE" 1 + the chunk's name
//! sealed manifest  "STME" 1 | tenant id length (u16 LE) | tenant id | nonce (24)
//!                  | XChaCha20-Poly1305(manifest key, the plaintext manifest object),
//!                  associated data: everything before the nonce + the snapshot id
//! wrapped data key "STWK" 1 | nonce (24) | XChaCha20-Poly1305(master key, data key),
//!                  associated data "STWK" 1 + the tenant id
//! ```
//!
//! Associated data binds each object to where it belongs: a chunk moved to another name, a
//! manifest moved to another snapshot or claimed for another tenant, a data key moved to
//! another tenant all fail to open. Nonces are random (192 bits: no counter to keep).

use std::sync::Arc;

use chacha20poly1305::aead::{Aead, AeadCore, KeyInit, OsRng, Payload};
use chacha20poly1305::{XChaCha20Poly1305, XNonce};
use futures::future::BoxFuture;

use crate::chunk::{self, ChunkError, ChunkHash};
use crate::manifest::{Manifest, ManifestError, MAX_MANIFEST_BYTES};
use crate::StoreError;

const CHUNK_MAGIC: &[u8; 4] = b"STCE";
const MANIFEST_MAGIC: &[u8; 4] = b"STME";
const WRAP_MAGIC: &[u8; 4] = b"STWK";
const VERSION: u8 = 1;
const NONCE_LEN: usize = 24;
const TAG_LEN: usize = 16;
/// What sealing adds to a chunk object: magic, version, nonce, tag.
pub const CHUNK_OVERHEAD: usize = 4 + 1 + NONCE_LEN + TAG_LEN;

/// The most a stored chunk of a part with chunks of `chunk_size` bytes can take, plaintext or
/// sealed: an object larger than this is refused unread.
pub fn max_stored_len(chunk_size: u32) -> u64 {
    chunk::max_encoded_len(chunk_size) + CHUNK_OVERHEAD as u64
}

/// Longest tenant id a sealed manifest header may carry.
const MAX_TENANT_LEN: usize = 256;

/// Where the keys come from: the store asks for a tenant's key when it seals or opens that
/// tenant's objects.
pub trait Keyring: Send + Sync {
    /// The tenant's key. `create`: make (and keep) one if the tenant has none yet; otherwise a
    /// tenant without a key is an error.
    fn tenant_key<'a>(&'a self, tenant: &'a str, create: bool) -> BoxFuture<'a, Result<Arc<TenantKey>, StoreError>>;
}

/// The operator's master key. It only wraps and unwraps tenants' data keys.
#[derive(Clone)]
pub struct MasterKey([u8; 32]);

impl std::fmt::Debug for MasterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "MasterKey({})", self.id())
    }
}

/// A master key file that is not 64 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("a master key is 64 hex digits (32 bytes), e.g. from `openssl rand -hex 32`; this is {chars} characters{}", if *all_hex { "" } else { ", not all hex digits" })]
pub struct BadMasterKey {
    pub chars: usize,
    pub all_hex: bool,
}

impl MasterKey {
    pub fn from_bytes(bytes: [u8; 32]) -> MasterKey {
        MasterKey(bytes)
    }

    /// A key file's contents: 64 hex digits (surrounding whitespace ignored).
    pub fn from_hex(text: &str) -> Result<MasterKey, BadMasterKey> {
        let text = text.trim();
        let mut key = [0u8; 32];
        if text.len() != 64 || hex::decode_to_slice(text, &mut key).is_err() {
            return Err(BadMasterKey {
                chars: text.len(),
                all_hex: text.bytes().all(|b| b.is_ascii_hexdigit()),
            });
        }
        Ok(MasterKey(key))
    }

    /// A public fingerprint (16 hex digits): tells which master key wrapped a data key
    /// without revealing anything about it.
    pub fn id(&self) -> String {
        hex::encode(&blake3::derive_key("stasis 2026 master key id v1", &self.0)[..8])
    }

    fn cipher(&self) -> XChaCha20Poly1305 {
        XChaCha20Poly1305::new((&self.0).into())
    }

    /// A fresh random data key for `tenant`: the key, and its wrapped form to keep.
    pub fn new_data_key(&self, tenant: &str) -> (TenantKey, Vec<u8>) {
        let data_key: [u8; 32] = XChaCha20Poly1305::generate_key(&mut OsRng).into();
        let wrapped = self.wrap(tenant, &data_key);
        (TenantKey::from_data_key(tenant, &data_key), wrapped)
    }

    pub fn wrap(&self, tenant: &str, data_key: &[u8; 32]) -> Vec<u8> {
        let header = [&WRAP_MAGIC[..], &[VERSION]].concat();
        seal(
            &self.cipher(),
            &header,
            &[&header[..], tenant.as_bytes()].concat(),
            data_key,
        )
    }

    /// Opens a wrapped data key; `None` when this master key did not wrap it for this tenant
    /// (another master key, another tenant, or modified).
    pub fn unwrap(&self, tenant: &str, wrapped: &[u8]) -> Option<TenantKey> {
        let header = [&WRAP_MAGIC[..], &[VERSION]].concat();
        let body = wrapped.strip_prefix(&header[..])?;
        let key = open(&self.cipher(), body, &[&header[..], tenant.as_bytes()].concat())?;
        let key: [u8; 32] = key.try_into().ok()?;
        Some(TenantKey::from_data_key(tenant, &key))
    }
}

/// One tenant's keys, derived from its data key.
pub struct TenantKey {
    tenant: String,
    names: [u8; 32],
    chunks: XChaCha20Poly1305,
    manifests: XChaCha20Poly1305,
}

impl std::fmt::Debug for TenantKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "TenantKey({})", self.tenant)
    }
}

impl TenantKey {
    pub fn from_data_key(tenant: &str, data_key: &[u8; 32]) -> TenantKey {
        let sub = |context: &str| blake3::derive_key(context, data_key);
        TenantKey {
            tenant: tenant.to_string(),
            names: sub("stasis 2026 chunk names v1"),
            chunks: XChaCha20Poly1305::new((&sub("stasis 2026 chunk sealing v1")).into()),
            manifests: XChaCha20Poly1305::new((&sub("stasis 2026 manifest sealing v1")).into()),
        }
    }

    pub fn tenant(&self) -> &str {
        &self.tenant
    }

    /// The name of a raw chunk in this tenant's store.
    pub fn chunk_name(&self, raw: &[u8]) -> ChunkHash {
        ChunkHash(*blake3::keyed_hash(&self.names, raw).as_bytes())
    }

    /// Compresses and seals a raw chunk named `name` (see [`TenantKey::chunk_name`]).
    pub fn seal_chunk(&self, name: ChunkHash, raw: &[u8], level: i32) -> Vec<u8> {
        let header = [&CHUNK_MAGIC[..], &[VERSION]].concat();
        let aad = [&header[..], &name.0].concat();
        seal(&self.chunks, &header, &aad, &chunk::encode(raw, level))
    }

    /// Opens a sealed chunk and checks it is exactly the chunk named `name`.
    pub fn open_chunk(&self, stored: &[u8], name: ChunkHash) -> Result<Vec<u8>, ChunkError> {
        let body = sealed_body(stored, CHUNK_MAGIC)?;
        let header = [&CHUNK_MAGIC[..], &[VERSION]].concat();
        let inner = open(&self.chunks, body, &[&header[..], &name.0].concat()).ok_or(ChunkError::Authentication)?;
        chunk::decode_with(&inner, name, |raw| self.chunk_name(raw))
    }

    /// Seals a manifest (of this tenant) for the store.
    pub fn seal_manifest(&self, manifest: &Manifest) -> Vec<u8> {
        let header = manifest_header(&self.tenant);
        let aad = [&header[..], manifest.snapshot_id.as_bytes()].concat();
        seal(&self.manifests, &header, &aad, &manifest.encode())
    }

    /// Opens a sealed manifest that should be snapshot `snapshot_id`'s.
    pub fn open_manifest(&self, stored: &[u8], snapshot_id: &str) -> Result<Manifest, ManifestError> {
        let (tenant, body) = parse_manifest_header(stored)?.ok_or(ManifestError::Parse("not sealed".into()))?;
        if tenant != self.tenant {
            return Err(ManifestError::Parse(format!("sealed for tenant {tenant}")));
        }
        let header = &stored[..stored.len() - body.len()];
        let aad = [header, snapshot_id.as_bytes()].concat();
        let inner = open(&self.manifests, body, &aad).ok_or(ManifestError::Authentication)?;
        let m = Manifest::decode(&inner)?;
        if m.tenant_id != self.tenant {
            return Err(ManifestError::Parse(format!("it names tenant {}", m.tenant_id)));
        }
        Ok(m)
    }
}

fn manifest_header(tenant: &str) -> Vec<u8> {
    let mut h = Vec::with_capacity(7 + tenant.len());
    h.extend_from_slice(MANIFEST_MAGIC);
    h.push(VERSION);
    h.extend_from_slice(&(tenant.len() as u16).to_le_bytes());
    h.extend_from_slice(tenant.as_bytes());
    h
}

/// Whether a stored manifest is sealed: `Ok(None)` for a plaintext one; for a sealed one, the
/// tenant whose key opens it, and the rest (nonce and ciphertext).
pub fn parse_manifest_header(stored: &[u8]) -> Result<Option<(&str, &[u8])>, ManifestError> {
    let Some(rest) = stored.strip_prefix(&MANIFEST_MAGIC[..]) else {
        return Ok(None);
    };
    let bad = |why: &str| ManifestError::Parse(format!("sealed manifest header: {why}"));
    match rest.first() {
        Some(&VERSION) => {}
        Some(&v) => return Err(bad(&format!("unsupported version {v}"))),
        None => return Err(bad("truncated")),
    }
    let len = rest.get(1..3).ok_or_else(|| bad("truncated"))?;
    let len = u16::from_le_bytes([len[0], len[1]]) as usize;
    if len == 0 || len > MAX_TENANT_LEN {
        return Err(bad("bad tenant id length"));
    }
    let tenant = rest.get(3..3 + len).ok_or_else(|| bad("truncated"))?;
    let tenant = std::str::from_utf8(tenant).map_err(|_| bad("tenant id is not UTF-8"))?;
    let body = &rest[3 + len..];
    if body.len() < NONCE_LEN + TAG_LEN {
        return Err(bad("truncated"));
    }
    if body.len() > MAX_MANIFEST_BYTES {
        return Err(ManifestError::TooLarge);
    }
    Ok(Some((tenant, body)))
}

/// Whether a stored chunk object is sealed (rather than a plaintext chunk).
pub fn is_sealed_chunk(stored: &[u8]) -> bool {
    stored.starts_with(CHUNK_MAGIC)
}

fn sealed_body<'a>(stored: &'a [u8], magic: &[u8; 4]) -> Result<&'a [u8], ChunkError> {
    let rest = stored.strip_prefix(&magic[..]).ok_or(ChunkError::Header)?;
    match rest.first() {
        Some(&VERSION) => {}
        Some(&v) => return Err(ChunkError::Format(v)),
        None => return Err(ChunkError::Header),
    }
    let body = &rest[1..];
    if body.len() < NONCE_LEN + TAG_LEN || body.len() > chunk::MAX_CHUNK_SIZE * 2 {
        return Err(ChunkError::Length(body.len()));
    }
    Ok(body)
}

/// `header | nonce | ciphertext`.
fn seal(cipher: &XChaCha20Poly1305, header: &[u8], aad: &[u8], plaintext: &[u8]) -> Vec<u8> {
    let nonce = XChaCha20Poly1305::generate_nonce(&mut OsRng);
    let sealed = cipher
        .encrypt(&nonce, Payload { msg: plaintext, aad })
        .expect("XChaCha20-Poly1305 seals any input of sane size");
    let mut out = Vec::with_capacity(header.len() + NONCE_LEN + sealed.len());
    out.extend_from_slice(header);
    out.extend_from_slice(&nonce);
    out.extend_from_slice(&sealed);
    out
}

/// Opens `nonce | ciphertext`; `None` when it does not authenticate.
fn open(cipher: &XChaCha20Poly1305, body: &[u8], aad: &[u8]) -> Option<Vec<u8>> {
    if body.len() < NONCE_LEN + TAG_LEN {
        return None;
    }
    let (nonce, sealed) = body.split_at(NONCE_LEN);
    cipher
        .decrypt(XNonce::from_slice(nonce), Payload { msg: sealed, aad })
        .ok()
}

/// Keys kept in memory, made on demand (tests, benchmarks, tools).
#[derive(Default)]
pub struct MemoryKeyring {
    keys: std::sync::Mutex<std::collections::HashMap<String, Arc<TenantKey>>>,
}

impl MemoryKeyring {
    pub fn insert(&self, key: TenantKey) {
        self.keys
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(key.tenant.clone(), Arc::new(key));
    }
}

impl Keyring for MemoryKeyring {
    fn tenant_key<'a>(&'a self, tenant: &'a str, create: bool) -> BoxFuture<'a, Result<Arc<TenantKey>, StoreError>> {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        let got = match keys.get(tenant) {
            Some(k) => Ok(k.clone()),
            None if create => {
                let data_key: [u8; 32] = XChaCha20Poly1305::generate_key(&mut OsRng).into();
                let k = Arc::new(TenantKey::from_data_key(tenant, &data_key));
                keys.insert(tenant.to_string(), k.clone());
                Ok(k)
            }
            None => Err(StoreError::Key(format!("tenant {tenant} has no data key"))),
        };
        Box::pin(std::future::ready(got))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(tenant: &str, byte: u8) -> TenantKey {
        TenantKey::from_data_key(tenant, &[byte; 32])
    }

    #[test]
    fn master_keys_wrap_data_keys_for_one_tenant_only() {
        let master = MasterKey::from_hex(&"ab".repeat(32)).unwrap();
        let (k, wrapped) = master.new_data_key("t1");
        let opened = master.unwrap("t1", &wrapped).expect("opens");
        assert_eq!(opened.chunk_name(b"x"), k.chunk_name(b"x"));
        assert!(master.unwrap("t2", &wrapped).is_none(), "bound to its tenant");
        let other = MasterKey::from_bytes([1; 32]);
        assert!(other.unwrap("t1", &wrapped).is_none(), "another master key");
        assert_ne!(other.id(), master.id());
        let mut flipped = wrapped.clone();
        flipped[10] ^= 1;
        assert!(master.unwrap("t1", &flipped).is_none());
        assert!(master.unwrap("t1", &wrapped[..20]).is_none());
        // Key files.
        assert!(MasterKey::from_hex(&format!("  {}\n", "0f".repeat(32))).is_ok());
        assert!(MasterKey::from_hex("abc")
            .unwrap_err()
            .to_string()
            .contains("64 hex digits"));
        assert!(MasterKey::from_hex(&"zz".repeat(32))
            .unwrap_err()
            .to_string()
            .contains("not all hex"));
        assert!(!format!("{master:?}").contains("abab"), "Debug shows the id only");
    }

    #[test]
    fn sealed_chunks_round_trip_and_detect_tampering_and_other_keys() {
        let k = key("t", 1);
        let raw: Vec<u8> = (0..50_000u32).map(|i| (i % 253) as u8).collect();
        let name = k.chunk_name(&raw);
        assert_ne!(name, ChunkHash::of(&raw), "names are keyed");
        let stored = k.seal_chunk(name, &raw, 3);
        assert!(is_sealed_chunk(&stored));
        assert_eq!(k.open_chunk(&stored, name).unwrap(), raw);
        // Every byte after the header matters.
        for at in [5, 20, 40, stored.len() / 2, stored.len() - 1] {
            let mut bad = stored.clone();
            bad[at] ^= 0x01;
            assert_eq!(k.open_chunk(&bad, name), Err(ChunkError::Authentication), "byte {at}");
        }
        // Under another name (a swapped chunk), with another tenant's key.
        assert_eq!(
            k.open_chunk(&stored, k.chunk_name(b"other")),
            Err(ChunkError::Authentication)
        );
        assert_eq!(key("u", 2).open_chunk(&stored, name), Err(ChunkError::Authentication));
        // Garbage is refused, never a panic.
        assert_eq!(k.open_chunk(b"STCE", name), Err(ChunkError::Header));
        assert!(k.open_chunk(b"STCE\x01short", name).is_err());
        assert_eq!(
            k.open_chunk(b"STCE\x07aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", name),
            Err(ChunkError::Format(7))
        );
        assert_eq!(
            k.open_chunk(&crate::chunk::encode(&raw, 3), name),
            Err(ChunkError::Header)
        );
    }

    #[test]
    fn two_tenants_name_and_seal_the_same_data_differently() {
        let (a, b) = (key("a", 1), key("b", 2));
        let raw = vec![42u8; 10_000];
        assert_ne!(a.chunk_name(&raw), b.chunk_name(&raw));
        assert_eq!(
            a.chunk_name(&raw),
            key("a", 1).chunk_name(&raw),
            "stable within a tenant"
        );
        let (sa, sb) = (
            a.seal_chunk(a.chunk_name(&raw), &raw, 3),
            b.seal_chunk(b.chunk_name(&raw), &raw, 3),
        );
        assert_ne!(sa, sb);
        // Sealing twice gives different bytes (random nonces) that open the same.
        let again = a.seal_chunk(a.chunk_name(&raw), &raw, 3);
        assert_ne!(sa, again);
        assert_eq!(a.open_chunk(&again, a.chunk_name(&raw)).unwrap(), raw);
    }

    #[test]
    fn sealed_manifests_round_trip_and_are_bound_to_their_snapshot_and_tenant() {
        let mut m = crate::manifest::tests::sample();
        m.tenant_id = "t".into();
        let k = key("t", 1);
        let stored = k.seal_manifest(&m);
        let (tenant, _) = parse_manifest_header(&stored).unwrap().unwrap();
        assert_eq!(tenant, "t");
        assert_eq!(k.open_manifest(&stored, "s").unwrap(), m);
        assert!(matches!(
            k.open_manifest(&stored, "other"),
            Err(ManifestError::Authentication)
        ));
        assert!(matches!(
            key("t", 2).open_manifest(&stored, "s"),
            Err(ManifestError::Authentication)
        ));
        let mut bad = stored.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0x80;
        assert!(matches!(k.open_manifest(&bad, "s"), Err(ManifestError::Authentication)));
        // Claimed for another tenant in the header: that tenant's key is refused up front.
        assert!(key("u", 1).open_manifest(&stored, "s").is_err());
        // Plaintext manifests are told apart; broken headers are errors.
        assert!(parse_manifest_header(&m.encode()).unwrap().is_none());
        assert!(parse_manifest_header(b"STME").is_err());
        assert!(parse_manifest_header(b"STME\x01\xff\xff").is_err());
        assert!(parse_manifest_header(b"STME\x01\x01\x00t").is_err());
    }
}
