//! Recovery (Flink's failover and restart handling): what a failed attempt
//! means (a fatal error, a corrupt restore point, or a case for the restart
//! strategy), which restore point the next attempt uses, and the checks a
//! restore point must pass before any task starts. The rules are in
//! `docs/architecture.md`, "Recovery rules at the edges".

use super::completed::CompletedCheckpoints;
use super::coordinator::Coordinator;
use crate::config::RestartStrategy;
use crate::error::{Result, RuntimeError};
use crate::savepoint::RestoreSource;
use sluice_core::{CheckpointId, CheckpointStorage, OperatorUid};
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;
use tracing::{error, info, warn};

/// A checkpoint found unrestorable, and why.
pub(crate) type BadCheckpoint = (CheckpointId, sluice_core::Error);

/// What to do after a failed attempt.
pub(crate) enum AfterFailure {
    /// Wait `delay`, then choose a restore point (telling it about `bad`).
    Restart {
        delay: Duration,
        bad: Option<BadCheckpoint>,
    },
    /// The job fails with this error.
    GiveUp(RuntimeError),
}

/// The recovery state of a job: the restart strategy's count, the
/// checkpoints found bad, and what the restore rules depend on.
pub(crate) struct Recovery {
    restart: RestartTracker,
    restart_name: String,
    /// Checkpoints found corrupt: never restored from again.
    bad: BTreeSet<CheckpointId>,
    /// State files found corrupt: no checkpoint that references one (an
    /// incremental chain shares its base) is restored from again.
    bad_files: BTreeSet<String>,
    /// Whether the job has two-phase-commit sinks.
    transactional: bool,
    /// `CheckpointConfig::fallback_to_older_checkpoint`.
    fallback_allowed: bool,
    allow_non_restored_state: bool,
    max_parallelism: u32,
    /// The job's operator uids and task uids.
    uids: Vec<OperatorUid>,
    task_uids: Vec<String>,
}

/// What recovery needs to know about the job.
pub(crate) struct RecoverySettings {
    pub restart: RestartStrategy,
    pub transactional: bool,
    pub fallback_allowed: bool,
    pub allow_non_restored_state: bool,
    pub max_parallelism: u32,
    pub uids: Vec<OperatorUid>,
    pub task_uids: Vec<String>,
}

impl Recovery {
    /// Recovery for a job with these settings.
    pub fn new(s: RecoverySettings) -> Self {
        Recovery {
            restart_name: s.restart.to_string(),
            restart: RestartTracker::new(s.restart),
            bad: BTreeSet::new(),
            bad_files: BTreeSet::new(),
            transactional: s.transactional,
            fallback_allowed: s.fallback_allowed,
            allow_non_restored_state: s.allow_non_restored_state,
            max_parallelism: s.max_parallelism,
            uids: s.uids,
            task_uids: s.task_uids,
        }
    }

    /// Restarts made so far.
    pub fn restarts(&self) -> u32 {
        self.restart.restarts()
    }

    /// Decides what a failure means. Incompatible state and an
    /// unrestorable checkpoint end the job (a restart cannot cure them), as
    /// does a corrupt savepoint the job started or stopped with; a corrupt
    /// checkpoint is marked bad (never restored again) and reported for the
    /// choice of the next restore point; else the restart strategy decides.
    /// `restore` is what the failed attempt restored; `fixed` the restore
    /// points that cannot be replaced (the initial savepoint, a committed
    /// stop-with-savepoint).
    pub fn on_failure(
        &mut self,
        failure: RuntimeError,
        restore: Option<&Arc<RestoreSource>>,
        fixed: &[Option<&Arc<RestoreSource>>],
    ) -> AfterFailure {
        if !failure.is_restartable() {
            return AfterFailure::GiveUp(failure);
        }
        let mut bad = None;
        let mut failure = failure;
        if let (RuntimeError::Storage(sluice_core::Error::Corrupt { .. }), Some(r)) = (&failure, restore) {
            if fixed.iter().flatten().any(|f| Arc::ptr_eq(f, r)) {
                error!(
                    "{} is corrupt ({failure}); the job does not start from it",
                    r.describe()
                );
                return AfterFailure::GiveUp(failure);
            }
            let id = r.metadata.checkpoint_id;
            warn!(
                checkpoint = id.0,
                "checkpoint {id} is corrupt ({failure}); it will not be restored from again"
            );
            self.bad.insert(id);
            if let RuntimeError::Storage(sluice_core::Error::Corrupt { path, .. }) = &failure {
                if r.metadata.state_files().any(|f| f.path == *path) {
                    self.bad_files.insert(path.clone());
                }
            }
            let e = match failure {
                RuntimeError::Storage(e) => e,
                other => sluice_core::Error::corrupt(format!("checkpoint {id}"), other.to_string()),
            };
            failure = RuntimeError::Storage(sluice_core::Error::corrupt(
                format!("checkpoint {id}"),
                e.to_string(),
            ));
            bad = Some((id, e));
        }
        match self.restart.on_failure(std::time::Instant::now()) {
            Some(delay) => AfterFailure::Restart { delay, bad },
            None => AfterFailure::GiveUp(RuntimeError::RestartsExhausted {
                strategy: self.restart_name.clone(),
                attempts: self.restart.restarts(),
                last: Box::new(failure),
            }),
        }
    }

    /// Chooses what the next attempt restores from: the committed
    /// stop-with-savepoint, if there is one (the attempt then ends at once);
    /// else the newest completed checkpoint that can be read, then older
    /// ones, then the savepoint the job started from (`initial`), then
    /// nothing. A transactional job never silently restores anything older
    /// than the newest checkpoint whose completion was delivered
    /// ([`Self::check_fallback`]). `bad`: a checkpoint the failed attempt
    /// found corrupt. A transient read error, and a commit whose outcome is
    /// still unknown and newer than every completed checkpoint, are errors:
    /// the caller tries again after a restart delay.
    pub async fn choose_restore(
        &mut self,
        coordinator: &mut Coordinator,
        storage: &Arc<dyn CheckpointStorage>,
        initial: &Option<Arc<RestoreSource>>,
        mut bad: Option<BadCheckpoint>,
    ) -> Result<Option<Arc<RestoreSource>>> {
        if let Some(r) = &coordinator.completed.stop_restore {
            return Ok(Some(r.clone()));
        }
        coordinator.resolve_undecided(&[]).await;
        let completed = &coordinator.completed;
        if let Some((id, reason)) = completed.newest_undecided_checkpoint() {
            if completed.newest().is_none_or(|n| id > n) {
                return Err(RuntimeError::CommitUnresolved {
                    checkpoint: id,
                    reason: reason.to_string(),
                });
            }
        }
        let ids: Vec<CheckpointId> = completed
            .newest_first()
            .into_iter()
            .filter(|id| !self.bad.contains(id))
            .collect();
        for id in ids {
            // A checkpoint sharing a file found corrupt fails the same way.
            let shared = completed.metadata(id).and_then(|m| {
                m.state_files()
                    .find(|f| self.bad_files.contains(&f.path))
                    .map(|f| f.path.clone())
            });
            if let Some(path) = shared {
                warn!(
                    checkpoint = id.0,
                    "checkpoint {id} references {path}, found corrupt: skipped"
                );
                self.bad.insert(id);
                bad.get_or_insert((
                    id,
                    sluice_core::Error::corrupt(path, "found corrupt in a newer checkpoint's restore"),
                ));
                continue;
            }
            self.check_fallback(completed, &mut bad, Some(id))?;
            match RestoreSource::checkpoint(storage.clone(), id).await {
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
        self.check_fallback(completed, &mut bad, None)?;
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
        completed: &CompletedCheckpoints,
        bad: &mut Option<BadCheckpoint>,
        to: Option<CheckpointId>,
    ) -> Result<()> {
        let Some((bad_id, _)) = bad.as_ref() else {
            return Ok(());
        };
        let target = match to {
            Some(id) => format!("checkpoint {id}"),
            None => "the start of the job (or its initial savepoint)".to_string(),
        };
        let past_delivered = completed.notified.is_some_and(|n| to.is_none_or(|t| t < n));
        if !self.transactional || !past_delivered {
            warn!("checkpoint {bad_id} cannot be restored; falling back to {target}");
            return Ok(());
        }
        if self.fallback_allowed {
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

    /// Checks that the job can start from `restore` (a savepoint or another
    /// storage's checkpoint): same max parallelism, and an operator for
    /// every uid with state (unless `allow_non_restored_state`).
    pub fn check_restore(&self, restore: &RestoreSource) -> Result<()> {
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
    pub fn check_channel_state(&self, restore: &RestoreSource) -> Result<()> {
        let unknown: BTreeSet<&str> = restore
            .metadata
            .channel_state
            .iter()
            .filter(|c| !c.task_uid.is_empty() && !self.task_uids.contains(&c.task_uid))
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
                    self.task_uids.join(", ")
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
}

/// The delay before restart number `restarts` (0-based) of an exponential
/// backoff: `initial * multiplier^restarts`, saturating at `max` for any
/// number of restarts (also when the product overflows `Duration` or is not
/// finite, and for a NaN multiplier, which counts as 1).
pub(crate) fn backoff_delay(initial: Duration, max: Duration, multiplier: f64, restarts: u32) -> Duration {
    let multiplier = if multiplier.is_nan() {
        1.0
    } else {
        multiplier.max(1.0)
    };
    let secs = initial.as_secs_f64() * multiplier.powf(f64::from(restarts));
    if !secs.is_finite() || secs >= max.as_secs_f64() {
        return max;
    }
    Duration::try_from_secs_f64(secs).map_or(max, |d| d.min(max))
}

/// Decides restarts for one job run.
#[derive(Debug)]
pub(crate) struct RestartTracker {
    strategy: RestartStrategy,
    restarts: u32,
    failures: Vec<std::time::Instant>,
}

impl RestartTracker {
    pub fn new(strategy: RestartStrategy) -> Self {
        RestartTracker {
            strategy,
            restarts: 0,
            failures: Vec::new(),
        }
    }

    pub fn restarts(&self) -> u32 {
        self.restarts
    }

    /// After a failure: `Some(delay)` to restart, `None` to give up.
    pub fn on_failure(&mut self, now: std::time::Instant) -> Option<Duration> {
        let decision = match &self.strategy {
            RestartStrategy::None => None,
            RestartStrategy::FixedDelay { attempts, delay } => (self.restarts < *attempts).then_some(*delay),
            RestartStrategy::ExponentialBackoff {
                initial,
                max,
                multiplier,
                attempts,
            } => {
                (self.restarts < *attempts).then(|| backoff_delay(*initial, *max, *multiplier, self.restarts))
            }
            RestartStrategy::FailureRate {
                max_failures,
                interval,
                delay,
            } => {
                self.failures.push(now);
                self.failures.retain(|t| now.duration_since(*t) <= *interval);
                (self.failures.len() as u32 <= *max_failures).then_some(*delay)
            }
        };
        if decision.is_some() {
            self.restarts += 1;
        }
        decision
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RestartStrategy;
    use std::time::Instant;

    #[test]
    fn fixed_delay_gives_up_after_its_attempts() {
        let mut t = RestartTracker::new(RestartStrategy::FixedDelay {
            attempts: 2,
            delay: Duration::from_millis(5),
        });
        let now = Instant::now();
        assert_eq!(t.on_failure(now), Some(Duration::from_millis(5)));
        assert_eq!(t.on_failure(now), Some(Duration::from_millis(5)));
        assert_eq!(t.on_failure(now), None);
        assert_eq!(t.restarts(), 2);
    }

    #[test]
    fn exponential_backoff_grows_and_caps() {
        let mut t = RestartTracker::new(RestartStrategy::ExponentialBackoff {
            initial: Duration::from_millis(10),
            max: Duration::from_millis(35),
            multiplier: 2.0,
            attempts: 10,
        });
        let now = Instant::now();
        let d: Vec<_> = (0..4).map(|_| t.on_failure(now).unwrap()).collect();
        assert_eq!(d, [10, 20, 35, 35].map(Duration::from_millis));
    }

    #[test]
    fn exponential_backoff_delays_saturate_at_the_maximum_for_any_number_of_restarts() {
        let max = Duration::from_secs(300);
        let mut t = RestartTracker::new(RestartStrategy::ExponentialBackoff {
            initial: Duration::from_millis(100),
            max,
            multiplier: 2.0,
            attempts: u32::MAX,
        });
        let now = Instant::now();
        let mut last = Duration::ZERO;
        for n in 0..10_000u32 {
            let d = t.on_failure(now).expect("restarts left");
            assert!(d >= last && d <= max, "restart {n}: {d:?} after {last:?}");
            last = d;
        }
        assert_eq!(last, max);
        // Extreme settings: huge factors, huge initial delays, NaN.
        for (initial, multiplier) in [
            (Duration::MAX, 2.0),
            (Duration::from_secs(1), f64::MAX),
            (Duration::from_secs(1), f64::INFINITY),
            (Duration::from_secs(1), f64::NAN),
        ] {
            for restarts in [0, 1, 68, 1_000, u32::MAX] {
                let d = backoff_delay(initial, max, multiplier, restarts);
                assert!(d <= max, "{initial:?} x{multiplier} after {restarts}: {d:?}");
            }
        }
        assert_eq!(
            backoff_delay(Duration::from_secs(1), max, f64::NAN, 5),
            Duration::from_secs(1)
        );
    }

    #[test]
    fn failure_rate_counts_failures_in_the_window() {
        let mut t = RestartTracker::new(RestartStrategy::FailureRate {
            max_failures: 2,
            interval: Duration::from_secs(60),
            delay: Duration::ZERO,
        });
        let now = Instant::now();
        assert!(t.on_failure(now).is_some());
        assert!(t.on_failure(now).is_some());
        assert!(t.on_failure(now).is_none());
        let mut t2 = RestartTracker::new(RestartStrategy::FailureRate {
            max_failures: 1,
            interval: Duration::from_millis(10),
            delay: Duration::ZERO,
        });
        assert!(t2.on_failure(now).is_some());
        assert!(
            t2.on_failure(now + Duration::from_millis(50)).is_some(),
            "old failure left the window"
        );
    }

    #[test]
    fn none_never_restarts() {
        assert_eq!(
            RestartTracker::new(RestartStrategy::None).on_failure(Instant::now()),
            None
        );
    }
}
