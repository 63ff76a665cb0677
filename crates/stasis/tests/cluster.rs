//! End to end on several hosts: a control plane on a real PostgreSQL server and a real S3
//! server (started by `scripts/services`), and two hosts with their own data dirs and ports.
//! A computer made on one host is snapshotted and restored on the other, which reads only
//! from S3; S3 is unreachable for a while during an upload; the control plane is killed
//! during an upload; a host is killed and its computers turn `error` while its snapshots
//! restore on the other host.
//!
//! The cluster talks mutual TLS: the security checks here are that a heartbeat answer holds
//! no secret, that a host's certificate heartbeats only as that host, that hosts serve
//! neither plain HTTP nor anyone but the control plane (user keys included) nor requests for
//! another host's computers, that a lost host's computer is refused rather than booted on the
//! control plane, and that a ticket stream through the control plane follows the host's
//! events to the end.

mod common;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::backends::{pg_database, s3_env, S3};
use common::{data_dir, free_port, out, restore, running_computer, snapshot, Client, Server, BIN, SNAP};
use serde_json::{json, Value};

const HOST_TIMEOUT_SECS: u64 = 6;

fn stasis(args: &[&str]) -> std::process::Output {
    Command::new(BIN).args(args).output().unwrap()
}

/// A cluster CA with the control plane's credentials and hosts a and b's.
fn credentials(dir: &Path) -> PathBuf {
    let d = dir.to_str().unwrap();
    for args in [
        vec!["cluster", "init", "--dir", d],
        vec!["cluster", "add-host", "--dir", d, "--name", "a"],
        vec!["cluster", "add-host", "--dir", d, "--name", "b"],
    ] {
        let out = stasis(&args);
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    dir.to_path_buf()
}

/// The control plane, on ports it keeps across restarts (hosts know it by its URL).
fn control_plane(dir: &Path, port: u16, cluster_port: u16, creds: &Path, db: &str, s3: &S3) -> Server {
    let mut args: Vec<String> = ["serve", "--listen", &format!("127.0.0.1:{port}"), "--database-url", db]
        .map(String::from)
        .to_vec();
    args.extend([
        "--cluster-credentials".to_string(),
        creds.join("control-plane").display().to_string(),
        "--cluster-listen".to_string(),
        format!("127.0.0.1:{cluster_port}"),
        "--host-timeout-secs".to_string(),
        HOST_TIMEOUT_SECS.to_string(),
    ]);
    args.extend(s3.serve_args());
    Server::spawn(dir, &args, &s3_env())
}

/// A host with its own credentials, configured with the database and store itself.
fn host(dir: &Path, name: &str, cluster_port: u16, creds: &Path, db: &str, s3: &S3) -> Server {
    let mut args: Vec<String> = [
        "host",
        "--control-plane",
        &format!("https://127.0.0.1:{cluster_port}"),
        "--listen",
        "127.0.0.1:0",
        "--database-url",
        db,
    ]
    .map(String::from)
    .to_vec();
    args.extend([
        "--cluster-credentials".to_string(),
        creds.join("hosts").join(name).display().to_string(),
    ]);
    args.extend(s3.serve_args());
    Server::spawn(dir, &args, &s3_env())
}

/// An HTTPS client that trusts the cluster CA and presents the credentials in `identity`
/// (none: no client certificate).
struct Tls {
    rt: tokio::runtime::Runtime,
    http: reqwest::Client,
}

impl Tls {
    fn new(creds: &Path, identity: Option<&Path>) -> Tls {
        let ca = std::fs::read(creds.join("ca.pem")).unwrap();
        let mut b = reqwest::Client::builder()
            .use_rustls_tls()
            .tls_built_in_root_certs(false)
            .add_root_certificate(reqwest::Certificate::from_pem(&ca).unwrap())
            .timeout(SNAP + Duration::from_secs(60));
        if let Some(dir) = identity {
            let mut pem = std::fs::read(dir.join("cert.pem")).unwrap();
            pem.extend(std::fs::read(dir.join("key.pem")).unwrap());
            b = b.identity(reqwest::Identity::from_pem(&pem).unwrap());
        }
        Tls {
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            http: b.build().unwrap(),
        }
    }

    /// Status and body, or the connection's error.
    fn call(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: Option<Value>,
    ) -> Result<(u16, String), String> {
        let mut req = self
            .http
            .request(reqwest::Method::from_bytes(method.as_bytes()).unwrap(), url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        self.rt.block_on(async {
            let resp = req.send().await.map_err(|e| format!("{e:?}"))?;
            let status = resp.status().as_u16();
            Ok((status, resp.text().await.map_err(|e| format!("{e:?}"))?))
        })
    }
}

/// What a plain-HTTP request to a TLS port gets back (never an HTTP answer).
fn plain_http(url: &str) -> String {
    let addr = url.trim_start_matches("https://").trim_end_matches('/');
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.write_all(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    String::from_utf8_lossy(&got).to_string()
}

fn psql(db: &str, sql: &str) -> String {
    let out = Command::new("psql").args([db, "-tAc", sql]).output().unwrap();
    assert!(out.status.success(), "psql: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Processes whose parent is `pid`, by command name.
fn children(pid: u32) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let Some((name, rest)) = stat.split_once(") ") else {
            continue;
        };
        let ppid: u32 = rest.split_whitespace().nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
        if ppid == pid {
            out.push(name.rsplit('(').next().unwrap_or("").to_string());
        }
    }
    out
}

/// Entries of a directory (none if it is missing).
fn entries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect()
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
    let (cp_dir, a_dir, b_dir, creds_dir) = (data_dir(), data_dir(), data_dir(), data_dir());
    let creds = credentials(&creds_dir.path().join("cluster"));
    let db = pg_database(cp_dir.path());
    let s3 = S3::bucket_for(cp_dir.path());
    let (port, cluster_port) = (free_port(), free_port());
    let mut cp = control_plane(cp_dir.path(), port, cluster_port, &creds, &db, &s3);
    let mut hosts = [
        host(a_dir.path(), "a", cluster_port, &creds, &db, &s3),
        host(b_dir.path(), "b", cluster_port, &creds, &db, &s3),
    ];
    let key = common::create_key_in(cp_dir.path(), "default", Some(&db));
    let api = Client::new(&cp.base, Some(&key));
    let cluster_url = format!("https://127.0.0.1:{cluster_port}");
    let host_url = |name: &str| {
        if name == "a" {
            hosts[0].base.clone()
        } else {
            hosts[1].base.clone()
        }
    };
    let as_a = Tls::new(&creds, Some(&creds.join("hosts/a")));
    let as_b = Tls::new(&creds, Some(&creds.join("hosts/b")));
    let as_cp = Tls::new(&creds, Some(&creds.join("control-plane")));
    let anonymous = Tls::new(&creds, None);

    // Each host says what it runs (its QEMU release, KVM, CPU model), which restores are
    // placed by.
    let said = common::wait_until("both hosts to report their machines", Duration::from_secs(30), || {
        let said = psql(&db, "SELECT machine FROM hosts WHERE machine IS NOT NULL ORDER BY id");
        (said.lines().count() == 2).then_some(said)
    });
    for line in said.lines() {
        let m: Value = serde_json::from_str(line).unwrap();
        assert!(m["qemu"]["major"].as_u64().is_some() && m["kvm"].is_boolean(), "{m}");
    }

    // (5) A heartbeat's answer holds no secret: not the database's password, nor its URL.
    // (The test server's URL may have no password; then the URL itself must not show.)
    let password = db
        .split_once("://")
        .and_then(|(_, rest)| rest.split_once('@'))
        .and_then(|(auth, _)| auth.split_once(':'))
        .map(|(_, p)| p.to_string())
        .unwrap_or_else(|| db.clone());
    let a_url = host_url("a");
    let beat = |id: &str| json!({"id": id, "url": a_url, "capacity_mib": 4096, "vcpus": 2});
    let (status, answer) = as_a
        .call(
            "POST",
            &format!("{cluster_url}/internal/v1/hosts/heartbeat"),
            &[],
            Some(beat("a")),
        )
        .unwrap();
    assert_eq!(status, 200, "{answer}");
    assert!(
        !answer.contains(&password) && !answer.contains("postgres") && !answer.contains("s3"),
        "a heartbeat answer leaks the backends: {answer}"
    );
    // A host's certificate heartbeats only as that host: no taking over b's id (and requests).
    let (status, answer) = as_a
        .call(
            "POST",
            &format!("{cluster_url}/internal/v1/hosts/heartbeat"),
            &[],
            Some(beat("b")),
        )
        .unwrap();
    assert_eq!(status, 403, "host a's credential heartbeats as b: {answer}");
    assert_eq!(
        psql(&db, "SELECT url FROM hosts WHERE id = 'b'"),
        host_url("b"),
        "b's URL is b's own"
    );
    // Without a certificate there is no heartbeat, and the public port takes none at all.
    assert!(anonymous
        .call(
            "POST",
            &format!("{cluster_url}/internal/v1/hosts/heartbeat"),
            &[],
            Some(beat("a"))
        )
        .is_err());
    assert_eq!(
        Client::new(cp.base.trim_end_matches("/api/v1"), Some(&key))
            .call("POST", "/internal/v1/hosts/heartbeat", Some(beat("a")))
            .status,
        404,
        "the public listener serves no heartbeat"
    );
    // Neither a host nor the cluster listener speaks plain HTTP.
    for url in [host_url("a"), cluster_url.clone()] {
        let got = plain_http(&url);
        assert!(!got.starts_with("HTTP/1.1 200"), "plain HTTP served at {url}: {got}");
    }

    // A computer on one host ("first"), with a file and a counter in memory.
    let first = running_computer(&api, "roamer");
    let home = runs_on(&first, a_dir.path(), b_dir.path());
    let away = if home == "a" { "b" } else { "a" };

    // (6) A host serves only the control plane: not a user's key, not a tenant header from
    // another member of the cluster, not a client without a certificate.
    let tenant = psql(&db, "SELECT id FROM tenants WHERE name = 'default'");
    let auth = format!("Bearer {key}");
    let get_first = format!("{}/api/v1/computers/{first}", host_url(home));
    for (who, client, headers) in [
        ("a user key", &as_b, vec![("authorization", auth.as_str())]),
        ("a host as a tenant", &as_b, vec![("x-stasis-tenant", tenant.as_str())]),
        (
            "a host's key and tenant",
            &as_a,
            vec![("authorization", auth.as_str()), ("x-stasis-tenant", tenant.as_str())],
        ),
    ] {
        let (status, body) = client.call("GET", &get_first, &headers, None).unwrap();
        assert!(status == 401 || status == 403, "{who} on a host: {status} {body}");
    }
    assert!(
        anonymous
            .call("GET", &get_first, &[("authorization", auth.as_str())], None)
            .is_err(),
        "a host takes no connection without a cluster certificate"
    );
    // The control plane itself is served, for the host's own computers only: the other host
    // refuses to stop this one (which would mark it stopped while its QEMU runs on).
    let as_tenant = [("x-stasis-tenant", tenant.as_str())];
    let (status, body) = as_cp.call("GET", &get_first, &as_tenant, None).unwrap();
    assert_eq!(status, 200, "{body}");
    let (status, body) = as_cp
        .call(
            "POST",
            &format!("{}/api/v1/computers/{first}/stop", host_url(away)),
            &as_tenant,
            None,
        )
        .unwrap();
    assert_eq!(status, 409, "another host's computer: {body}");
    assert!(body.contains("WRONG_HOST"), "{body}");
    assert_eq!(api.status(&first).0, "running");

    // (L4) Room for one more computer, asked for on both hosts at once: each host's own
    // admission lock does not see the other's, the database's does, and one is let in.
    psql(
        &db,
        &format!("UPDATE tenants SET max_computers = 2 WHERE id = '{tenant}'"),
    );
    // Hosts keep a tenant's limits for OVERRIDES_FOR after reading them; no answer tells
    // which they hold, so wait until every copy read before the update has expired.
    std::thread::sleep(stasis_server::limits::OVERRIDES_FOR + Duration::from_millis(500));
    let racers: Vec<_> = (0..4)
        .map(|i| {
            let (creds, url, tenant) = (
                creds.clone(),
                host_url(if i % 2 == 0 { "a" } else { "b" }),
                tenant.clone(),
            );
            std::thread::spawn(move || {
                Tls::new(&creds, Some(&creds.join("control-plane")))
                    .call(
                        "POST",
                        &format!("{url}/api/v1/computers"),
                        &[("x-stasis-tenant", tenant.as_str())],
                        Some(json!({"name": format!("racer-{i}"), "size": "xs"})),
                    )
                    .unwrap()
            })
        })
        .collect();
    let answers: Vec<(u16, String)> = racers.into_iter().map(|t| t.join().unwrap()).collect();
    let admitted: Vec<&(u16, String)> = answers.iter().filter(|(s, _)| *s == 201).collect();
    assert_eq!(admitted.len(), 1, "creates on two hosts past the quota: {answers:?}");
    for (status, body) in answers.iter().filter(|(s, _)| *s != 201) {
        assert!(
            *status == 403 && body.contains("computers running (2 of 2)"),
            "{status} {body}"
        );
    }
    let racer: Value = serde_json::from_str(&admitted[0].1).unwrap();
    let racer = racer["id"].as_str().unwrap().to_string();
    api.wait_status(&racer, "running", common::BOOT);
    let gone = api.call("DELETE", &format!("/computers/{racer}"), None);
    assert!(gone.status < 300, "{}", gone.body);
    psql(
        &db,
        &format!("UPDATE tenants SET max_computers = NULL WHERE id = '{tenant}'"),
    );
    out(
        &api,
        &first,
        "echo before > /root/before; nohup bash -c 'i=0; while true; do i=$((i+1)); echo $i > /dev/shm/count; \
         sleep 0.2; done' >/dev/null 2>&1 & sleep 1; echo started",
    );
    // S3 goes away for a while during the upload: the host retries, and the snapshot is
    // ready once S3 is back (and every chunk is there: the restore below verifies each one).
    let snap = snapshot(&api, &first, "to move");
    // (L3) A browser's stream, with a ticket, through the control plane: it follows the
    // host's events to the final one, and ends.
    let ticket = api.call("POST", "/sse/ticket", None).body["ticket"]
        .as_str()
        .unwrap()
        .to_string();
    let stream = {
        let url = format!("{}/computers/{first}/snapshots/{snap}/events?ticket={ticket}", cp.base);
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                let http = reqwest::Client::builder()
                    .timeout(SNAP + Duration::from_secs(30))
                    .build()
                    .unwrap();
                let resp = http.get(url).send().await.expect("the stream starts");
                (
                    resp.status().as_u16(),
                    resp.text().await.expect("the stream ends by itself"),
                )
            })
        })
    };
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
    common::holds_for(
        "an unreachable store is retried, not given up on at once",
        Duration::from_secs(4),
        || {
            api.call("GET", &format!("/computers/{first}/snapshots/{snap}"), None)
                .body["data"]["status"]
                == "uploading"
        },
    );
    s3.proxy.set_down(false);
    let data = api.wait_snapshot(&first, &snap, "ready", SNAP);
    assert_eq!(data["s3_bucket"], s3.bucket.as_str());
    let (status, events) = stream.join().expect("the ticket stream ends by itself");
    assert_eq!(status, 200, "{events}");
    assert!(
        events.contains("event: snapshot_uploading"),
        "the host's progress: {events}"
    );
    assert!(events.contains("event: snapshot_ready"), "and its end: {events}");
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
    common::wait_until(
        "the restored counter to keep counting on its own",
        Duration::from_secs(20),
        || (counter(&api, &moved) > continued).then_some(()),
    );
    assert_eq!(
        out(&api, &moved, "cat /root/before; ls /root/after 2>/dev/null; echo"),
        "before"
    );

    // A port of the restored computer, on the other host, reached through the control plane
    // in both forms.
    assert_eq!(
        out(
            &api,
            &moved,
            "mkdir -p /srv && echo served-from-the-other-host > /srv/x.txt && cd /srv && \
             (setsid nohup python3 -m http.server 8000 >/dev/null 2>&1 &) && \
             for i in $(seq 100); do (echo > /dev/tcp/127.0.0.1/8000) 2>/dev/null && echo up && break; sleep 0.1; done"
        ),
        "up"
    );
    let listener = format!("127.0.0.1:{port}");
    let bearer = format!("Bearer {key}");
    let (status, _, body) = common::request(
        &cp.base,
        &listener,
        &format!("/api/v1/computers/{moved}/ports/8000/proxy/x.txt"),
        &[("Authorization", &bearer)],
    );
    assert_eq!((status, body.as_str()), (200, "served-from-the-other-host"));
    let r = api.call(
        "POST",
        &format!("/computers/{moved}/ports"),
        Some(serde_json::json!({"port": 8000, "visibility": "public"})),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let url = r.body["url"].as_str().unwrap().to_string();
    let preview_host = url.trim_start_matches("http://").trim_end_matches('/').to_string();
    assert_eq!(preview_host.rsplit_once(':').unwrap().1, port.to_string(), "{url}");
    let (status, _, body) = common::request(&cp.base, &preview_host, "/x.txt", &[]);
    assert_eq!((status, body.as_str()), (200, "served-from-the-other-host"));

    // The control plane dies during an upload: the host finishes it; after a restart the
    // snapshot is ready (or failed), never stuck.
    let during = snapshot(&api, &first, "control plane dies");
    cp.kill9();
    let cp = control_plane(cp_dir.path(), port, cluster_port, &creds, &db, &s3);
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
    // (7) Its computer is not booted on the control plane: start and restart are refused.
    for action in ["start", "restart"] {
        let r = api.call("POST", &format!("/computers/{first}/{action}"), None);
        assert_eq!(r.status, 503, "{action} with the host lost: {}", r.body);
        assert!(
            r.body["error"]["message"].as_str().unwrap().contains("is unavailable"),
            "{}",
            r.body
        );
    }
    common::holds_for("the lost host's computer staying error", Duration::from_secs(2), || {
        api.status(&first).0 == "error"
    });
    assert!(
        entries(&cp_dir.path().join("computers")).is_empty() && entries(&cp_dir.path().join("machines")).is_empty(),
        "the control plane holds machines: {:?} {:?}",
        entries(&cp_dir.path().join("computers")),
        entries(&cp_dir.path().join("machines"))
    );
    let spawned = children(cp.child.id());
    assert!(
        !spawned.iter().any(|c| c.contains("qemu")),
        "the control plane runs {spawned:?}"
    );
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

    // A computer of the lost host can still be deleted (nothing of it needs the host); the
    // host, when it is back, finds it gone and removes its QEMU and its files.
    let gone = api.call("DELETE", &format!("/computers/{first}"), None);
    assert_eq!(gone.status, 200, "deleting a lost host's computer: {}", gone.body);
    assert_eq!(api.call("GET", &format!("/computers/{first}"), None).status, 404);
    let stray = common::qemu_pid(doomed_dir, &first);
    let back = host(
        doomed_dir,
        if doomed == 0 { "a" } else { "b" },
        cluster_port,
        &creds,
        &db,
        &s3,
    );
    let t = Instant::now();
    while doomed_dir.join("computers").join(&first).exists() || doomed_dir.join("machines").join(&first).exists() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the returning host kept a deleted computer's files"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    if let Some(pid) = stray {
        assert!(
            !common::alive(pid),
            "the returning host left the deleted computer's QEMU running"
        );
    }
    drop(back);
    // Nor any cgroup of the killed host: the returning one swept them at start, removed the
    // deleted computer's with its QEMU, and its own when it stopped.
    let left = common::cgroups_left(doomed_dir);
    assert!(left.is_empty(), "the killed host's cgroups are still there: {left:?}");

    // The dead host's machines are nobody's now: stop them as its next start would.
    for entry in std::fs::read_dir(doomed_dir.join("machines"))
        .into_iter()
        .flatten()
        .flatten()
    {
        if let Some(pid) = common::qemu_pid(doomed_dir, &entry.file_name().to_string_lossy()) {
            let _ = rustix::process::kill_process(
                rustix::process::Pid::from_raw(pid).expect("a live pid"),
                rustix::process::Signal::KILL,
            );
        }
    }
    // Every platform stopped (the control plane killed once, then restarted), nothing of any
    // is left in the cgroup hierarchies.
    drop(hosts);
    drop(cp);
    for dir in [cp_dir.path(), a_dir.path(), b_dir.path()] {
        let left = common::cgroups_left(dir);
        assert!(left.is_empty(), "cgroups left behind: {left:?}");
    }
}

/// Plain HTTP between control plane and hosts only when asked for, and then with a long
/// token; credentials are refused where they are not a host's. No services needed: each is
/// refused before any is reached.
#[test]
fn the_cluster_refuses_plain_http_and_short_tokens() {
    let dir = data_dir();
    let creds = credentials(&dir.path().join("cluster"));
    let d = dir.path().display().to_string();
    let backends = [
        "--database-url",
        "postgres://x:y@127.0.0.1:1/x",
        "--store-url",
        "s3://x",
        "--data-dir",
        &d,
    ];
    let a = creds.join("hosts/a").display().to_string();
    let cp = creds.join("control-plane").display().to_string();
    let long = "t".repeat(40);
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec![
                "host",
                "--control-plane",
                "http://127.0.0.1:1",
                "--cluster-credentials",
                &a,
            ],
            "https://",
        ),
        (
            vec![
                "host",
                "--control-plane",
                "https://127.0.0.1:1",
                "--cluster-credentials",
                &a,
                "--advertise-url",
                "http://127.0.0.1:2",
            ],
            "https://",
        ),
        (
            vec![
                "host",
                "--control-plane",
                "http://127.0.0.1:1",
                "--cluster-token",
                &long,
            ],
            "--insecure-plain-http",
        ),
        (
            vec![
                "host",
                "--control-plane",
                "http://127.0.0.1:1",
                "--cluster-token",
                "short",
                "--insecure-plain-http",
            ],
            "at least 32",
        ),
        // The control plane's credentials are no host's.
        (
            vec![
                "host",
                "--control-plane",
                "https://127.0.0.1:1",
                "--cluster-credentials",
                &cp,
            ],
            "no host's credentials",
        ),
    ];
    for (mut args, wanted) in cases {
        args.extend(backends);
        let out = stasis(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(wanted), "{args:?}: {err}");
    }
    for (args, wanted) in [
        (vec!["serve", "--cluster-token", &long], "--insecure-plain-http"),
        (
            vec!["serve", "--cluster-token", "short", "--insecure-plain-http"],
            "at least 32",
        ),
        (vec!["serve", "--cluster-credentials", "/nonexistent"], "/nonexistent"),
    ] {
        let mut args = args.clone();
        args.extend(["--data-dir", &d]);
        let out = stasis(&args);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(wanted), "{args:?}: {err}");
    }
    // Credentials are made once.
    let again = stasis(&["cluster", "add-host", "--dir", creds.to_str().unwrap(), "--name", "a"]);
    assert!(!again.status.success());
    let bad = stasis(&[
        "cluster",
        "add-host",
        "--dir",
        creds.to_str().unwrap(),
        "--name",
        "Bad_Name",
    ]);
    assert!(!bad.status.success() && String::from_utf8_lossy(&bad.stderr).contains("--name"));
}
