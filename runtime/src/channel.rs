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
    /// A checkpoint barrier.
    Barrier(CheckpointBarrier),
    /// The upstream subtask has finished; nothing follows.
    EndOfInput,
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
    senders: Vec<mpsc::Sender<Message<T>>>,
    buffers: Vec<Vec<T>>,
    pending: std::collections::VecDeque<(usize, Message<T>)>,
    partitioner: Partitioner<T>,
    subtask: usize,
    max_parallelism: u32,
    next: usize,
    key_buf: Vec<u8>,
    task: Arc<str>,
}

impl<T: Clone + Send + 'static> OutputWriter<T> {
    /// An output over `senders` (indexed by downstream subtask).
    pub fn new(
        senders: Vec<mpsc::Sender<Message<T>>>,
        partitioner: Partitioner<T>,
        subtask: usize,
        max_parallelism: u32,
        task: Arc<str>,
    ) -> Self {
        let n = senders.len();
        OutputWriter {
            senders,
            buffers: (0..n).map(|_| Vec::with_capacity(BATCH_SIZE)).collect(),
            pending: Default::default(),
            partitioner,
            subtask,
            max_parallelism,
            next: subtask,
            key_buf: Vec::with_capacity(16),
            task,
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
                operator_index_for_key_group(self.max_parallelism, n as u32, g) as usize
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
        self.enqueue(i, Message::Batch(batch));
    }

    fn enqueue(&mut self, i: usize, msg: Message<T>) {
        if self.pending.is_empty() {
            match self.senders[i].try_send(msg) {
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

    /// Whether messages wait for channel capacity.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Sends every queued message, waiting for capacity (backpressure).
    pub async fn drain(&mut self) -> Result<()> {
        while let Some((i, msg)) = self.pending.pop_front() {
            if self.senders[i].send(msg).await.is_err() {
                return Err(RuntimeError::ChannelClosed {
                    task: self.task.to_string(),
                });
            }
        }
        Ok(())
    }
}

/// The receiving side of a task: one channel per upstream subtask. Channels
/// can be blocked (barrier alignment) and end (end of input).
pub struct InputGate<T> {
    receivers: Vec<mpsc::Receiver<Message<T>>>,
    ended: Vec<bool>,
    next: usize,
}

impl<T> InputGate<T> {
    /// A gate over `receivers`, indexed by input channel.
    pub fn new(receivers: Vec<mpsc::Receiver<Message<T>>>) -> Self {
        let n = receivers.len();
        InputGate {
            receivers,
            ended: vec![false; n],
            next: 0,
        }
    }

    /// Number of input channels.
    pub fn len(&self) -> usize {
        self.receivers.len()
    }

    /// Whether the gate has no channels.
    pub fn is_empty(&self) -> bool {
        self.receivers.is_empty()
    }

    /// Marks a channel as ended; it is not polled any more.
    pub fn mark_ended(&mut self, channel: usize) {
        self.ended[channel] = true;
    }

    /// The next message of any channel that is neither blocked nor ended,
    /// without waiting. Channels are served round robin. `(i, None)` means
    /// channel `i` closed without end of input: its upstream task failed.
    pub fn try_next(
        &mut self,
        blocked: &(dyn Fn(usize) -> bool + Sync),
    ) -> Option<(usize, Option<Message<T>>)> {
        let n = self.receivers.len();
        for k in 0..n {
            let i = (self.next + k) % n;
            if self.ended[i] || blocked(i) {
                continue;
            }
            match self.receivers[i].try_recv() {
                Ok(m) => {
                    self.next = (i + 1) % n;
                    return Some((i, Some(m)));
                }
                Err(mpsc::error::TryRecvError::Empty) => {}
                Err(mpsc::error::TryRecvError::Disconnected) => {
                    // The sender went away without EndOfInput: upstream failed.
                    // Report it as a message so the task fails.
                    self.ended[i] = true;
                    return Some((i, None));
                }
            }
        }
        None
    }

    /// Waits for the next message of any channel that is neither blocked nor
    /// ended. Returns `None` if no channel can deliver (all ended or blocked).
    pub async fn next(
        &mut self,
        blocked: &(dyn Fn(usize) -> bool + Sync),
    ) -> Option<(usize, Option<Message<T>>)> {
        let n = self.receivers.len();
        if (0..n).all(|i| self.ended[i] || blocked(i)) {
            return None;
        }
        poll_fn(|cx| {
            for k in 0..n {
                let i = (self.next + k) % n;
                if self.ended[i] || blocked(i) {
                    continue;
                }
                match self.receivers[i].poll_recv(cx) {
                    Poll::Ready(Some(m)) => {
                        self.next = (i + 1) % n;
                        return Poll::Ready(Some((i, Some(m))));
                    }
                    Poll::Ready(None) => {
                        self.ended[i] = true;
                        return Poll::Ready(Some((i, None)));
                    }
                    Poll::Pending => {}
                }
            }
            Poll::Pending
        })
        .await
    }
}
