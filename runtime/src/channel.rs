//! Channels between tasks: batches of records and in-band control events,
//! output writers with partitioners, and the input gate of a task.

use crate::error::{Result, RuntimeError};
use sluice_core::{key_group_for_key, operator_index_for_key_group, CheckpointBarrier};
use std::future::poll_fn;
use std::sync::Arc;
use std::task::Poll;
use tokio::sync::mpsc;

/// Records per batch sent between tasks.
pub const BATCH_SIZE: usize = 1024;

/// Batches buffered per channel before the sender waits (backpressure).
pub const CHANNEL_CAPACITY: usize = 8;

/// What flows on a channel.
#[derive(Debug)]
pub enum Message<T> {
    /// A batch of records.
    Batch(Vec<T>),
    /// A checkpoint barrier, in its place among the records.
    Barrier(CheckpointBarrier),
    /// The upstream subtask has finished; nothing follows.
    EndOfInput,
    /// A barrier of an unaligned checkpoint that overtook the records queued
    /// on its channel: the input gate delivers it ahead of them. The same
    /// barrier follows in its place as [`Message::Barrier`].
    Priority(CheckpointBarrier),
}

/// The sending end of one channel: bounded data (records, barriers in
/// place, end of input) and an unbounded priority lane on which barriers of
/// unaligned checkpoints overtake the data.
pub struct ChannelSender<T> {
    pub(crate) data: mpsc::Sender<Message<T>>,
    pub(crate) priority: mpsc::UnboundedSender<CheckpointBarrier>,
}

/// The receiving end of one channel.
pub struct ChannelReceiver<T> {
    pub(crate) data: mpsc::Receiver<Message<T>>,
    pub(crate) priority: mpsc::UnboundedReceiver<CheckpointBarrier>,
}

/// A channel from one upstream subtask to one downstream subtask.
pub fn channel<T>(capacity: usize) -> (ChannelSender<T>, ChannelReceiver<T>) {
    let (dt, dr) = mpsc::channel(capacity);
    let (pt, pr) = mpsc::unbounded_channel();
    (
        ChannelSender {
            data: dt,
            priority: pt,
        },
        ChannelReceiver {
            data: dr,
            priority: pr,
        },
    )
}

/// Writes a record's key bytes into a buffer.
pub type KeyWriter<T> = Arc<dyn Fn(&T, &mut Vec<u8>) + Send + Sync>;

/// How records are distributed to the subtasks of the next task.
pub enum Partitioner<T> {
    /// Subtask `i` sends to subtask `i` (same parallelism).
    Forward,
    /// Round robin over all downstream subtasks, batch by batch.
    Rebalance,
    /// Every record to every downstream subtask.
    Broadcast,
    /// By key group of the record's key bytes (written into the buffer).
    Hash(KeyWriter<T>),
}

impl<T> Clone for Partitioner<T> {
    fn clone(&self) -> Self {
        match self {
            Partitioner::Forward => Partitioner::Forward,
            Partitioner::Rebalance => Partitioner::Rebalance,
            Partitioner::Broadcast => Partitioner::Broadcast,
            Partitioner::Hash(f) => Partitioner::Hash(f.clone()),
        }
    }
}

/// The sending side of a task's output edge: one channel per downstream
/// subtask, a batch buffer per channel, and a queue of full batches waiting
/// for channel capacity.
pub struct OutputWriter<T> {
    senders: Vec<ChannelSender<T>>,
    buffers: Vec<Vec<T>>,
    pending: std::collections::VecDeque<(usize, Message<T>)>,
    partitioner: Partitioner<T>,
    subtask: usize,
    max_parallelism: u32,
    next: usize,
    key_buf: Vec<u8>,
    /// The downstream subtask of each key group (hash partitioning).
    owners: Vec<u32>,
    task: Arc<str>,
    /// The alignment timeout of checkpoints that start aligned.
    alignment_timeout: Option<std::time::Duration>,
    /// Barriers sent in place that turn into priority barriers at a
    /// deadline (their checkpoint's trigger time plus the alignment timeout).
    deadlines: Vec<(std::time::Instant, CheckpointBarrier)>,
    /// Counts the records sent and the time spent backpressured.
    metrics: Option<Arc<crate::metrics::TaskMetrics>>,
}

impl<T: Clone + Send + 'static> OutputWriter<T> {
    /// An output over `senders` (indexed by downstream subtask).
    pub fn new(
        senders: Vec<ChannelSender<T>>,
        partitioner: Partitioner<T>,
        subtask: usize,
        max_parallelism: u32,
        task: Arc<str>,
    ) -> Self {
        let n = senders.len();
        let owners = match &partitioner {
            Partitioner::Hash(_) => (0..max_parallelism)
                .map(|g| operator_index_for_key_group(max_parallelism, n as u32, g))
                .collect(),
            _ => Vec::new(),
        };
        OutputWriter {
            senders,
            buffers: (0..n).map(|_| Vec::with_capacity(BATCH_SIZE)).collect(),
            pending: Default::default(),
            partitioner,
            subtask,
            max_parallelism,
            next: subtask,
            key_buf: Vec::with_capacity(16),
            owners,
            task,
            alignment_timeout: None,
            deadlines: Vec::new(),
            metrics: None,
        }
    }

    /// Counts into `metrics`: records out per batch, and the time
    /// [`OutputWriter::drain`] waits for capacity.
    pub(crate) fn with_metrics(mut self, metrics: Option<Arc<crate::metrics::TaskMetrics>>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Barriers of checkpoints that start aligned and may switch
    /// ([`sluice_core::Alignment::AlignedWithTimeout`]) are also sent on the
    /// priority lanes once `timeout` after their trigger has passed, so that
    /// a barrier stuck behind queued records still reaches the receivers.
    pub fn with_alignment_timeout(mut self, timeout: Option<std::time::Duration>) -> Self {
        self.alignment_timeout = timeout;
        self
    }

    /// Sends `barrier` in its place (behind every record emitted so far).
    pub fn barrier(&mut self, barrier: CheckpointBarrier) {
        self.broadcast_event(|| Message::Barrier(barrier));
        if let (sluice_core::Alignment::AlignedWithTimeout, Some(t)) =
            (barrier.alignment, self.alignment_timeout)
        {
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0);
            let due_ms = barrier.timestamp_ms.saturating_add(t.as_millis() as u64);
            let deadline =
                std::time::Instant::now() + std::time::Duration::from_millis(due_ms.saturating_sub(now_ms));
            self.deadlines.push((deadline, barrier));
        }
    }

    /// When the next barrier turns into a priority barrier.
    pub fn next_deadline(&self) -> Option<std::time::Instant> {
        self.deadlines.iter().map(|(d, _)| *d).min()
    }

    /// Sends the barriers whose deadline passed on the priority lanes.
    pub fn fire_deadlines(&mut self, now: std::time::Instant) {
        let (due, keep): (Vec<_>, Vec<_>) = self.deadlines.drain(..).partition(|(d, _)| *d <= now);
        self.deadlines = keep;
        for (_, b) in due {
            for s in &self.senders {
                let _ = s.priority.send(b);
            }
        }
    }

    /// Routes one record into its batch buffer(s).
    #[inline]
    pub fn push(&mut self, rec: T) {
        let n = self.senders.len();
        let target = match &self.partitioner {
            Partitioner::Forward => self.subtask % n,
            Partitioner::Rebalance => self.next % n,
            Partitioner::Hash(key) => {
                self.key_buf.clear();
                key(&rec, &mut self.key_buf);
                let g = key_group_for_key(&self.key_buf, self.max_parallelism);
                // The owner of each key group, computed once (no division
                // per record).
                match self.owners.get(g as usize) {
                    Some(&i) => i as usize,
                    None => operator_index_for_key_group(self.max_parallelism, n as u32, g) as usize,
                }
            }
            Partitioner::Broadcast => {
                for i in 0..n {
                    self.buffers[i].push(rec.clone());
                    if self.buffers[i].len() >= BATCH_SIZE {
                        self.seal(i);
                    }
                }
                return;
            }
        };
        let buf = &mut self.buffers[target];
        buf.push(rec);
        if buf.len() >= BATCH_SIZE {
            self.seal(target);
            if matches!(self.partitioner, Partitioner::Rebalance) {
                self.next = self.next.wrapping_add(1);
            }
        }
    }

    fn seal(&mut self, i: usize) {
        let batch = std::mem::replace(&mut self.buffers[i], Vec::with_capacity(BATCH_SIZE));
        // A broadcast record is in every channel's batch (they fill and seal
        // together): counted once, with the first channel's.
        if let Some(m) = self
            .metrics
            .as_ref()
            .filter(|_| i == 0 || !matches!(self.partitioner, Partitioner::Broadcast))
        {
            m.records_out(batch.len() as u64);
        }
        self.enqueue(i, Message::Batch(batch));
    }

    fn enqueue(&mut self, i: usize, msg: Message<T>) {
        if self.pending.is_empty() {
            match self.senders[i].data.try_send(msg) {
                Ok(()) => {}
                Err(mpsc::error::TrySendError::Full(m)) | Err(mpsc::error::TrySendError::Closed(m)) => {
                    // A closed channel is reported by `drain`.
                    self.pending.push_back((i, m));
                }
            }
        } else {
            self.pending.push_back((i, msg));
        }
    }

    /// Moves every partial batch into the send queue.
    pub fn flush_partial(&mut self) {
        for i in 0..self.buffers.len() {
            if !self.buffers[i].is_empty() {
                self.seal(i);
            }
        }
    }

    /// Flushes partial batches, then queues a control message to every channel.
    pub fn broadcast_event(&mut self, make: impl Fn() -> Message<T>) {
        self.flush_partial();
        for i in 0..self.senders.len() {
            self.enqueue(i, make());
        }
    }

    /// The barrier of an unaligned checkpoint: it goes on every channel's
    /// priority lane (ahead of everything) and in place right behind what
    /// is already in the channels, ahead of the records still queued here.
    /// Those queued records are this task's *output channel state*
    /// (returned per channel; they are still sent); the records already in
    /// the channels are recorded by the receivers up to the barrier.
    pub fn unaligned_barrier(&mut self, barrier: CheckpointBarrier) -> Vec<(u32, Vec<T>)> {
        self.flush_partial();
        let mut state: Vec<(u32, Vec<T>)> = Vec::new();
        for (i, m) in &self.pending {
            if let Message::Batch(b) = m {
                match state.iter_mut().find(|(c, _)| *c == *i as u32) {
                    Some((_, v)) => v.extend(b.iter().cloned()),
                    None => state.push((*i as u32, b.clone())),
                }
            }
        }
        let queued = std::mem::take(&mut self.pending);
        for i in 0..self.senders.len() {
            self.enqueue(i, Message::Barrier(barrier));
        }
        self.pending.extend(queued);
        for s in &self.senders {
            // A closed channel is reported by the next `drain`.
            let _ = s.priority.send(barrier);
        }
        state
    }

    /// Queues the output channel state of a restored unaligned checkpoint,
    /// ahead of anything else, each record to the channel it was for.
    pub fn restore_output(&mut self, state: Vec<(u32, Vec<T>)>) -> Result<()> {
        for (i, records) in state {
            let i = i as usize;
            if i >= self.senders.len() {
                return Err(RuntimeError::InvalidJob(format!(
                    "task {}: restored output channel state for channel {i} of {}",
                    self.task,
                    self.senders.len()
                )));
            }
            for chunk in records.chunks(BATCH_SIZE) {
                self.pending.push_back((i, Message::Batch(chunk.to_vec())));
            }
        }
        Ok(())
    }

    /// Whether messages wait for channel capacity.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Sends every queued message, waiting for capacity (backpressure).
    /// Cancel-safe: a message leaves the queue only once the channel took it,
    /// so a task can stop waiting to handle a barrier and drain again later.
    pub async fn drain(&mut self) -> Result<()> {
        while let Some(&(i, _)) = self.pending.front() {
            let permit = match self.senders[i].data.try_reserve() {
                Ok(p) => p,
                Err(mpsc::error::TrySendError::Closed(())) => {
                    return Err(RuntimeError::ChannelClosed {
                        task: self.task.to_string(),
                    })
                }
                Err(mpsc::error::TrySendError::Full(())) => {
                    // Backpressure: the time until the channel has room
                    // counts (also when the wait is interrupted).
                    let _timer = self.metrics.as_deref().map(crate::metrics::WaitTimer::start);
                    self.senders[i]
                        .data
                        .reserve()
                        .await
                        .map_err(|_| RuntimeError::ChannelClosed {
                            task: self.task.to_string(),
                        })?
                }
            };
            if let Some((_, msg)) = self.pending.pop_front() {
                permit.send(msg);
            }
        }
        Ok(())
    }
}

/// The receiving side of a task: one channel per upstream subtask. Channels
/// can be blocked (barrier alignment) and end (end of input).
pub struct InputGate<T> {
    receivers: Vec<ChannelReceiver<T>>,
    /// Messages taken out of a channel early (the records an unaligned
    /// barrier overtook), delivered before the channel's next ones.
    backlog: Vec<std::collections::VecDeque<Message<T>>>,
    ended: Vec<bool>,
    next: usize,
}

/// A message delivered by the [`InputGate`].
#[derive(Debug)]
pub struct Delivery<T> {
    /// The input channel.
    pub channel: usize,
    /// The message; `None`: the channel closed without end of input (its
    /// upstream task failed).
    pub msg: Option<Message<T>>,
    /// It was taken out of the channel before (and recorded then, if it had
    /// to be).
    pub from_backlog: bool,
}

impl<T> InputGate<T> {
    /// A gate over `receivers`, indexed by input channel.
    pub fn new(receivers: Vec<ChannelReceiver<T>>) -> Self {
        let n = receivers.len();
        InputGate {
            receivers,
            backlog: (0..n).map(|_| Default::default()).collect(),
            ended: vec![false; n],
            next: 0,
        }
    }

    /// Number of input channels.
    pub fn len(&self) -> usize {
        self.receivers.len()
    }

    /// Marks a channel as ended; it is not polled any more.
    pub fn mark_ended(&mut self, channel: usize) {
        self.ended[channel] = true;
    }

    /// Puts `msg`, taken out of channel `i` early, back in front of the
    /// channel's next messages (behind earlier ones taken out).
    pub fn push_backlog(&mut self, i: usize, msg: Message<T>) {
        self.backlog[i].push_back(msg);
    }

    /// Whether channel `i`'s backlog ends with an event (end of input, a
    /// barrier): nothing is taken out of the channel behind it.
    fn backlog_closed(&self, i: usize) -> bool {
        self.backlog[i]
            .back()
            .is_some_and(|m| !matches!(m, Message::Batch(_)))
    }

    /// The records in channel `i`'s backlog (taken out, not yet delivered).
    pub fn backlog_records(&self, i: usize) -> impl Iterator<Item = &T> {
        self.backlog[i].iter().flat_map(|m| match m {
            Message::Batch(b) => b.as_slice(),
            _ => &[],
        })
    }

    /// Takes the next message of channel `i` out of the channel without
    /// waiting: `None` if there is none now, `Some(None)` if it closed.
    pub fn try_take(&mut self, i: usize) -> Option<Option<Message<T>>> {
        if self.ended[i] || self.backlog_closed(i) {
            return None;
        }
        match self.receivers[i].data.try_recv() {
            Ok(m) => Some(Some(m)),
            Err(mpsc::error::TryRecvError::Empty) => None,
            Err(mpsc::error::TryRecvError::Disconnected) => Some(None),
        }
    }

    fn try_priority(&mut self) -> Option<Delivery<T>> {
        for i in 0..self.receivers.len() {
            if !self.ended[i] {
                if let Ok(b) = self.receivers[i].priority.try_recv() {
                    return Some(Delivery {
                        channel: i,
                        msg: Some(Message::Priority(b)),
                        from_backlog: false,
                    });
                }
            }
        }
        None
    }

    /// The next message of any channel that is neither blocked nor ended,
    /// without waiting: priority barriers first, then round robin, each
    /// channel's backlog before its channel.
    pub fn try_next(&mut self, blocked: &(dyn Fn(usize) -> bool + Sync)) -> Option<Delivery<T>> {
        if let Some(d) = self.try_priority() {
            return Some(d);
        }
        let n = self.receivers.len();
        for k in 0..n {
            let i = (self.next + k) % n;
            if self.ended[i] || blocked(i) {
                continue;
            }
            if let Some(m) = self.backlog[i].pop_front() {
                self.next = (i + 1) % n;
                return Some(Delivery {
                    channel: i,
                    msg: Some(m),
                    from_backlog: true,
                });
            }
            match self.receivers[i].data.try_recv() {
                Ok(m) => {
                    self.next = (i + 1) % n;
                    return Some(Delivery {
                        channel: i,
                        msg: Some(m),
                        from_backlog: false,
                    });
                }
                Err(mpsc::error::TryRecvError::Empty) => {}
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    // The sender went away without EndOfInput: upstream failed.
                    self.ended[i] = true;
                    return Some(Delivery {
                        channel: i,
                        msg: None,
                        from_backlog: false,
                    });
                }
            }
        }
        None
    }

    /// Waits for the next message of any channel that is neither blocked nor
    /// ended (priority barriers first). Returns `None` if no channel can
    /// deliver (all ended or blocked).
    pub async fn next(&mut self, blocked: &(dyn Fn(usize) -> bool + Sync)) -> Option<Delivery<T>> {
        if let Some(d) = self.try_next(blocked) {
            return Some(d);
        }
        let n = self.receivers.len();
        if (0..n).all(|i| self.ended[i] || blocked(i)) {
            return None;
        }
        poll_fn(|cx| {
            for i in 0..n {
                if !self.ended[i] {
                    if let Poll::Ready(Some(b)) = self.receivers[i].priority.poll_recv(cx) {
                        return Poll::Ready(Some(Delivery {
                            channel: i,
                            msg: Some(Message::Priority(b)),
                            from_backlog: false,
                        }));
                    }
                }
            }
            for k in 0..n {
                let i = (self.next + k) % n;
                if self.ended[i] || blocked(i) {
                    continue;
                }
                match self.receivers[i].data.poll_recv(cx) {
                    Poll::Ready(m) => {
                        self.next = (i + 1) % n;
                        if m.is_none() {
                            self.ended[i] = true;
                        }
                        return Poll::Ready(Some(Delivery {
                            channel: i,
                            msg: m,
                            from_backlog: false,
                        }));
                    }
                    Poll::Pending => {}
                }
            }
            Poll::Pending
        })
        .await
    }

    /// Waits for what must be handled even while the task waits to send:
    /// a priority barrier on any channel, or a message on a channel whose
    /// records are being recorded (`recording`). Never returns if there is
    /// none.
    pub async fn next_urgent(&mut self, recording: &(dyn Fn(usize) -> bool + Sync)) -> Delivery<T> {
        let n = self.receivers.len();
        poll_fn(|cx| {
            for i in 0..n {
                if self.ended[i] {
                    continue;
                }
                if let Poll::Ready(Some(b)) = self.receivers[i].priority.poll_recv(cx) {
                    return Poll::Ready(Delivery {
                        channel: i,
                        msg: Some(Message::Priority(b)),
                        from_backlog: false,
                    });
                }
            }
            for i in 0..n {
                if self.ended[i] || !recording(i) || self.backlog_closed(i) {
                    continue;
                }
                if let Poll::Ready(m) = self.receivers[i].data.poll_recv(cx) {
                    if m.is_none() {
                        self.ended[i] = true;
                    }
                    return Poll::Ready(Delivery {
                        channel: i,
                        msg: m,
                        from_backlog: false,
                    });
                }
            }
            Poll::Pending
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::Metrics;

    /// Records out after `n` records through a writer over 3 channels.
    fn records_out(partitioner: Partitioner<u64>, n: u64) -> (u64, Vec<usize>) {
        let metrics = Metrics::default();
        let task = metrics.task(0, "t", 0, 1, true);
        let (senders, mut receivers): (Vec<_>, Vec<_>) = (0..3).map(|_| channel::<u64>(64)).unzip();
        let mut w = OutputWriter::new(senders, partitioner, 0, 128, Arc::from("t")).with_metrics(Some(task));
        for i in 0..n {
            w.push(i);
        }
        w.flush_partial();
        let received = receivers
            .iter_mut()
            .map(|r| {
                let mut n = 0;
                while let Ok(Message::Batch(b)) = r.data.try_recv() {
                    n += b.len();
                }
                n
            })
            .collect();
        (metrics.tasks()[0].records_out, received)
    }

    #[test]
    fn records_out_count_each_record_once() {
        let n = 2 * BATCH_SIZE as u64 + 17;
        let (out, received) = records_out(Partitioner::Broadcast, n);
        assert_eq!(received, vec![n as usize; 3], "every channel got every record");
        assert_eq!(out, n, "a broadcast record counts once");
        let (out, received) = records_out(Partitioner::Rebalance, n);
        assert_eq!(received.iter().sum::<usize>(), n as usize);
        assert_eq!(out, n);
    }
}
