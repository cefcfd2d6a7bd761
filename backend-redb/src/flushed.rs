//! What the write buffer's recent flushes wrote into redb, kept in memory
//! (within a bound) for incremental snapshots.
//!
//! A changes snapshot needs the value of every key changed since its base.
//! A changed key still in the write buffer is read there; one flushed since
//! was read back from redb: a B-tree descent per key, which at 10 M keys
//! made an incremental checkpoint of ~250 K changed keys per subtask take
//! about a second. Each flush now also keeps its entries as one sorted,
//! compact run (about 24 bytes plus the key and value bytes per entry, a
//! quarter of the buffer's cost per entry), and a changes snapshot reads a
//! flushed key from the newest run holding it.
//!
//! The runs only spare lookups: the oldest are dropped first when they
//! exceed their bound, so a key found in a kept run was written by no newer
//! flush outside the kept runs, and a key in no kept run is read from redb
//! as before.

use crate::buffer::Dirty;
use sluice_core::bytemap::ByteMap;
use sluice_core::{KeyGroupRange, StateId};
use std::cmp::Ordering;
use std::collections::VecDeque;
use std::sync::Arc;

/// Marks a deletion in [`RunEntry::value_len`].
const TOMBSTONE: u32 = u32::MAX;

/// One flushed entry: its key and value are `bytes[start..]`.
#[derive(Clone, Copy)]
struct RunEntry {
    start: usize,
    key_len: u32,
    /// [`TOMBSTONE`]: deleted.
    value_len: u32,
    key_group: u32,
    state: StateId,
}

/// The entries of one flush, sorted by (state, key group, key).
pub(crate) struct Run {
    entries: Vec<RunEntry>,
    bytes: Vec<u8>,
}

impl Run {
    /// A run of `dirty`, sorted by (state, key group, key) as a flush
    /// writes them; `None` if it would take more than `max_bytes` or a key
    /// or value is too long to be kept (over 4 GiB): such a flush is not
    /// kept, its keys are read from redb.
    pub fn of(dirty: &[(StateId, u32, &[u8], &Dirty)], max_bytes: usize) -> Option<Run> {
        let size: usize = dirty
            .iter()
            .map(|(_, _, k, d)| k.len() + d.value.as_ref().map_or(0, |v| v.len()))
            .sum();
        if size + dirty.len() * std::mem::size_of::<RunEntry>() > max_bytes {
            return None;
        }
        let mut bytes = Vec::with_capacity(size);
        let mut entries = Vec::with_capacity(dirty.len());
        for (state, key_group, key, d) in dirty {
            let key_len = u32::try_from(key.len()).ok()?;
            let value_len = match &d.value {
                Some(v) => u32::try_from(v.len()).ok().filter(|l| *l != TOMBSTONE)?,
                None => TOMBSTONE,
            };
            entries.push(RunEntry {
                start: bytes.len(),
                key_len,
                value_len,
                key_group: *key_group,
                state: *state,
            });
            bytes.extend_from_slice(key);
            if let Some(v) = &d.value {
                bytes.extend_from_slice(v);
            }
        }
        Some(Run { entries, bytes })
    }

    /// Heap bytes held.
    pub fn heap_bytes(&self) -> usize {
        self.bytes.capacity() + self.entries.capacity() * std::mem::size_of::<RunEntry>()
    }

    fn key(&self, e: &RunEntry) -> &[u8] {
        &self.bytes[e.start..e.start + e.key_len as usize]
    }

    /// The entries of one state's key group (a sorted slice).
    pub fn group(&self, state: StateId, key_group: u32) -> RunGroup<'_> {
        let at = |e: &RunEntry| (e.state, e.key_group).cmp(&(state, key_group));
        let from = self.entries.partition_point(|e| at(e) == Ordering::Less);
        let to = from + self.entries[from..].partition_point(|e| at(e) != Ordering::Greater);
        RunGroup {
            run: self,
            entries: &self.entries[from..to],
            pos: 0,
        }
    }
}

/// The entries of one state's key group in a [`Run`].
pub(crate) struct RunGroup<'a> {
    run: &'a Run,
    entries: &'a [RunEntry],
    /// The cursor of [`seek`](Self::seek): entries before it are below
    /// the key sought last.
    pos: usize,
}

impl<'a> RunGroup<'a> {
    /// `Some(value)` (`None`: deleted) if the run holds `key`.
    #[cfg(test)]
    pub fn get(&self, key: &[u8]) -> Option<Option<&'a [u8]>> {
        let run = self.run;
        let i = self.entries.binary_search_by(|e| run.key(e).cmp(key)).ok()?;
        Some(self.value(i))
    }

    fn value(&self, i: usize) -> Option<&'a [u8]> {
        let e = &self.entries[i];
        (e.value_len != TOMBSTONE).then(|| {
            let from = e.start + e.key_len as usize;
            &self.run.bytes[from..from + e.value_len as usize]
        })
    }

    /// As [`get`](Self::get), from the group's cursor, which the lookup
    /// moves to the first entry not below `key`: keys looked up in
    /// ascending order walk the run once, forwards (galloping over the
    /// entries between them), instead of a binary search of the whole
    /// group per key. A key below the previous one searches from the start.
    pub fn seek(&mut self, key: &[u8]) -> Option<Option<&'a [u8]>> {
        let run = self.run;
        let n = self.entries.len();
        let below = |i: usize| run.key(&self.entries[i]) < key;
        if self.pos > n || (self.pos > 0 && !below(self.pos - 1)) {
            self.pos = 0;
        }
        // Every entry before `lo` is below `key`; `hi` is the end or an
        // entry not below it.
        let (mut lo, mut hi, mut step) = (self.pos, self.pos, 1usize);
        while hi < n && below(hi) {
            lo = hi + 1;
            hi = lo.saturating_add(step).min(n);
            step = step.saturating_mul(2);
        }
        let i = lo + self.entries[lo..hi].partition_point(|e| run.key(e) < key);
        self.pos = i;
        (i < n && run.key(&self.entries[i]) == key).then(|| self.value(i))
    }
}

/// Runs kept at most: a lookup may probe each, so a small write buffer
/// (many small flushes) must not make a changes snapshot probe thousands.
const MAX_RUNS: usize = 32;

/// The kept runs, oldest first, within a bound of heap bytes and of
/// [`MAX_RUNS`]. (A changes snapshot still being written holds the runs
/// it saw, so with one in flight the memory peaks at about twice the
/// bound.)
pub(crate) struct FlushedRuns {
    runs: VecDeque<(u64, Arc<Run>)>,
    bytes: usize,
    max_bytes: usize,
    /// The sequence number the next run gets.
    next: u64,
}

impl FlushedRuns {
    /// Runs kept up to `max_bytes` (0: none).
    pub fn new(max_bytes: usize) -> Self {
        FlushedRuns {
            runs: VecDeque::new(),
            bytes: 0,
            max_bytes,
            next: 0,
        }
    }

    /// Keeps the run of a flush (the newest); drops the oldest runs beyond
    /// the bound. `None` (a flush not kept) drops every older run too: a
    /// kept run must be newer than every dropped one.
    pub fn push(&mut self, run: Option<Run>) {
        self.next += 1;
        let Some(run) = run.filter(|r| r.heap_bytes() <= self.max_bytes) else {
            self.clear();
            return;
        };
        self.bytes += run.heap_bytes();
        self.runs.push_back((self.next - 1, Arc::new(run)));
        while self.bytes > self.max_bytes || self.runs.len() > MAX_RUNS {
            self.pop_oldest();
        }
    }

    fn pop_oldest(&mut self) {
        if let Some((_, r)) = self.runs.pop_front() {
            self.bytes -= r.heap_bytes();
        }
    }

    /// The sequence number of the next flush: a snapshot taken now sees
    /// the runs before it.
    pub fn mark(&self) -> u64 {
        self.next
    }

    /// Drops the runs of the flushes before `mark` (no snapshot that may
    /// still be taken needs them).
    pub fn forget_before(&mut self, mark: u64) {
        while self.runs.front().is_some_and(|(seq, _)| *seq < mark) {
            self.pop_oldest();
        }
    }

    /// Drops every run (a restore: what it loaded is not a change).
    pub fn clear(&mut self) {
        self.runs.clear();
        self.bytes = 0;
    }

    /// The kept runs, newest first (shared: a snapshot's view of them).
    pub fn newest_first(&self) -> Vec<Arc<Run>> {
        self.runs.iter().rev().map(|(_, r)| r.clone()).collect()
    }

    /// Heap bytes held.
    #[cfg(test)]
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

/// The keys the open epoch of change tracking marked as changed that a
/// flush then took out of the write buffer. Written again in the same
/// epoch, such a key finds no entry of that epoch in the buffer; without
/// this set it would be marked again, and a change log full of duplicates
/// looks like more changes than there are (it overflows, or passes a
/// quarter of the keys) and turns incremental checkpoints into full ones.
///
/// Bounded: beyond `max_bytes` (counting each key's bytes and 48 of
/// overhead) no more keys are remembered, and keys written again are
/// marked twice (the change log removes duplicates when it is read; only
/// its size estimate grows).
pub(crate) struct FlushedMarks {
    range: KeyGroupRange,
    /// `[state][key_group - range.start]`.
    groups: Vec<Vec<ByteMap<()>>>,
    len: usize,
    bytes: usize,
    max_bytes: usize,
}

impl FlushedMarks {
    /// An empty set for the key groups `range`, remembering up to
    /// `max_bytes` of keys.
    pub fn new(range: KeyGroupRange, max_bytes: usize) -> Self {
        FlushedMarks {
            range,
            groups: Vec::new(),
            len: 0,
            bytes: 0,
            max_bytes,
        }
    }

    /// Adds a state (the next state id).
    pub fn add_state(&mut self) {
        self.groups
            .push((0..self.range.len()).map(|_| ByteMap::default()).collect());
    }

    fn map(&mut self, state: StateId, key_group: u32) -> Option<&mut ByteMap<()>> {
        let g = key_group.checked_sub(self.range.start)? as usize;
        self.groups.get_mut(state as usize)?.get_mut(g)
    }

    /// Remembers that `key` was marked in the open epoch and flushed
    /// (unless the set is full).
    pub fn insert(&mut self, state: StateId, key_group: u32, key: &[u8]) {
        let size = key.len() + 48;
        if self.bytes + size > self.max_bytes {
            return;
        }
        let mut added = false;
        if let Some(m) = self.map(state, key_group) {
            m.get_or_insert_with(key, || added = true);
        }
        if added {
            self.len += 1;
            self.bytes += size;
        }
    }

    /// Whether `key` was marked in the open epoch and flushed since.
    #[inline]
    pub fn contains(&self, state: StateId, key_group: u32, key: &[u8]) -> bool {
        self.len > 0
            && key_group
                .checked_sub(self.range.start)
                .and_then(|g| self.groups.get(state as usize)?.get(g as usize))
                .is_some_and(|m| m.get(key).is_some())
    }

    /// The open epoch ended: forgets every key.
    pub fn clear(&mut self) {
        if self.len > 0 {
            for m in self.groups.iter_mut().flatten() {
                *m = ByteMap::default();
            }
            self.len = 0;
            self.bytes = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dirty(value: Option<&[u8]>) -> Dirty {
        Dirty {
            value: value.map(smallvec::SmallVec::from_slice),
            epoch: 1,
        }
    }

    #[test]
    fn a_cursor_finds_what_a_search_finds_in_any_order_of_keys() {
        // Every third key of 0..3000 in the run (every 7th a tombstone),
        // looked up ascending (the snapshot's order), descending, in a
        // pseudo-random order, and ascending with gaps, each order through
        // one cursor.
        let d: Vec<(Vec<u8>, Dirty)> = (0..3000u32)
            .filter(|i| i % 3 == 0)
            .map(|i| {
                let v = i.to_le_bytes();
                (i.to_be_bytes().to_vec(), dirty((i % 7 != 0).then_some(&v[..])))
            })
            .collect();
        let entries: Vec<(StateId, u32, &[u8], &Dirty)> = d.iter().map(|(k, v)| (0, 5, &k[..], v)).collect();
        let run = Run::of(&entries, usize::MAX).unwrap();
        let mut x = 12345u64;
        let random: Vec<u32> = (0..5000)
            .map(|_| {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
                (x >> 33) as u32 % 3100
            })
            .collect();
        let orders: [Vec<u32>; 4] = [
            (0..3100).collect(),
            (0..3100).rev().collect(),
            random,
            (0..3100).step_by(97).collect(),
        ];
        let mut found = 0;
        for order in orders {
            let mut cursor = run.group(0, 5);
            for i in order {
                let k = i.to_be_bytes();
                let want = run.group(0, 5).get(&k);
                assert_eq!(cursor.seek(&k), want, "key {i}");
                found += usize::from(want.is_some());
            }
        }
        assert!(found > 2000, "{found} keys found");
    }

    #[test]
    fn a_run_finds_each_key_of_its_state_and_key_group_with_its_value_or_tombstone() {
        let (one, gone, two, other) = (
            dirty(Some(b"1")),
            dirty(None),
            dirty(Some(b"")),
            dirty(Some(b"x")),
        );
        let entries: Vec<(StateId, u32, &[u8], &Dirty)> = vec![
            (0, 3, b"a", &one),
            (0, 3, b"b", &gone),
            (0, 4, b"a", &two),
            (1, 3, b"a", &other),
        ];
        assert!(Run::of(&entries, 10).is_none(), "larger than its bound");
        let run = Run::of(&entries, usize::MAX).unwrap();
        assert_eq!(run.group(0, 3).get(b"a"), Some(Some(&b"1"[..])));
        assert_eq!(run.group(0, 3).get(b"b"), Some(None), "a tombstone");
        assert_eq!(run.group(0, 3).get(b"c"), None, "not in the run");
        assert_eq!(run.group(0, 4).get(b"a"), Some(Some(&b""[..])), "an empty value");
        assert_eq!(run.group(1, 3).get(b"a"), Some(Some(&b"x"[..])));
        assert_eq!(run.group(1, 4).get(b"a"), None, "another key group");
        assert_eq!(run.group(2, 3).get(b"a"), None, "another state");
    }

    #[test]
    fn runs_beyond_the_bound_are_dropped_oldest_first_and_a_run_not_kept_drops_all() {
        let v = dirty(Some(&[7u8; 100]));
        let run = || Run::of(&[(0, 0, &b"k"[..], &v)], usize::MAX);
        let size = run().unwrap().heap_bytes();
        let mut runs = FlushedRuns::new(2 * size);
        runs.push(run());
        runs.push(run());
        assert_eq!(runs.newest_first().len(), 2);
        runs.push(run());
        assert_eq!(runs.newest_first().len(), 2, "the oldest dropped");
        assert_eq!(runs.bytes(), 2 * size);
        let mark = runs.mark();
        runs.push(run());
        runs.forget_before(mark);
        assert_eq!(runs.newest_first().len(), 1, "only the flush after the mark");
        runs.push(None);
        assert!(runs.newest_first().is_empty() && runs.bytes() == 0);
        let mut none = FlushedRuns::new(0);
        none.push(run());
        assert!(none.newest_first().is_empty(), "a bound of 0 keeps nothing");
    }

    #[test]
    fn flushed_marks_are_kept_per_state_and_key_group_until_the_epoch_ends() {
        let mut marks = FlushedMarks::new(KeyGroupRange::new(4, 5).unwrap(), 1 << 20);
        marks.add_state();
        marks.add_state();
        assert!(!marks.contains(0, 4, b"k"));
        marks.insert(0, 4, b"k");
        marks.insert(0, 4, b"k");
        assert!(marks.contains(0, 4, b"k"));
        assert!(!marks.contains(1, 4, b"k"), "another state");
        assert!(!marks.contains(0, 5, b"k"), "another key group");
        assert!(
            !marks.contains(0, 9, b"k") && !marks.contains(7, 4, b"k"),
            "out of range"
        );
        marks.insert(1, 5, &[3u8; 40]);
        assert!(marks.contains(1, 5, &[3u8; 40]), "a long key");
        marks.clear();
        assert!(!marks.contains(0, 4, b"k") && !marks.contains(1, 5, &[3u8; 40]));
        let mut small = FlushedMarks::new(KeyGroupRange::new(4, 5).unwrap(), 100);
        small.add_state();
        small.insert(0, 4, b"a");
        small.insert(0, 4, b"b");
        small.insert(0, 4, b"c");
        assert!(small.contains(0, 4, b"a") && small.contains(0, 4, b"b"));
        assert!(!small.contains(0, 4, b"c"), "beyond its bound: not remembered");
    }

    #[test]
    fn at_most_max_runs_are_kept_newest_first() {
        let v = dirty(Some(b"v"));
        let mut runs = FlushedRuns::new(usize::MAX);
        for i in 0..(MAX_RUNS as u8 + 5) {
            runs.push(Run::of(&[(0, 0, &[i][..], &v)], usize::MAX));
        }
        let kept = runs.newest_first();
        assert_eq!(kept.len(), MAX_RUNS);
        assert_eq!(
            kept[0].group(0, 0).get(&[MAX_RUNS as u8 + 4]),
            Some(Some(&b"v"[..]))
        );
        assert_eq!(kept[MAX_RUNS - 1].group(0, 0).get(&[5]), Some(Some(&b"v"[..])));
    }
}
