//! A computer's logs, as the official SDK reads them (`computer.logs.get(lines=, since=)`,
//! `computer.logs.stream()`): its console since its QEMU last started (the kernel's boot, the
//! agent's own lines, whatever the guest writes to `/dev/console`), as the host keeps it:
//! bounded (the last 2 to 3 MiB), every line at a stable position. A page names where it
//! ends (`cursor`); `since=<cursor>` goes on from there, and the stream follows from there
//! (or from `Last-Event-ID`).

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use stasis_types::{ComputerId, ComputerStatus};
use utoipa::ToSchema;
use utoipa_axum::routes;

use crate::auth::Tenant;
use crate::endpoints::computer_id;
use crate::endpoints::{Endpoint, Endpoints, IfLost, Runs};
use crate::error::Error;
use crate::http_error::{ApiError, ApiResult};
use crate::openapi::ReadErrors;
use crate::AppState;

/// Lines a page has by default, and at most.
pub const DEFAULT_LINES: usize = 200;
pub const MAX_LINES: usize = 10_000;
/// Most bytes one page reads.
const PAGE_BYTES: usize = 4 << 20;
/// How often a followed console is looked at.
const FOLLOW_EVERY: Duration = Duration::from_millis(250);
/// Longest line kept whole; a longer one is cut (and goes on as the next line).
const MAX_LINE: usize = 16 * 1024;

/// The console's on the host that runs the computer (a stopped one's too, on its host).
pub fn router() -> Endpoints {
    let here = Runs::OnOwner(IfLost::Unavailable);
    Endpoints::new()
        .add(here, routes!(get_logs))
        .add(Endpoint::from(here).long(), routes!(stream_logs))
}

/// One line of a computer's console.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LogLine {
    /// Where it starts (positions count every byte the console printed since it started).
    pub cursor: u64,
    /// Its text (invalid UTF-8 replaced; the line's end, and a `\r` before it, dropped).
    pub text: String,
}

/// Lines were cut away (the console is kept bounded) before they could be sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct LogGap {
    /// Where the stream was.
    pub from: u64,
    /// Where it goes on.
    pub to: u64,
}

/// The `data` of a logs stream event: a `log` event's line, or a `gap` event's gap.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
#[serde(untagged)]
pub enum LogEventData {
    Line(LogLine),
    Gap(LogGap),
}

/// One server-sent event of a logs stream, as it travels: `event:` is `log` or `gap`, `id:`
/// the position after it, `data:` a [`LogEventData`] in JSON.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LogStreamEvent {
    pub event: LogEventName,
    pub id: String,
    /// JSON: a `LogEventData` (a `LogLine` for `log`, a `LogGap` for `gap`).
    #[schema(content_media_type = "application/json")]
    pub data: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum LogEventName {
    Log,
    Gap,
}

/// A page of a computer's logs.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LogPage {
    pub computer_id: ComputerId,
    pub source: String,
    pub lines: Vec<LogLine>,
    /// Where the page ends: `since` this for what comes next.
    pub cursor: u64,
    /// The position of the oldest line still kept (older ones were cut away).
    pub first_cursor: u64,
    /// Lines between the start asked for and the page were cut away, or more lines were
    /// there than the page holds.
    pub truncated: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct LogsEnvelope {
    pub data: LogPage,
}

#[derive(Debug, Deserialize)]
pub struct LogsQuery {
    pub lines: Option<String>,
    pub since: Option<String>,
}

fn lines_asked(raw: Option<&str>) -> Result<usize, Error> {
    match raw {
        None => Ok(DEFAULT_LINES),
        Some(s) => s
            .trim()
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=MAX_LINES).contains(n))
            .ok_or_else(|| Error::invalid("lines", format!("lines is a whole number from 1 to {MAX_LINES}"))),
    }
}

fn cursor_asked(raw: Option<&str>) -> Result<Option<u64>, Error> {
    raw.map(|s| {
        s.trim().parse::<u64>().map_err(|_| {
            Error::invalid(
                "since",
                format!("since is a cursor from an earlier page (a whole number), not {s:?}"),
            )
        })
    })
    .transpose()
}

/// Splits `bytes` (starting at position `start`) into its complete lines; a line longer
/// than [`MAX_LINE`] is cut there. Answers the lines and the position after the last.
fn split_lines(bytes: &[u8], start: u64, partial_too: bool) -> (Vec<LogLine>, u64) {
    let mut lines = Vec::new();
    let mut at = 0usize;
    while at < bytes.len() {
        let rest = &bytes[at..];
        let (len, used) = match rest.iter().position(|b| *b == b'\n') {
            Some(nl) if nl <= MAX_LINE => (nl, nl + 1),
            _ if rest.len() > MAX_LINE => (MAX_LINE, MAX_LINE),
            _ if partial_too => (rest.len(), rest.len()),
            _ => break,
        };
        let mut text = &rest[..len];
        if text.last() == Some(&b'\r') {
            text = &text[..text.len() - 1];
        }
        lines.push(LogLine {
            cursor: start + at as u64,
            text: String::from_utf8_lossy(text).into_owned(),
        });
        at += used;
    }
    (lines, start + at as u64)
}

async fn console_of(
    state: &AppState,
    tenant: stasis_types::TenantId,
    id: &str,
) -> ApiResult<(ComputerId, std::path::PathBuf)> {
    let c = state.computers.get(tenant, computer_id(id)?).await?;
    Ok((c.id, state.computers.host.paths(&c.id.to_string()).console()))
}

async fn read(
    console: std::path::PathBuf,
    from: Option<u64>,
    max: usize,
) -> ApiResult<stasis_vmm::console::ConsoleRead> {
    tokio::task::spawn_blocking(move || stasis_vmm::console::read(&console, from, max))
        .await
        .map_err(ApiError::internal)?
        .map_err(|e| ApiError::internal(format!("reading the console: {e}")))
}

/// A page of the computer's console: its last `lines` lines, or with `since` (a page's
/// `cursor`) up to `lines` lines after it.
#[utoipa::path(get, path = "/computers/{id}/logs", operation_id = "getLogs", tag = "computers",
    params(("id" = uuid::Uuid, Path, description = "The computer's id"),
        ("lines" = Option<u32>, Query, description = "Lines on the page (default 200, at most 10000)"),
        ("since" = Option<u64>, Query, description = "The cursor of an earlier page: the lines after it")),
    responses((status = 200, description = "A page of the console", body = LogsEnvelope), ReadErrors))]
async fn get_logs(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
    crate::body::Query(q): crate::body::Query<LogsQuery>,
) -> ApiResult<Json<LogsEnvelope>> {
    let want = lines_asked(q.lines.as_deref())?;
    let since = cursor_asked(q.since.as_deref())?;
    let (computer_id, console) = console_of(&state, tenant, &id).await?;
    let page = match since {
        Some(from) => {
            let r = read(console, Some(from), PAGE_BYTES).await?;
            let (mut lines, end) = split_lines(&r.bytes, r.start, false);
            let more = lines.len() > want;
            // After the last line on the page: where the next one starts.
            let end = if more {
                let next = lines[want].cursor;
                lines.truncate(want);
                next
            } else {
                end
            };
            LogPage {
                computer_id,
                source: "console".into(),
                lines,
                cursor: end,
                first_cursor: r.first,
                truncated: more || r.start > from,
            }
        }
        None => {
            let r = read(console, None, PAGE_BYTES).await?;
            // Everything up to the newest byte, the unfinished last line too.
            let (mut lines, _) = split_lines(&r.bytes, r.start, true);
            // The first line may have been cut in the middle by where the read began.
            if r.start > r.first && !lines.is_empty() {
                lines.remove(0);
            }
            let more = lines.len() > want || r.start > r.first;
            let keep_from = lines.len().saturating_sub(want);
            LogPage {
                computer_id,
                source: "console".into(),
                lines: lines.split_off(keep_from),
                cursor: r.end,
                first_cursor: r.first,
                truncated: more,
            }
        }
    };
    Ok(Json(LogsEnvelope { data: page }))
}

/// The computer's console as it is printed: server-sent `log` events, one a line (`data:` a
/// `LogLine`, `id:` the position after it: send it back as `Last-Event-ID`, or `since`, to go
/// on from there), from the newest line (or from `since`). A `gap` event says lines were cut
/// away before they could be sent. Ends when the computer is destroyed.
#[utoipa::path(get, path = "/computers/{id}/logs/stream", operation_id = "streamLogs", tag = "computers",
    params(("id" = uuid::Uuid, Path, description = "The computer's id"),
        ("since" = Option<u64>, Query, description = "A cursor: the lines after it"),
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event")),
    responses((status = 200, description = "The console, followed", content_type = "text/event-stream", body = LogStreamEvent), ReadErrors))]
async fn stream_logs(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
    crate::body::Query(q): crate::body::Query<LogsQuery>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let resume = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let since = match resume {
        Some(at) => Some(at),
        None => cursor_asked(q.since.as_deref())?,
    };
    let (computer_id, console) = console_of(&state, tenant, &id).await?;
    // From the newest line unless told where.
    let mut at = match since {
        Some(at) => at,
        None => {
            let r = read(console.clone(), None, PAGE_BYTES).await?;
            let (lines, _) = split_lines(&r.bytes, r.start, true);
            lines.last().map_or(r.end, |l| l.cursor)
        }
    };
    let computers = state.computers.clone();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Event, Infallible>>(256);
    tokio::spawn(async move {
        loop {
            let r = match read(console.clone(), Some(at), 1 << 20).await {
                Ok(r) => r,
                Err(_) => return,
            };
            if r.start > at {
                let gap = LogEventData::Gap(LogGap { from: at, to: r.start });
                let gap = Event::default()
                    .event("gap")
                    .id(r.start.to_string())
                    .data(serde_json::to_string(&gap).unwrap_or_default());
                if tx.send(Ok(gap)).await.is_err() {
                    return;
                }
            }
            let (lines, end) = split_lines(&r.bytes, r.start, false);
            // (A cursor past the end, say from before a restart, goes on from the end.)
            at = if lines.is_empty() { r.start } else { end };
            let ends: Vec<u64> = lines.iter().skip(1).map(|l| l.cursor).chain([end]).collect();
            for (line, next) in lines.into_iter().zip(ends) {
                let e = Event::default()
                    .event("log")
                    .id(next.to_string())
                    .data(serde_json::to_string(&LogEventData::Line(line)).unwrap_or_default());
                if tx.send(Ok(e)).await.is_err() {
                    return;
                }
            }
            if r.bytes.len() >= 1 << 20 {
                continue;
            }
            tokio::select! {
                _ = tokio::time::sleep(FOLLOW_EVERY) => {}
                _ = tx.closed() => return,
            }
            // A destroyed computer's console ends its stream.
            match computers.db.get_computer(computer_id).await {
                Ok(Some(c)) if c.status != ComputerStatus::Destroyed => {}
                _ => return,
            }
        }
    });
    Ok(Sse::new(tokio_stream::wrappers::ReceiverStream::new(rx))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)).text("keep-alive"))
        .into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_split_at_their_positions() {
        let (lines, end) = split_lines(b"one\r\ntwo\nthr", 100, false);
        assert_eq!(
            lines,
            vec![
                LogLine {
                    cursor: 100,
                    text: "one".into()
                },
                LogLine {
                    cursor: 105,
                    text: "two".into()
                }
            ]
        );
        assert_eq!(end, 109, "the unfinished line waits");
        let (lines, end) = split_lines(b"one\nthr", 0, true);
        assert_eq!((lines.len(), lines[1].text.as_str(), end), (2, "thr", 7));
        let long = vec![b'x'; MAX_LINE + 10];
        let (lines, end) = split_lines(&long, 0, false);
        assert_eq!((lines.len(), lines[0].text.len(), end), (1, MAX_LINE, MAX_LINE as u64));
        assert_eq!(lines_asked(None).unwrap(), DEFAULT_LINES);
        assert!(lines_asked(Some("0")).is_err() && lines_asked(Some("x")).is_err());
        assert_eq!(cursor_asked(Some("42")).unwrap(), Some(42));
        assert!(cursor_asked(Some("2026-01-01T00:00:00Z")).is_err());
    }
}
