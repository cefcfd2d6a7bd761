//! The core conformance suite and the redb-specific guarantees: state
//! larger than memory, durability across reopen, bounded file growth,
//! corruption detection, refusal of foreign files.

use redb::{Database, TableDefinition};
use sluice_backend_redb::{RedbCheckpointStorage, RedbStateBackend, RedbStateConfig};
use sluice_core::format::{decode_snapshot, encode_snapshot};
use sluice_core::CheckpointStorageExt;
use sluice_core::{testkit, Bytes, CheckpointId, CheckpointStorage, Error, KeyGroupRange, StateBackend};
use std::sync::Arc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redb_state_backend_passes_the_state_suite() {
    let dir = tempfile::tempdir().unwrap();
    let backend = RedbStateBackend::new(dir.path().join("state")).unwrap();
    let storage = RedbCheckpointStorage::open(dir.path().join("chk.redb")).unwrap();
    testkit::run_state_backend_suite(&backend, &storage).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redb_state_backend_passes_the_state_suite_with_tiny_buffers() {
    // Buffers of a few KiB force flushes and cache evictions in the middle
    // of every test.
    let dir = tempfile::tempdir().unwrap();
    let backend = RedbStateBackend::with_config(RedbStateConfig {
        write_buffer_bytes: 4 << 10,
        read_cache_bytes: 4 << 10,
        redb_cache_bytes: 1 << 20,
        ..RedbStateConfig::new(dir.path().join("state"))
    })
    .unwrap();
    let storage = RedbCheckpointStorage::open(dir.path().join("chk.redb")).unwrap();
    testkit::run_state_backend_suite(&backend, &storage).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redb_checkpoint_storage_passes_the_storage_suite() {
    let dir = tempfile::tempdir().unwrap();
    let storage = RedbCheckpointStorage::open(dir.path().join("chk.redb")).unwrap();
    testkit::run_checkpoint_storage_suite(&storage).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redb_checkpoint_storage_keeps_what_it_committed_across_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("chk.redb");
    testkit::storage_survives_reopen(|| {
        let path = path.clone();
        async move {
            Arc::new(RedbCheckpointStorage::open(&path).unwrap()) as Arc<dyn sluice_core::CheckpointStorage>
        }
    })
    .await;
}

#[test]
fn state_ten_times_larger_than_the_memory_bounds_reads_back_correctly() {
    let dir = tempfile::tempdir().unwrap();
    let config = RedbStateConfig {
        write_buffer_bytes: 256 << 10,
        read_cache_bytes: 256 << 10,
        redb_cache_bytes: 1 << 20,
        ..RedbStateConfig::new(dir.path())
    };
    let memory_bound = config.write_buffer_bytes + config.read_cache_bytes + config.redb_cache_bytes;
    let backend = RedbStateBackend::with_config(config).unwrap();
    let range = KeyGroupRange::all(128);
    let mut store = backend.open_store(&testkit::scope(range, 0, 1)).unwrap();
    let s = store.register_state("s").unwrap();
    let value = |i: u64| -> Vec<u8> { (0..100).map(|j| (i as u8).wrapping_add(j)).collect() };
    let n = 300_000u64;
    let mut total = 0usize;
    for i in 0..n {
        let key = i.to_be_bytes();
        total += key.len() + 100;
        store.put(s, (i % 128) as u32, &key, &value(i)).unwrap();
    }
    assert!(
        total >= 10 * memory_bound,
        "state {total} B is not 10x the bounds {memory_bound} B"
    );
    let mut out = Vec::new();
    for i in (0..n).rev() {
        assert!(
            store
                .get(s, (i % 128) as u32, &i.to_be_bytes(), &mut out)
                .unwrap(),
            "key {i} lost"
        );
        assert_eq!(out, value(i), "key {i}");
    }
    // The snapshot streams all of it.
    let snap = store.snapshot(CheckpointId(1)).unwrap();
    let enc = encode_snapshot(snap.as_ref()).unwrap();
    assert_eq!(enc.entries, n);
    let mut seen = 0u64;
    decode_snapshot("big", &enc.bytes, range, &mut |_, _, _, v| {
        assert_eq!(v.len(), 100);
        seen += 1;
        Ok(())
    })
    .unwrap();
    assert_eq!(seen, n);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_committed_checkpoint_survives_closing_and_reopening_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("chk.redb");
    {
        let storage = RedbCheckpointStorage::open(&path).unwrap();
        storage
            .write_file("chk-5/a-0.kst", Bytes::from_static(b"five"))
            .await
            .unwrap();
        storage
            .commit_metadata(CheckpointId(5), Bytes::from_static(b"{\"m\":5}"))
            .await
            .unwrap();
        storage
            .write_file("chk-6/a-0.kst", Bytes::from_static(b"six"))
            .await
            .unwrap();
    }
    let storage = RedbCheckpointStorage::open(&path).unwrap();
    assert_eq!(
        storage.read_metadata(CheckpointId(5)).await.unwrap(),
        Bytes::from_static(b"{\"m\":5}")
    );
    assert_eq!(
        storage.read_file("chk-5/a-0.kst").await.unwrap(),
        Bytes::from_static(b"five")
    );
    let listing = storage.list().await.unwrap();
    assert!(listing.iter().any(|c| c.id == CheckpointId(5) && c.committed));
    assert!(
        !listing.iter().any(|c| c.id == CheckpointId(6) && c.committed),
        "checkpoint 6 was never committed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_hundred_checkpoints_with_retention_three_keep_the_file_bounded() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("chk.redb");
    let storage = RedbCheckpointStorage::open(&path).unwrap();
    let file = Bytes::from(vec![7u8; 300 << 10]);
    let mut sizes = Vec::new();
    for id in 1..=200u64 {
        for f in 0..2 {
            storage
                .write_file(&format!("chk-{id}/op-{f}.kst"), file.clone())
                .await
                .unwrap();
        }
        storage
            .commit_metadata(CheckpointId(id), Bytes::from_static(b"{}"))
            .await
            .unwrap();
        if id > 3 {
            storage.discard(CheckpointId(id - 3)).await.unwrap();
        }
        sizes.push(std::fs::metadata(&path).unwrap().len());
    }
    let listing = storage.list().await.unwrap();
    assert_eq!(
        listing.iter().map(|c| c.id.0).collect::<Vec<_>>(),
        vec![198, 199, 200]
    );
    let per_checkpoint = 2 * (300u64 << 10);
    let last = *sizes.last().unwrap();
    let at_50 = sizes[49];
    // Bounded: far below 200 checkpoints' worth, and no growth trend after warm-up.
    assert!(
        last < 20 * per_checkpoint,
        "file is {last} bytes after 200 checkpoints of {per_checkpoint}"
    );
    assert!(
        last <= at_50 * 2,
        "file grew from {at_50} (50 checkpoints) to {last} (200)"
    );
}

/// Damages a stored blob the way a disk would: change bytes of the chunk
/// in the file, behind the storage's back.
fn damage_chunk(path: &std::path::Path, file: &str, f: impl Fn(&mut Vec<u8>)) {
    sluice_backend_redb::damage_stored_file(path, file, f).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_or_a_truncated_blob_is_reported_as_corrupt() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("chk.redb");
    {
        let storage = RedbCheckpointStorage::open(&path).unwrap();
        storage
            .write_file("chk-1/flip.kst", Bytes::from(vec![1u8; 5000]))
            .await
            .unwrap();
        storage
            .write_file("chk-1/cut.kst", Bytes::from(vec![2u8; 5000]))
            .await
            .unwrap();
    }
    damage_chunk(&path, "chk-1/flip.kst", |v| v[1234] ^= 0x10);
    damage_chunk(&path, "chk-1/cut.kst", |v| v.truncate(3000));
    let storage = RedbCheckpointStorage::open(&path).unwrap();
    for f in ["chk-1/flip.kst", "chk-1/cut.kst"] {
        match storage.read_file(f).await {
            Err(Error::Corrupt { path, .. }) => assert_eq!(path, f),
            other => panic!("{f}: expected Corrupt, got {other:?}"),
        }
        assert!(matches!(
            storage.read_range(f, 0..10).await,
            Err(Error::Corrupt { .. })
        ));
    }
}

#[test]
fn a_file_that_is_not_a_checkpoint_store_is_refused_and_left_untouched() {
    let dir = tempfile::tempdir().unwrap();
    // Not a redb file at all.
    let text = dir.path().join("notes.txt");
    std::fs::write(&text, b"my precious notes, not a database").unwrap();
    let e = RedbCheckpointStorage::open(&text).unwrap_err();
    assert!(matches!(e, Error::Incompatible { .. }), "{e}");
    assert!(
        e.to_string().contains("notes.txt"),
        "the error names the file: {e}"
    );
    assert!(
        std::fs::read(&text).unwrap() == b"my precious notes, not a database",
        "the text file was modified"
    );

    // A redb database of something else.
    let other = dir.path().join("other.redb");
    {
        let db = Database::create(&other).unwrap();
        let tx = db.begin_write().unwrap();
        tx.open_table(TableDefinition::<&str, &str>::new("users"))
            .unwrap()
            .insert("ann", "admin")
            .unwrap();
        tx.commit().unwrap();
    }
    let before = std::fs::read(&other).unwrap();
    let e = RedbCheckpointStorage::open(&other).unwrap_err();
    assert!(matches!(e, Error::Incompatible { .. }), "{e}");
    assert!(e.to_string().contains("not a Sluice checkpoint store"), "{e}");
    assert!(
        std::fs::read(&other).unwrap() == before,
        "the foreign database was modified"
    );

    // A Sluice store of another format version.
    let newer = dir.path().join("newer.redb");
    {
        let db = Database::create(&newer).unwrap();
        let tx = db.begin_write().unwrap();
        tx.open_table(TableDefinition::<&str, &str>::new("sluice_store"))
            .unwrap()
            .insert("format", "sluice-checkpoints/99")
            .unwrap();
        tx.commit().unwrap();
    }
    let e = RedbCheckpointStorage::open(&newer).unwrap_err();
    assert!(matches!(e, Error::Incompatible { .. }), "{e}");
    assert!(e.to_string().contains("sluice-checkpoints/99"), "{e}");
}

/// Snapshots freeze the write buffer as a layer over redb: every snapshot,
/// taken between puts, deletes and flushes (forced by a small buffer and by
/// the layer limit), must hold exactly the state at its moment, and reads
/// must see the newest value through the layers.
#[test]
fn snapshots_hold_exactly_the_state_at_their_moment_sorted_by_key() {
    use sluice_core::{OperatorUid, StoreScope};
    use std::collections::BTreeMap;
    let dir = tempfile::tempdir().unwrap();
    for buffer in [1 << 20, 2 << 10] {
        let backend = RedbStateBackend::with_config(RedbStateConfig {
            write_buffer_bytes: buffer,
            ..RedbStateConfig::new(dir.path().join(format!("state-{buffer}")))
        })
        .unwrap();
        let range = KeyGroupRange::new(0, 3).unwrap();
        let mut store = backend
            .open_store(&StoreScope {
                job: "j".into(),
                operator: OperatorUid::new("op").unwrap(),
                subtask: 0,
                parallelism: 1,
                max_parallelism: 4,
                key_groups: range,
                track_changes: true,
            })
            .unwrap();
        let (a, b) = (
            store.register_state("a").unwrap(),
            store.register_state("b").unwrap(),
        );
        let mut model: BTreeMap<(u16, u32, Vec<u8>), Vec<u8>> = BTreeMap::new();
        let mut snapshots = Vec::new();
        let mut x: u64 = 7;
        for round in 0..40u64 {
            for _ in 0..50 {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let state = if x >> 63 == 0 { a } else { b };
                let g = ((x >> 20) % 4) as u32;
                let key = ((x >> 30) % 60).to_le_bytes().to_vec();
                if (x >> 40) % 5 == 0 {
                    store.delete(state, g, &key).unwrap();
                    model.remove(&(state, g, key));
                } else {
                    let value = (x >> 8).to_le_bytes().to_vec();
                    store.put(state, g, &key, &value).unwrap();
                    model.insert((state, g, key), value);
                }
            }
            // Reads see the newest value through every layer.
            for ((s, g, k), v) in &model {
                let mut out = Vec::new();
                assert!(store.get(*s, *g, k, &mut out).unwrap());
                assert_eq!(&out, v);
            }
            snapshots.push((store.snapshot(CheckpointId(round + 1)).unwrap(), model.clone()));
        }
        for (i, (snap, want)) in snapshots.iter().enumerate() {
            let mut got: BTreeMap<(u16, u32, Vec<u8>), Vec<u8>> = BTreeMap::new();
            for g in range.iter() {
                // Sorted by (state, key) within a key group: a restore into
                // redb then appends in order instead of inserting at random.
                let mut last: Option<(u16, Vec<u8>)> = None;
                snap.visit_key_group(g, &mut |s, k, v| {
                    assert!(
                        got.insert((s, g, k.to_vec()), v.to_vec()).is_none(),
                        "a key twice"
                    );
                    let this = (s, k.to_vec());
                    assert!(
                        last.as_ref().is_none_or(|l| *l < this),
                        "out of order: {last:?} then {this:?}"
                    );
                    last = Some(this);
                    Ok(())
                })
                .unwrap();
            }
            assert_eq!(&got, want, "snapshot {i} (buffer {buffer})");
        }
    }
}

#[test]
fn with_a_quarter_of_the_keys_changed_the_store_asks_for_a_full_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    testkit::state_full_snapshot_when_most_keys_changed(&RedbStateBackend::new(dir.path()).unwrap());
}
