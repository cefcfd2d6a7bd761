//! The `sluice` command line: runs the reference workload with
//! checkpointing and failure injection and checks the result; controls a
//! running job through its REST API (status, checkpoint, savepoint, stop,
//! cancel); lists checkpoints; inspects and copies savepoints.

use clap::{Parser, Subcommand, ValueEnum};
use sluice_core::CheckpointStorageExt;
use sluice_core::{CheckpointStorage, StateBackend};
use sluice_runtime::file_sink::read_committed_lines;
use sluice_runtime::location::{self, OpenMode};
use sluice_runtime::rest::RestClient;
use sluice_runtime::workload::{self, InjectedFailure, RunningSum};
use sluice_runtime::{
    copy_savepoint, CheckpointConfig, CheckpointingMode, DiscardSink, FileSink, Job, RestartStrategy,
    RestoreSource, SavepointLocation,
};
use std::io::Write;
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
    /// Take a savepoint of a running job (started with `--rest`), into a new
    /// directory under TARGET (`redb:PATH[#DIR]`, `file:DIR` or
    /// `s3://bucket/prefix`).
    Savepoint {
        /// The job's REST address, e.g. `http://127.0.0.1:8081`.
        #[arg(long)]
        job: String,
        /// Stop the job with the savepoint (its sources emit nothing after
        /// it; the job ends once it is complete).
        #[arg(long)]
        stop: bool,
        /// Where the savepoint goes.
        target: String,
    },
    /// Trigger a checkpoint of a running job now.
    Checkpoint {
        /// The job's REST address.
        #[arg(long)]
        job: String,
    },
    /// Show a running job's status and checkpoint statistics.
    Status {
        /// The job's REST address.
        #[arg(long)]
        job: String,
        /// Print the JSON the job answered.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a running job.
    Cancel {
        /// The job's REST address.
        #[arg(long)]
        job: String,
    },
    /// Print a savepoint's or checkpoint's metadata (PATH: `redb:FILE#DIR`,
    /// `file:ROOT/DIR`, `s3://bucket/prefix/DIR`; DIR a savepoint directory
    /// or `chk-<id>`).
    Inspect {
        /// The savepoint or checkpoint.
        path: String,
        /// Print the metadata as JSON.
        #[arg(long)]
        json: bool,
        /// The operator whose state `--dump` prints.
        #[arg(long)]
        operator: Option<String>,
        /// Print the operator's keyed state as JSON lines (key group, key,
        /// state name, value).
        #[arg(long, requires = "operator")]
        dump: bool,
        /// S3 endpoint URL (else AWS_ENDPOINT_URL or AWS's default).
        #[arg(long)]
        s3_endpoint: Option<String>,
    },
    /// Copy a savepoint directory to another place (another folder, file,
    /// bucket, or kind of storage); the copy restores the same.
    Copy {
        /// The savepoint.
        src: String,
        /// The new directory (must be empty).
        dst: String,
        /// S3 endpoint URL (else AWS_ENDPOINT_URL or AWS's default).
        #[arg(long)]
        s3_endpoint: Option<String>,
    },
}

#[derive(Subcommand)]
enum CheckpointsCommand {
    /// List the completed checkpoints (id, time, kind, size, duration).
    List {
        /// Checkpoint storage: `redb:PATH`, `file:DIR` or `s3://bucket/prefix`.
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
    /// Checkpoint storage: `redb:PATH` (a local file), `file:DIR` (a
    /// directory, local or on a network mount; an absolute path works too),
    /// `s3://bucket/prefix` (credentials and region from the usual AWS
    /// variables) or `memory`.
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
    /// Pace the source to about this many events per second (demos, tests).
    #[arg(long)]
    rate: Option<u64>,
    /// Splits of the source (fixed: a savepoint restores at any parallelism
    /// only into a source with the same number of splits).
    #[arg(long, default_value_t = 8)]
    splits: u32,
    /// Start from this savepoint (or retained checkpoint `…#chk-<id>`).
    #[arg(long)]
    from_savepoint: Option<String>,
    /// With `--from-savepoint`: skip state of operators the job does not have.
    #[arg(long)]
    allow_non_restored_state: bool,
    /// Write every `key sum` the job emits, exactly once, into part files in
    /// this directory (a transactional file sink: two-phase commit with the
    /// checkpoints); the end of the run checks the committed lines.
    #[arg(long)]
    output: Option<std::path::PathBuf>,
    /// When the latest checkpoint cannot be restored, restore an older one
    /// even though the exactly-once sink (`--output`) already committed the
    /// newer one's output: this may duplicate output. Without it the job
    /// stops and names the damaged file.
    #[arg(long)]
    allow_checkpoint_fallback: bool,
    /// Serve the job's REST API on this address (`PORT` or `ADDR:PORT`; a
    /// bare port binds 127.0.0.1). It has no authentication.
    #[arg(long)]
    rest: Option<String>,
}

/// Stops the REST server when the job is done.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
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
    mode: OpenMode,
) -> Result<Arc<dyn CheckpointStorage>, String> {
    let s3 = s3_options(s3_endpoint);
    let spec_for_job = match spec.strip_prefix("s3://") {
        Some(rest) => format!("s3://{}/{job}", rest.trim_end_matches('/')),
        None => spec.to_string(),
    };
    location::open_storage_with(&spec_for_job, &s3, mode)
        .await
        .map_err(|e| failed(&format!("--storage {spec}"), &e))
}

/// The one-line message of a failure to open `what`; the error's whole
/// source chain goes to the debug log (`RUST_LOG=debug`).
fn failed(what: &str, e: &sluice_core::Error) -> String {
    let mut chain = String::new();
    let mut next = std::error::Error::source(e);
    while let Some(cause) = next {
        chain.push_str("\n  caused by: ");
        chain.push_str(&cause.to_string());
        next = cause.source();
    }
    tracing::debug!("{what}: {e}{chain}");
    format!("{what}: {e}")
}

fn s3_options(endpoint: Option<&str>) -> location::S3Options {
    location::S3Options {
        endpoint: endpoint.map(str::to_string),
    }
}

async fn open_location(
    spec: &str,
    s3_endpoint: Option<&str>,
    mode: OpenMode,
) -> Result<SavepointLocation, String> {
    location::open_location_with(spec, &s3_options(s3_endpoint), mode)
        .await
        .map_err(|e| failed(spec, &e))
}

/// The log filter when `RUST_LOG` is not set: Sluice's progress at `info`;
/// the AWS SDK's own logs (every attempt of the credential chain and of
/// instance metadata, retries, connection errors) off — their failures
/// reach the user as one short error, and `RUST_LOG=debug` shows them all.
const DEFAULT_LOG_FILTER: &str =
    "info,aws_config=off,aws_smithy=off,aws_runtime=off,aws_sdk=off,aws_credential_types=off,aws_sigv4=off";

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| DEFAULT_LOG_FILTER.into()),
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
        Command::Savepoint { job, stop, target } => finish(client_savepoint(&job, stop, &target)),
        Command::Checkpoint { job } => finish(client_checkpoint(&job)),
        Command::Status { job, json } => finish(client_status(&job, json)),
        Command::Cancel { job } => finish(client_cancel(&job)),
        Command::Inspect {
            path,
            json,
            operator,
            dump,
            s3_endpoint,
        } => finish(inspect(
            &path,
            json,
            operator.as_deref(),
            dump,
            s3_endpoint.as_deref(),
        )),
        Command::Copy {
            src,
            dst,
            s3_endpoint,
        } => finish(copy(&src, &dst, s3_endpoint.as_deref())),
    }
}

fn client(job: &str) -> RestClient {
    // Savepoints answer when complete: allow for the checkpoint timeout.
    RestClient::new(job, Duration::from_secs(15 * 60))
}

fn client_savepoint(job: &str, stop: bool, target: &str) -> Result<ExitCode, String> {
    let r = client(job)
        .post(
            "/savepoints",
            serde_json::json!({ "target": target, "stop": stop }),
        )
        .map_err(|e| e.to_string())?;
    let location = r["location"].as_str().unwrap_or("?");
    if stop {
        println!("job stopped with savepoint {} at {location}", r["id"]);
    } else {
        println!("savepoint {} completed at {location}", r["id"]);
    }
    Ok(ExitCode::SUCCESS)
}

fn client_checkpoint(job: &str) -> Result<ExitCode, String> {
    let r = client(job)
        .post("/checkpoints", serde_json::json!({}))
        .map_err(|e| e.to_string())?;
    println!("checkpoint {} completed", r["id"]);
    Ok(ExitCode::SUCCESS)
}

fn client_cancel(job: &str) -> Result<ExitCode, String> {
    client(job)
        .post("/cancel", serde_json::json!({}))
        .map_err(|e| e.to_string())?;
    println!("job cancelled");
    Ok(ExitCode::SUCCESS)
}

fn client_status(job: &str, json: bool) -> Result<ExitCode, String> {
    let c = client(job);
    let status = c.get("/job").map_err(|e| e.to_string())?;
    let checkpoints = c.get("/checkpoints").map_err(|e| e.to_string())?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "job": status, "checkpoints": checkpoints }))
                .map_err(|e| e.to_string())?
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "job {}: {}, up {:.1}s, {} restarts, {} source records",
        status["name"].as_str().unwrap_or("?"),
        status["state"].as_str().unwrap_or("?"),
        status["uptime_ms"].as_u64().unwrap_or(0) as f64 / 1e3,
        status["restarts"],
        status["source_records"]
    );
    let counts = &checkpoints["counts"];
    println!(
        "checkpoints: {} completed, {} failed, {} in progress; duration p50 {} ms, p99 {} ms",
        counts["completed"],
        counts["failed"],
        counts["in_progress"],
        checkpoints["summary"]["duration_p50_ms"],
        checkpoints["summary"]["duration_p99_ms"]
    );
    let history = checkpoints["history"].as_array().cloned().unwrap_or_default();
    println!(
        "{:>8}  {:<10}  {:<11}  {:>12}  {:>9}",
        "id", "kind", "status", "size", "duration"
    );
    for h in history.iter().rev().take(10).rev() {
        println!(
            "{:>8}  {:<10}  {:<11}  {:>12}  {:>7}ms",
            h["id"].to_string(),
            h["kind"].as_str().unwrap_or("?"),
            h["status"].as_str().unwrap_or("?"),
            h["state_size"].to_string(),
            h["duration_ms"].to_string()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn inspect(
    path: &str,
    json: bool,
    operator: Option<&str>,
    dump: bool,
    s3_endpoint: Option<&str>,
) -> Result<ExitCode, String> {
    runtime()?.block_on(async move {
        let location = open_location(path, s3_endpoint, OpenMode::ReadOnly).await?;
        let source = RestoreSource::open(&location).await.map_err(|e| e.to_string())?;
        if dump {
            let uid = operator.unwrap_or_default();
            let mut out = std::io::BufWriter::new(std::io::stdout());
            let mut failed: Option<std::io::Error> = None;
            let n = sluice_runtime::inspect::dump_operator(&source, uid, &mut |v| {
                if failed.is_none() {
                    if let Err(e) = writeln!(out, "{v}") {
                        failed = Some(e);
                    }
                }
            })
            .await
            .map_err(|e| e.to_string())?;
            let flushed = out.flush();
            drop(out);
            match failed.or(flushed.err()) {
                // The reader went away (`| head`): not an error.
                Some(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(ExitCode::SUCCESS),
                Some(e) => return Err(format!("writing the dump: {e}")),
                None => {}
            }
            eprintln!("{n} entries of operator {uid}");
        } else if json {
            let text = String::from_utf8(source.metadata.to_json().map_err(|e| e.to_string())?)
                .map_err(|e| e.to_string())?;
            println!("{text}");
        } else {
            print!("{}", sluice_runtime::inspect::describe(&source));
        }
        Ok(ExitCode::SUCCESS)
    })
}

fn copy(src: &str, dst: &str, s3_endpoint: Option<&str>) -> Result<ExitCode, String> {
    runtime()?.block_on(async move {
        // The source is opened read-only: a mistyped source creates nothing.
        let (from, to) = location::open_copy_locations(src, dst, &s3_options(s3_endpoint))
            .await
            .map_err(|e| failed(&format!("copy {src} {dst}"), &e))?;
        let meta = copy_savepoint(&from, &to).await.map_err(|e| e.to_string())?;
        println!(
            "copied {} {} ({} bytes of state) to {}",
            meta.kind,
            meta.checkpoint_id,
            meta.state_size(),
            to.describe()
        );
        Ok(ExitCode::SUCCESS)
    })
}

/// `PORT` or `ADDR:PORT`; a bare port binds to loopback.
fn rest_address(spec: &str) -> Result<std::net::SocketAddr, String> {
    if let Ok(port) = spec.parse::<u16>() {
        return Ok(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
    }
    spec.parse()
        .map_err(|e| format!("--rest {spec:?}: {e} (examples: 8081, 127.0.0.1:8081)"))
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
        let storage = checkpoint_storage(spec, s3_endpoint, "keyed-sum", OpenMode::ReadOnly).await?;
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
    if a.splits == 0 {
        return Err("--splits must be at least 1".into());
    }
    let rest_addr = a.rest.as_deref().map(rest_address).transpose()?;
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
        OpenMode::ReadWrite,
    ))?;
    let from_savepoint = match &a.from_savepoint {
        // Read-only: a mistyped savepoint path creates nothing.
        Some(p) => Some(rt.block_on(open_location(p, a.s3_endpoint.as_deref(), OpenMode::ReadOnly))?),
        None => None,
    };
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
            .allow_non_restored_state(a.allow_non_restored_state)
            .with_restart_strategy(RestartStrategy::FixedDelay { attempts: 3, delay: Duration::from_millis(100) })
            .with_checkpointing(CheckpointConfig {
                interval,
                mode,
                retained: a.retained,
                fallback_to_older_checkpoint: a.allow_checkpoint_fallback,
                ..Default::default()
            });
        let job = match from_savepoint {
            Some(loc) => job.from_savepoint(loc),
            None => job,
        };
        let sums = workload::keyed_sum_stream(
            &job,
            a.events,
            a.keys,
            a.splits,
            a.parallelism,
            a.rate,
            RunningSum::with_failures(failures),
        )
        .map_err(|e| e.to_string())?;
        match &a.output {
            Some(dir) => sums.transactional_sink("output", FileSink::new(dir, workload::sum_line)),
            None => sums.sink(DiscardSink::new()),
        }
        .map_err(|e| e.to_string())?;
        let started = Instant::now();
        let handle = job.start().map_err(|e| e.to_string())?;
        let _rest = match rest_addr {
            Some(addr) => {
                let s3 = s3_options(a.s3_endpoint.as_deref());
                let resolve: sluice_runtime::rest::TargetResolver = Arc::new(move |target: String| {
                    let s3 = s3.clone();
                    Box::pin(async move { Ok(location::open_location(&target, &s3).await?) })
                });
                let (bound, task) = sluice_runtime::rest::serve(addr, handle.monitor(), resolve)
                    .await
                    .map_err(|e| format!("--rest {addr}: cannot listen: {e}"))?;
                if !bound.ip().is_loopback() {
                    eprintln!("sluice: warning: the REST API on {bound} is reachable from other machines and has no authentication");
                }
                println!("sluice: REST API on http://{bound} (no authentication)");
                Some(AbortOnDrop(task))
            }
            None => None,
        };
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
        if let Some(from) = &result.restored_from_savepoint {
            println!("started from {from}");
        }
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
        let read = monitor.source_records();
        println!(
            "throughput: {:.2} M events/s ({} events read in {:.2}s)",
            read as f64 / elapsed.as_secs_f64() / 1e6,
            read,
            elapsed.as_secs_f64()
        );
        if let Some(sp) = &result.stopped_with_savepoint {
            println!("stopped with savepoint {} at {}", sp.id, sp.path());
            println!("continue with: sluice run keyed-sum ... --from-savepoint '{}'", sp.path());
            return Ok(ExitCode::SUCCESS);
        }
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
        let output_ok = match &a.output {
            None => true,
            Some(dir) => {
                let lines = read_committed_lines(dir).map_err(|e| format!("reading the output in {}: {e}", dir.display()))?;
                let values = workload::values_by_key(0..a.events, a.keys);
                match workload::check_sum_lines(&lines, &values) {
                    Ok(()) => {
                        println!("output: {} committed lines in {}; exactly-once: ok", lines.len(), dir.display());
                        true
                    }
                    Err(e) => {
                        println!("output: {} committed lines in {}: {e}; exactly-once: FAILED", lines.len(), dir.display());
                        false
                    }
                }
            }
        };
        if !output_ok && mode == CheckpointingMode::ExactlyOnce {
            return Ok(ExitCode::from(1));
        }
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
