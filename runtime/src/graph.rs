//! The job builder: sources, transformations, keyed processing, sinks.
//!
//! Transformations (`map`, `filter`, `flat_map`) are *chained* into the task
//! of the operator before them (Flink's operator chaining): they run in the
//! same tokio task through direct calls. `key_by`, `rebalance`, `broadcast`
//! and `forward` start a new task connected by channels.

use crate::channel::{ChannelReceiver, ChannelSender, InputGate, OutputWriter, Partitioner};
use crate::config::{CheckpointConfig, RestartStrategy};
use crate::error::{Result, RuntimeError};
use crate::keyed::{
    encode_key, Either, KeyedBackend, KeyedCoProcessFunction, KeyedCoProcessOp, KeyedProcessFunction,
    KeyedProcessOp,
};
use crate::operator::{FilterOp, FlatMapOp, MapOp, NetworkOutput, Operator};
use crate::sink::{Sink, SinkOp};
use crate::source::Source;
use crate::task::input_task::run_input_task;
use crate::task::source_task::run_source_task;
use crate::task::TaskRuntime;
use crate::two_phase::{TwoPhaseCommitSink, TwoPhaseSinkOp};
use futures::future::BoxFuture;
use serde::de::DeserializeOwned;
use serde::Serialize;
use sluice_core::{CheckpointStorage, OperatorUid, StateBackend, DEFAULT_MAX_PARALLELISM};
use std::any::Any;
use std::cell::RefCell;
use std::rc::Rc;
use std::sync::Arc;

/// A record type: what flows between operators. Records are serde types
/// because unaligned checkpoints store the records in flight between tasks
/// (as Flink requires a serializer for every type).
pub trait Record: Clone + Send + Serialize + DeserializeOwned + 'static {}
impl<T: Clone + Send + Serialize + DeserializeOwned + 'static> Record for T {}

pub(crate) type TaskBody = BoxFuture<'static, Result<()>>;
pub(crate) type AnyBox = Box<dyn Any + Send>;

/// What building one subtask's task is given.
pub(crate) struct TaskBuild {
    pub runtime: Option<TaskRuntime>,
    pub inputs: Vec<AnyBox>,
    pub outputs: Vec<AnyBox>,
}

impl TaskBuild {
    fn runtime(&mut self) -> Result<TaskRuntime> {
        self.runtime
            .take()
            .ok_or_else(|| RuntimeError::InvalidJob("task built twice".into()))
    }

    fn take_inputs<T: 'static>(&mut self) -> Result<Vec<ChannelReceiver<T>>> {
        std::mem::take(&mut self.inputs)
            .into_iter()
            .map(|b| {
                b.downcast::<ChannelReceiver<T>>()
                    .map(|b| *b)
                    .map_err(|_| RuntimeError::InvalidJob("input channel of the wrong record type".into()))
            })
            .collect()
    }

    fn take_outputs<T: 'static>(&mut self) -> Result<Vec<ChannelSender<T>>> {
        std::mem::take(&mut self.outputs)
            .into_iter()
            .map(|b| {
                b.downcast::<ChannelSender<T>>()
                    .map(|b| *b)
                    .map_err(|_| RuntimeError::InvalidJob("output channel of the wrong record type".into()))
            })
            .collect()
    }
}

type BuildFn = Arc<dyn Fn(&mut TaskBuild) -> Result<TaskBody> + Send + Sync>;
type OpenFn<T> = Arc<dyn Fn(&mut TaskBuild, Box<dyn Operator<T>>) -> Result<TaskBody> + Send + Sync>;

pub(crate) struct VertexDef {
    pub name: String,
    /// The task's stable id ([`sluice_core::ChannelStateHandle::task_uid`]):
    /// its head operator's uid, or derived from its inputs and its name.
    pub uid: String,
    pub parallelism: u32,
    pub build: Option<BuildFn>,
    pub is_source: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum EdgeKind {
    Forward,
    Other,
}

pub(crate) struct EdgeDef {
    pub from: usize,
    pub to: usize,
    pub kind: EdgeKind,
    pub grid: crate::edges::GridFn,
    pub net: crate::edges::NetEnds,
}

/// The frozen job graph, shared by every attempt.
pub(crate) struct JobGraph {
    pub vertices: Vec<VertexDef>,
    pub edges: Vec<EdgeDef>,
}

impl JobGraph {
    /// What must be equal in the job master's and every worker's job: the
    /// tasks (uid, name, parallelism) and edges, in order.
    pub fn fingerprint(&self) -> Vec<String> {
        let vertices = self
            .vertices
            .iter()
            .map(|v| format!("task {} {:?} p{}", v.uid, v.name, v.parallelism));
        let edges = self
            .edges
            .iter()
            .map(|e| format!("edge {} -> {} {:?}", e.from, e.to, e.kind));
        vertices.chain(edges).collect()
    }
}

pub(crate) struct Builder {
    pub name: String,
    pub parallelism: u32,
    pub max_parallelism: u32,
    pub checkpoint: CheckpointConfig,
    pub restart: RestartStrategy,
    pub state_backend: Option<Arc<dyn StateBackend>>,
    pub storage: Option<Arc<dyn CheckpointStorage>>,
    pub resume: bool,
    pub network: Option<Arc<crate::net::LoopbackNetwork>>,
    pub cluster: Option<Arc<crate::cluster::WorkerPool>>,
    pub from_savepoint: Option<crate::savepoint::SavepointLocation>,
    pub allow_non_restored_state: bool,
    #[cfg(feature = "testing")]
    pub commit_hook: Option<Arc<dyn crate::testing::CommitHook>>,
    pub vertices: Vec<VertexDef>,
    pub edges: Vec<EdgeDef>,
    pub uids: Vec<OperatorUid>,
    /// Whether a two-phase-commit sink is in the job.
    pub transactional: bool,
    pub errors: Vec<String>,
}

/// A streaming job under construction (Flink's `StreamExecutionEnvironment`).
///
/// Build the dataflow with [`Job::source`] and the [`DataStream`] methods,
/// then [`Job::start`] it inside a tokio runtime.
#[derive(Clone)]
pub struct Job {
    pub(crate) inner: Rc<RefCell<Builder>>,
}

impl Job {
    /// A new job. Defaults: parallelism 1, max parallelism 128, no periodic
    /// checkpoints, fixed-delay restarts, and (with the `memory` feature) the
    /// memory state backend and checkpoint storage.
    pub fn new(name: impl Into<String>) -> Self {
        Job {
            inner: Rc::new(RefCell::new(Builder {
                name: name.into(),
                parallelism: 1,
                max_parallelism: DEFAULT_MAX_PARALLELISM,
                checkpoint: CheckpointConfig::default(),
                restart: RestartStrategy::default(),
                state_backend: None,
                storage: None,
                resume: false,
                network: None,
                cluster: None,
                from_savepoint: None,
                allow_non_restored_state: false,
                #[cfg(feature = "testing")]
                commit_hook: None,
                vertices: Vec::new(),
                edges: Vec::new(),
                uids: Vec::new(),
                transactional: false,
                errors: Vec::new(),
            })),
        }
    }

    /// Default parallelism of operators created after this call.
    pub fn with_parallelism(self, parallelism: u32) -> Self {
        self.inner.borrow_mut().parallelism = parallelism;
        self
    }

    /// The number of key groups (fixed for the life of the job's state).
    pub fn with_max_parallelism(self, max_parallelism: u32) -> Self {
        self.inner.borrow_mut().max_parallelism = max_parallelism;
        self
    }

    /// Checkpoint settings.
    pub fn with_checkpointing(self, config: CheckpointConfig) -> Self {
        self.inner.borrow_mut().checkpoint = config;
        self
    }

    /// The restart strategy.
    pub fn with_restart_strategy(self, strategy: RestartStrategy) -> Self {
        self.inner.borrow_mut().restart = strategy;
        self
    }

    /// Where keyed state lives while running.
    pub fn with_state_backend(self, backend: Arc<dyn StateBackend>) -> Self {
        self.inner.borrow_mut().state_backend = Some(backend);
        self
    }

    /// Where checkpoints go.
    pub fn with_checkpoint_storage(self, storage: Arc<dyn CheckpointStorage>) -> Self {
        self.inner.borrow_mut().storage = Some(storage);
        self
    }

    /// Run every channel between the job's tasks through TCP connections on
    /// 127.0.0.1 ([`crate::net::LoopbackNetwork`]): the wire format, the
    /// credit-based flow control and the fencing of multi-process jobs, in
    /// one process. For testing and measuring the network path.
    pub fn with_loopback_network(self, network: Arc<crate::net::LoopbackNetwork>) -> Self {
        self.inner.borrow_mut().network = Some(network);
        self
    }

    /// Run the job's tasks on the workers of `pool` (other processes running
    /// the same job with [`Job::start_worker`]); this process is the job
    /// master (coordinator). Channels go over TCP; the checkpoint storage
    /// must be one every worker reaches (a shared directory, S3).
    pub fn with_workers(self, pool: Arc<crate::cluster::WorkerPool>) -> Self {
        self.inner.borrow_mut().cluster = Some(pool);
        self
    }

    /// Restore from the latest completed checkpoint in the storage at start
    /// (resume after the process was killed). Without it, a job starts
    /// empty; checkpoint ids continue after the highest in storage anyway.
    pub fn resume_from_latest_checkpoint(self, resume: bool) -> Self {
        self.inner.borrow_mut().resume = resume;
        self
    }

    /// Start from the savepoint (or retained checkpoint, `…#chk-<id>`) at
    /// `location` (Flink's `-s`): keyed state maps to operators by uid (at
    /// any parallelism up to the max parallelism, which must be the
    /// savepoint's), sources seek to its positions. An operator with no state
    /// in it starts empty; state of a uid the job does not have is an error
    /// unless [`allow_non_restored_state`](Self::allow_non_restored_state).
    /// After a failure the job restores from its latest checkpoint, or from
    /// this savepoint if it has none yet.
    pub fn from_savepoint(self, location: crate::savepoint::SavepointLocation) -> Self {
        self.inner.borrow_mut().from_savepoint = Some(location);
        self
    }

    /// Skip (and log) the state of savepoint operators that the job does
    /// not have, instead of refusing to start.
    pub fn allow_non_restored_state(self, allow: bool) -> Self {
        self.inner.borrow_mut().allow_non_restored_state = allow;
        self
    }

    /// Test hook called before every metadata commit ([`crate::testing`];
    /// feature `testing`).
    #[cfg(feature = "testing")]
    pub fn with_commit_hook(self, hook: Arc<dyn crate::testing::CommitHook>) -> Self {
        self.inner.borrow_mut().commit_hook = Some(hook);
        self
    }

    fn register_uid(&self, uid: &str) -> OperatorUid {
        let mut b = self.inner.borrow_mut();
        match OperatorUid::new(uid) {
            Ok(u) => {
                if b.uids.contains(&u) {
                    b.errors
                        .push(format!("operator uid {uid:?} is used twice; uids must be unique"));
                }
                b.uids.push(u.clone());
                u
            }
            Err(e) => {
                b.errors.push(e.to_string());
                OperatorUid(uid.to_string())
            }
        }
    }

    /// Adds a task. Its stable id is `uid` (a source's or keyed operator's
    /// uid) or, for tasks without one, derived from the ids of the tasks
    /// `inputs` and the task's name (`running-sum/rebalance`), made unique
    /// with a `#n` suffix if needed. The id matches channel state to tasks
    /// across restarts, so it must not depend on the order of construction
    /// alone.
    fn add_vertex(
        &self,
        name: String,
        parallelism: Option<u32>,
        is_source: bool,
        uid: Option<&OperatorUid>,
        inputs: &[usize],
    ) -> usize {
        let mut b = self.inner.borrow_mut();
        let parallelism = parallelism.unwrap_or(b.parallelism);
        let base = match uid {
            Some(u) => u.to_string(),
            None => {
                let from: Vec<&str> = inputs.iter().map(|v| b.vertices[*v].uid.as_str()).collect();
                format!("{}/{name}", from.join("+"))
            }
        };
        let mut uid = base.clone();
        let mut n = 1;
        while b.vertices.iter().any(|v| v.uid == uid) {
            n += 1;
            uid = format!("{base}#{n}");
        }
        b.vertices.push(VertexDef {
            name,
            uid,
            parallelism,
            build: None,
            is_source,
        });
        b.vertices.len() - 1
    }

    /// A source with the operator uid `uid` (its split positions are stored
    /// under it) and the given parallelism.
    pub fn source<T: Record>(&self, uid: &str, source: impl Source<T>, parallelism: u32) -> DataStream<T> {
        let uid = self.register_uid(uid);
        let vertex = self.add_vertex(format!("source {uid}"), Some(parallelism), true, Some(&uid), &[]);
        let source: Arc<dyn Source<T>> = Arc::new(source);
        let open: OpenFn<T> = Arc::new(move |tb, chain| {
            let rt = tb.runtime()?;
            Ok(Box::pin(run_source_task(source.clone(), uid.clone(), chain, rt)))
        });
        DataStream {
            job: self.clone(),
            parts: vec![(vertex, open)],
        }
    }
}

/// A stream of records of type `T` (Flink's `DataStream`).
pub struct DataStream<T> {
    job: Job,
    /// The open chains producing this stream (more than one after `union`).
    parts: Vec<(usize, OpenFn<T>)>,
}

impl<T: Record> DataStream<T> {
    fn chain<U: Record>(
        self,
        wrap: impl Fn(Box<dyn Operator<U>>) -> Box<dyn Operator<T>> + Send + Sync + 'static,
    ) -> DataStream<U> {
        let wrap = Arc::new(wrap);
        let parts = self
            .parts
            .into_iter()
            .map(|(v, open)| {
                let wrap = wrap.clone();
                let open2: OpenFn<U> = Arc::new(move |tb, down| open(tb, wrap(down)));
                (v, open2)
            })
            .collect();
        DataStream { job: self.job, parts }
    }

    /// Applies `f` to every record.
    pub fn map<U: Record>(self, f: impl Fn(T) -> U + Send + Sync + 'static) -> DataStream<U> {
        let f = Arc::new(f);
        self.chain(move |out| Box::new(MapOp { f: f.clone(), out }))
    }

    /// Keeps the records for which `f` is true.
    pub fn filter(self, f: impl Fn(&T) -> bool + Send + Sync + 'static) -> DataStream<T> {
        let f = Arc::new(f);
        self.chain(move |out| Box::new(FilterOp { f: f.clone(), out }))
    }

    /// Replaces every record by the records `f` returns.
    pub fn flat_map<U: Record, I: IntoIterator<Item = U> + 'static>(
        self,
        f: impl Fn(T) -> I + Send + Sync + 'static,
    ) -> DataStream<U> {
        let f = Arc::new(f);
        self.chain(move |out| Box::new(FlatMapOp { f: f.clone(), out }))
    }

    /// Merges streams of the same type.
    pub fn union(mut self, other: DataStream<T>) -> DataStream<T> {
        self.parts.extend(other.parts);
        self
    }

    /// Sets the parallelism of the task this stream's last operator runs in.
    pub fn set_parallelism(self, parallelism: u32) -> Self {
        {
            let mut b = self.job.inner.borrow_mut();
            for (v, _) in &self.parts {
                b.vertices[*v].parallelism = parallelism;
            }
        }
        self
    }

    /// Ends every open chain with a network output to a new task and
    /// returns the new task's vertex and its head.
    fn exchange(
        self,
        partitioner: Partitioner<T>,
        kind: EdgeKind,
        name: String,
        uid: Option<&OperatorUid>,
    ) -> (Job, usize) {
        let job = self.job.clone();
        let inputs: Vec<usize> = self.parts.iter().map(|(v, _)| *v).collect();
        let to = job.add_vertex(name, None, false, uid, &inputs);
        let mut b = job.inner.borrow_mut();
        let max_parallelism = b.max_parallelism;
        for (from, open) in self.parts {
            let partitioner = partitioner.clone();
            let task_name: Arc<str> = Arc::from(b.vertices[from].name.as_str());
            let build: BuildFn = Arc::new(move |tb| {
                let senders = tb.take_outputs::<T>()?;
                let subtask = tb.runtime.as_ref().map(|r| r.init.subtask).unwrap_or(0) as usize;
                let timeout = tb.runtime.as_ref().and_then(|r| r.alignment_timeout);
                let metrics = tb.runtime.as_ref().map(|r| r.task_metrics.clone());
                let writer = OutputWriter::new(
                    senders,
                    partitioner.clone(),
                    subtask,
                    max_parallelism,
                    task_name.clone(),
                )
                .with_alignment_timeout(timeout)
                .with_metrics(metrics);
                open(tb, Box::new(NetworkOutput { writer }))
            });
            b.vertices[from].build = Some(build);
            b.edges.push(EdgeDef {
                from,
                to,
                kind,
                grid: Arc::new(crate::edges::grid::<T>),
                net: crate::edges::net_ends::<T>(),
            });
        }
        drop(b);
        (job, to)
    }

    fn exchange_to_stream(self, partitioner: Partitioner<T>, kind: EdgeKind, name: &str) -> DataStream<T> {
        let (job, to) = self.exchange(partitioner, kind, name.to_string(), None);
        let open: OpenFn<T> = Arc::new(|tb, chain| {
            let rx = tb.take_inputs::<T>()?;
            let rt = tb.runtime()?;
            Ok(Box::pin(run_input_task(InputGate::new(rx), chain, rt)))
        });
        DataStream {
            job,
            parts: vec![(to, open)],
        }
    }

    /// Redistributes records round robin to a new task.
    pub fn rebalance(self) -> DataStream<T> {
        self.exchange_to_stream(Partitioner::Rebalance, EdgeKind::Other, "rebalance")
    }

    /// Sends every record to every subtask of a new task.
    pub fn broadcast(self) -> DataStream<T> {
        self.exchange_to_stream(Partitioner::Broadcast, EdgeKind::Other, "broadcast")
    }

    /// Sends subtask `i`'s records to subtask `i` of a new task (same parallelism).
    pub fn forward(self) -> DataStream<T> {
        self.exchange_to_stream(Partitioner::Forward, EdgeKind::Forward, "forward")
    }

    /// Partitions the stream by key (by key group of the key's bytes).
    pub fn key_by<K: Serialize + Send + Sync + 'static>(
        self,
        key: impl Fn(&T) -> K + Send + Sync + 'static,
    ) -> KeyedStream<T, K> {
        KeyedStream {
            stream: self,
            key: Arc::new(key),
        }
    }

    /// Writes the stream to a sink.
    pub fn sink(self, sink: impl Sink<T>) -> Result<()> {
        let sink: Arc<dyn Sink<T>> = Arc::new(sink);
        self.end_with(move |subtask, parallelism| {
            let writer = sink.open(subtask, parallelism)?;
            Ok(Box::new(SinkOp { writer }))
        });
        Ok(())
    }

    /// Writes the stream to an exactly-once sink ([`TwoPhaseCommitSink`])
    /// under operator uid `uid` (its pre-committed transactions are stored
    /// in checkpoints under it).
    pub fn transactional_sink<S: TwoPhaseCommitSink<T>>(self, uid: &str, sink: S) -> Result<()> {
        let uid = self.job.register_uid(uid);
        self.job.inner.borrow_mut().transactional = true;
        let sink = Arc::new(sink);
        self.end_with(move |subtask, parallelism| {
            let writer = sink.open(subtask, parallelism)?;
            Ok(Box::new(TwoPhaseSinkOp::new(uid.clone(), writer, subtask)))
        });
        Ok(())
    }

    /// Ends every open chain (one, after a rebalance of a union) with the
    /// operator `make(subtask, parallelism)` builds.
    fn end_with(self, make: impl Fn(u32, u32) -> Result<Box<dyn Operator<T>>> + Send + Sync + 'static) {
        let stream = if self.parts.len() > 1 {
            self.rebalance()
        } else {
            self
        };
        let make = Arc::new(make);
        let job = stream.job.clone();
        let mut b = job.inner.borrow_mut();
        for (v, open) in stream.parts {
            let make = make.clone();
            let build: BuildFn = Arc::new(move |tb| {
                let (subtask, parallelism) = tb
                    .runtime
                    .as_ref()
                    .map(|r| (r.init.subtask, r.init.parallelism))
                    .unwrap_or((0, 1));
                open(tb, make(subtask, parallelism)?)
            });
            b.vertices[v].build = Some(build);
        }
    }
}

/// A stream partitioned by key (Flink's `KeyedStream`).
pub struct KeyedStream<T, K> {
    stream: DataStream<T>,
    key: Arc<dyn Fn(&T) -> K + Send + Sync>,
}

impl<T: Record, K: Serialize + Send + Sync + 'static> KeyedStream<T, K> {
    fn hash_partitioner(&self) -> Partitioner<T> {
        let key = self.key.clone();
        Partitioner::Hash(Arc::new(move |r, buf| encode_key(&key(r), buf)))
    }

    /// A keyed process function with keyed state, under operator uid `uid`.
    pub fn process<O: Record, F: KeyedProcessFunction<K, T, O>>(self, uid: &str, func: F) -> DataStream<O> {
        let uid = self.stream.job.register_uid(uid);
        let partitioner = self.hash_partitioner();
        let key_fn = self.key.clone();
        let (job, to) =
            self.stream
                .exchange(partitioner, EdgeKind::Other, format!("keyed {uid}"), Some(&uid));
        let open: OpenFn<O> = Arc::new(move |tb, out| {
            let rx = tb.take_inputs::<T>()?;
            let rt = tb.runtime()?;
            let op = KeyedProcessOp {
                backend: KeyedBackend::new(uid.clone(), std::any::type_name::<K>()),
                key_fn: key_fn.clone(),
                func: func.clone(),
                out,
            };
            Ok(Box::pin(run_input_task(InputGate::new(rx), Box::new(op), rt)))
        });
        DataStream {
            job,
            parts: vec![(to, open)],
        }
    }

    /// Connects with another keyed stream of the same key type: records of
    /// both with equal keys meet in the same subtask and share keyed state.
    pub fn connect<T2: Record>(self, other: KeyedStream<T2, K>) -> ConnectedKeyedStreams<T, T2, K> {
        ConnectedKeyedStreams {
            first: self,
            second: other,
        }
    }
}

/// Two keyed streams connected by key.
pub struct ConnectedKeyedStreams<T1, T2, K> {
    first: KeyedStream<T1, K>,
    second: KeyedStream<T2, K>,
}

impl<T1: Record, T2: Record, K: Serialize + Send + Sync + 'static> ConnectedKeyedStreams<T1, T2, K> {
    /// A keyed two-input process function under operator uid `uid`.
    pub fn process<O: Record, F: KeyedCoProcessFunction<K, T1, T2, O>>(
        self,
        uid: &str,
        func: F,
    ) -> DataStream<O> {
        let uid = self.first.stream.job.register_uid(uid);
        let (k1, k2) = (self.first.key.clone(), self.second.key.clone());
        let left: DataStream<Either<T1, T2>> = self.first.stream.map(Either::Left);
        let right: DataStream<Either<T1, T2>> = self.second.stream.map(Either::Right);
        let (p1, p2) = (k1.clone(), k2.clone());
        let partitioner: Partitioner<Either<T1, T2>> = Partitioner::Hash(Arc::new(move |r, buf| match r {
            Either::Left(a) => encode_key(&p1(a), buf),
            Either::Right(b) => encode_key(&p2(b), buf),
        }));
        let (job, to) =
            left.union(right)
                .exchange(partitioner, EdgeKind::Other, format!("keyed {uid}"), Some(&uid));
        let open: OpenFn<O> = Arc::new(move |tb, out| {
            let rx = tb.take_inputs::<Either<T1, T2>>()?;
            let rt = tb.runtime()?;
            let op = KeyedCoProcessOp {
                backend: KeyedBackend::new(uid.clone(), std::any::type_name::<K>()),
                key1: k1.clone(),
                key2: k2.clone(),
                func: func.clone(),
                out,
            };
            Ok(Box::pin(run_input_task(InputGate::new(rx), Box::new(op), rt)))
        });
        DataStream {
            job,
            parts: vec![(to, open)],
        }
    }
}
