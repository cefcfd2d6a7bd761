//! A corrupt checkpoint is never restored from. A job without
//! transactional sinks falls back to the previous retained checkpoint and
//! says so; a job whose two-phase-commit sinks already committed the
//! corrupt checkpoint's output fails instead (falling back would commit it
//! again), unless the fallback is explicitly allowed. A corrupt file
//! shared by an incremental chain rules out every checkpoint of the chain.

use sluice_backend_memory::MemoryStateBackend;
use sluice_backend_redb::RedbCheckpointStorage;
use sluice_core::CheckpointStorage;
use sluice_core::CheckpointStorageExt;
use sluice_runtime::file_sink::read_committed_lines;
use sluice_runtime::prelude::*;
use sluice_runtime::workload::{self, FinalSumSink, InjectedFailure, RunningSum};
use sluice_runtime::{FileSink, IncrementalPolicy};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

/// Flips a byte of a stored state file inside the redb file, as a disk would.
fn flip_a_byte(store: &Path, file: &str) {
    sluice_backend_redb::damage_stored_file(store, file, |v| {
        let at = v.len() / 2;
        v[at] ^= 0x08;
    })
    .unwrap();
}

/// The two newest committed checkpoints of the store at `path` (newest
/// first), after damaging the newest's first state file of `running-sum`,
/// whose path is returned too.
async fn damage_latest(path: &Path) -> (sluice_core::CheckpointId, sluice_core::CheckpointId, String) {
    let storage = RedbCheckpointStorage::open(path).unwrap();
    let listing = storage.list().await.unwrap();
    let committed: Vec<_> = listing.iter().filter(|c| c.committed).map(|c| c.id).collect();
    assert!(committed.len() >= 2, "need two retained checkpoints: {listing:?}");
    let latest = *committed.last().unwrap();
    let meta = sluice_core::metadata::read_checkpoint_metadata(&storage, latest)
        .await
        .unwrap();
    // A file of its own: its changes file if it is incremental (its base
    // belongs to an older checkpoint too), else its full snapshot.
    let subtask = &meta
        .operators
        .iter()
        .find(|o| o.uid.as_str() == "running-sum")
        .unwrap()
        .subtasks[0];
    let file = subtask
        .keyed_changes
        .last()
        .or(subtask.keyed_state.as_ref())
        .unwrap()
        .path
        .clone();
    assert!(
        file.starts_with(&format!("{}/", latest.dir())),
        "{file} belongs to {latest}"
    );
    drop(storage);
    flip_a_byte(path, &file);
    (latest, *committed.iter().rev().nth(1).unwrap(), file)
}

/// A run of the reference workload into `sink`, checkpointing into the
/// redb store at `path` (with `config`, else `job`'s), killed by a task
/// failure with no restarts after a few checkpoints.
async fn killed_run(
    path: &Path,
    config: Option<CheckpointConfig>,
    sink: &FinalSumSink,
    source: SequenceSource<(u64, u64)>,
    fail_after: u64,
) {
    let storage = Arc::new(RedbCheckpointStorage::open(path).unwrap());
    let mut job = job(storage, false).with_restart_strategy(RestartStrategy::None);
    if let Some(config) = config {
        job = job.with_checkpointing(config);
    }
    job.source("events", source, 2)
        .key_by(|(k, _)| *k)
        .process(
            "running-sum",
            RunningSum::with_failures(vec![InjectedFailure::new(0, fail_after, false)]),
        )
        .sink(sink.clone())
        .unwrap();
    assert!(job.execute().await.is_err());
}

/// Each of the two splits writes 2 000 distinct keys, then updates 64 hot
/// keys: after the load, few keys change between checkpoints. Paced.
fn hot_source(events: u64) -> SequenceSource<(u64, u64)> {
    SequenceSource::new(events, 2, move |i| (hot_key(events, i), i)).paced(100, Duration::from_millis(1))
}

fn hot_key(events: u64, i: u64) -> u64 {
    match i % (events / 2) {
        j if j < 2_000 => 1_000 + i,
        _ => i % 64,
    }
}

/// The reference workload over 50 keys, paced.
fn source(events: u64) -> SequenceSource<(u64, u64)> {
    SequenceSource::new(events, 2, |i| (workload::key_of(i, 50), i)).paced(100, Duration::from_millis(1))
}

fn job(storage: Arc<RedbCheckpointStorage>, resume: bool) -> Job {
    Job::new("corrupt")
        .with_parallelism(2)
        .with_state_backend(Arc::new(MemoryStateBackend::new()))
        .with_checkpoint_storage(storage)
        .with_restart_strategy(RestartStrategy::FixedDelay {
            attempts: 3,
            delay: Duration::ZERO,
        })
        .resume_from_latest_checkpoint(resume)
        .with_checkpointing(CheckpointConfig {
            retained: 3,
            ..CheckpointConfig::every(Duration::from_millis(10))
        })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_latest_checkpoint_falls_back_to_the_previous_one_and_stays_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("chk.redb");
    let events = 30_000;
    let sink = FinalSumSink::new();
    // Run 1: killed (no restarts) after a few checkpoints.
    killed_run(&path, None, &sink, source(events), 6_000).await;
    let (bad, previous, _) = damage_latest(&path).await;
    // Run 2: resumes; the latest is corrupt, so it restores the previous one.
    let storage = Arc::new(RedbCheckpointStorage::open(&path).unwrap());
    let job = job(storage, true);
    job.source("events", source(events), 2)
        .key_by(|(k, _)| *k)
        .process("running-sum", RunningSum::default())
        .sink(sink.clone())
        .unwrap();
    let result = job.execute().await.unwrap();
    assert_eq!(result.resumed_from, Some(bad));
    assert_eq!(result.recoveries.len(), 1, "{result:?}");
    assert!(result.recoveries[0].cause.contains("corrupt"), "{result:?}");
    assert_eq!(
        result.recoveries[0].restored_from,
        Some(previous),
        "fell back to the previous retained checkpoint"
    );
    let v = workload::verify(&sink.sums(), events, 50);
    assert!(v.exactly_once(), "{v:?}");
}

/// Incremental chains share their base: when a restore finds a shared file
/// corrupt, recovery skips every checkpoint that references it instead of
/// failing once per checkpoint of the chain.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_shared_base_skips_every_checkpoint_that_references_it() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("chk.redb");
    let events = 60_000;
    let sink = FinalSumSink::new();
    // Long chains: every retained checkpoint is built on the first one.
    let chains = CheckpointConfig {
        retained: 3,
        incremental: Some(IncrementalPolicy {
            max_chain: 1_000,
            max_changes_ratio: 1_000.0,
        }),
        ..CheckpointConfig::every(Duration::from_millis(10))
    };
    killed_run(&path, Some(chains.clone()), &sink, hot_source(events), 12_000).await;
    // Damage the base of the newest checkpoint's chain.
    let (latest, base) = {
        let storage = RedbCheckpointStorage::open(&path).unwrap();
        let committed: Vec<_> = storage
            .list()
            .await
            .unwrap()
            .into_iter()
            .filter(|c| c.committed)
            .collect();
        assert_eq!(committed.len(), 3, "{committed:?}");
        let mut bases = Vec::new();
        for c in &committed {
            let meta = sluice_core::metadata::read_checkpoint_metadata(&storage, c.id)
                .await
                .unwrap();
            let subtask = &meta
                .operators
                .iter()
                .find(|o| o.uid.as_str() == "running-sum")
                .unwrap()
                .subtasks[0];
            assert!(
                !subtask.keyed_changes.is_empty(),
                "checkpoint {} is incremental",
                c.id
            );
            bases.push(subtask.keyed_state.as_ref().unwrap().path.clone());
        }
        assert!(bases.iter().all(|b| *b == bases[0]), "one shared base: {bases:?}");
        (committed.last().unwrap().id, bases[0].clone())
    };
    flip_a_byte(&path, &base);
    let storage = Arc::new(RedbCheckpointStorage::open(&path).unwrap());
    let job = job(storage, true).with_checkpointing(chains);
    job.source("events", hot_source(events), 2)
        .key_by(|(k, _)| *k)
        .process("running-sum", RunningSum::default())
        .sink(sink.clone())
        .unwrap();
    let result = job.execute().await.unwrap();
    assert_eq!(result.resumed_from, Some(latest));
    assert_eq!(
        result.recoveries.len(),
        1,
        "one failed restore, then every checkpoint sharing {base} is skipped: {result:?}"
    );
    assert!(result.recoveries[0].cause.contains(&base), "{result:?}");
    assert_eq!(
        result.recoveries[0].restored_from, None,
        "no retained checkpoint is restorable: the job starts over"
    );
    let mut expected = rustc_hash::FxHashMap::default();
    for i in 0..events {
        *expected.entry(hot_key(events, i)).or_insert(0u64) += i;
    }
    assert_eq!(sink.sums(), expected, "exactly-once final sums");
}

/// Run 1 of the transactional cases: the reference workload into a
/// transactional file sink, checkpoints every 10 ms (three retained), killed
/// by a task failure with no restarts. Returns the latest and the previous
/// committed checkpoint, with the latest's first state file corrupted.
async fn killed_run_with_a_corrupt_latest_checkpoint(
    path: &Path,
    sink_dir: &Path,
    events: u64,
) -> (sluice_core::CheckpointId, sluice_core::CheckpointId, String) {
    {
        let storage = Arc::new(RedbCheckpointStorage::open(path).unwrap());
        let job = job(storage, false).with_restart_strategy(RestartStrategy::None);
        transactional_pipeline(
            &job,
            events,
            sink_dir,
            RunningSum::with_failures(vec![InjectedFailure::new(0, 6_000, false)]),
        );
        assert!(job.execute().await.is_err());
    }
    damage_latest(path).await
}

fn transactional_pipeline(job: &Job, events: u64, sink_dir: &Path, sum: RunningSum) {
    job.source(
        "events",
        SequenceSource::new(events, 2, |i| (workload::key_of(i, 50), i)).paced(100, Duration::from_millis(1)),
        2,
    )
    .key_by(|(k, _)| *k)
    .process("running-sum", sum)
    .transactional_sink("out", FileSink::new(sink_dir, workload::sum_line))
    .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_checkpoint_whose_completion_reached_the_sinks_is_never_silently_replaced_by_an_older_one()
{
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("chk.redb");
    let sink_dir = dir.path().join("out");
    let events = 30_000;
    let (bad, previous, file) = killed_run_with_a_corrupt_latest_checkpoint(&path, &sink_dir, events).await;
    let before = read_committed_lines(&sink_dir).unwrap();
    // Run 2 resumes: the latest checkpoint is corrupt and its output was
    // committed, so the job fails and says which file and what to do.
    {
        let storage = Arc::new(RedbCheckpointStorage::open(&path).unwrap());
        let job = job(storage, true);
        transactional_pipeline(&job, events, &sink_dir, RunningSum::default());
        let err = job.execute().await.expect_err("no silent fallback");
        let msg = err.to_string();
        assert!(
            matches!(err, RuntimeError::UnrestorableCheckpoint { checkpoint, .. } if checkpoint == bad),
            "{msg}"
        );
        assert!(msg.contains(&file), "names the corrupt file: {msg}");
        assert!(
            msg.contains(&format!("checkpoint {bad}")),
            "names the checkpoint: {msg}"
        );
        assert!(
            msg.contains("--allow-checkpoint-fallback"),
            "says how to proceed: {msg}"
        );
    }
    assert_eq!(
        read_committed_lines(&sink_dir).unwrap(),
        before,
        "nothing was committed again"
    );
    // Run 3 opts in to the fallback: it restores the previous checkpoint
    // and completes (its output may now hold duplicates: that was the choice).
    let storage = Arc::new(RedbCheckpointStorage::open(&path).unwrap());
    let job = job(storage, true).with_checkpointing(CheckpointConfig {
        retained: 3,
        fallback_to_older_checkpoint: true,
        ..CheckpointConfig::every(Duration::from_millis(10))
    });
    transactional_pipeline(&job, events, &sink_dir, RunningSum::default());
    let result = job.execute().await.expect("the opt-in falls back");
    assert_eq!(result.recoveries[0].restored_from, Some(previous), "{result:?}");
}

/// Corrupts, on read, every state file of the checkpoint whose id is set
/// (a disk going bad under a running job).
#[derive(Debug)]
struct RotOnRead {
    inner: Arc<dyn CheckpointStorage>,
    rotten: std::sync::atomic::AtomicU64,
}

impl RotOnRead {
    fn rot(&self, path: &str, mut b: bytes::Bytes) -> bytes::Bytes {
        let id = self.rotten.load(std::sync::atomic::Ordering::SeqCst);
        if id != 0 && path.starts_with(&format!("chk-{id}/")) && path.ends_with(".kst") && !b.is_empty() {
            let mut v = b.to_vec();
            let at = v.len() / 2;
            v[at] ^= 0x40;
            b = v.into();
        }
        b
    }
}

#[async_trait::async_trait]
impl CheckpointStorage for RotOnRead {
    fn describe(&self) -> String {
        self.inner.describe()
    }
    async fn write_file(&self, path: &str, data: bytes::Bytes) -> sluice_core::Result<()> {
        self.inner.write_file(path, data).await
    }
    async fn commit_file(&self, path: &str, data: bytes::Bytes) -> sluice_core::Result<()> {
        self.inner.commit_file(path, data).await
    }
    async fn read(
        &self,
        path: &str,
        range: Option<std::ops::Range<u64>>,
    ) -> sluice_core::Result<bytes::Bytes> {
        Ok(self.rot(path, self.inner.read(path, range).await?))
    }
    async fn list_files(&self, dir: &str) -> sluice_core::Result<Vec<sluice_core::FileListing>> {
        self.inner.list_files(dir).await
    }
    async fn delete_file(&self, path: &str) -> sluice_core::Result<()> {
        self.inner.delete_file(path).await
    }
    async fn delete_dir(&self, dir: &str) -> sluice_core::Result<()> {
        self.inner.delete_dir(dir).await
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_checkpoint_found_corrupt_during_recovery_fails_a_transactional_job_instead_of_falling_back() {
    let dir = tempfile::tempdir().unwrap();
    let sink_dir = dir.path().join("out");
    let events = 200_000;
    let storage = Arc::new(RotOnRead {
        inner: Arc::new(sluice_backend_memory::MemoryCheckpointStorage::new()),
        rotten: std::sync::atomic::AtomicU64::new(0),
    });
    let fail = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let job = Job::new("rot")
        .with_parallelism(2)
        .with_state_backend(Arc::new(MemoryStateBackend::new()))
        .with_checkpoint_storage(storage.clone())
        .with_checkpointing(CheckpointConfig {
            interval: None,
            retained: 3,
            ..Default::default()
        });
    let f = fail.clone();
    job.source(
        "events",
        SequenceSource::new(events, 2, |i| (workload::key_of(i, 50), i)).paced(100, Duration::from_millis(1)),
        2,
    )
    .key_by(|(k, _)| *k)
    .process("running-sum", RunningSum::default())
    .map(move |r| {
        if f.swap(false, std::sync::atomic::Ordering::SeqCst) {
            panic!("injected failure after the checkpoint went bad");
        }
        r
    })
    .transactional_sink("out", FileSink::new(&sink_dir, workload::sum_line))
    .unwrap();
    let handle = job.start().unwrap();
    let mut last = None;
    for _ in 0..3 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        last = Some(handle.trigger_checkpoint().await.expect("checkpoint"));
    }
    let last = last.unwrap();
    // Its completion was delivered; now its files go bad, and a task fails.
    tokio::time::sleep(Duration::from_millis(100)).await;
    storage.rotten.store(last.0, std::sync::atomic::Ordering::SeqCst);
    fail.store(true, std::sync::atomic::Ordering::SeqCst);
    let err = handle.wait().await.expect_err("no silent fallback");
    assert!(
        matches!(err, RuntimeError::UnrestorableCheckpoint { checkpoint, .. } if checkpoint == last),
        "{err}"
    );
    assert!(
        err.to_string().contains(&format!("chk-{last}/")),
        "names the file: {err}"
    );
    // The committed output is exactly the records before that checkpoint,
    // each once: nothing was replayed from an older one.
    let meta = sluice_core::metadata::read_checkpoint_metadata(storage.inner.as_ref(), last)
        .await
        .unwrap();
    let read = workload::events_read(&meta, "events", events, 2);
    let lines = read_committed_lines(&sink_dir).unwrap();
    workload::check_sum_lines(&lines, &workload::values_by_key(read, 50)).unwrap();
}
