//! The account-wide snapshot surface (the official SDK's `snapshot_history` and
//! `named_snapshots`): history with paging and search, one snapshot by id with what depends on
//! it, bulk delete, forks, names that pin snapshots, and browsing a snapshot's disk.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::{Computer, ComputerId, ComputerStatus, Snapshot, SnapshotId, SnapshotStatus};

/// The machine a snapshot was taken of.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SnapshotResource {
    /// Always `computer` here (the SDK's routes also serve sandboxes elsewhere).
    #[serde(rename = "type")]
    pub kind: String,
    pub id: ComputerId,
    /// Its name now (or when it was destroyed).
    pub name: String,
    /// Its status now: `destroyed` once it is gone (its snapshots stay).
    pub status: Option<ComputerStatus>,
}

/// A snapshot in the account-wide history, with the machine it was taken of.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct HistorySnapshot {
    #[serde(flatten)]
    pub snapshot: Snapshot,
    pub resource: SnapshotResource,
}

/// `GET /snapshots`: newest first.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HistoryList {
    pub data: Vec<HistorySnapshot>,
    /// How many match, over all pages.
    pub total: u64,
    pub limit: u64,
    pub offset: u64,
}

/// One machine's history in `GET /snapshots/groups`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HistoryGroup {
    pub resource: SnapshotResource,
    /// Its snapshots in the history (not deleted, not named).
    pub snapshot_count: u64,
    pub latest_snapshot_id: SnapshotId,
    pub latest_snapshot_at: DateTime<Utc>,
}

/// `GET /snapshots/groups`: machines by newest snapshot first.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct HistoryGroups {
    pub data: Vec<HistoryGroup>,
    pub total: u64,
    pub limit: u64,
    pub offset: u64,
}

/// Something that keeps a snapshot from being deleted now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Dependent {
    /// A name pins it (delete the name first).
    NamedSnapshot { name: String },
    /// A computer is being restored from it right now.
    Restore { computer_id: ComputerId },
    /// It is still being taken.
    Capture,
}

/// `GET /snapshots/{snap_id}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SnapshotDetail {
    pub data: HistorySnapshot,
    /// What keeps it from being deleted now (empty: it can be). Snapshots taken from it and
    /// computers restored from it are not among them: chunks are shared by content, so they
    /// keep what they need of it whatever happens to it.
    pub dependents: Vec<Dependent>,
    /// Snapshots whose parent it is (not deleted).
    pub children: Vec<SnapshotId>,
    /// Computers restored or cloned from it that still exist.
    pub computers: Vec<ComputerId>,
}

/// `POST /snapshots/delete`: either `ids`, or a whole machine's history with `resource_id`,
/// `all: true` and `confirm` equal to `resource_id`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct BulkDeleteRequest {
    #[schema(nullable = false)]
    pub ids: Option<Vec<String>>,
    #[schema(nullable = false)]
    pub resource_id: Option<String>,
    #[schema(nullable = false)]
    pub all: Option<bool>,
    #[schema(nullable = false)]
    pub confirm: Option<String>,
}

/// What became of one snapshot of a bulk delete.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DeleteOutcome {
    Deleted,
    /// Something depends on it (see `dependents`); nothing was changed.
    InUse,
    NotFound,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BulkDeleteItem {
    pub id: String,
    pub outcome: DeleteOutcome,
    /// Why, when it was not deleted.
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dependents: Vec<Dependent>,
}

/// `POST /snapshots/delete`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct BulkDeleteResponse {
    pub data: Vec<BulkDeleteItem>,
    /// How many were deleted.
    pub deleted: u64,
}

/// `POST /snapshots/{snap_id}/fork` and `POST /named-snapshots/{name}/deploy`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct ForkRequest {
    /// Environments are not a part of this platform: naming one is refused.
    #[schema(nullable = false)]
    pub environment: Option<String>,
    #[schema(nullable = false)]
    pub environment_id: Option<String>,
    /// `true`: the new computer starts without the snapshot's environment variables.
    #[schema(nullable = false)]
    pub no_env: Option<bool>,
    /// The new computer's name (default: the snapshot's computer's, with `-fork`).
    #[schema(nullable = false, min_length = 1, max_length = 128)]
    pub name: Option<String>,
}

/// The answer of a fork or deploy: the new computer (`provisioning`) and the snapshot read.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ForkResponse {
    pub data: Computer,
    pub snapshot: ForkedSnapshot,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ForkedSnapshot {
    pub id: SnapshotId,
    pub status: SnapshotStatus,
}

/// Where a named snapshot is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum NamedStatus {
    /// Its snapshot is still being taken.
    Saving,
    Ready,
    /// Its snapshot failed; the name pins nothing that restores.
    Failed,
}

/// A name that pins one snapshot.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct NamedSnapshot {
    pub name: String,
    pub snapshot_id: SnapshotId,
    pub status: NamedStatus,
    pub resource: SnapshotResource,
    pub created_at: DateTime<Utc>,
    pub snapshot: Snapshot,
}

/// What names cost. Nothing here: the platform is self-hosted.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct NameAllowance {
    /// Charge per name, in cents: 0.
    pub per_name_cents: u64,
    /// How many names are free (null: no limit).
    pub free_names: Option<u64>,
}

/// `GET /named-snapshots`: newest first.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct NamedSnapshotList {
    pub data: Vec<NamedSnapshot>,
    pub allowance: NameAllowance,
}

/// `POST /named-snapshots`: a name and exactly one source.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct CreateNamedSnapshotRequest {
    /// 1 to 64 characters: letters, digits, `.`, `_` and `-`, starting with a letter or digit.
    pub name: String,
    /// Pin this snapshot (ready, or still being taken).
    #[schema(nullable = false)]
    pub snapshot_id: Option<String>,
    /// Take a new snapshot of this computer and pin it (a stopped computer's is its disk).
    #[schema(nullable = false)]
    pub computer_id: Option<String>,
    /// Sandboxes are not a part of this platform: naming one is refused.
    #[schema(nullable = false)]
    pub sandbox_id: Option<String>,
    /// Accepted and ignored (no workspaces here).
    #[schema(nullable = false)]
    pub workspace_id: Option<String>,
}

/// `GET /named-snapshots/{name}` and the answer of a create.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct NamedSnapshotDetail {
    pub data: NamedSnapshot,
    pub dependents: Vec<Dependent>,
}

/// What removing a name did to its snapshot.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum NameOutcome {
    /// Back in the history, kept until deleted or expired.
    Released,
    /// Its expiry had passed while it was pinned, or it had failed: deleted now.
    Deleted,
    /// Being restored from: kept as it was, unnamed.
    Kept,
}

/// `DELETE /named-snapshots/{name}`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct NameRemoved {
    pub data: NamedSnapshot,
    pub outcome: NameOutcome,
}

/// The kind of an entry of a snapshot's disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum TreeEntryKind {
    File,
    Dir,
    Symlink,
    Other,
}

/// One entry of a folder of a snapshot's disk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct TreeEntry {
    pub name: String,
    /// Absolute, in the guest.
    pub path: String,
    #[serde(rename = "type")]
    pub kind: TreeEntryKind,
    pub size: u64,
    /// Permission bits, e.g. `0644`.
    pub mode: String,
    pub modified_at: Option<DateTime<Utc>>,
    /// Where a symbolic link points.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
}

/// The `202` of a snapshot's `/tree` or `/files` while it is still being taken: poll again.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Warming {
    /// Always `warming`.
    pub status: String,
    pub retry_after_ms: u64,
}

/// `GET /snapshots/{snap_id}/tree`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SnapshotTree {
    pub snapshot_id: SnapshotId,
    pub path: String,
    /// `ready`: the listing is here (the disk is read from the store on demand).
    pub status: String,
    pub data: Vec<TreeEntry>,
}
