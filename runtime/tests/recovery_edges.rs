//! Exactly-once at the edges of recovery: a failure after a
//! stop-with-savepoint, commits whose answer is lost, retried or
//! unreadable, and hostile metadata from storage.

use sluice_backend_memory::{MemoryCheckpointStorage, MemoryStateBackend};
use sluice_core::CheckpointStorageExt;
use sluice_core::{CheckpointId, CheckpointStorage};
use sluice_runtime::file_sink::{read_committed_lines, FileSinkPoint};
use sluice_runtime::prelude::*;
use sluice_runtime::testing::{Fault, FaultPlan, FaultyStorage, Op, OpFault};
use sluice_runtime::workload::{self, check_sum_lines, values_by_key, RunningSum};
use sluice_runtime::{CheckpointStatus, FileSink, JobMonitor, RestoreSource, SavepointLocation};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

const KEYS: u64 = 50;

fn job(name: &str, storage: Arc<dyn CheckpointStorage>) -> Job {
    Job::new(name)
        .with_parallelism(2)
        .with_state_backend(Arc::new(MemoryStateBackend::new()))
        .with_checkpoint_storage(storage)
        .with_restart_strategy(RestartStrategy::FixedDelay {
            attempts: 3,
            delay: Duration::ZERO,
        })
        .with_checkpointing(CheckpointConfig {
            interval: None,
            retained: 5,
            ..Default::default()
        })
}

/// The reference workload into a transactional file sink in `dir`.
fn pipeline(job: &Job, events: u64, dir: &Path, sink: FileSink<(u64, u64)>) {
    let _ = dir;
    job.source(
        "events",
        SequenceSource::new(events, 2, |i| (workload::key_of(i, KEYS), i))
            .paced(50, Duration::from_millis(1)),
        2,
    )
    .key_by(|(k, _)| *k)
    .process("running-sum", RunningSum::default())
    .transactional_sink("out", sink)
    .unwrap();
}

fn status(m: &JobMonitor, id: CheckpointId) -> CheckpointStatus {
    m.checkpoint_stats()
        .into_iter()
        .find(|s| s.id == id)
        .map(|s| s.status)
        .expect("stats of the checkpoint")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failure_after_stop_with_savepoint_commits_nothing_twice_and_the_job_stays_stopped() {
    let events = 400_000;
    let dir = tempfile::tempdir().unwrap();
    let storage: Arc<dyn CheckpointStorage> = Arc::new(MemoryCheckpointStorage::new());
    // Subtask 0 of the sink fails right after its second commit: the first
    // is checkpoint 1's transaction, the second the stop-with-savepoint's.
    let commits = Arc::new(AtomicU64::new(0));
    let seen = commits.clone();
    let sink =
        FileSink::new(dir.path(), workload::sum_line).with_fault_hook(Arc::new(move |subtask, point| {
            if subtask == 0
                && point == FileSinkPoint::AfterCommit
                && seen.fetch_add(1, Ordering::SeqCst) + 1 == 2
            {
                return Err(RuntimeError::Injected(
                    "sink failure after committing the savepoint".into(),
                ));
            }
            Ok(())
        }));
    let j = job("stop-then-fail", storage.clone());
    pipeline(&j, events, dir.path(), sink);
    let handle = j.start().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let first = handle.trigger_checkpoint().await.expect("checkpoint 1");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let target = SavepointLocation::new(storage.clone(), "savepoints").unwrap();
    let sp = handle
        .stop_with_savepoint(target)
        .await
        .expect("stop-with-savepoint");
    let result = handle.wait().await.expect("the job ends");
    assert!(commits.load(Ordering::SeqCst) >= 2, "the sink failure fired");
    assert_eq!(result.restarts, 1, "{result:?}");
    assert_eq!(
        result.recoveries[0].restored_from,
        Some(sp.id),
        "the committed stop-with-savepoint is the restore point, not checkpoint {first}"
    );
    assert_eq!(result.stopped_with_savepoint.as_ref().map(|s| s.id), Some(sp.id));
    assert_eq!(result.final_checkpoint, None, "the restored job ended at once");
    // The committed output is exactly the records before the savepoint,
    // each once: nothing replayed and committed again, nothing after it.
    let meta = RestoreSource::open(&sp.location).await.unwrap().metadata;
    let before = workload::events_read(&meta, "events", events, 2);
    assert!((before.len() as u64) < events, "the job was stopped early");
    let lines = read_committed_lines(dir.path()).unwrap();
    assert_eq!(
        lines.len(),
        before.len(),
        "one committed line per record before the savepoint"
    );
    check_sum_lines(&lines, &values_by_key(before, KEYS)).unwrap();
}

/// Runs the reference workload into a transactional file sink over
/// `storage`, triggering two checkpoints by hand, and returns the monitor's
/// statistics, the ids, the committed lines and the job result.
async fn two_checkpoints(
    storage: Arc<dyn CheckpointStorage>,
    events: u64,
) -> (
    Vec<std::result::Result<CheckpointId, RuntimeError>>,
    JobMonitor,
    tempfile::TempDir,
    sluice_runtime::JobResult,
) {
    let dir = tempfile::tempdir().unwrap();
    let j = job("commits", storage);
    pipeline(
        &j,
        events,
        dir.path(),
        FileSink::new(dir.path(), workload::sum_line),
    );
    let handle = j.start().unwrap();
    let m = handle.monitor();
    let mut outcomes = Vec::new();
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(150)).await;
        outcomes.push(handle.trigger_checkpoint().await);
    }
    let result = handle.wait().await.expect("the job completes");
    (outcomes, m, dir, result)
}

fn faulty(faults: Vec<OpFault>) -> (Arc<FaultyStorage>, Arc<MemoryCheckpointStorage>) {
    let inner = Arc::new(MemoryCheckpointStorage::new());
    let storage = Arc::new(FaultyStorage::new(
        inner.clone(),
        FaultPlan {
            faults,
            ..Default::default()
        },
    ));
    (storage, inner)
}

fn exactly_once(dir: &tempfile::TempDir, events: u64) {
    let lines = read_committed_lines(dir.path()).unwrap();
    check_sum_lines(&lines, &values_by_key(0..events, KEYS)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_commit_answered_already_exists_by_a_retry_of_our_own_write_is_completed_and_kept() {
    let events = 60_000;
    let (storage, inner) = faulty(vec![OpFault::new(Op::Commit, 0, Fault::RetriedAfterEffect)]);
    let (outcomes, m, dir, _) = two_checkpoints(storage.clone(), events).await;
    assert!(storage.injected() > 0);
    let first = *outcomes[0]
        .as_ref()
        .expect("the landed commit counts as completed");
    assert_eq!(status(&m, first), CheckpointStatus::Completed);
    assert!(
        inner.read_metadata(first).await.is_ok(),
        "its metadata was not discarded"
    );
    exactly_once(&dir, events);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_indeterminate_commit_that_landed_is_completed() {
    let events = 60_000;
    let (storage, inner) = faulty(vec![OpFault::new(Op::Commit, 0, Fault::AfterEffect)]);
    let (outcomes, m, dir, _) = two_checkpoints(storage, events).await;
    let first = outcomes[0].as_ref().copied().expect("read back: committed");
    assert_eq!(status(&m, first), CheckpointStatus::Completed);
    assert!(inner.read_metadata(first).await.is_ok());
    exactly_once(&dir, events);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_commit_outcome_keeps_the_checkpoint_until_a_read_back_finds_it_committed() {
    let events = 60_000;
    // The commit lands but its answer is lost, and the read-back fails too.
    let (storage, inner) = faulty(vec![
        OpFault::new(Op::Commit, 0, Fault::AfterEffect),
        OpFault::new(Op::Read, 0, Fault::BeforeEffect),
    ]);
    let (outcomes, m, dir, result) = two_checkpoints(storage, events).await;
    let err = outcomes[0]
        .as_ref()
        .expect_err("not reported as completed while unknown");
    assert!(err.to_string().contains("unknown"), "{err}");
    let second = outcomes[1]
        .as_ref()
        .copied()
        .expect("the next checkpoint completes");
    let first = CheckpointId(second.0 - 1);
    assert_eq!(
        status(&m, first),
        CheckpointStatus::Completed,
        "a later read-back found it committed"
    );
    assert!(result.completed_checkpoints >= 3, "{result:?}");
    let _ = inner;
    exactly_once(&dir, events);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_commit_outcome_keeps_the_files_until_a_read_back_finds_nothing() {
    let events = 200_000;
    // The commit times out without effect, and the read-back fails.
    let (storage, inner) = faulty(vec![
        OpFault::new(Op::Commit, 0, Fault::Timeout),
        OpFault::new(Op::Read, 0, Fault::BeforeEffect),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let j = job("unknown-missing", storage.clone());
    pipeline(
        &j,
        events,
        dir.path(),
        FileSink::new(dir.path(), workload::sum_line),
    );
    let handle = j.start().unwrap();
    let m = handle.monitor();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let err = handle.trigger_checkpoint().await.expect_err("unknown outcome");
    assert!(err.to_string().contains("unknown"), "{err}");
    let first = m.checkpoint_stats().last().unwrap().id;
    assert!(matches!(status(&m, first), CheckpointStatus::Unresolved(_)));
    assert!(
        !inner.list_files(&first.dir()).await.unwrap().is_empty(),
        "the files of a checkpoint whose commit is undecided are kept"
    );
    let second = handle
        .trigger_checkpoint()
        .await
        .expect("the next checkpoint completes");
    assert!(second > first);
    assert!(
        matches!(status(&m, first), CheckpointStatus::Failed(_)),
        "the read-back found nothing: {:?}",
        status(&m, first)
    );
    assert!(
        inner.list_files(&first.dir()).await.unwrap().is_empty(),
        "then its files were removed"
    );
    handle.wait().await.expect("the job completes");
    exactly_once(&dir, events);
}

/// Takes an intermediate savepoint of the reference workload writing into a
/// transactional file sink (its metadata holds the sink's pre-committed,
/// uncommitted transaction), cancels the job, and returns the storage and
/// the savepoint's directory.
async fn savepoint_with_pending_transaction(sink_dir: &Path) -> (Arc<dyn CheckpointStorage>, String) {
    let storage: Arc<dyn CheckpointStorage> = Arc::new(MemoryCheckpointStorage::new());
    let j = job("hostile", storage.clone());
    pipeline(
        &j,
        1_000_000,
        sink_dir,
        FileSink::new(sink_dir, workload::sum_line),
    );
    let handle = j.start().unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sp = handle
        .trigger_savepoint(SavepointLocation::new(storage.clone(), "sp").unwrap())
        .await
        .expect("savepoint");
    handle.cancel();
    let _ = handle.wait().await;
    (storage, sp.location.dir)
}

/// Copies savepoint `from` to `to` in the same storage with its metadata
/// JSON changed by `edit`.
async fn tampered_copy(
    storage: &Arc<dyn CheckpointStorage>,
    from: &str,
    to: &str,
    edit: impl FnOnce(&mut serde_json::Value),
) -> SavepointLocation {
    for f in storage.list_files(from).await.unwrap() {
        let name = f.path.strip_prefix(&format!("{from}/")).unwrap();
        if name != "_metadata" {
            let bytes = storage.read_file(&f.path).await.unwrap();
            storage.write_file(&format!("{to}/{name}"), bytes).await.unwrap();
        }
    }
    let mut meta: serde_json::Value =
        serde_json::from_slice(&storage.read_file(&format!("{from}/_metadata")).await.unwrap()).unwrap();
    edit(&mut meta);
    storage
        .commit_file(
            &format!("{to}/_metadata"),
            serde_json::to_vec(&meta).unwrap().into(),
        )
        .await
        .unwrap();
    SavepointLocation::new(storage.clone(), to).unwrap()
}

fn operator<'a>(meta: &'a mut serde_json::Value, uid: &str) -> &'a mut serde_json::Value {
    meta["operators"]
        .as_array_mut()
        .unwrap()
        .iter_mut()
        .find(|o| o["uid"] == uid)
        .unwrap()
}

async fn start_from(location: SavepointLocation, sink_dir: &Path) -> RuntimeError {
    let j = job("restored", Arc::new(MemoryCheckpointStorage::new())).from_savepoint(location);
    pipeline(
        &j,
        1_000_000,
        sink_dir,
        FileSink::new(sink_dir, workload::sum_line),
    );
    j.execute().await.expect_err("refused")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_transaction_naming_a_file_outside_the_sink_directory_is_corrupt_metadata_and_touches_nothing()
{
    let root = tempfile::tempdir().unwrap();
    let sink_dir = root.path().join("out");
    let (storage, sp) = savepoint_with_pending_transaction(&sink_dir).await;
    // A file outside the sink's directory that a hostile part name points at.
    let victim = root.path().join("victim");
    std::fs::write(root.path().join("victim.inprogress"), b"not the sink's").unwrap();
    for (n, bad) in ["./../victim", "/etc/passwd", "part-0-zz-0"]
        .into_iter()
        .enumerate()
    {
        let loc = tampered_copy(&storage, &sp, &format!("bad-{n}"), |meta| {
            let out = operator(meta, "out");
            let st = out["subtasks"]
                .as_array_mut()
                .unwrap()
                .iter_mut()
                .find(|s| {
                    s["operator_state"]["pending"]
                        .as_array()
                        .is_some_and(|p| !p.is_empty())
                })
                .expect("a pending transaction");
            st["operator_state"]["pending"][0]["txn"]["parts"][0] = serde_json::Value::from(bad);
        })
        .await;
        let err = start_from(loc, &sink_dir).await;
        let msg = err.to_string();
        assert!(
            matches!(err, RuntimeError::Storage(sluice_core::Error::Corrupt { .. })),
            "{bad}: {msg}"
        );
        assert!(
            msg.contains(&format!("bad-{n}/_metadata")),
            "names the metadata file: {msg}"
        );
        assert!(msg.contains("sink out"), "names the sink: {msg}");
    }
    assert!(
        root.path().join("victim.inprogress").exists(),
        "nothing outside was renamed"
    );
    assert!(!victim.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_group_ranges_that_are_inverted_out_of_range_or_leave_a_gap_are_refused_before_the_job_starts() {
    let root = tempfile::tempdir().unwrap();
    let sink_dir = root.path().join("out");
    let (storage, sp) = savepoint_with_pending_transaction(&sink_dir).await;
    let cases: [(u64, u64, &str); 3] = [
        (127, 64, "start must not exceed end"),
        (64, 300, "[64, 300]"),
        (70, 127, "leave out"),
    ];
    for (n, (start, end, says)) in cases.into_iter().enumerate() {
        let loc = tampered_copy(&storage, &sp, &format!("kg-{n}"), |meta| {
            let sum = operator(meta, "running-sum");
            let st = &mut sum["subtasks"][1]["keyed_state"]["key_groups"];
            st["start"] = start.into();
            st["end"] = end.into();
        })
        .await;
        let err = start_from(loc, &sink_dir).await;
        let msg = err.to_string();
        assert!(
            matches!(err, RuntimeError::Storage(sluice_core::Error::Corrupt { .. })),
            "{msg}"
        );
        assert!(
            msg.contains(&format!("kg-{n}/_metadata")) && msg.contains(says),
            "{msg}"
        );
    }
}
