//! The boundary between control plane and machines (issue 14): an endpoint says where it runs
//! where it is defined, and nothing else needs to know. This test defines two endpoints no
//! other file knows of — one that needs the computer's machine, one that reads the database —
//! and serves the platform's real routers with them: a control plane and a host, in-process,
//! on a real PostgreSQL database and a real S3 store (started by `scripts/services`), the
//! host known to the control plane as it would be after a heartbeat. The machine endpoint
//! reaches the host that runs the computer, as the tenant; the other is answered by the
//! control plane; a computer whose host is lost gets a 503, and a host asked about another
//! host's computer refuses it (409 `WRONG_HOST`).

mod common;

use std::net::SocketAddr;

use axum::extract::{Path, State};
use axum::Json;
use common::backends::{pg_database, s3_env, S3};
use serde_json::{json, Value};
use stasis_server::auth::Tenant;
use stasis_server::cluster::ClusterAuth;
use stasis_server::endpoints::{Endpoints, IfLost, Runs};
use stasis_server::{AppState, Config, Platform, Role};
use stasis_types::{Computer, ComputerId, ComputerStatus, HostId, Size, TenantId};

const TOKEN: &str = "boundary-test-token-0123456789abcdef";

/// Who answered: the host's id, or the control plane.
fn served_by(state: &AppState) -> String {
    match &state.host {
        Some(h) => h.id.to_string(),
        None => "control-plane".into(),
    }
}

/// A new endpoint that needs the machine: where it runs, as whom.
#[utoipa::path(get, path = "/computers/{id}/probe-machine", tag = "test",
    params(("id" = String, Path, description = "The computer's id")),
    responses((status = 200, description = "Who answered")))]
async fn probe_machine(State(state): State<AppState>, Tenant(tenant): Tenant, Path(id): Path<String>) -> Json<Value> {
    Json(json!({ "served_by": served_by(&state), "tenant": tenant.to_string(), "computer": id }))
}

/// A new endpoint that reads only the database.
#[utoipa::path(get, path = "/computers/{id}/probe-record", tag = "test",
    params(("id" = String, Path, description = "The computer's id")),
    responses((status = 200, description = "Who answered")))]
async fn probe_record(State(state): State<AppState>, Tenant(_): Tenant, Path(_id): Path<String>) -> Json<Value> {
    Json(json!({ "served_by": served_by(&state) }))
}

/// The two new endpoints, declared once, here.
fn new_endpoints() -> Endpoints {
    Endpoints::new()
        .add(Runs::OnOwner(IfLost::Unavailable), utoipa_axum::routes!(probe_machine))
        .add(Runs::Anywhere, utoipa_axum::routes!(probe_record))
}

fn config(dir: &std::path::Path, db: &str, s3: &S3, role: Role) -> Config {
    Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.to_path_buf(),
        cache_dir: stasis_image::default_cache_dir(),
        accel: stasis_vmm::Accel::choose("tcg").unwrap(),
        qemu_binary: "qemu-system-x86_64".into(),
        database_url: db.to_string(),
        store_url: Some(format!("s3://{}/tests", s3.bucket)),
        s3: stasis_store::S3Options {
            endpoint: Some(format!("http://{}", s3.proxy.addr)),
            region: Some("us-east-1".into()),
            retry_timeout: Some(std::time::Duration::from_secs(10)),
        },
        role,
        capacity_mib: Some(4096),
        limits: Default::default(),
        confine: stasis_server::Confine::Off,
        disk_limits: None,
        cpu_model: "auto".into(),
        master_key_file: None,
        preview: None,
        snapshot_ttl: None,
        network: Default::default(),
    }
}

/// Serves `state`'s router with the new endpoints on loopback; returns its address.
async fn serve(state: AppState) -> SocketAddr {
    let app = stasis_server::router_with(state, new_endpoints());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        axum::serve(listener, app.into_make_service_with_connect_info::<SocketAddr>())
            .await
            .unwrap();
    });
    addr
}

/// A stopped computer of `tenant`, recorded as run by `host`.
async fn computer_on(state: &AppState, tenant: TenantId, host: &HostId) -> ComputerId {
    let now = chrono::Utc::now();
    let c = Computer {
        id: ComputerId::new(),
        name: format!("on-{host}"),
        slug: format!("on-{host}"),
        status: ComputerStatus::Stopped,
        template_type: "debian-bookworm".into(),
        size: Size::Xs,
        ip_address: None,
        tenant_id: tenant,
        created_at: now,
        updated_at: now,
        metadata: Default::default(),
        error: None,
        source_snapshot_id: None,
        network: true,
        preview_domain: None,
        sandbox_url: None,
    };
    state.db.insert_computer(&c, Some(host)).await.unwrap();
    c.id
}

async fn get(url: String, headers: &[(&str, &str)]) -> (u16, Option<String>, Value) {
    let mut req = reqwest::Client::new().get(url);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let host = resp
        .headers()
        .get("x-stasis-host")
        .map(|v| v.to_str().unwrap().to_string());
    let text = resp.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, host, body)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_machine_endpoint_reaches_the_owning_host_and_nothing_else_knows_it() {
    for (k, v) in s3_env() {
        std::env::set_var(k, v);
    }
    let cp_dir = common::data_dir();
    let host_dir = common::data_dir();
    let db = pg_database(cp_dir.path());
    let s3 = S3::bucket_for(cp_dir.path());
    let auth = ClusterAuth::PlainToken(TOKEN.into());
    let h1: HostId = "h1".parse().unwrap();
    let h2: HostId = "h2".parse().unwrap();

    let cp = Platform::open(&config(
        cp_dir.path(),
        &db,
        &s3,
        Role::ControlPlane {
            auth: auth.clone(),
            host_timeout: std::time::Duration::from_secs(600),
        },
    ))
    .await
    .unwrap();
    let host = Platform::open(&config(
        host_dir.path(),
        &db,
        &s3,
        Role::Host {
            id: h1.clone(),
            auth: auth.clone(),
        },
    ))
    .await
    .unwrap();
    let cp_state = cp.state.clone();
    let host_state = host.state.clone();
    let cp_addr = serve(cp_state.clone()).await;
    let host_addr = serve(host_state.clone()).await;

    // h1 heartbeats (as `stasis host` would); h2 was a host once and is lost.
    let db_ = &cp_state.db;
    db_.heartbeat_host(&h1, &format!("http://{host_addr}"), 4096, 2, None)
        .await
        .unwrap();
    db_.heartbeat_host(&h2, "http://127.0.0.1:9", 4096, 2, None)
        .await
        .unwrap();
    assert!(db_.lose_host(&h2, "host lost: test").await.unwrap());
    let key = stasis_server::auth::create_key(db_, "boundary").await.unwrap();
    let tenant = db_
        .tenant_by_key_hash(&stasis_server::auth::hash_key(&key))
        .await
        .unwrap()
        .unwrap();
    let on_h1 = computer_on(&cp_state, tenant, &h1).await;
    let on_h2 = computer_on(&cp_state, tenant, &h2).await;
    let bearer = format!("Bearer {key}");
    let as_user = [("authorization", bearer.as_str())];
    let api = format!("http://{cp_addr}/api/v1");

    // The machine endpoint runs on the host that runs the computer, as the tenant.
    let (status, via, body) = get(format!("{api}/computers/{on_h1}/probe-machine"), &as_user).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["served_by"], "h1", "{body}");
    assert_eq!(body["tenant"], tenant.to_string(), "{body}");
    assert_eq!(via.as_deref(), Some("h1"));

    // The database endpoint is answered by the control plane itself.
    let (status, via, body) = get(format!("{api}/computers/{on_h1}/probe-record"), &as_user).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["served_by"], "control-plane", "{body}");
    assert_eq!(via, None);

    // Its host is lost: refused, never run on the control plane.
    let (status, _, body) = get(format!("{api}/computers/{on_h2}/probe-machine"), &as_user).await;
    assert_eq!(status, 503, "{body}");
    assert!(body.to_string().contains(&on_h2.to_string()), "{body}");

    // Without a key: the handler's 401, wherever it would run.
    let (status, _, _) = get(format!("{api}/computers/{on_h1}/probe-machine"), &[]).await;
    assert_eq!(status, 401);

    // The host itself: only the control plane's credential, and only its own computers.
    let host_api = format!("http://{host_addr}/api/v1");
    let as_cp = format!("Bearer {TOKEN}");
    let tenant_s = tenant.to_string();
    let from_cp = [
        ("authorization", as_cp.as_str()),
        ("x-stasis-tenant", tenant_s.as_str()),
    ];
    let (status, _, body) = get(format!("{host_api}/computers/{on_h1}/probe-machine"), &from_cp).await;
    assert_eq!((status, body["served_by"].as_str()), (200, Some("h1")), "{body}");
    let (status, _, body) = get(format!("{host_api}/computers/{on_h2}/probe-machine"), &from_cp).await;
    assert_eq!(status, 409, "{body}");
    assert!(body.to_string().contains("WRONG_HOST"), "{body}");
    let (status, _, body) = get(format!("{host_api}/computers/{on_h1}/probe-machine"), &as_user).await;
    assert_eq!(status, 403, "a user's key on a host: {body}");
}
