//! The platform's errors in its own terms, with no HTTP in them: a computer or snapshot not
//! found (with its id), a state that forbids a request, a quota, an invalid field, a part that
//! is unavailable, and internal faults. The `http_error` module turns them into responses, in one
//! place; start-up failures are a [`SetupError`] naming the step that failed.

/// What a request named that does not exist (or belongs to another tenant).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource {
    Computer,
    Snapshot,
    /// A port a computer does not expose.
    Port,
    /// An environment variable a computer does not have.
    EnvVar,
    /// A terminal or streamed session a computer does not have (it ended).
    Session,
    /// A background command a computer does not have.
    Command,
    /// A name that pins no snapshot of the tenant's.
    NamedSnapshot,
}

impl Resource {
    pub fn name(self) -> &'static str {
        match self {
            Resource::Computer => "computer",
            Resource::Snapshot => "snapshot",
            Resource::Port => "port",
            Resource::EnvVar => "environment variable",
            Resource::Session => "session",
            Resource::Command => "command",
            Resource::NamedSnapshot => "named snapshot",
        }
    }
}

impl std::fmt::Display for Resource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What state forbids a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Conflict {
    /// The computer is not running (stopped, errored, gone from its host).
    ComputerNotRunning,
    /// The computer is still on its way up: retry shortly.
    ComputerStarting,
    /// The computer is between states (stopping, destroying, ...).
    ComputerBusy,
    /// Not enough memory left for the computer.
    InsufficientCapacity,
    SnapshotNotReady,
    /// The snapshot is being taken or restored from.
    SnapshotInUse,
    /// The snapshot's machine cannot be loaded on this host.
    SnapshotIncompatible,
    /// The computer runs on another host.
    WrongHost,
    /// A request with the same idempotency key is still being answered.
    IdempotencyInProgress,
    /// The computer was created with no network (a port cannot be reached).
    NoNetwork,
    /// This host's computers run on QEMU's user networking, which no egress policy governs.
    NoEgressPolicy,
    /// The computer has a variable of that name already (change it with a `PATCH`).
    EnvVarExists,
    /// The change needs the computer stopped.
    MustBeStopped,
    /// The computer's guest agent is older than the request needs (restored from an older
    /// snapshot).
    AgentTooOld,
    /// A terminal has a client attached already.
    SessionAttached,
    /// The tenant has a named snapshot of that name already (names are never replaced).
    NameTaken,
    /// The snapshot is pinned by a name already.
    SnapshotAlreadyNamed,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `id` names no `kind` of this tenant's.
    /// The computer runs as many sessions (streams, terminals, background commands) as it may.
    #[error("{0}")]
    TooManySessions(String),
    #[error("{kind} {id} not found")]
    NotFound { kind: Resource, id: String },
    /// The state of something forbids the request; the message says which.
    #[error("{message}")]
    Conflict { state: Conflict, message: String },
    /// A tenant's quota; the message names it and the usage.
    #[error("{0}")]
    Quota(String),
    /// A tenant's request rate.
    #[error("too many requests: this tenant may make {limit} per second; retry in {retry_after_secs} s")]
    Throttled { retry_after_secs: u64, limit: u64 },
    /// A field is missing, of the wrong type, or out of range.
    #[error("{message}")]
    Invalid { field: String, message: String },
    /// A part the request needs (a host, the guest agent, the image) cannot serve it now.
    #[error("{0}")]
    Unavailable(String),
    /// A file operation in a computer failed: why (its `errno` kind), and a message naming
    /// the path.
    #[error("{message}")]
    File {
        kind: stasis_agent_proto::FsErrorKind,
        message: String,
    },
    /// A fault of the platform's own: logged in full, never shown to a client.
    #[error("internal error: {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    pub fn not_found(kind: Resource, id: impl std::fmt::Display) -> Self {
        Error::NotFound {
            kind,
            id: id.to_string(),
        }
    }

    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        Error::Invalid {
            field: field.to_string(),
            message: message.into(),
        }
    }

    pub fn conflict(state: Conflict, message: impl Into<String>) -> Self {
        Error::Conflict {
            state,
            message: message.into(),
        }
    }

    pub fn internal(e: impl std::fmt::Display) -> Self {
        Error::Internal(e.to_string())
    }
}

impl From<sqlx::Error> for Error {
    fn from(e: sqlx::Error) -> Self {
        Error::Internal(format!("database: {e}"))
    }
}

/// Setting up (opening the platform, making cluster credentials) failed at `step`, for
/// `cause` when there is one: the message a user reads before the process exits.
#[derive(Debug)]
pub struct SetupError {
    pub step: String,
    pub cause: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl SetupError {
    pub fn new(step: impl Into<String>, cause: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        SetupError {
            step: step.into(),
            cause: Some(cause.into()),
        }
    }

    /// A refusal that is its own explanation (a flag that contradicts another, ...).
    pub fn refused(why: impl Into<String>) -> Self {
        SetupError {
            step: why.into(),
            cause: None,
        }
    }
}

impl std::fmt::Display for SetupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.cause {
            Some(cause) => write!(f, "{}: {cause}", self.step),
            None => f.write_str(&self.step),
        }
    }
}

impl std::error::Error for SetupError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.cause.as_deref().map(|c| c as &(dyn std::error::Error + 'static))
    }
}

/// Names the start-up step a fallible call belongs to.
pub trait During<T> {
    fn during(self, step: impl Into<String>) -> Result<T, SetupError>;
}

impl<T, E: Into<Box<dyn std::error::Error + Send + Sync>>> During<T> for std::result::Result<T, E> {
    fn during(self, step: impl Into<String>) -> Result<T, SetupError> {
        self.map_err(|e| SetupError::new(step, e))
    }
}

/// What a failed call to a computer's agent answers: a machine that ended under the call (it
/// crashed, or a stop, pause or delete got there first) is a computer no longer running, a
/// `409`; anything else is the agent not answering, a `503`.
pub fn agent_failure(e: stasis_vmm::vm::VmError) -> Error {
    match e {
        stasis_vmm::vm::VmError::Exited { .. } => {
            Error::conflict(Conflict::ComputerNotRunning, "computer is not running")
        }
        e => Error::Unavailable(format!("the guest agent did not answer: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_not_found_names_what_and_which() {
        let e = Error::not_found(Resource::Snapshot, "snap_1");
        assert_eq!(e.to_string(), "snapshot snap_1 not found");
    }

    #[test]
    fn a_setup_error_names_its_step_and_keeps_its_cause() {
        let e: Result<(), SetupError> = Err(std::io::Error::other("no space left")).during("preparing /data");
        let e = e.unwrap_err();
        assert_eq!(e.to_string(), "preparing /data: no space left");
        assert!(std::error::Error::source(&e).is_some());
    }
}
