//! The in-memory checkpoint storage.

use async_trait::async_trait;
use bytes::Bytes;
use sluice_core::storage::{dir_prefix, validate_dir, validate_path, Capabilities};
use sluice_core::{CheckpointStorage, Error, FileListing, Result};
use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};

#[derive(Debug, Default)]
struct Inner {
    files: BTreeMap<String, Bytes>,
}

/// Checkpoints in memory. Clones share the same data, so a job restarted in
/// the same process finds its checkpoints; they are gone when the process
/// ends (not [`Capabilities::durable`]).
#[derive(Debug, Clone, Default)]
pub struct MemoryCheckpointStorage {
    inner: Arc<Mutex<Inner>>,
}

impl MemoryCheckpointStorage {
    /// An empty storage.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Total bytes held (files and metadata).
    pub fn total_bytes(&self) -> u64 {
        self.lock().files.values().map(|b| b.len() as u64).sum()
    }
}

#[async_trait]
impl CheckpointStorage for MemoryCheckpointStorage {
    fn describe(&self) -> String {
        "memory".into()
    }

    async fn write_file(&self, path: &str, data: Bytes) -> Result<()> {
        validate_path(path)?;
        let mut inner = self.lock();
        if inner.files.contains_key(path) {
            return Err(Error::AlreadyExists {
                what: path.to_string(),
            });
        }
        inner.files.insert(path.to_string(), data);
        Ok(())
    }

    async fn commit_file(&self, path: &str, data: Bytes) -> Result<()> {
        // Memory is as durable as it gets here: the same as a write.
        self.write_file(path, data).await
    }

    async fn read(&self, path: &str, range: Option<Range<u64>>) -> Result<Bytes> {
        let file = self
            .lock()
            .files
            .get(path)
            .cloned()
            .ok_or_else(|| Error::not_found(path))?;
        let Some(range) = range else {
            return Ok(file);
        };
        let len = file.len() as u64;
        if range.start > range.end || range.end > len {
            return Err(Error::corrupt(
                path,
                format!(
                    "range {}..{} is outside the file's {len} bytes",
                    range.start, range.end
                ),
            ));
        }
        Ok(file.slice(range.start as usize..range.end as usize))
    }

    async fn list_files(&self, dir: &str) -> Result<Vec<FileListing>> {
        validate_dir(dir, true)?;
        let prefix = dir_prefix(dir);
        Ok(self
            .lock()
            .files
            .range(prefix.clone()..)
            .take_while(|(p, _)| p.starts_with(&prefix))
            .map(|(p, b)| FileListing {
                path: p.clone(),
                size: b.len() as u64,
            })
            .collect())
    }

    async fn delete_file(&self, path: &str) -> Result<()> {
        validate_path(path)?;
        self.lock().files.remove(path);
        Ok(())
    }

    async fn delete_dir(&self, dir: &str) -> Result<()> {
        validate_dir(dir, false)?;
        let prefix = dir_prefix(dir);
        // One lock: the directory disappears at once.
        self.lock().files.retain(|p, _| !p.starts_with(&prefix));
        Ok(())
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            atomic_create: true,
            durable: false,
        }
    }
}
