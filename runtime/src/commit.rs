//! Committing checkpoint and savepoint metadata with an honest outcome.
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

use bytes::Bytes;
use sluice_core::CheckpointStorageExt;
use sluice_core::{CheckpointId, CheckpointStorage, Error};
use std::sync::Arc;
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
