//! Building blocks for state backends that keep byte-keyed entries in
//! memory: [`ByteMap`] (short keys inline, one hash probe without a pointer
//! to chase), [`EpochChanges`] (change tracking for incremental snapshots:
//! which keys each epoch between two snapshots wrote) and [`ChangedKeys`]
//! (the keys changed since a base, sorted by key group).
//!
//! ```
//! use sluice_core::bytemap::ByteMap;
//!
//! let mut m: ByteMap<u64> = ByteMap::default();
//! *m.get_or_insert_with(b"short", || 0) += 1;
//! *m.get_or_insert_with(&[7u8; 40], || 0) += 2; // a long key
//! assert_eq!(m.get(b"short"), Some(&1));
//! assert_eq!(m.get(&[7u8; 40]), Some(&2));
//! assert_eq!(m.len(), 2);
//! assert_eq!(m.remove(b"short"), Some(1));
//! assert_eq!(m.get(b"short"), None);
//! ```

use crate::heap::{ChangeLog, ShortKey};
use crate::{CheckpointId, StateId};
use rustc_hash::FxHashMap;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

/// A hash map from byte keys to `V`: keys of up to [`ShortKey::MAX`]
/// bytes inline in the table, longer ones boxed.
#[derive(Clone)]
pub struct ByteMap<V> {
    short: FxHashMap<ShortKey, V>,
    long: FxHashMap<Box<[u8]>, V>,
}

impl<V> Default for ByteMap<V> {
    fn default() -> Self {
        ByteMap {
            short: FxHashMap::default(),
            long: FxHashMap::default(),
        }
    }
}

impl<V> ByteMap<V> {
    /// The value of `key`.
    #[inline]
    pub fn get(&self, key: &[u8]) -> Option<&V> {
        if key.len() <= ShortKey::MAX {
            self.short.get(&ShortKey::new(key))
        } else {
            self.long.get(key)
        }
    }

    /// The value of `key`, inserted with `make` if missing.
    #[inline]
    pub fn get_or_insert_with(&mut self, key: &[u8], make: impl FnOnce() -> V) -> &mut V {
        if key.len() <= ShortKey::MAX {
            self.short.entry(ShortKey::new(key)).or_insert_with(make)
        } else if self.long.contains_key(key) {
            // Found: no boxed copy of the key.
            self.long.get_mut(key).expect("the key was just found")
        } else {
            self.long.entry(key.into()).or_insert_with(make)
        }
    }

    /// Removes `key`, returning its value.
    pub fn remove(&mut self, key: &[u8]) -> Option<V> {
        if key.len() <= ShortKey::MAX {
            self.short.remove(&ShortKey::new(key))
        } else {
            self.long.remove(key)
        }
    }

    /// Every entry, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&[u8], &V)> {
        self.short
            .iter()
            .map(|(k, v)| (k.as_slice(), v))
            .chain(self.long.iter().map(|(k, v)| (&k[..], v)))
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.short.len() + self.long.len()
    }

    /// Whether the map is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Change tracking for incremental snapshots: the open epoch's changed
/// keys and the closed epochs', by the snapshot that closed them.
///
/// A store stamps each value with the epoch that last wrote it and calls
/// [`ChangeLog::mark`] on `open` at the first write of a key in an epoch;
/// a snapshot closes the epoch ([`EpochChanges::close`]); an incremental
/// snapshot relative to a base reads the keys of the epochs closed after
/// it ([`EpochChanges::since`]).
pub struct EpochChanges {
    /// The open epoch's number (values written in it carry it; never 0,
    /// the stamp of values written without tracking).
    pub epoch: u64,
    /// The keys changed in the open epoch.
    pub open: ChangeLog,
    /// Epochs by the checkpoint whose snapshot ended them.
    closed: BTreeMap<CheckpointId, Arc<ChangeLog>>,
    /// Snapshots (or the restore) incremental snapshots may be relative to.
    bases: BTreeSet<CheckpointId>,
    /// Keys remembered before tracking gives up.
    max_keys: usize,
}

impl Default for EpochChanges {
    fn default() -> Self {
        EpochChanges::with_max_keys(Self::MAX_KEYS)
    }
}

impl EpochChanges {
    /// Keys remembered before tracking gives up (the base's completion is
    /// overdue): the next snapshot is then full.
    pub const MAX_KEYS: usize = 1 << 26;

    /// Tracking that remembers up to `max_keys` keys of closed epochs
    /// (the default is [`EpochChanges::MAX_KEYS`]).
    pub fn with_max_keys(max_keys: usize) -> Self {
        EpochChanges {
            epoch: 1,
            // Nothing written before the first snapshot is ever asked for
            // (changes are relative to a snapshot): record nothing then.
            open: ChangeLog::with_limit(0),
            closed: BTreeMap::new(),
            bases: BTreeSet::new(),
            max_keys,
        }
    }

    /// Ends the open epoch at snapshot `id`; the next records up to a
    /// quarter of the `stored` keys (beyond, the snapshot after it is full
    /// anyway: see [`EpochChanges::worth_it`]).
    pub fn close(&mut self, id: CheckpointId, stored: usize) {
        self.epoch += 1;
        let next = ChangeLog::with_limit(stored / 4 + 1024);
        self.closed
            .insert(id, Arc::new(std::mem::replace(&mut self.open, next)));
        self.bases.insert(id);
        let kept: usize = self.closed.values().map(|d| d.len()).sum();
        if kept > self.max_keys {
            // Forget everything but this snapshot: later ones are relative to it.
            self.closed.clear();
            self.bases.clear();
            self.bases.insert(id);
        }
    }

    /// Whether an incremental snapshot relative to `base` is possible
    /// (the changes since it are known) and worth it: less than a quarter
    /// of `stored` keys changed (beyond, a full snapshot is not much larger
    /// and cheaper to write).
    pub fn worth_it(&self, base: CheckpointId, stored: usize) -> bool {
        if !self.bases.contains(&base) {
            return false;
        }
        let closed = self.closed.range(base.next()..).map(|(_, e)| e);
        let changed = self.open.len() + closed.clone().map(|e| e.len()).sum::<usize>();
        let overflowed = self.open.overflowed() || closed.clone().any(|e| e.overflowed());
        !overflowed && changed.saturating_mul(4) <= stored
    }

    /// Ends the open epoch at `checkpoint` (as [`EpochChanges::close`])
    /// and returns the epochs since `base` — or `None` when tracking gave
    /// up while closing (more than its maximum of keys kept): the caller
    /// then takes a full snapshot instead.
    pub fn close_since(
        &mut self,
        base: CheckpointId,
        checkpoint: CheckpointId,
        stored: usize,
    ) -> Option<Vec<Arc<ChangeLog>>> {
        self.close(checkpoint, stored);
        self.bases.contains(&base).then(|| self.since(base, checkpoint))
    }

    /// The epochs closed after `base` up to `checkpoint` (shared, not
    /// copied).
    pub fn since(&self, base: CheckpointId, checkpoint: CheckpointId) -> Vec<Arc<ChangeLog>> {
        self.closed
            .range(base.next()..=checkpoint)
            .map(|(_, e)| e.clone())
            .collect()
    }

    /// The oldest snapshot an incremental snapshot may still be relative
    /// to (`None`: none yet, so no change recorded now will be asked for).
    pub fn oldest_base(&self) -> Option<CheckpointId> {
        self.bases.first().copied()
    }

    /// `checkpoint` completed: later incremental snapshots are relative to
    /// it or newer.
    pub fn complete(&mut self, checkpoint: CheckpointId) {
        self.closed = self.closed.split_off(&checkpoint.next());
        self.bases = self.bases.split_off(&checkpoint);
    }

    /// The store was restored from `checkpoint`: the restore's writes are
    /// the base, not changes; tracking starts over in a new epoch.
    pub fn restored(&mut self, checkpoint: CheckpointId) {
        let epoch = self.epoch;
        *self = EpochChanges::default();
        self.epoch = epoch + 1;
        // Changes from here on are relative to the restored checkpoint.
        self.open = ChangeLog::default();
        self.bases.insert(checkpoint);
    }
}

/// The keys changed in some epochs, sorted by (key group, state, key) and
/// deduplicated.
pub struct ChangedKeys {
    short: Vec<(u32, StateId, ShortKey)>,
    long: Vec<(u32, StateId, Box<[u8]>)>,
}

impl ChangedKeys {
    /// The keys of `epochs`.
    pub fn of(epochs: &[Arc<ChangeLog>]) -> Self {
        let mut short = by_key_group(epochs);
        // Then each key group on its own: small sorts that stay in cache.
        for group in short.chunk_by_mut(|a, b| a.0 == b.0) {
            group.sort_unstable_by_key(|(_, s, k)| (*s, k.ordered_words()));
        }
        short.dedup_by(|a, b| (a.0, a.1, a.2) == (b.0, b.1, b.2));
        let mut long: Vec<(u32, StateId, Box<[u8]>)> =
            epochs.iter().flat_map(|e| e.long.iter().cloned()).collect();
        long.sort_unstable();
        long.dedup();
        ChangedKeys { short, long }
    }

    /// The changed keys of `key_group`, as (state, key): short keys first,
    /// then long ones.
    pub fn of_group(&self, key_group: u32) -> impl Iterator<Item = (StateId, &[u8])> {
        let short = {
            let from = self.short.partition_point(|e| e.0 < key_group);
            let to = self.short.partition_point(|e| e.0 <= key_group);
            self.short[from..to].iter().map(|(_, s, k)| (*s, k.as_slice()))
        };
        let long = {
            let from = self.long.partition_point(|e| e.0 < key_group);
            let to = self.long.partition_point(|e| e.0 <= key_group);
            self.long[from..to].iter().map(|(_, s, k)| (*s, &k[..]))
        };
        short.chain(long)
    }
}

/// The short keys of `epochs` ordered by key group (a counting sort: one
/// pass to count, one to place), not yet within a key group.
fn by_key_group(epochs: &[Arc<ChangeLog>]) -> Vec<(u32, StateId, ShortKey)> {
    let all = || epochs.iter().flat_map(|e| e.short.iter());
    let Some((lo, hi)) = all().fold(None, |r: Option<(u32, u32)>, e| {
        Some(r.map_or((e.0, e.0), |(lo, hi)| (lo.min(e.0), hi.max(e.0))))
    }) else {
        return Vec::new();
    };
    let span = (hi - lo) as usize + 1;
    if span > 1 << 16 {
        // Key groups are at most 2^15; anything wider is sorted whole.
        let mut v: Vec<_> = all().copied().collect();
        v.sort_unstable_by_key(|e| e.0);
        return v;
    }
    let mut starts = vec![0usize; span + 1];
    for e in all() {
        starts[(e.0 - lo) as usize + 1] += 1;
    }
    for i in 1..starts.len() {
        starts[i] += starts[i - 1];
    }
    let mut out = vec![(0u32, 0 as StateId, ShortKey::new(&[])); starts[span]];
    for e in all() {
        let at = &mut starts[(e.0 - lo) as usize];
        out[*at] = *e;
        *at += 1;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn changes_since_a_base_are_the_later_epochs_keys_once_each() {
        let mut c = EpochChanges::default();
        c.open.mark(3, 0, b"a");
        c.close(CheckpointId(1), 100);
        c.open.mark(3, 0, b"b");
        c.open.mark(3, 0, b"b");
        c.open.mark(2, 1, &[9u8; 30]);
        c.close(CheckpointId(2), 100);
        assert!(c.worth_it(CheckpointId(1), 100));
        assert!(!c.worth_it(CheckpointId(1), 3), "more than a quarter changed");
        assert!(!c.worth_it(CheckpointId(7), 100), "not a base");
        let keys = ChangedKeys::of(&c.since(CheckpointId(1), CheckpointId(2)));
        assert_eq!(keys.of_group(3).collect::<Vec<_>>(), vec![(0, &b"b"[..])]);
        assert_eq!(keys.of_group(2).collect::<Vec<_>>(), vec![(1, &[9u8; 30][..])]);
        c.complete(CheckpointId(2));
        assert!(!c.worth_it(CheckpointId(1), 100), "subsumed");
        c.restored(CheckpointId(5));
        assert!(c.worth_it(CheckpointId(5), 100));
        assert!(c.epoch > 3, "a restore starts a new epoch");
    }

    #[test]
    fn changed_keys_are_sorted_by_key_group_state_and_bytes_once_each() {
        // Several epochs with repeated keys of 0 to 23 bytes (short) and a
        // few long ones, over a narrow and over a very wide range of key
        // groups, against a sort of everything by (key group, state, bytes).
        for spread in [40u32, 1 << 20] {
            let mut x = u64::from(spread);
            let mut rnd = move || {
                x = x
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                x >> 33
            };
            let epochs: Vec<Arc<ChangeLog>> = (0..3)
                .map(|_| {
                    let mut log = ChangeLog::default();
                    for _ in 0..3000 {
                        let g = 1000 + (rnd() as u32 % 40) * (spread / 40);
                        let s = (rnd() % 3) as StateId;
                        let len = (rnd() % 26) as usize;
                        let key: Vec<u8> = (0..len).map(|_| (rnd() % 4) as u8).collect();
                        log.mark(g, s, &key);
                    }
                    Arc::new(log)
                })
                .collect();
            let mut want: Vec<(u32, StateId, Vec<u8>)> = epochs
                .iter()
                .flat_map(|e| {
                    e.short
                        .iter()
                        .map(|(g, s, k)| (*g, *s, k.as_slice().to_vec()))
                        .chain(e.long.iter().map(|(g, s, k)| (*g, *s, k.to_vec())))
                })
                .collect();
            want.sort();
            want.dedup();
            let keys = ChangedKeys::of(&epochs);
            let mut groups: Vec<u32> = want.iter().map(|w| w.0).collect();
            groups.dedup();
            let mut got = Vec::new();
            for g in groups {
                // Per key group: short keys sorted, then long ones sorted.
                let mut short = Vec::new();
                let mut long = Vec::new();
                for (s, k) in keys.of_group(g) {
                    if k.len() <= ShortKey::MAX {
                        assert!(long.is_empty(), "a short key after a long one");
                        short.push((g, s, k.to_vec()));
                    } else {
                        long.push((g, s, k.to_vec()));
                    }
                }
                assert!(short.windows(2).all(|w| w[0] < w[1]), "group {g} short keys");
                assert!(long.windows(2).all(|w| w[0] < w[1]), "group {g} long keys");
                got.extend(short);
                got.extend(long);
            }
            got.sort();
            assert_eq!(got, want, "spread {spread}");
            assert!(want.len() > 1000, "{} keys", want.len());
        }
    }

    #[test]
    fn tracking_that_gives_up_while_closing_asks_for_a_full_snapshot() {
        let mut c = EpochChanges::with_max_keys(3);
        c.close(CheckpointId(1), 1000);
        for k in 0..4u32 {
            c.open.mark(0, 0, &k.to_be_bytes());
        }
        assert!(
            c.worth_it(CheckpointId(1), 1000),
            "few keys changed, before closing"
        );
        // Closing keeps 4 keys, more than 3: everything before is forgotten.
        assert!(c.close_since(CheckpointId(1), CheckpointId(2), 1000).is_none());
        c.open.mark(0, 0, b"k");
        let since2 = c
            .close_since(CheckpointId(2), CheckpointId(3), 1000)
            .expect("2 is a base");
        assert_eq!(ChangedKeys::of(&since2).of_group(0).count(), 1);
    }
}
