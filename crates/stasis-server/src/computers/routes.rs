//! HTTP routes of the Computers API. Handlers only extract, call the service, and shape the
//! answer exactly as the official SDK parses it (a bare Computer, no envelope, except clone).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use stasis_types::{
    ActionResponse, Computer, ComputerId, ComputerList, CreateComputerRequest, ExecPythonRequest, ExecRequest,
    ExecResponse,
};
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::{Computers, DEFAULT_EXEC_TIMEOUT_SECS, MAX_EXEC_TIMEOUT_SECS};
use crate::auth::Tenant;
use crate::body::JsonObject;
use crate::error::{ApiError, ApiResult};
use crate::openapi::{Errors, WriteErrors};
use crate::AppState;

/// The routes, each registered with its OpenAPI description.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create, list))
        .routes(routes!(get_one, destroy))
        .routes(routes!(start))
        .routes(routes!(stop))
        .routes(routes!(restart))
        .routes(routes!(exec_bash))
        .routes(routes!(exec_python))
}

/// A computer id from the path; a malformed one cannot name any computer.
pub fn computer_id(raw: &str) -> ApiResult<ComputerId> {
    raw.parse().map_err(|_| ApiError::NotFound { kind: "computer" })
}

fn service(state: &AppState) -> &std::sync::Arc<Computers> {
    &state.computers
}

/// Create a computer; it boots in the background (`provisioning` → `running`).
#[utoipa::path(post, path = "/computers", operation_id = "createComputer", tag = "computers", request_body = CreateComputerRequest,
    responses((status = 201, description = "The new computer", body = Computer), WriteErrors))]
async fn create(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    body: JsonObject,
) -> ApiResult<(StatusCode, Json<Computer>)> {
    let new = Computers::validate(&body)?;
    let computer = service(&state).create(tenant, new).await?;
    Ok((StatusCode::CREATED, Json(computer)))
}

/// The tenant's computers (not the destroyed ones).
#[utoipa::path(get, path = "/computers", operation_id = "listComputers", tag = "computers",
    responses((status = 200, description = "The computers", body = ComputerList), Errors))]
async fn list(State(state): State<AppState>, Tenant(tenant): Tenant) -> ApiResult<Json<ComputerList>> {
    let computers = service(&state).list(tenant).await?;
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
    Ok(Json(service(&state).get(tenant, computer_id(&id)?).await?))
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
#[utoipa::path(post, path = "/computers/{id}/start", operation_id = "startComputer", tag = "computers", params(("id" = uuid::Uuid, Path, description = "The computer's id")),
    responses((status = 200, description = "Starting", body = ActionResponse), WriteErrors))]
async fn start(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
    _body: JsonObject,
) -> ApiResult<Json<ActionResponse>> {
    Ok(Json(service(&state).start(tenant, computer_id(&id)?).await?))
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

fn timeout(body: &JsonObject) -> ApiResult<u64> {
    Ok(body
        .optional_seconds("timeout", MAX_EXEC_TIMEOUT_SECS)?
        .unwrap_or(DEFAULT_EXEC_TIMEOUT_SECS))
}

/// Run a command under `bash -c` in the computer and answer with its output and exit code.
#[utoipa::path(post, path = "/computers/{id}/exec", operation_id = "execCommand", tag = "computers", params(("id" = uuid::Uuid, Path, description = "The computer's id")), request_body = ExecRequest,
    responses((status = 200, description = "The command ran (see exit_code)", body = ExecResponse), WriteErrors))]
async fn exec_bash(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
    body: JsonObject,
) -> ApiResult<Json<ExecResponse>> {
    let id = computer_id(&id)?;
    let command = body.required_str("command")?;
    let timeout = timeout(&body)?;
    let args = vec!["-c".to_string(), command];
    Ok(Json(
        service(&state).exec(tenant, id, "/bin/bash", args, timeout).await?,
    ))
}

/// Run Python code with `python3 -c` in the computer.
#[utoipa::path(post, path = "/computers/{id}/exec/python", operation_id = "execPython", tag = "computers", params(("id" = uuid::Uuid, Path, description = "The computer's id")), request_body = ExecPythonRequest,
    responses((status = 200, description = "The code ran (see exit_code)", body = ExecResponse), WriteErrors))]
async fn exec_python(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
    body: JsonObject,
) -> ApiResult<Json<ExecResponse>> {
    let id = computer_id(&id)?;
    let code = body.required_str("code")?;
    let timeout = timeout(&body)?;
    let args = vec!["-c".to_string(), code];
    Ok(Json(service(&state).exec(tenant, id, "python3", args, timeout).await?))
}
