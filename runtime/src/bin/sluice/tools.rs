//! The commands that talk to a running job (status, checkpoint, savepoint,
//! cancel) and the tools that read storage (checkpoints list, inspect,
//! copy).

use crate::common::{checkpoint_storage, failed, open_location, runtime, s3_options};
use sluice_core::CheckpointStorageExt;
use sluice_runtime::location::{self, OpenMode};
use sluice_runtime::rest::RestClient;
use sluice_runtime::{copy_savepoint, RestoreSource};
use std::io::Write;
use std::process::ExitCode;
use std::time::Duration;
/// A client of the job at `job`, sending the token in `SLUICE_REST_TOKEN`
/// (the one the job was started with) if it is set.
pub(crate) fn client(job: &str) -> RestClient {
    // Savepoints answer when complete: allow for the checkpoint timeout.
    let token = std::env::var("SLUICE_REST_TOKEN").ok().filter(|t| !t.is_empty());
    RestClient::new(job, Duration::from_secs(15 * 60)).with_token(token)
}

pub(crate) fn client_savepoint(job: &str, stop: bool, target: &str) -> Result<ExitCode, String> {
    let r = client(job)
        .post(
            "/savepoints",
            serde_json::json!({ "target": target, "stop": stop }),
        )
        .map_err(|e| e.to_string())?;
    let location = r["location"].as_str().unwrap_or("?");
    if stop {
        println!("job stopped with savepoint {} at {location}", r["id"]);
    } else {
        println!("savepoint {} completed at {location}", r["id"]);
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn client_checkpoint(job: &str) -> Result<ExitCode, String> {
    let r = client(job)
        .post("/checkpoints", serde_json::json!({}))
        .map_err(|e| e.to_string())?;
    println!("checkpoint {} completed", r["id"]);
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn client_cancel(job: &str) -> Result<ExitCode, String> {
    client(job)
        .post("/cancel", serde_json::json!({}))
        .map_err(|e| e.to_string())?;
    println!("job cancelled");
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn client_status(job: &str, json: bool) -> Result<ExitCode, String> {
    let c = client(job);
    let status = c.get("/job").map_err(|e| e.to_string())?;
    let checkpoints = c.get("/checkpoints").map_err(|e| e.to_string())?;
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({ "job": status, "checkpoints": checkpoints }))
                .map_err(|e| e.to_string())?
        );
        return Ok(ExitCode::SUCCESS);
    }
    println!(
        "job {}: {}, up {:.1}s, {} restarts, {} source records",
        status["name"].as_str().unwrap_or("?"),
        status["state"].as_str().unwrap_or("?"),
        status["uptime_ms"].as_u64().unwrap_or(0) as f64 / 1e3,
        status["restarts"],
        status["source_records"]
    );
    let counts = &checkpoints["counts"];
    println!(
        "checkpoints: {} completed, {} failed, {} in progress; duration p50 {} ms, p99 {} ms",
        counts["completed"],
        counts["failed"],
        counts["in_progress"],
        checkpoints["summary"]["duration_p50_ms"],
        checkpoints["summary"]["duration_p99_ms"]
    );
    let history = checkpoints["history"].as_array().cloned().unwrap_or_default();
    println!(
        "{:>8}  {:<10}  {:<11}  {:>12}  {:>12}  {:>9}",
        "id", "kind", "status", "size", "written", "duration"
    );
    for h in history.iter().rev().take(10).rev() {
        println!(
            "{:>8}  {:<10}  {:<11}  {:>12}  {:>12}  {:>7}ms",
            h["id"].to_string(),
            h["kind"].as_str().unwrap_or("?"),
            h["status"].as_str().unwrap_or("?"),
            h["state_size"].to_string(),
            h["written_size"].to_string(),
            h["duration_ms"].to_string()
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn inspect(
    path: &str,
    json: bool,
    operator: Option<&str>,
    dump: bool,
    s3_endpoint: Option<&str>,
) -> Result<ExitCode, String> {
    runtime()?.block_on(async move {
        let location = open_location(path, s3_endpoint, OpenMode::ReadOnly).await?;
        let source = RestoreSource::open(&location).await.map_err(|e| e.to_string())?;
        if dump {
            let uid = operator.unwrap_or_default();
            let mut out = std::io::BufWriter::new(std::io::stdout());
            let mut failed: Option<std::io::Error> = None;
            let n = sluice_runtime::inspect::dump_operator(&source, uid, &mut |v| {
                if failed.is_none() {
                    if let Err(e) = writeln!(out, "{v}") {
                        failed = Some(e);
                    }
                }
            })
            .await
            .map_err(|e| e.to_string())?;
            let flushed = out.flush();
            drop(out);
            match failed.or(flushed.err()) {
                // The reader went away (`| head`): not an error.
                Some(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(ExitCode::SUCCESS),
                Some(e) => return Err(format!("writing the dump: {e}")),
                None => {}
            }
            eprintln!("{n} entries of operator {uid}");
        } else if json {
            let text = String::from_utf8(source.metadata.to_json().map_err(|e| e.to_string())?)
                .map_err(|e| e.to_string())?;
            println!("{text}");
        } else {
            print!("{}", sluice_runtime::inspect::describe(&source));
        }
        Ok(ExitCode::SUCCESS)
    })
}

pub(crate) fn copy(src: &str, dst: &str, s3_endpoint: Option<&str>) -> Result<ExitCode, String> {
    runtime()?.block_on(async move {
        // The source is opened read-only: a mistyped source creates nothing.
        let (from, to) = location::open_copy_locations(src, dst, &s3_options(s3_endpoint))
            .await
            .map_err(|e| failed(&format!("copy {src} {dst}"), &e))?;
        let meta = copy_savepoint(&from, &to).await.map_err(|e| e.to_string())?;
        println!(
            "copied {} {} ({} bytes of state) to {}",
            meta.kind,
            meta.checkpoint_id,
            meta.state_size(),
            to.describe()
        );
        Ok(ExitCode::SUCCESS)
    })
}

/// `sluice rewrite`: a changed copy of a savepoint.
pub(crate) fn rewrite(
    src: &str,
    dst: &str,
    renames: &[String],
    drops: &[String],
    s3_endpoint: Option<&str>,
) -> Result<ExitCode, String> {
    let mut plan = sluice_runtime::rewrite::SavepointRewrite::new();
    for r in renames {
        let (from, to) = r
            .split_once('=')
            .filter(|(f, t)| !f.is_empty() && !t.is_empty())
            .ok_or_else(|| format!("--rename-operator {r:?}: write OLD=NEW, e.g. counter=totals"))?;
        plan = plan.rename_operator(from, to);
    }
    for d in drops {
        plan = plan.drop_operator(d);
    }
    runtime()?.block_on(async move {
        // The source is opened read-only: a mistyped source creates nothing.
        let (from, to) = location::open_copy_locations(src, dst, &s3_options(s3_endpoint))
            .await
            .map_err(|e| failed(&format!("rewrite {src} {dst}"), &e))?;
        let meta = sluice_runtime::rewrite::rewrite_savepoint(&from, &to, &plan)
            .await
            .map_err(|e| e.to_string())?;
        let uids: Vec<&str> = meta.operators.iter().map(|o| o.uid.as_str()).collect();
        println!(
            "wrote savepoint {} ({} bytes of state; operators {}) to {}",
            meta.checkpoint_id,
            meta.state_size(),
            uids.join(", "),
            to.describe()
        );
        Ok(ExitCode::SUCCESS)
    })
}

/// `sluice checkpoints list`: the checkpoints in a storage.
pub(crate) fn list_checkpoints(spec: &str, s3_endpoint: Option<&str>) -> Result<ExitCode, String> {
    runtime()?.block_on(async move {
        let storage = checkpoint_storage(spec, s3_endpoint, "keyed-sum", OpenMode::ReadOnly).await?;
        let listing = storage.list().await.map_err(|e| e.to_string())?;
        println!(
            "{:>8}  {:<20}  {:<10}  {:>12}  {:>9}",
            "id", "time (UTC)", "kind", "size", "duration"
        );
        let mut count = 0;
        for c in listing.iter().filter(|c| c.committed) {
            match sluice_core::metadata::read_checkpoint_metadata(storage.as_ref(), c.id).await {
                Ok(m) => {
                    let time = std::time::UNIX_EPOCH + Duration::from_millis(m.trigger_time_ms);
                    println!(
                        "{:>8}  {:<20}  {:<10}  {:>12}  {:>7}ms",
                        c.id.0,
                        humantime::format_rfc3339_seconds(time).to_string(),
                        m.kind.to_string(),
                        m.state_size(),
                        m.duration_ms
                    );
                }
                Err(e) => println!("{:>8}  unreadable metadata: {e}", c.id.0),
            }
            count += 1;
        }
        println!("{count} completed checkpoints in {}", storage.describe());
        Ok(ExitCode::SUCCESS)
    })
}
