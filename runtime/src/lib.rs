//! # sluice-runtime
//!
//! The dataflow runtime of Sluice: a job builder ([`Job`], [`DataStream`],
//! [`KeyedStream`]), one tokio task per subtask connected by bounded
//! channels carrying batches and in-band barriers, a checkpoint coordinator,
//! barrier alignment, asynchronous snapshots and exactly-once recovery.
//!
//! ```
//! use sluice_runtime::prelude::*;
//! use std::time::Duration;
//!
//! #[derive(Clone)]
//! struct Sum(Option<ValueState<u64>>);
//!
//! impl KeyedProcessFunction<u64, (u64, u64), (u64, u64)> for Sum {
//!     fn open(&mut self, ctx: &mut OpenContext<'_>) -> Result<()> {
//!         self.0 = Some(ctx.value_state("sum")?);
//!         Ok(())
//!     }
//!     fn process(&mut self, key: &u64, (_, v): (u64, u64), ctx: &mut KeyedContext<'_>,
//!                out: &mut Collector<'_, (u64, u64)>) -> Result<()> {
//!         let state = self.0.as_ref().expect("opened");
//!         // One hash probe: read, add, write back in place.
//!         let sum = state.update(ctx, |sum| *sum.insert(sum.unwrap_or(0) + v))?;
//!         out.collect((*key, sum))
//!     }
//! }
//!
//! # tokio::runtime::Runtime::new().unwrap().block_on(async {
//! let sink = CollectSink::new();
//! let job = Job::new("sums")
//!     .with_parallelism(2)
//!     .with_checkpointing(CheckpointConfig::every(Duration::from_millis(50)));
//! job.source("numbers", SequenceSource::new(1000, 2, |i| (i % 10, i)), 2)
//!     .key_by(|(k, _)| *k)
//!     .process("sum", Sum(None))
//!     .sink(sink.clone())
//!     .unwrap();
//! job.execute().await.unwrap();
//! let last_for_key_3 = sink.items().into_iter().filter(|(k, _)| *k == 3).map(|(_, s)| s).max();
//! assert_eq!(last_for_key_3, Some((0..1000).filter(|i| i % 10 == 3).sum()));
//! # });
//! ```
#![warn(missing_docs)]

mod allocator;
mod barriers;
mod channel;
pub mod cluster;
mod config;
mod edges;
mod error;
pub mod file_sink;
mod graph;
mod handle;
#[cfg(feature = "cli")]
pub mod inspect;
mod keyed;
pub mod location;
mod master;
pub mod metrics;
pub mod net;
mod operator;
#[cfg(feature = "rest")]
pub mod rest;
#[cfg(feature = "memory")]
pub mod rewrite;
mod savepoint;
pub mod schema;
mod sink;
mod source;
mod state;
mod task;
#[cfg(feature = "testing")]
pub mod testing;
pub mod ttl;
mod two_phase;
#[cfg(feature = "workload")]
pub mod workload;

pub use allocator::limit_allocator_retention;
pub use channel::BATCH_SIZE;
pub use config::{CheckpointConfig, CheckpointingMode, IncrementalPolicy, RestartStrategy};
pub use error::{Result, RuntimeError};
pub use file_sink::FileSink;
pub use graph::{ConnectedKeyedStreams, DataStream, Job, KeyedStream, Record};
pub use handle::{
    CheckpointStats, CheckpointStatus, JobHandle, JobMonitor, JobResult, JobState, JobStatus, Recovery,
    RestartEvent, Savepoint, SubtaskCheckpointStats,
};
pub use keyed::{Either, KeyedCoProcessFunction, KeyedProcessFunction};
pub use operator::Collector;
pub use savepoint::{copy_savepoint, read_keyed_entries, EntryKey, RestoreSource, SavepointLocation};
pub use sink::{CollectSink, DiscardSink, Sink, SinkWriter};
pub use source::{FileLinesSource, SequenceSource, Source, SplitReader, VecSource};
pub use state::{KeyedContext, ListState, MapState, OpenContext, ValueState};
pub use two_phase::{TransactionalWriter, TwoPhaseCommitSink};

/// Everything a job definition usually needs.
pub mod prelude {
    pub use crate::{
        CheckpointConfig, CheckpointingMode, CollectSink, Collector, DataStream, DiscardSink, Either, Job,
        KeyedCoProcessFunction, KeyedContext, KeyedProcessFunction, KeyedStream, ListState, MapState,
        OpenContext, RestartStrategy, Result, RuntimeError, SequenceSource, Sink, SinkWriter, Source,
        ValueState, VecSource,
    };
}
