//! End to end: the `stasis` command-line client against a real server with real guests — every
//! recipe of the seed from the terminal, `--wait` progress, `-o json`, errors with the server's
//! message and request id, and exit codes scripts can test.

mod common;

use std::process::{Command, Output};

use common::{create_key, data_dir, Client, Server, BIN};
use serde_json::Value;

struct Cli {
    base: String,
    key: String,
}

impl Cli {
    fn run(&self, args: &[&str]) -> Output {
        self.run_with_key(&self.key, args)
    }

    fn run_with_key(&self, key: &str, args: &[&str]) -> Output {
        Command::new(BIN)
            .args(args)
            .env("MIOSA_API_KEY", key)
            .env("MIOSA_BASE_URL", &self.base)
            .output()
            .unwrap()
    }

    /// Runs a command that must succeed and answers its `-o json` output.
    fn json(&self, args: &[&str]) -> Value {
        let mut all = args.to_vec();
        all.extend(["-o", "json"]);
        let out = self.run(&all);
        assert!(out.status.success(), "{args:?}: {}", text(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{args:?}: {e}: {}", text(&out.stdout)))
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn code(out: &Output) -> i32 {
    out.status.code().expect("exited")
}

#[test]
fn the_cli_does_the_seed_recipes_with_progress_json_and_exit_codes() {
    let dir = data_dir();
    let key = create_key(dir.path(), "cli");
    let server = Server::start(dir.path());
    // The server's base without /api/v1: the CLI adds it, like the SDK.
    let cli = Cli {
        base: server.base.trim_end_matches("/api/v1").to_string(),
        key: key.clone(),
    };
    let api = Client::new(&server.base, Some(&key));

    // A computer, running, with some state.
    let c = cli.json(&["computer", "create", "--name", "cli-box", "--size", "xs", "--wait"]);
    assert_eq!(c["status"], "running");
    let id = c["id"].as_str().unwrap().to_string();
    let out = cli.run(&[
        "computer",
        "exec",
        &id,
        "--",
        "echo state-before > /root/m; head -c 20000000 /dev/urandom > /root/r; echo ok",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "ok");
    // exec ends with the command's own exit code.
    assert_eq!(code(&cli.run(&["computer", "exec", &id, "--", "exit 7"])), 7);

    // cp both ways: the bytes come back as they went.
    let local = dir.path().join("up.bin");
    let bytes: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    std::fs::write(&local, &bytes).unwrap();
    let remote = format!("{id}:/root/cp/up.bin");
    let out = cli.run(&["computer", "cp", local.to_str().unwrap(), &remote]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let back = dir.path().join("back.bin");
    let out = cli.run(&["computer", "cp", &remote, back.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        std::fs::read(&back).unwrap() == bytes,
        "the downloaded bytes are the uploaded ones"
    );
    let missing = cli.run(&["computer", "cp", &format!("{id}:/root/none"), back.to_str().unwrap()]);
    assert_eq!(
        code(&missing),
        3,
        "a missing file is not found: {}",
        text(&missing.stderr)
    );
    assert!(
        text(&missing.stderr).contains("/root/none"),
        "{}",
        text(&missing.stderr)
    );
    // env: set, seen by exec, listed, unset.
    let out = cli.run(&["computer", "env", &id, "--set", "STAGE=cli", "--set", "N=1"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "N=1\nSTAGE=cli");
    let out = cli.run(&["computer", "exec", &id, "--", "echo $STAGE"]);
    assert_eq!(text(&out.stdout).trim(), "cli");
    let out = cli.run(&["computer", "env", &id, "--unset", "N"]);
    assert_eq!(text(&out.stdout).trim(), "STAGE=cli");
    // logs: the agent's boot line is on the console.
    let out = cli.run(&["computer", "logs", &id, "-n", "50"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stdout).contains("stasis-agent: booted"),
        "{}",
        text(&out.stdout)
    );

    // shell: a terminal fed from a pipe runs what it is given and exits with the shell's code
    // (the arithmetic shows the shell ran it: the echoed input has no 42).
    let mut shell = Command::new(BIN)
        .args(["computer", "shell", &id])
        .env("MIOSA_API_KEY", &key)
        .env("MIOSA_BASE_URL", &cli.base)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write;
        let mut stdin = shell.stdin.take().unwrap();
        stdin
            .write_all(b"echo \"in $PWD as $(id -un): $((6*7))\"\nexit 5\n")
            .unwrap();
    }
    let out = shell.wait_with_output().unwrap();
    assert_eq!(code(&out), 5, "{}{}", text(&out.stdout), text(&out.stderr));
    assert!(
        text(&out.stdout).contains("in /root as root: 42"),
        "{}",
        text(&out.stdout)
    );

    // Recipe: snapshot and wait for it, with progress on stderr (not a terminal here: lines).
    let out = cli.run(&["snapshot", "create", &id, "--comment", "before-deploy-v2", "--wait"]);
    let err = text(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(err.contains("uploading"), "progress shows the upload: {err}");
    assert!(
        err.lines()
            .any(|l| l.contains("uploading") && l.contains("MiB/s") && l.contains("eta") && l.contains('%')),
        "a progress line with bytes, rate and ETA: {err}"
    );
    assert!(err.contains("ready in"), "{err}");
    let row = text(&out.stdout);
    assert!(row.contains("ready") && row.contains("before-deploy-v2"), "{row}");
    let snap = row.split_whitespace().next().unwrap().to_string();

    // list / get in JSON, as the API shapes them.
    let list = cli.json(&["snapshot", "list", &id]);
    assert_eq!(list["total"], 1);
    assert_eq!(list["data"][0]["id"], snap.as_str());
    let got = cli.json(&["snapshot", "get", &id, &snap]);
    assert_eq!(got["data"]["status"], "ready");
    assert!(got["data"]["compressed_size_bytes"].as_u64().unwrap() > 0);

    // events of a finished snapshot: the final state at once.
    let out = cli.run(&["snapshot", "events", &id, &snap]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with("snapshot_ready"), "{}", text(&out.stdout));

    // events of a live snapshot, as JSON lines, from creating to ready.
    let v = cli.json(&["snapshot", "create", &id, "--comment", "second"]);
    let second = v["data"]["id"].as_str().unwrap().to_string();
    let out = cli.run(&["snapshot", "events", &id, &second, "-o", "json"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let events: Vec<Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(events.last().unwrap()["event"], "snapshot_ready", "{events:?}");
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "snapshot_uploading" && e["data"]["bytes_total"].as_u64().is_some()),
        "{events:?}"
    );

    // --poll: the fallback when no event stream can be had.
    let out = cli.run(&["snapshot", "create", &id, "--comment", "polled", "--wait", "--poll"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(text(&out.stdout).contains("ready"), "{}", text(&out.stdout));

    // Recipe: restore; the new computer has the state, the original is unchanged.
    let r = cli.json(&["snapshot", "restore", &id, &snap, "--wait"]);
    assert_eq!(r["data"]["status"], "running");
    let restored = r["data"]["id"].as_str().unwrap().to_string();
    let out = cli.run(&["computer", "exec", &restored, "--", "cat /root/m"]);
    assert_eq!(text(&out.stdout).trim(), "state-before");
    assert_eq!(cli.json(&["computer", "get", &id])["status"], "running");

    // Recipe: a baseline cloned five ways at once.
    let five = cli.json(&["snapshot", "restore", &id, &snap, "--count", "5", "--wait"]);
    assert_eq!(five["total"], 5);
    let workers: Vec<String> = five["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            assert_eq!(c["status"], "running");
            c["id"].as_str().unwrap().to_string()
        })
        .collect();
    for w in &workers {
        let out = cli.run(&["computer", "exec", w, "--", "cat /root/m"]);
        assert_eq!(text(&out.stdout).trim(), "state-before");
    }
    for w in workers.iter().chain([&restored]) {
        assert!(cli.run(&["computer", "delete", w]).status.success());
    }

    // clone (top-level and under computer).
    let cl = cli.json(&["clone", &id, "--name", "cli-clone", "--wait"]);
    assert_eq!(cl["data"]["status"], "running");
    assert_eq!(cl["data"]["name"], "cli-clone");
    let clone_id = cl["data"]["id"].as_str().unwrap().to_string();
    assert_eq!(
        text(&cli.run(&["computer", "exec", &clone_id, "--", "cat /root/m"]).stdout).trim(),
        "state-before"
    );
    assert!(cli.run(&["computer", "delete", &clone_id]).status.success());

    // delete a snapshot.
    let d = cli.json(&["snapshot", "delete", &id, &snap]);
    assert_eq!(d["data"]["status"], "deleted");
    let ids: Vec<Value> = cli.json(&["snapshot", "list", &id])["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["id"].clone())
        .collect();
    assert!(!ids.contains(&Value::String(snap.clone())), "{ids:?}");

    // Errors: the server's message and request id on stderr, and a testable exit code.
    let none = "00000000-0000-0000-0000-000000000000";
    let out = cli.run(&["snapshot", "get", &id, none]);
    assert_eq!(code(&out), 3, "not found");
    let err = text(&out.stderr);
    assert!(
        err.contains("snapshot not found") && err.contains("request req_"),
        "{err}"
    );
    let out = cli.run_with_key("stasis_wrong", &["computer", "list"]);
    assert_eq!(code(&out), 5, "bad key");
    assert!(text(&out.stderr).contains("missing or invalid API key"));
    let long = "x".repeat(501);
    let out = cli.run(&["snapshot", "create", &id, "--comment", &long]);
    assert_eq!(code(&out), 6, "invalid input");
    assert!(text(&out.stderr).contains("comment"), "{}", text(&out.stderr));
    let out = cli.run(&["snapshot", "restore", &id, &snap]);
    assert_eq!(code(&out), 3, "a deleted snapshot is gone");
    assert!(text(&out.stderr).contains("snapshot not found"));
    assert!(cli.run(&["computer", "stop", &id]).status.success());
    let out = cli.run(&["computer", "exec", &id, "--", "true"]);
    assert_eq!(code(&out), 4, "conflict");
    assert!(text(&out.stderr).contains("computer is not running"));
    let out = cli.run(&["snapshot", "restore", &id]);
    assert_eq!(code(&out), 2, "usage");
    let out = Command::new(BIN)
        .args(["computer", "list"])
        .env_remove("MIOSA_API_KEY")
        .env("MIOSA_BASE_URL", &cli.base)
        .output()
        .unwrap();
    assert_eq!(code(&out), 1);
    assert!(text(&out.stderr).contains("MIOSA_API_KEY"));
    let out = cli.run_with_key(&key, &["computer", "list", "--base-url", "http://127.0.0.1:9"]);
    assert_eq!(code(&out), 1, "unreachable");
    assert!(text(&out.stderr).contains("cannot reach"), "{}", text(&out.stderr));

    // Progress is shown for a failed snapshot too, and --wait exits 8.
    assert!(cli.run(&["computer", "start", &id, "--wait"]).status.success());
    let store = common::backends::Store::of(dir.path());
    store.set_unwritable(true);
    let out = cli.run(&["snapshot", "create", &id, "--comment", "doomed", "--wait"]);
    store.set_unwritable(false);
    assert_eq!(code(&out), 8, "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("failed"), "{}", text(&out.stderr));
    drop(api);
}
