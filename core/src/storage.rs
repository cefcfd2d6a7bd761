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

/// A file found by [`CheckpointStorage::list_files`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileListing {
    /// The file's path, relative to the storage root.
    pub path: String,
    /// Its size in bytes.
    pub size: u64,
}

/// Durable storage of checkpoints and savepoints (memory, a redb file, S3, …).
///
/// Paths are relative and `/`-separated ([`validate_path`]). A checkpoint's
/// files live in its directory [`CheckpointId::dir`] (`chk-<id>/…`); a
/// savepoint is a self-contained directory of any other name holding its
/// state files and a `_metadata` file.
///
/// The rule of atomic commit: a checkpoint exists if and only if its metadata
/// exists. [`commit_metadata`](Self::commit_metadata) is the last write of a
/// checkpoint and is create-if-absent; [`commit_file`](Self::commit_file)
/// of `<dir>/_metadata` is the last write of a savepoint.
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

    /// Writes a file durably and create-if-absent: after it returns `Ok` the
    /// file survives a crash or power loss (together with every file written
    /// before it), before it the file does not exist. A savepoint's
    /// `_metadata` is written with it, last. Fails with
    /// [`crate::Error::AlreadyExists`] if the path exists.
    async fn commit_file(&self, path: &str, data: Bytes) -> Result<()>;

    /// Lists the files under directory `dir` (every path that starts with
    /// `dir/`, at any depth; every file if `dir` is empty), sorted by path.
    /// Checkpoint metadata committed with
    /// [`commit_metadata`](Self::commit_metadata) need not be listed.
    async fn list_files(&self, dir: &str) -> Result<Vec<FileListing>>;

    /// Deletes every file under directory `dir`, `dir/_metadata` first (so a
    /// savepoint stops existing before its state files go). Used to remove an
    /// aborted savepoint, or one the user disposes of. A missing directory is
    /// not an error; an empty `dir` is refused.
    async fn delete_dir(&self, dir: &str) -> Result<()>;

    /// The address of directory `dir` of this storage as a user would write
    /// it, e.g. `redb:/data/sp.redb#savepoint-7-1a2b3c` or
    /// `s3://bucket/prefix/savepoint-7-1a2b3c`. The default is
    /// `<describe()>#<dir>`.
    fn locate(&self, dir: &str) -> String {
        if dir.is_empty() {
            self.describe()
        } else {
            format!("{}#{dir}", self.describe())
        }
    }
}

/// Checks a directory argument of [`CheckpointStorage::delete_dir`] and
/// [`CheckpointStorage::list_files`]: empty (`allow_empty`) or a valid path.
pub fn validate_dir(dir: &str, allow_empty: bool) -> Result<()> {
    if dir.is_empty() {
        if allow_empty {
            return Ok(());
        }
        return Err(crate::Error::InvalidArgument {
            what: "directory \"\"".into(),
            reason: "an empty directory would name the whole storage; name a directory".into(),
        });
    }
    validate_path(dir)
}

/// `dir/` (or `""` for the root): the prefix of every path under `dir`.
pub fn dir_prefix(dir: &str) -> String {
    if dir.is_empty() {
        String::new()
    } else {
        format!("{dir}/")
    }
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
