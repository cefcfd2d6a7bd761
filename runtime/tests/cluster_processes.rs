//! A job over real processes on 127.0.0.1: the `sluice` CLI as coordinator
//! (`--workers 2`) and as workers (`--coordinator ADDR`), checkpoints in a
//! shared directory. Workers are killed with SIGKILL mid-run and replaced;
//! the coordinator is killed and started again with `--resume`. Every run
//! must end exactly-once (the CLI checks the final checkpoint's state
//! against the expected sums; with workers killed, also the output of a
//! two-phase-commit file sink written by the workers into a shared
//! directory).
//!
//! `SLUICE_CLUSTER_KILLS=N` sets the number of worker kills (default 3);
//! `SLUICE_CLUSTER_SEED=S` the seed of their times and victims (printed).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const RATE: u64 = 400_000;

fn job_args(dir: &Path, events: u64) -> Vec<String> {
    [
        "run",
        "keyed-sum",
        "--events",
        &events.to_string(),
        "--keys",
        "10000",
        "--parallelism",
        "2",
        "--splits",
        "4",
        "--state",
        "memory",
        "--checkpoint-interval",
        "100ms",
        "--rate",
        &RATE.to_string(),
        "--restart-attempts",
        "100",
        "--storage",
        &format!("file:{}", dir.join("checkpoints").display()),
    ]
    .map(String::from)
    .to_vec()
}

/// A coordinator process, its stdout collected line by line.
struct Coordinator {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
}

impl Coordinator {
    fn start(dir: &Path, events: u64, listen: &str, resume: bool) -> Self {
        Self::start_with(dir, job_args(dir, events), listen, resume)
    }

    fn start_with(dir: &Path, args: Vec<String>, listen: &str, resume: bool) -> Self {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
        cmd.args(args)
            .args(["--workers", "2", "--listen", listen])
            .stdout(Stdio::piped())
            .stderr(Stdio::from(
                std::fs::File::create(
                    dir.join(format!("coordinator-{}.err", Instant::now().elapsed().as_nanos())),
                )
                .unwrap(),
            ));
        if resume {
            cmd.arg("--resume");
        }
        Self::watch(cmd.spawn().expect("start the coordinator"))
    }

    /// Collects the stdout of `child` (started with a piped stdout).
    fn watch(mut child: Child) -> Self {
        let lines: Arc<Mutex<Vec<String>>> = Arc::default();
        let out = child.stdout.take().unwrap();
        let sink = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Coordinator { child, lines }
    }

    /// The first line containing `what`, waiting up to 60 s.
    fn wait_for(&self, what: &str) -> String {
        let started = Instant::now();
        loop {
            if let Some(l) = self.lines.lock().unwrap().iter().find(|l| l.contains(what)) {
                return l.clone();
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "no line with {what:?} from the coordinator: {:?}",
                self.lines.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the workers' sources have read records (the progress
    /// line counts them, as the workers report every second).
    fn wait_running(&self) {
        let started = Instant::now();
        loop {
            let running = self.lines.lock().unwrap().iter().any(|l| {
                l.strip_suffix(" events read")
                    .and_then(|l| l.rsplit(' ').next())
                    .and_then(|n| n.parse::<u64>().ok())
                    .is_some_and(|n| n > 0)
            });
            if running {
                return;
            }
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "the job did not start: {:?}",
                self.lines.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The address workers connect to.
    fn addr(&self) -> String {
        let line = self.wait_for("coordinator on ");
        line.split("coordinator on ")
            .nth(1)
            .and_then(|r| r.split(',').next())
            .expect("address")
            .to_string()
    }

    /// Waits for the process to exit (up to 5 minutes); its stdout.
    fn finish(mut self) -> (bool, String) {
        let started = Instant::now();
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if started.elapsed() > Duration::from_secs(300) {
                let _ = self.child.kill();
                panic!("the coordinator did not end: {:?}", self.lines.lock().unwrap());
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        // Let the reader thread take the last lines.
        std::thread::sleep(Duration::from_millis(200));
        (status.success(), self.lines.lock().unwrap().join("\n"))
    }
}

fn worker(dir: &Path, events: u64, addr: &str, n: usize) -> Child {
    worker_with(dir, job_args(dir, events), addr, n)
}

fn worker_with(dir: &Path, args: Vec<String>, addr: &str, n: usize) -> Child {
    Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(args)
        .args(["--coordinator", addr])
        .stdout(Stdio::null())
        .stderr(Stdio::from(
            std::fs::File::create(dir.join(format!("worker-{n}.err"))).unwrap(),
        ))
        .spawn()
        .expect("start a worker")
}

fn seed() -> u64 {
    std::env::var("SLUICE_CLUSTER_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::rng().random())
}

#[test]
fn workers_killed_with_sigkill_are_replaced_and_the_job_stays_exactly_once() {
    let kills: u64 = std::env::var("SLUICE_CLUSTER_KILLS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let seed = seed();
    println!("SLUICE_CLUSTER_SEED={seed}, {kills} kills");
    let mut rng = StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    // Long enough that every kill happens mid-run (at most 1.5 s apart).
    let events = RATE * (3 * kills / 2 + 4);
    // A two-phase-commit file sink: the workers write and commit it.
    let mut args = job_args(dir.path(), events);
    args.push("--output".into());
    args.push(dir.path().join("output").display().to_string());
    let coordinator = Coordinator::start_with(dir.path(), args.clone(), "127.0.0.1:0", false);
    let addr = coordinator.addr();
    let mut workers: Vec<Child> = (0..2)
        .map(|n| worker_with(dir.path(), args.clone(), &addr, n))
        .collect();
    coordinator.wait_running();
    for k in 0..kills {
        std::thread::sleep(Duration::from_millis(rng.random_range(500..1500)));
        let victim = rng.random_range(0..workers.len());
        workers[victim].kill().expect("SIGKILL a worker");
        let _ = workers[victim].wait();
        workers[victim] = worker_with(dir.path(), args.clone(), &addr, 2 + k as usize);
    }
    let (ok, out) = coordinator.finish();
    assert!(ok, "seed {seed}: the coordinator failed:\n{out}");
    assert!(out.contains("exactly-once: ok"), "seed {seed}:\n{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with("output: ") && l.ends_with("exactly-once: ok")),
        "seed {seed}: the committed output is checked:\n{out}"
    );
    let recoveries = out.lines().filter(|l| l.starts_with("recovery:")).count();
    assert!(
        recoveries >= 1 && out.contains("was lost"),
        "seed {seed}: the kills were recovered from:\n{out}"
    );
    println!("{kills} kills, {recoveries} recoveries");
    for mut w in workers {
        // Told that the job ended, the workers exit on their own.
        let status = w.wait().unwrap();
        assert!(status.success(), "seed {seed}: a worker failed: {status}");
    }
}

#[test]
fn the_coordinator_killed_and_resumed_keeps_the_job_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let events = RATE * 5;
    // A fixed port: the workers reconnect to the coordinator's successor.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let listen = format!("127.0.0.1:{port}");
    let mut first = Coordinator::start(dir.path(), events, &listen, false);
    let addr = first.addr();
    let workers: Vec<Child> = (0..2).map(|n| worker(dir.path(), events, &addr, n)).collect();
    first.wait_running();
    std::thread::sleep(Duration::from_millis(1000));
    first.child.kill().expect("SIGKILL the coordinator");
    let _ = first.child.wait();
    let second = Coordinator::start(dir.path(), events, &listen, true);
    let (ok, out) = second.finish();
    assert!(ok, "the resumed coordinator failed:\n{out}");
    assert!(out.contains("resumed from checkpoint"), "{out}");
    assert!(out.contains("exactly-once: ok"), "{out}");
    // The reconnected workers take the new coordinator's first attempt
    // (its ids continue above the old one's, which the workers fenced).
    assert!(out.contains("; 0 restarts"), "{out}");
    for mut w in workers {
        let status = w.wait().unwrap();
        assert!(status.success(), "a worker failed: {status}");
    }
}

#[test]
fn a_job_stopped_with_a_savepoint_on_two_workers_restarts_on_three_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let events = RATE * 4;
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_sluice"));
    cmd.args(job_args(dir.path(), events))
        .args(["--workers", "2", "--spawn-workers", "--rest", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::from(
            std::fs::File::create(dir.path().join("first.err")).unwrap(),
        ));
    let first = Coordinator::watch(cmd.spawn().unwrap());
    let rest = first.wait_for("REST API");
    let url = rest
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .expect("REST URL")
        .to_string();
    first.wait_running();
    let target = format!("file:{}", dir.path().join("savepoints").display());
    let sp = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["savepoint", "--job", &url, "--stop", &target])
        .output()
        .unwrap();
    assert!(
        sp.status.success(),
        "stop with a savepoint: {}{}",
        String::from_utf8_lossy(&sp.stdout),
        String::from_utf8_lossy(&sp.stderr)
    );
    let (ok, out) = first.finish();
    assert!(ok, "the first run failed:\n{out}");
    let path = out
        .lines()
        .find_map(|l| l.split("--from-savepoint '").nth(1))
        .and_then(|r| r.split('\'').next())
        .unwrap_or_else(|| panic!("no savepoint path in:\n{out}"))
        .to_string();
    // Parallelism 3 on three workers, from that savepoint.
    let mut args = job_args(dir.path(), events);
    let p = args.iter().position(|a| a == "--parallelism").unwrap();
    args[p + 1] = "3".into();
    let second = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(&args)
        .args(["--workers", "3", "--spawn-workers", "--from-savepoint", &path])
        .stderr(Stdio::from(
            std::fs::File::create(dir.path().join("second.err")).unwrap(),
        ))
        .output()
        .unwrap();
    let out = String::from_utf8_lossy(&second.stdout);
    assert!(second.status.success(), "the rescaled run failed:\n{out}");
    assert!(out.contains("started from savepoint"), "{out}");
    assert!(out.contains("exactly-once: ok"), "{out}");
}

/// A TCP proxy to 127.0.0.1:`target` (threads, std sockets) that shuts
/// down every connection open at the moment `limit` bytes went through it
/// in all, once; later connections pass. Returns its port and the number
/// of cuts made.
fn cutting_proxy(target: u16, limit: usize) -> (u16, Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpListener, TcpStream};
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let cuts = Arc::new(AtomicUsize::new(0));
    let seen = cuts.clone();
    let bytes = Arc::new(AtomicUsize::new(0));
    let cut = Arc::new(AtomicBool::new(false));
    let live: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(client) = client else { continue };
            let Ok(server) = TcpStream::connect(("127.0.0.1", target)) else {
                continue;
            };
            if !cut.load(Ordering::SeqCst) {
                let mut l = live.lock().unwrap();
                l.push(client.try_clone().unwrap());
                l.push(server.try_clone().unwrap());
            }
            for (mut from, mut to) in [
                (client.try_clone().unwrap(), server.try_clone().unwrap()),
                (server, client),
            ] {
                let (bytes, cut, live, cuts) = (bytes.clone(), cut.clone(), live.clone(), cuts.clone());
                std::thread::spawn(move || {
                    let mut buf = [0u8; 8192];
                    loop {
                        let n = match from.read(&mut buf) {
                            Ok(0) | Err(_) => break,
                            Ok(n) => n,
                        };
                        if to.write_all(&buf[..n]).is_err() {
                            break;
                        }
                        let total = bytes.fetch_add(n, Ordering::SeqCst) + n;
                        if total >= limit && !cut.swap(true, Ordering::SeqCst) {
                            cuts.fetch_add(1, Ordering::SeqCst);
                            for s in live.lock().unwrap().drain(..) {
                                let _ = s.shutdown(Shutdown::Both);
                            }
                        }
                    }
                    let _ = to.shutdown(Shutdown::Write);
                });
            }
        }
    });
    (port, seen)
}

#[test]
fn channels_between_worker_processes_cut_mid_stream_are_recovered_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let events = RATE * 4;
    let coordinator = Coordinator::start(dir.path(), events, "127.0.0.1:0", false);
    let addr = coordinator.addr();
    // The second worker's channels go through the proxy, which cuts every
    // connection once after 1 MB.
    let channel_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (proxy, cuts) = cutting_proxy(channel_port, 1 << 20);
    let mut second = job_args(dir.path(), events);
    second.extend([
        "--channel-port".to_string(),
        channel_port.to_string(),
        "--advertise".to_string(),
        format!("127.0.0.1:{proxy}"),
    ]);
    let workers = [
        worker(dir.path(), events, &addr, 0),
        worker_with(dir.path(), second, &addr, 1),
    ];
    let (ok, out) = coordinator.finish();
    assert!(ok, "the coordinator failed:\n{out}");
    assert_eq!(cuts.load(std::sync::atomic::Ordering::SeqCst), 1, "{out}");
    assert!(
        out.lines().any(|l| l.starts_with("recovery:")),
        "the cut failed an attempt, which was recovered:\n{out}"
    );
    assert!(out.contains("exactly-once: ok"), "{out}");
    for mut w in workers {
        assert!(w.wait().unwrap().success());
    }
}

/// The two-input job in every process of the test below.
fn two_input_job(storage: Arc<dyn sluice_core::CheckpointStorage>, events: u64) -> sluice_runtime::Job {
    let job = sluice_runtime::Job::new("two-input")
        .with_parallelism(3)
        .with_state_backend(Arc::new(sluice_backend_memory::MemoryStateBackend::new()))
        .with_checkpoint_storage(storage)
        .with_restart_strategy(sluice_runtime::RestartStrategy::FixedDelay {
            attempts: 10,
            delay: Duration::ZERO,
        })
        .with_checkpointing(sluice_runtime::CheckpointConfig::every(Duration::from_millis(
            100,
        )));
    sluice_runtime::workload::two_input_sum(&job, events, 1000).unwrap();
    job
}

const TWO_INPUT_EVENTS: u64 = 1_500_000;

async fn shared_storage(dir: &str) -> Arc<dyn sluice_core::CheckpointStorage> {
    sluice_runtime::location::open_storage(&format!("file:{dir}"), &Default::default())
        .await
        .unwrap()
}

/// Not a test of its own: the worker processes of the test below run this
/// (this test binary, started with `--ignored --exact` and the
/// coordinator's address in `SLUICE_TEST_COORDINATOR`).
#[test]
#[ignore = "the worker process of a_two_input_job_on_three_worker_processes_survives_a_sigkill"]
fn two_input_worker_process() {
    let addr = std::env::var("SLUICE_TEST_COORDINATOR").expect("started by the test");
    let dir = std::env::var("SLUICE_TEST_DIR").expect("started by the test");
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let job = two_input_job(shared_storage(&dir).await, TWO_INPUT_EVENTS);
        job.start_worker(addr.parse().unwrap(), Default::default())
            .unwrap()
            .wait()
            .await
            .expect("the worker ends well");
    });
}

#[test]
fn a_two_input_job_on_three_worker_processes_survives_a_sigkill() {
    let dir = tempfile::tempdir().unwrap();
    let chk = dir.path().join("checkpoints").display().to_string();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let storage = shared_storage(&chk).await;
        let pool = sluice_runtime::cluster::WorkerPool::bind("127.0.0.1:0".parse().unwrap(), 3)
            .await
            .unwrap();
        let handle = two_input_job(storage.clone(), TWO_INPUT_EVENTS)
            .with_workers(pool.clone())
            .start()
            .unwrap();
        let monitor = handle.monitor();
        let spawn = || {
            Command::new(std::env::current_exe().unwrap())
                .args(["--ignored", "--exact", "two_input_worker_process", "--nocapture"])
                .env("SLUICE_TEST_COORDINATOR", pool.local_addr().to_string())
                .env("SLUICE_TEST_DIR", &chk)
                .stdout(Stdio::null())
                .spawn()
                .unwrap()
        };
        let mut workers = [spawn(), spawn(), spawn()];
        sluice_runtime::testing::wait_for_completed_checkpoint(&monitor, Duration::from_secs(60)).await;
        workers[1].kill().unwrap();
        let _ = workers[1].wait();
        workers[1] = spawn();
        let result = tokio::time::timeout(Duration::from_secs(120), handle.wait())
            .await
            .expect("the job ends")
            .expect("the job recovers and succeeds");
        assert!(
            result
                .recoveries
                .iter()
                .any(|r| r.restored_from.is_some() && r.cause.contains("lost")),
            "{result:?}"
        );
        let source =
            sluice_runtime::RestoreSource::checkpoint(storage.clone(), result.final_checkpoint.unwrap())
                .await
                .unwrap();
        let sums = sluice_runtime::workload::sums_in(&source, "two-input-sum")
            .await
            .unwrap();
        assert_eq!(
            sums,
            sluice_runtime::workload::two_input_expected(TWO_INPUT_EVENTS, 1000)
        );
        for w in &mut workers {
            assert!(w.wait().unwrap().success());
        }
    });
}
