//! `stasis snapshot ...` and `stasis clone`: the Snapshots API from the terminal. `--wait`
//! follows the snapshot's event stream (SSE) and draws a progress bar of the upload (bytes,
//! rate, ETA); when the stream cannot be had it falls back to polling.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use anyhow::Result;
use clap::Subcommand;
use futures::StreamExt;
use reqwest::Method;
use serde_json::{json, Value};
use stasis_types::{Computer, Snapshot, SnapshotEventData, SnapshotStatus};

use crate::client::{exit, print, row, Api, Connection, Fail, Output};

#[derive(Subcommand)]
pub enum SnapshotCommand {
    /// Take a snapshot of a running computer.
    Create {
        computer: String,
        #[arg(long)]
        comment: Option<String>,
        /// Follow the upload (progress bar) until the snapshot is ready.
        #[arg(long)]
        wait: bool,
        #[command(flatten)]
        follow: Follow,
    },
    /// A computer's snapshots.
    List {
        computer: String,
    },
    Get {
        computer: String,
        snapshot: String,
    },
    /// Delete a snapshot (its stored objects are collected later).
    Delete {
        computer: String,
        snapshot: String,
    },
    /// A new computer from a snapshot (the original is unchanged).
    Restore {
        computer: String,
        snapshot: String,
        /// How many computers to restore, in parallel.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
        count: u32,
        /// Wait until the new computers run.
        #[arg(long)]
        wait: bool,
        /// Seconds to wait.
        #[arg(long, default_value_t = 300)]
        timeout: u64,
    },
    /// Print a snapshot's progress events as they come, until it is ready or failed.
    Events {
        computer: String,
        snapshot: String,
        #[command(flatten)]
        follow: Follow,
    },
}

#[derive(clap::Args, Clone, Copy)]
pub struct Follow {
    /// Seconds to wait for the snapshot to finish.
    #[arg(long, default_value_t = 1800)]
    timeout: u64,
    /// Poll instead of following the event stream.
    #[arg(long)]
    poll: bool,
}

pub async fn run(conn: Connection, command: SnapshotCommand) -> Result<()> {
    let api = Api::new(&conn)?;
    let out = conn.output;
    match command {
        SnapshotCommand::Create {
            computer,
            comment,
            wait,
            follow,
        } => {
            let mut body = json!({});
            if let Some(c) = comment {
                body["comment"] = json!(c);
            }
            let v = api
                .call(Method::POST, &format!("/computers/{computer}/snapshots"), Some(body))
                .await?;
            let snap: Snapshot = serde_json::from_value(v["data"].clone())?;
            if out == Output::Text {
                eprintln!("snapshot {} of computer {computer}: {}", snap.id, snap.status.as_str());
            }
            let snap = if wait {
                wait_ready(&api, out, &computer, &snap.id.to_string(), follow).await?
            } else {
                snap
            };
            print(out, &json!({ "data": snap }), || snapshot_row(&snap));
            if snap.status == SnapshotStatus::Failed {
                return Err(failed(&snap));
            }
        }
        SnapshotCommand::List { computer } => {
            let v = api
                .call(Method::GET, &format!("/computers/{computer}/snapshots"), None)
                .await?;
            let list: Vec<Snapshot> = serde_json::from_value(v["data"].clone())?;
            print(out, &v, || {
                if list.is_empty() {
                    return "no snapshots".to_string();
                }
                list.iter().map(snapshot_row).collect::<Vec<_>>().join("\n")
            });
        }
        SnapshotCommand::Get { computer, snapshot } => {
            let snap = get(&api, &computer, &snapshot).await?;
            print(out, &json!({ "data": snap }), || snapshot_details(&snap));
        }
        SnapshotCommand::Delete { computer, snapshot } => {
            let v = api
                .call(
                    Method::DELETE,
                    &format!("/computers/{computer}/snapshots/{snapshot}"),
                    None,
                )
                .await?;
            print(out, &v, || format!("snapshot {snapshot} deleted"));
        }
        SnapshotCommand::Restore {
            computer,
            snapshot,
            count,
            wait,
            timeout,
        } => {
            let path = format!("/computers/{computer}/restore/{snapshot}");
            let started = Instant::now();
            let answers = futures::future::join_all((0..count).map(|_| api.call(Method::POST, &path, None))).await;
            let mut computers = Vec::new();
            for a in answers {
                let c: Computer = serde_json::from_value(a?["data"].clone())?;
                computers.push(c);
            }
            if wait {
                let limit = Duration::from_secs(timeout);
                let ids: Vec<String> = computers.iter().map(|c| c.id.to_string()).collect();
                computers = futures::future::try_join_all(ids.iter().map(|id| api.wait_running(id, limit))).await?;
                if out == Output::Text {
                    eprintln!(
                        "{} computer{} running {:.2}s after the request",
                        computers.len(),
                        if computers.len() == 1 { "" } else { "s" },
                        started.elapsed().as_secs_f64()
                    );
                }
            }
            let value = if count == 1 {
                json!({ "data": computers[0], "snapshot": { "id": snapshot } })
            } else {
                json!({ "data": computers, "total": computers.len() })
            };
            print(out, &value, || computers.iter().map(row).collect::<Vec<_>>().join("\n"));
        }
        SnapshotCommand::Events {
            computer,
            snapshot,
            follow,
        } => {
            let limit = Duration::from_secs(follow.timeout);
            let mut on_event = |e: &Event| match out {
                Output::Json => println!(
                    "{}",
                    json!({"event": e.name, "id": e.id, "data": serde_json::from_str::<Value>(&e.data).unwrap_or(Value::Null)})
                ),
                Output::Text => println!("{}", describe(e)),
            };
            let end = if follow.poll {
                None
            } else {
                follow_stream(&api, &computer, &snapshot, limit, &mut on_event).await
            };
            let snap = match end {
                Some(status) if status.is_final() => get(&api, &computer, &snapshot).await?,
                _ => {
                    poll(&api, &computer, &snapshot, limit, &mut |s| {
                        on_event(&Event::from_snapshot(s));
                    })
                    .await?
                }
            };
            if snap.status == SnapshotStatus::Failed {
                return Err(failed(&snap));
            }
        }
    }
    Ok(())
}

/// `stasis clone COMPUTER`: a fresh snapshot of a running computer, restored.
pub async fn clone(api: &Api, out: Output, id: &str, name: Option<String>, wait: bool) -> Result<()> {
    let body = name.map_or(json!({}), |n| json!({ "name": n }));
    let v = api
        .call(Method::POST, &format!("/computers/{id}/clone"), Some(body))
        .await?;
    let mut c: Computer = serde_json::from_value(v["data"].clone())?;
    if wait {
        c = api.wait_running(&c.id.to_string(), Duration::from_secs(300)).await?;
    }
    print(out, &json!({ "data": c }), || row(&c));
    Ok(())
}

async fn get(api: &Api, computer: &str, snapshot: &str) -> Result<Snapshot> {
    let v = api
        .call(
            Method::GET,
            &format!("/computers/{computer}/snapshots/{snapshot}"),
            None,
        )
        .await?;
    Ok(serde_json::from_value(v["data"].clone())?)
}

fn failed(s: &Snapshot) -> anyhow::Error {
    Fail(
        exit::FAILED,
        format!(
            "snapshot {} failed: {}",
            s.id,
            s.error.as_deref().unwrap_or("no reason given")
        ),
    )
    .into()
}

/// Follows the snapshot to `ready` or `failed` with a progress bar on stderr.
async fn wait_ready(api: &Api, out: Output, computer: &str, snapshot: &str, follow: Follow) -> Result<Snapshot> {
    let limit = Duration::from_secs(follow.timeout);
    let mut bar = Progress::new(out == Output::Text);
    let end = if follow.poll {
        None
    } else {
        follow_stream(api, computer, snapshot, limit, &mut |e| {
            if let Ok(d) = serde_json::from_str::<SnapshotEventData>(&e.data) {
                bar.update(&d);
            }
        })
        .await
    };
    let snap = match end {
        Some(status) if status.is_final() => get(api, computer, snapshot).await?,
        _ => {
            poll(api, computer, snapshot, limit, &mut |s| {
                let mut d = event_of(s);
                if s.status == SnapshotStatus::Ready {
                    d.progress = Some(1.0);
                }
                bar.update(&d);
            })
            .await?
        }
    };
    bar.finish(&snap);
    Ok(snap)
}

/// What the server's event for the snapshot's current state says (status and error).
fn event_of(s: &Snapshot) -> SnapshotEventData {
    let mut d = stasis_server::snapshots::events::data(s.id, s.status);
    d.error = s.error.clone();
    d
}

/// One server-sent event.
pub struct Event {
    pub name: String,
    pub id: Option<String>,
    pub data: String,
}

impl Event {
    fn from_snapshot(s: &Snapshot) -> Event {
        Event {
            name: stasis_types::SnapshotEventName::for_status(s.status)
                .as_str()
                .to_string(),
            id: None,
            data: serde_json::to_string(&event_of(s)).expect("event data serializes"),
        }
    }
}

fn describe(e: &Event) -> String {
    let Ok(d) = serde_json::from_str::<SnapshotEventData>(&e.data) else {
        return format!("{} {}", e.name, e.data);
    };
    let mut line = format!("{:<20}", e.name);
    if let Some(step) = &d.step {
        line.push_str(&format!(" {step}"));
    }
    if let Some(p) = d.progress {
        line.push_str(&format!(" {:>3.0}%", p * 100.0));
    }
    if let (Some(done), Some(total)) = (d.bytes_done, d.bytes_total) {
        line.push_str(&format!(" {}/{}", mib(done), mib(total)));
    }
    if let Some(err) = &d.error {
        line.push_str(&format!(" error: {err}"));
    }
    line
}

/// Turns the bytes of an event stream, as they come off the network, into events. Bytes are
/// kept until their line is complete and only then decoded, so a character whose bytes arrive in
/// two chunks is read whole (a `\n` byte is never part of a multi-byte UTF-8 character).
#[derive(Default)]
struct EventReader {
    /// The bytes of the line not yet complete.
    partial: Vec<u8>,
    name: String,
    id: Option<String>,
    data: String,
}

impl EventReader {
    /// Takes the next chunk; returns the events it completed, in order.
    fn push(&mut self, chunk: &[u8]) -> Vec<Event> {
        self.partial.extend_from_slice(chunk);
        let mut events = Vec::new();
        let mut start = 0;
        while let Some(nl) = self.partial[start..].iter().position(|&b| b == b'\n') {
            let line = String::from_utf8_lossy(&self.partial[start..start + nl]).into_owned();
            start += nl + 1;
            events.extend(self.line(line.trim_end_matches('\r')));
        }
        self.partial.drain(..start);
        events
    }

    /// One complete line: a field, or (empty) the end of an event.
    fn line(&mut self, line: &str) -> Option<Event> {
        if line.is_empty() {
            if self.data.is_empty() && self.name.is_empty() {
                return None;
            }
            return Some(Event {
                name: std::mem::take(&mut self.name),
                id: self.id.take(),
                data: std::mem::take(&mut self.data),
            });
        }
        if let Some(v) = line.strip_prefix("event:") {
            self.name = v.trim_start().to_string();
        } else if let Some(v) = line.strip_prefix("id:") {
            self.id = Some(v.trim_start().to_string());
        } else if let Some(v) = line.strip_prefix("data:") {
            if !self.data.is_empty() {
                self.data.push('\n');
            }
            self.data.push_str(v.strip_prefix(' ').unwrap_or(v));
        }
        None
    }
}

/// Reads the event stream (Bearer auth; a dropped connection is resumed with `Last-Event-ID`)
/// until a final event. Returns the last status seen, or None if the stream could not be had
/// (the caller then polls).
async fn follow_stream(
    api: &Api,
    computer: &str,
    snapshot: &str,
    limit: Duration,
    on_event: &mut dyn FnMut(&Event),
) -> Option<SnapshotStatus> {
    let deadline = Instant::now() + limit;
    let path = format!("/computers/{computer}/snapshots/{snapshot}/events");
    let mut last_id: Option<String> = None;
    let mut status = None;
    let mut failures = 0;
    while Instant::now() < deadline && failures < 3 {
        let mut req = api
            .request(Method::GET, &path)
            .header("accept", "text/event-stream")
            .timeout(deadline.saturating_duration_since(Instant::now()));
        if let Some(id) = &last_id {
            req = req.header("last-event-id", id);
        }
        let resp = match req.send().await {
            Ok(r) if r.status().is_success() => r,
            _ => {
                failures += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
                continue;
            }
        };
        let mut body = resp.bytes_stream();
        let mut events = EventReader::default();
        while let Some(chunk) = body.next().await {
            let Ok(chunk) = chunk else { break };
            for e in events.push(&chunk) {
                if e.id.is_some() {
                    last_id = e.id.clone();
                }
                on_event(&e);
                status = serde_json::from_str::<SnapshotEventData>(&e.data)
                    .ok()
                    .map(|d| d.status)
                    .or(status);
                if status.is_some_and(SnapshotStatus::is_final) {
                    return status;
                }
            }
        }
        // The stream ended before a final event: resume after the last one seen.
        failures += 1;
    }
    status.filter(|s| s.is_final())
}

/// Polls the snapshot until it is ready or failed.
async fn poll(
    api: &Api,
    computer: &str,
    snapshot: &str,
    limit: Duration,
    on_change: &mut dyn FnMut(&Snapshot),
) -> Result<Snapshot> {
    let start = Instant::now();
    let mut last = None;
    loop {
        let s = get(api, computer, snapshot).await?;
        if last != Some(s.status) {
            on_change(&s);
            last = Some(s.status);
        }
        if s.status.is_final() {
            return Ok(s);
        }
        if start.elapsed() > limit {
            return Err(Fail(
                exit::TIMEOUT,
                format!(
                    "snapshot {snapshot} is still {} after {}s",
                    s.status.as_str(),
                    limit.as_secs()
                ),
            )
            .into());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The upload's progress on stderr: a bar with bytes, rate and ETA on a terminal, a line per
/// step (and every ~10%) otherwise, so logs and scripts see it too.
struct Progress {
    enabled: bool,
    bar: Option<indicatif::ProgressBar>,
    started: Instant,
    last_line: Option<(SnapshotStatus, u32)>,
}

impl Progress {
    fn new(enabled: bool) -> Progress {
        Progress {
            enabled,
            bar: None,
            started: Instant::now(),
            last_line: None,
        }
    }

    fn update(&mut self, d: &SnapshotEventData) {
        if !self.enabled {
            return;
        }
        if std::io::stderr().is_terminal() {
            self.draw(d);
        } else {
            self.log(d);
        }
    }

    fn draw(&mut self, d: &SnapshotEventData) {
        let bar = self.bar.get_or_insert_with(|| {
            let b = indicatif::ProgressBar::new(0);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{spinner} {msg:<10} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
                )
                .expect("a valid template")
                .progress_chars("=> "),
            );
            b.enable_steady_tick(Duration::from_millis(120));
            b
        });
        bar.set_message(d.status.as_str().to_string());
        if let Some(total) = d.bytes_total {
            bar.set_length(total);
        }
        if let Some(done) = d.bytes_done {
            bar.set_position(done);
        } else if d.status == SnapshotStatus::Ready {
            bar.set_position(bar.length().unwrap_or(0));
        }
    }

    fn log(&mut self, d: &SnapshotEventData) {
        let pct = d.progress.map_or(0, |p| (p * 100.0) as u32);
        let step = pct / 10;
        if self.last_line == Some((d.status, step)) {
            return;
        }
        self.last_line = Some((d.status, step));
        let secs = self.started.elapsed().as_secs_f64();
        let mut line = format!("{:>6.1}s {:<10} {pct:>3}%", secs, d.status.as_str());
        if let (Some(done), Some(total)) = (d.bytes_done, d.bytes_total) {
            let rate = done as f64 / secs.max(0.001);
            let eta = if rate > 0.0 {
                total.saturating_sub(done) as f64 / rate
            } else {
                0.0
            };
            line.push_str(&format!(
                " {}/{} {}/s eta {:.0}s",
                mib(done),
                mib(total),
                mib(rate as u64),
                eta
            ));
        }
        eprintln!("{line}");
    }

    fn finish(&mut self, s: &Snapshot) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
        if !self.enabled {
            return;
        }
        let secs = self.started.elapsed().as_secs_f64();
        match s.status {
            SnapshotStatus::Ready => eprintln!(
                "snapshot {} ready in {secs:.1}s: {} stored, {} uploaded, guest paused {} ms",
                s.id,
                s.compressed_size_bytes.map_or("?".into(), mib),
                s.uploaded_bytes.map_or("?".into(), mib),
                s.pause_ms.map_or("?".into(), |p| p.to_string())
            ),
            other => eprintln!("snapshot {} {} after {secs:.1}s", s.id, other.as_str()),
        }
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

fn snapshot_row(s: &Snapshot) -> String {
    format!(
        "{}  {:<10} {:>10}  {}  {}",
        s.id,
        s.status.as_str(),
        s.compressed_size_bytes.map_or("-".into(), mib),
        s.created_at.format("%Y-%m-%d %H:%M:%S"),
        s.comment.as_deref().unwrap_or("")
    )
}

fn snapshot_details(s: &Snapshot) -> String {
    let mut lines = vec![
        format!("id:         {}", s.id),
        format!("computer:   {}", s.computer_id),
        format!("status:     {}", s.status.as_str()),
        format!("comment:    {}", s.comment.as_deref().unwrap_or("")),
        format!("created:    {}", s.created_at.to_rfc3339()),
    ];
    let size = |label: &str, v: Option<u64>| v.map(|b| format!("{label:<11} {}", mib(b)));
    lines.extend(size("memory:", s.memory_size_bytes));
    lines.extend(size("rootfs:", s.rootfs_size_bytes));
    lines.extend(size("stored:", s.compressed_size_bytes));
    lines.extend(size("uploaded:", s.uploaded_bytes));
    if let Some(p) = s.pause_ms {
        lines.push(format!("paused:     {p} ms"));
    }
    if let Some(parent) = s.parent_snapshot_id {
        lines.push(format!("parent:     {parent}"));
    }
    if let Some(e) = &s.error {
        lines.push(format!("error:      {e}"));
    }
    lines.join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_described_with_progress_and_bytes() {
        let e = Event {
            name: "snapshot_uploading".into(),
            id: Some("4".into()),
            data: r#"{"snapshot_id":"8bdcde85-de1e-41c0-9f2d-40f14778a9a7","status":"uploading","progress":0.5,"bytes_done":1048576,"bytes_total":2097152}"#.into(),
        };
        assert_eq!(describe(&e), "snapshot_uploading    50% 1.0 MiB/2.0 MiB");
        let bad = Event {
            name: "x".into(),
            id: None,
            data: "not json".into(),
        };
        assert_eq!(describe(&bad), "x not json");
    }

    #[test]
    fn a_character_split_across_chunks_is_read_whole() {
        let stream = "id: 7\nevent: snapshot_failed\ndata: {\"error\":\"disque plein \u{e9}\u{1F4A5}\"}\n\n";
        let bytes = stream.as_bytes();
        let e_acute = stream.find('\u{e9}').unwrap();
        let mut reader = EventReader::default();
        // The first chunk ends inside the two bytes of 'é'; the second inside the four of the emoji.
        let mut events = reader.push(&bytes[..e_acute + 1]);
        assert!(events.is_empty(), "no event before its blank line");
        events.extend(reader.push(&bytes[e_acute + 1..e_acute + 4]));
        events.extend(reader.push(&bytes[e_acute + 4..]));
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].name, "snapshot_failed");
        assert_eq!(events[0].id.as_deref(), Some("7"));
        assert_eq!(events[0].data, "{\"error\":\"disque plein \u{e9}\u{1F4A5}\"}");
    }

    #[test]
    fn events_are_read_a_byte_at_a_time_and_many_per_chunk() {
        let stream = "event: a\r\ndata: one\r\ndata: two\r\n\r\n: comment\n\nevent: b\ndata:x\n\n";
        let mut reader = EventReader::default();
        let slow: Vec<Event> = stream.as_bytes().iter().flat_map(|b| reader.push(&[*b])).collect();
        let fast = EventReader::default().push(stream.as_bytes());
        for events in [slow, fast] {
            let got: Vec<(&str, &str)> = events.iter().map(|e| (e.name.as_str(), e.data.as_str())).collect();
            assert_eq!(got, [("a", "one\ntwo"), ("b", "x")]);
        }
    }
}
