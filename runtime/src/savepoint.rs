//! Savepoints: where they go ([`SavepointLocation`]), where a job restores
//! from ([`RestoreSource`]: a checkpoint of the job's own storage, or a
//! savepoint or retained checkpoint anywhere), and copying a savepoint
//! between storages ([`copy_savepoint`]).
//!
//! A savepoint is a self-contained directory: its state files and a
//! `_metadata` file (written last, durably and create-if-absent) whose state
//! file paths are relative to the directory. Copying the directory anywhere
//! — another folder, another bucket, another kind of storage — gives a
//! savepoint that restores the same. Savepoints are never created or deleted
//! automatically.

use crate::error::{Result, RuntimeError};
use sluice_core::metadata::{read_checkpoint_metadata, read_savepoint_metadata, SAVEPOINT_METADATA_FILE};
use sluice_core::storage::{checkpoint_of_dir, validate_dir};
use sluice_core::CheckpointStorageExt;
use sluice_core::{
    CheckpointId, CheckpointKind, CheckpointMetadata, CheckpointStorage, Error, StateFileHandle,
};
use std::sync::Arc;

/// A directory of a checkpoint storage: where a savepoint is written (a
/// target, under which each savepoint gets its own directory), or where
/// one is (a savepoint directory, or a retained checkpoint's `chk-<id>`).
#[derive(Clone, Debug)]
pub struct SavepointLocation {
    /// The storage.
    pub storage: Arc<dyn CheckpointStorage>,
    /// The directory inside it (`""`: the storage's root).
    pub dir: String,
}

impl SavepointLocation {
    /// Directory `dir` of `storage`. `dir` is empty (the root) or a relative
    /// path without `.`/`..` segments.
    pub fn new(storage: Arc<dyn CheckpointStorage>, dir: impl Into<String>) -> sluice_core::Result<Self> {
        let dir = dir.into().trim_matches('/').to_string();
        validate_dir(&dir, true)?;
        Ok(SavepointLocation { storage, dir })
    }

    /// The location as a user writes it (`redb:/x.redb#dir`, `s3://b/p/dir`).
    pub fn describe(&self) -> String {
        self.storage.locate(&self.dir)
    }

    /// The path of `file` inside the directory.
    pub fn join(&self, file: &str) -> String {
        join(&self.dir, file)
    }

    /// The location of the sub-directory `name`.
    pub fn child(&self, name: &str) -> SavepointLocation {
        SavepointLocation {
            storage: self.storage.clone(),
            dir: self.join(name),
        }
    }

    /// If the directory is a checkpoint's (`chk-<id>`, at the root), its id.
    pub fn checkpoint_id(&self) -> Option<CheckpointId> {
        if self.dir.contains('/') {
            return None;
        }
        checkpoint_of_dir(&self.dir)
    }
}

fn join(dir: &str, file: &str) -> String {
    if dir.is_empty() {
        file.to_string()
    } else {
        format!("{dir}/{file}")
    }
}

/// The directory name of savepoint `id`: `savepoint-<id>-<6 random hex digits>`
/// (as Flink's `savepoint-<job>-<random>`), so that savepoints of several
/// runs can share a target.
pub fn savepoint_dir_name(id: CheckpointId) -> String {
    format!("savepoint-{}-{:06x}", id.0, rand::random::<u32>() & 0xff_ffff)
}

/// What a job restores from: metadata, the storage holding the state files,
/// and the directory their paths are relative to.
#[derive(Debug, Clone)]
pub struct RestoreSource {
    /// The checkpoint's or savepoint's metadata.
    pub metadata: Arc<CheckpointMetadata>,
    /// Where its state files are.
    pub storage: Arc<dyn CheckpointStorage>,
    /// The directory the metadata's state file paths are relative to: `""`
    /// for checkpoints (their paths start with `chk-<id>/`), the savepoint's
    /// directory for savepoints.
    pub base: String,
    /// Where it is, for logs and errors.
    pub location: String,
}

impl RestoreSource {
    /// Checkpoint `id` of `storage`.
    pub async fn checkpoint(
        storage: Arc<dyn CheckpointStorage>,
        id: CheckpointId,
    ) -> sluice_core::Result<Self> {
        let metadata = read_checkpoint_metadata(storage.as_ref(), id).await?;
        Ok(RestoreSource {
            metadata: Arc::new(metadata),
            location: storage.locate(&id.dir()),
            storage,
            base: String::new(),
        })
    }

    /// The savepoint (or retained checkpoint, `…#chk-<id>`) at `location`.
    /// Its metadata is read and validated (JSON, version, no path escaping
    /// the directory); state files are checked when they are read.
    pub async fn open(location: &SavepointLocation) -> sluice_core::Result<Self> {
        if let Some(id) = location.checkpoint_id() {
            return Self::checkpoint(location.storage.clone(), id).await;
        }
        if location.dir.is_empty() {
            return Err(Error::InvalidArgument {
                what: format!("savepoint location {}", location.describe()),
                reason: "names a whole storage; name the savepoint's directory (savepoint-<id>-<hex>) or a \
                         retained checkpoint (chk-<id>)"
                    .into(),
            });
        }
        let metadata = read_savepoint_metadata(location.storage.as_ref(), &location.dir).await?;
        Ok(RestoreSource {
            metadata: Arc::new(metadata),
            storage: location.storage.clone(),
            base: location.dir.clone(),
            location: location.describe(),
        })
    }

    /// Where its metadata file is, as a user writes it
    /// (`redb:/x.redb#chk-7/_metadata`, `s3://b/p/savepoint-9-1a2b3c/_metadata`).
    pub fn metadata_location(&self) -> String {
        let dir = match self.base.is_empty() {
            true => self.metadata.checkpoint_id.dir(),
            false => self.base.clone(),
        };
        self.storage.locate(&join(&dir, SAVEPOINT_METADATA_FILE))
    }

    /// The storage path of a state file of the metadata.
    pub fn path_of(&self, file: &StateFileHandle) -> String {
        join(&self.base, &file.path)
    }

    /// The storage path of a channel-state file of the metadata.
    pub fn path_of_channel(&self, c: &sluice_core::ChannelStateHandle) -> String {
        join(&self.base, &c.path)
    }

    /// The channel-state files of subtask `subtask` of the task `task_uid`
    /// running at `parallelism`: matched by task id and subtask, refused
    /// when written at another parallelism (channel state does not rescale)
    /// or by a Sluice that did not record task ids.
    pub(crate) fn channel_state_of(
        &self,
        task_uid: &str,
        subtask: u32,
        parallelism: u32,
    ) -> sluice_core::Result<Vec<&sluice_core::ChannelStateHandle>> {
        let all = &self.metadata.channel_state;
        if let Some(c) = all.iter().find(|c| c.task_uid.is_empty()) {
            return Err(Error::Incompatible {
                what: format!("channel state of task {} in {}", c.task_name, self.describe()),
                reason:
                    "it was written by an older Sluice that did not record the task's id, so it cannot be \
                         matched to a task safely; restore from an aligned checkpoint or a savepoint instead"
                        .into(),
            });
        }
        let mine: Vec<&sluice_core::ChannelStateHandle> =
            all.iter().filter(|c| c.task_uid == task_uid).collect();
        if let Some(c) = mine.iter().find(|c| c.parallelism != parallelism) {
            return Err(Error::Incompatible {
                what: format!("channel state of task {} in {}", c.task_name, self.describe()),
                reason: format!(
                    "an unaligned checkpoint with records in flight restores only at the parallelism it was taken \
                     at ({}, the job has {parallelism}); take a savepoint (always aligned) to rescale",
                    c.parallelism
                ),
            });
        }
        Ok(mine.into_iter().filter(|c| c.subtask == subtask).collect())
    }

    /// A copy of `file` whose path is its storage path.
    pub fn resolve(&self, file: &StateFileHandle) -> StateFileHandle {
        StateFileHandle {
            path: self.path_of(file),
            ..file.clone()
        }
    }

    /// `checkpoint 7 at redb:/x.redb#chk-7` or `savepoint 9 at s3://…`.
    pub fn describe_with_location(&self) -> String {
        format!(
            "{} {} at {}",
            self.metadata.kind, self.metadata.checkpoint_id, self.location
        )
    }

    /// `checkpoint 7` (of the job's own storage) or `savepoint 9 at s3://…`.
    pub fn describe(&self) -> String {
        match self.metadata.kind {
            CheckpointKind::Checkpoint if self.base.is_empty() => {
                format!("checkpoint {}", self.metadata.checkpoint_id)
            }
            kind => format!("{kind} {} at {}", self.metadata.checkpoint_id, self.location),
        }
    }
}

/// One keyed state entry: `(state name, key group, key)`.
pub type EntryKey = (String, u32, Vec<u8>);

/// Every keyed state entry of operator `op` of a checkpoint or savepoint
/// whose file paths are relative to `base` in `storage`, with incremental
/// chains applied (each subtask's base, then its changes files in order: a
/// later write or deletion replaces an earlier one). For tools and checks;
/// the state is read into memory.
pub async fn read_keyed_entries(
    storage: &dyn CheckpointStorage,
    base: &str,
    op: &sluice_core::metadata::OperatorSnapshot,
) -> sluice_core::Result<std::collections::BTreeMap<EntryKey, Vec<u8>>> {
    let mut entries = std::collections::BTreeMap::new();
    visit_keyed_entries(storage, base, op, &mut |name, kg, k, v| {
        let key = (name.to_string(), kg, k.to_vec());
        match v {
            Some(v) => {
                entries.insert(key, v.to_vec());
            }
            None => {
                entries.remove(&key);
            }
        }
        Ok(())
    })
    .await?;
    Ok(entries)
}

/// Visits the keyed state of one operator in a checkpoint or savepoint
/// as its files hold it, without keeping it: `(state, key group, key,
/// value)` per entry, each subtask's base first and then its changes
/// files in order (`None`: a deletion of an entry visited before).
pub async fn visit_keyed_entries(
    storage: &dyn CheckpointStorage,
    base: &str,
    op: &sluice_core::metadata::OperatorSnapshot,
    visit: &mut sluice_core::format::ChangeVisitor<'_>,
) -> sluice_core::Result<()> {
    for st in &op.subtasks {
        for file in st.state_files() {
            let file = StateFileHandle {
                path: join(base, &file.path),
                ..file.clone()
            };
            sluice_core::format::read_changes(storage, &file, file.key_groups, visit).await?;
        }
    }
    Ok(())
}

/// Copies the savepoint at `src` to the directory `dst` (of any storage):
/// every state file named by its metadata, byte for byte, its checksum
/// verified on the way, then the metadata itself, unchanged, last (durably,
/// create-if-absent). The copy is a savepoint only once the metadata is
/// written; a copy that fails part way has no `_metadata` and can be
/// deleted. Refuses a destination that already holds files.
pub async fn copy_savepoint(src: &SavepointLocation, dst: &SavepointLocation) -> Result<CheckpointMetadata> {
    if src.checkpoint_id().is_some() {
        return Err(RuntimeError::InvalidJob(format!(
            "{} is a checkpoint: its paths are relative to its storage, not to its directory; restore from it \
             directly, or take a savepoint to copy",
            src.describe()
        )));
    }
    let source = RestoreSource::open(src).await?;
    if dst.dir.is_empty() {
        return Err(RuntimeError::InvalidJob(format!(
            "copy destination {}: name a directory for the savepoint",
            dst.describe()
        )));
    }
    if !dst.storage.list_files(&dst.dir).await?.is_empty() {
        return Err(Error::AlreadyExists {
            what: format!("files in {} (copy to an empty directory)", dst.describe()),
        }
        .into());
    }
    for op in &source.metadata.operators {
        for file in op.subtasks.iter().flat_map(|st| st.state_files()) {
            let bytes = source.storage.read_file(&source.path_of(file)).await?;
            sluice_core::format::verify_snapshot_file(&src.join(&file.path), &bytes, file.crc32)?;
            dst.storage.write_file(&dst.join(&file.path), bytes).await?;
        }
    }
    let meta = src.storage.read_file(&src.join(SAVEPOINT_METADATA_FILE)).await?;
    dst.storage
        .commit_file(&dst.join(SAVEPOINT_METADATA_FILE), meta)
        .await?;
    Ok((*source.metadata).clone())
}
