//! Unaligned checkpoints under backpressure: a sink slowed to about a
//! thousand records a second keeps the pipeline backpressured (every channel
//! full, the sources blocked). An unaligned checkpoint completes there —
//! its barriers overtake the queued records, which are stored as channel
//! state — while an aligned one cannot (its barriers wait behind at least
//! 16 batches, over 16 s of sink work); an aligned checkpoint with an
//! alignment timeout switches to unaligned. A job restored from an
//! unaligned checkpoint replays its channel state and is exactly-once.

use sluice_backend_memory::{MemoryCheckpointStorage, MemoryStateBackend};
use sluice_core::CheckpointStorage;
use sluice_core::CheckpointStorageExt;
use sluice_runtime::net::LoopbackNetwork;
use sluice_runtime::prelude::*;
use sluice_runtime::workload::{self, key_of, RunningSum};
use sluice_runtime::{CheckpointStatus, JobHandle, JobMonitor, RestoreSource, SavepointLocation};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const KEYS: u64 = 1000;

/// While `open` is false, every record takes 1 ms (the task's thread
/// sleeps, outside the async workers); `fail` makes the next write fail.
#[derive(Clone, Default)]
struct SlowSink {
    open: Arc<AtomicBool>,
    fail: Arc<AtomicBool>,
    written: Arc<AtomicU64>,
}

struct SlowWriter(SlowSink);

impl Sink<(u64, u64)> for SlowSink {
    fn open(&self, _subtask: u32, _parallelism: u32) -> Result<Box<dyn SinkWriter<(u64, u64)>>> {
        Ok(Box::new(SlowWriter(self.clone())))
    }
}

impl SinkWriter<(u64, u64)> for SlowWriter {
    fn write(&mut self, _record: (u64, u64)) -> Result<()> {
        if self.0.fail.swap(false, Ordering::SeqCst) {
            return Err(RuntimeError::Injected("slow sink failed".into()));
        }
        if !self.0.open.load(Ordering::Relaxed) {
            tokio::task::block_in_place(|| std::thread::sleep(Duration::from_millis(1)));
        }
        self.0.written.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}

fn start(
    events: u64,
    config: CheckpointConfig,
    storage: Arc<dyn CheckpointStorage>,
    sink: SlowSink,
) -> JobHandle {
    start_on(events, config, storage, sink, None)
}

/// [`start`], with every channel over TCP if `network` is given.
fn start_on(
    events: u64,
    config: CheckpointConfig,
    storage: Arc<dyn CheckpointStorage>,
    sink: SlowSink,
    network: Option<Arc<LoopbackNetwork>>,
) -> JobHandle {
    let mut job = build(events, config, storage, sink);
    if let Some(n) = network {
        job = job.with_loopback_network(n);
    }
    job.start().unwrap()
}

/// Two sources, a keyed running sum (parallelism 1), the slow sink.
fn build(events: u64, config: CheckpointConfig, storage: Arc<dyn CheckpointStorage>, sink: SlowSink) -> Job {
    let job = Job::new("backpressured")
        .with_state_backend(Arc::new(MemoryStateBackend::new()))
        .with_checkpoint_storage(storage)
        .with_restart_strategy(RestartStrategy::FixedDelay {
            attempts: 3,
            delay: Duration::ZERO,
        })
        .with_checkpointing(config);
    job.source(
        "events",
        SequenceSource::new(events, 2, |i| (key_of(i, KEYS), i)),
        2,
    )
    .key_by(|(k, _)| *k)
    .process("running-sum", RunningSum::default())
    .set_parallelism(1)
    .sink(sink)
    .unwrap();
    job
}

/// Waits until the sources are blocked: their record count stops growing.
async fn backpressured(m: &JobMonitor) {
    let started = Instant::now();
    let mut last = m.source_records();
    loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let now = m.source_records();
        if now == last && now > 0 {
            return;
        }
        last = now;
        assert!(started.elapsed() < Duration::from_secs(60), "never backpressured");
    }
}

fn config(unaligned: bool, timeout: Option<Duration>) -> CheckpointConfig {
    CheckpointConfig {
        interval: None,
        unaligned,
        aligned_checkpoint_timeout: timeout,
        timeout: Duration::from_secs(300),
        retained: 10,
        ..Default::default()
    }
}

/// Makes the sink fast and fail once: the job must restart from checkpoint
/// `id`, replay its channel state and end exactly-once.
async fn fail_and_verify_restore(
    handle: JobHandle,
    sink: &SlowSink,
    storage: &dyn CheckpointStorage,
    id: sluice_core::CheckpointId,
    events: u64,
) {
    sink.open.store(true, Ordering::Relaxed);
    sink.fail.store(true, Ordering::SeqCst);
    let result = handle.wait().await.expect("the job recovers and completes");
    assert_eq!(result.restarts, 1);
    assert_eq!(result.recoveries[0].restored_from, Some(id));
    let sums = workload::final_sums(storage, result.final_checkpoint.unwrap())
        .await
        .unwrap();
    let v = workload::verify(&sums, events, KEYS);
    assert!(v.exactly_once(), "{v:?}");
}

/// Triggers a checkpoint under backpressure (it must complete within 60 s,
/// `what` says where) and checks that it stored the records it overtook
/// on the tasks' inputs while the sink stayed slow.
async fn unaligned_checkpoint_with_channel_state(
    m: &JobMonitor,
    storage: &Arc<dyn CheckpointStorage>,
    sink: &SlowSink,
    what: &str,
) -> sluice_core::CheckpointId {
    let id = tokio::time::timeout(Duration::from_secs(60), m.trigger_checkpoint())
        .await
        .unwrap_or_else(|_| panic!("{what}"))
        .expect("checkpoint");
    let meta = RestoreSource::checkpoint(storage.clone(), id)
        .await
        .unwrap()
        .metadata;
    let input: u64 = meta.channel_state.iter().map(|c| c.input_records).sum();
    assert!(
        input > 0,
        "records overtaken on the inputs are stored: {:?}",
        meta.channel_state
    );
    assert!(!sink.open.load(Ordering::Relaxed), "the sink was slow all along");
    id
}

/// A checkpoint triggered under backpressure completes once it switched to
/// unaligned after `timeout`, storing the records in flight; then the job
/// is cancelled.
async fn switches_to_unaligned_after(handle: JobHandle, timeout: Duration) {
    let m = handle.monitor();
    let id = tokio::time::timeout(Duration::from_secs(60), m.trigger_checkpoint())
        .await
        .expect("completes under backpressure once it switched")
        .expect("checkpoint");
    let s = stats(&m, id);
    assert!(s.duration >= timeout, "it waited for the timeout first: {s:?}");
    assert!(
        s.channel_state_size > 0,
        "then stored the records in flight: {s:?}"
    );
    handle.cancel();
    let _ = handle.wait().await;
}

fn stats(m: &JobMonitor, id: sluice_core::CheckpointId) -> sluice_runtime::CheckpointStats {
    m.checkpoint_stats()
        .into_iter()
        .find(|s| s.id == id)
        .expect("stats")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn an_unaligned_checkpoint_completes_under_backpressure_where_an_aligned_one_waits() {
    // Unaligned: completes while the sink stays slow.
    let sink = SlowSink::default();
    let handle = start(
        50_000_000,
        config(true, None),
        Arc::new(MemoryCheckpointStorage::new()),
        sink.clone(),
    );
    let m = handle.monitor();
    backpressured(&m).await;
    let id = tokio::time::timeout(Duration::from_secs(60), m.trigger_checkpoint())
        .await
        .expect("the unaligned checkpoint completes under backpressure")
        .expect("checkpoint");
    let s = stats(&m, id);
    assert!(
        s.channel_state_size > 0,
        "the records it overtook are stored: {s:?}"
    );
    assert!(!sink.open.load(Ordering::Relaxed), "the sink was slow all along");
    handle.cancel();
    let _ = handle.wait().await;

    // Aligned: still waiting after 3 s (it needs at least 16 s of sink
    // work to reach the barriers), completes once the sink is fast.
    let sink = SlowSink::default();
    let handle = start(
        50_000_000,
        config(false, None),
        Arc::new(MemoryCheckpointStorage::new()),
        sink.clone(),
    );
    let m = handle.monitor();
    backpressured(&m).await;
    let trigger = tokio::spawn({
        let m = m.clone();
        async move { m.trigger_checkpoint().await }
    });
    tokio::time::sleep(Duration::from_secs(3)).await;
    let pending: Vec<_> = m
        .checkpoint_stats()
        .into_iter()
        .filter(|s| s.status == CheckpointStatus::InProgress)
        .collect();
    assert_eq!(pending.len(), 1, "the aligned checkpoint is still aligning");
    sink.open.store(true, Ordering::Relaxed);
    let id = tokio::time::timeout(Duration::from_secs(120), trigger)
        .await
        .expect("completes once the sink is fast")
        .unwrap()
        .expect("checkpoint");
    assert_eq!(stats(&m, id).channel_state_size, 0, "aligned: no channel state");
    handle.cancel();
    let _ = handle.wait().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn an_aligned_checkpoint_with_a_timeout_switches_to_unaligned_under_backpressure() {
    let sink = SlowSink::default();
    let timeout = Duration::from_millis(500);
    let handle = start(
        50_000_000,
        config(true, Some(timeout)),
        Arc::new(MemoryCheckpointStorage::new()),
        sink.clone(),
    );
    let m = handle.monitor();
    backpressured(&m).await;
    switches_to_unaligned_after(handle, timeout).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn a_restore_from_an_unaligned_checkpoint_replays_its_channel_state_exactly_once() {
    let events = 300_000;
    let storage: Arc<dyn CheckpointStorage> = Arc::new(MemoryCheckpointStorage::new());
    let sink = SlowSink::default();
    let handle = start(events, config(true, None), storage.clone(), sink.clone());
    let m = handle.monitor();
    backpressured(&m).await;
    let id = m.trigger_checkpoint().await.expect("unaligned checkpoint");
    let meta = RestoreSource::checkpoint(storage.clone(), id)
        .await
        .unwrap()
        .metadata;
    let input: u64 = meta.channel_state.iter().map(|c| c.input_records).sum();
    let output: u64 = meta.channel_state.iter().map(|c| c.output_records).sum();
    assert!(
        input > 0,
        "records on the keyed task's inputs are stored: {:?}",
        meta.channel_state
    );
    assert!(
        output > 0,
        "records queued in the sources' outputs are stored: {:?}",
        meta.channel_state
    );
    // Fail now: the job restarts from that checkpoint (the only one).
    fail_and_verify_restore(handle, &sink, storage.as_ref(), id, events).await;

    // Channel state does not rescale: restoring that checkpoint at another
    // parallelism is refused with a clear error.
    let job = Job::new("rescaled")
        .with_state_backend(Arc::new(MemoryStateBackend::new()))
        .with_checkpoint_storage(Arc::new(MemoryCheckpointStorage::new()))
        .from_savepoint(SavepointLocation::new(storage.clone(), id.dir()).unwrap());
    job.source(
        "events",
        SequenceSource::new(events, 2, |i| (key_of(i, KEYS), i)),
        2,
    )
    .key_by(|(k, _)| *k)
    .process("running-sum", RunningSum::default())
    .set_parallelism(2)
    .sink(DiscardSink::new())
    .unwrap();
    let err = job.execute().await.unwrap_err();
    assert!(
        matches!(
            err,
            RuntimeError::Storage(sluice_core::Error::Incompatible { .. })
        ) && err.to_string().contains("parallelism"),
        "{err}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn over_tcp_an_unaligned_checkpoint_overtakes_the_backpressured_network_and_restores_exactly_once() {
    // Every channel is a TCP connection with credit-based flow control: the
    // slow sink stops granting credit, the sources block, and the priority
    // barriers still overtake the queued records across the sockets.
    let events = 300_000;
    let network = LoopbackNetwork::bind().await.unwrap();
    let storage: Arc<dyn CheckpointStorage> = Arc::new(MemoryCheckpointStorage::new());
    let sink = SlowSink::default();
    let handle = start_on(
        events,
        config(true, None),
        storage.clone(),
        sink.clone(),
        Some(network.clone()),
    );
    let m = handle.monitor();
    backpressured(&m).await;
    let blocked_at = m.source_records();
    assert!(
        blocked_at < events / 2,
        "the sources are held back by the network's flow control ({blocked_at} of {events} read)"
    );
    let id = unaligned_checkpoint_with_channel_state(
        &m,
        &storage,
        &sink,
        "the unaligned checkpoint completes under backpressure across the network",
    )
    .await;
    let first = network.counts();
    // Fail now: the job restarts from that checkpoint over new connections.
    fail_and_verify_restore(handle, &sink, storage.as_ref(), id, events).await;
    let last = network.counts();
    assert!(
        last.connections >= 2 * first.connections,
        "the second attempt connected its own channels: {first:?} then {last:?}"
    );
}

/// The job of [`build`] on two workers (in this process, every channel
/// over TCP); returns once the sink has written and the channels had time
/// to fill (the sink takes ~1,000 records a second).
async fn start_on_workers(
    events: u64,
    config: CheckpointConfig,
    storage: Arc<dyn CheckpointStorage>,
    sink: SlowSink,
) -> (JobHandle, Vec<sluice_runtime::cluster::WorkerHandle>) {
    use sluice_runtime::cluster::{WorkerOptions, WorkerPool};
    let pool = WorkerPool::bind("127.0.0.1:0".parse().unwrap(), 2).await.unwrap();
    let handle = build(events, config.clone(), storage.clone(), sink.clone())
        .with_workers(pool.clone())
        .start()
        .unwrap();
    let workers = (0..2)
        .map(|_| {
            build(events, config.clone(), storage.clone(), sink.clone())
                .start_worker(pool.local_addr(), WorkerOptions::default())
                .unwrap()
        })
        .collect();
    let started = Instant::now();
    while sink.written.load(Ordering::Relaxed) == 0 {
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the sink never wrote"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    (handle, workers)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn on_two_workers_an_aligned_checkpoint_with_a_timeout_switches_to_unaligned_under_backpressure() {
    let sink = SlowSink::default();
    let timeout = Duration::from_millis(500);
    let (handle, _workers) = start_on_workers(
        50_000_000,
        config(true, Some(timeout)),
        Arc::new(MemoryCheckpointStorage::new()),
        sink.clone(),
    )
    .await;
    switches_to_unaligned_after(handle, timeout).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn on_two_workers_an_unaligned_checkpoint_overtakes_backpressure_and_restores_exactly_once() {
    let events = 300_000;
    let storage: Arc<dyn CheckpointStorage> = Arc::new(MemoryCheckpointStorage::new());
    let sink = SlowSink::default();
    let (handle, workers) = start_on_workers(events, config(true, None), storage.clone(), sink.clone()).await;
    let m = handle.monitor();
    let id = unaligned_checkpoint_with_channel_state(
        &m,
        &storage,
        &sink,
        "the unaligned checkpoint completes under backpressure across workers",
    )
    .await;
    fail_and_verify_restore(handle, &sink, storage.as_ref(), id, events).await;
    sluice_runtime::testing::workers_end_well(workers).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 3)]
async fn channel_state_is_restored_to_the_task_with_its_uid_even_when_the_graph_order_changes() {
    let events = 300_000;
    let storage: Arc<dyn CheckpointStorage> = Arc::new(MemoryCheckpointStorage::new());
    let sink = SlowSink::default();
    let handle = start(events, config(true, None), storage.clone(), sink.clone());
    let m = handle.monitor();
    backpressured(&m).await;
    let id = m.trigger_checkpoint().await.expect("unaligned checkpoint");
    let meta = RestoreSource::checkpoint(storage.clone(), id)
        .await
        .unwrap()
        .metadata;
    let uids: Vec<&str> = meta.channel_state.iter().map(|c| c.task_uid.as_str()).collect();
    assert!(
        uids.contains(&"events") && uids.contains(&"running-sum"),
        "channel state of the source's output and the keyed task's input: {uids:?}"
    );
    handle.cancel();
    let _ = handle.wait().await;
    // The same pipeline, with another pipeline built first: every task's
    // position in the graph moves, its uid does not.
    let restored: Arc<dyn CheckpointStorage> = Arc::new(MemoryCheckpointStorage::new());
    let job = Job::new("reordered")
        .with_state_backend(Arc::new(MemoryStateBackend::new()))
        .with_checkpoint_storage(restored.clone())
        .from_savepoint(SavepointLocation::new(storage.clone(), id.dir()).unwrap());
    job.source("other", SequenceSource::new(1_000, 1, |i| (i, i)), 1)
        .rebalance()
        .sink(DiscardSink::new())
        .unwrap();
    job.source(
        "events",
        SequenceSource::new(events, 2, |i| (key_of(i, KEYS), i)),
        2,
    )
    .key_by(|(k, _)| *k)
    .process("running-sum", RunningSum::default())
    .set_parallelism(1)
    .sink(DiscardSink::new())
    .unwrap();
    let result = job.execute().await.expect("restores");
    let sums = workload::final_sums(restored.as_ref(), result.final_checkpoint.unwrap())
        .await
        .unwrap();
    let v = workload::verify(&sums, events, KEYS);
    assert!(
        v.exactly_once(),
        "every record in flight went to its own task: {v:?}"
    );

    // Channel state of a task the job does not have is refused, not
    // dropped: the same checkpoint, its keyed task's channel state renamed.
    let mut json: serde_json::Value =
        serde_json::from_slice(&storage.read_metadata(id).await.unwrap()).unwrap();
    json["checkpoint_id"] = 999.into();
    for c in json["channel_state"].as_array_mut().unwrap() {
        if c["task_uid"] == "running-sum" {
            c["task_uid"] = "ghost".into();
        }
    }
    storage
        .commit_metadata(
            sluice_core::CheckpointId(999),
            serde_json::to_vec(&json).unwrap().into(),
        )
        .await
        .unwrap();
    let job = Job::new("ghost")
        .with_state_backend(Arc::new(MemoryStateBackend::new()))
        .with_checkpoint_storage(Arc::new(MemoryCheckpointStorage::new()))
        .from_savepoint(SavepointLocation::new(storage.clone(), "chk-999").unwrap());
    job.source(
        "events",
        SequenceSource::new(events, 2, |i| (key_of(i, KEYS), i)),
        2,
    )
    .key_by(|(k, _)| *k)
    .process("running-sum", RunningSum::default())
    .set_parallelism(1)
    .sink(DiscardSink::new())
    .unwrap();
    let err = job
        .execute()
        .await
        .expect_err("records in flight of a task the job does not have");
    assert!(
        err.to_string().contains("ghost") && err.to_string().contains("in flight"),
        "{err}"
    );
}
