//! Confined QEMUs on a real server (the tests run as root, so `--confine auto` confines):
//! from inside one computer's confinement — its QEMU's own mount, network, IPC and UTS
//! namespaces and root, its user and groups, no capabilities, no new privileges — another
//! computer's disk, console, sockets and RAM file, the snapshot files it was not restored
//! from, and the platform's data cannot be opened, while its own files can. The QEMU itself
//! runs as that user under seccomp, in cgroups sized from the computer.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::{
    create_key, data_dir, out, qemu_pid, restore, running_computer, snapshot, status_field, Client, Server, SNAP,
};

/// Tries each `MODE:PATH` (r: open for reading, w: open for writing, c: connect to a unix
/// socket, l: list a directory) and prints `PATH<TAB>ok` (`ok NAME,NAME` for a listing) or
/// `PATH<TAB>ERRNO-NAME`.
const PROBE: &str = r#"
import errno, os, socket, sys
for arg in sys.argv[1:]:
    mode, path = arg.split(":", 1)
    try:
        if mode == "c":
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.settimeout(2)
            s.connect(path)
            s.close()
        elif mode == "l":
            print(path + "\tok " + ",".join(sorted(os.listdir(path))))
            continue
        else:
            os.close(os.open(path, os.O_RDONLY if mode == "r" else os.O_RDWR))
        print(path + "\tok")
    except OSError as e:
        print(path + "\t" + errno.errorcode.get(e.errno, str(e.errno)))
"#;

fn uid_of(pid: i32) -> u32 {
    status_field(pid, "Uid")
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

/// Runs the probe as the confined user of `pid` with its groups, no capabilities and no new
/// privileges: inside that process's namespaces and root, or (`inside` false) on the host.
fn probe(pid: i32, inside: bool, tries: &[String]) -> Vec<(String, String)> {
    let out = common::as_qemu_user(pid, inside)
        .args(["/usr/bin/python3", "-I", "-c", PROBE])
        .args(tries)
        .output()
        .expect("nsenter and setpriv run (util-linux)");
    assert!(
        out.status.success(),
        "the probe failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    parse(&out.stdout)
}

fn probe_inside(pid: i32, tries: &[String]) -> Vec<(String, String)> {
    probe(pid, true, tries)
}

fn parse(stdout: &[u8]) -> Vec<(String, String)> {
    String::from_utf8_lossy(stdout)
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(p, r)| (p.to_string(), r.to_string()))
        .collect()
}

fn tries(mode: &str, paths: &[PathBuf]) -> Vec<String> {
    paths.iter().map(|p| format!("{mode}:{}", p.display())).collect()
}

/// The cgroup directories (v1: cpu and memory; v2: one) a process is in.
fn cgroup_dirs(pid: i32) -> Vec<PathBuf> {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let mut dirs = Vec::new();
    for line in cgroups.lines() {
        let mut f = line.splitn(3, ':');
        let (_, controllers, path) = (f.next().unwrap(), f.next().unwrap(), f.next().unwrap());
        let path = path.trim_start_matches('/');
        for c in ["cpu", "memory"] {
            if controllers.split(',').any(|x| x == c) && path.contains("stasis-") {
                dirs.push(Path::new("/sys/fs/cgroup").join(c).join(path));
            }
        }
        if controllers.is_empty() && path.contains("stasis-") {
            dirs.push(Path::new("/sys/fs/cgroup").join(path));
        }
    }
    dirs
}

#[test]
fn a_confined_qemu_sees_only_its_own_files() {
    let dir = data_dir();
    let key = create_key(dir.path(), "jail");
    let mut server = Server::start(dir.path());
    let api = Client::new(&server.base, Some(&key));
    let data = dir.path();

    let a = running_computer(&api, "jail-a");
    let b = running_computer(&api, "jail-b");
    // B's snapshot, and a computer restored from it: it shares the snapshot's files.
    assert_eq!(
        out(&api, &b, "echo secret-of-b > /root/b.txt && sync && cat /root/b.txt"),
        "secret-of-b"
    );
    let snap = snapshot(&api, &b, "b");
    api.wait_snapshot(&b, &snap, "ready", SNAP);
    let r = restore(&api, &b, &snap);
    api.wait_status(&r, "running", common::BOOT);
    assert_eq!(out(&api, &r, "cat /root/b.txt"), "secret-of-b");

    let (pa, pb, pr) = (
        qemu_pid(data, &a).unwrap(),
        qemu_pid(data, &b).unwrap(),
        qemu_pid(data, &r).unwrap(),
    );

    // The QEMU processes themselves: unprivileged, each its own user, seccomp on.
    for pid in [pa, pb, pr] {
        assert_ne!(uid_of(pid), 0, "QEMU {pid} runs as root");
        assert_eq!(
            status_field(pid, "CapEff"),
            "0000000000000000",
            "QEMU {pid} has capabilities"
        );
        assert_eq!(status_field(pid, "NoNewPrivs"), "1");
        assert_eq!(status_field(pid, "Seccomp"), "2", "QEMU {pid} has no seccomp filter");
        assert_ne!(
            std::fs::read_link(format!("/proc/{pid}/ns/mnt")).unwrap(),
            std::fs::read_link("/proc/self/ns/mnt").unwrap(),
            "QEMU {pid} shares the host's mount namespace"
        );
        assert_ne!(
            std::fs::read_link(format!("/proc/{pid}/ns/net")).unwrap(),
            std::fs::read_link("/proc/self/ns/net").unwrap()
        );
    }
    // Each QEMU is process 1 of a PID namespace of its own: from inside A, the platform and
    // the other QEMUs do not exist (kill -0 answers "No such process", where a shared PID
    // namespace answers "Operation not permitted" and so confirms they are there), while A's
    // own QEMU answers as process 1 (so the probe can tell the two apart).
    for pid in [pa, pb, pr] {
        assert_ne!(
            std::fs::read_link(format!("/proc/{pid}/ns/pid")).unwrap(),
            std::fs::read_link("/proc/self/ns/pid").unwrap(),
            "QEMU {pid} shares the host's PID namespace"
        );
    }
    let platform = server.child.id() as i32;
    let script = format!(
        "for p in {platform} {pb} {pr} 1; do r=$(kill -0 $p 2>&1) && echo \"$p=there\" || echo \"$p=$r\"; done"
    );
    let seen = common::as_qemu_user(pa, true)
        .args(["/bin/sh", "-c", &script])
        .output()
        .unwrap();
    let seen = String::from_utf8_lossy(&seen.stdout).into_owned();
    let lines: Vec<&str> = seen.lines().collect();
    assert_eq!(lines.len(), 4, "{seen}");
    for (line, pid) in lines.iter().zip([platform, pb, pr]) {
        assert!(
            line.starts_with(&format!("{pid}=")) && line.ends_with("No such process"),
            "from inside A, process {pid} is there to probe: {line}"
        );
    }
    assert_eq!(
        lines[3], "1=there",
        "A's QEMU is not process 1 of its namespace: {seen}"
    );
    let uids = [uid_of(pa), uid_of(pb), uid_of(pr)];
    assert!(
        uids[0] != uids[1] && uids[1] != uids[2] && uids[0] != uids[2],
        "{uids:?}"
    );

    // Its cgroups are sized from the computer (xs: 1 vCPU, 256 MiB, plus 512 MiB for QEMU).
    let cgroups = cgroup_dirs(pa);
    assert!(
        !cgroups.is_empty(),
        "QEMU is in no stasis cgroup: {}",
        std::fs::read_to_string(format!("/proc/{pa}/cgroup")).unwrap()
    );
    let (vcpus, memory_mib) = (1u64, 256u64);
    let memory_limit = ((memory_mib + 512) << 20).to_string();
    for d in &cgroups {
        let read = |f: &str| std::fs::read_to_string(d.join(f)).ok().map(|s| s.trim().to_string());
        if let Some(quota) = read("cpu.cfs_quota_us") {
            assert_eq!(quota, (vcpus * 100_000).to_string(), "{}", d.display());
        }
        if let Some(limit) = read("memory.limit_in_bytes") {
            assert_eq!(limit, memory_limit, "{}", d.display());
        }
        if let Some(max) = read("cpu.max") {
            assert_eq!(max, format!("{} 100000", vcpus * 100_000));
        }
        if let Some(max) = read("memory.max") {
            assert_eq!(max, memory_limit);
        }
    }

    let machine = |id: &str| data.join("computers").join(id);
    let control = |id: &str| data.join("machines").join(id);
    let own = |id: &str| [machine(id).join("disk.qcow2")];
    let sockets = |id: &str| [control(id).join("qmp.sock"), control(id).join("agent.sock")];
    // What the platform keeps of each machine, its own included: never in sight of a QEMU.
    let controls = |id: &str| {
        [
            control(id).join("console.log"),
            control(id).join("qemu.log"),
            control(id).join("machine.json"),
            control(id).join("qemu.pid"),
        ]
    };
    let memory_dir = std::fs::read_dir("/dev/shm")
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.join(format!("{snap}.memory")).exists())
        .expect("the snapshot's RAM file is in /dev/shm");
    let snapshot_files = [
        memory_dir.join(format!("{snap}.memory")),
        data.join("cache/snapshots").join(&snap).join("disk.raw"),
    ];
    let platform_files = [
        data.join("stasis.db"),
        data.join("default-api-key"),
        data.join("objects"),
        data.join("cache"),
        PathBuf::from(format!("/proc/{pb}/root")),
        PathBuf::from("/proc/self/status"),
        PathBuf::from("/etc/shadow"),
    ];

    // From inside A: none of B's, R's, the snapshot's or the platform's files or sockets.
    let mut forbidden: Vec<String> = Vec::new();
    for id in [&b, &r] {
        forbidden.extend(tries("r", &own(id)));
        forbidden.extend(tries("c", &sockets(id)));
    }
    for id in [&a, &b, &r] {
        forbidden.extend(tries("r", &controls(id)));
    }
    forbidden.extend(tries("c", &sockets(&a)));
    forbidden.extend(tries("r", &snapshot_files));
    forbidden.extend(tries("r", &platform_files));
    // Its own files: the check can tell access from none.
    let allowed: Vec<String> = tries("w", &own(&a));
    let mut all = allowed.clone();
    all.extend(forbidden.iter().cloned());
    let results = probe_inside(pa, &all);
    assert_eq!(results.len(), all.len(), "{results:?}");
    for (path, result) in &results[..allowed.len()] {
        assert_eq!(result, "ok", "A cannot open its own {path}");
    }
    for (path, result) in &results[allowed.len()..] {
        assert_ne!(result, "ok", "from inside A's confinement, {path} opened");
    }
    // What is left of the data directory inside: the path to A's own directory, no more.
    let listed = probe_inside(
        pa,
        &tries("l", &[data.to_path_buf(), data.join("computers"), "/".into()]),
    );
    assert_eq!(listed[0].1, "ok computers", "{listed:?}");
    assert_eq!(listed[1].1, format!("ok {a}"), "{listed:?}");
    // At the top: /usr and its links, a few devices, the loader's cache, and the skeleton
    // of directories leading to the machine's files (here /tmp and /root, home of the cache).
    let top: Vec<&str> = listed[2].1.trim_start_matches("ok ").split(',').collect();
    for name in &top {
        assert!(
            ["bin", "dev", "etc", "lib", "lib64", "root", "sbin", "tmp", "usr"].contains(name),
            "unexpected /{name} inside the jail: {top:?}"
        );
    }
    // A's base disk is readable but not writable (group read only, on a read-only mount).
    let base_disk = read_base_disk(&control(&a));
    let base = probe_inside(
        pa,
        &[tries("r", std::slice::from_ref(&base_disk)), tries("w", &[base_disk])].concat(),
    );
    assert_eq!(base[0].1, "ok", "{base:?}");
    assert!(["EACCES", "EROFS"].contains(&base[1].1.as_str()), "{base:?}");

    // R, restored from B's snapshot, sees that snapshot's files (so the probe can see files
    // that are there) but not B's own.
    let r_results = probe_inside(pr, &[tries("r", &snapshot_files), tries("r", &own(&b))].concat());
    assert!(r_results[..2].iter().all(|(_, res)| res == "ok"), "{r_results:?}");
    assert!(r_results[2..].iter().all(|(_, res)| res != "ok"), "{r_results:?}");
    // It maps the snapshot's RAM privately; on a QEMU that can (8.2 and later, the default
    // install) it cannot write the file, which every clone of the snapshot here reads from.
    if qemu_maps_private_ram_read_only() {
        let cmdline = std::fs::read(format!("/proc/{pr}/cmdline")).unwrap();
        assert!(
            String::from_utf8_lossy(&cmdline).contains("readonly=on,rom=off"),
            "R's RAM is not mapped read-only"
        );
        let w = probe_inside(pr, &tries("w", &snapshot_files[..1]));
        assert!(
            ["EACCES", "EROFS"].contains(&w[0].1.as_str()),
            "R can write its snapshot's RAM file: {w:?}"
        );
    } else {
        eprintln!("QEMU older than 8.2: a restored QEMU's RAM file stays writable (see the README)");
    }

    // Even outside the namespaces, A's user cannot open B's files, nor its own control files.
    let host = probe(
        pa,
        false,
        &[
            tries("r", &own(&b)),
            tries("c", &sockets(&b)),
            tries("r", &controls(&a)),
            tries("c", &sockets(&a)),
        ]
        .concat(),
    );
    assert!(host.iter().all(|(_, res)| res == "EACCES"), "{host:?}");

    // The platform dies; the next one re-attaches A's QEMU, still confined, and deleting A
    // then removes its cgroups all the same.
    server.kill9();
    let server = Server::start(dir.path());
    let api = Client::new(&server.base, Some(&key));
    api.wait_status(&a, "running", common::BOOT);
    assert_eq!(qemu_pid(data, &a), Some(pa), "A's QEMU was not re-attached");
    assert_eq!(out(&api, &a, "echo still-here"), "still-here");
    let deleted = api.call("DELETE", &format!("/computers/{a}"), None);
    assert!(deleted.status < 300, "{}", deleted.body);
    let t = std::time::Instant::now();
    while cgroups.iter().any(|d| d.exists()) {
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "cgroups left behind: {cgroups:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Whether the installed QEMU is 8.2 or later (`memory-backend-file,readonly=on,rom=off`).
fn qemu_maps_private_ram_read_only() -> bool {
    let out = Command::new("qemu-system-x86_64").arg("--version").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let version = text.split("version ").nth(1).unwrap_or("");
    let mut parts = version.split(|c: char| !c.is_ascii_digit());
    let major: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let minor: u32 = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    (major, minor) >= (8, 2)
}

/// The raw base disk under a machine's overlay, from its machine.json.
fn read_base_disk(machine: &Path) -> PathBuf {
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(machine.join("machine.json")).unwrap()).unwrap();
    PathBuf::from(config["base_disk"].as_str().unwrap())
}
