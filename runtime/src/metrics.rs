//! What a running job counts, for monitoring: per task (one subtask of one
//! operator chain) the records in and out, the time it was backpressured,
//! its last checkpoint start delay and alignment, and a source's split
//! positions ([`TaskMetrics`]); per job the source records and the
//! histograms of checkpoint durations and alignments ([`Metrics`]).
//! [`RateSampler`] turns the counters into per-second rates (Flink's
//! `numRecordsInPerSecond`, `backPressuredTimeMsPerSecond`) and keeps their
//! recent history. The REST API exposes all of it (`GET /metrics` in the
//! Prometheus format, `GET /tasks`, `GET /timeline`).
//!
//! Counting costs one relaxed atomic add per batch, not per record.

use prometheus_client::metrics::histogram::Histogram;
use serde::Serialize;
use sluice_core::SplitPosition;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// The counters of one task (one subtask of an operator chain). They live
/// as long as the job: a restarted attempt counts on.
#[derive(Debug)]
pub struct TaskMetrics {
    /// The task's vertex in the job graph (names need not be unique).
    pub vertex: u32,
    /// The task's name (its operators, as in the job graph).
    pub task: String,
    /// The subtask's index.
    pub subtask: u32,
    /// The task's parallelism.
    pub parallelism: u32,
    /// Whether the task reads a source.
    pub is_source: bool,
    pub(crate) records_in: AtomicU64,
    pub(crate) records_out: AtomicU64,
    pub(crate) backpressured_ns: AtomicU64,
    /// When the wait for channel capacity in progress started
    /// ([`mono_ns`]); 0: not waiting.
    waiting_since_ns: AtomicU64,
    pub(crate) start_delay_ns: AtomicU64,
    pub(crate) alignment_ns: AtomicU64,
    pub(crate) positions: Mutex<Vec<SplitPosition>>,
}

impl TaskMetrics {
    fn new(vertex: u32, task: &str, subtask: u32, parallelism: u32, is_source: bool) -> Self {
        TaskMetrics {
            vertex,
            task: task.to_string(),
            subtask,
            parallelism,
            is_source,
            records_in: AtomicU64::new(0),
            records_out: AtomicU64::new(0),
            backpressured_ns: AtomicU64::new(0),
            waiting_since_ns: AtomicU64::new(0),
            start_delay_ns: AtomicU64::new(0),
            alignment_ns: AtomicU64::new(0),
            positions: Mutex::new(Vec::new()),
        }
    }

    /// `n` records entered the task (a source: read from its splits).
    #[inline]
    pub(crate) fn records_in(&self, n: u64) {
        self.records_in.fetch_add(n, Ordering::Relaxed);
    }

    /// `n` records left the task for the next one.
    #[inline]
    pub(crate) fn records_out(&self, n: u64) {
        self.records_out.fetch_add(n, Ordering::Relaxed);
    }

    /// The task starts waiting for channel capacity with output queued;
    /// returns the start for [`Self::wait_ended`].
    fn wait_started(&self) -> u64 {
        let now = mono_ns();
        self.waiting_since_ns.store(now, Ordering::Relaxed);
        now
    }

    /// The wait that began at `since` ended (or was interrupted).
    fn wait_ended(&self, since: u64) {
        self.waiting_since_ns.store(0, Ordering::Relaxed);
        self.backpressured_ns
            .fetch_add(mono_ns().saturating_sub(since), Ordering::Relaxed);
    }

    /// Backpressured time so far, the wait in progress included.
    fn backpressured_total_ns(&self) -> u64 {
        let done = self.backpressured_ns.load(Ordering::Relaxed);
        match self.waiting_since_ns.load(Ordering::Relaxed) {
            0 => done,
            since => done + mono_ns().saturating_sub(since),
        }
    }

    /// The task's last checkpoint: its start delay (trigger to first
    /// barrier) and alignment (first to last barrier).
    pub(crate) fn checkpointed(&self, start_delay: Duration, alignment: Duration) {
        self.start_delay_ns
            .store(start_delay.as_nanos() as u64, Ordering::Relaxed);
        self.alignment_ns
            .store(alignment.as_nanos() as u64, Ordering::Relaxed);
    }

    /// A source's split positions now.
    pub(crate) fn set_positions(&self, at: &[SplitPosition]) {
        let mut p = self.positions.lock().unwrap_or_else(|p| p.into_inner());
        p.clear();
        p.extend_from_slice(at);
    }

    /// The counters now.
    pub fn snapshot(&self) -> TaskCounters {
        TaskCounters {
            vertex: self.vertex,
            task: self.task.clone(),
            subtask: self.subtask,
            parallelism: self.parallelism,
            is_source: self.is_source,
            records_in: self.records_in.load(Ordering::Relaxed),
            records_out: self.records_out.load(Ordering::Relaxed),
            backpressured_ms: self.backpressured_total_ns() / 1_000_000,
            start_delay_ms: self.start_delay_ns.load(Ordering::Relaxed) as f64 / 1e6,
            alignment_ms: self.alignment_ns.load(Ordering::Relaxed) as f64 / 1e6,
            positions: self
                .positions
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|p| (p.split, p.offset))
                .collect(),
        }
    }
}

/// Adds the time from its start to its drop to a task's backpressured time
/// (a wait in progress shows in the task's counters while it lasts).
pub(crate) struct WaitTimer<'a> {
    metrics: &'a TaskMetrics,
    since: u64,
}

impl<'a> WaitTimer<'a> {
    pub(crate) fn start(metrics: &'a TaskMetrics) -> Self {
        WaitTimer {
            metrics,
            since: metrics.wait_started(),
        }
    }
}

impl Drop for WaitTimer<'_> {
    fn drop(&mut self) {
        self.metrics.wait_ended(self.since);
    }
}

/// Nanoseconds since the first call in this process, plus one (0 is
/// "not waiting").
fn mono_ns() -> u64 {
    static BASE: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_nanos() as u64 + 1
}

/// A task's counters at one moment ([`TaskMetrics::snapshot`]).
#[derive(Debug, Clone, Serialize)]
pub struct TaskCounters {
    /// The task's vertex in the job graph.
    pub vertex: u32,
    /// The task's name.
    pub task: String,
    /// The subtask's index.
    pub subtask: u32,
    /// The task's parallelism.
    pub parallelism: u32,
    /// Whether the task reads a source.
    pub is_source: bool,
    /// Records that entered the task so far (a source: read).
    pub records_in: u64,
    /// Records it sent to the next task so far.
    pub records_out: u64,
    /// Milliseconds it waited for channel capacity so far.
    pub backpressured_ms: u64,
    /// Its last checkpoint's start delay (trigger to first barrier), ms.
    pub start_delay_ms: f64,
    /// Its last checkpoint's alignment (first to last barrier), ms.
    pub alignment_ms: f64,
    /// A source's `(split, position)` pairs.
    pub positions: Vec<(u32, u64)>,
}

/// Job-wide counters and histograms, shared by all tasks and attempts.
#[derive(Debug)]
pub struct Metrics {
    tasks: Mutex<Vec<Arc<TaskMetrics>>>,
    /// Durations of completed checkpoints, in seconds.
    pub(crate) checkpoint_duration: Histogram,
    /// Alignments of every task with inputs in completed checkpoints, in
    /// seconds (a source task has no barriers to align).
    pub(crate) checkpoint_alignment: Histogram,
    /// Checkpoints (and savepoints) triggered, completed and failed since
    /// the job started (monotonic; the statistics log keeps only the
    /// newest entries).
    pub(crate) checkpoints_triggered: AtomicU64,
    pub(crate) checkpoints_completed: AtomicU64,
    pub(crate) checkpoints_failed: AtomicU64,
    /// Records read by source tasks running on workers (as they last
    /// reported, every second).
    pub(crate) remote_source_records: AtomicU64,
}

/// Bucket bounds in seconds: 21 doublings from 1 ms to about 17.5 minutes
/// (1048.576 s), so that a checkpoint as long as the default 10-minute
/// timeout still falls in a finite bucket.
fn second_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.001, 2.0, 21)
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            tasks: Mutex::new(Vec::new()),
            remote_source_records: AtomicU64::new(0),
            checkpoint_duration: Histogram::new(second_buckets()),
            checkpoint_alignment: Histogram::new(second_buckets()),
            checkpoints_triggered: AtomicU64::new(0),
            checkpoints_completed: AtomicU64::new(0),
            checkpoints_failed: AtomicU64::new(0),
        }
    }
}

impl Metrics {
    /// The counters of subtask `subtask` of task `task` (made at its first
    /// attempt, shared by later ones).
    pub(crate) fn task(
        &self,
        vertex: u32,
        task: &str,
        subtask: u32,
        parallelism: u32,
        is_source: bool,
    ) -> Arc<TaskMetrics> {
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = tasks.iter().find(|t| t.vertex == vertex && t.subtask == subtask) {
            return t.clone();
        }
        let t = Arc::new(TaskMetrics::new(vertex, task, subtask, parallelism, is_source));
        tasks.push(t.clone());
        t
    }

    /// Records read by the source tasks so far (replays count again),
    /// here and, as last reported, on the job's workers.
    pub fn source_records(&self) -> u64 {
        let tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        let here: u64 = tasks
            .iter()
            .filter(|t| t.is_source)
            .map(|t| t.records_in.load(Ordering::Relaxed))
            .sum();
        here + self.remote_source_records.load(Ordering::Relaxed)
    }

    /// Every task's counters now, in the order the tasks started.
    pub fn tasks(&self) -> Vec<TaskCounters> {
        let tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner()).clone();
        tasks.iter().map(|t| t.snapshot()).collect()
    }

    /// Checkpoints (and savepoints) since the job started: triggered,
    /// completed, failed.
    pub fn checkpoint_counts(&self) -> (u64, u64, u64) {
        (
            self.checkpoints_triggered.load(Ordering::Relaxed),
            self.checkpoints_completed.load(Ordering::Relaxed),
            self.checkpoints_failed.load(Ordering::Relaxed),
        )
    }

    /// Records a completed checkpoint in the histograms: its duration and
    /// the alignments of its tasks with inputs.
    pub(crate) fn checkpoint_completed(&self, duration: Duration, alignments: &[Duration]) {
        self.checkpoint_duration.observe(duration.as_secs_f64());
        for a in alignments {
            self.checkpoint_alignment.observe(a.as_secs_f64());
        }
    }
}

/// One task's rates over the last sampling interval.
#[derive(Debug, Clone, Serialize)]
pub struct TaskRates {
    /// The task's counters at the sample.
    #[serde(flatten)]
    pub counters: TaskCounters,
    /// Records in per second.
    pub records_in_per_second: f64,
    /// Records out per second.
    pub records_out_per_second: f64,
    /// Milliseconds per second the task waited for channel capacity
    /// (0–1000; Flink's `backPressuredTimeMsPerSecond`).
    pub backpressured_ms_per_second: f64,
}

/// A sample of the whole job: the time and every task's rates.
#[derive(Debug, Clone, Serialize)]
pub struct Sample {
    /// Milliseconds since the Unix epoch.
    pub time_ms: u64,
    /// Records per second read by the sources.
    pub source_records_per_second: f64,
    /// Every task's rates.
    pub tasks: Vec<TaskRates>,
}

/// Turns the counters into rates, once per [`RateSampler::sample`] call,
/// and keeps the last `keep` samples (the dashboard's charts).
#[derive(Debug)]
pub struct RateSampler {
    metrics: Arc<Metrics>,
    keep: usize,
    inner: Mutex<SamplerState>,
}

#[derive(Debug, Default)]
struct SamplerState {
    last: Option<(Instant, Vec<TaskCounters>)>,
    history: VecDeque<Sample>,
}

impl RateSampler {
    /// A sampler of `metrics` keeping `keep` samples.
    pub fn new(metrics: Arc<Metrics>, keep: usize) -> Self {
        RateSampler {
            metrics,
            keep: keep.max(1),
            inner: Mutex::new(SamplerState::default()),
        }
    }

    /// Samples the counters now; rates are over the time since the last
    /// call (zero at the first).
    pub fn sample(&self) -> Sample {
        let now = Instant::now();
        let tasks = self.metrics.tasks();
        let mut st = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        let rates: Vec<TaskRates> = tasks
            .iter()
            .map(|c| {
                let before = st.last.as_ref().and_then(|(at, prev)| {
                    prev.iter()
                        .find(|p| p.vertex == c.vertex && p.subtask == c.subtask)
                        .map(|p| (now.duration_since(*at).as_secs_f64(), p))
                });
                let rate = |a: u64, b: u64, secs: f64| {
                    if secs > 0.0 {
                        a.saturating_sub(b) as f64 / secs
                    } else {
                        0.0
                    }
                };
                let (i, o, bp) = match before {
                    Some((secs, p)) => (
                        rate(c.records_in, p.records_in, secs),
                        rate(c.records_out, p.records_out, secs),
                        rate(c.backpressured_ms, p.backpressured_ms, secs).min(1000.0),
                    ),
                    None => (0.0, 0.0, 0.0),
                };
                TaskRates {
                    counters: c.clone(),
                    records_in_per_second: i,
                    records_out_per_second: o,
                    backpressured_ms_per_second: bp,
                }
            })
            .collect();
        let sample = Sample {
            time_ms: crate::master::now_ms(),
            source_records_per_second: rates
                .iter()
                .filter(|r| r.counters.is_source)
                .map(|r| r.records_in_per_second)
                .sum(),
            tasks: rates,
        };
        st.last = Some((now, tasks));
        if st.history.len() >= self.keep {
            st.history.pop_front();
        }
        st.history.push_back(sample.clone());
        sample
    }

    /// The latest sample, if any.
    pub fn latest(&self) -> Option<Sample> {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .history
            .back()
            .cloned()
    }

    /// The samples kept, oldest first.
    pub fn history(&self) -> Vec<Sample> {
        self.inner
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .history
            .iter()
            .cloned()
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_restarted_task_counts_on_in_the_same_counters() {
        let m = Metrics::default();
        let a = m.task(1, "keyed x", 1, 2, false);
        a.records_in(10);
        let b = m.task(1, "keyed x", 1, 2, false);
        b.records_in(5);
        assert!(Arc::ptr_eq(&a, &b));
        let other = m.task(1, "keyed x", 0, 2, false);
        other.records_in(1);
        // Another task of the same name (two `rebalance` exchanges) counts apart.
        let same_name = m.task(2, "keyed x", 1, 2, false);
        same_name.records_in(100);
        let counts: Vec<(u32, u32, u64)> = m
            .tasks()
            .iter()
            .map(|t| (t.vertex, t.subtask, t.records_in))
            .collect();
        assert_eq!(counts, vec![(1, 1, 15), (1, 0, 1), (2, 1, 100)]);
    }

    #[test]
    fn rates_are_the_counters_growth_over_the_time_between_samples() {
        let m = Arc::new(Metrics::default());
        let src = m.task(0, "source s", 0, 1, true);
        let keyed = m.task(1, "keyed k", 0, 1, false);
        let sampler = RateSampler::new(m.clone(), 3);
        // Taken before the first sample: the sampled interval lies inside.
        let before = Instant::now();
        let first = sampler.sample();
        assert!(first.tasks.iter().all(|t| t.records_in_per_second == 0.0));
        src.records_in(1000);
        keyed.records_in(500);
        keyed.backpressured_ns.fetch_add(5_000_000_000, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(50));
        let second = sampler.sample();
        let secs = before.elapsed().as_secs_f64();
        let s = &second.tasks[0];
        let k = &second.tasks[1];
        // The interval is at least the 50 ms slept and at most `secs`.
        assert!(s.records_in_per_second <= 1000.0 / 0.05 && s.records_in_per_second >= 1000.0 / secs);
        assert!((k.records_in_per_second * 2.0 - s.records_in_per_second).abs() < 1e-6);
        assert_eq!(second.source_records_per_second, s.records_in_per_second);
        // More waiting than time passed is capped at all of it.
        assert_eq!(k.backpressured_ms_per_second, 1000.0);
        for _ in 0..5 {
            sampler.sample();
        }
        assert_eq!(sampler.history().len(), 3);
    }
}

#[cfg(test)]
mod histogram_tests {
    use super::*;
    use prometheus_client::encoding::text::encode;
    use prometheus_client::registry::Registry;

    /// The cumulative buckets of histogram `name` in `text`: (le, count).
    fn buckets(text: &str, name: &str) -> Vec<(f64, u64)> {
        let prefix = format!("{name}_bucket{{le=\"");
        text.lines()
            .filter_map(|l| l.strip_prefix(prefix.as_str()))
            .map(|rest| {
                let (le, n) = rest.split_once("\"} ").unwrap();
                (le.parse().unwrap(), n.parse().unwrap())
            })
            .collect()
    }

    #[test]
    fn a_checkpoint_near_the_default_timeout_falls_in_a_finite_bucket() {
        let m = Metrics::default();
        let timeout = crate::CheckpointConfig::default().timeout;
        let long = timeout - Duration::from_secs(1);
        m.checkpoint_completed(Duration::from_millis(2), &[Duration::from_millis(1)]);
        m.checkpoint_completed(long, &[long]);
        let mut r = Registry::default();
        r.register("duration", "", m.checkpoint_duration.clone());
        r.register("alignment", "", m.checkpoint_alignment.clone());
        let mut text = String::new();
        encode(&mut text, &r).unwrap();
        for name in ["duration", "alignment"] {
            let b = buckets(&text, name);
            assert!(b.len() >= 20, "{name}: {b:?}");
            // The first bucket that holds both observations.
            let (le, _) = b.iter().find(|(_, n)| *n == 2).unwrap();
            assert!(le.is_finite() && *le >= long.as_secs_f64(), "{name}: {b:?}");
            // The short one is told apart from it.
            assert!(b.iter().any(|(le, n)| *n == 1 && *le < 0.01), "{name}: {b:?}");
        }
    }
}

#[cfg(test)]
mod wait_tests {
    use super::*;

    #[test]
    fn a_wait_in_progress_counts_before_it_ends() {
        let m = Metrics::default();
        let t = m.task(0, "source s", 0, 1, true);
        let since = t.wait_started();
        std::thread::sleep(Duration::from_millis(30));
        assert!(
            m.tasks()[0].backpressured_ms >= 30,
            "a long stall shows while it lasts"
        );
        t.wait_ended(since);
        let after = m.tasks()[0].backpressured_ms;
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(
            m.tasks()[0].backpressured_ms,
            after,
            "nothing counts after the wait"
        );
    }
}
