//! Files in a computer, as the official SDK calls them (`computer.files`: upload, download,
//! list, stat, mkdir, rename, copy, chmod, readdir, delete, export, write_file/read_file).
//! Every operation is the guest agent's ([`FsOp`]), on the machine's own file system; file
//! contents move through it in chunks of [`FILE_CHUNK_BYTES`], a few in flight at a time, so an
//! upload or download of any size holds a few MiB here and in the guest. An upload is written
//! beside its destination and renamed over it when complete: a failed or abandoned one leaves
//! the destination as it was (and the partial file is removed). Failures say what failed on
//! which path, with the status of their cause (404 no such file, 409 not a directory, 403
//! permission, 507 disk full, 422 a path that is not absolute).

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderValue};
use axum::response::Response;
use axum::Json;
use base64::Engine;
use futures::{StreamExt, TryStreamExt};
use stasis_agent_proto::{FileMeta, FsErrorKind, FsOp, FsReply, FILES_SINCE, FILE_CHUNK_BYTES};
use stasis_types::{
    ActionResponse, ChmodRequest, ComputerId, DirEntries, DirEntry, DirListing, FileInfo, FileList, FileStat,
    MkdirRequest, MoveRequest, PathRequest, TenantId, WriteFileRequest,
};
use stasis_vmm::Vm;
use utoipa_axum::routes;

use crate::auth::Tenant;
use crate::body;
use crate::endpoints::computer_id;
use crate::endpoints::{Endpoint, Endpoints, IfLost, Runs};
use crate::error::{Conflict, Error};
use crate::http_error::{ApiError, ApiResult};
use crate::openapi::{FileWriteErrors, ReadErrors};
use crate::AppState;

/// Longest path taken.
pub const MAX_PATH: usize = 4096;
/// Chunks of a transfer in flight at once.
const IN_FLIGHT: usize = 4;
/// Largest body of `POST /files/write` (base64 JSON); larger files go by `upload`.
pub const MAX_WRITE_BODY: usize = 16 * 1024 * 1024;
/// Most of a failed upload read (and dropped) so that its client sees the answer.
const MAX_DRAIN: u64 = 256 * 1024 * 1024;
/// How long an upload may go without a byte arriving.
const UPLOAD_IDLE: std::time::Duration = std::time::Duration::from_secs(60);

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// All of them need the machine; transfers stream (a control plane passes them on as they
/// are) and may take long.
pub fn router() -> Endpoints {
    let machine = Runs::OnOwner(IfLost::Unavailable);
    let transfer = Endpoint::from(machine).long().raw();
    Endpoints::new()
        .add(transfer, routes!(upload))
        .add(transfer, routes!(download))
        .add(machine, routes!(list, delete))
        .add(machine, routes!(stat))
        .add(machine, routes!(mkdir))
        .add(machine, routes!(rename))
        .add(machine, routes!(copy))
        .add(machine, routes!(chmod))
        .add(machine, routes!(readdir))
        .add(machine, routes!(export))
        .add(machine, routes!(write))
}

/// An absolute path of at most [`MAX_PATH`] bytes, without NUL (what the agent is given).
fn checked(field: &str, path: &str) -> Result<String, Error> {
    if path.starts_with('/') && path.len() <= MAX_PATH && !path.contains('\0') {
        return Ok(path.to_string());
    }
    Err(Error::File {
        kind: FsErrorKind::Invalid,
        message: format!("{field} {path:?} is not an absolute path (of at most {MAX_PATH} bytes, without NUL)"),
    })
}

/// A mode given as octal text (`"0755"`, `"755"`, `"0o755"`).
fn mode(field: &str, raw: &str) -> Result<u32, Error> {
    let digits = raw.trim().trim_start_matches("0o");
    u32::from_str_radix(digits, 8)
        .ok()
        .filter(|m| *m <= 0o7777 && !digits.is_empty())
        .ok_or_else(|| Error::invalid(field, format!("{raw:?} is not an octal mode like \"0755\"")))
}

/// The running machine of the computer, if its agent does files.
async fn machine(state: &AppState, tenant: TenantId, id: &str) -> ApiResult<Arc<Vm>> {
    machine_speaking(state, tenant, computer_id(id)?, FILES_SINCE, "file operations").await
}

/// The running machine of the computer, if its agent speaks protocol `since` (for `what`)
/// or later: 409 `AGENT_TOO_OLD` otherwise.
pub(crate) async fn machine_speaking(
    state: &AppState,
    tenant: TenantId,
    id: ComputerId,
    since: u32,
    what: &str,
) -> ApiResult<Arc<Vm>> {
    let vm = state.computers.running_vm(tenant, id).await?;
    let version = vm.agent_version().await.map_err(crate::error::agent_failure)?;
    if version < since {
        return Err(Error::conflict(
            Conflict::AgentTooOld,
            format!(
                "computer {id} runs a guest agent of protocol {version}, from before {what} \
                 (it was restored from an older snapshot); {what} need protocol {since}"
            ),
        )
        .into());
    }
    Ok(vm)
}

/// Runs `op` (which answers nothing) in the computer; answers `said`.
async fn act(state: &AppState, tenant: TenantId, id: &str, op: FsOp, said: String) -> ApiResult<Json<ActionResponse>> {
    let vm = machine(state, tenant, id).await?;
    done(&vm, op).await?;
    Ok(ok(said))
}

/// Runs `op`; a failure in the guest is a [`Error::File`].
async fn run(vm: &Vm, op: FsOp) -> ApiResult<FsReply> {
    match vm.fs(op).await {
        Ok(FsReply::Failed { kind, message }) => Err(Error::File { kind, message }.into()),
        Ok(reply) => Ok(reply),
        Err(e) => Err(crate::error::agent_failure(e).into()),
    }
}

async fn done(vm: &Vm, op: FsOp) -> ApiResult<()> {
    match run(vm, op).await? {
        FsReply::Done => Ok(()),
        other => Err(ApiError::internal(format!("the agent answered {other:?}"))),
    }
}

async fn meta(vm: &Vm, path: &str) -> ApiResult<FileMeta> {
    match run(vm, FsOp::Stat { path: path.into() }).await? {
        FsReply::Stat(m) => Ok(m),
        other => Err(ApiError::internal(format!("the agent answered {other:?} to a stat"))),
    }
}

async fn entries(vm: &Vm, path: &str) -> ApiResult<(Vec<FileMeta>, bool)> {
    match run(vm, FsOp::List { path: path.into() }).await? {
        FsReply::Entries { entries, truncated } => Ok((entries, truncated)),
        other => Err(ApiError::internal(format!("the agent answered {other:?} to a listing"))),
    }
}

fn time_of(ms: Option<i64>) -> Option<chrono::DateTime<chrono::Utc>> {
    ms.and_then(chrono::DateTime::from_timestamp_millis)
}

fn ok(message: String) -> Json<ActionResponse> {
    Json(ActionResponse {
        success: true,
        status: "ok".into(),
        message,
    })
}

#[derive(Debug, serde::Deserialize)]
pub struct PathQuery {
    pub path: Option<String>,
}

/// A directory's entries (default `/root`).
#[utoipa::path(get, path = "/computers/{id}/files", operation_id = "listFiles", tag = "files",
    params(("id" = uuid::Uuid, Path, description = "The computer's id"), ("path" = Option<String>, Query, description = "An absolute path (default /root)")),
    responses((status = 200, description = "The entries, by name", body = FileList), ReadErrors))]
async fn list(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
    crate::body::Query(q): crate::body::Query<PathQuery>,
) -> ApiResult<Json<FileList>> {
    let path = checked("path", q.path.as_deref().unwrap_or("/root"))?;
    let vm = machine(&state, tenant, &id).await?;
    let (found, truncated) = entries(&vm, &path).await?;
    Ok(Json(FileList {
        data: found
            .into_iter()
            .map(|m| FileInfo {
                name: m.name,
                path: m.path,
                size: m.size,
                is_dir: m.is_dir,
                modified_at: time_of(m.modified_ms),
            })
            .collect(),
        truncated,
    }))
}

/// A directory's entries with their kinds.
#[utoipa::path(get, path = "/computers/{id}/files/readdir", operation_id = "readDir", tag = "files",
    params(("id" = uuid::Uuid, Path, description = "The computer's id"), ("path" = String, Query, description = "An absolute path")),
    responses((status = 200, description = "The entries, by name", body = DirListing), ReadErrors))]
async fn readdir(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
    crate::body::Query(q): crate::body::Query<PathQuery>,
) -> ApiResult<Json<DirListing>> {
    let path = checked("path", q.path.as_deref().unwrap_or("/root"))?;
    let vm = machine(&state, tenant, &id).await?;
    let (found, truncated) = entries(&vm, &path).await?;
    Ok(Json(DirListing {
        data: DirEntries {
            entries: found
                .into_iter()
                .map(|m| DirEntry {
                    name: m.name,
                    is_dir: m.is_dir,
                    is_symlink: m.is_symlink,
                    size: m.size,
                    modified_at: time_of(m.modified_ms),
                })
                .collect(),
            truncated,
        },
    }))
}

/// What a path is (a symlink is described, not followed).
#[utoipa::path(post, path = "/computers/{id}/files/stat", operation_id = "statFile", tag = "files",
    params(("id" = uuid::Uuid, Path, description = "The computer's id")), request_body = PathRequest,
    responses((status = 200, description = "The path", body = FileStat), FileWriteErrors))]
async fn stat(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
    body::Json(req): body::Json<PathRequest>,
) -> ApiResult<Json<FileStat>> {
    let path = checked("path", &req.path)?;
    let vm = machine(&state, tenant, &id).await?;
    let m = meta(&vm, &path).await?;
    Ok(Json(FileStat {
        path: m.path,
        size: m.size,
        mode: m.mode,
        is_dir: m.is_dir,
        is_symlink: m.is_symlink,
        symlink_target: m.symlink_target,
        modified_at: time_of(m.modified_ms),
    }))
}

/// Make a directory (by default with its missing parents, mode 0755).
#[utoipa::path(post, path = "/computers/{id}/files/mkdir", operation_id = "makeDir", tag = "files",
    params(("id" = uuid::Uuid, Path, description = "The computer's id")), request_body = MkdirRequest,
    responses((status = 200, description = "Made", body = ActionResponse), FileWriteErrors))]
async fn mkdir(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
    body::Json(req): body::Json<MkdirRequest>,
) -> ApiResult<Json<ActionResponse>> {
    let path = checked("path", &req.path)?;
    let mode = mode("mode", req.mode.as_deref().unwrap_or("0755"))?;
    let said = format!("made {path}");
    act(
        &state,
        tenant,
        &id,
        FsOp::Mkdir {
            path,
            recursive: req.recursive.unwrap_or(true),
            mode,
        },
        said,
    )
    .await
}

/// Rename or move a path (a file at `to` is replaced).
#[utoipa::path(post, path = "/computers/{id}/files/rename", operation_id = "renameFile", tag = "files",
    params(("id" = uuid::Uuid, Path, description = "The computer's id")), request_body = MoveRequest,
    responses((status = 200, description = "Renamed", body = ActionResponse), FileWriteErrors))]
async fn rename(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
    body::Json(req): body::Json<MoveRequest>,
) -> ApiResult<Json<ActionResponse>> {
    let (from, to) = (checked("from", &req.from)?, checked("to", &req.to)?);
    let said = format!("renamed {from} to {to}");
    act(&state, tenant, &id, FsOp::Rename { from, to }, said).await
}

/// Copy a file, or with `recursive` a directory and all it holds.
#[utoipa::path(post, path = "/computers/{id}/files/copy", operation_id = "copyFile", tag = "files",
    params(("id" = uuid::Uuid, Path, description = "The computer's id")), request_body = MoveRequest,
    responses((status = 200, description = "Copied", body = ActionResponse), FileWriteErrors))]
async fn copy(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
    body::Json(req): body::Json<MoveRequest>,
) -> ApiResult<Json<ActionResponse>> {
    let (from, to) = (checked("from", &req.from)?, checked("to", &req.to)?);
    let said = format!("copied {from} to {to}");
    act(
        &state,
        tenant,
        &id,
        FsOp::Copy {
            from,
            to,
            recursive: req.recursive.unwrap_or(false),
        },
        said,
    )
    .await
}

/// Change a path's permission bits.
#[utoipa::path(post, path = "/computers/{id}/files/chmod", operation_id = "chmodFile", tag = "files",
    params(("id" = uuid::Uuid, Path, description = "The computer's id")), request_body = ChmodRequest,
    responses((status = 200, description = "Changed", body = ActionResponse), FileWriteErrors))]
async fn chmod(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
    body::Json(req): body::Json<ChmodRequest>,
) -> ApiResult<Json<ActionResponse>> {
    let path = checked("path", &req.path)?;
    let mode = mode("mode", &req.mode)?;
    let said = format!("{path} is mode {mode:04o}");
    act(&state, tenant, &id, FsOp::Chmod { path, mode }, said).await
}

/// Delete a file, or a directory with all it holds.
#[utoipa::path(delete, path = "/computers/{id}/files", operation_id = "deleteFile", tag = "files",
    params(("id" = uuid::Uuid, Path, description = "The computer's id")), request_body = PathRequest,
    responses((status = 200, description = "Deleted", body = ActionResponse), FileWriteErrors))]
async fn delete(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
    body::Json(req): body::Json<PathRequest>,
) -> ApiResult<Json<ActionResponse>> {
    let path = checked("path", &req.path)?;
    let said = format!("deleted {path}");
    act(&state, tenant, &id, FsOp::Remove { path, recursive: true }, said).await
}

/// Check that a file can be downloaded; answers where (`GET .../files/download?path=`).
#[utoipa::path(post, path = "/computers/{id}/files/export", operation_id = "exportFile", tag = "files",
    params(("id" = uuid::Uuid, Path, description = "The computer's id")), request_body = PathRequest,
    responses((status = 200, description = "Where to download it", body = ActionResponse), FileWriteErrors))]
async fn export(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
    body::Json(req): body::Json<PathRequest>,
) -> ApiResult<Json<ActionResponse>> {
    let path = checked("path", &req.path)?;
    let vm = machine(&state, tenant, &id).await?;
    let m = meta(&vm, &path).await?;
    if m.is_dir {
        return Err(Error::File {
            kind: FsErrorKind::IsADirectory,
            message: format!("exporting {path}: is a directory (export files one at a time)"),
        }
        .into());
    }
    let query: String = url_encode(&path);
    Ok(ok(format!(
        "{} bytes at /api/v1/computers/{id}/files/download?path={query}",
        m.size
    )))
}

fn url_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Write a whole file (base64), making missing parent directories; for files over 12 MiB,
/// `upload`.
#[utoipa::path(post, path = "/computers/{id}/files/write", operation_id = "writeFile", tag = "files",
    params(("id" = uuid::Uuid, Path, description = "The computer's id")), request_body = WriteFileRequest,
    responses((status = 200, description = "Written", body = ActionResponse), FileWriteErrors))]
async fn write(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
    req: Request,
) -> ApiResult<Json<ActionResponse>> {
    let deadline = req.extensions().get::<body::BodyDeadline>().copied();
    let bytes = body::read_limited(req.into_body(), deadline, MAX_WRITE_BODY).await?;
    let body::Json(w) = body::Json::<WriteFileRequest>::parse(&bytes)?;
    drop(bytes);
    let path = checked("path", &w.path)?;
    let content = B64
        .decode(w.content_base64.as_bytes())
        .map_err(|e| Error::invalid("content_base64", format!("not base64: {e}")))?;
    drop(w.content_base64);
    let vm = machine(&state, tenant, &id).await?;
    let written = put(&vm, &path, futures::stream::iter([Ok::<_, ApiError>(content)])).await?;
    Ok(ok(format!("wrote {written} bytes to {path}")))
}

/// The bytes of a regular file, streamed.
#[utoipa::path(get, path = "/computers/{id}/files/download", operation_id = "downloadFile", tag = "files",
    params(("id" = uuid::Uuid, Path, description = "The computer's id"), ("path" = String, Query, description = "An absolute path")),
    responses((status = 200, description = "The file's bytes", content_type = "application/octet-stream", body = Vec<u8>), ReadErrors))]
async fn download(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
    crate::body::Query(q): crate::body::Query<PathQuery>,
) -> ApiResult<Response> {
    let Some(raw) = q.path.as_deref() else {
        return Err(ApiError::invalid("path", "say which file: ?path=/absolute/path"));
    };
    let path = checked("path", raw)?;
    let vm = machine(&state, tenant, &id).await?;
    let m = meta(&vm, &path).await?;
    if m.is_dir {
        return Err(Error::File {
            kind: FsErrorKind::IsADirectory,
            message: format!("downloading {path}: is a directory"),
        }
        .into());
    }
    // The first chunk before answering, so a file that cannot be read is a clear error and
    // not a cut-off body.
    let first = read_chunk(vm.clone(), path.clone(), 0).await?;
    let size = first.1;
    let chunks = size.div_ceil(FILE_CHUNK_BYTES as u64).max(1);
    let rest = futures::stream::iter(1..chunks)
        .map({
            let (vm, path) = (vm.clone(), path.clone());
            move |i| read_chunk(vm.clone(), path.clone(), i * FILE_CHUNK_BYTES as u64)
        })
        .buffered(IN_FLIGHT)
        .map_ok(|(bytes, _)| bytes)
        .map_err(|e| std::io::Error::other(e.to_string()));
    let stream = futures::stream::once(std::future::ready(Ok::<_, std::io::Error>(first.0))).chain(rest);
    let name = path.rsplit('/').next().unwrap_or("file").replace('"', "");
    let mut resp = Response::new(Body::from_stream(stream));
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/octet-stream"),
    );
    h.insert(header::CONTENT_LENGTH, HeaderValue::from(size));
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{}\"", url_encode(&name))) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(resp)
}

/// One chunk of a file from `offset`, and the file's size.
async fn read_chunk(vm: Arc<Vm>, path: String, offset: u64) -> ApiResult<(axum::body::Bytes, u64)> {
    match run(
        &vm,
        FsOp::Read {
            path,
            offset,
            len: FILE_CHUNK_BYTES as u32,
        },
    )
    .await?
    {
        FsReply::Data { data, size, .. } => {
            let bytes = B64
                .decode(data.as_bytes())
                .map_err(|e| ApiError::internal(format!("the agent's data is not base64: {e}")))?;
            Ok((bytes.into(), size))
        }
        other => Err(ApiError::internal(format!("the agent answered {other:?} to a read"))),
    }
}

/// Writes what `source` yields to `path`, through a file beside it renamed over it at the
/// end; answers how many bytes. A failure (or the request going away) removes the partial
/// file.
async fn put<S, B>(vm: &Arc<Vm>, path: &str, source: S) -> ApiResult<u64>
where
    S: futures::Stream<Item = Result<B, ApiError>> + Unpin,
    B: AsRef<[u8]>,
{
    let (dir, name) = path.rsplit_once('/').unwrap_or(("", path));
    if name.is_empty() {
        return Err(Error::File {
            kind: FsErrorKind::Invalid,
            message: format!("writing {path}: names a directory, not a file"),
        }
        .into());
    }
    let partial = format!("{dir}/.{name}.stasis-partial-{:016x}", rand::random::<u64>());
    // Should the request go away mid-way, the partial file goes too.
    let mut cleanup = RemoveOnDrop {
        vm: Some(vm.clone()),
        path: partial.clone(),
    };
    let mut result = write_chunks(vm, &partial, source).await;
    if result.is_ok() {
        let renamed = FsOp::Rename {
            from: partial.clone(),
            to: path.to_string(),
        };
        if let Err(e) = done(vm, renamed).await {
            result = Err(e);
        }
    }
    cleanup.vm = None;
    match result {
        Ok(written) => Ok(written),
        Err(e) => {
            let _ = vm
                .fs(FsOp::Remove {
                    path: partial.clone(),
                    recursive: false,
                })
                .await;
            // The failure as the destination's, not the partial file's.
            Err(match e {
                ApiError::Domain(Error::File { kind, message }) => Error::File {
                    kind,
                    message: message.replace(&partial, path),
                }
                .into(),
                other => other,
            })
        }
    }
}

/// Writes `source` to `path` from offset 0, [`IN_FLIGHT`] chunks at a time.
async fn write_chunks<S, B>(vm: &Arc<Vm>, path: &str, mut source: S) -> ApiResult<u64>
where
    S: futures::Stream<Item = Result<B, ApiError>> + Unpin,
    B: AsRef<[u8]>,
{
    let mut pending = futures::stream::FuturesUnordered::new();
    let mut buf: Vec<u8> = Vec::with_capacity(FILE_CHUNK_BYTES);
    let mut offset: u64 = 0;
    let send = |offset: u64, chunk: Vec<u8>| {
        let vm = vm.clone();
        let path = path.to_string();
        async move {
            let data = B64.encode(&chunk);
            drop(chunk);
            match run(
                &vm,
                FsOp::Write {
                    path,
                    offset,
                    data,
                    truncate: offset == 0,
                },
            )
            .await?
            {
                FsReply::Written { .. } => Ok(()),
                other => Err(ApiError::internal(format!("the agent answered {other:?} to a write"))),
            }
        }
    };
    // The first chunk alone: it makes (and truncates) the file before others write into it.
    let mut first = true;
    loop {
        let next = tokio::time::timeout(UPLOAD_IDLE, source.next())
            .await
            .map_err(|_| ApiError::BodyTimeout(UPLOAD_IDLE.as_secs()))?;
        let ended = next.is_none();
        if let Some(piece) = next {
            let piece = piece?;
            let mut bytes = piece.as_ref();
            while !bytes.is_empty() {
                let take = (FILE_CHUNK_BYTES - buf.len()).min(bytes.len());
                buf.extend_from_slice(&bytes[..take]);
                bytes = &bytes[take..];
                if buf.len() == FILE_CHUNK_BYTES {
                    let chunk = std::mem::replace(&mut buf, Vec::with_capacity(FILE_CHUNK_BYTES));
                    let len = chunk.len() as u64;
                    if first {
                        send(offset, chunk).await?;
                        first = false;
                    } else {
                        pending.push(send(offset, chunk));
                        while pending.len() >= IN_FLIGHT {
                            if let Some(r) = pending.next().await {
                                r?;
                            }
                        }
                    }
                    offset += len;
                }
            }
        }
        if ended {
            break;
        }
    }
    // The rest (or, for an empty file, the file itself).
    if !buf.is_empty() || first {
        let len = buf.len() as u64;
        let chunk = std::mem::take(&mut buf);
        if first {
            send(offset, chunk).await?;
        } else {
            pending.push(send(offset, chunk));
        }
        offset += len;
    }
    while let Some(r) = pending.next().await {
        r?;
    }
    Ok(offset)
}

/// Reads and drops what is left of an upload's file field: at most [`MAX_DRAIN`] bytes, each
/// piece within the idle time.
async fn drain(field: &mut multer::Field<'static>) {
    let mut left = MAX_DRAIN;
    while let Ok(Ok(Some(piece))) = tokio::time::timeout(UPLOAD_IDLE, field.chunk()).await {
        left = left.saturating_sub(piece.len() as u64);
        if left == 0 {
            break;
        }
    }
}

/// Removes a partial upload unless disarmed (`vm` taken): also when the request is dropped.
struct RemoveOnDrop {
    vm: Option<Arc<Vm>>,
    path: String,
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(vm) = self.vm.take() {
            let path = std::mem::take(&mut self.path);
            tokio::spawn(async move {
                let _ = vm.fs(FsOp::Remove { path, recursive: false }).await;
            });
        }
    }
}

/// Upload a file (multipart: the `path` field, then the `file`), streamed; it replaces what
/// was at `path` only once complete.
#[utoipa::path(post, path = "/computers/{id}/files/upload", operation_id = "uploadFile", tag = "files",
    params(("id" = uuid::Uuid, Path, description = "The computer's id")),
    request_body(content_type = "multipart/form-data", description = "`path` (an absolute path), then `file`"),
    responses((status = 200, description = "Uploaded", body = ActionResponse), FileWriteErrors))]
async fn upload(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
    req: Request,
) -> ApiResult<Json<ActionResponse>> {
    let boundary = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| multer::parse_boundary(v).ok())
        .ok_or_else(|| ApiError::BadRequest("an upload is multipart/form-data (with a boundary)".into()))?;
    let mut form = multer::Multipart::with_constraints(
        req.into_body().into_data_stream(),
        boundary,
        multer::Constraints::new().size_limit(multer::SizeLimit::new().for_field("path", MAX_PATH as u64 + 64)),
    );
    let bad = |e: multer::Error| ApiError::BadRequest(format!("reading the upload: {e}"));
    let mut path: Option<String> = None;
    let mut vm: Option<Arc<Vm>> = None;
    let mut written: Option<u64> = None;
    while let Some(field) = tokio::time::timeout(UPLOAD_IDLE, form.next_field())
        .await
        .map_err(|_| ApiError::BodyTimeout(UPLOAD_IDLE.as_secs()))?
        .map_err(bad)?
    {
        match field.name() {
            Some("path") => {
                let text = field.text().await.map_err(bad)?;
                path = Some(checked("path", &text)?);
            }
            Some("file") => {
                let Some(to) = path.clone() else {
                    return Err(ApiError::invalid(
                        "path",
                        "send the path field before the file (the SDK does)",
                    ));
                };
                if written.is_some() {
                    return Err(ApiError::invalid("file", "one file an upload"));
                }
                let m = match &vm {
                    Some(m) => m.clone(),
                    None => {
                        let m = machine(&state, tenant, &id).await?;
                        vm = Some(m.clone());
                        m
                    }
                };
                let mut field = field;
                let put = put(&m, &to, (&mut field).map_err(bad)).await;
                if put.is_err() {
                    // The client is still sending: take the rest (up to a limit), so that it
                    // reads the answer rather than a connection reset.
                    drain(&mut field).await;
                }
                written = Some(put?);
            }
            // Other fields are not the upload's.
            _ => {}
        }
    }
    match (path, written) {
        (Some(path), Some(n)) => Ok(ok(format!("uploaded {n} bytes to {path}"))),
        (None, _) => Err(ApiError::invalid("path", "an upload needs a path field")),
        (Some(_), None) => Err(ApiError::invalid("file", "an upload needs a file field")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_modes_are_checked() {
        assert_eq!(checked("path", "/root/a b").unwrap(), "/root/a b");
        for bad in ["", "root", "./x", "/a\0b"] {
            assert!(
                matches!(
                    checked("path", bad),
                    Err(Error::File {
                        kind: FsErrorKind::Invalid,
                        ..
                    })
                ),
                "{bad:?}"
            );
        }
        assert!(checked("path", &format!("/{}", "a".repeat(MAX_PATH))).is_err());
        assert_eq!(mode("mode", "0755").unwrap(), 0o755);
        assert_eq!(mode("mode", "644").unwrap(), 0o644);
        assert_eq!(mode("mode", "0o4755").unwrap(), 0o4755);
        for bad in ["", "9", "rwx", "77777"] {
            assert!(mode("mode", bad).is_err(), "{bad:?}");
        }
        assert_eq!(url_encode("/a b/ü"), "/a%20b/%C3%BC");
    }
}
