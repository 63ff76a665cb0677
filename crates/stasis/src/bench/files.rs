//! `stasis bench files`: moving bytes in and out of a computer through the files API
//! (streamed through the guest agent in chunks) against the same bytes through one-shot
//! `exec` (base64 in the command, base64 in the output: the only way before it), in one run
//! on one computer; and the platform's memory while a large file goes up and down.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use base64::Engine;
use futures::StreamExt;
use rand::{RngCore, SeedableRng};
use reqwest::Method;
use serde_json::json;

use super::{exec_ok, prepare_image, LocalPlatform};
use crate::client::Api;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;
/// Raw bytes an exec upload carries: its command, base64 inside, is one argument of
/// `bash -c`, which the kernel takes up to 128 KiB (`MAX_ARG_STRLEN`).
const EXEC_UP_CHUNK: usize = 90 * 1024;
/// Raw bytes an exec download reads: its base64 must fit the 8 MiB an exec's output keeps.
const EXEC_DOWN_CHUNK: usize = 4 * 1024 * 1024;
/// Size of the pieces the benchmark's client sends and hashes.
const PIECE: usize = 256 * 1024;

/// `mib` MiB of seeded random bytes, a piece at a time (never all held).
fn random_pieces(seed: u64, mib: u64) -> impl futures::Stream<Item = Vec<u8>> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let pieces = (mib << 20) / PIECE as u64;
    futures::stream::iter(0..pieces).map(move |_| {
        let mut piece = vec![0u8; PIECE];
        rng.fill_bytes(&mut piece);
        piece
    })
}

fn hash_of(seed: u64, mib: u64) -> blake3::Hash {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut h = blake3::Hasher::new();
    let mut piece = vec![0u8; PIECE];
    for _ in 0..(mib << 20) / PIECE as u64 {
        rng.fill_bytes(&mut piece);
        h.update(&piece);
    }
    h.finalize()
}

/// Uploads `mib` MiB (seed `seed`) to `path` through `POST /files/upload`, streamed.
async fn upload(api: &Api, id: &str, path: &str, seed: u64, mib: u64) -> Result<Duration> {
    let boundary = format!("stasis-bench-{:016x}", rand::random::<u64>());
    let head = format!(
        "--{boundary}\r\nContent-Disposition: form-data; name=\"path\"\r\n\r\n{path}\r\n\
         --{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"bench.bin\"\r\n\
         Content-Type: application/octet-stream\r\n\r\n"
    );
    let tail = format!("\r\n--{boundary}--\r\n");
    let body = futures::stream::once(std::future::ready(head.into_bytes()))
        .chain(random_pieces(seed, mib))
        .chain(futures::stream::once(std::future::ready(tail.into_bytes())))
        .map(Ok::<_, std::io::Error>);
    let t = Instant::now();
    let resp = api
        .request(Method::POST, &format!("/computers/{id}/files/upload"))
        .header("content-type", format!("multipart/form-data; boundary={boundary}"))
        .body(reqwest::Body::wrap_stream(body))
        .send()
        .await?;
    let status = resp.status();
    let text = resp.text().await?;
    anyhow::ensure!(status.is_success(), "upload answered {status}: {text}");
    Ok(t.elapsed())
}

/// Downloads `path` through `GET /files/download`, hashing it as it comes.
async fn download(api: &Api, id: &str, path: &str) -> Result<(Duration, blake3::Hash, u64)> {
    let t = Instant::now();
    let resp = api
        .request(Method::GET, &format!("/computers/{id}/files/download"))
        .query(&[("path", path)])
        .send()
        .await?;
    anyhow::ensure!(resp.status().is_success(), "download answered {}", resp.status());
    let mut h = blake3::Hasher::new();
    let mut n = 0u64;
    let mut body = resp.bytes_stream();
    while let Some(piece) = body.next().await {
        let piece = piece?;
        n += piece.len() as u64;
        h.update(&piece);
    }
    Ok((t.elapsed(), h.finalize(), n))
}

/// The same bytes up through exec: each chunk base64 in a command that decodes it onto the
/// file.
async fn exec_upload(api: &Api, id: &str, path: &str, seed: u64, mib: u64) -> Result<Duration> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let total = (mib << 20) as usize;
    let t = Instant::now();
    exec_ok(api, id, &format!(": > {path}")).await?;
    let mut sent = 0;
    let mut chunk = vec![0u8; EXEC_UP_CHUNK];
    while sent < total {
        // The generator's stream is the same however it is cut (in multiples of 4 bytes).
        chunk.resize(EXEC_UP_CHUNK.min(total - sent), 0);
        rng.fill_bytes(&mut chunk);
        let cmd = format!("echo {} | base64 -d >> {path}", B64.encode(&chunk));
        exec_ok(api, id, &cmd).await?;
        sent += chunk.len();
    }
    Ok(t.elapsed())
}

/// The same bytes down through exec: each chunk read with `dd` and printed in base64.
async fn exec_download(api: &Api, id: &str, path: &str, mib: u64) -> Result<(Duration, blake3::Hash)> {
    let total = mib << 20;
    let t = Instant::now();
    let mut h = blake3::Hasher::new();
    let chunks = total.div_ceil(EXEC_DOWN_CHUNK as u64);
    for i in 0..chunks {
        let r = exec_ok(
            api,
            id,
            &format!("dd if={path} bs={EXEC_DOWN_CHUNK} skip={i} count=1 status=none | base64 -w0"),
        )
        .await?;
        let text = r["output"].as_str().context("exec answered no output")?;
        anyhow::ensure!(r["truncated"] != true, "an exec download chunk was truncated");
        h.update(&B64.decode(text.trim())?);
    }
    Ok((t.elapsed(), h.finalize()))
}

/// This process's resident memory, in KiB.
fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Runs `f` while sampling this process's RSS every 10 ms; answers its result and the peak.
async fn with_peak_rss<T>(f: impl std::future::Future<Output = Result<T>>) -> Result<(T, u64)> {
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(rss_kib()));
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sampler = {
        let (peak, done) = (peak.clone(), done.clone());
        std::thread::spawn(move || {
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                peak.fetch_max(rss_kib(), std::sync::atomic::Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(10));
            }
        })
    };
    let out = f.await;
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = sampler.join();
    Ok((out?, peak.load(std::sync::atomic::Ordering::Relaxed)))
}

fn rate(mib: u64, d: Duration) -> f64 {
    mib as f64 / d.as_secs_f64().max(1e-6)
}

pub async fn run(mib: u64, big_mib: u64, size: &str) -> Result<()> {
    prepare_image().await?;
    LocalPlatform::with(async |platform| {
        let api = &platform.api;
        let c = api
            .call(
                Method::POST,
                "/computers",
                Some(json!({"name": "bench-files", "size": size})),
            )
            .await?;
        let id = c["id"].as_str().context("create answered without an id")?.to_string();
        api.wait_running(&id, Duration::from_secs(300)).await?;
        eprintln!("computer running; moving {mib} MiB each way, both ways, then {big_mib} MiB");

        let want = hash_of(1, mib);
        let exec_up = exec_upload(api, &id, "/root/by-exec.bin", 1, mib).await?;
        let files_up = upload(api, &id, "/root/by-files.bin", 1, mib).await?;
        let (exec_down, exec_hash) = exec_download(api, &id, "/root/by-exec.bin", mib).await?;
        let (files_down, files_hash, n) = download(api, &id, "/root/by-files.bin").await?;
        anyhow::ensure!(exec_hash == want, "the exec round trip changed the bytes");
        anyhow::ensure!(
            files_hash == want && n == mib << 20,
            "the files round trip changed the bytes"
        );
        exec_ok(api, &id, "rm -f /root/by-exec.bin /root/by-files.bin").await?;

        let idle = rss_kib();
        let (up_big, up_peak) = with_peak_rss(upload(api, &id, "/root/big.bin", 2, big_mib)).await?;
        let (down, down_peak) = with_peak_rss(download(api, &id, "/root/big.bin")).await?;
        let (down_big, big_hash, big_n) = down;
        anyhow::ensure!(
            big_n == big_mib << 20 && big_hash == hash_of(2, big_mib),
            "the {big_mib} MiB round trip changed the bytes"
        );
        api.call(Method::DELETE, &format!("/computers/{id}"), None).await?;

        println!(
            "accelerator: {}; size {size}; {mib} MiB each way; exec chunks {} KiB up, {} KiB down",
            stasis_vmm::Accel::detect().as_str(),
            EXEC_UP_CHUNK / 1024,
            EXEC_DOWN_CHUNK / 1024
        );
        println!(
            "{:<40} {:>14} {:>14} {:>8} {:>8} {:>5}",
            "measure", "measured", "baseline", "ratio", "target", "met"
        );
        let line = |what: &str, files: f64, exec: f64| {
            let ratio = files / exec;
            println!(
                "{what:<40} {:>14} {:>14} {:>8} {:>8} {:>5}",
                format!("{files:.1} MiB/s"),
                format!("{exec:.1} MiB/s"),
                format!("{ratio:.2}x"),
                ">= 2x",
                if ratio >= 2.0 { "yes" } else { "no" }
            );
        };
        line(
            "upload: files API / one-shot exec",
            rate(mib, files_up),
            rate(mib, exec_up),
        );
        line(
            "download: files API / one-shot exec",
            rate(mib, files_down),
            rate(mib, exec_down),
        );
        let peak = up_peak.max(down_peak).saturating_sub(idle) / 1024;
        println!(
            "{:<40} {:>14} {:>14} {:>8} {:>8} {:>5}",
            format!("peak RSS over idle, {big_mib} MiB up+down"),
            format!("{peak} MiB"),
            format!("{} MiB idle", idle / 1024),
            "",
            "<= 64 MiB",
            if peak <= 64 { "yes" } else { "no" }
        );
        println!(
            "{big_mib} MiB: up {:.1} MiB/s (peak +{} MiB), down {:.1} MiB/s (peak +{} MiB); the peak counts this \
             process whole: the platform and the benchmark's own client",
            rate(big_mib, up_big),
            up_peak.saturating_sub(idle) / 1024,
            rate(big_mib, down_big),
            down_peak.saturating_sub(idle) / 1024
        );
        Ok(())
    })
    .await
}
