//! What can go wrong in the store, and the helpers that build its errors.

use stasis_types::SnapshotId;

use crate::chunk::{ChunkError, ChunkHash};
use crate::manifest::ManifestError;

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
    /// The snapshot is encrypted, and this store was given no keys to open it with.
    #[error("snapshot {snapshot} is encrypted, and this store has no keys to open it")]
    Encrypted { snapshot: String },
    /// Keys: a tenant without one, a master key that does not open a tenant's data key, the
    /// database they are kept in.
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
    /// The snapshot this error shows to be damaged in the store, if it does. (Errors name
    /// snapshots as text: where a manifest handed in names its own snapshot, that name is all
    /// there is, and it need not be an id at all.)
    pub fn damaged_snapshot(&self) -> Option<SnapshotId> {
        match self {
            StoreError::Tampered { snapshot, .. } => snapshot.parse().ok(),
            StoreError::Manifest { id, .. } => id.parse().ok(),
            _ => None,
        }
    }
}

/// `what` (of `snapshot`) did not open with its key.
pub(crate) fn unauthentic(snapshot: &str, what: String) -> StoreError {
    StoreError::Tampered {
        snapshot: snapshot.to_string(),
        message: format!("{what} failed authentication: it was modified in the store, or sealed with another key"),
    }
}

/// The manifest of `snapshot` contradicts what the platform recorded: `how`.
pub(crate) fn modified(snapshot: &str, how: String) -> StoreError {
    StoreError::Tampered {
        snapshot: snapshot.to_string(),
        message: format!("the manifest of snapshot {snapshot} {how}: it was modified in the store"),
    }
}

/// A blocking task's result, or the error of one that did not finish: the runtime shutting
/// down cancels it (a panic in it is reported the same way, not passed on).
pub(crate) fn joined<T>(r: Result<T, tokio::task::JoinError>, what: &str) -> Result<T, StoreError> {
    r.map_err(|e| StoreError::Io {
        context: what.to_string(),
        source: std::io::Error::other(if e.is_cancelled() {
            "stopped: the platform is shutting down".to_string()
        } else {
            format!("the task failed: {e}")
        }),
    })
}

pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> StoreError {
    let context = context.into();
    move |source| StoreError::Io { context, source }
}
