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
/// store answers with a full snapshot instead.
fn with_changes(store: &mut dyn KeyedStateStore, id: u64, base_id: u64, base: &Model) -> Option<Model> {
    let changes = store
        .snapshot_changes(CheckpointId(id), CheckpointId(base_id))
        .unwrap()?;
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
        for id in 2..80u64 {
            for _ in 0..100 {
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
            // Relative to the newest base mostly, sometimes to an older one.
            let base_id = if rnd() % 4 == 0 {
                *bases.keys().next().unwrap()
            } else {
                *bases.keys().next_back().unwrap()
            };
            let got = match with_changes(store.as_mut(), id, base_id, &bases[&base_id]) {
                Some(m) => {
                    incremental += 1;
                    m
                }
                None => full(store.as_mut(), id),
            };
            let wrong: Vec<_> = model
                .keys()
                .chain(got.keys())
                .filter(|k| got.get(*k) != model.get(*k))
                .take(3)
                .map(|k| (k, got.get(k), model.get(k)))
                .collect();
            assert!(
                wrong.is_empty(),
                "snapshot {id} relative to {base_id} (buffer {buffer}, runs {runs}): (key, got, want) {wrong:?}"
            );
            bases.insert(id, model.clone());
            // Now and then the newest or an older snapshot completes.
            if rnd() % 3 == 0 {
                let ids: Vec<u64> = bases.keys().copied().collect();
                let done = ids[(rnd() as usize) % ids.len()];
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
