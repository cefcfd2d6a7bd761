//! The state backend traits: where operators keep keyed state while running.

use crate::ids::{CheckpointId, OperatorUid};
use crate::keygroup::KeyGroupRange;
use crate::Result;
use std::fmt::Debug;

/// A registered state name's compact id inside one [`KeyedStateStore`].
pub type StateId = u16;

/// Visits `(key, value)` pairs of a prefix scan.
pub type KeyValueVisitor<'a> = dyn FnMut(&[u8], &[u8]) -> Result<()> + 'a;

/// Visits `(state, key, value)` entries of a snapshot's key group.
pub type SnapshotVisitor<'a> = dyn FnMut(StateId, &[u8], &[u8]) -> Result<()> + 'a;

/// Visits `(state, key, value)` changes of a key group: `Some(value)` for a
/// key written, `None` for a key deleted.
pub type ChangeSetVisitor<'a> = dyn FnMut(StateId, &[u8], Option<&[u8]>) -> Result<()> + 'a;

/// What a [`KeyedStateStore`] is opened for: one subtask of one operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreScope {
    /// The job's name.
    pub job: String,
    /// The operator's uid.
    pub operator: OperatorUid,
    /// The subtask index.
    pub subtask: u32,
    /// The operator's parallelism.
    pub parallelism: u32,
    /// The job's max parallelism (number of key groups).
    pub max_parallelism: u32,
    /// The key groups this subtask owns.
    pub key_groups: KeyGroupRange,
    /// Whether the store should track its changes between snapshots, for
    /// incremental checkpoints ([`KeyedStateStore::snapshot_changes`]).
    /// Tracking costs some memory and time per write; without it the store
    /// answers `None` and every snapshot is full.
    pub track_changes: bool,
}

/// A state backend: a factory of keyed state stores (memory, redb, …).
///
/// Object safe: the runtime holds an `Arc<dyn StateBackend>`.
pub trait StateBackend: Send + Sync + Debug {
    /// A short name for logs and benchmarks, e.g. `memory` or `redb`.
    fn name(&self) -> &str;

    /// Opens an empty store for one subtask of one operator. Restoring from
    /// a checkpoint is done by the runtime through [`KeyedStateStore::put`].
    fn open_store(&self, scope: &StoreScope) -> Result<Box<dyn KeyedStateStore>>;
}

/// Byte-level keyed state of one subtask: `(state, key group, key) -> value`.
///
/// Methods take `&mut self` so that backends can keep read caches and write
/// buffers without locks (a store belongs to one task).
pub trait KeyedStateStore: Send {
    /// Registers a state name (or finds it if registered) and returns its id.
    fn register_state(&mut self, name: &str) -> Result<StateId>;

    /// Registers a typed state (or finds it if registered with the same
    /// value type): a store that keeps state on the heap holds the table
    /// `make` builds for its key groups ([`crate::heap::HeapTable`] of the
    /// state's type) and hands it out through [`typed`](Self::typed), so
    /// values stay Rust values and an update is one hash probe. Entries
    /// restored before (through [`load`](Self::load)) are decoded into it.
    /// `Ok(None)` (the default): the store keeps bytes, and the caller uses
    /// [`register_state`](Self::register_state) and the byte-level methods.
    /// The byte-level methods keep working on a typed state, in the
    /// canonical encoding.
    fn register_typed(
        &mut self,
        name: &str,
        make: &dyn Fn(KeyGroupRange) -> Box<dyn crate::heap::TypedTable>,
    ) -> Result<Option<StateId>> {
        let _ = (name, make);
        Ok(None)
    }

    /// The table of a state registered with
    /// [`register_typed`](Self::register_typed), with the store's change
    /// tracking; `None` for a byte-level state (the default).
    fn typed(&mut self, state: StateId) -> Option<crate::heap::TypedAccess<'_>> {
        let _ = state;
        None
    }

    /// Reads a value into `out` (cleared first). Returns whether it existed.
    fn get(&mut self, state: StateId, key_group: u32, key: &[u8], out: &mut Vec<u8>) -> Result<bool>;

    /// Inserts or replaces a value.
    fn put(&mut self, state: StateId, key_group: u32, key: &[u8], value: &[u8]) -> Result<()>;

    /// Removes a value; removing a missing key is not an error.
    fn delete(&mut self, state: StateId, key_group: u32, key: &[u8]) -> Result<()>;

    /// Visits every entry of `state` in `key_group` whose key starts with
    /// `prefix`, in unspecified order. The visitor must not call back into the
    /// store.
    fn scan_prefix(
        &mut self,
        state: StateId,
        key_group: u32,
        prefix: &[u8],
        visit: &mut KeyValueVisitor<'_>,
    ) -> Result<()>;

    /// A hint that `key` will be accessed soon, in every state. Called for
    /// a whole batch of records before they are processed, so that a
    /// backend can start loading their entries (memory-level parallelism,
    /// read-ahead). The default does nothing.
    fn prefetch(&mut self, _key: &crate::heap::KeyRef<'_>) {}

    /// The synchronous part of a snapshot: captures a consistent view cheaply
    /// (copy-on-write, a read transaction, a frozen buffer). Writes after this
    /// call are not in the returned snapshot.
    fn snapshot(&mut self, checkpoint: CheckpointId) -> Result<Box<dyn StateSnapshot>>;

    /// The synchronous part of an incremental snapshot for `checkpoint`:
    /// what changed since this store's snapshot of `base` (an earlier
    /// [`snapshot`](Self::snapshot) or `snapshot_changes` of this store, or
    /// the checkpoint it was [`restored`](Self::restored) from), as upserts
    /// and deletions, captured as cheaply as a snapshot. Like a snapshot, it
    /// ends an epoch: later changes are relative to `checkpoint`.
    /// `Ok(None)` when the store cannot tell (it does not track changes, or
    /// has forgotten `base`): the caller takes a full snapshot instead. The
    /// default tracks nothing.
    fn snapshot_changes(
        &mut self,
        checkpoint: CheckpointId,
        base: CheckpointId,
    ) -> Result<Option<Box<dyn ChangeSnapshot>>> {
        let _ = (checkpoint, base);
        Ok(None)
    }

    /// Checkpoint `checkpoint` completed: no later incremental snapshot will
    /// be asked for relative to an older one, so the store may forget the
    /// changes before it.
    fn checkpoint_complete(&mut self, checkpoint: CheckpointId) {
        let _ = checkpoint;
    }

    /// Writes restored entries in bulk (a restore, before any processing):
    /// each a put, or a deletion when its value is `None`; for one key, the
    /// later entry of the batch wins, and a later batch wins over an earlier
    /// one. Like any write before [`restored`](Self::restored), it is the
    /// restored base, not a change. The default writes the entries one at a
    /// time; a store with a sorted on-disk structure writes them in key
    /// order in one transaction.
    fn load(&mut self, batch: &crate::LoadBatch) -> Result<()> {
        for e in batch.iter() {
            match e.value {
                Some(v) => self.put(e.state, e.key_group, e.key, v)?,
                None => self.delete(e.state, e.key_group, e.key)?,
            }
        }
        Ok(())
    }

    /// The store now holds exactly the state of `checkpoint`, restored from
    /// it: changes are tracked from here ([`snapshot_changes`](Self::snapshot_changes)
    /// relative to `checkpoint`).
    fn restored(&mut self, checkpoint: CheckpointId) {
        let _ = checkpoint;
    }
}

/// The changes of a store since an earlier snapshot, captured by
/// [`KeyedStateStore::snapshot_changes`]: what an incremental checkpoint
/// stores. Read by the asynchronous part while the task goes on.
pub trait ChangeSnapshot: Send + Sync {
    /// The key groups the changes cover (the store's range).
    fn key_groups(&self) -> KeyGroupRange;

    /// The state names, indexed by [`StateId`].
    fn state_names(&self) -> Vec<String>;

    /// Visits every change of one key group: `(state, key, Some(value))`
    /// for a key written since the base, `(state, key, None)` for one
    /// deleted.
    fn visit_key_group(&self, key_group: u32, visit: &mut ChangeSetVisitor<'_>) -> Result<()>;
}

/// A consistent, immutable view of a store, captured by
/// [`KeyedStateStore::snapshot`]. The asynchronous part of the snapshot
/// ([`crate::format::encode_snapshot`] and the storage write) reads it while
/// the task goes on processing.
pub trait StateSnapshot: Send + Sync {
    /// The key groups the snapshot covers.
    fn key_groups(&self) -> KeyGroupRange;

    /// The state names, indexed by [`StateId`].
    fn state_names(&self) -> Vec<String>;

    /// Visits every entry of one key group: `(state, key, value)`.
    fn visit_key_group(&self, key_group: u32, visit: &mut SnapshotVisitor<'_>) -> Result<()>;

    /// Appends every entry of one key group to `out` as the snapshot file
    /// holds them ([`crate::format::append_entry`] each) and returns how
    /// many. The default visits them; a backend whose entries are typed
    /// writes them without a call per entry.
    fn append_key_group(&self, key_group: u32, out: &mut Vec<u8>) -> Result<u64> {
        let mut entries = 0u64;
        self.visit_key_group(key_group, &mut |state, key, value| {
            entries += 1;
            crate::format::append_entry(out, state, key, value);
            Ok(())
        })?;
        Ok(entries)
    }
}

/// A [`StateSnapshot`] over entries held in a map: for tools that write
/// snapshot files without a state backend (savepoint rewriting, the
/// conformance suite's storage tests, fixtures).
///
/// ```
/// use sluice_core::{KeyGroupRange, MapSnapshot};
///
/// let mut snap = MapSnapshot::new(KeyGroupRange::new(0, 3).unwrap(), vec!["sum".into()]);
/// snap.insert(2, 0, b"key".to_vec(), b"value".to_vec());
/// let file = sluice_core::format::encode_snapshot(&snap).unwrap();
/// assert_eq!(file.entries, 1);
/// ```
#[derive(Debug, Clone)]
pub struct MapSnapshot {
    range: KeyGroupRange,
    names: Vec<String>,
    entries: std::collections::BTreeMap<(u32, StateId, Vec<u8>), Vec<u8>>,
}

impl MapSnapshot {
    /// An empty snapshot of `range` with the states `names` (indexed by
    /// [`StateId`]).
    pub fn new(range: KeyGroupRange, names: Vec<String>) -> Self {
        MapSnapshot {
            range,
            names,
            entries: Default::default(),
        }
    }

    /// Adds (or replaces) an entry. Entries of key groups outside the range
    /// are kept but never visited.
    pub fn insert(&mut self, key_group: u32, state: StateId, key: Vec<u8>, value: Vec<u8>) {
        self.entries.insert((key_group, state, key), value);
    }

    /// The entries in key group, state, key order:
    /// `(key group, state, key, value)`.
    pub fn iter(&self) -> impl Iterator<Item = (u32, StateId, &[u8], &[u8])> {
        self.entries
            .iter()
            .map(|((g, s, k), v)| (*g, *s, k.as_slice(), v.as_slice()))
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl StateSnapshot for MapSnapshot {
    fn key_groups(&self) -> KeyGroupRange {
        self.range
    }

    fn state_names(&self) -> Vec<String> {
        self.names.clone()
    }

    fn visit_key_group(&self, key_group: u32, visit: &mut SnapshotVisitor<'_>) -> Result<()> {
        let from = (key_group, 0, Vec::new());
        for ((g, s, k), v) in self.entries.range(from..) {
            if *g != key_group {
                break;
            }
            visit(*s, k, v)?;
        }
        Ok(())
    }
}
