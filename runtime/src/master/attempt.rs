//! One job attempt: every task spawned (restoring the chosen restore
//! point), the loop that drives them — task completions and failures,
//! acknowledgements, the checkpoint timer, requests from handles, deadlines
//! — and the teardown that stops every task and snapshot writer.

use super::coordinator::{end_sources, Coordinator, TriggerKind};
use crate::config::CheckpointConfig;
use crate::error::{Result, RuntimeError};
use crate::graph::{JobGraph, TaskBuild};
use crate::handle::Request;
use crate::metrics::Metrics;
use crate::operator::InitContext;
use crate::savepoint::RestoreSource;
use crate::task::{sleep_until_opt, Control, TaskEvent, TaskInfo, TaskRuntime};
use sluice_core::{CheckpointStorage, StateBackend};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::{JoinHandle, JoinSet};
use tracing::{error, info};

/// How long a closed-channel failure waits for the root cause (see
/// `Attempt::root_cause`).
const ROOT_CAUSE_GRACE: Duration = Duration::from_millis(500);

/// What every attempt of a job needs, fixed for the job's life.
pub(crate) struct JobContext {
    pub name: String,
    pub graph: Arc<JobGraph>,
    pub max_parallelism: u32,
    pub config: CheckpointConfig,
    pub backend: Arc<dyn StateBackend>,
    pub storage: Arc<dyn CheckpointStorage>,
    pub metrics: Arc<Metrics>,
    /// Every channel over TCP on 127.0.0.1 ([`crate::Job::with_loopback_network`]).
    pub network: Option<Arc<crate::net::LoopbackNetwork>>,
    /// The job's tasks run on these workers ([`crate::Job::with_workers`]).
    pub cluster: Option<Arc<crate::cluster::WorkerPool>>,
}

/// The requests of the job's handles, across attempts.
pub(crate) struct Requests {
    pub rx: mpsc::UnboundedReceiver<Request>,
    /// Every handle was dropped: the job runs on, detached.
    pub closed: bool,
}

/// Runs one attempt restoring `restore` (with `stopped`, the sources end
/// right after restoring: the job was stopped with that savepoint) until
/// every task finished (`Ok`) or one failed, then tears it down.
pub(crate) async fn run_attempt(
    ctx: &JobContext,
    coordinator: &mut Coordinator,
    restore: Option<Arc<RestoreSource>>,
    stopped: bool,
    requests: &mut Requests,
) -> Result<()> {
    let mut attempt = Attempt {
        ctx,
        coordinator,
        tasks: JoinSet::new(),
        task_of: HashMap::new(),
        infos: Vec::new(),
        writers: Arc::default(),
        deployed: None,
    };
    let (events_tx, mut events_rx) = mpsc::unbounded_channel();
    let build = attempt.spawn_tasks(restore, stopped, &events_tx).await;
    drop(events_tx);
    let result = match build {
        Ok(()) => attempt.run(&mut events_rx, requests).await,
        Err(e) => Err(e),
    };
    attempt.tear_down().await;
    result
}

/// The running tasks of an attempt and the coordinator driving them.
struct Attempt<'a> {
    ctx: &'a JobContext,
    coordinator: &'a mut Coordinator,
    tasks: JoinSet<Result<()>>,
    task_of: HashMap<tokio::task::Id, usize>,
    infos: Vec<TaskInfo>,
    /// The asynchronous parts of snapshots in flight.
    writers: Arc<Mutex<Vec<JoinHandle<()>>>>,
    /// The attempt's id on the workers, if the job runs on workers.
    deployed: Option<u64>,
}

enum Step {
    TaskDone(std::result::Result<(tokio::task::Id, Result<()>), tokio::task::JoinError>),
    AllDone,
    Event(TaskEvent),
    Tick,
    Request(Option<Request>),
    Timeout,
}

impl Attempt<'_> {
    /// Creates every channel and task of the graph and spawns the tasks
    /// (or deploys them onto the job's workers).
    async fn spawn_tasks(
        &mut self,
        restore: Option<Arc<RestoreSource>>,
        stopped: bool,
        events: &mpsc::UnboundedSender<TaskEvent>,
    ) -> Result<()> {
        if let Some(pool) = self.ctx.cluster.clone() {
            let deployment = pool.deploy(self.ctx, restore.as_ref(), stopped, events).await?;
            self.deployed = Some(deployment.attempt);
            for (info, done) in deployment.tasks {
                let handle = self.tasks.spawn(async move {
                    done.await.unwrap_or_else(|_| {
                        Err(RuntimeError::Network(
                            "the task's result was lost with its worker's connection".into(),
                        ))
                    })
                });
                self.task_of.insert(handle.id(), self.infos.len());
                self.infos.push(info);
            }
            return Ok(());
        }
        let graph = self.ctx.graph.clone();
        let network = self.ctx.network.as_deref();
        // A new attempt fences the channels of every earlier one.
        let attempt = network.map_or(0, |n| n.begin_attempt());
        let mut grids: Vec<_> = graph
            .edges
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let place = crate::edges::GridPlace {
                    network,
                    attempt,
                    edge: i as u32,
                };
                (e.grid)(
                    &place,
                    graph.vertices[e.from].parallelism as usize,
                    graph.vertices[e.to].parallelism as usize,
                )
            })
            .collect();
        for (v, vertex) in graph.vertices.iter().enumerate() {
            let build = vertex
                .build
                .clone()
                .ok_or_else(|| RuntimeError::InvalidJob(format!("task {} has no sink", vertex.name)))?;
            for s in 0..vertex.parallelism {
                let mut inputs = Vec::new();
                let mut outputs = Vec::new();
                for (e, edge) in graph.edges.iter().enumerate() {
                    if edge.to == v {
                        inputs.append(&mut grids[e].receivers[s as usize]);
                    }
                    if edge.from == v {
                        outputs.append(&mut grids[e].senders[s as usize]);
                    }
                }
                let index = self.infos.len();
                let place = TaskPlace {
                    vertex: v,
                    subtask: s,
                    index,
                    restore: restore.clone(),
                    stopped,
                };
                let (rt, ctl_tx) = task_runtime(
                    self.ctx,
                    &place,
                    events.clone(),
                    self.writers.clone(),
                    self.coordinator.savepoint_targets.clone(),
                );
                let name = rt.init.task_name.to_string();
                let body = build(&mut TaskBuild {
                    runtime: Some(rt),
                    inputs,
                    outputs,
                })?;
                let handle = self.tasks.spawn(body);
                self.task_of.insert(handle.id(), index);
                self.infos.push(TaskInfo {
                    name,
                    is_source: vertex.is_source,
                    control: ctl_tx,
                });
            }
        }
        Ok(())
    }

    /// Stops every task and snapshot writer; the coordinator cleans up
    /// what the attempt left.
    async fn tear_down(&mut self) {
        // Closed control channels stop busy tasks at their next batch (the
        // abort takes effect at their next await only).
        for info in &mut self.infos {
            info.control = mpsc::unbounded_channel().0;
        }
        stop_tasks(&mut self.tasks, &self.writers).await;
        if let (Some(pool), Some(attempt)) = (&self.ctx.cluster, self.deployed) {
            pool.end_attempt(attempt);
        }
        self.coordinator.end_attempt(&self.infos).await;
    }

    /// The attempt's loop: until every task is done (and the final
    /// checkpoint committed), or a task fails, or the job is cancelled.
    async fn run(
        &mut self,
        events: &mut mpsc::UnboundedReceiver<TaskEvent>,
        requests: &mut Requests,
    ) -> Result<()> {
        let infos = std::mem::take(&mut self.infos);
        let result = self.drive(&infos, events, requests).await;
        self.infos = infos;
        result
    }

    async fn drive(
        &mut self,
        infos: &[TaskInfo],
        events: &mut mpsc::UnboundedReceiver<TaskEvent>,
        requests: &mut Requests,
    ) -> Result<()> {
        let coordinator = &mut *self.coordinator;
        let mut sources_finishing = false;
        let mut exhausted = vec![false; infos.len()];
        let mut all_done = false;
        coordinator.begin_attempt();
        let interval = self.ctx.config.interval;
        let mut ticker = tokio::time::interval(interval.unwrap_or(Duration::from_secs(3600)));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await; // the first tick is immediate
        loop {
            let deadline = coordinator.next_deadline();
            let step = tokio::select! {
                r = self.tasks.join_next_with_id(), if !all_done => match r { Some(r) => Step::TaskDone(r), None => Step::AllDone },
                Some(ev) = events.recv() => Step::Event(ev),
                _ = ticker.tick(), if interval.is_some() => Step::Tick,
                r = requests.rx.recv(), if !requests.closed => Step::Request(r),
                _ = sleep_until_opt(deadline), if deadline.is_some() => Step::Timeout,
            };
            match step {
                Step::AllDone => {
                    // Wait for the final checkpoint's acknowledgements (its
                    // writers outlive the tasks) and its commit.
                    all_done = true;
                }
                Step::TaskDone(Ok((id, Ok(())))) => {
                    if let Some(&i) = self.task_of.get(&id) {
                        sources_finishing |= infos[i].is_source;
                    }
                }
                Step::TaskDone(Ok((id, Err(e)))) => {
                    let named = Named {
                        task_of: &self.task_of,
                        infos,
                    };
                    let first = named.error(id, e);
                    let later = |r: TaskResult| match r {
                        Ok((_, Ok(()))) => None,
                        Ok((id, Err(e))) => Some(named.error(id, e)),
                        Err(join) => Some(named.panic(join)),
                    };
                    return Err(root_cause(&mut self.tasks, first, later).await);
                }
                Step::TaskDone(Err(join)) => {
                    let named = Named {
                        task_of: &self.task_of,
                        infos,
                    };
                    return Err(named.panic(join));
                }
                Step::Event(TaskEvent::SourceExhausted { task }) => {
                    exhausted[task] = true;
                    let all = infos
                        .iter()
                        .enumerate()
                        .all(|(i, t)| !t.is_source || exhausted[i]);
                    if all && !sources_finishing {
                        sources_finishing = true;
                        if self.ctx.config.final_checkpoint {
                            // The sources end once it is committed.
                            coordinator.trigger_final(infos).await?;
                        } else {
                            end_sources(infos);
                        }
                    }
                }
                Step::Event(ev) => coordinator.on_event(ev, infos).await?,
                Step::Tick => {
                    if coordinator.completed.has_undecided() {
                        coordinator.resolve_undecided(infos).await;
                    }
                    let stopped = coordinator.stopped_with.is_some();
                    if !sources_finishing && !coordinator.savepoint_pending() && !stopped {
                        coordinator.trigger(infos, TriggerKind::Periodic).await?;
                    }
                }
                Step::Request(Some(Request::Savepoint { target, stop, tx })) => {
                    if sources_finishing || coordinator.stopped_with.is_some() {
                        let _ = tx.send(Err("the job's sources are finishing; no more savepoints".into()));
                    } else if coordinator.stopping() {
                        let _ = tx.send(Err("the job is being stopped with a savepoint".into()));
                    } else {
                        coordinator.trigger_savepoint(infos, target, stop, tx).await?;
                    }
                }
                Step::Request(None) => requests.closed = true,
                Step::Request(Some(Request::Cancel)) => {
                    info!("job {} cancelled", self.ctx.name);
                    return Err(RuntimeError::Cancelled);
                }
                Step::Request(Some(Request::Trigger(tx))) => {
                    if sources_finishing || coordinator.stopped_with.is_some() {
                        let _ = tx.send(Err("the job's sources are finishing; no more checkpoints".into()));
                    } else {
                        coordinator.trigger(infos, TriggerKind::Requested(tx)).await?;
                    }
                }
                Step::Timeout => coordinator.on_timeouts(infos).await?,
            }
            if let Some((id, reason)) = coordinator.final_failure.take() {
                // Failed but tolerated (else the coordinator returned the
                // error): take the final checkpoint again.
                info!("final checkpoint {id} failed ({reason}); taking it again");
                coordinator.trigger_final(infos).await?;
            }
            if all_done {
                return Ok(());
            }
        }
    }
}

/// `name (subtask/parallelism)`: how logs and errors name subtask `s`.
pub(crate) fn task_name(vertex: &crate::graph::VertexDef, s: u32) -> String {
    format!("{} ({}/{})", vertex.name, s + 1, vertex.parallelism)
}

/// Which subtask a task runs, and what it restores.
pub(crate) struct TaskPlace {
    pub vertex: usize,
    pub subtask: u32,
    /// The task's index in the attempt (events and control name it).
    pub index: usize,
    pub restore: Option<Arc<RestoreSource>>,
    pub stopped: bool,
}

/// What task `place` needs from its attempt, and the sender of its control
/// messages. The same in the job master's process and on a worker.
pub(crate) fn task_runtime(
    ctx: &JobContext,
    place: &TaskPlace,
    events: mpsc::UnboundedSender<TaskEvent>,
    writers: Arc<Mutex<Vec<JoinHandle<()>>>>,
    savepoints: crate::task::SavepointTargets,
) -> (TaskRuntime, mpsc::UnboundedSender<Control>) {
    let v = place.vertex;
    let vertex = &ctx.graph.vertices[v];
    let s = place.subtask;
    let (ctl_tx, ctl_rx) = mpsc::unbounded_channel();
    let name = task_name(vertex, s);
    let alignment_timeout = match ctx.config.unaligned {
        true => ctx.config.aligned_checkpoint_timeout,
        false => None,
    };
    let init = InitContext {
        job_name: ctx.name.clone(),
        task_name: Arc::from(name.as_str()),
        subtask: s,
        parallelism: vertex.parallelism,
        max_parallelism: ctx.max_parallelism,
        state_backend: ctx.backend.clone(),
        storage: ctx.storage.clone(),
        restore: place.restore.clone(),
        task_uid: Arc::from(vertex.uid.as_str()),
        incremental: ctx.config.incremental,
    };
    let rt = TaskRuntime {
        index: place.index,
        vertex: v as u32,
        vertex_name: Arc::from(vertex.name.as_str()),
        alignment_timeout,
        init,
        control: ctl_rx,
        events,
        writers,
        task_metrics: ctx
            .metrics
            .task(v as u32, &vertex.name, s, vertex.parallelism, vertex.is_source),
        savepoints,
        stopped: place.stopped,
    };
    (rt, ctl_tx)
}

/// Task failures, logged with the task's name.
struct Named<'a> {
    task_of: &'a HashMap<tokio::task::Id, usize>,
    infos: &'a [TaskInfo],
}

impl Named<'_> {
    fn name(&self, id: tokio::task::Id) -> &str {
        self.task_of
            .get(&id)
            .map(|i| self.infos[*i].name.as_str())
            .unwrap_or("?")
    }

    /// A task's error.
    fn error(&self, id: tokio::task::Id, e: RuntimeError) -> RuntimeError {
        error!("task {} failed: {e}", self.name(id));
        e
    }

    /// A task that panicked (or was aborted), as an error.
    fn panic(&self, join: tokio::task::JoinError) -> RuntimeError {
        let task = self.name(join.id()).to_string();
        let message = panic_message(join);
        error!("task {task} panicked: {message}");
        RuntimeError::Panic { task, message }
    }
}

/// Stops every task and snapshot writer.
pub(crate) async fn stop_tasks(tasks: &mut JoinSet<Result<()>>, writers: &Mutex<Vec<JoinHandle<()>>>) {
    tasks.abort_all();
    while tasks.join_next().await.is_some() {}
    let handles: Vec<JoinHandle<()>> = writers
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .drain(..)
        .collect();
    for h in &handles {
        h.abort();
    }
    for h in handles {
        let _ = h.await;
    }
}

/// A panicked (or aborted) task's message.
pub(crate) fn panic_message(join: tokio::task::JoinError) -> String {
    if join.is_panic() {
        let p = join.into_panic();
        p.downcast_ref::<String>()
            .cloned()
            .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
            .unwrap_or_else(|| "non-string panic".into())
    } else {
        "task was cancelled".into()
    }
}

/// What a task's join yields.
type TaskResult = std::result::Result<(tokio::task::Id, Result<()>), tokio::task::JoinError>;

/// The failure an attempt reports, given the `first` task error. A task
/// that saw a channel close is usually a consequence: the task at fault
/// dropped its end as it failed, and its own report may arrive a moment
/// later. So for a closed channel, wait briefly (up to [`ROOT_CAUSE_GRACE`])
/// for another task's error that is not one, and report that — the root
/// cause, as Flink does. `describe` turns a task's result into its error
/// (`None` for a task that ended well).
async fn root_cause(
    tasks: &mut JoinSet<Result<()>>,
    first: RuntimeError,
    mut describe: impl FnMut(TaskResult) -> Option<RuntimeError>,
) -> RuntimeError {
    if !matches!(first, RuntimeError::ChannelClosed { .. }) {
        return first;
    }
    let deadline = tokio::time::Instant::now() + ROOT_CAUSE_GRACE;
    while let Ok(Some(r)) = tokio::time::timeout_at(deadline, tasks.join_next_with_id()).await {
        match describe(r) {
            Some(e) if !matches!(e, RuntimeError::ChannelClosed { .. }) => return e,
            _ => {}
        }
    }
    first
}

#[cfg(test)]
mod tests {
    use super::*;

    fn closed(task: &str) -> RuntimeError {
        RuntimeError::ChannelClosed { task: task.into() }
    }

    fn describe(r: TaskResult) -> Option<RuntimeError> {
        match r {
            Ok((_, Ok(()))) => None,
            Ok((_, Err(e))) => Some(e),
            Err(join) => Some(RuntimeError::Panic {
                task: "?".into(),
                message: join.to_string(),
            }),
        }
    }

    #[tokio::test]
    async fn a_closed_channel_gives_way_to_the_failure_that_closed_it() {
        let mut tasks = JoinSet::new();
        tasks.spawn(async { Ok(()) });
        tasks.spawn(async { Err(closed("b")) });
        tasks.spawn(async {
            tokio::time::sleep(Duration::from_millis(50)).await;
            Err(RuntimeError::Injected("the root cause".into()))
        });
        let e = root_cause(&mut tasks, closed("a"), describe).await;
        assert!(
            matches!(&e, RuntimeError::Injected(m) if m == "the root cause"),
            "{e}"
        );
    }

    #[tokio::test]
    async fn a_root_cause_is_reported_at_once_and_a_lone_closed_channel_stays() {
        let mut tasks = JoinSet::new();
        tasks.spawn(async { Err(RuntimeError::Injected("later".into())) });
        let e = root_cause(&mut tasks, RuntimeError::Injected("first".into()), describe).await;
        assert!(matches!(&e, RuntimeError::Injected(m) if m == "first"), "{e}");
        // Nothing else fails within the grace: the closed channel is the answer.
        let mut tasks: JoinSet<Result<()>> = JoinSet::new();
        tasks.spawn(std::future::pending());
        let e = root_cause(&mut tasks, closed("a"), describe).await;
        assert!(
            matches!(&e, RuntimeError::ChannelClosed { task } if task == "a"),
            "{e}"
        );
    }
}
