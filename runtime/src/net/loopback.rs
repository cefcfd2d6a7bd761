//! Every channel of a job over TCP on 127.0.0.1, in one process.

use super::connection::{produce, ChannelListener};
use super::wire::ChannelId;
use super::{Producers, WireCounts, WireStats};
use crate::channel::{channel, ChannelReceiver, ChannelSender};
use crate::error::Result;
use crate::graph::Record;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tracing::warn;

/// Runs every channel of a job through a TCP connection on 127.0.0.1 with
/// the wire format and flow control of multi-process jobs, in one process
/// ([`crate::Job::with_loopback_network`]). For testing and measuring the
/// network path: barriers, alignment, unaligned checkpoints and recovery
/// cross real sockets, and [`LoopbackNetwork::counts`] tells the bytes on
/// the wire.
///
/// ```
/// # tokio::runtime::Runtime::new().unwrap().block_on(async {
/// use sluice_runtime::net::LoopbackNetwork;
/// use sluice_runtime::prelude::*;
///
/// let net = LoopbackNetwork::bind().await.unwrap();
/// let sink = CollectSink::new();
/// let job = Job::new("over-tcp").with_parallelism(2).with_loopback_network(net.clone());
/// job.source("numbers", SequenceSource::new(10_000, 2, |i| i), 2)
///     .rebalance()
///     .map(|i| i * 2)
///     .sink(sink.clone())
///     .unwrap();
/// job.execute().await.unwrap();
/// assert_eq!(sink.items().len(), 10_000);
/// assert!(net.counts().bytes_sent > 10_000);
/// # });
/// ```
pub struct LoopbackNetwork {
    listener: ChannelListener,
    attempt: AtomicU64,
    stats: Arc<WireStats>,
    producers: Producers,
}

impl LoopbackNetwork {
    /// Listens on a free port of 127.0.0.1 (inside a tokio runtime).
    pub async fn bind() -> Result<Arc<Self>> {
        let stats = Arc::new(WireStats::default());
        let listener =
            ChannelListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), stats.clone()).await?;
        Ok(Arc::new(LoopbackNetwork {
            listener,
            attempt: AtomicU64::new(0),
            producers: Producers::new(stats.clone()),
            stats,
        }))
    }

    /// Traffic so far.
    pub fn counts(&self) -> WireCounts {
        self.stats.read()
    }

    /// A new attempt of the job: its id, and every channel of an earlier
    /// attempt refused from now on.
    pub(crate) fn begin_attempt(&self) -> u64 {
        let attempt = self.attempt.fetch_add(1, Ordering::Relaxed) + 1;
        self.listener.fence(attempt);
        // The earlier attempt's tasks are gone: so go its pumps.
        self.producers.abort_all();
        attempt
    }

    /// Channel `id` over the network: the upstream task writes into the
    /// sender, the downstream task reads from the receiver, each with
    /// `capacity` slots. Must be called inside a tokio runtime.
    pub(crate) fn channel<T: Record>(
        &self,
        id: ChannelId,
        capacity: usize,
    ) -> (ChannelSender<T>, ChannelReceiver<T>) {
        let rx = receiver_end(&self.listener, id, capacity);
        let tx = sender_end(self.listener.local_addr(), id, capacity, &self.producers);
        (tx, rx)
    }
}

/// The downstream task's end of channel `id`: fed by `listener` once the
/// producer connects.
pub(crate) fn receiver_end<T: Record>(
    listener: &ChannelListener,
    id: ChannelId,
    capacity: usize,
) -> ChannelReceiver<T> {
    let (pump_tx, task_rx) = channel::<T>(capacity);
    listener.expect(id, pump_tx, capacity);
    task_rx
}

/// The upstream task's end of channel `id`, whose consumer listens at
/// `addr`. Must be called inside a tokio runtime.
pub(crate) fn sender_end<T: Record>(
    addr: SocketAddr,
    id: ChannelId,
    capacity: usize,
    producers: &Producers,
) -> ChannelSender<T> {
    let (task_tx, pump_rx) = channel::<T>(capacity);
    let stats = producers.stats.clone();
    producers.spawn(async move {
        if let Err(e) = produce(addr, id, pump_rx, stats).await {
            warn!("{e}");
        }
    });
    task_tx
}
