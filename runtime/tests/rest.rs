//! The REST API over real HTTP on loopback: status, checkpoint history,
//! triggering a checkpoint and a savepoint while records flow, bad
//! requests, stop-with-savepoint, and cancel.

use serde_json::{json, Value};
use sluice_backend_memory::{MemoryCheckpointStorage, MemoryStateBackend};
use sluice_core::CheckpointStorage;
use sluice_runtime::prelude::*;
use sluice_runtime::rest::{serve, RestClient, TargetResolver};
use sluice_runtime::workload::{self, key_of, RunningSum};
use sluice_runtime::{JobHandle, RestoreSource, SavepointLocation};
use std::sync::Arc;
use std::time::Duration;

const EVENTS: u64 = 2_000_000;

fn start_job(storage: Arc<dyn CheckpointStorage>) -> JobHandle {
    let job = Job::new("rest-test")
        .with_parallelism(2)
        .with_state_backend(Arc::new(MemoryStateBackend::new()))
        .with_checkpoint_storage(storage)
        .with_checkpointing(CheckpointConfig::every(Duration::from_millis(100)));
    job.source(
        "events",
        SequenceSource::new(EVENTS, 4, |i| (key_of(i, 100), i)).paced(100, Duration::from_millis(1)),
        2,
    )
    .key_by(|(k, _)| *k)
    .process("running-sum", RunningSum::default())
    .sink(DiscardSink::new())
    .unwrap();
    job.start().unwrap()
}

/// Targets `mem:DIR` name directories of one in-memory storage.
fn resolver(targets: Arc<dyn CheckpointStorage>) -> TargetResolver {
    Arc::new(move |target: String| {
        let targets = targets.clone();
        Box::pin(async move {
            match target.strip_prefix("mem:") {
                Some(dir) => Ok(SavepointLocation::new(targets, dir)?),
                None => Err(RuntimeError::InvalidJob(
                    "targets look like mem:DIR here".to_string(),
                )),
            }
        })
    })
}

/// Calls the API from a blocking thread; errors as their message.
async fn call<F: FnOnce(&RestClient) -> Result<Value, RuntimeError> + Send + 'static>(
    base: String,
    f: F,
) -> Result<Value, String> {
    tokio::task::spawn_blocking(move || f(&RestClient::new(&base, Duration::from_secs(60))))
        .await
        .unwrap()
        .map_err(|e| e.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rest_api_reports_and_triggers_over_http_and_stops_the_job_with_a_savepoint() {
    let storage: Arc<dyn CheckpointStorage> = Arc::new(MemoryCheckpointStorage::new());
    let targets: Arc<dyn CheckpointStorage> = Arc::new(MemoryCheckpointStorage::new());
    let handle = start_job(storage);
    let (addr, server) = serve(
        "127.0.0.1:0".parse().unwrap(),
        handle.monitor(),
        resolver(targets.clone()),
        None,
    )
    .await
    .unwrap();
    assert!(addr.ip().is_loopback());
    let base = format!("http://{addr}");

    let status = call(base.clone(), |c| c.get("/job")).await.unwrap();
    assert_eq!(status["name"], "rest-test");
    assert_eq!(status["state"], "RUNNING");

    let cp = call(base.clone(), |c| c.post("/checkpoints", json!({})))
        .await
        .unwrap();
    let cp_id = cp["id"].as_u64().expect("checkpoint id");

    let before = call(base.clone(), |c| c.get("/job")).await.unwrap()["source_records"]
        .as_u64()
        .unwrap();
    let sp = call(base.clone(), |c| {
        c.post("/savepoints", json!({ "target": "mem:saved", "stop": false }))
    })
    .await
    .unwrap();
    let location = sp["location"].as_str().unwrap().to_string();
    assert!(location.starts_with("memory#saved/savepoint-"), "{location}");
    let sp_dir = location.strip_prefix("memory#").unwrap().to_string();
    let source = RestoreSource::open(&SavepointLocation::new(targets.clone(), sp_dir).unwrap())
        .await
        .expect("the savepoint the API reported is there");
    assert_eq!(source.metadata.checkpoint_id.0, sp["id"].as_u64().unwrap());

    // Bad requests: clear 400s, and the job goes on.
    let e = call(base.clone(), |c| {
        c.post("/savepoints", json!({ "target": "ftp://x" }))
    })
    .await
    .unwrap_err();
    assert!(e.contains("400") && e.contains("mem:DIR"), "{e}");
    let e = call(base.clone(), |c| c.post("/savepoints", json!({ "nope": 1 })))
        .await
        .unwrap_err();
    assert!(e.contains("HTTP 4"), "{e}");
    let e = call(base.clone(), |c| c.get("/no-such-thing")).await.unwrap_err();
    assert!(e.contains("404") || e.contains("without JSON"), "{e}");

    let history = call(base.clone(), |c| c.get("/checkpoints")).await.unwrap();
    let entries = history["history"].as_array().unwrap();
    let find = |id: u64| entries.iter().find(|h| h["id"] == id).cloned();
    assert_eq!(find(cp_id).unwrap()["status"], "COMPLETED");
    assert_eq!(find(sp["id"].as_u64().unwrap()).unwrap()["kind"], "savepoint");
    assert!(history["counts"]["completed"].as_u64().unwrap() >= 2);
    assert!(history["latest_completed"]["id"].as_u64().is_some());

    // Stop with a savepoint: the job ends cleanly; later calls get 409.
    let stopped = call(base.clone(), |c| {
        c.post("/stop", json!({ "target": "mem:final" }))
    })
    .await
    .unwrap();
    assert_eq!(stopped["stopped"], true);
    let result = handle.wait().await.expect("the job ended cleanly");
    let savepoint = result.stopped_with_savepoint.expect("stopped with a savepoint");
    assert_eq!(savepoint.id.0, stopped["id"].as_u64().unwrap());
    let status = call(base.clone(), |c| c.get("/job")).await.unwrap();
    assert_eq!(status["state"], "FINISHED");
    let after = status["source_records"].as_u64().unwrap();
    assert!(after > before && after < EVENTS, "stopped mid-run: {after}");
    let e = call(base.clone(), |c| c.post("/checkpoints", json!({})))
        .await
        .unwrap_err();
    assert!(e.contains("409"), "{e}");
    // The stop savepoint holds what was read, exactly.
    let sums = workload::sums_in(
        &RestoreSource::open(&savepoint.location).await.unwrap(),
        "running-sum",
    )
    .await
    .unwrap();
    let total: u64 = sums.values().sum();
    assert!(total > 0);
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_over_http_cancels_the_job() {
    let handle = start_job(Arc::new(MemoryCheckpointStorage::new()));
    let (addr, server) = serve(
        "127.0.0.1:0".parse().unwrap(),
        handle.monitor(),
        resolver(Arc::new(MemoryCheckpointStorage::new())),
        None,
    )
    .await
    .unwrap();
    let base = format!("http://{addr}");
    let r = call(base.clone(), |c| c.post("/cancel", json!({})))
        .await
        .unwrap();
    assert_eq!(r["cancelled"], true);
    assert!(matches!(handle.wait().await, Err(RuntimeError::Cancelled)));
    let status = call(base, |c| c.get("/job")).await.unwrap();
    assert_eq!(status["state"], "CANCELLED");
    server.abort();
}
