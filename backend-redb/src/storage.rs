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
//!
//! [`RedbCheckpointStorage::open`] creates a missing file;
//! [`RedbCheckpointStorage::open_existing`] (for tools that only read)
//! opens an existing store read-only and never creates anything.

use crate::{corrupt_or_storage, spawn_db};
use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use redb::{Database, Durability, ReadOnlyDatabase, ReadableDatabase, ReadableTable, TableDefinition};
use sluice_core::storage::{checkpoint_of_path, dir_prefix, metadata_path, validate_dir, validate_path};
use sluice_core::{CheckpointId, CheckpointStorage, Error, FileListing, Result};
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::Arc;

mod open;

const STORE: TableDefinition<&str, &str> = TableDefinition::new("sluice_store");
const FILES: TableDefinition<&str, u64> = TableDefinition::new("files");
const CHUNKS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("chunks");
const CHECKPOINTS: TableDefinition<u64, &[u8]> = TableDefinition::new("checkpoints");

/// The marker of a Sluice checkpoint store, with its format version.
pub const STORE_FORMAT: &str = "sluice-checkpoints/1";
const CHUNK: u64 = 1 << 20;
/// redb's page cache for a checkpoint store, bytes.
const STORE_CACHE_BYTES: usize = 32 << 20;

/// Checkpoint storage in a local redb file.
#[derive(Clone)]
pub struct RedbCheckpointStorage {
    db: Arc<Db>,
    path: Arc<PathBuf>,
}

/// The open file: for writing ([`RedbCheckpointStorage::open`]) or
/// read-only ([`RedbCheckpointStorage::open_existing`]).
enum Db {
    Writable(Database),
    ReadOnly(ReadOnlyDatabase),
}

impl Db {
    fn begin_read(&self) -> std::result::Result<redb::ReadTransaction, redb::TransactionError> {
        match self {
            Db::Writable(db) => db.begin_read(),
            Db::ReadOnly(db) => db.begin_read(),
        }
    }

    /// A write transaction; refused (determinate: nothing was written) when
    /// the file was opened read-only.
    fn begin_write(&self, store: &str) -> Result<redb::WriteTransaction> {
        match self {
            Db::Writable(db) => db.begin_write().map_err(|e| Error::storage(store, e)),
            Db::ReadOnly(_) => Err(Error::storage(
                store,
                "the checkpoint store was opened read-only (for inspecting, listing or copying from it); \
                 nothing was written",
            )),
        }
    }
}

impl RedbCheckpointStorage {
    fn name(&self) -> String {
        self.path.display().to_string()
    }
}

impl std::fmt::Debug for RedbCheckpointStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RedbCheckpointStorage({})", self.path.display())
    }
}

fn chunk_value(data: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(data.len() + 4);
    v.extend_from_slice(data);
    v.extend_from_slice(&crc32fast::hash(data).to_le_bytes());
    v
}

/// Reads `range` of the file at `path` inside a read transaction.
fn read_range_blocking(db: &Db, store: &str, path: &str, range: Option<Range<u64>>) -> Result<Bytes> {
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
            let mut tx = db.begin_write(&store)?;
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

/// Removes the file `path` (and its chunks), if it exists, in the write
/// transaction `tx`.
fn remove_file_rows(tx: &redb::WriteTransaction, store: &str, path: &str) -> Result<()> {
    let mut files = tx.open_table(FILES).map_err(|e| Error::storage(store, e))?;
    let len = match files.remove(path).map_err(|e| Error::storage(store, e))? {
        Some(v) => v.value(),
        None => return Ok(()),
    };
    let mut chunks = tx.open_table(CHUNKS).map_err(|e| Error::storage(store, e))?;
    for i in 0..len.div_ceil(CHUNK).max(1) {
        chunks.remove((path, i)).map_err(|e| Error::storage(store, e))?;
    }
    Ok(())
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

/// The checkpoint whose metadata `path` is (`chk-<id>/_metadata`): such
/// paths live in the `checkpoints` table, with a CRC, not in `files`.
fn metadata_id(path: &str) -> Option<CheckpointId> {
    checkpoint_of_path(path).filter(|id| path == metadata_path(*id))
}

/// Reads checkpoint `id`'s metadata row, checking its CRC.
fn read_metadata_blocking(db: &Db, store: &str, id: CheckpointId) -> Result<Bytes> {
    let read = db.begin_read().map_err(|e| Error::storage(store, e))?;
    let t = read
        .open_table(CHECKPOINTS)
        .map_err(|e| Error::storage(store, e))?;
    let v = t
        .get(id.0)
        .map_err(|e| corrupt_or_storage(store, e))?
        .ok_or_else(|| Error::not_found(format!("{} in {store}", metadata_path(id))))?;
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
}

impl RedbCheckpointStorage {
    /// Commits checkpoint `id`'s metadata durably and create-if-absent.
    async fn commit_metadata_row(&self, id: CheckpointId, metadata: Bytes) -> Result<()> {
        let (db, store) = (self.db.clone(), self.name());
        spawn_db(move || {
            let mut tx = db.begin_write(&store)?;
            tx.set_durability(Durability::Immediate)
                .map_err(|e| Error::storage(&store, e))?;
            {
                let mut t = tx
                    .open_table(CHECKPOINTS)
                    .map_err(|e| Error::storage(&store, e))?;
                if t.get(id.0).map_err(|e| corrupt_or_storage(&store, e))?.is_some() {
                    return Err(Error::AlreadyExists {
                        what: format!("{} in {store}", metadata_path(id)),
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
}

#[async_trait]
impl CheckpointStorage for RedbCheckpointStorage {
    fn describe(&self) -> String {
        format!("redb:{}", self.path.display())
    }

    async fn write_file(&self, path: &str, data: Bytes) -> Result<()> {
        match metadata_id(path) {
            // Metadata is only ever committed (durably).
            Some(id) => self.commit_metadata_row(id, data).await,
            None => self.write(path, data, Durability::None).await,
        }
    }

    async fn commit_file(&self, path: &str, data: Bytes) -> Result<()> {
        match metadata_id(path) {
            Some(id) => self.commit_metadata_row(id, data).await,
            // An `Immediate` transaction: durable together with every earlier one.
            None => self.write(path, data, Durability::Immediate).await,
        }
    }

    async fn read(&self, path: &str, range: Option<Range<u64>>) -> Result<Bytes> {
        let (db, store, path) = (self.db.clone(), self.name(), path.to_string());
        spawn_db(move || match metadata_id(&path) {
            None => read_range_blocking(&db, &store, &path, range),
            Some(id) => {
                let data = read_metadata_blocking(&db, &store, id)?;
                match range {
                    None => Ok(data),
                    Some(r) if r.start <= r.end && r.end <= data.len() as u64 => {
                        Ok(data.slice(r.start as usize..r.end as usize))
                    }
                    Some(r) => Err(Error::corrupt(
                        path,
                        format!(
                            "range {}..{} is outside the file's {} bytes",
                            r.start,
                            r.end,
                            data.len()
                        ),
                    )),
                }
            }
        })
        .await
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
            let meta = read
                .open_table(CHECKPOINTS)
                .map_err(|e| Error::storage(&store, e))?;
            for row in meta.iter().map_err(|e| corrupt_or_storage(&store, e))? {
                let (k, v) = row.map_err(|e| corrupt_or_storage(&store, e))?;
                let path = metadata_path(CheckpointId(k.value()));
                if path.starts_with(&prefix) {
                    let size = v.value().len().saturating_sub(4) as u64;
                    out.push(FileListing { path, size });
                }
            }
            out.sort_by(|a, b| a.path.cmp(&b.path));
            Ok(out)
        })
        .await
    }

    async fn delete_file(&self, path: &str) -> Result<()> {
        validate_path(path)?;
        let (db, store, path) = (self.db.clone(), self.name(), path.to_string());
        spawn_db(move || {
            let mut tx = db.begin_write(&store)?;
            tx.set_durability(Durability::Immediate)
                .map_err(|e| Error::storage(&store, e))?;
            match metadata_id(&path) {
                Some(id) => {
                    let mut meta = tx
                        .open_table(CHECKPOINTS)
                        .map_err(|e| Error::storage(&store, e))?;
                    meta.remove(id.0).map_err(|e| Error::storage(&store, e))?;
                }
                None => remove_file_rows(&tx, &store, &path)?,
            }
            tx.commit().map_err(|e| Error::storage(&store, e))
        })
        .await
    }

    async fn delete_dir(&self, dir: &str) -> Result<()> {
        validate_dir(dir, false)?;
        let (db, store, prefix) = (self.db.clone(), self.name(), dir_prefix(dir));
        // One transaction: the directory, `_metadata` included, goes at once.
        spawn_db(move || {
            let mut tx = db.begin_write(&store)?;
            tx.set_durability(Durability::Immediate)
                .map_err(|e| Error::storage(&store, e))?;
            {
                let mut meta = tx
                    .open_table(CHECKPOINTS)
                    .map_err(|e| Error::storage(&store, e))?;
                let mut ids = Vec::new();
                for row in meta.iter().map_err(|e| corrupt_or_storage(&store, e))? {
                    let (k, _) = row.map_err(|e| corrupt_or_storage(&store, e))?;
                    if metadata_path(CheckpointId(k.value())).starts_with(&prefix) {
                        ids.push(k.value());
                    }
                }
                for id in ids {
                    meta.remove(id).map_err(|e| Error::storage(&store, e))?;
                }
            }
            remove_prefix(&tx, &store, &prefix)?;
            tx.commit().map_err(|e| Error::storage(&store, e))
        })
        .await
    }
}

/// Changes the bytes of the first chunk of the stored file `file` in the
/// checkpoint store at `store` behind the storage's back, as a failing disk
/// would: for reliability tests and drills (the store must not be open).
/// The chunk's checksum is left as it was, so a read finds the damage.
pub fn damage_stored_file(store: &Path, file: &str, damage: impl FnOnce(&mut Vec<u8>)) -> Result<()> {
    let what = store.display().to_string();
    let db = redb::Database::open(store).map_err(|e| Error::storage(&what, e))?;
    let read = db.begin_read().map_err(|e| Error::storage(&what, e))?;
    let mut value = read
        .open_table(CHUNKS)
        .map_err(|e| Error::storage(&what, e))?
        .get((file, 0))
        .map_err(|e| Error::storage(&what, e))?
        .ok_or_else(|| Error::not_found(format!("{file} in {what}")))?
        .value()
        .to_vec();
    drop(read);
    damage(&mut value);
    let tx = db.begin_write().map_err(|e| Error::storage(&what, e))?;
    tx.open_table(CHUNKS)
        .map_err(|e| Error::storage(&what, e))?
        .insert((file, 0), value.as_slice())
        .map_err(|e| Error::storage(&what, e))?;
    tx.commit().map_err(|e| Error::storage(&what, e))
}
