//! Exactly-once sinks by two-phase commit (Flink's committer model,
//! `TwoPhaseCommitSinkFunction`).
//!
//! Records go into the current transaction. At a checkpoint's barrier the
//! transaction is **pre-committed** (flushed, made durable, still
//! invisible) and its handle is stored in the checkpoint. When the job
//! master announces that checkpoint `n` is complete, the transactions of
//! `n` (and of earlier checkpoints that did not complete) are **committed**.
//! After a failure, the transactions in the restored checkpoint are
//! committed again — idempotently: a commit that already happened is
//! recognised and skipped — and every later transaction is aborted.
//!
//! A sink implements [`TwoPhaseCommitSink`] (a factory) and
//! [`TransactionalWriter`] (one per subtask) and is added with
//! [`crate::DataStream::transactional_sink`]. [`crate::file_sink::FileSink`]
//! is one.

use crate::error::{Result, RuntimeError};
use crate::operator::{InitContext, Operator, OperatorStatePart, Outbox, SnapshotParts};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sluice_core::{CheckpointBarrier, CheckpointId, OperatorUid};
use std::collections::BTreeMap;
use std::marker::PhantomData;
use tracing::warn;

/// Writes the records of one subtask in transactions.
pub trait TransactionalWriter<T>: Send + 'static {
    /// A transaction's handle: stored in checkpoints (as JSON), so that a
    /// restored job can commit it. It must name everything the transaction
    /// wrote.
    type Txn: Serialize + DeserializeOwned + Send + 'static;

    /// Starts a transaction (before the first record after a checkpoint).
    fn begin(&mut self) -> Result<Self::Txn>;

    /// Writes a record into `txn`.
    fn write(&mut self, txn: &mut Self::Txn, record: T) -> Result<()>;

    /// Flushes `txn` and makes it durable but not visible: after this, a
    /// restored job can commit it.
    fn pre_commit(&mut self, txn: &mut Self::Txn) -> Result<()>;

    /// Makes a pre-committed `txn` visible. Idempotent: a transaction that
    /// is already committed is recognised and skipped.
    fn commit(&mut self, txn: &Self::Txn) -> Result<()>;

    /// Drops an open or pre-committed transaction's data.
    fn abort(&mut self, txn: Self::Txn) -> Result<()>;

    /// Checks a transaction handle read from a checkpoint before it is
    /// used: everything in it came from storage, so it must not name
    /// anything outside what this sink owns (a file sink refuses a part
    /// name that is absolute or climbs out of its directory). Returns what
    /// is wrong; the runtime reports it as corrupt metadata, naming the
    /// checkpoint's metadata file. The default accepts everything.
    fn check_restored(&self, txn: &Self::Txn) -> std::result::Result<(), String> {
        let _ = txn;
        Ok(())
    }

    /// Called once at start, before any record: commits `restored` (the
    /// pre-committed transactions of the restored checkpoint; some may be
    /// committed already) and aborts every other transaction left behind
    /// by a failed attempt by the subtasks for which `owns(subtask)` is
    /// true (the subtasks this one replaces, also after rescaling).
    fn recover(&mut self, restored: &[Self::Txn], owns: &dyn Fn(u32) -> bool) -> Result<()>;
}

/// An exactly-once sink: a factory of one [`TransactionalWriter`] per subtask.
pub trait TwoPhaseCommitSink<T>: Send + Sync + 'static {
    /// The writer type.
    type Writer: TransactionalWriter<T>;

    /// Opens the writer of subtask `subtask` of `parallelism`.
    fn open(&self, subtask: u32, parallelism: u32) -> Result<Self::Writer>;
}

/// A pre-committed transaction and the checkpoint it belongs to, as stored.
#[derive(Serialize, Deserialize)]
struct PendingEntry<X> {
    checkpoint: CheckpointId,
    txn: X,
}

/// The sink state stored per subtask: `{"pending": [...]}`.
#[derive(Serialize, Deserialize)]
struct SinkState<X> {
    pending: Vec<PendingEntry<X>>,
}

/// The operator that runs a [`TransactionalWriter`] in a task.
pub(crate) struct TwoPhaseSinkOp<T, W: TransactionalWriter<T>> {
    pub uid: OperatorUid,
    pub writer: W,
    pub subtask: u32,
    pub current: Option<W::Txn>,
    /// Pre-committed transactions waiting for their checkpoint to complete.
    pub pending: BTreeMap<CheckpointId, Vec<W::Txn>>,
    pub _t: PhantomData<fn(T)>,
}

impl<T, W: TransactionalWriter<T>> TwoPhaseSinkOp<T, W> {
    pub fn new(uid: OperatorUid, writer: W, subtask: u32) -> Self {
        TwoPhaseSinkOp {
            uid,
            writer,
            subtask,
            current: None,
            pending: BTreeMap::new(),
            _t: PhantomData,
        }
    }

    fn state_json(&self) -> Result<serde_json::Value> {
        let entries: Vec<serde_json::Value> = self
            .pending
            .iter()
            .flat_map(|(id, txns)| txns.iter().map(move |t| (id, t)))
            .map(|(id, txn)| {
                serde_json::to_value(PendingEntry { checkpoint: *id, txn }).map_err(|e| RuntimeError::Codec {
                    what: format!("transaction of sink {}", self.uid),
                    reason: e.to_string(),
                })
            })
            .collect::<Result<_>>()?;
        Ok(serde_json::json!({ "pending": entries }))
    }

    fn commit_through(&mut self, id: CheckpointId) -> Result<()> {
        let later = self.pending.split_off(&id.next());
        let done = std::mem::replace(&mut self.pending, later);
        for txn in done.values().flatten() {
            self.writer.commit(txn)?;
        }
        Ok(())
    }
}

#[async_trait::async_trait]
impl<T: Send + 'static, W: TransactionalWriter<T>> Operator<T> for TwoPhaseSinkOp<T, W> {
    async fn initialize(&mut self, ctx: &InitContext) -> Result<()> {
        let (subtask, parallelism) = (ctx.subtask, ctx.parallelism);
        let mut restored: Vec<W::Txn> = Vec::new();
        if let Some(r) = &ctx.restore {
            if let Some(op) = r.metadata.operator(&self.uid) {
                // The transactions of every old subtask this one replaces.
                for st in op.subtasks.iter().filter(|s| s.subtask % parallelism == subtask) {
                    let Some(v) = &st.operator_state else { continue };
                    let state: SinkState<W::Txn> =
                        serde_json::from_value(v.clone()).map_err(|e| sluice_core::Error::Incompatible {
                            what: format!(
                                "transactions of sink {} subtask {} in {}",
                                self.uid,
                                st.subtask,
                                r.describe()
                            ),
                            reason: format!("they do not decode as this sink's transactions: {e}"),
                        })?;
                    for p in state.pending {
                        self.writer.check_restored(&p.txn).map_err(|reason| {
                            sluice_core::Error::corrupt(
                                r.metadata_location(),
                                format!(
                                    "a transaction of sink {} subtask {} (checkpoint {}): {reason}",
                                    self.uid, st.subtask, p.checkpoint
                                ),
                            )
                        })?;
                        restored.push(p.txn);
                    }
                }
            }
        }
        let owns = move |s: u32| s % parallelism == subtask;
        self.writer.recover(&restored, &owns)
    }

    fn process(&mut self, record: T) -> Result<()> {
        if self.current.is_none() {
            self.current = Some(self.writer.begin()?);
        }
        match self.current.as_mut() {
            Some(txn) => self.writer.write(txn, record),
            None => Ok(()),
        }
    }

    fn snapshot(&mut self, barrier: &CheckpointBarrier, parts: &mut SnapshotParts) -> Result<()> {
        if let Some(mut txn) = self.current.take() {
            self.writer.pre_commit(&mut txn)?;
            self.pending.entry(barrier.checkpoint_id).or_default().push(txn);
        }
        parts.operator_state.push(OperatorStatePart {
            uid: self.uid.clone(),
            subtask: self.subtask,
            state: self.state_json()?,
        });
        Ok(())
    }

    fn checkpoint_complete(&mut self, id: CheckpointId) -> Result<()> {
        self.commit_through(id)
    }

    fn finish(&mut self) -> Result<()> {
        // With the final checkpoint (the default) nothing is left here: its
        // barrier pre-committed the last transaction and its completion
        // committed it. Without one, the end of input commits what is left.
        if let Some(mut txn) = self.current.take() {
            warn!(
                "sink {} subtask {}: committing a transaction at the end of input, outside any checkpoint",
                self.uid, self.subtask
            );
            self.writer.pre_commit(&mut txn)?;
            self.writer.commit(&txn)?;
        }
        if let Some(last) = self.pending.keys().next_back().copied() {
            self.commit_through(last)?;
        }
        Ok(())
    }

    fn outbox(&mut self) -> Option<&mut dyn Outbox> {
        None
    }
}
