//! Checkpoint storages and savepoint locations named by strings, as the CLI
//! and the REST API take them (backends behind cargo features):
//!
//! | string | storage | directory |
//! | --- | --- | --- |
//! | `redb:PATH` | the redb file at `PATH` | its root |
//! | `redb:PATH#DIR` | the redb file at `PATH` | `DIR` |
//! | `s3://bucket/a/b/c` | bucket, key prefix `a/b` | `c` |
//! | `memory` | a new in-process storage (storages only) | — |
//!
//! A redb file can be opened only once at a time, so redb storages are
//! shared by path within the process: the job's checkpoint file can also
//! hold its savepoints.

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

fn unknown(spec: &str) -> Error {
    Error::InvalidArgument {
        what: format!("location {spec:?}"),
        reason: "use redb:PATH[#DIR] or s3://bucket/prefix (memory lives in one process only)".into(),
    }
}

/// Opens the checkpoint storage named by `spec` (`memory`, `redb:PATH`,
/// `s3://bucket/prefix`: the whole prefix is the storage's).
pub async fn open_storage(spec: &str, s3: &S3Options) -> Result<Arc<dyn CheckpointStorage>> {
    if spec == "memory" {
        return memory_storage();
    }
    if let Some(path) = spec.strip_prefix("redb:") {
        return redb_storage(path);
    }
    if spec.starts_with("s3://") {
        return s3_storage(spec, None, s3).await;
    }
    Err(unknown(spec))
}

/// Opens the savepoint location (or savepoint target) named by `spec`:
/// `redb:PATH[#DIR]` or `s3://bucket/prefix/dir`.
pub async fn open_location(spec: &str, s3: &S3Options) -> Result<SavepointLocation> {
    if let Some(rest) = spec.strip_prefix("redb:") {
        let (path, dir) = match rest.rsplit_once('#') {
            Some((p, d)) => (p, d),
            None => (rest, ""),
        };
        return SavepointLocation::new(redb_storage(path)?, dir);
    }
    if let Some(rest) = spec.strip_prefix("s3://") {
        let rest = rest.trim_end_matches('/');
        let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
        let (prefix, dir) = key.rsplit_once('/').unwrap_or(("", key));
        let storage = s3_storage(&format!("s3://{bucket}/{prefix}"), Some(prefix), s3).await?;
        return SavepointLocation::new(storage, dir);
    }
    Err(unknown(spec))
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
fn redb_storage(path: &str) -> Result<Arc<dyn CheckpointStorage>> {
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
        return Ok(s);
    }
    let storage = Arc::new(RedbCheckpointStorage::open(path)?);
    open.retain(|_, w| w.strong_count() > 0);
    open.insert(key, Arc::downgrade(&storage));
    Ok(storage)
}

#[cfg(not(feature = "redb"))]
fn redb_storage(_path: &str) -> Result<Arc<dyn CheckpointStorage>> {
    Err(not_built("redb", "redb"))
}

/// `prefix`: the key prefix, if the caller split it off already.
#[cfg(feature = "s3")]
async fn s3_storage(spec: &str, prefix: Option<&str>, s3: &S3Options) -> Result<Arc<dyn CheckpointStorage>> {
    let mut config = sluice_backend_s3::S3Config::from_url(spec)?;
    if let Some(p) = prefix {
        config.prefix = p.to_string();
    }
    config.endpoint_url = s3.endpoint.clone();
    Ok(Arc::new(
        sluice_backend_s3::S3CheckpointStorage::open(config).await?,
    ))
}

#[cfg(not(feature = "s3"))]
async fn s3_storage(
    _spec: &str,
    _prefix: Option<&str>,
    _s3: &S3Options,
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
}
