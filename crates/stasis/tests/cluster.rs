//! End to end on several hosts: a control plane on a real PostgreSQL server and a real S3
//! server (started by `scripts/services`), and two hosts with their own data dirs and ports.
//! A computer made on one host is snapshotted and restored on the other, which reads only
//! from S3; S3 is unreachable for a while during an upload; the control plane is killed
//! during an upload; a host is killed and its computers turn `error` while its snapshots
//! restore on the other host.

mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use common::backends::{pg_database, s3_env, S3};
use common::{data_dir, out, restore, running_computer, snapshot, Client, Server, SNAP};

const TOKEN: &str = "cluster-test-token";
const HOST_TIMEOUT_SECS: u64 = 6;

/// The control plane, on a port it keeps across restarts (hosts know it by its URL).
fn control_plane(dir: &Path, port: u16, db: &str, s3: &S3) -> Server {
    let listen = format!("127.0.0.1:{port}");
    let mut args: Vec<String> = [
        "serve",
        "--listen",
        &listen,
        "--database-url",
        db,
        "--cluster-token",
        TOKEN,
    ]
    .map(String::from)
    .to_vec();
    args.extend(["--host-timeout-secs".to_string(), HOST_TIMEOUT_SECS.to_string()]);
    args.extend(s3.serve_args());
    Server::spawn(dir, &args, &s3_env())
}

fn host(dir: &Path, control_plane: &str) -> Server {
    let cp = control_plane.trim_end_matches("/api/v1");
    let args: Vec<String> = [
        "host",
        "--control-plane",
        cp,
        "--cluster-token",
        TOKEN,
        "--listen",
        "127.0.0.1:0",
    ]
    .map(String::from)
    .to_vec();
    Server::spawn(dir, &args, &s3_env())
}

/// Which host's data dir runs a computer's machine.
fn runs_on(id: &str, a: &Path, b: &Path) -> &'static str {
    match (
        a.join("computers").join(id).exists(),
        b.join("computers").join(id).exists(),
    ) {
        (true, false) => "a",
        (false, true) => "b",
        other => panic!("computer {id} is on neither or both hosts: {other:?}"),
    }
}

fn counter(api: &Client, id: &str) -> u64 {
    out(api, id, "cat /dev/shm/count").parse().unwrap()
}

#[test]
fn snapshots_move_between_hosts_and_survive_lost_processes() {
    let (cp_dir, a_dir, b_dir) = (data_dir(), data_dir(), data_dir());
    let db = pg_database(cp_dir.path());
    let s3 = S3::bucket_for(cp_dir.path());
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut cp = control_plane(cp_dir.path(), port, &db, &s3);
    let mut hosts = [host(a_dir.path(), &cp.base), host(b_dir.path(), &cp.base)];
    let key = common::create_key_in(cp_dir.path(), "default", Some(&db));
    let api = Client::new(&cp.base, Some(&key));

    // A computer on one host ("first"), with a file and a counter in memory.
    let first = running_computer(&api, "roamer");
    let home = runs_on(&first, a_dir.path(), b_dir.path());
    out(
        &api,
        &first,
        "echo before > /root/before; nohup bash -c 'i=0; while true; do i=$((i+1)); echo $i > /dev/shm/count; \
         sleep 0.2; done' >/dev/null 2>&1 & sleep 1; echo started",
    );
    // S3 goes away for a while during the upload: the host retries, and the snapshot is
    // ready once S3 is back (and every chunk is there: the restore below verifies each one).
    let snap = snapshot(&api, &first, "to move");
    let t = Instant::now();
    while api
        .call("GET", &format!("/computers/{first}/snapshots/{snap}"), None)
        .body["data"]["status"]
        != "uploading"
    {
        assert!(t.elapsed() < SNAP, "the upload never started");
        std::thread::sleep(Duration::from_millis(20));
    }
    s3.proxy.set_down(true);
    std::thread::sleep(Duration::from_secs(4));
    assert_eq!(
        api.call("GET", &format!("/computers/{first}/snapshots/{snap}"), None)
            .body["data"]["status"],
        "uploading",
        "an unreachable store is retried, not given up on at once"
    );
    s3.proxy.set_down(false);
    let data = api.wait_snapshot(&first, &snap, "ready", SNAP);
    assert_eq!(data["s3_bucket"], s3.bucket.as_str());
    out(&api, &first, "echo after > /root/after");

    // Restored through the control plane: it lands on the other host, which has more room,
    // and which has never seen the snapshot, so everything comes from S3.
    let moved = restore(&api, &first, &snap);
    api.wait_status(&moved, "running", SNAP);
    let other = runs_on(&moved, a_dir.path(), b_dir.path());
    assert_ne!(home, other, "the restore lands on the other host");
    // The counter had counted for a second (5 steps) before the snapshot; the original has
    // gone on counting since, through the whole upload.
    let continued = counter(&api, &moved);
    let original = counter(&api, &first);
    assert!(
        continued >= 5 && continued < original,
        "restored counter {continued} continues from the snapshot (original now {original})"
    );
    std::thread::sleep(Duration::from_millis(1500));
    assert!(counter(&api, &moved) > continued, "and keeps counting on its own");
    assert_eq!(
        out(&api, &moved, "cat /root/before; ls /root/after 2>/dev/null; echo"),
        "before"
    );

    // The control plane dies during an upload: the host finishes it; after a restart the
    // snapshot is ready (or failed), never stuck.
    let during = snapshot(&api, &first, "control plane dies");
    cp.kill9();
    let cp = control_plane(cp_dir.path(), port, &db, &s3);
    let api = Client::new(&cp.base, Some(&key));
    let t = Instant::now();
    let status = loop {
        let d = api
            .call("GET", &format!("/computers/{first}/snapshots/{during}"), None)
            .body["data"]
            .clone();
        if d["status"] == "ready" || d["status"] == "failed" {
            break d["status"].as_str().unwrap().to_string();
        }
        assert!(t.elapsed() < SNAP, "snapshot stuck in {}", d["status"]);
        std::thread::sleep(Duration::from_millis(200));
    };
    eprintln!("the snapshot taken while the control plane died is {status}");
    assert_eq!(out(&api, &first, "echo alive"), "alive", "the hosts kept running");

    // The first computer's host dies: its computers turn error within the heartbeat timeout,
    // and its snapshot restores on the surviving host.
    let (doomed, doomed_dir, survivor_dir) = if home == "a" {
        (0, a_dir.path(), b_dir.path())
    } else {
        (1, b_dir.path(), a_dir.path())
    };
    hosts[doomed].kill9();
    let t = Instant::now();
    let body = api.wait_status(&first, "error", Duration::from_secs(HOST_TIMEOUT_SECS + 20));
    let lost_after = t.elapsed();
    assert!(
        lost_after <= Duration::from_secs(HOST_TIMEOUT_SECS + 3),
        "marked after {lost_after:?}"
    );
    assert!(body["error"].as_str().unwrap().contains("host lost"), "{body}");
    let again = restore(&api, &first, &snap);
    api.wait_status(&again, "running", SNAP);
    assert!(
        survivor_dir.join("computers").join(&again).exists(),
        "restored on the survivor"
    );
    assert_eq!(
        out(&api, &again, "cat /root/before; ls /root/after 2>/dev/null; echo"),
        "before"
    );
    assert!(counter(&api, &again) > 0);

    // The dead host's machines are nobody's now: stop them as its next start would.
    for entry in std::fs::read_dir(doomed_dir.join("machines"))
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Some(pid) = common::qemu_pid(doomed_dir, &entry.file_name().to_string_lossy()) {
            // SAFETY: kill takes no pointers.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
    }
}
