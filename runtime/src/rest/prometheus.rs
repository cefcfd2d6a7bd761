//! `GET /metrics`: the job's metrics in the OpenMetrics text format
//! (Prometheus scrapes it), encoded by `prometheus-client`.
//!
//! Where Flink has a metric, it has Flink's name as its Prometheus reporter
//! writes it (`flink_jobmanager_job_…`, `flink_taskmanager_job_task_…`),
//! with Flink's label names (`job_name`, `task_name`, `subtask_index`,
//! `operator_name`), so dashboards and alerts made for Flink carry over.
//! Like Flink's reporter, Flink's counters are gauges (no `_total`), and
//! times are in Flink's units (milliseconds; nanoseconds where Flink's name
//! says so). What Flink does not have is named `sluice_…`: the histograms
//! of checkpoint durations and alignments (seconds), the state size per
//! operator, the source split positions and the job state.
//!
//! The `flink_taskmanager_job_task_…` figures are at task scope, as
//! Flink's: one series per subtask of an operator chain (the operators
//! chained into a task have none of their own; a chain that ends in a
//! sink sends no records out).

use crate::handle::{CheckpointStatus, JobMonitor, JobState};
use crate::metrics::Sample;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// The content type of [`render`]'s text.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

type Labels = Vec<(String, String)>;
type IntGauges = Family<Labels, Gauge<i64>>;
type FloatGauges = Family<Labels, Gauge<f64, AtomicU64>>;

fn int_gauge(registry: &mut Registry, name: &str, help: &str, value: i64) {
    let g: Gauge<i64> = Gauge::default();
    g.set(value);
    registry.register(name, help, g);
}

fn family<
    M: prometheus_client::metrics::TypedMetric + Default + Clone + std::fmt::Debug + Send + Sync + 'static,
>(
    registry: &mut Registry,
    name: &str,
    help: &str,
) -> Family<Labels, M>
where
    Family<Labels, M>: prometheus_client::encoding::EncodeMetric,
{
    let f: Family<Labels, M> = Family::default();
    registry.register(name, help, f.clone());
    f
}

/// Flink's task labels; `task_id` is the task's vertex in the job graph
/// (names need not be unique).
fn task_labels(vertex: u32, task: &str, subtask: u32) -> Labels {
    vec![
        ("task_id".to_string(), vertex.to_string()),
        ("task_name".to_string(), task.to_string()),
        ("subtask_index".to_string(), subtask.to_string()),
    ]
}

/// The job's metrics now. `rates` is the latest sample of the rate sampler
/// (per-second figures are zero without one).
pub fn render(monitor: &JobMonitor, rates: Option<&Sample>) -> String {
    let status = monitor.status();
    let metrics = monitor.metrics();
    let (triggered, completed, failed) = metrics.checkpoint_counts();
    // The newest completed checkpoint and the ones in progress, read in
    // place (the log can hold 10 000 entries with per-task detail).
    let (last, in_progress) = monitor.with_checkpoint_stats(|all| {
        let last = all
            .iter()
            .rev()
            .find(|s| s.status == CheckpointStatus::Completed)
            .map(|s| (s.duration, s.written_size, s.state_size, s.operators.clone()));
        let running = all
            .iter()
            .filter(|s| s.status == CheckpointStatus::InProgress)
            .count();
        (last, running as i64)
    });
    let mut registry = Registry::with_labels(std::iter::once((
        std::borrow::Cow::Borrowed("job_name"),
        std::borrow::Cow::Owned(status.name.clone()),
    )));
    let r = &mut registry;

    // Job scope: checkpoints and restarts.
    let job = "flink_jobmanager_job_";
    int_gauge(
        r,
        &format!("{job}numberOfCompletedCheckpoints"),
        "Checkpoints (and savepoints) completed",
        completed as i64,
    );
    int_gauge(
        r,
        &format!("{job}numberOfFailedCheckpoints"),
        "Checkpoints that failed",
        failed as i64,
    );
    int_gauge(
        r,
        &format!("{job}numberOfInProgressCheckpoints"),
        "Checkpoints in progress",
        in_progress,
    );
    int_gauge(
        r,
        &format!("{job}totalNumberOfCheckpoints"),
        "Checkpoints triggered",
        triggered as i64,
    );
    int_gauge(
        r,
        &format!("{job}lastCheckpointDuration"),
        "Duration of the last completed checkpoint in milliseconds (-1: none yet)",
        last.as_ref().map_or(-1, |s| s.0.as_millis() as i64),
    );
    int_gauge(
        r,
        &format!("{job}lastCheckpointSize"),
        "Bytes the last completed checkpoint wrote (incremental: its changes; -1: none yet)",
        last.as_ref().map_or(-1, |s| s.1 as i64),
    );
    int_gauge(
        r,
        &format!("{job}lastCheckpointFullSize"),
        "Bytes of state the last completed checkpoint references (-1: none yet)",
        last.as_ref().map_or(-1, |s| s.2 as i64),
    );
    // A restart that restored a checkpoint, else the start from a
    // savepoint or checkpoint.
    let restored_ms = status
        .restart_history
        .iter()
        .rev()
        .find(|e| e.restored_from.is_some())
        .map(|e| e.time_ms as i64)
        .or_else(|| status.restored_from.as_ref().map(|_| monitor.started_ms as i64));
    int_gauge(
        r,
        &format!("{job}lastCheckpointRestoreTimestamp"),
        "When the job last restored a checkpoint or savepoint, ms since the Unix epoch (-1: never)",
        restored_ms.unwrap_or(-1),
    );
    int_gauge(
        r,
        &format!("{job}numRestarts"),
        "Restarts of the job",
        i64::from(status.restarts),
    );
    int_gauge(
        r,
        &format!("{job}uptime"),
        "Milliseconds the job has run: since it started, or once it ended its whole run time (the clock stops; Flink reports -1 then)",
        status.uptime_ms as i64,
    );
    let states: IntGauges = family(
        r,
        "sluice_job_state",
        "1 for the job's current state, 0 for the others.",
    );
    for s in [
        JobState::Running,
        JobState::Restarting,
        JobState::Finished,
        JobState::Failed,
        JobState::Cancelled,
    ] {
        let name = format!("{s:?}").to_uppercase();
        states
            .get_or_create(&vec![("state".to_string(), name)])
            .set(i64::from(s == status.state));
    }
    r.register(
        "sluice_checkpoint_duration_seconds",
        "Durations of completed checkpoints (trigger to commit)",
        metrics.checkpoint_duration.clone(),
    );
    r.register(
        "sluice_checkpoint_alignment_seconds",
        "Alignments (first to last barrier) of every task with inputs in completed checkpoints (source tasks align nothing and are left out)",
        metrics.checkpoint_alignment.clone(),
    );
    let state_size: IntGauges = family(
        r,
        "sluice_operator_state_size_bytes",
        "Bytes of keyed state of each operator in the last completed checkpoint",
    );
    for (uid, size) in last.as_ref().map(|s| s.3.as_slice()).unwrap_or_default() {
        state_size
            .get_or_create(&vec![("operator_name".to_string(), uid.clone())])
            .set(*size as i64);
    }

    // Task scope.
    let t = "flink_taskmanager_job_task_";
    let rec_in: IntGauges = family(
        r,
        &format!("{t}numRecordsIn"),
        "Records that entered the task (a source: read)",
    );
    let rec_out: IntGauges = family(
        r,
        &format!("{t}numRecordsOut"),
        "Records the task sent to the next one",
    );
    let in_rate: FloatGauges = family(
        r,
        &format!("{t}numRecordsInPerSecond"),
        "Records in per second (over the last second)",
    );
    let out_rate: FloatGauges = family(
        r,
        &format!("{t}numRecordsOutPerSecond"),
        "Records out per second (over the last second)",
    );
    let backpressure: FloatGauges = family(
        r,
        &format!("{t}backPressuredTimeMsPerSecond"),
        "Milliseconds per second the task waited for channel capacity",
    );
    let delay: IntGauges = family(
        r,
        &format!("{t}checkpointStartDelayNanos"),
        "Trigger to the task's first barrier in the last checkpoint it snapshotted (completed or not), in nanoseconds (measured to the millisecond, less the alignment)",
    );
    let alignment: IntGauges = family(
        r,
        &format!("{t}checkpointAlignmentTime"),
        "First to last barrier in the last checkpoint the task snapshotted (completed or not), in nanoseconds (0 for a source task)",
    );
    let positions: IntGauges = family(
        r,
        "sluice_source_split_position",
        "The read position of each split of a source task",
    );
    for c in monitor.task_counters() {
        let l = task_labels(c.vertex, &c.task, c.subtask);
        rec_in.get_or_create(&l).set(c.records_in as i64);
        rec_out.get_or_create(&l).set(c.records_out as i64);
        // Back to whole nanoseconds (truncating could lose one).
        delay
            .get_or_create(&l)
            .set((c.start_delay_ms * 1e6).round() as i64);
        alignment
            .get_or_create(&l)
            .set((c.alignment_ms * 1e6).round() as i64);
        let rate = rates.and_then(|s| {
            s.tasks
                .iter()
                .find(|x| x.counters.vertex == c.vertex && x.counters.subtask == c.subtask)
        });
        in_rate
            .get_or_create(&l)
            .set(rate.map_or(0.0, |x| x.records_in_per_second));
        out_rate
            .get_or_create(&l)
            .set(rate.map_or(0.0, |x| x.records_out_per_second));
        backpressure
            .get_or_create(&l)
            .set(rate.map_or(0.0, |x| x.backpressured_ms_per_second));
        for (split, at) in &c.positions {
            let mut l = l.clone();
            l.push(("split".to_string(), split.to_string()));
            positions.get_or_create(&l).set(*at as i64);
        }
    }
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = encode(&mut out, &registry);
    out
}
