//! The one mapping of errors to HTTP: status, stable `code`, a message a user can act on, and
//! the request id. [`ApiError`] is a domain [`Error`] or one of the request's own (a body that
//! is not JSON or too large or too slow, no key, no route); internal details are logged, never
//! sent.
//!
//! Codes are upper-case and follow the official SDK's (`miosa/errors.py` maps them to its
//! exception classes: `SNAPSHOT_NOT_READY` raises `SnapshotNotReadyError`, `VALIDATION_FAILED`
//! `ValidationError`, `TOO_LARGE` `PayloadTooLargeError`, ...); where it has none, the same
//! style.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::error::{Conflict, Error};

tokio::task_local! {
    /// The id of the request being served (set by the request-id middleware).
    pub static REQUEST_ID: String;
}

pub fn current_request_id() -> String {
    REQUEST_ID.try_with(|id| id.clone()).unwrap_or_default()
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Domain(#[from] Error),
    /// 400: the body is not JSON (or not an object), or cannot be read.
    #[error("{0}")]
    BadRequest(String),
    #[error("request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    /// 408: the body did not arrive within the time a request has for it.
    #[error("the request body did not arrive within {0} s")]
    BodyTimeout(u64),
    #[error("missing or invalid API key")]
    Unauthorized,
    /// 401 from a preview host: the port is private.
    #[error("{0}")]
    PrivatePort(String),
    /// 403 with the reason.
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    RouteNotFound(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    /// 502: a port inside a computer did not answer the proxy.
    #[error("{0}")]
    BadGateway(String),
    /// 429: the tenant has the most long requests (exec calls, event streams) open it may.
    #[error("this tenant already has {0} exec calls and event streams open, the most it may have at once; retry when one has finished")]
    TooManyStreams(usize),
    /// 426: a WebSocket endpoint asked without the upgrade.
    #[error("this endpoint is a WebSocket: connect with an Upgrade: websocket request")]
    UpgradeRequired,
    /// 429: too many requests with a bad key from one address.
    #[error("too many requests with a missing or invalid API key from this address; retry in {0} s")]
    AuthBlocked(u64),
}

pub type ApiResult<T> = Result<T, ApiError>;

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        ApiError::Domain(e.into())
    }
}

impl ApiError {
    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        Error::invalid(field, message).into()
    }

    pub fn conflict(state: Conflict, message: impl Into<String>) -> Self {
        Error::conflict(state, message).into()
    }

    pub fn internal(e: impl std::fmt::Display) -> Self {
        Error::internal(e).into()
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        Error::Unavailable(message.into()).into()
    }

    fn status_and_code(&self) -> (StatusCode, String) {
        let (status, code) = match self {
            ApiError::Domain(e) => match e {
                Error::NotFound { kind, .. } => {
                    return (
                        StatusCode::NOT_FOUND,
                        format!("{}_NOT_FOUND", kind.name().to_ascii_uppercase()),
                    )
                }
                Error::Conflict { state, .. } => (StatusCode::CONFLICT, conflict_code(*state)),
                Error::Quota(_) => (StatusCode::FORBIDDEN, "QUOTA_EXCEEDED"),
                Error::Throttled { .. } => (StatusCode::TOO_MANY_REQUESTS, "RATE_LIMITED"),
                Error::TooManySessions(_) => (StatusCode::TOO_MANY_REQUESTS, "TOO_MANY_SESSIONS"),
                Error::Invalid { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "VALIDATION_FAILED"),
                Error::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE"),
                Error::File { kind, .. } => file_status(*kind),
                Error::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL"),
            },
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "INVALID_JSON"),
            ApiError::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "TOO_LARGE"),
            ApiError::BodyTimeout(_) => (StatusCode::REQUEST_TIMEOUT, "REQUEST_TIMEOUT"),
            ApiError::Unauthorized | ApiError::PrivatePort(_) => (StatusCode::UNAUTHORIZED, "UNAUTHORIZED"),
            ApiError::Forbidden(_) => (StatusCode::FORBIDDEN, "FORBIDDEN"),
            ApiError::RouteNotFound(_) => (StatusCode::NOT_FOUND, "NOT_FOUND"),
            ApiError::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "METHOD_NOT_ALLOWED"),
            ApiError::BadGateway(_) => (StatusCode::BAD_GATEWAY, "PORT_UNREACHABLE"),
            ApiError::TooManyStreams(_) => (StatusCode::TOO_MANY_REQUESTS, "TOO_MANY_STREAMS"),
            ApiError::AuthBlocked(_) => (StatusCode::TOO_MANY_REQUESTS, "TOO_MANY_FAILED_KEYS"),
            ApiError::UpgradeRequired => (StatusCode::UPGRADE_REQUIRED, "WEBSOCKET_REQUIRED"),
        };
        (status, code.to_string())
    }

    /// When a 429 may be retried.
    fn retry_after(&self) -> Option<u64> {
        match self {
            ApiError::Domain(Error::Throttled { retry_after_secs, .. }) => Some(*retry_after_secs),
            ApiError::TooManyStreams(_) => Some(1),
            ApiError::Domain(Error::TooManySessions(_)) => Some(5),
            ApiError::AuthBlocked(secs) => Some(*secs),
            _ => None,
        }
    }

    /// What the client is told: the seed's wording for a resource not found (the id is the
    /// client's own), a generic line for internal faults.
    fn message(&self) -> String {
        match self {
            ApiError::Domain(Error::NotFound { kind, .. }) => format!("{kind} not found"),
            ApiError::Domain(Error::Internal(_)) => "internal error".into(),
            other => other.to_string(),
        }
    }
}

/// The status and code of a failed file operation (`INVALID_PATH` is the SDK's).
fn file_status(kind: stasis_agent_proto::FsErrorKind) -> (StatusCode, &'static str) {
    use stasis_agent_proto::FsErrorKind as K;
    match kind {
        K::NotFound => (StatusCode::NOT_FOUND, "FILE_NOT_FOUND"),
        K::NotADirectory => (StatusCode::CONFLICT, "NOT_A_DIRECTORY"),
        K::IsADirectory => (StatusCode::CONFLICT, "IS_A_DIRECTORY"),
        K::PermissionDenied => (StatusCode::FORBIDDEN, "PERMISSION_DENIED"),
        K::AlreadyExists => (StatusCode::CONFLICT, "ALREADY_EXISTS"),
        K::NotEmpty => (StatusCode::CONFLICT, "NOT_EMPTY"),
        K::NoSpace => (StatusCode::INSUFFICIENT_STORAGE, "DISK_FULL"),
        K::Invalid => (StatusCode::UNPROCESSABLE_ENTITY, "INVALID_PATH"),
        K::Other => (StatusCode::CONFLICT, "FILE_OPERATION_FAILED"),
    }
}

/// The wire code of a conflict: the official SDK's where it has one.
fn conflict_code(state: Conflict) -> &'static str {
    match state {
        Conflict::ComputerNotRunning => "COMPUTER_NOT_RUNNING",
        Conflict::ComputerStarting => "COMPUTER_STARTING",
        Conflict::ComputerBusy => "RESOURCE_STATE",
        Conflict::InsufficientCapacity => "INSUFFICIENT_CAPACITY",
        Conflict::SnapshotNotReady => "SNAPSHOT_NOT_READY",
        Conflict::SnapshotInUse => "SNAPSHOT_IN_USE",
        Conflict::SnapshotIncompatible => "SNAPSHOT_INCOMPATIBLE",
        Conflict::WrongHost => "WRONG_HOST",
        Conflict::IdempotencyInProgress => "IDEMPOTENCY_IN_PROGRESS",
        Conflict::NoNetwork => "NO_NETWORK",
        Conflict::NoEgressPolicy => "NO_EGRESS_POLICY",
        Conflict::EnvVarExists => "ENV_VAR_EXISTS",
        Conflict::MustBeStopped => "RESOURCE_STATE",
        Conflict::AgentTooOld => "AGENT_TOO_OLD",
        Conflict::SessionAttached => "SESSION_ATTACHED",
        Conflict::NameTaken => "NAME_TAKEN",
        Conflict::SnapshotAlreadyNamed => "SNAPSHOT_ALREADY_NAMED",
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let request_id = current_request_id();
        if let ApiError::Domain(Error::Internal(detail)) = &self {
            tracing::error!(request_id, detail, "internal error");
        }
        let mut error = json!({
            "code": code,
            "message": self.message(),
            "request_id": request_id,
        });
        if let ApiError::Domain(Error::Invalid { field, .. }) = &self {
            error["field"] = json!(field);
        }
        let mut resp = (status, axum::Json(json!({ "error": error }))).into_response();
        if let Some(secs) = self.retry_after() {
            resp.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, secs.max(1).into());
        }
        resp
    }
}

impl IntoResponse for Error {
    fn into_response(self) -> Response {
        ApiError::Domain(self).into_response()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::Resource;

    async fn body_of(resp: Response) -> serde_json::Value {
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
        serde_json::from_slice(&body).unwrap()
    }

    #[tokio::test]
    async fn errors_carry_code_message_and_request_id() {
        let resp = REQUEST_ID
            .scope("req-1".to_string(), async {
                Error::conflict(Conflict::ComputerNotRunning, "computer is not running").into_response()
            })
            .await;
        assert_eq!(resp.status(), StatusCode::CONFLICT);
        let v = body_of(resp).await;
        assert_eq!(v["error"]["code"], "COMPUTER_NOT_RUNNING");
        assert_eq!(v["error"]["message"], "computer is not running");
        assert_eq!(v["error"]["request_id"], "req-1");
    }

    #[tokio::test]
    async fn internal_details_are_not_sent() {
        let resp = Error::internal("disk on fire at /var/secret").into_response();
        assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let v = body_of(resp).await;
        assert_eq!(v["error"]["message"], "internal error");
        assert!(!v.to_string().contains("secret"));
    }

    #[tokio::test]
    async fn not_found_uses_the_seed_wording() {
        let e = ApiError::from(Error::not_found(Resource::Computer, "cmp_x"));
        assert_eq!(
            e.status_and_code(),
            (StatusCode::NOT_FOUND, "COMPUTER_NOT_FOUND".into())
        );
        assert_eq!(
            body_of(e.into_response()).await["error"]["message"],
            "computer not found"
        );
    }

    #[tokio::test]
    async fn each_domain_error_has_its_status_and_a_throttle_says_when_to_retry() {
        let cases: Vec<(Error, StatusCode, &str)> = vec![
            (
                Error::Quota("quota exceeded: computers".into()),
                StatusCode::FORBIDDEN,
                "QUOTA_EXCEEDED",
            ),
            (
                Error::invalid("size", "size must be one of ..."),
                StatusCode::UNPROCESSABLE_ENTITY,
                "VALIDATION_FAILED",
            ),
            (
                Error::Unavailable("no host".into()),
                StatusCode::SERVICE_UNAVAILABLE,
                "UNAVAILABLE",
            ),
            (
                Error::conflict(Conflict::SnapshotNotReady, "snapshot is not ready"),
                StatusCode::CONFLICT,
                "SNAPSHOT_NOT_READY",
            ),
            (
                Error::Throttled {
                    retry_after_secs: 3,
                    limit: 5,
                },
                StatusCode::TOO_MANY_REQUESTS,
                "RATE_LIMITED",
            ),
        ];
        for (e, status, code) in cases {
            let throttled = matches!(e, Error::Throttled { .. });
            let invalid = matches!(e, Error::Invalid { .. });
            let resp = e.into_response();
            assert_eq!(resp.status(), status);
            assert_eq!(resp.headers().get("retry-after").is_some(), throttled);
            let v = body_of(resp).await;
            assert_eq!(v["error"]["code"], code);
            assert_eq!(v["error"]["field"] == "size", invalid);
        }
    }
}
