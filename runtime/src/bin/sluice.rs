//! The `sluice` command line: runs the reference workload with
//! checkpointing and failure injection, and checks the result.

use clap::{Parser, Subcommand, ValueEnum};
use sluice_core::{CheckpointStorage, StateBackend};
use sluice_runtime::workload::{self, InjectedFailure, RunningSum};
use sluice_runtime::{CheckpointConfig, CheckpointingMode, DiscardSink, Job, RestartStrategy};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "Stateful stream processing with Flink-style checkpoints"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a built-in job.
    Run {
        #[command(subcommand)]
        job: RunJob,
    },
    /// Inspect checkpoint storage.
    Checkpoints {
        #[command(subcommand)]
        command: CheckpointsCommand,
    },
}

#[derive(Subcommand)]
enum CheckpointsCommand {
    /// List the completed checkpoints (id, time, kind, size, duration).
    List {
        /// Checkpoint storage: `redb:PATH` or `s3://bucket/prefix`.
        #[arg(long, default_value = DEFAULT_STORAGE)]
        storage: String,
        /// S3 endpoint URL (else AWS_ENDPOINT_URL or AWS's default).
        #[arg(long)]
        s3_endpoint: Option<String>,
    },
}

const DEFAULT_STORAGE: &str = "redb:./sluice-data/checkpoints.redb";

#[derive(Subcommand)]
enum RunJob {
    /// The reference workload: keyed running sum over a generated sequence.
    KeyedSum(KeyedSumArgs),
}

#[derive(Clone, Copy, ValueEnum)]
enum Mode {
    ExactlyOnce,
    AtLeastOnce,
}

#[derive(clap::Args)]
struct KeyedSumArgs {
    /// Number of events N.
    #[arg(long, default_value_t = 20_000_000)]
    events: u64,
    /// Number of keys K.
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    /// Parallelism of the source and the keyed operator.
    #[arg(long, default_value_t = 2)]
    parallelism: u32,
    /// Checkpoint interval, e.g. `1s`, `100ms`, or `none`.
    #[arg(long, default_value = "1s")]
    checkpoint_interval: String,
    /// Checkpointing mode.
    #[arg(long, value_enum, default_value = "exactly-once")]
    mode: Mode,
    /// Inject one task failure after this many events (counted at the keyed operator).
    #[arg(long)]
    fail_after: Option<u64>,
    /// Working state backend: `redb` (on disk, larger than memory) or `memory`.
    #[arg(long, default_value = "redb")]
    state: String,
    /// Directory of the redb state backend's working files.
    #[arg(long, default_value = "./sluice-data/state")]
    state_dir: std::path::PathBuf,
    /// Checkpoint storage: `redb:PATH` (a local file), `s3://bucket/prefix`
    /// (credentials and region from the usual AWS variables) or `memory`.
    #[arg(long, default_value = DEFAULT_STORAGE)]
    storage: String,
    /// S3 endpoint URL (else AWS_ENDPOINT_URL or AWS's default).
    #[arg(long)]
    s3_endpoint: Option<String>,
    /// Resume from the latest completed checkpoint in the storage (after the
    /// process was killed).
    #[arg(long)]
    resume: bool,
    /// Completed checkpoints to retain.
    #[arg(long, default_value_t = 3)]
    retained: usize,
    /// Max parallelism (number of key groups).
    #[arg(long, default_value_t = 128)]
    max_parallelism: u32,
}

fn parse_interval(s: &str) -> Result<Option<Duration>, String> {
    if s.eq_ignore_ascii_case("none") || s.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("--checkpoint-interval {s:?}: {e} (examples: 1s, 100ms, none)"))?;
    if d.is_zero() {
        return Err("--checkpoint-interval must be positive, or `none`".into());
    }
    Ok(Some(d))
}

fn state_backend(name: &str, dir: &std::path::Path) -> Result<Arc<dyn StateBackend>, String> {
    match name {
        "memory" => Ok(Arc::new(sluice_backend_memory::MemoryStateBackend::new())),
        "redb" => sluice_backend_redb::RedbStateBackend::new(dir)
            .map(|b| Arc::new(b) as Arc<dyn StateBackend>)
            .map_err(|e| format!("--state redb: {e}")),
        other => Err(format!(
            "--state {other:?}: unknown state backend (available: redb, memory)"
        )),
    }
}

/// Opens the storage named by `spec`. S3 storages hold the job's directory
/// `<prefix>/<job>`.
async fn checkpoint_storage(
    spec: &str,
    s3_endpoint: Option<&str>,
    job: &str,
) -> Result<Arc<dyn CheckpointStorage>, String> {
    if spec.starts_with("s3://") {
        let mut config =
            sluice_backend_s3::S3Config::from_url(spec).map_err(|e| format!("--storage: {e}"))?;
        config.prefix = if config.prefix.is_empty() {
            job.to_string()
        } else {
            format!("{}/{job}", config.prefix)
        };
        config.endpoint_url = s3_endpoint.map(str::to_string);
        return sluice_backend_s3::S3CheckpointStorage::open(config)
            .await
            .map(|s| Arc::new(s) as Arc<dyn CheckpointStorage>)
            .map_err(|e| format!("--storage {spec}: {e}"));
    }
    if spec == "memory" {
        return Ok(Arc::new(sluice_backend_memory::MemoryCheckpointStorage::new()));
    }
    if let Some(path) = spec.strip_prefix("redb:") {
        if path.is_empty() {
            return Err(
                "--storage redb:PATH needs a file path, e.g. redb:./sluice-data/checkpoints.redb".into(),
            );
        }
        return sluice_backend_redb::RedbCheckpointStorage::open(path)
            .map(|s| Arc::new(s) as Arc<dyn CheckpointStorage>)
            .map_err(|e| format!("--storage {spec}: {e}"));
    }
    Err(format!(
        "--storage {spec:?}: unknown checkpoint storage (available: redb:PATH, s3://bucket/prefix, memory)"
    ))
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_target(false)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Run {
            job: RunJob::KeyedSum(args),
        } => finish(run_keyed_sum(args)),
        Command::Checkpoints {
            command: CheckpointsCommand::List { storage, s3_endpoint },
        } => finish(list_checkpoints(&storage, s3_endpoint.as_deref())),
    }
}

fn finish(r: Result<ExitCode, String>) -> ExitCode {
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("sluice: error: {e}");
            ExitCode::from(2)
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the tokio runtime: {e}"))
}

fn list_checkpoints(spec: &str, s3_endpoint: Option<&str>) -> Result<ExitCode, String> {
    runtime()?.block_on(async move {
        let storage = checkpoint_storage(spec, s3_endpoint, "keyed-sum").await?;
        let listing = storage.list().await.map_err(|e| e.to_string())?;
        println!(
            "{:>8}  {:<20}  {:<10}  {:>12}  {:>9}",
            "id", "time (UTC)", "kind", "size", "duration"
        );
        let mut count = 0;
        for c in listing.iter().filter(|c| c.committed) {
            match sluice_core::metadata::read_checkpoint_metadata(storage.as_ref(), c.id).await {
                Ok(m) => {
                    let time = std::time::UNIX_EPOCH + Duration::from_millis(m.trigger_time_ms);
                    println!(
                        "{:>8}  {:<20}  {:<10}  {:>12}  {:>7}ms",
                        c.id.0,
                        humantime::format_rfc3339_seconds(time).to_string(),
                        m.kind.to_string(),
                        m.state_size(),
                        m.duration_ms
                    );
                }
                Err(e) => println!("{:>8}  unreadable metadata: {e}", c.id.0),
            }
            count += 1;
        }
        println!("{count} completed checkpoints in {}", storage.describe());
        Ok(ExitCode::SUCCESS)
    })
}

fn run_keyed_sum(a: KeyedSumArgs) -> Result<ExitCode, String> {
    let interval = parse_interval(&a.checkpoint_interval)?;
    if a.keys == 0 {
        return Err("--keys must be at least 1".into());
    }
    if a.parallelism == 0 || a.parallelism > a.max_parallelism {
        return Err(format!(
            "--parallelism {} must be between 1 and the max parallelism {}",
            a.parallelism, a.max_parallelism
        ));
    }
    let backend = state_backend(&a.state, &a.state_dir)?;
    let mode = match a.mode {
        Mode::ExactlyOnce => CheckpointingMode::ExactlyOnce,
        Mode::AtLeastOnce => CheckpointingMode::AtLeastOnce,
    };
    let failures = match a.fail_after {
        Some(n) => vec![InjectedFailure::new(
            0,
            (n / u64::from(a.parallelism)).max(1),
            false,
        )],
        None => Vec::new(),
    };
    let rt = runtime()?;
    let storage = rt.block_on(checkpoint_storage(
        &a.storage,
        a.s3_endpoint.as_deref(),
        "keyed-sum",
    ))?;
    println!(
        "sluice: keyed-sum: {} events, {} keys, parallelism {}, checkpoints {}, {}, state {}, storage {}",
        a.events,
        a.keys,
        a.parallelism,
        interval
            .map(|d| format!("every {}", humantime::format_duration(d)))
            .unwrap_or_else(|| "off".into()),
        match mode {
            CheckpointingMode::ExactlyOnce => "exactly-once",
            CheckpointingMode::AtLeastOnce => "at-least-once",
        },
        backend.name(),
        storage.describe()
    );
    rt.block_on(async move {
        let storage_for_check = storage.clone();
        let job = Job::new("keyed-sum")
            .with_parallelism(a.parallelism)
            .with_max_parallelism(a.max_parallelism)
            .with_state_backend(backend)
            .with_checkpoint_storage(storage)
            .resume_from_latest_checkpoint(a.resume)
            .with_restart_strategy(RestartStrategy::FixedDelay { attempts: 3, delay: Duration::from_millis(100) })
            .with_checkpointing(CheckpointConfig { interval, mode, retained: a.retained, ..Default::default() });
        workload::keyed_sum(&job, a.events, a.keys, a.parallelism, RunningSum::with_failures(failures), DiscardSink::new())
            .map_err(|e| e.to_string())?;
        let started = Instant::now();
        let handle = job.start().map_err(|e| e.to_string())?;
        let mut ticker = tokio::time::interval(Duration::from_secs(1));
        ticker.tick().await;
        let mut last = (0u64, Instant::now());
        let monitor = handle.monitor();
        let mut join = Box::pin(handle.wait());
        let result = loop {
            tokio::select! {
                r = &mut join => break r,
                _ = ticker.tick() => {
                    let n = monitor.source_records();
                    let now = Instant::now();
                    let rate = (n - last.0.min(n)) as f64 / now.duration_since(last.1).as_secs_f64();
                    println!("[{:>6.1}s] {:>8.2} M events/s, {} events read", started.elapsed().as_secs_f64(), rate / 1e6, n);
                    last = (n, now);
                }
            }
        };
        drop(join);
        let elapsed = started.elapsed();
        let result = result.map_err(|e| format!("job failed: {e}"))?;
        if let Some(id) = result.resumed_from {
            println!("resumed from checkpoint {id}");
        }
        for r in &result.recoveries {
            match r.restored_from {
                Some(id) => println!("recovery: {}; restored from checkpoint {id}", r.cause),
                None => println!("recovery: {}; restarted from scratch (no checkpoint yet)", r.cause),
            }
        }
        let stats = monitor.checkpoint_stats();
        let done: Vec<_> = stats.iter().filter(|s| s.status == sluice_runtime::CheckpointStatus::Completed).collect();
        println!(
            "checkpoints: {} completed, {} failed; {} restarts",
            done.len(),
            stats.iter().filter(|s| matches!(s.status, sluice_runtime::CheckpointStatus::Failed(_))).count(),
            result.restarts
        );
        println!(
            "throughput: {:.2} M events/s ({} events in {:.2}s)",
            a.events as f64 / elapsed.as_secs_f64() / 1e6,
            a.events,
            elapsed.as_secs_f64()
        );
        // Check the durable final state: the keyed state in the final
        // checkpoint, which a resumed run also completes.
        let final_id = result
            .final_checkpoint
            .ok_or("the job ended without a final checkpoint; cannot check its state")?;
        let sums = workload::final_sums(storage_for_check.as_ref(), final_id)
            .await
            .map_err(|e| format!("reading the final state from checkpoint {final_id}: {e}"))?;
        println!("final state: checkpoint {final_id}, {} keys", sums.len());
        let v = workload::verify(&sums, a.events, a.keys);
        if v.exactly_once() {
            println!("result: {} keys checked against the expected sums; exactly-once: ok", v.keys);
            Ok(ExitCode::SUCCESS)
        } else {
            println!(
                "result: {} keys checked; {} too large (duplicates), {} too small (losses); e.g. (key, expected, actual) {:?}; exactly-once: FAILED",
                v.keys, v.too_large, v.too_small, v.examples
            );
            Ok(match mode {
                CheckpointingMode::ExactlyOnce => ExitCode::from(1),
                // At-least-once may legitimately duplicate after a failure.
                CheckpointingMode::AtLeastOnce => ExitCode::SUCCESS,
            })
        }
    })
}
