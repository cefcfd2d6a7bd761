//! The task loops: a source task and an input task, each running one
//! operator chain for one subtask, and the asynchronous part of snapshots.

use crate::barrier_handler::{AlignedCheckpoint, BarrierHandler};
use crate::channel::{InputGate, Message};
use crate::error::{Result, RuntimeError};
use crate::operator::{Collector, InitContext, Operator, SnapshotParts, SourcePart};
use crate::savepoint::SavepointLocation;
use crate::source::{Source, SplitReader};
use sluice_core::metadata::SubtaskSnapshot;
use sluice_core::{
    CheckpointBarrier, CheckpointId, CheckpointKind, OperatorUid, SplitPosition, StateDescriptor,
    StateFileHandle,
};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

/// From the job master to a task.
#[derive(Debug, Clone)]
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
#[derive(Debug)]
pub(crate) struct AckPart {
    pub uid: OperatorUid,
    pub parallelism: u32,
    pub snapshot: SubtaskSnapshot,
    pub key_type: Option<String>,
    pub states: Vec<StateDescriptor>,
    pub source_splits: Option<u32>,
}

/// Where the state files of the savepoints in progress go, by id.
pub(crate) type SavepointTargets = Arc<Mutex<HashMap<CheckpointId, SavepointLocation>>>;

/// From a task to the job master.
#[derive(Debug)]
pub(crate) enum TaskEvent {
    Ack {
        checkpoint: CheckpointId,
        task: usize,
        parts: Vec<AckPart>,
        alignment: Duration,
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

/// Job-wide counters, shared by all tasks and attempts.
#[derive(Debug, Default)]
pub struct Metrics {
    /// Records emitted by sources (replays count again).
    pub source_records: AtomicU64,
}

/// What a task needs from its attempt.
pub(crate) struct TaskRuntime {
    pub index: usize,
    pub init: InitContext,
    pub control: mpsc::UnboundedReceiver<Control>,
    pub events: mpsc::UnboundedSender<TaskEvent>,
    pub writers: Arc<Mutex<Vec<JoinHandle<()>>>>,
    pub metrics: Arc<Metrics>,
    pub savepoints: SavepointTargets,
}

impl TaskRuntime {
    /// Runs the synchronous part of a snapshot on `chain` and spawns the
    /// asynchronous part, which writes the state files and acknowledges.
    fn snapshot<T>(
        &self,
        chain: &mut dyn Operator<T>,
        done: AlignedCheckpoint,
        source: Option<SourcePart>,
    ) -> Result<()> {
        let started = Instant::now();
        let mut parts = SnapshotParts::default();
        parts.splits.extend(source);
        chain.snapshot(&done.barrier, &mut parts)?;
        let sync = started.elapsed();
        let id = done.barrier.checkpoint_id;
        // Checkpoint files go to `chk-<id>/` of the job's storage, with paths
        // relative to the storage; savepoint files to the savepoint's own
        // directory, with paths relative to it.
        let target = match done.barrier.kind {
            CheckpointKind::Checkpoint => None,
            CheckpointKind::Savepoint => Some(
                self.savepoints
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&id)
                    .cloned(),
            ),
        };
        let storage = self.init.storage.clone();
        let events = self.events.clone();
        let task = self.index;
        let parallelism = self.init.parallelism;
        let handle = tokio::spawn(async move {
            let started = Instant::now();
            let result: sluice_core::Result<Vec<AckPart>> = async {
                let (storage, dir) = match target {
                    None => (storage, None),
                    Some(Some(loc)) => (loc.storage.clone(), Some(loc)),
                    Some(None) => {
                        return Err(sluice_core::Error::not_found(format!(
                            "the target directory of savepoint {id} (it was aborted)"
                        )))
                    }
                };
                let mut acks: Vec<AckPart> = Vec::new();
                for p in parts.splits {
                    acks.push(AckPart {
                        uid: p.uid,
                        parallelism,
                        snapshot: SubtaskSnapshot {
                            subtask: p.subtask,
                            keyed_state: None,
                            splits: p.positions,
                        },
                        key_type: None,
                        states: Vec::new(),
                        source_splits: Some(p.num_splits),
                    });
                }
                for k in parts.keyed {
                    let snap = k.snapshot;
                    let encoded = tokio::task::spawn_blocking(move || {
                        sluice_core::format::encode_snapshot(snap.as_ref())
                    })
                    .await
                    .map_err(|e| sluice_core::Error::storage("snapshot encoder", e.to_string()))??;
                    let name = format!("{}-{}.kst", k.uid, k.subtask);
                    let (path, write_path) = match &dir {
                        None => {
                            let p = format!("{}/{name}", id.dir());
                            (p.clone(), p)
                        }
                        Some(loc) => (name.clone(), loc.join(&name)),
                    };
                    let size = encoded.bytes.len() as u64;
                    storage.write_file(&write_path, encoded.bytes).await?;
                    acks.push(AckPart {
                        uid: k.uid,
                        parallelism,
                        snapshot: SubtaskSnapshot {
                            subtask: k.subtask,
                            keyed_state: Some(StateFileHandle {
                                path,
                                size,
                                crc32: encoded.crc32,
                                key_groups: encoded.key_groups,
                                entries: encoded.entries,
                            }),
                            splits: Vec::new(),
                        },
                        key_type: Some(k.key_type),
                        states: k.states,
                        source_splits: None,
                    });
                }
                Ok(acks)
            }
            .await;
            let event = match result {
                Ok(parts) => TaskEvent::Ack {
                    checkpoint: id,
                    task,
                    parts,
                    alignment: done.alignment,
                    sync,
                    async_part: started.elapsed(),
                },
                Err(e) => TaskEvent::Decline {
                    checkpoint: id,
                    task,
                    reason: e.to_string(),
                },
            };
            let _ = events.send(event);
        });
        let mut writers = self.writers.lock().unwrap_or_else(|p| p.into_inner());
        writers.retain(|h| !h.is_finished());
        writers.push(handle);
        Ok(())
    }
}

fn apply_control<T>(
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

async fn drain<T>(chain: &mut dyn Operator<T>) -> Result<()> {
    if let Some(o) = chain.outbox() {
        if o.has_pending() {
            o.drain().await?;
        }
    }
    Ok(())
}

async fn flush_and_drain<T>(chain: &mut dyn Operator<T>) -> Result<()> {
    if let Some(o) = chain.outbox() {
        o.flush_partial();
        o.drain().await?;
    }
    Ok(())
}

/// A source's checkpoint: the positions of its splits, then the chain's
/// synchronous snapshot, which emits the barrier after every record so far.
fn snapshot_source<T>(
    rt: &TaskRuntime,
    uid: &OperatorUid,
    num_splits: u32,
    readers: &[(u32, Box<dyn SplitReader<T>>, bool)],
    chain: &mut dyn Operator<T>,
    barrier: CheckpointBarrier,
) -> Result<()> {
    let positions = readers
        .iter()
        .map(|(s, r, _)| SplitPosition {
            split: *s,
            offset: r.offset(),
        })
        .collect();
    let done = AlignedCheckpoint {
        barrier,
        alignment: Duration::ZERO,
    };
    let part = SourcePart {
        uid: uid.clone(),
        subtask: rt.init.subtask,
        num_splits,
        positions,
    };
    rt.snapshot(chain, done, Some(part))
}

/// How a source's wait for the job master ended.
enum Resume {
    /// Go on reading (a stop-with-savepoint was aborted).
    Read,
    /// The source finished (end of input sent down the chain).
    Ended,
}

/// A source subtask: reads its splits, answers triggers by snapshotting its
/// positions and emitting the barrier.
pub(crate) async fn run_source_task<T: Send + 'static>(
    source: Arc<dyn Source<T>>,
    uid: OperatorUid,
    mut chain: Box<dyn Operator<T>>,
    mut rt: TaskRuntime,
) -> Result<()> {
    chain.initialize(&rt.init).await?;
    let (subtask, parallelism) = (rt.init.subtask, rt.init.parallelism);
    let num_splits = source.num_splits();
    let mut stored: BTreeMap<u32, u64> = BTreeMap::new();
    if let Some(restore) = &rt.init.restore {
        if let Some(op) = restore.metadata.operator(&uid) {
            if let Some(n) = op.source_splits.filter(|n| *n != num_splits) {
                return Err(RuntimeError::Storage(sluice_core::Error::Incompatible {
                    what: format!("source {uid} in {}", restore.describe()),
                    reason: format!(
                        "it was written by a source with {n} splits, the job's source has {num_splits}; the \
                         splits of a source are fixed (its parallelism may change)"
                    ),
                }));
            }
            for st in &op.subtasks {
                for p in &st.splits {
                    stored.insert(p.split, p.offset);
                }
            }
        }
    }
    let mut readers: Vec<(u32, Box<dyn SplitReader<T>>, bool)> = Vec::new();
    for split in (0..num_splits).filter(|s| s % parallelism == subtask) {
        let offset = stored.get(&split).copied().unwrap_or(0);
        readers.push((split, source.open_split(split, offset)?, true));
    }
    let mut current = 0usize;
    let mut batches = 0u64;
    let (batch_size, pause) = (source.batch_size(), source.pause());
    // Waits for the job master after a stop-with-savepoint barrier (or, with
    // `exhausted`, after every split was read): nothing is emitted until it
    // says to end or, the savepoint aborted, to go on.
    macro_rules! wait {
        ($stopping:expr, $exhausted:expr) => {{
            let mut stopping: Option<CheckpointId> = $stopping;
            loop {
                match rt.control.recv().await {
                    Some(Control::Trigger { barrier, stop }) => {
                        snapshot_source(&rt, &uid, num_splits, &readers, chain.as_mut(), barrier)?;
                        flush_and_drain(chain.as_mut()).await?;
                        if stop {
                            stopping = Some(barrier.checkpoint_id);
                        }
                    }
                    Some(Control::EndInput) => {
                        chain.finish()?;
                        flush_and_drain(chain.as_mut()).await?;
                        break Resume::Ended;
                    }
                    Some(Control::Abort(id)) if stopping == Some(id) && !$exhausted => {
                        apply_control(Control::Abort(id), chain.as_mut(), None)?;
                        break Resume::Read;
                    }
                    Some(c) => apply_control(c, chain.as_mut(), None)?,
                    None => return Err(RuntimeError::Cancelled),
                }
            }
        }};
    }
    loop {
        let mut stop_at = None;
        loop {
            match rt.control.try_recv() {
                Ok(Control::Trigger { barrier, stop }) => {
                    snapshot_source(&rt, &uid, num_splits, &readers, chain.as_mut(), barrier)?;
                    if stop {
                        stop_at = Some(barrier.checkpoint_id);
                        break;
                    }
                }
                Ok(c) => apply_control(c, chain.as_mut(), None)?,
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => return Err(RuntimeError::Cancelled),
            }
        }
        if stop_at.is_some() {
            flush_and_drain(chain.as_mut()).await?;
            match wait!(stop_at, false) {
                Resume::Read => continue,
                Resume::Ended => return Ok(()),
            }
        }
        let live: Vec<usize> = (0..readers.len()).filter(|i| readers[*i].2).collect();
        if live.is_empty() {
            // Every split is read: tell the job master and wait for the
            // final checkpoint's trigger and the order to end.
            flush_and_drain(chain.as_mut()).await?;
            let _ = rt.events.send(TaskEvent::SourceExhausted { task: rt.index });
            match wait!(None, true) {
                Resume::Read | Resume::Ended => return Ok(()),
            }
        }
        let i = live[current % live.len()];
        current = current.wrapping_add(1);
        let (_, reader, more) = &mut readers[i];
        let mut out = Collector::new(chain.as_mut());
        *more = reader.read(batch_size, &mut out)?;
        let emitted = out.emitted;
        rt.metrics.source_records.fetch_add(emitted, Ordering::Relaxed);
        drain(chain.as_mut()).await?;
        batches += 1;
        if let Some(p) = pause {
            flush_and_drain(chain.as_mut()).await?;
            tokio::time::sleep(p).await;
        } else if batches % 16 == 0 {
            tokio::task::yield_now().await;
        }
    }
}

enum Next<T> {
    Control(Option<Control>),
    Input(Option<(usize, Option<Message<T>>)>),
}

/// A task with input channels: aligns barriers, processes batches.
pub(crate) async fn run_input_task<T: Send + 'static>(
    mut gate: InputGate<T>,
    mut chain: Box<dyn Operator<T>>,
    mut rt: TaskRuntime,
) -> Result<()> {
    chain.initialize(&rt.init).await?;
    let mut handler = BarrierHandler::new(gate.len());
    let mut ended = 0usize;
    let task_name = rt.init.task_name.clone();
    loop {
        while let Ok(c) = rt.control.try_recv() {
            apply_control(c, chain.as_mut(), Some(&mut handler))?;
        }
        let next = match gate.try_next(&|i| handler.is_blocked(i)) {
            Some(item) => item,
            None => {
                flush_and_drain(chain.as_mut()).await?;
                let blocked = |i| handler.is_blocked(i);
                let n = tokio::select! {
                    biased;
                    c = rt.control.recv() => Next::Control(c),
                    m = gate.next(&blocked) => Next::Input(m),
                };
                match n {
                    Next::Control(Some(c)) => {
                        apply_control(c, chain.as_mut(), Some(&mut handler))?;
                        continue;
                    }
                    Next::Control(None) => return Err(RuntimeError::Cancelled),
                    Next::Input(Some(item)) => item,
                    Next::Input(None) => {
                        return Err(RuntimeError::InvalidJob(format!(
                            "task {task_name}: no input can deliver (all blocked); this is a bug"
                        )))
                    }
                }
            }
        };
        match next {
            (_, None) => {
                return Err(RuntimeError::ChannelClosed {
                    task: task_name.to_string(),
                })
            }
            (_, Some(Message::Batch(batch))) => chain.process_batch(batch)?,
            (i, Some(Message::Barrier(b))) => {
                if let Some(done) = handler.on_barrier(i, b) {
                    rt.snapshot(chain.as_mut(), done, None)?;
                }
            }
            (i, Some(Message::EndOfInput)) => {
                gate.mark_ended(i);
                ended += 1;
                if let Some(done) = handler.on_end_of_input(i) {
                    rt.snapshot(chain.as_mut(), done, None)?;
                }
                if ended == gate.len() {
                    chain.finish()?;
                    flush_and_drain(chain.as_mut()).await?;
                    return Ok(());
                }
            }
        }
        drain(chain.as_mut()).await?;
    }
}
