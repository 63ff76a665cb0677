//! End to end: the Computers API of a real `stasis serve` with real guests — the happy path,
//! the bad-input matrix, and the faults (a killed QEMU, a killed and restarted server).

mod common;

use std::time::{Duration, Instant};

use common::{alive, create_key, data_dir, qemu_pid, Client, Server};
use serde_json::json;

const BOOT: Duration = Duration::from_secs(180);

#[test]
fn bad_input_gets_clear_errors_and_every_answer_has_a_request_id() {
    let dir = data_dir();
    let key = create_key(dir.path(), "alice");
    let server = Server::start(dir.path());
    let api = Client::new(&server.base, Some(&key));

    // Authentication.
    for (client, what) in [
        (Client::new(&server.base, None), "no key"),
        (Client::new(&server.base, Some("stasis_not-a-real-key")), "a wrong key"),
    ] {
        let r = client.call("GET", "/computers", None);
        assert_eq!(r.status, 401, "{what}: {}", r.body);
        assert_eq!(r.body["error"]["code"], "UNAUTHORIZED");
        assert!(r.request_id.is_some());
    }

    // Malformed JSON is a 400; the error format is the API's.
    let r = api.raw("POST", "/computers", Some("{\"name\": "), Some("application/json"));
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body["error"]["message"].as_str().unwrap().contains("malformed JSON"));
    assert_eq!(r.body["error"]["request_id"].as_str(), r.request_id.as_deref());

    // Field problems are 422s that name the field.
    let cases = [
        (json!({"size": "xs"}), "name"),
        (json!({"name": 42}), "name"),
        (json!({"name": "x", "size": "gigantic"}), "size"),
        (json!({"name": "x", "size": 1}), "size"),
        (json!({"name": "x", "metadata": "nope"}), "metadata"),
        (json!({"name": "x", "template_type": "windows-11"}), "template_type"),
    ];
    for (body, field) in cases {
        let r = api.call("POST", "/computers", Some(body.clone()));
        assert_eq!(r.status, 422, "{body}: {}", r.body);
        assert_eq!(r.body["error"]["field"], field, "{body}");
        assert!(
            r.body["error"]["message"].as_str().unwrap().contains(field),
            "{}",
            r.body
        );
    }

    // Unknown ids and unknown routes are 404s in the same format.
    let r = api.call("GET", "/computers/00000000-0000-0000-0000-000000000000", None);
    assert_eq!(
        (r.status, r.body["error"]["message"].as_str()),
        (404, Some("computer not found"))
    );
    let r = api.call("GET", "/computers/not-a-uuid", None);
    assert_eq!(r.status, 404);
    let r = api.call("GET", "/nothing-here", None);
    assert_eq!(r.status, 404);
    assert!(r.request_id.is_some());

    // Another tenant's computer does not exist for you.
    let id = api.create("alice-box", "xs");
    let bob = Client::new(&server.base, Some(&create_key(dir.path(), "bob")));
    for (m, p) in [
        ("GET", format!("/computers/{id}")),
        ("DELETE", format!("/computers/{id}")),
        ("POST", format!("/computers/{id}/stop")),
    ] {
        let r = bob.call(m, &p, None);
        assert_eq!(
            (r.status, r.body["error"]["message"].as_str()),
            (404, Some("computer not found")),
            "{m} {p}"
        );
    }
    let r = bob.exec(&id, "true", None);
    assert_eq!(r.status, 404);
    assert_eq!(bob.call("GET", "/computers", None).body["total"], 0);

    // Exec: validation, then state.
    let r = api.call("POST", &format!("/computers/{id}/exec"), Some(json!({})));
    assert_eq!((r.status, r.body["error"]["field"].as_str()), (422, Some("command")));
    let r = api.exec(&id, "true", Some(0));
    assert_eq!((r.status, r.body["error"]["field"].as_str()), (422, Some("timeout")));
    let r = api.call(
        "POST",
        &format!("/computers/{id}/exec"),
        Some(json!({"command": "true", "timeout": "soon"})),
    );
    assert_eq!(r.status, 422);
    api.wait_status(&id, "running", BOOT);
    let r = api.call("POST", &format!("/computers/{id}/stop"), None);
    assert_eq!(
        (r.status, r.body["status"].as_str()),
        (200, Some("stopped")),
        "{}",
        r.body
    );
    let r = api.exec(&id, "true", None);
    assert_eq!(r.status, 409, "{}", r.body);
    assert_eq!(r.body["error"]["message"], "computer is not running");
    let r = api.call("DELETE", &format!("/computers/{id}"), None);
    assert_eq!(r.status, 200);
    assert_eq!(api.call("GET", &format!("/computers/{id}"), None).status, 404);
}

#[test]
fn a_computer_runs_commands_times_them_out_and_keeps_its_disk() {
    let dir = data_dir();
    let key = create_key(dir.path(), "default");
    let server = Server::start(dir.path());
    let api = Client::new(&server.base, Some(&key));

    let id = api.create("dev", "small");
    let body = api.wait_status(&id, "running", BOOT);
    assert_eq!(body["size"], "small");

    let r = api.exec(&id, "uname -r; python3 -c \"print(6*7)\"", None);
    assert_eq!(r.status, 200, "{}", r.body);
    let out = r.body["output"].as_str().unwrap().to_string();
    let host_kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("6.1.") && lines[0].ends_with("-cloud-amd64"),
        "{out}"
    );
    assert_ne!(lines[0], host_kernel.trim(), "the guest's kernel, not the host's");
    assert_eq!(lines[1], "42");
    assert_eq!(r.body["exit_code"], 0);
    assert_eq!(r.body["success"], true);

    let r = api.call(
        "POST",
        &format!("/computers/{id}/exec/python"),
        Some(json!({"code": "import sys; print(sys.version_info[0]); sys.exit(3)"})),
    );
    assert_eq!(
        (r.body["output"].as_str(), r.body["exit_code"].as_i64()),
        (Some("3\n"), Some(3))
    );
    assert_eq!(r.body["success"], false);

    let r = api.exec(&id, "echo out; echo err >&2; exit 7", None);
    assert_eq!(
        (r.body["output"].as_str(), r.body["stderr"].as_str()),
        (Some("out\n"), Some("err\n"))
    );
    assert_eq!(r.body["exit_code"], 7);

    // A command over its timeout is killed: exit code 124, answered promptly.
    let t = Instant::now();
    let r = api.exec(&id, "sleep 30", Some(2));
    let took = t.elapsed();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.body["exit_code"], 124);
    assert_eq!(r.body["timed_out"], true);
    assert!(took < Duration::from_secs(4), "answered after {took:?}");
    let r = api.exec(&id, "echo alive > /root/note; cat /root/note", None);
    assert_eq!(r.body["output"], "alive\n", "the computer still answers");

    // Stop, start: the disk is kept, the memory is not.
    let r = api.call("POST", &format!("/computers/{id}/stop"), None);
    assert_eq!(r.body["status"], "stopped");
    assert_eq!(api.status(&id).0, "stopped");
    let r = api.call("POST", &format!("/computers/{id}/start"), None);
    assert_eq!((r.status, r.body["success"].as_bool()), (200, Some(true)));
    api.wait_status(&id, "running", BOOT);
    assert_eq!(api.exec(&id, "cat /root/note", None).body["output"], "alive\n");

    let list = api.call("GET", "/computers", None);
    assert_eq!(list.body["total"], 1);
    assert_eq!(list.body["computers"][0]["id"], id.as_str());

    let pid = qemu_pid(dir.path(), &id).expect("a running computer has a QEMU");
    // Its QEMU runs under a seccomp filter (-sandbox on): mode 2 in /proc.
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    assert!(status.lines().any(|l| l == "Seccomp:\t2"), "{status}");
    let r = api.call("DELETE", &format!("/computers/{id}"), None);
    assert_eq!(r.body["status"], "destroyed");
    assert!(!alive(pid), "destroy ends the QEMU");
    assert!(
        !dir.path().join("computers").join(&id).exists(),
        "and removes its files"
    );
}

#[test]
fn a_killed_qemu_turns_the_computer_to_error_and_the_server_stays_up() {
    let dir = data_dir();
    let key = create_key(dir.path(), "default");
    let server = Server::start(dir.path());
    let api = Client::new(&server.base, Some(&key));
    let id = api.create("victim", "xs");
    api.wait_status(&id, "running", BOOT);
    let other = api.create("bystander", "xs");
    api.wait_status(&other, "running", BOOT);

    let pid = qemu_pid(dir.path(), &id).unwrap();
    let _ = rustix::process::kill_process(
        rustix::process::Pid::from_raw(pid).expect("a live pid"),
        rustix::process::Signal::KILL,
    );
    let body = api.wait_status(&id, "error", Duration::from_secs(10));
    let reason = body["error"].as_str().unwrap();
    assert!(reason.contains("SIGKILL"), "the reason names what happened: {reason}");
    assert_eq!(api.exec(&id, "true", None).status, 409);

    // The server and the other computer are unaffected.
    assert_eq!(api.call("GET", "/health", None).status, 200);
    assert_eq!(api.exec(&other, "echo fine", None).body["output"], "fine\n");

    // An errored computer can be started again.
    let r = api.call("POST", &format!("/computers/{id}/start"), None);
    assert_eq!(r.status, 200, "{}", r.body);
    api.wait_status(&id, "running", BOOT);
    assert_eq!(api.exec(&id, "echo back", None).body["output"], "back\n");
}

#[test]
fn restarts_reattach_running_machines_and_shutdown_leaves_no_qemu_behind() {
    let dir = data_dir();
    let key = create_key(dir.path(), "default");
    let mut server = Server::start(dir.path());
    let api = Client::new(&server.base, Some(&key));
    let id = api.create("survivor", "xs");
    api.wait_status(&id, "running", BOOT);
    // A process that lives only in the guest's memory.
    let r = api.exec(&id, "nohup sleep 1000 >/dev/null 2>&1 & echo $!", None);
    let guest_pid = r.body["output"].as_str().unwrap().trim().to_string();
    let qemu = qemu_pid(dir.path(), &id).unwrap();

    // The server dies hard; its QEMU lives on and is re-attached by the next server.
    server.kill9();
    assert!(alive(qemu), "QEMU outlives a crashed server");
    let mut server = Server::start(dir.path());
    let api = Client::new(&server.base, Some(&key));
    assert_eq!(api.status(&id).0, "running");
    let r = api.exec(&id, &format!("kill -0 {guest_pid} && echo same-machine"), None);
    assert_eq!(r.body["output"], "same-machine\n", "{}", r.body);
    assert_eq!(qemu_pid(dir.path(), &id), Some(qemu));

    // A clean shutdown stops every machine; nothing is left running without an owner.
    server.terminate();
    let t = Instant::now();
    while alive(qemu) && t.elapsed() < Duration::from_secs(10) {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(!alive(qemu), "no QEMU outlives a clean shutdown");
    // Nor a cgroup of the killed platform or of the one that stopped.
    let left = common::cgroups_left(dir.path());
    assert!(left.is_empty(), "cgroups left behind: {left:?}");
    let server = Server::start(dir.path());
    let api = Client::new(&server.base, Some(&key));
    let (status, body) = api.status(&id);
    assert_eq!(status, "stopped", "{body}");
    api.call("POST", &format!("/computers/{id}/start"), None);
    api.wait_status(&id, "running", BOOT);
}

/// A computer's disk traffic has a ceiling (`--disk-mbps`), kept by its QEMU, so one guest
/// cannot take the host's disk from the others: 8 MiB written past the guest's page cache at
/// 2 MiB/s take about 4 s (an unthrottled guest writes them in well under one).
#[test]
fn a_computers_disk_traffic_has_a_ceiling() {
    let dir = data_dir();
    let key = create_key(dir.path(), "disk");
    let server = Server::start_with(dir.path(), &[("STASIS_DISK_MBPS", "2")]);
    let api = Client::new(&server.base, Some(&key));
    let id = api.create("throttled", "xs");
    api.wait_status(&id, "running", BOOT);
    let took = common::out(
        &api,
        &id,
        "s=$(date +%s%N); dd if=/dev/zero of=/root/big bs=1M count=8 oflag=direct status=none; \
         e=$(date +%s%N); echo $(( (e - s) / 1000000 ))",
    );
    let ms: u64 = took.parse().unwrap_or_else(|_| panic!("{took}"));
    assert!(
        ms >= 3000,
        "8 MiB at a 2 MiB/s ceiling took {ms} ms: the ceiling does not hold"
    );
    // It is a ceiling on traffic, not a fault: the data is all there.
    assert_eq!(common::out(&api, &id, "stat -c %s /root/big"), "8388608");
}
