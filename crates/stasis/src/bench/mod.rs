//! Benchmarks that run a real platform in this process (temporary data dir, shared image
//! cache) and drive it over HTTP like a user would.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Subcommand;
use reqwest::Method;
use serde_json::json;

use crate::client::Api;

mod chain;
mod files;
mod hardening;
mod load;
mod network;
mod targets;

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Every performance target of the snapshot platform, each against its baseline in
    /// this same run: measured value, baseline, ratio, target, pass/fail.
    Targets,
    /// Create → running → first exec latency, and exec round trips.
    Computers {
        /// How many computers to create, one after another.
        #[arg(long, default_value_t = 3)]
        computers: usize,
        /// Exec round trips measured on the first computer.
        #[arg(long, default_value_t = 20)]
        execs: usize,
        #[arg(long, default_value = "xs")]
        size: String,
    },
    /// Many concurrent clients listing and getting computers and snapshots, on SQLite (the
    /// baseline) and then on PostgreSQL: throughput, p50/p99 latency, and any 5xx.
    Load {
        /// The PostgreSQL database to run on (e.g. from `scripts/services start`: an empty
        /// database is created in it for the run).
        #[arg(long, env = "STASIS_BENCH_POSTGRES")]
        postgres: String,
        #[arg(long, default_value_t = 50)]
        clients: usize,
        #[arg(long, default_value_t = 60)]
        secs: u64,
    },
    /// What isolation costs: snapshot and restore times on a plain platform (the baseline),
    /// one with confined QEMUs, one with encryption at rest, and one with both, side by side.
    Hardening {
        #[arg(long, default_value_t = 3)]
        rounds: usize,
        /// MiB of fresh random data the guest writes before each snapshot.
        #[arg(long, default_value_t = 32)]
        touch_mib: u64,
    },
    /// Computers' own networks (namespace, tap, veth, NAT) against QEMU's user networking on
    /// the same guest: guest->host TCP throughput and HTTP latency through the preview proxy;
    /// and restore -> first exec of a networked computer against one without a network.
    Network {
        #[arg(long, default_value_t = 5)]
        rounds: usize,
        /// MiB the guest sends in each throughput run.
        #[arg(long, default_value_t = 64)]
        mib: u64,
        /// Requests through the preview proxy in each round, on each side.
        #[arg(long, default_value_t = 20)]
        requests: usize,
        /// The computers' size: as many vCPUs as this host has cores keeps the confined side's
        /// CPU quota (its vCPUs' worth) from binding where the unconfined side has none.
        #[arg(long, default_value = "medium")]
        size: String,
    },
    /// Files in and out of a computer through the files API against the same bytes through
    /// one-shot exec, and the process's peak memory while a large file goes up and down.
    Files {
        /// MiB moved each way by each method.
        #[arg(long, default_value_t = 64)]
        mib: u64,
        /// MiB of the large file whose transfer the memory is watched over.
        #[arg(long, default_value_t = 1024)]
        big_mib: u64,
        #[arg(long, default_value = "small")]
        size: String,
    },
    /// A chain of snapshots of restored computers against a booted computer's snapshot and a
    /// cold boot in the same run: pause by depth, bytes uploaded per level, restore latency
    /// by depth, the disk chain's depth, hibernate → resume → first exec.
    Chain {
        #[arg(long, default_value_t = 10)]
        levels: usize,
        #[arg(long, default_value = "small")]
        size: String,
        /// MiB of guest memory in use (each level changes a 25th of it: about 1% of a
        /// small computer's RAM at the default).
        #[arg(long, default_value_t = 128)]
        touch_mib: u64,
    },
    /// Snapshot and restore of a 512 MiB computer, next to a cold boot in the same run.
    Snapshots {
        #[arg(long, default_value = "small")]
        size: String,
        /// MiB of guest memory to fill with data before the snapshot.
        #[arg(long, default_value_t = 128)]
        touch_mib: u64,
    },
}

/// A platform serving on an ephemeral port, stopped (with its machines) on drop of the guard.
pub struct LocalPlatform {
    pub api: Api,
    /// The platform's insides, for baselines that must reach a machine directly.
    pub state: stasis_server::AppState,
    pub data_dir: PathBuf,
    _data: tempfile::TempDir,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl LocalPlatform {
    /// A platform on the given metadata database (None: SQLite in its data dir).
    pub async fn start_on(database_url: Option<String>) -> Result<LocalPlatform> {
        // STASIS_CONFINE=off measures without confinement, as `serve` would run.
        let confine = match std::env::var("STASIS_CONFINE") {
            Ok(v) => v.parse().map_err(anyhow::Error::msg)?,
            Err(_) => stasis_server::Confine::Auto,
        };
        Self::start_with(database_url, confine, None).await
    }

    /// A platform on SQLite with its QEMUs confined or not, and computers' networks made as
    /// `network` says.
    pub async fn start_custom(
        confine: stasis_server::Confine,
        network: stasis_server::NetworkConfig,
    ) -> Result<LocalPlatform> {
        Self::start_full(None, confine, None, network).await
    }

    /// A platform on the given database, with its QEMUs confined or not, and snapshots
    /// encrypted with the master key in `master_key_file` or not.
    pub async fn start_with(
        database_url: Option<String>,
        confine: stasis_server::Confine,
        master_key_file: Option<PathBuf>,
    ) -> Result<LocalPlatform> {
        Self::start_full(database_url, confine, master_key_file, Default::default()).await
    }

    async fn start_full(
        database_url: Option<String>,
        confine: stasis_server::Confine,
        master_key_file: Option<PathBuf>,
        network: stasis_server::NetworkConfig,
    ) -> Result<LocalPlatform> {
        let data = tempfile::Builder::new().prefix("stasis-bench").tempdir_in("/tmp")?;
        let config = stasis_server::Config {
            listen: "127.0.0.1:0".parse()?,
            data_dir: data.path().to_path_buf(),
            cache_dir: std::env::var_os("STASIS_CACHE_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(stasis_image::default_cache_dir),
            accel: stasis_vmm::Accel::detect(),
            // The QEMU `serve` would run (`--qemu`'s variable), so a bench can compare two.
            qemu_binary: std::env::var_os("STASIS_QEMU")
                .map(PathBuf::from)
                .unwrap_or_else(|| "qemu-system-x86_64".into()),
            database_url: stasis_server::database_url(data.path(), database_url.as_deref()),
            store_url: None,
            s3: Default::default(),
            role: Default::default(),
            capacity_mib: None,
            limits: Default::default(),
            confine,
            // What `stasis serve` would apply (its flags' variables are honoured here too).
            disk_limits: bench_disk_limits(),
            cpu_model: std::env::var("STASIS_CPU_MODEL").unwrap_or_else(|_| "auto".into()),
            master_key_file,
            preview: None,
            snapshot_ttl: None,
            network,
        };
        let platform = stasis_server::Platform::open(&config)
            .await
            .map_err(anyhow::Error::msg)?;
        let listener = tokio::net::TcpListener::bind(config.listen).await?;
        // Preview URLs on the port actually listened on, as `serve` makes them.
        let platform = platform.with_preview(stasis_server::preview::PreviewConfig::local(listener.local_addr()?));
        let key = stasis_server::auth::create_key(&platform.state.db, "bench").await?;
        let state = platform.state.clone();
        let base = format!("http://{}/api/v1", listener.local_addr()?);
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = platform
                .serve(listener, async {
                    let _ = rx.await;
                })
                .await;
        });
        Ok(LocalPlatform {
            api: Api::with(base, key),
            state,
            data_dir: data.path().to_path_buf(),
            _data: data,
            shutdown: Some(tx),
            task: Some(task),
        })
    }

    /// Runs `f` against a fresh platform and always stops it after (its machines with it),
    /// whether `f` succeeded or not.
    pub async fn with<T>(f: impl AsyncFnOnce(&LocalPlatform) -> Result<T>) -> Result<T> {
        Self::with_on(None, f).await
    }

    /// As [`LocalPlatform::with`], on the given metadata database.
    pub async fn with_on<T>(
        database_url: Option<String>,
        f: impl AsyncFnOnce(&LocalPlatform) -> Result<T>,
    ) -> Result<T> {
        let platform = LocalPlatform::start_on(database_url).await?;
        let result = f(&platform).await;
        platform.stop().await;
        result
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

pub(crate) fn median(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v[v.len() / 2]
}

pub(crate) fn ms(d: Duration) -> String {
    format!("{:.1} ms", d.as_secs_f64() * 1000.0)
}

pub async fn run(command: BenchCommand) -> Result<()> {
    match command {
        BenchCommand::Computers { computers, execs, size } => {
            bench_computers(computers.max(1), execs.max(1), &size).await
        }
        BenchCommand::Snapshots { size, touch_mib } => bench_snapshots(&size, touch_mib).await,
        BenchCommand::Chain {
            levels,
            size,
            touch_mib,
        } => chain::run(levels.max(1), &size, touch_mib.max(1)).await,
        BenchCommand::Targets => targets::run().await,
        BenchCommand::Network {
            rounds,
            mib,
            requests,
            size,
        } => network::run(rounds.max(1), mib.max(1), requests.max(1), &size).await,
        BenchCommand::Files { mib, big_mib, size } => files::run(mib.max(1), big_mib.max(1), &size).await,
        BenchCommand::Hardening { rounds, touch_mib } => hardening::run(rounds.max(1), touch_mib).await,
        BenchCommand::Load {
            postgres,
            clients,
            secs,
        } => load::run(&postgres, clients.max(1), secs.max(1)).await,
    }
}

async fn bench_computers(n: usize, execs: usize, size: &str) -> Result<()> {
    prepare_image().await?;
    LocalPlatform::with(async |platform| {
        let api = &platform.api;
        println!("accelerator: {}", stasis_vmm::Accel::detect().as_str());
        println!(
            "{:<4} {:>14} {:>16} {:>18}",
            "run", "create (HTTP)", "create→running", "create→first exec"
        );
        let mut to_exec = Vec::new();
        let mut first_id = None;
        for i in 0..n {
            let t = Instant::now();
            let c = api
                .call(
                    Method::POST,
                    "/computers",
                    Some(json!({"name": format!("bench-{i}"), "size": size})),
                )
                .await?;
            let created = t.elapsed();
            let id = c["id"].as_str().context("create answered without an id")?.to_string();
            api.wait_running(&id, Duration::from_secs(300)).await?;
            let running = t.elapsed();
            let r = api
                .call(
                    Method::POST,
                    &format!("/computers/{id}/exec"),
                    Some(json!({"command": "true"})),
                )
                .await?;
            anyhow::ensure!(r["exit_code"] == 0, "first exec failed: {r}");
            let first = t.elapsed();
            println!("{:<4} {:>14} {:>16} {:>18}", i + 1, ms(created), ms(running), ms(first));
            to_exec.push(first);
            if first_id.is_none() {
                first_id = Some(id);
            } else {
                api.call(Method::DELETE, &format!("/computers/{id}"), None).await?;
            }
        }
        let id = first_id.expect("at least one computer");
        let mut rtts = Vec::new();
        for _ in 0..execs {
            let t = Instant::now();
            let r = api
                .call(
                    Method::POST,
                    &format!("/computers/{id}/exec"),
                    Some(json!({"command": "echo hi"})),
                )
                .await?;
            anyhow::ensure!(r["output"] == "hi\n", "exec answered {r}");
            rtts.push(t.elapsed());
        }
        let min = *rtts.iter().min().expect("non-empty");
        let max = *rtts.iter().max().expect("non-empty");
        println!("create→first exec median over {n}: {}", ms(median(to_exec)));
        println!(
            "exec round trip (echo hi) over {execs}: median {}, min {}, max {}",
            ms(median(rtts)),
            ms(min),
            ms(max)
        );
        api.call(Method::DELETE, &format!("/computers/{id}"), None).await?;
        Ok(())
    })
    .await
}

pub(crate) async fn prepare_image() -> Result<()> {
    eprintln!("preparing the guest image (cached after the first build)...");
    let cache = stasis_image::default_cache_dir();
    tokio::task::spawn_blocking(move || {
        stasis_image::ensure(&cache, &Default::default(), &|m: &str| eprintln!("image: {m}"))
    })
    .await??;
    Ok(())
}

pub(crate) async fn exec_ok(api: &Api, id: &str, command: &str) -> Result<serde_json::Value> {
    let r = api
        .call(
            Method::POST,
            &format!("/computers/{id}/exec"),
            Some(json!({"command": command})),
        )
        .await?;
    anyhow::ensure!(r["exit_code"] == 0, "exec {command:?} failed: {r}");
    Ok(r)
}

/// Restores `snap` of `computer`: API call → first exec answered, and the new computer.
pub(crate) async fn restore_to_first_exec(api: &Api, computer: &str, snap: &str) -> Result<(Duration, String)> {
    let t = Instant::now();
    let r = api
        .call(Method::POST, &format!("/computers/{computer}/restore/{snap}"), None)
        .await?;
    let id = r["data"]["id"].as_str().context("no restored id")?.to_string();
    exec_ok(api, &id, "true").await?;
    Ok((t.elapsed(), id))
}

/// Takes a snapshot of `computer` and waits until it is ready.
pub(crate) async fn snapshot(api: &Api, computer: &str) -> Result<serde_json::Value> {
    let s = api
        .call(
            Method::POST,
            &format!("/computers/{computer}/snapshots"),
            Some(json!({})),
        )
        .await?;
    let id = s["data"]["id"].as_str().context("no snapshot id")?.to_string();
    wait_snapshot(api, computer, &id).await
}

pub(crate) async fn wait_snapshot(api: &Api, computer: &str, snap: &str) -> Result<serde_json::Value> {
    loop {
        let r = api
            .call(Method::GET, &format!("/computers/{computer}/snapshots/{snap}"), None)
            .await?;
        match r["data"]["status"].as_str() {
            Some("ready") => return Ok(r["data"].clone()),
            Some("failed") => anyhow::bail!("snapshot failed: {}", r["data"]["error"]),
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
}

fn mib(bytes: &serde_json::Value) -> String {
    bytes
        .as_u64()
        .map_or("-".into(), |b| format!("{:.1} MiB", b as f64 / (1 << 20) as f64))
}

async fn bench_snapshots(size: &str, touch_mib: u64) -> Result<()> {
    prepare_image().await?;
    LocalPlatform::with(async |platform| {
    let api = &platform.api;

    // Baseline in the same run: cold boot → first exec.
    let t = Instant::now();
    let c = api
        .call(
            Method::POST,
            "/computers",
            Some(json!({"name": "bench-snap", "size": size})),
        )
        .await?;
    let id = c["id"].as_str().context("no id")?.to_string();
    api.wait_running(&id, Duration::from_secs(300)).await?;
    exec_ok(api, &id, "true").await?;
    let cold = t.elapsed();

    // Some state worth saving: a process holding touch_mib of memory.
    exec_ok(
        api,
        &id,
        &format!(
            "nohup python3 -c 'import os,time\nb=bytearray(os.urandom({touch_mib}*1024*1024))\nwhile True: time.sleep(1)' >/dev/null 2>&1 & sleep 3; echo ok"
        ),
    )
    .await?;

    let t = Instant::now();
    let s = api
        .call(
            Method::POST,
            &format!("/computers/{id}/snapshots"),
            Some(json!({"comment": "bench"})),
        )
        .await?;
    let snap = s["data"]["id"].as_str().context("no snapshot id")?.to_string();
    let ready = wait_snapshot(api, &id, &snap).await?;
    let to_ready = t.elapsed();

    let mut restores = Vec::new();
    for label in [
        "restore (snapshot not on this host yet)",
        "restore (snapshot cached on this host)",
    ] {
        let t = Instant::now();
        let r = api
            .call(Method::POST, &format!("/computers/{id}/restore/{snap}"), None)
            .await?;
        let new = r["data"]["id"].as_str().context("no restored id")?.to_string();
        api.wait_running(&new, Duration::from_secs(300)).await?;
        exec_ok(api, &new, "true").await?;
        restores.push((label, t.elapsed()));
    }

    println!(
        "accelerator: {}, size: {size}, memory touched before the snapshot: {touch_mib} MiB",
        stasis_vmm::Accel::detect().as_str()
    );
    println!("{:<44} {:>12}", "measure", "value");
    println!("{:<44} {:>12}", "cold boot: create -> first exec", ms(cold));
    println!(
        "{:<44} {:>12}",
        "guest pause during the snapshot",
        format!("{} ms", ready["pause_ms"])
    );
    println!("{:<44} {:>12}", "snapshot: create -> ready", ms(to_ready));
    for (label, d) in &restores {
        println!("{:<44} {:>12}", format!("{label}: call -> first exec"), ms(*d));
    }
    for field in [
        "state_size_bytes",
        "memory_size_bytes",
        "rootfs_size_bytes",
        "compressed_size_bytes",
        "uploaded_bytes",
    ] {
        println!("{:<44} {:>12}", field, mib(&ready[field]));
    }
    let warm = restores[1].1;
    println!(
        "restore (cached) is {:.1}x faster than a cold boot to first exec",
        cold.as_secs_f64() / warm.as_secs_f64()
    );
    Ok(())
    })
    .await
}

/// The disk ceiling `stasis serve` would apply: its defaults, or `STASIS_DISK_MBPS` and
/// `STASIS_DISK_IOPS` (0 turns one off; both 0: none).
fn bench_disk_limits() -> Option<stasis_vmm::vm::DiskLimits> {
    let var = |name: &str, default: u64| {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(default)
    };
    let d = stasis_vmm::vm::DiskLimits::DEFAULT;
    let mbps = var("STASIS_DISK_MBPS", d.bytes_per_sec >> 20);
    let iops = var("STASIS_DISK_IOPS", d.iops);
    (mbps > 0 || iops > 0).then_some(stasis_vmm::vm::DiskLimits {
        bytes_per_sec: mbps << 20,
        iops,
    })
}
