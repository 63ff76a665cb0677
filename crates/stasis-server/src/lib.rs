//! The control plane of the embedded platform: the Miosa computers API over HTTP, tenants and
//! API keys, metadata in SQLite, and the computers' machines on this host's runtime.

pub mod auth;
pub mod body;
pub mod cluster;
pub mod computers;
pub mod db;
pub mod encryption;
pub mod endpoints;
pub mod env;
pub mod error;
pub mod files;
pub mod http_error;
pub mod idempotency;
pub mod images;
pub mod jobs;
pub mod limits;
pub mod logs;
pub mod metrics;
pub mod net;
pub mod network_policy;
pub mod openapi;
pub mod preview;
pub mod sessions;
pub mod snapshots;
pub mod tls;
pub mod web;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request};
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::get;
use axum::{Json, Router};
use sha2::Digest;
use stasis_vmm::{Accel, Host};

use crate::computers::{Computers, RuntimeSettings};
use crate::db::Db;
use crate::error::{During, SetupError};
use crate::http_error::{ApiError, REQUEST_ID};
use crate::images::Images;
use crate::snapshots::events::EventBus;
use crate::snapshots::Snapshots;
use stasis_store::Materializer;

/// Everything the handlers share (cheap to clone).
#[derive(Clone)]
pub struct AppState {
    pub db: Db,
    pub computers: Arc<Computers>,
    pub snapshots: Arc<Snapshots>,
    /// Set when this platform is a control plane of hosts.
    pub control_plane: Option<Arc<cluster::ControlPlane>>,
    /// Set when this platform is a host of a control plane.
    pub host: Option<Arc<cluster::HostSide>>,
    pub limits: Arc<limits::Limits>,
    /// Connection-level limits the middleware applies (long requests, failed keys).
    pub guards: Arc<net::Guards>,
    /// Preview URLs and the links that open them.
    pub previews: Arc<preview::Previews>,
}

/// What part this process plays.
#[derive(Debug, Clone, Default)]
pub enum Role {
    /// One process does everything (the default).
    #[default]
    Embedded,
    /// A control plane: hosts join it as `auth` says; one silent for `host_timeout` is lost.
    ControlPlane {
        auth: cluster::ClusterAuth,
        host_timeout: std::time::Duration,
    },
    /// A host of a control plane, known to it as `id`.
    Host {
        id: stasis_types::HostId,
        auth: cluster::ClusterAuth,
    },
}

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub cache_dir: PathBuf,
    pub accel: Accel,
    pub qemu_binary: PathBuf,
    /// sqlite://... or postgres://... (see [`database_url`]).
    pub database_url: String,
    /// s3://BUCKET[/PREFIX] or file:///DIR; None: `objects/` in the data dir.
    pub store_url: Option<String>,
    pub s3: stasis_store::S3Options,
    pub role: Role,
    /// Memory (MiB) lent to computers on this machine; None: no limit.
    pub capacity_mib: Option<u64>,
    /// Every tenant's limits unless the operator set its own (a host takes its control
    /// plane's).
    pub limits: limits::TenantLimits,
    /// Whether computers' QEMUs run confined (own user, namespaces, cgroups).
    pub confine: Confine,
    /// Each computer's disk ceiling (None: none).
    pub disk_limits: Option<stasis_vmm::vm::DiskLimits>,
    /// The CPU model machines get: `auto`, `host` or a QEMU model (see [`stasis_vmm::cpu`]).
    pub cpu_model: String,
    /// Encryption at rest: a file holding the master key (64 hex digits); None: snapshots are
    /// stored unencrypted.
    pub master_key_file: Option<PathBuf>,
    /// Computers' networks.
    pub network: NetworkConfig,
    /// How preview URLs are made (None: `localhost:PORT` of `listen`).
    pub preview: Option<preview::PreviewConfig>,
    /// How long a snapshot is kept when its create names no expiry (None: until deleted).
    pub snapshot_ttl: Option<std::time::Duration>,
}

/// How computers reach the network (see [`stasis_vmm::network`]).
#[derive(Debug, Clone)]
pub struct NetworkConfig {
    /// Where computers' host-side addresses come from, a /30 each (`--network-pool`).
    pub pool: stasis_vmm::network::Cidr,
    /// What their traffic may reach besides the default (`--egress-allow`, `--egress-deny`).
    pub egress: stasis_vmm::network::EgressPolicy,
    /// The resolver computers' queries go to (`--dns-upstream`); None: the host's own (the
    /// first IPv4 nameserver of /etc/resolv.conf).
    pub dns_upstream: Option<SocketAddr>,
    /// Networks kept made ahead, so a start or restore does not wait for one
    /// (`--network-ready`).
    pub ready: usize,
}

impl Default for NetworkConfig {
    fn default() -> NetworkConfig {
        NetworkConfig {
            pool: stasis_vmm::network::Cidr {
                base: std::net::Ipv4Addr::new(10, 213, 0, 0),
                prefix: 16,
            },
            egress: Default::default(),
            dns_upstream: None,
            ready: 2,
        }
    }
}

/// `--confine`: auto confines when the platform runs as root (it must, to make namespaces
/// and change users) and says so when it cannot; on refuses to start without it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Confine {
    #[default]
    Auto,
    On,
    Off,
}

/// A `--confine` that is not `auto`, `on` or `off`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--confine must be auto, on or off, not {0:?}")]
pub struct UnknownConfine(pub String);

impl std::str::FromStr for Confine {
    type Err = UnknownConfine;
    fn from_str(s: &str) -> Result<Confine, UnknownConfine> {
        match s {
            "auto" => Ok(Confine::Auto),
            "on" => Ok(Confine::On),
            "off" => Ok(Confine::Off),
            other => Err(UnknownConfine(other.to_string())),
        }
    }
}

/// How often a host looks for local copies of snapshots that are gone.
const LOCAL_COPY_SWEEP: std::time::Duration = std::time::Duration::from_secs(300);
/// How often expired snapshots are looked for (one indexed query).
const EXPIRY_SWEEP: std::time::Duration = std::time::Duration::from_secs(5);

/// The confinement of this platform's QEMUs, as `--confine` asks and the host allows.
fn jail_settings(
    mode: Confine,
    data_dir: &Path,
    qemu_binary: &Path,
) -> Result<Option<stasis_vmm::jail::JailSettings>, SetupError> {
    use stasis_vmm::jail;
    if mode == Confine::Off {
        tracing::warn!("QEMUs run unconfined (--confine off): as this platform's user, seeing its files");
        return Ok(None);
    }
    if !jail::can_confine() {
        if mode == Confine::On {
            return Err(SetupError::refused(
                "--confine on needs the platform to run as root (to make namespaces and change users)",
            ));
        }
        tracing::warn!("not running as root: QEMUs run unconfined, as this platform's user");
        return Ok(None);
    }
    // QEMU 8.1 and later open /dev/userfaultfd, which each jail gets a node of for the shared
    // group; older ones can only call userfaultfd(2), which unprivileged processes may only
    // where the host-wide vm.unprivileged_userfaultfd is 1.
    let version = stasis_vmm::accel::qemu_version(qemu_binary);
    let device = version.is_some_and(|v| v >= (8, 1));
    let settings =
        jail::JailSettings::detect(&data_dir_tag(data_dir), device).during("preparing the confinement of QEMUs")?;
    if settings.userfaultfd.is_some() {
        tracing::info!("confined QEMUs use userfaultfd through a /dev/userfaultfd of their own");
    } else {
        match jail::allow_unprivileged_userfaultfd() {
            Ok(changed) => tracing::warn!(
                ?version,
                changed,
                "this QEMU (older than 8.1) can use userfaultfd confined only through vm.unprivileged_userfaultfd=1, which holds for every user of this host; QEMU 8.1 or later needs no host-wide setting"
            ),
            Err(e) => tracing::warn!(
                "confined QEMUs cannot use userfaultfd ({e}): snapshots pause the guest while RAM is copied"
            ),
        }
    }
    tracing::info!(
        shared_gid = settings.shared_gid,
        "QEMUs run confined: own user, own PID/mount/network/IPC/UTS namespaces, seccomp, {}",
        settings.cgroups.describe()
    );
    Ok(Some(settings))
}

/// A short tag naming a data directory (two platforms on one host do not meet).
fn data_dir_tag(data_dir: &Path) -> String {
    hex::encode(&sha2::Sha256::digest(data_dir.to_string_lossy().as_bytes())[..8])
}

/// Memory a machine lends to computers by default: three quarters of its RAM.
pub fn default_capacity_mib() -> u64 {
    stasis_store::host_memory_bytes() / (1 << 20) * 3 / 4
}

/// The metadata database: the one given, or SQLite in the data dir.
pub fn database_url(data_dir: &Path, given: Option<&str>) -> String {
    match given.map(str::trim).filter(|u| !u.is_empty()) {
        Some(url) => url.to_string(),
        None => format!("sqlite://{}", db_path(data_dir).display()),
    }
}

/// Paths inside the data directory.
pub fn db_path(data_dir: &Path) -> PathBuf {
    data_dir.join("stasis.db")
}

pub fn default_key_path(data_dir: &Path) -> PathBuf {
    data_dir.join("default-api-key")
}

/// Where snapshot RAM files live: a tmpfs when the host has one (restored machines map them,
/// and only shared memory can be write-protected for their own snapshots), named after the
/// data directory so two platforms on one host do not meet.
pub fn memory_dir(data_dir: &Path) -> PathBuf {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        return shm.join(format!("stasis-{}", data_dir_tag(data_dir)));
    }
    data_dir.join("cache/memory")
}

/// Creates the data directory with owner-only permissions.
pub fn prepare_data_dir(data_dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(data_dir.join("computers"))?;
    std::fs::set_permissions(data_dir, std::fs::Permissions::from_mode(0o700))
}

pub fn router(state: AppState) -> Router {
    router_with(state, endpoints::Endpoints::new())
}

/// The platform's routes and `extra` ones beside them, declared like every other endpoint
/// (for tests of the boundary, and for embedding).
pub fn router_with(state: AppState, extra: endpoints::Endpoints) -> Router {
    let api: Router<AppState> = api_router().merge(extra.into_router()).into();
    let spec: Arc<str> = openapi_document()
        .to_json()
        .expect("the OpenAPI document serializes")
        .into();
    let api = api
        .route(
            "/openapi.json",
            get(move || async move {
                (
                    [(axum::http::header::CONTENT_TYPE, "application/json")],
                    spec.to_string(),
                )
            }),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed);
    Router::new()
        .nest("/api/v1", api)
        .route("/internal/v1/hosts/heartbeat", axum::routing::post(cluster::heartbeat))
        .merge(web::router())
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(body::MAX_BODY_BYTES))
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth::authenticate))
        // A preview host's requests go to a computer's port, not to the API.
        .layer(axum::middleware::from_fn_with_state(state.clone(), preview::by_host))
        .layer(axum::middleware::from_fn_with_state(state.clone(), cluster::guard_host))
        .layer(axum::middleware::from_fn_with_state(state.clone(), request_id))
        // Where each endpoint runs is its own to say (crate::endpoints), with this state.
        .layer(axum::Extension(state.clone()))
        .with_state(state)
}

/// Every public route with its OpenAPI description (`/api/v1` relative).
fn api_router() -> utoipa_axum::router::OpenApiRouter<AppState> {
    endpoints::Endpoints::new()
        .add(endpoints::Runs::Anywhere, utoipa_axum::routes!(health))
        .merge(computers::routes::router())
        .merge(snapshots::routes::router())
        .merge(snapshots::history_routes::router())
        .merge(preview::routes::router())
        .merge(network_policy::router())
        .merge(env::router())
        .merge(files::router())
        .merge(sessions::router())
        .merge(logs::router())
        .merge(metrics::router())
        .into_router()
}

/// The OpenAPI document of the public API, with paths as served (under `/api/v1`).
pub fn openapi_document() -> utoipa::openapi::OpenApi {
    use utoipa::OpenApi;
    let mut spec = utoipa_axum::router::OpenApiRouter::<AppState>::with_openapi(openapi::ApiDoc::openapi())
        .nest("/api/v1", api_router())
        .into_openapi();
    spec.info.version = env!("CARGO_PKG_VERSION").into();
    spec
}

/// Liveness; needs no key.
#[utoipa::path(get, path = "/health", operation_id = "health", tag = "meta", security(()),
    responses((status = 200, description = "The server is up", body = stasis_types::Health)))]
async fn health() -> Json<stasis_types::Health> {
    Json(stasis_types::Health {
        status: "ok".into(),
        version: env!("CARGO_PKG_VERSION").into(),
    })
}

async fn not_found(req: Request) -> ApiError {
    ApiError::RouteNotFound(format!("no route for {} {}", req.method(), req.uri().path()))
}

async fn method_not_allowed() -> ApiError {
    ApiError::MethodNotAllowed
}

/// Gives every request an id, visible to handlers (for error bodies and logs) and returned in
/// `x-request-id`.
async fn request_id(axum::extract::State(state): axum::extract::State<AppState>, req: Request, next: Next) -> Response {
    // A control plane forwarding a request passes its id on, so both logs and the answer agree;
    // anyone else's would let them plant ids in our logs and error bodies.
    let from_control_plane = state
        .host
        .as_ref()
        .is_some_and(|h| h.from_control_plane(req.headers(), req.extensions()));
    let forwarded = from_control_plane
        .then(|| req.headers().get("x-stasis-request-id"))
        .flatten()
        .and_then(|v| v.to_str().ok())
        .filter(|v| v.len() == 36 && v.starts_with("req_") && v[4..].bytes().all(|b| b.is_ascii_hexdigit()))
        .map(str::to_string);
    let id = forwarded.unwrap_or_else(|| format!("req_{}", uuid::Uuid::new_v4().simple()));
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let started = std::time::Instant::now();
    let mut resp = REQUEST_ID.scope(id.clone(), next.run(req)).await;
    tracing::debug!(request_id = id, %method, path, status = resp.status().as_u16(),
        ms = started.elapsed().as_millis() as u64, "request");
    if let Ok(v) = HeaderValue::from_str(&id) {
        resp.headers_mut().insert("x-request-id", v);
    }
    resp
}

/// The platform, assembled and reconciled, ready to serve.
pub struct Platform {
    pub state: AppState,
    http: net::HttpSettings,
    host_events: tokio::sync::mpsc::UnboundedReceiver<stasis_vmm::HostEvent>,
    images: Arc<Images>,
}

impl Platform {
    pub async fn open(config: &Config) -> Result<Platform, SetupError> {
        // Before anything opens files: clients, QEMUs, the database and the store share them.
        match net::raise_nofile_limit() {
            Some(n) => tracing::debug!(open_files = n, "open-file limit"),
            None => tracing::warn!("cannot read this process's open-file limit"),
        }
        prepare_data_dir(&config.data_dir).during(format!("preparing {}", config.data_dir.display()))?;
        // Before anything is set up on the host (cgroups, ...): a refusal leaves nothing behind.
        stasis_store::secure_dir(&memory_dir(&config.data_dir)).during("preparing the RAM directory")?;
        match stasis_vmm::host::huge_ram_dir(&memory_dir(&config.data_dir), stasis_store::host_memory_bytes()) {
            Ok(true) => tracing::info!(dir = %memory_dir(&config.data_dir).display(), "snapshot RAM files are kept in huge pages"),
            Ok(false) => tracing::info!("snapshot RAM files are kept in the host's tmpfs, in 4 KiB pages (its snapshots of restored computers pause longer)"),
            Err(e) => tracing::warn!(error = %e, "mounting a huge-page tmpfs for snapshot RAM files; using the host's tmpfs"),
        }
        let db = Db::open(&config.database_url)
            .await
            .during(format!("opening the database {}", db::redact(&config.database_url)))?;
        let (host, host_events) = Host::new(config.data_dir.join("computers"), config.data_dir.join("machines"));
        let images = Images::new(config.cache_dir.clone());
        let settings = RuntimeSettings {
            accel: config.accel,
            qemu_binary: config.qemu_binary.clone(),
            tsc_khz: stasis_vmm::accel::host_tsc_khz(),
            jail: jail_settings(config.confine, &config.data_dir, &config.qemu_binary)?,
            disk_limits: config.disk_limits,
            cpu_model: stasis_vmm::cpu::resolve(&config.cpu_model, &config.qemu_binary, config.accel)
                .during("choosing the CPU model")?,
            capacity_mib: config.capacity_mib,
            host_id: match &config.role {
                Role::Host { id, .. } => Some(id.clone()),
                _ => None,
            },
        };
        // Networks of their own for confined QEMUs (the platform makes the namespaces as root);
        // without, QEMU's user networking.
        if let Some(jail) = &settings.jail {
            // Their resolver: a forwarder on this host to the host's own.
            let upstream = config.network.dns_upstream.or_else(|| {
                stasis_vmm::dns::host_resolver(&std::fs::read_to_string("/etc/resolv.conf").unwrap_or_default())
            });
            // The same port as before if it is free: computers that outlived the last process
            // send their queries there.
            let port_file = config.data_dir.join("dns-port");
            let last: u16 = std::fs::read_to_string(&port_file)
                .ok()
                .and_then(|p| p.trim().parse().ok())
                .unwrap_or(0);
            let bound = match tokio::net::UdpSocket::bind(("0.0.0.0", last)).await {
                Err(_) if last != 0 => tokio::net::UdpSocket::bind("0.0.0.0:0").await,
                other => other,
            };
            if let Some(port) = bound.as_ref().ok().and_then(|s| s.local_addr().ok()).map(|a| a.port()) {
                if port != last {
                    if last != 0 {
                        tracing::warn!(last, port, "the DNS forwarder's port changed: computers still running from before resolve names again after their next start");
                    }
                    let _ = std::fs::write(&port_file, port.to_string());
                }
            }
            let forwarder = match upstream {
                Some(upstream) => match bound {
                    Ok(socket) => Some((Arc::new(socket), upstream)),
                    Err(e) => {
                        tracing::warn!(error = %e, "computers get no resolver: binding the DNS forwarder");
                        None
                    }
                },
                None => {
                    tracing::warn!("computers get no resolver: this host names none (give --dns-upstream)");
                    None
                }
            };
            let network = stasis_vmm::network::NetworkSettings {
                tag: data_dir_tag(&config.data_dir)[..8].to_string(),
                pool: config.network.pool,
                shared_gid: jail.shared_gid,
                egress: config.network.egress.clone(),
                dns_port: forwarder
                    .as_ref()
                    .and_then(|(s, _)| s.local_addr().ok())
                    .map(|a| a.port()),
                ready: config.network.ready,
            };
            match tokio::task::spawn_blocking(move || stasis_vmm::network::Networks::open(network)).await {
                Ok(Ok(networks)) => {
                    tracing::info!(pool = %config.network.pool, "computers get networks of their own (namespace, tap, NAT, egress policy)");
                    if let Some((socket, upstream)) = forwarder {
                        tracing::info!(%upstream, "computers resolve names through the host's resolver");
                        tokio::spawn(stasis_vmm::dns::forward(socket, config.network.pool, upstream));
                    }
                    host.set_networks(networks);
                }
                Ok(Err(e)) => tracing::warn!("computers get QEMU's user networking, without the egress policy: {e}"),
                Err(e) => tracing::warn!("computers get QEMU's user networking: {e}"),
            }
        }
        let store = match &config.store_url {
            Some(url) => stasis_store::SnapshotStore::open(url, &config.s3),
            None => stasis_store::SnapshotStore::local(&config.data_dir.join("objects")),
        }
        .during("opening the snapshot store")?
        .with_naming(Arc::new(encryption::ChunkSalts::new(db.clone())));
        let store = match &config.master_key_file {
            None => store,
            Some(path) => {
                let master = encryption::load_master_key(path)?;
                let foreign = db
                    .count_foreign_data_keys(&master.id())
                    .await
                    .during("reading tenants' data keys")?;
                if foreign > 0 {
                    tracing::warn!(tenants = foreign, master_key = master.id(),
                        "this master key did not make some tenants' data keys: their encrypted snapshots will not restore");
                }
                tracing::info!(master_key = master.id(), "snapshots are encrypted at rest");
                store.with_keyring(Arc::new(encryption::TenantKeys::new(db.clone(), master)))
            }
        };
        let events = Arc::new(EventBus::new(db.clone()));
        let materializer = Arc::new(Materializer::new(
            store.clone(),
            config.data_dir.join("cache/snapshots"),
            memory_dir(&config.data_dir),
        ));
        let limits = Arc::new(limits::Limits::new(db.clone(), config.limits));
        let computers = Computers::new(
            db.clone(),
            host,
            images.clone(),
            settings,
            computers::LocalCopies {
                materializer: materializer.clone(),
                boot_files: Arc::new(snapshots::boot_files::BootFiles::new(
                    store.clone(),
                    config.data_dir.join("cache/boot"),
                )),
            },
            events.clone(),
            limits.clone(),
        );
        let identity = {
            let role = match &config.role {
                Role::Embedded => "embedded".to_string(),
                Role::ControlPlane { .. } => "control-plane".to_string(),
                Role::Host { id, .. } => id.to_string(),
            };
            let dir = hex::encode(&sha2::Sha256::digest(config.data_dir.to_string_lossy().as_bytes())[..6]);
            format!("{role}-{dir}")
        };
        let jobs = jobs::Jobs::new(db.clone(), identity, computers.host_id().cloned());
        let snapshots = Snapshots::new(
            db.clone(),
            store,
            computers.clone(),
            events,
            materializer,
            jobs.clone(),
            // Staging, whether other processes upload to the same store, the default expiry.
            (
                config.data_dir.join("staging"),
                !matches!(config.role, Role::Embedded),
                config.snapshot_ttl,
            ),
        );
        let clustered = !matches!(config.role, Role::Embedded);
        if clustered && (config.database_url.starts_with("sqlite:") || config.store_url.is_none()) {
            return Err(SetupError::refused(
                "several hosts need a shared database and store: give --database-url postgres://... and \
                 --store-url s3://...",
            ));
        }
        if !clustered {
            // Restores in flight died with the last process (with several hosts, another
            // host's may still be running).
            db.reset_restores().await.during("resetting restores")?;
        }
        computers.reconcile().await.during("reconciling computers")?;
        snapshots.recover().await.during("recovering snapshots")?;
        // The job worker; collection jobs belong to the control plane (or embedded platform),
        // one collector per store.
        tokio::spawn(jobs.work(snapshots.job_handlers()));
        // Idle computers pause where they run (the embedded platform, or each host).
        if !matches!(config.role, Role::ControlPlane { .. }) {
            snapshots.spawn_auto_stop(EXPIRY_SWEEP);
        }
        let sweeper = snapshots.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(LOCAL_COPY_SWEEP);
            loop {
                every.tick().await;
                sweeper.sweep_local_copies().await;
            }
        });
        if !matches!(config.role, Role::Host { .. }) {
            snapshots.schedule_collection(std::time::Duration::ZERO).await;
            // Expired snapshots are deleted where the store is collected.
            snapshots.spawn_expiry(EXPIRY_SWEEP);
        }
        let control_plane = match &config.role {
            Role::ControlPlane { auth, host_timeout } => {
                let cp = Arc::new(cluster::ControlPlane::new(
                    auth.clone(),
                    *host_timeout,
                    cluster::Joined {
                        heartbeat_secs: (host_timeout.as_secs() / 4).max(1),
                        limits: config.limits,
                    },
                ));
                tokio::spawn(cp.clone().watch_hosts(db.clone(), computers.clone()));
                Some(cp)
            }
            _ => None,
        };
        let host = match &config.role {
            Role::Host { id, auth } => Some(Arc::new(cluster::HostSide {
                id: id.clone(),
                auth: auth.clone(),
            })),
            _ => None,
        };
        Ok(Platform {
            state: AppState {
                db,
                computers,
                snapshots,
                control_plane,
                host,
                limits,
                guards: Arc::new(net::Guards::new(&net::HttpSettings::default())),
                previews: Arc::new(preview::Previews::new(
                    config
                        .preview
                        .clone()
                        .unwrap_or_else(|| preview::PreviewConfig::local(config.listen)),
                )),
            },
            http: net::HttpSettings::default(),
            host_events,
            images,
        })
    }

    /// Sets how preview URLs are made (before [`serve`](Self::serve)).
    pub fn with_preview(mut self, preview: preview::PreviewConfig) -> Platform {
        self.state.previews = Arc::new(preview::Previews::new(preview));
        self
    }

    /// Sets how the listener treats connections (before [`serve`](Self::serve)).
    pub fn with_http(mut self, http: net::HttpSettings) -> Platform {
        self.state.guards = Arc::new(net::Guards::new(&http));
        self.http = http;
        self
    }

    /// Serves until `shutdown` resolves, then stops every machine.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        self.serve_on(Some(listener), None, shutdown).await
    }

    /// Serves the public API (if any) and the cluster listener (if any) until `shutdown`.
    pub async fn serve_on(
        self,
        listener: Option<tokio::net::TcpListener>,
        cluster: Option<tls::ClusterListener>,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let Platform {
            state,
            http,
            mut host_events,
            images,
        } = self;
        // Build (or load) the image now so the first computer does not wait for it (a control
        // plane runs no computer).
        if state.control_plane.is_none() {
            tokio::spawn(async move {
                match images.get().await {
                    Err(e) if stasis_image::builds_aborted() => {
                        tracing::info!("the guest image build stopped at shutdown ({e})")
                    }
                    Err(e) => tracing::error!("{e}"),
                    Ok(_) => {}
                }
            });
        }
        let computers = state.computers.clone();
        tokio::spawn(async move {
            while let Some(event) = host_events.recv().await {
                computers.on_host_event(event).await;
            }
        });
        tokio::spawn(prune_periodically(state.db.clone()));
        let computers = state.computers.clone();
        let app = router(state);
        // The public API through the accept loop that bounds connections and header time; the
        // cluster's mutual-TLS listener beside it, both stopped by the one shutdown.
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let until = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let cluster_side = tokio::spawn(tls::serve(None, cluster, app.clone(), until(stopped.clone())));
        let public_side = async {
            match listener {
                Some(l) => net::serve(l, app, &http, until(stopped.clone())).await,
                None => {
                    until(stopped.clone()).await;
                    Ok(())
                }
            }
        };
        let signal = async move {
            shutdown.await;
            let _ = stop.send(true);
        };
        let (public, ()) = tokio::join!(public_side, signal);
        public?;
        cluster_side.await.map_err(std::io::Error::other)??;
        // An image build still running (a first start) is stopped, not waited for.
        stasis_image::abort_builds();
        tracing::info!("stopping all computers");
        computers.shutdown().await;
        Ok(())
    }
}

/// How often rows that are no use any more are deleted.
const PRUNE_EVERY: std::time::Duration = std::time::Duration::from_secs(600);

/// Deletes old idempotency records, expired SSE tickets and deleted snapshots' events, now and
/// then every [`PRUNE_EVERY`] (several processes on one database may all do it: it is idempotent).
async fn prune_periodically(db: Db) {
    let mut every = tokio::time::interval(PRUNE_EVERY);
    loop {
        every.tick().await;
        match db.prune_expired(chrono::Utc::now()).await {
            Ok(n) if n > 0 => tracing::debug!(rows = n, "pruned expired rows"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "pruning expired rows"),
        }
    }
}
