//! Barrier handling of a task with one or more input channels: the sluice
//! gate itself.
//!
//! The rule, per checkpoint `n` (Flink's `CheckpointBarrierHandler`):
//! - **Aligned** (exactly-once): when barrier `n` arrives on a channel, that
//!   channel is *blocked*: the task does not read it until barrier `n` has
//!   arrived on every channel that has not ended. Then the task snapshots,
//!   forwards the barrier, and unblocks all channels.
//! - **At-least-once**: nothing is blocked; the barriers are counted and the
//!   task snapshots when the last one arrives.
//! - A barrier of a newer checkpoint while `n` is still aligning aborts `n`
//!   (it can no longer complete on this task) and starts the new one. Barriers
//!   of checkpoints already completed or aborted here are ignored.
//! - A channel that ends counts as aligned.

use sluice_core::{Alignment, CheckpointBarrier, CheckpointId};
use std::time::{Duration, Instant};

/// The checkpoint currently aligning.
#[derive(Debug)]
struct Pending {
    barrier: CheckpointBarrier,
    arrived: Vec<bool>,
    started: Instant,
}

/// What the task must do after a barrier or end of input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlignedCheckpoint {
    /// The barrier to snapshot for and forward.
    pub barrier: CheckpointBarrier,
    /// Time from the first to the last barrier of this checkpoint.
    pub alignment: Duration,
}

/// Per-task barrier alignment state.
#[derive(Debug)]
pub struct BarrierHandler {
    ended: Vec<bool>,
    pending: Option<Pending>,
    /// Highest checkpoint id completed or aborted on this task.
    done: CheckpointId,
}

impl BarrierHandler {
    /// A handler for a task with `inputs` channels.
    pub fn new(inputs: usize) -> Self {
        BarrierHandler {
            ended: vec![false; inputs],
            pending: None,
            done: CheckpointId(0),
        }
    }

    /// Whether `channel` must not be read now.
    #[inline]
    pub fn is_blocked(&self, channel: usize) -> bool {
        match &self.pending {
            Some(p) => p.barrier.alignment == Alignment::Aligned && p.arrived[channel],
            None => false,
        }
    }

    /// The checkpoint being aligned, if any.
    pub fn pending_checkpoint(&self) -> Option<CheckpointId> {
        self.pending.as_ref().map(|p| p.barrier.checkpoint_id)
    }

    /// Barrier `barrier` arrived on `channel`. Returns the checkpoint to take
    /// when this completes its alignment.
    pub fn on_barrier(&mut self, channel: usize, barrier: CheckpointBarrier) -> Option<AlignedCheckpoint> {
        let id = barrier.checkpoint_id;
        if id <= self.done {
            return None; // late barrier of a checkpoint completed or aborted here
        }
        match &self.pending {
            Some(p) if p.barrier.checkpoint_id == id => {}
            Some(p) if p.barrier.checkpoint_id > id => return None, // older than the one aligning
            _ => {
                // Nothing aligning, or an older checkpoint that can no longer
                // complete here: start aligning `id`.
                if let Some(old) = self.pending.take() {
                    tracing::debug!(
                        aborted = old.barrier.checkpoint_id.0,
                        newer = id.0,
                        "barrier of a newer checkpoint aborts the alignment of an older one"
                    );
                }
                self.pending = Some(Pending {
                    barrier,
                    arrived: vec![false; self.ended.len()],
                    started: Instant::now(),
                });
            }
        }
        if let Some(p) = &mut self.pending {
            p.arrived[channel] = true;
        }
        self.complete_if_aligned()
    }

    /// `channel` reached end of input.
    pub fn on_end_of_input(&mut self, channel: usize) -> Option<AlignedCheckpoint> {
        self.ended[channel] = true;
        self.complete_if_aligned()
    }

    /// The coordinator aborted checkpoint `id`: stop aligning it (and older).
    pub fn abort(&mut self, id: CheckpointId) {
        if self
            .pending
            .as_ref()
            .is_some_and(|p| p.barrier.checkpoint_id <= id)
        {
            self.pending = None;
        }
        self.done = self.done.max(id);
    }

    fn complete_if_aligned(&mut self) -> Option<AlignedCheckpoint> {
        let p = self.pending.as_ref()?;
        let all = p.arrived.iter().zip(&self.ended).all(|(a, e)| *a || *e);
        if !all {
            return None;
        }
        let p = self.pending.take()?;
        self.done = p.barrier.checkpoint_id;
        Some(AlignedCheckpoint {
            barrier: p.barrier,
            alignment: p.started.elapsed(),
        })
    }
}

#[cfg(test)]
mod tests {
    //! Every interleaving of records and barriers on two and three inputs,
    //! delivered as a real input gate would (a blocked channel is not read).
    use super::*;
    use sluice_core::CheckpointKind;

    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    enum Item {
        /// A record; `after` = it follows barrier 1 on its channel.
        Rec {
            ch: usize,
            seq: usize,
            after: bool,
        },
        Barrier(u64),
        End,
    }

    fn barrier(id: u64, alignment: Alignment) -> CheckpointBarrier {
        CheckpointBarrier {
            checkpoint_id: CheckpointId(id),
            timestamp_ms: 0,
            kind: CheckpointKind::Checkpoint,
            alignment,
        }
    }

    /// One channel's script: `pre` records, barrier 1, `post` records, optionally end.
    fn script(ch: usize, pre: usize, post: usize, end: bool) -> Vec<Item> {
        let mut v: Vec<Item> = (0..pre)
            .map(|seq| Item::Rec {
                ch,
                seq,
                after: false,
            })
            .collect();
        v.push(Item::Barrier(1));
        v.extend((0..post).map(|seq| Item::Rec {
            ch,
            seq: pre + seq,
            after: true,
        }));
        if end {
            v.push(Item::End);
        }
        v
    }

    /// What the task saw: the records processed before the snapshot, and
    /// after it, in order.
    #[derive(Debug, Default)]
    struct Run {
        before: Vec<Item>,
        after: Vec<Item>,
        snapshots: Vec<CheckpointId>,
    }

    /// Explores every delivery order the gate could produce.
    fn explore(
        handler: &BarrierHandler,
        queues: &[Vec<Item>],
        pos: &mut Vec<usize>,
        run: &mut Run,
        visit: &mut dyn FnMut(&Run),
    ) {
        let mut progressed = false;
        for ch in 0..queues.len() {
            if pos[ch] >= queues[ch].len() || handler.is_blocked(ch) {
                continue;
            }
            progressed = true;
            let item = queues[ch][pos[ch]];
            let mut h = BarrierHandler {
                ended: handler.ended.clone(),
                pending: handler.pending.as_ref().map(|p| Pending {
                    barrier: p.barrier,
                    arrived: p.arrived.clone(),
                    started: p.started,
                }),
                done: handler.done,
            };
            pos[ch] += 1;
            let (nb, na, ns) = (run.before.len(), run.after.len(), run.snapshots.len());
            let done = match item {
                Item::Rec { .. } => None,
                Item::Barrier(id) => h.on_barrier(ch, barrier(id, queues_alignment(queues))),
                Item::End => h.on_end_of_input(ch),
            };
            if let Item::Rec { .. } = item {
                if run.snapshots.is_empty() {
                    run.before.push(item);
                } else {
                    run.after.push(item);
                }
            }
            if let Some(c) = done {
                run.snapshots.push(c.barrier.checkpoint_id);
            }
            explore(&h, queues, pos, run, visit);
            run.before.truncate(nb);
            run.after.truncate(na);
            run.snapshots.truncate(ns);
            pos[ch] -= 1;
        }
        if !progressed {
            visit(run);
        }
    }

    thread_local! {
        static MODE: std::cell::Cell<Alignment> = const { std::cell::Cell::new(Alignment::Aligned) };
    }
    fn queues_alignment(_: &[Vec<Item>]) -> Alignment {
        MODE.with(|m| m.get())
    }

    fn all_runs(mode: Alignment, queues: &[Vec<Item>], visit: &mut dyn FnMut(&Run)) -> usize {
        MODE.with(|m| m.set(mode));
        let mut count = 0;
        let mut pos = vec![0; queues.len()];
        explore(
            &BarrierHandler::new(queues.len()),
            queues,
            &mut pos,
            &mut Run::default(),
            &mut |r| {
                count += 1;
                visit(r)
            },
        );
        count
    }

    fn shapes(inputs: usize, max: usize) -> Vec<Vec<Vec<Item>>> {
        // Every combination of 0..=max records before and after the barrier
        // per channel, with and without end of input.
        let mut out = vec![vec![]];
        for ch in 0..inputs {
            let mut next = vec![];
            for q in &out {
                for pre in 0..=max {
                    for post in 0..=max {
                        for end in [false, true] {
                            let mut q2: Vec<Vec<Item>> = q.clone();
                            q2.push(script(ch, pre, post, end));
                            next.push(q2);
                        }
                    }
                }
            }
            out = next;
        }
        out
    }

    #[test]
    fn aligned_snapshot_holds_exactly_the_records_before_the_barrier_in_every_ordering_on_two_inputs() {
        let mut runs = 0;
        for queues in shapes(2, 2) {
            runs += all_runs(Alignment::Aligned, &queues, &mut |r| {
                assert_eq!(r.snapshots, vec![CheckpointId(1)], "{queues:?} {r:?}");
                assert!(
                    r.before
                        .iter()
                        .all(|i| matches!(i, Item::Rec { after: false, .. })),
                    "{r:?}"
                );
                assert!(
                    r.after.iter().all(|i| matches!(i, Item::Rec { after: true, .. })),
                    "{r:?}"
                );
                let total: usize = queues
                    .iter()
                    .flatten()
                    .filter(|i| matches!(i, Item::Rec { .. }))
                    .count();
                assert_eq!(
                    r.before.len() + r.after.len(),
                    total,
                    "every record processed once"
                );
            });
        }
        assert!(runs > 1000, "explored {runs} orderings");
    }

    #[test]
    fn aligned_snapshot_holds_exactly_the_records_before_the_barrier_in_every_ordering_on_three_inputs() {
        let mut runs = 0;
        for queues in shapes(3, 1) {
            runs += all_runs(Alignment::Aligned, &queues, &mut |r| {
                assert_eq!(r.snapshots, vec![CheckpointId(1)]);
                assert!(
                    r.before
                        .iter()
                        .all(|i| matches!(i, Item::Rec { after: false, .. })),
                    "{r:?}"
                );
                assert!(
                    r.after.iter().all(|i| matches!(i, Item::Rec { after: true, .. })),
                    "{r:?}"
                );
            });
        }
        assert!(runs > 10_000, "explored {runs} orderings");
    }

    #[test]
    fn records_after_the_barrier_on_an_aligned_input_are_processed_after_the_snapshot() {
        // Channel 0 delivers its barrier at once, then a record; channel 1 is
        // slow. The record of channel 0 must wait for the snapshot.
        let queues = vec![script(0, 0, 1, false), script(1, 3, 0, false)];
        all_runs(Alignment::Aligned, &queues, &mut |r| {
            assert_eq!(
                r.after,
                vec![Item::Rec {
                    ch: 0,
                    seq: 0,
                    after: true
                }]
            );
            assert_eq!(r.before.len(), 3);
        });
    }

    #[test]
    fn at_least_once_never_blocks_and_its_snapshot_holds_every_record_before_the_barrier() {
        let mut saw_post_barrier_record_in_snapshot = false;
        for queues in shapes(2, 2) {
            all_runs(Alignment::AtLeastOnce, &queues, &mut |r| {
                assert_eq!(r.snapshots, vec![CheckpointId(1)]);
                let pre_total: usize = queues
                    .iter()
                    .flatten()
                    .filter(|i| matches!(i, Item::Rec { after: false, .. }))
                    .count();
                let pre_in = r
                    .before
                    .iter()
                    .filter(|i| matches!(i, Item::Rec { after: false, .. }))
                    .count();
                assert_eq!(
                    pre_in, pre_total,
                    "no record before the barrier is missing: {r:?}"
                );
                saw_post_barrier_record_in_snapshot |= r
                    .before
                    .iter()
                    .any(|i| matches!(i, Item::Rec { after: true, .. }));
            });
        }
        assert!(
            saw_post_barrier_record_in_snapshot,
            "at-least-once lets later records into the snapshot"
        );
    }

    #[test]
    fn a_newer_barrier_aborts_an_older_alignment_and_late_barriers_are_ignored() {
        let mut h = BarrierHandler::new(2);
        assert_eq!(h.on_barrier(0, barrier(1, Alignment::Aligned)), None);
        assert!(h.is_blocked(0) && !h.is_blocked(1));
        // Channel 1 never got barrier 1 (its upstream aborted it) and sends 2.
        assert_eq!(h.on_barrier(1, barrier(2, Alignment::Aligned)), None);
        assert_eq!(h.pending_checkpoint(), Some(CheckpointId(2)));
        assert!(!h.is_blocked(0) && h.is_blocked(1));
        let done = h.on_barrier(0, barrier(2, Alignment::Aligned)).expect("aligned");
        assert_eq!(done.barrier.checkpoint_id, CheckpointId(2));
        assert_eq!(h.on_barrier(1, barrier(1, Alignment::Aligned)), None);
        assert!(!h.is_blocked(0) && !h.is_blocked(1));
    }

    #[test]
    fn coordinator_abort_unblocks_the_channels() {
        let mut h = BarrierHandler::new(3);
        h.on_barrier(2, barrier(4, Alignment::Aligned));
        assert!(h.is_blocked(2));
        h.abort(CheckpointId(4));
        assert!(!h.is_blocked(2));
        assert_eq!(h.on_barrier(0, barrier(4, Alignment::Aligned)), None);
        assert!(!h.is_blocked(0));
    }

    #[test]
    fn single_input_snapshots_at_once() {
        let mut h = BarrierHandler::new(1);
        let c = h.on_barrier(0, barrier(1, Alignment::Aligned)).expect("snapshot");
        assert_eq!(c.barrier.checkpoint_id, CheckpointId(1));
        assert!(!h.is_blocked(0));
    }
}
