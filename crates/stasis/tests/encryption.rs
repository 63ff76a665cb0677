//! End to end: encryption at rest on a real server (`serve --master-key-file`, SQLite and a
//! local store, real guests). With a master key the store holds no plaintext of what a guest
//! wrote, two tenants' identical guests share no chunk, a tampered chunk fails its restore
//! with a clear reason, and another master key restores nothing; a good snapshot restores.
//! Without a key (the control) the same check finds the plaintext, so it can fail; but chunk
//! names are still keyed per tenant (no chunk shared, no deduplication signal), and a
//! manifest modified in the store is refused against the hash recorded when it was taken.

mod common;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use common::{create_key_in, out, restore, running_computer, snapshot, Client, Server, BOOT, SNAP};
use serde_json::json;
use stasis_store::{ChunkHash, ChunkNames, Manifest, SnapshotStore};

/// A server on SQLite and `objects/` in its data dir, with the master key in `key` if any.
fn serve(dir: &Path, key: Option<&Path>) -> Server {
    let mut args: Vec<String> = ["serve", "--listen", "127.0.0.1:0"].map(String::from).to_vec();
    if let Some(key) = key {
        args.push("--master-key-file".into());
        args.push(key.display().to_string());
    }
    Server::spawn(dir, &args, &[])
}

fn key_file(dir: &Path, name: &str, byte: u8) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, format!("{}\n", format!("{byte:02x}").repeat(32))).unwrap();
    std::fs::set_permissions(&path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    path
}

/// A snapshot's manifest as the server sees it (opened with the data dir's keys, if any).
fn manifest(dir: &Path, key: Option<&Path>, snapshot: &str) -> Manifest {
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut store = SnapshotStore::local(&dir.join("objects")).unwrap();
        if let Some(key) = key {
            let db = stasis_server::db::Db::open_sqlite(&stasis_server::db_path(dir))
                .await
                .unwrap();
            let master = stasis_server::encryption::load_master_key(key).unwrap();
            store = store.with_keyring(Arc::new(stasis_server::encryption::TenantKeys::new(db, master)));
        }
        store.get_manifest(snapshot.parse().unwrap()).await.unwrap()
    })
}

fn chunk_names(m: &Manifest) -> HashSet<ChunkHash> {
    m.chunk_set()
}

/// The marker: 64 KiB of pseudo-random bytes (SHA-256 blocks of a per-run seed) the guest
/// writes to a file and to a tmpfs, so it is on its disk and in its RAM. Returns its SHA-256
/// (as the guest computed it) and four of its 32-byte blocks to look for.
fn write_marker(api: &Client, computer: &str) -> (String, Vec<Vec<u8>>) {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
    let seed = format!("stasis-marker-{nanos}-{}", std::process::id());
    let code = format!(
        r#"import hashlib, os
data = b"".join(hashlib.sha256(b"{seed}" + i.to_bytes(4, "little")).digest() for i in range(2048))
open("/root/marker", "wb").write(data)
os.system("(mkdir -p /mnt/ram && mount -t tmpfs none /mnt/ram && cp /root/marker /mnt/ram/) || cp /root/marker /dev/shm/; sync")
print(hashlib.sha256(data).hexdigest())
for i in (0, 700, 1400, 2047):
    print(data[32 * i:32 * i + 32].hex())
"#
    );
    let r = api.call(
        "POST",
        &format!("/computers/{computer}/exec/python"),
        Some(json!({ "code": code })),
    );
    assert_eq!(r.body["exit_code"], 0, "{}", r.body);
    let text = r.body["output"].as_str().unwrap().to_string();
    let mut lines = text.lines();
    let sha = lines.next().unwrap().to_string();
    let needles = lines.map(unhex).collect::<Vec<_>>();
    assert_eq!(needles.len(), 4, "{text}");
    (sha, needles)
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// How many of the needles some object file under `root` holds verbatim.
fn found_in_store(root: &Path, needles: &[Vec<u8>]) -> usize {
    let mut found = vec![false; needles.len()];
    let mut stack = vec![root.to_path_buf()];
    let mut files = 0;
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                stack.push(e.path());
                continue;
            }
            files += 1;
            let bytes = std::fs::read(e.path()).unwrap();
            for (n, needle) in needles.iter().enumerate() {
                if !found[n]
                    && bytes
                        .windows(needle.len())
                        .any(|w| w[0] == needle[0] && w == &needle[..])
                {
                    found[n] = true;
                }
            }
        }
    }
    assert!(files > 10, "the store holds objects ({files})");
    found.iter().filter(|f| **f).count()
}

/// A server (with the master key, if any) where tenants alice and bob each run a fresh
/// computer of the same image (`a`, `b`) and have snapshotted it unchanged (`sa`, `sb`).
struct TwoTenants {
    server: Server,
    alice_key: String,
    bob_key: String,
    a: String,
    b: String,
    sa: String,
    sb: String,
}

fn two_clean_snapshots(dir: &Path, key: Option<&Path>) -> TwoTenants {
    let alice_key = create_key_in(dir, "alice", None);
    let bob_key = create_key_in(dir, "bob", None);
    let server = serve(dir, key);
    let alice = Client::new(&server.base, Some(&alice_key));
    let bob = Client::new(&server.base, Some(&bob_key));
    let a = running_computer(&alice, "a");
    let b = running_computer(&bob, "b");
    let sa = snapshot(&alice, &a, "clean");
    let sb = snapshot(&bob, &b, "clean");
    alice.wait_snapshot(&a, &sa, "ready", SNAP);
    bob.wait_snapshot(&b, &sb, "ready", SNAP);
    TwoTenants {
        server,
        alice_key,
        bob_key,
        a,
        b,
        sa,
        sb,
    }
}

/// Starts the server again (with `key`, if any) with no snapshot kept on the host, so the
/// restore reads the store, and returns it with the reason the restore failed.
fn restart_and_restore_error(
    dir: &Path,
    key: Option<&Path>,
    api_key: &str,
    computer: &str,
    snap: &str,
) -> (Server, String) {
    let _ = std::fs::remove_dir_all(dir.join("cache"));
    let server = serve(dir, key);
    let reason = restore_error(&Client::new(&server.base, Some(api_key)), computer, snap);
    (server, reason)
}

/// Why a restore of `snap` fails: the restored computer's error, or, when the collection the
/// server runs at start read the snapshot's manifest first and marked the snapshot damaged,
/// the snapshot's own error (the restore is then refused outright).
fn restore_error(api: &Client, computer: &str, snap: &str) -> String {
    let r = api.call("POST", &format!("/computers/{computer}/restore/{snap}"), None);
    if r.status == 201 {
        let restored = r.body["data"]["id"].as_str().unwrap().to_string();
        let body = api.wait_status(&restored, "error", SNAP);
        return body["error"].as_str().unwrap().to_string();
    }
    assert_eq!(r.status, 409, "{}", r.body);
    let s = api.call("GET", &format!("/computers/{computer}/snapshots/{snap}"), None);
    assert_eq!(s.body["data"]["status"], "failed", "{}", s.body);
    let reason = s.body["data"]["error"].as_str().unwrap().to_string();
    assert!(reason.contains("damaged"), "{reason}");
    reason
}

#[test]
fn with_a_master_key_nothing_leaks_nothing_is_shared_and_tampering_or_a_wrong_key_fails_clearly() {
    let dir = common::data_dir();
    let keys = tempfile::tempdir().unwrap();
    let master = key_file(keys.path(), "master.key", 0x5c);
    // Two tenants, the same image, no changes; then alice writes the marker, on disk and in
    // RAM, and snapshots again.
    let TwoTenants {
        mut server,
        alice_key,
        bob_key,
        a,
        b,
        sa,
        sb,
    } = two_clean_snapshots(dir.path(), Some(&master));
    let alice = Client::new(&server.base, Some(&alice_key));
    let (sha, needles) = write_marker(&alice, &a);
    let sm = snapshot(&alice, &a, "marked");
    alice.wait_snapshot(&a, &sm, "ready", SNAP);

    // A good encrypted snapshot restores, marker and all (downloaded, not from the cache).
    let _ = std::fs::remove_dir_all(dir.path().join("cache"));
    let restored = restore(&alice, &a, &sm);
    alice.wait_status(&restored, "running", BOOT);
    assert_eq!(out(&alice, &restored, "sha256sum /root/marker | cut -d' ' -f1"), sha);
    // (The manifests are read with the server's keys from its database: stopped meanwhile.)
    server.terminate();

    // No object in the store holds any of the marker.
    assert_eq!(found_in_store(&dir.path().join("objects"), &needles), 0);
    // The two tenants' identical guests share no chunk.
    let (ma, mb) = (
        manifest(dir.path(), Some(&master), &sa),
        manifest(dir.path(), Some(&master), &sb),
    );
    let (na, nb) = (chunk_names(&ma), chunk_names(&mb));
    assert!(!na.is_empty() && !nb.is_empty());
    assert!(na.is_disjoint(&nb), "{} chunks shared", na.intersection(&nb).count());

    // One flipped byte in the first chunk of the marked snapshot's device state: the restore
    // fails naming the failed authentication, the snapshot is marked damaged, no guest runs.
    let mm = manifest(dir.path(), Some(&master), &sm);
    let first = mm.state.stored_chunks().next().expect("the state has a chunk");
    let path = dir.path().join("objects").join(first.key());
    let mut bytes = std::fs::read(&path).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&path, bytes).unwrap();
    let (mut server, reason) = restart_and_restore_error(dir.path(), Some(&master), &alice_key, &a, &sm);
    let alice = Client::new(&server.base, Some(&alice_key));
    assert!(
        reason.contains(&sm)
            && reason.contains(&first.to_hex())
            && reason.contains("failed authentication")
            && reason.contains("modified in the store"),
        "{reason}"
    );
    let snap = alice.wait_snapshot(&a, &sm, "failed", SNAP);
    assert!(snap["error"].as_str().unwrap().contains("damaged"), "{snap}");

    // Someone who can write to the store puts a plaintext manifest in place of bob's sealed
    // one: refused, because the platform stored that snapshot encrypted.
    server.terminate();
    let keyless = SnapshotStore::local(&dir.path().join("objects")).unwrap();
    tokio::runtime::Runtime::new()
        .unwrap()
        .block_on(keyless.put_manifest(&Manifest {
            chunk_names: ChunkNames::Blake3,
            ..mb.clone()
        }))
        .unwrap();
    let (mut server, reason) = restart_and_restore_error(dir.path(), Some(&master), &bob_key, &b, &sb);
    assert!(
        reason.contains(&format!(
            "the manifest of snapshot {sb} (stored encrypted, found unencrypted)"
        )),
        "{reason}"
    );

    // Another master key: the server starts, but opens no tenant's data key.
    server.terminate();
    let wrong = key_file(keys.path(), "wrong.key", 0x77);
    let (server, reason) = restart_and_restore_error(dir.path(), Some(&wrong), &alice_key, &a, &sa);
    let alice = Client::new(&server.base, Some(&alice_key));
    assert!(
        reason.contains("the master key does not open tenant") && reason.contains("wrong --master-key-file?"),
        "{reason}"
    );
    let snap = alice.call("GET", &format!("/computers/{a}/snapshots/{sa}"), None).body["data"].clone();
    assert_eq!(
        snap["status"], "ready",
        "a wrong key does not make the snapshot damaged: {snap}"
    );
    drop(server);

    // No key at all: a clear answer too.
    let (_server, reason) = restart_and_restore_error(dir.path(), None, &alice_key, &a, &sa);
    assert!(
        reason.contains(&format!(
            "snapshot {sa} is encrypted; start the server with its --master-key-file"
        )),
        "{reason}"
    );
}

/// Audit 11 and 10b, without a master key. Two tenants' identical fresh guests share no chunk
/// object, and the second one's snapshot reports every chunk it stores as uploaded (before,
/// it reused the first tenant's disk chunks, and `uploaded_bytes` said so). Then someone who
/// can write to the store changes a manifest: the restore is refused naming the snapshot, and
/// the snapshot is marked damaged.
#[test]
fn without_a_master_key_tenants_share_no_chunk_and_a_modified_manifest_is_refused() {
    let dir = common::data_dir();
    let TwoTenants {
        server,
        alice_key,
        bob_key,
        a,
        b,
        sa,
        sb,
    } = two_clean_snapshots(dir.path(), None);
    let alice = Client::new(&server.base, Some(&alice_key));
    let bob = Client::new(&server.base, Some(&bob_key));
    let (ma, mb) = (manifest(dir.path(), None, &sa), manifest(dir.path(), None, &sb));
    assert_eq!(
        (ma.chunk_names, mb.chunk_names),
        (ChunkNames::TenantKeyed, ChunkNames::TenantKeyed)
    );
    let (na, nb) = (chunk_names(&ma), chunk_names(&mb));
    assert!(!na.is_empty() && !nb.is_empty());
    assert!(
        na.is_disjoint(&nb),
        "{} chunks shared across tenants",
        na.intersection(&nb).count()
    );
    let snap = bob.call("GET", &format!("/computers/{b}/snapshots/{sb}"), None).body["data"].clone();
    let (uploaded, stored) = (
        snap["uploaded_bytes"].as_u64().unwrap(),
        snap["compressed_size_bytes"].as_u64().unwrap(),
    );
    assert!(
        uploaded >= stored,
        "bob's first snapshot reused nothing: uploaded {uploaded} of {stored} stored bytes"
    );

    let (_, needles) = write_marker(&alice, &a);
    let sm = snapshot(&alice, &a, "marked");
    alice.wait_snapshot(&a, &sm, "ready", SNAP);
    assert!(
        found_in_store(&dir.path().join("objects"), &needles) > 0,
        "the marker is in the unencrypted store"
    );

    // The store writer gives the marked snapshot more vCPUs (any change would do).
    let mut changed = manifest(dir.path(), None, &sm);
    changed.machine["vcpus"] = 8.into();
    std::fs::write(
        dir.path()
            .join("objects")
            .join(SnapshotStore::manifest_key(sm.parse().unwrap())),
        changed.encode(),
    )
    .unwrap();
    // Not from this host's copy: from the store.
    std::fs::remove_dir_all(dir.path().join("cache/snapshots").join(&sm)).unwrap();
    let reason = restore_error(&alice, &a, &sm);
    assert!(
        reason.contains(&format!(
            "the manifest of snapshot {sm} does not match the one recorded when it was taken: it was modified in the store"
        )),
        "{reason}"
    );
    let snap = alice.wait_snapshot(&a, &sm, "failed", SNAP);
    assert!(snap["error"].as_str().unwrap().contains("damaged"), "{snap}");
}
