//! The state-backend part of the conformance suite.

use super::MAX_PARALLELISM;
use crate::format::{decode_snapshot, encode_snapshot, read_key_groups, verify_snapshot_file};
use crate::{
    key_group_for_key, CheckpointId, CheckpointStorage, CheckpointStorageExt, KeyGroupRange, KeyedStateStore,
    OperatorUid, StateBackend, StoreScope,
};
use std::collections::BTreeMap;

/// A scope for one subtask of operator `suite` owning `range`.
pub fn scope(range: KeyGroupRange, subtask: u32, parallelism: u32) -> StoreScope {
    StoreScope {
        job: "testkit".into(),
        operator: OperatorUid("suite".into()),
        subtask,
        parallelism,
        max_parallelism: MAX_PARALLELISM,
        key_groups: range,
        track_changes: true,
    }
}

fn open(backend: &dyn StateBackend, range: KeyGroupRange) -> Box<dyn KeyedStateStore> {
    backend.open_store(&scope(range, 0, 1)).expect("open_store")
}

fn get(store: &mut dyn KeyedStateStore, state: u16, kg: u32, key: &[u8]) -> Option<Vec<u8>> {
    let mut out = b"garbage that get must clear".to_vec();
    let found = store.get(state, kg, key, &mut out).expect("get");
    if found {
        Some(out)
    } else {
        assert!(out.is_empty(), "get of a missing key must leave the buffer empty");
        None
    }
}

fn scan(store: &mut dyn KeyedStateStore, state: u16, kg: u32, prefix: &[u8]) -> BTreeMap<Vec<u8>, Vec<u8>> {
    let mut m = BTreeMap::new();
    store
        .scan_prefix(state, kg, prefix, &mut |k, v| {
            m.insert(k.to_vec(), v.to_vec());
            Ok(())
        })
        .expect("scan_prefix");
    m
}

/// Puts, gets, overwrites, deletes and prefix scans across several states
/// and key groups; states and key groups do not see each other's entries.
pub async fn state_put_get_delete_scan(backend: &dyn StateBackend) {
    let mut store = open(backend, KeyGroupRange::all(MAX_PARALLELISM));
    let a = store.register_state("a").expect("register a");
    let b = store.register_state("b").expect("register b");
    assert_ne!(a, b, "two states get two ids");
    assert_eq!(
        store.register_state("a").expect("register a again"),
        a,
        "registering again finds the id"
    );
    store.put(a, 3, b"k1", b"v1").unwrap();
    store.put(a, 3, b"k2", b"v2").unwrap();
    store.put(a, 4, b"k1", b"other group").unwrap();
    store.put(b, 3, b"k1", b"other state").unwrap();
    assert_eq!(get(store.as_mut(), a, 3, b"k1").as_deref(), Some(&b"v1"[..]));
    assert_eq!(
        get(store.as_mut(), a, 4, b"k1").as_deref(),
        Some(&b"other group"[..])
    );
    assert_eq!(
        get(store.as_mut(), b, 3, b"k1").as_deref(),
        Some(&b"other state"[..])
    );
    assert_eq!(get(store.as_mut(), b, 3, b"k2"), None, "states are separate");
    store
        .put(a, 3, b"k1", b"a much longer value than before")
        .unwrap();
    assert_eq!(
        get(store.as_mut(), a, 3, b"k1").as_deref(),
        Some(&b"a much longer value than before"[..])
    );
    store.put(a, 3, b"k1", b"s").unwrap();
    assert_eq!(
        get(store.as_mut(), a, 3, b"k1").as_deref(),
        Some(&b"s"[..]),
        "overwrite with a shorter value"
    );
    store.delete(a, 3, b"k2").unwrap();
    assert_eq!(get(store.as_mut(), a, 3, b"k2"), None, "deleted");
    store
        .delete(a, 3, b"never there")
        .expect("deleting a missing key is not an error");
    for i in 0..50u8 {
        store.put(a, 9, &[b'p', i % 3, i], &[i]).unwrap();
    }
    store.put(a, 9, b"q", b"x").unwrap();
    let m = scan(store.as_mut(), a, 9, &[b'p', 1]);
    assert_eq!(
        m.len(),
        (0..50u8).filter(|i| i % 3 == 1).count(),
        "prefix scan finds exactly the prefix"
    );
    assert!(m.iter().all(|(k, v)| k[1] == 1 && v[0] == k[2]));
    assert_eq!(
        scan(store.as_mut(), a, 9, b"").len(),
        51,
        "empty prefix scans the whole key group"
    );
    assert!(
        scan(store.as_mut(), a, 10, b"").is_empty(),
        "other key group is empty"
    );
    store.put(a, 5, b"", b"empty key").unwrap();
    assert_eq!(
        get(store.as_mut(), a, 5, b"").as_deref(),
        Some(&b"empty key"[..]),
        "empty keys work"
    );
    store.put(a, 5, b"empty value", b"").unwrap();
    assert_eq!(
        get(store.as_mut(), a, 5, b"empty value").as_deref(),
        Some(&b""[..]),
        "empty values exist"
    );
}

fn snapshot_entries(snap: &dyn crate::StateSnapshot) -> BTreeMap<(String, u32, Vec<u8>), Vec<u8>> {
    let names = snap.state_names();
    let mut m = BTreeMap::new();
    for kg in snap.key_groups().iter() {
        snap.visit_key_group(kg, &mut |s, k, v| {
            m.insert((names[s as usize].clone(), kg, k.to_vec()), v.to_vec());
            Ok(())
        })
        .expect("visit_key_group");
    }
    m
}

/// A snapshot shows exactly the state at the synchronous step while writes,
/// overwrites and deletes go on, also after being encoded and decoded.
pub async fn state_snapshot_isolation(backend: &dyn StateBackend) {
    let range = KeyGroupRange::new(10, 20).unwrap();
    let mut store = open(backend, range);
    let s = store.register_state("s").unwrap();
    let mut expected = BTreeMap::new();
    for i in 0..500u32 {
        let kg = 10 + i % 11;
        let key = i.to_le_bytes();
        store.put(s, kg, &key, &(i * 2).to_le_bytes()).unwrap();
        expected.insert(
            ("s".to_string(), kg, key.to_vec()),
            (i * 2).to_le_bytes().to_vec(),
        );
    }
    let snap = store.snapshot(CheckpointId(1)).expect("snapshot");
    // Writes after the synchronous step.
    let t = store.register_state("t").unwrap();
    for i in 0..500u32 {
        let kg = 10 + i % 11;
        let key = i.to_le_bytes();
        match i % 3 {
            0 => store.put(s, kg, &key, b"changed").unwrap(),
            1 => store.delete(s, kg, &key).unwrap(),
            _ => store.put(s, kg, &(i + 10_000).to_le_bytes(), b"new").unwrap(),
        }
        store.put(t, kg, &key, b"new state").unwrap();
    }
    assert_eq!(snap.key_groups(), range);
    assert_eq!(
        snapshot_entries(snap.as_ref()),
        expected,
        "the snapshot changed after later writes"
    );
    let encoded = encode_snapshot(snap.as_ref()).expect("encode");
    assert_eq!(encoded.entries, 500);
    let mut decoded = BTreeMap::new();
    decode_snapshot("isolation", &encoded.bytes, range, &mut |n, kg, k, v| {
        decoded.insert((n.to_string(), kg, k.to_vec()), v.to_vec());
        Ok(())
    })
    .expect("decode");
    assert_eq!(decoded, expected, "encoded snapshot differs");
    // The live store has the new view.
    assert_eq!(
        get(store.as_mut(), s, 10, &0u32.to_le_bytes()).as_deref(),
        Some(&b"changed"[..])
    );
    assert_eq!(get(store.as_mut(), s, 11, &1u32.to_le_bytes()), None);
}

/// Snapshot of a store covering every key group, written to `storage` in
/// the canonical format, restored into stores of parallelism 1, 3 and 4:
/// each gets exactly the keys of its key groups.
pub async fn state_restore_by_key_group_range(backend: &dyn StateBackend, storage: &dyn CheckpointStorage) {
    let id = CheckpointId(1050);
    let _ = storage.discard(id).await;
    let all = KeyGroupRange::all(MAX_PARALLELISM);
    let mut store = open(backend, all);
    let sum = store.register_state("sum").unwrap();
    let names = store.register_state("names").unwrap();
    let mut expected: BTreeMap<(String, u32, Vec<u8>), Vec<u8>> = BTreeMap::new();
    for i in 0..2000u64 {
        let key = i.to_be_bytes();
        let kg = key_group_for_key(&key, MAX_PARALLELISM);
        store.put(sum, kg, &key, &(i * 3).to_le_bytes()).unwrap();
        expected.insert(("sum".into(), kg, key.to_vec()), (i * 3).to_le_bytes().to_vec());
        if i % 5 == 0 {
            store.put(names, kg, &key, format!("n{i}").as_bytes()).unwrap();
            expected.insert(("names".into(), kg, key.to_vec()), format!("n{i}").into_bytes());
        }
    }
    let snap = store.snapshot(id).unwrap();
    let enc = encode_snapshot(snap.as_ref()).unwrap();
    let path = format!("{}/suite-0.kst", id.dir());
    storage
        .write_file(&path, enc.bytes.clone())
        .await
        .expect("write state file");
    let file = enc.handle(path.clone());
    verify_snapshot_file(&path, &storage.read_file(&path).await.unwrap(), file.crc32)
        .expect("whole-file crc");
    for parallelism in [1u32, 3, 4] {
        let mut restored: BTreeMap<(String, u32, Vec<u8>), Vec<u8>> = BTreeMap::new();
        for subtask in 0..parallelism {
            let range = KeyGroupRange::for_subtask(MAX_PARALLELISM, parallelism, subtask);
            let mut target = backend.open_store(&scope(range, subtask, parallelism)).unwrap();
            let mut ids = BTreeMap::new();
            let n = read_key_groups(storage, &file, range, &mut |name, kg, k, v| {
                assert!(
                    range.contains(kg),
                    "restore visited key group {kg} outside {range}"
                );
                let id = match ids.get(name) {
                    Some(id) => *id,
                    None => {
                        let id = target.register_state(name)?;
                        ids.insert(name.to_string(), id);
                        id
                    }
                };
                target.put(id, kg, k, v)
            })
            .await
            .expect("read_key_groups");
            let mut count = 0;
            for ((name, kg, key), value) in expected.iter().filter(|((_, kg, _), _)| range.contains(*kg)) {
                let id = ids[name];
                assert_eq!(
                    get(target.as_mut(), id, *kg, key).as_ref(),
                    Some(value),
                    "p={parallelism} subtask {subtask}"
                );
                count += 1;
                restored.insert((name.clone(), *kg, key.clone()), value.clone());
            }
            assert_eq!(n, count, "restore of {range} read entries of other key groups");
        }
        assert_eq!(
            restored, expected,
            "parallelism {parallelism}: some entries were not restored"
        );
    }
    storage.discard(id).await.unwrap();
}

/// Values of 1 MiB and empty values survive a snapshot round trip.
pub async fn state_large_values(backend: &dyn StateBackend) {
    let range = KeyGroupRange::new(0, 1).unwrap();
    let mut store = open(backend, range);
    let s = store.register_state("big").unwrap();
    let big: Vec<u8> = (0..1 << 20).map(|i: u32| (i * 7 % 251) as u8).collect();
    store.put(s, 0, b"big", &big).unwrap();
    store.put(s, 1, b"empty", b"").unwrap();
    assert_eq!(get(store.as_mut(), s, 0, b"big").as_deref(), Some(&big[..]));
    let enc = encode_snapshot(store.snapshot(CheckpointId(2)).unwrap().as_ref()).unwrap();
    let mut seen = BTreeMap::new();
    decode_snapshot("large", &enc.bytes, range, &mut |_, _, k, v| {
        seen.insert(k.to_vec(), v.to_vec());
        Ok(())
    })
    .unwrap();
    assert_eq!(seen.get(&b"big"[..]), Some(&big));
    assert_eq!(seen.get(&b"empty"[..]), Some(&Vec::new()));
}

/// Runs every state-backend test.
pub async fn run_state_backend_suite(backend: &dyn StateBackend, storage: &dyn CheckpointStorage) {
    state_put_get_delete_scan(backend).await;
    state_snapshot_isolation(backend).await;
    state_restore_by_key_group_range(backend, storage).await;
    state_large_values(backend).await;
    state_changes_since_a_base(backend).await;
    state_bulk_load(backend).await;
}

/// [`KeyedStateStore::load`]: a batch's later entry of a key wins (a put
/// or a deletion), a later batch wins over an earlier one and over earlier
/// puts, deletions of missing keys are fine, and an entry outside the
/// store's key groups is refused.
pub async fn state_bulk_load(backend: &dyn StateBackend) {
    let range = KeyGroupRange::new(0, 63).unwrap();
    let mut store = open(backend, range);
    let a = store.register_state("a").unwrap();
    let b = store.register_state("b").unwrap();
    let mut model: BTreeMap<(String, u32, Vec<u8>), Vec<u8>> = BTreeMap::new();
    let name = |s: u16| if s == a { "a" } else { "b" }.to_string();
    let mut batch = crate::LoadBatch::new();
    // Rounds: into the empty store (key groups 0..32), then into key
    // groups 32..64 of one state only (after everything stored), then over everything
    // after puts that are still buffered.
    for (round, groups) in [(0u32, 0..32u32), (1, 32..64), (2, 0..64)] {
        if round == 2 {
            for i in 0..50u32 {
                store.put(a, i % 64, &i.to_be_bytes(), b"early").unwrap();
                model.insert((name(a), i % 64, i.to_be_bytes().to_vec()), b"early".to_vec());
            }
        }
        batch.clear();
        // Reverse order, so that the store must sort.
        for i in (0..3000u32).rev() {
            // Round 1 writes state `b` alone: nothing stored lies between its keys.
            let state = if round == 1 || i % 3 == 0 { b } else { a };
            let (kg, key) = (i % 64, i.to_be_bytes());
            if !groups.contains(&kg) {
                continue;
            }
            let value = format!("v{i}-{round}").into_bytes();
            batch.push(state, kg, &key, Some(&value));
            if i % 7 == 0 {
                // A later deletion of the same key wins.
                batch.push(state, kg, &key, None);
                model.remove(&(name(state), kg, key.to_vec()));
            } else if i % 11 == 0 {
                // A later put wins over the earlier one.
                batch.push(state, kg, &key, Some(b"later"));
                model.insert((name(state), kg, key.to_vec()), b"later".to_vec());
            } else {
                model.insert((name(state), kg, key.to_vec()), value);
            }
        }
        batch.push(b, groups.start, b"never-written", None);
        store.load(&batch).expect("load");
        for ((n, kg, key), value) in &model {
            let s = if n == "a" { a } else { b };
            assert_eq!(
                get(store.as_mut(), s, *kg, key).as_ref(),
                Some(value),
                "round {round}: {n} {kg} {key:?}"
            );
        }
        let snap = store.snapshot(CheckpointId(u64::from(round) + 1)).unwrap();
        assert_eq!(
            snapshot_entries(snap.as_ref()),
            model,
            "the snapshot after round {round}"
        );
    }
    let mut outside = crate::LoadBatch::new();
    outside.push(a, 64, b"k", Some(b"v"));
    assert!(store.load(&outside).is_err(), "key group 64 is outside {range}");
}

type Changes = BTreeMap<(String, u32, Vec<u8>), Option<Vec<u8>>>;

fn change_entries(c: &dyn crate::ChangeSnapshot) -> Changes {
    let names = c.state_names();
    let mut m = BTreeMap::new();
    for kg in c.key_groups().iter() {
        c.visit_key_group(kg, &mut |s, k, v| {
            let fresh = m
                .insert((names[s as usize].clone(), kg, k.to_vec()), v.map(<[u8]>::to_vec))
                .is_none();
            assert!(fresh, "a key changed twice in one changes snapshot");
            Ok(())
        })
        .expect("visit_key_group");
    }
    m
}

/// `full` with `changes` applied (a write replaces, `None` deletes).
fn apply(
    mut full: BTreeMap<(String, u32, Vec<u8>), Vec<u8>>,
    changes: &Changes,
) -> BTreeMap<(String, u32, Vec<u8>), Vec<u8>> {
    for (k, v) in changes {
        match v {
            Some(v) => full.insert(k.clone(), v.clone()),
            None => full.remove(k),
        };
    }
    full
}

/// Incremental snapshots: the changes since a base are exactly the keys
/// written or deleted since, with their values at the new snapshot, and the
/// base plus the changes is the new snapshot — relative to the previous
/// snapshot or an older one not yet completed, also with a state registered
/// after the base and keys deleted then written again. A completed
/// checkpoint makes older bases unknown (`None`); a restored store's
/// changes start at the restore; a store that does not track changes
/// answers `None`.
pub async fn state_changes_since_a_base(backend: &dyn StateBackend) {
    let range = KeyGroupRange::new(0, 3).unwrap();
    let mut store = open(backend, range);
    let a = store.register_state("a").unwrap();
    let key = |i: u32| format!("key-{i}").into_bytes();
    for i in 0..40u32 {
        store.put(a, i % 4, &key(i), &i.to_le_bytes()).unwrap();
    }
    let base = snapshot_entries(store.snapshot(CheckpointId(1)).unwrap().as_ref());
    // Epoch 2: an overwrite, a deletion, a new key, a delete-then-write, a
    // write of the same value, and a new state with a long key.
    store.put(a, 1, &key(1), b"one").unwrap();
    store.delete(a, 2, &key(2)).unwrap();
    store.put(a, 3, &key(43), b"new").unwrap();
    store.delete(a, 3, &key(3)).unwrap();
    store.put(a, 3, &key(3), b"back").unwrap();
    store.put(a, 0, &key(4), &4u32.to_le_bytes()).unwrap();
    let b = store.register_state("b").unwrap();
    store.put(b, 0, &[7u8; 40], b"long key").unwrap();
    let changes = change_entries(
        store
            .snapshot_changes(CheckpointId(2), CheckpointId(1))
            .unwrap()
            .expect("a tracking store knows its last snapshot")
            .as_ref(),
    );
    let at2 = snapshot_entries(store.snapshot(CheckpointId(102)).unwrap().as_ref());
    assert_eq!(
        apply(base.clone(), &changes),
        at2,
        "base + changes = the state at 2"
    );
    assert_eq!(
        changes.get(&("a".into(), 2, key(2))),
        Some(&None),
        "a deletion is a tombstone"
    );
    assert!(
        !changes.contains_key(&("a".into(), 1, key(5))),
        "an untouched key is not a change"
    );
    assert_eq!(
        changes.len(),
        6,
        "exactly the keys written or deleted: {changes:?}"
    );
    // Epoch 3 (2 not completed): changes since 1 include epoch 2's.
    store.delete(a, 1, &key(1)).unwrap();
    store.put(a, 2, &key(6), b"six").unwrap();
    let since1 = change_entries(
        store
            .snapshot_changes(CheckpointId(3), CheckpointId(1))
            .unwrap()
            .expect("an older base not yet forgotten")
            .as_ref(),
    );
    let at3 = snapshot_entries(store.snapshot(CheckpointId(103)).unwrap().as_ref());
    assert_eq!(
        apply(base, &since1),
        at3,
        "base 1 + changes since 1 = the state at 3"
    );
    assert_eq!(since1.get(&("a".into(), 1, key(1))), Some(&None));
    // 3 completes: changes are relative to 3 or newer from now on.
    store.checkpoint_complete(CheckpointId(3));
    store.put(a, 0, &key(8), b"eight").unwrap();
    assert!(
        store
            .snapshot_changes(CheckpointId(4), CheckpointId(1))
            .unwrap()
            .is_none(),
        "a base older than a completed checkpoint is forgotten"
    );
    let at4 = snapshot_entries(store.snapshot(CheckpointId(4)).unwrap().as_ref());
    store.put(a, 0, &key(9), b"nine").unwrap();
    let since4 = change_entries(
        store
            .snapshot_changes(CheckpointId(5), CheckpointId(4))
            .unwrap()
            .expect("a full snapshot is a base")
            .as_ref(),
    );
    assert_eq!(since4.len(), 1, "{since4:?}");
    let at5 = snapshot_entries(store.snapshot(CheckpointId(105)).unwrap().as_ref());
    assert_eq!(apply(at4, &since4), at5);
    // A restored store: the restore's writes are the base.
    let mut restored = open(backend, range);
    let a = restored.register_state("a").unwrap();
    for i in 0..10u32 {
        restored.put(a, i % 4, &key(i), b"restored").unwrap();
    }
    restored.restored(CheckpointId(10));
    restored.put(a, 1, &key(1), b"after").unwrap();
    let after = change_entries(
        restored
            .snapshot_changes(CheckpointId(11), CheckpointId(10))
            .unwrap()
            .expect("changes since the restore")
            .as_ref(),
    );
    assert_eq!(
        after.len(),
        1,
        "only what was written after the restore: {after:?}"
    );
    // Without tracking there are no changes to give.
    let mut plain = backend
        .open_store(&StoreScope {
            track_changes: false,
            ..scope(range, 0, 1)
        })
        .expect("open_store");
    let p = plain.register_state("a").unwrap();
    plain.put(p, 0, b"k", b"v").unwrap();
    let _ = plain.snapshot(CheckpointId(1)).unwrap();
    plain.put(p, 0, b"k", b"w").unwrap();
    assert!(plain
        .snapshot_changes(CheckpointId(2), CheckpointId(1))
        .unwrap()
        .is_none());
}

/// Optional behaviour of a change-tracking store, which both built-in
/// backends have: with half of the keys changed since the base,
/// `snapshot_changes` answers `None` (a full snapshot is not much larger and
/// cheaper to write; the built-in stores switch at about a quarter, as they
/// estimate it); with a tenth, it answers the changes; after the
/// full snapshot the caller then takes, changes are relative to it.
pub fn state_full_snapshot_when_most_keys_changed(backend: &dyn StateBackend) {
    let mut store = open(backend, KeyGroupRange::new(0, 7).unwrap());
    let s = store.register_state("s").unwrap();
    let put = |store: &mut Box<dyn KeyedStateStore>, i: u32, v: &[u8]| {
        store.put(s, i % 8, &i.to_be_bytes(), v).unwrap();
    };
    for i in 0..100 {
        put(&mut store, i, b"v0");
    }
    drop(store.snapshot(CheckpointId(1)).unwrap());
    // 10 of 100 keys: a changes snapshot of exactly those keys.
    for i in 0..10 {
        put(&mut store, i, b"v1");
    }
    let changes = store.snapshot_changes(CheckpointId(2), CheckpointId(1)).unwrap();
    let changes = changes.expect("10 % changed: a changes snapshot");
    let mut n = 0;
    for kg in 0..8 {
        changes
            .visit_key_group(kg, &mut |_, _, v| {
                assert_eq!(v, Some(&b"v1"[..]));
                n += 1;
                Ok(())
            })
            .unwrap();
    }
    assert_eq!(n, 10);
    // 50 of 100: not worth it; the full snapshot the caller takes instead
    // ends the epoch, and later changes are relative to it.
    for i in 0..50 {
        put(&mut store, i, b"v2");
    }
    assert!(store
        .snapshot_changes(CheckpointId(3), CheckpointId(2))
        .unwrap()
        .is_none());
    drop(store.snapshot(CheckpointId(3)).unwrap());
    put(&mut store, 99, b"v3");
    let changes = store
        .snapshot_changes(CheckpointId(4), CheckpointId(3))
        .unwrap()
        .expect("one key changed since the full snapshot");
    let mut seen = Vec::new();
    for kg in 0..8 {
        changes
            .visit_key_group(kg, &mut |_, k, v| {
                seen.push((k.to_vec(), v.map(<[u8]>::to_vec)));
                Ok(())
            })
            .unwrap();
    }
    assert_eq!(seen, vec![(99u32.to_be_bytes().to_vec(), Some(b"v3".to_vec()))]);
}
