//! `Idempotency-Key` on POSTs that create things: the first answer is recorded and a retry
//! with the same key gets it again instead of doing the work twice. A claim whose request is
//! dropped (the client went away) is given back; one whose process died is taken over once it
//! is [`CLAIM_LEASE`] old; records are pruned after a day (`Db::prune_expired`).

use std::time::{Duration, Instant};

use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use stasis_types::TenantId;

use crate::db::{Db, Idempotency};
use crate::http_error::{ApiError, ApiResult};

pub const HEADER: &str = "idempotency-key";
/// How long a retry waits for the first request with its key to finish.
const WAIT_FOR_FIRST: Duration = Duration::from_secs(60);
/// How old a claim still in progress must be before a retry takes it over: longer than any
/// create, restore or clone takes.
pub const CLAIM_LEASE: Duration = Duration::from_secs(15 * 60);

/// Gives a claim back if its request is dropped before it finished (a client that disconnects
/// drops the handler's future, and with it the work).
struct Claim<'a> {
    db: &'a Db,
    tenant: TenantId,
    key: String,
    armed: bool,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let (db, tenant, key) = (self.db.clone(), self.tenant, std::mem::take(&mut self.key));
        rt.spawn(async move {
            if let Err(e) = db.release_idempotency_key(tenant, &key).await {
                tracing::warn!(error = %e, "giving back the Idempotency-Key of a dropped request");
            }
        });
    }
}

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
        let claimed = match db.claim_idempotency_key(tenant, &key, &fingerprint).await {
            // The claim it collided with was given back between its insert and its read.
            Err(sqlx::Error::RowNotFound) if started.elapsed() < WAIT_FOR_FIRST => continue,
            other => other?,
        };
        match claimed {
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
            Idempotency::InProgress
                if db
                    .take_over_idempotency_key(
                        tenant,
                        &key,
                        &fingerprint,
                        chrono::Utc::now() - chrono::Duration::from_std(CLAIM_LEASE).expect("a small duration"),
                    )
                    .await? =>
            {
                break
            }
            Idempotency::InProgress if started.elapsed() < WAIT_FOR_FIRST => {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            Idempotency::InProgress => {
                return Err(ApiError::conflict(
                    crate::error::Conflict::IdempotencyInProgress,
                    "a request with this Idempotency-Key is still being processed",
                ))
            }
        }
    }
    let mut claim = Claim {
        db,
        tenant,
        key: key.clone(),
        armed: true,
    };
    let done = work.await;
    match done {
        Ok((status, body)) => {
            db.record_idempotent_answer(tenant, &key, status.as_u16(), &body.to_string())
                .await?;
            claim.armed = false;
            Ok((status, axum::Json(body)).into_response())
        }
        Err(e) => {
            // Nothing was done: a retry may try again.
            db.release_idempotency_key(tenant, &key).await?;
            claim.armed = false;
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with_key(key: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(HEADER, key.parse().unwrap());
        h
    }

    /// A request cancelled mid-work (its future dropped, as when the client disconnects) must
    /// not leave its key claimed: the retry does the work at once instead of waiting 60 s and
    /// getting 409.
    #[tokio::test]
    async fn a_dropped_request_gives_its_key_back() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open_sqlite(&dir.path().join("t.db")).await.unwrap();
        let tenant = db.ensure_tenant("t").await.unwrap();
        let headers = with_key("k1");
        let hung = once(&db, tenant, &headers, "POST /x".into(), async {
            std::future::pending::<()>().await;
            Ok((StatusCode::CREATED, serde_json::json!({})))
        });
        assert!(tokio::time::timeout(Duration::from_millis(300), hung).await.is_err());
        let retry = once(&db, tenant, &headers, "POST /x".into(), async {
            Ok((StatusCode::CREATED, serde_json::json!({"done": true})))
        });
        let resp = tokio::time::timeout(Duration::from_secs(10), retry)
            .await
            .expect("the retry does not wait for the dropped request")
            .unwrap();
        assert_eq!(resp.status(), StatusCode::CREATED);
        assert!(resp.headers().get("idempotent-replayed").is_none());
    }

    /// A claim left behind by a process that died is taken over once past its lease.
    #[tokio::test]
    async fn a_stale_claim_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open_sqlite(&dir.path().join("t.db")).await.unwrap();
        let tenant = db.ensure_tenant("t").await.unwrap();
        let old =
            (chrono::Utc::now() - chrono::Duration::hours(1)).to_rfc3339_opts(chrono::SecondsFormat::Millis, true);
        sqlx::query(
            "INSERT INTO idempotency_keys (tenant_id, key, fingerprint, created_at) VALUES ($1, 'k2', 'POST /x', $2)",
        )
        .bind(tenant.to_string())
        .bind(old)
        .execute(db.pool())
        .await
        .unwrap();
        let headers = with_key("k2");
        let retry = once(&db, tenant, &headers, "POST /x".into(), async {
            Ok((StatusCode::CREATED, serde_json::json!({})))
        });
        let resp = tokio::time::timeout(Duration::from_secs(10), retry)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(resp.status(), StatusCode::CREATED);
    }
}
