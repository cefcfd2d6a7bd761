//! The exactly-once harness extended to sinks: the reference workload and a
//! two-input job write every emitted `(key, running sum)` through the
//! transactional file sink while failures are injected at random points —
//! task errors and panics, failing state writes and metadata commits, a
//! job-master crash before a commit, and sink failures before a
//! pre-commit, between pre-commit and commit, and in the middle of a
//! commit (between the renames of a transaction's parts). The committed
//! files must hold every expected line exactly once; in at-least-once mode
//! the same harness shows duplicates.
//!
//! Storage faults are drawn from every kind ([`Fault`]) on writes, commits,
//! reads and deletions: failures before any effect, effects whose answer
//! is lost (indeterminate), effects followed by a retry that answers
//! `AlreadyExists`, timeouts, slowness. No file a retained checkpoint
//! references may be missing afterwards. Checkpoints are incremental
//! (chains of one to three changes files) in three cases of four.
//!
//! `SLUICE_EO_SEEDS=N` scales the number of seeds (default 400: 200 keyed
//! schedules and 100 two-input schedules per mode, 600 in all);
//! `SLUICE_EO_SEED=S` runs one seed.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rustc_hash::FxHashMap;
use sluice_backend_memory::{MemoryCheckpointStorage, MemoryStateBackend};
use sluice_core::CheckpointStorage;
use sluice_runtime::file_sink::{read_committed_lines, FileSinkHook, FileSinkPoint};
use sluice_runtime::prelude::*;
use sluice_runtime::testing::{
    file_ownership, CrashBeforeCommit, Fault, FaultPlan, FaultyStorage, Op, OpFault,
};
use sluice_runtime::workload::{self, InjectedFailure, RunningSum, TwoInputSum};
use sluice_runtime::{FileSink, IncrementalPolicy};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const EVENTS: u64 = 6_000;
/// Many keys, so that a checkpoint interval changes few of them: the
/// later checkpoints of a run are changes files (incremental chains).
const KEYS: u64 = 100_000;

fn seeds() -> Vec<u64> {
    if let Ok(s) = std::env::var("SLUICE_EO_SEED") {
        return vec![s.parse().expect("SLUICE_EO_SEED must be a number")];
    }
    let n = std::env::var("SLUICE_EO_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(400u64);
    (0..n).collect()
}

/// Which checkpoints a case takes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Aligned,
    Unaligned,
}

/// A sink failure: at the `nth` time subtask `subtask` reaches `point`.
#[derive(Debug, Clone, Copy)]
struct SinkFault {
    subtask: u32,
    point: FileSinkPoint,
    nth: u64,
    panic: bool,
}

#[derive(Debug, Default)]
struct Faults {
    task_failures: Vec<(u32, u64, bool)>,
    plan: FaultPlan,
    crash_before_commit: Vec<u64>,
    sink: Vec<SinkFault>,
    /// Incremental checkpoints (with a chain length drawn too) or full ones.
    incremental: Option<IncrementalPolicy>,
}

fn draw(rng: &mut StdRng, parallelism: u32, per_subtask: u64) -> Faults {
    let mut f = Faults {
        incremental: match rng.random_range(0..4) {
            0 => None,
            chain => Some(IncrementalPolicy {
                max_chain: chain,
                max_changes_ratio: 1.0,
            }),
        },
        ..Faults::default()
    };
    // At least one sink fault in every case: the sink path is what this tests.
    let point = match rng.random_range(0..4) {
        0 => FileSinkPoint::BeforePreCommit,
        1 => FileSinkPoint::AfterPreCommit,
        2 => FileSinkPoint::CommitPart(0),
        _ => FileSinkPoint::CommitPart(1),
    };
    f.sink.push(SinkFault {
        subtask: rng.random_range(0..parallelism),
        point,
        nth: rng.random_range(1..6),
        panic: rng.random_bool(0.3),
    });
    for _ in 0..rng.random_range(0..=3) {
        match rng.random_range(0..7) {
            0 => f.task_failures.push((
                rng.random_range(0..parallelism),
                rng.random_range(1..per_subtask),
                rng.random_bool(0.5),
            )),
            1 => f.crash_before_commit.push(rng.random_range(1..8)),
            // Storage faults of every kind, on every kind of operation:
            // state-file writes, metadata commits, reads (restores and
            // read-backs of ambiguous commits), deletions.
            2 | 3 => f.plan.faults.push(OpFault::new(
                Op::Commit,
                rng.random_range(0..6),
                Fault::random(rng),
            )),
            4 => f.plan.faults.push(OpFault::new(
                Op::Write,
                rng.random_range(0..12),
                Fault::random(rng),
            )),
            5 => f
                .plan
                .faults
                .push(OpFault::new(Op::Read, rng.random_range(0..8), Fault::random(rng))),
            _ => f.plan.faults.push(OpFault::new(
                Op::Delete,
                rng.random_range(0..6),
                Fault::random(rng),
            )),
        }
    }
    f
}

/// Fires each sink fault once.
fn hook(faults: &[SinkFault]) -> FileSinkHook {
    let faults: Vec<(SinkFault, AtomicU64)> = faults.iter().map(|f| (*f, AtomicU64::new(0))).collect();
    Arc::new(move |subtask, point| {
        for (f, seen) in &faults {
            if f.subtask == subtask && f.point == point {
                let n = seen.fetch_add(1, Ordering::Relaxed) + 1;
                if n == f.nth {
                    if f.panic {
                        panic!("injected sink panic at {point:?} in subtask {subtask}");
                    }
                    return Err(RuntimeError::Injected(format!(
                        "sink failure at {point:?} in subtask {subtask}"
                    )));
                }
            }
        }
        Ok(())
    })
}

/// The storages of the cases that ran (their injected-fault counts are
/// reported).
static CASES: std::sync::Mutex<Vec<Arc<FaultyStorage>>> = std::sync::Mutex::new(Vec::new());

/// Storage faults injected by the cases so far.
fn storage_faults_injected() -> u64 {
    CASES.lock().unwrap().iter().map(|s| s.injected()).sum()
}

/// The job of a case, and its checkpoint storage without the faults (to
/// check its files afterwards).
fn job(
    seed: u64,
    faults: &Faults,
    parallelism: u32,
    mode: Mode,
    at_least_once: bool,
) -> (Job, Arc<dyn CheckpointStorage>) {
    let inner: Arc<dyn CheckpointStorage> = Arc::new(MemoryCheckpointStorage::new());
    let storage = Arc::new(FaultyStorage::new(inner.clone(), faults.plan.clone()));
    CASES.lock().unwrap().push(storage.clone());
    let job = Job::new(format!("eo-sink-{seed}"))
        .with_parallelism(parallelism)
        .with_state_backend(Arc::new(MemoryStateBackend::new()))
        .with_checkpoint_storage(storage)
        .with_restart_strategy(RestartStrategy::FixedDelay {
            attempts: 20,
            delay: Duration::ZERO,
        })
        .with_commit_hook(Arc::new(CrashBeforeCommit::new(
            faults.crash_before_commit.clone(),
        )))
        .with_checkpointing(CheckpointConfig {
            interval: Some(Duration::from_millis(3)),
            mode: if at_least_once {
                CheckpointingMode::AtLeastOnce
            } else {
                CheckpointingMode::ExactlyOnce
            },
            unaligned: mode == Mode::Unaligned,
            tolerable_failures: 20,
            retained: 2,
            incremental: faults.incremental,
            ..Default::default()
        });
    (job, inner)
}

/// Every file a retained checkpoint references is there (deletions fail
/// at random here, so files may be left behind, but none may go early).
async fn no_file_missing(seed: u64, storage: &dyn CheckpointStorage, faults: &Faults) {
    let files = file_ownership(storage).await.unwrap();
    assert!(
        files.missing.is_empty(),
        "seed {seed}: files of retained checkpoints deleted: {:?} (faults {faults:?}); replay with SLUICE_EO_SEED={seed}",
        files.missing
    );
}

fn sink(dir: &Path, faults: &Faults) -> FileSink<(u64, u64)> {
    FileSink::new(dir, workload::sum_line)
        .with_max_part_bytes(1024)
        .with_fault_hook(hook(&faults.sink))
}

fn in_progress_left(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".inprogress"))
        .collect()
}

fn parse(lines: &[String]) -> FxHashMap<u64, Vec<u64>> {
    let mut sums: FxHashMap<u64, Vec<u64>> = FxHashMap::default();
    for l in lines {
        let (k, s) = l.split_once(' ').expect("a line is `key sum`");
        sums.entry(k.parse().unwrap())
            .or_default()
            .push(s.parse().unwrap());
    }
    sums
}

fn injected(faults: &Faults) -> Vec<Arc<InjectedFailure>> {
    faults
        .task_failures
        .iter()
        .map(|(s, at, p)| InjectedFailure::new(*s, *at, *p))
        .collect()
}

/// Slows the task it is chained into now and then, so that records queue
/// up on its inputs and unaligned checkpoints have channel state to store.
fn lagging<T>(r: T) -> T {
    static SEEN: AtomicU64 = AtomicU64::new(0);
    if SEEN.fetch_add(1, Ordering::Relaxed) % 256 == 0 {
        tokio::task::block_in_place(|| std::thread::sleep(Duration::from_millis(1)));
    }
    r
}

struct Case {
    lines: Vec<String>,
    left: Vec<String>,
    faults: Faults,
    result: sluice_runtime::JobResult,
    /// Checkpoints that stored records in flight.
    with_channel_state: usize,
}

async fn keyed_case(seed: u64, mode: Mode) -> Case {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x51_4b);
    let parallelism = rng.random_range(1..=3);
    let faults = draw(&mut rng, parallelism, EVENTS / u64::from(parallelism));
    let dir = tempfile::tempdir().unwrap();
    let (j, storage) = job(seed, &faults, parallelism, mode, false);
    j.source(
        "events",
        SequenceSource::new(EVENTS, parallelism, move |i| (workload::key_of(i, KEYS), i))
            .paced(100, Duration::from_millis(1)),
        parallelism,
    )
    .key_by(|(k, _)| *k)
    .process("running-sum", RunningSum::with_failures(injected(&faults)))
    .set_parallelism(parallelism)
    .map(lagging)
    .transactional_sink("out", sink(dir.path(), &faults))
    .unwrap();
    let handle = j.start().unwrap();
    let monitor = handle.monitor();
    let result = handle
        .wait()
        .await
        .unwrap_or_else(|e| panic!("seed {seed} ({mode:?}): job failed: {e} (faults {faults:?})"));
    no_file_missing(seed, storage.as_ref(), &faults).await;
    let with_channel_state = monitor
        .checkpoint_stats()
        .iter()
        .filter(|s| s.channel_state_size > 0)
        .count();
    Case {
        lines: read_committed_lines(dir.path()).unwrap(),
        left: in_progress_left(dir.path()),
        faults,
        result,
        with_channel_state,
    }
}

async fn keyed_harness(mode: Mode) {
    let values = workload::values_by_key(0..EVENTS, KEYS);
    let seeds = seeds();
    let (mut restarted, mut sink_failures, mut channel_state) = (0, 0, 0);
    for &seed in seeds.iter().take(seeds.len().div_ceil(2)) {
        let Case {
            lines,
            left,
            faults,
            result,
            with_channel_state,
        } = keyed_case(seed, mode).await;
        channel_state += u64::from(with_channel_state > 0);
        if let Err(e) = workload::check_sum_lines(&lines, &values) {
            panic!(
                "seed {seed} ({mode:?}): committed output is not exactly-once: {e}; {} lines for {EVENTS} records \
                 (faults {faults:?}); replay with SLUICE_EO_SEED={seed}",
                lines.len()
            );
        }
        assert!(left.is_empty(), "seed {seed}: in-progress files left: {left:?}");
        restarted += u64::from(result.restarts > 0);
        sink_failures += u64::from(result.recoveries.iter().any(|r| r.cause.contains("sink")));
    }
    println!(
        "{mode:?}: {} keyed schedules, 0 divergences; {restarted} restarted, {sink_failures} after a sink failure, \
         {channel_state} with channel state; {} storage faults injected by this binary so far",
        seeds.len().div_ceil(2),
        storage_faults_injected()
    );
    if mode == Mode::Unaligned && seeds.len() >= 50 {
        assert!(
            channel_state * 4 >= seeds.len() as u64 / 2,
            "unaligned checkpoints stored records in flight in {channel_state} cases only"
        );
    }
    if seeds.len() >= 50 {
        assert!(
            sink_failures * 4 >= seeds.len() as u64 / 2,
            "sink failures fired in {sink_failures} cases only"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_sink_output_is_exactly_once_under_random_failures_aligned() {
    keyed_harness(Mode::Aligned).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_sink_output_is_exactly_once_under_random_failures_unaligned() {
    keyed_harness(Mode::Unaligned).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_least_once_file_sink_shows_duplicates_under_the_same_harness() {
    let values = workload::values_by_key(0..EVENTS, KEYS);
    let mut duplicated = 0;
    for seed in 0..40u64 {
        let mut rng = StdRng::seed_from_u64(seed);
        let faults = Faults {
            task_failures: vec![(rng.random_range(0..2), rng.random_range(500..EVENTS / 2), false)],
            ..Default::default()
        };
        let dir = tempfile::tempdir().unwrap();
        let (j, _) = job(seed, &faults, 2, Mode::Aligned, true);
        workload::keyed_sum(
            &j,
            EVENTS,
            KEYS,
            2,
            RunningSum::with_failures(injected(&faults)),
            sink(dir.path(), &faults).at_least_once(),
        )
        .unwrap();
        j.execute().await.unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        let lines = read_committed_lines(dir.path()).unwrap();
        // Nothing lost: every record emitted at least one line.
        for (k, sums) in parse(&lines) {
            assert!(
                sums.len() >= values[&k].len(),
                "seed {seed}: key {k} lost records"
            );
        }
        if workload::check_sum_lines(&lines, &values).is_err() {
            assert!(
                lines.len() as u64 > EVENTS,
                "seed {seed}: not exactly-once, yet nothing duplicated"
            );
            duplicated += 1;
            if duplicated >= 3 {
                break;
            }
        }
    }
    assert!(
        duplicated > 0,
        "at-least-once never duplicated: the harness cannot tell the modes apart"
    );
}

async fn two_input_harness(mode: Mode) {
    let mut values = workload::values_by_key(0..EVENTS, KEYS);
    for i in 0..EVENTS {
        values
            .entry(workload::key_of(i * 7 + 1, KEYS))
            .or_default()
            .push(2 * i);
    }
    let seeds = seeds();
    for &seed in seeds.iter().take(seeds.len().div_ceil(4)) {
        let mut rng = StdRng::seed_from_u64(seed ^ 0x2_1f);
        let parallelism = rng.random_range(1..=3);
        let faults = draw(&mut rng, parallelism, EVENTS / u64::from(parallelism));
        let dir = tempfile::tempdir().unwrap();
        let (j, storage) = job(seed, &faults, parallelism, mode, false);
        let a = j
            .source(
                "a",
                SequenceSource::new(EVENTS, 2, move |i| (workload::key_of(i, KEYS), i))
                    .paced(100, Duration::from_millis(1)),
                2,
            )
            .key_by(|(k, _)| *k);
        let b = j
            .source(
                "b",
                SequenceSource::new(EVENTS, 1, move |i| (workload::key_of(i * 7 + 1, KEYS), i))
                    .paced(150, Duration::from_millis(1)),
                1,
            )
            .key_by(|(k, _)| *k);
        a.connect(b)
            .process("two-input-sum", TwoInputSum::with_failures(injected(&faults)))
            .set_parallelism(parallelism)
            .map(lagging)
            .transactional_sink("out", sink(dir.path(), &faults))
            .unwrap();
        j.execute().await.unwrap_or_else(|e| {
            panic!("seed {seed} ({mode:?}): two-input job failed: {e} (faults {faults:?})")
        });
        no_file_missing(seed, storage.as_ref(), &faults).await;
        let lines = read_committed_lines(dir.path()).unwrap();
        if let Err(e) = workload::check_sum_lines(&lines, &values) {
            panic!(
                "seed {seed} ({mode:?}): two-input output is not exactly-once: {e} (faults {faults:?}); replay with \
                 SLUICE_EO_SEED={seed}"
            );
        }
        assert!(
            in_progress_left(dir.path()).is_empty(),
            "seed {seed}: in-progress files left"
        );
    }
    println!(
        "{mode:?}: {} two-input schedules, 0 divergences; {} storage faults injected by this binary so far",
        seeds.len().div_ceil(4),
        storage_faults_injected()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_input_file_sink_output_is_exactly_once_under_random_failures_aligned() {
    two_input_harness(Mode::Aligned).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_input_file_sink_output_is_exactly_once_under_random_failures_unaligned() {
    two_input_harness(Mode::Unaligned).await;
}
