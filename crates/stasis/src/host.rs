//! `stasis host`: runs computers for a control plane. It joins with a heartbeat over mutual
//! TLS, under the id its certificate names; it runs the platform as this host on the cluster's
//! database and store, which it is configured with itself (the control plane hands out no
//! secrets); it serves the control plane's requests, and only those, and heartbeats on.

use std::time::Duration;

use anyhow::{bail, Context, Result};
use stasis_server::cluster::{ClusterAuth, Heartbeat, Joined};
use stasis_types::HostId;

use crate::HostArgs;

/// This host's lasting id. With credentials, the one they were made for (the control plane
/// takes no other); otherwise kept in its data dir so a restarted host is the same host.
fn host_id(data_dir: &std::path::Path, auth: &ClusterAuth) -> Result<HostId> {
    let id = read_host_id(data_dir, auth)?;
    id.parse().map_err(|e| anyhow::anyhow!("{e}"))
}

fn read_host_id(data_dir: &std::path::Path, auth: &ClusterAuth) -> Result<String> {
    if let ClusterAuth::Tls(creds) = auth {
        let path = creds.dir.join("name");
        let id = std::fs::read_to_string(&path).with_context(|| {
            format!(
                "reading {}: {} holds no host's credentials (make them with `stasis cluster add-host`)",
                path.display(),
                creds.dir.display()
            )
        })?;
        let id = id.trim().to_string();
        if !stasis_server::tls::valid_host_id(&id) || !creds.names(&stasis_server::tls::host_name(&id)) {
            bail!(
                "{}: the certificate there is not host {id:?}'s (make it with `stasis cluster add-host`)",
                creds.dir.display()
            );
        }
        return Ok(id);
    }
    let path = data_dir.join("host-id");
    if let Ok(id) = std::fs::read_to_string(&path) {
        if !id.trim().is_empty() {
            return Ok(id.trim().to_string());
        }
    }
    let id = format!("host-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    std::fs::write(&path, format!("{id}\n")).with_context(|| format!("writing {}", path.display()))?;
    Ok(id)
}

/// Why a heartbeat did not get through.
#[derive(Debug)]
enum BeatError {
    /// The control plane answered, and said no (a wrong credential, a host id bound to
    /// another certificate, ...): trying again will not help.
    Refused { status: reqwest::StatusCode, text: String },
    /// It could not be reached, or its answer could not be read: it may be starting.
    Unreachable(anyhow::Error),
}

impl std::fmt::Display for BeatError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            BeatError::Refused { status, text } => {
                write!(f, "the control plane refused the heartbeat ({status}): {text}")
            }
            BeatError::Unreachable(e) => write!(f, "{e:#}"),
        }
    }
}

impl std::error::Error for BeatError {}

async fn beat(
    http: &reqwest::Client,
    args: &HostArgs,
    auth: &ClusterAuth,
    beat: &Heartbeat,
) -> Result<Joined, BeatError> {
    let url = format!(
        "{}/internal/v1/hosts/heartbeat",
        args.control_plane.trim_end_matches('/')
    );
    let mut req = http.post(&url).json(beat);
    if let ClusterAuth::PlainToken(token) = auth {
        req = req.bearer_auth(token);
    }
    let resp = req
        .send()
        .await
        .with_context(|| format!("reaching the control plane at {url}"))
        .map_err(BeatError::Unreachable)?;
    let status = resp.status();
    if !status.is_success() {
        let text = resp.text().await.unwrap_or_default();
        return Err(BeatError::Refused { status, text });
    }
    resp.json()
        .await
        .with_context(|| format!("reading the control plane's answer from {url}"))
        .map_err(BeatError::Unreachable)
}

pub async fn run(args: HostArgs) -> Result<()> {
    let Some(auth) = crate::cluster_auth(
        args.cluster_credentials.as_deref(),
        args.cluster_token.as_deref(),
        args.insecure_plain_http,
    )?
    else {
        bail!("a host needs --cluster-credentials DIR (from `stasis cluster add-host`)");
    };
    let scheme = match auth {
        ClusterAuth::Tls(_) => "https://",
        ClusterAuth::PlainToken(_) => "http://",
    };
    let plain_hint = match auth {
        ClusterAuth::Tls(_) => " (plain http:// only with --insecure-plain-http and --cluster-token)",
        ClusterAuth::PlainToken(_) => " (--insecure-plain-http)",
    };
    if !args.control_plane.starts_with(scheme) {
        bail!("--control-plane must be a {scheme} URL{plain_hint}");
    }
    if let Some(u) = &args.advertise_url {
        if !u.starts_with(scheme) {
            bail!("--advertise-url must be a {scheme} URL{plain_hint}");
        }
    }
    let data_dir = args.data.resolve();
    stasis_server::prepare_data_dir(&data_dir).with_context(|| format!("preparing {}", data_dir.display()))?;
    let id = host_id(&data_dir, &auth)?;
    let (tls, http) = match &auth {
        ClusterAuth::Tls(creds) => (
            Some(creds.server_config().map_err(anyhow::Error::msg)?),
            creds
                .client(stasis_server::tls::CONTROL_PLANE_NAME, Some(Duration::from_secs(10)))
                .map_err(anyhow::Error::msg)?,
        ),
        ClusterAuth::PlainToken(_) => (
            None,
            reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?,
        ),
    };
    let listener = stasis_server::tls::ClusterListener::bind(args.listen, tls)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let url = args
        .advertise_url
        .clone()
        .unwrap_or_else(|| format!("{scheme}{}", listener.local_addr()));
    let heartbeat = Heartbeat {
        id: id.clone(),
        url: url.clone(),
        capacity_mib: args.machines.capacity_mib() as i64,
        vcpus: std::thread::available_parallelism().map_or(1, |n| n.get()) as i64,
        // Said once the platform is open (it resolves the QEMU and CPU model).
        machine: None,
    };

    // Join: until the control plane answers (it may be starting too).
    let joined = loop {
        match beat(&http, &args, &auth, &heartbeat).await {
            Ok(j) => break j,
            Err(e @ BeatError::Refused { .. }) => return Err(e.into()),
            Err(e) => {
                tracing::warn!("joining: {e:#}; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    let base = args
        .machines
        .config(args.listen, data_dir.clone(), args.database_url.clone())?;
    let config = stasis_server::Config {
        store_url: Some(args.store_url.clone()),
        limits: joined.limits,
        master_key_file: args.encryption.master_key_file.clone(),
        s3: stasis_store::S3Options {
            endpoint: args.s3_endpoint.clone(),
            region: args.s3_region.clone(),
            retry_timeout: Some(Duration::from_secs(args.s3_retry_secs)),
        },
        role: stasis_server::Role::Host {
            id: id.clone(),
            auth: auth.clone(),
        },
        ..base
    };
    // Caught from here on, before anything is set up on the host (joining made nothing).
    let shutdown = crate::shutdown_signal();
    let platform = stasis_server::Platform::open(&config)
        .await
        .map_err(anyhow::Error::msg)?;
    let mut heartbeat = heartbeat;
    heartbeat.machine = Some(platform.state.computers.host_machine());
    // Said at once, so restores are placed by it from now on.
    if let Err(e) = beat(&http, &args, &auth, &heartbeat).await {
        tracing::warn!("heartbeat: {e}");
    }
    println!(
        "stasis {} host {id} serving {url} for {}",
        env!("CARGO_PKG_VERSION"),
        args.control_plane
    );
    println!("  accelerator: {}", config.accel.as_str());
    println!("  data dir:    {}", data_dir.display());
    println!(
        "  capacity:    {} MiB, {} vCPUs",
        heartbeat.capacity_mib, heartbeat.vcpus
    );

    let every = Duration::from_secs(joined.heartbeat_secs.max(1));
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(every).await;
            if let Err(e) = beat(&http, &args, &auth, &heartbeat).await {
                tracing::warn!("heartbeat: {e}");
            }
        }
    });
    platform.serve_on(None, Some(listener), shutdown).await?;
    Ok(())
}
