//! HTTP routes of the Snapshots API (the seed document), clone, and SSE tickets.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::json;
use stasis_types::{
    CloneRequest, ComputerEnvelope, CreateSnapshotRequest, RestoreResponse, SnapshotEnvelope, SnapshotId, SnapshotList,
    SnapshotStatus, SseTicket, TenantId,
};
use tokio::sync::broadcast::error::RecvError;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::events::{self, StoredEvent};
use super::Snapshots;
use crate::auth::{hash_key, Tenant};
use crate::body::JsonObject;
use crate::computers::routes::computer_id;
use crate::error::{ApiError, ApiResult};
use crate::openapi::{Errors, WriteErrors};
use crate::{idempotency, AppState};

/// How long an SSE ticket is good for (`STASIS_SSE_TICKET_TTL_SECS` overrides, for tests).
fn ticket_ttl() -> Duration {
    std::env::var("STASIS_SSE_TICKET_TTL_SECS")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(Duration::from_secs(60), Duration::from_secs)
}

/// The routes, each registered with its OpenAPI description.
pub fn router() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(create, list))
        .routes(routes!(get_one, delete))
        .routes(routes!(stream))
        .routes(routes!(restore))
        .routes(routes!(clone))
        .routes(routes!(ticket))
}

fn snapshot_id(raw: &str) -> ApiResult<SnapshotId> {
    raw.parse().map_err(|_| ApiError::NotFound { kind: "snapshot" })
}

fn service(state: &AppState) -> &std::sync::Arc<Snapshots> {
    &state.snapshots
}

/// Take a snapshot of a running computer: the guest pauses for milliseconds, then the
/// snapshot uploads in the background (`creating` → `uploading` → `ready`).
#[utoipa::path(post, path = "/computers/{id}/snapshots", operation_id = "createSnapshot", tag = "snapshots", params(("id" = uuid::Uuid, Path, description = "The computer's id"), ("Idempotency-Key" = Option<String>, Header, description = "Repeat a request safely: the same key answers with the first answer")),
    request_body(content = Option<CreateSnapshotRequest>, description = "Optional; may be empty"),
    responses((status = 201, description = "The snapshot, `creating`", body = SnapshotEnvelope), WriteErrors))]
async fn create(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: JsonObject,
) -> ApiResult<Response> {
    let computer = computer_id(&id)?;
    let comment = Snapshots::validate_comment(&body)?;
    let fingerprint = format!(
        "POST /computers/{computer}/snapshots {}",
        comment.clone().unwrap_or_default()
    );
    idempotency::once(&state.db, tenant, &headers, fingerprint, async {
        let s = service(&state).create(tenant, computer, comment).await?;
        Ok((StatusCode::CREATED, json!({ "data": s })))
    })
    .await
}

/// The computer's snapshots (not the deleted ones).
#[utoipa::path(get, path = "/computers/{id}/snapshots", operation_id = "listSnapshots", tag = "snapshots", params(("id" = uuid::Uuid, Path, description = "The computer's id")),
    responses((status = 200, description = "The snapshots", body = SnapshotList), Errors))]
async fn list(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> ApiResult<Json<serde_json::Value>> {
    let snapshots = service(&state).list(tenant, computer_id(&id)?).await?;
    Ok(Json(json!({ "data": snapshots, "total": snapshots.len() })))
}

/// One snapshot.
#[utoipa::path(get, path = "/computers/{id}/snapshots/{snap_id}", operation_id = "getSnapshot", tag = "snapshots", params(("id" = uuid::Uuid, Path, description = "The computer's id"), ("snap_id" = uuid::Uuid, Path, description = "The snapshot's id")),
    responses((status = 200, description = "The snapshot", body = SnapshotEnvelope),
        Errors))]
async fn get_one(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path((id, snap)): Path<(String, String)>,
) -> ApiResult<Json<serde_json::Value>> {
    let r = service(&state)
        .find(tenant, computer_id(&id)?, snapshot_id(&snap)?)
        .await?;
    Ok(Json(json!({ "data": r.snapshot })))
}

/// Delete a snapshot: it turns `deleted` at once, its stored objects are collected later.
#[utoipa::path(delete, path = "/computers/{id}/snapshots/{snap_id}", operation_id = "deleteSnapshot", tag = "snapshots", params(("id" = uuid::Uuid, Path, description = "The computer's id"), ("snap_id" = uuid::Uuid, Path, description = "The snapshot's id")),
    responses((status = 200, description = "The snapshot, `deleted`", body = SnapshotEnvelope), WriteErrors))]
async fn delete(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path((id, snap)): Path<(String, String)>,
) -> ApiResult<Json<serde_json::Value>> {
    let s = service(&state)
        .delete(tenant, computer_id(&id)?, snapshot_id(&snap)?)
        .await?;
    Ok(Json(json!({ "data": s })))
}

/// Restore a ready snapshot into a new running computer (the original is unchanged).
#[utoipa::path(post, path = "/computers/{id}/restore/{snap_id}", operation_id = "restoreSnapshot", tag = "snapshots", params(("id" = uuid::Uuid, Path, description = "The computer's id"), ("snap_id" = uuid::Uuid, Path, description = "The snapshot's id"), ("Idempotency-Key" = Option<String>, Header, description = "Repeat a request safely: the same key answers with the first answer")),
    responses((status = 201, description = "The new computer, `provisioning`", body = RestoreResponse), WriteErrors))]
async fn restore(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path((id, snap)): Path<(String, String)>,
    headers: HeaderMap,
    _body: JsonObject,
) -> ApiResult<Response> {
    let (computer, snap) = (computer_id(&id)?, snapshot_id(&snap)?);
    let fingerprint = format!("POST /computers/{computer}/restore/{snap}");
    idempotency::once(&state.db, tenant, &headers, fingerprint, async {
        let c = service(&state).restore(tenant, computer, snap).await?;
        Ok((
            StatusCode::CREATED,
            json!({ "data": c, "snapshot": { "id": snap, "status": "restoring" } }),
        ))
    })
    .await
}

/// Clone a running computer: a fresh snapshot of it, restored into a new computer.
#[utoipa::path(post, path = "/computers/{id}/clone", operation_id = "cloneComputer", tag = "snapshots", params(("id" = uuid::Uuid, Path, description = "The computer's id"), ("Idempotency-Key" = Option<String>, Header, description = "Repeat a request safely: the same key answers with the first answer")),
    request_body(content = Option<CloneRequest>, description = "Optional; may be empty"),
    responses((status = 201, description = "The new computer", body = ComputerEnvelope), WriteErrors))]
async fn clone(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: JsonObject,
) -> ApiResult<Response> {
    let computer = computer_id(&id)?;
    let name = body.optional_str("name")?;
    let fingerprint = format!("POST /computers/{computer}/clone {}", name.clone().unwrap_or_default());
    idempotency::once(&state.db, tenant, &headers, fingerprint, async {
        let c = service(&state).clone_computer(tenant, computer, name).await?;
        Ok((StatusCode::CREATED, json!({ "data": c })))
    })
    .await
}

/// A one-use ticket for one event stream, good for 60 s (browsers' `EventSource` cannot send
/// an Authorization header). With `{"snapshot_id": "..."}` it opens only that snapshot's
/// stream; without it, whichever of the tenant's snapshots its one stream names.
#[utoipa::path(post, path = "/sse/ticket", operation_id = "createSseTicket", tag = "snapshots",
    request_body(content = Option<serde_json::Value>, description = "Optional: `{\"snapshot_id\": \"<uuid>\"}` binds the ticket to that snapshot"),
    responses((status = 201, description = "The ticket", body = SseTicket), WriteErrors))]
async fn ticket(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    body: JsonObject,
) -> ApiResult<(StatusCode, Json<serde_json::Value>)> {
    let snapshot = match body.optional_str("snapshot_id")? {
        None => None,
        Some(s) => Some(
            s.parse::<SnapshotId>()
                .map_err(|_| ApiError::invalid("snapshot_id", "snapshot_id must be a snapshot's id (a UUID)"))?,
        ),
    };
    let ticket = format!("sset_{}", &crate::auth::generate_key()["stasis_".len()..]);
    let expires_at = chrono::Utc::now() + chrono::Duration::from_std(ticket_ttl()).expect("a small duration");
    state
        .db
        .insert_bound_ticket(&hash_key(&ticket), tenant, snapshot, expires_at)
        .await?;
    Ok((
        StatusCode::CREATED,
        Json(json!({
            "ticket": ticket,
            "expires_at": expires_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        })),
    ))
}

/// Who may open an event stream: a Bearer key, or a one-use ticket in `?ticket=` (browsers'
/// `EventSource` cannot send headers), with the snapshot the ticket is bound to, if any.
pub struct StreamTenant {
    pub tenant: TenantId,
    /// Set for a ticket: the snapshot it opens (None: any of its tenant's).
    pub ticket: Option<Option<SnapshotId>>,
}

impl FromRequestParts<AppState> for StreamTenant {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        // On a host the control plane speaks for the tenant (it took the ticket).
        if parts.headers.contains_key(axum::http::header::AUTHORIZATION) || state.host.is_some() {
            return Tenant::from_request_parts(parts, state)
                .await
                .map(|t| StreamTenant {
                    tenant: t.0,
                    ticket: None,
                })
                .map_err(IntoResponse::into_response);
        }
        #[derive(serde::Deserialize)]
        struct TicketQuery {
            ticket: Option<String>,
        }
        let unauthorized = || ApiError::Unauthorized.into_response();
        let Query(q) = Query::<TicketQuery>::from_request_parts(parts, state)
            .await
            .map_err(|_| unauthorized())?;
        let ticket = q
            .ticket
            .filter(|t| !t.is_empty() && t.len() <= 256)
            .ok_or_else(unauthorized)?;
        // Guessing tickets costs a lookup each, like guessing keys: the same budget applies.
        let hash = hash_key(&ticket);
        let peer = crate::auth::peer_of(&parts.extensions);
        let failures = &state.guards.auth_failures;
        if let Some(wait) = peer.and_then(|p| failures.blocked(p, &hash)) {
            return Err(crate::net::auth_blocked(wait));
        }
        match state
            .db
            .consume_bound_ticket(&hash)
            .await
            .map_err(|e| ApiError::from(e).into_response())?
        {
            Some(grant) => Ok(StreamTenant {
                tenant: grant.tenant,
                ticket: Some(grant.snapshot),
            }),
            None => {
                if let Some(p) = peer {
                    failures.failed(p);
                }
                Err(unauthorized())
            }
        }
    }
}

fn to_event(e: &StoredEvent) -> Event {
    Event::default()
        .id(e.seq.to_string())
        .event(e.event.clone())
        .data(e.data.clone())
}

fn ends_stream(data: &str) -> bool {
    serde_json::from_str::<serde_json::Value>(data)
        .ok()
        .and_then(|v| v.get("status").and_then(|s| s.as_str()).and_then(SnapshotStatus::parse))
        .is_some_and(SnapshotStatus::is_final)
}

/// `GET .../snapshots/{snap_id}/events`: the current state first (or, with `Last-Event-ID`,
/// every event after it), then live events until a final one (`ready`, `failed`, `deleted`).
/// Server-sent events of a snapshot's progress: `snapshot_creating`, `snapshot_uploading`
/// (with `progress`, `bytes_done`, `bytes_total`), then `snapshot_ready` or `snapshot_failed`,
/// after which the stream ends. `data:` is a `SnapshotEventData`; `id:` a sequence number
/// (send `Last-Event-ID` to resume). Keep-alive comments while idle.
#[utoipa::path(get, path = "/computers/{id}/snapshots/{snap_id}/events", operation_id = "snapshotEvents", tag = "snapshots",
    params(("id" = uuid::Uuid, Path, description = "The computer's id"), ("snap_id" = uuid::Uuid, Path, description = "The snapshot's id"),
        ("ticket" = Option<String>, Query, description = "A ticket from POST /sse/ticket, instead of the Authorization header"),
        ("Last-Event-ID" = Option<String>, Header, description = "Resume after this event")),
    security((), ("bearer" = [])),
    responses((status = 200, description = "The event stream", content_type = "text/event-stream", body = stasis_types::SnapshotEvent),
        (status = 429, description = "The tenant has too many exec calls and event streams open", body = stasis_types::ErrorBody), Errors))]
async fn stream(
    State(state): State<AppState>,
    StreamTenant { tenant, ticket }: StreamTenant,
    Path((id, snap)): Path<(String, String)>,
    headers: HeaderMap,
) -> ApiResult<Response> {
    let snapshots = service(&state).clone();
    let record = snapshots.find(tenant, computer_id(&id)?, snapshot_id(&snap)?).await?;
    let id = record.snapshot.id;
    if ticket.flatten().is_some_and(|bound| bound != id) {
        // A ticket opens the stream it was asked for, not another snapshot's.
        return Err(ApiError::Unauthorized);
    }
    // Bearer streams were counted by the middleware; a ticket's tenant is known only now.
    let permit = match ticket {
        Some(_) => match state.guards.streams.acquire(tenant) {
            Ok(p) => Some(p),
            Err(e) => return Ok(e.into_response()),
        },
        None => None,
    };
    let last_event_id = headers
        .get("last-event-id")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<i64>().ok());
    // Subscribe before reading the log, so nothing falls between the two.
    let mut live = snapshots.events().subscribe(id);
    let db = snapshots.db().clone();
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Event, Infallible>>(64);
    tokio::spawn(async move {
        let _permit = permit;
        let mut sent = match last_event_id {
            Some(after) => {
                let mut sent = after;
                for (seq, event, data) in db.events_after(id, after).await.unwrap_or_default() {
                    if tx.send(Ok(to_event(&StoredEvent { seq, event, data }))).await.is_err() {
                        return;
                    }
                    sent = seq;
                }
                sent
            }
            None => {
                let seq = db.last_event_seq(id).await.unwrap_or(0);
                let current = db.get_snapshot(id).await.ok().flatten().map(|r| r.snapshot);
                let Some(current) = current else { return };
                let mut data = events::data(id, current.status);
                data.error = current.error.clone();
                if current.status == SnapshotStatus::Ready {
                    data.progress = Some(1.0);
                }
                let e = StoredEvent {
                    seq,
                    event: events::event_name(current.status).into(),
                    data: serde_json::to_string(&data).expect("serializes"),
                };
                if tx.send(Ok(to_event(&e))).await.is_err() {
                    return;
                }
                seq
            }
        };
        let status_now = db.get_snapshot(id).await.ok().flatten().map(|r| r.snapshot.status);
        if status_now.is_none_or(SnapshotStatus::is_final) {
            return;
        }
        loop {
            // A client that went away ends the task now, not at the next event.
            let received = tokio::select! {
                r = live.recv() => r,
                _ = tx.closed() => return,
            };
            let next = match received {
                Ok(e) => vec![e],
                Err(RecvError::Lagged(_)) => db
                    .events_after(id, sent)
                    .await
                    .unwrap_or_default()
                    .into_iter()
                    .map(|(seq, event, data)| StoredEvent { seq, event, data })
                    .collect(),
                Err(RecvError::Closed) => return,
            };
            for e in next {
                if e.seq <= sent {
                    continue;
                }
                sent = e.seq;
                let last = ends_stream(&e.data);
                if tx.send(Ok(to_event(&e))).await.is_err() || last {
                    return;
                }
            }
        }
    });
    Ok(Sse::new(tokio_stream::wrappers::ReceiverStream::new(rx))
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)).text("keep-alive"))
        .into_response())
}
