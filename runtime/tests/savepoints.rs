//! Savepoints: triggered on a running job, stop-with-savepoint and restore
//! (exactly-once across the stop), rescaling 1 → 4 → 2, restore from a
//! retained checkpoint, state-backend and storage portability, relocation
//! by copying, uid mapping, type checks, and refusal of bad savepoints.

use sluice_backend_memory::{MemoryCheckpointStorage, MemoryStateBackend};
use sluice_backend_redb::{RedbCheckpointStorage, RedbStateBackend};
use sluice_core::metadata::SAVEPOINT_METADATA_FILE;
use sluice_core::CheckpointStorageExt;
use sluice_core::{Bytes, CheckpointKind, CheckpointMetadata, CheckpointStorage, StateBackend};
use sluice_runtime::prelude::*;
use sluice_runtime::workload::{self, key_of, RunningSum};
use sluice_runtime::{copy_savepoint, CheckpointStatus, RestoreSource, SavepointLocation};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

const SPLITS: u32 = 4;
const KEYS: u64 = 1000;

struct Spec {
    events: u64,
    parallelism: u32,
    paced: bool,
    uid: &'static str,
}

impl Spec {
    fn new(events: u64, parallelism: u32) -> Self {
        Spec {
            events,
            parallelism,
            paced: true,
            uid: "running-sum",
        }
    }
}

fn memory() -> (Arc<dyn StateBackend>, Arc<dyn CheckpointStorage>) {
    (
        Arc::new(MemoryStateBackend::new()),
        Arc::new(MemoryCheckpointStorage::new()),
    )
}

/// The reference workload over a source of `SPLITS` splits (fixed, so the
/// job rescales), optionally paced so that a savepoint lands mid-run.
fn job<F: KeyedProcessFunction<u64, (u64, u64), (u64, u64)>>(
    spec: &Spec,
    state: Arc<dyn StateBackend>,
    storage: Arc<dyn CheckpointStorage>,
    function: F,
) -> Job {
    let job = Job::new("sp-test")
        .with_parallelism(spec.parallelism)
        .with_state_backend(state)
        .with_checkpoint_storage(storage)
        .with_restart_strategy(RestartStrategy::FixedDelay {
            attempts: 2,
            delay: Duration::ZERO,
        })
        .with_checkpointing(CheckpointConfig {
            retained: 1,
            ..CheckpointConfig::every(Duration::from_millis(50))
        });
    let mut source = SequenceSource::new(spec.events, SPLITS, |i| (key_of(i, KEYS), i));
    if spec.paced {
        source = source.paced(200, Duration::from_millis(1));
    }
    job.source("events", source, spec.parallelism)
        .key_by(|(k, _)| *k)
        .process(spec.uid, function)
        .sink(DiscardSink::new())
        .expect("job builds");
    job
}

/// The sums of the events before the positions a snapshot recorded: what a
/// consistent cut must hold.
fn sums_before_positions(meta: &CheckpointMetadata, events: u64) -> HashMap<u64, u64> {
    let op = meta
        .operators
        .iter()
        .find(|o| o.uid.as_str() == "events")
        .expect("source positions");
    let mut sums = HashMap::new();
    let mut seen = 0;
    for st in &op.subtasks {
        for p in &st.splits {
            seen += 1;
            let start = (u128::from(events) * u128::from(p.split) / u128::from(SPLITS)) as u64;
            for i in start..p.offset {
                *sums.entry(key_of(i, KEYS)).or_insert(0) += i;
            }
        }
    }
    assert_eq!(seen, SPLITS, "a position for every split");
    sums
}

/// The sums of the events after the positions (what a job that starts
/// empty from those positions sees).
fn sums_after_positions(meta: &CheckpointMetadata, events: u64) -> HashMap<u64, u64> {
    let before = sums_before_positions(meta, events);
    let all = workload::expected_sums(events, KEYS);
    let mut after = HashMap::new();
    for (k, total) in all.iter().enumerate() {
        let rest = total - before.get(&(k as u64)).copied().unwrap_or(0);
        if rest > 0 {
            after.insert(k as u64, rest);
        }
    }
    after
}

async fn assert_consistent_cut(location: &SavepointLocation, events: u64) -> CheckpointMetadata {
    let source = RestoreSource::open(location).await.expect("savepoint readable");
    let sums: HashMap<u64, u64> = workload::sums_in(&source, "running-sum")
        .await
        .expect("sums")
        .into_iter()
        .collect();
    let expected = sums_before_positions(&source.metadata, events);
    assert!(!expected.is_empty(), "the savepoint was taken after some records");
    assert_eq!(
        sums, expected,
        "the savepoint's state holds exactly the records before its source positions"
    );
    (*source.metadata).clone()
}

async fn final_sums_exactly_once(
    storage: &dyn CheckpointStorage,
    result: &sluice_runtime::JobResult,
    events: u64,
) {
    let sums = workload::final_sums(storage, result.final_checkpoint.expect("final checkpoint"))
        .await
        .expect("final sums");
    let v = workload::verify(&sums, events, KEYS);
    assert!(v.exactly_once(), "{v:?}");
}

/// Runs the job from `location` to its end (unpaced) on memory state and
/// storage, and checks its final state is exactly-once.
async fn finish_from(
    location: SavepointLocation,
    events: u64,
    parallelism: u32,
) -> sluice_runtime::JobResult {
    let (state, storage) = memory();
    let spec = Spec {
        paced: false,
        ..Spec::new(events, parallelism)
    };
    let result = job(&spec, state, storage.clone(), RunningSum::default())
        .from_savepoint(location)
        .execute()
        .await
        .expect("the restored job completes");
    final_sums_exactly_once(storage.as_ref(), &result, events).await;
    result
}

/// Runs `spec` until about `after`, then stops it with a savepoint under `target`.
async fn run_and_stop(
    spec: &Spec,
    state: Arc<dyn StateBackend>,
    storage: Arc<dyn CheckpointStorage>,
    from: Option<SavepointLocation>,
    target: SavepointLocation,
    after: Duration,
) -> sluice_runtime::Savepoint {
    let mut j = job(spec, state, storage, RunningSum::default());
    if let Some(from) = from {
        j = j.from_savepoint(from);
    }
    let handle = j.start().unwrap();
    tokio::time::sleep(after).await;
    let sp = handle
        .stop_with_savepoint(target)
        .await
        .expect("stop with savepoint");
    let result = handle
        .wait()
        .await
        .expect("the job ends cleanly after the savepoint");
    let stopped = result.stopped_with_savepoint.expect("stopped with a savepoint");
    assert_eq!(stopped.id, sp.id);
    assert!(result.final_checkpoint.is_none(), "stopped, not run to its end");
    sp
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_savepoint_on_a_running_job_is_a_consistent_self_contained_directory_that_retention_keeps() {
    let events = 400_000;
    let (state, storage) = memory();
    let targets = Arc::new(MemoryCheckpointStorage::new());
    let target = SavepointLocation::new(targets.clone(), "savepoints").unwrap();
    let handle = job(
        &Spec::new(events, 2),
        state,
        storage.clone(),
        RunningSum::default(),
    )
    .start()
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let sp = handle.trigger_savepoint(target).await.expect("savepoint");
    let at_savepoint = handle.source_records();
    assert!(at_savepoint < events, "the job was still running");
    let monitor = handle.monitor();
    let result = handle.wait().await.expect("the job goes on and completes");
    assert!(result.stopped_with_savepoint.is_none());
    final_sums_exactly_once(storage.as_ref(), &result, events).await;

    // Self-contained: every state file is inside the directory, named
    // relative to it, next to `_metadata`.
    assert!(
        sp.location.dir.starts_with("savepoints/savepoint-"),
        "{}",
        sp.path()
    );
    let files = targets.list_files(&sp.location.dir).await.unwrap();
    assert!(files
        .iter()
        .any(|f| f.path == sp.location.join(SAVEPOINT_METADATA_FILE)));
    let meta = assert_consistent_cut(&sp.location, events).await;
    assert_eq!(meta.kind, CheckpointKind::Savepoint);
    assert_eq!(meta.checkpoint_id, sp.id);
    assert!(!meta.sluice_version.is_empty());
    let sum_op = meta
        .operators
        .iter()
        .find(|o| o.uid.as_str() == "running-sum")
        .unwrap();
    assert_eq!(sum_op.parallelism, 2);
    assert_eq!(sum_op.states[0].name, "sum");
    assert_eq!(sum_op.states[0].value_type, "u64");
    for st in &sum_op.subtasks {
        let f = st.keyed_state.as_ref().unwrap();
        assert!(!f.path.contains('/'), "relative path {}", f.path);
        assert!(files.iter().any(|x| x.path == sp.location.join(&f.path)));
    }
    // Not a checkpoint: not in the job's listing, not discarded by
    // retention (1) although checkpoints completed after it.
    let later = monitor
        .checkpoint_stats()
        .iter()
        .filter(|s| s.id > sp.id && s.status == CheckpointStatus::Completed)
        .count();
    assert!(later >= 2, "checkpoints completed after the savepoint: {later}");
    assert!(storage.list().await.unwrap().iter().all(|c| c.id != sp.id));
    assert_eq!(targets.list_files(&sp.location.dir).await.unwrap(), files);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_with_savepoint_then_restore_is_exactly_once_across_the_stop() {
    let events = 400_000;
    let (state, storage) = memory();
    let targets: Arc<dyn CheckpointStorage> = Arc::new(MemoryCheckpointStorage::new());
    let target = SavepointLocation::new(targets, "").unwrap();
    let sp = run_and_stop(
        &Spec::new(events, 2),
        state,
        storage,
        None,
        target,
        Duration::from_millis(300),
    )
    .await;
    let meta = assert_consistent_cut(&sp.location, events).await;
    let read: u64 = meta
        .operators
        .iter()
        .flat_map(|o| &o.subtasks)
        .flat_map(|s| &s.splits)
        .map(|p| p.offset - events * u64::from(p.split) / u64::from(SPLITS))
        .sum();
    assert!(
        read > 0 && read < events,
        "stopped mid-run: {read} of {events} read"
    );

    let result = finish_from(sp.location.clone(), events, 2).await;
    assert!(result
        .restored_from_savepoint
        .as_ref()
        .unwrap()
        .contains("savepoint"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rescaling_1_to_4_to_2_through_savepoints_gives_identical_keyed_results() {
    let events = 300_000;
    let targets: Arc<dyn CheckpointStorage> = Arc::new(MemoryCheckpointStorage::new());
    let target = SavepointLocation::new(targets, "sp").unwrap();
    let (state, storage) = memory();
    let sp1 = run_and_stop(
        &Spec::new(events, 1),
        state,
        storage,
        None,
        target.clone(),
        Duration::from_millis(200),
    )
    .await;
    assert_consistent_cut(&sp1.location, events).await;
    let (state, storage) = memory();
    let sp2 = run_and_stop(
        &Spec::new(events, 4),
        state,
        storage,
        Some(sp1.location.clone()),
        target,
        Duration::from_millis(150),
    )
    .await;
    let meta2 = assert_consistent_cut(&sp2.location, events).await;
    assert!(sp2.id > sp1.id, "ids continue after the savepoint's");
    let op = meta2
        .operator(&sluice_core::OperatorUid("running-sum".into()))
        .unwrap();
    assert_eq!(op.parallelism, 4);
    let mut ranges: Vec<_> = op
        .subtasks
        .iter()
        .map(|s| s.keyed_state.as_ref().unwrap().key_groups)
        .collect();
    ranges.sort_by_key(|r| r.start);
    assert_eq!(ranges.len(), 4);
    assert_eq!(ranges[0].start, 0);
    assert_eq!(ranges[3].end, 127);
    for w in ranges.windows(2) {
        assert_eq!(
            w[0].end + 1,
            w[1].start,
            "the four ranges partition the key groups"
        );
    }
    finish_from(sp2.location, events, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retained_checkpoint_of_a_cancelled_job_restores_at_another_parallelism() {
    let events = 400_000;
    let dir = tempfile::tempdir().unwrap();
    let storage: Arc<dyn CheckpointStorage> =
        Arc::new(RedbCheckpointStorage::open(dir.path().join("chk.redb")).unwrap());
    let handle = job(
        &Spec::new(events, 2),
        Arc::new(MemoryStateBackend::new()),
        storage.clone(),
        RunningSum::default(),
    )
    .start()
    .unwrap();
    let monitor = handle.monitor();
    while monitor
        .checkpoint_stats()
        .iter()
        .filter(|s| s.status == CheckpointStatus::Completed)
        .count()
        < 2
    {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    handle.cancel();
    assert!(matches!(handle.wait().await, Err(RuntimeError::Cancelled)));
    let latest = sluice_core::storage::latest_completed(storage.as_ref())
        .await
        .unwrap()
        .unwrap();
    let location = SavepointLocation::new(storage.clone(), latest.dir()).unwrap();
    assert_eq!(location.checkpoint_id(), Some(latest));
    let spec = Spec {
        paced: false,
        ..Spec::new(events, 3)
    };
    let state_dir = tempfile::tempdir().unwrap();
    let result = job(
        &spec,
        Arc::new(RedbStateBackend::new(state_dir.path()).unwrap()),
        storage.clone(),
        RunningSum::default(),
    )
    .from_savepoint(location)
    .execute()
    .await
    .unwrap();
    assert!(result
        .restored_from_savepoint
        .as_ref()
        .unwrap()
        .contains(&latest.dir()));
    final_sums_exactly_once(storage.as_ref(), &result, events).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn savepoints_move_between_memory_and_redb_state_backends_and_storages() {
    let events = 300_000;
    let dir = tempfile::tempdir().unwrap();
    let redb_targets: Arc<dyn CheckpointStorage> =
        Arc::new(RedbCheckpointStorage::open(dir.path().join("savepoints.redb")).unwrap());
    let memory_targets: Arc<dyn CheckpointStorage> = Arc::new(MemoryCheckpointStorage::new());
    // Memory state → savepoint in a redb file.
    let (state, storage) = memory();
    let sp1 = run_and_stop(
        &Spec::new(events, 2),
        state,
        storage,
        None,
        SavepointLocation::new(redb_targets.clone(), "").unwrap(),
        Duration::from_millis(150),
    )
    .await;
    assert!(sp1.path().starts_with("redb:"), "{}", sp1.path());
    // → redb state, savepoint in memory storage.
    let state_dir = tempfile::tempdir().unwrap();
    let sp2 = run_and_stop(
        &Spec::new(events, 2),
        Arc::new(RedbStateBackend::new(state_dir.path()).unwrap()),
        Arc::new(MemoryCheckpointStorage::new()),
        Some(sp1.location.clone()),
        SavepointLocation::new(memory_targets, "x").unwrap(),
        Duration::from_millis(150),
    )
    .await;
    assert_consistent_cut(&sp2.location, events).await;
    // → memory state again, to the end.
    finish_from(sp2.location, events, 2).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copied_savepoint_restores_from_its_new_place_after_the_original_is_gone() {
    let events = 300_000;
    let dir = tempfile::tempdir().unwrap();
    let a: Arc<dyn CheckpointStorage> =
        Arc::new(RedbCheckpointStorage::open(dir.path().join("a.redb")).unwrap());
    let b: Arc<dyn CheckpointStorage> =
        Arc::new(RedbCheckpointStorage::open(dir.path().join("b.redb")).unwrap());
    let (state, storage) = memory();
    let sp = run_and_stop(
        &Spec::new(events, 2),
        state,
        storage,
        None,
        SavepointLocation::new(a.clone(), "team/savepoints").unwrap(),
        Duration::from_millis(150),
    )
    .await;
    let expected = assert_consistent_cut(&sp.location, events).await;
    // Another file, another folder.
    let moved = SavepointLocation::new(b.clone(), "archive/2026/keep-me").unwrap();
    copy_savepoint(&sp.location, &moved).await.expect("copy");
    // By hand, file by file, into another folder of the same file: the
    // metadata is copied unchanged.
    let by_hand = SavepointLocation::new(a.clone(), "elsewhere").unwrap();
    for f in a.list_files(&sp.location.dir).await.unwrap() {
        let rel = f.path.strip_prefix(&format!("{}/", sp.location.dir)).unwrap();
        let bytes = a.read_file(&f.path).await.unwrap();
        a.commit_file(&by_hand.join(rel), bytes).await.unwrap();
    }
    assert!(
        copy_savepoint(&sp.location, &moved).await.is_err(),
        "copying onto an existing savepoint is refused"
    );
    a.delete_dir(&sp.location.dir).await.unwrap();
    assert!(
        RestoreSource::open(&sp.location).await.is_err(),
        "the original is gone"
    );
    for location in [moved, by_hand] {
        let meta = assert_consistent_cut(&location, events).await;
        assert_eq!(meta, expected);
        finish_from(location, events, 2).await;
    }
}

async fn one_savepoint(events: u64) -> (Arc<dyn CheckpointStorage>, sluice_runtime::Savepoint) {
    let targets: Arc<dyn CheckpointStorage> = Arc::new(MemoryCheckpointStorage::new());
    let (state, storage) = memory();
    let sp = run_and_stop(
        &Spec::new(events, 2),
        state,
        storage,
        None,
        SavepointLocation::new(targets.clone(), "").unwrap(),
        Duration::from_millis(150),
    )
    .await;
    (targets, sp)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_maps_by_uid_new_operators_start_empty_and_unknown_state_needs_allow_non_restored_state() {
    let events = 300_000;
    let (_targets, sp) = one_savepoint(events).await;
    let spec = Spec {
        paced: false,
        uid: "running-sum-v2",
        ..Spec::new(events, 2)
    };
    // The savepoint's `running-sum` has no operator in the new job.
    let (state, storage) = memory();
    let err = job(&spec, state, storage, RunningSum::default())
        .from_savepoint(sp.location.clone())
        .execute()
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("running-sum") && msg.contains("allow non-restored state"),
        "{msg}"
    );
    // Allowed: that state is skipped, the new operator starts empty, the
    // source resumes at the savepoint's positions.
    let (state, storage) = memory();
    let result = job(&spec, state, storage.clone(), RunningSum::default())
        .from_savepoint(sp.location.clone())
        .allow_non_restored_state(true)
        .execute()
        .await
        .expect("non-restored state allowed");
    let source = RestoreSource::checkpoint(storage.clone(), result.final_checkpoint.unwrap())
        .await
        .unwrap();
    assert!(
        source
            .metadata
            .operator(&sluice_core::OperatorUid("running-sum".into()))
            .is_none(),
        "the skipped state is not carried on"
    );
    let sums: HashMap<u64, u64> = workload::sums_in(&source, "running-sum-v2")
        .await
        .unwrap()
        .into_iter()
        .collect();
    let meta = RestoreSource::open(&sp.location).await.unwrap().metadata;
    assert_eq!(
        sums,
        sums_after_positions(&meta, events),
        "the new operator saw exactly the records after the savepoint"
    );
}

/// The running sum, but its `sum` registered as `i32`.
#[derive(Clone, Default)]
struct SumAsI32(Option<ValueState<i32>>);

impl KeyedProcessFunction<u64, (u64, u64), (u64, u64)> for SumAsI32 {
    fn open(&mut self, ctx: &mut OpenContext<'_>) -> Result<()> {
        self.0 = Some(ctx.value_state("sum")?);
        Ok(())
    }
    fn process(
        &mut self,
        key: &u64,
        (_, v): (u64, u64),
        ctx: &mut KeyedContext<'_>,
        out: &mut Collector<'_, (u64, u64)>,
    ) -> Result<()> {
        let state = self.0.as_ref().expect("opened");
        let sum = state.get(ctx)?.unwrap_or(0).wrapping_add(v as i32);
        state.set(ctx, &sum)?;
        out.collect((*key, sum as u64))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn incompatible_state_types_max_parallelism_or_splits_are_refused_without_restarts() {
    let events = 300_000;
    let (_targets, sp) = one_savepoint(events).await;
    let spec = Spec {
        paced: false,
        ..Spec::new(events, 2)
    };
    let (state, storage) = memory();
    let err = job(&spec, state, storage, SumAsI32::default())
        .from_savepoint(sp.location.clone())
        .execute()
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(
            err,
            RuntimeError::Storage(sluice_core::Error::Incompatible { .. })
        ),
        "refused at once, not after restarts: {msg}"
    );
    assert!(
        msg.contains("running-sum") && msg.contains("\"sum\"") && msg.contains("u64") && msg.contains("i32"),
        "{msg}"
    );

    let (state, storage) = memory();
    let err = job(&spec, state, storage, RunningSum::default())
        .with_max_parallelism(64)
        .from_savepoint(sp.location.clone())
        .execute()
        .await
        .unwrap_err();
    assert!(err.to_string().contains("max parallelism"), "{err}");

    let (state, storage) = memory();
    let j = Job::new("sp-test")
        .with_state_backend(state)
        .with_checkpoint_storage(storage)
        .from_savepoint(sp.location.clone());
    j.source(
        "events",
        SequenceSource::new(events, SPLITS + 1, |i| (key_of(i, KEYS), i)),
        2,
    )
    .key_by(|(k, _)| *k)
    .process("running-sum", RunningSum::default())
    .sink(DiscardSink::new())
    .unwrap();
    let err = j.execute().await.unwrap_err();
    assert!(
        matches!(
            err,
            RuntimeError::Storage(sluice_core::Error::Incompatible { .. })
        ),
        "{err}"
    );
    assert!(err.to_string().contains("4 splits"), "{err}");
}

/// Writes a copy of the savepoint at `sp` into `dir` of `storage`, changing
/// its metadata and state files with `edit_meta` and `edit_file`.
async fn tampered_copy(
    sp: &SavepointLocation,
    dir: &str,
    edit_meta: impl Fn(&mut serde_json::Value),
    edit_file: impl Fn(&mut Vec<u8>),
    raw_meta: Option<&[u8]>,
) -> SavepointLocation {
    let storage = sp.storage.clone();
    let target = SavepointLocation::new(storage.clone(), dir).unwrap();
    let mut first = true;
    for f in storage.list_files(&sp.dir).await.unwrap() {
        let rel = f.path.strip_prefix(&format!("{}/", sp.dir)).unwrap().to_string();
        if rel == SAVEPOINT_METADATA_FILE {
            continue;
        }
        let mut bytes = storage.read_file(&f.path).await.unwrap().to_vec();
        if first {
            edit_file(&mut bytes);
            first = false;
        }
        storage
            .write_file(&target.join(&rel), Bytes::from(bytes))
            .await
            .unwrap();
    }
    let meta = storage
        .read_file(&sp.join(SAVEPOINT_METADATA_FILE))
        .await
        .unwrap();
    let meta = match raw_meta {
        Some(raw) => raw.to_vec(),
        None => {
            let mut json: serde_json::Value = serde_json::from_slice(&meta).unwrap();
            edit_meta(&mut json);
            serde_json::to_vec(&json).unwrap()
        }
    };
    storage
        .commit_file(&target.join(SAVEPOINT_METADATA_FILE), Bytes::from(meta))
        .await
        .unwrap();
    target
}

async fn start_from(location: SavepointLocation, events: u64) -> RuntimeError {
    let (state, storage) = memory();
    let spec = Spec {
        paced: false,
        ..Spec::new(events, 2)
    };
    job(&spec, state, storage, RunningSum::default())
        .from_savepoint(location)
        .execute()
        .await
        .expect_err("the job must not start from a bad savepoint")
}

fn set_first_state_path(json: &mut serde_json::Value, path: &str) {
    for op in json["operators"].as_array_mut().unwrap() {
        for st in op["subtasks"].as_array_mut().unwrap() {
            if st.get("keyed_state").is_some() {
                st["keyed_state"]["path"] = serde_json::Value::String(path.into());
                return;
            }
        }
    }
    panic!("no keyed state in the savepoint");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metadata_paths_that_escape_the_savepoint_directory_are_refused_as_corrupt() {
    let events = 300_000;
    let (_targets, sp) = one_savepoint(events).await;
    for (i, bad) in ["../escape.kst", "/etc/passwd", "a/../../b.kst", ""]
        .into_iter()
        .enumerate()
    {
        let loc = tampered_copy(
            &sp.location,
            &format!("evil-{i}"),
            |j| set_first_state_path(j, bad),
            |_| {},
            None,
        )
        .await;
        let e = RestoreSource::open(&loc).await.unwrap_err();
        assert!(matches!(e, sluice_core::Error::Corrupt { .. }), "{bad:?}: {e}");
        let err = start_from(loc, events).await;
        assert!(
            matches!(err, RuntimeError::Storage(sluice_core::Error::Corrupt { .. })),
            "{bad:?}: {err}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_corrupt_or_truncated_savepoint_is_a_clear_error_and_the_job_does_not_start_from_it() {
    let events = 300_000;
    let (_targets, sp) = one_savepoint(events).await;
    let flipped = tampered_copy(
        &sp.location,
        "flipped",
        |_| {},
        |b| {
            let mid = b.len() / 2;
            b[mid] ^= 0x10;
        },
        None,
    )
    .await;
    let truncated = tampered_copy(
        &sp.location,
        "truncated",
        |_| {},
        |b| b.truncate(b.len() - 7),
        None,
    )
    .await;
    let garbage = tampered_copy(
        &sp.location,
        "garbage",
        |_| {},
        |_| {},
        Some(b"{\"format_version\": 1, "),
    )
    .await;
    for loc in [flipped, truncated, garbage] {
        let err = start_from(loc.clone(), events).await;
        let msg = err.to_string();
        assert!(
            matches!(err, RuntimeError::Storage(sluice_core::Error::Corrupt { .. })),
            "{}: {msg}",
            loc.dir
        );
        assert!(msg.contains(&loc.dir), "the error names the damaged file: {msg}");
    }
    // A directory without a savepoint.
    let empty = SavepointLocation::new(sp.location.storage.clone(), "nothing-here").unwrap();
    let err = start_from(empty, events).await;
    assert!(err.to_string().contains("nothing-here/_metadata"), "{err}");
}
