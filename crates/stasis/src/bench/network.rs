//! What computers' networks cost and give, against their baselines in this same run: a
//! platform whose confined computers get a namespace, tap and veth each (the measured
//! one), next to one whose unconfined computers get QEMU's user networking (the baseline), on
//! the same guest image; and restores of a networked computer's snapshot next to restores of
//! one created without a network. Every connection goes to a server this process runs, in a
//! network namespace it makes (`10.214.254.0/30`, allowed by the measured platform's egress
//! policy), or to the platforms it serves on loopback.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use reqwest::Method;
use serde_json::json;

use super::{exec_ok, median, ms, prepare_image, wait_snapshot, LocalPlatform};

const SINK_NETNS: &str = "stasis-bench-sink";
const SINK_HOST_IF: &str = "stbsink0";
const SINK_HOST: Ipv4Addr = Ipv4Addr::new(10, 214, 254, 1);
const SINK_ADDR: Ipv4Addr = Ipv4Addr::new(10, 214, 254, 2);

/// A network namespace of the benchmark's own, routed from the host, holding a TCP sink:
/// each connection's bytes are counted, timed from the first to the end, and the count sent
/// back. Removed when dropped.
struct Sink {
    addr: SocketAddr,
    results: std::sync::mpsc::Receiver<(u64, Duration)>,
}

impl Sink {
    fn start() -> Result<Sink> {
        remove_sink_netns();
        let ip = |args: &[&str]| -> Result<()> {
            let out = std::process::Command::new("ip").args(args).output()?;
            anyhow::ensure!(
                out.status.success(),
                "ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&out.stderr).trim()
            );
            Ok(())
        };
        ip(&["netns", "add", SINK_NETNS])?;
        ip(&[
            "link",
            "add",
            SINK_HOST_IF,
            "type",
            "veth",
            "peer",
            "name",
            "veth0",
            "netns",
            SINK_NETNS,
        ])?;
        ip(&["addr", "add", &format!("{SINK_HOST}/30"), "dev", SINK_HOST_IF])?;
        ip(&["link", "set", SINK_HOST_IF, "up"])?;
        ip(&[
            "-n",
            SINK_NETNS,
            "addr",
            "add",
            &format!("{SINK_ADDR}/30"),
            "dev",
            "veth0",
        ])?;
        ip(&["-n", SINK_NETNS, "link", "set", "veth0", "up"])?;
        ip(&["-n", SINK_NETNS, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            SINK_NETNS,
            "route",
            "add",
            "default",
            "via",
            &SINK_HOST.to_string(),
        ])?;
        // The listener is made inside the namespace (by a thread that joins it) and served
        // from there.
        let (tx, results) = std::sync::mpsc::channel();
        let (bound_tx, bound) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let listener = (|| -> Result<std::net::TcpListener> {
                let ns = std::fs::File::open(format!("/run/netns/{SINK_NETNS}"))?;
                rustix::thread::move_into_link_name_space(
                    std::os::fd::AsFd::as_fd(&ns),
                    Some(rustix::thread::LinkNameSpaceType::Network),
                )?;
                Ok(std::net::TcpListener::bind((SINK_ADDR, 0))?)
            })();
            let listener = match listener {
                Ok(l) => {
                    let _ = bound_tx.send(l.local_addr().map_err(anyhow::Error::from));
                    l
                }
                Err(e) => {
                    let _ = bound_tx.send(Err(e));
                    return;
                }
            };
            for conn in listener.incoming().flatten() {
                let tx = tx.clone();
                std::thread::spawn(move || {
                    use std::io::{Read, Write};
                    let mut conn = conn;
                    let _ = conn.set_read_timeout(Some(Duration::from_secs(120)));
                    let mut buf = vec![0u8; 1 << 20];
                    let (mut total, mut first) = (0u64, None);
                    while let Ok(n) = conn.read(&mut buf) {
                        if n == 0 {
                            break;
                        }
                        first.get_or_insert_with(Instant::now);
                        total += n as u64;
                    }
                    let took = first.map(|f| f.elapsed()).unwrap_or_default();
                    let _ = conn.write_all(format!("{total}\n").as_bytes());
                    let _ = tx.send((total, took));
                });
            }
        });
        let addr = bound
            .recv_timeout(Duration::from_secs(10))
            .context("the sink did not start")??;
        Ok(Sink { addr, results })
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        remove_sink_netns();
    }
}

fn remove_sink_netns() {
    let _ = std::process::Command::new("ip")
        .args(["netns", "del", SINK_NETNS])
        .stderr(std::process::Stdio::null())
        .status();
}

/// One platform of the comparison, with a computer serving HTTP on port 8000.
struct Side {
    label: &'static str,
    platform: LocalPlatform,
    computer: String,
    /// `Host` of the computer's preview URL for port 8000, on this platform's listener.
    preview_host: String,
}

impl Side {
    async fn start(label: &'static str, platform: LocalPlatform, size: &str) -> Result<Side> {
        let api = &platform.api;
        let c = api
            .call(
                Method::POST,
                "/computers",
                Some(json!({"name": "bench-net", "size": size})),
            )
            .await?;
        let id = c["id"].as_str().context("create answered without an id")?.to_string();
        api.wait_running(&id, Duration::from_secs(300)).await?;
        exec_ok(
            api,
            &id,
            "mkdir -p /srv && head -c 1024 /dev/zero > /srv/1k && cd /srv && \
             (setsid nohup python3 -m http.server 8000 >/dev/null 2>&1 &) && \
             for i in $(seq 100); do (echo > /dev/tcp/127.0.0.1/8000) 2>/dev/null && exit 0; sleep 0.1; done; exit 1",
        )
        .await?;
        let port = api
            .call(
                Method::POST,
                &format!("/computers/{id}/ports"),
                Some(json!({"port": 8000, "visibility": "public"})),
            )
            .await?;
        let url = port["url"].as_str().context("the exposed port has no url")?;
        let preview_host = url
            .trim_start_matches("http://")
            .trim_start_matches("https://")
            .split('/')
            .next()
            .unwrap_or_default()
            .to_string();
        Ok(Side {
            label,
            platform,
            computer: id,
            preview_host,
        })
    }

    /// The guest sends `mib` MiB to the sink; the sink's rate in MiB/s.
    async fn throughput(&self, sink: &Sink, mib: u64) -> Result<f64> {
        let cmd = format!(
            "python3 -c \"import socket\ns=socket.create_connection(('{}',{}),timeout=60)\nb=bytes(1<<20)\nfor _ in range({mib}): s.sendall(b)\ns.shutdown(socket.SHUT_WR)\nprint(s.makefile().readline().strip())\"",
            sink.addr.ip(),
            sink.addr.port()
        );
        let r = exec_ok(&self.platform.api, &self.computer, &cmd).await?;
        let (bytes, took) = sink
            .results
            .recv_timeout(Duration::from_secs(30))
            .context("the sink saw no connection")?;
        anyhow::ensure!(bytes == mib << 20, "the sink got {bytes} bytes of {} ({r})", mib << 20);
        Ok(mib as f64 / took.as_secs_f64().max(1e-6))
    }

    /// One GET of 1 KiB through the preview proxy (the host form, a fresh connection).
    async fn request(&self) -> Result<Duration> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listen = self
            .platform
            .api
            .base()
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap_or_default()
            .to_string();
        let t = Instant::now();
        let mut s = tokio::net::TcpStream::connect(&listen).await?;
        s.write_all(
            format!(
                "GET /1k HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n",
                self.preview_host
            )
            .as_bytes(),
        )
        .await?;
        let mut answer = Vec::new();
        tokio::time::timeout(Duration::from_secs(30), s.read_to_end(&mut answer)).await??;
        let took = t.elapsed();
        let text = String::from_utf8_lossy(&answer);
        anyhow::ensure!(
            text.starts_with("HTTP/1.1 200") && answer.len() >= 1024,
            "the preview answered: {}",
            text.lines().next().unwrap_or("nothing")
        );
        Ok(took)
    }
}

fn percentile(mut v: Vec<Duration>, p: f64) -> Duration {
    v.sort();
    v[((v.len() - 1) as f64 * p).round() as usize]
}

pub async fn run(rounds: usize, mib: u64, requests: usize, size: &str) -> Result<()> {
    anyhow::ensure!(
        stasis_vmm::jail::can_confine(),
        "the measured platform needs root (to make namespaces); run as root"
    );
    prepare_image().await?;
    let sink = Sink::start()?;
    let network = stasis_server::NetworkConfig {
        egress: stasis_vmm::network::EgressPolicy {
            allow: vec![stasis_vmm::network::Cidr {
                base: SINK_ADDR,
                prefix: 32,
            }],
            deny: vec![],
        },
        ..Default::default()
    };
    let tap = LocalPlatform::start_custom(stasis_server::Confine::On, network.clone()).await?;
    let user = LocalPlatform::start_custom(stasis_server::Confine::Off, network).await?;
    let result = measure(&sink, tap, user, rounds, mib, requests, size).await;
    drop(sink);
    result
}

async fn measure(
    sink: &Sink,
    tap: LocalPlatform,
    user: LocalPlatform,
    rounds: usize,
    mib: u64,
    requests: usize,
    size: &str,
) -> Result<()> {
    // A confined QEMU gets as many cores of CPU time as its machine has vCPUs, an unconfined
    // one all of them: sized so that the quota does not bind here, the two differ only in
    // their networks.
    let sides = [
        Side::start("tap (namespace, veth, NAT)", tap, size).await?,
        Side::start("QEMU user networking (baseline)", user, size).await?,
    ];
    eprintln!("both computers serve; measuring");
    let mut rates: [Vec<f64>; 2] = Default::default();
    let mut latencies: [Vec<Duration>; 2] = Default::default();
    let mut request_pairs: Vec<f64> = Vec::new();
    for round in 0..rounds {
        // Which side goes first alternates, so the machine's noise falls on both alike; the
        // requests alternate one by one.
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            rates[i].push(sides[i].throughput(sink, mib).await?);
        }
        for j in 0..requests {
            let mut pair = [Duration::ZERO; 2];
            for i in if j % 2 == 0 { order } else { [order[1], order[0]] } {
                pair[i] = sides[i].request().await?;
                latencies[i].push(pair[i]);
            }
            request_pairs.push(pair[1].as_secs_f64() / pair[0].as_secs_f64());
        }
        eprintln!("round {}/{rounds} done", round + 1);
    }

    // Restore → first exec of a networked computer's snapshot against one created without a
    // network, on the measured platform, alternating.
    let api = &sides[0].platform.api;
    let mut snaps = Vec::new();
    for (name, network) in [("bench-with", true), ("bench-without", false)] {
        let c = api
            .call(
                Method::POST,
                "/computers",
                Some(json!({"name": name, "size": "small", "network": network})),
            )
            .await?;
        let id = c["id"].as_str().context("no id")?.to_string();
        api.wait_running(&id, Duration::from_secs(300)).await?;
        exec_ok(api, &id, "true").await?;
        let snap = super::snapshot(api, &id).await?;
        snaps.push((id, snap["id"].as_str().context("no snapshot id")?.to_string()));
    }
    let mut restores: [Vec<Duration>; 2] = Default::default();
    let mut phases: [Vec<stasis_vmm::RestoreTimings>; 2] = Default::default();
    let mut pairs: Vec<f64> = Vec::new();
    for round in 0..rounds.max(3) * 2 {
        let mut this_round = [Duration::ZERO; 2];
        let order = if round % 2 == 0 { [0, 1] } else { [1, 0] };
        for i in order {
            let (computer, snap) = &snaps[i];
            let (took, id) = super::restore_to_first_exec(api, computer, snap).await?;
            // The first round of each warms the host's snapshot cache: not counted.
            if round > 0 {
                restores[i].push(took);
                this_round[i] = took;
                let at = sides[0]
                    .platform
                    .data_dir
                    .join("machines")
                    .join(&id)
                    .join("restore-timings.json");
                if let Some(t) = std::fs::read(at).ok().and_then(|b| serde_json::from_slice(&b).ok()) {
                    phases[i].push(t);
                }
            }
            wait_snapshot(api, computer, snap).await?;
            api.call(Method::DELETE, &format!("/computers/{id}"), None).await?;
        }
        if round > 0 {
            pairs.push(this_round[0].as_secs_f64() / this_round[1].as_secs_f64());
        }
    }

    let rate = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let (tap_rate, user_rate) = (rate(&rates[0]), rate(&rates[1]));
    let (tap_lat, user_lat) = (median(latencies[0].clone()), median(latencies[1].clone()));
    let (with, without) = (median(restores[0].clone()), median(restores[1].clone()));
    println!(
        "accelerator: {}; size {size}; {rounds} rounds, alternating; {mib} MiB a transfer; {requests} requests a round",
        stasis_vmm::Accel::detect().as_str()
    );
    println!(
        "{:<44} {:>16} {:>16} {:>8} {:>8} {:>5}",
        "measure", "measured", "baseline", "ratio", "target", "met"
    );
    let line = |what: &str, measured: String, baseline: String, ratio: f64, target: &str, met: bool| {
        println!(
            "{what:<44} {measured:>16} {baseline:>16} {:>8} {target:>8} {:>5}",
            format!("{ratio:.2}x"),
            if met { "yes" } else { "no" }
        )
    };
    let throughput = tap_rate / user_rate;
    line(
        "guest->host TCP throughput (tap / user)",
        format!("{tap_rate:.1} MiB/s"),
        format!("{user_rate:.1} MiB/s"),
        throughput,
        ">= 1x",
        throughput >= 1.0,
    );
    let speed = user_lat.as_secs_f64() / tap_lat.as_secs_f64();
    line(
        "preview proxy GET, median (user / tap)",
        ms(tap_lat),
        ms(user_lat),
        speed,
        ">= 1x",
        speed >= 1.0,
    );
    request_pairs.sort_by(f64::total_cmp);
    println!(
        "{:<44} {:>16} {:>16} {:>8}",
        "  the same, median of per-pair ratios",
        "",
        "",
        format!("{:.2}x", request_pairs[request_pairs.len() / 2])
    );
    println!(
        "{:<44} {:>16} {:>16}",
        "preview proxy GET, p90",
        ms(percentile(latencies[0].clone(), 0.9)),
        ms(percentile(latencies[1].clone(), 0.9))
    );
    let cost = with.as_secs_f64() / without.as_secs_f64();
    line(
        "restore -> first exec (with / without net)",
        ms(with),
        ms(without),
        cost,
        "<= 1.1x",
        cost <= 1.1,
    );
    pairs.sort_by(f64::total_cmp);
    println!(
        "{:<44} {:>16} {:>16} {:>8}",
        "  the same, median of per-round ratios",
        "",
        "",
        format!("{:.2}x", pairs[pairs.len() / 2])
    );
    let phase = |v: &[stasis_vmm::RestoreTimings], f: fn(&stasis_vmm::RestoreTimings) -> f64| {
        let mut x: Vec<f64> = v.iter().map(f).collect();
        x.sort_by(f64::total_cmp);
        x.get(x.len() / 2).map_or("-".to_string(), |m| format!("{m:.1} ms"))
    };
    type Phase = (&'static str, fn(&stasis_vmm::RestoreTimings) -> f64);
    let named: [Phase; 6] = [
        ("prepare", |t| t.prepare_ms),
        ("QEMU start", |t| t.qemu_start_ms),
        ("device state load", |t| t.state_load_ms),
        ("resume", |t| t.resume_ms),
        ("agent (identity)", |t| t.agent_ms),
        ("machine total", |t| t.total_ms),
    ];
    for (name, f) in named {
        println!(
            "{:<44} {:>16} {:>16}",
            format!("  restore phase: {name}"),
            phase(&phases[0], f),
            phase(&phases[1], f)
        );
    }
    for (i, side) in sides.iter().enumerate() {
        println!(
            "{}: throughput {:?} MiB/s",
            side.label,
            rates[i].iter().map(|r| (r * 10.0).round() / 10.0).collect::<Vec<_>>()
        );
    }
    println!(
        "restores with a network: {:?}",
        restores[0].iter().map(|d| d.as_millis()).collect::<Vec<_>>()
    );
    println!(
        "restores without: {:?}",
        restores[1].iter().map(|d| d.as_millis()).collect::<Vec<_>>()
    );
    for side in sides {
        side.platform.stop().await;
    }
    Ok(())
}
