//! State larger than memory (`sluice_bench::large`): the redb state
//! backend with tens of millions of keys, 1 % of them changed per
//! checkpoint interval, full against incremental checkpoints into a
//! directory storage; each run in its own process (its peak memory is its
//! own). Prints a Markdown table and writes it to
//! `<out>/large-state-<stamp>.md`.
//!
//! ```text
//! cargo run --release -p sluice-bench --bin large_state -- [--keys 50000000] [--hot-events 200000000] [--interval-ms 1000] [--dir /tmp/sluice-large] [--keep]
//! ```
//!
//! Disk: about 150 bytes per key (the load's checkpoint, the redb state and
//! the run's checkpoints), removed at the end. About 10 minutes at 50 M keys.

use clap::Parser;
use sluice_bench::large::{self, Config, Measured};
use std::fmt::Write;
use std::path::PathBuf;
use std::process::{Command, ExitCode};

#[derive(Parser)]
struct Args {
    /// Keys of the state.
    #[arg(long, default_value_t = 50_000_000)]
    keys: u64,
    /// Hot-set events after the restore.
    #[arg(long, default_value_t = 200_000_000)]
    hot_events: u64,
    /// Checkpoint interval, ms.
    #[arg(long, default_value_t = 1_000)]
    interval_ms: u64,
    /// Working directory (on a disk with room for the state).
    #[arg(long, default_value = "/tmp/sluice-large")]
    dir: PathBuf,
    /// Where the report goes.
    #[arg(long, default_value = "bench/results")]
    out: PathBuf,
    /// Keep the load's checkpoint in `--dir` for later runs (a later run
    /// with the same `--dir` and `--keys` reuses it instead of loading).
    #[arg(long)]
    keep: bool,
    /// Checkpoint storage of the measured runs: `fs` (a directory) or
    /// `memory` (tells the storage's cost from the rest; peak RSS then
    /// includes the checkpoints).
    #[arg(long, default_value = "fs")]
    storage: String,
    /// Internal: run one configuration (JSON) and print its result.
    #[arg(long, hide = true)]
    child: Option<String>,
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

fn mb(b: u64) -> String {
    format!("{:.1} MB", b as f64 / 1e6)
}

fn main() -> ExitCode {
    sluice_runtime::limit_allocator_retention();
    let a = Args::parse();
    if let Some(json) = a.child {
        let c: Config = serde_json::from_str(&json).expect("configuration");
        let r = runtime().block_on(large::run(&c)).map_err(|e| e.to_string());
        println!("{}", serde_json::to_string(&r).expect("json"));
        return ExitCode::SUCCESS;
    }
    let load_root = a.dir.join("load");
    let keys_file = a.dir.join("load-keys");
    // `<keys> <checkpoint dir>` of a kept load.
    let kept = std::fs::read_to_string(&keys_file).ok().and_then(|s| {
        s.split_once(' ')
            .filter(|(k, _)| *k == a.keys.to_string())
            .map(|(_, d)| d.to_string())
    });
    let (load_dir, load_s) = match kept {
        Some(dir) => {
            eprintln!("reusing the load checkpoint {dir} in {}", load_root.display());
            (dir, 0.0)
        }
        None => {
            let _ = std::fs::remove_dir_all(&a.dir);
            std::fs::create_dir_all(&a.dir).expect("working directory");
            eprintln!("loading {} keys (memory state) into a full checkpoint …", a.keys);
            let (location, load_s) = runtime()
                .block_on(large::load(a.keys, &load_root))
                .expect("load job");
            std::fs::write(&keys_file, format!("{} {}", a.keys, location.dir)).expect("working directory");
            (location.dir.clone(), load_s)
        }
    };
    let load_bytes: u64 = std::fs::read_dir(load_root.join(&load_dir))
        .map(|d| {
            d.flatten()
                .filter_map(|e| e.metadata().ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0);
    eprintln!("loaded in {load_s:.1} s: {} in {load_dir}", mb(load_bytes));
    let exe = std::env::current_exe().expect("own path");
    let mut rows: Vec<(bool, Result<Measured, String>)> = Vec::new();
    for incremental in [false, true] {
        let work = a.dir.join(if incremental { "incremental" } else { "full" });
        let c = Config {
            keys: a.keys,
            hot_events: a.hot_events,
            interval_ms: a.interval_ms,
            incremental,
            load_root: load_root.clone(),
            load_dir: load_dir.clone(),
            work: work.clone(),
            storage: a.storage.clone(),
        };
        eprintln!(
            "running with {} checkpoints …",
            if incremental { "incremental" } else { "full" }
        );
        let out = Command::new(&exe)
            .arg("--child")
            .arg(serde_json::to_string(&c).expect("json"))
            .output()
            .expect("child process");
        let r: Result<Measured, String> = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
            Err(format!(
                "child failed ({e}): {}",
                String::from_utf8_lossy(&out.stderr)
            ))
        });
        eprintln!("{r:?}");
        rows.push((incremental, r));
        let _ = std::fs::remove_dir_all(&work);
    }
    if !a.keep {
        let _ = std::fs::remove_dir_all(&a.dir);
    }
    let mut md = String::new();
    let _ = writeln!(
        md,
        "{} keys in the redb state backend (parallelism 2, default memory budget), restored from a full \
         checkpoint of {} loaded in {load_s:.1} s; then {} events over a hot set of 1 % of the keys, a checkpoint \
         every {} ms into {} storage (each interval changes about 1 % of the keys), one injected \
         failure at 80 % and recovery from the latest checkpoint.\n",
        a.keys,
        mb(load_bytes),
        a.hot_events,
        a.interval_ms,
        if a.storage == "memory" { "the memory" } else { "a directory" }
    );
    md.push_str(
        "| checkpoints | restore of the whole state | hot-set throughput | checkpoints taken | duration p50 | max | \
         sync / async p50 | written p50 | state size | recovery (files read) | peak RSS | redb files |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    let mut failed = false;
    for (incremental, r) in &rows {
        let kind = if *incremental { "incremental" } else { "full" };
        match r {
            Ok(m) => {
                let _ = writeln!(
                    md,
                    "| {kind} | {:.1} s | {:.2} M ev/s | {} | {:.0} ms | {:.0} ms | {:.0} / {:.0} ms | {} | {} | {} | {} | {} |",
                    m.restore_ms / 1e3,
                    m.events_per_s / 1e6,
                    m.checkpoints,
                    m.checkpoint_p50_ms,
                    m.checkpoint_max_ms,
                    m.sync_p50_ms,
                    m.async_p50_ms,
                    mb(m.written_p50),
                    mb(m.state_size),
                    m.recovery_ms
                        .map_or("-".into(), |r| format!("{:.1} s ({})", r / 1e3, m.recovered_files)),
                    mb(m.peak_rss_bytes),
                    mb(m.redb_bytes),
                );
            }
            Err(e) => {
                failed = true;
                let _ = writeln!(md, "| {kind} | failed: {} |", e.replace('\n', " "));
            }
        }
    }
    if let [(_, Ok(full)), (_, Ok(inc))] = rows.as_slice() {
        let _ = writeln!(
            md,
            "\nIncremental against full: bytes written {:.1} %, checkpoint duration p50 {:.1} %.",
            inc.written_p50 as f64 * 100.0 / full.written_p50.max(1) as f64,
            inc.checkpoint_p50_ms * 100.0 / full.checkpoint_p50_ms.max(1e-9)
        );
    }
    println!("{md}");
    let stamp = humantime::format_rfc3339_seconds(std::time::SystemTime::now())
        .to_string()
        .replace(':', "-");
    let _ = std::fs::create_dir_all(&a.out);
    let path = a.out.join(format!("large-state-{stamp}.md"));
    if let Err(e) = std::fs::write(&path, &md) {
        eprintln!("could not write {}: {e}", path.display());
    } else {
        eprintln!("wrote {}", path.display());
    }
    if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
