//! Test harness: runs the real `stasis` binary (`serve`, `keys create`) on a temporary data
//! directory and an ephemeral port, and talks to it over HTTP.
#![allow(dead_code)]

pub mod backends;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub const BIN: &str = env!("CARGO_BIN_EXE_stasis");

/// How often [`wait_until`] looks again.
pub const POLL: Duration = Duration::from_millis(50);

/// Polls `f` every [`POLL`] until it gives a value, and returns it; panics naming `what` and
/// `limit` if it has not by then. For waiting on something the test can observe, instead of
/// sleeping a fixed time and hoping it happened.
pub fn wait_until<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(start.elapsed() < limit, "gave up waiting for {what} after {limit:?}");
        std::thread::sleep(POLL);
    }
}

/// Checks `f` every [`POLL`] for `span`, panicking naming `what` the first time it fails: a
/// property that must hold for a while (a retried upload is not given up on), not a sleep.
pub fn holds_for(what: &str, span: Duration, mut f: impl FnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < span {
        assert!(f(), "{what} stopped holding after {:?}", start.elapsed());
        std::thread::sleep(POLL);
    }
}

/// A TCP port free on loopback now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn is_root() -> bool {
    rustix::process::geteuid().is_root()
}

pub struct Server {
    pub child: Child,
    pub base: String,
    pub data_dir: PathBuf,
}

/// A data directory that outlives server restarts within a test.
pub fn data_dir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("stasis-e2e")
        .tempdir_in("/tmp")
        .unwrap()
}

pub fn create_key(data_dir: &Path, tenant: &str) -> String {
    create_key_in(data_dir, tenant, backends::database_url(data_dir).as_deref())
}

/// A key made with `stasis keys create`, in the given database (None: the data dir's SQLite).
pub fn create_key_in(data_dir: &Path, tenant: &str, database_url: Option<&str>) -> String {
    let mut cmd = Command::new(BIN);
    cmd.args(["keys", "create", "--tenant", tenant, "--data-dir"])
        .arg(data_dir);
    if let Some(url) = database_url {
        cmd.args(["--database-url", url]);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "keys create: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .last()
        .unwrap()
        .trim()
        .to_string()
}

impl Server {
    pub fn start(data_dir: &Path) -> Server {
        Self::start_with(data_dir, &[])
    }

    pub fn start_with(data_dir: &Path, env: &[(&str, &str)]) -> Server {
        let (mut args, mut all_env) = backends::serve_args(data_dir);
        args.splice(
            0..0,
            ["serve".to_string(), "--listen".to_string(), "127.0.0.1:0".to_string()],
        );
        all_env.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        Self::spawn(data_dir, &args, &all_env)
    }

    /// Runs `stasis ARGS --data-dir DATA_DIR`; the first line it prints holds its address.
    pub fn spawn(data_dir: &Path, args: &[String], env: &[(String, String)]) -> Server {
        let mut child = Command::new(BIN)
            .args(args)
            .arg("--data-dir")
            .arg(data_dir)
            .env("STASIS_LOG", "info,sqlx=warn")
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let first = lines.next().expect("serve prints its address").unwrap();
        let base = first
            .split_whitespace()
            .find(|w| w.starts_with("http://") || w.starts_with("https://"))
            .unwrap_or_else(|| panic!("no address in {first:?}"))
            .to_string();
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Server {
            child,
            base,
            data_dir: data_dir.to_path_buf(),
        }
    }

    /// `HOST:PORT` of its listener (what to connect to, and the `Host` of API requests).
    pub fn host(&self) -> String {
        self.base
            .trim_start_matches("http://")
            .split('/')
            .next()
            .unwrap()
            .to_string()
    }

    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// SIGTERM and wait for a clean exit.
    pub fn terminate(&mut self) {
        let _ = rustix::process::kill_process(
            rustix::process::Pid::from_child(&self.child),
            rustix::process::Signal::TERM,
        );
        let start = Instant::now();
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(status.success(), "serve exited with {status}");
                return;
            }
            assert!(
                start.elapsed() < Duration::from_secs(60),
                "serve did not stop on SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = rustix::process::kill_process(
                rustix::process::Pid::from_child(&self.child),
                rustix::process::Signal::TERM,
            );
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(30) {
                if let Ok(Some(_)) = self.child.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub struct Resp {
    pub status: u16,
    pub body: Value,
    pub request_id: Option<String>,
    pub retry_after: Option<String>,
}

pub struct Client {
    pub base: String,
    pub key: Option<String>,
    rt: tokio::runtime::Runtime,
    http: reqwest::Client,
}

impl Client {
    pub fn new(base: &str, key: Option<&str>) -> Client {
        Client {
            base: base.to_string(),
            key: key.map(str::to_string),
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(300))
                .build()
                .unwrap(),
        }
    }

    pub fn raw(&self, method: &str, path: &str, body: Option<&str>, content_type: Option<&str>) -> Resp {
        self.raw_with(method, path, body, content_type, &[])
    }

    pub fn raw_with(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        content_type: Option<&str>,
        headers: &[(&str, &str)],
    ) -> Resp {
        let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut req = self.http.request(method, format!("{}{path}", self.base));
        if let Some(k) = &self.key {
            req = req.bearer_auth(k);
        }
        if let Some(b) = body {
            req = req.body(b.to_string());
        }
        if let Some(ct) = content_type {
            req = req.header("content-type", ct);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        self.rt.block_on(async {
            let resp = req.send().await.expect("the server answers");
            let status = resp.status().as_u16();
            let request_id = resp
                .headers()
                .get("x-request-id")
                .map(|v| v.to_str().unwrap().to_string());
            let retry_after = resp
                .headers()
                .get("retry-after")
                .map(|v| v.to_str().unwrap().to_string());
            let text = resp.text().await.unwrap();
            let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
            Resp {
                status,
                body,
                request_id,
                retry_after,
            }
        })
    }

    /// Reads a whole SSE stream (until the server ends it): `(status, [(id, event, data)])`.
    pub fn sse(&self, path: &str, headers: &[(&str, &str)]) -> (u16, Vec<(String, String, Value)>) {
        let mut req = self.http.get(format!("{}{path}", self.base));
        if let Some(k) = &self.key {
            req = req.bearer_auth(k);
        }
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        self.rt.block_on(async {
            let resp = tokio::time::timeout(Duration::from_secs(120), req.send())
                .await
                .expect("the stream starts")
                .expect("the server answers");
            let status = resp.status().as_u16();
            let text = tokio::time::timeout(Duration::from_secs(120), resp.text())
                .await
                .expect("the stream ends by itself")
                .unwrap_or_default();
            let mut events = Vec::new();
            for block in text.split("\n\n") {
                let (mut id, mut event, mut data) = (String::new(), String::new(), String::new());
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        id = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("event:") {
                        event = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim());
                    }
                }
                if !data.is_empty() {
                    events.push((id, event, serde_json::from_str(&data).unwrap_or(Value::String(data))));
                }
            }
            (status, events)
        })
    }

    /// Polls a snapshot until it is `want` (panics if it fails instead).
    pub fn wait_snapshot(&self, computer: &str, snap: &str, want: &str, limit: Duration) -> Value {
        let start = Instant::now();
        loop {
            let r = self.call("GET", &format!("/computers/{computer}/snapshots/{snap}"), None);
            assert_eq!(r.status, 200, "{}", r.body);
            let status = r.body["data"]["status"].as_str().unwrap().to_string();
            if status == want {
                return r.body["data"].clone();
            }
            if status == "failed" && want != "failed" {
                panic!("snapshot {snap} failed: {}", r.body["data"]["error"]);
            }
            assert!(
                start.elapsed() < limit,
                "snapshot {snap} still {status} after {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn call(&self, method: &str, path: &str, body: Option<Value>) -> Resp {
        let text = body.map(|b| b.to_string());
        self.raw(method, path, text.as_deref(), Some("application/json"))
    }

    pub fn create(&self, name: &str, size: &str) -> String {
        let r = self.call("POST", "/computers", Some(json!({"name": name, "size": size})));
        assert_eq!(r.status, 201, "{}", r.body);
        r.body["id"].as_str().unwrap().to_string()
    }

    pub fn status(&self, id: &str) -> (String, Value) {
        let r = self.call("GET", &format!("/computers/{id}"), None);
        assert_eq!(r.status, 200, "{}", r.body);
        (r.body["status"].as_str().unwrap().to_string(), r.body)
    }

    /// Polls until the computer has `want` status (panics on a different terminal one).
    pub fn wait_status(&self, id: &str, want: &str, limit: Duration) -> Value {
        let start = Instant::now();
        loop {
            let (status, body) = self.status(id);
            if status == want {
                return body;
            }
            if status == "error" && want != "error" {
                panic!("computer {id} went to error: {}", body["error"]);
            }
            assert!(
                start.elapsed() < limit,
                "computer {id} still {status} after {limit:?}, wanted {want}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn exec(&self, id: &str, command: &str, timeout: Option<u64>) -> Resp {
        let mut body = json!({"command": command});
        if let Some(t) = timeout {
            body["timeout"] = json!(t);
        }
        self.call("POST", &format!("/computers/{id}/exec"), Some(body))
    }
}

/// QEMU pid of a computer, from its machine directory.
pub fn qemu_pid(data_dir: &Path, id: &str) -> Option<i32> {
    std::fs::read_to_string(data_dir.join("machines").join(id).join("qemu.pid"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
}

/// A snapshot's RAM file on this host (in the platform's directory on /dev/shm), if any.
pub fn memory_file(snapshot: &str) -> Option<PathBuf> {
    std::fs::read_dir("/dev/shm")
        .ok()?
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("stasis-"))
        .map(|e| e.path().join(format!("{snapshot}.memory")))
        .find(|p| p.exists())
}

/// A field of `/proc/<pid>/status` (`Uid`, `Groups`, `CapEff`, ...).
pub fn status_field(pid: i32, field: &str) -> String {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .unwrap_or_else(|| panic!("no {field} in /proc/{pid}/status"))
        .trim()
        .to_string()
}

/// A command that runs as confined QEMU `pid`'s user and groups, with no capabilities and no
/// new privileges: inside that process's PID, mount, network, IPC and UTS namespaces, root and
/// working directory, or (`inside` false) on the host. The program and its arguments follow.
pub fn as_qemu_user(pid: i32, inside: bool) -> Command {
    let uid = status_field(pid, "Uid").split_whitespace().next().unwrap().to_string();
    let groups = status_field(pid, "Groups")
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(",");
    let mut cmd = if inside {
        let mut c = Command::new("nsenter");
        c.args([
            "-t",
            &pid.to_string(),
            "-p",
            "-m",
            "-n",
            "-i",
            "-u",
            "-r",
            "-w",
            "--",
            "setpriv",
        ]);
        c
    } else {
        Command::new("setpriv")
    };
    cmd.args(["--reuid", &uid, "--regid", &uid, "--groups", &groups]).args([
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--no-new-privs",
        "--",
    ]);
    cmd
}

/// The tag a platform names what it makes on the host after (its cgroups `stasis-<tag>`): the
/// first 16 hex digits of its data directory's SHA-256.
pub fn data_dir_tag(data_dir: &Path) -> String {
    let out = Command::new("sh")
        .args(["-c", "printf '%s' \"$1\" | sha256sum | cut -c1-16", "sh"])
        .arg(data_dir)
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// The cgroups of the platform on `data_dir` still on the host: its parent `stasis-<tag>` in
/// the unified hierarchy or in any legacy one (its machines' cgroups are inside).
pub fn cgroups_left(data_dir: &Path) -> Vec<PathBuf> {
    let name = format!("stasis-{}", data_dir_tag(data_dir));
    ["", "cpu", "memory", "pids"]
        .iter()
        .map(|h| Path::new("/sys/fs/cgroup").join(h).join(&name))
        .filter(|p| p.is_dir())
        .collect()
}

pub fn alive(pid: i32) -> bool {
    // A zombie still answers kill(0); look at its state instead.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => !stat.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'),
        Err(_) => false,
    }
}

// ---- snapshot helpers shared by the suites ----

pub const BOOT: Duration = Duration::from_secs(180);
pub const SNAP: Duration = Duration::from_secs(180);

pub fn running_computer(api: &Client, name: &str) -> String {
    let id = api.create(name, "xs");
    api.wait_status(&id, "running", BOOT);
    id
}

pub fn snapshot(api: &Client, computer: &str, comment: &str) -> String {
    let r = api.call(
        "POST",
        &format!("/computers/{computer}/snapshots"),
        Some(json!({"comment": comment})),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["data"]["status"], "creating");
    r.body["data"]["id"].as_str().unwrap().to_string()
}

pub fn restore(api: &Client, computer: &str, snap: &str) -> String {
    let r = api.call("POST", &format!("/computers/{computer}/restore/{snap}"), None);
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.body["snapshot"]["status"], "restoring");
    assert_eq!(r.body["data"]["status"], "provisioning");
    r.body["data"]["id"].as_str().unwrap().to_string()
}

pub fn out(api: &Client, computer: &str, cmd: &str) -> String {
    let r = api.exec(computer, cmd, None);
    assert_eq!(r.status, 200, "{}", r.body);
    r.body["output"].as_str().unwrap().trim().to_string()
}

/// One HTTP/1.1 request of the test's to the platform's listener at `base`, with `host` as its
/// Host header: the status, the head and the body.
pub fn request(base: &str, host: &str, path: &str, headers: &[(&str, &str)]) -> (u16, String, String) {
    use std::io::{Read, Write};
    let addr = base.trim_start_matches("http://").split('/').next().unwrap();
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut head = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).unwrap();
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.split(' ').nth(1).and_then(|c| c.parse().ok()).unwrap_or(0);
    (status, head.to_string(), body.trim().to_string())
}
