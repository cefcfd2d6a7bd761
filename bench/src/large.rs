//! State larger than memory: the redb state backend with tens of millions of
//! keys, a bounded memory budget, incremental against full checkpoints.
//!
//! A load job (memory state, so that it takes seconds) runs every key once
//! through the running sum and ends with a full checkpoint in a directory
//! storage. Each measured run restores that checkpoint into the redb state
//! backend (the restore time is the load of the whole state), then updates
//! a hot set of 1 % of the keys, checkpointing every interval into the
//! directory storage (each interval changes about 1 % of the keys), fails
//! once near the end and recovers from its latest checkpoint.

use crate::e2e::{peak_rss_bytes, percentile, RecoveryClock, TimedSum};
use serde::{Deserialize, Serialize};
use sluice_backend_fs::FsCheckpointStorage;
use sluice_backend_memory::MemoryStateBackend;
use sluice_backend_redb::RedbStateBackend;
use sluice_core::{CheckpointStorage, CheckpointStorageExt};
use sluice_runtime::prelude::*;
use sluice_runtime::workload::RunningSum;
use sluice_runtime::{CheckpointStatus, IncrementalPolicy, SavepointLocation};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The uid of the keyed operator (the load's checkpoint restores into it).
const OPERATOR: &str = "running-sum";

/// The workload of both jobs: events `0..keys` load each key once, later
/// events update the hot set (every 100th key: 1 % of them). One split, so
/// that the measured job's source continues where the load stopped.
fn source(keys: u64, events: u64) -> SequenceSource<(u64, u64)> {
    let hot = (keys / 100).max(1);
    SequenceSource::new(events, 1, move |i| {
        let k = if i < keys { i } else { (i % hot) * 100 };
        (k.wrapping_mul(0x9E37_79B9_7F4A_7C15), i)
    })
}

/// Loads `keys` keys into a full checkpoint under `dir`; returns its
/// location and the seconds the load took.
pub async fn load(keys: u64, dir: &Path) -> Result<(SavepointLocation, f64)> {
    let storage: Arc<dyn CheckpointStorage> = Arc::new(FsCheckpointStorage::open(dir)?);
    let job = Job::new("large-state-load")
        .with_parallelism(2)
        .with_state_backend(Arc::new(MemoryStateBackend::new()))
        .with_checkpoint_storage(storage.clone())
        .with_checkpointing(CheckpointConfig {
            retained: 1,
            incremental: None,
            ..CheckpointConfig::every(Duration::from_secs(3600))
        });
    job.source("events", source(keys, keys), 1)
        .key_by(|(k, _)| *k)
        .process(OPERATOR, RunningSum::default())
        .set_parallelism(2)
        .sink(DiscardSink::new())?;
    let started = Instant::now();
    let result = job.execute().await?;
    let id = result
        .final_checkpoint
        .ok_or_else(|| RuntimeError::InvalidJob("the load job took no final checkpoint".into()))?;
    Ok((
        SavepointLocation::new(storage, id.dir())?,
        started.elapsed().as_secs_f64(),
    ))
}

/// A measured run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Config {
    /// Keys of the state.
    pub keys: u64,
    /// Hot-set events after the restore.
    pub hot_events: u64,
    /// Checkpoint interval, ms.
    pub interval_ms: u64,
    /// Incremental checkpoints (else full).
    pub incremental: bool,
    /// Where the load's checkpoint is (a directory storage root) and its
    /// directory in it.
    pub load_root: PathBuf,
    /// The load checkpoint's directory (`chk-<id>`).
    pub load_dir: String,
    /// Working directory of the run (redb state, checkpoints).
    pub work: PathBuf,
    /// Checkpoint storage of the run: `fs` (a directory under `work`) or
    /// `memory` (to tell the storage's cost from the rest; peak RSS then
    /// includes the checkpoints).
    #[serde(default = "fs")]
    pub storage: String,
}

fn fs() -> String {
    "fs".into()
}

/// What a run measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Measured {
    /// From the start to the first record processed: restoring the whole
    /// state from the load's checkpoint into redb, ms.
    pub restore_ms: f64,
    /// Hot-set events per second (first record to the end, the recovery included).
    pub events_per_s: f64,
    /// Completed checkpoints.
    pub checkpoints: usize,
    /// Checkpoint duration (trigger to commit), p50 and max, ms.
    pub checkpoint_p50_ms: f64,
    /// Longest checkpoint, ms.
    pub checkpoint_max_ms: f64,
    /// The synchronous and the asynchronous part of a snapshot (the longest
    /// of the subtasks), p50, ms: the rest of the duration is the barrier's
    /// way to the tasks and the commit.
    pub sync_p50_ms: f64,
    /// See `sync_p50_ms`.
    pub async_p50_ms: f64,
    /// Bytes a checkpoint wrote itself, p50.
    pub written_p50: u64,
    /// Full size of the last checkpoint (with the files it references).
    pub state_size: u64,
    /// From the injected failure to the first record processed after the
    /// restore of the latest checkpoint, ms.
    pub recovery_ms: Option<f64>,
    /// The checkpoint the recovery restored, and the files it read (base and
    /// changes) for the keyed operator.
    pub recovered_files: usize,
    /// Peak resident memory of the process, bytes.
    pub peak_rss_bytes: u64,
    /// Bytes of the redb state files at the end.
    pub redb_bytes: u64,
}

fn dir_bytes(dir: &Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.metadata() {
            Ok(m) if m.is_dir() => dir_bytes(&e.path()),
            Ok(m) => m.len(),
            Err(_) => 0,
        })
        .sum()
}

/// Runs `c` in this process.
pub async fn run(c: &Config) -> Result<Measured> {
    let load = Arc::new(FsCheckpointStorage::open(&c.load_root)?);
    let storage: Arc<dyn CheckpointStorage> = match c.storage.as_str() {
        "memory" => Arc::new(sluice_backend_memory::MemoryCheckpointStorage::new()),
        _ => Arc::new(FsCheckpointStorage::open(c.work.join("checkpoints"))?),
    };
    let state_dir = c.work.join("state");
    let clock = Arc::new(RecoveryClock {
        fail_after: c.hot_events * 4 / 5 / 2,
        ..Default::default()
    });
    let redb_bytes = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let job = Job::new("large-state")
        .with_parallelism(2)
        .with_state_backend(Arc::new(RedbStateBackend::new(&state_dir)?))
        .with_checkpoint_storage(storage.clone())
        .with_restart_strategy(RestartStrategy::FixedDelay {
            attempts: 1,
            delay: Duration::ZERO,
        })
        .with_checkpointing(CheckpointConfig {
            retained: 1,
            incremental: c.incremental.then(IncrementalPolicy::default),
            ..CheckpointConfig::every(Duration::from_millis(c.interval_ms))
        })
        .from_savepoint(SavepointLocation::new(load.clone(), c.load_dir.clone())?);
    job.source("events", source(c.keys, c.keys + c.hot_events), 1)
        .key_by(|(k, _)| *k)
        .process(OPERATOR, TimedSum::new(Some(clock.clone())))
        .set_parallelism(2)
        .sink(DiscardSink::new())?;
    let started = Instant::now();
    let handle = job.start()?;
    let monitor = handle.monitor();
    // The state files' size, sampled while the job runs (they are removed
    // when it ends).
    let sampler = {
        let (dir, bytes) = (state_dir.clone(), redb_bytes.clone());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(1)).await;
                let now = dir_bytes(&dir);
                bytes.fetch_max(now, std::sync::atomic::Ordering::Relaxed);
            }
        })
    };
    let result = handle.wait().await;
    sampler.abort();
    let result = result?;
    let ended = Instant::now();
    let first = (*clock.first_at.lock().unwrap_or_else(|p| p.into_inner())).unwrap_or(ended);
    let failed = *clock.failed_at.lock().unwrap_or_else(|p| p.into_inner());
    let resumed = *clock.resumed_at.lock().unwrap_or_else(|p| p.into_inner());
    let done: Vec<_> = monitor
        .checkpoint_stats()
        .into_iter()
        .filter(|s| s.status == CheckpointStatus::Completed)
        .collect();
    let mut durations: Vec<f64> = done.iter().map(|s| s.duration.as_secs_f64() * 1e3).collect();
    durations.sort_by(f64::total_cmp);
    let p50 = |f: &dyn Fn(&sluice_runtime::CheckpointStats) -> f64| {
        let mut v: Vec<f64> = done.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        percentile(&v, 0.5)
    };
    let sync_p50_ms = p50(&|s| s.sync_max.as_secs_f64() * 1e3);
    let async_p50_ms = p50(&|s| s.async_max.as_secs_f64() * 1e3);
    let mut written: Vec<f64> = done.iter().map(|s| s.written_size as f64).collect();
    written.sort_by(f64::total_cmp);
    // The checkpoint the recovery restored: one of the run's, or the load's
    // when the failure came before the first checkpoint.
    let recovered_files = match result.recoveries.first().and_then(|r| r.restored_from) {
        Some(id) => {
            let bytes = match storage.read_metadata(id).await {
                Ok(b) => b,
                Err(_) => load.read_file(&format!("{}/_metadata", c.load_dir)).await?,
            };
            let meta = sluice_core::CheckpointMetadata::from_json(&id.dir(), &bytes)?;
            meta.operators
                .iter()
                .filter(|o| o.uid.as_str() == OPERATOR)
                .flat_map(|o| &o.subtasks)
                .map(|s| usize::from(s.keyed_state.is_some()) + s.keyed_changes.len())
                .sum()
        }
        None => 0,
    };
    Ok(Measured {
        restore_ms: first.saturating_duration_since(started).as_secs_f64() * 1e3,
        events_per_s: c.hot_events as f64 / ended.saturating_duration_since(first).as_secs_f64().max(1e-9),
        checkpoints: done.len(),
        checkpoint_p50_ms: percentile(&durations, 0.5),
        checkpoint_max_ms: durations.last().copied().unwrap_or(0.0),
        sync_p50_ms,
        async_p50_ms,
        written_p50: percentile(&written, 0.5) as u64,
        state_size: done.last().map(|s| s.state_size).unwrap_or(0),
        recovery_ms: failed
            .zip(resumed)
            .map(|(f, r)| r.saturating_duration_since(f).as_secs_f64() * 1e3),
        recovered_files,
        peak_rss_bytes: peak_rss_bytes(),
        redb_bytes: redb_bytes.load(std::sync::atomic::Ordering::Relaxed),
    })
}
