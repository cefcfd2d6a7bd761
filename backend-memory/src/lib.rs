//! # sluice-backend-memory
//!
//! The heap state backend ([`MemoryStateBackend`]) and an in-memory
//! checkpoint storage ([`MemoryCheckpointStorage`]) for Sluice.
//!
//! Keyed state lives in one hash map per (state, key group). A state the
//! runtime registers as typed ([`KeyedStateStore::register_typed`]: value
//! and list states) keeps its values as their Rust type in a
//! [`sluice_core::heap::HeapTable`] — an update is one hash probe, and
//! values are encoded only when a snapshot is written; other states (map
//! states, byte-level users) keep bytes. The synchronous snapshot step is
//! copy-on-write: it clones the `Arc` of every key group's map (cheap); the
//! first write into a key group while a snapshot still holds it copies just
//! that key group.
//!
//! ```
//! use sluice_backend_memory::MemoryStateBackend;
//! use sluice_core::{CheckpointId, KeyGroupRange, OperatorUid, StateBackend, StoreScope};
//!
//! let backend = MemoryStateBackend::new();
//! let mut store = backend
//!     .open_store(&StoreScope {
//!         job: "job".into(),
//!         operator: OperatorUid::new("sum").unwrap(),
//!         subtask: 0,
//!         parallelism: 1,
//!         max_parallelism: 128,
//!         key_groups: KeyGroupRange::all(128),
//!         track_changes: false,
//!     })
//!     .unwrap();
//! let sum = store.register_state("sum").unwrap();
//! store.put(sum, 7, b"key", b"41").unwrap();
//! let snapshot = store.snapshot(CheckpointId(1)).unwrap();
//! store.put(sum, 7, b"key", b"42").unwrap();
//! let mut seen = Vec::new();
//! snapshot.visit_key_group(7, &mut |_, k, v| { seen.push((k.to_vec(), v.to_vec())); Ok(()) }).unwrap();
//! assert_eq!(seen, vec![(b"key".to_vec(), b"41".to_vec())]);
//! ```
#![warn(missing_docs)]

mod storage;

pub use storage::MemoryCheckpointStorage;

use sluice_core::bytemap::{ByteMap, ChangedKeys, EpochChanges};
use sluice_core::heap::{ChangeLog, KeyRef, TableView, Tracking, TypedAccess, TypedTable};
use sluice_core::state::{ChangeSetVisitor, KeyValueVisitor, SnapshotVisitor};
use sluice_core::{
    ChangeSnapshot, CheckpointId, Error, KeyGroupRange, KeyedStateStore, LoadBatch, Result, StateBackend,
    StateId, StateSnapshot, StoreScope,
};
use std::sync::Arc;

/// Values up to 16 bytes are stored inline in the table (no pointer to
/// chase on a lookup): the common case of sums and counters.
type Bytes16 = smallvec::SmallVec<[u8; 16]>;

/// The entries of one (state, key group).
type Map = ByteMap<Slot>;

/// A value, and the epoch (of change tracking) that last wrote it: a key
/// is recorded as changed at its first write of an epoch only, by a
/// comparison instead of a set insertion per write.
#[derive(Clone, Default)]
struct Slot {
    value: Bytes16,
    /// u64: as small as u32 here (the value is 24 bytes), and never wraps.
    epoch: u64,
}

/// Writes `value` of `key` into `map`, stamped with `epoch`; true if the
/// key was not written in `epoch` before (it is new, or last written in
/// another epoch).
#[inline]
fn put(map: &mut Map, key: &[u8], value: &[u8], epoch: u64) -> bool {
    let slot = map.get_or_insert_with(key, Slot::default);
    slot.value.clear();
    slot.value.extend_from_slice(value);
    std::mem::replace(&mut slot.epoch, epoch) != epoch
}

/// The heap state backend.
#[derive(Debug, Clone, Copy, Default)]
pub struct MemoryStateBackend;

impl MemoryStateBackend {
    /// A new backend.
    pub fn new() -> Self {
        MemoryStateBackend
    }
}

impl StateBackend for MemoryStateBackend {
    fn name(&self) -> &str {
        "memory"
    }

    fn open_store(&self, scope: &StoreScope) -> Result<Box<dyn KeyedStateStore>> {
        Ok(Box::new(MemoryStore {
            range: scope.key_groups,
            names: Vec::new(),
            states: Vec::new(),
            changes: scope.track_changes.then(EpochChanges::default),
        }))
    }
}

/// One state's table: bytes, or typed values (a state registered with
/// [`KeyedStateStore::register_typed`]).
enum Table {
    /// `[key_group - range.start]`.
    Bytes(Vec<Arc<Map>>),
    Typed(Box<dyn TypedTable>),
}

impl Table {
    fn len(&self) -> usize {
        match self {
            Table::Bytes(groups) => groups.iter().map(|m| m.len()).sum(),
            Table::Typed(t) => t.len(),
        }
    }

    fn view(&mut self) -> View {
        match self {
            Table::Bytes(groups) => View::Bytes(groups.clone()),
            Table::Typed(t) => View::Typed(t.view()),
        }
    }
}

/// A copy-on-write view of one state's table.
#[derive(Clone)]
enum View {
    Bytes(Vec<Arc<Map>>),
    Typed(Arc<dyn TableView>),
}

/// One subtask's keyed state on the heap.
struct MemoryStore {
    range: KeyGroupRange,
    names: Vec<String>,
    /// By state id.
    states: Vec<Table>,
    /// The keys written since each snapshot, when tracking changes.
    changes: Option<EpochChanges>,
}

impl MemoryStore {
    fn state(&self, state: StateId) -> Result<usize> {
        let s = state as usize;
        if s >= self.states.len() {
            return Err(Error::InvalidArgument {
                what: format!("state id {state}"),
                reason: "not registered in this store".into(),
            });
        }
        Ok(s)
    }

    #[inline]
    fn group(&self, key_group: u32) -> Result<usize> {
        if !self.range.contains(key_group) {
            return Err(Error::InvalidArgument {
                what: format!("key group {key_group}"),
                reason: format!("outside this store's range {}", self.range),
            });
        }
        Ok((key_group - self.range.start) as usize)
    }

    fn new_state(&mut self, name: &str) -> Result<StateId> {
        if self.names.len() >= StateId::MAX as usize {
            return Err(Error::InvalidArgument {
                what: format!("state {name:?}"),
                reason: "too many states".into(),
            });
        }
        self.names.push(name.to_string());
        self.states.push(Table::Bytes(
            (0..self.range.len()).map(|_| Arc::new(Map::default())).collect(),
        ));
        Ok((self.names.len() - 1) as StateId)
    }

    /// Entries stored, in every state.
    fn stored(&self) -> usize {
        self.states.iter().map(Table::len).sum()
    }

    fn view(&mut self) -> MemorySnapshot {
        MemorySnapshot {
            range: self.range,
            names: self.names.clone(),
            states: self.states.iter_mut().map(Table::view).collect(),
        }
    }

    /// Writes without change tracking (a restore).
    fn load_one(&mut self, state: StateId, key_group: u32, key: &[u8], value: Option<&[u8]>) -> Result<()> {
        let s = self.state(state)?;
        let g = self.group(key_group)?;
        match (&mut self.states[s], value) {
            (Table::Bytes(groups), Some(v)) => {
                put(Arc::make_mut(&mut groups[g]), key, v, 0);
            }
            (Table::Bytes(groups), None) => {
                Arc::make_mut(&mut groups[g]).remove(key);
            }
            (Table::Typed(t), Some(v)) => {
                t.put_encoded(key_group, key, v, 0)?;
            }
            (Table::Typed(t), None) => {
                t.remove(key_group, key)?;
            }
        }
        Ok(())
    }
}

impl KeyedStateStore for MemoryStore {
    fn register_state(&mut self, name: &str) -> Result<StateId> {
        match self.names.iter().position(|n| n == name) {
            Some(i) => Ok(i as StateId),
            None => self.new_state(name),
        }
    }

    fn register_typed(
        &mut self,
        name: &str,
        make: &dyn Fn(KeyGroupRange) -> Box<dyn TypedTable>,
    ) -> Result<Option<StateId>> {
        let id = self.register_state(name)?;
        let s = id as usize;
        let mut table = make(self.range);
        match &self.states[s] {
            Table::Typed(t) if t.value_type() == table.value_type() => return Ok(Some(id)),
            Table::Typed(t) => {
                return Err(Error::InvalidArgument {
                    what: format!("state {name:?}"),
                    reason: format!(
                        "registered with values of type {}, now of type {}",
                        t.value_type(),
                        table.value_type()
                    ),
                })
            }
            Table::Bytes(_) => {}
        }
        // Entries restored as bytes become values of the type now, a key
        // group at a time (each group's bytes are freed once converted).
        // On an error the state is left empty (the error says which value
        // could not be decoded; the store is not usable for it).
        let empty = Table::Bytes((0..self.range.len()).map(|_| Arc::new(Map::default())).collect());
        if let Table::Bytes(groups) = std::mem::replace(&mut self.states[s], empty) {
            for (g, map) in groups.into_iter().enumerate() {
                let key_group = self.range.start + g as u32;
                for (k, slot) in map.iter() {
                    table.put_encoded(key_group, k, &slot.value, slot.epoch)?;
                }
            }
        }
        self.states[s] = Table::Typed(table);
        Ok(Some(id))
    }

    #[inline]
    fn typed(&mut self, state: StateId) -> Option<TypedAccess<'_>> {
        match self.states.get_mut(state as usize)? {
            Table::Typed(table) => Some(TypedAccess {
                table: table.as_mut(),
                tracking: self.changes.as_mut().map(|c| Tracking {
                    epoch: c.epoch,
                    state,
                    log: &mut c.open,
                }),
            }),
            Table::Bytes(_) => None,
        }
    }

    #[inline]
    fn get(&mut self, state: StateId, key_group: u32, key: &[u8], out: &mut Vec<u8>) -> Result<bool> {
        let s = self.state(state)?;
        let g = self.group(key_group)?;
        out.clear();
        match &self.states[s] {
            Table::Bytes(groups) => match groups[g].get(key) {
                Some(slot) => {
                    out.extend_from_slice(&slot.value);
                    Ok(true)
                }
                None => Ok(false),
            },
            Table::Typed(t) => t.get_encoded(key_group, key, out),
        }
    }

    #[inline]
    fn put(&mut self, state: StateId, key_group: u32, key: &[u8], value: &[u8]) -> Result<()> {
        let s = self.state(state)?;
        let g = self.group(key_group)?;
        let epoch = self.changes.as_ref().map_or(0, |c| c.epoch);
        let fresh = match &mut self.states[s] {
            Table::Bytes(groups) => put(Arc::make_mut(&mut groups[g]), key, value, epoch),
            Table::Typed(t) => t.put_encoded(key_group, key, value, epoch)?,
        };
        if let Some(c) = self.changes.as_mut().filter(|_| fresh) {
            c.open.mark(key_group, state, key);
        }
        Ok(())
    }

    fn delete(&mut self, state: StateId, key_group: u32, key: &[u8]) -> Result<()> {
        let s = self.state(state)?;
        let g = self.group(key_group)?;
        let existed = match &mut self.states[s] {
            Table::Bytes(groups) => {
                let existed = groups[g].get(key).is_some();
                if existed {
                    Arc::make_mut(&mut groups[g]).remove(key);
                }
                existed
            }
            Table::Typed(t) => t.remove(key_group, key)?,
        };
        if let Some(c) = self.changes.as_mut().filter(|_| existed) {
            c.open.mark(key_group, state, key);
        }
        Ok(())
    }

    /// As puts and deletions, without change tracking (a restore is the
    /// base, not a change).
    fn load(&mut self, batch: &LoadBatch) -> Result<()> {
        for e in batch.iter() {
            self.load_one(e.state, e.key_group, e.key, e.value)?;
        }
        Ok(())
    }

    fn scan_prefix(
        &mut self,
        state: StateId,
        key_group: u32,
        prefix: &[u8],
        visit: &mut KeyValueVisitor<'_>,
    ) -> Result<()> {
        let s = self.state(state)?;
        let g = self.group(key_group)?;
        match &self.states[s] {
            Table::Bytes(groups) => {
                for (k, slot) in groups[g].iter() {
                    if k.starts_with(prefix) {
                        visit(k, &slot.value)?;
                    }
                }
                Ok(())
            }
            Table::Typed(t) => t.visit_prefix(key_group, prefix, visit),
        }
    }

    #[inline]
    fn prefetch(&mut self, key: &KeyRef<'_>) {
        // A lookup whose result is not needed yet: a batch of these has no
        // dependency between them, so the CPU overlaps their cache misses,
        // and the real accesses that follow hit the cache.
        if let Some(g) = key.key_group.checked_sub(self.range.start) {
            for state in &self.states {
                match state {
                    Table::Bytes(groups) => {
                        if let Some(map) = groups.get(g as usize) {
                            std::hint::black_box(map.get(key.bytes).map(|s| s.value.len()));
                        }
                    }
                    Table::Typed(t) => t.prefetch(key),
                }
            }
        }
    }

    fn snapshot(&mut self, checkpoint: CheckpointId) -> Result<Box<dyn StateSnapshot>> {
        let stored = self.stored();
        if let Some(c) = self.changes.as_mut() {
            c.close(checkpoint, stored);
        }
        Ok(Box::new(self.view()))
    }

    fn snapshot_changes(
        &mut self,
        checkpoint: CheckpointId,
        base: CheckpointId,
    ) -> Result<Option<Box<dyn ChangeSnapshot>>> {
        let stored = self.stored();
        // A quarter of the keys or more changed: a full snapshot is not much
        // larger and cheaper to write (a scan of the maps instead of a
        // lookup per changed key; measured break-even near 15 %).
        if !self.changes.as_ref().is_some_and(|c| c.worth_it(base, stored)) {
            // The caller takes a full snapshot, which ends the epoch.
            return Ok(None);
        }
        let view = self.view();
        let Some(c) = self.changes.as_mut() else {
            return Ok(None);
        };
        // The epochs since `base` (shared, not copied: which keys changed is
        // worked out in the asynchronous part), read against the
        // copy-on-write view.
        let Some(epochs) = c.close_since(base, checkpoint, stored) else {
            // Tracking gave up while ending the epoch (too many keys kept).
            return Ok(None);
        };
        Ok(Some(Box::new(MemoryChanges {
            view,
            epochs,
            index: std::sync::OnceLock::new(),
        })))
    }

    fn checkpoint_complete(&mut self, checkpoint: CheckpointId) {
        if let Some(c) = self.changes.as_mut() {
            c.complete(checkpoint);
        }
    }

    fn restored(&mut self, checkpoint: CheckpointId) {
        if let Some(c) = self.changes.as_mut() {
            c.restored(checkpoint);
        }
    }
}

/// The changes since a base: the keys written since, read from the
/// copy-on-write view of the snapshot that ended them.
struct MemoryChanges {
    view: MemorySnapshot,
    /// The epochs since the base.
    epochs: Vec<Arc<ChangeLog>>,
    /// Their keys, sorted by key group and deduplicated, built at the first
    /// visit (in the asynchronous part).
    index: std::sync::OnceLock<ChangedKeys>,
}

impl ChangeSnapshot for MemoryChanges {
    fn key_groups(&self) -> KeyGroupRange {
        self.view.range
    }

    fn state_names(&self) -> Vec<String> {
        self.view.names.clone()
    }

    fn visit_key_group(&self, key_group: u32, visit: &mut ChangeSetVisitor<'_>) -> Result<()> {
        if !self.view.range.contains(key_group) {
            return Ok(());
        }
        let keys = self.index.get_or_init(|| ChangedKeys::of(&self.epochs));
        let g = (key_group - self.view.range.start) as usize;
        let mut buf = Vec::new();
        for (s, k) in keys.of_group(key_group) {
            let value = match &self.view.states[s as usize] {
                View::Bytes(groups) => groups[g].get(k).map(|s| &s.value[..]),
                View::Typed(t) => t.get_encoded(key_group, k, &mut buf)?.then_some(&buf[..]),
            };
            visit(s, k, value)?;
        }
        Ok(())
    }
}

/// A copy-on-write view of a [`MemoryStore`].
struct MemorySnapshot {
    range: KeyGroupRange,
    names: Vec<String>,
    states: Vec<View>,
}

impl MemorySnapshot {
    /// The index of `key_group` in the snapshot's tables.
    fn group(&self, key_group: u32) -> Result<usize> {
        if !self.range.contains(key_group) {
            return Err(Error::InvalidArgument {
                what: format!("key group {key_group}"),
                reason: format!("outside the snapshot's range {}", self.range),
            });
        }
        Ok((key_group - self.range.start) as usize)
    }
}

impl StateSnapshot for MemorySnapshot {
    fn key_groups(&self) -> KeyGroupRange {
        self.range
    }

    fn state_names(&self) -> Vec<String> {
        self.names.clone()
    }

    fn visit_key_group(&self, key_group: u32, visit: &mut SnapshotVisitor<'_>) -> Result<()> {
        let g = self.group(key_group)?;
        for (s, view) in self.states.iter().enumerate() {
            let s = s as StateId;
            match view {
                View::Bytes(groups) => {
                    for (k, slot) in groups[g].iter() {
                        visit(s, k, &slot.value)?;
                    }
                }
                View::Typed(t) => t.visit_key_group(key_group, &mut |k, v| visit(s, k, v))?,
            }
        }
        Ok(())
    }

    fn append_key_group(&self, key_group: u32, out: &mut Vec<u8>) -> Result<u64> {
        let g = self.group(key_group)?;
        let mut entries = 0u64;
        for (s, view) in self.states.iter().enumerate() {
            let s = s as StateId;
            match view {
                View::Bytes(groups) => {
                    for (k, slot) in groups[g].iter() {
                        sluice_core::format::append_entry(out, s, k, &slot.value);
                        entries += 1;
                    }
                }
                View::Typed(t) => entries += t.append_key_group(key_group, s, out)?,
            }
        }
        Ok(entries)
    }
}
