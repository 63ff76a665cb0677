//! Which metadata database and snapshot store a test's server uses. By default SQLite and a
//! local directory inside the data dir. `scripts/services` starts a real PostgreSQL server and
//! a real S3-compatible server and names them in `STASIS_TEST_POSTGRES` (an admin URL) and
//! `STASIS_TEST_S3` (an endpoint); with `STASIS_TEST_BACKENDS=postgres-s3` every data dir gets
//! its own database and bucket there, so the same tests run against PostgreSQL and S3 (the
//! several-hosts tests always use them). S3 is reached through a proxy the test can take
//! down, to see how uploads meet an unreachable store.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

/// A short name unique to a data dir (tests run in parallel, each on its own data dir).
fn tag(data_dir: &Path) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data_dir.to_string_lossy().bytes() {
        h = (h ^ b as u64).wrapping_mul(0x100_0000_01b3);
    }
    format!("{h:016x}")
}

pub fn postgres_admin() -> Option<String> {
    std::env::var("STASIS_TEST_POSTGRES").ok().filter(|v| !v.is_empty())
}

pub fn s3_endpoint() -> Option<String> {
    std::env::var("STASIS_TEST_S3").ok().filter(|v| !v.is_empty())
}

/// Whether ordinary tests run on PostgreSQL and S3 rather than SQLite and a directory.
fn shared_backends() -> bool {
    std::env::var("STASIS_TEST_BACKENDS").is_ok_and(|v| v == "postgres-s3")
}

/// `--database-url` for this data dir's own database, if tests run on PostgreSQL.
pub fn database_url(data_dir: &Path) -> Option<String> {
    shared_backends().then(|| pg_database(data_dir))
}

/// This data dir's own database on the test PostgreSQL server (created on first use).
pub fn pg_database(data_dir: &Path) -> String {
    let admin = postgres_admin()
        .expect("STASIS_TEST_POSTGRES names no PostgreSQL server: run the tests with scripts/test, or eval \"$(scripts/services start)\" first");
    let name = format!("stasis_{}", tag(data_dir));
    let exists = Command::new("psql")
        .args([
            &admin,
            "-tAc",
            &format!("SELECT 1 FROM pg_database WHERE datname = '{name}'"),
        ])
        .output()
        .expect("psql runs");
    assert!(
        exists.status.success(),
        "psql: {}",
        String::from_utf8_lossy(&exists.stderr)
    );
    if String::from_utf8_lossy(&exists.stdout).trim() != "1" {
        let created = Command::new("psql")
            .args([&admin, "-c", &format!("CREATE DATABASE {name}")])
            .output()
            .expect("psql runs");
        assert!(created.status.success(), "{}", String::from_utf8_lossy(&created.stderr));
    }
    let base = admin.rsplit_once('/').map(|(b, _)| b).unwrap_or(&admin);
    format!("{base}/{name}")
}

/// Arguments and environment for `stasis serve` on this data dir.
pub fn serve_args(data_dir: &Path) -> (Vec<String>, Vec<(String, String)>) {
    let mut args = Vec::new();
    let mut env = Vec::new();
    if let Some(url) = database_url(data_dir) {
        args.extend(["--database-url".to_string(), url]);
    }
    if let Some(s3) = S3::of(data_dir) {
        args.extend(s3.serve_args());
        env.extend(s3_env());
    }
    (args, env)
}

/// Credentials of the test S3 server's user.
pub fn s3_env() -> Vec<(String, String)> {
    [
        ("AWS_ACCESS_KEY_ID", "stasis-test"),
        ("AWS_SECRET_ACCESS_KEY", "stasis-test"),
        ("AWS_REGION", "us-east-1"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// A data dir's bucket on the S3 server, and the proxy its server reaches it through.
pub struct S3 {
    pub endpoint: String,
    pub bucket: String,
    pub proxy: Arc<Proxy>,
}

impl S3 {
    /// This data dir's bucket, if tests run on S3.
    pub fn of(data_dir: &Path) -> Option<Arc<S3>> {
        shared_backends().then(|| S3::bucket_for(data_dir))
    }

    /// `stasis serve` arguments that put its store in this bucket.
    pub fn serve_args(&self) -> Vec<String> {
        vec![
            "--store-url".to_string(),
            format!("s3://{}/tests", self.bucket),
            "--s3-endpoint".to_string(),
            format!("http://{}", self.proxy.addr),
        ]
    }

    /// This data dir's own bucket on the test S3 server (created on first use).
    pub fn bucket_for(data_dir: &Path) -> Arc<S3> {
        static ALL: OnceLock<Mutex<HashMap<PathBuf, Arc<S3>>>> = OnceLock::new();
        let endpoint = s3_endpoint()
            .expect("STASIS_TEST_S3 names no S3 server: run the tests with scripts/test, or eval \"$(scripts/services start)\" first");
        let mut all = ALL.get_or_init(Default::default).lock().unwrap();
        if let Some(s3) = all.get(data_dir) {
            return s3.clone();
        }
        let bucket = format!("stasis-{}", tag(data_dir));
        let out = curl()
            .args(["-sf", "-X", "PUT", &format!("{endpoint}/{bucket}")])
            .output()
            .expect("curl runs");
        assert!(out.status.success(), "creating bucket {bucket} failed");
        let target: SocketAddr = endpoint
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .parse()
            .expect("STASIS_TEST_S3 is http://IP:PORT");
        let s3 = Arc::new(S3 {
            endpoint,
            bucket,
            proxy: Proxy::start(target),
        });
        all.insert(data_dir.to_path_buf(), s3.clone());
        s3
    }

    /// An object's bytes; None if it is gone (garbage collection may take one meanwhile).
    fn get(&self, key: &str) -> Option<Vec<u8>> {
        let out = curl()
            .args([
                "-s",
                "-w",
                "\n%{http_code}",
                &format!("{}/{}/{key}", self.endpoint, self.bucket),
            ])
            .output()
            .expect("curl runs");
        let mut body = out.stdout;
        let nl = body.iter().rposition(|&b| b == b'\n').expect("curl prints the status");
        let code = String::from_utf8_lossy(&body[nl + 1..]).to_string();
        body.truncate(nl);
        match code.as_str() {
            "200" => Some(body),
            "404" => None,
            other => panic!("GET {key}: HTTP {other}"),
        }
    }

    fn put(&self, key: &str, bytes: &[u8]) {
        let mut child = curl()
            .args([
                "-sf",
                "-X",
                "PUT",
                "--data-binary",
                "@-",
                &format!("{}/{}/{key}", self.endpoint, self.bucket),
            ])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("curl runs");
        child.stdin.take().unwrap().write_all(bytes).unwrap();
        assert!(child.wait().unwrap().success(), "PUT {key} failed");
    }

    /// Every key under `prefix` (ListObjectsV2, following continuation tokens).
    fn list(&self, prefix: &str) -> Vec<String> {
        let mut keys = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut url = format!("{}/{}?list-type=2&prefix={prefix}", self.endpoint, self.bucket);
            if let Some(t) = &token {
                url.push_str(&format!("&continuation-token={t}"));
            }
            let out = curl().args(["-sf", &url]).output().expect("curl runs");
            assert!(out.status.success(), "listing {prefix} failed");
            let xml = String::from_utf8_lossy(&out.stdout).to_string();
            keys.extend(between(&xml, "<Key>", "</Key>"));
            token = between(&xml, "<NextContinuationToken>", "</NextContinuationToken>")
                .into_iter()
                .next();
            if token.is_none() {
                return keys;
            }
        }
    }
}

/// curl signing its requests as the test servers' S3 user (SigV4).
fn curl() -> Command {
    let mut c = Command::new("curl");
    c.args([
        "--aws-sigv4",
        "aws:amz:us-east-1:s3",
        "--user",
        "stasis-test:stasis-test",
    ]);
    c
}

fn between(s: &str, open: &str, close: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = s;
    while let Some(i) = rest.find(open) {
        rest = &rest[i + open.len()..];
        let Some(j) = rest.find(close) else { break };
        out.push(rest[..j].to_string());
        rest = &rest[j + close.len()..];
    }
    out
}

/// A view of a test server's snapshot store, whichever it is.
pub enum Store {
    Local(PathBuf),
    S3(Arc<S3>),
}

impl Store {
    pub fn of(data_dir: &Path) -> Store {
        match S3::of(data_dir) {
            Some(s3) => Store::S3(s3),
            None => Store::Local(data_dir.join("objects")),
        }
    }

    /// Keys of every stored chunk.
    pub fn chunks(&self) -> Vec<String> {
        match self {
            Store::Local(root) => {
                let mut out = Vec::new();
                for sub in std::fs::read_dir(root.join("chunks")).into_iter().flatten().flatten() {
                    for f in std::fs::read_dir(sub.path()).into_iter().flatten().flatten() {
                        // `<name>#<n>`: a chunk the store is writing right now (an upload
                        // still retrying in the background), not a stored one.
                        if f.file_name().to_string_lossy().contains('#') {
                            continue;
                        }
                        out.push(format!(
                            "chunks/{}/{}",
                            sub.file_name().to_string_lossy(),
                            f.file_name().to_string_lossy()
                        ));
                    }
                }
                out
            }
            Store::S3(s3) => s3
                .list("tests/chunks/")
                .into_iter()
                .filter_map(|k| k.strip_prefix("tests/").map(str::to_string))
                .collect(),
        }
    }

    pub fn has_manifest(&self, snapshot: &str) -> bool {
        let key = format!("snapshots/{snapshot}/manifest.zst");
        match self {
            Store::Local(root) => root.join(key).exists(),
            Store::S3(s3) => s3.list(&format!("tests/{key}")).iter().any(|k| k.ends_with(&key)),
        }
    }

    /// Flips a byte in the middle of every stored chunk.
    pub fn corrupt_chunks(&self) {
        for key in self.chunks() {
            let flip = |bytes: &mut Vec<u8>| {
                let mid = bytes.len() / 2;
                bytes[mid] ^= 0x5a;
            };
            match self {
                Store::Local(root) => {
                    let path = root.join(&key);
                    let mut bytes = std::fs::read(&path).unwrap();
                    flip(&mut bytes);
                    std::fs::write(&path, bytes).unwrap();
                }
                Store::S3(s3) => {
                    if let Some(mut bytes) = s3.get(&format!("tests/{key}")) {
                        flip(&mut bytes);
                        s3.put(&format!("tests/{key}"), &bytes);
                    }
                }
            }
        }
    }

    /// Makes the store refuse writes (`true`) or take them again (`false`): for a local
    /// directory by putting a file where the chunks go, for S3 by taking the way to it down.
    pub fn set_unwritable(&self, unwritable: bool) {
        match self {
            Store::Local(root) => {
                let chunks = root.join("chunks");
                if unwritable {
                    std::fs::create_dir_all(root).unwrap();
                    let _ = std::fs::remove_dir_all(&chunks);
                    std::fs::write(&chunks, b"not a directory").unwrap();
                } else {
                    let _ = std::fs::remove_file(&chunks);
                }
            }
            Store::S3(s3) => s3.proxy.set_down(unwritable),
        }
    }
}

/// A TCP proxy on loopback that can be taken down (connections refused, open ones cut) and
/// brought back on the same port.
pub struct Proxy {
    pub addr: SocketAddr,
    down: AtomicBool,
    /// Open connections (a handle on each side), by number, so taking the proxy down can cut them.
    open: Mutex<HashMap<u64, [TcpStream; 2]>>,
}

impl Proxy {
    fn start(target: SocketAddr) -> Arc<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let proxy = Arc::new(Proxy {
            addr: listener.local_addr().unwrap(),
            down: AtomicBool::new(false),
            open: Mutex::new(HashMap::new()),
        });
        let p = proxy.clone();
        std::thread::spawn(move || {
            let mut listener = Some(listener);
            let mut next: u64 = 0;
            loop {
                if p.down.load(Ordering::SeqCst) {
                    listener = None; // refuse connections while down
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                }
                let l = match &listener {
                    Some(l) => l,
                    None => match TcpListener::bind(p.addr) {
                        Ok(l) => listener.insert(l),
                        Err(_) => {
                            std::thread::sleep(Duration::from_millis(20));
                            continue;
                        }
                    },
                };
                l.set_nonblocking(true).unwrap();
                match l.accept() {
                    Ok((client, _)) => {
                        if client.set_nonblocking(false).is_err() {
                            continue;
                        }
                        let Ok(upstream) = TcpStream::connect(target) else {
                            continue;
                        };
                        let handles = (|| -> std::io::Result<_> {
                            Ok((
                                [client.try_clone()?, upstream.try_clone()?],
                                client.try_clone()?,
                                upstream.try_clone()?,
                            ))
                        })();
                        let Ok((kept, client2, upstream2)) = handles else {
                            continue; // out of descriptors for now: drop this connection
                        };
                        next += 1;
                        p.open.lock().unwrap().insert(next, kept);
                        pipe(client2, upstream2, None);
                        pipe(upstream, client, Some((p.clone(), next)));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(5)),
                }
            }
        });
        proxy
    }

    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
        if down {
            for [a, b] in self.open.lock().unwrap().drain().map(|(_, s)| s) {
                let _ = a.shutdown(Shutdown::Both);
                let _ = b.shutdown(Shutdown::Both);
            }
        }
    }
}

/// Copies one direction of a connection; the answering direction forgets the connection when
/// it ends.
fn pipe(mut from: TcpStream, mut to: TcpStream, forget: Option<(Arc<Proxy>, u64)>) {
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match from.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if to.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
        let _ = to.shutdown(Shutdown::Write);
        if let Some((proxy, id)) = forget {
            if let Some([a, b]) = proxy.open.lock().unwrap().remove(&id) {
                let _ = a.shutdown(Shutdown::Both);
                let _ = b.shutdown(Shutdown::Both);
            }
        }
    });
}
