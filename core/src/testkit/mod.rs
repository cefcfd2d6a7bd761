//! The conformance suite (feature `testkit`): public async test functions
//! that every state backend and checkpoint storage runs from its own tests,
//! as `object_store`'s integration suite does. A new backend proves itself
//! by calling [`run_state_backend_suite`] and/or
//! [`run_checkpoint_storage_suite`] (plus [`storage_survives_reopen`] for a
//! durable storage). A storage crate needs no state backend to test itself:
//! the suite builds its snapshot files from a [`crate::MapSnapshot`].
//!
//! The functions panic with a message naming the broken rule. Each uses its
//! own checkpoint ids (1000 and up), so they can share one storage; the
//! storage must not hold other checkpoints with ids from 1000 to 1999, nor
//! `savepoints/` or `races/` directories.

mod state;
mod storage;

pub use state::*;
pub use storage::*;

/// The max parallelism the suite's stores and snapshots use.
const MAX_PARALLELISM: u32 = 128;
