//! HTTP routes of the Computers API. Handlers only extract, call the service, and shape the
//! answer exactly as the official SDK parses it (a bare Computer, no envelope, except clone).

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use stasis_types::{ActionResponse, Computer, ComputerId, ComputerList, ExecResponse};

use super::{Computers, DEFAULT_EXEC_TIMEOUT_SECS, MAX_EXEC_TIMEOUT_SECS};
use crate::auth::Tenant;
use crate::body::JsonObject;
use crate::error::{ApiError, ApiResult};
use crate::AppState;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/computers", post(create).get(list))
        .route("/computers/{id}", get(get_one).delete(destroy))
        .route("/computers/{id}/start", post(start))
        .route("/computers/{id}/stop", post(stop))
        .route("/computers/{id}/restart", post(restart))
        .route("/computers/{id}/exec", post(exec_bash))
        .route("/computers/{id}/exec/python", post(exec_python))
}

/// A computer id from the path; a malformed one cannot name any computer.
pub fn computer_id(raw: &str) -> ApiResult<ComputerId> {
    raw.parse().map_err(|_| ApiError::NotFound { kind: "computer" })
}

fn service(state: &AppState) -> &std::sync::Arc<Computers> {
    &state.computers
}

async fn create(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    body: JsonObject,
) -> ApiResult<(StatusCode, Json<Computer>)> {
    let new = Computers::validate(&body)?;
    let computer = service(&state).create(tenant, new).await?;
    Ok((StatusCode::CREATED, Json(computer)))
}

async fn list(State(state): State<AppState>, Tenant(tenant): Tenant) -> ApiResult<Json<ComputerList>> {
    let computers = service(&state).list(tenant).await?;
    Ok(Json(ComputerList {
        total: computers.len(),
        computers,
    }))
}

async fn get_one(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> ApiResult<Json<Computer>> {
    Ok(Json(service(&state).get(tenant, computer_id(&id)?).await?))
}

async fn destroy(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> ApiResult<Json<ActionResponse>> {
    Ok(Json(service(&state).destroy(tenant, computer_id(&id)?).await?))
}

async fn start(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
    _body: JsonObject,
) -> ApiResult<Json<ActionResponse>> {
    Ok(Json(service(&state).start(tenant, computer_id(&id)?).await?))
}

async fn stop(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> ApiResult<Json<ActionResponse>> {
    Ok(Json(service(&state).stop(tenant, computer_id(&id)?).await?))
}

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
