//! How the channels of an edge of the job graph are made for an attempt:
//! all at once in one process (in memory, or each over TCP on 127.0.0.1
//! with a [`crate::net::LoopbackNetwork`]), or one end at a time on a
//! worker ([`NetEnds`]), whose peers may be in other processes.

use crate::channel::{channel, CHANNEL_CAPACITY};
use crate::graph::{AnyBox, Record};
use std::sync::Arc;

/// The channels of one edge for one attempt: `senders[up][down]`,
/// `receivers[down][up]`.
pub(crate) struct ChannelGrid {
    pub senders: Vec<Vec<AnyBox>>,
    pub receivers: Vec<Vec<AnyBox>>,
}

/// Where the channels of an edge run: in process, or over the network of
/// attempt `attempt` (edge `edge`).
pub(crate) struct GridPlace<'a> {
    pub network: Option<&'a crate::net::LoopbackNetwork>,
    pub attempt: u64,
    pub edge: u32,
}

pub(crate) type GridFn = Arc<dyn Fn(&GridPlace<'_>, usize, usize) -> ChannelGrid + Send + Sync>;

pub(crate) fn grid<T: Record>(place: &GridPlace<'_>, ups: usize, downs: usize) -> ChannelGrid {
    let mut senders: Vec<Vec<AnyBox>> = (0..ups).map(|_| Vec::new()).collect();
    let mut receivers: Vec<Vec<AnyBox>> = (0..downs).map(|_| Vec::new()).collect();
    for (from, up) in senders.iter_mut().enumerate() {
        for (to, down) in receivers.iter_mut().enumerate() {
            let (tx, rx) = match place.network {
                None => channel::<T>(CHANNEL_CAPACITY),
                Some(net) => {
                    let id = crate::net::ChannelId {
                        attempt: place.attempt,
                        edge: place.edge,
                        from: from as u32,
                        to: to as u32,
                    };
                    net.channel::<T>(id, CHANNEL_CAPACITY)
                }
            };
            up.push(Box::new(tx));
            down.push(Box::new(rx));
        }
    }
    ChannelGrid { senders, receivers }
}

/// The typed ends of one network channel of an edge (a job spread over
/// workers builds only its own tasks' ends).
pub(crate) struct NetEnds {
    /// The downstream end of a channel, fed by the worker's listener.
    pub receiver: ReceiverEndFn,
    /// The upstream end of a channel whose consumer listens at the address.
    pub sender: SenderEndFn,
}

type ReceiverEndFn = Arc<dyn Fn(&crate::net::ChannelListener, crate::net::ChannelId) -> AnyBox + Send + Sync>;
type SenderEndFn =
    Arc<dyn Fn(std::net::SocketAddr, crate::net::ChannelId, &crate::net::Producers) -> AnyBox + Send + Sync>;

pub(crate) fn net_ends<T: Record>() -> NetEnds {
    NetEnds {
        receiver: Arc::new(|l, id| Box::new(crate::net::receiver_end::<T>(l, id, CHANNEL_CAPACITY))),
        sender: Arc::new(|addr, id, producers| {
            Box::new(crate::net::sender_end::<T>(addr, id, CHANNEL_CAPACITY, producers))
        }),
    }
}
