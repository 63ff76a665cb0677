//! `stasis host`: runs computers for a control plane. It joins with a heartbeat, which the
//! control plane answers with the database and store every host shares; then it runs the
//! platform on them as this host, serves the control plane's requests, and heartbeats on.

use std::time::Duration;

use anyhow::{Context, Result};
use stasis_server::cluster::{Heartbeat, Joined};

use crate::HostArgs;

/// This host's lasting id, kept in its data dir so a restarted host is the same host.
fn host_id(data_dir: &std::path::Path) -> Result<String> {
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

async fn beat(http: &reqwest::Client, args: &HostArgs, beat: &Heartbeat) -> Result<Joined> {
    let url = format!(
        "{}/internal/v1/hosts/heartbeat",
        args.control_plane.trim_end_matches('/')
    );
    let resp = http
        .post(&url)
        .bearer_auth(&args.cluster_token)
        .json(beat)
        .send()
        .await
        .with_context(|| format!("reaching the control plane at {url}"))?;
    let status = resp.status();
    if !status.is_success() {
        let text = resp.text().await.unwrap_or_default();
        anyhow::bail!("the control plane refused the heartbeat ({status}): {text}");
    }
    Ok(resp.json().await?)
}

pub async fn run(args: HostArgs) -> Result<()> {
    let data_dir = args.data.resolve();
    stasis_server::prepare_data_dir(&data_dir).with_context(|| format!("preparing {}", data_dir.display()))?;
    let id = host_id(&data_dir)?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    let url = args
        .advertise_url
        .clone()
        .unwrap_or_else(|| format!("http://{}", listener.local_addr().expect("bound")));
    let heartbeat = Heartbeat {
        id: id.clone(),
        url: url.clone(),
        capacity_mib: args.machines.capacity_mib() as i64,
        vcpus: std::thread::available_parallelism().map_or(1, |n| n.get()) as i64,
    };
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;

    // Join: until the control plane answers (it may be starting too).
    let joined = loop {
        match beat(&http, &args, &heartbeat).await {
            Ok(j) => break j,
            Err(e) if format!("{e:#}").contains("refused the heartbeat") => return Err(e),
            Err(e) => {
                tracing::warn!("joining: {e:#}; retrying");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    };
    let base = args
        .machines
        .config(args.listen, data_dir.clone(), joined.database_url.clone())?;
    let config = stasis_server::Config {
        store_url: Some(joined.store_url.clone()),
        limits: joined.limits,
        master_key_file: args.encryption.master_key_file.clone(),
        s3: stasis_store::S3Options {
            endpoint: joined.s3_endpoint.clone(),
            region: joined.s3_region.clone(),
            retry_timeout: Some(Duration::from_secs(args.s3_retry_secs)),
        },
        role: stasis_server::Role::Host {
            id: id.clone(),
            token: args.cluster_token.clone(),
        },
        ..base
    };
    let platform = stasis_server::Platform::open(&config)
        .await
        .map_err(anyhow::Error::msg)?;
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
            if let Err(e) = beat(&http, &args, &heartbeat).await {
                tracing::warn!("heartbeat: {e:#}");
            }
        }
    });
    platform.serve(listener, crate::shutdown_signal()).await?;
    Ok(())
}
