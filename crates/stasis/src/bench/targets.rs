//! `stasis bench targets`: every performance target of the snapshot platform, each measured
//! against its baseline in the same run (these machines are noisy, so only ratios within one
//! run mean anything), printed as a table with pass/fail, then where a restore's time goes.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use reqwest::Method;
use serde_json::json;
use stasis_vmm::process::{Process, Signal};
use stasis_vmm::qmp::Qmp;
use stasis_vmm::vm::{spawn_qemu, Launch, VmPaths};
use stasis_vmm::MachineConfig;
use stasis_vmm::RestoreTimings;

use super::{exec_ok, median, prepare_image, snapshot, wait_snapshot, LocalPlatform};
use crate::client::Api;

struct Row {
    what: &'static str,
    value: String,
    baseline: String,
    ratio: f64,
    target: &'static str,
    pass: bool,
}

fn ms(d: Duration) -> String {
    format!("{:.0} ms", d.as_secs_f64() * 1000.0)
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
}

async fn create(api: &Api, name: &str, size: &str) -> Result<String> {
    let c = api
        .call(Method::POST, "/computers", Some(json!({"name": name, "size": size})))
        .await?;
    Ok(c["id"].as_str().context("no id")?.to_string())
}

/// Create → first exec answered (exec waits for the computer to come up).
async fn cold_boot(api: &Api, name: &str, size: &str) -> Result<(Duration, String)> {
    let t = Instant::now();
    let id = create(api, name, size).await?;
    exec_ok(api, &id, "true").await?;
    Ok((t.elapsed(), id))
}

/// Restore API call → first exec answered.
async fn restore(api: &Api, computer: &str, snap: &str) -> Result<(Duration, String)> {
    super::restore_to_first_exec(api, computer, snap).await
}

async fn wait_ready_again(api: &Api, computer: &str, snap: &str) -> Result<()> {
    wait_snapshot(api, computer, snap).await.map(|_| ())
}

/// Median of `n` sequential restores; returns it and the restored computers.
async fn restores(api: &Api, computer: &str, snap: &str, n: usize) -> Result<(Duration, Vec<String>)> {
    let mut times = Vec::new();
    let mut ids = Vec::new();
    for _ in 0..n {
        let (d, id) = restore(api, computer, snap).await?;
        wait_ready_again(api, computer, snap).await?;
        times.push(d);
        ids.push(id);
    }
    Ok((median(times), ids))
}

fn machine(data: &Path, computer: &str) -> Result<MachineConfig> {
    let path = data.join("machines").join(computer).join("machine.json");
    Ok(serde_json::from_slice(
        &std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?,
    )?)
}

fn timings(data: &Path, computer: &str) -> Option<RestoreTimings> {
    let path = data.join("machines").join(computer).join("restore-timings.json");
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// A QEMU started on `config` waiting for a stream, and its monitor; returns with it paused.
async fn spawn_incoming(config: &MachineConfig, dir: &Path) -> Result<(Process, std::sync::Arc<Qmp>)> {
    std::fs::create_dir_all(dir)?;
    let paths = VmPaths::new(dir, dir);
    let mut config = config.clone();
    // A bare QEMU, as a user would run one: no confinement.
    config.jail = None;
    let process = spawn_qemu(
        &config,
        &paths,
        Launch {
            incoming: true,
            null_disk_bytes: None,
        },
    )?;
    let qmp = Qmp::connect(&paths.qmp(), Duration::from_secs(30)).await?;
    Ok((process, qmp))
}

/// Process start → `cont` returned, for a QEMU loading `state` (with or without RAM in it).
/// The median of three bare restores, each in its own scratch dir `{scratch}/{tag}{i}`.
async fn bare_restores(
    config: &MachineConfig,
    scratch: &Path,
    tag: &str,
    state: &Path,
    ram_in_stream: bool,
) -> Result<Duration> {
    let mut took = Vec::new();
    for i in 0..3 {
        took.push(bare_restore(config, &scratch.join(format!("{tag}{i}")), state, ram_in_stream).await?);
    }
    Ok(median(took))
}

async fn bare_restore(config: &MachineConfig, dir: &Path, state: &Path, ram_in_stream: bool) -> Result<Duration> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let mut config = config.clone();
    config.disk = dir.join("disk.qcow2");
    let out = tokio::process::Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&config.base_disk)
        .arg(&config.disk)
        .output()
        .await?;
    anyhow::ensure!(out.status.success(), "qemu-img create failed");
    if ram_in_stream {
        config.ram_path = dir.join("ram");
        config.ram_shared = true;
    }
    let t = Instant::now();
    let (child, qmp) = spawn_incoming(&config, dir).await?;
    qmp.set_migration(stasis_vmm::qmp::Migration {
        ignore_shared: !ram_in_stream,
        ..Default::default()
    })
    .await?;
    qmp.migrate_in_from_file(state).await?;
    stasis_vmm::snapshot::wait_migration(&qmp, Duration::from_secs(300)).await?;
    qmp.execute("cont", json!({})).await?;
    let took = t.elapsed();
    child.signal(Signal::KILL);
    child.wait().await;
    let _ = std::fs::remove_dir_all(dir);
    Ok(took)
}

/// The baseline a user would reach for (what `virsh save` does): stop, migrate the whole
/// machine to a file, continue. Returns the pause (STOP → RESUME) and the file.
async fn baseline_save(platform: &LocalPlatform, computer: &str, out: &Path) -> Result<Duration> {
    let vm = platform
        .state
        .computers
        .host()
        .get(computer)
        .context("the computer is not running")?;
    let qmp = vm.qmp();
    let mut events = qmp.events();
    qmp.set_migration(stasis_vmm::qmp::Migration {
        outgoing: true,
        ..Default::default()
    })
    .await?;
    let t = Instant::now();
    qmp.execute("stop", json!({})).await?;
    qmp.migrate_out_to_file(out).await?;
    loop {
        let m = qmp.execute("query-migrate", json!({})).await?;
        match m["status"].as_str() {
            Some("completed") => break,
            Some("failed") | Some("cancelled") => bail!("baseline migration failed: {m}"),
            _ => tokio::time::sleep(Duration::from_millis(2)).await,
        }
    }
    qmp.execute("cont", json!({})).await?;
    let wall = t.elapsed();
    // Prefer QEMU's own timestamps, as for our pause.
    let mut stop = None;
    let mut resume = None;
    while let Ok(Ok(e)) = tokio::time::timeout(Duration::from_millis(200), events.recv()).await {
        let stamp = e["timestamp"]["seconds"].as_u64().unwrap_or(0) as f64
            + e["timestamp"]["microseconds"].as_u64().unwrap_or(0) as f64 / 1e6;
        match e["event"].as_str() {
            Some("STOP") => stop = Some(stamp),
            Some("RESUME") => resume = Some(stamp),
            _ => {}
        }
    }
    Ok(match (stop, resume) {
        (Some(a), Some(b)) if b > a => Duration::from_secs_f64(b - a),
        _ => wall,
    })
}

fn smaps(pid: u32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
            * 1024
    };
    (field("Rss:"), field("Pss:"))
}

fn qemu_pid(data: &Path, computer: &str) -> Option<u32> {
    std::fs::read_to_string(data.join("machines").join(computer).join("qemu.pid"))
        .ok()?
        .trim()
        .parse()
        .ok()
}

async fn zstd(level: &str, threads: &str, files: &[PathBuf]) -> Result<(u64, Duration)> {
    let mut total = 0;
    let t = Instant::now();
    for f in files {
        let out = tokio::process::Command::new("zstd")
            .args([level, threads, "-q", "-c"])
            .arg(f)
            .output()
            .await
            .context("running zstd (apt-get install zstd)")?;
        anyhow::ensure!(out.status.success(), "zstd failed");
        total += out.stdout.len() as u64;
    }
    Ok((total, t.elapsed()))
}

pub async fn run() -> Result<()> {
    prepare_image().await?;
    LocalPlatform::with(async |platform| {
    let api = &platform.api;
    let data = platform.data_dir.clone();
    let scratch = data.join("bench-scratch");
    let mut rows = Vec::new();
    eprintln!("measuring; this takes a few minutes...");

    // 1, 2. Restore against a cold boot of the same template, and against the floor.
    let (cold, small) = cold_boot(api, "bench-small", "small").await?;
    let snap1 = snapshot(api, &small).await?;
    let snap1_id = snap1["id"].as_str().context("no id")?.to_string();
    let (restore_small, restored) = restores(api, &small, &snap1_id, 3).await?;
    rows.push(Row {
        what: "restore: API call -> first exec (vs cold boot -> first exec)",
        value: ms(restore_small),
        baseline: ms(cold),
        ratio: cold.as_secs_f64() / restore_small.as_secs_f64(),
        target: ">= 20x faster",
        pass: cold.as_secs_f64() / restore_small.as_secs_f64() >= 20.0,
    });
    let files = data.join("cache/snapshots").join(&snap1_id);
    let restored_config = machine(&data, &restored[0])?;
    let floor = bare_restores(&restored_config, &scratch, "floor", &files.join("state"), false).await?;
    rows.push(Row {
        what: "restore overhead: API call -> first exec (vs bare QEMU restore, start -> cont)",
        value: ms(restore_small),
        baseline: ms(floor),
        ratio: restore_small.as_secs_f64() / floor.as_secs_f64(),
        target: "<= 3x the floor",
        pass: restore_small.as_secs_f64() <= 3.0 * floor.as_secs_f64(),
    });
    let breakdown: Vec<RestoreTimings> = restored.iter().filter_map(|id| timings(&data, id)).collect();

    // 3. Restore time does not grow with RAM: an idle 256 MiB guest vs a 2 GiB one with 1 GiB touched.
    let (_, tiny) = cold_boot(api, "bench-xs", "xs").await?;
    let tiny_snap = snapshot(api, &tiny).await?;
    let (restore_tiny, _) = restores(api, &tiny, tiny_snap["id"].as_str().unwrap_or_default(), 5).await?;
    let (_, big) = cold_boot(api, "bench-large", "large").await?;
    exec_ok(
        api,
        &big,
        "nohup python3 -c 'b = bytearray(b\"\\x5a\") * (1 << 30)\nimport time\nwhile True: time.sleep(1)' >/dev/null 2>&1 & \
         while [ $(awk '/MemFree/ {print $2}' /proc/meminfo) -gt 1000000 ]; do sleep 0.5; done; echo filled",
    )
    .await?;
    let big_snap = snapshot(api, &big).await?;
    let (restore_big, _) = restores(api, &big, big_snap["id"].as_str().unwrap_or_default(), 5).await?;
    let r = restore_big.as_secs_f64() / restore_tiny.as_secs_f64();
    rows.push(Row {
        what: "restore: 2 GiB guest, 1 GiB touched (vs idle 256 MiB guest)",
        value: ms(restore_big),
        baseline: ms(restore_tiny),
        ratio: r,
        target: "<= 1.5x",
        pass: r <= 1.5,
    });

    // 4, 5. Against QEMU's own save/restore of a 1 GiB guest with 512 MiB touched.
    let (_, medium) = cold_boot(api, "bench-medium", "medium").await?;
    exec_ok(
        api,
        &medium,
        "nohup python3 -c 'b = bytearray(range(256)) * (2 << 20)\nimport time\nwhile True: time.sleep(1)' >/dev/null 2>&1 & \
         while [ $(awk '/MemFree/ {print $2}' /proc/meminfo) -gt 450000 ]; do sleep 0.5; done; echo filled",
    )
    .await?;
    std::fs::create_dir_all(&scratch)?;
    // Ours first, so that neither benefits from the other having touched the guest's memory.
    let medium_snap = snapshot(api, &medium).await?;
    let full_state = scratch.join("full.state");
    let baseline_pause = baseline_save(platform, &medium, &full_state).await?;
    let medium_snap_id = medium_snap["id"].as_str().context("no id")?.to_string();
    let our_pause = Duration::from_millis(medium_snap["pause_ms"].as_u64().unwrap_or(0));
    let medium_config = machine(&data, &medium)?;
    let baseline_load = bare_restores(&medium_config, &scratch, "base", &full_state, true).await?;
    let (_, medium_restored) = restore(api, &medium, &medium_snap_id).await?;
    wait_ready_again(api, &medium, &medium_snap_id).await?;
    let ours_config = machine(&data, &medium_restored)?;
    let medium_files = data.join("cache/snapshots").join(&medium_snap_id);
    let our_load = bare_restores(&ours_config, &scratch, "ours", &medium_files.join("state"), false).await?;
    let r = baseline_load.as_secs_f64() / our_load.as_secs_f64();
    rows.push(Row {
        what: "restore, 1 GiB / 512 MiB touched: start -> running (vs QEMU -incoming full file)",
        value: ms(our_load),
        baseline: ms(baseline_load),
        ratio: r,
        target: ">= 10x faster",
        pass: r >= 10.0,
    });
    let r = our_pause.as_secs_f64() / baseline_pause.as_secs_f64();
    rows.push(Row {
        what: "guest pause during a snapshot (vs stop + migrate to file + cont)",
        value: ms(our_pause),
        baseline: ms(baseline_pause),
        ratio: r,
        target: "<= 0.1x",
        pass: r <= 0.1,
    });

    // 6. Incremental: ~1% of RAM (a process holding ~5 MB of text in a 512 MiB guest) and
    // 10 MiB of disk changed, with everyday (compressible) content. The disk write bypasses the
    // guest's page cache (O_DIRECT) so that it changes the disk and not another 10 MiB of RAM;
    // the page-cache and random-bytes cases follow, shown for information.
    exec_ok(
        api,
        &small,
        "nohup python3 -c 'import time\nb = [str(i) * 8 for i in range(50000)]\nwhile True: time.sleep(1)' >/dev/null 2>&1 & \
         seq 1 3000000 | head -c 10485760 | dd of=/root/delta bs=1M iflag=fullblock oflag=direct status=none; \
         sleep 2; echo ok",
    )
    .await?;
    let snap2 = snapshot(api, &small).await?;
    let first = snap1["uploaded_bytes"].as_u64().unwrap_or(0);
    let second = snap2["uploaded_bytes"].as_u64().unwrap_or(0);
    let r = second as f64 / first.max(1) as f64;
    let parent_ok = snap2["parent_snapshot_id"] == snap1["id"];
    rows.push(Row {
        what: "second snapshot after ~1% RAM + 10 MB disk changed (text): bytes uploaded",
        value: mib(second),
        baseline: mib(first),
        ratio: r,
        target: "<= 0.1x, parent recorded",
        pass: r <= 0.1 && parent_ok,
    });
    exec_ok(
        api,
        &small,
        "seq 1 3000000 | head -c 10485760 > /root/cached; sync; sleep 2; echo ok",
    )
    .await?;
    let snap_cached = snapshot(api, &small).await?;
    let cached = snap_cached["uploaded_bytes"].as_u64().unwrap_or(0);
    let cached_row = format!(
        "  (10 MiB of text written through the guest's page cache, so RAM changes by as much again: {} uploaded, \
         {:.2}x the first)",
        mib(cached),
        cached as f64 / first.max(1) as f64
    );
    exec_ok(
        api,
        &small,
        "nohup python3 -c 'import os,time\nb = bytearray(os.urandom(5 << 20))\nwhile True: time.sleep(1)' >/dev/null 2>&1 & \
         head -c 10000000 /dev/urandom > /root/noise; sync; sleep 2; echo ok",
    )
    .await?;
    let snap3 = snapshot(api, &small).await?;
    let third = snap3["uploaded_bytes"].as_u64().unwrap_or(0);
    let random_ratio = third as f64 / first.max(1) as f64;
    let random_row = format!(
        "  (the same with random bytes: {} uploaded, {:.2}x the first: random data does not compress, and a file \
         written to the disk is also in the guest's page cache)",
        mib(third),
        random_ratio
    );

    // 7. Stored size of a first snapshot against zstd -3 of the same raw state.
    let raw_files: Vec<PathBuf> = vec![
        files.join("state"),
        stasis_server::memory_dir(&data).join(format!("{snap1_id}.memory")),
        files.join("disk.raw"),
    ];
    // The snapshot also holds the kernel and initrd its machine booted (stored once per
    // tenant, shared by its later snapshots), so the baseline compresses them too.
    let booted = machine(&data, &small)?;
    let mut snapshot_files = raw_files.clone();
    snapshot_files.extend([booted.kernel.clone(), booted.initrd.clone()]);
    let (zstd3, _) = zstd("-3", "-T1", &snapshot_files).await?;
    let stored = snap1["compressed_size_bytes"].as_u64().unwrap_or(0);
    let r = stored as f64 / zstd3 as f64;
    rows.push(Row {
        what: "stored size of a first snapshot (vs zstd -3 of its raw state and boot files)",
        value: mib(stored),
        baseline: mib(zstd3),
        ratio: r,
        target: "<= 1x",
        pass: r <= 1.0,
    });

    // 8. Five restores of one snapshot at once.
    let t = Instant::now();
    let five = futures::future::try_join_all((0..5).map(|_| restore(api, &small, &snap1_id))).await?;
    let wall = t.elapsed();
    wait_ready_again(api, &small, &snap1_id).await?;
    let r = wall.as_secs_f64() / restore_small.as_secs_f64();
    rows.push(Row {
        what: "five restores of one snapshot at once: wall time (vs one restore)",
        value: ms(wall),
        baseline: ms(restore_small),
        ratio: r,
        target: "<= 2x",
        pass: r <= 2.0,
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    let mem: Vec<(u64, u64)> = five
        .iter()
        .filter_map(|(_, id)| qemu_pid(&data, id))
        .map(smaps)
        .collect();
    let pss: u64 = mem.iter().map(|m| m.1).sum();
    let rss_one = mem.first().map_or(0, |m| m.0);
    let r = pss as f64 / rss_one.max(1) as f64;
    rows.push(Row {
        what: "five idle clones: sum of PSS (vs one clone's RSS)",
        value: mib(pss),
        baseline: mib(rss_one),
        ratio: r,
        target: "<= 1.5x",
        pass: r <= 1.5 && mem.len() == 5,
    });

    // 9. Upload pipeline throughput against zstd -1 -T2 over the same bytes.
    let store = stasis_store::SnapshotStore::local(&scratch.join("store"))?;
    let raw_bytes: u64 = raw_files
        .iter()
        .map(|f| std::fs::metadata(f).map(|m| m.len()).unwrap_or(0))
        .sum();
    let t = Instant::now();
    let pin = store.pin().await;
    for (f, chunk) in raw_files.iter().zip([
        stasis_store::STATE_CHUNK_SIZE,
        stasis_store::MEMORY_CHUNK_SIZE,
        stasis_store::DISK_CHUNK_SIZE,
    ]) {
        store
            .upload_file(&pin, stasis_types::TenantId::new(), f, chunk, std::sync::Arc::new(|_| {}))
            .await?;
    }
    let ours = t.elapsed();
    drop(pin);
    let (_, zstd1) = zstd("-1", "-T2", &raw_files).await?;
    let tp = |d: Duration| raw_bytes as f64 / d.as_secs_f64() / (1 << 20) as f64;
    let r = tp(ours) / tp(zstd1);
    rows.push(Row {
        what: "upload pipeline throughput (vs zstd -1 -T2, same bytes)",
        value: format!("{:.0} MiB/s", tp(ours)),
        baseline: format!("{:.0} MiB/s", tp(zstd1)),
        ratio: r,
        target: ">= 0.8x",
        pass: r >= 0.8,
    });

    println!("accelerator: {}", stasis_vmm::Accel::detect().as_str());
    println!(
        "{:<82} {:>11} {:>11} {:>8}  {:<26} result",
        "what", "measured", "baseline", "ratio", "target"
    );
    for r in &rows {
        println!(
            "{:<82} {:>11} {:>11} {:>8.2}  {:<26} {}",
            r.what,
            r.value,
            r.baseline,
            r.ratio,
            r.target,
            if r.pass { "pass" } else { "FAIL" }
        );
    }
    println!("{cached_row}");
    println!("{random_row}");
    if !breakdown.is_empty() {
        let med = |f: fn(&RestoreTimings) -> f64| {
            let mut v: Vec<f64> = breakdown.iter().map(f).collect();
            v.sort_by(|a, b| a.total_cmp(b));
            v[v.len() / 2]
        };
        println!(
            "\nwhere a restore's time goes (median of {}, 512 MiB guest, snapshot cached on this host):",
            breakdown.len()
        );
        println!("  files (overlay, config)      {:>6.1} ms", med(|t| t.prepare_ms));
        println!("  QEMU process start           {:>6.1} ms", med(|t| t.qemu_start_ms));
        println!("  device state load            {:>6.1} ms", med(|t| t.state_load_ms));
        println!("  resume (cont)                {:>6.1} ms", med(|t| t.resume_ms));
        println!(
            "  agent reconnect + identity   {:>6.1} ms  (first page faults, cold TCG code cache)",
            med(|t| t.agent_ms)
        );
        println!("  total in the host runtime    {:>6.1} ms", med(|t| t.total_ms));
        println!(
            "  the rest of API call -> first exec ({}) is HTTP, bookkeeping, and the exec itself",
            ms(restore_small)
        );
    }
    let passed = rows.iter().filter(|r| r.pass).count();
    println!("\n{passed} of {} targets met", rows.len());
    Ok(())
    })
    .await
}
