//! Shared files of incremental checkpoints are owned exactly on every
//! storage (memory, redb, a directory, S3 on a real Garage server): after a
//! run with restarts that ends in a failure, and after a `--resume` with a
//! smaller retention in a new storage instance, no file a retained
//! checkpoint references is missing and no file is left that none does.

use sluice_backend_fs::FsCheckpointStorage;
use sluice_backend_memory::{MemoryCheckpointStorage, MemoryStateBackend};
use sluice_backend_redb::{RedbCheckpointStorage, RedbStateBackend};
use sluice_backend_s3::{S3CheckpointStorage, S3Config};
use sluice_core::{CheckpointStorage, CheckpointStorageExt, StateBackend};
use sluice_runtime::prelude::*;
use sluice_runtime::testing::file_ownership;
use sluice_runtime::workload::{self, InjectedFailure, RunningSum};
use sluice_runtime::IncrementalPolicy;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

const EVENTS: u64 = 60_000;
/// Many keys, so that a checkpoint interval changes few of them (else the
/// stores take full snapshots).
const KEYS: u64 = 100_000;

type Open = Box<dyn Fn() -> Pin<Box<dyn Future<Output = Arc<dyn CheckpointStorage>>>>>;

fn job(
    storage: Arc<dyn CheckpointStorage>,
    backend: Arc<dyn StateBackend>,
    retained: usize,
    resume: bool,
    failures: Vec<Arc<InjectedFailure>>,
    attempts: u32,
) -> Job {
    let job = Job::new("incremental-storages")
        .with_parallelism(2)
        .with_state_backend(backend)
        .with_checkpoint_storage(storage)
        .resume_from_latest_checkpoint(resume)
        .with_restart_strategy(RestartStrategy::FixedDelay {
            attempts,
            delay: Duration::ZERO,
        })
        .with_checkpointing(CheckpointConfig {
            retained,
            incremental: Some(IncrementalPolicy {
                max_chain: 3,
                max_changes_ratio: 1.0,
            }),
            ..CheckpointConfig::every(Duration::from_millis(5))
        });
    job.source(
        "events",
        SequenceSource::new(EVENTS, 2, |i| (workload::key_of(i, KEYS), i))
            .paced(100, Duration::from_millis(1)),
        2,
    )
    .key_by(|(k, _)| *k)
    .process("running-sum", RunningSum::with_failures(failures))
    .sink(DiscardSink::new())
    .unwrap();
    job
}

async fn exact(storage: &dyn CheckpointStorage, when: &str) {
    let files = file_ownership(storage).await.unwrap();
    assert!(files.is_exact(), "{} {when}: {files:?}", storage.describe());
}

/// Run 1 restarts once and then fails for good (a second failure with one
/// restart allowed); run 2 resumes from a fresh instance of the storage
/// with one retained checkpoint instead of four, and completes.
async fn ownership_is_exact(open: Open, backend: impl Fn() -> Arc<dyn StateBackend>) {
    let storage = open().await;
    let failures = vec![
        InjectedFailure::new(0, 8_000, false),
        InjectedFailure::new(1, 6_000, true),
    ];
    let err = job(storage.clone(), backend(), 4, false, failures, 1)
        .execute()
        .await
        .expect_err("the second failure ends run 1");
    assert!(err.to_string().contains("injected"), "{err}");
    exact(storage.as_ref(), "after a failed run").await;
    // The retained checkpoints do share files.
    let mut chained = 0;
    for c in storage.list().await.unwrap().into_iter().filter(|c| c.committed) {
        let meta = sluice_core::metadata::read_checkpoint_metadata(storage.as_ref(), c.id)
            .await
            .unwrap();
        chained += usize::from(meta.state_size() > meta.own_state_size());
    }
    assert!(
        chained > 0,
        "{}: no retained checkpoint references another's files",
        storage.describe()
    );
    drop(storage);
    let storage = open().await;
    let result = job(storage.clone(), backend(), 1, true, vec![], 0)
        .execute()
        .await
        .expect("run 2 resumes and completes");
    assert!(result.resumed_from.is_some(), "{result:?}");
    exact(storage.as_ref(), "after the resumed run").await;
    let sums = workload::final_sums(storage.as_ref(), result.final_checkpoint.unwrap())
        .await
        .unwrap();
    let v = workload::verify(&sums, EVENTS, KEYS);
    assert!(v.exactly_once(), "{v:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_memory_storage() {
    let storage: Arc<dyn CheckpointStorage> = Arc::new(MemoryCheckpointStorage::new());
    ownership_is_exact(
        Box::new(move || {
            let s = storage.clone();
            Box::pin(async move { s })
        }),
        || Arc::new(MemoryStateBackend::new()),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_redb_storage_with_the_redb_state_backend() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("chk.redb");
    let state = dir.path().join("state");
    ownership_is_exact(
        Box::new(move || {
            let path = path.clone();
            Box::pin(async move {
                Arc::new(RedbCheckpointStorage::open(&path).unwrap()) as Arc<dyn CheckpointStorage>
            })
        }),
        move || Arc::new(RedbStateBackend::new(&state).unwrap()),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_directory_storage() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("checkpoints");
    ownership_is_exact(
        Box::new(move || {
            let root = root.clone();
            Box::pin(async move {
                Arc::new(FsCheckpointStorage::open(&root).unwrap()) as Arc<dyn CheckpointStorage>
            })
        }),
        || Arc::new(MemoryStateBackend::new()),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_s3_storage() {
    let bucket = match (
        std::env::var("AWS_ENDPOINT_URL"),
        std::env::var("SLUICE_S3_BUCKET"),
    ) {
        (Ok(_), Ok(b)) => b,
        _ if std::env::var_os("SLUICE_REQUIRE_S3").is_some() => {
            panic!("SLUICE_REQUIRE_S3 is set but no S3 server is configured: start scripts/s3-server.sh")
        }
        _ => {
            eprintln!("skipped: no S3 server (run `scripts/s3-server.sh start` and `eval $(scripts/s3-server.sh env)`)");
            return;
        }
    };
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    let prefix = format!("runtime-tests/incremental-{n}");
    ownership_is_exact(
        Box::new(move || {
            let config = S3Config::new(bucket.clone(), prefix.clone());
            Box::pin(async move {
                Arc::new(S3CheckpointStorage::open(config).await.unwrap()) as Arc<dyn CheckpointStorage>
            })
        }),
        || Arc::new(MemoryStateBackend::new()),
    )
    .await;
}
