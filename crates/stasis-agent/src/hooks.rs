//! Restore hooks. A restore gives each clone its own clock, hostname and a freshly seeded
//! kernel RNG (see [`crate::identity`]), but the processes inside were copied with the
//! snapshot: whatever they keep in their own memory — a userspace random generator (OpenSSL's
//! DRBG, Python's `random`), a cached hostname, a session key — is the same in every clone.
//! The kernel cannot renew that for them, so the agent tells them: once the identity is in
//! place it runs the executables in [`DIR`], in name order, one at a time, each within
//! [`LIMIT`], with `STASIS_EVENT=restore` and the new hostname in the environment; their
//! output is appended to [`LOG`]. A hook typically signals a service to reseed or restarts it.
//! Hooks run in the background: the restore does not wait for them.

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

pub const DIR: &str = "/etc/stasis/on-restore.d";
pub const LOG: &str = "/var/log/stasis-on-restore.log";
/// How long one hook may run before it is killed (with its process group).
pub const LIMIT: Duration = Duration::from_secs(60);

/// Runs the restore hooks on a thread of their own.
pub fn after_restore(hostname: Option<String>) {
    let _ = std::thread::Builder::new()
        .name("restore-hooks".into())
        .spawn(move || run_all(Path::new(DIR), Path::new(LOG), hostname.as_deref(), LIMIT));
}

/// The hooks in `dir`: regular files with an execute bit, in name order (links are followed,
/// as a shell would; the guest's root owns the guest).
fn hooks(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut found: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
        .collect();
    found.sort();
    found
}

fn run_all(dir: &Path, log: &Path, hostname: Option<&str>, limit: Duration) {
    let found = hooks(dir);
    if found.is_empty() {
        return;
    }
    let Ok(mut out) = std::fs::OpenOptions::new().create(true).append(true).open(log) else {
        return;
    };
    for hook in found {
        let _ = writeln!(out, "== {}", hook.display());
        let result = run_one(&hook, &out, hostname, limit);
        let _ = match result {
            Ok(0) => writeln!(out, "== {}: done", hook.display()),
            Ok(code) => writeln!(out, "== {}: exit code {code}", hook.display()),
            Err(e) => writeln!(out, "== {}: {e}", hook.display()),
        };
    }
}

fn run_one(hook: &Path, out: &std::fs::File, hostname: Option<&str>, limit: Duration) -> std::io::Result<i32> {
    let mut cmd = Command::new(hook);
    cmd.env_clear()
        .env("PATH", crate::exec::DEFAULT_PATH)
        .env("HOME", "/root")
        .env("LANG", "C.UTF-8")
        .env("STASIS_EVENT", "restore")
        .current_dir("/")
        .stdin(Stdio::null())
        .stdout(out.try_clone()?)
        .stderr(out.try_clone()?)
        .process_group(0);
    if let Some(name) = hostname {
        cmd.env("STASIS_HOSTNAME", name);
    }
    let (child, exited) = crate::reaper::spawn(&mut cmd)?;
    match exited.recv_timeout(limit) {
        Ok(code) => Ok(code),
        Err(_) => {
            // SAFETY: kill takes no pointers; the negative pid names the hook's process group.
            unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL) };
            let _ = exited.recv_timeout(Duration::from_secs(5));
            Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("killed after {limit:?}"),
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn script(dir: &Path, name: &str, body: &str, mode: u32) {
        let p = dir.join(name);
        std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn hooks_run_in_name_order_with_the_restore_environment_and_slow_ones_are_killed() {
        crate::reaper::start_for_tests();
        let dir = tempfile::tempdir().unwrap();
        let hooks_dir = dir.path().join("on-restore.d");
        std::fs::create_dir(&hooks_dir).unwrap();
        let log = dir.path().join("log");
        let trace = dir.path().join("trace");
        let t = trace.display();
        script(
            &hooks_dir,
            "20-second",
            &format!("echo second-$STASIS_EVENT-$STASIS_HOSTNAME >> {t}"),
            0o755,
        );
        script(&hooks_dir, "10-first", &format!("echo first >> {t}; exit 3"), 0o755);
        script(&hooks_dir, "30-slow", "sleep 30", 0o755);
        script(&hooks_dir, "40-after-slow", &format!("echo after-slow >> {t}"), 0o755);
        script(&hooks_dir, "15-not-executable", &format!("echo never >> {t}"), 0o644);
        let started = std::time::Instant::now();
        run_all(&hooks_dir, &log, Some("clone-7"), Duration::from_millis(500));
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the slow hook was not killed"
        );
        assert_eq!(
            std::fs::read_to_string(&trace).unwrap(),
            "first\nsecond-restore-clone-7\nafter-slow\n"
        );
        let log = std::fs::read_to_string(&log).unwrap();
        assert!(log.contains("10-first: exit code 3"), "{log}");
        assert!(log.contains("30-slow: killed after"), "{log}");
        assert!(!log.contains("15-not-executable"), "{log}");
    }

    #[test]
    fn no_directory_means_no_hooks_and_no_log() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        run_all(&dir.path().join("absent"), &log, None, LIMIT);
        assert!(!log.exists());
    }
}
