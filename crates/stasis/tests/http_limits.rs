//! The listener's limits and the low-severity fixes of the audit, attacked over HTTP on the
//! real server (127.0.0.1 only, no guests booted): half-sent and idle connections are closed
//! after the header timeout, a body sent a byte at a time gets 408 after the body timeout,
//! connections over the cap are closed at once, a burst of bogus
//! keys ends in 429, shutdown does not wait for open streams, long requests are capped per
//! tenant, the default key is printed only when made, revoked keys answer 401, another
//! tenant's snapshot is indistinguishable from a missing one, SSE tickets open only their
//! snapshot, and clients cannot choose their request id.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{create_key, data_dir, Server};
use serde_json::Value;

/// Waits (bounded) for the server to close `conn`: true if it did within `limit`.
fn closed_within(conn: &mut TcpStream, limit: Duration) -> bool {
    conn.set_read_timeout(Some(Duration::from_millis(200))).unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 4096];
    while start.elapsed() < limit {
        match conn.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {}
            Err(_) => return true, // reset
        }
    }
    false
}

/// How many connections on its listening port `server` holds open now: sockets among its file
/// descriptors that `/proc/<pid>/net/tcp*` shows on that port and not listening. A connection
/// counts from the moment the server accepts it until it closes it, as the cap does.
fn server_connections(server: &Server) -> usize {
    let pid = server.child.id();
    let port = server.host().rsplit(':').next().unwrap().parse::<u16>().unwrap();
    let inodes: std::collections::HashSet<String> = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| {
            let l = l.to_string_lossy();
            Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
        })
        .collect();
    ["tcp", "tcp6"]
        .iter()
        .filter_map(|t| std::fs::read_to_string(format!("/proc/{pid}/net/{t}")).ok())
        .flat_map(|table| {
            table
                .lines()
                .skip(1)
                .map(|l| l.split_whitespace().map(str::to_string).collect::<Vec<_>>())
                .collect::<Vec<_>>()
        })
        .filter(|f| {
            f.len() > 9
                && f[1].rsplit(':').next().and_then(|p| u16::from_str_radix(p, 16).ok()) == Some(port)
                && f[3] != "0A" // LISTEN
                && inodes.contains(&f[9])
        })
        .count()
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

fn get(
    base: &str,
    path: &str,
    key: Option<&str>,
    headers: &[(&str, &str)],
) -> (u16, reqwest::header::HeaderMap, Value) {
    rt().block_on(async {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(30))
            .pool_max_idle_per_host(0)
            .build()
            .unwrap();
        let mut req = http.get(format!("{base}{path}"));
        if let Some(k) = key {
            req = req.bearer_auth(k);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = req.send().await.expect("the server answers");
        let status = resp.status().as_u16();
        let h = resp.headers().clone();
        let body = resp.json().await.unwrap_or(Value::Null);
        (status, h, body)
    })
}

/// Waits (bounded) until /health answers.
fn wait_health(base: &str, limit: Duration) -> bool {
    let start = Instant::now();
    while start.elapsed() < limit {
        let ok = rt().block_on(async {
            let http = reqwest::Client::builder()
                .timeout(Duration::from_secs(2))
                .pool_max_idle_per_host(0)
                .build()
                .unwrap();
            http.get(format!("{base}/health"))
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
        });
        if ok {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

#[test]
fn half_sent_and_idle_connections_are_closed_after_the_header_timeout() {
    let dir = data_dir();
    let server = Server::start_with(dir.path(), &[("STASIS_HEADER_TIMEOUT_SECS", "2")]);
    assert!(wait_health(&server.base, Duration::from_secs(30)));
    // Half a request line, then nothing (slowloris).
    let mut half = TcpStream::connect(server.host()).unwrap();
    half.write_all(b"GET /api/v1/health HT").unwrap();
    // Nothing at all.
    let mut silent = TcpStream::connect(server.host()).unwrap();
    // One request answered, then the connection kept alive and idle.
    let mut idle = TcpStream::connect(server.host()).unwrap();
    idle.write_all(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut first = [0u8; 12];
    idle.read_exact(&mut first).unwrap();
    assert_eq!(&first, b"HTTP/1.1 200");
    let start = Instant::now();
    assert!(
        closed_within(&mut half, Duration::from_secs(10)),
        "half-sent request kept open"
    );
    assert!(
        closed_within(&mut silent, Duration::from_secs(10)),
        "silent connection kept open"
    );
    assert!(
        closed_within(&mut idle, Duration::from_secs(10)),
        "idle keep-alive connection kept open"
    );
    assert!(start.elapsed() < Duration::from_secs(10));
}

#[test]
fn a_body_sent_a_byte_at_a_time_gets_408_after_the_body_timeout() {
    let dir = data_dir();
    let key = create_key(dir.path(), "slow");
    let server = Server::start_with(dir.path(), &[("STASIS_BODY_TIMEOUT_SECS", "2")]);
    assert!(wait_health(&server.base, Duration::from_secs(30)));
    // An authenticated create whose 100-byte body trickles in: a byte now and then, each well
    // within the header timeout, never finishing.
    let mut slow = TcpStream::connect(server.host()).unwrap();
    slow.write_all(
        format!(
            "POST /api/v1/computers HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\
             Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{{"
        )
        .as_bytes(),
    )
    .unwrap();
    let start = Instant::now();
    let writer = {
        let mut w = slow.try_clone().unwrap();
        std::thread::spawn(move || {
            for _ in 0..20 {
                // The attack's pace (a byte every half second), not synchronisation.
                std::thread::sleep(Duration::from_millis(500));
                if w.write_all(b" ").is_err() {
                    break;
                }
            }
        })
    };
    slow.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    let mut answer = Vec::new();
    let _ = slow.read_to_end(&mut answer);
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let took = start.elapsed();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(
        answer.contains("REQUEST_TIMEOUT") && answer.contains("within 2 s"),
        "{answer}"
    );
    assert!(took < Duration::from_secs(6), "answered after {took:?}");
    let _ = writer.join();
    // Nothing was created, and the server serves on.
    let (status, _, body) = get(&server.base, "/computers", Some(&key), &[]);
    assert_eq!(status, 200);
    assert_eq!(body["total"], 0, "{body}");
}

#[test]
fn connections_over_the_cap_are_closed_at_once_and_the_server_recovers() {
    let dir = data_dir();
    let server = Server::start_with(
        dir.path(),
        &[("STASIS_MAX_CONNECTIONS", "8"), ("STASIS_HEADER_TIMEOUT_SECS", "3")],
    );
    assert!(wait_health(&server.base, Duration::from_secs(30)));
    common::wait_until(
        "the health checks' connections to be closed",
        Duration::from_secs(30),
        || (server_connections(&server) == 0).then_some(()),
    );
    let mut held: Vec<TcpStream> = (0..8)
        .map(|_| {
            let mut c = TcpStream::connect(server.host()).unwrap();
            c.write_all(b"GET / HT").unwrap();
            c
        })
        .collect();
    common::wait_until(
        "the server to take the 8 held connections",
        Duration::from_secs(30),
        || (server_connections(&server) == 8).then_some(()),
    );
    let mut over = TcpStream::connect(server.host()).unwrap();
    let start = Instant::now();
    assert!(
        closed_within(&mut over, Duration::from_secs(2)),
        "a connection over the cap was neither served nor closed"
    );
    assert!(start.elapsed() < Duration::from_secs(2));
    // The held ones time out, and the server serves again.
    assert!(
        wait_health(&server.base, Duration::from_secs(15)),
        "the server stays unavailable"
    );
    for c in &mut held {
        assert!(closed_within(c, Duration::from_secs(5)));
    }
}

#[test]
fn a_burst_of_bogus_keys_from_one_address_ends_in_429_and_good_keys_still_work() {
    let dir = data_dir();
    let good = create_key(dir.path(), "good");
    let server = Server::start(dir.path());
    assert!(wait_health(&server.base, Duration::from_secs(30)));
    assert_eq!(get(&server.base, "/computers", Some(&good), &[]).0, 200);
    let mut statuses = Vec::new();
    let mut retry_after = None;
    for i in 0..40 {
        let (status, headers, body) = get(&server.base, "/computers", Some(&format!("stasis_bogus{i:036}")), &[]);
        if status == 429 {
            retry_after = headers.get("retry-after").map(|v| v.to_str().unwrap().to_string());
            assert_eq!(body["error"]["code"], "TOO_MANY_FAILED_KEYS", "{body}");
        }
        statuses.push(status);
    }
    assert!(statuses[..10].iter().all(|s| *s == 401), "{statuses:?}");
    assert_eq!(*statuses.last().unwrap(), 429, "{statuses:?}");
    assert!(retry_after.is_some_and(|r| r.parse::<u64>().unwrap() >= 1));
    assert_eq!(
        get(&server.base, "/computers", Some(&good), &[]).0,
        200,
        "a key that works is not locked out"
    );
}

#[test]
fn shutdown_does_not_wait_for_open_streams() {
    let dir = data_dir();
    let key = create_key(dir.path(), "a");
    let (computer, snap) = insert_snapshot(dir.path(), "a", "creating");
    let mut server = Server::start_with(dir.path(), &[("STASIS_SHUTDOWN_GRACE_SECS", "1")]);
    assert!(wait_health(&server.base, Duration::from_secs(30)));
    // An event stream of a snapshot that never finishes, and an idle connection.
    let mut stream = TcpStream::connect(server.host()).unwrap();
    write!(
        stream,
        "GET /api/v1/computers/{computer}/snapshots/{snap}/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\r\n"
    )
    .unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).unwrap();
    assert_eq!(&head, b"HTTP/1.1 200");
    let _ = rustix::process::kill_process(
        rustix::process::Pid::from_child(&server.child),
        rustix::process::Signal::TERM,
    );
    let start = Instant::now();
    let status = loop {
        if let Some(s) = server.child.try_wait().unwrap() {
            break Some(s);
        }
        if start.elapsed() > Duration::from_secs(20) {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(
        status.is_some_and(|s| s.success()),
        "serve did not stop with a stream open"
    );
}

#[test]
fn long_requests_are_capped_per_tenant() {
    let dir = data_dir();
    let a = create_key(dir.path(), "a");
    let b = create_key(dir.path(), "b");
    let (ca, sa) = insert_snapshot(dir.path(), "a", "creating");
    let (cb, sb) = insert_snapshot(dir.path(), "b", "creating");
    let server = Server::start_with(dir.path(), &[("STASIS_MAX_STREAMS_PER_TENANT", "2")]);
    assert!(wait_health(&server.base, Duration::from_secs(30)));
    let open = |key: &str, c: &str, s: &str| {
        let mut conn = TcpStream::connect(server.host()).unwrap();
        write!(
            conn,
            "GET /api/v1/computers/{c}/snapshots/{s}/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n\r\n"
        )
        .unwrap();
        conn.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut head = [0u8; 12];
        conn.read_exact(&mut head).unwrap();
        (String::from_utf8_lossy(&head).to_string(), conn)
    };
    let (h1, first) = open(&a, &ca, &sa);
    let (h2, _second) = open(&a, &ca, &sa);
    assert_eq!((h1.as_str(), h2.as_str()), ("HTTP/1.1 200", "HTTP/1.1 200"));
    let (status, headers, body) = get(
        &server.base,
        &format!("/computers/{ca}/snapshots/{sa}/events"),
        Some(&a),
        &[],
    );
    assert_eq!(status, 429, "{body}");
    assert_eq!(body["error"]["code"], "TOO_MANY_STREAMS");
    assert!(headers.contains_key("retry-after"));
    let (hb, _other) = open(&b, &cb, &sb);
    assert_eq!(hb, "HTTP/1.1 200", "another tenant has its own streams");
    // A stream that ends gives its place back.
    drop(first);
    let start = Instant::now();
    loop {
        let (h, _c) = open(&a, &ca, &sa);
        if h == "HTTP/1.1 200" {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the closed stream's place was not given back"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Runs `stasis serve` on `dir` and returns what it prints before serving.
fn serve_banner(dir: &Path) -> String {
    let (mut args, env) = common::backends::serve_args(dir);
    args.splice(
        0..0,
        ["serve".to_string(), "--listen".to_string(), "127.0.0.1:0".to_string()],
    );
    let mut child = Command::new(common::BIN)
        .args(&args)
        .arg("--data-dir")
        .arg(dir)
        .envs(env)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    let stdout = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let mut banner = String::new();
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(60) {
        match rx.recv_timeout(Duration::from_millis(500)) {
            Ok(line) => {
                banner.push_str(&line);
                banner.push('\n');
                if line.contains("export MIOSA_API_KEY") || line.contains("has keys") {
                    break;
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
            Err(_) => break,
        }
    }
    // At once: a SIGTERM while it is still starting stops it cleanly all the same.
    let _ = rustix::process::kill_process(rustix::process::Pid::from_child(&child), rustix::process::Signal::TERM);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        if let Some(status) = child.try_wait().unwrap() {
            assert!(status.success(), "serve ended by {status} on SIGTERM");
            let left = common::cgroups_left(dir);
            assert!(left.is_empty(), "the stopped platform left its cgroups: {left:?}");
            return banner;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    banner
}

#[test]
fn the_default_key_is_printed_only_when_made() {
    let dir = data_dir();
    let first = serve_banner(dir.path());
    let saved = dir.path().join("default-api-key");
    let key = std::fs::read_to_string(&saved).unwrap().trim().to_string();
    assert!(key.starts_with("stasis_"));
    assert!(first.contains(&key), "the first start shows the new key:\n{first}");
    let second = serve_banner(dir.path());
    assert!(!second.contains(&key), "a later start printed the key again:\n{second}");
    assert!(
        second.contains(&saved.display().to_string()),
        "it says where the key is:\n{second}"
    );
}

fn revoke(dir: &Path, args: &[&str], stdin: Option<&str>) -> std::process::Output {
    let mut cmd = Command::new(common::BIN);
    cmd.args(["keys", "revoke", "--data-dir"]).arg(dir).args(args);
    if let Some(url) = common::backends::database_url(dir) {
        cmd.args(["--database-url", &url]);
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    }
    drop(child.stdin.take());
    child.wait_with_output().unwrap()
}

#[test]
fn revoked_keys_answer_401() {
    let dir = data_dir();
    let a1 = create_key(dir.path(), "a");
    let a2 = create_key(dir.path(), "a");
    let b = create_key(dir.path(), "b");
    let server = Server::start(dir.path());
    assert!(wait_health(&server.base, Duration::from_secs(30)));
    for k in [&a1, &a2, &b] {
        assert_eq!(get(&server.base, "/computers", Some(k), &[]).0, 200);
    }
    // One key, read from stdin (not left in argv).
    let out = revoke(dir.path(), &["--key", "-"], Some(&format!("{b}\n")));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(get(&server.base, "/computers", Some(&b), &[]).0, 401);
    assert_eq!(get(&server.base, "/computers", Some(&a1), &[]).0, 200);
    // Every key of a tenant.
    let out = revoke(dir.path(), &["--tenant", "a"], None);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("revoked 2 key(s)"));
    assert_eq!(get(&server.base, "/computers", Some(&a1), &[]).0, 401);
    assert_eq!(get(&server.base, "/computers", Some(&a2), &[]).0, 401);
    // Nothing left to revoke is an error, not a silent success.
    let out = revoke(dir.path(), &["--tenant", "a"], None);
    assert!(!out.status.success());
}

/// A snapshot row of `tenant`'s in `status`, straight into the database (no guest needed):
/// (computer id, snapshot id).
fn insert_snapshot(dir: &Path, tenant: &str, status: &str) -> (String, String) {
    let url = stasis_server::database_url(dir, common::backends::database_url(dir).as_deref());
    rt().block_on(async {
        let db = stasis_server::db::Db::open(&url).await.unwrap();
        let tenant = db.ensure_tenant(tenant).await.unwrap();
        let now = chrono::Utc::now();
        let s = stasis_types::Snapshot {
            id: stasis_types::SnapshotId::new(),
            computer_id: stasis_types::ComputerId::new(),
            tenant_id: tenant,
            comment: None,
            status: stasis_types::SnapshotStatus::parse(status).unwrap(),
            state_size_bytes: None,
            memory_size_bytes: None,
            rootfs_size_bytes: None,
            compressed_size_bytes: None,
            uploaded_bytes: None,
            pause_ms: None,
            s3_bucket: None,
            s3_prefix: None,
            parent_snapshot_id: None,
            error: None,
            created_at: now,
            updated_at: now,
            expires_at: None,
            name: None,
        };
        db.insert_snapshot(&s, stasis_types::Size::Xs, "box").await.unwrap();
        (s.computer_id.to_string(), s.id.to_string())
    })
}

#[test]
fn another_tenants_snapshot_answers_like_a_missing_one() {
    let dir = data_dir();
    let _a = create_key(dir.path(), "a");
    let b = create_key(dir.path(), "b");
    let (computer, snap) = insert_snapshot(dir.path(), "a", "ready");
    let server = Server::start(dir.path());
    assert!(wait_health(&server.base, Duration::from_secs(30)));
    let random = uuid::Uuid::new_v4().to_string();
    let shape = |path: String| {
        let (status, _, body) = get(&server.base, &path, Some(&b), &[]);
        let mut error = body["error"].clone();
        error.as_object_mut().unwrap().remove("request_id");
        (status, error)
    };
    for (theirs, missing) in [
        (
            format!("/computers/{computer}/snapshots/{snap}"),
            format!("/computers/{computer}/snapshots/{random}"),
        ),
        (
            format!("/computers/{computer}/snapshots/{snap}/events"),
            format!("/computers/{computer}/snapshots/{random}/events"),
        ),
    ] {
        let (a, b) = (shape(theirs), shape(missing));
        assert_eq!(a.0, 404, "{a:?}");
        assert_eq!(a, b, "another tenant's snapshot is told apart from a missing one");
        assert_eq!(a.1["message"], "snapshot not found");
    }
}

fn post_json(base: &str, path: &str, key: &str, body: &str) -> (u16, Value) {
    rt().block_on(async {
        let resp = reqwest::Client::new()
            .post(format!("{base}{path}"))
            .bearer_auth(key)
            .header("content-type", "application/json")
            .body(body.to_string())
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap_or(Value::Null))
    })
}

#[test]
fn sse_tickets_open_only_the_snapshot_they_were_asked_for() {
    let dir = data_dir();
    let a = create_key(dir.path(), "a");
    let (computer, x) = insert_snapshot(dir.path(), "a", "ready");
    let (other_computer, y) = insert_snapshot(dir.path(), "a", "ready");
    let server = Server::start(dir.path());
    assert!(wait_health(&server.base, Duration::from_secs(30)));
    let ticket = |body: &str| {
        let (status, v) = post_json(&server.base, "/sse/ticket", &a, body);
        assert_eq!(status, 201, "{v}");
        v["ticket"].as_str().unwrap().to_string()
    };
    let events = |c: &str, s: &str, t: &str| {
        get(
            &server.base,
            &format!("/computers/{c}/snapshots/{s}/events?ticket={t}"),
            None,
            &[],
        )
        .0
    };
    let bound = ticket(&format!(r#"{{"snapshot_id": "{x}"}}"#));
    assert_eq!(
        events(&other_computer, &y, &bound),
        401,
        "a ticket for X opened Y's stream"
    );
    let bound = ticket(&format!(r#"{{"snapshot_id": "{x}"}}"#));
    assert_eq!(events(&computer, &x, &bound), 200);
    assert_eq!(events(&computer, &x, &bound), 401, "one use");
    // Without a snapshot (as older clients ask), a ticket still opens one stream of its tenant's.
    assert_eq!(events(&other_computer, &y, &ticket("")), 200);
    let (status, v) = post_json(&server.base, "/sse/ticket", &a, r#"{"snapshot_id": "nope"}"#);
    assert_eq!(status, 422, "{v}");
}

#[test]
fn clients_cannot_choose_their_request_id() {
    let dir = data_dir();
    let server = Server::start(dir.path());
    assert!(wait_health(&server.base, Duration::from_secs(30)));
    let spoofed = format!("req_{}", "ab".repeat(16));
    let (_, headers, _) = get(&server.base, "/health", None, &[("x-stasis-request-id", &spoofed)]);
    let id = headers.get("x-request-id").unwrap().to_str().unwrap();
    assert!(id.starts_with("req_"));
    assert_ne!(id, spoofed, "a client's x-stasis-request-id was honoured");
    let (_, headers, body) = get(&server.base, "/computers", None, &[("x-stasis-request-id", &spoofed)]);
    assert_ne!(headers.get("x-request-id").unwrap().to_str().unwrap(), spoofed);
    assert_ne!(body["error"]["request_id"], spoofed.as_str());
}
