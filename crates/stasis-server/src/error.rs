//! The API's one error type and its one mapping to HTTP: status, stable `code`, a message a
//! user can act on, and the request id. Internal details are logged, never sent.
//!
//! Codes are upper-case and follow the official SDK's (`miosa/errors.py` maps them to its
//! exception classes: `SNAPSHOT_NOT_READY` raises `SnapshotNotReadyError`, `VALIDATION_FAILED`
//! `ValidationError`, `TOO_LARGE` `PayloadTooLargeError`, ...); where it has none, the same
//! style.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

tokio::task_local! {
    /// The id of the request being served (set by the request-id middleware).
    pub static REQUEST_ID: String;
}

pub fn current_request_id() -> String {
    REQUEST_ID.try_with(|id| id.clone()).unwrap_or_default()
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 404 with the seed's wording: `computer not found`, `snapshot not found`.
    #[error("{kind} not found")]
    NotFound { kind: &'static str },
    /// 409: the state of something forbids the request.
    #[error("{message}")]
    Conflict { kind: Conflict, message: String },
    /// 422: a field is missing, of the wrong type, or out of range.
    #[error("{message}")]
    Invalid { field: String, message: String },
    /// 400: the body is not JSON (or not an object).
    #[error("{0}")]
    BadRequest(String),
    #[error("request body is larger than {0} bytes")]
    PayloadTooLarge(usize),
    /// 408: the body did not arrive within the time a request has for it.
    #[error("the request body did not arrive within {0} s")]
    BodyTimeout(u64),
    #[error("missing or invalid API key")]
    Unauthorized,
    #[error("forbidden")]
    Forbidden,
    /// 403 with the reason.
    #[error("{0}")]
    ForbiddenBecause(String),
    /// 403 `QUOTA_EXCEEDED`: the message names the quota and the usage.
    #[error("{0}")]
    Quota(String),
    /// 429 with `Retry-After`.
    #[error("too many requests: this tenant may make {limit} per second; retry in {retry_after_secs} s")]
    RateLimited { retry_after_secs: u64, limit: u64 },
    #[error("{0}")]
    RouteNotFound(String),
    #[error("method not allowed")]
    MethodNotAllowed,
    #[error("{0}")]
    Unavailable(String),
    /// 500: logged in full, answered with a generic message.
    #[error("internal error")]
    Internal(String),
}

/// What state forbids a request (each a 409 with its own code).
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
    IdempotencyInProgress,
}

impl Conflict {
    /// The wire code: the official SDK's where it has one.
    pub fn code(self) -> &'static str {
        match self {
            Conflict::ComputerNotRunning => "COMPUTER_NOT_RUNNING",
            Conflict::ComputerStarting => "COMPUTER_STARTING",
            Conflict::ComputerBusy => "RESOURCE_STATE",
            Conflict::InsufficientCapacity => "INSUFFICIENT_CAPACITY",
            Conflict::SnapshotNotReady => "SNAPSHOT_NOT_READY",
            Conflict::SnapshotInUse => "SNAPSHOT_IN_USE",
            Conflict::SnapshotIncompatible => "SNAPSHOT_INCOMPATIBLE",
            Conflict::WrongHost => "WRONG_HOST",
            Conflict::IdempotencyInProgress => "IDEMPOTENCY_IN_PROGRESS",
        }
    }
}

impl ApiError {
    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        ApiError::Invalid {
            field: field.to_string(),
            message: message.into(),
        }
    }

    pub fn conflict(kind: Conflict, message: impl Into<String>) -> Self {
        ApiError::Conflict {
            kind,
            message: message.into(),
        }
    }

    pub fn internal(e: impl std::fmt::Display) -> Self {
        ApiError::Internal(e.to_string())
    }

    fn status_and_code(&self) -> (StatusCode, String) {
        let (status, code) = match self {
            ApiError::NotFound { kind } => {
                return (
                    StatusCode::NOT_FOUND,
                    format!("{}_NOT_FOUND", kind.replace(' ', "_").to_ascii_uppercase()),
                )
            }
            ApiError::Conflict { kind, .. } => (StatusCode::CONFLICT, kind.code()),
            ApiError::Invalid { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "VALIDATION_FAILED"),
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "INVALID_JSON"),
            ApiError::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "TOO_LARGE"),
            ApiError::BodyTimeout(_) => (StatusCode::REQUEST_TIMEOUT, "REQUEST_TIMEOUT"),
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "UNAUTHORIZED"),
            ApiError::Forbidden | ApiError::ForbiddenBecause(_) => (StatusCode::FORBIDDEN, "FORBIDDEN"),
            ApiError::Quota(_) => (StatusCode::FORBIDDEN, "QUOTA_EXCEEDED"),
            ApiError::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "RATE_LIMITED"),
            ApiError::RouteNotFound(_) => (StatusCode::NOT_FOUND, "NOT_FOUND"),
            ApiError::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "METHOD_NOT_ALLOWED"),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "UNAVAILABLE"),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL"),
        };
        (status, code.to_string())
    }
}

impl From<sqlx::Error> for ApiError {
    fn from(e: sqlx::Error) -> Self {
        ApiError::Internal(format!("database: {e}"))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (status, code) = self.status_and_code();
        let request_id = current_request_id();
        if let ApiError::Internal(detail) = &self {
            tracing::error!(request_id, detail, "internal error");
        }
        let mut error = json!({
            "code": code,
            "message": self.to_string(),
            "request_id": request_id,
        });
        if let ApiError::Invalid { field, .. } = &self {
            error["field"] = json!(field);
        }
        let mut resp = (status, axum::Json(json!({ "error": error }))).into_response();
        if let ApiError::RateLimited { retry_after_secs, .. } = &self {
            resp.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, (*retry_after_secs).into());
        }
        resp
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn errors_carry_code_message_and_request_id() {
        let resp = REQUEST_ID
            .scope("req-1".to_string(), async {
                ApiError::conflict(Conflict::ComputerNotRunning, "computer is not running").into_response()
            })
            .await;
        assert_eq!(resp.status(), StatusCode::CONFLICT);
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["code"], "COMPUTER_NOT_RUNNING");
        assert_eq!(v["error"]["message"], "computer is not running");
        assert_eq!(v["error"]["request_id"], "req-1");
    }

    #[tokio::test]
    async fn internal_details_are_not_sent() {
        let resp = ApiError::internal("disk on fire at /var/secret").into_response();
        assert_eq!(resp.status(), StatusCode::INTERNAL_SERVER_ERROR);
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
        assert!(!String::from_utf8_lossy(&body).contains("secret"));
    }

    #[test]
    fn not_found_uses_the_seed_wording() {
        let e = ApiError::NotFound { kind: "computer" };
        assert_eq!(e.to_string(), "computer not found");
        assert_eq!(e.status_and_code().1, "COMPUTER_NOT_FOUND");
    }
}
