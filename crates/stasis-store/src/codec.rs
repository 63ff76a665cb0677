//! How one tenant's chunks are named, stored and opened, and the keys that choose it.

use std::sync::Arc;

use crate::chunk::{self, ChunkError, ChunkHash};
use crate::manifest::ChunkNames;
use crate::naming::NamingKey;
use crate::seal::TenantKey;
use crate::{SnapshotStore, StoreError, COMPRESSION_LEVEL};

/// How one tenant's chunks are named, stored and opened.
#[derive(Clone)]
pub(crate) enum Codec {
    Plain,
    Keyed(Arc<NamingKey>),
    Sealed(Arc<TenantKey>),
}

impl Codec {
    pub(crate) fn name(&self, raw: &[u8]) -> ChunkHash {
        match self {
            Codec::Plain => ChunkHash::of(raw),
            Codec::Keyed(k) => k.chunk_name(raw),
            Codec::Sealed(k) => k.chunk_name(raw),
        }
    }

    pub(crate) fn encode(&self, name: ChunkHash, raw: &[u8]) -> Vec<u8> {
        match self {
            Codec::Plain | Codec::Keyed(_) => chunk::encode(raw, COMPRESSION_LEVEL),
            Codec::Sealed(k) => k.seal_chunk(name, raw, COMPRESSION_LEVEL),
        }
    }

    /// A sealed object under a plaintext naming (or the reverse) fails here: the form of
    /// the chunks follows the manifest, never the bytes of the object.
    pub(crate) fn open(&self, stored: &[u8], name: ChunkHash) -> Result<Vec<u8>, ChunkError> {
        match self {
            Codec::Plain => chunk::decode(stored, name),
            Codec::Keyed(k) => chunk::decode_with(stored, name, |raw| k.chunk_name(raw)),
            Codec::Sealed(k) => k.open_chunk(stored, name),
        }
    }
}

impl SnapshotStore {
    /// How `tenant`'s chunks named `names` are handled; `snapshot` is for messages.
    pub(crate) async fn codec(
        &self,
        names: ChunkNames,
        tenant: &str,
        create: bool,
        snapshot: &str,
    ) -> Result<Codec, StoreError> {
        match names {
            ChunkNames::Blake3 => Ok(Codec::Plain),
            ChunkNames::TenantKeyed => match &self.naming {
                Some(n) => Ok(Codec::Keyed(n.naming_key(tenant, create).await?)),
                None => Err(StoreError::Config(format!(
                    "snapshot {snapshot} names its chunks with its tenant's naming key, and this store has no naming keys"
                ))),
            },
            ChunkNames::Sealed => match self.tenant_key(tenant, create).await? {
                Some(k) => Ok(Codec::Sealed(k)),
                None => Err(StoreError::Encrypted {
                    snapshot: snapshot.to_string(),
                }),
            },
        }
    }

    /// The tenant's key: made if the tenant has none yet when `create`.
    pub(crate) async fn tenant_key(&self, tenant: &str, create: bool) -> Result<Option<Arc<TenantKey>>, StoreError> {
        match &self.keyring {
            Some(k) => Ok(Some(k.tenant_key(tenant, create).await?)),
            None => Ok(None),
        }
    }
}
