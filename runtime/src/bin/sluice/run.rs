//! `sluice run keyed-sum`: the reference workload with checkpoints, failure
//! injection, savepoints and the REST API, checked for exactly-once at the end.

use crate::args::{KeyedSumArgs, Mode};
use crate::cluster;
use crate::common::{checkpoint_storage, open_location, parse_interval, runtime, s3_options, state_backend};
use sluice_runtime::file_sink::read_committed_lines;
use sluice_runtime::location::{self, OpenMode};
use sluice_runtime::workload::{self, InjectedFailure, RunningSum};
use sluice_runtime::{
    CheckpointConfig, CheckpointingMode, DiscardSink, FileSink, IncrementalPolicy, Job, RestartStrategy,
};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The REST server of a running job: stopped gracefully by
/// [`RestServer::finish`] (the answers in flight are sent, such as a
/// stop-with-savepoint's, whose job has just ended), else aborted when
/// dropped.
struct RestServer {
    task: tokio::task::JoinHandle<()>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl RestServer {
    /// Stops taking requests and waits (a few seconds at most) for the
    /// answers in flight.
    async fn finish(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.task).await;
    }
}

impl Drop for RestServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `PORT` or `ADDR:PORT`; a bare port binds to loopback.
pub(crate) fn rest_address(spec: &str) -> Result<std::net::SocketAddr, String> {
    if let Ok(port) = spec.parse::<u16>() {
        return Ok(std::net::SocketAddr::from(([127, 0, 0, 1], port)));
    }
    spec.parse()
        .map_err(|e| format!("--rest {spec:?}: {e} (examples: 8081, 127.0.0.1:8081)"))
}

/// The line that tells where the REST API of a job bound to `bound` is.
/// An unspecified address (`0.0.0.0`, `::`) is no address a browser can
/// open: the line says it listens on all interfaces and gives this
/// machine's loopback URL first (what scripts take from the line).
fn rest_banner(bound: std::net::SocketAddr, token: bool) -> String {
    let what = "sluice: REST API, metrics and dashboard";
    if bound.ip().is_unspecified() {
        let local = match bound {
            std::net::SocketAddr::V4(_) => std::net::SocketAddr::from(([127, 0, 0, 1], bound.port())),
            std::net::SocketAddr::V6(_) => {
                std::net::SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, bound.port()))
            }
        };
        let open = if token { "/?token=TOKEN" } else { "/" };
        return format!(
            "{what} on http://{local} (listening on all interfaces, port {}: on this machine open \
             http://{local}{open}; from another, use this machine's name or address)",
            bound.port(),
        );
    }
    match token {
        true => format!("{what} on http://{bound} (token required: open http://{bound}/?token=TOKEN)"),
        false => format!("{what} on http://{bound} (loopback only, no token)"),
    }
}

pub(crate) fn run_keyed_sum(a: KeyedSumArgs) -> Result<ExitCode, String> {
    let interval = parse_interval(&a.checkpoint_interval)?;
    if a.keys == 0 {
        return Err("--keys must be at least 1".into());
    }
    if a.parallelism == 0 || a.parallelism > a.max_parallelism {
        return Err(format!(
            "--parallelism {} must be between 1 and the max parallelism {}",
            a.parallelism, a.max_parallelism
        ));
    }
    if a.splits == 0 {
        return Err("--splits must be at least 1".into());
    }
    let rest_addr = a.rest.as_deref().map(rest_address).transpose()?;
    let coordinator: Option<std::net::SocketAddr> = match &a.coordinator {
        Some(c) => Some(
            c.parse()
                .map_err(|e| format!("--coordinator {c:?}: {e} (example: 127.0.0.1:7070)"))?,
        ),
        None => None,
    };
    let listen: Option<std::net::SocketAddr> = match a.workers {
        Some(_) => Some(
            a.listen
                .parse()
                .map_err(|e| format!("--listen {:?}: {e} (example: 0.0.0.0:7070)", a.listen))?,
        ),
        None => None,
    };
    if a.workers.is_some() || coordinator.is_some() {
        cluster::check_shared_storage(&a.storage)?;
    }
    // Workers on one machine must not share the redb state backend's files.
    let state_dir = match coordinator {
        Some(_) => a.state_dir.join(format!("worker-{}", std::process::id())),
        None => a.state_dir.clone(),
    };
    let backend = state_backend(&a.state, &state_dir)?;
    let mode = match a.mode {
        Mode::ExactlyOnce => CheckpointingMode::ExactlyOnce,
        Mode::AtLeastOnce => CheckpointingMode::AtLeastOnce,
    };
    let failures = match a.fail_after {
        Some(n) => vec![InjectedFailure::new(
            0,
            (n / u64::from(a.parallelism)).max(1),
            false,
        )],
        None => Vec::new(),
    };
    let rt = runtime()?;
    let storage = rt.block_on(checkpoint_storage(
        &a.storage,
        a.s3_endpoint.as_deref(),
        "keyed-sum",
        OpenMode::ReadWrite,
    ))?;
    let from_savepoint = match &a.from_savepoint {
        // Read-only: a mistyped savepoint path creates nothing.
        Some(p) => Some(rt.block_on(open_location(p, a.s3_endpoint.as_deref(), OpenMode::ReadOnly))?),
        None => None,
    };
    println!(
        "sluice: keyed-sum: {} events, {} keys, parallelism {}, checkpoints {}, {}, state {}, storage {}",
        a.events,
        a.keys,
        a.parallelism,
        interval
            .map(|d| format!("every {}", humantime::format_duration(d)))
            .unwrap_or_else(|| "off".into()),
        match mode {
            CheckpointingMode::ExactlyOnce => "exactly-once",
            CheckpointingMode::AtLeastOnce => "at-least-once",
        },
        backend.name(),
        storage.describe()
    );
    rt.block_on(async move {
        let storage_for_check = storage.clone();
        let job = Job::new("keyed-sum")
            .with_parallelism(a.parallelism)
            .with_max_parallelism(a.max_parallelism)
            .with_state_backend(backend)
            .with_checkpoint_storage(storage)
            .resume_from_latest_checkpoint(a.resume)
            .allow_non_restored_state(a.allow_non_restored_state)
            .with_restart_strategy(RestartStrategy::FixedDelay { attempts: a.restart_attempts, delay: Duration::from_millis(100) })
            .with_checkpointing(CheckpointConfig {
                interval,
                mode,
                retained: a.retained,
                fallback_to_older_checkpoint: a.allow_checkpoint_fallback,
                incremental: a.incremental.then_some(IncrementalPolicy {
                    max_chain: a.max_chain,
                    ..IncrementalPolicy::default()
                }),
                ..Default::default()
            });
        let job = match from_savepoint {
            Some(loc) => job.from_savepoint(loc),
            None => job,
        };
        let sums = workload::keyed_sum_stream(
            &job,
            a.events,
            a.keys,
            a.splits,
            a.parallelism,
            a.rate,
            RunningSum::with_failures(failures),
        )
        .map_err(|e| e.to_string())?;
        match &a.output {
            Some(dir) => sums.transactional_sink("output", FileSink::new(dir, workload::sum_line)),
            None => sums.sink(DiscardSink::new()),
        }
        .map_err(|e| e.to_string())?;
        if let Some(addr) = coordinator {
            let options = cluster::worker_options(
                &a.bind,
                a.channel_port,
                a.advertise.as_deref(),
                s3_options(a.s3_endpoint.as_deref()),
            )?;
            return cluster::run_worker(job, addr, options).await;
        }
        let mut workers = None;
        let job = match (a.workers, listen) {
            (Some(n), Some(listen)) => {
                let (job, children) = cluster::coordinate(job, n, listen, a.spawn_workers).await?;
                workers = children;
                job
            }
            _ => job,
        };
        let started = Instant::now();
        let handle = job.start().map_err(|e| e.to_string())?;
        let rest = match rest_addr {
            Some(addr) => {
                let s3 = s3_options(a.s3_endpoint.as_deref());
                let resolve: sluice_runtime::rest::TargetResolver = Arc::new(move |target: String| {
                    let s3 = s3.clone();
                    Box::pin(async move { Ok(location::open_location(&target, &s3).await?) })
                });
                let token = a.rest_token.clone().filter(|t| !t.is_empty());
                let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
                let shutdown = async move {
                    let _ = stopped.await;
                };
                let (bound, task) =
                    sluice_runtime::rest::serve_until(addr, handle.monitor(), resolve, token.clone(), shutdown)
                        .await
                        .map_err(|e| format!("--rest {addr}: cannot serve: {e}"))?;
                println!("{}", rest_banner(bound, token.is_some()));
                Some(RestServer { task, stop: Some(stop) })
            }
            None => None,
        };
        let mut ticker = tokio::time::interval(Duration::from_secs(1));
        ticker.tick().await;
        let mut last = (0u64, Instant::now());
        let monitor = handle.monitor();
        let mut join = Box::pin(handle.wait());
        let result = loop {
            tokio::select! {
                r = &mut join => break r,
                _ = ticker.tick() => {
                    let n = monitor.source_records();
                    let now = Instant::now();
                    let rate = (n - last.0.min(n)) as f64 / now.duration_since(last.1).as_secs_f64();
                    println!("[{:>6.1}s] {:>8.2} M events/s, {} events read", started.elapsed().as_secs_f64(), rate / 1e6, n);
                    last = (n, now);
                }
            }
        };
        drop(join);
        let elapsed = started.elapsed();
        if let Some(children) = workers.take() {
            cluster::reap(children).await;
        }
        if let Some(rest) = rest {
            rest.finish().await;
        }
        let result = result.map_err(|e| format!("job failed: {e}"))?;
        if let Some(from) = &result.restored_from_savepoint {
            println!("started from {from}");
        }
        if let Some(id) = result.resumed_from {
            println!("resumed from checkpoint {id}");
        }
        for r in &result.recoveries {
            match r.restored_from {
                Some(id) => println!("recovery: {}; restored from checkpoint {id}", r.cause),
                None => println!("recovery: {}; restarted from scratch (no checkpoint yet)", r.cause),
            }
        }
        let stats = monitor.checkpoint_stats();
        let done: Vec<_> = stats.iter().filter(|s| s.status == sluice_runtime::CheckpointStatus::Completed).collect();
        println!(
            "checkpoints: {} completed, {} failed; {} restarts",
            done.len(),
            stats.iter().filter(|s| matches!(s.status, sluice_runtime::CheckpointStatus::Failed(_))).count(),
            result.restarts
        );
        let read = monitor.source_records();
        println!(
            "throughput: {:.2} M events/s ({} events read in {:.2}s)",
            read as f64 / elapsed.as_secs_f64() / 1e6,
            read,
            elapsed.as_secs_f64()
        );
        if let Some(sp) = &result.stopped_with_savepoint {
            println!("stopped with savepoint {} at {}", sp.id, sp.path());
            println!("continue with: sluice run keyed-sum ... --from-savepoint '{}'", sp.path());
            return Ok(ExitCode::SUCCESS);
        }
        // Check the durable final state: the keyed state in the final
        // checkpoint, which a resumed run also completes.
        let final_id = result
            .final_checkpoint
            .ok_or("the job ended without a final checkpoint; cannot check its state")?;
        let sums = workload::final_sums(storage_for_check.as_ref(), final_id)
            .await
            .map_err(|e| format!("reading the final state from checkpoint {final_id}: {e}"))?;
        println!("final state: checkpoint {final_id}, {} keys", sums.len());
        let v = workload::verify(&sums, a.events, a.keys);
        let output_ok = match &a.output {
            None => true,
            Some(dir) => {
                let lines = read_committed_lines(dir).map_err(|e| format!("reading the output in {}: {e}", dir.display()))?;
                let values = workload::values_by_key(0..a.events, a.keys);
                match workload::check_sum_lines(&lines, &values) {
                    Ok(()) => {
                        println!("output: {} committed lines in {}; exactly-once: ok", lines.len(), dir.display());
                        true
                    }
                    Err(e) => {
                        println!("output: {} committed lines in {}: {e}; exactly-once: FAILED", lines.len(), dir.display());
                        false
                    }
                }
            }
        };
        if !output_ok && mode == CheckpointingMode::ExactlyOnce {
            return Ok(ExitCode::from(1));
        }
        if v.exactly_once() {
            println!("result: {} keys checked against the expected sums; exactly-once: ok", v.keys);
            Ok(ExitCode::SUCCESS)
        } else {
            println!(
                "result: {} keys checked; {} too large (duplicates), {} too small (losses); e.g. (key, expected, actual) {:?}; exactly-once: FAILED",
                v.keys, v.too_large, v.too_small, v.examples
            );
            Ok(match mode {
                CheckpointingMode::ExactlyOnce => ExitCode::from(1),
                // At-least-once may legitimately duplicate after a failure.
                CheckpointingMode::AtLeastOnce => ExitCode::SUCCESS,
            })
        }
    })
}

#[cfg(test)]
mod tests {
    use super::rest_banner;

    #[test]
    fn the_rest_banner_gives_an_address_a_browser_can_open() {
        let any = rest_banner("0.0.0.0:8081".parse().unwrap(), true);
        assert!(!any.contains("http://0.0.0.0"), "{any}");
        assert!(any.contains("all interfaces, port 8081"), "{any}");
        // The first URL on the line is the one scripts take.
        let first = any.split_whitespace().find(|w| w.starts_with("http://"));
        assert_eq!(first, Some("http://127.0.0.1:8081"), "{any}");
        assert!(any.contains("http://127.0.0.1:8081/?token=TOKEN"), "{any}");
        let v6 = rest_banner("[::]:8081".parse().unwrap(), true);
        assert!(
            v6.contains("http://[::1]:8081/?token=TOKEN") && !v6.contains("http://[::]"),
            "{v6}"
        );
        let loopback = rest_banner("127.0.0.1:9000".parse().unwrap(), false);
        assert!(
            loopback.contains("on http://127.0.0.1:9000 (loopback only"),
            "{loopback}"
        );
        let host = rest_banner("192.0.2.7:9000".parse().unwrap(), true);
        assert!(host.contains("open http://192.0.2.7:9000/?token=TOKEN"), "{host}");
    }
}
