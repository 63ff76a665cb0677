//! Manifest I/O: writing a snapshot's manifest (sealed when the store is encrypted), and
//! reading one back, refused as tampering unless it agrees with what the platform recorded of
//! the snapshot. The manifest's types are in `manifest`.

use object_store::path::Path as ObjectPath;
use object_store::PutPayload;
use stasis_types::{SnapshotId, TenantId};

use crate::error::{modified, unauthentic};
use crate::manifest::{self, ChunkNames, Manifest, ManifestError, ManifestHash};
use crate::{read_bounded, seal, SnapshotStore, StoreError};

/// What the platform's database says about a stored snapshot (kept where whoever can write
/// to the store cannot change it). Every manifest read for a restore or a collection must
/// agree with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub snapshot_id: SnapshotId,
    /// The tenant it belongs to: its manifest must name this tenant, and this tenant's key
    /// opens its chunks.
    pub tenant_id: TenantId,
    /// Stored encrypted: an unencrypted manifest in its place is refused.
    pub sealed: bool,
    /// BLAKE3 of the manifest object as written. `None` for snapshots taken before it was
    /// recorded: those are accepted as they are found (there is nothing to check them by).
    pub manifest_hash: Option<ManifestHash>,
}

/// A manifest as written: its size and hash (for the platform to record).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StoredManifest {
    pub bytes: u64,
    pub hash: ManifestHash,
}

impl SnapshotStore {
    /// Where the manifest of snapshot `id` is kept, inside the store.
    pub fn manifest_key(id: SnapshotId) -> String {
        Self::manifest_key_of(&id.to_string())
    }

    /// Where a manifest naming snapshot `id` (as the manifest spells it) is kept.
    fn manifest_key_of(id: &str) -> String {
        format!("snapshots/{id}/manifest.zst")
    }

    /// Writes the manifest (sealed with its tenant's key if the store is encrypted); the
    /// snapshot exists in the store from this moment. Returns what the platform records to
    /// check it by later.
    pub async fn put_manifest(&self, manifest: &Manifest) -> Result<StoredManifest, StoreError> {
        if manifest.chunk_names != self.chunk_names() {
            // Readers verify chunks the way the manifest says: a wrong claim would make the
            // snapshot unreadable.
            return Err(StoreError::Config(format!(
                "the manifest of snapshot {} says its chunks are named {}, but this store names them {}",
                manifest.snapshot_id,
                manifest.chunk_names.as_str(),
                self.chunk_names().as_str()
            )));
        }
        let bytes = match self.tenant_key(&manifest.tenant_id, true).await? {
            Some(key) => key.seal_manifest(manifest),
            None => manifest.encode(),
        };
        let stored = StoredManifest {
            bytes: bytes.len() as u64,
            hash: ManifestHash::of(&bytes),
        };
        self.store
            .put(
                &ObjectPath::from(Self::manifest_key_of(&manifest.snapshot_id)),
                PutPayload::from(bytes),
            )
            .await?;
        Ok(stored)
    }

    /// Reads a manifest checking only that it is well formed: for tools and tests that
    /// inspect a store. The platform reads through [`SnapshotStore::get_manifest_of`].
    pub async fn get_manifest(&self, snapshot_id: SnapshotId) -> Result<Manifest, StoreError> {
        let snapshot_id = snapshot_id.to_string();
        let snapshot_id = snapshot_id.as_str();
        let bytes = self.manifest_bytes(snapshot_id).await?;
        let bad = |source| StoreError::Manifest {
            id: snapshot_id.into(),
            source,
        };
        let tenant = match seal::parse_manifest_header(&bytes).map_err(bad)? {
            Some((tenant, _)) => tenant.to_string(),
            None => Manifest::decode(&bytes).map_err(bad)?.tenant_id,
        };
        self.open_manifest(snapshot_id, &tenant, &bytes).await
    }

    /// Reads the manifest of a snapshot the platform recorded as `recorded`, refusing as
    /// tampering one that is not the object written when it was taken (by its hash), one
    /// unencrypted in place of a sealed one, or one that names another tenant. Whoever can
    /// write to the store can then neither change a snapshot nor make a restore open another
    /// tenant's chunks.
    pub async fn get_manifest_of(&self, recorded: &Recorded) -> Result<Manifest, StoreError> {
        let (id, expected) = (recorded.snapshot_id.to_string(), recorded.tenant_id.to_string());
        let (id, expected) = (id.as_str(), expected.as_str());
        let bytes = self.manifest_bytes(id).await?;
        let header =
            seal::parse_manifest_header(&bytes).map_err(|source| StoreError::Manifest { id: id.into(), source })?;
        let found = header.as_ref().map(|(tenant, _)| *tenant);
        match found {
            None if recorded.sealed => {
                return Err(unauthentic(
                    id,
                    format!("the manifest of snapshot {id} (stored encrypted, found unencrypted)"),
                ))
            }
            Some(other) if other != expected => {
                return Err(unauthentic(
                    id,
                    format!("the manifest of snapshot {id} (stored for tenant {expected}, found sealed for {other})"),
                ))
            }
            _ => {}
        }
        if let Some(hash) = recorded.manifest_hash {
            if ManifestHash::of(&bytes) != hash {
                return Err(modified(
                    id,
                    "does not match the one recorded when it was taken".to_string(),
                ));
            }
        }
        self.open_manifest(id, expected, &bytes).await
    }

    /// The stored manifest object, refused unread when it is too large.
    async fn manifest_bytes(&self, snapshot_id: &str) -> Result<Vec<u8>, StoreError> {
        let key = ObjectPath::from(Self::manifest_key_of(snapshot_id));
        let got = match self.store.get(&key).await {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => return Err(StoreError::MissingManifest(snapshot_id.into())),
            Err(e) => return Err(e.into()),
        };
        read_bounded(got, manifest::MAX_MANIFEST_BYTES as u64)
            .await?
            .map(|b| b.as_ref().to_vec())
            .map_err(|_| StoreError::Manifest {
                id: snapshot_id.into(),
                source: ManifestError::TooLarge,
            })
    }

    /// Decodes (opening with `tenant`'s key, if sealed) a manifest that must be `tenant`'s
    /// snapshot `snapshot_id`, naming its chunks the way its form allows.
    async fn open_manifest(&self, snapshot_id: &str, tenant: &str, bytes: &[u8]) -> Result<Manifest, StoreError> {
        let bad = |source| StoreError::Manifest {
            id: snapshot_id.into(),
            source,
        };
        let sealed = seal::parse_manifest_header(bytes).map_err(bad)?.is_some();
        let mut m = if sealed {
            let Some(key) = self.tenant_key(tenant, false).await? else {
                return Err(StoreError::Encrypted {
                    snapshot: snapshot_id.to_string(),
                });
            };
            key.open_manifest(bytes, snapshot_id).map_err(|e| match e {
                ManifestError::Authentication => {
                    unauthentic(snapshot_id, format!("the manifest of snapshot {snapshot_id}"))
                }
                e => bad(e),
            })?
        } else {
            Manifest::decode(bytes).map_err(bad)?
        };
        if m.snapshot_id != snapshot_id {
            return Err(bad(ManifestError::Parse(format!(
                "it names snapshot {}",
                m.snapshot_id
            ))));
        }
        if m.tenant_id != tenant {
            return Err(modified(
                snapshot_id,
                format!("names tenant {}, but the snapshot is tenant {tenant}'s", m.tenant_id),
            ));
        }
        match (sealed, m.chunk_names) {
            // Version 1 sealed manifests did not say: their chunks are sealed.
            (true, _) if m.version == 1 => m.chunk_names = ChunkNames::Sealed,
            (true, ChunkNames::Sealed) | (false, ChunkNames::Blake3 | ChunkNames::TenantKeyed) => {}
            (true, names) => {
                return Err(bad(ManifestError::Parse(format!(
                    "it is sealed but says its chunks are named {}",
                    names.as_str()
                ))))
            }
            (false, _) => {
                return Err(modified(
                    snapshot_id,
                    "is unencrypted but says its chunks are sealed".to_string(),
                ))
            }
        }
        Ok(m)
    }

    /// Deletes the manifest of snapshot `snapshot_id` (one already gone is no error).
    pub async fn delete_manifest(&self, snapshot_id: SnapshotId) -> Result<(), StoreError> {
        match self
            .store
            .delete(&ObjectPath::from(Self::manifest_key(snapshot_id)))
            .await
        {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}
