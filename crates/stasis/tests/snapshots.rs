//! End to end: the Snapshots API of a real `stasis serve` with real guests — the error matrix
//! of the seed, the SSE cases, idempotent retries, and the faults (an unwritable store, a
//! server killed mid-upload, a corrupted chunk, deleted caches, deleting shared chunks).

mod common;

use std::time::{Duration, Instant};

use common::{create_key, data_dir, out, restore, running_computer, snapshot, Client, Server, BOOT, SNAP};
use serde_json::{json, Value};

fn error_of(r: &common::Resp) -> (u16, String) {
    (r.status, r.body["error"]["message"].as_str().unwrap_or("").to_string())
}

#[test]
fn the_error_matrix_sse_tickets_and_idempotent_retries() {
    let dir = data_dir();
    let key = create_key(dir.path(), "alice");
    let bob_key = create_key(dir.path(), "bob");
    let server = Server::start_with(dir.path(), &[("STASIS_SSE_TICKET_TTL_SECS", "2")]);
    let api = Client::new(&server.base, Some(&key));
    let bob = Client::new(&server.base, Some(&bob_key));
    let id = running_computer(&api, "matrix");
    let snaps = format!("/computers/{id}/snapshots");

    // Creating: unknown or foreign computer, over-long comment, bad JSON.
    let r = api.call(
        "POST",
        "/computers/00000000-0000-0000-0000-000000000000/snapshots",
        Some(json!({})),
    );
    assert_eq!(error_of(&r), (404, "computer not found".into()));
    assert_eq!(
        error_of(&bob.call("POST", &snaps, Some(json!({})))),
        (404, "computer not found".into())
    );
    let r = api.call("POST", &snaps, Some(json!({"comment": "x".repeat(501)})));
    assert_eq!(
        (r.status, r.body["error"]["field"].as_str()),
        (422, Some("comment")),
        "{}",
        r.body
    );
    assert!(r.body["error"]["message"].as_str().unwrap().contains("500"));
    assert_eq!(api.call("POST", &snaps, Some(json!({"comment": 7}))).status, 422);
    assert_eq!(
        api.raw("POST", &snaps, Some("{nope"), Some("application/json")).status,
        400
    );

    // An Idempotency-Key retry gets the first answer; no second snapshot is made.
    let body = json!({"comment": "first"}).to_string();
    let headers = [("idempotency-key", "snap-key-1")];
    let first = api.raw_with("POST", &snaps, Some(&body), Some("application/json"), &headers);
    assert_eq!(first.status, 201, "{}", first.body);
    let again = api.raw_with("POST", &snaps, Some(&body), Some("application/json"), &headers);
    assert_eq!(again.status, 201);
    assert_eq!(again.body["data"]["id"], first.body["data"]["id"]);
    let s1 = first.body["data"]["id"].as_str().unwrap().to_string();

    // Progress over SSE with the Bearer key: uploading progress, then ready, then the end.
    let (status, events) = api.sse(&format!("{snaps}/{s1}/events"), &[]);
    assert_eq!(status, 200);
    let names: Vec<&str> = events.iter().map(|(_, e, _)| e.as_str()).collect();
    assert_eq!(names.last(), Some(&"snapshot_ready"), "{names:?}");
    assert!(names.contains(&"snapshot_uploading"), "{names:?}");
    let progress: Vec<f64> = events
        .iter()
        .filter(|(_, e, _)| e == "snapshot_uploading")
        .filter_map(|(_, _, d)| d["progress"].as_f64())
        .collect();
    assert!(
        progress.len() >= 2 && progress.windows(2).all(|w| w[0] <= w[1]),
        "{progress:?}"
    );
    let ids: Vec<i64> = events.iter().map(|(i, _, _)| i.parse().unwrap()).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "{ids:?}");
    for (_, _, d) in &events {
        assert_eq!(d["snapshot_id"], s1.as_str());
        assert!(
            d.as_object().unwrap().values().all(|v| !v.is_null()),
            "no null fields: {d}"
        );
    }

    // Only one snapshot exists, with its sizes filled in.
    let list = api.call("GET", &snaps, None);
    assert_eq!(list.body["total"], 1, "{}", list.body);
    let s = api.call("GET", &format!("{snaps}/{s1}"), None).body["data"].clone();
    assert_eq!(s["status"], "ready");
    for field in [
        "state_size_bytes",
        "memory_size_bytes",
        "rootfs_size_bytes",
        "compressed_size_bytes",
    ] {
        assert!(s[field].as_u64().unwrap() > 0, "{field}: {s}");
    }
    assert_eq!(s["memory_size_bytes"], 256 << 20);
    assert!(s["compressed_size_bytes"].as_u64() < s["rootfs_size_bytes"].as_u64());
    assert!(s["s3_bucket"].is_string() && s["s3_prefix"].as_str().unwrap().contains(&s1));

    // A late subscriber gets the final state at once; Last-Event-ID replays what followed it.
    let (_, late) = api.sse(&format!("{snaps}/{s1}/events"), &[]);
    assert_eq!(late.len(), 1);
    assert_eq!(late[0].1, "snapshot_ready");
    let (_, replay) = api.sse(
        &format!("{snaps}/{s1}/events"),
        &[("last-event-id", &ids[0].to_string())],
    );
    let replayed: Vec<i64> = replay.iter().map(|(i, _, _)| i.parse().unwrap()).collect();
    assert_eq!(replayed.first(), Some(&(ids[0] + 1)), "{replayed:?}");
    assert_eq!(replay.last().unwrap().1, "snapshot_ready");

    // Tickets: one stream each, for a short while, for their tenant only.
    let t = api.call("POST", "/sse/ticket", None);
    assert_eq!(t.status, 201, "{}", t.body);
    let ticket = t.body["ticket"].as_str().unwrap().to_string();
    assert!(t.body["expires_at"].as_str().unwrap().ends_with('Z'));
    let anon = Client::new(&server.base, None);
    let path = format!("{snaps}/{s1}/events?ticket={ticket}");
    let (status, with_ticket) = anon.sse(&path, &[]);
    assert_eq!((status, with_ticket.len()), (200, 1));
    assert_eq!(anon.call("GET", &path, None).status, 401, "a used ticket");
    assert_eq!(
        anon.call("GET", &format!("{snaps}/{s1}/events?ticket=bogus"), None)
            .status,
        401
    );
    assert_eq!(anon.call("GET", &format!("{snaps}/{s1}/events"), None).status, 401);
    let stale = api.call("POST", "/sse/ticket", None).body;
    // Trying the ticket would use it up, so wait for the expiry it states instead: that is
    // given in whole seconds, cut down, so the ticket may last up to a second longer.
    let expires: chrono::DateTime<chrono::Utc> = stale["expires_at"].as_str().unwrap().parse().unwrap();
    let expired = expires + chrono::Duration::seconds(1);
    common::wait_until("the ticket's stated expiry", Duration::from_secs(30), || {
        (chrono::Utc::now() > expired).then_some(())
    });
    let stale = stale["ticket"].as_str().unwrap().to_string();
    assert_eq!(
        anon.call("GET", &format!("{snaps}/{s1}/events?ticket={stale}"), None)
            .status,
        401,
        "expired"
    );
    let bobs = bob.call("POST", "/sse/ticket", None).body["ticket"]
        .as_str()
        .unwrap()
        .to_string();
    let r = anon.call("GET", &format!("{snaps}/{s1}/events?ticket={bobs}"), None);
    assert_eq!(
        error_of(&r),
        (404, "snapshot not found".into()),
        "another tenant's ticket"
    );

    // Reading: another tenant's snapshot answers like an unknown one (no id oracle).
    assert_eq!(
        error_of(&bob.call("GET", &format!("{snaps}/{s1}"), None)),
        (404, "snapshot not found".into())
    );
    let missing = format!("{snaps}/00000000-0000-0000-0000-000000000000");
    assert_eq!(
        error_of(&api.call("GET", &missing, None)),
        (404, "snapshot not found".into())
    );
    let other = running_computer(&api, "other");
    let r = api.call("GET", &format!("/computers/{other}/snapshots/{s1}"), None);
    assert_eq!(
        error_of(&r),
        (404, "snapshot not found".into()),
        "a snapshot is found under its own computer"
    );
    assert_eq!(
        error_of(&api.call("DELETE", &missing, None)),
        (404, "snapshot not found".into())
    );
    let r = api.call(
        "POST",
        &format!("/computers/{id}/restore/00000000-0000-0000-0000-000000000000"),
        None,
    );
    assert_eq!(error_of(&r), (404, "snapshot not found".into()));

    // A snapshot being made is not deletable; a restore of it is accepted and starts once it
    // is ready (the seed's baseline recipe restores right after creating).
    let s2 = snapshot(&api, &id, "second");
    let early = api.call("POST", &format!("/computers/{id}/restore/{s2}"), None);
    assert_eq!(early.status, 201, "{:?}", early.body);
    assert_eq!(early.body["data"]["status"], "provisioning");
    let r = api.call("DELETE", &format!("{snaps}/{s2}"), None);
    assert_eq!(
        error_of(&r),
        (
            409,
            format!("snapshot {s2} cannot be deleted now: it is still being taken")
        )
    );
    let s2_data = api.wait_snapshot(&id, &s2, "ready", SNAP);
    let early_id = early.body["data"]["id"].as_str().unwrap().to_string();
    api.wait_status(&early_id, "running", BOOT);
    assert_eq!(out(&api, &early_id, "echo early"), "early");
    api.call("DELETE", &format!("/computers/{early_id}"), None);
    assert_eq!(
        s2_data["parent_snapshot_id"],
        s1.as_str(),
        "the second snapshot records its parent"
    );

    // A snapshot being restored is not deletable; an idempotent restore makes one computer.
    let restore_headers = [("idempotency-key", "restore-key-1")];
    let r1 = api.raw_with(
        "POST",
        &format!("/computers/{id}/restore/{s1}"),
        None,
        None,
        &restore_headers,
    );
    assert_eq!(r1.status, 201, "{}", r1.body);
    let r = api.call("DELETE", &format!("{snaps}/{s1}"), None);
    assert_eq!(
        error_of(&r),
        (
            409,
            format!("snapshot {s1} cannot be deleted now: a computer is being restored from it")
        )
    );
    let r2 = api.raw_with(
        "POST",
        &format!("/computers/{id}/restore/{s1}"),
        None,
        None,
        &restore_headers,
    );
    assert_eq!(r2.body["data"]["id"], r1.body["data"]["id"]);
    let restored = r1.body["data"]["id"].as_str().unwrap().to_string();
    api.wait_status(&restored, "running", BOOT);
    api.wait_snapshot(&id, &s1, "ready", SNAP);
    let names: Vec<String> = api.call("GET", "/computers", None).body["computers"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        names.iter().filter(|n| n.ends_with("-restored")).count(),
        1,
        "{names:?}"
    );

    // Deleting: soft, answered with the snapshot in `deleted`, then gone.
    let r = api.call("DELETE", &format!("{snaps}/{s1}"), None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        (r.body["data"]["id"].as_str(), r.body["data"]["status"].as_str()),
        (Some(s1.as_str()), Some("deleted"))
    );
    assert_eq!(api.call("GET", &format!("{snaps}/{s1}"), None).status, 404);
    assert_eq!(api.call("GET", &snaps, None).body["total"], 1);
    let r = api.call("POST", &format!("/computers/{id}/restore/{s1}"), None);
    assert_eq!(r.status, 404);

    // A stopped computer's snapshot is its disk alone (its memory sizes say so, and nothing
    // was paused); its restore boots from that disk.
    out(&api, &id, "echo on-disk > /root/stopped");
    api.call("POST", &format!("/computers/{id}/stop"), None);
    let disk_only = snapshot(&api, &id, "stopped");
    let d = api.wait_snapshot(&id, &disk_only, "ready", SNAP);
    assert_eq!(
        (
            d["memory_size_bytes"].as_u64(),
            d["state_size_bytes"].as_u64(),
            d["pause_ms"].as_u64()
        ),
        (Some(0), Some(0), Some(0)),
        "{d}"
    );
    assert!(d["rootfs_size_bytes"].as_u64() > Some(0), "{d}");
    let booted = restore(&api, &id, &disk_only);
    api.wait_status(&booted, "running", BOOT);
    assert_eq!(out(&api, &booted, "cat /root/stopped"), "on-disk");
    // It booted: no process of the original's survived into it.
    assert_eq!(
        out(
            &api,
            &booted,
            "cat /proc/uptime | cut -d. -f1 | awk '{print ($1 < 600)}'"
        ),
        "1"
    );
    // A computer that is neither running nor stopped has nothing to capture.
    let starting = api.call("POST", &format!("/computers/{id}/start"), None);
    assert_eq!(starting.status, 200, "{}", starting.body);
    let r = api.call("POST", &snaps, Some(json!({})));
    assert!(
        r.status == 201 || (r.status == 409 && error_of(&r).1.contains("is starting")),
        "{}",
        r.body
    );
}

#[test]
fn deleting_keeps_shared_chunks_and_caches_are_only_caches() {
    let dir = data_dir();
    let key = create_key(dir.path(), "default");
    // A platform default expiry: a day for snapshots whose create names none.
    let server = Server::start_with(dir.path(), &[("STASIS_SNAPSHOT_TTL_SECS", "86400")]);
    let api = Client::new(&server.base, Some(&key));
    let id = running_computer(&api, "keeper");
    out(&api, &id, "echo one > /root/one");
    let a = snapshot(&api, &id, "a");
    api.wait_snapshot(&id, &a, "ready", SNAP);
    out(
        &api,
        &id,
        "echo two > /root/two; head -c 8000000 /dev/urandom > /root/noise",
    );
    let b = snapshot(&api, &id, "b");
    api.wait_snapshot(&id, &b, "ready", SNAP);
    let store = common::backends::Store::of(dir.path());
    let before = store.chunks().len();

    let r = api.call("DELETE", &format!("/computers/{id}/snapshots/{a}"), None);
    assert_eq!(r.status, 200);
    // Collection runs in the background; a's own chunks go, b's stay.
    let t = Instant::now();
    while store.chunks().len() == before && t.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(100));
    }
    let after = store.chunks().len();
    assert!(after < before, "a's own chunks are collected ({before} -> {after})");
    assert!(!store.has_manifest(&a), "a's manifest is gone");
    assert!(store.has_manifest(&b));

    // With every local cache gone, b restores from the store alone (twice: the first restore
    // fills the cache again, which is then deleted too).
    let first = restore(&api, &id, &b);
    api.wait_status(&first, "running", BOOT);
    assert!(dir.path().join(format!("cache/snapshots/{b}")).exists());
    std::fs::remove_dir_all(dir.path().join("cache")).unwrap();
    let restored = restore(&api, &id, &b);
    api.wait_status(&restored, "running", BOOT);
    assert_eq!(
        out(&api, &restored, "cat /root/one /root/two; wc -c < /root/noise"),
        "one\ntwo\n8000000"
    );

    // A restored computer is a computer like any other: it can be snapshotted and restored.
    out(&api, &restored, "echo three > /root/three");
    let c = snapshot(&api, &restored, "second generation");
    let c_data = api.wait_snapshot(&restored, &c, "ready", SNAP);
    assert!(c_data["pause_ms"].as_u64().is_some(), "{c_data}");
    graph_on_this_backend(&api, &store, (&id, &b), (&restored, &c, &c_data));
}

/// The snapshot graph on this test's backend (SQLite and a local store, or PostgreSQL and S3
/// with encryption at rest): lineage across a restore, the account-wide history, a name that
/// pins and deploys, the disk read from the store without a restore, expiry.
fn graph_on_this_backend(
    api: &Client,
    store: &common::backends::Store,
    (original, b): (&str, &str),
    (restored, c, c_data): (&str, &str, &Value),
) {
    // The platform's default expiry applies to a snapshot whose create names none.
    let created = chrono::DateTime::parse_from_rfc3339(c_data["created_at"].as_str().unwrap()).unwrap();
    let expires = chrono::DateTime::parse_from_rfc3339(c_data["expires_at"].as_str().unwrap()).unwrap();
    assert!(((expires - created).num_seconds() - 86400).abs() <= 1, "{c_data}");
    // The restored computer's first snapshot descends from the one it came from.
    assert_eq!(c_data["parent_snapshot_id"], b, "{c_data}");
    let r = api.call("GET", &format!("/snapshots/{b}"), None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["children"], json!([c]), "{}", r.body);
    assert!(
        r.body["computers"].as_array().unwrap().iter().any(|x| x == restored),
        "{}",
        r.body
    );
    assert_eq!(r.body["data"]["resource"]["id"], original);
    let r = api.call("GET", &format!("/computers/{restored}"), None);
    assert_eq!(r.body["metadata"]["source_snapshot_id"], b, "{}", r.body);
    let r = api.call("GET", "/snapshots?q=KEEPER-restored&limit=1", None);
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(
        (r.body["total"].clone(), r.body["data"][0]["id"].clone()),
        (json!(1), json!(c)),
        "{}",
        r.body
    );

    // A name pins c (and keeps it out of the history); a deploy by name restores it.
    let r = api.call(
        "POST",
        "/named-snapshots",
        Some(json!({"name": "gen2", "snapshot_id": c})),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let r = api.call(
        "POST",
        "/named-snapshots",
        Some(json!({"name": "gen2", "snapshot_id": b})),
    );
    assert_eq!(
        (r.status, r.body["error"]["code"].as_str()),
        (409, Some("NAME_TAKEN")),
        "{}",
        r.body
    );
    let r = api.call("DELETE", &format!("/snapshots/{c}"), None);
    assert_eq!(
        (r.status, r.body["error"]["code"].as_str()),
        (409, Some("SNAPSHOT_IN_USE")),
        "{}",
        r.body
    );
    assert_eq!(api.call("GET", "/snapshots?q=KEEPER-restored", None).body["total"], 0);
    let r = api.call("POST", "/named-snapshots/gen2/deploy", None);
    assert_eq!(r.status, 201, "{}", r.body);
    let grandchild = r.body["data"]["id"].as_str().unwrap().to_string();
    api.wait_status(&grandchild, "running", BOOT);
    assert_eq!(
        out(api, &grandchild, "cat /root/one /root/two /root/three"),
        "one\ntwo\nthree"
    );

    // c's disk, read from the store (no restore): its folder and a file.
    let r = api.call("GET", &format!("/snapshots/{c}/tree?path=/root"), None);
    assert_eq!(r.status, 200, "{}", r.body);
    let names: Vec<&str> = r.body["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["name"].as_str().unwrap())
        .collect();
    assert!(
        ["one", "two", "three", "noise"].iter().all(|n| names.contains(n)),
        "{names:?}"
    );
    let r = api.raw("GET", &format!("/snapshots/{c}/files?path=/root/three"), None, None);
    assert_eq!((r.status, r.body.clone()), (200, json!("three\n")));
    let r = api.call("GET", &format!("/snapshots/{c}/files?path=/root/nope"), None);
    assert_eq!(r.status, 404, "{}", r.body);

    // An expiry of its own: deleted by itself, its manifest collected.
    let r = api.call(
        "POST",
        &format!("/computers/{grandchild}/snapshots"),
        Some(json!({"comment": "brief", "ttl_seconds": 2})),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let d = r.body["data"]["id"].as_str().unwrap().to_string();
    api.wait_snapshot(&grandchild, &d, "ready", SNAP);
    common::wait_until("the expired snapshot deleted", Duration::from_secs(60), || {
        (api.call("GET", &format!("/snapshots/{d}"), None).status == 404).then_some(())
    });
    common::wait_until("the expired snapshot collected", Duration::from_secs(60), || {
        (!store.has_manifest(&d)).then_some(())
    });
    // The name still pins c, and removing it releases c into the history.
    let r = api.call("DELETE", "/named-snapshots/gen2", None);
    assert_eq!(
        (r.status, r.body["outcome"].as_str()),
        (200, Some("released")),
        "{}",
        r.body
    );
    assert_eq!(api.call("GET", "/snapshots?q=KEEPER-restored", None).body["total"], 1);
}

#[test]
fn faults_end_in_clear_states() {
    let dir = data_dir();
    let key = create_key(dir.path(), "default");
    // An unreachable S3 store is retried for 5 s before an upload gives up.
    let mut server = Server::start_with(dir.path(), &[("STASIS_S3_RETRY_SECS", "5")]);
    let api = Client::new(&server.base, Some(&key));
    let id = running_computer(&api, "faulty");

    // The store cannot be written: the snapshot fails with the reason; the computer goes on.
    let store = common::backends::Store::of(dir.path());
    store.set_unwritable(true);
    let s = snapshot(&api, &id, "doomed");
    let waiting = api.call("POST", &format!("/computers/{id}/restore/{s}"), None);
    assert_eq!(waiting.status, 201, "{:?}", waiting.body);
    let failed = api.wait_snapshot(&id, &s, "failed", SNAP);
    let waiting = api.wait_status(waiting.body["data"]["id"].as_str().unwrap(), "error", SNAP);
    assert!(waiting["error"].as_str().unwrap().contains("failed"), "{waiting}");
    assert!(failed["error"].as_str().unwrap().contains("snapshot store"), "{failed}");
    assert_eq!(api.status(&id).0, "running");
    assert_eq!(out(&api, &id, "echo still-fine"), "still-fine");
    store.set_unwritable(false);
    assert!(!store.has_manifest(&s), "no manifest for a failed snapshot");
    let r = api.call("POST", &format!("/computers/{id}/restore/{s}"), None);
    assert_eq!(
        error_of(&r),
        (
            409,
            format!("snapshot {s} is not ready: it is failed and cannot be restored")
        )
    );

    // The server dies during an upload: after a restart the snapshot ends ready or failed.
    let s = snapshot(&api, &id, "interrupted");
    let t = Instant::now();
    loop {
        let st = api.call("GET", &format!("/computers/{id}/snapshots/{s}"), None).body["data"]["status"].clone();
        if st != "creating" || t.elapsed() > Duration::from_secs(60) {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    server.kill9();
    let server = Server::start_with(dir.path(), &[("STASIS_S3_RETRY_SECS", "5")]);
    let api = Client::new(&server.base, Some(&key));
    let t = Instant::now();
    let final_state: Value = loop {
        let d = api.call("GET", &format!("/computers/{id}/snapshots/{s}"), None).body["data"].clone();
        if d["status"] == "ready" || d["status"] == "failed" {
            break d;
        }
        assert!(t.elapsed() < SNAP, "snapshot stuck in {}", d["status"]);
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!(
        "after the restart the interrupted snapshot is {}",
        final_state["status"]
    );
    if final_state["status"] == "ready" {
        let restored = restore(&api, &id, &s);
        api.wait_status(&restored, "running", BOOT);
        assert_eq!(out(&api, &restored, "echo ok"), "ok");
    }

    // The server dies in the middle of a restore job: after a restart the job runs again and
    // the computer comes up (no computer is left provisioning, no QEMU left behind).
    let mut server = server;
    let good = snapshot(&api, &id, "restore interrupted");
    api.wait_snapshot(&id, &good, "ready", SNAP);
    let interrupted = restore(&api, &id, &good);
    server.kill9(); // the restore job is queued or running: either way it must not be lost
    let server = Server::start_with(dir.path(), &[("STASIS_S3_RETRY_SECS", "5")]);
    let api = Client::new(&server.base, Some(&key));
    api.wait_status(&interrupted, "running", BOOT);
    assert_eq!(out(&api, &interrupted, "echo resumed"), "resumed");
    let snap = api.call("GET", &format!("/computers/{id}/snapshots/{good}"), None).body["data"].clone();
    assert_eq!(snap["status"], "ready", "the snapshot is ready again once read: {snap}");

    // A corrupted chunk: the restore fails naming the snapshot; no guest runs on bad memory.
    let good = snapshot(&api, &id, "to-corrupt");
    api.wait_snapshot(&id, &good, "ready", SNAP);
    let _ = std::fs::remove_dir_all(dir.path().join("cache"));
    store.corrupt_chunks();
    let restored = restore(&api, &id, &good);
    let body = api.wait_status(&restored, "error", SNAP);
    let reason = body["error"].as_str().unwrap();
    assert!(reason.contains(&good) && reason.contains("corrupt"), "{reason}");
    let snap = api.wait_snapshot(&id, &good, "failed", SNAP);
    assert!(snap["error"].as_str().unwrap().contains("damaged"), "{snap}");
    assert!(
        common::qemu_pid(dir.path(), &restored).is_none_or(|p| !common::alive(p)),
        "no guest was started"
    );
}
