//! The job master (Flink's JobManager role), one tokio task per job, split
//! by role:
//!
//! - this file: the job's life — validate the graph, start (resume, a
//!   savepoint to start from), run attempts until one ends well or the job
//!   fails, report the result;
//! - [`attempt`]: one attempt (spawn every task, drive them, tear down);
//! - [`coordinator`] and [`savepoints`]: the checkpoint coordinator;
//! - [`completed`]: the completed checkpoints and undecided commits;
//! - [`commit`]: metadata assembly and the honest commit;
//! - [`recovery`]: restart strategy, restore-point choice, restore checks.

mod attempt;
mod commit;
mod completed;
mod coordinator;
mod recovery;
mod savepoints;

use crate::error::{Result, RuntimeError};
use crate::graph::{Builder, EdgeKind, Job, JobGraph};
use crate::handle::{
    JobHandle, JobMonitor, JobResult, JobState, JobStatus, Recovery as RecoveryRecord, Request, RestartEvent,
};
use crate::metrics::Metrics;
use crate::savepoint::{RestoreSource, SavepointLocation};
pub(crate) use attempt::{panic_message, stop_tasks, task_name, task_runtime, JobContext, TaskPlace};
use attempt::{run_attempt, Requests};
pub(crate) use coordinator::now_ms;
use coordinator::Coordinator;
use recovery::{AfterFailure, Recovery, RecoverySettings};
use sluice_core::metadata::read_checkpoint_metadata;
use sluice_core::{
    check_parallelism, CheckpointId, CheckpointMetadata, CheckpointStorage, CheckpointStorageExt,
    StateBackend,
};
use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use tokio::sync::mpsc;
use tracing::{error, info, warn};

/// The job master of one job.
struct JobMaster {
    ctx: JobContext,
    coordinator: Coordinator,
    recovery: Recovery,
    /// Restore from the latest completed checkpoint in storage at start.
    resume: bool,
    /// Restore from this savepoint (or other storage's checkpoint) at start.
    from_savepoint: Option<SavepointLocation>,
    status: Arc<Mutex<JobStatus>>,
}

impl Job {
    /// Validates the job and starts it on the current tokio runtime.
    pub fn start(self) -> Result<JobHandle> {
        let mut b = self.inner.borrow_mut();
        let master = JobMaster::new(&mut b)?;
        drop(b);
        let (tx, rx) = mpsc::unbounded_channel();
        let stats = master.coordinator.stats.clone();
        let metrics = master.ctx.metrics.clone();
        let status = master.status.clone();
        let started = Instant::now();
        let join = tokio::spawn(master.run(rx, started));
        Ok(JobHandle {
            monitor: JobMonitor {
                requests: tx,
                stats,
                metrics,
                status,
                started,
                started_ms: now_ms(),
            },
            join,
        })
    }

    /// Runs this job as a worker of the coordinator at `coordinator` (a
    /// process whose job has [`Job::with_workers`]): registers, runs the
    /// tasks deployed onto it until the job ends, and reconnects when it
    /// loses the coordinator (its tasks are stopped then; the coordinator
    /// restarts the job from its latest checkpoint). The job must be built
    /// the same way as the coordinator's (same graph, uids and
    /// parallelism), with a state backend of its own and the same shared
    /// checkpoint storage (a directory on a shared path, or S3).
    pub fn start_worker(
        self,
        coordinator: std::net::SocketAddr,
        options: crate::cluster::WorkerOptions,
    ) -> Result<crate::cluster::WorkerHandle> {
        let mut b = self.inner.borrow_mut();
        if b.cluster.is_some() {
            return Err(RuntimeError::InvalidJob(
                "a worker's job has no worker pool: Job::with_workers is for the coordinator's job".into(),
            ));
        }
        let master = JobMaster::new(&mut b)?;
        drop(b);
        let savepoint_storage = master.from_savepoint.as_ref().map(|l| l.storage.clone());
        Ok(crate::cluster::start_worker(
            crate::cluster::WorkerSetup {
                ctx: master.ctx,
                savepoint_storage,
            },
            coordinator,
            options,
        ))
    }

    /// Starts the job and waits for it to end.
    pub async fn execute(self) -> Result<JobResult> {
        self.start()?.wait().await
    }
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
        let task_uids = vertices.iter().map(|v| v.uid.clone()).collect();
        let recovery = Recovery::new(RecoverySettings {
            restart: b.restart.clone(),
            transactional: b.transactional,
            fallback_allowed: b.checkpoint.fallback_to_older_checkpoint,
            allow_non_restored_state: b.allow_non_restored_state,
            max_parallelism: b.max_parallelism,
            uids: b.uids.clone(),
            task_uids,
        });
        let metrics = Arc::new(Metrics::default());
        let graph = Arc::new(JobGraph { vertices, edges });
        if let Some(pool) = &b.cluster {
            pool.expect_job(b.name.clone(), graph.fingerprint());
        }
        #[allow(unused_mut)]
        let mut coordinator = Coordinator::new(
            b.name.clone(),
            b.max_parallelism,
            b.checkpoint.clone(),
            storage.clone(),
            metrics.clone(),
        );
        #[cfg(feature = "testing")]
        coordinator.set_commit_hook(b.commit_hook.clone());
        if let Some(pool) = b.cluster.clone() {
            pool.attach_metrics(metrics.clone());

            coordinator.announce_savepoint = Some(Arc::new(move |id, location| {
                pool.announce_savepoint(id, location)
            }));
        }
        Ok(JobMaster {
            ctx: JobContext {
                name: b.name.clone(),
                graph,
                max_parallelism: b.max_parallelism,
                config: b.checkpoint.clone(),
                backend,
                storage,
                metrics,
                network: b.network.clone(),
                cluster: b.cluster.clone(),
            },
            coordinator,
            recovery,
            resume: b.resume,
            from_savepoint: b.from_savepoint.clone(),
            status: Arc::new(Mutex::new(JobStatus {
                name: b.name.clone(),
                state: JobState::Running,
                restarts: 0,
                source_records: 0,
                uptime_ms: 0,
                restored_from: None,
                failure: None,
                restart_history: Vec::new(),
            })),
        })
    }

    fn set_state(&self, state: JobState, failure: Option<String>) {
        let mut s = self.status.lock().unwrap_or_else(|p| p.into_inner());
        s.state = state;
        s.restarts = self.recovery.restarts();
        if failure.is_some() {
            s.failure = failure;
        }
    }

    /// Runs the job; once it ended, its status keeps its run time since
    /// `started` as the uptime (written before the final state, which tells
    /// the monitors to stop their clock).
    async fn run(
        mut self,
        requests: mpsc::UnboundedReceiver<Request>,
        started: Instant,
    ) -> Result<JobResult> {
        let result = self.run_job(requests).await;
        if let Some(pool) = &self.ctx.cluster {
            // The workers stop and exit.
            pool.finish().await;
        }
        self.status.lock().unwrap_or_else(|p| p.into_inner()).uptime_ms =
            started.elapsed().as_millis() as u64;
        match &result {
            Ok(_) => self.set_state(JobState::Finished, None),
            Err(RuntimeError::Cancelled) => self.set_state(JobState::Cancelled, None),
            Err(e) => self.set_state(JobState::Failed, Some(e.to_string())),
        }
        result
    }

    /// Before the first attempt: ids continue after the highest in storage,
    /// left-overs of attempts that never committed are removed (but not
    /// files a committed checkpoint references: incremental checkpoints
    /// share files), and the savepoint to start from is read and checked (a
    /// bad one is an error and the job does not start). Returns the
    /// committed checkpoints, ascending, with their metadata where readable.
    #[allow(clippy::type_complexity)]
    async fn prepare(
        &mut self,
    ) -> Result<(
        Vec<(CheckpointId, Option<Arc<CheckpointMetadata>>)>,
        Option<Arc<RestoreSource>>,
    )> {
        let storage = &self.ctx.storage;
        let listing = storage.list().await?;
        if let Some(max) = listing.iter().map(|c| c.id).max() {
            self.coordinator.next_id = max.next();
        }
        let mut committed = Vec::new();
        let mut unreadable = false;
        for c in listing.iter().filter(|c| c.committed) {
            match read_checkpoint_metadata(storage.as_ref(), c.id).await {
                Ok(m) => committed.push((c.id, Some(Arc::new(m)))),
                Err(e) => {
                    warn!(
                        checkpoint = c.id.0,
                        "cannot read the metadata of checkpoint {}: {e}", c.id
                    );
                    unreadable = true;
                    committed.push((c.id, None));
                }
            }
        }
        let referenced: BTreeSet<String> = committed
            .iter()
            .filter_map(|(_, m)| m.as_ref())
            .flat_map(|m| m.state_files().map(|f| f.path.clone()))
            .collect();
        for c in listing.iter().filter(|c| !c.committed) {
            if unreadable {
                // Its files may be referenced by the checkpoint whose
                // metadata could not be read: keep everything.
                warn!(
                    checkpoint = c.id.0,
                    "keeping the files of uncommitted checkpoint {} (a committed checkpoint's references are \
                     unknown)",
                    c.id
                );
                continue;
            }
            if let Err(e) = discard_unreferenced(storage.as_ref(), c.id, &referenced).await {
                warn!("could not discard uncommitted checkpoint {}: {e}", c.id);
            }
        }
        let initial = match &self.from_savepoint {
            Some(loc) => {
                let r = RestoreSource::open(loc).await.map_err(|e| {
                    error!("cannot start from {}: {e}", loc.describe());
                    RuntimeError::from(e)
                })?;
                self.recovery.check_restore(&r)?;
                info!(
                    "starting job {} from {}",
                    self.ctx.name,
                    r.describe_with_location()
                );
                // Checkpoint ids continue after the savepoint's.
                let next = self.coordinator.next_id.max(r.metadata.checkpoint_id.next());
                self.coordinator.next_id = next;
                Some(Arc::new(r))
            }
            None => None,
        };
        Ok((committed, initial))
    }

    async fn run_job(&mut self, requests: mpsc::UnboundedReceiver<Request>) -> Result<JobResult> {
        let job_started = Instant::now();
        let mut requests = Requests {
            rx: requests,
            closed: false,
        };
        let (committed, initial) = self.prepare().await?;
        let restored_from_savepoint = initial.as_ref().map(|r| r.describe_with_location());
        self.status
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .restored_from = restored_from_savepoint.clone();
        let mut restore = initial.clone();
        if self.resume {
            // The retained checkpoints of the earlier run; older ones fall to
            // retention now.
            self.coordinator.completed.resume(&committed).await;
            let chosen = self
                .recovery
                .choose_restore(&mut self.coordinator, &self.ctx.storage, &initial, None)
                .await?;
            match chosen {
                Some(r) if !is_same(&r, &initial) => {
                    self.recovery.check_channel_state(&r)?;
                    info!(
                        checkpoint = r.metadata.checkpoint_id.0,
                        "resuming from checkpoint {}", r.metadata.checkpoint_id
                    );
                    restore = Some(r);
                }
                Some(_) => {}
                None => info!(
                    "no completed checkpoint to resume from in {}; starting from scratch",
                    self.ctx.storage.describe()
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
            let outcome = run_attempt(
                &self.ctx,
                &mut self.coordinator,
                restore.clone(),
                stopped,
                &mut requests,
            )
            .await;
            let mut failure = match outcome {
                Ok(()) => {
                    let completed = &mut self.coordinator.completed;
                    if completed.has_undecided() {
                        self.coordinator.resolve_undecided(&[]).await;
                        self.coordinator.completed.warn_undecided();
                    }
                    let completed = &self.coordinator.completed;
                    return Ok(JobResult {
                        restarts: self.recovery.restarts(),
                        completed_checkpoints: completed.count,
                        last_checkpoint: completed.newest(),
                        resumed_from,
                        final_checkpoint: self.coordinator.final_id,
                        stopped_with_savepoint: self.coordinator.stopped_with.take(),
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
            // or of choosing where to restore from) goes to recovery.
            loop {
                error!("job {} attempt failed: {failure}", self.ctx.name);
                let fixed = [initial.as_ref(), self.coordinator.completed.stop_restore.as_ref()];
                let (delay, bad) = match self.recovery.on_failure(failure, restore.as_ref(), &fixed) {
                    AfterFailure::GiveUp(e) => {
                        error!("job {} cannot recover: {e}", self.ctx.name);
                        return Err(e);
                    }
                    AfterFailure::Restart { delay, bad } => (delay, bad),
                };
                self.set_state(JobState::Restarting, Some(cause.clone()));
                tokio::time::sleep(delay).await;
                match self
                    .recovery
                    .choose_restore(&mut self.coordinator, &self.ctx.storage, &initial, bad)
                    .await
                {
                    Ok(r) => {
                        restore = r;
                        break;
                    }
                    Err(e) if !e.is_restartable() => {
                        error!("job {}: {e}", self.ctx.name);
                        return Err(e);
                    }
                    Err(e) => failure = e,
                }
            }
            stopped = self.coordinator.completed.stop_restore.is_some();
            let restarts = self.recovery.restarts();
            match &restore {
                Some(r) if stopped => info!(
                    checkpoint = r.metadata.checkpoint_id.0,
                    "restarting job {} (restart {restarts}) from {}, the savepoint it was stopped with: the job \
                     ends at once",
                    self.ctx.name,
                    r.describe()
                ),
                Some(r) => info!(
                    checkpoint = r.metadata.checkpoint_id.0,
                    "restarting job {} (restart {restarts}) from {}",
                    self.ctx.name,
                    r.describe()
                ),
                None => info!(
                    "restarting job {} (restart {restarts}) from scratch: no completed checkpoint",
                    self.ctx.name
                ),
            }
            self.set_state(JobState::Running, None);
            self.status
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .restart_history
                .push(RestartEvent {
                    time_ms: now_ms(),
                    cause: cause.clone(),
                    restored_from: restore.as_ref().map(|r| r.metadata.checkpoint_id.0),
                });
            recoveries.push(RecoveryRecord {
                cause,
                restored_from: restore.as_ref().map(|r| r.metadata.checkpoint_id),
            });
        }
    }
}

/// Removes the left-overs of uncommitted checkpoint `id`: every file of its
/// directory that no committed checkpoint references (the directory of a
/// discarded checkpoint keeps the files newer ones share), then the
/// directory once nothing in it is referenced.
async fn discard_unreferenced(
    storage: &dyn CheckpointStorage,
    id: CheckpointId,
    referenced: &BTreeSet<String>,
) -> sluice_core::Result<()> {
    let files = storage.list_files(&id.dir()).await?;
    if files.iter().all(|f| !referenced.contains(&f.path)) {
        info!(
            checkpoint = id.0,
            "discarding the files of checkpoint {id} that was never committed"
        );
        return storage.discard(id).await;
    }
    for f in files.iter().filter(|f| !referenced.contains(&f.path)) {
        storage.delete_file(&f.path).await?;
    }
    Ok(())
}

/// Whether `r` is the restore source the job started from (a savepoint).
fn is_same(r: &Arc<RestoreSource>, initial: &Option<Arc<RestoreSource>>) -> bool {
    initial.as_ref().is_some_and(|i| Arc::ptr_eq(i, r))
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
