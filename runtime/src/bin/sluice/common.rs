//! What the commands share: opening storages and locations, the state
//! backend, intervals, the runtime, and how errors end the process.

use sluice_core::{CheckpointStorage, StateBackend};
use sluice_runtime::location::{self, OpenMode};
use sluice_runtime::SavepointLocation;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

pub(crate) fn parse_interval(s: &str) -> Result<Option<Duration>, String> {
    if s.eq_ignore_ascii_case("none") || s.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    let d = humantime::parse_duration(s)
        .map_err(|e| format!("--checkpoint-interval {s:?}: {e} (examples: 1s, 100ms, none)"))?;
    if d.is_zero() {
        return Err("--checkpoint-interval must be positive, or `none`".into());
    }
    Ok(Some(d))
}

pub(crate) fn state_backend(name: &str, dir: &std::path::Path) -> Result<Arc<dyn StateBackend>, String> {
    match name {
        "memory" => Ok(Arc::new(sluice_backend_memory::MemoryStateBackend::new())),
        "redb" => sluice_backend_redb::RedbStateBackend::new(dir)
            .map(|b| Arc::new(b) as Arc<dyn StateBackend>)
            .map_err(|e| format!("--state redb: {e}")),
        other => Err(format!(
            "--state {other:?}: unknown state backend (available: redb, memory)"
        )),
    }
}

/// Opens the storage named by `spec`. S3 storages hold the job's directory
/// `<prefix>/<job>`.
pub(crate) async fn checkpoint_storage(
    spec: &str,
    s3_endpoint: Option<&str>,
    job: &str,
    mode: OpenMode,
) -> Result<Arc<dyn CheckpointStorage>, String> {
    let s3 = s3_options(s3_endpoint);
    let spec_for_job = match spec.strip_prefix("s3://") {
        Some(rest) => format!("s3://{}/{job}", rest.trim_end_matches('/')),
        None => spec.to_string(),
    };
    location::open_storage_with(&spec_for_job, &s3, mode)
        .await
        .map_err(|e| failed(&format!("--storage {spec}"), &e))
}

/// The one-line message of a failure to open `what`; the error's whole
/// source chain goes to the debug log (`RUST_LOG=debug`).
pub(crate) fn failed(what: &str, e: &sluice_core::Error) -> String {
    let mut chain = String::new();
    let mut next = std::error::Error::source(e);
    while let Some(cause) = next {
        chain.push_str("\n  caused by: ");
        chain.push_str(&cause.to_string());
        next = cause.source();
    }
    tracing::debug!("{what}: {e}{chain}");
    format!("{what}: {e}")
}

pub(crate) fn s3_options(endpoint: Option<&str>) -> location::S3Options {
    location::S3Options {
        endpoint: endpoint.map(str::to_string),
    }
}

pub(crate) async fn open_location(
    spec: &str,
    s3_endpoint: Option<&str>,
    mode: OpenMode,
) -> Result<SavepointLocation, String> {
    location::open_location_with(spec, &s3_options(s3_endpoint), mode)
        .await
        .map_err(|e| failed(spec, &e))
}

/// Ends the process: the command's exit code, or 2 with the error.
pub(crate) fn finish(r: Result<ExitCode, String>) -> ExitCode {
    match r {
        Ok(code) => code,
        Err(e) => {
            eprintln!("sluice: error: {e}");
            ExitCode::from(2)
        }
    }
}

pub(crate) fn runtime() -> Result<tokio::runtime::Runtime, String> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the tokio runtime: {e}"))
}
