//! The input task's barrier bookkeeping around the [`BarrierHandler`]: the
//! recorder of an unaligned checkpoint's input channel state (the records
//! its barrier overtook, until each channel delivers the barrier in place)
//! and the spilling of recording channels, whose content is taken out at
//! once so that upstream barriers reach their place.

use super::handler::{AlignedCheckpoint, BarrierHandler};
use crate::channel::{InputGate, Message};
use crate::error::{Result, RuntimeError};
use serde::Serialize;
use sluice_core::CheckpointId;
use tokio::sync::oneshot;

/// The records an unaligned checkpoint records while its barriers are on
/// their way, and where they go when complete.
struct Recorder<T> {
    id: CheckpointId,
    records: Vec<T>,
    done: oneshot::Sender<Vec<T>>,
}

/// The barrier state of an input task: the handler and the recorder of the
/// unaligned checkpoint in progress.
pub(crate) struct Barriers<T> {
    /// The alignment decisions.
    pub handler: BarrierHandler,
    recorder: Option<Recorder<T>>,
}

impl<T: Clone + Serialize + Send + 'static> Barriers<T> {
    /// A new barrier state over `inputs` channels.
    pub fn new(inputs: usize, alignment_timeout: Option<std::time::Duration>) -> Self {
        Barriers {
            handler: BarrierHandler::with_alignment_timeout(inputs, alignment_timeout),
            recorder: None,
        }
    }

    /// The handler asked for snapshot `done`: if it is unaligned, starts
    /// recording the records its barrier overtakes (those already taken out
    /// of recording channels included) and returns where they arrive when
    /// every channel delivered the barrier in place.
    pub fn begin(
        &mut self,
        gate: &InputGate<T>,
        done: &AlignedCheckpoint,
    ) -> Option<oneshot::Receiver<Vec<T>>> {
        if !done.unaligned() {
            return None;
        }
        let (tx, rx) = oneshot::channel();
        // Records taken out of a channel earlier and not processed yet are
        // before the barrier there: channel state too.
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
    }

    /// After every barrier event: hands over complete channel state, drops
    /// the recorder of a checkpoint no longer in progress here.
    pub fn settle(&mut self) {
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

    pub fn record(&mut self, batch: &[T]) {
        if let Some(r) = self.recorder.as_mut() {
            r.records.extend_from_slice(batch);
        }
    }

    /// A message taken out of recording channel `i` ahead of processing:
    /// records are recorded and kept for processing; the barrier in place
    /// ends the recording of `i` (and is consumed here).
    pub fn spill(&mut self, gate: &mut InputGate<T>, i: usize, msg: Message<T>) -> bool {
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
    pub fn spill_available(&mut self, gate: &mut InputGate<T>, task: &str) -> Result<()> {
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
