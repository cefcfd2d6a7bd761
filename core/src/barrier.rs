//! The checkpoint barrier that flows in-band with the records.

use crate::ids::{CheckpointId, CheckpointKind};
use serde::{Deserialize, Serialize};

/// How tasks treat barriers of a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
#[non_exhaustive]
pub enum Alignment {
    /// Exactly-once: an input whose barrier has arrived is not read until the
    /// barrier has arrived on every input.
    Aligned,
    /// At-least-once: no input is blocked; the task snapshots when the last
    /// barrier arrives. Records after the barrier on a fast input may be in
    /// the snapshot and are replayed after a failure (duplicates).
    AtLeastOnce,
    /// Exactly-once without blocking: the first barrier to reach a task
    /// makes it snapshot at once and forward the barrier ahead of the
    /// records queued for its outputs; the records the barrier overtook (on
    /// the task's inputs, and in its output queue) are stored with the
    /// checkpoint as channel state and replayed on restore.
    Unaligned,
    /// Exactly-once, starting aligned: a task whose alignment takes longer
    /// than its configured timeout switches to unaligned for this checkpoint
    /// (Flink's aligned checkpoint timeout). Savepoints and final
    /// checkpoints are plain [`Alignment::Aligned`]: they never switch.
    AlignedWithTimeout,
}

/// A checkpoint barrier: splits every stream into "before checkpoint n" and
/// "after checkpoint n".
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointBarrier {
    /// The checkpoint this barrier belongs to.
    pub checkpoint_id: CheckpointId,
    /// Trigger time at the coordinator, milliseconds since the Unix epoch.
    pub timestamp_ms: u64,
    /// Checkpoint or savepoint.
    pub kind: CheckpointKind,
    /// How tasks align on this barrier.
    pub alignment: Alignment,
    /// Incremental checkpoints: the completed checkpoint this one's changes
    /// are relative to (chosen by the coordinator, which keeps its files
    /// while this checkpoint is in flight). `None`: a full snapshot (always
    /// for savepoints).
    #[serde(default)]
    pub base: Option<CheckpointId>,
}
