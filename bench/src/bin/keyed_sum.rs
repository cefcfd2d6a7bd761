//! The reference workload (keyed running sum): memory state and storage
//! with no checkpoints, a checkpoint every second and every 100 ms, and the
//! redb state backend with redb checkpoint storage every second, measured
//! in one run so the figures can be compared as ratios.
//!
//! ```text
//! cargo run --release -p sluice-bench --bin keyed_sum -- [--events N] [--keys K] [--parallelism P] [--runs R] [--incremental false]
//! ```

use clap::Parser;
use sluice_backend_memory::{MemoryCheckpointStorage, MemoryStateBackend};
use sluice_backend_redb::{RedbCheckpointStorage, RedbStateBackend};
use sluice_core::{CheckpointStorage, StateBackend};
use sluice_runtime::workload::{self, RunningSum};
use sluice_runtime::{CheckpointConfig, CheckpointStatus, DiscardSink, Job};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    /// Events per run.
    #[arg(long, default_value_t = 20_000_000)]
    events: u64,
    /// Distinct keys.
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    /// Parallelism of source and keyed operator.
    #[arg(long, default_value_t = 2)]
    parallelism: u32,
    /// Runs per configuration (the best is reported, and all are printed).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Incremental checkpoints (the default) or full ones.
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    incremental: bool,
}

struct Outcome {
    rate: f64,
    checkpoints: usize,
    p50_ms: f64,
}

#[derive(Clone, Copy, PartialEq)]
enum Backend {
    Memory,
    Redb,
}

async fn run(a: &Args, backend: Backend, interval: Option<Duration>) -> Outcome {
    let sink = DiscardSink::new();
    let dir = tempfile::tempdir().expect("tempdir");
    let (state, storage): (Arc<dyn StateBackend>, Arc<dyn CheckpointStorage>) = match backend {
        Backend::Memory => (
            Arc::new(MemoryStateBackend::new()),
            Arc::new(MemoryCheckpointStorage::new()),
        ),
        Backend::Redb => (
            Arc::new(RedbStateBackend::new(dir.path().join("state")).expect("redb state")),
            Arc::new(RedbCheckpointStorage::open(dir.path().join("chk.redb")).expect("redb storage")),
        ),
    };
    let job = Job::new("keyed-sum-bench")
        .with_parallelism(a.parallelism)
        .with_state_backend(state)
        .with_checkpoint_storage(storage)
        .with_checkpointing(CheckpointConfig {
            interval,
            retained: 1,
            incremental: a.incremental.then(sluice_runtime::IncrementalPolicy::default),
            ..Default::default()
        });
    workload::keyed_sum(
        &job,
        a.events,
        a.keys,
        a.parallelism,
        RunningSum::default(),
        sink.clone(),
    )
    .expect("job builds");
    let started = Instant::now();
    let handle = job.start().expect("job starts");
    let monitor = handle.monitor();
    handle.wait().await.expect("job completes");
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(sink.count(), a.events, "every event reached the sink");
    let mut durations: Vec<f64> = monitor
        .checkpoint_stats()
        .iter()
        .filter(|s| s.status == CheckpointStatus::Completed)
        .map(|s| s.duration.as_secs_f64() * 1e3)
        .collect();
    durations.sort_by(|x, y| x.total_cmp(y));
    Outcome {
        rate: a.events as f64 / secs,
        checkpoints: durations.len(),
        p50_ms: durations.get(durations.len() / 2).copied().unwrap_or(0.0),
    }
}

fn main() {
    sluice_runtime::limit_allocator_retention();
    let a = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    println!(
        "keyed running sum: {} events, {} keys, parallelism {}, best of {} runs, {} checkpoints",
        a.events,
        a.keys,
        a.parallelism,
        a.runs,
        if a.incremental { "incremental" } else { "full" }
    );
    println!(
        "| state + storage, checkpoints | events/s (best) | all runs (M/s) | checkpoints | checkpoint p50 | vs memory, none |"
    );
    println!("|---|---|---|---|---|---|");
    let configs: [(&str, Backend, Option<Duration>); 4] = [
        ("memory, none", Backend::Memory, None),
        ("memory, every 1 s", Backend::Memory, Some(Duration::from_secs(1))),
        (
            "memory, every 100 ms",
            Backend::Memory,
            Some(Duration::from_millis(100)),
        ),
        ("redb, every 1 s", Backend::Redb, Some(Duration::from_secs(1))),
    ];
    let mut baseline = None;
    // Interleave the configurations run by run so that machine noise hits all alike.
    let mut results: Vec<Vec<Outcome>> = configs.iter().map(|_| Vec::new()).collect();
    for _ in 0..a.runs {
        for (i, (_, backend, interval)) in configs.iter().enumerate() {
            results[i].push(rt.block_on(run(&a, *backend, *interval)));
        }
    }
    for ((name, _, _), outs) in configs.iter().zip(&results) {
        let best = outs
            .iter()
            .max_by(|x, y| x.rate.total_cmp(&y.rate))
            .expect("at least one run");
        let all: Vec<String> = outs.iter().map(|o| format!("{:.1}", o.rate / 1e6)).collect();
        let base = *baseline.get_or_insert(best.rate);
        println!(
            "| {name} | {:.2} M | {} | {} | {:.1} ms | {:.1} % |",
            best.rate / 1e6,
            all.join(", "),
            best.checkpoints,
            best.p50_ms,
            (best.rate / base - 1.0) * 100.0
        );
    }
}
