//! Opening a [`RedbCheckpointStorage`]: creating or checking the file (its
//! format marker; a file that is not a checkpoint store is refused and
//! left untouched), read-only opens for tools, compaction.

use super::{Db, RedbCheckpointStorage, CHECKPOINTS, CHUNKS, FILES, STORE, STORE_CACHE_BYTES, STORE_FORMAT};
use crate::corrupt_or_storage;
use redb::{Database, ReadOnlyDatabase, ReadableDatabase};
use sluice_core::{Error, Result};
use std::path::Path;
use std::sync::Arc;

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
        // Files are read and written in 1 MiB chunks, once each: a large page
        // cache would only hold memory (redb's default is 1 GiB).
        let db = Database::builder()
            .set_cache_size(STORE_CACHE_BYTES)
            .create(&path)
            .map_err(|e| match e {
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
            db: Arc::new(Db::Writable(db)),
            path: Arc::new(path),
        })
    }

    /// Opens the existing store at `path` read-only, for tools that only
    /// read (`sluice inspect`, `sluice checkpoints list`, the source of
    /// `sluice copy`). Nothing is ever created: a missing path is
    /// [`Error::NotFound`] naming it. A file that is not a Sluice checkpoint
    /// store (an empty file, a directory, another redb database, another
    /// format version) is refused and left untouched. Writes through the
    /// handle fail with [`Error::Storage`].
    ///
    /// Other processes may read the file at the same time; a process that
    /// has it open for writing excludes readers (and the other way round).
    /// A store left by a killed process needs redb's crash repair, which
    /// writes: it is repaired first (as [`open`](Self::open) would) and then
    /// opened read-only.
    pub fn open_existing(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let name = path.display().to_string();
        let missing = || Error::NotFound {
            what: format!(
                "no such file: {name} (check the path; reading a checkpoint store never creates one)"
            ),
        };
        let meta = match std::fs::metadata(&path) {
            Ok(meta) => meta,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(missing()),
            Err(e) => return Err(Error::storage(format!("checkpoint store {name}"), e)),
        };
        let refuse = |reason: &str| Error::Incompatible {
            what: format!("checkpoint store {name}"),
            reason: format!("{reason}, not a Sluice checkpoint store; it was left untouched"),
        };
        if meta.is_dir() {
            return Err(refuse("a directory"));
        }
        if meta.len() == 0 {
            return Err(refuse("an empty file"));
        }
        let open_read_only = || match ReadOnlyDatabase::open(&path) {
            Ok(db) => Ok(Some(db)),
            Err(redb::DatabaseError::RepairAborted) => Ok(None),
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => Err(already_open(&name)),
            Err(redb::DatabaseError::Storage(redb::StorageError::Io(e)))
                if e.kind() == std::io::ErrorKind::NotFound =>
            {
                Err(missing())
            }
            Err(redb::DatabaseError::Storage(redb::StorageError::Io(e)))
                if e.kind() == std::io::ErrorKind::PermissionDenied =>
            {
                Err(Error::storage(format!("checkpoint store {name}"), e))
            }
            Err(other) => Err(Error::Incompatible {
                what: format!("checkpoint store {name}"),
                reason: format!("not a redb database ({other}); it was left untouched"),
            }),
        };
        let db = match open_read_only()? {
            Some(db) => db,
            None => {
                // Left by a killed process: repair it with a writable open
                // of the existing file (never a create), check that it is
                // ours, close it, and open it read-only.
                let db = Database::open(&path).map_err(|e| match e {
                    redb::DatabaseError::DatabaseAlreadyOpen => already_open(&name),
                    other => Error::Incompatible {
                        what: format!("checkpoint store {name}"),
                        reason: format!("not a usable redb database ({other})"),
                    },
                })?;
                check_marker(&name, read_marker(&name, &db)?)?;
                drop(db);
                open_read_only()?.ok_or_else(|| {
                    Error::storage(
                        name.clone(),
                        "it could not be opened read-only after its crash repair",
                    )
                })?
            }
        };
        check_marker(&name, read_marker(&name, &db)?)?;
        Ok(RedbCheckpointStorage {
            db: Arc::new(Db::ReadOnly(db)),
            path: Arc::new(path),
        })
    }

    /// Whether the store was opened read-only ([`open_existing`](Self::open_existing)).
    pub fn is_read_only(&self) -> bool {
        matches!(*self.db, Db::ReadOnly(_))
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
        match db {
            Db::Writable(db) => db.compact().map_err(|e| Error::storage(name, e)),
            Db::ReadOnly(_) => Err(Error::storage(
                name,
                "a store opened read-only cannot be compacted",
            )),
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use redb::TableDefinition;
    use sluice_core::{CheckpointId, CheckpointStorage, CheckpointStorageExt};

    /// A store at `path` with checkpoint 1 (one state file, committed).
    async fn store_with_one_checkpoint(path: &Path) {
        let s = RedbCheckpointStorage::open(path).unwrap();
        s.write_file("chk-1/op-0.kst", Bytes::from_static(b"state"))
            .await
            .unwrap();
        s.commit_metadata(CheckpointId(1), Bytes::from_static(b"{}"))
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn open_existing_refuses_a_missing_file_naming_it_and_creates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("typo").join("checkpoints.redb");
        let e = RedbCheckpointStorage::open_existing(&path).unwrap_err();
        assert!(matches!(e, Error::NotFound { .. }), "{e}");
        let text = e.to_string();
        assert!(
            text.contains("no such file") && text.contains(&path.display().to_string()),
            "{text}"
        );
        assert!(
            !path.exists() && !dir.path().join("typo").exists(),
            "something was created"
        );
    }

    #[tokio::test]
    async fn open_existing_reads_the_store_without_changing_a_byte_and_refuses_writes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chk.redb");
        store_with_one_checkpoint(&path).await;
        let before = std::fs::read(&path).unwrap();
        {
            let s = RedbCheckpointStorage::open_existing(&path).unwrap();
            assert!(s.is_read_only());
            // Two readers at once: read-only opens share the file.
            let t = RedbCheckpointStorage::open_existing(&path).unwrap();
            assert_eq!(
                s.read_metadata(CheckpointId(1)).await.unwrap(),
                Bytes::from_static(b"{}")
            );
            assert_eq!(
                t.read_file("chk-1/op-0.kst").await.unwrap(),
                Bytes::from_static(b"state")
            );
            assert_eq!(s.list().await.unwrap().len(), 1);
            let e = s
                .write_file("chk-2/op-0.kst", Bytes::from_static(b"x"))
                .await
                .unwrap_err();
            assert!(
                matches!(e, Error::Storage { .. }) && e.to_string().contains("read-only"),
                "{e}"
            );
            let e = s
                .commit_metadata(CheckpointId(2), Bytes::from_static(b"{}"))
                .await
                .unwrap_err();
            assert!(e.to_string().contains("read-only"), "{e}");
            assert!(s.discard(CheckpointId(1)).await.is_err());
            assert!(s
                .commit_file("sp/_metadata", Bytes::from_static(b"{}"))
                .await
                .is_err());
            assert!(s.delete_dir("chk-1").await.is_err());
        }
        assert!(
            std::fs::read(&path).unwrap() == before,
            "a read-only open changed the file"
        );
        // Still a normal store for writers afterwards.
        let s = RedbCheckpointStorage::open(&path).unwrap();
        assert!(!s.is_read_only());
        assert_eq!(s.list().await.unwrap().len(), 1);
    }

    #[tokio::test]
    async fn open_existing_refuses_files_that_are_not_checkpoint_stores_and_leaves_them_untouched() {
        let dir = tempfile::tempdir().unwrap();
        let notes = dir.path().join("notes.txt");
        std::fs::write(&notes, b"notes").unwrap();
        let empty = dir.path().join("empty.redb");
        std::fs::write(&empty, b"").unwrap();
        let other = dir.path().join("other.redb");
        {
            let db = Database::create(&other).unwrap();
            let tx = db.begin_write().unwrap();
            tx.open_table(TableDefinition::<&str, &str>::new("mine")).unwrap();
            tx.commit().unwrap();
        }
        let other_bytes = std::fs::read(&other).unwrap();
        for path in [&notes, &empty, &other] {
            let e = RedbCheckpointStorage::open_existing(path).unwrap_err();
            assert!(matches!(e, Error::Incompatible { .. }), "{}: {e}", path.display());
            assert!(e.to_string().contains(&path.display().to_string()), "{e}");
        }
        let e = RedbCheckpointStorage::open_existing(dir.path()).unwrap_err();
        assert!(matches!(e, Error::Incompatible { .. }), "{e}");
        assert_eq!(std::fs::read(&notes).unwrap(), b"notes");
        assert_eq!(std::fs::read(&empty).unwrap(), b"");
        assert!(std::fs::read(&other).unwrap() == other_bytes);
    }

    #[tokio::test]
    async fn open_existing_repairs_a_store_left_by_a_killed_process_and_then_reads_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chk.redb");
        let crashed = dir.path().join("crashed.redb");
        {
            store_with_one_checkpoint(&path).await;
            // A copy taken while a writer has the file open is what a kill
            // -9 leaves: redb marks it as needing repair.
            let _writer = RedbCheckpointStorage::open(&path).unwrap();
            std::fs::copy(&path, &crashed).unwrap();
        }
        assert!(matches!(
            ReadOnlyDatabase::open(&crashed),
            Err(redb::DatabaseError::RepairAborted)
        ));
        let s = RedbCheckpointStorage::open_existing(&crashed).unwrap();
        assert!(s.is_read_only());
        assert_eq!(
            s.read_metadata(CheckpointId(1)).await.unwrap(),
            Bytes::from_static(b"{}")
        );
    }

    #[tokio::test]
    async fn a_writer_and_a_reader_of_one_file_exclude_each_other() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("chk.redb");
        store_with_one_checkpoint(&path).await;
        let reader = RedbCheckpointStorage::open_existing(&path).unwrap();
        let e = RedbCheckpointStorage::open(&path).unwrap_err();
        assert!(e.to_string().contains("open in another process"), "{e}");
        drop(reader);
        let _writer = RedbCheckpointStorage::open(&path).unwrap();
        let e = RedbCheckpointStorage::open_existing(&path).unwrap_err();
        assert!(e.to_string().contains("open in another process"), "{e}");
    }
}
