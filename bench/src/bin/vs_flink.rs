//! Sluice against Flink 2.3 on the reference workload, interleaved: each
//! round runs every configuration once on each side, one after the other,
//! so that both see the same machine load; the medians over the rounds and
//! their ratios are printed as a Markdown table and written to
//! `bench/results/vs-flink-<time>.md`.
//!
//! Sluice runs in a child process of the `e2e` binary (built beside this
//! one) and is timed as a whole job (start to end, final checkpoint
//! included); Flink runs through `../shared/anchors/flink/run.sh` (run its
//! `setup.sh` once first) and is timed by its net job runtime.
//!
//! ```text
//! cargo build --release -p sluice-bench --bin e2e --bin vs_flink
//! target/release/vs_flink [--rounds 3] [--events 20000000] [--keys 100000] [--rows duration]
//! ```

use clap::Parser;
use sluice_bench::e2e::{Config, RunResult};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};

#[derive(Parser)]
struct Args {
    /// Rounds (each runs every configuration on both sides).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Events per throughput run.
    #[arg(long, default_value_t = 20_000_000)]
    events: u64,
    /// Keys of the throughput runs.
    #[arg(long, default_value_t = 100_000)]
    keys: u64,
    /// Keys of the checkpoint-duration row.
    #[arg(long, default_value_t = 1_000_000)]
    big_keys: u64,
    /// Parallelism.
    #[arg(long, default_value_t = 2)]
    parallelism: u32,
    /// The Flink anchor's directory.
    #[arg(long, default_value = "../shared/anchors/flink")]
    flink: PathBuf,
    /// Where to write the result file.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Only the rows whose label contains this text (e.g. `duration`, `redb`).
    #[arg(long)]
    rows: Option<String>,
}

/// Labels of the rows the summary line compares.
const HEAP_NONE: &str = "heap/memory state, no checkpoints (M ev/s)";
const HEAP_100MS: &str = "heap/memory state, every 100 ms (M ev/s)";
const REDB_NONE: &str = "redb vs RocksDB, no checkpoints (M ev/s)";
const REDB_100MS: &str = "redb vs RocksDB, every 100 ms (M ev/s)";

/// One row of the comparison.
struct Row {
    label: &'static str,
    sluice: Config,
    /// `run.sh` arguments after EVENTS KEYS P: INTERVAL_MS and the backend.
    flink_interval_ms: u64,
    flink_backend: &'static str,
    /// Compare checkpoint durations (p50) instead of throughput.
    durations: bool,
}

#[derive(Default)]
struct Samples {
    sluice: Vec<f64>,
    flink: Vec<f64>,
}

fn median(v: &[f64]) -> Option<f64> {
    let mut v: Vec<f64> = v.iter().copied().filter(|x| x.is_finite()).collect();
    if v.is_empty() {
        return None;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    Some(v[v.len() / 2])
}

fn run_sluice(exe: &Path, config: &Config) -> Result<sluice_bench::e2e::Measured, String> {
    let json = serde_json::to_string(config).map_err(|e| e.to_string())?;
    let out = Command::new(exe)
        .args(["--child", &json])
        .output()
        .map_err(|e| format!("cannot start {}: {e}", exe.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let r: RunResult = stdout
        .lines()
        .last()
        .and_then(|l| serde_json::from_str(l).ok())
        .ok_or_else(|| format!("the e2e child printed no result (exit {})", out.status))?;
    r.outcome
}

/// Flink's events/s and, with its log, the checkpoint duration p50 (ms).
fn run_flink(dir: &Path, a: &Args, keys: u64, row: &Row) -> Result<(f64, Option<f64>), String> {
    let out = Command::new(dir.join("run.sh"))
        .args([
            a.events.to_string(),
            keys.to_string(),
            a.parallelism.to_string(),
            row.flink_interval_ms.to_string(),
            row.flink_backend.to_string(),
        ])
        .env("FLINK_LOG", if row.durations { "1" } else { "0" })
        .output()
        .map_err(|e| format!("cannot start {}/run.sh: {e}", dir.display()))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let rate = stdout
        .split_whitespace()
        .find_map(|w| w.strip_prefix("events_per_s="))
        .and_then(|v| v.parse::<f64>().ok())
        .ok_or_else(|| {
            format!(
                "Flink printed no events_per_s (did setup.sh run?): {}{}",
                stdout.trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            )
        })?;
    let mut p50 = None;
    if row.durations {
        let anchor = std::env::var("FLINK_ANCHOR_DIR").unwrap_or_else(|_| {
            format!(
                "{}/sluice-flink-anchor",
                std::env::var("TMPDIR").unwrap_or_else(|_| "/tmp".into())
            )
        });
        let log = std::fs::read_to_string(Path::new(&anchor).join("last.log")).unwrap_or_default();
        let durations: Vec<f64> = log
            .split("checkpointDuration=")
            .skip(1)
            .filter_map(|t| {
                let n: String = t.chars().take_while(|c| c.is_ascii_digit()).collect();
                n.parse().ok()
            })
            .collect();
        p50 = median(&durations);
    }
    Ok((rate, p50))
}

fn main() -> ExitCode {
    let a = Args::parse();
    let Ok(me) = std::env::current_exe() else {
        eprintln!("vs_flink: cannot find this program's path");
        return ExitCode::from(2);
    };
    let e2e = me.with_file_name(format!("e2e{}", std::env::consts::EXE_SUFFIX));
    if !e2e.exists() {
        eprintln!(
            "vs_flink: {} is missing; build it: cargo build --release -p sluice-bench --bin e2e",
            e2e.display()
        );
        return ExitCode::from(2);
    }
    if !a.flink.join("run.sh").exists() {
        eprintln!("vs_flink: no Flink anchor at {} (--flink DIR)", a.flink.display());
        return ExitCode::from(2);
    }
    let config = |state: &str, storage: &str, interval_ms: Option<u64>, keys: u64| Config {
        state: state.into(),
        storage: storage.into(),
        interval_ms,
        mode: "exactly-once".into(),
        parallelism: a.parallelism,
        events: a.events,
        keys,
        fail: false,
        network: false,
    };
    let rows = [
        Row {
            label: HEAP_NONE,
            sluice: config("memory", "fs", None, a.keys),
            flink_interval_ms: 0,
            flink_backend: "hashmap",
            durations: false,
        },
        Row {
            label: HEAP_100MS,
            sluice: config("memory", "fs", Some(100), a.keys),
            flink_interval_ms: 100,
            flink_backend: "hashmap",
            durations: false,
        },
        Row {
            label: REDB_NONE,
            sluice: config("redb", "fs", None, a.keys),
            flink_interval_ms: 0,
            flink_backend: "rocksdb",
            durations: false,
        },
        Row {
            label: REDB_100MS,
            sluice: config("redb", "fs", Some(100), a.keys),
            flink_interval_ms: 100,
            flink_backend: "rocksdb",
            durations: false,
        },
        Row {
            label: "redb vs RocksDB, every 1 s (M ev/s)",
            sluice: config("redb", "fs", Some(1000), a.keys),
            flink_interval_ms: 1000,
            flink_backend: "rocksdb",
            durations: false,
        },
        Row {
            label: "checkpoint duration p50, heap state, 1 M keys, every 1 s (ms)",
            sluice: config("memory", "fs", Some(1000), a.big_keys),
            flink_interval_ms: 1000,
            flink_backend: "hashmap",
            durations: true,
        },
    ];
    let rows: Vec<Row> = rows
        .into_iter()
        .filter(|r| a.rows.as_ref().is_none_or(|only| r.label.contains(only.as_str())))
        .collect();
    if rows.is_empty() {
        eprintln!(
            "vs_flink: no row's label contains {:?}",
            a.rows.as_deref().unwrap_or("")
        );
        return ExitCode::from(2);
    }
    let mut samples: Vec<Samples> = rows.iter().map(|_| Samples::default()).collect();
    let mut sluice_rates: Vec<Vec<f64>> = rows.iter().map(|_| Vec::new()).collect();
    for round in 1..=a.rounds {
        for (i, row) in rows.iter().enumerate() {
            let keys = row.sluice.keys;
            match run_sluice(&e2e, &row.sluice) {
                Ok(m) => {
                    sluice_rates[i].push(m.events_per_s);
                    samples[i].sluice.push(if row.durations {
                        m.checkpoint_p50_ms
                    } else {
                        m.events_per_s
                    });
                    eprintln!(
                        "round {round}: sluice {}: {:.2} M ev/s, checkpoint p50 {:.0} ms",
                        row.label,
                        m.events_per_s / 1e6,
                        m.checkpoint_p50_ms
                    );
                }
                Err(e) => eprintln!("round {round}: sluice {}: failed: {e}", row.label),
            }
            match run_flink(&a.flink, &a, keys, row) {
                Ok((rate, p50)) => {
                    samples[i].flink.push(if row.durations {
                        p50.unwrap_or(f64::NAN)
                    } else {
                        rate
                    });
                    eprintln!(
                        "round {round}: flink  {}: {:.2} M ev/s{}",
                        row.label,
                        rate / 1e6,
                        p50.map(|p| format!(", checkpoint p50 {p:.0} ms"))
                            .unwrap_or_default()
                    );
                }
                Err(e) => eprintln!("round {round}: flink {}: failed: {e}", row.label),
            }
        }
    }
    let mut table = format!(
        "Reference workload ({} events, {} keys, p={}; the duration row {} keys), {} interleaved rounds, medians. \
         Sluice: `e2e --child` (whole job, memory or redb state, checkpoints to a local directory with fsync); \
         Flink 2.3: `run.sh` (net job runtime, hashmap or RocksDB with full checkpoints to a local directory).\n\n\
         | configuration | Sluice | Flink 2.3 | Sluice / Flink |\n| --- | --- | --- | --- |\n",
        a.events, a.keys, a.parallelism, a.big_keys, a.rounds
    );
    for (i, row) in rows.iter().enumerate() {
        let (s, f) = (median(&samples[i].sluice), median(&samples[i].flink));
        let fmt = |v: Option<f64>| match v {
            Some(v) if row.durations => format!("{v:.0} ms"),
            Some(v) => format!("{:.2} M", v / 1e6),
            None => "failed".into(),
        };
        let ratio = match (s, f) {
            (Some(s), Some(f)) if row.durations && s > 0.0 => format!("1/{:.1} of Flink's duration", f / s),
            (Some(s), Some(f)) if f > 0.0 => format!("{:.1}x", s / f),
            _ => "-".into(),
        };
        table.push_str(&format!(
            "| {} | {} | {} | {} |\n",
            row.label,
            fmt(s),
            fmt(f),
            ratio
        ));
    }
    // Checkpointing's cost to Sluice's own throughput.
    // (By label: `--rows` may have left some rows out.)
    let rate = |label: &str| {
        let i = rows.iter().position(|r| r.label == label)?;
        median(&sluice_rates[i])
    };
    let mut costs = Vec::new();
    if let (Some(none), Some(every)) = (rate(HEAP_NONE), rate(HEAP_100MS)) {
        costs.push(format!("with heap state {:.1} %", 100.0 * every / none));
    }
    if let (Some(none), Some(every)) = (rate(REDB_NONE), rate(REDB_100MS)) {
        costs.push(format!("with redb state {:.1} %", 100.0 * every / none));
    }
    if !costs.is_empty() {
        table.push_str(&format!(
            "\nSluice's throughput checkpointed every 100 ms, as a share of its throughput without checkpoints: {}.\n",
            costs.join("; ")
        ));
    }
    println!("{table}");
    let stamp = chrono_like_stamp();
    let file = a.out.join(format!("vs-flink-{stamp}.md"));
    if let Err(e) = std::fs::create_dir_all(&a.out).and_then(|()| std::fs::write(&file, &table)) {
        eprintln!("vs_flink: cannot write {}: {e}", file.display());
        return ExitCode::FAILURE;
    }
    eprintln!("written to {}", file.display());
    ExitCode::SUCCESS
}

/// `2026-12-06T10-00-00Z` from the system clock.
fn chrono_like_stamp() -> String {
    humantime::format_rfc3339_seconds(std::time::SystemTime::now())
        .to_string()
        .replace(':', "-")
}
