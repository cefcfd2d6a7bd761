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
    pub fn sorted(&self) -> Vec<LoadEntry<'_>> {
        let mut v: Vec<LoadEntry<'_>> = self.iter().collect();
        v.sort_by(|a, b| (a.state, a.key_group, a.key).cmp(&(b.state, b.key_group, b.key)));
        v
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
