//! `S3CheckpointStorage` while the S3 server (Garage, `scripts/s3-server.sh`)
//! is down: which failures are determinate and which are not.
//!
//! The test stops the server, so it is alone in its test binary (test
//! binaries run one after another) and restarts the server however it
//! ends. It needs control of the server: `scripts/test.sh` starts it and
//! sets `SLUICE_S3_CONTROL=1` and `SLUICE_S3_SCRIPT`.

use sluice_backend_s3::{S3CheckpointStorage, S3Config};
use sluice_core::CheckpointStorageExt;
use sluice_core::{Bytes, CheckpointId, CheckpointStorage, Error};
use std::time::Duration;

fn server(cmd: &str) -> bool {
    let script = std::env::var("SLUICE_S3_SCRIPT").expect("SLUICE_S3_SCRIPT");
    match std::process::Command::new(script).arg(cmd).status() {
        Ok(status) => status.success(),
        Err(e) => {
            eprintln!("cannot run s3-server.sh {cmd}: {e}");
            false
        }
    }
}

/// Stops the server; starts it again when dropped, also when the test fails.
struct Outage;

impl Outage {
    fn begin() -> Outage {
        assert!(server("stop"), "s3-server.sh stop failed");
        Outage
    }
}

impl Drop for Outage {
    fn drop(&mut self) {
        if !server("start") {
            // Not a panic: this may run while a failed assertion unwinds.
            eprintln!("s3-server.sh start failed: the S3 server is down; run `scripts/s3-server.sh start`");
        }
    }
}

/// The bucket, when the server is under this test's control.
fn controlled_bucket() -> Option<String> {
    let controlled = std::env::var_os("SLUICE_S3_CONTROL").is_some();
    match std::env::var("SLUICE_S3_BUCKET") {
        Ok(b) if controlled => Some(b),
        _ if std::env::var_os("SLUICE_REQUIRE_S3").is_some() && !controlled => {
            eprintln!("skipped: the S3 server was not started by scripts/test.sh, so it cannot be stopped");
            None
        }
        _ if std::env::var_os("SLUICE_REQUIRE_S3").is_some() => panic!("SLUICE_S3_BUCKET is not set"),
        _ => {
            eprintln!("skipped: no S3 server under the test's control (run scripts/test.sh)");
            None
        }
    }
}

fn kind(r: &Result<impl Sized, Error>) -> &'static str {
    match r {
        Ok(_) => "ok",
        Err(Error::Storage { .. }) => "storage (determinate)",
        Err(Error::Indeterminate { .. }) => "indeterminate",
        Err(Error::NotFound { .. }) => "not found",
        Err(Error::AlreadyExists { .. }) => "already exists",
        Err(_) => "other",
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_s3_down_writes_that_may_have_been_sent_are_indeterminate_and_reads_are_determinate() {
    let Some(bucket) = controlled_bucket() else { return };
    let mut config = S3Config::new(bucket, format!("tests/outage-{}", std::process::id()));
    config.attempt_timeout = Duration::from_secs(2);
    config.operation_timeout = Duration::from_secs(4);
    config.max_attempts = 2;
    let endpoint = std::env::var("AWS_ENDPOINT_URL").expect("AWS_ENDPOINT_URL");
    let s = S3CheckpointStorage::open(config).await.expect("open S3 storage");
    let meta = Bytes::from_static(b"{\"checkpoint\":1}");
    s.write_file("chk-1/op-0.kst", Bytes::from_static(b"state"))
        .await
        .unwrap();
    s.commit_metadata(CheckpointId(1), meta.clone()).await.unwrap();
    s.commit_file("sp/_metadata", meta.clone()).await.unwrap();

    let outage = Outage::begin();
    // Reads have no effect: determinate, whatever happened to the request.
    let r = s.read_metadata(CheckpointId(1)).await;
    assert_eq!(kind(&r), "storage (determinate)", "{:?}", r.err());
    let text = r.unwrap_err().to_string();
    assert!(
        text.contains(&endpoint) && text.contains("--s3-endpoint") && !text.contains('\n'),
        "{text}"
    );
    let r = s.read_range("chk-1/op-0.kst", 0..2).await;
    assert_eq!(kind(&r), "storage (determinate)", "{:?}", r.err());
    let r = s.list().await;
    assert_eq!(kind(&r), "storage (determinate)", "{:?}", r.err());
    // A DELETE is sent first by `discard` and `delete_dir`: it may have
    // reached the store before the connection failed.
    let r = s.discard(CheckpointId(1)).await;
    assert_eq!(kind(&r), "indeterminate", "{:?}", r.err());
    assert!(r
        .unwrap_err()
        .to_string()
        .contains("may or may not have taken effect"));
    let r = s.delete_dir("sp").await;
    assert_eq!(kind(&r), "indeterminate", "{:?}", r.err());
    // A commit is a PUT: indeterminate once sent. On a store that ignores
    // If-None-Match (Garage) a HEAD precedes the PUT; when the HEAD fails
    // the PUT is never sent, and the failure is determinate.
    let expected = if s.conditional_writes() {
        "indeterminate"
    } else {
        "storage (determinate)"
    };
    let r = s.commit_metadata(CheckpointId(2), meta.clone()).await;
    assert_eq!(kind(&r), expected, "{:?}", r.err());
    let r = s.write_file("chk-2/op-0.kst", Bytes::from_static(b"state")).await;
    assert_eq!(kind(&r), expected, "{:?}", r.err());
    drop(outage);

    // Nothing of the above took effect: the server was down.
    assert_eq!(s.read_metadata(CheckpointId(1)).await.unwrap(), meta);
    assert_eq!(s.read_file("sp/_metadata").await.unwrap(), meta);
    assert!(s.read_metadata(CheckpointId(2)).await.unwrap_err().is_not_found());
    s.discard(CheckpointId(1)).await.unwrap();
    s.delete_dir("sp").await.unwrap();
}
