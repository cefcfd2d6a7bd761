//! Assembling checkpoint and savepoint metadata, and committing it with an
//! honest outcome.
//!
//! A commit is the one write that makes a checkpoint exist. Storage can
//! fail in two ways (Materialize's persist calls them determinate and
//! indeterminate): the write certainly did not happen, or it may have.
//! [`commit`] turns every answer of the storage into one of three outcomes:
//!
//! - **committed**: the write returned `Ok`; or it returned an
//!   indeterminate error or `AlreadyExists` (an SDK retry of our own write
//!   that had landed answers `AlreadyExists`; checkpoint ids are never
//!   reused, so the job never committed this id before) and reading the
//!   object back gives exactly the bytes written;
//! - **failed**: a determinate error; or the read-back finds other bytes
//!   (another writer's: those are not ours to delete);
//! - **unknown**: the read-back failed, or found nothing (a write whose
//!   answer was lost may still be in flight). The checkpoint is then
//!   neither completed nor failed: it is not notified, not restored from,
//!   and its files are not deleted until [`resolve`] (a read-back alone)
//!   decides.

use crate::task::AckPart;
use bytes::Bytes;
use sluice_core::metadata::{OperatorSnapshot, SubtaskSnapshot, METADATA_FORMAT_VERSION};
use sluice_core::{
    ChannelStateHandle, CheckpointBarrier, CheckpointId, CheckpointMetadata, CheckpointStorage,
    CheckpointStorageExt, Error, OperatorUid,
};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use tracing::warn;

/// Where metadata is committed: a checkpoint's (`commit_metadata`) or a
/// savepoint's `_metadata` file (`commit_file`).
#[derive(Debug, Clone)]
pub(crate) struct CommitTarget {
    pub storage: Arc<dyn CheckpointStorage>,
    pub kind: TargetKind,
}

/// The object a [`CommitTarget`] writes.
#[derive(Debug, Clone)]
pub(crate) enum TargetKind {
    /// Checkpoint `id`'s metadata.
    Checkpoint(CheckpointId),
    /// A savepoint's `_metadata` file at this path.
    File(String),
}

impl CommitTarget {
    /// The metadata of checkpoint `id` of `storage`.
    pub fn checkpoint(storage: Arc<dyn CheckpointStorage>, id: CheckpointId) -> Self {
        CommitTarget {
            storage,
            kind: TargetKind::Checkpoint(id),
        }
    }

    /// The file `path` of `storage`.
    pub fn file(storage: Arc<dyn CheckpointStorage>, path: String) -> Self {
        CommitTarget {
            storage,
            kind: TargetKind::File(path),
        }
    }

    /// Where it is, as a user writes it.
    pub fn describe(&self) -> String {
        match &self.kind {
            TargetKind::Checkpoint(id) => self.storage.locate(&format!("{}/_metadata", id.dir())),
            TargetKind::File(path) => self.storage.locate(path),
        }
    }

    async fn write(&self, json: Bytes) -> sluice_core::Result<()> {
        match &self.kind {
            TargetKind::Checkpoint(id) => self.storage.commit_metadata(*id, json).await,
            TargetKind::File(path) => self.storage.commit_file(path, json).await,
        }
    }

    async fn read(&self) -> sluice_core::Result<Bytes> {
        match &self.kind {
            TargetKind::Checkpoint(id) => self.storage.read_metadata(*id).await,
            TargetKind::File(path) => self.storage.read_file(path).await,
        }
    }
}

/// How a commit ended.
#[derive(Debug)]
pub(crate) enum CommitOutcome {
    /// The metadata is durably there, with our bytes.
    Committed,
    /// It is not there (or someone else's is). `discard`: whether the
    /// checkpoint's files may be removed (false when another writer's
    /// metadata sits at the id).
    Failed { reason: String, discard: bool },
    /// Nobody knows yet: keep everything, decide later with [`resolve`].
    Unknown { reason: String },
}

/// Commits `json` at `target` and finds out what happened.
pub(crate) async fn commit(target: &CommitTarget, json: &Bytes) -> CommitOutcome {
    match target.write(json.clone()).await {
        Ok(()) => CommitOutcome::Committed,
        Err(e @ (Error::Indeterminate { .. } | Error::AlreadyExists { .. })) => {
            warn!(
                "the commit of {} answered \"{e}\"; reading it back to find out whether it took effect",
                target.describe()
            );
            match resolve(target, json).await {
                // Not there right after the answer was lost: a write still
                // in flight may yet land. A later read-back decides.
                CommitOutcome::Failed { discard: true, .. } => CommitOutcome::Unknown {
                    reason: format!("{e}; not readable yet"),
                },
                CommitOutcome::Failed { reason, discard } => CommitOutcome::Failed {
                    reason: format!("{e}; {reason}"),
                    discard,
                },
                CommitOutcome::Unknown { reason } => CommitOutcome::Unknown {
                    reason: format!("{e}; {reason}"),
                },
                CommitOutcome::Committed => CommitOutcome::Committed,
            }
        }
        Err(e) => CommitOutcome::Failed {
            reason: e.to_string(),
            discard: true,
        },
    }
}

/// Decides a commit whose outcome is unknown by reading the object back:
/// our bytes — committed; other bytes — failed (not ours to discard);
/// nothing — failed (called some time after the commit, so a write in
/// flight would have landed); a read error — still unknown.
pub(crate) async fn resolve(target: &CommitTarget, json: &Bytes) -> CommitOutcome {
    match target.read().await {
        Ok(b) if b == *json => CommitOutcome::Committed,
        Ok(_) => CommitOutcome::Failed {
            reason: format!(
                "{} holds other metadata than this job wrote (does another job write to the same place?)",
                target.describe()
            ),
            discard: false,
        },
        Err(Error::NotFound { .. }) => CommitOutcome::Failed {
            reason: format!(
                "{} is not there: the commit did not take effect",
                target.describe()
            ),
            discard: true,
        },
        Err(e) => CommitOutcome::Unknown {
            reason: format!("reading {} back failed: {e}", target.describe()),
        },
    }
}

/// Assembles a checkpoint's (or savepoint's) metadata from the tasks'
/// acknowledgements: one entry per operator uid with its subtasks in order,
/// its key type, states and source splits, and the channel state. A keyed
/// subtask that wrote the changes since `base` (an incremental checkpoint)
/// gets `base`'s chain for that subtask with its changes file at the end.
/// An error (the checkpoint fails) when a chain cannot be extended.
pub(crate) fn assemble_metadata(
    job: &str,
    max_parallelism: u32,
    barrier: &CheckpointBarrier,
    duration: Duration,
    parts: impl IntoIterator<Item = AckPart>,
    channel_state: Vec<ChannelStateHandle>,
    base: Option<&CheckpointMetadata>,
) -> std::result::Result<CheckpointMetadata, String> {
    let mut ops: BTreeMap<OperatorUid, OperatorSnapshot> = BTreeMap::new();
    for part in parts {
        let op = ops.entry(part.uid.clone()).or_insert_with(|| OperatorSnapshot {
            uid: part.uid.clone(),
            parallelism: part.parallelism,
            key_type: None,
            states: Vec::new(),
            source_splits: None,
            subtasks: Vec::new(),
        });
        op.key_type = op.key_type.take().or(part.key_type);
        op.source_splits = op.source_splits.or(part.source_splits);
        if op.states.is_empty() {
            op.states = part.states;
        }
        let mut snapshot = part.snapshot;
        if let Some(b) = part.changes_base {
            snapshot = extend_chain(base, b, &part.uid, part.parallelism, snapshot)?;
        }
        op.subtasks.push(snapshot);
    }
    for op in ops.values_mut() {
        op.subtasks.sort_by_key(|s| s.subtask);
    }
    let incremental = ops
        .values()
        .flat_map(|o| &o.subtasks)
        .any(|s| !s.keyed_changes.is_empty());
    Ok(CheckpointMetadata {
        format_version: METADATA_FORMAT_VERSION,
        sluice_version: sluice_core::SLUICE_VERSION.to_string(),
        snapshot_format_version: match incremental {
            true => sluice_core::format::CHANGES_FORMAT_VERSION,
            false => sluice_core::format::SNAPSHOT_FORMAT_VERSION,
        },
        job_name: job.to_string(),
        checkpoint_id: barrier.checkpoint_id,
        kind: barrier.kind,
        trigger_time_ms: barrier.timestamp_ms,
        duration_ms: duration.as_millis() as u64,
        max_parallelism,
        operators: ops.into_values().collect(),
        channel_state,
    })
}

/// `snapshot`'s keyed state file holds the changes since checkpoint
/// `base_id`: the subtask's chain becomes `base_id`'s chain plus that file.
fn extend_chain(
    base: Option<&CheckpointMetadata>,
    base_id: CheckpointId,
    uid: &OperatorUid,
    parallelism: u32,
    mut snapshot: SubtaskSnapshot,
) -> std::result::Result<SubtaskSnapshot, String> {
    let subtask = snapshot.subtask;
    let fail = |why: String| {
        format!("operator {uid} subtask {subtask} wrote the changes since checkpoint {base_id}, but {why}")
    };
    let base = base
        .filter(|m| m.checkpoint_id == base_id)
        .ok_or_else(|| fail("that checkpoint's metadata is not known".into()))?;
    let op = base
        .operator(uid)
        .filter(|o| o.parallelism == parallelism)
        .ok_or_else(|| fail("it has no such operator at this parallelism".into()))?;
    let prev = op
        .subtasks
        .iter()
        .find(|s| s.subtask == subtask)
        .ok_or_else(|| fail("it has no such subtask".into()))?;
    let (Some(prev_base), Some(changes)) = (&prev.keyed_state, snapshot.keyed_state.take()) else {
        return Err(fail("one of them has no keyed state".into()));
    };
    if prev_base.key_groups != changes.key_groups {
        return Err(fail(format!(
            "its key groups {} differ from the chain's {}",
            changes.key_groups, prev_base.key_groups
        )));
    }
    snapshot.keyed_state = Some(prev_base.clone());
    snapshot.keyed_changes = prev.keyed_changes.clone();
    snapshot.keyed_changes.push(changes);
    Ok(snapshot)
}
