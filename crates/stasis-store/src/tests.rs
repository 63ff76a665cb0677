use std::io::{Seek, SeekFrom, Write};

use super::*;

fn noop() -> Progress {
    Arc::new(|_| {})
}

fn sparse_file(dir: &Path, name: &str, size: u64, writes: &[(u64, &[u8])]) -> std::path::PathBuf {
    let path = dir.join(name);
    let mut f = std::fs::File::create(&path).unwrap();
    f.set_len(size).unwrap();
    for (at, data) in writes {
        f.seek(SeekFrom::Start(*at)).unwrap();
        f.write_all(data).unwrap();
    }
    path
}

fn manifest(id: &str, part: Part) -> Manifest {
    let empty = Part {
        size: 0,
        chunk_size: 4096,
        chunks: vec![],
    };
    Manifest {
        version: MANIFEST_VERSION,
        snapshot_id: id.into(),
        tenant_id: "t".into(),
        computer_id: "c".into(),
        parent_snapshot_id: None,
        created_at: String::new(),
        machine: serde_json::json!({}),
        state: empty.clone(),
        memory: part,
        disk: empty,
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
    store.materialize(&part, &out, noop()).await.unwrap();
    assert_eq!(std::fs::read(&out).unwrap(), std::fs::read(&src).unwrap());

    // The same content again uploads nothing new.
    let (again, stats) = store
        .upload_file(&store.pin().await, &src, 1 << 20, noop())
        .await
        .unwrap();
    assert_eq!(again, part);
    assert_eq!((stats.new_chunks, stats.reused_chunks, stats.uploaded_bytes), (0, 3, 0));
}

#[tokio::test]
async fn a_corrupted_chunk_fails_the_materialization_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("store");
    let store = SnapshotStore::local(&root).unwrap();
    let src = sparse_file(dir.path(), "ram", 1 << 20, &[(100, b"precious data")]);
    let (part, _) = store
        .upload_file(&store.pin().await, &src, 1 << 20, noop())
        .await
        .unwrap();
    let hash = part.chunks[0].unwrap();

    let on_disk = root.join(hash.key());
    let mut bytes = std::fs::read(&on_disk).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&on_disk, bytes).unwrap();

    let err = store
        .materialize(&part, &dir.path().join("out"), noop())
        .await
        .unwrap_err();
    assert!(
        matches!(err, StoreError::Corrupt { chunk, .. } if chunk == hash),
        "{err}"
    );
    assert!(err.to_string().contains(&hash.to_hex()), "{err}");

    std::fs::remove_file(&on_disk).unwrap();
    let err = store
        .materialize(&part, &dir.path().join("out"), noop())
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
    let (pa, _) = store.upload_file(&store.pin().await, &a, 4096, noop()).await.unwrap();
    let (pb, sb) = store.upload_file(&store.pin().await, &b, 4096, noop()).await.unwrap();
    assert_eq!(
        (sb.new_chunks, sb.reused_chunks),
        (1, 1),
        "the shared chunk is stored once"
    );
    store.put_manifest(&manifest("snap-a", pa.clone())).await.unwrap();
    store.put_manifest(&manifest("snap-b", pb.clone())).await.unwrap();
    assert_eq!(store.get_manifest("snap-a").await.unwrap().memory, pa);
    assert!(matches!(
        store.get_manifest("nope").await,
        Err(StoreError::MissingManifest(_))
    ));

    // Delete snapshot a: only its own chunk goes; b still restores whole.
    store.delete_manifest("snap-a").await.unwrap();
    let deleted = store
        .collect_garbage(&["snap-b".to_string()], Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(deleted, GcStats { deleted: 1, young: 0 });
    let m = store.get_manifest("snap-b").await.unwrap();
    store.verify_present(&m).await.unwrap();
    store
        .materialize(&m.memory, &dir.path().join("b-out"), noop())
        .await
        .unwrap();
    assert_eq!(
        std::fs::read(dir.path().join("b-out")).unwrap(),
        std::fs::read(&b).unwrap()
    );

    // Young chunks survive a collection even when nothing names them yet.
    let c = sparse_file(dir.path(), "c", 4096, &[(0, &[9u8; 4096])]);
    store.upload_file(&store.pin().await, &c, 4096, noop()).await.unwrap();
    let deleted = store
        .collect_garbage(&["snap-b".to_string()], Duration::from_secs(600))
        .await
        .unwrap();
    assert_eq!(
        deleted,
        GcStats { deleted: 0, young: 1 },
        "spared, and counted for a later pass"
    );
}
