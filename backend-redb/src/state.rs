//! [`RedbStateBackend`]: keyed working state on disk, larger than memory.
//!
//! One redb file per subtask (in a scratch directory; removed when the
//! store is dropped: working state is rebuilt from checkpoints after a
//! failure, so it is never made durable on its own). Keys are
//! `state id (u16 BE) | key group (u32 BE) | key`, so one state's key group
//! is one contiguous range.
//!
//! Writes go to a bounded in-memory write buffer of entries and tombstones,
//! one copy-on-write map per (state, key group) (see `buffer.rs`). A
//! checkpoint's synchronous step shares the buffer's maps and opens a read
//! transaction: the snapshot is that MVCC view with the maps on top, which
//! the asynchronous step merges with redb's rows (sorted by key within
//! each key group) and encodes while processing goes on (the first write
//! into a key group the snapshot still holds copies that key group). Reads
//! look in the buffer, an optional bounded read cache, then, unless the
//! Bloom filters over the keys written into redb (`filter.rs`) rule the
//! key out, redb. The buffer is
//! flushed into redb in one write transaction when it exceeds its size.
//!
//! Incremental snapshots track which keys each epoch between two snapshots
//! wrote ([`EpochChanges`]); the changes since a base are those keys, read
//! from the snapshot's view (a key in neither the maps nor redb was
//! deleted). Each flush also keeps what it wrote as a compact sorted run
//! in memory (bounded, `flushed.rs`), so that a changed key flushed since
//! the base is read from there rather than looked up in redb.

use crate::buffer::{self, WriteBuffer, ENTRY_OVERHEAD};
use crate::corrupt_or_storage;
use crate::filter::KeyFilter;
use crate::flushed::{FlushedMarks, FlushedRuns, Run};
use crate::snapshot::{RedbChanges, View};
use redb::{Database, Durability, ReadOnlyTable, ReadableDatabase, ReadableTableMetadata, TableDefinition};
use rustc_hash::FxHashMap;
use sluice_core::bytemap::EpochChanges;
use sluice_core::state::KeyValueVisitor;
use sluice_core::{
    ChangeSnapshot, CheckpointId, Error, KeyGroupRange, KeyedStateStore, LoadBatch, Result, StateBackend,
    StateId, StateSnapshot, StoreScope,
};
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

pub(crate) const STATE: TableDefinition<&[u8], &[u8]> = TableDefinition::new("state");
pub(crate) const HEADER: usize = 6;
/// Every this many buffer flushes, one is durable so that redb can reuse
/// the pages that earlier transactions freed.
const DURABLE_EVERY: u64 = 8;

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
    /// Bytes of the recent flushes' entries kept for incremental snapshots
    /// (0: none; a changed key that was flushed is then looked up in redb);
    /// a quarter of it more bounds the keys remembered so that a key
    /// flushed and written again is not recorded as changed twice.
    pub flushed_runs_bytes: usize,
    /// Keep Bloom filters over the keys in redb (1.25 to 2.5 bytes per
    /// stored key), so that reading a key never stored does not descend
    /// redb's B-tree.
    pub key_filter: bool,
}

impl RedbStateConfig {
    /// Defaults: 64 MiB write buffer, no read cache, 64 MiB page cache,
    /// up to 64 MiB of recent flushes (with incremental checkpoints) and
    /// Bloom filters over the stored keys per subtask, files under `dir`.
    ///
    /// The read cache is off by default: on keys spread over a large state
    /// it rarely hits, and filling it costs more than it saves (10 M keys,
    /// uniform: 0.24 M ev/s with a 32 MiB read cache and a 32 MiB write
    /// buffer, 0.34 M ev/s with no read cache and a 64 MiB write buffer;
    /// `bench/README.md`). redb's page cache keeps the hot pages anyway.
    /// Turn it on for reads of a small hot set that is rarely written.
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        RedbStateConfig {
            dir: dir.into(),
            write_buffer_bytes: 64 << 20,
            read_cache_bytes: 0,
            redb_cache_bytes: 64 << 20,
            flushed_runs_bytes: 64 << 20,
            key_filter: true,
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
            buffer: WriteBuffer::new(scope.key_groups),
            cache: FxHashMap::default(),
            cache_bytes: 0,
            reader: None,
            full: Vec::with_capacity(64),
            flushes: 0,
            flushed: FlushedRuns::new(self.config.flushed_runs_bytes),
            flushed_marks: FlushedMarks::new(scope.key_groups, self.config.flushed_runs_bytes / 4),
            marks: BTreeMap::new(),
            config: self.config.clone(),
            changes: scope.track_changes.then(EpochChanges::default),
            filter: self.config.key_filter.then(KeyFilter::new),
        }))
    }
}

struct RedbStore {
    db: Option<Arc<Database>>,
    path: PathBuf,
    name: String,
    range: KeyGroupRange,
    names: Vec<String>,
    buffer: WriteBuffer,
    cache: FxHashMap<Vec<u8>, Vec<u8>>,
    cache_bytes: usize,
    reader: Option<ReadOnlyTable<&'static [u8], &'static [u8]>>,
    full: Vec<u8>,
    flushes: u64,
    /// What recent flushes wrote (when tracking changes).
    flushed: FlushedRuns,
    /// Keys marked as changed in the open epoch and flushed since.
    flushed_marks: FlushedMarks,
    /// Per snapshot, the flushes it saw ([`FlushedRuns::mark`]).
    marks: BTreeMap<CheckpointId, u64>,
    config: RedbStateConfig,
    /// The keys changed since recent snapshots, when tracking changes.
    changes: Option<EpochChanges>,
    /// Which keys redb may hold (when on).
    filter: Option<KeyFilter>,
}

impl Drop for RedbStore {
    fn drop(&mut self) {
        self.reader = None;
        self.db = None;
        let _ = std::fs::remove_file(&self.path);
    }
}

pub(crate) fn compose(out: &mut Vec<u8>, state: StateId, key_group: u32, key: &[u8]) {
    out.clear();
    out.extend_from_slice(&state.to_be_bytes());
    out.extend_from_slice(&key_group.to_be_bytes());
    out.extend_from_slice(key);
}

mod load;

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

    /// Entries stored (in redb and the buffer; an upper bound of the keys).
    fn stored(&mut self) -> Result<usize> {
        let buffered = self.buffer.len();
        let rows = self.reader()?.len().map_err(|e| Error::storage(&self.name, e))?;
        Ok(buffered + usize::try_from(rows).unwrap_or(usize::MAX))
    }

    fn cache_insert(&mut self, key: Vec<u8>, value: Vec<u8>) {
        let size = key.len() + value.len() + ENTRY_OVERHEAD;
        if size > self.config.read_cache_bytes {
            // No read cache (or an entry larger than all of it).
            return;
        }
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

    /// Writes the buffer into redb in one transaction, in key order (the
    /// inserts walk the B-tree in order instead of at random); the written
    /// values go to the read cache.
    fn flush(&mut self, durable: bool) -> Result<()> {
        if self.buffer.is_empty() && !durable {
            return Ok(());
        }
        let name = self.name.clone();
        let tx = self.write_tx(durable)?;
        let groups = self.buffer.take();
        let dirty = buffer::sorted(&groups, self.range);
        {
            let mut table = tx.open_table(STATE).map_err(|e| Error::storage(&name, e))?;
            for (s, key_group, k, d) in &dirty {
                compose(&mut self.full, *s, *key_group, k);
                match &d.value {
                    Some(v) => {
                        let old = table
                            .insert(self.full.as_slice(), v.as_slice())
                            .map_err(|e| Error::storage(&name, e))?;
                        if let Some(f) = self.filter.as_mut().filter(|_| old.is_none()) {
                            f.add_new(&self.full);
                        }
                    }
                    None => {
                        table
                            .remove(self.full.as_slice())
                            .map_err(|e| Error::storage(&name, e))?;
                    }
                }
            }
        }
        tx.commit().map_err(|e| Error::storage(&name, e))?;
        self.reader = None;
        if let Some(c) = self.changes.as_ref() {
            // Nothing flushed before the first base is ever asked for.
            let wanted = c.oldest_base().is_some();
            self.flushed.push(
                wanted
                    .then(|| Run::of(&dirty, self.config.flushed_runs_bytes))
                    .flatten(),
            );
            // Not needed once the open epoch's log overflowed (the next
            // snapshot is full anyway): no memory spent on it then.
            if wanted && !c.open.overflowed() {
                for (s, key_group, k, d) in &dirty {
                    if d.epoch == c.epoch {
                        self.flushed_marks.insert(*s, *key_group, k);
                    }
                }
            }
        }
        if self.config.read_cache_bytes == 0 {
            return Ok(());
        }
        let mut full = Vec::new();
        for (s, key_group, k, d) in dirty {
            compose(&mut full, s, key_group, k);
            match &d.value {
                Some(v) => self.cache_insert(full.clone(), v.to_vec()),
                None => {
                    if let Some(old) = self.cache.remove(&full) {
                        self.cache_bytes = self
                            .cache_bytes
                            .saturating_sub(full.len() + old.len() + ENTRY_OVERHEAD);
                    }
                }
            }
        }
        Ok(())
    }

    /// Buffers a write (`None`: a deletion) of a checked key; flushes when
    /// the buffer is full.
    fn buffer_write(
        &mut self,
        state: StateId,
        key_group: u32,
        key: &[u8],
        value: Option<&[u8]>,
    ) -> Result<()> {
        let epoch = self.changes.as_ref().map_or(0, |c| c.epoch);
        let fresh = self.buffer.write(state, key_group, key, value, epoch);
        if let Some(c) = self.changes.as_mut().filter(|_| fresh) {
            if !self.flushed_marks.contains(state, key_group, key) {
                c.open.mark(key_group, state, key);
            }
        }
        if self.buffer.bytes() > self.config.write_buffer_bytes {
            self.flush(false)?;
        }
        Ok(())
    }

    /// The snapshot's view: the buffer's maps on a read transaction.
    fn view(&self) -> Result<View> {
        let read = self
            .db()?
            .begin_read()
            .map_err(|e| Error::storage(&self.name, e))?;
        let table = read
            .open_table(STATE)
            .map_err(|e| Error::storage(&self.name, e))?;
        Ok(View {
            table,
            groups: self.buffer.view(),
            names: self.names.clone(),
            range: self.range,
            name: self.name.clone(),
        })
    }

    /// A snapshot `checkpoint` is taken now (and ended the open epoch):
    /// it sees the flushes so far.
    fn mark(&mut self, checkpoint: CheckpointId) {
        self.marks.insert(checkpoint, self.flushed.mark());
        self.flushed_marks.clear();
        // Also when checkpoints keep failing and none completes.
        self.forget_before_oldest_base();
    }

    /// Drops the marks and runs older than the oldest base: no changes
    /// snapshot relative to an older one is asked for again, and the
    /// changes since a base were flushed after its snapshot.
    fn forget_before_oldest_base(&mut self) {
        if let Some(oldest) = self.changes.as_ref().and_then(|c| c.oldest_base()) {
            self.marks = self.marks.split_off(&oldest);
            if let Some(mark) = self.marks.get(&oldest).copied() {
                self.flushed.forget_before(mark);
            }
        }
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
        self.buffer.add_state();
        self.flushed_marks.add_state();
        Ok((self.names.len() - 1) as StateId)
    }

    fn get(&mut self, state: StateId, key_group: u32, key: &[u8], out: &mut Vec<u8>) -> Result<bool> {
        self.check(state, key_group)?;
        out.clear();
        if let Some(d) = self.buffer.get(state, key_group, key) {
            return Ok(match &d.value {
                Some(v) => {
                    out.extend_from_slice(v);
                    true
                }
                None => false,
            });
        }
        compose(&mut self.full, state, key_group, key);
        if let Some(v) = self.cache.get(self.full.as_slice()) {
            out.extend_from_slice(v);
            return Ok(true);
        }
        if self.filter.as_ref().is_some_and(|f| !f.may_contain(&self.full)) {
            // Never written into redb.
            return Ok(false);
        }
        self.reader()?;
        let table = self
            .reader
            .as_ref()
            .ok_or_else(|| Error::storage(&self.name, "no read transaction"))?;
        let found = match table
            .get(self.full.as_slice())
            .map_err(|e| corrupt_or_storage(&self.name, e))?
        {
            Some(v) => {
                out.extend_from_slice(v.value());
                true
            }
            None => false,
        };
        if found && self.config.read_cache_bytes > 0 {
            self.cache_insert(self.full.clone(), out.clone());
        }
        Ok(found)
    }

    fn put(&mut self, state: StateId, key_group: u32, key: &[u8], value: &[u8]) -> Result<()> {
        self.check(state, key_group)?;
        self.buffer_write(state, key_group, key, Some(value))
    }

    fn delete(&mut self, state: StateId, key_group: u32, key: &[u8]) -> Result<()> {
        self.check(state, key_group)?;
        self.buffer_write(state, key_group, key, None)
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
        // redb's rows the buffer does not shadow (its newer values and
        // tombstones), then the buffer's values.
        self.reader()?;
        let table = self
            .reader
            .as_ref()
            .ok_or_else(|| Error::storage(&self.name, "no read transaction"))?;
        for row in table
            .range(start.as_slice()..end.as_slice())
            .map_err(|e| corrupt_or_storage(&self.name, e))?
        {
            let (k, v) = row.map_err(|e| corrupt_or_storage(&self.name, e))?;
            if !k.value().starts_with(&start) {
                break;
            }
            let key = &k.value()[HEADER..];
            if self.buffer.get(state, key_group, key).is_none() {
                visit(key, v.value())?;
            }
        }
        for (k, d) in self.buffer.group(state, key_group).iter() {
            if let Some(v) = d.value.as_deref().filter(|_| k.starts_with(prefix)) {
                visit(k, v)?;
            }
        }
        Ok(())
    }

    fn prefetch(&mut self, _key: &sluice_core::heap::KeyRef<'_>) {}

    fn snapshot(&mut self, checkpoint: CheckpointId) -> Result<Box<dyn StateSnapshot>> {
        if self.changes.is_some() {
            let stored = self.stored()?;
            if let Some(c) = self.changes.as_mut() {
                c.close(checkpoint, stored);
            }
            self.mark(checkpoint);
        }
        Ok(Box::new(self.view()?))
    }

    fn snapshot_changes(
        &mut self,
        checkpoint: CheckpointId,
        base: CheckpointId,
    ) -> Result<Option<Box<dyn ChangeSnapshot>>> {
        if self.changes.is_none() {
            return Ok(None);
        }
        let stored = self.stored()?;
        // A quarter of the keys or more changed (or the changes since
        // `base` are not known): the caller takes a full snapshot, which
        // ends the epoch.
        if !self.changes.as_ref().is_some_and(|c| c.worth_it(base, stored)) {
            return Ok(None);
        }
        let view = self.view()?;
        let Some(c) = self.changes.as_mut() else {
            return Ok(None);
        };
        // The epochs since `base` (shared: which keys changed is worked out
        // in the asynchronous part), read against the view.
        let epochs = c.close_since(base, checkpoint, stored);
        self.mark(checkpoint);
        let Some(epochs) = epochs else {
            // Tracking gave up while ending the epoch (too many keys kept).
            return Ok(None);
        };
        Ok(Some(Box::new(RedbChanges {
            view,
            epochs,
            runs: self.flushed.newest_first(),
            index: std::sync::OnceLock::new(),
        })))
    }

    /// Sorted, straight into redb in one transaction (`state/load.rs`).
    fn load(&mut self, batch: &LoadBatch) -> Result<()> {
        self.load_sorted(batch)
    }

    fn checkpoint_complete(&mut self, checkpoint: CheckpointId) {
        if let Some(c) = self.changes.as_mut() {
            c.complete(checkpoint);
        }
        // Later changes snapshots are relative to `checkpoint` or newer.
        self.forget_before_oldest_base();
    }

    fn restored(&mut self, checkpoint: CheckpointId) {
        if let Some(c) = self.changes.as_mut() {
            // The restore's writes are the base, not changes.
            c.restored(checkpoint);
        }
        self.flushed.clear();
        self.marks.clear();
        self.flushed_marks.clear();
    }
}
