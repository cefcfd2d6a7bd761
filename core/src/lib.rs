//! # sluice-core
//!
//! The shared vocabulary of Sluice: ids, checkpoint barriers, key groups, the
//! [`StateBackend`] / [`KeyedStateStore`] traits (working state) and the
//! [`CheckpointStorage`] trait (durable snapshots), the canonical snapshot
//! format ([`mod@format`]), checkpoint metadata ([`metadata`]) and, behind the
//! `testkit` feature, the conformance suite every backend runs.
//!
//! A new storage plugin is one crate that depends on this one, implements
//! [`CheckpointStorage`] (and/or [`StateBackend`]) and calls every function
//! of `sluice_core::testkit` from its tests.
//!
//! ```
//! use sluice_core::{key_group_for_key, KeyGroupRange, operator_index_for_key_group};
//!
//! let max_parallelism = 128;
//! let key = postcard::to_allocvec(&42u64).unwrap();
//! let group = key_group_for_key(&key, max_parallelism);
//! let owner = operator_index_for_key_group(max_parallelism, 2, group);
//! assert!(KeyGroupRange::for_subtask(max_parallelism, 2, owner).contains(group));
//! ```

#![warn(missing_docs)]

pub mod barrier;
pub mod bytemap;
pub mod channel_state;
pub mod error;
pub mod format;
pub mod heap;
pub mod ids;
pub mod keygroup;
pub mod load;
pub mod metadata;
pub mod state;
pub mod storage;
#[cfg(feature = "testkit")]
pub mod testkit;

pub use barrier::{Alignment, CheckpointBarrier};
pub use bytes::Bytes;
pub use error::{BoxError, Error, Result};
pub use ids::{CheckpointId, CheckpointKind, OperatorUid};
pub use keygroup::{
    check_parallelism, key_group_for_key, operator_index_for_key_group, stable_key_hash, KeyGroupRange,
    DEFAULT_MAX_PARALLELISM,
};
pub use load::{LoadBatch, LoadEntry};
pub use metadata::{
    ChannelStateHandle, CheckpointMetadata, SchemaId, SplitPosition, StateDescriptor, StateFileHandle,
};
pub use state::{
    ChangeSnapshot, KeyedStateStore, MapSnapshot, StateBackend, StateId, StateSnapshot, StoreScope,
};
pub use storage::{
    Capabilities, CheckpointListing, CheckpointStorage, CheckpointStorageExt, FileListing, FileUpload,
};

/// The version of Sluice that wrote a checkpoint or savepoint (recorded in
/// its metadata).
pub const SLUICE_VERSION: &str = env!("CARGO_PKG_VERSION");
