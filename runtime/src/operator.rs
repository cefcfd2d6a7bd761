//! Operators and operator chains.
//!
//! A task runs a *chain*: operators connected by direct calls (Flink's
//! operator chaining), ending either in a network output (to the next task)
//! or in a sink. Every operator forwards the lifecycle calls (initialize,
//! snapshot, checkpoint complete, finish) to the rest of the chain.

use crate::channel::{Message, OutputWriter};
use crate::error::Result;
use crate::savepoint::RestoreSource;
use futures::future::BoxFuture;
use serde::de::DeserializeOwned;
use serde::Serialize;
use sluice_core::CheckpointStorageExt;
use sluice_core::{
    Alignment, CheckpointBarrier, CheckpointId, CheckpointStorage, OperatorUid, SplitPosition, StateBackend,
    StateDescriptor, StateSnapshot,
};
use std::sync::Arc;

/// What an operator needs to open and restore itself.
#[derive(Clone)]
pub struct InitContext {
    /// The job's name.
    pub job_name: String,
    /// The task (chain) name, for logs and errors.
    pub task_name: Arc<str>,
    /// This subtask's index.
    pub subtask: u32,
    /// The task's parallelism.
    pub parallelism: u32,
    /// The job's max parallelism.
    pub max_parallelism: u32,
    /// Where keyed state lives while running.
    pub state_backend: Arc<dyn StateBackend>,
    /// Where checkpoints are stored.
    pub storage: Arc<dyn CheckpointStorage>,
    /// The checkpoint or savepoint to restore from, if any.
    pub restore: Option<Arc<RestoreSource>>,
    /// The task's stable id (its channel state is stored under it).
    pub task_uid: Arc<str>,
    /// Incremental checkpoints' folding policy (`None`: full checkpoints).
    pub incremental: Option<crate::config::IncrementalPolicy>,
}

impl InitContext {
    /// The records that were on this subtask's inputs at the (unaligned)
    /// checkpoint it restores: processed before anything else.
    pub(crate) async fn restored_input_channel_state<X: DeserializeOwned>(&self) -> Result<Vec<X>> {
        let Some(restore) = &self.restore else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for c in restore.channel_state_of(&self.task_uid, self.subtask, self.parallelism)? {
            if c.input_records > 0 {
                let bytes = restore.storage.read_file(&restore.path_of_channel(c)).await?;
                out.extend(sluice_core::channel_state::decode_input::<X>(c, &bytes)?);
            }
        }
        Ok(out)
    }

    /// The records this subtask had queued for its outputs at the
    /// (unaligned) checkpoint it restores, per output channel: sent first.
    pub(crate) async fn restored_output_channel_state<X: DeserializeOwned>(
        &self,
    ) -> Result<Vec<(u32, Vec<X>)>> {
        let Some(restore) = &self.restore else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for c in restore.channel_state_of(&self.task_uid, self.subtask, self.parallelism)? {
            if c.output_records > 0 {
                let bytes = restore.storage.read_file(&restore.path_of_channel(c)).await?;
                out.extend(sluice_core::channel_state::decode_output::<X>(c, &bytes)?);
            }
        }
        Ok(out)
    }
}

/// One keyed operator's part of a snapshot.
pub struct KeyedPart {
    /// The operator's uid.
    pub uid: OperatorUid,
    /// The subtask index.
    pub subtask: u32,
    /// The consistent view (or the changes since the barrier's base) the
    /// asynchronous part encodes.
    pub snapshot: KeyedSnapshot,
    /// The Rust type of the key.
    pub key_type: String,
    /// The states the function registered.
    pub states: Vec<StateDescriptor>,
    /// Checkpoints (not savepoints): the subtask's chain sizes, which the
    /// writer updates with what it wrote.
    pub(crate) chain: Option<Arc<crate::keyed::ChainSizes>>,
}

/// What a keyed operator's snapshot holds.
pub enum KeyedSnapshot {
    /// The whole state (a full checkpoint, a savepoint, or the new base of
    /// an incremental chain).
    Full(Box<dyn StateSnapshot>),
    /// The changes since the completed checkpoint `base` (an incremental
    /// checkpoint).
    Changes {
        /// The checkpoint the changes are relative to.
        base: CheckpointId,
        /// The changes.
        changes: Box<dyn sluice_core::ChangeSnapshot>,
    },
}

/// One source's part of a snapshot.
pub struct SourcePart {
    /// The source's uid.
    pub uid: OperatorUid,
    /// The subtask index.
    pub subtask: u32,
    /// The source's number of splits.
    pub num_splits: u32,
    /// The positions of the subtask's splits.
    pub positions: Vec<SplitPosition>,
}

/// One operator's small non-keyed state (stored in the metadata as JSON).
pub struct OperatorStatePart {
    /// The operator's uid.
    pub uid: OperatorUid,
    /// The subtask index.
    pub subtask: u32,
    /// The state.
    pub state: serde_json::Value,
}

/// What the synchronous part of a snapshot collects from a chain.
#[derive(Default)]
pub struct SnapshotParts {
    /// Keyed state views to encode and write asynchronously, by operator.
    pub keyed: Vec<KeyedPart>,
    /// Source split positions, by operator.
    pub splits: Vec<SourcePart>,
    /// Non-keyed operator state (two-phase-commit sinks' transactions).
    pub operator_state: Vec<OperatorStatePart>,
    /// Unaligned checkpoints: the records the chain's network output had
    /// queued when the barrier overtook them, encoded by the asynchronous
    /// part (bytes, record count).
    pub output_state: Option<OutputStateEncoder>,
}

/// Encodes a chain's output channel state (in the asynchronous part).
pub type OutputStateEncoder = Box<dyn FnOnce() -> sluice_core::Result<(Vec<u8>, u64)> + Send>;

/// The network side of a chain, as the task loop sees it (type-erased).
pub trait Outbox: Send {
    /// Moves partial batches into the send queue.
    fn flush_partial(&mut self);
    /// Whether messages wait for channel capacity.
    fn has_pending(&self) -> bool;
    /// Sends queued messages, waiting for capacity.
    fn drain(&mut self) -> BoxFuture<'_, Result<()>>;
    /// When a barrier in place turns into a priority barrier (aligned
    /// checkpoints with a timeout).
    fn next_deadline(&self) -> Option<std::time::Instant>;
    /// Sends the barriers whose deadline passed on the priority lanes.
    fn fire_deadlines(&mut self, now: std::time::Instant);
}

impl<T: Clone + Send + 'static> Outbox for OutputWriter<T> {
    fn flush_partial(&mut self) {
        OutputWriter::flush_partial(self)
    }
    fn has_pending(&self) -> bool {
        OutputWriter::has_pending(self)
    }
    fn drain(&mut self) -> BoxFuture<'_, Result<()>> {
        Box::pin(OutputWriter::drain(self))
    }
    fn next_deadline(&self) -> Option<std::time::Instant> {
        OutputWriter::next_deadline(self)
    }
    fn fire_deadlines(&mut self, now: std::time::Instant) {
        OutputWriter::fire_deadlines(self, now)
    }
}

/// One link of an operator chain, consuming records of type `T`.
#[async_trait::async_trait]
pub trait Operator<T>: Send {
    /// Opens the operator and restores its state; forwards down the chain.
    async fn initialize(&mut self, ctx: &InitContext) -> Result<()>;
    /// Processes one record.
    fn process(&mut self, record: T) -> Result<()>;
    /// Processes a batch of records (a keyed operator prefetches their
    /// state first). The default processes them one by one.
    fn process_batch(&mut self, batch: Vec<T>) -> Result<()> {
        for r in batch {
            self.process(r)?;
        }
        Ok(())
    }
    /// Synchronous part of checkpoint `barrier`: capture state into `parts`,
    /// then forward (the chain's network output emits the barrier).
    fn snapshot(&mut self, barrier: &CheckpointBarrier, parts: &mut SnapshotParts) -> Result<()>;
    /// Checkpoint `id` is complete (its metadata is committed).
    fn checkpoint_complete(&mut self, id: CheckpointId) -> Result<()>;
    /// End of input: flush and forward.
    fn finish(&mut self) -> Result<()>;
    /// The chain's network output, if it has one.
    fn outbox(&mut self) -> Option<&mut dyn Outbox>;
}

/// Forwards the lifecycle calls of an operator to its `out` field.
macro_rules! forward_lifecycle {
    () => {
        fn snapshot(
            &mut self,
            barrier: &sluice_core::CheckpointBarrier,
            parts: &mut $crate::operator::SnapshotParts,
        ) -> $crate::error::Result<()> {
            self.out.snapshot(barrier, parts)
        }
        fn checkpoint_complete(&mut self, id: sluice_core::CheckpointId) -> $crate::error::Result<()> {
            self.out.checkpoint_complete(id)
        }
        fn finish(&mut self) -> $crate::error::Result<()> {
            self.out.finish()
        }
        fn outbox(&mut self) -> Option<&mut dyn $crate::operator::Outbox> {
            self.out.outbox()
        }
    };
}

/// `map`.
pub(crate) struct MapOp<F, U> {
    pub f: Arc<F>,
    pub out: Box<dyn Operator<U>>,
}

#[async_trait::async_trait]
impl<T: Send + 'static, U: Send + 'static, F: Fn(T) -> U + Send + Sync + 'static> Operator<T>
    for MapOp<F, U>
{
    #[inline]
    fn process(&mut self, record: T) -> Result<()> {
        self.out.process((self.f)(record))
    }
    async fn initialize(&mut self, ctx: &InitContext) -> Result<()> {
        self.out.initialize(ctx).await
    }
    forward_lifecycle!();
}

/// `filter`.
pub(crate) struct FilterOp<F, T> {
    pub f: Arc<F>,
    pub out: Box<dyn Operator<T>>,
}

#[async_trait::async_trait]
impl<T: Send + 'static, F: Fn(&T) -> bool + Send + Sync + 'static> Operator<T> for FilterOp<F, T> {
    #[inline]
    fn process(&mut self, record: T) -> Result<()> {
        if (self.f)(&record) {
            self.out.process(record)
        } else {
            Ok(())
        }
    }
    async fn initialize(&mut self, ctx: &InitContext) -> Result<()> {
        self.out.initialize(ctx).await
    }
    forward_lifecycle!();
}

/// `flat_map`.
pub(crate) struct FlatMapOp<F, U> {
    pub f: Arc<F>,
    pub out: Box<dyn Operator<U>>,
}

#[async_trait::async_trait]
impl<T, U, F, I> Operator<T> for FlatMapOp<F, U>
where
    T: Send + 'static,
    U: Send + 'static,
    I: IntoIterator<Item = U>,
    F: Fn(T) -> I + Send + Sync + 'static,
{
    #[inline]
    fn process(&mut self, record: T) -> Result<()> {
        for u in (self.f)(record) {
            self.out.process(u)?;
        }
        Ok(())
    }
    async fn initialize(&mut self, ctx: &InitContext) -> Result<()> {
        self.out.initialize(ctx).await
    }
    forward_lifecycle!();
}

/// The end of a chain that feeds the next task.
pub(crate) struct NetworkOutput<T> {
    pub writer: OutputWriter<T>,
}

#[async_trait::async_trait]
impl<T: Clone + Send + Serialize + DeserializeOwned + 'static> Operator<T> for NetworkOutput<T> {
    async fn initialize(&mut self, ctx: &InitContext) -> Result<()> {
        // The records this subtask had queued for its outputs at the restored
        // unaligned checkpoint go out first.
        let state: Vec<(u32, Vec<T>)> = ctx.restored_output_channel_state().await?;
        self.writer.restore_output(state)
    }
    #[inline]
    fn process(&mut self, record: T) -> Result<()> {
        self.writer.push(record);
        Ok(())
    }
    fn snapshot(&mut self, barrier: &CheckpointBarrier, parts: &mut SnapshotParts) -> Result<()> {
        let b = *barrier;
        if b.alignment == Alignment::Unaligned {
            // Ahead of the records queued here, which become this task's
            // output channel state; receivers record what is in the channels.
            let state = self.writer.unaligned_barrier(b);
            let count: u64 = state.iter().map(|(_, v)| v.len() as u64).sum();
            if count > 0 {
                parts.output_state = Some(Box::new(move || {
                    Ok((sluice_core::channel_state::encode_output(&state)?, count))
                }));
            }
        } else {
            // In its place after the records emitted so far.
            self.writer.barrier(b);
        }
        Ok(())
    }
    fn checkpoint_complete(&mut self, _id: CheckpointId) -> Result<()> {
        Ok(())
    }
    fn finish(&mut self) -> Result<()> {
        self.writer.broadcast_event(|| Message::EndOfInput);
        Ok(())
    }
    fn outbox(&mut self) -> Option<&mut dyn Outbox> {
        Some(&mut self.writer)
    }
}

/// Emits records to the rest of a chain from inside a user function.
pub struct Collector<'a, T> {
    pub(crate) out: &'a mut dyn Operator<T>,
    pub(crate) emitted: u64,
}

impl<'a, T> Collector<'a, T> {
    pub(crate) fn new(out: &'a mut dyn Operator<T>) -> Self {
        Collector { out, emitted: 0 }
    }

    /// Emits one record downstream.
    #[inline]
    pub fn collect(&mut self, record: T) -> Result<()> {
        self.emitted += 1;
        self.out.process(record)
    }
}
