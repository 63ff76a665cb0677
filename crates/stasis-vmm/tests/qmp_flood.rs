//! A QMP peer (a QEMU a guest may have taken over) that sends an endless line: the platform's
//! QMP client must stay within bounded memory and read the reply that follows.

use std::time::{Duration, Instant};

use stasis_vmm::qmp::{Qmp, MAX_QMP_LINE_BYTES};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
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

fn id_of(line: &str) -> u64 {
    let v: serde_json::Value = serde_json::from_str(line).unwrap();
    v["id"].as_u64().unwrap()
}

#[tokio::test]
async fn an_endless_qmp_line_costs_bounded_memory_and_the_reply_after_it_gets_through() {
    const FLOOD: usize = 512 << 20;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qmp.sock");
    let listener = UnixListener::bind(&path).unwrap();
    tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        let (read, mut w) = stream.into_split();
        let mut lines = BufReader::new(read).lines();
        w.write_all(b"{\"QMP\": {\"version\": {}, \"capabilities\": []}}\n")
            .await
            .unwrap();
        let caps = lines.next_line().await.unwrap().unwrap();
        assert!(caps.contains("qmp_capabilities"), "{caps}");
        w.write_all(format!("{{\"return\": {{}}, \"id\": {}}}\n", id_of(&caps)).as_bytes())
            .await
            .unwrap();
        let status = lines.next_line().await.unwrap().unwrap();
        assert!(status.contains("query-status"), "{status}");
        let chunk = vec![b'{'; 1 << 20];
        for _ in 0..FLOOD / chunk.len() {
            w.write_all(&chunk).await.unwrap();
        }
        w.write_all(b"\n").await.unwrap();
        w.write_all(
            format!(
                "{{\"return\": {{\"status\": \"running\"}}, \"id\": {}}}\n",
                id_of(&status)
            )
            .as_bytes(),
        )
        .await
        .unwrap();
        // Hold the connection open until the client is done.
        let _ = lines.next_line().await;
    });

    let (rss_before, _) = memory();
    let qmp = Qmp::connect(&path, Duration::from_secs(5)).await.unwrap();
    let t = Instant::now();
    assert_eq!(qmp.status().await.unwrap(), "running");
    let (_, peak) = memory();
    eprintln!(
        "{FLOOD} bytes skipped in {:?}; line buffer peak {}; peak RSS {} MiB over the start",
        t.elapsed(),
        qmp.line_buffer_peak(),
        peak.saturating_sub(rss_before) >> 20
    );
    assert!(qmp.line_buffer_peak() <= MAX_QMP_LINE_BYTES);
    // Before the fix `lines()` held the whole line: 512 MiB and more.
    assert!(
        peak < rss_before + (128 << 20),
        "peak RSS {} MiB, from {} MiB",
        peak >> 20,
        rss_before >> 20
    );
}
