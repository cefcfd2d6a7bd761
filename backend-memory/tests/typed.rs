//! Typed state in the heap backend: values kept as Rust values, the same
//! canonical bytes in snapshots and changes as the byte-level path.

use sluice_backend_memory::MemoryStateBackend;
use sluice_core::heap::{HeapTable, KeyRef, TypedTable};
use sluice_core::{
    ChangeSnapshot, CheckpointId, KeyGroupRange, KeyedStateStore, LoadBatch, OperatorUid, StateBackend,
    StateSnapshot, StoreScope,
};
use std::collections::BTreeMap;

const MAX_P: u32 = 128;

fn store(track_changes: bool) -> Box<dyn KeyedStateStore> {
    MemoryStateBackend::new()
        .open_store(&StoreScope {
            job: "job".into(),
            operator: OperatorUid::new("sum").unwrap(),
            subtask: 0,
            parallelism: 1,
            max_parallelism: MAX_P,
            key_groups: KeyGroupRange::all(MAX_P),
            track_changes,
        })
        .unwrap()
}

fn make_u64(range: KeyGroupRange) -> Box<dyn TypedTable> {
    Box::new(HeapTable::<u64>::new(range, "sum/total".into()))
}

fn make_string(range: KeyGroupRange) -> Box<dyn TypedTable> {
    Box::new(HeapTable::<String>::new(range, "sum/total".into()))
}

fn enc(v: u64) -> Vec<u8> {
    postcard::to_allocvec(&v).unwrap()
}

/// Runs `f` on the value of `key` through the typed table, one probe.
fn update(store: &mut dyn KeyedStateStore, state: u16, key: &[u8], f: impl FnOnce(&mut Option<u64>)) {
    let key = KeyRef::new(key, MAX_P);
    let access = store.typed(state).expect("typed state");
    let table = access
        .table
        .as_any_mut()
        .downcast_mut::<HeapTable<u64>>()
        .expect("a table of u64");
    table.update(&key, access.tracking, f).unwrap();
}

/// Adds `v` to the value of `key`.
fn add(store: &mut dyn KeyedStateStore, state: u16, key: &[u8], v: u64) {
    update(store, state, key, |s| *s.get_or_insert(0) += v);
}

/// Removes `key`.
fn remove(store: &mut dyn KeyedStateStore, state: u16, key: &[u8]) {
    update(store, state, key, |s| *s = None);
}

fn snapshot_entries(store: &mut dyn KeyedStateStore, id: u64) -> BTreeMap<Vec<u8>, Vec<u8>> {
    entries(store.snapshot(CheckpointId(id)).unwrap().as_ref())
}

/// Every entry of `snap`, by key.
fn entries(snap: &dyn StateSnapshot) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut out = BTreeMap::new();
    for g in 0..MAX_P {
        snap.visit_key_group(g, &mut |_, k, v| {
            out.insert(k.to_vec(), v.to_vec());
            Ok(())
        })
        .unwrap();
    }
    out
}

/// Every change of `changes` (all of `state`), each key once.
fn change_entries(changes: &dyn ChangeSnapshot, state: u16) -> BTreeMap<Vec<u8>, Option<Vec<u8>>> {
    let mut seen = BTreeMap::new();
    for g in 0..MAX_P {
        changes
            .visit_key_group(g, &mut |st, k, v| {
                assert_eq!(st, state);
                assert!(
                    seen.insert(k.to_vec(), v.map(<[u8]>::to_vec)).is_none(),
                    "each key once"
                );
                Ok(())
            })
            .unwrap();
    }
    seen
}

#[test]
fn restored_bytes_become_values_and_snapshots_hold_the_same_bytes() {
    let mut s = store(false);
    let id = s.register_state("total").unwrap();
    let mut batch = LoadBatch::new();
    for k in 0..1000u64 {
        let key = enc(k);
        batch.push(id, KeyRef::new(&key, MAX_P).key_group, &key, Some(&enc(k * 10)));
    }
    s.load(&batch).unwrap();
    let before = snapshot_entries(s.as_mut(), 1);
    assert_eq!(before.len(), 1000);

    let typed = s.register_typed("total", &make_u64).unwrap();
    assert_eq!(typed, Some(id), "the restored state keeps its id");
    assert_eq!(
        snapshot_entries(s.as_mut(), 2),
        before,
        "a typed table snapshots the canonical bytes it was restored from"
    );
    add(s.as_mut(), id, &enc(7), 5);
    let after = snapshot_entries(s.as_mut(), 3);
    assert_eq!(after[&enc(7)], enc(75));
    // The byte-level contract reads and writes the same values.
    let kg = KeyRef::new(&enc(7), MAX_P).key_group;
    let mut out = Vec::new();
    assert!(s.get(id, kg, &enc(7), &mut out).unwrap());
    assert_eq!(out, enc(75));
    s.put(id, kg, &enc(7), &enc(1)).unwrap();
    add(s.as_mut(), id, &enc(7), 1);
    assert!(s.get(id, kg, &enc(7), &mut out).unwrap());
    assert_eq!(out, enc(2));
    s.delete(id, kg, &enc(7)).unwrap();
    assert!(!s.get(id, kg, &enc(7), &mut out).unwrap());
    let mut seen = 0;
    s.scan_prefix(id, kg, &[], &mut |_, v| {
        assert!(postcard::from_bytes::<u64>(v).is_ok());
        seen += 1;
        Ok(())
    })
    .unwrap();
    assert!(seen > 0, "key group {kg} holds other restored keys");
}

#[test]
fn a_snapshot_is_not_changed_by_later_typed_updates() {
    let mut s = store(false);
    let id = s.register_typed("total", &make_u64).unwrap().unwrap();
    add(s.as_mut(), id, b"a", 1);
    let snap = s.snapshot(CheckpointId(1)).unwrap();
    add(s.as_mut(), id, b"a", 1);
    add(s.as_mut(), id, b"b", 1);
    assert_eq!(entries(snap.as_ref()), BTreeMap::from([(b"a".to_vec(), enc(1))]));
}

#[test]
fn incremental_changes_of_typed_state_list_writes_and_deletions() {
    let mut s = store(true);
    let id = s.register_typed("total", &make_u64).unwrap().unwrap();
    for k in 0..100u64 {
        add(s.as_mut(), id, &enc(k), k);
    }
    s.snapshot(CheckpointId(1)).unwrap();
    add(s.as_mut(), id, &enc(3), 1);
    add(s.as_mut(), id, &enc(3), 1);
    remove(s.as_mut(), id, &enc(4));
    add(s.as_mut(), id, &enc(500), 9);
    let changes = s
        .snapshot_changes(CheckpointId(2), CheckpointId(1))
        .unwrap()
        .expect("changes since checkpoint 1");
    let seen = change_entries(changes.as_ref(), id);
    assert_eq!(
        seen,
        BTreeMap::from([(enc(3), Some(enc(5))), (enc(4), None), (enc(500), Some(enc(9))),])
    );
}

#[test]
fn a_state_registered_again_with_another_type_is_refused_naming_both() {
    let mut s = store(false);
    s.register_typed("total", &make_u64).unwrap().unwrap();
    let err = s.register_typed("total", &make_string).unwrap_err().to_string();
    assert!(err.contains("u64") && err.contains("String"), "{err}");
}

#[test]
fn restored_bytes_that_do_not_decode_as_the_type_are_an_error_naming_the_state() {
    let mut s = store(false);
    let id = s.register_state("total").unwrap();
    let mut batch = LoadBatch::new();
    // Not a postcard string: a length of 200 with 1 byte after it.
    batch.push(id, 3, b"k", Some(&[200, 1, 1]));
    s.load(&batch).unwrap();
    let err = s.register_typed("total", &make_string).unwrap_err().to_string();
    assert!(err.contains("sum/total") && err.contains("String"), "{err}");
}

#[test]
fn an_epoch_that_changed_most_keys_is_followed_by_a_full_snapshot_then_changes_again() {
    let mut s = store(true);
    let id = s.register_typed("total", &make_u64).unwrap().unwrap();
    for k in 0..10_000u64 {
        add(s.as_mut(), id, &enc(k), 1);
    }
    s.snapshot(CheckpointId(1)).unwrap();
    s.checkpoint_complete(CheckpointId(1));
    // Every key changes: the log stops recording (it would be full anyway).
    for k in 0..10_000u64 {
        add(s.as_mut(), id, &enc(k), 1);
    }
    assert!(
        s.snapshot_changes(CheckpointId(2), CheckpointId(1))
            .unwrap()
            .is_none(),
        "most keys changed: a full snapshot"
    );
    let full = snapshot_entries(s.as_mut(), 2);
    assert_eq!(full.len(), 10_000);
    assert!(full.values().all(|v| *v == enc(2)));
    s.checkpoint_complete(CheckpointId(2));
    // A few changes after that full snapshot are an incremental one again.
    add(s.as_mut(), id, &enc(1), 5);
    let changes = s
        .snapshot_changes(CheckpointId(3), CheckpointId(2))
        .unwrap()
        .expect("few keys changed since checkpoint 2");
    let seen = change_entries(changes.as_ref(), id);
    assert_eq!(seen, BTreeMap::from([(enc(1), Some(enc(7)))]));
}

#[test]
fn a_snapshot_writes_each_key_group_as_it_visits_it_with_byte_and_typed_states() {
    let mut s = store(false);
    let bytes_state = s.register_state("names").unwrap();
    let typed_state = s
        .register_typed("total", &make_u64)
        .unwrap()
        .expect("the heap store keeps typed state");
    for i in 0..2000u64 {
        let key = format!("key-{i}");
        add(s.as_mut(), typed_state, key.as_bytes(), i);
        let kg = KeyRef::new(key.as_bytes(), MAX_P).key_group;
        s.put(bytes_state, kg, key.as_bytes(), &vec![b'v'; (i % 300) as usize])
            .unwrap();
    }
    let snap = s.snapshot(CheckpointId(1)).unwrap();
    let mut entries = 0;
    for kg in 0..MAX_P {
        let mut visited = vec![0xAB];
        let mut n = 0u64;
        snap.visit_key_group(kg, &mut |state, key, value| {
            n += 1;
            sluice_core::format::append_entry(&mut visited, state, key, value);
            Ok(())
        })
        .unwrap();
        let mut written = vec![0xAB];
        assert_eq!(
            snap.append_key_group(kg, &mut written).unwrap(),
            n,
            "key group {kg}"
        );
        assert_eq!(written, visited, "key group {kg}");
        entries += n;
    }
    assert_eq!(entries, 4000);
}
