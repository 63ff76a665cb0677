//! HTTP routes of the Computers API. Handlers only extract, call the service, and shape the
//! answer exactly as the official SDK parses it (a bare Computer, no envelope, except clone).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::future::BoxFuture;
use stasis_types::{
    ActionResponse, CommandRequest, Computer, ComputerData, ComputerList, CreateComputerRequest, ExecPythonRequest,
    ExecRequest, ExecResponse, ResizeRequest, Size, StartRequest, UpdateComputerRequest,
};
use utoipa_axum::routes;

use super::{Computers, Run, DEFAULT_EXEC_TIMEOUT_SECS, MAX_EXEC_TIMEOUT_SECS};
use crate::auth::Tenant;
use crate::body;
use crate::endpoints::{computer_id, Endpoint, Endpoints, IfLost, Params, Runs};
use crate::http_error::{ApiError, ApiResult};
use crate::openapi::{Errors, WriteErrors};
use crate::AppState;

/// The routes, each registered with its OpenAPI description.
/// With several hosts, reads come from the shared database and everything that changes a
/// machine runs on the host that runs it (see [`crate::endpoints`]).
pub fn router() -> Endpoints {
    let machine = Runs::OnOwner(IfLost::Unavailable);
    Endpoints::new()
        .add(Runs::Placed(create_needs), routes!(create))
        .add(Runs::Anywhere, routes!(list))
        .add(Runs::Anywhere, routes!(get_one))
        .add(Runs::OnOwner(IfLost::AnswerHere), routes!(update))
        // Deleting needs no machine: the control plane records it (its own runtime has no such
        // machine to stop), and the host, when it is back, finds the computer gone and removes
        // its QEMU and files.
        .add(Runs::OnOwner(IfLost::AnswerHere), routes!(destroy))
        .add(machine, routes!(start))
        .add(machine, routes!(stop))
        .add(machine, routes!(restart))
        .add(Endpoint::from(machine).long(), routes!(exec_bash))
        .add(Endpoint::from(machine).long(), routes!(exec_python))
        .add(Endpoint::from(machine).long(), routes!(run_command))
        .add(Runs::OnOwner(IfLost::AnswerHere), routes!(resize))
}

/// A create needs the memory of the size it asks for (the smallest if none); the host
/// validates the body properly.
fn create_needs<'a>(
    _: &'a AppState,
    _: stasis_types::TenantId,
    _: &'a Params,
    body: &'a axum::body::Bytes,
) -> BoxFuture<'a, ApiResult<crate::endpoints::Wants>> {
    let size = serde_json::from_slice::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v.get("size").and_then(|s| s.as_str()).and_then(Size::parse));
    Box::pin(std::future::ready(Ok(crate::endpoints::Wants {
        memory_mib: size.unwrap_or(Size::Xs).memory_mib(),
        machine: None,
    })))
}

/// A computer id from the path; a malformed one cannot name any computer.
fn service(state: &AppState) -> &std::sync::Arc<Computers> {
    &state.computers
}

/// Create a computer; it boots in the background (`provisioning` → `running`).
#[utoipa::path(post, path = "/computers", operation_id = "createComputer", tag = "computers", request_body = CreateComputerRequest,
    responses((status = 201, description = "The new computer", body = Computer), WriteErrors))]
async fn create(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    crate::body::Json(req): crate::body::Json<CreateComputerRequest>,
) -> ApiResult<(StatusCode, Json<Computer>)> {
    let new = Computers::validate(req)?;
    let mut computer = service(&state).create(tenant, new).await?;
    state.previews.dress(&mut computer);
    Ok((StatusCode::CREATED, Json(computer)))
}

/// The tenant's computers (not the destroyed ones).
#[utoipa::path(get, path = "/computers", operation_id = "listComputers", tag = "computers",
    responses((status = 200, description = "The computers", body = ComputerList), Errors))]
async fn list(State(state): State<AppState>, Tenant(tenant): Tenant) -> ApiResult<Json<ComputerList>> {
    let mut computers = service(&state).list(tenant).await?;
    computers.iter_mut().for_each(|c| state.previews.dress(c));
    Ok(Json(ComputerList {
        total: computers.len(),
        computers,
    }))
}

/// One computer.
#[utoipa::path(get, path = "/computers/{id}", operation_id = "getComputer", tag = "computers", params(("id" = uuid::Uuid, Path, description = "The computer's id")),
    responses((status = 200, description = "The computer", body = Computer), Errors))]
async fn get_one(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> ApiResult<Json<Computer>> {
    let mut computer = service(&state).get(tenant, computer_id(&id)?).await?;
    state.previews.dress(&mut computer);
    Ok(Json(computer))
}

/// Destroy a computer: its VM and disk go; its snapshots stay restorable.
#[utoipa::path(delete, path = "/computers/{id}", operation_id = "deleteComputer", tag = "computers", params(("id" = uuid::Uuid, Path, description = "The computer's id")),
    responses((status = 200, description = "Destroyed", body = ActionResponse), WriteErrors))]
async fn destroy(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> ApiResult<Json<ActionResponse>> {
    Ok(Json(service(&state).destroy(tenant, computer_id(&id)?).await?))
}

/// Start a stopped (or errored) computer.
#[utoipa::path(post, path = "/computers/{id}/start", operation_id = "startComputer", tag = "computers", params(("id" = uuid::Uuid, Path, description = "The computer's id")), request_body(content = Option<StartRequest>),
    responses((status = 200, description = "Starting", body = ActionResponse), WriteErrors))]
async fn start(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
    body::Json(req): body::Json<StartRequest>,
) -> ApiResult<Json<ActionResponse>> {
    let id = computer_id(&id)?;
    let env = crate::env::validate("env", req.env)?;
    Ok(Json(service(&state).start(tenant, id, env).await?))
}

/// Rename a computer or replace its metadata. Its slug, and so its preview URLs, stay.
#[utoipa::path(patch, path = "/computers/{id}", operation_id = "updateComputer", tag = "computers", params(("id" = uuid::Uuid, Path, description = "The computer's id")), request_body = UpdateComputerRequest,
    responses((status = 200, description = "The computer", body = Computer), WriteErrors))]
async fn update(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
    body::Json(req): body::Json<UpdateComputerRequest>,
) -> ApiResult<Json<Computer>> {
    let mut computer = service(&state).update(tenant, computer_id(&id)?, req).await?;
    state.previews.dress(&mut computer);
    Ok(Json(computer))
}

/// Stop a computer (its disk is kept).
#[utoipa::path(post, path = "/computers/{id}/stop", operation_id = "stopComputer", tag = "computers", params(("id" = uuid::Uuid, Path, description = "The computer's id")),
    responses((status = 200, description = "Stopped", body = ActionResponse), WriteErrors))]
async fn stop(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> ApiResult<Json<ActionResponse>> {
    Ok(Json(service(&state).stop(tenant, computer_id(&id)?).await?))
}

/// Stop and start a computer.
#[utoipa::path(post, path = "/computers/{id}/restart", operation_id = "restartComputer", tag = "computers", params(("id" = uuid::Uuid, Path, description = "The computer's id")),
    responses((status = 200, description = "Restarting", body = ActionResponse), WriteErrors))]
async fn restart(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> ApiResult<Json<ActionResponse>> {
    Ok(Json(service(&state).restart(tenant, computer_id(&id)?).await?))
}

/// The timeout asked for, within `1..=MAX_EXEC_TIMEOUT_SECS` (default 60).
fn timeout(asked: Option<u64>) -> ApiResult<u64> {
    timeout_in("timeout", asked)
}

fn timeout_in(field: &str, asked: Option<u64>) -> ApiResult<u64> {
    match asked {
        None => Ok(DEFAULT_EXEC_TIMEOUT_SECS),
        Some(s) if (1..=MAX_EXEC_TIMEOUT_SECS).contains(&s) => Ok(s),
        Some(_) => Err(ApiError::invalid(
            field,
            format!("{field} must be a whole number of seconds between 1 and {MAX_EXEC_TIMEOUT_SECS}"),
        )),
    }
}

/// Run a command under `bash -c` in a working directory, with stdin, and wait for it (the
/// SDK's `commands.run_computer`, and `helpers.exec_command` with a `cwd`); with
/// `"detached": true`, start it in the background and answer at once.
#[utoipa::path(post, path = "/computers/{id}/commands", operation_id = "runCommand", tag = "computers", params(("id" = uuid::Uuid, Path, description = "The computer's id")), request_body = CommandRequest,
    responses((status = 200, description = "The command ran (see exit_code)", body = ExecResponse),
        (status = 202, description = "The command runs in the background", body = crate::sessions::BackgroundCommand),
        (status = 429, description = "The computer runs as many sessions as it may", body = stasis_types::ErrorBody), WriteErrors))]
async fn run_command(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
    body::Json(req): body::Json<CommandRequest>,
) -> ApiResult<Response> {
    let id = computer_id(&id)?;
    let timeout = timeout_in("timeout_seconds", req.timeout_seconds)?;
    if let Some(cwd) = &req.cwd {
        if !cwd.starts_with('/') || cwd.contains('\0') || cwd.len() > 4096 {
            return Err(ApiError::invalid(
                "cwd",
                "cwd must be an absolute path (at most 4096 bytes)",
            ));
        }
    }
    if req.detached == Some(true) {
        let started = crate::sessions::start_background(&state, tenant, id, req.command, req.cwd).await?;
        return Ok((StatusCode::ACCEPTED, Json(started)).into_response());
    }
    let args = vec!["-c".to_string(), req.command];
    let ran = service(&state)
        .exec(
            tenant,
            id,
            Run {
                cwd: req.cwd,
                stdin: req.stdin,
                ..Run::new("/bin/bash", args, timeout)
            },
        )
        .await?;
    Ok(Json(ran).into_response())
}

/// Give a stopped computer another size, which it starts with next time (`size`, or the
/// `cpu_count` and `memory_mb` of one). A running computer answers 409 `RESOURCE_STATE`.
#[utoipa::path(post, path = "/computers/{id}/resize", operation_id = "resizeComputer", tag = "computers", params(("id" = uuid::Uuid, Path, description = "The computer's id")), request_body = ResizeRequest,
    responses((status = 200, description = "The computer, with its size", body = ComputerData), WriteErrors))]
async fn resize(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
    body::Json(req): body::Json<ResizeRequest>,
) -> ApiResult<Json<ComputerData>> {
    let mut computer = service(&state).resize(tenant, computer_id(&id)?, req).await?;
    state.previews.dress(&mut computer);
    Ok(Json(ComputerData { data: computer }))
}

/// Run a command under `bash -c` in the computer and answer with its output and exit code.
#[utoipa::path(post, path = "/computers/{id}/exec", operation_id = "execCommand", tag = "computers", params(("id" = uuid::Uuid, Path, description = "The computer's id")), request_body = ExecRequest,
    responses((status = 200, description = "The command ran (see exit_code)", body = ExecResponse), WriteErrors))]
async fn exec_bash(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
    body::Json(req): body::Json<ExecRequest>,
) -> ApiResult<Json<ExecResponse>> {
    let id = computer_id(&id)?;
    let timeout = timeout(req.timeout)?;
    let args = vec!["-c".to_string(), req.command];
    Ok(Json(
        service(&state)
            .exec(tenant, id, Run::new("/bin/bash", args, timeout))
            .await?,
    ))
}

/// Run Python code with `python3 -c` in the computer.
#[utoipa::path(post, path = "/computers/{id}/exec/python", operation_id = "execPython", tag = "computers", params(("id" = uuid::Uuid, Path, description = "The computer's id")), request_body = ExecPythonRequest,
    responses((status = 200, description = "The code ran (see exit_code)", body = ExecResponse), WriteErrors))]
async fn exec_python(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
    body::Json(req): body::Json<ExecPythonRequest>,
) -> ApiResult<Json<ExecResponse>> {
    let id = computer_id(&id)?;
    let timeout = timeout(req.timeout)?;
    let args = vec!["-c".to_string(), req.code];
    Ok(Json(
        service(&state)
            .exec(tenant, id, Run::new("python3", args, timeout))
            .await?,
    ))
}
