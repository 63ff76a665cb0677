//! Reaping: as PID 1 the agent inherits every orphan, so one thread waits on all children and
//! hands the exit status of the ones `exec` started to their waiters. Children are spawned with
//! the registry lock held, so a child that exits at once is never mistaken for an orphan.

use std::collections::HashMap;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Condvar, Mutex};
use std::time::Duration;

struct Registry {
    waiting: HashMap<libc::pid_t, Sender<i32>>,
}

static REGISTRY: Mutex<Option<Registry>> = Mutex::new(None);
static CHILDREN: Condvar = Condvar::new();

/// Starts the reaper thread. Call once, before any [`spawn`].
pub fn start() {
    *REGISTRY.lock().unwrap_or_else(|p| p.into_inner()) = Some(Registry {
        waiting: HashMap::new(),
    });
    std::thread::Builder::new()
        .name("reaper".into())
        .spawn(reap_forever)
        .expect("spawning the reaper thread");
}

/// Starts the reaper once per test process.
#[cfg(test)]
pub fn start_for_tests() {
    static ONCE: std::sync::Once = std::sync::Once::new();
    ONCE.call_once(start);
}

/// Spawns a child and registers it; the receiver yields its exit code (128 + signal when
/// killed by a signal).
pub fn spawn(cmd: &mut std::process::Command) -> std::io::Result<(std::process::Child, Receiver<i32>)> {
    let mut guard = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
    let child = cmd.spawn()?;
    let (tx, rx) = channel();
    guard
        .as_mut()
        .expect("reaper::start runs before spawn")
        .waiting
        .insert(child.id() as libc::pid_t, tx);
    drop(guard);
    CHILDREN.notify_all();
    Ok((child, rx))
}

fn decode_status(status: libc::c_int) -> i32 {
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        -1
    }
}

fn reap_forever() {
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: status is a valid out-pointer for waitpid.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid > 0 {
            let mut guard = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(tx) = guard.as_mut().and_then(|r| r.waiting.remove(&pid)) {
                let _ = tx.send(decode_status(status));
            }
            continue;
        }
        match std::io::Error::last_os_error().raw_os_error() {
            Some(libc::EINTR) => continue,
            _ => {
                // No children right now: sleep until one is spawned (or an orphan is
                // reparented to us, which the timeout catches).
                let guard = REGISTRY.lock().unwrap_or_else(|p| p.into_inner());
                let _ = CHILDREN.wait_timeout(guard, Duration::from_millis(500));
            }
        }
    }
}
