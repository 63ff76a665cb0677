//! What isolation costs: snapshot and restore times of the same workload on four platforms
//! run side by side in this process — plain (the baseline), confined QEMUs, encryption at
//! rest, and both — taking turns round by round so the machine's noise falls on all alike.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use reqwest::Method;
use serde_json::json;
use stasis_server::Confine;

use super::{exec_ok, median, ms, prepare_image, wait_snapshot, LocalPlatform};

struct Variant {
    label: &'static str,
    confine: Confine,
    encrypted: bool,
}

const VARIANTS: [Variant; 4] = [
    Variant {
        label: "plain (baseline)",
        confine: Confine::Off,
        encrypted: false,
    },
    Variant {
        label: "confined",
        confine: Confine::On,
        encrypted: false,
    },
    Variant {
        label: "encrypted",
        confine: Confine::Off,
        encrypted: true,
    },
    Variant {
        label: "confined + encrypted",
        confine: Confine::On,
        encrypted: true,
    },
];

#[derive(Default)]
struct Samples {
    snapshot: Vec<Duration>,
    pause: Vec<Duration>,
    restore_cached: Vec<Duration>,
    restore_store: Vec<Duration>,
}

pub async fn run(rounds: usize, touch_mib: u64) -> Result<()> {
    anyhow::ensure!(
        stasis_vmm::jail::can_confine(),
        "the confined variants need root (to make namespaces and change users)"
    );
    prepare_image().await?;
    let keys = tempfile::tempdir()?;
    let key_file = keys.path().join("master.key");
    let mut key = [0u8; 32];
    std::io::Read::read_exact(&mut std::fs::File::open("/dev/urandom")?, &mut key)?;
    let hex: String = key.iter().map(|b| format!("{b:02x}")).collect();
    std::fs::write(&key_file, hex)?;

    let mut platforms = Vec::new();
    for v in &VARIANTS {
        let master = v.encrypted.then(|| key_file.clone());
        platforms.push(LocalPlatform::start_with(None, v.confine, master).await?);
    }
    let result = measure(&platforms, rounds, touch_mib).await;
    for p in platforms {
        p.stop().await;
    }
    let samples = result?;

    println!(
        "accelerator: {}, size xs, {touch_mib} MiB of random data in guest memory, {rounds} rounds (medians)",
        stasis_vmm::Accel::detect().as_str()
    );
    println!(
        "{:<22} {:>22} {:>16} {:>26} {:>26}",
        "variant", "snapshot create->ready", "guest pause", "restore, cached->exec", "restore, from store->exec"
    );
    let base = &samples[0];
    let ratio = |v: &[Duration], b: &[Duration]| {
        let (v, b) = (median(v.to_vec()), median(b.to_vec()));
        format!("{} ({:.2}x)", ms(v), v.as_secs_f64() / b.as_secs_f64().max(1e-9))
    };
    for (v, s) in VARIANTS.iter().zip(&samples) {
        println!(
            "{:<22} {:>22} {:>16} {:>26} {:>26}",
            v.label,
            ratio(&s.snapshot, &base.snapshot),
            ms(median(s.pause.clone())),
            ratio(&s.restore_cached, &base.restore_cached),
            ratio(&s.restore_store, &base.restore_store),
        );
    }
    println!("ratios are against the plain platform measured in the same rounds");
    Ok(())
}

async fn measure(platforms: &[LocalPlatform], rounds: usize, touch_mib: u64) -> Result<Vec<Samples>> {
    // One computer on each, holding the same kind of state.
    let mut computers = Vec::new();
    for p in platforms {
        let c = p
            .api
            .call(
                Method::POST,
                "/computers",
                Some(json!({"name": "bench-hardening", "size": "xs"})),
            )
            .await?;
        let id = c["id"].as_str().context("no id")?.to_string();
        computers.push(id);
    }
    for (p, id) in platforms.iter().zip(&computers) {
        p.api.wait_running(id, Duration::from_secs(300)).await?;
    }
    let mut samples: Vec<Samples> = platforms.iter().map(|_| Samples::default()).collect();
    for round in 0..rounds {
        for k in 0..platforms.len() {
            // Each round starts with another variant.
            let i = (round + k) % platforms.len();
            let (p, id) = (&platforms[i], &computers[i]);
            eprintln!("round {}/{rounds}: {}", round + 1, VARIANTS[i].label);
            // Fresh random data each round, so every snapshot uploads new chunks.
            exec_ok(
                &p.api,
                id,
                &format!("head -c {touch_mib}M /dev/urandom > /root/data && sync && echo ok"),
            )
            .await?;
            let t = Instant::now();
            let s = p
                .api
                .call(Method::POST, &format!("/computers/{id}/snapshots"), Some(json!({})))
                .await?;
            let snap = s["data"]["id"].as_str().context("no snapshot id")?.to_string();
            let ready = wait_snapshot(&p.api, id, &snap).await?;
            samples[i].snapshot.push(t.elapsed());
            samples[i]
                .pause
                .push(Duration::from_millis(ready["pause_ms"].as_u64().unwrap_or(0)));

            // Restored from the files this host kept from the capture...
            samples[i].restore_cached.push(restore(p, id, &snap).await?);
            // ... and from the store, as on a host that never had it (downloads, decrypts).
            p.state
                .snapshots
                .evict_local_copy(snap.parse().context("a snapshot id")?);
            samples[i].restore_store.push(restore(p, id, &snap).await?);
        }
    }
    Ok(samples)
}

/// Restores `snap`, waits for the first exec to answer, deletes the restored computer;
/// returns the time from the call to the first exec.
async fn restore(p: &LocalPlatform, computer: &str, snap: &str) -> Result<Duration> {
    let t = Instant::now();
    let r = p
        .api
        .call(Method::POST, &format!("/computers/{computer}/restore/{snap}"), None)
        .await?;
    let new = r["data"]["id"].as_str().context("no restored id")?.to_string();
    p.api.wait_running(&new, Duration::from_secs(300)).await?;
    exec_ok(&p.api, &new, "test -s /root/data").await?;
    let took = t.elapsed();
    p.api.call(Method::DELETE, &format!("/computers/{new}"), None).await?;
    Ok(took)
}
