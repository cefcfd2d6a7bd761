//! Incremental against full checkpoints.
//!
//! 1. Per state store (`sluice_bench::incremental`): one checkpoint of a
//!    state of N keys of which a fraction changed since the previous one —
//!    synchronous snapshot, encoding, write — full and incremental, on both
//!    state backends, into every checkpoint storage (S3 when
//!    `AWS_ENDPOINT_URL` and `SLUICE_S3_BUCKET` are set).
//! 2. End to end: a job loads N keys, then updates a hot set of 1 % of
//!    them, checkpointing every 500 ms, full and incremental, on memory
//!    state + memory storage and redb state + redb storage: throughput,
//!    checkpoint duration and bytes written after the load.
//!
//! ```text
//! cargo run --release -p sluice-bench --bin incremental_vs_full -- [--keys 100000,1000000] [--runs 3] [--out bench/results]
//! ```

use clap::Parser;
use sluice_backend_memory::{MemoryCheckpointStorage, MemoryStateBackend};
use sluice_backend_redb::{RedbCheckpointStorage, RedbStateBackend};
use sluice_backend_s3::{S3CheckpointStorage, S3Config};
use sluice_bench::incremental::{chart, measure, table, Point};
use sluice_core::{CheckpointStorage, StateBackend};
use sluice_runtime::workload::RunningSum;
use sluice_runtime::{
    CheckpointConfig, CheckpointStatus, DiscardSink, IncrementalPolicy, Job, SequenceSource,
};
use std::fmt::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser)]
struct Args {
    /// State sizes (keys), comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "100000,1000000")]
    keys: Vec<u64>,
    /// Changed fractions, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "0.001,0.01,0.1,0.5,1")]
    fractions: Vec<f64>,
    /// Runs per store-level configuration (the best counts).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Keys of the end-to-end job (0: skip it).
    #[arg(long, default_value_t = 1_000_000)]
    job_keys: u64,
    /// Hot-set events of the end-to-end job after the load.
    #[arg(long, default_value_t = 30_000_000)]
    job_events: u64,
    /// Where the report and charts go.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
}

/// One end-to-end run.
struct JobRun {
    name: String,
    incremental: bool,
    rate: f64,
    checkpoints: usize,
    p50_ms: f64,
    written_p50: u64,
    full_size: u64,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

async fn job_run(name: &str, redb: bool, incremental: bool, keys: u64, hot_events: u64) -> JobRun {
    let dir = tempfile::tempdir().expect("tempdir");
    let (state, storage): (Arc<dyn StateBackend>, Arc<dyn CheckpointStorage>) = if redb {
        (
            Arc::new(RedbStateBackend::new(dir.path().join("state")).expect("redb state")),
            Arc::new(RedbCheckpointStorage::open(dir.path().join("chk.redb")).expect("redb storage")),
        )
    } else {
        (
            Arc::new(MemoryStateBackend::new()),
            Arc::new(MemoryCheckpointStorage::new()),
        )
    };
    let job = Job::new("incremental-bench")
        .with_parallelism(2)
        .with_state_backend(state)
        .with_checkpoint_storage(storage)
        .with_checkpointing(CheckpointConfig {
            retained: 1,
            incremental: incremental.then(IncrementalPolicy::default),
            ..CheckpointConfig::every(Duration::from_millis(500))
        });
    // One split: the load comes first, then the hot set (1 % of the keys,
    // spread over the key space).
    let hot = (keys / 100).max(1);
    let events = keys + hot_events;
    job.source(
        "events",
        SequenceSource::new(events, 1, move |i| {
            let k = if i < keys { i } else { (i % hot) * 100 };
            (k.wrapping_mul(0x9E37_79B9_7F4A_7C15), i)
        }),
        1,
    )
    .key_by(|(k, _)| *k)
    .process("running-sum", RunningSum::default())
    .set_parallelism(2)
    .sink(DiscardSink::new())
    .expect("job builds");
    let started = Instant::now();
    let handle = job.start().expect("job starts");
    let monitor = handle.monitor();
    handle.wait().await.expect("job completes");
    let secs = started.elapsed().as_secs_f64();
    let completed: Vec<_> = monitor
        .checkpoint_stats()
        .into_iter()
        .filter(|s| s.status == CheckpointStatus::Completed)
        .collect();
    // After the load: the second half of the checkpoints.
    let after = &completed[completed.len() / 2..];
    JobRun {
        name: name.into(),
        incremental,
        rate: events as f64 / secs,
        checkpoints: completed.len(),
        p50_ms: median(after.iter().map(|s| s.duration.as_secs_f64() * 1e3).collect()),
        written_p50: median(after.iter().map(|s| s.written_size as f64).collect()) as u64,
        full_size: after.last().map(|s| s.state_size).unwrap_or(0),
    }
}

fn main() {
    sluice_runtime::limit_allocator_retention();
    let a = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let mut storages: Vec<(&str, Arc<dyn CheckpointStorage>)> = vec![
        ("memory", Arc::new(MemoryCheckpointStorage::new())),
        (
            "redb",
            Arc::new(RedbCheckpointStorage::open(dir.path().join("chk.redb")).expect("redb storage")),
        ),
    ];
    if let (Ok(_), Ok(bucket)) = (
        std::env::var("AWS_ENDPOINT_URL"),
        std::env::var("SLUICE_S3_BUCKET"),
    ) {
        let prefix = format!("bench/incremental-{}", std::process::id());
        let s3 = rt
            .block_on(S3CheckpointStorage::open(S3Config::new(bucket, prefix)))
            .expect("S3 storage");
        storages.push(("s3", Arc::new(s3)));
    }
    let mut points: Vec<Point> = Vec::new();
    let mut first_id = 1;
    for &keys in &a.keys {
        for (sname, storage) in &storages {
            for bname in ["memory", "redb"] {
                let backend: Box<dyn StateBackend> = match bname {
                    "memory" => Box::new(MemoryStateBackend::new()),
                    _ => Box::new(RedbStateBackend::new(dir.path().join("state")).expect("redb state")),
                };
                let p = rt.block_on(measure(
                    (bname, backend.as_ref()),
                    (sname, storage.as_ref()),
                    keys,
                    &a.fractions,
                    a.runs,
                    first_id,
                ));
                first_id += 10_000;
                eprintln!("{keys} keys, {bname} -> {sname}: done");
                points.extend(p);
            }
        }
    }
    let mut report = String::new();
    let now = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let _ = writeln!(
        report,
        "# Incremental against full checkpoints ({now})\n\n## One checkpoint of one state store\n\n\
         Synchronous snapshot + encoding + write of a store of N keys (8-byte keys and values) after the given \
         fraction of its keys changed, best of {} runs.\n",
        a.runs
    );
    report.push_str(&table(&points));
    let jobs = if a.job_keys > 0 {
        let mut runs = Vec::new();
        for (name, redb) in [
            ("memory state + memory storage", false),
            ("redb state + redb storage", true),
        ] {
            for incremental in [false, true] {
                runs.push(rt.block_on(job_run(name, redb, incremental, a.job_keys, a.job_events)));
                eprintln!("job {name}, incremental {incremental}: done");
            }
        }
        runs
    } else {
        Vec::new()
    };
    if !jobs.is_empty() {
        let _ = writeln!(
            report,
            "\n## End to end\n\nA job (parallelism 2) loads {} keys, then {} events update a hot set of 1 % of them; \
             a checkpoint every 500 ms; figures of the checkpoints after the load (the second half).\n\n\
             | configuration | checkpoints | events/s | checkpoint p50 | written p50 | full size | vs full: time | vs full: bytes |\n\
             | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
            a.job_keys, a.job_events
        );
        for pair in jobs.chunks(2) {
            let full = &pair[0];
            for r in pair {
                let _ = writeln!(
                    report,
                    "| {}, {} | {} | {:.2} M | {:.0} ms | {:.2} MB | {:.2} MB | {:.1} % | {:.1} % |",
                    r.name,
                    if r.incremental { "incremental" } else { "full" },
                    r.checkpoints,
                    r.rate / 1e6,
                    r.p50_ms,
                    r.written_p50 as f64 / 1e6,
                    r.full_size as f64 / 1e6,
                    100.0 * r.p50_ms / full.p50_ms.max(1e-9),
                    100.0 * r.written_p50 as f64 / (full.written_p50 as f64).max(1.0)
                );
            }
        }
    }
    std::fs::create_dir_all(&a.out).expect("output directory");
    let stamp = now.replace(':', "-");
    let md = a.out.join(format!("incremental-{stamp}.md"));
    std::fs::write(&md, &report).expect("write report");
    let largest = a.keys.iter().copied().max().unwrap_or(0);
    let _ = chart(
        &points,
        largest,
        "memory",
        &a.out.join("incremental_bytes.svg"),
        &format!("checkpoint bytes, {largest} keys"),
        "bytes (log scale)",
        &|p| p.bytes as f64,
    );
    let _ = chart(
        &points,
        largest,
        "memory",
        &a.out.join("incremental_duration.svg"),
        &format!("checkpoint time into memory storage, {largest} keys"),
        "ms (log scale)",
        &|p| p.duration.as_secs_f64() * 1e3,
    );
    print!("{report}");
    eprintln!("written {}", md.display());
}
