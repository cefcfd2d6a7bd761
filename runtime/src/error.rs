//! The runtime's error type.

use sluice_core::CheckpointId;

/// Result alias of the runtime.
pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;

/// What can go wrong while building or running a job.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum RuntimeError {
    /// A state backend or checkpoint storage operation failed.
    #[error(transparent)]
    Storage(#[from] sluice_core::Error),
    /// A user function returned an error.
    #[error("operator {operator} failed: {message}")]
    User {
        /// The operator (uid or name) whose function failed.
        operator: String,
        /// The function's message.
        message: String,
    },
    /// A task panicked.
    #[error("task {task} panicked: {message}")]
    Panic {
        /// The task that panicked.
        task: String,
        /// The panic payload, if it was a string.
        message: String,
    },
    /// The job graph or a configuration value is invalid.
    #[error("invalid job: {0}")]
    InvalidJob(String),
    /// Encoding or decoding of a record or a state value failed.
    #[error("codec error in {what}: {reason}")]
    Codec {
        /// What was being encoded or decoded (operator and state name).
        what: String,
        /// The codec's message.
        reason: String,
    },
    /// A channel to another task closed unexpectedly (the other task failed).
    #[error("task {task}: a channel closed unexpectedly (another task failed or the job was cancelled)")]
    ChannelClosed {
        /// The task that saw the closed channel.
        task: String,
    },
    /// A network channel between tasks failed (connection, handshake,
    /// wire format, or flow-control protocol).
    #[error("network channel: {0}")]
    Network(String),
    /// A task running on a worker failed (the worker's message).
    #[error("task {task} failed on its worker: {message}")]
    Worker {
        /// The task.
        task: String,
        /// Its error, as the worker reported it.
        message: String,
    },
    /// The job was cancelled.
    #[error("job cancelled")]
    Cancelled,
    /// The restart strategy gave up after a failure.
    #[error("job failed and the restart strategy {strategy} gave up after {attempts} restarts; last failure: {last}")]
    RestartsExhausted {
        /// The strategy in use.
        strategy: String,
        /// Number of restarts made.
        attempts: u32,
        /// The last failure.
        last: Box<RuntimeError>,
    },
    /// Checkpointing failed more often in a row than tolerated.
    #[error("{failures} checkpoints failed in a row (tolerable: {tolerable}); last: checkpoint {last_id}: {reason}")]
    TooManyCheckpointFailures {
        /// Consecutive failures seen.
        failures: u32,
        /// The configured tolerance.
        tolerable: u32,
        /// The last failed checkpoint.
        last_id: CheckpointId,
        /// Why it failed.
        reason: String,
    },
    /// The final checkpoint, taken when every source reached its end, failed;
    /// the attempt fails and the job restarts from the latest checkpoint.
    #[error("final checkpoint {id} failed: {reason}")]
    FinalCheckpointFailed {
        /// The final checkpoint.
        id: CheckpointId,
        /// Why it failed.
        reason: String,
    },
    /// A fault injected by a test (`sluice_runtime::testing`).
    #[error("injected failure: {0}")]
    Injected(String),
    /// A requested checkpoint or savepoint failed (or its outcome is
    /// unknown); the job goes on.
    #[error("{reason}")]
    CheckpointFailed {
        /// Which checkpoint or savepoint, and why.
        reason: String,
    },
    /// The job is not running (it ended, or was never started): nothing can
    /// be triggered.
    #[error("the job is not running")]
    JobNotRunning,
    /// The job's REST API could not be reached or refused a request.
    #[error("REST API of the job at {url}: {reason}")]
    Rest {
        /// The address asked.
        url: String,
        /// What went wrong (the server's message, if it answered).
        reason: String,
    },
    /// An internal invariant of the runtime was violated: a bug in Sluice.
    /// The job restarts from its latest checkpoint; please report it.
    #[error("internal error (a bug in Sluice, please report it): {0}")]
    Internal(String),
    /// The latest checkpoint cannot be restored (a corrupt or missing file),
    /// and the job's two-phase-commit sinks were already told that it
    /// completed: they committed its output, so restoring an older
    /// checkpoint would commit that output a second time. The job stops
    /// instead of falling back.
    #[error(
        "checkpoint {checkpoint} cannot be restored: {cause}. Its completion was already delivered to the \
         job's two-phase-commit sinks (they committed its output), so restoring an older checkpoint would \
         commit output again; the job does not fall back. Repair or restore the damaged file and resume, or \
         start from a savepoint or retained checkpoint you choose (Job::from_savepoint, CLI --from-savepoint); \
         to fall back anyway, accepting duplicated output, set CheckpointConfig::fallback_to_older_checkpoint \
         (CLI --allow-checkpoint-fallback)"
    )]
    UnrestorableCheckpoint {
        /// The checkpoint that cannot be restored.
        checkpoint: CheckpointId,
        /// Why (names the file at fault).
        #[source]
        cause: sluice_core::Error,
    },
    /// Whether checkpoint metadata was committed is unknown (the commit's
    /// answer was lost and reading it back failed too), so no restore point
    /// can be chosen yet: skipping it could lose committed output, using it
    /// could use a checkpoint that does not exist.
    #[error(
        "the outcome of the commit of checkpoint {checkpoint} is unknown ({reason}); recovery waits until it \
         can be read back"
    )]
    CommitUnresolved {
        /// The checkpoint whose commit is undecided.
        checkpoint: CheckpointId,
        /// What is known.
        reason: String,
    },
}

impl RuntimeError {
    /// Whether restarting the job (restoring a checkpoint and running
    /// again) can cure this failure. Not for the job being cancelled, an
    /// invalid job, restarts already exhausted, state that does not fit
    /// the job ([`sluice_core::Error::Incompatible`]), or a checkpoint that
    /// cannot be restored without duplicating output; a restart is tried
    /// for everything else (task errors and panics, storage failures,
    /// corrupt checkpoints, which recovery then skips, an undecided commit,
    /// internal errors).
    pub fn is_restartable(&self) -> bool {
        !matches!(
            self,
            RuntimeError::Cancelled
                | RuntimeError::InvalidJob(_)
                | RuntimeError::RestartsExhausted { .. }
                | RuntimeError::UnrestorableCheckpoint { .. }
                | RuntimeError::JobNotRunning
                | RuntimeError::Storage(sluice_core::Error::Incompatible { .. })
        )
    }

    /// A user-function error for `operator`.
    pub fn user(operator: impl Into<String>, message: impl std::fmt::Display) -> Self {
        RuntimeError::User {
            operator: operator.into(),
            message: message.to_string(),
        }
    }
}
