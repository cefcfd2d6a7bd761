//! [`RedbStateBackend`]: keyed working state on disk, larger than memory.
//!
//! One redb file per subtask (in a scratch directory; removed when the
//! store is dropped: working state is rebuilt from checkpoints after a
//! failure, so it is never made durable on its own). Keys are
//! `state id (u16 BE) | key group (u32 BE) | key`, so one state's key group
//! is one contiguous range.
//!
//! Writes go to a bounded in-memory buffer of dirty entries and tombstones.
//! A checkpoint's synchronous step *freezes* the buffer (it becomes an
//! immutable layer; a new buffer takes the writes) and opens a read
//! transaction: the snapshot is that MVCC view with the frozen layers on
//! top, which the asynchronous step merges and encodes while processing
//! goes on. Reads look in the buffer, the frozen layers (newest first), a
//! bounded read cache, then redb. The buffer and the layers are flushed
//! into redb in one write transaction when together they exceed the write
//! buffer size, or when there are [`MAX_LAYERS`] layers.

use crate::corrupt_or_storage;
use redb::{
    Database, Durability, ReadOnlyTable, ReadableDatabase, ReadableTable, ReadableTableMetadata,
    TableDefinition,
};
use rustc_hash::FxHashMap;
use sluice_core::state::{ChangeSetVisitor, KeyValueVisitor, SnapshotVisitor};
use sluice_core::{
    ChangeSnapshot, CheckpointId, Error, KeyGroupRange, KeyedStateStore, LoadBatch, LoadEntry, Result,
    StateBackend, StateId, StateSnapshot, StoreScope,
};
use std::collections::BTreeMap;
use std::ops::Bound;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

const STATE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("state");
const HEADER: usize = 6;
/// Every this many buffer flushes, one is durable so that redb can reuse
/// the pages that earlier transactions freed.
const DURABLE_EVERY: u64 = 8;
/// Frozen layers kept before they are flushed into redb (each one costs
/// reads of keys not in the newer ones a lookup).
pub const MAX_LAYERS: usize = 8;
/// Heap bytes an entry of a write buffer or the read cache costs beyond its
/// key and value bytes (the hash table's slot, and an allocation each for
/// key and value): counted so that the configured bounds are the memory
/// really used.
const ENTRY_OVERHEAD: usize = 96;

/// Dirty entries (`None`: a tombstone) by full key.
type Dirty = FxHashMap<Vec<u8>, Option<Vec<u8>>>;

/// Dirty entries sorted by full key.
type SortedDirty = Vec<(Vec<u8>, Option<Vec<u8>>)>;

/// Memory bounds of the redb state backend.
#[derive(Debug, Clone)]
pub struct RedbStateConfig {
    /// Directory of the per-subtask state files.
    pub dir: PathBuf,
    /// Bytes of dirty entries buffered before a flush.
    pub write_buffer_bytes: usize,
    /// Bytes of clean entries kept in the read cache.
    pub read_cache_bytes: usize,
    /// redb's own page cache, in bytes.
    pub redb_cache_bytes: usize,
}

impl RedbStateConfig {
    /// Defaults: 32 MiB write buffer, 32 MiB read cache, 64 MiB page cache
    /// per subtask, files under `dir`.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        RedbStateConfig {
            dir: dir.into(),
            write_buffer_bytes: 32 << 20,
            read_cache_bytes: 32 << 20,
            redb_cache_bytes: 64 << 20,
        }
    }
}

/// Keyed state in redb files: larger than memory.
#[derive(Debug)]
pub struct RedbStateBackend {
    config: RedbStateConfig,
    next: AtomicU64,
}

impl RedbStateBackend {
    /// A backend keeping its files under `dir` (created if missing).
    pub fn new(dir: impl Into<PathBuf>) -> Result<Self> {
        Self::with_config(RedbStateConfig::new(dir))
    }

    /// A backend with explicit memory bounds.
    pub fn with_config(config: RedbStateConfig) -> Result<Self> {
        std::fs::create_dir_all(&config.dir)
            .map_err(|e| Error::storage(format!("state directory {}", config.dir.display()), e))?;
        Ok(RedbStateBackend {
            config,
            next: AtomicU64::new(0),
        })
    }
}

fn safe(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

impl StateBackend for RedbStateBackend {
    fn name(&self) -> &str {
        "redb"
    }

    fn open_store(&self, scope: &StoreScope) -> Result<Box<dyn KeyedStateStore>> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let path = self.config.dir.join(format!(
            "{}-{}-{}-{}-{n}.redb",
            safe(&scope.job),
            safe(scope.operator.as_str()),
            scope.subtask,
            std::process::id()
        ));
        let name = path.display().to_string();
        // A left-over of a crashed process with the same pid and counter is
        // scratch state of this backend: start over.
        let _ = std::fs::remove_file(&path);
        let db = Database::builder()
            .set_cache_size(self.config.redb_cache_bytes)
            .create(&path)
            .map_err(|e| Error::storage(&name, e))?;
        let tx = db.begin_write().map_err(|e| Error::storage(&name, e))?;
        tx.open_table(STATE).map_err(|e| Error::storage(&name, e))?;
        tx.commit().map_err(|e| Error::storage(&name, e))?;
        Ok(Box::new(RedbStore {
            db: Some(Arc::new(db)),
            path,
            name,
            range: scope.key_groups,
            names: Vec::new(),
            buffer: FxHashMap::default(),
            buffer_bytes: 0,
            frozen: Vec::new(),
            frozen_bytes: 0,
            cache: FxHashMap::default(),
            cache_bytes: 0,
            reader: None,
            full: Vec::with_capacity(64),
            flushes: 0,
            config: self.config.clone(),
            tracking: scope.track_changes.then(Tracking::default),
        }))
    }
}

struct RedbStore {
    db: Option<Arc<Database>>,
    path: PathBuf,
    name: String,
    range: KeyGroupRange,
    names: Vec<String>,
    buffer: Dirty,
    buffer_bytes: usize,
    /// Buffers frozen by snapshots, oldest first; not in redb yet.
    frozen: Vec<Arc<Dirty>>,
    frozen_bytes: usize,
    cache: FxHashMap<Vec<u8>, Vec<u8>>,
    cache_bytes: usize,
    reader: Option<ReadOnlyTable<&'static [u8], &'static [u8]>>,
    full: Vec<u8>,
    flushes: u64,
    config: RedbStateConfig,
    /// The changes since recent snapshots, when tracking them.
    tracking: Option<Tracking>,
}

/// Change tracking for incremental snapshots: the write buffers of each
/// epoch (between two snapshots), kept as the shared layers they already
/// are — a buffer flushed into redb mid-epoch stays here as a part.
#[derive(Default)]
struct Tracking {
    /// Parts of the open epoch flushed before its end.
    open: Vec<Arc<Dirty>>,
    /// Closed epochs by the snapshot that ended them, their parts oldest first.
    closed: BTreeMap<CheckpointId, Vec<Arc<Dirty>>>,
    /// Snapshots (or the restore) incremental snapshots may be relative to.
    bases: std::collections::BTreeSet<CheckpointId>,
    /// Approximate bytes the parts hold.
    bytes: usize,
}

impl Tracking {
    /// Bytes of changes kept before tracking gives up (the base's
    /// completion is overdue): the next snapshot is then full.
    const MAX_BYTES: usize = 128 << 20;

    /// Ends the open epoch at snapshot `id`, with `last` (the buffer frozen
    /// by the snapshot) as its newest part.
    fn close(&mut self, id: CheckpointId, last: Option<Arc<Dirty>>) {
        let mut parts = std::mem::take(&mut self.open);
        parts.extend(last);
        self.bytes += parts.iter().map(|p| dirty_bytes(p)).sum::<usize>();
        self.closed.insert(id, parts);
        self.bases.insert(id);
        if self.bytes > Self::MAX_BYTES {
            self.closed.clear();
            self.bases.clear();
            self.bases.insert(id);
            self.bytes = 0;
        }
    }
}

/// Approximate heap bytes of a layer.
fn dirty_bytes(d: &Dirty) -> usize {
    d.iter()
        .map(|(k, v)| k.len() + v.as_ref().map_or(0, |v| v.len()) + ENTRY_OVERHEAD)
        .sum()
}

impl Drop for RedbStore {
    fn drop(&mut self) {
        self.reader = None;
        self.db = None;
        let _ = std::fs::remove_file(&self.path);
    }
}

fn compose(out: &mut Vec<u8>, state: StateId, key_group: u32, key: &[u8]) {
    out.clear();
    out.extend_from_slice(&state.to_be_bytes());
    out.extend_from_slice(&key_group.to_be_bytes());
    out.extend_from_slice(key);
}

impl RedbStore {
    fn db(&self) -> Result<&Arc<Database>> {
        self.db
            .as_ref()
            .ok_or_else(|| Error::storage(&self.name, "store is closed"))
    }

    fn check(&self, state: StateId, key_group: u32) -> Result<()> {
        if state as usize >= self.names.len() {
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
        Ok(())
    }

    fn reader(&mut self) -> Result<&ReadOnlyTable<&'static [u8], &'static [u8]>> {
        if self.reader.is_none() {
            let read = self
                .db()?
                .begin_read()
                .map_err(|e| Error::storage(&self.name, e))?;
            self.reader = Some(
                read.open_table(STATE)
                    .map_err(|e| Error::storage(&self.name, e))?,
            );
        }
        self.reader
            .as_ref()
            .ok_or_else(|| Error::storage(&self.name, "no read transaction"))
    }

    fn cache_insert(&mut self, key: Vec<u8>, value: Vec<u8>) {
        let size = key.len() + value.len() + ENTRY_OVERHEAD;
        if self.cache_bytes + size > self.config.read_cache_bytes {
            self.cache.clear();
            self.cache_bytes = 0;
        }
        self.cache_bytes += size;
        if let Some(old) = self.cache.insert(key, value) {
            self.cache_bytes = self.cache_bytes.saturating_sub(old.len());
        }
    }

    /// A write transaction: non-durable, except every `DURABLE_EVERY`th (so
    /// that redb can reuse freed pages) and when `durable`.
    fn write_tx(&mut self, durable: bool) -> Result<redb::WriteTransaction> {
        self.flushes += 1;
        let durable = durable || self.flushes % DURABLE_EVERY == 0;
        let mut tx = self
            .db()?
            .begin_write()
            .map_err(|e| Error::storage(&self.name, e))?;
        tx.set_durability(if durable {
            Durability::Immediate
        } else {
            Durability::None
        })
        .map_err(|e| Error::storage(&self.name, e))?;
        Ok(tx)
    }

    /// Writes the frozen layers and the buffer in one transaction.
    fn flush(&mut self, durable: bool) -> Result<()> {
        if self.buffer.is_empty() && self.frozen.is_empty() && !durable {
            return Ok(());
        }
        let name = self.name.clone();
        let tx = self.write_tx(durable)?;
        // Newer layers win; sorted, the inserts walk the B-tree in order
        // instead of at random.
        let layers: Vec<Arc<Dirty>> = if let Some(t) = self.tracking.as_mut() {
            // The open epoch's buffer stays a tracked part: share it.
            let buffer = Arc::new(std::mem::take(&mut self.buffer));
            if !buffer.is_empty() {
                t.open.push(buffer.clone());
            }
            let mut layers = std::mem::take(&mut self.frozen);
            layers.push(buffer);
            layers
        } else {
            let mut layers = std::mem::take(&mut self.frozen);
            layers.push(Arc::new(std::mem::take(&mut self.buffer)));
            layers
        };
        // Merged by reference (the layers are shared with change tracking:
        // no copy of every entry), newest wins, sorted so that the inserts
        // walk the B-tree in order instead of at random.
        let dirty = merge_layers_ref(&layers);
        self.buffer_bytes = 0;
        self.frozen_bytes = 0;
        {
            let mut table = tx.open_table(STATE).map_err(|e| Error::storage(&name, e))?;
            for (k, v) in &dirty {
                match v {
                    Some(v) => {
                        table.insert(*k, *v).map_err(|e| Error::storage(&name, e))?;
                    }
                    None => {
                        table.remove(*k).map_err(|e| Error::storage(&name, e))?;
                    }
                }
            }
        }
        tx.commit().map_err(|e| Error::storage(&name, e))?;
        self.reader = None;
        let written: Vec<(Vec<u8>, Option<Vec<u8>>)> = dirty
            .into_iter()
            .map(|(k, v)| (k.to_vec(), v.map(<[u8]>::to_vec)))
            .collect();
        drop(layers);
        for (k, v) in written {
            match v {
                Some(v) => self.cache_insert(k, v),
                None => {
                    if let Some(old) = self.cache.remove(&k) {
                        self.cache_bytes = self
                            .cache_bytes
                            .saturating_sub(k.len() + old.len() + ENTRY_OVERHEAD);
                    }
                }
            }
        }
        Ok(())
    }

    fn buffer_write(&mut self, value: Option<&[u8]>) -> Result<()> {
        let added = self.full.len() + value.map_or(0, |v| v.len()) + ENTRY_OVERHEAD;
        match self.buffer.get_mut(self.full.as_slice()) {
            Some(slot) => match (slot, value) {
                (Some(old), Some(v)) => {
                    old.clear();
                    old.extend_from_slice(v);
                }
                (slot, v) => *slot = v.map(|v| v.to_vec()),
            },
            None => {
                self.buffer.insert(self.full.clone(), value.map(|v| v.to_vec()));
                self.buffer_bytes += added;
            }
        }
        if self.buffer_bytes + self.frozen_bytes > self.config.write_buffer_bytes {
            self.flush(false)?;
        }
        Ok(())
    }

    /// The newest dirty entry of the full key `self.full`, if any.
    fn dirty(&self) -> Option<&Option<Vec<u8>>> {
        let key = self.full.as_slice();
        self.buffer
            .get(key)
            .or_else(|| self.frozen.iter().rev().find_map(|l| l.get(key)))
    }
}

impl KeyedStateStore for RedbStore {
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
        Ok((self.names.len() - 1) as StateId)
    }

    fn get(&mut self, state: StateId, key_group: u32, key: &[u8], out: &mut Vec<u8>) -> Result<bool> {
        self.check(state, key_group)?;
        compose(&mut self.full, state, key_group, key);
        out.clear();
        if let Some(entry) = self.dirty() {
            return Ok(match entry {
                Some(v) => {
                    out.extend_from_slice(v);
                    true
                }
                None => false,
            });
        }
        if let Some(v) = self.cache.get(self.full.as_slice()) {
            out.extend_from_slice(v);
            return Ok(true);
        }
        let full = std::mem::take(&mut self.full);
        let name = self.name.clone();
        let found = match self
            .reader()?
            .get(full.as_slice())
            .map_err(|e| corrupt_or_storage(&name, e))?
        {
            Some(v) => {
                out.extend_from_slice(v.value());
                true
            }
            None => false,
        };
        if found {
            self.cache_insert(full.clone(), out.clone());
        }
        self.full = full;
        Ok(found)
    }

    fn put(&mut self, state: StateId, key_group: u32, key: &[u8], value: &[u8]) -> Result<()> {
        self.check(state, key_group)?;
        compose(&mut self.full, state, key_group, key);
        self.buffer_write(Some(value))
    }

    fn delete(&mut self, state: StateId, key_group: u32, key: &[u8]) -> Result<()> {
        self.check(state, key_group)?;
        compose(&mut self.full, state, key_group, key);
        self.buffer_write(None)
    }

    fn scan_prefix(
        &mut self,
        state: StateId,
        key_group: u32,
        prefix: &[u8],
        visit: &mut KeyValueVisitor<'_>,
    ) -> Result<()> {
        self.check(state, key_group)?;
        let mut start = Vec::new();
        compose(&mut start, state, key_group, prefix);
        let mut end = Vec::new();
        compose(&mut end, state, key_group + 1, &[]);
        let name = self.name.clone();
        let mut merged: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
        for row in self
            .reader()?
            .range(start.as_slice()..end.as_slice())
            .map_err(|e| corrupt_or_storage(&name, e))?
        {
            let (k, v) = row.map_err(|e| corrupt_or_storage(&name, e))?;
            if !k.value().starts_with(&start) {
                break;
            }
            merged.insert(k.value().to_vec(), Some(v.value().to_vec()));
        }
        for layer in self
            .frozen
            .iter()
            .map(|l| l.as_ref())
            .chain(std::iter::once(&self.buffer))
        {
            for (k, v) in layer {
                if k.starts_with(&start) {
                    merged.insert(k.clone(), v.clone());
                }
            }
        }
        for (k, v) in merged {
            if let Some(v) = v {
                visit(&k[HEADER..], &v)?;
            }
        }
        Ok(())
    }

    fn prefetch(&mut self, _key: &sluice_core::heap::KeyRef<'_>) {}

    fn snapshot(&mut self, checkpoint: CheckpointId) -> Result<Box<dyn StateSnapshot>> {
        self.end_epoch(checkpoint)?;
        let read = self
            .db()?
            .begin_read()
            .map_err(|e| Error::storage(&self.name, e))?;
        let table = read
            .open_table(STATE)
            .map_err(|e| Error::storage(&self.name, e))?;
        Ok(Box::new(RedbSnapshot {
            table,
            layers: self.frozen.clone(),
            merged: std::sync::OnceLock::new(),
            names: self.names.clone(),
            range: self.range,
            name: self.name.clone(),
        }))
    }

    fn snapshot_changes(
        &mut self,
        checkpoint: CheckpointId,
        base: CheckpointId,
    ) -> Result<Option<Box<dyn ChangeSnapshot>>> {
        let Some(t) = self.tracking.as_ref().filter(|t| t.bases.contains(&base)) else {
            // The caller takes a full snapshot, which ends the epoch.
            return Ok(None);
        };
        // A quarter of the entries or more changed: a full snapshot is not
        // much larger and cheaper to write (a merge-join with redb's rows
        // instead of merging every write buffer since the base).
        let parts = t
            .open
            .iter()
            .chain(t.closed.range(base.next()..).flat_map(|(_, p)| p));
        let changed = self.buffer.len() + parts.map(|p| p.len()).sum::<usize>();
        let buffered = self.buffer.len() + self.frozen.iter().map(|l| l.len()).sum::<usize>();
        let stored = self.reader()?.len().map_err(|e| Error::storage(&self.name, e))?;
        if (changed as u64).saturating_mul(4) > stored + buffered as u64 {
            return Ok(None);
        }
        self.end_epoch(checkpoint)?;
        let Some(t) = self.tracking.as_ref() else {
            return Ok(None);
        };
        if !t.bases.contains(&base) {
            // Tracking gave up while ending the epoch (too much kept).
            return Ok(None);
        }
        // The epochs after `base`, oldest first (newer parts win), merged
        // in the asynchronous part.
        let parts: Vec<Arc<Dirty>> = t
            .closed
            .range(base.next()..=checkpoint)
            .flat_map(|(_, parts)| parts.iter().cloned())
            .collect();
        Ok(Some(Box::new(RedbChanges {
            parts,
            merged: std::sync::OnceLock::new(),
            names: self.names.clone(),
            range: self.range,
        })))
    }

    /// Sorted, straight into redb in one transaction: no write buffer, no
    /// change tracking, no read cache (a restore is read from redb).
    fn load(&mut self, batch: &LoadBatch) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        for e in batch.iter() {
            self.check(e.state, e.key_group)?;
        }
        // Buffered entries would shadow the loaded ones: they go first.
        self.flush(false)?;
        let name = self.name.clone();
        let tx = self.write_tx(false)?;
        {
            let mut table = tx.open_table(STATE).map_err(|e| Error::storage(&name, e))?;
            let sorted = batch.sorted();
            // The last entry of each key.
            let last: Vec<&LoadEntry<'_>> = sorted
                .iter()
                .enumerate()
                .filter(|(i, e)| {
                    sorted
                        .get(i + 1)
                        .is_none_or(|n| (n.state, n.key_group, n.key) != (e.state, e.key_group, e.key))
                })
                .map(|(_, e)| e)
                .collect();
            let key = |e: &LoadEntry<'_>| {
                let mut full = Vec::with_capacity(HEADER + e.key.len());
                compose(&mut full, e.state, e.key_group, e.key);
                full
            };
            let (first, end) = match (last.first(), last.last()) {
                (Some(f), Some(l)) => (key(f), key(l)),
                _ => return Ok(()),
            };
            let gap = table
                .range(first.as_slice()..=end.as_slice())
                .map_err(|e| Error::storage(&name, e))?
                .next()
                .is_none();
            let mut full = Vec::with_capacity(64);
            if gap {
                // Nothing stored between the batch's first and last key (a
                // restore into an empty store, or of the next key groups):
                // appended through a cursor, in order, about three times
                // faster than inserts; deletions have nothing to delete.
                let mut cursor = table
                    .lower_bound_mut(Bound::Included(first.as_slice()))
                    .map_err(|e| Error::storage(&name, e))?;
                for e in last {
                    if let Some(v) = e.value {
                        compose(&mut full, e.state, e.key_group, e.key);
                        cursor
                            .insert_before(full.as_slice(), v)
                            .map_err(|e| Error::storage(&name, e))?;
                    }
                }
                cursor.close().map_err(|e| Error::storage(&name, e))?;
            } else {
                for e in last {
                    compose(&mut full, e.state, e.key_group, e.key);
                    match e.value {
                        Some(v) => {
                            table
                                .insert(full.as_slice(), v)
                                .map_err(|e| Error::storage(&name, e))?;
                        }
                        None => {
                            table
                                .remove(full.as_slice())
                                .map_err(|e| Error::storage(&name, e))?;
                        }
                    }
                }
            }
        }
        tx.commit().map_err(|e| Error::storage(&name, e))?;
        self.reader = None;
        self.cache.clear();
        self.cache_bytes = 0;
        Ok(())
    }

    fn checkpoint_complete(&mut self, checkpoint: CheckpointId) {
        if let Some(t) = self.tracking.as_mut() {
            // Later incremental snapshots are relative to `checkpoint` or newer.
            t.closed = t.closed.split_off(&checkpoint.next());
            t.bases = t.bases.split_off(&checkpoint);
            t.bytes = t.closed.values().flatten().map(|p| dirty_bytes(p)).sum();
        }
    }

    fn restored(&mut self, checkpoint: CheckpointId) {
        if self.tracking.is_some() {
            // The restore's writes are the base, not changes: into redb, and
            // tracking starts over.
            let _ = self.flush(false);
            self.tracking = Some(Tracking::default());
            if let Some(t) = self.tracking.as_mut() {
                t.bases.insert(checkpoint);
            }
        }
    }
}

impl RedbStore {
    /// The synchronous step shared by full and incremental snapshots: the
    /// buffer becomes a frozen layer (cheap; unless there are too many,
    /// then everything goes into redb first) and, when tracking, the last
    /// part of epoch `checkpoint`.
    fn end_epoch(&mut self, checkpoint: CheckpointId) -> Result<()> {
        let mut last = None;
        if !self.buffer.is_empty() {
            let layer = Arc::new(std::mem::take(&mut self.buffer));
            last = Some(layer.clone());
            self.frozen.push(layer);
            self.frozen_bytes += std::mem::take(&mut self.buffer_bytes);
        }
        if let Some(t) = self.tracking.as_mut() {
            t.close(checkpoint, last);
        }
        if self.frozen.len() > MAX_LAYERS {
            self.flush(false)?;
        }
        Ok(())
    }
}

/// Write buffers, oldest first, merged by reference (the newest entry of
/// a key wins) and sorted by key.
fn merge_layers_ref(layers: &[Arc<Dirty>]) -> Vec<(&[u8], Option<&[u8]>)> {
    let mut newest: FxHashMap<&[u8], Option<&[u8]>> = FxHashMap::default();
    for layer in layers.iter().rev() {
        for (k, v) in layer.iter() {
            newest.entry(k.as_slice()).or_insert(v.as_deref());
        }
    }
    let mut m: Vec<(&[u8], Option<&[u8]>)> = newest.into_iter().collect();
    m.sort_unstable_by(|a, b| a.0.cmp(b.0));
    m
}

/// Write buffers, oldest first, merged (the newest entry of a key wins)
/// and sorted by key.
fn merge_layers(layers: &[Arc<Dirty>]) -> SortedDirty {
    merge_layers_ref(layers)
        .into_iter()
        .map(|(k, v)| (k.to_vec(), v.map(<[u8]>::to_vec)))
        .collect()
}

/// The changes of a [`RedbStore`] since a base: its epochs' write buffers
/// merged (newest wins), sorted by key.
struct RedbChanges {
    /// The write buffers since the base, oldest first.
    parts: Vec<Arc<Dirty>>,
    /// They merged (newest wins) and sorted, built at the first visit.
    merged: std::sync::OnceLock<SortedDirty>,
    names: Vec<String>,
    range: KeyGroupRange,
}

impl ChangeSnapshot for RedbChanges {
    fn key_groups(&self) -> KeyGroupRange {
        self.range
    }

    fn state_names(&self) -> Vec<String> {
        self.names.clone()
    }

    fn visit_key_group(&self, key_group: u32, visit: &mut ChangeSetVisitor<'_>) -> Result<()> {
        let merged = self.merged.get_or_init(|| merge_layers(&self.parts));
        for s in 0..self.names.len() as StateId {
            let (mut start, mut end) = (Vec::new(), Vec::new());
            compose(&mut start, s, key_group, &[]);
            compose(&mut end, s, key_group + 1, &[]);
            let from = merged.partition_point(|(k, _)| k.as_slice() < start.as_slice());
            let to = merged.partition_point(|(k, _)| k.as_slice() < end.as_slice());
            for (k, v) in &merged[from..to] {
                visit(s, &k[HEADER..], v.as_deref())?;
            }
        }
        Ok(())
    }
}

/// A read transaction's view of a [`RedbStore`] with the layers frozen at
/// the snapshot on top.
struct RedbSnapshot {
    table: ReadOnlyTable<&'static [u8], &'static [u8]>,
    layers: Vec<Arc<Dirty>>,
    /// The layers merged (newest wins) and sorted by key (built on first
    /// use, by the asynchronous step).
    merged: std::sync::OnceLock<SortedDirty>,
    names: Vec<String>,
    range: KeyGroupRange,
    name: String,
}

impl StateSnapshot for RedbSnapshot {
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
        let merged = self.merged.get_or_init(|| merge_layers(&self.layers));
        for s in 0..self.names.len() as StateId {
            let (mut start, mut end) = (Vec::new(), Vec::new());
            compose(&mut start, s, key_group, &[]);
            compose(&mut end, s, key_group + 1, &[]);
            // A merge of two sorted runs: redb's rows and the layers'
            // entries, the layers winning (a tombstone hides the row).
            let from = merged.partition_point(|(k, _)| k.as_slice() < start.as_slice());
            let to = merged.partition_point(|(k, _)| k.as_slice() < end.as_slice());
            let mut layer = merged[from..to].iter().map(|(k, v)| (k, v)).peekable();
            for row in self
                .table
                .range(start.as_slice()..end.as_slice())
                .map_err(|e| corrupt_or_storage(&self.name, e))?
            {
                let (k, v) = row.map_err(|e| corrupt_or_storage(&self.name, e))?;
                let key = k.value();
                while let Some((lk, lv)) = layer.next_if(|(lk, _)| lk.as_slice() < key) {
                    if let Some(lv) = lv {
                        visit(s, &lk[HEADER..], lv)?;
                    }
                }
                match layer.next_if(|(lk, _)| lk.as_slice() == key) {
                    Some((_, Some(lv))) => visit(s, &key[HEADER..], lv)?,
                    Some((_, None)) => {}
                    None => visit(s, &key[HEADER..], v.value())?,
                }
            }
            for (lk, lv) in layer {
                if let Some(lv) = lv {
                    visit(s, &lk[HEADER..], lv)?;
                }
            }
        }
        Ok(())
    }
}
