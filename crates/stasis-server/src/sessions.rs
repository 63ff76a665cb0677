//! Programs that run for as long as they like in a computer, with their streams: the SDK's
//! `exec.spawn` (`WS /computers/{id}/exec/stream`), terminals (`POST /terminal`, attached at
//! `WS /computers/{id}/pty/{session}/stream`, resized at `POST /pty/{session}/resize`) and
//! background commands (`POST /commands` with `"detached": true`, then `GET /commands`,
//! `GET /commands/{pid}`, `GET /commands/{pid}/logs`, `POST /commands/{pid}/kill`).
//!
//! Each is a session of the guest agent ([`SessionOp`]): its output is read in long polls at
//! offsets the host names, so nothing is lost or repeated when a request is resent, and a
//! program that writes faster than its client reads waits for it. WebSocket frames are the
//! SDK's: `{"type": "stdout"|"stderr", "data"}` and `{"type": "exit", "code"}` out;
//! `{"type": "stdin", "data"}`, `stdin_close`, `{"type": "resize", "rows", "cols"}` and
//! `{"type": "signal", "signal"}` in (binary frames are stdin bytes as they are).
//!
//! Lifetimes: a spawn lives as long as its socket: a client that goes without a word has its
//! program killed. A terminal outlives its socket for the agent's orphan time (30 s), long
//! enough to attach again (a page reload), then is ended; one client at a time. A background
//! command runs until it exits or is killed, keeping its newest output. A computer runs at
//! most [`MAX_SESSIONS_PER_COMPUTER`] sessions at once; beyond that, 429 `TOO_MANY_SESSIONS`.

use std::collections::HashSet;
use std::sync::{Arc, LazyLock, Mutex};

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use futures::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use stasis_agent_proto::{
    signal_number, SessionErrorKind, SessionInfo, SessionOp, SessionReply, SessionStart, WinSize, SESSIONS_SINCE,
    SESSION_BUFFER_BYTES, SESSION_CHUNK_BYTES,
};
use stasis_types::{ComputerId, TenantId};
use stasis_vmm::Vm;
use tokio::sync::mpsc;
use utoipa::ToSchema;
use utoipa_axum::routes;

use crate::auth::{StreamTenant, Tenant};
use crate::body;
use crate::endpoints::computer_id;
use crate::endpoints::{Endpoint, Endpoints, IfLost, Runs};
use crate::error::{Conflict, Error, Resource};
use crate::http_error::{ApiError, ApiResult};
use crate::openapi::{ReadErrors, WriteErrors};
use crate::AppState;

/// Most sessions (spawns, terminals, background commands) one computer runs at once.
pub const MAX_SESSIONS_PER_COMPUTER: u32 = 16;
/// How long one read of a session's output waits for some.
const READ_WAIT_MS: u32 = 5_000;
/// Longest command line, shell name or working directory taken.
const MAX_TEXT: usize = 64 * 1024;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// Sessions a client is attached to on this host (a terminal takes one at a time).
static ATTACHED: LazyLock<Mutex<HashSet<(ComputerId, u64)>>> = LazyLock::new(Mutex::default);

pub fn router() -> Endpoints {
    let machine = Runs::OnOwner(IfLost::Unavailable);
    let stream = Endpoint::from(machine).long().raw().with_tickets();
    Endpoints::new()
        .add(stream, routes!(exec_stream))
        .add(stream, routes!(pty_stream))
        .add(machine, routes!(create_terminal))
        .add(machine, routes!(resize_pty))
        .add(machine, routes!(list_commands))
        .add(machine, routes!(get_command))
        .add(machine, routes!(command_logs))
        .add(machine, routes!(kill_command))
}

/// The running machine of the computer, if its agent runs sessions.
async fn machine(state: &AppState, tenant: TenantId, id: ComputerId) -> ApiResult<Arc<Vm>> {
    crate::files::machine_speaking(state, tenant, id, SESSIONS_SINCE, "streamed sessions").await
}

/// Runs `op`; a failure in the guest says what it was, with its status.
async fn run(vm: &Vm, computer: ComputerId, op: SessionOp) -> ApiResult<SessionReply> {
    let session = match &op {
        SessionOp::Read { session, .. }
        | SessionOp::Write { session, .. }
        | SessionOp::CloseStdin { session }
        | SessionOp::Resize { session, .. }
        | SessionOp::Signal { session, .. }
        | SessionOp::Close { session } => Some(*session),
        SessionOp::Start(_) | SessionOp::List => None,
    };
    match vm.session(op).await {
        Ok(SessionReply::Failed { kind, message }) => Err(match kind {
            SessionErrorKind::NotFound => Error::not_found(Resource::Session, session.unwrap_or(0).to_string()),
            SessionErrorKind::TooMany => Error::TooManySessions(format!(
                "computer {computer} runs as many sessions as it may ({message}); \
                 end a stream, terminal or background command first"
            )),
            SessionErrorKind::Spawn => Error::invalid("command", message),
            SessionErrorKind::Invalid | SessionErrorKind::InputClosed => {
                Error::conflict(Conflict::ComputerBusy, message)
            }
        }
        .into()),
        Ok(reply) => Ok(reply),
        Err(e) => Err(crate::error::agent_failure(e).into()),
    }
}

/// The computer's variables under the ones a request gives.
async fn env_with(state: &AppState, id: ComputerId, extra: Vec<(String, String)>) -> ApiResult<Vec<(String, String)>> {
    let mut env: Vec<(String, String)> = state
        .db
        .env_vars(id)
        .await
        .map_err(Error::from)?
        .into_iter()
        .map(|v| (v.name, v.value))
        .collect();
    env.extend(extra);
    Ok(env)
}

fn checked_env(
    field: &str,
    env: Option<std::collections::BTreeMap<String, String>>,
) -> ApiResult<Vec<(String, String)>> {
    Ok(crate::env::validate(field, env)?)
}

fn checked_text(field: &str, value: &str, absolute: bool) -> ApiResult<()> {
    if value.is_empty() || value.len() > MAX_TEXT || value.contains('\0') || (absolute && !value.starts_with('/')) {
        let what = if absolute {
            "an absolute path"
        } else {
            "a non-empty string"
        };
        return Err(ApiError::invalid(
            field,
            format!("{field} must be {what} of at most {MAX_TEXT} bytes, without NUL"),
        ));
    }
    Ok(())
}

fn size(rows: Option<u16>, cols: Option<u16>, default: bool) -> ApiResult<Option<WinSize>> {
    let valid = |field: &str, v: u16| {
        if (1..=1000).contains(&v) {
            Ok(v)
        } else {
            Err(ApiError::invalid(field, format!("{field} must be 1 to 1000, not {v}")))
        }
    };
    Ok(match (rows, cols) {
        (None, None) if !default => None,
        (r, c) => Some(WinSize {
            rows: valid("rows", r.unwrap_or(24))?,
            cols: valid("cols", c.unwrap_or(80))?,
        }),
    })
}

async fn start(vm: &Vm, id: ComputerId, start: SessionStart) -> ApiResult<(u64, i32)> {
    match run(vm, id, SessionOp::Start(start)).await? {
        SessionReply::Started { session, pid } => Ok((session, pid)),
        other => Err(ApiError::unavailable(format!(
            "the guest agent answered {other:?} to a start"
        ))),
    }
}

// ── exec.spawn ─────────────────────────────────────────────────────────────────────────────

/// `WS /computers/{id}/exec/stream` query, as the SDK's `exec.spawn` sends it.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct SpawnQuery {
    /// The program; without `args`, a command line run by `bash -c`.
    command: Option<String>,
    /// The program's arguments, joined by commas.
    args: Option<String>,
    /// Working directory (default `/root`).
    cwd: Option<String>,
    /// More variables, a JSON object of strings.
    env: Option<String>,
    /// With `cols`, run on a terminal of this size.
    rows: Option<u16>,
    cols: Option<u16>,
    /// A ticket from `POST /sse/ticket`, instead of the Authorization header.
    #[allow(dead_code)]
    ticket: Option<String>,
}

/// A program with its streams over a WebSocket (the SDK's `exec.spawn`): frames out are
/// `{"type":"stdout"|"stderr","data":...}` then `{"type":"exit","code":N}`; frames in are
/// `stdin`, `stdin_close`, `resize` and `signal`. The program is killed if the socket closes
/// before it exits. Asked without a WebSocket upgrade: 426.
#[utoipa::path(get, path = "/computers/{id}/exec/stream", operation_id = "execStream", tag = "computers",
    params(("id" = uuid::Uuid, Path, description = "The computer's id"), SpawnQuery),
    security((), ("bearer" = [])),
    responses((status = 101, description = "Switching to the WebSocket"),
        (status = 426, description = "Not a WebSocket upgrade request", body = stasis_types::ErrorBody),
        (status = 429, description = "The computer runs as many sessions as it may", body = stasis_types::ErrorBody), ReadErrors))]
async fn exec_stream(
    State(state): State<AppState>,
    StreamTenant { tenant, .. }: StreamTenant,
    Path(id): Path<String>,
    body::Query(q): body::Query<SpawnQuery>,
    held: Option<axum::Extension<crate::net::HeldStream>>,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> ApiResult<Response> {
    let id = computer_id(&id)?;
    let command = q
        .command
        .ok_or_else(|| ApiError::invalid("command", "command is required: the program or command line to run"))?;
    checked_text("command", &command, false)?;
    if let Some(cwd) = &q.cwd {
        checked_text("cwd", cwd, true)?;
    }
    let extra = match q.env.as_deref() {
        None => Vec::new(),
        Some(raw) => checked_env(
            "env",
            Some(
                serde_json::from_str(raw)
                    .map_err(|e| ApiError::invalid("env", format!("env must be a JSON object of strings: {e}")))?,
            ),
        )?,
    };
    let pty = size(q.rows, q.cols, false)?;
    let (program, args) = match q.args.as_deref().filter(|a| !a.is_empty()) {
        Some(args) => (command, args.split(',').map(str::to_string).collect()),
        None => ("/bin/bash".to_string(), vec!["-c".to_string(), command]),
    };
    let vm = machine(&state, tenant, id).await?;
    let upgrade = upgrade.map_err(|_| ApiError::UpgradeRequired)?;
    let env = env_with(&state, id, extra).await?;
    let (session, _) = start(
        &vm,
        id,
        SessionStart {
            program,
            args,
            env,
            cwd: q.cwd,
            pty,
            background: false,
            limit: MAX_SESSIONS_PER_COMPUTER,
        },
    )
    .await?;
    // The computer is in use for as long as the socket lives (its idle timeout waits).
    let busy = state.snapshots.computers().busy(id);
    Ok(upgrade
        .on_upgrade(move |socket| async move {
            // The tenant's place among its long requests, for as long as the socket lives.
            let (_held, _busy) = (held, busy);
            stream(socket, vm, id, session, OnClose::Kill).await
        })
        .into_response())
}

// ── terminals ─────────────────────────────────────────────────────────────────────────────

/// `POST /computers/{id}/terminal`, the SDK's `terminal.create`.
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct TerminalRequest {
    #[serde(default)]
    #[schema(minimum = 1, maximum = 1000, nullable = false)]
    cols: Option<u16>,
    #[serde(default)]
    #[schema(minimum = 1, maximum = 1000, nullable = false)]
    rows: Option<u16>,
    /// The shell (default `/bin/bash`, run as a login shell).
    #[serde(default)]
    #[schema(nullable = false)]
    shell: Option<String>,
    #[serde(default)]
    #[schema(nullable = false)]
    cwd: Option<String>,
    #[serde(default)]
    #[schema(nullable = false)]
    env: Option<std::collections::BTreeMap<String, String>>,
}

/// A terminal session.
#[derive(Debug, Serialize, ToSchema)]
pub struct TerminalSession {
    /// Names it in `/pty/{session_id}/...`.
    session_id: String,
    id: String,
    computer_id: String,
    pid: i32,
    cols: u16,
    rows: u16,
    shell: String,
    /// Where to attach: a WebSocket of the same frames as `exec/stream` (authorized by the
    /// Authorization header, or a `?ticket=` from `POST /sse/ticket`).
    stream_url: String,
}

/// Open a terminal: a login shell on a pseudo-terminal, attached at its `stream_url` within
/// 30 s (and again within 30 s of a client leaving), ended when its shell exits.
#[utoipa::path(post, path = "/computers/{id}/terminal", operation_id = "createTerminal", tag = "computers",
    params(("id" = uuid::Uuid, Path, description = "The computer's id")), request_body = TerminalRequest,
    responses((status = 201, description = "The terminal", body = TerminalSession),
        (status = 429, description = "The computer runs as many sessions as it may", body = stasis_types::ErrorBody), WriteErrors))]
async fn create_terminal(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
    body::Json(req): body::Json<TerminalRequest>,
) -> ApiResult<(StatusCode, Json<TerminalSession>)> {
    let id = computer_id(&id)?;
    let winsize = size(req.rows, req.cols, true)?.expect("a default size");
    let shell = req.shell.unwrap_or_else(|| "/bin/bash".into());
    checked_text("shell", &shell, false)?;
    if let Some(cwd) = &req.cwd {
        checked_text("cwd", cwd, true)?;
    }
    let extra = checked_env("env", req.env)?;
    let vm = machine(&state, tenant, id).await?;
    let env = env_with(&state, id, extra).await?;
    let (session, pid) = start(
        &vm,
        id,
        SessionStart {
            program: shell.clone(),
            args: vec!["-l".into()],
            env,
            cwd: req.cwd,
            pty: Some(winsize),
            background: false,
            limit: MAX_SESSIONS_PER_COMPUTER,
        },
    )
    .await?;
    Ok((
        StatusCode::CREATED,
        Json(TerminalSession {
            session_id: session.to_string(),
            id: session.to_string(),
            computer_id: id.to_string(),
            pid,
            cols: winsize.cols,
            rows: winsize.rows,
            shell,
            stream_url: format!("/api/v1/computers/{id}/pty/{session}/stream"),
        }),
    ))
}

fn session_id(raw: &str) -> ApiResult<u64> {
    raw.parse().map_err(|_| Error::not_found(Resource::Session, raw).into())
}

/// `POST /computers/{id}/pty/{session_id}/resize`.
#[derive(Debug, Deserialize, ToSchema)]
pub struct ResizePty {
    #[schema(minimum = 1, maximum = 1000)]
    cols: u16,
    #[schema(minimum = 1, maximum = 1000)]
    rows: u16,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct PtySize {
    session_id: String,
    cols: u16,
    rows: u16,
}

/// Resize a terminal (its programs get `SIGWINCH`).
#[utoipa::path(post, path = "/computers/{id}/pty/{session_id}/resize", operation_id = "resizeTerminal", tag = "computers",
    params(("id" = uuid::Uuid, Path, description = "The computer's id"), ("session_id" = String, Path, description = "The terminal's session id")),
    request_body = ResizePty,
    responses((status = 200, description = "The new size", body = PtySize), WriteErrors))]
async fn resize_pty(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path((id, sid)): Path<(String, String)>,
    body::Json(req): body::Json<ResizePty>,
) -> ApiResult<Json<PtySize>> {
    let id = computer_id(&id)?;
    let session = session_id(&sid)?;
    let size = size(Some(req.rows), Some(req.cols), true)?.expect("a size");
    let vm = machine(&state, tenant, id).await?;
    run(&vm, id, SessionOp::Resize { session, size }).await?;
    Ok(Json(PtySize {
        session_id: sid,
        cols: size.cols,
        rows: size.rows,
    }))
}

/// Attach to a terminal (or any session: a background command's output, followed). One
/// client at a time: a second gets 409 `SESSION_ATTACHED`.
#[utoipa::path(get, path = "/computers/{id}/pty/{session_id}/stream", operation_id = "attachTerminal", tag = "computers",
    params(("id" = uuid::Uuid, Path, description = "The computer's id"), ("session_id" = String, Path, description = "The session id"),
        ("ticket" = Option<String>, Query, description = "A ticket from POST /sse/ticket, instead of the Authorization header")),
    security((), ("bearer" = [])),
    responses((status = 101, description = "Switching to the WebSocket"),
        (status = 426, description = "Not a WebSocket upgrade request", body = stasis_types::ErrorBody), ReadErrors))]
async fn pty_stream(
    State(state): State<AppState>,
    StreamTenant { tenant, .. }: StreamTenant,
    Path((id, sid)): Path<(String, String)>,
    held: Option<axum::Extension<crate::net::HeldStream>>,
    upgrade: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> ApiResult<Response> {
    let id = computer_id(&id)?;
    let session = session_id(&sid)?;
    let vm = machine(&state, tenant, id).await?;
    // That it is there (a read from the start, waiting for nothing, takes nothing away).
    run(
        &vm,
        id,
        SessionOp::Read {
            session,
            stdout_from: 0,
            stderr_from: 0,
            wait_ms: 0,
        },
    )
    .await?;
    let upgrade = upgrade.map_err(|_| ApiError::UpgradeRequired)?;
    if !ATTACHED.lock().unwrap_or_else(|p| p.into_inner()).insert((id, session)) {
        return Err(ApiError::conflict(
            Conflict::SessionAttached,
            format!("session {session} has a client attached already"),
        ));
    }
    let guard = Attached(id, session);
    let busy = state.snapshots.computers().busy(id);
    Ok(upgrade
        .on_upgrade(move |socket| async move {
            let (_guard, _held, _busy) = (guard, held, busy);
            stream(socket, vm, id, session, OnClose::Leave).await
        })
        .into_response())
}

/// Takes the session off [`ATTACHED`] when dropped.
struct Attached(ComputerId, u64);

impl Drop for Attached {
    fn drop(&mut self) {
        ATTACHED
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&(self.0, self.1));
    }
}

// ── the socket ────────────────────────────────────────────────────────────────────────────

#[derive(Clone, Copy, PartialEq, Eq)]
enum OnClose {
    /// The client's going ends the program.
    Kill,
    /// The program stays for another client (the agent ends it if none comes).
    Leave,
}

/// What a client sends.
#[derive(Debug, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum ClientFrame {
    Stdin {
        #[serde(default)]
        data: String,
    },
    StdinClose,
    Resize {
        rows: u16,
        cols: u16,
    },
    Signal {
        #[serde(default)]
        signal: serde_json::Value,
    },
}

fn frame(value: serde_json::Value) -> Message {
    Message::Text(value.to_string().into())
}

async fn stream(socket: WebSocket, vm: Arc<Vm>, id: ComputerId, session: u64, on_close: OnClose) {
    let (mut sink, mut incoming) = socket.split();
    let (tx, mut rx) = mpsc::channel::<Message>(16);
    let sender = tokio::spawn(async move {
        while let Some(msg) = rx.recv().await {
            let close = matches!(msg, Message::Close(_));
            if sink.send(msg).await.is_err() || close {
                break;
            }
        }
    });
    let output = forward_output(&vm, id, session, tx.clone());
    let input = forward_input(&vm, id, session, &mut incoming, tx.clone());
    let exited = tokio::select! {
        exited = output => exited,
        () = input => false,
    };
    if exited || on_close == OnClose::Kill {
        let _ = vm.session(SessionOp::Close { session }).await;
    }
    let _ = tx.send(Message::Close(None)).await;
    drop(tx);
    let _ = sender.await;
}

/// Reads the session's output into frames until it exits (true) or cannot be read (false).
async fn forward_output(vm: &Vm, id: ComputerId, session: u64, tx: mpsc::Sender<Message>) -> bool {
    let (mut out_at, mut err_at) = (0u64, 0u64);
    let (mut out_text, mut err_text) = (Utf8Stream::default(), Utf8Stream::default());
    loop {
        let reply = run(
            vm,
            id,
            SessionOp::Read {
                session,
                stdout_from: out_at,
                stderr_from: err_at,
                wait_ms: READ_WAIT_MS,
            },
        )
        .await;
        let (stdout, stdout_at, stderr, stderr_at, exit_code) = match reply {
            Ok(SessionReply::Output {
                stdout,
                stdout_at,
                stderr,
                stderr_at,
                exit_code,
            }) => (stdout, stdout_at, stderr, stderr_at, exit_code),
            other => {
                let message = match other {
                    Err(e) => e.to_string(),
                    Ok(reply) => format!("the guest agent answered {reply:?}"),
                };
                let _ = tx
                    .send(frame(serde_json::json!({"type": "error", "message": message})))
                    .await;
                let _ = tx
                    .send(frame(serde_json::json!({"type": "exit", "code": -1, "error": message})))
                    .await;
                return false;
            }
        };
        for (kind, data, at, pos, text) in [
            ("stdout", stdout, stdout_at, &mut out_at, &mut out_text),
            ("stderr", stderr, stderr_at, &mut err_at, &mut err_text),
        ] {
            let bytes = B64.decode(data).unwrap_or_default();
            *pos = at + bytes.len() as u64;
            let mut s = text.push(&bytes);
            if exit_code.is_some() {
                s.push_str(&text.finish());
            }
            if !s.is_empty()
                && tx
                    .send(frame(serde_json::json!({"type": kind, "data": s})))
                    .await
                    .is_err()
            {
                return false;
            }
        }
        if let Some(code) = exit_code {
            let _ = tx.send(frame(serde_json::json!({"type": "exit", "code": code}))).await;
            return true;
        }
    }
}

/// Passes the client's frames to the session until the client goes.
async fn forward_input(
    vm: &Vm,
    id: ComputerId,
    session: u64,
    incoming: &mut futures::stream::SplitStream<WebSocket>,
    tx: mpsc::Sender<Message>,
) {
    let mut written = 0u64;
    while let Some(Ok(msg)) = incoming.next().await {
        let op = match msg {
            Message::Binary(bytes) => Some(Ok(stdin(session, written, &bytes))),
            Message::Text(text) => Some(match serde_json::from_str::<ClientFrame>(&text) {
                Ok(ClientFrame::Stdin { data }) => Ok(stdin(session, written, data.as_bytes())),
                Ok(ClientFrame::StdinClose) => Ok(SessionOp::CloseStdin { session }),
                Ok(ClientFrame::Resize { rows, cols }) => size(Some(rows), Some(cols), true)
                    .map(|s| SessionOp::Resize {
                        session,
                        size: s.expect("a size"),
                    })
                    .map_err(|e| e.to_string()),
                Ok(ClientFrame::Signal { signal }) => {
                    let named = match &signal {
                        serde_json::Value::String(s) => signal_number(s),
                        serde_json::Value::Number(n) => n.as_i64().and_then(|n| signal_number(&n.to_string())),
                        serde_json::Value::Null => Some(15),
                        _ => None,
                    };
                    named
                        .map(|signal| SessionOp::Signal { session, signal })
                        .ok_or_else(|| format!("{signal} is not a signal (a name like \"SIGTERM\" or a number)"))
                }
                Err(e) => Err(format!(
                    "not a frame this socket takes ({e}): stdin, stdin_close, resize or signal"
                )),
            }),
            Message::Close(_) => break,
            Message::Ping(_) | Message::Pong(_) => None,
        };
        let result = match op {
            None => continue,
            Some(Err(message)) => Err(message),
            Some(Ok(op)) => match run(vm, id, op).await {
                Ok(SessionReply::Written { total }) => {
                    written = total;
                    Ok(())
                }
                Ok(_) => Ok(()),
                Err(e) => Err(e.to_string()),
            },
        };
        if let Err(message) = result {
            if tx
                .send(frame(serde_json::json!({"type": "error", "message": message})))
                .await
                .is_err()
            {
                break;
            }
        }
    }
}

fn stdin(session: u64, at: u64, bytes: &[u8]) -> SessionOp {
    SessionOp::Write {
        session,
        at,
        data: B64.encode(bytes),
    }
}

/// Turns a byte stream into text frames: a character cut between two reads is held for the
/// next, bytes that are not UTF-8 become U+FFFD.
#[derive(Default)]
struct Utf8Stream {
    held: Vec<u8>,
}

impl Utf8Stream {
    fn push(&mut self, bytes: &[u8]) -> String {
        self.held.extend_from_slice(bytes);
        let mut out = String::new();
        let mut rest: &[u8] = &self.held;
        loop {
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    rest = &[];
                    break;
                }
                Err(e) => {
                    let (good, after) = rest.split_at(e.valid_up_to());
                    out.push_str(std::str::from_utf8(good).expect("checked"));
                    match e.error_len() {
                        Some(bad) => {
                            out.push('\u{FFFD}');
                            rest = &after[bad..];
                        }
                        // An incomplete character at the end: wait for the rest of it.
                        None => {
                            rest = after;
                            break;
                        }
                    }
                }
            }
        }
        self.held = rest.to_vec();
        out
    }

    /// What is held at the end of the stream.
    fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.held).into_owned();
        self.held.clear();
        s
    }
}

// ── background commands ───────────────────────────────────────────────────────────────────

/// A background command (`POST /commands` with `"detached": true`).
#[derive(Debug, Serialize, ToSchema)]
pub struct BackgroundCommand {
    /// Names it in `/commands/{pid}/...`.
    pub pid: String,
    /// Its process id in the guest.
    pub os_pid: i32,
    pub command: String,
    /// `running` or `exited`.
    pub status: String,
    pub exit_code: Option<i32>,
    /// RFC 3339.
    pub started_at: String,
    pub stdout_bytes: u64,
    pub stderr_bytes: u64,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct BackgroundCommands {
    pub data: Vec<BackgroundCommand>,
}

fn describe(info: &SessionInfo) -> BackgroundCommand {
    let command = match info.args.as_slice() {
        [c, line] if c == "-c" => line.clone(),
        args => std::iter::once(info.program.clone())
            .chain(args.iter().cloned())
            .collect::<Vec<_>>()
            .join(" "),
    };
    BackgroundCommand {
        pid: info.session.to_string(),
        os_pid: info.pid,
        command,
        status: if info.exit_code.is_some() { "exited" } else { "running" }.into(),
        exit_code: info.exit_code,
        started_at: chrono::DateTime::from_timestamp_millis(info.started_ms)
            .unwrap_or_default()
            .to_rfc3339(),
        stdout_bytes: info.stdout_bytes,
        stderr_bytes: info.stderr_bytes,
    }
}

/// Starts `command` under `bash -c` as a background command (for `POST /commands`).
pub(crate) async fn start_background(
    state: &AppState,
    tenant: TenantId,
    id: ComputerId,
    command: String,
    cwd: Option<String>,
) -> ApiResult<BackgroundCommand> {
    let vm = machine(state, tenant, id).await?;
    let env = env_with(state, id, Vec::new()).await?;
    let (session, _) = start(
        &vm,
        id,
        SessionStart {
            program: "/bin/bash".into(),
            args: vec!["-c".into(), command],
            env,
            cwd,
            pty: None,
            background: true,
            limit: MAX_SESSIONS_PER_COMPUTER,
        },
    )
    .await?;
    find_command(&vm, id, session).await
}

async fn background(vm: &Vm, id: ComputerId) -> ApiResult<Vec<SessionInfo>> {
    match run(vm, id, SessionOp::List).await? {
        SessionReply::Sessions { sessions } => Ok(sessions.into_iter().filter(|s| s.background).collect()),
        other => Err(ApiError::unavailable(format!(
            "the guest agent answered {other:?} to a listing"
        ))),
    }
}

async fn find_command(vm: &Vm, id: ComputerId, pid: u64) -> ApiResult<BackgroundCommand> {
    background(vm, id)
        .await?
        .iter()
        .find(|s| s.session == pid)
        .map(describe)
        .ok_or_else(|| Error::not_found(Resource::Command, pid.to_string()).into())
}

fn command_pid(raw: &str) -> ApiResult<u64> {
    raw.parse().map_err(|_| Error::not_found(Resource::Command, raw).into())
}

/// The computer's background commands, running and recently exited.
#[utoipa::path(get, path = "/computers/{id}/commands", operation_id = "listCommands", tag = "computers",
    params(("id" = uuid::Uuid, Path, description = "The computer's id")),
    responses((status = 200, description = "The background commands", body = BackgroundCommands), ReadErrors))]
async fn list_commands(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> ApiResult<Json<BackgroundCommands>> {
    let id = computer_id(&id)?;
    let vm = machine(&state, tenant, id).await?;
    let data = background(&vm, id).await?.iter().map(describe).collect();
    Ok(Json(BackgroundCommands { data }))
}

/// One background command's status.
#[utoipa::path(get, path = "/computers/{id}/commands/{pid}", operation_id = "getCommand", tag = "computers",
    params(("id" = uuid::Uuid, Path, description = "The computer's id"), ("pid" = String, Path, description = "The command's pid")),
    responses((status = 200, description = "The command", body = BackgroundCommand), ReadErrors))]
async fn get_command(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path((id, pid)): Path<(String, String)>,
) -> ApiResult<Json<BackgroundCommand>> {
    let id = computer_id(&id)?;
    let pid = command_pid(&pid)?;
    let vm = machine(&state, tenant, id).await?;
    Ok(Json(find_command(&vm, id, pid).await?))
}

/// A background command's newest output (up to 1 MiB a stream).
#[derive(Debug, Serialize, ToSchema)]
pub struct CommandLogs {
    pub pid: String,
    pub stdout: String,
    pub stderr: String,
    /// Bytes of the stream's beginning no longer kept.
    pub stdout_dropped: u64,
    pub stderr_dropped: u64,
    pub exit_code: Option<i32>,
}

/// A background command's output: the newest MiB of each stream.
#[utoipa::path(get, path = "/computers/{id}/commands/{pid}/logs", operation_id = "commandLogs", tag = "computers",
    params(("id" = uuid::Uuid, Path, description = "The computer's id"), ("pid" = String, Path, description = "The command's pid")),
    responses((status = 200, description = "Its output", body = CommandLogs), ReadErrors))]
async fn command_logs(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path((id, raw)): Path<(String, String)>,
) -> ApiResult<Json<CommandLogs>> {
    let id = computer_id(&id)?;
    let pid = command_pid(&raw)?;
    let vm = machine(&state, tenant, id).await?;
    // Only background commands: reading an attached session here would take its output.
    find_command(&vm, id, pid).await?;
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let (mut out_from, mut err_from) = (0u64, 0u64);
    let (mut out_dropped, mut err_dropped) = (None, None);
    // The agent keeps a MiB a stream and answers a quarter of one a read: a few reads take it
    // all, and a guest that answers without end is not read without end.
    let reads = 2 * SESSION_BUFFER_BYTES / SESSION_CHUNK_BYTES + 2;
    let mut exit_code = None;
    for _ in 0..reads {
        let reply = run(
            &vm,
            id,
            SessionOp::Read {
                session: pid,
                stdout_from: out_from,
                stderr_from: err_from,
                wait_ms: 0,
            },
        )
        .await
        .map_err(|e| match e {
            ApiError::Domain(Error::NotFound { .. }) => Error::not_found(Resource::Command, raw.clone()).into(),
            e => e,
        })?;
        let SessionReply::Output {
            stdout,
            stdout_at,
            stderr,
            stderr_at,
            exit_code: code,
        } = reply
        else {
            return Err(ApiError::unavailable(
                "the guest agent answered a read with something else",
            ));
        };
        let (o, e) = (
            B64.decode(stdout).unwrap_or_default(),
            B64.decode(stderr).unwrap_or_default(),
        );
        out_dropped.get_or_insert(stdout_at);
        err_dropped.get_or_insert(stderr_at);
        let done = o.is_empty() && e.is_empty();
        out_from = stdout_at + o.len() as u64;
        err_from = stderr_at + e.len() as u64;
        out.extend(o);
        err.extend(e);
        if done || code.is_some() {
            exit_code = code;
            break;
        }
    }
    Ok(Json(CommandLogs {
        pid: pid.to_string(),
        stdout: String::from_utf8_lossy(&out).into_owned(),
        stderr: String::from_utf8_lossy(&err).into_owned(),
        stdout_dropped: out_dropped.unwrap_or(0),
        stderr_dropped: err_dropped.unwrap_or(0),
        exit_code,
    }))
}

/// `POST /computers/{id}/commands/{pid}/kill` (optional).
#[derive(Debug, Default, Deserialize, ToSchema)]
pub struct KillRequest {
    /// A signal name or number (default `SIGKILL`).
    #[serde(default)]
    #[schema(nullable = false)]
    signal: Option<String>,
}

/// Stop a background command (its whole process group).
#[utoipa::path(post, path = "/computers/{id}/commands/{pid}/kill", operation_id = "killCommand", tag = "computers",
    params(("id" = uuid::Uuid, Path, description = "The computer's id"), ("pid" = String, Path, description = "The command's pid")),
    request_body(content = Option<KillRequest>, description = "Optional: `{\"signal\": \"SIGTERM\"}`"),
    responses((status = 200, description = "The command, signalled", body = BackgroundCommand), WriteErrors))]
async fn kill_command(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path((id, pid)): Path<(String, String)>,
    body::Json(req): body::Json<KillRequest>,
) -> ApiResult<Json<BackgroundCommand>> {
    let id = computer_id(&id)?;
    let pid = command_pid(&pid)?;
    let signal = match req.signal.as_deref() {
        None => 9,
        Some(s) => signal_number(s).ok_or_else(|| {
            ApiError::invalid(
                "signal",
                format!("{s:?} is not a signal (a name like \"SIGTERM\" or a number)"),
            )
        })?,
    };
    let vm = machine(&state, tenant, id).await?;
    find_command(&vm, id, pid).await?;
    run(&vm, id, SessionOp::Signal { session: pid, signal }).await?;
    // A killed group is reaped at once; give it a moment so the answer says so.
    for _ in 0..20 {
        let c = find_command(&vm, id, pid).await?;
        if c.exit_code.is_some() {
            return Ok(Json(c));
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    Ok(Json(find_command(&vm, id, pid).await?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn characters_cut_between_reads_are_joined() {
        let mut s = Utf8Stream::default();
        let check = "✓ ok";
        let bytes = check.as_bytes();
        assert_eq!(s.push(&bytes[..1]), "");
        assert_eq!(s.push(&bytes[1..2]), "");
        assert_eq!(s.push(&bytes[2..]), check);
        assert_eq!(s.push(b"a\xffb"), "a\u{FFFD}b");
        assert_eq!(s.push(&[0xe2, 0x9c]), "");
        assert_eq!(s.finish(), "\u{FFFD}");
        assert_eq!(s.finish(), "");
    }

    #[test]
    fn client_frames_parse_as_the_sdk_sends_them() {
        let f: ClientFrame = serde_json::from_str(r#"{"type":"stdin","data":"hi\n"}"#).unwrap();
        assert!(matches!(f, ClientFrame::Stdin { data } if data == "hi\n"));
        let f: ClientFrame = serde_json::from_str(r#"{"type":"stdin_close"}"#).unwrap();
        assert!(matches!(f, ClientFrame::StdinClose));
        let f: ClientFrame = serde_json::from_str(r#"{"type":"resize","rows":40,"cols":120}"#).unwrap();
        assert!(matches!(f, ClientFrame::Resize { rows: 40, cols: 120 }));
        let f: ClientFrame = serde_json::from_str(r#"{"type":"signal","signal":"SIGKILL"}"#).unwrap();
        assert!(matches!(f, ClientFrame::Signal { signal } if signal == "SIGKILL"));
        assert!(serde_json::from_str::<ClientFrame>(r#"{"type":"nope"}"#).is_err());
    }

    #[test]
    fn sizes_are_checked() {
        assert_eq!(size(None, None, false).unwrap(), None);
        assert_eq!(size(None, None, true).unwrap(), Some(WinSize { rows: 24, cols: 80 }));
        assert_eq!(
            size(Some(40), None, false).unwrap(),
            Some(WinSize { rows: 40, cols: 80 })
        );
        assert!(size(Some(0), Some(80), false).is_err());
        assert!(size(Some(24), Some(5000), false).is_err());
    }
}
