//! Secrets hygiene on a real server: API keys and SSE tickets never reach the log (even at
//! the most verbose level), keys are stored only as hashes, and the data dir, the saved key
//! and the computers' sockets are owner-only.

mod common;

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};
use std::time::Duration;

use common::{create_key, data_dir, running_computer, Client, BIN};

#[test]
fn keys_and_tickets_stay_out_of_logs_and_files_are_owner_only() {
    let dir = data_dir();
    let key = create_key(dir.path(), "secret");
    let log = dir.path().join("server.log");
    let child = Command::new(BIN)
        .args(["serve", "--listen", "127.0.0.1:0", "--data-dir"])
        .arg(dir.path())
        .env("STASIS_LOG", "trace")
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    // Stopped (SIGTERM, so its computers stop too) whatever happens to the test.
    let mut child = Stopping(child);
    let mut lines = BufReader::new(child.0.stdout.take().unwrap()).lines();
    let first = lines.next().unwrap().unwrap();
    let base = first
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap()
        .to_string();
    let printed: Vec<String> = lines.by_ref().take(7).map_while(Result::ok).collect();
    std::thread::spawn(move || for _ in lines {});
    let default_key = printed
        .iter()
        .find(|l| l.starts_with("stasis_"))
        .expect("serve prints the default tenant's new key")
        .trim()
        .to_string();

    let api = Client::new(&base, Some(&key));
    let id = running_computer(&api, "hush");
    let snap = common::snapshot(&api, &id, "secret-test");
    let ticket = api.call("POST", "/sse/ticket", None).body["ticket"]
        .as_str()
        .unwrap()
        .to_string();
    let (status, _) =
        Client::new(&base, None).sse(&format!("/computers/{id}/snapshots/{snap}/events?ticket={ticket}"), &[]);
    assert_eq!(status, 200);
    // A wrong key too (it must not be logged either).
    let wrong = "stasis_thisIsNotAKeyButMustNotBeLoggedEither00";
    assert_eq!(
        Client::new(&base, Some(wrong)).call("GET", "/computers", None).status,
        401
    );

    // Owner-only files: the data dir, the saved default key, each computer's control
    // directory (its QMP and agent sockets are inside) and its disks directory.
    let mode = |p: &std::path::Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(dir.path()), 0o700, "data dir");
    assert_eq!(mode(&dir.path().join("default-api-key")), 0o600, "saved key");
    let computer_dir = dir.path().join("computers").join(&id);
    assert_eq!(mode(&computer_dir) & 0o077, 0, "computer dir {:o}", mode(&computer_dir));
    let control_dir = dir.path().join("machines").join(&id);
    assert_eq!(mode(&control_dir) & 0o077, 0, "control dir {:o}", mode(&control_dir));
    for sock in ["qmp.sock", "agent.sock"] {
        let p = control_dir.join(sock);
        assert!(p.exists(), "{sock}");
    }

    // Keys are stored as hashes only: the database file does not contain them.
    let db = std::fs::read(dir.path().join("stasis.db")).unwrap();
    let wal = std::fs::read(dir.path().join("stasis.db-wal")).unwrap_or_default();
    for k in [&key, &default_key] {
        let body = &k.as_bytes()["stasis_".len()..];
        assert!(
            !contains(&db, body) && !contains(&wal, body),
            "a key in clear in the database"
        );
    }

    api.wait_snapshot(&id, &snap, "ready", common::SNAP);
    // The snapshot's RAM file (kept on tmpfs for restores) is owner-only, in an owner-only dir.
    let ram = std::fs::read_dir("/dev/shm")
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("stasis-"))
        .flat_map(|e| std::fs::read_dir(e.path()).into_iter().flatten().flatten())
        .find(|f| f.file_name().to_string_lossy().starts_with(snap.as_str()))
        .map(|f| f.path())
        .expect("the snapshot's RAM file is kept on tmpfs");
    assert_eq!(mode(ram.parent().unwrap()), 0o700, "{}", ram.display());
    assert_eq!(mode(&ram) & 0o077, 0, "{}", ram.display());
    terminate(&mut child.0);
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("request"), "the log has request lines at trace level");
    for (what, secret) in [
        ("a key", &key["stasis_".len()..]),
        ("the default key", &default_key["stasis_".len()..]),
        ("a wrong key", &wrong["stasis_".len()..]),
        ("a ticket", ticket.as_str()),
    ] {
        assert!(!text.contains(secret), "{what} is in the log");
    }
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// SIGTERM and wait (the server stops its computers).
fn terminate(child: &mut std::process::Child) {
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    for _ in 0..600 {
        if child.try_wait().unwrap().is_some() {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = child.kill();
}

struct Stopping(std::process::Child);

impl Drop for Stopping {
    fn drop(&mut self) {
        terminate(&mut self.0);
    }
}
