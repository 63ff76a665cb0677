//! A QMP client on QEMU's monitor socket: commands matched to answers by id, events broadcast.
//!
//! QEMU may be under the control of a guest that escaped into it, so its lines are read with
//! a bounded [`LineReader`]: a line past [`MAX_QMP_LINE_BYTES`] is skipped without being held.

use std::collections::HashMap;
use std::io::IoSlice;
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use stasis_agent_proto::{LineReader, Next};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::{broadcast, oneshot};

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("connecting to QMP at {path}: {source}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("QMP connection closed")]
    Closed,
    #[error("QMP command {command} timed out")]
    Timeout { command: String },
    #[error("QMP command {command} failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
    #[error("QMP I/O: {0}")]
    Io(#[from] std::io::Error),
}

/// Longest QMP line read. The answers this platform asks for (`query-status`, `query-block`,
/// `query-migrate`, ...) and events are a few KiB at most; this leaves a wide margin.
pub const MAX_QMP_LINE_BYTES: usize = 16 * 1024 * 1024;

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Result<Value, (String, String)>>>>>;

pub struct Qmp {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    pending: Pending,
    events: broadcast::Sender<Value>,
    next_id: AtomicU64,
    line_buffer_peak: Arc<std::sync::atomic::AtomicUsize>,
}

impl Qmp {
    /// Connects (retrying while QEMU creates the socket) and negotiates capabilities.
    pub async fn connect(path: &Path, wait: Duration) -> Result<Arc<Qmp>, QmpError> {
        let deadline = tokio::time::Instant::now() + wait;
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(s) => break s,
                Err(e) if tokio::time::Instant::now() < deadline => {
                    let _ = e;
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                Err(source) => {
                    return Err(QmpError::Connect {
                        path: path.display().to_string(),
                        source,
                    })
                }
            }
        };
        let (read, write) = stream.into_split();
        let mut reader = BufReader::new(read);
        let mut lines = LineReader::new(MAX_QMP_LINE_BYTES);
        // The greeting comes first.
        match tokio::time::timeout(wait.max(Duration::from_secs(5)), lines.read_line_async(&mut reader)).await {
            Ok(Ok(Next::Line)) => {}
            Ok(Ok(Next::Oversized { len })) => {
                return Err(QmpError::Io(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("a {len}-byte QMP greeting, over {MAX_QMP_LINE_BYTES}"),
                )))
            }
            Ok(Ok(Next::Eof)) => return Err(QmpError::Closed),
            Ok(Err(e)) => return Err(QmpError::Io(e)),
            Err(_) => {
                return Err(QmpError::Timeout {
                    command: "greeting".into(),
                })
            }
        }
        let pending: Pending = Arc::default();
        let (events, _) = broadcast::channel(1024);
        let line_buffer_peak = Arc::new(std::sync::atomic::AtomicUsize::new(lines.peak_capacity()));
        let qmp = Arc::new(Qmp {
            writer: tokio::sync::Mutex::new(write),
            pending: pending.clone(),
            events: events.clone(),
            next_id: AtomicU64::new(1),
            line_buffer_peak: line_buffer_peak.clone(),
        });
        tokio::spawn(async move {
            loop {
                let next = lines.read_line_async(&mut reader).await;
                line_buffer_peak.store(lines.peak_capacity(), Ordering::Relaxed);
                match next {
                    Ok(Next::Line) => {}
                    Ok(Next::Oversized { len }) => {
                        // QMP puts the id last, so the command it answered cannot be told; that
                        // command times out.
                        tracing::warn!(len, "dropped a QMP line over {MAX_QMP_LINE_BYTES} bytes");
                        continue;
                    }
                    Ok(Next::Eof) | Err(_) => break,
                }
                let Ok(msg) = serde_json::from_slice::<Value>(lines.line()) else {
                    continue;
                };
                if msg.get("event").is_some() {
                    let _ = events.send(msg);
                    continue;
                }
                let Some(id) = msg.get("id").and_then(Value::as_u64) else {
                    continue;
                };
                let waiter = pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
                if let Some(tx) = waiter {
                    let result = match msg.get("error") {
                        Some(err) => Err((
                            err.get("class").and_then(Value::as_str).unwrap_or("Error").to_string(),
                            err.get("desc").and_then(Value::as_str).unwrap_or("").to_string(),
                        )),
                        None => Ok(msg.get("return").cloned().unwrap_or(Value::Null)),
                    };
                    let _ = tx.send(result);
                }
            }
            // Connection gone: every waiter learns it by its sender being dropped.
            pending.lock().unwrap_or_else(|p| p.into_inner()).clear();
        });
        qmp.execute("qmp_capabilities", json!({})).await?;
        Ok(qmp)
    }

    /// The most memory the reader's line buffer has held: at most [`MAX_QMP_LINE_BYTES`]
    /// whatever QEMU sends (checked by the regression tests).
    pub fn line_buffer_peak(&self) -> usize {
        self.line_buffer_peak.load(Ordering::Relaxed)
    }

    pub async fn execute(&self, command: &str, arguments: Value) -> Result<Value, QmpError> {
        self.execute_timeout(command, arguments, Duration::from_secs(30)).await
    }

    pub async fn execute_timeout(&self, command: &str, arguments: Value, wait: Duration) -> Result<Value, QmpError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).insert(id, tx);
        let mut line = serde_json::to_vec(&json!({"execute": command, "arguments": arguments, "id": id}))
            .expect("a JSON value serializes");
        line.push(b'\n');
        {
            let mut w = self.writer.lock().await;
            if let Err(e) = w.write_all(&line).await {
                self.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
                return Err(QmpError::Io(e));
            }
        }
        match tokio::time::timeout(wait, rx).await {
            Ok(Ok(Ok(v))) => Ok(v),
            Ok(Ok(Err((class, desc)))) => Err(QmpError::Command {
                command: command.to_string(),
                class,
                desc,
            }),
            Ok(Err(_)) => Err(QmpError::Closed),
            Err(_) => {
                self.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
                Err(QmpError::Timeout {
                    command: command.to_string(),
                })
            }
        }
    }

    /// Hands QEMU an open file as `name` (`getfd`: the descriptor travels with the command as
    /// SCM_RIGHTS), for `fd:name` migration URIs. QEMU keeps its own copy.
    pub async fn send_fd(&self, name: &str, file: &impl AsFd) -> Result<(), QmpError> {
        self.execute_with_fd("getfd", json!({ "fdname": name }), file).await?;
        Ok(())
    }

    /// Runs `command` with an open file travelling beside it (SCM_RIGHTS), as `getfd` and
    /// `add-fd` take theirs.
    async fn execute_with_fd(&self, command: &str, arguments: Value, file: &impl AsFd) -> Result<Value, QmpError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).insert(id, tx);
        let mut line = serde_json::to_vec(&json!({"execute": command, "arguments": arguments, "id": id}))
            .expect("a JSON value serializes");
        line.push(b'\n');
        {
            let w = self.writer.lock().await;
            let socket: &UnixStream = w.as_ref();
            loop {
                socket.writable().await?;
                match send_with_fd(socket.as_fd(), &line, file.as_fd()) {
                    Ok(n) if n == line.len() => break,
                    Ok(_) => {
                        self.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
                        return Err(QmpError::Io(std::io::Error::other(format!(
                            "{command} was sent in part"
                        ))));
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(e) => {
                        self.pending.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
                        return Err(QmpError::Io(e));
                    }
                }
            }
        }
        match tokio::time::timeout(Duration::from_secs(30), rx).await {
            Ok(Ok(Ok(v))) => Ok(v),
            Ok(Ok(Err((class, desc)))) => Err(QmpError::Command {
                command: command.into(),
                class,
                desc,
            }),
            Ok(Err(_)) => Err(QmpError::Closed),
            Err(_) => Err(QmpError::Timeout {
                command: command.into(),
            }),
        }
    }

    /// Writes the machine's device state without its RAM (every section but RAM's, as a
    /// migration stream a restore loads) into a new file at `path`, with the guest paused.
    /// QEMU writes through a descriptor it is handed (an fd set), never opening a path.
    pub async fn save_device_state(&self, path: &Path) -> Result<(), QmpError> {
        let file = std::fs::OpenOptions::new().write(true).create_new(true).open(path)?;
        let added = self.execute_with_fd("add-fd", json!({}), &file).await?;
        let set = added
            .get("fdset-id")
            .and_then(Value::as_u64)
            .ok_or_else(|| QmpError::Io(std::io::Error::other("add-fd answered no fdset-id")))?;
        let saved = self
            .execute(
                "xen-save-devices-state",
                json!({ "filename": format!("/dev/fdset/{set}"), "live": false }),
            )
            .await;
        let _ = self.execute("remove-fd", json!({ "fdset-id": set })).await;
        saved?;
        Ok(())
    }

    /// Loads an incoming migration from a file (QEMU reads it through a passed descriptor, so
    /// it never needs to spawn a helper).
    pub async fn migrate_in_from_file(&self, path: &Path) -> Result<(), QmpError> {
        let file = std::fs::File::open(path)?;
        self.send_fd("stasis-migration", &file).await?;
        self.execute("migrate-incoming", json!({"uri": "fd:stasis-migration"}))
            .await?;
        Ok(())
    }

    /// Starts an outgoing migration into a new file (through a passed descriptor).
    pub async fn migrate_out_to_file(&self, path: &Path) -> Result<(), QmpError> {
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(path)?;
        self.send_fd("stasis-migration", &file).await?;
        self.execute("migrate", json!({"uri": "fd:stasis-migration"})).await?;
        Ok(())
    }

    /// Asynchronous events (`STOP`, `RESUME`, `MIGRATION`, `SHUTDOWN`, ...).
    pub fn events(&self) -> broadcast::Receiver<Value> {
        self.events.subscribe()
    }

    /// Sets up the next migration, in or out (see [`Migration`]), with migration events on.
    pub async fn set_migration(&self, m: Migration) -> Result<(), QmpError> {
        let Migration {
            ignore_shared,
            background_snapshot,
            outgoing,
        } = m;
        self.execute(
            "migrate-set-capabilities",
            json!({"capabilities": [
                {"capability": "x-ignore-shared", "state": ignore_shared},
                {"capability": "background-snapshot", "state": background_snapshot},
                {"capability": "events", "state": true},
            ]}),
        )
        .await?;
        if outgoing {
            self.execute("migrate-set-parameters", json!({"max-bandwidth": 1u64 << 40}))
                .await?;
        }
        Ok(())
    }

    /// `query-status`'s `status` field (`running`, `paused`, `inmigrate`, `postmigrate`, ...).
    pub async fn status(&self) -> Result<String, QmpError> {
        let v = self.execute("query-status", json!({})).await?;
        Ok(v.get("status").and_then(Value::as_str).unwrap_or("unknown").to_string())
    }
}

/// How the next migration runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Migration {
    /// RAM that lives in a file is left out of the stream (`x-ignore-shared`).
    pub ignore_shared: bool,
    /// An outgoing migration is a background snapshot (the guest runs on, its RAM
    /// write-protected page by page).
    pub background_snapshot: bool,
    /// Outgoing: its bandwidth cap goes too (the default 128 MiB/s would make copies crawl);
    /// an incoming one is left at one command.
    pub outgoing: bool,
}

/// One `sendmsg` of `data` carrying `fd` as SCM_RIGHTS.
fn send_with_fd(socket: BorrowedFd<'_>, data: &[u8], fd: BorrowedFd<'_>) -> std::io::Result<usize> {
    use rustix::net::{sendmsg, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    let fds = [fd];
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(std::io::Error::other(
            "no room for the descriptor in the control buffer",
        ));
    }
    Ok(sendmsg(
        socket,
        &[IoSlice::new(data)],
        &mut control,
        SendFlags::NOSIGNAL,
    )?)
}

#[cfg(test)]
mod tests {
    use std::io::{IoSliceMut, Read, Seek, Write};

    use rustix::net::{recvmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};

    use super::*;

    #[test]
    fn a_descriptor_travels_with_its_line() {
        let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
        let mut file = tempfile::tempfile().unwrap();
        let line = b"{\"execute\": \"getfd\"}\n";
        assert_eq!(send_with_fd(ours.as_fd(), line, file.as_fd()).unwrap(), line.len());

        let mut buf = [0u8; 64];
        let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let got = recvmsg(
            &theirs,
            &mut [IoSliceMut::new(&mut buf)],
            &mut control,
            RecvFlags::empty(),
        )
        .unwrap();
        assert_eq!(&buf[..got.bytes], line);
        let mut fds: Vec<_> = control
            .drain()
            .flat_map(|m| match m {
                RecvAncillaryMessage::ScmRights(fds) => fds.collect::<Vec<_>>(),
                _ => Vec::new(),
            })
            .collect();
        assert_eq!(fds.len(), 1, "one descriptor, as SCM_RIGHTS");

        // The received descriptor is the same open file.
        let mut received = std::fs::File::from(fds.pop().unwrap());
        received.write_all(b"through the socket").unwrap();
        file.rewind().unwrap();
        let mut back = String::new();
        file.read_to_string(&mut back).unwrap();
        assert_eq!(back, "through the socket");
    }
}
