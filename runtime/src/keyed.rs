//! Keyed processing: the keyed process operator (one and two inputs) that
//! scopes state to the current key and restores it by key group.

use crate::error::{Result, RuntimeError};
use crate::operator::{Collector, InitContext, KeyedPart, KeyedSnapshot, Operator, Outbox, SnapshotParts};
use crate::state::{KeyedContext, OpenContext};
use serde::Serialize;
use sluice_core::heap::{append_canonical, KeyRef};
use sluice_core::{
    CheckpointBarrier, CheckpointId, KeyGroupRange, KeyedStateStore, OperatorUid, StateDescriptor, StateId,
    StoreScope,
};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

/// A function over a keyed stream with keyed state (Flink's
/// `KeyedProcessFunction`). It is cloned once per subtask.
pub trait KeyedProcessFunction<K, I, O>: Clone + Send + Sync + 'static {
    /// Registers state; called once per subtask after restore.
    fn open(&mut self, ctx: &mut OpenContext<'_>) -> Result<()>;
    /// Processes one record of key `key`.
    fn process(
        &mut self,
        key: &K,
        value: I,
        ctx: &mut KeyedContext<'_>,
        out: &mut Collector<'_, O>,
    ) -> Result<()>;
}

/// A function over two keyed streams connected by key (Flink's
/// `KeyedCoProcessFunction`). Both inputs share the keyed state.
pub trait KeyedCoProcessFunction<K, I1, I2, O>: Clone + Send + Sync + 'static {
    /// Registers state; called once per subtask after restore.
    fn open(&mut self, ctx: &mut OpenContext<'_>) -> Result<()>;
    /// Processes a record of the first input.
    fn process1(
        &mut self,
        key: &K,
        value: I1,
        ctx: &mut KeyedContext<'_>,
        out: &mut Collector<'_, O>,
    ) -> Result<()>;
    /// Processes a record of the second input.
    fn process2(
        &mut self,
        key: &K,
        value: I2,
        ctx: &mut KeyedContext<'_>,
        out: &mut Collector<'_, O>,
    ) -> Result<()>;
}

/// A record of one of two connected inputs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub enum Either<A, B> {
    /// From the first input.
    Left(A),
    /// From the second input.
    Right(B),
}

/// Writes a key's bytes (its postcard encoding) into `buf`; a key postcard
/// cannot encode leaves `buf` empty (the partitioner then routes it as the
/// empty key; the keyed operator refuses it with an error).
#[inline]
pub(crate) fn encode_key<K: Serialize + 'static>(key: &K, buf: &mut Vec<u8>) {
    buf.clear();
    if append_canonical(key, buf).is_err() {
        buf.clear();
    }
}

fn unencodable_key(uid: &OperatorUid, e: postcard::Error) -> RuntimeError {
    RuntimeError::Codec {
        what: format!("a key of operator {uid}"),
        reason: format!("{e}; the key type's Serialize implementation failed"),
    }
}

/// The keyed state of one subtask: store, key scratch buffers, restore.
pub(crate) struct KeyedBackend {
    pub uid: OperatorUid,
    store: Option<Box<dyn KeyedStateStore>>,
    range: KeyGroupRange,
    max_parallelism: u32,
    subtask: u32,
    key: Vec<u8>,
    buf: Vec<u8>,
    scratch: Vec<u8>,
    /// The states the function registered in `open`.
    states: Vec<StateDescriptor>,
    /// The Rust type of the key.
    key_type: &'static str,
    /// The encoded keys of the batch being processed, back to back.
    batch_keys: Vec<u8>,
    /// Per record of the batch: key group, the end of its key in
    /// `batch_keys`, and the key's hash.
    batch_rows: Vec<(u32, usize, u64)>,
    /// The restored checkpoint's description and this operator's states in
    /// it: the function's registrations are checked against them in `open`
    /// (`OpenContext`), before restored values are decoded as the new type.
    restored_states: Option<(String, Vec<StateDescriptor>)>,
    /// Incremental checkpoints: when to fold the chain.
    incremental: Option<crate::config::IncrementalPolicy>,
    /// The size of this subtask's chain so far (written by the snapshot
    /// writer): decides when the next snapshot is full.
    chain: Arc<ChainSizes>,
    /// The states with a time-to-live, and the next key group their
    /// incremental cleanup visits.
    ttl: Vec<crate::ttl::TtlCleanup>,
    ttl_cursor: u32,
    /// Entries the incremental cleanup may visit (grows with the records
    /// processed), and how many the last step visited.
    ttl_budget: u64,
    ttl_last_visit: u64,
}

/// Entries the incremental TTL cleanup visits per record processed, on
/// average.
pub(crate) const TTL_VISITS_PER_RECORD: u64 = 4;

/// The size of a subtask's incremental chain, as written: changes files
/// since the last full snapshot, their bytes, and the base's bytes. An
/// estimate for the folding policy (it counts writes, not completions).
#[derive(Debug, Default)]
pub(crate) struct ChainSizes {
    pub changes_files: AtomicU32,
    pub changes_bytes: AtomicU64,
    pub base_bytes: AtomicU64,
}

impl ChainSizes {
    /// A snapshot was written: a full one of `bytes` starts a new chain; a
    /// changes file adds to it.
    pub fn written(&self, full: bool, bytes: u64) {
        if full {
            self.base_bytes.store(bytes, Ordering::Relaxed);
            self.changes_bytes.store(0, Ordering::Relaxed);
            self.changes_files.store(0, Ordering::Relaxed);
        } else {
            self.changes_bytes.fetch_add(bytes, Ordering::Relaxed);
            self.changes_files.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The chain of a restored checkpoint: base of `base_bytes`, then
    /// `changes`.
    fn restored(&self, base_bytes: u64, changes: &[sluice_core::StateFileHandle]) {
        self.base_bytes.store(base_bytes, Ordering::Relaxed);
        let bytes = changes.iter().map(|f| f.size).sum();
        self.changes_bytes.store(bytes, Ordering::Relaxed);
        self.changes_files.store(
            u32::try_from(changes.len()).unwrap_or(u32::MAX),
            Ordering::Relaxed,
        );
    }

    /// Whether the chain is long or heavy enough to fold under `policy`.
    fn fold(&self, policy: &crate::config::IncrementalPolicy) -> bool {
        let files = self.changes_files.load(Ordering::Relaxed);
        let changes = self.changes_bytes.load(Ordering::Relaxed) as f64;
        let base = self.base_bytes.load(Ordering::Relaxed) as f64;
        files >= policy.max_chain || changes > base * policy.max_changes_ratio
    }
}

impl KeyedBackend {
    pub fn new(uid: OperatorUid, key_type: &'static str) -> Self {
        KeyedBackend {
            uid,
            store: None,
            range: KeyGroupRange { start: 0, end: 0 },
            max_parallelism: 1,
            subtask: 0,
            key: Vec::with_capacity(16),
            buf: Vec::with_capacity(64),
            scratch: Vec::new(),
            states: Vec::new(),
            key_type,
            batch_keys: Vec::new(),
            batch_rows: Vec::new(),
            restored_states: None,
            incremental: None,
            chain: Arc::default(),
            ttl: Vec::new(),
            ttl_cursor: 0,
            ttl_budget: 0,
            ttl_last_visit: 0,
        }
    }

    /// Opens the store and restores the key groups this subtask owns.
    pub async fn initialize(&mut self, ctx: &InitContext) -> Result<()> {
        self.range = KeyGroupRange::for_subtask(ctx.max_parallelism, ctx.parallelism, ctx.subtask);
        self.max_parallelism = ctx.max_parallelism;
        self.subtask = ctx.subtask;
        self.incremental = ctx.incremental;
        self.chain = Arc::default();
        let mut store = ctx.state_backend.open_store(&StoreScope {
            job: ctx.job_name.clone(),
            operator: self.uid.clone(),
            subtask: ctx.subtask,
            parallelism: ctx.parallelism,
            max_parallelism: ctx.max_parallelism,
            key_groups: self.range,
            track_changes: ctx.incremental.is_some(),
        })?;
        if let Some(restore) = &ctx.restore {
            let meta = &restore.metadata;
            if meta.max_parallelism != ctx.max_parallelism {
                return Err(RuntimeError::Storage(sluice_core::Error::Incompatible {
                    what: format!("{} for operator {}", restore.describe(), self.uid),
                    reason: format!(
                        "written with max parallelism {}, the job has {}; the max parallelism of a job cannot change",
                        meta.max_parallelism, ctx.max_parallelism
                    ),
                }));
            }
            if let Some(op) = meta.operator(&self.uid) {
                self.restored_states = Some((restore.describe(), op.states.clone()));
                if let Some(written) = op.key_type.as_deref().filter(|k| *k != self.key_type) {
                    return Err(RuntimeError::Storage(sluice_core::Error::Incompatible {
                        what: format!("keyed state of operator {} in {}", self.uid, restore.describe()),
                        reason: format!(
                            "its keys were written as {written}, the job's key type is {}; give the changed \
                             operator a new uid (its state then starts empty)",
                            self.key_type
                        ),
                    }));
                }
                let mut ids: HashMap<String, StateId> = HashMap::new();
                let mut own_chain = false;
                for st in &op.subtasks {
                    let Some(base) = &st.keyed_state else { continue };
                    let Some(range) = base.key_groups.intersect(&self.range) else {
                        continue;
                    };
                    if base.key_groups == self.range && op.parallelism == ctx.parallelism {
                        // This subtask's own chain: the next changes file
                        // extends it, so the folding policy counts it.
                        own_chain = true;
                        self.chain.restored(base.size, &st.keyed_changes);
                    }
                    // The base, then its changes files in order: a later
                    // write or deletion of a key replaces the earlier one.
                    let chain: Vec<_> = std::iter::once(base)
                        .chain(&st.keyed_changes)
                        .map(|f| restore.resolve(f))
                        .collect();
                    sluice_core::load::load_chain(
                        restore.storage.as_ref(),
                        &chain,
                        range,
                        store.as_mut(),
                        &mut ids,
                    )
                    .await?;
                }
                if own_chain {
                    // The store holds exactly this subtask's state of the
                    // restored checkpoint: changes can be relative to it.
                    store.restored(meta.checkpoint_id);
                }
            }
        }
        self.store = Some(store);
        Ok(())
    }

    fn store(&mut self) -> Result<&mut Box<dyn KeyedStateStore>> {
        self.store
            .as_mut()
            .ok_or_else(|| RuntimeError::InvalidJob(format!("operator {} used before initialize", self.uid)))
    }

    pub fn open_context(&mut self) -> Result<OpenContext<'_>> {
        let uid = self.uid.as_str();
        let store = self
            .store
            .as_mut()
            .ok_or_else(|| RuntimeError::InvalidJob(format!("operator {uid} opened before initialize")))?;
        Ok(OpenContext {
            store: store.as_mut(),
            operator: uid,
            subtask: self.subtask,
            states: &mut self.states,
            restored: self
                .restored_states
                .as_ref()
                .map(|(d, states)| (d.as_str(), states.as_slice())),
            range: self.range,
            ttl: &mut self.ttl,
        })
    }

    /// Incremental cleanup of states with a time-to-live, called before
    /// each batch of `records`: the expired entries of the next key group,
    /// when the records processed since the last step paid for as many
    /// entries as that step visited (about [`TTL_VISITS_PER_RECORD`] per
    /// record, as Flink bounds its incremental cleanup).
    #[inline]
    pub fn clean_expired_step(&mut self, records: usize) -> Result<()> {
        if self.ttl.is_empty() {
            return Ok(());
        }
        self.ttl_budget = (self.ttl_budget + records as u64 * TTL_VISITS_PER_RECORD).min(1 << 32);
        if self.ttl_budget < self.ttl_last_visit {
            return Ok(());
        }
        let kg = self.range.start + self.ttl_cursor % self.range.len() as u32;
        self.ttl_cursor = self.ttl_cursor.wrapping_add(1);
        let Some(store) = self.store.as_mut() else {
            return Ok(());
        };
        let mut visited = 0;
        for t in &self.ttl {
            visited += t.clean_key_group(store.as_mut(), kg)?.0;
        }
        self.ttl_last_visit = visited;
        self.ttl_budget = self.ttl_budget.saturating_sub(visited);
        Ok(())
    }

    /// Sets the current key and returns the context for it.
    #[inline]
    pub fn context<K: Serialize + 'static>(&mut self, key: &K) -> Result<KeyedContext<'_>> {
        self.key.clear();
        append_canonical(key, &mut self.key).map_err(|e| unencodable_key(&self.uid, e))?;
        let KeyRef {
            hash, key_group: kg, ..
        } = KeyRef::new(&self.key, self.max_parallelism);
        if !self.range.contains(kg) {
            return Err(RuntimeError::InvalidJob(format!(
                "operator {} subtask {} got a key of key group {kg} outside its range {} \
                 (is the key selector deterministic?)",
                self.uid, self.subtask, self.range
            )));
        }
        let store = self
            .store
            .as_mut()
            .ok_or_else(|| RuntimeError::InvalidJob("keyed operator used before initialize".into()))?;
        Ok(KeyedContext {
            store: store.as_mut(),
            key_group: kg,
            hash,
            key: &self.key,
            buf: &mut self.buf,
            scratch: &mut self.scratch,
        })
    }

    /// Encodes the keys of a batch once, computes their key groups (all
    /// in this subtask's range, or the batch is refused before any record
    /// is processed), and hints the store about all of them before the
    /// batch is processed: their cache misses overlap.
    pub fn prepare_batch<K: Serialize + 'static>(
        &mut self,
        keys: impl Iterator<Item = K>,
    ) -> Result<PreparedBatch<'_>> {
        self.batch_keys.clear();
        self.batch_rows.clear();
        let store = self
            .store
            .as_mut()
            .ok_or_else(|| RuntimeError::InvalidJob("keyed operator used before initialize".into()))?;
        for key in keys {
            let start = self.batch_keys.len();
            append_canonical(&key, &mut self.batch_keys).map_err(|e| unencodable_key(&self.uid, e))?;
            let key = KeyRef::new(&self.batch_keys[start..], self.max_parallelism);
            if !self.range.contains(key.key_group) {
                return Err(RuntimeError::InvalidJob(format!(
                    "operator {} subtask {} got a key of key group {} outside its range {} \
                     (is the key selector deterministic?)",
                    self.uid, self.subtask, key.key_group, self.range
                )));
            }
            store.prefetch(&key);
            self.batch_rows
                .push((key.key_group, self.batch_keys.len(), key.hash));
        }
        Ok(PreparedBatch {
            store: store.as_mut(),
            rows: &self.batch_rows,
            keys: &self.batch_keys,
            start: 0,
            buf: &mut self.buf,
            scratch: &mut self.scratch,
        })
    }

    /// The synchronous part of a snapshot: the changes since the barrier's
    /// base (an incremental checkpoint), unless the chain is due to be
    /// folded, the store cannot tell, or there is no base (then the whole
    /// state).
    pub fn snapshot(&mut self, barrier: &CheckpointBarrier, parts: &mut SnapshotParts) -> Result<()> {
        let id = barrier.checkpoint_id;
        // Expired entries stay out of every snapshot.
        if let Some(store) = self.store.as_mut() {
            for t in &self.ttl {
                t.clean(store.as_mut(), self.range)?;
            }
        }
        let fold = match &self.incremental {
            Some(policy) => self.chain.fold(policy),
            None => true,
        };
        let changes = match barrier.base {
            Some(base) if !fold => self.store()?.snapshot_changes(id, base)?.map(|c| (base, c)),
            _ => None,
        };
        let snapshot = match changes {
            Some((base, changes)) => KeyedSnapshot::Changes { base, changes },
            None => KeyedSnapshot::Full(self.store()?.snapshot(id)?),
        };
        parts.keyed.push(KeyedPart {
            uid: self.uid.clone(),
            subtask: self.subtask,
            snapshot,
            key_type: self.key_type.to_string(),
            states: self.states.clone(),
            chain: (barrier.kind == sluice_core::CheckpointKind::Checkpoint).then(|| self.chain.clone()),
        });
        Ok(())
    }

    /// Checkpoint `id` completed: the store may forget older changes.
    pub fn checkpoint_complete(&mut self, id: CheckpointId) {
        if let Some(store) = self.store.as_mut() {
            store.checkpoint_complete(id);
        }
    }
}

/// The keyed process operator.
pub(crate) struct KeyedProcessOp<K, I, O, F> {
    pub backend: KeyedBackend,
    pub key_fn: Arc<dyn Fn(&I) -> K + Send + Sync>,
    pub func: F,
    pub out: Box<dyn Operator<O>>,
}

#[async_trait::async_trait]
impl<K, I, O, F> Operator<I> for KeyedProcessOp<K, I, O, F>
where
    K: Serialize + Send + Sync + 'static,
    I: Send + 'static,
    O: Send + 'static,
    F: KeyedProcessFunction<K, I, O>,
{
    async fn initialize(&mut self, ctx: &InitContext) -> Result<()> {
        self.backend.initialize(ctx).await?;
        self.func.open(&mut self.backend.open_context()?)?;
        self.out.initialize(ctx).await
    }

    #[inline]
    fn process(&mut self, record: I) -> Result<()> {
        let key = (self.key_fn)(&record);
        let mut ctx = self.backend.context(&key)?;
        self.func
            .process(&key, record, &mut ctx, &mut Collector::new(self.out.as_mut()))
    }

    fn process_batch(&mut self, batch: Vec<I>) -> Result<()> {
        // First encode every key and hint the store (independent lookups
        // whose cache misses overlap), then process with the entries in cache.
        self.backend.clean_expired_step(batch.len())?;
        let key_fn = &self.key_fn;
        let mut prepared = self.backend.prepare_batch(batch.iter().map(|r| key_fn(r)))?;
        let rows = prepared.rows;
        for (record, &row) in batch.into_iter().zip(rows) {
            let key = key_fn(&record);
            let mut ctx = prepared.next_context(row);
            self.func
                .process(&key, record, &mut ctx, &mut Collector::new(self.out.as_mut()))?;
        }
        Ok(())
    }

    fn snapshot(&mut self, barrier: &CheckpointBarrier, parts: &mut SnapshotParts) -> Result<()> {
        self.backend.snapshot(barrier, parts)?;
        self.out.snapshot(barrier, parts)
    }

    fn checkpoint_complete(&mut self, id: CheckpointId) -> Result<()> {
        self.backend.checkpoint_complete(id);
        self.out.checkpoint_complete(id)
    }

    fn finish(&mut self) -> Result<()> {
        self.out.finish()
    }

    fn outbox(&mut self) -> Option<&mut dyn Outbox> {
        self.out.outbox()
    }
}

/// A batch whose keys [`KeyedBackend::prepare_batch`] encoded and
/// checked: the contexts of its records, in order, with nothing left to
/// fail (a fallible context, returned through a `Result`, was copied
/// through the stack with a store-forwarding stall on every record).
pub(crate) struct PreparedBatch<'a> {
    store: &'a mut dyn KeyedStateStore,
    /// Per record: key group, end of its key in `keys`, stable hash.
    rows: &'a [(u32, usize, u64)],
    keys: &'a [u8],
    /// Where the next record's key starts in `keys`.
    start: usize,
    buf: &'a mut Vec<u8>,
    scratch: &'a mut Vec<u8>,
}

impl PreparedBatch<'_> {
    /// The context of the next record (`row` is its entry in `rows`).
    #[inline]
    fn next_context(&mut self, (key_group, end, hash): (u32, usize, u64)) -> KeyedContext<'_> {
        let start = std::mem::replace(&mut self.start, end);
        KeyedContext {
            store: &mut *self.store,
            key_group,
            hash,
            key: &self.keys[start..end],
            buf: &mut *self.buf,
            scratch: &mut *self.scratch,
        }
    }
}

/// The keyed two-input operator.
pub(crate) struct KeyedCoProcessOp<K, I1, I2, O, F> {
    pub backend: KeyedBackend,
    pub key1: Arc<dyn Fn(&I1) -> K + Send + Sync>,
    pub key2: Arc<dyn Fn(&I2) -> K + Send + Sync>,
    pub func: F,
    pub out: Box<dyn Operator<O>>,
}

#[async_trait::async_trait]
impl<K, I1, I2, O, F> Operator<Either<I1, I2>> for KeyedCoProcessOp<K, I1, I2, O, F>
where
    K: Serialize + Send + Sync + 'static,
    I1: Send + 'static,
    I2: Send + 'static,
    O: Send + 'static,
    F: KeyedCoProcessFunction<K, I1, I2, O>,
{
    async fn initialize(&mut self, ctx: &InitContext) -> Result<()> {
        self.backend.initialize(ctx).await?;
        self.func.open(&mut self.backend.open_context()?)?;
        self.out.initialize(ctx).await
    }

    fn process(&mut self, record: Either<I1, I2>) -> Result<()> {
        match record {
            Either::Left(a) => {
                let key = (self.key1)(&a);
                let mut ctx = self.backend.context(&key)?;
                self.func
                    .process1(&key, a, &mut ctx, &mut Collector::new(self.out.as_mut()))
            }
            Either::Right(b) => {
                let key = (self.key2)(&b);
                let mut ctx = self.backend.context(&key)?;
                self.func
                    .process2(&key, b, &mut ctx, &mut Collector::new(self.out.as_mut()))
            }
        }
    }

    fn process_batch(&mut self, batch: Vec<Either<I1, I2>>) -> Result<()> {
        self.backend.clean_expired_step(batch.len())?;
        for r in batch {
            self.process(r)?;
        }
        Ok(())
    }

    fn snapshot(&mut self, barrier: &CheckpointBarrier, parts: &mut SnapshotParts) -> Result<()> {
        self.backend.snapshot(barrier, parts)?;
        self.out.snapshot(barrier, parts)
    }

    fn checkpoint_complete(&mut self, id: CheckpointId) -> Result<()> {
        self.backend.checkpoint_complete(id);
        self.out.checkpoint_complete(id)
    }

    fn finish(&mut self) -> Result<()> {
        self.out.finish()
    }

    fn outbox(&mut self) -> Option<&mut dyn Outbox> {
        self.out.outbox()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_backend_memory::MemoryStateBackend;
    use sluice_core::StateBackend;

    /// A backend of subtask 0 of 2 (key groups 0..=63 of 128) on memory.
    fn backend() -> KeyedBackend {
        let mut b = KeyedBackend::new(OperatorUid("sum".into()), "u64");
        b.range = KeyGroupRange::for_subtask(128, 2, 0);
        b.max_parallelism = 128;
        let store = MemoryStateBackend::new()
            .open_store(&StoreScope {
                job: "job".into(),
                operator: b.uid.clone(),
                subtask: 0,
                parallelism: 2,
                max_parallelism: 128,
                key_groups: b.range,
                track_changes: false,
            })
            .unwrap();
        b.store = Some(store);
        b
    }

    fn key_group(key: u64) -> u32 {
        let mut bytes = Vec::new();
        append_canonical(&key, &mut bytes).unwrap();
        KeyRef::new(&bytes, 128).key_group
    }

    #[test]
    fn a_prepared_batch_gives_each_record_its_key_in_order() {
        let mut b = backend();
        let keys: Vec<u64> = (0..10_000u64).filter(|k| key_group(*k) < 64).take(100).collect();
        let mut prepared = b.prepare_batch(keys.iter().copied()).unwrap();
        let rows = prepared.rows;
        assert_eq!(rows.len(), keys.len());
        for (key, &row) in keys.iter().zip(rows) {
            let ctx = prepared.next_context(row);
            let mut expected = Vec::new();
            append_canonical(key, &mut expected).unwrap();
            assert_eq!(ctx.key, &expected[..]);
            assert_eq!(ctx.key_group, key_group(*key));
            assert_eq!(ctx.hash, KeyRef::new(&expected, 128).hash);
        }
    }

    #[test]
    fn a_batch_with_a_key_of_another_subtask_is_refused_before_any_record() {
        let mut b = backend();
        let foreign = (0..10_000u64).find(|k| key_group(*k) >= 64).unwrap();
        let err = b
            .prepare_batch(
                [1u64, foreign, 2]
                    .into_iter()
                    .filter(|k| *k == foreign || key_group(*k) < 64),
            )
            .err()
            .expect("a key of another subtask's key group is refused");
        let msg = err.to_string();
        assert!(msg.contains("outside its range"), "{msg}");
        assert!(
            msg.contains(&format!("key group {}", key_group(foreign))),
            "{msg}"
        );
    }
}
