//! The one boundary between the control plane and the machines.
//!
//! Every API endpoint says, where it is defined, where it runs ([`Runs`]) and whether it may
//! stay open long ([`Endpoint::long`]); [`Endpoints`] is the only way to add one, so a route
//! cannot be registered without saying it. The same handler is both sides of the boundary:
//! on the embedded platform it runs in-process, and on a control plane the request is sent as
//! it is to the host that runs the machine (the host runs this same platform, as a host, and
//! this same handler). A new endpoint that needs a machine is declared `Runs::OnOwner` and
//! reaches the owning host with nothing else to change; nothing parses paths a second time.
//!
//! On a host, an `OnOwner` endpoint is refused (`409 WRONG_HOST`) for a computer that is not
//! this host's: acting on another host's machine would desynchronize the database from it.

use axum::body::{Body, Bytes};
use axum::extract::{FromRequestParts, RawPathParams, Request};
use axum::http::request::Parts;
use axum::http::HeaderValue;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::future::BoxFuture;
use stasis_types::{ComputerId, HostId, TenantId};
use utoipa_axum::router::{OpenApiRouter, UtoipaMethodRouter};

use crate::auth::{Authenticated, StreamTenant};
use crate::error::Conflict;
use crate::http_error::{ApiError, ApiResult};
use crate::AppState;

/// The path parameters of a request, by name.
pub struct Params(Vec<(String, String)>);

impl Params {
    pub fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(n, _)| n == name).map(|(_, v)| v.as_str())
    }

    /// The computer the path names (its `{id}`), if it is a well-formed id.
    pub fn computer(&self) -> Option<ComputerId> {
        self.get("id")?.parse().ok()
    }
}

/// What a create or restore needs of the host it is placed on, in MiB of memory: from the
/// request's path and body (which the host, running the handler, validates properly).
pub type Need = for<'a> fn(&'a AppState, TenantId, &'a Params, &'a Bytes) -> BoxFuture<'a, ApiResult<Wants>>;

/// What a new machine needs of the host it is placed on.
#[derive(Debug, Clone, Default)]
pub struct Wants {
    pub memory_mib: u64,
    /// The machine a restore's snapshot was taken on (None: a fresh boot, any host).
    pub machine: Option<stasis_vmm::description::MachineDescription>,
}

/// The computer a path names (its `{id}` as written): a malformed id is a computer that does
/// not exist.
pub fn computer_id(raw: &str) -> ApiResult<ComputerId> {
    raw.parse()
        .map_err(|_| crate::error::Error::not_found(crate::error::Resource::Computer, raw).into())
}

/// Where an endpoint runs when there are hosts.
#[derive(Clone, Copy)]
pub enum Runs {
    /// Wherever it is asked: reads from the shared database, changes only to metadata.
    Anywhere,
    /// On the host that runs the computer the path's `{id}` names.
    OnOwner(IfLost),
    /// On the host with the most free memory that has what [`Need`] says (a new machine).
    Placed(Need),
}

/// What an `OnOwner` endpoint does when the computer's host is lost (or it has none).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum IfLost {
    /// `503`: it needs the machine, and the machine's host is not there.
    Unavailable,
    /// The control plane answers from the database (a stream of a lost host's snapshot ends
    /// at once; deleting records it, and the host removes the machine when it is back).
    AnswerHere,
}

/// How an endpoint runs: where, and what it may hold open.
#[derive(Clone, Copy)]
pub struct Endpoint {
    pub runs: Runs,
    /// It may stay open long (exec, a stream): counted against the tenant's cap of those.
    pub long: bool,
    /// It takes a one-use SSE ticket instead of a key (an `EventSource` cannot send headers).
    pub tickets: bool,
    /// It carries whatever it is sent (a proxy): a control plane passes the request on to
    /// the host streamed, with all its end-to-end headers and any protocol upgrade.
    pub raw: bool,
}

impl Endpoint {
    pub const fn long(self) -> Endpoint {
        Endpoint { long: true, ..self }
    }

    pub const fn with_tickets(self) -> Endpoint {
        Endpoint { tickets: true, ..self }
    }

    pub const fn raw(self) -> Endpoint {
        Endpoint { raw: true, ..self }
    }
}

impl Endpoint {
    /// OpenAPI extensions: `x-stasis-runs` (`anywhere`, `owner` or `placed`), and
    /// `x-stasis-long`, `x-stasis-tickets` where they hold.
    fn describe(&self) -> Vec<(String, serde_json::Value)> {
        let runs = match self.runs {
            Runs::Anywhere => "anywhere",
            Runs::OnOwner(_) => "owner",
            Runs::Placed(_) => "placed",
        };
        let mut out = vec![("x-stasis-runs".to_string(), serde_json::json!(runs))];
        if self.long {
            out.push(("x-stasis-long".into(), serde_json::json!(true)));
        }
        if self.tickets {
            out.push(("x-stasis-tickets".into(), serde_json::json!(true)));
        }
        if self.raw {
            out.push(("x-stasis-raw".into(), serde_json::json!(true)));
        }
        out
    }
}

impl Endpoint {
    /// Where it runs is part of its OpenAPI description too: on every operation of `paths`.
    fn describe_in(&self, paths: &mut utoipa::openapi::path::Paths) {
        for item in paths.paths.values_mut() {
            let operations = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
                &mut item.patch,
            ];
            for op in operations.into_iter().flatten() {
                op.extensions
                    .get_or_insert_with(Default::default)
                    .extend(self.describe());
            }
        }
    }
}

impl From<Runs> for Endpoint {
    fn from(runs: Runs) -> Endpoint {
        Endpoint {
            runs,
            long: false,
            tickets: false,
            raw: false,
        }
    }
}

/// The API's routes, each added with where it runs.
pub struct Endpoints(OpenApiRouter<AppState>);

impl Default for Endpoints {
    fn default() -> Self {
        Endpoints::new()
    }
}

impl Endpoints {
    pub fn new() -> Endpoints {
        Endpoints(OpenApiRouter::new())
    }

    /// Adds the routes of one `routes!(...)` (all of them run as `how` says).
    pub fn add(
        self,
        how: impl Into<Endpoint>,
        (schemas, mut paths, method_router): UtoipaMethodRouter<AppState>,
    ) -> Self {
        let how: Endpoint = how.into();
        how.describe_in(&mut paths);
        let method_router = method_router.layer(axum::middleware::from_fn(move |req: Request, next: Next| {
            boundary(how, req, next)
        }));
        Endpoints(self.0.routes((schemas, paths, method_router)))
    }

    /// Adds a route that takes every method and every path under its own (a proxy): it is
    /// documented as `routes` says, and `handler` serves `PATH`, `PATH/` and `PATH/{*rest}` for any
    /// method.
    pub fn add_any<H, T>(self, how: impl Into<Endpoint>, routes: UtoipaMethodRouter<AppState>, handler: H) -> Self
    where
        H: axum::handler::Handler<T, AppState>,
        T: 'static,
    {
        let how: Endpoint = how.into();
        let (schemas, mut paths, _) = routes;
        let documented: Vec<String> = paths.paths.keys().cloned().collect();
        how.describe_in(&mut paths);
        let method_router =
            axum::routing::any(handler).layer(axum::middleware::from_fn(move |req: Request, next: Next| {
                boundary(how, req, next)
            }));
        let mut router = self.0.routes((schemas, paths, method_router.clone()));
        for path in documented {
            router = router
                .route(&format!("{path}/"), method_router.clone())
                .route(&format!("{path}/{{*rest}}"), method_router.clone());
        }
        Endpoints(router)
    }

    pub fn merge(self, other: Endpoints) -> Endpoints {
        Endpoints(self.0.merge(other.0))
    }

    pub fn into_router(self) -> OpenApiRouter<AppState> {
        self.0
    }
}

/// Runs one request of an endpoint declared `how`: here, or on the host it belongs to.
async fn boundary(how: Endpoint, req: Request, next: Next) -> Response {
    // Put there for every request by the router (see `crate::router`).
    let Some(state) = req.extensions().get::<AppState>().cloned() else {
        return ApiError::internal("the request carries no platform state").into_response();
    };
    let (mut parts, body) = req.into_parts();
    let params = match RawPathParams::from_request_parts(&mut parts, &()).await {
        Ok(p) => Params(p.iter().map(|(n, v)| (n.to_string(), v.to_string())).collect()),
        Err(e) => return e.into_response(),
    };
    // A host's long requests were counted by its control plane.
    let permit = match (how.long, &state.host, parts.extensions.get::<Authenticated>()) {
        (true, None, Some(Authenticated(tenant))) => match state.guards.streams.acquire(*tenant) {
            Ok(p) => {
                let p = std::sync::Arc::new(p);
                parts.extensions.insert(crate::net::HeldStream(p.clone()));
                Some(p)
            }
            Err(e) => return e.into_response(),
        },
        // Ticket-authenticated streams have no tenant yet: their handler counts them.
        _ => None,
    };
    // A request a machine answers here keeps its computer from counting as idle while it is
    // open (the idle timeout pauses computers nobody uses).
    let busy = match (how.runs, params.computer(), &state.control_plane) {
        (Runs::OnOwner(_), Some(id), None) => Some(state.snapshots.computers().busy(id)),
        _ => None,
    };
    let resp = route(&state, how, &params, parts, body, next).await;
    match (permit, busy) {
        (None, None) => resp,
        // The place is held until the answer's body is done or dropped.
        held => {
            let (parts, body) = resp.into_parts();
            let body = futures::StreamExt::map(body.into_data_stream(), move |chunk| {
                let _held = &held;
                chunk
            });
            Response::from_parts(parts, Body::from_stream(body))
        }
    }
}

async fn route(state: &AppState, how: Endpoint, params: &Params, parts: Parts, body: Body, next: Next) -> Response {
    if let Some(host) = &state.host {
        if let (Runs::OnOwner(_), Some(id)) = (how.runs, params.computer()) {
            if let Err(e) = this_hosts(state, &host.id, id).await {
                return e.into_response();
            }
        }
        return next.run(Request::from_parts(parts, body)).await;
    }
    let Some(cp) = state.control_plane.clone() else {
        return next.run(Request::from_parts(parts, body)).await;
    };
    if matches!(how.runs, Runs::Anywhere) {
        return next.run(Request::from_parts(parts, body)).await;
    }
    let (mut parts, mut keep_query) = (parts, true);
    let tenant = match parts.extensions.get::<Authenticated>().copied() {
        Some(Authenticated(t)) => t,
        // A browser's stream carries a one-use ticket instead of a key: it is used up here,
        // and the host is asked as the tenant (without the spent ticket).
        None if how.tickets && !parts.headers.contains_key(axum::http::header::AUTHORIZATION) => {
            match StreamTenant::from_request_parts(&mut parts, state).await {
                Ok(t) => {
                    // A ticket bound to a snapshot opens that snapshot's stream only; the host
                    // never sees the ticket, so the binding is held here.
                    if let Some(Some(bound)) = t.ticket {
                        if params.get("snap_id").and_then(|s| s.parse().ok()) != Some(bound) {
                            return ApiError::Unauthorized.into_response();
                        }
                    }
                    keep_query = false;
                    parts.extensions.insert(Authenticated(t.tenant));
                    t.tenant
                }
                Err(e) => return e,
            }
        }
        // Unauthenticated requests get their 401 from the handlers.
        None => return next.run(Request::from_parts(parts, body)).await,
    };
    let (host, body) = match how.runs {
        Runs::Anywhere => unreachable!("answered above"),
        Runs::Placed(need) => {
            let bytes = match crate::body::read_within(body, parts.extensions.get().copied()).await {
                Ok(b) => b,
                Err(e) => return e.into_response(),
            };
            let wants = match need(state, tenant, params, &bytes).await {
                Ok(w) => w,
                Err(e) => return e.into_response(),
            };
            match cp.place(&state.db, &wants).await {
                Ok(h) => (h, Body::from(bytes)),
                Err(e) => return e.into_response(),
            }
        }
        Runs::OnOwner(if_lost) => {
            let Some(id) = params.computer() else {
                // No such computer: the handler says so.
                return next.run(Request::from_parts(parts, body)).await;
            };
            match cp.host_of(&state.db, id).await {
                Ok(Some(Some(h))) => (h, body),
                // No such computer: the handlers say so (after checking the tenant).
                Ok(None) => return next.run(Request::from_parts(parts, body)).await,
                Ok(Some(None)) if if_lost == IfLost::AnswerHere => {
                    return next.run(Request::from_parts(parts, body)).await
                }
                Ok(Some(None)) => {
                    // Running it here would boot a tenant's VM on the control plane, outside
                    // any host's capacity, next to every secret of the cluster.
                    return ApiError::unavailable(format!(
                        "the host running computer {id} is unavailable; it cannot be changed until that host is \
                         back (its snapshots restore on any other host)"
                    ))
                    .into_response();
                }
                Err(e) => return e.into_response(),
            }
        }
    };
    tracing::debug!(host = %host.id, path = parts.uri.path(), "forwarding to host");
    let mut resp = match how.raw {
        true => {
            let uri = parts
                .extensions
                .get::<axum::extract::OriginalUri>()
                .map_or(&parts.uri, |o| &o.0);
            let path = uri.path_and_query().map_or("/".to_string(), |p| p.as_str().to_string());
            cp.forward_raw(&host, tenant, &path, Request::from_parts(parts, body))
                .await
        }
        false => cp.forward(&host, tenant, &parts, body, keep_query).await,
    };
    if let Ok(v) = HeaderValue::from_str(host.id.as_str()) {
        resp.headers_mut().insert("x-stasis-host", v);
    }
    resp
}

/// On a host: whether computer `id` is this host's (a request about another host's computer
/// would desynchronize the database from the machines).
async fn this_hosts(state: &AppState, host: &HostId, id: ComputerId) -> ApiResult<()> {
    match state.db.computer_host(id).await? {
        Some(h) if h.as_ref() != Some(host) => {
            let on = h.map_or("no host".to_string(), |h| format!("host {h}"));
            Err(ApiError::conflict(
                Conflict::WrongHost,
                format!("computer {id} runs on {on}, not on this host ({host})"),
            ))
        }
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    /// Every operation of the API says where it runs; the ones that need a machine, hold a
    /// request open or take tickets say so (what the cluster's forwarding and the tenant's
    /// cap of long requests go by).
    #[test]
    fn every_endpoint_declares_where_it_runs() {
        let spec = serde_json::to_value(crate::openapi_document()).unwrap();
        let paths = spec["paths"].as_object().unwrap();
        let mut seen = std::collections::BTreeMap::new();
        for (path, item) in paths {
            for (method, op) in item.as_object().unwrap() {
                let runs = op["x-stasis-runs"].as_str();
                assert!(runs.is_some(), "{method} {path} does not say where it runs");
                let long = op.get("x-stasis-long").is_some();
                let tickets = op.get("x-stasis-tickets").is_some();
                seen.insert(format!("{method} {path}"), (runs.unwrap().to_string(), long, tickets));
            }
        }
        let want = |key: &str, runs: &str, long: bool, tickets: bool| {
            assert_eq!(
                seen.get(key),
                Some(&(runs.to_string(), long, tickets)),
                "{key}: {seen:#?}"
            );
        };
        want("post /api/v1/computers", "placed", false, false);
        want("get /api/v1/computers", "anywhere", false, false);
        want("get /api/v1/computers/{id}", "anywhere", false, false);
        want("delete /api/v1/computers/{id}", "owner", false, false);
        want("post /api/v1/computers/{id}/stop", "owner", false, false);
        want("post /api/v1/computers/{id}/exec", "owner", true, false);
        want("post /api/v1/computers/{id}/exec/python", "owner", true, false);
        want("post /api/v1/computers/{id}/snapshots", "owner", false, false);
        want(
            "delete /api/v1/computers/{id}/snapshots/{snap_id}",
            "anywhere",
            false,
            false,
        );
        want(
            "get /api/v1/computers/{id}/snapshots/{snap_id}/events",
            "owner",
            true,
            true,
        );
        want("post /api/v1/computers/{id}/restore/{snap_id}", "placed", false, false);
        want("post /api/v1/computers/{id}/clone", "owner", false, false);
        want("get /api/v1/health", "anywhere", false, false);
    }
}
