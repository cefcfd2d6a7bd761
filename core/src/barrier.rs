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
}
