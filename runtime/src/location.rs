//! Checkpoint storages and savepoint locations named by strings, as the CLI
//! and the REST API take them (backends behind cargo features):
//!
//! | string | storage | directory |
//! | --- | --- | --- |
//! | `redb:PATH` | the redb file at `PATH` | its root |
//! | `redb:PATH#DIR` | the redb file at `PATH` | `DIR` |
//! | `file:PATH` or `/PATH` | the directory `PATH`'s parent (as a storage: `PATH`) | `PATH`'s last segment |
//! | `file:PATH#DIR` | the directory `PATH` | `DIR` |
//! | `s3://bucket/a/b/c` | bucket, key prefix `a/b` (as a storage: `a/b/c`) | `c` |
//! | `memory` | a new in-process storage (storages only) | — |
//!
//! `file:PATH` names a directory as an `s3://` URL names a key prefix: as a
//! checkpoint storage (`--storage`) the directory is the storage's root; as
//! a location (a savepoint, a savepoint target, `chk-<id>`) it is a
//! directory of the storage rooted at its parent, so the address a
//! directory storage gives a savepoint (`file:/data/sp/savepoint-9-1a2b3c`)
//! reads back as the same files, and a checkpoint directory
//! (`file:/data/chk/chk-7`) as that checkpoint. An absolute path with no
//! prefix is a `file:` path; `file:///PATH` is accepted too.
//!
//! A redb file can be opened only once at a time, so redb storages are
//! shared by path within the process: the job's checkpoint file can also
//! hold its savepoints.
//!
//! Tools that only read open with [`OpenMode::ReadOnly`]: nothing is
//! created or written (a mistyped redb path or directory is a "no such
//! file" or "no such directory" error, not a new empty store).

use crate::savepoint::SavepointLocation;
use sluice_core::{CheckpointStorage, Error, Result};
use std::sync::Arc;

/// Where S3 requests go when a string names an S3 location: the endpoint
/// override (else `AWS_ENDPOINT_URL` or AWS's own).
#[derive(Debug, Clone, Default)]
pub struct S3Options {
    /// `--s3-endpoint`.
    pub endpoint: Option<String>,
}

/// How a storage named by a string is opened.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OpenMode {
    /// For reading and writing (a job's checkpoint storage, a savepoint
    /// target): a missing redb file or directory is created.
    #[default]
    ReadWrite,
    /// For reading only (`sluice inspect`, `sluice checkpoints list`, the
    /// source of `sluice copy`): nothing is created or written. A redb file
    /// must exist and be a checkpoint store, and is opened read-only
    /// (`RedbCheckpointStorage::open_existing`); a directory must exist
    /// (`FsCheckpointStorage::open_existing`); S3 is opened without the
    /// conditional-write probe (`S3CheckpointStorage::open_read_only`).
    /// Writes through the storage fail. A redb file already open in this
    /// process is shared as it is (possibly writable).
    ReadOnly,
}

fn unknown(spec: &str) -> Error {
    Error::InvalidArgument {
        what: format!("location {spec:?}"),
        reason: "use redb:PATH[#DIR], file:PATH[#DIR] (or an absolute path), or s3://bucket/prefix (memory \
                 lives in one process only)"
            .into(),
    }
}

/// Opens the checkpoint storage named by `spec` (`memory`, `redb:PATH`,
/// `file:PATH` or an absolute path: the whole directory is the storage's,
/// `s3://bucket/prefix`: the whole prefix is the storage's) for reading and
/// writing.
pub async fn open_storage(spec: &str, s3: &S3Options) -> Result<Arc<dyn CheckpointStorage>> {
    open_storage_with(spec, s3, OpenMode::ReadWrite).await
}

/// [`open_storage`] in the given mode.
pub async fn open_storage_with(
    spec: &str,
    s3: &S3Options,
    mode: OpenMode,
) -> Result<Arc<dyn CheckpointStorage>> {
    if spec == "memory" {
        return memory_storage();
    }
    if let Some(path) = spec.strip_prefix("redb:") {
        return redb_storage(path, mode);
    }
    if spec.starts_with("s3://") {
        return s3_storage(spec, None, s3, mode).await;
    }
    if let Some(path) = file_path(spec) {
        return fs_storage(path?, mode);
    }
    Err(unknown(spec))
}

/// Opens the savepoint location (or savepoint target) named by `spec`:
/// `redb:PATH[#DIR]`, `file:PATH[#DIR]` (or an absolute path) or
/// `s3://bucket/prefix/dir`, for reading and writing.
pub async fn open_location(spec: &str, s3: &S3Options) -> Result<SavepointLocation> {
    open_location_with(spec, s3, OpenMode::ReadWrite).await
}

/// [`open_location`] in the given mode.
pub async fn open_location_with(spec: &str, s3: &S3Options, mode: OpenMode) -> Result<SavepointLocation> {
    if let Some(rest) = spec.strip_prefix("redb:") {
        let (path, dir) = split_redb(rest);
        return SavepointLocation::new(redb_storage(path, mode)?, dir);
    }
    if let Some(rest) = spec.strip_prefix("s3://") {
        let rest = rest.trim_end_matches('/');
        let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
        let (prefix, dir) = key.rsplit_once('/').unwrap_or(("", key));
        let storage = s3_storage(&format!("s3://{bucket}/{prefix}"), Some(prefix), s3, mode).await?;
        return SavepointLocation::new(storage, dir);
    }
    if let Some(path) = file_path(spec) {
        let (root, dir) = split_file(path?)?;
        return SavepointLocation::new(fs_storage(root, mode)?, dir);
    }
    Err(unknown(spec))
}

/// Opens the source and the destination of a copy: the source read-only
/// (it must exist; nothing is created for it), the destination for
/// writing. When both are in one redb file, which cannot be open read-only
/// and for writing at once, the source is first checked read-only and
/// then shares the destination's writable handle.
pub async fn open_copy_locations(
    src: &str,
    dst: &str,
    s3: &S3Options,
) -> Result<(SavepointLocation, SavepointLocation)> {
    let from = open_location_with(src, s3, OpenMode::ReadOnly).await?;
    let same_file = match (redb_file(src), redb_file(dst)) {
        (Some(a), Some(b)) => a == b,
        _ => false,
    };
    if !same_file {
        let to = open_location(dst, s3).await?;
        return Ok((from, to));
    }
    drop(from);
    let to = open_location(dst, s3).await?;
    let from = open_location_with(src, s3, OpenMode::ReadOnly).await?;
    Ok((from, to))
}

/// `PATH` and `DIR` of `PATH[#DIR]`.
fn split_redb(rest: &str) -> (&str, &str) {
    rest.rsplit_once('#').unwrap_or((rest, ""))
}

/// The path of a `file:PATH`, `file:///PATH` or `file://localhost/PATH`
/// spec, or of a bare absolute path; `None` for any other spec.
fn file_path(spec: &str) -> Option<Result<&str>> {
    if let Some(rest) = spec.strip_prefix("file://") {
        let path = rest.strip_prefix("localhost").unwrap_or(rest);
        return Some(match path.starts_with('/') {
            true => Ok(path),
            false => Err(Error::InvalidArgument {
                what: format!("location {spec:?}"),
                reason: "a file:// URL names a host; write file:/PATH or file:///PATH".into(),
            }),
        });
    }
    match spec.strip_prefix("file:") {
        Some(path) => Some(Ok(path)),
        None => spec.starts_with('/').then_some(Ok(spec)),
    }
}

/// The storage root and the directory of a `file:` location: `PATH#DIR`,
/// else `PATH`'s parent and its last segment.
fn split_file(path: &str) -> Result<(&str, &str)> {
    if let Some(split) = path.rsplit_once('#') {
        return Ok(split);
    }
    let trimmed = path.trim_end_matches('/');
    match trimmed.rsplit_once('/') {
        Some(("", dir)) => Ok(("/", dir)),
        Some(split) => Ok(split),
        None if !trimmed.is_empty() => Ok((".", trimmed)),
        None => Err(Error::InvalidArgument {
            what: format!("file:{path}"),
            reason: "names no directory; e.g. file:./sluice-data/savepoints".into(),
        }),
    }
}

/// The absolute path of the redb file a `redb:PATH[#DIR]` spec names (the
/// key under which it is shared in the process).
fn redb_file(spec: &str) -> Option<std::path::PathBuf> {
    let (path, _) = split_redb(spec.strip_prefix("redb:")?);
    std::path::absolute(path).ok()
}

#[cfg(feature = "memory")]
fn memory_storage() -> Result<Arc<dyn CheckpointStorage>> {
    Ok(Arc::new(sluice_backend_memory::MemoryCheckpointStorage::new()))
}

#[cfg(not(feature = "memory"))]
fn memory_storage() -> Result<Arc<dyn CheckpointStorage>> {
    Err(not_built("memory", "memory"))
}

#[allow(dead_code)]
fn not_built(what: &str, feature: &str) -> Error {
    Error::InvalidArgument {
        what: format!("{what} storage"),
        reason: format!("this build of sluice-runtime has no `{feature}` feature"),
    }
}

#[cfg(feature = "redb")]
fn redb_storage(path: &str, mode: OpenMode) -> Result<Arc<dyn CheckpointStorage>> {
    use sluice_backend_redb::RedbCheckpointStorage;
    use std::collections::HashMap;
    use std::path::PathBuf;
    use std::sync::{Mutex, OnceLock, Weak};
    static OPEN: OnceLock<Mutex<HashMap<PathBuf, Weak<RedbCheckpointStorage>>>> = OnceLock::new();
    if path.is_empty() {
        return Err(Error::InvalidArgument {
            what: "redb:".into(),
            reason: "needs a file path, e.g. redb:./sluice-data/checkpoints.redb".into(),
        });
    }
    let key = std::path::absolute(path).map_err(|e| Error::InvalidArgument {
        what: format!("redb:{path}"),
        reason: e.to_string(),
    })?;
    let mut open = OPEN
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(s) = open.get(&key).and_then(Weak::upgrade) {
        if mode == OpenMode::ReadWrite && s.is_read_only() {
            return Err(Error::storage(
                format!("redb:{path}"),
                "the checkpoint store is open read-only in this process; it cannot also be opened for writing",
            ));
        }
        return Ok(s);
    }
    let storage = Arc::new(match mode {
        OpenMode::ReadWrite => RedbCheckpointStorage::open(path)?,
        OpenMode::ReadOnly => RedbCheckpointStorage::open_existing(path)?,
    });
    open.retain(|_, w| w.strong_count() > 0);
    open.insert(key, Arc::downgrade(&storage));
    Ok(storage)
}

#[cfg(not(feature = "redb"))]
fn redb_storage(_path: &str, _mode: OpenMode) -> Result<Arc<dyn CheckpointStorage>> {
    Err(not_built("redb", "redb"))
}

#[cfg(feature = "fs")]
fn fs_storage(path: &str, mode: OpenMode) -> Result<Arc<dyn CheckpointStorage>> {
    use sluice_backend_fs::FsCheckpointStorage;
    if path.is_empty() {
        return Err(Error::InvalidArgument {
            what: "file:".into(),
            reason: "needs a directory, e.g. file:./sluice-data/checkpoints".into(),
        });
    }
    Ok(Arc::new(match mode {
        OpenMode::ReadWrite => FsCheckpointStorage::open(path)?,
        OpenMode::ReadOnly => FsCheckpointStorage::open_existing(path)?,
    }))
}

#[cfg(not(feature = "fs"))]
fn fs_storage(_path: &str, _mode: OpenMode) -> Result<Arc<dyn CheckpointStorage>> {
    Err(not_built("fs", "fs"))
}

/// `prefix`: the key prefix, if the caller split it off already.
#[cfg(feature = "s3")]
async fn s3_storage(
    spec: &str,
    prefix: Option<&str>,
    s3: &S3Options,
    mode: OpenMode,
) -> Result<Arc<dyn CheckpointStorage>> {
    use sluice_backend_s3::S3CheckpointStorage;
    let mut config = sluice_backend_s3::S3Config::from_url(spec)?;
    if let Some(p) = prefix {
        config.prefix = p.to_string();
    }
    config.endpoint_url = s3.endpoint.clone();
    Ok(Arc::new(match mode {
        OpenMode::ReadWrite => S3CheckpointStorage::open(config).await?,
        OpenMode::ReadOnly => S3CheckpointStorage::open_read_only(config).await?,
    }))
}

#[cfg(not(feature = "s3"))]
async fn s3_storage(
    _spec: &str,
    _prefix: Option<&str>,
    _s3: &S3Options,
    _mode: OpenMode,
) -> Result<Arc<dyn CheckpointStorage>> {
    Err(not_built("s3", "s3"))
}

#[cfg(all(test, feature = "redb"))]
mod tests {
    use super::*;

    #[tokio::test]
    async fn redb_locations_share_one_open_file_and_round_trip_through_describe() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.redb");
        let spec = format!("redb:{}#savepoints/sp-1", path.display());
        let loc = open_location(&spec, &S3Options::default()).await.unwrap();
        assert_eq!(loc.dir, "savepoints/sp-1");
        assert_eq!(loc.describe(), spec);
        // The same file again (as the job's checkpoint storage): shared, not
        // refused as "already open".
        let storage = open_storage(&format!("redb:{}", path.display()), &S3Options::default())
            .await
            .unwrap();
        assert!(Arc::ptr_eq(&storage, &loc.storage));
        assert!(open_location("memory#x", &S3Options::default()).await.is_err());
        assert!(open_location("redb:", &S3Options::default()).await.is_err());
        assert!(
            open_location(&format!("redb:{}#../up", path.display()), &S3Options::default())
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn a_read_only_open_of_a_missing_redb_file_names_it_and_creates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("typo.redb");
        let s3 = S3Options::default();
        let spec = format!("redb:{}", path.display());
        let e = open_storage_with(&spec, &s3, OpenMode::ReadOnly)
            .await
            .unwrap_err();
        assert!(
            e.is_not_found() && e.to_string().contains(&path.display().to_string()),
            "{e}"
        );
        let e = open_location_with(&format!("{spec}#sp-1"), &s3, OpenMode::ReadOnly)
            .await
            .unwrap_err();
        assert!(e.is_not_found(), "{e}");
        let e = open_copy_locations(&format!("{spec}#sp-1"), &format!("{spec}#sp-2"), &s3)
            .await
            .unwrap_err();
        assert!(e.is_not_found(), "{e}");
        assert!(!path.exists(), "a read-only open created {}", path.display());
    }

    #[tokio::test]
    async fn a_read_only_open_shares_a_redb_file_open_for_writing_but_not_the_other_way_round() {
        let dir = tempfile::tempdir().unwrap();
        let s3 = S3Options::default();
        let spec = format!("redb:{}", dir.path().join("a.redb").display());
        let writer = open_storage(&spec, &s3).await.unwrap();
        let reader = open_storage_with(&spec, &s3, OpenMode::ReadOnly).await.unwrap();
        assert!(Arc::ptr_eq(&writer, &reader));
        drop((writer, reader));
        let _reader = open_storage_with(&spec, &s3, OpenMode::ReadOnly).await.unwrap();
        let e = open_storage(&spec, &s3).await.unwrap_err();
        assert!(e.to_string().contains("open read-only in this process"), "{e}");
    }

    #[tokio::test]
    async fn a_copy_within_one_redb_file_shares_one_writable_handle() {
        let dir = tempfile::tempdir().unwrap();
        let s3 = S3Options::default();
        let file = dir.path().join("sp.redb");
        drop(
            open_storage(&format!("redb:{}", file.display()), &s3)
                .await
                .unwrap(),
        );
        let (from, to) = open_copy_locations(
            &format!("redb:{}#sp-1", file.display()),
            &format!("redb:{}#copies/sp-1", file.display()),
            &s3,
        )
        .await
        .unwrap();
        assert!(Arc::ptr_eq(&from.storage, &to.storage));
        assert_eq!((from.dir.as_str(), to.dir.as_str()), ("sp-1", "copies/sp-1"));
        to.storage
            .commit_file("copies/sp-1/_metadata", bytes::Bytes::from_static(b"{}"))
            .await
            .unwrap();
        drop((from, to));
        // Different files: the source is read-only.
        let other = dir.path().join("other.redb");
        let (from, _to) = open_copy_locations(
            &format!("redb:{}#copies/sp-1", file.display()),
            &format!("redb:{}#sp-1", other.display()),
            &s3,
        )
        .await
        .unwrap();
        let e = from
            .storage
            .commit_file("x/_metadata", bytes::Bytes::from_static(b"{}"))
            .await
            .unwrap_err();
        assert!(e.to_string().contains("read-only"), "{e}");
    }
}

#[cfg(all(test, feature = "fs"))]
mod fs_tests {
    use super::*;
    use bytes::Bytes;
    use sluice_core::CheckpointStorageExt;

    #[tokio::test]
    async fn file_locations_read_back_as_the_same_directory_in_every_spelling() {
        let dir = tempfile::tempdir().unwrap();
        let s3 = S3Options::default();
        let root = dir.path().join("sp");
        let target = open_location(&format!("file:{}", root.display()), &s3)
            .await
            .unwrap();
        assert_eq!(target.dir, "sp");
        let sp = target.child("savepoint-9-1a2b3c");
        sp.storage
            .commit_file(&sp.join("_metadata"), Bytes::from_static(b"{}"))
            .await
            .unwrap();
        let address = sp.describe();
        assert_eq!(address, format!("file:{}/savepoint-9-1a2b3c", root.display()));
        for spec in [
            address.clone(),
            format!("file:{}#savepoint-9-1a2b3c", root.display()),
            format!("file://{}/savepoint-9-1a2b3c/", root.display()),
            format!("file://localhost{}/savepoint-9-1a2b3c", root.display()),
            format!("{}/savepoint-9-1a2b3c", root.display()),
        ] {
            let loc = open_location_with(&spec, &s3, OpenMode::ReadOnly).await.unwrap();
            assert_eq!(
                loc.storage.read_file(&loc.join("_metadata")).await.unwrap(),
                Bytes::from_static(b"{}"),
                "{spec}"
            );
            assert_eq!(loc.describe(), address, "{spec}");
        }
        // As a storage, the whole directory is the root.
        let storage = open_storage(&format!("file:{}", root.display()), &s3)
            .await
            .unwrap();
        assert_eq!(storage.list_files("").await.unwrap().len(), 1);
        assert_eq!(storage.describe(), format!("file:{}", root.display()));
        for bad in ["file:", "file:/", "file://host/x"] {
            assert!(open_location(bad, &s3).await.is_err(), "{bad}");
        }
        assert!(open_storage("file:", &s3).await.is_err());
    }

    #[tokio::test]
    async fn a_read_only_open_of_a_missing_directory_names_it_and_creates_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let s3 = S3Options::default();
        let missing = dir.path().join("typo");
        let spec = format!("file:{}", missing.display());
        let e = open_storage_with(&spec, &s3, OpenMode::ReadOnly)
            .await
            .unwrap_err();
        assert!(
            e.is_not_found() && e.to_string().contains(&missing.display().to_string()),
            "{e}"
        );
        let e = open_location_with(&format!("{spec}/sp-1"), &s3, OpenMode::ReadOnly)
            .await
            .unwrap_err();
        assert!(
            e.is_not_found() && e.to_string().contains(&missing.display().to_string()),
            "{e}"
        );
        let e = open_copy_locations(&format!("{spec}#sp-1"), &format!("{spec}#sp-2"), &s3)
            .await
            .unwrap_err();
        assert!(e.is_not_found(), "{e}");
        assert!(
            !missing.exists(),
            "a read-only open created {}",
            missing.display()
        );
    }
}
