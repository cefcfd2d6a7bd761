//! Savepoints in the coordinator: triggering one into its own directory,
//! and what its commit means (nothing for an intermediate savepoint; for a
//! stop-with-savepoint, the tasks commit and end, and it becomes the
//! restore point of any later recovery).

use super::coordinator::{end_sources, Coordinator, PendingSavepoint};
use crate::error::Result;
use crate::handle::{CheckpointStatus, CompletedStats, Savepoint, SavepointResponder};
use crate::savepoint::{savepoint_dir_name, RestoreSource, SavepointLocation};
use crate::task::{Control, TaskInfo};
use sluice_core::{Alignment, CheckpointId, CheckpointKind, CheckpointMetadata};
use std::sync::Arc;
use tracing::info;

impl Coordinator {
    /// Starts savepoint `id` into a new directory under `target`. Savepoints
    /// are always aligned (a consistent cut whatever the checkpointing mode)
    /// and ignore the max-concurrent and min-pause settings, as Flink's do.
    pub async fn trigger_savepoint(
        &mut self,
        infos: &[TaskInfo],
        target: SavepointLocation,
        stop: bool,
        tx: SavepointResponder,
    ) -> Result<()> {
        let id = self.next_id;
        self.next_id = id.next();
        let location = target.child(&savepoint_dir_name(id));
        info!(
            checkpoint = id.0,
            "triggering {}savepoint {id} to {}",
            if stop { "stop-with-" } else { "" },
            location.describe()
        );
        self.savepoint_targets.insert(id, location.clone());
        if let Some(announce) = &self.announce_savepoint {
            // Workers learn where their tasks write it.
            announce(id, location.describe());
        }
        let savepoint = PendingSavepoint {
            location,
            stop,
            responder: Some(tx),
        };
        self.start(
            infos,
            id,
            CheckpointKind::Savepoint,
            Alignment::Aligned,
            // Savepoints are always full and self-contained.
            None,
            None,
            Some(savepoint),
        )
        .await?;
        Ok(())
    }

    /// Savepoint `id` is committed. It is not a checkpoint: not restored
    /// from after a failure, not subject to retention, and (but for
    /// stop-with-savepoint, after which the job ends) tasks are not told it
    /// completed, so two-phase-commit sinks commit with the next
    /// checkpoint, as in Flink. A stop-with-savepoint, once its completion
    /// is delivered, becomes the restore point of any later recovery (its
    /// sinks committed its output), and a restored job ends at once.
    pub(super) fn savepoint_committed(
        &mut self,
        id: CheckpointId,
        sp: PendingSavepoint,
        meta: CheckpointMetadata,
        stats: &CompletedStats,
        infos: &[TaskInfo],
    ) {
        let loc = sp.location;
        info!(
            checkpoint = id.0,
            "savepoint {id} completed in {} ms: {} bytes at {}",
            stats.duration.as_millis(),
            stats.state_size,
            loc.describe()
        );
        self.stats.record(id, stats, CheckpointStatus::Completed);
        let savepoint = Savepoint {
            id,
            location: loc.clone(),
        };
        if sp.stop {
            self.completed.stop_restore = Some(Arc::new(RestoreSource {
                metadata: Arc::new(meta),
                storage: loc.storage.clone(),
                base: loc.dir.clone(),
                location: loc.describe(),
            }));
            for t in infos {
                let _ = t.control.send(Control::Complete(id));
            }
            self.completed.delivered(id);
            end_sources(infos);
            self.stopped_with = Some(savepoint.clone());
        }
        if let Some(r) = sp.responder {
            let _ = r.send(Ok(savepoint));
        }
    }
}
