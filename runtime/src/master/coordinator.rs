//! The checkpoint coordinator (Flink's `CheckpointCoordinator`): triggers
//! checkpoints and savepoints (trigger policy: max concurrent, min pause,
//! the final checkpoint), collects the tasks' acknowledgements, assembles
//! and commits the metadata (through [`super::commit`]), notifies the tasks,
//! aborts failed checkpoints, subsumes older pending ones, applies
//! retention (through [`CompletedCheckpoints`]), keeps statistics, and
//! decides commits whose outcome was unknown.

use super::commit::{self, CommitOutcome, CommitTarget};
use super::completed::{CompletedCheckpoints, Undecided};
use crate::config::{CheckpointConfig, CheckpointingMode};
use crate::error::{Result, RuntimeError};
use crate::handle::{
    CheckpointResponder, CheckpointStats, CheckpointStatus, CompletedStats, Savepoint, SavepointResponder,
    StatsLog, SubtaskCheckpointStats,
};
use crate::savepoint::SavepointLocation;
use crate::task::{AckPart, Control, SavepointTargets, TaskEvent, TaskInfo};
use bytes::Bytes;
use sluice_core::metadata::SAVEPOINT_METADATA_FILE;
use sluice_core::{
    Alignment, ChannelStateHandle, CheckpointBarrier, CheckpointId, CheckpointKind, CheckpointStorage,
    CheckpointStorageExt,
};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tracing::{info, warn};

/// Why a checkpoint is triggered.
pub(crate) enum TriggerKind {
    /// The checkpoint interval: subject to max concurrent and min pause.
    Periodic,
    /// Asked for through a job handle, which gets the outcome.
    Requested(CheckpointResponder),
    /// The final checkpoint, when every source reached its end: always
    /// aligned.
    Final,
}

/// A checkpoint (or savepoint) in progress.
pub(super) struct Pending {
    barrier: CheckpointBarrier,
    started: Instant,
    deadline: Instant,
    acks: HashMap<usize, Vec<AckPart>>,
    channel_state: Vec<ChannelStateHandle>,
    alignment: Vec<Duration>,
    /// The alignments of the tasks with inputs (not the sources'): the
    /// alignment histogram's observations.
    input_alignment: Vec<Duration>,
    sync_max: Duration,
    async_max: Duration,
    responders: Vec<CheckpointResponder>,
    savepoint: Option<PendingSavepoint>,
    /// Keep the checkpoint's files when it fails (another writer's metadata
    /// sits at its id).
    keep_files: bool,
}

/// A savepoint in progress.
pub(super) struct PendingSavepoint {
    /// Its own directory.
    pub location: SavepointLocation,
    pub stop: bool,
    pub responder: Option<SavepointResponder>,
}

/// The coordinator's state: the checkpoints in progress and the completed
/// ones, the trigger policy's clock, the attempt's final checkpoint.
pub(crate) struct Coordinator {
    /// The job's name (in the metadata).
    name: String,
    max_parallelism: u32,
    config: CheckpointConfig,
    storage: Arc<dyn CheckpointStorage>,
    /// A test hook that "crashes" the job master before a commit.
    #[cfg(feature = "testing")]
    commit_hook: Option<Arc<dyn crate::testing::CommitHook>>,
    /// Statistics of every checkpoint (shared with the job's handles).
    pub stats: StatsLog,
    /// The next checkpoint id (ids never repeat).
    pub next_id: CheckpointId,
    pending: BTreeMap<CheckpointId, Pending>,
    /// Checkpoints aborted in this attempt: their files are removed at its end.
    aborted: BTreeSet<CheckpointId>,
    /// Savepoints aborted in this attempt: their directories are removed.
    aborted_savepoints: HashMap<CheckpointId, SavepointLocation>,
    /// The completed checkpoints and what recovery needs to know.
    pub completed: CompletedCheckpoints,
    consecutive_failures: u32,
    last_completion: Option<Instant>,
    /// The final checkpoint of the current attempt, once triggered.
    pub final_id: Option<CheckpointId>,
    /// A failed (but tolerated) final checkpoint, to be taken again.
    pub final_failure: Option<(CheckpointId, String)>,
    /// Where the files of the savepoints in progress go (shared with tasks).
    pub savepoint_targets: SavepointTargets,
    /// Tells a job's workers where savepoint `id` goes (its location as a
    /// string they open), before it is triggered.
    pub announce_savepoint: Option<Arc<dyn Fn(CheckpointId, String) + Send + Sync>>,
    /// The savepoint the job was stopped with.
    pub stopped_with: Option<Savepoint>,
}

impl Coordinator {
    /// A coordinator for job `name` writing to `storage`.
    pub fn new(
        name: String,
        max_parallelism: u32,
        config: CheckpointConfig,
        storage: Arc<dyn CheckpointStorage>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Self {
        Coordinator {
            name,
            max_parallelism,
            completed: CompletedCheckpoints::new(storage.clone(), config.retained),
            config,
            storage,
            #[cfg(feature = "testing")]
            commit_hook: None,
            stats: StatsLog::new(metrics),
            next_id: CheckpointId(1),
            pending: BTreeMap::new(),
            aborted: BTreeSet::new(),
            aborted_savepoints: HashMap::new(),
            consecutive_failures: 0,
            last_completion: None,
            final_id: None,
            final_failure: None,
            savepoint_targets: Arc::default(),
            announce_savepoint: None,
            stopped_with: None,
        }
    }

    /// Sets the test hook called before every checkpoint's commit.
    #[cfg(feature = "testing")]
    pub fn set_commit_hook(&mut self, hook: Option<Arc<dyn crate::testing::CommitHook>>) {
        self.commit_hook = hook;
    }

    /// Whether a savepoint is in progress (periodic checkpoints wait).
    pub fn savepoint_pending(&self) -> bool {
        self.pending.values().any(|p| p.savepoint.is_some())
    }

    /// Whether a stop-with-savepoint is in progress.
    pub fn stopping(&self) -> bool {
        self.pending
            .values()
            .any(|p| p.savepoint.as_ref().is_some_and(|s| s.stop))
    }

    /// The earliest deadline of a pending checkpoint.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.pending.values().map(|p| p.deadline).min()
    }

    /// Aborts the pending checkpoints whose deadline passed.
    pub async fn on_timeouts(&mut self, infos: &[TaskInfo]) -> Result<()> {
        let now = Instant::now();
        let expired: Vec<CheckpointId> = self
            .pending
            .iter()
            .filter(|(_, p)| p.deadline <= now)
            .map(|(id, _)| *id)
            .collect();
        for id in expired {
            let reason = format!("timed out after {:?}", self.config.timeout);
            self.fail_checkpoint(id, reason, infos, true).await?;
        }
        Ok(())
    }

    /// Before an attempt starts: no final checkpoint yet.
    pub fn begin_attempt(&mut self) {
        self.final_id = None;
        self.final_failure = None;
    }

    /// After an attempt (every task and snapshot writer stopped): its
    /// pending checkpoints fail, and the files of everything aborted in it
    /// are removed (writers may have finished files after the abort).
    pub async fn end_attempt(&mut self, infos: &[TaskInfo]) {
        let pending: Vec<CheckpointId> = self.pending.keys().copied().collect();
        for id in pending {
            // Not counted: the attempt is over either way.
            let _ = self
                .fail_checkpoint(id, "the job attempt ended".into(), infos, false)
                .await;
        }
        for id in std::mem::take(&mut self.aborted) {
            if let Some(loc) = self.aborted_savepoints.remove(&id) {
                if let Err(e) = loc.storage.delete_dir(&loc.dir).await {
                    warn!("could not remove aborted savepoint {}: {e}", loc.describe());
                }
            } else if !self.completed.contains(id) {
                if let Err(e) = self.storage.discard(id).await {
                    warn!("could not remove the files of aborted checkpoint {id}: {e}");
                }
            }
        }
        self.aborted_savepoints.clear();
        self.savepoint_targets.clear();
    }

    /// Decides the commits whose outcome was unknown by reading them back
    /// ([`CompletedCheckpoints::decide`]) and records the outcome. A
    /// checkpoint found committed is completed now, and the tasks in
    /// `infos` (if any: between attempts there are none) are told.
    pub async fn resolve_undecided(&mut self, infos: &[TaskInfo]) {
        for d in self.completed.decide().await {
            let id = d.id;
            match (&d.outcome, &d.savepoint) {
                (Ok(()), Some(loc)) => {
                    info!(
                        checkpoint = id.0,
                        "savepoint {id} at {} was committed after all",
                        loc.describe()
                    );
                }
                (Ok(()), None) => {
                    info!(
                        checkpoint = id.0,
                        "checkpoint {id} was committed after all (read back)"
                    );
                    if !infos.is_empty() {
                        for t in infos {
                            let _ = t.control.send(Control::Complete(id));
                        }
                        self.completed.delivered(id);
                    }
                }
                (Err(reason), _) => warn!(checkpoint = id.0, "checkpoint {id} was not committed: {reason}"),
            }
            match d.outcome {
                Ok(()) => self.stats.record(id, &d.stats, CheckpointStatus::Completed),
                Err(reason) => self.stats.failed(id, &reason, d.stats.duration),
            }
        }
        self.completed.retain(&self.pinned()).await;
    }

    /// Triggers the final checkpoint (every source reached its end): the
    /// sources end once it is committed. Aligned even with unaligned
    /// checkpoints: no record may be in flight behind it.
    pub async fn trigger_final(&mut self, infos: &[TaskInfo]) -> Result<()> {
        self.final_id = self.trigger(infos, TriggerKind::Final).await?;
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

    /// Triggers a checkpoint of `kind`. A periodic one is skipped (`None`)
    /// while `max_concurrent` checkpoints are pending or within `min_pause`
    /// of the last completion.
    pub async fn trigger(&mut self, infos: &[TaskInfo], kind: TriggerKind) -> Result<Option<CheckpointId>> {
        if let TriggerKind::Periodic = kind {
            if self.pending.len() >= self.config.max_concurrent {
                return Ok(None);
            }
            if self
                .last_completion
                .is_some_and(|t| t.elapsed() < self.config.min_pause)
            {
                return Ok(None);
            }
        }
        let id = self.next_id;
        self.next_id = id.next();
        let aligned = matches!(kind, TriggerKind::Final);
        let alignment = match self.config.mode {
            // With an alignment timeout, tasks start aligned and switch.
            CheckpointingMode::ExactlyOnce if aligned || !self.config.unaligned => Alignment::Aligned,
            CheckpointingMode::ExactlyOnce if self.config.aligned_checkpoint_timeout.is_some() => {
                Alignment::AlignedWithTimeout
            }
            CheckpointingMode::ExactlyOnce => Alignment::Unaligned,
            CheckpointingMode::AtLeastOnce => Alignment::AtLeastOnce,
        };
        let responder = match kind {
            TriggerKind::Requested(tx) => Some(tx),
            TriggerKind::Periodic | TriggerKind::Final => None,
        };
        // Incremental: relative to the newest completed checkpoint, whose
        // files stay while this one is in flight.
        let base = match self.config.incremental {
            Some(_) => self.completed.newest_base(),
            None => None,
        };
        self.start(
            infos,
            id,
            CheckpointKind::Checkpoint,
            alignment,
            base,
            responder,
            None,
        )
        .await
    }

    #[allow(clippy::too_many_arguments)]
    pub(super) async fn start(
        &mut self,
        infos: &[TaskInfo],
        id: CheckpointId,
        kind: CheckpointKind,
        alignment: Alignment,
        base: Option<CheckpointId>,
        responder: Option<CheckpointResponder>,
        savepoint: Option<PendingSavepoint>,
    ) -> Result<Option<CheckpointId>> {
        let barrier = CheckpointBarrier {
            checkpoint_id: id,
            timestamp_ms: now_ms(),
            kind,
            alignment,
            base,
        };
        let stop = savepoint.as_ref().is_some_and(|s| s.stop);
        let started = Instant::now();
        self.pending.insert(
            id,
            Pending {
                barrier,
                started,
                deadline: started + self.config.timeout,
                acks: HashMap::new(),
                channel_state: Vec::new(),
                alignment: Vec::new(),
                input_alignment: Vec::new(),
                sync_max: Duration::ZERO,
                async_max: Duration::ZERO,
                responders: responder.into_iter().collect(),
                savepoint,
                keep_files: false,
            },
        );
        self.stats.push(CheckpointStats {
            id,
            kind: barrier.kind,
            trigger_time_ms: barrier.timestamp_ms,
            status: CheckpointStatus::InProgress,
            duration: Duration::ZERO,
            state_size: 0,
            written_size: 0,
            alignment: Vec::new(),
            sync_max: Duration::ZERO,
            async_max: Duration::ZERO,
            channel_state_size: 0,
            subtasks: Vec::new(),
            operators: Vec::new(),
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

    pub async fn on_event(&mut self, ev: TaskEvent, infos: &[TaskInfo]) -> Result<()> {
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
                start_delay,
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
                let written: u64 = parts
                    .iter()
                    .flat_map(|a| a.snapshot.state_files())
                    .map(|f| f.size)
                    .sum::<u64>()
                    + channel_state.as_ref().map_or(0, |c| c.size);
                let detail = SubtaskCheckpointStats {
                    task: infos.get(task).map(|t| t.name.clone()).unwrap_or_default(),
                    acknowledged_after: p.started.elapsed(),
                    start_delay,
                    alignment,
                    sync,
                    async_part,
                    state_size: written,
                };
                self.stats.update(checkpoint, |s| s.subtasks.push(detail));
                p.acks.insert(task, parts);
                p.channel_state.extend(channel_state);
                p.alignment.push(alignment);
                if infos.get(task).is_some_and(|t| !t.is_source) {
                    p.input_alignment.push(alignment);
                }
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
        let base = p.barrier.base.and_then(|b| self.completed.metadata(b).cloned());
        let assembled = commit::assemble_metadata(
            &self.name,
            self.max_parallelism,
            &p.barrier,
            duration,
            std::mem::take(&mut p.acks).into_values().flatten(),
            std::mem::take(&mut p.channel_state),
            base.as_deref(),
        );
        let meta = match assembled {
            Ok(m) => m,
            Err(reason) => {
                self.pending.insert(id, p);
                let counts = true;
                return self.fail_checkpoint(id, reason, infos, counts).await;
            }
        };
        let json = Bytes::from(meta.to_json()?);
        let stats = CompletedStats {
            duration,
            state_size: meta.state_size(),
            written_size: meta.own_state_size(),
            channel: meta.channel_state_size(),
            alignment: p.alignment.clone(),
            input_alignment: p.input_alignment.clone(),
            sync_max: p.sync_max,
            async_max: p.async_max,
            operators: meta
                .operators
                .iter()
                .map(|o| {
                    let size = o
                        .subtasks
                        .iter()
                        .flat_map(|s| s.state_files())
                        .map(|f| f.size)
                        .sum();
                    (o.uid.to_string(), size)
                })
                .collect(),
        };
        // Checkpoint and savepoint metadata are committed the same way.
        let target = match &p.savepoint {
            Some(sp) => CommitTarget::file(
                sp.location.storage.clone(),
                sp.location.join(SAVEPOINT_METADATA_FILE),
            ),
            None => {
                #[cfg(feature = "testing")]
                if let Some(hook) = &self.commit_hook {
                    if let Err(e) = hook.before_commit(id) {
                        // Simulated crash of the job master: the checkpoint
                        // stays uncommitted; teardown removes its files.
                        self.aborted.insert(id);
                        let _ = self.storage.discard(id).await;
                        return Err(e);
                    }
                }
                CommitTarget::checkpoint(self.storage.clone(), id)
            }
        };
        let outcome = commit::commit(&target, &json).await;
        if p.savepoint.is_some() {
            self.savepoint_targets.remove(id);
        }
        match outcome {
            CommitOutcome::Committed => match p.savepoint.take() {
                Some(sp) => {
                    self.savepoint_committed(id, sp, meta, &stats, infos);
                    Ok(())
                }
                None => {
                    self.checkpoint_committed(id, p, Arc::new(meta), &stats, infos)
                        .await
                }
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
                let undecided = Undecided {
                    target,
                    json,
                    meta: Arc::new(meta),
                    savepoint: None,
                    stats,
                    reason: reason.clone(),
                };
                self.commit_unknown(id, p, undecided, infos)
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
        meta: Arc<sluice_core::CheckpointMetadata>,
        stats: &CompletedStats,
        infos: &[TaskInfo],
    ) -> Result<()> {
        self.consecutive_failures = 0;
        self.last_completion = Some(Instant::now());
        info!(
            checkpoint = id.0,
            "checkpoint {id} completed in {} ms: {} bytes ({} written), max alignment {} ms, sync {} ms, async {} ms",
            stats.duration.as_millis(),
            stats.state_size,
            stats.written_size,
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
        self.stats.record(id, stats, CheckpointStatus::Completed);
        self.completed.add(id, meta);
        if self.completed.has_undecided() {
            // A newer checkpoint committed: a good moment to decide the
            // older commits whose outcome is unknown.
            self.resolve_undecided(infos).await;
        }
        for t in infos {
            let _ = t.control.send(Control::Complete(id));
        }
        self.completed.delivered(id);
        if self.final_id == Some(id) {
            end_sources(infos);
        }
        // Older pending checkpoints are subsumed.
        let older: Vec<CheckpointId> = self.pending.range(..id).map(|(k, _)| *k).collect();
        let mut result = Ok(());
        for o in older {
            result = self
                .fail_checkpoint(o, format!("subsumed by checkpoint {id}"), infos, false)
                .await;
            if result.is_err() {
                break;
            }
        }
        self.completed.retain(&self.pinned()).await;
        // Answered last: when a trigger returns, retention has been applied
        // to storage.
        for r in p.responders {
            let _ = r.send(Ok(id));
        }
        result
    }

    /// The bases of the checkpoints in flight: not discarded until these end.
    fn pinned(&self) -> BTreeSet<CheckpointId> {
        self.pending.values().filter_map(|p| p.barrier.base).collect()
    }

    /// The commit of checkpoint or savepoint `id` has an unknown outcome:
    /// it is kept (files and all) until a read-back decides
    /// ([`Self::resolve_undecided`]); nobody is told it completed. It
    /// counts against the tolerable failures; a final checkpoint is taken
    /// again; a stop-with-savepoint does not stop the job.
    fn commit_unknown(
        &mut self,
        id: CheckpointId,
        p: Pending,
        mut undecided: Undecided,
        infos: &[TaskInfo],
    ) -> Result<()> {
        let reason = undecided.reason.clone();
        let target = undecided.target.clone();
        warn!(
            checkpoint = id.0,
            "the outcome of the commit of {} {id} is unknown ({reason}); it is not used, notified or deleted until \
             reading {} back decides",
            p.barrier.kind,
            target.describe()
        );
        self.stats
            .record(id, &undecided.stats, CheckpointStatus::Unresolved(reason.clone()));
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
        undecided.savepoint = savepoint;
        self.completed.add_undecided(id, undecided);
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
        if self.consecutive_failures > self.config.tolerable_failures {
            return Err(RuntimeError::TooManyCheckpointFailures {
                failures: self.consecutive_failures,
                tolerable: self.config.tolerable_failures,
                last_id: id,
                reason,
            });
        }
        Ok(())
    }

    /// Aborts checkpoint `id`: tasks are told, its files are removed (unless
    /// it is marked to keep them), and if `counts`, it counts against the
    /// tolerable failures.
    pub async fn fail_checkpoint(
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
            self.savepoint_targets.remove(id);
            if !p.keep_files {
                if let Err(e) = sp.location.storage.delete_dir(&sp.location.dir).await {
                    warn!(
                        "could not remove failed savepoint {}: {e}",
                        sp.location.describe()
                    );
                }
                self.aborted_savepoints.insert(id, sp.location.clone());
            }
            self.stats.failed(id, &reason, p.started.elapsed());
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
        self.stats.failed(id, &reason, p.started.elapsed());
        for r in p.responders {
            let _ = r.send(Err(reason.clone()));
        }
        match counts {
            true => self.count_failure(id, reason),
            false => Ok(()),
        }
    }
}

pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Tells every source task to finish.
pub(crate) fn end_sources(infos: &[TaskInfo]) {
    for t in infos.iter().filter(|t| t.is_source) {
        let _ = t.control.send(Control::EndInput);
    }
}
