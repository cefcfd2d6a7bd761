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
//! - **Unaligned** (exactly-once): the first barrier `n` to arrive — on a
//!   channel's priority lane, ahead of the records queued on it, or in its
//!   place — makes the task snapshot at once and forward the barrier (ahead
//!   of its queued output). Nothing is blocked; the records that arrive on
//!   each other channel until barrier `n` reaches its place there are
//!   *recorded* (channel state). When every channel has delivered barrier
//!   `n` in place, the recording is complete.
//! - **Aligned with a timeout**: a checkpoint starts aligned; if alignment
//!   takes longer than the timeout, the task switches to unaligned for it
//!   (blocked channels are released; the others are recorded).
//! - A barrier of a newer checkpoint while `n` is still aligning (or
//!   recording) aborts `n` here (it can no longer complete on this task)
//!   and starts the new one. Barriers of checkpoints already completed or
//!   aborted here are ignored.
//! - A channel that ends counts as aligned.

use sluice_core::{Alignment, CheckpointBarrier, CheckpointId};
use std::time::{Duration, Instant};

/// The checkpoint currently aligning (or recording).
#[derive(Debug, Clone)]
struct Pending {
    barrier: CheckpointBarrier,
    /// Barrier `n` arrived in its place on channel `i`.
    arrived: Vec<bool>,
    started: Instant,
    /// When an aligned checkpoint with a timeout switches to unaligned:
    /// its trigger time plus the timeout.
    deadline: Option<Instant>,
    /// The snapshot was taken unaligned; channels not yet arrived are
    /// recorded.
    unaligned: bool,
}

/// What the task must do after a barrier or end of input: snapshot and
/// forward `barrier`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AlignedCheckpoint {
    /// The barrier to snapshot for and forward.
    pub barrier: CheckpointBarrier,
    /// Time from the first barrier of this checkpoint to the snapshot.
    pub alignment: Duration,
}

impl AlignedCheckpoint {
    /// Whether the snapshot is unaligned: the task must record the records
    /// of the channels [`BarrierHandler::is_recording`] names until
    /// [`BarrierHandler::take_finished`] returns this checkpoint.
    pub fn unaligned(&self) -> bool {
        self.barrier.alignment == Alignment::Unaligned
    }
}

/// Per-task barrier alignment state.
#[derive(Debug, Clone)]
pub struct BarrierHandler {
    ended: Vec<bool>,
    pending: Option<Pending>,
    /// Highest checkpoint id completed or aborted on this task.
    done: CheckpointId,
    /// Switch an aligned checkpoint to unaligned after this long.
    alignment_timeout: Option<Duration>,
    /// An unaligned checkpoint whose recording just completed.
    finished: Option<CheckpointId>,
}

impl BarrierHandler {
    /// A handler for a task with `inputs` channels.
    #[cfg(test)]
    pub fn new(inputs: usize) -> Self {
        Self::with_alignment_timeout(inputs, None)
    }

    /// A handler that switches checkpoints whose barriers say
    /// [`Alignment::AlignedWithTimeout`] to unaligned after `timeout` of
    /// alignment.
    pub fn with_alignment_timeout(inputs: usize, timeout: Option<Duration>) -> Self {
        BarrierHandler {
            ended: vec![false; inputs],
            pending: None,
            done: CheckpointId(0),
            alignment_timeout: timeout,
            finished: None,
        }
    }

    /// Whether `channel` must not be read now.
    #[inline]
    pub fn is_blocked(&self, channel: usize) -> bool {
        match &self.pending {
            Some(p) => {
                !p.unaligned
                    && matches!(
                        p.barrier.alignment,
                        Alignment::Aligned | Alignment::AlignedWithTimeout
                    )
                    && p.arrived[channel]
            }
            None => false,
        }
    }

    /// Whether the records read from `channel` now belong to the channel
    /// state of an unaligned checkpoint.
    #[inline]
    pub fn is_recording(&self, channel: usize) -> bool {
        match &self.pending {
            Some(p) => p.unaligned && !p.arrived[channel] && !self.ended[channel],
            None => false,
        }
    }

    /// The checkpoint being aligned or recorded, if any.
    pub fn pending_checkpoint(&self) -> Option<CheckpointId> {
        self.pending.as_ref().map(|p| p.barrier.checkpoint_id)
    }

    /// When the aligning checkpoint switches to unaligned, if it can: its
    /// trigger time plus the alignment timeout (measured from the start of
    /// the checkpoint, as Flink does).
    pub fn deadline(&self) -> Option<Instant> {
        let p = self.pending.as_ref()?;
        if self.can_switch(p) {
            p.deadline
        } else {
            None
        }
    }

    fn can_switch(&self, p: &Pending) -> bool {
        !p.unaligned && p.barrier.alignment == Alignment::AlignedWithTimeout
    }

    /// The unaligned checkpoint whose channel state became complete with the
    /// last event, if any (returned once).
    pub fn take_finished(&mut self) -> Option<CheckpointId> {
        self.finished.take()
    }

    /// Starts aligning (or recording) `barrier`, aborting an older one.
    /// Returns false if the barrier is stale.
    fn begin(&mut self, barrier: CheckpointBarrier) -> bool {
        let id = barrier.checkpoint_id;
        if id <= self.done {
            return false; // late barrier of a checkpoint completed or aborted here
        }
        match &self.pending {
            Some(p) if p.barrier.checkpoint_id == id => true,
            Some(p) if p.barrier.checkpoint_id > id => false, // older than the one aligning
            _ => {
                if let Some(old) = self.pending.take() {
                    tracing::debug!(
                        aborted = old.barrier.checkpoint_id.0,
                        newer = id.0,
                        "barrier of a newer checkpoint aborts the alignment of an older one"
                    );
                }
                let now = Instant::now();
                let deadline = self.alignment_timeout.map(|t| {
                    let now_ms = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_millis() as u64)
                        .unwrap_or(0);
                    let due_ms = barrier.timestamp_ms.saturating_add(t.as_millis() as u64);
                    now + Duration::from_millis(due_ms.saturating_sub(now_ms))
                });
                self.pending = Some(Pending {
                    barrier,
                    arrived: vec![false; self.ended.len()],
                    started: now,
                    deadline,
                    unaligned: false,
                });
                true
            }
        }
    }

    /// Turns the pending checkpoint unaligned: the snapshot to take now.
    fn go_unaligned(&mut self) -> Option<AlignedCheckpoint> {
        let p = self.pending.as_mut()?;
        if p.unaligned {
            return None;
        }
        p.unaligned = true;
        p.barrier.alignment = Alignment::Unaligned;
        Some(AlignedCheckpoint {
            barrier: p.barrier,
            alignment: p.started.elapsed(),
        })
    }

    /// Barrier `barrier` arrived in its place on `channel`. Returns the
    /// checkpoint to take when this completes its alignment (or starts an
    /// unaligned one).
    pub fn on_barrier(&mut self, channel: usize, barrier: CheckpointBarrier) -> Option<AlignedCheckpoint> {
        if !self.begin(barrier) {
            return None;
        }
        let mut snapshot = None;
        if barrier.alignment == Alignment::Unaligned {
            snapshot = self.go_unaligned();
        }
        if let Some(p) = &mut self.pending {
            p.arrived[channel] = true;
        }
        let complete = self.complete_if_aligned();
        snapshot.or(complete)
    }

    /// Barrier `barrier` of an unaligned checkpoint overtook the records on
    /// `channel`. Returns the snapshot to take if this is its first barrier
    /// here.
    pub fn on_priority_barrier(
        &mut self,
        _channel: usize,
        barrier: CheckpointBarrier,
    ) -> Option<AlignedCheckpoint> {
        if !self.begin(barrier) {
            return None;
        }
        self.go_unaligned()
    }

    /// Checks the alignment timeout: the snapshot to take if the aligning
    /// checkpoint switches to unaligned now.
    pub fn check_timeout(&mut self, now: Instant) -> Option<AlignedCheckpoint> {
        if self.deadline().is_some_and(|d| d <= now) {
            tracing::debug!(
                checkpoint = self.pending_checkpoint().map(|c| c.0),
                "alignment timed out; switching to an unaligned checkpoint"
            );
            return self.go_unaligned();
        }
        None
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
        if p.unaligned {
            // The snapshot was taken when the checkpoint went unaligned.
            self.finished = Some(p.barrier.checkpoint_id);
            return None;
        }
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
        /// Barrier `n` of an unaligned checkpoint on channel `ch`'s priority lane.
        Priority {
            ch: usize,
            id: u64,
        },
        End,
    }

    fn barrier(id: u64, alignment: Alignment) -> CheckpointBarrier {
        CheckpointBarrier {
            checkpoint_id: CheckpointId(id),
            timestamp_ms: 0,
            kind: CheckpointKind::Checkpoint,
            alignment,
            base: None,
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
        /// Records stored as channel state (unaligned).
        recorded: Vec<Item>,
        /// Unaligned checkpoints whose channel state completed.
        finished: Vec<CheckpointId>,
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
            let real = ch < handler.ended.len();
            if pos[ch] >= queues[ch].len() || (real && handler.is_blocked(ch)) {
                continue;
            }
            progressed = true;
            let item = queues[ch][pos[ch]];
            let mut h = handler.clone();
            pos[ch] += 1;
            let (nb, na, ns) = (run.before.len(), run.after.len(), run.snapshots.len());
            let (nr, nf) = (run.recorded.len(), run.finished.len());
            let done = match item {
                Item::Rec { ch, .. } => {
                    if h.is_recording(ch) {
                        run.recorded.push(item);
                    }
                    None
                }
                Item::Barrier(id) => h.on_barrier(ch, barrier(id, queues_alignment(queues))),
                Item::Priority { ch, id } => h.on_priority_barrier(ch, barrier(id, Alignment::Unaligned)),
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
            run.finished.extend(h.take_finished());
            explore(&h, queues, pos, run, visit);
            run.before.truncate(nb);
            run.after.truncate(na);
            run.snapshots.truncate(ns);
            run.recorded.truncate(nr);
            run.finished.truncate(nf);
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
        let real = queues
            .iter()
            .filter(|q| !matches!(q.first(), Some(Item::Priority { .. })))
            .count();
        explore(
            &BarrierHandler::new(real),
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

    /// Adds, per channel, a lane holding its priority barrier 1, which can
    /// be delivered at any moment (it overtakes the queued records).
    fn with_priority_lanes(queues: &[Vec<Item>]) -> Vec<Vec<Item>> {
        let mut q = queues.to_vec();
        for ch in 0..queues.len() {
            q.push(vec![Item::Priority { ch, id: 1 }]);
        }
        q
    }

    fn check_unaligned_run(queues: &[Vec<Item>], r: &Run) {
        assert_eq!(r.snapshots, vec![CheckpointId(1)], "{queues:?} {r:?}");
        assert_eq!(
            r.finished,
            vec![CheckpointId(1)],
            "recording completes once: {r:?}"
        );
        // State + channel state = exactly the records before the barrier.
        let mut cut: Vec<Item> = r.before.iter().chain(&r.recorded).copied().collect();
        cut.sort_by_key(|i| match i {
            Item::Rec { ch, seq, .. } => (*ch, *seq),
            _ => (usize::MAX, 0),
        });
        let mut want: Vec<Item> = queues
            .iter()
            .flatten()
            .filter(|i| matches!(i, Item::Rec { after: false, .. }))
            .copied()
            .collect();
        want.sort_by_key(|i| match i {
            Item::Rec { ch, seq, .. } => (*ch, *seq),
            _ => (usize::MAX, 0),
        });
        assert_eq!(cut, want, "snapshot + channel state is the cut: {queues:?} {r:?}");
        assert!(
            r.recorded.iter().all(|i| r.after.contains(i)),
            "recorded records are processed after the snapshot too"
        );
    }

    #[test]
    fn unaligned_snapshot_plus_channel_state_is_exactly_the_cut_in_every_ordering_on_two_inputs() {
        let mut runs = 0;
        let mut recorded_any = false;
        for queues in shapes(2, 2) {
            let q = with_priority_lanes(&queues);
            runs += all_runs(Alignment::Unaligned, &q, &mut |r| {
                check_unaligned_run(&queues, r);
                recorded_any |= !r.recorded.is_empty();
            });
        }
        assert!(recorded_any, "some orderings record channel state");
        assert!(runs > 10_000, "explored {runs} orderings");
    }

    #[test]
    fn unaligned_snapshot_plus_channel_state_is_exactly_the_cut_in_every_ordering_on_three_inputs() {
        // Three inputs and three priority lanes: every shape with up to six
        // items on the inputs (the full set would be hundreds of millions
        // of orderings).
        let mut runs = 0;
        for queues in shapes(3, 1)
            .into_iter()
            .filter(|q| q.iter().map(Vec::len).sum::<usize>() <= 6)
        {
            let q = with_priority_lanes(&queues);
            runs += all_runs(Alignment::Unaligned, &q, &mut |r| check_unaligned_run(&queues, r));
        }
        assert!(runs > 100_000, "explored {runs} orderings");
    }

    #[test]
    fn an_alignment_that_times_out_switches_to_unaligned_releasing_blocked_inputs() {
        let mut h = BarrierHandler::with_alignment_timeout(3, Some(Duration::from_millis(50)));
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis() as u64;
        let b = CheckpointBarrier {
            timestamp_ms: now_ms,
            ..barrier(1, Alignment::AlignedWithTimeout)
        };
        assert_eq!(h.on_barrier(0, b), None);
        assert!(h.is_blocked(0) && !h.is_recording(1));
        let deadline = h.deadline().expect("a deadline while aligning");
        assert_eq!(h.check_timeout(deadline - Duration::from_millis(1)), None);
        let snap = h.check_timeout(deadline).expect("switches at the deadline");
        assert!(snap.unaligned(), "the forwarded barrier is unaligned");
        assert!(!h.is_blocked(0), "the blocked input is released");
        assert!(
            !h.is_recording(0),
            "its barrier is in: nothing in flight to record"
        );
        assert!(h.is_recording(1) && h.is_recording(2));
        assert_eq!(h.on_barrier(1, b), None);
        assert!(!h.is_recording(1));
        assert_eq!(h.take_finished(), None);
        assert_eq!(h.on_end_of_input(2), None);
        assert_eq!(h.take_finished(), Some(CheckpointId(1)));
        assert_eq!(h.deadline(), None);
        // Savepoints and final checkpoints (plain aligned) never switch.
        let mut h = BarrierHandler::with_alignment_timeout(2, Some(Duration::ZERO));
        let sp = CheckpointBarrier {
            kind: CheckpointKind::Savepoint,
            ..barrier(2, Alignment::Aligned)
        };
        assert_eq!(h.on_barrier(0, sp), None);
        assert_eq!(h.deadline(), None);
        assert_eq!(h.check_timeout(Instant::now() + Duration::from_secs(9)), None);
        assert!(h.is_blocked(0));
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
