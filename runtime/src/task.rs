//! The task loops: a source task and an input task, each running one
//! operator chain for one subtask, and the asynchronous part of snapshots.

use crate::barrier_handler::{AlignedCheckpoint, BarrierHandler};
use crate::channel::{Delivery, InputGate, Message};
use crate::error::{Result, RuntimeError};
use crate::operator::{Collector, InitContext, Operator, SnapshotParts, SourcePart};
use crate::savepoint::SavepointLocation;
use crate::source::{Source, SplitReader};
use serde::de::DeserializeOwned;
use serde::Serialize;
use sluice_core::metadata::SubtaskSnapshot;
use sluice_core::ChannelStateHandle;
use sluice_core::CheckpointStorageExt;
use sluice_core::{
    CheckpointBarrier, CheckpointId, CheckpointKind, OperatorUid, SplitPosition, StateDescriptor,
    StateFileHandle,
};
use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};
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
        channel_state: Option<ChannelStateHandle>,
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
    /// The task's vertex in the job graph and its name (channel state).
    pub vertex: u32,
    pub vertex_name: Arc<str>,
    /// Switch aligned checkpoints to unaligned after this long.
    pub alignment_timeout: Option<Duration>,
    pub init: InitContext,
    pub control: mpsc::UnboundedReceiver<Control>,
    pub events: mpsc::UnboundedSender<TaskEvent>,
    pub writers: Arc<Mutex<Vec<JoinHandle<()>>>>,
    pub metrics: Arc<Metrics>,
    pub savepoints: SavepointTargets,
    /// The attempt restores the savepoint the job was stopped with: sources
    /// end right after restoring, emitting nothing.
    pub stopped: bool,
}

impl TaskRuntime {
    /// Runs the synchronous part of a snapshot on `chain` and spawns the
    /// asynchronous part, which writes the state files and acknowledges.
    fn snapshot<T: Serialize + Send + 'static>(
        &self,
        chain: &mut dyn Operator<T>,
        done: AlignedCheckpoint,
        source: Option<SourcePart>,
        channel_state: Option<oneshot::Receiver<Vec<T>>>,
    ) -> Result<()> {
        let started = Instant::now();
        let mut parts = SnapshotParts::default();
        parts.splits.extend(source);
        chain.snapshot(&done.barrier, &mut parts)?;
        let output_state = parts.output_state.take();
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
        let (vertex, vertex_name, subtask) = (self.vertex, self.vertex_name.clone(), self.init.subtask);
        let task_uid = self.init.task_uid.clone();
        let handle = tokio::spawn(async move {
            let started = Instant::now();
            let result: sluice_core::Result<(Vec<AckPart>, Option<ChannelStateHandle>)> = async {
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
                            operator_state: None,
                        },
                        key_type: None,
                        states: Vec::new(),
                        source_splits: Some(p.num_splits),
                    });
                }
                for o in parts.operator_state {
                    acks.push(AckPart {
                        uid: o.uid,
                        parallelism,
                        snapshot: SubtaskSnapshot {
                            subtask: o.subtask,
                            keyed_state: None,
                            splits: Vec::new(),
                            operator_state: Some(o.state),
                        },
                        key_type: None,
                        states: Vec::new(),
                        source_splits: None,
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
                            operator_state: None,
                        },
                        key_type: Some(k.key_type),
                        states: k.states,
                        source_splits: None,
                    });
                }
                // An unaligned checkpoint: the records its barrier overtook,
                // on the inputs (once every input delivered it in place) and
                // in the output queue.
                let mut channel = None;
                let input: Vec<T> = match channel_state {
                    Some(rx) => rx.await.map_err(|_| {
                        sluice_core::Error::storage(
                            format!("channel state of checkpoint {id}"),
                            "the checkpoint was aborted on this task before its channel state was complete",
                        )
                    })?,
                    None => Vec::new(),
                };
                if !input.is_empty() || output_state.is_some() {
                    let path = format!("{}/channel-{vertex}-{subtask}.cst", id.dir());
                    let (bytes, input_records, output_records) = tokio::task::spawn_blocking(move || {
                        let (out, out_count) = match output_state {
                            Some(encode) => encode()?,
                            None => (
                                postcard::to_allocvec(&Vec::<(u32, Vec<u8>)>::new()).unwrap_or_default(),
                                0,
                            ),
                        };
                        let bytes = encode_channel_state(&input, &out)?;
                        Ok::<_, sluice_core::Error>((bytes, input.len() as u64, out_count))
                    })
                    .await
                    .map_err(|e| sluice_core::Error::storage("channel state encoder", e.to_string()))??;
                    let (size, crc32) = (bytes.len() as u64, crc32fast::hash(&bytes));
                    storage.write_file(&path, bytes).await?;
                    channel = Some(ChannelStateHandle {
                        task_uid: task_uid.to_string(),
                        task_name: vertex_name.to_string(),
                        subtask,
                        parallelism,
                        path,
                        size,
                        crc32,
                        input_records,
                        output_records,
                    });
                }
                Ok((acks, channel))
            }
            .await;
            let event = match result {
                Ok((parts, channel_state)) => TaskEvent::Ack {
                    checkpoint: id,
                    task,
                    parts,
                    channel_state,
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

async fn flush_and_drain<T>(chain: &mut dyn Operator<T>) -> Result<()> {
    if let Some(o) = chain.outbox() {
        o.flush_partial();
        o.drain().await?;
    }
    Ok(())
}

/// A source's checkpoint: the positions of its splits, then the chain's
/// synchronous snapshot, which emits the barrier after every record so far.
fn snapshot_source<T: Serialize + Send + 'static>(
    rt: &TaskRuntime,
    uid: &OperatorUid,
    num_splits: u32,
    positions: Vec<SplitPosition>,
    chain: &mut dyn Operator<T>,
    barrier: CheckpointBarrier,
) -> Result<()> {
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
    rt.snapshot(chain, done, Some(part), None)
}

/// The read positions of a source subtask's splits.
fn positions<T>(readers: &[(u32, Box<dyn SplitReader<T>>, bool)]) -> Vec<SplitPosition> {
    readers
        .iter()
        .map(|(s, r, _)| SplitPosition {
            split: *s,
            offset: r.offset(),
        })
        .collect()
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
pub(crate) async fn run_source_task<T: Serialize + Send + 'static>(
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
    if rt.stopped {
        // The job was stopped with the savepoint just restored: nothing
        // after it may be emitted again.
        chain.finish()?;
        flush_and_drain(chain.as_mut()).await?;
        return Ok(());
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
                        snapshot_source(
                            &rt,
                            &uid,
                            num_splits,
                            positions(&readers),
                            chain.as_mut(),
                            barrier,
                        )?;
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
        if let Some(o) = chain.outbox() {
            o.fire_deadlines(Instant::now());
        }
        let mut stop_at = None;
        loop {
            match rt.control.try_recv() {
                Ok(Control::Trigger { barrier, stop }) => {
                    snapshot_source(
                        &rt,
                        &uid,
                        num_splits,
                        positions(&readers),
                        chain.as_mut(),
                        barrier,
                    )?;
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
        let at = positions(&readers);
        let mut stop_at = drain_source(&mut rt, &uid, num_splits, &at, chain.as_mut(), false).await?;
        batches += 1;
        if stop_at.is_none() {
            if let Some(p) = pause {
                stop_at = drain_source(&mut rt, &uid, num_splits, &at, chain.as_mut(), true).await?;
                if stop_at.is_none() {
                    tokio::time::sleep(p).await;
                }
            } else if batches % 16 == 0 {
                tokio::task::yield_now().await;
            }
        }
        if stop_at.is_some() {
            flush_and_drain(chain.as_mut()).await?;
            match wait!(stop_at, false) {
                Resume::Read => continue,
                Resume::Ended => return Ok(()),
            }
        }
    }
}

/// Sends a source's queued output (with `flush`, partial batches too),
/// waiting for channel capacity, while still answering the job master: a
/// trigger is snapshotted at once (an unaligned barrier overtakes the
/// queued records). Returns the checkpoint of a stop-with-savepoint
/// trigger, after which the source must emit nothing more.
async fn drain_source<T: Serialize + Send + 'static>(
    rt: &mut TaskRuntime,
    uid: &OperatorUid,
    num_splits: u32,
    at: &[SplitPosition],
    chain: &mut dyn Operator<T>,
    flush: bool,
) -> Result<Option<CheckpointId>> {
    if flush {
        if let Some(o) = chain.outbox() {
            o.flush_partial();
        }
    }
    loop {
        if !chain.outbox().is_some_and(|o| o.has_pending()) {
            return Ok(None);
        }
        let deadline = chain.outbox().and_then(|o| o.next_deadline());
        let control = {
            let out = chain.outbox();
            tokio::select! {
                biased;
                c = rt.control.recv() => Some(c),
                _ = crate::executor::sleep_until_opt(deadline), if deadline.is_some() => None,
                r = async { match out { Some(o) => o.drain().await, None => Ok(()) } } => { r?; None }
            }
        };
        if let Some(o) = chain.outbox() {
            o.fire_deadlines(Instant::now());
        }
        match control {
            None => {}
            Some(None) => return Err(RuntimeError::Cancelled),
            Some(Some(Control::Trigger { barrier, stop })) => {
                snapshot_source(rt, uid, num_splits, at.to_vec(), chain, barrier)?;
                if stop {
                    return Ok(Some(barrier.checkpoint_id));
                }
            }
            Some(Some(c)) => apply_control(c, chain, None)?,
        }
    }
}

enum Next<T> {
    Control(Option<Control>),
    Input(Option<Delivery<T>>),
    Timeout,
}

/// The magic and version at the start of a channel-state file.
const CHANNEL_STATE_MAGIC: &[u8; 6] = b"SLCS\x00\x02";

/// A channel-state file: magic and version, the length of the input part,
/// the input records (postcard), the output records per channel (postcard).
pub(crate) fn encode_channel_state<T: Serialize>(
    input: &[T],
    output: &[u8],
) -> sluice_core::Result<bytes::Bytes> {
    let blob = postcard::to_allocvec(input).map_err(|e| sluice_core::Error::Serialization {
        what: "input channel state".into(),
        reason: e.to_string(),
    })?;
    let mut out = Vec::with_capacity(14 + blob.len() + output.len());
    out.extend_from_slice(CHANNEL_STATE_MAGIC);
    out.extend_from_slice(&(blob.len() as u64).to_le_bytes());
    out.extend_from_slice(&blob);
    out.extend_from_slice(output);
    Ok(out.into())
}

/// The input (`input`) or output part of a channel-state file.
fn decode_channel_state<X: DeserializeOwned>(
    handle: &ChannelStateHandle,
    bytes: &[u8],
    input: bool,
) -> sluice_core::Result<Vec<X>> {
    let path = &handle.path;
    sluice_core::format::verify_snapshot_file(path, bytes, handle.crc32)?;
    let body = bytes
        .strip_prefix(CHANNEL_STATE_MAGIC.as_slice())
        .ok_or_else(|| {
            sluice_core::Error::corrupt(path, "not a channel-state file (bad magic or version)")
        })?;
    let (len, body) = body
        .split_first_chunk::<8>()
        .ok_or_else(|| sluice_core::Error::corrupt(path, "truncated header"))?;
    let len = u64::from_le_bytes(*len);
    let len = usize::try_from(len)
        .ok()
        .filter(|l| *l <= body.len())
        .ok_or_else(|| {
            sluice_core::Error::corrupt(path, format!("input part of {len} bytes in a shorter file"))
        })?;
    let (part, expected) = match input {
        true => (&body[..len], handle.input_records),
        false => (&body[len..], handle.output_records),
    };
    let records: Vec<X> = postcard::from_bytes(part).map_err(|e| {
        sluice_core::Error::corrupt(
            path,
            format!("channel state does not decode as this task's records: {e}"),
        )
    })?;
    let count = if input {
        records.len() as u64
    } else {
        expected // per-channel groups; the total is checked by the writer's count
    };
    if count != expected {
        return Err(sluice_core::Error::corrupt(
            path,
            format!("{count} records, the metadata says {expected}"),
        ));
    }
    Ok(records)
}

/// The channel state this subtask stored in the unaligned checkpoint it
/// restores from: its input records (`input`) or its output records per
/// channel.
pub(crate) async fn restored_channel_state<X: DeserializeOwned>(
    ctx: &InitContext,
    input: bool,
) -> Result<Vec<X>> {
    let Some(restore) = &ctx.restore else {
        return Ok(Vec::new());
    };
    if let Some(c) = restore
        .metadata
        .channel_state
        .iter()
        .find(|c| c.task_uid.is_empty())
    {
        return Err(sluice_core::Error::Incompatible {
            what: format!("channel state of task {} in {}", c.task_name, restore.describe()),
            reason: "it was written by an older Sluice that did not record the task's id, so it cannot be matched \
                     to a task safely; restore from an aligned checkpoint or a savepoint instead"
                .into(),
        }
        .into());
    }
    let mine: Vec<&ChannelStateHandle> = restore
        .metadata
        .channel_state
        .iter()
        .filter(|c| *c.task_uid == *ctx.task_uid)
        .collect();
    if let Some(c) = mine.iter().find(|c| c.parallelism != ctx.parallelism) {
        return Err(sluice_core::Error::Incompatible {
            what: format!("channel state of task {} in {}", c.task_name, restore.describe()),
            reason: format!(
                "an unaligned checkpoint with records in flight restores only at the parallelism it was taken at \
                 ({}, the job has {}); take a savepoint (always aligned) to rescale",
                c.parallelism, ctx.parallelism
            ),
        }
        .into());
    }
    let mut out = Vec::new();
    for c in mine.into_iter().filter(|c| c.subtask == ctx.subtask) {
        if (input && c.input_records == 0) || (!input && c.output_records == 0) {
            continue;
        }
        let bytes = restore.storage.read_file(&restore.path_of_channel(c)).await?;
        out.extend(decode_channel_state::<X>(c, &bytes, input)?);
    }
    Ok(out)
}

/// The records an unaligned checkpoint records while its barriers are on
/// their way, and where they go when complete.
struct Recorder<T> {
    id: CheckpointId,
    records: Vec<T>,
    done: oneshot::Sender<Vec<T>>,
}

/// The barrier state of an input task: the handler and the recorder of the
/// unaligned checkpoint in progress.
struct Barriers<T> {
    handler: BarrierHandler,
    recorder: Option<Recorder<T>>,
}

impl<T: Clone + Serialize + Send + 'static> Barriers<T> {
    /// Takes the snapshot the handler asked for; an unaligned one starts
    /// recording.
    fn snapshot(
        &mut self,
        rt: &TaskRuntime,
        gate: &InputGate<T>,
        chain: &mut dyn Operator<T>,
        done: AlignedCheckpoint,
    ) -> Result<()> {
        let rx = if done.unaligned() {
            let (tx, rx) = oneshot::channel();
            // Records taken out of a channel earlier and not processed yet
            // are before the barrier there: channel state too.
            let mut records = Vec::new();
            for i in 0..gate.len() {
                if self.handler.is_recording(i) {
                    records.extend(gate.backlog_records(i).cloned());
                }
            }
            self.recorder = Some(Recorder {
                id: done.barrier.checkpoint_id,
                records,
                done: tx,
            });
            Some(rx)
        } else {
            None
        };
        rt.snapshot(chain, done, None, rx)
    }

    /// After every barrier event: hands over complete channel state, drops
    /// the recorder of a checkpoint no longer in progress here.
    fn settle(&mut self) {
        if let Some(id) = self.handler.take_finished() {
            if let Some(r) = self.recorder.take_if(|r| r.id == id) {
                let _ = r.done.send(r.records);
            }
        }
        if self
            .recorder
            .as_ref()
            .is_some_and(|r| self.handler.pending_checkpoint() != Some(r.id))
        {
            self.recorder = None;
        }
    }

    fn record(&mut self, batch: &[T]) {
        if let Some(r) = self.recorder.as_mut() {
            r.records.extend_from_slice(batch);
        }
    }

    /// A message taken out of recording channel `i` ahead of processing:
    /// records are recorded and kept for processing; the barrier in place
    /// ends the recording of `i` (and is consumed here).
    fn spill(&mut self, gate: &mut InputGate<T>, i: usize, msg: Message<T>) -> bool {
        match msg {
            Message::Batch(b) => {
                self.record(&b);
                gate.push_backlog(i, Message::Batch(b));
                true
            }
            Message::Barrier(b) if Some(b.checkpoint_id) == self.handler.pending_checkpoint() => {
                // Recording already started: no snapshot to take here.
                let _ = self.handler.on_barrier(i, b);
                self.settle();
                false
            }
            other => {
                gate.push_backlog(i, other);
                false
            }
        }
    }

    /// Takes out of the recording channels everything they hold now.
    fn spill_available(&mut self, gate: &mut InputGate<T>, task: &str) -> Result<()> {
        for i in 0..gate.len() {
            while self.handler.is_recording(i) {
                match gate.try_take(i) {
                    None => break,
                    Some(None) => {
                        return Err(RuntimeError::ChannelClosed {
                            task: task.to_string(),
                        })
                    }
                    Some(Some(m)) => {
                        if !self.spill(gate, i, m) {
                            break;
                        }
                    }
                }
            }
        }
        Ok(())
    }
}

/// The earlier of the handler's alignment deadline and the chain output's
/// barrier deadline.
fn next_deadline<T>(handler: &BarrierHandler, chain: &mut dyn Operator<T>) -> Option<Instant> {
    let out = chain.outbox().and_then(|o| o.next_deadline());
    match (handler.deadline(), out) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Handles the deadlines that passed: the aligning checkpoint switches to
/// unaligned; barriers waiting in place go on the priority lanes.
fn on_deadlines<T: Clone + Serialize + Send + 'static>(
    b: &mut Barriers<T>,
    rt: &TaskRuntime,
    gate: &InputGate<T>,
    chain: &mut dyn Operator<T>,
) -> Result<()> {
    let now = Instant::now();
    if let Some(o) = chain.outbox() {
        o.fire_deadlines(now);
    }
    if let Some(done) = b.handler.check_timeout(now) {
        b.snapshot(rt, gate, chain, done)?;
    }
    Ok(())
}

enum Urgent<T> {
    Drained(Result<()>),
    Control(Option<Control>),
    Gate(Delivery<T>),
    Timeout,
}

/// Sends the chain's queued output, waiting for channel capacity, while
/// still handling what cannot wait: control messages, priority barriers,
/// the alignment timeout, and the records of channels being recorded (so
/// that upstream barriers can reach their place).
async fn drain_listening<T: Clone + Serialize + Send + 'static>(
    chain: &mut dyn Operator<T>,
    gate: &mut InputGate<T>,
    b: &mut Barriers<T>,
    rt: &mut TaskRuntime,
) -> Result<()> {
    loop {
        let pending = chain.outbox().is_some_and(|o| o.has_pending());
        if !pending {
            return Ok(());
        }
        let deadline = next_deadline(&b.handler, chain);
        let ev = {
            let handler = &b.handler;
            let recording = |i| handler.is_recording(i);
            let out = chain.outbox();
            tokio::select! {
                biased;
                c = rt.control.recv() => Urgent::Control(c),
                d = gate.next_urgent(&recording) => Urgent::Gate(d),
                _ = crate::executor::sleep_until_opt(deadline), if deadline.is_some() => Urgent::Timeout,
                r = async { match out { Some(o) => o.drain().await, None => Ok(()) } } => Urgent::Drained(r),
            }
        };
        match ev {
            Urgent::Drained(r) => r?,
            Urgent::Control(Some(c)) => apply_control(c, chain, Some(&mut b.handler))?,
            Urgent::Control(None) => return Err(RuntimeError::Cancelled),
            Urgent::Timeout => on_deadlines(b, rt, gate, chain)?,
            Urgent::Gate(d) => match d.msg {
                None => {
                    return Err(RuntimeError::ChannelClosed {
                        task: rt.init.task_name.to_string(),
                    })
                }
                Some(Message::Priority(barrier)) => {
                    if let Some(done) = b.handler.on_priority_barrier(d.channel, barrier) {
                        b.snapshot(rt, gate, chain, done)?;
                    }
                }
                Some(m) => {
                    b.spill(gate, d.channel, m);
                }
            },
        }
        b.settle();
        b.spill_available(gate, &rt.init.task_name)?;
    }
}

/// A task with input channels: aligns barriers (or records in-flight data
/// for unaligned checkpoints), processes batches.
pub(crate) async fn run_input_task<T: Clone + Serialize + DeserializeOwned + Send + 'static>(
    mut gate: InputGate<T>,
    mut chain: Box<dyn Operator<T>>,
    mut rt: TaskRuntime,
) -> Result<()> {
    chain.initialize(&rt.init).await?;
    let mut b = Barriers {
        handler: BarrierHandler::with_alignment_timeout(gate.len(), rt.alignment_timeout),
        recorder: None,
    };
    // Records that were in flight at the restored (unaligned) checkpoint
    // come first.
    let replay: Vec<T> = restored_channel_state(&rt.init, true).await?;
    if !replay.is_empty() {
        tracing::debug!(task = %rt.init.task_name, records = replay.len(), "replaying channel state");
        chain.process_batch(replay)?;
        drain_listening(chain.as_mut(), &mut gate, &mut b, &mut rt).await?;
    }
    let mut ended = 0usize;
    let task_name = rt.init.task_name.clone();
    loop {
        while let Ok(c) = rt.control.try_recv() {
            apply_control(c, chain.as_mut(), Some(&mut b.handler))?;
            b.settle();
        }
        on_deadlines(&mut b, &rt, &gate, chain.as_mut())?;
        b.settle();
        b.spill_available(&mut gate, &task_name)?;
        let next = match gate.try_next(&|i| b.handler.is_blocked(i)) {
            Some(item) => item,
            None => {
                if let Some(o) = chain.outbox() {
                    o.flush_partial();
                }
                if chain.outbox().is_some_and(|o| o.has_pending()) {
                    drain_listening(chain.as_mut(), &mut gate, &mut b, &mut rt).await?;
                    continue;
                }
                let deadline = next_deadline(&b.handler, chain.as_mut());
                let n = {
                    let handler = &b.handler;
                    let blocked = |i| handler.is_blocked(i);
                    tokio::select! {
                        biased;
                        c = rt.control.recv() => Next::Control(c),
                        _ = crate::executor::sleep_until_opt(deadline), if deadline.is_some() => Next::Timeout,
                        m = gate.next(&blocked) => Next::Input(m),
                    }
                };
                match n {
                    Next::Control(Some(c)) => {
                        apply_control(c, chain.as_mut(), Some(&mut b.handler))?;
                        b.settle();
                        continue;
                    }
                    Next::Control(None) => return Err(RuntimeError::Cancelled),
                    Next::Timeout => continue,
                    Next::Input(Some(item)) => item,
                    Next::Input(None) => {
                        return Err(RuntimeError::InvalidJob(format!(
                            "task {task_name}: no input can deliver (all blocked); this is a bug"
                        )))
                    }
                }
            }
        };
        let i = next.channel;
        match next.msg {
            None => {
                return Err(RuntimeError::ChannelClosed {
                    task: task_name.to_string(),
                })
            }
            Some(Message::Batch(batch)) => {
                if !next.from_backlog && b.handler.is_recording(i) {
                    b.record(&batch);
                }
                chain.process_batch(batch)?
            }
            Some(Message::Barrier(barrier)) => {
                if let Some(done) = b.handler.on_barrier(i, barrier) {
                    b.snapshot(&rt, &gate, chain.as_mut(), done)?;
                }
                b.settle();
            }
            Some(Message::Priority(barrier)) => {
                if let Some(done) = b.handler.on_priority_barrier(i, barrier) {
                    b.snapshot(&rt, &gate, chain.as_mut(), done)?;
                }
                b.settle();
            }
            Some(Message::EndOfInput) => {
                gate.mark_ended(i);
                ended += 1;
                if let Some(done) = b.handler.on_end_of_input(i) {
                    b.snapshot(&rt, &gate, chain.as_mut(), done)?;
                }
                b.settle();
                if ended == gate.len() {
                    chain.finish()?;
                    flush_and_drain(chain.as_mut()).await?;
                    return Ok(());
                }
            }
        }
        drain_listening(chain.as_mut(), &mut gate, &mut b, &mut rt).await?;
    }
}
