//! Network channels: the channels between tasks over TCP, with the
//! protocol's guarantees kept — per-channel order, barriers in band,
//! priority barriers of unaligned checkpoints overtaking the data,
//! credit-based flow control (a slow consumer backpressures its producer
//! across the network, nothing buffered without bound), and channels of a
//! superseded attempt refused (fencing).
//!
//! This is the transport of jobs spread over several processes (issue 15).
//! Today a job uses it through a [`LoopbackNetwork`]: every channel of the
//! job goes through a TCP connection on 127.0.0.1 with the wire format of
//! [`wire`], in one process — barriers, alignment, unaligned checkpoints and
//! recovery all cross sockets. See `docs/architecture.md` ("Network
//! channels").

mod connection;
mod loopback;
pub mod wire;

#[cfg(test)]
mod tests;

pub(crate) use connection::ChannelListener;
pub use loopback::LoopbackNetwork;
pub(crate) use loopback::{receiver_end, sender_end};

/// The producers' pumps of one process (their traffic counters, and a
/// handle on each, so that the channels of a torn-down attempt stop even
/// when their peer vanished without closing them).
#[derive(Clone, Default)]
pub(crate) struct Producers {
    pub stats: std::sync::Arc<WireStats>,
    pumps: std::sync::Arc<std::sync::Mutex<Vec<tokio::task::AbortHandle>>>,
}

impl Producers {
    /// Producers counting into `stats`.
    pub fn new(stats: std::sync::Arc<WireStats>) -> Self {
        Producers {
            stats,
            pumps: Default::default(),
        }
    }

    fn spawn(&self, pump: impl std::future::Future<Output = ()> + Send + 'static) {
        let handle = tokio::spawn(pump).abort_handle();
        let mut pumps = self.pumps.lock().unwrap_or_else(|p| p.into_inner());
        pumps.retain(|h| !h.is_finished());
        pumps.push(handle);
    }

    /// Stops every pump.
    pub fn abort_all(&self) {
        for h in self.pumps.lock().unwrap_or_else(|p| p.into_inner()).drain(..) {
            h.abort();
        }
    }
}
pub use wire::{ChannelId, WIRE_VERSION};

use std::sync::atomic::{AtomicU64, Ordering};

/// Traffic counters of network channels (frames include their 4-byte
/// length prefix).
#[derive(Debug, Default)]
pub struct WireStats {
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
    frames_sent: AtomicU64,
    frames_received: AtomicU64,
    connections: AtomicU64,
}

/// A reading of [`WireStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct WireCounts {
    /// Bytes written to connections (by both ends).
    pub bytes_sent: u64,
    /// Bytes read from connections (by both ends).
    pub bytes_received: u64,
    /// Frames written.
    pub frames_sent: u64,
    /// Frames read.
    pub frames_received: u64,
    /// Connections accepted.
    pub connections: u64,
}

impl WireStats {
    /// The counters now.
    pub fn read(&self) -> WireCounts {
        WireCounts {
            bytes_sent: self.bytes_sent.load(Ordering::Relaxed),
            bytes_received: self.bytes_received.load(Ordering::Relaxed),
            frames_sent: self.frames_sent.load(Ordering::Relaxed),
            frames_received: self.frames_received.load(Ordering::Relaxed),
            connections: self.connections.load(Ordering::Relaxed),
        }
    }
}
