//! The store's tests: round trips, verification, collection, encryption, and the attacks of
//! someone who can write to the store (swapped, modified and oversized objects) or who
//! watches deduplication from another tenant.

use std::collections::HashSet;
use std::io::{Seek, SeekFrom, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use stasis_types::{SnapshotId, TenantId};

use super::*;

/// The snapshot id standing for `name` in a test (the same name, the same id).
pub(crate) fn sid(name: &str) -> SnapshotId {
    blake3::hash(format!("snapshot {name}").as_bytes()).to_hex()[..32]
        .parse()
        .unwrap()
}

/// The tenant id standing for `name` in a test.
pub(crate) fn tid(name: &str) -> TenantId {
    blake3::hash(format!("tenant {name}").as_bytes()).to_hex()[..32]
        .parse()
        .unwrap()
}

/// The tenant a manifest names.
fn tenant_of(m: &Manifest) -> TenantId {
    m.tenant_id.parse().unwrap()
}

pub(crate) fn noop() -> Progress {
    Arc::new(|_| {})
}

/// What the platform records for a snapshot taken before manifest hashes were kept.
pub(crate) fn legacy(id: &str, tenant: &str) -> Recorded {
    Recorded {
        snapshot_id: sid(id),
        tenant_id: tid(tenant),
        sealed: false,
        manifest_hash: None,
    }
}

fn rec(id: &str, tenant: &str, sealed: bool) -> Recorded {
    Recorded {
        sealed,
        ..legacy(id, tenant)
    }
}

/// An unencrypted store as the platform runs it: chunk names keyed per tenant.
fn keyed_store(root: &Path) -> SnapshotStore {
    SnapshotStore::local(root)
        .unwrap()
        .with_naming(Arc::new(MemoryNamingKeys::default()))
}

pub(crate) fn sparse_file(dir: &Path, name: &str, size: u64, writes: &[(u64, &[u8])]) -> std::path::PathBuf {
    let path = dir.join(name);
    let mut f = std::fs::File::create(&path).unwrap();
    f.set_len(size).unwrap();
    for (at, data) in writes {
        f.seek(SeekFrom::Start(*at)).unwrap();
        f.write_all(data).unwrap();
    }
    path
}

pub(crate) fn manifest(id: &str, part: Part) -> Manifest {
    let empty = Part {
        size: 0,
        chunk_size: 4096,
        chunks: vec![],
    };
    Manifest {
        version: MANIFEST_VERSION,
        snapshot_id: sid(id).to_string(),
        tenant_id: tid("t").to_string(),
        computer_id: "c".into(),
        parent_snapshot_id: None,
        created_at: String::new(),
        machine: serde_json::json!({}),
        state: empty.clone(),
        memory: part,
        disk: empty,
        chunk_names: ChunkNames::Blake3,
        boot: None,
    }
}

#[tokio::test]
async fn upload_then_materialize_gives_back_the_same_bytes_and_skips_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let store = SnapshotStore::local(&dir.path().join("store")).unwrap();
    let random: Vec<u8> = (0..300_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 13) as u8)
        .collect();
    let src = sparse_file(
        dir.path(),
        "ram",
        8 << 20,
        &[(0, b"hello"), (3 << 20, &random), ((8 << 20) - 5, b"tail!")],
    );

    let seen = Arc::new(AtomicU64::new(0));
    let s2 = seen.clone();
    let (part, stats) = store
        .upload_file(
            &store.pin().await,
            tid("t"),
            &src,
            1 << 20,
            Arc::new(move |n| {
                s2.fetch_max(n, Ordering::Relaxed);
            }),
        )
        .await
        .unwrap();
    assert_eq!(seen.load(Ordering::Relaxed), 8 << 20, "progress reaches the whole size");
    assert_eq!(part.chunks.len(), 8);
    assert_eq!(
        part.chunks.iter().filter(|c| c.is_some()).count(),
        3,
        "only non-zero chunks are stored"
    );
    assert_eq!(stats.new_chunks, 3);
    assert_eq!(stats.zero_bytes, 5 << 20);

    let out = dir.path().join("restored");
    store
        .materialize(tid("t"), &manifest("s", part.clone()), &part, &out, noop())
        .await
        .unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&src).unwrap());

    // The same content again uploads nothing new.
    let (again, stats) = store
        .upload_file(&store.pin().await, tid("t"), &src, 1 << 20, noop())
        .await
        .unwrap();
    assert_eq!(again, part);
    assert_eq!((stats.new_chunks, stats.reused_chunks, stats.uploaded_bytes), (0, 3, 0));
}

#[tokio::test]
async fn a_part_reader_reads_any_range_from_the_store_and_fails_closed_on_a_bad_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let store = SnapshotStore::local(&root).unwrap();
    let random: Vec<u8> = (0..300_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
        .collect();
    let src = sparse_file(
        dir.path(),
        "disk",
        4 << 20,
        &[(10, b"head"), ((1 << 20) - 150_000, &random), ((4 << 20) - 4, b"end!")],
    );
    let (part, _) = store
        .upload_file(&store.pin().await, tid("t"), &src, 1 << 20, noop())
        .await
        .unwrap();
    let m = manifest("s", part.clone());
    let reader = store.part_reader(tid("t"), &m, &part).await.unwrap();
    assert_eq!(reader.size(), 4 << 20);
    let whole = std::fs::read(&src).unwrap();
    // Within a chunk, across a chunk boundary, in a hole (never stored), at the very end.
    for (at, len) in [
        (0u64, 64usize),
        ((1 << 20) - 150_000 - 7, 300_014),
        (2 << 20, 4096),
        ((4 << 20) - 10, 10),
    ] {
        let mut buf = vec![0xAA; len];
        reader.read_at(at, &mut buf).await.unwrap();
        assert_eq!(buf, whole[at as usize..][..len], "{len} bytes at {at}");
    }
    let mut past = [0u8; 2];
    assert!(reader.read_at((4 << 20) - 1, &mut past).await.is_err(), "past the end");
    // Another tenant's key does not open it.
    assert!(store.part_reader(tid("other"), &m, &part).await.is_err());
    // A chunk changed in the store is refused, never read as data.
    let hash = part.chunks[1].unwrap();
    let on_disk = root.join(hash.key());
    let mut bytes = std::fs::read(&on_disk).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 1;
    std::fs::write(&on_disk, bytes).unwrap();
    let fresh = store.part_reader(tid("t"), &m, &part).await.unwrap();
    let mut buf = vec![0u8; 16];
    let err = fresh.read_at(1 << 20, &mut buf).await.unwrap_err();
    assert!(
        matches!(err, StoreError::Corrupt { chunk, .. } if chunk == hash),
        "{err}"
    );
}

#[tokio::test]
async fn a_corrupted_chunk_fails_the_materialization_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let store = SnapshotStore::local(&root).unwrap();
    let src = sparse_file(dir.path(), "ram", 1 << 20, &[(100, b"precious data")]);
    let (part, _) = store
        .upload_file(&store.pin().await, tid("t"), &src, 1 << 20, noop())
        .await
        .unwrap();
    let hash = part.chunks[0].unwrap();

    let on_disk = root.join(hash.key());
    let mut bytes = std::fs::read(&on_disk).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&on_disk, bytes).unwrap();

    let err = store
        .materialize(
            tid("t"),
            &manifest("s", part.clone()),
            &part,
            &dir.path().join("out"),
            noop(),
        )
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Corrupt { chunk, .. } if chunk == hash),
        "{err}"
    );
    assert!(err.to_string().contains(&hash.to_hex()), "{err}");

    std::fs::remove_file(&on_disk).unwrap();
    let err = store
        .materialize(
            tid("t"),
            &manifest("s", part.clone()),
            &part,
            &dir.path().join("out"),
            noop(),
        )
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::MissingChunk(h) if h == hash));
}

#[tokio::test]
async fn manifests_round_trip_and_garbage_collection_keeps_what_live_snapshots_need() {
    let dir = tempfile::tempdir().unwrap();
    let store = SnapshotStore::local(&dir.path().join("store")).unwrap();
    let shared = vec![1u8; 4096];
    let a = sparse_file(dir.path(), "a", 8192, &[(0, &shared), (4096, &[2u8; 4096])]);
    let b = sparse_file(dir.path(), "b", 8192, &[(0, &shared), (4096, &[3u8; 4096])]);
    let (pa, _) = store
        .upload_file(&store.pin().await, tid("t"), &a, 4096, noop())
        .await
        .unwrap();
    let (pb, sb) = store
        .upload_file(&store.pin().await, tid("t"), &b, 4096, noop())
        .await
        .unwrap();
    assert_eq!(
        (sb.new_chunks, sb.reused_chunks),
        (1, 1),
        "the shared chunk is stored once"
    );
    store.put_manifest(&manifest("snap-a", pa.clone())).await.unwrap();
    store.put_manifest(&manifest("snap-b", pb.clone())).await.unwrap();
    assert_eq!(store.get_manifest(sid("snap-a")).await.unwrap().memory, pa);
    assert!(matches!(
        store.get_manifest(sid("nope")).await,
        Err(StoreError::MissingManifest(_))
    ));

    // Delete snapshot a: only its own chunk goes; b still restores whole.
    store.delete_manifest(sid("snap-a")).await.unwrap();
    let deleted = store
        .collect_garbage(&[legacy("snap-b", "t")], Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(deleted, GcStats { deleted: 1, young: 0 });
    let m = store.get_manifest(sid("snap-b")).await.unwrap();
    store.verify_present(&m).await.unwrap();
    store
        .materialize(tenant_of(&m), &m, &m.memory, &dir.path().join("b-out"), noop())
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(dir.path().join("b-out")).unwrap(),
        std::fs::read(&b).unwrap()
    );

    // Young chunks survive a collection even when nothing names them yet.
    let c = sparse_file(dir.path(), "c", 4096, &[(0, &[9u8; 4096])]);
    store
        .upload_file(&store.pin().await, tid("t"), &c, 4096, noop())
        .await
        .unwrap();
    let deleted = store
        .collect_garbage(&[legacy("snap-b", "t")], Duration::from_secs(600))
        .await
        .unwrap();
    assert_eq!(
        deleted,
        GcStats { deleted: 0, young: 1 },
        "spared, and counted for a later pass"
    );
}

fn encrypted_store(root: &Path) -> (SnapshotStore, Arc<MemoryKeyring>) {
    let keys = Arc::new(MemoryKeyring::default());
    let store = SnapshotStore::local(root).unwrap().with_keyring(keys.clone());
    (store, keys)
}

fn tenant_manifest(store: &SnapshotStore, id: &str, tenant: &str, part: Part) -> Manifest {
    Manifest {
        tenant_id: tid(tenant).to_string(),
        chunk_names: store.chunk_names(),
        boot: None,
        ..manifest(id, part)
    }
}

/// Every object file under `dir`.
fn objects(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        if e.file_type().unwrap().is_dir() {
            out.extend(objects(&e.path()));
        } else {
            out.push(e.path());
        }
    }
    out
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

#[tokio::test]
async fn encrypted_snapshots_round_trip_leave_no_plaintext_and_share_nothing_across_tenants() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let (store, _) = encrypted_store(&root);
    // Incompressible-ish, so a plaintext chunk would hold it verbatim.
    let marker: Vec<u8> = b"stasis-marker-0123456789abcdef!!".repeat(2048);
    let src = sparse_file(dir.path(), "ram", 1 << 20, &[(4096, &marker)]);

    let (pa, sa) = store
        .upload_file(&store.pin().await, tid("a"), &src, 64 << 10, noop())
        .await
        .unwrap();
    let (pb, sb) = store
        .upload_file(&store.pin().await, tid("b"), &src, 64 << 10, noop())
        .await
        .unwrap();
    assert!(sa.new_chunks > 0);
    assert_eq!(sb.new_chunks, sa.new_chunks, "tenant b reuses nothing of tenant a's");
    assert_eq!(sb.reused_chunks, 0);
    let names = |p: &Part| p.stored_chunks().collect::<HashSet<_>>();
    assert!(names(&pa).is_disjoint(&names(&pb)), "no chunk shared across tenants");
    // Within a tenant, deduplication still works.
    let (again, s) = store
        .upload_file(&store.pin().await, tid("a"), &src, 64 << 10, noop())
        .await
        .unwrap();
    assert_eq!(again, pa);
    assert_eq!((s.new_chunks, s.uploaded_bytes), (0, 0));

    store
        .put_manifest(&tenant_manifest(&store, "sa", "a", pa.clone()))
        .await
        .unwrap();
    store
        .put_manifest(&tenant_manifest(&store, "sb", "b", pb.clone()))
        .await
        .unwrap();
    for f in objects(&root) {
        let bytes = std::fs::read(&f).unwrap();
        assert!(!contains(&bytes, &marker[..32]), "plaintext in {}", f.display());
        assert!(
            !contains(&bytes, b"\"tenant_id\""),
            "manifest plaintext in {}",
            f.display()
        );
    }
    for (id, part) in [("sa", &pa), ("sb", &pb)] {
        let m = store.get_manifest(sid(id)).await.unwrap();
        assert_eq!(&m.memory, part);
        store.verify_present(&m).await.unwrap();
        let out = dir.path().join(format!("{id}-out"));
        store
            .materialize(tenant_of(&m), &m, &m.memory, &out, noop())
            .await
            .unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&src).unwrap());
    }
}

#[tokio::test]
async fn a_tampered_encrypted_chunk_or_manifest_fails_authentication_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let (store, _) = encrypted_store(&root);
    let src = sparse_file(dir.path(), "ram", 1 << 20, &[(100, b"precious data")]);
    let (part, _) = store
        .upload_file(&store.pin().await, tid("t"), &src, 1 << 20, noop())
        .await
        .unwrap();
    store
        .put_manifest(&tenant_manifest(&store, "s1", "t", part.clone()))
        .await
        .unwrap();
    let hash = part.chunks[0].unwrap();
    let on_disk = root.join(hash.key());
    let good = std::fs::read(&on_disk).unwrap();
    let mut bytes = good.clone();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x01;
    std::fs::write(&on_disk, &bytes).unwrap();
    let m = store.get_manifest(sid("s1")).await.unwrap();
    let err = store
        .materialize(tenant_of(&m), &m, &m.memory, &dir.path().join("out"), noop())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Tampered { .. }), "{err:?}");
    let msg = err.to_string();
    assert!(
        msg.contains("failed authentication") && msg.contains(&hash.to_hex()) && msg.contains(&sid("s1").to_string()),
        "{msg}"
    );
    std::fs::write(&on_disk, &good).unwrap();

    // The manifest: a flipped byte, and a manifest moved to another snapshot's place.
    let key = root.join(SnapshotStore::manifest_key(sid("s1")));
    let good = std::fs::read(&key).unwrap();
    let mut bytes = good.clone();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x01;
    std::fs::write(&key, &bytes).unwrap();
    let err = store.get_manifest(sid("s1")).await.unwrap_err();
    assert!(matches!(err, StoreError::Tampered { .. }), "{err:?}");
    assert!(
        err.to_string()
            .contains(&format!("manifest of snapshot {} failed authentication", sid("s1"))),
        "{err}"
    );
    let moved = root.join(SnapshotStore::manifest_key(sid("s2")));
    std::fs::create_dir_all(moved.parent().unwrap()).unwrap();
    std::fs::write(&moved, &good).unwrap();
    assert!(matches!(
        store.get_manifest(sid("s2")).await,
        Err(StoreError::Tampered { .. })
    ));
}

#[tokio::test]
async fn encrypted_snapshots_need_their_key_and_plaintext_ones_stay_readable() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let src = sparse_file(dir.path(), "ram", 1 << 20, &[(100, b"some data")]);
    // An old snapshot, taken without a key.
    let plain = SnapshotStore::local(&root).unwrap();
    let (pp, _) = plain
        .upload_file(&plain.pin().await, tid("t"), &src, 1 << 20, noop())
        .await
        .unwrap();
    plain
        .put_manifest(&tenant_manifest(&plain, "old", "t", pp.clone()))
        .await
        .unwrap();
    // A new one, with.
    let (store, _) = encrypted_store(&root);
    let (pe, _) = store
        .upload_file(&store.pin().await, tid("t"), &src, 1 << 20, noop())
        .await
        .unwrap();
    store
        .put_manifest(&tenant_manifest(&store, "new", "t", pe.clone()))
        .await
        .unwrap();
    assert_ne!(pp, pe);

    // The encrypted store reads both.
    for id in ["old", "new"] {
        let m = store.get_manifest(sid(id)).await.unwrap();
        let out = dir.path().join(id);
        store
            .materialize(tenant_of(&m), &m, &m.memory, &out, noop())
            .await
            .unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&src).unwrap());
    }
    // Without a key: the old one only, and a clear answer for the new one.
    assert!(plain.get_manifest(sid("old")).await.is_ok());
    let err = plain.get_manifest(sid("new")).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Encrypted { snapshot } if *snapshot == sid("new").to_string()),
        "{err:?}"
    );
    assert_eq!(
        err.to_string(),
        format!(
            "snapshot {} is encrypted, and this store has no keys to open it",
            sid("new")
        )
    );
    let m = tenant_manifest(&store, "new", "t", pe.clone());
    let err = plain
        .materialize(tenant_of(&m), &m, &pe, &dir.path().join("x"), noop())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Encrypted { .. }), "{err:?}");
    // Another keyring (another master key's data key for the tenant): nothing opens.
    let (other, keys) = encrypted_store(&root);
    keys.insert(TenantKey::from_data_key(&tid("t").to_string(), &[9; 32]));
    assert!(matches!(
        other.get_manifest(sid("new")).await,
        Err(StoreError::Tampered { .. })
    ));
    let err = other
        .materialize(tenant_of(&m), &m, &pe, &dir.path().join("y"), noop())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Tampered { .. }), "{err:?}");
    // A tenant without a key: the keyring's answer.
    let (fresh, _) = encrypted_store(&root);
    assert!(matches!(fresh.get_manifest(sid("new")).await, Err(StoreError::Key(_))));
}

#[tokio::test]
async fn garbage_collection_keeps_live_encrypted_chunks_of_every_tenant() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let (store, _) = encrypted_store(&root);
    let shared = vec![1u8; 4096];
    let a = sparse_file(dir.path(), "a", 8192, &[(0, &shared), (4096, &[2u8; 4096])]);
    let b = sparse_file(dir.path(), "b", 8192, &[(0, &shared), (4096, &[3u8; 4096])]);
    let (pa1, _) = store
        .upload_file(&store.pin().await, tid("ta"), &a, 4096, noop())
        .await
        .unwrap();
    let (pa2, s) = store
        .upload_file(&store.pin().await, tid("ta"), &b, 4096, noop())
        .await
        .unwrap();
    assert_eq!((s.new_chunks, s.reused_chunks), (1, 1), "dedup within the tenant");
    let (pb, _) = store
        .upload_file(&store.pin().await, tid("tb"), &a, 4096, noop())
        .await
        .unwrap();
    // A plaintext snapshot in the same store (taken before the key was set).
    let plain = SnapshotStore::local(&root).unwrap();
    let (pp, _) = plain
        .upload_file(&plain.pin().await, tid("ta"), &a, 4096, noop())
        .await
        .unwrap();
    plain
        .put_manifest(&tenant_manifest(&plain, "p", "ta", pp.clone()))
        .await
        .unwrap();
    store
        .put_manifest(&tenant_manifest(&store, "a1", "ta", pa1.clone()))
        .await
        .unwrap();
    store
        .put_manifest(&tenant_manifest(&store, "a2", "ta", pa2.clone()))
        .await
        .unwrap();
    store
        .put_manifest(&tenant_manifest(&store, "b1", "tb", pb.clone()))
        .await
        .unwrap();
    assert_eq!(objects(&root.join("chunks")).len(), 2 + 1 + 2 + 2);

    // a1 goes: only its own chunk (the 2s) is deleted.
    store.delete_manifest(sid("a1")).await.unwrap();
    let live = [rec("a2", "ta", true), rec("b1", "tb", true), legacy("p", "ta")];
    let gc = store.collect_garbage(&live, Duration::ZERO).await.unwrap();
    assert_eq!(gc, GcStats { deleted: 1, young: 0 });
    assert!(!root.join(pa1.chunks[1].unwrap().key()).exists());
    for r in &live {
        let id = r.snapshot_id.to_string();
        let m = store.get_manifest_of(r).await.unwrap();
        store.verify_present(&m).await.unwrap();
        store
            .materialize(tenant_of(&m), &m, &m.memory, &dir.path().join(id), noop())
            .await
            .unwrap();
    }
    // A collector that cannot read an encrypted live manifest deletes nothing.
    let err = plain.collect_garbage(&live, Duration::ZERO).await.unwrap_err();
    assert!(err.to_string().contains("is encrypted"), "{err}");
    assert_eq!(objects(&root.join("chunks")).len(), 6);
    // Everything dead: everything goes.
    let gc = store.collect_garbage(&[], Duration::ZERO).await.unwrap();
    assert_eq!(gc.deleted, 6);
}

/// Attack (a), audit 10a: someone who can write to the store replaces the manifest of tenant
/// a's legacy (unencrypted, no recorded hash) snapshot with one naming tenant b's sealed
/// chunks. Before, the restore opened them with b's key (the manifest's tenant) into a's
/// machine; now the manifest is refused, and chunks are only ever opened with a's keys.
#[tokio::test]
async fn a_legacy_manifest_naming_another_tenants_chunks_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let (store, _) = encrypted_store(&root);
    let secret = sparse_file(dir.path(), "b-ram", 1 << 20, &[(0, b"tenant b's secret")]);
    let (pb, _) = store
        .upload_file(&store.pin().await, tid("b"), &secret, 1 << 20, noop())
        .await
        .unwrap();
    store
        .put_manifest(&tenant_manifest(&store, "sb", "b", pb.clone()))
        .await
        .unwrap();
    let mine = sparse_file(dir.path(), "a-ram", 1 << 20, &[(0, b"tenant a's own")]);
    let plain = SnapshotStore::local(&root).unwrap();
    let (pa, _) = plain
        .upload_file(&plain.pin().await, tid("a"), &mine, 1 << 20, noop())
        .await
        .unwrap();
    plain
        .put_manifest(&tenant_manifest(&plain, "sa", "a", pa))
        .await
        .unwrap();
    let recorded = legacy("sa", "a");
    assert!(
        store.get_manifest_of(&recorded).await.is_ok(),
        "the legacy snapshot reads"
    );

    // The swap, as the audit sketches it: a plaintext manifest claiming tenant b.
    let forged = Manifest {
        version: 1,
        ..tenant_manifest(&plain, "sa", "b", pb.clone())
    };
    plain.put_manifest(&forged).await.unwrap();
    let err = store.get_manifest_of(&recorded).await.unwrap_err();
    assert_eq!(err.damaged_snapshot(), Some(sid("sa")), "{err:?}");
    assert!(
        err.to_string().contains(&format!(
            "the manifest of snapshot {} names tenant {}, but the snapshot is tenant {}'s",
            sid("sa"),
            tid("b"),
            tid("a")
        )),
        "{err}"
    );
    // Claiming tenant a instead: it reads, but b's sealed chunks are not plaintext chunks,
    // and are never opened with b's key (nor a's).
    let forged = Manifest {
        version: 1,
        ..tenant_manifest(&plain, "sa", "a", pb.clone())
    };
    plain.put_manifest(&forged).await.unwrap();
    let m = store.get_manifest_of(&recorded).await.unwrap();
    let out = dir.path().join("out");
    let err = store
        .materialize(tid("a"), &m, &m.memory, &out, noop())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Corrupt { .. }), "{err:?}");
    assert!(!contains(&std::fs::read(&out).unwrap(), b"tenant b's secret"));
    // Or saying its chunks are sealed (so a's key would be tried): refused up front.
    let mut json = serde_json::to_value(&forged).unwrap();
    json["version"] = 2.into();
    json["chunk_names"] = "sealed".into();
    let bytes = zstd::bulk::compress(&serde_json::to_vec(&json).unwrap(), 3).unwrap();
    std::fs::write(root.join(SnapshotStore::manifest_key(sid("sa"))), bytes).unwrap();
    let err = store.get_manifest_of(&recorded).await.unwrap_err();
    assert!(
        err.to_string()
            .contains("is unencrypted but says its chunks are sealed"),
        "{err}"
    );
    // And a manifest handed in directly for another tenant than the restoring one.
    let mb = store.get_manifest_of(&rec("sb", "b", true)).await.unwrap();
    let err = store
        .materialize(tid("a"), &mb, &mb.memory, &out, noop())
        .await
        .unwrap_err();
    assert_eq!(err.damaged_snapshot(), Some(sid("sb")), "{err:?}");
}

/// Attack (b), audit 10b: any change to an unencrypted manifest in the store (here: its
/// machine description, and a chunk swapped) is refused against the hash the platform
/// recorded, by restores and by collections alike, naming the snapshot.
#[tokio::test]
async fn a_modified_unencrypted_manifest_is_refused_against_its_recorded_hash() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let store = keyed_store(&root);
    let src = sparse_file(dir.path(), "ram", 1 << 20, &[(0, b"the real machine")]);
    let (part, _) = store
        .upload_file(&store.pin().await, tid("t"), &src, 1 << 20, noop())
        .await
        .unwrap();
    let m = tenant_manifest(&store, "s", "t", part);
    let written = store.put_manifest(&m).await.unwrap();
    let key = root.join(SnapshotStore::manifest_key(sid("s")));
    assert_eq!(written.bytes, std::fs::metadata(&key).unwrap().len());
    assert_eq!(written.hash, ManifestHash::of(&std::fs::read(&key).unwrap()));
    let recorded = Recorded {
        manifest_hash: Some(written.hash),
        ..legacy("s", "t")
    };
    assert_eq!(store.get_manifest_of(&recorded).await.unwrap(), m);

    let other = sparse_file(dir.path(), "evil", 1 << 20, &[(0, b"the attacker's")]);
    let (evil, _) = store
        .upload_file(&store.pin().await, tid("t"), &other, 1 << 20, noop())
        .await
        .unwrap();
    for changed in [
        Manifest {
            machine: serde_json::json!({"vcpus": 64}),
            ..m.clone()
        },
        Manifest {
            memory: evil.clone(),
            ..m.clone()
        },
    ] {
        std::fs::write(&key, changed.encode()).unwrap();
        let err = store.get_manifest_of(&recorded).await.unwrap_err();
        assert_eq!(err.damaged_snapshot(), Some(sid("s")), "{err:?}");
        assert_eq!(
            err.to_string(),
            format!(
                "the manifest of snapshot {} does not match the one recorded when it was taken: it was modified in the store",
                sid("s")
            )
        );
        let err = store
            .collect_garbage(std::slice::from_ref(&recorded), Duration::ZERO)
            .await
            .unwrap_err();
        assert_eq!(err.damaged_snapshot(), Some(sid("s")), "{err:?}");
        // Accepted as found only for a snapshot that has no recorded hash.
        assert!(store.get_manifest_of(&legacy("s", "t")).await.is_ok());
    }
    assert!(
        root.join(evil.chunks[0].unwrap().key()).exists(),
        "a refused collection deletes nothing"
    );
}

/// Attack (c), audit 10c: a chunk object far larger than any chunk is refused from its size
/// before its body is read (a 64 GiB sparse file: reading it whole would exhaust memory).
#[tokio::test]
async fn an_oversized_chunk_object_is_refused_from_its_size_unread() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let store = keyed_store(&root);
    let src = sparse_file(dir.path(), "ram", 64 << 10, &[(0, b"small")]);
    let (part, _) = store
        .upload_file(&store.pin().await, tid("t"), &src, 64 << 10, noop())
        .await
        .unwrap();
    let hash = part.chunks[0].unwrap();
    let huge = 64u64 << 30;
    std::fs::OpenOptions::new()
        .write(true)
        .open(root.join(hash.key()))
        .unwrap()
        .set_len(huge)
        .unwrap();
    let m = tenant_manifest(&store, "s", "t", part);
    let err = store
        .materialize(tid("t"), &m, &m.memory, &dir.path().join("out"), noop())
        .await
        .unwrap_err();
    let max = crate::seal::max_stored_len(64 << 10);
    assert!(
        matches!(&err, StoreError::Corrupt { chunk, source: ChunkError::TooLarge { size, max: m } }
            if *chunk == hash && *size == huge && *m == max),
        "{err:?}"
    );
    assert!(
        err.to_string().contains(&format!("the object is {huge} bytes")),
        "{err}"
    );
}

/// Attack (d), audit 11: without encryption, two tenants storing identical content share no
/// chunk object, and the second upload reports exactly what the first did (no "already
/// stored" signal); within a tenant deduplication still works, and legacy plainly named
/// snapshots still restore and keep their chunks through collections.
#[tokio::test]
async fn unencrypted_tenants_share_no_chunks_and_see_no_deduplication_signal() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let store = keyed_store(&root);
    let data: Vec<u8> = (0..200_000u32)
        .map(|i| (i.wrapping_mul(2654435761) >> 11) as u8)
        .collect();
    let src = sparse_file(dir.path(), "disk", 1 << 20, &[(0, &data), (600_000, &data)]);
    let (pa, sa) = store
        .upload_file(&store.pin().await, tid("a"), &src, 64 << 10, noop())
        .await
        .unwrap();
    let (pb, sb) = store
        .upload_file(&store.pin().await, tid("b"), &src, 64 << 10, noop())
        .await
        .unwrap();
    assert!(sa.new_chunks > 0);
    assert_eq!(sb, sa, "the second tenant's upload reports the same as the first's");
    assert_eq!(sb.reused_chunks, 0);
    let names = |p: &Part| p.stored_chunks().collect::<HashSet<_>>();
    assert!(names(&pa).is_disjoint(&names(&pb)), "no chunk object shared");
    assert!(names(&pa).iter().all(|h| root.join(h.key()).exists()));
    let (again, s) = store
        .upload_file(&store.pin().await, tid("a"), &src, 64 << 10, noop())
        .await
        .unwrap();
    assert_eq!((again, s.new_chunks, s.uploaded_bytes), (pa.clone(), 0, 0));

    // A legacy snapshot (plain BLAKE3 names, version 1) in the same store.
    let plain = SnapshotStore::local(&root).unwrap();
    let (pl, _) = plain
        .upload_file(&plain.pin().await, tid("a"), &src, 64 << 10, noop())
        .await
        .unwrap();
    assert!(pl.stored_chunks().all(|h| h == ChunkHash::of(&chunk_at(&src, &pl, h))));
    plain
        .put_manifest(&Manifest {
            version: 1,
            ..tenant_manifest(&plain, "old", "a", pl.clone())
        })
        .await
        .unwrap();
    let wa = store
        .put_manifest(&tenant_manifest(&store, "sa", "a", pa.clone()))
        .await
        .unwrap();
    store
        .put_manifest(&tenant_manifest(&store, "sb", "b", pb.clone()))
        .await
        .unwrap();
    let live = [
        Recorded {
            manifest_hash: Some(wa.hash),
            ..legacy("sa", "a")
        },
        legacy("old", "a"),
    ];
    // sb is gone: its chunks go, both namings of the live ones stay.
    let gc = store.collect_garbage(&live, Duration::ZERO).await.unwrap();
    assert_eq!(gc.deleted as usize, names(&pb).len());
    for r in &live {
        let m = store.get_manifest_of(r).await.unwrap();
        store.verify_present(&m).await.unwrap();
        let out = dir.path().join(r.snapshot_id.to_string());
        store.materialize(tid("a"), &m, &m.memory, &out, noop()).await.unwrap();
        assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&src).unwrap());
    }
    // A keyed snapshot does not read without the naming keys it was written with.
    let m = store.get_manifest_of(&live[0]).await.unwrap();
    let err = plain
        .materialize(tid("a"), &m, &m.memory, &dir.path().join("x"), noop())
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Config(_)), "{err:?}");
}

/// The raw bytes of the chunk named `h` in `part` of the file at `path`.
fn chunk_at(path: &Path, part: &Part, h: ChunkHash) -> Vec<u8> {
    let i = part.chunks.iter().position(|c| *c == Some(h)).unwrap();
    let all = std::fs::read(path).unwrap();
    let start = i * part.chunk_size as usize;
    all[start..(start + part.chunk_size as usize).min(all.len())].to_vec()
}

#[tokio::test]
async fn ram_kept_as_changes_uploads_only_changed_chunks_and_materializes_as_the_whole() {
    let dir = tempfile::tempdir().unwrap();
    let store = SnapshotStore::local(&dir.path().join("store")).unwrap();
    let chunk = 64u64 << 10;
    let random = |seed: u32, n: usize| -> Vec<u8> {
        (0..n as u32)
            .map(|i| (i.wrapping_add(seed).wrapping_mul(2654435761) >> 13) as u8)
            .collect()
    };
    let size = 4u64 << 20;
    // The base: data in its first MiB and at 3 MiB, holes elsewhere.
    let base = sparse_file(
        dir.path(),
        "base",
        size,
        &[(0, &random(1, 1 << 20)), (3 << 20, &random(2, 4096))],
    );
    let (base_part, _) = store
        .upload_file(&store.pin().await, tid("t"), &base, chunk as u32, noop())
        .await
        .unwrap();
    // Changes: a page inside the data, a page in a hole, a page of zeros over data, and a
    // run across a chunk boundary.
    let changes = sparse_file(
        dir.path(),
        "changes",
        size,
        &[
            (8192, &random(3, 4096)),
            (2 << 20, &random(4, 4096)),
            (3 << 20, &[0u8; 4096]),
            (chunk * 5 - 4096, &random(5, 8192)),
        ],
    );
    let (part, stats) = store
        .upload_changes(
            &store.pin().await,
            tid("t"),
            &base_part,
            store.chunk_names(),
            &base,
            &changes,
            noop(),
        )
        .await
        .unwrap();
    // Chunks 0, 4, 5 and the one at 2 MiB are new; the one at 3 MiB is all zeros now.
    assert_eq!(stats.new_chunks, 4, "{stats:?}");
    assert_eq!(
        part.chunks[(3 << 20) / chunk as usize],
        None,
        "a chunk changed to zeros is a hole"
    );
    assert_eq!(part.chunks[1], base_part.chunks[1], "an unchanged chunk is the base's");
    let mut want = std::fs::read(&base).unwrap();
    let c = std::fs::read(&changes).unwrap();
    for (at, len) in [
        (8192usize, 4096usize),
        (2 << 20, 4096),
        (3 << 20, 4096),
        (chunk as usize * 5 - 4096, 8192),
    ] {
        want[at..at + len].copy_from_slice(&c[at..at + len]);
    }
    let out = dir.path().join("restored");
    store
        .materialize(tid("t"), &manifest("s", part.clone()), &part, &out, noop())
        .await
        .unwrap();
    assert!(
        std::fs::read(&out).unwrap() == want,
        "the base with the changes over it"
    );
    // The same upload of the whole RAM names the same chunks.
    let whole = dir.path().join("whole");
    std::fs::write(&whole, &want).unwrap();
    let (same, again) = store
        .upload_file(&store.pin().await, tid("t"), &whole, chunk as u32, noop())
        .await
        .unwrap();
    assert_eq!(same, part);
    assert_eq!(again.new_chunks, 0);
}
