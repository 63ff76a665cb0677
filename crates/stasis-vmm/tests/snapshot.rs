//! Capture a running guest and restore it twice, side by side, with real QEMU.

use std::time::Duration;

use stasis_agent_proto::ExecRequest;
use stasis_vmm::{Accel, Host, MachineConfig};

fn bash(cmd: &str) -> ExecRequest {
    ExecRequest {
        program: "/bin/bash".into(),
        args: vec!["-c".into(), cmd.into()],
        env: vec![],
        cwd: None,
        stdin: None,
        timeout_ms: 20_000,
    }
}

async fn out(vm: &stasis_vmm::Vm, cmd: &str) -> String {
    let r = vm.exec(bash(cmd)).await.unwrap();
    assert_eq!(r.exit_code, 0, "{cmd}: {r:?}");
    r.stdout.trim().to_string()
}

/// Polls `f` every 50 ms until it gives a value, and returns it; panics naming `what` and
/// `limit` if it has not by then.
async fn wait_until<T, F: std::future::Future<Output = Option<T>>>(
    what: &str,
    limit: Duration,
    mut f: impl FnMut() -> F,
) -> T {
    let start = std::time::Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(start.elapsed() < limit, "gave up waiting for {what} after {limit:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The guest's in-memory counter, once it has moved past `from`.
async fn counter_past(vm: &stasis_vmm::Vm, from: u64) -> u64 {
    wait_until(
        &format!("the counter to move on from {from}"),
        Duration::from_secs(60),
        move || async move {
            let n: u64 = out(vm, "cat /tmp/n").await.parse().unwrap();
            (n > from).then_some(n)
        },
    )
    .await
}

#[tokio::test]
async fn a_captured_guest_continues_in_its_restored_clones() {
    let image = stasis_image::ensure(&stasis_image::default_cache_dir(), &Default::default(), &|m: &str| {
        eprintln!("{m}")
    })
    .unwrap();
    let root = tempfile::Builder::new()
        .prefix("stasis-vmm")
        .tempdir_in("/tmp")
        .unwrap();
    let root = Keep(root.keep());
    eprintln!("KEPT {}", root.path().display());
    let (host, _events) = Host::new(root.path().join("computers"), root.path().join("machines"));
    let config = MachineConfig {
        name: "origin".into(),
        vcpus: 1,
        memory_mib: 256,
        accel: Accel::detect(),
        qemu_binary: "qemu-system-x86_64".into(),
        image_id: image.id.clone(),
        kernel: image.kernel.clone(),
        initrd: image.initrd.clone(),
        base_disk: image.rootfs.clone(),
        disk: Default::default(),
        ram_path: Default::default(),
        ram_shared: true,
        tsc_khz: stasis_vmm::accel::host_tsc_khz(),
        jail: None,
        disk_limits: Some(stasis_vmm::vm::DiskLimits::DEFAULT),
        cpu_model: None,
        device_line: stasis_vmm::description::DEVICE_LINE,
        nic: None,
    };
    let origin = host.boot("origin", config).await.unwrap();
    // A counter that exists only in a process's memory; it reports through a pipe on tmpfs.
    out(&origin, "echo on-disk > /root/before; nohup python3 -c 'import os,time\ni=0\nwhile True:\n  i+=1\n  open(\"/tmp/n.new\",\"w\").write(str(i))\n  os.rename(\"/tmp/n.new\",\"/tmp/n\")\n  time.sleep(0.05)' >/dev/null 2>&1 & sleep 1; echo started").await;

    // A process with a random generator of its own (Python's `random`, seeded once at its
    // start), which a restore hook tells to reseed: without the hook every clone would draw
    // the same numbers from it, whatever the kernel's RNG does.
    out(
        &origin,
        "nohup python3 -c 'import os,random,signal,time\nsignal.signal(signal.SIGUSR1, lambda *a: random.seed())\n\
         open(\"/tmp/rng.pid\",\"w\").write(str(os.getpid()))\nwhile True:\n  if os.path.exists(\"/tmp/ask\"):\n    \
         os.remove(\"/tmp/ask\")\n    open(\"/tmp/answer.new\",\"w\").write(str(random.getrandbits(64)))\n    \
         os.rename(\"/tmp/answer.new\",\"/tmp/answer\")\n  time.sleep(0.02)' >/dev/null 2>&1 & \
         mkdir -p /etc/stasis/on-restore.d && printf '#!/bin/sh\\nkill -USR1 $(cat /tmp/rng.pid) && echo \"$STASIS_EVENT $STASIS_HOSTNAME\" > /tmp/hooked\\n' \
         > /etc/stasis/on-restore.d/50-reseed && chmod +x /etc/stasis/on-restore.d/50-reseed && sleep 1 && test -s /tmp/rng.pid && echo ready",
    )
    .await;

    let staging = root.path().join("staging");
    std::fs::create_dir_all(&staging).unwrap();
    let capture = origin.capture(&staging, &staging.join("memory")).await.unwrap();
    eprintln!("paused {:?}", capture.paused);
    let at_snapshot: u64 = out(&origin, "cat /tmp/n").await.parse().unwrap();
    out(&origin, "echo later > /root/after").await;

    let flat = capture.disk.clone();
    let mut clone_config = capture.machine.clone();
    clone_config.base_disk = flat.clone();
    clone_config.name = "clone-a".into();
    let a = host
        .restore("clone-a", clone_config.clone(), &capture.state, &capture.memory)
        .await
        .unwrap();
    clone_config.name = "clone-b".into();
    let b = host
        .restore("clone-b", clone_config, &capture.state, &capture.memory)
        .await
        .unwrap();

    for clone in [&a, &b] {
        assert_eq!(out(clone, "cat /root/before").await, "on-disk");
        assert_eq!(out(clone, "test -e /root/after && echo yes || echo no").await, "no");
        let first: u64 = out(clone, "cat /tmp/n").await.parse().unwrap();
        assert!(
            first + 50 >= at_snapshot && first <= at_snapshot + 100,
            "continues from {at_snapshot}: {first}"
        );
        // Still counting.
        counter_past(clone, first).await;
        let skew: i64 = out(clone, "date +%s").await.parse().unwrap();
        let host_now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        assert!((skew - host_now).abs() <= 2, "guest clock {skew} vs host {host_now}");
    }
    assert_eq!(out(&a, "hostname").await, "clone-a");
    let ra = out(&a, "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'").await;
    let rb = out(&b, "head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'").await;
    assert_ne!(ra, rb, "clones do not share their RNG");
    // Each clone ran its restore hook, and the process's own generator draws differently in
    // each.
    let draw = "for i in $(seq 200); do [ -e /tmp/hooked ] && break; sleep 0.05; done; cat /tmp/hooked; \
                rm -f /tmp/answer; touch /tmp/ask; for i in $(seq 200); do [ -e /tmp/answer ] && break; sleep 0.02; done; \
                cat /tmp/answer";
    let (da, db) = (out(&a, draw).await, out(&b, draw).await);
    assert!(da.starts_with("restore clone-a\n"), "clone-a's hook: {da:?}");
    assert!(db.starts_with("restore clone-b\n"), "clone-b's hook: {db:?}");
    assert_ne!(
        da.lines().nth(1),
        db.lines().nth(1),
        "a process's own random generator draws the same in both clones"
    );
    assert!(da.lines().nth(1).is_some_and(|n| n.parse::<u64>().is_ok()), "{da:?}");
    // The clones and the original are independent.
    out(&a, "echo mine > /root/a-only").await;
    assert_eq!(out(&b, "test -e /root/a-only && echo yes || echo no").await, "no");
    assert_eq!(out(&origin, "cat /root/after").await, "later");

    // The original can be captured again (its disk chain grew by one overlay), and so can a
    // restored clone (whose RAM is a private mapping of the snapshot's file), into a second
    // generation that still carries everything.
    let staging2 = root.path().join("staging2");
    std::fs::create_dir_all(&staging2).unwrap();
    let second = origin.capture(&staging2, &staging2.join("memory")).await.unwrap();
    assert_ne!(second.frozen, capture.frozen);
    out(&a, "echo gen2 > /root/gen2").await;
    let staging3 = root.path().join("staging3");
    std::fs::create_dir_all(&staging3).unwrap();
    let from_clone = a.capture(&staging3, &staging3.join("memory")).await.unwrap();
    eprintln!("clone paused {:?}", from_clone.paused);
    let mut gen2 = from_clone.machine.clone();
    gen2.base_disk = from_clone.disk.clone();
    gen2.name = "gen2".into();
    let g = host
        .restore("gen2", gen2, &from_clone.state, &from_clone.memory)
        .await
        .unwrap();
    assert_eq!(out(&g, "cat /root/before /root/gen2").await, "on-disk\ngen2");
    let n1: u64 = out(&g, "cat /tmp/n").await.parse().unwrap();
    counter_past(&g, n1).await; // the counter still runs

    // A restored clone captured as its changes alone (no twin, no copy of its whole RAM):
    // what it wrote since its restore, over its snapshot's RAM file, is its RAM at the pause.
    out(
        &b,
        "head -c 2097152 /dev/urandom > /tmp/changed && echo changed > /root/b-only && sync",
    )
    .await;
    let want = out(&b, "sha256sum /tmp/changed | cut -c1-64").await;
    let staging4 = root.path().join("staging4");
    std::fs::create_dir_all(&staging4).unwrap();
    let changes = b
        .capture_changes(&staging4, &staging4.join("changes"), &capture.state, 64 << 20)
        .await
        .unwrap();
    let at_changes: u64 = out(&b, "cat /tmp/n").await.parse().unwrap();
    let changed = stasis_vmm::changes::pages(&changes.runs) * stasis_vmm::changes::PAGE;
    let held = {
        use std::os::unix::fs::MetadataExt;
        std::fs::metadata(&changes.changes).unwrap().blocks() * 512
    };
    eprintln!(
        "changes: paused {:?}, {} KiB changed in {} runs, {} KiB held on the host",
        changes.paused,
        changed >> 10,
        changes.runs.len(),
        held >> 10
    );
    assert!(changed >= 2 << 20, "the 2 MiB written are among the changes: {changed}");
    assert!(changed <= 64 << 20, "a quarter of the RAM at most changed: {changed}");
    assert!(
        held <= changed + (1 << 20),
        "the host holds the changes only: {held} for {changed}"
    );
    counter_past(&b, at_changes).await; // it ran on
    let mut from_changes = changes.machine.clone();
    from_changes.base_disk = changes.disk.clone();
    from_changes.name = "gen2b".into();
    let h = host
        .restore_changed(
            "gen2b",
            from_changes,
            &changes.state,
            &changes.base_memory,
            Some(&changes.changes),
        )
        .await
        .unwrap();
    assert_eq!(out(&h, "sha256sum /tmp/changed | cut -c1-64").await, want);
    assert_eq!(out(&h, "cat /root/before /root/b-only").await, "on-disk\nchanged");
    let n2: u64 = out(&h, "cat /tmp/n").await.parse().unwrap();
    assert!(
        n2 + 50 >= at_changes && n2 <= at_changes + 100,
        "continues from {at_changes}: {n2}"
    );
    counter_past(&h, n2).await;
    // One level further: its changes are over the same base file, so they hold the level
    // before's too, and a restore from them has both levels' memory.
    out(&h, "head -c 1048576 /dev/urandom > /tmp/changed2 && sync").await;
    let want2 = out(&h, "sha256sum /tmp/changed2 | cut -c1-64").await;
    let staging5 = root.path().join("staging5");
    std::fs::create_dir_all(&staging5).unwrap();
    let level2 = h
        .capture_changes(&staging5, &staging5.join("changes"), &changes.state, 64 << 20)
        .await
        .unwrap();
    assert_eq!(level2.base_memory, changes.base_memory);
    let changed2 = stasis_vmm::changes::pages(&level2.runs) * stasis_vmm::changes::PAGE;
    eprintln!("level 2: paused {:?}, {} KiB changed", level2.paused, changed2 >> 10);
    assert!(
        changed2 >= changed,
        "the level before's changes are in: {changed2} < {changed}"
    );
    let mut next = level2.machine.clone();
    next.base_disk = level2.disk.clone();
    next.name = "gen3b".into();
    let k = host
        .restore_changed("gen3b", next, &level2.state, &level2.base_memory, Some(&level2.changes))
        .await
        .unwrap();
    assert_eq!(
        out(&k, "sha256sum /tmp/changed /tmp/changed2 | cut -c1-64").await,
        format!("{want}\n{want2}")
    );
    let n3: u64 = out(&k, "cat /tmp/n").await.parse().unwrap();
    counter_past(&k, n3).await;
    // A machine restored from changes is captured whole (through a twin, as a hibernation
    // is) as any other.
    let staging6 = root.path().join("staging6");
    std::fs::create_dir_all(&staging6).unwrap();
    let whole = k.capture(&staging6, &staging6.join("memory")).await.unwrap();
    let mut last = whole.machine.clone();
    last.base_disk = whole.disk.clone();
    last.name = "gen4b".into();
    let w = host.restore("gen4b", last, &whole.state, &whole.memory).await.unwrap();
    assert_eq!(
        out(&w, "sha256sum /tmp/changed /tmp/changed2 | cut -c1-64").await,
        format!("{want}\n{want2}")
    );
    host.stop("gen4b").await;
    host.stop("gen3b").await;
    host.stop("gen2b").await;

    // The original's chain holds three overlays now (two frozen); folding them into the top
    // leaves one file, and the guest's disk as it was, also across a restart.
    let disks = root.path().join("computers/origin");
    let qcow2s = || {
        std::fs::read_dir(&disks)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".qcow2"))
            .count()
    };
    assert_eq!(qcow2s(), 3);
    assert_eq!(origin.compact_disk().await.unwrap(), 2);
    assert_eq!(qcow2s(), 1);
    assert_eq!(out(&origin, "cat /root/before /root/after").await, "on-disk\nlater");
    out(&origin, "echo after-compaction > /root/third; sync").await;
    host.stop("origin").await;
    let origin = host.boot("origin", capture.machine.clone()).await.unwrap();
    assert_eq!(
        out(&origin, "cat /root/before /root/after /root/third").await,
        "on-disk\nlater\nafter-compaction"
    );
    host.stop_all().await;
}
struct Keep(std::path::PathBuf);
impl Keep {
    fn path(&self) -> &std::path::Path {
        &self.0
    }
}
