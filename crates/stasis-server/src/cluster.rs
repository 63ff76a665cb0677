//! Several hosts behind one control plane.
//!
//! The control plane (`stasis serve --cluster-credentials DIR`, on PostgreSQL and S3) keeps
//! the metadata and answers reads itself. Hosts (`stasis host --control-plane URL`) run the
//! computers: each runs this same platform on the shared database and store (configured on
//! the host itself: the control plane hands out no secrets), recording and reconciling only
//! its own computers, and heartbeats to the control plane. Requests that act on a machine go
//! to the host that runs it; creates and restores go to the host with the most free memory
//! that has room. A host that stops heartbeating is lost: its computers turn `error` and its
//! unfinished snapshots `failed`, while its finished snapshots, being in the store, restore
//! on any other host. A control plane never runs a machine itself.
//!
//! Control plane and hosts talk mutual TLS ([`crate::tls`]): a host heartbeats only under the
//! id its certificate names, and a host serves only the control plane's certificate, and only
//! for the computers it runs. `--insecure-plain-http` falls back to plain HTTP and one shared
//! token, for trusted networks only.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{ConnectInfo, FromRequest, FromRequestParts, Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use stasis_types::{ComputerId, Size, TenantId};

use crate::auth::{bearer, Tenant};
use crate::db::{Db, HostRecord, HostStatus};
use crate::error::{ApiError, REQUEST_ID};
use crate::tls::{Credentials, Peer};
use crate::AppState;

/// Carries the tenant a control plane acts for, on its requests to hosts.
pub const TENANT_HEADER: &str = "x-stasis-tenant";

/// What a host says in each heartbeat.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Heartbeat {
    pub id: String,
    /// Where the control plane reaches the host's API (`https://ADDR`).
    pub url: String,
    pub capacity_mib: i64,
    pub vcpus: i64,
}

/// What the control plane answers. Nothing secret: hosts have their own configuration for the
/// database and store, so a heartbeat leaks nothing and a forged answer redirects nothing.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Joined {
    pub heartbeat_secs: u64,
    /// The tenants' default limits, which hosts apply too.
    #[serde(default)]
    pub limits: crate::limits::TenantLimits,
}

/// The shortest shared token `--insecure-plain-http` takes.
pub const MIN_TOKEN_LEN: usize = 32;

/// How a control plane and its hosts know each other.
#[derive(Clone)]
pub enum ClusterAuth {
    /// Mutual TLS with certificates from the cluster CA.
    Tls(Arc<Credentials>),
    /// `--insecure-plain-http`: plain HTTP and one shared token.
    PlainToken(String),
}

impl std::fmt::Debug for ClusterAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClusterAuth::Tls(c) => write!(f, "Tls({})", c.dir.display()),
            ClusterAuth::PlainToken(_) => f.write_str("PlainToken(..)"),
        }
    }
}

use std::sync::Arc;

/// The part of a platform that is a control plane of hosts.
pub struct ControlPlane {
    pub auth: ClusterAuth,
    pub host_timeout: Duration,
    pub joined: Joined,
    /// Over TLS, one client per host: each accepts only that host's certificate.
    clients: Mutex<HashMap<String, reqwest::Client>>,
}

/// The part of a platform that is a host of a control plane.
pub struct HostSide {
    pub id: String,
    pub auth: ClusterAuth,
}

impl HostSide {
    /// Whether a request comes from the control plane: its certificate over TLS, the shared
    /// token over plain HTTP.
    pub fn from_control_plane(&self, headers: &HeaderMap, extensions: &axum::http::Extensions) -> bool {
        let peer = extensions.get::<ConnectInfo<Peer>>().map(|c| &c.0);
        match &self.auth {
            ClusterAuth::Tls(_) => peer.is_some_and(|p| p.cluster && p.is(crate::tls::CONTROL_PLANE_NAME)),
            ClusterAuth::PlainToken(token) => bearer(headers).is_some_and(|t| token_matches(token, t)),
        }
    }
}

/// Whether `given` is the cluster token (in constant time).
pub fn token_matches(token: &str, given: &str) -> bool {
    use sha2::Digest;
    let a = sha2::Sha256::digest(token.as_bytes());
    let b = sha2::Sha256::digest(given.as_bytes());
    a.iter().zip(b.iter()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

impl ControlPlane {
    pub fn new(auth: ClusterAuth, host_timeout: Duration, joined: Joined) -> ControlPlane {
        ControlPlane {
            auth,
            host_timeout,
            joined,
            clients: Mutex::new(HashMap::new()),
        }
    }

    /// The client that talks to host `id` (and only to it).
    fn client(&self, id: &str) -> Result<reqwest::Client, ApiError> {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(id) {
            return Ok(c.clone());
        }
        let client = match &self.auth {
            ClusterAuth::Tls(creds) => creds.client(&crate::tls::host_name(id), None),
            ClusterAuth::PlainToken(_) => reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(5))
                .build()
                .map_err(|e| e.to_string()),
        }
        .map_err(ApiError::Unavailable)?;
        clients.insert(id.to_string(), client.clone());
        Ok(client)
    }

    fn alive(&self, h: &HostRecord) -> bool {
        h.status == HostStatus::Alive
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
                crate::error::Conflict::InsufficientCapacity,
                format!("no host has room for a computer of {need_mib} MiB"),
            )),
        }
    }

    /// Where `computer` runs: None if there is no such computer; Some(None) if its host is
    /// none, or is lost.
    async fn host_of(&self, db: &Db, computer: ComputerId) -> Result<Option<Option<HostRecord>>, ApiError> {
        let Some(id) = db.computer_host(computer).await? else {
            return Ok(None);
        };
        let Some(id) = id else { return Ok(Some(None)) };
        Ok(Some(
            db.hosts().await?.into_iter().find(|h| h.id == id && self.alive(h)),
        ))
    }

    /// Sends the request on to a host, as the tenant, and streams its answer back.
    async fn forward(
        &self,
        host: &HostRecord,
        tenant: TenantId,
        parts: &axum::http::request::Parts,
        body: Body,
        keep_query: bool,
    ) -> Response {
        let path = match keep_query {
            true => parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"),
            false => parts.uri.path(),
        };
        let url = format!("{}{path}", host.url.trim_end_matches('/'));
        let http = match self.client(&host.id) {
            Ok(c) => c,
            Err(e) => return e.into_response(),
        };
        let body = match crate::body::read_within(body, parts.extensions.get().copied()).await {
            Ok(b) => b,
            Err(e) => return e.into_response(),
        };
        let method = reqwest::Method::from_bytes(parts.method.as_str().as_bytes()).unwrap_or(reqwest::Method::GET);
        let mut req = http.request(method, &url).header(TENANT_HEADER, tenant.to_string());
        if let ClusterAuth::PlainToken(token) = &self.auth {
            req = req.bearer_auth(token);
        }
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
            for h in hosts.iter().filter(|h| h.status == HostStatus::Alive && !self.alive(h)) {
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

/// `POST /internal/v1/hosts/heartbeat`: a host joins or stays in the control plane. Served
/// only on the cluster listener, and only to a host that proves the id it claims.
pub async fn heartbeat(State(state): State<AppState>, req: Request) -> Response {
    let Some(cp) = state.control_plane.clone() else {
        return ApiError::RouteNotFound("this platform is not a control plane".into()).into_response();
    };
    let peer = req.extensions().get::<ConnectInfo<Peer>>().map(|c| c.0.clone());
    let Some(peer) = peer.filter(|p| p.cluster) else {
        return ApiError::RouteNotFound("hosts heartbeat on the cluster listener (--cluster-listen)".into())
            .into_response();
    };
    if let ClusterAuth::PlainToken(token) = &cp.auth {
        if !bearer(req.headers()).is_some_and(|t| token_matches(token, t)) {
            return ApiError::Unauthorized.into_response();
        }
    }
    let Json(beat) = match Json::<Heartbeat>::from_request(req, &state).await {
        Ok(b) => b,
        Err(e) => return ApiError::BadRequest(format!("a heartbeat is a JSON Heartbeat: {e}")).into_response(),
    };
    if !crate::tls::valid_host_id(&beat.id) {
        return ApiError::BadRequest(
            "a heartbeat needs the host's id: 1 to 63 lowercase letters, digits and dashes".into(),
        )
        .into_response();
    }
    let scheme = match cp.auth {
        ClusterAuth::Tls(_) => "https://",
        ClusterAuth::PlainToken(_) => "http://",
    };
    if !beat.url.starts_with(scheme) || beat.url.len() > 2048 {
        return ApiError::BadRequest(format!("a heartbeat needs the host's {scheme} URL")).into_response();
    }
    if let ClusterAuth::Tls(_) = cp.auth {
        // The id is the certificate's: one host cannot take over another's id (and so its
        // computers' requests).
        if !peer.is(&crate::tls::host_name(&beat.id)) {
            tracing::warn!(claimed = beat.id, remote = %peer.remote, "a heartbeat under another host's id");
            return forbidden(format!("this certificate is not host {}'s", beat.id));
        }
    }
    if let Err(e) = state
        .db
        .heartbeat_host(&beat.id, &beat.url, beat.capacity_mib.max(0), beat.vcpus.max(0))
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
    /// To the host running this computer (refused if it runs on none, or its host is lost).
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

/// A 403 that says why.
fn forbidden(message: String) -> Response {
    ApiError::ForbiddenBecause(message).into_response()
}

/// Middleware on a control plane: sends machine work to hosts, and never does it itself. On
/// a host: lets in only the control plane, and only for this host's computers.
pub async fn dispatch(State(state): State<AppState>, req: Request, next: Next) -> Response {
    if let Some(host) = state.host.clone() {
        return guard_host(&state, &host, req, next).await;
    }
    let Some(cp) = state.control_plane.clone() else {
        return next.run(req).await;
    };
    let Some(route) = route(req.method(), req.uri().path()) else {
        return next.run(req).await;
    };
    let events = req.uri().path().ends_with("/events");
    let mut keep_query = true;
    let tenant = match req.extensions().get::<crate::auth::Authenticated>().copied() {
        Some(crate::auth::Authenticated(t)) => t,
        // A browser's stream carries a one-use ticket instead of a key: it is used up here,
        // and the host is asked as the tenant (without the spent ticket).
        None if events && !req.headers().contains_key(axum::http::header::AUTHORIZATION) => {
            let (mut parts, body) = req.into_parts();
            match crate::snapshots::routes::StreamTenant::from_request_parts(&mut parts, &state).await {
                Ok(t) => {
                    // A ticket bound to a snapshot opens that snapshot's stream only; the host
                    // never sees the ticket, so the binding is held here.
                    if let Some(Some(bound)) = t.ticket {
                        let asked = parts.uri.path().rsplit('/').nth(1).and_then(|s| s.parse().ok());
                        if asked != Some(bound) {
                            return ApiError::Unauthorized.into_response();
                        }
                    }
                    keep_query = false;
                    let mut req = Request::from_parts(parts, body);
                    req.extensions_mut().insert(crate::auth::Authenticated(t.tenant));
                    return dispatch_as(&state, &cp, t.tenant, route, req, next, keep_query).await;
                }
                Err(e) => return e.into_response(),
            }
        }
        // Unauthenticated requests get their 401 from the handlers.
        None => return next.run(req).await,
    };
    dispatch_as(&state, &cp, tenant, route, req, next, keep_query).await
}

async fn dispatch_as(
    state: &AppState,
    cp: &ControlPlane,
    tenant: TenantId,
    route: Route,
    req: Request,
    next: Next,
    keep_query: bool,
) -> Response {
    let events = req.uri().path().ends_with("/events");
    let (parts, mut body) = req.into_parts();
    let host = match route {
        Route::Place => {
            let mut size = None;
            if parts.uri.path().trim_end_matches('/') == "/api/v1/computers" {
                // Peek at the size asked for (the host validates the body properly).
                let bytes = match crate::body::read_within(body, parts.extensions.get().copied()).await {
                    Ok(b) => b,
                    Err(e) => return e.into_response(),
                };
                size = serde_json::from_slice::<serde_json::Value>(&bytes)
                    .ok()
                    .and_then(|v| v.get("size").and_then(|s| s.as_str()).and_then(Size::parse));
                body = Body::from(bytes);
            }
            let need = match need_mib(state, tenant, &parts, size).await {
                Ok(n) => n,
                Err(e) => return e.into_response(),
            };
            match cp.place(&state.db, need).await {
                Ok(h) => h,
                Err(e) => return e.into_response(),
            }
        }
        Route::Owner(id) => match cp.host_of(&state.db, id).await {
            Ok(Some(Some(h))) => h,
            // No such computer: the handlers say so (after checking the tenant).
            Ok(None) => return next.run(Request::from_parts(parts, body)).await,
            // A stream of a lost host's snapshot: the log and the final state are in the
            // database (such snapshots are failed), so the answer ends at once.
            Ok(Some(None)) if events => return next.run(Request::from_parts(parts, body)).await,
            // Deleting needs no machine: the control plane records it (its own runtime has no
            // such machine to stop), and the host, when it is back, finds the computer gone
            // and removes its QEMU and files.
            Ok(Some(None))
                if parts.method == Method::DELETE
                    && parts.uri.path().trim_end_matches('/') == format!("/api/v1/computers/{id}") =>
            {
                return next.run(Request::from_parts(parts, body)).await
            }
            Ok(Some(None)) => {
                // Running it here would boot a tenant's VM on the control plane, outside any
                // host's capacity, next to every secret of the cluster.
                return ApiError::Unavailable(format!(
                    "the host running computer {id} is unavailable; it cannot be changed until that host is back \
                     (its snapshots restore on any other host)"
                ))
                .into_response();
            }
            Err(e) => return e.into_response(),
        },
    };
    tracing::debug!(host = host.id, path = parts.uri.path(), "forwarding to host");
    let mut resp = cp.forward(&host, tenant, &parts, body, keep_query).await;
    if let Ok(v) = HeaderValue::from_str(&host.id) {
        resp.headers_mut().insert("x-stasis-host", v);
    }
    resp
}

/// On a host: only the control plane may ask, and only about this host's computers (a
/// request about another's would desynchronize the database from the machines).
async fn guard_host(state: &AppState, host: &HostSide, req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if path == "/api/v1/health" {
        return next.run(req).await;
    }
    if !host.from_control_plane(req.headers(), req.extensions()) {
        return forbidden(
            "this is a host of a control plane: it serves only its control plane; send API requests there".into(),
        );
    }
    let segments: Vec<&str> = path.strip_prefix("/api/v1/").unwrap_or("").split('/').collect();
    let own = match segments.as_slice() {
        // A restore's source may run anywhere (or nowhere): its snapshot is in the store.
        [_, _, "restore", _] => None,
        ["computers", id, ..] => id.parse::<ComputerId>().ok(),
        _ => None,
    };
    if let Some(id) = own {
        match state.db.computer_host(id).await {
            Ok(Some(h)) if h.as_deref() != Some(host.id.as_str()) => {
                let on = h.map_or("no host".to_string(), |h| format!("host {h}"));
                return ApiError::conflict(
                    crate::error::Conflict::WrongHost,
                    format!("computer {id} runs on {on}, not on this host ({})", host.id),
                )
                .into_response();
            }
            Ok(_) => {}
            Err(e) => return ApiError::from(e).into_response(),
        }
    }
    next.run(req).await
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

/// On a host, the tenant its control plane acts for (for `Tenant`).
pub fn host_tenant(state: &AppState, headers: &HeaderMap, extensions: &axum::http::Extensions) -> Option<Tenant> {
    let host = state.host.as_ref()?;
    if !host.from_control_plane(headers, extensions) {
        return None;
    }
    headers.get(TENANT_HEADER)?.to_str().ok()?.parse().ok().map(Tenant)
}
