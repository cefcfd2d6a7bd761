//! The public face of a running job: [`JobHandle`] and its cloneable view
//! [`JobMonitor`] (triggers, cancel, statistics), and the types they report
//! ([`JobResult`], [`JobStatus`], [`CheckpointStats`], [`Savepoint`]).
//! Requests reach the job master over a channel ([`Request`]).

use crate::error::{Result, RuntimeError};
use crate::metrics::Metrics;
use crate::savepoint::SavepointLocation;
use sluice_core::{CheckpointId, CheckpointKind};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, oneshot};

/// The outcome of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CheckpointStatus {
    /// Triggered, not yet complete.
    InProgress,
    /// Metadata committed.
    Completed,
    /// Aborted; the reason.
    Failed(String),
    /// The metadata commit's outcome is unknown (its answer was lost and
    /// reading it back failed): not used, not notified, files kept, until a
    /// later read-back decides.
    Unresolved(String),
}

/// Statistics of one checkpoint.
#[derive(Debug, Clone)]
pub struct CheckpointStats {
    /// The checkpoint's id.
    pub id: CheckpointId,
    /// Checkpoint or savepoint.
    pub kind: CheckpointKind,
    /// Trigger time, milliseconds since the Unix epoch.
    pub trigger_time_ms: u64,
    /// Status.
    pub status: CheckpointStatus,
    /// Trigger to commit (or to abort).
    pub duration: Duration,
    /// Bytes of the state files the checkpoint references (its full size).
    pub state_size: u64,
    /// Bytes of the state files it wrote itself: less than `state_size`
    /// when it is incremental (Flink's "checkpointed data size").
    pub written_size: u64,
    /// Per task: time from its first to its last barrier.
    pub alignment: Vec<Duration>,
    /// Longest synchronous snapshot part of any task.
    pub sync_max: Duration,
    /// Longest asynchronous snapshot part of any task.
    pub async_max: Duration,
    /// Bytes of channel state (records in flight; unaligned checkpoints).
    pub channel_state_size: u64,
    /// Every task's acknowledgement so far, in the order they came.
    pub subtasks: Vec<SubtaskCheckpointStats>,
    /// Completed: the bytes of state each operator (by uid) references.
    pub operators: Vec<(String, u64)>,
}

/// One task's part of a checkpoint (Flink's per-subtask checkpoint detail).
#[derive(Debug, Clone, serde::Serialize)]
pub struct SubtaskCheckpointStats {
    /// The task, `name (subtask/parallelism)`.
    pub task: String,
    /// Trigger to its acknowledgement.
    pub acknowledged_after: Duration,
    /// Trigger to its first barrier.
    pub start_delay: Duration,
    /// First to last barrier.
    pub alignment: Duration,
    /// Its synchronous snapshot part.
    pub sync: Duration,
    /// Its asynchronous part (writing the files).
    pub async_part: Duration,
    /// Bytes of the files it wrote (state and channel state).
    pub state_size: u64,
}

impl CheckpointStats {
    /// The longest alignment of any task.
    pub fn alignment_max(&self) -> Duration {
        self.alignment.iter().copied().max().unwrap_or_default()
    }
}

/// A recovery from a failed attempt.
#[derive(Debug, Clone)]
pub struct Recovery {
    /// What failed.
    pub cause: String,
    /// The checkpoint (or savepoint) restored (None: started from scratch).
    pub restored_from: Option<CheckpointId>,
}

/// A completed savepoint.
#[derive(Debug, Clone)]
pub struct Savepoint {
    /// Its id (from the job's checkpoint id sequence).
    pub id: CheckpointId,
    /// Its directory.
    pub location: SavepointLocation,
}

impl Savepoint {
    /// Where it is, as a user writes it (`s3://bucket/prefix/savepoint-7-1a2b3c`).
    pub fn path(&self) -> String {
        self.location.describe()
    }
}

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum JobState {
    /// Tasks are running.
    Running,
    /// An attempt failed; the job waits to restart.
    Restarting,
    /// The job ended normally (or was stopped with a savepoint).
    Finished,
    /// The job ended with an error.
    Failed,
    /// The job was cancelled.
    Cancelled,
}

/// A job's status, for monitoring (the REST API's `GET /job`).
#[derive(Debug, Clone, serde::Serialize)]
pub struct JobStatus {
    /// The job's name.
    pub name: String,
    /// Its state.
    pub state: JobState,
    /// Restarts so far.
    pub restarts: u32,
    /// Records emitted by the sources (replays count again).
    pub source_records: u64,
    /// Milliseconds the job has run: since it started while it runs (or
    /// restarts), its whole run time once it ended (the clock stops then;
    /// Flink reports -1 for an ended job instead).
    pub uptime_ms: u64,
    /// The savepoint or checkpoint the job started from, if any.
    pub restored_from: Option<String>,
    /// Why the job failed, if it did.
    pub failure: Option<String>,
    /// Every restart so far, oldest first.
    pub restart_history: Vec<RestartEvent>,
}

/// A restart of the job, for monitoring.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RestartEvent {
    /// When the job restarted, milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// What failed.
    pub cause: String,
    /// The checkpoint restored (`None`: restarted from scratch).
    pub restored_from: Option<u64>,
}

/// How a job ended.
#[derive(Debug, Clone)]
pub struct JobResult {
    /// Restarts made.
    pub restarts: u32,
    /// Checkpoints completed.
    pub completed_checkpoints: u64,
    /// The last completed checkpoint.
    pub last_checkpoint: Option<CheckpointId>,
    /// The checkpoint the job was resumed from at start, if any.
    pub resumed_from: Option<CheckpointId>,
    /// The final checkpoint taken when every source reached its end: it
    /// holds the job's final state.
    pub final_checkpoint: Option<CheckpointId>,
    /// The savepoint the job was stopped with ([`JobHandle::stop_with_savepoint`]).
    pub stopped_with_savepoint: Option<Savepoint>,
    /// The savepoint (or other storage's checkpoint) the job started from.
    pub restored_from_savepoint: Option<String>,
    /// Every recovery, in order.
    pub recoveries: Vec<Recovery>,
    /// Wall time of the whole job.
    pub duration: Duration,
}

/// Where the job master answers a checkpoint request.
pub(crate) type CheckpointResponder = oneshot::Sender<std::result::Result<CheckpointId, String>>;

/// Where the job master answers a savepoint request.
pub(crate) type SavepointResponder = oneshot::Sender<std::result::Result<Savepoint, String>>;

/// A request from a handle to the job master.
pub(crate) enum Request {
    /// Trigger a checkpoint now.
    Trigger(CheckpointResponder),
    /// Take a savepoint under `target` (and stop the job, with `stop`).
    Savepoint {
        target: SavepointLocation,
        stop: bool,
        tx: SavepointResponder,
    },
    /// Cancel the job.
    Cancel,
}

/// A running job.
pub struct JobHandle {
    pub(crate) monitor: JobMonitor,
    pub(crate) join: tokio::task::JoinHandle<Result<JobResult>>,
}

/// A cloneable view of a running job: statistics, triggers, cancel.
#[derive(Clone)]
pub struct JobMonitor {
    pub(crate) requests: mpsc::UnboundedSender<Request>,
    pub(crate) stats: StatsLog,
    pub(crate) metrics: Arc<Metrics>,
    /// The job master keeps the state, restarts, failure and, once the
    /// job ended, `uptime_ms`.
    pub(crate) status: Arc<Mutex<JobStatus>>,
    pub(crate) started: Instant,
    /// When the job started, milliseconds since the Unix epoch.
    pub(crate) started_ms: u64,
}

impl JobMonitor {
    /// Triggers a checkpoint now and waits until it completes
    /// ([`RuntimeError::CheckpointFailed`] if it fails or its outcome is
    /// unknown, [`RuntimeError::JobNotRunning`] if the job ended).
    pub async fn trigger_checkpoint(&self) -> Result<CheckpointId> {
        let (tx, rx) = oneshot::channel();
        self.requests
            .send(Request::Trigger(tx))
            .map_err(|_| RuntimeError::JobNotRunning)?;
        match rx.await {
            Ok(r) => r.map_err(|reason| RuntimeError::CheckpointFailed { reason }),
            Err(_) => Err(RuntimeError::CheckpointFailed {
                reason: "the job attempt ended before the checkpoint completed".into(),
            }),
        }
    }

    /// Triggers a savepoint into a new directory under `target` and waits
    /// until it completes or fails. The job goes on.
    pub async fn trigger_savepoint(&self, target: SavepointLocation) -> Result<Savepoint> {
        self.savepoint(target, false).await
    }

    /// Takes a savepoint into a new directory under `target`; the sources
    /// emit nothing after its barrier and, once it is complete, the job ends
    /// cleanly ([`JobResult::stopped_with_savepoint`]). If the savepoint
    /// fails, the job goes on running.
    pub async fn stop_with_savepoint(&self, target: SavepointLocation) -> Result<Savepoint> {
        self.savepoint(target, true).await
    }

    async fn savepoint(&self, target: SavepointLocation, stop: bool) -> Result<Savepoint> {
        let (tx, rx) = oneshot::channel();
        self.requests
            .send(Request::Savepoint { target, stop, tx })
            .map_err(|_| RuntimeError::JobNotRunning)?;
        match rx.await {
            Ok(r) => r.map_err(|reason| RuntimeError::CheckpointFailed { reason }),
            Err(_) => Err(RuntimeError::CheckpointFailed {
                reason: "the job attempt ended before the savepoint completed".into(),
            }),
        }
    }

    /// Cancels the job; waiting on it then returns [`RuntimeError::Cancelled`].
    pub fn cancel(&self) {
        let _ = self.requests.send(Request::Cancel);
    }

    /// The job's status now.
    pub fn status(&self) -> JobStatus {
        let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner()).clone();
        s.source_records = self.source_records();
        if matches!(s.state, JobState::Running | JobState::Restarting) {
            s.uptime_ms = self.started.elapsed().as_millis() as u64;
        }
        s
    }

    /// Statistics of every checkpoint so far (oldest first; the newest
    /// 10 000).
    pub fn checkpoint_stats(&self) -> Vec<CheckpointStats> {
        self.stats.all()
    }

    /// Statistics of the newest `limit` checkpoints (oldest first).
    pub fn recent_checkpoint_stats(&self, limit: usize) -> Vec<CheckpointStats> {
        self.stats
            .with(|all| all[all.len().saturating_sub(limit)..].to_vec())
    }

    /// Runs `f` on the statistics (oldest first) without copying them.
    pub fn with_checkpoint_stats<R>(&self, f: impl FnOnce(&[CheckpointStats]) -> R) -> R {
        self.stats.with(f)
    }

    /// Records emitted by the sources so far (replays count again).
    pub fn source_records(&self) -> u64 {
        self.metrics.source_records()
    }

    /// Every task's counters now (records in and out, backpressured time,
    /// last checkpoint start delay and alignment, source positions).
    pub fn task_counters(&self) -> Vec<crate::metrics::TaskCounters> {
        self.metrics.tasks()
    }

    /// The job's counters and histograms.
    pub fn metrics(&self) -> Arc<Metrics> {
        self.metrics.clone()
    }
}

impl JobHandle {
    /// A cloneable view of the job.
    pub fn monitor(&self) -> JobMonitor {
        self.monitor.clone()
    }

    /// Triggers a checkpoint now and waits until it completes or fails
    /// ([`JobMonitor::trigger_checkpoint`]).
    pub async fn trigger_checkpoint(&self) -> Result<CheckpointId> {
        self.monitor.trigger_checkpoint().await
    }

    /// Triggers a savepoint into a new directory under `target` and waits
    /// until it completes or fails ([`JobMonitor::trigger_savepoint`]).
    pub async fn trigger_savepoint(&self, target: SavepointLocation) -> Result<Savepoint> {
        self.monitor.trigger_savepoint(target).await
    }

    /// Stops the job with a savepoint ([`JobMonitor::stop_with_savepoint`]).
    pub async fn stop_with_savepoint(&self, target: SavepointLocation) -> Result<Savepoint> {
        self.monitor.stop_with_savepoint(target).await
    }

    /// Cancels the job; [`JobHandle::wait`] then returns [`RuntimeError::Cancelled`].
    pub fn cancel(&self) {
        self.monitor.cancel()
    }

    /// Waits for the job to end.
    pub async fn wait(self) -> Result<JobResult> {
        match self.join.await {
            Ok(r) => r,
            Err(e) => Err(RuntimeError::Panic {
                task: "job master".into(),
                message: e.to_string(),
            }),
        }
    }

    /// Statistics of every checkpoint so far (oldest first).
    pub fn checkpoint_stats(&self) -> Vec<CheckpointStats> {
        self.monitor.checkpoint_stats()
    }

    /// Records emitted by the sources so far (replays count again).
    pub fn source_records(&self) -> u64 {
        self.monitor.source_records()
    }
}

/// What the statistics of a completed checkpoint record.
#[derive(Debug, Clone)]
pub(crate) struct CompletedStats {
    pub duration: Duration,
    pub state_size: u64,
    pub written_size: u64,
    pub channel: u64,
    pub alignment: Vec<Duration>,
    /// The alignments of the tasks with inputs: a source task aligns
    /// nothing, so its zero stays out of the alignment histogram.
    pub input_alignment: Vec<Duration>,
    pub sync_max: Duration,
    pub async_max: Duration,
    pub operators: Vec<(String, u64)>,
}

/// The statistics of every checkpoint of a job (the newest 10 000), shared
/// by the coordinator, which writes them, and the job's monitors; completed
/// checkpoints also go into the job's histograms.
#[derive(Debug, Clone)]
pub(crate) struct StatsLog {
    log: Arc<Mutex<Vec<CheckpointStats>>>,
    metrics: Arc<Metrics>,
}

impl StatsLog {
    /// An empty log feeding the histograms of `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        StatsLog {
            log: Arc::default(),
            metrics,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<CheckpointStats>> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// A copy of every entry, oldest first.
    pub fn all(&self) -> Vec<CheckpointStats> {
        self.lock().clone()
    }

    /// Runs `f` on the entries, oldest first, without copying them.
    pub fn with<R>(&self, f: impl FnOnce(&[CheckpointStats]) -> R) -> R {
        f(&self.lock())
    }

    /// Changes the entry of checkpoint `id` as it ends; returns whether
    /// it had no final status yet (or is no longer in the log), so that
    /// each end is counted once.
    fn end(&self, id: CheckpointId, f: impl FnOnce(&mut CheckpointStats)) -> bool {
        let mut stats = self.lock();
        let Some(s) = stats.iter_mut().rev().find(|s| s.id == id) else {
            return true;
        };
        let open = matches!(
            s.status,
            CheckpointStatus::InProgress | CheckpointStatus::Unresolved(_)
        );
        f(s);
        open
    }

    /// Adds the entry of a checkpoint just triggered.
    pub fn push(&self, s: CheckpointStats) {
        self.metrics.checkpoints_triggered.fetch_add(1, Ordering::Relaxed);
        let mut stats = self.lock();
        if stats.len() >= 10_000 {
            stats.remove(0);
        }
        stats.push(s);
    }

    /// Changes the entry of checkpoint `id`.
    pub fn update(&self, id: CheckpointId, f: impl FnOnce(&mut CheckpointStats)) {
        if let Some(s) = self.lock().iter_mut().rev().find(|s| s.id == id) {
            f(s);
        }
    }

    /// Records how checkpoint `id` ended, with its figures.
    pub fn record(&self, id: CheckpointId, st: &CompletedStats, status: CheckpointStatus) {
        let completed = status == CheckpointStatus::Completed;
        let ends = self.end(id, |s| {
            s.operators = st.operators.clone();
            s.channel_state_size = st.channel;
            s.status = status;
            s.duration = st.duration;
            s.state_size = st.state_size;
            s.written_size = st.written_size;
            s.alignment = st.alignment.clone();
            s.sync_max = st.sync_max;
            s.async_max = st.async_max;
        });
        if completed && ends {
            self.metrics.checkpoints_completed.fetch_add(1, Ordering::Relaxed);
            self.metrics
                .checkpoint_completed(st.duration, &st.input_alignment);
        }
    }

    /// Marks checkpoint `id` failed.
    pub fn failed(&self, id: CheckpointId, reason: &str, duration: Duration) {
        let ends = self.end(id, |s| {
            s.status = CheckpointStatus::Failed(reason.to_string());
            s.duration = duration;
        });
        if ends {
            self.metrics.checkpoints_failed.fetch_add(1, Ordering::Relaxed);
        }
    }
}
