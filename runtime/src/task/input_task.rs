//! An input task: reads its input channels through the gate, processes
//! batches through its chain, and handles barriers — aligned (blocking
//! channels until every barrier is in), unaligned (snapshot at the first
//! barrier, recording the records it overtook), or aligned with a timeout
//! that switches to unaligned. The bookkeeping is in
//! [`crate::barriers::tracker`]; the decisions in
//! [`crate::barriers::handler`].

use super::{apply_control, flush_and_drain, sleep_until_opt, Control, TaskRuntime};
use crate::barriers::handler::{AlignedCheckpoint, BarrierHandler};
use crate::barriers::tracker::Barriers;
use crate::channel::{Delivery, InputGate, Message};
use crate::error::{Result, RuntimeError};
use crate::operator::Operator;
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::time::Instant;

/// Takes the snapshot the handler asked for: an unaligned one starts
/// recording the records its barrier overtakes.
fn snapshot<T: Clone + Serialize + Send + 'static>(
    b: &mut Barriers<T>,
    rt: &TaskRuntime,
    gate: &InputGate<T>,
    chain: &mut dyn Operator<T>,
    done: AlignedCheckpoint,
) -> Result<()> {
    let recording = b.begin(gate, &done);
    rt.snapshot(chain, done, None, recording)
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
        snapshot(b, rt, gate, chain, done)?;
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
                _ = sleep_until_opt(deadline), if deadline.is_some() => Urgent::Timeout,
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
                        snapshot(b, rt, gate, chain, done)?;
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

enum Next<T> {
    Control(Option<Control>),
    Input(Option<Delivery<T>>),
    Timeout,
}

/// A task with input channels: aligns barriers (or records in-flight data
/// for unaligned checkpoints), processes batches.
pub(crate) async fn run_input_task<T: Clone + Serialize + DeserializeOwned + Send + 'static>(
    mut gate: InputGate<T>,
    mut chain: Box<dyn Operator<T>>,
    mut rt: TaskRuntime,
) -> Result<()> {
    chain.initialize(&rt.init).await?;
    let mut b = Barriers::new(gate.len(), rt.alignment_timeout);
    // Records that were in flight at the restored (unaligned) checkpoint
    // come first.
    let replay: Vec<T> = rt.init.restored_input_channel_state().await?;
    if !replay.is_empty() {
        tracing::debug!(task = %rt.init.task_name, records = replay.len(), "replaying channel state");
        rt.task_metrics.records_in(replay.len() as u64);
        chain.process_batch(replay)?;
        drain_listening(chain.as_mut(), &mut gate, &mut b, &mut rt).await?;
    }
    let mut ended = 0usize;
    let task_name = rt.init.task_name.clone();
    loop {
        // Checked at every batch: a task whose input never runs dry awaits
        // nothing, so it learns it is to stop (its control channel closed)
        // here, not only from the runtime's abort at its next await.
        loop {
            match rt.control.try_recv() {
                Ok(c) => {
                    apply_control(c, chain.as_mut(), Some(&mut b.handler))?;
                    b.settle();
                }
                Err(tokio::sync::mpsc::error::TryRecvError::Empty) => break,
                Err(tokio::sync::mpsc::error::TryRecvError::Disconnected) => {
                    return Err(RuntimeError::Cancelled)
                }
            }
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
                        _ = sleep_until_opt(deadline), if deadline.is_some() => Next::Timeout,
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
                        return Err(RuntimeError::Internal(format!(
                            "task {task_name}: no input can deliver (all blocked)"
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
                rt.task_metrics.records_in(batch.len() as u64);
                chain.process_batch(batch)?
            }
            Some(Message::Barrier(barrier)) => {
                if let Some(done) = b.handler.on_barrier(i, barrier) {
                    snapshot(&mut b, &rt, &gate, chain.as_mut(), done)?;
                }
                b.settle();
            }
            Some(Message::Priority(barrier)) => {
                if let Some(done) = b.handler.on_priority_barrier(i, barrier) {
                    snapshot(&mut b, &rt, &gate, chain.as_mut(), done)?;
                }
                b.settle();
            }
            Some(Message::EndOfInput) => {
                gate.mark_ended(i);
                ended += 1;
                if let Some(done) = b.handler.on_end_of_input(i) {
                    snapshot(&mut b, &rt, &gate, chain.as_mut(), done)?;
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
