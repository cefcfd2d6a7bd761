//! The two ends of a network channel and the listener that accepts them.
//!
//! A task never sees the network: it writes into and reads from the same
//! bounded in-process channels as always. On the producer's side a pump
//! moves what the task wrote onto the connection; on the consumer's side
//! a pump moves frames into the task's input channel.
//!
//! Flow control is credit-based (Flink's): the consumer grants one credit
//! per free slot of the task's input channel (it reserves the slot first),
//! and the producer sends a batch, a barrier in place or end of input only
//! against a credit. So the consumer can always take what arrives without
//! waiting, the socket never holds more than the credits granted, and a
//! priority barrier (unaligned checkpoint), which takes no credit, is never
//! stuck behind data: it overtakes across the network too. A slow consumer
//! grants no credit, its producer's pump stops taking from the task's
//! output channel, and the upstream task is backpressured as in one
//! process. Per channel at most `2 × capacity` messages are buffered: the
//! producer task's output channel and the credited slots.

use super::wire::{self, ChannelId, ConsumerFrame, MAX_FRAME_BYTES};
use super::WireStats;
use crate::channel::{ChannelReceiver, ChannelSender, Message};
use crate::error::{Result, RuntimeError};
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};
use tracing::{debug, warn};

/// How long an accepted connection may take to say hello, and how long a
/// hello for a channel not (yet) expected waits for the consumer's task to
/// be deployed.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// The largest hello frame accepted.
const HELLO_MAX_BYTES: usize = 1024;

type Reader = FramedRead<OwnedReadHalf, LengthDelimitedCodec>;
type Writer = FramedWrite<OwnedWriteHalf, LengthDelimitedCodec>;

fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(MAX_FRAME_BYTES)
        .new_codec()
}

fn split(stream: TcpStream) -> (Reader, Writer) {
    let (r, w) = stream.into_split();
    (FramedRead::new(r, codec()), FramedWrite::new(w, codec()))
}

fn io_error(id: &ChannelId, what: &str, e: std::io::Error) -> RuntimeError {
    RuntimeError::Network(format!("channel {id}: {what}: {e}"))
}

async fn send(writer: &mut Writer, frame: Bytes, stats: &WireStats, id: &ChannelId) -> Result<()> {
    let n = frame.len() as u64 + 4;
    writer
        .send(frame)
        .await
        .map_err(|e| io_error(id, "cannot send", e))?;
    stats.bytes_sent.fetch_add(n, Ordering::Relaxed);
    stats.frames_sent.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// The next frame; `None` at the end of the connection.
async fn receive(reader: &mut Reader, stats: &WireStats, id: &ChannelId) -> Result<Option<Bytes>> {
    match reader.next().await {
        None => Ok(None),
        Some(Err(e)) => Err(io_error(id, "cannot receive", e)),
        Some(Ok(f)) => {
            stats
                .bytes_received
                .fetch_add(f.len() as u64 + 4, Ordering::Relaxed);
            stats.frames_received.fetch_add(1, Ordering::Relaxed);
            Ok(Some(f.freeze()))
        }
    }
}

/// The producer's end: connects to `addr`, says hello as channel `id`, and
/// moves what the upstream task writes into `rx` onto the connection
/// against the consumer's credits, priority barriers first. Returns when
/// the task has sent end of input and dropped its sender, or when the task
/// stopped without it (the connection is then dropped, and the consumer
/// sees the channel end without end of input, as when an upstream task in
/// the same process fails).
pub(crate) async fn produce<T: Serialize>(
    addr: SocketAddr,
    id: ChannelId,
    mut rx: ChannelReceiver<T>,
    stats: Arc<WireStats>,
) -> Result<()> {
    let handshake = async {
        let stream = TcpStream::connect(addr)
            .await
            .map_err(|e| io_error(&id, &format!("cannot connect to {addr}"), e))?;
        stream
            .set_nodelay(true)
            .map_err(|e| io_error(&id, "cannot set TCP_NODELAY", e))?;
        let (mut reader, mut writer) = split(stream);
        send(&mut writer, wire::encode_hello(&id), &stats, &id).await?;
        match receive(&mut reader, &stats, &id).await? {
            Some(f) => match wire::decode_consumer(&f, &id)? {
                ConsumerFrame::Accept => Ok((reader, writer)),
                ConsumerFrame::Reject(reason) => Err(RuntimeError::Network(format!(
                    "channel {id}: {addr} refused it: {reason}"
                ))),
                ConsumerFrame::Credit(_) => Err(RuntimeError::Network(format!(
                    "channel {id}: {addr} granted credit before accepting the channel (protocol error)"
                ))),
            },
            None => Err(RuntimeError::Network(format!(
                "channel {id}: {addr} closed the connection during the handshake"
            ))),
        }
    };
    // The consumer waits up to HELLO_TIMEOUT for its task to be deployed.
    let (mut reader, mut writer) = tokio::time::timeout(HELLO_TIMEOUT + Duration::from_secs(5), handshake)
        .await
        .map_err(|_| RuntimeError::Network(format!("channel {id}: no answer from {addr} to the hello")))??;
    let mut credits: u64 = 0;
    let mut ended = false;
    let mut priority_open = true;
    loop {
        tokio::select! {
            biased;
            b = rx.priority.recv(), if priority_open => match b {
                Some(b) => send(&mut writer, wire::encode_message::<T>(&Message::Priority(b), &id)?, &stats, &id).await?,
                None => priority_open = false,
            },
            f = receive(&mut reader, &stats, &id) => match f? {
                Some(f) => match wire::decode_consumer(&f, &id)? {
                    ConsumerFrame::Credit(n) => credits += u64::from(n),
                    other => {
                        return Err(RuntimeError::Network(format!(
                            "channel {id}: unexpected {other:?} from {addr} after the handshake (protocol error)"
                        )))
                    }
                },
                None if ended => return Ok(()),
                None => {
                    return Err(RuntimeError::Network(format!(
                        "channel {id}: {addr} closed the connection before end of input (the downstream task \
                         stopped, or its worker was lost)"
                    )))
                }
            },
            m = rx.data.recv(), if credits > 0 => match m {
                Some(m) => {
                    ended |= matches!(m, Message::EndOfInput);
                    send(&mut writer, wire::encode_message(&m, &id)?, &stats, &id).await?;
                    credits -= 1;
                }
                None if ended => {
                    let _ = SinkExt::<Bytes>::close(&mut writer).await;
                    return Ok(());
                }
                None => {
                    // The upstream task stopped without end of input (it
                    // failed, or the attempt is being torn down): dropping
                    // the connection tells the consumer.
                    debug!("channel {id}: upstream task stopped before end of input");
                    return Ok(());
                }
            },
        }
    }
}

/// The consumer's end of an accepted connection: grants a credit per slot
/// reserved in the downstream task's input channel `tx` (up to
/// `capacity`), and moves frames into it.
async fn consume<T: DeserializeOwned>(
    id: ChannelId,
    mut reader: Reader,
    mut writer: Writer,
    tx: ChannelSender<T>,
    capacity: usize,
    stats: Arc<WireStats>,
) -> Result<()> {
    send(
        &mut writer,
        wire::encode_consumer(&ConsumerFrame::Accept),
        &stats,
        &id,
    )
    .await?;
    let capacity = capacity.max(1);
    let mut permits: VecDeque<tokio::sync::mpsc::OwnedPermit<Message<T>>> = VecDeque::with_capacity(capacity);
    let mut ended = false;
    loop {
        let want_credit = permits.len() < capacity && !ended;
        tokio::select! {
            biased;
            f = receive(&mut reader, &stats, &id) => match f? {
                Some(f) => match wire::decode_message::<T>(&f, &id)? {
                    Message::Priority(b) => {
                        if tx.priority.send(b).is_err() {
                            return Ok(()); // The downstream task stopped.
                        }
                    }
                    m => {
                        let Some(permit) = permits.pop_front() else {
                            return Err(RuntimeError::Network(format!(
                                "channel {id}: the producer sent data without credit (protocol error)"
                            )));
                        };
                        ended |= matches!(m, Message::EndOfInput);
                        permit.send(m);
                    }
                },
                None if ended => return Ok(()),
                None => {
                    return Err(RuntimeError::Network(format!(
                        "channel {id}: the producer closed the connection before end of input (the upstream \
                         task failed, or its worker was lost)"
                    )))
                }
            },
            p = tx.data.clone().reserve_owned(), if want_credit => {
                let Ok(p) = p else { return Ok(()) }; // The downstream task stopped.
                permits.push_back(p);
                let mut granted = 1u32;
                while permits.len() < capacity {
                    match tx.data.clone().try_reserve_owned() {
                        Ok(p) => {
                            permits.push_back(p);
                            granted += 1;
                        }
                        Err(_) => break,
                    }
                }
                send(&mut writer, wire::encode_consumer(&ConsumerFrame::Credit(granted)), &stats, &id).await?;
            },
            _ = tx.data.closed(), if !want_credit => return Ok(()),
        }
    }
}

type Slot = Box<dyn FnOnce(Reader, Writer) -> futures::future::BoxFuture<'static, Result<()>> + Send>;

/// Channels expected by the consumers of this listener.
#[derive(Default)]
struct Expected {
    /// Channels of earlier attempts are refused (fencing).
    min_attempt: u64,
    slots: HashMap<ChannelId, Slot>,
}

/// Accepts the connections of network channels and hands each to the
/// consumer that expects it.
pub(crate) struct ChannelListener {
    addr: SocketAddr,
    expected: Arc<Mutex<Expected>>,
    registered: Arc<Notify>,
    stats: Arc<WireStats>,
    accept: JoinHandle<()>,
}

impl Drop for ChannelListener {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl ChannelListener {
    /// Listens on `addr` (port 0: any free port).
    pub async fn bind(addr: SocketAddr, stats: Arc<WireStats>) -> Result<Self> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| RuntimeError::Network(format!("cannot listen for channels on {addr}: {e}")))?;
        let addr = listener
            .local_addr()
            .map_err(|e| RuntimeError::Network(format!("address of the channel listener: {e}")))?;
        let expected: Arc<Mutex<Expected>> = Arc::default();
        let registered = Arc::new(Notify::new());
        let accept = tokio::spawn(accept_loop(
            listener,
            expected.clone(),
            registered.clone(),
            stats.clone(),
        ));
        Ok(ChannelListener {
            addr,
            expected,
            registered,
            stats,
            accept,
        })
    }

    /// The address producers connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Expects channel `id`: what arrives on it goes into `tx`, with at
    /// most `capacity` credits outstanding. Dropped unconnected when its
    /// attempt is fenced.
    pub fn expect<T: DeserializeOwned + Send + 'static>(
        &self,
        id: ChannelId,
        tx: ChannelSender<T>,
        capacity: usize,
    ) {
        let stats = self.stats.clone();
        let slot: Slot = Box::new(move |reader, writer| {
            Box::pin(async move { consume(id, reader, writer, tx, capacity, stats).await })
        });
        {
            let mut expected = self.expected.lock().unwrap_or_else(|p| p.into_inner());
            if id.attempt < expected.min_attempt {
                return; // Fenced already: dropping `tx` ends the channel.
            }
            expected.slots.insert(id, slot);
        }
        self.registered.notify_waiters();
    }

    /// Refuses every channel of an attempt before `attempt` from now on,
    /// and drops the ones still expected.
    pub fn fence(&self, attempt: u64) {
        let dropped: Vec<Slot> = {
            let mut expected = self.expected.lock().unwrap_or_else(|p| p.into_inner());
            expected.min_attempt = expected.min_attempt.max(attempt);
            let min = expected.min_attempt;
            let old: Vec<ChannelId> = expected
                .slots
                .keys()
                .filter(|id| id.attempt < min)
                .copied()
                .collect();
            old.iter().filter_map(|id| expected.slots.remove(id)).collect()
        };
        drop(dropped);
        self.registered.notify_waiters();
    }
}

async fn accept_loop(
    listener: TcpListener,
    expected: Arc<Mutex<Expected>>,
    registered: Arc<Notify>,
    stats: Arc<WireStats>,
) {
    loop {
        let (stream, peer) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                // Out of file descriptors and the like: wait, try again.
                warn!("channel listener: cannot accept a connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        stats.connections.fetch_add(1, Ordering::Relaxed);
        let expected = expected.clone();
        let registered = registered.clone();
        let stats = stats.clone();
        tokio::spawn(async move {
            if let Err(e) = serve(stream, peer, expected, registered, stats).await {
                warn!("{e}");
            }
        });
    }
}

/// One accepted connection: the hello, the channel's slot (waiting for it
/// while its attempt is current), then the consumer's pump.
async fn serve(
    stream: TcpStream,
    peer: SocketAddr,
    expected: Arc<Mutex<Expected>>,
    registered: Arc<Notify>,
    stats: Arc<WireStats>,
) -> Result<()> {
    let _ = stream.set_nodelay(true);
    let (mut reader, mut writer) = split(stream);
    // Nothing large before a peer said who it is.
    reader.decoder_mut().set_max_frame_length(HELLO_MAX_BYTES);
    let hello = match tokio::time::timeout(HELLO_TIMEOUT, reader.next()).await {
        Ok(Some(Ok(f))) => f,
        Ok(Some(Err(e))) => return Err(RuntimeError::Network(format!("connection from {peer}: {e}"))),
        Ok(None) => return Ok(()),
        Err(_) => {
            return Err(RuntimeError::Network(format!(
                "connection from {peer} sent no hello within {HELLO_TIMEOUT:?}"
            )))
        }
    };
    stats
        .bytes_received
        .fetch_add(hello.len() as u64 + 4, Ordering::Relaxed);
    let id = wire::decode_hello(&hello, peer)?;
    reader.decoder_mut().set_max_frame_length(MAX_FRAME_BYTES);
    let deadline = tokio::time::Instant::now() + HELLO_TIMEOUT;
    let slot = loop {
        let notified = registered.notified();
        let refused = {
            let mut exp = expected.lock().unwrap_or_else(|p| p.into_inner());
            if id.attempt < exp.min_attempt {
                Some(format!(
                    "attempt {} is superseded (the job is at attempt {} or later): a worker of an old \
                     attempt must not send",
                    id.attempt, exp.min_attempt
                ))
            } else if let Some(slot) = exp.slots.remove(&id) {
                break slot;
            } else {
                None
            }
        };
        let refused = match refused {
            Some(r) => Some(r),
            None if tokio::time::timeout_at(deadline, notified).await.is_err() => Some(format!(
                "no task expects channel {id} (not deployed within {HELLO_TIMEOUT:?}, or already connected)"
            )),
            None => None,
        };
        if let Some(reason) = refused {
            let _ = send(
                &mut writer,
                wire::encode_consumer(&ConsumerFrame::Reject(reason.clone())),
                &stats,
                &id,
            )
            .await;
            return Err(RuntimeError::Network(format!(
                "channel {id} from {peer} refused: {reason}"
            )));
        }
    };
    slot(reader, writer).await
}
