//! Sinks: the end of a pipeline.

use crate::error::Result;
use crate::operator::{InitContext, Operator, Outbox, SnapshotParts};
use sluice_core::{CheckpointBarrier, CheckpointId};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

/// A sink: a factory of one writer per subtask.
pub trait Sink<T>: Send + Sync + 'static {
    /// Opens the writer of subtask `subtask` of `parallelism`.
    fn open(&self, subtask: u32, parallelism: u32) -> Result<Box<dyn SinkWriter<T>>>;
}

/// Writes the records of one subtask.
pub trait SinkWriter<T>: Send {
    /// Writes one record.
    fn write(&mut self, record: T) -> Result<()>;
    /// The checkpoint hook: the barrier of `checkpoint` reached this sink;
    /// everything written before it belongs to the checkpoint.
    fn snapshot(&mut self, _checkpoint: CheckpointId) -> Result<()> {
        Ok(())
    }
    /// Checkpoint `checkpoint` is complete (its metadata is committed).
    fn checkpoint_complete(&mut self, _checkpoint: CheckpointId) -> Result<()> {
        Ok(())
    }
    /// End of input.
    fn finish(&mut self) -> Result<()> {
        Ok(())
    }
}

pub(crate) struct SinkOp<T> {
    pub writer: Box<dyn SinkWriter<T>>,
}

#[async_trait::async_trait]
impl<T: Send + 'static> Operator<T> for SinkOp<T> {
    async fn initialize(&mut self, _ctx: &InitContext) -> Result<()> {
        Ok(())
    }
    #[inline]
    fn process(&mut self, record: T) -> Result<()> {
        self.writer.write(record)
    }
    fn snapshot(&mut self, barrier: &CheckpointBarrier, _parts: &mut SnapshotParts) -> Result<()> {
        self.writer.snapshot(barrier.checkpoint_id)
    }
    fn checkpoint_complete(&mut self, id: CheckpointId) -> Result<()> {
        self.writer.checkpoint_complete(id)
    }
    fn finish(&mut self) -> Result<()> {
        self.writer.finish()
    }
    fn outbox(&mut self) -> Option<&mut dyn Outbox> {
        None
    }
}

/// Drops every record and counts them.
#[derive(Debug, Clone, Default)]
pub struct DiscardSink {
    count: Arc<AtomicU64>,
}

impl DiscardSink {
    /// A new sink.
    pub fn new() -> Self {
        Self::default()
    }

    /// Records received so far (published at each barrier and at the end;
    /// replayed records count again).
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }
}

struct DiscardWriter {
    local: u64,
    count: Arc<AtomicU64>,
}

impl<T: Send + 'static> Sink<T> for DiscardSink {
    fn open(&self, _subtask: u32, _parallelism: u32) -> Result<Box<dyn SinkWriter<T>>> {
        Ok(Box::new(DiscardWriter {
            local: 0,
            count: self.count.clone(),
        }))
    }
}

impl<T> SinkWriter<T> for DiscardWriter {
    #[inline]
    fn write(&mut self, _record: T) -> Result<()> {
        self.local += 1;
        Ok(())
    }
    fn snapshot(&mut self, _checkpoint: CheckpointId) -> Result<()> {
        self.count
            .fetch_add(std::mem::take(&mut self.local), Ordering::Relaxed);
        Ok(())
    }
    fn finish(&mut self) -> Result<()> {
        self.count
            .fetch_add(std::mem::take(&mut self.local), Ordering::Relaxed);
        Ok(())
    }
}

/// Collects every record into a shared vector: an at-least-once sink for
/// tests. Records are buffered per subtask and published at each barrier,
/// at the end, and every 4096 records; after a failure, records since the
/// last checkpoint are replayed and appear again.
#[derive(Debug)]
pub struct CollectSink<T> {
    items: Arc<Mutex<Vec<T>>>,
}

impl<T> Clone for CollectSink<T> {
    fn clone(&self) -> Self {
        CollectSink {
            items: self.items.clone(),
        }
    }
}

impl<T> Default for CollectSink<T> {
    fn default() -> Self {
        CollectSink {
            items: Arc::new(Mutex::new(Vec::new())),
        }
    }
}

impl<T: Clone> CollectSink<T> {
    /// A new, empty sink.
    pub fn new() -> Self {
        Self::default()
    }

    /// A copy of everything collected so far.
    pub fn items(&self) -> Vec<T> {
        self.items.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

struct CollectWriter<T> {
    local: Vec<T>,
    items: Arc<Mutex<Vec<T>>>,
}

impl<T> CollectWriter<T> {
    fn publish(&mut self) {
        let mut items = self.items.lock().unwrap_or_else(|p| p.into_inner());
        items.append(&mut self.local);
    }
}

impl<T: Send + 'static> Sink<T> for CollectSink<T> {
    fn open(&self, _subtask: u32, _parallelism: u32) -> Result<Box<dyn SinkWriter<T>>> {
        Ok(Box::new(CollectWriter {
            local: Vec::new(),
            items: self.items.clone(),
        }))
    }
}

impl<T: Send> SinkWriter<T> for CollectWriter<T> {
    fn write(&mut self, record: T) -> Result<()> {
        self.local.push(record);
        if self.local.len() >= 4096 {
            self.publish();
        }
        Ok(())
    }
    fn snapshot(&mut self, _checkpoint: CheckpointId) -> Result<()> {
        self.publish();
        Ok(())
    }
    fn finish(&mut self) -> Result<()> {
        self.publish();
        Ok(())
    }
}
