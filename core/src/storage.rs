//! The checkpoint storage trait: where snapshots go, durably.

use crate::ids::CheckpointId;
use crate::Result;
use bytes::Bytes;
use std::fmt::Debug;
use std::ops::Range;

/// One checkpoint found in storage by [`CheckpointStorageExt::list`].
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

/// What a storage guarantees beyond the contract every storage meets,
/// declared by [`CheckpointStorage::capabilities`] and checked by the
/// conformance suite.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// Create-if-absent writes are atomic against concurrent writers: of two
    /// commits of one path at the same time exactly one wins and the other
    /// gets [`crate::Error::AlreadyExists`]. (A store that checks before it
    /// writes is correct with one writer per directory only.)
    pub atomic_create: bool,
    /// What [`CheckpointStorage::commit_file`] committed survives the
    /// process (and a reopen of the storage): false for in-memory stores.
    pub durable: bool,
}

impl Default for Capabilities {
    fn default() -> Self {
        Capabilities {
            atomic_create: true,
            durable: true,
        }
    }
}

/// Durable storage of checkpoints and savepoints (memory, a redb file, a
/// directory, S3, …): the contract a storage plugin implements.
///
/// Paths are relative and `/`-separated ([`validate_path`]). A checkpoint is
/// the directory [`CheckpointId::dir`] (`chk-<id>/`) holding its state files
/// and its metadata `chk-<id>/_metadata`; a savepoint is a self-contained
/// directory of any other name holding its state files and a `_metadata`
/// file.
///
/// Seven methods carry the contract: [`describe`](Self::describe),
/// [`write_file`](Self::write_file), [`commit_file`](Self::commit_file),
/// [`read`](Self::read), [`list_files`](Self::list_files),
/// [`delete_file`](Self::delete_file) and [`delete_dir`](Self::delete_dir). Whole and ranged reads, and every
/// checkpoint-level operation (commit and read metadata, list checkpoints,
/// discard), are built on them in [`CheckpointStorageExt`], implemented
/// once for every storage.
///
/// The rule of atomic commit: a checkpoint (or savepoint) exists if and only
/// if its `_metadata` exists, and `_metadata` is its last write, made with
/// [`commit_file`](Self::commit_file).
#[async_trait::async_trait]
pub trait CheckpointStorage: Send + Sync + Debug {
    /// A human description for logs, e.g. `memory` or `redb:/data/chk.redb`.
    fn describe(&self) -> String;

    /// Writes a state file. Fails with [`crate::Error::AlreadyExists`] if the
    /// path exists (files are never overwritten). Need not be durable until
    /// a later [`commit_file`](Self::commit_file).
    async fn write_file(&self, path: &str, data: Bytes) -> Result<()>;

    /// Writes a file durably and create-if-absent: after it returns `Ok` the
    /// file survives a crash or power loss (together with every file written
    /// before it), before it the file does not exist. A checkpoint's or
    /// savepoint's `_metadata` is written with it, last. Fails with
    /// [`crate::Error::AlreadyExists`] if the path exists.
    async fn commit_file(&self, path: &str, data: Bytes) -> Result<()>;

    /// Reads a file: all of it (`range` `None`), or the byte range `range`.
    /// A missing file is [`crate::Error::NotFound`]; a range past the end is
    /// [`crate::Error::Corrupt`] (the file is shorter than its index says).
    async fn read(&self, path: &str, range: Option<Range<u64>>) -> Result<Bytes>;

    /// Lists the files under directory `dir` (every path that starts with
    /// `dir/`, at any depth; every file if `dir` is empty), sorted by path,
    /// with their sizes.
    async fn list_files(&self, dir: &str) -> Result<Vec<FileListing>>;

    /// Deletes one file (a shared state file no retained checkpoint
    /// references any more, or a checkpoint's `_metadata` before its other
    /// files). A missing file is not an error.
    async fn delete_file(&self, path: &str) -> Result<()>;

    /// Deletes every file under directory `dir`, `dir/_metadata` first (so a
    /// checkpoint or savepoint stops existing before its state files go). A
    /// missing directory is not an error; an empty `dir` is refused
    /// ([`validate_dir`]).
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

    /// Starts writing state file `path` in parts, for files too large to
    /// hold in memory whole (a full snapshot of a large state): the file
    /// exists as [`write_file`](Self::write_file) would have written it once
    /// [`FileUpload::complete`] returns `Ok`, and not before. The default
    /// collects the parts in memory and calls `write_file` at the end; a
    /// storage that can append or upload in parts (a directory, S3
    /// multipart) overrides it so that memory stays bounded.
    async fn upload<'a>(&'a self, path: &str) -> Result<Box<dyn FileUpload + 'a>> {
        Ok(Box::new(BufferedUpload {
            storage: self,
            path: path.to_string(),
            parts: Vec::new(),
        }))
    }

    /// What the storage guarantees beyond the contract ([`Capabilities`]).
    /// The default claims atomic create-if-absent and durability.
    fn capabilities(&self) -> Capabilities {
        Capabilities::default()
    }
}

/// A state file being written in parts ([`CheckpointStorage::upload`]).
/// Dropped without [`complete`](Self::complete), the file does not appear
/// (what was staged is removed where the storage can do so at once, else at
/// its next clean-up of uncommitted files).
#[async_trait::async_trait]
pub trait FileUpload: Send {
    /// Appends `data` to the file.
    async fn put(&mut self, data: Bytes) -> Result<()>;

    /// Ends the file: after `Ok` it exists (create-if-absent, as
    /// [`CheckpointStorage::write_file`]: [`crate::Error::AlreadyExists`] if
    /// the path exists).
    async fn complete(self: Box<Self>) -> Result<()>;
}

/// The default [`FileUpload`]: the parts in memory, one `write_file` at the end.
struct BufferedUpload<'a, S: ?Sized> {
    storage: &'a S,
    path: String,
    parts: Vec<Bytes>,
}

#[async_trait::async_trait]
impl<S: CheckpointStorage + ?Sized> FileUpload for BufferedUpload<'_, S> {
    async fn put(&mut self, data: Bytes) -> Result<()> {
        self.parts.push(data);
        Ok(())
    }

    async fn complete(mut self: Box<Self>) -> Result<()> {
        let data = match self.parts.len() {
            1 => self.parts.pop().unwrap_or_default(),
            _ => Bytes::from(self.parts.concat()),
        };
        self.storage.write_file(&self.path, data).await
    }
}

/// The name of a checkpoint's or savepoint's metadata file inside its
/// directory.
pub const METADATA_FILE: &str = "_metadata";

/// The path of checkpoint `id`'s metadata: `chk-<id>/_metadata`.
pub fn metadata_path(id: CheckpointId) -> String {
    format!("{}/{METADATA_FILE}", id.dir())
}

/// Convenience and checkpoint-level operations, provided for every
/// [`CheckpointStorage`] (as `object_store`'s `ObjectStoreExt`): a storage
/// implements the seven methods of the contract and gets these.
#[async_trait::async_trait]
pub trait CheckpointStorageExt: CheckpointStorage {
    /// Reads a whole file.
    async fn read_file(&self, path: &str) -> Result<Bytes> {
        self.read(path, None).await
    }

    /// Reads the byte range `range` of a file.
    async fn read_range(&self, path: &str, range: Range<u64>) -> Result<Bytes> {
        self.read(path, Some(range)).await
    }

    /// Atomically commits checkpoint `id`'s metadata, create-if-absent
    /// (`commit_file` of `chk-<id>/_metadata`). After it returns `Ok`, the
    /// checkpoint exists durably; before, it does not. Fails with
    /// [`crate::Error::AlreadyExists`] if the metadata exists.
    async fn commit_metadata(&self, id: CheckpointId, metadata: Bytes) -> Result<()> {
        self.commit_file(&metadata_path(id), metadata).await
    }

    /// Reads a committed checkpoint's metadata ([`crate::Error::NotFound`] if
    /// not committed).
    async fn read_metadata(&self, id: CheckpointId) -> Result<Bytes> {
        self.read(&metadata_path(id), None).await.map_err(|e| match e {
            crate::Error::NotFound { .. } => crate::Error::not_found(format!(
                "checkpoint {id} (no committed metadata) in {}",
                self.describe()
            )),
            other => other,
        })
    }

    /// Lists every checkpoint that has metadata or files, in ascending id;
    /// directories that are not `chk-<id>` are ignored.
    async fn list(&self) -> Result<Vec<CheckpointListing>> {
        let mut found: std::collections::BTreeMap<CheckpointId, bool> = std::collections::BTreeMap::new();
        for f in self.list_files("").await? {
            let Some(id) = checkpoint_of_path(&f.path) else {
                continue;
            };
            let committed = f.path == metadata_path(id);
            *found.entry(id).or_default() |= committed;
        }
        Ok(found
            .into_iter()
            .map(|(id, committed)| CheckpointListing { id, committed })
            .collect())
    }

    /// Deletes a checkpoint: its metadata first (so it stops existing), then
    /// its files. Also used to clean up an uncommitted attempt. Discarding a
    /// checkpoint that is not there is not an error.
    async fn discard(&self, id: CheckpointId) -> Result<()> {
        self.delete_dir(&id.dir()).await
    }
}

impl<T: CheckpointStorage + ?Sized> CheckpointStorageExt for T {}

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

/// The checkpoint whose directory is `dir`: `chk-<id>` with `id` written
/// canonically (no sign, no leading zero).
pub fn checkpoint_of_dir(dir: &str) -> Option<CheckpointId> {
    let digits = dir.strip_prefix("chk-")?;
    let canonical = !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (digits.len() == 1 || !digits.starts_with('0'));
    if !canonical {
        return None;
    }
    digits.parse().ok().map(CheckpointId)
}

/// The checkpoint a file belongs to, from its first segment `chk-<id>`
/// (a path below that directory).
pub fn checkpoint_of_path(path: &str) -> Option<CheckpointId> {
    let (first, rest) = path.split_once('/')?;
    if rest.is_empty() {
        return None;
    }
    checkpoint_of_dir(first)
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
