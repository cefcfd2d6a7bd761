//! A state file written in parts ([`CheckpointStorage::upload`]): appended
//! to a temporary file beside its target, published like a whole write.
//!
//! [`CheckpointStorage::upload`]: sluice_core::CheckpointStorage::upload

use crate::{storage_error, Inner, Staged};
use async_trait::async_trait;
use bytes::Bytes;
use sluice_core::{Error, FileUpload, Result};
use std::io::Write;
use std::sync::Arc;

/// An upload in progress; dropped unfinished, its temporary file goes.
pub(crate) struct FsUpload {
    inner: Arc<Inner>,
    staged: Option<Staged>,
}

impl FsUpload {
    pub(crate) fn new(inner: Arc<Inner>, staged: Staged) -> Self {
        FsUpload {
            inner,
            staged: Some(staged),
        }
    }

    fn taken(&mut self) -> Result<Staged> {
        self.staged.take().ok_or_else(|| {
            Error::storage(
                self.inner.describe(),
                "an earlier part of this upload failed; it was abandoned",
            )
        })
    }
}

/// Runs blocking file work on tokio's blocking pool.
async fn blocking<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::storage(what.to_string(), e))
}

#[async_trait]
impl FileUpload for FsUpload {
    async fn put(&mut self, data: Bytes) -> Result<()> {
        let mut staged = self.taken()?;
        let (staged, written) = blocking("appending to a staged file", move || {
            let r = staged.file.write_all(&data);
            (staged, r)
        })
        .await?;
        match written {
            Ok(()) => {
                self.staged = Some(staged);
                Ok(())
            }
            Err(e) => {
                let error = storage_error("writing", &staged.tmp, e);
                let _ = std::fs::remove_file(&staged.tmp);
                Err(error)
            }
        }
    }

    async fn complete(mut self: Box<Self>) -> Result<()> {
        let staged = self.taken()?;
        let inner = self.inner.clone();
        blocking("publishing a staged file", move || inner.finish(staged, false)).await?
    }
}

impl Drop for FsUpload {
    fn drop(&mut self) {
        if let Some(staged) = self.staged.take() {
            drop(staged.file);
            let _ = std::fs::remove_file(&staged.tmp);
        }
    }
}
