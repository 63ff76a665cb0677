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

pub mod chunk;
pub mod manifest;
pub mod naming;
pub mod seal;

use std::collections::HashSet;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, PutPayload};

pub use chunk::{ChunkError, ChunkHash};
pub use manifest::{ChunkNames, Manifest, ManifestError, ManifestHash, Part, MANIFEST_VERSION};
pub use naming::{MemoryNamingKeys, NamingKey, NamingKeys};
pub use seal::{Keyring, MasterKey, MemoryKeyring, TenantKey};

/// Chunk sizes by part: RAM changes in small scattered pieces, disks in larger runs.
pub const MEMORY_CHUNK_SIZE: u32 = 64 * 1024;
pub const DISK_CHUNK_SIZE: u32 = 1024 * 1024;
pub const STATE_CHUNK_SIZE: u32 = 1024 * 1024;
/// zstd level for chunks: cutting a file into chunks costs some ratio against compressing it
/// whole, and a higher level wins it back; the pipeline has throughput to spare.
pub const COMPRESSION_LEVEL: i32 = 6;
/// Chunks in flight at once (read, hash, compress, upload).
const PARALLEL: usize = 8;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("object store: {0}")]
    Object(#[from] object_store::Error),
    #[error("chunk {chunk} is corrupt: {source}")]
    Corrupt {
        chunk: ChunkHash,
        #[source]
        source: ChunkError,
    },
    #[error("chunk {0} is missing from the store")]
    MissingChunk(ChunkHash),
    #[error("manifest of snapshot {id}: {source}")]
    Manifest {
        id: String,
        #[source]
        source: ManifestError,
    },
    #[error("{0}")]
    Config(String),
    #[error("manifest of snapshot {0} is missing from the store")]
    MissingManifest(String),
    /// An object of `snapshot` was modified in the store: a sealed one did not open with its
    /// tenant's key, or a manifest disagrees with what the platform recorded.
    #[error("{message}")]
    Tampered { snapshot: String, message: String },
    /// Keys: none given for an encrypted snapshot, a master key that does not open a tenant's
    /// data key, the database they are kept in.
    #[error("{0}")]
    Key(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl StoreError {
    /// The snapshot this error shows to be damaged in the store, if it does.
    pub fn damaged_snapshot(&self) -> Option<&str> {
        match self {
            StoreError::Tampered { snapshot, .. } => Some(snapshot),
            StoreError::Manifest { id, .. } => Some(id),
            _ => None,
        }
    }
}

/// `what` (of `snapshot`) did not open with its key.
fn unauthentic(snapshot: &str, what: String) -> StoreError {
    StoreError::Tampered {
        snapshot: snapshot.to_string(),
        message: format!("{what} failed authentication: it was modified in the store, or sealed with another key"),
    }
}

/// The manifest of `snapshot` contradicts what the platform recorded: `how`.
fn modified(snapshot: &str, how: String) -> StoreError {
    StoreError::Tampered {
        snapshot: snapshot.to_string(),
        message: format!("the manifest of snapshot {snapshot} {how}: it was modified in the store"),
    }
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> StoreError {
    let context = context.into();
    move |source| StoreError::Io { context, source }
}

/// What an upload did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UploadStats {
    /// Bytes of the file (its logical size).
    pub raw_bytes: u64,
    /// Bytes in all-zero chunks (not stored).
    pub zero_bytes: u64,
    /// Chunks written to the store by this upload, and their stored (compressed) size.
    pub new_chunks: u64,
    pub uploaded_bytes: u64,
    /// Chunks the store already had.
    pub reused_chunks: u64,
    /// Stored (compressed) size of every distinct chunk the file needs, new or reused.
    pub stored_bytes: u64,
}

impl UploadStats {
    pub fn add(&mut self, other: UploadStats) {
        self.raw_bytes += other.raw_bytes;
        self.zero_bytes += other.zero_bytes;
        self.new_chunks += other.new_chunks;
        self.uploaded_bytes += other.uploaded_bytes;
        self.reused_chunks += other.reused_chunks;
        self.stored_bytes += other.stored_bytes;
    }
}

/// What a collection did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GcStats {
    /// Chunks deleted.
    pub deleted: u64,
    /// Unneeded chunks spared for being younger than the grace period.
    pub young: u64,
}

/// Called with the number of bytes processed so far.
pub type Progress = Arc<dyn Fn(u64) + Send + Sync>;

/// What the platform's database says about a stored snapshot (kept where whoever can write
/// to the store cannot change it). Every manifest read for a restore or a collection must
/// agree with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recorded {
    pub snapshot_id: String,
    /// The tenant it belongs to: its manifest must name this tenant, and this tenant's key
    /// opens its chunks.
    pub tenant_id: String,
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

/// How one tenant's chunks are named, stored and opened.
#[derive(Clone)]
enum Codec {
    Plain,
    Keyed(Arc<NamingKey>),
    Sealed(Arc<TenantKey>),
}

impl Codec {
    fn name(&self, raw: &[u8]) -> ChunkHash {
        match self {
            Codec::Plain => ChunkHash::of(raw),
            Codec::Keyed(k) => k.chunk_name(raw),
            Codec::Sealed(k) => k.chunk_name(raw),
        }
    }

    fn encode(&self, name: ChunkHash, raw: &[u8]) -> Vec<u8> {
        match self {
            Codec::Plain | Codec::Keyed(_) => chunk::encode(raw, COMPRESSION_LEVEL),
            Codec::Sealed(k) => k.seal_chunk(name, raw, COMPRESSION_LEVEL),
        }
    }

    /// A sealed object under a plaintext naming (or the reverse) fails here: the form of
    /// the chunks follows the manifest, never the bytes of the object.
    fn open(&self, stored: &[u8], name: ChunkHash) -> Result<Vec<u8>, ChunkError> {
        match self {
            Codec::Plain => chunk::decode(stored, name),
            Codec::Keyed(k) => chunk::decode_with(stored, name, |raw| k.chunk_name(raw)),
            Codec::Sealed(k) => k.open_chunk(stored, name),
        }
    }
}

/// Reads an object whose size the store reported with it: one larger than `max` is refused
/// before its body is read (`Ok(Err(size))`). The body is then read whole, in one piece (a
/// local file in one read, not a stream of small ones): its length is bounded by the size
/// declared, which HTTP framing enforces; a body that came out longer all the same is refused.
async fn read_bounded(
    got: object_store::GetResult,
    max: u64,
) -> Result<Result<bytes::Bytes, u64>, object_store::Error> {
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

enum Outcome {
    Zero,
    Reused(u64),
    New(u64),
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

    /// How `tenant`'s chunks named `names` are handled; `snapshot` is for messages.
    async fn codec(&self, names: ChunkNames, tenant: &str, create: bool, snapshot: &str) -> Result<Codec, StoreError> {
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
                None => Err(StoreError::Key(format!(
                    "snapshot {snapshot} is encrypted; start the server with its --master-key-file"
                ))),
            },
        }
    }

    /// The tenant's key: made if the tenant has none yet when `create`.
    async fn tenant_key(&self, tenant: &str, create: bool) -> Result<Option<Arc<TenantKey>>, StoreError> {
        match &self.keyring {
            Some(k) => Ok(Some(k.tenant_key(tenant, create).await?)),
            None => Ok(None),
        }
    }

    /// The key prefix inside the bucket ("" or ending in '/').
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// A store in a local directory (created if needed).
    pub fn local(dir: &Path) -> Result<SnapshotStore, StoreError> {
        std::fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        let fs = object_store::local::LocalFileSystem::new_with_prefix(dir)?;
        Ok(SnapshotStore::new(Arc::new(fs), dir.display().to_string()))
    }

    pub fn bucket(&self) -> &str {
        &self.bucket
    }

    pub fn object_store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    pub fn manifest_key(snapshot_id: &str) -> String {
        format!("snapshots/{snapshot_id}/manifest.zst")
    }

    /// Holds off garbage collection until dropped: take it before uploading a snapshot's
    /// chunks and drop it once its manifest is written, so no chunk it relies on (found
    /// present, or uploaded but not yet named by a manifest) can be collected meanwhile.
    pub async fn pin(&self) -> Pin {
        Pin(self.gc_lock.clone().read_owned().await)
    }

    /// Cuts `path` into chunks and stores the ones the store lacks; `tenant`'s key seals them
    /// if the store is encrypted.
    pub async fn upload_file(
        &self,
        _pin: &Pin,
        tenant: &str,
        path: &Path,
        chunk_size: u32,
        progress: Progress,
    ) -> Result<(Part, UploadStats), StoreError> {
        let file = Arc::new(std::fs::File::open(path).map_err(io(format!("opening {}", path.display())))?);
        let size = file.metadata().map_err(io("stat"))?.len();
        let holes = Arc::new(data_ranges(&file, size));
        let count = size.div_ceil(chunk_size as u64) as usize;
        let done = Arc::new(AtomicU64::new(0));
        let codec = self.codec(self.chunk_names(), tenant, true, "being uploaded").await?;

        let results: Vec<(usize, Option<ChunkHash>, Outcome, u64)> = futures::stream::iter(0..count)
            .map(|i| {
                let file = file.clone();
                let holes = holes.clone();
                let store = self.store.clone();
                let done = done.clone();
                let progress = progress.clone();
                let codec = codec.clone();
                let sealer = codec.clone();
                async move {
                    let start = i as u64 * chunk_size as u64;
                    let len = (size - start).min(chunk_size as u64);
                    let outcome = if !holes.overlaps(start, start + len) {
                        (None, Outcome::Zero)
                    } else {
                        let (hash, data) =
                            tokio::task::spawn_blocking(move || -> std::io::Result<Option<(ChunkHash, Vec<u8>)>> {
                                let mut buf = vec![0u8; len as usize];
                                file.read_exact_at(&mut buf, start)?;
                                if chunk::is_zero(&buf) {
                                    return Ok(None);
                                }
                                Ok(Some((codec.name(&buf), buf)))
                            })
                            .await
                            .expect("chunk reader does not panic")
                            .map_err(io("reading a chunk"))?
                            .map_or((None, None), |(h, d)| (Some(h), Some(d)));
                        match (hash, data) {
                            (Some(hash), Some(data)) => {
                                let key = ObjectPath::from(hash.key());
                                match store.head(&key).await {
                                    Ok(meta) => (Some(hash), Outcome::Reused(meta.size)),
                                    Err(object_store::Error::NotFound { .. }) => {
                                        let stored = tokio::task::spawn_blocking(move || sealer.encode(hash, &data))
                                            .await
                                            .expect("compression does not panic");
                                        let n = stored.len() as u64;
                                        store.put(&key, PutPayload::from(stored)).await?;
                                        (Some(hash), Outcome::New(n))
                                    }
                                    Err(e) => return Err(e.into()),
                                }
                            }
                            _ => (None, Outcome::Zero),
                        }
                    };
                    let total = done.fetch_add(len, Ordering::Relaxed) + len;
                    progress(total);
                    Ok::<_, StoreError>((i, outcome.0, outcome.1, len))
                }
            })
            .buffer_unordered(PARALLEL)
            .try_collect()
            .await?;

        let mut chunks = vec![None; count];
        let mut stats = UploadStats {
            raw_bytes: size,
            ..Default::default()
        };
        let mut distinct = HashSet::new();
        for (i, hash, outcome, len) in results {
            chunks[i] = hash;
            let stored = match outcome {
                Outcome::Zero => {
                    stats.zero_bytes += len;
                    0
                }
                Outcome::Reused(n) => {
                    stats.reused_chunks += 1;
                    n
                }
                Outcome::New(n) => {
                    stats.new_chunks += 1;
                    stats.uploaded_bytes += n;
                    n
                }
            };
            if hash.is_some_and(|h| distinct.insert(h)) {
                stats.stored_bytes += stored;
            }
        }
        Ok((
            Part {
                size,
                chunk_size,
                chunks,
            },
            stats,
        ))
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
                &ObjectPath::from(Self::manifest_key(&manifest.snapshot_id)),
                PutPayload::from(bytes),
            )
            .await?;
        Ok(stored)
    }

    /// Reads a manifest checking only that it is well formed: for tools and tests that
    /// inspect a store. The platform reads through [`SnapshotStore::get_manifest_of`].
    pub async fn get_manifest(&self, snapshot_id: &str) -> Result<Manifest, StoreError> {
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
        let id = recorded.snapshot_id.as_str();
        let bytes = self.manifest_bytes(id).await?;
        let header =
            seal::parse_manifest_header(&bytes).map_err(|source| StoreError::Manifest { id: id.into(), source })?;
        let found = header.as_ref().map(|(tenant, _)| *tenant);
        let expected = recorded.tenant_id.as_str();
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
        let key = ObjectPath::from(Self::manifest_key(snapshot_id));
        let got = match self.store.get(&key).await {
            Ok(g) => g,
            Err(object_store::Error::NotFound { .. }) => return Err(StoreError::MissingManifest(snapshot_id.into())),
            Err(e) => return Err(e.into()),
        };
        read_bounded(got, manifest::MAX_MANIFEST_BYTES as u64)
            .await?
            .map(|b| b.to_vec())
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
                return Err(StoreError::Key(format!(
                    "snapshot {snapshot_id} is encrypted; start the server with its --master-key-file"
                )));
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

    pub async fn delete_manifest(&self, snapshot_id: &str) -> Result<(), StoreError> {
        match self
            .store
            .delete(&ObjectPath::from(Self::manifest_key(snapshot_id)))
            .await
        {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    /// Checks that every chunk the manifest names is in the store.
    pub async fn verify_present(&self, manifest: &Manifest) -> Result<(), StoreError> {
        futures::stream::iter(manifest.chunk_set())
            .map(|h| {
                let store = self.store.clone();
                async move {
                    match store.head(&ObjectPath::from(h.key())).await {
                        Ok(_) => Ok(()),
                        Err(object_store::Error::NotFound { .. }) => Err(StoreError::MissingChunk(h)),
                        Err(e) => Err(e.into()),
                    }
                }
            })
            .buffer_unordered(PARALLEL * 4)
            .try_collect::<Vec<()>>()
            .await?;
        Ok(())
    }

    /// Rebuilds a part of `manifest` into `dest` (sparse: zero chunks stay holes), verifying
    /// every chunk the way the manifest names them, with `tenant`'s keys: the snapshot's
    /// tenant as the platform recorded it (a manifest naming another is refused). Each chunk
    /// object is size-checked before its body is read.
    pub async fn materialize(
        &self,
        tenant: &str,
        manifest: &Manifest,
        part: &Part,
        dest: &Path,
        progress: Progress,
    ) -> Result<(), StoreError> {
        let snapshot_id: Arc<str> = manifest.snapshot_id.as_str().into();
        if manifest.tenant_id != tenant {
            return Err(modified(
                &snapshot_id,
                format!(
                    "names tenant {}, but the snapshot is tenant {tenant}'s",
                    manifest.tenant_id
                ),
            ));
        }
        let file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(dest)
            .map_err(io(format!("creating {}", dest.display())))?;
        file.set_len(part.size).map_err(io("sizing the file"))?;
        let file = Arc::new(file);
        let done = Arc::new(AtomicU64::new(0));
        let chunk_size = part.chunk_size as u64;
        let size = part.size;
        let max_stored = chunk::max_stored_len(part.chunk_size);
        let codec = if part.chunks.iter().any(Option::is_some) {
            Some(self.codec(manifest.chunk_names, tenant, false, &snapshot_id).await?)
        } else {
            None
        };
        // Owned items and handles: futures that borrow from the iterator are not `Send` for
        // every lifetime, which spawned callers need.
        futures::stream::iter(part.chunks.clone().into_iter().enumerate())
            .map(|(i, hash)| {
                let file = file.clone();
                let done = done.clone();
                let progress = progress.clone();
                let store = self.store.clone();
                let len = (size - i as u64 * chunk_size).min(chunk_size);
                let (codec, snapshot_id) = (codec.clone(), snapshot_id.clone());
                async move {
                    if let (Some(hash), Some(codec)) = (hash, codec) {
                        let got = match store.get(&ObjectPath::from(hash.key())).await {
                            Ok(g) => g,
                            Err(object_store::Error::NotFound { .. }) => return Err(StoreError::MissingChunk(hash)),
                            Err(e) => return Err(e.into()),
                        };
                        let stored = read_bounded(got, max_stored)
                            .await?
                            .map_err(|size| StoreError::Corrupt {
                                chunk: hash,
                                source: ChunkError::TooLarge { size, max: max_stored },
                            })?;
                        let offset = i as u64 * chunk_size;
                        tokio::task::spawn_blocking(move || -> Result<(), StoreError> {
                            let raw = codec.open(&stored, hash).map_err(|source| match source {
                                ChunkError::Authentication => {
                                    unauthentic(&snapshot_id, format!("chunk {hash} of snapshot {snapshot_id}"))
                                }
                                source => StoreError::Corrupt { chunk: hash, source },
                            })?;
                            if raw.len() as u64 != len {
                                return Err(StoreError::Corrupt {
                                    chunk: hash,
                                    source: ChunkError::Length(raw.len()),
                                });
                            }
                            file.write_all_at(&raw, offset).map_err(io("writing a chunk"))
                        })
                        .await
                        .expect("chunk writer does not panic")?;
                    }
                    let total = done.fetch_add(len, Ordering::Relaxed) + len;
                    progress(total);
                    Ok(())
                }
            })
            .buffer_unordered(PARALLEL)
            .try_collect::<Vec<()>>()
            .await?;
        file.sync_all().map_err(io("syncing"))?;
        Ok(())
    }

    /// Deletes chunks no live snapshot needs, whichever way they are named. `live` are the
    /// snapshots whose manifests must stay whole, as recorded; one that fails its checks stops
    /// the collection (its real chunks are unknown, so none may go) with an error naming it.
    /// Chunks younger than `grace` are kept too (an upload may be about to name them).
    pub async fn collect_garbage(&self, live: &[Recorded], grace: Duration) -> Result<GcStats, StoreError> {
        let _guard = self.gc_lock.write().await;
        let mut needed: HashSet<ChunkHash> = HashSet::new();
        for recorded in live {
            match self.get_manifest_of(recorded).await {
                Ok(m) => needed.extend(m.chunk_set()),
                // A live snapshot without a manifest is still uploading; the grace period
                // protects what it has written so far.
                Err(StoreError::MissingManifest(_)) => {}
                Err(e) => return Err(e),
            }
        }
        let cutoff = std::time::SystemTime::now() - grace;
        let mut deleted = 0;
        let mut listing = self.store.list(Some(&ObjectPath::from("chunks")));
        let mut doomed = Vec::new();
        let mut young = 0;
        while let Some(meta) = listing.next().await {
            let meta = meta?;
            let Some(hash) = meta.location.filename().and_then(ChunkHash::from_hex) else {
                continue;
            };
            let modified =
                std::time::UNIX_EPOCH + Duration::from_millis(meta.last_modified.timestamp_millis().max(0) as u64);
            if !needed.contains(&hash) {
                if modified <= cutoff {
                    doomed.push(meta.location);
                } else {
                    young += 1;
                }
            }
        }
        for key in doomed {
            match self.store.delete(&key).await {
                Ok(()) => deleted += 1,
                Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(GcStats { deleted, young })
    }
}

/// Data (non-hole) ranges of a file, from SEEK_DATA/SEEK_HOLE; the whole file where the file
/// system cannot tell.
struct DataRanges(Vec<(u64, u64)>);

impl DataRanges {
    fn overlaps(&self, start: u64, end: u64) -> bool {
        self.0.iter().any(|&(s, e)| s < end && start < e)
    }
}

fn data_ranges(file: &std::fs::File, size: u64) -> DataRanges {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    let mut ranges = Vec::new();
    let mut pos: i64 = 0;
    while (pos as u64) < size {
        // SAFETY: lseek on a descriptor we hold open; no pointers involved.
        let data = unsafe { libc::lseek(fd, pos, libc::SEEK_DATA) };
        if data < 0 {
            if std::io::Error::last_os_error().raw_os_error() == Some(libc::ENXIO) {
                break; // no more data
            }
            return DataRanges(vec![(0, size)]);
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        if hole < 0 {
            return DataRanges(vec![(0, size)]);
        }
        ranges.push((data as u64, hole as u64));
        pos = hole;
    }
    DataRanges(ranges)
}

#[cfg(test)]
mod tests;
