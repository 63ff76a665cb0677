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
use axum::extract::{ConnectInfo, FromRequest, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use stasis_types::{ComputerId, HostId, Size, TenantId};

use crate::auth::bearer;
use crate::db::{Db, HostRecord, HostStatus};
use crate::endpoints::Wants;
use crate::error::{Conflict, During, Error};
use crate::http_error::{ApiError, REQUEST_ID};
use crate::tls::{Credentials, Peer};
use crate::AppState;
use stasis_vmm::description::HostMachine;

/// Carries the tenant a control plane acts for, on its requests to hosts.
pub const TENANT_HEADER: &str = "x-stasis-tenant";

/// What a host says in each heartbeat.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Heartbeat {
    pub id: HostId,
    /// Where the control plane reaches the host's API (`https://ADDR`).
    pub url: String,
    pub capacity_mib: i64,
    pub vcpus: i64,
    /// What it runs (QEMU release, KVM, CPU model): restores are placed where they load.
    #[serde(default)]
    pub machine: Option<HostMachine>,
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
    clients: Mutex<HashMap<HostId, reqwest::Client>>,
}

/// The part of a platform that is a host of a control plane.
pub struct HostSide {
    pub id: HostId,
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
    fn client(&self, id: &HostId) -> Result<reqwest::Client, Error> {
        let mut clients = self.clients.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = clients.get(id) {
            return Ok(c.clone());
        }
        let client = match &self.auth {
            ClusterAuth::Tls(creds) => creds.client(&crate::tls::host_name(id.as_str()), None),
            ClusterAuth::PlainToken(_) => reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(5))
                .build()
                .during("making the cluster's HTTP client"),
        }
        .map_err(|e| Error::Unavailable(format!("a client for host {id}: {e}")))?;
        clients.insert(id.clone(), client.clone());
        Ok(client)
    }

    fn alive(&self, h: &HostRecord) -> bool {
        h.status == HostStatus::Alive
            && chrono::Utc::now() - h.last_seen
                <= chrono::Duration::from_std(self.host_timeout).unwrap_or(chrono::Duration::MAX)
    }

    /// The host with the most free memory that has what `wants` says: the memory free, and a
    /// QEMU, accelerator and CPU model that load its snapshot's machine (a host that does not
    /// report what it runs is tried, and refuses by itself if it cannot).
    pub async fn place(&self, db: &Db, wants: &Wants) -> Result<HostRecord, Error> {
        let hosts = db.hosts().await?;
        let held = db.host_sizes().await?;
        let mut best: Option<(i64, HostRecord)> = None;
        let (mut alive, mut roomy) = (0, 0);
        let mut refusals = Vec::new();
        for h in hosts.into_iter().filter(|h| self.alive(h)) {
            alive += 1;
            let used: i64 = held
                .iter()
                .filter(|(host, _)| *host == h.id)
                .filter_map(|(_, size)| Size::parse(size))
                .map(|s| s.memory_mib() as i64)
                .sum();
            let free = h.capacity_mib - used;
            if free < wants.memory_mib as i64 {
                continue;
            }
            roomy += 1;
            if let (Some(machine), Some(runs)) = (&wants.machine, &h.machine) {
                if let Err(m) = machine.check(runs) {
                    refusals.push(format!("host {}: {m}", h.id));
                    continue;
                }
            }
            if best.as_ref().is_none_or(|(f, _)| free > *f) {
                best = Some((free, h));
            }
        }
        match best {
            Some((_, h)) => Ok(h),
            None if alive == 0 => Err(Error::Unavailable("no host has joined the control plane".into())),
            None if roomy == 0 => Err(Error::conflict(
                Conflict::InsufficientCapacity,
                format!("no host has room for a computer of {} MiB", wants.memory_mib),
            )),
            None => Err(Error::conflict(
                Conflict::SnapshotIncompatible,
                format!(
                    "no host with room can load this snapshot's machine: {}",
                    refusals.join("; ")
                ),
            )),
        }
    }

    /// Where `computer` runs: None if there is no such computer; Some(None) if its host is
    /// none, or is lost.
    pub(crate) async fn host_of(&self, db: &Db, computer: ComputerId) -> Result<Option<Option<HostRecord>>, Error> {
        let Some(id) = db.computer_host(computer).await? else {
            return Ok(None);
        };
        let Some(id) = id else { return Ok(Some(None)) };
        Ok(Some(
            db.hosts().await?.into_iter().find(|h| h.id == id && self.alive(h)),
        ))
    }

    /// Sends the request on to a host, as the tenant, and streams its answer back.
    pub(crate) async fn forward(
        &self,
        host: &HostRecord,
        tenant: TenantId,
        parts: &axum::http::request::Parts,
        body: Body,
        keep_query: bool,
    ) -> Response {
        // The URI as the client sent it (inside the API's router it has lost its `/api/v1`).
        let uri = parts
            .extensions
            .get::<axum::extract::OriginalUri>()
            .map_or(&parts.uri, |o| &o.0);
        let path = match keep_query {
            true => uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"),
            false => uri.path(),
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
            Err(e) => ApiError::unavailable(format!("host {} did not answer: {e}", host.id)).into_response(),
        }
    }

    /// Passes a request on to `host` as it is (a proxy's): at `path_and_query`, streamed both
    /// ways with its end-to-end headers (not the tenant's key: the host takes the tenant from
    /// the control plane), and spliced through if the host switches protocols.
    pub(crate) async fn forward_raw(
        &self,
        host: &HostRecord,
        tenant: TenantId,
        path_and_query: &str,
        req: Request,
    ) -> Response {
        use crate::preview::proxy;
        let url = format!("{}{path_and_query}", host.url.trim_end_matches('/'));
        let http = match self.client(&host.id) {
            Ok(c) => c,
            Err(e) => return e.into_response(),
        };
        let (mut parts, body) = req.into_parts();
        let client_side = parts.extensions.remove::<hyper::upgrade::OnUpgrade>();
        let held = parts.extensions.remove::<crate::net::HeldStream>();
        let method = reqwest::Method::from_bytes(parts.method.as_str().as_bytes()).unwrap_or(reqwest::Method::GET);
        let mut headers = proxy::onward_request_headers(&parts.headers);
        headers.remove(axum::http::header::HOST);
        // The preview host the client asked for (the host sees its own path form).
        if let Some(h) = parts.headers.get(axum::http::header::HOST) {
            headers.insert("x-forwarded-host", h.clone());
        }
        let mut req = http
            .request(method, &url)
            .headers(headers)
            .header(TENANT_HEADER, tenant.to_string());
        if let ClusterAuth::PlainToken(token) = &self.auth {
            req = req.bearer_auth(token);
        }
        let request_id = REQUEST_ID.try_with(|id| id.clone()).unwrap_or_default();
        req = req.header("x-stasis-request-id", request_id);
        let has_body = parts.headers.contains_key(axum::http::header::CONTENT_LENGTH)
            || parts.headers.contains_key(axum::http::header::TRANSFER_ENCODING);
        if has_body {
            req = req.body(reqwest::Body::wrap_stream(body.into_data_stream()));
        }
        let resp = match req.send().await {
            Ok(r) => r,
            Err(e) => return ApiError::unavailable(format!("host {} did not answer: {e}", host.id)).into_response(),
        };
        let status = resp.status().as_u16();
        let switching = status == 101;
        let mut out = Response::builder().status(status);
        if let Some(h) = out.headers_mut() {
            *h = proxy::onward_response_headers(resp.headers(), switching);
        }
        if switching {
            let Some(client_side) = client_side else {
                return StatusCode::BAD_GATEWAY.into_response();
            };
            tokio::spawn(async move {
                if let (Ok(client), Ok(upstream)) = (client_side.await, resp.upgrade().await) {
                    proxy::splice(hyper_util::rt::TokioIo::new(client), upstream, held);
                }
            });
            return out
                .body(Body::empty())
                .unwrap_or_else(|_| StatusCode::BAD_GATEWAY.into_response());
        }
        out.body(Body::from_stream(resp.bytes_stream()))
            .unwrap_or_else(|_| StatusCode::BAD_GATEWAY.into_response())
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
                        tracing::warn!(host = %h.id, "host lost; its computers are marked error");
                        computers.notify_changed();
                    }
                    Ok(false) => {}
                    Err(e) => tracing::warn!(host = %h.id, error = %e, "marking a host lost"),
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
        // A malformed host id is refused here, by its type.
        Err(e) => return ApiError::BadRequest(format!("a heartbeat is a JSON Heartbeat: {e}")).into_response(),
    };
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
        if !peer.is(&crate::tls::host_name(beat.id.as_str())) {
            tracing::warn!(claimed = %beat.id, remote = %peer.remote, "a heartbeat under another host's id");
            return forbidden(format!("this certificate is not host {}'s", beat.id));
        }
    }
    if let Err(e) = state
        .db
        .heartbeat_host(
            &beat.id,
            &beat.url,
            beat.capacity_mib.max(0),
            beat.vcpus.max(0),
            beat.machine.as_ref(),
        )
        .await
    {
        return ApiError::from(e).into_response();
    }
    Json(cp.joined.clone()).into_response()
}

/// A 403 that says why.
fn forbidden(message: String) -> Response {
    ApiError::Forbidden(message).into_response()
}

/// Middleware on a host: lets in only the control plane, and takes the tenant it acts for
/// from it. (Which computers a host acts on is the endpoints' to say: [`crate::endpoints`].)
pub async fn guard_host(State(state): State<AppState>, mut req: Request, next: Next) -> Response {
    let Some(host) = state.host.clone() else {
        return next.run(req).await;
    };
    if req.uri().path() == "/api/v1/health" {
        return next.run(req).await;
    }
    if !host.from_control_plane(req.headers(), req.extensions()) {
        return forbidden(
            "this is a host of a control plane: it serves only its control plane; send API requests there".into(),
        );
    }
    let tenant = req
        .headers()
        .get(TENANT_HEADER)
        .and_then(|v| v.to_str().ok()?.parse().ok());
    if let Some(tenant) = tenant {
        req.extensions_mut().insert(crate::auth::Authenticated(tenant));
    }
    next.run(req).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use stasis_vmm::description::{BootFile, MachineDescription, QemuRelease, DEVICE_LINE, FORMAT, MACHINE_TYPE};

    fn taken_on(major: u32, minor: u32) -> MachineDescription {
        let file = |c: char| BootFile {
            blake3: c.to_string().repeat(64),
            bytes: 1,
        };
        MachineDescription {
            format: FORMAT,
            qemu: QemuRelease { major, minor },
            machine_type: MACHINE_TYPE.into(),
            accel: stasis_vmm::Accel::Tcg,
            cpu_model: "max".into(),
            vcpus: 1,
            memory_mib: 512,
            device_line: DEVICE_LINE,
            tsc_khz: None,
            image_id: "img".into(),
            kernel: file('a'),
            initrd: file('b'),
        }
    }

    #[tokio::test]
    async fn restores_are_placed_where_their_machine_loads() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open_sqlite(&dir.path().join("p.db")).await.unwrap();
        let cp = ControlPlane::new(
            ClusterAuth::PlainToken("t".repeat(MIN_TOKEN_LEN)),
            Duration::from_secs(60),
            Joined {
                heartbeat_secs: 1,
                limits: Default::default(),
            },
        );
        let host = |id: &str| -> HostId { id.parse().unwrap() };
        let runs = |major, minor| HostMachine::tcg(QemuRelease { major, minor });
        // The QEMU 10 host has the most room.
        db.heartbeat_host(&host("ten"), "http://127.0.0.1:1", 8192, 2, Some(&runs(10, 0)))
            .await
            .unwrap();
        db.heartbeat_host(&host("seven"), "http://127.0.0.1:2", 2048, 2, Some(&runs(7, 2)))
            .await
            .unwrap();
        let want = |machine| Wants {
            memory_mib: 512,
            machine,
        };
        assert_eq!(
            cp.place(&db, &want(None)).await.unwrap().id,
            host("ten"),
            "a boot: most room"
        );
        assert_eq!(
            cp.place(&db, &want(Some(taken_on(7, 2)))).await.unwrap().id,
            host("seven"),
            "a snapshot of QEMU 7.2 goes where 7.2 runs"
        );
        match cp.place(&db, &want(Some(taken_on(9, 0)))).await {
            Err(Error::Conflict {
                state: Conflict::SnapshotIncompatible,
                message,
            }) => assert!(
                message.contains("host seven") && message.contains("host ten") && message.contains("QEMU 9.0"),
                "{message}"
            ),
            other => panic!("{other:?}"),
        }
        // Too big for every host is a capacity refusal, whatever the machine.
        let huge = Wants {
            memory_mib: 1 << 20,
            machine: Some(taken_on(9, 0)),
        };
        assert!(matches!(
            cp.place(&db, &huge).await,
            Err(Error::Conflict {
                state: Conflict::InsufficientCapacity,
                ..
            })
        ));
        // A host that does not say what it runs is tried (it checks for itself); a later
        // heartbeat without a machine keeps what an earlier one said.
        db.heartbeat_host(&host("quiet"), "http://127.0.0.1:3", 1024, 2, None)
            .await
            .unwrap();
        assert_eq!(
            cp.place(&db, &want(Some(taken_on(9, 0)))).await.unwrap().id,
            host("quiet")
        );
        db.heartbeat_host(&host("seven"), "http://127.0.0.1:2", 2048, 2, None)
            .await
            .unwrap();
        let seven = db
            .hosts()
            .await
            .unwrap()
            .into_iter()
            .find(|h| h.id == host("seven"))
            .unwrap();
        assert_eq!(seven.machine, Some(runs(7, 2)));
    }
}
