//! Encryption at rest (`serve --master-key-file`): the operator's master key, and tenants'
//! data keys kept in the database wrapped by it. The snapshot store asks this keyring for a
//! tenant's key whenever it seals or opens that tenant's chunks and manifests (uploads,
//! restores, garbage collection).
//!
//! Without encryption, tenants' chunk salts ([`ChunkSalts`]): chunk names are still keyed per
//! tenant, so deduplication never crosses tenants.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};

use futures::future::BoxFuture;
use stasis_store::{Keyring, MasterKey, NamingKey, NamingKeys, StoreError, TenantKey};

use crate::db::{Db, WrappedKey};

/// Reads a master key file: 64 hex digits. A file others can read is allowed, with a warning.
pub fn load_master_key(path: &Path) -> Result<MasterKey, crate::error::SetupError> {
    use crate::error::During;
    let text = std::fs::read_to_string(path).during(format!("reading the master key file {}", path.display()))?;
    let key = MasterKey::from_hex(&text).during(format!("the master key file {}", path.display()))?;
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path) {
            if meta.permissions().mode() & 0o077 != 0 {
                tracing::warn!(file = %path.display(), mode = format!("{:o}", meta.permissions().mode() & 0o777),
                    "the master key file is readable by others than its owner: chmod 600 it");
            }
        }
    }
    Ok(key)
}

/// A store error as this server's operator reads it: where the cure is one of `serve`'s
/// flags, the flag is named (the store speaks only of itself).
pub fn explain(e: &StoreError) -> String {
    match e {
        StoreError::Encrypted { snapshot } => {
            format!("snapshot {snapshot} is encrypted; start the server with its --master-key-file")
        }
        e => e.to_string(),
    }
}

/// Tenants' keys: unwrapped from the database on first use and kept in memory.
pub struct TenantKeys {
    db: Db,
    master: MasterKey,
    cache: Mutex<HashMap<String, Arc<TenantKey>>>,
}

impl TenantKeys {
    pub fn new(db: Db, master: MasterKey) -> TenantKeys {
        TenantKeys {
            db,
            master,
            cache: Mutex::new(HashMap::new()),
        }
    }

    pub fn master_key_id(&self) -> String {
        self.master.id()
    }

    async fn load(&self, tenant: &str, create: bool) -> Result<Arc<TenantKey>, StoreError> {
        if let Some(k) = self.cache.lock().unwrap_or_else(|p| p.into_inner()).get(tenant) {
            return Ok(k.clone());
        }
        let db_err = |e: sqlx::Error| StoreError::Key(format!("reading tenant {tenant}'s data key: {e}"));
        let mut kept = self.db.tenant_data_key(tenant).await.map_err(db_err)?;
        if kept.is_none() && create {
            let (_, wrapped) = self.master.new_data_key(tenant);
            let fresh = WrappedKey {
                wrapped,
                master_key_id: self.master.id(),
            };
            self.db
                .insert_tenant_data_key(tenant, &fresh)
                .await
                .map_err(|e| StoreError::Key(format!("keeping tenant {tenant}'s data key: {e}")))?;
            // Whichever key won a race is the tenant's.
            kept = self.db.tenant_data_key(tenant).await.map_err(db_err)?;
            if kept.as_ref().is_some_and(|k| k.wrapped == fresh.wrapped) {
                tracing::info!(tenant, "made the tenant's data key");
            }
        }
        let Some(kept) = kept else {
            return Err(StoreError::Key(format!(
                "tenant {tenant} has no data key, so none of its snapshots can be encrypted"
            )));
        };
        let key = self.master.unwrap(tenant, &kept.wrapped).ok_or_else(|| {
            if kept.master_key_id != self.master.id() {
                StoreError::Key(format!(
                    "the master key does not open tenant {tenant}'s data key: it was made with master key {}, \
                     this server has {} (wrong --master-key-file?)",
                    kept.master_key_id,
                    self.master.id()
                ))
            } else {
                StoreError::Key(format!(
                    "the master key does not open tenant {tenant}'s data key: the wrapped key failed authentication \
                     (modified in the database?)"
                ))
            }
        })?;
        let key = Arc::new(key);
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(tenant.to_string(), key.clone());
        Ok(key)
    }
}

impl Keyring for TenantKeys {
    fn tenant_key<'a>(&'a self, tenant: &'a str, create: bool) -> BoxFuture<'a, Result<Arc<TenantKey>, StoreError>> {
        Box::pin(self.load(tenant, create))
    }
}

/// Tenants' chunk naming keys (unencrypted stores), from salts in the database made on first
/// need; kept in memory once read.
pub struct ChunkSalts {
    db: Db,
    cache: Mutex<HashMap<String, Arc<NamingKey>>>,
}

impl ChunkSalts {
    pub fn new(db: Db) -> ChunkSalts {
        ChunkSalts {
            db,
            cache: Mutex::new(HashMap::new()),
        }
    }

    async fn load(&self, tenant: &str, create: bool) -> Result<Arc<NamingKey>, StoreError> {
        if create {
            // Asked for only when writing unencrypted (a server with a master key seals
            // instead). Where tenants have data keys, this platform encrypts: a host started
            // without the master key must not quietly store plaintext beside it.
            let keys = self
                .db
                .count_data_keys()
                .await
                .map_err(|e| StoreError::Key(format!("reading whether snapshots are encrypted: {e}")))?;
            if keys > 0 {
                return Err(StoreError::Key(format!(
                    "this platform encrypts snapshots ({keys} tenants have data keys), but this server was started \
                     without --master-key-file: refusing to store tenant {tenant}'s snapshot unencrypted"
                )));
            }
        }
        if let Some(k) = self.cache.lock().unwrap_or_else(|p| p.into_inner()).get(tenant) {
            return Ok(k.clone());
        }
        let db_err = |e: sqlx::Error| StoreError::Key(format!("reading tenant {tenant}'s chunk salt: {e}"));
        let mut salt = self.db.tenant_chunk_salt(tenant).await.map_err(db_err)?;
        if salt.is_none() && create {
            self.db
                .insert_tenant_chunk_salt(tenant, &stasis_store::naming::new_salt())
                .await
                .map_err(|e| StoreError::Key(format!("keeping tenant {tenant}'s chunk salt: {e}")))?;
            // Whichever salt won a race is the tenant's.
            salt = self.db.tenant_chunk_salt(tenant).await.map_err(db_err)?;
        }
        let Some(salt) = salt else {
            return Err(StoreError::Key(format!(
                "tenant {tenant} has no chunk salt, so it has no snapshots named with one"
            )));
        };
        let key = Arc::new(NamingKey::from_salt(&salt));
        self.cache
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(tenant.to_string(), key.clone());
        Ok(key)
    }
}

impl NamingKeys for ChunkSalts {
    fn naming_key<'a>(&'a self, tenant: &'a str, create: bool) -> BoxFuture<'a, Result<Arc<NamingKey>, StoreError>> {
        Box::pin(self.load(tenant, create))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_store_without_keys_is_told_which_flag_gives_them() {
        use stasis_store::{MemoryKeyring, Part, SnapshotStore};
        use stasis_types::{SnapshotId, TenantId};
        let dir = tempfile::tempdir().unwrap();
        let sealed = SnapshotStore::local(dir.path())
            .unwrap()
            .with_keyring(Arc::new(MemoryKeyring::default()));
        let (id, tenant) = (SnapshotId::new(), TenantId::new());
        let empty = Part {
            size: 0,
            chunk_size: 4096,
            chunks: vec![],
        };
        sealed
            .put_manifest(&stasis_store::Manifest {
                version: stasis_store::MANIFEST_VERSION,
                snapshot_id: id.to_string(),
                tenant_id: tenant.to_string(),
                computer_id: "c".into(),
                parent_snapshot_id: None,
                created_at: String::new(),
                machine: serde_json::json!({}),
                state: empty.clone(),
                memory: empty.clone(),
                disk: empty,
                chunk_names: sealed.chunk_names(),
                boot: None,
            })
            .await
            .unwrap();
        let err = SnapshotStore::local(dir.path())
            .unwrap()
            .get_manifest(id)
            .await
            .unwrap_err();
        assert!(!err.to_string().contains("--"), "the store names no flag: {err}");
        assert_eq!(
            explain(&err),
            format!("snapshot {id} is encrypted; start the server with its --master-key-file")
        );
        let other = StoreError::Key("tenant t has no data key".into());
        assert_eq!(explain(&other), other.to_string(), "other errors as they are");
    }

    #[tokio::test]
    async fn one_chunk_salt_per_tenant_even_when_made_concurrently_and_none_beside_data_keys() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open_sqlite(&dir.path().join("db")).await.unwrap();
        let (s1, s2) = (ChunkSalts::new(db.clone()), ChunkSalts::new(db.clone()));
        let (a, b) = tokio::join!(s1.naming_key("t", true), s2.naming_key("t", true));
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(a.chunk_name(b"x"), b.chunk_name(b"x"), "one salt won");
        let u = s1.naming_key("u", true).await.unwrap();
        assert_ne!(u.chunk_name(b"x"), a.chunk_name(b"x"), "per tenant");
        assert!(matches!(s1.naming_key("v", false).await, Err(StoreError::Key(_))));
        let again = ChunkSalts::new(db.clone());
        assert_eq!(
            again.naming_key("t", false).await.unwrap().chunk_name(b"x"),
            a.chunk_name(b"x")
        );
        // Once a tenant has a data key, a server without the master key stores nothing
        // unencrypted (reading its older unencrypted snapshots still works).
        TenantKeys::new(db.clone(), MasterKey::from_bytes([7; 32]))
            .tenant_key("t", true)
            .await
            .unwrap();
        let err = again.naming_key("w", true).await.unwrap_err().to_string();
        assert!(err.contains("started without --master-key-file"), "{err}");
        assert!(again.naming_key("t", false).await.is_ok());
    }

    #[tokio::test]
    async fn one_data_key_per_tenant_even_when_made_concurrently_and_only_the_right_master_opens_it() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open_sqlite(&dir.path().join("db")).await.unwrap();
        let master = MasterKey::from_bytes([7; 32]);
        // Two processes (two keyrings, no shared cache) race to make tenant t's key.
        let (k1, k2) = (
            TenantKeys::new(db.clone(), master.clone()),
            TenantKeys::new(db.clone(), master.clone()),
        );
        let (a, b) = tokio::join!(k1.tenant_key("t", true), k2.tenant_key("t", true));
        let (a, b) = (a.unwrap(), b.unwrap());
        assert_eq!(a.chunk_name(b"x"), b.chunk_name(b"x"), "one key won");
        assert!(matches!(k1.tenant_key("u", false).await, Err(StoreError::Key(_))));
        // A restarted server with the same master key gets the same key back.
        let again = TenantKeys::new(db.clone(), master.clone());
        assert_eq!(
            again.tenant_key("t", false).await.unwrap().chunk_name(b"x"),
            a.chunk_name(b"x")
        );
        // Another master key: a clear refusal.
        let wrong = TenantKeys::new(db.clone(), MasterKey::from_bytes([8; 32]));
        let err = wrong.tenant_key("t", true).await.unwrap_err().to_string();
        assert!(
            err.contains("the master key does not open tenant t's data key"),
            "{err}"
        );
        assert!(err.contains("wrong --master-key-file?"), "{err}");
        assert_eq!(db.count_foreign_data_keys(&master.id()).await.unwrap(), 0);
        assert_eq!(db.count_foreign_data_keys(&wrong.master_key_id()).await.unwrap(), 1);
    }

    #[test]
    fn key_files_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        assert!(load_master_key(&path)
            .unwrap_err()
            .to_string()
            .contains("reading the master key file"));
        std::fs::write(&path, "not a key\n").unwrap();
        assert!(load_master_key(&path)
            .unwrap_err()
            .to_string()
            .contains("64 hex digits"));
        std::fs::write(&path, format!("{}\n", "a1".repeat(32))).unwrap();
        assert!(load_master_key(&path).is_ok());
    }
}
