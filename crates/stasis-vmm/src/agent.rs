//! The host end of the guest agent protocol (`stasis-agent-proto`).
//!
//! Requests are resent (same id) until answered: a frame lost across a snapshot is simply sent
//! again, and the agent answers a repeat from memory instead of running it twice. A reply nobody
//! waits for (say, one meant for the original machine arriving in a restored clone) is dropped.
//!
//! The guest controls what arrives here, so lines are read with a bounded [`LineReader`]: a
//! line past [`MAX_FRAME_BYTES`] is skipped without being held, and the call it answers (its id
//! leads the frame) fails at once instead of being resent for an answer that can never fit.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use stasis_agent_proto::{decode, encode, frame_id, LineReader, Next, Op, Reply, Request, Response, MAX_FRAME_BYTES};
use tokio::io::{AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixStream;
use tokio::sync::{mpsc, watch};

/// How long to wait for an answer before sending the same request again.
const RESEND_AFTER: Duration = Duration::from_millis(1000);

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("connecting to the guest agent socket: {0}")]
    Connect(std::io::Error),
    #[error("the guest agent did not answer within {0:?}")]
    Timeout(Duration),
    #[error("the guest agent connection closed")]
    Closed,
    #[error("the guest agent reported: {0}")]
    Remote(String),
    #[error("the guest agent answered {0:?}, which does not fit the request")]
    Unexpected(Box<Reply>),
    #[error("the guest agent's answer exceeded {max} bytes (it was {len}) and was dropped")]
    AnswerTooLarge { len: u64, max: usize },
    #[error("the request is {len} bytes, over the {max}-byte frame limit of the guest agent")]
    RequestTooLarge { len: usize, max: usize },
}

/// What the reader hands a waiting call.
enum Incoming {
    Reply(Reply),
    /// The answer was a line too long to read, `len` bytes.
    TooLarge(u64),
}

type Waiters = Arc<Mutex<HashMap<u64, mpsc::UnboundedSender<Incoming>>>>;

pub struct AgentClient {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    waiters: Waiters,
    /// Counts `Hello` frames: the agent (re)started serving, so pending requests are resent.
    hellos: watch::Receiver<u64>,
    closed: watch::Receiver<bool>,
    line_buffer_peak: Arc<AtomicUsize>,
}

impl AgentClient {
    pub async fn connect(path: &Path, wait: Duration) -> Result<Arc<AgentClient>, AgentError> {
        let deadline = tokio::time::Instant::now() + wait;
        let stream = loop {
            match UnixStream::connect(path).await {
                Ok(s) => break s,
                Err(_) if tokio::time::Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(10)).await,
                Err(e) => return Err(AgentError::Connect(e)),
            }
        };
        let (read, mut write) = stream.into_split();
        // End any half frame the guest may be holding from before.
        let _ = write.write_all(b"\n").await;
        let waiters: Waiters = Arc::default();
        let (hello_tx, hellos) = watch::channel(0u64);
        let (closed_tx, closed) = watch::channel(false);
        let w = waiters.clone();
        let line_buffer_peak = Arc::new(AtomicUsize::new(0));
        let peak = line_buffer_peak.clone();
        tokio::spawn(async move {
            let mut reader = BufReader::with_capacity(256 * 1024, read);
            let mut lines = LineReader::new(MAX_FRAME_BYTES);
            loop {
                let next = lines.read_line_async(&mut reader).await;
                peak.store(lines.peak_capacity(), Ordering::Relaxed);
                let (id, incoming) = match next {
                    Ok(Next::Eof) | Err(_) => break,
                    Ok(Next::Line) => {
                        let Some(Response { id, reply }) = decode::<Response>(lines.line()) else {
                            continue;
                        };
                        if let Reply::Hello { .. } = reply {
                            hello_tx.send_modify(|n| *n += 1);
                            continue;
                        }
                        (id, Incoming::Reply(reply))
                    }
                    Ok(Next::Oversized { len }) => {
                        let id = frame_id(lines.line());
                        tracing::warn!(
                            len,
                            ?id,
                            "dropped a line from the guest agent over {MAX_FRAME_BYTES} bytes"
                        );
                        // Without an id (garbage, or a frame torn by a snapshot) no call can be
                        // blamed; the calls still waiting resend or time out as usual.
                        let Some(id) = id else { continue };
                        (id, Incoming::TooLarge(len))
                    }
                };
                let tx = w.lock().unwrap_or_else(|p| p.into_inner()).get(&id).cloned();
                if let Some(tx) = tx {
                    let _ = tx.send(incoming);
                }
            }
            let _ = closed_tx.send(true);
            w.lock().unwrap_or_else(|p| p.into_inner()).clear();
        });
        Ok(Arc::new(AgentClient {
            writer: tokio::sync::Mutex::new(write),
            waiters,
            hellos,
            closed,
            line_buffer_peak,
        }))
    }

    /// The most memory the reader's line buffer has held on this connection: at most
    /// [`MAX_FRAME_BYTES`] whatever the guest sends (checked by the regression tests).
    pub fn line_buffer_peak(&self) -> usize {
        self.line_buffer_peak.load(Ordering::Relaxed)
    }

    pub fn is_closed(&self) -> bool {
        *self.closed.borrow()
    }

    /// How many times the agent has announced itself on this connection.
    pub fn hello_count(&self) -> u64 {
        *self.hellos.borrow()
    }

    /// Sends `op` and waits up to `limit` for its final answer, resending while unanswered.
    pub async fn call(&self, op: Op, limit: Duration) -> Result<Reply, AgentError> {
        let id: u64 = rand::random::<u64>() >> 1 | 1;
        let frame = encode(&Request { id, op });
        // The agent would skip it, and it would be resent until the deadline.
        if frame.len() - 1 > MAX_FRAME_BYTES {
            return Err(AgentError::RequestTooLarge {
                len: frame.len() - 1,
                max: MAX_FRAME_BYTES,
            });
        }
        let (tx, mut rx) = mpsc::unbounded_channel();
        self.waiters.lock().unwrap_or_else(|p| p.into_inner()).insert(id, tx);
        let result = self.exchange(&frame, &mut rx, limit).await;
        self.waiters.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        result
    }

    async fn exchange(
        &self,
        frame: &[u8],
        rx: &mut mpsc::UnboundedReceiver<Incoming>,
        limit: Duration,
    ) -> Result<Reply, AgentError> {
        let deadline = tokio::time::Instant::now() + limit;
        let mut hellos = self.hellos.clone();
        let mut closed = self.closed.clone();
        loop {
            if self.is_closed() {
                return Err(AgentError::Closed);
            }
            self.send(frame).await?;
            let resend_at = (tokio::time::Instant::now() + RESEND_AFTER).min(deadline);
            loop {
                tokio::select! {
                    reply = rx.recv() => match reply {
                        // Still executing: the request arrived; keep waiting for the result.
                        Some(Incoming::Reply(Reply::Running)) => continue,
                        Some(Incoming::Reply(Reply::Error { message })) => return Err(AgentError::Remote(message)),
                        Some(Incoming::Reply(reply)) => return Ok(reply),
                        // Asking again would only bring the same answer again.
                        Some(Incoming::TooLarge(len)) => {
                            return Err(AgentError::AnswerTooLarge { len, max: MAX_FRAME_BYTES })
                        }
                        None => return Err(AgentError::Closed),
                    },
                    _ = tokio::time::sleep_until(resend_at) => break,
                    _ = hellos.changed() => break,
                    _ = closed.changed() => return Err(AgentError::Closed),
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(AgentError::Timeout(limit));
            }
        }
    }

    async fn send(&self, frame: &[u8]) -> Result<(), AgentError> {
        let mut w = self.writer.lock().await;
        w.write_all(frame).await.map_err(|_| AgentError::Closed)
    }

    /// Waits until the agent answers a ping.
    pub async fn wait_ready(&self, limit: Duration) -> Result<(), AgentError> {
        match self.call(Op::Ping, limit).await? {
            Reply::Pong { .. } => Ok(()),
            other => Err(AgentError::Unexpected(Box::new(other))),
        }
    }
}
