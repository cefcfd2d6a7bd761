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
