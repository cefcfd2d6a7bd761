//! Keyed processing: the keyed process operator (one and two inputs) that
//! scopes state to the current key and restores it by key group.

use crate::error::{Result, RuntimeError};
use crate::operator::{Collector, InitContext, KeyedPart, Operator, Outbox, SnapshotParts};
use crate::state::{KeyedContext, OpenContext};
use serde::Serialize;
use sluice_core::{
    key_group_for_key, CheckpointBarrier, CheckpointId, KeyGroupRange, KeyedStateStore, OperatorUid,
    StateDescriptor, StateId, StoreScope,
};
use std::collections::HashMap;
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

/// Writes a key's bytes (its postcard encoding) into `buf`.
#[inline]
pub(crate) fn encode_key<K: Serialize>(key: &K, buf: &mut Vec<u8>) {
    buf.clear();
    match postcard::to_extend(key, std::mem::take(buf)) {
        Ok(v) => *buf = v,
        // Only types postcard cannot encode fail; the keyed operator reports it.
        Err(_) => buf.clear(),
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
    /// Per record of the batch: key group and the end of its key in `batch_keys`.
    batch_rows: Vec<(u32, usize)>,
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
        }
    }

    /// Opens the store and restores the key groups this subtask owns.
    pub async fn initialize(&mut self, ctx: &InitContext) -> Result<()> {
        self.range = KeyGroupRange::for_subtask(ctx.max_parallelism, ctx.parallelism, ctx.subtask);
        self.max_parallelism = ctx.max_parallelism;
        self.subtask = ctx.subtask;
        let mut store = ctx.state_backend.open_store(&StoreScope {
            job: ctx.job_name.clone(),
            operator: self.uid.clone(),
            subtask: ctx.subtask,
            parallelism: ctx.parallelism,
            max_parallelism: ctx.max_parallelism,
            key_groups: self.range,
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
                for st in &op.subtasks {
                    let Some(file) = &st.keyed_state else { continue };
                    let Some(range) = file.key_groups.intersect(&self.range) else {
                        continue;
                    };
                    let store_ref = &mut store;
                    sluice_core::format::read_key_groups(
                        restore.storage.as_ref(),
                        &restore.resolve(file),
                        range,
                        &mut |name, kg, k, v| {
                            let id = match ids.get(name) {
                                Some(id) => *id,
                                None => {
                                    let id = store_ref.register_state(name)?;
                                    ids.insert(name.to_string(), id);
                                    id
                                }
                            };
                            store_ref.put(id, kg, k, v)
                        },
                    )
                    .await?;
                }
            }
        }
        self.store = Some(store);
        Ok(())
    }

    /// After the function's `open`: refuses restored state whose registered
    /// kind or type differs from what the function registers now.
    pub fn check_restored_states(&self, ctx: &InitContext) -> Result<()> {
        let Some(restore) = &ctx.restore else {
            return Ok(());
        };
        let Some(op) = restore.metadata.operator(&self.uid) else {
            return Ok(());
        };
        for written in &op.states {
            if let Some(now) = self.states.iter().find(|d| d.name == written.name) {
                if now != written {
                    return Err(RuntimeError::Storage(sluice_core::Error::Incompatible {
                        what: format!(
                            "state {:?} of operator {} in {}",
                            written.name,
                            self.uid,
                            restore.describe()
                        ),
                        reason: format!(
                            "it was written as {}, the job now registers it as {}; keep the type, or register \
                             the new state under a new name (or give the operator a new uid)",
                            crate::state::describe_state(written),
                            crate::state::describe_state(now)
                        ),
                    }));
                }
            }
        }
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
        })
    }

    /// Sets the current key and returns the context for it.
    #[inline]
    pub fn context<K: Serialize>(&mut self, key: &K) -> Result<KeyedContext<'_>> {
        encode_key(key, &mut self.key);
        let kg = key_group_for_key(&self.key, self.max_parallelism);
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
            key: &self.key,
            buf: &mut self.buf,
            scratch: &mut self.scratch,
        })
    }

    /// Encodes the keys of a batch once, computes their key groups, and
    /// hints the store about all of them before the batch is processed.
    pub fn prepare_batch<K: Serialize>(&mut self, keys: impl Iterator<Item = K>) {
        self.batch_keys.clear();
        self.batch_rows.clear();
        for key in keys {
            let start = self.batch_keys.len();
            match postcard::to_extend(&key, std::mem::take(&mut self.batch_keys)) {
                Ok(v) => self.batch_keys = v,
                // Reported by `context_at` through an empty key's group check.
                Err(_) => self.batch_keys.truncate(start),
            }
            let kg = key_group_for_key(&self.batch_keys[start..], self.max_parallelism);
            if let Some(store) = self.store.as_mut() {
                store.prefetch(kg, &self.batch_keys[start..]);
            }
            self.batch_rows.push((kg, self.batch_keys.len()));
        }
    }

    /// The context of record `i` of the batch prepared by [`Self::prepare_batch`].
    #[inline]
    pub fn context_at(&mut self, i: usize) -> Result<KeyedContext<'_>> {
        let (kg, end) = self.batch_rows[i];
        let start = if i == 0 { 0 } else { self.batch_rows[i - 1].1 };
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
            key: &self.batch_keys[start..end],
            buf: &mut self.buf,
            scratch: &mut self.scratch,
        })
    }

    pub fn snapshot(&mut self, barrier: &CheckpointBarrier, parts: &mut SnapshotParts) -> Result<()> {
        let snapshot = self.store()?.snapshot(barrier.checkpoint_id)?;
        parts.keyed.push(KeyedPart {
            uid: self.uid.clone(),
            subtask: self.subtask,
            snapshot,
            key_type: self.key_type.to_string(),
            states: self.states.clone(),
        });
        Ok(())
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
        self.backend.check_restored_states(ctx)?;
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
        let key_fn = &self.key_fn;
        self.backend.prepare_batch(batch.iter().map(|r| key_fn(r)));
        for (i, record) in batch.into_iter().enumerate() {
            let key = (self.key_fn)(&record);
            let mut ctx = self.backend.context_at(i)?;
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
        self.out.checkpoint_complete(id)
    }

    fn finish(&mut self) -> Result<()> {
        self.out.finish()
    }

    fn outbox(&mut self) -> Option<&mut dyn Outbox> {
        self.out.outbox()
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
        self.backend.check_restored_states(ctx)?;
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

    fn snapshot(&mut self, barrier: &CheckpointBarrier, parts: &mut SnapshotParts) -> Result<()> {
        self.backend.snapshot(barrier, parts)?;
        self.out.snapshot(barrier, parts)
    }

    fn checkpoint_complete(&mut self, id: CheckpointId) -> Result<()> {
        self.out.checkpoint_complete(id)
    }

    fn finish(&mut self) -> Result<()> {
        self.out.finish()
    }

    fn outbox(&mut self) -> Option<&mut dyn Outbox> {
        self.out.outbox()
    }
}
