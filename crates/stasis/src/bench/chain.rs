//! `stasis bench chain`: a chain of snapshots of restored computers (restore, change a little
//! of RAM and disk, snapshot, restore that, ...), against a booted computer's snapshot and a
//! cold boot in the same run: pauses, bytes uploaded per level, restore latency by depth, the
//! disk chain's depth, and hibernate → resume.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use reqwest::Method;
use serde_json::json;

use super::{exec_ok, ms, prepare_image, restore_to_first_exec, snapshot, LocalPlatform};

/// Images the root disk's chain may hold at most: the top overlay, a frozen one until it is
/// folded in (in the background after a capture), and the base.
const CHAIN_BOUND: usize = 3;

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / (1 << 20) as f64)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

pub async fn run(levels: usize, size: &str, touch_mib: u64) -> Result<()> {
    prepare_image().await?;
    LocalPlatform::with(async |platform| {
        let api = &platform.api;
        println!("accelerator: {}; size {size}; {touch_mib} MiB of RAM in use; {levels} levels", stasis_vmm::Accel::detect().as_str());
        // The booted computer and its snapshot: the baseline pause and the first upload.
        let t = Instant::now();
        let root = api
            .call(Method::POST, "/computers", Some(json!({"name": "chain-root", "size": size})))
            .await?["id"]
            .as_str()
            .context("no id")?
            .to_string();
        exec_ok(api, &root, "true").await?;
        let cold = t.elapsed();
        exec_ok(
            api,
            &root,
            &format!("nohup python3 -c 'import os,time; b=os.urandom({touch_mib}<<20); time.sleep(10**7)' >/dev/null 2>&1 & sleep 2"),
        )
        .await?;
        let first = snapshot(api, &root).await?;
        let booted_pause = first["pause_ms"].as_f64().context("no pause_ms")?;
        let first_uploaded = first["uploaded_bytes"].as_u64().context("no uploaded_bytes")?;
        println!("booted: pause {booted_pause} ms, first snapshot uploaded {}", mib(first_uploaded));
        println!("{:<6} {:>18} {:>10} {:>14} {:>10} {:>12}", "depth", "restore→exec", "pause", "uploaded", "vs first", "disk chain");
        let (mut parent, mut snap) = (root.clone(), first["id"].as_str().context("no id")?.to_string());
        let (mut pauses, mut restores, mut uploads, mut depths) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        for level in 1..=levels {
            let (took, id) = restore_to_first_exec(api, &parent, &snap).await?;
            // About 1% of RAM and 10 MiB of disk change at each level (the disk written past
            // the guest's page cache, which would otherwise change 10 MiB of RAM as well).
            let ram_mib = (touch_mib / 25).max(1);
            exec_ok(
                api,
                &id,
                &format!(
                    "nohup python3 -c 'import os,time; b=os.urandom({ram_mib}<<20); time.sleep(10**7)' >/dev/null 2>&1 & \
                     dd if=/dev/urandom of=/root/level-{level} bs=1M count=10 oflag=direct status=none; sleep 1"
                ),
            )
            .await?;
            let s = snapshot(api, &id).await?;
            let pause = s["pause_ms"].as_f64().context("no pause_ms")?;
            let uploaded = s["uploaded_bytes"].as_u64().context("no uploaded_bytes")?;
            // The frozen overlay is folded in the background: give it a moment.
            tokio::time::sleep(Duration::from_secs(2)).await;
            let depth = match platform.state.snapshots.computers().host().get(&id) {
                Some(vm) => vm.disk_chain_depth().await?,
                None => anyhow::bail!("computer {id} is not running on this platform"),
            };
            println!(
                "{:<6} {:>18} {:>7} ms {:>14} {:>9.1}% {:>12}",
                level,
                ms(took),
                pause,
                mib(uploaded),
                uploaded as f64 * 100.0 / first_uploaded as f64,
                depth
            );
            pauses.push(pause);
            restores.push(took.as_secs_f64() * 1000.0);
            uploads.push(uploaded as f64 * 100.0 / first_uploaded as f64);
            depths.push(depth);
            if parent != root {
                api.call(Method::DELETE, &format!("/computers/{parent}"), None).await?;
            }
            (parent, snap) = (id, s["id"].as_str().context("no id")?.to_string());
        }
        // The files of every level are in the last computer.
        let listing = exec_ok(api, &parent, "ls /root | grep -c level-").await?;
        anyhow::ensure!(
            listing["output"].as_str().map(str::trim) == Some(&levels.to_string()),
            "the deepest computer lacks some levels' files: {listing}"
        );
        // Hibernate the deepest computer, then resume it.
        api.call(Method::POST, &format!("/computers/{parent}/pause"), None).await?;
        loop {
            let c = api.call(Method::GET, &format!("/computers/{parent}"), None).await?;
            if c["status"] == "paused" {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Stored: no RAM of it is held on the host any more.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let t = Instant::now();
        api.call(Method::POST, &format!("/computers/{parent}/resume"), None).await?;
        exec_ok(api, &parent, "true").await?;
        let resume = t.elapsed();
        let alive = exec_ok(api, &parent, "pgrep -fc 'os.urandom' || true").await?;
        let last = pauses.last().copied().unwrap_or(0.0);
        let deepest = restores.last().copied().unwrap_or(0.0);
        let max_upload = uploads.iter().copied().fold(0.0, f64::max);
        let max_depth = depths.iter().copied().max().unwrap_or(0);
        println!();
        println!("{:<58} {:>12} {:>12} {:>8} {:>8} {:>4}", "measure", "measured", "baseline", "ratio", "target", "met");
        let row = |what: &str, m: String, b: String, ratio: f64, target: &str, met: bool| {
            println!("{what:<58} {m:>12} {b:>12} {ratio:>7.2}x {target:>8} {:>4}", if met { "yes" } else { "no" });
        };
        let ratio = last / booted_pause.max(1.0);
        row(&format!("pause at depth {levels} / booted computer's pause"), format!("{last} ms"), format!("{booted_pause} ms"), ratio, "<= 2x", ratio <= 2.0);
        let med = median(pauses.clone()) / booted_pause.max(1.0);
        row("median pause over the levels / booted", format!("{:.0} ms", median(pauses)), format!("{booted_pause} ms"), med, "(info)", true);
        row("most uploaded by a level / first snapshot's upload", format!("{max_upload:.1}%"), mib(first_uploaded), max_upload / 100.0, "<= 10%", max_upload <= 10.0);
        let r = deepest / restores[0].max(1.0);
        row(&format!("restore→first exec, depth {levels} / depth 1"), format!("{deepest:.0} ms"), format!("{:.0} ms", restores[0]), r, "<= 1.2x", r <= 1.2);
        row("disk chain depth (images), most seen", format!("{max_depth}"), format!("bound {CHAIN_BOUND}"), max_depth as f64 / CHAIN_BOUND as f64, "<= 1x", max_depth <= CHAIN_BOUND);
        let speed = cold.as_secs_f64() / resume.as_secs_f64().max(1e-6);
        row("cold boot / hibernate→resume→first exec", ms(resume), ms(cold), speed, ">= 10x", speed >= 10.0);
        println!("processes of the deepest computer alive after the resume: {}", alive["output"].as_str().unwrap_or("").trim());
        Ok(())
    })
    .await
}
