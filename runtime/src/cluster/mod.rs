//! Jobs spread over processes (issue 15): a job master (coordinator) and
//! workers running the same job build.
//!
//! - [`WorkerPool`] (coordinator side, [`crate::Job::with_workers`]):
//!   workers register with it; each attempt's tasks are deployed onto
//!   them; their events and task results come back on the control
//!   connection.
//! - [`crate::Job::start_worker`]: a worker, which runs the tasks deployed
//!   onto it with the same code as in one process, every channel over TCP
//!   ([`crate::net`]).
//!
//! Every message carries its attempt; a worker stops every task of an
//! attempt when a newer one is deployed, when it is told to, and when it
//! loses the coordinator, and its channel listener refuses channels of
//! superseded attempts. See `docs/architecture.md` ("Jobs over several
//! processes").

mod pool;
mod protocol;
mod worker;

pub use pool::WorkerPool;
pub use protocol::{CONTROL_VERSION, HEARTBEAT, HEARTBEAT_TIMEOUT, WORKER_SILENCE_LIMIT};
pub use worker::{WorkerHandle, WorkerOptions};

pub(crate) use worker::{start as start_worker, WorkerSetup};
