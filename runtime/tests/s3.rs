//! The reference workload with checkpoints on a real S3 server (Garage on
//! 127.0.0.1, started by `scripts/test.sh`).

use sluice_backend_memory::MemoryStateBackend;
use sluice_backend_s3::{S3CheckpointStorage, S3Config};
use sluice_runtime::prelude::*;
use sluice_runtime::workload::{self, InjectedFailure, RunningSum};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

fn bucket() -> Option<String> {
    match (
        std::env::var("AWS_ENDPOINT_URL"),
        std::env::var("SLUICE_S3_BUCKET"),
    ) {
        (Ok(_), Ok(b)) => Some(b),
        _ if std::env::var_os("SLUICE_REQUIRE_S3").is_some() => {
            panic!("SLUICE_REQUIRE_S3 is set but no S3 server is configured: start scripts/s3-server.sh")
        }
        _ => {
            eprintln!("skipped: no S3 server (run `scripts/s3-server.sh start` and `eval $(scripts/s3-server.sh env)`)");
            None
        }
    }
}

fn unique(name: &str) -> String {
    let n = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("runtime-tests/{name}-{n}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_reference_workload_checkpointing_to_s3_is_exactly_once_through_an_injected_failure() {
    let Some(bucket) = bucket() else { return };
    let storage = Arc::new(
        S3CheckpointStorage::open(S3Config::new(bucket, unique("eo")))
            .await
            .unwrap(),
    );
    let events = 200_000;
    let job = Job::new("s3-eo")
        .with_parallelism(2)
        .with_state_backend(Arc::new(MemoryStateBackend::new()))
        .with_checkpoint_storage(storage.clone())
        .with_restart_strategy(RestartStrategy::FixedDelay {
            attempts: 3,
            delay: Duration::ZERO,
        })
        .with_checkpointing(CheckpointConfig {
            retained: 2,
            ..CheckpointConfig::every(Duration::from_millis(100))
        });
    job.source(
        "events",
        SequenceSource::new(events, 2, |i| (workload::key_of(i, 1000), i))
            .paced(1000, Duration::from_millis(2)),
        2,
    )
    .key_by(|(k, _)| *k)
    .process(
        "running-sum",
        RunningSum::with_failures(vec![InjectedFailure::new(1, 60_000, true)]),
    )
    .sink(DiscardSink::new())
    .unwrap();
    let result = job.execute().await.unwrap();
    assert_eq!(result.restarts, 1);
    assert!(
        result.recoveries[0].restored_from.is_some(),
        "restored from an S3 checkpoint: {result:?}"
    );
    let sums = workload::final_sums(storage.as_ref(), result.final_checkpoint.unwrap())
        .await
        .unwrap();
    let v = workload::verify(&sums, events, 1000);
    assert!(v.exactly_once(), "{v:?}");
}

#[test]
fn the_cli_resumes_from_s3_after_being_killed() {
    let Some(bucket) = bucket() else { return };
    let dir = tempfile::tempdir().unwrap();
    let location = format!("s3://{bucket}/{}", unique("cli"));
    let run = |resume: bool, round: usize| {
        let err = dir.path().join(format!("err-{round}"));
        let out = dir.path().join(format!("out-{round}"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
        cmd.args([
            "run",
            "keyed-sum",
            "--events",
            "6000000",
            "--keys",
            "5000",
            "--checkpoint-interval",
            "100ms",
        ])
        .args(["--storage", &location, "--state", "memory"])
        .stdout(Stdio::from(std::fs::File::create(&out).unwrap()))
        .stderr(Stdio::from(std::fs::File::create(&err).unwrap()));
        if resume {
            cmd.arg("--resume");
        }
        (cmd.spawn().unwrap(), out, err)
    };
    // Kill it once a checkpoint is on S3.
    let (mut child, _, err) = run(false, 0);
    let started = Instant::now();
    loop {
        let log = std::fs::read_to_string(&err).unwrap_or_default();
        if log.contains("checkpoint 2 completed") {
            break;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the job ended before it was killed:\n{log}"
        );
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "no checkpoint within a minute:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let (mut child, out, err) = run(true, 1);
    let status = child.wait().unwrap();
    let stdout = std::fs::read_to_string(&out).unwrap();
    let stderr = std::fs::read_to_string(&err).unwrap();
    assert!(status.success(), "{stdout}\n{stderr}");
    assert!(stdout.contains("resumed from checkpoint"), "{stdout}");
    assert!(stdout.contains("exactly-once: ok"), "{stdout}\n{stderr}");
    // And the listing reads from S3.
    let list = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["checkpoints", "list", "--storage", &location])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&list.stdout);
    assert!(
        list.status.success() && text.contains("completed checkpoints in s3://"),
        "{text}"
    );
}

/// Savepoints on S3: taken straight to an S3 target, moved from redb to S3
/// and from S3 to redb with `copy_savepoint`, and relocated inside S3 by a
/// plain object copy (no Sluice code): each restores exactly-once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn savepoints_move_between_redb_and_s3_and_restore_from_a_plain_s3_copy() {
    use sluice_backend_redb::RedbCheckpointStorage;
    use sluice_runtime::location::{open_location, S3Options};
    use sluice_runtime::{copy_savepoint, SavepointLocation};
    let Some(bucket) = bucket() else { return };
    let events = 300_000;
    let keys = 1000;
    let dir = tempfile::tempdir().unwrap();
    let redb: Arc<dyn sluice_core::CheckpointStorage> =
        Arc::new(RedbCheckpointStorage::open(dir.path().join("sp.redb")).unwrap());
    let base = unique("savepoints");
    let s3 = S3Options::default();
    let build = |storage: Arc<dyn sluice_core::CheckpointStorage>, paced: bool| {
        let job = Job::new("s3-sp")
            .with_parallelism(2)
            .with_state_backend(Arc::new(MemoryStateBackend::new()))
            .with_checkpoint_storage(storage)
            .with_checkpointing(CheckpointConfig::every(Duration::from_millis(100)));
        let mut source = SequenceSource::new(events, 4, move |i| (workload::key_of(i, keys), i));
        if paced {
            source = source.paced(200, Duration::from_millis(1));
        }
        job.source("events", source, 2)
            .key_by(|(k, _)| *k)
            .process("running-sum", RunningSum::default())
            .sink(DiscardSink::new())
            .unwrap();
        job
    };
    let finish_from = |location: SavepointLocation| async move {
        let storage = Arc::new(sluice_backend_memory::MemoryCheckpointStorage::new());
        let result = build(storage.clone(), false)
            .from_savepoint(location.clone())
            .execute()
            .await
            .unwrap_or_else(|e| panic!("restore from {}: {e}", location.describe()));
        let sums = workload::final_sums(storage.as_ref(), result.final_checkpoint.unwrap())
            .await
            .unwrap();
        let v = workload::verify(&sums, events, keys);
        assert!(v.exactly_once(), "from {}: {v:?}", location.describe());
    };

    // Stop a job with a savepoint straight to S3.
    let target = open_location(&format!("s3://{bucket}/{base}/direct"), &s3)
        .await
        .unwrap();
    let handle = build(
        Arc::new(sluice_backend_memory::MemoryCheckpointStorage::new()),
        true,
    )
    .start()
    .unwrap();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let on_s3 = handle.stop_with_savepoint(target).await.expect("savepoint to S3");
    handle.wait().await.unwrap();
    assert!(
        on_s3
            .path()
            .starts_with(&format!("s3://{bucket}/{base}/direct/savepoint-")),
        "{}",
        on_s3.path()
    );
    // The path it reports opens as a location again.
    let reopened = open_location(&on_s3.path(), &s3).await.unwrap();

    // S3 → redb with the copy tool, and redb → S3 again.
    let in_redb = SavepointLocation::new(redb.clone(), "from-s3").unwrap();
    copy_savepoint(&reopened, &in_redb).await.unwrap();
    let back = open_location(&format!("s3://{bucket}/{base}/from-redb"), &s3)
        .await
        .unwrap();
    copy_savepoint(&in_redb, &back).await.unwrap();

    // A plain S3 copy of every object to another prefix, as `aws s3 cp
    // --recursive` would do.
    let storage = S3CheckpointStorage::open(S3Config::new(&bucket, ""))
        .await
        .unwrap();
    let from_prefix = format!(
        "{}/",
        on_s3.path().strip_prefix(&format!("s3://{bucket}/")).unwrap()
    );
    let to_prefix = format!("{base}/plain-copy/");
    let listed = storage
        .client()
        .list_objects_v2()
        .bucket(&bucket)
        .prefix(&from_prefix)
        .send()
        .await
        .unwrap();
    assert!(listed.contents().len() >= 3, "metadata and state files");
    for o in listed.contents() {
        let key = o.key().unwrap();
        storage
            .client()
            .copy_object()
            .bucket(&bucket)
            .copy_source(format!("{bucket}/{key}"))
            .key(format!("{to_prefix}{}", &key[from_prefix.len()..]))
            .send()
            .await
            .unwrap();
    }
    let plain = open_location(&format!("s3://{bucket}/{to_prefix}"), &s3)
        .await
        .unwrap();

    for location in [reopened, in_redb, back, plain] {
        finish_from(location).await;
    }
}
