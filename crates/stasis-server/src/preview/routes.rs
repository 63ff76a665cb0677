//! HTTP routes of ports and preview URLs, as the official SDK calls them
//! (`computer.ports.*`, `computer.urls()`), and the path form of the proxy.

use std::collections::HashMap;

use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::Response;
use axum::Json;
use chrono::{SubsecRound, Utc};
use stasis_types::{Computer, CreatePortRequest, Port, PortList, PortVisibility, UpdatePortRequest, UrlList};
use utoipa_axum::routes;

use super::Previews;
use crate::auth::Tenant;
use crate::body;
use crate::db::PortRecord;
use crate::endpoints::computer_id;
use crate::endpoints::{Endpoint, Endpoints, IfLost, Runs};
use crate::error::{Error, Resource};
use crate::http_error::{ApiError, ApiResult};
use crate::openapi::{Errors, WriteErrors};
use crate::AppState;

/// Exposed ports are metadata (any process answers from the database); the proxy runs on the
/// host that runs the computer, carried there as it is.
pub fn router() -> Endpoints {
    Endpoints::new()
        .add(Runs::Anywhere, routes!(list_ports))
        .add(Runs::Anywhere, routes!(create_port))
        .add(Runs::Anywhere, routes!(update_port))
        .add(Runs::Anywhere, routes!(delete_port))
        .add(Runs::Anywhere, routes!(list_urls))
        .add_any(
            Endpoint::from(Runs::OnOwner(IfLost::Unavailable)).long().raw(),
            routes!(proxy_doc),
            proxy,
        )
}

/// A port number from a path or body: 1 to 65535.
fn port_number(raw: &str) -> ApiResult<u16> {
    raw.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| {
        ApiError::invalid(
            "port",
            format!("port must be a whole number from 1 to 65535, not {raw:?}"),
        )
    })
}

fn visibility(visibility: Option<PortVisibility>, public: Option<bool>) -> ApiResult<Option<bool>> {
    match (visibility, public) {
        (Some(v), Some(p)) if (v == PortVisibility::Public) != p => Err(ApiError::invalid(
            "public",
            "visibility and public disagree; give one of them",
        )),
        (Some(v), _) => Ok(Some(v == PortVisibility::Public)),
        (None, p) => Ok(p),
    }
}

fn port_name(name: Option<String>) -> ApiResult<Option<String>> {
    match name.map(|n| n.trim().to_string()).filter(|n| !n.is_empty()) {
        Some(n) if n.chars().count() > 64 || n.chars().any(char::is_control) => Err(ApiError::invalid(
            "name",
            "a port's name is at most 64 characters, none of them control characters",
        )),
        n => Ok(n),
    }
}

async fn computer(state: &AppState, tenant: stasis_types::TenantId, id: &str) -> ApiResult<Computer> {
    Ok(state.computers.get(tenant, computer_id(id)?).await?)
}

async fn ports_of(state: &AppState, c: &Computer) -> ApiResult<Vec<Port>> {
    let mut out = Vec::new();
    for r in state.db.ports(c.id).await? {
        out.push(state.previews.port(&state.db, c, &r).await?);
    }
    Ok(out)
}

/// The ports a computer exposes, each with its preview URL (and a fresh signed link if it
/// is private).
#[utoipa::path(get, path = "/computers/{id}/ports", operation_id = "listPorts", tag = "ports", params(("id" = uuid::Uuid, Path, description = "The computer's id")),
    responses((status = 200, description = "The exposed ports", body = PortList), Errors))]
async fn list_ports(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> ApiResult<Json<PortList>> {
    let c = computer(&state, tenant, &id).await?;
    Ok(Json(PortList {
        ports: ports_of(&state, &c).await?,
    }))
}

/// Expose a port: it gets a preview URL, private (the key or a signed link) unless made
/// public. Exposing a port again changes what is given and answers 200.
#[utoipa::path(post, path = "/computers/{id}/ports", operation_id = "createPort", tag = "ports", params(("id" = uuid::Uuid, Path, description = "The computer's id")), request_body = CreatePortRequest,
    responses((status = 201, description = "Exposed", body = Port), (status = 200, description = "It was exposed already; now as asked", body = Port), WriteErrors))]
async fn create_port(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
    body::Json(req): body::Json<CreatePortRequest>,
) -> ApiResult<(StatusCode, Json<Port>)> {
    let c = computer(&state, tenant, &id).await?;
    let port = u16::try_from(req.port)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| ApiError::invalid("port", format!("port must be from 1 to 65535, not {}", req.port)))?;
    let public = visibility(req.visibility, req.public)?;
    let name = port_name(req.name)?;
    let now = Utc::now().trunc_subsecs(3);
    let record = PortRecord {
        computer_id: c.id,
        port,
        public: public.unwrap_or(false),
        name: name.clone(),
        created_at: now,
        updated_at: now,
    };
    let status = if state.db.insert_port(&record).await? {
        StatusCode::CREATED
    } else {
        let mut existing = state
            .db
            .port(c.id, port)
            .await?
            .ok_or_else(|| ApiError::from(Error::not_found(Resource::Port, port)))?;
        if let Some(p) = public {
            existing.public = p;
        }
        if name.is_some() {
            existing.name = name;
        }
        existing.updated_at = now;
        state.db.update_port(&existing).await?;
        StatusCode::OK
    };
    let stored = state
        .db
        .port(c.id, port)
        .await?
        .ok_or_else(|| ApiError::from(Error::not_found(Resource::Port, port)))?;
    Ok((status, Json(state.previews.port(&state.db, &c, &stored).await?)))
}

/// Change an exposed port's visibility or name.
#[utoipa::path(patch, path = "/computers/{id}/ports/{port}", operation_id = "updatePort", tag = "ports", params(("id" = uuid::Uuid, Path, description = "The computer's id"), ("port" = u16, Path, description = "The port")), request_body = UpdatePortRequest,
    responses((status = 200, description = "Changed", body = Port), WriteErrors))]
async fn update_port(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path((id, port)): Path<(String, String)>,
    body::Json(req): body::Json<UpdatePortRequest>,
) -> ApiResult<Json<Port>> {
    let c = computer(&state, tenant, &id).await?;
    let port = port_number(&port)?;
    let public = visibility(req.visibility, req.public)?;
    let name = port_name(req.name)?;
    let mut record = state
        .db
        .port(c.id, port)
        .await?
        .ok_or_else(|| ApiError::from(Error::not_found(Resource::Port, port)))?;
    if let Some(p) = public {
        record.public = p;
    }
    if name.is_some() {
        record.name = name;
    }
    record.updated_at = Utc::now().trunc_subsecs(3);
    if !state.db.update_port(&record).await? {
        return Err(Error::not_found(Resource::Port, port).into());
    }
    Ok(Json(state.previews.port(&state.db, &c, &record).await?))
}

/// Stop exposing a port (its preview URL answers only to the key again).
#[utoipa::path(delete, path = "/computers/{id}/ports/{port}", operation_id = "deletePort", tag = "ports", params(("id" = uuid::Uuid, Path, description = "The computer's id"), ("port" = u16, Path, description = "The port")),
    responses((status = 204, description = "No longer exposed"), WriteErrors))]
async fn delete_port(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path((id, port)): Path<(String, String)>,
) -> ApiResult<StatusCode> {
    let c = computer(&state, tenant, &id).await?;
    let port = port_number(&port)?;
    if !state.db.delete_port(c.id, port).await? {
        return Err(Error::not_found(Resource::Port, port).into());
    }
    Ok(StatusCode::NO_CONTENT)
}

/// The computer's preview URLs: one per exposed port.
#[utoipa::path(get, path = "/computers/{id}/urls", operation_id = "listUrls", tag = "ports", params(("id" = uuid::Uuid, Path, description = "The computer's id")),
    responses((status = 200, description = "The preview URLs", body = UrlList), Errors))]
async fn list_urls(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> ApiResult<Json<UrlList>> {
    let c = computer(&state, tenant, &id).await?;
    let urls = ports_of(&state, &c).await?.iter().map(Previews::preview_url).collect();
    Ok(Json(UrlList { urls }))
}

/// Reach a port inside the computer with the key: any method (GET is the one described), any
/// path under it, a WebSocket too: `/computers/{id}/ports/{port}/proxy/PATH?QUERY` is
/// `PATH?QUERY` on that port. The key is not passed on.
#[utoipa::path(get, path = "/computers/{id}/ports/{port}/proxy", operation_id = "proxyPort", tag = "ports", params(("id" = uuid::Uuid, Path, description = "The computer's id"), ("port" = u16, Path, description = "The port")),
    responses((status = 200, description = "The port's own answer"), (status = 502, description = "Nothing answered on that port", body = stasis_types::ErrorBody), WriteErrors))]
async fn proxy_doc() {}

async fn proxy(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(params): Path<HashMap<String, String>>,
    req: Request,
) -> ApiResult<Response> {
    let c = computer(&state, tenant, params.get("id").map_or("", String::as_str)).await?;
    let port = port_number(params.get("port").map_or("", String::as_str))?;
    let rest = params.get("rest").map_or("", String::as_str);
    let target = match req.uri().query() {
        Some(q) => format!("/{rest}?{q}"),
        None => format!("/{rest}"),
    };
    super::proxy::to_port(&state, &c, port, target, req).await
}
