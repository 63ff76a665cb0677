//! The API's one error type and its one mapping to HTTP: status, stable `code`, a message a
//! user can act on, and the request id. Internal details are logged, never sent.

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
    #[error("{message}")]
    Conflict { code: &'static str, message: String },
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
    /// 403 `quota_exceeded`: the message names the quota and the usage.
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

impl ApiError {
    pub fn invalid(field: &str, message: impl Into<String>) -> Self {
        ApiError::Invalid {
            field: field.to_string(),
            message: message.into(),
        }
    }

    pub fn conflict(code: &'static str, message: impl Into<String>) -> Self {
        ApiError::Conflict {
            code,
            message: message.into(),
        }
    }

    pub fn internal(e: impl std::fmt::Display) -> Self {
        ApiError::Internal(e.to_string())
    }

    fn status_and_code(&self) -> (StatusCode, String) {
        match self {
            ApiError::NotFound { kind } => (StatusCode::NOT_FOUND, format!("{}_not_found", kind.replace(' ', "_"))),
            ApiError::Conflict { code, .. } => (StatusCode::CONFLICT, code.to_string()),
            ApiError::Invalid { .. } => (StatusCode::UNPROCESSABLE_ENTITY, "validation_failed".into()),
            ApiError::BadRequest(_) => (StatusCode::BAD_REQUEST, "invalid_json".into()),
            ApiError::PayloadTooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large".into()),
            ApiError::BodyTimeout(_) => (StatusCode::REQUEST_TIMEOUT, "request_timeout".into()),
            ApiError::Unauthorized => (StatusCode::UNAUTHORIZED, "unauthorized".into()),
            ApiError::Forbidden => (StatusCode::FORBIDDEN, "forbidden".into()),
            ApiError::Quota(_) => (StatusCode::FORBIDDEN, "quota_exceeded".into()),
            ApiError::RateLimited { .. } => (StatusCode::TOO_MANY_REQUESTS, "rate_limited".into()),
            ApiError::RouteNotFound(_) => (StatusCode::NOT_FOUND, "not_found".into()),
            ApiError::MethodNotAllowed => (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed".into()),
            ApiError::Unavailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "unavailable".into()),
            ApiError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "internal".into()),
        }
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
                ApiError::conflict("computer_not_running", "computer is not running").into_response()
            })
            .await;
        assert_eq!(resp.status(), StatusCode::CONFLICT);
        let body = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["error"]["code"], "computer_not_running");
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
        assert_eq!(e.status_and_code().1, "computer_not_found");
    }
}
