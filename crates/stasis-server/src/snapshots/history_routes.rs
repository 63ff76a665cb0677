//! HTTP routes of the account-wide snapshot surface, as the official SDK calls them:
//! `/snapshots` (history, groups, one by id, delete, bulk delete, fork, tree, files) and
//! `/named-snapshots` (list, create, get, delete, deploy).

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::future::BoxFuture;
use stasis_types::{
    BulkDeleteRequest, BulkDeleteResponse, CreateNamedSnapshotRequest, ForkRequest, ForkResponse, ForkedSnapshot,
    HistoryGroups, HistoryList, NameRemoved, NamedSnapshotDetail, NamedSnapshotList, SnapshotDetail, SnapshotEnvelope,
    SnapshotId, SnapshotStatus, SnapshotTree, TenantId,
};
use utoipa_axum::routes;

use super::browse::{self, Browse};
use super::history::{page, search};
use super::{named, SnapshotRecord, Snapshots};
use crate::auth::Tenant;
use crate::body;
use crate::db::HistoryFilter;
use crate::endpoints::{Endpoint, Endpoints, Params, Runs};
use crate::http_error::{ApiError, ApiResult};
use crate::openapi::{Errors, ReadErrors, WriteErrors};
use crate::{idempotency, AppState};

/// The routes, each registered with its OpenAPI description. All of them read and change
/// metadata and the store, so they run wherever they are asked, except forks and deploys,
/// placed like restores.
pub fn router() -> Endpoints {
    Endpoints::new()
        .add(Runs::Anywhere, routes!(history))
        .add(Runs::Anywhere, routes!(groups))
        .add(Runs::Anywhere, routes!(get_one, delete_one))
        .add(Runs::Anywhere, routes!(bulk_delete))
        .add(Runs::Placed(fork_needs), routes!(fork))
        .add(Runs::Anywhere, routes!(tree))
        .add(Endpoint::from(Runs::Anywhere).long(), routes!(files))
        .add(Runs::Anywhere, routes!(list_named, create_named))
        .add(Runs::Anywhere, routes!(get_named, delete_named))
        .add(Runs::Placed(deploy_needs), routes!(deploy))
}

fn service(state: &AppState) -> &std::sync::Arc<Snapshots> {
    &state.snapshots
}

fn snapshot_id(raw: &str) -> ApiResult<SnapshotId> {
    raw.parse()
        .map_err(|_| crate::error::Error::not_found(crate::error::Resource::Snapshot, raw).into())
}

/// What a restore of `record` needs of the host it is placed on.
fn wants(record: &SnapshotRecord) -> crate::endpoints::Wants {
    use stasis_vmm::description::Described;
    let machine = match record.description.as_ref().map(Described::parse) {
        Some(Ok(Described::Current(d))) => Some(d),
        _ => None,
    };
    crate::endpoints::Wants {
        memory_mib: record.size.memory_mib(),
        machine,
    }
}

fn fork_needs<'a>(
    state: &'a AppState,
    tenant: TenantId,
    params: &'a Params,
    _: &'a axum::body::Bytes,
) -> BoxFuture<'a, ApiResult<crate::endpoints::Wants>> {
    Box::pin(async move {
        let id = snapshot_id(params.get("snap_id").unwrap_or_default())?;
        Ok(wants(&service(state).find_any(tenant, id).await?))
    })
}

fn deploy_needs<'a>(
    state: &'a AppState,
    tenant: TenantId,
    params: &'a Params,
    _: &'a axum::body::Bytes,
) -> BoxFuture<'a, ApiResult<crate::endpoints::Wants>> {
    Box::pin(async move {
        let name = params.get("name").unwrap_or_default();
        Ok(wants(&service(state).named_record(tenant, name).await?))
    })
}

fn to_value(answer: impl serde::Serialize) -> ApiResult<serde_json::Value> {
    serde_json::to_value(answer).map_err(|e| ApiError::internal(format!("serializing an answer: {e}")))
}

/// A history query.
#[derive(Debug, Default, serde::Deserialize)]
pub struct HistoryQuery {
    resource_id: Option<String>,
    /// Accepted and ignored: there are no workspaces here.
    #[allow(dead_code)]
    workspace_id: Option<String>,
    q: Option<String>,
    limit: Option<u64>,
    offset: Option<u64>,
}

impl HistoryQuery {
    fn filter(self) -> ApiResult<HistoryFilter> {
        let (limit, offset) = page(self.limit, self.offset)?;
        // An id that is no computer's matches nothing (not an error: a filter).
        let computer = self
            .resource_id
            .filter(|r| !r.is_empty())
            .map(|r| r.parse().unwrap_or(stasis_types::ComputerId(uuid::Uuid::nil())));
        Ok(HistoryFilter {
            computer,
            q: search(self.q)?,
            limit,
            offset,
        })
    }
}

/// The account's snapshot history, newest first: every snapshot that is neither deleted nor
/// named, of computers that exist or are gone. `q` matches a substring of the computer's name
/// or id or the snapshot's id; `limit` defaults to 50, at most 200.
#[utoipa::path(get, path = "/snapshots", operation_id = "snapshotHistory", tag = "snapshots",
    params(("resource_id" = Option<String>, Query, description = "Only this computer's snapshots"),
        ("workspace_id" = Option<String>, Query, description = "Accepted and ignored (no workspaces here)"),
        ("q" = Option<String>, Query, description = "A substring of the computer's name or id, or of the snapshot's id"),
        ("limit" = Option<u64>, Query, description = "At most this many (default 50, at most 200)"),
        ("offset" = Option<u64>, Query, description = "Skip this many")),
    responses((status = 200, description = "A page of the history", body = HistoryList),
        (status = 422, description = "A query is not valid (`field` names it)", body = stasis_types::ErrorBody), Errors))]
async fn history(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    body::Query(q): body::Query<HistoryQuery>,
) -> ApiResult<Json<HistoryList>> {
    Ok(Json(service(&state).history(tenant, &q.filter()?).await?))
}

/// The history grouped by computer, the one with the newest snapshot first (expand one with
/// `GET /snapshots?resource_id=`).
#[utoipa::path(get, path = "/snapshots/groups", operation_id = "snapshotHistoryGroups", tag = "snapshots",
    params(("workspace_id" = Option<String>, Query, description = "Accepted and ignored"),
        ("q" = Option<String>, Query, description = "A substring of the computer's name or id, or of a snapshot's id"),
        ("limit" = Option<u64>, Query, description = "At most this many groups (default 50, at most 200)"),
        ("offset" = Option<u64>, Query, description = "Skip this many groups")),
    responses((status = 200, description = "A page of groups", body = HistoryGroups),
        (status = 422, description = "A query is not valid (`field` names it)", body = stasis_types::ErrorBody), Errors))]
async fn groups(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    body::Query(q): body::Query<HistoryQuery>,
) -> ApiResult<Json<HistoryGroups>> {
    let mut filter = q.filter()?;
    filter.computer = None;
    Ok(Json(service(&state).history_groups(tenant, &filter).await?))
}

/// One snapshot by its id alone (named ones too, and those of destroyed computers), what
/// keeps it from being deleted (`dependents`), the snapshots taken from it (`children`) and
/// the computers restored from it.
#[utoipa::path(get, path = "/snapshots/{snap_id}", operation_id = "getSnapshotById", tag = "snapshots",
    params(("snap_id" = uuid::Uuid, Path, description = "The snapshot's id")),
    responses((status = 200, description = "The snapshot", body = SnapshotDetail), Errors))]
async fn get_one(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(snap): Path<String>,
) -> ApiResult<Json<SnapshotDetail>> {
    Ok(Json(service(&state).detail(tenant, snapshot_id(&snap)?).await?))
}

/// Delete one snapshot by its id: `409 SNAPSHOT_IN_USE` while a name pins it or it is being
/// taken or restored from. Its stored chunks are collected later, except those other
/// snapshots share: deleting a parent never breaks a child.
#[utoipa::path(delete, path = "/snapshots/{snap_id}", operation_id = "deleteSnapshotById", tag = "snapshots",
    params(("snap_id" = uuid::Uuid, Path, description = "The snapshot's id")),
    responses((status = 200, description = "The snapshot, `deleted`", body = SnapshotEnvelope), WriteErrors))]
async fn delete_one(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(snap): Path<String>,
) -> ApiResult<Json<SnapshotEnvelope>> {
    let data = service(&state).delete_any(tenant, snapshot_id(&snap)?).await?;
    Ok(Json(SnapshotEnvelope { data }))
}

/// Delete several snapshots (`ids`), or a computer's whole history (`resource_id` with
/// `all: true` and `confirm` equal to it). Each is judged on its own: one that cannot go is
/// reported and never stops the others.
#[utoipa::path(post, path = "/snapshots/delete", operation_id = "bulkDeleteSnapshots", tag = "snapshots",
    request_body = BulkDeleteRequest,
    responses((status = 200, description = "What became of each", body = BulkDeleteResponse), WriteErrors))]
async fn bulk_delete(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    body::Json(req): body::Json<BulkDeleteRequest>,
) -> ApiResult<Json<BulkDeleteResponse>> {
    Ok(Json(service(&state).bulk_delete(tenant, req).await?))
}

/// Fork a ready snapshot into a new computer by the snapshot's id alone (its computer may be
/// gone); the new computer is `provisioning` while the restore runs. `Idempotency-Key` is
/// honoured.
#[utoipa::path(post, path = "/snapshots/{snap_id}/fork", operation_id = "forkSnapshot", tag = "snapshots",
    params(("snap_id" = uuid::Uuid, Path, description = "The snapshot's id"),
        ("Idempotency-Key" = Option<String>, Header, description = "Repeat a request safely: the same key answers with the first answer")),
    request_body(content = Option<ForkRequest>, description = "Optional; may be empty"),
    responses((status = 201, description = "The new computer", body = ForkResponse), WriteErrors))]
async fn fork(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(snap): Path<String>,
    headers: HeaderMap,
    body::Json(req): body::Json<ForkRequest>,
) -> ApiResult<Response> {
    let id = snapshot_id(&snap)?;
    let fingerprint = format!(
        "POST /snapshots/{id}/fork {}",
        serde_json::to_string(&req).unwrap_or_default()
    );
    let how = Snapshots::validate_fork(req, "-fork")?;
    let forked = service(&state).fork(tenant, id, how);
    answer_fork(&state, tenant, &headers, fingerprint, forked).await
}

/// Answers a fork or a deploy: `201 {data, snapshot}`, and the same answer again to a retry
/// with its `Idempotency-Key`.
async fn answer_fork(
    state: &AppState,
    tenant: TenantId,
    headers: &HeaderMap,
    fingerprint: String,
    made: impl std::future::Future<Output = crate::error::Result<stasis_types::Computer>>,
) -> ApiResult<Response> {
    idempotency::once(&state.db, tenant, headers, fingerprint, async {
        let mut data = made.await?;
        state.previews.dress(&mut data);
        let id = data
            .source_snapshot_id
            .ok_or_else(|| ApiError::internal("a forked computer has no source snapshot"))?;
        let snapshot = ForkedSnapshot {
            id,
            status: SnapshotStatus::Restoring,
        };
        Ok((StatusCode::CREATED, to_value(ForkResponse { data, snapshot })?))
    })
    .await
}

#[derive(Debug, Default, serde::Deserialize)]
pub struct BrowseQuery {
    path: Option<String>,
}

/// The SDK's answer while a snapshot is still being taken: poll again.
fn warming() -> Response {
    (
        StatusCode::ACCEPTED,
        [(header::RETRY_AFTER, HeaderValue::from_static("2"))],
        Json(stasis_types::Warming {
            status: "warming".into(),
            retry_after_ms: 2000,
        }),
    )
        .into_response()
}

/// One folder of a snapshot's disk, read from the store without restoring it (nothing of the
/// guest is mounted on the host). `202 {"status": "warming"}` while the snapshot is still
/// being taken. Up to 10000 entries, by name.
#[utoipa::path(get, path = "/snapshots/{snap_id}/tree", operation_id = "snapshotTree", tag = "snapshots",
    params(("snap_id" = uuid::Uuid, Path, description = "The snapshot's id"),
        ("path" = Option<String>, Query, description = "An absolute path in the guest (default /)")),
    responses((status = 200, description = "The folder's entries", body = SnapshotTree),
        (status = 202, description = "The snapshot is still being taken: poll again", body = stasis_types::Warming),
        ReadErrors))]
async fn tree(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(snap): Path<String>,
    body::Query(q): body::Query<BrowseQuery>,
) -> ApiResult<Response> {
    let path = browse::check_path(q.path.as_deref().unwrap_or("/"))?;
    match service(&state).tree(tenant, snapshot_id(&snap)?, path).await? {
        Browse::Warming => Ok(warming()),
        Browse::Ready(t) => Ok(Json(t).into_response()),
    }
}

/// One file of a snapshot's disk (its bytes), or a folder as a `.tar`, streamed from the
/// store without restoring the snapshot. `202 {"status": "warming"}` while it is being taken.
#[utoipa::path(get, path = "/snapshots/{snap_id}/files", operation_id = "snapshotFile", tag = "snapshots",
    params(("snap_id" = uuid::Uuid, Path, description = "The snapshot's id"),
        ("path" = String, Query, description = "An absolute path in the guest")),
    responses((status = 200, description = "The file's bytes (`application/octet-stream`) or the folder as a tar (`application/x-tar`)",
            content((Vec<u8> = "application/octet-stream"), (Vec<u8> = "application/x-tar"))),
        (status = 202, description = "The snapshot is still being taken: poll again", body = stasis_types::Warming),
        ReadErrors))]
async fn files(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(snap): Path<String>,
    body::Query(q): body::Query<BrowseQuery>,
) -> ApiResult<Response> {
    let Some(raw) = q.path.as_deref() else {
        return Err(ApiError::invalid(
            "path",
            "say which file or folder: ?path=/absolute/path",
        ));
    };
    let path = browse::check_path(raw)?;
    let download = match service(&state).download(tenant, snapshot_id(&snap)?, path).await? {
        Browse::Warming => return Ok(warming()),
        Browse::Ready(d) => d,
    };
    let safe: String = download
        .name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect();
    let (kind, file) = match download.folder {
        true => ("application/x-tar", format!("{safe}.tar")),
        false => ("application/octet-stream", safe),
    };
    let mut resp = Response::new(Body::from_stream(tokio_stream::wrappers::ReceiverStream::new(
        download.body,
    )));
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    if let Some(len) = download.len {
        h.insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
    if let Ok(v) = HeaderValue::from_str(&format!("attachment; filename=\"{file}\"")) {
        h.insert(header::CONTENT_DISPOSITION, v);
    }
    Ok(resp)
}

/// The tenant's named snapshots, newest first, and what names cost (nothing here).
#[utoipa::path(get, path = "/named-snapshots", operation_id = "listNamedSnapshots", tag = "snapshots",
    params(("workspace_id" = Option<String>, Query, description = "Accepted and ignored")),
    responses((status = 200, description = "The names", body = NamedSnapshotList), Errors))]
async fn list_named(State(state): State<AppState>, Tenant(tenant): Tenant) -> ApiResult<Json<NamedSnapshotList>> {
    Ok(Json(service(&state).list_named(tenant).await?))
}

/// Pin a snapshot under a name (`snapshot_id`), or take a new snapshot of a running computer
/// and pin it (`computer_id`). Names are unique per tenant and never replaced (`409
/// NAME_TAKEN`); a snapshot has at most one (`409 SNAPSHOT_ALREADY_NAMED`). A named snapshot
/// never expires and is kept until the name is removed.
#[utoipa::path(post, path = "/named-snapshots", operation_id = "createNamedSnapshot", tag = "snapshots",
    request_body = CreateNamedSnapshotRequest,
    responses((status = 201, description = "The name", body = NamedSnapshotDetail), WriteErrors))]
async fn create_named(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    body::Json(req): body::Json<CreateNamedSnapshotRequest>,
) -> ApiResult<(StatusCode, Json<NamedSnapshotDetail>)> {
    Ok((
        StatusCode::CREATED,
        Json(service(&state).create_named(tenant, req).await?),
    ))
}

/// One name, its snapshot and what depends on it.
#[utoipa::path(get, path = "/named-snapshots/{name}", operation_id = "getNamedSnapshot", tag = "snapshots",
    params(("name" = String, Path, description = "The name")),
    responses((status = 200, description = "The name", body = NamedSnapshotDetail), Errors))]
async fn get_named(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(name): Path<String>,
) -> ApiResult<Json<NamedSnapshotDetail>> {
    Ok(Json(service(&state).get_named(tenant, &name).await?))
}

/// Remove a name. `outcome` says what became of its snapshot: `released` (back in the
/// history), `deleted` (it had expired while pinned, or failed) or `kept` (being restored
/// from; it stays, unnamed).
#[utoipa::path(delete, path = "/named-snapshots/{name}", operation_id = "deleteNamedSnapshot", tag = "snapshots",
    params(("name" = String, Path, description = "The name")),
    responses((status = 200, description = "The name removed", body = NameRemoved), WriteErrors))]
async fn delete_named(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(name): Path<String>,
) -> ApiResult<Json<NameRemoved>> {
    Ok(Json(service(&state).delete_named(tenant, &name).await?))
}

/// Deploy a named snapshot into a new computer, whether its computer still exists or not
/// (`409 SNAPSHOT_NOT_READY` while it is still being saved). `Idempotency-Key` is honoured.
#[utoipa::path(post, path = "/named-snapshots/{name}/deploy", operation_id = "deployNamedSnapshot", tag = "snapshots",
    params(("name" = String, Path, description = "The name"),
        ("Idempotency-Key" = Option<String>, Header, description = "Repeat a request safely: the same key answers with the first answer")),
    request_body(content = Option<ForkRequest>, description = "Optional; may be empty"),
    responses((status = 201, description = "The new computer", body = ForkResponse), WriteErrors))]
async fn deploy(
    State(state): State<AppState>,
    Tenant(tenant): Tenant,
    Path(name): Path<String>,
    headers: HeaderMap,
    body::Json(req): body::Json<ForkRequest>,
) -> ApiResult<Response> {
    let name = named::check_name(&name)?;
    let fingerprint = format!(
        "POST /named-snapshots/{name}/deploy {}",
        serde_json::to_string(&req).unwrap_or_default()
    );
    let how = Snapshots::validate_fork(req, "-deployed")?;
    let deployed = service(&state).deploy(tenant, &name, how);
    answer_fork(&state, tenant, &headers, fingerprint, deployed).await
}
