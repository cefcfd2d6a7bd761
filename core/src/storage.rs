//! The checkpoint storage trait: where snapshots go, durably.

use crate::ids::CheckpointId;
use crate::Result;
use bytes::Bytes;
use std::fmt::Debug;
use std::ops::Range;

/// One checkpoint found in storage by [`CheckpointStorage::list`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CheckpointListing {
    /// The checkpoint's id.
    pub id: CheckpointId,
    /// Whether its metadata is committed. An uncommitted checkpoint does not
    /// exist for recovery; its files are left-overs of an aborted attempt.
    pub committed: bool,
}

/// Durable storage of checkpoints (memory, a redb file, S3, …).
///
/// Paths are relative, `/`-separated, and start with the checkpoint's
/// directory [`CheckpointId::dir`] (`chk-<id>/…`).
///
/// The rule of atomic commit: a checkpoint exists if and only if its metadata
/// exists. [`commit_metadata`](Self::commit_metadata) is the last write of a
/// checkpoint and is create-if-absent.
#[async_trait::async_trait]
pub trait CheckpointStorage: Send + Sync + Debug {
    /// A human description for logs, e.g. `memory` or `redb:/data/chk.redb`.
    fn describe(&self) -> String;

    /// Writes a state file. Fails with [`crate::Error::AlreadyExists`] if the
    /// path exists (files are never overwritten).
    async fn write_file(&self, path: &str, data: Bytes) -> Result<()>;

    /// Reads a whole file.
    async fn read_file(&self, path: &str) -> Result<Bytes>;

    /// Reads the byte range `range` of a file. A range past the end is
    /// [`crate::Error::Corrupt`] (the file is shorter than its index says).
    async fn read_range(&self, path: &str, range: Range<u64>) -> Result<Bytes>;

    /// Atomically commits checkpoint `id`'s metadata, create-if-absent. After
    /// it returns `Ok`, the checkpoint exists durably; before, it does not.
    /// Fails with [`crate::Error::AlreadyExists`] if the metadata exists.
    async fn commit_metadata(&self, id: CheckpointId, metadata: Bytes) -> Result<()>;

    /// Reads a committed checkpoint's metadata ([`crate::Error::NotFound`] if
    /// not committed).
    async fn read_metadata(&self, id: CheckpointId) -> Result<Bytes>;

    /// Lists every checkpoint that has metadata or files, in ascending id.
    async fn list(&self) -> Result<Vec<CheckpointListing>>;

    /// Deletes a checkpoint: its metadata first (so it stops existing), then
    /// its files. Also used to clean up an uncommitted attempt. Discarding a
    /// checkpoint that is not there is not an error.
    async fn discard(&self, id: CheckpointId) -> Result<()>;
}

/// Checks that a path is a relative state-file path inside a checkpoint
/// directory: no empty, `.` or `..` segments, no leading `/`.
pub fn validate_path(path: &str) -> Result<()> {
    let bad = path.is_empty()
        || path.starts_with('/')
        || path.contains('\\')
        || path.split('/').any(|s| s.is_empty() || s == "." || s == "..");
    if bad {
        return Err(crate::Error::InvalidArgument {
            what: format!("storage path {path:?}"),
            reason: "must be relative, '/'-separated, without empty, '.' or '..' segments".into(),
        });
    }
    Ok(())
}

/// The checkpoint a path belongs to, from its first segment `chk-<id>`.
pub fn checkpoint_of_path(path: &str) -> Option<CheckpointId> {
    let first = path.split('/').next()?;
    first.strip_prefix("chk-")?.parse().ok().map(CheckpointId)
}

/// The highest committed checkpoint, if any.
pub async fn latest_completed(storage: &dyn CheckpointStorage) -> Result<Option<CheckpointId>> {
    Ok(storage
        .list()
        .await?
        .into_iter()
        .filter(|c| c.committed)
        .map(|c| c.id)
        .max())
}
