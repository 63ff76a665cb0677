//! The host end of the guest agent protocol (`stasis-agent-proto`).
//!
//! Requests are resent (same id) until answered: a frame lost across a snapshot is simply sent
//! again, and the agent answers a repeat from memory instead of running it twice. A reply nobody
//! waits for (say, one meant for the original machine arriving in a restored clone) is dropped.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use stasis_agent_proto::{decode, encode, Op, Reply, Request, Response};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
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
}

type Waiters = Arc<Mutex<HashMap<u64, mpsc::UnboundedSender<Reply>>>>;

pub struct AgentClient {
    writer: tokio::sync::Mutex<OwnedWriteHalf>,
    waiters: Waiters,
    /// Counts `Hello` frames: the agent (re)started serving, so pending requests are resent.
    hellos: watch::Receiver<u64>,
    closed: watch::Receiver<bool>,
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
        tokio::spawn(async move {
            let mut reader = BufReader::with_capacity(256 * 1024, read);
            let mut line = Vec::new();
            loop {
                line.clear();
                match reader.read_until(b'\n', &mut line).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
                let Some(Response { id, reply }) = decode::<Response>(&line) else {
                    continue;
                };
                if let Reply::Hello { .. } = reply {
                    hello_tx.send_modify(|n| *n += 1);
                    continue;
                }
                let tx = w.lock().unwrap_or_else(|p| p.into_inner()).get(&id).cloned();
                if let Some(tx) = tx {
                    let _ = tx.send(reply);
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
        }))
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
        let (tx, mut rx) = mpsc::unbounded_channel();
        self.waiters.lock().unwrap_or_else(|p| p.into_inner()).insert(id, tx);
        let result = self.exchange(&frame, &mut rx, limit).await;
        self.waiters.lock().unwrap_or_else(|p| p.into_inner()).remove(&id);
        result
    }

    async fn exchange(
        &self,
        frame: &[u8],
        rx: &mut mpsc::UnboundedReceiver<Reply>,
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
                        Some(Reply::Running) => continue,
                        Some(Reply::Error { message }) => return Err(AgentError::Remote(message)),
                        Some(reply) => return Ok(reply),
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
