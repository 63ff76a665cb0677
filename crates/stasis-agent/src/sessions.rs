//! Sessions: programs the host streams (see `stasis_agent_proto::SessionOp` for the contract).
//!
//! Each session has a thread per output stream that moves what the program writes into a
//! bounded buffer, and a thread that waits for its exit; the host's reads, writes and signals
//! run on the request threads of `serve`. A buffer that is full stops its reader thread, so a
//! program writing faster than the host reads blocks in `write(2)`, as it would on a slow
//! terminal; a background session drops its oldest output instead.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use base64::Engine;
use stasis_agent_proto::{
    SessionErrorKind, SessionInfo, SessionOp, SessionReply, SessionStart, WinSize, MAX_READ_WAIT_MS, MAX_SESSIONS,
    ORPHAN_AFTER_MS, SESSION_BUFFER_BYTES, SESSION_CHUNK_BYTES,
};

const B64: base64::engine::general_purpose::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// After the program exits, how long output still written by its children (holding the
/// inherited pipes) is waited for before the exit is told.
const DRAIN_GRACE: Duration = Duration::from_millis(200);

/// Finished background sessions kept for their status and output.
const KEEP_FINISHED: usize = 32;

#[derive(Default)]
struct Stream {
    buf: VecDeque<u8>,
    /// Offset of `buf[0]` in everything the stream produced.
    base: u64,
    eof: bool,
}

impl Stream {
    fn end(&self) -> u64 {
        self.base + self.buf.len() as u64
    }

    fn drop_before(&mut self, offset: u64) {
        let n = offset.saturating_sub(self.base).min(self.buf.len() as u64) as usize;
        self.buf.drain(..n);
        self.base += n as u64;
    }

    /// Up to [`SESSION_CHUNK_BYTES`] from `from` (or from the oldest byte kept, if later).
    fn chunk_from(&self, from: u64) -> (u64, Vec<u8>) {
        let at = from.max(self.base);
        let skip = (at - self.base) as usize;
        let (a, b) = self.buf.as_slices();
        let bytes = a
            .iter()
            .chain(b)
            .skip(skip)
            .take(SESSION_CHUNK_BYTES)
            .copied()
            .collect();
        (at, bytes)
    }
}

struct State {
    out: Stream,
    err: Stream,
    exit: Option<i32>,
    exited_at: Option<Instant>,
    /// Last time the host asked anything of this session.
    touched: Instant,
    closed: bool,
}

impl State {
    /// The program has ended and nothing more will be written to its streams.
    fn finished(&self) -> bool {
        match self.exited_at {
            Some(at) => (self.out.eof && self.err.eof) || at.elapsed() >= DRAIN_GRACE,
            None => false,
        }
    }
}

struct Session {
    id: u64,
    pid: i32,
    program: String,
    args: Vec<String>,
    background: bool,
    started_ms: i64,
    state: Mutex<State>,
    changed: Condvar,
    /// Where input goes: the pipe to stdin, or the terminal's master side. Held while a write
    /// runs, so writes are applied in order; `None` once input is closed.
    input: Mutex<Input>,
    /// The terminal's master side, for resizing.
    pty: Option<File>,
    stop: AtomicBool,
}

struct Input {
    file: Option<File>,
    /// Bytes of input accepted so far.
    total: u64,
}

impl Session {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn kill(&self, signal: i32) {
        if self.lock().exit.is_none() {
            // SAFETY: kill takes no pointers; a negative pid names the process group.
            unsafe { libc::kill(-self.pid, signal) };
        }
    }

    fn info(&self) -> SessionInfo {
        let st = self.lock();
        SessionInfo {
            session: self.id,
            pid: self.pid,
            program: self.program.clone(),
            args: self.args.clone(),
            pty: self.pty.is_some(),
            background: self.background,
            started_ms: self.started_ms,
            exit_code: st.finished().then_some(st.exit).flatten(),
            stdout_bytes: st.out.end(),
            stderr_bytes: st.err.end(),
        }
    }
}

#[derive(Default)]
struct Registry {
    sessions: HashMap<u64, Arc<Session>>,
}

static REGISTRY: Mutex<Option<Registry>> = Mutex::new(None);
static NEXT_ID: AtomicU64 = AtomicU64::new(1);

fn registry() -> std::sync::MutexGuard<'static, Option<Registry>> {
    REGISTRY.lock().unwrap_or_else(|p| p.into_inner())
}

fn find(id: u64) -> Result<Arc<Session>, SessionReply> {
    registry()
        .get_or_insert_with(Registry::default)
        .sessions
        .get(&id)
        .cloned()
        .ok_or_else(|| failed(SessionErrorKind::NotFound, format!("no session {id}")))
}

fn failed(kind: SessionErrorKind, message: String) -> SessionReply {
    SessionReply::Failed { kind, message }
}

pub fn run(op: SessionOp) -> SessionReply {
    let result = match op {
        SessionOp::Start(start) => self::start(start),
        SessionOp::Read {
            session,
            stdout_from,
            stderr_from,
            wait_ms,
        } => find(session).and_then(|s| read(&s, stdout_from, stderr_from, wait_ms)),
        SessionOp::Write { session, at, data } => find(session).and_then(|s| write(&s, at, &data)),
        SessionOp::CloseStdin { session } => find(session).and_then(|s| close_input(&s)),
        SessionOp::Resize { session, size } => find(session).and_then(|s| resize(&s, size)),
        SessionOp::Signal { session, signal } => find(session).map(|s| {
            touch(&s);
            s.kill(signal);
            SessionReply::Done
        }),
        SessionOp::Close { session } => {
            if let Ok(s) = find(session) {
                close(&s);
            }
            // Closing what is already gone is done as asked (a resent close, say).
            Ok(SessionReply::Done)
        }
        SessionOp::List => {
            let mut sessions: Vec<SessionInfo> = live().iter().map(|s| s.info()).collect();
            sessions.sort_by_key(|s| s.session);
            Ok(SessionReply::Sessions { sessions })
        }
    };
    result.unwrap_or_else(|e| e)
}

fn live() -> Vec<Arc<Session>> {
    registry()
        .get_or_insert_with(Registry::default)
        .sessions
        .values()
        .cloned()
        .collect()
}

fn touch(s: &Session) {
    s.lock().touched = Instant::now();
}

fn start(req: SessionStart) -> Result<SessionReply, SessionReply> {
    {
        let mut reg = registry();
        let reg = reg.get_or_insert_with(Registry::default);
        let running = reg.sessions.values().filter(|s| !s.lock().finished()).count() as u32;
        let limit = req.limit.min(MAX_SESSIONS);
        if running >= limit {
            return Err(failed(
                SessionErrorKind::TooMany,
                format!("{running} sessions are running, the most allowed is {limit}"),
            ));
        }
        if reg.sessions.len() as u32 >= MAX_SESSIONS {
            forget_oldest_finished(reg);
        }
    }
    let term = if req.pty.is_some() { "xterm-256color" } else { "dumb" };
    let mut cmd = crate::exec::command(&req.program, &req.args, &req.env, req.cwd.as_deref(), term)
        .map_err(|e| failed(SessionErrorKind::Spawn, format!("cannot run {}: {e}", req.program)))?;
    let spawn_error = |e: std::io::Error| failed(SessionErrorKind::Spawn, format!("cannot run {}: {e}", req.program));

    let (child, exited, input, outputs, pty) = match req.pty {
        Some(size) => {
            let (master, slave) = open_pty(size).map_err(spawn_error)?;
            let io = |f: &OwnedFd| f.try_clone().map(Stdio::from);
            cmd.stdin(io(&slave).map_err(spawn_error)?)
                .stdout(io(&slave).map_err(spawn_error)?)
                .stderr(io(&slave).map_err(spawn_error)?);
            // SAFETY: between fork and exec only async-signal-safe calls: a new session whose
            // controlling terminal is the pty (now stdin).
            unsafe {
                cmd.pre_exec(|| {
                    if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
            let (child, exited) = crate::reaper::spawn(&mut cmd).map_err(spawn_error)?;
            drop(slave);
            drop(cmd);
            let master = File::from(master);
            let writer = master.try_clone().map_err(spawn_error)?;
            let reader = master.try_clone().map_err(spawn_error)?;
            (child, exited, Some(writer), vec![(reader, true)], Some(master))
        }
        None => {
            cmd.stdin(Stdio::piped())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .process_group(0);
            let (mut child, exited) = crate::reaper::spawn(&mut cmd).map_err(spawn_error)?;
            let stdin = child.stdin.take().map(|p| File::from(OwnedFd::from(p)));
            let out = child.stdout.take().map(|p| File::from(OwnedFd::from(p)));
            let err = child.stderr.take().map(|p| File::from(OwnedFd::from(p)));
            let outputs = [(out, true), (err, false)]
                .into_iter()
                .filter_map(|(f, is_out)| f.map(|f| (f, is_out)))
                .collect();
            (child, exited, stdin, outputs, None)
        }
    };
    let id = NEXT_ID.fetch_add(1, Ordering::Relaxed);
    let started_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    let session = Arc::new(Session {
        id,
        pid: child.id() as i32,
        program: req.program.clone(),
        args: req.args.clone(),
        background: req.background,
        started_ms,
        state: Mutex::new(State {
            out: Stream::default(),
            // A terminal has one stream: stderr ends before it starts.
            err: Stream {
                eof: pty.is_some(),
                ..Stream::default()
            },
            exit: None,
            exited_at: None,
            touched: Instant::now(),
            closed: false,
        }),
        changed: Condvar::new(),
        input: Mutex::new(Input { file: input, total: 0 }),
        pty,
        stop: AtomicBool::new(false),
    });
    for (file, is_out) in outputs {
        let s = session.clone();
        std::thread::Builder::new()
            .name(format!("session-{id}-out"))
            .spawn(move || pump(&s, file, is_out))
            .map_err(spawn_error)?;
    }
    let s = session.clone();
    std::thread::Builder::new()
        .name(format!("session-{id}-wait"))
        .spawn(move || {
            let code = exited.recv().unwrap_or(-1);
            let mut st = s.lock();
            st.exit = Some(code);
            st.exited_at = Some(Instant::now());
            drop(st);
            s.changed.notify_all();
        })
        .map_err(spawn_error)?;
    drop(child);
    registry()
        .get_or_insert_with(Registry::default)
        .sessions
        .insert(id, session.clone());
    ensure_sweeper();
    Ok(SessionReply::Started {
        session: id,
        pid: session.pid,
    })
}

/// A pseudo-terminal pair of the given size; both ends close on exec.
fn open_pty(size: WinSize) -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut master: libc::c_int = -1;
    let mut slave: libc::c_int = -1;
    let ws = winsize(size);
    // SAFETY: valid out-pointers for the two descriptors and a valid winsize; no name buffer
    // and no termios (the defaults).
    let rc = unsafe { libc::openpty(&mut master, &mut slave, std::ptr::null_mut(), std::ptr::null(), &ws) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: openpty returned two open descriptors that nothing else owns.
    let (master, slave) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    for fd in [&master, &slave] {
        // SAFETY: fcntl on a descriptor we own, with integer arguments only.
        unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    Ok((master, slave))
}

fn winsize(size: WinSize) -> libc::winsize {
    libc::winsize {
        ws_row: size.rows.max(1),
        ws_col: size.cols.max(1),
        ws_xpixel: 0,
        ws_ypixel: 0,
    }
}

/// Moves one output stream into its buffer until it ends or the session is closed.
fn pump(s: &Session, mut file: File, is_out: bool) {
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        if !wait_readable(&file, s) {
            break;
        }
        let n = match file.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            // A terminal's master reads EIO once every process holding the other side is gone.
            Err(_) => break,
        };
        let mut st = s.lock();
        if !s.background {
            // Full: wait for the host to take some (or for the session to end).
            while !st.closed && stream(&mut st, is_out).buf.len() >= SESSION_BUFFER_BYTES {
                st = s.changed.wait(st).unwrap_or_else(|p| p.into_inner());
            }
            if st.closed {
                break;
            }
        }
        let stream = stream(&mut st, is_out);
        stream.buf.extend(&chunk[..n]);
        if s.background && stream.buf.len() > SESSION_BUFFER_BYTES {
            let end = stream.end();
            stream.drop_before(end - SESSION_BUFFER_BYTES as u64);
        }
        drop(st);
        s.changed.notify_all();
    }
    let mut st = s.lock();
    stream(&mut st, is_out).eof = true;
    drop(st);
    s.changed.notify_all();
}

fn stream(st: &mut State, is_out: bool) -> &mut Stream {
    if is_out {
        &mut st.out
    } else {
        &mut st.err
    }
}

/// Waits until `file` has something to read (or is at its end); false once the session is
/// stopped. Polls in steps, so a stopped session's thread ends even while a child it left
/// behind holds the pipe open.
fn wait_readable(file: &File, s: &Session) -> bool {
    loop {
        if s.stop.load(Ordering::Relaxed) {
            return false;
        }
        let mut fd = libc::pollfd {
            fd: file.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let rc = unsafe { libc::poll(&mut fd, 1, 500) };
        if rc > 0 {
            return true;
        }
    }
}

fn read(s: &Session, stdout_from: u64, stderr_from: u64, wait_ms: u32) -> Result<SessionReply, SessionReply> {
    let deadline = Instant::now() + Duration::from_millis(wait_ms.min(MAX_READ_WAIT_MS) as u64);
    let mut st = s.lock();
    st.touched = Instant::now();
    if stdout_from > st.out.end() || stderr_from > st.err.end() {
        return Err(failed(
            SessionErrorKind::Invalid,
            format!(
                "read from ({stdout_from}, {stderr_from}) is past the output so far ({}, {})",
                st.out.end(),
                st.err.end()
            ),
        ));
    }
    if !s.background {
        // What the host names as had is had: the room goes to the program.
        st.out.drop_before(stdout_from);
        st.err.drop_before(stderr_from);
        s.changed.notify_all();
    }
    loop {
        let new = st.out.end() > stdout_from || st.err.end() > stderr_from;
        let now = Instant::now();
        if new || st.finished() || now >= deadline {
            break;
        }
        // Woken by output, the exit and the end of a stream; the step bounds the wait for
        // the drain grace after an exit, which nothing signals.
        let step = (deadline - now).min(Duration::from_millis(50));
        st = s.changed.wait_timeout(st, step).unwrap_or_else(|p| p.into_inner()).0;
    }
    let (stdout_at, out) = st.out.chunk_from(stdout_from);
    let (stderr_at, err) = st.err.chunk_from(stderr_from);
    let all = stdout_at + out.len() as u64 == st.out.end() && stderr_at + err.len() as u64 == st.err.end();
    let exit_code = if st.finished() && all { st.exit } else { None };
    Ok(SessionReply::Output {
        stdout: B64.encode(out),
        stdout_at,
        stderr: B64.encode(err),
        stderr_at,
        exit_code,
    })
}

fn write(s: &Session, at: u64, data: &str) -> Result<SessionReply, SessionReply> {
    touch(s);
    let bytes = B64
        .decode(data)
        .map_err(|e| failed(SessionErrorKind::Invalid, format!("input is not base64 ({e})")))?;
    let mut input = s.input.lock().unwrap_or_else(|p| p.into_inner());
    if at > input.total {
        return Err(failed(
            SessionErrorKind::Invalid,
            format!("input at byte {at} leaves a gap after byte {}", input.total),
        ));
    }
    let skip = (input.total - at) as usize;
    if skip >= bytes.len() {
        return Ok(SessionReply::Written { total: input.total });
    }
    let total = input.total;
    let Some(file) = input.file.as_mut() else {
        return Err(failed(
            SessionErrorKind::InputClosed,
            "the session's input is closed".into(),
        ));
    };
    // A program that does not read its input holds this thread here, as it would hold a
    // writer on a pipe; killing or closing the session ends the wait.
    match file.write_all(&bytes[skip..]) {
        Ok(()) => {
            input.total = total + (bytes.len() - skip) as u64;
            Ok(SessionReply::Written { total: input.total })
        }
        Err(e) => Err(failed(
            SessionErrorKind::InputClosed,
            format!("the program no longer reads its input ({e})"),
        )),
    }
}

fn close_input(s: &Session) -> Result<SessionReply, SessionReply> {
    touch(s);
    let mut input = s.input.lock().unwrap_or_else(|p| p.into_inner());
    if s.pty.is_some() {
        // A terminal stays open; its end-of-file character (^D) ends a read at a line start.
        if let Some(f) = input.file.as_mut() {
            let _ = f.write_all(&[0x04]);
        }
    } else {
        input.file = None;
    }
    Ok(SessionReply::Done)
}

fn resize(s: &Session, size: WinSize) -> Result<SessionReply, SessionReply> {
    touch(s);
    let Some(master) = &s.pty else {
        return Err(failed(
            SessionErrorKind::Invalid,
            format!("session {} has no terminal to resize", s.id),
        ));
    };
    let ws = winsize(size);
    // SAFETY: TIOCSWINSZ reads one winsize through a valid pointer; the kernel tells the
    // terminal's foreground group (SIGWINCH).
    let rc = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &ws) };
    if rc != 0 {
        return Err(failed(
            SessionErrorKind::Invalid,
            format!("resizing the terminal: {}", std::io::Error::last_os_error()),
        ));
    }
    Ok(SessionReply::Done)
}

/// Kills what runs and forgets the session.
fn close(s: &Arc<Session>) {
    s.kill(libc::SIGKILL);
    s.stop.store(true, Ordering::Relaxed);
    s.lock().closed = true;
    s.changed.notify_all();
    // Ends a write blocked on a full pipe or terminal (the readers are dead, so it fails).
    s.input.lock().unwrap_or_else(|p| p.into_inner()).file = None;
    if let Some(reg) = registry().as_mut() {
        reg.sessions.remove(&s.id);
    }
}

fn forget_oldest_finished(reg: &mut Registry) {
    let oldest = reg
        .sessions
        .values()
        .filter(|s| s.lock().finished())
        .min_by_key(|s| s.id)
        .map(|s| s.id);
    if let Some(id) = oldest {
        reg.sessions.remove(&id);
    }
}

/// Ends every session a host was attached to (after a restore: their clients belong to the
/// original machine). Background sessions run on.
pub fn end_attached() -> usize {
    let attached: Vec<_> = live().into_iter().filter(|s| !s.background).collect();
    for s in &attached {
        close(s);
    }
    attached.len()
}

fn ensure_sweeper() {
    static STARTED: std::sync::Once = std::sync::Once::new();
    STARTED.call_once(|| {
        let _ = std::thread::Builder::new().name("sessions".into()).spawn(|| loop {
            std::thread::sleep(Duration::from_secs(2));
            sweep(Duration::from_millis(ORPHAN_AFTER_MS));
        });
    });
}

/// Kills attached sessions nobody asked after for `orphan_after`, and keeps only the newest
/// [`KEEP_FINISHED`] finished background ones.
fn sweep(orphan_after: Duration) {
    for s in live() {
        if !s.background && s.lock().touched.elapsed() >= orphan_after {
            crate::log(&format!(
                "session {} ({}): no host for {orphan_after:?}, ended",
                s.id, s.program
            ));
            close(&s);
        }
    }
    let mut finished: Vec<_> = live()
        .into_iter()
        .filter(|s| s.background && s.lock().finished())
        .collect();
    finished.sort_by_key(|s| std::cmp::Reverse(s.id));
    for s in finished.iter().skip(KEEP_FINISHED) {
        close(s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn start_bash(script: &str, pty: Option<WinSize>, background: bool) -> u64 {
        crate::reaper::start_for_tests();
        match run(SessionOp::Start(SessionStart {
            program: "/bin/bash".into(),
            args: vec!["-c".into(), script.into()],
            env: vec![("GREETING".into(), "hi".into())],
            cwd: Some("/tmp".into()),
            pty,
            background,
            limit: 16,
        })) {
            SessionReply::Started { session, .. } => session,
            other => panic!("start: {other:?}"),
        }
    }

    /// Reads everything until the exit, acknowledging as it goes.
    fn drain(id: u64) -> (Vec<u8>, Vec<u8>, i32) {
        let (mut out, mut err) = (Vec::new(), Vec::new());
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            assert!(Instant::now() < deadline, "session {id} did not end");
            let reply = run(SessionOp::Read {
                session: id,
                stdout_from: out.len() as u64,
                stderr_from: err.len() as u64,
                wait_ms: 1000,
            });
            let SessionReply::Output {
                stdout,
                stdout_at,
                stderr,
                stderr_at,
                exit_code,
            } = reply
            else {
                panic!("read: {reply:?}")
            };
            assert_eq!(stdout_at, out.len() as u64);
            assert_eq!(stderr_at, err.len() as u64);
            out.extend(B64.decode(stdout).unwrap());
            err.extend(B64.decode(stderr).unwrap());
            if let Some(code) = exit_code {
                return (out, err, code);
            }
        }
    }

    fn write_at(id: u64, at: u64, data: &[u8]) -> SessionReply {
        run(SessionOp::Write {
            session: id,
            at,
            data: B64.encode(data),
        })
    }

    #[test]
    fn streams_stdin_to_both_outputs_and_reports_the_exit() {
        let id = start_bash(
            "echo start $GREETING $PWD; read line; echo got $line >&2; exit 7",
            None,
            false,
        );
        assert_eq!(write_at(id, 0, b"hello\n"), SessionReply::Written { total: 6 });
        // Resent: nothing is written twice.
        assert_eq!(write_at(id, 0, b"hello\n"), SessionReply::Written { total: 6 });
        assert!(matches!(
            write_at(id, 9, b"x"),
            SessionReply::Failed {
                kind: SessionErrorKind::Invalid,
                ..
            }
        ));
        let (out, err, code) = drain(id);
        assert_eq!(String::from_utf8(out).unwrap(), "start hi /tmp\n");
        assert_eq!(String::from_utf8(err).unwrap(), "got hello\n");
        assert_eq!(code, 7);
        assert_eq!(run(SessionOp::Close { session: id }), SessionReply::Done);
        assert!(matches!(
            run(SessionOp::Read {
                session: id,
                stdout_from: 0,
                stderr_from: 0,
                wait_ms: 0
            }),
            SessionReply::Failed {
                kind: SessionErrorKind::NotFound,
                ..
            }
        ));
    }

    #[test]
    fn a_resent_read_gets_the_same_bytes() {
        let id = start_bash("printf abc; sleep 0.2; printf def", None, false);
        std::thread::sleep(Duration::from_millis(100));
        let first = run(SessionOp::Read {
            session: id,
            stdout_from: 0,
            stderr_from: 0,
            wait_ms: 1000,
        });
        let again = run(SessionOp::Read {
            session: id,
            stdout_from: 0,
            stderr_from: 0,
            wait_ms: 1000,
        });
        let SessionReply::Output { stdout: a, .. } = &first else {
            panic!("{first:?}")
        };
        let SessionReply::Output { stdout: b, .. } = &again else {
            panic!("{again:?}")
        };
        assert!(B64.decode(b).unwrap().starts_with(&B64.decode(a).unwrap()));
        let (out, _, code) = drain(id);
        assert_eq!(out, b"abcdef");
        assert_eq!(code, 0);
        run(SessionOp::Close { session: id });
    }

    #[test]
    fn a_fast_writer_waits_for_the_reader_and_loses_nothing() {
        // 4 MiB through a 1 MiB buffer.
        let id = start_bash(
            "head -c 4194304 /dev/zero | tr '\\0' 'x'; echo; echo done >&2",
            None,
            false,
        );
        let (out, err, code) = drain(id);
        assert_eq!(out.len(), 4 * 1024 * 1024 + 1);
        assert!(out[..4 * 1024 * 1024].iter().all(|b| *b == b'x'));
        assert_eq!(err, b"done\n");
        assert_eq!(code, 0);
        run(SessionOp::Close { session: id });
    }

    #[test]
    fn a_terminal_has_a_tty_of_its_size_and_takes_signals() {
        let id = start_bash(
            "stty size; tty >/dev/null && echo is-a-tty; sleep 30",
            Some(WinSize { rows: 33, cols: 101 }),
            false,
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut out = Vec::new();
        while !String::from_utf8_lossy(&out).contains("is-a-tty") {
            assert!(Instant::now() < deadline, "{}", String::from_utf8_lossy(&out));
            if let SessionReply::Output { stdout, .. } = run(SessionOp::Read {
                session: id,
                stdout_from: out.len() as u64,
                stderr_from: 0,
                wait_ms: 500,
            }) {
                out.extend(B64.decode(stdout).unwrap());
            }
        }
        assert!(
            String::from_utf8_lossy(&out).contains("33 101"),
            "{}",
            String::from_utf8_lossy(&out)
        );
        assert_eq!(
            run(SessionOp::Resize {
                session: id,
                size: WinSize { rows: 10, cols: 20 }
            }),
            SessionReply::Done
        );
        assert_eq!(
            run(SessionOp::Signal {
                session: id,
                signal: 15
            }),
            SessionReply::Done
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        let code = loop {
            assert!(Instant::now() < deadline);
            if let SessionReply::Output { stdout, exit_code, .. } = run(SessionOp::Read {
                session: id,
                stdout_from: out.len() as u64,
                stderr_from: 0,
                wait_ms: 500,
            }) {
                out.extend(B64.decode(stdout).unwrap());
                if let Some(c) = exit_code {
                    break c;
                }
            }
        };
        assert_eq!(code, 128 + 15);
        run(SessionOp::Close { session: id });
    }

    #[test]
    fn orphans_are_killed_and_background_sessions_keep_their_newest_output() {
        let orphan = start_bash("sleep 60", None, false);
        let bg = start_bash("head -c 3000000 /dev/zero; echo tail", None, true);
        // Other tests run sessions beside this one: only this one is made to look forgotten.
        let long_ago = Instant::now()
            .checked_sub(Duration::from_secs(3600))
            .unwrap_or_else(Instant::now);
        find(orphan).unwrap().lock().touched = long_ago;
        sweep(Duration::from_secs(600));
        assert!(find(orphan).is_err(), "an attached session nobody asks after is ended");
        let deadline = Instant::now() + Duration::from_secs(20);
        while find(bg).unwrap().info().exit_code.is_none() {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(50));
        }
        let SessionReply::Output { stdout, stdout_at, .. } = run(SessionOp::Read {
            session: bg,
            stdout_from: 0,
            stderr_from: 0,
            wait_ms: 0,
        }) else {
            panic!()
        };
        assert_eq!(stdout_at, 3_000_005 - SESSION_BUFFER_BYTES as u64);
        assert!(B64.decode(stdout).unwrap().len() <= SESSION_CHUNK_BYTES);
        run(SessionOp::Close { session: bg });
    }

    #[test]
    fn the_limit_and_bad_programs_are_clear_errors() {
        crate::reaper::start_for_tests();
        let start = |program: &str, limit| {
            run(SessionOp::Start(SessionStart {
                program: program.into(),
                args: vec!["5".into()],
                env: vec![],
                cwd: None,
                pty: None,
                background: false,
                limit,
            }))
        };
        assert!(matches!(
            start("/nonexistent/program", 16),
            SessionReply::Failed {
                kind: SessionErrorKind::Spawn,
                ..
            }
        ));
        assert!(matches!(
            start("sleep", 0),
            SessionReply::Failed {
                kind: SessionErrorKind::TooMany,
                ..
            }
        ));
    }
}
