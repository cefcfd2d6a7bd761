//! The tasks: one tokio task per subtask runs one operator chain. This
//! file holds what tasks and the job master share — the control messages
//! ([`Control`]) and events ([`TaskEvent`]) between them, a task's view of
//! its attempt ([`TaskRuntime`]), the master's handle on a task
//! ([`TaskInfo`]) — and helpers of both task loops. The loops themselves:
//! [`source_task`] and [`input_task`]; the asynchronous part of snapshots:
//! [`snapshot_writer`].

pub(crate) mod input_task;
pub(crate) mod snapshot_writer;
pub(crate) mod source_task;

use crate::barriers::handler::BarrierHandler;
use crate::error::Result;
use crate::metrics::TaskMetrics;
use crate::operator::{InitContext, Operator};
use crate::savepoint::SavepointLocation;
use sluice_core::metadata::SubtaskSnapshot;
use sluice_core::{ChannelStateHandle, CheckpointBarrier, CheckpointId, OperatorUid, StateDescriptor};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// From the job master to a task (JSON on the control connection of a
/// worker).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub(crate) enum Control {
    /// Sources only: start checkpoint `barrier`; with `stop`, emit nothing
    /// after the barrier until told to end (or, if the checkpoint is aborted,
    /// to go on).
    Trigger { barrier: CheckpointBarrier, stop: bool },
    /// The checkpoint is complete.
    Complete(CheckpointId),
    /// The checkpoint was aborted.
    Abort(CheckpointId),
    /// Sources only: every source reached its end and the final checkpoint
    /// (if any) was triggered; finish now.
    EndInput,
}

/// One operator subtask's part of an acknowledgement.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) struct AckPart {
    pub uid: OperatorUid,
    pub parallelism: u32,
    pub snapshot: SubtaskSnapshot,
    pub key_type: Option<String>,
    pub states: Vec<StateDescriptor>,
    pub source_splits: Option<u32>,
    /// The keyed state file is the changes since this completed checkpoint
    /// (an incremental checkpoint): the coordinator puts it at the end of
    /// that checkpoint's chain for the subtask.
    pub changes_base: Option<CheckpointId>,
}

/// Where the state files of the savepoints in progress go, by id.
pub(crate) type SavepointTargets = Arc<SavepointTargetMap>;

/// The targets of the savepoints in progress. In the job master's process
/// a target is there before the savepoint is triggered; on a worker it
/// arrives on the control connection, possibly after a barrier came on a
/// data channel, so a worker's tasks wait for it a little.
#[derive(Default)]
pub(crate) struct SavepointTargetMap {
    /// `None`: the target could not be opened here.
    map: Mutex<HashMap<CheckpointId, Option<SavepointLocation>>>,
    added: tokio::sync::Notify,
    /// How long a lookup waits for a missing target.
    wait: Duration,
}

impl SavepointTargetMap {
    /// A worker's map: lookups wait up to `wait` for a target.
    pub fn waiting(wait: Duration) -> Self {
        SavepointTargetMap {
            wait,
            ..Default::default()
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<CheckpointId, Option<SavepointLocation>>> {
        self.map.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn insert(&self, id: CheckpointId, location: SavepointLocation) {
        self.lock().insert(id, Some(location));
        self.added.notify_waiters();
    }

    /// The target of savepoint `id` cannot be reached here: lookups fail
    /// at once.
    pub fn unreachable(&self, id: CheckpointId) {
        self.lock().insert(id, None);
        self.added.notify_waiters();
    }

    pub fn remove(&self, id: CheckpointId) {
        self.lock().remove(&id);
    }

    pub fn clear(&self) {
        self.lock().clear();
    }

    /// The target of savepoint `id` (waiting for it on a worker); `None`:
    /// the savepoint was aborted (or its target never came).
    pub async fn get(&self, id: CheckpointId) -> Option<SavepointLocation> {
        let deadline = tokio::time::Instant::now() + self.wait;
        loop {
            let added = self.added.notified();
            if let Some(l) = self.lock().get(&id).cloned() {
                return l;
            }
            if tokio::time::timeout_at(deadline, added).await.is_err() {
                return None;
            }
        }
    }
}

/// From a task to the job master (JSON on the control connection of a
/// worker).
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub(crate) enum TaskEvent {
    Ack {
        checkpoint: CheckpointId,
        task: usize,
        parts: Vec<AckPart>,
        channel_state: Option<ChannelStateHandle>,
        alignment: Duration,
        /// Trigger to the task's first barrier.
        start_delay: Duration,
        sync: Duration,
        async_part: Duration,
    },
    Decline {
        checkpoint: CheckpointId,
        task: usize,
        reason: String,
    },
    /// A source task has read all its splits and waits for `EndInput`.
    SourceExhausted { task: usize },
}

impl TaskEvent {
    /// The index of the task the event is from.
    pub fn task(&self) -> usize {
        match self {
            TaskEvent::Ack { task, .. }
            | TaskEvent::Decline { task, .. }
            | TaskEvent::SourceExhausted { task } => *task,
        }
    }
}

/// What a task needs from its attempt.
pub(crate) struct TaskRuntime {
    pub index: usize,
    /// The task's vertex in the job graph and its name (channel state).
    pub vertex: u32,
    pub vertex_name: Arc<str>,
    /// Switch aligned checkpoints to unaligned after this long.
    pub alignment_timeout: Option<Duration>,
    pub init: InitContext,
    pub control: mpsc::UnboundedReceiver<Control>,
    pub events: mpsc::UnboundedSender<TaskEvent>,
    pub writers: Arc<Mutex<Vec<JoinHandle<()>>>>,
    /// This task's counters.
    pub task_metrics: Arc<TaskMetrics>,
    pub savepoints: SavepointTargets,
    /// The attempt restores the savepoint the job was stopped with: sources
    /// end right after restoring, emitting nothing.
    pub stopped: bool,
}

/// The job master's handle on one running task.
pub(crate) struct TaskInfo {
    /// `name (subtask/parallelism)`, for logs.
    pub name: String,
    pub is_source: bool,
    pub control: mpsc::UnboundedSender<Control>,
}

pub(crate) fn apply_control<T>(
    c: Control,
    chain: &mut dyn Operator<T>,
    handler: Option<&mut BarrierHandler>,
) -> Result<()> {
    match c {
        Control::Complete(id) => chain.checkpoint_complete(id),
        Control::Abort(id) => {
            if let Some(h) = handler {
                h.abort(id);
            }
            Ok(())
        }
        // Only sources are triggered or ended; other tasks get barriers
        // and end of input in-band.
        Control::Trigger { .. } | Control::EndInput => Ok(()),
    }
}

pub(crate) async fn flush_and_drain<T>(chain: &mut dyn Operator<T>) -> Result<()> {
    if let Some(o) = chain.outbox() {
        o.flush_partial();
        o.drain().await?;
    }
    Ok(())
}

/// Sleeps until `deadline`, or forever without one (for `select!`).
pub(crate) async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}
