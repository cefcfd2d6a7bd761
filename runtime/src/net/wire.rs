//! The wire format of a network channel (version [`WIRE_VERSION`]).
//!
//! A TCP connection carries one channel. Every frame is a 4-byte big-endian
//! length followed by that many bytes (`tokio_util`'s length-delimited
//! codec), at most [`MAX_FRAME_BYTES`].
//!
//! - The producer opens the connection and sends the hello frame: the magic
//!   bytes `SLCH`, the wire version (`u16`, big-endian), then the
//!   [`ChannelId`] in postcard.
//! - The consumer answers with a `ConsumerFrame`: `Accept` or `Reject`
//!   (with the reason), then only `Credit` frames.
//! - The producer then sends `ProducerFrame`s in postcard: batches,
//!   barriers in place and end of input each take one credit; priority
//!   barriers (unaligned checkpoints) take none.

use crate::channel::Message;
use crate::error::{Result, RuntimeError};
use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sluice_core::CheckpointBarrier;
use std::fmt;

/// The version of the wire format this build speaks. Both ends of a
/// channel must speak the same one: run the same build on every worker.
pub const WIRE_VERSION: u16 = 1;

/// The largest frame accepted (a batch of records, encoded).
pub const MAX_FRAME_BYTES: usize = 64 << 20;

/// The first bytes of every hello frame.
const MAGIC: &[u8; 4] = b"SLCH";

/// Which channel a connection carries: the attempt of the job (channels of
/// a superseded attempt are refused), the edge of the job graph, and the
/// upstream and downstream subtasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChannelId {
    /// The job attempt the channel belongs to.
    pub attempt: u64,
    /// The edge's index in the job graph.
    pub edge: u32,
    /// The upstream subtask.
    pub from: u32,
    /// The downstream subtask.
    pub to: u32,
}

impl fmt::Display for ChannelId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "attempt {} edge {} subtask {} -> {}",
            self.attempt, self.edge, self.from, self.to
        )
    }
}

/// What the consumer sends.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) enum ConsumerFrame {
    /// The channel is expected: data may follow once credit is granted.
    Accept,
    /// The channel is not expected (a superseded attempt, an unknown
    /// channel, a channel already connected).
    Reject(String),
    /// The producer may send this many more credited frames.
    Credit(u32),
}

/// What the producer sends, borrowed for encoding (the same layout as
/// [`ProducerFrame`]).
#[derive(Serialize)]
enum ProducerFrameRef<'a, T> {
    Batch(&'a [T]),
    Barrier(&'a CheckpointBarrier),
    EndOfInput,
    Priority(&'a CheckpointBarrier),
}

/// What the producer sends, decoded.
#[derive(Deserialize)]
enum ProducerFrame<T> {
    Batch(Vec<T>),
    Barrier(CheckpointBarrier),
    EndOfInput,
    Priority(CheckpointBarrier),
}

fn codec_error(what: impl fmt::Display, e: postcard::Error) -> RuntimeError {
    RuntimeError::Network(format!(
        "{what}: cannot decode a frame ({e}); both ends must run the same job build"
    ))
}

/// The hello frame of channel `id`.
pub(crate) fn encode_hello(id: &ChannelId) -> Bytes {
    let mut out = Vec::with_capacity(32);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&WIRE_VERSION.to_be_bytes());
    // Encoding plain integers into a Vec cannot fail.
    let out = postcard::to_extend(id, out).unwrap_or_default();
    Bytes::from(out)
}

/// Decodes a hello frame from `peer`.
pub(crate) fn decode_hello(frame: &[u8], peer: impl fmt::Display) -> Result<ChannelId> {
    if frame.len() < 6 || &frame[..4] != MAGIC {
        return Err(RuntimeError::Network(format!(
            "connection from {peer} is not a Sluice channel (no SLCH hello); is something else connecting to \
             the worker's channel port?"
        )));
    }
    let version = u16::from_be_bytes([frame[4], frame[5]]);
    if version != WIRE_VERSION {
        return Err(RuntimeError::Network(format!(
            "connection from {peer} speaks wire version {version}, this build speaks {WIRE_VERSION}: run the \
             same Sluice build on every worker"
        )));
    }
    postcard::from_bytes(&frame[6..]).map_err(|e| codec_error(format_args!("hello from {peer}"), e))
}

pub(crate) fn encode_consumer(frame: &ConsumerFrame) -> Bytes {
    // Encoding a string or an integer into a Vec cannot fail.
    Bytes::from(postcard::to_stdvec(frame).unwrap_or_default())
}

pub(crate) fn decode_consumer(frame: &[u8], id: &ChannelId) -> Result<ConsumerFrame> {
    postcard::from_bytes(frame).map_err(|e| codec_error(format_args!("channel {id}"), e))
}

/// Encodes a data message (or, with `priority`, a priority barrier).
pub(crate) fn encode_message<T: Serialize>(msg: &Message<T>, id: &ChannelId) -> Result<Bytes> {
    let frame = match msg {
        Message::Batch(b) => ProducerFrameRef::Batch(b),
        Message::Barrier(b) => ProducerFrameRef::Barrier(b),
        Message::EndOfInput => ProducerFrameRef::EndOfInput,
        Message::Priority(b) => ProducerFrameRef::Priority(b),
    };
    let bytes = postcard::to_stdvec(&frame).map_err(|e| RuntimeError::Codec {
        what: format!("a batch on channel {id}"),
        reason: e.to_string(),
    })?;
    if bytes.len() > MAX_FRAME_BYTES {
        return Err(RuntimeError::Network(format!(
            "channel {id}: a batch encodes to {} bytes, more than a frame may hold ({MAX_FRAME_BYTES}); \
             records this large should be stored elsewhere and referenced",
            bytes.len()
        )));
    }
    Ok(Bytes::from(bytes))
}

pub(crate) fn decode_message<T: DeserializeOwned>(frame: &[u8], id: &ChannelId) -> Result<Message<T>> {
    let frame: ProducerFrame<T> =
        postcard::from_bytes(frame).map_err(|e| codec_error(format_args!("channel {id}"), e))?;
    Ok(match frame {
        ProducerFrame::Batch(b) => Message::Batch(b),
        ProducerFrame::Barrier(b) => Message::Barrier(b),
        ProducerFrame::EndOfInput => Message::EndOfInput,
        ProducerFrame::Priority(b) => Message::Priority(b),
    })
}
