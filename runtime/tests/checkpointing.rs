//! Checkpoint coordinator behaviour: asynchronous snapshots, aborts and
//! clean-up, timeouts, retention, id continuity, resume, triggers.

use sluice_backend_memory::{MemoryCheckpointStorage, MemoryStateBackend};
use sluice_core::CheckpointStorageExt;
use sluice_core::{CheckpointId, CheckpointStorage};
use sluice_runtime::prelude::*;
use sluice_runtime::testing::{file_ownership, FaultPlan, FaultyStorage};
use sluice_runtime::workload::{self, FinalSumSink, InjectedFailure, RunningSum};
use sluice_runtime::CheckpointStatus;
use std::sync::Arc;
use std::time::{Duration, Instant};

fn keyed_sum_job(name: &str, storage: Arc<dyn CheckpointStorage>, config: CheckpointConfig) -> Job {
    Job::new(name)
        .with_parallelism(2)
        .with_state_backend(Arc::new(MemoryStateBackend::new()))
        .with_checkpoint_storage(storage)
        .with_restart_strategy(RestartStrategy::FixedDelay {
            attempts: 5,
            delay: Duration::ZERO,
        })
        .with_checkpointing(config)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn snapshots_are_asynchronous_records_keep_flowing_while_a_slow_storage_write_runs() {
    let storage = Arc::new(FaultyStorage::new(
        Arc::new(MemoryCheckpointStorage::new()),
        FaultPlan {
            write_delay: Duration::from_secs(2),
            ..Default::default()
        },
    ));
    let job = keyed_sum_job("slow-storage", storage, CheckpointConfig::default());
    workload::keyed_sum(
        &job,
        u64::MAX / 2,
        1000,
        2,
        RunningSum::default(),
        DiscardSink::new(),
    )
    .unwrap();
    let handle = job.start().unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = handle.source_records();
    let started = Instant::now();
    let id = handle.trigger_checkpoint().await.expect("checkpoint completes");
    let took = started.elapsed();
    let during = handle.source_records() - before;
    handle.cancel();
    assert!(matches!(handle.wait().await, Err(RuntimeError::Cancelled)));
    assert_eq!(id, CheckpointId(1));
    assert!(
        took >= Duration::from_secs(2),
        "the storage write is slow: {took:?}"
    );
    // Processing went on while the state files were written: at least a
    // hundred thousand records passed during the two-second write (a
    // blocking snapshot would let none through).
    assert!(
        during > 100_000,
        "only {during} records flowed during a {took:?} checkpoint"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_state_write_aborts_that_checkpoint_removes_its_files_and_the_job_goes_on() {
    let inner = Arc::new(MemoryCheckpointStorage::new());
    let storage = Arc::new(FaultyStorage::new(
        inner.clone(),
        FaultPlan {
            fail_writes: vec![0, 1],
            ..Default::default()
        },
    ));
    let job = keyed_sum_job(
        "failed-write",
        storage.clone(),
        CheckpointConfig {
            retained: 10,
            ..CheckpointConfig::every(Duration::from_millis(5))
        },
    );
    let sink = FinalSumSink::new();
    job.source(
        "events",
        SequenceSource::new(20_000, 2, |i| (workload::key_of(i, 10), i)).paced(200, Duration::from_millis(1)),
        2,
    )
    .key_by(|(k, _)| *k)
    .process("running-sum", RunningSum::default())
    .sink(sink.clone())
    .unwrap();
    let handle = job.start().unwrap();
    let monitor = handle.monitor();
    let result = handle.wait().await.unwrap();
    assert_eq!(result.restarts, 0, "a failed checkpoint does not fail the job");
    assert!(storage.injected() >= 1);
    let stats = monitor.checkpoint_stats();
    assert!(
        matches!(&stats[0].status, CheckpointStatus::Failed(r) if r.contains("injected")),
        "{:?}",
        stats[0]
    );
    assert!(
        stats.iter().any(|s| s.status == CheckpointStatus::Completed),
        "later checkpoints complete"
    );
    // Partial files removed: every checkpoint file is a committed
    // checkpoint's or referenced by one (incremental chains share files).
    let files = file_ownership(inner.as_ref()).await.unwrap();
    assert!(files.is_exact(), "{files:?}");
    let listing = inner.list().await.unwrap();
    assert!(!listing.iter().any(|c| c.id == CheckpointId(1)));
    assert!(workload::verify(&sink.sums(), 20_000, 10).exactly_once());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_checkpoint_is_aborted_and_the_job_completes() {
    let inner = Arc::new(MemoryCheckpointStorage::new());
    let storage = Arc::new(FaultyStorage::new(
        inner.clone(),
        FaultPlan {
            write_delay: Duration::from_millis(300),
            delay_only: (0..4).collect(),
            ..Default::default()
        },
    ));
    let job = keyed_sum_job(
        "timeout",
        storage,
        CheckpointConfig {
            timeout: Duration::from_millis(50),
            tolerable_failures: 1000,
            ..CheckpointConfig::every(Duration::from_millis(20))
        },
    );
    job.source(
        "events",
        SequenceSource::new(20_000, 2, |i| (workload::key_of(i, 10), i)).paced(100, Duration::from_millis(1)),
        2,
    )
    .key_by(|(k, _)| *k)
    .process("running-sum", RunningSum::default())
    .sink(DiscardSink::new())
    .unwrap();
    let handle = job.start().unwrap();
    let monitor = handle.monitor();
    handle.wait().await.unwrap();
    let stats = monitor.checkpoint_stats();
    assert!(
        stats
            .iter()
            .any(|s| matches!(&s.status, CheckpointStatus::Failed(r) if r.contains("timed out"))),
        "{stats:?}"
    );
    assert!(
        stats.iter().any(|s| s.status == CheckpointStatus::Completed),
        "later checkpoints complete: {stats:?}"
    );
    let files = file_ownership(inner.as_ref()).await.unwrap();
    assert!(
        files.is_exact(),
        "files of timed-out checkpoints removed: {files:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_final_checkpoint_holds_every_keys_final_state_and_is_retried_when_it_fails() {
    let inner = Arc::new(MemoryCheckpointStorage::new());
    // Without periodic checkpoints, the only checkpoints are final ones: the
    // first one's state-file writes fail, the second attempt succeeds.
    let storage = Arc::new(FaultyStorage::new(
        inner.clone(),
        FaultPlan {
            fail_writes: vec![0],
            ..Default::default()
        },
    ));
    let job = keyed_sum_job("final", storage, CheckpointConfig::default());
    workload::keyed_sum(&job, 50_000, 777, 2, RunningSum::default(), DiscardSink::new()).unwrap();
    let handle = job.start().unwrap();
    let monitor = handle.monitor();
    let result = handle.wait().await.unwrap();
    let id = result.final_checkpoint.expect("a final checkpoint");
    assert_eq!(result.restarts, 0);
    let stats = monitor.checkpoint_stats();
    assert!(
        matches!(stats[0].status, CheckpointStatus::Failed(_)),
        "{stats:?}"
    );
    assert_eq!(stats.last().unwrap().status, CheckpointStatus::Completed);
    let sums = workload::final_sums(inner.as_ref(), id).await.unwrap();
    let v = workload::verify(&sums, 50_000, 777);
    assert!(v.exactly_once(), "{v:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retention_keeps_the_newest_completed_checkpoints_and_ids_continue_in_a_later_job() {
    let storage = Arc::new(MemoryCheckpointStorage::new());
    let config = CheckpointConfig {
        retained: 2,
        ..CheckpointConfig::every(Duration::from_millis(5))
    };
    let job = keyed_sum_job("retention", storage.clone(), config.clone());
    job.source(
        "events",
        SequenceSource::new(30_000, 2, |i| (workload::key_of(i, 10), i)).paced(200, Duration::from_millis(1)),
        2,
    )
    .key_by(|(k, _)| *k)
    .process("running-sum", RunningSum::default())
    .sink(DiscardSink::new())
    .unwrap();
    let first = job.execute().await.unwrap();
    assert!(first.completed_checkpoints >= 3, "{first:?}");
    let listing: Vec<_> = storage
        .list()
        .await
        .unwrap()
        .into_iter()
        .filter(|c| c.committed)
        .collect();
    assert_eq!(listing.len(), 2, "{listing:?}");
    let last = first.last_checkpoint.unwrap();
    assert_eq!(listing.last().unwrap().id, last);
    let files = file_ownership(storage.as_ref()).await.unwrap();
    assert!(
        files.is_exact(),
        "discarded checkpoints' files are gone unless retained ones share them: {files:?}"
    );

    // No periodic checkpoints: the triggered one is the job's first.
    let job = keyed_sum_job(
        "retention",
        storage.clone(),
        CheckpointConfig {
            interval: None,
            ..config
        },
    );
    job.source("events", SequenceSource::new(u64::MAX / 2, 1, |i| (i % 3, i)), 1)
        .key_by(|(k, _)| *k)
        .process("running-sum", RunningSum::default())
        .sink(DiscardSink::new())
        .unwrap();
    let handle = job.start().unwrap();
    let id = handle.trigger_checkpoint().await.unwrap();
    handle.cancel();
    let _ = handle.wait().await;
    assert_eq!(
        id,
        last.next(),
        "checkpoint ids continue after the highest in storage"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_job_resumes_from_the_latest_checkpoint_exactly_once() {
    let storage = Arc::new(MemoryCheckpointStorage::new());
    let sink = FinalSumSink::new();
    let events = 20_000;
    // First run: fails after some checkpoints and may not restart (a kill).
    let job = keyed_sum_job(
        "resume",
        storage.clone(),
        CheckpointConfig::every(Duration::from_millis(5)),
    )
    .with_restart_strategy(RestartStrategy::None);
    let failure = InjectedFailure::new(1, 4_000, true);
    job.source(
        "events",
        SequenceSource::new(events, 2, |i| (workload::key_of(i, 13), i)).paced(100, Duration::from_millis(1)),
        2,
    )
    .key_by(|(k, _)| *k)
    .process("running-sum", RunningSum::with_failures(vec![failure.clone()]))
    .sink(sink.clone())
    .unwrap();
    let err = job.execute().await.unwrap_err();
    assert!(matches!(err, RuntimeError::RestartsExhausted { .. }), "{err}");
    assert!(failure.fired());
    let before = sluice_core::storage::latest_completed(storage.as_ref())
        .await
        .unwrap()
        .expect("a checkpoint completed before the kill");

    // Second run: resumes.
    let job = keyed_sum_job(
        "resume",
        storage.clone(),
        CheckpointConfig::every(Duration::from_millis(5)),
    )
    .resume_from_latest_checkpoint(true);
    job.source(
        "events",
        SequenceSource::new(events, 2, |i| (workload::key_of(i, 13), i)).paced(100, Duration::from_millis(1)),
        2,
    )
    .key_by(|(k, _)| *k)
    .process("running-sum", RunningSum::default())
    .sink(sink.clone())
    .unwrap();
    let result = job.execute().await.unwrap();
    assert_eq!(result.resumed_from, Some(before));
    let v = workload::verify(&sink.sums(), events, 13);
    assert!(v.exactly_once(), "{v:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_strategy_none_fails_the_job_at_the_first_failure() {
    let job = keyed_sum_job(
        "none",
        Arc::new(MemoryCheckpointStorage::new()),
        CheckpointConfig::default(),
    )
    .with_restart_strategy(RestartStrategy::None);
    workload::keyed_sum(
        &job,
        10_000,
        1000,
        2,
        RunningSum::with_failures(vec![InjectedFailure::new(0, 10, false)]),
        DiscardSink::new(),
    )
    .unwrap();
    match job.execute().await {
        Err(RuntimeError::RestartsExhausted {
            attempts: 0, last, ..
        }) => {
            assert!(matches!(*last, RuntimeError::Injected(_)), "{last}")
        }
        other => panic!("expected the job to fail: {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_triggered_checkpoint_reports_statistics_and_its_metadata_names_every_operator() {
    let storage = Arc::new(MemoryCheckpointStorage::new());
    let job = keyed_sum_job("stats", storage.clone(), CheckpointConfig::default());
    workload::keyed_sum(
        &job,
        u64::MAX / 2,
        100,
        2,
        RunningSum::default(),
        DiscardSink::new(),
    )
    .unwrap();
    let handle = job.start().unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let id = handle.trigger_checkpoint().await.unwrap();
    let stats = handle.checkpoint_stats();
    handle.cancel();
    let _ = handle.wait().await;
    let s = stats.iter().find(|s| s.id == id).unwrap();
    assert_eq!(s.status, CheckpointStatus::Completed);
    assert!(s.state_size > 0);
    assert_eq!(
        s.alignment.len(),
        4,
        "one entry per task: 2 sources, 2 keyed with the sink chained: {s:?}"
    );
    let meta = sluice_core::metadata::read_checkpoint_metadata(storage.as_ref(), id)
        .await
        .unwrap();
    let uids: Vec<&str> = meta.operators.iter().map(|o| o.uid.as_str()).collect();
    assert_eq!(uids, ["events", "running-sum"]);
    let sum = meta
        .operators
        .iter()
        .find(|o| o.uid.as_str() == "running-sum")
        .unwrap();
    assert_eq!(sum.subtasks.len(), 2);
    let keys: u64 = sum
        .subtasks
        .iter()
        .map(|s| s.keyed_state.as_ref().unwrap().entries)
        .sum();
    assert_eq!(keys, 100, "every key's sum is in the checkpoint");
    let src = meta
        .operators
        .iter()
        .find(|o| o.uid.as_str() == "events")
        .unwrap();
    assert_eq!(src.subtasks.iter().map(|s| s.splits.len()).sum::<usize>(), 2);
}
