//! The public API's types, shared by the server, the CLI and the tests: typed ids, computer
//! sizes and statuses, and the JSON shapes of the Miosa computers API (`shared/API.md`).

mod history;
mod ids;

pub use history::*;
pub use ids::{BadHostId, ComputerId, HostId, SnapshotId, TenantId};

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// Machine sizes: vCPUs and RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Size {
    Xs,
    Small,
    Medium,
    Large,
    /// Also accepted as `xlarge`, as the SDK writes it.
    #[serde(alias = "xlarge")]
    Xl,
}

impl Size {
    pub const ALL: [Size; 5] = [Size::Xs, Size::Small, Size::Medium, Size::Large, Size::Xl];

    pub fn vcpus(self) -> u32 {
        match self {
            Size::Xs | Size::Small => 1,
            Size::Medium | Size::Large => 2,
            Size::Xl => 4,
        }
    }

    pub fn memory_mib(self) -> u64 {
        match self {
            Size::Xs => 256,
            Size::Small => 512,
            Size::Medium => 1024,
            Size::Large => 2048,
            Size::Xl => 4096,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Size::Xs => "xs",
            Size::Small => "small",
            Size::Medium => "medium",
            Size::Large => "large",
            Size::Xl => "xl",
        }
    }

    /// Parses a size name; `xlarge` is accepted for `xl` as the SDK does.
    pub fn parse(s: &str) -> Option<Size> {
        match s {
            "xs" => Some(Size::Xs),
            "small" => Some(Size::Small),
            "medium" => Some(Size::Medium),
            "large" => Some(Size::Large),
            "xl" | "xlarge" => Some(Size::Xl),
            _ => None,
        }
    }
}

/// Lifecycle of a computer. Only the values the official SDK accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum ComputerStatus {
    Creating,
    Provisioning,
    Starting,
    Running,
    Paused,
    Stopping,
    Stopped,
    Error,
    Destroying,
    Destroyed,
}

impl ComputerStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ComputerStatus::Creating => "creating",
            ComputerStatus::Provisioning => "provisioning",
            ComputerStatus::Starting => "starting",
            ComputerStatus::Running => "running",
            ComputerStatus::Paused => "paused",
            ComputerStatus::Stopping => "stopping",
            ComputerStatus::Stopped => "stopped",
            ComputerStatus::Error => "error",
            ComputerStatus::Destroying => "destroying",
            ComputerStatus::Destroyed => "destroyed",
        }
    }

    pub fn parse(s: &str) -> Option<ComputerStatus> {
        serde_json::from_value(serde_json::Value::String(s.to_string())).ok()
    }
}

/// A computer as the API returns it (no envelope).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Computer {
    pub id: ComputerId,
    pub name: String,
    pub slug: String,
    pub status: ComputerStatus,
    pub template_type: String,
    pub size: Size,
    pub ip_address: Option<String>,
    pub tenant_id: TenantId,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    #[schema(value_type = Object)]
    pub metadata: serde_json::Map<String, serde_json::Value>,
    /// Why the computer is in `error` (or was stopped by the platform); null otherwise.
    pub error: Option<String>,
    /// The snapshot this computer was restored from, if any.
    pub source_snapshot_id: Option<SnapshotId>,
    /// Whether it has a network (a create with `"network": false` has none: its card has no
    /// link).
    #[serde(default = "has_network")]
    pub network: bool,
    /// The domain its preview URLs are under: port P is served at
    /// `{scheme}://P-{slug}.sandbox.{preview_domain}/` (see `/computers/{id}/urls`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preview_domain: Option<String>,
    /// Its preview URL without a port: the lowest port it exposes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox_url: Option<String>,
}

fn has_network() -> bool {
    true
}

/// `GET /computers`
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ComputerList {
    pub total: usize,
    pub computers: Vec<Computer>,
}

/// Answer of start / stop / restart / destroy.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ActionResponse {
    pub success: bool,
    pub status: String,
    pub message: String,
}

/// Answer of `POST /computers/{id}/exec` and `/exec/python`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ExecResponse {
    pub exit_code: i32,
    pub output: String,
    pub stderr: String,
    pub success: bool,
    /// The command was killed by its timeout (exit code 124).
    pub timed_out: bool,
    /// Output beyond the agent's cap was dropped.
    pub truncated: bool,
    pub duration_ms: u64,
}

/// The body of every error answer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable: `COMPUTER_NOT_FOUND`, `SNAPSHOT_NOT_READY`, `VALIDATION_FAILED`, ... (the official SDK's codes where it has one)
    pub code: String,
    /// What went wrong, for people.
    pub message: String,
    /// The same id as the `x-request-id` header.
    pub request_id: String,
    /// For `VALIDATION_FAILED`: the field at fault.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub field: Option<String>,
}

/// Lifecycle of a snapshot: `creating → uploading → ready`, `ready ⇄ restoring` while
/// restores read it, `ready → deleted`, any → `failed`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SnapshotStatus {
    Creating,
    Uploading,
    Ready,
    Restoring,
    Failed,
    Deleted,
}

impl SnapshotStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotStatus::Creating => "creating",
            SnapshotStatus::Uploading => "uploading",
            SnapshotStatus::Ready => "ready",
            SnapshotStatus::Restoring => "restoring",
            SnapshotStatus::Failed => "failed",
            SnapshotStatus::Deleted => "deleted",
        }
    }

    pub fn parse(s: &str) -> Option<SnapshotStatus> {
        serde_json::from_value(serde_json::Value::String(s.to_string())).ok()
    }

    /// No more work will happen to a snapshot in this state (an SSE stream may end).
    pub fn is_final(self) -> bool {
        matches!(
            self,
            SnapshotStatus::Ready | SnapshotStatus::Failed | SnapshotStatus::Deleted
        )
    }
}

/// A snapshot as the API returns it (inside `{"data": ...}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct Snapshot {
    pub id: SnapshotId,
    pub computer_id: ComputerId,
    pub tenant_id: TenantId,
    pub comment: Option<String>,
    pub status: SnapshotStatus,
    /// Raw size of the VM device state.
    pub state_size_bytes: Option<u64>,
    /// Raw size of the guest RAM captured.
    pub memory_size_bytes: Option<u64>,
    /// Raw (virtual) size of the root disk captured.
    pub rootfs_size_bytes: Option<u64>,
    /// What the snapshot occupies in the store: its distinct chunks, compressed, plus its
    /// manifest (chunks shared with other snapshots are counted in each).
    pub compressed_size_bytes: Option<u64>,
    /// What this snapshot added to the store (chunks it was the first to need).
    pub uploaded_bytes: Option<u64>,
    /// How long the guest was paused for the capture.
    pub pause_ms: Option<u64>,
    pub s3_bucket: Option<String>,
    pub s3_prefix: Option<String>,
    /// The snapshot this one descends from: the computer's previous snapshot, or, for the
    /// first snapshot of a restored or cloned computer, the snapshot it was restored from.
    pub parent_snapshot_id: Option<SnapshotId>,
    pub error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    /// When it is deleted by itself (null: kept until deleted). A name pins it: a named
    /// snapshot does not expire while the name stands.
    #[serde(default)]
    pub expires_at: Option<DateTime<Utc>>,
    /// The name that pins it (see `/named-snapshots`), if one does.
    #[serde(default)]
    pub name: Option<String>,
}

/// Where a snapshot's capture or a restore from it has got to (`step` of its events).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Step {
    /// Waiting for a worker.
    Queued,
    /// The guest's state, RAM and disk being captured.
    Capturing,
    /// Captured; the upload is being set up.
    Preparing,
    Uploading,
    /// The upload failed this time and will be tried again.
    Retrying,
    /// A restore fetching the snapshot's files.
    Downloading,
    /// A restore starting its machine.
    Starting,
    Restored,
    RestoreFailed,
    /// Deleted by itself: its `expires_at` passed.
    Expired,
    /// A step this client does not know (a newer server's).
    #[serde(other)]
    Other,
}

impl Step {
    pub fn as_str(self) -> &'static str {
        match self {
            Step::Queued => "queued",
            Step::Capturing => "capturing",
            Step::Preparing => "preparing",
            Step::Uploading => "uploading",
            Step::Retrying => "retrying",
            Step::Downloading => "downloading",
            Step::Starting => "starting",
            Step::Restored => "restored",
            Step::RestoreFailed => "restore_failed",
            Step::Expired => "expired",
            Step::Other => "other",
        }
    }
}

impl std::fmt::Display for Step {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The `data` of a snapshot SSE event. Absent fields are omitted, never null.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct SnapshotEventData {
    pub snapshot_id: SnapshotId,
    pub status: SnapshotStatus,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub step: Option<Step>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub progress: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub error: Option<String>,
    /// For restores: the computer being restored.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub computer_id: Option<ComputerId>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub bytes_done: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub bytes_total: Option<u64>,
}

/// `POST /computers`. Unknown fields are ignored; `size` defaults to `small`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreateComputerRequest {
    /// 1 to 128 characters, no control characters (surrounding blanks are trimmed).
    #[schema(min_length = 1, max_length = 128)]
    pub name: String,
    /// `debian-bookworm` (also accepted: `default`, `debian`, `miosa-desktop`).
    #[schema(nullable = false)]
    pub template_type: Option<Template>,
    #[schema(nullable = false)]
    pub size: Option<Size>,
    /// Free-form, at most 16 KiB of JSON.
    #[schema(value_type = Option<Object>)]
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
    /// `false`: no network at all (default `true`: outbound access under the platform's
    /// egress policy).
    #[schema(nullable = false)]
    pub network: Option<bool>,
    /// Environment variables every exec in the computer sees (see `/computers/{id}/env`).
    #[serde(default)]
    #[schema(nullable = false)]
    pub env: Option<std::collections::BTreeMap<String, String>>,
}

/// The templates a computer can be created from (all give the default image).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Template {
    DebianBookworm,
    Default,
    Debian,
    MiosaDesktop,
}

/// `POST /computers/{id}/exec`: a command run under `bash -c`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ExecRequest {
    pub command: String,
    /// Seconds before the command is killed (exit code 124); default 60, at most 3600.
    #[schema(minimum = 1, maximum = 3600, nullable = false)]
    #[serde(default, deserialize_with = "whole_seconds")]
    pub timeout: Option<u64>,
}

/// `POST /computers/{id}/commands` (the SDK's `commands.run_computer`, and
/// `helpers.exec_command` with a `cwd`): a command run under `bash -c`, waited for.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CommandRequest {
    pub command: String,
    /// Working directory (default `/root`); one that is not a directory fails the command
    /// (exit code 127, saying so on stderr).
    #[serde(default)]
    #[schema(nullable = false)]
    pub cwd: Option<String>,
    /// Seconds before the command is killed (exit code 124); default 60, at most 3600.
    #[schema(minimum = 1, maximum = 3600, nullable = false)]
    #[serde(default, deserialize_with = "whole_seconds")]
    pub timeout_seconds: Option<u64>,
    /// Written to the command's stdin, which is then closed (default: empty).
    #[serde(default)]
    #[schema(nullable = false)]
    pub stdin: Option<String>,
    /// Run in the background: answered at once (202, the command's `pid`), the command runs
    /// until it exits or is killed (`/commands/{pid}`, `/logs`, `/kill`). `timeout_seconds`
    /// and `stdin` do not apply.
    #[serde(default)]
    #[schema(nullable = false)]
    pub detached: Option<bool>,
}

/// `POST /computers/{id}/resize`: a size, or the vCPUs and memory of one.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct ResizeRequest {
    #[serde(default)]
    #[schema(nullable = false)]
    pub size: Option<Size>,
    /// With `memory_mb`, names the size that has exactly these.
    #[serde(default)]
    #[schema(nullable = false, minimum = 1)]
    pub cpu_count: Option<u32>,
    #[serde(default)]
    #[schema(nullable = false, minimum = 1)]
    pub memory_mb: Option<u64>,
}

/// A computer, as `resize` answers it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ComputerData {
    pub data: Computer,
}

/// `POST /computers/{id}/exec/python`: code run by `python3 -c`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ExecPythonRequest {
    pub code: String,
    #[schema(minimum = 1, maximum = 3600, nullable = false)]
    #[serde(default, deserialize_with = "whole_seconds")]
    pub timeout: Option<u64>,
}

/// A whole number of seconds, also written as a float with no fraction (`30.0`, as some
/// clients send numbers); null or absent is None.
fn whole_seconds<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    use serde::de::Error;
    match Option::<f64>::deserialize(d)? {
        None => Ok(None),
        Some(f) if f.fract() == 0.0 && (0.0..=u64::MAX as f64).contains(&f) => Ok(Some(f as u64)),
        Some(f) => Err(D::Error::custom(format!("{f} is not a whole number of seconds"))),
    }
}

/// `POST /computers/{id}/start`: the body may be empty; unknown fields are ignored.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct StartRequest {
    /// Environment variables to set (added or replaced) before it starts; they stay set.
    #[serde(default)]
    #[schema(nullable = false)]
    pub env: Option<std::collections::BTreeMap<String, String>>,
}

/// `PATCH /computers/{id}`: what changes (absent fields stay as they are).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct UpdateComputerRequest {
    /// 1 to 128 characters, no control characters. The slug (and so the preview URLs) stays.
    #[serde(default)]
    #[schema(nullable = false, min_length = 1, max_length = 128)]
    pub name: Option<String>,
    /// Replaces the metadata whole; at most 16 KiB of JSON.
    #[serde(default)]
    #[schema(value_type = Option<Object>, nullable = false)]
    pub metadata: Option<serde_json::Map<String, serde_json::Value>>,
}

/// One environment variable of a computer's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct EnvVar {
    pub name: String,
    pub value: String,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// `POST /computers/{id}/env`: a new variable.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SetEnvRequest {
    /// Letters, digits and `_`, not starting with a digit; at most 128 characters.
    #[schema(min_length = 1, max_length = 128)]
    pub name: String,
    /// At most 32 KiB, no NUL.
    pub value: String,
}

/// `PATCH /computers/{id}/env/{name}`: a variable's new value.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UpdateEnvRequest {
    pub value: String,
}

/// A computer's variables, by name.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EnvList {
    pub data: Vec<EnvVar>,
}

/// One variable, as written.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct EnvEnvelope {
    pub data: EnvVar,
}

/// `POST /computers/{id}/restore/{snap_id}`: no fields (the body may be empty; unknown fields
/// are ignored).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct RestoreRequest {}

/// `POST /sse/ticket`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct SseTicketRequest {
    /// Binds the ticket to this snapshot's stream; without it, any of the tenant's.
    #[schema(nullable = false)]
    pub snapshot_id: Option<SnapshotId>,
}

/// `POST /computers/{id}/snapshots`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct CreateSnapshotRequest {
    /// A human-readable label.
    #[schema(max_length = 500)]
    pub comment: Option<String>,
    /// Delete it by itself this many seconds after it is taken (at least 1); without it (and
    /// without `expires_at`) the platform's default applies, if it has one.
    #[schema(nullable = false, minimum = 1)]
    pub ttl_seconds: Option<u64>,
    /// Delete it by itself at this time (RFC 3339, in the future); not with `ttl_seconds`.
    #[schema(nullable = false)]
    pub expires_at: Option<DateTime<Utc>>,
}

/// `POST /computers/{id}/clone`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct CloneRequest {
    /// The clone's name (default: the source's name with `-clone`).
    #[schema(min_length = 1, max_length = 128, nullable = false)]
    pub name: Option<String>,
}

/// `{"data": Snapshot}`: the answer of create, get and delete.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SnapshotEnvelope {
    pub data: Snapshot,
}

/// `GET /computers/{id}/snapshots`: the computer's snapshots that are not deleted.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SnapshotList {
    pub data: Vec<Snapshot>,
    pub total: usize,
}

/// `{"data": Computer}`: the answer of clone.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ComputerEnvelope {
    pub data: Computer,
}

/// `POST /computers/{id}/restore/{snap_id}`: the new computer and the snapshot being read.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RestoreResponse {
    pub data: Computer,
    pub snapshot: RestoringSnapshot,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RestoringSnapshot {
    pub id: SnapshotId,
    /// `restoring`.
    pub status: SnapshotStatus,
}

/// `POST /sse/ticket`: a one-use credential for one event stream, for browsers'
/// `EventSource` (which cannot send an Authorization header).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SseTicket {
    pub ticket: String,
    pub expires_at: DateTime<Utc>,
}

/// `GET /health`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Health {
    pub status: String,
    pub version: String,
}

/// One server-sent event of a snapshot's progress stream, as it travels: `event:` names it,
/// `id:` is its sequence number, `data:` is a [`SnapshotEventData`] in JSON.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SnapshotEvent {
    pub event: SnapshotEventName,
    pub id: String,
    /// JSON: a `SnapshotEventData`.
    #[schema(content_media_type = "application/json")]
    pub data: String,
}

/// The names of snapshot events.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotEventName {
    SnapshotCreating,
    SnapshotUploading,
    SnapshotReady,
    SnapshotRestoring,
    SnapshotFailed,
    SnapshotDeleted,
}

impl SnapshotEventName {
    /// The event announcing `status`.
    pub fn for_status(status: SnapshotStatus) -> SnapshotEventName {
        match status {
            SnapshotStatus::Creating => SnapshotEventName::SnapshotCreating,
            SnapshotStatus::Uploading => SnapshotEventName::SnapshotUploading,
            SnapshotStatus::Ready => SnapshotEventName::SnapshotReady,
            SnapshotStatus::Restoring => SnapshotEventName::SnapshotRestoring,
            SnapshotStatus::Failed => SnapshotEventName::SnapshotFailed,
            SnapshotStatus::Deleted => SnapshotEventName::SnapshotDeleted,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            SnapshotEventName::SnapshotCreating => "snapshot_creating",
            SnapshotEventName::SnapshotUploading => "snapshot_uploading",
            SnapshotEventName::SnapshotReady => "snapshot_ready",
            SnapshotEventName::SnapshotRestoring => "snapshot_restoring",
            SnapshotEventName::SnapshotFailed => "snapshot_failed",
            SnapshotEventName::SnapshotDeleted => "snapshot_deleted",
        }
    }
}

/// The template every computer gets (the names a create accepts are [`Template`]'s:
/// `miosa-desktop`, what the official SDK sends by default, `default` and `debian` too).
pub const DEFAULT_TEMPLATE: &str = "debian-bookworm";

#[cfg(test)]
mod tests {
    #[test]
    fn steps_keep_their_wire_names_and_unknown_ones_read() {
        for step in [Step::Queued, Step::Uploading, Step::RestoreFailed] {
            let wire = serde_json::to_string(&step).unwrap();
            assert_eq!(wire, format!("\"{}\"", step.as_str()));
            assert_eq!(serde_json::from_str::<Step>(&wire).unwrap(), step);
        }
        assert_eq!(serde_json::from_str::<Step>("\"compacting\"").unwrap(), Step::Other);
    }

    use super::*;

    #[test]
    fn sizes_match_the_published_table() {
        let table: Vec<(u32, u64)> = Size::ALL.iter().map(|s| (s.vcpus(), s.memory_mib())).collect();
        assert_eq!(table, vec![(1, 256), (1, 512), (2, 1024), (2, 2048), (4, 4096)]);
        for s in Size::ALL {
            assert_eq!(Size::parse(s.as_str()), Some(s));
            assert_eq!(serde_json::to_value(s).unwrap(), s.as_str());
        }
        assert_eq!(Size::parse("xlarge"), Some(Size::Xl));
        assert_eq!(Size::parse("huge"), None);
    }

    #[test]
    fn statuses_serialize_lowercase() {
        assert_eq!(serde_json::to_value(ComputerStatus::Running).unwrap(), "running");
        assert_eq!(ComputerStatus::parse("stopped"), Some(ComputerStatus::Stopped));
        assert_eq!(ComputerStatus::parse("ready"), None);
        assert_eq!(ComputerStatus::Destroying.as_str(), "destroying");
    }
}

/// Who may reach an exposed port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PortVisibility {
    /// The tenant's API key, or a signed link that expires.
    Private,
    /// Anyone with the URL.
    Public,
}

/// A port of a computer its owner exposed, and where it is served.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Port {
    pub port: u16,
    pub visibility: PortVisibility,
    pub public: bool,
    pub name: Option<String>,
    pub protocol: String,
    /// The preview URL (`{scheme}://{port}-{slug}.sandbox.{preview_domain}/`).
    pub url: String,
    /// The same port under the API, for requests with the key.
    pub path_url: String,
    /// For a private port: a link anyone may open until `signed_url_expires_at` (it sets a
    /// cookie for that host, so the page's own requests are let through too).
    pub signed_url: Option<String>,
    pub signed_url_expires_at: Option<DateTime<Utc>>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
}

/// `GET /computers/{id}/ports`
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PortList {
    pub ports: Vec<Port>,
}

/// `POST /computers/{id}/ports`. Unknown fields are ignored.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct CreatePortRequest {
    /// 1 to 65535.
    pub port: u32,
    /// Default `private`.
    #[schema(nullable = false)]
    pub visibility: Option<PortVisibility>,
    /// Shorthand: `true` for `public`, `false` for `private`.
    #[schema(nullable = false)]
    pub public: Option<bool>,
    /// At most 64 characters.
    pub name: Option<String>,
}

/// `PATCH /computers/{id}/ports/{port}`: what is given changes.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
pub struct UpdatePortRequest {
    #[schema(nullable = false)]
    pub visibility: Option<PortVisibility>,
    #[schema(nullable = false)]
    pub public: Option<bool>,
    pub name: Option<String>,
}

/// One preview URL of a computer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PreviewUrl {
    pub port: u16,
    pub url: String,
    pub visibility: PortVisibility,
    pub name: Option<String>,
    pub signed_url: Option<String>,
}

/// `GET /computers/{id}/urls`
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct UrlList {
    pub urls: Vec<PreviewUrl>,
}

/// What a computer's egress rule does with the traffic it matches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PolicyEffect {
    /// Let it on to the platform's own policy (which may still refuse it).
    #[default]
    Allow,
    /// Refuse it at once (a TCP reset, or an ICMP error).
    Deny,
}

/// Which traffic an egress rule matches.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PolicyProtocol {
    Tcp,
    Udp,
    #[default]
    Any,
}

/// One rule of a computer's egress policy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct NetworkPolicyRule {
    pub effect: PolicyEffect,
    /// An IPv4 address or network (`10.0.0.0/8`). Names are not taken: a name's addresses
    /// change, and a rule is enforced by address.
    pub destination: String,
    /// Destination ports: `443`, `80,443`, `8000-8100` (default: every port).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ports: Option<String>,
    /// Default `any`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protocol: Option<PolicyProtocol>,
}

/// A computer's egress policy: its rules in order (the first that matches decides), then
/// `default_effect`. It narrows the platform's own policy, never widens it.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct NetworkPolicy {
    pub computer_id: ComputerId,
    pub tenant_id: TenantId,
    pub rules: Vec<NetworkPolicyRule>,
    pub default_effect: PolicyEffect,
    /// None while the computer has the default policy (allow everything the platform does).
    pub inserted_at: Option<DateTime<Utc>>,
    pub updated_at: Option<DateTime<Utc>>,
}

/// `PUT /computers/{id}/network-policy`: the whole policy, replacing the one before.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SetNetworkPolicyRequest {
    pub rules: Vec<NetworkPolicyRule>,
    /// Default `allow`.
    #[serde(default)]
    #[schema(nullable = false)]
    pub default_effect: Option<PolicyEffect>,
}

/// One file or directory, as `GET /computers/{id}/files` lists it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct FileInfo {
    pub name: String,
    pub path: String,
    pub size: u64,
    pub is_dir: bool,
    pub modified_at: Option<DateTime<Utc>>,
}

/// `GET /computers/{id}/files`: a directory's entries, by name.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FileList {
    pub data: Vec<FileInfo>,
    /// The directory holds more than one listing answers with (10 000 entries).
    pub truncated: bool,
}

/// `POST /computers/{id}/files/stat`: what a path is (`lstat`: a symlink is described, not
/// followed).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct FileStat {
    pub path: String,
    pub size: u64,
    /// The whole `st_mode` (type and permission bits).
    pub mode: u32,
    pub is_dir: bool,
    pub is_symlink: bool,
    pub symlink_target: Option<String>,
    pub modified_at: Option<DateTime<Utc>>,
}

/// One entry of `GET /computers/{id}/files/readdir`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct DirEntry {
    pub name: String,
    pub is_dir: bool,
    pub is_symlink: bool,
    pub size: u64,
    pub modified_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DirEntries {
    pub entries: Vec<DirEntry>,
    pub truncated: bool,
}

/// `GET /computers/{id}/files/readdir`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DirListing {
    pub data: DirEntries,
}

/// A path in a computer: absolute, at most 4096 bytes.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct PathRequest {
    pub path: String,
}

/// `POST /computers/{id}/files/mkdir`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MkdirRequest {
    pub path: String,
    /// Make missing parents too (default `true`, as `mkdir -p`).
    #[serde(default)]
    #[schema(nullable = false)]
    pub recursive: Option<bool>,
    /// Octal, like `"0755"` (the default).
    #[serde(default)]
    #[schema(nullable = false)]
    pub mode: Option<String>,
}

/// `POST /computers/{id}/files/rename` and `/copy`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct MoveRequest {
    pub from: String,
    pub to: String,
    /// `copy` only: a directory with all it holds (default `false`).
    #[serde(default)]
    #[schema(nullable = false)]
    pub recursive: Option<bool>,
}

/// `POST /computers/{id}/files/chmod`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ChmodRequest {
    pub path: String,
    /// Octal, like `"0644"`.
    pub mode: String,
}

/// `POST /computers/{id}/files/write`: a whole file, base64 (for larger files, `upload`).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct WriteFileRequest {
    pub path: String,
    pub content_base64: String,
}
