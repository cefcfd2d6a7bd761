//! A job spread over workers (issue 15), in one test process: a job master
//! with a `WorkerPool` and workers started with `Job::start_worker`, every
//! control message and channel over TCP on 127.0.0.1, the checkpoint
//! storage shared. A worker "killed" here is aborted whole: its sockets
//! close as a killed process's would. (`cluster_processes.rs` runs real
//! processes.)

use sluice_backend_memory::{MemoryCheckpointStorage, MemoryStateBackend};
use sluice_core::CheckpointStorage;
use sluice_runtime::cluster::{WorkerOptions, WorkerPool};
use sluice_runtime::prelude::*;
use sluice_runtime::workload::{self, key_of, RunningSum};
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

const KEYS: u64 = 1000;

/// The reference workload, built the same way by the job master and every
/// worker.
fn job(storage: Arc<dyn CheckpointStorage>, events: u64, parallelism: u32, paced: bool) -> Job {
    let job = Job::new("cluster")
        .with_parallelism(parallelism)
        .with_state_backend(Arc::new(MemoryStateBackend::new()))
        .with_checkpoint_storage(storage)
        .with_restart_strategy(RestartStrategy::FixedDelay {
            attempts: 10,
            delay: Duration::ZERO,
        })
        .with_checkpointing(CheckpointConfig::every(Duration::from_millis(100)));
    let mut source = SequenceSource::new(events, parallelism, |i| (key_of(i, KEYS), i));
    if paced {
        source = source.paced(1000, Duration::from_millis(5));
    }
    job.source("events", source, parallelism)
        .key_by(|(k, _)| *k)
        .process("running-sum", RunningSum::default())
        .sink(DiscardSink::new())
        .unwrap();
    job
}

async fn pool(workers: usize) -> Arc<WorkerPool> {
    WorkerPool::bind(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), workers)
        .await
        .unwrap()
}

async fn verify(storage: &dyn CheckpointStorage, result: &sluice_runtime::JobResult, events: u64) {
    let sums = workload::final_sums(storage, result.final_checkpoint.expect("a final checkpoint"))
        .await
        .unwrap();
    let v = workload::verify(&sums, events, KEYS);
    assert!(v.exactly_once(), "{v:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_runs_on_two_workers_exactly_once() {
    let events = 200_000;
    let storage: Arc<dyn CheckpointStorage> = Arc::new(MemoryCheckpointStorage::new());
    let pool = pool(2).await;
    let handle = job(storage.clone(), events, 3, false)
        .with_workers(pool.clone())
        .start()
        .unwrap();
    let workers: Vec<_> = (0..2)
        .map(|_| {
            job(storage.clone(), events, 3, false)
                .start_worker(pool.local_addr(), WorkerOptions::default())
                .unwrap()
        })
        .collect();
    let result = tokio::time::timeout(Duration::from_secs(120), handle.wait())
        .await
        .expect("the job ends")
        .expect("the job succeeds");
    assert_eq!(result.restarts, 0);
    verify(storage.as_ref(), &result, events).await;
    for w in workers {
        // The job master told them the job ended.
        tokio::time::timeout(Duration::from_secs(10), w.wait())
            .await
            .expect("the worker stops when the job ends")
            .expect("the worker ends well");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_worker_is_replaced_and_the_job_recovers_exactly_once() {
    // Paced: about 4 s of input, so the worker dies mid-run.
    let events = 1_600_000;
    let storage: Arc<dyn CheckpointStorage> = Arc::new(MemoryCheckpointStorage::new());
    let pool = pool(2).await;
    let handle = job(storage.clone(), events, 2, true)
        .with_workers(pool.clone())
        .start()
        .unwrap();
    let monitor = handle.monitor();
    let start = |storage: &Arc<dyn CheckpointStorage>| {
        job(storage.clone(), events, 2, true)
            .start_worker(pool.local_addr(), WorkerOptions::default())
            .unwrap()
    };
    let first = start(&storage);
    let second = start(&storage);
    // Wait for a completed checkpoint, then kill a worker.
    let started = Instant::now();
    while !monitor
        .checkpoint_stats()
        .iter()
        .any(|s| s.status == sluice_runtime::CheckpointStatus::Completed)
    {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no checkpoint completed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    first.kill();
    // A replacement joins (a restarted or a spare worker).
    let third = start(&storage);
    let result = tokio::time::timeout(Duration::from_secs(120), handle.wait())
        .await
        .expect("the job ends")
        .expect("the job recovers and succeeds");
    assert!(result.restarts >= 1, "{result:?}");
    assert!(
        result.recoveries.iter().any(|r| r.restored_from.is_some()),
        "restored from a checkpoint: {result:?}"
    );
    assert!(
        result.recoveries[0].cause.contains("lost"),
        "the failure names the lost worker: {:?}",
        result.recoveries[0].cause
    );
    verify(storage.as_ref(), &result, events).await;
    for w in [second, third] {
        tokio::time::timeout(Duration::from_secs(10), w.wait())
            .await
            .expect("the worker stops when the job ends")
            .expect("the worker ends well");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_with_another_job_graph_fails_the_job_with_a_clear_error() {
    let storage: Arc<dyn CheckpointStorage> = Arc::new(MemoryCheckpointStorage::new());
    let pool = pool(1).await;
    let handle = job(storage.clone(), 1000, 2, false)
        .with_workers(pool.clone())
        .start()
        .unwrap();
    // Parallelism 3 instead of 2.
    let _worker = job(storage.clone(), 1000, 3, false)
        .start_worker(pool.local_addr(), WorkerOptions::default())
        .unwrap();
    let err = tokio::time::timeout(Duration::from_secs(60), handle.wait())
        .await
        .expect("the job ends")
        .unwrap_err();
    assert!(err.to_string().contains("another graph"), "{err}");
}
