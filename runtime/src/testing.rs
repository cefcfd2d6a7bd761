//! Fault injection for reliability tests: a wrapper storage that fails or
//! slows down chosen operations, and a hook that crashes the job master
//! between the last acknowledgement and the metadata commit.
//!
//! These are wrappers around real storages (as `object_store`'s throttled
//! and limited stores are), not mocks: every operation that is not failed is
//! carried out by the wrapped storage.

use async_trait::async_trait;
use bytes::Bytes;
use sluice_core::{CheckpointId, CheckpointStorage, Error, FileListing, Result};
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
    fn before_commit(&self, id: CheckpointId) -> crate::Result<()>;
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
    fn before_commit(&self, id: CheckpointId) -> crate::Result<()> {
        let mut ids = self.ids.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = ids.iter().position(|x| *x == id) {
            ids.remove(i);
            return Err(crate::RuntimeError::Injected(format!(
                "job master crash before committing checkpoint {id}"
            )));
        }
        Ok(())
    }
}

/// A kind of storage operation a [`FaultPlan`] can disturb. Each kind has
/// its own 0-based call counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `write_file` (state and channel-state files).
    Write,
    /// `commit_file` (checkpoint and savepoint metadata).
    Commit,
    /// `read` (whole and ranged reads: restores, read-backs).
    Read,
    /// `delete_file` and `delete_dir` (discarding a checkpoint is one).
    Delete,
    /// `list_files` (listing checkpoints is one).
    List,
}

/// What a disturbed operation does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Fails before any effect, with a determinate error.
    BeforeEffect,
    /// Takes effect, then the answer is lost: an indeterminate error (a
    /// connection reset after the request was processed). For reads, a
    /// determinate error (a read has no effect).
    AfterEffect,
    /// Takes effect, the answer is lost, and the client's retry is what the
    /// caller sees: `AlreadyExists` for a create-if-absent write (an SDK
    /// retry of a PUT that had landed); for other operations, as
    /// [`Fault::AfterEffect`].
    RetriedAfterEffect,
    /// Times out without effect: an indeterminate error.
    Timeout,
    /// Waits this long, then carries the operation out.
    Slow(Duration),
}

impl Fault {
    /// A fault drawn at random (for seeded harnesses): before the effect,
    /// after it, after it with a retry, a timeout, or 1–19 ms of slowness,
    /// equally likely.
    pub fn random(rng: &mut impl rand::Rng) -> Fault {
        match rng.random_range(0..5) {
            0 => Fault::BeforeEffect,
            1 => Fault::AfterEffect,
            2 => Fault::RetriedAfterEffect,
            3 => Fault::Timeout,
            _ => Fault::Slow(Duration::from_millis(rng.random_range(1..20))),
        }
    }
}

/// One disturbed operation: the `nth` (0-based) call of kind `op`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpFault {
    /// The kind of operation.
    pub op: Op,
    /// Which call of that kind.
    pub nth: u64,
    /// What happens to it.
    pub fault: Fault,
}

impl OpFault {
    /// The `nth` call of kind `op` meets `fault`.
    pub fn new(op: Op, nth: u64, fault: Fault) -> Self {
        OpFault { op, nth, fault }
    }
}

/// Which operations of a [`FaultyStorage`] fail or slow down.
#[derive(Debug, Clone, Default)]
pub struct FaultPlan {
    /// Fail the state-file writes with these sequence numbers (0-based count
    /// of `write_file` calls) before any effect.
    pub fail_writes: Vec<u64>,
    /// Fail the metadata commits with these sequence numbers (checkpoint
    /// metadata and savepoint `_metadata` files, counted together) before
    /// any effect.
    pub fail_commits: Vec<u64>,
    /// Delay state-file writes by this much.
    pub write_delay: Duration,
    /// If not empty, only the writes with these sequence numbers are delayed.
    pub delay_only: Vec<u64>,
    /// Faults per operation kind: failures before or after the effect,
    /// retried writes, timeouts, slowness.
    pub faults: Vec<OpFault>,
}

/// A storage wrapper that disturbs chosen operations ([`FaultPlan`]).
#[derive(Debug)]
pub struct FaultyStorage {
    inner: Arc<dyn CheckpointStorage>,
    plan: FaultPlan,
    counts: [AtomicU64; 5],
    injected: AtomicU64,
}

impl FaultyStorage {
    /// Wraps `inner` with `plan`.
    pub fn new(inner: Arc<dyn CheckpointStorage>, plan: FaultPlan) -> Self {
        FaultyStorage {
            inner,
            plan,
            counts: Default::default(),
            injected: AtomicU64::new(0),
        }
    }

    /// Number of failures injected so far (slow operations not counted).
    pub fn injected(&self) -> u64 {
        self.injected.load(Ordering::Relaxed)
    }

    /// Counts a call of kind `op` and returns the fault planned for it.
    async fn fault(&self, op: Op) -> Option<Fault> {
        let n = self.counts[op as usize].fetch_add(1, Ordering::Relaxed);
        if op == Op::Write
            && !self.plan.write_delay.is_zero()
            && (self.plan.delay_only.is_empty() || self.plan.delay_only.contains(&n))
        {
            tokio::time::sleep(self.plan.write_delay).await;
        }
        let legacy = match op {
            Op::Write => &self.plan.fail_writes,
            Op::Commit => &self.plan.fail_commits,
            _ => &Vec::new(),
        };
        let fault = if legacy.contains(&n) {
            Some(Fault::BeforeEffect)
        } else {
            self.plan
                .faults
                .iter()
                .find(|f| f.op == op && f.nth == n)
                .map(|f| f.fault)
        };
        match fault {
            Some(Fault::Slow(d)) => {
                tokio::time::sleep(d).await;
                None
            }
            Some(f) => {
                self.injected.fetch_add(1, Ordering::Relaxed);
                Some(f)
            }
            None => None,
        }
    }

    /// Runs a write-like operation `run` under `fault`. `retry` is what a
    /// retry answers (the operation again, for create-if-absent writes).
    async fn disturbed<F, Fut>(&self, fault: Option<Fault>, what: String, run: F) -> Result<()>
    where
        F: Fn() -> Fut,
        Fut: std::future::Future<Output = Result<()>>,
    {
        match fault {
            None | Some(Fault::Slow(_)) => run().await,
            Some(Fault::BeforeEffect) => Err(Error::storage(what, "injected failure before any effect")),
            Some(Fault::Timeout) => Err(Error::Indeterminate {
                what,
                source: "injected timeout (no effect)".into(),
            }),
            Some(Fault::AfterEffect) => {
                run().await?;
                Err(Error::Indeterminate {
                    what,
                    source: "injected loss of the answer after the effect".into(),
                })
            }
            Some(Fault::RetriedAfterEffect) => {
                run().await?;
                // The client retries the request whose answer was lost.
                run().await
            }
        }
    }

    async fn read_fault(&self, what: String) -> Result<()> {
        match self.fault(Op::Read).await {
            None | Some(Fault::Slow(_)) => Ok(()),
            Some(Fault::Timeout) => Err(Error::Indeterminate {
                what,
                source: "injected timeout".into(),
            }),
            Some(_) => Err(Error::storage(what, "injected read failure")),
        }
    }
}

#[async_trait]
impl CheckpointStorage for FaultyStorage {
    fn describe(&self) -> String {
        format!("faulty({})", self.inner.describe())
    }

    async fn write_file(&self, path: &str, data: Bytes) -> Result<()> {
        let fault = self.fault(Op::Write).await;
        self.disturbed(fault, format!("write of {path}"), || {
            self.inner.write_file(path, data.clone())
        })
        .await
    }

    /// Counted as [`Op::Commit`] (checkpoint and savepoint metadata).
    async fn commit_file(&self, path: &str, data: Bytes) -> Result<()> {
        let fault = self.fault(Op::Commit).await;
        self.disturbed(fault, format!("commit of {path}"), || {
            self.inner.commit_file(path, data.clone())
        })
        .await
    }

    async fn read(&self, path: &str, range: Option<Range<u64>>) -> Result<Bytes> {
        self.read_fault(format!("read of {path}")).await?;
        self.inner.read(path, range).await
    }

    async fn list_files(&self, dir: &str) -> Result<Vec<FileListing>> {
        if self
            .fault(Op::List)
            .await
            .is_some_and(|f| !matches!(f, Fault::Slow(_)))
        {
            return Err(Error::storage(format!("listing {dir:?}"), "injected failure"));
        }
        self.inner.list_files(dir).await
    }

    async fn delete_file(&self, path: &str) -> Result<()> {
        let fault = self.fault(Op::Delete).await;
        self.disturbed(fault, format!("deletion of {path}"), || {
            self.inner.delete_file(path)
        })
        .await
    }

    async fn delete_dir(&self, dir: &str) -> Result<()> {
        let fault = self.fault(Op::Delete).await;
        self.disturbed(fault, format!("deletion of {dir}"), || self.inner.delete_dir(dir))
            .await
    }

    fn locate(&self, dir: &str) -> String {
        self.inner.locate(dir)
    }

    fn capabilities(&self) -> sluice_core::Capabilities {
        self.inner.capabilities()
    }
}

/// What [`file_ownership`] found: files no committed checkpoint needs, and
/// files a committed checkpoint needs that are gone.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct FileOwnership {
    /// Checkpoint files (under `chk-<id>/`) that are neither a committed
    /// checkpoint's metadata nor referenced by one.
    pub unreferenced: Vec<String>,
    /// Files a committed checkpoint references that the storage lacks.
    pub missing: Vec<String>,
}

impl FileOwnership {
    /// Neither unreferenced nor missing files.
    pub fn is_exact(&self) -> bool {
        self.unreferenced.is_empty() && self.missing.is_empty()
    }
}

/// Lists `storage` and compares its checkpoint files with the references
/// of its committed checkpoints (state files of incremental chains, channel
/// state): the check that shared files are deleted exactly when nothing
/// needs them. Savepoint directories are not looked at.
pub async fn file_ownership(storage: &dyn CheckpointStorage) -> Result<FileOwnership> {
    use sluice_core::storage::{checkpoint_of_path, metadata_path};
    use sluice_core::CheckpointStorageExt;
    let files: std::collections::BTreeSet<String> = storage
        .list_files("")
        .await?
        .into_iter()
        .map(|f| f.path)
        .filter(|p| checkpoint_of_path(p).is_some())
        .collect();
    let mut referenced = std::collections::BTreeSet::new();
    for c in storage.list().await?.into_iter().filter(|c| c.committed) {
        referenced.insert(metadata_path(c.id));
        let meta = sluice_core::metadata::read_checkpoint_metadata(storage, c.id).await?;
        referenced.extend(meta.state_files().map(|f| f.path.clone()));
        referenced.extend(meta.channel_state.iter().map(|c| c.path.clone()));
    }
    Ok(FileOwnership {
        unreferenced: files.difference(&referenced).cloned().collect(),
        missing: referenced.difference(&files).cloned().collect(),
    })
}

/// Waits until the job of `monitor` has completed a checkpoint; panics
/// (naming the wait) after `timeout`. For tests that must fail a job after
/// its first checkpoint.
pub async fn wait_for_completed_checkpoint(monitor: &crate::JobMonitor, timeout: Duration) {
    let started = std::time::Instant::now();
    while !monitor
        .checkpoint_stats()
        .iter()
        .any(|s| s.status == crate::CheckpointStatus::Completed)
    {
        assert!(
            started.elapsed() < timeout,
            "no checkpoint completed within {timeout:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Waits for `workers` to stop on their own (a job's workers do once the
/// job ended) and to end well; panics after 10 s each or on an error.
pub async fn workers_end_well(workers: impl IntoIterator<Item = crate::cluster::WorkerHandle>) {
    for w in workers {
        tokio::time::timeout(Duration::from_secs(10), w.wait())
            .await
            .expect("the worker stops when the job ends")
            .expect("the worker ends well");
    }
}
