//! `Idempotency-Key` on POSTs that create things: the first answer is recorded and a retry
//! with the same key gets it again instead of doing the work twice.

use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use stasis_types::TenantId;

use crate::db::{Db, Idempotency};
use crate::error::{ApiError, ApiResult};

pub const HEADER: &str = "idempotency-key";
/// How long a retry waits for the first request with its key to finish.
const WAIT_FOR_FIRST: Duration = Duration::from_secs(60);

/// Runs `work` once per (tenant, key); `fingerprint` names the request (method and path), so
/// a key reused for a different request is refused.
pub async fn once<F>(
    db: &Db,
    tenant: TenantId,
    headers: &HeaderMap,
    fingerprint: String,
    work: F,
) -> ApiResult<Response>
where
    F: std::future::Future<Output = ApiResult<(StatusCode, serde_json::Value)>>,
{
    let Some(key) = headers.get(HEADER) else {
        return work
            .await
            .map(|(status, body)| (status, axum::Json(body)).into_response());
    };
    let key = key
        .to_str()
        .ok()
        .map(str::trim)
        .filter(|k| !k.is_empty() && k.len() <= 255)
        .ok_or_else(|| ApiError::invalid("Idempotency-Key", "Idempotency-Key must be 1 to 255 visible characters"))?
        .to_string();
    let started = Instant::now();
    loop {
        match db.claim_idempotency_key(tenant, &key, &fingerprint).await? {
            Idempotency::Proceed => break,
            Idempotency::Replay { status, body } => {
                let status = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
                let body: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
                let mut resp = (status, axum::Json(body)).into_response();
                resp.headers_mut()
                    .insert("idempotent-replayed", "true".parse().expect("a valid header value"));
                return Ok(resp);
            }
            Idempotency::Mismatch => {
                return Err(ApiError::invalid(
                    "Idempotency-Key",
                    "this Idempotency-Key was already used for a different request",
                ))
            }
            Idempotency::InProgress if started.elapsed() < WAIT_FOR_FIRST => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Idempotency::InProgress => {
                return Err(ApiError::conflict(
                    "idempotency_in_progress",
                    "a request with this Idempotency-Key is still being processed",
                ))
            }
        }
    }
    match work.await {
        Ok((status, body)) => {
            db.record_idempotent_answer(tenant, &key, status.as_u16(), &body.to_string())
                .await?;
            Ok((status, axum::Json(body)).into_response())
        }
        Err(e) => {
            // Nothing was done: a retry may try again.
            db.release_idempotency_key(tenant, &key).await?;
            Err(e)
        }
    }
}
