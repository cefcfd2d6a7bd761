//! The core conformance suite, on a directory.

use sluice_backend_fs::FsCheckpointStorage;
use sluice_core::{testkit, CheckpointStorage};
use std::sync::Arc;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fs_checkpoint_storage_passes_the_storage_suite() {
    let dir = tempfile::tempdir().unwrap();
    let storage = FsCheckpointStorage::open(dir.path().join("checkpoints")).unwrap();
    testkit::run_checkpoint_storage_suite(&storage).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fs_checkpoint_storage_keeps_what_it_committed_across_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("checkpoints");
    testkit::storage_survives_reopen(|| {
        let root = root.clone();
        async move { Arc::new(FsCheckpointStorage::open(&root).unwrap()) as Arc<dyn CheckpointStorage> }
    })
    .await;
}
