//! The job master: starts the tasks of each attempt, coordinates
//! checkpoints (trigger, acknowledgements, metadata commit, notification,
//! retention, timeouts, aborts) and recovers from failures with the restart
//! strategy.

use crate::commit::{self, CommitOutcome, CommitTarget};
use crate::config::{CheckpointingMode, RestartTracker};
use crate::error::{Result, RuntimeError};
use crate::graph::{Builder, EdgeKind, Job, JobGraph, TaskBuild};
use crate::operator::InitContext;
use crate::savepoint::{savepoint_dir_name, RestoreSource, SavepointLocation};
use crate::task::SavepointTargets;
use crate::task::{AckPart, Control, Metrics, TaskEvent, TaskRuntime};
use crate::testing::CommitHook;
use bytes::Bytes;
use sluice_core::metadata::{OperatorSnapshot, METADATA_FORMAT_VERSION, SAVEPOINT_METADATA_FILE};
use sluice_core::ChannelStateHandle;
use sluice_core::CheckpointStorageExt;
use sluice_core::{
    check_parallelism, Alignment, CheckpointBarrier, CheckpointId, CheckpointKind, CheckpointMetadata,
    CheckpointStorage, OperatorUid, StateBackend,
};
use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot};
use tokio::task::{JoinHandle, JoinSet};
use tracing::{error, info, warn};

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
    /// Bytes of state files.
    pub state_size: u64,
    /// Per task: time from its first to its last barrier.
    pub alignment: Vec<Duration>,
    /// Longest synchronous snapshot part of any task.
    pub sync_max: Duration,
    /// Longest asynchronous snapshot part of any task.
    pub async_max: Duration,
    /// Bytes of channel state (records in flight; unaligned checkpoints).
    pub channel_state_size: u64,
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
    /// Time since the job started, in milliseconds.
    pub uptime_ms: u64,
    /// The savepoint or checkpoint the job started from, if any.
    pub restored_from: Option<String>,
    /// Why the job failed, if it did.
    pub failure: Option<String>,
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

type SavepointResponder = oneshot::Sender<std::result::Result<Savepoint, String>>;

enum Request {
    Trigger(oneshot::Sender<std::result::Result<CheckpointId, String>>),
    Savepoint {
        target: SavepointLocation,
        stop: bool,
        tx: SavepointResponder,
    },
    Cancel,
}

/// A running job.
pub struct JobHandle {
    monitor: JobMonitor,
    join: tokio::task::JoinHandle<Result<JobResult>>,
}

/// A cloneable view of a running job: statistics, triggers, cancel.
#[derive(Clone)]
pub struct JobMonitor {
    requests: mpsc::UnboundedSender<Request>,
    stats: Arc<Mutex<Vec<CheckpointStats>>>,
    metrics: Arc<Metrics>,
    status: Arc<Mutex<JobStatus>>,
    started: Instant,
}

impl JobMonitor {
    /// Triggers a checkpoint now and waits until it completes or fails.
    pub async fn trigger_checkpoint(&self) -> std::result::Result<CheckpointId, String> {
        let (tx, rx) = oneshot::channel();
        self.requests
            .send(Request::Trigger(tx))
            .map_err(|_| "job is not running".to_string())?;
        rx.await
            .map_err(|_| "job attempt ended before the checkpoint completed".to_string())?
    }

    /// Triggers a savepoint into a new directory under `target` and waits
    /// until it completes or fails. The job goes on.
    pub async fn trigger_savepoint(
        &self,
        target: SavepointLocation,
    ) -> std::result::Result<Savepoint, String> {
        self.savepoint(target, false).await
    }

    /// Takes a savepoint into a new directory under `target`; the sources
    /// emit nothing after its barrier and, once it is complete, the job ends
    /// cleanly ([`JobResult::stopped_with_savepoint`]). If the savepoint
    /// fails, the job goes on running.
    pub async fn stop_with_savepoint(
        &self,
        target: SavepointLocation,
    ) -> std::result::Result<Savepoint, String> {
        self.savepoint(target, true).await
    }

    async fn savepoint(
        &self,
        target: SavepointLocation,
        stop: bool,
    ) -> std::result::Result<Savepoint, String> {
        let (tx, rx) = oneshot::channel();
        self.requests
            .send(Request::Savepoint { target, stop, tx })
            .map_err(|_| "job is not running".to_string())?;
        rx.await
            .map_err(|_| "job attempt ended before the savepoint completed".to_string())?
    }

    /// Cancels the job; waiting on it then returns [`RuntimeError::Cancelled`].
    pub fn cancel(&self) {
        let _ = self.requests.send(Request::Cancel);
    }

    /// The job's status now.
    pub fn status(&self) -> JobStatus {
        let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner()).clone();
        s.source_records = self.source_records();
        s.uptime_ms = self.started.elapsed().as_millis() as u64;
        s
    }

    /// Statistics of every checkpoint so far (oldest first).
    pub fn checkpoint_stats(&self) -> Vec<CheckpointStats> {
        self.stats.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Records emitted by the sources so far (replays count again).
    pub fn source_records(&self) -> u64 {
        self.metrics
            .source_records
            .load(std::sync::atomic::Ordering::Relaxed)
    }
}

impl JobHandle {
    /// A cloneable view of the job.
    pub fn monitor(&self) -> JobMonitor {
        self.monitor.clone()
    }

    /// Triggers a checkpoint now and waits until it completes or fails.
    pub async fn trigger_checkpoint(&self) -> std::result::Result<CheckpointId, String> {
        self.monitor.trigger_checkpoint().await
    }

    /// Triggers a savepoint into a new directory under `target` and waits
    /// until it completes or fails ([`JobMonitor::trigger_savepoint`]).
    pub async fn trigger_savepoint(
        &self,
        target: SavepointLocation,
    ) -> std::result::Result<Savepoint, String> {
        self.monitor.trigger_savepoint(target).await
    }

    /// Stops the job with a savepoint ([`JobMonitor::stop_with_savepoint`]).
    pub async fn stop_with_savepoint(
        &self,
        target: SavepointLocation,
    ) -> std::result::Result<Savepoint, String> {
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

impl Job {
    /// Validates the job and starts it on the current tokio runtime.
    pub fn start(self) -> Result<JobHandle> {
        let mut b = self.inner.borrow_mut();
        let master = JobMaster::new(&mut b)?;
        drop(b);
        let (tx, rx) = mpsc::unbounded_channel();
        let stats = master.stats.clone();
        let metrics = master.metrics.clone();
        let status = master.status.clone();
        let join = tokio::spawn(master.run(rx));
        Ok(JobHandle {
            monitor: JobMonitor {
                requests: tx,
                stats,
                metrics,
                status,
                started: Instant::now(),
            },
            join,
        })
    }

    /// Starts the job and waits for it to end.
    pub async fn execute(self) -> Result<JobResult> {
        self.start()?.wait().await
    }
}

struct TaskInfo {
    name: String,
    is_source: bool,
    control: mpsc::UnboundedSender<Control>,
}

struct Pending {
    barrier: CheckpointBarrier,
    started: Instant,
    deadline: Instant,
    acks: HashMap<usize, Vec<AckPart>>,
    channel_state: Vec<ChannelStateHandle>,
    alignment: Vec<Duration>,
    sync_max: Duration,
    async_max: Duration,
    responders: Vec<oneshot::Sender<std::result::Result<CheckpointId, String>>>,
    savepoint: Option<PendingSavepoint>,
    /// Keep the checkpoint's files when it fails (another writer's metadata
    /// sits at its id).
    keep_files: bool,
}

/// A commit whose outcome is unknown, kept until a read-back decides.
struct Unresolved {
    target: CommitTarget,
    json: Bytes,
    /// Savepoints: their directory (removed if the commit did not happen).
    savepoint: Option<SavepointLocation>,
    stats: CompletedStats,
    /// What is known so far.
    reason: String,
}

/// What the statistics of a completed checkpoint record.
#[derive(Clone)]
struct CompletedStats {
    duration: Duration,
    state_size: u64,
    channel: u64,
    alignment: Vec<Duration>,
    sync_max: Duration,
    async_max: Duration,
}

/// A savepoint in progress.
struct PendingSavepoint {
    /// Its own directory.
    location: SavepointLocation,
    stop: bool,
    responder: Option<SavepointResponder>,
}

struct JobMaster {
    name: String,
    graph: Arc<JobGraph>,
    max_parallelism: u32,
    checkpoint: crate::config::CheckpointConfig,
    restart: RestartTracker,
    restart_name: String,
    backend: Arc<dyn StateBackend>,
    storage: Arc<dyn CheckpointStorage>,
    resume: bool,
    commit_hook: Option<Arc<dyn CommitHook>>,
    stats: Arc<Mutex<Vec<CheckpointStats>>>,
    metrics: Arc<Metrics>,
    next_id: CheckpointId,
    pending: BTreeMap<CheckpointId, Pending>,
    aborted: BTreeSet<CheckpointId>,
    completed: VecDeque<CheckpointId>,
    /// Checkpoints found corrupt: never restored from again.
    bad: BTreeSet<CheckpointId>,
    /// Whether the job has two-phase-commit sinks (they commit a
    /// checkpoint's output when told it completed).
    transactional: bool,
    /// The newest checkpoint whose completion was delivered to the tasks
    /// (or, after a resume, may have been by the earlier run): recovery
    /// never restores anything older in a transactional job.
    notified: Option<CheckpointId>,
    /// Commits whose outcome is unknown.
    unresolved: BTreeMap<CheckpointId, Unresolved>,
    /// A committed stop-with-savepoint: after a failure the job restores it
    /// and ends at once (its sinks committed its output already).
    stop_restore: Option<Arc<RestoreSource>>,
    completed_count: u64,
    consecutive_failures: u32,
    last_completion: Option<Instant>,
    requests_closed: bool,
    /// The final checkpoint of the current attempt, once triggered.
    final_id: Option<CheckpointId>,
    final_failure: Option<(CheckpointId, String)>,
    /// The operator uids of the job.
    uids: Vec<OperatorUid>,
    /// Restore from this savepoint (or other storage's checkpoint) at start.
    from_savepoint: Option<SavepointLocation>,
    allow_non_restored_state: bool,
    /// Where the files of the savepoints in progress go.
    savepoint_targets: SavepointTargets,
    /// Savepoints aborted in this attempt: their directories are removed.
    aborted_savepoints: HashMap<CheckpointId, SavepointLocation>,
    /// The savepoint the job was stopped with.
    stopped_with: Option<Savepoint>,
    status: Arc<Mutex<JobStatus>>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

enum Step {
    TaskDone(std::result::Result<(tokio::task::Id, Result<()>), tokio::task::JoinError>),
    AllDone,
    Event(TaskEvent),
    Tick,
    Request(Option<Request>),
    Timeout,
}

impl JobMaster {
    fn new(b: &mut Builder) -> Result<Self> {
        if let Some(e) = b.errors.first() {
            return Err(RuntimeError::InvalidJob(e.clone()));
        }
        b.checkpoint.validate()?;
        let backend = match b.state_backend.clone() {
            Some(x) => x,
            None => default_backend()?,
        };
        let storage = match b.storage.clone() {
            Some(x) => x,
            None => default_storage()?,
        };
        let vertices = std::mem::take(&mut b.vertices);
        let edges = std::mem::take(&mut b.edges);
        if vertices.is_empty() {
            return Err(RuntimeError::InvalidJob("the job has no operators".into()));
        }
        for v in &vertices {
            check_parallelism(b.max_parallelism, v.parallelism)
                .map_err(|e| RuntimeError::InvalidJob(format!("task {}: {e}", v.name)))?;
            if v.build.is_none() {
                return Err(RuntimeError::InvalidJob(format!(
                    "the stream of task {} goes nowhere: end it with a sink",
                    v.name
                )));
            }
        }
        for e in &edges {
            if e.kind == EdgeKind::Forward && vertices[e.from].parallelism != vertices[e.to].parallelism {
                return Err(RuntimeError::InvalidJob(format!(
                    "forward edge from {} (parallelism {}) to {} (parallelism {}) needs equal parallelism",
                    vertices[e.from].name,
                    vertices[e.from].parallelism,
                    vertices[e.to].name,
                    vertices[e.to].parallelism
                )));
            }
        }
        Ok(JobMaster {
            name: b.name.clone(),
            graph: Arc::new(JobGraph { vertices, edges }),
            max_parallelism: b.max_parallelism,
            checkpoint: b.checkpoint.clone(),
            restart_name: b.restart.to_string(),
            restart: RestartTracker::new(b.restart.clone()),
            backend,
            storage,
            resume: b.resume,
            commit_hook: b.commit_hook.clone(),
            stats: Arc::new(Mutex::new(Vec::new())),
            metrics: Arc::new(Metrics::default()),
            next_id: CheckpointId(1),
            pending: BTreeMap::new(),
            aborted: BTreeSet::new(),
            completed: VecDeque::new(),
            bad: BTreeSet::new(),
            transactional: b.transactional,
            notified: None,
            unresolved: BTreeMap::new(),
            stop_restore: None,
            completed_count: 0,
            consecutive_failures: 0,
            last_completion: None,
            requests_closed: false,
            final_id: None,
            final_failure: None,
            uids: b.uids.clone(),
            from_savepoint: b.from_savepoint.clone(),
            allow_non_restored_state: b.allow_non_restored_state,
            savepoint_targets: Arc::default(),
            aborted_savepoints: HashMap::new(),
            stopped_with: None,
            status: Arc::new(Mutex::new(JobStatus {
                name: b.name.clone(),
                state: JobState::Running,
                restarts: 0,
                source_records: 0,
                uptime_ms: 0,
                restored_from: None,
                failure: None,
            })),
        })
    }

    /// Chooses what the next attempt restores from: the committed
    /// stop-with-savepoint, if there is one (the attempt then ends at once);
    /// else the newest completed checkpoint that can be read, then older
    /// ones, then the savepoint the job started from, then nothing. A
    /// transactional job never silently restores anything older than the
    /// newest checkpoint whose completion was delivered
    /// ([`Self::check_fallback`]). `bad`: a checkpoint the failed attempt
    /// found corrupt, and the error. A transient read error, and a commit
    /// whose outcome is still unknown and newer than every completed
    /// checkpoint, are errors: the caller tries again after a restart delay.
    async fn choose_restore(
        &mut self,
        initial: &Option<Arc<RestoreSource>>,
        mut bad: Option<(CheckpointId, sluice_core::Error)>,
    ) -> Result<Option<Arc<RestoreSource>>> {
        if let Some(r) = &self.stop_restore {
            return Ok(Some(r.clone()));
        }
        self.resolve_unresolved(&[]).await;
        let newest = self.completed.back().copied();
        if let Some((&id, u)) = self.unresolved.iter().rev().find(|(_, u)| u.savepoint.is_none()) {
            if newest.is_none_or(|n| id > n) {
                return Err(RuntimeError::CommitUnresolved {
                    checkpoint: id,
                    reason: u.reason.clone(),
                });
            }
        }
        let ids: Vec<CheckpointId> = self
            .completed
            .iter()
            .rev()
            .copied()
            .filter(|id| !self.bad.contains(id))
            .collect();
        for id in ids {
            self.check_fallback(&mut bad, Some(id))?;
            match RestoreSource::checkpoint(self.storage.clone(), id).await {
                Ok(r) => return Ok(Some(Arc::new(r))),
                Err(
                    e @ (sluice_core::Error::Corrupt { .. }
                    | sluice_core::Error::NotFound { .. }
                    | sluice_core::Error::Incompatible { .. }),
                ) => {
                    warn!(checkpoint = id.0, "cannot restore from checkpoint {id}: {e}");
                    self.bad.insert(id);
                    bad = Some((id, e));
                }
                // The storage may be down for a while: try again later
                // rather than fall back.
                Err(e) => return Err(e.into()),
            }
        }
        self.check_fallback(&mut bad, None)?;
        Ok(initial.clone())
    }

    /// Whether recovery may restore `to` (`None`: the savepoint the job
    /// started from, or nothing) after checkpoint `bad` turned out
    /// unrestorable. Going back past the newest checkpoint whose completion
    /// was delivered re-commits output in a job with two-phase-commit sinks:
    /// refused with [`RuntimeError::UnrestorableCheckpoint`] unless
    /// [`crate::CheckpointConfig::fallback_to_older_checkpoint`] allows it
    /// (then logged as possibly duplicating output). Jobs without
    /// transactional sinks fall back.
    fn check_fallback(
        &self,
        bad: &mut Option<(CheckpointId, sluice_core::Error)>,
        to: Option<CheckpointId>,
    ) -> Result<()> {
        let Some((bad_id, _)) = bad.as_ref() else {
            return Ok(());
        };
        let target = match to {
            Some(id) => format!("checkpoint {id}"),
            None => "the start of the job (or its initial savepoint)".to_string(),
        };
        let past_delivered = self.notified.is_some_and(|n| to.is_none_or(|t| t < n));
        if !self.transactional || !past_delivered {
            warn!("checkpoint {bad_id} cannot be restored; falling back to {target}");
            return Ok(());
        }
        if self.checkpoint.fallback_to_older_checkpoint {
            warn!(
                "checkpoint {bad_id} cannot be restored; falling back to {target} although the two-phase-commit \
                 sinks already committed output after it: this may duplicate output \
                 (fallback_to_older_checkpoint is set)"
            );
            return Ok(());
        }
        match bad.take() {
            Some((checkpoint, cause)) => Err(RuntimeError::UnrestorableCheckpoint { checkpoint, cause }),
            None => Ok(()),
        }
    }

    /// Tries to decide every commit whose outcome is unknown by reading it
    /// back ([`commit::resolve`]). A checkpoint found committed becomes a
    /// completed one (its tasks, if `infos` has them, are told now); one
    /// found missing is failed and its files removed; a savepoint found
    /// committed is logged.
    async fn resolve_unresolved(&mut self, infos: &[TaskInfo]) {
        let ids: Vec<CheckpointId> = self.unresolved.keys().copied().collect();
        for id in ids {
            let Some(u) = self.unresolved.get_mut(&id) else {
                continue;
            };
            match commit::resolve(&u.target, &u.json).await {
                CommitOutcome::Unknown { reason } => u.reason = reason,
                CommitOutcome::Committed => {
                    let Some(u) = self.unresolved.remove(&id) else {
                        continue;
                    };
                    self.record_stats(id, &u.stats, CheckpointStatus::Completed);
                    if let Some(loc) = u.savepoint {
                        info!(
                            checkpoint = id.0,
                            "savepoint {id} at {} was committed after all",
                            loc.describe()
                        );
                        continue;
                    }
                    info!(
                        checkpoint = id.0,
                        "checkpoint {id} was committed after all (read back)"
                    );
                    self.completed_count += 1;
                    let at = self.completed.partition_point(|c| *c < id);
                    self.completed.insert(at, id);
                    if !infos.is_empty() {
                        for t in infos {
                            let _ = t.control.send(Control::Complete(id));
                        }
                        self.notified = self.notified.max(Some(id));
                    }
                    self.apply_retention().await;
                }
                CommitOutcome::Failed { reason, discard } => {
                    let Some(u) = self.unresolved.remove(&id) else {
                        continue;
                    };
                    warn!(checkpoint = id.0, "checkpoint {id} was not committed: {reason}");
                    self.update_stats(id, |s| s.status = CheckpointStatus::Failed(reason.clone()));
                    if discard {
                        let removed = match &u.savepoint {
                            Some(loc) => loc.storage.delete_dir(&loc.dir).await,
                            None => self.storage.discard(id).await,
                        };
                        if let Err(e) = removed {
                            warn!("could not remove the files of checkpoint {id}: {e}");
                        }
                    }
                }
            }
        }
    }

    /// Discards the oldest completed checkpoints beyond `retained`.
    async fn apply_retention(&mut self) {
        while self.completed.len() > self.checkpoint.retained {
            if let Some(old) = self.completed.pop_front() {
                if let Err(e) = self.storage.discard(old).await {
                    warn!("could not discard old checkpoint {}: {e}", old);
                }
            }
        }
    }

    /// Checks that the job can start from `restore` (a savepoint or another
    /// storage's checkpoint): same max parallelism, and an operator for
    /// every uid with state (unless `allow_non_restored_state`).
    fn check_restore(&self, restore: &RestoreSource) -> Result<()> {
        let meta = &restore.metadata;
        if meta.max_parallelism != self.max_parallelism {
            return Err(sluice_core::Error::Incompatible {
                what: restore.describe_with_location(),
                reason: format!(
                    "written with max parallelism {}, the job has {}; the max parallelism (number of key groups) \
                     of a job's state cannot change",
                    meta.max_parallelism, self.max_parallelism
                ),
            }
            .into());
        }
        let unknown: Vec<&str> = meta
            .operators
            .iter()
            .filter(|o| !self.uids.contains(&o.uid))
            .map(|o| o.uid.as_str())
            .collect();
        if !unknown.is_empty() {
            if !self.allow_non_restored_state {
                return Err(RuntimeError::InvalidJob(format!(
                    "{} has state for operator uid(s) {} that the job does not have; give the operators their old \
                     uids, or allow non-restored state to skip that state",
                    restore.describe_with_location(),
                    unknown.join(", ")
                )));
            }
            warn!(
                "skipping the state of operator uid(s) {} of {}: the job has no such operator (non-restored \
                 state allowed)",
                unknown.join(", "),
                restore.describe_with_location()
            );
        }
        self.check_channel_state(restore)?;
        for uid in self.uids.iter().filter(|u| meta.operator(u).is_none()) {
            info!(
                "operator {uid} has no state in {}; it starts empty",
                restore.describe_with_location()
            );
        }
        Ok(())
    }

    /// Channel state (records in flight of an unaligned checkpoint) is
    /// matched to tasks by task id and subtask: state of a task the job does
    /// not have would be lost, so it is refused (unless non-restored state
    /// is allowed: then skipped and logged).
    fn check_channel_state(&self, restore: &RestoreSource) -> Result<()> {
        let unknown: BTreeSet<&str> = restore
            .metadata
            .channel_state
            .iter()
            .filter(|c| !c.task_uid.is_empty() && !self.graph.vertices.iter().any(|v| v.uid == c.task_uid))
            .map(|c| c.task_uid.as_str())
            .collect();
        if unknown.is_empty() {
            return Ok(());
        }
        let list: Vec<&str> = unknown.into_iter().collect();
        if !self.allow_non_restored_state {
            return Err(RuntimeError::Storage(sluice_core::Error::Incompatible {
                what: format!("channel state in {}", restore.describe_with_location()),
                reason: format!(
                    "it holds records in flight of task(s) {} that the job does not have (the job's tasks are {}); \
                     restore it with the job that wrote it, or allow non-restored state to drop those records",
                    list.join(", "),
                    self.graph.vertices.iter().map(|v| v.uid.as_str()).collect::<Vec<_>>().join(", ")
                ),
            }));
        }
        warn!(
            "dropping the records in flight of task(s) {} in {}: the job has no such task (non-restored state \
             allowed)",
            list.join(", "),
            restore.describe_with_location()
        );
        Ok(())
    }

    fn set_state(&self, state: JobState, failure: Option<String>) {
        let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
        s.state = state;
        s.restarts = self.restart.restarts();
        if failure.is_some() {
            s.failure = failure;
        }
    }

    async fn run(mut self, requests: mpsc::UnboundedReceiver<Request>) -> Result<JobResult> {
        let result = self.run_job(requests).await;
        match &result {
            Ok(_) => self.set_state(JobState::Finished, None),
            Err(RuntimeError::Cancelled) => self.set_state(JobState::Cancelled, None),
            Err(e) => self.set_state(JobState::Failed, Some(e.to_string())),
        }
        result
    }

    async fn run_job(&mut self, mut requests: mpsc::UnboundedReceiver<Request>) -> Result<JobResult> {
        let job_started = Instant::now();
        let listing = self.storage.list().await?;
        if let Some(max) = listing.iter().map(|c| c.id).max() {
            self.next_id = max.next();
        }
        for c in listing.iter().filter(|c| !c.committed) {
            info!(
                checkpoint = c.id.0,
                "discarding the files of checkpoint {} that was never committed", c.id
            );
            if let Err(e) = self.storage.discard(c.id).await {
                warn!("could not discard uncommitted checkpoint {}: {e}", c.id);
            }
        }
        // The savepoint to start from: read and checked before any task
        // starts; a bad one is a clear error and the job does not start.
        let initial: Option<Arc<RestoreSource>> = match &self.from_savepoint {
            Some(loc) => {
                let r = RestoreSource::open(loc).await.map_err(|e| {
                    error!("cannot start from {}: {e}", loc.describe());
                    RuntimeError::from(e)
                })?;
                self.check_restore(&r)?;
                info!("starting job {} from {}", self.name, r.describe_with_location());
                // Checkpoint ids continue after the savepoint's.
                self.next_id = self.next_id.max(r.metadata.checkpoint_id.next());
                Some(Arc::new(r))
            }
            None => None,
        };
        let restored_from_savepoint = initial.as_ref().map(|r| r.describe_with_location());
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .restored_from = restored_from_savepoint.clone();
        let mut restore = initial.clone();
        if self.resume {
            // The retained checkpoints of the earlier run (newest last);
            // older ones fall to retention now.
            let committed: Vec<CheckpointId> = listing.iter().filter(|c| c.committed).map(|c| c.id).collect();
            let keep = committed.len().saturating_sub(self.checkpoint.retained);
            for old in &committed[..keep] {
                if let Err(e) = self.storage.discard(*old).await {
                    warn!("could not discard old checkpoint {old}: {e}");
                }
            }
            self.completed.extend(committed[keep..].iter().copied());
            // The earlier run may have delivered the completion of any of
            // them before it stopped: assume it did.
            self.notified = self.completed.back().copied();
            match self.choose_restore(&initial, None).await? {
                Some(r) if !is_same(&r, &initial) => {
                    self.check_channel_state(&r)?;
                    info!(
                        checkpoint = r.metadata.checkpoint_id.0,
                        "resuming from checkpoint {}", r.metadata.checkpoint_id
                    );
                    restore = Some(r);
                }
                Some(_) => {}
                None => info!(
                    "no completed checkpoint to resume from in {}; starting from scratch",
                    self.storage.describe()
                ),
            }
        }
        let resumed_from = restore
            .as_ref()
            .filter(|r| !is_same(r, &initial))
            .map(|r| r.metadata.checkpoint_id);
        let mut recoveries = Vec::new();
        let mut stopped = false;
        loop {
            let outcome = self.run_attempt(restore.clone(), stopped, &mut requests).await;
            let mut failure = match outcome {
                Ok(()) => {
                    if !self.unresolved.is_empty() {
                        self.resolve_unresolved(&[]).await;
                        for (id, u) in &self.unresolved {
                            warn!(
                                checkpoint = id.0,
                                "the job ends with the commit of {} still undecided ({}): check whether {} exists",
                                id,
                                u.reason,
                                u.target.describe()
                            );
                        }
                    }
                    return Ok(JobResult {
                        restarts: self.restart.restarts(),
                        completed_checkpoints: self.completed_count,
                        last_checkpoint: self.completed.back().copied(),
                        resumed_from,
                        final_checkpoint: self.final_id,
                        stopped_with_savepoint: self.stopped_with.take(),
                        restored_from_savepoint,
                        recoveries,
                        duration: job_started.elapsed(),
                    });
                }
                Err(RuntimeError::Cancelled) => return Err(RuntimeError::Cancelled),
                Err(e) => e,
            };
            let cause = failure.to_string();
            // Until a restore point is chosen: each failure (of the attempt,
            // or of choosing where to restore from) goes to the restart
            // strategy.
            loop {
                error!("job {} attempt failed: {failure}", self.name);
                let mut bad = None;
                match failure {
                    RuntimeError::Storage(sluice_core::Error::Incompatible { .. })
                    | RuntimeError::UnrestorableCheckpoint { .. } => {
                        // Restarting cannot make the state fit the job, or a
                        // checkpoint readable.
                        error!("job {} cannot restore its state; not restarting", self.name);
                        return Err(failure);
                    }
                    RuntimeError::Storage(e @ sluice_core::Error::Corrupt { .. }) => match restore.clone() {
                        None => failure = RuntimeError::Storage(e),
                        Some(r) => {
                            let stop = self.stop_restore.as_ref().is_some_and(|s| Arc::ptr_eq(s, &r));
                            if is_same(&r, &initial) || stop {
                                error!(
                                    "{} is corrupt ({e}); the job does not start from it",
                                    r.describe()
                                );
                                return Err(RuntimeError::Storage(e));
                            }
                            let id = r.metadata.checkpoint_id;
                            warn!(
                                checkpoint = id.0,
                                "checkpoint {id} is corrupt ({e}); it will not be restored from again"
                            );
                            self.bad.insert(id);
                            failure = RuntimeError::Storage(sluice_core::Error::corrupt(
                                format!("checkpoint {id}"),
                                e.to_string(),
                            ));
                            bad = Some((id, e));
                        }
                    },
                    _ => {}
                }
                let Some(delay) = self.restart.on_failure(Instant::now()) else {
                    return Err(RuntimeError::RestartsExhausted {
                        strategy: self.restart_name.clone(),
                        attempts: self.restart.restarts(),
                        last: Box::new(failure),
                    });
                };
                self.set_state(JobState::Restarting, Some(failure.to_string()));
                tokio::time::sleep(delay).await;
                match self.choose_restore(&initial, bad).await {
                    Ok(r) => {
                        restore = r;
                        break;
                    }
                    Err(e @ RuntimeError::UnrestorableCheckpoint { .. }) => {
                        error!("job {}: {e}", self.name);
                        return Err(e);
                    }
                    Err(e) => failure = e,
                }
            }
            stopped = self.stop_restore.is_some();
            match &restore {
                Some(r) if stopped => info!(
                    checkpoint = r.metadata.checkpoint_id.0,
                    "restarting job {} (restart {}) from {}, the savepoint it was stopped with: the job ends at once",
                    self.name,
                    self.restart.restarts(),
                    r.describe()
                ),
                Some(r) => info!(
                    checkpoint = r.metadata.checkpoint_id.0,
                    "restarting job {} (restart {}) from {}",
                    self.name,
                    self.restart.restarts(),
                    r.describe()
                ),
                None => info!(
                    "restarting job {} (restart {}) from scratch: no completed checkpoint",
                    self.name,
                    self.restart.restarts()
                ),
            }
            self.set_state(JobState::Running, None);
            recoveries.push(Recovery {
                cause,
                restored_from: restore.as_ref().map(|r| r.metadata.checkpoint_id),
            });
        }
    }

    /// Runs one attempt: spawns every task (restoring `restore`), runs the
    /// coordinator loop until the tasks finish or one fails, then tears
    /// down. With `stopped` the sources end right after restoring (the job
    /// was stopped with the savepoint it restores).
    async fn run_attempt(
        &mut self,
        restore: Option<Arc<RestoreSource>>,
        stopped: bool,
        requests: &mut mpsc::UnboundedReceiver<Request>,
    ) -> Result<()> {
        let (events_tx, mut events_rx) = mpsc::unbounded_channel();
        let writers: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let mut tasks: JoinSet<Result<()>> = JoinSet::new();
        let mut task_of: HashMap<tokio::task::Id, usize> = HashMap::new();
        let mut infos: Vec<TaskInfo> = Vec::new();
        let graph = self.graph.clone();
        let build = self.spawn_tasks(
            &graph,
            restore,
            stopped,
            &events_tx,
            &writers,
            &mut tasks,
            &mut task_of,
            &mut infos,
        );
        drop(events_tx);
        let result = match build {
            Ok(()) => {
                self.attempt_loop(&mut tasks, &task_of, &infos, &mut events_rx, requests)
                    .await
            }
            Err(e) => Err(e),
        };
        // Tear down: stop every task and snapshot writer, clean up pending checkpoints.
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        let handles: Vec<JoinHandle<()>> = writers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
            .collect();
        for h in &handles {
            h.abort();
        }
        for h in handles {
            let _ = h.await;
        }
        let pending: Vec<CheckpointId> = self.pending.keys().copied().collect();
        for id in pending {
            // Not counted: the attempt is over either way.
            let _ = self
                .fail_checkpoint(id, "the job attempt ended".into(), &infos, false)
                .await;
        }
        // Snapshot writers of aborted checkpoints may have finished their
        // files after the abort: remove them now that every writer stopped.
        let committed: BTreeSet<CheckpointId> = self.completed.iter().copied().collect();
        for id in std::mem::take(&mut self.aborted) {
            if let Some(loc) = self.aborted_savepoints.remove(&id) {
                if let Err(e) = loc.storage.delete_dir(&loc.dir).await {
                    warn!("could not remove aborted savepoint {}: {e}", loc.describe());
                }
            } else if !committed.contains(&id) {
                if let Err(e) = self.storage.discard(id).await {
                    warn!("could not remove the files of aborted checkpoint {id}: {e}");
                }
            }
        }
        self.aborted_savepoints.clear();
        self.savepoint_targets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clear();
        result
    }

    #[allow(clippy::too_many_arguments)]
    fn spawn_tasks(
        &mut self,
        graph: &JobGraph,
        restore: Option<Arc<RestoreSource>>,
        stopped: bool,
        events: &mpsc::UnboundedSender<TaskEvent>,
        writers: &Arc<Mutex<Vec<JoinHandle<()>>>>,
        tasks: &mut JoinSet<Result<()>>,
        task_of: &mut HashMap<tokio::task::Id, usize>,
        infos: &mut Vec<TaskInfo>,
    ) -> Result<()> {
        let mut grids: Vec<_> = graph
            .edges
            .iter()
            .map(|e| {
                (e.grid)(
                    graph.vertices[e.from].parallelism as usize,
                    graph.vertices[e.to].parallelism as usize,
                )
            })
            .collect();
        for (v, vertex) in graph.vertices.iter().enumerate() {
            let build = vertex
                .build
                .clone()
                .ok_or_else(|| RuntimeError::InvalidJob(format!("task {} has no sink", vertex.name)))?;
            for s in 0..vertex.parallelism {
                let mut inputs = Vec::new();
                let mut outputs = Vec::new();
                for (e, edge) in graph.edges.iter().enumerate() {
                    if edge.to == v {
                        inputs.append(&mut grids[e].receivers[s as usize]);
                    }
                    if edge.from == v {
                        outputs.append(&mut grids[e].senders[s as usize]);
                    }
                }
                let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
                let index = infos.len();
                let name = format!("{} ({}/{})", vertex.name, s + 1, vertex.parallelism);
                let alignment_timeout = match self.checkpoint.unaligned {
                    true => self.checkpoint.aligned_checkpoint_timeout,
                    false => None,
                };
                let init = InitContext {
                    job_name: self.name.clone(),
                    task_name: Arc::from(name.as_str()),
                    subtask: s,
                    parallelism: vertex.parallelism,
                    max_parallelism: self.max_parallelism,
                    state_backend: self.backend.clone(),
                    storage: self.storage.clone(),
                    restore: restore.clone(),
                    task_uid: Arc::from(vertex.uid.as_str()),
                };
                let rt = TaskRuntime {
                    index,
                    vertex: v as u32,
                    vertex_name: Arc::from(vertex.name.as_str()),
                    alignment_timeout,
                    init,
                    control: ctl_rx,
                    events: events.clone(),
                    writers: writers.clone(),
                    metrics: self.metrics.clone(),
                    savepoints: self.savepoint_targets.clone(),
                    stopped,
                };
                let body = build(&mut TaskBuild {
                    runtime: Some(rt),
                    inputs,
                    outputs,
                })?;
                let handle = tasks.spawn(body);
                task_of.insert(handle.id(), index);
                infos.push(TaskInfo {
                    name,
                    is_source: vertex.is_source,
                    control: ctl_tx,
                });
            }
        }
        Ok(())
    }

    async fn attempt_loop(
        &mut self,
        tasks: &mut JoinSet<Result<()>>,
        task_of: &HashMap<tokio::task::Id, usize>,
        infos: &[TaskInfo],
        events: &mut mpsc::UnboundedReceiver<TaskEvent>,
        requests: &mut mpsc::UnboundedReceiver<Request>,
    ) -> Result<()> {
        let mut finished = vec![false; infos.len()];
        let mut sources_finishing = false;
        let mut exhausted = vec![false; infos.len()];
        let mut all_done = false;
        self.final_id = None;
        self.final_failure = None;
        let interval = self.checkpoint.interval;
        let mut ticker = tokio::time::interval(interval.unwrap_or(Duration::from_secs(3600)));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await; // the first tick is immediate
        loop {
            let deadline = self.pending.values().map(|p| p.deadline).min();
            let step = tokio::select! {
                r = tasks.join_next_with_id(), if !all_done => match r { Some(r) => Step::TaskDone(r), None => Step::AllDone },
                Some(ev) = events.recv() => Step::Event(ev),
                _ = ticker.tick(), if interval.is_some() => Step::Tick,
                r = requests.recv(), if !self.requests_closed => Step::Request(r),
                _ = sleep_until_opt(deadline), if deadline.is_some() => Step::Timeout,
            };
            match step {
                Step::AllDone => {
                    // Wait for the final checkpoint's acknowledgements (its
                    // writers outlive the tasks) and its commit.
                    all_done = true;
                }
                Step::TaskDone(Ok((id, Ok(())))) => {
                    if let Some(&i) = task_of.get(&id) {
                        finished[i] = true;
                        sources_finishing |= infos[i].is_source;
                    }
                }
                Step::TaskDone(Ok((id, Err(e)))) => {
                    let name = task_of.get(&id).map(|i| infos[*i].name.as_str()).unwrap_or("?");
                    error!("task {name} failed: {e}");
                    return Err(e);
                }
                Step::TaskDone(Err(join)) => {
                    let name = task_of
                        .get(&join.id())
                        .map(|i| infos[*i].name.clone())
                        .unwrap_or_default();
                    let message = if join.is_panic() {
                        let p = join.into_panic();
                        p.downcast_ref::<String>()
                            .cloned()
                            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                            .unwrap_or_else(|| "non-string panic".into())
                    } else {
                        "task was cancelled".into()
                    };
                    error!("task {name} panicked: {message}");
                    return Err(RuntimeError::Panic { task: name, message });
                }
                Step::Event(TaskEvent::SourceExhausted { task }) => {
                    exhausted[task] = true;
                    let all = infos
                        .iter()
                        .enumerate()
                        .all(|(i, t)| !t.is_source || exhausted[i]);
                    if all && !sources_finishing {
                        sources_finishing = true;
                        if self.checkpoint.final_checkpoint {
                            // The sources end once it is committed.
                            self.trigger_final(infos).await?;
                        } else {
                            end_sources(infos);
                        }
                    }
                }
                Step::Event(ev) => self.on_event(ev, infos).await?,
                Step::Tick => {
                    if !self.unresolved.is_empty() {
                        self.resolve_unresolved(infos).await;
                    }
                    let savepoint_pending = self.pending.values().any(|p| p.savepoint.is_some());
                    if !sources_finishing && !savepoint_pending && self.stopped_with.is_none() {
                        self.trigger(infos, None, true, false).await?;
                    }
                }
                Step::Request(Some(Request::Savepoint { target, stop, tx })) => {
                    let stopping = self
                        .pending
                        .values()
                        .any(|p| p.savepoint.as_ref().is_some_and(|s| s.stop));
                    if sources_finishing || self.stopped_with.is_some() {
                        let _ = tx.send(Err("the job's sources are finishing; no more savepoints".into()));
                    } else if stopping {
                        let _ = tx.send(Err("the job is being stopped with a savepoint".into()));
                    } else {
                        self.trigger_savepoint(infos, target, stop, tx).await?;
                    }
                }
                // Every handle was dropped: the job runs on, detached.
                Step::Request(None) => self.requests_closed = true,
                Step::Request(Some(Request::Cancel)) => {
                    info!("job {} cancelled", self.name);
                    return Err(RuntimeError::Cancelled);
                }
                Step::Request(Some(Request::Trigger(tx))) => {
                    if sources_finishing || self.stopped_with.is_some() {
                        let _ = tx.send(Err("the job's sources are finishing; no more checkpoints".into()));
                    } else {
                        self.trigger(infos, Some(tx), false, false).await?;
                    }
                }
                Step::Timeout => {
                    let now = Instant::now();
                    let expired: Vec<CheckpointId> = self
                        .pending
                        .iter()
                        .filter(|(_, p)| p.deadline <= now)
                        .map(|(id, _)| *id)
                        .collect();
                    for id in expired {
                        let reason = format!("timed out after {:?}", self.checkpoint.timeout);
                        self.fail_checkpoint(id, reason, infos, true).await?;
                    }
                }
            }
            if let Some((id, reason)) = self.final_failure.take() {
                // Failed but tolerated (else fail_checkpoint returned the
                // error): take the final checkpoint again.
                info!("final checkpoint {id} failed ({reason}); taking it again");
                self.trigger_final(infos).await?;
            }
            if all_done {
                return Ok(());
            }
        }
    }

    async fn trigger_final(&mut self, infos: &[TaskInfo]) -> Result<()> {
        // Aligned even with unaligned checkpoints: no record may be in flight
        // behind the final checkpoint, which the tasks end after.
        self.final_id = self.trigger(infos, None, false, true).await?;
        match self.final_id {
            Some(id) => info!(
                checkpoint = id.0,
                "all sources reached their end; final checkpoint {id}"
            ),
            None => {
                return Err(RuntimeError::FinalCheckpointFailed {
                    id: self.next_id,
                    reason: "a source task ended before the final checkpoint".into(),
                })
            }
        }
        Ok(())
    }

    async fn trigger(
        &mut self,
        infos: &[TaskInfo],
        responder: Option<oneshot::Sender<std::result::Result<CheckpointId, String>>>,
        periodic: bool,
        aligned: bool,
    ) -> Result<Option<CheckpointId>> {
        if periodic {
            if self.pending.len() >= self.checkpoint.max_concurrent {
                return Ok(None);
            }
            if self
                .last_completion
                .is_some_and(|t| t.elapsed() < self.checkpoint.min_pause)
            {
                return Ok(None);
            }
        }
        let id = self.next_id;
        self.next_id = id.next();
        let alignment = match self.checkpoint.mode {
            // With an alignment timeout, tasks start aligned and switch.
            CheckpointingMode::ExactlyOnce if aligned || !self.checkpoint.unaligned => Alignment::Aligned,
            CheckpointingMode::ExactlyOnce if self.checkpoint.aligned_checkpoint_timeout.is_some() => {
                Alignment::AlignedWithTimeout
            }
            CheckpointingMode::ExactlyOnce => Alignment::Unaligned,
            CheckpointingMode::AtLeastOnce => Alignment::AtLeastOnce,
        };
        self.start(infos, id, CheckpointKind::Checkpoint, alignment, responder, None)
            .await
    }

    /// Starts savepoint `id` into a new directory under `target`. Savepoints
    /// are always aligned (a consistent cut whatever the checkpointing mode)
    /// and ignore the max-concurrent and min-pause settings, as Flink's do.
    async fn trigger_savepoint(
        &mut self,
        infos: &[TaskInfo],
        target: SavepointLocation,
        stop: bool,
        tx: SavepointResponder,
    ) -> Result<()> {
        let id = self.next_id;
        self.next_id = id.next();
        let location = target.child(&savepoint_dir_name(id));
        info!(
            checkpoint = id.0,
            "triggering {}savepoint {id} to {}",
            if stop { "stop-with-" } else { "" },
            location.describe()
        );
        self.savepoint_targets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id, location.clone());
        let savepoint = PendingSavepoint {
            location,
            stop,
            responder: Some(tx),
        };
        self.start(
            infos,
            id,
            CheckpointKind::Savepoint,
            Alignment::Aligned,
            None,
            Some(savepoint),
        )
        .await?;
        Ok(())
    }

    async fn start(
        &mut self,
        infos: &[TaskInfo],
        id: CheckpointId,
        kind: CheckpointKind,
        alignment: Alignment,
        responder: Option<oneshot::Sender<std::result::Result<CheckpointId, String>>>,
        savepoint: Option<PendingSavepoint>,
    ) -> Result<Option<CheckpointId>> {
        let barrier = CheckpointBarrier {
            checkpoint_id: id,
            timestamp_ms: now_ms(),
            kind,
            alignment,
        };
        let stop = savepoint.as_ref().is_some_and(|s| s.stop);
        let started = Instant::now();
        self.pending.insert(
            id,
            Pending {
                barrier,
                started,
                deadline: started + self.checkpoint.timeout,
                acks: HashMap::new(),
                channel_state: Vec::new(),
                alignment: Vec::new(),
                sync_max: Duration::ZERO,
                async_max: Duration::ZERO,
                responders: responder.into_iter().collect(),
                savepoint,
                keep_files: false,
            },
        );
        self.push_stats(CheckpointStats {
            id,
            kind: barrier.kind,
            trigger_time_ms: barrier.timestamp_ms,
            status: CheckpointStatus::InProgress,
            duration: Duration::ZERO,
            state_size: 0,
            alignment: Vec::new(),
            sync_max: Duration::ZERO,
            async_max: Duration::ZERO,
            channel_state_size: 0,
        });
        let mut all_sent = true;
        for t in infos.iter().filter(|t| t.is_source) {
            all_sent &= t.control.send(Control::Trigger { barrier, stop }).is_ok();
        }
        if !all_sent {
            self.fail_checkpoint(id, "a source task has finished".into(), infos, false)
                .await?;
            return Ok(None);
        }
        Ok(Some(id))
    }

    async fn on_event(&mut self, ev: TaskEvent, infos: &[TaskInfo]) -> Result<()> {
        match ev {
            // Handled by the attempt loop.
            TaskEvent::SourceExhausted { .. } => {}
            TaskEvent::Decline {
                checkpoint,
                task,
                reason,
            } => {
                if self.pending.contains_key(&checkpoint) {
                    let reason = format!("task {} declined: {reason}", infos[task].name);
                    self.fail_checkpoint(checkpoint, reason, infos, true).await?;
                }
            }
            TaskEvent::Ack {
                checkpoint,
                task,
                parts,
                channel_state,
                alignment,
                sync,
                async_part,
            } => {
                let Some(p) = self.pending.get_mut(&checkpoint) else {
                    if let Some(loc) = self.aborted_savepoints.get(&checkpoint) {
                        // Files written after the abort: remove them too.
                        let loc = loc.clone();
                        tokio::spawn(async move { loc.storage.delete_dir(&loc.dir).await });
                    } else if self.aborted.contains(&checkpoint) {
                        let storage = self.storage.clone();
                        tokio::spawn(async move { storage.discard(checkpoint).await });
                    }
                    return Ok(());
                };
                p.acks.insert(task, parts);
                p.channel_state.extend(channel_state);
                p.alignment.push(alignment);
                p.sync_max = p.sync_max.max(sync);
                p.async_max = p.async_max.max(async_part);
                if p.acks.len() == infos.len() {
                    self.complete(checkpoint, infos).await?;
                }
            }
        }
        Ok(())
    }

    async fn complete(&mut self, id: CheckpointId, infos: &[TaskInfo]) -> Result<()> {
        let Some(mut p) = self.pending.remove(&id) else {
            return Ok(());
        };
        let duration = p.started.elapsed();
        let mut ops: BTreeMap<OperatorUid, OperatorSnapshot> = BTreeMap::new();
        for part in std::mem::take(&mut p.acks).into_values().flatten() {
            let op = ops.entry(part.uid.clone()).or_insert_with(|| OperatorSnapshot {
                uid: part.uid.clone(),
                parallelism: part.parallelism,
                key_type: None,
                states: Vec::new(),
                source_splits: None,
                subtasks: Vec::new(),
            });
            op.key_type = op.key_type.take().or(part.key_type);
            op.source_splits = op.source_splits.or(part.source_splits);
            if op.states.is_empty() {
                op.states = part.states;
            }
            op.subtasks.push(part.snapshot);
        }
        for op in ops.values_mut() {
            op.subtasks.sort_by_key(|s| s.subtask);
        }
        let meta = CheckpointMetadata {
            format_version: METADATA_FORMAT_VERSION,
            sluice_version: sluice_core::SLUICE_VERSION.to_string(),
            snapshot_format_version: sluice_core::format::SNAPSHOT_FORMAT_VERSION,
            job_name: self.name.clone(),
            checkpoint_id: id,
            kind: p.barrier.kind,
            trigger_time_ms: p.barrier.timestamp_ms,
            duration_ms: duration.as_millis() as u64,
            max_parallelism: self.max_parallelism,
            operators: ops.into_values().collect(),
            channel_state: std::mem::take(&mut p.channel_state),
        };
        let json = Bytes::from(meta.to_json()?);
        let stats = CompletedStats {
            duration,
            state_size: meta.state_size(),
            channel: meta.channel_state_size(),
            alignment: p.alignment.clone(),
            sync_max: p.sync_max,
            async_max: p.async_max,
        };
        // Checkpoint and savepoint metadata are committed the same way.
        let target = match &p.savepoint {
            Some(sp) => CommitTarget::file(
                sp.location.storage.clone(),
                sp.location.join(SAVEPOINT_METADATA_FILE),
            ),
            None => {
                if let Some(hook) = &self.commit_hook {
                    if let Err(msg) = hook.before_commit(id) {
                        // Simulated crash of the job master: the checkpoint
                        // stays uncommitted; teardown removes its files.
                        self.aborted.insert(id);
                        let _ = self.storage.discard(id).await;
                        return Err(RuntimeError::Injected(msg));
                    }
                }
                CommitTarget::checkpoint(self.storage.clone(), id)
            }
        };
        let outcome = commit::commit(&target, &json).await;
        if p.savepoint.is_some() {
            self.savepoint_targets
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
        }
        match outcome {
            CommitOutcome::Committed => match p.savepoint.take() {
                Some(sp) => {
                    self.savepoint_committed(id, sp, meta, &stats, infos);
                    Ok(())
                }
                None => self.checkpoint_committed(id, p, &stats, infos).await,
            },
            CommitOutcome::Failed { reason, discard } => {
                let counts = p.savepoint.is_none();
                self.pending.insert(
                    id,
                    Pending {
                        acks: HashMap::new(),
                        keep_files: !discard,
                        ..p
                    },
                );
                self.fail_checkpoint(id, format!("metadata commit failed: {reason}"), infos, counts)
                    .await
            }
            CommitOutcome::Unknown { reason } => {
                self.commit_unknown(id, p, target, json, stats, reason, infos)
            }
        }
    }

    /// Checkpoint `id` is committed: tasks are told (two-phase-commit sinks
    /// commit its transactions), older pending checkpoints are subsumed,
    /// retention applies.
    async fn checkpoint_committed(
        &mut self,
        id: CheckpointId,
        p: Pending,
        stats: &CompletedStats,
        infos: &[TaskInfo],
    ) -> Result<()> {
        self.consecutive_failures = 0;
        self.completed_count += 1;
        self.last_completion = Some(Instant::now());
        info!(
            checkpoint = id.0,
            "checkpoint {id} completed in {} ms: {} bytes, max alignment {} ms, sync {} ms, async {} ms",
            stats.duration.as_millis(),
            stats.state_size,
            stats
                .alignment
                .iter()
                .copied()
                .max()
                .unwrap_or_default()
                .as_millis(),
            stats.sync_max.as_millis(),
            stats.async_max.as_millis()
        );
        self.record_stats(id, stats, CheckpointStatus::Completed);
        let at = self.completed.partition_point(|c| *c < id);
        self.completed.insert(at, id);
        if !self.unresolved.is_empty() {
            // A newer checkpoint committed: a good moment to decide the
            // older commits whose outcome is unknown.
            self.resolve_unresolved(infos).await;
        }
        for t in infos {
            let _ = t.control.send(Control::Complete(id));
        }
        self.notified = self.notified.max(Some(id));
        if self.final_id == Some(id) {
            end_sources(infos);
        }
        for r in p.responders {
            let _ = r.send(Ok(id));
        }
        // Older pending checkpoints are subsumed.
        let older: Vec<CheckpointId> = self.pending.range(..id).map(|(k, _)| *k).collect();
        for o in older {
            self.fail_checkpoint(o, format!("subsumed by checkpoint {id}"), infos, false)
                .await?;
        }
        self.apply_retention().await;
        Ok(())
    }

    /// Savepoint `id` is committed. It is not a checkpoint: not restored
    /// from after a failure, not subject to retention, and (but for
    /// stop-with-savepoint, after which the job ends) tasks are not told it
    /// completed, so two-phase-commit sinks commit with the next
    /// checkpoint, as in Flink. A stop-with-savepoint, once its completion
    /// is delivered, becomes the restore point of any later recovery (its
    /// sinks committed its output), and a restored job ends at once.
    fn savepoint_committed(
        &mut self,
        id: CheckpointId,
        sp: PendingSavepoint,
        meta: CheckpointMetadata,
        stats: &CompletedStats,
        infos: &[TaskInfo],
    ) {
        let loc = sp.location;
        info!(
            checkpoint = id.0,
            "savepoint {id} completed in {} ms: {} bytes at {}",
            stats.duration.as_millis(),
            stats.state_size,
            loc.describe()
        );
        self.record_stats(id, stats, CheckpointStatus::Completed);
        let savepoint = Savepoint {
            id,
            location: loc.clone(),
        };
        if sp.stop {
            self.stop_restore = Some(Arc::new(RestoreSource {
                metadata: Arc::new(meta),
                storage: loc.storage.clone(),
                base: loc.dir.clone(),
                location: loc.describe(),
            }));
            for t in infos {
                let _ = t.control.send(Control::Complete(id));
            }
            self.notified = self.notified.max(Some(id));
            end_sources(infos);
            self.stopped_with = Some(savepoint.clone());
        }
        if let Some(r) = sp.responder {
            let _ = r.send(Ok(savepoint));
        }
    }

    /// The commit of checkpoint or savepoint `id` has an unknown outcome:
    /// it is kept (files and all) until a read-back decides
    /// ([`Self::resolve_unresolved`]); nobody is told it completed. It
    /// counts against the tolerable failures; a final checkpoint is taken
    /// again; a stop-with-savepoint does not stop the job.
    #[allow(clippy::too_many_arguments)]
    fn commit_unknown(
        &mut self,
        id: CheckpointId,
        p: Pending,
        target: CommitTarget,
        json: Bytes,
        stats: CompletedStats,
        reason: String,
        infos: &[TaskInfo],
    ) -> Result<()> {
        warn!(
            checkpoint = id.0,
            "the outcome of the commit of {} {id} is unknown ({reason}); it is not used, notified or deleted until \
             reading {} back decides",
            p.barrier.kind,
            target.describe()
        );
        let status = CheckpointStatus::Unresolved(reason.clone());
        self.record_stats(id, &stats, status);
        for r in p.responders {
            let _ = r.send(Err(format!("checkpoint {id}: commit outcome unknown ({reason})")));
        }
        let savepoint = p.savepoint.map(|sp| {
            if let Some(r) = sp.responder {
                let _ = r.send(Err(format!(
                    "savepoint {id}: the outcome of its commit is unknown ({reason}); it may exist at {}",
                    sp.location.describe()
                )));
            }
            // Sources waiting after a stop-with-savepoint barrier go on.
            for t in infos {
                let _ = t.control.send(Control::Abort(id));
            }
            sp.location
        });
        let is_savepoint = savepoint.is_some();
        self.unresolved.insert(
            id,
            Unresolved {
                target,
                json,
                savepoint,
                stats,
                reason: reason.clone(),
            },
        );
        if self.final_id == Some(id) {
            self.final_failure = Some((id, reason.clone()));
        }
        match is_savepoint {
            true => Ok(()),
            false => self.count_failure(id, reason),
        }
    }

    /// Counts a failed checkpoint against the tolerable consecutive
    /// failures; too many fail the attempt.
    fn count_failure(&mut self, id: CheckpointId, reason: String) -> Result<()> {
        self.consecutive_failures += 1;
        if self.consecutive_failures > self.checkpoint.tolerable_failures {
            return Err(RuntimeError::TooManyCheckpointFailures {
                failures: self.consecutive_failures,
                tolerable: self.checkpoint.tolerable_failures,
                last_id: id,
                reason,
            });
        }
        Ok(())
    }

    /// Aborts checkpoint `id`: tasks are told, its files are removed (unless
    /// it is marked to keep them), and if `counts`, it counts against the
    /// tolerable failures.
    async fn fail_checkpoint(
        &mut self,
        id: CheckpointId,
        reason: String,
        infos: &[TaskInfo],
        counts: bool,
    ) -> Result<()> {
        let Some(p) = self.pending.remove(&id) else {
            return Ok(());
        };
        warn!(checkpoint = id.0, "checkpoint {id} failed: {reason}");
        if self.final_id == Some(id) {
            self.final_failure = Some((id, reason.clone()));
        }
        if !p.keep_files {
            self.aborted.insert(id);
        }
        for t in infos {
            let _ = t.control.send(Control::Abort(id));
        }
        let mut p = p;
        if let Some(sp) = p.savepoint.take() {
            // A failed savepoint does not count against the tolerable
            // checkpoint failures; its partial directory is removed.
            self.savepoint_targets
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&id);
            if !p.keep_files {
                if let Err(e) = sp.location.storage.delete_dir(&sp.location.dir).await {
                    warn!(
                        "could not remove failed savepoint {}: {e}",
                        sp.location.describe()
                    );
                }
                self.aborted_savepoints.insert(id, sp.location.clone());
            }
            let duration = p.started.elapsed();
            self.update_stats(id, |s| {
                s.status = CheckpointStatus::Failed(reason.clone());
                s.duration = duration;
            });
            if let Some(r) = sp.responder {
                let _ = r.send(Err(format!("savepoint {id} failed: {reason}")));
            }
            return Ok(());
        }
        if !p.keep_files {
            if let Err(e) = self.storage.discard(id).await {
                warn!("could not remove the files of failed checkpoint {id}: {e}");
            }
        }
        let duration = p.started.elapsed();
        self.update_stats(id, |s| {
            s.status = CheckpointStatus::Failed(reason.clone());
            s.duration = duration;
        });
        for r in p.responders {
            let _ = r.send(Err(reason.clone()));
        }
        match counts {
            true => self.count_failure(id, reason),
            false => Ok(()),
        }
    }

    fn record_stats(&self, id: CheckpointId, st: &CompletedStats, status: CheckpointStatus) {
        self.update_stats(id, |s| {
            s.channel_state_size = st.channel;
            s.status = status;
            s.duration = st.duration;
            s.state_size = st.state_size;
            s.alignment = st.alignment.clone();
            s.sync_max = st.sync_max;
            s.async_max = st.async_max;
        });
    }

    fn push_stats(&self, s: CheckpointStats) {
        let mut stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        if stats.len() >= 10_000 {
            stats.remove(0);
        }
        stats.push(s);
    }

    fn update_stats(&self, id: CheckpointId, f: impl FnOnce(&mut CheckpointStats)) {
        let mut stats = self.stats.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(s) = stats.iter_mut().rev().find(|s| s.id == id) {
            f(s);
        }
    }
}

/// Whether `r` is the restore source the job started from (a savepoint).
fn is_same(r: &Arc<RestoreSource>, initial: &Option<Arc<RestoreSource>>) -> bool {
    initial.as_ref().is_some_and(|i| Arc::ptr_eq(i, r))
}

/// Tells every source task to finish.
fn end_sources(infos: &[TaskInfo]) {
    for t in infos.iter().filter(|t| t.is_source) {
        let _ = t.control.send(Control::EndInput);
    }
}

pub(crate) async fn sleep_until_opt(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d.into()).await,
        None => std::future::pending().await,
    }
}

#[cfg(feature = "memory")]
fn default_backend() -> Result<Arc<dyn StateBackend>> {
    Ok(Arc::new(sluice_backend_memory::MemoryStateBackend::new()))
}

#[cfg(not(feature = "memory"))]
fn default_backend() -> Result<Arc<dyn StateBackend>> {
    Err(RuntimeError::InvalidJob(
        "no state backend set: call Job::with_state_backend".into(),
    ))
}

#[cfg(feature = "memory")]
fn default_storage() -> Result<Arc<dyn CheckpointStorage>> {
    Ok(Arc::new(sluice_backend_memory::MemoryCheckpointStorage::new()))
}

#[cfg(not(feature = "memory"))]
fn default_storage() -> Result<Arc<dyn CheckpointStorage>> {
    Err(RuntimeError::InvalidJob(
        "no checkpoint storage set: call Job::with_checkpoint_storage".into(),
    ))
}
