//! A worker: runs the tasks the job master deploys onto it, with the same
//! code as in one process, its channels over TCP.

use super::protocol::{self, Deploy, Inbox, Outbox, RemoteFailure, ToMaster, ToWorker, CONTROL_VERSION};
use crate::error::{Result, RuntimeError};
use crate::graph::TaskBuild;
use crate::master::{panic_message, stop_tasks, task_runtime, JobContext, TaskPlace};
use crate::net::{ChannelId, ChannelListener, Producers, WireStats};
use crate::savepoint::RestoreSource;
use crate::task::{Control, SavepointTargetMap, TaskEvent};
use sluice_core::CheckpointStorage;
use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tracing::{info, warn};

/// How a worker runs.
#[derive(Debug, Clone)]
pub struct WorkerOptions {
    /// The address the worker's channel listener binds (port chosen
    /// freely); other workers connect to it. Default 127.0.0.1.
    pub bind: IpAddr,
    /// The port of the channel listener (0, the default: any free port).
    pub channel_port: u16,
    /// The address other workers are told to connect to for this worker's
    /// channels, when it is not the bound one (a NAT, a pod's service
    /// address, a proxy). Default: the bound address.
    pub advertise: Option<SocketAddr>,
    /// How long the worker keeps trying to reach its coordinator (at start,
    /// and after losing it) before giving up. Default 60 s.
    pub reconnect_for: Duration,
    /// How savepoint targets named `s3://…` are reached (the endpoint).
    pub s3: crate::location::S3Options,
}

impl Default for WorkerOptions {
    fn default() -> Self {
        WorkerOptions {
            bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            channel_port: 0,
            advertise: None,
            reconnect_for: Duration::from_secs(60),
            s3: crate::location::S3Options::default(),
        }
    }
}

/// A running worker ([`crate::Job::start_worker`]).
pub struct WorkerHandle {
    join: JoinHandle<Result<()>>,
}

impl WorkerHandle {
    /// Waits until the job ends (`Ok`) or the worker gives up.
    pub async fn wait(self) -> Result<()> {
        match self.join.await {
            Ok(r) => r,
            Err(e) => Err(RuntimeError::Internal(format!("the worker stopped: {e}"))),
        }
    }

    /// Stops the worker at once, as if its process died: its connections
    /// drop, its tasks stop.
    pub fn kill(&self) {
        self.join.abort();
    }
}

/// What a worker needs besides the job context.
pub(crate) struct WorkerSetup {
    pub ctx: JobContext,
    /// The storage of the savepoint the job starts from, if any.
    pub savepoint_storage: Option<Arc<dyn CheckpointStorage>>,
}

pub(crate) fn start(setup: WorkerSetup, coordinator: SocketAddr, options: WorkerOptions) -> WorkerHandle {
    WorkerHandle {
        join: tokio::spawn(run(setup, coordinator, options)),
    }
}

async fn run(setup: WorkerSetup, coordinator: SocketAddr, options: WorkerOptions) -> Result<()> {
    let stats = Arc::new(WireStats::default());
    let listener =
        ChannelListener::bind(SocketAddr::new(options.bind, options.channel_port), stats.clone()).await?;
    let advertised = options.advertise.unwrap_or(listener.local_addr());
    let graph = setup.ctx.graph.fingerprint();
    let mut trying_since = Instant::now();
    loop {
        let stream = match TcpStream::connect(coordinator).await {
            Ok(s) => s,
            Err(e) => {
                if trying_since.elapsed() > options.reconnect_for {
                    return Err(RuntimeError::Network(format!(
                        "cannot reach the coordinator at {coordinator} for {:?}: {e}",
                        options.reconnect_for
                    )));
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let (counts, metrics) = (stats.clone(), setup.ctx.metrics.clone());
        let (mut inbox, out, writer) = protocol::open(stream, protocol::WORKER_SILENCE_LIMIT, move || {
            ToMaster::Heartbeat {
                wire_bytes_sent: counts.read().bytes_sent,
                source_records: metrics.source_records(),
            }
        });
        out.send(ToMaster::Register {
            version: CONTROL_VERSION,
            job: setup.ctx.name.clone(),
            graph: graph.clone(),
            channels: advertised,
        });
        match inbox.next_but(|m| matches!(m, ToWorker::Heartbeat)).await {
            Ok(ToWorker::Welcome { worker }) => {
                info!("registered at the coordinator {coordinator} as worker {worker}")
            }
            Ok(ToWorker::Refuse(reason)) => {
                return Err(RuntimeError::Network(format!(
                    "the coordinator at {coordinator} refused this worker: {reason}"
                )))
            }
            Ok(other) => {
                return Err(RuntimeError::Network(format!(
                "the coordinator at {coordinator} answered the registration with {other:?} (protocol error)"
            )))
            }
            Err(e) => {
                if trying_since.elapsed() > options.reconnect_for {
                    return Err(RuntimeError::Network(format!(
                        "cannot register at the coordinator at {coordinator} for {:?}: {e}",
                        options.reconnect_for
                    )));
                }
                warn!("registration at {coordinator}: {e}; trying again");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        }
        let mut session = Session {
            setup: &setup,
            listener: &listener,
            producers: Producers::new(stats.clone()),
            out,
            attempt: 0,
            tasks: JoinSet::new(),
            names: HashMap::new(),
            controls: HashMap::new(),
            writers: Arc::default(),
            events: None,
            savepoints: Arc::new(SavepointTargetMap::waiting(SAVEPOINT_TARGET_WAIT)),
            s3: options.s3.clone(),
        };
        let end = session.run(&mut inbox).await;
        session.stop_all().await;
        // Whatever comes next, no channel of these attempts may deliver.
        listener.fence(session.attempt + 1);
        match end {
            Ok(()) => {
                // The final traffic counts, then the connection closes.
                session.out.send(ToMaster::Heartbeat {
                    wire_bytes_sent: stats.read().bytes_sent,
                    source_records: setup.ctx.metrics.source_records(),
                });
                drop(session);
                let _ = tokio::time::timeout(Duration::from_secs(2), writer).await;
                info!("the job ended; worker stops");
                return Ok(());
            }
            Err(e) => {
                warn!("lost the coordinator at {coordinator}: {e}; its tasks are stopped, reconnecting");
                trying_since = Instant::now();
            }
        }
    }
}

/// One connection to the coordinator.
struct Session<'a> {
    setup: &'a WorkerSetup,
    listener: &'a ChannelListener,
    producers: Producers,
    out: Outbox<ToMaster>,
    attempt: u64,
    tasks: JoinSet<Result<()>>,
    /// Task index and name by tokio task id.
    names: HashMap<tokio::task::Id, (usize, String)>,
    controls: HashMap<usize, mpsc::UnboundedSender<Control>>,
    writers: Arc<Mutex<Vec<JoinHandle<()>>>>,
    events: Option<mpsc::UnboundedReceiver<TaskEvent>>,
    /// Where the savepoints in progress go (announced by the coordinator).
    savepoints: crate::task::SavepointTargets,
    s3: crate::location::S3Options,
}

/// How long a task waits for the target of a savepoint whose barrier came
/// before the coordinator's announcement.
const SAVEPOINT_TARGET_WAIT: Duration = Duration::from_secs(10);

async fn next_event(rx: &mut Option<mpsc::UnboundedReceiver<TaskEvent>>) -> Option<TaskEvent> {
    match rx {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

impl Session<'_> {
    /// Until the job ends (`Ok`) or the coordinator is lost.
    async fn run(&mut self, inbox: &mut Inbox) -> Result<()> {
        loop {
            tokio::select! {
                m = inbox.next::<ToWorker>() => match m? {
                    ToWorker::Deploy(d) => self.deploy(*d).await,
                    ToWorker::Control { attempt, task, control } => {
                        if attempt == self.attempt {
                            if let Some(c) = self.controls.get(&task) {
                                let _ = c.send(control);
                            }
                        }
                    }
                    ToWorker::SavepointTarget { attempt, id, location } => {
                        if attempt == self.attempt {
                            let (targets, s3) = (self.savepoints.clone(), self.s3.clone());
                            tokio::spawn(async move {
                                match crate::location::open_location(&location, &s3).await {
                                    Ok(l) => targets.insert(id, l),
                                    Err(e) => {
                                        warn!("savepoint {id}: cannot open its target {location}: {e}");
                                        targets.unreachable(id);
                                    }
                                }
                            });
                        }
                    }
                    ToWorker::Cancel { attempt } => {
                        if attempt == self.attempt {
                            self.stop_all().await;
                        }
                    }
                    ToWorker::Finished => return Ok(()),
                    ToWorker::Heartbeat | ToWorker::Welcome { .. } | ToWorker::Refuse(_) => {}
                },
                r = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => {
                    let (id, result) = match r {
                        Some(Ok((id, r))) => (id, r),
                        Some(Err(join)) => (join.id(), Err(panic_error(join))),
                        None => continue,
                    };
                    if let Some((task, name)) = self.names.remove(&id) {
                        let failure = result.err().map(|e| RemoteFailure {
                            closed_channel: matches!(e, RuntimeError::ChannelClosed { .. }),
                            task: name,
                            message: e.to_string(),
                        });
                        self.out.send(ToMaster::TaskDone { attempt: self.attempt, task, failure });
                    }
                },
                Some(event) = next_event(&mut self.events) => {
                    self.out.send(ToMaster::Event { attempt: self.attempt, event });
                },
            }
        }
    }

    /// Stops every task and snapshot writer of the current attempt.
    async fn stop_all(&mut self) {
        // Closed control channels stop busy tasks at their next batch.
        self.controls.clear();
        stop_tasks(&mut self.tasks, &self.writers).await;
        self.producers.abort_all();
        self.names.clear();
        self.events = None;
    }

    /// Runs the tasks of a new attempt (after stopping the earlier one's).
    async fn deploy(&mut self, d: Deploy) {
        self.stop_all().await;
        self.listener.fence(d.attempt);
        self.attempt = d.attempt;
        let ctx = &self.setup.ctx;
        let restore = match d.restore {
            None => Ok(None),
            Some(spec) => {
                let storage = match spec.in_job_storage {
                    true => Some(ctx.storage.clone()),
                    false => self.setup.savepoint_storage.clone(),
                };
                match storage {
                    Some(storage) => Ok(Some(Arc::new(RestoreSource {
                        metadata: Arc::new(spec.metadata),
                        storage,
                        base: spec.base,
                        location: spec.location,
                    }))),
                    None => Err(RuntimeError::InvalidJob(format!(
                        "the coordinator restores {}, a savepoint this worker's job does not start from: give \
                         every worker the same --from-savepoint",
                        spec.location
                    ))),
                }
            }
        };
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        self.events = Some(events_rx);
        self.savepoints.clear();
        let savepoints = self.savepoints.clone();
        for t in d.tasks {
            let known = ctx
                .graph
                .vertices
                .get(t.vertex as usize)
                .is_some_and(|v| t.subtask < v.parallelism);
            if !known {
                self.out.send(ToMaster::TaskDone {
                    attempt: d.attempt,
                    task: t.index,
                    failure: Some(RemoteFailure {
                        closed_channel: false,
                        task: format!("task {} subtask {}", t.vertex, t.subtask),
                        message: "this worker's job has no such task: run the same job build everywhere"
                            .into(),
                    }),
                });
                continue;
            }
            let place = TaskPlace {
                vertex: t.vertex as usize,
                subtask: t.subtask,
                index: t.index,
                restore: restore.as_ref().ok().cloned().flatten(),
                stopped: d.stopped,
            };
            let (rt, ctl_tx) = task_runtime(
                ctx,
                &place,
                events_tx.clone(),
                self.writers.clone(),
                savepoints.clone(),
            );
            let name = rt.init.task_name.to_string();
            let built = match &restore {
                Ok(_) => self.build(&d.hosts, t.vertex as usize, t.subtask, rt),
                Err(e) => Err(RuntimeError::InvalidJob(e.to_string())),
            };
            match built {
                Ok(body) => {
                    let h = self.tasks.spawn(body);
                    self.names.insert(h.id(), (t.index, name));
                    self.controls.insert(t.index, ctl_tx);
                }
                Err(e) => {
                    self.out.send(ToMaster::TaskDone {
                        attempt: d.attempt,
                        task: t.index,
                        failure: Some(RemoteFailure {
                            closed_channel: false,
                            task: name,
                            message: e.to_string(),
                        }),
                    });
                }
            }
        }
    }

    /// Task (`vertex`, `subtask`) with its channels over the network.
    fn build(
        &self,
        hosts: &[Vec<SocketAddr>],
        vertex: usize,
        subtask: u32,
        rt: crate::task::TaskRuntime,
    ) -> Result<crate::graph::TaskBody> {
        let graph = &self.setup.ctx.graph;
        let v = graph.vertices.get(vertex).ok_or_else(|| {
            RuntimeError::InvalidJob(format!(
                "the coordinator deployed task {vertex}, which this job does not have"
            ))
        })?;
        let mut inputs = Vec::new();
        let mut outputs = Vec::new();
        for (e, edge) in graph.edges.iter().enumerate() {
            if edge.to == vertex {
                for up in 0..graph.vertices[edge.from].parallelism {
                    let id = ChannelId {
                        attempt: self.attempt,
                        edge: e as u32,
                        from: up,
                        to: subtask,
                    };
                    inputs.push((edge.net.receiver)(self.listener, id));
                }
            }
            if edge.from == vertex {
                for down in 0..graph.vertices[edge.to].parallelism {
                    let addr = hosts
                        .get(edge.to)
                        .and_then(|h| h.get(down as usize))
                        .copied()
                        .ok_or_else(|| {
                            RuntimeError::InvalidJob(format!(
                                "the coordinator named no worker for subtask {down} of task {}",
                                graph.vertices[edge.to].name
                            ))
                        })?;
                    let id = ChannelId {
                        attempt: self.attempt,
                        edge: e as u32,
                        from: subtask,
                        to: down,
                    };
                    outputs.push((edge.net.sender)(addr, id, &self.producers));
                }
            }
        }
        let build = v
            .build
            .clone()
            .ok_or_else(|| RuntimeError::InvalidJob(format!("task {} has no sink", v.name)))?;
        build(&mut TaskBuild {
            runtime: Some(rt),
            inputs,
            outputs,
        })
    }
}

fn panic_error(join: tokio::task::JoinError) -> RuntimeError {
    RuntimeError::Panic {
        task: "?".into(),
        message: panic_message(join),
    }
}
