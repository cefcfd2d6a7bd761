//! A corrupt checkpoint is never restored from: recovery falls back to the
//! previous retained checkpoint and says so.

use redb::{Database, ReadableDatabase, TableDefinition};
use sluice_backend_memory::MemoryStateBackend;
use sluice_backend_redb::RedbCheckpointStorage;
use sluice_core::CheckpointStorage;
use sluice_runtime::prelude::*;
use sluice_runtime::workload::{self, FinalSumSink, InjectedFailure, RunningSum};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

const CHUNKS: TableDefinition<(&str, u64), &[u8]> = TableDefinition::new("chunks");

/// Flips a byte of a stored state file inside the redb file, as a disk would.
fn flip_a_byte(store: &Path, file: &str) {
    let db = Database::create(store).unwrap();
    let read = db.begin_read().unwrap();
    let mut v = read
        .open_table(CHUNKS)
        .unwrap()
        .get((file, 0))
        .unwrap()
        .unwrap()
        .value()
        .to_vec();
    drop(read);
    let at = v.len() / 2;
    v[at] ^= 0x08;
    let tx = db.begin_write().unwrap();
    tx.open_table(CHUNKS)
        .unwrap()
        .insert((file, 0), v.as_slice())
        .unwrap();
    tx.commit().unwrap();
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
    let source = || {
        SequenceSource::new(events, 2, |i| (workload::key_of(i, 50), i)).paced(100, Duration::from_millis(1))
    };
    // Run 1: killed (no restarts) after a few checkpoints.
    {
        let storage = Arc::new(RedbCheckpointStorage::open(&path).unwrap());
        let job = job(storage, false).with_restart_strategy(RestartStrategy::None);
        job.source("events", source(), 2)
            .key_by(|(k, _)| *k)
            .process(
                "running-sum",
                RunningSum::with_failures(vec![InjectedFailure::new(0, 6_000, false)]),
            )
            .sink(sink.clone())
            .unwrap();
        assert!(job.execute().await.is_err());
    }
    let latest = {
        let storage = RedbCheckpointStorage::open(&path).unwrap();
        let listing = storage.list().await.unwrap();
        let committed: Vec<_> = listing.iter().filter(|c| c.committed).map(|c| c.id).collect();
        assert!(committed.len() >= 2, "need two retained checkpoints: {listing:?}");
        let latest = *committed.last().unwrap();
        let meta = sluice_core::metadata::read_checkpoint_metadata(&storage, latest)
            .await
            .unwrap();
        let op = meta
            .operators
            .iter()
            .find(|o| o.uid.as_str() == "running-sum")
            .unwrap();
        let file = op.subtasks[0].keyed_state.as_ref().unwrap().path.clone();
        drop(storage);
        flip_a_byte(&path, &file);
        (latest, *committed.iter().rev().nth(1).unwrap())
    };
    let (bad, previous) = latest;
    // Run 2: resumes; the latest is corrupt, so it restores the previous one.
    let storage = Arc::new(RedbCheckpointStorage::open(&path).unwrap());
    let job = job(storage, true);
    job.source("events", source(), 2)
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
