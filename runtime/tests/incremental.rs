//! Incremental checkpoints: a checkpoint writes only the changes since the
//! newest completed one and references that one's files; chains are folded
//! into a new base by policy; shared files are deleted exactly when no
//! retained checkpoint needs them; savepoints stay full and self-contained;
//! a restore applies the chain exactly once, on either state backend.

use sluice_backend_memory::{MemoryCheckpointStorage, MemoryStateBackend};
use sluice_backend_redb::RedbStateBackend;
use sluice_core::{CheckpointId, CheckpointMetadata, CheckpointStorage, CheckpointStorageExt, StateBackend};
use sluice_runtime::prelude::*;
use sluice_runtime::testing::file_ownership;
use sluice_runtime::workload::{self, InjectedFailure, RunningSum};
use sluice_runtime::{IncrementalPolicy, JobHandle, RestoreSource, SavepointLocation};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The source has two splits, `[0, events/2)` and `[events/2, events)`; the
/// first LOAD/2 events of each split write LOAD distinct keys, every later
/// event one of HOT keys: after the load, few keys change between
/// checkpoints.
const LOAD: u64 = 20_000;
const HOT: u64 = 16;

fn key(events: u64, i: u64) -> u64 {
    if i % (events / 2) < LOAD / 2 {
        HOT + i
    } else {
        i % HOT
    }
}

fn start(
    backend: Arc<dyn StateBackend>,
    storage: Arc<dyn CheckpointStorage>,
    events: u64,
    policy: Option<IncrementalPolicy>,
    failures: Vec<Arc<InjectedFailure>>,
) -> JobHandle {
    let job = Job::new("incremental")
        .with_parallelism(2)
        .with_state_backend(backend)
        .with_checkpoint_storage(storage)
        .with_restart_strategy(RestartStrategy::FixedDelay {
            attempts: 3,
            delay: Duration::ZERO,
        })
        .with_checkpointing(CheckpointConfig {
            interval: None,
            retained: 2,
            incremental: policy,
            ..Default::default()
        });
    job.source(
        "events",
        SequenceSource::new(events, 2, move |i| (key(events, i), i)).paced(100, Duration::from_millis(1)),
        2,
    )
    .key_by(|(k, _)| *k)
    .process("running-sum", RunningSum::with_failures(failures))
    .sink(DiscardSink::new())
    .unwrap();
    job.start().unwrap()
}

/// Waits until each of the two source subtasks has read `n / 2` records:
/// a total is not enough, as the splits progress apart on a loaded machine
/// (one may still be in its load phase when the total is reached).
async fn wait_for_records(handle: &JobHandle, n: u64) {
    let started = Instant::now();
    loop {
        let read: Vec<u64> = handle
            .monitor()
            .task_counters()
            .iter()
            .filter(|t| t.is_source)
            .map(|t| t.records_in)
            .collect();
        if read.len() == 2 && read.iter().all(|&r| r >= n / 2) {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "the source stalled: {read:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

async fn metadata(storage: &Arc<dyn CheckpointStorage>, id: CheckpointId) -> Arc<CheckpointMetadata> {
    RestoreSource::checkpoint(storage.clone(), id)
        .await
        .unwrap()
        .metadata
}

/// The longest chain of changes files of any subtask of the running sum.
fn chain_len(meta: &CheckpointMetadata) -> usize {
    meta.operators
        .iter()
        .find(|o| o.uid.as_str() == "running-sum")
        .map(|o| {
            o.subtasks
                .iter()
                .map(|s| s.keyed_changes.len())
                .max()
                .unwrap_or(0)
        })
        .unwrap_or(0)
}

async fn few_changes_are_written_as_changes_and_restore_exactly_once(backend: Arc<dyn StateBackend>) {
    let events = LOAD + 120_000;
    let storage: Arc<dyn CheckpointStorage> = Arc::new(MemoryCheckpointStorage::new());
    // A task failure after the second checkpoint and the savepoint: the
    // job restores an incremental chain. Whichever way the hot keys hash,
    // one of the two subtasks processes at least half of the input, more
    // than `after`. The failures are held back until the savepoint has
    // completed (a paced source alone left too little time: a redb
    // operator fast enough not to hold the sources back reached `after`
    // before the second checkpoint or the savepoint now and then).
    let after = LOAD / 2 + 48_000;
    let failures = vec![
        InjectedFailure::new(0, after, false),
        InjectedFailure::new(1, after, false),
    ];
    for f in &failures {
        f.try_fire();
    }
    let handle = start(
        backend,
        storage.clone(),
        events,
        Some(IncrementalPolicy::default()),
        failures.clone(),
    );
    wait_for_records(&handle, LOAD + 2_000).await;
    let full = handle.trigger_checkpoint().await.expect("first checkpoint");
    wait_for_records(&handle, LOAD + 6_000).await;
    let incremental = handle.trigger_checkpoint().await.expect("second checkpoint");
    let (full_meta, inc_meta) = (
        metadata(&storage, full).await,
        metadata(&storage, incremental).await,
    );
    assert_eq!(chain_len(&full_meta), 0, "the first checkpoint is full");
    assert_eq!(
        chain_len(&inc_meta),
        1,
        "the next one is a changes file on top of it"
    );
    assert_eq!(
        inc_meta.state_size() - inc_meta.own_state_size(),
        full_meta.state_size(),
        "it references the whole first checkpoint"
    );
    assert!(
        inc_meta.own_state_size() * 20 < full_meta.own_state_size(),
        "it wrote only the few changed keys: {} bytes against {} for the full one",
        inc_meta.own_state_size(),
        full_meta.own_state_size()
    );
    // The statistics report both sizes, as Flink's full and checkpointed sizes.
    let stats = handle.monitor().checkpoint_stats();
    let s = stats.iter().find(|s| s.id == incremental).expect("statistics");
    assert_eq!(
        (s.state_size, s.written_size),
        (inc_meta.state_size(), inc_meta.own_state_size())
    );
    // A savepoint of an incremental job is full and self-contained.
    let targets: Arc<dyn CheckpointStorage> = Arc::new(MemoryCheckpointStorage::new());
    let sp = handle
        .trigger_savepoint(SavepointLocation::new(targets.clone(), "sp").unwrap())
        .await
        .expect("savepoint");
    let sp_meta = RestoreSource::open(&sp.location).await.unwrap().metadata;
    assert_eq!(chain_len(&sp_meta), 0, "no changes files in a savepoint");
    assert!(
        sp_meta.state_files().all(|f| !f.path.contains('/')),
        "every file inside its directory"
    );
    for f in &failures {
        f.arm();
    }
    let result = handle.wait().await.expect("the job recovers and completes");
    assert!((1..=2).contains(&result.restarts), "{result:?}");
    let restored = result.recoveries[0].restored_from.expect("from a checkpoint");
    assert!(
        restored >= incremental,
        "restored the incremental chain {restored}"
    );
    // The final state, read back through its chain, is exactly-once.
    let final_id = result.final_checkpoint.unwrap();
    let sums = workload::final_sums(storage.as_ref(), final_id).await.unwrap();
    let mut expected = rustc_hash::FxHashMap::default();
    for i in 0..events {
        *expected.entry(key(events, i)).or_insert(0u64) += i;
    }
    assert_eq!(sums, expected, "final state of every key, through the chain");
    // And the savepoint restores alone, at another parallelism, into redb.
    let dir = tempfile::tempdir().unwrap();
    let sp_sums = workload::sums_in(&RestoreSource::open(&sp.location).await.unwrap(), "running-sum")
        .await
        .unwrap();
    assert!(!sp_sums.is_empty());
    let job = Job::new("from-savepoint")
        .with_parallelism(3)
        .with_state_backend(Arc::new(RedbStateBackend::new(dir.path()).unwrap()))
        .with_checkpoint_storage(Arc::new(MemoryCheckpointStorage::new()))
        .from_savepoint(sp.location.clone());
    let again: Arc<dyn CheckpointStorage> = Arc::new(MemoryCheckpointStorage::new());
    let job = job.with_checkpoint_storage(again.clone());
    job.source(
        "events",
        SequenceSource::new(events, 2, move |i| (key(events, i), i)),
        3,
    )
    .key_by(|(k, _)| *k)
    .process("running-sum", RunningSum::default())
    .sink(DiscardSink::new())
    .unwrap();
    let r = job.execute().await.expect("restores from the savepoint");
    let sums = workload::final_sums(again.as_ref(), r.final_checkpoint.unwrap())
        .await
        .unwrap();
    assert_eq!(sums, expected, "the savepoint's state plus the rest of the input");
    // The final checkpoint is a chain; restored as a retained checkpoint
    // (`…#chk-<id>`) at another parallelism into redb, it rescales by key
    // group like a full one.
    assert!(chain_len(&*metadata(&storage, final_id).await) >= 1);
    let dir = tempfile::tempdir().unwrap();
    let rescaled: Arc<dyn CheckpointStorage> = Arc::new(MemoryCheckpointStorage::new());
    let job = Job::new("from-a-chain")
        .with_parallelism(3)
        .with_state_backend(Arc::new(RedbStateBackend::new(dir.path()).unwrap()))
        .with_checkpoint_storage(rescaled.clone())
        .from_savepoint(SavepointLocation::new(storage.clone(), final_id.dir()).unwrap());
    job.source(
        "events",
        SequenceSource::new(events, 2, move |i| (key(events, i), i)),
        3,
    )
    .key_by(|(k, _)| *k)
    .process("running-sum", RunningSum::default())
    .sink(DiscardSink::new())
    .unwrap();
    let r = job.execute().await.expect("restores from the chain");
    let sums = workload::final_sums(rescaled.as_ref(), r.final_checkpoint.unwrap())
        .await
        .unwrap();
    assert_eq!(sums, expected, "the chain's state, rescaled to three subtasks");
    // Every file of the job's storage is needed, and none is missing.
    let files = file_ownership(storage.as_ref()).await.unwrap();
    assert!(files.is_exact(), "{files:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn few_changes_are_written_as_changes_and_restore_exactly_once_on_the_memory_backend() {
    few_changes_are_written_as_changes_and_restore_exactly_once(Arc::new(MemoryStateBackend::new())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn few_changes_are_written_as_changes_and_restore_exactly_once_on_the_redb_backend() {
    let dir = tempfile::tempdir().unwrap();
    few_changes_are_written_as_changes_and_restore_exactly_once(Arc::new(
        RedbStateBackend::new(dir.path()).unwrap(),
    ))
    .await;
}

/// A write buffer of a few entries: the hot keys are flushed into redb
/// between checkpoints, so incremental checkpoints read most changes from
/// the flushes' kept runs (`RedbStateConfig::flushed_runs_bytes`), and the
/// restore of the chain must still be exactly-once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn few_changes_are_written_as_changes_and_restore_exactly_once_on_redb_flushing_all_the_time() {
    let dir = tempfile::tempdir().unwrap();
    let config = sluice_backend_redb::RedbStateConfig {
        write_buffer_bytes: 512,
        ..sluice_backend_redb::RedbStateConfig::new(dir.path())
    };
    few_changes_are_written_as_changes_and_restore_exactly_once(Arc::new(
        RedbStateBackend::with_config(config).unwrap(),
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chains_are_folded_into_a_new_base_by_policy_and_shared_files_go_exactly_when_unneeded() {
    let events = LOAD + 30_000;
    let storage: Arc<dyn CheckpointStorage> = Arc::new(MemoryCheckpointStorage::new());
    let policy = IncrementalPolicy {
        max_chain: 2,
        max_changes_ratio: 10.0,
    };
    let handle = start(
        Arc::new(MemoryStateBackend::new()),
        storage.clone(),
        events,
        Some(policy),
        vec![],
    );
    wait_for_records(&handle, LOAD + 1_000).await;
    let mut chains = Vec::new();
    for n in 0..7u64 {
        wait_for_records(&handle, LOAD + 2_000 + n * 2_000).await;
        let id = handle.trigger_checkpoint().await.expect("checkpoint");
        chains.push(chain_len(&*metadata(&storage, id).await));
        // Retention (2) discards older checkpoints as they go; what the
        // retained ones share stays, everything else goes.
        let files = file_ownership(storage.as_ref()).await.unwrap();
        assert!(files.is_exact(), "after checkpoint {id}: {files:?}");
    }
    assert_eq!(
        chains,
        vec![0, 1, 2, 0, 1, 2, 0],
        "full, two changes files, then folded"
    );
    handle.wait().await.expect("completes");
    let files = file_ownership(storage.as_ref()).await.unwrap();
    assert!(files.is_exact(), "{files:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_incremental_checkpoints_every_checkpoint_is_full() {
    let events = LOAD + 20_000;
    let storage: Arc<dyn CheckpointStorage> = Arc::new(MemoryCheckpointStorage::new());
    let handle = start(
        Arc::new(MemoryStateBackend::new()),
        storage.clone(),
        events,
        None,
        vec![],
    );
    let mut ids = Vec::new();
    for n in 0..3u64 {
        wait_for_records(&handle, LOAD + 2_000 + n * 2_000).await;
        ids.push(handle.trigger_checkpoint().await.expect("checkpoint"));
    }
    handle.wait().await.expect("completes");
    let retained: Vec<_> = storage.list().await.unwrap().into_iter().map(|c| c.id).collect();
    assert!(retained.len() >= 2, "{retained:?}");
    for id in retained {
        let meta = metadata(&storage, id).await;
        assert_eq!(chain_len(&meta), 0, "checkpoint {id}");
        assert_eq!(
            meta.state_size(),
            meta.own_state_size(),
            "checkpoint {id} stands alone"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restored_chain_counts_toward_the_fold() {
    let events = LOAD + 60_000;
    let storage: Arc<dyn CheckpointStorage> = Arc::new(MemoryCheckpointStorage::new());
    let policy = IncrementalPolicy {
        max_chain: 2,
        max_changes_ratio: 1_000.0,
    };
    // As above: a failure after the third checkpoint.
    let after = LOAD / 2 + 24_000;
    let failures = vec![
        InjectedFailure::new(0, after, false),
        InjectedFailure::new(1, after, false),
    ];
    let handle = start(
        Arc::new(MemoryStateBackend::new()),
        storage.clone(),
        events,
        Some(policy),
        failures,
    );
    let mut chains = Vec::new();
    for n in 0..3u64 {
        wait_for_records(&handle, LOAD + 2_000 + n * 2_000).await;
        let id = handle.trigger_checkpoint().await.expect("checkpoint");
        chains.push(chain_len(&*metadata(&storage, id).await));
    }
    assert_eq!(chains, vec![0, 1, 2]);
    let started = Instant::now();
    while handle.monitor().status().restarts == 0 {
        assert!(started.elapsed() < Duration::from_secs(60), "no restart");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    // The restored chain is already two changes files long: the next
    // checkpoint folds it rather than making it three.
    let next = loop {
        match handle.trigger_checkpoint().await {
            Ok(id) => break id,
            Err(e) => {
                assert!(
                    started.elapsed() < Duration::from_secs(60),
                    "no checkpoint after the restart: {e}"
                );
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
        }
    };
    let result = handle.wait().await.expect("completes");
    assert_eq!(
        result.recoveries[0].restored_from.map(|c| c.0),
        Some(3),
        "{result:?}"
    );
    let meta = metadata(&storage, next).await;
    assert_eq!(
        chain_len(&meta),
        0,
        "checkpoint {next} after restoring a chain of 2 ({result:?})"
    );
}
