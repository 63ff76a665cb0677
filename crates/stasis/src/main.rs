//! `stasis`: runs the platform (`serve`), manages API keys and the guest image, and talks to a
//! running platform as a command-line client (`computer ...`), reading `MIOSA_API_KEY` and
//! `MIOSA_BASE_URL` like the official SDK.

mod bench;
mod client;
mod computer;
mod host;
mod shell;
mod snapshot;

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "stasis",
    version,
    about = "Self-hosted computers with snapshots of running VMs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the platform: API, SQLite metadata, local object store, QEMU machines, one process
    /// (or, with --cluster-token, a control plane that hosts join).
    Serve(ServeArgs),
    /// Run computers for a control plane: join it, heartbeat, serve its requests.
    Host(HostArgs),
    /// A cluster's credentials: its CA, the control plane's certificate, each host's.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
    /// API keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Tenants' own limits (over the serve defaults).
    Tenant {
        #[command(subcommand)]
        command: TenantCommand,
    },
    /// The guest image.
    Image {
        #[command(subcommand)]
        command: ImageCommand,
    },
    /// Computers on a running platform (uses MIOSA_API_KEY and MIOSA_BASE_URL).
    #[command(alias = "computers")]
    Computer {
        #[command(flatten)]
        conn: client::Connection,
        #[command(subcommand)]
        command: computer::ComputerCommand,
    },
    /// Snapshots of computers on a running platform: create (with --wait: a progress bar),
    /// list, get, delete, restore, events.
    #[command(alias = "snapshots")]
    Snapshot {
        #[command(flatten)]
        conn: client::Connection,
        #[command(subcommand)]
        command: snapshot::SnapshotCommand,
    },
    /// A new computer from a fresh snapshot of a running one.
    Clone {
        #[command(flatten)]
        conn: client::Connection,
        id: String,
        /// The clone's name (default: the original's with -clone).
        #[arg(long)]
        name: Option<String>,
        /// Wait until the clone is running.
        #[arg(long)]
        wait: bool,
    },
    /// Benchmarks against a platform started in this process.
    Bench {
        #[command(subcommand)]
        command: bench::BenchCommand,
    },
}

#[derive(clap::Args)]
struct DataDir {
    /// Where metadata, disks and snapshots live.
    #[arg(long, env = "STASIS_DATA_DIR")]
    data_dir: Option<PathBuf>,
}

impl DataDir {
    fn resolve(&self) -> PathBuf {
        self.data_dir.clone().unwrap_or_else(default_data_dir)
    }
}

fn default_data_dir() -> PathBuf {
    if let Some(x) = std::env::var_os("XDG_DATA_HOME").filter(|v| !v.is_empty()) {
        return PathBuf::from(x).join("stasis");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| "/root".into());
    home.join(".local/share/stasis")
}

/// Where metadata lives.
#[derive(clap::Args)]
struct Database {
    /// Metadata database: sqlite://PATH or postgres://USER:PASSWORD@HOST:PORT/DB
    /// (default: SQLite in the data dir).
    #[arg(long, env = "STASIS_DATABASE_URL")]
    database_url: Option<String>,
}

impl Database {
    fn resolve(&self, data_dir: &std::path::Path) -> String {
        stasis_server::database_url(data_dir, self.database_url.as_deref())
    }
}

#[derive(clap::Args)]
pub struct ServeArgs {
    #[arg(long, default_value = "127.0.0.1:8080", env = "STASIS_LISTEN")]
    listen: SocketAddr,
    /// What preview URLs end in: port P of a computer is served at
    /// `P-SLUG.sandbox.DOMAIN` on this listener (default `localhost:PORT` of --listen, which
    /// needs no DNS: *.localhost is loopback).
    #[arg(long, env = "STASIS_PREVIEW_DOMAIN")]
    preview_domain: Option<String>,
    /// The scheme preview URLs are given with: `http`, or `https` behind a proxy that
    /// terminates TLS.
    #[arg(long, default_value = "http", env = "STASIS_PREVIEW_SCHEME", value_parser = ["http", "https"])]
    preview_scheme: String,
    /// How long a private port's signed link lasts, in seconds.
    #[arg(long, default_value_t = 3600, env = "STASIS_PREVIEW_LINK_TTL_SECS", value_parser = clap::value_parser!(u64).range(1..=30 * 24 * 3600))]
    preview_link_ttl_secs: u64,
    /// How long a snapshot is kept when its create names no expiry, in seconds (0: until it
    /// is deleted). Named snapshots never expire.
    #[arg(long, default_value_t = 0, env = "STASIS_SNAPSHOT_TTL_SECS")]
    snapshot_ttl_secs: u64,
    #[command(flatten)]
    data: DataDir,
    #[command(flatten)]
    database: Database,
    /// Snapshot store: s3://BUCKET[/PREFIX] (credentials from AWS_ACCESS_KEY_ID,
    /// AWS_SECRET_ACCESS_KEY, ...) or file:///DIR (default: objects/ in the data dir).
    #[arg(long, env = "STASIS_STORE_URL")]
    store_url: Option<String>,
    /// S3 endpoint for an S3-compatible server, e.g. http://127.0.0.1:9000.
    #[arg(long, env = "STASIS_S3_ENDPOINT")]
    s3_endpoint: Option<String>,
    #[arg(long, env = "STASIS_S3_REGION")]
    s3_region: Option<String>,
    /// How long an S3 request is retried, with backoff, before it fails.
    #[arg(long, default_value_t = 120, env = "STASIS_S3_RETRY_SECS")]
    s3_retry_secs: u64,
    /// Be a control plane (needs PostgreSQL and S3; computers then run on the hosts): its
    /// credentials, the `control-plane` directory `stasis cluster init` made. Hosts join over
    /// mutual TLS on --cluster-listen.
    #[arg(long, env = "STASIS_CLUSTER_CREDENTIALS")]
    cluster_credentials: Option<PathBuf>,
    /// Where hosts reach the control plane (mutual TLS; never the public API's port).
    #[arg(long, default_value = "127.0.0.1:8443", env = "STASIS_CLUSTER_LISTEN")]
    cluster_listen: SocketAddr,
    /// With --insecure-plain-http instead of --cluster-credentials: one shared secret, at
    /// least 32 characters, that hosts present in clear.
    #[arg(long, env = "STASIS_CLUSTER_TOKEN")]
    cluster_token: Option<String>,
    /// Talk to hosts in plain HTTP with --cluster-token: anyone on the network reads every
    /// request and can pass for the control plane or any host. Trusted networks only.
    #[arg(long, env = "STASIS_INSECURE_PLAIN_HTTP")]
    insecure_plain_http: bool,
    /// A host silent this long is lost: its computers turn error.
    #[arg(long, default_value_t = 10, env = "STASIS_HOST_TIMEOUT_SECS")]
    host_timeout_secs: u64,
    #[command(flatten)]
    machines: Machines,
    #[command(flatten)]
    limits: LimitArgs,
    #[command(flatten)]
    encryption: Encryption,
    #[command(flatten)]
    http: HttpArgs,
}

/// How the listener treats clients.
#[derive(clap::Args)]
struct HttpArgs {
    /// Seconds a client has to send a request's headers; also how long an idle keep-alive
    /// connection stays open.
    #[arg(long, default_value_t = 20, env = "STASIS_HEADER_TIMEOUT_SECS")]
    header_timeout_secs: u64,
    /// Seconds a client has to send a request's body, once its headers are in (408 after).
    #[arg(long, default_value_t = 60, env = "STASIS_BODY_TIMEOUT_SECS")]
    body_timeout_secs: u64,
    /// Connections open at once (at most half the open-file limit); beyond it new ones are
    /// closed at once.
    #[arg(long, default_value_t = 4096, env = "STASIS_MAX_CONNECTIONS")]
    max_connections: usize,
    /// Exec calls and snapshot event streams one tenant may have open at once (429 beyond).
    #[arg(long, default_value_t = 64, env = "STASIS_MAX_STREAMS_PER_TENANT")]
    max_streams_per_tenant: usize,
    /// Seconds shutdown waits for requests in flight before closing their connections.
    #[arg(long, default_value_t = 10, env = "STASIS_SHUTDOWN_GRACE_SECS")]
    shutdown_grace_secs: u64,
}

impl HttpArgs {
    fn settings(&self) -> stasis_server::net::HttpSettings {
        stasis_server::net::HttpSettings {
            header_timeout: std::time::Duration::from_secs(self.header_timeout_secs.max(1)),
            body_timeout: std::time::Duration::from_secs(self.body_timeout_secs.max(1)),
            max_connections: self.max_connections.max(1),
            max_streams_per_tenant: self.max_streams_per_tenant.max(1),
            shutdown_grace: std::time::Duration::from_secs(self.shutdown_grace_secs),
        }
    }
}

/// Encryption at rest.
#[derive(clap::Args)]
struct Encryption {
    /// Encrypt snapshots at rest: a file holding the master key, 64 hex digits (e.g. from
    /// `openssl rand -hex 32`). Every host of a cluster needs the same one. Without it,
    /// snapshots are stored unencrypted (and encrypted ones cannot be restored).
    #[arg(long, env = "STASIS_MASTER_KEY_FILE")]
    master_key_file: Option<PathBuf>,
}

/// Every tenant's limits, unless `stasis tenant limits` set the tenant's own.
#[derive(clap::Args)]
struct LimitArgs {
    /// API requests per second per tenant (bursts of twice as many pass); beyond it: 429 with
    /// Retry-After. 0: no limit.
    #[arg(long, default_value_t = 100, env = "STASIS_RATE_LIMIT")]
    rate_limit: u64,
    /// Computers a tenant may have running (or starting); beyond it: 403 quota_exceeded.
    #[arg(long, env = "STASIS_MAX_COMPUTERS")]
    max_computers: Option<u64>,
    /// Snapshots a tenant may keep (not deleted, not failed).
    #[arg(long, env = "STASIS_MAX_SNAPSHOTS")]
    max_snapshots: Option<u64>,
    /// Bytes of snapshots a tenant may keep in the store, in GiB.
    #[arg(long, env = "STASIS_MAX_STORED_GIB")]
    max_stored_gib: Option<f64>,
}

impl LimitArgs {
    fn limits(&self) -> stasis_server::limits::TenantLimits {
        stasis_server::limits::TenantLimits {
            max_computers: self.max_computers,
            max_snapshots: self.max_snapshots,
            max_stored_bytes: self.max_stored_gib.map(gib_to_bytes),
            rate_per_sec: Some(self.rate_limit),
        }
    }
}

fn gib_to_bytes(gib: f64) -> u64 {
    (gib.max(0.0) * (1u64 << 30) as f64) as u64
}

/// How this process runs machines.
#[derive(clap::Args)]
struct Machines {
    /// auto (KVM where the CPU has vmx/svm and /dev/kvm opens, else TCG), kvm or tcg.
    #[arg(long, default_value = "auto", env = "STASIS_ACCEL")]
    accel: String,
    /// The QEMU binary.
    #[arg(long, default_value = "qemu-system-x86_64", env = "STASIS_QEMU")]
    qemu: PathBuf,
    /// Image cache (default ~/.cache/stasis).
    #[arg(long, env = "STASIS_CACHE_DIR")]
    cache_dir: Option<PathBuf>,
    /// Memory (MiB) lent to computers here (default: three quarters of the machine's RAM);
    /// creates, restores and starts beyond it answer 503.
    #[arg(long, env = "STASIS_CAPACITY_MIB")]
    capacity_mib: Option<u64>,
    /// Confine each computer's QEMU (own user, PID/mount/network/IPC/UTS namespaces, cgroups,
    /// seccomp): auto (when running as root), on (refuse to start without it) or off.
    #[arg(long, default_value = "auto", env = "STASIS_CONFINE")]
    confine: stasis_server::Confine,
    /// The CPU model computers get. auto: max under TCG; under KVM the newest named model of
    /// this CPU's vendor the host runs fully (snapshots then move between hosts of one CPU
    /// generation). host: -cpu host (KVM only). Or any QEMU model this host runs
    #[arg(long, default_value = "auto", env = "STASIS_CPU_MODEL")]
    cpu_model: String,
    /// Each computer's disk traffic ceiling in MiB/s, reads and writes together (0: none).
    #[arg(long, default_value_t = 256, env = "STASIS_DISK_MBPS")]
    disk_mbps: u64,
    /// Each computer's disk operations ceiling per second (0: none).
    #[arg(long, default_value_t = 4000, env = "STASIS_DISK_IOPS")]
    disk_iops: u64,
    /// Where computers' host-side addresses (their ip_address) come from, a /30 each.
    #[arg(long, default_value = "10.213.0.0/16", env = "STASIS_NETWORK_POOL")]
    network_pool: stasis_vmm::network::Cidr,
    /// A network computers may reach although the default policy refuses it (private,
    /// loopback and link-local ranges, this host, other computers). Repeatable.
    #[arg(
        long = "egress-allow",
        value_name = "CIDR",
        env = "STASIS_EGRESS_ALLOW",
        value_delimiter = ','
    )]
    egress_allow: Vec<stasis_vmm::network::Cidr>,
    /// A network computers may not reach, besides the default ones. Repeatable.
    #[arg(
        long = "egress-deny",
        value_name = "CIDR",
        env = "STASIS_EGRESS_DENY",
        value_delimiter = ','
    )]
    egress_deny: Vec<stasis_vmm::network::Cidr>,
    /// The resolver computers' DNS queries are sent to, ADDRESS:PORT (default: the host's
    /// own, the first IPv4 nameserver of /etc/resolv.conf).
    #[arg(long, value_name = "ADDRESS:PORT", env = "STASIS_DNS_UPSTREAM")]
    dns_upstream: Option<std::net::SocketAddr>,
    /// Computers' networks kept made ahead, so that a start or restore takes one at once
    /// (0: each is made when it is needed).
    #[arg(long, default_value_t = 2, env = "STASIS_NETWORK_READY")]
    network_ready: usize,
}

impl Machines {
    fn capacity_mib(&self) -> u64 {
        self.capacity_mib.unwrap_or_else(stasis_server::default_capacity_mib)
    }
}

#[derive(clap::Args)]
pub struct HostArgs {
    /// The control plane's --cluster-listen URL, e.g. https://10.0.0.1:8443
    #[arg(long, env = "STASIS_CONTROL_PLANE")]
    control_plane: String,
    /// This host's credentials: the `hosts/NAME` directory `stasis cluster add-host` made.
    #[arg(long, env = "STASIS_CLUSTER_CREDENTIALS")]
    cluster_credentials: Option<PathBuf>,
    /// With --insecure-plain-http only: the control plane's --cluster-token.
    #[arg(long, env = "STASIS_CLUSTER_TOKEN")]
    cluster_token: Option<String>,
    /// Talk to the control plane in plain HTTP with a shared token (see `serve --help`).
    #[arg(long, env = "STASIS_INSECURE_PLAIN_HTTP")]
    insecure_plain_http: bool,
    /// Where this host serves the control plane's requests.
    #[arg(long, default_value = "127.0.0.1:8081", env = "STASIS_LISTEN")]
    listen: SocketAddr,
    /// The URL the control plane reaches this host at (default: https://LISTEN); an address
    /// or name its certificate holds (`add-host --san`).
    #[arg(long, env = "STASIS_ADVERTISE_URL")]
    advertise_url: Option<String>,
    #[command(flatten)]
    data: DataDir,
    /// The cluster's database, postgres://USER:PASSWORD@HOST:PORT/DB (the control plane's).
    #[arg(long, env = "STASIS_DATABASE_URL")]
    database_url: String,
    /// The cluster's snapshot store, s3://BUCKET[/PREFIX] (the control plane's); credentials
    /// from AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...
    #[arg(long, env = "STASIS_STORE_URL")]
    store_url: String,
    /// S3 endpoint for an S3-compatible server.
    #[arg(long, env = "STASIS_S3_ENDPOINT")]
    s3_endpoint: Option<String>,
    #[arg(long, env = "STASIS_S3_REGION")]
    s3_region: Option<String>,
    #[command(flatten)]
    machines: Machines,
    /// How long an S3 request is retried, with backoff, before it fails.
    #[arg(long, default_value_t = 120, env = "STASIS_S3_RETRY_SECS")]
    s3_retry_secs: u64,
    #[command(flatten)]
    encryption: Encryption,
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Make a cluster CA in DIR (ca.pem, ca.key: keep it offline once the hosts are added) and
    /// the control plane's credentials in DIR/control-plane (give it to `serve
    /// --cluster-credentials`).
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// Addresses and names hosts dial the control plane at (repeat; default localhost
        /// and 127.0.0.1).
        #[arg(long)]
        san: Vec<String>,
    },
    /// Make host NAME's credentials in DIR/hosts/NAME (copy it to the host, give it to `host
    /// --cluster-credentials`); the host joins only as NAME.
    AddHost {
        #[arg(long)]
        dir: PathBuf,
        #[arg(long)]
        name: String,
        /// Addresses and names the control plane dials this host at (repeat; default
        /// localhost and 127.0.0.1).
        #[arg(long)]
        san: Vec<String>,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create a key for a tenant (creating the tenant if needed); the key is the last line.
    Create {
        #[arg(long)]
        tenant: String,
        #[command(flatten)]
        data: DataDir,
        #[command(flatten)]
        database: Database,
    },
    /// Revoke keys: every key of --tenant, the one --key (read from the environment or
    /// stdin with `-`), or those shown as --prefix (`stasis_` and 4 more characters). Revoked
    /// keys answer 401 at once.
    Revoke {
        #[arg(long, required_unless_present_any = ["key", "prefix"])]
        tenant: Option<String>,
        #[arg(long, env = "STASIS_REVOKE_KEY", hide_env_values = true, conflicts_with = "prefix")]
        key: Option<String>,
        #[arg(long)]
        prefix: Option<String>,
        #[command(flatten)]
        data: DataDir,
        #[command(flatten)]
        database: Database,
    },
}

#[derive(Subcommand)]
enum TenantCommand {
    /// Set a tenant's quotas and request rate (what is not given is left as it is); prints them.
    Limits {
        #[arg(long)]
        tenant: String,
        /// Computers it may have running.
        #[arg(long)]
        computers: Option<u64>,
        /// Snapshots it may keep.
        #[arg(long)]
        snapshots: Option<u64>,
        /// Snapshot bytes it may keep in the store, in GiB.
        #[arg(long)]
        stored_gib: Option<f64>,
        /// API requests per second (0: no limit).
        #[arg(long)]
        rate: Option<u64>,
        #[command(flatten)]
        data: DataDir,
        #[command(flatten)]
        database: Database,
    },
}

#[derive(Subcommand)]
enum ImageCommand {
    /// Build the default guest image (or find it in the cache) and print where it is.
    Build {
        #[arg(long, env = "STASIS_CACHE_DIR")]
        cache_dir: Option<PathBuf>,
    },
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("STASIS_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,sqlx=warn"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn main() {
    // Everything this process and its QEMUs create (disks, RAM files, sockets, logs, the
    // database) is owner-only.
    rustix::process::umask(rustix::fs::Mode::from_raw_mode(0o077));
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let result = runtime.block_on(run(cli));
    // Work left on the blocking pool (an image build told to stop, a wait for the image cache's
    // lock) is not waited for: the process ends and the kernel closes what it held.
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        let code = client::exit_code_of(&e);
        std::process::exit(code);
    }
}

async fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Serve(args) => {
            init_logging();
            serve(args).await
        }
        Command::Host(args) => {
            init_logging();
            host::run(args).await
        }
        Command::Cluster {
            command: ClusterCommand::Init { dir, san },
        } => {
            let out = stasis_server::tls::init(&dir, &san).map_err(anyhow::Error::msg)?;
            println!("made a cluster CA in {}", dir.display());
            println!("control plane's credentials: {}", out.display());
            println!("next: stasis cluster add-host --dir {} --name NAME", dir.display());
            Ok(())
        }
        Command::Cluster {
            command: ClusterCommand::AddHost { dir, name, san },
        } => {
            let out = stasis_server::tls::add_host(&dir, &name, &san).map_err(anyhow::Error::msg)?;
            println!("host {name}'s credentials: {}", out.display());
            Ok(())
        }
        Command::Keys {
            command: KeysCommand::Create { tenant, data, database },
        } => {
            let tenant = tenant.trim();
            if tenant.is_empty() {
                bail!("--tenant must not be empty");
            }
            let db = open_db(&data, &database).await?;
            let key = stasis_server::auth::create_key(&db, tenant).await?;
            println!("created a key for tenant {tenant:?}");
            println!("{key}");
            Ok(())
        }
        Command::Keys {
            command:
                KeysCommand::Revoke {
                    tenant,
                    key,
                    prefix,
                    data,
                    database,
                },
        } => revoke_keys(tenant, key, prefix, &data, &database).await,
        Command::Tenant {
            command:
                TenantCommand::Limits {
                    tenant,
                    computers,
                    snapshots,
                    stored_gib,
                    rate,
                    data,
                    database,
                },
        } => {
            let db = open_db(&data, &database).await?;
            let wanted = stasis_server::limits::TenantLimits {
                max_computers: computers,
                max_snapshots: snapshots,
                max_stored_bytes: stored_gib.map(gib_to_bytes),
                rate_per_sec: rate,
            };
            if !db.set_tenant_limits(tenant.trim(), &wanted).await? {
                bail!("no tenant {tenant:?} (create one with `stasis keys create --tenant {tenant}`)");
            }
            let id = db.tenant_by_name(tenant.trim()).await?.context("the tenant vanished")?;
            let own = db.tenant_limits(id).await?;
            let show = |v: Option<u64>| v.map_or("the platform default".to_string(), |n| n.to_string());
            println!("tenant {tenant:?}:");
            println!("  computers running: {}", show(own.max_computers));
            println!("  snapshots kept:    {}", show(own.max_snapshots));
            println!("  bytes stored:      {}", show(own.max_stored_bytes));
            println!("  requests/second:   {}", show(own.rate_per_sec));
            Ok(())
        }
        Command::Image {
            command: ImageCommand::Build { cache_dir },
        } => {
            let cache = cache_dir.unwrap_or_else(stasis_image::default_cache_dir);
            let image = tokio::task::spawn_blocking(move || {
                let progress = |m: &str| eprintln!("image: {m}");
                stasis_image::ensure(&cache, &Default::default(), &progress)
            })
            .await??;
            println!("{}", serde_json::to_string_pretty(&image)?);
            Ok(())
        }
        Command::Computer { conn, command } => computer::run(conn, command).await,
        Command::Snapshot { conn, command } => snapshot::run(conn, command).await,
        Command::Clone { conn, id, name, wait } => {
            let api = client::Api::new(&conn)?;
            snapshot::clone(&api, conn.output, &id, name, wait).await
        }
        Command::Bench { command } => {
            // Quiet unless asked: the platform a bench runs logs with STASIS_LOG set.
            if std::env::var_os("STASIS_LOG").is_some() {
                init_logging();
            }
            bench::run(command).await
        }
    }
}

/// `stasis keys revoke`.
async fn revoke_keys(
    tenant: Option<String>,
    key: Option<String>,
    prefix: Option<String>,
    data: &DataDir,
    database: &Database,
) -> Result<()> {
    let db = open_db(data, database).await?;
    let tenant_id = match tenant.as_deref().map(str::trim) {
        None => None,
        Some(name) => Some(
            db.tenant_by_name(name)
                .await?
                .with_context(|| format!("no tenant {name:?}"))?,
        ),
    };
    let revoked = match (key, prefix) {
        (Some(key), _) => {
            let key = if key == "-" {
                let mut line = String::new();
                std::io::stdin().read_line(&mut line)?;
                line
            } else {
                key
            };
            let hash = stasis_server::auth::hash_key(key.trim());
            if let Some(t) = tenant_id {
                if db.tenant_by_key_hash(&hash).await?.is_some_and(|owner| owner != t) {
                    bail!("that key is not tenant {:?}'s", tenant.unwrap_or_default());
                }
            }
            u64::from(db.revoke_key_hash(&hash).await?)
        }
        (None, Some(prefix)) => db.revoke_key_prefix(prefix.trim(), tenant_id).await?,
        (None, None) => match tenant_id {
            Some(t) => db.revoke_tenant_keys(t).await?,
            None => bail!("give --tenant, --key or --prefix"),
        },
    };
    if revoked == 0 {
        bail!("no such key: nothing was revoked");
    }
    println!("revoked {revoked} key(s)");
    // The saved default key is no use once revoked: the next start makes a new one.
    let saved = stasis_server::default_key_path(&data.resolve());
    if let Ok(k) = std::fs::read_to_string(&saved) {
        if db
            .tenant_by_key_hash(&stasis_server::auth::hash_key(k.trim()))
            .await?
            .is_none()
        {
            std::fs::remove_file(&saved).with_context(|| format!("removing {}", saved.display()))?;
            println!("removed {} (it held a revoked key)", saved.display());
        }
    }
    Ok(())
}

/// The metadata database of an admin command (keys, tenant limits).
async fn open_db(data: &DataDir, database: &Database) -> Result<stasis_server::db::Db> {
    let data_dir = data.resolve();
    stasis_server::prepare_data_dir(&data_dir).with_context(|| format!("preparing {}", data_dir.display()))?;
    let url = database.resolve(&data_dir);
    stasis_server::db::Db::open(&url)
        .await
        .with_context(|| format!("opening the database {}", stasis_server::db::redact(&url)))
}

impl Machines {
    /// A platform config with these machine settings; the rest as the caller sets it.
    fn config(&self, listen: SocketAddr, data_dir: PathBuf, database_url: String) -> Result<stasis_server::Config> {
        Ok(stasis_server::Config {
            listen,
            data_dir,
            cache_dir: self.cache_dir.clone().unwrap_or_else(stasis_image::default_cache_dir),
            accel: stasis_vmm::Accel::choose(&self.accel).map_err(anyhow::Error::msg)?,
            qemu_binary: self.qemu.clone(),
            database_url,
            store_url: None,
            s3: Default::default(),
            role: Default::default(),
            capacity_mib: Some(self.capacity_mib()),
            limits: Default::default(),
            confine: self.confine,
            cpu_model: self.cpu_model.clone(),
            disk_limits: (self.disk_mbps > 0 || self.disk_iops > 0).then_some(stasis_vmm::vm::DiskLimits {
                bytes_per_sec: self.disk_mbps << 20,
                iops: self.disk_iops,
            }),
            master_key_file: None,
            preview: None,
            snapshot_ttl: None,
            network: stasis_server::NetworkConfig {
                pool: self.network_pool,
                egress: stasis_vmm::network::EgressPolicy {
                    allow: self.egress_allow.clone(),
                    deny: self.egress_deny.clone(),
                },
                dns_upstream: self.dns_upstream,
                ready: self.network_ready,
            },
        })
    }
}

pub(crate) fn server_config(args: &ServeArgs) -> Result<stasis_server::Config> {
    let mut base = args.machines.config(
        args.listen,
        args.data.resolve(),
        args.database.resolve(&args.data.resolve()),
    )?;
    if args.cluster_credentials.is_some() || args.cluster_token.is_some() {
        // A control plane lends no memory: whatever slips past the dispatch to hosts cannot
        // boot a machine here.
        base.capacity_mib = Some(0);
    }
    Ok(stasis_server::Config {
        store_url: args.store_url.clone(),
        s3: stasis_store::S3Options {
            endpoint: args.s3_endpoint.clone(),
            region: args.s3_region.clone(),
            retry_timeout: Some(std::time::Duration::from_secs(args.s3_retry_secs)),
        },
        limits: args.limits.limits(),
        master_key_file: args.encryption.master_key_file.clone(),
        preview: Some(stasis_server::preview::PreviewConfig {
            domain: args
                .preview_domain
                .clone()
                .map(|d| d.trim().trim_matches('.').to_string())
                .filter(|d| !d.is_empty())
                .unwrap_or_else(|| format!("localhost:{}", args.listen.port())),
            scheme: args.preview_scheme.clone(),
            link_ttl: std::time::Duration::from_secs(args.preview_link_ttl_secs),
        }),
        snapshot_ttl: (args.snapshot_ttl_secs > 0).then(|| std::time::Duration::from_secs(args.snapshot_ttl_secs)),
        role: match cluster_auth(
            args.cluster_credentials.as_deref(),
            args.cluster_token.as_deref(),
            args.insecure_plain_http,
        )? {
            Some(auth) => stasis_server::Role::ControlPlane {
                auth,
                host_timeout: std::time::Duration::from_secs(args.host_timeout_secs.max(2)),
            },
            None => stasis_server::Role::Embedded,
        },
        ..base
    })
}

/// How this process knows the other side of the cluster, from its flags (None: no cluster).
pub(crate) fn cluster_auth(
    credentials: Option<&std::path::Path>,
    token: Option<&str>,
    plain: bool,
) -> Result<Option<stasis_server::cluster::ClusterAuth>> {
    use stasis_server::cluster::{ClusterAuth, MIN_TOKEN_LEN};
    let token = token.map(str::trim).filter(|t| !t.is_empty());
    match (credentials, token, plain) {
        (None, None, false) => Ok(None),
        (Some(dir), None, false) => {
            let creds = stasis_server::tls::Credentials::load(dir).map_err(anyhow::Error::msg)?;
            Ok(Some(ClusterAuth::Tls(std::sync::Arc::new(creds))))
        }
        (None, Some(t), true) => {
            if t.len() < MIN_TOKEN_LEN {
                bail!("--cluster-token must be at least {MIN_TOKEN_LEN} characters (e.g. `openssl rand -hex 32`)");
            }
            tracing::warn!(
                "--insecure-plain-http: cluster traffic is plain HTTP with a shared token; anyone on the network \
                 can read it and pass for the control plane or any host"
            );
            Ok(Some(ClusterAuth::PlainToken(t.to_string())))
        }
        (Some(_), _, true) | (Some(_), Some(_), _) => {
            bail!("--cluster-credentials is mutual TLS: give it without --cluster-token and --insecure-plain-http")
        }
        (None, Some(_), false) => bail!(
            "--cluster-token is for --insecure-plain-http only; give --cluster-credentials DIR (made by \
             `stasis cluster init`) for mutual TLS"
        ),
        (None, None, true) => bail!("--insecure-plain-http needs --cluster-token"),
    }
}

async fn serve(args: ServeArgs) -> Result<()> {
    let config = server_config(&args)?;
    // Caught from here on, before anything is set up on the host.
    let shutdown = shutdown_signal();
    let mut platform = stasis_server::Platform::open(&config)
        .await
        .map_err(anyhow::Error::msg)?;
    let key = default_key(&platform.state.db, &config.data_dir).await?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listening on {}", config.listen))?;
    let base = format!("http://{}/api/v1", listener.local_addr()?);
    // The default preview domain names the port actually listened on (--listen may say 0).
    if args.preview_domain.is_none() {
        if let Some(mut preview) = config.preview.clone() {
            preview.domain = format!("localhost:{}", listener.local_addr()?.port());
            platform = platform.with_preview(preview);
        }
    }
    let cluster = match &config.role {
        stasis_server::Role::ControlPlane { auth, .. } => {
            let tls = match auth {
                stasis_server::cluster::ClusterAuth::Tls(creds) => {
                    Some(creds.server_config().map_err(anyhow::Error::msg)?)
                }
                stasis_server::cluster::ClusterAuth::PlainToken(_) => None,
            };
            let l = stasis_server::tls::ClusterListener::bind(args.cluster_listen, tls)
                .await
                .with_context(|| format!("listening on {} (--cluster-listen)", args.cluster_listen))?;
            Some(l)
        }
        _ => None,
    };
    println!("stasis {} serving {base}", env!("CARGO_PKG_VERSION"));
    if let Some(l) = &cluster {
        let scheme = if args.insecure_plain_http { "http" } else { "https" };
        println!("  cluster:     {scheme}://{} (hosts join here)", l.local_addr());
    }
    println!("  dashboard:   http://{}/", listener.local_addr()?);
    println!("  accelerator: {}", config.accel.as_str());
    println!("  data dir:    {}", config.data_dir.display());
    println!("  image cache: {}", config.cache_dir.display());
    // The key is shown the one time it is made: logs of later starts must not carry it.
    let path = stasis_server::default_key_path(&config.data_dir);
    match &key {
        DefaultKey::New(k) => {
            println!("API key for tenant \"default\" (shown once, also saved in the data dir):\n{k}");
            println!("  export MIOSA_API_KEY={k} MIOSA_BASE_URL={base}");
        }
        DefaultKey::Saved => {
            println!("API key for tenant \"default\": in {}", path.display());
            println!("  export MIOSA_API_KEY=$(cat {}) MIOSA_BASE_URL={base}", path.display());
        }
        DefaultKey::Unknown => {
            println!("tenant \"default\" has keys; create another with `stasis keys create --tenant default`")
        }
    }
    platform
        .with_http(args.http.settings())
        .serve_on(Some(listener), cluster, shutdown)
        .await?;
    Ok(())
}

enum DefaultKey {
    New(String),
    Saved,
    Unknown,
}

/// The default tenant's key: created (and saved owner-only in the data dir) on first start.
async fn default_key(db: &stasis_server::db::Db, data_dir: &std::path::Path) -> Result<DefaultKey> {
    let path = stasis_server::default_key_path(data_dir);
    let tenant = db.ensure_tenant("default").await?;
    if db.count_keys(tenant).await? > 0 {
        return Ok(match std::fs::read_to_string(&path) {
            Ok(k) if !k.trim().is_empty() => DefaultKey::Saved,
            _ => DefaultKey::Unknown,
        });
    }
    let key = stasis_server::auth::create_key(db, "default").await?;
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("saving the key to {}", path.display()))?;
    writeln!(f, "{key}")?;
    Ok(DefaultKey::New(key))
}

/// SIGTERM or SIGINT, caught from the call on (not from the first poll): one that comes while
/// the platform is still starting is acted on as soon as it serves, and stops it as cleanly as
/// any. Left to their default action, they would end the process at once, leaving behind what
/// it had set up on the host (cgroups, networks) for nobody to remove.
pub(crate) fn shutdown_signal() -> impl std::future::Future<Output = ()> + Send + 'static {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    async move {
        tokio::select! {
            _ = int.recv() => {}
            _ = term.recv() => {}
        }
        tracing::info!("shutting down");
    }
}
