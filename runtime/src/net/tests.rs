//! Network channels against real sockets on 127.0.0.1.

use super::connection::{produce, ChannelListener};
use super::wire::{self, ChannelId, WIRE_VERSION};
use super::WireStats;
use crate::channel::{channel, ChannelReceiver, ChannelSender, Message};
use crate::error::RuntimeError;
use sluice_core::{Alignment, CheckpointBarrier, CheckpointId, CheckpointKind};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const WAIT: Duration = Duration::from_secs(10);

fn barrier(id: u64, alignment: Alignment) -> CheckpointBarrier {
    CheckpointBarrier {
        checkpoint_id: CheckpointId(id),
        timestamp_ms: 1_700_000_000_000 + id,
        kind: CheckpointKind::Checkpoint,
        alignment,
        base: None,
    }
}

fn id(attempt: u64) -> ChannelId {
    ChannelId {
        attempt,
        edge: 3,
        from: 1,
        to: 0,
    }
}

async fn listener() -> (ChannelListener, Arc<WireStats>) {
    let stats = Arc::new(WireStats::default());
    let l = ChannelListener::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), stats.clone())
        .await
        .unwrap();
    (l, stats)
}

/// A channel over `listener` (the producer connecting to `addr`): the
/// upstream task's sender, the downstream task's receiver, and the
/// producer's pump.
fn open(
    listener: &ChannelListener,
    addr: SocketAddr,
    id: ChannelId,
    capacity: usize,
    stats: Arc<WireStats>,
) -> (
    ChannelSender<u64>,
    ChannelReceiver<u64>,
    tokio::task::JoinHandle<crate::Result<()>>,
) {
    let (task_tx, pump_rx) = channel::<u64>(capacity);
    let (pump_tx, task_rx) = channel::<u64>(capacity);
    listener.expect(id, pump_tx, capacity);
    let pump = tokio::spawn(produce(addr, id, pump_rx, stats));
    (task_tx, task_rx, pump)
}

/// What a message is, comparable.
fn show(m: &Message<u64>) -> String {
    match m {
        Message::Batch(b) => format!("batch {b:?}"),
        Message::Barrier(b) => format!("barrier {}", b.checkpoint_id.0),
        Message::EndOfInput => "end".into(),
        Message::Priority(b) => format!("priority {}", b.checkpoint_id.0),
    }
}

async fn recv(rx: &mut ChannelReceiver<u64>) -> Option<Message<u64>> {
    tokio::time::timeout(WAIT, rx.data.recv())
        .await
        .expect("a message within 10 s")
}

#[tokio::test]
async fn records_barriers_and_end_of_input_arrive_in_order() {
    let (l, stats) = listener().await;
    let (tx, mut rx, pump) = open(&l, l.local_addr(), id(1), 4, stats.clone());
    let mut sent = Vec::new();
    let producer = tokio::spawn(async move {
        for i in 0..300u64 {
            let m = if i % 50 == 49 {
                Message::Barrier(barrier(i / 50 + 1, Alignment::Aligned))
            } else {
                Message::Batch((i * 10..i * 10 + (i % 7)).collect())
            };
            sent.push(show(&m));
            tx.data.send(m).await.unwrap();
        }
        tx.data.send(Message::EndOfInput).await.unwrap();
        sent.push("end".into());
        sent
    });
    let mut got = Vec::new();
    while let Some(m) = recv(&mut rx).await {
        got.push(show(&m));
    }
    let sent = producer.await.unwrap();
    assert_eq!(got, sent);
    pump.await.unwrap().unwrap();
    let counts = stats.read();
    assert_eq!(counts.connections, 1);
    // Both ends counted the data frames (and the hello, the accept and the
    // credits).
    assert!(counts.frames_received >= 301, "{counts:?}");
    assert_eq!(counts.bytes_sent, counts.bytes_received);
}

/// Waits until `n` stops changing for a while, then returns it.
async fn settled(n: &AtomicUsize) -> usize {
    let mut last = usize::MAX;
    loop {
        let now = n.load(Ordering::SeqCst);
        if now == last {
            return now;
        }
        last = now;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

#[tokio::test]
async fn a_slow_consumer_backpressures_its_producer_across_the_network() {
    const CAPACITY: usize = 4;
    let (l, stats) = listener().await;
    let (tx, mut rx, pump) = open(&l, l.local_addr(), id(1), CAPACITY, stats);
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let producer = tokio::spawn(async move {
        for i in 0..100u64 {
            tx.data.send(Message::Batch(vec![i])).await.unwrap();
            count.fetch_add(1, Ordering::SeqCst);
        }
        tx.data.send(Message::EndOfInput).await.unwrap();
    });
    // Nothing is read: the producer's output channel (CAPACITY) and the
    // credited slots of the consumer's input channel (CAPACITY) fill, and
    // then the upstream task waits. Without credits the pump would keep
    // writing into the socket.
    assert_eq!(settled(&accepted).await, 2 * CAPACITY);
    let mut got = Vec::new();
    while let Some(m) = recv(&mut rx).await {
        if let Message::Batch(b) = m {
            got.extend(b);
        }
    }
    assert_eq!(got, (0..100).collect::<Vec<_>>());
    producer.await.unwrap();
    pump.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_priority_barrier_overtakes_a_full_channel() {
    const CAPACITY: usize = 2;
    let (l, stats) = listener().await;
    let (tx, mut rx, pump) = open(&l, l.local_addr(), id(1), CAPACITY, stats);
    for i in 0..(2 * CAPACITY as u64) {
        tx.data.send(Message::Batch(vec![i])).await.unwrap();
    }
    let priority = tx.priority.clone();
    let data = tx.data.clone();
    let blocked = tokio::spawn(async move {
        // Blocks: the channel is full end to end.
        data.send(Message::Barrier(barrier(7, Alignment::Unaligned)))
            .await
            .unwrap();
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!blocked.is_finished(), "the channel should be full");
    priority.send(barrier(7, Alignment::Unaligned)).unwrap();
    let b = tokio::time::timeout(WAIT, rx.priority.recv())
        .await
        .expect("the priority barrier arrives while the data waits")
        .unwrap();
    assert_eq!(b.checkpoint_id, CheckpointId(7));
    // The data behind it is intact, the barrier in its place.
    let mut got = Vec::new();
    for _ in 0..(2 * CAPACITY + 1) {
        got.push(show(&recv(&mut rx).await.unwrap()));
    }
    assert_eq!(
        got,
        ["batch [0]", "batch [1]", "batch [2]", "batch [3]", "barrier 7"]
    );
    blocked.await.unwrap();
    drop(tx);
    drop(priority);
    // The upstream task stopped without end of input: the channel ends
    // without it.
    assert!(recv(&mut rx).await.is_none());
    pump.await.unwrap().unwrap();
}

#[tokio::test]
async fn channels_of_a_superseded_attempt_are_refused() {
    let (l, stats) = listener().await;
    // Expected for attempt 1, then attempt 2 begins before it connects.
    let (_tx1, mut rx1) = {
        let (task_tx, _pump_rx) = channel::<u64>(4);
        let (pump_tx, task_rx) = channel::<u64>(4);
        l.expect(id(1), pump_tx, 4);
        (task_tx, task_rx)
    };
    l.fence(2);
    assert!(recv(&mut rx1).await.is_none(), "the fenced channel ends");
    // A late producer of attempt 1 (a worker back from a partition).
    let (_tx, late_rx) = channel::<u64>(4);
    let err = produce(l.local_addr(), id(1), late_rx, stats.clone())
        .await
        .unwrap_err();
    let RuntimeError::Network(msg) = &err else {
        panic!("{err}")
    };
    assert!(msg.contains("attempt 1 is superseded"), "{msg}");
    // Expecting a fenced attempt's channel does nothing.
    let (pump_tx, mut task_rx) = channel::<u64>(4);
    l.expect(id(1), pump_tx, 4);
    assert!(recv(&mut task_rx).await.is_none());
    // Attempt 2's channel works.
    let (tx, mut rx, pump) = open(&l, l.local_addr(), id(2), 4, stats);
    tx.data.send(Message::Batch(vec![42])).await.unwrap();
    tx.data.send(Message::EndOfInput).await.unwrap();
    drop(tx);
    assert_eq!(show(&recv(&mut rx).await.unwrap()), "batch [42]");
    assert_eq!(show(&recv(&mut rx).await.unwrap()), "end");
    assert!(recv(&mut rx).await.is_none());
    pump.await.unwrap().unwrap();
}

/// Writes one length-prefixed frame.
async fn write_frame(s: &mut TcpStream, body: &[u8]) {
    s.write_all(&(body.len() as u32).to_be_bytes()).await.unwrap();
    s.write_all(body).await.unwrap();
}

/// The connection is closed by the listener (after an optional reject frame).
async fn closed_by_peer(s: &mut TcpStream) -> Vec<u8> {
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut rest))
        .await
        .expect("the listener closes the connection")
        .unwrap();
    rest
}

#[tokio::test]
async fn foreign_versions_and_garbage_are_refused_without_harm() {
    let (l, stats) = listener().await;
    // A newer wire version.
    let mut hello = wire::encode_hello(&id(1)).to_vec();
    hello[4..6].copy_from_slice(&(WIRE_VERSION + 98).to_be_bytes());
    let err = wire::decode_hello(&hello, "test").unwrap_err().to_string();
    assert!(
        err.contains(&format!("wire version {}", WIRE_VERSION + 98)),
        "{err}"
    );
    let mut s = TcpStream::connect(l.local_addr()).await.unwrap();
    write_frame(&mut s, &hello).await;
    closed_by_peer(&mut s).await;
    // Not a Sluice connection at all.
    let err = wire::decode_hello(b"GET / HTTP/1.1", "test")
        .unwrap_err()
        .to_string();
    assert!(err.contains("not a Sluice channel"), "{err}");
    let mut s = TcpStream::connect(l.local_addr()).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    closed_by_peer(&mut s).await;
    // A right hello, then a frame that is not a frame of the channel's type.
    let (pump_tx, mut task_rx) = channel::<u64>(4);
    l.expect(id(1), pump_tx, 4);
    let mut s = TcpStream::connect(l.local_addr()).await.unwrap();
    write_frame(&mut s, &wire::encode_hello(&id(1))).await;
    write_frame(&mut s, &[0xff, 0xff, 0xff, 0xff, 0xff, 0xff]).await;
    closed_by_peer(&mut s).await;
    assert!(
        recv(&mut task_rx).await.is_none(),
        "the channel ends without end of input"
    );
    // A length prefix beyond the frame limit.
    let (pump_tx, mut task_rx) = channel::<u64>(4);
    l.expect(id(2), pump_tx, 4);
    let mut s = TcpStream::connect(l.local_addr()).await.unwrap();
    write_frame(&mut s, &wire::encode_hello(&id(2))).await;
    s.write_all(&u32::MAX.to_be_bytes()).await.unwrap();
    closed_by_peer(&mut s).await;
    assert!(recv(&mut task_rx).await.is_none());
    // The listener still serves channels.
    let (tx, mut rx, pump) = open(&l, l.local_addr(), id(3), 4, stats);
    tx.data.send(Message::EndOfInput).await.unwrap();
    drop(tx);
    assert_eq!(show(&recv(&mut rx).await.unwrap()), "end");
    pump.await.unwrap().unwrap();
}

/// A TCP proxy that forwards one connection and cuts it once `limit` bytes
/// went from the client to the server.
async fn cutting_proxy(target: SocketAddr, limit: usize) -> SocketAddr {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        let (client, _) = l.accept().await.unwrap();
        let server = TcpStream::connect(target).await.unwrap();
        let (mut cr, mut cw) = client.into_split();
        let (mut sr, mut sw) = server.into_split();
        let back = tokio::spawn(async move {
            let _ = tokio::io::copy(&mut sr, &mut cw).await;
        });
        let mut forwarded = 0;
        let mut buf = vec![0u8; 4096];
        while forwarded < limit {
            let n = match cr.read(&mut buf[..(limit - forwarded).min(4096)]).await {
                Ok(0) | Err(_) => break,
                Ok(n) => n,
            };
            if sw.write_all(&buf[..n]).await.is_err() {
                break;
            }
            forwarded += n;
        }
        // Cut: both directions are dropped.
        back.abort();
    });
    addr
}

#[tokio::test]
async fn a_connection_cut_mid_stream_ends_the_channel_without_end_of_input() {
    let (l, stats) = listener().await;
    let proxy = cutting_proxy(l.local_addr(), 2_000).await;
    let (tx, mut rx, pump) = open(&l, proxy, id(1), 4, stats);
    let producer = tokio::spawn(async move {
        let mut i = 0u64;
        // Sends until the pump is gone (its connection was cut).
        while tx.data.send(Message::Batch(vec![i; 8])).await.is_ok() {
            i += 1;
        }
        i
    });
    let mut got = Vec::new();
    let end = loop {
        match recv(&mut rx).await {
            Some(Message::Batch(b)) => got.push(b[0]),
            other => break other.map(|m| show(&m)),
        }
    };
    assert_eq!(end, None, "the channel ends without end of input");
    // What arrived is a prefix of what was sent, without gaps.
    assert!(!got.is_empty());
    assert_eq!(got, (0..got.len() as u64).collect::<Vec<_>>());
    let err = pump.await.unwrap().unwrap_err().to_string();
    assert!(err.contains("channel attempt 1 edge 3 subtask 1 -> 0"), "{err}");
    let sent = producer.await.unwrap();
    assert!(sent >= got.len() as u64);
}
