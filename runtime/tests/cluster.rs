//! A job spread over workers (issue 15), in one test process: a job master
//! with a `WorkerPool` and workers started with `Job::start_worker`, every
//! control message and channel over TCP on 127.0.0.1, the checkpoint
//! storage shared. A worker "killed" here is aborted whole: its sockets
//! close as a killed process's would. (`cluster_processes.rs` runs real
//! processes, among them the two-input job on three workers.)

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

/// The job's result, once it ended well (within 2 minutes); `what` says
/// what was expected.
async fn job_ends(handle: sluice_runtime::JobHandle, what: &str) -> sluice_runtime::JobResult {
    tokio::time::timeout(Duration::from_secs(120), handle.wait())
        .await
        .expect("the job ends")
        .unwrap_or_else(|e| panic!("{what}: {e}"))
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
    let result = job_ends(handle, "the job succeeds").await;
    assert_eq!(result.restarts, 0);
    verify(storage.as_ref(), &result, events).await;
    sluice_runtime::testing::workers_end_well(workers).await;
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
    sluice_runtime::testing::wait_for_completed_checkpoint(&monitor, Duration::from_secs(60)).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    first.kill();
    // A replacement joins (a restarted or a spare worker).
    let third = start(&storage);
    let result = job_ends(handle, "the job recovers and succeeds").await;
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
    sluice_runtime::testing::workers_end_well([second, third]).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_with_another_job_graph_is_refused_and_the_job_runs_on_a_right_one() {
    let events = 1000;
    let storage: Arc<dyn CheckpointStorage> = Arc::new(MemoryCheckpointStorage::new());
    let pool = pool(1).await;
    let handle = job(storage.clone(), events, 2, false)
        .with_workers(pool.clone())
        .start()
        .unwrap();
    // Parallelism 3 instead of 2: refused when it registers.
    let wrong = job(storage.clone(), events, 3, false)
        .start_worker(pool.local_addr(), WorkerOptions::default())
        .unwrap();
    let err = tokio::time::timeout(Duration::from_secs(30), wrong.wait())
        .await
        .expect("the refused worker stops")
        .unwrap_err();
    assert!(
        err.to_string().contains("another graph") && err.to_string().contains("p3"),
        "{err}"
    );
    assert_eq!(pool.registered(), 0);
    let right = job(storage.clone(), events, 2, false)
        .start_worker(pool.local_addr(), WorkerOptions::default())
        .unwrap();
    let result = job_ends(handle, "the job runs on the right worker").await;
    assert_eq!(result.restarts, 0);
    verify(storage.as_ref(), &result, events).await;
    right.wait().await.unwrap();
}

/// A TCP proxy to `target` that can be cut off: from then on it forwards
/// nothing (the connections stay open, silent, as in a network partition)
/// and drops new connections at once.
struct Partition {
    addr: SocketAddr,
    cut: Arc<std::sync::atomic::AtomicBool>,
}

impl Partition {
    async fn to(target: SocketAddr) -> Self {
        use std::sync::atomic::{AtomicBool, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let l = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .unwrap();
        let addr = l.local_addr().unwrap();
        let cut = Arc::new(AtomicBool::new(false));
        let flag = cut.clone();
        tokio::spawn(async move {
            loop {
                let (client, _) = l.accept().await.unwrap();
                if flag.load(Ordering::SeqCst) {
                    continue; // dropped
                }
                let server = tokio::net::TcpStream::connect(target).await.unwrap();
                let (cr, cw) = client.into_split();
                let (sr, sw) = server.into_split();
                for (mut from, mut to, flag) in [
                    (
                        Box::new(cr) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
                        Box::new(sw) as Box<dyn tokio::io::AsyncWrite + Unpin + Send>,
                        flag.clone(),
                    ),
                    (Box::new(sr), Box::new(cw), flag.clone()),
                ] {
                    tokio::spawn(async move {
                        let mut buf = vec![0u8; 8192];
                        loop {
                            let n = match from.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            if flag.load(Ordering::SeqCst) {
                                // Partitioned: hold the sockets, forward nothing.
                                std::future::pending::<()>().await;
                            }
                            if to.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown().await;
                    });
                }
            }
        });
        Partition { addr, cut }
    }

    fn cut(&self) {
        self.cut.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

async fn registered(pool: &WorkerPool, n: usize) {
    let started = Instant::now();
    while pool.registered() < n {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "workers did not register"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_cut_off_from_the_coordinator_is_detected_by_heartbeats_and_replaced() {
    // About 6 s of input: the partition is detected after 5 s of silence.
    let events = 2_400_000;
    let storage: Arc<dyn CheckpointStorage> = Arc::new(MemoryCheckpointStorage::new());
    let pool = pool(2).await;
    let handle = job(storage.clone(), events, 2, true)
        .with_workers(pool.clone())
        .start()
        .unwrap();
    let monitor = handle.monitor();
    let partition = Partition::to(pool.local_addr()).await;
    let options = WorkerOptions {
        reconnect_for: Duration::from_secs(3),
        ..WorkerOptions::default()
    };
    // The first two registered run the job; the third is a spare.
    let cut_off = job(storage.clone(), events, 2, true)
        .start_worker(partition.addr, options.clone())
        .unwrap();
    registered(&pool, 1).await;
    let healthy = job(storage.clone(), events, 2, true)
        .start_worker(pool.local_addr(), options.clone())
        .unwrap();
    registered(&pool, 2).await;
    let spare = job(storage.clone(), events, 2, true)
        .start_worker(pool.local_addr(), options.clone())
        .unwrap();
    registered(&pool, 3).await;
    sluice_runtime::testing::wait_for_completed_checkpoint(&monitor, Duration::from_secs(60)).await;
    partition.cut();
    let cut_at = Instant::now();
    let result = job_ends(handle, "the job recovers and succeeds").await;
    // The cut-off worker stops its tasks after 3 s of silence (its
    // channels to the healthy worker close, which may fail the attempt
    // first); the coordinator gives it up after 5 s.
    assert!(
        result
            .recoveries
            .iter()
            .any(|r| r.cause.contains("sent nothing for 5s")),
        "the coordinator noticed the silence: {:?}",
        result.recoveries
    );
    verify(storage.as_ref(), &result, events).await;
    // The cut-off worker noticed the silence too, stopped its tasks, and
    // gave up reaching the coordinator.
    let err = tokio::time::timeout(Duration::from_secs(60), cut_off.wait())
        .await
        .expect("the cut-off worker ends")
        .unwrap_err();
    assert!(err.to_string().contains("coordinator"), "{err}");
    assert!(
        cut_at.elapsed() >= Duration::from_secs(5),
        "not before the heartbeat timeout"
    );
    sluice_runtime::testing::workers_end_well([healthy, spare]).await;
}

/// A TCP proxy to `target` that drops every connection open at the moment
/// `limit` bytes went through it in all (once); later connections pass.
async fn cutting_proxy(
    target: SocketAddr,
    limit: usize,
) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .await
        .unwrap();
    let addr = l.local_addr().unwrap();
    let bytes = Arc::new(AtomicUsize::new(0));
    // 0: not cut yet; 1: cut.
    let generation = Arc::new(AtomicUsize::new(0));
    let cuts = Arc::new(AtomicUsize::new(0));
    let cuts_seen = cuts.clone();
    tokio::spawn(async move {
        loop {
            let (client, _) = l.accept().await.unwrap();
            let Ok(server) = tokio::net::TcpStream::connect(target).await else {
                continue;
            };
            let born = generation.load(Ordering::SeqCst);
            let (cr, cw) = client.into_split();
            let (sr, sw) = server.into_split();
            type R = Box<dyn tokio::io::AsyncRead + Unpin + Send>;
            type W = Box<dyn tokio::io::AsyncWrite + Unpin + Send>;
            for (mut from, mut to) in [
                (Box::new(cr) as R, Box::new(sw) as W),
                (Box::new(sr) as R, Box::new(cw) as W),
            ] {
                let (bytes, generation, cuts) = (bytes.clone(), generation.clone(), cuts.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 8192];
                    loop {
                        let read = tokio::time::timeout(Duration::from_millis(20), from.read(&mut buf)).await;
                        if generation.load(Ordering::SeqCst) != born {
                            break; // cut: both directions dropped
                        }
                        let n = match read {
                            Err(_) => continue,
                            Ok(Ok(0)) | Ok(Err(_)) => break,
                            Ok(Ok(n)) => n,
                        };
                        if to.write_all(&buf[..n]).await.is_err() {
                            break;
                        }
                        let total = bytes.fetch_add(n, Ordering::SeqCst) + n;
                        if total >= limit
                            && generation
                                .compare_exchange(0, 1, Ordering::SeqCst, Ordering::SeqCst)
                                .is_ok()
                        {
                            cuts.fetch_add(1, Ordering::SeqCst);
                            break;
                        }
                    }
                });
            }
        }
    });
    (addr, cuts_seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn channels_between_workers_dropped_mid_stream_are_recovered_exactly_once() {
    let events = 1_200_000;
    let storage: Arc<dyn CheckpointStorage> = Arc::new(MemoryCheckpointStorage::new());
    let pool = pool(2).await;
    let handle = job(storage.clone(), events, 2, true)
        .with_workers(pool.clone())
        .start()
        .unwrap();
    // The second worker's channels go through a proxy that cuts them all
    // once, after about 1 MB.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (proxy, cuts) = cutting_proxy(SocketAddr::from((Ipv4Addr::LOCALHOST, port)), 1 << 20).await;
    let first = job(storage.clone(), events, 2, true)
        .start_worker(pool.local_addr(), WorkerOptions::default())
        .unwrap();
    let second = job(storage.clone(), events, 2, true)
        .start_worker(
            pool.local_addr(),
            WorkerOptions {
                channel_port: port,
                advertise: Some(proxy),
                ..WorkerOptions::default()
            },
        )
        .unwrap();
    let result = job_ends(handle, "the job recovers and succeeds").await;
    assert_eq!(
        cuts.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the proxy cut the channels"
    );
    assert!(result.restarts >= 1, "the cut failed the attempt: {result:?}");
    verify(storage.as_ref(), &result, events).await;
    sluice_runtime::testing::workers_end_well([first, second]).await;
}
