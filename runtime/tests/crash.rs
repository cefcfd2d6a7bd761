//! Process crashes: the CLI runs as a child process on the redb state
//! backend and redb checkpoint storage, is killed with SIGKILL at random
//! moments, and resumes with `--resume` each time. The final state must be
//! exactly-once, no checkpoint reported complete before a kill may be
//! lost, and no file a committed checkpoint references may be deleted
//! (checkpoints are incremental, the CLI's default).
//!
//! `SLUICE_CRASH_KILLS=N` sets the number of kills (default 20);
//! `SLUICE_CRASH_SEED=S` the seed of the kill times (printed).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use sluice_backend_redb::RedbCheckpointStorage;
use sluice_runtime::testing::{file_ownership, FileOwnership};
use std::fs::File;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn sluice(
    dir: &Path,
    resume: bool,
    round: usize,
) -> (std::process::Child, std::path::PathBuf, std::path::PathBuf) {
    let out = dir.join(format!("out-{round}.txt"));
    let err = dir.join(format!("err-{round}.txt"));
    let storage = format!("redb:{}", dir.join("checkpoints.redb").display());
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
    cmd.args([
        "run",
        "keyed-sum",
        "--events",
        "8000000",
        "--keys",
        "10000",
        "--checkpoint-interval",
        "50ms",
        // Paced, so that 20 rounds of at most 0.9 s cannot finish the job
        // (at most 7.2 M of 8 M events) however fast the build is.
        "--rate",
        "400000",
    ])
    .args(["--storage", &storage])
    .arg("--state-dir")
    .arg(dir.join("state"))
    .stdout(Stdio::from(File::create(&out).unwrap()))
    .stderr(Stdio::from(File::create(&err).unwrap()));
    if resume {
        cmd.arg("--resume");
    }
    (cmd.spawn().expect("start sluice"), out, err)
}

/// The highest checkpoint id the process reported complete.
fn reported_complete(stderr: &str) -> Option<u64> {
    stderr
        .lines()
        .filter_map(|l| l.split("checkpoint ").nth(1))
        .filter_map(|rest| rest.split_once(" completed in ").map(|(id, _)| id))
        .filter_map(|id| id.trim().parse().ok())
        .max()
}

/// The newest committed checkpoint in the store, and which files of its
/// checkpoints are not referenced or missing.
async fn inspect_storage(path: &Path) -> (Option<u64>, FileOwnership) {
    let storage = RedbCheckpointStorage::open(path).expect("the store opens after a kill");
    let latest = sluice_core::storage::latest_completed(&storage)
        .await
        .expect("list")
        .map(|c| c.0);
    (latest, file_ownership(&storage).await.expect("checkpoint files"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_at_random_moments_and_resume_is_exactly_once_and_loses_no_reported_checkpoint() {
    let kills: usize = std::env::var("SLUICE_CRASH_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(20);
    let seed: u64 = std::env::var("SLUICE_CRASH_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    println!("crash test: {kills} kills, seed {seed} (replay with SLUICE_CRASH_SEED={seed})");
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let store = dir.path().join("checkpoints.redb");
    let mut killed = 0;
    let mut round = 0;
    let mut highest_reported = None;
    while killed < kills {
        let (mut child, _out, err) = sluice(dir.path(), round > 0, round);
        let wait = Duration::from_millis(rng.random_range(150..900));
        let started = Instant::now();
        let mut finished = false;
        while started.elapsed() < wait {
            if child.try_wait().unwrap().is_some() {
                finished = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if finished {
            panic!("seed {seed}: the job finished after {killed} kills; it must last longer than the kills");
        }
        child.kill().expect("SIGKILL");
        child.wait().unwrap();
        killed += 1;
        round += 1;
        let stderr = std::fs::read_to_string(&err).unwrap();
        let reported = reported_complete(&stderr);
        highest_reported = highest_reported.max(reported);
        let (latest, files) = inspect_storage(&store).await;
        assert!(
            latest >= highest_reported,
            "seed {seed}, kill {killed}: checkpoint {highest_reported:?} was reported complete, storage has only {latest:?}"
        );
        // Incremental checkpoints share files: a kill may leave files
        // behind (the next run removes them), never delete a needed one.
        assert!(
            files.missing.is_empty(),
            "seed {seed}, kill {killed}: files of committed checkpoints are gone: {:?}",
            files.missing
        );
    }
    // The last run resumes and completes.
    let (mut child, out, err) = sluice(dir.path(), true, round);
    let status = child.wait().unwrap();
    let stdout = std::fs::read_to_string(&out).unwrap();
    let stderr = std::fs::read_to_string(&err).unwrap();
    assert!(
        status.success(),
        "seed {seed}: final run failed\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("resumed from checkpoint"),
        "seed {seed}: the final run resumed:\n{stdout}"
    );
    assert!(
        stdout.contains("exactly-once: ok"),
        "seed {seed}:\n{stdout}\n{stderr}"
    );
    let (_, files) = inspect_storage(&store).await;
    assert!(
        files.is_exact(),
        "seed {seed}: after the final run, files left behind or missing: {files:?}"
    );
    println!("{killed} kills; highest checkpoint reported before a kill: {highest_reported:?}");
}

#[test]
fn reported_checkpoints_are_parsed_from_the_log() {
    let log = "2026 INFO checkpoint 3 completed in 5 ms: 10 bytes\n2026 WARN checkpoint 4 failed: x\n2026 INFO checkpoint 12 completed in 1 ms";
    assert_eq!(reported_complete(log), Some(12));
    assert_eq!(reported_complete("nothing"), None);
}
