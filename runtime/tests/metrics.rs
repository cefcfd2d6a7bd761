//! `GET /metrics` scraped over HTTP and checked against the job's own
//! statistics and what its storage holds; the token rules of the REST API
//! (no other address than loopback without a token; with one, every
//! request without it refused, over a non-loopback address too).

use serde_json::Value;
use sluice_backend_memory::{MemoryCheckpointStorage, MemoryStateBackend};
use sluice_core::metadata::read_checkpoint_metadata;
use sluice_core::CheckpointStorage;
use sluice_runtime::prelude::*;
use sluice_runtime::rest::{serve, serve_until, TargetResolver};
use sluice_runtime::workload::{self, InjectedFailure, RunningSum};
use sluice_runtime::{CheckpointStatus, JobMonitor, JobResult, SubtaskCheckpointStats};
use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant};

const EVENTS: u64 = 400_000;
const SPLITS: u32 = 4;
const PARALLELISM: u32 = 2;

fn no_targets() -> TargetResolver {
    Arc::new(|_target: String| Box::pin(async { Err(RuntimeError::InvalidJob("no targets here".into())) }))
}

/// One sample line: name, labels, value.
#[derive(Debug)]
struct Line {
    name: String,
    labels: BTreeMap<String, String>,
    value: f64,
}

fn parse(text: &str) -> Vec<Line> {
    assert!(text.trim_end().ends_with("# EOF"), "not OpenMetrics text: {text}");
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap();
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => {
                    let body = rest.strip_suffix('}').unwrap();
                    let labels = body
                        .split("\",")
                        .map(|kv| {
                            let (k, v) = kv.split_once("=\"").unwrap();
                            (k.to_string(), v.trim_end_matches('"').to_string())
                        })
                        .collect();
                    (n.to_string(), labels)
                }
                None => (series.to_string(), BTreeMap::new()),
            };
            Line {
                name,
                labels,
                value: value.parse().unwrap(),
            }
        })
        .collect()
}

fn one(lines: &[Line], name: &str) -> f64 {
    let found: Vec<&Line> = lines.iter().filter(|l| l.name == name).collect();
    assert_eq!(found.len(), 1, "{name}: {found:?}");
    assert_eq!(
        found[0].labels.get("job_name").map(String::as_str),
        Some("metrics-test")
    );
    found[0].value
}

/// Sum of `name` over the series whose task name starts with `task`.
fn sum_tasks(lines: &[Line], name: &str, task: &str) -> f64 {
    let found: Vec<&Line> = lines
        .iter()
        .filter(|l| l.name == name && l.labels["task_name"].starts_with(task))
        .collect();
    assert!(!found.is_empty(), "no {name} for task {task}");
    found.iter().map(|l| l.value).sum()
}

async fn get(url: String, token: Option<&str>) -> (u16, String) {
    let token = token.map(str::to_string);
    tokio::task::spawn_blocking(move || {
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .into();
        let mut req = agent.get(&url);
        if let Some(t) = token {
            req = req.header("Authorization", &format!("Bearer {t}"));
        }
        let mut r = req.call().unwrap();
        (r.status().as_u16(), r.body_mut().read_to_string().unwrap())
    })
    .await
    .unwrap()
}

/// Serves the job's REST API on a free loopback port, without a token.
async fn serve_loopback(monitor: &JobMonitor) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    serve(
        "127.0.0.1:0".parse().unwrap(),
        monitor.clone(),
        no_targets(),
        None,
    )
    .await
    .unwrap()
}

/// `GET path` of the job's REST API on loopback, without a token.
async fn get_once(monitor: &JobMonitor, path: &str) -> (u16, String) {
    let (addr, server) = serve_loopback(monitor).await;
    let answer = get(format!("http://{addr}{path}"), None).await;
    server.abort();
    answer
}

async fn scrape(monitor: &JobMonitor) -> Vec<Line> {
    let (status, text) = get_once(monitor, "/metrics").await;
    assert_eq!(status, 200, "{text}");
    parse(&text)
}

/// `GET /metrics` of a server already running at `base`.
async fn scrape_at(base: &str) -> Vec<Line> {
    let (status, text) = get(format!("{base}/metrics"), None).await;
    assert_eq!(status, 200, "{text}");
    parse(&text)
}

/// The keyed sum of `events` events paced to about `rate` a second in all
/// (checkpoints every 50 ms; the sink chained into the keyed tasks), and
/// its checkpoint storage.
fn keyed_sum(
    events: u64,
    rate: u64,
    failures: Vec<Arc<InjectedFailure>>,
) -> (Job, Arc<dyn CheckpointStorage>) {
    let storage: Arc<dyn CheckpointStorage> = Arc::new(MemoryCheckpointStorage::new());
    let job = Job::new("metrics-test")
        .with_parallelism(PARALLELISM)
        .with_state_backend(Arc::new(MemoryStateBackend::new()))
        .with_checkpoint_storage(storage.clone())
        .with_restart_strategy(RestartStrategy::FixedDelay {
            attempts: 3,
            delay: Duration::from_millis(10),
        })
        .with_checkpointing(CheckpointConfig::every(Duration::from_millis(50)));
    workload::keyed_sum_stream(
        &job,
        events,
        1000,
        SPLITS,
        PARALLELISM,
        Some(rate),
        RunningSum::with_failures(failures),
    )
    .unwrap()
    .sink(DiscardSink::new())
    .unwrap();
    (job, storage)
}

/// A run of the keyed sum to its end, and its metrics scraped afterwards.
struct Run {
    lines: Vec<Line>,
    monitor: JobMonitor,
    storage: Arc<dyn CheckpointStorage>,
    result: JobResult,
    /// From before the job started to after it ended.
    wall: Duration,
}

/// Runs the keyed sum to its end (one injected failure with `fail`) and
/// scrapes its metrics afterwards.
async fn run(fail: bool) -> Run {
    let failures = match fail {
        true => vec![InjectedFailure::new(0, EVENTS / 4, false)],
        false => Vec::new(),
    };
    let (job, storage) = keyed_sum(EVENTS, 400_000, failures);
    let started = Instant::now();
    let handle = job.start().unwrap();
    let monitor = handle.monitor();
    let result = handle.wait().await.unwrap();
    let wall = started.elapsed();
    assert_eq!(result.restarts, u32::from(fail));
    Run {
        lines: scrape(&monitor).await,
        monitor,
        storage,
        result,
        wall,
    }
}

/// Gauge `name` of every task, by the task's name as the checkpoint
/// statistics write it: `name (subtask/parallelism)`, counted from 1.
fn by_task(lines: &[Line], name: &str) -> BTreeMap<String, f64> {
    lines
        .iter()
        .filter(|l| l.name == name)
        .map(|l| {
            let subtask: u32 = l.labels["subtask_index"].parse().unwrap();
            let task = format!("{} ({}/{PARALLELISM})", l.labels["task_name"], subtask + 1);
            (task, l.value)
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_match_the_jobs_statistics_and_its_storage() {
    for fail in [false, true] {
        let Run {
            lines,
            monitor,
            storage,
            result,
            wall,
        } = run(fail).await;
        let restarts = result.restarts;
        let stats = monitor.checkpoint_stats();
        let completed: Vec<_> = stats
            .iter()
            .filter(|s| s.status == CheckpointStatus::Completed)
            .collect();
        assert!(
            completed.len() >= 2,
            "too few checkpoints to check: {}",
            completed.len()
        );
        let last = completed.last().unwrap();

        // Checkpoint counts and the last checkpoint, as the statistics say.
        assert_eq!(
            one(&lines, "flink_jobmanager_job_numberOfCompletedCheckpoints"),
            completed.len() as f64
        );
        let failed = stats
            .iter()
            .filter(|s| matches!(s.status, CheckpointStatus::Failed(_)))
            .count();
        assert_eq!(
            one(&lines, "flink_jobmanager_job_numberOfFailedCheckpoints"),
            failed as f64
        );
        assert_eq!(
            one(&lines, "flink_jobmanager_job_numberOfInProgressCheckpoints"),
            0.0
        );
        assert_eq!(
            one(&lines, "flink_jobmanager_job_totalNumberOfCheckpoints"),
            stats.len() as f64
        );
        assert_eq!(
            one(&lines, "flink_jobmanager_job_lastCheckpointDuration"),
            last.duration.as_millis() as f64
        );
        assert_eq!(
            one(&lines, "flink_jobmanager_job_lastCheckpointFullSize"),
            last.state_size as f64
        );
        assert_eq!(
            one(&lines, "flink_jobmanager_job_lastCheckpointSize"),
            last.written_size as f64
        );
        assert_eq!(
            one(&lines, "sluice_checkpoint_duration_seconds_count"),
            completed.len() as f64
        );
        let durations: f64 = completed.iter().map(|s| s.duration.as_secs_f64()).sum();
        assert!((one(&lines, "sluice_checkpoint_duration_seconds_sum") - durations).abs() < 1e-6);
        // The alignment histogram holds the tasks with inputs of every
        // completed checkpoint: not the sources, which align nothing.
        let sources: BTreeSet<String> = monitor
            .task_counters()
            .iter()
            .filter(|c| c.is_source)
            .map(|c| format!("{} ({}/{})", c.task, c.subtask + 1, c.parallelism))
            .collect();
        assert_eq!(sources.len(), PARALLELISM as usize, "{sources:?}");
        let aligned: Vec<Duration> = completed
            .iter()
            .flat_map(|s| &s.subtasks)
            .filter(|t| !sources.contains(&t.task))
            .map(|t| t.alignment)
            .collect();
        assert_eq!(
            aligned.len(),
            completed.len() * PARALLELISM as usize,
            "one alignment per keyed subtask and checkpoint"
        );
        assert_eq!(
            one(&lines, "sluice_checkpoint_alignment_seconds_count"),
            aligned.len() as f64
        );
        let aligned_sum: f64 = aligned.iter().map(Duration::as_secs_f64).sum();
        assert!((one(&lines, "sluice_checkpoint_alignment_seconds_sum") - aligned_sum).abs() < 1e-6);
        assert_eq!(
            one(&lines, "flink_jobmanager_job_numRestarts"),
            f64::from(restarts)
        );
        let restored = one(&lines, "flink_jobmanager_job_lastCheckpointRestoreTimestamp");
        assert_eq!(restored > 0.0, fail, "restore timestamp {restored}");
        let finished = lines
            .iter()
            .find(|l| l.name == "sluice_job_state" && l.labels["state"] == "FINISHED")
            .unwrap();
        assert_eq!(finished.value, 1.0);

        // The state size of the keyed operator: the sizes of its files in
        // the last checkpoint's metadata, read from the storage.
        let meta = read_checkpoint_metadata(storage.as_ref(), last.id).await.unwrap();
        let op = meta
            .operators
            .iter()
            .find(|o| o.uid.to_string() == "running-sum")
            .unwrap();
        let on_disk: u64 = op
            .subtasks
            .iter()
            .flat_map(|s| s.keyed_state.iter().chain(&s.keyed_changes))
            .map(|f| f.size)
            .sum();
        assert!(on_disk > 0);
        let size = lines
            .iter()
            .find(|l| {
                l.name == "sluice_operator_state_size_bytes" && l.labels["operator_name"] == "running-sum"
            })
            .unwrap();
        assert_eq!(size.value, on_disk as f64);

        // Records: the sources read what the job counted; without a
        // failure, every record reached the keyed tasks exactly once.
        let source_in = sum_tasks(&lines, "flink_taskmanager_job_task_numRecordsIn", "source events");
        assert_eq!(source_in, monitor.source_records() as f64);
        let source_out = sum_tasks(
            &lines,
            "flink_taskmanager_job_task_numRecordsOut",
            "source events",
        );
        assert_eq!(source_out, source_in);
        let keyed_in = sum_tasks(
            &lines,
            "flink_taskmanager_job_task_numRecordsIn",
            "keyed running-sum",
        );
        if fail {
            assert!(
                source_in > EVENTS as f64,
                "a failure replays records: {source_in}"
            );
            assert!(keyed_in >= EVENTS as f64);
        } else {
            assert_eq!(source_in, EVENTS as f64);
            assert_eq!(keyed_in, EVENTS as f64);
        }
        // Every split's position is the one the final checkpoint stored
        // (the end of the split).
        let source = meta
            .operators
            .iter()
            .find(|o| o.uid.to_string() == "events")
            .unwrap();
        let stored: BTreeMap<u32, u64> = source
            .subtasks
            .iter()
            .flat_map(|s| &s.splits)
            .map(|p| (p.split, p.offset))
            .collect();
        assert_eq!(stored.len(), SPLITS as usize);
        let positions: BTreeMap<u32, u64> = lines
            .iter()
            .filter(|l| l.name == "sluice_source_split_position")
            .map(|l| (l.labels["split"].parse().unwrap(), l.value as u64))
            .collect();
        assert_eq!(positions, stored);
        assert_eq!(positions[&(SPLITS - 1)], EVENTS);
        // The keyed tasks end in the chained sink: nothing goes out of them.
        let keyed_out = sum_tasks(
            &lines,
            "flink_taskmanager_job_task_numRecordsOut",
            "keyed running-sum",
        );
        assert_eq!(keyed_out, 0.0);

        // Each task's start delay and alignment gauges are those of the
        // last checkpoint it snapshotted; every task snapshots the final
        // checkpoint and none after it, so they are that checkpoint's
        // per-task figures, to the nanosecond.
        assert_eq!(result.final_checkpoint, Some(last.id));
        let nanos = |of: fn(&SubtaskCheckpointStats) -> Duration| -> BTreeMap<String, f64> {
            let all = last.subtasks.iter();
            all.map(|t| (t.task.clone(), of(t).as_nanos() as f64)).collect()
        };
        assert_eq!(
            by_task(&lines, "flink_taskmanager_job_task_checkpointStartDelayNanos"),
            nanos(|t| t.start_delay)
        );
        assert_eq!(
            by_task(&lines, "flink_taskmanager_job_task_checkpointAlignmentTime"),
            nanos(|t| t.alignment)
        );

        // The job ended: its uptime is its run time and stays so.
        let uptime = one(&lines, "flink_jobmanager_job_uptime");
        assert!(
            uptime >= result.duration.as_millis() as f64 && uptime <= wall.as_millis() as f64,
            "uptime {uptime} ms, run {:?}, waited {wall:?}",
            result.duration
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
        let later = scrape(&monitor).await;
        assert_eq!(one(&later, "flink_jobmanager_job_uptime"), uptime);
        assert_eq!(monitor.status().uptime_ms as f64, uptime);

        // Per-task gauges exist for every subtask (2 sources, 2 keyed).
        for name in [
            "flink_taskmanager_job_task_numRecordsInPerSecond",
            "flink_taskmanager_job_task_backPressuredTimeMsPerSecond",
            "flink_taskmanager_job_task_checkpointStartDelayNanos",
            "flink_taskmanager_job_task_checkpointAlignmentTime",
        ] {
            assert_eq!(lines.iter().filter(|l| l.name == name).count(), 4, "{name}");
        }
    }
}

/// The sources' pace in the rates test, events per second in all.
const THROTTLE: f64 = 20_000.0;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_rates_of_a_running_job_follow_its_pace_and_its_counters() {
    let (job, _) = keyed_sum(u64::MAX / 2, THROTTLE as u64, Vec::new());
    let handle = job.start().unwrap();
    let (addr, server) = serve_loopback(&handle.monitor()).await;
    let base = format!("http://{addr}");
    // The server samples the counters at once and then every second: with
    // three samples, the latest rates cover a whole second of the job.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (status, body) = get(format!("{base}/timeline"), None).await;
        assert_eq!(status, 200, "{body}");
        let samples = serde_json::from_str::<Value>(&body).unwrap();
        if samples.as_array().unwrap().len() >= 3 {
            break;
        }
        assert!(Instant::now() < deadline, "the sampler took no 3 samples in 60 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // Two scrapes about 1.5 s apart; `at` is the middle of each request.
    let mut scrapes = Vec::new();
    for pause in [Duration::ZERO, Duration::from_millis(1500)] {
        tokio::time::sleep(pause).await;
        let before = Instant::now();
        let lines = scrape_at(&base).await;
        scrapes.push((lines, before + before.elapsed() / 2));
    }
    let rate_of = |lines: &[Line]| {
        sum_tasks(
            lines,
            "flink_taskmanager_job_task_numRecordsInPerSecond",
            "source events",
        )
    };
    for (lines, _) in &scrapes {
        // Every task (2 sources, 2 keyed) has records coming in.
        let rates = by_task(lines, "flink_taskmanager_job_task_numRecordsInPerSecond");
        assert_eq!(rates.len(), 4, "{rates:?}");
        assert!(rates.values().all(|r| *r > 0.0), "{rates:?}");
        // The sources read at most at their pace (it paces from below).
        let rate = rate_of(lines);
        assert!(rate > 0.0 && rate <= THROTTLE * 1.5, "source rate {rate}");
        // What the sources read, they send on; the keyed tasks end in the
        // chained sink and send nothing.
        let out = by_task(lines, "flink_taskmanager_job_task_numRecordsOutPerSecond");
        for (task, r) in &out {
            assert_eq!(*r > 0.0, task.starts_with("source "), "{out:?}");
        }
        let backpressure = by_task(lines, "flink_taskmanager_job_task_backPressuredTimeMsPerSecond");
        assert!(
            backpressure.values().all(|b| (0.0..=1000.0).contains(b)),
            "{backpressure:?}"
        );
    }
    // The counters grew by about the rate times the time between scrapes.
    let read = |lines: &[Line]| sum_tasks(lines, "flink_taskmanager_job_task_numRecordsIn", "source events");
    let ((first, t0), (second, t1)) = (&scrapes[0], &scrapes[1]);
    let grown = read(second) - read(first);
    let expected = (rate_of(first) + rate_of(second)) / 2.0 * t1.duration_since(*t0).as_secs_f64();
    assert!(
        grown >= expected * 0.3 && grown <= expected * 3.0,
        "the sources read {grown} records between the scrapes, the rates say {expected}"
    );
    // While the job runs, its uptime goes on.
    let uptime = |lines: &[Line]| one(lines, "flink_jobmanager_job_uptime");
    assert!(uptime(second) > uptime(first));

    server.abort();
    handle.cancel();
    assert!(matches!(handle.wait().await, Err(RuntimeError::Cancelled)));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_checkpoint_history_has_per_task_detail() {
    let monitor = run(false).await.monitor;
    let (status, body) = get_once(&monitor, "/checkpoints?limit=2").await;
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    let ids: Vec<u64> = v["history"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["id"].as_u64().unwrap())
        .collect();
    let newest: Vec<u64> = monitor
        .checkpoint_stats()
        .iter()
        .rev()
        .take(2)
        .rev()
        .map(|s| s.id.0)
        .collect();
    assert_eq!(ids, newest, "the newest two");
    let (status, body) = get_once(&monitor, "/checkpoints?limit=lots").await;
    assert_eq!(status, 400);
    assert!(body.contains("limit"), "{body}");
    let (status, body) = get_once(&monitor, "/checkpoints").await;
    assert_eq!(status, 200);
    let v: Value = serde_json::from_str(&body).unwrap();
    let history = v["history"].as_array().unwrap();
    assert_eq!(history.len(), monitor.checkpoint_stats().len());
    for c in history.iter().filter(|c| c["status"] == "COMPLETED") {
        let subtasks = c["subtasks"].as_array().unwrap();
        // Every task acknowledged: 2 sources and 2 keyed subtasks.
        assert_eq!(subtasks.len(), 4, "{c}");
        let written: u64 = subtasks.iter().map(|s| s["state_size"].as_u64().unwrap()).sum();
        assert_eq!(written, c["written_size"].as_u64().unwrap(), "{c}");
        let max_ack = subtasks
            .iter()
            .map(|s| s["acknowledged_after_ms"].as_f64().unwrap())
            .fold(0.0, f64::max);
        assert!(max_ack <= c["duration_ms"].as_f64().unwrap() + 1.0, "{c}");
    }
}

/// This machine's address on its first non-loopback interface, if it has
/// one (found by routing, no packet is sent).
fn non_loopback_ip() -> Option<IpAddr> {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").ok()?;
    s.connect("192.0.2.1:9").ok()?;
    let ip = s.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_address_than_loopback_needs_a_token_and_every_request_must_carry_it() {
    let monitor = run(false).await.monitor;
    let err = serve("0.0.0.0:0".parse().unwrap(), monitor.clone(), no_targets(), None)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    assert!(err.to_string().contains("--rest-token"), "{err}");
    for bad in ["", "has space", "a/b"] {
        let err = serve(
            "127.0.0.1:0".parse().unwrap(),
            monitor.clone(),
            no_targets(),
            Some(bad.into()),
        )
        .await
        .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput, "{bad:?}");
    }

    let token = "s3cr3t-Token_1";
    let (addr, server) = serve(
        "0.0.0.0:0".parse().unwrap(),
        monitor,
        no_targets(),
        Some(token.into()),
    )
    .await
    .unwrap();
    let ip = non_loopback_ip();
    eprintln!("non-loopback address: {ip:?}");
    let mut hosts = vec![IpAddr::from([127, 0, 0, 1])];
    hosts.extend(ip);
    for host in hosts {
        let base = format!("http://{}", SocketAddr::new(host, addr.port()));
        for path in ["/", "/metrics", "/job", "/checkpoints", "/tasks", "/timeline"] {
            let (status, body) = get(format!("{base}{path}"), None).await;
            assert_eq!(status, 401, "{base}{path} without a token: {body}");
            assert!(body.contains("token"), "{body}");
            let (status, _) = get(format!("{base}{path}"), Some("wrong")).await;
            assert_eq!(status, 401, "{base}{path} with a wrong token");
            let (status, _) = get(format!("{base}{path}"), Some(token)).await;
            assert_eq!(status, 200, "{base}{path} with the token");
        }
        let (status, page) = get(format!("{base}/?token={token}"), None).await;
        assert_eq!(status, 200);
        assert!(page.contains("checkpoint-history"));
        let (status, _) = get(format!("{base}/?token=wrong"), None).await;
        assert_eq!(status, 401);
        // The actions too.
        let url = format!("{base}/cancel");
        let (status, body) = tokio::task::spawn_blocking(move || {
            let agent: ureq::Agent = ureq::Agent::config_builder()
                .http_status_as_error(false)
                .build()
                .into();
            let mut r = agent.post(&url).send_empty().unwrap();
            (r.status().as_u16(), r.body_mut().read_to_string().unwrap())
        })
        .await
        .unwrap();
        assert_eq!(status, 401, "{body}");
    }
    server.abort();
}

/// Sends `request` (HTTP/1.1 text) to `addr`; returns the status code.
async fn raw(addr: SocketAddr, request: String) -> u16 {
    tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(addr).unwrap();
        s.write_all(request.as_bytes()).unwrap();
        let mut answer = String::new();
        let _ = s.read_to_string(&mut answer);
        answer
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or_else(|| panic!("no status in {answer:?}"))
    })
    .await
    .unwrap()
}

fn request(method: &str, path: &str, host: &str, extra: &str, body: &str) -> String {
    format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\n{extra}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_a_web_page_could_make_are_refused() {
    let monitor = run(false).await.monitor;
    let (addr, server) = serve_loopback(&monitor).await;
    let own = format!("127.0.0.1:{}", addr.port());
    // The API's own host, by address or name: answered.
    assert_eq!(raw(addr, request("GET", "/job", &own, "", "")).await, 200);
    let by_name = format!("localhost:{}", addr.port());
    assert_eq!(raw(addr, request("GET", "/job", &by_name, "", "")).await, 200);
    // DNS rebinding: another host name reaching the loopback port.
    let evil = format!("evil.example:{}", addr.port());
    assert_eq!(raw(addr, request("GET", "/job", &evil, "", "")).await, 403);
    assert_eq!(raw(addr, request("GET", "/metrics", &evil, "", "")).await, 403);
    // A page on another origin.
    let other = "Origin: http://evil.example\r\n";
    assert_eq!(raw(addr, request("GET", "/job", &own, other, "")).await, 403);
    let same = format!("Origin: http://{own}\r\n");
    assert_eq!(raw(addr, request("GET", "/job", &own, &same, "")).await, 200);
    // A form or no-cors POST (not JSON) never reaches an action.
    let text = "Content-Type: text/plain\r\n";
    assert_eq!(raw(addr, request("POST", "/cancel", &own, text, "{}")).await, 415);
    assert_eq!(
        raw(addr, request("POST", "/checkpoints", &own, "", "")).await,
        415
    );
    // JSON reaches it (the job has ended: 409, not cancelled twice).
    let json = "Content-Type: application/json\r\n";
    assert_eq!(raw(addr, request("POST", "/cancel", &own, json, "{}")).await, 409);
    server.abort();

    // With a token: the scheme is case-insensitive, any host is fine.
    let (addr, server) = serve(
        "127.0.0.1:0".parse().unwrap(),
        monitor,
        no_targets(),
        Some("t0ken".into()),
    )
    .await
    .unwrap();
    let auth = "Authorization: bearer t0ken\r\n";
    let host = format!("sluice.internal:{}", addr.port());
    assert_eq!(raw(addr, request("GET", "/job", &host, auth, "")).await, 200);
    let longer = "Authorization: Bearer t0kenX\r\n";
    assert_eq!(raw(addr, request("GET", "/job", &host, longer, "")).await, 401);
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graceful_shutdown_answers_the_request_in_flight() {
    let job = Job::new("shutdown-test")
        .with_parallelism(1)
        .with_state_backend(Arc::new(MemoryStateBackend::new()))
        .with_checkpoint_storage(Arc::new(MemoryCheckpointStorage::new()));
    workload::keyed_sum_stream(
        &job,
        u64::MAX / 2,
        100,
        1,
        1,
        Some(100_000),
        RunningSum::default(),
    )
    .unwrap()
    .sink(DiscardSink::new())
    .unwrap();
    let handle = job.start().unwrap();
    // A savepoint target that takes a while to resolve (and is refused).
    let slow: TargetResolver = Arc::new(|_target: String| {
        Box::pin(async {
            tokio::time::sleep(Duration::from_millis(1500)).await;
            Err(RuntimeError::InvalidJob("no targets here".into()))
        })
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let (addr, server) = serve_until(
        "127.0.0.1:0".parse().unwrap(),
        handle.monitor(),
        slow,
        None,
        async move {
            let _ = stopped.await;
        },
    )
    .await
    .unwrap();
    let own = format!("127.0.0.1:{}", addr.port());
    let json = "Content-Type: application/json\r\n";
    let body = r#"{"target": "somewhere"}"#;
    let asked = tokio::spawn(raw(addr, request("POST", "/savepoints", &own, json, body)));
    // Shut down while the request is being answered: the server waits for
    // it (a process that ends when the server's task does, as the CLI,
    // would otherwise drop the answer), it gets its answer (the resolver's
    // refusal), and then the server ends.
    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.send(()).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!server.is_finished(), "the server ended with a request in flight");
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .expect("the server ends once the answer is sent")
        .unwrap();
    assert_eq!(asked.await.unwrap(), 400);
    handle.cancel();
    let _ = handle.wait().await;
}
