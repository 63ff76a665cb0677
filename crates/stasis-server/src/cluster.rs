//! Several hosts behind one control plane.
//!
//! The control plane (`stasis serve --cluster-token T`, on PostgreSQL and S3) keeps the
//! metadata and answers reads itself. Hosts (`stasis host --control-plane URL`) run the
//! computers: each runs this same platform on the shared database and store, recording and
//! reconciling only its own computers, and heartbeats to the control plane, which hands it the
//! database and store to use. Requests that act on a machine go to the host that runs it;
//! creates and restores go to the host with the most free memory that has room. A host that
//! stops heartbeating is lost: its computers turn `error` and its unfinished snapshots
//! `failed`, while its finished snapshots, being in the store, restore on any other host.

use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use stasis_types::{ComputerId, Size, TenantId};

use crate::auth::{bearer, Tenant};
use crate::db::{Db, HostRecord};
use crate::error::{ApiError, REQUEST_ID};
use crate::AppState;

/// Carries the tenant a control plane acts for, on its requests to hosts.
pub const TENANT_HEADER: &str = "x-stasis-tenant";

/// What a host says in each heartbeat.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Heartbeat {
    pub id: String,
    /// Where the control plane reaches the host's API (`http://ADDR`).
    pub url: String,
    pub capacity_mib: i64,
    pub vcpus: i64,
}

/// What the control plane answers: the backends every host must share.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Joined {
    pub database_url: String,
    pub store_url: String,
    pub s3_endpoint: Option<String>,
    pub s3_region: Option<String>,
    pub heartbeat_secs: u64,
    /// The tenants' default limits, which hosts apply too.
    #[serde(default)]
    pub limits: crate::limits::TenantLimits,
}

/// The part of a platform that is a control plane of hosts.
pub struct ControlPlane {
    pub token: String,
    pub host_timeout: Duration,
    pub joined: Joined,
    http: reqwest::Client,
}

/// Whether `given` is the cluster token (in constant time).
pub fn token_matches(token: &str, given: &str) -> bool {
    use sha2::Digest;
    let a = sha2::Sha256::digest(token.as_bytes());
    let b = sha2::Sha256::digest(given.as_bytes());
    a.iter().zip(b.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// On a host: a request from its control plane, acting for a tenant.
pub fn tenant_from_control_plane(token: &str, headers: &HeaderMap) -> Option<TenantId> {
    let given = bearer(headers)?;
    if !token_matches(token, given) {
        return None;
    }
    headers.get(TENANT_HEADER)?.to_str().ok()?.parse().ok()
}

impl ControlPlane {
    pub fn new(token: String, host_timeout: Duration, joined: Joined) -> ControlPlane {
        ControlPlane {
            token,
            host_timeout,
            joined,
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(5))
                .build()
                .expect("HTTP client"),
        }
    }

    fn alive(&self, h: &HostRecord) -> bool {
        h.status == "alive"
            && chrono::Utc::now() - h.last_seen
                <= chrono::Duration::from_std(self.host_timeout).unwrap_or(chrono::Duration::MAX)
    }

    /// The host with the most free memory that has `need_mib` free.
    pub async fn place(&self, db: &Db, need_mib: u64) -> Result<HostRecord, ApiError> {
        let hosts = db.hosts().await?;
        let held = db.host_sizes().await?;
        let mut best: Option<(i64, HostRecord)> = None;
        let mut alive = 0;
        for h in hosts.into_iter().filter(|h| self.alive(h)) {
            alive += 1;
            let used: i64 = held
                .iter()
                .filter(|(host, _)| *host == h.id)
                .filter_map(|(_, size)| Size::parse(size))
                .map(|s| s.memory_mib() as i64)
                .sum();
            let free = h.capacity_mib - used;
            if free >= need_mib as i64 && best.as_ref().is_none_or(|(f, _)| free > *f) {
                best = Some((free, h));
            }
        }
        match best {
            Some((_, h)) => Ok(h),
            None if alive == 0 => Err(ApiError::Unavailable("no host has joined the control plane".into())),
            None => Err(ApiError::conflict(
                "insufficient_capacity",
                format!("no host has room for a computer of {need_mib} MiB"),
            )),
        }
    }

    /// The live host running `computer`, if it runs on one.
    async fn host_of(&self, db: &Db, computer: ComputerId) -> Result<Option<HostRecord>, ApiError> {
        let Some(id) = db.host_of(computer).await? else {
            return Ok(None);
        };
        Ok(db.hosts().await?.into_iter().find(|h| h.id == id && self.alive(h)))
    }

    /// Sends the request on to a host, as the tenant, and streams its answer back.
    async fn forward(
        &self,
        host: &HostRecord,
        tenant: TenantId,
        parts: &axum::http::request::Parts,
        body: Body,
    ) -> Response {
        let path = parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let url = format!("{}{path}", host.url.trim_end_matches('/'));
        let body = match axum::body::to_bytes(body, crate::body::MAX_BODY_BYTES).await {
            Ok(b) => b,
            Err(_) => return ApiError::BadRequest("request body too large or unreadable".into()).into_response(),
        };
        let method = reqwest::Method::from_bytes(parts.method.as_str().as_bytes()).unwrap_or(reqwest::Method::GET);
        let mut req = self
            .http
            .request(method, &url)
            .bearer_auth(&self.token)
            .header(TENANT_HEADER, tenant.to_string());
        for (name, value) in &parts.headers {
            let n = name.as_str();
            if matches!(n, "content-type" | "idempotency-key" | "last-event-id" | "accept") {
                req = req.header(n, value.as_bytes());
            }
        }
        let request_id = REQUEST_ID.try_with(|id| id.clone()).unwrap_or_default();
        req = req.header("x-stasis-request-id", request_id);
        match req.body(body).send().await {
            Ok(resp) => {
                let mut out = Response::builder().status(resp.status().as_u16());
                for (name, value) in resp.headers() {
                    if matches!(name.as_str(), "content-type" | "cache-control" | "retry-after") {
                        out = out.header(name.as_str(), value.as_bytes());
                    }
                }
                out.body(Body::from_stream(resp.bytes_stream()))
                    .unwrap_or_else(|_| StatusCode::BAD_GATEWAY.into_response())
            }
            Err(e) => ApiError::Unavailable(format!("host {} did not answer: {e}", host.id)).into_response(),
        }
    }

    /// Marks hosts that stopped heartbeating lost, once a second, for as long as it runs.
    /// Hosts could not heartbeat while this control plane was down, so none is judged before
    /// it has been up for a whole timeout.
    pub async fn watch_hosts(
        self: std::sync::Arc<Self>,
        db: Db,
        computers: std::sync::Arc<crate::computers::Computers>,
    ) {
        tokio::time::sleep(self.host_timeout).await;
        loop {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let Ok(hosts) = db.hosts().await else { continue };
            for h in hosts.iter().filter(|h| h.status == "alive" && !self.alive(h)) {
                let reason = format!(
                    "host lost: {} stopped heartbeating (last seen {})",
                    h.id,
                    h.last_seen.to_rfc3339()
                );
                match db.lose_host(&h.id, &reason).await {
                    Ok(true) => {
                        tracing::warn!(host = h.id, "host lost; its computers are marked error");
                        computers.notify_changed();
                    }
                    Ok(false) => {}
                    Err(e) => tracing::warn!(host = h.id, error = %e, "marking a host lost"),
                }
            }
        }
    }
}

/// `POST /internal/v1/hosts/heartbeat`: a host joins or stays in the control plane.
pub async fn heartbeat(State(state): State<AppState>, headers: HeaderMap, Json(beat): Json<Heartbeat>) -> Response {
    let Some(cp) = state.control_plane.clone() else {
        return ApiError::RouteNotFound("this platform is not a control plane".into()).into_response();
    };
    if !bearer(&headers).is_some_and(|t| token_matches(&cp.token, t)) {
        return ApiError::Unauthorized.into_response();
    }
    if beat.id.is_empty() || !(beat.url.starts_with("http://") || beat.url.starts_with("https://")) {
        return ApiError::BadRequest("a heartbeat needs the host's id and its http:// URL".into()).into_response();
    }
    if let Err(e) = state
        .db
        .heartbeat_host(&beat.id, &beat.url, beat.capacity_mib, beat.vcpus)
        .await
    {
        return ApiError::from(e).into_response();
    }
    Json(cp.joined.clone()).into_response()
}

/// Where a control plane sends an API request it does not answer itself.
enum Route {
    /// Create or restore: to the host with the most room.
    Place,
    /// To the host running this computer (here if it runs on none, or its host is lost).
    Owner(ComputerId),
}

/// None: the control plane answers it itself.
fn route(method: &Method, path: &str) -> Option<Route> {
    let parts: Vec<&str> = path.strip_prefix("/api/v1/")?.split('/').collect();
    match (method, parts.as_slice()) {
        (&Method::POST, ["computers"]) => Some(Route::Place),
        (&Method::POST, ["computers", _, "restore", _]) => Some(Route::Place),
        // Reads come from the shared database; deleting a snapshot is metadata (the control
        // plane collects the store).
        (&Method::GET, ["computers", ..]) if !path.ends_with("/events") => None,
        (&Method::DELETE, ["computers", _, "snapshots", _]) => None,
        (_, ["computers", id, ..]) => id.parse().ok().map(Route::Owner),
        _ => None,
    }
}

/// Middleware on a control plane: sends machine work to hosts.
pub async fn dispatch(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let Some(cp) = state.control_plane.clone() else {
        return next.run(req).await;
    };
    let Some(route) = route(req.method(), req.uri().path()) else {
        return next.run(req).await;
    };
    // Unauthenticated requests get their 401 from the handlers.
    let Some(crate::auth::Authenticated(tenant)) = req.extensions().get().copied() else {
        return next.run(req).await;
    };
    let (parts, mut body) = req.into_parts();
    let host = match route {
        Route::Place => {
            let mut size = None;
            if parts.uri.path().trim_end_matches('/') == "/api/v1/computers" {
                // Peek at the size asked for (the host validates the body properly).
                let Ok(bytes) = axum::body::to_bytes(body, crate::body::MAX_BODY_BYTES).await else {
                    return ApiError::PayloadTooLarge(crate::body::MAX_BODY_BYTES).into_response();
                };
                size = serde_json::from_slice::<serde_json::Value>(&bytes)
                    .ok()
                    .and_then(|v| v.get("size").and_then(|s| s.as_str()).and_then(Size::parse));
                body = Body::from(bytes);
            }
            let need = match need_mib(&state, tenant, &parts, size).await {
                Ok(n) => n,
                Err(e) => return e.into_response(),
            };
            match cp.place(&state.db, need).await {
                Ok(h) => h,
                Err(e) => return e.into_response(),
            }
        }
        Route::Owner(id) => match cp.host_of(&state.db, id).await {
            Ok(Some(h)) => h,
            Ok(None) => return next.run(Request::from_parts(parts, body)).await,
            Err(e) => return e.into_response(),
        },
    };
    tracing::debug!(host = host.id, path = parts.uri.path(), "forwarding to host");
    let mut resp = cp.forward(&host, tenant, &parts, body).await;
    if let Ok(v) = HeaderValue::from_str(&host.id) {
        resp.headers_mut().insert("x-stasis-host", v);
    }
    resp
}

/// Memory a create or restore needs: the snapshot's machine for a restore, the size asked for
/// (or the smallest) for a create.
async fn need_mib(
    state: &AppState,
    tenant: TenantId,
    parts: &axum::http::request::Parts,
    size: Option<Size>,
) -> Result<u64, ApiError> {
    let segments: Vec<&str> = parts.uri.path().trim_start_matches("/api/v1/").split('/').collect();
    if let ["computers", computer, "restore", snap] = segments.as_slice() {
        if let (Ok(c), Ok(s)) = (computer.parse(), snap.parse()) {
            let record = state.snapshots.find(tenant, c, s).await?;
            return Ok(record.size.memory_mib());
        }
    }
    Ok(size.unwrap_or(Size::Xs).memory_mib())
}

/// Tells whether a request carries the cluster token (for `Tenant` on hosts).
pub fn host_tenant(state: &AppState, headers: &HeaderMap) -> Option<Tenant> {
    let token = state.host_token.as_deref()?;
    tenant_from_control_plane(token, headers).map(Tenant)
}
