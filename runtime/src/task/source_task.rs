//! A source task: reads its splits in batches (split `j` goes to subtask
//! `j % parallelism`) and, between batches and while blocked on
//! backpressure, answers the job master: a trigger snapshots the split
//! positions and emits the barrier; a stop-with-savepoint makes it wait;
//! every split read, it reports and waits for the final checkpoint.

use super::{apply_control, flush_and_drain, sleep_until_opt, Control, TaskEvent, TaskRuntime};
use crate::barriers::handler::AlignedCheckpoint;
use crate::error::{Result, RuntimeError};
use crate::operator::{Collector, Operator, SourcePart};
use crate::source::{Source, SplitReader};
use serde::Serialize;
use sluice_core::{CheckpointBarrier, CheckpointId, OperatorUid, SplitPosition};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

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
    rt.task_metrics.set_positions(&positions(&readers));
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
        rt.task_metrics.records_in(emitted);
        let at = positions(&readers);
        rt.task_metrics.set_positions(&at);
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
                _ = sleep_until_opt(deadline), if deadline.is_some() => None,
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
