//! `bench load`: concurrent clients reading computers and snapshots, first on SQLite (the
//! embedded default, the baseline), then on PostgreSQL, each with real computers and real
//! snapshots to read. Every answer's status is counted: the target is no 5xx at all.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use reqwest::Method;
use serde_json::json;

use super::{ms, LocalPlatform};

struct Outcome {
    requests: usize,
    elapsed: Duration,
    p50: Duration,
    p99: Duration,
    max: Duration,
    server_errors: usize,
    other_errors: usize,
}

pub async fn run(postgres: &str, clients: usize, secs: u64) -> Result<()> {
    super::prepare_image().await?;

    let db_name = format!("stasis_bench_{}", std::process::id());
    let created = tokio::process::Command::new("psql")
        .args([postgres, "-qc", &format!("CREATE DATABASE {db_name}")])
        .output()
        .await
        .context("running psql (from Debian's postgresql-client)")?;
    anyhow::ensure!(
        created.status.success(),
        "creating database {db_name}: {}",
        String::from_utf8_lossy(&created.stderr)
    );
    let base = postgres.rsplit_once('/').map(|(b, _)| b).unwrap_or(postgres);
    let pg_url = format!("{base}/{db_name}");

    let mut results = Vec::new();
    for (name, url) in [("SQLite (baseline)", None), ("PostgreSQL", Some(pg_url))] {
        eprintln!("{name}: seeding real computers and snapshots...");
        let outcome = LocalPlatform::with_on(url, async |platform| {
            let targets = seed(platform).await?;
            eprintln!("{name}: {clients} clients for {secs} s...");
            Ok(load(platform, &targets, clients, Duration::from_secs(secs)).await)
        })
        .await?;
        results.push((name, outcome));
    }
    let _ = tokio::process::Command::new("psql")
        .args([
            postgres,
            "-qc",
            &format!("DROP DATABASE IF EXISTS {db_name} WITH (FORCE)"),
        ])
        .output()
        .await;

    println!("\n{clients} concurrent clients for {secs} s: list and get computers and snapshots");
    println!(
        "{:<20} {:>9} {:>10} {:>10} {:>10} {:>10} {:>5} {:>9}",
        "backend", "requests", "req/s", "p50", "p99", "max", "5xx", "other 4xx"
    );
    for (name, o) in &results {
        println!(
            "{:<20} {:>9} {:>10.0} {:>10} {:>10} {:>10} {:>5} {:>9}",
            name,
            o.requests,
            o.requests as f64 / o.elapsed.as_secs_f64(),
            ms(o.p50),
            ms(o.p99),
            ms(o.max),
            o.server_errors,
            o.other_errors
        );
    }
    let (base, pg) = (&results[0].1, &results[1].1);
    let ratio = (pg.requests as f64 / pg.elapsed.as_secs_f64()) / (base.requests as f64 / base.elapsed.as_secs_f64());
    println!("PostgreSQL throughput / SQLite throughput: {ratio:.2}");
    let ok = pg.server_errors == 0 && base.server_errors == 0;
    println!("target: zero 5xx on PostgreSQL — {}", if ok { "pass" } else { "FAIL" });
    anyhow::ensure!(ok, "the server answered 5xx under load");
    Ok(())
}

/// Two running computers with a snapshot each: the paths the clients read.
async fn seed(platform: &LocalPlatform) -> Result<Vec<String>> {
    let api = &platform.api;
    let mut paths = vec!["/computers".to_string()];
    for i in 0..2 {
        let c = api
            .call(
                Method::POST,
                "/computers",
                Some(json!({"name": format!("load-{i}"), "size": "xs"})),
            )
            .await?;
        let id = c["id"].as_str().context("create answered without an id")?.to_string();
        api.wait_running(&id, Duration::from_secs(300)).await?;
        let snap = super::snapshot(api, &id).await?;
        let sid = snap["id"].as_str().context("snapshot without an id")?.to_string();
        paths.push(format!("/computers/{id}"));
        paths.push(format!("/computers/{id}/snapshots"));
        paths.push(format!("/computers/{id}/snapshots/{sid}"));
    }
    Ok(paths)
}

async fn load(platform: &LocalPlatform, paths: &[String], clients: usize, length: Duration) -> Outcome {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(clients)
        .timeout(Duration::from_secs(30))
        .build()
        .expect("HTTP client");
    let base = platform.api.base().to_string();
    let key = platform.api.key().to_string();
    let start = Instant::now();
    let deadline = start + length;
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let (http, base, key, paths) = (http.clone(), base.clone(), key.clone(), paths.to_vec());
            tokio::spawn(async move {
                let mut seen: Vec<(Duration, u16)> = Vec::new();
                let mut i = c;
                while Instant::now() < deadline {
                    let path = &paths[i % paths.len()];
                    i += 1;
                    let t = Instant::now();
                    let status = match http.get(format!("{base}{path}")).bearer_auth(&key).send().await {
                        Ok(r) => {
                            let s = r.status().as_u16();
                            let _ = r.bytes().await;
                            s
                        }
                        Err(_) => 599, // no answer at all counts as a server error
                    };
                    seen.push((t.elapsed(), status));
                }
                seen
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap_or_default());
    }
    let elapsed = start.elapsed();
    let mut latencies: Vec<Duration> = all.iter().map(|(d, _)| *d).collect();
    latencies.sort();
    let pick = |q: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * q) as usize)
            .copied()
            .unwrap_or_default()
    };
    Outcome {
        requests: all.len(),
        elapsed,
        p50: pick(0.5),
        p99: pick(0.99),
        max: latencies.last().copied().unwrap_or_default(),
        server_errors: all.iter().filter(|(_, s)| *s >= 500).count(),
        other_errors: all.iter().filter(|(_, s)| (400..500).contains(s)).count(),
    }
}
