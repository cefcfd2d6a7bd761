//! The asynchronous part of a snapshot (Flink's `AsyncCheckpointRunnable`):
//! after a task's synchronous snapshot, a tokio task encodes each keyed
//! state view in the canonical format (on the blocking pool), writes the
//! state files and the channel-state file (to `chk-<id>/` or the
//! savepoint's directory), and acknowledges to the job master with the
//! file handles — or declines with the error.

use super::{AckPart, TaskEvent, TaskRuntime};
use crate::barriers::handler::AlignedCheckpoint;
use crate::error::Result;
use crate::operator::{KeyedSnapshot, Operator, SnapshotParts, SourcePart};
use serde::Serialize;
use sluice_core::format::EncodedParts;
use sluice_core::metadata::SubtaskSnapshot;
use sluice_core::{ChannelStateHandle, CheckpointKind, CheckpointStorage};
use std::time::{Duration, Instant};
use tokio::sync::oneshot;

impl TaskRuntime {
    /// Runs the synchronous part of a snapshot on `chain` and spawns the
    /// asynchronous part, which writes the state files and acknowledges.
    pub(crate) fn snapshot<T: Serialize + Send + 'static>(
        &self,
        chain: &mut dyn Operator<T>,
        done: AlignedCheckpoint,
        source: Option<SourcePart>,
        channel_state: Option<oneshot::Receiver<Vec<T>>>,
    ) -> Result<()> {
        let started = Instant::now();
        // Trigger to first barrier: the time to the snapshot less the
        // alignment (wall clocks: the trigger time came with the barrier).
        let since_trigger = crate::master::now_ms().saturating_sub(done.barrier.timestamp_ms);
        let start_delay = Duration::from_millis(since_trigger).saturating_sub(done.alignment);
        self.task_metrics.checkpointed(start_delay, done.alignment);
        let mut parts = SnapshotParts::default();
        parts.splits.extend(source);
        chain.snapshot(&done.barrier, &mut parts)?;
        let output_state = parts.output_state.take();
        // The keyed states' encoders start now, on the blocking pool, not
        // when the writer below is first polled: that waits for a worker,
        // and the task loops sharing the workers may keep them busy for
        // tens of milliseconds (measured: 20–45 ms of a 1 M-key checkpoint
        // at full speed).
        let keyed: Vec<Started> = std::mem::take(&mut parts.keyed)
            .into_iter()
            .map(Started::new)
            .collect();
        let sync = started.elapsed();
        // The asynchronous part runs from here: the encoders have started.
        let async_started = Instant::now();
        let id = done.barrier.checkpoint_id;
        // Checkpoint files go to `chk-<id>/` of the job's storage, with paths
        // relative to the storage; savepoint files to the savepoint's own
        // directory, with paths relative to it.
        let target = match done.barrier.kind {
            CheckpointKind::Checkpoint => None,
            CheckpointKind::Savepoint => Some(self.savepoints.clone()),
        };
        let storage = self.init.storage.clone();
        let events = self.events.clone();
        let task = self.index;
        let parallelism = self.init.parallelism;
        let (vertex, vertex_name, subtask) = (self.vertex, self.vertex_name.clone(), self.init.subtask);
        let task_uid = self.init.task_uid.clone();
        let handle = tokio::spawn(async move {
            let result: sluice_core::Result<(Vec<AckPart>, Option<ChannelStateHandle>)> = async {
                let target = match target {
                    None => None,
                    Some(targets) => Some(targets.get(id).await),
                };
                let (storage, dir) = match target {
                    None => (storage, None),
                    Some(Some(loc)) => (loc.storage.clone(), Some(loc)),
                    Some(None) => {
                        return Err(sluice_core::Error::not_found(format!(
                            "the target directory of savepoint {id} (it was aborted)"
                        )))
                    }
                };
                let mut acks: Vec<AckPart> = Vec::new();
                for p in parts.splits {
                    acks.push(AckPart {
                        uid: p.uid,
                        parallelism,
                        snapshot: SubtaskSnapshot {
                            subtask: p.subtask,
                            keyed_state: None,
                            keyed_changes: Vec::new(),
                            splits: p.positions,
                            operator_state: None,
                        },
                        key_type: None,
                        states: Vec::new(),
                        source_splits: Some(p.num_splits),
                        changes_base: None,
                    });
                }
                for o in parts.operator_state {
                    acks.push(AckPart {
                        uid: o.uid,
                        parallelism,
                        snapshot: SubtaskSnapshot {
                            subtask: o.subtask,
                            keyed_state: None,
                            keyed_changes: Vec::new(),
                            splits: Vec::new(),
                            operator_state: Some(o.state),
                        },
                        key_type: None,
                        states: Vec::new(),
                        source_splits: None,
                        changes_base: None,
                    });
                }
                for k in keyed {
                    let (full, changes_base) = (k.full, k.changes_base);
                    let name = format!("{}-{}.kst", k.uid, k.subtask);
                    let (path, write_path) = match &dir {
                        None => {
                            let p = format!("{}/{name}", id.dir());
                            (p.clone(), p)
                        }
                        Some(loc) => (name.clone(), loc.join(&name)),
                    };
                    let encoded = write_in_parts(storage.as_ref(), &write_path, k.encoding).await?;
                    let size = encoded.size;
                    if let Some(chain) = &k.chain {
                        chain.written(full, size);
                    }
                    acks.push(AckPart {
                        uid: k.uid,
                        parallelism,
                        snapshot: SubtaskSnapshot {
                            subtask: k.subtask,
                            keyed_state: Some(encoded.handle(path)),
                            keyed_changes: Vec::new(),
                            splits: Vec::new(),
                            operator_state: None,
                        },
                        key_type: Some(k.key_type),
                        states: k.states,
                        source_splits: None,
                        changes_base,
                    });
                }
                // An unaligned checkpoint: the records its barrier overtook,
                // on the inputs (once every input delivered it in place) and
                // in the output queue.
                let mut channel = None;
                let input: Vec<T> = match channel_state {
                    Some(rx) => rx.await.map_err(|_| {
                        sluice_core::Error::storage(
                            format!("channel state of checkpoint {id}"),
                            "the checkpoint was aborted on this task before its channel state was complete",
                        )
                    })?,
                    None => Vec::new(),
                };
                if !input.is_empty() || output_state.is_some() {
                    let path = format!("{}/channel-{vertex}-{subtask}.cst", id.dir());
                    let (bytes, input_records, output_records) = tokio::task::spawn_blocking(move || {
                        let (out, out_count) = match output_state {
                            Some(encode) => encode()?,
                            None => (sluice_core::channel_state::encode_output::<()>(&[])?, 0),
                        };
                        let bytes = sluice_core::channel_state::encode(&input, &out)?;
                        Ok::<_, sluice_core::Error>((bytes, input.len() as u64, out_count))
                    })
                    .await
                    .map_err(|e| sluice_core::Error::storage("channel state encoder", e.to_string()))??;
                    let (size, crc32) = (bytes.len() as u64, crc32fast::hash(&bytes));
                    storage.write_file(&path, bytes).await?;
                    channel = Some(ChannelStateHandle {
                        task_uid: task_uid.to_string(),
                        task_name: vertex_name.to_string(),
                        subtask,
                        parallelism,
                        path,
                        size,
                        crc32,
                        input_records,
                        output_records,
                    });
                }
                Ok((acks, channel))
            }
            .await;
            let event = match result {
                Ok((parts, channel_state)) => TaskEvent::Ack {
                    checkpoint: id,
                    task,
                    parts,
                    channel_state,
                    alignment: done.alignment,
                    start_delay,
                    sync,
                    async_part: async_started.elapsed(),
                },
                Err(e) => TaskEvent::Decline {
                    checkpoint: id,
                    task,
                    reason: e.to_string(),
                },
            };
            let _ = events.send(event);
        });
        let mut writers = self.writers.lock().unwrap_or_else(|p| p.into_inner());
        writers.retain(|h| !h.is_finished());
        writers.push(handle);
        Ok(())
    }
}

/// Bytes of the parts a state file is encoded and written in: memory holds
/// about three of them per snapshot being written, however large the state.
const PART_BYTES: usize = 8 << 20;

/// A keyed part whose encoder is running.
struct Started {
    uid: sluice_core::OperatorUid,
    subtask: u32,
    key_type: String,
    states: Vec<sluice_core::metadata::StateDescriptor>,
    chain: Option<std::sync::Arc<crate::keyed::ChainSizes>>,
    full: bool,
    changes_base: Option<sluice_core::CheckpointId>,
    encoding: Encoding,
}

impl Started {
    fn new(k: crate::operator::KeyedPart) -> Self {
        let (full, changes_base) = match &k.snapshot {
            KeyedSnapshot::Full(_) => (true, None),
            KeyedSnapshot::Changes { base, .. } => (false, Some(*base)),
        };
        Started {
            uid: k.uid,
            subtask: k.subtask,
            key_type: k.key_type,
            states: k.states,
            chain: k.chain,
            full,
            changes_base,
            encoding: Encoding::start(k.snapshot),
        }
    }
}

/// An encoder on the blocking pool and the parts it hands on.
struct Encoding {
    parts: tokio::sync::mpsc::Receiver<bytes::Bytes>,
    encoder: tokio::task::JoinHandle<sluice_core::Result<EncodedParts>>,
}

impl Encoding {
    /// Starts encoding `snapshot` on the blocking pool; it waits for its
    /// parts to be taken (two at a time), so memory stays bounded however
    /// large the state. Dropping the encoding stops the encoder at its
    /// next part.
    fn start(snapshot: KeyedSnapshot) -> Self {
        let (tx, parts) = tokio::sync::mpsc::channel::<bytes::Bytes>(1);
        let encoder = tokio::task::spawn_blocking(move || {
            let mut emit = |part: bytes::Bytes| {
                tx.blocking_send(part).map_err(|_| {
                    sluice_core::Error::storage("snapshot encoder", "the writer of the state file stopped")
                })
            };
            match snapshot {
                KeyedSnapshot::Full(s) => {
                    sluice_core::format::encode_snapshot_in_parts(s.as_ref(), PART_BYTES, &mut emit)
                }
                KeyedSnapshot::Changes { changes, .. } => {
                    sluice_core::format::encode_changes_in_parts(changes.as_ref(), PART_BYTES, &mut emit)
                }
            }
        });
        Encoding { parts, encoder }
    }
}

/// Writes what `encoding` produces to `path` part by part (a storage that
/// cannot write in parts collects them): a large state is never held whole
/// in memory.
async fn write_in_parts(
    storage: &dyn CheckpointStorage,
    path: &str,
    encoding: Encoding,
) -> sluice_core::Result<EncodedParts> {
    let Encoding {
        parts: mut rx,
        encoder,
    } = encoding;
    let mut upload = storage.upload(path).await?;
    let mut written = Ok(());
    while let Some(part) = rx.recv().await {
        written = upload.put(part).await;
        if written.is_err() {
            // The encoder stops at its next part; the upload is dropped.
            break;
        }
    }
    drop(rx);
    let encoded = encoder
        .await
        .map_err(|e| sluice_core::Error::storage("snapshot encoder", e.to_string()))?;
    written?;
    let encoded = encoded?;
    upload.complete().await?;
    Ok(encoded)
}
