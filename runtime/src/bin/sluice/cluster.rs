//! `sluice run keyed-sum --workers N` (the coordinator, optionally starting
//! its workers as child processes) and `--coordinator ADDR` (a worker).

use sluice_runtime::cluster::{WorkerOptions, WorkerPool};
use sluice_runtime::Job;
use std::net::SocketAddr;
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::Duration;

/// A job over several processes needs a storage every process reaches.
pub(crate) fn check_shared_storage(spec: &str) -> Result<(), String> {
    if spec.starts_with("file:") || spec.starts_with("s3://") {
        return Ok(());
    }
    Err(format!(
        "--storage {spec}: a job on workers needs a checkpoint storage every process reaches: `file:DIR` \
         (a shared path) or `s3://bucket/prefix` (a redb file or memory belongs to one process)"
    ))
}

/// Runs `job` as a worker of the coordinator at `addr` until the job ends.
pub(crate) async fn run_worker(
    job: Job,
    addr: SocketAddr,
    options: WorkerOptions,
) -> Result<ExitCode, String> {
    println!("sluice: worker of the coordinator at {addr}");
    job.start_worker(addr, options)
        .map_err(|e| e.to_string())?
        .wait()
        .await
        .map_err(|e| format!("worker: {e}"))?;
    println!("sluice: the job ended; worker done");
    Ok(ExitCode::SUCCESS)
}

/// The worker's options from its arguments.
pub(crate) fn worker_options(
    bind: &str,
    channel_port: u16,
    advertise: Option<&str>,
    s3: sluice_runtime::location::S3Options,
) -> Result<WorkerOptions, String> {
    let bind = bind
        .parse()
        .map_err(|e| format!("--bind {bind:?}: {e} (examples: 127.0.0.1, 0.0.0.0)"))?;
    let advertise = advertise
        .map(|a| {
            a.parse()
                .map_err(|e| format!("--advertise {a:?}: {e} (example: 10.0.0.7:7071)"))
        })
        .transpose()?;
    Ok(WorkerOptions {
        bind,
        channel_port,
        advertise,
        s3,
        ..WorkerOptions::default()
    })
}

/// Makes `job` run on `n` workers connecting to `listen`; with `spawn`,
/// starts them as child processes of this binary with this process's job
/// arguments.
pub(crate) async fn coordinate(
    job: Job,
    n: u32,
    listen: SocketAddr,
    spawn: bool,
) -> Result<(Job, Option<Vec<Child>>), String> {
    let pool = WorkerPool::bind(listen, n as usize)
        .await
        .map_err(|e| format!("--listen {listen}: {e}"))?;
    let addr = pool.local_addr();
    println!(
        "sluice: coordinator on {addr}, waiting for {n} workers (start each with the same job arguments and \
         --coordinator {addr})"
    );
    let children = match spawn {
        false => None,
        true => {
            let exe = std::env::current_exe().map_err(|e| format!("--spawn-workers: own path: {e}"))?;
            let args = worker_args(std::env::args().skip(1), addr);
            let mut children = Vec::new();
            for _ in 0..n {
                let child = Command::new(&exe)
                    .args(&args)
                    .stdout(Stdio::null())
                    .stdin(Stdio::null())
                    .spawn()
                    .map_err(|e| format!("--spawn-workers: cannot start {}: {e}", exe.display()))?;
                children.push(child);
            }
            Some(children)
        }
    };
    Ok((job.with_workers(pool), children))
}

/// The coordinator's arguments without what only the coordinator takes,
/// plus `--coordinator ADDR`.
fn worker_args(args: impl Iterator<Item = String>, addr: SocketAddr) -> Vec<String> {
    const WITH_VALUE: [&str; 4] = ["--workers", "--listen", "--rest", "--rest-token"];
    const FLAGS: [&str; 1] = ["--spawn-workers"];
    let mut out = Vec::new();
    let mut skip_value = false;
    for arg in args {
        if std::mem::take(&mut skip_value) {
            continue;
        }
        let name = arg.split('=').next().unwrap_or("");
        if FLAGS.contains(&name) {
            continue;
        }
        if WITH_VALUE.contains(&name) {
            skip_value = !arg.contains('=');
            continue;
        }
        out.push(arg);
    }
    out.push("--coordinator".into());
    out.push(addr.to_string());
    out
}

/// Waits for the spawned workers to exit (they do once the job ended),
/// killing those still there after 10 s.
pub(crate) async fn reap(mut children: Vec<Child>) {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    for c in &mut children {
        loop {
            match c.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if std::time::Instant::now() > deadline => {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                Ok(None) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::worker_args;

    #[test]
    fn workers_get_the_job_arguments_without_the_coordinators_own() {
        let args = [
            "run",
            "keyed-sum",
            "--events",
            "1000",
            "--workers",
            "3",
            "--spawn-workers",
            "--listen=0.0.0.0:7070",
            "--rest",
            "8081",
            "--storage",
            "file:/tmp/x",
        ]
        .map(String::from);
        let out = worker_args(args.into_iter(), "127.0.0.1:7070".parse().unwrap());
        assert_eq!(
            out,
            [
                "run",
                "keyed-sum",
                "--events",
                "1000",
                "--storage",
                "file:/tmp/x",
                "--coordinator",
                "127.0.0.1:7070"
            ]
        );
    }
}
