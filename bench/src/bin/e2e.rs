//! The end-to-end benchmark: the reference workload across a matrix of
//! state backend × checkpoint storage × checkpoint interval × mode ×
//! parallelism, each configuration in its own process (so its peak memory
//! is its own), plus a sweep of state sizes per storage. Writes a JSON file,
//! a Markdown report and SVG charts.
//!
//! ```text
//! cargo run --release -p sluice-bench --bin e2e                # full matrix (several minutes)
//! cargo run --release -p sluice-bench --bin e2e -- --quick     # smoke profile, under two minutes
//! cargo run --release -p sluice-bench --bin e2e -- --out DIR --events N --keys K
//! ```
//!
//! The S3 rows run when `AWS_ENDPOINT_URL` and `SLUICE_S3_BUCKET` are set
//! (`eval "$(scripts/s3-server.sh env)"`). A failing configuration is
//! reported in the table; the command fails (exit 1) if any did.

use clap::Parser;
use sluice_bench::e2e::{self, Config, RunResult};
use sluice_bench::report;
use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::Instant;

#[derive(Parser)]
struct Args {
    /// The smoke profile: fewer events and configurations.
    #[arg(long)]
    quick: bool,
    /// Where the results go.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Events per run (default 20,000,000; 5,000,000 with --quick; the
    /// state-size sweep uses at least 20 per key unless this is given).
    #[arg(long)]
    events: Option<u64>,
    /// Keys of the matrix runs (default 100,000).
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    /// Adds 10^7 keys to the state-size sweep.
    #[arg(long)]
    huge: bool,
    /// Redraw the report and charts from a results file of an earlier run
    /// (into `--out`), without running anything.
    #[arg(long)]
    render: Option<PathBuf>,
    /// Internal: run one configuration (JSON) and print its result.
    #[arg(long, hide = true)]
    child: Option<String>,
}

fn s3_available() -> bool {
    std::env::var_os("AWS_ENDPOINT_URL").is_some() && std::env::var_os("SLUICE_S3_BUCKET").is_some()
}

fn matrix(a: &Args, events: u64) -> Vec<Config> {
    let mut storages = vec!["memory", "redb"];
    if s3_available() {
        storages.push("s3");
    }
    let intervals: Vec<Option<u64>> = vec![None, Some(1000), Some(100)];
    let modes = ["exactly-once", "at-least-once"];
    let parallelisms: Vec<u32> = if a.quick { vec![2] } else { vec![1, 2] };
    let mut out = Vec::new();
    for state in ["memory", "redb"] {
        for storage in &storages {
            for &p in &parallelisms {
                for mode in modes {
                    for &interval in &intervals {
                        // Without checkpoints the mode and the storage do not
                        // matter: one row per state backend and parallelism.
                        if interval.is_none() && (mode != "exactly-once" || *storage != "memory") {
                            continue;
                        }
                        if a.quick && mode == "at-least-once" && interval != Some(100) {
                            continue;
                        }
                        for fail in [false, true] {
                            // Recovery once per row with checkpoints (exactly-once).
                            if fail && (interval.is_none() || mode != "exactly-once") {
                                continue;
                            }
                            out.push(Config {
                                state: state.into(),
                                storage: (*storage).into(),
                                interval_ms: interval,
                                mode: mode.into(),
                                parallelism: p,
                                events,
                                keys: a.keys,
                                fail,
                                network: false,
                            });
                        }
                    }
                }
            }
        }
    }
    out
}

/// Checkpoint duration and recovery time against state size, per storage
/// (memory state, checkpoints every 200 ms, parallelism 2, a failure).
fn sweep(a: &Args) -> Vec<Config> {
    let mut keys: Vec<u64> = if a.quick {
        vec![10_000, 100_000]
    } else {
        vec![10_000, 100_000, 1_000_000]
    };
    if a.huge {
        keys.push(10_000_000);
    }
    let mut storages = vec!["memory", "redb"];
    if s3_available() {
        storages.push("s3");
    }
    let mut out = Vec::new();
    for storage in storages {
        for &k in &keys {
            out.push(Config {
                state: "memory".into(),
                storage: storage.into(),
                interval_ms: Some(200),
                mode: "exactly-once".into(),
                parallelism: 2,
                events: a
                    .events
                    .unwrap_or((k * 20).max(if a.quick { 5_000_000 } else { 10_000_000 })),
                keys: k,
                fail: true,
                network: false,
            });
        }
    }
    out
}

fn run_child(config: &Config) -> RunResult {
    let json = serde_json::to_string(config).expect("configs serialize");
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            return RunResult {
                config: config.clone(),
                outcome: Err(format!("cannot find this program: {e}")),
            }
        }
    };
    let out = Command::new(exe).args(["--child", &json]).output();
    let outcome = match out {
        Err(e) => Err(format!("cannot start the run: {e}")),
        Ok(o) => {
            let stdout = String::from_utf8_lossy(&o.stdout);
            match stdout.lines().last().map(serde_json::from_str::<RunResult>) {
                Some(Ok(r)) if o.status.success() => return r,
                _ => Err(format!(
                    "the run exited with {}: {}",
                    o.status,
                    String::from_utf8_lossy(&o.stderr)
                        .lines()
                        .rfind(|l| !l.contains(" INFO "))
                        .unwrap_or("no output")
                )),
            }
        }
    };
    RunResult {
        config: config.clone(),
        outcome,
    }
}

fn child(json: &str) -> ExitCode {
    let config: Config = match serde_json::from_str(json) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("e2e: bad configuration {json}: {e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("e2e: cannot start tokio: {e}");
            return ExitCode::from(2);
        }
    };
    let outcome = rt.block_on(e2e::run(&config)).map_err(|e| e.to_string());
    let r = RunResult { config, outcome };
    println!("{}", serde_json::to_string(&r).unwrap_or_default());
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    sluice_runtime::limit_allocator_retention();
    let a = Args::parse();
    if let Some(json) = &a.child {
        return child(json);
    }
    if let Some(file) = &a.render {
        return render(file, &a.out);
    }
    if cfg!(debug_assertions) {
        eprintln!("e2e: this is a debug build: the figures are not representative (use --release)");
    }
    let events = a.events.unwrap_or(if a.quick { 5_000_000 } else { 20_000_000 });
    let started = Instant::now();
    let configs = matrix(&a, events);
    let sweep_configs = sweep(&a);
    let total = configs.len() + sweep_configs.len();
    eprintln!(
        "e2e: {} matrix runs and {} sweep runs{}",
        configs.len(),
        sweep_configs.len(),
        if s3_available() {
            " (with S3)"
        } else {
            " (no S3: AWS_ENDPOINT_URL / SLUICE_S3_BUCKET unset)"
        }
    );
    let mut results = Vec::new();
    for (i, c) in configs.iter().enumerate() {
        let r = run_child(c);
        eprintln!(
            "[{:>3}/{total}] {}{}: {}",
            i + 1,
            c.label(),
            if c.fail { ", with a failure" } else { "" },
            match &r.outcome {
                Ok(m) => format!("{:.2} M events/s", m.events_per_s / 1e6),
                Err(e) => format!("ERROR {e}"),
            }
        );
        results.push(r);
    }
    let mut sweep_results = Vec::new();
    for (i, c) in sweep_configs.iter().enumerate() {
        let r = run_child(c);
        eprintln!(
            "[{:>3}/{total}] sweep {} keys on {}: {}",
            configs.len() + i + 1,
            c.keys,
            c.storage,
            match &r.outcome {
                Ok(m) => format!(
                    "checkpoint p50 {:.1} ms, recovery {:?} ms",
                    m.checkpoint_p50_ms, m.recovery_ms
                ),
                Err(e) => format!("ERROR {e}"),
            }
        );
        sweep_results.push(r);
    }
    let date = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let stamp = date.replace(':', "-");
    if let Err(e) = std::fs::create_dir_all(&a.out) {
        eprintln!("e2e: cannot create {}: {e}", a.out.display());
        return ExitCode::from(2);
    }
    let file = Results {
        date: date.clone(),
        profile: if a.quick { "quick" } else { "full" }.into(),
        events,
        keys: a.keys,
        debug_build: cfg!(debug_assertions),
        seconds: started.elapsed().as_secs_f64(),
        matrix: results,
        sweep: sweep_results,
    };
    let json_path = a.out.join(format!("e2e-{stamp}.json"));
    if let Err(e) = std::fs::write(&json_path, serde_json::to_vec_pretty(&file).unwrap_or_default()) {
        eprintln!("e2e: cannot write {}: {e}", json_path.display());
        return ExitCode::from(2);
    }
    let code = write_report(&file, &a.out, Some(&stamp));
    eprintln!("e2e: results in {} ({})", a.out.display(), json_path.display());
    let failed = file
        .matrix
        .iter()
        .chain(&file.sweep)
        .filter(|r| r.outcome.is_err())
        .count();
    if failed > 0 {
        eprintln!("e2e: {failed} runs failed");
        return ExitCode::from(1);
    }
    code
}

/// A results file.
#[derive(serde::Serialize, serde::Deserialize)]
struct Results {
    date: String,
    profile: String,
    events: u64,
    keys: u64,
    debug_build: bool,
    #[serde(default)]
    seconds: f64,
    matrix: Vec<RunResult>,
    sweep: Vec<RunResult>,
}

fn render(file: &std::path::Path, out: &std::path::Path) -> ExitCode {
    let parsed = std::fs::read(file)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice::<Results>(&b).map_err(|e| e.to_string()));
    match parsed {
        Ok(r) => {
            if let Err(e) = std::fs::create_dir_all(out) {
                eprintln!("e2e: cannot create {}: {e}", out.display());
                return ExitCode::from(2);
            }
            write_report(&r, out, None)
        }
        Err(e) => {
            eprintln!("e2e: cannot read the results file {}: {e}", file.display());
            ExitCode::from(2)
        }
    }
}

/// Writes `latest.md` (and `e2e-<stamp>.md`) and the charts into `out`.
fn write_report(file: &Results, out: &std::path::Path, stamp: Option<&str>) -> ExitCode {
    let (results, sweep_results) = (&file.matrix, &file.sweep);
    let mut md =
        format!(
        "# Sluice end-to-end benchmark, {}\n\nProfile {}, {} events, {} keys (matrix), reference workload \
         (keyed running sum) on this machine ({} cores){}; {} runs in {:.0} s.\n\n## Matrix\n\n",
        file.date,
        file.profile,
        file.events,
        file.keys,
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        if file.debug_build { ", DEBUG BUILD (not representative)" } else { "" },
        results.len() + sweep_results.len(),
        file.seconds
    );
    md.push_str(&report::matrix_table(results));
    md.push_str(
        "\n## State size sweep (memory state, checkpoints every 200 ms, parallelism 2, one failure)\n\n",
    );
    md.push_str(&report::sweep_table(sweep_results));
    md.push_str("\nCharts: `throughput.svg`, `checkpoint_vs_state.svg`, `recovery_vs_state.svg`.\n");
    let mut writes = vec![std::fs::write(out.join("latest.md"), &md)];
    if let Some(stamp) = stamp {
        writes.push(std::fs::write(out.join(format!("e2e-{stamp}.md")), &md));
    }
    for w in writes {
        if let Err(e) = w {
            eprintln!("e2e: cannot write the report to {}: {e}", out.display());
            return ExitCode::from(2);
        }
    }
    let a_out = out;
    let charts = [
        report::throughput_chart(results, &a_out.join("throughput.svg")),
        report::sweep_chart(
            sweep_results,
            &a_out.join("checkpoint_vs_state.svg"),
            "Checkpoint duration (p50) vs state size",
            &|m| (m.checkpoints > 0).then_some(m.checkpoint_p50_ms),
        ),
        report::sweep_chart(
            sweep_results,
            &a_out.join("recovery_vs_state.svg"),
            "Recovery time vs state size",
            &|m| m.recovery_ms,
        ),
    ];
    for c in charts {
        if let Err(e) = c {
            eprintln!("e2e: cannot draw a chart: {e}");
            return ExitCode::from(2);
        }
    }
    print!("{md}");
    ExitCode::SUCCESS
}
