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
