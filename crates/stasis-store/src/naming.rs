//! Chunk names in an unencrypted store: BLAKE3 keyed per tenant, so two tenants' identical
//! data gets two names. Deduplication then never crosses tenants, and what an upload reports
//! (bytes uploaded, chunks reused) says nothing about what other tenants store.
//!
//! A tenant's naming key is derived from a random 32-byte salt the caller keeps (the server
//! keeps it in its database, made on first need). It is not a secret against the operator,
//! only against other tenants, who never see it.

use std::sync::Arc;

use futures::future::BoxFuture;

use crate::chunk::ChunkHash;
use crate::StoreError;

/// Where tenants' naming keys come from.
pub trait NamingKeys: Send + Sync {
    /// The tenant's key. `create`: make (and keep) one if the tenant has none yet (uploads);
    /// otherwise a tenant without one is an error (restores of its keyed snapshots).
    fn naming_key<'a>(&'a self, tenant: &'a str, create: bool) -> BoxFuture<'a, Result<Arc<NamingKey>, StoreError>>;
}

pub struct NamingKey([u8; 32]);

impl std::fmt::Debug for NamingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NamingKey(..)")
    }
}

impl NamingKey {
    pub fn from_salt(salt: &[u8; 32]) -> NamingKey {
        // Its own context: a naming key never equals any subkey of a data key.
        NamingKey(blake3::derive_key("stasis 2026 unencrypted chunk names v1", salt))
    }

    pub fn chunk_name(&self, raw: &[u8]) -> ChunkHash {
        ChunkHash(*blake3::keyed_hash(&self.0, raw).as_bytes())
    }
}

/// Naming keys kept in memory, made on demand (tests, benchmarks, tools).
#[derive(Default)]
pub struct MemoryNamingKeys {
    keys: std::sync::Mutex<std::collections::HashMap<String, Arc<NamingKey>>>,
}

impl NamingKeys for MemoryNamingKeys {
    fn naming_key<'a>(&'a self, tenant: &'a str, create: bool) -> BoxFuture<'a, Result<Arc<NamingKey>, StoreError>> {
        let mut keys = self.keys.lock().unwrap_or_else(|p| p.into_inner());
        let got = match keys.get(tenant) {
            Some(k) => Ok(k.clone()),
            None if create => {
                let k = Arc::new(NamingKey::from_salt(&new_salt()));
                keys.insert(tenant.to_string(), k.clone());
                Ok(k)
            }
            None => Err(StoreError::Key(format!("tenant {tenant} has no chunk naming key"))),
        };
        Box::pin(std::future::ready(got))
    }
}

/// A fresh random salt.
pub fn new_salt() -> [u8; 32] {
    use chacha20poly1305::aead::{KeyInit, OsRng};
    // A key generator is a CSPRNG draw of exactly 32 bytes.
    chacha20poly1305::XChaCha20Poly1305::generate_key(&mut OsRng).into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_keyed_per_salt_and_stable() {
        let (a, b) = (NamingKey::from_salt(&[1; 32]), NamingKey::from_salt(&[2; 32]));
        assert_ne!(a.chunk_name(b"data"), b.chunk_name(b"data"));
        assert_ne!(a.chunk_name(b"data"), ChunkHash::of(b"data"));
        assert_eq!(
            a.chunk_name(b"data"),
            NamingKey::from_salt(&[1; 32]).chunk_name(b"data")
        );
        assert_ne!(new_salt(), new_salt());
    }
}
