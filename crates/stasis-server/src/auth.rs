//! API keys and the tenant they belong to. Keys are random, shown once, and stored only as a
//! SHA-256 hash; a request is authenticated by hashing the presented key and looking it up.

use axum::extract::{FromRequestParts, Query};
use axum::http::request::Parts;
use axum::response::{IntoResponse, Response};
use rand::distributions::Alphanumeric;
use rand::Rng;
use sha2::{Digest, Sha256};
use stasis_types::{SnapshotId, TenantId};

use crate::db::Db;
use crate::http_error::ApiError;
use crate::AppState;

const KEY_PREFIX: &str = "stasis_";

pub fn generate_key() -> String {
    let body: String = rand::thread_rng()
        .sample_iter(&Alphanumeric)
        .take(40)
        .map(char::from)
        .collect();
    format!("{KEY_PREFIX}{body}")
}

pub fn hash_key(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}

/// Creates the tenant if needed and a new key for it; returns the key in clear (only time).
pub async fn create_key(db: &Db, tenant: &str) -> Result<String, sqlx::Error> {
    let tenant = db.ensure_tenant(tenant).await?;
    let key = generate_key();
    db.insert_key(tenant, &hash_key(&key), &key[..KEY_PREFIX.len() + 4])
        .await?;
    Ok(key)
}

/// The authenticated tenant of a request (`Authorization: Bearer <key>`).
#[derive(Debug, Clone, Copy)]
pub struct Tenant(pub TenantId);

/// Set by [`authenticate`] on a request whose key was good and within its tenant's rate.
#[derive(Debug, Clone, Copy)]
pub struct Authenticated(pub TenantId);

/// The key of a request's `Authorization: Bearer` header.
pub fn bearer(headers: &axum::http::HeaderMap) -> Option<&str> {
    let h = headers.get(axum::http::header::AUTHORIZATION)?.to_str().ok()?;
    h.strip_prefix("Bearer ")
        .or_else(|| h.strip_prefix("bearer "))
        .map(str::trim)
        .filter(|k| !k.is_empty() && k.len() <= 256)
}

/// Middleware on the API: looks the key up once, applies the tenant's request rate (429 with
/// `Retry-After` beyond it), and leaves the tenant for the handlers. A bad or missing key is
/// left to the handlers' 401 (routes that need none, like /health, stay open), but failed
/// lookups count against the client's address: past its budget it gets 429 without a lookup.
/// Requests a control plane forwards to its host were counted there.
pub async fn authenticate(
    axum::extract::State(state): axum::extract::State<AppState>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    // A host takes no API keys at all: it serves only its control plane, which counted the
    // request against the tenant's rate already.
    if req.uri().path().starts_with("/api/") && state.host.is_none() {
        if let Some(key) = bearer(req.headers()) {
            let hash = hash_key(key);
            let peer = peer_of(req.extensions());
            let failures = &state.guards.auth_failures;
            if let Some(wait) = peer.and_then(|p| failures.blocked(p, &hash)) {
                return crate::net::auth_blocked(wait);
            }
            match state.db.tenant_by_key_hash(&hash).await {
                Ok(Some(t)) => {
                    failures.succeeded(&hash);
                    if let Err(e) = state.limits.admit_request(t).await {
                        return e.into_response();
                    }
                    req.extensions_mut().insert(Authenticated(t));
                }
                Ok(None) => {
                    if let Some(p) = peer {
                        failures.failed(p);
                    }
                }
                Err(e) => return ApiError::from(e).into_response(),
            }
        }
    }
    next.run(req).await
}

/// The client's address, as the listener recorded it.
pub fn peer_of(extensions: &axum::http::Extensions) -> Option<std::net::SocketAddr> {
    extensions
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0)
        .or_else(|| {
            extensions
                .get::<axum::extract::ConnectInfo<crate::tls::Peer>>()
                .map(|c| c.0.remote)
        })
}

impl FromRequestParts<AppState> for Tenant {
    type Rejection = ApiError;

    /// The key was looked up once, by [`authenticate`] (on a host: the control plane's word
    /// was taken by `cluster::guard_host`): what it did not accept is refused.
    async fn from_request_parts(parts: &mut Parts, _state: &AppState) -> Result<Self, Self::Rejection> {
        if let Some(Authenticated(t)) = parts.extensions.get::<Authenticated>() {
            return Ok(Tenant(*t));
        }
        Err(ApiError::Unauthorized)
    }
}

/// Who may open an event stream: a Bearer key, or a one-use ticket in `?ticket=` (browsers'
/// `EventSource` cannot send headers), with the snapshot the ticket is bound to, if any.
pub struct StreamTenant {
    pub tenant: TenantId,
    /// Set for a ticket: the snapshot it opens (None: any of its tenant's).
    pub ticket: Option<Option<SnapshotId>>,
}

impl FromRequestParts<AppState> for StreamTenant {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        // On a host the control plane speaks for the tenant (it took the ticket).
        if parts.headers.contains_key(axum::http::header::AUTHORIZATION) || state.host.is_some() {
            return Tenant::from_request_parts(parts, state)
                .await
                .map(|t| StreamTenant {
                    tenant: t.0,
                    ticket: None,
                })
                .map_err(IntoResponse::into_response);
        }
        #[derive(serde::Deserialize)]
        struct TicketQuery {
            ticket: Option<String>,
        }
        let unauthorized = || ApiError::Unauthorized.into_response();
        let Query(q) = Query::<TicketQuery>::from_request_parts(parts, state)
            .await
            .map_err(|_| unauthorized())?;
        let ticket = q
            .ticket
            .filter(|t| !t.is_empty() && t.len() <= 256)
            .ok_or_else(unauthorized)?;
        // Guessing tickets costs a lookup each, like guessing keys: the same budget applies.
        let hash = hash_key(&ticket);
        let peer = crate::auth::peer_of(&parts.extensions);
        let failures = &state.guards.auth_failures;
        if let Some(wait) = peer.and_then(|p| failures.blocked(p, &hash)) {
            return Err(crate::net::auth_blocked(wait));
        }
        match state
            .db
            .consume_bound_ticket(&hash)
            .await
            .map_err(|e| ApiError::from(e).into_response())?
        {
            Some(grant) => Ok(StreamTenant {
                tenant: grant.tenant,
                ticket: Some(grant.snapshot),
            }),
            None => {
                if let Some(p) = peer {
                    failures.failed(p);
                }
                Err(unauthorized())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_random_and_hashes_stable() {
        let a = generate_key();
        let b = generate_key();
        assert_ne!(a, b);
        assert!(a.starts_with(KEY_PREFIX) && a.len() == KEY_PREFIX.len() + 40);
        assert_eq!(hash_key(&a), hash_key(&a));
        assert_ne!(hash_key(&a), hash_key(&b));
        assert!(!hash_key(&a).contains(&a[KEY_PREFIX.len()..]));
    }
}
