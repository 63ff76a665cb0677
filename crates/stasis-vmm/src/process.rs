//! The QEMU process of a computer: either our child (spawned and waited on, so it is always
//! reaped) or, after a restart of the platform, a process we re-attach to through a pidfd.

use std::os::fd::{FromRawFd, OwnedFd};

pub use rustix::process::Signal;
use rustix::process::{Pid, PidfdFlags};
use tokio::io::unix::AsyncFd;
use tokio::sync::watch;

/// How a process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
    /// A re-attached process ended; its status went to its parent, not to us.
    Unknown,
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Exit::Code(c) => write!(f, "exited with code {c}"),
            Exit::Signal(s) => write!(f, "killed by signal {s} ({})", signal_name(*s)),
            Exit::Unknown => write!(f, "exited"),
        }
    }
}

fn signal_name(sig: i32) -> &'static str {
    match sig {
        libc::SIGKILL => "SIGKILL",
        libc::SIGTERM => "SIGTERM",
        libc::SIGINT => "SIGINT",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGHUP => "SIGHUP",
        _ => "signal",
    }
}

pub struct Process {
    pid: u32,
    exit: watch::Receiver<Option<Exit>>,
}

impl Process {
    /// Spawns `cmd` and waits on it in the background.
    pub fn spawn(cmd: tokio::process::Command) -> std::io::Result<Process> {
        Self::spawn_then(cmd, false, None)
    }

    /// Like [`Process::spawn`], and runs `cleanup` once the process is gone. `own_pids`: the
    /// process starts as the first of a PID namespace of its own (see [`spawn_child`]).
    pub fn spawn_then(
        mut cmd: tokio::process::Command,
        own_pids: bool,
        cleanup: Option<Box<dyn FnOnce() + Send>>,
    ) -> std::io::Result<Process> {
        cmd.kill_on_drop(false);
        let mut child = spawn_child(&mut cmd, own_pids)?;
        let pid = child.id().unwrap_or(0);
        let (tx, exit) = watch::channel(None);
        tokio::spawn(async move {
            use std::os::unix::process::ExitStatusExt;
            let status = child.wait().await;
            let exit = match status {
                Ok(s) => match (s.code(), s.signal()) {
                    (Some(c), _) => Exit::Code(c),
                    (None, Some(sig)) => Exit::Signal(sig),
                    _ => Exit::Unknown,
                },
                Err(_) => Exit::Unknown,
            };
            if let Some(cleanup) = cleanup {
                cleanup();
            }
            let _ = tx.send(Some(exit));
        });
        Ok(Process { pid, exit })
    }

    /// Watches a process that is not our child (left running by an earlier platform process).
    pub fn attach(pid: u32) -> std::io::Result<Process> {
        Self::attach_then(pid, None)
    }

    /// Like [`Process::attach`], and runs `cleanup` once the process is gone.
    pub fn attach_then(pid: u32, cleanup: Option<Box<dyn FnOnce() + Send>>) -> std::io::Result<Process> {
        let fd = pidfd_open(pid)?;
        // SAFETY: the OwnedFd is open and moves into the AsyncFd, which owns it until dropped.
        let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
            .map_err(|e| e.into_parts().1)?;
        let (tx, exit) = watch::channel(None);
        tokio::spawn(async move {
            // A pidfd becomes readable when the process exits.
            let _ = fd.readable().await;
            if let Some(cleanup) = cleanup {
                cleanup();
            }
            let _ = tx.send(Some(Exit::Unknown));
        });
        Ok(Process { pid, exit })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn exited(&self) -> Option<Exit> {
        *self.exit.borrow()
    }

    pub fn watch(&self) -> watch::Receiver<Option<Exit>> {
        self.exit.clone()
    }

    pub async fn wait(&self) -> Exit {
        let mut rx = self.exit.clone();
        loop {
            if let Some(e) = *rx.borrow_and_update() {
                return e;
            }
            if rx.changed().await.is_err() {
                return Exit::Unknown;
            }
        }
    }

    pub fn signal(&self, sig: Signal) {
        if self.exited().is_none() {
            // The process has not been reaped yet (our waiter has not reported an exit), so
            // the pid still names it.
            if let Some(pid) = pid_of(self.pid) {
                let _ = rustix::process::kill_process(pid, sig);
            }
        }
    }
}

/// A positive pid as rustix's type (None for 0 and for what no pid can be).
pub fn pid_of(pid: u32) -> Option<Pid> {
    i32::try_from(pid).ok().and_then(Pid::from_raw)
}

/// `pidfd_open(pid, 0)`; a pid that cannot name a process fails as the kernel would (EINVAL).
fn pidfd_open(pid: u32) -> std::io::Result<OwnedFd> {
    let pid = pid_of(pid).ok_or(rustix::io::Errno::INVAL)?;
    Ok(rustix::process::pidfd_open(pid, PidfdFlags::empty())?)
}

/// Descriptors a child inherits at fixed numbers (QEMU's `fd=N` options name them).
///
/// Each is first duplicated above every target number, so the `dup2`s in the child cannot
/// overwrite one another; the duplicates are close-on-exec, the targets are not.
pub struct FdMap {
    moves: Vec<(OwnedFd, libc::c_int)>,
}

/// Duplicates are placed at or above this number, clear of the targets.
const FD_MAP_FLOOR: libc::c_int = 64;

impl FdMap {
    pub fn new() -> FdMap {
        FdMap { moves: Vec::new() }
    }

    /// The child gets `fd` as descriptor `target` (3 or more, below 64).
    pub fn add(&mut self, fd: &impl std::os::fd::AsRawFd, target: libc::c_int) -> std::io::Result<()> {
        assert!((3..FD_MAP_FLOOR).contains(&target), "fd target {target} out of range");
        // SAFETY: fcntl(F_DUPFD_CLOEXEC) on a descriptor the caller holds open returns a new
        // descriptor or -1; no pointers.
        let dup = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, FD_MAP_FLOOR) };
        if dup < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: `dup` is a fresh descriptor nothing else owns.
        self.moves.push((unsafe { OwnedFd::from_raw_fd(dup) }, target));
        Ok(())
    }

    /// Installs the descriptors in `cmd`'s child, before anything else runs there.
    pub fn install(self, cmd: &mut tokio::process::Command) {
        let moves: Vec<(libc::c_int, libc::c_int)> = self
            .moves
            .iter()
            .map(|(fd, t)| (std::os::fd::AsRawFd::as_raw_fd(fd), *t))
            .collect();
        // SAFETY: only dup2 on descriptors held open by `self` (moved into the closure, so
        // alive until the command is dropped), which is async-signal-safe.
        unsafe {
            cmd.pre_exec(move || {
                let _keep = &self.moves;
                for &(from, to) in &moves {
                    if libc::dup2(from, to) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
    }
}

/// Spawns `cmd`; with `own_pids`, as the first process (PID 1) of a new PID namespace, where
/// no other process of the host exists: a confined QEMU can neither signal nor even probe
/// (`kill(pid, 0)`) the platform or another computer's QEMU.
///
/// A process's own PID namespace never changes; `unshare(CLONE_NEWPID)` chooses the one its
/// *children* get. So the spawn happens on a short-lived thread that does just that, and ends
/// (the platform's other threads keep theirs).
pub fn spawn_child(cmd: &mut tokio::process::Command, own_pids: bool) -> std::io::Result<tokio::process::Child> {
    if !own_pids {
        return cmd.spawn();
    }
    // tokio registers the child with the runtime that spawns it.
    let runtime = tokio::runtime::Handle::try_current().ok();
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let _entered = runtime.as_ref().map(|r| r.enter());
                // SAFETY: unshare takes flags only; it affects this thread's future children.
                if unsafe { libc::unshare(libc::CLONE_NEWPID) } < 0 {
                    let e = std::io::Error::last_os_error();
                    return Err(std::io::Error::new(e.kind(), format!("making a PID namespace: {e}")));
                }
                cmd.spawn()
            })
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the thread spawning QEMU panicked")))
    })
}

impl Default for FdMap {
    fn default() -> Self {
        Self::new()
    }
}

/// Kills a process that is not our child and waits (up to `limit`) until it is gone, so
/// nothing of it can still touch its files when we do. Returns whether it is gone.
pub fn kill_and_wait(pid: u32, limit: std::time::Duration) -> bool {
    let fd = match pidfd_open(pid) {
        Ok(fd) => fd,
        // ESRCH: already gone.
        Err(e) => return e.raw_os_error() == Some(rustix::io::Errno::SRCH.raw_os_error()),
    };
    let _ = rustix::process::pidfd_send_signal(&fd, Signal::KILL);
    // A pidfd turns readable when its process has exited. The wait is in whole milliseconds,
    // as poll(2) takes it.
    let ms = limit.as_millis().min(i32::MAX as u128) as u64;
    let timeout = rustix::event::Timespec {
        tv_sec: (ms / 1000) as i64,
        tv_nsec: ((ms % 1000) * 1_000_000) as _,
    };
    let mut fds = [rustix::event::PollFd::new(&fd, rustix::event::PollFlags::IN)];
    matches!(rustix::event::poll(&mut fds, Some(&timeout)), Ok(n) if n > 0)
}

/// Whether a live process with this pid has a command line containing `needle`.
pub fn cmdline_contains(pid: u32, needle: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| {
            let c = String::from_utf8_lossy(&c).replace('\0', " ");
            c.contains(needle)
        })
        .unwrap_or(false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_child_exit_is_reported_with_its_cause() {
        let mut cmd = tokio::process::Command::new("sh");
        cmd.args(["-c", "exit 7"]);
        let p = Process::spawn(cmd).unwrap();
        assert_eq!(p.wait().await, Exit::Code(7));

        let mut cmd = tokio::process::Command::new("sleep");
        cmd.arg("30");
        let p = Process::spawn(cmd).unwrap();
        p.signal(Signal::KILL);
        let exit = p.wait().await;
        assert_eq!(exit, Exit::Signal(libc::SIGKILL));
        assert_eq!(exit.to_string(), "killed by signal 9 (SIGKILL)");
    }

    #[tokio::test]
    async fn mapped_descriptors_reach_the_child_at_their_numbers() {
        let (mut ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut fds = FdMap::new();
        fds.add(&theirs, 7).unwrap();
        let mut cmd = tokio::process::Command::new("sh");
        cmd.args(["-c", "echo through-7 >&7"]);
        fds.install(&mut cmd);
        let p = Process::spawn(cmd).unwrap();
        drop(theirs);
        assert_eq!(p.wait().await, Exit::Code(0));
        let mut got = String::new();
        std::io::Read::read_to_string(&mut ours, &mut got).unwrap();
        assert_eq!(got, "through-7\n");
    }

    #[test]
    fn a_killed_stranger_is_waited_for() {
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let pid = child.id();
        let reaper = std::thread::spawn(move || child.wait().unwrap());
        assert!(kill_and_wait(pid, std::time::Duration::from_secs(5)));
        assert!(!reaper.join().unwrap().success());
        // Gone and reaped: pidfd_open fails with ESRCH, which counts as gone.
        assert!(kill_and_wait(pid, std::time::Duration::from_secs(5)));
        // No pid at all: not a process that is gone.
        assert!(!kill_and_wait(0, std::time::Duration::from_secs(5)));
    }

    #[tokio::test]
    async fn an_attached_process_exit_is_seen() {
        let mut child = std::process::Command::new("sleep").arg("30").spawn().unwrap();
        let p = Process::attach(child.id()).unwrap();
        // Right after fork the child may not have exec'd yet.
        let t = std::time::Instant::now();
        while !cmdline_contains(child.id(), "sleep 30") {
            assert!(t.elapsed().as_secs() < 5, "the command line never showed up");
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(!cmdline_contains(child.id(), "something else"));
        assert_eq!(p.exited(), None);
        child.kill().unwrap();
        let waited = tokio::time::timeout(std::time::Duration::from_secs(5), p.wait()).await;
        assert_eq!(waited.expect("exit seen through the pidfd"), Exit::Unknown);
        child.wait().unwrap();
    }
}
