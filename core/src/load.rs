//! Restored entries in bulk: what a restore hands a state store
//! ([`crate::KeyedStateStore::load`]), so that a store can write them in
//! large sorted batches instead of one `put` at a time.

use crate::format::read_changes;
use crate::metadata::StateFileHandle;
use crate::state::{KeyedStateStore, StateId};
use crate::storage::CheckpointStorage;
use crate::{KeyGroupRange, Result};
use std::collections::HashMap;

/// A batch of restored entries, in the order they were read (a base, then
/// the changes files after it): for one key, the later entry wins. Keys and
/// values live in one buffer.
///
/// ```
/// use sluice_core::LoadBatch;
///
/// let mut batch = LoadBatch::new();
/// batch.push(0, 7, b"k", Some(b"old"));
/// batch.push(0, 3, b"a", Some(b"v"));
/// batch.push(0, 7, b"k", None);
/// let sorted: Vec<_> = batch.sorted().iter().map(|e| (e.key_group, e.key, e.value)).collect();
/// assert_eq!(sorted, vec![(3, &b"a"[..], Some(&b"v"[..])), (7, &b"k"[..], Some(&b"old"[..])), (7, &b"k"[..], None)]);
/// ```
#[derive(Debug, Default, Clone)]
pub struct LoadBatch {
    data: Vec<u8>,
    rows: Vec<Row>,
}

#[derive(Debug, Clone, Copy)]
struct Row {
    state: StateId,
    key_group: u32,
    key: (usize, usize),
    /// `None`: a deletion.
    value: Option<(usize, usize)>,
}

/// Bits of [`LoadBatch::sorted`]'s low word that hold an entry's position
/// (the length above them, the key's head above that).
const POSITION: u32 = 60;

/// One entry of a [`LoadBatch`]: a put of `value`, or a deletion (`None`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadEntry<'a> {
    /// The state.
    pub state: StateId,
    /// The key's key group.
    pub key_group: u32,
    /// The key.
    pub key: &'a [u8],
    /// The value, or `None` for a deletion.
    pub value: Option<&'a [u8]>,
}

impl LoadBatch {
    /// An empty batch.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a put (`Some(value)`) or a deletion (`None`).
    pub fn push(&mut self, state: StateId, key_group: u32, key: &[u8], value: Option<&[u8]>) {
        let k = self.data.len();
        self.data.extend_from_slice(key);
        let value = value.map(|v| {
            let at = self.data.len();
            self.data.extend_from_slice(v);
            (at, v.len())
        });
        self.rows.push(Row {
            state,
            key_group,
            key: (k, key.len()),
            value,
        });
    }

    /// Entries in the batch.
    pub fn len(&self) -> usize {
        self.rows.len()
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Bytes of keys and values held.
    pub fn bytes(&self) -> usize {
        self.data.len()
    }

    /// Empties the batch, keeping its buffers.
    pub fn clear(&mut self) {
        self.data.clear();
        self.rows.clear();
    }

    /// The entries in the order they were added.
    pub fn iter(&self) -> impl Iterator<Item = LoadEntry<'_>> {
        self.rows.iter().map(|r| self.entry(r))
    }

    /// The entries sorted by (state, key group, key), stably: for one key,
    /// the later entry comes after the earlier one (writing them in this
    /// order leaves the later one).
    ///
    /// Sorted by two words per entry: (state, key group), and the key's
    /// first 8 bytes big-endian with its length and the entry's position
    /// below them; a run of entries whose first 8 key bytes tie and where a
    /// key is longer is sorted again by the whole keys. Entries that come
    /// key group by key group, as a file holds them, are sorted one key
    /// group at a time. (A batch of 1 M entries: ~200–240 ms comparing
    /// byte slices, ~90 ms so.)
    pub fn sorted(&self) -> Vec<LoadEntry<'_>> {
        self.sorted_keeping(false)
    }

    /// As [`LoadBatch::sorted`], with only the latest entry of each key
    /// (what a store that writes the batch in order would end up with).
    pub fn latest_sorted(&self) -> Vec<LoadEntry<'_>> {
        self.sorted_keeping(true)
    }

    fn sorted_keeping(&self, latest_only: bool) -> Vec<LoadEntry<'_>> {
        let key = |row: usize| {
            let r = &self.rows[row];
            &self.data[r.key.0..r.key.0 + r.key.1]
        };
        let mut order: Vec<(u64, u128)> = self
            .rows
            .iter()
            .enumerate()
            .map(|(i, r)| {
                let k = key(i);
                let mut head = [0u8; 8];
                let n = k.len().min(8);
                head[..n].copy_from_slice(&k[..n]);
                // Keys of up to 8 bytes: the zero-padded head, then the
                // length (a key that is a prefix of another is smaller);
                // longer keys count as 9 and are compared whole below.
                let len = k.len().min(9) as u128;
                let low = (u128::from(u64::from_be_bytes(head)) << 64) | (len << POSITION) | i as u128;
                ((u64::from(r.state) << 32) | u64::from(r.key_group), low)
            })
            .collect();
        if order.is_sorted_by_key(|e| e.0) {
            // Key group by key group, as a file holds them: each group's
            // entries sorted on their own, in cache.
            for group in order.chunk_by_mut(|a, b| a.0 == b.0) {
                group.sort_unstable_by_key(|e| e.1);
            }
        } else {
            order.sort_unstable();
        }
        // Longer keys whose heads tie: by their bytes, then position.
        let row = |e: &(u64, u128)| (e.1 as u64 & ((1 << POSITION) - 1)) as usize;
        let len = |e: &(u64, u128)| (e.1 >> POSITION) as u8;
        for run in order.chunk_by_mut(|a, b| (a.0, a.1 >> 64) == (b.0, b.1 >> 64)) {
            if run.len() > 1 && run.iter().any(|e| len(e) > 8) {
                run.sort_unstable_by(|a, b| key(row(a)).cmp(key(row(b))).then(row(a).cmp(&row(b))));
            }
        }
        // The same key: the same state, key group, head and length, and
        // the same bytes past the head.
        let same = |a: &(u64, u128), b: &(u64, u128)| {
            a.0 == b.0 && a.1 >> POSITION == b.1 >> POSITION && (len(a) <= 8 || key(row(a)) == key(row(b)))
        };
        (0..order.len())
            .filter(|i| !latest_only || order.get(i + 1).is_none_or(|n| !same(n, &order[*i])))
            .map(|i| self.entry(&self.rows[row(&order[i])]))
            .collect()
    }

    fn entry(&self, r: &Row) -> LoadEntry<'_> {
        LoadEntry {
            state: r.state,
            key_group: r.key_group,
            key: &self.data[r.key.0..r.key.0 + r.key.1],
            value: r.value.map(|(at, len)| &self.data[at..at + len]),
        }
    }
}

/// Bytes of keys and values, or entries, a restore hands a store at once:
/// large enough for long sorted runs (redb appends a batch through a
/// cursor: with 256 K entries 1 M keys took 0.55 s instead of 0.33 s),
/// small enough to stay a bounded part of a subtask's memory.
const BATCH_BYTES: usize = 32 << 20;
const BATCH_ENTRIES: usize = 1 << 20;

/// Restores the key groups `range` of a chain of state files — a base, then
/// the changes files after it, in order — into `store`, in batches
/// ([`crate::KeyedStateStore::load`]). Each file is read by range
/// ([`crate::format::read_changes`]: only the needed sections, in bounded
/// chunks, several reads in flight). State names are registered as they
/// appear (`ids` keeps them across calls). Returns the entries read.
pub async fn load_chain(
    storage: &dyn CheckpointStorage,
    files: &[StateFileHandle],
    range: KeyGroupRange,
    store: &mut dyn KeyedStateStore,
    ids: &mut HashMap<String, StateId>,
) -> Result<u64> {
    load_chain_in(storage, files, range, store, ids, (BATCH_BYTES, BATCH_ENTRIES)).await
}

/// [`load_chain`] in batches of about `(bytes, entries)`.
async fn load_chain_in(
    storage: &dyn CheckpointStorage,
    files: &[StateFileHandle],
    range: KeyGroupRange,
    store: &mut dyn KeyedStateStore,
    ids: &mut HashMap<String, StateId>,
    (batch_bytes, batch_entries): (usize, usize),
) -> Result<u64> {
    // Sized once for what the files hold (a batch's vectors doubling as
    // they grow would take twice the memory at the peak).
    let entries: u64 = files.iter().map(|f| f.entries).sum();
    let bytes: u64 = files.iter().map(|f| f.size).sum();
    let mut batch = LoadBatch {
        data: Vec::with_capacity(bytes.min((batch_bytes as u64).saturating_mul(5) / 4) as usize + 4096),
        rows: Vec::with_capacity(entries.min((batch_entries as u64).saturating_mul(5) / 4) as usize),
    };
    let mut n = 0;
    let mut last_kg = None;
    for file in files {
        n += read_changes(storage, file, range, &mut |name, kg, k, v| {
            let id = match ids.get(name) {
                Some(id) => *id,
                None => {
                    let id = store.register_state(name)?;
                    ids.insert(name.to_string(), id);
                    id
                }
            };
            // A full batch goes to the store at the next key group's first
            // entry: a batch holds whole key groups, so that a store that
            // sorts it (redb) finds nothing of the batch before inside its
            // key range and appends in order instead of inserting at random
            // (a file's key group need not be sorted). A key group of more
            // than four batches is cut anyway, to bound memory.
            let full = batch.bytes() >= batch_bytes || batch.len() >= batch_entries;
            let huge = batch.bytes() >= batch_bytes.saturating_mul(4)
                || batch.len() >= batch_entries.saturating_mul(4);
            if (full && last_kg != Some(kg)) || huge {
                store.load(&batch)?;
                batch.clear();
            }
            batch.push(id, kg, k, v);
            last_kg = Some(kg);
            Ok(())
        })
        .await?;
    }
    store.load(&batch)?;
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::encode_snapshot;
    use crate::format::tests::Counting;
    use crate::state::{KeyValueVisitor, StateSnapshot};
    use crate::{CheckpointId, Error, MapSnapshot};
    use std::collections::BTreeMap;

    /// A store that records the key groups of each batch it is given.
    #[derive(Default)]
    struct Batches(Vec<Vec<u32>>);

    impl KeyedStateStore for Batches {
        fn register_state(&mut self, _name: &str) -> Result<StateId> {
            Ok(0)
        }
        fn get(&mut self, _: StateId, _: u32, _: &[u8], _: &mut Vec<u8>) -> Result<bool> {
            Ok(false)
        }
        fn put(&mut self, _: StateId, _: u32, _: &[u8], _: &[u8]) -> Result<()> {
            Ok(())
        }
        fn delete(&mut self, _: StateId, _: u32, _: &[u8]) -> Result<()> {
            Ok(())
        }
        fn scan_prefix(&mut self, _: StateId, _: u32, _: &[u8], _: &mut KeyValueVisitor<'_>) -> Result<()> {
            Ok(())
        }
        fn snapshot(&mut self, _: CheckpointId) -> Result<Box<dyn StateSnapshot>> {
            Err(Error::storage("batches", "no snapshots"))
        }
        fn load(&mut self, batch: &LoadBatch) -> Result<()> {
            let mut groups: Vec<u32> = batch.iter().map(|e| e.key_group).collect();
            groups.dedup();
            self.0.push(groups);
            Ok(())
        }
    }

    fn batches(range: KeyGroupRange, per_group: u32, entries: usize) -> Vec<Vec<u32>> {
        let storage = Counting::default();
        let mut snap = MapSnapshot::new(range, vec!["s".into()]);
        for kg in range.iter() {
            for i in 0..per_group {
                snap.insert(kg, 0, i.to_be_bytes().to_vec(), b"v".to_vec());
            }
        }
        let file = encode_snapshot(&snap).unwrap();
        let handle = file.handle("f.kst");
        let mut store = Batches::default();
        futures::executor::block_on(async {
            storage.write_file("f.kst", file.bytes.clone()).await.unwrap();
            let n = load_chain_in(
                &storage,
                &[handle],
                range,
                &mut store,
                &mut HashMap::new(),
                (usize::MAX, entries),
            )
            .await
            .unwrap();
            assert_eq!(n, u64::from(per_group) * range.len() as u64);
        });
        store.0
    }

    #[test]
    fn sorted_is_a_stable_sort_by_state_key_group_and_key_bytes() {
        // Keys of 0 to 12 bytes over a tiny alphabet (many shared
        // prefixes, zero bytes, keys that are prefixes of others), repeated
        // (the later entry must stay after the earlier one), against a
        // stable sort comparing the byte slices.
        let mut x: u64 = 5;
        let mut rnd = move || {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            x >> 33
        };
        let mut batch = LoadBatch::new();
        for i in 0..20_000u32 {
            let len = (rnd() % 13) as usize;
            let key: Vec<u8> = (0..len).map(|_| [0u8, 1, 255][(rnd() % 3) as usize]).collect();
            let value = i.to_le_bytes();
            let deleted = rnd() % 5 == 0;
            batch.push(
                (rnd() % 3) as StateId,
                (rnd() % 4) as u32,
                &key,
                (!deleted).then_some(&value[..]),
            );
        }
        let mut want: Vec<LoadEntry<'_>> = batch.iter().collect();
        want.sort_by(|a, b| (a.state, a.key_group, a.key).cmp(&(b.state, b.key_group, b.key)));
        let got = batch.sorted();
        assert_eq!(got.len(), want.len());
        if let Some(i) = (0..got.len()).find(|i| got[*i] != want[*i]) {
            panic!("entry {i}: got {:?}, want {:?}", got[i], want[i]);
        }
        // The latest entry of each key: the last of its equal neighbours.
        let key = |e: &LoadEntry<'_>| (e.state, e.key_group, e.key.to_vec());
        let mut latest: BTreeMap<_, LoadEntry<'_>> = BTreeMap::new();
        for e in batch.iter() {
            latest.insert(key(&e), e);
        }
        let want: Vec<LoadEntry<'_>> = latest.into_values().collect();
        assert!(want.len() < got.len(), "the batch repeats keys");
        assert_eq!(batch.latest_sorted(), want);
    }

    #[test]
    fn a_batch_holds_whole_key_groups_unless_one_is_huge() {
        let range = KeyGroupRange::new(0, 9).unwrap();
        // Batches of about 500 entries, key groups of 300: a batch ends at a
        // key group's end (two groups, 600 entries), never inside one.
        let got = batches(range, 300, 500);
        assert_eq!(got, (0..5).map(|i| vec![2 * i, 2 * i + 1]).collect::<Vec<_>>());
        // A key group of more than four batches is cut at four.
        let got = batches(KeyGroupRange::new(0, 0).unwrap(), 2_500, 500);
        assert_eq!(got, vec![vec![0], vec![0]]);
    }
}
