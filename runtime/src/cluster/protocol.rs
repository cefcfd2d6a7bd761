//! The control connection between the job master (coordinator) and a
//! worker: length-delimited frames (4-byte big-endian length) of JSON
//! messages. The worker connects and registers; every message of an
//! attempt carries the attempt's id, and messages of another attempt are
//! dropped (fencing). Both ends send a heartbeat every [`HEARTBEAT`]. The
//! job master gives a worker up after [`HEARTBEAT_TIMEOUT`] of silence; a
//! worker stops its tasks sooner, after [`WORKER_SILENCE_LIMIT`] without
//! its coordinator, so that a worker cut off has stopped writing before
//! the job master restarts its tasks elsewhere (a lease).

use crate::error::{Result, RuntimeError};
use crate::task::{Control, TaskEvent};
use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sluice_core::CheckpointMetadata;
use std::net::SocketAddr;
use std::time::Duration;
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::codec::{FramedRead, FramedWrite, LengthDelimitedCodec};

/// The version of the control protocol; a worker of another version is
/// refused.
pub const CONTROL_VERSION: u16 = 1;

/// How often each end says it is alive.
pub const HEARTBEAT: Duration = Duration::from_secs(1);

/// Silence after which the job master takes a worker for lost.
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(5);

/// Silence after which a worker takes its coordinator for lost and stops
/// its tasks: shorter than [`HEARTBEAT_TIMEOUT`] by two heartbeats.
pub const WORKER_SILENCE_LIMIT: Duration = Duration::from_secs(3);

/// The largest control frame (an acknowledgement, a deployment with the
/// restored checkpoint's metadata).
const MAX_CONTROL_FRAME: usize = 64 << 20;

/// From a worker to the job master.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum ToMaster {
    /// The first message: who the worker is and what job it runs.
    Register {
        version: u16,
        /// The job's name and graph (vertices, parallelism, edges), which
        /// must be the job master's.
        job: String,
        graph: Vec<String>,
        /// Where the worker's channel listener is.
        channels: SocketAddr,
    },
    /// A task's event (acknowledgement, decline, source exhausted).
    Event { attempt: u64, event: TaskEvent },
    /// A task ended: `failure` is `None` when it ended well.
    TaskDone {
        attempt: u64,
        task: usize,
        failure: Option<RemoteFailure>,
    },
    /// Alive; with the bytes the worker's channels sent and the records
    /// its source tasks read so far.
    Heartbeat {
        wire_bytes_sent: u64,
        source_records: u64,
    },
}

/// How a task on a worker failed.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct RemoteFailure {
    /// It saw a channel close (usually a consequence of another failure).
    pub closed_channel: bool,
    pub task: String,
    pub message: String,
}

/// From the job master to a worker.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) enum ToWorker {
    /// Registered as worker `worker`.
    Welcome {
        worker: u32,
    },
    /// Not registered, and why.
    Refuse(String),
    /// Run these tasks of attempt `attempt` (and stop every task of an
    /// earlier one).
    Deploy(Box<Deploy>),
    /// A control message for task `task` of attempt `attempt`.
    Control {
        attempt: u64,
        task: usize,
        control: Control,
    },
    /// Savepoint `id` of attempt `attempt` goes to `location` (a location
    /// string the worker opens: `file:…`, `s3://…`).
    SavepointTarget {
        attempt: u64,
        id: sluice_core::CheckpointId,
        location: String,
    },
    /// Stop every task of attempt `attempt`.
    Cancel {
        attempt: u64,
    },
    Heartbeat,
    /// The job ended: stop, and exit.
    Finished,
}

/// One attempt's tasks on one worker.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Deploy {
    pub attempt: u64,
    pub tasks: Vec<TaskSpec>,
    /// The channel listener of the worker running each subtask:
    /// `hosts[vertex][subtask]`.
    pub hosts: Vec<Vec<SocketAddr>>,
    pub restore: Option<RestoreSpec>,
    /// The job was stopped with the restored savepoint.
    pub stopped: bool,
}

/// A task to run.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub(crate) struct TaskSpec {
    pub index: usize,
    pub vertex: u32,
    pub subtask: u32,
}

/// What the tasks restore: a checkpoint of the job's storage, or the
/// savepoint the job starts from.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct RestoreSpec {
    pub metadata: CheckpointMetadata,
    pub base: String,
    pub location: String,
    /// In the job's checkpoint storage (else: the job's start savepoint).
    pub in_job_storage: bool,
}

pub(crate) fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(MAX_CONTROL_FRAME)
        .new_codec()
}

/// Receives control messages of type `M` from a connection.
pub(crate) struct Inbox {
    reader: FramedRead<OwnedReadHalf, LengthDelimitedCodec>,
    peer: SocketAddr,
    /// When the other end was last heard from: the silence counts from
    /// here, however often `next` is called (and cancelled) meanwhile.
    heard: tokio::time::Instant,
    /// How much silence is tolerated.
    silence: Duration,
}

impl Inbox {
    /// The next message but heartbeats (a first message, say).
    pub async fn next_but<M: DeserializeOwned>(&mut self, heartbeat: impl Fn(&M) -> bool) -> Result<M> {
        loop {
            let m = self.next::<M>().await?;
            if !heartbeat(&m) {
                return Ok(m);
            }
        }
    }

    /// The next message; an error once the connection ended, broke, sent
    /// something undecodable or stayed silent too long.
    pub async fn next<M: DeserializeOwned>(&mut self) -> Result<M> {
        let frame = match tokio::time::timeout_at(self.heard + self.silence, self.reader.next()).await {
            Err(_) => {
                return Err(RuntimeError::Network(format!(
                    "{} sent nothing for {:?} (no heartbeat): taken for lost",
                    self.peer, self.silence
                )))
            }
            Ok(None) => {
                return Err(RuntimeError::Network(format!(
                    "{} closed the connection",
                    self.peer
                )))
            }
            Ok(Some(Err(e))) => {
                return Err(RuntimeError::Network(format!("connection to {}: {e}", self.peer)))
            }
            Ok(Some(Ok(f))) => f,
        };
        self.heard = tokio::time::Instant::now();
        serde_json::from_slice(&frame).map_err(|e| {
            RuntimeError::Network(format!(
                "{} sent an undecodable control message ({e}): is it the same Sluice build?",
                self.peer
            ))
        })
    }
}

/// Sends control messages: a writer task drains the queue (and sends a
/// heartbeat when idle) until the sender is dropped or the connection
/// breaks.
pub(crate) struct Outbox<M> {
    tx: mpsc::UnboundedSender<M>,
}

impl<M> Clone for Outbox<M> {
    fn clone(&self) -> Self {
        Outbox { tx: self.tx.clone() }
    }
}

impl<M: Serialize + Send + 'static> Outbox<M> {
    /// Queues `msg`; false if the connection is gone.
    pub fn send(&self, msg: M) -> bool {
        self.tx.send(msg).is_ok()
    }
}

/// Splits `stream` into an inbox and an outbox whose writer sends
/// `heartbeat()` every [`HEARTBEAT`]. The writer task ends when every
/// outbox is dropped (after flushing) or the connection breaks.
pub(crate) fn open<M: Serialize + Send + Sync + 'static>(
    stream: TcpStream,
    silence: Duration,
    heartbeat: impl Fn() -> M + Send + 'static,
) -> (Inbox, Outbox<M>, tokio::task::JoinHandle<()>) {
    let _ = stream.set_nodelay(true);
    let peer = stream
        .peer_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let (r, w) = stream.into_split();
    let (tx, mut rx) = mpsc::unbounded_channel::<M>();
    let mut writer = FramedWrite::new(w, codec());
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + HEARTBEAT, HEARTBEAT);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let msg = tokio::select! {
                m = rx.recv() => match m {
                    Some(m) => m,
                    None => break,
                },
                _ = tick.tick() => heartbeat(),
            };
            if send_frame(&mut writer, &msg).await.is_err() {
                break;
            }
        }
        let _ = SinkExt::<Bytes>::close(&mut writer).await;
    });
    (
        Inbox {
            reader: FramedRead::new(r, codec()),
            peer,
            heard: tokio::time::Instant::now(),
            silence,
        },
        Outbox { tx },
        task,
    )
}

async fn send_frame<M: Serialize>(
    writer: &mut FramedWrite<OwnedWriteHalf, LengthDelimitedCodec>,
    msg: &M,
) -> std::io::Result<()> {
    let body = serde_json::to_vec(msg).map_err(std::io::Error::other)?;
    writer.send(Bytes::from(body)).await
}
