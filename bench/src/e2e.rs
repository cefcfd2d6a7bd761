//! One end-to-end run of the reference workload (keyed running sum) in a
//! configuration, and what it measured. The `e2e` binary runs each
//! configuration in its own child process (so that peak memory is the
//! configuration's own) and collects the results.

use serde::{Deserialize, Serialize};
use sluice_backend_memory::{MemoryCheckpointStorage, MemoryStateBackend};
use sluice_backend_redb::{RedbCheckpointStorage, RedbStateBackend};
use sluice_core::CheckpointStorageExt;
use sluice_core::{CheckpointStorage, StateBackend};
use sluice_runtime::prelude::*;
use sluice_runtime::workload::key_of;
use sluice_runtime::{CheckpointStats, CheckpointStatus, CheckpointingMode};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A configuration of the end-to-end benchmark.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Config {
    /// `memory` or `redb`.
    pub state: String,
    /// `memory`, `redb`, `fs` (a local directory, fsynced) or `s3`.
    pub storage: String,
    /// Checkpoint interval in ms; `None`: no periodic checkpoints.
    pub interval_ms: Option<u64>,
    /// `exactly-once` or `at-least-once`.
    pub mode: String,
    /// Parallelism of the source and the keyed operator.
    pub parallelism: u32,
    /// Events N.
    pub events: u64,
    /// Keys K.
    pub keys: u64,
    /// Inject one task failure half-way and measure the recovery.
    pub fail: bool,
    /// Every channel between tasks over TCP on 127.0.0.1
    /// (`sluice_runtime::net::LoopbackNetwork`).
    #[serde(default)]
    pub network: bool,
}

impl Config {
    /// `memory/redb, 100 ms, exactly-once, p2`.
    pub fn label(&self) -> String {
        format!(
            "{}/{}, {}, {}, p{}",
            self.state,
            self.storage,
            self.interval_label(),
            self.mode,
            self.parallelism
        )
    }

    /// `none`, `1 s`, `100 ms`.
    pub fn interval_label(&self) -> String {
        match self.interval_ms {
            None => "none".into(),
            Some(ms) if ms % 1000 == 0 => format!("{} s", ms / 1000),
            Some(ms) => format!("{ms} ms"),
        }
    }
}

/// What a run measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Measured {
    /// Events per second, start to end (including the final checkpoint).
    pub events_per_s: f64,
    /// Wall time of the job.
    pub seconds: f64,
    /// Completed checkpoints.
    pub checkpoints: usize,
    /// Checkpoint duration (trigger to commit), ms.
    pub checkpoint_p50_ms: f64,
    /// Checkpoint duration p99, ms.
    pub checkpoint_p99_ms: f64,
    /// Longest alignment of a task per checkpoint, p50, ms.
    pub alignment_p50_ms: f64,
    /// Alignment p99, ms.
    pub alignment_p99_ms: f64,
    /// State size of the last completed checkpoint, bytes.
    pub checkpoint_bytes: u64,
    /// With `fail`: from the injected failure to the first record processed
    /// after the restore, ms.
    pub recovery_ms: Option<f64>,
    /// With `fail`: the checkpoint restored (None: from scratch).
    pub restored_from: Option<u64>,
    /// Peak resident memory of the process (VmHWM), bytes.
    pub peak_rss_bytes: u64,
    /// Where a checkpoint's time goes, p50 over the completed checkpoints of
    /// the slowest subtask's trigger-to-first-barrier delay, ms.
    #[serde(default)]
    pub start_delay_p50_ms: f64,
    /// p50 of the longest synchronous snapshot part, ms.
    #[serde(default)]
    pub sync_p50_ms: f64,
    /// p50 of the longest asynchronous snapshot part, ms.
    #[serde(default)]
    pub async_p50_ms: f64,
    /// With [`Config::network`]: bytes written to the channels' connections
    /// per source event (frames, credits and handshakes included).
    #[serde(default)]
    pub wire_bytes_per_event: Option<f64>,
}

/// One configuration and its result.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunResult {
    /// The configuration.
    pub config: Config,
    /// What it measured, or why it failed.
    pub outcome: Result<Measured, String>,
}

/// Shared between the subtasks of every attempt: where to fail, when it
/// failed, when the first record after the restore was processed.
#[derive(Debug, Default)]
pub(crate) struct RecoveryClock {
    pub(crate) fail_after: u64,
    pub(crate) processed: AtomicU64,
    pub(crate) failed_at: Mutex<Option<Instant>>,
    pub(crate) resumed_at: Mutex<Option<Instant>>,
    /// When the first record of the first attempt was processed.
    pub(crate) first_at: Mutex<Option<Instant>>,
}

/// The running sum, timing the recovery of one injected failure.
#[derive(Clone)]
pub(crate) struct TimedSum {
    sum: Option<ValueState<u64>>,
    clock: Option<Arc<RecoveryClock>>,
    subtask: u32,
    restored: bool,
    started: bool,
}

impl TimedSum {
    /// The running sum, timed by `clock`.
    pub(crate) fn new(clock: Option<Arc<RecoveryClock>>) -> Self {
        TimedSum {
            sum: None,
            clock,
            subtask: 0,
            restored: false,
            started: false,
        }
    }
}

impl KeyedProcessFunction<u64, (u64, u64), (u64, u64)> for TimedSum {
    fn open(&mut self, ctx: &mut OpenContext<'_>) -> Result<()> {
        self.sum = Some(ctx.value_state("sum")?);
        self.subtask = ctx.subtask();
        self.restored = self
            .clock
            .as_ref()
            .is_some_and(|c| c.failed_at.lock().map(|f| f.is_some()).unwrap_or(false));
        Ok(())
    }

    #[inline]
    fn process(
        &mut self,
        key: &u64,
        (_, v): (u64, u64),
        ctx: &mut KeyedContext<'_>,
        out: &mut Collector<'_, (u64, u64)>,
    ) -> Result<()> {
        if let Some(c) = &self.clock {
            if !self.started {
                self.started = true;
                let mut f = c.first_at.lock().unwrap_or_else(|p| p.into_inner());
                f.get_or_insert_with(Instant::now);
            }
            if self.restored {
                let mut r = c.resumed_at.lock().unwrap_or_else(|p| p.into_inner());
                if r.is_none() {
                    *r = Some(Instant::now());
                }
                self.restored = false;
            } else if self.subtask == 0 && c.processed.fetch_add(1, Ordering::Relaxed) + 1 == c.fail_after {
                let mut f = c.failed_at.lock().unwrap_or_else(|p| p.into_inner());
                if f.is_none() {
                    *f = Some(Instant::now());
                    return Err(RuntimeError::Injected("benchmark failure".into()));
                }
            }
        }
        let state = self
            .sum
            .as_ref()
            .ok_or_else(|| RuntimeError::InvalidJob("sum used before open".into()))?;
        let sum = state.update(ctx, |sum| {
            let next = sum.unwrap_or(0).wrapping_add(v);
            *sum = Some(next);
            next
        })?;
        out.collect((*key, sum))
    }
}

pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// The median of `values` (nearest rank; 0 for none).
pub fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    percentile(&values, 0.5)
}

/// The process's peak resident memory (Linux `VmHWM`), bytes; 0 if unknown.
pub fn peak_rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map(|kb| kb * 1024)
        .unwrap_or(0)
}

async fn storage_for(c: &Config, dir: &std::path::Path) -> Result<Arc<dyn CheckpointStorage>> {
    Ok(match c.storage.as_str() {
        "memory" => Arc::new(MemoryCheckpointStorage::new()),
        "redb" => Arc::new(RedbCheckpointStorage::open(dir.join("checkpoints.redb"))?),
        "fs" => Arc::new(sluice_backend_fs::FsCheckpointStorage::open(
            dir.join("checkpoints"),
        )?),
        "s3" => {
            let bucket = std::env::var("SLUICE_S3_BUCKET").map_err(|_| {
                RuntimeError::InvalidJob(
                    "the s3 rows need SLUICE_S3_BUCKET (scripts/s3-server.sh env)".into(),
                )
            })?;
            let prefix = format!("bench/e2e-{}-{:08x}", std::process::id(), rand::random::<u32>());
            Arc::new(
                sluice_backend_s3::S3CheckpointStorage::open(sluice_backend_s3::S3Config::new(
                    bucket, prefix,
                ))
                .await?,
            )
        }
        other => return Err(RuntimeError::InvalidJob(format!("unknown storage {other:?}"))),
    })
}

/// Runs `c` in this process.
pub async fn run(c: &Config) -> Result<Measured> {
    let dir = tempfile::tempdir().map_err(|e| sluice_core::Error::storage("temporary directory", e))?;
    let state: Arc<dyn StateBackend> = match c.state.as_str() {
        "memory" => Arc::new(MemoryStateBackend::new()),
        "redb" => Arc::new(RedbStateBackend::new(dir.path().join("state"))?),
        other => {
            return Err(RuntimeError::InvalidJob(format!(
                "unknown state backend {other:?}"
            )))
        }
    };
    let storage = storage_for(c, dir.path()).await?;
    let mode = match c.mode.as_str() {
        "at-least-once" => CheckpointingMode::AtLeastOnce,
        _ => CheckpointingMode::ExactlyOnce,
    };
    let clock = c.fail.then(|| {
        Arc::new(RecoveryClock {
            fail_after: (c.events / 2 / u64::from(c.parallelism)).max(1),
            ..Default::default()
        })
    });
    let network = match c.network {
        true => Some(sluice_runtime::net::LoopbackNetwork::bind().await?),
        false => None,
    };
    let mut job = Job::new("e2e");
    if let Some(n) = &network {
        job = job.with_loopback_network(n.clone());
    }
    let job = job
        .with_parallelism(c.parallelism)
        .with_state_backend(state)
        .with_checkpoint_storage(storage.clone())
        .with_restart_strategy(RestartStrategy::FixedDelay {
            attempts: 2,
            delay: Duration::ZERO,
        })
        .with_checkpointing(CheckpointConfig {
            interval: c.interval_ms.map(Duration::from_millis),
            mode,
            retained: 1,
            ..Default::default()
        });
    let keys = c.keys;
    job.source(
        "events",
        SequenceSource::new(c.events, c.parallelism, move |i| (key_of(i, keys), i)),
        c.parallelism,
    )
    .key_by(|(k, _)| *k)
    .process("running-sum", TimedSum::new(clock.clone()))
    .sink(DiscardSink::new())?;
    let started = Instant::now();
    let handle = job.start()?;
    let monitor = handle.monitor();
    let result = handle.wait().await?;
    let seconds = started.elapsed().as_secs_f64();
    let stats = monitor.checkpoint_stats();
    let done: Vec<_> = stats
        .iter()
        .filter(|s| s.status == CheckpointStatus::Completed)
        .collect();
    let mut durations: Vec<f64> = done.iter().map(|s| s.duration.as_secs_f64() * 1e3).collect();
    durations.sort_by(f64::total_cmp);
    let mut alignments: Vec<f64> = done
        .iter()
        .map(|s| s.alignment_max().as_secs_f64() * 1e3)
        .collect();
    alignments.sort_by(f64::total_cmp);
    let p50_of = |f: &dyn Fn(&&CheckpointStats) -> Duration| {
        let mut v: Vec<f64> = done.iter().map(|s| f(s).as_secs_f64() * 1e3).collect();
        v.sort_by(f64::total_cmp);
        percentile(&v, 0.5)
    };
    let start_delay_p50_ms = p50_of(&|s| s.subtasks.iter().map(|t| t.start_delay).max().unwrap_or_default());
    if std::env::var_os("SLUICE_E2E_CHECKPOINTS").is_some() {
        for s in &done {
            eprintln!(
                "checkpoint {}: {:?} written {} of {} bytes, sync {:?}, async {:?}",
                s.id.0, s.duration, s.written_size, s.state_size, s.sync_max, s.async_max
            );
        }
    }
    let sync_p50_ms = p50_of(&|s| s.sync_max);
    let async_p50_ms = p50_of(&|s| s.async_max);
    let recovery_ms = clock.as_ref().and_then(|c| {
        let failed = (*c.failed_at.lock().ok()?)?;
        let resumed = (*c.resumed_at.lock().ok()?)?;
        Some(resumed.saturating_duration_since(failed).as_secs_f64() * 1e3)
    });
    if let Some(last) = result.last_checkpoint {
        let _ = storage.discard(last).await;
    }
    Ok(Measured {
        events_per_s: c.events as f64 / seconds,
        seconds,
        checkpoints: done.len(),
        checkpoint_p50_ms: percentile(&durations, 0.5),
        checkpoint_p99_ms: percentile(&durations, 0.99),
        alignment_p50_ms: percentile(&alignments, 0.5),
        alignment_p99_ms: percentile(&alignments, 0.99),
        checkpoint_bytes: done.last().map(|s| s.state_size).unwrap_or(0),
        recovery_ms,
        restored_from: result
            .recoveries
            .first()
            .and_then(|r| r.restored_from)
            .map(|id| id.0),
        peak_rss_bytes: peak_rss_bytes(),
        start_delay_p50_ms,
        sync_p50_ms,
        async_p50_ms,
        wire_bytes_per_event: network.map(|n| n.counts().bytes_sent as f64 / c.events as f64),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_pick_the_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 51.0);
        assert_eq!(percentile(&v, 0.99), 99.0);
        assert_eq!(percentile(&[], 0.5), 0.0);
        assert_eq!(percentile(&[7.0], 0.99), 7.0);
    }

    #[test]
    fn peak_memory_is_read_on_linux() {
        assert!(peak_rss_bytes() > 1 << 20, "VmHWM of a running test process");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_small_run_measures_throughput_checkpoints_and_recovery() {
        let c = Config {
            state: "memory".into(),
            storage: "memory".into(),
            interval_ms: Some(20),
            mode: "exactly-once".into(),
            parallelism: 2,
            events: 400_000,
            keys: 1000,
            fail: true,
            network: false,
        };
        let m = run(&c).await.expect("run");
        assert!(m.events_per_s > 0.0 && m.checkpoints >= 1, "{m:?}");
        assert!(
            m.recovery_ms.is_some(),
            "the failure fired and the job resumed: {m:?}"
        );
        assert!(m.checkpoint_bytes > 0);
    }
}
