//! Fault injection for reliability tests: a wrapper storage that fails or
//! slows down chosen operations, and a hook that crashes the job master
//! between the last acknowledgement and the metadata commit.
//!
//! These are wrappers around real storages (as `object_store`'s throttled
//! and limited stores are), not mocks: every operation that is not failed is
//! carried out by the wrapped storage.

use async_trait::async_trait;
use bytes::Bytes;
use sluice_core::{CheckpointId, CheckpointListing, CheckpointStorage, Error, FileListing, Result};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Called by the job master right before it commits a checkpoint's metadata.
/// An error fails the job attempt as if the job master had crashed at that
/// point: the checkpoint is not committed and the job restarts from the
/// previous completed checkpoint.
pub trait CommitHook: Send + Sync {
    /// Decides whether the job master "crashes" before committing `id`.
    fn before_commit(&self, id: CheckpointId) -> std::result::Result<(), String>;
}

/// Crashes the job master before the commit of the checkpoints listed.
#[derive(Debug, Default)]
pub struct CrashBeforeCommit {
    ids: Mutex<Vec<CheckpointId>>,
}

impl CrashBeforeCommit {
    /// Crash before committing each of `ids` (once each).
    pub fn new(ids: impl IntoIterator<Item = u64>) -> Self {
        CrashBeforeCommit {
            ids: Mutex::new(ids.into_iter().map(CheckpointId).collect()),
        }
    }
}

impl CommitHook for CrashBeforeCommit {
    fn before_commit(&self, id: CheckpointId) -> std::result::Result<(), String> {
        let mut ids = self.ids.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = ids.iter().position(|x| *x == id) {
            ids.remove(i);
            return Err(format!(
                "injected job master crash before committing checkpoint {id}"
            ));
        }
        Ok(())
    }
}

/// Which writes of a [`FaultyStorage`] fail.
#[derive(Debug, Clone, Default)]
pub struct FaultPlan {
    /// Fail the state-file writes with these sequence numbers (0-based count
    /// of `write_file` calls).
    pub fail_writes: Vec<u64>,
    /// Fail the metadata commits with these sequence numbers (checkpoint
    /// metadata and savepoint `_metadata` files, counted together).
    pub fail_commits: Vec<u64>,
    /// Delay state-file writes by this much.
    pub write_delay: Duration,
    /// If not empty, only the writes with these sequence numbers are delayed.
    pub delay_only: Vec<u64>,
}

/// A storage wrapper that fails chosen writes and delays others.
#[derive(Debug)]
pub struct FaultyStorage {
    inner: Arc<dyn CheckpointStorage>,
    plan: FaultPlan,
    writes: AtomicU64,
    commits: AtomicU64,
    injected: AtomicU64,
}

impl FaultyStorage {
    /// Wraps `inner` with `plan`.
    pub fn new(inner: Arc<dyn CheckpointStorage>, plan: FaultPlan) -> Self {
        FaultyStorage {
            inner,
            plan,
            writes: AtomicU64::new(0),
            commits: AtomicU64::new(0),
            injected: AtomicU64::new(0),
        }
    }

    /// Number of failures injected so far.
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::Relaxed)
    }

    fn fail(&self, what: String) -> Error {
        self.injected.fetch_add(1, Ordering::Relaxed);
        Error::storage(what, "injected storage failure")
    }
}

#[async_trait]
impl CheckpointStorage for FaultyStorage {
    fn describe(&self) -> String {
        format!("faulty({})", self.inner.describe())
    }

    async fn write_file(&self, path: &str, data: Bytes) -> Result<()> {
        let n = self.writes.fetch_add(1, Ordering::Relaxed);
        if !self.plan.write_delay.is_zero()
            && (self.plan.delay_only.is_empty() || self.plan.delay_only.contains(&n))
        {
            tokio::time::sleep(self.plan.write_delay).await;
        }
        if self.plan.fail_writes.contains(&n) {
            return Err(self.fail(format!("write of {path}")));
        }
        self.inner.write_file(path, data).await
    }

    async fn read_file(&self, path: &str) -> Result<Bytes> {
        self.inner.read_file(path).await
    }

    async fn read_range(&self, path: &str, range: Range<u64>) -> Result<Bytes> {
        self.inner.read_range(path, range).await
    }

    async fn commit_metadata(&self, id: CheckpointId, metadata: Bytes) -> Result<()> {
        let n = self.commits.fetch_add(1, Ordering::Relaxed);
        if self.plan.fail_commits.contains(&n) {
            return Err(self.fail(format!("metadata commit of checkpoint {id}")));
        }
        self.inner.commit_metadata(id, metadata).await
    }

    async fn read_metadata(&self, id: CheckpointId) -> Result<Bytes> {
        self.inner.read_metadata(id).await
    }

    async fn list(&self) -> Result<Vec<CheckpointListing>> {
        self.inner.list().await
    }

    async fn discard(&self, id: CheckpointId) -> Result<()> {
        self.inner.discard(id).await
    }

    /// Counted with the metadata commits (a savepoint's `_metadata`).
    async fn commit_file(&self, path: &str, data: Bytes) -> Result<()> {
        let n = self.commits.fetch_add(1, Ordering::Relaxed);
        if self.plan.fail_commits.contains(&n) {
            return Err(self.fail(format!("commit of {path}")));
        }
        self.inner.commit_file(path, data).await
    }

    async fn list_files(&self, dir: &str) -> Result<Vec<FileListing>> {
        self.inner.list_files(dir).await
    }

    async fn delete_dir(&self, dir: &str) -> Result<()> {
        self.inner.delete_dir(dir).await
    }
}

/// Fails (error or panic) when a shared counter reaches a chosen value, once.
/// Put it in a `map` to inject a task failure at a record.
#[derive(Debug)]
pub struct FailAt {
    seen: AtomicU64,
    at: u64,
    panic: bool,
}

impl FailAt {
    /// Fails on the `at`-th call (1-based) of [`FailAt::check`], with a panic
    /// if `panic`, else with an error.
    pub fn new(at: u64, panic: bool) -> Self {
        FailAt {
            seen: AtomicU64::new(0),
            at,
            panic,
        }
    }

    /// Counts one call; fails on the chosen one.
    pub fn check(&self) -> std::result::Result<(), String> {
        let n = self.seen.fetch_add(1, Ordering::Relaxed) + 1;
        if n == self.at {
            if self.panic {
                panic!("injected panic at record {n}");
            }
            return Err(format!("injected error at record {n}"));
        }
        Ok(())
    }

    /// Whether the failure has fired.
    pub fn fired(&self) -> bool {
        self.seen.load(Ordering::Relaxed) >= self.at
    }
}
