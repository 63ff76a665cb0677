//! A guest that has escaped into its confined QEMU: it owns its machine's disks directory and
//! plants what it likes there (links to host files, a qcow2 whose backing file is a host
//! secret, a forged config and pid file, links to another computer's sockets). The platform,
//! as root, must not follow any of it: no host file reaches a snapshot or an API answer, no
//! host file is written or deleted, no other computer is touched. Each step plants from
//! inside the QEMU's own namespaces, as its user with no capabilities (`nsenter` + `setpriv`),
//! and then drives the API the way the tenant would.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::{create_key, data_dir, out, qemu_pid, restore, running_computer, snapshot, Client, Server, BOOT, SNAP};

/// Runs a shell script as QEMU `pid`'s user and groups, inside its PID, mount, network, IPC and
/// UTS namespaces and its root, in its working directory (the disks directory), with no
/// capabilities and no new privileges: what a guest that took over that QEMU can do.
fn as_escaped_qemu(pid: i32, script: &str) -> String {
    let out = common::as_qemu_user(pid, true)
        .args(["/bin/sh", "-c", script])
        .output()
        .expect("nsenter and setpriv run (util-linux)");
    assert!(
        out.status.success(),
        "the planting script failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// Every file under `dir` (not following links) holding `needle`, except under `skip`.
fn files_holding(dir: &Path, needle: &[u8], skip: &[PathBuf]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for e in entries.flatten() {
        let p = e.path();
        if skip.contains(&p) {
            continue;
        }
        let Ok(meta) = std::fs::symlink_metadata(&p) else {
            continue;
        };
        if meta.is_dir() {
            found.extend(files_holding(&p, needle, skip));
        } else if meta.is_file() {
            // Sparse files (disks, RAM) can be large: read them in pieces.
            if let Ok(f) = std::fs::File::open(&p) {
                use std::io::Read;
                let mut r = std::io::BufReader::with_capacity(1 << 20, f);
                let mut carry: Vec<u8> = Vec::new();
                let mut buf = vec![0u8; 1 << 20];
                loop {
                    let n = r.read(&mut buf).unwrap_or(0);
                    if n == 0 {
                        break;
                    }
                    carry.extend_from_slice(&buf[..n]);
                    if contains(&carry, needle) {
                        found.push(p.clone());
                        break;
                    }
                    let keep = carry.len().saturating_sub(needle.len());
                    carry.drain(..keep);
                }
            }
        }
    }
    found
}

fn marker(tag: &str) -> String {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{tag}-{n:032x}-{:08x}", std::process::id())
}

#[test]
fn what_an_escaped_qemu_plants_is_never_followed_by_the_platform() {
    let dir = data_dir();
    let data = dir.path();
    let key = create_key(data, "escape");
    let mut server = Server::start(data);
    let api = Client::new(&server.base, Some(&key));

    // Host files the attacker wants: a secret to read, a file to clobber or delete.
    let outside = tempfile::tempdir().unwrap();
    let secret_text = marker("host-secret");
    let secret = outside.path().join("secret");
    std::fs::write(&secret, format!("{secret_text}\n")).unwrap();
    let victim = outside.path().join("victim");
    std::fs::write(&victim, "untouched").unwrap();
    let dangling = outside.path().join("made-by-root");

    let a = running_computer(&api, "escape-a");
    let b = running_computer(&api, "escape-b");
    let c = running_computer(&api, "escape-c");
    let (pa, pb, pc) = (
        qemu_pid(data, &a).unwrap(),
        qemu_pid(data, &b).unwrap(),
        qemu_pid(data, &c).unwrap(),
    );

    // 1. A's top overlay becomes a qcow2 whose backing file is the host secret (as raw, and
    //    through a json: offset); the next snapshot freezes it and flattens it.
    let base_size = {
        let config: serde_json::Value =
            serde_json::from_slice(&std::fs::read(data.join("machines").join(&a).join("machine.json")).unwrap())
                .unwrap();
        std::fs::metadata(config["base_disk"].as_str().unwrap()).unwrap().len()
    };
    as_escaped_qemu(
        pa,
        &format!(
            "set -e; qemu-img create -q -f qcow2 -u -F raw -b {} evil.qcow2 {base_size}; mv -f evil.qcow2 disk.qcow2",
            secret.display()
        ),
    );
    let snap = snapshot(&api, &a, "escape");
    let start = Instant::now();
    let settled = loop {
        let r = api.call("GET", &format!("/computers/{a}/snapshots/{snap}"), None);
        let s = r.body["data"]["status"].as_str().unwrap().to_string();
        if s == "ready" || s == "failed" {
            break r.body["data"].clone();
        }
        assert!(start.elapsed() < SNAP, "snapshot still {s}");
        std::thread::sleep(Duration::from_millis(100));
    };
    if settled["status"] == "ready" {
        // Whatever was stored, the host secret is not on the restored disk.
        let r = restore(&api, &a, &snap);
        api.wait_status(&r, "running", BOOT);
        assert_eq!(
            out(&api, &r, &format!("grep -c {secret_text} /dev/vda || true")),
            "0",
            "the host's secret file is on the snapshot's disk"
        );
    } else {
        let error = settled["error"].as_str().unwrap_or_default();
        assert!(error.contains("disk"), "the failure names the disk: {error}");
        assert!(!error.contains(&secret_text), "{error}");
    }
    // Nor in any of the platform's local copies (staging, materialized snapshots, RAM).
    let skip = [data.join("objects"), data.join("stasis.db"), data.join("stasis.db-wal")];
    let leaked = files_holding(data, secret_text.as_bytes(), &skip);
    assert!(leaked.is_empty(), "the host secret was copied into {leaked:?}");

    // 2 and 3. B plants links where older versions kept the platform's files, a forged
    // config naming the victim as its RAM file, C's pid as its own and C's sockets as its
    // sockets; then its guest powers the machine off.
    let control_c = data.join("machines").join(&c);
    let plant = format!(
        "set -e
         ln -sf {secret} console.log
         ln -sf {victim} qemu.log
         ln -sf {victim} machine.json.tmp
         ln -sf {victim} restore-timings.json
         ln -sf {dangling} disk-planted.qcow2
         ln -sf {qmp} qmp.sock
         ln -sf {agent} agent.sock
         printf '%s' {pc} > qemu.pid
         printf '%s' '{{\"ram_path\":\"{victim}\",\"ram_shared\":true,\"disk\":\"{victim}\"}}' > machine.json
         ls",
        secret = secret.display(),
        victim = victim.display(),
        dangling = dangling.display(),
        qmp = control_c.join("qmp.sock").display(),
        agent = control_c.join("agent.sock").display(),
    );
    as_escaped_qemu(pb, &plant);
    let r = api.exec(&b, "sync; echo o > /proc/sysrq-trigger", Some(5));
    assert!(r.status < 500 || r.status == 502 || r.status == 503, "{}", r.body);
    let body = api.wait_status(&b, "error", BOOT);
    let error = body["error"].as_str().unwrap_or_default().to_string();
    assert!(
        !error.contains(&secret_text),
        "the host secret is in B's error: {error}"
    );
    assert!(
        error.contains("console"),
        "the guest's own console still reaches the error: {error}"
    );

    // The tenant starts B again: the platform as root boots it from what it keeps itself.
    let r = api.call("POST", &format!("/computers/{b}/start"), None);
    assert!(r.status < 300, "{}", r.body);
    api.wait_status(&b, "running", BOOT);
    assert_eq!(out(&api, &b, "echo back"), "back");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "untouched");
    assert!(!dangling.exists(), "root created a file where a planted link pointed");
    assert_eq!(qemu_pid(data, &c), Some(pc), "C's QEMU was killed for B");

    // The same plants again in B's new QEMU, then the platform dies; the next one re-attaches
    // every computer from its own files and touches no other.
    let pb = qemu_pid(data, &b).unwrap();
    as_escaped_qemu(pb, &plant);
    server.kill9();
    let server = Server::start(data);
    let api = Client::new(&server.base, Some(&key));
    for id in [&b, &c] {
        api.wait_status(id, "running", BOOT);
    }
    assert_eq!(qemu_pid(data, &b), Some(pb), "B's QEMU was not re-attached");
    assert_eq!(qemu_pid(data, &c), Some(pc), "C's QEMU was not re-attached");
    assert_eq!(out(&api, &c, "echo c-fine"), "c-fine");
    assert_eq!(out(&api, &b, "echo b-fine"), "b-fine");
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "untouched");
    assert!(!dangling.exists());

    // 9. Snapshots leave nothing behind on the host for good: the frozen overlay of each is
    //    folded into the top one, and a deleted snapshot's local copies (RAM, state, disk)
    //    go, in clear as they are.
    let qcow2s = || -> Vec<String> {
        std::fs::read_dir(data.join("computers").join(&c))
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| n.ends_with(".qcow2"))
            .collect()
    };
    let mut snaps = Vec::new();
    for round in 0..2 {
        out(&api, &c, &format!("head -c 4M /dev/urandom > /root/round{round}; sync"));
        let s = snapshot(&api, &c, "round");
        api.wait_snapshot(&c, &s, "ready", SNAP);
        let t = Instant::now();
        while qcow2s().len() != 1 {
            assert!(t.elapsed() < Duration::from_secs(120), "overlays left: {:?}", qcow2s());
            std::thread::sleep(Duration::from_millis(200));
        }
        snaps.push(s);
    }
    assert_eq!(out(&api, &c, "ls /root | grep -c round"), "2");
    let gone = &snaps[0];
    let local = [
        data.join("cache/snapshots").join(gone),
        common::memory_file(gone).expect("the snapshot's RAM file is on this host"),
    ];
    let d = api.call("DELETE", &format!("/computers/{c}/snapshots/{gone}"), None);
    assert!(d.status < 300, "{}", d.body);
    let t = Instant::now();
    while local.iter().any(|p| p.exists()) {
        assert!(t.elapsed() < Duration::from_secs(60), "left behind: {local:?}");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        data.join("cache/snapshots").join(&snaps[1]).exists(),
        "the other snapshot's copy went too"
    );

    for id in [&a, &b, &c] {
        let d = api.call("DELETE", &format!("/computers/{id}"), None);
        assert!(d.status < 300, "{}", d.body);
    }
}

/// Someone squatting the RAM directory's predictable name in /dev/shm before the platform
/// starts: the platform refuses to use it, naming it, rather than writing RAM files there.
#[test]
fn a_squatted_ram_directory_is_refused() {
    let dir = data_dir();
    let data = dir.path();
    let tag = {
        let out = Command::new("sh")
            .args(["-c", "printf '%s' \"$1\" | sha256sum | cut -c1-16", "sh"])
            .arg(data)
            .output()
            .unwrap();
        String::from_utf8(out.stdout).unwrap().trim().to_string()
    };
    let squat = Path::new("/dev/shm").join(format!("stasis-{tag}"));
    std::fs::create_dir(&squat).unwrap();
    std::os::unix::fs::chown(&squat, Some(12345), Some(12345)).unwrap();
    let (mut args, env) = common::backends::serve_args(data);
    args.splice(
        0..0,
        ["serve".to_string(), "--listen".to_string(), "127.0.0.1:0".to_string()],
    );
    let mut child = Command::new(common::BIN)
        .args(&args)
        .arg("--data-dir")
        .arg(data)
        .envs(env)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = std::fs::remove_dir(&squat);
            panic!("the platform started on a squatted RAM directory");
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let out = child.wait_with_output().unwrap();
    let _ = std::fs::remove_dir(&squat);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!status.success());
    assert!(
        stderr.contains(&squat.display().to_string()) && stderr.contains("uid 12345"),
        "{stderr}"
    );
}
