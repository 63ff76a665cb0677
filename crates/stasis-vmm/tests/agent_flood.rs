//! A guest agent that floods the host: an endless line, and an answer too long to read. The
//! host must stay within bounded memory, recover at the next newline, and not ask again for an
//! answer that can never fit. No QEMU: a test socket plays the agent.

use std::time::{Duration, Instant};

use stasis_agent_proto::{decode, encode, Op, Reply, Request, Response, MAX_FRAME_BYTES, PROTOCOL_VERSION};
use stasis_vmm::agent::{AgentClient, AgentError};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::OwnedWriteHalf;
use tokio::net::UnixListener;

/// This process's resident memory, and its peak so far, in bytes.
fn memory() -> (u64, u64) {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let field = |name: &str| -> u64 {
        let line = status.lines().find(|l| l.starts_with(name)).unwrap();
        line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// Writes `total` bytes of `a` with no newline, a MiB at a time.
async fn endless_line(w: &mut OwnedWriteHalf, total: usize) {
    let chunk = vec![b'a'; 1 << 20];
    for _ in 0..total / chunk.len() {
        w.write_all(&chunk).await.unwrap();
    }
}

/// A fake agent on `path`: each request goes to `answer`, which writes whatever it likes.
async fn fake_agent<F, Fut>(listener: UnixListener, mut answer: F)
where
    F: FnMut(OwnedWriteHalf, Request, u32) -> Fut,
    Fut: std::future::Future<Output = OwnedWriteHalf>,
{
    let (stream, _) = listener.accept().await.unwrap();
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    let mut seen = 0;
    while let Ok(Some(line)) = lines.next_line().await {
        let Some(req) = decode::<Request>(line.as_bytes()) else {
            continue;
        };
        seen += 1;
        write = answer(write, req, seen).await;
    }
}

fn pong(id: u64) -> Vec<u8> {
    encode(&Response {
        id,
        reply: Reply::Pong {
            version: PROTOCOL_VERSION,
            boot_id: "fake".into(),
            uptime_ms: 1,
        },
    })
}

#[tokio::test]
async fn an_endless_line_costs_bounded_memory_and_the_next_reply_gets_through() {
    const FLOOD: usize = 512 << 20;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let listener = UnixListener::bind(&path).unwrap();
    tokio::spawn(fake_agent(listener, |mut w, req, n| async move {
        if n == 1 {
            endless_line(&mut w, FLOOD).await;
            w.write_all(b"\n").await.unwrap();
        }
        w.write_all(&pong(req.id)).await.unwrap();
        w
    }));

    let (rss_before, _) = memory();
    let client = AgentClient::connect(&path, Duration::from_secs(5)).await.unwrap();
    let t = Instant::now();
    let reply = client.call(Op::Ping, Duration::from_secs(60)).await.unwrap();
    assert!(matches!(reply, Reply::Pong { .. }), "{reply:?}");
    let (_, peak) = memory();
    eprintln!(
        "{FLOOD} bytes skipped in {:?}; line buffer peak {}; peak RSS {} MiB over the start",
        t.elapsed(),
        client.line_buffer_peak(),
        peak.saturating_sub(rss_before) >> 20
    );
    assert!(client.line_buffer_peak() <= MAX_FRAME_BYTES);
    // Before the fix the buffer grew with the line: 512 MiB and more.
    assert!(
        peak < rss_before + (160 << 20),
        "peak RSS {} MiB, from {} MiB",
        peak >> 20,
        rss_before >> 20
    );
    // The connection is still usable after the garbage.
    assert!(!client.is_closed());
    client.wait_ready(Duration::from_secs(5)).await.unwrap();
}

#[tokio::test]
async fn an_answer_too_long_to_read_fails_its_call_instead_of_being_asked_for_again() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let listener = UnixListener::bind(&path).unwrap();
    let (count_tx, mut count_rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(fake_agent(listener, move |mut w, req, _| {
        let count_tx = count_tx.clone();
        async move {
            match req.op {
                Op::Exec(_) => {
                    let _ = count_tx.send(());
                    // What an agent without the output cap sent: a frame with its id first, far
                    // longer than the host reads.
                    let head = format!("{{\"id\":{},\"type\":\"exec\",\"exit_code\":0,\"stdout\":\"", req.id);
                    w.write_all(head.as_bytes()).await.unwrap();
                    endless_line(&mut w, MAX_FRAME_BYTES + (8 << 20)).await;
                    w.write_all(b"\",\"stderr\":\"\",\"timed_out\":false,\"truncated\":false}\n")
                        .await
                        .unwrap();
                }
                _ => w.write_all(&pong(req.id)).await.unwrap(),
            }
            w
        }
    }));

    let client = AgentClient::connect(&path, Duration::from_secs(5)).await.unwrap();
    let t = Instant::now();
    let err = client
        .call(
            Op::Exec(stasis_agent_proto::ExecRequest {
                program: "true".into(),
                args: vec![],
                env: vec![],
                cwd: None,
                stdin: None,
                timeout_ms: 1000,
            }),
            Duration::from_secs(30),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            AgentError::AnswerTooLarge {
                max: MAX_FRAME_BYTES,
                ..
            }
        ),
        "{err}"
    );
    assert!(
        err.to_string().contains(&format!("exceeded {MAX_FRAME_BYTES} bytes")),
        "{err}"
    );
    // Before the fix: dropped, asked again every second until the deadline, 30 s here.
    assert!(t.elapsed() < Duration::from_secs(10), "{:?}", t.elapsed());
    // The connection goes on serving other calls.
    client.wait_ready(Duration::from_secs(5)).await.unwrap();
    let mut asked = 0;
    while count_rx.try_recv().is_ok() {
        asked += 1;
    }
    assert!(asked <= 2, "the exec was sent {asked} times");
}
