//! [`RedbCheckpointStorage`]: checkpoints in one local redb file.
//!
//! Tables:
//! - `sluice_store`: a marker (`format` → `sluice-checkpoints/1`) that
//!   identifies the file; a file without it is refused, never written.
//! - `files`: path → length of a state file.
//! - `chunks`: (path, index) → up to 1 MiB of the file followed by the
//!   chunk's CRC-32, verified on every read.
//! - `checkpoints`: checkpoint id → committed metadata (JSON).
//!
//! State files are written in transactions with [`Durability::None`]; the
//! metadata commit is a [`Durability::Immediate`] transaction, which makes
//! itself and every earlier transaction durable: when `commit_metadata`
//! returns, a power cut cannot lose the checkpoint; before, it does not
//! exist. Discarding removes a checkpoint's rows; redb reuses the freed
//! pages, and [`RedbCheckpointStorage::compact`] returns them to the OS.

use crate::{corrupt_or_storage, spawn_db};
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use redb::{Database, Durability, ReadOnlyDatabase, ReadableDatabase, ReadableTable, TableDefinition};
use sluice_core::storage::{checkpoint_of_path, dir_prefix, validate_dir, validate_path};
use sluice_core::{CheckpointId, CheckpointListing, CheckpointStorage, Error, FileListing, Result};
use std::collections::BTreeSet;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

const STORE: TableDefinition<&str, &str> = TableDefinition::new("sluice_store");
const FILES: TableDefinition<&str, u64> = TableDefinition::new("files");
const CHUNKS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("chunks");
const CHECKPOINTS: TableDefinition<u64, &[u8]> = TableDefinition::new("checkpoints");

/// The marker of a Sluice checkpoint store, with its format version.
pub const STORE_FORMAT: &str = "sluice-checkpoints/1";
const CHUNK: u64 = 1 << 20;

/// Checkpoint storage in a local redb file.
#[derive(Clone)]
pub struct RedbCheckpointStorage {
    db: Arc<Database>,
    path: Arc<PathBuf>,
}

impl std::fmt::Debug for RedbCheckpointStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RedbCheckpointStorage({})", self.path.display())
    }
}

impl RedbCheckpointStorage {
    /// Opens (or creates) the store at `path`, creating missing parent
    /// directories. A file that is not a Sluice checkpoint store, or one of
    /// another format version, is refused with a clear error and left as is.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let name = path.display().to_string();
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .map_err(|e| Error::storage(format!("creating directory {}", parent.display()), e))?;
        }
        let existed = path.metadata().map(|m| m.len() > 0).unwrap_or(false);
        if existed {
            // Look before writing: a file that is not ours is never opened
            // for writing. A store left by a killed process needs redb's
            // repair, which needs a writable open; it is checked after it.
            match ReadOnlyDatabase::open(&path) {
                Ok(ro) => {
                    check_marker(&name, read_marker(&name, &ro)?)?;
                }
                Err(redb::DatabaseError::RepairAborted) => {}
                Err(redb::DatabaseError::DatabaseAlreadyOpen) => return Err(already_open(&name)),
                Err(other) => {
                    return Err(Error::Incompatible {
                        what: format!("checkpoint store {name}"),
                        reason: format!(
                            "not a redb database ({other}); it was left untouched — choose another path"
                        ),
                    })
                }
            }
        }
        let db = Database::create(&path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => already_open(&name),
            other => Error::Incompatible {
                what: format!("checkpoint store {name}"),
                reason: format!("not a usable redb database ({other}); choose another path"),
            },
        })?;
        match read_marker(&name, &db)? {
            Some(marker) => check_marker(&name, Some(marker))?,
            None if existed && has_tables(&db) => check_marker(&name, None)?,
            None => {
                let tx = db.begin_write().map_err(|e| Error::storage(name.clone(), e))?;
                {
                    let mut t = tx
                        .open_table(STORE)
                        .map_err(|e| Error::storage(name.clone(), e))?;
                    t.insert("format", STORE_FORMAT)
                        .map_err(|e| Error::storage(name.clone(), e))?;
                    tx.open_table(FILES)
                        .map_err(|e| Error::storage(name.clone(), e))?;
                    tx.open_table(CHUNKS)
                        .map_err(|e| Error::storage(name.clone(), e))?;
                    tx.open_table(CHECKPOINTS)
                        .map_err(|e| Error::storage(name.clone(), e))?;
                }
                tx.commit().map_err(|e| Error::storage(name.clone(), e))?;
            }
        }
        Ok(RedbCheckpointStorage {
            db: Arc::new(db),
            path: Arc::new(path),
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Returns free space to the operating system (redb compaction). Needs
    /// exclusive access: it fails if clones of this handle are alive.
    pub fn compact(&mut self) -> Result<bool> {
        let name = self.path.display().to_string();
        let db = Arc::get_mut(&mut self.db)
            .ok_or_else(|| Error::storage(name.clone(), "compaction needs the only handle to the store"))?;
        db.compact().map_err(|e| Error::storage(name, e))
    }

    fn name(&self) -> String {
        self.path.display().to_string()
    }
}

fn already_open(name: &str) -> Error {
    Error::storage(
        name,
        "the checkpoint store is open in another process (or twice in this one)",
    )
}

/// The store's format marker, if the file has one.
fn read_marker(name: &str, db: &impl ReadableDatabase) -> Result<Option<String>> {
    let read = db.begin_read().map_err(|e| Error::storage(name, e))?;
    match read.open_table(STORE) {
        Ok(t) => Ok(t
            .get("format")
            .map_err(|e| corrupt_or_storage(name, e))?
            .map(|v| v.value().to_string())),
        Err(redb::TableError::TableDoesNotExist(_)) => Ok(None),
        Err(e) => Err(Error::storage(name, e)),
    }
}

fn check_marker(name: &str, marker: Option<String>) -> Result<()> {
    match marker.as_deref() {
        Some(STORE_FORMAT) => Ok(()),
        Some(other) => Err(Error::Incompatible {
            what: format!("checkpoint store {name}"),
            reason: format!("written in format {other:?}; this build reads {STORE_FORMAT:?}"),
        }),
        None => Err(Error::Incompatible {
            what: format!("checkpoint store {name}"),
            reason: "a redb database that is not a Sluice checkpoint store; it was left untouched".into(),
        }),
    }
}

fn has_tables(db: &impl ReadableDatabase) -> bool {
    match db.begin_read() {
        Ok(r) => r.list_tables().map(|mut t| t.next().is_some()).unwrap_or(true),
        Err(_) => true,
    }
}

fn chunk_value(data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(data.len() + 4);
    v.extend_from_slice(data);
    v.extend_from_slice(&crc32fast::hash(data).to_le_bytes());
    v
}

/// Reads `range` of the file at `path` inside a read transaction.
fn read_range_blocking(db: &Database, store: &str, path: &str, range: Option<Range<u64>>) -> Result<Bytes> {
    let read = db.begin_read().map_err(|e| Error::storage(store, e))?;
    let files = read.open_table(FILES).map_err(|e| Error::storage(store, e))?;
    let len = files
        .get(path)
        .map_err(|e| corrupt_or_storage(store, e))?
        .map(|v| v.value())
        .ok_or_else(|| Error::not_found(format!("{path} in {store}")))?;
    let range = range.unwrap_or(0..len);
    if range.start > range.end || range.end > len {
        return Err(Error::corrupt(
            path,
            format!(
                "range {}..{} is outside the file's {len} bytes",
                range.start, range.end
            ),
        ));
    }
    let chunks = read.open_table(CHUNKS).map_err(|e| Error::storage(store, e))?;
    let mut out = BytesMut::with_capacity((range.end - range.start) as usize);
    if range.start == range.end {
        return Ok(out.freeze());
    }
    for index in range.start / CHUNK..=(range.end - 1) / CHUNK {
        let guard = chunks
            .get((path, index))
            .map_err(|e| corrupt_or_storage(store, e))?
            .ok_or_else(|| Error::corrupt(path, format!("chunk {index} is missing (truncated file)")))?;
        let raw = guard.value();
        let expected_len = (len - index * CHUNK).min(CHUNK) as usize;
        if raw.len() != expected_len + 4 {
            return Err(Error::corrupt(
                path,
                format!(
                    "chunk {index} has {} bytes, expected {}",
                    raw.len(),
                    expected_len + 4
                ),
            ));
        }
        let (data, crc) = raw.split_at(expected_len);
        if crc32fast::hash(data).to_le_bytes() != crc {
            return Err(Error::corrupt(
                path,
                format!("checksum mismatch in chunk {index}"),
            ));
        }
        let chunk_start = index * CHUNK;
        let from = range.start.max(chunk_start) - chunk_start;
        let to = range.end.min(chunk_start + expected_len as u64) - chunk_start;
        out.extend_from_slice(&data[from as usize..to as usize]);
    }
    Ok(out.freeze())
}

impl RedbCheckpointStorage {
    /// Writes a file create-if-absent in one transaction of `durability`.
    async fn write(&self, path: &str, data: Bytes, durability: Durability) -> Result<()> {
        validate_path(path)?;
        let (db, store, path) = (self.db.clone(), self.name(), path.to_string());
        spawn_db(move || {
            let mut tx = db.begin_write().map_err(|e| Error::storage(&store, e))?;
            tx.set_durability(durability)
                .map_err(|e| Error::storage(&store, e))?;
            {
                let mut files = tx.open_table(FILES).map_err(|e| Error::storage(&store, e))?;
                if files
                    .get(path.as_str())
                    .map_err(|e| corrupt_or_storage(&store, e))?
                    .is_some()
                {
                    return Err(Error::AlreadyExists { what: path });
                }
                files
                    .insert(path.as_str(), data.len() as u64)
                    .map_err(|e| Error::storage(&store, e))?;
                let mut chunks = tx.open_table(CHUNKS).map_err(|e| Error::storage(&store, e))?;
                for (i, c) in data.chunks(CHUNK as usize).enumerate() {
                    chunks
                        .insert((path.as_str(), i as u64), chunk_value(c).as_slice())
                        .map_err(|e| Error::storage(&store, e))?;
                }
            }
            tx.commit().map_err(|e| Error::storage(&store, e))
        })
        .await
    }
}

/// Removes the files whose paths start with `prefix` (and their chunks) in
/// the write transaction `tx`.
fn remove_prefix(tx: &redb::WriteTransaction, store: &str, prefix: &str) -> Result<()> {
    let mut files = tx.open_table(FILES).map_err(|e| Error::storage(store, e))?;
    let mut paths = Vec::new();
    for row in files.range(prefix..).map_err(|e| corrupt_or_storage(store, e))? {
        let (k, v) = row.map_err(|e| corrupt_or_storage(store, e))?;
        if !k.value().starts_with(prefix) {
            break;
        }
        paths.push((k.value().to_string(), v.value()));
    }
    let mut chunks = tx.open_table(CHUNKS).map_err(|e| Error::storage(store, e))?;
    for (p, len) in &paths {
        files.remove(p.as_str()).map_err(|e| Error::storage(store, e))?;
        for i in 0..len.div_ceil(CHUNK).max(1) {
            chunks
                .remove((p.as_str(), i))
                .map_err(|e| Error::storage(store, e))?;
        }
    }
    Ok(())
}

#[async_trait]
impl CheckpointStorage for RedbCheckpointStorage {
    fn describe(&self) -> String {
        format!("redb:{}", self.path.display())
    }

    async fn write_file(&self, path: &str, data: Bytes) -> Result<()> {
        self.write(path, data, Durability::None).await
    }

    async fn read_file(&self, path: &str) -> Result<Bytes> {
        let (db, store, path) = (self.db.clone(), self.name(), path.to_string());
        spawn_db(move || read_range_blocking(&db, &store, &path, None)).await
    }

    async fn read_range(&self, path: &str, range: Range<u64>) -> Result<Bytes> {
        let (db, store, path) = (self.db.clone(), self.name(), path.to_string());
        spawn_db(move || read_range_blocking(&db, &store, &path, Some(range))).await
    }

    async fn commit_metadata(&self, id: CheckpointId, metadata: Bytes) -> Result<()> {
        let (db, store) = (self.db.clone(), self.name());
        spawn_db(move || {
            let mut tx = db.begin_write().map_err(|e| Error::storage(&store, e))?;
            tx.set_durability(Durability::Immediate)
                .map_err(|e| Error::storage(&store, e))?;
            {
                let mut t = tx
                    .open_table(CHECKPOINTS)
                    .map_err(|e| Error::storage(&store, e))?;
                if t.get(id.0).map_err(|e| corrupt_or_storage(&store, e))?.is_some() {
                    return Err(Error::AlreadyExists {
                        what: format!("metadata of checkpoint {id} in {store}"),
                    });
                }
                let mut v = metadata.to_vec();
                v.extend_from_slice(&crc32fast::hash(&metadata).to_le_bytes());
                t.insert(id.0, v.as_slice())
                    .map_err(|e| Error::storage(&store, e))?;
            }
            tx.commit().map_err(|e| Error::storage(&store, e))
        })
        .await
    }

    async fn read_metadata(&self, id: CheckpointId) -> Result<Bytes> {
        let (db, store) = (self.db.clone(), self.name());
        spawn_db(move || {
            let read = db.begin_read().map_err(|e| Error::storage(&store, e))?;
            let t = read
                .open_table(CHECKPOINTS)
                .map_err(|e| Error::storage(&store, e))?;
            let v = t
                .get(id.0)
                .map_err(|e| corrupt_or_storage(&store, e))?
                .ok_or_else(|| Error::not_found(format!("metadata of checkpoint {id} in {store}")))?;
            let raw = v.value();
            let what = format!("{store}: metadata of checkpoint {id}");
            if raw.len() < 4 {
                return Err(Error::corrupt(what, "truncated"));
            }
            let (data, crc) = raw.split_at(raw.len() - 4);
            if crc32fast::hash(data).to_le_bytes() != crc {
                return Err(Error::corrupt(what, "checksum mismatch"));
            }
            Ok(Bytes::copy_from_slice(data))
        })
        .await
    }

    async fn list(&self) -> Result<Vec<CheckpointListing>> {
        let (db, store) = (self.db.clone(), self.name());
        spawn_db(move || {
            let read = db.begin_read().map_err(|e| Error::storage(&store, e))?;
            let t = read
                .open_table(CHECKPOINTS)
                .map_err(|e| Error::storage(&store, e))?;
            let mut committed = BTreeSet::new();
            for row in t.iter().map_err(|e| corrupt_or_storage(&store, e))? {
                let (k, _) = row.map_err(|e| corrupt_or_storage(&store, e))?;
                committed.insert(CheckpointId(k.value()));
            }
            let mut all = committed.clone();
            let files = read.open_table(FILES).map_err(|e| Error::storage(&store, e))?;
            for row in files.iter().map_err(|e| corrupt_or_storage(&store, e))? {
                let (k, _) = row.map_err(|e| corrupt_or_storage(&store, e))?;
                if let Some(id) = checkpoint_of_path(k.value()) {
                    all.insert(id);
                }
            }
            Ok(all
                .into_iter()
                .map(|id| CheckpointListing {
                    id,
                    committed: committed.contains(&id),
                })
                .collect())
        })
        .await
    }

    async fn discard(&self, id: CheckpointId) -> Result<()> {
        let (db, store) = (self.db.clone(), self.name());
        spawn_db(move || {
            let mut tx = db.begin_write().map_err(|e| Error::storage(&store, e))?;
            tx.set_durability(Durability::None)
                .map_err(|e| Error::storage(&store, e))?;
            {
                let mut meta = tx
                    .open_table(CHECKPOINTS)
                    .map_err(|e| Error::storage(&store, e))?;
                meta.remove(id.0).map_err(|e| Error::storage(&store, e))?;
            }
            remove_prefix(&tx, &store, &format!("{}/", id.dir()))?;
            tx.commit().map_err(|e| Error::storage(&store, e))
        })
        .await
    }

    async fn commit_file(&self, path: &str, data: Bytes) -> Result<()> {
        // An `Immediate` transaction: durable together with every earlier one.
        self.write(path, data, Durability::Immediate).await
    }

    async fn list_files(&self, dir: &str) -> Result<Vec<FileListing>> {
        validate_dir(dir, true)?;
        let (db, store, prefix) = (self.db.clone(), self.name(), dir_prefix(dir));
        spawn_db(move || {
            let read = db.begin_read().map_err(|e| Error::storage(&store, e))?;
            let files = read.open_table(FILES).map_err(|e| Error::storage(&store, e))?;
            let mut out = Vec::new();
            for row in files
                .range(prefix.as_str()..)
                .map_err(|e| corrupt_or_storage(&store, e))?
            {
                let (k, v) = row.map_err(|e| corrupt_or_storage(&store, e))?;
                if !k.value().starts_with(&prefix) {
                    break;
                }
                out.push(FileListing {
                    path: k.value().to_string(),
                    size: v.value(),
                });
            }
            Ok(out)
        })
        .await
    }

    async fn delete_dir(&self, dir: &str) -> Result<()> {
        validate_dir(dir, false)?;
        let (db, store, prefix) = (self.db.clone(), self.name(), dir_prefix(dir));
        // One transaction: the directory, `_metadata` included, goes at once.
        spawn_db(move || {
            let mut tx = db.begin_write().map_err(|e| Error::storage(&store, e))?;
            tx.set_durability(Durability::Immediate)
                .map_err(|e| Error::storage(&store, e))?;
            remove_prefix(&tx, &store, &prefix)?;
            tx.commit().map_err(|e| Error::storage(&store, e))
        })
        .await
    }
}
