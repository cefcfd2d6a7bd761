//! Checkpoints under backpressure: the reference workload (parallelism 2)
//! into a sink slowed to a fixed rate, so every channel between the tasks is
//! full. Checkpoint duration and channel-state size for aligned, unaligned
//! and aligned-with-timeout checkpoints, measured in one run.
//!
//! ```text
//! cargo run --release -p sluice-bench --bin backpressure -- [--rate 200000] [--seconds 10] [--interval-ms 1000]
//! ```

use clap::Parser;
use sluice_backend_memory::{MemoryCheckpointStorage, MemoryStateBackend};
use sluice_runtime::workload::{key_of, RunningSum};
use sluice_runtime::{CheckpointConfig, CheckpointStatus, Job, Result, Sink, SinkWriter};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    /// Records per second the sink takes.
    #[arg(long, default_value_t = 200_000)]
    rate: u64,
    /// Seconds each configuration runs.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Checkpoint interval in milliseconds.
    #[arg(long, default_value_t = 1000)]
    interval_ms: u64,
    /// Alignment timeout of the aligned-with-timeout configuration, ms.
    #[arg(long, default_value_t = 100)]
    timeout_ms: u64,
}

/// A sink that takes `rate` records per second (the task's thread sleeps
/// when it is ahead of that rate).
#[derive(Clone)]
struct RateLimitedSink {
    rate: u64,
}

struct Writer {
    rate: u64,
    started: Option<Instant>,
    written: u64,
}

impl Sink<(u64, u64)> for RateLimitedSink {
    fn open(&self, _subtask: u32, parallelism: u32) -> Result<Box<dyn SinkWriter<(u64, u64)>>> {
        Ok(Box::new(Writer {
            rate: (self.rate / u64::from(parallelism)).max(1),
            started: None,
            written: 0,
        }))
    }
}

impl SinkWriter<(u64, u64)> for Writer {
    fn write(&mut self, _record: (u64, u64)) -> Result<()> {
        let started = *self.started.get_or_insert_with(Instant::now);
        self.written += 1;
        if self.written % 256 == 0 {
            let due = Duration::from_secs_f64(self.written as f64 / self.rate as f64);
            let elapsed = started.elapsed();
            if due > elapsed {
                tokio::task::block_in_place(|| std::thread::sleep(due - elapsed));
            }
        }
        Ok(())
    }
}

struct Outcome {
    completed: usize,
    failed: usize,
    p50: Duration,
    max: Duration,
    channel_p50: u64,
    channel_max: u64,
}

async fn run(a: &Args, unaligned: bool, timeout: Option<Duration>) -> Outcome {
    let job = Job::new("backpressure")
        .with_parallelism(2)
        .with_state_backend(Arc::new(MemoryStateBackend::new()))
        .with_checkpoint_storage(Arc::new(MemoryCheckpointStorage::new()))
        .with_checkpointing(CheckpointConfig {
            unaligned,
            aligned_checkpoint_timeout: timeout,
            timeout: Duration::from_secs(120),
            tolerable_failures: 1000,
            ..CheckpointConfig::every(Duration::from_millis(a.interval_ms))
        });
    job.source(
        "events",
        sluice_runtime::SequenceSource::new(u64::MAX / 4, 2, |i| (key_of(i, 100_000), i)),
        2,
    )
    .key_by(|(k, _)| *k)
    .process("running-sum", RunningSum::default())
    .sink(RateLimitedSink { rate: a.rate })
    .expect("job builds");
    let handle = job.start().expect("job starts");
    let monitor = handle.monitor();
    tokio::time::sleep(Duration::from_secs(a.seconds)).await;
    handle.cancel();
    let _ = handle.wait().await;
    let stats = monitor.checkpoint_stats();
    let done: Vec<_> = stats
        .iter()
        .filter(|s| s.status == CheckpointStatus::Completed)
        .collect();
    let mut d: Vec<Duration> = done.iter().map(|s| s.duration).collect();
    d.sort();
    let mut c: Vec<u64> = done.iter().map(|s| s.channel_state_size).collect();
    c.sort();
    Outcome {
        completed: done.len(),
        failed: stats
            .iter()
            .filter(|s| matches!(s.status, CheckpointStatus::Failed(_)))
            .count(),
        p50: d.get(d.len() / 2).copied().unwrap_or_default(),
        max: d.last().copied().unwrap_or_default(),
        channel_p50: c.get(c.len() / 2).copied().unwrap_or_default(),
        channel_max: c.last().copied().unwrap_or_default(),
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
        "backpressure: sink at {} records/s, checkpoint every {} ms, {} s per configuration, parallelism 2",
        a.rate, a.interval_ms, a.seconds
    );
    println!(
        "| checkpoints | completed | failed | duration p50 | duration max | channel state p50 | channel state max |"
    );
    println!("|---|---|---|---|---|---|---|");
    let timeout = Duration::from_millis(a.timeout_ms);
    let configs: [(String, bool, Option<Duration>); 3] = [
        ("aligned".into(), false, None),
        ("unaligned".into(), true, None),
        (
            format!("aligned, {} ms timeout", a.timeout_ms),
            true,
            Some(timeout),
        ),
    ];
    for (name, unaligned, timeout) in configs {
        let o = rt.block_on(run(&a, unaligned, timeout));
        println!(
            "| {name} | {} | {} | {:.0} ms | {:.0} ms | {:.1} KB | {:.1} KB |",
            o.completed,
            o.failed,
            o.p50.as_secs_f64() * 1e3,
            o.max.as_secs_f64() * 1e3,
            o.channel_p50 as f64 / 1e3,
            o.channel_max as f64 / 1e3
        );
    }
}
