//! End to end: tenant limits on a real server — quotas on computers running, snapshots kept
//! and bytes stored (403 `quota_exceeded` naming the quota; a snapshot whose size, once known,
//! would pass the bytes quota fails saying so), an operator's per-tenant override
//! (`stasis tenant limits`), and the request rate (429 with `Retry-After`).

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::{create_key, data_dir, running_computer, snapshot, wait_until, Client, Server, BIN, SNAP};
use serde_json::json;

fn set_limits(dir: &std::path::Path, tenant: &str, args: &[&str]) -> String {
    let mut cmd = Command::new(BIN);
    cmd.args(["tenant", "limits", "--tenant", tenant, "--data-dir"])
        .arg(dir)
        .args(args);
    if let Some(url) = common::backends::database_url(dir) {
        cmd.args(["--database-url", &url]);
    }
    let out = cmd.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// How long a server may take to apply an operator's override: it re-reads them within 5 s;
/// the rest is room for a slow machine.
const OVERRIDE_APPLIES: Duration = Duration::from_secs(60);

/// Calls until the answer is not the quota refusal (overrides are re-read within 5 s), or the
/// override should long have applied: the caller checks the last answer.
fn until_allowed(api: &Client, method: &str, path: &str) -> common::Resp {
    let t = Instant::now();
    loop {
        let r = api.call(method, path, None);
        if r.status != 403 || t.elapsed() > OVERRIDE_APPLIES {
            return r;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Whether 30 requests at once all pass for `api`'s tenant: more than any enforced rate's burst
/// here, so true only while its rate is off.
fn rate_is_off(api: &Client) -> bool {
    (0..30).all(|_| api.call("GET", "/computers", None).status == 200)
}

/// Waits until `api`'s tenant's rate is off (its override read).
fn wait_rate_off(api: &Client) {
    wait_until("the tenant's rate limit to be off", OVERRIDE_APPLIES, || {
        rate_is_off(api).then_some(())
    });
}

/// Waits until `api`'s tenant is refused for its rate (its override read).
fn wait_rate_limited(api: &Client) {
    wait_until("the tenant's rate limit to apply", OVERRIDE_APPLIES, || {
        (api.call("GET", "/computers", None).status == 429).then_some(())
    });
}

#[test]
fn quotas_and_the_request_rate_are_enforced_with_clear_answers() {
    let dir = data_dir();
    let quota_key = create_key(dir.path(), "quota");
    let rate_key = create_key(dir.path(), "rate");
    // The platform's defaults: one computer, one snapshot, 5 requests a second.
    let server = Server::start_with(
        dir.path(),
        &[
            ("STASIS_MAX_COMPUTERS", "1"),
            ("STASIS_MAX_SNAPSHOTS", "1"),
            ("STASIS_RATE_LIMIT", "5"),
        ],
    );
    // The quota tenant polls freely: its own rate is off.
    let shown = set_limits(dir.path(), "quota", &["--rate", "0"]);
    assert!(shown.contains("requests/second:   0"), "{shown}");
    assert!(shown.contains("computers running: the platform default"), "{shown}");
    let api = Client::new(&server.base, Some(&quota_key));
    wait_rate_off(&api);

    // Computers running.
    let id = running_computer(&api, "q1");
    let r = api.call("POST", "/computers", Some(json!({"name": "q2", "size": "xs"})));
    assert_eq!(r.status, 403, "{}", r.body);
    assert_eq!(r.body["error"]["code"], "QUOTA_EXCEEDED");
    let msg = r.body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("computers running (1 of 1)"), "{msg}");
    // A clone needs a computer too: refused before any snapshot is taken.
    let r = api.call("POST", &format!("/computers/{id}/clone"), None);
    assert_eq!(r.status, 403, "{}", r.body);
    let listed = api.call("GET", &format!("/computers/{id}/snapshots"), None);
    assert_eq!(listed.body["total"], 0, "{}", listed.body);

    // Snapshots kept.
    let s1 = snapshot(&api, &id, "one");
    let r = api.call(
        "POST",
        &format!("/computers/{id}/snapshots"),
        Some(json!({"comment": "two"})),
    );
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(
        r.body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("snapshots kept (1 of 1)"),
        "{}",
        r.body
    );
    api.wait_snapshot(&id, &s1, "ready", SNAP);
    // A restore needs a computer: refused while one runs.
    let r = api.call("POST", &format!("/computers/{id}/restore/{s1}"), None);
    assert_eq!(r.status, 403, "{}", r.body);
    assert!(r.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("computers running"));

    // The operator raises this tenant's quotas; bytes stored now binds (10 KiB).
    let shown = set_limits(
        dir.path(),
        "quota",
        &["--computers", "2", "--snapshots", "5", "--stored-gib", "0.00001"],
    );
    assert!(shown.contains("computers running: 2"), "{shown}");
    let r = until_allowed(&api, "POST", &format!("/computers/{id}/restore/{s1}"));
    assert_eq!(r.status, 201, "{}", r.body);
    api.wait_status(r.body["data"]["id"].as_str().unwrap(), "running", common::BOOT);
    let r = api.call(
        "POST",
        &format!("/computers/{id}/snapshots"),
        Some(json!({"comment": "two"})),
    );
    assert_eq!(r.status, 403, "{}", r.body);
    let msg = r.body["error"]["message"].as_str().unwrap();
    assert!(msg.contains("bytes stored") && msg.contains("of 10737"), "{msg}");
    // Deleting frees it.
    let d = api.call("DELETE", &format!("/computers/{id}/snapshots/{s1}"), None);
    assert_eq!(d.status, 200, "{}", d.body);
    let r = api.call(
        "POST",
        &format!("/computers/{id}/snapshots"),
        Some(json!({"comment": "three"})),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    // Nothing is stored now, so it was let in; once its size is known it is far past 10 KiB,
    // and it fails for good, saying so, instead of taking the tenant past its quota.
    let s3 = r.body["data"]["id"].as_str().unwrap().to_string();
    let failed = api.wait_snapshot(&id, &s3, "failed", SNAP);
    let why = failed["error"].as_str().unwrap_or_default();
    assert!(
        why.contains("quota exceeded: bytes stored") && why.contains("of 10737"),
        "{failed}"
    );

    // Room for exactly one more snapshot (none is kept now), asked for six times at once: one
    // is let in.
    // Neither quota can be seen to change without taking a snapshot, but the server reads them
    // with the rate, in one override (and `tenant limits` writes the rate last): a rate of 1
    // that appears shows these quotas apply. The rate is then turned off again, and waited for
    // the same way, before the race.
    set_limits(
        dir.path(),
        "quota",
        &["--snapshots", "1", "--stored-gib", "100", "--rate", "1"],
    );
    wait_rate_limited(&api);
    let shown = set_limits(dir.path(), "quota", &["--rate", "0"]);
    assert!(shown.contains("snapshots kept:    1"), "{shown}");
    wait_rate_off(&api);
    let racers: Vec<_> = (0..6)
        .map(|i| {
            let (base, key, id) = (server.base.clone(), quota_key.clone(), id.clone());
            std::thread::spawn(move || {
                Client::new(&base, Some(&key))
                    .call(
                        "POST",
                        &format!("/computers/{id}/snapshots"),
                        Some(json!({"comment": format!("race-{i}")})),
                    )
                    .status
            })
        })
        .collect();
    let mut statuses: Vec<u16> = racers.into_iter().map(|t| t.join().unwrap()).collect();
    statuses.sort();
    assert_eq!(
        statuses,
        vec![201, 403, 403, 403, 403, 403],
        "concurrent creates past the quota"
    );

    // The request rate of the other tenant: 5/s, bursts of 10.
    let rate = Client::new(&server.base, Some(&rate_key));
    let answers: Vec<_> = (0..30).map(|_| rate.call("GET", "/computers", None)).collect();
    let limited: Vec<_> = answers.iter().filter(|r| r.status == 429).collect();
    assert!(!limited.is_empty(), "30 requests at once exceed 5/s");
    assert!(answers[..10].iter().all(|r| r.status == 200), "the burst passes");
    let first = limited[0];
    assert_eq!(first.body["error"]["code"], "RATE_LIMITED");
    assert!(first.body["error"]["message"]
        .as_str()
        .unwrap()
        .contains("5 per second"));
    let wait: u64 = first.retry_after.as_deref().expect("Retry-After").parse().unwrap();
    assert!((1..=2).contains(&wait), "{wait}");
    // Waiting as told is what is under test here (a client that honours Retry-After is let in
    // again), so this is a fixed wait, not synchronisation.
    std::thread::sleep(Duration::from_secs(wait));
    assert_eq!(rate.call("GET", "/computers", None).status, 200, "after Retry-After");
    // One tenant's limit is not another's: the quota tenant (rate off) is not limited.
    assert!(rate_is_off(&api));
    // Unauthenticated requests are not counted against anyone, and health needs no key.
    assert_eq!(Client::new(&server.base, None).call("GET", "/health", None).status, 200);
}
