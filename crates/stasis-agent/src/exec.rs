//! Running one command for `exec`: spawn it in its own process group, capture stdout and
//! stderr up to a cap, enforce the timeout by killing the whole group.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::mpsc::Receiver;
use std::time::{Duration, Instant};

use stasis_agent_proto::{fit_exec_output, ExecRequest, ExecResult, MAX_OUTPUT_BYTES, TIMEOUT_EXIT_CODE};

pub(crate) const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
/// After the command exits, how long to keep reading output that its background children
/// may still be writing into the inherited pipes before answering.
const DRAIN_GRACE: Duration = Duration::from_millis(50);

pub fn run(req: &ExecRequest) -> ExecResult {
    let mut result = match run_inner(req) {
        Ok(r) => r,
        Err(e) => ExecResult {
            exit_code: 127,
            stdout: String::new(),
            stderr: format!("stasis-agent: cannot run {}: {e}\n", req.program),
            timed_out: false,
            truncated: false,
        },
    };
    // Control bytes take six bytes each in JSON: without this, 8 MiB of them on both streams
    // made a 96 MiB reply that no host accepts, sent again for every resent request.
    fit_exec_output(&mut result);
    result
}

/// The captured bytes as text, without a copy when they are valid UTF-8 (the usual case: the
/// guest may be small, and the reply is built next to the output already).
fn into_text(buf: Vec<u8>) -> String {
    String::from_utf8(buf).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// A command as every program the host starts sees it: a clean environment (the agent's
/// defaults, then the request's variables), `cwd` or `/root`, in its own process group.
pub(crate) fn command(
    program: &str,
    args: &[String],
    env: &[(String, String)],
    cwd: Option<&str>,
    term: &str,
) -> std::io::Result<Command> {
    if let Some(dir) = cwd {
        if !std::path::Path::new(dir).is_dir() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::NotFound,
                format!("working directory {dir} is not a directory"),
            ));
        }
    }
    let cwd = cwd.unwrap_or("/root");
    let mut cmd = Command::new(program);
    cmd.args(args)
        .env_clear()
        .env("PATH", DEFAULT_PATH)
        .env("HOME", "/root")
        .env("USER", "root")
        .env("LOGNAME", "root")
        .env("SHELL", "/bin/bash")
        .env("TERM", term)
        .env("LANG", "C.UTF-8")
        .envs(env.iter().map(|(k, v)| (k, v)))
        .current_dir(if std::path::Path::new(cwd).is_dir() { cwd } else { "/" });
    Ok(cmd)
}

fn run_inner(req: &ExecRequest) -> std::io::Result<ExecResult> {
    let mut cmd = command(&req.program, &req.args, &req.env, req.cwd.as_deref(), "dumb")?;
    cmd.stdin(if req.stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped())
    .process_group(0);
    let (mut child, exited) = crate::reaper::spawn(&mut cmd)?;
    let pgid = child.id() as libc::pid_t;

    if let (Some(data), Some(mut stdin)) = (req.stdin.clone(), child.stdin.take()) {
        std::thread::spawn(move || {
            let _ = stdin.write_all(data.as_bytes());
        });
    }
    let stdout = child.stdout.take().expect("stdout is piped");
    let stderr = child.stderr.take().expect("stderr is piped");
    let stderr_file: std::fs::File = std::os::fd::OwnedFd::from(stderr).into();
    let stdout_file: std::fs::File = std::os::fd::OwnedFd::from(stdout).into();
    let mut outputs = [Pipe::new(stdout_file), Pipe::new(stderr_file)];

    let deadline = Instant::now() + Duration::from_millis(req.timeout_ms.max(1));
    let mut exit_code: Option<i32> = None;
    let mut timed_out = false;
    let mut exited_at: Option<Instant> = None;
    loop {
        let got_data = if outputs.iter().any(|p| p.open) {
            poll_pipes(&mut outputs, Duration::from_millis(20))
        } else {
            false
        };
        if exit_code.is_none() {
            // With every pipe at end-of-file only the exit itself is left: wait for it rather
            // than spin (bounded by the deadline, checked below).
            let wait = if outputs.iter().any(|p| p.open) {
                Duration::ZERO
            } else {
                deadline
                    .saturating_duration_since(Instant::now())
                    .min(Duration::from_millis(100))
            };
            exit_code = check_exit(&exited, wait);
            if exit_code.is_some() {
                exited_at = Some(Instant::now());
            }
        }
        if outputs.iter().all(|p| !p.open) && exit_code.is_some() {
            break;
        }
        if let Some(at) = exited_at {
            if !got_data && at.elapsed() >= DRAIN_GRACE {
                break;
            }
        } else if Instant::now() >= deadline {
            timed_out = true;
            // SAFETY: kill takes no pointers; a negative pid names the process group.
            unsafe { libc::kill(-pgid, libc::SIGKILL) };
            let code = check_exit(&exited, Duration::from_secs(5));
            exit_code = Some(code.unwrap_or(TIMEOUT_EXIT_CODE));
            // Whatever the killed group wrote is still worth returning.
            poll_pipes(&mut outputs, Duration::ZERO);
            break;
        }
    }
    let truncated = outputs.iter().any(|p| p.truncated);
    let [out, err] = outputs;
    Ok(ExecResult {
        exit_code: if timed_out {
            TIMEOUT_EXIT_CODE
        } else {
            exit_code.unwrap_or(-1)
        },
        stdout: into_text(out.buf),
        stderr: into_text(err.buf),
        timed_out,
        truncated,
    })
}

fn check_exit(rx: &Receiver<i32>, wait: Duration) -> Option<i32> {
    if wait.is_zero() {
        return rx.try_recv().ok();
    }
    rx.recv_timeout(wait).ok()
}

struct Pipe {
    file: std::fs::File,
    buf: Vec<u8>,
    open: bool,
    truncated: bool,
}

impl Pipe {
    fn new(file: std::fs::File) -> Self {
        // SAFETY: fcntl on an fd we own, with integer arguments only.
        unsafe {
            let fd = file.as_raw_fd();
            let flags = libc::fcntl(fd, libc::F_GETFL);
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK);
        }
        Pipe {
            file,
            buf: Vec::new(),
            open: true,
            truncated: false,
        }
    }

    /// Reads what is available; returns whether anything arrived.
    fn drain(&mut self) -> bool {
        let mut chunk = [0u8; 64 * 1024];
        let mut got = false;
        loop {
            match self.file.read(&mut chunk) {
                Ok(0) => {
                    self.open = false;
                    return got;
                }
                Ok(n) => {
                    got = true;
                    let room = MAX_OUTPUT_BYTES.saturating_sub(self.buf.len());
                    if n > room {
                        self.truncated = true;
                    }
                    self.buf.extend_from_slice(&chunk[..n.min(room)]);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return got,
                Err(_) => {
                    self.open = false;
                    return got;
                }
            }
        }
    }
}

/// Waits up to `timeout` for output on the open pipes and reads it; returns whether any came.
fn poll_pipes(pipes: &mut [Pipe; 2], timeout: Duration) -> bool {
    let mut fds: Vec<libc::pollfd> = pipes
        .iter()
        .filter(|p| p.open)
        .map(|p| libc::pollfd {
            fd: p.file.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    if fds.is_empty() {
        std::thread::sleep(timeout);
        return false;
    }
    // SAFETY: fds is a valid array of pollfd of the given length.
    unsafe {
        libc::poll(
            fds.as_mut_ptr(),
            fds.len() as libc::nfds_t,
            timeout.as_millis() as libc::c_int,
        )
    };
    let mut got = false;
    for p in pipes.iter_mut().filter(|p| p.open) {
        got |= p.drain();
    }
    got
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bash(cmd: &str, timeout_ms: u64) -> ExecResult {
        crate::reaper::start_for_tests();
        run(&ExecRequest {
            program: "/bin/bash".into(),
            args: vec!["-c".into(), cmd.into()],
            env: vec![("GREETING".into(), "hi".into())],
            cwd: Some("/".into()),
            stdin: None,
            timeout_ms,
        })
    }

    #[test]
    fn captures_output_and_exit_code() {
        let r = bash("echo $GREETING; echo oops >&2; exit 3", 5000);
        assert_eq!(r.stdout, "hi\n");
        assert_eq!(r.stderr, "oops\n");
        assert_eq!(r.exit_code, 3);
        assert!(!r.timed_out);
    }

    #[test]
    fn timeout_kills_the_group_and_reports_124() {
        let start = Instant::now();
        let r = bash("echo started; sleep 30 & sleep 30", 300);
        assert!(start.elapsed() < Duration::from_secs(3), "took {:?}", start.elapsed());
        assert_eq!(r.exit_code, TIMEOUT_EXIT_CODE);
        assert!(r.timed_out);
        assert_eq!(r.stdout, "started\n");
    }

    #[test]
    fn a_background_child_holding_the_pipe_does_not_block_the_answer() {
        let start = Instant::now();
        let r = bash("sleep 20 & echo done", 30_000);
        assert!(start.elapsed() < Duration::from_secs(3), "took {:?}", start.elapsed());
        assert_eq!(r.exit_code, 0);
        assert_eq!(r.stdout, "done\n");
    }

    #[test]
    fn a_missing_program_is_an_error_not_a_panic() {
        crate::reaper::start_for_tests();
        let r = run(&ExecRequest {
            program: "/nonexistent/prog".into(),
            args: vec![],
            env: vec![],
            cwd: None,
            stdin: None,
            timeout_ms: 1000,
        });
        assert_eq!(r.exit_code, 127);
        assert!(r.stderr.contains("/nonexistent/prog"), "{}", r.stderr);
    }

    #[test]
    fn control_byte_floods_are_cut_to_fit_one_frame() {
        use stasis_agent_proto::{encode, Reply, Response, MAX_FRAME_BYTES};
        let r = bash(
            "head -c 8M /dev/zero | tr '\\0' '\\1'; head -c 9M /dev/zero | tr '\\0' '\\1' >&2",
            30_000,
        );
        assert_eq!(r.exit_code, 0);
        assert!(r.truncated);
        assert!(!r.stdout.is_empty() && r.stdout.bytes().all(|b| b == 1));
        let line = encode(&Response {
            id: u64::MAX,
            reply: Reply::Exec(r),
        });
        assert!(line.len() <= MAX_FRAME_BYTES, "{}", line.len());
    }

    #[test]
    fn plain_text_keeps_its_eight_mib() {
        let r = bash("yes | head -c 9M; yes abc | head -c 9M >&2", 30_000);
        assert!(r.truncated, "past 8 MiB");
        assert_eq!(r.stdout.len(), MAX_OUTPUT_BYTES);
        assert_eq!(r.stderr.len(), MAX_OUTPUT_BYTES);
    }

    #[test]
    fn stdin_is_fed_to_the_program() {
        crate::reaper::start_for_tests();
        let r = run(&ExecRequest {
            program: "cat".into(),
            args: vec![],
            env: vec![],
            cwd: None,
            stdin: Some("from stdin".into()),
            timeout_ms: 5000,
        });
        assert_eq!(r.stdout, "from stdin");
    }
}
