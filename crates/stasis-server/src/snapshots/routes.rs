//! HTTP routes of the Snapshots API (the seed document), clone, and SSE tickets.

use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::future::BoxFuture;
use stasis_types::{
    CloneRequest, ComputerEnvelope, CreateSnapshotRequest, RestoreRequest, RestoreResponse, RestoringSnapshot,
    SnapshotEnvelope, SnapshotId, SnapshotList, SnapshotStatus, SseTicket, SseTicketRequest, TenantId,
};
use tokio::sync::broadcast::error::RecvError;
use utoipa_axum::routes;

use super::events::{self, StoredEvent};
use super::Snapshots;
use crate::auth::{hash_key, StreamTenant, Tenant};
use crate::body;
use crate::endpoints::computer_id;
use crate::endpoints::{Endpoint, Endpoints, IfLost, Params, Runs};
use crate::http_error::{ApiError, ApiResult};
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
/// With several hosts: a capture and a clone run where the computer runs, a restore on the
/// host with the most room (the snapshot is in the store), the rest from the shared
/// database (see [`crate::endpoints`]).
pub fn router() -> Endpoints {
    let machine = Runs::OnOwner(IfLost::Unavailable);
    Endpoints::new()
        .add(machine, routes!(create))
        .add(Runs::Anywhere, routes!(list))
        .add(Runs::Anywhere, routes!(get_one))
        // Metadata: the control plane collects the store.
        .add(Runs::Anywhere, routes!(delete))
        // The host publishes a capture's progress; a lost host's snapshots are failed, their
        // log and final state in the database, and the stream ends at once.
        .add(
            Endpoint::from(Runs::OnOwner(IfLost::AnswerHere)).long().with_tickets(),
            routes!(stream),
        )
        .add(Runs::Placed(restore_needs), routes!(restore))
        .add(machine, routes!(clone))
        .add(machine, routes!(pause))
        .add(machine, routes!(resume))
        .add(Runs::Anywhere, routes!(get_auto_stop, set_auto_stop))
        .add(Runs::Anywhere, routes!(ticket))
}

/// Pause (hibernate) a running computer: a snapshot and a stop in one step. Its memory and
/// disk go into a snapshot, its QEMU ends, and it is `paused`, holding no memory on its host;
/// `POST /resume` (or a start) brings it back in place, same id, processes still running.
#[utoipa::path(post, path = "/computers/{id}/pause", operation_id = "pauseComputer", tag = "computers",
    params(("id" = uuid::Uuid, Path, description = "The computer's id")),
    responses((status = 200, description = "Paused", body = stasis_types::ActionResponse), WriteErrors))]
async fn pause(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> ApiResult<Json<stasis_types::ActionResponse>> {
    Ok(Json(service(&state).pause(tenant, computer_id(&id)?).await?))
}

/// Resume a paused computer in place from its hibernation snapshot (`starting`, then
/// `running` with its processes as they were).
#[utoipa::path(post, path = "/computers/{id}/resume", operation_id = "resumeComputer", tag = "computers",
    params(("id" = uuid::Uuid, Path, description = "The computer's id")),
    responses((status = 200, description = "Resuming", body = stasis_types::ActionResponse), WriteErrors))]
async fn resume(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> ApiResult<Json<stasis_types::ActionResponse>> {
    Ok(Json(
        service(&state).computers().resume(tenant, computer_id(&id)?).await?,
    ))
}

/// A restore needs the memory of the snapshot's machine.
fn restore_needs<'a>(
    state: &'a AppState,
    tenant: TenantId,
    params: &'a Params,
    _: &'a axum::body::Bytes,
) -> BoxFuture<'a, ApiResult<crate::endpoints::Wants>> {
    Box::pin(async move {
        use stasis_vmm::description::Described;
        let computer = computer_id(params.get("id").unwrap_or_default())?;
        let snap = snapshot_id(params.get("snap_id").unwrap_or_default())?;
        let record = service(state).find(tenant, computer, snap).await?;
        // Snapshots from before machine descriptions are checked by the host that restores.
        let machine = match record.description.as_ref().map(Described::parse) {
            Some(Ok(Described::Current(d))) => Some(d),
            _ => None,
        };
        Ok(crate::endpoints::Wants {
            memory_mib: record.size.memory_mib(),
            machine,
        })
    })
}

/// An answer as the JSON the idempotency record keeps.
fn to_value(answer: impl serde::Serialize) -> ApiResult<serde_json::Value> {
    serde_json::to_value(answer).map_err(|e| ApiError::internal(format!("serializing an answer: {e}")))
}

fn snapshot_id(raw: &str) -> ApiResult<SnapshotId> {
    raw.parse()
        .map_err(|_| crate::error::Error::not_found(crate::error::Resource::Snapshot, raw).into())
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
    body::Json(req): body::Json<CreateSnapshotRequest>,
) -> ApiResult<Response> {
    let computer = computer_id(&id)?;
    let fingerprint = format!(
        "POST /computers/{computer}/snapshots {} {:?} {:?}",
        req.comment.clone().unwrap_or_default(),
        req.ttl_seconds,
        req.expires_at
    );
    let comment = Snapshots::validate_comment(req.comment)?;
    let expiry = Snapshots::validate_expiry(req.ttl_seconds, req.expires_at)?;
    idempotency::once(&state.db, tenant, &headers, fingerprint, async {
        let data = service(&state)
            .create(tenant, computer, super::NewSnapshot { comment, expiry })
            .await?;
        Ok((StatusCode::CREATED, to_value(SnapshotEnvelope { data })?))
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
) -> ApiResult<Json<SnapshotList>> {
    let data = service(&state).list(tenant, computer_id(&id)?).await?;
    Ok(Json(SnapshotList {
        total: data.len(),
        data,
    }))
}

/// One snapshot.
#[utoipa::path(get, path = "/computers/{id}/snapshots/{snap_id}", operation_id = "getSnapshot", tag = "snapshots", params(("id" = uuid::Uuid, Path, description = "The computer's id"), ("snap_id" = uuid::Uuid, Path, description = "The snapshot's id")),
    responses((status = 200, description = "The snapshot", body = SnapshotEnvelope),
        Errors))]
async fn get_one(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path((id, snap)): Path<(String, String)>,
) -> ApiResult<Json<SnapshotEnvelope>> {
    let r = service(&state)
        .find(tenant, computer_id(&id)?, snapshot_id(&snap)?)
        .await?;
    Ok(Json(SnapshotEnvelope { data: r.snapshot }))
}

/// Delete a snapshot: it turns `deleted` at once, its stored objects are collected later.
#[utoipa::path(delete, path = "/computers/{id}/snapshots/{snap_id}", operation_id = "deleteSnapshot", tag = "snapshots", params(("id" = uuid::Uuid, Path, description = "The computer's id"), ("snap_id" = uuid::Uuid, Path, description = "The snapshot's id")),
    responses((status = 200, description = "The snapshot, `deleted`", body = SnapshotEnvelope), WriteErrors))]
async fn delete(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path((id, snap)): Path<(String, String)>,
) -> ApiResult<Json<SnapshotEnvelope>> {
    let data = service(&state)
        .delete(tenant, computer_id(&id)?, snapshot_id(&snap)?)
        .await?;
    Ok(Json(SnapshotEnvelope { data }))
}

/// Restore a ready snapshot into a new running computer (the original is unchanged).
#[utoipa::path(post, path = "/computers/{id}/restore/{snap_id}", operation_id = "restoreSnapshot", tag = "snapshots", params(("id" = uuid::Uuid, Path, description = "The computer's id"), ("snap_id" = uuid::Uuid, Path, description = "The snapshot's id"), ("Idempotency-Key" = Option<String>, Header, description = "Repeat a request safely: the same key answers with the first answer")), request_body(content = Option<RestoreRequest>),
    responses((status = 201, description = "The new computer, `provisioning`", body = RestoreResponse), WriteErrors))]
async fn restore(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path((id, snap)): Path<(String, String)>,
    headers: HeaderMap,
    body::Json(RestoreRequest {}): body::Json<RestoreRequest>,
) -> ApiResult<Response> {
    let (computer, snap) = (computer_id(&id)?, snapshot_id(&snap)?);
    let fingerprint = format!("POST /computers/{computer}/restore/{snap}");
    idempotency::once(&state.db, tenant, &headers, fingerprint, async {
        let mut data = service(&state).restore(tenant, computer, snap).await?;
        state.previews.dress(&mut data);
        let snapshot = RestoringSnapshot {
            id: snap,
            status: SnapshotStatus::Restoring,
        };
        Ok((StatusCode::CREATED, to_value(RestoreResponse { data, snapshot })?))
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
    body::Json(req): body::Json<CloneRequest>,
) -> ApiResult<Response> {
    let computer = computer_id(&id)?;
    let name = req.name;
    let fingerprint = format!("POST /computers/{computer}/clone {}", name.clone().unwrap_or_default());
    idempotency::once(&state.db, tenant, &headers, fingerprint, async {
        let mut data = service(&state).clone_computer(tenant, computer, name).await?;
        state.previews.dress(&mut data);
        Ok((StatusCode::CREATED, to_value(ComputerEnvelope { data })?))
    })
    .await
}

/// A one-use ticket for one event stream, good for 60 s (browsers' `EventSource` cannot send
/// an Authorization header). With `{"snapshot_id": "..."}` it opens only that snapshot's
/// stream; without it, whichever of the tenant's snapshots its one stream names.
#[utoipa::path(post, path = "/sse/ticket", operation_id = "createSseTicket", tag = "snapshots",
    request_body(content = Option<SseTicketRequest>, description = "Optional: `{\"snapshot_id\": \"<uuid>\"}` binds the ticket to that snapshot"),
    responses((status = 201, description = "The ticket", body = SseTicket), WriteErrors))]
async fn ticket(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    body::Json(req): body::Json<SseTicketRequest>,
) -> ApiResult<(StatusCode, Json<SseTicket>)> {
    let snapshot = req.snapshot_id;
    let ticket = format!("sset_{}", &crate::auth::generate_key()["stasis_".len()..]);
    // Whole seconds, as the wire has always carried it.
    let expires_at = chrono::SubsecRound::trunc_subsecs(chrono::Utc::now(), 0)
        + chrono::Duration::from_std(ticket_ttl()).expect("a small duration");
    state
        .db
        .insert_bound_ticket(&hash_key(&ticket), tenant, snapshot, expires_at)
        .await?;
    Ok((StatusCode::CREATED, Json(SseTicket { ticket, expires_at })))
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
    let record = snapshots
        .find_even_deleted(tenant, computer_id(&id)?, snapshot_id(&snap)?)
        .await?;
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

/// The longest idle timeout.
const MAX_AUTO_STOP_SECS: u64 = 30 * 24 * 3600;

/// A computer's idle timeout: after this many seconds with no request to it open, it is
/// paused (hibernated, its memory kept), not stopped.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct AutoStop {
    /// 0: never.
    pub seconds: u64,
    /// What happens then: `pause`.
    pub action: String,
}

#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct AutoStopEnvelope {
    pub data: AutoStop,
}

/// `PATCH /computers/{id}/auto-stop`.
#[derive(Debug, Clone, serde::Deserialize, utoipa::ToSchema)]
pub struct AutoStopRequest {
    /// Seconds of idleness before the computer pauses (0 turns it off; at most 30 days).
    pub seconds: u64,
}

/// The computer's idle timeout.
#[utoipa::path(get, path = "/computers/{id}/auto-stop", operation_id = "getAutoStop", tag = "computers",
    params(("id" = uuid::Uuid, Path, description = "The computer's id")),
    responses((status = 200, description = "The idle timeout", body = AutoStopEnvelope), Errors))]
async fn get_auto_stop(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
) -> ApiResult<Json<AutoStopEnvelope>> {
    let id = computer_id(&id)?;
    service(&state).computers().get(tenant, id).await?;
    let seconds = state.db.auto_stop_seconds(id).await?;
    Ok(Json(AutoStopEnvelope {
        data: AutoStop {
            seconds,
            action: "pause".into(),
        },
    }))
}

/// Set the computer's idle timeout: after `seconds` with no request to it open (no exec,
/// file transfer, terminal or stream), it is paused, keeping its memory (0 turns it off).
#[utoipa::path(patch, path = "/computers/{id}/auto-stop", operation_id = "setAutoStop", tag = "computers",
    params(("id" = uuid::Uuid, Path, description = "The computer's id")), request_body = AutoStopRequest,
    responses((status = 200, description = "The idle timeout", body = AutoStopEnvelope), WriteErrors))]
async fn set_auto_stop(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(id): Path<String>,
    body::Json(req): body::Json<AutoStopRequest>,
) -> ApiResult<Json<AutoStopEnvelope>> {
    let id = computer_id(&id)?;
    if req.seconds > MAX_AUTO_STOP_SECS {
        return Err(ApiError::invalid(
            "seconds",
            format!(
                "seconds must be at most {MAX_AUTO_STOP_SECS} (30 days); got {}",
                req.seconds
            ),
        ));
    }
    service(&state).computers().get(tenant, id).await?;
    state.db.set_auto_stop_seconds(id, req.seconds).await?;
    Ok(Json(AutoStopEnvelope {
        data: AutoStop {
            seconds: req.seconds,
            action: "pause".into(),
        },
    }))
}
