//! Checkpointing and restart configuration.

use crate::error::{Result, RuntimeError};
use std::time::Duration;

/// Exactly-once (aligned barriers) or at-least-once (no alignment).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum CheckpointingMode {
    /// Barriers are aligned: every record affects the state exactly once.
    #[default]
    ExactlyOnce,
    /// Barriers are not aligned: after a failure some records may affect the
    /// state twice.
    AtLeastOnce,
}

/// Checkpoint settings (Flink's `CheckpointConfig`).
#[derive(Debug, Clone)]
pub struct CheckpointConfig {
    /// Time between periodic checkpoints; `None` disables periodic
    /// checkpoints (they can still be triggered through the job handle).
    pub interval: Option<Duration>,
    /// Exactly-once or at-least-once.
    pub mode: CheckpointingMode,
    /// A checkpoint not complete after this long is aborted.
    pub timeout: Duration,
    /// Minimum time from the end of one checkpoint to the trigger of the next.
    pub min_pause: Duration,
    /// Checkpoints in flight at the same time.
    pub max_concurrent: usize,
    /// Consecutive failed checkpoints tolerated before the job attempt fails.
    pub tolerable_failures: u32,
    /// Completed checkpoints kept; older ones are discarded once a newer one
    /// completes.
    pub retained: usize,
    /// Take a final checkpoint when every source has reached its end, before
    /// the tasks finish (Flink's final checkpoint of bounded jobs): it holds
    /// the job's final state, and the job ends only once it is committed.
    pub final_checkpoint: bool,
    /// Unaligned checkpoints (exactly-once only): barriers overtake the
    /// records queued between tasks, which are stored with the checkpoint as
    /// channel state, so checkpoints complete under backpressure.
    pub unaligned: bool,
    /// With `unaligned`: start every checkpoint aligned and switch a task to
    /// unaligned when its alignment takes longer than this (Flink's
    /// `aligned-checkpoint-timeout`). `None`: unaligned from the start.
    pub aligned_checkpoint_timeout: Option<Duration>,
    /// When the latest completed checkpoint cannot be restored (a corrupt or
    /// missing file) in a job with two-phase-commit sinks, restore an older
    /// one anyway. Off by default: the sinks already committed the newer
    /// checkpoint's output, so the records between the two would be
    /// committed again (duplicated output); the job fails instead, naming
    /// the file and the checkpoint. Jobs without transactional sinks always
    /// fall back (their keyed state stays exactly-once).
    pub fallback_to_older_checkpoint: bool,
    /// Incremental checkpoints: each keyed subtask writes only what changed
    /// since the newest completed checkpoint (upserts and deletions) and
    /// references that checkpoint's files; `None`: every checkpoint writes
    /// the whole state. On by default. Savepoints are always full.
    pub incremental: Option<IncrementalPolicy>,
}

/// When an incremental chain (a full base and the changes files since) is
/// folded into a new base: a subtask whose chain reached `max_chain`
/// changes files, or whose changes files together outgrew
/// `max_changes_ratio` times its base, writes a full snapshot at its next
/// checkpoint instead of its changes (in the asynchronous part: processing
/// goes on). Restore reads at most the base and `max_chain` changes files.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct IncrementalPolicy {
    /// Changes files on top of a base before the next snapshot is full.
    pub max_chain: u32,
    /// Bytes of changes files, relative to the base's, before the next
    /// snapshot is full.
    pub max_changes_ratio: f64,
}

impl Default for IncrementalPolicy {
    /// 8 changes files, or changes as large as the base.
    fn default() -> Self {
        IncrementalPolicy {
            max_chain: 8,
            max_changes_ratio: 1.0,
        }
    }
}

impl Default for CheckpointConfig {
    fn default() -> Self {
        CheckpointConfig {
            interval: None,
            mode: CheckpointingMode::ExactlyOnce,
            timeout: Duration::from_secs(600),
            min_pause: Duration::ZERO,
            max_concurrent: 1,
            tolerable_failures: 3,
            retained: 1,
            final_checkpoint: true,
            unaligned: false,
            aligned_checkpoint_timeout: None,
            fallback_to_older_checkpoint: false,
            incremental: Some(IncrementalPolicy::default()),
        }
    }
}

impl CheckpointConfig {
    /// Periodic exactly-once checkpoints every `interval`, other settings default.
    pub fn every(interval: Duration) -> Self {
        CheckpointConfig {
            interval: Some(interval),
            ..Default::default()
        }
    }

    /// Checks the settings.
    pub fn validate(&self) -> Result<()> {
        if self.interval.is_some_and(|i| i.is_zero()) {
            return Err(RuntimeError::InvalidJob(
                "checkpoint interval must be positive".into(),
            ));
        }
        if self.max_concurrent == 0 {
            return Err(RuntimeError::InvalidJob(
                "max concurrent checkpoints must be at least 1".into(),
            ));
        }
        if self.retained == 0 {
            return Err(RuntimeError::InvalidJob(
                "retained checkpoints must be at least 1".into(),
            ));
        }
        if self.unaligned && self.mode != CheckpointingMode::ExactlyOnce {
            return Err(RuntimeError::InvalidJob(
                "unaligned checkpoints need the exactly-once mode (at-least-once does not align anyway)"
                    .into(),
            ));
        }
        if self.aligned_checkpoint_timeout.is_some() && !self.unaligned {
            return Err(RuntimeError::InvalidJob(
                "an aligned checkpoint timeout switches to unaligned checkpoints: set `unaligned` too".into(),
            ));
        }
        if let Some(p) = &self.incremental {
            if p.max_chain == 0 || p.max_changes_ratio.is_nan() || p.max_changes_ratio <= 0.0 {
                return Err(RuntimeError::InvalidJob(format!(
                    "incremental policy {p:?}: max_chain and max_changes_ratio must be positive"
                )));
            }
        }
        if self.timeout.is_zero() {
            return Err(RuntimeError::InvalidJob(
                "checkpoint timeout must be positive".into(),
            ));
        }
        Ok(())
    }
}

/// What to do when a job attempt fails (Flink's restart strategies).
#[derive(Debug, Clone, PartialEq)]
pub enum RestartStrategy {
    /// Fail the job at the first failure.
    None,
    /// Restart up to `attempts` times, waiting `delay` before each.
    FixedDelay {
        /// Maximum number of restarts.
        attempts: u32,
        /// Wait before each restart.
        delay: Duration,
    },
    /// Restart with a delay that grows by `multiplier` from `initial` up to
    /// `max`, at most `attempts` times.
    ExponentialBackoff {
        /// First delay.
        initial: Duration,
        /// Largest delay.
        max: Duration,
        /// Growth factor (>= 1).
        multiplier: f64,
        /// Maximum number of restarts.
        attempts: u32,
    },
    /// Restart after `delay` unless more than `max_failures` failures
    /// happened within the last `interval`.
    FailureRate {
        /// Failures tolerated within `interval`.
        max_failures: u32,
        /// The sliding window.
        interval: Duration,
        /// Wait before each restart.
        delay: Duration,
    },
}

impl Default for RestartStrategy {
    fn default() -> Self {
        RestartStrategy::FixedDelay {
            attempts: 3,
            delay: Duration::from_millis(100),
        }
    }
}

impl std::fmt::Display for RestartStrategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RestartStrategy::None => write!(f, "none"),
            RestartStrategy::FixedDelay { attempts, delay } => {
                write!(f, "fixed-delay({attempts} attempts, {delay:?})")
            }
            RestartStrategy::ExponentialBackoff {
                initial,
                max,
                multiplier,
                attempts,
            } => write!(
                f,
                "exponential-backoff({initial:?}..{max:?} x{multiplier}, {attempts} attempts)"
            ),
            RestartStrategy::FailureRate {
                max_failures,
                interval,
                delay,
            } => {
                write!(f, "failure-rate({max_failures} per {interval:?}, {delay:?})")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_checkpoint_settings_are_refused() {
        assert!(CheckpointConfig {
            max_concurrent: 0,
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(CheckpointConfig {
            retained: 0,
            ..Default::default()
        }
        .validate()
        .is_err());
        assert!(CheckpointConfig::every(Duration::ZERO).validate().is_err());
        assert!(CheckpointConfig::every(Duration::from_millis(1))
            .validate()
            .is_ok());
    }
}
