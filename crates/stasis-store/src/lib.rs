//! The snapshot store: a snapshot is a manifest plus content-addressed chunks, kept in any
//! object store behind the `object_store` interface (a local directory by default, S3 in
//! production).
//!
//! ```text
//! chunks/<ab>/<blake3 hex>                 zstd-compressed chunk (see `chunk`)
//! snapshots/<snapshot id>/manifest.zst     the manifest (see `manifest`)
//! ```
//!
//! A chunk is stored once per tenant, however many of its snapshots need it; all-zero chunks
//! are not stored at all. Uploads hash, compress and upload in parallel and skip chunks the
//! store already has, so a snapshot that shares most of its bytes with an earlier one uploads
//! only the difference. Every chunk read back is verified against its name before it is used.
//!
//! Chunk names are keyed per tenant, so deduplication never crosses tenants: with
//! [`NamingKeys`] (unencrypted, see `naming`) by a keyed BLAKE3, or with a [`Keyring`] (the
//! operator set a master key) by a subkey of the tenant's data key, and chunks and manifests
//! are then sealed too (see `seal`). Older snapshots named chunks by plain BLAKE3, shared by
//! all tenants; the manifest says which ([`ChunkNames`]) and they still restore.
//!
//! The store trusts nothing it reads back: the platform passes in what its database recorded
//! about a snapshot ([`Recorded`]: its tenant, whether it was sealed, the hash of its manifest
//! object), and a manifest that disagrees is refused as tampering. The key that opens a
//! snapshot's chunks is always its recorded tenant's, never one the manifest names.
//!
//! The crate by concern: opening a store and its core ([`SnapshotStore`], here); `upload`
//! (cutting files into chunks and storing them); `manifest_io` (writing and checking
//! manifests, whose types are in `manifest`); `materialize` (rebuilding files from chunks, and
//! the host's local copies of snapshots, `materialize::cache`); `gc` (collecting unneeded
//! chunks); `codec`, `naming` and `seal` (how chunks are named, stored and opened).

pub mod chunk;
mod codec;
mod error;
mod gc;
pub mod manifest;
mod manifest_io;
pub mod materialize;
pub mod naming;
mod reader;
pub mod seal;
mod upload;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use object_store::ObjectStore;

pub use chunk::{ChunkError, ChunkHash};
pub use error::StoreError;
pub use gc::GcStats;
pub use manifest::{ChunkNames, Manifest, ManifestError, ManifestHash, Part, MANIFEST_VERSION};
pub use manifest_io::{Recorded, StoredManifest};
pub use materialize::cache::{host_memory_bytes, secure_dir, Materialized, Materializer};
pub use naming::{MemoryNamingKeys, NamingKey, NamingKeys};
pub use reader::PartReader;
pub use seal::{Keyring, MasterKey, MemoryKeyring, TenantKey};
pub use upload::UploadStats;

/// Chunk sizes by part: RAM changes in small scattered pieces, disks in larger runs.
pub const MEMORY_CHUNK_SIZE: u32 = 64 * 1024;
pub const DISK_CHUNK_SIZE: u32 = 1024 * 1024;
pub const STATE_CHUNK_SIZE: u32 = 1024 * 1024;
/// zstd level for chunks: cutting a file into chunks costs some ratio against compressing it
/// whole, and a higher level wins it back; the pipeline has throughput to spare.
pub const COMPRESSION_LEVEL: i32 = 6;
/// Chunks in flight at once (read, hash, compress, upload).
const PARALLEL: usize = 8;

/// Called with the number of bytes processed so far.
pub type Progress = Arc<dyn Fn(u64) + Send + Sync>;

/// How to reach an S3-compatible store beyond what the standard `AWS_*` variables say
/// (credentials always come from those: `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, ...).
#[derive(Debug, Clone, Default)]
pub struct S3Options {
    /// e.g. `http://127.0.0.1:9000` for a server that is not AWS; plain HTTP is allowed then.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    /// How long a request is retried (with backoff) before it fails; default two minutes.
    pub retry_timeout: Option<Duration>,
}

#[derive(Clone)]
pub struct SnapshotStore {
    store: Arc<dyn ObjectStore>,
    /// Where it is, for users: the bucket (or local directory's name).
    bucket: String,
    /// The key prefix inside the bucket under which everything lives ("" or ending in '/').
    prefix: String,
    /// Held shared by uploads, exclusively by garbage collection, so a chunk an upload found
    /// already present cannot be collected before the upload's manifest names it.
    gc_lock: Arc<tokio::sync::RwLock<()>>,
    /// Set when snapshots are encrypted at rest: tenants' keys.
    keyring: Option<Arc<dyn Keyring>>,
    /// Tenants' chunk naming keys, for unencrypted snapshots.
    naming: Option<Arc<dyn NamingKeys>>,
}

/// Proof that garbage collection is held off (see [`SnapshotStore::pin`]).
pub struct Pin(#[allow(dead_code)] tokio::sync::OwnedRwLockReadGuard<()>);

impl SnapshotStore {
    pub fn new(store: Arc<dyn ObjectStore>, bucket: impl Into<String>) -> SnapshotStore {
        SnapshotStore {
            store,
            bucket: bucket.into(),
            prefix: String::new(),
            gc_lock: Arc::default(),
            keyring: None,
            naming: None,
        }
    }

    /// Opens the store a URL names: `file:///ABS/DIR` (or a plain absolute path) for a local
    /// directory, `s3://BUCKET[/PREFIX]` for S3 or any S3-compatible server.
    pub fn open(url: &str, s3: &S3Options) -> Result<SnapshotStore, StoreError> {
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(StoreError::Config(format!("store URL {url:?} names no bucket")));
            }
            return SnapshotStore::s3(bucket, prefix, s3);
        }
        let path = url.strip_prefix("file://").unwrap_or(url);
        if !path.starts_with('/') {
            return Err(StoreError::Config(format!(
                "unsupported store URL {url:?}: use s3://BUCKET[/PREFIX] or file:///ABSOLUTE/DIR"
            )));
        }
        SnapshotStore::local(Path::new(path))
    }

    /// A store in an S3 bucket, under `prefix`.
    pub fn s3(bucket: &str, prefix: &str, options: &S3Options) -> Result<SnapshotStore, StoreError> {
        let mut builder = object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket);
        if let Some(endpoint) = &options.endpoint {
            builder = builder
                .with_endpoint(endpoint)
                .with_allow_http(endpoint.starts_with("http://"))
                .with_virtual_hosted_style_request(false);
        }
        if let Some(region) = &options.region {
            builder = builder.with_region(region);
        }
        // Retry transient failures (a server briefly down, 5xx, throttling) with backoff for up
        // to two minutes (by default) before an upload gives up.
        builder = builder.with_retry(object_store::RetryConfig {
            backoff: object_store::BackoffConfig::default(),
            max_retries: 100,
            retry_timeout: options.retry_timeout.unwrap_or(Duration::from_secs(120)),
        });
        let s3 = builder.build()?;
        let prefix = prefix.trim_matches('/');
        let (store, prefix): (Arc<dyn ObjectStore>, String) = if prefix.is_empty() {
            (Arc::new(s3), String::new())
        } else {
            (
                Arc::new(object_store::prefix::PrefixStore::new(s3, prefix)),
                format!("{prefix}/"),
            )
        };
        Ok(SnapshotStore {
            store,
            bucket: bucket.to_string(),
            prefix,
            gc_lock: Arc::default(),
            keyring: None,
            naming: None,
        })
    }

    /// From now on seals what it writes with tenants' keys (and opens sealed objects).
    pub fn with_keyring(mut self, keyring: Arc<dyn Keyring>) -> SnapshotStore {
        self.keyring = Some(keyring);
        self
    }

    /// Names unencrypted chunks with tenants' naming keys (and reads snapshots so named; a
    /// store with a keyring still needs these for snapshots taken before it had one).
    pub fn with_naming(mut self, naming: Arc<dyn NamingKeys>) -> SnapshotStore {
        self.naming = Some(naming);
        self
    }

    /// Whether what it writes is sealed.
    pub fn encrypted(&self) -> bool {
        self.keyring.is_some()
    }

    /// How the chunks it writes are named (what manifests written by it must say).
    pub fn chunk_names(&self) -> ChunkNames {
        match (&self.keyring, &self.naming) {
            (Some(_), _) => ChunkNames::Sealed,
            (None, Some(_)) => ChunkNames::TenantKeyed,
            (None, None) => ChunkNames::Blake3,
        }
    }

    /// The key prefix inside the bucket ("" or ending in '/').
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// A store in a local directory (created if needed).
    pub fn local(dir: &Path) -> Result<SnapshotStore, StoreError> {
        std::fs::create_dir_all(dir).map_err(error::io(format!("creating {}", dir.display())))?;
        let fs = object_store::local::LocalFileSystem::new_with_prefix(dir)?;
        Ok(SnapshotStore::new(Arc::new(fs), dir.display().to_string()))
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    pub fn object_store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// Holds off garbage collection until dropped: take it before uploading a snapshot's
    /// chunks and drop it once its manifest is written, so no chunk it relies on (found
    /// present, or uploaded but not yet named by a manifest) can be collected meanwhile.
    pub async fn pin(&self) -> Pin {
        Pin(self.gc_lock.clone().read_owned().await)
    }
}

/// Reads an object whose size the store reported with it: one larger than `max` is refused
/// before its body is read (`Ok(Err(size))`). The body is then read whole, in one piece (a
/// local file in one read, not a stream of small ones): its length is bounded by the size
/// declared, which HTTP framing enforces; a body that came out longer all the same is refused.
async fn read_bounded(
    got: object_store::GetResult,
    max: u64,
) -> Result<Result<impl AsRef<[u8]> + Send + 'static, u64>, object_store::Error> {
    let size = got.meta.size;
    if size > max {
        return Ok(Err(size));
    }
    let body = got.bytes().await?;
    if body.len() as u64 > max {
        return Ok(Err(body.len() as u64));
    }
    Ok(Ok(body))
}

#[cfg(test)]
mod tests;
