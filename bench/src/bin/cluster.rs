//! The reference workload in one process against the same job spread over
//! 2 and 3 worker processes (child processes of this binary) on this
//! machine: throughput ratio, bytes on the wire per event, checkpoint and
//! alignment times. Memory state, checkpoints every second into a shared
//! directory, exactly-once. Rounds interleave the configurations.
//!
//! ```text
//! cargo run --release -p sluice-bench --bin cluster -- [--events 20000000] [--keys 100000] [--parallelism 3] [--rounds 3]
//! ```

use clap::Parser;
use sluice_backend_fs::FsCheckpointStorage;
use sluice_backend_memory::MemoryStateBackend;
use sluice_bench::e2e::median;
use sluice_core::CheckpointStorage;
use sluice_runtime::cluster::{WorkerOptions, WorkerPool};
use sluice_runtime::workload::{key_of, RunningSum};
use sluice_runtime::{CheckpointConfig, CheckpointStatus, DiscardSink, Job, RestartStrategy, SequenceSource};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser, Clone)]
struct Args {
    /// Events per run.
    #[arg(long, default_value_t = 20_000_000)]
    events: u64,
    /// Distinct keys.
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    /// Parallelism of the source and the keyed operator.
    #[arg(long, default_value_t = 3)]
    parallelism: u32,
    /// Checkpoint interval in ms.
    #[arg(long, default_value_t = 1000)]
    interval_ms: u64,
    /// Rounds (each runs every configuration).
    #[arg(long, default_value_t = 3)]
    rounds: u32,
    /// Internal: run as a worker of the coordinator at this address, with
    /// checkpoints in --dir.
    #[arg(long, hide = true)]
    worker: Option<SocketAddr>,
    /// Internal: the shared checkpoint directory of a worker.
    #[arg(long, hide = true)]
    dir: Option<PathBuf>,
}

fn job(a: &Args, dir: &Path) -> Job {
    let storage: Arc<dyn CheckpointStorage> =
        Arc::new(FsCheckpointStorage::open(dir).expect("checkpoint directory"));
    let keys = a.keys;
    let job = Job::new("cluster-bench")
        .with_parallelism(a.parallelism)
        .with_state_backend(Arc::new(MemoryStateBackend::new()))
        .with_checkpoint_storage(storage)
        .with_restart_strategy(RestartStrategy::None)
        .with_checkpointing(CheckpointConfig {
            interval: Some(Duration::from_millis(a.interval_ms)),
            retained: 1,
            ..Default::default()
        });
    job.source(
        "events",
        SequenceSource::new(a.events, a.parallelism, move |i| (key_of(i, keys), i)),
        a.parallelism,
    )
    .key_by(|(k, _)| *k)
    .process("running-sum", RunningSum::default())
    .sink(DiscardSink::new())
    .expect("job");
    job
}

struct Measured {
    events_per_s: f64,
    checkpoint_p50_ms: f64,
    alignment_p50_ms: f64,
    wire_bytes_per_event: Option<f64>,
}

/// One run: in this process (`workers` 0) or on that many worker processes.
async fn run(a: &Args, workers: u32) -> Measured {
    let dir = tempfile::tempdir().expect("temporary directory");
    let mut job = job(a, dir.path());
    let mut children = Vec::new();
    let mut pool = None;
    if workers > 0 {
        let p = WorkerPool::bind(SocketAddr::from(([127, 0, 0, 1], 0)), workers as usize)
            .await
            .expect("worker pool");
        let exe = std::env::current_exe().expect("own path");
        for _ in 0..workers {
            children.push(
                Command::new(&exe)
                    .args(["--events", &a.events.to_string(), "--keys", &a.keys.to_string()])
                    .args(["--parallelism", &a.parallelism.to_string()])
                    .args(["--interval-ms", &a.interval_ms.to_string()])
                    .args(["--worker", &p.local_addr().to_string()])
                    .arg("--dir")
                    .arg(dir.path())
                    .stdout(Stdio::null())
                    .spawn()
                    .expect("start a worker"),
            );
        }
        // Wait for the workers before the clock starts.
        while p.registered() < workers as usize {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        job = job.with_workers(p.clone());
        pool = Some(p);
    }
    let started = Instant::now();
    let handle = job.start().expect("start");
    let monitor = handle.monitor();
    handle.wait().await.expect("the job succeeds");
    let seconds = started.elapsed().as_secs_f64();
    for mut c in children {
        let _ = c.wait();
    }
    let done: Vec<_> = monitor
        .checkpoint_stats()
        .into_iter()
        .filter(|s| s.status == CheckpointStatus::Completed)
        .collect();
    Measured {
        events_per_s: a.events as f64 / seconds,
        checkpoint_p50_ms: median(done.iter().map(|s| s.duration.as_secs_f64() * 1e3).collect()),
        alignment_p50_ms: median(
            done.iter()
                .map(|s| s.alignment_max().as_secs_f64() * 1e3)
                .collect(),
        ),
        wire_bytes_per_event: pool.map(|p| p.wire_bytes_sent() as f64 / a.events as f64),
    }
}

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    let a = Args::parse();
    if let (Some(addr), Some(dir)) = (a.worker, a.dir.clone()) {
        let w = job(&a, &dir)
            .start_worker(addr, WorkerOptions::default())
            .expect("worker");
        if let Err(e) = w.wait().await {
            eprintln!("worker: {e}");
            std::process::exit(1);
        }
        return;
    }
    let configs = [0u32, 2, 3];
    let mut runs: Vec<Vec<Measured>> = configs.iter().map(|_| Vec::new()).collect();
    for round in 1..=a.rounds {
        for (i, &workers) in configs.iter().enumerate() {
            let m = run(&a, workers).await;
            eprintln!(
                "round {round}, {}: {:.2} M ev/s, checkpoint p50 {:.1} ms, alignment p50 {:.1} ms{}",
                label(workers),
                m.events_per_s / 1e6,
                m.checkpoint_p50_ms,
                m.alignment_p50_ms,
                m.wire_bytes_per_event
                    .map(|b| format!(", {b:.2} bytes/event on the wire"))
                    .unwrap_or_default()
            );
            runs[i].push(m);
        }
    }
    println!(
        "reference workload, memory state, checkpoints every {} ms into a shared directory, exactly-once, \
         p={}, {} events, {} keys, medians of {} interleaved rounds",
        a.interval_ms, a.parallelism, a.events, a.keys, a.rounds
    );
    println!();
    println!("| processes | throughput | vs one process | checkpoint p50 | alignment p50 | bytes on the wire per event |");
    println!("| --- | --- | --- | --- | --- | --- |");
    let one = median(runs[0].iter().map(|m| m.events_per_s).collect());
    for (i, &workers) in configs.iter().enumerate() {
        let r = &runs[i];
        let rate = median(r.iter().map(|m| m.events_per_s).collect());
        let wire = median(r.iter().filter_map(|m| m.wire_bytes_per_event).collect());
        println!(
            "| {} | {:.2} M ev/s | {:.2} | {:.1} ms | {:.1} ms | {} |",
            label(workers),
            rate / 1e6,
            rate / one,
            median(r.iter().map(|m| m.checkpoint_p50_ms).collect()),
            median(r.iter().map(|m| m.alignment_p50_ms).collect()),
            if workers == 0 {
                "-".to_string()
            } else {
                format!("{wire:.2}")
            }
        );
    }
}

fn label(workers: u32) -> String {
    match workers {
        0 => "one process".into(),
        n => format!("coordinator + {n} workers"),
    }
}
