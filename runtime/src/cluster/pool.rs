//! The job master's side of a job spread over workers: the workers that
//! registered, the deployment of an attempt's tasks onto them, and the
//! routing of their events and task results into the attempt.

use super::protocol::{self, Deploy, Outbox, RestoreSpec, TaskSpec, ToMaster, ToWorker, CONTROL_VERSION};
use crate::error::{Result, RuntimeError};
use crate::master::JobContext;
use crate::savepoint::RestoreSource;
use crate::task::{TaskEvent, TaskInfo};
use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, Notify};
use tokio::task::JoinHandle;
use tracing::{info, warn};

/// How long an attempt waits for enough workers to register.
const WORKER_WAIT: Duration = Duration::from_secs(60);

/// The workers of a job spread over processes, as its job master sees
/// them: workers (`Job::start_worker`, CLI `sluice worker`) connect to
/// [`WorkerPool::local_addr`] and register; each attempt of the job is
/// deployed onto the first `workers` registered (subtask `s` of every
/// task on worker `s mod workers`), waiting for them if need be. A worker
/// lost (its connection closed, or silent for 5 s) fails the attempt; the
/// job restarts from its latest checkpoint once enough workers are there
/// again (a restarted or a spare one).
///
/// Give it to the job with [`crate::Job::with_workers`].
pub struct WorkerPool {
    addr: SocketAddr,
    workers: usize,
    state: Arc<Mutex<PoolState>>,
    changed: Arc<Notify>,
    accept: JoinHandle<()>,
}

struct Worker {
    peer: SocketAddr,
    channels: SocketAddr,
    job: String,
    graph: Vec<String>,
    out: Outbox<ToWorker>,
    writer: JoinHandle<()>,
}

#[derive(Default)]
struct PoolState {
    next_id: u32,
    workers: BTreeMap<u32, Worker>,
    /// The current attempt, its events and its tasks' results by index.
    attempt: u64,
    events: Option<mpsc::UnboundedSender<TaskEvent>>,
    pending: HashMap<usize, (u32, oneshot::Sender<Result<()>>)>,
    /// The number of tasks of the current attempt.
    tasks: usize,
    /// The job name and graph fingerprint workers must have (once known).
    expected: Option<(String, Vec<String>)>,
    /// Bytes each worker's channels sent and records its sources read (its
    /// latest report).
    wire: HashMap<u32, u64>,
    records: HashMap<u32, u64>,
    /// The job's metrics, where the workers' source records are summed.
    metrics: Option<Arc<crate::metrics::Metrics>>,
    /// Workers whose connection is open (registered or let go).
    connected: usize,
}

/// An attempt deployed onto workers: its id, and each task's handle and
/// result.
pub(crate) struct Deployment {
    pub attempt: u64,
    pub tasks: Vec<(TaskInfo, oneshot::Receiver<Result<()>>)>,
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl WorkerPool {
    /// Listens for workers on `addr` (port 0: any free port); attempts run
    /// on `workers` of them.
    pub async fn bind(addr: SocketAddr, workers: usize) -> Result<Arc<Self>> {
        if workers == 0 {
            return Err(RuntimeError::InvalidJob(
                "a worker pool needs at least one worker".into(),
            ));
        }
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| RuntimeError::Network(format!("cannot listen for workers on {addr}: {e}")))?;
        let addr = listener
            .local_addr()
            .map_err(|e| RuntimeError::Network(format!("address of the worker listener: {e}")))?;
        // Attempt ids grow across coordinator restarts too (workers that
        // reconnect fence the attempts they saw): they start at the time.
        let state = Arc::new(Mutex::new(PoolState {
            attempt: crate::master::now_ms(),
            ..PoolState::default()
        }));
        let changed = Arc::new(Notify::new());
        let accept = tokio::spawn(accept_loop(listener, state.clone(), changed.clone()));
        Ok(Arc::new(WorkerPool {
            addr,
            workers,
            state,
            changed,
            accept,
        }))
    }

    /// The address workers connect to.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Workers registered now.
    pub fn registered(&self) -> usize {
        self.lock().workers.len()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tells every worker that the job ended (they stop and exit), and
    /// waits briefly for the messages to leave.
    pub async fn finish(&self) {
        let workers: Vec<Worker> = {
            let mut st = self.lock();
            st.events = None;
            st.pending.clear();
            std::mem::take(&mut st.workers).into_values().collect()
        };
        for w in &workers {
            w.out.send(ToWorker::Finished);
        }
        drop(workers);
        // The workers answer with their last counts and close.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        loop {
            let notified = self.changed.notified();
            if self.lock().connected == 0 {
                break;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                break;
            }
        }
    }

    /// Bytes the workers' channels sent so far (as last reported: every
    /// second, and when the job ends).
    pub fn wire_bytes_sent(&self) -> u64 {
        self.lock().wire.values().sum()
    }

    /// Deploys the tasks of a new attempt onto the workers (waiting for
    /// enough of them): every earlier attempt's messages are dropped from
    /// now on.
    pub(crate) async fn deploy(
        &self,
        ctx: &JobContext,
        restore: Option<&Arc<RestoreSource>>,
        stopped: bool,
        events: &mpsc::UnboundedSender<TaskEvent>,
    ) -> Result<Deployment> {
        let graph = ctx.graph.fingerprint();
        let restore = restore.map(|r| RestoreSpec {
            metadata: (*r.metadata).clone(),
            base: r.base.clone(),
            location: r.location.clone(),
            in_job_storage: Arc::ptr_eq(&r.storage, &ctx.storage),
        });
        let deadline = tokio::time::Instant::now() + WORKER_WAIT;
        // Enough workers, checked and chosen under one lock.
        let mut st = loop {
            let notified = self.changed.notified();
            let have = self.registered();
            if have >= self.workers {
                let st = self.lock();
                if st.workers.len() >= self.workers {
                    break st;
                }
                continue; // one was lost meanwhile
            }
            info!(
                "waiting for workers at {}: {have} of {} registered",
                self.addr, self.workers
            );
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Err(RuntimeError::Network(format!(
                    "{} of {} workers registered at {} within {WORKER_WAIT:?}: start more workers \
                     (sluice run … --coordinator {})",
                    self.registered(),
                    self.workers,
                    self.addr,
                    self.addr
                )));
            }
        };
        let chosen: Vec<u32> = st.workers.keys().copied().take(self.workers).collect();
        for id in &chosen {
            let w = &st.workers[id];
            if w.job != ctx.name || w.graph != graph {
                return Err(RuntimeError::InvalidJob(format!(
                    "worker {id} at {} runs job {:?} with another graph than this job ({:?}): run the same \
                     job build with the same parameters on every worker",
                    w.peer, w.job, ctx.name
                )));
            }
        }
        st.attempt += 1;
        let attempt = st.attempt;
        st.events = Some(events.clone());
        st.pending.clear();
        let n = chosen.len();
        let hosts: Vec<Vec<SocketAddr>> = ctx
            .graph
            .vertices
            .iter()
            .map(|v| {
                (0..v.parallelism as usize)
                    .map(|s| st.workers[&chosen[s % n]].channels)
                    .collect()
            })
            .collect();
        let mut specs: Vec<Vec<TaskSpec>> = vec![Vec::new(); n];
        let mut tasks = Vec::new();
        for (v, vertex) in ctx.graph.vertices.iter().enumerate() {
            for s in 0..vertex.parallelism {
                let index = tasks.len();
                let slot = s as usize % n;
                let worker = chosen[slot];
                specs[slot].push(TaskSpec {
                    index,
                    vertex: v as u32,
                    subtask: s,
                });
                let out = st.workers[&worker].out.clone();
                let (ctl_tx, mut ctl_rx) = mpsc::unbounded_channel();
                tokio::spawn(async move {
                    while let Some(control) = ctl_rx.recv().await {
                        if !out.send(ToWorker::Control {
                            attempt,
                            task: index,
                            control,
                        }) {
                            break;
                        }
                    }
                });
                let (done_tx, done_rx) = oneshot::channel();
                st.pending.insert(index, (worker, done_tx));
                tasks.push((
                    TaskInfo {
                        name: crate::master::task_name(vertex, s),
                        is_source: vertex.is_source,
                        control: ctl_tx,
                    },
                    done_rx,
                ));
            }
        }
        for (slot, spec) in specs.into_iter().enumerate() {
            let w = &st.workers[&chosen[slot]];
            info!(
                "attempt {attempt}: {} tasks on worker {} at {}",
                spec.len(),
                chosen[slot],
                w.peer
            );
            w.out.send(ToWorker::Deploy(Box::new(Deploy {
                attempt,
                tasks: spec,
                hosts: hosts.clone(),
                restore: restore.clone(),
                stopped,
            })));
        }
        st.tasks = tasks.len();
        Ok(Deployment { attempt, tasks })
    }

    /// The job workers must run: a worker with another one is refused when
    /// it registers.
    pub(crate) fn expect_job(&self, name: String, graph: Vec<String>) {
        self.lock().expected = Some((name, graph));
    }

    /// Where the workers' source record counts are summed.
    pub(crate) fn attach_metrics(&self, metrics: Arc<crate::metrics::Metrics>) {
        self.lock().metrics = Some(metrics);
    }

    /// Tells the current attempt's workers where savepoint `id` goes.
    pub(crate) fn announce_savepoint(&self, id: sluice_core::CheckpointId, location: String) {
        let st = self.lock();
        for w in st.workers.values() {
            w.out.send(ToWorker::SavepointTarget {
                attempt: st.attempt,
                id,
                location: location.clone(),
            });
        }
    }

    /// The attempt ended: its workers stop its tasks.
    pub(crate) fn end_attempt(&self, attempt: u64) {
        let mut st = self.lock();
        if st.attempt == attempt {
            st.events = None;
            st.pending.clear();
        }
        for w in st.workers.values() {
            w.out.send(ToWorker::Cancel { attempt });
        }
    }
}

async fn accept_loop(listener: TcpListener, state: Arc<Mutex<PoolState>>, changed: Arc<Notify>) {
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                tokio::spawn(serve_worker(stream, state.clone(), changed.clone()));
            }
            Err(e) => {
                warn!("worker listener: cannot accept a connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// One worker's connection: registration, then its events and task
/// results until it is lost.
async fn serve_worker(stream: TcpStream, state: Arc<Mutex<PoolState>>, changed: Arc<Notify>) {
    let peer = stream
        .peer_addr()
        .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
    let (mut inbox, out, writer) =
        protocol::open(stream, protocol::HEARTBEAT_TIMEOUT, || ToWorker::Heartbeat);
    let (job, graph, channels) = match inbox.next_but(|m| matches!(m, ToMaster::Heartbeat { .. })).await {
        Ok(ToMaster::Register {
            version,
            job,
            graph,
            channels,
        }) => {
            if version != CONTROL_VERSION {
                out.send(ToWorker::Refuse(format!(
                    "the worker speaks control version {version}, the coordinator {CONTROL_VERSION}: run the \
                     same Sluice build everywhere"
                )));
                return;
            }
            let expected = state.lock().unwrap_or_else(|p| p.into_inner()).expected.clone();
            if let Some((name, fingerprint)) = expected {
                if name != job || fingerprint != graph {
                    let first_difference = fingerprint
                        .iter()
                        .zip(&graph)
                        .find(|(a, b)| a != b)
                        .map(|(a, b)| format!(" (coordinator: {a}; worker: {b})"))
                        .unwrap_or_default();
                    let reason = format!(
                        "the worker runs job {job:?} with another graph than the coordinator's job {name:?}{first_difference}: \
                         run the same job build with the same parameters on every worker"
                    );
                    warn!("worker at {peer} refused: {reason}");
                    out.send(ToWorker::Refuse(reason));
                    return;
                }
            }
            (job, graph, channels)
        }
        Ok(other) => {
            warn!("worker at {peer}: expected a registration, got {other:?}");
            return;
        }
        Err(e) => {
            warn!("worker at {peer}: {e}");
            return;
        }
    };
    let id = {
        let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
        let id = st.next_id;
        st.next_id += 1;
        st.connected += 1;
        out.send(ToWorker::Welcome { worker: id });
        st.workers.insert(
            id,
            Worker {
                peer,
                channels,
                job,
                graph,
                out: out.clone(),
                writer,
            },
        );
        id
    };
    drop(out);
    info!("worker {id} registered from {peer} (channels at {channels})");
    changed.notify_waiters();
    let reason = loop {
        match inbox.next::<ToMaster>().await {
            Ok(ToMaster::Heartbeat {
                wire_bytes_sent,
                source_records,
            }) => {
                let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
                st.wire.insert(id, wire_bytes_sent);
                st.records.insert(id, source_records);
                if let Some(m) = &st.metrics {
                    let total = st.records.values().sum();
                    m.remote_source_records
                        .store(total, std::sync::atomic::Ordering::Relaxed);
                }
            }
            Ok(ToMaster::Event { attempt, event }) => {
                let st = state.lock().unwrap_or_else(|p| p.into_inner());
                // The index names a task of the attempt (the job master
                // indexes its tables with it).
                if st.attempt == attempt && event.task() < st.tasks {
                    if let Some(events) = &st.events {
                        let _ = events.send(event);
                    }
                }
            }
            Ok(ToMaster::TaskDone {
                attempt,
                task,
                failure,
            }) => {
                let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
                if st.attempt == attempt {
                    if let Some((_, tx)) = st.pending.remove(&task) {
                        let _ = tx.send(match failure {
                            None => Ok(()),
                            Some(f) if f.closed_channel => Err(RuntimeError::ChannelClosed { task: f.task }),
                            Some(f) => Err(RuntimeError::Worker {
                                task: f.task,
                                message: f.message,
                            }),
                        });
                    }
                }
            }
            Ok(ToMaster::Register { .. }) => break "registered twice (protocol error)".to_string(),
            Err(e) => break e.to_string(),
        }
    };
    let mut st = state.lock().unwrap_or_else(|p| p.into_inner());
    st.connected -= 1;
    match st.workers.remove(&id) {
        Some(w) => w.writer.abort(),
        // Let go by `finish`: the job ended.
        None => {
            drop(st);
            changed.notify_waiters();
            return;
        }
    }
    let lost: Vec<usize> = st
        .pending
        .iter()
        .filter(|(_, (w, _))| *w == id)
        .map(|(t, _)| *t)
        .collect();
    for t in lost {
        if let Some((_, tx)) = st.pending.remove(&t) {
            let _ = tx.send(Err(RuntimeError::Network(format!(
                "worker {id} at {peer} was lost ({reason}); its tasks restart elsewhere"
            ))));
        }
    }
    drop(st);
    warn!("worker {id} at {peer} lost: {reason}");
    changed.notify_waiters();
}
