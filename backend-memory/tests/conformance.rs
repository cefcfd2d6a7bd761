//! The core conformance suite on the memory backend and storage.

use sluice_backend_memory::{MemoryCheckpointStorage, MemoryStateBackend};
use sluice_core::testkit;
use sluice_core::{CheckpointId, KeyGroupRange, StateBackend};

#[tokio::test]
async fn memory_state_backend_passes_the_state_suite() {
    testkit::run_state_backend_suite(&MemoryStateBackend::new(), &MemoryCheckpointStorage::new()).await;
}

#[tokio::test]
async fn memory_checkpoint_storage_passes_the_storage_suite() {
    testkit::run_checkpoint_storage_suite(&MemoryCheckpointStorage::new()).await;
}

#[test]
fn a_write_after_a_snapshot_copies_only_that_key_group_and_leaves_the_snapshot_alone() {
    let backend = MemoryStateBackend::new();
    let mut store = backend
        .open_store(&testkit::scope(KeyGroupRange::new(0, 1).unwrap(), 0, 1))
        .unwrap();
    let s = store.register_state("s").unwrap();
    store.put(s, 0, b"k", b"old").unwrap();
    store.put(s, 1, b"k", b"other").unwrap();
    let snap = store.snapshot(CheckpointId(1)).unwrap();
    store.put(s, 0, b"k", b"new").unwrap();
    store.delete(s, 1, b"k").unwrap();
    let mut seen = Vec::new();
    for kg in 0..2 {
        snap.visit_key_group(kg, &mut |_, k, v| {
            seen.push((kg, k.to_vec(), v.to_vec()));
            Ok(())
        })
        .unwrap();
    }
    assert_eq!(
        seen,
        vec![
            (0, b"k".to_vec(), b"old".to_vec()),
            (1, b"k".to_vec(), b"other".to_vec())
        ]
    );
    let mut out = Vec::new();
    assert!(store.get(s, 0, b"k", &mut out).unwrap());
    assert_eq!(out, b"new");
}

#[test]
fn out_of_range_key_groups_and_unknown_states_are_errors_not_panics() {
    let backend = MemoryStateBackend::new();
    let mut store = backend
        .open_store(&testkit::scope(KeyGroupRange::new(4, 7).unwrap(), 1, 2))
        .unwrap();
    let s = store.register_state("s").unwrap();
    assert!(store.put(s, 8, b"k", b"v").is_err());
    assert!(store.put(s + 1, 5, b"k", b"v").is_err());
    assert!(store.get(s, 3, b"k", &mut Vec::new()).is_err());
}

#[test]
fn with_a_quarter_of_the_keys_changed_the_store_asks_for_a_full_snapshot() {
    testkit::state_full_snapshot_when_most_keys_changed(&MemoryStateBackend::new());
}
