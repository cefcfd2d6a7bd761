//! Incremental snapshots of the redb store across buffer flushes: the
//! changes since a base, applied to the base's full snapshot, are exactly
//! the state at the new snapshot — whether a changed key is still in the
//! write buffer, in a kept run of a recent flush, or only in redb (runs
//! dropped by their bound, or none kept), relative to the previous snapshot
//! or an older one not yet completed.

use sluice_backend_redb::{RedbStateBackend, RedbStateConfig};
use sluice_core::{CheckpointId, KeyGroupRange, KeyedStateStore, OperatorUid, StateBackend, StoreScope};
use std::collections::BTreeMap;

type Model = BTreeMap<(u16, u32, Vec<u8>), Vec<u8>>;

/// A store of key groups 0..=3 that tracks changes.
fn open_tracking(backend: &RedbStateBackend) -> Box<dyn KeyedStateStore> {
    backend
        .open_store(&StoreScope {
            job: "j".into(),
            operator: OperatorUid::new("op").unwrap(),
            subtask: 0,
            parallelism: 1,
            max_parallelism: 4,
            key_groups: KeyGroupRange::new(0, 3).unwrap(),
            track_changes: true,
        })
        .unwrap()
}

fn full(store: &mut dyn KeyedStateStore, id: u64) -> Model {
    let snap = store.snapshot(CheckpointId(id)).unwrap();
    let mut m = Model::new();
    for kg in snap.key_groups().iter() {
        snap.visit_key_group(kg, &mut |s, k, v| {
            assert!(m.insert((s, kg, k.to_vec()), v.to_vec()).is_none(), "a key twice");
            Ok(())
        })
        .unwrap();
    }
    m
}

/// `base` with the changes since `base_id` applied, or `None` when the
/// store answers with a full snapshot instead. `meanwhile` runs between
/// taking the snapshot and reading it (writes that flush must not show).
fn with_changes(
    store: &mut dyn KeyedStateStore,
    id: u64,
    base_id: u64,
    base: &Model,
    meanwhile: impl FnOnce(&mut dyn KeyedStateStore),
) -> Option<Model> {
    let changes = store
        .snapshot_changes(CheckpointId(id), CheckpointId(base_id))
        .unwrap()?;
    meanwhile(store);
    let mut m = base.clone();
    let mut seen = std::collections::BTreeSet::new();
    for kg in changes.key_groups().iter() {
        changes
            .visit_key_group(kg, &mut |s, k, v| {
                assert!(seen.insert((s, kg, k.to_vec())), "a key changed twice");
                match v {
                    Some(v) => m.insert((s, kg, k.to_vec()), v.to_vec()),
                    None => m.remove(&(s, kg, k.to_vec())),
                };
                Ok(())
            })
            .unwrap();
    }
    Some(m)
}

#[test]
fn base_plus_changes_is_the_new_snapshot_across_flushes_whatever_runs_are_kept() {
    let dir = tempfile::tempdir().unwrap();
    // (write buffer, flushed runs kept): flushes every few dozen writes with
    // every run kept, with runs dropped by a bound of about one run, with
    // none kept; and a buffer that never flushes.
    for (buffer, runs) in [
        (4 << 10, 64 << 20),
        (4 << 10, 3 << 10),
        (4 << 10, 0),
        (16 << 20, 64 << 20),
    ] {
        let backend = RedbStateBackend::with_config(RedbStateConfig {
            write_buffer_bytes: buffer,
            flushed_runs_bytes: runs,
            ..RedbStateConfig::new(dir.path().join(format!("state-{buffer}-{runs}")))
        })
        .unwrap();
        let mut store = open_tracking(&backend);
        let states = [
            store.register_state("a").unwrap(),
            store.register_state("b").unwrap(),
        ];
        let mut model = Model::new();
        let mut x: u64 = 11;
        let mut rnd = move || {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            x >> 16
        };
        // A state of 2,000 keys; each round changes about 100 of them.
        for i in 0..2000u64 {
            let (s, g) = (states[(i % 2) as usize], (i % 4) as u32);
            let key = i.to_be_bytes().to_vec();
            store.put(s, g, &key, &i.to_le_bytes()).unwrap();
            model.insert((s, g, key), i.to_le_bytes().to_vec());
        }
        // The snapshots that may still be bases (not older than the last
        // completed one), with the state at each.
        let mut bases: BTreeMap<u64, Model> = BTreeMap::new();
        bases.insert(1, full(store.as_mut(), 1));
        assert_eq!(bases[&1], model);
        let mut incremental = 0;
        // Random writes: a tenth of the keys deleted, values of 0 to 8 bytes.
        let mut write = |store: &mut dyn KeyedStateStore, model: &mut Model, n: usize| {
            for _ in 0..n {
                let r = rnd();
                let i = r % 2600;
                let (s, g) = (states[(i % 2) as usize], (i % 4) as u32);
                let key = i.to_be_bytes().to_vec();
                if r % 7 == 0 {
                    store.delete(s, g, &key).unwrap();
                    model.remove(&(s, g, key));
                } else {
                    let value = (r >> 8).to_le_bytes()[..(r % 9) as usize].to_vec();
                    store.put(s, g, &key, &value).unwrap();
                    model.insert((s, g, key), value);
                }
            }
        };
        for id in 2..80u64 {
            write(store.as_mut(), &mut model, 100);
            // Relative to the newest base mostly, sometimes to an older one.
            let base_id = if id % 4 == 0 {
                *bases.keys().next().unwrap()
            } else {
                *bases.keys().next_back().unwrap()
            };
            // The state at the snapshot; the next round's first writes
            // happen before the changes are read.
            let at_snapshot = model.clone();
            let got = match with_changes(store.as_mut(), id, base_id, &bases[&base_id], |st| {
                write(st, &mut model, 30)
            }) {
                Some(m) => {
                    incremental += 1;
                    m
                }
                None => full(store.as_mut(), id),
            };
            let wrong: Vec<_> = at_snapshot
                .keys()
                .chain(got.keys())
                .filter(|k| got.get(*k) != at_snapshot.get(*k))
                .take(3)
                .map(|k| (k, got.get(k), at_snapshot.get(k)))
                .collect();
            assert!(
                wrong.is_empty(),
                "snapshot {id} relative to {base_id} (buffer {buffer}, runs {runs}): (key, got, want) {wrong:?}"
            );
            bases.insert(id, at_snapshot);
            // Now and then the newest or an older snapshot completes.
            if id % 3 == 0 {
                let ids: Vec<u64> = bases.keys().copied().collect();
                let done = ids[(id as usize / 3) % ids.len()];
                store.checkpoint_complete(CheckpointId(done));
                bases = bases.split_off(&done);
            }
        }
        assert!(
            incremental > 60,
            "most snapshots are incremental: {incremental} of 78 (buffer {buffer}, runs {runs})"
        );
    }
}

/// A small write buffer flushes the same few hot keys over and over within
/// one interval: each must be recorded as changed once, so that the
/// checkpoints stay incremental (duplicates once made the change log look
/// larger than a quarter of the keys).
#[test]
fn hot_keys_flushed_again_and_again_keep_checkpoints_incremental() {
    let dir = tempfile::tempdir().unwrap();
    let backend = RedbStateBackend::with_config(RedbStateConfig {
        write_buffer_bytes: 512,
        ..RedbStateConfig::new(dir.path())
    })
    .unwrap();
    let mut store = open_tracking(&backend);
    let s = store.register_state("s").unwrap();
    let mut model = Model::new();
    for i in 0..2000u64 {
        store.put(s, (i % 4) as u32, &i.to_be_bytes(), b"cold").unwrap();
        model.insert((s, (i % 4) as u32, i.to_be_bytes().to_vec()), b"cold".to_vec());
    }
    let mut base = full(store.as_mut(), 1);
    store.checkpoint_complete(CheckpointId(1));
    for id in 2..6u64 {
        // 10 hot keys written 200 times each: about 500 flushes.
        for round in 0..200u64 {
            for i in 0..10u64 {
                let value = (round * id).to_le_bytes().to_vec();
                store.put(s, (i % 4) as u32, &i.to_be_bytes(), &value).unwrap();
                model.insert((s, (i % 4) as u32, i.to_be_bytes().to_vec()), value);
            }
        }
        let got = with_changes(store.as_mut(), id, id - 1, &base, |_| {})
            .unwrap_or_else(|| panic!("checkpoint {id} fell back to a full snapshot"));
        assert_eq!(got, model, "checkpoint {id}");
        store.checkpoint_complete(CheckpointId(id));
        base = got;
    }
}
