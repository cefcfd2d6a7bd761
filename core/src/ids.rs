//! Identifiers: checkpoints, operators, subtasks, checkpoint kinds.

use serde::{Deserialize, Serialize};
use std::fmt;

/// A checkpoint's id: strictly increasing within a job and never reused, also
/// across restarts (numbering continues after the highest id in storage).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct CheckpointId(pub u64);

impl CheckpointId {
    /// The id that follows this one.
    pub fn next(self) -> CheckpointId {
        CheckpointId(self.0 + 1)
    }

    /// The directory (key prefix) under which this checkpoint's files live:
    /// `chk-<id>`.
    pub fn dir(self) -> String {
        format!("chk-{}", self.0)
    }
}

impl fmt::Display for CheckpointId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// The stable id a user gives every stateful operator. It maps state to
/// operators across job versions (Flink's `uid`).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct OperatorUid(pub String);

impl OperatorUid {
    /// Creates a uid. Uids are used in file names, so only ASCII letters,
    /// digits, `-`, `_` and `.` are accepted (and not `.` or `..` alone).
    pub fn new(uid: impl Into<String>) -> crate::Result<Self> {
        let uid = uid.into();
        let ok = !uid.is_empty()
            && uid != "."
            && uid != ".."
            && uid.len() <= 128
            && uid
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
        if ok {
            Ok(OperatorUid(uid))
        } else {
            Err(crate::Error::InvalidArgument {
                what: format!("operator uid {uid:?}"),
                reason: "use 1 to 128 ASCII letters, digits, '-', '_' or '.'".into(),
            })
        }
    }

    /// The uid as a string.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for OperatorUid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Whether a snapshot is a periodic checkpoint or a user-triggered savepoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CheckpointKind {
    /// Triggered by the coordinator's timer (or on request); retained copies
    /// are discarded automatically.
    Checkpoint,
    /// Triggered by a user; never created or deleted automatically.
    Savepoint,
}

impl fmt::Display for CheckpointKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            CheckpointKind::Checkpoint => "checkpoint",
            CheckpointKind::Savepoint => "savepoint",
        })
    }
}
