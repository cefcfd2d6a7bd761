//! The command line's grammar (clap).

use clap::{Parser, Subcommand, ValueEnum};

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "Stateful stream processing with Flink-style checkpoints"
)]
pub(crate) struct Cli {
    #[command(subcommand)]
    pub(crate) command: Command,
}

#[derive(Subcommand)]
pub(crate) enum Command {
    /// Run a built-in job.
    Run {
        #[command(subcommand)]
        job: RunJob,
    },
    /// Inspect checkpoint storage.
    Checkpoints {
        #[command(subcommand)]
        command: CheckpointsCommand,
    },
    /// Take a savepoint of a running job (started with `--rest`), into a new
    /// directory under TARGET (`redb:PATH[#DIR]`, `file:DIR` or
    /// `s3://bucket/prefix`).
    Savepoint {
        /// The job's REST address, e.g. `http://127.0.0.1:8081`.
        #[arg(long)]
        job: String,
        /// Stop the job with the savepoint (its sources emit nothing after
        /// it; the job ends once it is complete).
        #[arg(long)]
        stop: bool,
        /// Where the savepoint goes.
        target: String,
    },
    /// Trigger a checkpoint of a running job now.
    Checkpoint {
        /// The job's REST address.
        #[arg(long)]
        job: String,
    },
    /// Show a running job's status and checkpoint statistics.
    Status {
        /// The job's REST address.
        #[arg(long)]
        job: String,
        /// Print the JSON the job answered.
        #[arg(long)]
        json: bool,
    },
    /// Cancel a running job.
    Cancel {
        /// The job's REST address.
        #[arg(long)]
        job: String,
    },
    /// Print a savepoint's or checkpoint's metadata (PATH: `redb:FILE#DIR`,
    /// `file:ROOT/DIR`, `s3://bucket/prefix/DIR`; DIR a savepoint directory
    /// or `chk-<id>`).
    Inspect {
        /// The savepoint or checkpoint.
        path: String,
        /// Print the metadata as JSON.
        #[arg(long)]
        json: bool,
        /// The operator whose state `--dump` prints.
        #[arg(long)]
        operator: Option<String>,
        /// Print the operator's keyed state as JSON lines (key group, key,
        /// state name, value).
        #[arg(long, requires = "operator")]
        dump: bool,
        /// S3 endpoint URL (else AWS_ENDPOINT_URL or AWS's default).
        #[arg(long)]
        s3_endpoint: Option<String>,
    },
    /// Copy a savepoint directory to another place (another folder, file,
    /// bucket, or kind of storage); the copy restores the same.
    Copy {
        /// The savepoint.
        src: String,
        /// The new directory (must be empty).
        dst: String,
        /// S3 endpoint URL (else AWS_ENDPOINT_URL or AWS's default).
        #[arg(long)]
        s3_endpoint: Option<String>,
    },
    /// Write a changed copy of a savepoint (or retained checkpoint) as a new
    /// self-contained savepoint: operators renamed or dropped, every
    /// operator's state folded into one full file per subtask. The source
    /// is never modified. (Migrating a state's values needs the types:
    /// `sluice_runtime::rewrite` in a program of yours.)
    Rewrite {
        /// The savepoint or `…#chk-<id>`.
        src: String,
        /// The new savepoint's directory (must be empty).
        dst: String,
        /// Rename operator uid OLD to NEW (repeatable).
        #[arg(long = "rename-operator", value_name = "OLD=NEW")]
        rename: Vec<String>,
        /// Leave out the state of operator UID (repeatable).
        #[arg(long = "drop-operator", value_name = "UID")]
        drop: Vec<String>,
        /// S3 endpoint URL (else AWS_ENDPOINT_URL or AWS's default).
        #[arg(long)]
        s3_endpoint: Option<String>,
    },
}

#[derive(Subcommand)]
pub(crate) enum CheckpointsCommand {
    /// List the completed checkpoints (id, time, kind, size, duration).
    List {
        /// Checkpoint storage: `redb:PATH`, `file:DIR` or `s3://bucket/prefix`.
        #[arg(long, default_value = DEFAULT_STORAGE)]
        storage: String,
        /// S3 endpoint URL (else AWS_ENDPOINT_URL or AWS's default).
        #[arg(long)]
        s3_endpoint: Option<String>,
    },
}

pub(crate) const DEFAULT_STORAGE: &str = "redb:./sluice-data/checkpoints.redb";

#[derive(Subcommand)]
pub(crate) enum RunJob {
    /// The reference workload: keyed running sum over a generated sequence.
    KeyedSum(Box<KeyedSumArgs>),
}

#[derive(Clone, Copy, ValueEnum)]
pub(crate) enum Mode {
    ExactlyOnce,
    AtLeastOnce,
}

#[derive(clap::Args)]
pub(crate) struct KeyedSumArgs {
    /// Number of events N.
    #[arg(long, default_value_t = 20_000_000)]
    pub(crate) events: u64,
    /// Number of keys K.
    #[arg(long, default_value_t = 100_000)]
    pub(crate) keys: u64,
    /// Parallelism of the source and the keyed operator.
    #[arg(long, default_value_t = 2)]
    pub(crate) parallelism: u32,
    /// Checkpoint interval, e.g. `1s`, `100ms`, or `none`.
    #[arg(long, default_value = "1s")]
    pub(crate) checkpoint_interval: String,
    /// Checkpointing mode.
    #[arg(long, value_enum, default_value = "exactly-once")]
    pub(crate) mode: Mode,
    /// Inject one task failure after this many events (counted at the keyed operator).
    #[arg(long)]
    pub(crate) fail_after: Option<u64>,
    /// Working state backend: `redb` (on disk, larger than memory) or `memory`.
    #[arg(long, default_value = "redb")]
    pub(crate) state: String,
    /// Directory of the redb state backend's working files.
    #[arg(long, default_value = "./sluice-data/state")]
    pub(crate) state_dir: std::path::PathBuf,
    /// Checkpoint storage: `redb:PATH` (a local file), `file:DIR` (a
    /// directory, local or on a network mount; an absolute path works too),
    /// `s3://bucket/prefix` (credentials and region from the usual AWS
    /// variables) or `memory`.
    #[arg(long, default_value = DEFAULT_STORAGE)]
    pub(crate) storage: String,
    /// S3 endpoint URL (else AWS_ENDPOINT_URL or AWS's default).
    #[arg(long)]
    pub(crate) s3_endpoint: Option<String>,
    /// Resume from the latest completed checkpoint in the storage (after the
    /// process was killed).
    #[arg(long)]
    pub(crate) resume: bool,
    /// Completed checkpoints to retain.
    #[arg(long, default_value_t = 3)]
    pub(crate) retained: usize,
    /// Incremental checkpoints: each writes only the keys changed since the
    /// previous one and references its files (`--incremental false`: every
    /// checkpoint writes the whole state).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub(crate) incremental: bool,
    /// Incremental: changes files on top of a full snapshot before the next
    /// one is full again (restore reads at most this many).
    #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) max_chain: u32,
    /// Restarts after failures before the job gives up (fixed delay of
    /// 100 ms between them).
    #[arg(long, default_value_t = 3)]
    pub(crate) restart_attempts: u32,
    /// Max parallelism (number of key groups).
    #[arg(long, default_value_t = 128)]
    pub(crate) max_parallelism: u32,
    /// Pace the source to about this many events per second (demos, tests).
    #[arg(long)]
    pub(crate) rate: Option<u64>,
    /// Splits of the source (fixed: a savepoint restores at any parallelism
    /// only into a source with the same number of splits).
    #[arg(long, default_value_t = 8)]
    pub(crate) splits: u32,
    /// Start from this savepoint (or retained checkpoint `…#chk-<id>`).
    #[arg(long)]
    pub(crate) from_savepoint: Option<String>,
    /// With `--from-savepoint`: skip state of operators the job does not have.
    #[arg(long)]
    pub(crate) allow_non_restored_state: bool,
    /// Write every `key sum` the job emits, exactly once, into part files in
    /// this directory (a transactional file sink: two-phase commit with the
    /// checkpoints); the end of the run checks the committed lines.
    #[arg(long)]
    pub(crate) output: Option<std::path::PathBuf>,
    /// When the latest checkpoint cannot be restored, restore an older one
    /// even though the exactly-once sink (`--output`) already committed the
    /// newer one's output: this may duplicate output. Without it the job
    /// stops and names the damaged file.
    #[arg(long)]
    pub(crate) allow_checkpoint_fallback: bool,
    /// Serve the job's REST API, its Prometheus metrics (`/metrics`) and
    /// its dashboard (`/`) on this address (`PORT` or `ADDR:PORT`; a bare
    /// port binds 127.0.0.1, port 0 any free port).
    #[arg(long)]
    pub(crate) rest: Option<String>,
    /// A token every REST request must carry (`Authorization: Bearer
    /// TOKEN` or `?token=TOKEN`); required to bind another address than
    /// loopback. The CLI's client commands send `SLUICE_REST_TOKEN`.
    #[arg(long, env = "SLUICE_REST_TOKEN", hide_env_values = true)]
    pub(crate) rest_token: Option<String>,
    /// Run the job's tasks on N worker processes; this process is the
    /// coordinator (job master). The storage must be one every worker
    /// reaches: `file:DIR` on a shared path, or `s3://…`.
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub(crate) workers: Option<u32>,
    /// With `--workers`: the address workers connect to (port 0: any free
    /// port; the coordinator prints the one it got).
    #[arg(long, default_value = "127.0.0.1:0", requires = "workers")]
    pub(crate) listen: String,
    /// With `--workers`: start the N workers as child processes of this one
    /// (with the same job arguments).
    #[arg(long, requires = "workers")]
    pub(crate) spawn_workers: bool,
    /// Run as a worker of the coordinator at ADDR (give it the same job
    /// arguments as the coordinator: events, keys, parallelism, splits,
    /// storage, …). Its state backend's files go to
    /// `--state-dir/worker-<pid>`.
    #[arg(long, conflicts_with = "workers")]
    pub(crate) coordinator: Option<String>,
    /// With `--coordinator`: the port of the worker's channel listener (0:
    /// any free port).
    #[arg(long, default_value_t = 0, requires = "coordinator")]
    pub(crate) channel_port: u16,
    /// With `--coordinator`: the address other workers connect to for this
    /// worker's channels, when it is not the bound one (NAT, a pod's
    /// address, a proxy).
    #[arg(long, requires = "coordinator")]
    pub(crate) advertise: Option<String>,
    /// With `--coordinator`: the address the worker's channel listener
    /// binds (default 127.0.0.1; 0.0.0.0 for workers on other machines).
    #[arg(long, default_value = "127.0.0.1", requires = "coordinator")]
    pub(crate) bind: String,
}
