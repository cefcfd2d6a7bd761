//! # sluice-backend-memory
//!
//! The heap state backend ([`MemoryStateBackend`]) and an in-memory
//! checkpoint storage ([`MemoryCheckpointStorage`]) for Sluice.
//!
//! Keyed state lives in one hash map per (state, key group). The
//! synchronous snapshot step is copy-on-write: it clones the `Arc` of every
//! key group's map (cheap); the first write into a key group while a
//! snapshot still holds it copies just that key group.
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

use async_trait::async_trait;
use bytes::Bytes;
use rustc_hash::FxHashMap;
use sluice_core::state::{ChangeSetVisitor, KeyValueVisitor, SnapshotVisitor};
use sluice_core::storage::{dir_prefix, validate_dir, validate_path, Capabilities};
use sluice_core::{
    ChangeSnapshot, CheckpointId, CheckpointStorage, Error, FileListing, KeyGroupRange, KeyedStateStore,
    LoadBatch, Result, StateBackend, StateId, StateSnapshot, StoreScope,
};
use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};

/// Values up to 16 bytes are stored inline in the table (no pointer to
/// chase on a lookup): the common case of sums and counters.
type Bytes16 = smallvec::SmallVec<[u8; 16]>;

/// A key of up to 23 bytes, inline: its length in the last byte. Hashing
/// and comparing it are three word operations (no `memcmp` call).
#[derive(Clone, Copy)]
#[repr(C, align(8))]
struct ShortKey([u8; 24]);

impl ShortKey {
    const MAX: usize = 23;

    #[inline]
    fn new(key: &[u8]) -> Self {
        let mut b = [0u8; 24];
        b[..key.len()].copy_from_slice(key);
        b[23] = key.len() as u8;
        ShortKey(b)
    }

    #[inline]
    fn words(&self) -> [u64; 3] {
        let w = |i: usize| {
            u64::from_ne_bytes([
                self.0[i],
                self.0[i + 1],
                self.0[i + 2],
                self.0[i + 3],
                self.0[i + 4],
                self.0[i + 5],
                self.0[i + 6],
                self.0[i + 7],
            ])
        };
        [w(0), w(8), w(16)]
    }

    #[inline]
    fn as_slice(&self) -> &[u8] {
        &self.0[..usize::from(self.0[23])]
    }
}

impl PartialEq for ShortKey {
    #[inline]
    fn eq(&self, other: &Self) -> bool {
        self.words() == other.words()
    }
}

impl Eq for ShortKey {}

impl std::hash::Hash for ShortKey {
    /// A folded multiply per word, chained, so that every key bit
    /// reaches the low bits a hash table indexes by. (Fx's multiply only
    /// carries upwards: keys differing in their high bytes alone, such as
    /// big-endian integers, collided, and a million of them took a second
    /// to insert.)
    #[inline]
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        #[inline]
        fn fold(x: u64, y: u64) -> u64 {
            let p = u128::from(x) * u128::from(y);
            (p as u64) ^ ((p >> 64) as u64)
        }
        let [a, b, c] = self.words();
        let h = fold(a ^ 0x243F_6A88_85A3_08D3, 0x1319_8A2E_0370_7344);
        let h = fold(h ^ b, 0xA409_3822_299F_31D0);
        state.write_u64(fold(h ^ c, 0x082E_FA98_EC4E_6C89));
    }
}

/// The entries of one (state, key group): short keys inline, longer ones
/// boxed.
#[derive(Clone, Default)]
struct Map {
    short: FxHashMap<ShortKey, Slot>,
    long: FxHashMap<Box<[u8]>, Slot>,
}

/// A value, and the epoch (of change tracking) that last wrote it: a key
/// is recorded as changed at its first write of an epoch only, by a
/// comparison instead of a set insertion per write.
#[derive(Clone, Default)]
struct Slot {
    value: Bytes16,
    /// u64: as small as u32 here (the value is 24 bytes), and never wraps.
    epoch: u64,
}

impl Map {
    #[inline]
    fn get(&self, key: &[u8]) -> Option<&Bytes16> {
        let slot = if key.len() <= ShortKey::MAX {
            self.short.get(&ShortKey::new(key))
        } else {
            self.long.get(key)
        };
        slot.map(|s| &s.value)
    }

    /// Writes `value`, stamped with `epoch`; true if the key was not written
    /// in `epoch` before (it is new, or last written in another epoch).
    #[inline]
    fn put(&mut self, key: &[u8], value: &[u8], epoch: u64) -> bool {
        let slot = if key.len() <= ShortKey::MAX {
            self.short.entry(ShortKey::new(key)).or_default()
        } else {
            match self.long.get_mut(key) {
                Some(v) => v,
                None => self.long.entry(key.into()).or_default(),
            }
        };
        slot.value.clear();
        slot.value.extend_from_slice(value);
        std::mem::replace(&mut slot.epoch, epoch) != epoch
    }

    fn contains_key(&self, key: &[u8]) -> bool {
        self.get(key).is_some()
    }

    fn remove(&mut self, key: &[u8]) {
        if key.len() <= ShortKey::MAX {
            self.short.remove(&ShortKey::new(key));
        } else {
            self.long.remove(key);
        }
    }

    fn iter(&self) -> impl Iterator<Item = (&[u8], &Bytes16)> {
        self.short
            .iter()
            .map(|(k, v)| (k.as_slice(), &v.value))
            .chain(self.long.iter().map(|(k, v)| (&k[..], &v.value)))
    }
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
            changes: scope.track_changes.then(Changes::default),
        }))
    }
}

/// One subtask's keyed state on the heap.
struct MemoryStore {
    range: KeyGroupRange,
    names: Vec<String>,
    /// `states[state][key_group - range.start]`.
    states: Vec<Vec<Arc<Map>>>,
    /// The keys written since each snapshot, when tracking changes.
    changes: Option<Changes>,
}

/// The keys written or deleted in one epoch (between two snapshots), by
/// (key group, state): a key once per first write of the epoch (and again
/// after a deletion; duplicates are removed when the changes are read).
#[derive(Default)]
struct Dirty {
    short: Vec<(u32, StateId, ShortKey)>,
    long: Vec<(u32, StateId, Box<[u8]>)>,
}

impl Dirty {
    #[inline]
    fn mark(&mut self, key_group: u32, state: StateId, key: &[u8]) {
        if key.len() <= ShortKey::MAX {
            self.short.push((key_group, state, ShortKey::new(key)));
        } else {
            self.long.push((key_group, state, key.into()));
        }
    }

    fn len(&self) -> usize {
        self.short.len() + self.long.len()
    }
}

/// Change tracking: the open epoch's keys and the closed epochs', by the
/// snapshot that closed them.
struct Changes {
    /// The open epoch's number (values written in it carry it; never 0,
    /// the stamp of values written without tracking).
    epoch: u64,
    open: Dirty,
    /// Epochs by the checkpoint whose snapshot ended them.
    closed: BTreeMap<CheckpointId, Arc<Dirty>>,
    /// Snapshots (or the restore) incremental snapshots may be relative to.
    bases: std::collections::BTreeSet<CheckpointId>,
}

impl Default for Changes {
    fn default() -> Self {
        Changes {
            epoch: 1,
            open: Dirty::default(),
            closed: BTreeMap::new(),
            bases: Default::default(),
        }
    }
}

impl Changes {
    /// Keys remembered before tracking gives up (the base's completion is
    /// overdue): the next snapshot is then full.
    const MAX_KEYS: usize = 1 << 26;

    /// Ends the open epoch at snapshot `id`.
    fn close(&mut self, id: CheckpointId) {
        self.epoch += 1;
        self.closed.insert(id, Arc::new(std::mem::take(&mut self.open)));
        self.bases.insert(id);
        let kept: usize = self.closed.values().map(|d| d.len()).sum();
        if kept > Self::MAX_KEYS {
            // Forget everything but this snapshot: later ones are relative to it.
            self.closed.clear();
            self.bases.clear();
            self.bases.insert(id);
        }
    }
}

impl MemoryStore {
    #[inline]
    fn slot(&self, state: StateId, key_group: u32) -> Result<(usize, usize)> {
        let s = state as usize;
        if s >= self.states.len() {
            return Err(Error::InvalidArgument {
                what: format!("state id {state}"),
                reason: "not registered in this store".into(),
            });
        }
        if !self.range.contains(key_group) {
            return Err(Error::InvalidArgument {
                what: format!("key group {key_group}"),
                reason: format!("outside this store's range {}", self.range),
            });
        }
        Ok((s, (key_group - self.range.start) as usize))
    }
}

impl KeyedStateStore for MemoryStore {
    fn register_state(&mut self, name: &str) -> Result<StateId> {
        if let Some(i) = self.names.iter().position(|n| n == name) {
            return Ok(i as StateId);
        }
        if self.names.len() >= StateId::MAX as usize {
            return Err(Error::InvalidArgument {
                what: format!("state {name:?}"),
                reason: "too many states".into(),
            });
        }
        self.names.push(name.to_string());
        self.states
            .push((0..self.range.len()).map(|_| Arc::new(Map::default())).collect());
        Ok((self.names.len() - 1) as StateId)
    }

    #[inline]
    fn get(&mut self, state: StateId, key_group: u32, key: &[u8], out: &mut Vec<u8>) -> Result<bool> {
        let (s, g) = self.slot(state, key_group)?;
        out.clear();
        match self.states[s][g].get(key) {
            Some(v) => {
                out.extend_from_slice(v);
                Ok(true)
            }
            None => Ok(false),
        }
    }

    #[inline]
    fn put(&mut self, state: StateId, key_group: u32, key: &[u8], value: &[u8]) -> Result<()> {
        let (s, g) = self.slot(state, key_group)?;
        let map = Arc::make_mut(&mut self.states[s][g]);
        if let Some(c) = self.changes.as_mut() {
            if map.put(key, value, c.epoch) {
                c.open.mark(key_group, state, key);
            }
        } else {
            map.put(key, value, 0);
        }
        Ok(())
    }

    fn delete(&mut self, state: StateId, key_group: u32, key: &[u8]) -> Result<()> {
        let (s, g) = self.slot(state, key_group)?;
        if self.states[s][g].contains_key(key) {
            Arc::make_mut(&mut self.states[s][g]).remove(key);
            if let Some(c) = self.changes.as_mut() {
                c.open.mark(key_group, state, key);
            }
        }
        Ok(())
    }

    /// As puts and deletions, without change tracking (a restore is the
    /// base, not a change).
    fn load(&mut self, batch: &LoadBatch) -> Result<()> {
        for e in batch.iter() {
            let (s, g) = self.slot(e.state, e.key_group)?;
            let map = Arc::make_mut(&mut self.states[s][g]);
            match e.value {
                Some(v) => {
                    map.put(e.key, v, 0);
                }
                None => map.remove(e.key),
            }
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
        let (s, g) = self.slot(state, key_group)?;
        for (k, v) in self.states[s][g].iter() {
            if k.starts_with(prefix) {
                visit(k, v)?;
            }
        }
        Ok(())
    }

    #[inline]
    fn prefetch(&mut self, key_group: u32, key: &[u8]) {
        // A lookup whose result is not needed yet: a batch of these has no
        // dependency between them, so the CPU overlaps their cache misses,
        // and the real accesses that follow hit the cache.
        if let Some(g) = key_group.checked_sub(self.range.start) {
            for state in &self.states {
                if let Some(map) = state.get(g as usize) {
                    std::hint::black_box(map.get(key).map(|v| v.len()));
                }
            }
        }
    }

    fn snapshot(&mut self, checkpoint: CheckpointId) -> Result<Box<dyn StateSnapshot>> {
        if let Some(c) = self.changes.as_mut() {
            c.close(checkpoint);
        }
        Ok(Box::new(MemorySnapshot {
            range: self.range,
            names: self.names.clone(),
            states: self.states.clone(),
        }))
    }

    fn snapshot_changes(
        &mut self,
        checkpoint: CheckpointId,
        base: CheckpointId,
    ) -> Result<Option<Box<dyn ChangeSnapshot>>> {
        let Some(c) = self.changes.as_mut() else {
            return Ok(None);
        };
        if !c.bases.contains(&base) {
            // The caller takes a full snapshot, which ends the epoch.
            return Ok(None);
        }
        // A quarter of the keys or more changed: a full snapshot is not much
        // larger and cheaper to write (a scan of the maps instead of a
        // lookup per changed key; measured break-even near 15 %).
        let changed: usize =
            c.open.len() + c.closed.range(base.next()..).map(|(_, e)| e.len()).sum::<usize>();
        let stored: usize = self
            .states
            .iter()
            .flatten()
            .map(|m| m.short.len() + m.long.len())
            .sum();
        if changed.saturating_mul(4) > stored {
            return Ok(None);
        }
        c.close(checkpoint);
        // The epochs since `base` (shared, not copied: which keys changed is
        // worked out in the asynchronous part), read against the
        // copy-on-write view.
        let epochs = c
            .closed
            .range(base.next()..=checkpoint)
            .map(|(_, e)| e.clone())
            .collect();
        Ok(Some(Box::new(MemoryChanges {
            view: MemorySnapshot {
                range: self.range,
                names: self.names.clone(),
                states: self.states.clone(),
            },
            epochs,
            index: std::sync::OnceLock::new(),
        })))
    }

    fn checkpoint_complete(&mut self, checkpoint: CheckpointId) {
        if let Some(c) = self.changes.as_mut() {
            // Later incremental snapshots are relative to `checkpoint` or newer.
            c.closed = c.closed.split_off(&checkpoint.next());
            c.bases = c.bases.split_off(&checkpoint);
        }
    }

    fn restored(&mut self, checkpoint: CheckpointId) {
        if let Some(c) = self.changes.as_mut() {
            // The restore's writes are the base, not changes.
            let epoch = c.epoch;
            *c = Changes::default();
            c.epoch = epoch + 1;
            c.bases.insert(checkpoint);
        }
    }
}

/// The changes since a base: the keys written since, read from the
/// copy-on-write view of the snapshot that ended them.
struct MemoryChanges {
    view: MemorySnapshot,
    /// The epochs since the base.
    epochs: Vec<Arc<Dirty>>,
    /// Their keys, sorted by key group and deduplicated, built at the first
    /// visit (in the asynchronous part).
    index: std::sync::OnceLock<ChangedKeys>,
}

/// The keys changed in some epochs, sorted by (key group, state, key).
struct ChangedKeys {
    short: Vec<(u32, StateId, ShortKey)>,
    long: Vec<(u32, StateId, Box<[u8]>)>,
}

impl ChangedKeys {
    fn of(epochs: &[Arc<Dirty>]) -> Self {
        let mut short: Vec<(u32, StateId, ShortKey)> =
            epochs.iter().flat_map(|e| e.short.iter().copied()).collect();
        short.sort_unstable_by(|a, b| (a.0, a.1, a.2.as_slice()).cmp(&(b.0, b.1, b.2.as_slice())));
        short.dedup();
        let mut long: Vec<(u32, StateId, Box<[u8]>)> =
            epochs.iter().flat_map(|e| e.long.iter().cloned()).collect();
        long.sort_unstable();
        long.dedup();
        ChangedKeys { short, long }
    }
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
        let short = {
            let from = keys.short.partition_point(|e| e.0 < key_group);
            let to = keys.short.partition_point(|e| e.0 <= key_group);
            keys.short[from..to].iter().map(|(_, s, k)| (*s, k.as_slice()))
        };
        let long = {
            let from = keys.long.partition_point(|e| e.0 < key_group);
            let to = keys.long.partition_point(|e| e.0 <= key_group);
            keys.long[from..to].iter().map(|(_, s, k)| (*s, &k[..]))
        };
        for (s, k) in short.chain(long) {
            let value = self.view.states[s as usize][g].get(k);
            visit(s, k, value.map(|v| &v[..]))?;
        }
        Ok(())
    }
}

/// A copy-on-write view of a [`MemoryStore`].
struct MemorySnapshot {
    range: KeyGroupRange,
    names: Vec<String>,
    states: Vec<Vec<Arc<Map>>>,
}

impl StateSnapshot for MemorySnapshot {
    fn key_groups(&self) -> KeyGroupRange {
        self.range
    }

    fn state_names(&self) -> Vec<String> {
        self.names.clone()
    }

    fn visit_key_group(&self, key_group: u32, visit: &mut SnapshotVisitor<'_>) -> Result<()> {
        if !self.range.contains(key_group) {
            return Err(Error::InvalidArgument {
                what: format!("key group {key_group}"),
                reason: format!("outside the snapshot's range {}", self.range),
            });
        }
        let g = (key_group - self.range.start) as usize;
        for (s, groups) in self.states.iter().enumerate() {
            for (k, v) in groups[g].iter() {
                visit(s as StateId, k, v)?;
            }
        }
        Ok(())
    }
}

#[derive(Debug, Default)]
struct Inner {
    files: BTreeMap<String, Bytes>,
}

/// Checkpoints in memory. Clones share the same data, so a job restarted in
/// the same process finds its checkpoints; they are gone when the process
/// ends (not [`Capabilities::durable`]).
#[derive(Debug, Clone, Default)]
pub struct MemoryCheckpointStorage {
    inner: Arc<Mutex<Inner>>,
}

impl MemoryCheckpointStorage {
    /// An empty storage.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Total bytes held (files and metadata).
    pub fn total_bytes(&self) -> u64 {
        self.lock().files.values().map(|b| b.len() as u64).sum()
    }
}

#[async_trait]
impl CheckpointStorage for MemoryCheckpointStorage {
    fn describe(&self) -> String {
        "memory".into()
    }

    async fn write_file(&self, path: &str, data: Bytes) -> Result<()> {
        validate_path(path)?;
        let mut inner = self.lock();
        if inner.files.contains_key(path) {
            return Err(Error::AlreadyExists {
                what: path.to_string(),
            });
        }
        inner.files.insert(path.to_string(), data);
        Ok(())
    }

    async fn commit_file(&self, path: &str, data: Bytes) -> Result<()> {
        // Memory is as durable as it gets here: the same as a write.
        self.write_file(path, data).await
    }

    async fn read(&self, path: &str, range: Option<Range<u64>>) -> Result<Bytes> {
        let file = self
            .lock()
            .files
            .get(path)
            .cloned()
            .ok_or_else(|| Error::not_found(path))?;
        let Some(range) = range else {
            return Ok(file);
        };
        let len = file.len() as u64;
        if range.start > range.end || range.end > len {
            return Err(Error::corrupt(
                path,
                format!(
                    "range {}..{} is outside the file's {len} bytes",
                    range.start, range.end
                ),
            ));
        }
        Ok(file.slice(range.start as usize..range.end as usize))
    }

    async fn list_files(&self, dir: &str) -> Result<Vec<FileListing>> {
        validate_dir(dir, true)?;
        let prefix = dir_prefix(dir);
        Ok(self
            .lock()
            .files
            .range(prefix.clone()..)
            .take_while(|(p, _)| p.starts_with(&prefix))
            .map(|(p, b)| FileListing {
                path: p.clone(),
                size: b.len() as u64,
            })
            .collect())
    }

    async fn delete_file(&self, path: &str) -> Result<()> {
        validate_path(path)?;
        self.lock().files.remove(path);
        Ok(())
    }

    async fn delete_dir(&self, dir: &str) -> Result<()> {
        validate_dir(dir, false)?;
        let prefix = dir_prefix(dir);
        // One lock: the directory disappears at once.
        self.lock().files.retain(|p, _| !p.starts_with(&prefix));
        Ok(())
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            atomic_create: true,
            durable: false,
        }
    }
}
