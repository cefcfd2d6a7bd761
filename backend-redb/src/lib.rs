//! # sluice-backend-redb
//!
//! Sluice's embedded, on-disk backends on [redb](https://docs.rs/redb):
//!
//! - [`RedbStateBackend`]: keyed working state in one redb file per
//!   subtask, larger than memory, behind a bounded in-memory write buffer
//!   (copy-on-write maps per key group), redb's page cache and an optional
//!   read cache. Its synchronous
//!   snapshot step shares the buffer's maps and opens a read transaction
//!   (an MVCC view); the asynchronous step streams the canonical format
//!   from that view while writes go on.
//! - [`RedbCheckpointStorage`]: checkpoints in one local redb file, with a
//!   durable, atomic metadata commit.
//!
//! ```
//! use sluice_backend_redb::RedbCheckpointStorage;
//! use sluice_core::{CheckpointId, CheckpointStorage, CheckpointStorageExt, Bytes};
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let dir = tempfile::tempdir().unwrap();
//! let storage = RedbCheckpointStorage::open(dir.path().join("checkpoints.redb")).unwrap();
//! storage.write_file("chk-1/op-0.kst", Bytes::from_static(b"state")).await.unwrap();
//! storage.commit_metadata(CheckpointId(1), Bytes::from_static(b"{}")).await.unwrap();
//! assert_eq!(sluice_core::storage::latest_completed(&storage).await.unwrap(), Some(CheckpointId(1)));
//! # });
//! ```
#![warn(missing_docs)]

mod buffer;
mod filter;
mod flushed;
mod snapshot;
mod state;
mod storage;

pub use state::{RedbStateBackend, RedbStateConfig};
pub use storage::{damage_stored_file, RedbCheckpointStorage, STORE_FORMAT};

use sluice_core::{Error, Result};

/// Maps a redb error to Sluice's: corruption detected by redb is `Corrupt`.
pub(crate) fn corrupt_or_storage(what: &str, e: impl Into<redb::Error>) -> Error {
    match e.into() {
        redb::Error::Corrupted(reason) => Error::corrupt(what, reason),
        other => Error::storage(what, other),
    }
}

/// Runs blocking redb work on tokio's blocking pool.
pub(crate) async fn spawn_db<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::storage("redb worker", e.to_string()))?
}
